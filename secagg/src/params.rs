//! Choosing the graph degree k and the threshold t for a round.
//!
//! The computation is the one of Google's production parameter finder for SecAgg+
//! (`fcp/secagg/server/graph_parameter_finder.cc` in google/federated-compute, after Bell
//! et al. 2020, §3–4), with security parameter σ = 40 (the adversary learns more than the
//! sum with probability below 2^-40) and correctness parameter η = 20 (an honest round fails
//! with probability below 2^-20). With n participants, a fraction γ of them colluding with
//! the server (`adversarial_rate`) and a fraction δ dropping out (`dropout_rate`), let
//! A = ⌊γn⌋ and S = ⌈(1 − δ)n⌉ (both with 10^-14 of slack against rounding). For each even
//! k = 2, 4, … < n − 1 in turn, k is accepted with the smallest admissible t if:
//!
//! 1. **Connectivity.** Removing the A + D (D = ⌊δn⌋) bad nodes from a Harary graph H(k, n)
//!    on a random permutation disconnects it only if k/2 consecutive ring positions are
//!    removed in two places. Union bound over the n(n − k − 1)/2 pairs of gaps:
//!    ln P ≤ ln(n(n − k − 1)/2) + lnΓ(A + D + 1) + lnΓ(n − k + 1) − lnΓ(n + 1)
//!    − lnΓ(A + D − k + 1) must be below −(σ + 1)·ln 2 (the security budget is split over
//!    two bad events). If k > A + D the probability is 0.
//! 2. **Privacy.** The number of adversarial neighbours of a node is hypergeometric
//!    H(n, A, k). t₁ is the smallest value with P(X > t₁) ≤ 2^-(σ+1)/n (union bound over the
//!    n nodes): fewer than t shares of any node ever reach the adversary. Against a
//!    semi-malicious server (one that may lie about who dropped, defeated here by the signed
//!    survivor-set check) t must also satisfy 2t − k > t₁, so
//!    t₁ ← ⌈(t₁ + k − 1.25)/2⌉.
//! 3. **Correctness.** The number of surviving neighbours is H(n, S, k). t₂ is the largest
//!    value with P(X < t₂) ≤ 2^-η/n: every node keeps at least t₂ surviving share holders.
//!
//! k is accepted when t = max(t₁ + 1, 2) ≤ t₂, and t is that value. (Google's code accepts
//! k whenever t₁ < t₂ and then returns max(t₁ + 1, 2), which exceeds t₂ when t₂ < 2 and
//! breaks the correctness bound; here such a k is rejected. Of Google's reference table
//! this changes one tiny case: n = 10, γ = 5 %, δ = 33 % gives k = 6, t = 2 instead of
//! k = 4, t = 2, where t₂ = 1.) Reference points (Google's tests, reproduced by this
//! module's tests): n = 1,000, γ = δ = 5 %, curious server: k = 30, t = 17; n = 100:
//! k = 12, t = 6; semi-malicious: k = 52, t = 37 and k = 16, t = 11.
//!
//! When no even k < n − 1 qualifies (small n), the complete graph (k = n − 1) is used with
//! a threshold that holds deterministically: t > A (curious) or 2t > k + A
//! (semi-malicious), t ≥ 2, and t ≤ k − D.
//!
//! This module only computes; the round's context carries the chosen (k, t) and a node can
//! check them with [`is_secure`] before taking part.

use serde::{Deserialize, Serialize};

/// Statistical security parameter σ: bad events for privacy have probability < 2^-σ.
pub const SECURITY_BITS: f64 = 40.0;
/// Correctness parameter η: an honest round fails with probability < 2^-η.
pub const CORRECTNESS_BITS: f64 = 20.0;
/// Largest population the finder accepts (as Google's).
pub const MAX_FINDER_CLIENTS: u32 = 1_000_000;

const SMALL: f64 = 1e-14;

/// What the server may do beyond following the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdversaryClass {
    /// Honest-but-curious server (colluding with a fraction of clients).
    CuriousServer,
    /// A server that may also lie about who dropped out (Bell et al.'s semi-malicious
    /// server); needs 2t − k above the number of adversarial neighbours.
    SemiMaliciousServer,
}

/// The threat model parameters are chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreatModel {
    /// Fraction γ of participants that may collude with the server, in [0, 1).
    pub adversarial_rate: f64,
    /// Fraction δ of participants that may drop out during a round, in [0, 1).
    pub dropout_rate: f64,
    /// The server's behaviour.
    pub adversary: AdversaryClass,
}

/// The degree and threshold of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphParams {
    /// Neighbours per node, k (n − 1: complete graph).
    pub degree: u32,
    /// Shares needed to reconstruct a node's secrets, t.
    pub threshold: u32,
}

/// Why no parameters could be chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// The population is out of the finder's range.
    #[error("number of participants {0} must be in 3..={MAX_FINDER_CLIENTS}")]
    Population(u32),
    /// A rate outside [0, 1) or not finite.
    #[error("{what} must be in [0, 1), got {value}")]
    Rate {
        /// Which rate.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// The rates together are beyond what the analysis supports.
    #[error("{0}")]
    Infeasible(String),
    /// An explicit (k, t) that cannot work for this population.
    #[error("degree {degree} and threshold {threshold} are invalid for {n} participants: {why}")]
    Override {
        /// Participants.
        n: u32,
        /// Given degree.
        degree: u32,
        /// Given threshold.
        threshold: u32,
        /// What is wrong.
        why: &'static str,
    },
}

impl ThreatModel {
    fn validate(&self, n: u32) -> Result<(), ParamError> {
        if !(3..=MAX_FINDER_CLIENTS).contains(&n) {
            return Err(ParamError::Population(n));
        }
        for (what, value) in [
            ("adversarial_rate", self.adversarial_rate),
            ("dropout_rate", self.dropout_rate),
        ] {
            if !(value.is_finite() && (0.0..1.0).contains(&value)) {
                return Err(ParamError::Rate { what, value });
            }
        }
        let (g, d) = (self.adversarial_rate, self.dropout_rate);
        match self.adversary {
            AdversaryClass::CuriousServer if g + d > 0.9 => Err(ParamError::Infeasible(format!(
                "against a curious server adversarial_rate + dropout_rate must be <= 0.9, got {g} + {d}"
            ))),
            AdversaryClass::SemiMaliciousServer if g + 2.0 * d > 0.9 => {
                Err(ParamError::Infeasible(format!(
                    "against a semi-malicious server adversarial_rate + 2 dropout_rate must be <= 0.9, got {g} + 2*{d}"
                )))
            }
            _ => Ok(()),
        }
    }

    fn max_adversarial(&self, n: u32) -> i64 {
        ((self.adversarial_rate + SMALL) * f64::from(n)).floor() as i64
    }

    fn max_dropouts(&self, n: u32) -> i64 {
        ((self.dropout_rate + SMALL) * f64::from(n)).floor() as i64
    }

    fn min_survivors(&self, n: u32) -> i64 {
        ((1.0 - self.dropout_rate - SMALL) * f64::from(n)).ceil() as i64
    }
}

fn lgamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// The hypergeometric distribution: `sampled` draws without replacement from `total`
/// items of which `marked` are marked; X = marked items drawn. A port of Google's
/// `HypergeometricDistribution` (same recurrences, same floating-point order).
struct Hypergeometric {
    total: f64,
    marked: f64,
    sampled: f64,
}

impl Hypergeometric {
    fn new(total: i64, marked: i64, sampled: i64) -> Self {
        Self {
            total: total as f64,
            marked: marked.clamp(0, total) as f64,
            sampled: sampled.clamp(0, total) as f64,
        }
    }

    fn pmf_impl(&self, x: f64, counted: f64) -> f64 {
        let (t, s) = (self.total, self.sampled);
        if x < 0.0 || x > s || x > counted || t + x < counted + s {
            return 0.0;
        }
        (lgamma(s + 1.0) + lgamma(counted + 1.0) + lgamma(t - counted + 1.0) + lgamma(t - s + 1.0)
            - lgamma(x + 1.0)
            - lgamma(s - x + 1.0)
            - lgamma(counted - x + 1.0)
            - lgamma(t + 1.0)
            - lgamma(t - s - counted + x + 1.0))
        .exp()
    }

    fn cdf(&self, x: f64) -> f64 {
        let x = x.floor();
        let mean = self.marked * self.sampled / self.total;
        if x > mean {
            1.0 - self.cdf_impl(self.sampled - x - 1.0, self.total - self.marked)
        } else {
            self.cdf_impl(x, self.marked)
        }
    }

    fn cdf_impl(&self, mut x: f64, counted: f64) -> f64 {
        let (t, s) = (self.total, self.sampled);
        let mut pmf = self.pmf_impl(x, counted);
        let mut result = 0.0;
        while pmf > result * 1e-16 {
            result += pmf;
            pmf *= x;
            pmf *= t - counted - s + x;
            pmf /= counted - x + 1.0;
            pmf /= s - x + 1.0;
            x -= 1.0;
        }
        result
    }

    /// The quantile rounded away from the median; with `complement`, of the upper tail.
    fn quantile(&self, mut q: f64, mut complement: bool) -> f64 {
        if q > 0.5 {
            q = 1.0 - q;
            complement = !complement;
        }
        if complement {
            self.sampled - self.quantile_impl(q, self.total - self.marked) - 1.0
        } else {
            self.quantile_impl(q, self.marked)
        }
    }

    fn quantile_impl(&self, q: f64, counted: f64) -> f64 {
        let (t, s) = (self.total, self.sampled);
        let basic = counted + s - t - 1.0;
        let fancy = s * (counted / t - (-q.ln() / (2.0 * s)).sqrt());
        let mut result = (-1.0f64).max(basic).max(fancy).floor();
        let mut cdf = self.cdf_impl(result, counted);
        let mut pmf = self.pmf_impl(result, counted);
        while cdf < q && result < s {
            if pmf > 0.0 {
                pmf /= result + 1.0;
                pmf /= t - counted - s + result + 1.0;
                pmf *= counted - result;
                pmf *= s - result;
            } else {
                pmf = self.pmf_impl(result + 1.0, counted);
            }
            cdf += pmf;
            result += 1.0;
        }
        result - 1.0
    }
}

/// ln of the union bound on the probability that removing the bad nodes disconnects a
/// random H(k, n) (condition 1).
fn log_prob_disconnected(n: u32, k: u32, threat: &ThreatModel) -> f64 {
    let nf = f64::from(n);
    let kf = f64::from(k);
    let bad = threat.max_adversarial(n) + threat.max_dropouts(n);
    if i64::from(k) > bad {
        return f64::NEG_INFINITY;
    }
    let bad = bad as f64;
    nf.ln() + (nf - kf - 1.0).ln() - 2f64.ln() + lgamma(bad + 1.0) + lgamma(nf - kf + 1.0)
        - lgamma(nf + 1.0)
        - lgamma(bad - kf + 1.0)
}

/// t₁ of condition 2 (adjusted for a semi-malicious server), or `None` if the graph is not
/// connected with high enough probability.
fn privacy_floor(n: u32, k: u32, threat: &ThreatModel) -> Option<f64> {
    let per_event = SECURITY_BITS + 1.0;
    if log_prob_disconnected(n, k, threat) >= -per_event * 2f64.ln() {
        return None;
    }
    let adversarial = Hypergeometric::new(n.into(), threat.max_adversarial(n), k.into());
    let mut t1 = adversarial.quantile(2f64.powf(-per_event) / f64::from(n), true);
    if threat.adversary == AdversaryClass::SemiMaliciousServer {
        t1 = ((t1 + f64::from(k) - 1.25) / 2.0).ceil();
    }
    Some(t1)
}

/// t₂ of condition 3.
fn correctness_ceiling(n: u32, k: u32, threat: &ThreatModel) -> f64 {
    let q = 2f64.powf(-CORRECTNESS_BITS) / f64::from(n);
    let surviving = Hypergeometric::new(n.into(), threat.min_survivors(n), k.into());
    let mut t2 = surviving.quantile(q, false);
    if surviving.cdf(t2) < q {
        t2 += 1.0;
    }
    t2
}

/// The smallest threshold for the complete graph on `n` nodes that keeps the adversary's
/// shares below it deterministically (at least 2).
fn complete_graph_floor(n: u32, threat: &ThreatModel) -> i64 {
    let k = i64::from(n) - 1;
    let a = threat.max_adversarial(n);
    let floor = match threat.adversary {
        AdversaryClass::CuriousServer => a + 1,
        AdversaryClass::SemiMaliciousServer => (k + a) / 2 + 1,
    };
    floor.max(2)
}

/// The complete graph on `n` nodes with the smallest threshold that holds deterministically.
fn complete_graph_threshold(n: u32, threat: &ThreatModel) -> Result<GraphParams, ParamError> {
    let k = i64::from(n) - 1;
    let d = threat.max_dropouts(n);
    let t = complete_graph_floor(n, threat);
    if t > k - d {
        return Err(ParamError::Infeasible(format!(
            "{n} participants cannot tolerate {} colluding and {d} dropped: the complete graph needs {t} of {k} shares but only {} survive",
            threat.max_adversarial(n),
            k - d
        )));
    }
    Ok(GraphParams {
        degree: k as u32,
        threshold: t as u32,
    })
}

/// Chooses (k, t) for `n` participants under `threat` (see the module docs).
pub fn find_params(n: u32, threat: &ThreatModel) -> Result<GraphParams, ParamError> {
    threat.validate(n)?;
    let mut k = 2;
    while k < n - 1 {
        if let Some(t1) = privacy_floor(n, k, threat) {
            let t = (t1 + 1.0).max(2.0);
            if t <= correctness_ceiling(n, k, threat) && t <= f64::from(k) {
                return Ok(GraphParams {
                    degree: k,
                    threshold: t as u32,
                });
            }
        }
        k += 2;
    }
    complete_graph_threshold(n, threat)
}

/// Checks that (k, t) is a usable shape for `n` participants: k even and below n − 1, or
/// k = n − 1 (complete graph), and 2 <= t <= k.
pub fn check_shape(n: u32, params: GraphParams) -> Result<(), ParamError> {
    let GraphParams { degree, threshold } = params;
    let err = |why| {
        Err(ParamError::Override {
            n,
            degree,
            threshold,
            why,
        })
    };
    if n < 3 {
        return err("secure aggregation needs at least 3 participants");
    }
    if degree == 0 || degree > n - 1 {
        return err("the degree must be in 1..=n-1");
    }
    if degree < n - 1 && degree % 2 == 1 {
        return err("a sparse (Harary) graph needs an even degree");
    }
    if threshold < 2 || threshold > degree {
        return err("the threshold must be in 2..=degree");
    }
    Ok(())
}

/// The parameters of a round: an explicit override (checked for shape only: the operator
/// takes responsibility for its security) or the finder's choice.
pub fn choose_params(
    n: u32,
    threat: &ThreatModel,
    override_params: Option<GraphParams>,
) -> Result<GraphParams, ParamError> {
    match override_params {
        Some(p) => check_shape(n, p).map(|()| p),
        None => find_params(n, threat),
    }
}

/// Whether (k, t) keeps the privacy guarantee of `threat` for `n` participants
/// (conditions 1 and 2, or the complete graph's deterministic bound); correctness is the
/// server's concern and is not checked. Nodes call this before taking part so that a
/// server cannot weaken a round by announcing a small degree or threshold.
pub fn is_secure(n: u32, params: GraphParams, threat: &ThreatModel) -> bool {
    if threat.validate(n).is_err() || check_shape(n, params).is_err() {
        return false;
    }
    let t = f64::from(params.threshold);
    if params.degree == n - 1 {
        return i64::from(params.threshold) >= complete_graph_floor(n, threat);
    }
    match privacy_floor(n, params.degree, threat) {
        Some(t1) => t > t1,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tm(g: f64, d: f64, adversary: AdversaryClass) -> ThreatModel {
        ThreatModel {
            adversarial_rate: g,
            dropout_rate: d,
            adversary,
        }
    }
    use AdversaryClass::{CuriousServer as C, SemiMaliciousServer as M};

    #[test]
    fn reference_points_from_the_brief() {
        let p = find_params(1000, &tm(0.05, 0.05, C)).unwrap();
        assert_eq!((p.degree, p.threshold), (30, 17));
        let p = find_params(100, &tm(0.05, 0.05, C)).unwrap();
        assert_eq!((p.degree, p.threshold), (12, 6));
    }

    /// Google's precomputed table (graph_parameter_finder_test.cc): the degree must match
    /// and the threshold must not exceed theirs.
    #[test]
    fn google_reference_table() {
        let table: &[(u32, f64, f64, AdversaryClass, u32, u32)] = &[
            (100, 0.45, 0.45, C, 92, 46),
            (1000, 0.45, 0.45, C, 822, 417),
            (10, 0.33, 0.33, C, 8, 4),
            (100, 0.33, 0.33, C, 68, 34),
            (1000, 0.33, 0.33, C, 286, 150),
            (10000, 0.33, 0.33, C, 422, 221),
            (100, 0.3, 0.3, M, 92, 62),
            (1000, 0.3, 0.3, M, 872, 584),
            // Google: k = 4, t = 2, although only t₂ = 1 neighbours survive there with
            // probability 1 − 2^-20 (see the module docs).
            (10, 0.05, 0.33, C, 6, 2),
            (100, 0.05, 0.33, C, 28, 6),
            (1000, 0.05, 0.33, C, 72, 24),
            (10, 0.05, 0.33, M, 8, 5),
            (100, 0.05, 0.33, M, 72, 39),
            (1000, 0.05, 0.33, M, 398, 223),
            (100, 0.33, 0.05, C, 34, 29),
            (1000, 0.33, 0.05, C, 78, 60),
            (100, 0.33, 0.05, M, 42, 37),
            (1000, 0.33, 0.05, M, 132, 109),
            (10, 0.05, 0.05, C, 2, 2),
            (100, 0.05, 0.05, C, 12, 6),
            (1000, 0.05, 0.05, C, 30, 17),
            (10000, 0.05, 0.05, C, 34, 20),
            (100000, 0.05, 0.05, C, 36, 21),
            (10, 0.05, 0.05, M, 2, 2),
            (100, 0.05, 0.05, M, 16, 11),
            (1000, 0.05, 0.05, M, 52, 37),
            (10000, 0.05, 0.05, M, 62, 44),
        ];
        for &(n, g, d, class, k, t) in table {
            let p = find_params(n, &tm(g, d, class)).unwrap();
            assert_eq!(p.degree, k, "n={n} g={g} d={d} {class:?}: {p:?}");
            assert!(p.threshold <= t, "n={n} g={g} d={d} {class:?}: {p:?}");
            assert!(is_secure(n, p, &tm(g, d, class)));
        }
    }

    #[test]
    fn small_populations_fall_back_to_the_complete_graph() {
        // 5 nodes, 20 % colluding, 20 % dropping: no sparse graph qualifies.
        let p = find_params(5, &tm(0.2, 0.2, C)).unwrap();
        assert_eq!(
            p,
            GraphParams {
                degree: 4,
                threshold: 2
            }
        );
        let p = find_params(5, &tm(0.2, 0.2, M)).unwrap();
        // 2t > 4 + 1.
        assert_eq!(
            p,
            GraphParams {
                degree: 4,
                threshold: 3
            }
        );
        assert!(matches!(
            find_params(4, &tm(0.3, 0.3, M)),
            Err(ParamError::Infeasible(_))
        ));
    }

    #[test]
    fn thresholds_are_secure_and_correct() {
        for n in [3u32, 5, 10, 20, 50, 100, 300, 1000, 5000] {
            for (g, d) in [(0.0, 0.0), (0.05, 0.05), (0.1, 0.2), (0.2, 0.1)] {
                for class in [C, M] {
                    let threat = tm(g, d, class);
                    let Ok(p) = find_params(n, &threat) else {
                        continue;
                    };
                    check_shape(n, p).unwrap();
                    assert!(is_secure(n, p, &threat), "{n} {g} {d} {class:?} {p:?}");
                    if p.degree < n - 1 {
                        assert!(
                            f64::from(p.threshold) <= correctness_ceiling(n, p.degree, &threat)
                        );
                    }
                    // A lower threshold is never secure once t₁ ≥ 1.
                    if p.threshold > 2 {
                        let weaker = GraphParams {
                            threshold: p.threshold - 1,
                            ..p
                        };
                        assert!(
                            !is_secure(n, weaker, &threat),
                            "{n} {g} {d} {class:?} {p:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn overrides_are_shape_checked() {
        let threat = tm(0.05, 0.05, C);
        let ok = GraphParams {
            degree: 20,
            threshold: 12,
        };
        assert_eq!(choose_params(1000, &threat, Some(ok)), Ok(ok));
        for bad in [
            GraphParams {
                degree: 21,
                threshold: 12,
            },
            GraphParams {
                degree: 20,
                threshold: 21,
            },
            GraphParams {
                degree: 20,
                threshold: 1,
            },
            GraphParams {
                degree: 1000,
                threshold: 12,
            },
        ] {
            assert!(matches!(
                choose_params(1000, &threat, Some(bad)),
                Err(ParamError::Override { .. })
            ));
        }
        assert!(matches!(
            find_params(2, &threat),
            Err(ParamError::Population(2))
        ));
        assert!(matches!(
            find_params(100, &tm(1.0, 0.0, C)),
            Err(ParamError::Rate { .. })
        ));
        assert!(matches!(
            find_params(100, &tm(f64::NAN, 0.0, C)),
            Err(ParamError::Rate { .. })
        ));
        assert!(matches!(
            find_params(100, &tm(0.5, 0.5, C)),
            Err(ParamError::Infeasible(_))
        ));
    }

    #[test]
    fn hypergeometric_matches_direct_sums() {
        let h = Hypergeometric::new(50, 10, 8);
        let total: f64 = (0..=8).map(|x| h.pmf_impl(x as f64, 10.0)).sum();
        assert!((total - 1.0).abs() < 1e-12);
        let direct: f64 = (0..=3).map(|x| h.pmf_impl(x as f64, 10.0)).sum();
        assert!((h.cdf(3.0) - direct).abs() < 1e-12);
        let direct: f64 = (0..=6).map(|x| h.pmf_impl(x as f64, 10.0)).sum();
        assert!((h.cdf(6.0) - direct).abs() < 1e-12);
    }
}
