//! The round coordinator: a state machine that runs rounds, driven by events and a clock.
//!
//! Like `quinn-proto`, it owns no socket and reads no clock: the driver feeds it events
//! (`handle_*`, each with `now`), asks for what to do next ([`Coordinator::poll_action`])
//! and when to wake it up ([`Coordinator::poll_timeout`]). The real server drives it from
//! QUIC connections; the simulator and the unit tests drive it directly.
//!
//! A round: check the privacy budget, select (strategy; selection randomness from the OS
//! CSPRNG in deployments, seeded only in simulations and tests), send train requests,
//! collect updates until every selected client answered or the deadline passed, then
//! aggregate if at least the quorum answered, otherwise retry or, after
//! `max_round_retries`, abandon the round. With DP on a retry asks the **same** Poisson
//! sample again (a fresh sample would make the released sample no longer Poisson(q)), the
//! budget is checked before every attempt, and in `central` mode a round is never
//! abandoned: after its last attempt it is released with what arrived (the decision to
//! release must not depend on how many clients answered). Every update is validated
//! (round, sender, spec, length, finite, magnitude, norm plausibility, claimed weight,
//! metric ranges) before the strategy sees it; a rejected update changes neither the model
//! nor the ledger. Then optional federated evaluation, then the next round.

use crate::ledger::Ledger;
use crate::secure::{SecAggSend, SecAggSettings};
use crate::strategy::{DpParams, EvalSummary, Failure, FitResult, NodeId, RoundPrivacy, Strategy};
use dpfl_common::config::{ClientPrivacy, DpMode};
use dpfl_common::dp::distributed::{DistributedEpsilons, DistributedParams};
use dpfl_common::dp::encoding::DistributedEncoder;
use dpfl_common::model::{ModelSpec, SpecHash};
use dpfl_common::wire::printable;
use dpfl_common::wire::{
    DistributedRound, EvalResult, EvaluateRequest, SecAggSpec, TrainRequest, UpdateMeta,
};
use dpfl_secagg::messages::{FromNode, Stage};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of the coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Total rounds.
    pub rounds: u64,
    /// Connected clients needed before a round starts.
    pub min_clients: usize,
    /// Accepted updates needed to aggregate a round that did not hear from everyone.
    pub min_fit_clients: usize,
    /// Deadline of a training round.
    pub round_timeout: Duration,
    /// Deadline of a federated evaluation.
    pub eval_timeout: Duration,
    /// Re-selections of a round that missed its quorum before it is abandoned.
    pub max_round_retries: u32,
    /// Where selection randomness comes from.
    pub selection: Selection,
    /// Bounds every update must respect.
    pub limits: UpdateLimits,
    /// The model.
    pub spec: ModelSpec,
    /// DP parameters (for the ledger and the budget check).
    pub dp: DpParams,
    /// Secure aggregation (`None`: updates arrive in the clear).
    pub secure_aggregation: Option<SecAggSettings>,
}

/// Where client selection draws its randomness from.
///
/// Amplification by sampling, which every `q < 1` epsilon relies on, holds only if nobody
/// can predict the sample: deployments use [`Selection::Os`]. A seed makes simulations and
/// tests reproducible and must never drive a deployment's selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// A fresh ChaCha20 key from the operating system's CSPRNG for every draw.
    Os,
    /// Reproducible draws from a seed (simulations and tests only).
    Seeded(u64),
}

/// What a node declared when it joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Training examples it holds (bounds the weight it may claim in mode `none`).
    pub num_examples: u64,
    /// Held-out examples (bounds the count of its evaluation answers).
    pub num_eval_examples: u64,
}

/// Bounds every accepted update respects (one node must not be able to veto or steer a
/// round by sending extreme values).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateLimits {
    /// Largest absolute value of any coordinate (finite is not enough: values near
    /// f32::MAX overflow any sum).
    pub max_abs_value: f32,
    /// Mode `none` only: largest L2 norm of an update (`None`: unbounded). With DP on the
    /// clip norm bounds it (central re-clips; local checks plausibility against C and z).
    pub max_update_norm: Option<f64>,
    /// Mode `none` only: the largest share of a round's total weight one node may carry,
    /// enforced by capping claimed example counts (1 = no cap). A node also never claims
    /// more examples than it declared when it joined.
    pub max_weight_share: f64,
    /// Log updates whose norm exceeds this multiple of the round's median norm.
    pub outlier_factor: f64,
}

impl Default for UpdateLimits {
    fn default() -> Self {
        Self {
            max_abs_value: 1e4,
            max_update_norm: None,
            max_weight_share: 0.5,
            outlier_factor: 10.0,
        }
    }
}

impl UpdateLimits {
    /// Range checks.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.max_abs_value.is_finite() && self.max_abs_value > 0.0) {
            return Err(format!(
                "update_limits.max_abs_value must be finite and > 0, got {}",
                self.max_abs_value
            ));
        }
        if let Some(n) = self.max_update_norm {
            if !(n.is_finite() && n > 0.0) {
                return Err(format!(
                    "update_limits.max_update_norm must be finite and > 0, got {n}"
                ));
            }
        }
        if !(self.max_weight_share > 0.0 && self.max_weight_share <= 1.0) {
            return Err(format!(
                "update_limits.max_weight_share must be in (0, 1], got {}",
                self.max_weight_share
            ));
        }
        if !(self.outlier_factor.is_finite() && self.outlier_factor > 1.0) {
            return Err(format!(
                "update_limits.outlier_factor must be > 1, got {}",
                self.outlier_factor
            ));
        }
        Ok(())
    }
}

/// Per-node caps on the FedAvg weight in one round, pessimistic about who answers: node
/// i may carry at most `share / (1 - share)` times the weight of the `quorum - 1` smallest
/// declared counts of the other selected nodes, so its share stays within `share` even if
/// only the quorum answers (the round closes with no fewer). Never above its own declared
/// count. With a quorum of one, or `share >= 1`, there is no cap.
pub fn pessimistic_weight_caps(
    declared: &[(NodeId, u64)],
    share: f64,
    quorum: usize,
) -> BTreeMap<NodeId, u64> {
    if share >= 1.0 || quorum <= 1 {
        return declared.iter().cloned().collect();
    }
    let mut sorted: Vec<u64> = declared.iter().map(|(_, d)| *d).collect();
    sorted.sort_unstable();
    let factor = share / (1.0 - share);
    declared
        .iter()
        .map(|(n, d)| {
            // The quorum - 1 smallest counts among the others: skip this node's own
            // count once if it is among the smallest.
            let mut others: u128 = 0;
            let mut taken = 0;
            let mut skipped = false;
            for v in &sorted {
                if taken == quorum - 1 {
                    break;
                }
                if !skipped && v == d {
                    skipped = true;
                    continue;
                }
                others += *v as u128;
                taken += 1;
            }
            let cap = (factor * others as f64).floor().min(u64::MAX as f64) as u64;
            (n.clone(), (*d).min(cap.max(1)))
        })
        .collect()
}

/// Per-node caps on the FedAvg weight in one round: `cap_i = min(d_i, T)` with the
/// largest `T` such that no node carries more than `share` of the total (water-filling)
/// when everyone answers. When `share` is below `1/k` no `T` can satisfy it and everyone
/// gets the smallest declared count (equal weights).
pub fn weight_caps(declared: &[(NodeId, u64)], share: f64) -> BTreeMap<NodeId, u64> {
    let ok = |t: u64| {
        let total: u128 = declared.iter().map(|(_, d)| (*d).min(t) as u128).sum();
        let top = declared.iter().map(|(_, d)| (*d).min(t)).max().unwrap_or(0) as f64;
        total == 0 || top <= share * total as f64 + 1e-9
    };
    let max = declared.iter().map(|(_, d)| *d).max().unwrap_or(0);
    let t = if share >= 1.0 || ok(max) {
        max
    } else {
        let (mut lo, mut hi) = (1u64, max);
        if !ok(lo) {
            declared.iter().map(|(_, d)| *d).min().unwrap_or(0)
        } else {
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if ok(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            lo
        }
    };
    declared
        .iter()
        .map(|(n, d)| (n.clone(), (*d).min(t)))
        .collect()
}

/// Accepted senders whose norm exceeds `factor` times the median norm of the round (at
/// least three updates needed for a median to mean anything).
fn outliers(norms: &[(NodeId, f64)], factor: f64) -> Vec<NodeId> {
    if norms.len() < 3 {
        return Vec::new();
    }
    let mut v: Vec<f64> = norms.iter().map(|(_, n)| *n).collect();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    norms
        .iter()
        .filter(|(_, n)| *n > factor * median)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Range checks on training metrics a peer reports (they end up in logs and outputs).
fn check_metrics(m: &dpfl_common::wire::TrainMetrics) -> Result<(), Rejection> {
    let bad = |what: &str, v: f64| Err(Rejection::Metrics(format!("{what} = {v:e}")));
    if !(m.loss.is_finite() && (0.0..=1e6).contains(&m.loss)) {
        return bad("loss", m.loss);
    }
    if !(0.0..=1.0).contains(&m.accuracy) {
        return bad("accuracy", m.accuracy);
    }
    if !(m.seconds.is_finite() && (0.0..=1e7).contains(&m.seconds)) {
        return bad("seconds", m.seconds);
    }
    if m.steps > 1 << 40 {
        return bad("steps", m.steps as f64);
    }
    Ok(())
}

/// Why an update was rejected. Each kind is counted in the metrics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// No training round is open.
    #[error("no training round is open")]
    NoOpenRound,
    /// Update for an earlier round (it closed).
    #[error("stale update for round {got}; round {current} is open")]
    Stale {
        /// Round in the update.
        got: u64,
        /// Open round.
        current: u64,
    },
    /// Update for a round that has not started.
    #[error("update for future round {got}; round {current} is open")]
    FutureRound {
        /// Round in the update.
        got: u64,
        /// Open round.
        current: u64,
    },
    /// An answer to the request of one round carrying an update of an earlier round.
    #[error(
        "replayed update: answers the request of round {request} with an update for round {got}"
    )]
    Replayed {
        /// Round in the update.
        got: u64,
        /// Round of the request.
        request: u64,
    },
    /// An answer carrying a later round than its request.
    #[error("update claims round {got} but answers the request of round {request}")]
    WrongRound {
        /// Round in the update.
        got: u64,
        /// Round of the request.
        request: u64,
    },
    /// Sender not selected this round.
    #[error("sender was not selected for round {0}")]
    NotSelected(u64),
    /// Second update from the same sender.
    #[error("duplicate update for round {0}")]
    Duplicate(u64),
    /// Another model.
    #[error("model spec hash mismatch")]
    SpecHash,
    /// Wrong number of values.
    #[error("update has {got} values, the model has {expected}")]
    Length {
        /// Model size.
        expected: usize,
        /// Received.
        got: usize,
    },
    /// NaN or infinity.
    #[error("update contains a non-finite value at index {0}")]
    NonFinite(usize),
    /// A coordinate beyond `max_abs_value`.
    #[error("update value {value:e} at index {index} exceeds the bound {bound:e}")]
    Magnitude {
        /// Index.
        index: usize,
        /// Value.
        value: f32,
        /// Bound.
        bound: f32,
    },
    /// An L2 norm the mechanism cannot produce (local mode) or above the configured bound.
    #[error("update norm {norm:.4} exceeds {bound:.4} ({why})")]
    Norm {
        /// Norm of the update.
        norm: f64,
        /// The bound.
        bound: f64,
        /// Which bound.
        why: &'static str,
    },
    /// More examples claimed than declared at join.
    #[error("update claims {claimed} examples; the node declared {declared} when it joined")]
    Weight {
        /// Claimed in the update.
        claimed: u64,
        /// Declared in the hello.
        declared: u64,
    },
    /// Metrics out of range.
    #[error("metrics out of range: {0}")]
    Metrics(String),
    /// The strategy refused it.
    #[error("strategy: {0}")]
    Strategy(String),
    /// An answer of the wrong kind for the round: a cleartext update in a securely
    /// aggregated round, or a held-update answer in one that is not.
    #[error("{0}")]
    Protocol(&'static str),
    /// A secure-aggregation stage message the protocol refused (the sender drops out of
    /// the round).
    #[error("secure aggregation: {0}")]
    SecAgg(String),
}

impl Rejection {
    /// Short name for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::NoOpenRound => "no_open_round",
            Rejection::Stale { .. } => "stale",
            Rejection::FutureRound { .. } => "future_round",
            Rejection::Replayed { .. } => "replayed",
            Rejection::WrongRound { .. } => "wrong_round",
            Rejection::NotSelected(_) => "not_selected",
            Rejection::Duplicate(_) => "duplicate",
            Rejection::SpecHash => "spec_hash",
            Rejection::Length { .. } => "length",
            Rejection::NonFinite(_) => "non_finite",
            Rejection::Magnitude { .. } => "magnitude",
            Rejection::Norm { .. } => "norm",
            Rejection::Weight { .. } => "weight",
            Rejection::Metrics(_) => "metrics",
            Rejection::Strategy(_) => "strategy",
            Rejection::Protocol(_) => "protocol",
            Rejection::SecAgg(_) => "secagg",
        }
    }
}

/// Why training ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// All rounds ran.
    Completed,
    /// The next round would exceed `target_epsilon`.
    BudgetReached {
        /// Epsilon spent.
        epsilon: f64,
        /// Epsilon the next round would have reached.
        next: f64,
        /// The target.
        target: f64,
    },
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FinishReason::Completed => write!(f, "completed all rounds"),
            FinishReason::BudgetReached {
                epsilon,
                next,
                target,
            } => write!(
                f,
                "privacy budget reached: epsilon {epsilon:.4} spent, the next round would reach {next:.4} > target {target}"
            ),
        }
    }
}

/// Everything about one finished round.
#[derive(Debug, Clone)]
pub struct RoundReport {
    /// Round number.
    pub round: u64,
    /// Attempts (1 + retries).
    pub attempts: u32,
    /// Clients selected in the final attempt.
    pub selected: usize,
    /// Clients whose update was accepted.
    pub participants: Vec<NodeId>,
    /// Selected clients that did not deliver, with reasons.
    pub failures: Vec<Failure>,
    /// Rejected messages by kind.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Updates whose norm exceeded C in central mode (re-clipped).
    pub norm_exceeded: u64,
    /// Example-weighted mean of the reported training losses.
    pub train_loss: Option<f64>,
    /// Example-weighted mean of the reported training accuracies.
    pub train_accuracy: Option<f64>,
    /// Whether the round was abandoned (model unchanged).
    pub abandoned: bool,
    /// Whether the global model changed.
    pub model_updated: bool,
    /// Why the model did not change, or what was unusual about the release.
    pub note: Option<String>,
    /// Accepted senders whose update norm stood far above the round's median.
    pub outliers: Vec<NodeId>,
    /// Privacy layer's record.
    pub privacy: Option<RoundPrivacy>,
    /// Secure aggregation: SHA-256 of the unmasked sum mod 2^b (coordinates as 8-byte
    /// little-endian), so a simulation can check it equals the plaintext sum exactly.
    pub secure_sum_digest: Option<[u8; 32]>,
    /// Epsilon after the round (ledger figure).
    pub epsilon: Option<f64>,
    /// Federated evaluation.
    pub federated_eval: Option<EvalSummary>,
    /// When the round started.
    pub started: Instant,
    /// When it completed (after federated evaluation).
    pub finished: Instant,
    /// Global model after the round.
    pub global: Arc<Vec<f32>>,
    /// State to checkpoint after this round.
    pub snapshot: Snapshot,
}

/// What a checkpoint holds; enough to resume at the next round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Rounds completed (the next round is this + 1).
    pub completed_rounds: u64,
    /// Global parameters.
    #[serde(skip)]
    pub global: Arc<Vec<f32>>,
    /// Privacy ledger.
    pub ledger: Ledger,
    /// Strategy state (server optimizer, adaptive clip).
    pub strategy: serde_json::Value,
}

/// What the coordinator is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundPhase {
    /// Fewer than `min_clients` connected.
    WaitingForClients,
    /// Enough clients; the next round is about to start.
    Starting,
    /// Collecting updates.
    Training,
    /// Running the secure-aggregation stages.
    SecureAggregation,
    /// Collecting federated evaluation answers.
    Evaluating,
    /// Training is over.
    Finished,
}

impl std::fmt::Display for RoundPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RoundPhase::WaitingForClients => "waiting for clients",
            RoundPhase::Starting => "starting",
            RoundPhase::Training => "training",
            RoundPhase::SecureAggregation => "secure aggregation",
            RoundPhase::Evaluating => "evaluating",
            RoundPhase::Finished => "finished",
        })
    }
}

/// A snapshot of [`Coordinator::round_state`].
#[derive(Debug, Clone)]
pub struct RoundState {
    /// Phase.
    pub phase: RoundPhase,
    /// The open round (training, evaluating), the next one (waiting), or the last one
    /// (finished).
    pub round: u64,
    /// Attempt of the open round (0 when none is open).
    pub attempt: u32,
    /// Nodes selected in the open attempt.
    pub selected: usize,
    /// Nodes whose answer the open phase still waits for.
    pub pending: Vec<NodeId>,
    /// Deadline of the open phase.
    pub deadline: Option<Instant>,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send a train request with `params` to each node.
    Train {
        /// Round.
        round: u64,
        /// Recipients.
        nodes: Vec<NodeId>,
        /// The request header.
        request: TrainRequest,
        /// Global parameters.
        params: Arc<Vec<f32>>,
    },
    /// Send an evaluate request.
    Evaluate {
        /// Recipients.
        nodes: Vec<NodeId>,
        /// The request header.
        request: EvaluateRequest,
        /// Parameters to evaluate.
        params: Arc<Vec<f32>>,
    },
    /// Send one secure-aggregation stage: one message per node, each on its own stream;
    /// answers go to [`Coordinator::handle_secagg_answer`].
    SecAgg {
        /// Training round.
        round: u64,
        /// The stage the messages open.
        stage: Stage,
        /// Most bytes of stage message an answer may have.
        answer_limit: usize,
        /// Per node.
        messages: Vec<SecAggSend>,
    },
    /// A round is complete (checkpoint, metrics, centralised evaluation).
    RoundCompleted(Box<RoundReport>),
    /// A round missed its quorum and is selected again.
    RoundRetried {
        /// Round.
        round: u64,
        /// Attempt about to start.
        attempt: u32,
        /// Accepted updates when it closed.
        accepted: usize,
        /// Quorum.
        quorum: usize,
    },
    /// Training is over: tell the clients.
    Finish {
        /// Why.
        reason: FinishReason,
        /// Rounds completed.
        rounds_completed: u64,
    },
}

struct FitRound {
    round: u64,
    attempt: u32,
    /// The sample of this attempt (with DP on, the same in every attempt of the round).
    selected: BTreeSet<NodeId>,
    /// Mode `none`: the largest weight each selected node may carry this round.
    caps: BTreeMap<NodeId, u64>,
    /// Norms of accepted updates (outlier log).
    norms: Vec<(NodeId, f64)>,
    pending: BTreeSet<NodeId>,
    accepted: Vec<NodeId>,
    failures: Vec<Failure>,
    deadline: Instant,
    started: Instant,
    privacy: ClientPrivacy,
    loss_sum: f64,
    acc_sum: f64,
    metric_weight: f64,
    /// Secure aggregation: nodes that trained and hold their update.
    held: Vec<NodeId>,
    /// Secure aggregation: the stages ran (or could not), `accepted` is final.
    secure_done: bool,
    /// What to report about the round's secure aggregation.
    note: Option<String>,
    /// Digest of the unmasked sum.
    sum_digest: Option<[u8; 32]>,
    /// DP mode `distributed`: the public parameters this attempt's nodes encode with.
    distributed: Option<DistributedRound>,
    /// Connected nodes the sample was drawn from.
    population: usize,
}

/// A securely aggregated round between training and aggregation.
struct SecAggPhase {
    fit: FitRound,
    server: dpfl_secagg::Server,
    clip: f64,
    deadline: Instant,
}

struct EvalRound {
    pending: BTreeSet<NodeId>,
    results: Vec<(NodeId, EvalResult)>,
    deadline: Instant,
    report: Box<RoundReport>,
}

// One value per coordinator: the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Phase {
    Waiting,
    Fit(FitRound),
    SecAgg(Box<SecAggPhase>),
    Eval(EvalRound),
    Done,
}

/// The coordinator. See the module docs.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    spec_hash: SpecHash,
    strategy: Box<dyn Strategy>,
    global: Arc<Vec<f32>>,
    ledger: Ledger,
    completed: u64,
    connected: BTreeSet<NodeId>,
    infos: BTreeMap<NodeId, NodeInfo>,
    phase: Phase,
    actions: std::collections::VecDeque<Action>,
    rejected: BTreeMap<&'static str, u64>,
    norm_exceeded: u64,
    round_started: Option<Instant>,
    /// Next secure-aggregation protocol round id.
    next_secagg_id: u64,
    /// Distributed DP: the counts of other participants at which the release decision
    /// changes ([`release_edges`]).
    release_edges: Vec<u64>,
}

impl Coordinator {
    /// A coordinator starting at round `snapshot.completed_rounds + 1` (0 for a new run).
    pub fn new(
        cfg: CoordinatorConfig,
        mut strategy: Box<dyn Strategy>,
        snapshot: Snapshot,
    ) -> Result<Self, String> {
        if snapshot.global.len() != cfg.spec.num_params() {
            return Err(format!(
                "initial model has {} parameters, the spec needs {}",
                snapshot.global.len(),
                cfg.spec.num_params()
            ));
        }
        cfg.limits.validate()?;
        let next_secagg_id = cfg
            .secure_aggregation
            .as_ref()
            .map_or(0, |s| s.round_id_base);
        let release_edges = match (&cfg.secure_aggregation, cfg.dp.mode) {
            (Some(s), DpMode::Distributed) => s.distributed.map_or(Vec::new(), |d| {
                release_edges(
                    s,
                    &d.params(
                        s.bits,
                        cfg.dp.clip_norm,
                        cfg.dp.noise_multiplier,
                        cfg.spec.num_params(),
                    ),
                )
            }),
            _ => Vec::new(),
        };
        strategy
            .restore(&snapshot.strategy)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            spec_hash: cfg.spec.hash(),
            cfg,
            strategy,
            global: snapshot.global,
            ledger: snapshot.ledger,
            completed: snapshot.completed_rounds,
            connected: BTreeSet::new(),
            infos: BTreeMap::new(),
            phase: Phase::Waiting,
            actions: Default::default(),
            rejected: BTreeMap::new(),
            norm_exceeded: 0,
            round_started: None,
            next_secagg_id,
            release_edges,
        })
    }

    /// A fresh snapshot for a new run.
    pub fn initial_snapshot(global: Vec<f32>, dp: &DpParams) -> Snapshot {
        Snapshot {
            completed_rounds: 0,
            global: Arc::new(global),
            ledger: Ledger::new(dp.mode, dp.delta),
            strategy: serde_json::Value::Null,
        }
    }

    /// The current global model.
    pub fn global(&self) -> &Arc<Vec<f32>> {
        &self.global
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Records the release of the federated feature statistics before round 1 (see
    /// [`Ledger::record_statistics`]); returns the epsilon so far.
    pub fn record_statistics_release(
        &mut self,
        z: f64,
        sensitivity: f64,
        contributors: &[NodeId],
    ) -> Result<f64, dpfl_common::dp::accountant::AccountError> {
        self.ledger.record_statistics(z, sensitivity, contributors)
    }

    /// DP mode `distributed`: records the release of the federated feature statistics
    /// (their secure sum of integer noise shares at `params`) as ledger round 0, composed
    /// with the training rounds at this coordinator's parameters (see
    /// [`Ledger::record_distributed_statistics`]); returns both epsilons so far.
    pub fn record_distributed_statistics_release(
        &mut self,
        params: &DistributedParams,
        contributors: &[NodeId],
    ) -> Result<DistributedEpsilons, crate::ledger::DistributedLedgerError> {
        let train = self
            .distributed_params()
            .ok_or(crate::ledger::DistributedLedgerError::NotDistributed)?;
        self.ledger
            .record_distributed_statistics(&train, params, contributors)
    }

    /// The strategy's empirical privacy audit (canaries), against the model `initial`.
    pub fn audit(&self, initial: &[f32]) -> Option<dpfl_common::dp::audit::AuditReport> {
        let theoretical = self.cfg.dp.mode.is_private().then(|| self.ledger.epsilon());
        self.strategy.audit(initial, &self.global, theoretical)
    }

    /// Rounds completed.
    pub fn completed_rounds(&self) -> u64 {
        self.completed
    }

    /// Whether training is over.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Connected clients.
    pub fn connected(&self) -> &BTreeSet<NodeId> {
        &self.connected
    }

    /// The round currently collecting updates, if any.
    pub fn open_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Fit(f) => Some(f.round),
            Phase::SecAgg(p) => Some(p.fit.round),
            _ => None,
        }
    }

    /// Where the run stands, for status pages and log lines.
    pub fn round_state(&self) -> RoundState {
        let next = self.completed + 1;
        match &self.phase {
            Phase::Waiting => RoundState {
                phase: if self.connected.len() < self.cfg.min_clients {
                    RoundPhase::WaitingForClients
                } else {
                    RoundPhase::Starting
                },
                round: next,
                attempt: 0,
                selected: 0,
                pending: Vec::new(),
                deadline: None,
            },
            Phase::Fit(f) => RoundState {
                phase: RoundPhase::Training,
                round: f.round,
                attempt: f.attempt,
                selected: f.selected.len(),
                pending: f.pending.iter().cloned().collect(),
                deadline: Some(f.deadline),
            },
            Phase::SecAgg(p) => RoundState {
                phase: RoundPhase::SecureAggregation,
                round: p.fit.round,
                attempt: p.fit.attempt,
                selected: p.fit.selected.len(),
                pending: p.server.pending(),
                deadline: Some(p.deadline),
            },
            Phase::Eval(e) => RoundState {
                phase: RoundPhase::Evaluating,
                round: e.report.round,
                attempt: e.report.attempts,
                selected: e.report.selected,
                pending: e.pending.iter().cloned().collect(),
                deadline: Some(e.deadline),
            },
            Phase::Done => RoundState {
                phase: RoundPhase::Finished,
                round: self.completed,
                attempt: 0,
                selected: 0,
                pending: Vec::new(),
                deadline: None,
            },
        }
    }

    /// Why this run has nothing left to do before it starts (all rounds completed in an
    /// earlier process, or the privacy target allows no further release), if so.
    pub fn nothing_to_do(&self) -> Option<FinishReason> {
        if self.completed >= self.cfg.rounds {
            return Some(FinishReason::Completed);
        }
        self.over_budget()
    }

    /// Next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Coordinator::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Fit(f) => Some(f.deadline),
            Phase::SecAgg(p) => Some(p.deadline),
            Phase::Eval(e) => Some(e.deadline),
            _ => None,
        }
    }

    /// A client completed its handshake, declaring `info`.
    pub fn handle_connect(&mut self, node: NodeId, info: NodeInfo, now: Instant) {
        self.infos.insert(node.clone(), info);
        self.connected.insert(node);
        self.maybe_start(now);
    }

    /// A client's connection ended.
    pub fn handle_disconnect(&mut self, node: &str, now: Instant) {
        self.connected.remove(node);
        self.fail(node, "disconnected", now);
    }

    /// A client reported that it could not serve a request (`reason` is peer text: it is
    /// escaped and cut before it is stored).
    pub fn handle_failed(&mut self, node: &str, round: u64, reason: &str, now: Instant) {
        if self.open_round() == Some(round) {
            self.fail(
                node,
                &format!("client error: {}", printable(reason, 300)),
                now,
            );
        }
    }

    /// The driver got no usable answer to the request of `request_round` (transport
    /// error, timeout, bad bytes). Counted by `kind`; the node fails that round if it is
    /// still the open one (an old request's error never fails a newer round).
    pub fn handle_transport_error(
        &mut self,
        node: &str,
        request_round: u64,
        kind: &'static str,
        detail: &str,
        now: Instant,
    ) {
        *self.rejected.entry(kind).or_default() += 1;
        if self.current_round() == Some(request_round) {
            self.fail(node, detail, now);
        }
    }

    /// Round of the open training or evaluation phase.
    fn current_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Fit(f) => Some(f.round),
            Phase::SecAgg(p) => Some(p.fit.round),
            Phase::Eval(e) => Some(e.report.round),
            _ => None,
        }
    }

    fn fail(&mut self, node: &str, reason: &str, now: Instant) {
        match &mut self.phase {
            Phase::Fit(f) if f.pending.contains(node) => {
                f.pending.remove(node);
                f.failures.push(Failure {
                    node: node.to_string(),
                    reason: reason.to_string(),
                });
                if f.pending.is_empty() {
                    self.close_fit(now);
                }
            }
            Phase::SecAgg(p) => {
                // Whatever the node was asked, it is gone for the rest of the round (a name
                // outside the round changes nothing).
                let _ = p.server.handle_dropout(node);
                if p.server.is_stage_complete() {
                    self.advance_secagg(now);
                }
            }
            Phase::Eval(e) if e.pending.contains(node) => {
                e.pending.remove(node);
                if e.pending.is_empty() {
                    self.close_eval(now);
                }
            }
            _ => {}
        }
    }

    /// Validates and accepts an update. A rejection leaves everything as it was except
    /// the rejection counter (and, for a selected sender, marks it failed for the round).
    ///
    /// `request_round` is the round of the request this update answers (the driver knows
    /// it from the stream); an update claiming another round is a replay or a forgery.
    pub fn handle_update(
        &mut self,
        node: &str,
        request_round: u64,
        meta: UpdateMeta,
        delta: Vec<f32>,
        now: Instant,
    ) -> Result<(), Rejection> {
        if meta.round != request_round {
            let e = if meta.round < request_round {
                Rejection::Replayed {
                    got: meta.round,
                    request: request_round,
                }
            } else {
                Rejection::WrongRound {
                    got: meta.round,
                    request: request_round,
                }
            };
            *self.rejected.entry(e.kind()).or_default() += 1;
            if self.open_round() == Some(request_round) {
                self.fail(node, &format!("rejected: {e}"), now);
            }
            return Err(e);
        }
        let norm = match self.validate_update(node, &meta, &delta) {
            Ok(norm) => norm,
            Err(e) => {
                *self.rejected.entry(e.kind()).or_default() += 1;
                // A selected sender whose update for this round is malformed has failed it.
                if matches!(
                    e,
                    Rejection::SpecHash
                        | Rejection::Length { .. }
                        | Rejection::NonFinite(_)
                        | Rejection::Magnitude { .. }
                        | Rejection::Norm { .. }
                        | Rejection::Weight { .. }
                        | Rejection::Metrics(_)
                        | Rejection::Protocol(_)
                ) {
                    self.fail(node, &format!("rejected: {e}"), now);
                }
                return Err(e);
            }
        };
        let Phase::Fit(f) = &mut self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        let exceeded =
            f.privacy.mode == DpMode::Central && norm > f.privacy.clip_norm * (1.0 + 1e-4);
        // Mode `none`: the weight is the claimed count, capped so no node carries more than
        // `max_weight_share` of the round (DP wrappers weigh every update equally anyway).
        let num_examples = match f.privacy.mode {
            DpMode::None => meta
                .num_examples
                .min(f.caps.get(node).copied().unwrap_or(meta.num_examples)),
            _ => meta.num_examples,
        };
        // In local mode nothing but the noised delta may be used: metrics are ignored.
        let metrics = match f.privacy.mode {
            DpMode::Local => None,
            _ => meta.metrics,
        };
        let weighted = metrics
            .as_ref()
            .map(|m| (m.loss, m.accuracy, num_examples.max(1) as f64));
        let result = FitResult::new(node.to_string(), delta, num_examples, metrics, meta.clipped)
            .measured(norm);
        let round = f.round;
        if let Err(e) = self.strategy.accumulate(round, result) {
            let r = Rejection::Strategy(e.to_string());
            *self.rejected.entry(r.kind()).or_default() += 1;
            self.fail(node, &r.to_string(), now);
            return Err(r);
        }
        // Only an accepted update touches the round's statistics.
        if exceeded {
            self.norm_exceeded += 1;
        }
        if let Phase::Fit(f) = &mut self.phase {
            f.norms.push((node.to_string(), norm));
            if let Some((loss, acc, w)) = weighted {
                f.loss_sum += loss * w;
                f.acc_sum += acc * w;
                f.metric_weight += w;
            }
            f.pending.remove(node);
            f.accepted.push(node.to_string());
            if f.pending.is_empty() {
                self.close_fit(now);
            }
        }
        Ok(())
    }

    /// Checks an update against the open round and the limits; returns its L2 norm.
    fn validate_update(
        &self,
        node: &str,
        meta: &UpdateMeta,
        delta: &[f32],
    ) -> Result<f64, Rejection> {
        let Phase::Fit(f) = &self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        if meta.round < f.round {
            return Err(Rejection::Stale {
                got: meta.round,
                current: f.round,
            });
        }
        if meta.round > f.round {
            return Err(Rejection::FutureRound {
                got: meta.round,
                current: f.round,
            });
        }
        if !f.selected.contains(node) {
            return Err(Rejection::NotSelected(f.round));
        }
        if !f.pending.contains(node) {
            return Err(Rejection::Duplicate(f.round));
        }
        if meta.spec_hash != self.spec_hash {
            return Err(Rejection::SpecHash);
        }
        if self.cfg.secure_aggregation.is_some() {
            return Err(Rejection::Protocol(
                "cleartext update in a securely aggregated round",
            ));
        }
        if delta.len() != self.cfg.spec.num_params() {
            return Err(Rejection::Length {
                expected: self.cfg.spec.num_params(),
                got: delta.len(),
            });
        }
        let lim = &self.cfg.limits;
        // One pass for the norm and both value checks; only a bad update is read again,
        // to name its first offending coordinate.
        let (norm, within) = dpfl_common::dp::l2_norm_within(delta, lim.max_abs_value);
        if !within {
            if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
                return Err(Rejection::NonFinite(i));
            }
            if let Some((index, value)) = delta
                .iter()
                .enumerate()
                .find(|(_, v)| v.abs() > lim.max_abs_value)
            {
                return Err(Rejection::Magnitude {
                    index,
                    value: *value,
                    bound: lim.max_abs_value,
                });
            }
        }
        match f.privacy.mode {
            DpMode::None => {
                if let Some(bound) = lim.max_update_norm {
                    if norm > bound {
                        return Err(Rejection::Norm {
                            norm,
                            bound,
                            why: "update_limits.max_update_norm",
                        });
                    }
                }
                let declared = self.infos.get(node).map_or(0, |i| i.num_examples);
                if meta.num_examples > declared {
                    return Err(Rejection::Weight {
                        claimed: meta.num_examples,
                        declared,
                    });
                }
            }
            DpMode::Local => {
                let bound = dpfl_common::dp::local_norm_bound(
                    f.privacy.clip_norm,
                    f.privacy.noise_multiplier,
                    delta.len(),
                );
                if norm > bound {
                    return Err(Rejection::Norm {
                        norm,
                        bound,
                        why: "no honest local-DP update has this norm; false rejection < e^-72",
                    });
                }
            }
            _ => {}
        }
        if let Some(m) = &meta.metrics {
            check_metrics(m)?;
        }
        Ok(norm)
    }

    /// A federated evaluation result.
    pub fn handle_eval_result(
        &mut self,
        node: &str,
        result: EvalResult,
        now: Instant,
    ) -> Result<(), Rejection> {
        let Phase::Eval(e) = &mut self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        if result.round != e.report.round {
            return Err(Rejection::Stale {
                got: result.round,
                current: e.report.round,
            });
        }
        if !e.pending.remove(node) {
            return Err(Rejection::Duplicate(result.round));
        }
        let declared = self.infos.get(node).map_or(0, |i| i.num_eval_examples);
        let in_range = result.loss.is_finite()
            && (0.0..=1e6).contains(&result.loss)
            && (0.0..=1.0).contains(&result.accuracy);
        if !in_range || result.num_examples > declared {
            let r = Rejection::Metrics(format!(
                "evaluation answer: loss {:e}, accuracy {}, {} examples ({} declared)",
                result.loss, result.accuracy, result.num_examples, declared
            ));
            *self.rejected.entry(r.kind()).or_default() += 1;
            if e.pending.is_empty() {
                self.close_eval(now);
            }
            return Err(r);
        }
        e.results.push((node.to_string(), result));
        if e.pending.is_empty() {
            self.close_eval(now);
        }
        Ok(())
    }

    /// Time passed; closes phases whose deadline is reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Fit(f) if now >= f.deadline => {
                let pending = std::mem::take(&mut f.pending);
                for n in pending {
                    f.failures.push(Failure {
                        node: n,
                        reason: "deadline passed".into(),
                    });
                }
                self.close_fit(now);
            }
            Phase::SecAgg(p) if now >= p.deadline => self.advance_secagg(now),
            Phase::Eval(e) if now >= e.deadline => self.close_eval(now),
            _ => {}
        }
    }

    /// Randomness for one draw (selection, evaluation). Deployments: a fresh key from the
    /// OS CSPRNG every time, so no configuration value predicts a sample.
    fn round_rng(&self, round: u64, attempt: u32, salt: u64) -> rand_chacha::ChaCha20Rng {
        match self.cfg.selection {
            Selection::Os => rand_chacha::ChaCha20Rng::from_entropy(),
            Selection::Seeded(seed) => {
                let s = seed
                    ^ round.wrapping_mul(0xA24B_AED4_963E_E407)
                    ^ (attempt as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25)
                    ^ salt;
                rand_chacha::ChaCha20Rng::seed_from_u64(s)
            }
        }
    }

    fn planned_privacy(&self) -> RoundPrivacy {
        RoundPrivacy {
            mode: self.cfg.dp.mode,
            sampling_rate: self.cfg.dp.sampling_rate,
            noise_multiplier: self.cfg.dp.noise_multiplier,
            clip_norm: self.cfg.dp.clip_norm,
            clipped_fraction: None,
            clipped_fraction_noised: None,
            population: self.connected.len(),
            released: true,
        }
    }

    /// With a target epsilon, whether one more release would exceed it (checked before
    /// every attempt, retries included).
    ///
    /// Distributed mode checks every attempt, with or without a target: a round whose
    /// release decision would depend on one client too likely for the run's delta
    /// ([`dpfl_common::dp::distributed::release_flip_probability`]) does not start.
    fn over_budget(&self) -> Option<FinishReason> {
        if !self.cfg.dp.mode.is_private() {
            return None;
        }
        let target = self.cfg.dp.target_epsilon;
        let next = match self.distributed_params() {
            Some(params) => self
                .ledger
                .distributed_epsilons_if(
                    &self.planned_privacy(),
                    &params,
                    self.release_flip(self.connected.len()),
                )
                .map(|e| e.model_observers)
                .map_err(|e| e.to_string()),
            None => {
                target?;
                self.ledger
                    .epsilon_if(&self.planned_privacy())
                    .map_err(|e| e.to_string())
            }
        };
        let target_or_inf = target.unwrap_or(f64::INFINITY);
        match next {
            Ok(next) if next > target_or_inf => Some(FinishReason::BudgetReached {
                epsilon: self.ledger.budget_epsilon(),
                next,
                target: target_or_inf,
            }),
            Ok(_) => None,
            Err(e) => {
                tracing::error!("privacy accounting failed, stopping: {e}");
                Some(FinishReason::BudgetReached {
                    epsilon: self.ledger.budget_epsilon(),
                    next: f64::INFINITY,
                    target: target_or_inf,
                })
            }
        }
    }

    /// Distributed mode: the probability that whether a round sampled from `population`
    /// is released depends on one client.
    fn release_flip(&self, population: usize) -> f64 {
        dpfl_common::dp::distributed::release_flip_probability(
            population as u64,
            self.cfg.dp.sampling_rate,
            &self.release_edges,
        )
    }

    /// Distributed mode: the public parameters the next round would use.
    fn distributed_params(&self) -> Option<DistributedParams> {
        let s = self.cfg.secure_aggregation.as_ref()?;
        if self.cfg.dp.mode != DpMode::Distributed {
            return None;
        }
        let p = self.planned_privacy();
        s.distributed.map(|d| {
            d.params(
                s.bits,
                p.clip_norm,
                p.noise_multiplier,
                self.cfg.spec.num_params(),
            )
        })
    }

    fn maybe_start(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Waiting) {
            return;
        }
        // Finishing must not wait for clients that dropped out of the last round.
        if self.completed >= self.cfg.rounds {
            self.finish(FinishReason::Completed);
            return;
        }
        if self.connected.len() < self.cfg.min_clients {
            return;
        }
        self.round_started = Some(now);
        self.start_attempt(self.completed + 1, 1, None, now);
    }

    /// Starts an attempt of `round`. `sample`: with DP on, the round's Poisson sample,
    /// asked again on a retry.
    fn start_attempt(
        &mut self,
        round: u64,
        attempt: u32,
        sample: Option<BTreeSet<NodeId>>,
        now: Instant,
    ) {
        if let Some(reason) = self.over_budget() {
            self.finish(reason);
            return;
        }
        let available: Vec<NodeId> = self.connected.iter().cloned().collect();
        let mut rng = self.round_rng(round, attempt, 1);
        let plan = self.strategy.configure_fit(round, &available, &mut rng);
        let selected: BTreeSet<NodeId> = match sample {
            Some(s) => s,
            None => plan
                .nodes
                .into_iter()
                .filter(|n| self.connected.contains(n))
                .collect(),
        };
        // Distributed DP: the round's public parameters, with a rotation seed fresh per
        // attempt (from the OS CSPRNG in deployments).
        let distributed = match (&self.cfg.secure_aggregation, plan.privacy.mode) {
            (Some(s), DpMode::Distributed) => s.distributed.map(|d| {
                use rand::RngCore;
                DistributedRound {
                    params: d.params(
                        s.bits,
                        plan.privacy.clip_norm,
                        plan.privacy.noise_multiplier,
                        self.cfg.spec.num_params(),
                    ),
                    rotation_seed: self.round_rng(round, attempt, 5).next_u64(),
                }
            }),
            _ => None,
        };
        let request = TrainRequest {
            round,
            spec_hash: self.spec_hash,
            config: plan.config,
            privacy: plan.privacy,
            secure_aggregation: self.cfg.secure_aggregation.as_ref().map(|s| SecAggSpec {
                clip_norm: if plan.privacy.mode == DpMode::None {
                    s.clip_norm
                } else {
                    plan.privacy.clip_norm
                },
                bits: s.bits,
                distributed,
            }),
        };
        let caps = if plan.privacy.mode == DpMode::None {
            let declared: Vec<(NodeId, u64)> = selected
                .iter()
                .map(|n| (n.clone(), self.infos.get(n).map_or(0, |i| i.num_examples)))
                .collect();
            let quorum = self.cfg.min_fit_clients.min(selected.len());
            let full = weight_caps(&declared, self.cfg.limits.max_weight_share);
            let worst =
                pessimistic_weight_caps(&declared, self.cfg.limits.max_weight_share, quorum);
            full.into_iter()
                .map(|(n, c)| {
                    let w = worst.get(&n).copied().unwrap_or(c);
                    (n, c.min(w))
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        // A sampled node that is gone fails this attempt at once.
        let (pending, gone): (BTreeSet<NodeId>, BTreeSet<NodeId>) = selected
            .iter()
            .cloned()
            .partition(|n| self.connected.contains(n));
        self.phase = Phase::Fit(FitRound {
            round,
            attempt,
            pending: pending.clone(),
            selected: selected.clone(),
            caps,
            norms: Vec::new(),
            accepted: Vec::new(),
            failures: gone
                .into_iter()
                .map(|node| Failure {
                    node,
                    reason: "not connected".into(),
                })
                .collect(),
            deadline: now + self.cfg.round_timeout,
            started: now,
            privacy: plan.privacy,
            loss_sum: 0.0,
            acc_sum: 0.0,
            metric_weight: 0.0,
            held: Vec::new(),
            secure_done: false,
            note: None,
            sum_digest: None,
            distributed,
            population: available.len(),
        });
        tracing::debug!(round, attempt, selected = selected.len(), "round started");
        if pending.is_empty() {
            // Poisson sampling may pick nobody; the round still closes (and in central
            // mode still releases noise).
            self.close_fit(now);
        } else {
            self.actions.push_back(Action::Train {
                round,
                nodes: pending.into_iter().collect(),
                request,
                params: self.global.clone(),
            });
        }
    }

    fn close_fit(&mut self, now: Instant) {
        if self.cfg.secure_aggregation.is_some()
            && matches!(&self.phase, Phase::Fit(f) if !f.secure_done)
        {
            self.start_secagg(now);
            return;
        }
        let Phase::Fit(f) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return;
        };
        let mode = self.cfg.dp.mode;
        let quorum = self.cfg.min_fit_clients.min(f.selected.len());
        let mut abandoned = false;
        let mut model_updated = false;
        let mut note = f.note.clone();
        // Local mode: every attempt whose requests went out is a release, whatever came
        // back (accepted, rejected, late or never): a node that answered has released its
        // noised update to the server. Charged once, here, to every node asked; the
        // over-count of nodes that never answered is the safe side.
        if mode == DpMode::Local && !f.selected.is_empty() {
            let mut p = self.planned_privacy();
            p.population = f.selected.len().max(p.population);
            let asked: Vec<NodeId> = f.selected.iter().cloned().collect();
            if let Err(e) = self.ledger.record(f.round, &p, &asked) {
                tracing::error!("ledger: {e}; stopping, nothing more is released");
                self.finish(FinishReason::BudgetReached {
                    epsilon: self.ledger.budget_epsilon(),
                    next: f64::INFINITY,
                    target: self.cfg.dp.target_epsilon.unwrap_or(f64::INFINITY),
                });
                return;
            }
        }
        if f.accepted.len() < quorum {
            // What the strategy accumulated is dropped: the next configure_fit starts afresh.
            if f.attempt <= self.cfg.max_round_retries {
                self.actions.push_back(Action::RoundRetried {
                    round: f.round,
                    attempt: f.attempt + 1,
                    accepted: f.accepted.len(),
                    quorum,
                });
                let sample = mode.is_private().then(|| f.selected.clone());
                self.start_attempt(f.round, f.attempt + 1, sample, now);
                return;
            }
            if mode == DpMode::Central {
                // Whether a round is released must not depend on how many sampled clients
                // answered: release what arrived (noise is calibrated to one client, the
                // division is by the expected count).
                note = Some(format!(
                    "released below quorum ({} of {quorum} after {} attempts)",
                    f.accepted.len(),
                    f.attempt
                ));
            } else {
                abandoned = true;
            }
        }
        let mut charged_central = false;
        if !abandoned {
            match self
                .strategy
                .aggregate_fit(f.round, &self.global, &f.failures)
            {
                Ok(Some(new)) => {
                    // Central mode: the release is on the ledger before the model is
                    // adopted; a ledger that cannot record it withholds the model.
                    let recorded = match (mode, self.strategy.round_privacy()) {
                        (DpMode::Central, Some(p)) => {
                            match self.ledger.record(f.round, &p, &f.accepted) {
                                Ok(()) => {
                                    charged_central = true;
                                    true
                                }
                                Err(e) => {
                                    tracing::error!(round = f.round, "ledger: {e}; model withheld");
                                    false
                                }
                            }
                        }
                        // Distributed mode: both labelled epsilons; a sum of fewer
                        // contributors than the noise is accounted over is withheld.
                        (DpMode::Distributed, Some(p)) => {
                            let recorded = match &f.distributed {
                                Some(d) => self
                                    .ledger
                                    .record_distributed(
                                        f.round,
                                        &p,
                                        &d.params,
                                        &f.accepted,
                                        self.release_flip(f.population),
                                    )
                                    .map_err(|e| e.to_string()),
                                None => Err("no distributed parameters for the round".into()),
                            };
                            match recorded {
                                Ok(eps) => {
                                    tracing::info!(
                                        round = f.round,
                                        "distributed DP release: epsilon {:.4} against observers \
                                         of the models, {:.4} against the server",
                                        eps.model_observers,
                                        eps.server
                                    );
                                    charged_central = true;
                                    true
                                }
                                Err(e) => {
                                    tracing::warn!(round = f.round, "ledger: {e}; model withheld");
                                    false
                                }
                            }
                        }
                        _ => true,
                    };
                    if !recorded {
                        note = Some("model withheld: the ledger could not record it".into());
                    } else if new.len() == self.global.len() && new.iter().all(|v| v.is_finite()) {
                        self.global = Arc::new(new);
                        model_updated = true;
                    } else {
                        note = Some(
                            "model unchanged: the aggregate was not a finite model of the right \
                             size"
                                .into(),
                        );
                    }
                }
                Ok(None) => note = Some("model unchanged: nothing to aggregate".into()),
                Err(e) => {
                    tracing::error!(round = f.round, "aggregation failed, round abandoned: {e}");
                    note = Some(format!("abandoned: aggregation failed: {e}"));
                    abandoned = true;
                }
            }
        }
        let privacy = if mode.is_private() && !abandoned {
            let p = self.strategy.round_privacy();
            match &p {
                // Local mode was charged above; central when the model was adopted.
                // Distributed: only a recorded sum is a release (nothing else left).
                Some(_)
                    if mode == DpMode::Local || mode == DpMode::Distributed || charged_central => {}
                Some(p) => {
                    if let Err(e) = self.ledger.record(f.round, p, &f.accepted) {
                        tracing::error!("ledger: {e}");
                    }
                }
                None => tracing::error!(
                    round = f.round,
                    "DP is on but the strategy reported no privacy record for this round; wrap \
                     custom strategies in LocalDp or CentralDp so the ledger can account for them"
                ),
            }
            p
        } else {
            None
        };
        // Distributed mode: a round run without a release still counts (whether it was
        // released is visible and may depend on one client).
        if mode == DpMode::Distributed && !charged_central {
            if let Some(d) = &f.distributed {
                let flip = self.release_flip(f.population);
                if let Err(e) = self
                    .ledger
                    .record_distributed_unreleased(f.round, &d.params, flip)
                {
                    tracing::error!(round = f.round, "ledger: {e}");
                }
            }
        }
        let outliers = outliers(&f.norms, self.cfg.limits.outlier_factor);
        self.completed = f.round;
        let w = f.metric_weight;
        let report = RoundReport {
            round: f.round,
            attempts: f.attempt,
            selected: f.selected.len(),
            participants: f.accepted.clone(),
            failures: f.failures.clone(),
            rejected: std::mem::take(&mut self.rejected),
            norm_exceeded: std::mem::take(&mut self.norm_exceeded),
            train_loss: (w > 0.0).then(|| f.loss_sum / w),
            train_accuracy: (w > 0.0).then(|| f.acc_sum / w),
            abandoned,
            model_updated,
            note,
            outliers,
            privacy,
            secure_sum_digest: f.sum_digest,
            epsilon: self.cfg.dp.mode.is_private().then(|| self.ledger.epsilon()),
            federated_eval: None,
            started: self.round_started.unwrap_or(f.started),
            finished: now,
            global: self.global.clone(),
            snapshot: Snapshot {
                completed_rounds: f.round,
                global: self.global.clone(),
                ledger: self.ledger.clone(),
                strategy: self.strategy.state(),
            },
        };
        let available: Vec<NodeId> = self.connected.iter().cloned().collect();
        let mut rng = self.round_rng(f.round, f.attempt, 2);
        let eval_nodes = if abandoned {
            Vec::new()
        } else {
            self.strategy
                .configure_evaluate(f.round, &available, &mut rng)
        };
        if eval_nodes.is_empty() {
            self.complete_round(Box::new(report), now);
        } else {
            self.actions.push_back(Action::Evaluate {
                nodes: eval_nodes.clone(),
                request: EvaluateRequest {
                    round: f.round,
                    spec_hash: self.spec_hash,
                },
                params: self.global.clone(),
            });
            self.phase = Phase::Eval(EvalRound {
                pending: eval_nodes.into_iter().collect(),
                results: Vec::new(),
                deadline: now + self.cfg.eval_timeout,
                report: Box::new(report),
            });
        }
    }

    fn close_eval(&mut self, now: Instant) {
        let Phase::Eval(e) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return;
        };
        let mut report = e.report;
        report.federated_eval = self.strategy.aggregate_evaluate(report.round, &e.results);
        self.complete_round(report, now);
    }

    fn complete_round(&mut self, mut report: Box<RoundReport>, now: Instant) {
        report.finished = now;
        self.actions.push_back(Action::RoundCompleted(report));
        self.phase = Phase::Waiting;
        self.maybe_start(now);
    }

    fn finish(&mut self, reason: FinishReason) {
        self.phase = Phase::Done;
        self.actions.push_back(Action::Finish {
            reason,
            rounds_completed: self.completed,
        });
    }

    /// Ends training now (shutdown): no further rounds.
    pub fn shutdown(&mut self) {
        if !self.is_done() {
            self.phase = Phase::Done;
        }
    }
}

/// The SecAgg+ graph for `n` nodes holding an update, or why secure aggregation does not
/// start: fewer than 3, the finder (or the configured override) has no graph, or, with
/// distributed DP, more than `max_contributors` or no secure graph whose threshold reaches
/// `min_contributors` (raised to it; on the complete graph when the sparse degree is below).
pub fn secagg_graph(
    settings: &SecAggSettings,
    distributed: Option<&DistributedParams>,
    n: usize,
) -> Result<dpfl_secagg::GraphParams, String> {
    if n < 3 {
        return Err(format!(
            "{n} nodes hold an update; secure aggregation needs at least 3"
        ));
    }
    let mut params =
        dpfl_secagg::params::choose_params(n as u32, &settings.threat, settings.params)
            .map_err(|e| e.to_string())?;
    if let Some(p) = distributed {
        // The noise is accounted over `min_contributors` shares: the protocol must not
        // unmask a sum of fewer, and the modular headroom holds at most `max_contributors`.
        if n > p.max_contributors {
            return Err(format!(
                "{n} nodes hold an update; distributed DP sums at most {}",
                p.max_contributors
            ));
        }
        if (params.threshold as usize) < p.min_contributors {
            if p.min_contributors > params.degree as usize {
                // The sparse graph's neighbourhoods cannot hold the threshold: the complete
                // graph can (costlier, and the nodes check it is secure).
                if p.min_contributors + 1 > n {
                    return Err(format!(
                        "distributed DP needs a threshold of {} contributors, above the {} \
                         neighbours of {n} participants",
                        p.min_contributors,
                        n - 1
                    ));
                }
                params.degree = (n - 1) as u32;
            }
            params.threshold = p.min_contributors as u32;
            if !dpfl_secagg::params::is_secure(n as u32, params, &settings.threat) {
                return Err(format!(
                    "distributed DP's threshold {} with degree {} is not secure for {n} \
                     participants",
                    params.threshold, params.degree
                ));
            }
        }
    }
    Ok(params)
}

/// Distributed DP: the counts k of *other* participants at which one more participant
/// changes whether secure aggregation starts (so whether the round is released), from the
/// very checks of [`secagg_graph`]; see
/// [`dpfl_common::dp::distributed::release_flip_probability`].
pub fn release_edges(settings: &SecAggSettings, p: &DistributedParams) -> Vec<u64> {
    let starts = |n: usize| secagg_graph(settings, Some(p), n).is_ok();
    (0..=p.max_contributors)
        .filter(|&k| starts(k) != starts(k + 1))
        .map(|k| k as u64)
        .collect()
}

/// SHA-256 of a vector mod 2^b, coordinates as 8-byte little-endian.
pub fn sum_digest(sum: &[u64]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for v in sum {
        h.update(v.to_le_bytes());
    }
    h.finalize().into()
}

/// Secure aggregation (see [`crate::secure`]): the held-update answers, the five stages and
/// the hand-over of the unmasked sum to the strategy.
impl Coordinator {
    /// A node's answer to a securely aggregated train request: it trained and holds its
    /// update. Checked like an update's header (round, selection, once, spec, claimed
    /// weight, metrics); nothing of the update itself arrives.
    pub fn handle_held(
        &mut self,
        node: &str,
        request_round: u64,
        meta: UpdateMeta,
        now: Instant,
    ) -> Result<(), Rejection> {
        let r = self.check_held(node, request_round, &meta);
        if let Err(e) = r {
            *self.rejected.entry(e.kind()).or_default() += 1;
            if self.open_round() == Some(request_round)
                && !matches!(
                    e,
                    Rejection::NotSelected(_) | Rejection::Duplicate(_) | Rejection::NoOpenRound
                )
            {
                self.fail(node, &format!("rejected: {e}"), now);
            }
            return Err(e);
        }
        let Phase::Fit(f) = &mut self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        if let Some(m) = &meta.metrics {
            let w = meta.num_examples.max(1) as f64;
            f.loss_sum += m.loss * w;
            f.acc_sum += m.accuracy * w;
            f.metric_weight += w;
        }
        f.pending.remove(node);
        f.held.push(node.to_string());
        if f.pending.is_empty() {
            self.close_fit(now);
        }
        Ok(())
    }

    fn check_held(
        &self,
        node: &str,
        request_round: u64,
        meta: &UpdateMeta,
    ) -> Result<(), Rejection> {
        if meta.round != request_round {
            return Err(if meta.round < request_round {
                Rejection::Replayed {
                    got: meta.round,
                    request: request_round,
                }
            } else {
                Rejection::WrongRound {
                    got: meta.round,
                    request: request_round,
                }
            });
        }
        if self.cfg.secure_aggregation.is_none() {
            return Err(Rejection::Protocol(
                "held-update answer in a round that is not securely aggregated",
            ));
        }
        let Phase::Fit(f) = &self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        if meta.round != f.round {
            return Err(Rejection::Stale {
                got: meta.round,
                current: f.round,
            });
        }
        if !f.selected.contains(node) {
            return Err(Rejection::NotSelected(f.round));
        }
        if !f.pending.contains(node) {
            return Err(Rejection::Duplicate(f.round));
        }
        if meta.spec_hash != self.spec_hash {
            return Err(Rejection::SpecHash);
        }
        let declared = self.infos.get(node).map_or(0, |i| i.num_examples);
        if meta.num_examples > declared {
            return Err(Rejection::Weight {
                claimed: meta.num_examples,
                declared,
            });
        }
        if let Some(m) = &meta.metrics {
            check_metrics(m)?;
        }
        Ok(())
    }

    /// A node's answer to a stage of the secure-aggregation round of training round
    /// `request_round`. A refused message drops the sender from the protocol round (the
    /// protocol tolerates it like any dropout); it never aborts the round by itself.
    pub fn handle_secagg_answer(
        &mut self,
        node: &str,
        request_round: u64,
        msg: FromNode,
        now: Instant,
    ) -> Result<(), Rejection> {
        let r = match &mut self.phase {
            // An answer of an earlier attempt's protocol round (a retry keeps the training
            // round): stale, and no reason to drop the node from this one.
            Phase::SecAgg(p)
                if p.fit.round == request_round && msg.round() != p.server.context().round =>
            {
                Err((
                    Rejection::Stale {
                        got: msg.round(),
                        current: p.server.context().round,
                    },
                    false,
                ))
            }
            Phase::SecAgg(p) if p.fit.round == request_round => {
                match p.server.handle_message(node, msg) {
                    Ok(()) => Ok(p.server.is_stage_complete()),
                    Err(e) => {
                        let _ = p.server.handle_dropout(node);
                        Err((
                            Rejection::SecAgg(e.to_string()),
                            p.server.is_stage_complete(),
                        ))
                    }
                }
            }
            Phase::SecAgg(p) => Err((
                Rejection::Stale {
                    got: request_round,
                    current: p.fit.round,
                },
                false,
            )),
            _ => Err((Rejection::NoOpenRound, false)),
        };
        match r {
            Ok(complete) => {
                if complete {
                    self.advance_secagg(now);
                }
                Ok(())
            }
            Err((e, complete)) => {
                *self.rejected.entry(e.kind()).or_default() += 1;
                if complete {
                    self.advance_secagg(now);
                }
                Err(e)
            }
        }
    }

    /// Training is over: the nodes holding an update become the participants of a fresh
    /// protocol round (or, too few of them, the round goes on with nothing accepted).
    fn start_secagg(&mut self, now: Instant) {
        let Some(settings) = self.cfg.secure_aggregation.clone() else {
            return;
        };
        let Phase::Fit(mut f) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return;
        };
        f.secure_done = true;
        let quorum = self.cfg.min_fit_clients.min(f.selected.len());
        let n = f.held.len();
        let clip = if f.privacy.mode == DpMode::None {
            settings.clip_norm
        } else {
            f.privacy.clip_norm
        };
        let id = self.next_secagg_id;
        self.next_secagg_id += 1;
        let mut rng = self.round_rng(f.round, f.attempt, 3);
        let started = (|| {
            if n < quorum {
                return Err(format!(
                    "{n} nodes hold an update; secure aggregation needs at least {}",
                    quorum.max(3)
                ));
            }
            let params = secagg_graph(&settings, f.distributed.as_ref().map(|d| &d.params), n)?;
            let vector_len = match &f.distributed {
                Some(d) => d.params.padded_dim(),
                None => self.cfg.spec.num_params(),
            };
            // Bound to the encoding the train requests carried (as the nodes hold it).
            let encoding = SecAggSpec {
                clip_norm: clip,
                bits: settings.bits,
                distributed: f.distributed,
            }
            .encoding_digest();
            let ctx = dpfl_secagg::RoundContext::new(
                id,
                f.held.clone(),
                params,
                settings.bits,
                vector_len as u32,
                &mut rng,
            )
            .map_err(|e| e.to_string())?
            .with_encoding(encoding);
            let server = dpfl_secagg::Server::new(ctx).map_err(|e| e.to_string())?;
            Ok(server)
        })();
        match started {
            Err(why) => {
                tracing::warn!(round = f.round, "secure aggregation not started: {why}");
                f.note = Some(format!("secure aggregation not started: {why}"));
                for node in std::mem::take(&mut f.held) {
                    f.failures.push(Failure {
                        node,
                        reason: "secure aggregation not started".into(),
                    });
                }
                self.phase = Phase::Fit(f);
                self.close_fit(now);
            }
            Ok(server) => {
                let ctx = server.context().clone();
                let messages = crate::secure::setup_messages(&server);
                tracing::debug!(
                    round = f.round,
                    id,
                    n,
                    degree = ctx.degree,
                    threshold = ctx.threshold,
                    "secure aggregation started"
                );
                self.actions.push_back(Action::SecAgg {
                    round: f.round,
                    stage: Stage::AdvertiseKeys,
                    answer_limit: crate::secure::answer_limit(&ctx),
                    messages,
                });
                self.phase = Phase::SecAgg(Box::new(SecAggPhase {
                    fit: f,
                    server,
                    clip,
                    deadline: now + settings.stage_timeout,
                }));
            }
        }
    }

    /// Closes the open stage (everyone answered, or its deadline passed): sends the next
    /// stage, or ends the protocol round with the sum or with an abort.
    fn advance_secagg(&mut self, now: Instant) {
        let Some(timeout) = self
            .cfg
            .secure_aggregation
            .as_ref()
            .map(|s| s.stage_timeout)
        else {
            return;
        };
        let Phase::SecAgg(p) = &mut self.phase else {
            return;
        };
        let round = p.fit.round;
        let outcome = match p.server.close_stage() {
            Ok(dpfl_secagg::Transition::Send(msgs)) => {
                let stage = p.server.stage();
                let answer_limit = crate::secure::answer_limit(p.server.context());
                p.deadline = now + timeout;
                self.actions.push_back(Action::SecAgg {
                    round,
                    stage,
                    answer_limit,
                    messages: crate::secure::stage_messages(msgs),
                });
                return;
            }
            Ok(dpfl_secagg::Transition::Done(agg)) => Ok(agg),
            Err(e) => Err(e.to_string()),
        };
        self.finish_secagg(outcome, now);
    }

    /// **Simulation only** (`dpfl-sim`'s `secure_sum = "sum"`): ends the protocol round of
    /// training round `round`, before its first stage was answered, with `sum`: the sum mod
    /// 2^b of every participant's encoded input, which is exactly what the protocol unmasks
    /// when nobody drops out (checked bit for bit by the simulator's tests). It spares a
    /// simulation the pairwise masks' cost; everything after the unmasking (the threshold
    /// checks, decoding, ledger) runs as in a deployment. A deployment never calls it: its
    /// nodes never hand their inputs to the server.
    pub fn complete_secagg_in_simulation(
        &mut self,
        round: u64,
        sum: Vec<u64>,
        now: Instant,
    ) -> Result<(), Rejection> {
        let Phase::SecAgg(p) = &self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        if p.fit.round != round {
            return Err(Rejection::Stale {
                got: round,
                current: p.fit.round,
            });
        }
        if p.server.stage() != Stage::AdvertiseKeys
            || p.server.pending().len() != p.server.context().participants.len()
        {
            return Err(Rejection::Protocol(
                "a simulated sum replaces the whole protocol round, not a part of it",
            ));
        }
        let ctx = p.server.context();
        let modulus_ok = ctx.bits >= 64 || sum.iter().all(|v| *v >> ctx.bits == 0);
        if sum.len() != ctx.vector_len as usize || !modulus_ok {
            return Err(Rejection::Protocol(
                "a simulated sum must have the round's length, reduced mod 2^b",
            ));
        }
        let mut survivors = ctx.participants.clone();
        survivors.sort();
        let agg = dpfl_secagg::Aggregate {
            round: ctx.round,
            sum,
            survivors,
        };
        self.finish_secagg(Ok(agg), now);
        Ok(())
    }

    /// The protocol round is over: decodes and hands the sum to the strategy (or records
    /// why not), then closes the training round.
    fn finish_secagg(&mut self, outcome: Result<dpfl_secagg::Aggregate, String>, now: Instant) {
        let Phase::SecAgg(p) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return;
        };
        let round = p.fit.round;
        let SecAggPhase {
            mut fit,
            server,
            clip,
            ..
        } = *p;
        let n = server.context().len();
        let bits = server.context().bits;
        let result = outcome.and_then(|agg| {
            fit.sum_digest = Some(sum_digest(&agg.sum));
            let sum = match &fit.distributed {
                Some(d) => {
                    // The unmasked sum carries every survivor's noise share; no fewer than
                    // the accounted count may be released.
                    if agg.survivors.len() < d.params.min_contributors {
                        return Err(format!(
                            "{} survivors, fewer than the {} distributed DP accounts for",
                            agg.survivors.len(),
                            d.params.min_contributors
                        ));
                    }
                    let encoder = DistributedEncoder::new(d.params, d.rotation_seed)
                        .map_err(|e| e.to_string())?;
                    // Count 1: the decoded sum itself; the strategy divides by the
                    // expected count as in central mode.
                    encoder
                        .decode_sum(&agg.sum, 1)
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .map(f64::from)
                        .collect()
                }
                None => {
                    let encoder = dpfl_secagg::Encoding::FixedPoint { clip, bits }
                        .encoder(n)
                        .map_err(|e| e.to_string())?;
                    encoder.decode_sum(&agg.sum).map_err(|e| e.to_string())?
                }
            };
            self.strategy
                .accumulate_sum(fit.round, &sum, agg.survivors.len())
                .map_err(|e| e.to_string())?;
            Ok(agg.survivors)
        });
        let survivors = match result {
            Ok(survivors) => survivors,
            Err(why) => {
                tracing::warn!(round, "secure aggregation failed: {why}");
                fit.note = Some(format!("secure aggregation aborted: {why}"));
                Vec::new()
            }
        };
        for node in &fit.held {
            if !survivors.contains(node) {
                fit.failures.push(Failure {
                    node: node.clone(),
                    reason: "dropped out of secure aggregation".into(),
                });
            }
        }
        fit.accepted = survivors;
        self.phase = Phase::Fit(fit);
        self.close_fit(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{build, FedAvgConfig, TrainSettings};
    use dpfl_common::dp::SimulationGaussian;
    use dpfl_common::wire::TrainMetrics;

    const P: usize = 3 * 2 + 2;

    fn spec() -> ModelSpec {
        ModelSpec::new(vec![3, 2]).unwrap()
    }

    fn coordinator(min_fit: usize, dp: DpParams, retries: u32) -> Coordinator {
        let strategy = build(
            FedAvgConfig::default(),
            TrainSettings::default(),
            dp,
            P,
            Box::new(SimulationGaussian::seeded(1)),
        )
        .unwrap();
        let cfg = CoordinatorConfig {
            rounds: 3,
            min_clients: 4,
            min_fit_clients: min_fit,
            round_timeout: Duration::from_secs(10),
            eval_timeout: Duration::from_secs(5),
            max_round_retries: retries,
            selection: Selection::Seeded(7),
            limits: UpdateLimits::default(),
            spec: spec(),
            dp,
            secure_aggregation: None,
        };
        Coordinator::new(
            cfg,
            strategy,
            Coordinator::initial_snapshot(vec![0.0; P], &dp),
        )
        .unwrap()
    }

    fn info() -> NodeInfo {
        NodeInfo {
            num_examples: 1000,
            num_eval_examples: 100,
        }
    }

    fn meta(round: u64, n: u64) -> UpdateMeta {
        UpdateMeta {
            round,
            spec_hash: spec().hash(),
            num_examples: n,
            metrics: Some(TrainMetrics {
                loss: 1.0,
                accuracy: 0.5,
                steps: 1,
                seconds: 0.1,
            }),
            clipped: None,
        }
    }

    fn train_nodes(c: &mut Coordinator) -> (u64, Vec<NodeId>) {
        loop {
            match c.poll_action() {
                Some(Action::Train { round, nodes, .. }) => return (round, nodes),
                Some(_) => continue,
                None => panic!("no train action"),
            }
        }
    }

    fn connect_all(c: &mut Coordinator, t: Instant) {
        for i in 0..4 {
            c.handle_connect(format!("n{i}"), info(), t);
        }
    }

    #[test]
    fn waits_for_min_clients_then_runs_all_rounds() {
        let t0 = Instant::now();
        let mut c = coordinator(2, DpParams::default(), 0);
        for i in 0..3 {
            c.handle_connect(format!("n{i}"), info(), t0);
        }
        assert!(c.poll_action().is_none());
        c.handle_connect("n3".into(), info(), t0);
        for expected_round in 1..=3 {
            let (round, nodes) = train_nodes(&mut c);
            assert_eq!(round, expected_round);
            assert_eq!(nodes.len(), 4);
            for n in &nodes {
                c.handle_update(n, round, meta(round, 10), vec![1.0; P], t0)
                    .unwrap();
            }
        }
        let mut completed = 0;
        let mut finished = false;
        while let Some(a) = c.poll_action() {
            match a {
                Action::RoundCompleted(r) => {
                    completed += 1;
                    assert_eq!(r.participants.len(), 4);
                    assert_eq!(r.train_loss, Some(1.0));
                }
                Action::Finish {
                    reason,
                    rounds_completed,
                } => {
                    assert_eq!(reason, FinishReason::Completed);
                    assert_eq!(rounds_completed, 3);
                    finished = true;
                }
                _ => {}
            }
        }
        assert_eq!(
            completed, 1,
            "the first two reports were drained by train_nodes"
        );
        assert!(finished);
        assert_eq!(c.global()[0], 3.0);
    }

    #[test]
    fn deadline_with_quorum_aggregates_only_what_arrived() {
        let t0 = Instant::now();
        let mut c = coordinator(2, DpParams::default(), 0);
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        c.handle_update(&nodes[0], round, meta(round, 1), vec![2.0; P], t0)
            .unwrap();
        c.handle_update(&nodes[1], round, meta(round, 3), vec![6.0; P], t0)
            .unwrap();
        c.handle_disconnect(&nodes[2], t0);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        c.handle_timeout(t0 + Duration::from_secs(11));
        let report = loop {
            if let Some(Action::RoundCompleted(r)) = c.poll_action() {
                break r;
            }
        };
        assert_eq!(report.participants.len(), 2);
        assert_eq!(report.failures.len(), 2);
        assert!(report.failures.iter().any(|f| f.reason == "disconnected"));
        assert!(report
            .failures
            .iter()
            .any(|f| f.reason == "deadline passed"));
        // (1*2 + 3*6) / 4 = 5
        assert_eq!(c.global()[0], 5.0);
        // Below min_clients no round starts; the dropped client rejoins for the next one.
        assert!(c.poll_action().is_none());
        c.handle_connect(nodes[2].clone(), info(), t0);
        // A late update for the closed round is stale.
        let (round2, _) = train_nodes(&mut c);
        assert_eq!(round2, 2);
        let late = c.handle_update(&nodes[3], 1, meta(1, 1), vec![0.0; P], t0);
        assert!(matches!(late, Err(Rejection::Stale { got: 1, current: 2 })));
    }

    #[test]
    fn last_round_finishes_even_below_min_clients() {
        let t0 = Instant::now();
        let mut c = coordinator(1, DpParams::default(), 0);
        c.cfg.rounds = 1;
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        c.handle_disconnect(&nodes[0], t0);
        for n in &nodes[1..] {
            c.handle_update(n, round, meta(round, 1), vec![1.0; P], t0)
                .unwrap();
        }
        let mut finished = false;
        while let Some(a) = c.poll_action() {
            finished |= matches!(a, Action::Finish { .. });
        }
        assert!(finished);
    }

    #[test]
    fn replayed_answer_is_rejected_and_fails_the_round_for_that_node() {
        let t0 = Instant::now();
        let mut c = coordinator(1, DpParams::default(), 0);
        connect_all(&mut c, t0);
        let (r1, nodes) = train_nodes(&mut c);
        for n in &nodes {
            c.handle_update(n, r1, meta(r1, 1), vec![1.0; P], t0)
                .unwrap();
        }
        let (r2, nodes) = train_nodes(&mut c);
        let e = c
            .handle_update(&nodes[0], r2, meta(r1, 1), vec![1.0; P], t0)
            .unwrap_err();
        assert_eq!(e.kind(), "replayed");
        let e = c
            .handle_update(&nodes[1], r2, meta(r2 + 3, 1), vec![1.0; P], t0)
            .unwrap_err();
        assert_eq!(e.kind(), "wrong_round");
        // An error from an old request does not fail the node in the open round.
        c.handle_transport_error(&nodes[2], r1, "timeout", "late", t0);
        c.handle_update(&nodes[2], r2, meta(r2, 1), vec![1.0; P], t0)
            .unwrap();
        c.handle_update(&nodes[3], r2, meta(r2, 1), vec![1.0; P], t0)
            .unwrap();
        let report = loop {
            if let Some(Action::RoundCompleted(r)) = c.poll_action() {
                break r;
            }
        };
        assert_eq!(report.round, r2);
        assert_eq!(report.participants.len(), 2);
        assert_eq!(report.failures.len(), 2);
    }

    #[test]
    fn missed_quorum_retries_then_abandons() {
        let t0 = Instant::now();
        let mut c = coordinator(3, DpParams::default(), 1);
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        c.handle_update(&nodes[0], round, meta(round, 1), vec![9.0; P], t0)
            .unwrap();
        c.handle_timeout(t0 + Duration::from_secs(11));
        let mut retried = false;
        let (r2, _) = loop {
            match c.poll_action() {
                Some(Action::RoundRetried { attempt, .. }) => {
                    retried = true;
                    assert_eq!(attempt, 2);
                }
                Some(Action::Train { round, nodes, .. }) => break (round, nodes),
                Some(_) => {}
                None => panic!("expected a retry"),
            }
        };
        assert!(retried);
        assert_eq!(r2, 1);
        c.handle_timeout(t0 + Duration::from_secs(30));
        let report = loop {
            if let Some(Action::RoundCompleted(r)) = c.poll_action() {
                break r;
            }
        };
        assert!(report.abandoned);
        assert!(!report.model_updated);
        assert_eq!(
            c.global()[0],
            0.0,
            "the update of the failed attempt must not leak in"
        );
    }

    #[test]
    fn bad_updates_get_typed_rejections_and_change_nothing() {
        let t0 = Instant::now();
        let mut c = coordinator(1, DpParams::default(), 0);
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        let n = &nodes[0];
        let mut wrong = meta(round, 1);
        wrong.spec_hash = [0; 32];
        assert_eq!(
            c.handle_update("stranger", round, meta(round, 1), vec![0.0; P], t0),
            Err(Rejection::NotSelected(1))
        );
        assert!(matches!(
            c.handle_update(n, round + 1, meta(round + 1, 1), vec![0.0; P], t0),
            Err(Rejection::FutureRound { .. })
        ));
        assert!(matches!(
            c.handle_update(n, round, meta(round, 1), vec![0.0; 3], t0),
            Err(Rejection::Length { .. })
        ));
        // n failed the round with its malformed update; the others carry on.
        let n1 = &nodes[1];
        let mut nan = vec![0.0; P];
        // An over-large value before the NaN: the NaN is still what is reported, at its
        // index (the one-pass check only says "something is wrong"; the rescan names it).
        nan[1] = 2e4;
        nan[4] = f32::NAN;
        assert_eq!(
            c.handle_update(n1, round, meta(round, 1), nan, t0),
            Err(Rejection::NonFinite(4))
        );
        assert_eq!(
            c.handle_update(&nodes[2], round, wrong, vec![0.0; P], t0),
            Err(Rejection::SpecHash)
        );
        c.handle_update(&nodes[3], round, meta(round, 1), vec![1.0; P], t0)
            .unwrap();
        assert_eq!(
            c.handle_update(&nodes[3], round, meta(round, 1), vec![1.0; P], t0)
                .unwrap_err()
                .kind(),
            "stale"
        );
        let report = loop {
            if let Some(Action::RoundCompleted(r)) = c.poll_action() {
                break r;
            }
        };
        assert_eq!(report.participants, vec![nodes[3].clone()]);
        assert_eq!(c.global()[0], 1.0);
        for kind in [
            "not_selected",
            "future_round",
            "length",
            "non_finite",
            "spec_hash",
        ] {
            assert_eq!(
                report.rejected.get(kind),
                Some(&1),
                "{kind}: {:?}",
                report.rejected
            );
        }
    }

    #[test]
    fn stops_before_the_round_that_would_exceed_target_epsilon() {
        let t0 = Instant::now();
        let dp = DpParams {
            mode: DpMode::Central,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sampling_rate: 1.0,
            delta: 1e-5,
            // one round (q=1, z=1) costs 4.38 (PLD); two cost 6.58
            target_epsilon: Some(6.0),
            adaptive_clipping: None,
            audit_canaries: 0,
        };
        let mut c = coordinator(1, dp, 0);
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        for n in &nodes {
            c.handle_update(n, round, meta(round, 1), vec![0.1; P], t0)
                .unwrap();
        }
        let mut finish = None;
        while let Some(a) = c.poll_action() {
            if let Action::Finish {
                reason,
                rounds_completed,
            } = a
            {
                finish = Some((reason, rounds_completed));
            }
        }
        let (reason, done) = finish.expect("must stop");
        assert_eq!(done, 1);
        assert!(matches!(reason, FinishReason::BudgetReached { target, .. } if target == 6.0));
        let one = dpfl_common::dp::accountant::epsilon(1.0, 1.0, 1, 1e-5)
            .unwrap()
            .0;
        assert!((c.ledger().epsilon() - one).abs() < 1e-12);
        assert!((one - 4.3772).abs() < 0.01, "{one}");
    }

    fn central(q: f64) -> DpParams {
        DpParams {
            mode: DpMode::Central,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sampling_rate: q,
            delta: 1e-5,
            target_epsilon: None,
            adaptive_clipping: None,
            audit_canaries: 0,
        }
    }

    fn with_nodes(mut c: Coordinator, n: usize, t: Instant) -> Coordinator {
        for i in 0..n {
            c.handle_connect(format!("n{i:03}"), info(), t);
        }
        c
    }

    #[test]
    fn deployment_selection_is_unpredictable_and_seeded_selection_reproducible() {
        // Audit: selection was ChaCha seeded from the config `seed`, so the sample of every
        // round could be predicted and amplification by sampling did not hold.
        let t0 = Instant::now();
        let sample = |selection: Selection| {
            let mut c = coordinator(1, central(0.5), 0);
            c.cfg.selection = selection;
            c.cfg.min_clients = 200;
            let mut c = with_nodes(c, 200, t0);
            train_nodes(&mut c).1
        };
        let (a, b) = (sample(Selection::Os), sample(Selection::Os));
        assert_ne!(
            a, b,
            "two deployments with one config must select differently"
        );
        assert_eq!(sample(Selection::Seeded(3)), sample(Selection::Seeded(3)));
    }

    #[test]
    fn dp_retry_asks_the_same_sample_and_checks_the_budget_first() {
        // Audit: a retry drew a fresh Poisson sample (the released sample was then no
        // longer Poisson(q)) and local retries skipped the budget check.
        let t0 = Instant::now();
        let mut dp = central(0.5);
        dp.mode = DpMode::Local;
        let mut c = coordinator(1000, dp, 3);
        c.cfg.min_clients = 50;
        let mut c = with_nodes(c, 50, t0);
        let (round, first) = train_nodes(&mut c);
        // Two of the sample answer (released to the server in local mode), then the
        // deadline: quorum missed.
        for n in &first[..2] {
            c.handle_update(n, round, meta(round, 0), vec![0.01; P], t0)
                .unwrap();
        }
        c.handle_timeout(t0 + Duration::from_secs(11));
        let (r2, second) = train_nodes(&mut c);
        assert_eq!(r2, round);
        assert_eq!(second, first, "a DP retry must ask the same sample");
        assert_eq!(
            c.ledger().rounds.len(),
            1,
            "the released attempt is charged"
        );
        // A budget that the next release would exceed stops before the next attempt.
        let spent = c.ledger().epsilon();
        c.cfg.dp.target_epsilon = Some(spent * 1.01);
        c.handle_timeout(t0 + Duration::from_secs(30));
        let mut finish = None;
        while let Some(a) = c.poll_action() {
            assert!(
                !matches!(a, Action::Train { .. }),
                "no attempt beyond the budget"
            );
            if let Action::Finish { reason, .. } = a {
                finish = Some(reason);
            }
        }
        assert!(
            matches!(finish, Some(FinishReason::BudgetReached { .. })),
            "{finish:?}"
        );
    }

    #[test]
    fn a_central_round_is_released_even_below_quorum() {
        // Whether a round is released must not depend on how many sampled clients answered.
        let t0 = Instant::now();
        let mut c = coordinator(3, central(1.0), 0);
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        c.handle_update(&nodes[0], round, meta(round, 1), vec![0.1; P], t0)
            .unwrap();
        c.handle_timeout(t0 + Duration::from_secs(11));
        let report = loop {
            if let Some(Action::RoundCompleted(r)) = c.poll_action() {
                break r;
            }
        };
        assert!(!report.abandoned);
        assert!(report.model_updated);
        assert!(report
            .note
            .as_deref()
            .unwrap_or("")
            .contains("below quorum"));
        assert_eq!(c.ledger().rounds.len(), 1);
    }

    #[test]
    fn extreme_values_and_claims_are_rejected_per_update_not_per_round() {
        // Audit: values near f32::MAX vetoed every round; num_examples = 10^12 steered it.
        let t0 = Instant::now();
        let mut c = coordinator(1, DpParams::default(), 0);
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        let e = c
            .handle_update(
                &nodes[0],
                round,
                meta(round, 10),
                vec![f32::MAX / 2.0; P],
                t0,
            )
            .unwrap_err();
        assert_eq!(e.kind(), "magnitude");
        let e = c
            .handle_update(
                &nodes[1],
                round,
                meta(round, 1_000_000_000_000),
                vec![0.0; P],
                t0,
            )
            .unwrap_err();
        assert_eq!(e.kind(), "weight");
        let mut bad = meta(round, 10);
        bad.metrics.as_mut().unwrap().loss = 1e300;
        let e = c
            .handle_update(&nodes[2], round, bad, vec![0.0; P], t0)
            .unwrap_err();
        assert_eq!(e.kind(), "metrics");
        c.handle_update(&nodes[3], round, meta(round, 10), vec![1.0; P], t0)
            .unwrap();
        let report = loop {
            if let Some(Action::RoundCompleted(r)) = c.poll_action() {
                break r;
            }
        };
        assert!(report.model_updated, "the honest update still counts");
        assert_eq!(c.global()[0], 1.0);
    }

    #[test]
    fn no_node_carries_more_than_its_share_of_the_weight() {
        let caps = weight_caps(
            &[
                ("a".into(), 100),
                ("b".into(), 100),
                ("evil".into(), 1_000_000),
            ],
            0.5,
        );
        assert_eq!(caps["a"], 100);
        assert_eq!(caps["evil"], 200, "{caps:?}");
        // Honest equal nodes are untouched.
        let caps = weight_caps(&[("a".into(), 7), ("b".into(), 7), ("c".into(), 7)], 0.5);
        assert!(caps.values().all(|v| *v == 7));
        // Pessimistic about who answers: with a quorum of 2, the attacker may carry at
        // most the smallest other node's weight (share 0.5).
        let worst = pessimistic_weight_caps(
            &[
                ("evil".into(), 1_000_000_000),
                ("a".into(), 100),
                ("b".into(), 300),
            ],
            0.5,
            2,
        );
        assert_eq!(worst["evil"], 100, "{worst:?}");
        assert_eq!(worst["b"], 100);
        assert_eq!(worst["a"], 100);
        // share = 1 disables the cap; a share below 1/k gives equal weights.
        assert_eq!(
            weight_caps(&[("a".into(), 1), ("b".into(), 9)], 1.0)["b"],
            9
        );
        let eq = weight_caps(&[("a".into(), 1), ("b".into(), 9)], 0.1);
        assert_eq!(eq["a"], eq["b"]);
        // End to end: the big claimant weighs as much as all others together at most.
        let t0 = Instant::now();
        let mut c = coordinator(1, DpParams::default(), 0);
        c.handle_connect(
            "big".into(),
            NodeInfo {
                num_examples: 1_000_000,
                num_eval_examples: 0,
            },
            t0,
        );
        for i in 0..3 {
            c.handle_connect(format!("n{i}"), info(), t0);
        }
        let (round, nodes) = train_nodes(&mut c);
        for n in &nodes {
            let (claim, v) = if n == "big" {
                (1_000_000, -30.0)
            } else {
                (1000, 1.0)
            };
            c.handle_update(n, round, meta(round, claim), vec![v; P], t0)
                .unwrap();
        }
        // caps: others 1000 each (3000), big capped at 3000 -> (3000 * 1 - 3000 * 30) / 6000
        assert!(
            (c.global()[0] - (3000.0 - 90_000.0) / 6000.0).abs() < 1e-3,
            "{}",
            c.global()[0]
        );
    }

    #[test]
    fn local_updates_with_impossible_norms_are_rejected() {
        // Audit: a norm-1000 update (honest ~ sqrt(C^2 + (zC)^2 d)) was accepted in local mode.
        let t0 = Instant::now();
        let mut dp = central(1.0);
        dp.mode = DpMode::Local;
        dp.noise_multiplier = 0.5;
        let mut c = coordinator(1, dp, 0);
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        let e = c
            .handle_update(&nodes[0], round, meta(round, 0), vec![100.0; P], t0)
            .unwrap_err();
        assert_eq!(e.kind(), "norm");
        c.handle_update(&nodes[1], round, meta(round, 0), vec![0.3; P], t0)
            .unwrap();
    }

    #[test]
    fn evaluation_answers_with_impossible_counts_are_rejected() {
        let t0 = Instant::now();
        let s = build(
            FedAvgConfig {
                fraction_evaluate: 1.0,
                ..Default::default()
            },
            TrainSettings::default(),
            DpParams::default(),
            P,
            Box::new(SimulationGaussian::seeded(1)),
        )
        .unwrap();
        let mut c = coordinator(1, DpParams::default(), 0);
        c.strategy = s;
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        for n in &nodes {
            c.handle_update(n, round, meta(round, 10), vec![0.0; P], t0)
                .unwrap();
        }
        let r = EvalResult {
            round,
            loss: 0.5,
            accuracy: 0.9,
            num_examples: u64::MAX,
        };
        assert_eq!(
            c.handle_eval_result(&nodes[0], r, t0).unwrap_err().kind(),
            "metrics"
        );
    }

    #[test]
    fn every_local_attempt_that_asked_nodes_is_charged_whatever_came_back() {
        // Review finding: a local round whose aggregation failed (multi-Krum with too few
        // updates) was abandoned without a ledger row, though the server had received the
        // noised updates; rejected and late answers were never charged either.
        let t0 = Instant::now();
        let mut dp = central(1.0);
        dp.mode = DpMode::Local;
        dp.noise_multiplier = 1.0;
        let strategy = build(
            FedAvgConfig {
                aggregator: crate::aggregate::AggregatorKind::MultiKrum { f: 2, m: 1 },
                ..Default::default()
            },
            TrainSettings::default(),
            dp,
            P,
            Box::new(SimulationGaussian::seeded(1)),
        )
        .unwrap();
        let mut c = coordinator(1, dp, 0);
        c.strategy = strategy;
        connect_all(&mut c, t0);
        let (round, nodes) = train_nodes(&mut c);
        // One malformed answer (rejected), two good ones: Krum needs more than 2f + 2 = 6.
        let _ = c.handle_update(&nodes[0], round, meta(round, 0), vec![0.0; 3], t0);
        for n in &nodes[1..3] {
            c.handle_update(n, round, meta(round, 0), vec![0.01; P], t0)
                .unwrap();
        }
        c.handle_timeout(t0 + Duration::from_secs(11));
        let report = loop {
            if let Some(Action::RoundCompleted(r)) = c.poll_action() {
                break r;
            }
        };
        assert!(report.abandoned, "{:?}", report.note);
        assert_eq!(c.ledger().rounds.len(), 1, "the attempt is charged");
        for n in &nodes {
            assert_eq!(c.ledger().clients[n].rounds_joined, 1, "{n} was asked");
        }
    }
}

#[cfg(test)]
mod secure_tests {
    use super::*;
    use crate::strategy::{build, FedAvgConfig, TrainSettings};
    use dpfl_common::dp::SimulationGaussian;
    use dpfl_secagg::messages::ToNode;
    use dpfl_secagg::params::{AdversaryClass, GraphParams, ThreatModel};
    use dpfl_secagg::{
        Client, ClientConfig, EcdsaP256Signer, EcdsaP256Verifier, FixedPoint, SumEncoder,
    };
    use rand::{Rng, SeedableRng};

    const P: usize = 3 * 2 + 2;
    const CLIP: f64 = 10.0;
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn spec() -> ModelSpec {
        ModelSpec::new(vec![3, 2]).unwrap()
    }

    fn coordinator(n: usize, params: Option<GraphParams>, retries: u32) -> Coordinator {
        let dp = DpParams::default();
        let strategy = build(
            FedAvgConfig::default(),
            TrainSettings::default(),
            dp,
            P,
            Box::new(SimulationGaussian::seeded(1)),
        )
        .unwrap();
        let cfg = CoordinatorConfig {
            rounds: 2,
            min_clients: n,
            min_fit_clients: 3,
            round_timeout: Duration::from_secs(10),
            eval_timeout: Duration::from_secs(5),
            max_round_retries: retries,
            selection: Selection::Seeded(7),
            limits: UpdateLimits::default(),
            spec: spec(),
            dp,
            secure_aggregation: Some(SecAggSettings {
                stage_timeout: TIMEOUT,
                bits: 32,
                clip_norm: CLIP,
                threat: ThreatModel {
                    adversarial_rate: 0.05,
                    dropout_rate: 0.05,
                    adversary: AdversaryClass::CuriousServer,
                },
                params,
                round_id_base: 1000,
                distributed: None,
            }),
        };
        Coordinator::new(
            cfg,
            strategy,
            Coordinator::initial_snapshot(vec![0.0; P], &dp),
        )
        .unwrap()
    }

    /// A coordinator of `n` nodes `n0..n{n-1}`, all connected at `t0`.
    fn connected(n: usize, params: Option<GraphParams>, retries: u32, t0: Instant) -> Coordinator {
        let mut c = coordinator(n, params, retries);
        for i in 0..n {
            c.handle_connect(
                format!("n{i}"),
                NodeInfo {
                    num_examples: 1000,
                    num_eval_examples: 0,
                },
                t0,
            );
        }
        c
    }

    fn meta(round: u64) -> UpdateMeta {
        UpdateMeta {
            round,
            spec_hash: spec().hash(),
            num_examples: 10,
            metrics: None,
            clipped: None,
        }
    }

    /// Real protocol clients standing in for the nodes.
    struct Nodes {
        clients: BTreeMap<NodeId, Client<EcdsaP256Signer, EcdsaP256Verifier>>,
        updates: BTreeMap<NodeId, Vec<f32>>,
        participants: u32,
        rng: rand_chacha::ChaCha20Rng,
        /// Protocol round ids seen in setups.
        ids: Vec<u64>,
    }

    impl Nodes {
        fn new(n: usize) -> Self {
            let names: Vec<NodeId> = (0..n).map(|i| format!("n{i}")).collect();
            let signers: Vec<EcdsaP256Signer> = names
                .iter()
                .map(|_| EcdsaP256Signer::generate().unwrap().0)
                .collect();
            let mut verifier = EcdsaP256Verifier::new();
            for (name, s) in names.iter().zip(&signers) {
                verifier.insert_public_key(name, s.public_key()).unwrap();
            }
            let config = ClientConfig {
                vector_len: P as u32,
                bits: 32,
                threat_model: None,
            };
            let clients = names
                .iter()
                .cloned()
                .zip(signers)
                .map(|(name, s)| {
                    let c = Client::new(name.clone(), config, s, verifier.clone());
                    (name, c)
                })
                .collect();
            Self {
                clients,
                updates: BTreeMap::new(),
                participants: 0,
                rng: rand_chacha::ChaCha20Rng::seed_from_u64(42),
                ids: Vec::new(),
            }
        }

        /// Every selected node trains (a random update inside the clip ball) and answers
        /// `Held`.
        fn train(&mut self, c: &mut Coordinator, t: Instant) -> u64 {
            let (round, nodes) = loop {
                match c.poll_action() {
                    Some(Action::Train {
                        round,
                        nodes,
                        request,
                        ..
                    }) => {
                        let s = request.secure_aggregation.expect("a secure round");
                        assert_eq!((s.clip_norm, s.bits), (CLIP, 32));
                        break (round, nodes);
                    }
                    Some(_) => continue,
                    None => panic!("no train action"),
                }
            };
            for n in &nodes {
                let u: Vec<f32> = (0..P).map(|_| self.rng.gen_range(-1.0f32..1.0)).collect();
                self.updates.insert(n.clone(), u);
                c.handle_held(n, round, meta(round), t).unwrap();
            }
            round
        }

        fn answer(&mut self, node: &str, msg: &ToNode) -> FromNode {
            let c = self.clients.get_mut(node).unwrap();
            match msg {
                ToNode::Setup(s) => {
                    self.participants = s.context.len();
                    self.ids.push(s.context.round);
                    FromNode::Keys(c.handle_setup(s, &mut self.rng).unwrap())
                }
                ToNode::NeighbourKeys(m) => {
                    FromNode::Shares(c.handle_neighbour_keys(m, &mut self.rng).unwrap())
                }
                ToNode::Shares(m) => {
                    let enc = FixedPoint::new(CLIP, 32, self.participants).unwrap();
                    let x = SumEncoder::encode(&enc, &self.updates[node], &mut self.rng).unwrap();
                    FromNode::MaskedInput(c.handle_shares(m, &x).unwrap())
                }
                ToNode::Survivors(m) => FromNode::Signature(c.handle_survivors(m).unwrap()),
                ToNode::Unmask(m) => FromNode::Unmask(c.handle_unmask(m).unwrap()),
            }
        }

        /// Runs the stages; nodes for which `silent(stage, node)` holds never answer that
        /// stage (nor any later one: a dropped node is asked nothing more). Returns the
        /// other actions and the time after the last deadline waited for.
        fn run_stages(
            &mut self,
            c: &mut Coordinator,
            mut t: Instant,
            silent: &dyn Fn(Stage, &str) -> bool,
        ) -> (Vec<Action>, Instant) {
            let mut other = Vec::new();
            while let Some(a) = c.poll_action() {
                let Action::SecAgg {
                    round,
                    stage,
                    messages,
                    ..
                } = a
                else {
                    other.push(a);
                    continue;
                };
                let mut quiet = false;
                for m in &messages {
                    if silent(stage, &m.node) {
                        quiet = true;
                        continue;
                    }
                    let ans = self.answer(&m.node, &m.message);
                    c.handle_secagg_answer(&m.node, round, ans, t).unwrap();
                }
                if quiet {
                    // The stage stays open until its deadline, not a moment less.
                    let deadline = c.poll_timeout().unwrap();
                    assert!(deadline > t);
                    c.handle_timeout(deadline - Duration::from_millis(1));
                    assert_eq!(c.round_state().phase, RoundPhase::SecureAggregation);
                    assert!(c.actions.is_empty(), "nothing before the deadline");
                    t = deadline;
                    c.handle_timeout(t);
                }
            }
            (other, t)
        }

        fn mean_of(&self, nodes: &[&str]) -> Vec<f64> {
            let mut m = [0.0f64; P];
            for n in nodes {
                for (a, b) in m.iter_mut().zip(&self.updates[*n]) {
                    *a += f64::from(*b);
                }
            }
            m.iter().map(|v| v / nodes.len() as f64).collect()
        }
    }

    fn completed(actions: &[Action]) -> Vec<&RoundReport> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RoundCompleted(r) => Some(r.as_ref()),
                _ => None,
            })
            .collect()
    }

    fn assert_model(c: &Coordinator, expected: &[f64], n: u32) {
        // Fixed point: at most one rounding step per summand and coordinate, over n.
        let step = FixedPoint::new(CLIP, 32, n).unwrap().error_bound(n) / f64::from(n);
        for (g, e) in c.global().iter().zip(expected) {
            assert!(
                (f64::from(*g) - e).abs() <= step + 1e-6,
                "model {g} expected {e} (step {step})"
            );
        }
    }

    #[test]
    fn a_secure_round_gives_the_strategy_the_mean_of_the_held_updates() {
        let t0 = Instant::now();
        let mut c = connected(5, None, 0, t0);
        let mut nodes = Nodes::new(5);
        // A cleartext update is refused in a secure round.
        let (round, list) = match c.poll_action() {
            Some(Action::Train { round, nodes, .. }) => (round, nodes),
            other => panic!("{other:?}"),
        };
        let e = c
            .handle_update(&list[0], round, meta(round), vec![0.0; P], t0)
            .unwrap_err();
        assert_eq!(e.kind(), "protocol");
        // Start over with a fresh coordinator where every node holds its update.
        let mut c = connected(5, None, 0, t0);
        nodes.train(&mut c, t0);
        let (other, _) = nodes.run_stages(&mut c, t0, &|_, _| false);
        let r = completed(&other);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].participants.len(), 5);
        assert!(r[0].model_updated, "{:?}", r[0].note);
        let all: Vec<&str> = ["n0", "n1", "n2", "n3", "n4"].to_vec();
        assert_model(&c, &nodes.mean_of(&all), 5);
    }

    #[test]
    fn a_simulated_sum_is_taken_only_whole_well_formed_and_for_the_open_round() {
        let t0 = Instant::now();
        let mut c = connected(5, None, 0, t0);
        let mut nodes = Nodes::new(5);
        // Before any protocol round: refused.
        let e = c
            .complete_secagg_in_simulation(1, vec![0; P], t0)
            .unwrap_err();
        assert_eq!(e.kind(), "no_open_round");
        let round = nodes.train(&mut c, t0);
        let Some(Action::SecAgg {
            stage, messages, ..
        }) = c.poll_action()
        else {
            panic!("no secure aggregation stage");
        };
        assert_eq!(stage, Stage::AdvertiseKeys);
        let stale = c.complete_secagg_in_simulation(round + 1, vec![0; P], t0);
        assert_eq!(stale.unwrap_err().kind(), "stale");
        let short = c.complete_secagg_in_simulation(round, vec![0; P - 1], t0);
        assert_eq!(short.unwrap_err().kind(), "protocol");
        let wide = c.complete_secagg_in_simulation(round, vec![1 << 32; P], t0);
        assert_eq!(wide.unwrap_err().kind(), "protocol");
        // Once a stage was answered, the protocol round is under way: a sum cannot replace
        // part of it.
        let first = &messages[0];
        let ans = nodes.answer(&first.node, &first.message);
        c.handle_secagg_answer(&first.node, round, ans, t0).unwrap();
        let late = c.complete_secagg_in_simulation(round, vec![0; P], t0);
        assert_eq!(late.unwrap_err().kind(), "protocol");
        // On a fresh round, the encoded sum of every held update is decoded to their mean.
        let mut c = connected(5, None, 0, t0);
        let mut nodes = Nodes::new(5);
        let round = nodes.train(&mut c, t0);
        let Some(Action::SecAgg { messages, .. }) = c.poll_action() else {
            panic!("no secure aggregation stage");
        };
        let enc = FixedPoint::new(CLIP, 32, messages.len() as u32).unwrap();
        let mut sum = vec![0u64; P];
        for m in &messages {
            let x = SumEncoder::encode(&enc, &nodes.updates[&m.node], &mut nodes.rng).unwrap();
            for (a, b) in sum.iter_mut().zip(x) {
                *a = (*a + b) & 0xFFFF_FFFF;
            }
        }
        c.complete_secagg_in_simulation(round, sum, t0).unwrap();
        let other: Vec<Action> = std::iter::from_fn(|| c.poll_action()).collect();
        let r = completed(&other);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].participants.len(), 5);
        assert!(r[0].model_updated, "{:?}", r[0].note);
        let all: Vec<&str> = ["n0", "n1", "n2", "n3", "n4"].to_vec();
        assert_model(&c, &nodes.mean_of(&all), 5);
    }

    #[test]
    fn dropouts_up_to_k_minus_t_at_every_stage_are_recovered() {
        // Complete graph on 8: k = 7, t = 4; k - t = 3 nodes may drop at any stage.
        let params = GraphParams {
            degree: 7,
            threshold: 4,
        };
        let stages = [
            Stage::AdvertiseKeys,
            Stage::ShareKeys,
            Stage::MaskedInput,
            Stage::Consistency,
            Stage::Unmasking,
        ];
        for stage in stages {
            let t0 = Instant::now();
            let mut c = connected(8, Some(params), 0, t0);
            let mut nodes = Nodes::new(8);
            nodes.train(&mut c, t0);
            let dropped = ["n1", "n4", "n6"];
            let (other, _) =
                nodes.run_stages(&mut c, t0, &|s, n| s >= stage && dropped.contains(&n));
            let r = completed(&other);
            assert_eq!(r.len(), 1, "stage {stage}");
            assert!(r[0].model_updated, "stage {stage}: {:?}", r[0].note);
            // Inputs are in the sum exactly when the masked input arrived.
            let inputs: Vec<&str> = (0..8)
                .map(|i| ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"][i])
                .filter(|n| stage > Stage::MaskedInput || !dropped.contains(n))
                .collect();
            assert_eq!(r[0].participants.len(), inputs.len(), "stage {stage}");
            assert_model(&c, &nodes.mean_of(&inputs), 8);
        }
    }

    #[test]
    fn more_dropouts_abort_unmask_nothing_and_the_retry_uses_a_new_round_id() {
        let params = GraphParams {
            degree: 7,
            threshold: 4,
        };
        let t0 = Instant::now();
        let mut c = connected(8, Some(params), 1, t0);
        let mut nodes = Nodes::new(8);
        let round = nodes.train(&mut c, t0);
        // Four drop after sharing: below t + 1 survivors, the round aborts.
        let dropped = ["n0", "n2", "n5", "n7"];
        let (other, t1) = nodes.run_stages(&mut c, t0, &|s, n| {
            s >= Stage::MaskedInput && dropped.contains(&n)
        });
        assert!(completed(&other).is_empty());
        assert!(other.iter().any(
            |a| matches!(a, Action::RoundRetried { round: r, attempt: 2, accepted: 0, .. } if *r == round)
        ));
        // The retry's train requests were queued with the retry; drive it to the end.
        assert_eq!(c.global().as_slice(), &[0.0; P], "nothing was unmasked");
        // The retried attempt's Train action was consumed by run_stages: train again by hand.
        let (round2, list) = other
            .iter()
            .find_map(|a| match a {
                Action::Train { round, nodes, .. } => Some((*round, nodes.clone())),
                _ => None,
            })
            .expect("the retry asks again");
        assert_eq!(round2, round);
        for n in &list {
            c.handle_held(n, round2, meta(round2), t1).unwrap();
        }
        // A late answer of the aborted attempt's protocol round is stale in the new one and
        // does not drop its sender.
        let late = FromNode::Signature(dpfl_secagg::messages::SurvivorSignature {
            round: 1000,
            signature: vec![1; 64],
        });
        assert_eq!(
            c.handle_secagg_answer("n1", round2, late, t1),
            Err(Rejection::Stale {
                got: 1000,
                current: 1001
            })
        );
        let (other, _) = nodes.run_stages(&mut c, t1, &|_, _| false);
        let r = completed(&other);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].participants.len(), 8, "n1 was not dropped");
        assert_eq!(r[0].attempts, 2);
        assert!(r[0].model_updated);
        assert_eq!(nodes.ids.len(), 16, "two setups for each of 8 nodes");
        assert!(nodes.ids[..8].iter().all(|&i| i == 1000));
        assert!(nodes.ids[8..].iter().all(|&i| i == 1001), "{:?}", nodes.ids);
    }

    #[test]
    fn too_few_held_updates_never_start_the_protocol() {
        let t0 = Instant::now();
        let mut c = connected(4, None, 0, t0);
        let mut nodes = Nodes::new(4);
        let (round, list) = match c.poll_action() {
            Some(Action::Train { round, nodes, .. }) => (round, nodes),
            other => panic!("{other:?}"),
        };
        // Two answer before the training deadline; two stay silent.
        for n in &list[..2] {
            c.handle_held(n, round, meta(round), t0).unwrap();
        }
        c.handle_timeout(t0 + Duration::from_secs(10));
        let (other, _) = nodes.run_stages(&mut c, t0, &|_, _| false);
        let r = completed(&other);
        assert_eq!(r.len(), 1);
        assert!(r[0].abandoned);
        assert!(nodes.ids.is_empty(), "no setup was sent");
        assert!(r[0].note.as_deref().unwrap_or("").contains("not started"));
    }
}
