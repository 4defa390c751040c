//! Privacy accounting.
//!
//! - [`RdpAccountant`]: Rényi DP of the Poisson-subsampled Gaussian mechanism (Mironov,
//!   Talwar, Zhang 2019) at integer and fractional orders, composed by addition, converted
//!   to (epsilon, delta) with the improved bound of Balle et al. 2020 (as `dp_accounting`
//!   does).
//! - [`zcdp_epsilon`]: for unsampled rounds, opendp's Gaussian privacy map, zCDP
//!   composition and zCDP -> (epsilon, delta) conversion.
//! - [`super::pld`]: the privacy loss distribution of the Poisson-sampled Gaussian
//!   (discretised pessimistically, composed by FFT): the tightest of the three, usually
//!   10 to 40 % below RDP.
//! - [`epsilon`], [`epsilon_of_rounds`]: the tightest of the bounds that apply; a bound
//!   that cannot be computed (opendp's arithmetic overflowing, a PLD grid over its
//!   budget) is skipped, never an error, since each bound is valid on its own.
//!
//! Noise multipliers are in units of the sensitivity: a Gaussian mechanism with L2
//! sensitivity `s*C` and noise `z*C` is accounted as multiplier `z/s`.

use opendp::combinators::{make_composition, make_fix_delta, make_zCDP_to_approxDP};
use opendp::domains::AtomDomain;
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::AbsoluteDistance;

use super::pld::{self, PldError};

/// Why an accounting question has no answer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AccountError {
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
    /// No noise multiplier in the search range reaches the target.
    #[error("no noise multiplier up to {max} reaches epsilon {target}")]
    Unreachable {
        /// Target epsilon.
        target: f64,
        /// Largest multiplier tried.
        max: f64,
    },
    /// opendp failed.
    #[error("opendp: {0}")]
    OpenDp(String),
    /// The PLD accountant was asked for and has no answer.
    #[error("PLD accountant: {0}")]
    Pld(#[from] PldError),
    /// The distributed-DP accountant ([`super::distributed`]) has no answer.
    #[error("distributed DP accounting: {0}")]
    Distributed(String),
}

fn domain(
    ok: bool,
    what: &'static str,
    expected: &'static str,
    got: f64,
) -> Result<(), AccountError> {
    if ok {
        Ok(())
    } else {
        Err(AccountError::Domain {
            what,
            expected,
            got,
        })
    }
}

fn check_params(q: f64, z: f64) -> Result<(), AccountError> {
    // q = 0 is not a round at all: a release that sampled nobody by construction is a
    // configuration error, not a free round.
    domain(q > 0.0 && q <= 1.0, "sampling rate", "in (0, 1]", q)?;
    domain(
        z.is_finite() && z > 0.0,
        "noise multiplier",
        "finite and > 0",
        z,
    )
}

fn check_delta(delta: f64) -> Result<(), AccountError> {
    domain(delta > 0.0 && delta < 1.0, "delta", "in (0, 1)", delta)
}

/// The orders used by default: 1.1 to 10.9 in steps of 0.1, 11 to 256, 512 and 1024
/// (a superset of `dp_accounting`'s defaults).
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    v.extend((11..=256).map(|x| x as f64));
    v.extend([512.0, 1024.0]);
    v
}

fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

fn log_sub(a: f64, b: f64) -> f64 {
    // log(exp(a) - exp(b)), requires a >= b.
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// log(erfc(x)), accurate in the far tail where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        libm::erfc(x).ln()
    } else {
        // Asymptotic expansion: erfc(x) ~ exp(-x^2)/(x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4)).
        let x2 = x * x;
        -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln()
            + (1.0 - 0.5 / x2 + 0.75 / (x2 * x2) - 1.875 / (x2 * x2 * x2)).ln()
    }
}

fn log_a_int(q: f64, z: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let a = alpha as f64;
    for i in 0..=alpha {
        let k = i as f64;
        let log_binom = libm::lgamma(a + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(a - k + 1.0);
        let s = log_binom + k * q.ln() + (a - k) * (1.0 - q).ln() + (k * k - k) / (2.0 * z * z);
        log_a = log_add(log_a, s);
    }
    log_a
}

fn log_a_frac(q: f64, z: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let (mut log_coef, mut coef_sign) = (0.0f64, 1.0f64); // binom(alpha, 0) = 1
    let mut i = 0u64;
    loop {
        let k = i as f64;
        let j = alpha - k;
        let log_t0 = log_coef + k * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + k * (1.0 - q).ln();
        let log_e0 = 0.5f64.ln() + log_erfc((k - z0) / (std::f64::consts::SQRT_2 * z));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * z));
        let log_s0 = log_t0 + (k * k - k) / (2.0 * z * z) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * z * z) + log_e1;
        if coef_sign > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_s0.max(log_s1) < -30.0 || i > 100_000 {
            break;
        }
        // binom(alpha, i+1) = binom(alpha, i) * (alpha - i) / (i + 1)
        let factor = alpha - k;
        if factor == 0.0 {
            break;
        }
        if factor < 0.0 {
            coef_sign = -coef_sign;
        }
        log_coef += factor.abs().ln() - (k + 1.0).ln();
        i += 1;
    }
    log_add(log_a0, log_a1)
}

/// RDP of one step of the Poisson-subsampled Gaussian at order `alpha > 1`.
pub fn rdp_sampled_gaussian(q: f64, z: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if q == 1.0 {
        return alpha / (2.0 * z * z);
    }
    if z.is_infinite() {
        return 0.0;
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, z, alpha as u64)
    } else {
        log_a_frac(q, z, alpha)
    };
    log_a / (alpha - 1.0)
}

/// Converts RDP at several orders to epsilon at `delta` (improved conversion), returning
/// (epsilon, best order).
pub fn rdp_to_epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if delta * delta + (-r).exp_m1() >= 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Accumulates RDP over steps that may differ in sampling rate and noise.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl RdpAccountant {
    /// An empty accountant over the given orders (each > 1).
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Adds `steps` steps of the sampled Gaussian with rate `q` and multiplier `z`.
    pub fn compose(&mut self, q: f64, z: f64, steps: u64) -> Result<(), AccountError> {
        check_params(q, z)?;
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_sampled_gaussian(q, z, a);
        }
        Ok(())
    }

    /// Epsilon at `delta` so far.
    pub fn epsilon(&self, delta: f64) -> Result<f64, AccountError> {
        check_delta(delta)?;
        Ok(rdp_to_epsilon(&self.orders, &self.rdp, delta).0)
    }
}

/// Epsilon of `steps` Poisson-sampled Gaussian steps by RDP.
pub fn rdp_epsilon(q: f64, z: f64, steps: u64, delta: f64) -> Result<f64, AccountError> {
    let mut acc = RdpAccountant::default();
    acc.compose(q, z, steps)?;
    acc.epsilon(delta)
}

/// Epsilon of unsampled Gaussian rounds via opendp: one Gaussian measurement per round
/// (multiplier `z_i`, sensitivity 1), composed in zCDP, converted to (epsilon, delta).
pub fn zcdp_epsilon(multipliers: &[f64], delta: f64) -> Result<f64, AccountError> {
    let groups: Vec<(f64, u64)> = multipliers.iter().map(|z| (*z, 1)).collect();
    zcdp_epsilon_grouped(&groups, delta)
}

/// As [`zcdp_epsilon`] for `(z, n)` groups: `n` rounds at multiplier `z` each. Memory and
/// time do not depend on `n` (a billion rounds cost what one does).
pub fn zcdp_epsilon_grouped(groups: &[(f64, u64)], delta: f64) -> Result<f64, AccountError> {
    super::hook::with_opendp(|| zcdp_epsilon_unguarded(groups, delta))
}

fn zcdp_epsilon_unguarded(groups: &[(f64, u64)], delta: f64) -> Result<f64, AccountError> {
    check_delta(delta)?;
    let od = |e: opendp::error::Error| AccountError::OpenDp(e.to_string());
    // n identical Gaussian rounds have rho = n / (2 z^2), the rho of one round with
    // multiplier z / sqrt(n): opendp composes one measurement per distinct multiplier.
    let mut merged: Vec<(f64, u64)> = Vec::new();
    for &(z, n) in groups {
        check_params(1.0, z)?;
        if n == 0 {
            continue;
        }
        match merged.iter_mut().find(|(g, _)| *g == z) {
            Some((_, m)) => *m = m.saturating_add(n),
            None => merged.push((z, n)),
        }
    }
    if merged.is_empty() {
        return Ok(0.0);
    }
    merged.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rounds = Vec::with_capacity(merged.len());
    for (z, n) in merged {
        let z = z / (n as f64).sqrt();
        rounds.push(
            make_gaussian::<_, _, ZeroConcentratedDivergence>(
                AtomDomain::<f64>::new_non_nan(),
                AbsoluteDistance::<f64>::default(),
                z,
                None,
            )
            .map_err(od)?,
        );
    }
    let composed = make_composition(rounds).map_err(od)?;
    let approx = make_zCDP_to_approxDP(composed).map_err(od)?;
    let fixed = make_fix_delta(&approx, delta).map_err(od)?;
    let (eps, _) = fixed.map(&1.0).map_err(od)?;
    Ok(eps)
}

/// What one release of a mode counts as, as (sampling rate, noise multiplier in units of
/// the sensitivity), for a client's data against the adversary the mode names:
/// - `local`: against the server, the update can be anything in the C-ball, so the
///   sensitivity is 2C against noise zC (multiplier z/2), and there is no amplification by
///   sampling (the server knows who was sampled);
/// - `central` (and `distributed`): the sampled Gaussian at rate q with multiplier z.
pub fn release_step(mode: crate::config::DpMode, q: f64, z: f64) -> (f64, f64) {
    match mode {
        crate::config::DpMode::Local => (1.0, z / 2.0),
        _ => (q, z),
    }
}

/// Which bound produced a reported epsilon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// RDP of the subsampled Gaussian.
    Rdp,
    /// opendp zCDP (no amplification by sampling).
    Zcdp,
    /// Privacy loss distribution of the subsampled Gaussian ([`super::pld`]).
    Pld,
}

/// Which accountant answers: one bound, or the tightest of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accountant {
    /// The smallest of RDP, opendp zCDP and PLD (each is a valid upper bound).
    #[default]
    Best,
    /// RDP of the subsampled Gaussian alone.
    Rdp,
    /// The privacy loss distribution alone (an error where it has no answer).
    Pld,
}

/// Every bound on the epsilon of a set of rounds; `None` where a bound has no answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// RDP with amplification by sampling (always available).
    pub rdp: f64,
    /// opendp zCDP, ignoring sampling; `None` when opendp's arithmetic failed.
    pub zcdp: Option<f64>,
    /// PLD; the error when it has no answer (e.g. a grid over its budget).
    pub pld: Result<f64, PldError>,
}

impl Bounds {
    /// The smallest available bound and which it is (ties go to RDP, then zCDP).
    pub fn best(&self) -> (f64, Method) {
        let mut best = (self.rdp, Method::Rdp);
        if let Some(z) = self.zcdp {
            if z < best.0 {
                best = (z, Method::Zcdp);
            }
        }
        if let Ok(p) = self.pld {
            if p < best.0 {
                best = (p, Method::Pld);
            }
        }
        best
    }

    /// The answer of `accountant`.
    pub fn pick(&self, accountant: Accountant) -> Result<(f64, Method), AccountError> {
        match accountant {
            Accountant::Best => Ok(self.best()),
            Accountant::Rdp => Ok((self.rdp, Method::Rdp)),
            Accountant::Pld => match &self.pld {
                Ok(p) => Ok((*p, Method::Pld)),
                Err(e) => Err(AccountError::Pld(e.clone())),
            },
        }
    }
}

fn check_groups(groups: &[(f64, f64, u64)], delta: f64) -> Result<(), AccountError> {
    check_delta(delta)?;
    for &(q, z, _) in groups {
        check_params(q, z)?;
    }
    Ok(())
}

/// Every bound for heterogeneous rounds given as `(q, z, count)` groups. Time and memory
/// grow with the number of groups, never with the counts (the PLD's work is bounded by
/// its grid budget and it gives up rather than exceed it).
pub fn bounds_of_rounds(groups: &[(f64, f64, u64)], delta: f64) -> Result<Bounds, AccountError> {
    check_groups(groups, delta)?;
    if groups.iter().all(|g| g.2 == 0) {
        return Ok(Bounds {
            rdp: 0.0,
            zcdp: Some(0.0),
            pld: Ok(0.0),
        });
    }
    let mut rdp = RdpAccountant::default();
    for &(q, z, n) in groups {
        rdp.compose(q, z, n)?;
    }
    let rdp = rdp.epsilon(delta)?;
    // opendp's exact arithmetic can overflow at extreme parameters (a multiplier far below
    // 1 composed over millions of rounds); the other bounds are valid on their own, so a
    // failed zCDP evaluation only means there is no tighter bound to take.
    let zs: Vec<(f64, u64)> = groups.iter().map(|&(_, z, n)| (z, n)).collect();
    let zcdp = zcdp_epsilon_grouped(&zs, delta).ok();
    let pld = pld::pld_epsilon(groups, delta);
    Ok(Bounds { rdp, zcdp, pld })
}

/// Epsilon of `steps` rounds with rate `q` and multiplier `z`: the tightest of RDP (with
/// amplification by sampling), opendp's zCDP (which ignores sampling and so is valid for
/// any `q`) and the PLD.
pub fn epsilon(q: f64, z: f64, steps: u64, delta: f64) -> Result<(f64, Method), AccountError> {
    epsilon_of_rounds(&[(q, z, steps)], delta)
}

/// Epsilon of heterogeneous rounds given as `(q, z, count)` groups: the tightest of RDP
/// (every group amplified by its sampling rate), opendp's zCDP (no amplification) and the
/// PLD; a bound that has no answer is skipped.
pub fn epsilon_of_rounds(
    groups: &[(f64, f64, u64)],
    delta: f64,
) -> Result<(f64, Method), AccountError> {
    epsilon_of_rounds_with(groups, delta, Accountant::Best)
}

/// As [`epsilon_of_rounds`] with the answering accountant chosen.
pub fn epsilon_of_rounds_with(
    groups: &[(f64, f64, u64)],
    delta: f64,
    accountant: Accountant,
) -> Result<(f64, Method), AccountError> {
    match accountant {
        Accountant::Best => bounds_of_rounds(groups, delta)?.pick(accountant),
        // One bound only: skip computing the others.
        Accountant::Rdp => {
            check_groups(groups, delta)?;
            let mut rdp = RdpAccountant::default();
            for &(q, z, n) in groups {
                rdp.compose(q, z, n)?;
            }
            Ok((rdp.epsilon(delta)?, Method::Rdp))
        }
        Accountant::Pld => {
            check_groups(groups, delta)?;
            Ok((pld::pld_epsilon(groups, delta)?, Method::Pld))
        }
    }
}

/// The smallest noise multiplier (to 1e-4 relative, rounded up) whose epsilon after
/// `steps` rounds at rate `q`, by `accountant`, does not exceed `target`.
pub fn noise_for_epsilon(
    q: f64,
    steps: u64,
    delta: f64,
    target: f64,
    accountant: Accountant,
) -> Result<f64, AccountError> {
    domain(
        target.is_finite() && target > 0.0,
        "target epsilon",
        "finite and > 0",
        target,
    )?;
    domain(steps > 0, "steps", ">= 1", steps as f64)?;
    check_params(q, 1.0)?;
    // A multiplier the accountant cannot certify (a PLD grid over its budget at a tiny
    // multiplier) counts as missing the target: the search only returns certified ones.
    let eps_at = |z: f64| match epsilon_of_rounds_with(&[(q, z, steps)], delta, accountant) {
        Ok((e, _)) => Ok(e),
        Err(AccountError::Pld(_)) => Ok(f64::INFINITY),
        Err(e) => Err(e),
    };
    let (mut lo, mut hi) = (0.05f64, 1.0f64);
    while eps_at(hi)? > target {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return Err(AccountError::Unreachable { target, max: hi });
        }
    }
    if eps_at(lo)? <= target {
        return Ok(lo);
    }
    while (hi - lo) / hi > 1e-5 {
        let mid = 0.5 * (lo + hi);
        if eps_at(mid)? > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // Round up to 4 decimals so the printed value still meets the target (checked: the
    // PLD's grid moves with z, so its epsilon is monotone in z only up to tiny jitter).
    let mut z = (hi * 1e4).ceil() / 1e4;
    for _ in 0..100 {
        if eps_at(z)? <= target {
            return Ok(z);
        }
        z = ((z + 1e-4) * 1e4).round() / 1e4;
    }
    Err(AccountError::Unreachable { target, max: z })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from dp_accounting 0.6.0 (add/remove neighbours, delta = 1e-5):
    /// (q, z, T, RDP accountant, PLD accountant). The first six are DESIGN.md section 4;
    /// the PLD column unrounded (DESIGN.md's 2.855 and 91.82 are 2.8545 and 91.8173).
    const REFERENCE: [(f64, f64, u64, f64, f64); 9] = [
        (1.0, 1.0, 1, 4.729, 4.377178100048),
        (1.0, 1.0, 100, 96.12, 91.817289818102),
        (1.0, 2.0, 10, 8.079, 7.511275931205),
        (0.1, 1.0, 10, 3.442, 2.854518966587),
        (0.1, 1.0, 100, 7.904, 7.046602877208),
        (0.1, 2.0, 100, 2.581, 2.337400192580),
        (0.01, 0.8, 1000, 3.696, 3.141018319265),
        (0.001, 1.0, 10_000, 0.788, 0.475987012594),
        (256.0 / 60000.0, 1.1, 14_063, 2.597, 2.381778812582),
    ];

    #[test]
    fn rdp_matches_dp_accounting_within_one_percent() {
        for (q, z, t, rdp_ref, pld) in REFERENCE {
            let eps = rdp_epsilon(q, z, t, 1e-5).unwrap();
            assert!(
                (eps / rdp_ref - 1.0).abs() < 0.01,
                "q={q} z={z} T={t}: got {eps}, reference {rdp_ref}"
            );
            assert!(eps >= pld, "below the tightest known bound");
        }
    }

    #[test]
    fn reported_epsilon_is_the_pld_within_one_percent_and_never_below() {
        for (q, z, t, _, pld) in REFERENCE {
            let (eps, method) = epsilon(q, z, t, 1e-5).unwrap();
            assert_eq!(method, Method::Pld, "q={q} z={z} T={t}");
            assert!(eps >= pld, "q={q} z={z} T={t}: {eps} < PLD {pld}");
            assert!(eps <= pld * 1.01, "q={q} z={z} T={t}: {eps} vs PLD {pld}");
        }
    }

    #[test]
    fn each_accountant_answers_with_its_own_bound() {
        let groups = [(0.1, 1.0, 100)];
        let b = bounds_of_rounds(&groups, 1e-5).unwrap();
        let rdp = epsilon_of_rounds_with(&groups, 1e-5, Accountant::Rdp).unwrap();
        let pld = epsilon_of_rounds_with(&groups, 1e-5, Accountant::Pld).unwrap();
        assert_eq!(rdp, (b.rdp, Method::Rdp));
        assert_eq!(pld, (b.pld.clone().unwrap(), Method::Pld));
        assert_eq!(epsilon_of_rounds(&groups, 1e-5).unwrap(), pld);
        assert!(pld.0 < rdp.0 * 0.92, "{pld:?} vs {rdp:?}");
        assert_eq!(
            serde_json::to_string(&Method::Pld).unwrap(),
            "\"pld\"",
            "serde names stay snake_case"
        );
    }

    #[test]
    fn a_pld_without_answer_falls_back_and_is_an_error_only_when_asked_for() {
        // Tiny noise over a billion rounds: the PLD grid is over budget.
        let groups = [(0.01, 0.05, 1_000_000_000)];
        let b = bounds_of_rounds(&groups, 1e-5).unwrap();
        assert!(b.pld.is_err(), "{:?}", b.pld);
        let (eps, method) = epsilon_of_rounds(&groups, 1e-5).unwrap();
        assert_ne!(method, Method::Pld);
        assert!(eps.is_finite() && eps > 0.0);
        assert!(matches!(
            epsilon_of_rounds_with(&groups, 1e-5, Accountant::Pld),
            Err(AccountError::Pld(_))
        ));
    }

    #[test]
    fn opendp_zcdp_matches_reference() {
        // rho = 0.5 for one round at z = 1; opendp's conversion gives 4.728 at 1e-5.
        let eps = zcdp_epsilon(&[1.0], 1e-5).unwrap();
        assert!((eps - 4.728).abs() < 0.005, "{eps}");
        // Composition: 4 rounds at z = 2 have rho = 4 * 1/8 = 0.5, the same epsilon.
        let eps4 = zcdp_epsilon(&[2.0; 4], 1e-5).unwrap();
        assert!((eps4 - eps).abs() < 1e-9, "{eps4} vs {eps}");
    }

    #[test]
    fn fractional_orders_agree_with_neighbouring_integer_orders() {
        // RDP is continuous and non-decreasing in the order.
        for (q, z) in [(0.1, 1.0), (0.01, 0.8), (0.5, 3.0)] {
            let r2 = rdp_sampled_gaussian(q, z, 2.0);
            let r25 = rdp_sampled_gaussian(q, z, 2.5);
            let r3 = rdp_sampled_gaussian(q, z, 3.0);
            assert!(r2 <= r25 && r25 <= r3, "{r2} {r25} {r3}");
            let near = rdp_sampled_gaussian(q, z, 3.0001 + 0.0);
            assert!((near - r3).abs() / r3 < 1e-2, "{near} vs {r3}");
        }
    }

    #[test]
    fn epsilon_grows_with_steps_and_shrinks_with_noise() {
        let a = rdp_epsilon(0.1, 1.0, 10, 1e-5).unwrap();
        let b = rdp_epsilon(0.1, 1.0, 20, 1e-5).unwrap();
        let c = rdp_epsilon(0.1, 1.5, 20, 1e-5).unwrap();
        assert!(a < b && c < b);
    }

    #[test]
    fn noise_search_meets_target_tightly() {
        for accountant in [Accountant::Best, Accountant::Rdp, Accountant::Pld] {
            for (q, t, target) in [(0.1, 100, 2.581), (1.0, 10, 8.079), (0.01, 1000, 1.0)] {
                let z = noise_for_epsilon(q, t, 1e-5, target, accountant).unwrap();
                let at = |z| epsilon_of_rounds_with(&[(q, z, t)], 1e-5, accountant).unwrap();
                let (eps, _) = at(z);
                assert!(eps <= target, "{accountant:?} z={z}: {eps} > {target}");
                let (eps_less, _) = at(z * 0.99);
                assert!(eps_less > target, "{accountant:?}: z not minimal: {z}");
            }
        }
        // Each reference row (q=0.1, z=2, T=100) needs about z = 2 for its own epsilon.
        let z = noise_for_epsilon(0.1, 100, 1e-5, 2.581, Accountant::Rdp).unwrap();
        assert!((z - 2.0).abs() < 0.03, "{z}");
        let z = noise_for_epsilon(0.1, 100, 1e-5, 2.3374, Accountant::Pld).unwrap();
        assert!((z - 2.0).abs() < 0.01, "{z}");
        // PLD needs about 6 % less noise for the same guarantee at q = 0.01, T = 1000.
        let rdp = noise_for_epsilon(0.01, 1000, 1e-5, 3.0, Accountant::Rdp).unwrap();
        let pld = noise_for_epsilon(0.01, 1000, 1e-5, 3.0, Accountant::Best).unwrap();
        assert!(pld < rdp * 0.95 && pld > rdp * 0.9, "{pld} vs {rdp}");
    }

    #[test]
    fn huge_step_counts_cost_nothing_and_never_panic() {
        // Audit: T = 1e8 allocated a vector of T entries (1.5 GB); T = u64::MAX panicked.
        let t0 = std::time::Instant::now();
        let (e, _) = epsilon(0.01, 1.0, 100_000_000, 1e-5).unwrap();
        assert!(e.is_finite() && e > 0.0);
        assert!(t0.elapsed().as_secs_f64() < 5.0);
        let r = epsilon(0.01, 1.0, u64::MAX, 1e-5);
        assert!(
            r.is_ok() || matches!(r, Err(AccountError::OpenDp(_))),
            "{r:?}"
        );
        // Grouped zCDP equals the ungrouped sum of rho.
        let a = zcdp_epsilon(&[2.0, 2.0, 2.0, 2.0, 3.0], 1e-5).unwrap();
        let b = zcdp_epsilon_grouped(&[(2.0, 4), (3.0, 1)], 1e-5).unwrap();
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        // Heterogeneous rounds compose.
        let (mixed, _) = epsilon_of_rounds(&[(0.1, 1.0, 50), (0.2, 1.5, 50)], 1e-5).unwrap();
        let (first, _) = epsilon(0.1, 1.0, 50, 1e-5).unwrap();
        assert!(mixed > first);
    }

    #[test]
    fn zero_sampling_rate_is_refused() {
        assert!(matches!(
            epsilon(0.0, 1.0, 10, 1e-5),
            Err(AccountError::Domain {
                what: "sampling rate",
                ..
            })
        ));
        assert!(matches!(
            epsilon(-0.1, 1.0, 10, 1e-5),
            Err(AccountError::Domain { .. })
        ));
        assert!(noise_for_epsilon(0.0, 10, 1e-5, 1.0, Accountant::Best).is_err());
    }

    #[test]
    fn bad_parameters_are_typed_errors() {
        assert!(matches!(
            rdp_epsilon(1.5, 1.0, 1, 1e-5),
            Err(AccountError::Domain { .. })
        ));
        assert!(matches!(
            rdp_epsilon(0.1, 0.0, 1, 1e-5),
            Err(AccountError::Domain { .. })
        ));
        assert!(matches!(
            rdp_epsilon(0.1, 1.0, 1, 0.0),
            Err(AccountError::Domain { .. })
        ));
        assert!(matches!(
            noise_for_epsilon(1.0, 1_000_000, 1e-5, 1e-6, Accountant::Best),
            Err(AccountError::Unreachable { .. })
        ));
    }
}
