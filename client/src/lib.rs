//! The dpfl client node: loads the organisation's private data, trains the MLP locally with
//! libtorch on a thread of its own, clips and noises the update as the federation's DP
//! mode demands, and exchanges messages with the server over QUIC with mutual TLS.
//!
//! - [`worker`]: the training thread (model, data, privatization).
//! - [`node`]: connection, handshake, request loop, reconnection with backoff.
//! - [`secure`]: the node's side of secure aggregation (held update, the five stages).
//! - [`predict`]: what `dpfl-predict` does (a saved model applied to a data set).
//!
//! It knows nothing about aggregation.

pub mod budget;
pub mod node;
pub mod predict;
pub mod secure;
pub mod worker;

use dpfl_certs::Credentials;
use dpfl_common::config::DpMode;
use dpfl_common::dp::{GaussianNoise, OpenDpGaussian};
use dpfl_ml::{DataSource, Shard};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use node::{NodeError, NodeSummary};

/// Everything a client node needs, validated.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address (ignored when `server_host` is set).
    pub server: SocketAddr,
    /// `host:port` of the server, resolved before every connection attempt (a DNS failure
    /// is retried with backoff like any other); `None`: `server` as given.
    pub server_host: Option<String>,
    /// Seconds one connection attempt may take before the node tries again (a dead
    /// address answers nothing).
    pub connect_timeout: Duration,
    /// The name this node is meant to have (`--name`): a certificate with another name
    /// is reported (the server knows a node by its certificate).
    pub expected_name: Option<String>,
    /// Name on the server certificate.
    pub server_name: String,
    /// CA, certificate and key.
    pub credentials: Credentials,
    /// Private data.
    pub data: DataSource,
    /// Take only this slice of the data (demos, tests).
    pub shard: Option<Shard>,
    /// Seed of the shard permutation (the same for all nodes of a demo).
    pub shard_seed: u64,
    /// Use at most this many examples (after sharding).
    pub limit: Option<usize>,
    /// Fraction of the local data held out for federated evaluation.
    pub val_fraction: f64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// libtorch intra-op threads.
    pub threads: usize,
    /// CPUs the trainer thread is pinned to (empty: not pinned).
    pub pin_cpus: Vec<usize>,
    /// DP mode the node agrees to.
    pub dp_mode: DpMode,
    /// The node's own privacy policy: noise floor, budget, delta.
    pub policy: budget::Policy,
    /// Where the node keeps its privacy spend across restarts (`None`: in memory; only
    /// for tests, a restart would forget the spend).
    pub privacy_state: Option<PathBuf>,
    /// Largest message accepted.
    pub max_message_bytes: usize,
    /// Give up after this long without a working connection.
    pub give_up_after: Duration,
    /// QUIC idle timeout: a server silent this long is presumed dead and the node
    /// reconnects (keep-alives every third of it keep a healthy connection open).
    pub idle_timeout: Duration,
    /// Per-round JSON lines of the node's own record.
    pub log_file: Option<PathBuf>,
    /// Noise sampler for local mode.
    pub sampler: NoiseSampler,
    /// The model this node agrees to train (`--model`, `--layers`): checked against its
    /// data before it connects, and against the server's spec hash at join. `None`:
    /// whatever the server announces.
    pub model: Option<dpfl_common::ModelSpec>,
    /// The node takes part only in securely aggregated exchanges (`--secure-aggregation`):
    /// it refuses a train request without secure aggregation and a request for its feature
    /// statistics in the clear, whatever the server says. Always so in DP mode
    /// `distributed`.
    pub secure_aggregation: bool,
    /// What this node assumes of secure-aggregation rounds: it refuses a round whose
    /// announced (n, k, t) does not keep its input private against a curious server
    /// colluding with this fraction of the participants, with this fraction dropping out
    /// (`dpfl_secagg::params::is_secure`), whatever the server chose. Default
    /// [`default_secagg_threat`] (0.05 and 0.05, the server finder's defaults).
    pub secagg_threat: dpfl_secagg::params::ThreatModel,
}

/// The secure-aggregation threat a node assumes unless told otherwise: the server
/// finder's defaults (5 % colluding, 5 % dropping out, a curious server).
pub fn default_secagg_threat() -> dpfl_secagg::params::ThreatModel {
    dpfl_secagg::params::ThreatModel {
        adversarial_rate: 0.05,
        dropout_rate: 0.05,
        adversary: dpfl_secagg::params::AdversaryClass::CuriousServer,
    }
}

impl ClientConfig {
    /// Defaults for a node of the dev federation.
    pub fn new(server: SocketAddr, credentials: Credentials, data: DataSource) -> Self {
        Self {
            server,
            server_host: None,
            connect_timeout: Duration::from_secs(5),
            expected_name: None,
            server_name: "localhost".into(),
            credentials,
            data,
            shard: None,
            shard_seed: 0,
            limit: None,
            val_fraction: 0.0,
            device: "auto".into(),
            threads: 1,
            pin_cpus: Vec::new(),
            dp_mode: DpMode::None,
            policy: budget::Policy::default(),
            privacy_state: None,
            max_message_bytes: dpfl_common::wire::DEFAULT_MAX_MESSAGE_BYTES,
            give_up_after: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(10),
            log_file: None,
            sampler: NoiseSampler::Opendp,
            model: None,
            secure_aggregation: false,
            secagg_threat: default_secagg_threat(),
        }
    }
}

/// Loads the node's data as the config says: the shard (seeded shuffle), the limit, then
/// the validation split. Returns (train, validation).
pub fn prepare_data(cfg: &ClientConfig) -> Result<(dpfl_ml::Dataset, dpfl_ml::Dataset), NodeError> {
    let data = cfg
        .data
        .load()
        .map_err(|e| NodeError::Setup(e.to_string()))?;
    // Missing values (missing=mean) stay NaN until the federation's transform imputes
    // them; a node asked to train without one refuses (`worker`).
    let mut data = match cfg.shard {
        Some(s) => data.subset(&s.indices(data.len(), cfg.shard_seed)),
        None => data,
    };
    if let Some(n) = cfg.limit {
        data = data.take(n);
    }
    if data.is_empty() {
        return Err(NodeError::Setup("no training data".into()));
    }
    Ok(data.split_validation(cfg.val_fraction, cfg.shard_seed ^ 0x5eed))
}

/// Which noise sampler a node uses in local mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseSampler {
    /// opendp's exact sampler (default).
    #[default]
    Opendp,
    /// The grid discrete Gaussian (`GridGaussian`): floating-point safe, ~1000x faster,
    /// statistical distance per coordinate below 5e-14 (see its docs).
    Grid,
}

impl std::str::FromStr for NoiseSampler {
    type Err = NodeError;
    fn from_str(s: &str) -> Result<Self, NodeError> {
        match s {
            "opendp" => Ok(Self::Opendp),
            "grid" => Ok(Self::Grid),
            other => Err(NodeError::Setup(format!(
                "unknown sampler {other:?}: use opendp or grid"
            ))),
        }
    }
}

/// Checks the node's own certificate before anything else: it must exist, not be expired
/// (an expired certificate is refused by the server; the message names the expiry), and
/// carry the expected name. Returns warnings (a name that differs from `--name`, an expiry
/// within 30 days).
pub fn preflight(cfg: &ClientConfig) -> Result<Vec<String>, NodeError> {
    let path = &cfg.credentials.cert;
    let info = dpfl_certs::describe_file(path).map_err(|e| NodeError::Setup(e.to_string()))?;
    let now = std::time::SystemTime::now();
    let mut warnings = Vec::new();
    let left = info.seconds_left(now);
    if left <= 0 {
        return Err(NodeError::Authentication(format!(
            "this node's certificate {} {}; the server refuses it. Ask the operator to renew \
             it (dpfl-certs renew --cert {}: same key, same identity)",
            path.display(),
            info.expiry(now),
            path.file_name().map_or("-".into(), |f| f.to_string_lossy())
        )));
    }
    if left < 30 * 86_400 {
        warnings.push(format!(
            "this node's certificate {} {}: ask the operator to renew it",
            path.display(),
            info.expiry(now)
        ));
    }
    match (&info.role, &cfg.expected_name) {
        (dpfl_certs::Role::Node { name }, Some(want)) if name != want => {
            warnings.push(format!(
                "the certificate {} names node `{name}`, not `{want}` (--name): the server will \
                 know this node as `{name}`",
                path.display()
            ));
        }
        (dpfl_certs::Role::Node { .. }, _) => {}
        (other, _) => {
            return Err(NodeError::Setup(format!(
                "{} is not a node certificate: it is a {other}",
                path.display()
            )))
        }
    }
    Ok(warnings)
}

/// Loads the data, starts the training worker and runs the node until training ends.
pub async fn run(cfg: ClientConfig) -> Result<NodeSummary, NodeError> {
    let noise: Box<dyn GaussianNoise> = match cfg.sampler {
        NoiseSampler::Opendp => Box::new(OpenDpGaussian::with_threads(1)),
        NoiseSampler::Grid => Box::new(dpfl_common::dp::GridGaussian::default()),
    };
    run_with_noise(cfg, noise).await
}

/// As [`run`] with a given noise source (tests; nodes use opendp).
pub async fn run_with_noise(
    cfg: ClientConfig,
    noise: Box<dyn GaussianNoise>,
) -> Result<NodeSummary, NodeError> {
    cfg.dp_mode
        .ensure_supported()
        .map_err(|e| NodeError::Setup(e.to_string()))?;
    for w in preflight(&cfg)? {
        tracing::warn!("{w}");
    }
    let setup = |e: &dyn std::fmt::Display| NodeError::Setup(e.to_string());
    let (train, val) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || prepare_data(&cfg))
            .await
            .map_err(|e| setup(&e))??
    };
    let data_dim = train.dim;
    let num_classes = train.num_classes().max(val.num_classes());
    if let Some(spec) = &cfg.model {
        if data_dim != spec.inputs() || num_classes > spec.outputs() {
            return Err(NodeError::Setup(format!(
                "{} has {data_dim} features and {num_classes} classes; the model {spec} \
                 (--model) takes {} features and {} classes",
                cfg.data,
                spec.inputs(),
                spec.outputs()
            )));
        }
    }
    let device = dpfl_ml::model::parse_device(&cfg.device).map_err(|e| setup(&e))?;
    tracing::info!(
        examples = train.len(),
        validation = val.len(),
        features = data_dim,
        device = %dpfl_ml::model::device_name(device),
        "loaded {}{}",
        cfg.data,
        cfg.shard.map_or(String::new(), |s| format!(" shard {}/{}", s.index, s.count))
    );
    let input_dim = data_dim;
    let (num_examples, num_eval_examples) = (train.len(), val.len());
    let worker = worker::Worker::start(device, cfg.threads, &cfg.pin_cpus, train, val, noise)
        .map_err(|e| setup(&e))?;
    let ncfg = node::NodeConfig {
        server: cfg.server,
        server_host: cfg.server_host,
        connect_timeout: cfg.connect_timeout,
        server_name: cfg.server_name,
        credentials: cfg.credentials,
        dp_mode: cfg.dp_mode,
        policy: cfg.policy,
        privacy_state: cfg.privacy_state,
        max_message_bytes: cfg.max_message_bytes,
        idle_timeout: cfg.idle_timeout,
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(10),
        give_up_after: cfg.give_up_after,
        input_dim,
        num_classes,
        num_examples,
        num_eval_examples,
        class_names: match &cfg.data {
            DataSource::Csv { options, .. } => options.classes.clone().unwrap_or_default(),
            _ => Vec::new(),
        },
        log_file: cfg.log_file,
        model: cfg.model,
        secure_aggregation: cfg.secure_aggregation,
        secagg_threat: cfg.secagg_threat,
    };
    node::run(ncfg, worker).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_values_wait_for_the_federated_transform() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "a,b,y\n1,2,0\n3,NA,1\n").unwrap();
        let creds = Credentials {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("n.pem"),
            key: dir.path().join("n.key"),
        };
        let src = |o: &str| format!("csv:{},{o}", p.display()).parse().unwrap();
        let mut cfg = ClientConfig::new("127.0.0.1:1".parse().unwrap(), creds, src("missing=mean"));
        // Loaded with the gap kept (NaN): the federation's transform imputes it; training
        // without one is refused by the worker.
        let (train, _) = prepare_data(&cfg).unwrap();
        assert_eq!(train.features.iter().filter(|v| v.is_nan()).count(), 1);
        // Refused by the parser already, naming line and column, without missing=mean.
        cfg.data = src("label=y");
        let e = prepare_data(&cfg).unwrap_err().to_string();
        assert!(e.contains("line 3, column 2"), "{e}");
    }
}
