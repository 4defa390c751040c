//! The node's own privacy budget: what this node's data has spent, by the node's own
//! count, persisted on its disk so that a restart does not reset it.
//!
//! The node owns its privacy: it never takes its noise level or its budget from the
//! server. Before a round it checks the noise the server asks for against its own floor
//! (`min_noise_multiplier`) and the spend one more release would reach against its own
//! ceiling (`max_epsilon`), and it records the release **durably before the update
//! leaves**, so a crash can under-report nothing.
//!
//! What is counted (neighbouring relation: this node's whole data set present or absent):
//! - `local` mode: each release is this node's clipped update plus `N(0, (zC)^2)`; against
//!   the server the sensitivity is 2C, so a release is a Gaussian mechanism with
//!   multiplier z/2 and no amplification (the server knows who was sampled). This figure
//!   depends on nothing the server says.
//! - `central` mode: the federation-level guarantee (Poisson rate q, multiplier z over the
//!   rounds released so far, as announced by the server). This **trusts the server** to add
//!   the noise it announced, which is what central mode means; the node can only check the
//!   announced z against its floor.
//!
//! - `distributed` mode: each round the node takes part in adds its integer noise share
//!   to its encoded update; against the server (which knows who took part, so no
//!   amplification) the release is the distributed mechanism at the round's public
//!   parameters, with the summed noise accounted over the round's `min_contributors`
//!   shares (what is left if the other contributors' shares were known). The node checks
//!   the parameters with [`check_share`] (its noise and contributor floors) and counts
//!   its participations per parameter set. The feature statistics before round 1
//!   (`[standardize]`) are such a release too, at their own parameters (federation
//!   `<server>|statistics`).
//!
//! All spends of the data compose (several federations, several runs): the total is the
//! tightest of PLD, RDP and zCDP over every recorded local and central release;
//! distributed spends (RDP of the discrete mechanisms, converted per parameter set) are
//! added to it by basic composition: conservative in epsilon, and each kind spends its
//! own delta (the figure holds at delta times the number of kinds with spends).

use dpfl_common::config::DpMode;
use dpfl_common::dp::accountant;
use dpfl_common::dp::distributed::{
    check_share, server_epsilon, DistributedParams, SharePolicy, ShareRefusal,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Why the node will not take part in a round, or cannot keep its books.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BudgetError {
    /// The server asks for less noise than the node accepts.
    #[error("noise multiplier {asked} is below this node's minimum {min}")]
    NoiseTooLow {
        /// Asked by the server.
        asked: f64,
        /// The node's floor.
        min: f64,
    },
    /// One more release would exceed the node's ceiling.
    #[error("one more release would bring this node's epsilon to {next:.4}, above its budget {max} (spent {spent:.4})")]
    Exhausted {
        /// Spent so far.
        spent: f64,
        /// After one more release.
        next: f64,
        /// The ceiling.
        max: f64,
    },
    /// Accounting failed.
    #[error("privacy accounting: {0}")]
    Account(String),
    /// Distributed mode: the node refuses the round's noise share.
    #[error("distributed DP: {0}")]
    Share(#[from] ShareRefusal),
    /// The state file could not be read or written.
    #[error("privacy state {path}: {detail}")]
    State {
        /// File.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// A node's settings for its own privacy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Refuse rounds (local and distributed modes) whose noise multiplier is below this.
    pub min_noise_multiplier: f64,
    /// Refuse rounds that would bring the node's epsilon above this.
    pub max_epsilon: Option<f64>,
    /// delta of the node's own (epsilon, delta).
    pub delta: f64,
    /// Distributed mode: refuse rounds whose noise is accounted over fewer contributors.
    pub min_contributors: usize,
}

impl Default for Policy {
    /// Floor z = 1 (a round at z = 1 in local mode costs about 11.6 at delta 1e-5 against
    /// the server: local DP below that protects little), no ceiling, delta 1e-5.
    fn default() -> Self {
        Self {
            min_noise_multiplier: 1.0,
            max_epsilon: None,
            delta: 1e-5,
            min_contributors: 2,
        }
    }
}

/// Local releases at one noise multiplier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalSpend {
    /// z of the noise the node added.
    pub noise_multiplier: f64,
    /// How many updates left the node at that z.
    pub releases: u64,
}

/// What the node has spent (the persisted state).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// Local releases, grouped by noise multiplier.
    pub local: Vec<LocalSpend>,
    /// Central federations: one entry per (server and model, q, z).
    pub central: BTreeMap<String, CentralSpend>,
    /// Distributed federations: one entry per (server and model, public parameters).
    #[serde(default)]
    pub distributed: BTreeMap<String, DistributedSpend>,
}

/// Rounds this node took part in at one set of distributed-DP parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistributedSpend {
    /// The public parameters (mechanism, bits, C, z, contributors, dimension).
    pub params: DistributedParams,
    /// Rounds whose noised encoding left this node.
    pub participations: u64,
}

/// What one central federation has released, by the node's count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CentralSpend {
    /// Poisson rate q announced.
    pub sampling_rate: f64,
    /// z announced.
    pub noise_multiplier: f64,
    /// Releases counted: every round number the server moved forward by (the node sees
    /// only the rounds it is sampled in, the federation releases every round), plus one
    /// for every round number seen again (a re-run after a crash, or a new run).
    pub releases: u64,
    /// Latest round number seen.
    pub last_round: u64,
}

/// The node's books.
#[derive(Debug)]
pub struct Budget {
    policy: Policy,
    spent: Spent,
    path: Option<PathBuf>,
}

impl Budget {
    /// Opens (or starts) the books at `path`; `None` keeps them in memory (tests only: a
    /// restart would forget the spend).
    pub fn open(policy: Policy, path: Option<PathBuf>) -> Result<Self, BudgetError> {
        let spent = match &path {
            Some(p) => match std::fs::read(p) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| BudgetError::State {
                    path: p.clone(),
                    detail: e.to_string(),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Spent::default(),
                Err(e) => {
                    return Err(BudgetError::State {
                        path: p.clone(),
                        detail: e.to_string(),
                    })
                }
            },
            None => Spent::default(),
        };
        Ok(Self {
            policy,
            spent,
            path,
        })
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What has been recorded.
    pub fn spent(&self) -> &Spent {
        &self.spent
    }

    fn groups(spent: &Spent) -> Vec<(f64, f64, u64)> {
        let mut g: Vec<(f64, f64, u64)> = spent
            .local
            .iter()
            .map(|l| {
                let (q, z) = accountant::release_step(DpMode::Local, 1.0, l.noise_multiplier);
                (q, z, l.releases)
            })
            .collect();
        g.extend(
            spent
                .central
                .values()
                .map(|c| (c.sampling_rate, c.noise_multiplier, c.releases)),
        );
        g
    }

    fn epsilon_of(&self, spent: &Spent) -> Result<f64, BudgetError> {
        let groups = Self::groups(spent);
        let mut eps = if groups.iter().all(|g| g.2 == 0) {
            0.0
        } else {
            accountant::epsilon_of_rounds(&groups, self.policy.delta)
                .map(|e| e.0)
                .map_err(|e| BudgetError::Account(e.to_string()))?
        };
        for d in spent.distributed.values() {
            eps += server_epsilon(&d.params, d.participations, self.policy.delta)
                .map_err(|e| BudgetError::Account(e.to_string()))?;
        }
        Ok(eps)
    }

    /// Epsilon spent so far, by the node's own count.
    pub fn epsilon(&self) -> Result<f64, BudgetError> {
        self.epsilon_of(&self.spent)
    }

    /// What the books would hold after one more release of this kind.
    fn with_release(&self, r: &Release) -> Spent {
        let mut next = self.spent.clone();
        match r {
            Release::Local { noise_multiplier } => {
                match next
                    .local
                    .iter_mut()
                    .find(|l| l.noise_multiplier.to_bits() == noise_multiplier.to_bits())
                {
                    Some(l) => l.releases += 1,
                    None => next.local.push(LocalSpend {
                        noise_multiplier: *noise_multiplier,
                        releases: 1,
                    }),
                }
            }
            Release::Central {
                federation,
                sampling_rate,
                noise_multiplier,
                round,
            } => {
                let key = format!("{federation}|q={sampling_rate}|z={noise_multiplier}");
                let e = next.central.entry(key).or_insert(CentralSpend {
                    sampling_rate: *sampling_rate,
                    noise_multiplier: *noise_multiplier,
                    releases: 0,
                    last_round: 0,
                });
                e.releases += if *round > e.last_round {
                    *round - e.last_round
                } else {
                    1
                };
                e.last_round = *round;
            }
            Release::Distributed { federation, params } => {
                let key = format!("{federation}|{}", serde_json::json!(params));
                next.distributed
                    .entry(key)
                    .or_insert(DistributedSpend {
                        params: *params,
                        participations: 0,
                    })
                    .participations += 1;
            }
        }
        next
    }

    /// Checks a round before training: the noise floor, then the ceiling after one more
    /// release. Returns the epsilon the node would have after it.
    pub fn check(&self, r: &Release) -> Result<f64, BudgetError> {
        // The floor holds in every private mode (in central mode the node cannot check
        // that the server adds the noise, but it refuses to agree to too little).
        let z = match r {
            Release::Local { noise_multiplier }
            | Release::Central {
                noise_multiplier, ..
            } => *noise_multiplier,
            Release::Distributed { params, .. } => {
                // The node's own floors on z and on the contributors the noise is
                // accounted over (the budget is checked below, over every spend).
                let share = SharePolicy {
                    min_noise_multiplier: self.policy.min_noise_multiplier,
                    min_contributors: self.policy.min_contributors,
                    max_server_epsilon: None,
                    delta: self.policy.delta,
                };
                check_share(&share, params, 0)?;
                params.noise_multiplier
            }
        };
        if z.is_nan() || z < self.policy.min_noise_multiplier {
            return Err(BudgetError::NoiseTooLow {
                asked: z,
                min: self.policy.min_noise_multiplier,
            });
        }
        let next = self.epsilon_of(&self.with_release(r))?;
        if let Some(max) = self.policy.max_epsilon {
            if next > max {
                return Err(BudgetError::Exhausted {
                    spent: self.epsilon()?,
                    next,
                    max,
                });
            }
        }
        Ok(next)
    }

    /// Records a release durably (temp file, fsync, rename) before the update is sent;
    /// returns the epsilon after it.
    pub fn record(&mut self, r: &Release) -> Result<f64, BudgetError> {
        let next = self.with_release(r);
        if let Some(path) = &self.path {
            let err = |detail: String| BudgetError::State {
                path: path.clone(),
                detail,
            };
            let bytes = serde_json::to_vec_pretty(&next).map_err(|e| err(e.to_string()))?;
            write_atomic(path, &bytes).map_err(|e| err(e.to_string()))?;
        }
        self.spent = next;
        self.epsilon()
    }
}

/// One release of this node's data.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// `local` mode: the node's noised update.
    Local {
        /// z of the noise the node adds.
        noise_multiplier: f64,
    },
    /// `central` mode: the federation's round `round` (trusting the server's noise).
    Central {
        /// Which federation (server name and model).
        federation: String,
        /// Poisson rate q announced.
        sampling_rate: f64,
        /// z announced.
        noise_multiplier: f64,
        /// Round number.
        round: u64,
    },
    /// `distributed` mode: this node's noised encoding, summed by secure aggregation.
    Distributed {
        /// Which federation (server name and model).
        federation: String,
        /// The round's public parameters.
        params: DistributedParams,
    },
}

impl Release {
    /// The release a train request implies, if the mode releases anything the node counts.
    pub fn of(
        mode: DpMode,
        federation: &str,
        sampling_rate: f64,
        noise_multiplier: f64,
        round: u64,
    ) -> Option<Self> {
        match mode {
            DpMode::Local => Some(Release::Local { noise_multiplier }),
            DpMode::Central => Some(Release::Central {
                federation: federation.to_string(),
                sampling_rate,
                noise_multiplier,
                round,
            }),
            _ => None,
        }
    }
}

fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(z: f64) -> Release {
        Release::Local {
            noise_multiplier: z,
        }
    }

    #[test]
    fn a_node_refuses_noise_below_its_floor_whatever_the_server_says() {
        // Audit: z = 1e-9 was accepted (own epsilon 2.2e18).
        let b = Budget::open(Policy::default(), None).unwrap();
        assert!(matches!(
            b.check(&local(1e-9)),
            Err(BudgetError::NoiseTooLow { .. })
        ));
        assert!(matches!(
            b.check(&local(f64::NAN)),
            Err(BudgetError::NoiseTooLow { .. })
        ));
        assert!(b.check(&local(1.0)).is_ok());
    }

    #[test]
    fn spend_survives_a_restart_and_the_ceiling_holds() {
        // Audit: a node's own epsilon restarted from zero after a node restart.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-1.privacy.json");
        let policy = Policy {
            min_noise_multiplier: 1.0,
            max_epsilon: Some(40.0),
            delta: 1e-5,
            min_contributors: 2,
        };
        let mut b = Budget::open(policy.clone(), Some(path.clone())).unwrap();
        let e1 = b.record(&local(2.0)).unwrap();
        let e2 = b.record(&local(2.0)).unwrap();
        // Local, z = 2: multiplier 1 against the server, q = 1 (4.3772 for one release by
        // the PLD, the exact Gaussian figure; zCDP gave 4.728).
        assert!((e1 - 4.3772).abs() < 0.01, "{e1}");
        assert!(e2 > e1);
        let mut again = Budget::open(policy, Some(path)).unwrap();
        assert!(
            (again.epsilon().unwrap() - e2).abs() < 1e-12,
            "restart keeps the spend"
        );
        let mut n = 2;
        loop {
            match again.check(&local(2.0)) {
                Ok(_) => {
                    again.record(&local(2.0)).unwrap();
                    n += 1;
                }
                Err(BudgetError::Exhausted { next, max, .. }) => {
                    assert!(next > max);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(n < 1000);
        }
        assert!(again.epsilon().unwrap() <= 40.0);
    }

    #[test]
    fn central_spend_counts_every_release_the_server_cannot_hide() {
        let mut b = Budget::open(Policy::default(), None).unwrap();
        let r = |round, z| Release::Central {
            federation: "fl.example.org".into(),
            sampling_rate: 0.1,
            noise_multiplier: z,
            round,
        };
        b.record(&r(10, 1.0)).unwrap(); // rounds 1..=10 were released
        b.record(&r(7, 1.0)).unwrap(); // a round number seen again: one more release
        b.record(&r(7, 1.0)).unwrap(); // and again: a server repeating numbers still pays
        let (reference, _) = accountant::epsilon(0.1, 1.0, 12, 1e-5).unwrap();
        assert!((b.epsilon().unwrap() - reference).abs() < 1e-9);
        // Another z is another entry: earlier rounds keep their price.
        b.record(&r(1, 2.0)).unwrap();
        assert_eq!(b.spent().central.len(), 2);
        // The floor applies in central mode too.
        assert!(matches!(
            b.check(&r(20, 1e-9)),
            Err(BudgetError::NoiseTooLow { .. })
        ));
    }

    #[test]
    fn distributed_rounds_below_the_nodes_floors_are_refused_and_spends_are_books() {
        use dpfl_common::dp::distributed::{server_epsilon, DistributedParams, Mechanism};
        let policy = Policy {
            min_noise_multiplier: 0.8,
            max_epsilon: None,
            delta: 1e-5,
            min_contributors: 5,
        };
        let params = DistributedParams {
            mechanism: Mechanism::Skellam,
            bits: 20,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            min_contributors: 5,
            max_contributors: 10,
            dim: 1000,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        };
        let release = |p: DistributedParams| Release::Distributed {
            federation: "fed".into(),
            params: p,
        };
        let mut b = Budget::open(policy.clone(), None).unwrap();
        let low_z = DistributedParams {
            noise_multiplier: 0.5,
            ..params
        };
        assert!(matches!(
            b.check(&release(low_z)),
            Err(BudgetError::Share(ShareRefusal::NoiseTooLow { .. }))
        ));
        let few = DistributedParams {
            min_contributors: 4,
            ..params
        };
        assert!(matches!(
            b.check(&release(few)),
            Err(BudgetError::Share(ShareRefusal::TooFewContributors {
                asked: 4,
                min: 5
            }))
        ));
        // Accepted rounds are counted against the server, per parameter set.
        b.check(&release(params)).unwrap();
        b.record(&release(params)).unwrap();
        let e = b.record(&release(params)).unwrap();
        let reference = server_epsilon(&params, 2, 1e-5).unwrap();
        assert!((e - reference).abs() < 1e-12, "{e} vs {reference}");
        // And the ceiling holds over them.
        let tight = Policy {
            max_epsilon: Some(reference * 1.01),
            ..policy
        };
        let mut b2 = Budget::open(tight, None).unwrap();
        b2.record(&release(params)).unwrap();
        b2.record(&release(params)).unwrap();
        assert!(matches!(
            b2.check(&release(params)),
            Err(BudgetError::Exhausted { .. })
        ));
    }
}
