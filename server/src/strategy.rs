//! The strategy API: who trains with what settings, how results combine, who evaluates.
//!
//! Shaped after Flower's `Strategy`, because that is what FL practitioners know:
//! - [`Strategy::configure_fit`] picks the clients and the round's training settings;
//! - [`Strategy::accumulate`] receives each accepted update **as it arrives** (so a mean
//!   can stream in O(parameters) memory), [`Strategy::aggregate_fit`] closes the round
//!   with the failures passed in explicitly and may keep the previous model (`None`);
//! - [`Strategy::configure_evaluate`] / [`Strategy::aggregate_evaluate`] do federated
//!   evaluation;
//! - [`Strategy::state`] / [`Strategy::restore`] put optimizer state into checkpoints.
//!
//! Differential privacy composes as **wrappers** ([`LocalDp`], [`CentralDp`]) around any
//! strategy rather than as special cases in the server loop: they override client
//! selection (Poisson sampling, the accountant's assumption), force equal weights, clip or
//! noise, and report what they did through [`Strategy::round_privacy`] for the ledger.
//! Robust aggregators and server optimizers are options of the built-in [`FedAvg`].

use crate::aggregate::{Accumulator, AggregateError, AggregatorKind};
use crate::optimizer::{ServerOptConfig, ServerOptimizer};
use dpfl_common::config::{ClientPrivacy, DpMode, TrainConfig};
use dpfl_common::dp::{clip_in_place, clip_with_norm, GaussianNoise};
use dpfl_common::wire::{EvalResult, TrainMetrics};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

/// A node's identity: the common name of its certificate.
pub type NodeId = String;

/// What the selected clients are asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct FitPlan {
    /// Clients selected for this round (may be empty under Poisson sampling).
    pub nodes: Vec<NodeId>,
    /// Local training settings.
    pub config: TrainConfig,
    /// Clipping and noise the clients apply.
    pub privacy: ClientPrivacy,
}

/// One accepted update.
#[derive(Debug, Clone, PartialEq)]
pub struct FitResult {
    /// Sender.
    pub node: NodeId,
    /// `w_local - w_global` as received (validated: right length, finite).
    delta: Vec<f32>,
    /// Examples the client trained on (0 when the mode withholds it).
    pub num_examples: u64,
    /// Reported training metrics.
    pub metrics: Option<TrainMetrics>,
    /// Whether the client's clipping changed its update (central DP).
    pub clipped: Option<bool>,
    /// `l2_norm(delta)` as the coordinator measured it when it validated the update, so
    /// central DP's re-clip need not read the update again. Only the coordinator sets it
    /// (`measured`), and any mutable access to the delta clears it: no strategy, wrapper
    /// or caller outside this crate can make the re-clip trust a norm that is not the
    /// delta's.
    norm: Option<f64>,
}

impl FitResult {
    /// An update with no measured norm (a strategy that clips measures it itself).
    pub fn new(
        node: NodeId,
        delta: Vec<f32>,
        num_examples: u64,
        metrics: Option<TrainMetrics>,
        clipped: Option<bool>,
    ) -> Self {
        Self {
            node,
            delta,
            num_examples,
            metrics,
            clipped,
            norm: None,
        }
    }

    /// Records the norm the coordinator measured on exactly this delta.
    pub(crate) fn measured(mut self, norm: f64) -> Self {
        self.norm = Some(norm);
        self
    }

    /// The update.
    pub fn delta(&self) -> &[f32] {
        &self.delta
    }

    /// The update, to change: forgets the measured norm.
    pub fn delta_mut(&mut self) -> &mut Vec<f32> {
        self.norm = None;
        &mut self.delta
    }

    /// The update, by value.
    pub fn into_delta(self) -> Vec<f32> {
        self.delta
    }

    /// `l2_norm(delta())` as the coordinator measured it, if it did.
    pub fn norm(&self) -> Option<f64> {
        self.norm
    }
}

/// A selected client that did not deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Who.
    pub node: NodeId,
    /// Why (timeout, disconnect, rejected update, client error).
    pub reason: String,
}

/// What the privacy layer did this round (recorded in the ledger and the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// Mode.
    pub mode: DpMode,
    /// Poisson sampling rate.
    pub sampling_rate: f64,
    /// Noise multiplier z of the round's Gaussian mechanism (the pair with adaptive clipping).
    pub noise_multiplier: f64,
    /// Clipping bound used this round.
    pub clip_norm: f64,
    /// Exact fraction of participants whose update was clipped (`None` when not
    /// observable). Operator-only: it is not covered by the guarantee.
    pub clipped_fraction: Option<f64>,
    /// The clipped fraction estimated from the noised count of adaptive clipping: covered
    /// by the round's mechanism, so it may be published.
    #[serde(default)]
    pub clipped_fraction_noised: Option<f64>,
    /// Population the round sampled from.
    pub population: usize,
    /// Whether noise was actually released this round (false for an abandoned central round).
    pub released: bool,
}

/// Aggregated federated evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Example-weighted mean loss.
    pub loss: f64,
    /// Example-weighted accuracy.
    pub accuracy: f64,
    /// Examples evaluated.
    pub num_examples: u64,
    /// Clients that reported.
    pub clients: usize,
}

/// Errors a strategy reports.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    /// Aggregation failed.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// Noise sampling failed.
    #[error(transparent)]
    Noise(#[from] dpfl_common::dp::NoiseError),
    /// Invalid configuration or state.
    #[error("{0}")]
    Invalid(String),
}

/// A federated learning strategy. See the module docs.
pub trait Strategy: Send {
    /// Name for logs.
    fn name(&self) -> String;

    /// Picks the clients that train in `round` and their settings. `available` is sorted.
    fn configure_fit(&mut self, round: u64, available: &[NodeId], rng: &mut dyn RngCore)
        -> FitPlan;

    /// Receives one accepted update of the open round.
    fn accumulate(&mut self, round: u64, result: FitResult) -> Result<(), StrategyError>;

    /// Receives the sum of `count` clipped updates of the open round, unmasked by secure
    /// aggregation: the strategy never sees the individual updates. Every summand counts
    /// once (secure aggregation rounds are unweighted). Strategies that need individual
    /// updates (robust aggregators, local DP) refuse it.
    fn accumulate_sum(
        &mut self,
        _round: u64,
        _sum: &[f64],
        _count: usize,
    ) -> Result<(), StrategyError> {
        Err(StrategyError::Invalid(format!(
            "strategy {} cannot aggregate a secure sum",
            self.name()
        )))
    }

    /// Closes the round: returns the new global model, or `None` to keep `global`.
    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &[f32],
        failures: &[Failure],
    ) -> Result<Option<Vec<f32>>, StrategyError>;

    /// Applies an aggregated delta to the global model (the server optimizer step).
    /// Privacy wrappers call this on their inner strategy after noising.
    fn apply_delta(&mut self, global: &[f32], delta: &[f32]) -> Vec<f32> {
        global.iter().zip(delta).map(|(w, d)| w + d).collect()
    }

    /// Clients asked to evaluate the global model after `round` (default: none).
    fn configure_evaluate(
        &mut self,
        _round: u64,
        _available: &[NodeId],
        _rng: &mut dyn RngCore,
    ) -> Vec<NodeId> {
        Vec::new()
    }

    /// Combines federated evaluation results (default: example-weighted means).
    fn aggregate_evaluate(
        &mut self,
        _round: u64,
        results: &[(NodeId, EvalResult)],
    ) -> Option<EvalSummary> {
        weighted_eval(results)
    }

    /// What the privacy layer did in the round just aggregated (`None`: no DP).
    fn round_privacy(&self) -> Option<RoundPrivacy> {
        None
    }

    /// The empirical privacy audit of the run, from the initial and the final model (only
    /// strategies that planted canaries have one).
    fn audit(
        &self,
        _initial: &[f32],
        _final_model: &[f32],
        _theoretical: Option<f64>,
    ) -> Option<dpfl_common::dp::audit::AuditReport> {
        None
    }

    /// Serialisable state for checkpoints.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores [`Strategy::state`].
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), StrategyError> {
        Ok(())
    }
}

/// Example-weighted mean of evaluation results.
pub fn weighted_eval(results: &[(NodeId, EvalResult)]) -> Option<EvalSummary> {
    // Counts come from peers: sum without overflow (u128 holds any number of u64s here).
    let n: u128 = results.iter().map(|(_, r)| r.num_examples as u128).sum();
    if n == 0 {
        return None;
    }
    let w = |f: fn(&EvalResult) -> f64| {
        results
            .iter()
            .map(|(_, r)| f(r) * r.num_examples as f64)
            .sum::<f64>()
            / n as f64
    };
    Some(EvalSummary {
        loss: w(|r| r.loss),
        accuracy: w(|r| r.accuracy),
        num_examples: n.min(u64::MAX as u128) as u64,
        clients: results.len(),
    })
}

/// Local training settings with a per-round learning-rate decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSettings {
    /// Base settings (lr is the round-1 learning rate).
    #[serde(flatten)]
    pub base: TrainConfig,
    /// lr of round r = lr * lr_decay^(r-1).
    pub lr_decay: f64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            base: TrainConfig::default(),
            lr_decay: 1.0,
        }
    }
}

impl TrainSettings {
    /// The settings sent in `round`, with a per-round shuffle seed.
    pub fn for_round(&self, round: u64, seed: u64) -> TrainConfig {
        let mut c = self.base.clone();
        c.lr = self.base.lr
            * self
                .lr_decay
                .powi(round.saturating_sub(1).min(i32::MAX as u64) as i32);
        c.seed = seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        c
    }
}

/// Settings of the built-in strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FedAvgConfig {
    /// Fraction of available clients selected per round (non-DP selection).
    pub fraction_fit: f64,
    /// At least this many selected (when available).
    pub min_fit_clients: usize,
    /// Aggregation rule.
    pub aggregator: AggregatorKind,
    /// Server optimizer.
    pub server_optimizer: ServerOptConfig,
    /// Fraction of clients asked for federated evaluation (0 = none).
    pub fraction_evaluate: f64,
    /// Federated evaluation every this many rounds.
    pub evaluate_every: u64,
    /// Seed mixed into the per-round training seeds.
    pub seed: u64,
}

impl Default for FedAvgConfig {
    fn default() -> Self {
        Self {
            fraction_fit: 1.0,
            min_fit_clients: 1,
            aggregator: AggregatorKind::Mean,
            server_optimizer: ServerOptConfig::default(),
            fraction_evaluate: 0.0,
            evaluate_every: 1,
            seed: 0,
        }
    }
}

/// The built-in strategy: fraction selection, FedAvg (or a robust rule), a server
/// optimizer. Weighted by example counts; DP wrappers change that.
pub struct FedAvg {
    cfg: FedAvgConfig,
    train: TrainSettings,
    optimizer: ServerOptimizer,
    acc: Option<Accumulator>,
    len: usize,
}

impl FedAvg {
    /// A strategy for models of `num_params` parameters.
    pub fn new(cfg: FedAvgConfig, train: TrainSettings, num_params: usize) -> Self {
        Self {
            optimizer: ServerOptimizer::new(cfg.server_optimizer),
            cfg,
            train,
            acc: None,
            len: num_params,
        }
    }

    fn select(
        &self,
        available: &[NodeId],
        fraction: f64,
        min: usize,
        rng: &mut dyn RngCore,
    ) -> Vec<NodeId> {
        let want = ((available.len() as f64 * fraction).ceil() as usize)
            .max(min)
            .min(available.len());
        let mut pick: Vec<NodeId> = available.choose_multiple(rng, want).cloned().collect();
        pick.sort();
        pick
    }

    fn accumulator(&mut self) -> &mut Accumulator {
        let (kind, len) = (self.cfg.aggregator, self.len);
        self.acc.get_or_insert_with(|| Accumulator::new(kind, len))
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> String {
        format!(
            "{:?}+{:?}",
            self.cfg.aggregator, self.cfg.server_optimizer.kind
        )
        .to_lowercase()
    }

    fn configure_fit(
        &mut self,
        round: u64,
        available: &[NodeId],
        rng: &mut dyn RngCore,
    ) -> FitPlan {
        self.acc = None;
        FitPlan {
            nodes: self.select(
                available,
                self.cfg.fraction_fit,
                self.cfg.min_fit_clients,
                rng,
            ),
            config: self.train.for_round(round, self.cfg.seed),
            privacy: ClientPrivacy::NONE,
        }
    }

    fn accumulate(&mut self, _round: u64, r: FitResult) -> Result<(), StrategyError> {
        let w = r.num_examples.max(1) as f64;
        self.accumulator().add(r.into_delta(), w)?;
        Ok(())
    }

    fn accumulate_sum(
        &mut self,
        _round: u64,
        sum: &[f64],
        count: usize,
    ) -> Result<(), StrategyError> {
        self.accumulator().add_sum(sum, count)?;
        Ok(())
    }

    fn aggregate_fit(
        &mut self,
        _round: u64,
        global: &[f32],
        _failures: &[Failure],
    ) -> Result<Option<Vec<f32>>, StrategyError> {
        let Some(acc) = self.acc.take() else {
            return Ok(None);
        };
        if acc.count() == 0 {
            return Ok(None);
        }
        let delta = acc.finish()?;
        Ok(Some(self.apply_delta(global, &delta)))
    }

    fn apply_delta(&mut self, global: &[f32], delta: &[f32]) -> Vec<f32> {
        let mut w = global.to_vec();
        self.optimizer.step(&mut w, delta);
        w
    }

    fn configure_evaluate(
        &mut self,
        round: u64,
        available: &[NodeId],
        rng: &mut dyn RngCore,
    ) -> Vec<NodeId> {
        if self.cfg.fraction_evaluate <= 0.0
            || !round.is_multiple_of(self.cfg.evaluate_every.max(1))
        {
            return Vec::new();
        }
        self.select(available, self.cfg.fraction_evaluate, 1, rng)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.optimizer).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), StrategyError> {
        if !state.is_null() {
            self.optimizer = serde_json::from_value(state.clone())
                .map_err(|e| StrategyError::Invalid(format!("optimizer state: {e}")))?;
        }
        Ok(())
    }
}

/// Privacy parameters shared by the DP wrappers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpParams {
    /// Mode.
    pub mode: DpMode,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Initial (or fixed) clipping bound C.
    pub clip_norm: f64,
    /// Poisson sampling rate q.
    pub sampling_rate: f64,
    /// delta of the reported (epsilon, delta).
    pub delta: f64,
    /// Stop before the round that would exceed this epsilon.
    pub target_epsilon: Option<f64>,
    /// Adaptive clipping (central mode only).
    pub adaptive_clipping: Option<AdaptiveClipping>,
    /// Central mode: virtual canary clients the server plants for the empirical privacy
    /// audit (each included with probability 1/2, then Poisson-sampled like any client;
    /// see `dpfl_common::dp::audit`). 0: no audit.
    pub audit_canaries: usize,
}

impl Default for DpParams {
    fn default() -> Self {
        Self {
            mode: DpMode::None,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sampling_rate: 1.0,
            delta: 1e-5,
            target_epsilon: None,
            adaptive_clipping: None,
            audit_canaries: 0,
        }
    }
}

/// Adaptive clipping (Andrew et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaptiveClipping {
    /// Target fraction of unclipped updates gamma.
    pub target_quantile: f64,
    /// Geometric learning rate eta_C.
    pub learning_rate: f64,
    /// s.d. of the noise on the unclipped count; default (expected participants) / 20.
    pub count_stddev: Option<f64>,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_stddev: None,
        }
    }
}

impl DpParams {
    /// Range checks for the DP settings.
    pub fn validate(&self) -> Result<(), String> {
        self.mode.ensure_supported().map_err(|e| e.to_string())?;
        if !self.mode.is_private() {
            return Ok(());
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(format!(
                "noise_multiplier must be > 0, got {}",
                self.noise_multiplier
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(format!("clip_norm must be > 0, got {}", self.clip_norm));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return Err(format!(
                "sampling_rate must be in (0, 1], got {}",
                self.sampling_rate
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!("delta must be in (0, 1), got {}", self.delta));
        }
        if let Some(t) = self.target_epsilon {
            if !(t.is_finite() && t > 0.0) {
                return Err(format!("target_epsilon must be > 0, got {t}"));
            }
        }
        if self.audit_canaries > 0 && self.mode != DpMode::Central {
            return Err(
                "dp.audit_canaries: the server plants canaries in central mode only (the \
                 simulator's [audit] covers local mode)"
                    .into(),
            );
        }
        if let Some(a) = self.adaptive_clipping {
            if self.mode != DpMode::Central {
                return Err("adaptive clipping is available in central mode only".into());
            }
            if !(0.0..=1.0).contains(&a.target_quantile) || a.learning_rate <= 0.0 {
                return Err(
                    "adaptive clipping needs target_quantile in [0, 1] and learning_rate > 0"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// Poisson sampling: each available client independently with probability `q`.
pub fn poisson_select(available: &[NodeId], q: f64, rng: &mut dyn RngCore) -> Vec<NodeId> {
    available
        .iter()
        .filter(|_| rng.gen_bool(q.clamp(0.0, 1.0)))
        .cloned()
        .collect()
}

/// `local` mode: clients clip and noise; the server weights every update equally.
pub struct LocalDp<S> {
    inner: S,
    dp: DpParams,
    last: Option<RoundPrivacy>,
    population: usize,
    participants: usize,
}

impl<S: Strategy> LocalDp<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, dp: DpParams) -> Self {
        Self {
            inner,
            dp,
            last: None,
            population: 0,
            participants: 0,
        }
    }
}

impl<S: Strategy> Strategy for LocalDp<S> {
    fn name(&self) -> String {
        format!("local-dp({})", self.inner.name())
    }

    fn configure_fit(
        &mut self,
        round: u64,
        available: &[NodeId],
        rng: &mut dyn RngCore,
    ) -> FitPlan {
        let mut plan = self.inner.configure_fit(round, available, rng);
        plan.nodes = poisson_select(available, self.dp.sampling_rate, rng);
        plan.privacy = ClientPrivacy {
            mode: DpMode::Local,
            clip_norm: self.dp.clip_norm,
            noise_multiplier: self.dp.noise_multiplier,
        };
        self.population = available.len();
        self.participants = 0;
        plan
    }

    fn accumulate(&mut self, round: u64, mut r: FitResult) -> Result<(), StrategyError> {
        // Equal weights: an example count would let one client's influence exceed C (and
        // clients do not send it in this mode).
        r.num_examples = 1;
        self.participants += 1;
        self.inner.accumulate(round, r)
    }

    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &[f32],
        failures: &[Failure],
    ) -> Result<Option<Vec<f32>>, StrategyError> {
        self.last = Some(RoundPrivacy {
            mode: DpMode::Local,
            sampling_rate: self.dp.sampling_rate,
            noise_multiplier: self.dp.noise_multiplier,
            clip_norm: self.dp.clip_norm,
            clipped_fraction: None,
            clipped_fraction_noised: None,
            population: self.population,
            released: self.participants > 0,
        });
        // Averaging noised updates is post-processing: the actual count is fine here.
        self.inner.aggregate_fit(round, global, failures)
    }

    fn apply_delta(&mut self, global: &[f32], delta: &[f32]) -> Vec<f32> {
        self.inner.apply_delta(global, delta)
    }

    /// Never: an evaluation answer (exact loss, accuracy and count on the node's data, for
    /// any model the untrusted server chooses) is an un-noised query of the data local DP
    /// protects from the server. Nodes refuse it too.
    fn configure_evaluate(
        &mut self,
        _round: u64,
        _available: &[NodeId],
        _rng: &mut dyn RngCore,
    ) -> Vec<NodeId> {
        Vec::new()
    }

    fn round_privacy(&self) -> Option<RoundPrivacy> {
        self.last
    }

    fn state(&self) -> serde_json::Value {
        self.inner.state()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), StrategyError> {
        self.inner.restore(state)
    }
}

/// `central` mode (DP-FedAvg, McMahan et al. 2018): clients clip, the server re-clips
/// defensively, sums with equal weights, adds `N(0, (zC)^2)` once, divides by the
/// **expected** number of participants `qN`, and hands the result to the inner strategy's
/// server optimizer. Optional adaptive clipping (Andrew et al. 2021).
pub struct CentralDp<S> {
    inner: S,
    dp: DpParams,
    noise: Box<dyn GaussianNoise>,
    clip: f64,
    sum: Option<Vec<f32>>,
    participants: usize,
    unclipped: usize,
    /// Participants that arrived only as part of a secure sum (no clipped bit).
    summed: usize,
    reclipped: Vec<NodeId>,
    population: usize,
    len: usize,
    last: Option<RoundPrivacy>,
    /// Secret seed of the audit's canaries (from the OS; checkpointed).
    canary_seed: Option<u64>,
    /// Canaries sampled for the open round.
    canaries_sampled: Vec<u64>,
}

/// Checkpointed state of [`CentralDp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CentralState {
    clip: f64,
    inner: serde_json::Value,
    #[serde(default)]
    canary_seed: Option<u64>,
}

impl<S: Strategy> CentralDp<S> {
    /// Wraps `inner`; `noise` must be a secure sampler outside simulations.
    pub fn new(inner: S, dp: DpParams, noise: Box<dyn GaussianNoise>, num_params: usize) -> Self {
        Self {
            inner,
            clip: dp.clip_norm,
            dp,
            noise,
            sum: None,
            participants: 0,
            unclipped: 0,
            summed: 0,
            reclipped: Vec::new(),
            population: 0,
            len: num_params,
            last: None,
            canary_seed: (dp.audit_canaries > 0).then(|| rand::rngs::OsRng.next_u64()),
            canaries_sampled: Vec::new(),
        }
    }

    /// Canaries included in the federation (each with probability 1/2).
    fn included_canaries(&self) -> Vec<u64> {
        match self.canary_seed {
            Some(seed) => (0..self.dp.audit_canaries as u64)
                .filter(|i| dpfl_common::dp::audit::canary_included(seed, *i))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Current clipping bound.
    pub fn clip_norm(&self) -> f64 {
        self.clip
    }

    /// Nodes whose update exceeded C this round and were re-clipped.
    pub fn reclipped(&self) -> &[NodeId] {
        &self.reclipped
    }

    /// (noise multiplier for the update sum, s.d. of the count noise) this round.
    ///
    /// The count query is the **centred** sum `sum_i (b_i - 1/2)` over the participants
    /// (`b_i` = 1 when client i's update was within C), as in TF-Privacy's quantile
    /// estimator: adding or removing one client moves it by exactly 1/2. Together with the
    /// update sum (sensitivity C, noise `z_delta C`) the pair is one Gaussian mechanism with
    /// multiplier `(z_delta^-2 + (2 sigma_b)^-2)^-1/2`; choosing
    /// `z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2` makes that exactly `z`, the multiplier the
    /// ledger records (Andrew et al. 2021, whose split assumes this sensitivity of 1/2).
    fn split_noise(&self, expected: f64) -> Result<(f64, Option<f64>), StrategyError> {
        let z = self.dp.noise_multiplier;
        match self.dp.adaptive_clipping {
            None => Ok((z, None)),
            Some(a) => {
                let sigma_b = a.count_stddev.unwrap_or(expected / 20.0).max(1e-9);
                let rest = z.powi(-2) - (2.0 * sigma_b).powi(-2);
                if rest <= 0.0 {
                    return Err(StrategyError::Invalid(format!(
                        "adaptive clipping: count noise s.d. {sigma_b} is too small for noise \
                         multiplier {z} (need 2*sigma_b > z)"
                    )));
                }
                Ok((rest.powf(-0.5), Some(sigma_b)))
            }
        }
    }
}

impl<S: Strategy> Strategy for CentralDp<S> {
    fn name(&self) -> String {
        if self.dp.mode == DpMode::Distributed {
            return format!("distributed-dp({})", self.inner.name());
        }
        format!("central-dp({})", self.inner.name())
    }

    fn configure_fit(
        &mut self,
        round: u64,
        available: &[NodeId],
        rng: &mut dyn RngCore,
    ) -> FitPlan {
        let mut plan = self.inner.configure_fit(round, available, rng);
        plan.nodes = poisson_select(available, self.dp.sampling_rate, rng);
        plan.privacy = ClientPrivacy {
            mode: self.dp.mode,
            clip_norm: self.clip,
            noise_multiplier: self.dp.noise_multiplier,
        };
        // Virtual canaries are sampled at the same rate as clients.
        let included = self.included_canaries();
        self.canaries_sampled = included
            .iter()
            .copied()
            .filter(|_| rng.gen_bool(self.dp.sampling_rate.clamp(0.0, 1.0)))
            .collect();
        // Canaries never change the production model's denominator: expected count
        // q * (real population), as without the audit.
        self.population = available.len();
        self.sum = Some(vec![0.0; self.len]);
        self.participants = 0;
        self.unclipped = 0;
        self.summed = 0;
        self.reclipped.clear();
        plan
    }

    fn accumulate(&mut self, _round: u64, mut r: FitResult) -> Result<(), StrategyError> {
        if self.dp.mode == DpMode::Distributed {
            return Err(StrategyError::Invalid(
                "distributed DP takes only securely aggregated, noised sums".into(),
            ));
        }
        let known = r.norm();
        let (norm, clipped) = match known {
            Some(n) => clip_with_norm(r.delta_mut(), n, self.clip),
            None => clip_in_place(r.delta_mut(), self.clip),
        };
        if clipped {
            // The client should have clipped: enforce the bound the accountant relies on.
            tracing::warn!(node = %r.node, norm, bound = self.clip, "update exceeded the clipping bound; re-clipped");
            self.reclipped.push(r.node.clone());
        }
        let sum = self.sum.get_or_insert_with(|| vec![0.0; r.delta().len()]);
        if sum.len() != r.delta().len() {
            return Err(AggregateError::Length {
                expected: sum.len(),
                got: r.delta().len(),
            }
            .into());
        }
        crate::aggregate::add_scaled(sum, r.delta(), 1.0);
        self.participants += 1;
        if r.clipped == Some(false) && !clipped {
            self.unclipped += 1;
        }
        Ok(())
    }

    /// The sum of `count` updates that each node clipped to the round's C before encoding
    /// (the fixed-point range enforces |coordinate| <= C, not the norm: an honest node's
    /// norm bound is its own clip, and a node that cheats can spoil the sum, see the
    /// threat model). No re-clipping and no clipped count are possible here.
    fn accumulate_sum(
        &mut self,
        _round: u64,
        sum: &[f64],
        count: usize,
    ) -> Result<(), StrategyError> {
        if self.dp.adaptive_clipping.is_some() {
            return Err(StrategyError::Invalid(
                "adaptive clipping needs each node's clipped bit; it cannot run with secure \
                 aggregation"
                    .into(),
            ));
        }
        let acc = self.sum.get_or_insert_with(|| vec![0.0; sum.len()]);
        if acc.len() != sum.len() {
            return Err(AggregateError::Length {
                expected: acc.len(),
                got: sum.len(),
            }
            .into());
        }
        for (a, b) in acc.iter_mut().zip(sum) {
            *a += *b as f32;
        }
        self.participants += count;
        self.summed += count;
        Ok(())
    }

    fn aggregate_fit(
        &mut self,
        _round: u64,
        global: &[f32],
        _failures: &[Failure],
    ) -> Result<Option<Vec<f32>>, StrategyError> {
        let expected = (self.dp.sampling_rate * self.population as f64).max(1.0);
        let (z_update, sigma_b) = self.split_noise(expected)?;
        let mut sum = self.sum.take().unwrap_or_else(|| vec![0.0; self.len]);
        // The sampled canaries' updates: their secret direction at the clipping norm.
        if let Some(seed) = self.canary_seed {
            let c = self.clip as f32;
            for i in std::mem::take(&mut self.canaries_sampled) {
                let u = dpfl_common::dp::audit::canary_direction(seed, i, self.len);
                crate::aggregate::add_scaled(&mut sum, &u, c);
            }
        }
        // Noise is released even when nobody answered: the mechanism (and the accountant)
        // covers every sampled round, and skipping it would reveal the empty sample.
        // Distributed mode: the noise is in the decoded sum already (each contributor's
        // integer share); the server adds none.
        if self.dp.mode != DpMode::Distributed {
            self.noise.add_calibrated(&mut sum, z_update, self.clip)?;
        }
        let inv = (1.0 / expected) as f32;
        sum.iter_mut().for_each(|v| *v *= inv);
        let clip_used = self.clip;
        let clipped_fraction = (self.participants > 0 && self.summed == 0)
            .then(|| 1.0 - self.unclipped as f64 / self.participants as f64);
        let mut clipped_fraction_noised = None;
        if let (Some(a), Some(sb)) = (self.dp.adaptive_clipping, sigma_b) {
            // Centred count: sensitivity 1/2 (see `split_noise`), noise s.d. sigma_b.
            let centred = self.unclipped as f64 - 0.5 * self.participants as f64;
            let mut count = [centred as f32];
            self.noise.add_calibrated(&mut count, 2.0 * sb, 0.5)?;
            let b = count[0] as f64 / expected + 0.5;
            clipped_fraction_noised = Some(1.0 - b);
            self.clip *= (-a.learning_rate * (b - a.target_quantile)).exp();
        }
        self.last = Some(RoundPrivacy {
            mode: self.dp.mode,
            sampling_rate: self.dp.sampling_rate,
            noise_multiplier: self.dp.noise_multiplier,
            clip_norm: clip_used,
            clipped_fraction,
            clipped_fraction_noised,
            population: self.population,
            released: true,
        });
        Ok(Some(self.inner.apply_delta(global, &sum)))
    }

    fn apply_delta(&mut self, global: &[f32], delta: &[f32]) -> Vec<f32> {
        self.inner.apply_delta(global, delta)
    }

    fn configure_evaluate(
        &mut self,
        round: u64,
        available: &[NodeId],
        rng: &mut dyn RngCore,
    ) -> Vec<NodeId> {
        // Distributed mode does not trust the server: nodes refuse federated evaluation
        // (exact metrics on their data), as in local mode; none is asked.
        if self.dp.mode == DpMode::Distributed {
            return Vec::new();
        }
        self.inner.configure_evaluate(round, available, rng)
    }

    fn aggregate_evaluate(
        &mut self,
        round: u64,
        results: &[(NodeId, EvalResult)],
    ) -> Option<EvalSummary> {
        self.inner.aggregate_evaluate(round, results)
    }

    fn round_privacy(&self) -> Option<RoundPrivacy> {
        self.last
    }

    fn audit(
        &self,
        initial: &[f32],
        final_model: &[f32],
        theoretical: Option<f64>,
    ) -> Option<dpfl_common::dp::audit::AuditReport> {
        let seed = self.canary_seed?;
        let change: Vec<f32> = final_model
            .iter()
            .zip(initial)
            .map(|(a, b)| a - b)
            .collect();
        use dpfl_common::dp::audit::{canary_direction, canary_included, cosine};
        let m = self.dp.audit_canaries as u64;
        let included: Vec<bool> = (0..m).map(|i| canary_included(seed, i)).collect();
        let (seen, unseen) = dpfl_common::dp::audit::split_by_inclusion(
            &included,
            (0..m).map(|i| cosine(&canary_direction(seed, i, self.len), &change)),
        );
        Some(dpfl_common::dp::audit::AuditReport::new(
            &seen,
            &unseen,
            None,
            self.dp.delta,
            theoretical,
        ))
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(CentralState {
            clip: self.clip,
            inner: self.inner.state(),
            canary_seed: self.canary_seed,
        })
        .unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), StrategyError> {
        if state.is_null() {
            return Ok(());
        }
        let s: CentralState = serde_json::from_value(state.clone())
            .map_err(|e| StrategyError::Invalid(format!("central dp state: {e}")))?;
        self.clip = s.clip;
        if s.canary_seed.is_some() {
            self.canary_seed = s.canary_seed;
        }
        self.inner.restore(&s.inner)
    }
}

/// Builds the configured strategy: [`FedAvg`], wrapped for the DP mode.
pub fn build(
    fedavg: FedAvgConfig,
    train: TrainSettings,
    dp: DpParams,
    num_params: usize,
    noise: Box<dyn GaussianNoise>,
) -> Result<Box<dyn Strategy>, String> {
    dp.validate()?;
    fedavg.aggregator.validate()?;
    fedavg.server_optimizer.validate()?;
    let base = FedAvg::new(fedavg.clone(), train, num_params);
    Ok(match dp.mode {
        DpMode::None => Box::new(base),
        DpMode::Local => Box::new(LocalDp::new(base, dp)),
        DpMode::Central => {
            if !fedavg.aggregator.is_streaming() {
                return Err(
                    "robust aggregators cannot be combined with central DP: the noise is \
                     calibrated to the sensitivity of a sum of clipped updates"
                        .into(),
                );
            }
            Box::new(CentralDp::new(base, dp, noise, num_params))
        }
        // Distributed: the central wrapper without server noise (the sum it is given was
        // decoded from the nodes' noised encodings), divided by the same expected count.
        DpMode::Distributed => {
            if !fedavg.aggregator.is_streaming() {
                return Err(
                    "robust aggregators cannot be combined with distributed DP: the server \
                     sees only the sum"
                        .into(),
                );
            }
            Box::new(CentralDp::new(base, dp, noise, num_params))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpfl_common::dp::{l2_norm, SimulationGaussian};
    use rand::SeedableRng;

    fn nodes(n: usize) -> Vec<NodeId> {
        (0..n).map(|i| format!("n{i:03}")).collect()
    }

    fn fit(node: &str, delta: Vec<f32>, n: u64) -> FitResult {
        FitResult {
            node: node.into(),
            delta,
            num_examples: n,
            norm: None,
            metrics: None,
            clipped: Some(false),
        }
    }

    #[test]
    fn fedavg_selects_fraction_and_weights_by_examples() {
        let mut s = FedAvg::new(
            FedAvgConfig {
                fraction_fit: 0.5,
                ..Default::default()
            },
            TrainSettings::default(),
            2,
        );
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let plan = s.configure_fit(1, &nodes(10), &mut rng);
        assert_eq!(plan.nodes.len(), 5);
        s.accumulate(1, fit("a", vec![1.0, 0.0], 300)).unwrap();
        s.accumulate(1, fit("b", vec![5.0, 4.0], 100)).unwrap();
        let w = s.aggregate_fit(1, &[10.0, 10.0], &[]).unwrap().unwrap();
        assert_eq!(w, vec![12.0, 11.0]);
        // Nothing accepted: keep the previous model.
        s.configure_fit(2, &nodes(10), &mut rng);
        assert!(s.aggregate_fit(2, &[0.0, 0.0], &[]).unwrap().is_none());
    }

    #[test]
    fn lr_decays_per_round_and_seeds_differ() {
        let t = TrainSettings {
            lr_decay: 0.5,
            ..Default::default()
        };
        assert_eq!(t.for_round(1, 0).lr, 0.05);
        assert_eq!(t.for_round(3, 0).lr, 0.0125);
        assert_ne!(t.for_round(1, 0).seed, t.for_round(2, 0).seed);
    }

    #[test]
    fn poisson_sampling_rate_is_respected() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let pop = nodes(1000);
        let total: usize = (0..50)
            .map(|_| poisson_select(&pop, 0.1, &mut rng).len())
            .sum();
        let mean = total as f64 / 50.0;
        assert!((mean - 100.0).abs() < 5.0, "{mean}");
    }

    fn central(z: f64, adaptive: Option<AdaptiveClipping>) -> CentralDp<FedAvg> {
        let dp = DpParams {
            mode: DpMode::Central,
            noise_multiplier: z,
            clip_norm: 1.0,
            sampling_rate: 0.5,
            adaptive_clipping: adaptive,
            ..Default::default()
        };
        CentralDp::new(
            FedAvg::new(FedAvgConfig::default(), TrainSettings::default(), 4),
            dp,
            Box::new(SimulationGaussian::seeded(9)),
            4,
        )
    }

    #[test]
    fn central_dp_uses_equal_weights_expected_count_and_reclips() {
        let mut s = central(1e-9, None); // (almost) no noise: check the arithmetic
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let plan = s.configure_fit(1, &nodes(8), &mut rng); // expected participants 4
        assert_eq!(plan.privacy.mode, DpMode::Central);
        s.accumulate(1, fit("a", vec![1.0, 0.0, 0.0, 0.0], 1000))
            .unwrap();
        s.accumulate(1, fit("evil", vec![0.0, 30.0, 40.0, 0.0], 1))
            .unwrap();
        assert_eq!(s.reclipped(), ["evil"]);
        let w = s.aggregate_fit(1, &[0.0; 4], &[]).unwrap().unwrap();
        // (1,0,0,0) + (0,0.6,0.8,0) over 4 expected participants, example counts ignored.
        let expect = [0.25, 0.15, 0.2, 0.0];
        for (a, b) in w.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{w:?}");
        }
        let p = s.round_privacy().unwrap();
        assert_eq!(p.population, 8);
        assert_eq!(p.clipped_fraction, Some(0.5));
    }

    /// The coordinator's path: updates carry the norm it measured. The re-clip with that
    /// norm gives the same model as measuring it again, and a delta changed after
    /// measurement (a wrapper scaling it up) is re-clipped by its own norm, never by the
    /// stale one.
    #[test]
    fn central_dp_reclips_by_the_measured_norm_and_a_changed_delta_by_its_own() {
        let run = |measure: bool, tamper: bool| {
            let mut s = central(1e-9, None);
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            s.configure_fit(1, &nodes(8), &mut rng);
            for (n, d) in [
                ("a", vec![1.0f32, 0.0, 0.0, 0.0]),
                ("evil", vec![0.0, 30.0, 40.0, 0.0]),
            ] {
                let norm = l2_norm(&d);
                let mut r = FitResult::new(n.into(), d, 1, None, None);
                if measure {
                    r = r.measured(norm);
                    assert_eq!(r.norm(), Some(norm));
                }
                if tamper {
                    // A wrapper multiplies the update after the coordinator measured it.
                    r.delta_mut().iter_mut().for_each(|v| *v *= 1000.0);
                    assert_eq!(r.norm(), None, "changing the delta forgets the norm");
                }
                s.accumulate(1, r).unwrap();
            }
            let reclipped = s.reclipped().to_vec();
            (
                s.aggregate_fit(1, &[0.0; 4], &[]).unwrap().unwrap(),
                reclipped,
            )
        };
        let (plain, r0) = run(false, false);
        let (measured, r1) = run(true, false);
        assert_eq!(measured, plain);
        assert_eq!(
            (r0, r1),
            (vec!["evil".to_string()], vec!["evil".to_string()])
        );
        // Tampered: both updates now exceed C = 1 and are clipped to it, by their own norms.
        let (tampered, r2) = run(true, true);
        assert_eq!(r2, ["a", "evil"]);
        let expect = [0.25, 0.15, 0.2, 0.0];
        for (a, b) in tampered.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{tampered:?}");
        }
    }

    #[test]
    fn central_noise_scale_is_z_c_over_expected_count() {
        let mut s = CentralDp::new(
            FedAvg::new(FedAvgConfig::default(), TrainSettings::default(), 20_000),
            DpParams {
                mode: DpMode::Central,
                noise_multiplier: 2.0,
                clip_norm: 0.5,
                sampling_rate: 0.1,
                ..Default::default()
            },
            Box::new(SimulationGaussian::seeded(4)),
            20_000,
        );
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        s.configure_fit(1, &nodes(100), &mut rng); // expected 10
        let w = s
            .aggregate_fit(1, &vec![0.0; 20_000], &[])
            .unwrap()
            .unwrap();
        let sd = l2_norm(&w) / (20_000f64).sqrt();
        // z*C/(qN) = 2*0.5/10 = 0.1
        assert!((sd / 0.1 - 1.0).abs() < 0.03, "{sd}");
    }

    #[test]
    fn adaptive_clipping_moves_c_towards_the_quantile() {
        let a = AdaptiveClipping {
            count_stddev: Some(1.0),
            ..Default::default()
        };
        let mut s = central(0.1, Some(a));
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        // All updates far above C: clipped fraction 1, C must grow.
        for round in 1..=5 {
            s.configure_fit(round, &nodes(8), &mut rng);
            for i in 0..4 {
                let mut r = fit(&format!("n{i}"), vec![10.0, 0.0, 0.0, 0.0], 1);
                r.clipped = Some(true);
                s.accumulate(round, r).unwrap();
            }
            s.aggregate_fit(round, &[0.0; 4], &[]).unwrap();
        }
        assert!(s.clip_norm() > 1.5, "{}", s.clip_norm());
        // The pair counts as one Gaussian mechanism with multiplier z.
        let (zu, sb) = s.split_noise(4.0).unwrap();
        let combined = (zu.powi(-2) + (2.0 * sb.unwrap()).powi(-2)).powf(-0.5);
        assert!((combined - 0.1).abs() < 1e-12);
        // Too little count noise for z is a clear error.
        let mut bad = central(
            1.0,
            Some(AdaptiveClipping {
                count_stddev: Some(0.1),
                ..Default::default()
            }),
        );
        bad.configure_fit(1, &nodes(8), &mut rng);
        assert!(bad.aggregate_fit(1, &[0.0; 4], &[]).is_err());
    }

    /// One mechanism call: (input, z, sensitivity).
    type Call = (Vec<f32>, f64, f64);

    /// Records every mechanism call and adds no noise.
    #[derive(Default)]
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<Call>>>);

    impl GaussianNoise for Recorder {
        fn add_noise(
            &mut self,
            _v: &mut [f32],
            _sigma: f64,
        ) -> Result<(), dpfl_common::dp::NoiseError> {
            Ok(())
        }
        fn add_calibrated(
            &mut self,
            v: &mut [f32],
            z: f64,
            sensitivity: f64,
        ) -> Result<(), dpfl_common::dp::NoiseError> {
            self.0.lock().unwrap().push((v.to_vec(), z, sensitivity));
            Ok(())
        }
        fn name(&self) -> &'static str {
            "recorder"
        }
    }

    #[test]
    fn adaptive_clipping_pair_is_one_gaussian_mechanism_with_the_recorded_multiplier() {
        // Audit: the raw 0/1 unclipped count (sensitivity 1) was noised with the split that
        // assumes sensitivity 1/2, so the true multiplier exceeded the recorded one.
        let z = 0.8;
        let sigma_b = 0.5; // 10 clients' default would be m/20 = 0.5
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut s = CentralDp::new(
            FedAvg::new(FedAvgConfig::default(), TrainSettings::default(), 4),
            DpParams {
                mode: DpMode::Central,
                noise_multiplier: z,
                clip_norm: 1.0,
                sampling_rate: 1.0,
                adaptive_clipping: Some(AdaptiveClipping {
                    count_stddev: Some(sigma_b),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Box::new(Recorder(calls.clone())),
            4,
        );
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        s.configure_fit(1, &nodes(4), &mut rng);
        for (i, clipped) in [false, false, false, true].into_iter().enumerate() {
            let mut r = fit(&format!("n{i}"), vec![0.1, 0.0, 0.0, 0.0], 1);
            r.clipped = Some(clipped);
            s.accumulate(1, r).unwrap();
        }
        s.aggregate_fit(1, &[0.0; 4], &[]).unwrap();
        let calls = calls.lock().unwrap();
        let update = calls
            .iter()
            .find(|c| c.0.len() == 4)
            .expect("update sum noised");
        let count = calls.iter().find(|c| c.0.len() == 1).expect("count noised");
        // Per-client contribution to each query, for b in {0, 1} (within C or not): the
        // update sum moves by at most C; the count query must be what was actually noised.
        let c = 1.0;
        let unclipped = 3.0;
        let participants = 4.0;
        let count_query = count.0[0] as f64;
        // Work out the per-client contribution the query uses from its value: a raw count
        // has 3, a centred one 3 - 4/2 = 1.
        let per_client: [f64; 2] = if (count_query - unclipped).abs() < 1e-6 {
            [0.0, 1.0] // raw bit
        } else {
            assert!((count_query - (unclipped - 0.5 * participants)).abs() < 1e-6);
            [-0.5, 0.5] // centred bit
        };
        let count_sensitivity = per_client.iter().fold(0f64, |m, v| m.max(v.abs()));
        // Noise actually added: s.d. = z_call * sensitivity_call for each call.
        let sigma_update = update.1 * update.2;
        let sigma_count = count.1 * count.2;
        let effective =
            ((c / sigma_update).powi(2) + (count_sensitivity / sigma_count).powi(2)).powf(-0.5);
        let recorded = s.round_privacy().unwrap().noise_multiplier;
        assert!(
            (effective - recorded).abs() < 1e-9,
            "effective multiplier {effective} != recorded {recorded}"
        );
        // The published clipped fraction is the noised estimate (here noise-free: 1/4).
        let p = s.round_privacy().unwrap();
        assert!((p.clipped_fraction_noised.unwrap() - 0.25).abs() < 1e-6);
    }

    #[test]
    fn local_dp_selects_by_poisson_and_ignores_example_counts() {
        let dp = DpParams {
            mode: DpMode::Local,
            sampling_rate: 0.3,
            ..Default::default()
        };
        let mut s = LocalDp::new(
            FedAvg::new(FedAvgConfig::default(), TrainSettings::default(), 1),
            dp,
        );
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let plan = s.configure_fit(1, &nodes(100), &mut rng);
        assert!(plan.nodes.len() > 15 && plan.nodes.len() < 45);
        assert_eq!(plan.privacy.mode, DpMode::Local);
        s.accumulate(1, fit("a", vec![1.0], 1000)).unwrap();
        s.accumulate(1, fit("b", vec![3.0], 1)).unwrap();
        let w = s.aggregate_fit(1, &[0.0], &[]).unwrap().unwrap();
        assert_eq!(w, vec![2.0]);
    }

    #[test]
    fn local_dp_never_asks_nodes_for_evaluation() {
        // Audit: in local mode nodes answered exact loss, accuracy and count on any model
        // the untrusted server sent, bypassing the noise.
        let dp = DpParams {
            mode: DpMode::Local,
            ..Default::default()
        };
        let inner = FedAvg::new(
            FedAvgConfig {
                fraction_evaluate: 1.0,
                ..Default::default()
            },
            TrainSettings::default(),
            1,
        );
        let mut s = LocalDp::new(inner, dp);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        assert!(s.configure_evaluate(1, &nodes(10), &mut rng).is_empty());
    }

    #[test]
    fn build_refuses_unsound_combinations() {
        let noise = || Box::new(SimulationGaussian::seeded(1)) as Box<dyn GaussianNoise>;
        let robust = FedAvgConfig {
            aggregator: AggregatorKind::Median,
            ..Default::default()
        };
        let central = DpParams {
            mode: DpMode::Central,
            ..Default::default()
        };
        assert!(build(robust, TrainSettings::default(), central, 3, noise()).is_err());
        let dist = DpParams {
            mode: DpMode::Distributed,
            ..Default::default()
        };
        let robust = FedAvgConfig {
            aggregator: AggregatorKind::Median,
            ..Default::default()
        };
        let err = build(robust, TrainSettings::default(), dist, 3, noise())
            .err()
            .unwrap();
        assert!(err.contains("distributed"), "{err}");
        let s = build(
            FedAvgConfig::default(),
            TrainSettings::default(),
            dist,
            3,
            noise(),
        )
        .unwrap();
        assert!(s.name().starts_with("distributed-dp"));
    }

    #[test]
    fn distributed_decoded_sum_has_the_accounted_noise_variance_through_the_strategy() {
        use dpfl_common::dp::distributed::{DistributedParams, Mechanism};
        use dpfl_common::dp::encoding::DistributedEncoder;
        // n nodes encode (rotation, conditional rounding, integer share), the modular sum
        // is decoded as the coordinator does (count 1), the distributed strategy adds no
        // noise and divides by the expected count q * population = n.
        let (n, dim) = (10usize, 4000usize);
        for mechanism in [Mechanism::Skellam, Mechanism::Ddgauss] {
            let params = DistributedParams {
                mechanism,
                bits: 20,
                clip_norm: 1.0,
                noise_multiplier: 1.0,
                min_contributors: n,
                max_contributors: n,
                dim,
                beta: (-0.5f64).exp(),
                headroom: 3.0,
            };
            let enc = DistributedEncoder::new(params, 42).unwrap();
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
            let mut acc = vec![0u64; params.padded_dim()];
            let mut truth = vec![0f64; dim];
            for _ in 0..n {
                let mut u: Vec<f32> = (0..dim).map(|_| rng.gen::<f32>() - 0.5).collect();
                clip_in_place(&mut u, 0.5);
                for (t, v) in truth.iter_mut().zip(&u) {
                    *t += *v as f64;
                }
                let x = enc.encode(&u, &mut rng).unwrap();
                enc.accumulate(&mut acc, &x).unwrap();
            }
            let sum: Vec<f64> = enc
                .decode_sum(&acc, 1)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let dp = DpParams {
                mode: DpMode::Distributed,
                noise_multiplier: 1.0,
                clip_norm: 1.0,
                sampling_rate: 1.0,
                ..Default::default()
            };
            let mut s = build(
                FedAvgConfig::default(),
                TrainSettings::default(),
                dp,
                dim,
                Box::new(SimulationGaussian::seeded(1)),
            )
            .unwrap();
            let mut srng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            let plan = s.configure_fit(1, &nodes(n), &mut srng);
            assert_eq!(plan.privacy.mode, DpMode::Distributed);
            s.accumulate_sum(1, &sum, n).unwrap();
            let global = vec![0f32; dim];
            let new = s.aggregate_fit(1, &global, &[]).unwrap().unwrap();
            // The released mean times n, minus the true sum: the summed noise shares.
            let err: Vec<f64> = new
                .iter()
                .zip(&truth)
                .map(|(w, t)| *w as f64 * n as f64 - t)
                .collect();
            let mean = err.iter().sum::<f64>() / dim as f64;
            let var = err.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (dim - 1) as f64;
            // Reference (independent of the encoder's arithmetic): n shares of variance
            // (z C)^2 / min_contributors each sum to (z C)^2 = 1 per coordinate (the
            // rotation is orthogonal); stochastic rounding adds at most n / (4 s^2),
            // about 3e-9 here. The sample variance of 4,000 values has a relative
            // standard deviation of 2.2 %: 0.88..1.12 is over 5 of them.
            assert!((var - 1.0).abs() < 0.12, "{mechanism}: variance {var}");
            assert!(
                mean.abs() < 5.0 / (dim as f64).sqrt(),
                "{mechanism}: mean {mean}"
            );
            // No central noise: the round reports the mode, not an added sigma.
            assert_eq!(s.round_privacy().unwrap().mode, DpMode::Distributed);
        }
    }
}
