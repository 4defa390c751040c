//! The statistics exchange before round 1 (federated standardisation over QUIC).
//!
//! A state machine like the coordinator: events in (`handle_*`), messages out
//! ([`StatsExchange::poll_message`]), no socket, no clock, no file. The service holds a
//! joining node here instead of handing it to the coordinator:
//!
//! 1. Before agreement every joining node is asked for its statistics
//!    ([`Header::StatsRequest`]); each answer is validated ([`validate_report`]) and summed.
//! 2. Once `min_contributors` nodes have answered, [`StatsExchange::agree`] (with DP on,
//!    after the server's noise in `central` mode) turns the sum into a [`Standardizer`].
//!    The service makes it durable (and, with DP on, the ledger row) **before**
//!    [`StatsExchange::publish`] sends it: every waiting node gets [`Header::Standardize`].
//! 3. A node that answers [`Header::Standardized`] is handed to the coordinator. Nodes that
//!    join later (or reconnect) get the agreed transform at once; their statistics are
//!    not asked for (the transform is fixed once it left the server).
//!
//! Sensitivity (DP on): the neighbouring relation of the ledger, add or remove one client
//! with all of its data. Each node sends its statistics clipped to the public bounds,
//! mapped to `[0, 1]` and divided by its row count, so one node's contribution has L2
//! norm at most `sqrt(3d + 1)` whatever its size (and the combined transform weighs every
//! node equally, like DP-FedAvg's updates). `central`: the server adds
//! `N(0, (z sqrt(3d+1))^2)` to the sum once (sensitivity `sqrt(3d+1)`, multiplier z,
//! q = 1); `local`: each node adds the same noise to its own contribution (against the
//! server the sensitivity is twice that, multiplier z/2, as for local-mode updates).
//!
//! **With secure aggregation** ([`ExchangeSettings::secure`]) no node's statistics reach
//! the server in the clear: once `min_contributors` nodes wait, every waiting node is asked
//! with a request that carries a [`StatsSecAgg`] (the fixed-point range: `sqrt(3d + 1)` for
//! normalised statistics, `R sqrt(3d + 1)` for the counts of at most `R` rows, `R` the
//! power of two at or above the largest example count the asked nodes declared at join);
//! each node keeps its statistics and answers [`Header::StatsHeld`]. The nodes that did,
//! before the answer deadline, are the participants of one SecAgg+ instance with its own
//! protocol round id (below every training round's, so ids never repeat and increase on
//! every node) and the five stages of a training round, each with its deadline
//! ([`StatsExchange::poll_stage`], answers to [`StatsExchange::handle_secagg_answer`]).
//! The server decodes only the survivors' sum; it becomes the total (with DP on,
//! `central` noise is then added by [`StatsExchange::agree`] exactly as in the clear
//! path). Too few holders start nothing: the exchange asks again when a node joins or
//! rejoins, or one answer timeout later. Too few survivors (or any protocol abort) end the
//! instance; the exchange asks again at once, up to `max_attempts` instances, then fails
//! ([`StatsExchange::failure`]). A `Stats` report is refused in this mode.
//!
//! **With distributed DP** ([`ExchangeSettings::distributed_params`]: secure aggregation
//! with distributed settings and a noise multiplier) the statistics are one more
//! distributed-DP release: the request's [`StatsSecAgg::distributed`] carries their public
//! parameters (the federation's mechanism and contributor bounds, `3d + classes` values,
//! clip `sqrt(3d + 1)`, the statistics' z, [`STATS_DISTRIBUTED_BITS`]) and a rotation seed
//! fresh per instance; each node checks them against its own policy, records the spend and
//! encodes with the training rounds' `DistributedEncoder`, adding its own integer noise
//! share. At most `max_contributors` waiting nodes are asked; the instance's threshold is
//! raised to `min_contributors` (`crate::coordinator::secagg_graph`), no sum of fewer
//! survivors is decoded, and [`StatsExchange::agree`] adds no server noise: the summed
//! shares of `min_contributors` nodes carry multiplier z at sensitivity `sqrt(3d + 1)`.
//! The service charges it as ledger round 0 in the distributed ledger
//! (`Ledger::record_distributed_statistics`).

use crate::coordinator::NodeInfo;
use crate::secure::{SecAggSend, SecAggSettings};
use crate::strategy::NodeId;
use dpfl_common::dp::distributed::DistributedParams;
use dpfl_common::dp::encoding::DistributedEncoder;
use dpfl_common::dp::GaussianNoise;
use dpfl_common::model::SpecHash;
use dpfl_common::wire::{
    DistributedRound, Header, StatsHeld, StatsReport, StatsRequest, StatsSecAgg,
};
use dpfl_ml::standardize::{Bounds, FeatureStats, StandardizeError, Standardizer};
use dpfl_secagg::messages::{FromNode, Stage};
use rand::{CryptoRng, RngCore};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// Ring width of the statistics' secure sum: the vector is short (3d + classes values), so
/// it takes the widest fixed-point ring (52 bits of precision after the headroom).
pub const STATS_BITS: u8 = 62;

/// Ring width of the statistics' sum under distributed DP (not `secagg.bits`, which is
/// sized for the model). The statistics vector is short, so the scale `s` fills the ring
/// with few coordinates: at 20 bits one share's variance stays at most `(2^19 / 3)^2 <
/// 2^35`, inside the exact Skellam sampler's range (and the discrete Gaussian's) whatever
/// z and the contributor bounds, while `1 / s` (about 1e-5 of a unit for a few features)
/// keeps the rounding far below the noise. The accounting uses these very parameters.
pub const STATS_DISTRIBUTED_BITS: u8 = 20;

/// Why a node's statistics were refused. A refused node is not counted and not asked
/// again; it still receives the agreed transform.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatsRejection {
    /// The report names another model.
    #[error("statistics for another model (spec hash differs)")]
    SpecHash,
    /// Not asked for (not joined, already counted, or the transform is already agreed).
    #[error("statistics not asked for: {0}")]
    Unexpected(String),
    /// Lengths that do not match the model.
    #[error("{what}: {got} values, expected {expected}")]
    Shape {
        /// Which vector.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// The form (bounded, normalised, noised) differs from the request's.
    #[error("statistics in another form than asked: {0}")]
    Form(String),
    /// A value that is not finite or out of its possible range.
    #[error("implausible statistics: {0}")]
    Implausible(String),
}

/// What the exchange needs to know.
#[derive(Debug, Clone)]
pub struct ExchangeSettings {
    /// The model's spec hash.
    pub spec_hash: SpecHash,
    /// Features (the model's inputs).
    pub dim: usize,
    /// Classes (the model's outputs).
    pub classes: usize,
    /// Public ranges (required with DP on).
    pub bounds: Option<Bounds>,
    /// With DP on: the statistics' noise multiplier z (`None`: exact statistics).
    pub noise_multiplier: Option<f64>,
    /// `local` mode: nodes add the noise themselves; otherwise the server adds it.
    pub local: bool,
    /// Answers needed before the transform is agreed.
    pub min_contributors: usize,
    /// Secure aggregation of the statistics (`None`: they travel in the clear).
    pub secure: Option<SecureStats>,
}

/// How the statistics are securely summed.
#[derive(Debug, Clone)]
pub struct SecureStats {
    /// Stage deadline, threat model, (k, t) override and the first protocol round id (the
    /// ring width is [`STATS_BITS`]).
    pub secagg: SecAggSettings,
    /// How long the asked nodes have to answer [`Header::StatsHeld`].
    pub answer_timeout: Duration,
    /// Instances tried before the exchange fails.
    pub max_attempts: u32,
}

impl ExchangeSettings {
    /// The request every node is sent.
    pub fn request(&self) -> StatsRequest {
        let (lo, hi) = self
            .bounds
            .as_ref()
            .map_or((Vec::new(), Vec::new()), |b| (b.lo.clone(), b.hi.clone()));
        StatsRequest {
            spec_hash: self.spec_hash,
            lo,
            hi,
            local_noise_multiplier: self.noise_multiplier.filter(|_| self.local),
            central_noise_multiplier: self.server_noise(),
            normalized: self.noise_multiplier.is_some(),
            secure_aggregation: None,
        }
    }

    /// The noise multiplier the server adds to the sum (`central` mode only: `local` nodes
    /// add theirs, `distributed` nodes their integer shares).
    pub fn server_noise(&self) -> Option<f64> {
        self.noise_multiplier
            .filter(|_| !self.local && self.distributed_params().is_none())
    }

    /// DP mode `distributed` (secure aggregation with distributed settings and a noise
    /// multiplier): the statistics release's public parameters: the training rounds'
    /// mechanism and contributor bounds, with the statistics' vector (`3d + classes`
    /// values), clip `sqrt(3d + 1)` (one node's normalised statistics), multiplier and
    /// ring ([`STATS_DISTRIBUTED_BITS`]).
    pub fn distributed_params(&self) -> Option<DistributedParams> {
        let sec = self.secure.as_ref()?;
        let d = sec.secagg.distributed?;
        let z = self.noise_multiplier?;
        Some(d.params(
            STATS_DISTRIBUTED_BITS,
            ((3 * self.dim + 1) as f64).sqrt(),
            z,
            self.vector_len(),
        ))
    }

    /// Values in one node's statistics vector (`count | sum | sum_sq | label_counts`).
    pub fn vector_len(&self) -> usize {
        3 * self.dim + self.classes
    }

    /// The fixed-point range of the secure sum: the L2 bound of one node's statistics.
    /// Normalised (DP on): `sqrt(3d + 1)`. Exact counts of at most `max_rows` rows: every
    /// count, unit sum and unit sum of squares is at most the rows, and the label counts
    /// sum to at most them, so `R sqrt(3d + 1)` with `R` the power of two at or above
    /// `max_rows` (coarsened so that nodes learn little of the others' sizes).
    pub fn secure_range(&self, max_rows: u64) -> f64 {
        let unit = ((3 * self.dim + 1) as f64).sqrt();
        if self.noise_multiplier.is_some() {
            unit
        } else {
            // Declared counts are the nodes' word: capped (a node with more rows than the
            // cap finds its statistics out of range and refuses to hold them), so the
            // power of two neither overflows nor leaves too little fixed-point precision
            // for exact counts (2^32 x sqrt(3d + 1) x 100 contributors stays far inside
            // the 2^52 scale).
            max_rows.clamp(1, MAX_SECURE_ROWS).next_power_of_two() as f64 * unit
        }
    }
}

/// Most rows one node may declare for exact secure-summed statistics (the range's cap).
pub const MAX_SECURE_ROWS: u64 = 1 << 32;

/// Checks a node's report against the request and what the node declared at join
/// (`num_examples`), and returns its statistics. Exact statistics must be possible for
/// `num_examples` rows: counts and label counts in `[0, rows]` (label counts summing to
/// at most `rows`), sums of squares non-negative and, for bounded unit values, sums in
/// `[0, count]` and sums of squares in `[0, sum]`; normalised ones the same with rows =
/// 1. Noised statistics can be anything finite; the noise is what bounds them.
pub fn validate_report(
    r: &StatsReport,
    s: &ExchangeSettings,
    num_examples: u64,
) -> Result<FeatureStats, StatsRejection> {
    if r.spec_hash != s.spec_hash {
        return Err(StatsRejection::SpecHash);
    }
    for (what, v, expected) in [
        ("count", &r.count, s.dim),
        ("sum", &r.sum, s.dim),
        ("sum_sq", &r.sum_sq, s.dim),
        ("label_counts", &r.label_counts, s.classes),
    ] {
        if v.len() != expected {
            return Err(StatsRejection::Shape {
                what,
                expected,
                got: v.len(),
            });
        }
    }
    let want = s.request();
    let bounded = s.bounds.is_some();
    if r.bounded != bounded
        || r.normalized != want.normalized
        || r.noised != want.local_noise_multiplier.is_some()
    {
        return Err(StatsRejection::Form(format!(
            "asked bounded={bounded} normalized={} noised={}, got bounded={} normalized={} \
             noised={}",
            want.normalized,
            want.local_noise_multiplier.is_some(),
            r.bounded,
            r.normalized,
            r.noised
        )));
    }
    let all = || {
        r.count
            .iter()
            .chain(&r.sum)
            .chain(&r.sum_sq)
            .chain(&r.label_counts)
    };
    if all().any(|v| !v.is_finite()) {
        return Err(StatsRejection::Implausible("a value is not finite".into()));
    }
    if !r.noised {
        let rows = if r.normalized {
            1.0
        } else {
            num_examples as f64
        };
        // Normalised values are quotients: allow their rounding.
        let slack = |x: f64| x * (1.0 + 1e-9) + 1e-9;
        let in_rows = |v: f64| (0.0..=slack(rows)).contains(&v);
        if let Some((j, c)) = r.count.iter().enumerate().find(|(_, c)| !in_rows(**c)) {
            return Err(StatsRejection::Implausible(format!(
                "feature {j}: count {c} outside [0, {rows}] (the node declared {num_examples} \
                 examples)"
            )));
        }
        if r.label_counts.iter().any(|c| !in_rows(*c))
            || r.label_counts.iter().sum::<f64>() > slack(rows)
        {
            return Err(StatsRejection::Implausible(format!(
                "label counts {:?} do not fit {rows} rows",
                r.label_counts
            )));
        }
        for j in 0..s.dim {
            let (c, sum, sq) = (r.count[j], r.sum[j], r.sum_sq[j]);
            let ok = if bounded {
                (0.0..=slack(c)).contains(&sum) && (0.0..=slack(sum)).contains(&sq)
            } else {
                // Cauchy-Schwarz: sum^2 <= count * sum of squares.
                sq >= 0.0 && sum * sum <= slack(c * sq) + 1e-6 * sum.abs().max(1.0)
            };
            if !ok {
                return Err(StatsRejection::Implausible(format!(
                    "feature {j}: count {c}, sum {sum}, sum of squares {sq} are not the \
                     statistics of any data{}",
                    if bounded { " in [0, 1]" } else { "" }
                )));
            }
        }
    }
    FeatureStats::from_report(r).map_err(|e| StatsRejection::Implausible(e.to_string()))
}

/// The exchange's state (see the module docs).
#[derive(Debug)]
pub struct StatsExchange {
    settings: ExchangeSettings,
    /// Joined, waiting for the agreed transform (asked for statistics unless counted).
    waiting: BTreeMap<NodeId, NodeInfo>,
    /// Sent the transform, waiting for its acknowledgement.
    applying: BTreeMap<NodeId, NodeInfo>,
    /// Whose statistics are in `total`.
    contributors: BTreeSet<NodeId>,
    /// Asked and not refused or answered (not asked again on a reconnect while pending).
    asked: BTreeSet<NodeId>,
    total: FeatureStats,
    agreed: Option<Standardizer>,
    outbox: VecDeque<(NodeId, Header)>,
    /// With secure aggregation: the instance in progress and its history.
    secure: Option<SecureState>,
}

/// One stage of the statistics' SecAgg+ instance to send (round
/// [`dpfl_common::wire::STATS_ROUND`]).
#[derive(Debug, Clone)]
pub struct StageBatch {
    /// The stage the messages open.
    pub stage: Stage,
    /// Most bytes of stage message an answer may have.
    pub answer_limit: usize,
    /// Per node.
    pub messages: Vec<SecAggSend>,
}

#[derive(Debug)]
enum SecurePhase {
    /// No instance: one starts once enough nodes wait.
    Idle,
    /// Asked for held statistics; waiting for `StatsHeld` answers.
    Asking {
        asked: BTreeSet<NodeId>,
        held: BTreeSet<NodeId>,
        spec: StatsSecAgg,
        deadline: Instant,
    },
    /// The SecAgg+ stages.
    Running {
        server: Box<dpfl_secagg::Server>,
        spec: StatsSecAgg,
        deadline: Instant,
    },
    /// The sum is decoded (or the exchange gave up).
    Over,
}

#[derive(Debug)]
struct SecureState {
    cfg: SecureStats,
    phase: SecurePhase,
    attempts: u32,
    next_id: u64,
    stages: VecDeque<StageBatch>,
    failure: Option<String>,
    /// A node joined (or rejoined) since the last request, or an instance aborted: worth
    /// asking again. Too few holders leave it unset, so a node that keeps refusing is not
    /// asked in a loop; the exchange then asks again when another node joins or at
    /// `retry_at` (one answer timeout later), whichever comes first.
    ask_again: bool,
    retry_at: Option<Instant>,
    /// Nodes that left an aborted instance unanswered: the next instance goes without
    /// them when enough others hold, so one node that keeps dropping out cannot use up
    /// the attempts while the others could agree.
    dropped: BTreeSet<NodeId>,
    /// The nodes that left the first unanswered stage of the running instance.
    first_silent: BTreeSet<NodeId>,
}

impl StatsExchange {
    /// A fresh exchange.
    pub fn new(settings: ExchangeSettings) -> Self {
        let total = FeatureStats::zeros(settings.dim, settings.classes, settings.bounds.is_some());
        let secure = settings.secure.clone().map(|cfg| SecureState {
            next_id: cfg.secagg.round_id_base,
            cfg,
            phase: SecurePhase::Idle,
            attempts: 0,
            stages: VecDeque::new(),
            failure: None,
            ask_again: true,
            retry_at: None,
            dropped: BTreeSet::new(),
            first_silent: BTreeSet::new(),
        });
        Self {
            settings,
            waiting: BTreeMap::new(),
            applying: BTreeMap::new(),
            contributors: BTreeSet::new(),
            asked: BTreeSet::new(),
            secure,
            total,
            agreed: None,
            outbox: VecDeque::new(),
        }
    }

    /// An exchange whose transform was agreed before (a resumed run): nodes get it at once.
    pub fn resumed(settings: ExchangeSettings, agreed: Standardizer) -> Self {
        let mut s = Self::new(settings);
        s.agreed = Some(agreed);
        s
    }

    /// The agreed transform, once there is one.
    pub fn agreed(&self) -> Option<&Standardizer> {
        self.agreed.as_ref()
    }

    /// The settings.
    pub fn settings(&self) -> &ExchangeSettings {
        &self.settings
    }

    /// Nodes whose statistics are counted.
    pub fn contributors(&self) -> &BTreeSet<NodeId> {
        &self.contributors
    }

    /// Nodes joined and not yet handed to the coordinator.
    pub fn pending(&self) -> impl Iterator<Item = &NodeId> {
        self.waiting.keys().chain(self.applying.keys())
    }

    /// The next message to send: (node, header; all without payload, round
    /// [`dpfl_common::wire::STATS_ROUND`]).
    pub fn poll_message(&mut self) -> Option<(NodeId, Header)> {
        self.outbox.pop_front()
    }

    fn send_transform(&mut self, node: NodeId, info: NodeInfo) {
        if let Some(a) = &self.agreed {
            let spec = a.to_spec(self.settings.spec_hash);
            self.outbox
                .push_back((node.clone(), Header::Standardize(spec)));
            self.applying.insert(node, info);
        }
    }

    /// A node joined (or reconnected).
    pub fn handle_join(&mut self, node: NodeId, info: NodeInfo) {
        self.applying.remove(&node);
        if self.agreed.is_some() {
            self.waiting.remove(&node);
            self.send_transform(node, info);
            return;
        }
        // With secure aggregation nodes are asked together, when an instance starts
        // ([`StatsExchange::advance`]).
        if let Some(sec) = &mut self.secure {
            sec.ask_again = true;
        }
        if !self.contributors.contains(&node) && self.secure.is_none() {
            self.asked.insert(node.clone());
            self.outbox
                .push_back((node.clone(), Header::StatsRequest(self.settings.request())));
        }
        self.waiting.insert(node, info);
    }

    /// A node left: it is no longer waited for (statistics it sent stay counted; in a
    /// secure instance it is a dropout).
    pub fn handle_disconnect(&mut self, node: &str) {
        self.waiting.remove(node);
        self.applying.remove(node);
        self.asked.remove(node);
        self.drop_from_instance(node);
    }

    /// A node could not (or would not) answer the request for statistics (or a stage of
    /// their secure sum): it is not counted, and waits for the agreed transform like a
    /// late joiner.
    pub fn handle_failed(&mut self, node: &str) {
        self.asked.remove(node);
        self.drop_from_instance(node);
    }

    fn drop_from_instance(&mut self, node: &str) {
        let Some(sec) = &mut self.secure else { return };
        match &mut sec.phase {
            SecurePhase::Asking { asked, held, .. } => {
                asked.remove(node);
                held.remove(node);
            }
            SecurePhase::Running { server, .. } => {
                // Not a participant (or already gone): nothing to do.
                let _ = server.handle_dropout(node);
            }
            SecurePhase::Idle | SecurePhase::Over => {}
        }
    }

    /// A node's statistics (refused with secure aggregation: they arrive only masked).
    pub fn handle_stats(&mut self, node: &str, r: &StatsReport) -> Result<(), StatsRejection> {
        if self.secure.is_some() {
            return Err(StatsRejection::Unexpected(
                "secure aggregation is on: statistics are accepted only masked, inside their \
                 secure sum"
                    .into(),
            ));
        }
        if self.agreed.is_some() {
            return Err(StatsRejection::Unexpected(
                "the transform is already agreed".into(),
            ));
        }
        let Some(info) = self.waiting.get(node) else {
            return Err(StatsRejection::Unexpected("node is not joining".into()));
        };
        if !self.asked.contains(node) || self.contributors.contains(node) {
            return Err(StatsRejection::Unexpected(
                "not asked, or already counted".into(),
            ));
        }
        let st = validate_report(r, &self.settings, info.num_examples)?;
        self.total
            .merge(&st)
            .map_err(|e| StatsRejection::Implausible(e.to_string()))?;
        self.asked.remove(node);
        self.contributors.insert(node.to_string());
        Ok(())
    }

    /// A node holds its statistics for the secure sum (its answer to a secure request).
    pub fn handle_stats_held(&mut self, node: &str, h: &StatsHeld) -> Result<(), StatsRejection> {
        if h.spec_hash != self.settings.spec_hash {
            return Err(StatsRejection::SpecHash);
        }
        let Some(sec) = &mut self.secure else {
            return Err(StatsRejection::Unexpected(
                "held statistics without secure aggregation".into(),
            ));
        };
        match &mut sec.phase {
            SecurePhase::Asking { asked, held, .. } if asked.contains(node) => {
                if held.insert(node.to_string()) {
                    Ok(())
                } else {
                    Err(StatsRejection::Unexpected("already answered".into()))
                }
            }
            _ => Err(StatsRejection::Unexpected(
                "not asked for held statistics now".into(),
            )),
        }
    }

    /// A node's answer to a stage of the statistics' SecAgg+ instance. A refused message
    /// drops the sender from the instance (as a dropout); it never aborts it by itself.
    pub fn handle_secagg_answer(
        &mut self,
        node: &str,
        msg: FromNode,
    ) -> Result<(), StatsRejection> {
        let Some(SecurePhase::Running { server, .. }) = self.secure.as_mut().map(|s| &mut s.phase)
        else {
            return Err(StatsRejection::Unexpected(
                "no secure sum of statistics is open".into(),
            ));
        };
        if msg.round() != server.context().round {
            return Err(StatsRejection::Unexpected(format!(
                "stage answer of protocol round {}, the open one is {}",
                msg.round(),
                server.context().round
            )));
        }
        server.handle_message(node, msg).map_err(|e| {
            let _ = server.handle_dropout(node);
            StatsRejection::Form(format!("secure aggregation: {e}"))
        })
    }

    /// Most bytes of stage message an answer of the open stage may have (0: none open).
    pub fn answer_limit(&self) -> usize {
        match self.secure.as_ref().map(|s| &s.phase) {
            Some(SecurePhase::Running { server, .. }) => {
                crate::secure::answer_limit(server.context())
            }
            _ => 0,
        }
    }

    /// The next secure-aggregation stage to send.
    pub fn poll_stage(&mut self) -> Option<StageBatch> {
        self.secure.as_mut()?.stages.pop_front()
    }

    /// When [`StatsExchange::advance`] must run next (a deadline of the secure sum, or
    /// when to ask again after too few nodes held their statistics).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let sec = self.secure.as_ref().filter(|_| self.agreed.is_none())?;
        match &sec.phase {
            SecurePhase::Asking { deadline, .. } | SecurePhase::Running { deadline, .. } => {
                Some(*deadline)
            }
            SecurePhase::Idle => sec.retry_at.filter(|_| sec.failure.is_none()),
            SecurePhase::Over => None,
        }
    }

    /// Why the secure sum of the statistics failed for good (every attempt aborted).
    pub fn failure(&self) -> Option<&str> {
        self.secure.as_ref()?.failure.as_deref()
    }

    /// Instances started or tried so far (secure aggregation).
    pub fn attempts(&self) -> u32 {
        self.secure.as_ref().map_or(0, |s| s.attempts)
    }

    /// Drives the secure sum (no-op without secure aggregation): asks the waiting nodes
    /// once enough wait, starts the SecAgg+ instance once every asked node answered (or
    /// the answer deadline passed), and closes a stage once complete or past its deadline.
    /// `rng` draws the graph seed (the OS CSPRNG in deployments).
    pub fn advance<R: CryptoRng + RngCore + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        if self.agreed.is_some() {
            return;
        }
        // Each step may enable the next (a stage that closes at once, an attempt that
        // aborts and can be asked again): a few passes, bounded.
        for _ in 0..8 {
            if !self.step(now, rng) {
                break;
            }
        }
    }

    /// Holders (and survivors) an instance needs: `min_contributors`, at least 3, and with
    /// distributed DP at least the shares the noise is accounted over.
    fn needed(&self) -> usize {
        let m = self
            .settings
            .distributed_params()
            .map_or(0, |p| p.min_contributors);
        self.settings.min_contributors.max(3).max(m)
    }

    fn step<R: CryptoRng + RngCore + ?Sized>(&mut self, now: Instant, rng: &mut R) -> bool {
        let min = self.needed();
        let Some(sec) = &mut self.secure else {
            return false;
        };
        if sec.failure.is_some() {
            return false;
        }
        match &mut sec.phase {
            SecurePhase::Over => false,
            SecurePhase::Idle => {
                let due = sec.ask_again || sec.retry_at.is_some_and(|t| now >= t);
                if self.waiting.len() < min || !due {
                    return false;
                }
                (sec.ask_again, sec.retry_at) = (false, None);
                // Nodes that dropped out of an aborted instance sit out this one when
                // enough others hold; distributed DP: at most `max_contributors` (the
                // modular headroom); the others get the agreed transform like late joiners.
                let all: BTreeSet<NodeId> = self.waiting.keys().cloned().collect();
                let steady: BTreeSet<NodeId> = all.difference(&sec.dropped).cloned().collect();
                let pool = if steady.len() >= min { steady } else { all };
                let cap = self
                    .settings
                    .distributed_params()
                    .map_or(usize::MAX, |p| p.max_contributors);
                let asked: BTreeSet<NodeId> = pool.into_iter().take(cap).collect();
                let max_rows = self
                    .waiting
                    .iter()
                    .filter(|(n, _)| asked.contains(*n))
                    .map(|(_, i)| i.num_examples)
                    .max()
                    .unwrap_or(1);
                let clip = self.settings.secure_range(max_rows);
                let spec = match self.settings.distributed_params() {
                    // The rotation seed is public and fresh per instance (OS CSPRNG).
                    Some(params) => StatsSecAgg {
                        clip_norm: params.clip_norm,
                        bits: params.bits as u8,
                        distributed: Some(DistributedRound {
                            params,
                            rotation_seed: rng.next_u64(),
                        }),
                    },
                    None => StatsSecAgg {
                        clip_norm: clip,
                        bits: STATS_BITS,
                        distributed: None,
                    },
                };
                let mut req = self.settings.request();
                req.secure_aggregation = Some(spec);
                tracing::info!(
                    nodes = asked.len(),
                    range = spec.clip_norm,
                    distributed = spec.distributed.is_some(),
                    "asking for feature statistics to sum securely"
                );
                for n in &asked {
                    self.outbox
                        .push_back((n.clone(), Header::StatsRequest(req.clone())));
                }
                sec.phase = SecurePhase::Asking {
                    asked,
                    held: BTreeSet::new(),
                    spec,
                    deadline: now + sec.cfg.answer_timeout,
                };
                true
            }
            SecurePhase::Asking {
                asked,
                held,
                spec,
                deadline,
            } => {
                if held.len() < asked.len() && now < *deadline {
                    return false;
                }
                if held.len() < min {
                    // Not an attempt: no instance started. Ask again once another node
                    // joins (or one rejoins), or at `retry_at`.
                    tracing::warn!(
                        held = held.len(),
                        needed = min,
                        "too few nodes hold their feature statistics for the secure sum; \
                         asking again when another node joins or after the answer timeout"
                    );
                    sec.retry_at = Some(now + sec.cfg.answer_timeout);
                    sec.phase = SecurePhase::Idle;
                    return true;
                }
                let (held, spec) = (std::mem::take(held), *spec);
                self.start_instance(held, spec, now, rng);
                true
            }
            SecurePhase::Running {
                server, deadline, ..
            } => {
                if !server.is_stage_complete() && now < *deadline {
                    return false;
                }
                self.close_stage(now);
                true
            }
        }
    }

    /// An instance could not start or aborted: ask again later, or give up.
    fn abort(&mut self, why: String) {
        let Some(sec) = &mut self.secure else { return };
        sec.attempts += 1;
        tracing::warn!(
            attempt = sec.attempts,
            of = sec.cfg.max_attempts,
            "secure sum of the feature statistics aborted: {why}"
        );
        sec.phase = SecurePhase::Idle;
        sec.ask_again = true;
        sec.stages.clear();
        if sec.attempts >= sec.cfg.max_attempts {
            sec.failure = Some(format!(
                "the secure sum of the feature statistics failed {} times; last: {why}",
                sec.attempts
            ));
            sec.phase = SecurePhase::Over;
        }
    }

    fn start_instance<R: CryptoRng + RngCore + ?Sized>(
        &mut self,
        held: BTreeSet<NodeId>,
        spec: StatsSecAgg,
        now: Instant,
        rng: &mut R,
    ) {
        let min = self.needed();
        // Distributed DP encodes the rotated vector, padded to a power of two.
        let vector_len = match &spec.distributed {
            Some(d) => d.params.padded_dim(),
            None => self.settings.vector_len(),
        };
        let Some(sec) = &mut self.secure else { return };
        let id = sec.next_id;
        sec.next_id += 1;
        sec.first_silent.clear();
        let settings = sec.cfg.secagg.clone();
        let n = held.len();
        let started = (|| {
            if n < min {
                return Err(format!(
                    "{n} nodes hold their statistics; the exchange needs at least {min}"
                ));
            }
            // With distributed DP the threshold is raised to `min_contributors` and at
            // most `max_contributors` are summed, as in a training round.
            let distributed = spec.distributed.map(|d| d.params);
            let params = crate::coordinator::secagg_graph(&settings, distributed.as_ref(), n)?;
            let encoding = spec.encoding_digest();
            let ctx = dpfl_secagg::RoundContext::new(
                id,
                held.into_iter().collect(),
                params,
                spec.bits,
                u32::try_from(vector_len).map_err(|_| "statistics vector too long".to_string())?,
                rng,
            )
            .map_err(|e| e.to_string())?
            .with_encoding(encoding);
            dpfl_secagg::Server::new(ctx).map_err(|e| e.to_string())
        })();
        let server = match started {
            Ok(s) => s,
            Err(why) => return self.abort(why),
        };
        let ctx = server.context().clone();
        let messages = crate::secure::setup_messages(&server);
        tracing::info!(
            id,
            n,
            degree = ctx.degree,
            threshold = ctx.threshold,
            "secure sum of the feature statistics started"
        );
        let Some(sec) = &mut self.secure else { return };
        sec.stages.push_back(StageBatch {
            stage: Stage::AdvertiseKeys,
            answer_limit: crate::secure::answer_limit(&ctx),
            messages,
        });
        sec.phase = SecurePhase::Running {
            server: Box::new(server),
            spec,
            deadline: now + settings.stage_timeout,
        };
    }

    fn close_stage(&mut self, now: Instant) {
        let min = self.needed();
        let Some(sec) = &mut self.secure else { return };
        let SecurePhase::Running {
            server,
            spec,
            deadline,
        } = &mut sec.phase
        else {
            return;
        };
        let spec = *spec;
        let n = server.context().len();
        // The first stage any node left unanswered names who dropped out (kept out of
        // the next instance if this one aborts); nodes whose own protocol gave up later
        // because those neighbours were gone are not blamed.
        if sec.first_silent.is_empty() {
            sec.first_silent = server.pending().into_iter().collect();
        }
        let outcome = match server.close_stage() {
            Ok(dpfl_secagg::Transition::Send(_))
                if matches!(
                    server.stage(),
                    dpfl_secagg::Stage::Consistency | dpfl_secagg::Stage::Unmasking
                ) && server.masked_inputs() < min =>
            {
                // Never unmask a sum of fewer than `min_contributors` statistics: the next
                // instance may hold one node more, and statistics do not change between
                // instances, so the difference of two unmasked sums would be that node's
                // own. Stopping before the survivors are shown means no node reveals a
                // share of this instance.
                Err(format!(
                    "{} masked inputs arrived, fewer than the {min} the exchange needs; \
                     nothing of this instance is unmasked",
                    server.masked_inputs()
                ))
            }
            Ok(dpfl_secagg::Transition::Send(msgs)) => {
                let stage = server.stage();
                sec.stages.push_back(StageBatch {
                    stage,
                    answer_limit: crate::secure::answer_limit(server.context()),
                    messages: crate::secure::stage_messages(msgs),
                });
                *deadline = now + sec.cfg.secagg.stage_timeout;
                return;
            }
            Ok(dpfl_secagg::Transition::Done(agg)) => Ok(agg),
            Err(e) => Err(e.to_string()),
        };
        match outcome.and_then(|agg| self.decode_sum(&agg, spec, n)) {
            Ok(()) => {
                if let Some(sec) = &mut self.secure {
                    sec.phase = SecurePhase::Over;
                }
            }
            Err(why) => {
                if let Some(sec) = &mut self.secure {
                    sec.dropped = std::mem::take(&mut sec.first_silent);
                }
                self.abort(why)
            }
        }
    }

    /// The unmasked sum of the survivors becomes the total. Exact counts (DP off) are
    /// integers: rounded (the fixed-point error is far below 1/2), and the unit sums are
    /// projected onto what bounded data allows (post-processing of rounding only). With
    /// distributed DP the sum carries the shares' noise and is decoded only if it holds at
    /// least the `min_contributors` shares the noise is accounted over.
    fn decode_sum(
        &mut self,
        agg: &dpfl_secagg::Aggregate,
        spec: StatsSecAgg,
        participants: u32,
    ) -> Result<(), String> {
        let needed = self
            .settings
            .min_contributors
            .max(spec.distributed.map_or(0, |d| d.params.min_contributors));
        if agg.survivors.len() < needed {
            return Err(format!(
                "{} survivors, fewer than the {needed} contributors the exchange needs",
                agg.survivors.len(),
            ));
        }
        let v: Vec<f64> = match &spec.distributed {
            // The noisy sum itself (count 1: no division), rotated back.
            Some(d) => DistributedEncoder::new(d.params, d.rotation_seed)
                .and_then(|enc| enc.decode_sum(&agg.sum, 1))
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(f64::from)
                .collect(),
            None => dpfl_secagg::FixedPoint::new(spec.clip_norm, STATS_BITS, participants)
                .and_then(|fp| fp.decode_sum(&agg.sum))
                .map_err(|e| e.to_string())?,
        };
        let (d, k) = (self.settings.dim, self.settings.classes);
        let mut st = FeatureStats::from_vector(&v, d, k, true).map_err(|e| e.to_string())?;
        if self.settings.noise_multiplier.is_none() {
            for c in st.count.iter_mut().chain(st.label_counts.iter_mut()) {
                *c = c.round().max(0.0);
            }
            for j in 0..d {
                st.sum[j] = st.sum[j].clamp(0.0, st.count[j]);
                st.sum_sq[j] = st.sum_sq[j].clamp(0.0, st.sum[j]);
            }
        }
        self.total = st;
        self.contributors = agg.survivors.iter().cloned().collect();
        tracing::info!(
            survivors = agg.survivors.len(),
            of = participants,
            "secure sum of the feature statistics unmasked"
        );
        Ok(())
    }

    /// Whether enough statistics are in and no transform is agreed yet.
    pub fn ready(&self) -> bool {
        self.agreed.is_none() && self.contributors.len() >= self.settings.min_contributors
    }

    /// Agrees the transform from the statistics so far (adding the server's noise with DP
    /// on in `central` mode). Does not send it: make it durable first, then [`publish`].
    ///
    /// [`publish`]: StatsExchange::publish
    pub fn agree(
        &mut self,
        noise: &mut dyn GaussianNoise,
    ) -> Result<&Standardizer, StandardizeError> {
        let mut total = self.total.clone();
        if let Some(z) = self.settings.server_noise() {
            total.release(z, noise)?;
        }
        let s = Standardizer::from_stats(&total, self.settings.bounds.as_ref())?;
        Ok(self.agreed.insert(s))
    }

    /// Sends the agreed transform to every waiting node.
    pub fn publish(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        for (n, info) in waiting {
            self.send_transform(n, info);
        }
        self.asked.clear();
    }

    /// A node applied the transform over `features` features: hand it to the coordinator
    /// (returned with what it declared at join). `Err`: not expected, or the wrong size.
    pub fn handle_standardized(
        &mut self,
        node: &str,
        features: u32,
    ) -> Result<(NodeId, NodeInfo), StatsRejection> {
        if features as usize != self.settings.dim {
            self.applying.remove(node);
            return Err(StatsRejection::Shape {
                what: "standardized features",
                expected: self.settings.dim,
                got: features as usize,
            });
        }
        match self.applying.remove_entry(node) {
            Some(x) => Ok(x),
            None => Err(StatsRejection::Unexpected(
                "acknowledged a transform it was not sent".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpfl_ml::Dataset;

    fn settings(dim: usize, classes: usize, min: usize) -> ExchangeSettings {
        ExchangeSettings {
            spec_hash: [7; 32],
            dim,
            classes,
            bounds: None,
            noise_multiplier: None,
            local: false,
            min_contributors: min,
            secure: None,
        }
    }

    fn info(n: u64) -> NodeInfo {
        NodeInfo {
            num_examples: n,
            num_eval_examples: 0,
        }
    }

    fn drain(x: &mut StatsExchange) -> Vec<(NodeId, Header)> {
        std::iter::from_fn(|| x.poll_message()).collect()
    }

    struct NoNoise;
    impl GaussianNoise for NoNoise {
        fn add_noise(&mut self, _: &mut [f32], _: f64) -> Result<(), dpfl_common::dp::NoiseError> {
            Ok(())
        }
        fn name(&self) -> &'static str {
            "none"
        }
    }

    /// Three differently scaled, label-skewed tables; the agreed transform equals the
    /// pooled mean and standard deviation (two-pass, f64) to float precision.
    #[test]
    fn exchange_agrees_the_pooled_statistics_and_serves_late_joiners() {
        let part = |n: usize, scale: f32, shift: f32, label: i64| {
            let f: Vec<f32> = (0..n * 2)
                .map(|i| shift + scale * ((i * 37 % 101) as f32))
                .collect();
            Dataset::new(f, vec![label; n], 2).unwrap()
        };
        let parts = [
            part(30, 1.0, 0.0, 0),
            part(70, 100.0, 5.0, 1),
            part(50, 0.01, -3.0, 1),
        ];
        let mut x = StatsExchange::new(settings(2, 2, 3));
        for (i, p) in parts.iter().enumerate() {
            x.handle_join(format!("n{i}"), info(p.len() as u64));
        }
        let asked = drain(&mut x);
        assert_eq!(asked.len(), 3);
        assert!(asked.iter().all(
            |(_, h)| matches!(h, Header::StatsRequest(r) if r.lo.is_empty() && !r.normalized)
        ));
        for (i, p) in parts.iter().enumerate() {
            assert!(!x.ready());
            let r = FeatureStats::of(p, 2).to_report([7; 32], false, false);
            x.handle_stats(&format!("n{i}"), &r).unwrap();
        }
        assert!(x.ready());
        let s = x.agree(&mut NoNoise).unwrap().clone();
        // Pooled reference: two passes over all rows in f64.
        let rows: Vec<&[f32]> = parts
            .iter()
            .flat_map(|p| p.features.chunks(2).collect::<Vec<_>>())
            .collect();
        for j in 0..2 {
            let n = rows.len() as f64;
            let m = rows.iter().map(|r| r[j] as f64).sum::<f64>() / n;
            let v = rows.iter().map(|r| (r[j] as f64 - m).powi(2)).sum::<f64>() / n;
            assert!((s.mean[j] - m).abs() <= 1e-9 * m.abs().max(1.0), "{j}");
            assert!((s.std[j] - v.sqrt()).abs() <= 1e-7 * v.sqrt(), "{j}");
        }
        assert!(drain(&mut x).is_empty(), "nothing leaves before publish");
        x.publish();
        let sent = drain(&mut x);
        assert_eq!(sent.len(), 3);
        assert!(sent
            .iter()
            .all(|(_, h)| matches!(h, Header::Standardize(t) if t.mean == s.mean)));
        // A late joiner gets the agreed transform and is not asked for statistics.
        x.handle_join("late".into(), info(5));
        let late = drain(&mut x);
        assert!(matches!(&late[..], [(n, Header::Standardize(_))] if n == "late"));
        let r = FeatureStats::of(&parts[0], 2).to_report([7; 32], false, false);
        assert!(matches!(
            x.handle_stats("late", &r),
            Err(StatsRejection::Unexpected(_))
        ));
        // Acknowledged nodes go to the coordinator with what they declared.
        assert_eq!(
            x.handle_standardized("late", 2).unwrap(),
            ("late".into(), info(5))
        );
        assert!(x.handle_standardized("late", 2).is_err(), "only once");
        assert!(x.handle_standardized("n0", 3).is_err(), "wrong size");
    }

    #[test]
    fn reports_are_validated_against_the_request_and_the_declared_size() {
        let s = settings(2, 2, 1);
        let d = Dataset::new(vec![1.0, 2.0, 3.0, 4.0], vec![0, 1], 2).unwrap();
        let good = FeatureStats::of(&d, 2).to_report([7; 32], false, false);
        assert!(validate_report(&good, &s, 2).is_ok());
        let bad = |f: &dyn Fn(&mut StatsReport), rows: u64| {
            let mut r = good.clone();
            f(&mut r);
            validate_report(&r, &s, rows).unwrap_err()
        };
        assert_eq!(bad(&|r| r.spec_hash = [0; 32], 2), StatsRejection::SpecHash);
        assert!(matches!(
            bad(&|r| r.sum.push(1.0), 2),
            StatsRejection::Shape { what: "sum", .. }
        ));
        assert!(matches!(
            bad(&|r| r.label_counts.pop().map(|_| ()).unwrap_or(()), 2),
            StatsRejection::Shape { .. }
        ));
        assert!(matches!(
            bad(&|r| r.sum[0] = f64::NAN, 2),
            StatsRejection::Implausible(_)
        ));
        assert!(matches!(
            bad(&|r| r.sum_sq[1] = f64::INFINITY, 2),
            StatsRejection::Implausible(_)
        ));
        // More rows than the node declared at join.
        assert!(matches!(bad(&|_| (), 1), StatsRejection::Implausible(_)));
        assert!(matches!(
            bad(&|r| r.count[0] = -1.0, 2),
            StatsRejection::Implausible(_)
        ));
        // A sum too large for its sum of squares.
        assert!(matches!(
            bad(&|r| r.sum[0] = 100.0, 2),
            StatsRejection::Implausible(_)
        ));
        assert!(matches!(
            bad(&|r| r.noised = true, 2),
            StatsRejection::Form(_)
        ));
        assert!(matches!(
            bad(&|r| r.bounded = true, 2),
            StatsRejection::Form(_)
        ));
        // Bounded unit values: sum <= count, sum of squares <= sum.
        let b = Bounds::parse("0:10", 2).unwrap();
        let sb = ExchangeSettings {
            bounds: Some(b.clone()),
            ..settings(2, 2, 1)
        };
        let ok = FeatureStats::of_bounded(&d, 2, &b)
            .unwrap()
            .to_report([7; 32], false, false);
        assert!(validate_report(&ok, &sb, 2).is_ok());
        let mut r = ok.clone();
        r.sum[1] = 3.0;
        assert!(validate_report(&r, &sb, 2).is_err());
        // Noised statistics: only finiteness (the noise bounds them).
        let sl = ExchangeSettings {
            bounds: Some(b),
            noise_multiplier: Some(1.0),
            local: true,
            ..settings(2, 2, 1)
        };
        let mut r = ok;
        (r.normalized, r.noised) = (true, true);
        r.sum[0] = -7.5;
        assert!(validate_report(&r, &sl, 2).is_ok());
    }

    /// The largest statistics and transform the configuration allows fit a header.
    #[test]
    fn the_largest_allowed_messages_fit_a_header() {
        use crate::config::MAX_STANDARDIZE_FEATURES as D;
        use dpfl_common::wire::{decode, encode, StandardizeSpec, MAX_HEADER_BYTES, PREFIX_BYTES};
        let v = |n: usize| vec![-1.234_567_890_123e300; n];
        let stats = Header::Stats(StatsReport {
            spec_hash: [1; 32],
            count: v(D),
            sum: v(D),
            sum_sq: v(D),
            label_counts: v(D),
            bounded: true,
            normalized: true,
            noised: true,
        });
        let spec = Header::Standardize(StandardizeSpec {
            spec_hash: [1; 32],
            mean: v(D),
            std: v(D),
            lo: v(D),
            hi: v(D),
        });
        let req = Header::StatsRequest(StatsRequest {
            spec_hash: [1; 32],
            lo: v(D),
            hi: v(D),
            local_noise_multiplier: Some(1.0),
            central_noise_multiplier: None,
            normalized: true,
            // The largest form: distributed DP's public parameters included.
            secure_aggregation: Some(StatsSecAgg {
                clip_norm: 1e300,
                bits: STATS_BITS,
                distributed: Some(DistributedRound {
                    params: dpfl_common::dp::distributed::DistributedParams {
                        mechanism: dpfl_common::dp::distributed::Mechanism::Ddgauss,
                        bits: 40,
                        clip_norm: f64::MAX,
                        noise_multiplier: f64::MAX,
                        min_contributors: usize::MAX,
                        max_contributors: usize::MAX,
                        dim: usize::MAX,
                        beta: f64::MAX,
                        headroom: f64::MAX,
                    },
                    rotation_seed: u64::MAX,
                }),
            }),
        });
        for h in [stats, spec, req] {
            let bytes = encode(&h, &[]);
            assert!(
                bytes.len() <= PREFIX_BYTES + MAX_HEADER_BYTES,
                "{}",
                bytes.len()
            );
            assert_eq!(decode(&bytes, 1 << 20).unwrap().header, h);
        }
    }

    mod secure {
        use super::*;
        use dpfl_secagg::messages::ToNode;
        use dpfl_secagg::params::{AdversaryClass, ThreatModel};
        use dpfl_secagg::{Client, ClientConfig, EcdsaP256Signer, EcdsaP256Verifier, FixedPoint};
        use rand::{Rng, SeedableRng};

        const STAGE: Duration = Duration::from_secs(5);
        const ASK: Duration = Duration::from_secs(20);

        fn settings(min: usize, attempts: u32) -> ExchangeSettings {
            ExchangeSettings {
                bounds: Some(Bounds::parse("0:100|-1:1", 2).unwrap()),
                secure: Some(SecureStats {
                    secagg: SecAggSettings {
                        stage_timeout: STAGE,
                        bits: 32,
                        clip_norm: 1.0,
                        threat: ThreatModel {
                            adversarial_rate: 0.05,
                            dropout_rate: 0.05,
                            adversary: AdversaryClass::CuriousServer,
                        },
                        params: None,
                        round_id_base: 500,
                        distributed: None,
                    },
                    answer_timeout: ASK,
                    max_attempts: attempts,
                }),
                ..super::settings(2, 2, min)
            }
        }

        /// `s` with a fixed graph instead of the finder's choice.
        fn with_graph(mut s: ExchangeSettings, degree: u32, threshold: u32) -> ExchangeSettings {
            if let Some(sec) = &mut s.secure {
                sec.secagg.params = Some(dpfl_secagg::GraphParams { degree, threshold });
            }
            s
        }

        /// Node i of `tables` joins as `n{i}`, declaring its rows.
        fn join_all(x: &mut StatsExchange, tables: &[Dataset]) {
            for (i, t) in tables.iter().enumerate() {
                x.handle_join(format!("n{i}"), info(t.len() as u64));
            }
        }

        /// Node i's table: `rows` rows of two features in (and partly out of) the bounds.
        fn table(i: usize, rows: usize) -> Dataset {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(i as u64);
            let mut f = Vec::new();
            let mut l = Vec::new();
            for _ in 0..rows {
                f.push(rng.gen_range(-10.0f32..110.0) * (i + 1) as f32 / 3.0);
                f.push(rng.gen_range(-0.5f32..0.9));
                l.push(rng.gen_range(0..2));
            }
            Dataset::new(f, l, 2).unwrap()
        }

        /// Real protocol clients standing in for the nodes, holding their statistics.
        struct Nodes {
            clients: BTreeMap<NodeId, Client<EcdsaP256Signer, EcdsaP256Verifier>>,
            stats: BTreeMap<NodeId, Vec<f64>>,
            spec: Option<StatsSecAgg>,
            participants: u32,
            ids: Vec<u64>,
            rng: rand_chacha::ChaCha20Rng,
        }

        impl Nodes {
            fn new(tables: &[Dataset]) -> Self {
                Self::with(tables, STATS_BITS, false)
            }

            /// `normalized`: statistics divided by the node's rows (DP on).
            fn with(tables: &[Dataset], bits: u8, normalized: bool) -> Self {
                let names: Vec<NodeId> = (0..tables.len()).map(|i| format!("n{i}")).collect();
                let signers: Vec<EcdsaP256Signer> = names
                    .iter()
                    .map(|_| EcdsaP256Signer::generate().unwrap().0)
                    .collect();
                let mut verifier = EcdsaP256Verifier::new();
                for (name, s) in names.iter().zip(&signers) {
                    verifier.insert_public_key(name, s.public_key()).unwrap();
                }
                let config = ClientConfig {
                    vector_len: 3 * 2 + 2,
                    bits,
                    threat_model: None,
                };
                let b = Bounds::parse("0:100|-1:1", 2).unwrap();
                Self {
                    stats: names
                        .iter()
                        .zip(tables)
                        .map(|(n, t)| {
                            let mut st = FeatureStats::of_bounded(t, 2, &b).unwrap();
                            if normalized {
                                st.normalize(t.len());
                            }
                            (n.clone(), st.to_vector())
                        })
                        .collect(),
                    clients: names
                        .iter()
                        .cloned()
                        .zip(signers)
                        .map(|(n, s)| (n.clone(), Client::new(n, config, s, verifier.clone())))
                        .collect(),
                    spec: None,
                    participants: 0,
                    ids: Vec::new(),
                    rng: rand_chacha::ChaCha20Rng::seed_from_u64(3),
                }
            }

            /// Answers the requests for held statistics of the nodes `answering` allows.
            fn hold(&mut self, x: &mut StatsExchange, answering: &dyn Fn(&str) -> bool) {
                for (n, h) in drain(x) {
                    let Header::StatsRequest(r) = h else {
                        panic!("not a request: {h:?}")
                    };
                    let spec = r.secure_aggregation.expect("a secure request");
                    assert!(r.central_noise_multiplier.is_none());
                    assert_eq!(r.normalized, spec.distributed.is_some());
                    self.spec = Some(spec);
                    if answering(&n) {
                        x.handle_stats_held(&n, &StatsHeld { spec_hash: [7; 32] })
                            .unwrap();
                    }
                }
            }

            /// A node's answer; `None` when its protocol client refuses (e.g. too few
            /// neighbours left): it then stays silent, as a real node that fails would.
            fn answer(&mut self, node: &str, msg: &ToNode) -> Option<FromNode> {
                let c = self.clients.get_mut(node).unwrap();
                Some(match msg {
                    ToNode::Setup(s) => {
                        self.participants = s.context.len();
                        self.ids.push(s.context.round);
                        FromNode::Keys(c.handle_setup(s, &mut self.rng).ok()?)
                    }
                    ToNode::NeighbourKeys(m) => {
                        FromNode::Shares(c.handle_neighbour_keys(m, &mut self.rng).ok()?)
                    }
                    ToNode::Shares(m) => {
                        let spec = self.spec.unwrap();
                        let x = match spec.distributed {
                            Some(d) => {
                                let v: Vec<f32> =
                                    self.stats[node].iter().map(|x| *x as f32).collect();
                                DistributedEncoder::new(d.params, d.rotation_seed)
                                    .unwrap()
                                    .encode(&v, &mut self.rng)
                                    .unwrap()
                            }
                            None => FixedPoint::new(spec.clip_norm, spec.bits, self.participants)
                                .unwrap()
                                .encode_f64(&self.stats[node], &mut self.rng)
                                .unwrap(),
                        };
                        FromNode::MaskedInput(c.handle_shares(m, &x).ok()?)
                    }
                    ToNode::Survivors(m) => FromNode::Signature(c.handle_survivors(m).ok()?),
                    ToNode::Unmask(m) => FromNode::Unmask(c.handle_unmask(m).ok()?),
                })
            }

            /// Runs the stages; nodes for which `silent(stage, node)` holds never answer
            /// that stage (the exchange waits for its deadline). Returns the time after.
            fn run_stages(
                &mut self,
                x: &mut StatsExchange,
                mut t: Instant,
                silent: &dyn Fn(Stage, &str) -> bool,
            ) -> Instant {
                while let Some(b) = x.poll_stage() {
                    assert!(b.answer_limit > 0);
                    let mut quiet = false;
                    for m in &b.messages {
                        if silent(b.stage, &m.node) {
                            quiet = true;
                            continue;
                        }
                        match self.answer(&m.node, &m.message) {
                            Some(ans) => x.handle_secagg_answer(&m.node, ans).unwrap(),
                            None => quiet = true,
                        }
                    }
                    if quiet {
                        // The stage stays open until its deadline, not a moment less.
                        let deadline = x.poll_timeout().unwrap();
                        x.advance(deadline - Duration::from_millis(1), &mut self.rng.clone());
                        assert!(x.poll_stage().is_none(), "nothing before the deadline");
                        t = deadline;
                    }
                    x.advance(t, &mut self.rng.clone());
                }
                t
            }
        }

        /// Four nodes hold their statistics; one drops out before its masked input. The
        /// server learns the sum of the three survivors only, and it gives the transform
        /// the clear exchange of the same three gives (to fixed-point precision); a
        /// report in the clear is refused and not counted.
        #[test]
        fn secure_exchange_agrees_the_survivors_pooled_statistics() {
            let tables: Vec<Dataset> = (0..4).map(|i| table(i, 40 + 30 * i)).collect();
            let mut nodes = Nodes::new(&tables);
            // The complete graph, threshold 2: one dropout leaves every node two neighbours.
            let mut x = StatsExchange::new(with_graph(settings(3, 2), 3, 2));
            let t0 = Instant::now();
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            join_all(&mut x, &tables);
            assert!(drain(&mut x).is_empty(), "nobody is asked one by one");
            x.advance(t0, &mut rng);
            // A clear report is refused, whoever sends it.
            let clear =
                FeatureStats::of_bounded(&tables[0], 2, x.settings().bounds.as_ref().unwrap())
                    .unwrap()
                    .to_report([7; 32], false, false);
            assert!(matches!(
                x.handle_stats("n0", &clear),
                Err(StatsRejection::Unexpected(_))
            ));
            nodes.hold(&mut x, &|_| true);
            // The range: 256 rows (the power of two at or above the 130 declared) x sqrt(3d + 1).
            assert_eq!(nodes.spec.unwrap().clip_norm, 256.0 * 7f64.sqrt());
            assert_eq!(nodes.spec.unwrap().bits, STATS_BITS);
            // Not asked (a late joiner), or asked twice: not counted.
            x.handle_join("late".into(), info(10));
            assert!(x
                .handle_stats_held("late", &StatsHeld { spec_hash: [7; 32] })
                .is_err());
            assert!(x
                .handle_stats_held("n0", &StatsHeld { spec_hash: [7; 32] })
                .is_err());
            x.advance(t0, &mut rng);
            // An answer of another protocol round is refused and drops nobody (n0 survives).
            let stale = FromNode::MaskedInput(dpfl_secagg::MaskedInput {
                round: 499,
                data: vec![1; 8],
            });
            assert!(matches!(
                x.handle_secagg_answer("n0", stale),
                Err(StatsRejection::Unexpected(_))
            ));
            let dropped = "n2";
            nodes.run_stages(&mut x, t0, &|stage, n| {
                n == dropped && stage != Stage::AdvertiseKeys && stage != Stage::ShareKeys
            });
            assert_eq!(nodes.ids, vec![500; 4], "the first reserved id");
            assert!(x.ready(), "{:?} {:?}", x.attempts(), x.failure());
            let survivors: Vec<&str> = vec!["n0", "n1", "n3"];
            assert_eq!(
                x.contributors()
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
                survivors
            );
            let got = x.agree(&mut NoNoise).unwrap().clone();
            // Reference: the clear exchange of the same three nodes.
            let mut clear = StatsExchange::new(ExchangeSettings {
                secure: None,
                ..settings(3, 2)
            });
            for n in &survivors {
                let i: usize = n[1..].parse().unwrap();
                clear.handle_join(n.to_string(), info(tables[i].len() as u64));
            }
            for (n, _) in drain(&mut clear) {
                let i: usize = n[1..].parse().unwrap();
                let r = FeatureStats::of_bounded(
                    &tables[i],
                    2,
                    clear.settings().bounds.as_ref().unwrap(),
                )
                .unwrap()
                .to_report([7; 32], false, false);
                clear.handle_stats(&n, &r).unwrap();
            }
            let want = clear.agree(&mut NoNoise).unwrap().clone();
            for j in 0..2 {
                assert!(
                    (got.mean[j] - want.mean[j]).abs() <= 1e-9,
                    "{got:?} vs {want:?}"
                );
                assert!(
                    (got.std[j] - want.std[j]).abs() <= 1e-9,
                    "{got:?} vs {want:?}"
                );
            }
            // Everyone waiting (the dropout and the late joiner too) gets the transform.
            x.publish();
            assert_eq!(drain(&mut x).len(), 5);
        }

        /// Too few holders: no instance and no attempt used; the exchange asks again when
        /// another (or a returning) node joins or one answer timeout later, never in a
        /// loop. Too few survivors: the instance
        /// aborts within its deadlines, the exchange asks again at once with a fresh
        /// protocol round id, and after its last attempt it fails with a reason instead of
        /// waiting for ever.
        #[test]
        fn too_few_holders_wait_and_too_few_survivors_abort_until_the_exchange_gives_up() {
            let tables: Vec<Dataset> = (0..3).map(|i| table(i, 20)).collect();
            let mut nodes = Nodes::new(&tables);
            let mut x = StatsExchange::new(settings(3, 2));
            let t0 = Instant::now();
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            join_all(&mut x, &tables);
            x.advance(t0, &mut rng);
            // n1 never answers; at the answer deadline two hold, too few: nothing starts.
            nodes.hold(&mut x, &|n| n != "n1");
            let deadline = x.poll_timeout().unwrap();
            assert_eq!(deadline, t0 + ASK);
            x.advance(deadline - Duration::from_millis(1), &mut rng);
            assert!(drain(&mut x).is_empty() && x.poll_stage().is_none());
            x.advance(deadline, &mut rng);
            let retry = x.poll_timeout().expect("asks again later");
            assert_eq!(retry, deadline + ASK);
            x.advance(retry - Duration::from_millis(1), &mut rng);
            assert!(drain(&mut x).is_empty(), "not asked again before then");
            assert_eq!((x.attempts(), x.failure()), (0, None));
            // After the answer timeout everyone is asked again; n1 still does not answer.
            x.advance(retry, &mut rng);
            nodes.hold(&mut x, &|n| n != "n1");
            x.advance(retry + ASK, &mut rng);
            assert_eq!(x.attempts(), 0, "no instance started");
            // n1 comes back (rejoins): asked at once; everyone holds; n1 drops before its
            // masked input twice, and the two survivors are fewer than the three required.
            x.handle_join("n1".into(), info(20));
            let mut t = retry + ASK;
            for attempt in 1..=2 {
                x.advance(t, &mut rng);
                nodes.hold(&mut x, &|_| true);
                x.advance(t, &mut rng);
                t = nodes.run_stages(&mut x, t, &|stage, n| {
                    n == "n1" && stage != Stage::AdvertiseKeys && stage != Stage::ShareKeys
                });
                assert_eq!(x.attempts(), attempt);
                assert!(!x.ready());
            }
            let ids: BTreeSet<u64> = nodes.ids.iter().copied().collect();
            assert_eq!(ids, BTreeSet::from([500, 501]), "a fresh id per instance");
            let why = x.failure().expect("gave up").to_string();
            assert!(why.contains("failed 2 times"), "{why}");
            assert!(x.poll_timeout().is_none() && x.agreed().is_none());
            x.advance(t + STAGE * 10, &mut rng);
            assert!(drain(&mut x).is_empty(), "nothing more is asked");
        }

        /// The attack the survivor check exists for: min_clients = 4, four holders, a
        /// threshold of 2 (so the protocol alone would unmask three survivors' sum), one
        /// node drops before its masked input. Without the check the server would unmask
        /// the three's sum, ask again, unmask all four's and subtract: the dropped node's
        /// exact statistics. The instance aborts before the survivors are even shown, so
        /// no node is asked to reveal a share; the next instance with all four agrees.
        #[test]
        fn a_sum_of_fewer_than_min_clients_survivors_is_never_unmasked() {
            let tables: Vec<Dataset> = (0..4).map(|i| table(i, 30 + 10 * i)).collect();
            let mut nodes = Nodes::new(&tables);
            let mut x = StatsExchange::new(with_graph(settings(4, 3), 3, 2));
            let t0 = Instant::now();
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
            join_all(&mut x, &tables);
            x.advance(t0, &mut rng);
            nodes.hold(&mut x, &|_| true);
            x.advance(t0, &mut rng);
            let stages = std::cell::RefCell::new(Vec::new());
            let t = nodes.run_stages(&mut x, t0, &|stage, n| {
                stages.borrow_mut().push(stage);
                n == "n3" && stage == Stage::MaskedInput
            });
            assert_eq!(x.attempts(), 1, "the instance aborted");
            assert!(x.agreed().is_none());
            let seen = stages.borrow().clone();
            assert!(seen.contains(&Stage::MaskedInput), "{seen:?}");
            assert!(
                !seen.contains(&Stage::Consistency) && !seen.contains(&Stage::Unmasking),
                "no survivor list and no unmasking request for three of four: {seen:?}"
            );
            // Asked again, all four take part: agreed.
            x.advance(t, &mut rng);
            nodes.hold(&mut x, &|_| true);
            x.advance(t, &mut rng);
            nodes.run_stages(&mut x, t, &|_, _| false);
            assert!(x.ready(), "four survivors: ready to agree");
            assert_eq!(x.contributors().len(), 4);
            assert_eq!(nodes.ids, vec![500, 500, 500, 500, 501, 501, 501, 501]);
        }

        /// Two nodes drop out of the first instance's key sharing, which aborts it; the
        /// next instance goes without them because the three others are enough, so
        /// flaky nodes do not use up the attempts while the rest could agree.
        #[test]
        fn nodes_that_dropped_out_sit_out_the_next_instance_when_enough_others_hold() {
            let tables: Vec<Dataset> = (0..5).map(|i| table(i, 20 + 5 * i)).collect();
            let mut nodes = Nodes::new(&tables);
            // The finder's (k, t) for each instance's size (5, then 3); a collusion rate
            // that makes it choose complete graphs (so the three steady nodes keep enough
            // neighbours whoever drops).
            let mut s = settings(3, 3);
            if let Some(sec) = &mut s.secure {
                sec.secagg.threat.adversarial_rate = 0.3;
            }
            let mut x = StatsExchange::new(s);
            let t0 = Instant::now();
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
            join_all(&mut x, &tables);
            x.advance(t0, &mut rng);
            nodes.hold(&mut x, &|_| true);
            x.advance(t0, &mut rng);
            let flaky = |n: &str| n == "n3" || n == "n4";
            let t = nodes.run_stages(&mut x, t0, &|stage, n| {
                flaky(n) && stage != Stage::AdvertiseKeys
            });
            assert_eq!(x.attempts(), 1, "three of five sharing keys is too few");
            assert!(
                nodes.ids.len() == 5,
                "one instance of five so far: {:?}",
                nodes.ids
            );
            // Asked again: only the three steady nodes.
            x.advance(t, &mut rng);
            let asked: Vec<NodeId> = x.outbox.iter().map(|(n, _)| n.clone()).collect();
            assert_eq!(asked, ["n0", "n1", "n2"]);
            nodes.hold(&mut x, &|_| true);
            x.advance(t, &mut rng);
            nodes.run_stages(&mut x, t, &|_, _| false);
            assert!(x.ready(), "{:?}", x.failure());
            let want: BTreeSet<NodeId> = ["n0", "n1", "n2"].map(String::from).into();
            assert_eq!(x.contributors(), &want);
        }

        /// DP mode `distributed`: the request carries the statistics' public parameters
        /// (3d + classes values, clip sqrt(3d + 1), the statistics' z, the federation's
        /// contributor bounds) and no server noise; the protocol's threshold is raised to
        /// `min_contributors`; a node dropping out still leaves a decodable sum of three,
        /// whose value is the survivors' normalised statistics plus the shares' noise (the
        /// server adds none); two survivors are never decoded.
        #[test]
        fn distributed_statistics_are_summed_with_the_nodes_noise_shares() {
            use crate::secure::DistributedSettings;
            use dpfl_common::dp::distributed::Mechanism;
            let ddp = |min: usize, max: usize| ExchangeSettings {
                noise_multiplier: Some(0.05),
                secure: settings(3, 1).secure.map(|mut s| {
                    s.secagg.distributed = Some(DistributedSettings {
                        mechanism: Mechanism::Skellam,
                        min_contributors: min,
                        max_contributors: max,
                    });
                    s
                }),
                ..settings(3, 1)
            };
            let s = ddp(3, 5);
            assert_eq!(s.server_noise(), None);
            let p = s.distributed_params().unwrap();
            assert_eq!((p.dim, p.bits, p.min_contributors), (8, 20, 3));
            assert_eq!(p.clip_norm, 7f64.sqrt());
            assert_eq!(p.noise_multiplier, 0.05);

            struct MustNotNoise;
            impl GaussianNoise for MustNotNoise {
                fn add_noise(
                    &mut self,
                    _: &mut [f32],
                    _: f64,
                ) -> Result<(), dpfl_common::dp::NoiseError> {
                    panic!("the server adds no noise in distributed mode")
                }
                fn name(&self) -> &'static str {
                    "must-not"
                }
            }

            // Five nodes, the complete graph at threshold 3: one dropout leaves every
            // node three neighbours holding its shares.
            let tables: Vec<Dataset> = (0..5).map(|i| table(i, 40 + 30 * i)).collect();
            let mut nodes = Nodes::with(&tables, STATS_DISTRIBUTED_BITS, true);
            let mut x = StatsExchange::new(s);
            let t0 = Instant::now();
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            join_all(&mut x, &tables);
            x.advance(t0, &mut rng);
            nodes.hold(&mut x, &|_| true);
            let spec = nodes.spec.unwrap();
            assert_eq!(spec.distributed.unwrap().params, p);
            assert_eq!((spec.bits, spec.clip_norm), (20, p.clip_norm));
            x.advance(t0, &mut rng);
            let dropped = "n2";
            let mut thresholds = Vec::new();
            while let Some(b) = x.poll_stage() {
                for m in &b.messages {
                    if let ToNode::Setup(setup) = &m.message {
                        thresholds.push(setup.context.threshold);
                    }
                    if m.node == dropped
                        && b.stage != Stage::AdvertiseKeys
                        && b.stage != Stage::ShareKeys
                    {
                        continue;
                    }
                    let ans = nodes
                        .answer(&m.node, &m.message)
                        .expect("an honest node answers");
                    x.handle_secagg_answer(&m.node, ans).unwrap();
                }
                let deadline = x.poll_timeout().unwrap();
                x.advance(deadline, &mut rng);
            }
            assert_eq!(
                thresholds,
                vec![3; 5],
                "threshold raised to min_contributors"
            );
            assert!(x.ready(), "{:?}", x.failure());
            let survivors = ["n0", "n1", "n3", "n4"];
            // The decoded total: the survivors' normalised statistics plus the summed
            // shares, standard deviation z C sqrt(4 / 3) per value (4 shares of
            // variance (z C)^2 / 3 each, in data units).
            let mut exact = vec![0.0; 8];
            for n in survivors {
                for (e, v) in exact.iter_mut().zip(&nodes.stats[n]) {
                    *e += v;
                }
            }
            let got = x.total.to_vector();
            let sd = 0.05 * 7f64.sqrt() * (4.0f64 / 3.0).sqrt();
            let mut sq = 0.0;
            for (g, e) in got.iter().zip(&exact) {
                assert!((g - e).abs() < 6.0 * sd, "{got:?} vs {exact:?}");
                sq += (g - e).powi(2);
            }
            // Noise is there (no coordinate is exact to the encoder's precision).
            assert!(sq > 1e-6, "{got:?} vs {exact:?}");
            x.agree(&mut MustNotNoise).unwrap();

            // Four nodes, min_contributors 4: a threshold of 4 needs 4 neighbours, more
            // than four participants have: no instance starts, nothing is decoded.
            let mut nodes = Nodes::with(&tables[..4], STATS_DISTRIBUTED_BITS, true);
            let mut x = StatsExchange::new(ddp(4, 4));
            join_all(&mut x, &tables[..4]);
            x.advance(t0, &mut rng);
            nodes.hold(&mut x, &|_| true);
            x.advance(t0, &mut rng);
            nodes.run_stages(&mut x, t0, &|stage, n| {
                n == dropped && stage != Stage::AdvertiseKeys && stage != Stage::ShareKeys
            });
            assert!(!x.ready() && x.contributors().is_empty());
            assert!(x.failure().is_some(), "the one attempt aborted");
        }

        /// With DP on the request asks for normalised statistics in the unit range.
        #[test]
        fn secure_ranges_are_the_unit_ball_with_dp_and_a_capped_power_of_two_of_rows() {
            let s = ExchangeSettings {
                noise_multiplier: Some(2.0),
                ..settings(3, 1)
            };
            assert_eq!(s.secure_range(1_000_000), 7f64.sqrt());
            assert_eq!(settings(3, 1).secure_range(0), 7f64.sqrt());
            assert_eq!(settings(3, 1).secure_range(1025), 2048.0 * 7f64.sqrt());
            // A declared count is the node's word: no overflow, no zero range.
            let cap = MAX_SECURE_ROWS as f64 * 7f64.sqrt();
            assert_eq!(settings(3, 1).secure_range(u64::MAX), cap);
            assert_eq!(settings(3, 1).secure_range((1 << 63) + 1), cap);
        }
    }

    #[test]
    fn nodes_that_leave_or_fail_are_not_waited_for_and_counted_once() {
        let mut x = StatsExchange::new(settings(1, 2, 2));
        let d = Dataset::new(vec![1.0, 2.0], vec![0, 1], 1).unwrap();
        let r = FeatureStats::of(&d, 2).to_report([7; 32], false, false);
        x.handle_join("a".into(), info(2));
        x.handle_join("b".into(), info(2));
        x.handle_stats("a", &r).unwrap();
        assert!(x.handle_stats("a", &r).is_err(), "counted once");
        // A reconnect of a counted node is not asked again.
        drain(&mut x);
        x.handle_join("a".into(), info(2));
        assert!(drain(&mut x).is_empty());
        x.handle_failed("b");
        assert!(
            x.handle_stats("b", &r).is_err(),
            "a refused request is closed"
        );
        x.handle_disconnect("b");
        x.handle_join("c".into(), info(2));
        assert!(matches!(&drain(&mut x)[..], [(n, Header::StatsRequest(_))] if n == "c"));
        x.handle_stats("c", &r).unwrap();
        assert!(x.ready());
        x.agree(&mut NoNoise).unwrap();
        x.publish();
        let sent: Vec<NodeId> = drain(&mut x).into_iter().map(|(n, _)| n).collect();
        assert_eq!(sent, vec!["a".to_string(), "c".to_string()]);
        assert_eq!(x.contributors().len(), 2);
    }
}
