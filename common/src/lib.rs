//! Shared core of dpfl: the model spec and flat parameter layout, configuration values that
//! travel between peers, the wire protocol and its codec, and the differential-privacy
//! pipeline (clipping, Gaussian noise, accountants).
//!
//! This crate never touches a socket, a file, a clock or libtorch: the server, the client
//! and the simulator all build on it, and it is tested without any of them.

pub mod config;
pub mod dp;
pub mod model;
pub mod wire;

pub use config::{ClientPrivacy, ConfigError, DpMode, OptimizerKind, TrainConfig};
pub use model::{Arch, ModelSpec, SpecHash};
