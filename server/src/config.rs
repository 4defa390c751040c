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

/// Model section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Layer widths, input to output.
    pub layers: Vec<usize>,
    /// Seed of the initial parameters.
    pub init_seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            layers: ModelSpec::default().layers,
            init_seed: 0,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4433".parse().expect("static address"),
            certs_dir: "certs-dev".into(),
            rounds: 10,
            min_clients: 2,
            round_timeout_secs: 600.0,
            eval_timeout_secs: 120.0,
            max_round_retries: 2,
            out_dir: "runs/latest".into(),
            test_data: None,
            test_limit: None,
            max_message_bytes: None,
            idle_timeout_secs: 60.0,
            resume: true,
            model: ModelConfig::default(),
            train: TrainSettings::default(),
            strategy: FedAvgConfig::default(),
            dp: DpParams::default(),
            admission: AdmissionConfig::default(),
            update_limits: UpdateLimits::default(),
            eval_threads: 1,
            noise_sampler: "opendp".into(),
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
        "unknown configuration key(s) {} (misspelled? every key is listed in configs/ and \
         ARCHITECTURE.md)",
        explain.join(", ")
    )))
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
        let bad = |m: String| Err(ConfigError::Invalid(m));
        ModelSpec::new(self.model.layers.clone())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
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
            let needed = dpfl_common::wire::max_message_bytes(self.spec().num_params());
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
        Ok(())
    }

    /// The model spec.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            layers: self.model.layers.clone(),
        }
    }

    /// The largest message read from a client: `max_message_bytes` when set, else the
    /// largest legitimate message for the model (prefix + largest header + a full
    /// parameter vector), e.g. 0.9 MB for a 200k-parameter model instead of a fixed 64 MiB.
    pub fn message_limit(&self) -> usize {
        self.max_message_bytes
            .unwrap_or_else(|| dpfl_common::wire::max_message_bytes(self.spec().num_params()))
    }

    /// Round deadline.
    pub fn round_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.round_timeout_secs)
    }

    /// The parts of the configuration that must not change across a resume.
    pub fn fingerprint(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}|{:?}",
            self.model, self.dp, self.strategy, self.train
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
