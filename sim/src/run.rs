//! Running one configuration: build the population, then drive the **same** coordinator,
//! strategy, DP wrappers and client update pipeline as the real server and nodes, through
//! the in-memory transport or over real QUIC/mTLS.
//!
//! Memory does not grow with the population: a virtual client is a name and a list of
//! indices into the shared data set; a model exists only on the training threads, one per
//! thread, reused for every client that thread trains; updates are folded into the
//! streaming aggregate in batches of a few per thread.

use crate::experiment::{Sampler, SimConfig, Transport};
use dpfl_client::worker::train_and_privatize;
use dpfl_common::dp::{GaussianNoise, GridGaussian, OpenDpGaussian, SimulationGaussian};
use dpfl_common::model::{init_params, ModelSpec};
use dpfl_ml::partition::{self, derive_seed, PartitionKind};
use dpfl_ml::{DataSource, Dataset, DeviceData, Mlp};
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
    /// Central: against observers of the released models (every client). Local: against
    /// the server, for a client that took part in every release.
    pub epsilon: Option<f64>,
    /// Local mode: the largest spend against the server any client actually reached.
    pub epsilon_max_client: Option<f64>,
    /// delta.
    pub delta: Option<f64>,
    /// Why training ended.
    pub finish: String,
    /// Seconds.
    pub seconds: f64,
    /// Clients in the population.
    pub clients: usize,
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
            let DataSource::Csv { path, label } = &source else {
                return Err(SimError::Data(
                    "a natural partition needs a csv: data source".into(),
                ));
            };
            let (d, keys) = dpfl_ml::data::load_csv_grouped(path, label.as_deref(), Some(column))
                .map_err(|e| SimError::Data(e.to_string()))?;
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

/// Runs one configuration; `progress` is called after every round.
pub fn run(cfg: &SimConfig, progress: &mut dyn FnMut(u64)) -> Result<RunResult, SimError> {
    dpfl_ml::model::set_threads(1);
    let pop = population(cfg)?;
    let test = test_set(cfg)?;
    match cfg.transport {
        Transport::Memory => run_memory(cfg, &pop, test.as_ref(), progress),
        Transport::Quic => crate::quic::run_quic(cfg, &pop, test, progress),
    }
}

/// Evaluates global models on the test set (main thread).
pub(crate) struct TestEval {
    mlp: Mlp,
    data: DeviceData,
}

impl TestEval {
    pub(crate) fn new(spec: &ModelSpec, test: &Dataset) -> Result<Self, SimError> {
        let dev = tch::Device::Cpu;
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

pub(crate) fn budget_epsilon(
    cfg: &SimConfig,
    ledger: &dpfl_server::ledger::Ledger,
) -> (Option<f64>, Option<f64>) {
    use dpfl_common::DpMode;
    match cfg.dp.mode {
        DpMode::Central => (Some(ledger.epsilon()), None),
        DpMode::Local => (Some(ledger.epsilon()), Some(ledger.max_client_epsilon())),
        _ => (None, None),
    }
}

fn run_memory(
    cfg: &SimConfig,
    pop: &Population,
    test: Option<&Dataset>,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult, SimError> {
    let started = Instant::now();
    let spec =
        ModelSpec::new(cfg.model.layers.clone()).map_err(|e| SimError::Setup(e.to_string()))?;
    let strategy = strategy::build(
        cfg.strategy.clone(),
        cfg.train.clone(),
        cfg.dp,
        spec.num_params(),
        noise(cfg.sampler, derive_seed(cfg.seed, 2)),
    )
    .map_err(SimError::Setup)?;
    let ccfg = CoordinatorConfig {
        rounds: cfg.rounds,
        min_clients: pop.names.len(),
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
    };
    let snapshot = Coordinator::initial_snapshot(init_params(&spec, cfg.model.init_seed), &cfg.dp);
    let mut coord = Coordinator::new(ccfg, strategy, snapshot).map_err(SimError::Setup)?;
    let index: std::collections::HashMap<&str, usize> = pop
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut eval = test.map(|t| TestEval::new(&spec, t)).transpose()?;
    let t0 = Instant::now();
    for (n, part) in pop.names.iter().zip(&pop.parts) {
        let info = NodeInfo {
            num_examples: part.len() as u64,
            num_eval_examples: 0,
        };
        coord.handle_connect(n.clone(), info, t0);
    }
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
                // Batches of a few clients per thread: trained in parallel, fed to the
                // coordinator in node order (deterministic), then dropped.
                for batch in nodes.chunks(threads * 4) {
                    let mut results: Vec<(usize, Result<dpfl_client::worker::TrainDone, String>)> =
                        std::thread::scope(|s| {
                            let handles: Vec<_> = batch
                                .chunks(batch.len().div_ceil(threads))
                                .map(|chunk| {
                                    let (spec, request, params, pop) =
                                        (&spec, &request, &params, pop);
                                    let index = &index;
                                    s.spawn(move || {
                                        let mut mlp = match Mlp::new(spec, tch::Device::Cpu) {
                                            Ok(m) => m,
                                            Err(e) => {
                                                return vec![(usize::MAX, Err(e.to_string()))]
                                            }
                                        };
                                        chunk
                                            .iter()
                                            .map(|n| {
                                                let i = index[n.as_str()];
                                                let data = pop.data.subset(&pop.parts[i]);
                                                let mut nz = noise(
                                                    cfg.sampler,
                                                    derive_seed(
                                                        cfg.seed,
                                                        (round << 32) ^ i as u64 ^ 3,
                                                    ),
                                                );
                                                let r =
                                                    DeviceData::new(&data, spec, tch::Device::Cpu)
                                                        .map_err(|e| e.to_string())
                                                        .and_then(|dd| {
                                                            train_and_privatize(
                                                                &mut mlp,
                                                                &dd,
                                                                request,
                                                                params,
                                                                nz.as_mut(),
                                                            )
                                                        });
                                                (i, r)
                                            })
                                            .collect::<Vec<_>>()
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
                                if let Err(e) = coord.handle_update(name, round, meta, delta, now) {
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
                let mut mlp = Mlp::new(&spec, tch::Device::Cpu)
                    .map_err(|e| SimError::Setup(e.to_string()))?;
                for n in nodes {
                    let i = index[n.as_str()];
                    let data = pop.data.subset(&pop.parts[i]);
                    let dd = DeviceData::new(&data, &spec, tch::Device::Cpu)
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
                let last = report.round >= cfg.rounds;
                let test = if report.round % cfg.eval_every == 0 || last {
                    eval.as_mut().and_then(|e| e.eval(&report.global))
                } else {
                    None
                };
                let (eps, _) = budget_epsilon(cfg, &report.snapshot.ledger);
                rows.push(RoundRow {
                    round: report.round,
                    participants: report.participants.len(),
                    test_accuracy: test.map(|t| t.0),
                    test_loss: test.map(|t| t.1),
                    epsilon: eps,
                    elapsed: started.elapsed().as_secs_f64(),
                });
                progress(report.round);
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
    let (epsilon, epsilon_max_client) = budget_epsilon(cfg, coord.ledger());
    Ok(RunResult {
        rounds: coord.completed_rounds(),
        rows,
        final_params: coord.global().to_vec(),
        epsilon,
        epsilon_max_client,
        delta: cfg.dp.mode.is_private().then_some(cfg.dp.delta),
        finish,
        seconds: started.elapsed().as_secs_f64(),
        clients: pop.names.len(),
    })
}
