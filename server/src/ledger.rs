//! The privacy ledger: what every release cost and what every client spent.
//!
//! A row is one **release**: a round (or, in `local` mode, an attempt of a round) whose
//! output left the mechanism: a noised model in `central` mode, noised updates received by
//! the server in `local` mode; round 0 ([`STATISTICS_ROUND`]) is the release of the
//! federated feature statistics (`crate::prep`). A round re-run after a crash is a second release and gets a
//! second row. Epsilons are recomputed from the rows (never accumulated by hand), so a
//! ledger restored from disk reports exactly what an uninterrupted run would.
//!
//! What "epsilon" means per mode (neighbouring relation: add or remove one client with all
//! of its data):
//! - `central` (adversary: anyone who sees the released models, including other nodes;
//!   the server is trusted): the sampled Gaussian with multiplier z at rate q over every
//!   release; the tightest of the PLD and RDP (both with amplification by Poisson
//!   sampling, which holds because selection draws from the OS CSPRNG and the sample is
//!   not published) and opendp zCDP (without).
//! - `local` (adversary: the server, and anyone who sees what it sees): each participation
//!   releases the client's clipped update plus `N(0, (zC)^2)`; against the server the
//!   sensitivity is 2C (the update can be anything in the ball), multiplier z/2, no
//!   amplification (the server knows who was sampled). [`Ledger::epsilon`] is the bound for
//!   a client that took part in every release (public: it does not depend on who took
//!   part); [`Ledger::clients`] holds each client's actual spend (operator-only: it reveals
//!   participation). No "aggregate view" figure is reported: under add/remove the removed
//!   client's noise disappears with it, so the variance of the sum itself reveals presence.
//!
//! - `distributed` (adversaries: observers of the models, and the server): a
//!   [`DistributedLedger`] inside [`Ledger::distributed`] keeps both labelled epsilons,
//!   against observers of the models (amplified by sampling; the rows' `epsilon`) and
//!   against the server (not amplified; the clients' `epsilon` is each one's actual figure
//!   against the server). The noise is accounted over the round's `min_contributors`.
//!   The feature statistics' release (round 0, `[standardize]`) is kept in
//!   [`DistributedLedger::statistics`] at its own public parameters and composed into
//!   both figures (RDP order by order; q = 1).
//!
//! [`Ledger::public`] is the part that may be published.

use crate::strategy::{DpParams, NodeId, RoundPrivacy};
use dpfl_common::config::DpMode;
use dpfl_common::dp::accountant::{self, AccountError, Method};
use dpfl_common::dp::distributed::{
    self, DistributedAccountError, DistributedEpsilons, DistributedParams,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One round in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRound {
    /// Round number.
    pub round: u64,
    /// Mode.
    pub mode: DpMode,
    /// Sampling rate q.
    pub sampling_rate: f64,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Clipping bound C used.
    pub clip_norm: f64,
    /// Clients whose update was accepted.
    pub participants: usize,
    /// Population sampled from.
    pub population: usize,
    /// Epsilon after this release (central: every client; local: a client that took part
    /// in every release).
    pub epsilon: f64,
    /// Which bound gave `epsilon`.
    pub method: Method,
}

/// One client's spend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClientSpend {
    /// Releases in which this client's update was accepted.
    pub rounds_joined: u64,
    /// Epsilon spent: local mode, against the server over its own releases; central mode,
    /// the federation level (the same for everyone).
    pub epsilon: f64,
    /// Whether its feature statistics are in the statistics release (round 0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub statistics: bool,
}

/// The ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Mode of the federation.
    pub mode: DpMode,
    /// delta of every reported epsilon.
    pub delta: f64,
    /// Released rounds, in order.
    pub rounds: Vec<LedgerRound>,
    /// Per-client spend.
    pub clients: BTreeMap<NodeId, ClientSpend>,
    /// `distributed` mode: both labelled epsilons of every release (the rows above carry
    /// the one against observers of the models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<DistributedLedger>,
}

/// Largest per-client epsilon in local mode (sensitivity 2C: multiplier z/2, q = 1).
pub fn local_client_epsilon(z: f64, rounds: u64, delta: f64) -> Result<f64, AccountError> {
    let (q, z) = accountant::release_step(DpMode::Local, 1.0, z);
    Ok(accountant::epsilon(q, z, rounds, delta)?.0)
}

/// As [`local_client_epsilon`], composed with the statistics release (multiplier
/// `statistics`, also against the server: z/2) when the client's statistics are in it.
pub fn local_client_epsilon_with(
    z: Option<f64>,
    rounds: u64,
    statistics: Option<f64>,
    delta: f64,
) -> Result<f64, AccountError> {
    let mut groups = Vec::new();
    if let (Some(z), true) = (z, rounds > 0) {
        groups.push((1.0, z / 2.0, rounds));
    }
    if let Some(zs) = statistics {
        groups.push((1.0, zs / 2.0, 1));
    }
    if groups.is_empty() {
        return Ok(0.0);
    }
    Ok(accountant::epsilon_of_rounds(&groups, delta)?.0)
}

/// Round number of the statistics release's row (federated standardisation, before
/// round 1).
pub const STATISTICS_ROUND: u64 = 0;

/// The publishable part of the ledger: per release, the mechanism's parameters and the
/// epsilon so far; nothing that depends on who took part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicLedger {
    /// Mode of the federation.
    pub mode: DpMode,
    /// delta of every reported epsilon.
    pub delta: f64,
    /// Neighbouring relation of the guarantee.
    pub neighbouring: String,
    /// Who the epsilon protects against.
    pub adversary: String,
    /// Epsilon so far (see `adversary`).
    pub epsilon: f64,
    /// Releases, in order.
    pub releases: Vec<PublicRelease>,
}

/// One release in the public ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicRelease {
    /// Round number (a round re-run after a crash appears twice).
    pub round: u64,
    /// Sampling rate q.
    pub sampling_rate: f64,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Clipping bound C.
    pub clip_norm: f64,
    /// Epsilon after this release.
    pub epsilon: f64,
    /// Which bound gave it.
    pub method: Method,
}

/// What a configuration will cost, computed before the first round.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Epsilon after all configured rounds (one release each).
    pub epsilon: f64,
    /// With a target: how many releases fit under it.
    pub affordable: Option<u64>,
    /// Who the figure protects against.
    pub adversary: &'static str,
}

/// The epsilon `rounds` releases under `dp` would reach, and how many the target allows.
pub fn plan(dp: &DpParams, rounds: u64) -> Result<Plan, AccountError> {
    let (q, z) = accountant::release_step(dp.mode, dp.sampling_rate, dp.noise_multiplier);
    let adversary = match dp.mode {
        DpMode::Local => "against the server, per client",
        _ => "against observers of the released models",
    };
    let eps = |t: u64| accountant::epsilon(q, z, t, dp.delta).map(|e| e.0);
    let epsilon = eps(rounds)?;
    let affordable = match dp.target_epsilon {
        None => None,
        Some(target) if epsilon <= target => Some(rounds),
        Some(target) => {
            // Largest t in [0, rounds) with eps(t) <= target.
            let (mut lo, mut hi) = (0u64, rounds);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if eps(mid)? <= target {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            Some(lo)
        }
    };
    Ok(Plan {
        epsilon,
        affordable,
        adversary,
    })
}

impl Ledger {
    /// An empty ledger.
    pub fn new(mode: DpMode, delta: f64) -> Self {
        Self {
            mode,
            delta,
            rounds: Vec::new(),
            clients: BTreeMap::new(),
            distributed: None,
        }
    }

    /// `distributed` mode: the [`DistributedLedger`], created at the first round; the
    /// parameters must stay those it was created with.
    fn distributed_ledger(
        &mut self,
        params: &DistributedParams,
    ) -> Result<&mut DistributedLedger, DistributedLedgerError> {
        let d = match self.distributed.take() {
            Some(d) => d,
            None => DistributedLedger::new(*params, self.delta)?,
        };
        let d = self.distributed.insert(d);
        if d.params != *params {
            return Err(DistributedLedgerError::ParamsChanged);
        }
        Ok(d)
    }

    /// `distributed` mode: records a released sum of `contributors` at the round's public
    /// parameters in the [`DistributedLedger`] (both labelled epsilons), and a row whose
    /// epsilon is the one against observers of the models. The parameters must stay those
    /// of the first release; a sum of fewer contributors than accounted is refused.
    pub fn record_distributed(
        &mut self,
        round: u64,
        p: &RoundPrivacy,
        params: &DistributedParams,
        contributors: &[NodeId],
        flip: f64,
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        let d = self.distributed_ledger(params)?;
        let eps = d.record(round, p.sampling_rate, flip, contributors)?;
        let mut row = Self::row(round, p, contributors.len());
        row.epsilon = eps.model_observers;
        row.method = Method::Rdp;
        self.rounds.push(row);
        for n in contributors {
            let c = self.clients.entry(n.clone()).or_default();
            c.rounds_joined += 1;
        }
        // Each client's own figure against the server: its rounds and, if it gave them,
        // its statistics.
        let names: Vec<NodeId> = self.clients.keys().cloned().collect();
        let mut figures = Vec::with_capacity(names.len());
        if let Some(d) = &self.distributed {
            for n in names {
                let e = d.client_server_epsilon(&n)?;
                figures.push((n, e));
            }
        }
        for (n, e) in figures {
            if let Some(c) = self.clients.get_mut(&n) {
                c.epsilon = e;
            }
        }
        Ok(eps)
    }

    /// `distributed` mode: records the feature statistics' release (ledger round 0,
    /// before round 1) at their public parameters `stats`, in the [`DistributedLedger`] of
    /// the training parameters `train` (both labelled epsilons, composed with every
    /// training round that follows), and a row whose epsilon is the one against observers
    /// of the models (and of the agreed transform). A sum of fewer contributors than
    /// `stats.min_contributors` is refused.
    pub fn record_distributed_statistics(
        &mut self,
        train: &DistributedParams,
        stats: &DistributedParams,
        contributors: &[NodeId],
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        if self.mode != DpMode::Distributed {
            return Err(DistributedLedgerError::NotDistributed);
        }
        let d = self.distributed_ledger(train)?;
        let eps = d.record_statistics(stats, contributors)?;
        let mut per_client = Vec::with_capacity(contributors.len());
        for n in contributors {
            per_client.push((n.clone(), d.client_server_epsilon(n)?));
        }
        self.rounds.push(LedgerRound {
            round: STATISTICS_ROUND,
            mode: DpMode::Distributed,
            sampling_rate: 1.0,
            noise_multiplier: stats.noise_multiplier,
            clip_norm: stats.clip_norm,
            participants: contributors.len(),
            population: contributors.len(),
            epsilon: eps.model_observers,
            method: Method::Rdp,
        });
        for (n, e) in per_client {
            let c = self.clients.entry(n).or_default();
            c.statistics = true;
            c.epsilon = e;
        }
        Ok(eps)
    }

    /// `distributed` mode: a round that was run (sampled) and released nothing (no
    /// quorum, secure aggregation not started or aborted, sum withheld). Nothing is added
    /// to the rows, but whether a round is released is itself visible and may depend on one
    /// client: its probability `flip` is added to the run's (see
    /// [`distributed::release_flip_probability`]) and both epsilons are recomputed.
    pub fn record_distributed_unreleased(
        &mut self,
        round: u64,
        params: &DistributedParams,
        flip: f64,
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        let d = self.distributed_ledger(params)?;
        d.record_unreleased(round, flip)
    }

    /// `distributed` mode: both epsilons if one more round like `p`, whose release decision
    /// flips with probability `flip`, is run and released (checked before every attempt):
    /// an error means that round must not start.
    pub fn distributed_epsilons_if(
        &self,
        p: &RoundPrivacy,
        params: &DistributedParams,
        flip: f64,
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        match &self.distributed {
            Some(d) if d.params != *params => Err(DistributedLedgerError::ParamsChanged),
            Some(d) => d.epsilons_if(p.sampling_rate, flip),
            None => DistributedLedger::new(*params, self.delta)?.epsilons_if(p.sampling_rate, flip),
        }
    }

    /// Epsilon so far (0 when DP is off or nothing was released): `central`, every
    /// client's; `local`, that of a client that took part in every release; `distributed`,
    /// against observers of the models (the rows' figure, updated by unreleased rounds).
    pub fn epsilon(&self) -> f64 {
        if let Some(d) = &self.distributed {
            return d.epsilons().model_observers;
        }
        self.rounds.last().map_or(0.0, |r| r.epsilon)
    }

    /// Largest epsilon any single client has actually spent (operator-only figure).
    pub fn max_client_epsilon(&self) -> f64 {
        self.clients.values().map(|c| c.epsilon).fold(0.0, f64::max)
    }

    /// The figure a `target_epsilon` is compared with: [`Ledger::epsilon`] in every mode.
    /// In `local` mode it is the worst case over clients whatever their actual
    /// participation, so the decision to stop reveals nothing about who took part.
    pub fn budget_epsilon(&self) -> f64 {
        self.epsilon()
    }

    /// What the mechanism of one release counts as: (sampling rate, multiplier).
    fn step(r: &LedgerRound) -> (f64, f64) {
        accountant::release_step(r.mode, r.sampling_rate, r.noise_multiplier)
    }

    /// Epsilon over a list of (q, z) steps: the tightest of PLD, RDP and opendp zCDP.
    fn epsilon_of(steps: &[(f64, f64)], delta: f64) -> Result<(f64, Method), AccountError> {
        let mut groups: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for (q, z) in steps {
            *groups.entry((q.to_bits(), z.to_bits())).or_default() += 1;
        }
        let groups: Vec<(f64, f64, u64)> = groups
            .into_iter()
            .map(|((q, z), n)| (f64::from_bits(q), f64::from_bits(z), n))
            .collect();
        accountant::epsilon_of_rounds(&groups, delta)
    }

    /// The epsilon after one more release like `p`, without recording it (for the
    /// `target_epsilon` check before every attempt).
    pub fn epsilon_if(&self, p: &RoundPrivacy) -> Result<f64, AccountError> {
        if let Some(d) = &self.distributed {
            return d
                .epsilons_if(p.sampling_rate, 0.0)
                .map(|e| e.model_observers)
                .map_err(|e| AccountError::Distributed(e.to_string()));
        }
        let mut steps = self.steps();
        steps.push(Self::step(&Self::row(0, p, 0)));
        Ok(Self::epsilon_of(&steps, self.delta)?.0)
    }

    fn steps(&self) -> Vec<(f64, f64)> {
        self.rounds.iter().map(Self::step).collect()
    }

    fn row(round: u64, p: &RoundPrivacy, participants: usize) -> LedgerRound {
        LedgerRound {
            round,
            mode: p.mode,
            sampling_rate: p.sampling_rate,
            noise_multiplier: p.noise_multiplier,
            clip_norm: p.clip_norm,
            participants,
            population: p.population,
            epsilon: 0.0,
            method: Method::Rdp,
        }
    }

    fn push(
        &mut self,
        round: u64,
        p: &RoundPrivacy,
        participants: usize,
        joined: &[NodeId],
    ) -> Result<(), AccountError> {
        let mut row = Self::row(round, p, participants);
        let mut steps = self.steps();
        steps.push(Self::step(&row));
        let (eps, method) = Self::epsilon_of(&steps, self.delta)?;
        row.epsilon = eps;
        row.method = method;
        self.rounds.push(row);
        for n in joined {
            self.clients.entry(n.clone()).or_default().rounds_joined += 1;
        }
        self.refresh_clients()
    }

    fn refresh_clients(&mut self) -> Result<(), AccountError> {
        // The training rounds' multiplier, and the statistics release's apart.
        let z = self
            .rounds
            .iter()
            .rev()
            .find(|r| r.round != STATISTICS_ROUND)
            .map(|r| r.noise_multiplier);
        let zs = self
            .rounds
            .iter()
            .find(|r| r.round == STATISTICS_ROUND)
            .map(|r| r.noise_multiplier);
        let central = self.epsilon();
        let delta = self.delta;
        let mode = self.mode;
        // One accountant call per distinct participation count, not per client: a
        // population of thousands shares a few dozen counts.
        let mut by_count: BTreeMap<(u64, bool), f64> = BTreeMap::new();
        for c in self.clients.values_mut() {
            c.epsilon = match mode {
                DpMode::Local => match by_count.get(&(c.rounds_joined, c.statistics)) {
                    Some(e) => *e,
                    None => {
                        let e = local_client_epsilon_with(
                            z,
                            c.rounds_joined,
                            zs.filter(|_| c.statistics),
                            delta,
                        )?;
                        by_count.insert((c.rounds_joined, c.statistics), e);
                        e
                    }
                },
                _ => central,
            };
        }
        Ok(())
    }

    /// Records the release of the federated feature statistics (round
    /// [`STATISTICS_ROUND`]): one Gaussian mechanism with multiplier `z` at sensitivity
    /// `sensitivity` (kept in the row's `clip_norm`), every contributor included (q = 1),
    /// under the ledger's relation (add/remove one client; in `local` mode against the
    /// server, z/2 like the updates). Composed with the training rounds like any row.
    pub fn record_statistics(
        &mut self,
        z: f64,
        sensitivity: f64,
        contributors: &[NodeId],
    ) -> Result<f64, AccountError> {
        let p = RoundPrivacy {
            mode: self.mode,
            sampling_rate: 1.0,
            noise_multiplier: z,
            clip_norm: sensitivity,
            clipped_fraction: None,
            clipped_fraction_noised: None,
            population: contributors.len(),
            released: true,
        };
        let mut row = Self::row(STATISTICS_ROUND, &p, contributors.len());
        let mut steps = self.steps();
        steps.push(Self::step(&row));
        let (eps, method) = Self::epsilon_of(&steps, self.delta)?;
        row.epsilon = eps;
        row.method = method;
        self.rounds.push(row);
        for n in contributors {
            self.clients.entry(n.clone()).or_default().statistics = true;
        }
        self.refresh_clients()?;
        Ok(eps)
    }

    /// Records a release and the clients whose updates it used.
    pub fn record(
        &mut self,
        round: u64,
        p: &RoundPrivacy,
        joined: &[NodeId],
    ) -> Result<(), AccountError> {
        if !p.released {
            return Ok(());
        }
        self.push(round, p, joined.len(), joined)
    }

    /// Whether `self` extends `earlier`: same mode and delta, and `earlier`'s releases are
    /// a prefix of this ledger's. A ledger journaled before a release extends the
    /// checkpoint's ledger when the process died between the two writes.
    pub fn extends(&self, earlier: &Ledger) -> bool {
        self.mode == earlier.mode
            && self.delta == earlier.delta
            && self.rounds.len() >= earlier.rounds.len()
            && self.rounds[..earlier.rounds.len()] == earlier.rounds[..]
    }

    /// The publishable view (see [`PublicLedger`]).
    pub fn public(&self) -> PublicLedger {
        let adversary = match self.mode {
            DpMode::None => "none: differential privacy is off",
            DpMode::Local => {
                "the server and everyone who sees what it sees (each client's own noised \
                 updates); epsilon of a client that took part in every release, sensitivity \
                 2C, no amplification by sampling"
            }
            DpMode::Distributed => {
                "everyone who sees the released models, other nodes included (the server \
                 sees only the securely aggregated sum of the nodes' noised encodings); \
                 Poisson sampling at rate q from the OS CSPRNG, sample not published. \
                 Against the server itself (no amplification): `distributed.server`"
            }
            _ => {
                "everyone who sees the released models, other nodes included (the server is \
                 trusted with clipped updates); Poisson sampling at rate q from the OS \
                 CSPRNG, sample not published"
            }
        };
        PublicLedger {
            mode: self.mode,
            delta: self.delta,
            neighbouring: "add or remove one client with all of its data".into(),
            adversary: adversary.into(),
            epsilon: self.epsilon(),
            releases: self
                .rounds
                .iter()
                .map(|r| PublicRelease {
                    round: r.round,
                    sampling_rate: r.sampling_rate,
                    noise_multiplier: r.noise_multiplier,
                    clip_norm: r.clip_norm,
                    epsilon: r.epsilon,
                    method: r.method,
                })
                .collect(),
        }
    }

    /// A human-readable summary for the end of a run (operator log: names clients).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "privacy ledger: mode={} delta={:e} releases={} ",
            self.mode,
            self.delta,
            self.rounds.len()
        );
        match self.mode {
            DpMode::Local => s.push_str(&format!(
                "| epsilon against the server: {:.4} for a client in every release, max actual {:.4}",
                self.epsilon(),
                self.max_client_epsilon()
            )),
            DpMode::Distributed => {
                let e = self.distributed.as_ref().map_or(
                    DistributedEpsilons {
                        model_observers: 0.0,
                        server: 0.0,
                    },
                    DistributedLedger::epsilons,
                );
                s.push_str(&format!(
                    "| epsilon against observers of the models {:.4} (amplified by sampling); \
                     against the server {:.4} for a client in every release, max actual {:.4}",
                    e.model_observers,
                    e.server,
                    self.max_client_epsilon()
                ))
            }
            _ => s.push_str(&format!("| epsilon {:.4} (every client)", self.epsilon())),
        }
        for (n, c) in &self.clients {
            s.push_str(&format!(
                "\n  {n}: releases joined {}, epsilon {:.4}",
                c.rounds_joined, c.epsilon
            ));
        }
        s
    }
}

/// One distributed-DP release: a round whose modular sum secure aggregation unmasked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistributedRelease {
    /// Round number.
    pub round: u64,
    /// Poisson sampling rate q of the round.
    pub sampling_rate: f64,
    /// Contributors in the unmasked sum (never below the accounted minimum).
    pub contributors: usize,
    /// Both epsilons after this release (the server's: a client that took part in every
    /// release so far).
    pub epsilons: DistributedEpsilons,
}

/// Why a distributed release cannot be recorded.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DistributedLedgerError {
    /// The sum has fewer contributors than the noise was accounted for: it must not be
    /// released (less noise than the ledger assumes).
    #[error("a sum of {contributors} contributors is below the accounted minimum {min}")]
    TooFewContributors {
        /// Contributors in the sum.
        contributors: usize,
        /// The accounted minimum.
        min: usize,
    },
    /// Accounting failed.
    #[error(transparent)]
    Account(#[from] DistributedAccountError),
    /// A release at other public parameters than the ledger's.
    #[error("distributed DP parameters changed during the run")]
    ParamsChanged,
    /// A distributed release asked of a federation that is not in `distributed` mode.
    #[error("the federation is not in dp mode distributed")]
    NotDistributed,
    /// The feature statistics are released once per run.
    #[error("the feature statistics' release is already recorded")]
    StatisticsTwice,
}

/// The federated feature statistics' release in `distributed` mode (ledger round 0): the
/// secure sum of the nodes' normalised statistics, each with its integer noise share, at
/// their own public parameters (`dim` = 3d + classes, clip `sqrt(3d + 1)`), unsampled
/// (every holder asked: q = 1), composed with the training rounds order by order in RDP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistributedStatistics {
    /// The release's public parameters.
    pub params: DistributedParams,
    /// Contributors in the unmasked sum (never below `params.min_contributors`).
    pub contributors: usize,
    /// Who contributed (operator-only, like [`DistributedLedger::joined`]).
    pub joined: std::collections::BTreeSet<NodeId>,
}

/// The ledger of a `distributed` federation: both labelled epsilons of every release,
/// recomputed from the rows ([`Ledger::record_distributed`] keeps it).
///
/// - `model_observers`: against anyone who sees the released models, amplified by the
///   Poisson sampling of each release (public: it does not depend on who took part);
/// - `server`: against the server, which knows who took part: no amplification,
///   replace-one sensitivity, over the releases a client took part in.
///   [`DistributedLedger::epsilons`] reports it for a client that took part in every
///   release (public); [`DistributedLedger::client_server_epsilon`] is each client's
///   actual figure (operator-only: it reveals participation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistributedLedger {
    /// The federation's distributed-DP parameters.
    pub params: DistributedParams,
    /// delta of every reported epsilon.
    pub delta: f64,
    /// Releases, in order.
    pub releases: Vec<DistributedRelease>,
    /// Releases each client took part in.
    pub joined: BTreeMap<NodeId, u64>,
    /// Rounds run (sampled) that released nothing.
    #[serde(default)]
    pub unreleased: Vec<u64>,
    /// Summed over every round run, released or not: the probability that whether it was
    /// released depended on one client ([`distributed::release_flip_probability`]); it is
    /// inside `model_observers` ([`distributed::model_epsilon_with_release_flip`]).
    #[serde(default)]
    pub release_flip: f64,
    /// Both epsilons now (after the last release or unreleased round).
    #[serde(default = "zero_epsilons")]
    pub current: DistributedEpsilons,
    /// The feature statistics' release before round 1 (`[standardize]`), composed into
    /// both epsilons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<DistributedStatistics>,
}

fn zero_epsilons() -> DistributedEpsilons {
    DistributedEpsilons {
        model_observers: 0.0,
        server: 0.0,
    }
}

impl DistributedLedger {
    /// An empty ledger; the parameters must be usable.
    pub fn new(params: DistributedParams, delta: f64) -> Result<Self, DistributedLedgerError> {
        // validates params and delta
        distributed::server_epsilon(&params, 0, delta)?;
        Ok(Self {
            params,
            delta,
            releases: Vec::new(),
            joined: BTreeMap::new(),
            unreleased: Vec::new(),
            release_flip: 0.0,
            current: zero_epsilons(),
            statistics: None,
        })
    }

    /// Both epsilons over the releases, one more at rate `extra` if given, with the summed
    /// release-decision probability `flip`.
    fn epsilons_with(
        &self,
        extra: Option<f64>,
        flip: f64,
    ) -> Result<DistributedEpsilons, DistributedAccountError> {
        let mut groups: BTreeMap<u64, u64> = BTreeMap::new();
        for r in &self.releases {
            *groups.entry(r.sampling_rate.to_bits()).or_default() += 1;
        }
        if let Some(q) = extra {
            *groups.entry(q.to_bits()).or_default() += 1;
        }
        let groups: Vec<(f64, u64)> = groups
            .into_iter()
            .map(|(q, n)| (f64::from_bits(q), n))
            .collect();
        let n = groups.iter().map(|(_, c)| *c).sum();
        let statistics: Vec<(DistributedParams, u64)> =
            self.statistics.iter().map(|s| (s.params, 1)).collect();
        let mut parts = vec![(self.params, n)];
        parts.extend(statistics.iter().copied());
        Ok(DistributedEpsilons {
            model_observers: distributed::model_epsilon_composed(
                &self.params,
                &groups,
                &statistics,
                self.delta,
                flip,
            )?,
            server: distributed::server_epsilon_composed(&parts, self.delta)?,
        })
    }

    /// Both epsilons so far (zero before the first round).
    pub fn epsilons(&self) -> DistributedEpsilons {
        self.current
    }

    /// Both epsilons after one more round at rate `q` whose release decision flips with
    /// probability `flip`, released, without recording it (checked before every attempt).
    pub fn epsilons_if(
        &self,
        sampling_rate: f64,
        flip: f64,
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        let flip = self.release_flip + flip;
        Ok(self.epsilons_with(Some(sampling_rate), flip)?)
    }

    /// Records a released sum of `contributors` (sampled at `sampling_rate`; the round's
    /// release decision flipped with probability `flip`) and returns both epsilons after
    /// it. Nothing is recorded on error.
    pub fn record(
        &mut self,
        round: u64,
        sampling_rate: f64,
        flip: f64,
        contributors: &[NodeId],
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        if contributors.len() < self.params.min_contributors {
            return Err(DistributedLedgerError::TooFewContributors {
                contributors: contributors.len(),
                min: self.params.min_contributors,
            });
        }
        let flip = self.release_flip + flip;
        let epsilons = self.epsilons_with(Some(sampling_rate), flip)?;
        self.release_flip = flip;
        self.current = epsilons;
        self.releases.push(DistributedRelease {
            round,
            sampling_rate,
            contributors: contributors.len(),
            epsilons,
        });
        for n in contributors {
            *self.joined.entry(n.clone()).or_default() += 1;
        }
        Ok(epsilons)
    }

    /// Records a round run without a release: its release-decision probability counts
    /// (kept even when the epsilons can no longer be computed: the round did happen).
    pub fn record_unreleased(
        &mut self,
        round: u64,
        flip: f64,
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        self.release_flip += flip;
        self.unreleased.push(round);
        let epsilons = self.epsilons_with(None, self.release_flip)?;
        self.current = epsilons;
        Ok(epsilons)
    }

    /// A client's actual epsilon against the server (operator-only).
    pub fn client_server_epsilon(&self, node: &str) -> Result<f64, DistributedLedgerError> {
        let n = self.joined.get(node).copied().unwrap_or(0);
        let mut parts = vec![(self.params, n)];
        if let Some(s) = self.statistics.as_ref().filter(|s| s.joined.contains(node)) {
            parts.push((s.params, 1));
        }
        Ok(distributed::server_epsilon_composed(&parts, self.delta)?)
    }

    /// Records the feature statistics' release (once, before round 1): a sum of
    /// `contributors` at `params`; returns both epsilons after it. Nothing is recorded on
    /// error (fewer contributors than the noise is accounted over, a second release, or
    /// parameters the accountant refuses).
    pub fn record_statistics(
        &mut self,
        params: &DistributedParams,
        contributors: &[NodeId],
    ) -> Result<DistributedEpsilons, DistributedLedgerError> {
        if self.statistics.is_some() {
            return Err(DistributedLedgerError::StatisticsTwice);
        }
        if contributors.len() < params.min_contributors {
            return Err(DistributedLedgerError::TooFewContributors {
                contributors: contributors.len(),
                min: params.min_contributors,
            });
        }
        let mut next = self.clone();
        next.statistics = Some(DistributedStatistics {
            params: *params,
            contributors: contributors.len(),
            joined: contributors.iter().cloned().collect(),
        });
        let epsilons = next.epsilons_with(None, next.release_flip)?;
        next.current = epsilons;
        *self = next;
        Ok(epsilons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privacy(mode: DpMode, q: f64, z: f64) -> RoundPrivacy {
        RoundPrivacy {
            mode,
            sampling_rate: q,
            noise_multiplier: z,
            clip_norm: 1.0,
            clipped_fraction: None,
            clipped_fraction_noised: None,
            population: 100,
            released: true,
        }
    }

    #[test]
    fn central_ledger_matches_the_calculator() {
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        let p = privacy(DpMode::Central, 0.1, 1.0);
        for r in 1..=10 {
            l.record(r, &p, &["a".to_string()]).unwrap();
        }
        let (calc, method) = accountant::epsilon(0.1, 1.0, 10, 1e-5).unwrap();
        assert!((l.epsilon() - calc).abs() < 1e-12);
        assert_eq!(l.rounds[9].method, method);
        // Reference (q=0.1, z=1, T=10): dp_accounting PLD 2.8545 (RDP 3.442).
        assert_eq!(method, Method::Pld);
        assert!(l.epsilon() >= 2.8545 && l.epsilon() / 2.8545 - 1.0 < 0.01);
        assert_eq!(l.clients["a"].rounds_joined, 10);
        assert_eq!(l.clients["a"].epsilon, l.epsilon());
        // Epsilon grows monotonically round by round.
        assert!(l.rounds.windows(2).all(|w| w[0].epsilon < w[1].epsilon));
    }

    #[test]
    fn local_ledger_counts_each_clients_own_rounds() {
        let mut l = Ledger::new(DpMode::Local, 1e-5);
        let p = privacy(DpMode::Local, 0.5, 2.0);
        l.record(1, &p, &["a".into(), "b".into()]).unwrap();
        l.record(2, &p, &["a".into()]).unwrap();
        assert_eq!(l.clients["a"].rounds_joined, 2);
        assert_eq!(l.clients["b"].rounds_joined, 1);
        // Against the server: multiplier z/2 = 1, q = 1 -> one Gaussian round: exactly
        // 4.3772 (PLD; zCDP's rho = 0.5 gives 4.728).
        assert!(
            (l.clients["b"].epsilon - 4.3772).abs() < 0.01,
            "{}",
            l.clients["b"].epsilon
        );
        assert!(l.clients["a"].epsilon > l.clients["b"].epsilon);
        // The public figure and the budget are the worst case: a client in every release.
        assert!((l.epsilon() - local_client_epsilon(2.0, 2, 1e-5).unwrap()).abs() < 1e-12);
        assert_eq!(l.budget_epsilon(), l.epsilon());
        // The next release's worst case is a client joining for the third time.
        let next = l.epsilon_if(&p).unwrap();
        assert!((next - local_client_epsilon(2.0, 3, 1e-5).unwrap()).abs() < 1e-12);
    }

    /// The statistics release (round 0) composes with the training rounds. References:
    /// scipy 1.17, the analytic Gaussian mechanism (Balle and Wang 2018) at delta 1e-5;
    /// q = 1 Gaussians compose into one with mu = sqrt(sum (s / z)^2), s = 2 against the
    /// server in local mode (a client's contribution anywhere in the ball).
    #[test]
    fn statistics_release_is_a_row_composed_with_training() {
        // Local: statistics at z = 4 (mu 0.5: eps 1.99309), then one round at z = 4
        // (mu = sqrt(0.5): eps 2.94323) for a client that took part in both.
        let mut l = Ledger::new(DpMode::Local, 1e-5);
        let e = l
            .record_statistics(4.0, 3.0, &["a".to_string(), "b".to_string()])
            .unwrap();
        assert!((1.993_091 - 1e-3..=1.993_091 * 1.01).contains(&e), "{e}");
        assert_eq!(l.rounds[0].round, STATISTICS_ROUND);
        assert_eq!(l.rounds[0].clip_norm, 3.0);
        assert!(l.clients["a"].statistics && l.clients["a"].rounds_joined == 0);
        assert!((l.clients["a"].epsilon - e).abs() < 1e-9);
        l.record(
            1,
            &privacy(DpMode::Local, 1.0, 4.0),
            &["a".to_string(), "c".to_string()],
        )
        .unwrap();
        let both = l.clients["a"].epsilon;
        assert!(
            (2.943_225 - 1e-3..=2.943_225 * 1.01).contains(&both),
            "{both}"
        );
        // A client only in the training round spent one round at z = 4 (mu 0.5) only.
        let c = l.clients["c"].epsilon;
        assert!((1.993_091 - 1e-3..=1.993_091 * 1.01).contains(&c), "{c}");
        // "b" gave statistics only.
        assert!((l.clients["b"].epsilon - e).abs() < 1e-9);
        assert!((l.epsilon() - both).abs() < 1e-9);
        // Central: z = 2 statistics, then z = 1 (mu = sqrt(1.25): eps 4.98331).
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        l.record_statistics(2.0, 3.0, &["a".to_string()]).unwrap();
        l.record(1, &privacy(DpMode::Central, 1.0, 1.0), &["a".to_string()])
            .unwrap();
        let e = l.epsilon();
        assert!((4.983_306 - 1e-3..=4.983_306 * 1.01).contains(&e), "{e}");
        assert_eq!(l.public().releases[0].round, 0);
    }

    #[test]
    fn local_mode_reports_no_aggregate_view_epsilon() {
        // Audit: with one participant per round the ledger printed a finite "aggregate
        // view" epsilon (z * sqrt(max(m, 2) - 1) amplified by sampling), far below the
        // client's real spend against the server. Under add/remove that figure is not a
        // valid bound; the only local figure is the spend against the server.
        let mut l = Ledger::new(DpMode::Local, 1e-5);
        let p = privacy(DpMode::Local, 0.1, 1.0);
        for r in 1..=10 {
            l.record(r, &p, &["solo".to_string()]).unwrap();
        }
        let against_server = local_client_epsilon(1.0, 10, 1e-5).unwrap();
        assert!(
            (l.epsilon() - against_server).abs() < 1e-9,
            "{}",
            l.epsilon()
        );
        assert!((l.clients["solo"].epsilon - against_server).abs() < 1e-9);
        assert!(!l.summary().contains("aggregate"));
    }

    #[test]
    fn public_view_names_no_client_and_no_counts() {
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        l.record(
            1,
            &privacy(DpMode::Central, 0.2, 1.5),
            &["hospital-a".into()],
        )
        .unwrap();
        let json = serde_json::to_string(&l.public()).unwrap();
        assert!(!json.contains("hospital-a"), "{json}");
        assert!(!json.contains("participants") && !json.contains("population"));
        assert_eq!(l.public().releases.len(), 1);
        assert!(l.public().adversary.contains("released models"));
    }

    #[test]
    fn plan_reports_the_final_epsilon_and_the_rounds_a_target_allows() {
        let dp = DpParams {
            mode: DpMode::Central,
            noise_multiplier: 1.0,
            sampling_rate: 0.1,
            target_epsilon: Some(3.442),
            ..Default::default()
        };
        let p = plan(&dp, 100).unwrap();
        // Reference (T=100): dp_accounting PLD 7.0466 (RDP 7.904).
        assert!(
            p.epsilon >= 7.0466 && p.epsilon / 7.0466 - 1.0 < 0.01,
            "{}",
            p.epsilon
        );
        assert_eq!(
            p.epsilon,
            accountant::epsilon(0.1, 1.0, 100, 1e-5).unwrap().0
        );
        // RDP reaches 3.442 in 10 rounds; the PLD in 17 (3.392; 18 give 3.460).
        assert_eq!(p.affordable, Some(17), "{:?}", p.affordable);
        let tiny = DpParams {
            target_epsilon: Some(0.01),
            ..dp
        };
        assert_eq!(plan(&tiny, 100).unwrap().affordable, Some(0));
    }

    #[test]
    fn a_journaled_ledger_extends_the_checkpointed_one() {
        let p = privacy(DpMode::Central, 0.1, 1.0);
        let mut ckpt = Ledger::new(DpMode::Central, 1e-5);
        ckpt.record(1, &p, &[]).unwrap();
        let mut journal = ckpt.clone();
        journal.record(2, &p, &[]).unwrap();
        assert!(journal.extends(&ckpt));
        assert!(!ckpt.extends(&journal));
        let mut other = Ledger::new(DpMode::Central, 1e-5);
        other
            .record(1, &privacy(DpMode::Central, 0.5, 1.0), &[])
            .unwrap();
        assert!(!journal.extends(&other));
    }

    #[test]
    fn unreleased_central_round_costs_nothing() {
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        let mut p = privacy(DpMode::Central, 0.1, 1.0);
        p.released = false;
        l.record(1, &p, &[]).unwrap();
        assert!(l.rounds.is_empty());
        assert_eq!(l.epsilon(), 0.0);
    }

    #[test]
    fn ledger_round_trips_through_json() {
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        l.record(1, &privacy(DpMode::Central, 0.2, 1.5), &["x".into()])
            .unwrap();
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }

    fn ddp_params() -> DistributedParams {
        DistributedParams {
            mechanism: dpfl_common::dp::distributed::Mechanism::Skellam,
            bits: 16,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            min_contributors: 3,
            max_contributors: 5,
            dim: 1000,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        }
    }

    #[test]
    fn distributed_ledger_records_both_epsilons_and_refuses_thin_sums() {
        let p = ddp_params();
        let mut l = DistributedLedger::new(p, 1e-5).unwrap();
        assert_eq!(l.epsilons().model_observers, 0.0);
        let ids: Vec<NodeId> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        // No release-decision term (the next test covers it).
        let before = l.epsilons_if(0.1, 0.0).unwrap();
        let e1 = l.record(1, 0.1, 0.0, &ids[..3]).unwrap();
        assert_eq!(before, e1);
        assert_eq!(
            e1.model_observers,
            distributed::model_epsilon(&p, 0.1, 1, 1e-5).unwrap()
        );
        assert_eq!(e1.server, distributed::server_epsilon(&p, 1, 1e-5).unwrap());
        let e2 = l.record(2, 0.2, 0.0, &ids[1..]).unwrap();
        assert!(e2.model_observers > e1.model_observers && e2.server > e1.server);
        assert_eq!(
            e2.model_observers,
            distributed::model_epsilon_of_rounds(&p, &[(0.1, 1), (0.2, 1)], 1e-5).unwrap()
        );
        // client a joined once, b twice
        assert_eq!(l.client_server_epsilon("a").unwrap(), e1.server);
        assert_eq!(l.client_server_epsilon("b").unwrap(), e2.server);
        assert_eq!(l.client_server_epsilon("zz").unwrap(), 0.0);
        // below the accounted minimum: refused, nothing recorded
        assert_eq!(
            l.record(3, 0.1, 0.0, &ids[..2]),
            Err(DistributedLedgerError::TooFewContributors {
                contributors: 2,
                min: 3
            })
        );
        assert_eq!(l.releases.len(), 2);
        let mut bad = p;
        bad.bits = 2;
        assert!(DistributedLedger::new(bad, 1e-5).is_err());
    }

    /// The statistics' release in `distributed` mode: row 0, composed into both
    /// epsilons of every later round, in the figures of its contributors only.
    #[test]
    fn distributed_statistics_are_row_zero_and_compose_with_training() {
        let p = ddp_params();
        let mut st = p;
        st.dim = 3 * 4 + 2;
        st.clip_norm = 13f64.sqrt();
        st.noise_multiplier = 2.0;
        let ids: Vec<NodeId> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let mut central = Ledger::new(DpMode::Central, 1e-5);
        assert_eq!(
            central.record_distributed_statistics(&p, &st, &ids),
            Err(DistributedLedgerError::NotDistributed)
        );
        let mut l = Ledger::new(DpMode::Distributed, 1e-5);
        assert!(matches!(
            l.record_distributed_statistics(&p, &st, &ids[..2]),
            Err(DistributedLedgerError::TooFewContributors {
                contributors: 2,
                min: 3
            })
        ));
        assert!(l.rounds.is_empty());
        let e0 = l.record_distributed_statistics(&p, &st, &ids[..3]).unwrap();
        let alone = distributed::model_epsilon_composed(&p, &[], &[(st, 1)], 1e-5, 0.0).unwrap();
        assert_eq!(e0.model_observers, alone);
        assert_eq!(
            e0.server,
            distributed::server_epsilon_composed(&[(st, 1)], 1e-5).unwrap()
        );
        assert_eq!(l.rounds.len(), 1);
        let row = &l.rounds[0];
        assert_eq!(
            (
                row.round,
                row.sampling_rate,
                row.noise_multiplier,
                row.clip_norm
            ),
            (STATISTICS_ROUND, 1.0, 2.0, 13f64.sqrt())
        );
        assert_eq!(row.epsilon, alone);
        assert!(l.clients["a"].statistics && !l.clients.contains_key("d"));
        assert_eq!(
            l.record_distributed_statistics(&p, &st, &ids[..3]),
            Err(DistributedLedgerError::StatisticsTwice)
        );
        // One training round at q = 0.5 with b, c, d.
        let mut q = privacy(DpMode::Distributed, 0.5, 1.0);
        q.population = 4;
        let before = l.distributed_epsilons_if(&q, &p, 0.0).unwrap();
        let e1 = l.record_distributed(1, &q, &p, &ids[1..], 0.0).unwrap();
        assert_eq!(before, e1);
        assert_eq!(
            e1.model_observers,
            distributed::model_epsilon_composed(&p, &[(0.5, 1)], &[(st, 1)], 1e-5, 0.0).unwrap()
        );
        assert!(e1.model_observers > distributed::model_epsilon(&p, 0.5, 1, 1e-5).unwrap());
        assert_eq!(l.epsilon(), e1.model_observers);
        // a: statistics only; b: statistics and the round; d: the round only.
        let both = distributed::server_epsilon_composed(&[(p, 1), (st, 1)], 1e-5).unwrap();
        assert_eq!(l.clients["a"].epsilon, e0.server);
        assert_eq!(l.clients["b"].epsilon, both);
        assert_eq!(
            l.clients["d"].epsilon,
            distributed::server_epsilon(&p, 1, 1e-5).unwrap()
        );
        assert_eq!(e1.server, both);
        // The journaled ledger round-trips with its statistics.
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn every_round_run_counts_in_the_release_decision_and_too_much_stops_releases() {
        // 1,000 clients at q = 0.1 (about 100 sampled), accounted over 50, at most 200.
        let mut p = ddp_params();
        p.min_contributors = 50;
        p.max_contributors = 200;
        let flip = distributed::release_flip_probability(
            1000,
            0.1,
            &distributed::default_release_edges(&p),
        );
        assert!(flip > 0.0 && flip < 1e-8, "{flip}");
        let mut ledger = Ledger::new(DpMode::Distributed, 1e-5);
        let ids: Vec<NodeId> = (0..60).map(|i| format!("n{i}")).collect();
        let mut q = privacy(DpMode::Distributed, 0.1, 1.0);
        q.population = 1000;
        let next = ledger.distributed_epsilons_if(&q, &p, flip).unwrap();
        let e1 = ledger.record_distributed(1, &q, &p, &ids, flip).unwrap();
        assert_eq!(next, e1);
        // Round 2 runs and releases nothing: it still counts.
        let e2 = ledger.record_distributed_unreleased(2, &p, flip).unwrap();
        let e3 = ledger.record_distributed(3, &q, &p, &ids, flip).unwrap();
        let d = ledger.distributed.as_ref().unwrap();
        assert_eq!(d.unreleased, vec![2]);
        assert!((d.release_flip - 3.0 * flip).abs() < 1e-20);
        let expect = |releases: u64, flips: f64| {
            distributed::model_epsilon_of_rounds(&p, &[(0.1, releases)], 1e-5 - flips).unwrap()
        };
        assert_eq!(e1.model_observers, expect(1, flip));
        assert_eq!(e2.model_observers, expect(1, 2.0 * flip));
        assert!(e2.model_observers > e1.model_observers);
        assert_eq!(e3.model_observers, expect(2, 3.0 * flip));
        assert_eq!(ledger.epsilon(), e3.model_observers);
        // The server's figure is about participation, not the decision.
        assert_eq!(e2.server, e1.server);
        // Accounted over 80 of about 100: whether a round is released depends on one client
        // in about 8 rounds in 10,000 — at delta 1e-5 no epsilon holds, and nothing is
        // recorded or released.
        let mut close = p;
        close.min_contributors = 80;
        let flip80 = distributed::release_flip_probability(
            1000,
            0.1,
            &distributed::default_release_edges(&close),
        );
        let mut ledger = Ledger::new(DpMode::Distributed, 1e-5);
        let e = ledger
            .distributed_epsilons_if(&q, &close, flip80)
            .unwrap_err();
        assert!(e.to_string().contains("min_contributors"), "{e}");
        assert!(ledger
            .record_distributed(1, &q, &close, &ids, flip80)
            .is_err());
        assert!(ledger.rounds.is_empty());
        assert_eq!(ledger.epsilon(), 0.0);
    }
}
