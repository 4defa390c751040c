//! Running one configuration: build the population, then drive the **same** coordinator,
//! strategy, DP wrappers and client update pipeline as the real server and nodes, through
//! the in-memory transport or over real QUIC/mTLS.
//!
//! Memory does not grow with the population: a virtual client is a name and a list of
//! indices into the shared data set; a model exists only on the training threads, one per
//! thread, reused for every client that thread trains; updates are folded into the
//! streaming aggregate in batches of a few per thread.

use crate::experiment::{Sampler, SecureSum, SimConfig, Transport};
use dpfl_client::worker::{privatize_outcome, train_and_privatize};
use dpfl_common::dp::{GaussianNoise, GridGaussian, OpenDpGaussian, SimulationGaussian};
use dpfl_common::model::ModelSpec;
use dpfl_ml::partition::{self, derive_seed, PartitionKind};
use dpfl_ml::{train_batched, BatchedData, DataSource, Dataset, DeviceData, Mlp};
use dpfl_server::coordinator::{
    Action, Coordinator, CoordinatorConfig, NodeInfo, Selection, UpdateLimits,
};
use dpfl_server::strategy;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors running a configuration.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Data could not be loaded or partitioned.
    #[error("data: {0}")]
    Data(String),
    /// Strategy, model or coordinator set-up.
    #[error("{0}")]
    Setup(String),
    /// The QUIC transport failed.
    #[error("quic transport: {0}")]
    Transport(String),
}

/// One evaluated round.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundRow {
    /// Round.
    pub round: u64,
    /// Accepted updates.
    pub participants: usize,
    /// Test accuracy of the global model (when evaluated).
    pub test_accuracy: Option<f64>,
    /// Test loss.
    pub test_loss: Option<f64>,
    /// Epsilon after the round (the ledger's figure: central, every client; local, a client
    /// in every release, against the server).
    pub epsilon: Option<f64>,
    /// Seconds since the configuration started.
    pub elapsed: f64,
    /// The round was abandoned (no quorum after its retries, secure aggregation that never
    /// started or aborted, ...): the model did not change and nothing was released.
    pub abandoned: bool,
    /// Why the round ended as it did, when it was not a plain aggregation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Outcome of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Rounds completed.
    pub rounds: u64,
    /// Per-round rows.
    pub rows: Vec<RoundRow>,
    /// Final global parameters.
    #[serde(skip)]
    pub final_params: Vec<f32>,
    /// Central and distributed: against observers of the released models (every client).
    /// Local: against the server, for a client that took part in every release.
    pub epsilon: Option<f64>,
    /// Local and distributed modes: the largest spend against the server any client
    /// actually reached.
    pub epsilon_max_client: Option<f64>,
    /// Distributed mode: against the server, for a client that took part in every release
    /// (the ring sum's integer noise only, no amplification by sampling).
    pub epsilon_server: Option<f64>,
    /// The empirical privacy audit, when canaries were configured.
    pub audit: Option<dpfl_common::dp::audit::AuditReport>,
    /// delta.
    pub delta: Option<f64>,
    /// Why training ended.
    pub finish: String,
    /// Seconds.
    pub seconds: f64,
    /// Clients in the population.
    pub clients: usize,
    /// Secure aggregation, per completed round that unmasked a sum: whether the sum the
    /// server unmasked equals the plaintext sum of the survivors' encoded inputs, exactly.
    pub secure_sum_exact: Vec<bool>,
}

impl RunResult {
    /// Last evaluated accuracy.
    pub fn final_accuracy(&self) -> Option<f64> {
        self.rows.iter().rev().find_map(|r| r.test_accuracy)
    }
    /// Best evaluated accuracy.
    pub fn best_accuracy(&self) -> Option<f64> {
        self.rows
            .iter()
            .filter_map(|r| r.test_accuracy)
            .reduce(f64::max)
    }
}

/// The data and the clients' parts.
pub struct Population {
    /// Shared training data.
    pub data: Arc<Dataset>,
    /// Client names (`node-1`, ...; the QUIC transport's certificates carry the same).
    pub names: Vec<String>,
    /// Indices per client.
    pub parts: Vec<Vec<usize>>,
}

/// Loads the data and partitions it.
pub fn population(cfg: &SimConfig) -> Result<Population, SimError> {
    let source: DataSource = cfg
        .data
        .parse()
        .map_err(|e: dpfl_ml::data::DataError| SimError::Data(e.to_string()))?;
    let p = &cfg.population;
    let seed = derive_seed(cfg.seed, 1);
    let (data, parts) = match &p.partition {
        PartitionKind::Natural { column } => {
            let DataSource::Csv { path, options } = &source else {
                return Err(SimError::Data(
                    "a natural partition needs a csv: data source".into(),
                ));
            };
            let t = dpfl_ml::csv::load_table(path, options, Some(column))
                .map_err(|e| SimError::Data(e.to_string()))?;
            let (d, keys) = (t.data, t.groups);
            let parts = partition::natural(&keys)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            (d, parts)
        }
        kind => {
            let d = source.load().map_err(|e| SimError::Data(e.to_string()))?;
            let parts = match (kind, p.examples_per_client) {
                (PartitionKind::Iid, Some(k)) => partition::iid_fixed(d.len(), p.clients, k, seed),
                (PartitionKind::Iid, None) => partition::iid(d.len(), p.clients, seed),
                (PartitionKind::Dirichlet { alpha }, _) => {
                    partition::dirichlet(&d.labels, p.clients, *alpha, p.min_examples, seed)
                }
                (PartitionKind::Shards { shards_per_client }, _) => {
                    partition::shards(&d.labels, p.clients, *shards_per_client, seed)
                }
                (PartitionKind::Natural { .. }, _) => unreachable!("handled above"),
            }
            .map_err(|e| SimError::Data(e.to_string()))?;
            (d, parts)
        }
    };
    let names = (1..=parts.len()).map(|i| format!("node-{i}")).collect();
    Ok(Population {
        data: Arc::new(data),
        names,
        parts,
    })
}

fn test_set(cfg: &SimConfig) -> Result<Option<Dataset>, SimError> {
    let Some(src) = &cfg.test_data else {
        return Ok(None);
    };
    let src: DataSource = src
        .parse()
        .map_err(|e: dpfl_ml::data::DataError| SimError::Data(e.to_string()))?;
    let mut d = src.load().map_err(|e| SimError::Data(e.to_string()))?;
    if let Some(n) = cfg.test_limit {
        d = d.take(n);
    }
    Ok(Some(d))
}

/// The noise source of a simulation's server or virtual client.
pub(crate) fn noise(sampler: Sampler, seed: u64) -> Box<dyn GaussianNoise> {
    match sampler {
        Sampler::Simulation => Box::new(SimulationGaussian::seeded(seed)),
        Sampler::Opendp => Box::new(OpenDpGaussian::with_threads(1)),
        Sampler::Grid => Box::new(GridGaussian::seeded(seed)),
    }
}

/// Test-only fault injection: scales every noise s.d. by `factor` (0: no noise), while
/// everything else (and the ledger) believes the configured z.
struct FaultyNoise {
    inner: Box<dyn GaussianNoise>,
    factor: f64,
}

impl GaussianNoise for FaultyNoise {
    fn add_noise(
        &mut self,
        values: &mut [f32],
        sigma: f64,
    ) -> Result<(), dpfl_common::dp::NoiseError> {
        if self.factor == 0.0 {
            return Ok(());
        }
        self.inner.add_noise(values, sigma * self.factor)
    }

    fn add_calibrated(
        &mut self,
        values: &mut [f32],
        z: f64,
        sensitivity: f64,
    ) -> Result<(), dpfl_common::dp::NoiseError> {
        if self.factor == 0.0 {
            return Ok(());
        }
        self.inner
            .add_calibrated(values, z * self.factor, sensitivity)
    }

    fn name(&self) -> &'static str {
        "fault-injected"
    }
}

/// The run's noise source, with the audit's test-only fault injection applied.
fn run_noise(cfg: &SimConfig, seed: u64) -> Box<dyn GaussianNoise> {
    let inner = noise(cfg.sampler, seed);
    if cfg.audit.fault_noise_factor == 1.0 {
        inner
    } else {
        Box::new(FaultyNoise {
            inner,
            factor: cfg.audit.fault_noise_factor,
        })
    }
}

/// Canary clients of the audit: secret seed, who is included, and (for all-iterates)
/// their directions.
struct Canaries {
    seed: u64,
    included: Vec<bool>,
    dirs: Option<Vec<Vec<f32>>>,
    /// All-iterates score: max cosine over rounds, per canary.
    max_cos: Vec<f64>,
}

impl Canaries {
    fn new(cfg: &SimConfig, d: usize) -> Option<Self> {
        let m = cfg.audit.canaries;
        if m == 0 {
            return None;
        }
        let seed = derive_seed(cfg.seed, 0xA0D1);
        let included = (0..m as u64)
            .map(|i| dpfl_common::dp::audit::canary_included(seed, i))
            .collect();
        let dirs = cfg.audit.all_iterates.then(|| {
            (0..m as u64)
                .map(|i| dpfl_common::dp::audit::canary_direction(seed, i, d))
                .collect()
        });
        Some(Self {
            seed,
            included,
            dirs,
            max_cos: vec![f64::NEG_INFINITY; m],
        })
    }

    fn name(i: usize) -> String {
        format!("canary-{i:05}")
    }

    fn index(name: &str) -> Option<usize> {
        name.strip_prefix("canary-").and_then(|n| n.parse().ok())
    }

    fn direction(&self, i: usize, d: usize) -> Vec<f32> {
        match &self.dirs {
            Some(dirs) => dirs[i].clone(),
            None => dpfl_common::dp::audit::canary_direction(self.seed, i as u64, d),
        }
    }

    /// A canary's update: its direction at the round's clipping norm, privatized as any
    /// client's update is.
    fn update(
        &self,
        i: usize,
        request: &dpfl_common::wire::TrainRequest,
        d: usize,
        noise: &mut dyn GaussianNoise,
    ) -> Result<(dpfl_common::wire::UpdateMeta, Vec<f32>), String> {
        let c = request.privacy.clip_norm as f32;
        let raw: Vec<f32> = self.direction(i, d).iter().map(|v| v * c).collect();
        let delta = dpfl_common::dp::privatize(
            dpfl_common::dp::RawDelta::new(raw),
            &request.privacy,
            noise,
        )
        .map_err(|e| e.to_string())?;
        let local = request.privacy.mode == dpfl_common::DpMode::Local;
        let meta = dpfl_common::wire::UpdateMeta {
            round: request.round,
            spec_hash: request.spec_hash,
            num_examples: if local { 0 } else { 1 },
            metrics: None,
            clipped: (!local).then_some(false),
        };
        Ok((meta, delta.into_vec()))
    }

    /// All-iterates scores: the cosine of every canary with one round's model change.
    fn observe_round(&mut self, change: &[f32]) {
        let Some(dirs) = &self.dirs else { return };
        for (m, u) in self.max_cos.iter_mut().zip(dirs) {
            *m = m.max(dpfl_common::dp::audit::cosine(u, change));
        }
    }

    /// The report from the final model's change.
    fn report(
        &self,
        change: &[f32],
        delta: f64,
        theoretical: Option<f64>,
    ) -> dpfl_common::dp::audit::AuditReport {
        use dpfl_common::dp::audit::{cosine, split_by_inclusion};
        let d = change.len();
        let (seen, unseen) = split_by_inclusion(
            &self.included,
            (0..self.included.len()).map(|i| cosine(&self.direction(i, d), change)),
        );
        let (seen_all, unseen_all) =
            split_by_inclusion(&self.included, self.max_cos.iter().copied());
        let all = self
            .dirs
            .is_some()
            .then_some((seen_all.as_slice(), unseen_all.as_slice()));
        dpfl_common::dp::audit::AuditReport::new(&seen, &unseen, all, delta, theoretical)
    }
}

/// Runs one configuration; `progress` is called after every round.
pub fn run(cfg: &SimConfig, progress: &mut dyn FnMut(u64)) -> Result<RunResult, SimError> {
    run_with_prep(cfg, progress).map(|(r, _)| r)
}

/// As [`run`], after federated standardisation (`crate::prep`); also returns what it made.
pub fn run_with_prep(
    cfg: &SimConfig,
    progress: &mut dyn FnMut(u64),
) -> Result<(RunResult, crate::prep::Prep), SimError> {
    dpfl_ml::model::set_threads(1);
    let mut pop = population(cfg)?;
    let mut test = test_set(cfg)?;
    let prep = crate::prep::standardize(cfg, &mut pop, test.as_mut(), derive_seed(cfg.seed, 3))?;
    let result = match cfg.transport {
        Transport::Memory => run_memory(cfg, &pop, test.as_ref(), progress),
        Transport::Quic => crate::quic::run_quic(cfg, &pop, test, progress),
    }?;
    if let Some(w) = crate::prep::chance_warning(&result.rows, &pop.data.labels) {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
    Ok((result, prep))
}

/// Evaluates global models on the test set (main thread).
pub(crate) struct TestEval {
    mlp: Mlp,
    data: DeviceData,
}

impl TestEval {
    pub(crate) fn new(
        spec: &ModelSpec,
        test: &Dataset,
        dev: tch::Device,
    ) -> Result<Self, SimError> {
        Ok(Self {
            mlp: Mlp::new(spec, dev).map_err(|e| SimError::Setup(e.to_string()))?,
            data: DeviceData::new(test, spec, dev).map_err(|e| SimError::Setup(e.to_string()))?,
        })
    }

    pub(crate) fn eval(&mut self, params: &[f32]) -> Option<(f64, f64)> {
        self.mlp
            .evaluate(&self.data, params)
            .ok()
            .map(|e| (e.accuracy, e.loss))
    }
}

/// (epsilon, epsilon_max_client, epsilon_server) as [`RunResult`] reports them.
pub(crate) fn budget_epsilon(
    cfg: &SimConfig,
    ledger: &dpfl_server::ledger::Ledger,
) -> (Option<f64>, Option<f64>, Option<f64>) {
    use dpfl_common::DpMode;
    match cfg.dp.mode {
        DpMode::Central => (Some(ledger.epsilon()), None, None),
        DpMode::Local => (
            Some(ledger.epsilon()),
            Some(ledger.max_client_epsilon()),
            None,
        ),
        // Both labelled epsilons: against observers of the models (the rows' figure) and
        // against the server (a client in every release; the largest actual spend).
        DpMode::Distributed => (
            Some(ledger.epsilon()),
            Some(ledger.max_client_epsilon()),
            Some(
                ledger
                    .distributed
                    .as_ref()
                    .map_or(0.0, |d| d.epsilons().server),
            ),
        ),
        DpMode::None => (None, None, None),
    }
}

type TrainResult = Result<dpfl_client::worker::TrainDone, String>;

/// Trains one thread's share of a round's clients (population indices) and privatizes
/// each update with the client's own noise stream: one by one through
/// `train_and_privatize`, or as one batched model (`cfg.batched`) whose per-client
/// outcomes go through the same `privatize_outcome`. Either way every client's noise seed
/// is the same, so the DP pipeline sees the same per-client updates. A failure to build
/// the model comes back as `usize::MAX`.
#[allow(clippy::too_many_arguments)] // one thread's whole context, passed by reference
fn train_share(
    cfg: &SimConfig,
    pop: &Population,
    spec: &ModelSpec,
    request: &dpfl_common::wire::TrainRequest,
    params: &[f32],
    round: u64,
    clients: &[usize],
    dev: tch::Device,
) -> Vec<(usize, TrainResult)> {
    let client_noise =
        |i: usize| run_noise(cfg, derive_seed(cfg.seed, (round << 32) ^ i as u64 ^ 3));
    if cfg.batched {
        let t0 = Instant::now();
        let parts: Vec<&[usize]> = clients.iter().map(|i| pop.parts[*i].as_slice()).collect();
        let outcomes = BatchedData::new(&pop.data, &parts, spec, dev)
            .and_then(|bd| train_batched(spec, &bd, &request.config, params, dev));
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => return clients.iter().map(|i| (*i, Err(e.to_string()))).collect(),
        };
        // Wall time of the batch, shared equally (the metric is informational).
        let seconds = t0.elapsed().as_secs_f64() / clients.len().max(1) as f64;
        return clients
            .iter()
            .zip(outcomes)
            .map(|(&i, o)| {
                let r = o
                    .map_err(|e| e.to_string())
                    .and_then(|o| privatize_outcome(o, seconds, request, client_noise(i).as_mut()));
                (i, r)
            })
            .collect();
    }
    let mut mlp = match Mlp::new(spec, dev) {
        Ok(m) => m,
        Err(e) => return vec![(usize::MAX, Err(e.to_string()))],
    };
    clients
        .iter()
        .map(|&i| {
            let data = pop.data.subset(&pop.parts[i]);
            let r = DeviceData::new(&data, spec, dev)
                .map_err(|e| e.to_string())
                .and_then(|dd| {
                    train_and_privatize(&mut mlp, &dd, request, params, client_noise(i).as_mut())
                });
            (i, r)
        })
        .collect()
}

/// The training and evaluation device `cfg.device` names, refused before round 1 when it
/// is not available here.
pub(crate) fn sim_device(cfg: &SimConfig) -> Result<tch::Device, SimError> {
    dpfl_ml::model::parse_device(&cfg.device).map_err(|e| SimError::Setup(format!("device: {e}")))
}

fn run_memory(
    cfg: &SimConfig,
    pop: &Population,
    test: Option<&Dataset>,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult, SimError> {
    let started = Instant::now();
    let spec = cfg
        .model
        .spec()
        .map_err(|e| SimError::Setup(e.to_string()))?;
    let strategy = strategy::build(
        cfg.strategy.clone(),
        cfg.train.clone(),
        cfg.dp,
        spec.num_params(),
        run_noise(cfg, derive_seed(cfg.seed, 2)),
    )
    .map_err(SimError::Setup)?;
    let d = spec.num_params();
    let mut canaries = Canaries::new(cfg, d);
    let included_canaries = canaries
        .as_ref()
        .map_or(0, |c| c.included.iter().filter(|i| **i).count());
    let ccfg = CoordinatorConfig {
        rounds: cfg.rounds,
        min_clients: pop.names.len() + included_canaries,
        min_fit_clients: cfg.strategy.min_fit_clients,
        round_timeout: Duration::from_secs(1 << 30),
        eval_timeout: Duration::from_secs(1 << 30),
        max_round_retries: cfg.max_round_retries,
        // Simulations are reproducible: the seed drives selection here, and only here.
        selection: Selection::Seeded(cfg.seed),
        limits: UpdateLimits {
            // Simulated clients are the simulator's own; attacks are configured explicitly.
            max_weight_share: 1.0,
            ..UpdateLimits::default()
        },
        spec: spec.clone(),
        dp: cfg.dp,
        secure_aggregation: cfg.secure_aggregation.then(|| {
            let distributed = (cfg.dp.mode == dpfl_common::DpMode::Distributed)
                .then(|| cfg.secagg.distributed(cfg.strategy.min_fit_clients));
            cfg.secagg.settings(1, distributed)
        }),
    };
    let initial = cfg
        .model
        .initial_params(&spec)
        .map_err(|e| SimError::Setup(e.to_string()))?;
    let snapshot = Coordinator::initial_snapshot(initial, &cfg.dp);
    let mut coord = Coordinator::new(ccfg, strategy, snapshot).map_err(SimError::Setup)?;
    let index: std::collections::HashMap<&str, usize> = pop
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let device = sim_device(cfg)?;
    let mut eval = test.map(|t| TestEval::new(&spec, t, device)).transpose()?;
    let t0 = Instant::now();
    // Included canaries join as clients of their own (sampled like anyone), before the
    // real ones so that the first round already sees the whole population.
    let initial: Vec<f32> = coord.global().to_vec();
    if let Some(c) = &canaries {
        for (i, inc) in c.included.iter().enumerate() {
            if *inc {
                let info = NodeInfo {
                    num_examples: 1,
                    num_eval_examples: 0,
                };
                coord.handle_connect(Canaries::name(i), info, t0);
            }
        }
    }
    for (n, part) in pop.names.iter().zip(&pop.parts) {
        let info = NodeInfo {
            num_examples: part.len() as u64,
            num_eval_examples: 0,
        };
        coord.handle_connect(n.clone(), info, t0);
    }
    let mut secure = if cfg.secure_aggregation {
        Some(
            crate::secure::SimSecAgg::new(
                &pop.names,
                // Distributed DP encodes the rotated update, padded to a power of two.
                if cfg.dp.mode == dpfl_common::DpMode::Distributed {
                    d.next_power_of_two() as u32
                } else {
                    d as u32
                },
                cfg.secagg.bits,
                derive_seed(cfg.seed, 0x5EC),
            )
            .map_err(SimError::Setup)?,
        )
    } else {
        None
    };
    let mut secure_sum_exact = Vec::new();
    let mut previous = initial.clone();
    let mut rows = Vec::new();
    let mut finish = String::from("stopped");
    let threads = cfg.threads.max(1);
    while let Some(action) = coord.poll_action() {
        match action {
            Action::Train {
                round,
                nodes,
                request,
                params,
            } => {
                // Canaries answer first (their update is a fixed direction, no training).
                let (canary_nodes, nodes): (Vec<String>, Vec<String>) = nodes
                    .into_iter()
                    .partition(|n| Canaries::index(n).is_some());
                if let Some(c) = &canaries {
                    let now = Instant::now();
                    for n in &canary_nodes {
                        let Some(i) = Canaries::index(n) else {
                            continue;
                        };
                        let mut nz = run_noise(
                            cfg,
                            derive_seed(derive_seed(cfg.seed, 0xCA5A), (round << 32) ^ i as u64),
                        );
                        match c.update(i, &request, d, nz.as_mut()) {
                            Ok((meta, delta)) => {
                                if let Err(e) = coord.handle_update(n, round, meta, delta, now) {
                                    tracing::warn!(node = %n, "canary update rejected: {e}");
                                }
                            }
                            Err(e) => coord.handle_failed(n, round, &e, now),
                        }
                    }
                }
                // Waves of clients, split over the threads: trained in parallel (each
                // thread's share one by one, or as one batched model), fed to the
                // coordinator in node order (deterministic), then dropped.
                let wave = if cfg.batched {
                    threads * cfg.batch_clients
                } else {
                    threads * 4
                };
                for batch in nodes.chunks(wave) {
                    let mut results: Vec<(usize, TrainResult)> = std::thread::scope(|s| {
                        let handles: Vec<_> = batch
                            .chunks(batch.len().div_ceil(threads))
                            .map(|chunk| {
                                let clients: Vec<usize> =
                                    chunk.iter().map(|n| index[n.as_str()]).collect();
                                let (spec, request, params) = (&spec, &request, &params);
                                s.spawn(move || {
                                    train_share(
                                        cfg, pop, spec, request, params, round, &clients, device,
                                    )
                                })
                            })
                            .collect();
                        handles
                            .into_iter()
                            .flat_map(|h| h.join().unwrap_or_default())
                            .collect()
                    });
                    results.sort_by_key(|(i, _)| *i);
                    let now = Instant::now();
                    // A client whose thread died counts as failed, never as silently absent.
                    for n in batch {
                        let i = index[n.as_str()];
                        if results.binary_search_by_key(&i, |(j, _)| *j).is_err() {
                            coord.handle_failed(n, round, "training thread failed", now);
                        }
                    }
                    for (i, r) in results {
                        let Some(name) = pop.names.get(i) else {
                            return Err(SimError::Setup(
                                "training thread failed to build the model".into(),
                            ));
                        };
                        match r {
                            Ok(done) => {
                                let meta = done.meta(&request);
                                let mut delta = done.delta.into_vec();
                                if let Some(a) = &cfg.population.attack {
                                    if a.is_attacker(i, pop.names.len()) {
                                        a.apply(&mut delta);
                                    }
                                }
                                let answer = match (secure.as_mut(), request.secure_aggregation) {
                                    (Some(sa), Some(spec)) => {
                                        sa.hold(name, spec, delta);
                                        coord.handle_held(name, round, meta, now)
                                    }
                                    _ => coord.handle_update(name, round, meta, delta, now),
                                };
                                if let Err(e) = answer {
                                    tracing::warn!(node = %name, "update rejected: {e}");
                                }
                            }
                            Err(e) => coord.handle_failed(name, round, &e, now),
                        }
                    }
                }
            }
            Action::Evaluate {
                nodes,
                request,
                params,
            } => {
                // Federated evaluation on each selected client's own data.
                let now = Instant::now();
                let mut mlp =
                    Mlp::new(&spec, device).map_err(|e| SimError::Setup(e.to_string()))?;
                for n in nodes {
                    let Some(&i) = index.get(n.as_str()) else {
                        continue;
                    };
                    let data = pop.data.subset(&pop.parts[i]);
                    let dd = DeviceData::new(&data, &spec, device)
                        .map_err(|e| SimError::Setup(e.to_string()))?;
                    if let Ok(e) = mlp.evaluate(&dd, &params) {
                        let _ = coord.handle_eval_result(
                            &n,
                            dpfl_common::wire::EvalResult {
                                round: request.round,
                                loss: e.loss,
                                accuracy: e.accuracy,
                                num_examples: e.num_examples,
                            },
                            now,
                        );
                    }
                }
            }
            Action::RoundCompleted(report) => {
                if let Some(c) = canaries.as_mut() {
                    let change: Vec<f32> = report
                        .global
                        .iter()
                        .zip(&previous)
                        .map(|(a, b)| a - b)
                        .collect();
                    c.observe_round(&change);
                    previous = report.global.to_vec();
                }
                let last = report.round >= cfg.rounds;
                let test = if report.round % cfg.eval_every == 0 || last {
                    eval.as_mut().and_then(|e| e.eval(&report.global))
                } else {
                    None
                };
                if let (Some(digest), Some(sa), SecureSum::Protocol) =
                    (report.secure_sum_digest, secure.as_ref(), cfg.secure_sum)
                {
                    let plain = sa.plaintext_digest(&report.participants, cfg.secagg.bits);
                    secure_sum_exact.push(plain == Some(digest));
                }
                let (eps, ..) = budget_epsilon(cfg, &report.snapshot.ledger);
                rows.push(RoundRow {
                    round: report.round,
                    participants: report.participants.len(),
                    test_accuracy: test.map(|t| t.0),
                    test_loss: test.map(|t| t.1),
                    epsilon: eps,
                    elapsed: started.elapsed().as_secs_f64(),
                    abandoned: report.abandoned,
                    note: report.note.clone(),
                });
                progress(report.round);
            }
            Action::SecAgg {
                round, messages, ..
            } => {
                let Some(sa) = secure.as_mut() else {
                    return Err(SimError::Setup(
                        "secure aggregation stage without secure nodes".into(),
                    ));
                };
                // `secure_sum = "sum"`: the protocol round's first stage is answered at once
                // with the sum of the participants' encoded inputs.
                let setup = messages.iter().find_map(|m| match &m.message {
                    dpfl_secagg::messages::ToNode::Setup(s) => Some(s.context.clone()),
                    _ => None,
                });
                if let (SecureSum::Sum, Some(ctx)) = (cfg.secure_sum, setup) {
                    let nodes: Vec<String> = messages.into_iter().map(|m| m.node).collect();
                    let sum = sa
                        .direct_sum(&nodes, ctx.round, ctx.bits, threads)
                        .map_err(SimError::Setup)?;
                    coord
                        .complete_secagg_in_simulation(round, sum, Instant::now())
                        .map_err(|e| SimError::Setup(format!("simulated secure sum: {e}")))?;
                    continue;
                }
                for m in messages {
                    let now = Instant::now();
                    match sa.answer(&m.node, &m.message) {
                        Ok(ans) => {
                            if let Err(e) = coord.handle_secagg_answer(&m.node, round, ans, now) {
                                tracing::warn!(node = %m.node, "stage answer refused: {e}");
                            }
                        }
                        Err(e) => coord.handle_failed(&m.node, round, &e, now),
                    }
                }
            }
            Action::RoundRetried { .. } => {}
            Action::Finish { reason, .. } => {
                finish = reason.to_string();
            }
        }
    }
    // A run that stops early (budget) still gets a final evaluation.
    if let (Some(last), Some(e)) = (rows.last_mut(), eval.as_mut()) {
        if last.test_accuracy.is_none() {
            let t = e.eval(coord.global());
            last.test_accuracy = t.map(|t| t.0);
            last.test_loss = t.map(|t| t.1);
        }
    }
    let (epsilon, epsilon_max_client, epsilon_server) = budget_epsilon(cfg, coord.ledger());
    let audit = canaries.map(|c| {
        let change: Vec<f32> = coord
            .global()
            .iter()
            .zip(&initial)
            .map(|(a, b)| a - b)
            .collect();
        c.report(&change, cfg.dp.delta, epsilon)
    });
    Ok(RunResult {
        audit,
        rounds: coord.completed_rounds(),
        rows,
        final_params: coord.global().to_vec(),
        epsilon,
        epsilon_max_client,
        epsilon_server,
        delta: cfg.dp.mode.is_private().then_some(cfg.dp.delta),
        finish,
        seconds: started.elapsed().as_secs_f64(),
        clients: pop.names.len(),
        secure_sum_exact,
    })
}
