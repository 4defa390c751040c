//! The round coordinator: a state machine that runs rounds, driven by events and a clock.
//!
//! Like `quinn-proto`, it owns no socket and reads no clock: the driver feeds it events
//! (`handle_*`, each with `now`), asks for what to do next ([`Coordinator::poll_action`])
//! and when to wake it up ([`Coordinator::poll_timeout`]). The real server drives it from
//! QUIC connections; the simulator and the unit tests drive it directly.
//!
//! A round: select (strategy), send train requests, collect updates until every selected
//! client answered or the deadline passed, then aggregate if at least the quorum answered,
//! otherwise retry (re-select) or, after `max_round_retries`, abandon the round. Every
//! update is validated before the strategy sees it; a rejected update changes neither the
//! model nor the ledger. Then optional federated evaluation, then the next round.

use crate::ledger::Ledger;
use crate::strategy::{DpParams, EvalSummary, Failure, FitResult, NodeId, RoundPrivacy, Strategy};
use dpfl_common::config::{ClientPrivacy, DpMode};
use dpfl_common::model::{ModelSpec, SpecHash};
use dpfl_common::wire::{EvalResult, EvaluateRequest, TrainRequest, UpdateMeta};
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
    /// Seed for selection.
    pub seed: u64,
    /// The model.
    pub spec: ModelSpec,
    /// DP parameters (for the ledger and the budget check).
    pub dp: DpParams,
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
    /// The strategy refused it.
    #[error("strategy: {0}")]
    Strategy(String),
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
            Rejection::Strategy(_) => "strategy",
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
    /// Privacy layer's record.
    pub privacy: Option<RoundPrivacy>,
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
    selected: BTreeSet<NodeId>,
    pending: BTreeSet<NodeId>,
    accepted: Vec<NodeId>,
    failures: Vec<Failure>,
    deadline: Instant,
    started: Instant,
    privacy: ClientPrivacy,
    loss_sum: f64,
    acc_sum: f64,
    metric_weight: f64,
}

struct EvalRound {
    pending: BTreeSet<NodeId>,
    results: Vec<(NodeId, EvalResult)>,
    deadline: Instant,
    report: Box<RoundReport>,
}

enum Phase {
    Waiting,
    Fit(FitRound),
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
    phase: Phase,
    actions: std::collections::VecDeque<Action>,
    rejected: BTreeMap<&'static str, u64>,
    norm_exceeded: u64,
    round_started: Option<Instant>,
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
            phase: Phase::Waiting,
            actions: Default::default(),
            rejected: BTreeMap::new(),
            norm_exceeded: 0,
            round_started: None,
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
            _ => None,
        }
    }

    /// Next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Coordinator::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Fit(f) => Some(f.deadline),
            Phase::Eval(e) => Some(e.deadline),
            _ => None,
        }
    }

    /// A client completed its handshake.
    pub fn handle_connect(&mut self, node: NodeId, now: Instant) {
        self.connected.insert(node);
        self.maybe_start(now);
    }

    /// A client's connection ended.
    pub fn handle_disconnect(&mut self, node: &str, now: Instant) {
        self.connected.remove(node);
        self.fail(node, "disconnected", now);
    }

    /// A client reported that it could not serve a request.
    pub fn handle_failed(&mut self, node: &str, round: u64, reason: &str, now: Instant) {
        if self.open_round() == Some(round) {
            self.fail(node, &format!("client error: {reason}"), now);
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
        let res = self.validate_update(node, &meta, &delta);
        if let Err(e) = &res {
            *self.rejected.entry(e.kind()).or_default() += 1;
            // A selected sender whose update for this round is malformed has failed it.
            if matches!(
                e,
                Rejection::SpecHash | Rejection::Length { .. } | Rejection::NonFinite(_)
            ) {
                self.fail(node, &format!("rejected: {e}"), now);
            }
            return res;
        }
        let Phase::Fit(f) = &mut self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        if f.privacy.mode == DpMode::Central {
            let norm = dpfl_common::dp::l2_norm(&delta);
            if norm > f.privacy.clip_norm * (1.0 + 1e-4) {
                self.norm_exceeded += 1;
            }
        }
        if let Some(m) = &meta.metrics {
            let w = meta.num_examples.max(1) as f64;
            f.loss_sum += m.loss * w;
            f.acc_sum += m.accuracy * w;
            f.metric_weight += w;
        }
        let result = FitResult {
            node: node.to_string(),
            delta,
            num_examples: meta.num_examples,
            metrics: meta.metrics,
            clipped: meta.clipped,
        };
        let round = f.round;
        if let Err(e) = self.strategy.accumulate(round, result) {
            let r = Rejection::Strategy(e.to_string());
            *self.rejected.entry(r.kind()).or_default() += 1;
            self.fail(node, &r.to_string(), now);
            return Err(r);
        }
        if let Phase::Fit(f) = &mut self.phase {
            f.pending.remove(node);
            f.accepted.push(node.to_string());
            if f.pending.is_empty() {
                self.close_fit(now);
            }
        }
        Ok(())
    }

    fn validate_update(
        &self,
        node: &str,
        meta: &UpdateMeta,
        delta: &[f32],
    ) -> Result<(), Rejection> {
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
        if delta.len() != self.cfg.spec.num_params() {
            return Err(Rejection::Length {
                expected: self.cfg.spec.num_params(),
                got: delta.len(),
            });
        }
        if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::NonFinite(i));
        }
        Ok(())
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
        if !(result.loss.is_finite() && (0.0..=1.0).contains(&result.accuracy)) {
            return Err(Rejection::Strategy("evaluation result out of range".into()));
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
            Phase::Eval(e) if now >= e.deadline => self.close_eval(now),
            _ => {}
        }
    }

    fn round_rng(&self, round: u64, attempt: u32, salt: u64) -> rand_chacha::ChaCha20Rng {
        let s = self.cfg.seed
            ^ round.wrapping_mul(0xA24B_AED4_963E_E407)
            ^ (attempt as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25)
            ^ salt;
        rand_chacha::ChaCha20Rng::seed_from_u64(s)
    }

    fn planned_privacy(&self) -> RoundPrivacy {
        RoundPrivacy {
            mode: self.cfg.dp.mode,
            sampling_rate: self.cfg.dp.sampling_rate,
            noise_multiplier: self.cfg.dp.noise_multiplier,
            clip_norm: self.cfg.dp.clip_norm,
            clipped_fraction: None,
            population: self.connected.len(),
            released: true,
        }
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
        if let (Some(target), true) = (self.cfg.dp.target_epsilon, self.cfg.dp.mode.is_private()) {
            let p = self.planned_privacy();
            let expected = ((p.sampling_rate * p.population as f64).round() as usize).max(2);
            match self.ledger.epsilon_if(&p, expected) {
                Ok(next) if next > target => {
                    self.finish(FinishReason::BudgetReached {
                        epsilon: self.ledger.budget_epsilon(),
                        next,
                        target,
                    });
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("privacy accounting failed, stopping: {e}");
                    self.finish(FinishReason::BudgetReached {
                        epsilon: self.ledger.budget_epsilon(),
                        next: f64::INFINITY,
                        target,
                    });
                    return;
                }
            }
        }
        self.round_started = Some(now);
        self.start_attempt(self.completed + 1, 1, now);
    }

    fn start_attempt(&mut self, round: u64, attempt: u32, now: Instant) {
        let available: Vec<NodeId> = self.connected.iter().cloned().collect();
        let mut rng = self.round_rng(round, attempt, 1);
        let plan = self.strategy.configure_fit(round, &available, &mut rng);
        let selected: BTreeSet<NodeId> = plan
            .nodes
            .into_iter()
            .filter(|n| self.connected.contains(n))
            .collect();
        let request = TrainRequest {
            round,
            spec_hash: self.spec_hash,
            config: plan.config,
            privacy: plan.privacy,
        };
        self.phase = Phase::Fit(FitRound {
            round,
            attempt,
            pending: selected.clone(),
            selected: selected.clone(),
            accepted: Vec::new(),
            failures: Vec::new(),
            deadline: now + self.cfg.round_timeout,
            started: now,
            privacy: plan.privacy,
            loss_sum: 0.0,
            acc_sum: 0.0,
            metric_weight: 0.0,
        });
        tracing::debug!(round, attempt, selected = selected.len(), "round started");
        if selected.is_empty() {
            // Poisson sampling may pick nobody; the round still closes (and in central
            // mode still releases noise).
            self.close_fit(now);
        } else {
            self.actions.push_back(Action::Train {
                round,
                nodes: selected.into_iter().collect(),
                request,
                params: self.global.clone(),
            });
        }
    }

    fn close_fit(&mut self, now: Instant) {
        let Phase::Fit(f) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return;
        };
        let quorum = self.cfg.min_fit_clients.min(f.selected.len());
        let mut abandoned = false;
        let mut model_updated = false;
        if f.accepted.len() < quorum {
            // Local mode: the accepted updates were released to the server; they count.
            if self.cfg.dp.mode == DpMode::Local && !f.accepted.is_empty() {
                let mut p = self.planned_privacy();
                p.population = f.selected.len().max(p.population);
                if let Err(e) = self.ledger.record(f.round, &p, &f.accepted) {
                    tracing::error!("ledger: {e}");
                }
            }
            // What the strategy accumulated is dropped: the next configure_fit starts afresh.
            if f.attempt <= self.cfg.max_round_retries {
                self.actions.push_back(Action::RoundRetried {
                    round: f.round,
                    attempt: f.attempt + 1,
                    accepted: f.accepted.len(),
                    quorum,
                });
                self.start_attempt(f.round, f.attempt + 1, now);
                return;
            }
            abandoned = true;
        } else {
            match self
                .strategy
                .aggregate_fit(f.round, &self.global, &f.failures)
            {
                Ok(Some(new)) => {
                    if new.len() == self.global.len() && new.iter().all(|v| v.is_finite()) {
                        self.global = Arc::new(new);
                        model_updated = true;
                    } else {
                        tracing::error!(
                            round = f.round,
                            "strategy produced an invalid model; keeping the previous one"
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(round = f.round, "aggregation failed, round abandoned: {e}");
                    abandoned = true;
                }
            }
        }
        let privacy = if self.cfg.dp.mode.is_private() && !abandoned {
            let p = self.strategy.round_privacy();
            match &p {
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
            privacy,
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
            seed: 7,
            spec: spec(),
            dp,
        };
        Coordinator::new(
            cfg,
            strategy,
            Coordinator::initial_snapshot(vec![0.0; P], &dp),
        )
        .unwrap()
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
            c.handle_connect(format!("n{i}"), t);
        }
    }

    #[test]
    fn waits_for_min_clients_then_runs_all_rounds() {
        let t0 = Instant::now();
        let mut c = coordinator(2, DpParams::default(), 0);
        for i in 0..3 {
            c.handle_connect(format!("n{i}"), t0);
        }
        assert!(c.poll_action().is_none());
        c.handle_connect("n3".into(), t0);
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
        c.handle_connect(nodes[2].clone(), t0);
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
            // one round (q=1, z=1) costs 4.73; two cost ~7.3
            target_epsilon: Some(6.0),
            adaptive_clipping: None,
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
        assert!((c.ledger().epsilon() - 4.728).abs() < 0.01);
    }
}
