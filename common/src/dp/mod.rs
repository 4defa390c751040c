//! Differential privacy: the update pipeline types, clipping, Gaussian noise and accounting.
//!
//! The types carry the privacy pipeline (DESIGN.md section 4 and STYLE.md habit 2): a
//! [`RawDelta`] can only become a [`WireDelta`] — the one type a client may send — by being
//! clipped and noised (`local`), clipped (`central`, the trusted server adds the noise), or
//! explicitly marked non-private (`none`). Nothing here reads a clock or a socket; the
//! noise source is passed in.

pub mod accountant;
pub mod audit;
mod dd;
pub mod distributed;
pub mod encoding;
pub mod grid;
pub mod hook;
pub mod noise;
pub mod pld;
pub mod skellam;

use crate::config::{ClientPrivacy, DpMode};
pub use grid::{DiscreteGaussianInt, GridGaussian};
pub use noise::{GaussianNoise, NoiseError, OpenDpGaussian, SimulationGaussian};

/// L2 norm of a vector, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    sum_of_squares::<false>(values, f32::INFINITY).0.sqrt()
}

/// The L2 norm of `values` (exactly [`l2_norm`]'s value) and whether every value is finite
/// with magnitude at most `max_abs`, in one pass over the data: a server checks each
/// update for both before using it. Measured on 199,210 cache-resident values: 73 us,
/// against 37 us for the norm alone and 240 us for the three passes it replaces.
pub fn l2_norm_within(values: &[f32], max_abs: f32) -> (f64, bool) {
    // A NaN or an infinity makes the f64 sum of squares non-finite (no f32 square can
    // overflow an f64), so the loop itself only flags magnitudes above the bound.
    let (sum, over) = sum_of_squares::<true>(values, max_abs);
    (sum.sqrt(), sum.is_finite() && !over)
}

/// The f64 sum of squares of `values` in the one order both norms use (so they agree to
/// the bit), and, when `FLAG_OVER`, whether any magnitude exceeds `max_abs` (compiled out
/// otherwise: the flag halves the loop's speed). Four independent accumulators let the
/// compiler vectorise without changing the result meaningfully.
fn sum_of_squares<const FLAG_OVER: bool>(values: &[f32], max_abs: f32) -> (f64, bool) {
    let mut acc = [0f64; 4];
    let mut over = [false; 4];
    let chunks = values.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            acc[i] += (c[i] as f64) * (c[i] as f64);
            if FLAG_OVER {
                over[i] |= c[i].abs() > max_abs;
            }
        }
    }
    let mut sum = acc.iter().sum::<f64>();
    let mut any_over = over.iter().any(|o| *o);
    for v in rest {
        sum += (*v as f64) * (*v as f64);
        if FLAG_OVER {
            any_over |= v.abs() > max_abs;
        }
    }
    (sum, any_over)
}

/// Scales `values` in place so their L2 norm is at most `bound`. Returns the norm before
/// clipping and whether it was clipped. A zero or non-finite norm is handled: zero stays
/// zero; a non-finite vector is zeroed (it carries no usable information and must not
/// leak through as NaN).
pub fn clip_in_place(values: &mut [f32], bound: f64) -> (f64, bool) {
    let norm = l2_norm(values);
    clip_with_norm(values, norm, bound)
}

/// [`clip_in_place`] for a caller that already holds `norm`, [`l2_norm`]`(values)` (a server
/// measured it when it validated the update): the same result without reading the values
/// again unless they must be scaled.
pub fn clip_with_norm(values: &mut [f32], norm: f64, bound: f64) -> (f64, bool) {
    if !norm.is_finite() {
        values.iter_mut().for_each(|v| *v = 0.0);
        return (norm, true);
    }
    if norm <= bound || norm == 0.0 {
        return (norm, false);
    }
    // Scale in f64 then shrink by one ulp-ish margin so f32 rounding cannot push the norm
    // above the bound.
    let scale = (bound / norm) * (1.0 - 1e-6);
    for v in values.iter_mut() {
        *v = ((*v as f64) * scale) as f32;
    }
    (norm, true)
}

/// Tail exponent of [`local_norm_bound`]: an honest update exceeds the bound with
/// probability at most `e^-72` (about 5e-32).
pub const LOCAL_NORM_TAIL: f64 = 72.0;

/// The largest L2 norm an honest `local`-mode update can have, except with probability at
/// most `e^-LOCAL_NORM_TAIL`: a clipped delta (norm at most `C`) plus noise of
/// per-coordinate s.d. at most `sigma = z (C + g sqrt(d))` (the grid sampler's calibrated
/// scale, `g` its grid; opendp's is smaller). The noise vector is `sigma^2`-sub-Gaussian
/// (exactly Gaussian, or discrete Gaussian: Canonne, Kamath, Steinke 2020), so by Hsu,
/// Kakade and Zhang (2012, Thm. 1) `|n|^2 <= sigma^2 (d + 2 sqrt(d t) + 2 t)` with
/// probability at least `1 - e^-t`. A 1 % margin covers f32 rounding.
pub fn local_norm_bound(clip_norm: f64, noise_multiplier: f64, dim: usize) -> f64 {
    let d = dim as f64;
    let g = GridGaussian::grid(noise_multiplier * clip_norm);
    let sigma = noise_multiplier * (clip_norm + g * d.sqrt());
    let t = LOCAL_NORM_TAIL;
    let noise = sigma * (d + 2.0 * (d * t).sqrt() + 2.0 * t).sqrt();
    (clip_norm + noise) * 1.01
}

/// A model delta fresh from local training; it must not leave the node as is.
#[derive(Debug, Clone, PartialEq)]
pub struct RawDelta(Vec<f32>);

/// A delta clipped to L2 norm `bound`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClippedDelta {
    values: Vec<f32>,
    bound: f64,
    norm_before: f64,
    clipped: bool,
}

/// A delta that may be put on the wire, with how it was protected.
#[derive(Debug, Clone, PartialEq)]
pub struct WireDelta {
    values: Vec<f32>,
    protection: Protection,
}

/// How a [`WireDelta`] was protected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protection {
    /// DP off: the raw delta.
    NonPrivate,
    /// Clipped only; the trusted server adds noise (`central`).
    Clipped {
        /// Whether clipping changed the delta.
        clipped: bool,
    },
    /// Clipped and noised on the node (`local`).
    Noised {
        /// Standard deviation of the per-coordinate noise added.
        sigma: f64,
    },
}

impl RawDelta {
    /// Wraps a delta produced by local training.
    pub fn new(values: Vec<f32>) -> Self {
        Self(values)
    }

    /// Read access (for metrics such as the norm).
    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    /// Clips to L2 norm `bound`.
    pub fn clip(mut self, bound: f64) -> ClippedDelta {
        let (norm_before, clipped) = clip_in_place(&mut self.0, bound);
        ClippedDelta {
            values: self.0,
            bound,
            norm_before,
            clipped,
        }
    }

    /// Sends the delta without protection; only for `DpMode::None`.
    pub fn into_non_private(self) -> WireDelta {
        WireDelta {
            values: self.0,
            protection: Protection::NonPrivate,
        }
    }
}

impl ClippedDelta {
    /// Whether clipping changed the delta.
    pub fn was_clipped(&self) -> bool {
        self.clipped
    }

    /// L2 norm before clipping.
    pub fn norm_before(&self) -> f64 {
        self.norm_before
    }

    /// The clipping bound.
    pub fn bound(&self) -> f64 {
        self.bound
    }

    /// Read access.
    pub fn as_slice(&self) -> &[f32] {
        &self.values
    }

    /// `central` mode: the clipped delta goes to the trusted server over TLS.
    pub fn into_central(self) -> WireDelta {
        WireDelta {
            protection: Protection::Clipped {
                clipped: self.clipped,
            },
            values: self.values,
        }
    }

    /// `local` mode: adds `N(0, (z * bound)^2)` to every coordinate.
    pub fn add_noise(
        mut self,
        noise_multiplier: f64,
        noise: &mut dyn GaussianNoise,
    ) -> Result<WireDelta, NoiseError> {
        let sigma = noise_multiplier * self.bound;
        noise.add_calibrated(&mut self.values, noise_multiplier, self.bound)?;
        Ok(WireDelta {
            values: self.values,
            protection: Protection::Noised { sigma },
        })
    }
}

impl WireDelta {
    /// How it was protected.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// The values to encode.
    pub fn as_slice(&self) -> &[f32] {
        &self.values
    }

    /// Takes the values.
    pub fn into_vec(self) -> Vec<f32> {
        self.values
    }
}

/// Why a delta could not be privatized.
#[derive(Debug, thiserror::Error)]
pub enum PrivatizeError {
    /// The mode cannot run (e.g. `distributed`).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Sampling noise failed.
    #[error(transparent)]
    Noise(#[from] NoiseError),
}

/// Runs the client-side pipeline for the round's privacy settings.
pub fn privatize(
    delta: RawDelta,
    privacy: &ClientPrivacy,
    noise: &mut dyn GaussianNoise,
) -> Result<WireDelta, PrivatizeError> {
    privacy.validate()?;
    Ok(match privacy.mode {
        DpMode::None => delta.into_non_private(),
        // Distributed: the node clips here; its noise share is added when the clipped
        // update is encoded for secure aggregation (`encoding::DistributedEncoder`).
        DpMode::Central | DpMode::Distributed => delta.clip(privacy.clip_norm).into_central(),
        DpMode::Local => delta
            .clip(privacy.clip_norm)
            .add_noise(privacy.noise_multiplier, noise)?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_one_pass_check_gives_the_norm_bit_for_bit_and_catches_every_bad_value() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for len in [0usize, 1, 3, 4, 5, 17, 1000, 199_210] {
            let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
            // The reference: the plain sum the four accumulators stand for.
            let naive = {
                let mut acc = [0f64; 4];
                for (i, x) in v.iter().enumerate().take(len - len % 4) {
                    acc[i % 4] += (*x as f64) * (*x as f64);
                }
                let mut s = acc.iter().sum::<f64>();
                for x in &v[len - len % 4..] {
                    s += (*x as f64) * (*x as f64);
                }
                s.sqrt()
            };
            assert_eq!(super::l2_norm(&v).to_bits(), naive.to_bits(), "len {len}");
            let (n, ok) = super::l2_norm_within(&v, 2.0);
            assert_eq!(n.to_bits(), naive.to_bits());
            assert!(ok);
            if len == 0 {
                continue;
            }
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2.5, -2.5] {
                for at in [0, len / 2, len - 1] {
                    let mut w = v.clone();
                    w[at] = bad;
                    assert!(!super::l2_norm_within(&w, 2.0).1, "{bad} at {at} of {len}");
                }
            }
            // No bound: only non-finite values fail.
            let mut w = v.clone();
            w[len - 1] = 1e30;
            assert!(super::l2_norm_within(&w, f32::INFINITY).1);
            w[0] = f32::INFINITY;
            assert!(!super::l2_norm_within(&w, f32::INFINITY).1);
        }
    }

    #[test]
    fn clipping_with_a_known_norm_equals_clipping_in_place() {
        for scale in [0.0f32, 0.1, 1.0, 10.0] {
            let v: Vec<f32> = (0..1001)
                .map(|i| ((i as f32) * 0.37).sin() * scale)
                .collect();
            let (mut a, mut b) = (v.clone(), v.clone());
            let ra = super::clip_in_place(&mut a, 3.0);
            let rb = super::clip_with_norm(&mut b, super::l2_norm(&v), 3.0);
            assert_eq!(ra, rb);
            assert_eq!(a, b);
        }
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_delta_is_not_divided_by_zero() {
        let c = RawDelta::new(vec![0.0; 10]).clip(1.0);
        assert!(!c.was_clipped());
        assert!(c.as_slice().iter().all(|v| *v == 0.0));
    }

    #[test]
    fn non_finite_delta_is_zeroed() {
        let c = RawDelta::new(vec![f32::NAN, 1.0]).clip(1.0);
        assert!(c.was_clipped());
        assert_eq!(c.as_slice(), &[0.0, 0.0]);
    }

    #[test]
    fn short_delta_is_untouched_long_one_scaled() {
        let c = RawDelta::new(vec![0.3, 0.4]).clip(1.0);
        assert!(!c.was_clipped());
        assert_eq!(c.as_slice(), &[0.3, 0.4]);
        let c = RawDelta::new(vec![3.0, 4.0]).clip(1.0);
        assert!(c.was_clipped());
        assert!((c.norm_before() - 5.0).abs() < 1e-9);
        let n = l2_norm(c.as_slice());
        assert!(n <= 1.0 && n > 0.999, "{n}");
        // direction preserved
        assert!((c.as_slice()[0] / c.as_slice()[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn pipeline_follows_the_mode() {
        let mut noise = SimulationGaussian::seeded(1);
        let none = privatize(
            RawDelta::new(vec![3.0, 4.0]),
            &ClientPrivacy::NONE,
            &mut noise,
        )
        .unwrap();
        assert_eq!(none.as_slice(), &[3.0, 4.0]);
        let central = privatize(
            RawDelta::new(vec![3.0, 4.0]),
            &ClientPrivacy {
                mode: DpMode::Central,
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            },
            &mut noise,
        )
        .unwrap();
        assert!(l2_norm(central.as_slice()) <= 1.0);
        assert_eq!(central.protection(), Protection::Clipped { clipped: true });
        let local = privatize(
            RawDelta::new(vec![0.0; 1000]),
            &ClientPrivacy {
                mode: DpMode::Local,
                clip_norm: 0.5,
                noise_multiplier: 2.0,
            },
            &mut noise,
        )
        .unwrap();
        assert_eq!(local.protection(), Protection::Noised { sigma: 1.0 });
        let sd = (local
            .as_slice()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            / 1000.0)
            .sqrt();
        assert!((sd - 1.0).abs() < 0.15, "{sd}");
        // Distributed: clipped only here (the share is added by the encoder).
        let distributed = privatize(
            RawDelta::new(vec![3.0, 4.0]),
            &ClientPrivacy {
                mode: DpMode::Distributed,
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            },
            &mut noise,
        )
        .unwrap();
        assert_eq!(
            distributed.protection(),
            Protection::Clipped { clipped: true }
        );
        assert!((distributed.as_slice()[0] - 0.6).abs() < 1e-6);
        assert!((distributed.as_slice()[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn honest_local_updates_stay_inside_the_norm_bound_and_attacks_do_not() {
        // Main-job shape: d = 199,210, C = 1, z = 0.05. An honest update's norm is about
        // sqrt(C^2 + (zC)^2 d) = 22.3; the audit's attack sent norm 1000.
        let d = 199_210;
        let bound = local_norm_bound(1.0, 0.05, d);
        let typical = (1.0f64 + 0.05f64.powi(2) * d as f64).sqrt();
        assert!(
            bound > typical && bound < 1.2 * typical,
            "{bound} vs {typical}"
        );
        for (sampler, seed) in [("grid", 1u64), ("sim", 2)] {
            let mut v = vec![0f32; d];
            v[0] = 1.0; // a clipped update at the bound
            let mut noise: Box<dyn GaussianNoise> = match sampler {
                "grid" => Box::new(GridGaussian::seeded(seed)),
                _ => Box::new(SimulationGaussian::seeded(seed)),
            };
            noise.add_calibrated(&mut v, 0.05, 1.0).unwrap();
            assert!(l2_norm(&v) < bound, "{sampler}: {} >= {bound}", l2_norm(&v));
        }
        assert!(1000.0 > bound);
    }

    proptest! {
        #[test]
        fn clipped_norm_never_exceeds_bound(
            values in proptest::collection::vec(-1e6f32..1e6, 0..500),
            bound in 1e-4f64..1e4,
        ) {
            let c = RawDelta::new(values).clip(bound);
            prop_assert!(l2_norm(c.as_slice()) <= bound, "norm {} > bound {}", l2_norm(c.as_slice()), bound);
        }

        #[test]
        fn clipping_tiny_and_huge_magnitudes(
            exp in -30i32..30,
            n in 1usize..2000,
            bound in 1e-3f64..10.0,
        ) {
            let v = vec![10f32.powi(exp); n];
            let c = RawDelta::new(v).clip(bound);
            prop_assert!(l2_norm(c.as_slice()) <= bound);
        }
    }
}
