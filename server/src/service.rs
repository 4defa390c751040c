//! The aggregation server: the QUIC/mTLS endpoint and the async driver around the
//! [`Coordinator`].
//!
//! One task per connection does the handshake (certificate identity, admission, hello)
//! and then only waits for the connection to end; requests to a client go out on
//! server-opened bidirectional streams, one per request, each read back with a size limit
//! and a deadline. The driver loop owns the coordinator and turns its actions into
//! network traffic, metrics lines, checkpoints and centralised evaluations.
//!
//! Identity: the node name is the common name of the client certificate, which must chain
//! to the federation CA (rustls verifies it during the handshake), **bound to the
//! certificate's key** on first use ([`Pins`], persisted in `out_dir/identities.json`): a
//! certificate with a known name and another key is refused, loudly. A second connection
//! with the same name and key replaces the first: a node that crashed and restarted must
//! be able to rejoin before the old connection times out. Revocation (deny list) is
//! re-checked every round and every few seconds for connected nodes.
//!
//! Outputs: what may be published (`metrics.jsonl`, `ledger.json`, `summary.json`,
//! `model.safetensors`) holds, with DP on, only what the guarantee covers: released
//! models, their evaluation on the server's own test data, the mechanism's parameters and
//! noised statistics, the epsilon curve. Everything else (participants, failures and their
//! reasons, sample sizes, exact clipped fractions, training metrics, federated evaluation,
//! timings, rejections) goes to the operator-only `operator/` folder and the log. The
//! ledger is written durably **before** any model it accounts for leaves the server.

use crate::admission::{
    AdmissionError, Lists, Pins, RateLimiter, RefusalLog, SourceLimiter, SourceSlot, RETRY,
};
use crate::checkpoint;
use crate::config::ServerConfig;
use crate::coordinator::{
    Action, Coordinator, CoordinatorConfig, FinishReason, NodeInfo, RoundPhase, RoundReport,
    Selection,
};
use crate::ledger::{Ledger, PublicLedger};
use crate::status::{Observatory, RoundPoint};
use crate::strategy::{self, NodeId, Strategy};
use dpfl_certs::{Credentials, Layout};
use dpfl_common::config::DpMode;
use dpfl_common::dp::{GaussianNoise, OpenDpGaussian};
use dpfl_common::model::{short_hex, ModelSpec};
use dpfl_common::wire::{
    self, printable, DpAgreement, Finish, Header, Message, Refusal, RefusalKind, UpdateMeta,
    Welcome,
};
use dpfl_ml::{DataSource, DeviceData, Mlp};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Test-only fault injection (`DPFL_FAULT=abort-after-release:N`): abort the process right
/// after the model of round N has been sent out and before that round's checkpoint, the
/// window in which a crash used to release a model the ledger never recorded.
const FAULT_ENV: &str = "DPFL_FAULT";

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// TLS / certificates / socket.
    #[error(transparent)]
    Tls(#[from] dpfl_certs::CertError),
    /// Checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// Test data could not be loaded.
    #[error("test data: {0}")]
    Data(String),
    /// Output files.
    #[error("{0}")]
    Io(String),
    /// Strategy could not be built.
    #[error("strategy: {0}")]
    Strategy(String),
    /// The run in `out_dir` has nothing left to do; its outputs were left as they were.
    #[error("{0}")]
    AlreadyComplete(String),
}

/// An update as the server received it (for tests that observe the wire).
#[derive(Debug, Clone)]
pub struct ObservedUpdate {
    /// Sender.
    pub node: NodeId,
    /// Header.
    pub meta: UpdateMeta,
    /// Payload as received, before validation.
    pub delta: Vec<f32>,
}

/// Feature statistics as the server received them in the clear (for tests that observe
/// the wire; with secure aggregation nothing arrives here).
#[derive(Debug, Clone)]
pub struct ObservedStats {
    /// Sender.
    pub node: NodeId,
    /// The report, before validation.
    pub report: dpfl_common::wire::StatsReport,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Rounds completed (including those of earlier processes of a resumed run).
    pub rounds_completed: u64,
    /// Rounds this process ran.
    pub rounds_run: u64,
    /// Why it ended (`None`: shut down by signal).
    pub finish: Option<String>,
    /// Last centralised test accuracy.
    pub test_accuracy: Option<f64>,
    /// Last centralised test loss.
    pub test_loss: Option<f64>,
    /// Last centralised ROC AUC of class 1 (two-class models).
    pub test_auc: Option<f64>,
    /// Last centralised F1 of class 1 (two-class models).
    pub test_f1: Option<f64>,
    /// Best centralised test accuracy of the rounds this process evaluated, and its round
    /// (that model is `model-best.safetensors`).
    pub best_test_accuracy: Option<(f64, u64)>,
    /// Final ledger.
    pub ledger: Ledger,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Messages rejected over the whole run, by kind.
    pub rejected: HashMap<String, u64>,
    /// The empirical privacy audit (`dp.audit_canaries`), next to the theoretical epsilon.
    pub audit: Option<dpfl_common::dp::audit::AuditReport>,
}

/// What `summary.json` publishes with DP on: nothing about who took part.
#[derive(Debug, Serialize)]
struct PublicSummary<'a> {
    rounds_completed: u64,
    finish: &'a Option<String>,
    test_accuracy: Option<f64>,
    test_loss: Option<f64>,
    ledger: PublicLedger,
    /// Empirical estimate for observers of the final model (post-processing of released
    /// models with the server's secret canaries).
    audit: Option<dpfl_common::dp::audit::AuditReport>,
}

/// One line of `metrics.jsonl` with DP on: only what the guarantee covers.
#[derive(Debug, Serialize)]
struct PublicLine {
    round: u64,
    dp_mode: DpMode,
    epsilon: Option<f64>,
    delta: Option<f64>,
    noise_multiplier: Option<f64>,
    clip_norm: Option<f64>,
    /// From the noised count of adaptive clipping (covered by the round's mechanism).
    clipped_fraction: Option<f64>,
    model_updated: bool,
    test_accuracy: Option<f64>,
    test_loss: Option<f64>,
    /// Two-class models: ROC AUC and F1 of class 1 on the test set.
    #[serde(skip_serializing_if = "Option::is_none")]
    test_auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    test_f1: Option<f64>,
}

/// One line of `operator/metrics.jsonl` (and of `metrics.jsonl` when DP is off).
#[derive(Debug, Serialize)]
struct MetricsLine {
    round: u64,
    unix_time: f64,
    note: Option<String>,
    outliers: Vec<String>,
    participants: usize,
    selected: usize,
    failed: usize,
    attempts: u32,
    abandoned: bool,
    model_updated: bool,
    train_loss: Option<f64>,
    train_accuracy: Option<f64>,
    test_accuracy: Option<f64>,
    test_loss: Option<f64>,
    /// Two-class models: ROC AUC and F1 of class 1 on the test set.
    #[serde(skip_serializing_if = "Option::is_none")]
    test_auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    test_f1: Option<f64>,
    federated_accuracy: Option<f64>,
    federated_loss: Option<f64>,
    federated_examples: Option<u64>,
    seconds: f64,
    epsilon: Option<f64>,
    delta: Option<f64>,
    dp_mode: DpMode,
    noise_multiplier: Option<f64>,
    clip_norm: Option<f64>,
    clipped_fraction: Option<f64>,
    max_client_epsilon: Option<f64>,
    rejected: std::collections::BTreeMap<&'static str, u64>,
    norm_exceeded: u64,
    failures: Vec<String>,
}

/// What the status page records about a node that joined.
struct Joined {
    remote: SocketAddr,
    software: String,
    cert_expires: Option<i64>,
}

enum Event {
    Connected {
        node: NodeId,
        conn: quinn::Connection,
        info: NodeInfo,
        /// Certificate fingerprint (for re-checking the deny list).
        cert: String,
        /// What the status page shows about it.
        seen: Joined,
    },
    Disconnected {
        node: NodeId,
        id: usize,
        reason: String,
    },
    Response {
        node: NodeId,
        /// Round of the request this answers.
        round: u64,
        result: Result<Message, (&'static str, String)>,
    },
}

/// Centralised evaluation on its own thread (libtorch tensors are not `Sync`).
struct Evaluator {
    tx: std::sync::mpsc::Sender<EvalJob>,
}

/// One centralised evaluation: accuracy, loss and, for two-class models, AUC and F1 of
/// class 1.
#[derive(Debug, Clone, Copy)]
struct CentralEval {
    accuracy: f64,
    loss: f64,
    auc: Option<f64>,
    f1: Option<f64>,
}

/// Parameters to evaluate and where to send the result.
type EvalJob = (Arc<Vec<f32>>, oneshot::Sender<Option<CentralEval>>);

impl Evaluator {
    fn start(
        spec: &ModelSpec,
        data: dpfl_ml::Dataset,
        threads: usize,
    ) -> Result<Self, ServerError> {
        let (tx, rx) = std::sync::mpsc::channel::<EvalJob>();
        let spec = spec.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("evaluator".into())
            .spawn(move || {
                dpfl_ml::model::set_threads(threads);
                let device = tch::Device::Cpu;
                let setup = DeviceData::new(&data, &spec, device)
                    .and_then(|d| Mlp::new(&spec, device).map(|m| (d, m)));
                let (dd, mut mlp) = match setup {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                while let Ok((params, reply)) = rx.recv() {
                    let out = mlp.evaluate(&dd, &params).ok().map(|e| {
                        let mut c = CentralEval {
                            accuracy: e.accuracy,
                            loss: e.loss,
                            auc: None,
                            f1: None,
                        };
                        if spec.outputs() == 2 {
                            let model = dpfl_ml::predict::ModelFile {
                                spec: spec.clone(),
                                params: params.to_vec(),
                                standardizer: None,
                                class_names: Vec::new(),
                                feature_names: Vec::new(),
                            };
                            // The evaluator's own network: a module file is not read again.
                            if let Ok(p) = dpfl_ml::predict::predict_with(&mut mlp, &model, &data) {
                                let s = dpfl_ml::predict::score(&p, &data.labels);
                                (c.auc, c.f1) = (s.auc, s.f1);
                            }
                        }
                        c
                    });
                    let _ = reply.send(out);
                }
            })
            .map_err(|e| ServerError::Data(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|e| ServerError::Data(e.to_string()))?
            .map_err(ServerError::Data)?;
        Ok(Self { tx })
    }

    async fn evaluate(&self, params: Arc<Vec<f32>>) -> Option<CentralEval> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((params, tx)).ok()?;
        rx.await.ok().flatten()
    }
}

/// Watches for a model that does not learn (issue 15: unscaled features kept an MLP at
/// loss 0.6934 with no warning): after three rounds at chance level, one warning.
struct ChanceWatch {
    train_losses: Vec<f64>,
    test_losses: Vec<f64>,
    accuracies: Vec<f64>,
    /// Loss of knowing only the class frequencies (test labels; else `ln(classes)`).
    chance: f64,
    /// Share of the most frequent test class (0 without test data).
    majority: f64,
    warned: bool,
}

impl ChanceWatch {
    fn new(classes: usize, test_labels: Option<&[i64]>) -> Self {
        let (chance, majority) = match test_labels {
            Some(l) if !l.is_empty() => {
                let mut counts = vec![0.0; classes];
                for y in l {
                    if let Some(c) = counts.get_mut(*y as usize) {
                        *c += 1.0;
                    }
                }
                let top = counts.iter().cloned().fold(0.0, f64::max);
                (
                    dpfl_ml::standardize::chance_loss(&counts),
                    top / l.len() as f64,
                )
            }
            _ => ((classes.max(1) as f64).ln(), 0.0),
        };
        Self {
            train_losses: Vec::new(),
            test_losses: Vec::new(),
            accuracies: Vec::new(),
            chance,
            majority,
            warned: false,
        }
    }

    /// Records a round; returns the warning the first time the model looks stuck.
    fn observe(&mut self, train_loss: Option<f64>, test: Option<(f64, f64)>) -> Option<String> {
        self.train_losses.extend(train_loss);
        if let Some((acc, loss)) = test {
            self.accuracies.push(acc);
            self.test_losses.push(loss);
        }
        if self.warned {
            return None;
        }
        let w = dpfl_ml::standardize::chance_level_warning(
            &self.test_losses,
            &self.accuracies,
            self.chance,
            self.majority,
            3,
        )
        .or_else(|| {
            dpfl_ml::standardize::chance_level_warning(&self.train_losses, &[], self.chance, 0.0, 3)
        });
        self.warned = w.is_some();
        w
    }
}

/// A bound server, ready to run.
pub struct Server {
    cfg: ServerConfig,
    /// The model, resolved once at bind (a TorchScript module file is not read again for
    /// it, so a file changed mid-run changes nothing the run agreed).
    spec: ModelSpec,
    /// The largest message read from a node, for `spec`.
    message_limit: usize,
    endpoint: quinn::Endpoint,
    coordinator: Coordinator,
    evaluator: Option<Evaluator>,
    /// Losses and accuracies so far, for the chance-level warning.
    progress: ChanceWatch,
    /// Class and feature names of a CSV test table, saved with the model for inference.
    names: (Vec<String>, Vec<String>),
    /// The federation's class names (the test table's, else the first node's), durable.
    classes: Arc<crate::classes::FederationClasses>,
    observer: Option<mpsc::UnboundedSender<ObservedUpdate>>,
    stats_observer: Option<mpsc::UnboundedSender<ObservedStats>>,
    out: PathBuf,
    pins: Arc<Mutex<Pins>>,
    /// Releases of the ledger already on disk (`None`: not written yet by this process).
    ledger_persisted: Option<usize>,
    fault_abort_after: Option<u64>,
    /// Live status and metrics (served over HTTP when `http_listen` is set).
    obs: Arc<Observatory>,
    /// The status endpoint's socket, bound at `bind` so that its address is known.
    http: Option<std::net::TcpListener>,
    /// Which connection holds each identity.
    seats: Arc<Seats>,
    /// Bytes of stage message the open secure-aggregation stage allows in an answer.
    secagg_answer_limit: usize,
    /// The statistics exchange before round 1 (`[standardize]`): joining nodes wait here
    /// until they applied the agreed transform, then join the coordinator.
    prep: Option<crate::prep::StatsExchange>,
    /// Raw test data kept until the transform is agreed (the evaluator starts then).
    test_raw: Option<dpfl_ml::Dataset>,
    /// Noise of the statistics' release in `central` mode (the OS CSPRNG).
    stats_noise: Box<dyn GaussianNoise>,
}

/// The agreed standardisation as saved in `standardize.json` (before it leaves the server;
/// a resumed run sends the same one).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AgreedFile {
    /// The transform.
    standardizer: dpfl_ml::standardize::Standardizer,
    /// How many nodes' statistics it combines.
    contributors: usize,
    /// Noise multiplier of its release (DP on), else `None`.
    noise_multiplier: Option<f64>,
}

fn io_err(e: impl std::fmt::Display) -> ServerError {
    ServerError::Io(e.to_string())
}

impl Server {
    /// Validates the configuration, loads test data and any checkpoint, and binds.
    pub fn bind(cfg: ServerConfig) -> Result<Self, ServerError> {
        let noise: Box<dyn GaussianNoise> = match cfg.noise_sampler.as_str() {
            "grid" => Box::new(dpfl_common::dp::GridGaussian::default()),
            _ => Box::new(OpenDpGaussian::default()),
        };
        Self::bind_with_noise(cfg, noise)
    }

    /// As [`Server::bind`] with a given noise source (tests; deployments use opendp).
    pub fn bind_with_noise(
        cfg: ServerConfig,
        noise: Box<dyn GaussianNoise>,
    ) -> Result<Self, ServerError> {
        let spec = cfg.validated_spec()?;
        let strategy = strategy::build(
            cfg.strategy.clone(),
            cfg.train.clone(),
            cfg.dp,
            spec.num_params(),
            noise,
        )
        .map_err(ServerError::Strategy)?;
        Self::bind_resolved(cfg, spec, strategy)
    }

    /// As [`Server::bind`] with a user-defined [`Strategy`] (see `examples/`). The
    /// configuration's `strategy` and `train` sections are then only read for
    /// `min_fit_clients`; the strategy decides everything else. With DP on, wrap it in
    /// [`strategy::LocalDp`] or [`strategy::CentralDp`] so the ledger has a record.
    pub fn bind_with_strategy(
        cfg: ServerConfig,
        strategy: Box<dyn Strategy>,
    ) -> Result<Self, ServerError> {
        let spec = cfg.validated_spec()?;
        Self::bind_resolved(cfg, spec, strategy)
    }

    /// Binds with the spec `cfg` was validated against (the only one this server uses).
    fn bind_resolved(
        cfg: ServerConfig,
        spec: ModelSpec,
        strategy: Box<dyn Strategy>,
    ) -> Result<Self, ServerError> {
        std::fs::create_dir_all(&cfg.out_dir).map_err(io_err)?;
        let ckpt = cfg.out_dir.join("checkpoint.bin");
        if !cfg.resume {
            set_aside_previous_run(&cfg.out_dir)?;
        }
        let snapshot = match cfg.resume {
            true => checkpoint::load(&ckpt, &cfg.fingerprint())?,
            false => None,
        };
        // A ledger journaled before a release that the checkpoint never saw (the process
        // died between the two writes) is the truth: those releases happened. A journal
        // that does not fit the checkpoint (another run's) stops the server rather than
        // being ignored.
        let journal = match cfg.resume {
            true => read_ledger_journal(&cfg.out_dir)?,
            false => None,
        };
        // Read only when no checkpoint takes its place (a resumed run needs no init file).
        let initial = || -> Result<_, ServerError> {
            if let Some(p) = &cfg.model.init_model {
                tracing::info!("warm start from {}", p.display());
            }
            Ok(Coordinator::initial_snapshot(
                cfg.model.initial_params(&spec)?,
                &cfg.dp,
            ))
        };
        let snapshot = match (snapshot, journal) {
            (Some(mut s), Some(journal)) => {
                if journal.extends(&s.ledger) {
                    if journal.rounds.len() > s.ledger.rounds.len() {
                        tracing::warn!(
                            checkpointed = s.ledger.rounds.len(),
                            journaled = journal.rounds.len(),
                            "the ledger journal records releases after the last checkpoint \
                             (a crash between release and checkpoint); they stay charged"
                        );
                        s.ledger = journal;
                    }
                } else if !s.ledger.extends(&journal) {
                    return Err(ServerError::Io(format!(
                        "{}: the ledger journal does not match the checkpoint (another run's?); \
                         refusing to resume with an uncertain ledger: move both aside or use \
                         --fresh",
                        cfg.out_dir.join("operator").join("ledger.json").display()
                    )));
                }
                s
            }
            (None, Some(journal)) if !journal.rounds.is_empty() => {
                if journal.mode != cfg.dp.mode || journal.delta != cfg.dp.delta {
                    return Err(ServerError::Io(format!(
                        "{}: a ledger of another configuration is in the way; move it aside or \
                         use --fresh",
                        cfg.out_dir.join("operator").join("ledger.json").display()
                    )));
                }
                tracing::warn!(
                    journaled = journal.rounds.len(),
                    "no checkpoint, but the ledger journal records releases: they stay charged \
                     and training starts again from the initial model"
                );
                let mut s = initial()?;
                s.ledger = journal;
                s
            }
            (Some(s), _) => s,
            (None, _) => initial()?,
        };
        if snapshot.completed_rounds > 0 {
            tracing::info!(
                completed = snapshot.completed_rounds,
                epsilon = snapshot.ledger.epsilon(),
                "resuming from {}",
                ckpt.display()
            );
        }
        let secagg_id_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let ccfg = CoordinatorConfig {
            rounds: cfg.rounds,
            min_clients: cfg.min_clients,
            min_fit_clients: cfg.strategy.min_fit_clients,
            round_timeout: cfg.round_timeout(),
            eval_timeout: Duration::from_secs_f64(cfg.eval_timeout_secs),
            max_round_retries: cfg.max_round_retries,
            // Deployments always draw selection from the OS CSPRNG.
            selection: Selection::Os,
            limits: cfg.update_limits,
            spec: spec.clone(),
            dp: cfg.dp,
            // Protocol round ids start from the clock, so that a restarted server never
            // asks nodes for an id they have seen (they would refuse it).
            // The statistics' instances (`[standardize]`) take the first
            // `STATS_ROUND_IDS` ids, so ids increase on every node from the statistics to
            // the training rounds.
            secure_aggregation: cfg.secure_aggregation.then(|| {
                let distributed = (cfg.dp.mode == DpMode::Distributed)
                    .then(|| cfg.secagg.distributed(cfg.strategy.min_fit_clients));
                cfg.secagg
                    .settings(secagg_id_base + STATS_ROUND_IDS, distributed)
            }),
        };
        log_privacy_plan(&cfg, &spec);
        let coordinator =
            Coordinator::new(ccfg, strategy, snapshot).map_err(ServerError::Strategy)?;
        let mut progress = ChanceWatch::new(spec.outputs(), None);
        let mut names = (Vec::new(), Vec::new());
        let evaluator = match &cfg.test_data {
            Some(src) => {
                let src: DataSource = src
                    .parse()
                    .map_err(|e: dpfl_ml::data::DataError| ServerError::Data(e.to_string()))?;
                let table = src
                    .load_table()
                    .map_err(|e| ServerError::Data(e.to_string()))?;
                names = (table.class_names, table.feature_names);
                let mut data = table.data;
                if !cfg.standardize.enabled && data.features.iter().any(|v| v.is_nan()) {
                    return Err(ServerError::Data(format!(
                        "test data {src} has missing values (missing=mean), which only \
                         federated standardisation imputes; fill or drop them first"
                    )));
                }
                if let Some(n) = cfg.test_limit {
                    data = data.take(n);
                }
                progress = ChanceWatch::new(spec.outputs(), Some(&data.labels));
                Some(data)
            }
            None => None,
        };
        let classes = crate::classes::FederationClasses::open(
            cfg.out_dir
                .join("operator")
                .join(crate::classes::CLASSES_FILE),
            names.0.clone(),
            cfg.resume,
        )
        .map_err(|e| ServerError::Io(e.to_string()))?;
        let (prep, test_raw, evaluator) = match (cfg.standardize.enabled, evaluator) {
            (false, data) => (
                None,
                None,
                data.map(|d| Evaluator::start(&spec, d, cfg.eval_threads))
                    .transpose()?,
            ),
            (true, data) => {
                let settings = exchange_settings(&cfg, &spec, secagg_id_base)?;
                let path = cfg.out_dir.join(STANDARDIZE_FILE);
                match read_agreed(&path, cfg.resume, &settings)? {
                    Some(s) => {
                        tracing::info!(
                            "resuming with the agreed standardisation of {}",
                            path.display()
                        );
                        let ev = match data {
                            Some(mut d) => {
                                s.apply(&mut d)
                                    .map_err(|e| ServerError::Data(e.to_string()))?;
                                Some(Evaluator::start(&spec, d, cfg.eval_threads)?)
                            }
                            None => None,
                        };
                        (
                            Some(crate::prep::StatsExchange::resumed(settings, s)),
                            None,
                            ev,
                        )
                    }
                    None => (Some(crate::prep::StatsExchange::new(settings)), data, None),
                }
            }
        };
        let stats_noise: Box<dyn GaussianNoise> = match cfg.noise_sampler.as_str() {
            "grid" => Box::new(dpfl_common::dp::GridGaussian::default()),
            _ => Box::new(OpenDpGaussian::default()),
        };
        let creds = Credentials::server(&Layout::new(&cfg.certs_dir));
        // Before admission a peer may send only what a hello needs (see `serve_connection`).
        let message_limit = cfg.message_limit_for(&spec);
        let windows = dpfl_certs::quic::Windows::for_messages(message_limit as u64)
            .with_connection(wire::HELLO_WINDOW_BYTES as u64);
        let endpoint = dpfl_certs::quic::server_endpoint(
            &creds,
            wire::ALPN,
            cfg.listen,
            Duration::from_secs_f64(cfg.idle_timeout_secs),
            windows,
        )?;
        let pins = Pins::open(&cfg.out_dir.join("identities.json"))
            .map_err(|e| ServerError::Io(e.to_string()))?;
        let obs = Observatory::new(cfg.rounds, cfg.min_clients, cfg.dp.mode.to_string());
        {
            let mut st = obs.status();
            st.warnings = credential_warnings(&cfg);
            st.completed_rounds = coordinator.completed_rounds();
            st.round = coordinator.completed_rounds() + 1;
            if cfg.dp.mode.is_private() {
                st.epsilon = Some(coordinator.ledger().epsilon());
                st.target_epsilon = cfg.dp.target_epsilon;
                st.delta = Some(cfg.dp.delta);
            }
        }
        if let Some(t) = cfg.dp.target_epsilon.filter(|_| cfg.dp.mode.is_private()) {
            obs.metrics.epsilon_target.set(t);
        }
        let http = match cfg.http_listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| ServerError::Io(format!("status endpoint {addr}: {e}")))?;
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        "the status endpoint listens on {addr}, not on loopback: it shows \
                         operator-only data (participants, failures, timings) to anyone who \
                         can reach it; prefer 127.0.0.1 and an SSH tunnel"
                    );
                }
                Some(l)
            }
            None => None,
        };
        let fault_abort_after = std::env::var(FAULT_ENV).ok().and_then(|v| {
            v.strip_prefix("abort-after-release:")
                .and_then(|n| n.parse().ok())
        });
        Ok(Self {
            out: cfg.out_dir.clone(),
            ledger_persisted: None,
            cfg,
            spec,
            message_limit,
            endpoint,
            coordinator,
            evaluator,
            progress,
            names,
            classes: Arc::new(classes),
            observer: None,
            stats_observer: None,
            pins: Arc::new(Mutex::new(pins)),
            fault_abort_after,
            obs,
            http,
            seats: Arc::new(Seats::default()),
            secagg_answer_limit: 0,
            prep,
            test_raw,
            stats_noise,
        })
    }

    /// The status endpoint's address, when `http_listen` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Live status and metrics (what the status endpoint serves).
    pub fn observatory(&self) -> Arc<Observatory> {
        self.obs.clone()
    }

    /// The model this server trains, resolved once at bind.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.endpoint.local_addr().map_err(io_err)
    }

    /// Test hook: every update as received, before validation.
    pub fn observe_updates(&mut self) -> mpsc::UnboundedReceiver<ObservedUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.observer = Some(tx);
        rx
    }

    /// Every `Stats` report the server receives, before validation (tests: with secure
    /// aggregation none arrives).
    pub fn observe_statistics(&mut self) -> mpsc::UnboundedReceiver<ObservedStats> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.stats_observer = Some(tx);
        rx
    }

    /// Runs until training finishes or `shutdown` resolves. On shutdown the current write
    /// completes, connections close (clients keep retrying), and the checkpoint of the
    /// last completed round stays for a restart.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<RunSummary, ServerError> {
        let started = Instant::now();
        let spec = self.spec.clone();
        let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(4096);
        let conns = Arc::new(Semaphore::new(self.cfg.admission.max_connections));
        let accept = tokio::spawn(accept_loop(
            self.endpoint.clone(),
            self.cfg.clone(),
            spec.clone(),
            ev_tx.clone(),
            conns,
            Shared {
                pins: self.pins.clone(),
                obs: self.obs.clone(),
                seats: self.seats.clone(),
                classes: self.classes.clone(),
            },
        ));
        let (http_stop, http_task) = self.serve_http();
        tokio::pin!(shutdown);
        if let Some(reason) = self.coordinator.nothing_to_do() {
            let r = self
                .linger_complete(reason, &mut ev_rx, &mut shutdown)
                .await;
            accept.abort();
            let _ = http_stop.send(());
            if let Some(t) = http_task {
                let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
            }
            self.endpoint.close(0u32.into(), b"run already complete");
            return Err(r);
        }
        let mut registry: HashMap<NodeId, quinn::Connection> = HashMap::new();
        // Certificate fingerprint of each connected node, for re-checking revocation.
        let mut certs: HashMap<NodeId, String> = HashMap::new();
        let mut admission_tick = tokio::time::interval(Duration::from_secs(2));
        admission_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let log_every = Duration::from_secs_f64(self.cfg.status_log_secs);
        let mut status_tick =
            tokio::time::interval_at((Instant::now() + log_every).into(), log_every);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The status page follows the coordinator at once when a round changes and at most
        // every 200 ms otherwise (one answer at a time would copy the pending list for each
        // answer: quadratic in the number of nodes).
        let mut refresh = tokio::time::interval(Duration::from_millis(200));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_dirty = false;
        let mut summary = RunSummary {
            rounds_completed: self.coordinator.completed_rounds(),
            rounds_run: 0,
            finish: None,
            test_accuracy: None,
            test_loss: None,
            test_auc: None,
            test_f1: None,
            best_test_accuracy: None,
            ledger: self.coordinator.ledger().clone(),
            seconds: 0.0,
            rejected: HashMap::new(),
            audit: None,
        };
        let open_append = |path: PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_err)
        };
        std::fs::create_dir_all(self.out.join("operator")).map_err(io_err)?;
        let mut metrics = Outputs {
            public: open_append(self.out.join("metrics.jsonl"))?,
            operator: open_append(self.out.join("operator").join("metrics.jsonl"))?,
        };
        tracing::info!(
            addr = %self.local_addr()?,
            model = %spec,
            spec = %short_hex(&spec.hash()),
            dp = %self.cfg.dp.mode,
            rounds = self.cfg.rounds,
            "server listening; waiting for {} clients{}",
            self.cfg.min_clients,
            self.http_addr()
                .map_or(String::new(), |a| format!("; status page http://{a}/"))
        );
        let mut finished = false;
        // When each round's first requests went out: a round's `seconds` runs from there to
        // the moment its aggregate is ready (central noise included), whatever the
        // coordinator's event timestamps say.
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        while !finished {
            // Act on everything the coordinator wants first.
            // Requests go out before the bookkeeping of the round that just closed
            // (centralised evaluation, metrics, checkpoint), so that work overlaps the
            // clients' training instead of delaying the next round.
            let mut actions: Vec<Action> =
                std::iter::from_fn(|| self.coordinator.poll_action()).collect();
            let acted = !actions.is_empty();
            actions.sort_by_key(|a| match a {
                Action::Train { .. }
                | Action::Evaluate { .. }
                | Action::SecAgg { .. }
                | Action::RoundRetried { .. } => 0,
                Action::RoundCompleted(_) => 1,
                Action::Finish { .. } => 2,
            });
            // No model leaves before the ledger that accounts for it is on disk (the
            // checkpoint may follow; the ledger write is small).
            self.persist_ledger()?;
            if actions.iter().any(|a| matches!(a, Action::Train { .. })) {
                // Revocation takes effect before a round's requests go out.
                self.enforce_admission(&mut registry, &mut certs);
            }
            for action in actions {
                match action {
                    Action::Train {
                        round,
                        nodes,
                        request,
                        params,
                    } => {
                        sent_at.entry(round).or_insert_with(Instant::now);
                        let bytes = Arc::new(wire::encode(&Header::Train(request), &params));
                        let deadline = self.cfg.round_timeout() + Duration::from_secs(5);
                        let state = self.coordinator.round_state();
                        tracing::info!(
                            "round {round}/{} started (attempt {}): {} of {} connected nodes \
                             selected; deadline in {}{}",
                            self.cfg.rounds,
                            state.attempt.max(1),
                            nodes.len(),
                            registry.len(),
                            crate::status::human_secs(self.cfg.round_timeout_secs),
                            self.eta_line(None)
                        );
                        self.obs
                            .metrics
                            .bytes_out
                            .inc_by((bytes.len() * nodes.len()) as u64);
                        self.mark_nodes(&nodes, "training");
                        for n in nodes {
                            self.send_request(
                                &registry,
                                &n,
                                round,
                                bytes.clone(),
                                deadline,
                                &ev_tx,
                            );
                        }
                    }
                    Action::Evaluate {
                        nodes,
                        request,
                        params,
                    } => {
                        let round = request.round;
                        let bytes = Arc::new(wire::encode(&Header::Evaluate(request), &params));
                        let deadline = Duration::from_secs_f64(self.cfg.eval_timeout_secs)
                            + Duration::from_secs(5);
                        self.obs
                            .metrics
                            .bytes_out
                            .inc_by((bytes.len() * nodes.len()) as u64);
                        self.mark_nodes(&nodes, "evaluating");
                        for n in nodes {
                            self.send_request(
                                &registry,
                                &n,
                                round,
                                bytes.clone(),
                                deadline,
                                &ev_tx,
                            );
                        }
                    }
                    Action::SecAgg {
                        round,
                        stage,
                        answer_limit,
                        messages,
                    } => {
                        self.secagg_answer_limit = answer_limit;
                        tracing::info!(
                            "round {round}: secure aggregation stage {stage} ({} nodes)",
                            messages.len()
                        );
                        self.send_stage(&registry, round, answer_limit, messages, &ev_tx);
                    }
                    Action::RoundRetried {
                        round,
                        attempt,
                        accepted,
                        quorum,
                    } => {
                        tracing::warn!(
                            round,
                            attempt,
                            accepted,
                            quorum,
                            "round missed its quorum; selecting again"
                        );
                    }
                    Action::RoundCompleted(report) => {
                        for (k, v) in &report.rejected {
                            *summary.rejected.entry(k.to_string()).or_default() += v;
                        }
                        let started = sent_at.remove(&report.round);
                        if self.fault_abort_after == Some(report.round) {
                            tracing::error!(
                                round = report.round,
                                "{FAULT_ENV}: aborting after the release, before the checkpoint"
                            );
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            std::process::abort();
                        }
                        summary.rounds_run += 1;
                        self.complete_round(*report, started, &mut metrics, &mut summary)
                            .await?;
                    }
                    Action::Finish {
                        reason,
                        rounds_completed,
                    } => {
                        tracing::info!(rounds_completed, "training finished: {reason}");
                        summary.finish = Some(reason.to_string());
                        summary.rounds_completed = rounds_completed;
                        self.obs.status().finish = Some(reason.to_string());
                        tell_finish(&registry, &reason.to_string(), rounds_completed).await;
                        finished = true;
                    }
                }
            }
            if acted {
                self.sync_status(&sent_at);
                status_dirty = false;
            }
            if finished {
                break;
            }
            let wake = match (
                self.coordinator.poll_timeout(),
                self.prep.as_ref().and_then(|x| x.poll_timeout()),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                ev = ev_rx.recv() => {
                    let Some(ev) = ev else { break };
                    self.handle_event(ev, &mut registry, &mut certs);
                    self.pump_prep(&registry, &ev_tx)?;
                    status_dirty = true;
                }
                _ = admission_tick.tick() => {
                    self.enforce_admission(&mut registry, &mut certs);
                    status_dirty = true;
                }
                _ = status_tick.tick() => {
                    self.log_waiting(&registry, &sent_at);
                }
                _ = refresh.tick(), if status_dirty => {
                    self.sync_status(&sent_at);
                    status_dirty = false;
                }
                _ = sleep_until(wake) => {
                    self.coordinator.handle_timeout(Instant::now());
                    self.pump_prep(&registry, &ev_tx)?;
                    status_dirty = true;
                }
                _ = &mut shutdown => {
                    tracing::info!("shutdown requested; closing connections (clients will retry)");
                    self.coordinator.shutdown();
                    break;
                }
            }
        }
        accept.abort();
        summary.ledger = self.coordinator.ledger().clone();
        summary.seconds = started.elapsed().as_secs_f64();
        // A run is never overwritten by a process that ran no round (a restart that was
        // stopped before its first round): its summary and model stay as they were.
        let keep_previous = summary.rounds_run == 0 && self.out.join("summary.json").exists();
        if keep_previous {
            tracing::warn!(
                "no round ran in this process; {} and the model are left as they were",
                self.out.join("summary.json").display()
            );
        } else {
            self.write_final_outputs(&spec, &mut summary)?;
        }
        self.persist_ledger()?;
        {
            let mut st = self.obs.status();
            st.phase = "finished".into();
            st.waiting_for.clear();
            st.deadline = None;
        }
        // Give Finish messages a moment to be delivered before closing.
        if finished {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.endpoint.close(0u32.into(), b"training finished");
        } else {
            self.endpoint.close(1u32.into(), b"server shutting down");
        }
        let _ = http_stop.send(());
        if let Some(t) = http_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle())
            .await
            .ok();
        Ok(summary)
    }

    /// Writes a model file into the output folder, with the class and feature names of a
    /// CSV test table (so `dpfl-predict` names its classes).
    fn save_model(&self, params: &[f32], file: &str) -> Result<(), ServerError> {
        dpfl_ml::predict::ModelFile {
            spec: self.spec.clone(),
            params: params.to_vec(),
            standardizer: self.prep.as_ref().and_then(|x| x.agreed().cloned()),
            class_names: self.names.0.clone(),
            feature_names: self.names.1.clone(),
        }
        .save(&self.out.join(file))
        .map_err(|e| ServerError::Io(format!("saving {file}: {e}")))
    }

    /// The final model, the audit and the summaries (public and operator).
    fn write_final_outputs(
        &mut self,
        spec: &ModelSpec,
        summary: &mut RunSummary,
    ) -> Result<(), ServerError> {
        let global = self.coordinator.global().clone();
        self.save_model(&global, "model.safetensors")?;
        if self.cfg.dp.audit_canaries > 0 {
            let init = self.cfg.model.initial_params(spec)?;
            summary.audit = self.coordinator.audit(&init);
            if let Some(a) = &summary.audit {
                let fmt = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.3}"));
                let line = format!(
                    "privacy audit ({} canaries in, {} out): theoretical epsilon {}, empirical \
                     estimate {} (final model), one-run lower bound {:.3} at {:.0} % confidence",
                    a.seen,
                    a.unseen,
                    fmt(a.theoretical),
                    fmt(a.epsilon_estimate),
                    a.epsilon_lower_bound,
                    a.confidence * 100.0
                );
                if a.flagged {
                    tracing::error!("{line}: FLAGGED, the noise does not protect as claimed");
                } else {
                    tracing::info!("{line}");
                }
            }
        }
        write_json(&self.out.join("operator").join("summary.json"), summary)?;
        if self.cfg.dp.mode.is_private() {
            write_json(
                &self.out.join("summary.json"),
                &PublicSummary {
                    rounds_completed: summary.rounds_completed,
                    finish: &summary.finish,
                    test_accuracy: summary.test_accuracy,
                    test_loss: summary.test_loss,
                    ledger: summary.ledger.public(),
                    audit: summary.audit,
                },
            )?;
            tracing::info!("{}", summary.ledger.summary());
        } else {
            write_json(&self.out.join("summary.json"), summary)?;
        }
        Ok(())
    }

    /// A run with nothing left to do: say so, leave its outputs alone, tell nodes that
    /// connect within `finished_linger_secs` that training is over, then report the error.
    async fn linger_complete(
        &mut self,
        reason: FinishReason,
        ev_rx: &mut mpsc::Receiver<Event>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> ServerError {
        let done = self.coordinator.completed_rounds();
        let why = match &reason {
            FinishReason::Completed => format!(
                "the run in {} is complete: {done} of {} rounds (see summary.json)",
                self.out.display(),
                self.cfg.rounds
            ),
            other => format!(
                "the run in {} has nothing left to do after {done} rounds: {other}",
                self.out.display()
            ),
        };
        let how = match &reason {
            FinishReason::Completed => {
                "nothing was changed. Start a new run with --fresh (replaces it) or --out \
                 NEW_DIR, or raise --rounds to continue this one"
            }
            FinishReason::BudgetReached { .. } => {
                "nothing was changed. The target epsilon allows no further release: raise \
                 dp.target_epsilon (--target-epsilon) to continue, or start a new run with \
                 --fresh or --out NEW_DIR"
            }
        };
        tracing::warn!("{why}; {how}");
        let tell = format!("run already complete: {why}");
        {
            let mut st = self.obs.status();
            st.phase = "complete".into();
            st.finish = Some(tell.clone());
        }
        let linger = tokio::time::sleep(Duration::from_secs_f64(self.cfg.finished_linger_secs));
        tokio::pin!(linger);
        loop {
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(Event::Connected { node, conn, .. }) => {
                        tracing::info!(%node, "telling a connecting node that the run is complete");
                        let one = HashMap::from([(node, conn)]);
                        tell_finish(&one, &tell, done).await;
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = &mut linger => break,
                _ = shutdown.as_mut() => break,
            }
        }
        ServerError::AlreadyComplete(format!("{why}; {how}"))
    }

    /// Starts the status endpoint, if configured; returns its stop switch and task.
    fn serve_http(&mut self) -> (oneshot::Sender<()>, Option<tokio::task::JoinHandle<()>>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let Some(listener) = self.http.take() else {
            return (stop, None);
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("status endpoint: {e}");
                return (stop, None);
            }
        };
        if let Ok(a) = listener.local_addr() {
            tracing::info!(
                "status endpoint on http://{a}/ (dashboard), /status (JSON), /metrics \
                 (Prometheus); it shows operator-only data"
            );
        }
        let app = crate::status::router(self.obs.clone());
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("status endpoint: {e}");
            }
        });
        (stop, Some(task))
    }

    /// Marks nodes' state on the status page.
    fn mark_nodes(&self, nodes: &[NodeId], state: &str) {
        let mut st = self.obs.status();
        for n in nodes {
            if let Some(s) = st.nodes.get_mut(n) {
                s.state = state.to_string();
            }
        }
    }

    /// "; ETA of the run 4 min" from the rounds so far.
    fn eta_line(&self, open_for: Option<f64>) -> String {
        let st = self.obs.status();
        let left = self
            .cfg
            .rounds
            .saturating_sub(self.coordinator.completed_rounds());
        crate::status::eta(&st.history, left, open_for).map_or(String::new(), |e| {
            format!("; ETA of the run {}", crate::status::human_secs(e))
        })
    }

    /// Brings the status page in line with the coordinator.
    fn sync_status(&self, sent_at: &HashMap<u64, Instant>) {
        let r = self.coordinator.round_state();
        let open_for = sent_at.get(&r.round).map(|t| t.elapsed().as_secs_f64());
        let left = self
            .cfg
            .rounds
            .saturating_sub(self.coordinator.completed_rounds());
        let mut st = self.obs.status();
        st.phase = serde_json::to_value(r.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        st.round = r.round;
        st.attempt = r.attempt;
        st.selected = r.selected;
        st.waiting_for = r.pending;
        st.deadline = r.deadline.map(crate::status::unix_at);
        st.completed_rounds = self.coordinator.completed_rounds();
        st.eta_secs = crate::status::eta(&st.history, left, open_for);
        self.obs.metrics.round.set(r.round as i64);
        self.obs.metrics.selected.set(r.selected as i64);
        self.obs.metrics.connected.set(st.nodes.len() as i64);
    }

    /// The periodic line: whom the open round (or the next start) is waiting for.
    fn log_waiting(
        &self,
        registry: &HashMap<NodeId, quinn::Connection>,
        sent_at: &HashMap<u64, Instant>,
    ) {
        let r = self.coordinator.round_state();
        let list = |v: &[NodeId]| {
            let mut names: Vec<&str> = v.iter().map(String::as_str).take(10).collect();
            if v.len() > 10 {
                names.push("...");
            }
            names.join(", ")
        };
        match r.phase {
            RoundPhase::Training | RoundPhase::SecureAggregation | RoundPhase::Evaluating => {
                let open_for = sent_at.get(&r.round).map(|t| t.elapsed().as_secs_f64());
                let left = r
                    .deadline
                    .map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64())
                    .unwrap_or(0.0);
                tracing::info!(
                    "round {}/{} ({}, attempt {}): waiting for {} of {} selected nodes: {}; \
                     deadline in {}{}",
                    r.round,
                    self.cfg.rounds,
                    r.phase,
                    r.attempt,
                    r.pending.len(),
                    r.selected,
                    list(&r.pending),
                    crate::status::human_secs(left),
                    self.eta_line(open_for)
                );
            }
            RoundPhase::WaitingForClients => {
                let mut connected: Vec<NodeId> = registry.keys().cloned().collect();
                connected.sort();
                tracing::info!(
                    "round {} waits for clients: {} of {} (min_clients) connected{}{}",
                    r.round,
                    connected.len(),
                    self.cfg.min_clients,
                    if connected.is_empty() { "" } else { ": " },
                    list(&connected)
                );
            }
            RoundPhase::Starting | RoundPhase::Finished => {}
        }
    }

    /// Writes the ledger (full, operator-only, and its public view) if it has releases not
    /// yet on disk. Called before anything that carries a model leaves the server.
    fn persist_ledger(&mut self) -> Result<(), ServerError> {
        let ledger = self.coordinator.ledger();
        if self.ledger_persisted == Some(ledger.rounds.len()) {
            return Ok(());
        }
        write_json(&self.out.join("operator").join("ledger.json"), ledger)?;
        if self.cfg.dp.mode.is_private() {
            write_json(&self.out.join("ledger.json"), &ledger.public())?;
        } else {
            write_json(&self.out.join("ledger.json"), ledger)?;
        }
        self.ledger_persisted = Some(ledger.rounds.len());
        Ok(())
    }

    /// Re-reads the allow/deny lists and disconnects connected nodes that are no longer
    /// admitted (revocation must not wait for a node to reconnect).
    fn enforce_admission(
        &mut self,
        registry: &mut HashMap<NodeId, quinn::Connection>,
        certs: &mut HashMap<NodeId, String>,
    ) {
        if registry.is_empty() {
            return;
        }
        let lists = match Lists::load(&self.cfg.admission) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot re-check admission of connected nodes: {e}");
                return;
            }
        };
        let revoked: Vec<(NodeId, AdmissionError)> = registry
            .keys()
            .filter_map(|n| {
                let fp = certs.get(n).map(String::as_str).unwrap_or("");
                lists.admit(n, fp).err().map(|e| (n.clone(), e))
            })
            .collect();
        let now = Instant::now();
        for (node, why) in revoked {
            tracing::warn!(%node, "disconnecting a connected node: {why}");
            if let Some(conn) = registry.remove(&node) {
                conn.close(4u32.into(), b"revoked");
            }
            certs.remove(&node);
            self.coordinator.handle_disconnect(&node, now);
        }
    }

    fn handle_event(
        &mut self,
        ev: Event,
        registry: &mut HashMap<NodeId, quinn::Connection>,
        certs: &mut HashMap<NodeId, String>,
    ) {
        let now = Instant::now();
        match ev {
            Event::Connected {
                node,
                conn,
                info,
                cert,
                seen,
            } => {
                if let Some(old) = registry.insert(node.clone(), conn) {
                    // The connection task decided (the old one was silent); see `Seats`.
                    old.close(2u32.into(), b"replaced by a newer connection");
                    self.coordinator.handle_disconnect(&node, now);
                    if let Some(x) = &mut self.prep {
                        x.handle_disconnect(&node);
                    }
                }
                certs.insert(node.clone(), cert);
                tracing::info!(
                    %node,
                    remote = %seen.remote,
                    software = %printable(&seen.software, 64),
                    connected = registry.len(),
                    "client joined"
                );
                let t = crate::status::unix_now();
                self.obs.status().nodes.insert(
                    node.clone(),
                    crate::status::NodeStatus {
                        remote: seen.remote.to_string(),
                        version: printable(&seen.software, 64),
                        connected_since: t,
                        last_seen: t,
                        state: "idle".into(),
                        answers: 0,
                        cert_expires: seen.cert_expires,
                    },
                );
                match &mut self.prep {
                    // Standardisation first: the node joins the coordinator once it has
                    // applied the agreed transform (`handle_prep_response`).
                    Some(x) => x.handle_join(node, info),
                    None => self.coordinator.handle_connect(node, info, now),
                }
            }
            Event::Disconnected { node, id, reason } => {
                if registry.get(&node).map(|c| c.stable_id()) == Some(id) {
                    registry.remove(&node);
                    certs.remove(&node);
                    let waited = self.coordinator.round_state().pending.contains(&node);
                    tracing::info!(
                        %node,
                        connected = registry.len(),
                        "client left ({reason}){}",
                        if waited { "; it fails the open round" } else { "" }
                    );
                    self.obs.status().nodes.remove(&node);
                    if let Some(x) = &mut self.prep {
                        x.handle_disconnect(&node);
                    }
                    self.coordinator.handle_disconnect(&node, now);
                }
            }
            Event::Response {
                node,
                round,
                result,
            } => {
                if let Some(n) = self.obs.status().nodes.get_mut(&node) {
                    n.state = "idle".into();
                    if result.is_ok() {
                        n.last_seen = crate::status::unix_now();
                        n.answers += 1;
                    }
                }
                self.handle_response(node, round, result, now);
            }
        }
    }

    fn handle_response(
        &mut self,
        node: NodeId,
        round: u64,
        result: Result<Message, (&'static str, String)>,
        now: Instant,
    ) {
        if round == wire::STATS_ROUND && self.prep.is_some() {
            self.handle_prep_response(node, result, now);
            return;
        }
        {
            match result {
                Ok(Message {
                    header: Header::Update(meta),
                    payload,
                }) => {
                    if let Some(obs) = &self.observer {
                        let _ = obs.send(ObservedUpdate {
                            node: node.clone(),
                            meta: meta.clone(),
                            delta: payload.clone(),
                        });
                    }
                    if let Err(e) = self
                        .coordinator
                        .handle_update(&node, round, meta, payload, now)
                    {
                        self.obs.metrics.reject(e.kind());
                        tracing::warn!(%node, kind = e.kind(), "update rejected: {e}");
                    }
                }
                Ok(Message {
                    header: Header::Held(meta),
                    ..
                }) => {
                    if let Err(e) = self.coordinator.handle_held(&node, round, meta, now) {
                        self.obs.metrics.reject(e.kind());
                        tracing::warn!(%node, kind = e.kind(), "held-update answer rejected: {e}");
                    }
                }
                Ok(Message {
                    header: Header::SecAggAnswer(frame),
                    payload,
                }) => {
                    let decoded = if frame.round != round {
                        Err(format!(
                            "stage answer for round {} to a request of round {round}",
                            frame.round
                        ))
                    } else {
                        wire::payload_bytes(&frame, &payload)
                            .map_err(|e| e.to_string())
                            .and_then(|b| {
                                dpfl_secagg::transport::decode_from_node(
                                    &b,
                                    self.secagg_answer_limit,
                                )
                                .map_err(|e| e.to_string())
                            })
                    };
                    match decoded {
                        Ok(msg) => {
                            if let Err(e) = self
                                .coordinator
                                .handle_secagg_answer(&node, round, msg, now)
                            {
                                self.obs.metrics.reject(e.kind());
                                tracing::warn!(%node, kind = e.kind(), "stage answer refused: {e}");
                            }
                        }
                        Err(detail) => {
                            self.obs.metrics.reject("malformed");
                            tracing::warn!(%node, "malformed stage answer: {detail}");
                            self.coordinator.handle_transport_error(
                                &node,
                                round,
                                "malformed",
                                &detail,
                                now,
                            );
                        }
                    }
                }
                Ok(Message {
                    header: Header::EvalResult(r),
                    ..
                }) => {
                    if let Err(e) = self.coordinator.handle_eval_result(&node, r, now) {
                        tracing::warn!(%node, "evaluation result rejected: {e}");
                    }
                }
                Ok(Message {
                    header: Header::Failed { round, reason },
                    ..
                }) => {
                    tracing::warn!(
                        %node,
                        round,
                        "client could not serve the request: {}",
                        printable(&reason, 300)
                    );
                    self.coordinator.handle_failed(&node, round, &reason, now);
                }
                Ok(other) => {
                    self.obs.metrics.reject("unexpected_message");
                    let detail = format!("unexpected `{}` message", other.header.name());
                    tracing::warn!(%node, "{detail}");
                    self.coordinator.handle_transport_error(
                        &node,
                        round,
                        "unexpected_message",
                        &detail,
                        now,
                    );
                }
                Err((kind, detail)) => {
                    self.obs.metrics.reject(kind);
                    tracing::warn!(%node, kind, "{detail}");
                    self.coordinator
                        .handle_transport_error(&node, round, kind, &detail, now);
                }
            }
        }
    }

    /// An answer to a statistics exchange request (round [`wire::STATS_ROUND`]).
    fn handle_prep_response(
        &mut self,
        node: NodeId,
        result: Result<Message, (&'static str, String)>,
        now: Instant,
    ) {
        let Some(x) = &mut self.prep else { return };
        match result {
            Ok(Message {
                header: Header::Stats(r),
                ..
            }) => {
                if let Some(obs) = &self.stats_observer {
                    let _ = obs.send(ObservedStats {
                        node: node.clone(),
                        report: r.clone(),
                    });
                }
                match x.handle_stats(&node, &r) {
                    Ok(()) => tracing::info!(
                        %node,
                        counted = x.contributors().len(),
                        needed = x.settings().min_contributors,
                        "feature statistics received"
                    ),
                    Err(e) => {
                        self.obs.metrics.reject("statistics");
                        tracing::warn!(%node, "feature statistics refused: {e}");
                        x.handle_failed(&node);
                    }
                }
            }
            Ok(Message {
                header: Header::StatsHeld(h),
                ..
            }) => match x.handle_stats_held(&node, &h) {
                Ok(()) => tracing::info!(%node, "holds its feature statistics for the secure sum"),
                // Not counted, and nothing else: a late answer to an earlier attempt's
                // request must not drop the node from the current one.
                Err(e) => {
                    self.obs.metrics.reject("statistics");
                    tracing::warn!(%node, "held-statistics answer refused: {e}");
                }
            },
            Ok(Message {
                header: Header::SecAggAnswer(frame),
                payload,
            }) => {
                let decoded = if frame.round != wire::STATS_ROUND {
                    Err(format!(
                        "stage answer for round {} to a statistics request",
                        frame.round
                    ))
                } else {
                    wire::payload_bytes(&frame, &payload)
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            dpfl_secagg::transport::decode_from_node(&b, x.answer_limit())
                                .map_err(|e| e.to_string())
                        })
                };
                match decoded {
                    // A refused message already dropped its sender from the instance; a
                    // stale one (an earlier instance's) drops nobody.
                    Ok(msg) => {
                        if let Err(e) = x.handle_secagg_answer(&node, msg) {
                            self.obs.metrics.reject("secagg");
                            tracing::warn!(%node, "statistics stage answer refused: {e}");
                        }
                    }
                    Err(e) => {
                        self.obs.metrics.reject("malformed");
                        tracing::warn!(%node, "malformed statistics stage answer: {e}");
                        x.handle_failed(&node);
                    }
                }
            }
            Ok(Message {
                header: Header::Standardized { features },
                ..
            }) => match x.handle_standardized(&node, features) {
                Ok((n, info)) => {
                    tracing::info!(node = %n, "standardised its data; joins the rounds");
                    self.coordinator.handle_connect(n, info, now);
                }
                Err(e) => tracing::warn!(%node, "standardisation acknowledgement refused: {e}"),
            },
            Ok(Message {
                header: Header::Failed { reason, .. },
                ..
            }) => {
                tracing::warn!(
                    %node,
                    "node could not serve the statistics exchange: {}",
                    printable(&reason, 300)
                );
                x.handle_failed(&node);
            }
            Ok(other) => {
                self.obs.metrics.reject("unexpected_message");
                tracing::warn!(
                    %node,
                    "unexpected `{}` message in the statistics exchange",
                    other.header.name()
                );
                x.handle_failed(&node);
            }
            Err((kind, detail)) => {
                self.obs.metrics.reject(kind);
                tracing::warn!(%node, kind, "statistics exchange: {detail}");
                x.handle_failed(&node);
            }
        }
    }

    /// Drives the statistics exchange: agrees the transform once enough statistics are
    /// in (durable, and with DP on charged to the ledger, before it leaves), then sends
    /// what the exchange wants sent.
    fn pump_prep(
        &mut self,
        registry: &HashMap<NodeId, quinn::Connection>,
        ev_tx: &mpsc::Sender<Event>,
    ) -> Result<(), ServerError> {
        let Some(x) = &mut self.prep else {
            return Ok(());
        };
        // The statistics' secure sum (a no-op without secure aggregation); the graph seed
        // comes from the OS CSPRNG.
        x.advance(Instant::now(), &mut rand::rngs::OsRng);
        if let Some(why) = x.failure() {
            return Err(ServerError::Data(format!("standardisation: {why}")));
        }
        if x.ready() {
            let s = x
                .agree(self.stats_noise.as_mut())
                .map_err(|e| ServerError::Data(format!("standardisation: {e}")))?
                .clone();
            let contributors: Vec<NodeId> = x.contributors().iter().cloned().collect();
            let z = x.settings().noise_multiplier;
            let sensitivity = dpfl_ml::standardize::FeatureStats::zeros(
                x.settings().dim,
                x.settings().classes,
                true,
            )
            .sensitivity();
            match (z, x.settings().distributed_params()) {
                (Some(_), Some(params)) => {
                    let eps = self
                        .coordinator
                        .record_distributed_statistics_release(&params, &contributors)
                        .map_err(|e| ServerError::Data(format!("statistics release: {e}")))?;
                    tracing::info!(
                        noise_multiplier = params.noise_multiplier,
                        mechanism = %params.mechanism,
                        against_model_observers = eps.model_observers,
                        against_the_server = eps.server,
                        "feature statistics released with the nodes' integer noise shares \
                         (ledger round 0)"
                    );
                }
                (Some(z), None) => {
                    let eps = self
                        .coordinator
                        .record_statistics_release(z, sensitivity, &contributors)
                        .map_err(|e| ServerError::Data(format!("statistics release: {e}")))?;
                    tracing::info!(
                        noise_multiplier = z,
                        epsilon = eps,
                        "feature statistics released with the Gaussian mechanism (ledger round 0)"
                    );
                }
                (None, _) => {}
            }
            self.persist_ledger()?;
            let file = AgreedFile {
                standardizer: s.clone(),
                contributors: contributors.len(),
                noise_multiplier: z,
            };
            let bytes = serde_json::to_vec_pretty(&file).map_err(io_err)?;
            checkpoint::write_atomic(&self.out.join(STANDARDIZE_FILE), &bytes).map_err(io_err)?;
            tracing::info!(
                contributors = contributors.len(),
                "standardisation agreed: mean {:?}, std {:?}",
                s.mean,
                s.std
            );
            if let Some(mut d) = self.test_raw.take() {
                s.apply(&mut d)
                    .map_err(|e| ServerError::Data(e.to_string()))?;
                self.evaluator = Some(Evaluator::start(&self.spec, d, self.cfg.eval_threads)?);
            }
            if let Some(x) = &mut self.prep {
                x.publish();
            }
        }
        let Some(x) = &mut self.prep else {
            return Ok(());
        };
        let out: Vec<(NodeId, Header)> = std::iter::from_fn(|| x.poll_message()).collect();
        let stages: Vec<crate::prep::StageBatch> = std::iter::from_fn(|| x.poll_stage()).collect();
        let deadline = self.cfg.round_timeout() + Duration::from_secs(5);
        for (node, h) in out {
            let bytes = Arc::new(wire::encode(&h, &[]));
            self.obs.metrics.bytes_out.inc_by(bytes.len() as u64);
            self.send_request(registry, &node, wire::STATS_ROUND, bytes, deadline, ev_tx);
        }
        for b in stages {
            tracing::info!(
                "feature statistics: secure aggregation stage {} ({} nodes)",
                b.stage,
                b.messages.len()
            );
            self.send_stage(
                registry,
                wire::STATS_ROUND,
                b.answer_limit,
                b.messages,
                ev_tx,
            );
        }
        Ok(())
    }

    /// Sends one secure-aggregation stage (one message per node, each on its own stream;
    /// with the setup, the neighbours' certificates as the server saw them).
    fn send_stage(
        &self,
        registry: &HashMap<NodeId, quinn::Connection>,
        round: u64,
        answer_limit: usize,
        messages: Vec<crate::secure::SecAggSend>,
        ev_tx: &mpsc::Sender<Event>,
    ) {
        let deadline =
            Duration::from_secs_f64(self.cfg.secagg.stage_timeout_secs) + Duration::from_secs(5);
        // The answer's wire message: prefix, header and the padded bytes.
        let wire_limit = wire::MAX_HELLO_BYTES + answer_limit + 4;
        let nodes: Vec<NodeId> = messages.iter().map(|m| m.node.clone()).collect();
        self.mark_nodes(&nodes, "secure aggregation");
        for m in messages {
            let certificates = m
                .certificates_of
                .iter()
                .filter_map(|peer| {
                    let der = registry.get(peer).and_then(peer_certificate)?;
                    Some(dpfl_secagg::PeerCertificate {
                        node: peer.clone(),
                        der,
                    })
                })
                .collect();
            let req = dpfl_secagg::StageRequest {
                message: m.message,
                certificates,
            };
            let framed = dpfl_secagg::transport::encode_to_node(&req)
                .ok()
                .and_then(|b| wire::bytes_payload(round, &b));
            let Some((frame, payload)) = framed else {
                tracing::error!(node = %m.node, "cannot encode a secure-aggregation stage");
                continue;
            };
            let bytes = wire::encode(&Header::SecAggRequest(frame), &payload);
            self.obs.metrics.bytes_out.inc_by(bytes.len() as u64);
            self.send_request_with_limit(
                registry,
                &m.node,
                round,
                Arc::new(bytes),
                deadline,
                wire_limit,
                ev_tx,
            );
        }
    }

    fn send_request(
        &self,
        registry: &HashMap<NodeId, quinn::Connection>,
        node: &NodeId,
        round: u64,
        bytes: Arc<Vec<u8>>,
        deadline: Duration,
        ev_tx: &mpsc::Sender<Event>,
    ) {
        let max = self.message_limit;
        self.send_request_with_limit(registry, node, round, bytes, deadline, max, ev_tx);
    }

    /// As [`Server::send_request`], reading the answer with the limit `max`.
    #[allow(clippy::too_many_arguments)]
    fn send_request_with_limit(
        &self,
        registry: &HashMap<NodeId, quinn::Connection>,
        node: &NodeId,
        round: u64,
        bytes: Arc<Vec<u8>>,
        deadline: Duration,
        max: usize,
        ev_tx: &mpsc::Sender<Event>,
    ) {
        let Some(conn) = registry.get(node).cloned() else {
            let _ = ev_tx.try_send(Event::Response {
                node: node.clone(),
                round,
                result: Err(("not_connected", "client is not connected".into())),
            });
            return;
        };
        let tx = ev_tx.clone();
        let node = node.clone();
        let obs = self.obs.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(deadline, request(&conn, &bytes, max)).await {
                Ok(Ok((m, n))) => {
                    obs.metrics.bytes_in.inc_by(n);
                    Ok(m)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(("timeout", "no answer before the deadline".to_string())),
            };
            let _ = tx
                .send(Event::Response {
                    node,
                    round,
                    result,
                })
                .await;
        });
    }

    async fn complete_round(
        &mut self,
        r: RoundReport,
        sent_at: Option<Instant>,
        out: &mut Outputs,
        summary: &mut RunSummary,
    ) -> Result<(), ServerError> {
        let seconds = sent_at.map_or_else(
            || {
                r.finished
                    .saturating_duration_since(r.started)
                    .as_secs_f64()
            },
            |t| t.elapsed().as_secs_f64(),
        );
        let central = match &self.evaluator {
            Some(ev) if r.model_updated || summary.test_accuracy.is_none() => {
                ev.evaluate(r.global.clone()).await
            }
            Some(_) => summary
                .test_accuracy
                .zip(summary.test_loss)
                .map(|(accuracy, loss)| CentralEval {
                    accuracy,
                    loss,
                    auc: summary.test_auc,
                    f1: summary.test_f1,
                }),
            None => None,
        };
        let test = central.map(|c| (c.accuracy, c.loss));
        if let Some(w) = self.progress.observe(r.train_loss, test) {
            tracing::warn!("{w}");
        }
        if let Some(c) = central {
            summary.test_accuracy = Some(c.accuracy);
            summary.test_loss = Some(c.loss);
            summary.test_auc = c.auc;
            summary.test_f1 = c.f1;
            // Keep the best round's model next to the last one (a released model: with DP
            // on, choosing among released models is post-processing).
            if r.model_updated
                && summary
                    .best_test_accuracy
                    .is_none_or(|(b, _)| c.accuracy > b)
            {
                self.save_model(&r.global, "model-best.safetensors")?;
                summary.best_test_accuracy = Some((c.accuracy, r.round));
            }
        }
        summary.rounds_completed = r.round;
        let p = r.privacy;
        let private = self.cfg.dp.mode.is_private();
        let line = MetricsLine {
            round: r.round,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            note: r.note.clone(),
            outliers: r.outliers.clone(),
            participants: r.participants.len(),
            selected: r.selected,
            failed: r.failures.len(),
            attempts: r.attempts,
            abandoned: r.abandoned,
            model_updated: r.model_updated,
            train_loss: r.train_loss,
            train_accuracy: r.train_accuracy,
            test_accuracy: test.map(|t| t.0),
            test_loss: test.map(|t| t.1),
            test_auc: central.and_then(|c| c.auc),
            test_f1: central.and_then(|c| c.f1),
            federated_accuracy: r.federated_eval.map(|e| e.accuracy),
            federated_loss: r.federated_eval.map(|e| e.loss),
            federated_examples: r.federated_eval.map(|e| e.num_examples),
            seconds,
            epsilon: r.epsilon,
            delta: private.then_some(self.cfg.dp.delta),
            dp_mode: self.cfg.dp.mode,
            noise_multiplier: p.map(|p| p.noise_multiplier),
            clip_norm: p.map(|p| p.clip_norm),
            clipped_fraction: p.and_then(|p| p.clipped_fraction),
            max_client_epsilon: (self.cfg.dp.mode == DpMode::Local)
                .then(|| r.snapshot.ledger.max_client_epsilon()),
            rejected: r.rejected.clone(),
            norm_exceeded: r.norm_exceeded,
            failures: r
                .failures
                .iter()
                .map(|f| format!("{}: {}", f.node, printable(&f.reason, 300)))
                .collect(),
        };
        let json = serde_json::to_string(&line).map_err(io_err)?;
        writeln!(out.operator, "{json}")
            .and_then(|_| out.operator.sync_data())
            .map_err(io_err)?;
        let public = if private {
            serde_json::to_string(&PublicLine {
                round: r.round,
                dp_mode: self.cfg.dp.mode,
                epsilon: r.epsilon,
                delta: Some(self.cfg.dp.delta),
                noise_multiplier: p.map(|p| p.noise_multiplier),
                clip_norm: p.map(|p| p.clip_norm),
                clipped_fraction: p.and_then(|p| p.clipped_fraction_noised),
                model_updated: r.model_updated,
                test_accuracy: test.map(|t| t.0),
                test_loss: test.map(|t| t.1),
                test_auc: central.and_then(|c| c.auc),
                test_f1: central.and_then(|c| c.f1),
            })
            .map_err(io_err)?
        } else {
            json
        };
        writeln!(out.public, "{public}")
            .and_then(|_| out.public.sync_data())
            .map_err(io_err)?;
        checkpoint::save(
            &self.out.join("checkpoint.bin"),
            &self.cfg.fingerprint(),
            &r.snapshot,
        )?;
        self.obs.checkpointed();
        self.obs.metrics.rounds.inc();
        self.obs.metrics.round_seconds.observe(seconds);
        if let Some(e) = r.epsilon {
            self.obs.metrics.epsilon.set(e);
        }
        {
            let mut st = self.obs.status();
            st.history.push(RoundPoint {
                round: r.round,
                test_accuracy: test.map(|t| t.0),
                test_loss: test.map(|t| t.1),
                epsilon: r.epsilon,
                seconds,
                participants: r.participants.len(),
                unix_time: line.unix_time,
            });
            st.completed_rounds = st.completed_rounds.max(r.round);
            if r.epsilon.is_some() {
                st.epsilon = r.epsilon;
            }
        }
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
        let eps = match r.epsilon {
            Some(e) => format!(" epsilon {e:.3}"),
            None => String::new(),
        };
        let fed = match r.federated_eval {
            Some(e) => format!(" fed-eval acc {:.4} ({} clients)", e.accuracy, e.clients),
            None => String::new(),
        };
        let status = match (&r.note, r.abandoned) {
            (_, true) => " ABANDONED".to_string(),
            (Some(n), false) => format!(" [{n}]"),
            (None, false) => String::new(),
        };
        tracing::info!(
            "round {}/{}: {} participants ({} failed){} train loss {} test acc {} loss {}{}{} {:.2}s{}",
            r.round,
            self.cfg.rounds,
            r.participants.len(),
            r.failures.len(),
            status,
            fmt(r.train_loss),
            fmt(test.map(|t| t.0)),
            fmt(test.map(|t| t.1)),
            eps,
            fed,
            seconds,
            self.eta_line(None)
        );
        if !r.outliers.is_empty() {
            tracing::warn!(
                round = r.round,
                "updates far above the round's median norm (factor {}): {:?}; consider a robust \
                 aggregator (strategy.aggregator) if nodes are not fully trusted",
                self.cfg.update_limits.outlier_factor,
                r.outliers
            );
        }
        Ok(())
    }
}

/// The two metrics streams: publishable and operator-only.
struct Outputs {
    public: std::fs::File,
    operator: std::fs::File,
}

/// `--fresh`: the previous run's checkpoint and ledger journal are renamed (never
/// deleted: they record what that run released), so they cannot be mistaken for this
/// run's on a later resume.
fn set_aside_previous_run(out: &std::path::Path) -> Result<(), ServerError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for path in [
        out.join("checkpoint.bin"),
        out.join("operator").join("ledger.json"),
        out.join(STANDARDIZE_FILE),
        out.join("operator").join(crate::classes::CLASSES_FILE),
    ] {
        if path.exists() {
            let mut aside = path.clone().into_os_string();
            aside.push(format!(".replaced-{stamp}"));
            std::fs::rename(&path, &aside).map_err(|e| {
                ServerError::Io(format!("cannot set aside {}: {e}", path.display()))
            })?;
            tracing::info!(
                "--fresh: previous run's {} kept as {:?}",
                path.display(),
                aside
            );
        }
    }
    Ok(())
}

/// Where the agreed standardisation is kept (public: exact statistics with DP off, a DP
/// release with DP on, the same transform the model file carries).
const STANDARDIZE_FILE: &str = "standardize.json";

/// Protocol round ids reserved for the statistics' secure sums (one per attempt, at most
/// this many attempts); the coordinator's start after them.
const STATS_ROUND_IDS: u64 = 64;

/// The statistics exchange's settings from the configuration; `secagg_id_base`: the first
/// protocol round id of the statistics' secure sums.
fn exchange_settings(
    cfg: &ServerConfig,
    spec: &ModelSpec,
    secagg_id_base: u64,
) -> Result<crate::prep::ExchangeSettings, ServerError> {
    let st = &cfg.standardize;
    let distributed = (cfg.secure_aggregation && cfg.dp.mode == DpMode::Distributed)
        .then(|| cfg.secagg.distributed(cfg.strategy.min_fit_clients));
    let bounds = st
        .bounds
        .as_deref()
        .map(|b| dpfl_ml::standardize::Bounds::parse(b, spec.inputs()))
        .transpose()
        .map_err(|e| ServerError::Data(format!("standardize.bounds: {e}")))?;
    Ok(crate::prep::ExchangeSettings {
        spec_hash: spec.hash(),
        dim: spec.inputs(),
        classes: spec.outputs(),
        bounds,
        noise_multiplier: cfg.dp.mode.is_private().then_some(st.noise_multiplier),
        local: cfg.dp.mode == DpMode::Local,
        // Distributed DP: the noise is accounted over `min_contributors` shares, so no sum
        // of fewer statistics is decoded.
        min_contributors: match distributed {
            Some(d) => cfg.min_clients.max(d.min_contributors),
            None => cfg.min_clients,
        },
        secure: cfg.secure_aggregation.then(|| crate::prep::SecureStats {
            secagg: cfg.secagg.settings(secagg_id_base, distributed),
            answer_timeout: cfg.round_timeout(),
            max_attempts: (cfg.max_round_retries + 1).min(STATS_ROUND_IDS as u32),
        }),
    })
}

/// The transform agreed by an earlier process with this output folder (only when
/// resuming); it must fit the model and the configured bounds.
fn read_agreed(
    path: &std::path::Path,
    resume: bool,
    s: &crate::prep::ExchangeSettings,
) -> Result<Option<dpfl_ml::standardize::Standardizer>, ServerError> {
    if !resume {
        return Ok(None);
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ServerError::Io(format!("{}: {e}", path.display()))),
    };
    let f: AgreedFile = serde_json::from_slice(&bytes)
        .map_err(|e| ServerError::Io(format!("{}: {e}", path.display())))?;
    let t = f.standardizer;
    if t.mean.len() != s.dim || t.bounds != s.bounds {
        return Err(ServerError::Io(format!(
            "{}: the agreed standardisation does not fit this configuration (features or \
             bounds differ); move it aside or use --fresh",
            path.display()
        )));
    }
    Ok(Some(t))
}

/// The full ledger journaled in `operator/ledger.json`, if present.
fn read_ledger_journal(out: &std::path::Path) -> Result<Option<Ledger>, ServerError> {
    let path = out.join("operator").join("ledger.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ServerError::Io(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ServerError::Io(format!("{}: {e}", path.display()))),
    }
}

/// Warnings about the server's credentials: the CA key in its folder, a certificate
/// about to expire (logged at bind and shown on the status page).
fn credential_warnings(cfg: &ServerConfig) -> Vec<String> {
    let mut out = Vec::new();
    if dpfl_certs::holds_ca_key(&cfg.certs_dir) {
        out.push(format!(
            "the server's certificate folder {} holds the CA key (ca.key): anyone who can read \
             it can mint node identities. Keep the CA folder apart and offline; `dpfl-certs \
             init` makes a server kit without it",
            cfg.certs_dir.display()
        ));
    }
    let layout = Layout::new(&cfg.certs_dir);
    let now = std::time::SystemTime::now();
    for (what, path) in [
        ("server certificate", layout.server_cert()),
        ("CA certificate", layout.ca_cert()),
    ] {
        if let Ok(info) = dpfl_certs::describe_file(&path) {
            if (info.seconds_left(now) as f64) < cfg.cert_expiry_warn_days * 86_400.0 {
                out.push(format!(
                    "the {what} {} {}: renew it (dpfl-certs renew --cert {}; the same key keeps \
                     the nodes' trust)",
                    path.display(),
                    info.expiry(now),
                    path.display()
                ));
            }
        }
    }
    for w in &out {
        tracing::warn!("{w}");
    }
    out
}

/// Logs the privacy plan at start-up: the mechanism, the epsilon the configured rounds
/// would reach, and how many rounds the target allows.
fn log_privacy_plan(cfg: &ServerConfig, spec: &ModelSpec) {
    let dp = &cfg.dp;
    if !dp.mode.is_private() {
        tracing::warn!("differential privacy is off (dp.mode = none): no privacy guarantee");
        return;
    }
    if dp.mode == DpMode::Distributed {
        let d = cfg.secagg.distributed(cfg.strategy.min_fit_clients);
        let params = d.params(
            cfg.secagg.bits,
            dp.clip_norm,
            dp.noise_multiplier,
            spec.num_params(),
        );
        match dpfl_common::dp::distributed::epsilons(
            &params,
            dp.sampling_rate,
            cfg.rounds,
            cfg.rounds,
            dp.delta,
        ) {
            Ok(e) => tracing::info!(
                mechanism = %params.mechanism,
                bits = params.bits,
                z = dp.noise_multiplier,
                clip = dp.clip_norm,
                q = dp.sampling_rate,
                delta = dp.delta,
                min_contributors = params.min_contributors,
                max_contributors = params.max_contributors,
                "privacy plan (distributed DP): {} rounds reach epsilon {:.4} against observers \
                 of the released models (amplified by sampling) and {:.4} against the server \
                 for a client in every round (no amplification)",
                cfg.rounds,
                e.model_observers,
                e.server
            ),
            Err(e) => tracing::error!("privacy plan: {e}"),
        }
        return;
    }
    match crate::ledger::plan(dp, cfg.rounds) {
        Ok(plan) => {
            tracing::info!(
                mode = %dp.mode,
                z = dp.noise_multiplier,
                clip = dp.clip_norm,
                q = dp.sampling_rate,
                delta = dp.delta,
                target = ?dp.target_epsilon,
                "privacy plan: {} rounds reach epsilon {:.4} ({}){}",
                cfg.rounds,
                plan.epsilon,
                plan.adversary,
                plan.affordable.map_or(String::new(), |n| format!(
                    "; the target allows {n} of them"
                ))
            );
            if let Some(n) = plan.affordable {
                if n == 0 {
                    tracing::warn!(
                        "the target epsilon stops training before round 1: one round already \
                         exceeds it"
                    );
                } else if n * 2 < cfg.rounds {
                    tracing::warn!(
                        "the target epsilon stops training after round {n} of {}",
                        cfg.rounds
                    );
                }
            }
        }
        Err(e) => tracing::error!("privacy plan: {e}"),
    }
}

fn write_json(path: &std::path::Path, v: &impl Serialize) -> Result<(), ServerError> {
    let s = serde_json::to_vec_pretty(v).map_err(io_err)?;
    checkpoint::write_atomic(path, &s).map_err(io_err)
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Sends one request on a new stream and reads the answer with [`wire::read_message`]:
/// an answer announcing more than `max` bytes is refused from its 20-byte prefix, and a
/// valid one is read once, its payload straight into the `Vec<f32>` the coordinator gets.
/// Dropping the stream on an error tells the peer to stop sending.
async fn request(
    conn: &quinn::Connection,
    bytes: &[u8],
    max: usize,
) -> Result<(Message, u64), (&'static str, String)> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ("connection", e.to_string()))?;
    send.write_all(bytes)
        .await
        .map_err(|e| ("connection", e.to_string()))?;
    send.finish().map_err(|e| ("connection", e.to_string()))?;
    let mut recv = Counting { inner: recv, n: 0 };
    wire::read_message(&mut recv, max)
        .await
        .map(|m| (m, recv.n))
        .map_err(|e| match e {
            wire::ReadError::Decode(e @ wire::DecodeError::TooLarge { .. }) => {
                ("oversized", e.to_string())
            }
            wire::ReadError::Decode(e) => ("malformed", e.to_string()),
            wire::ReadError::Io(e) => ("connection", e.to_string()),
        })
}

/// The DER certificate a node presented in its TLS handshake (verified then against the
/// federation CA), forwarded to its secure-aggregation neighbours.
fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.as_ref().to_vec())
}

/// A reader that counts the bytes it passes on (message bytes received, for the metrics).
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counting<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.n += (buf.filled().len() - before) as u64;
        r
    }
}

async fn tell_finish(registry: &HashMap<NodeId, quinn::Connection>, reason: &str, rounds: u64) {
    let bytes = wire::encode(
        &Header::Finish(Finish {
            reason: reason.to_string(),
            rounds_completed: rounds,
        }),
        &[],
    );
    let mut set = tokio::task::JoinSet::new();
    for c in registry.values() {
        let (c, bytes) = (c.clone(), bytes.clone());
        set.spawn(async move {
            if let Ok((mut s, _r)) = c.open_bi().await {
                let _ = s.write_all(&bytes).await;
                let _ = s.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), s.stopped()).await;
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while set.join_next().await.is_some() {}
    })
    .await;
}

/// Accepts connections, spending handshake capacity only on peers that proved their
/// address.
///
/// - An Initial from an address not yet validated gets a stateless retry and nothing
///   else: no TLS work, no state, no rate-limit token, no connection permit. A real QUIC
///   client answers it with a token bound to its address (one extra round trip); spoofed
///   or never-completed Initials end there, however many arrive.
/// - A validated peer needs a free slot among `admission.max_handshakes_per_source`
///   handshakes in progress from its IP, a token of the `handshakes_per_sec` limiter and a
///   connection permit; otherwise it is refused (it can receive the refusal, so the honest
///   ones back off at once).
/// - Attempts turned away are counted by reason and logged as one line per
///   `admission.refusal_log_secs`, not one line each.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    cfg: ServerConfig,
    spec: ModelSpec,
    ev_tx: mpsc::Sender<Event>,
    conns: Arc<Semaphore>,
    shared: Shared,
) {
    let a = &cfg.admission;
    let mut limiter = RateLimiter::new(a.handshakes_per_sec, Instant::now());
    let sources = SourceLimiter::new(a.max_handshakes_per_source);
    let refusals = Arc::new(Counted {
        log: RefusalLog::default(),
        obs: shared.obs.clone(),
    });
    let interval = Duration::from_secs_f64(a.refusal_log_secs);
    let mut report = tokio::time::interval_at((Instant::now() + interval).into(), interval);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cfg = Arc::new(cfg);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = report.tick() => {
                log_refusals(&refusals.log, interval);
                continue;
            }
        };
        if !incoming.remote_address_validated() {
            // Unvalidated implies `may_retry`, so this cannot fail; if it did, drop silently.
            match incoming.retry() {
                Ok(()) => refusals.count(RETRY),
                Err(e) => {
                    e.into_incoming().ignore();
                    refusals.count("retry_failed");
                }
            }
            continue;
        }
        let Some(slot) = sources.try_enter(incoming.remote_address().ip()) else {
            refusals.count("per_source");
            incoming.refuse();
            continue;
        };
        if !limiter.try_acquire(Instant::now()) {
            refusals.count("rate_limit");
            incoming.refuse();
            continue;
        }
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            refusals.count("connection_limit");
            incoming.refuse();
            continue;
        };
        let (cfg, spec, tx, refusals, shared) = (
            cfg.clone(),
            spec.clone(),
            ev_tx.clone(),
            refusals.clone(),
            shared.clone(),
        );
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match serve_connection(incoming, slot, &cfg, &spec, &tx, &shared).await {
                Ok(()) => {}
                // A decision about an identified node (revoked, wrong DP mode, duplicate
                // identity, ...) or an expired federation certificate: worth a line each,
                // and only holders of federation certificates can cause them.
                Err(Refused { reason, detail })
                    if matches!(reason, "refused" | "duplicate_identity" | "cert_expired") =>
                {
                    shared.obs.metrics.refuse(reason);
                    tracing::warn!(%remote, "connection refused: {detail}");
                    shared
                        .obs
                        .note_refusal(format!("{remote}: {}", printable(&detail, 300)));
                }
                Err(Refused { reason, detail }) => {
                    refusals.count(reason);
                    tracing::debug!(%remote, reason, "connection refused: {detail}");
                }
            }
            drop(permit);
        });
    }
    log_refusals(&refusals.log, interval);
}

/// What connection tasks share with the driver.
#[derive(Clone)]
struct Shared {
    pins: Arc<Mutex<Pins>>,
    obs: Arc<Observatory>,
    seats: Arc<Seats>,
    /// The federation's class names: the CSV test table's, else the first admitted node's
    /// list (empty: none declared yet), kept in `operator/classes.json`.
    classes: Arc<crate::classes::FederationClasses>,
}

/// The refusal log, with every count also in the metrics.
struct Counted {
    log: RefusalLog,
    obs: Arc<Observatory>,
}

impl Counted {
    fn count(&self, reason: &'static str) {
        self.log.count(reason);
        if reason != RETRY {
            self.obs.metrics.refuse(reason);
        }
    }
}

/// Which live connection holds each identity. A second connection with an identity that
/// is held is decided here, before its welcome: the newer one takes the seat only if the
/// holder is silent (a node restarted before its old connection timed out); if the holder
/// answers a probe, the newcomer is refused (two processes with one key, or a stolen key),
/// so duplicates cannot keep replacing each other and stall rounds.
#[derive(Default)]
struct Seats {
    held: Mutex<HashMap<NodeId, (quinn::Connection, SocketAddr)>>,
}

impl Seats {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, (quinn::Connection, SocketAddr)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the seat for `node` if it is free or its holder is closed; otherwise returns
    /// the live holder.
    fn try_take(
        &self,
        node: &str,
        conn: &quinn::Connection,
        remote: SocketAddr,
    ) -> Option<(quinn::Connection, SocketAddr)> {
        let mut held = self.lock();
        match held.get(node) {
            Some((old, addr)) if old.close_reason().is_none() => Some((old.clone(), *addr)),
            _ => {
                held.insert(node.to_string(), (conn.clone(), remote));
                None
            }
        }
    }

    /// Gives the seat to `conn` if `old` still holds it.
    fn replace(
        &self,
        node: &str,
        old: &quinn::Connection,
        conn: &quinn::Connection,
        remote: SocketAddr,
    ) -> bool {
        let mut held = self.lock();
        match held.get(node) {
            Some((h, _)) if h.stable_id() != old.stable_id() && h.close_reason().is_none() => false,
            _ => {
                held.insert(node.to_string(), (conn.clone(), remote));
                true
            }
        }
    }

    /// Frees the seat if `conn` holds it.
    fn leave(&self, node: &str, conn: &quinn::Connection) {
        let mut held = self.lock();
        if held
            .get(node)
            .is_some_and(|(h, _)| h.stable_id() == conn.stable_id())
        {
            held.remove(node);
        }
    }
}

/// Whether a connected node is alive: it must acknowledge an empty stream within `wait`
/// (its QUIC stack does, whatever it is busy with; nodes ignore empty streams).
async fn answers_probe(conn: &quinn::Connection, wait: Duration) -> bool {
    let probe = async {
        let (mut send, _recv) = conn.open_bi().await.ok()?;
        send.finish().ok()?;
        send.stopped().await.ok()
    };
    matches!(tokio::time::timeout(wait, probe).await, Ok(Some(_)))
}

fn log_refusals(refusals: &RefusalLog, interval: Duration) {
    let Some(s) = refusals.take() else { return };
    let secs = interval.as_secs_f64();
    if s.refused > 0 {
        tracing::warn!(
            "{} connection attempts refused in the last {secs:.0}s: {}",
            s.refused,
            s.line()
        );
    } else {
        tracing::info!("address validation in the last {secs:.0}s: {}", s.line());
    }
}

/// Why a connection ended before its node joined: a counter key and the details.
#[derive(Debug)]
struct Refused {
    /// `refused` for a hello decision about an identified node; otherwise the reason the
    /// attempt is counted under in the periodic refusal line.
    reason: &'static str,
    detail: String,
}

fn refused(reason: &'static str, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        detail: detail.into(),
    }
}

/// One connection from TLS to its end.
///
/// Until the hello is accepted the peer is held to the endpoint's pre-admission transport
/// settings: one client-opened stream, a connection receive window of
/// [`wire::HELLO_WINDOW_BYTES`], `admission.handshake_timeout_secs` for TLS and
/// `admission.hello_timeout_secs` for the hello, and its handshake slot (`slot`) is held
/// only for that long. Once the hello stream is accepted the peer may open no further
/// streams, ever (the server opens one per request). After admission the windows open to
/// what answers need (two messages of `message_limit_for(spec)` bytes), no more.
async fn serve_connection(
    incoming: quinn::Incoming,
    slot: SourceSlot,
    cfg: &ServerConfig,
    spec: &ModelSpec,
    tx: &mpsc::Sender<Event>,
    shared: &Shared,
) -> Result<(), Refused> {
    let a = &cfg.admission;
    let remote = incoming.remote_address();
    let handshake = Duration::from_secs_f64(a.handshake_timeout_secs);
    let conn = tokio::time::timeout(handshake, incoming)
        .await
        .map_err(|_| refused("handshake_timeout", "TLS handshake timed out"))?
        .map_err(|e| {
            let text = dpfl_certs::explain_tls_error(&e.to_string());
            if text.contains("expired") {
                // A federation certificate that expired: the node needs a renewal.
                refused(
                    "cert_expired",
                    format!(
                        "TLS handshake refused: {text}; renew it with `dpfl-certs renew --cert \
                         <node>.pem` (same key, same identity)"
                    ),
                )
            } else {
                refused("handshake_failed", format!("TLS handshake failed: {text}"))
            }
        })?;
    let close = |code: u32, why: &'static str, detail: String| {
        conn.close(code.into(), why.as_bytes());
        refused(why, detail)
    };
    let certs = conn.peer_identity().and_then(|id| {
        id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return Err(close(4, "no_identity", "no client certificate".into()));
    };
    let node = match dpfl_certs::node_name(leaf) {
        Ok(n) => n,
        Err(e) => return Err(close(4, "no_identity", e.to_string())),
    };
    let fingerprint = dpfl_certs::fingerprint(leaf);
    let key = match dpfl_certs::key_fingerprint(leaf) {
        Ok(k) => k,
        Err(e) => return Err(close(4, "no_identity", e.to_string())),
    };
    let cert_expires = dpfl_certs::describe(leaf).ok().map(|info| {
        let left = info.seconds_left(std::time::SystemTime::now());
        if (left as f64) < cfg.cert_expiry_warn_days * 86_400.0 {
            tracing::warn!(
                %node,
                "node {node}'s certificate {}: renew it (dpfl-certs renew --cert {node}.pem, \
                 same key, same identity)",
                info.expiry(std::time::SystemTime::now())
            );
        }
        info.not_after
    });
    let hello_deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(a.hello_timeout_secs);
    let (mut send, mut recv) = match tokio::time::timeout_at(hello_deadline, conn.accept_bi()).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(close(4, "no_hello", format!("{node}: {e}"))),
        Err(_) => {
            return Err(close(
                4,
                "hello_timeout",
                format!("{node}: no hello in time"),
            ))
        }
    };
    // The hello stream is the only one a client ever opens.
    conn.set_max_concurrent_bi_streams(0u32.into());
    let hello_bytes = match tokio::time::timeout_at(
        hello_deadline,
        recv.read_to_end(wire::MAX_HELLO_BYTES),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(close(4, "bad_hello", format!("{node}: hello: {e}"))),
        Err(_) => {
            return Err(close(
                4,
                "hello_timeout",
                format!("{node}: hello timed out"),
            ))
        }
    };
    let checked = check_hello(&hello_bytes, cfg, spec, &node, &fingerprint, &key, shared);
    // One live connection per identity (see `Seats`).
    let checked = match checked {
        Ok(w) => match claim_seat(&conn, &node, remote, cfg, &shared.seats).await {
            Ok(()) => Ok(w),
            Err(r) => Err(r),
        },
        Err(r) => Err(r),
    };
    let welcome = match checked {
        Ok(w) => w,
        Err(refusal) => {
            let detail = refusal.detail.clone();
            let msg = wire::encode(&Header::Refused(refusal), &[]);
            let _ = send.write_all(&msg).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(3u32.into(), b"refused");
            let reason = if detail.contains("connected twice") {
                "duplicate_identity"
            } else {
                "refused"
            };
            return Err(refused(reason, format!("{node}: {detail}")));
        }
    };
    // Admitted: open the windows to what answers need before the node can get requests.
    dpfl_certs::quic::open_windows(
        &conn,
        dpfl_certs::quic::Windows::for_messages(cfg.message_limit_for(spec) as u64),
    );
    drop(slot);
    let welcomed = async {
        send.write_all(&wire::encode(&Header::Welcome(welcome.0.clone()), &[]))
            .await
            .map_err(|e| refused("welcome_failed", format!("{node}: {e}")))?;
        send.finish()
            .map_err(|e| refused("welcome_failed", format!("{node}: {e}")))?;
        let id = conn.stable_id();
        tx.send(Event::Connected {
            node: node.clone(),
            conn: conn.clone(),
            info: welcome.1,
            cert: fingerprint,
            seen: Joined {
                remote,
                software: welcome.2,
                cert_expires,
            },
        })
        .await
        .map_err(|_| refused("server_stopped", "server stopped"))?;
        // Clients cannot open more streams after the hello (the limit is 0). Wait for the
        // connection to end.
        let reason = conn.closed().await;
        let _ = tx
            .send(Event::Disconnected {
                node: node.clone(),
                id,
                reason: describe_close(&reason),
            })
            .await;
        Ok(())
    };
    let r = welcomed.await;
    shared.seats.leave(&node, &conn);
    r
}

/// Why a node's connection ended, in words.
fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TimedOut => {
            "no sign of life within the idle timeout: killed, crashed or cut off".into()
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            let why = String::from_utf8_lossy(&c.reason);
            if why.is_empty() {
                "closed by the node".into()
            } else {
                format!("closed: {}", printable(&why, 80))
            }
        }
        quinn::ConnectionError::LocallyClosed => "closed by the server".into(),
        other => printable(&other.to_string(), 120),
    }
}

/// Takes the identity's seat for `conn`, or refuses it when another live connection holds
/// it (see [`Seats`]).
async fn claim_seat(
    conn: &quinn::Connection,
    node: &str,
    remote: SocketAddr,
    cfg: &ServerConfig,
    seats: &Seats,
) -> Result<(), Refusal> {
    let Some((old, old_addr)) = seats.try_take(node, conn, remote) else {
        return Ok(());
    };
    let wait = Duration::from_secs_f64(cfg.duplicate_probe_secs);
    if answers_probe(&old, wait).await {
        tracing::error!(
            %node,
            "identity {node} connected twice from {old_addr} and {remote}: the connection \
             from {old_addr} is alive and keeps the identity, {remote} is refused. If {node} \
             runs one process, its key may be in other hands: revoke it (deny {node}) or \
             issue a new key and `rekey` it"
        );
        return Err(Refusal {
            kind: RefusalKind::NotAdmitted,
            detail: format!(
                "identity {node} connected twice: it is already connected from another \
                 address and that connection is alive; run one process per identity"
            ),
        });
    }
    tracing::warn!(
        %node,
        "identity {node} connected twice from {old_addr} and {remote}: the connection from \
         {old_addr} is silent (no answer within {:.1}s), {remote} replaces it",
        wait.as_secs_f64()
    );
    if seats.replace(node, &old, conn, remote) {
        old.close(2u32.into(), b"replaced by a newer connection");
        Ok(())
    } else {
        Err(Refusal {
            kind: RefusalKind::NotAdmitted,
            detail: format!("identity {node} connected twice: another connection took it"),
        })
    }
}

/// Decides whether a verified peer's hello is accepted: admission lists, the identity's
/// key binding, DP mode, model shape. Returns the welcome and what the node declared.
fn check_hello(
    bytes: &[u8],
    cfg: &ServerConfig,
    spec: &ModelSpec,
    node: &str,
    fingerprint: &str,
    key: &str,
    shared: &Shared,
) -> Result<(Welcome, NodeInfo, String), Refusal> {
    let (pins, classes) = (&shared.pins, &shared.classes);
    let refuse = |kind, detail: String| Err(Refusal { kind, detail });
    let hello = match wire::decode(bytes, wire::MAX_HEADER_BYTES + wire::PREFIX_BYTES) {
        Ok(Message {
            header: Header::Hello(h),
            ..
        }) => h,
        Ok(m) => {
            return refuse(
                RefusalKind::Version,
                format!("expected hello, got `{}`", m.header.name()),
            )
        }
        Err(wire::DecodeError::Version(v)) => {
            return refuse(
                RefusalKind::Version,
                format!(
                    "protocol version {v} is not supported (server speaks {})",
                    wire::PROTOCOL_VERSION
                ),
            )
        }
        Err(e) => return refuse(RefusalKind::Version, format!("malformed hello: {e}")),
    };
    let lists = match Lists::load(&cfg.admission) {
        Ok(l) => l,
        Err(e) => return refuse(RefusalKind::Unavailable, e.to_string()),
    };
    if let Err(e) = lists.admit(node, fingerprint) {
        return refuse(RefusalKind::NotAdmitted, e.to_string());
    }

    if hello.dp_mode != cfg.dp.mode {
        return refuse(
            RefusalKind::DpMode,
            format!(
                "client is configured for dp mode `{}`, this federation runs `{}`",
                hello.dp_mode, cfg.dp.mode
            ),
        );
    }
    if hello.input_dim as usize != spec.inputs() || hello.num_classes as usize > spec.outputs() {
        return refuse(
            RefusalKind::Model,
            format!(
                "client data has {} features and {} classes; the model takes {} features and {} classes",
                hello.input_dim,
                hello.num_classes,
                spec.inputs(),
                spec.outputs()
            ),
        );
    }
    // Class names (string labels, `classes=`): the same list in the same order as the
    // federation's, or a label index would mean another class on this node. Held locked
    // until this hello is decided, so two nodes joining at once cannot both set the list.
    let mut federation_classes = match classes.lock() {
        Ok(c) => c,
        Err(e) => return refuse(RefusalKind::Unavailable, e.to_string()),
    };
    if let Some(detail) = class_mismatch(&hello.class_names, federation_classes.names()) {
        return refuse(RefusalKind::Model, detail);
    }
    // The key binding is made last, so a hello refused for another reason binds nothing.
    let pinned = match pins.lock() {
        Ok(mut p) => p.check(node, key, &lists),
        Err(_) => Err(AdmissionError::Store("identity store lock poisoned".into())),
    };
    if let Err(e) = pinned {
        if matches!(e, AdmissionError::KeyMismatch { .. }) {
            tracing::error!(%node, "IMPERSONATION ATTEMPT? {e}");
        }
        return refuse(RefusalKind::NotAdmitted, e.to_string());
    }
    // The first admitted node with names fixes them when the test table named none: on
    // disk before its welcome leaves, so a restarted server holds later nodes to them.
    if let Err(e) = federation_classes.adopt(&hello.class_names) {
        tracing::error!(%node, "{e}");
        return refuse(
            RefusalKind::Unavailable,
            format!("the server cannot record the federation's classes: {e}"),
        );
    }
    drop(federation_classes);
    let welcome = Welcome {
        node: node.to_string(),
        spec: spec.clone(),
        spec_hash: spec.hash(),
        dp: DpAgreement {
            mode: cfg.dp.mode,
            noise_multiplier: cfg.dp.noise_multiplier,
            sampling_rate: cfg.dp.sampling_rate,
            delta: cfg.dp.delta,
        },
    };
    let info = NodeInfo {
        num_examples: hello.num_examples,
        num_eval_examples: hello.num_eval_examples,
    };
    Ok((welcome, info, hello.software))
}

/// Why a node's class names do not fit the federation's, naming both lists (`None`: they
/// fit, or one side names none: integer labels are indices, nothing to compare).
pub fn class_mismatch(node: &[String], federation: &[String]) -> Option<String> {
    if node.is_empty() || federation.is_empty() || node == federation {
        return None;
    }
    let show = |v: &[String]| printable(&v.join("|"), 400);
    Some(format!(
        "this node's classes are {} but the federation's are {}: every node must list the \
         same class names in the same order (csv option classes=...), or a label index would \
         mean another class here",
        show(node),
        show(federation)
    ))
}

/// Installs a tracing subscriber that logs to stderr (`RUST_LOG` overrides `default`).
/// Before, the subscriber wrote to stdout (the fmt default), so `2> server.log` stayed
/// empty and redirected logs carried the colour choice made for stderr.
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    // Logs go to stderr (stdout carries only the final result line), with colour codes
    // only on a terminal and never with NO_COLOR set.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod chance_tests {
    use super::ChanceWatch;

    #[test]
    fn warns_once_after_three_rounds_at_chance() {
        // The issue's run: loss 0.6934, accuracy 0.4985, balanced test labels.
        let labels: Vec<i64> = (0..100).map(|i| i % 2).collect();
        let mut w = ChanceWatch::new(2, Some(&labels));
        assert!(w.observe(Some(0.6935), Some((0.49, 0.6934))).is_none());
        assert!(w.observe(Some(0.6934), Some((0.50, 0.6933))).is_none());
        let msg = w.observe(Some(0.6934), Some((0.4985, 0.6934))).unwrap();
        assert!(msg.contains("chance level"), "{msg}");
        assert!(
            w.observe(Some(0.6934), Some((0.4985, 0.6934))).is_none(),
            "once"
        );
        // A learning model is not flagged.
        let mut w = ChanceWatch::new(2, Some(&labels));
        for (l, a) in [(0.6, 0.7), (0.4, 0.85), (0.3, 0.9), (0.25, 0.92)] {
            assert!(w.observe(Some(l), Some((a, l))).is_none());
        }
        // Without test data the training loss against ln(classes) decides.
        let mut w = ChanceWatch::new(10, None);
        let ln10 = 10f64.ln();
        assert!(w.observe(Some(ln10), None).is_none());
        assert!(w.observe(Some(ln10), None).is_none());
        assert!(w.observe(Some(ln10 * 1.01), None).is_some());
    }
}

#[cfg(test)]
mod class_tests {
    use super::class_mismatch;

    #[test]
    fn class_lists_must_match_in_order_and_the_refusal_names_both() {
        let v = |s: &str| s.split('|').map(String::from).collect::<Vec<_>>();
        assert_eq!(class_mismatch(&v("a|b"), &v("a|b")), None);
        // Integer labels (no names) on either side: nothing to compare.
        assert_eq!(class_mismatch(&[], &v("a|b")), None);
        assert_eq!(class_mismatch(&v("a|b"), &[]), None);
        let e = class_mismatch(&v("b|a"), &v("a|b")).unwrap();
        assert!(e.contains("are b|a but the federation's are a|b"), "{e}");
        assert!(class_mismatch(&v("a|b|c"), &v("a|b")).is_some());
    }
}
