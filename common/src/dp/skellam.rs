//! Exact integer Poisson and Skellam samplers for distributed DP noise shares.
//!
//! **Why not `rand_distr::Poisson`.** It computes in floating point (PTRS rejection), so
//! its law is only close to Poisson, and by how much nobody states; a DP guarantee made
//! of integers should not rest on that.
//!
//! **Method.** Rejection sampling whose every decision is an *exact* comparison of a
//! uniform real `U` in `[0, 1)` (drawn lazily, 64 bits at a time) with a *rational*
//! number. For `Poisson(lambda)` with mode `m = floor(lambda)`:
//! - the target ratio `P(k) = p(k) / p(m)` is rational: `lambda^j m! / (m + j)!` for
//!   `k = m + j >= m` and `m! / (k! lambda^{m-k})` below (no `exp(-lambda)`, which would
//!   not be rational);
//! - the proposal is a two-sided geometric around the mode, `g(k) ∝ r^{|k - m|}` with the
//!   rational `r = (c - 1) / c`, `c = ceil(sqrt(lambda)) + 1`; it is drawn exactly from
//!   `P(G >= g) = r^g` (compare `U` with `r^g` and `r^{g+1}`) and a fair sign bit (a
//!   negative zero is redrawn);
//! - `k` is accepted when `U' < A(k) = P(k) r^{-|k-m|} / B`, where the dyadic `B` bounds
//!   `sup_k P(k) r^{-|k-m|}` from above (computed once per `lambda`, with a `1e-6`
//!   relative margin over a float maximum whose error is below `1e-7`). Accepted `k` has
//!   law proportional to `g(k) A(k) ∝ p(k)`: exactly Poisson.
//!
//! Every comparison first uses `f64` approximations with a guard band (`1e-11` relative
//! for the acceptance test, whose table is accurate to `5e-13`; an error bound computed
//! per draw for the geometric): outside the band the answer is certain; inside (about one
//! draw in 10^7) the rational is formed in big integers (`dashu`) and compared with as
//! many bits of `U` as needed. The answer is thus
//! exactly the one infinite precision would give, and the output law is exactly Poisson
//! whatever the floating-point rounding; floats only decide how fast. With `c ≈
//! sqrt(lambda)` the acceptance rate is about `sqrt(2 pi) / (2 sqrt(e)) ≈ 0.76`, for any
//! mean (Devroye 1986, ch. X, on rejection from a Laplace envelope; the exact
//! lazy-comparison technique is that of Canonne, Kamath and Steinke's exact discrete
//! Gaussian, with rational instead of `exp` targets). Duchon and Duvignau's exact sampler
//! (2016) was rejected: its time grows linearly in `lambda`, and shares at 16 bits have
//! `lambda` near 10^6.
//!
//! [`Skellam`] with variance `mu` is `Poisson(mu/2) - Poisson(mu/2)`, and a sum of
//! independent Skellams is a Skellam with the summed variance (what makes it a
//! distributed mechanism). Randomness: whatever [`RngCore`] the caller passes (the OS
//! CSPRNG in deployments, a seeded ChaCha in tests and the simulator).

use dashu_int::UBig;
use rand::RngCore;

/// Relative guard band of the acceptance test's fast path (the table is accurate to
/// about 5e-13 relative, see [`Poisson::new`]).
const BAND: f64 = 1e-11;
/// Relative guard band of the careful geometric path (`exp(g ln r)` is accurate to about
/// `(1 + |g ln r|) 4e-16`, and `|g ln r| <= 50` there).
const BAND_GEOMETRIC: f64 = 1e-12;
/// The table of acceptance probabilities covers `|k - m| <= TABLE_SDS sqrt(lambda) + 64`;
/// beyond it (one proposal in about e^12) an upper bound below e^-50 stands in, so the
/// first 64 bits of the uniform reject.
const TABLE_SDS: f64 = 12.0;
/// Largest mean accepted, so that a sampler's table stays below 25 MB (a share at 20 bits
/// with 100 contributors has mean about 2^27; at 20 bits and 4 contributors about 2^32).
pub const MAX_MEAN: f64 = (1u64 << 34) as f64;

/// Why a sampler cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// The mean or variance is not finite and in range.
    #[error("{what} must be finite, >= 0 and <= {max:e}, got {got}")]
    Parameter {
        /// Which parameter.
        what: &'static str,
        /// Largest allowed.
        max: f64,
        /// Value given.
        got: f64,
    },
}

/// `lambda` as the exact rational `num / den` (an `f64` is a dyadic rational).
fn f64_as_ratio(x: f64) -> (UBig, UBig) {
    debug_assert!(x.is_finite() && x >= 0.0);
    if x == 0.0 {
        return (UBig::ZERO, UBig::ONE);
    }
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let (mant, e) = if exp == 0 {
        (bits & ((1 << 52) - 1), -1074)
    } else {
        ((bits & ((1 << 52) - 1)) | (1 << 52), exp - 1075)
    };
    if e >= 0 {
        (UBig::from(mant) << e as usize, UBig::ONE)
    } else {
        (UBig::from(mant), UBig::ONE << (-e) as usize)
    }
}

/// A uniform real in `[0, 1)` whose binary expansion is drawn 64 bits at a time, on
/// demand.
struct LazyUniform {
    first: u64,
    /// Words after the first, drawn only by an exact comparison (no allocation otherwise).
    rest: Vec<u64>,
}

impl LazyUniform {
    fn new(rng: &mut impl RngCore) -> Self {
        Self {
            first: rng.next_u64(),
            rest: Vec::new(),
        }
    }

    fn first(&self) -> u64 {
        self.first
    }

    /// Word `w` of the expansion, drawing it if needed.
    fn word(&mut self, rng: &mut impl RngCore, w: usize) -> u64 {
        if w == 0 {
            return self.first;
        }
        while self.rest.len() < w {
            self.rest.push(rng.next_u64());
        }
        self.rest[w - 1]
    }

    /// `U < x` decided from the first word when `x_lo <= x <= x_hi` are far enough
    /// apart from it, else `exact()` (which must return `x` as `num / den`).
    fn less_than(
        &mut self,
        rng: &mut impl RngCore,
        x_approx: f64,
        band: f64,
        exact: impl FnOnce() -> (UBig, UBig),
    ) -> bool {
        const TWO64: f64 = 18_446_744_073_709_551_616.0;
        let lo = x_approx * (1.0 - band) * TWO64;
        let hi = x_approx * (1.0 + band) * TWO64;
        let u = self.first() as f64; // u <= U 2^64 < u + 1 (u as f64 may round up by < 2^11)
        if u + 4096.0 <= lo {
            return true;
        }
        if u - 4096.0 >= hi {
            return false;
        }
        let (num, den) = exact();
        self.less_than_exact(rng, &num, &den)
    }

    /// `U < num / den`, exactly.
    fn less_than_exact(&mut self, rng: &mut impl RngCore, num: &UBig, den: &UBig) -> bool {
        if num >= den {
            return true;
        }
        let mut u = UBig::ZERO;
        for w in 0.. {
            u = (u << 64) | UBig::from(self.word(rng, w));
            let t = (num << (64 * (w + 1))) / den;
            if u < t {
                return true;
            }
            if u > t {
                return false;
            }
        }
        unreachable!("the loop only ends by returning")
    }
}

/// Neumaier's compensated summation.
#[derive(Default)]
struct Neumaier {
    sum: f64,
    c: f64,
}

impl Neumaier {
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.c += (self.sum - t) + x;
        } else {
            self.c += (x - t) + self.sum;
        }
        self.sum = t;
    }

    fn value(&self) -> f64 {
        self.sum + self.c
    }
}

/// An exact sampler of `Poisson(lambda)` for one `lambda` (tables built once).
#[derive(Debug, Clone)]
pub struct Poisson {
    lambda: f64,
    mode: u64,
    c: u64,
    ln_r: f64,
    /// `A(m + j)` for `j` in `[-half, half]`, as floats.
    accept: Vec<f64>,
    half: i64,
    /// Upper bound of `A` beyond the table.
    tail: f64,
    /// The bound `B`, an exact dyadic.
    bound: f64,
}

impl Poisson {
    /// Builds the sampler. `lambda = 0` always yields 0.
    pub fn new(lambda: f64) -> Result<Self, SamplerError> {
        if !(lambda.is_finite() && (0.0..=MAX_MEAN).contains(&lambda)) {
            return Err(SamplerError::Parameter {
                what: "Poisson mean",
                max: MAX_MEAN,
                got: lambda,
            });
        }
        let mode = lambda.floor() as u64;
        let c = (lambda.sqrt().ceil() as u64 + 1).max(2);
        let ln_r = (-1.0 / c as f64).ln_1p();
        let half = (TABLE_SDS * lambda.sqrt()).ceil() as i64 + 64;
        // log P(m + j) by compensated running sums of ln(lambda / (m + i)) and
        // ln((m - i) / lambda): terms of one sign, each within 3e-16 relative, so the sums
        // are within about 3e-16 of their magnitude (<= 1e3 here): 3e-13 absolute. With
        // |j ln r| <= 50 and exp's rounding, every table entry is within 5e-13 relative.
        let mut log_p = vec![f64::NEG_INFINITY; 2 * half as usize + 1];
        log_p[half as usize] = 0.0;
        let (mut up, mut down) = (Neumaier::default(), Neumaier::default());
        for j in 1..=half {
            let k = mode as f64 + j as f64;
            up.add(((lambda - k) / k).ln_1p());
            log_p[(half + j) as usize] = up.value();
            if (j as u64) <= mode {
                let k = mode as f64 - (j - 1) as f64; // factor k / lambda
                down.add(((k - lambda) / lambda).ln_1p());
                log_p[(half - j) as usize] = down.value();
            }
        }
        let log_env = |j: i64| log_p[(half + j) as usize] - (j.unsigned_abs() as f64) * ln_r;
        let max = (-half..=half)
            .map(log_env)
            .fold(f64::NEG_INFINITY, f64::max);
        // B >= sup: margin 1e-6 relative on B over a float error below 1e-12.
        let bound = (max + 1e-6).exp() * (1.0 + 1e-9);
        let ln_b = bound.ln();
        let accept: Vec<f64> = (-half..=half).map(|j| (log_env(j) - ln_b).exp()).collect();
        // log A is concave on each side of its peak (which lies near sqrt(lambda) << half),
        // so beyond the table it is below its value at the table's ends.
        let tail = accept[0].max(accept[accept.len() - 1]) * (1.0 + BAND);
        Ok(Self {
            lambda,
            mode,
            c,
            ln_r,
            accept,
            half,
            tail,
            bound,
        })
    }

    /// The mean.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// `r^g` as an exact rational.
    fn r_pow(&self, g: u64) -> (UBig, UBig) {
        let g = g as usize;
        (UBig::from(self.c - 1).pow(g), UBig::from(self.c).pow(g))
    }

    /// `A(m + j)` as an exact rational.
    fn accept_exact(&self, j: i64) -> (UBig, UBig) {
        let (ln, ld) = f64_as_ratio(self.lambda);
        let (bn, bd) = f64_as_ratio(self.bound);
        let a = j.unsigned_abs() as usize;
        let m = self.mode;
        // r^{-a} = c^a / (c - 1)^a
        let mut num = UBig::from(self.c).pow(a) * bd;
        let mut den = UBig::from(self.c - 1).pow(a) * bn;
        if j >= 0 {
            // lambda^a / ((m + 1) ... (m + a))
            num *= ln.pow(a);
            den *= ld.pow(a);
            for i in 1..=a as u64 {
                den *= UBig::from(m + i);
            }
        } else {
            // m (m - 1) ... (m - a + 1) / lambda^a
            num *= ld.pow(a);
            den *= ln.pow(a);
            for i in 0..a as u64 {
                num *= UBig::from(m - i);
            }
        }
        (num, den)
    }

    /// Geometric `G` with `P(G >= g) = r^g`.
    fn geometric(&self, rng: &mut impl RngCore) -> u64 {
        let mut u = LazyUniform::new(rng);
        // G = floor(t), t = ln U / ln r (G >= g iff U < r^g iff t > g). With U in
        // [u, u + 1) / 2^64, L = ln((u + 1/2) / 2^64) is within 1/u + 2^-52 (1 + |L|) of
        // ln U, and t within that over |ln r| plus 1e-15 |t| (the rounding of ln r and of
        // the division). Away from an integer by more than twice that, floor(t) is G.
        let first = u.first();
        let l = ((first as f64 + 0.5) / 18_446_744_073_709_551_616.0).ln();
        let t = l / self.ln_r;
        if first >= 1 << 24 {
            let err = (1.0 / first as f64 + 2f64.powi(-52) * (1.0 + l.abs())) / self.ln_r.abs()
                + 1e-15 * t;
            let g = t.floor();
            let frac = t - g;
            if frac > 2.0 * err && frac < 1.0 - 2.0 * err {
                return g as u64;
            }
        }
        // Careful path: verify U < r^g and U >= r^{g+1}, exactly where needed.
        let mut g = t.max(0.0).floor() as u64;
        loop {
            // Need U < r^g and U >= r^{g+1}.
            if g > 0 {
                let x = (g as f64 * self.ln_r).exp();
                if !u.less_than(rng, x, BAND_GEOMETRIC, || self.r_pow(g)) {
                    g -= 1;
                    continue;
                }
            }
            let x = ((g + 1) as f64 * self.ln_r).exp();
            if u.less_than(rng, x, BAND_GEOMETRIC, || self.r_pow(g + 1)) {
                g += 1;
                continue;
            }
            return g;
        }
    }

    /// One exact draw.
    pub fn sample(&self, rng: &mut impl RngCore) -> u64 {
        if self.lambda == 0.0 {
            return 0;
        }
        loop {
            let g = self.geometric(rng);
            let negative = rng.next_u32() & 1 == 1;
            if g == 0 && negative {
                continue;
            }
            let j = if negative { -(g as i64) } else { g as i64 };
            if j < 0 && g > self.mode {
                continue; // k < 0 has probability 0
            }
            let approx = if j.abs() <= self.half {
                self.accept[(self.half + j) as usize]
            } else {
                self.tail
            };
            let mut u = LazyUniform::new(rng);
            if u.less_than(rng, approx, BAND, || self.accept_exact(j)) {
                return (self.mode as i64 + j) as u64;
            }
        }
    }
}

/// Symmetric Skellam noise of variance `mu`: `Poisson(mu/2) - Poisson(mu/2)`, exactly.
#[derive(Debug, Clone)]
pub struct Skellam {
    half: Poisson,
}

impl Skellam {
    /// Builds the sampler for variance `mu`.
    pub fn new(mu: f64) -> Result<Self, SamplerError> {
        if !(mu.is_finite() && (0.0..=2.0 * MAX_MEAN).contains(&mu)) {
            return Err(SamplerError::Parameter {
                what: "Skellam variance",
                max: 2.0 * MAX_MEAN,
                got: mu,
            });
        }
        Ok(Self {
            half: Poisson::new(mu / 2.0)?,
        })
    }

    /// The variance (twice the Poisson mean, as built: `mu / 2` is exact in `f64`).
    pub fn variance(&self) -> f64 {
        2.0 * self.half.lambda()
    }

    /// One draw.
    pub fn sample(&self, rng: &mut impl RngCore) -> i64 {
        self.half.sample(rng) as i64 - self.half.sample(rng) as i64
    }

    /// Adds one draw to every value (wrapping: the caller reduces mod 2^bits).
    pub fn add_to(&self, values: &mut [i64], rng: &mut impl RngCore) {
        for v in values {
            *v = v.wrapping_add(self.sample(rng));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// Poisson pmf in log space from lgamma (an independent computation).
    fn poisson_pmf(lambda: f64, k: u64) -> f64 {
        if lambda == 0.0 {
            return if k == 0 { 1.0 } else { 0.0 };
        }
        (k as f64 * lambda.ln() - lambda - libm::lgamma(k as f64 + 1.0)).exp()
    }

    /// Chi-square statistic and degrees of freedom over bins with expected count >= 5
    /// (the rest pooled into the two tails).
    fn chi_square(
        counts: &std::collections::BTreeMap<i64, u64>,
        pmf: impl Fn(i64) -> f64,
        n: u64,
        lo: i64,
        hi: i64,
    ) -> (f64, usize) {
        let mut stat = 0.0;
        let mut bins = 0;
        let (mut tail_obs, mut tail_exp) = (0u64, 1.0f64);
        for k in lo..=hi {
            let e = pmf(k) * n as f64;
            let o = counts.get(&k).copied().unwrap_or(0);
            if e >= 5.0 {
                stat += (o as f64 - e).powi(2) / e;
                bins += 1;
                tail_exp -= pmf(k);
            } else {
                tail_obs += o;
            }
        }
        let outside: u64 = counts
            .iter()
            .filter(|(k, _)| **k < lo || **k > hi)
            .map(|(_, c)| *c)
            .sum();
        tail_obs += outside;
        let e = tail_exp.max(0.0) * n as f64;
        if e >= 5.0 {
            stat += (tail_obs as f64 - e).powi(2) / e;
            bins += 1;
        }
        (stat, bins.max(2) - 1)
    }

    /// Upper 0.1 % quantile of chi-square with `df` degrees of freedom (Wilson-Hilferty).
    fn chi2_crit(df: usize) -> f64 {
        let k = df as f64;
        let z = 3.090_232; // 0.999 normal quantile
        k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
    }

    #[test]
    fn ratio_of_f64_is_exact() {
        let (n, d) = f64_as_ratio(0.375);
        assert_eq!(n * UBig::from(8u8), d * UBig::from(3u8));
        let (n, d) = f64_as_ratio(6.0e5);
        assert_eq!(n / d, UBig::from(600_000u32));
    }

    #[test]
    fn exact_comparison_matches_rationals() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        // P(U < 1/3) by exact comparison, 30,000 draws: 3 sd = 0.0082.
        let mut hits = 0;
        for _ in 0..30_000 {
            let mut u = LazyUniform::new(&mut rng);
            if u.less_than_exact(&mut rng, &UBig::from(1u8), &UBig::from(3u8)) {
                hits += 1;
            }
        }
        let p = hits as f64 / 30_000.0;
        assert!((p - 1.0 / 3.0).abs() < 0.0082, "{p}");
        // A uniform whose first word equals the threshold's is decided by later words.
        let mut u = LazyUniform {
            first: 0x5555_5555_5555_5555,
            rest: Vec::new(),
        };
        let third = u.less_than_exact(&mut rng, &UBig::from(1u8), &UBig::from(3u8));
        assert!(!u.rest.is_empty());
        if u.rest[0] != 0x5555_5555_5555_5555 {
            assert_eq!(third, u.rest[0] < 0x5555_5555_5555_5555);
        }
    }

    #[test]
    fn acceptance_never_exceeds_one_exactly() {
        // The bound B must dominate P(k) r^{-|j|} at every k: check the exact rationals
        // around the peak for several means.
        for lambda in [0.3, 1.0, 7.5, 100.0, 12_345.5, 6.0e5] {
            let p = Poisson::new(lambda).unwrap();
            let peak = (lambda.sqrt() as i64).max(1);
            for j in (-3 * peak..=3 * peak).step_by(((peak / 20).max(1)) as usize) {
                if j < 0 && j.unsigned_abs() > p.mode {
                    continue;
                }
                let (n, d) = p.accept_exact(j);
                assert!(n <= d, "lambda {lambda} j {j}");
                // and the float table agrees to well within the band
                let approx = p.accept[(p.half + j) as usize];
                let ratio = ratio_f64(&n, &d);
                assert!(
                    (approx - ratio).abs() <= 1e-12 * ratio.max(1e-300),
                    "lambda {lambda} j {j}: {approx} vs {ratio}"
                );
            }
        }
    }

    fn ratio_f64(n: &UBig, d: &UBig) -> f64 {
        // n / d for n <= d, to ~1e-15 while n / d >= 2^-60.
        let q: UBig = (n << 120usize) / d;
        let q = u128::try_from(q).expect("at most 2^120");
        q as f64 * 2f64.powi(-120)
    }

    #[test]
    fn geometric_proposal_has_its_law() {
        // P(G = g) = (1 - r) r^g, r = (c - 1) / c: chi-square for c = 2 (lambda < 1) and
        // c = 101 (lambda = 10^4), including the careful path near integer boundaries.
        let mut rng = ChaCha20Rng::seed_from_u64(21);
        for lambda in [0.5, 1.0e4] {
            let p = Poisson::new(lambda).unwrap();
            let r = (p.c - 1) as f64 / p.c as f64;
            let n = 50_000u64;
            let mut counts = std::collections::BTreeMap::new();
            for _ in 0..n {
                *counts.entry(p.geometric(&mut rng) as i64).or_insert(0u64) += 1;
            }
            let hi = (30.0 * p.c as f64) as i64;
            let (stat, df) = chi_square(&counts, |g| (1.0 - r) * r.powi(g as i32), n, 0, hi);
            assert!(stat < chi2_crit(df), "c {}: chi2 {stat} with {df} df", p.c);
        }
        // A uniform exactly at a boundary r^g (U = 1/2 for c = 2): G = 0 (U < r^0 = 1,
        // U >= r^1), decided by the careful path.
        let p = Poisson::new(0.5).unwrap();
        let mut fixed = rand::rngs::mock::StepRng::new(1 << 63, 0);
        assert_eq!(p.geometric(&mut fixed), 0);
    }

    #[test]
    fn poisson_moments_and_pmf_at_several_scales() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        for (lambda, n) in [
            (0.5, 40_000u64),
            (3.0, 40_000),
            (40.0, 40_000),
            (2_500.0, 60_000),
            (6.0e5, 60_000),
        ] {
            let p = Poisson::new(lambda).unwrap();
            let mut counts = std::collections::BTreeMap::new();
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for _ in 0..n {
                let k = p.sample(&mut rng);
                *counts.entry(k as i64).or_insert(0u64) += 1;
                let x = k as f64 - lambda;
                s1 += x;
                s2 += x * x;
            }
            let mean = s1 / n as f64;
            let var = s2 / n as f64 - mean * mean;
            // mean: 5 standard errors; variance: 5 standard errors of the sample variance
            // (sqrt((mu4 - sigma^4) / n) with mu4 = 3 lambda^2 + lambda).
            assert!(
                mean.abs() < 5.0 * (lambda / n as f64).sqrt(),
                "lambda {lambda}: mean off by {mean}"
            );
            let se_var = ((2.0 * lambda * lambda + lambda) / n as f64).sqrt();
            assert!(
                (var - lambda).abs() < 5.0 * se_var,
                "lambda {lambda}: var {var}"
            );
            let sd = lambda.sqrt();
            let lo = (lambda - 6.0 * sd - 5.0).floor().max(0.0) as i64;
            let hi = (lambda + 6.0 * sd + 5.0).ceil() as i64;
            let (stat, df) = chi_square(&counts, |k| poisson_pmf(lambda, k as u64), n, lo, hi);
            assert!(
                stat < chi2_crit(df),
                "lambda {lambda}: chi2 {stat} with {df} df"
            );
        }
    }

    /// Skellam pmf of variance mu by convolving two Poisson pmfs.
    fn skellam_pmf(mu: f64, k: i64) -> f64 {
        let l = mu / 2.0;
        let top = (l + 40.0 * l.sqrt() + 40.0) as u64;
        (0..=top)
            .filter(|a| *a as i64 - k >= 0)
            .map(|a| poisson_pmf(l, a) * poisson_pmf(l, (a as i64 - k) as u64))
            .sum()
    }

    #[test]
    fn skellam_moments_and_pmf() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        for (mu, n) in [(1.0, 40_000u64), (30.0, 40_000), (1_000.0, 40_000)] {
            let s = Skellam::new(mu).unwrap();
            let mut counts = std::collections::BTreeMap::new();
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for _ in 0..n {
                let k = s.sample(&mut rng);
                *counts.entry(k).or_insert(0u64) += 1;
                s1 += k as f64;
                s2 += (k as f64).powi(2);
            }
            let mean = s1 / n as f64;
            let var = s2 / n as f64 - mean * mean;
            assert!(
                mean.abs() < 5.0 * (mu / n as f64).sqrt(),
                "mu {mu}: mean {mean}"
            );
            // Skellam fourth central moment: 3 mu^2 + mu.
            let se_var = ((2.0 * mu * mu + mu) / n as f64).sqrt();
            assert!((var - mu).abs() < 5.0 * se_var, "mu {mu}: var {var}");
            let r = (7.0 * mu.sqrt() + 5.0) as i64;
            let (stat, df) = chi_square(&counts, |k| skellam_pmf(mu, k), n, -r, r);
            assert!(stat < chi2_crit(df), "mu {mu}: chi2 {stat} with {df} df");
        }
    }

    #[test]
    fn sum_of_shares_is_one_skellam_of_the_summed_variance() {
        // n = 20 shares of variance 50 each: the sum has variance 1,000, and its pmf is
        // that of Skellam(1,000) (closure under addition).
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let share = Skellam::new(50.0).unwrap();
        let n = 30_000u64;
        let mut counts = std::collections::BTreeMap::new();
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for _ in 0..n {
            let k: i64 = (0..20).map(|_| share.sample(&mut rng)).sum();
            *counts.entry(k).or_insert(0u64) += 1;
            s1 += k as f64;
            s2 += (k as f64).powi(2);
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        let se_var = ((2.0 * 1e6 + 1e3) / n as f64).sqrt();
        assert!((var - 1_000.0).abs() < 5.0 * se_var, "var {var}");
        let (stat, df) = chi_square(&counts, |k| skellam_pmf(1_000.0, k), n, -230, 230);
        assert!(stat < chi2_crit(df), "chi2 {stat} with {df} df");
    }

    #[test]
    fn refuses_bad_parameters() {
        assert!(Poisson::new(f64::NAN).is_err());
        assert!(Poisson::new(-1.0).is_err());
        assert!(Skellam::new(f64::INFINITY).is_err());
        let zero = Skellam::new(0.0).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(zero.sample(&mut rng), 0);
    }
}
