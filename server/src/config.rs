//! Server configuration: a TOML file, overridden by command-line flags and `--set
//! key.path=value`, validated into one struct before anything runs.

use crate::coordinator::UpdateLimits;
use crate::strategy::{DpParams, FedAvgConfig, TrainSettings};
use dpfl_common::model::ModelSpec;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// File could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or unknown keys.
    #[error("configuration: {0}")]
    Parse(String),
    /// A value out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Admission control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// If non-empty, only these node names or `sha256:<hex>` fingerprints may join.
    pub allow: Vec<String>,
    /// Revoked node names or `sha256:<hex>` fingerprints.
    pub deny: Vec<String>,
    /// A file with more allow/deny entries (`allow NAME`, `deny NAME`, one per line),
    /// re-read on every connection so revocations apply without a restart.
    pub lists_file: Option<PathBuf>,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Most TLS handshakes started per second (excess connections are refused). Only
    /// peers that proved their address (by answering a stateless retry) count.
    pub handshakes_per_sec: u32,
    /// Most handshakes in progress (TLS and hello not yet done) from one IP address;
    /// more are refused until some finish. Loopback tests run every node from one address,
    /// so keep it above the number of nodes that may (re)connect at once from one host.
    pub max_handshakes_per_source: usize,
    /// Seconds a peer may take to complete the TLS handshake.
    pub handshake_timeout_secs: f64,
    /// Seconds an authenticated peer may take to send its hello.
    pub hello_timeout_secs: f64,
    /// Refused connection attempts are counted and logged as one line per this many
    /// seconds (by reason), not one line each.
    pub refusal_log_secs: f64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            lists_file: None,
            max_connections: 2048,
            handshakes_per_sec: 500,
            max_handshakes_per_source: 32,
            handshake_timeout_secs: 5.0,
            hello_timeout_secs: 5.0,
            refusal_log_secs: 10.0,
        }
    }
}

/// Which network `[model]` describes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Dense layers `model.layers`.
    #[default]
    Mlp,
    /// Convolutions then dense layers, `[model.cnn]`.
    Cnn,
    /// A TorchScript module, `[model.torchscript]`.
    TorchScript,
}

/// The TorchScript module of `model.kind = "torchscript"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptConfig {
    /// The module file (`torch.jit.script(m).save(path)`).
    pub path: Option<PathBuf>,
    /// Features per row the module takes (`[batch, inputs]`).
    pub inputs: usize,
    /// Classes (the module returns `[batch, classes]` logits).
    pub classes: usize,
}

/// The CNN of `model.kind = "cnn"`: `kernel x kernel` convolutions (same padding, ReLU,
/// 2x2 max pooling) with `channels` outputs each, then dense layers `hidden` (ReLU) and
/// `classes` logits. The default is the CNN of the FedAvg paper for 28x28 grey images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CnnConfig {
    /// `[channels, height, width]` of one example (rows are read in this order).
    pub input: [usize; 3],
    /// Output channels of each convolution.
    pub channels: Vec<usize>,
    /// Kernel size (odd).
    pub kernel: usize,
    /// Hidden dense widths after the convolutions.
    pub hidden: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            input: [1, 28, 28],
            channels: vec![32, 64],
            kernel: 5,
            hidden: vec![512],
            classes: 10,
        }
    }
}

/// Model section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// `mlp` (the default) or `cnn`.
    pub kind: ModelKind,
    /// Layer widths of the MLP, input to output.
    pub layers: Vec<usize>,
    /// The CNN (used when `kind = "cnn"`).
    pub cnn: CnnConfig,
    /// The TorchScript module (used when `kind = "torchscript"`).
    pub torchscript: ScriptConfig,
    /// Seed of the initial parameters.
    pub init_seed: u64,
    /// Warm start: the first global model is this safetensors file's weights (names and
    /// shapes must be the model's) instead of a seeded initialisation.
    pub init_model: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Mlp,
            layers: ModelSpec::default().layers,
            cnn: CnnConfig::default(),
            torchscript: ScriptConfig::default(),
            init_seed: 0,
            init_model: None,
        }
    }
}

impl ModelConfig {
    /// The model spec this section describes.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        let spec = match self.kind {
            ModelKind::Mlp => ModelSpec::new(self.layers.clone()),
            ModelKind::Cnn => {
                let c = &self.cnn;
                ModelSpec::cnn(c.input, c.channels.clone(), c.kernel, &c.hidden, c.classes)
            }
            ModelKind::TorchScript => {
                let t = &self.torchscript;
                let path = t.path.as_ref().ok_or_else(|| {
                    ConfigError::Invalid(
                        "model.kind = \"torchscript\" needs model.torchscript.path".into(),
                    )
                })?;
                if t.inputs == 0 || t.classes == 0 {
                    return Err(ConfigError::Invalid(
                        "model.torchscript.inputs and .classes must be >= 1".into(),
                    ));
                }
                return dpfl_ml::torchscript::script_spec(path, t.inputs, t.classes)
                    .map_err(|e| ConfigError::Invalid(format!("model.torchscript: {e}")));
            }
        };
        spec.map_err(|e| ConfigError::Invalid(format!("model: {e}")))
    }

    /// The first global model: `init_model`'s weights when set (checked against the
    /// spec), else the seeded initialisation of `init_seed`.
    pub fn initial_params(&self, spec: &ModelSpec) -> Result<Vec<f32>, ConfigError> {
        match &self.init_model {
            Some(path) => dpfl_ml::export::load_params_for(spec, path)
                .map_err(|e| ConfigError::Invalid(format!("model.init_model: {e}"))),
            // A module starts from the weights saved in its file.
            None if spec.is_script() => dpfl_ml::torchscript::module_params(spec)
                .map_err(|e| ConfigError::Invalid(format!("model.torchscript: {e}"))),
            None => Ok(dpfl_common::model::init_params(spec, self.init_seed)),
        }
    }

    /// What a checkpoint must agree on. An MLP without a warm start reads as it did before
    /// `kind`, `cnn` and `init_model` existed, so older checkpoints still resume.
    pub fn fingerprint(&self) -> String {
        if self.kind == ModelKind::Mlp && self.init_model.is_none() {
            format!(
                "ModelConfig {{ layers: {:?}, init_seed: {:?} }}",
                self.layers, self.init_seed
            )
        } else {
            format!("{self:?}")
        }
    }
}

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Directory with `ca.pem`, `server.pem`, `server.key` (see `dpfl-certs`).
    pub certs_dir: PathBuf,
    /// Rounds to run.
    pub rounds: u64,
    /// Connected clients required before a round starts.
    pub min_clients: usize,
    /// Seconds a training round may take.
    pub round_timeout_secs: f64,
    /// Seconds a federated evaluation may take.
    pub eval_timeout_secs: f64,
    /// Re-selections of a round that misses its quorum before it is abandoned (with DP on,
    /// the same sample is asked again; `central` rounds are released after the last one).
    pub max_round_retries: u32,
    /// Output directory: metrics.jsonl, ledger.json, model.safetensors, checkpoint.
    pub out_dir: PathBuf,
    /// Held-out test data for centralised evaluation (`fashion-mnist-test`, `idx:...`,
    /// `csv:...`), or none.
    pub test_data: Option<String>,
    /// Evaluate on at most this many test examples.
    pub test_limit: Option<usize>,
    /// Largest message accepted from a client, in bytes. Absent: derived from the model
    /// (see [`ServerConfig::message_limit`]), which is what answers can legitimately need.
    pub max_message_bytes: Option<usize>,
    /// QUIC idle timeout in seconds (keep-alives every third of it keep training peers alive).
    pub idle_timeout_secs: f64,
    /// Resume from `out_dir/checkpoint.json` when it exists.
    pub resume: bool,
    /// Model.
    pub model: ModelConfig,
    /// Local training settings sent to clients.
    pub train: TrainSettings,
    /// Strategy (selection, aggregation, server optimizer, federated evaluation).
    pub strategy: FedAvgConfig,
    /// Differential privacy.
    pub dp: DpParams,
    /// Admission control.
    pub admission: AdmissionConfig,
    /// Bounds on every update (magnitude, norm, claimed weight).
    pub update_limits: UpdateLimits,
    /// Threads for centralised evaluation (libtorch intra-op).
    pub eval_threads: usize,
    /// Central-mode noise sampler: `opendp` (exact, default) or `grid` (floating-point-safe
    /// discrete Gaussian on a power-of-two grid, ~1000x faster; see `GridGaussian`).
    pub noise_sampler: String,
    /// Operator status endpoint (`/` dashboard, `/status` JSON, `/metrics` Prometheus), off
    /// when absent. It shows operator-only data (who takes part, timings, failures): bind
    /// it to loopback and reach it through an SSH tunnel or an authenticating proxy.
    pub http_listen: Option<SocketAddr>,
    /// Seconds between the log lines that say whom an open round (or the start of the
    /// next one) is waiting for.
    pub status_log_secs: f64,
    /// Warn when the server's or a node's certificate expires within this many days.
    pub cert_expiry_warn_days: f64,
    /// Seconds the server waits for an already connected node to acknowledge a probe when
    /// a second connection presents the same identity: the newer connection replaces the
    /// older only if the older is silent; otherwise the newer is refused.
    pub duplicate_probe_secs: f64,
    /// When the run in `out_dir` is already complete, how many seconds the server stays up
    /// to tell connecting nodes that training is over before it exits (non-zero).
    pub finished_linger_secs: f64,
    /// Secure aggregation (SecAgg+): the server learns only the sum of the updates.
    pub secure_aggregation: bool,
    /// Secure aggregation settings.
    pub secagg: crate::secure::SecAggConfig,
    /// Federated standardisation of the features before round 1.
    pub standardize: StandardizeSettings,
}

/// Most features federated standardisation handles: the statistics (3 values per feature
/// and one per class, at most `4 x` this many) and the transform (4 per feature) travel as
/// f64 in a message header of at most `wire::MAX_HEADER_BYTES` (`prep` tests the largest).
pub const MAX_STANDARDIZE_FEATURES: usize = 2000;

/// Federated standardisation over QUIC (`crate::prep`): before round 1 the server asks the
/// first `min_clients` nodes for their per-feature count, sum and sum of squares (and label
/// counts), combines them into a mean and standard deviation, and sends that transform to
/// every node (late joiners get the agreed one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StandardizeSettings {
    /// Standardise (off by default).
    pub enabled: bool,
    /// Public ranges the features are clipped to, `lo:hi|lo:hi|...` (or one `lo:hi` for
    /// all); required with DP on. Never derive them from the private data.
    pub bounds: Option<String>,
    /// Noise multiplier of the statistics' Gaussian release; required (> 0) with DP on.
    pub noise_multiplier: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4433".parse().expect("static address"),
            certs_dir: "certs-dev/server".into(),
            rounds: 10,
            min_clients: 2,
            round_timeout_secs: 300.0,
            eval_timeout_secs: 120.0,
            max_round_retries: 2,
            out_dir: "runs/latest".into(),
            test_data: None,
            test_limit: None,
            max_message_bytes: None,
            idle_timeout_secs: 10.0,
            resume: true,
            model: ModelConfig::default(),
            train: TrainSettings::default(),
            strategy: FedAvgConfig::default(),
            dp: DpParams::default(),
            admission: AdmissionConfig::default(),
            update_limits: UpdateLimits::default(),
            eval_threads: 1,
            noise_sampler: "opendp".into(),
            http_listen: None,
            status_log_secs: 30.0,
            cert_expiry_warn_days: 30.0,
            duplicate_probe_secs: 2.0,
            finished_linger_secs: 10.0,
            secure_aggregation: false,
            secagg: crate::secure::SecAggConfig::default(),
            standardize: StandardizeSettings::default(),
        }
    }
}

/// Keys that were removed, with what replaced them (shown instead of "unknown key").
const REMOVED_KEYS: &[(&str, &str)] = &[(
    "seed",
    "removed: deployments select clients with fresh randomness from the OS CSPRNG (a seed \
     would make the sample predictable); `strategy.seed` seeds the nodes' local shuffling",
)];

/// Every dotted key of `input` that `parsed` (the same document after deserialising into
/// the typed configuration and serialising back) does not have: keys the configuration
/// silently ignored, e.g. a misspelled `dp.noise_multipler`. This catches unknown keys in
/// every section, including those `#[serde(flatten)]` keeps `deny_unknown_fields` from
/// covering.
pub fn unknown_keys(input: &toml::Table, parsed: &toml::Table) -> Vec<String> {
    fn walk(prefix: &str, input: &toml::Table, parsed: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in input {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (v, parsed.get(k)) {
                (_, None) => out.push(key),
                (toml::Value::Table(i), Some(toml::Value::Table(p))) => walk(&key, i, p, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk("", input, parsed, &mut out);
    out
}

/// Refuses a configuration with keys the typed structure does not read.
pub fn deny_unknown_keys(input: &toml::Table, parsed: &impl Serialize) -> Result<(), ConfigError> {
    let back = toml::Table::try_from(parsed)
        .map_err(|e| ConfigError::Parse(format!("cannot re-serialise configuration: {e}")))?;
    let unknown = unknown_keys(input, &back);
    if unknown.is_empty() {
        return Ok(());
    }
    let explain: Vec<String> = unknown
        .iter()
        .map(|k| match REMOVED_KEYS.iter().find(|(r, _)| r == k) {
            Some((_, why)) => format!("`{k}`: {why}"),
            None => format!("`{k}`"),
        })
        .collect();
    Err(ConfigError::Parse(format!(
        "unknown configuration key(s) {} (misspelled? every key, with its default, is in \
         docs/config-reference.toml and `dpfl-server config --defaults`)",
        explain.join(", ")
    )))
}

/// Every configuration key with its meaning, and for keys that are unset by default an
/// example value: the source of `dpfl-server config --defaults` (see [`reference`]). A
/// unit test fails when a key of [`ServerConfig`] has no entry here or an entry names no
/// key, so the reference cannot drift from the code.
pub const KEY_DOCS: &[(&str, Option<&str>, &str)] = &[
    ("listen", None, "UDP address the QUIC endpoint listens on (`--listen`)."),
    ("certs_dir", None, "Folder with ca.pem, server.pem and server.key: the server kit made by `dpfl-certs init` (`--certs`). The CA key must not be in it (the server warns)."),
    ("rounds", None, "Rounds to run (`--rounds`)."),
    ("min_clients", None, "Connected clients required before a round starts (`--min-clients`)."),
    ("round_timeout_secs", None, "Deadline of a training round, in seconds, from its requests. Only nodes that are alive but slow use it: a node that dies is noticed within `idle_timeout_secs` and fails the round at once. For rounds of about 2 minutes, 300 leaves room for the slowest node."),
    ("eval_timeout_secs", None, "Deadline of a federated evaluation, in seconds."),
    ("max_round_retries", None, "Re-selections of a round that misses its quorum before it is abandoned (with DP on the same sample is asked again; `central` rounds are released after the last attempt)."),
    ("out_dir", None, "Output folder: metrics.jsonl, ledger.json, summary.json, model.safetensors, checkpoint.bin, identities.json, operator/ (`--out`). A complete run there is never overwritten; `--fresh` starts a new one."),
    ("test_data", Some("\"fashion-mnist-test\""), "Held-out test data for centralised evaluation: fashion-mnist-test, idx:IMAGES,LABELS or csv:PATH[,label=COLUMN] (`--test-data`). Unset: no centralised evaluation."),
    ("test_limit", Some("10000"), "Evaluate on at most this many test examples. Unset: all."),
    ("max_message_bytes", Some("1048576"), "Largest message accepted from a client, in bytes. Unset: derived from the model (prefix + largest header + 4 bytes per parameter), which is what answers can legitimately need."),
    ("idle_timeout_secs", None, "QUIC idle timeout in seconds (at least 3); keep-alives every third of it. A node that is killed or cut off is noticed (and leaves any round) within this time; long local training never looks idle."),
    ("resume", None, "Resume from out_dir/checkpoint.bin when it exists (`--fresh` sets false)."),
    ("eval_threads", None, "libtorch threads for centralised evaluation."),
    ("noise_sampler", None, "Central-mode noise sampler: \"opendp\" (exact) or \"grid\" (floating-point-safe discrete Gaussian on a power-of-two grid, ~1000x faster)."),
    ("http_listen", Some("\"127.0.0.1:9464\""), "Operator status endpoint: `/` dashboard, `/status` JSON, `/metrics` Prometheus text (`--http`). Unset: off. It exposes operator-only data (participants, failures, timings): keep it on loopback and reach it through an SSH tunnel or an authenticating proxy."),
    ("status_log_secs", None, "Seconds between log lines saying whom an open round, or the start of the next round, is waiting for."),
    ("cert_expiry_warn_days", None, "Warn (log and dashboard) when the server's or a connecting node's certificate expires within this many days."),
    ("duplicate_probe_secs", None, "When a second connection presents an identity that is already connected, seconds to wait for the connected one to acknowledge a probe: a silent one is replaced (a restarted node), a live one keeps its seat and the newcomer is refused."),
    ("finished_linger_secs", None, "When the run in out_dir is already complete, seconds the server stays up to tell connecting nodes that training is over before it exits with an error."),
    ("model.layers", None, "Layer widths of the MLP, input to output."),
    ("model.kind", None, "Network: \"mlp\" (dense layers `model.layers`), \"cnn\" (convolutions `model.cnn`, then dense layers) or \"torchscript\" (a module file, `model.torchscript`)."),
    ("model.init_seed", None, "Seed of the initial parameters."),
    ("model.init_model", Some("\"runs/pretrained/model.safetensors\""), "Warm start: the first global model is this safetensors file's weights (every tensor of the model under its name, `fc0.weight`, ..., F32, the model's shape; nothing else). Unset: a seeded initialisation (`model.init_seed`)."),
    ("model.cnn.input", None, "CNN: [channels, height, width] of one example; a row of the data is read in this order."),
    ("model.cnn.channels", None, "CNN: output channels of each convolution (same padding, ReLU, 2x2 max pooling)."),
    ("model.cnn.kernel", None, "CNN: kernel size of the convolutions (odd)."),
    ("model.cnn.hidden", None, "CNN: widths of the hidden dense layers after the convolutions."),
    ("model.cnn.classes", None, "CNN: number of classes."),
    ("model.torchscript.path", Some("\"model.pt\""), "TorchScript: the module file (`torch.jit.script(m).save(path)`); its SHA-256 and parameter names and shapes are part of the spec hash, so every node must hold the same file. The first global model is its saved weights unless `model.init_model` is set."),
    ("model.torchscript.inputs", None, "TorchScript: features per row (the module maps [batch, inputs] to [batch, classes] logits)."),
    ("model.torchscript.classes", None, "TorchScript: number of classes."),
    ("train.epochs", None, "Local epochs per round."),
    ("train.max_steps", Some("100"), "At most this many local steps per round (overrides epochs). Unset: epochs decide."),
    ("train.batch_size", None, "Local batch size."),
    ("train.lr", None, "Learning rate of round 1."),
    ("train.lr_decay", None, "Learning rate of round r = lr * lr_decay^(r-1); in (0, 1]."),
    ("train.optimizer", None, "Local optimizer: \"sgd\" or \"adam\"."),
    ("train.momentum", None, "SGD momentum."),
    ("train.weight_decay", None, "Weight decay."),
    ("train.beta1", None, "Adam beta1."),
    ("train.beta2", None, "Adam beta2."),
    ("train.prox_mu", None, "FedProx proximal term mu (0: plain FedAvg)."),
    ("train.seed", None, "Base of the nodes' shuffling seed (mixed with strategy.seed and the round)."),
    ("strategy.fraction_fit", None, "Fraction of connected clients selected per round without DP (with DP: Poisson sampling at dp.sampling_rate)."),
    ("strategy.min_fit_clients", None, "Quorum: accepted updates needed to aggregate a round that did not hear from everyone; at least this many are selected when available."),
    ("strategy.fraction_evaluate", None, "Fraction of clients asked for federated evaluation (0: none; must be 0 in local DP mode)."),
    ("strategy.evaluate_every", None, "Federated evaluation every this many rounds."),
    ("strategy.seed", None, "Seed mixed into the per-round training seeds (not selection: deployments select from the OS CSPRNG)."),
    ("strategy.aggregator.kind", None, "Aggregation rule: \"mean\", \"median\", \"trimmed_mean\", \"krum\" or \"multi_krum\" (central DP needs the mean)."),
    ("strategy.aggregator.beta", Some("0.1"), "trimmed_mean: fraction trimmed at each end."),
    ("strategy.aggregator.f", Some("2"), "krum / multi_krum: Byzantine clients tolerated."),
    ("strategy.aggregator.m", Some("5"), "multi_krum: updates averaged."),
    ("strategy.server_optimizer.kind", None, "Server optimizer: \"fedavg\", \"fedavgm\", \"fedadagrad\", \"fedadam\" or \"fedyogi\"."),
    ("strategy.server_optimizer.lr", None, "Server learning rate."),
    ("strategy.server_optimizer.beta1", None, "Momentum of FedAvgM; first-moment decay of FedAdam / FedYogi."),
    ("strategy.server_optimizer.beta2", None, "Second-moment decay of FedAdagrad / FedAdam / FedYogi."),
    ("strategy.server_optimizer.tau", None, "Adaptivity (epsilon) of FedAdagrad / FedAdam / FedYogi."),
    ("dp.mode", None, "Differential privacy: \"none\", \"local\" (nodes noise their updates), \"central\" (the server noises the sum) or \"distributed\" (nodes add integer noise shares inside secure aggregation; needs secure_aggregation = true) (`--dp-mode`)."),
    ("dp.noise_multiplier", None, "Noise multiplier z (`--noise-multiplier`)."),
    ("dp.clip_norm", None, "L2 clipping bound C (initial bound with adaptive clipping) (`--clip-norm`)."),
    ("dp.sampling_rate", None, "Poisson client sampling rate q per round (`--sampling-rate`)."),
    ("dp.delta", None, "delta of the reported (epsilon, delta)."),
    ("dp.target_epsilon", Some("8.0"), "Stop before the release that would exceed this epsilon (`--target-epsilon`). Unset: no target."),
    ("dp.audit_canaries", None, "Central mode: virtual canary clients planted for the empirical privacy audit (0: none)."),
    ("dp.adaptive_clipping.target_quantile", Some("0.5"), "Adaptive clipping (Andrew et al.): the quantile of update norms the bound tracks. Unset: fixed clip_norm."),
    ("dp.adaptive_clipping.learning_rate", Some("0.2"), "Adaptive clipping: geometric learning rate of the bound (default 0.2)."),
    ("dp.adaptive_clipping.count_stddev", Some("2.0"), "Adaptive clipping: s.d. of the noise on the unclipped count. Unset: expected participants / 20."),
    ("admission.allow", None, "If non-empty, only these node names or sha256:<hex> certificate fingerprints may join."),
    ("admission.deny", None, "Revoked node names or sha256:<hex> certificate fingerprints."),
    ("admission.lists_file", Some("\"admission.txt\""), "File with more entries (`allow NAME`, `deny NAME`, `rekey NAME sha256:KEY`), re-read on every connection, every round and every 2 s for connected nodes."),
    ("admission.max_connections", None, "Most concurrent client connections."),
    ("admission.handshakes_per_sec", None, "Most TLS handshakes started per second (only peers that answered a stateless retry count)."),
    ("admission.max_handshakes_per_source", None, "Most handshakes in progress from one IP address."),
    ("admission.handshake_timeout_secs", None, "Seconds a peer may take for the TLS handshake."),
    ("admission.hello_timeout_secs", None, "Seconds an authenticated peer may take to send its hello."),
    ("admission.refusal_log_secs", None, "Refused connection attempts are logged as one counted line per this many seconds."),
    ("update_limits.max_abs_value", None, "Largest absolute value of any update coordinate."),
    ("update_limits.max_update_norm", Some("10.0"), "Mode none: largest L2 norm of an update. Unset: unbounded (with DP the clip norm bounds it)."),
    ("update_limits.max_weight_share", None, "Mode none: largest share of a round's total weight one node may carry (1: no cap)."),
    ("update_limits.outlier_factor", None, "Log updates whose norm exceeds this multiple of the round's median norm."),
    ("secure_aggregation", None, "Secure aggregation (SecAgg+, Bonawitz et al. 2017 with the sparse graphs of Bell et al. 2020): nodes send only masked, fixed-point encoded updates and the server learns only their sum. Works with dp.mode \"none\", \"central\" and \"distributed\"; rounds are unweighted (every update counts once); robust aggregators, adaptive clipping and per-update norm checks cannot run (they need individual updates)."),
    ("standardize.enabled", None, "Federated standardisation before round 1: the first min_clients nodes send per-feature count, sum and sum of squares (and label counts); every node standardises with the combined mean and standard deviation (missing=mean imputes it); the model file keeps the transform for dpfl-predict. With secure_aggregation the statistics are secure-summed (one SecAgg+ instance; at least 3 nodes); with dp.mode distributed each node adds its own integer noise share to them (at most secagg.max_contributors nodes, no sum of fewer than secagg.min_contributors decoded)."),
    ("standardize.bounds", Some("\"0:1\""), "Public ranges `lo:hi|lo:hi|...` (or one `lo:hi` for all features) the features are clipped to before they are counted and transformed; required with DP on (they bound the sensitivity) and with secure_aggregation (they give the secure sum's fixed-point range). Never derive them from the private data."),
    ("standardize.noise_multiplier", None, "With DP on: noise multiplier z of the statistics' release (a ledger row of its own, client-level like the training rounds; with dp.mode distributed the summed noise shares of secagg.min_contributors nodes carry it, Skellam or discrete Gaussian on a 20-bit ring); 0 with DP off."),
    ("secagg.stage_timeout_secs", None, "Deadline of each of the five secure-aggregation stages, in seconds; a node that has not answered by then drops out of the round."),
    ("secagg.bits", None, "Ring width b: updates are encoded into integers mod 2^b (16-62; 2-40 with dp.mode \"distributed\", whose encoding sizes its own headroom), with log2(n) bits of headroom so the sum of n cannot wrap."),
    ("secagg.clip_norm", None, "dp.mode \"none\": the L2 norm nodes clip their update to before encoding (the fixed-point range). With central DP, dp.clip_norm is used."),
    ("secagg.dropout_rate", None, "Fraction of a round's participants assumed to drop out (input of the (k, t) finder)."),
    ("secagg.adversarial_rate", None, "Fraction of a round's participants assumed to collude with the server (input of the (k, t) finder)."),
    ("secagg.degree", Some("30"), "Neighbours per node k instead of the finder's choice (set with secagg.threshold; even, or n - 1). Unset: the finder decides per round."),
    ("secagg.threshold", Some("17"), "Shares t needed to reconstruct a node's secrets instead of the finder's choice (set with secagg.degree). Unset: the finder decides per round."),
    ("secagg.mechanism", None, "dp.mode \"distributed\": the nodes' integer noise, \"skellam\" or \"ddgauss\" (the ring width is secagg.bits, at most 40)."),
    ("secagg.min_contributors", Some("10"), "dp.mode \"distributed\": fewest contributors a round accepts; the noise is accounted over this many shares, the threshold t is raised to it, and a sum of fewer survivors is never decoded. Unset: strategy.min_fit_clients (at least 2)."),
    ("secagg.max_contributors", Some("100"), "dp.mode \"distributed\": most contributors a round sums (sizes the modular headroom); a round holding more does not start secure aggregation. Unset: 100."),
];

/// The configuration reference: every key with its default (commented out when unset by
/// default) and its meaning, as TOML that loads (`dpfl-server config --defaults`, checked
/// in as `docs/config-reference.toml`).
pub fn reference() -> Result<String, ConfigError> {
    let table = toml::Table::try_from(ServerConfig::default())
        .map_err(|e| ConfigError::Parse(format!("cannot serialise the defaults: {e}")))?;
    let mut out = String::from(
        "# dpfl-server configuration reference: every key, its default and its meaning.\n\
         # Generated by `dpfl-server config --defaults`; a test keeps it equal to the code.\n\
         # A configuration file needs only the keys it changes; unknown keys are refused.\n\
         # Flags override the file, `--set KEY=VALUE` overrides any key.\n",
    );
    emit_section(&mut out, "", &table)?;
    Ok(out)
}

fn doc_of(key: &str) -> Result<(Option<&'static str>, &'static str), ConfigError> {
    KEY_DOCS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, ex, d)| (*ex, *d))
        .ok_or_else(|| ConfigError::Parse(format!("configuration key `{key}` is undocumented")))
}

fn wrap_comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 92 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

fn emit_section(out: &mut String, prefix: &str, table: &toml::Table) -> Result<(), ConfigError> {
    let full = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    // Leaves of this section: set ones from the defaults, unset ones from the docs.
    let mut leaves: Vec<(String, Option<&toml::Value>)> = table
        .iter()
        .filter(|(_, v)| !v.is_table())
        .map(|(k, v)| (k.clone(), Some(v)))
        .collect();
    let mut subsections: Vec<String> = table
        .iter()
        .filter(|(_, v)| v.is_table())
        .map(|(k, _)| k.clone())
        .collect();
    for (key, example, _) in KEY_DOCS {
        let Some(rest) = (if prefix.is_empty() {
            Some(*key)
        } else {
            key.strip_prefix(prefix).and_then(|r| r.strip_prefix('.'))
        }) else {
            continue;
        };
        match rest.split_once('.') {
            None if example.is_some() && !table.contains_key(rest) => {
                leaves.push((rest.to_string(), None))
            }
            Some((sub, _)) if !table.contains_key(sub) && !subsections.iter().any(|s| s == sub) => {
                subsections.push(sub.to_string())
            }
            _ => {}
        }
    }
    leaves.sort_by(|a, b| a.0.cmp(&b.0));
    subsections.sort();
    for (k, v) in &leaves {
        let key = full(k);
        let (example, doc) = doc_of(&key)?;
        if !out.ends_with("]\n") {
            out.push('\n');
        }
        wrap_comment(out, doc);
        match (v, example) {
            (Some(v), _) => out.push_str(&format!("{k} = {v}\n")),
            (None, Some(ex)) => out.push_str(&format!("# {k} = {ex}\n")),
            (None, None) => {}
        }
    }
    for sub in subsections {
        let key = full(&sub);
        if table.contains_key(&sub) {
            out.push_str(&format!("\n[{key}]\n"));
        } else {
            // A section that is unset by default: shown commented out, like its keys.
            out.push_str(&format!("\n# [{key}]\n"));
        }
        let empty = toml::Table::new();
        let t = table.get(&sub).and_then(|v| v.as_table()).unwrap_or(&empty);
        emit_section(out, &key, t)?;
    }
    Ok(())
}

/// Sets `a.b.c = value` in a TOML table, creating tables on the way.
pub fn set_dotted(
    root: &mut toml::Table,
    key: &str,
    value: toml::Value,
) -> Result<(), ConfigError> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ConfigError::Parse(format!("empty key in {key:?}")))?;
    let mut t = root;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::Parse(format!("{key}: {p} is not a table")))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

/// Parses a `--set` value as TOML (number, bool, array, quoted string), falling back to
/// a bare string.
pub fn parse_value(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    }
}

impl ServerConfig {
    /// Loads a TOML file (or defaults when `path` is `None`) and applies `key=value`
    /// overrides, then validates.
    pub fn load(path: Option<&Path>, overrides: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Io {
                    path: p.to_path_buf(),
                    source,
                })?
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse(e.to_string()))?,
            None => toml::Table::new(),
        };
        for (k, v) in overrides {
            set_dotted(&mut table, k, parse_value(v))?;
        }
        if let Some((k, why)) = REMOVED_KEYS.iter().find(|(k, _)| table.contains_key(*k)) {
            return Err(ConfigError::Parse(format!("configuration key `{k}` {why}")));
        }
        let cfg: ServerConfig = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        deny_unknown_keys(&table, &cfg)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range and consistency checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validated_spec().map(|_| ())
    }

    /// [`ServerConfig::validate`], returning the model spec every check was made against.
    /// A TorchScript module file is read once here; a server keeps this spec for its whole
    /// run (`Server::spec`), whatever later happens to the file.
    pub fn validated_spec(&self) -> Result<ModelSpec, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let spec = self.model.spec()?;
        if self.rounds == 0 {
            return bad("rounds must be >= 1".into());
        }
        if self.min_clients == 0 {
            return bad("min_clients must be >= 1".into());
        }
        if !(self.round_timeout_secs > 0.0 && self.eval_timeout_secs > 0.0) {
            return bad("timeouts must be > 0".into());
        }
        if !(self.strategy.fraction_fit > 0.0 && self.strategy.fraction_fit <= 1.0) {
            return bad(format!(
                "strategy.fraction_fit must be in (0, 1], got {}",
                self.strategy.fraction_fit
            ));
        }
        if !(0.0..=1.0).contains(&self.strategy.fraction_evaluate) {
            return bad("strategy.fraction_evaluate must be in [0, 1]".into());
        }
        if let Some(max) = self.max_message_bytes {
            if max < 1024 {
                return bad("max_message_bytes must be >= 1024".into());
            }
            let needed = dpfl_common::wire::max_message_bytes(spec.num_params());
            if max < needed {
                return bad(format!(
                    "max_message_bytes {max} cannot carry this model ({needed} bytes needed)"
                ));
            }
        }
        let a = &self.admission;
        if a.max_handshakes_per_source == 0 {
            return bad("admission.max_handshakes_per_source must be >= 1".into());
        }
        for (name, v) in [
            ("handshake_timeout_secs", a.handshake_timeout_secs),
            ("hello_timeout_secs", a.hello_timeout_secs),
            ("refusal_log_secs", a.refusal_log_secs),
        ] {
            if !(v > 0.0 && v <= 3600.0) {
                return bad(format!("admission.{name} must be in (0, 3600], got {v}"));
            }
        }
        if self.idle_timeout_secs.is_nan() || self.idle_timeout_secs < 3.0 {
            return bad("idle_timeout_secs must be >= 3".into());
        }
        for (name, v, lo) in [
            ("status_log_secs", self.status_log_secs, 0.1),
            ("cert_expiry_warn_days", self.cert_expiry_warn_days, 0.0),
            ("duplicate_probe_secs", self.duplicate_probe_secs, 0.05),
            ("finished_linger_secs", self.finished_linger_secs, 0.0),
        ] {
            if !(v >= lo && v <= 86_400.0) {
                return bad(format!("{name} must be in [{lo}, 86400], got {v}"));
            }
        }
        self.train
            .base
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(self.train.lr_decay > 0.0 && self.train.lr_decay <= 1.0) {
            return bad("train.lr_decay must be in (0, 1]".into());
        }
        self.dp.validate().map_err(ConfigError::Invalid)?;
        if self.dp.mode == dpfl_common::config::DpMode::Local
            && self.strategy.fraction_evaluate > 0.0
        {
            return bad(
                "strategy.fraction_evaluate must be 0 in local DP mode: an evaluation answer \
                 (exact loss, accuracy and count on a node's data, for a model the server \
                 chooses) is an un-noised query of the data local DP protects from the \
                 server; nodes refuse it too"
                    .into(),
            );
        }
        self.update_limits
            .validate()
            .map_err(ConfigError::Invalid)?;
        if !matches!(self.noise_sampler.as_str(), "opendp" | "grid") {
            return bad(format!(
                "noise_sampler must be opendp or grid, got {:?}",
                self.noise_sampler
            ));
        }
        self.strategy
            .aggregator
            .validate()
            .map_err(ConfigError::Invalid)?;
        self.strategy
            .server_optimizer
            .validate()
            .map_err(ConfigError::Invalid)?;
        self.secagg
            .validate(self.dp.mode == dpfl_common::config::DpMode::Distributed)
            .map_err(ConfigError::Invalid)?;
        if self.dp.mode == dpfl_common::config::DpMode::Distributed {
            if !self.secure_aggregation {
                return bad(
                    "dp.mode = \"distributed\" needs secure aggregation (secure_aggregation = \
                     true): the server must see only the sum of the noised updates"
                        .into(),
                );
            }
            let d = self.secagg.distributed(self.strategy.min_fit_clients);
            let p = d.params(
                self.secagg.bits,
                self.dp.clip_norm,
                self.dp.noise_multiplier,
                spec.num_params(),
            );
            p.validate()
                .map_err(|e| ConfigError::Invalid(format!("distributed DP: {e}")))?;
            if let Some(t) = self.secagg.threshold {
                if (t as usize) < d.min_contributors {
                    return bad(format!(
                        "secagg.threshold {t} is below secagg.min_contributors {}: rounds would \
                         unmask sums carrying less noise than accounted",
                        d.min_contributors
                    ));
                }
            }
        }
        self.validate_standardize(&spec)?;
        if self.secure_aggregation {
            use dpfl_common::config::DpMode;
            if self.dp.mode == DpMode::Local {
                return bad(
                    "secure_aggregation works with dp.mode none, central or distributed, not \
                     local"
                        .into(),
                );
            }
            if !self.strategy.aggregator.is_streaming() {
                return bad(
                    "secure_aggregation needs strategy.aggregator.kind = \"mean\": robust rules \
                     need individual updates, which the server never sees"
                        .into(),
                );
            }
            if self.dp.adaptive_clipping.is_some() {
                return bad(
                    "secure_aggregation cannot run adaptive clipping: it needs each node's \
                     clipped bit, which the server never sees"
                        .into(),
                );
            }
        }
        Ok(spec)
    }

    /// The `[standardize]` section: bounds that parse for the model's inputs; with DP on,
    /// bounds and a positive noise multiplier; with secure aggregation, bounds and at least
    /// 3 clients; with `distributed`, statistics' parameters the accountant accepts and
    /// at most `secagg.max_contributors` clients to wait for (see `crate::prep`).
    fn validate_standardize(&self, spec: &ModelSpec) -> Result<(), ConfigError> {
        let st = &self.standardize;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !st.enabled {
            return Ok(());
        }
        // The statistics and the transform travel as f64 in a message header (at most
        // 64 KiB): the transform with bounds is 32 bytes per feature.
        let (d, k) = (spec.inputs(), spec.outputs());
        if d > MAX_STANDARDIZE_FEATURES || 3 * d + k > 4 * MAX_STANDARDIZE_FEATURES {
            return bad(format!(
                "standardize supports at most {MAX_STANDARDIZE_FEATURES} features and 3 x \
                 features + classes <= {} (the statistics travel in a message header); the \
                 model has {d} features and {k} classes",
                4 * MAX_STANDARDIZE_FEATURES
            ));
        }
        if let Some(b) = &st.bounds {
            dpfl_ml::standardize::Bounds::parse(b, spec.inputs())
                .map_err(|e| ConfigError::Invalid(format!("standardize.bounds: {e}")))?;
        }
        if !(st.noise_multiplier.is_finite() && st.noise_multiplier >= 0.0) {
            return bad("standardize.noise_multiplier must be finite and >= 0".into());
        }
        if self.dp.mode == dpfl_common::config::DpMode::Distributed && self.secure_aggregation {
            // The statistics are one more distributed release (`crate::prep`): the nodes'
            // integer noise shares at the statistics' own public parameters.
            let d = self.secagg.distributed(self.strategy.min_fit_clients);
            if self.min_clients > d.max_contributors {
                return bad(format!(
                    "standardize with dp.mode distributed sums the statistics of at most \
                     secagg.max_contributors = {} nodes, fewer than min_clients = {}",
                    d.max_contributors, self.min_clients
                ));
            }
            if st.noise_multiplier > 0.0 {
                d.params(
                    crate::prep::STATS_DISTRIBUTED_BITS,
                    ((3 * spec.inputs() + 1) as f64).sqrt(),
                    st.noise_multiplier,
                    3 * spec.inputs() + spec.outputs(),
                )
                .validate()
                .map_err(|e| {
                    ConfigError::Invalid(format!("standardize with distributed DP: {e}"))
                })?;
            }
        }
        if self.secure_aggregation {
            // The statistics are securely summed (`crate::prep`): one SecAgg+ instance of
            // at least 3 participants over fixed-point values whose range comes from the
            // public bounds.
            if st.bounds.is_none() {
                return bad(
                    "standardize with secure_aggregation needs standardize.bounds: the \
                     fixed-point range of the statistics' secure sum comes from the public \
                     ranges"
                        .into(),
                );
            }
            if self.min_clients < 3 {
                return bad(format!(
                    "standardize with secure_aggregation needs min_clients >= 3 (a secure sum \
                     has at least 3 participants), got {}",
                    self.min_clients
                ));
            }
        }
        if self.dp.mode.is_private() {
            if st.bounds.is_none() || st.noise_multiplier <= 0.0 {
                return bad(
                    "standardize with DP on needs standardize.bounds and a positive \
                     standardize.noise_multiplier: the statistics are a release too"
                        .into(),
                );
            }
        } else if st.noise_multiplier > 0.0 {
            return bad(
                "standardize.noise_multiplier is for DP on (dp.mode central or local); with \
                 dp.mode none the statistics are exact"
                    .into(),
            );
        }
        Ok(())
    }

    /// The model spec, made again on every call: a TorchScript module file is read
    /// again, and a file that cannot be read gives the default MLP. For tools and tests;
    /// a server uses the spec it resolved once ([`ServerConfig::validated_spec`]).
    pub fn spec(&self) -> ModelSpec {
        // `validate` (run by `load` and by the server before anything else) checked it.
        self.model.spec().unwrap_or_default()
    }

    /// The largest message read from a client for the model of [`ServerConfig::spec`]
    /// (see [`ServerConfig::message_limit_for`]).
    pub fn message_limit(&self) -> usize {
        self.message_limit_for(&self.spec())
    }

    /// The largest message read from a client: `max_message_bytes` when set, else the
    /// largest legitimate message for `spec` (prefix + largest header + a full parameter
    /// vector), e.g. 0.9 MB for a 200k-parameter model instead of a fixed 64 MiB.
    pub fn message_limit_for(&self, spec: &ModelSpec) -> usize {
        self.max_message_bytes
            .unwrap_or_else(|| dpfl_common::wire::max_message_bytes(spec.num_params()))
    }

    /// Round deadline.
    pub fn round_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.round_timeout_secs)
    }

    /// The parts of the configuration that must not change across a resume.
    pub fn fingerprint(&self) -> String {
        format!(
            "{}|{:?}|{:?}|{:?}{}",
            self.model.fingerprint(),
            self.dp,
            self.strategy,
            self.train,
            if self.secure_aggregation {
                "|secure_aggregation"
            } else {
                ""
            }
        ) + &if self.standardize.enabled {
            format!("|{:?}", self.standardize)
        } else {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_section_selects_a_cnn_and_a_warm_start() {
        let o = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = ServerConfig::load(None, &o(&[("model.kind", "\"cnn\"")])).unwrap();
        assert_eq!(c.spec().to_arg(), "cnn:1x28x28:32,64:5:512,10");
        assert_eq!(c.spec().num_params(), 1_663_370);
        let small = ServerConfig::load(
            None,
            &o(&[
                ("model.kind", "\"cnn\""),
                ("model.cnn.channels", "[8, 16]"),
                ("model.cnn.hidden", "[]"),
            ]),
        )
        .unwrap();
        assert_eq!(small.spec().to_arg(), "cnn:1x28x28:8,16:5:10");
        assert_ne!(small.fingerprint(), c.fingerprint());
        let bad = ServerConfig::load(
            None,
            &o(&[("model.kind", "\"cnn\""), ("model.cnn.kernel", "4")]),
        );
        assert!(matches!(bad, Err(ConfigError::Invalid(m)) if m.contains("kernel")));
        assert!(ServerConfig::load(None, &o(&[("model.kind", "\"rnn\"")])).is_err());

        // An MLP without a warm start fingerprints as before `kind` existed (old
        // checkpoints resume).
        let d = ServerConfig::default();
        assert!(d
            .fingerprint()
            .starts_with("ModelConfig { layers: [784, 200, 200, 10], init_seed: 0 }|"));

        // The warm start is read against the spec, with the file named in the error.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        let spec = ModelSpec::new(vec![4, 3]).unwrap();
        let params: Vec<f32> = (0..15).map(|i| i as f32).collect();
        dpfl_ml::export::save_safetensors(&spec, &params, &file).unwrap();
        let path = format!("{:?}", file.display().to_string());
        let warm = ServerConfig::load(
            None,
            &o(&[("model.layers", "[4, 3]"), ("model.init_model", &path)]),
        )
        .unwrap();
        assert_eq!(warm.model.initial_params(&warm.spec()).unwrap(), params);
        assert_ne!(warm.fingerprint(), d.fingerprint());
        let other = ServerConfig::load(
            None,
            &o(&[("model.layers", "[4, 2]"), ("model.init_model", &path)]),
        )
        .unwrap();
        let e = other.model.initial_params(&other.spec()).unwrap_err();
        assert!(
            e.to_string().contains("model.init_model") && e.to_string().contains("w.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn secure_aggregation_is_refused_where_it_cannot_hold() {
        let load = |o: &[(&str, &str)]| {
            let o: Vec<(String, String)> = o
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ServerConfig::load(None, &o)
        };
        assert!(load(&[("secure_aggregation", "true")]).is_ok());
        assert!(load(&[("secure_aggregation", "true"), ("dp.mode", "\"central\"")]).is_ok());
        for bad in [
            vec![("dp.mode", "\"local\"")],
            vec![("strategy.aggregator.kind", "\"median\"")],
            vec![
                ("dp.mode", "\"central\""),
                ("dp.adaptive_clipping.target_quantile", "0.5"),
            ],
            vec![("secagg.bits", "8")],
            vec![("secagg.degree", "30")],
            vec![("secagg.stage_timeout_secs", "0")],
        ] {
            let mut o = vec![("secure_aggregation", "true")];
            o.extend(bad.iter().copied());
            assert!(load(&o).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn standardize_is_refused_where_its_release_would_not_hold() {
        let load = |o: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = vec![
                ("standardize.enabled".into(), "true".into()),
                ("model.layers".into(), "[2, 4, 2]".into()),
            ];
            v.extend(o.iter().map(|(k, x)| (k.to_string(), x.to_string())));
            ServerConfig::load(None, &v)
        };
        let central = [("dp.mode", "\"central\"")];
        let bounded = [("standardize.bounds", "\"0:1|-5:5\"")];
        let z = [("standardize.noise_multiplier", "2.0")];
        assert!(load(&[]).is_ok());
        assert!(load(&bounded).is_ok());
        assert!(load(&[central[0], bounded[0], z[0]]).is_ok());
        let err = |o: &[(&str, &str)]| load(o).unwrap_err().to_string();
        // DP on: bounds and a positive multiplier, both.
        assert!(err(&[central[0], bounded[0]]).contains("noise_multiplier"));
        assert!(err(&[central[0], z[0]]).contains("bounds"));
        // DP off: exact statistics, no noise.
        assert!(err(&z).contains("dp.mode none"));
        // Each message reads as one sentence (a literal broken without `\` kept the
        // next line's indentation as a run of spaces).
        assert!(err(&[central[0], bounded[0]])
            .contains("needs standardize.bounds and a positive standardize.noise_multiplier:"));
        assert!(err(&z).contains("(dp.mode central or local); with dp.mode none the"));
        // Bounds for another number of features, or not ranges.
        assert!(err(&[("standardize.bounds", "\"0:1|0:1|0:1\"")]).contains("standardize.bounds"));
        assert!(err(&[("standardize.bounds", "\"1:0\"")]).contains("standardize.bounds"));
        // Secure aggregation: the statistics are securely summed, over a fixed-point range
        // from the public bounds, by at least 3 participants.
        let sa = ("secure_aggregation", "true");
        let three = ("min_clients", "3");
        assert!(err(&[sa, three]).contains("standardize.bounds"));
        assert!(err(&[sa, bounded[0], ("min_clients", "2")]).contains("min_clients >= 3"));
        assert!(load(&[sa, bounded[0], three]).is_ok());
        assert!(load(&[sa, central[0], bounded[0], z[0], three]).is_ok());
        // Distributed DP: the statistics are one more distributed release (bounds and a
        // positive multiplier as with DP on), summing at most max_contributors nodes.
        let dd = ("dp.mode", "\"distributed\"");
        assert!(load(&[sa, dd, bounded[0], z[0], three]).is_ok());
        assert!(err(&[sa, dd, bounded[0], three]).contains("noise_multiplier"));
        assert!(err(&[sa, dd, z[0], three]).contains("bounds"));
        let e = err(&[
            sa,
            dd,
            bounded[0],
            z[0],
            ("min_clients", "4"),
            ("secagg.min_contributors", "3"),
            ("secagg.max_contributors", "3"),
        ]);
        assert!(e.contains("fewer than min_clients = 4"), "{e}");
        // Too many features for the header the statistics travel in.
        assert!(err(&[("model.layers", "[2001, 2]")]).contains("at most 2000 features"));
    }

    #[test]
    fn defaults_validate_and_overrides_apply() {
        let c = ServerConfig::load(
            None,
            &[
                ("rounds".into(), "3".into()),
                ("dp.mode".into(), "central".into()),
                ("dp.noise_multiplier".into(), "1.5".into()),
                ("model.layers".into(), "[4, 3]".into()),
                ("train.lr".into(), "0.1".into()),
                ("strategy.aggregator.kind".into(), "median".into()),
                ("strategy.server_optimizer.kind".into(), "fedadam".into()),
            ],
        );
        // Median + central DP is refused at strategy build time, not here.
        let c = c.unwrap();
        assert_eq!(c.rounds, 3);
        assert_eq!(c.dp.noise_multiplier, 1.5);
        assert_eq!(c.model.layers, vec![4, 3]);
        assert_eq!(c.train.base.lr, 0.1);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported() {
        let e = ServerConfig::load(None, &[("roundz".into(), "3".into())]).unwrap_err();
        assert!(e.to_string().contains("roundz"), "{e}");
        let e = ServerConfig::load(None, &[("dp.mode".into(), "distributed".into())]).unwrap_err();
        assert!(e.to_string().contains("secure aggregation"), "{e}");
        let e = ServerConfig::load(None, &[("train.lr".into(), "-1".into())]).unwrap_err();
        assert!(e.to_string().contains("lr"), "{e}");
        assert!(ServerConfig::load(None, &[("max_message_bytes".into(), "2000".into())]).is_err());
    }

    #[test]
    fn misspelled_keys_in_every_section_are_refused() {
        // Audit: `dp.noise_multipler = 5` ran at z = 1.0 without a word.
        for key in [
            "dp.noise_multipler",
            "train.learning_rate",
            "strategy.fraction_fitt",
            "dp.adaptive_clipping.target_quantil",
            "strategy.server_optimizer.momentum_typo",
            "update_limits.max_abs",
        ] {
            let e = ServerConfig::load(None, &[(key.into(), "5".into())]).unwrap_err();
            let leaf = key.rsplit('.').next().unwrap_or(key);
            assert!(e.to_string().contains(leaf), "{key}: {e}");
        }
        let e = ServerConfig::load(None, &[("seed".into(), "1".into())]).unwrap_err();
        assert!(e.to_string().contains("OS CSPRNG"), "{e}");
        // Known keys still load.
        ServerConfig::load(
            None,
            &[
                ("dp.adaptive_clipping.target_quantile".into(), "0.5".into()),
                ("dp.mode".into(), "\"central\"".into()),
                ("train.lr_decay".into(), "0.9".into()),
                ("strategy.aggregator.kind".into(), "\"trimmed_mean\"".into()),
                ("strategy.aggregator.beta".into(), "0.1".into()),
            ],
        )
        .unwrap();
    }

    #[test]
    fn local_mode_refuses_federated_evaluation() {
        let e = ServerConfig::load(
            None,
            &[
                ("dp.mode".into(), "\"local\"".into()),
                ("strategy.fraction_evaluate".into(), "1.0".into()),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("local DP"), "{e}");
    }

    #[test]
    fn message_limit_is_derived_from_the_model_unless_set() {
        let c =
            ServerConfig::load(None, &[("model.layers".into(), "[784, 32, 10]".into())]).unwrap();
        let params = 784 * 32 + 32 + 32 * 10 + 10;
        assert_eq!(c.max_message_bytes, None);
        assert_eq!(
            c.message_limit(),
            dpfl_common::wire::PREFIX_BYTES + dpfl_common::wire::MAX_HEADER_BYTES + 4 * params
        );
        assert!(c.message_limit() < 200_000);
        // A larger model gets a larger limit.
        let big =
            ServerConfig::load(None, &[("model.layers".into(), "[784, 256, 10]".into())]).unwrap();
        assert!(big.message_limit() > c.message_limit());
        // An explicit value still works, and must carry the model.
        let set = ServerConfig::load(
            None,
            &[
                ("model.layers".into(), "[784, 32, 10]".into()),
                ("max_message_bytes".into(), "200000".into()),
            ],
        )
        .unwrap();
        assert_eq!(set.message_limit(), 200_000);
        let e = ServerConfig::load(
            None,
            &[
                ("model.layers".into(), "[784, 32, 10]".into()),
                ("max_message_bytes".into(), "100000".into()),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot carry"), "{e}");
    }

    #[test]
    fn admission_transport_keys_have_defaults_and_are_checked() {
        let c = ServerConfig::load(None, &[]).unwrap();
        assert_eq!(c.admission.max_handshakes_per_source, 32);
        assert_eq!(c.admission.handshake_timeout_secs, 5.0);
        let c = ServerConfig::load(
            None,
            &[
                ("admission.max_handshakes_per_source".into(), "4".into()),
                ("admission.hello_timeout_secs".into(), "2.5".into()),
                ("admission.refusal_log_secs".into(), "1".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.admission.max_handshakes_per_source, 4);
        assert_eq!(c.admission.hello_timeout_secs, 2.5);
        for (k, v) in [
            ("admission.max_handshakes_per_source", "0"),
            ("admission.handshake_timeout_secs", "0"),
            ("admission.hello_timeout_secs", "nan"),
            ("admission.refusal_log_secs", "-1"),
        ] {
            assert!(
                ServerConfig::load(None, &[(k.into(), v.into())]).is_err(),
                "{k}"
            );
        }
    }

    #[test]
    fn the_reference_documents_every_key_and_loads() {
        let text = reference().unwrap();
        // It is a configuration file that loads to the defaults.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ref.toml");
        std::fs::write(&p, &text).unwrap();
        assert_eq!(
            ServerConfig::load(Some(&p), &[]).unwrap(),
            ServerConfig::default()
        );
        // Every documented key exists: unset ones load with their example value.
        for (key, example, doc) in KEY_DOCS {
            assert!(!doc.is_empty(), "{key}");
            if let Some(ex) = example {
                let mut o = vec![((*key).to_string(), (*ex).to_string())];
                // Variant fields need their variant.
                if let Some(kind) = match *key {
                    "strategy.aggregator.beta" => Some("trimmed_mean"),
                    "strategy.aggregator.f" => Some("krum"),
                    "strategy.aggregator.m" => Some("multi_krum"),
                    _ => None,
                } {
                    o.push(("strategy.aggregator.kind".into(), format!("{kind:?}")));
                    if *key == "strategy.aggregator.m" {
                        o.push(("strategy.aggregator.f".into(), "1".into()));
                    }
                }
                // Keys that are set together.
                match *key {
                    "secagg.degree" => o.push(("secagg.threshold".into(), "17".into())),
                    "secagg.threshold" => o.push(("secagg.degree".into(), "30".into())),
                    _ => {}
                }
                ServerConfig::load(None, &o).unwrap_or_else(|e| panic!("{key}: {e}"));
            } else {
                let line = format!("{} = ", key.rsplit('.').next().unwrap_or(key));
                assert!(
                    text.contains(&line),
                    "{key} has no default in the reference"
                );
            }
        }
    }

    #[test]
    fn toml_file_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "rounds = 4\nmin_clients = 3\n[dp]\nmode = \"local\"\nnoise_multiplier = 2.0\nsampling_rate = 0.5\n[train]\nepochs = 2\n",
        )
        .unwrap();
        let c = ServerConfig::load(Some(&p), &[("rounds".into(), "5".into())]).unwrap();
        assert_eq!(c.rounds, 5);
        assert_eq!(c.train.base.epochs, 2);
        assert_eq!(c.dp.sampling_rate, 0.5);
    }
}
