//! Distributed DP: parameters, per-node noise shares and accounting (no networking).
//!
//! Every node adds an **integer noise share** to its encoded update (see
//! [`super::encoding`]); secure aggregation reveals only the modular sum, whose noise is
//! the sum of the shares. The shares are sized so that the sum over the **minimum number
//! of contributors the round accepts** (`min_contributors`, the secure-aggregation
//! threshold) carries noise of multiplier `z`: dropouts can only add noise to what is
//! accounted, never remove it.
//!
//! **Scale.** Encoded coordinates are `s` times the rotated, clipped update, rounded to
//! integers. `s` is the largest scale that keeps `headroom` standard deviations of the sum
//! of `max_contributors` updates inside `[-2^(bits-1), 2^(bits-1))`: with `d` the padded
//! dimension, the sum's per-coordinate variance in integer units is
//! `s^2 (C^2 N^2 / d + z^2 C^2 N / n) + N / 4` (signal if all `N` updates were aligned
//! after the rotation's flattening, noise, rounding), as the TFF/google-research
//! `dskellam_params` / `ddgauss_params` do (`rho = 1`, no `sqrt(n)` norm growth).
//!
//! **Sensitivity after rounding** (Kairouz, Liu, Steinke 2021, Thm. 2): conditional
//! stochastic rounding keeps `|round(s x)|_2 <= R = min(sC + sqrt(d), sqrt((sC)^2 + d/4 +
//! sqrt(2 ln(1/beta)) (sC + sqrt(d)/2)))` and, integer vectors, `|v|_1 <= R min(sqrt(d), R)`.
//!
//! **RDP of one release** (integer units; `mu` the accounted variance of the summed noise):
//! - Skellam (Agarwal, Kairouz, Liu 2021, Thm. 3.5 / Cor. 3.6):
//!   `alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))`;
//! - distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, Prop. 14), `n` shares of
//!   scale `sigma`, `tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1))`, `e2, e1` the
//!   sensitivities over `sqrt(n) sigma`: `min(alpha e2^2 / 2 + tau d, alpha/2 (e2^2 + 2 e1
//!   tau + tau^2 d), alpha/2 (e2 + sqrt(d) tau)^2)`.
//!
//! **Two epsilons.** Against *observers of the released model*: neighbouring data sets
//! add or remove one client (sensitivity `R`), rounds are Poisson-sampled at rate `q`,
//! amplified with the general Poisson-subsampled RDP bound of Zhu and Wang (2019, Thm. 6;
//! the repo's Mironov-Talwar-Zhang bound holds only for the Gaussian). Against *the
//! server*: it knows who took part, so no amplification, and the client's update may be
//! anything in the ball (replace-one: sensitivity `2R`, `2 D1`), per round taken part in
//! (as `local` mode's server-side figure). RDP is converted with the improved conversion
//! ([`super::accountant::rdp_to_epsilon`]) over integer orders 2..=128 and 256.

use super::accountant::{rdp_to_epsilon, AccountError};
use serde::{Deserialize, Serialize};

/// Which integer noise the nodes add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Symmetric Skellam shares ([`super::skellam::Skellam`]).
    Skellam,
    /// Discrete Gaussian shares ([`super::grid::DiscreteGaussianInt`]).
    Ddgauss,
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mechanism::Skellam => "skellam",
            Mechanism::Ddgauss => "ddgauss",
        })
    }
}

impl std::str::FromStr for Mechanism {
    type Err = ParamsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skellam" => Ok(Mechanism::Skellam),
            "ddgauss" => Ok(Mechanism::Ddgauss),
            other => Err(ParamsError::Mechanism(other.to_string())),
        }
    }
}

/// Why distributed-DP parameters are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    /// A parameter outside its domain.
    #[error("{what} must be {expected}, got {got}")]
    Domain {
        /// Parameter name.
        what: &'static str,
        /// Allowed range.
        expected: &'static str,
        /// Value given.
        got: f64,
    },
    /// Too few bits for the headroom: no positive scale exists.
    #[error("{bits} bits cannot hold {headroom} standard deviations of the sum of {contributors} updates")]
    TooFewBits {
        /// Bits per coordinate.
        bits: u32,
        /// Standard deviations of headroom asked.
        headroom: f64,
        /// Contributors summed.
        contributors: usize,
    },
    /// Unknown mechanism name.
    #[error("unknown mechanism {0:?} (expected skellam or ddgauss)")]
    Mechanism(String),
}

/// The public parameters of distributed DP for one federation (the same for every node
/// and round; the rotation seed is per round).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributedParams {
    /// Integer noise.
    pub mechanism: Mechanism,
    /// Bits per coordinate of the modular sum (the secure-aggregation ring `Z/2^bits`).
    pub bits: u32,
    /// L2 clipping bound `C`.
    pub clip_norm: f64,
    /// Noise multiplier `z` of the summed noise over `min_contributors` shares.
    pub noise_multiplier: f64,
    /// Fewest contributors a round accepts (the secure-aggregation threshold): the noise
    /// is accounted at this count.
    pub min_contributors: usize,
    /// Most contributors a round sums (sizes the modular headroom).
    pub max_contributors: usize,
    /// Model dimension before padding.
    pub dim: usize,
    /// Conditional-rounding failure probability `beta` in `[0, 1)` (`e^-0.5` usual).
    pub beta: f64,
    /// Standard deviations of the sum kept inside the modular range (3 usual).
    pub headroom: f64,
}

fn domain(
    ok: bool,
    what: &'static str,
    expected: &'static str,
    got: f64,
) -> Result<(), ParamsError> {
    if ok {
        Ok(())
    } else {
        Err(ParamsError::Domain {
            what,
            expected,
            got,
        })
    }
}

/// Largest supported bits per coordinate (sums of up to 2^16 i64 shares cannot overflow).
pub const MAX_BITS: u32 = 40;

impl DistributedParams {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ParamsError> {
        domain(
            (2..=MAX_BITS).contains(&self.bits),
            "bits",
            "in 2..=40",
            self.bits as f64,
        )?;
        domain(
            self.clip_norm.is_finite() && self.clip_norm > 0.0,
            "clip norm",
            "finite and > 0",
            self.clip_norm,
        )?;
        domain(
            self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0,
            "noise multiplier",
            "finite and > 0",
            self.noise_multiplier,
        )?;
        domain(
            self.min_contributors >= 1,
            "min contributors",
            ">= 1",
            self.min_contributors as f64,
        )?;
        domain(
            self.max_contributors >= self.min_contributors && self.max_contributors <= 1 << 16,
            "max contributors",
            ">= min contributors and <= 65536",
            self.max_contributors as f64,
        )?;
        domain(
            self.dim >= 1 && self.dim <= 1 << 26,
            "dimension",
            "in 1..=2^26",
            self.dim as f64,
        )?;
        domain(
            (0.0..1.0).contains(&self.beta),
            "beta",
            "in [0, 1)",
            self.beta,
        )?;
        domain(
            self.headroom.is_finite() && self.headroom > 0.0,
            "headroom",
            "finite and > 0",
            self.headroom,
        )?;
        self.scale().map(|_| ())
    }

    /// The dimension after padding to a power of two (the rotation's).
    pub fn padded_dim(&self) -> usize {
        self.dim.next_power_of_two()
    }

    /// The scale `s` (module docs).
    pub fn scale(&self) -> Result<f64, ParamsError> {
        let d = self.padded_dim() as f64;
        let big_n = self.max_contributors as f64;
        let n = self.min_contributors as f64;
        let c = self.clip_norm;
        let z = self.noise_multiplier;
        let range = 2f64.powi(self.bits as i32 - 1) / self.headroom;
        let num = range * range - big_n / 4.0;
        let den = c * c * big_n * big_n / d + z * z * c * c * big_n / n;
        if num <= 0.0 || !(num / den).is_finite() {
            return Err(ParamsError::TooFewBits {
                bits: self.bits,
                headroom: self.headroom,
                contributors: self.max_contributors,
            });
        }
        Ok((num / den).sqrt())
    }

    /// `R`, the L2 bound of a rounded update in integer units.
    pub fn rounded_l2(&self) -> Result<f64, ParamsError> {
        Ok(rounded_l2_bound(
            self.scale()? * self.clip_norm,
            self.beta,
            self.padded_dim(),
        ))
    }

    /// The L1 bound of a rounded update in integer units.
    pub fn rounded_l1(&self) -> Result<f64, ParamsError> {
        let r = self.rounded_l2()?;
        Ok(r * (self.padded_dim() as f64).sqrt().min(r))
    }

    /// Variance of one node's share, in integer units: `(z C s)^2 / min_contributors`.
    pub fn share_variance(&self) -> Result<f64, ParamsError> {
        let sigma = self.noise_multiplier * self.clip_norm * self.scale()?;
        Ok(sigma * sigma / self.min_contributors as f64)
    }

    /// RDP of one release at integer order `alpha >= 2`, for sensitivities `(D2, D1)` in
    /// integer units.
    fn rdp_release(&self, alpha: u64, l2: f64, l1: f64) -> Result<f64, ParamsError> {
        let a = alpha as f64;
        let share = self.share_variance()?;
        let n = self.min_contributors as f64;
        Ok(match self.mechanism {
            Mechanism::Skellam => {
                let mu = n * share;
                a * l2 * l2 / (2.0 * mu)
                    + (((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu))
                        .min(3.0 * l1 / (2.0 * mu))
            }
            Mechanism::Ddgauss => {
                let sigma2 = share; // D_{Z,sigma}: scale^2 (variance within 1e-60)
                let d = self.padded_dim() as f64;
                let mut tau = 0.0;
                for k in 1..self.min_contributors {
                    let k = k as f64;
                    let term = (-2.0 * std::f64::consts::PI.powi(2) * sigma2 * k / (k + 1.0)).exp();
                    if term == 0.0 {
                        break; // the terms only shrink as k grows
                    }
                    tau += term;
                }
                tau *= 10.0;
                let central = (n * sigma2).sqrt();
                let e2 = l2 / central;
                let e1 = l1 / central;
                let t1 = a / 2.0 * e2 * e2 + tau * d;
                let t2 = a / 2.0 * (e2 * e2 + 2.0 * e1 * tau + tau * tau * d);
                let t3 = a / 2.0 * (e2 + d.sqrt() * tau).powi(2);
                t1.min(t2).min(t3)
            }
        })
    }

    /// RDP of one release against observers of the model (sensitivity `R`, unsampled).
    pub fn rdp_model(&self, alpha: u64) -> Result<f64, ParamsError> {
        self.rdp_release(alpha, self.rounded_l2()?, self.rounded_l1()?)
    }

    /// RDP of one release against the server (replace-one: `2R`, `2 D1`).
    pub fn rdp_server(&self, alpha: u64) -> Result<f64, ParamsError> {
        self.rdp_release(alpha, 2.0 * self.rounded_l2()?, 2.0 * self.rounded_l1()?)
    }
}

/// `R` for an L2 norm `l2` (integer units), `beta`, padded dimension `d`
/// (google-research `rounded_l2_norm_bound`).
pub fn rounded_l2_bound(l2: f64, beta: f64, d: usize) -> f64 {
    let d = d as f64;
    let bound1 = l2 + d.sqrt();
    if beta == 0.0 {
        return bound1;
    }
    let sq = l2 * l2 + 0.25 * d + (2.0 * (1.0 / beta).ln()).sqrt() * (l2 + 0.5 * d.sqrt());
    bound1.min(sq.sqrt())
}

/// Integer orders for these bounds (the general subsampled bound needs integers).
pub fn orders() -> Vec<u64> {
    let mut v: Vec<u64> = (2..=128).collect();
    v.push(256);
    v
}

fn ln_binom(n: u64, k: u64) -> f64 {
    libm::lgamma(n as f64 + 1.0) - libm::lgamma(k as f64 + 1.0) - libm::lgamma((n - k) as f64 + 1.0)
}

/// Zhu and Wang (2019), Thm. 6: RDP at integer order `alpha >= 2` of a mechanism with RDP
/// `eps(l)` (at every integer `l <= alpha`) under Poisson subsampling at rate `q`; never
/// above the unsampled `eps(alpha)`.
pub fn subsampled_rdp(alpha: u64, q: f64, eps: &dyn Fn(u64) -> f64) -> f64 {
    if q >= 1.0 {
        return eps(alpha);
    }
    let a = alpha as f64;
    let l1q = (-q).ln_1p();
    let mut terms = vec![(a - 1.0) * l1q + (a * q - q + 1.0).ln()];
    terms.push(ln_binom(alpha, 2) + 2.0 * q.ln() + (a - 2.0) * l1q + eps(2));
    for l in 3..=alpha {
        let lf = l as f64;
        terms.push(
            3f64.ln() + ln_binom(alpha, l) + (a - lf) * l1q + lf * q.ln() + (lf - 1.0) * eps(l),
        );
    }
    let m = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + terms.iter().map(|t| (t - m).exp()).sum::<f64>().ln();
    (lse / (a - 1.0)).min(eps(alpha))
}

/// The two labelled epsilons of a distributed-DP run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributedEpsilons {
    /// Against anyone who sees the released models (amplified by sampling at rate `q`).
    pub model_observers: f64,
    /// Against the server (no amplification; per round the client took part in).
    pub server: f64,
}

/// Why an epsilon has no answer.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DistributedAccountError {
    /// The parameters are unusable.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The accounting question is malformed.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// Whether rounds are released at all depends on one client too often: no epsilon
    /// holds at this delta (see [`release_flip_probability`]).
    #[error(
        "whether a round is released depends on one client with probability {flip:.3e} over \
         the run, too much for delta = {delta:e}: min_contributors is too close to the expected \
         number of participants (or max_contributors to it from above)"
    )]
    ReleaseDecision {
        /// Summed per-round probability.
        flip: f64,
        /// The target delta.
        delta: f64,
    },
}

/// ln P(Binomial(n, q) = k).
fn ln_binomial_pmf(n: u64, k: u64, q: f64) -> f64 {
    if k > n {
        return f64::NEG_INFINITY;
    }
    let j = k.min(n - k);
    // ln C(n, j) as a sum of logs: j is at most a few thousand here.
    let ln_choose: f64 = (1..=j)
        .map(|i| ((n - j + i) as f64).ln() - (i as f64).ln())
        .sum();
    let (a, b) = (k as f64 * q.ln(), (n - k) as f64 * (-q).ln_1p());
    ln_choose + if k == 0 { 0.0 } else { a } + if k == n { 0.0 } else { b }
}

/// Per-round probability that **whether** a distributed-DP round is released depends on
/// one client (add/remove of one client among `population`, Poisson rate `q`).
///
/// `edges` are the counts k of *other* participants at which one more participant changes
/// whether the round is released (the coordinator derives them from its own checks:
/// `dpfl_server::coordinator::release_edges`; [`default_release_edges`] is the usual set).
/// The decision differs between the two neighbouring populations (k and k + 1
/// participants) only if k is an edge, and only if the client is sampled: probability
/// q * P(Binomial(population - 1, q) in edges). Outside that event both neighbours are
/// released (with at least m noise shares: the accounted mechanism) or both are not.
///
/// Assumes dropouts are independent of the data (they thin the participants before the
/// same decision).
pub fn release_flip_probability(population: u64, q: f64, edges: &[u64]) -> f64 {
    if population == 0 || !(q > 0.0 && q <= 1.0) {
        return 0.0;
    }
    let mut ks = edges.to_vec();
    ks.sort_unstable();
    ks.dedup();
    let mass: f64 = ks
        .into_iter()
        .map(|k| ln_binomial_pmf(population - 1, k, q).exp())
        .sum();
    (q * mass).min(1.0)
}

/// The usual decision edges: a round is released iff its participant count n is at least
/// max(m, 3) (max(m + 1, 3) when the threshold m forces the complete graph) and at most
/// `max_contributors`; so k in {max(m, 3) - 1, max(m + 1, 3) - 1, max_contributors}.
pub fn default_release_edges(p: &DistributedParams) -> Vec<u64> {
    let m = p.min_contributors as u64;
    let mut ks = vec![m.max(3) - 1, (m + 1).max(3) - 1, p.max_contributors as u64];
    ks.sort_unstable();
    ks.dedup();
    ks
}

/// Epsilon against observers of the models over `groups` of (q, releases), when the
/// releases' on/off decision depends on one client with summed probability `flip` over the
/// run ([`release_flip_probability`]; every round run counts, released or not).
///
/// Outside that event the run is the accounted mechanism: for neighbours D (without the
/// client) and D' (with it), let the hybrid H(D) behave like D' in the rounds whose other
/// participants' count k sits at a decision edge (like D elsewhere). Per round, H(D) and
/// M(D') are the accounted mechanism or identical (a mixture over k, which does not depend
/// on the client: RDP is quasi-convex), so their composition is (epsilon, delta') by the
/// RDP bound, and M(D) differs from H(D) only if the client is sampled in such a round:
/// total variation at most `flip`. Hence P[M(D) in A] <= e^epsilon P[M(D') in A] +
/// delta' + flip, and symmetrically (the hybrid on D' behaves like D). The figure is the
/// RDP epsilon at delta' = delta - flip; none exists when flip >= delta.
pub fn model_epsilon_with_release_flip(
    p: &DistributedParams,
    groups: &[(f64, u64)],
    delta: f64,
    flip: f64,
) -> Result<f64, DistributedAccountError> {
    model_epsilon_composed(p, groups, &[], delta, flip)
}

fn check_q_delta(q: f64, delta: f64) -> Result<(), AccountError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(AccountError::Domain {
            what: "sampling rate",
            expected: "in (0, 1]",
            got: q,
        });
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountError::Domain {
            what: "delta",
            expected: "in (0, 1)",
            got: delta,
        });
    }
    Ok(())
}

/// Epsilon against observers of the model after `rounds` releases with Poisson rate `q`.
pub fn model_epsilon(
    p: &DistributedParams,
    q: f64,
    rounds: u64,
    delta: f64,
) -> Result<f64, DistributedAccountError> {
    model_epsilon_of_rounds(p, &[(q, rounds)], delta)
}

/// As [`model_epsilon`] for releases at several rates, given as `(q, count)` groups
/// (RDP adds over releases).
pub fn model_epsilon_of_rounds(
    p: &DistributedParams,
    groups: &[(f64, u64)],
    delta: f64,
) -> Result<f64, DistributedAccountError> {
    model_epsilon_composed(p, groups, &[], delta, 0.0)
}

/// RDP over [`orders`] of releases at `p` sampled in `(q, count)` groups, against
/// observers of the model.
fn model_rdp(p: &DistributedParams, groups: &[(f64, u64)]) -> Result<Vec<f64>, ParamsError> {
    let ords = orders();
    let mut rdp = vec![0.0; ords.len()];
    if groups.iter().all(|(_, c)| *c == 0) {
        return Ok(rdp);
    }
    // RDP at every order up to the largest, unsampled (the subsampled bound needs them).
    let top = ords.iter().copied().max().unwrap_or(2);
    let mut table = vec![0.0; top as usize + 1];
    for (l, t) in table.iter_mut().enumerate().skip(2) {
        *t = p.rdp_model(l as u64)?;
    }
    for (q, count) in groups {
        if *count == 0 {
            continue;
        }
        for (r, &a) in rdp.iter_mut().zip(&ords) {
            *r += subsampled_rdp(a, *q, &|l| table[l as usize]) * *count as f64;
        }
    }
    Ok(rdp)
}

/// RDP over [`orders`] of `count` unsampled releases at `p` (`server`: against the server,
/// replace-one sensitivity; otherwise against observers of the model).
fn unsampled_rdp(p: &DistributedParams, count: u64, server: bool) -> Result<Vec<f64>, ParamsError> {
    orders()
        .into_iter()
        .map(|a| {
            let r = if server {
                p.rdp_server(a)?
            } else {
                p.rdp_model(a)?
            };
            Ok(r * count as f64)
        })
        .collect()
}

fn epsilon_of_rdp(rdp: &[f64], delta: f64) -> f64 {
    if rdp.iter().all(|r| *r == 0.0) {
        return 0.0;
    }
    let of: Vec<f64> = orders().iter().map(|a| *a as f64).collect();
    rdp_to_epsilon(&of, rdp, delta).0
}

/// Epsilon against observers of the models: the rounds at `p` in `(q, count)` groups
/// composed (RDP adds order by order) with `unsampled` releases at their own public
/// parameters, each `(params, count)` with every holder included (q = 1: the federated
/// feature statistics before round 1, a vector of `3d + classes` values with its own clip
/// and noise multiplier), converted at `delta - flip` as
/// [`model_epsilon_with_release_flip`] explains (`flip`: the rounds' release-decision
/// probability; none exists when it reaches delta).
pub fn model_epsilon_composed(
    p: &DistributedParams,
    groups: &[(f64, u64)],
    unsampled: &[(DistributedParams, u64)],
    delta: f64,
    flip: f64,
) -> Result<f64, DistributedAccountError> {
    p.validate()?;
    check_q_delta(1.0, delta)?;
    for (q, _) in groups {
        check_q_delta(*q, delta)?;
    }
    if flip.is_nan() || (flip > 0.0 && flip >= delta) {
        return Err(DistributedAccountError::ReleaseDecision { flip, delta });
    }
    let mut rdp = model_rdp(p, groups)?;
    for (u, count) in unsampled {
        u.validate()?;
        for (r, x) in rdp.iter_mut().zip(unsampled_rdp(u, *count, false)?) {
            *r += x;
        }
    }
    Ok(epsilon_of_rdp(&rdp, delta - flip.max(0.0)))
}

/// Epsilon against the server of a client that took part in `count` releases at each of
/// the `parts`' public parameters (no amplification, replace-one sensitivity; RDP adds
/// order by order): a client's training rounds and its feature statistics.
pub fn server_epsilon_composed(
    parts: &[(DistributedParams, u64)],
    delta: f64,
) -> Result<f64, DistributedAccountError> {
    check_q_delta(1.0, delta)?;
    let mut rdp = vec![0.0; orders().len()];
    for (p, count) in parts {
        p.validate()?;
        for (r, x) in rdp.iter_mut().zip(unsampled_rdp(p, *count, true)?) {
            *r += x;
        }
    }
    Ok(epsilon_of_rdp(&rdp, delta))
}

/// Epsilon against the server after the client took part in `participations` rounds.
pub fn server_epsilon(
    p: &DistributedParams,
    participations: u64,
    delta: f64,
) -> Result<f64, DistributedAccountError> {
    p.validate()?;
    server_epsilon_composed(&[(*p, participations)], delta)
}

/// Both epsilons: `rounds` released rounds at rate `q`, of which the client took part in
/// `participations`.
pub fn epsilons(
    p: &DistributedParams,
    q: f64,
    rounds: u64,
    participations: u64,
    delta: f64,
) -> Result<DistributedEpsilons, DistributedAccountError> {
    Ok(DistributedEpsilons {
        model_observers: model_epsilon(p, q, rounds, delta)?,
        server: server_epsilon(p, participations, delta)?,
    })
}

/// The continuous Gaussian with multiplier `z` under the same general subsampled bound:
/// the reference the distributed mechanisms approach as `bits` grow.
pub fn gaussian_generic_epsilon(
    z: f64,
    q: f64,
    rounds: u64,
    delta: f64,
) -> Result<f64, AccountError> {
    check_q_delta(q, delta)?;
    if !(z.is_finite() && z > 0.0) {
        return Err(AccountError::Domain {
            what: "noise multiplier",
            expected: "finite and > 0",
            got: z,
        });
    }
    let ords = orders();
    let rdp: Vec<f64> = ords
        .iter()
        .map(|&a| subsampled_rdp(a, q, &|l| l as f64 / (2.0 * z * z)) * rounds as f64)
        .collect();
    let of: Vec<f64> = ords.iter().map(|a| *a as f64).collect();
    Ok(rdp_to_epsilon(&of, &rdp, delta).0)
}

/// A node's own limits in distributed mode (it never takes them from the server).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharePolicy {
    /// Refuse rounds whose summed noise has a multiplier below this.
    pub min_noise_multiplier: f64,
    /// Refuse rounds that account the noise over fewer contributors than this: with a
    /// threshold of `n`, the node's own share carries `1/sqrt(n)` of the noise, which is
    /// all that is left if the other contributors collude with the server.
    pub min_contributors: usize,
    /// Refuse rounds that would bring the node's epsilon against the server above this.
    pub max_server_epsilon: Option<f64>,
    /// delta of the node's figures.
    pub delta: f64,
}

/// Why a node refuses to add its share.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ShareRefusal {
    /// The parameters are unusable.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// Too little noise.
    #[error("noise multiplier {asked} is below this node's minimum {min}")]
    NoiseTooLow {
        /// Asked by the server.
        asked: f64,
        /// The node's floor.
        min: f64,
    },
    /// Noise accounted over too few contributors.
    #[error("the round accepts sums of {asked} contributors, below this node's minimum {min}")]
    TooFewContributors {
        /// The round's threshold.
        asked: usize,
        /// The node's floor.
        min: usize,
    },
    /// One more participation would exceed the node's budget.
    #[error("one more round would bring this node's epsilon against the server to {next:.4}, above its budget {max}")]
    Exhausted {
        /// After this round.
        next: f64,
        /// The ceiling.
        max: f64,
    },
    /// Accounting failed.
    #[error("privacy accounting: {0}")]
    Account(String),
}

/// Checks a round's public distributed-DP parameters before the node adds its share:
/// the noise floor, the contributor floor, then the node's epsilon against the server
/// after taking part in `participations_so_far + 1` rounds at these parameters, which it
/// returns. (Recording distributed releases in the node's persisted books, and composing
/// them with its other spends, belongs to the network wiring.)
pub fn check_share(
    policy: &SharePolicy,
    params: &DistributedParams,
    participations_so_far: u64,
) -> Result<f64, ShareRefusal> {
    params.validate()?;
    let z = params.noise_multiplier;
    if z.is_nan() || z < policy.min_noise_multiplier {
        return Err(ShareRefusal::NoiseTooLow {
            asked: z,
            min: policy.min_noise_multiplier,
        });
    }
    if params.min_contributors < policy.min_contributors {
        return Err(ShareRefusal::TooFewContributors {
            asked: params.min_contributors,
            min: policy.min_contributors,
        });
    }
    let next = server_epsilon(
        params,
        participations_so_far.saturating_add(1),
        policy.delta,
    )
    .map_err(|e| ShareRefusal::Account(e.to_string()))?;
    if let Some(max) = policy.max_server_epsilon {
        if next > max {
            return Err(ShareRefusal::Exhausted { next, max });
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference point.
    fn reference(mechanism: Mechanism, bits: u32) -> DistributedParams {
        DistributedParams {
            mechanism,
            bits,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            min_contributors: 100,
            max_contributors: 100,
            dim: 1 << 18,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        }
    }

    #[test]
    fn reference_point_skellam_16_bits() {
        // d = 2^18, C = 1, delta = 1e-5, beta = e^-0.5, 3 s.d. headroom, n = 100,
        // q = 0.01, T = 1,000, z = 1: 2.452 (issue 12, from the papers' formulas as the
        // google-research accounting utilities compute them); the continuous Gaussian
        // under the same general subsampling bound: 2.450.
        let p = reference(Mechanism::Skellam, 16);
        let s = p.scale().unwrap();
        // s = sqrt(((2^15 / 3)^2 - 25) / (1e4 / 2^18 + 1)), by hand: 10,720.1
        assert!((s - 10_720.1).abs() < 0.1, "{s}");
        let eps = model_epsilon(&p, 0.01, 1000, 1e-5).unwrap();
        assert!((eps - 2.452).abs() < 0.02 * 2.452, "{eps}");
        assert!(
            (eps - 2.452).abs() < 0.001,
            "{eps}: the same formulas give 2.4522"
        );
        let g = gaussian_generic_epsilon(1.0, 0.01, 1000, 1e-5).unwrap();
        assert!((g - 2.450).abs() < 0.001, "{g}");
        assert!(eps > g);
    }

    #[test]
    fn binomial_pmf_matches_exact_values() {
        // C(10, 3) 0.3^3 0.7^7 = 120 * 0.027 * 0.0823543 (by hand).
        let p = ln_binomial_pmf(10, 3, 0.3).exp();
        assert!((p - 0.266_827_932).abs() < 1e-9, "{p}");
        assert!((ln_binomial_pmf(10, 0, 0.3).exp() - 0.7f64.powi(10)).abs() < 1e-15);
        assert!((ln_binomial_pmf(10, 10, 0.3).exp() - 0.3f64.powi(10)).abs() < 1e-15);
        assert_eq!(ln_binomial_pmf(10, 11, 0.3), f64::NEG_INFINITY);
        let total: f64 = (0..=999).map(|k| ln_binomial_pmf(999, k, 0.1).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
    }

    #[test]
    fn release_flip_probability_is_the_binomial_mass_at_the_decision_edges() {
        // Population 11, q = 1/2: the other 10 clients' count is Binomial(10, 1/2); with
        // m = 3 and max 10 the decision can change for k in {2, 3} and k = 10:
        // (45 + 120 + 1) / 1024, times q.
        let mut p = reference(Mechanism::Skellam, 16);
        p.min_contributors = 3;
        p.max_contributors = 10;
        let f = release_flip_probability(11, 0.5, &default_release_edges(&p));
        assert!((f - 0.5 * 166.0 / 1024.0).abs() < 1e-12, "{f}");
        // Everyone sampled (q = 1): the count is fixed (10 others), nothing flips unless
        // it sits on an edge: at the ceiling 10 one more client stops every release.
        assert_eq!(
            release_flip_probability(11, 1.0, &default_release_edges(&p)),
            1.0
        );
        p.max_contributors = 20;
        assert_eq!(
            release_flip_probability(11, 1.0, &default_release_edges(&p)),
            0.0
        );
        p.min_contributors = 10;
        assert_eq!(
            release_flip_probability(11, 1.0, &default_release_edges(&p)),
            1.0
        );
        // m = 2: the smallest released count is 3 either way (one edge, counted once).
        p.min_contributors = 2;
        let f2 = release_flip_probability(11, 0.5, &default_release_edges(&p));
        assert!((f2 - 0.5 * 45.0 / 1024.0).abs() < 1e-12, "{f2}");
        p.min_contributors = 3;
        // Far from the expected count (1,000 clients at q = 0.1: about 100 sampled), a
        // threshold of 40 and a ceiling of 200 almost never decide (exact: 2.787e-13; a
        // ceiling of 150 alone, 1.62e-8 per round). Reference values: Python's exact
        // math.comb.
        p.min_contributors = 40;
        p.max_contributors = 200;
        let f40 = release_flip_probability(1000, 0.1, &default_release_edges(&p));
        assert!((f40 - 9.642_625_443e-14).abs() < 1e-21, "{f40}");
        // At 80 the decision flips in about 8 rounds in 10,000 (exact: 7.920006343e-4).
        p.min_contributors = 80;
        let f80 = release_flip_probability(1000, 0.1, &default_release_edges(&p));
        assert!((f80 - 7.920_006_343e-4).abs() < 1e-12, "{f80}");
    }

    #[test]
    fn the_release_decision_is_inside_epsilon_or_no_epsilon_is_claimed() {
        let p = reference(Mechanism::Skellam, 16);
        let groups = [(0.01, 1000u64)];
        let plain = model_epsilon_of_rounds(&p, &groups, 1e-5).unwrap();
        assert_eq!(
            model_epsilon_with_release_flip(&p, &groups, 1e-5, 0.0).unwrap(),
            plain
        );
        // The flip is paid out of delta: epsilon at delta - flip.
        let tiny = model_epsilon_with_release_flip(&p, &groups, 1e-5, 1e-14).unwrap();
        assert!(tiny >= plain && tiny < plain * 1.001, "{tiny} vs {plain}");
        let half = model_epsilon_with_release_flip(&p, &groups, 1e-5, 5e-6).unwrap();
        assert_eq!(half, model_epsilon_of_rounds(&p, &groups, 5e-6).unwrap());
        assert!(half > tiny);
        // A flip of the size of delta leaves nothing: an error, never a figure.
        let e = model_epsilon_with_release_flip(&p, &groups, 1e-5, 1e-5).unwrap_err();
        assert!(
            matches!(e, DistributedAccountError::ReleaseDecision { .. }),
            "{e}"
        );
    }

    #[test]
    fn more_bits_approach_the_gaussian_and_fewer_cost_more() {
        let g = gaussian_generic_epsilon(1.0, 0.01, 1000, 1e-5).unwrap();
        for m in [Mechanism::Skellam, Mechanism::Ddgauss] {
            let e: Vec<f64> = [10u32, 12, 16, 20]
                .iter()
                .map(|b| model_epsilon(&reference(m, *b), 0.01, 1000, 1e-5).unwrap())
                .collect();
            for w in e.windows(2) {
                assert!(w[0] >= w[1], "{m}: {e:?}");
            }
            assert!((e[3] - g).abs() < 0.01, "{m}: {e:?} vs {g}");
            assert!(e[0] > g, "{m}: {e:?}");
        }
    }

    #[test]
    fn skellam_rdp_matches_hand_computation() {
        // alpha = 2 at the reference: mu = s^2, D2 = R, D1 = R sqrt(d).
        let p = reference(Mechanism::Skellam, 16);
        let s = p.scale().unwrap();
        let d = (1u64 << 18) as f64;
        let sq = s * s + d / 4.0 + (2.0f64 * 0.5).sqrt() * (s + d.sqrt() / 2.0);
        let r = sq.sqrt();
        let l1 = r * d.sqrt();
        let mu = s * s;
        let want = 2.0 * r * r / (2.0 * mu)
            + ((3.0 * r * r + 6.0 * l1) / (4.0 * mu * mu)).min(3.0 * l1 / (2.0 * mu));
        assert!((p.rdp_model(2).unwrap() - want).abs() < 1e-12 * want);
    }

    #[test]
    fn ddgauss_rdp_matches_hand_computation() {
        // Reference point: n sigma_i^2 = s^2 and tau = 10 * 99 * exp(-2 pi^2 s^2/100 * k/(k+1))
        // underflows to 0, so Prop. 14 is alpha/2 (R/s)^2 at every alpha.
        let p = reference(Mechanism::Ddgauss, 16);
        let s = p.scale().unwrap();
        let r = p.rounded_l2().unwrap();
        for a in [2u64, 7, 100] {
            let want = a as f64 / 2.0 * (r / s).powi(2);
            assert!((p.rdp_model(a).unwrap() - want).abs() < 1e-12 * want);
        }
        // With one contributor there is no sum of shares: tau = 0 exactly as well.
        let mut one = p;
        one.min_contributors = 1;
        one.max_contributors = 1;
        let s1 = one.scale().unwrap();
        let r1 = one.rounded_l2().unwrap();
        assert!((one.rdp_model(2).unwrap() - (r1 / s1).powi(2)).abs() < 1e-12);
    }

    #[test]
    fn subsampling_at_rate_one_is_the_mechanism() {
        let f = |l: u64| l as f64 * 0.3;
        for a in [2u64, 5, 40] {
            assert_eq!(subsampled_rdp(a, 1.0, &f), f(a));
            assert!(subsampled_rdp(a, 0.1, &f) < f(a));
        }
    }

    #[test]
    fn server_sees_more_than_model_observers() {
        let p = reference(Mechanism::Skellam, 16);
        let e = epsilons(&p, 0.01, 1000, 10, 1e-5).unwrap();
        // 10 unamplified rounds at sensitivity 2 (z_eff = 1/2) vs 1,000 rounds at q = 0.01.
        assert!(e.server > e.model_observers, "{e:?}");
        // Gaussian with multiplier 1/2, 10 rounds: RDP 2 alpha * 10, conversion by hand at
        // the optimum is about 20 + 2 sqrt(20 ln(1e5)) ~ 50; the discretisation adds little.
        assert!(e.server > 40.0 && e.server < 60.0, "{e:?}");
        assert_eq!(server_epsilon(&p, 0, 1e-5).unwrap(), 0.0);
    }

    #[test]
    fn dropouts_are_accounted_at_the_minimum() {
        // Fewer accepted contributors: each share must carry more noise (in units of the
        // update, share variance / s^2 = (zC)^2 / n_min) so that n_min shares alone still
        // have multiplier z; the scale shrinks because more noise must fit the range.
        let mut p = reference(Mechanism::Skellam, 16);
        let (v100, s100) = (p.share_variance().unwrap(), p.scale().unwrap());
        p.min_contributors = 50;
        let (v50, s50) = (p.share_variance().unwrap(), p.scale().unwrap());
        assert!((v100 / (s100 * s100) - 1.0 / 100.0).abs() < 1e-12);
        assert!((v50 / (s50 * s50) - 1.0 / 50.0).abs() < 1e-12);
        assert!(s50 < s100);
        // and the epsilon is that of z over the minimum: it does not depend on n_min
        // beyond rounding effects
        let e50 = model_epsilon(&p, 0.01, 1000, 1e-5).unwrap();
        assert!((e50 - 2.452).abs() < 0.01, "{e50}");
    }

    #[test]
    fn refuses_bad_parameters() {
        let mut p = reference(Mechanism::Skellam, 3);
        assert!(matches!(p.validate(), Err(ParamsError::TooFewBits { .. })));
        p.bits = 16;
        p.beta = 1.0;
        assert!(p.validate().is_err());
        p.beta = 0.5;
        p.max_contributors = 10;
        assert!(p.validate().is_err());
        assert!("gauss".parse::<Mechanism>().is_err());
        assert_eq!("ddgauss".parse::<Mechanism>().unwrap(), Mechanism::Ddgauss);
    }

    #[test]
    fn heterogeneous_rounds_compose() {
        let p = reference(Mechanism::Skellam, 16);
        let one = model_epsilon_of_rounds(&p, &[(0.01, 1000)], 1e-5).unwrap();
        let split = model_epsilon_of_rounds(&p, &[(0.01, 400), (0.01, 600)], 1e-5).unwrap();
        assert!((one - split).abs() < 1e-9);
        let more = model_epsilon_of_rounds(&p, &[(0.01, 1000), (0.02, 10)], 1e-5).unwrap();
        assert!(more > one);
        assert_eq!(model_epsilon_of_rounds(&p, &[], 1e-5).unwrap(), 0.0);
        assert!(model_epsilon_of_rounds(&p, &[(0.0, 1)], 1e-5).is_err());
    }

    #[test]
    fn node_checks_its_share_against_its_own_policy() {
        let p = reference(Mechanism::Skellam, 16);
        let policy = SharePolicy {
            min_noise_multiplier: 1.0,
            min_contributors: 50,
            max_server_epsilon: Some(60.0),
            delta: 1e-5,
        };
        // 10 rounds at z = 1, replace-one: about 50 (see server_sees_more_than_model_observers)
        let e = check_share(&policy, &p, 9).unwrap();
        assert_eq!(e, server_epsilon(&p, 10, 1e-5).unwrap());
        assert!(matches!(
            check_share(&policy, &p, 20),
            Err(ShareRefusal::Exhausted { .. })
        ));
        let mut low = p;
        low.noise_multiplier = 0.5;
        assert!(matches!(
            check_share(&policy, &low, 0),
            Err(ShareRefusal::NoiseTooLow { .. })
        ));
        let mut few = p;
        few.min_contributors = 10;
        few.max_contributors = 100;
        assert!(matches!(
            check_share(&policy, &few, 0),
            Err(ShareRefusal::TooFewContributors { asked: 10, min: 50 })
        ));
        let mut bad = p;
        bad.bits = 1;
        assert!(matches!(
            check_share(&policy, &bad, 0),
            Err(ShareRefusal::Params(_))
        ));
    }

    /// Public parameters of a federated feature statistics release: `features` features and
    /// `classes` classes (a vector of `3d + classes`, clip `sqrt(3d + 1)`).
    fn statistics(features: usize, classes: usize, z: f64, bits: u32) -> DistributedParams {
        DistributedParams {
            mechanism: Mechanism::Skellam,
            bits,
            clip_norm: ((3 * features + 1) as f64).sqrt(),
            noise_multiplier: z,
            min_contributors: 3,
            max_contributors: 10,
            dim: 3 * features + classes,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        }
    }

    #[test]
    fn statistics_release_at_known_parameters_matches_a_hand_computation() {
        // d = 4 features, 2 classes: 14 values padded to 16, C = sqrt(13), z = 2, m = 3,
        // N = 10, 16 bits. Everything below is computed here from the papers' formulas,
        // not with the functions under test.
        let p = statistics(4, 2, 2.0, 16);
        let (d, c, z, m, big_n) = (16.0f64, 13f64.sqrt(), 2.0f64, 3.0f64, 10.0f64);
        let range = 2f64.powi(15) / 3.0;
        let s = ((range * range - big_n / 4.0)
            / (c * c * big_n * big_n / d + z * z * c * c * big_n / m))
            .sqrt();
        assert!((p.scale().unwrap() - s).abs() < 1e-9 * s);
        let l2 = s * c;
        let r = (l2 + d.sqrt())
            .min((l2 * l2 + d / 4.0 + (2.0f64 * 0.5).sqrt() * (l2 + d.sqrt() / 2.0)).sqrt());
        let l1 = r * d.sqrt().min(r);
        // The summed noise of m shares: variance (z C s)^2.
        let mu = (z * c * s).powi(2);
        let skellam = |a: f64, l2: f64, l1: f64| {
            a * l2 * l2 / (2.0 * mu)
                + (((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu))
                    .min(3.0 * l1 / (2.0 * mu))
        };
        let delta: f64 = 1e-5;
        let convert = |rdp: &dyn Fn(f64) -> f64| {
            let mut best = f64::INFINITY;
            for a in (2..=128).chain([256]) {
                let a = a as f64;
                let e = rdp(a) + (1.0 - 1.0 / a).ln() - (delta.ln() + a.ln()) / (a - 1.0);
                best = best.min(e);
            }
            best
        };
        // One release, observers of the transform (add/remove: R, D1).
        let want = convert(&|a| skellam(a, r, l1));
        let got = model_epsilon_composed(&p, &[], &[(p, 1)], delta, 0.0).unwrap();
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        // Against the server (replace-one: 2R, 2 D1).
        let want = convert(&|a| skellam(a, 2.0 * r, 2.0 * l1));
        let got = server_epsilon_composed(&[(p, 1)], delta).unwrap();
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        // z = 2 Gaussian, one release: RDP alpha / 8; the 16-bit discretisation costs a
        // little more, never less.
        let gauss = convert(&|a| a / 8.0);
        let model = model_epsilon_composed(&p, &[], &[(p, 1)], delta, 0.0).unwrap();
        assert!(model > gauss && model < 1.05 * gauss, "{model} vs {gauss}");
    }

    #[test]
    fn statistics_compose_with_training_like_one_more_gaussian_step() {
        // At 40 bits the discrete mechanisms are the Gaussian up to a hair: statistics at
        // z = 2 composed with 9 unsampled training rounds at z = 2 are 10 Gaussian steps at
        // z = 2, which dp_accounting 0.6.0 puts at 8.079 (RDP, improved conversion, delta =
        // 1e-5; DESIGN.md's table). Integer orders only (its optimum, near 4.3, is
        // fractional): a hair above.
        let st = statistics(4, 2, 2.0, 40);
        let mut train = st;
        train.dim = 1000;
        train.clip_norm = 1.0;
        let e = model_epsilon_composed(&train, &[(1.0, 9)], &[(st, 1)], 1e-5, 0.0).unwrap();
        assert!((8.079..8.079 * 1.01).contains(&e), "{e}");
        // The statistics alone at z = 1: one step, 4.729 in the same table.
        let mut st1 = st;
        st1.noise_multiplier = 1.0;
        let one = model_epsilon_composed(&train, &[], &[(st1, 1)], 1e-5, 0.0).unwrap();
        assert!((4.729..4.729 * 1.01).contains(&one), "{one}");
        // Nothing released, nothing spent; no statistics: the rounds' figure unchanged.
        assert_eq!(
            model_epsilon_composed(&train, &[], &[(st, 0)], 1e-5, 0.0).unwrap(),
            0.0
        );
        assert_eq!(
            model_epsilon_composed(&train, &[(0.1, 50)], &[], 1e-5, 0.0).unwrap(),
            model_epsilon(&train, 0.1, 50, 1e-5).unwrap()
        );
        // Against the server: replace-one, multiplier z/2 = 1 per step, 10 steps: RDP
        // 10 alpha / 2 at the Gaussian limit, converted by hand over the same orders.
        let server = server_epsilon_composed(&[(train, 9), (st, 1)], 1e-5).unwrap();
        let mut want = f64::INFINITY;
        for a in (2..=128).chain([256]) {
            let a = a as f64;
            want = want.min(5.0 * a + (1.0 - 1.0 / a).ln() - (1e-5f64.ln() + a.ln()) / (a - 1.0));
        }
        assert!((want..want * 1.01).contains(&server), "{server} vs {want}");
        // A release decision that depends on one client too often leaves no figure.
        assert!(matches!(
            model_epsilon_composed(&train, &[(1.0, 1)], &[(st, 1)], 1e-5, 2e-5),
            Err(DistributedAccountError::ReleaseDecision { .. })
        ));
    }
}
