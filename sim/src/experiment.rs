//! Experiments as files: one TOML describes the data, partition, population, rounds, local
//! training, strategy and DP settings, plus an optional `[sweep]` of dotted keys to lists
//! of values. Every combination of the sweep lists is one configuration.
//!
//! ```toml
//! name = "central-dp"
//! rounds = 50
//! [population]
//! clients = 1000
//! examples_per_client = 60
//! [dp]
//! mode = "central"
//! sampling_rate = 0.1
//! [sweep]
//! "dp.noise_multiplier" = [0.5, 1.0, 2.0]
//! ```

use dpfl_ml::partition::PartitionKind;
use dpfl_server::config::{parse_value, set_dotted, ModelConfig};
use dpfl_server::strategy::{DpParams, FedAvgConfig, TrainSettings};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Errors reading an experiment.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// File error.
    #[error("{0}")]
    Io(String),
    /// TOML or schema error.
    #[error("experiment: {0}")]
    Parse(String),
    /// A value out of range.
    #[error("experiment: {0}")]
    Invalid(String),
}

/// How virtual clients talk to the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// In-process: the coordinator is driven directly.
    #[default]
    Memory,
    /// The real server and real client nodes over QUIC/mTLS on 127.0.0.1.
    Quic,
}

/// How the simulator obtains a securely aggregated round's sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecureSum {
    /// Every virtual client runs the deployment's SecAgg+ client through all five stages
    /// (pairwise masks, shares, unmasking): the protocol's cost and behaviour.
    #[default]
    Protocol,
    /// The clients encode exactly as in `protocol` (same encoder, same seeded noise), and
    /// the simulator hands the coordinator the sum mod 2^b of their encoded inputs: what
    /// the protocol unmasks when nobody drops out, bit for bit (tested), without the
    /// masks' cost (quadratic in the participants when the threshold forces a complete
    /// graph). For accuracy/privacy studies; say so when quoting its timings.
    Sum,
}

/// Which Gaussian sampler the simulation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Seeded ChaCha20 + Ziggurat: fast and reproducible, for utility simulations only.
    #[default]
    Simulation,
    /// opendp's exact sampler (the deployment sampler; slow for large populations).
    Opendp,
    /// The grid discrete Gaussian: floating-point safe and fast (`GridGaussian`), seeded.
    Grid,
}

/// The virtual population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Population {
    /// Number of virtual clients (ignored by the natural partition).
    pub clients: usize,
    /// With `iid`: give each client exactly this many examples (resampling the data set when
    /// clients x examples exceeds it). Without it, the data set is split.
    pub examples_per_client: Option<usize>,
    /// How the data is split.
    pub partition: PartitionKind,
    /// Dirichlet redraws until every client has at least this many examples.
    pub min_examples: usize,
    /// Poisoned clients (in-memory transport): the first `fraction` of the clients.
    pub attack: Option<Attack>,
}

/// Model poisoning by a fraction of the population.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attack {
    /// Fraction of clients that attack, in [0, 1].
    pub fraction: f64,
    /// What they send.
    pub kind: AttackKind,
    /// Multiplier of the honest update.
    pub factor: f64,
}

/// How an attacker transforms its honest update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// `-factor * delta`.
    SignFlip,
    /// `factor * delta`.
    Scale,
}

impl Attack {
    /// Whether client `i` of `n` attacks.
    pub fn is_attacker(&self, i: usize, n: usize) -> bool {
        (i as f64) < (self.fraction.clamp(0.0, 1.0) * n as f64).round()
    }

    /// Applies the attack to an honest update.
    pub fn apply(&self, delta: &mut [f32]) {
        let f = match self.kind {
            AttackKind::SignFlip => -self.factor,
            AttackKind::Scale => self.factor,
        } as f32;
        delta.iter_mut().for_each(|v| *v *= f);
    }
}

impl Default for Population {
    fn default() -> Self {
        Self {
            clients: 10,
            examples_per_client: None,
            partition: PartitionKind::Iid,
            min_examples: 10,
            attack: None,
        }
    }
}

/// One fully specified configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Experiment name (results folder).
    pub name: String,
    /// Training data (`fashion-mnist`, `idx:...`, `csv:...[,label=...]`).
    pub data: String,
    /// Test data for the global model.
    pub test_data: Option<String>,
    /// Evaluate on at most this many test examples.
    pub test_limit: Option<usize>,
    /// Rounds.
    pub rounds: u64,
    /// Seed of partition, selection, shuffling and simulated noise.
    pub seed: u64,
    /// Transport.
    pub transport: Transport,
    /// Training threads (in-memory transport).
    pub threads: usize,
    /// Device of training and evaluation: `cpu` (default: runs are reproducible to the
    /// bit on one machine), `auto` (CUDA when available), `cuda` or `cuda:N` (refused
    /// before round 1 when CUDA is not available). With CUDA, `threads` threads share the
    /// GPU and `batched = true` trains up to `batch_clients` clients in one launch each
    /// step, which is where a GPU pays for a model this small.
    pub device: String,
    /// Train the clients of a round that one thread handles as one batched model
    /// (`dpfl_ml::batched`: stacked weights, batched matrix multiplies, per-client data
    /// order, optimizer state and steps; equal to one-by-one training up to float
    /// rounding). In-memory transport only. Off by default: on CPU, measured with the
    /// 784-200-200-10 MLP, it is no faster than one by one (see README, Performance).
    pub batched: bool,
    /// At most this many clients in one batched model (memory: about
    /// `4 x parameters x 4` bytes per client with momentum or Adam).
    pub batch_clients: usize,
    /// Evaluate the global model every this many rounds (and after the last).
    pub eval_every: u64,
    /// Noise sampler.
    pub sampler: Sampler,
    /// Population.
    pub population: Population,
    /// Model.
    pub model: ModelConfig,
    /// Local training.
    pub train: TrainSettings,
    /// Strategy.
    pub strategy: FedAvgConfig,
    /// Differential privacy.
    pub dp: DpParams,
    /// Retries of a round that missed its quorum.
    pub max_round_retries: u32,
    /// Empirical privacy audit with canary clients.
    pub audit: AuditConfig,
    /// Secure aggregation (SecAgg+) with the deployment's protocol code: nodes send masked
    /// inputs, the server unmasks only their sum (DP mode none or central).
    pub secure_aggregation: bool,
    /// Secure aggregation settings (as the server's `[secagg]`).
    pub secagg: dpfl_server::secure::SecAggConfig,
    /// How a secure round's sum is obtained (`protocol`, or `sum` for studies).
    pub secure_sum: SecureSum,
    /// Federated standardisation of the features before round 1.
    pub standardize: StandardizeConfig,
}

/// Federated standardisation (`dpfl_ml::standardize`): every client's count, sum and sum
/// of squares per feature are summed as the server would, and the global mean and
/// standard deviation are applied to every client's data and to the test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StandardizeConfig {
    /// Standardise (off by default).
    pub enabled: bool,
    /// Public ranges the features are clipped to, `lo:hi|lo:hi|...` (or one `lo:hi` for
    /// all); required with DP on (they bound the sensitivity). Never derive them from the
    /// private data.
    pub bounds: Option<String>,
    /// Noise multiplier of the Gaussian release of the statistics (0: exact). With DP on
    /// it must be positive; the release's epsilon is reported next to the training's.
    pub noise_multiplier: f64,
}

/// The empirical privacy audit of a run (see `dpfl_common::dp::audit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Canaries; each is included in the federation with probability 1/2 (0: no audit).
    pub canaries: usize,
    /// Also estimate against observers of every round's model (keeps every canary's
    /// direction in memory: `canaries x parameters x 4` bytes).
    pub all_iterates: bool,
    /// **Test-only fault injection**: multiply every noise standard deviation by this
    /// (0 switches the noise off) while the ledger still records the configured z, so the
    /// audit can be shown to catch a broken mechanism. Never set it for a real study.
    pub fault_noise_factor: f64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            canaries: 0,
            all_iterates: false,
            fault_noise_factor: 1.0,
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            name: "experiment".into(),
            data: "fashion-mnist".into(),
            test_data: Some("fashion-mnist-test".into()),
            test_limit: None,
            rounds: 10,
            seed: 0,
            transport: Transport::Memory,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            device: "cpu".into(),
            batched: false,
            batch_clients: 64,
            eval_every: 1,
            sampler: Sampler::Simulation,
            population: Population::default(),
            model: ModelConfig::default(),
            train: TrainSettings::default(),
            strategy: FedAvgConfig {
                min_fit_clients: 1,
                ..FedAvgConfig::default()
            },
            dp: DpParams::default(),
            max_round_retries: 0,
            audit: AuditConfig::default(),
            secure_aggregation: false,
            secagg: dpfl_server::secure::SecAggConfig::default(),
            secure_sum: SecureSum::Protocol,
            standardize: StandardizeConfig::default(),
        }
    }
}

/// One configuration of an experiment, with the sweep values that made it.
#[derive(Debug, Clone)]
pub struct Configuration {
    /// `c01`, `c02`, ...
    pub id: String,
    /// `key=value, ...` of the sweep (empty without a sweep).
    pub label: String,
    /// The settings.
    pub config: SimConfig,
}

impl SimConfig {
    /// Range checks.
    pub fn validate(&self) -> Result<(), ExperimentError> {
        let bad = |m: String| Err(ExperimentError::Invalid(m));
        if self.rounds == 0 {
            return bad("rounds must be >= 1".into());
        }
        if self.population.clients == 0
            && !matches!(self.population.partition, PartitionKind::Natural { .. })
        {
            return bad("population.clients must be >= 1".into());
        }
        if self.threads == 0 || self.eval_every == 0 {
            return bad("threads and eval_every must be >= 1".into());
        }
        if !dpfl_ml::model::is_device_name(&self.device) {
            return bad(format!(
                "device must be cpu, auto, cuda or cuda:N, got {:?}",
                self.device
            ));
        }
        if !(1..=4096).contains(&self.batch_clients) {
            return bad(format!(
                "batch_clients must be in 1..=4096, got {}",
                self.batch_clients
            ));
        }
        let spec = self
            .model
            .spec()
            .map_err(|e| ExperimentError::Invalid(e.to_string()))?;
        if self.batched && !spec.is_mlp() {
            return bad(format!(
                "batched = true trains MLPs only; the model is {spec} (set batched = false)"
            ));
        }
        self.train
            .base
            .validate()
            .map_err(|e| ExperimentError::Invalid(e.to_string()))?;
        self.dp.validate().map_err(ExperimentError::Invalid)?;
        let st = &self.standardize;
        if st.enabled
            && self.dp.mode.is_private()
            && (st.bounds.is_none() || st.noise_multiplier <= 0.0)
        {
            return bad("standardize with DP on needs bounds and a positive noise_multiplier (the statistics are released too)".into());
        }
        if !(st.noise_multiplier.is_finite() && st.noise_multiplier >= 0.0) {
            return bad("standardize.noise_multiplier must be >= 0".into());
        }
        if st.noise_multiplier > 0.0 && st.bounds.is_none() {
            return bad("standardize.noise_multiplier needs standardize.bounds (they bound the sensitivity)".into());
        }
        if self.dp.mode == dpfl_common::config::DpMode::Distributed {
            // Each virtual client encodes with the deployment's `DistributedEncoder` inside
            // the in-memory SecAgg+ clients (`crate::secure`); the noise is in the sum.
            if !self.secure_aggregation {
                return bad("dp.mode = \"distributed\" needs secure_aggregation = true".into());
            }
        }
        if self.secure_aggregation
            && self.secure_sum == SecureSum::Sum
            && self.transport != Transport::Memory
        {
            return bad(
                "secure_sum = \"sum\" is the in-memory transport's shortcut; over QUIC the \
                 real protocol always runs"
                    .into(),
            );
        }
        if self.audit.canaries > 0 {
            if !self.dp.mode.is_private() {
                return bad("audit.canaries needs DP on (dp.mode = central or local)".into());
            }
            if self.transport != Transport::Memory {
                return bad("the audit runs on the in-memory transport".into());
            }
        }
        self.secagg
            .validate(self.dp.mode == dpfl_common::config::DpMode::Distributed)
            .map_err(ExperimentError::Invalid)?;
        if self.secure_aggregation {
            if !matches!(
                self.dp.mode,
                dpfl_common::config::DpMode::None
                    | dpfl_common::config::DpMode::Central
                    | dpfl_common::config::DpMode::Distributed
            ) {
                return bad(
                    "secure_aggregation works with dp.mode none, central or distributed".into(),
                );
            }
            if self.audit.canaries > 0 {
                return bad("the canary audit does not run with secure_aggregation".into());
            }
            if !self.strategy.aggregator.is_streaming() || self.dp.adaptive_clipping.is_some() {
                return bad(
                    "secure_aggregation needs the mean aggregator and a fixed clip norm".into(),
                );
            }
        }
        if !(self.audit.fault_noise_factor.is_finite() && self.audit.fault_noise_factor >= 0.0) {
            return bad("audit.fault_noise_factor must be >= 0".into());
        }
        Ok(())
    }
}

fn to_string(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Table(t) => {
            let rest = t
                .iter()
                .filter(|(k, _)| k.as_str() != "kind")
                .map(|(k, v)| format!("{k}={}", to_string(v)))
                .collect::<Vec<_>>()
                .join(",");
            match t.get("kind") {
                Some(kind) if rest.is_empty() => to_string(kind),
                Some(kind) => format!("{}({rest})", to_string(kind)),
                None => rest,
            }
        }
        other => other.to_string(),
    }
}

fn swept_label(combo: &[(String, toml::Value)], skip: &[&str]) -> String {
    combo
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), to_string(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads an experiment file, applies `key=value` overrides, and expands the sweep.
pub fn load(
    path: &Path,
    overrides: &[(String, String)],
) -> Result<Vec<Configuration>, ExperimentError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ExperimentError::Io(format!("{}: {e}", path.display())))?;
    expand(&text, overrides)
}

/// As [`load`], from TOML text.
pub fn expand(
    text: &str,
    overrides: &[(String, String)],
) -> Result<Vec<Configuration>, ExperimentError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ExperimentError::Parse(e.to_string()))?;
    for (k, v) in overrides {
        set_dotted(&mut table, k, parse_value(v))
            .map_err(|e| ExperimentError::Parse(e.to_string()))?;
    }
    let sweep: Vec<(String, Vec<toml::Value>)> = match table.remove("sweep") {
        None => Vec::new(),
        Some(toml::Value::Table(t)) => t
            .into_iter()
            .map(|(k, v)| match v {
                toml::Value::Array(a) if !a.is_empty() => Ok((k, a)),
                _ => Err(ExperimentError::Parse(format!(
                    "sweep.{k} must be a non-empty list"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ExperimentError::Parse("sweep must be a table".into())),
    };
    // `[[variant]]` tables: named bundles of settings (e.g. "fedprox" = fedavg + prox_mu),
    // each multiplied with the sweep.
    let variants: Vec<(String, Vec<(String, toml::Value)>)> = match table.remove("variant") {
        None => vec![(String::new(), Vec::new())],
        Some(toml::Value::Array(a)) if !a.is_empty() => a
            .into_iter()
            .map(|v| {
                let toml::Value::Table(mut t) = v else {
                    return Err(ExperimentError::Parse(
                        "each [[variant]] must be a table".into(),
                    ));
                };
                let label = match t.remove("label") {
                    Some(toml::Value::String(l)) => l,
                    _ => {
                        return Err(ExperimentError::Parse(
                            "each [[variant]] needs a label".into(),
                        ))
                    }
                };
                let set = match t.remove("set") {
                    Some(toml::Value::Table(set)) => set.into_iter().collect(),
                    None => Vec::new(),
                    _ => {
                        return Err(ExperimentError::Parse(
                            "variant.set must be a table of key = value".into(),
                        ))
                    }
                };
                if let Some(k) = t.keys().next() {
                    return Err(ExperimentError::Parse(format!(
                        "unknown key {k:?} in [[variant]]"
                    )));
                }
                Ok((label, set))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ExperimentError::Parse(
                "variant must be an array of tables".into(),
            ))
        }
    };
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for (k, values) in &sweep {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((k.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let combos: Vec<(String, Vec<(String, toml::Value)>)> = variants
        .iter()
        .flat_map(|(label, set)| {
            combos.iter().map(move |c| {
                let mut all = set.clone();
                all.extend(c.iter().cloned());
                (label.clone(), all)
            })
        })
        .collect();
    let width = combos.len().to_string().len().max(2);
    combos
        .into_iter()
        .enumerate()
        .map(|(i, (variant, combo))| {
            let mut t = table.clone();
            for (k, v) in &combo {
                set_dotted(&mut t, k, v.clone())
                    .map_err(|e| ExperimentError::Parse(e.to_string()))?;
            }
            let config: SimConfig = toml::Value::Table(t.clone())
                .try_into()
                .map_err(|e: toml::de::Error| ExperimentError::Parse(e.to_string()))?;
            // Keys the typed configuration ignores (a misspelled `dp.noise_multipler`, or
            // one inside a flattened section) are errors, not silent defaults.
            dpfl_server::config::deny_unknown_keys(&t, &config)
                .map_err(|e| ExperimentError::Parse(e.to_string()))?;
            config.validate()?;
            Ok(Configuration {
                id: format!("c{:0width$}", i + 1),
                label: if variant.is_empty() {
                    swept_label(&combo, &[])
                } else {
                    let own: Vec<&str> = variants
                        .iter()
                        .find(|(l, _)| *l == variant)
                        .map(|(_, set)| set.iter().map(|(k, _)| k.as_str()).collect())
                        .unwrap_or_default();
                    format!("{variant} {}", swept_label(&combo, &own))
                        .trim()
                        .to_string()
                },
                config,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_expands_to_the_cartesian_product() {
        let text = r#"
name = "t"
rounds = 2
[dp]
mode = "central"
sampling_rate = 0.1
[sweep]
"dp.noise_multiplier" = [0.5, 1.0]
"population.partition" = [{ kind = "iid" }, { kind = "dirichlet", alpha = 0.5 }]
"#;
        let cs = expand(text, &[]).unwrap();
        assert_eq!(cs.len(), 4);
        assert_eq!(cs[0].id, "c01");
        assert_eq!(cs[0].config.dp.noise_multiplier, 0.5);
        assert_eq!(cs[3].config.dp.noise_multiplier, 1.0);
        assert_eq!(
            cs[3].config.population.partition,
            PartitionKind::Dirichlet { alpha: 0.5 }
        );
        assert!(
            cs[3].label.contains("noise_multiplier=1.0"),
            "{}",
            cs[3].label
        );
        // Overrides apply before the sweep.
        let cs = expand(text, &[("rounds".into(), "5".into())]).unwrap();
        assert!(cs.iter().all(|c| c.config.rounds == 5));
    }

    #[test]
    fn variants_multiply_with_the_sweep() {
        let text = r#"
[[variant]]
label = "fedavg"
[[variant]]
label = "fedprox"
set = { "train.prox_mu" = 0.01 }
[sweep]
seed = [1, 2]
"#;
        let cs = expand(text, &[]).unwrap();
        assert_eq!(cs.len(), 4);
        assert_eq!(cs[0].label, "fedavg seed=1");
        assert_eq!(cs[3].label, "fedprox seed=2");
        assert_eq!(cs[3].config.train.base.prox_mu, 0.01);
        assert_eq!(cs[1].config.train.base.prox_mu, 0.0);
    }

    #[test]
    fn unknown_keys_and_bad_sweeps_are_errors() {
        assert!(expand("roundz = 3", &[]).is_err());
        assert!(expand("[sweep]\nseed = 3", &[]).is_err());
        // Distributed DP needs secure aggregation (in memory or over QUIC); the direct sum
        // is the in-memory transport's shortcut only.
        let dist = "[dp]\nmode = \"distributed\"\nnoise_multiplier = 1.0";
        let e = expand(dist, &[]).unwrap_err().to_string();
        assert!(e.contains("secure_aggregation"), "{e}");
        let secure = format!("secure_aggregation = true\n{dist}");
        assert!(expand(&secure, &[]).is_ok());
        let quic = format!("transport = \"quic\"\n{secure}");
        assert!(expand(&quic, &[]).is_ok());
        let quic_sum = format!("secure_sum = \"sum\"\n{quic}");
        let e = expand(&quic_sum, &[]).unwrap_err().to_string();
        assert!(e.contains("secure_sum"), "{e}");
        assert!(expand(&format!("secure_sum = \"sum\"\n{secure}"), &[]).is_ok());
        // Audit: misspelled keys in [dp], [train] and [strategy] were silently ignored.
        for bad in [
            "[dp]\nnoise_multipler = 5.0",
            "[train]\nlearning_rate = 0.1",
            "[strategy]\nfraction_fitt = 0.5",
            "[sweep]\n\"dp.noise_multipler\" = [1.0, 2.0]",
        ] {
            let e = expand(bad, &[]).unwrap_err().to_string();
            assert!(e.contains("unknown"), "{bad}: {e}");
        }
    }
}
