//! The dpfl aggregation server.
//!
//! - [`coordinator`]: the round state machine (events in, actions out, `now` passed in).
//! - [`strategy`]: the pluggable strategy API, FedAvg, and the DP wrappers.
//! - [`aggregate`], [`optimizer`]: aggregation rules (streaming mean, robust rules) and
//!   server optimizers.
//! - [`ledger`]: the privacy ledger.
//! - [`prep`]: the statistics exchange before round 1 (federated standardisation).
//! - [`secure`]: secure aggregation settings and stage messages (the stages run in the
//!   coordinator on `dpfl-secagg`).
//! - [`service`]: the QUIC/mTLS endpoint and the async driver around the coordinator.
//! - [`config`], [`checkpoint`], [`admission`]: configuration, crash-safe checkpoints,
//!   allow/deny lists and rate limits.
//! - [`classes`]: the federation's class names, agreed at join and kept across restarts.
//!
//! It knows nothing of libtorch training internals: centralised evaluation goes through
//! `dpfl-ml`.

pub mod admission;
pub mod aggregate;
pub mod checkpoint;
pub mod classes;
pub mod config;
pub mod coordinator;
pub mod ledger;
pub mod optimizer;
pub mod prep;
pub mod secure;
pub mod service;
pub mod status;
pub mod strategy;

pub use config::ServerConfig;
pub use service::{RunSummary, Server, ServerError};
