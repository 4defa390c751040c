//! The distributed-DP encoding of an update into `Z/2^bits`, and the decoding of a sum.
//!
//! Node side ([`DistributedEncoder::encode`]): flatten (the caller's `&[f32]`); pad to a
//! power of two `d` and rotate with the randomized Walsh-Hadamard transform `H D / sqrt(d)`
//! (Rademacher signs `D` from the round's public seed, so every node and the server use
//! the same rotation and no coordinate dominates); clip to `C`; scale by `s`; round
//! stochastically to integers, conditionally: redraw (at most [`ROUNDING_TRIES`] times)
//! while the rounded vector's L2 norm exceeds the bound `R` the accounting assumes; add
//! the node's integer noise share (Skellam or discrete Gaussian, see
//! [`super::distributed`]); reduce mod `2^bits`.
//!
//! If every redraw fails (probability at most `beta^ROUNDING_TRIES` for an update at the
//! bound), the node does not inflate the bound: it shrinks the scaled vector to norm
//! `R - sqrt(d)/2` and rounds to nearest, which lands inside `R` deterministically
//! (`|round(y) - y|_2 <= sqrt(d)/2`), so the sensitivity the ledger accounts is never
//! exceeded (a small, rare bias instead of Kairouz et al.'s inflated-bound fallback).
//!
//! Server side ([`DistributedEncoder::decode_sum`]): the modular sum (what secure
//! aggregation's unmasking yields, or the plain modular sum in the simulator: the two are
//! identical by construction) is mapped back to signed integers, divided by `s`,
//! rotated back and truncated, and divided by the number of contributors.
//!
//! Nothing here touches the network; the randomness is passed in (the OS CSPRNG in
//! deployments, seeded in tests and the simulator).

use super::distributed::{DistributedParams, Mechanism, ParamsError};
use super::grid::DiscreteGaussianInt;
use super::noise::NoiseError;
use super::skellam::{SamplerError, Skellam};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Redraws of the conditional stochastic rounding before the deterministic fallback.
pub const ROUNDING_TRIES: u32 = 10;

/// Why an update cannot be encoded or a sum decoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The parameters are unusable.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The Skellam sampler refused its variance.
    #[error(transparent)]
    Skellam(#[from] SamplerError),
    /// The discrete Gaussian sampler refused its scale.
    #[error(transparent)]
    Gaussian(#[from] NoiseError),
    /// The vector has the wrong length.
    #[error("expected {expected} values, got {got}")]
    Length {
        /// Expected length.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A value of a modular sum is outside `[0, 2^bits)`.
    #[error("value {value} at {index} is outside Z/2^{bits}")]
    OutOfRing {
        /// Position.
        index: usize,
        /// Value.
        value: u64,
        /// Bits of the ring.
        bits: u32,
    },
    /// A decode was asked for zero contributors.
    #[error("a sum of zero contributors cannot be decoded")]
    NoContributors,
}

/// The randomized Walsh-Hadamard rotation for one dimension and public seed.
#[derive(Debug, Clone)]
pub struct Rotation {
    dim: usize,
    signs: Vec<f64>,
}

/// In-place unnormalized fast Walsh-Hadamard transform (length a power of two).
fn fwht(v: &mut [f64]) {
    let n = v.len();
    let mut h = 1;
    while h < n {
        for block in v.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let (s, t) = (*x + *y, *x - *y);
                *x = s;
                *y = t;
            }
        }
        h *= 2;
    }
}

impl Rotation {
    /// The rotation of `dim`-vectors (padded to the next power of two) for `seed`.
    pub fn new(dim: usize, seed: u64) -> Self {
        let d = dim.next_power_of_two();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut signs = Vec::with_capacity(d);
        while signs.len() < d {
            let w = rng.next_u64();
            for b in 0..64.min(d - signs.len()) {
                signs.push(if (w >> b) & 1 == 1 { 1.0 } else { -1.0 });
            }
        }
        Self { dim, signs }
    }

    /// The padded dimension.
    pub fn padded_dim(&self) -> usize {
        self.signs.len()
    }

    /// `H D x / sqrt(d)` of the zero-padded `x` (`x.len()` must be `dim`).
    pub fn rotate(&self, x: &[f32]) -> Vec<f64> {
        debug_assert_eq!(x.len(), self.dim);
        let mut v = vec![0f64; self.signs.len()];
        for ((o, xi), s) in v.iter_mut().zip(x).zip(&self.signs) {
            *o = *xi as f64 * s;
        }
        fwht(&mut v);
        let norm = 1.0 / (self.signs.len() as f64).sqrt();
        v.iter_mut().for_each(|x| *x *= norm);
        v
    }

    /// The inverse, `D H y / sqrt(d)`, truncated to `dim` (`y.len()` the padded one).
    pub fn inverse(&self, mut y: Vec<f64>) -> Vec<f64> {
        debug_assert_eq!(y.len(), self.signs.len());
        fwht(&mut y);
        let norm = 1.0 / (self.signs.len() as f64).sqrt();
        y.truncate(self.dim);
        for (v, s) in y.iter_mut().zip(&self.signs) {
            *v *= norm * s;
        }
        y
    }
}

/// A node's integer noise share sampler.
#[derive(Debug, Clone)]
enum Share {
    Skellam(Skellam),
    Ddgauss(DiscreteGaussianInt),
}

impl Share {
    #[inline]
    fn sample(&self, rng: &mut impl RngCore) -> i64 {
        match self {
            Share::Skellam(s) => s.sample(rng),
            Share::Ddgauss(g) => g.sample(rng),
        }
    }
}

/// What the conditional rounding did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundingReport {
    /// Whether clipping changed the update.
    pub clipped: bool,
    /// Redraws needed (0 if the first rounding was inside the bound).
    pub retries: u32,
    /// Whether the deterministic fallback was used.
    pub fell_back: bool,
}

/// Encoder and decoder for one round's public parameters and rotation seed.
#[derive(Debug, Clone)]
pub struct DistributedEncoder {
    params: DistributedParams,
    scale: f64,
    bound_sq: i128,
    bound: f64,
    rotation: Rotation,
    share: Share,
}

impl DistributedEncoder {
    /// Builds the encoder (the noise tables included: build once per round).
    pub fn new(params: DistributedParams, rotation_seed: u64) -> Result<Self, EncodeError> {
        params.validate()?;
        let scale = params.scale()?;
        let bound = params.rounded_l2()?;
        let variance = params.share_variance()?;
        let share = match params.mechanism {
            Mechanism::Skellam => Share::Skellam(Skellam::new(variance)?),
            Mechanism::Ddgauss => Share::Ddgauss(DiscreteGaussianInt::new(variance.sqrt())?),
        };
        Ok(Self {
            params,
            scale,
            bound_sq: (bound * bound).floor() as i128,
            bound,
            rotation: Rotation::new(params.dim, rotation_seed),
            share,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &DistributedParams {
        &self.params
    }

    /// The scale `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The rotation.
    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    fn mask(&self) -> u64 {
        (1u64 << self.params.bits) - 1
    }

    /// Rotate, clip and conditionally round: the integer vector before noise, with
    /// `|v|_2 <= R` guaranteed.
    pub fn quantize(
        &self,
        update: &[f32],
        rng: &mut impl RngCore,
    ) -> Result<(Vec<i64>, RoundingReport), EncodeError> {
        self.quantize_with_tries(update, rng, ROUNDING_TRIES)
    }

    fn quantize_with_tries(
        &self,
        update: &[f32],
        rng: &mut impl RngCore,
        tries: u32,
    ) -> Result<(Vec<i64>, RoundingReport), EncodeError> {
        if update.len() != self.params.dim {
            return Err(EncodeError::Length {
                expected: self.params.dim,
                got: update.len(),
            });
        }
        let mut report = RoundingReport::default();
        let mut y = self.rotation.rotate(update);
        let norm = y.iter().map(|v| v * v).sum::<f64>().sqrt();
        let c = self.params.clip_norm;
        let factor = if !norm.is_finite() {
            report.clipped = true;
            0.0
        } else if norm > c {
            report.clipped = true;
            self.scale * c / norm * (1.0 - 1e-9)
        } else {
            self.scale
        };
        y.iter_mut().for_each(|v| *v *= factor);
        let mut out = vec![0i64; y.len()];
        for attempt in 0..tries {
            let mut sq: i128 = 0;
            for (o, v) in out.iter_mut().zip(&y) {
                let f = v.floor();
                let up = rng.gen::<f64>() < v - f;
                let r = f as i64 + up as i64;
                *o = r;
                sq += (r as i128) * (r as i128);
            }
            if sq <= self.bound_sq {
                report.retries = attempt;
                return Ok((out, report));
            }
        }
        report.retries = tries;
        report.fell_back = true;
        let d = y.len() as f64;
        let target = (self.bound - d.sqrt() / 2.0).max(0.0);
        let norm = y.iter().map(|v| v * v).sum::<f64>().sqrt();
        let shrink = if norm > target && norm > 0.0 {
            target / norm * (1.0 - 1e-9)
        } else {
            1.0
        };
        for (o, v) in out.iter_mut().zip(&y) {
            *o = (v * shrink).round() as i64;
        }
        Ok((out, report))
    }

    /// Encodes an update: quantize, add this node's noise share, reduce mod `2^bits`.
    pub fn encode(&self, update: &[f32], rng: &mut impl RngCore) -> Result<Vec<u64>, EncodeError> {
        self.encode_with_report(update, rng).map(|(v, _)| v)
    }

    /// As [`Self::encode`], with what the rounding did.
    pub fn encode_with_report(
        &self,
        update: &[f32],
        rng: &mut impl RngCore,
    ) -> Result<(Vec<u64>, RoundingReport), EncodeError> {
        let (mut v, report) = self.quantize(update, rng)?;
        for x in v.iter_mut() {
            *x = x.wrapping_add(self.share.sample(rng));
        }
        Ok((self.to_ring(&v), report))
    }

    /// Reduces signed integers into `Z/2^bits`.
    pub fn to_ring(&self, v: &[i64]) -> Vec<u64> {
        let mask = self.mask();
        v.iter().map(|x| *x as u64 & mask).collect()
    }

    /// Adds `x` into the modular accumulator `acc` (both in `Z/2^bits`).
    pub fn accumulate(&self, acc: &mut [u64], x: &[u64]) -> Result<(), EncodeError> {
        self.check_ring(x)?;
        if acc.len() != x.len() {
            return Err(EncodeError::Length {
                expected: acc.len(),
                got: x.len(),
            });
        }
        let mask = self.mask();
        for (a, b) in acc.iter_mut().zip(x) {
            *a = a.wrapping_add(*b) & mask;
        }
        Ok(())
    }

    fn check_ring(&self, x: &[u64]) -> Result<(), EncodeError> {
        let d = self.rotation.padded_dim();
        if x.len() != d {
            return Err(EncodeError::Length {
                expected: d,
                got: x.len(),
            });
        }
        let mask = self.mask();
        if let Some((index, value)) = x.iter().enumerate().find(|(_, v)| **v & !mask != 0) {
            return Err(EncodeError::OutOfRing {
                index,
                value: *value,
                bits: self.params.bits,
            });
        }
        Ok(())
    }

    /// The modular sum mapped back to signed integers (`[-2^(bits-1), 2^(bits-1))`).
    pub fn to_signed(&self, sum: &[u64]) -> Result<Vec<i64>, EncodeError> {
        self.check_ring(sum)?;
        let bits = self.params.bits;
        let half = 1u64 << (bits - 1);
        Ok(sum
            .iter()
            .map(|v| {
                if *v >= half {
                    *v as i64 - (1i64 << bits)
                } else {
                    *v as i64
                }
            })
            .collect())
    }

    /// Decodes the modular sum of `count` encoded updates to their noisy mean.
    pub fn decode_sum(&self, sum: &[u64], count: usize) -> Result<Vec<f32>, EncodeError> {
        if count == 0 {
            return Err(EncodeError::NoContributors);
        }
        let signed = self.to_signed(sum)?;
        let y: Vec<f64> = signed.iter().map(|v| *v as f64 / self.scale).collect();
        let x = self.rotation.inverse(y);
        Ok(x.into_iter().map(|v| (v / count as f64) as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::distributed::Mechanism;

    fn params(mechanism: Mechanism, bits: u32, dim: usize, n: usize) -> DistributedParams {
        DistributedParams {
            mechanism,
            bits,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            min_contributors: n,
            max_contributors: n,
            dim,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        }
    }

    fn random_update(dim: usize, norm: f64, rng: &mut ChaCha20Rng) -> Vec<f32> {
        let v: Vec<f64> = (0..dim).map(|_| rng.gen::<f64>() - 0.5).collect();
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| (x / n * norm) as f32).collect()
    }

    #[test]
    fn rotation_is_orthogonal_and_determined_by_the_seed() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for dim in [1usize, 5, 1000, 4096] {
            let x = random_update(dim, 3.0, &mut rng);
            let r = Rotation::new(dim, 42);
            let y = r.rotate(&x);
            assert_eq!(y.len(), dim.next_power_of_two());
            // norm preserved
            let nx = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let ny = y.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!((nx - ny).abs() < 1e-9 * nx.max(1.0), "{nx} {ny}");
            let back = r.inverse(y.clone());
            for (a, b) in x.iter().zip(&back) {
                assert!((*a as f64 - b).abs() < 1e-9, "{a} {b}");
            }
            // same seed, same rotation; another seed, another one
            assert_eq!(Rotation::new(dim, 42).rotate(&x), y);
            if dim > 1 {
                assert_ne!(Rotation::new(dim, 43).rotate(&x), y);
            }
        }
    }

    #[test]
    fn rotation_spreads_a_spike() {
        // A one-hot vector becomes flat: every coordinate +-1/sqrt(d).
        let mut x = vec![0f32; 1024];
        x[7] = 1.0;
        let y = Rotation::new(1024, 9).rotate(&x);
        for v in y {
            assert!((v.abs() - 1.0 / 32.0).abs() < 1e-12);
        }
    }

    #[test]
    fn quantized_updates_stay_inside_the_accounted_bound() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for bits in [8u32, 12, 16] {
            let p = params(Mechanism::Skellam, bits, 3000, 10);
            let enc = DistributedEncoder::new(p, 5).unwrap();
            let r = p.rounded_l2().unwrap();
            for norm in [0.0, 0.5, 0.999, 50.0] {
                let x = random_update(3000, norm, &mut rng);
                let (v, rep) = enc.quantize(&x, &mut rng).unwrap();
                let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                assert!(n <= r, "bits {bits} norm {norm}: {n} > {r}");
                assert_eq!(rep.clipped, norm > 1.0);
            }
        }
    }

    #[test]
    fn rounding_fallback_stays_inside_the_bound() {
        // With no redraws allowed the deterministic fallback runs: still inside R, and
        // close to the scaled update (it only shrinks it by the rounding margin).
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        for bits in [8u32, 16] {
            let p = params(Mechanism::Skellam, bits, 3000, 10);
            let enc = DistributedEncoder::new(p, 5).unwrap();
            let r = p.rounded_l2().unwrap();
            let x = random_update(3000, 1.0, &mut rng);
            let (v, rep) = enc.quantize_with_tries(&x, &mut rng, 0).unwrap();
            assert!(rep.fell_back);
            let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!(n <= r, "bits {bits}: {n} > {r}");
            if bits == 16 {
                let back = enc.decode_sum(&enc.to_ring(&v), 1).unwrap();
                let err = back
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                // shrink to R - sqrt(d)/2 plus rounding: both of order sqrt(d) / s
                let d = p.padded_dim() as f64;
                assert!(err < 2.0 * d.sqrt() / enc.scale() + 1e-3, "{err}");
            }
        }
    }

    #[test]
    fn encoded_sum_without_noise_decodes_to_the_mean_within_the_rounding_bound() {
        // With the noise taken out (quantize only), the decoded mean differs from the true
        // mean of the clipped updates by the rounding alone: per update the rounding error
        // has L2 norm <= sqrt(d)/2 in integer units, so the mean's error is at most
        // sqrt(d) / (2 s) in L2 (rotation is orthogonal).
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let dim = 2000;
        let n = 20;
        let p = params(Mechanism::Skellam, 16, dim, n);
        let enc = DistributedEncoder::new(p, 77).unwrap();
        let d = p.padded_dim();
        let mut acc = vec![0u64; d];
        let mut mean = vec![0f64; dim];
        for _ in 0..n {
            let x = random_update(dim, 0.9, &mut rng);
            for (m, v) in mean.iter_mut().zip(&x) {
                *m += *v as f64 / n as f64;
            }
            let (q, _) = enc.quantize(&x, &mut rng).unwrap();
            let q: Vec<u64> = q.into_iter().map(|v| v as u64 & ((1 << 16) - 1)).collect();
            enc.accumulate(&mut acc, &q).unwrap();
        }
        let got = enc.decode_sum(&acc, n).unwrap();
        let err = got
            .iter()
            .zip(&mean)
            .map(|(g, m)| (*g as f64 - m).powi(2))
            .sum::<f64>()
            .sqrt();
        let bound = (d as f64).sqrt() / (2.0 * enc.scale());
        assert!(err <= bound, "{err} > {bound}");
    }

    #[test]
    fn noisy_sum_minus_true_sum_has_the_accounted_variance() {
        // The decoded noisy sum minus the noiseless one is the summed noise over s: per
        // coordinate variance n * share / s^2 = (zC)^2 when n = min_contributors (the
        // rotation is orthogonal, so the variance is the same after the inverse).
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let dim = 4096;
        let n = 10;
        for m in [Mechanism::Skellam, Mechanism::Ddgauss] {
            let p = params(m, 16, dim, n);
            let enc = DistributedEncoder::new(p, 11).unwrap();
            let d = p.padded_dim();
            let (mut noisy, mut clean) = (vec![0u64; d], vec![0u64; d]);
            for _ in 0..n {
                let x = random_update(dim, 1.0, &mut rng);
                let mut r1 = ChaCha20Rng::seed_from_u64(rng.gen());
                let mut r2 = r1.clone();
                let e = enc.encode(&x, &mut r1).unwrap();
                let (q, _) = enc.quantize(&x, &mut r2).unwrap();
                let q: Vec<u64> = q.into_iter().map(|v| v as u64 & 0xffff).collect();
                enc.accumulate(&mut noisy, &e).unwrap();
                enc.accumulate(&mut clean, &q).unwrap();
            }
            // decode both as sums (count 1) and compare
            let a = enc.decode_sum(&noisy, 1).unwrap();
            let b = enc.decode_sum(&clean, 1).unwrap();
            let var = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum::<f64>()
                / dim as f64;
            let want = 1.0; // (z C)^2
                            // sample variance of 4,096 near-Gaussian values: s.e. sqrt(2/4096) = 0.022
            assert!((var - want).abs() < 5.0 * 0.0221, "{m}: {var}");
        }
    }

    #[test]
    fn decode_rejects_malformed_sums() {
        let p = params(Mechanism::Ddgauss, 12, 100, 4);
        let enc = DistributedEncoder::new(p, 1).unwrap();
        assert!(matches!(
            enc.decode_sum(&[0; 100], 1),
            Err(EncodeError::Length { .. })
        ));
        let mut v = vec![0u64; 128];
        v[3] = 1 << 12;
        assert!(matches!(
            enc.decode_sum(&v, 1),
            Err(EncodeError::OutOfRing { index: 3, .. })
        ));
        assert!(matches!(
            enc.decode_sum(&[0; 128], 0),
            Err(EncodeError::NoContributors)
        ));
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert!(matches!(
            enc.encode(&[0.0; 99], &mut rng),
            Err(EncodeError::Length { .. })
        ));
    }

    #[test]
    fn negative_sums_wrap_and_unwrap() {
        // One update pointing along -e_0 decodes with the right sign through the ring.
        let p = params(Mechanism::Skellam, 20, 8, 1);
        let enc = DistributedEncoder::new(p, 3).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut x = vec![0f32; 8];
        x[0] = -1.0;
        let (q, _) = enc.quantize(&x, &mut rng).unwrap();
        let q: Vec<u64> = q.into_iter().map(|v| v as u64 & ((1 << 20) - 1)).collect();
        let back = enc.decode_sum(&q, 1).unwrap();
        assert!(
            (back[0] + 1.0).abs() < 8.0f32.sqrt() / enc.scale() as f32 + 1e-6,
            "{back:?}"
        );
    }
}
