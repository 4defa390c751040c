//! Secure aggregation settings of the coordinator and what its stages ask the driver to
//! send. The stages themselves run in [`crate::coordinator`] on `dpfl-secagg`'s pure
//! [`dpfl_secagg::Server`]; this module holds the pieces the driver and the configuration
//! share.
//!
//! A securely aggregated round: train requests carry a [`dpfl_common::wire::SecAggSpec`];
//! each node trains, clips its update to C and keeps it, answering `Held`. The nodes that
//! answered before the training deadline are the participants of one SecAgg+ round (a
//! fresh protocol round id per attempt), whose five stages each have their own deadline.
//! The server learns the sum over the survivors only, decodes it with the fixed-point
//! encoder and hands it to [`crate::strategy::Strategy::accumulate_sum`].

use dpfl_common::dp::distributed::{DistributedParams, Mechanism};
use dpfl_secagg::messages::{Stage, ToNode};
use dpfl_secagg::params::{AdversaryClass, GraphParams, ThreatModel};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Secure aggregation as the coordinator runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggSettings {
    /// Deadline of each stage.
    pub stage_timeout: Duration,
    /// Ring width b.
    pub bits: u8,
    /// Clip norm C in DP mode `none` (with DP on the mechanism's C is used).
    pub clip_norm: f64,
    /// What (k, t) are chosen for.
    pub threat: ThreatModel,
    /// Explicit (k, t) instead of the finder's.
    pub params: Option<GraphParams>,
    /// First protocol round id; each attempt uses the next one. Nodes refuse ids they have
    /// seen, so deployments start from the clock (a restarted server must not reuse ids).
    pub round_id_base: u64,
    /// DP mode `distributed`: what the nodes' integer noise shares are calibrated to.
    pub distributed: Option<DistributedSettings>,
}

/// Distributed DP on top of secure aggregation (C and z come from the DP settings, the
/// ring width from `bits`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedSettings {
    /// Integer noise the nodes add.
    pub mechanism: Mechanism,
    /// Fewest contributors a round accepts: the noise is accounted at this count, the
    /// protocol's threshold t must be at least this and the server decodes no sum of
    /// fewer survivors.
    pub min_contributors: usize,
    /// Most contributors a round sums (sizes the modular headroom); a round that would
    /// hold more does not start secure aggregation.
    pub max_contributors: usize,
}

impl DistributedSettings {
    /// The round's public parameters for a model of `dim` values.
    pub fn params(&self, bits: u8, clip_norm: f64, z: f64, dim: usize) -> DistributedParams {
        DistributedParams {
            mechanism: self.mechanism,
            bits: u32::from(bits),
            clip_norm,
            noise_multiplier: z,
            min_contributors: self.min_contributors,
            max_contributors: self.max_contributors,
            dim,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        }
    }
}

/// The `[secagg]` section of the server configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggConfig {
    /// Seconds each of the five stages may take.
    pub stage_timeout_secs: f64,
    /// Ring width b in bits.
    pub bits: u8,
    /// Clip norm of updates in DP mode `none` (the fixed-point range).
    pub clip_norm: f64,
    /// Fraction of participants assumed to drop out during a round (finder input).
    pub dropout_rate: f64,
    /// Fraction of participants assumed to collude with the server (finder input).
    pub adversarial_rate: f64,
    /// Degree k instead of the finder's (with `threshold`).
    pub degree: Option<u32>,
    /// Threshold t instead of the finder's (with `degree`).
    pub threshold: Option<u32>,
    /// DP mode `distributed`: the nodes' integer noise, `skellam` or `ddgauss`.
    pub mechanism: Mechanism,
    /// DP mode `distributed`: fewest contributors a round accepts (the noise is accounted
    /// at this count; the protocol threshold t is raised to it); default: the strategy's
    /// `min_fit_clients`, at least 2.
    pub min_contributors: Option<usize>,
    /// DP mode `distributed`: most contributors a round sums (modular headroom); default
    /// 100 (at least `min_contributors`). A round whose secure aggregation would hold more
    /// fails instead of wrapping around.
    pub max_contributors: Option<usize>,
}

impl Default for SecAggConfig {
    fn default() -> Self {
        Self {
            stage_timeout_secs: 30.0,
            bits: 32,
            clip_norm: 10.0,
            dropout_rate: 0.05,
            adversarial_rate: 0.05,
            degree: None,
            threshold: None,
            mechanism: Mechanism::Skellam,
            min_contributors: None,
            max_contributors: None,
        }
    }
}

impl SecAggConfig {
    /// Range checks; `distributed`: DP mode `distributed`, whose encoding allows narrower
    /// rings (2..=40 bits) than fixed-point (16..=62).
    pub fn validate(&self, distributed: bool) -> Result<(), String> {
        if !(self.stage_timeout_secs > 0.0 && self.stage_timeout_secs <= 86_400.0) {
            return Err(format!(
                "secagg.stage_timeout_secs must be in (0, 86400], got {}",
                self.stage_timeout_secs
            ));
        }
        if distributed {
            let max = dpfl_common::dp::distributed::MAX_BITS;
            if !(2..=max).contains(&u32::from(self.bits)) {
                return Err(format!(
                    "secagg.bits must be in 2..={max} with distributed DP, got {}",
                    self.bits
                ));
            }
        } else {
            dpfl_common::wire::SecAggSpec {
                clip_norm: self.clip_norm,
                bits: self.bits,
                distributed: None,
            }
            .validate()
            .map_err(|e| format!("secagg: {e}"))?;
        }
        for (name, v) in [
            ("dropout_rate", self.dropout_rate),
            ("adversarial_rate", self.adversarial_rate),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("secagg.{name} must be in [0, 1), got {v}"));
            }
        }
        if self.degree.is_some() != self.threshold.is_some() {
            return Err("secagg.degree and secagg.threshold are set together or not at all".into());
        }
        Ok(())
    }

    /// The coordinator's settings; `round_id_base` from the driver, `distributed` when the
    /// DP mode is `distributed`.
    pub fn settings(
        &self,
        round_id_base: u64,
        distributed: Option<DistributedSettings>,
    ) -> SecAggSettings {
        SecAggSettings {
            stage_timeout: Duration::from_secs_f64(self.stage_timeout_secs),
            bits: self.bits,
            clip_norm: self.clip_norm,
            threat: ThreatModel {
                adversarial_rate: self.adversarial_rate,
                dropout_rate: self.dropout_rate,
                adversary: AdversaryClass::CuriousServer,
            },
            params: match (self.degree, self.threshold) {
                (Some(degree), Some(threshold)) => Some(GraphParams { degree, threshold }),
                _ => None,
            },
            round_id_base,
            distributed,
        }
    }

    /// The distributed-DP settings for a federation whose rounds wait for `min_clients`.
    pub fn distributed(&self, min_clients: usize) -> DistributedSettings {
        let min_contributors = self.min_contributors.unwrap_or(min_clients.max(2));
        DistributedSettings {
            mechanism: self.mechanism,
            min_contributors,
            max_contributors: self.max_contributors.unwrap_or(100).max(min_contributors),
        }
    }
}

/// One stage message for one node.
#[derive(Debug, Clone)]
pub struct SecAggSend {
    /// Recipient.
    pub node: String,
    /// The protocol message.
    pub message: ToNode,
    /// With the setup: the neighbours whose certificates the driver must forward.
    pub certificates_of: Vec<String>,
}

/// The setup of a new protocol round for every participant, each with the neighbours
/// whose certificates the driver forwards (the graph of the round's context).
pub fn setup_messages(server: &dpfl_secagg::Server) -> Vec<SecAggSend> {
    let ctx = server.context();
    let graph = dpfl_secagg::graph::Graph::new(ctx.len(), ctx.degree, &ctx.graph_seed);
    let setup = ToNode::Setup(server.setup());
    (0..ctx.len())
        .filter_map(|i| {
            let node = ctx.node(i)?.to_string();
            let certificates_of = graph
                .neighbours(i)
                .into_iter()
                .filter_map(|v| ctx.node(v).map(str::to_string))
                .collect();
            Some(SecAggSend {
                node,
                message: setup.clone(),
                certificates_of,
            })
        })
        .collect()
}

/// A stage's protocol messages as they go out (no certificates: only the setup forwards
/// them, see [`setup_messages`]).
pub fn stage_messages(msgs: Vec<(String, ToNode)>) -> Vec<SecAggSend> {
    msgs.into_iter()
        .map(|(node, message)| SecAggSend {
            node,
            message,
            certificates_of: Vec::new(),
        })
        .collect()
}

/// Most bytes of stage message (without the wire envelope) a node may answer with.
pub fn answer_limit(ctx: &dpfl_secagg::RoundContext) -> usize {
    ctx.max_from_node_bytes()
}

/// Name of a stage, for logs and status.
pub fn stage_name(stage: Stage) -> &'static str {
    stage.name()
}
