//! Everything that touches data and libtorch: loading CSV and IDX data sets, partitioning
//! them across (virtual) clients, the MLP built from a [`dpfl_common::ModelSpec`], local
//! training and evaluation, and saving models as safetensors.
//!
//! Shared by the client node (training), the server (centralised evaluation, model export)
//! and the simulator. It knows nothing about the network or about aggregation.

pub mod batched;
pub mod csv;
pub mod data;
pub mod export;
pub mod metrics;
pub mod model;
pub mod partition;
pub mod predict;
pub mod standardize;
pub mod torchscript;

pub use batched::{train_batched, BatchedData};
pub use data::{DataSource, Dataset, Shard};
pub use model::{DeviceData, EvalOutcome, Mlp, TrainOutcome};
