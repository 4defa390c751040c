//! A fast, floating-point-safe Gaussian mechanism: discrete Gaussian noise on a power-of-two
//! grid, sampled with exact integer alias tables.
//!
//! **Mechanism.** For a vector `x` with L2 sensitivity `C` and noise multiplier `z`:
//! pick a grid `g = 2^k` about `zC / 2^16`; snap each coordinate to the grid,
//! `n_i = round(x_i / g)` (this moves a neighbouring pair by at most `g * sqrt(d)` more in
//! L2); add integer noise `K_i ~ D_{Z,s}` with `s = z (C + g sqrt(d)) / g`; release
//! `g (n_i + K_i)`. The mechanism's output is the integer `n_i + K_i`, computed exactly, so
//! the set of possible outputs does not depend on the input's floating-point bits (Mironov
//! 2012); its conversion to `f32` is post-processing (it may round, it never saturates),
//! and with sensitivity at most `C + g sqrt(d)` on the grid and noise `z (C + g sqrt(d))`
//! the mechanism is a discrete Gaussian mechanism with multiplier `z`: rho = 1/(2 z^2), the
//! privacy map opendp reports for `make_gaussian` (Canonne, Kamath, Steinke 2020).
//!
//! **Sampling.** `K = A + t B` with `A ~ D_{Z,sA}`, `B ~ D_{Z,sB}`, `t = 256`,
//! `sA = 1024`, `sB = sqrt(s^2 - sA^2) / t`. By Poisson summation the law of `K` is
//! `D_{Z,s}` times `Sum_b rho_{s'}(b - mu_k)` with `s' = sA sB / s`, whose relative
//! variation is at most `4 exp(-2 pi^2 s'^2)` (< 1e-60 here). `A` and `B` come from
//! alias tables built with exact integer arithmetic over weights `round(2^100 p_k)` for
//! `|k| <= 14 s` (probabilities in double-double arithmetic, weights summing to exactly
//! 2^100); the distance to the true discrete Gaussian is at most the rounding (`n 2^-100`),
//! the double-double error (~1e-27) and the cut tail (`< 1e-40`): below 1e-25 per
//! coordinate ([`GridGaussian::distance_per_coordinate`]). Over a whole run that adds at
//! most `(1 + e^eps) T d 1e-25` to delta (4e-13 for d = 2e5, T = 1e3, eps = 10); the ledger
//! does not add it.
//!
//! Randomness: ChaCha12 seeded from the operating system for every call (or from a seed in
//! tests and simulations).

use super::dd::Dd;
use super::noise::{check_input, GaussianNoise, NoiseError};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;

const T: i64 = 256;
const S_A: f64 = 1024.0;
const TAIL: f64 = 14.0;
/// Weights are probabilities times 2^100, so rounding costs at most n 2^-101 in total.
const WEIGHT_BITS: i32 = 100;

/// An exact alias table over integer weights.
#[derive(Debug, Clone)]
struct Alias {
    threshold: Vec<u128>,
    alias: Vec<u32>,
    total: u128,
    offset: i64,
}

impl Alias {
    /// Vose's method in integer arithmetic: the sampled law equals `weights / 2^100`
    /// exactly. The weights must sum to exactly 2^100.
    fn new(weights: &[u128], offset: i64) -> Self {
        let n = weights.len() as u128;
        let total: u128 = weights.iter().sum();
        debug_assert_eq!(total, 1u128 << WEIGHT_BITS);
        let mut scaled: Vec<u128> = weights.iter().map(|w| w * n).collect();
        let mut threshold = vec![0u128; weights.len()];
        let mut alias: Vec<u32> = (0..weights.len() as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..weights.len()).partition(|i| scaled[*i] < total);
        while let (Some(s), Some(l)) = (small.pop(), large.pop()) {
            threshold[s] = scaled[s];
            alias[s] = l as u32;
            scaled[l] -= total - scaled[s];
            if scaled[l] < total {
                small.push(l);
            } else {
                large.push(l);
            }
        }
        for i in small.into_iter().chain(large) {
            threshold[i] = total; // always itself
        }
        Self {
            threshold,
            alias,
            total,
            offset,
        }
    }

    /// Slot uniform, then `u < threshold` for `u` uniform on `[0, 2^100)`, comparing the
    /// top 64 bits first and drawing the low 36 only on a tie (probability 2^-64): exact,
    /// with one 64-bit draw in all but a vanishing fraction of samples.
    #[inline]
    fn sample(&self, rng: &mut impl RngCore) -> i64 {
        let i = rng.gen_range(0..self.threshold.len() as u32) as usize;
        let t = self.threshold[i];
        let low_bits = WEIGHT_BITS as u32 - 64;
        let t_hi = (t >> low_bits) as u64;
        let hi = rng.next_u64();
        let accept = if t == self.total {
            true
        } else if hi != t_hi {
            hi < t_hi
        } else {
            let lo = (rng.next_u64() >> (64 - low_bits)) as u128;
            (((hi as u128) << low_bits) | lo) < t
        };
        let j = if accept { i } else { self.alias[i] as usize };
        j as i64 + self.offset
    }
}

/// Integer weights of a discrete Gaussian `D_{Z,s}` on `|k| <= 14 s`, computed in
/// double-double arithmetic, and their offset.
fn discrete_gaussian_weights(s: f64) -> (Vec<u128>, i64) {
    let l = (TAIL * s).ceil() as i64;
    let two_s2 = Dd::from(s).mul(Dd::from(s)).mul_f64(2.0);
    let dens: Vec<Dd> = (-l..=l)
        .map(|k| Dd::from((k * k) as f64).div(two_s2).neg().exp())
        .collect();
    let z = dens.iter().fold(Dd::ZERO, |a, d| a.add(*d));
    let mut weights: Vec<u128> = dens
        .iter()
        .map(|d| d.div(z).ldexp(WEIGHT_BITS).to_u128())
        .collect();
    // Make the weights sum to exactly 2^100 by moving the rounding residual (at most n/2
    // units of 2^-100) onto the mode.
    let sum: u128 = weights.iter().sum();
    let target = 1u128 << WEIGHT_BITS;
    let mode = l as usize;
    if sum > target {
        weights[mode] -= sum - target;
    } else {
        weights[mode] += target - sum;
    }
    (weights, -l)
}

/// The grid Gaussian sampler. See the module docs.
#[derive(Debug, Clone)]
pub struct GridGaussian {
    seed: Option<u64>,
    calls: u64,
    /// `D_{Z,sA}`: the same for every scale, built once.
    table_a: Option<Alias>,
    /// `D_{Z,sB}` for the last scale `s` (by its bits).
    table_b: Option<(u64, Alias)>,
}

impl Default for GridGaussian {
    /// Seeded from the operating system on every call.
    fn default() -> Self {
        Self {
            seed: None,
            calls: 0,
            table_a: None,
            table_b: None,
        }
    }
}

impl GridGaussian {
    /// A reproducible stream (tests and simulations only).
    pub fn seeded(seed: u64) -> Self {
        Self {
            seed: Some(seed),
            ..Self::default()
        }
    }

    /// The grid spacing for noise s.d. `sigma`: the power of two at or below `sigma / 2^16`.
    pub fn grid(sigma: f64) -> f64 {
        2f64.powi((sigma / 65536.0).log2().floor() as i32)
    }

    /// Statistical distance bound per sampled coordinate, for a grid scale `s`.
    pub fn distance_per_coordinate(s: f64) -> f64 {
        let s_b = ((s * s - S_A * S_A).max(0.0)).sqrt() / T as f64;
        let s_prime = S_A * s_b / s;
        let conv = 4.0 * (-2.0 * std::f64::consts::PI.powi(2) * s_prime * s_prime).exp();
        let entries = 2.0 * TAIL * (S_A + s_b) + 2.0;
        // Per table: rounding plus the residual moved onto the mode (n 2^-100 in all) and
        // double-double probabilities (~1e-27 relative).
        let table = 2.0 * (entries * 2f64.powi(-WEIGHT_BITS) + 1e-27);
        let tail = 2.0 * (-TAIL * TAIL / 2.0).exp();
        conv + table + tail
    }

    /// Largest per-coordinate distance this sampler can have (any scale it builds).
    pub const MAX_DISTANCE_PER_COORDINATE: f64 = 1e-25;

    /// The alias tables for scale `s`, building what is missing.
    fn tables(&mut self, s: f64) -> (&Alias, &Alias) {
        if self.table_a.is_none() {
            let (w, o) = discrete_gaussian_weights(S_A);
            self.table_a = Some(Alias::new(&w, o));
        }
        if self.table_b.as_ref().map(|(k, _)| *k) != Some(s.to_bits()) {
            let (w, o) = discrete_gaussian_weights((s * s - S_A * S_A).sqrt() / T as f64);
            self.table_b = Some((s.to_bits(), Alias::new(&w, o)));
        }
        match (&self.table_a, &self.table_b) {
            (Some(a), Some((_, b))) => (a, b),
            _ => unreachable!("both tables were just built"),
        }
    }

    fn rng(&mut self) -> ChaCha12Rng {
        self.calls += 1;
        match self.seed {
            Some(s) => {
                ChaCha12Rng::seed_from_u64(s ^ self.calls.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => ChaCha12Rng::from_entropy(),
        }
    }

    /// Adds the mechanism's noise for sensitivity `sensitivity` and multiplier `z`;
    /// returns the grid spacing used.
    pub fn privatize(
        &mut self,
        values: &mut [f32],
        z: f64,
        sensitivity: f64,
    ) -> Result<f64, NoiseError> {
        let base = z * sensitivity;
        check_input(values, base)?;
        let g = Self::grid(base);
        let sigma = z * (sensitivity + g * (values.len() as f64).sqrt());
        self.add_on_grid(values, g, sigma / g)?;
        Ok(g)
    }

    /// Snaps every value to the grid `g` and adds `g * K`, `K ~ D_{Z,s}`.
    ///
    /// The mechanism's output is the integer `n + K` (times the public `g`): it is computed
    /// exactly in `i64` and converted to `f32` afterwards. That conversion is
    /// post-processing of a DP output, so it may round (values beyond 2^24 grid steps are
    /// not all representable in `f32`) without touching the guarantee; what it must not
    /// do is saturate, which would destroy large inputs such as a central sum. The range
    /// follows the input: only a coordinate beyond 2^62 grid steps (far outside anything a
    /// model delta or a sum of them can be) is refused, loudly, before any noise is drawn.
    fn add_on_grid(&mut self, values: &mut [f32], g: f64, s: f64) -> Result<(), NoiseError> {
        const LIMIT: f64 = (1u64 << 62) as f64;
        if let Some(v) = values.iter().find(|v| (**v as f64 / g).abs() >= LIMIT) {
            return Err(NoiseError::Range {
                value: *v as f64,
                grid: g,
            });
        }
        let mut rng = self.rng();
        let (a, b) = self.tables(s);
        for v in values.iter_mut() {
            // x / g is exact (g is a power of two); the rounding is deterministic.
            let n = (*v as f64 / g).round_ties_even() as i64;
            let k = a.sample(&mut rng) + T * b.sample(&mut rng);
            *v = (n.saturating_add(k) as f64 * g) as f32;
        }
        Ok(())
    }
}

impl GaussianNoise for GridGaussian {
    /// As a plain noise source (sensitivity unknown): noise of s.d. `sigma` on the grid
    /// of `sigma`, without the sensitivity inflation. Mechanisms call
    /// [`GaussianNoise::add_calibrated`] instead.
    fn add_noise(&mut self, values: &mut [f32], sigma: f64) -> Result<(), NoiseError> {
        check_input(values, sigma)?;
        let g = Self::grid(sigma);
        self.add_on_grid(values, g, sigma / g)
    }

    fn add_calibrated(
        &mut self,
        values: &mut [f32],
        z: f64,
        sensitivity: f64,
    ) -> Result<(), NoiseError> {
        self.privatize(values, z, sensitivity).map(|_| ())
    }

    fn name(&self) -> &'static str {
        "grid-discrete-gaussian"
    }
}

/// Largest scale [`DiscreteGaussianInt`] builds tables for (its second table then has
/// about 1.8 million entries).
pub const MAX_INTEGER_SCALE: f64 = (1u64 << 24) as f64;

/// Integer discrete Gaussian `D_{Z,s}` noise, for distributed-DP shares (the same exact
/// alias tables as [`GridGaussian`]): one table for `s <= 4 sA`, else `A + 256 B` as in
/// the module docs. Statistical distance to `D_{Z,s}` per draw:
/// [`DiscreteGaussianInt::distance_bound`] (below 1e-25). The randomness is the caller's.
#[derive(Debug, Clone)]
pub struct DiscreteGaussianInt {
    s: f64,
    a: Alias,
    b: Option<Alias>,
}

impl DiscreteGaussianInt {
    /// Tables for scale `s` (`0 < s <= MAX_INTEGER_SCALE`).
    pub fn new(s: f64) -> Result<Self, NoiseError> {
        if !(s.is_finite() && s > 0.0 && s <= MAX_INTEGER_SCALE) {
            return Err(NoiseError::Scale(s));
        }
        if s <= 4.0 * S_A {
            let (w, o) = discrete_gaussian_weights(s);
            return Ok(Self {
                s,
                a: Alias::new(&w, o),
                b: None,
            });
        }
        let (wa, oa) = discrete_gaussian_weights(S_A);
        let (wb, ob) = discrete_gaussian_weights((s * s - S_A * S_A).sqrt() / T as f64);
        Ok(Self {
            s,
            a: Alias::new(&wa, oa),
            b: Some(Alias::new(&wb, ob)),
        })
    }

    /// The scale `s` (the standard deviation is within 1e-60 relative of it for
    /// `s >= 1`, Canonne, Kamath, Steinke 2020).
    pub fn scale(&self) -> f64 {
        self.s
    }

    /// Statistical distance bound per draw.
    pub fn distance_bound(&self) -> f64 {
        match self.b {
            Some(_) => GridGaussian::distance_per_coordinate(self.s),
            None => {
                let entries = 2.0 * TAIL * self.s + 3.0;
                entries * 2f64.powi(-WEIGHT_BITS) + 1e-27 + 2.0 * (-TAIL * TAIL / 2.0).exp()
            }
        }
    }

    /// One draw.
    #[inline]
    pub fn sample(&self, rng: &mut impl RngCore) -> i64 {
        match &self.b {
            None => self.a.sample(rng),
            Some(b) => self.a.sample(rng) + T * b.sample(rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_table_is_exact_on_small_weights() {
        // Weights summing to 2^100 (as the tables do).
        let unit = 1u128 << (WEIGHT_BITS - 5); // 2^100 / 32
        let w = [unit, 2 * unit, 3 * unit, 10 * unit, 0, 16 * unit];
        let a = Alias::new(&w, -2);
        // Enumerate all (slot, u) pairs exactly: each value's mass must equal its weight.
        let total: u128 = w.iter().sum();
        let n = w.len() as u128;
        let mut mass = vec![0u128; w.len()];
        for i in 0..w.len() {
            mass[i] += a.threshold[i];
            mass[a.alias[i] as usize] += total - a.threshold[i];
        }
        for (m, wi) in mass.iter().zip(&w) {
            assert_eq!(*m, wi * n, "mass per value is weight x n");
        }
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        for _ in 0..1000 {
            let v = a.sample(&mut rng);
            assert!((-2..4).contains(&v) && v != 2, "{v}");
        }
    }

    #[test]
    fn outputs_are_on_the_grid_and_scale_is_calibrated() {
        let mut g = GridGaussian::seeded(5);
        let n = 100_000;
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 1e-7).sin() * 0.3).collect();
        let orig = v.clone();
        let (z, c) = (1.3, 0.5);
        let grid = g.privatize(&mut v, z, c).unwrap();
        assert!(grid > 0.0 && grid.log2().fract() == 0.0, "power of two");
        for x in &v {
            let q = *x as f64 / grid;
            assert_eq!(q, q.round(), "{x} is not on the grid {grid}");
        }
        let diff: Vec<f64> = v.iter().zip(&orig).map(|(a, b)| (*a - *b) as f64).collect();
        let mean = diff.iter().sum::<f64>() / n as f64;
        let sd = (diff.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        let expect = z * (c + grid * (n as f64).sqrt());
        assert!((sd / expect - 1.0).abs() < 0.02, "{sd} vs {expect}");
        assert!(mean.abs() < 6.0 * expect / (n as f64).sqrt());
        assert!(expect / (z * c) < 1.01, "grid inflation stays below 1 %");
    }

    #[test]
    fn large_inputs_are_noised_not_saturated() {
        // Audit: outputs saturated at 2^24 grid steps (about 256 zC), destroying a central
        // sum with large coordinates. The noise must be the same at any magnitude.
        let mut g = GridGaussian::seeded(3);
        let n = 20_000;
        let (z, c) = (1.0, 1.0);
        let big: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 5e4 } else { -3e5 })
            .collect();
        let mut v = big.clone();
        let grid = g.privatize(&mut v, z, c).unwrap();
        let diff: Vec<f64> = v.iter().zip(&big).map(|(a, b)| (*a - *b) as f64).collect();
        let mean = diff.iter().sum::<f64>() / n as f64;
        let sd = (diff.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        let expect = z * (c + grid * (n as f64).sqrt());
        // f32 rounding at 3e5 is 1/64: far below the noise.
        assert!((sd / expect - 1.0).abs() < 0.03, "{sd} vs {expect}");
        assert!(mean.abs() < 0.1, "{mean}");
        // Absurd magnitudes are refused loudly rather than clamped.
        let mut absurd = vec![3e38f32; 4];
        assert!(matches!(
            g.privatize(&mut absurd, 1.0, 1e-6),
            Err(NoiseError::Range { .. })
        ));
    }

    #[test]
    fn matches_opendp_in_distribution() {
        crate::dp::noise::assert_matches_opendp(&mut GridGaussian::seeded(11));
    }

    #[test]
    fn distance_bound_is_tiny_for_every_scale_used() {
        for s in [65_536.0f64, 100_000.0, 131_071.0, 140_000.0] {
            let d = GridGaussian::distance_per_coordinate(s);
            assert!(d < GridGaussian::MAX_DISTANCE_PER_COORDINATE, "{s}: {d}");
        }
    }
}
