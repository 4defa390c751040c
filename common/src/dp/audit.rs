//! Empirical privacy auditing of a federated run with canary clients.
//!
//! - **One-shot estimate** (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, ICLR 2024,
//!   "One-shot empirical privacy estimation for federated learning"): `m` canary clients
//!   each own a secret pseudo-random direction `u_i` (isotropic, unit norm, from a secret
//!   seed); each is included in the federation independently with probability 1/2 and,
//!   when included, behaves as a client whose update is `C u_i` (clipped like any update,
//!   Poisson-sampled like any client). After training, the cosine of each canary's
//!   direction with the final model delta is its score. Excluded ("unseen") canaries have
//!   a known null distribution (`cos ~ N(0, 1/d)` for an isotropic direction, whatever
//!   the model); included ones shift it. Fitting a Gaussian to each set and computing the
//!   epsilon of the pair of Gaussians at the run's delta gives the estimate: what a
//!   Gaussian mechanism with that separation would be. It is an *estimate*, not a bound.
//! - **One-run lower bound** (Steinke, Nasr, Jagielski, NeurIPS 2023): guess "included"
//!   for the canaries with the highest scores; the number of correct guesses of an
//!   (epsilon, delta)-DP run is dominated by a binomial; the largest epsilon the observed
//!   count rejects at the given confidence is a rigorous lower bound. With `m` canaries it
//!   saturates (about 5.8 at delta 1e-5 with 1,000 perfect guesses), so it can only catch
//!   gross violations; the estimate is what tracks the theory.
//!
//! Nothing here touches the model code: callers pass vectors and scores.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

/// A canary's secret direction: `d` coordinates, unit L2 norm, from `(seed, index)`.
pub fn canary_direction(seed: u64, index: u64, d: usize) -> Vec<f32> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    key[16..24].copy_from_slice(b"canary\0\0");
    let mut rng = ChaCha20Rng::from_seed(key);
    let mut v: Vec<f32> = (0..d)
        .map(|_| {
            let x: f64 = StandardNormal.sample(&mut rng);
            x as f32
        })
        .collect();
    let n = super::l2_norm(&v);
    if n > 0.0 {
        let inv = (1.0 / n) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
    v
}

/// Whether canary `index` is included (probability 1/2, from the secret seed).
pub fn canary_included(seed: u64, index: u64) -> bool {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    key[16..24].copy_from_slice(b"included");
    rand::Rng::gen_bool(&mut ChaCha20Rng::from_seed(key), 0.5)
}

/// Splits canary scores into (included, held out) by each canary's inclusion.
pub fn split_by_inclusion(
    included: &[bool],
    scores: impl IntoIterator<Item = f64>,
) -> (Vec<f64>, Vec<f64>) {
    let (mut seen, mut unseen) = (Vec::new(), Vec::new());
    for (inc, s) in included.iter().zip(scores) {
        if *inc {
            seen.push(s);
        } else {
            unseen.push(s);
        }
    }
    (seen, unseen)
}

/// Cosine of a unit direction with a vector (0 for a zero vector).
pub fn cosine(unit: &[f32], v: &[f32]) -> f64 {
    let dot: f64 = unit.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum();
    let n = super::l2_norm(v);
    if n > 0.0 {
        dot / n
    } else {
        0.0
    }
}

fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let m = x.iter().sum::<f64>() / n;
    let v = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, v.sqrt())
}

/// Hockey-stick divergence `E_eps(P || Q) = integral of max(0, p - e^eps q)` for two
/// Gaussians, by dense numerical integration over +-14 standard deviations of both.
fn hockey_stick(p: (f64, f64), q: (f64, f64), eps: f64) -> f64 {
    let lo = (p.0 - 14.0 * p.1).min(q.0 - 14.0 * q.1);
    let hi = (p.0 + 14.0 * p.1).max(q.0 + 14.0 * q.1);
    let n = 200_000;
    let h = (hi - lo) / n as f64;
    let dens = |(m, s): (f64, f64), x: f64| {
        (-(x - m).powi(2) / (2.0 * s * s)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt())
    };
    let e = eps.exp();
    (0..=n)
        .map(|i| {
            let x = lo + i as f64 * h;
            let w = if i == 0 || i == n { 0.5 } else { 1.0 };
            w * (dens(p, x) - e * dens(q, x)).max(0.0)
        })
        .sum::<f64>()
        * h
}

/// The epsilon at `delta` of distinguishing `N(m1, s1^2)` from `N(m0, s0^2)` (both
/// directions). For equal variances this is the Gaussian mechanism with
/// `mu = |m1 - m0| / s`, computed in closed form; otherwise numerically.
pub fn gaussian_pair_epsilon(null: (f64, f64), seen: (f64, f64), delta: f64) -> f64 {
    let (m0, s0) = null;
    let (m1, s1) = seen;
    if !(s0 > 0.0 && s1 > 0.0 && m0.is_finite() && m1.is_finite()) {
        return f64::INFINITY;
    }
    let delta_at = |eps: f64| -> f64 {
        if ((s0 - s1) / s0).abs() < 1e-9 {
            let mu = (m1 - m0).abs() / s0;
            if mu == 0.0 {
                return 0.0;
            }
            normal_cdf(-eps / mu + mu / 2.0) - eps.exp() * normal_cdf(-eps / mu - mu / 2.0)
        } else {
            hockey_stick(seen, null, eps).max(hockey_stick(null, seen, eps))
        }
    };
    if delta_at(0.0) <= delta {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while delta_at(hi) > delta {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return f64::INFINITY;
        }
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if delta_at(mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// The one-shot estimate from the scores of included and excluded canaries: the epsilon
/// of the Gaussian mechanism whose separation `mu = (mean_seen - mean_unseen) / s` the
/// scores show, with `s` the pooled standard deviation. The pooled (equal-variance) model
/// is the shape of the mechanism being estimated (for an isotropic canary both sets have
/// s.d. about `1/sqrt(d)`); fitting the two variances separately lets their sampling
/// noise alone dominate the tails at delta = 1e-5 and inflate the estimate.
pub fn one_shot_estimate(seen: &[f64], unseen: &[f64], delta: f64) -> Option<f64> {
    if seen.len() < 2 || unseen.len() < 2 {
        return None;
    }
    let (m1, s1) = mean_sd(seen);
    let (m0, s0) = mean_sd(unseen);
    let (n1, n0) = (seen.len() as f64, unseen.len() as f64);
    let pooled = (((n1 - 1.0) * s1 * s1 + (n0 - 1.0) * s0 * s0) / (n1 + n0 - 2.0)).sqrt();
    Some(gaussian_pair_epsilon((m0, pooled), (m1, pooled), delta))
}

/// `P[Binomial(r, q) >= k]` for every k in 0..=r+1.
fn binomial_tails(r: usize, q: f64) -> Vec<f64> {
    let lq = q.ln();
    let l1q = (1.0 - q).ln();
    let lr = libm::lgamma(r as f64 + 1.0);
    let pmf: Vec<f64> = (0..=r)
        .map(|k| {
            let k = k as f64;
            let lc = lr - libm::lgamma(k + 1.0) - libm::lgamma(r as f64 - k + 1.0);
            let t = lc + k * lq + (r as f64 - k) * l1q;
            if t.is_nan() {
                0.0
            } else {
                t.exp()
            }
        })
        .collect();
    let mut tails = vec![0.0; r + 2];
    for k in (0..=r).rev() {
        tails[k] = (tails[k + 1] + pmf[k]).min(1.0);
    }
    tails
}

/// p-value of `v` correct guesses out of `r` with `m` canaries under an (eps, delta)-DP
/// null (Steinke, Nasr, Jagielski 2023, Thm. 5.2 with the delta term of their Alg. 2).
pub fn one_run_p_value(m: usize, r: usize, v: usize, eps: f64, delta: f64) -> f64 {
    if v == 0 || r == 0 {
        return 1.0;
    }
    let q = 1.0 / (1.0 + (-eps).exp());
    let tails = binomial_tails(r, q);
    let beta = tails[v];
    if delta == 0.0 {
        return beta;
    }
    let alpha = (1..=v)
        .map(|i| (tails[v - i] - beta) / i as f64)
        .fold(0.0f64, f64::max);
    (beta + alpha * delta * 2.0 * m as f64).min(1.0)
}

/// The largest epsilon that `v` correct guesses out of `r` reject at `significance`.
pub fn one_run_epsilon(m: usize, r: usize, v: usize, significance: f64, delta: f64) -> f64 {
    if one_run_p_value(m, r, v, 0.0, delta) > significance {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while one_run_p_value(m, r, v, hi, delta) <= significance {
        lo = hi;
        hi *= 2.0;
        if hi > 1e3 {
            return lo;
        }
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if one_run_p_value(m, r, v, mid, delta) <= significance {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Steinke et al.'s lower bound from canary scores: guess "included" for the top `k`
/// scores, for a few `k` fixed in advance (Bonferroni-corrected), abstain on the rest.
pub fn one_run_lower_bound(seen: &[f64], unseen: &[f64], confidence: f64, delta: f64) -> f64 {
    let m = seen.len() + unseen.len();
    if m == 0 {
        return 0.0;
    }
    let mut scored: Vec<(f64, bool)> = seen
        .iter()
        .map(|s| (*s, true))
        .chain(unseen.iter().map(|s| (*s, false)))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let ks: Vec<usize> = [20, 10, 5, 2].iter().map(|f| (m / f).max(1)).collect();
    let significance = (1.0 - confidence) / ks.len() as f64;
    ks.iter()
        .map(|&k| {
            let correct = scored[..k.min(m)].iter().filter(|(_, s)| *s).count();
            one_run_epsilon(m, k.min(m), correct, significance, delta)
        })
        .fold(0.0, f64::max)
}

/// What an audit found.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditReport {
    /// Canaries included in the federation.
    pub seen: usize,
    /// Canaries held out.
    pub unseen: usize,
    /// One-shot estimate (Andrew et al.) for observers of the final model.
    pub epsilon_estimate: Option<f64>,
    /// One-shot estimate over all released iterates (max cosine over rounds), when
    /// computed.
    pub epsilon_estimate_all_iterates: Option<f64>,
    /// Steinke et al.'s lower bound at `confidence` (saturates; see module docs).
    pub epsilon_lower_bound: f64,
    /// Confidence of the lower bound.
    pub confidence: f64,
    /// The accountant's epsilon for the same run.
    pub theoretical: Option<f64>,
    /// Whether the run looks broken: the rigorous lower bound exceeds the theoretical
    /// epsilon, or the estimate exceeds it by more than half.
    pub flagged: bool,
}

impl AuditReport {
    /// Builds the report from final-model scores (and optionally all-iterate scores).
    pub fn new(
        seen: &[f64],
        unseen: &[f64],
        all_iterates: Option<(&[f64], &[f64])>,
        delta: f64,
        theoretical: Option<f64>,
    ) -> Self {
        let confidence = 0.95;
        let epsilon_estimate = one_shot_estimate(seen, unseen, delta);
        let epsilon_lower_bound = one_run_lower_bound(seen, unseen, confidence, delta);
        let flagged = theoretical.is_some_and(|t| {
            epsilon_lower_bound > t || epsilon_estimate.is_some_and(|e| e > 1.5 * t)
        });
        Self {
            seen: seen.len(),
            unseen: unseen.len(),
            epsilon_estimate,
            epsilon_estimate_all_iterates: all_iterates
                .and_then(|(s, u)| one_shot_estimate(s, u, delta)),
            epsilon_lower_bound,
            confidence,
            theoretical,
            flagged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::{GaussianNoise, SimulationGaussian};

    #[test]
    fn gaussian_pair_matches_the_gaussian_mechanism() {
        // mu = 1/z: z = 1 gives the exact Gaussian-mechanism epsilon 4.377 at 1e-5
        // (dp_accounting's PLD for q = 1, z = 1, one step).
        let e = gaussian_pair_epsilon((0.0, 1.0), (1.0, 1.0), 1e-5);
        assert!((e - 4.377).abs() < 0.01, "{e}");
        // The numerical path agrees with the closed form when variances are equal.
        let num = hockey_stick((1.0, 1.0), (0.0, 1.0), e);
        assert!((num - 1e-5).abs() < 1e-7, "{num}");
        assert_eq!(gaussian_pair_epsilon((0.0, 1.0), (0.0, 1.0), 1e-5), 0.0);
    }

    #[test]
    fn one_run_bound_saturates_near_5_8_with_1000_perfect_guesses() {
        let e = one_run_epsilon(1000, 1000, 1000, 0.05, 1e-5);
        assert!((e - 5.8).abs() < 0.15, "{e}");
        assert_eq!(one_run_epsilon(1000, 100, 50, 0.05, 1e-5), 0.0);
    }

    /// One Gaussian release of the sum of the included canaries (C = 1, d = 199,210,
    /// 200 included, 200 held out), as in the reference behaviour.
    fn one_release(z: f64, seed: u64, noise_factor: f64) -> AuditReport {
        let d = 199_210;
        let m = 400u64;
        let mut sum = vec![0f32; d];
        let mut dirs = Vec::new();
        let mut included = Vec::new();
        for i in 0..m {
            let u = canary_direction(seed, i, d);
            let inc = i % 2 == 0; // exactly 200 / 200
            if inc {
                sum.iter_mut().zip(&u).for_each(|(s, v)| *s += v);
            }
            dirs.push(u);
            included.push(inc);
        }
        if noise_factor > 0.0 {
            SimulationGaussian::seeded(seed ^ 7)
                .add_noise(&mut sum, z * noise_factor)
                .unwrap();
        }
        let (mut seen, mut unseen) = (Vec::new(), Vec::new());
        for (u, inc) in dirs.iter().zip(&included) {
            let c = cosine(u, &sum);
            if *inc {
                seen.push(c)
            } else {
                unseen.push(c)
            }
        }
        let (theory, _) = crate::dp::accountant::epsilon(1.0, z, 1, 1e-5).unwrap();
        AuditReport::new(&seen, &unseen, None, 1e-5, Some(theory))
    }

    #[test]
    fn estimate_recovers_the_analytic_epsilon_of_one_gaussian_release() {
        // Analytic (exact Gaussian mechanism, delta 1e-5): z = 0.5: 10.0; z = 1: 4.38;
        // z = 2: 1.99. With 200 + 200 canaries the estimate's sampling error is ~10 %.
        for (z, analytic) in [(0.5, 10.0), (1.0, 4.38), (2.0, 1.99)] {
            let r = one_release(z, 11, 1.0);
            let e = r.epsilon_estimate.unwrap();
            assert!(
                (e / analytic - 1.0).abs() < 0.25,
                "z = {z}: estimate {e} vs {analytic}"
            );
            assert!(
                r.epsilon_lower_bound <= analytic,
                "lower bound above the truth"
            );
            assert!(!r.flagged, "z = {z}: {r:?}");
        }
    }

    #[test]
    fn the_audit_catches_missing_or_halved_noise() {
        // Test-only fault injection: no noise at all, then half the noise.
        let off = one_release(1.0, 5, 0.0);
        assert!(off.flagged, "{off:?}");
        assert!(off.epsilon_estimate.unwrap() > 20.0, "{off:?}");
        assert!(off.epsilon_lower_bound > 1.0, "{off:?}");
        let half = one_release(1.0, 5, 0.5);
        let full = one_release(1.0, 5, 1.0);
        // Half the noise is a Gaussian mechanism with z = 0.5: epsilon ~10 instead of ~4.4.
        let (h, f) = (
            half.epsilon_estimate.unwrap(),
            full.epsilon_estimate.unwrap(),
        );
        assert!(h > 1.7 * f, "half {h} vs full {f}");
        assert!(half.flagged, "{half:?}");
    }
}
