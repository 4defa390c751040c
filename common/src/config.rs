//! Configuration values that travel between server and clients: local training settings
//! and the privacy mode. Validation lives here so that a value read from a TOML file and a
//! value decoded from a peer are checked by the same code.

use serde::{Deserialize, Serialize};

/// Why a configuration value is unusable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A number outside its allowed range.
    #[error("{field} must be {expected}, got {got}")]
    OutOfRange {
        /// Name of the setting.
        field: &'static str,
        /// What was expected, in words.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// A combination of settings that cannot work together.
    #[error("{0}")]
    Conflict(String),
}

pub(crate) fn check(
    ok: bool,
    field: &'static str,
    expected: &'static str,
    got: impl std::fmt::Display,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            field,
            expected,
            got: got.to_string(),
        })
    }
}

/// Local optimizer used by a client for one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD (with `momentum` and `weight_decay`).
    #[default]
    Sgd,
    /// Adam (with `beta1`, `beta2` and `weight_decay`).
    Adam,
}

/// Local training settings for one round, sent by the server with every train request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Local epochs over the client's data.
    pub epochs: u32,
    /// When set, train exactly this many mini-batch steps instead of whole epochs.
    pub max_steps: Option<u32>,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Learning rate for this round.
    pub lr: f64,
    /// Local optimizer.
    pub optimizer: OptimizerKind,
    /// SGD momentum (0 disables).
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Adam first-moment decay.
    pub beta1: f64,
    /// Adam second-moment decay.
    pub beta2: f64,
    /// FedProx proximal coefficient mu (0 = plain FedAvg local training).
    pub prox_mu: f64,
    /// Seed for the client's shuffling in this round (derived by the server per round).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 32,
            lr: 0.05,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            prox_mu: 0.0,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Rejects values no client should act on (also applied to values from the server).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=1000).contains(&self.epochs),
            "epochs",
            "1..=1000",
            self.epochs,
        )?;
        if let Some(s) = self.max_steps {
            check(s >= 1, "max_steps", ">= 1", s)?;
        }
        check(
            (1..=1 << 20).contains(&self.batch_size),
            "batch_size",
            "1..=1048576",
            self.batch_size,
        )?;
        check(
            self.lr.is_finite() && self.lr > 0.0 && self.lr <= 100.0,
            "lr",
            "in (0, 100]",
            self.lr,
        )?;
        check(
            self.prox_mu.is_finite() && self.prox_mu >= 0.0,
            "prox_mu",
            ">= 0",
            self.prox_mu,
        )?;
        check(
            (0.0..1.0).contains(&self.momentum),
            "momentum",
            "in [0, 1)",
            self.momentum,
        )?;
        check(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay",
            ">= 0",
            self.weight_decay,
        )?;
        check(
            (0.0..1.0).contains(&self.beta1),
            "beta1",
            "in [0, 1)",
            self.beta1,
        )?;
        check(
            (0.0..1.0).contains(&self.beta2),
            "beta2",
            "in [0, 1)",
            self.beta2,
        )?;
        Ok(())
    }
}

/// Where differential privacy noise is added (DESIGN.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// No clipping, no noise; FedAvg weighted by example counts.
    #[default]
    None,
    /// Each client clips and adds Gaussian noise before the update leaves the node.
    Local,
    /// Clients clip; the server adds Gaussian noise to the sum once per round.
    Central,
    /// Clients add an integer share of the noise to their encoded update; runs only with
    /// secure aggregation, so the server sees only the noisy sum.
    Distributed,
}

impl DpMode {
    /// Whether clipping and equal weighting are on.
    pub fn is_private(self) -> bool {
        !matches!(self, DpMode::None)
    }

    /// Refuses modes that cannot be run soundly today (every mode runs; `distributed`
    /// needs secure aggregation, which the server configuration and each train request
    /// check).
    pub fn ensure_supported(self) -> Result<(), ConfigError> {
        Ok(())
    }
}

impl std::fmt::Display for DpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DpMode::None => "none",
            DpMode::Local => "local",
            DpMode::Central => "central",
            DpMode::Distributed => "distributed",
        })
    }
}

impl std::str::FromStr for DpMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(DpMode::None),
            "local" => Ok(DpMode::Local),
            "central" => Ok(DpMode::Central),
            "distributed" => Ok(DpMode::Distributed),
            other => Err(ConfigError::OutOfRange {
                field: "dp mode",
                expected: "none, local, central or distributed",
                got: other.into(),
            }),
        }
    }
}

/// What a client must do to its update this round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClientPrivacy {
    /// Mode agreed in the handshake.
    pub mode: DpMode,
    /// L2 clipping bound C for this round (may change per round with adaptive clipping).
    pub clip_norm: f64,
    /// Noise multiplier z; in `local` mode the client adds `N(0, (zC)^2)` per coordinate.
    pub noise_multiplier: f64,
}

impl ClientPrivacy {
    /// No DP.
    pub const NONE: ClientPrivacy = ClientPrivacy {
        mode: DpMode::None,
        clip_norm: 0.0,
        noise_multiplier: 0.0,
    };

    /// Checks ranges (for values decoded from a peer).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.mode.ensure_supported()?;
        if self.mode.is_private() {
            check(
                self.clip_norm.is_finite() && self.clip_norm > 0.0,
                "clip_norm",
                "finite and > 0",
                self.clip_norm,
            )?;
        }
        if self.mode == DpMode::Local {
            check(
                self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0,
                "noise_multiplier",
                "finite and > 0 in local mode",
                self.noise_multiplier,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_train_config_is_valid_and_bad_values_are_named() {
        assert!(TrainConfig::default().validate().is_ok());
        let bad = TrainConfig {
            lr: f64::NAN,
            ..TrainConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("lr"), "{err}");
        let bad = TrainConfig {
            batch_size: 0,
            ..TrainConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!(
            "distributed".parse::<DpMode>().unwrap(),
            DpMode::Distributed
        );
        assert_eq!("central".parse::<DpMode>().unwrap(), DpMode::Central);
        assert!("laplace".parse::<DpMode>().is_err());
    }

    #[test]
    fn local_privacy_needs_positive_noise() {
        let p = ClientPrivacy {
            mode: DpMode::Local,
            clip_norm: 1.0,
            noise_multiplier: 0.0,
        };
        assert!(p.validate().is_err());
        assert!(ClientPrivacy::NONE.validate().is_ok());
    }
}
