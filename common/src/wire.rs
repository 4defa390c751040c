//! The wire protocol: versioned messages and their byte encoding.
//!
//! Each message travels alone on a QUIC stream and is read with a size limit, so framing is
//! just the stream's end. A message is a fixed 20-byte prefix, a small `bincode`-encoded
//! [`Header`] and an optional payload of `f32` values as raw little-endian bytes:
//!
//! ```text
//! "DPFL" | version u16 | reserved u16 | header_len u32 | payload_len u64 | header | payload
//! ```
//!
//! Encoding a 1M-parameter update is one `memcpy` of the payload; decoding checks every
//! length against the bytes that arrived before allocating, and every failure is a typed
//! [`DecodeError`]. This module does not open sockets: [`decode`] checks bytes already in
//! memory, and [`read_message`] reads one message from any [`AsyncRead`] (a QUIC stream)
//! without a second copy: it reads the prefix first and refuses an announced size over the
//! limit before reading further, then reads the header, then the payload straight into
//! the `Vec<f32>` it returns. Both share the checks ([`parse_prefix`], [`decode_header`],
//! [`decode_parts`]) and agree on every input (see `read_message`'s docs for the one
//! intended difference).
//!
//! Limits: a hello, welcome or refusal is at most [`MAX_HELLO_BYTES`]; any other message
//! at most [`max_message_bytes`] of the model's parameter count. Nothing larger is
//! legitimate, so peers should read with those limits rather than a fixed large one.

use crate::config::{ClientPrivacy, DpMode, TrainConfig};
use crate::model::{ModelSpec, SpecHash};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version; peers with another version are refused. Version 2: the hello declares
/// the node's example counts (the server bounds the weight a node may claim by them).
/// Version 3: secure aggregation (the train request says whether the round is securely
/// aggregated; [`Header::Held`], [`Header::SecAggRequest`] and [`Header::SecAggAnswer`]).
/// Version 4: the hello declares the node's class names; the statistics exchange before
/// round 1 ([`Header::StatsRequest`], [`Header::Stats`], [`Header::Standardize`],
/// [`Header::Standardized`]); the welcome's model spec carries its architecture
/// ([`crate::model::Arch`]). Version 5: securely summed statistics (the request's
/// [`StatsRequest::secure_aggregation`], [`Header::StatsHeld`]). Version 6: statistics
/// under distributed DP ([`StatsSecAgg::distributed`]).
pub const PROTOCOL_VERSION: u16 = 6;
/// ALPN protocol id negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"dpfl/6";
/// Magic bytes at the start of every message.
pub const MAGIC: [u8; 4] = *b"DPFL";
/// Size of the fixed prefix.
pub const PREFIX_BYTES: usize = 20;
/// Largest header accepted (headers are small; payloads carry the tensors).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default ceiling on one message for a peer that does not know the model yet (fits a
/// 10M-parameter model with room to spare). Peers that know the model use
/// [`max_message_bytes`] instead.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Largest message without a payload: the hello, welcome and refusal are at most this.
pub const MAX_HELLO_BYTES: usize = PREFIX_BYTES + MAX_HEADER_BYTES;

/// Connection receive window for a peer that has not finished the hello exchange: one
/// hello-sized message plus slack. Until then it can make the other side hold no more.
pub const HELLO_WINDOW_BYTES: usize = MAX_HELLO_BYTES + 4096;

/// The largest legitimate message for a model of `num_params` parameters: a prefix, the
/// largest header and a full parameter vector. Train and evaluate requests and updates
/// are never larger, so this is the natural read limit once the model is known.
pub fn max_message_bytes(num_params: usize) -> usize {
    MAX_HELLO_BYTES.saturating_add(num_params.saturating_mul(4))
}

/// Client's first message on a new connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Software name and version, for logs.
    pub software: String,
    /// The DP mode the client is configured for; must equal the server's.
    pub dp_mode: DpMode,
    /// Number of input features in the client's data.
    pub input_dim: u32,
    /// Number of classes the client's labels may take (largest label + 1).
    pub num_classes: u32,
    /// Training examples the node holds. In mode `none` the server caps the FedAvg weight
    /// a node may claim in any update by this (and by the round's `max_weight_share`);
    /// with DP on every update weighs the same and the server ignores it.
    pub num_examples: u64,
    /// Held-out examples the node evaluates on (bounds the count of an evaluation answer).
    pub num_eval_examples: u64,
    /// Class names in class-index order (CSV `classes=`); empty for integer labels. The
    /// server refuses a list that differs from the federation's (naming both).
    pub class_names: Vec<String>,
}

/// Federation-wide privacy settings announced to a client.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpAgreement {
    /// DP mode of the federation.
    pub mode: DpMode,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Poisson sampling rate q of clients per round.
    pub sampling_rate: f64,
    /// Target delta of the (epsilon, delta) guarantee.
    pub delta: f64,
}

/// Server's answer to an accepted [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The node name the server read from the client's certificate.
    pub node: String,
    /// The model every participant trains.
    pub spec: ModelSpec,
    /// `spec.hash()`; the client recomputes and compares it.
    pub spec_hash: SpecHash,
    /// Privacy settings of the federation.
    pub dp: DpAgreement,
}

/// Why the server refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    /// Protocol version mismatch.
    Version,
    /// DP mode mismatch.
    DpMode,
    /// Data does not fit the model.
    Model,
    /// Node not allowed (deny-list, allow-list, duplicate identity).
    NotAdmitted,
    /// Server is full or shutting down.
    Unavailable,
}

/// A refusal with a human-readable explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// Category.
    pub kind: RefusalKind,
    /// What was expected and what arrived.
    pub detail: String,
}

/// Ask a client to train on the global model (payload: global parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// Round number, starting at 1.
    pub round: u64,
    /// Model spec hash.
    pub spec_hash: SpecHash,
    /// Local training settings.
    pub config: TrainConfig,
    /// Clipping and noise the client must apply.
    pub privacy: ClientPrivacy,
    /// When set, the round is securely aggregated: the node keeps its update, answers
    /// [`Header::Held`], and sends it only masked, in the secure-aggregation stages that
    /// follow.
    pub secure_aggregation: Option<SecAggSpec>,
}

/// How a node encodes its update for a securely aggregated round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecAggSpec {
    /// L2 norm the update is clipped to before it is encoded (the fixed-point range).
    pub clip_norm: f64,
    /// Ring width b: the update is encoded into Z/2^b.
    pub bits: u8,
    /// DP mode `distributed`: the round's public parameters. The node encodes with
    /// [`crate::dp::encoding::DistributedEncoder`] (rotation, integer noise share) instead
    /// of fixed point; `bits` then equals `params.bits`.
    pub distributed: Option<DistributedRound>,
}

/// The public distributed-DP parameters of one securely aggregated round attempt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributedRound {
    /// Mechanism, bits, C, z, contributor bounds, dimension.
    pub params: crate::dp::distributed::DistributedParams,
    /// Seed of the shared random rotation (fresh from the server's OS CSPRNG per attempt).
    pub rotation_seed: u64,
}

/// SHA-256 of an encoding's parameters under a domain tag: what a secure-aggregation
/// round context carries as its `encoding`, so every participant encodes alike.
fn encoding_digest<T: Serialize>(domain: &[u8], value: &T) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(domain);
    // Plain data (floats, integers, options): bincode cannot fail on it; an empty body
    // would still differ from every real one by the domain tag alone.
    h.update(bincode::serde::encode_to_vec(value, bincode_config()).unwrap_or_default());
    h.finalize().into()
}

impl SecAggSpec {
    /// The digest a round's secure-aggregation context binds (`RoundContext::encoding`):
    /// a server that sent another clip norm, ring width or distributed parameters to one
    /// node than to the others gives contexts that do not verify among them, and a node
    /// refuses a context whose digest is not its own request's (a node encoding at
    /// another scale than its peers would stand out in the sum).
    pub fn encoding_digest(&self) -> [u8; 32] {
        encoding_digest(b"dpfl/secagg-encoding/update\0", self)
    }

    /// Range checks (what a node checks before it trains).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(format!(
                "secure aggregation clip norm must be finite and > 0, got {}",
                self.clip_norm
            ));
        }
        // Fixed-point encoding needs 16 bits of precision; distributed DP's encoding is
        // sized by its own parameters (scale and headroom), down to a few bits.
        let widths = if self.distributed.is_some() {
            2..=crate::dp::distributed::MAX_BITS as u8
        } else {
            16..=62
        };
        if !widths.contains(&self.bits) {
            return Err(format!(
                "secure aggregation ring width must be in {}..={} bits, got {}",
                widths.start(),
                widths.end(),
                self.bits
            ));
        }
        if let Some(d) = &self.distributed {
            d.params.validate().map_err(|e| e.to_string())?;
            if d.params.bits != u32::from(self.bits) {
                return Err(format!(
                    "distributed DP encodes into {} bits, the ring has {}",
                    d.params.bits, self.bits
                ));
            }
            if (d.params.clip_norm - self.clip_norm).abs() > 0.0 {
                return Err("distributed DP and secure aggregation disagree on C".into());
            }
        }
        Ok(())
    }
}

/// The envelope of a secure-aggregation stage message: its bytes (bincode, defined by
/// `dpfl-secagg`) travel as the payload, zero-padded to a multiple of 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggFrame {
    /// Training round the stage belongs to (the request's round).
    pub round: u64,
    /// Length of the stage message in bytes (the payload is this, rounded up to 4).
    pub len: u32,
}

/// Training metrics a client reports (absent in `local` DP mode, where they would leak).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Mean training loss over the round's steps.
    pub loss: f64,
    /// Training accuracy over the round's steps.
    pub accuracy: f64,
    /// Mini-batch steps taken.
    pub steps: u64,
    /// Seconds spent training.
    pub seconds: f64,
}

/// A client's answer to a [`TrainRequest`] (payload: the parameter delta `w_local - w_global`,
/// clipped and noised as the privacy settings demand).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateMeta {
    /// Round this update answers.
    pub round: u64,
    /// Model spec hash.
    pub spec_hash: SpecHash,
    /// Training examples used (FedAvg weight); 0 in `local` DP mode, where it would leak.
    pub num_examples: u64,
    /// Training metrics; `None` in `local` DP mode.
    pub metrics: Option<TrainMetrics>,
    /// Whether clipping changed the update; `None` when DP is off or in `local` mode.
    pub clipped: Option<bool>,
}

/// Ask a client to evaluate parameters on its validation split (payload: parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateRequest {
    /// Round whose model is evaluated.
    pub round: u64,
    /// Model spec hash.
    pub spec_hash: SpecHash,
}

/// A client's evaluation of the global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Round evaluated.
    pub round: u64,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Examples evaluated.
    pub num_examples: u64,
}

/// Training is over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finish {
    /// Why (completed, privacy budget reached, shutdown).
    pub reason: String,
    /// Rounds completed in total.
    pub rounds_completed: u64,
}

/// Every message kind. Payload-carrying kinds say so in [`Header::payload_kind`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Header {
    /// Client -> server, first message.
    Hello(Hello),
    /// Server -> client, accepts a [`Hello`].
    Welcome(Welcome),
    /// Server -> client, refuses a [`Hello`]; the connection is then closed.
    Refused(Refusal),
    /// Server -> client; payload: global parameters.
    Train(TrainRequest),
    /// Client -> server; payload: delta.
    Update(UpdateMeta),
    /// Server -> client; payload: parameters to evaluate.
    Evaluate(EvaluateRequest),
    /// Client -> server.
    EvalResult(EvalResult),
    /// Client -> server: the request could not be served (no data, training failed).
    Failed {
        /// Round of the request.
        round: u64,
        /// Why.
        reason: String,
    },
    /// Server -> client: training is over, disconnect.
    Finish(Finish),
    /// Client -> server: the answer to a securely aggregated train request; the node
    /// trained and keeps its (clipped) update for the stages that follow. No payload.
    Held(UpdateMeta),
    /// Server -> client: one secure-aggregation stage (payload: the stage message).
    SecAggRequest(SecAggFrame),
    /// Client -> server: the answer to a stage (payload: the node's stage message).
    SecAggAnswer(SecAggFrame),
    /// Server -> client, before round 1: send your feature statistics (federated
    /// standardisation). No payload.
    StatsRequest(StatsRequest),
    /// Client -> server: the node's feature statistics. No payload: the values travel in
    /// the header (bounded by [`MAX_HEADER_BYTES`]), in f64 so that sums of squares keep
    /// their precision.
    Stats(StatsReport),
    /// Server -> client: the agreed transform; the node applies it to its training and
    /// validation data and answers [`Header::Standardized`]. No payload.
    Standardize(StandardizeSpec),
    /// Client -> server: the transform is applied (the node may now be asked to train).
    Standardized {
        /// Features the node standardised (must equal the agreed transform's).
        features: u32,
    },
    /// Client -> server: the answer to a [`StatsRequest`] with secure aggregation; the node
    /// computed its statistics and keeps them for the secure-aggregation stages that follow
    /// (round [`STATS_ROUND`]). No payload, no values.
    StatsHeld(StatsHeld),
}

/// Round number of the statistics exchange's requests and answers (before round 1).
pub const STATS_ROUND: u64 = 0;

/// The server's request for a node's feature statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsRequest {
    /// Model spec hash (the node checks it is the federation's).
    pub spec_hash: SpecHash,
    /// Public ranges per feature (`lo`, `hi`): the node clips its features to them and maps
    /// them to `[0, 1]` before it counts. Empty: raw values (DP off only).
    pub lo: Vec<f64>,
    /// Upper ends, one per feature (empty with `lo`).
    pub hi: Vec<f64>,
    /// Local DP mode: the noise multiplier the node adds itself to its (per-row normalised)
    /// statistics before they leave it; it checks it against its own floor and budget.
    /// `None`: the node sends exact statistics.
    pub local_noise_multiplier: Option<f64>,
    /// `central` mode: the noise multiplier the server adds to the sum of the statistics
    /// (the node checks it against its own floor and budget and records the release).
    pub central_noise_multiplier: Option<f64>,
    /// With DP on, the node sends its statistics divided by its row count (one node's
    /// contribution then has bounded L2 norm whatever its size: client-level sensitivity).
    pub normalized: bool,
    /// When set, the statistics are securely summed: the node keeps them, answers
    /// [`Header::StatsHeld`], and sends them only masked, in one SecAgg+ instance of round
    /// [`STATS_ROUND`]. A node configured for secure aggregation refuses a request without.
    pub secure_aggregation: Option<StatsSecAgg>,
}

/// How a node encodes its statistics for their secure sum: the vector `count | sum |
/// sum_sq | label_counts` (f64), fixed point in `Z/2^bits`, or, in DP mode
/// `distributed`, with [`crate::dp::encoding::DistributedEncoder`] at `distributed`'s
/// public parameters (clip `sqrt(3d + 1)`, the statistics' noise multiplier, the
/// federation's contributor bounds), this node's integer noise share included.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StatsSecAgg {
    /// L2 bound of one node's statistics vector (the fixed-point range): `sqrt(3d + 1)`
    /// for normalised statistics, `R sqrt(3d + 1)` for counts of at most `R` rows. A node
    /// whose statistics exceed it refuses.
    pub clip_norm: f64,
    /// Ring width b.
    pub bits: u8,
    /// DP mode `distributed`: the release's public parameters (`dim` = 3d + classes,
    /// `clip_norm` equal to the range above, `bits` to the ring's) and rotation seed
    /// (fresh per instance). The node checks them against its own policy.
    pub distributed: Option<DistributedRound>,
}

impl StatsSecAgg {
    /// As [`SecAggSpec::encoding_digest`], for the statistics' instance.
    pub fn encoding_digest(&self) -> [u8; 32] {
        encoding_digest(b"dpfl/secagg-encoding/statistics\0", self)
    }

    /// Range checks (what a node checks before it computes anything).
    pub fn validate(&self) -> Result<(), String> {
        SecAggSpec {
            clip_norm: self.clip_norm,
            bits: self.bits,
            distributed: self.distributed,
        }
        .validate()
    }
}

/// A node's answer to a securely summed statistics request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsHeld {
    /// Model spec hash.
    pub spec_hash: SpecHash,
}

/// A node's feature statistics (see `dpfl_ml::standardize::FeatureStats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Model spec hash.
    pub spec_hash: SpecHash,
    /// Present (non-missing) values per feature.
    pub count: Vec<f64>,
    /// Sum per feature.
    pub sum: Vec<f64>,
    /// Sum of squares per feature.
    pub sum_sq: Vec<f64>,
    /// Rows per class.
    pub label_counts: Vec<f64>,
    /// Whether the values were clipped to the request's ranges and mapped to `[0, 1]`.
    pub bounded: bool,
    /// Whether the statistics are divided by the node's row count (the request said so).
    pub normalized: bool,
    /// Whether the node added local DP noise (the request said so).
    pub noised: bool,
}

/// The federation's agreed standardisation: `x -> (clip(x, lo, hi) - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandardizeSpec {
    /// Model spec hash.
    pub spec_hash: SpecHash,
    /// Mean per feature.
    pub mean: Vec<f64>,
    /// Standard deviation per feature (positive).
    pub std: Vec<f64>,
    /// Ranges features are clipped to first (empty: none).
    pub lo: Vec<f64>,
    /// Upper ends (empty with `lo`).
    pub hi: Vec<f64>,
}

/// Whether a header kind carries a parameter payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// No payload allowed.
    None,
    /// A full parameter vector or delta is required.
    Params,
    /// Opaque bytes (a secure-aggregation stage message), padded to 4.
    Bytes,
}

impl Header {
    /// Whether this kind carries parameters.
    pub fn payload_kind(&self) -> PayloadKind {
        match self {
            Header::Train(_) | Header::Update(_) | Header::Evaluate(_) => PayloadKind::Params,
            Header::SecAggRequest(_) | Header::SecAggAnswer(_) => PayloadKind::Bytes,
            _ => PayloadKind::None,
        }
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Header::Hello(_) => "hello",
            Header::Welcome(_) => "welcome",
            Header::Refused(_) => "refused",
            Header::Train(_) => "train",
            Header::Update(_) => "update",
            Header::Evaluate(_) => "evaluate",
            Header::EvalResult(_) => "eval_result",
            Header::Failed { .. } => "failed",
            Header::Finish(_) => "finish",
            Header::Held(_) => "held",
            Header::SecAggRequest(_) => "secagg_request",
            Header::SecAggAnswer(_) => "secagg_answer",
            Header::StatsRequest(_) => "stats_request",
            Header::Stats(_) => "stats",
            Header::Standardize(_) => "standardize",
            Header::Standardized { .. } => "standardized",
            Header::StatsHeld(_) => "stats_held",
        }
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The envelope.
    pub header: Header,
    /// Parameters or delta (empty for kinds without payload).
    pub payload: Vec<f32>,
}

/// Why bytes from a peer are not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the fixed prefix.
    #[error("message truncated: {got} bytes, need at least {PREFIX_BYTES}")]
    Truncated {
        /// Bytes received.
        got: usize,
    },
    /// The message is larger than the configured limit.
    #[error("message of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bytes received (or announced).
        got: u64,
        /// Configured limit.
        limit: usize,
    },
    /// Not a dpfl message.
    #[error("bad magic: expected \"DPFL\", got {0:02x?}")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("protocol version mismatch: expected {PROTOCOL_VERSION}, got {0}")]
    Version(u16),
    /// The reserved prefix field is not zero (a future version, or corruption).
    #[error("reserved prefix field is {0:#06x}, expected 0")]
    Reserved(u16),
    /// Header larger than [`MAX_HEADER_BYTES`].
    #[error("header of {0} bytes exceeds {MAX_HEADER_BYTES}")]
    HeaderTooLarge(u32),
    /// Announced lengths do not add up to the bytes received.
    #[error("length mismatch: prefix announces {announced} bytes, received {got}")]
    LengthMismatch {
        /// Prefix + header + payload as announced.
        announced: u64,
        /// Bytes received.
        got: usize,
    },
    /// Payload length not a multiple of 4.
    #[error("payload of {0} bytes is not a whole number of f32 values")]
    PayloadAlignment(u64),
    /// The header bytes are not a valid header.
    #[error("malformed header: {0}")]
    Header(String),
    /// The header did not use all its bytes.
    #[error("header has {0} trailing bytes")]
    TrailingHeaderBytes(usize),
    /// A payload where the kind allows none, or none where one is required.
    #[error("message kind `{kind}` {problem}")]
    Payload {
        /// Header kind.
        kind: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Text a peer sent, made safe to write into a log or an output file: control characters
/// (newlines, escapes) are shown escaped so a peer cannot forge log lines, and the text is
/// cut at `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 8);
    for (i, c) in text.chars().enumerate() {
        if i >= max {
            out.push_str("...");
            break;
        }
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_limit::<MAX_HEADER_BYTES>()
}

/// Encodes a message. The payload is copied once, as raw little-endian bytes.
pub fn encode(header: &Header, payload: &[f32]) -> Vec<u8> {
    // Encoding our own types into a Vec cannot fail except past the header limit, which
    // the types are far from; keep a typed panic message rather than a silent truncation.
    let head = bincode::serde::encode_to_vec(header, bincode_config())
        .expect("dpfl headers are small and always encodable");
    let payload_bytes = std::mem::size_of_val(payload);
    let mut out = Vec::with_capacity(PREFIX_BYTES + head.len() + payload_bytes);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload_bytes as u64).to_le_bytes());
    out.extend_from_slice(&head);
    extend_f32_le(&mut out, payload);
    out
}

#[cfg(target_endian = "little")]
fn extend_f32_le(out: &mut Vec<u8>, values: &[f32]) {
    out.extend_from_slice(bytemuck::cast_slice(values));
}

#[cfg(not(target_endian = "little"))]
fn extend_f32_le(out: &mut Vec<u8>, values: &[f32]) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Copies little-endian `f32` bytes into a vector (one `memcpy` on little-endian hosts).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / 4;
    let mut out = vec![0f32; n];
    #[cfg(target_endian = "little")]
    bytemuck::cast_slice_mut::<f32, u8>(&mut out).copy_from_slice(&bytes[..n * 4]);
    #[cfg(not(target_endian = "little"))]
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    out
}

/// Packs opaque bytes into a payload (zero-padded to a multiple of 4 bytes) and the
/// frame that announces them. `None` when `bytes` is empty or longer than `u32::MAX`.
pub fn bytes_payload(round: u64, bytes: &[u8]) -> Option<(SecAggFrame, Vec<f32>)> {
    let len = u32::try_from(bytes.len()).ok().filter(|&l| l > 0)?;
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().div_ceil(4) * 4, 0);
    Some((SecAggFrame { round, len }, f32_from_le_bytes(&padded)))
}

/// The bytes a [`SecAggFrame`] announces, from the payload it came with: the payload must
/// be exactly `len` rounded up to 4 bytes, padded with zeros.
pub fn payload_bytes(frame: &SecAggFrame, payload: &[f32]) -> Result<Vec<u8>, DecodeError> {
    let len = frame.len as usize;
    let expected = len.div_ceil(4);
    if len == 0 || payload.len() != expected {
        return Err(DecodeError::Payload {
            kind: "secagg",
            problem: "payload length does not match the frame",
        });
    }
    let mut out = Vec::with_capacity(4 * expected);
    for v in payload {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    if out[len..].iter().any(|&b| b != 0) {
        return Err(DecodeError::Payload {
            kind: "secagg",
            problem: "padding bytes must be zero",
        });
    }
    out.truncate(len);
    Ok(out)
}

/// Lengths announced by a message prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    /// Header bytes (at most [`MAX_HEADER_BYTES`]).
    pub header: usize,
    /// Payload bytes.
    pub payload: u64,
}

impl Lengths {
    /// Prefix + header + payload, the whole message as announced.
    pub fn total(&self) -> u64 {
        (PREFIX_BYTES as u64)
            .saturating_add(self.header as u64)
            .saturating_add(self.payload)
    }
}

/// The checks of a prefix that need nothing else: magic, version, reserved field, header
/// length.
fn check_prefix(p: &[u8; PREFIX_BYTES]) -> Result<Lengths, DecodeError> {
    let magic = [p[0], p[1], p[2], p[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([p[4], p[5]]);
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    let reserved = u16::from_le_bytes([p[6], p[7]]);
    if reserved != 0 {
        return Err(DecodeError::Reserved(reserved));
    }
    let header_len = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    if header_len as usize > MAX_HEADER_BYTES {
        return Err(DecodeError::HeaderTooLarge(header_len));
    }
    let payload = u64::from_le_bytes([p[12], p[13], p[14], p[15], p[16], p[17], p[18], p[19]]);
    Ok(Lengths {
        header: header_len as usize,
        payload,
    })
}

/// Checks a prefix before anything else of the message is read: magic, version, reserved
/// field, header length, the announced total against `limit` ([`DecodeError::TooLarge`]
/// with the announced size) and the payload's alignment.
pub fn parse_prefix(prefix: &[u8; PREFIX_BYTES], limit: usize) -> Result<Lengths, DecodeError> {
    let lengths = check_prefix(prefix)?;
    if lengths.total() > limit as u64 {
        return Err(DecodeError::TooLarge {
            got: lengths.total(),
            limit,
        });
    }
    if lengths.payload % 4 != 0 {
        return Err(DecodeError::PayloadAlignment(lengths.payload));
    }
    Ok(lengths)
}

/// Decodes the header bytes of a message whose payload has `payload_len` bytes: the header
/// must use all its bytes, and carry a payload exactly when its kind requires one.
pub fn decode_header(bytes: &[u8], payload_len: u64) -> Result<Header, DecodeError> {
    let (header, used): (Header, usize) =
        bincode::serde::decode_from_slice(bytes, bincode_config())
            .map_err(|e| DecodeError::Header(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingHeaderBytes(bytes.len() - used));
    }
    // bincode's varint decoder accepts over-long encodings (1000 as `251 232 3` but also
    // 232 as `251 232 0`): refuse them, so one message has exactly one byte form.
    let canonical =
        bincode::serde::encode_to_vec(&header, bincode_config()).is_ok_and(|again| again == bytes);
    if !canonical {
        return Err(DecodeError::Header("non-canonical encoding".into()));
    }
    match (header.payload_kind(), payload_len == 0) {
        (PayloadKind::None, false) => Err(DecodeError::Payload {
            kind: header.name(),
            problem: "must not carry a payload",
        }),
        (PayloadKind::Params, true) => Err(DecodeError::Payload {
            kind: header.name(),
            problem: "requires a parameter payload",
        }),
        (PayloadKind::Bytes, true) => Err(DecodeError::Payload {
            kind: header.name(),
            problem: "requires a byte payload",
        }),
        _ => Ok(header),
    }
}

/// Assembles a message from parts read separately (the prefix's [`Lengths`], the header
/// bytes and the payload already converted to `f32`), with the same checks as [`decode`].
pub fn decode_parts(
    lengths: Lengths,
    header_bytes: &[u8],
    payload: Vec<f32>,
) -> Result<Message, DecodeError> {
    let got = PREFIX_BYTES + header_bytes.len() + 4 * payload.len();
    if header_bytes.len() != lengths.header || 4 * payload.len() as u64 != lengths.payload {
        return Err(DecodeError::LengthMismatch {
            announced: lengths.total(),
            got,
        });
    }
    let header = decode_header(header_bytes, lengths.payload)?;
    Ok(Message { header, payload })
}

/// Decodes and checks one message of at most `max_bytes` bytes.
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Message, DecodeError> {
    if bytes.len() > max_bytes {
        return Err(DecodeError::TooLarge {
            got: bytes.len() as u64,
            limit: max_bytes,
        });
    }
    let Some(prefix) = bytes.first_chunk::<PREFIX_BYTES>() else {
        return Err(DecodeError::Truncated { got: bytes.len() });
    };
    let lengths = check_prefix(prefix)?;
    if lengths.total() != bytes.len() as u64 {
        return Err(DecodeError::LengthMismatch {
            announced: lengths.total(),
            got: bytes.len(),
        });
    }
    if lengths.payload % 4 != 0 {
        return Err(DecodeError::PayloadAlignment(lengths.payload));
    }
    let (head_bytes, payload_bytes) = bytes[PREFIX_BYTES..].split_at(lengths.header);
    let header = decode_header(head_bytes, lengths.payload)?;
    Ok(Message {
        header,
        payload: f32_from_le_bytes(payload_bytes),
    })
}

/// Why a message could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not a valid message (or announce more than the limit).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream failed (reset, connection lost).
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads as many bytes as fit in `buf` or until the end of the stream; returns how many.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// After an error found before the end of the stream: discards the rest of the stream,
/// never more than `limit` bytes in all and without keeping them, so that the error is the
/// one [`decode`] gives for the whole stream (a stream over the limit is `TooLarge`
/// whatever its first bytes; a header or payload fault yields to a length mismatch).
async fn settle<R: AsyncRead + Unpin>(
    r: &mut R,
    err: DecodeError,
    announced: Option<u64>,
    seen: usize,
    limit: usize,
) -> ReadError {
    let mut seen = seen as u64;
    let mut scratch = [0u8; 8192];
    loop {
        if seen > limit as u64 {
            return DecodeError::TooLarge { got: seen, limit }.into();
        }
        let room = (limit as u64 - seen + 1).min(scratch.len() as u64) as usize;
        match r.read(&mut scratch[..room]).await {
            Ok(0) => break,
            Ok(n) => seen += n as u64,
            // The peer sent a bad message and then broke the stream: the bad message is
            // the more useful report.
            Err(_) => return err.into(),
        }
    }
    let after_lengths = matches!(
        err,
        DecodeError::PayloadAlignment(_)
            | DecodeError::Header(_)
            | DecodeError::TrailingHeaderBytes(_)
            | DecodeError::Payload { .. }
            | DecodeError::LengthMismatch { .. }
    );
    match announced {
        Some(a) if after_lengths && a != seen => DecodeError::LengthMismatch {
            announced: a,
            got: seen as usize,
        }
        .into(),
        _ => err.into(),
    }
}

/// Reads one message, the whole stream, of at most `limit` bytes, with one copy of the
/// payload (from the stream's buffers into the returned `Vec<f32>`).
///
/// The 20-byte prefix is read first and checked by [`parse_prefix`]: an announced size
/// over `limit` is refused before anything else is read, so a peer cannot make the reader
/// wait for, buffer or allocate an oversized message. Then the header (at most
/// [`MAX_HEADER_BYTES`]) is read and decoded, then the payload straight into a `Vec<f32>`
/// (on little-endian hosts by reading into its bytes), and the stream must end there.
///
/// It accepts exactly the streams whose bytes [`decode`] accepts, with the same message,
/// and rejects the others with the same kind of error, with one intended difference: a
/// prefix announcing more than `limit` is `TooLarge` at once, where `decode` of a short
/// stream would say `LengthMismatch`. After a fault found before the end it discards the
/// rest of the stream (at most `limit` bytes, into a small buffer) to tell an oversized
/// stream from a merely malformed one.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Message, ReadError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    let got = read_full(r, &mut prefix).await?;
    if got < PREFIX_BYTES {
        // The stream ended: `got` is its whole length.
        return Err(if got > limit {
            DecodeError::TooLarge {
                got: got as u64,
                limit,
            }
        } else {
            DecodeError::Truncated { got }
        }
        .into());
    }
    let lengths = match check_prefix(&prefix) {
        Ok(l) => l,
        Err(e) => return Err(settle(r, e, None, PREFIX_BYTES, limit).await),
    };
    let announced = lengths.total();
    let lengths = match parse_prefix(&prefix, limit) {
        Ok(l) => l,
        Err(e @ DecodeError::TooLarge { .. }) => return Err(e.into()),
        Err(e) => return Err(settle(r, e, Some(announced), PREFIX_BYTES, limit).await),
    };
    let mismatch = |got: usize| DecodeError::LengthMismatch { announced, got };
    let mut head = vec![0u8; lengths.header];
    let got = read_full(r, &mut head).await?;
    if got < head.len() {
        return Err(mismatch(PREFIX_BYTES + got).into());
    }
    let seen = PREFIX_BYTES + head.len();
    let header = match decode_header(&head, lengths.payload) {
        Ok(h) => h,
        Err(e) => return Err(settle(r, e, Some(announced), seen, limit).await),
    };
    // `parse_prefix` bounded the payload by `limit`, so it fits in memory and in usize.
    let payload_bytes = lengths.payload as usize;
    let mut payload = vec![0f32; payload_bytes / 4];
    let got = read_full(r, bytemuck::cast_slice_mut::<f32, u8>(&mut payload)).await?;
    if got < payload_bytes {
        return Err(mismatch(seen + got).into());
    }
    #[cfg(not(target_endian = "little"))]
    for v in payload.iter_mut() {
        *v = f32::from_bits(u32::from_le(v.to_bits()));
    }
    let mut one = [0u8; 1];
    if read_full(r, &mut one).await? != 0 {
        let e = mismatch(seen + payload_bytes + 1);
        return Err(settle(r, e, Some(announced), seen + payload_bytes + 1, limit).await);
    }
    Ok(Message { header, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn distributed_rings_may_be_narrower_than_fixed_point_ones() {
        use crate::dp::distributed::{DistributedParams, Mechanism};
        let params = |bits: u32| DistributedParams {
            mechanism: Mechanism::Skellam,
            bits,
            clip_norm: 0.5,
            noise_multiplier: 1.0,
            min_contributors: 80,
            max_contributors: 150,
            dim: 199_210,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        };
        let spec = |bits: u8, distributed: bool| SecAggSpec {
            clip_norm: 0.5,
            bits,
            distributed: distributed.then(|| DistributedRound {
                params: params(u32::from(bits)),
                rotation_seed: 1,
            }),
        };
        assert!(spec(10, true).validate().is_ok());
        assert!(spec(10, false).validate().is_err());
        assert!(spec(16, false).validate().is_ok());
        assert!(spec(41, true).validate().is_err());
        assert!(spec(1, true).validate().is_err());
    }

    fn update(round: u64) -> Header {
        Header::Update(UpdateMeta {
            round,
            spec_hash: [7; 32],
            num_examples: 600,
            metrics: Some(TrainMetrics {
                loss: 0.5,
                accuracy: 0.8,
                steps: 19,
                seconds: 1.5,
            }),
            clipped: Some(true),
        })
    }

    #[test]
    fn round_trip_with_payload() {
        let payload: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes = encode(&update(3), &payload);
        let msg = decode(&bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(msg.header, update(3));
        assert_eq!(msg.payload, payload);
    }

    #[test]
    fn payload_is_raw_little_endian_after_header() {
        let bytes = encode(&update(1), &[1.0, -2.5]);
        let tail = &bytes[bytes.len() - 8..];
        assert_eq!(&tail[..4], &1.0f32.to_le_bytes());
        assert_eq!(&tail[4..], &(-2.5f32).to_le_bytes());
    }

    #[test]
    fn every_header_kind_round_trips() {
        let kinds = vec![
            (
                Header::Hello(Hello {
                    software: "dpfl".into(),
                    dp_mode: DpMode::Central,
                    input_dim: 784,
                    num_classes: 10,
                    num_examples: 1000,
                    num_eval_examples: 0,
                    class_names: Vec::new(),
                }),
                vec![],
            ),
            (
                Header::Welcome(Welcome {
                    node: "n1".into(),
                    spec: ModelSpec::default(),
                    spec_hash: ModelSpec::default().hash(),
                    dp: DpAgreement {
                        mode: DpMode::Local,
                        noise_multiplier: 1.1,
                        sampling_rate: 0.1,
                        delta: 1e-5,
                    },
                }),
                vec![],
            ),
            (
                Header::Refused(Refusal {
                    kind: RefusalKind::DpMode,
                    detail: "x".into(),
                }),
                vec![],
            ),
            (
                Header::Train(TrainRequest {
                    round: 1,
                    spec_hash: [1; 32],
                    config: TrainConfig::default(),
                    privacy: ClientPrivacy::NONE,
                    secure_aggregation: Some(SecAggSpec {
                        clip_norm: 1.0,
                        bits: 32,
                        distributed: None,
                    }),
                }),
                vec![1.0],
            ),
            (
                Header::Evaluate(EvaluateRequest {
                    round: 2,
                    spec_hash: [1; 32],
                }),
                vec![0.0, 1.0],
            ),
            (
                Header::EvalResult(EvalResult {
                    round: 2,
                    loss: 0.3,
                    accuracy: 0.9,
                    num_examples: 10,
                }),
                vec![],
            ),
            (
                Header::Failed {
                    round: 2,
                    reason: "no data".into(),
                },
                vec![],
            ),
            (
                Header::Finish(Finish {
                    reason: "done".into(),
                    rounds_completed: 10,
                }),
                vec![],
            ),
            (
                Header::Held(match update(4) {
                    Header::Update(m) => m,
                    _ => unreachable!("update() makes an update header"),
                }),
                vec![],
            ),
            (
                Header::SecAggRequest(SecAggFrame { round: 4, len: 5 }),
                vec![1.0, 0.0],
            ),
            (
                Header::SecAggAnswer(SecAggFrame { round: 4, len: 4 }),
                vec![2.0],
            ),
            (
                Header::StatsRequest(StatsRequest {
                    spec_hash: [3; 32],
                    lo: vec![0.0, -1.0],
                    hi: vec![1.0, 1e9],
                    local_noise_multiplier: Some(2.5),
                    central_noise_multiplier: None,
                    normalized: true,
                    secure_aggregation: None,
                }),
                vec![],
            ),
            (
                Header::StatsRequest(StatsRequest {
                    spec_hash: [3; 32],
                    lo: vec![0.0],
                    hi: vec![1.0],
                    local_noise_multiplier: None,
                    central_noise_multiplier: Some(2.0),
                    normalized: true,
                    secure_aggregation: Some(StatsSecAgg {
                        clip_norm: 2.0,
                        bits: 62,
                        distributed: None,
                    }),
                }),
                vec![],
            ),
            (Header::StatsHeld(StatsHeld { spec_hash: [3; 32] }), vec![]),
            (
                Header::Stats(StatsReport {
                    spec_hash: [3; 32],
                    count: vec![10.0, 9.0],
                    sum: vec![1e-300, 12_345.678_901_234_5],
                    sum_sq: vec![0.1, 1.5e17],
                    label_counts: vec![4.0, 6.0],
                    bounded: false,
                    normalized: false,
                    noised: false,
                }),
                vec![],
            ),
            (
                Header::Standardize(StandardizeSpec {
                    spec_hash: [3; 32],
                    mean: vec![0.5],
                    std: vec![2.0],
                    lo: vec![],
                    hi: vec![],
                }),
                vec![],
            ),
            (Header::Standardized { features: 2 }, vec![]),
        ];
        for (h, p) in kinds {
            let m = decode(&encode(&h, &p), 1 << 20).unwrap();
            assert_eq!(m.header, h);
            assert_eq!(m.payload, p);
        }
    }

    #[test]
    fn bounds_and_garbage_get_typed_errors() {
        let good = encode(&update(1), &[1.0; 100]);
        assert!(matches!(
            decode(&good, 100),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode(&good[..10], 1 << 20),
            Err(DecodeError::Truncated { got: 10 })
        ));
        assert!(matches!(
            decode(&good[..good.len() - 4], 1 << 20),
            Err(DecodeError::LengthMismatch { .. })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode(&bad, 1 << 20),
            Err(DecodeError::BadMagic(_))
        ));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(decode(&bad, 1 << 20), Err(DecodeError::Version(9)));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert!(matches!(
            decode(&bad, 1 << 20),
            Err(DecodeError::HeaderTooLarge(_))
        ));
        // A payload length announcing far more than arrived must not allocate it.
        let mut bad = good.clone();
        bad[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad, 1 << 20),
            Err(DecodeError::LengthMismatch { .. })
        ));
        // Header kind that forbids a payload.
        let fin = Header::Finish(Finish {
            reason: String::new(),
            rounds_completed: 0,
        });
        assert!(matches!(
            decode(&encode(&fin, &[1.0]), 1 << 20),
            Err(DecodeError::Payload { .. })
        ));
        assert!(matches!(
            decode(&encode(&update(1), &[]), 1 << 20),
            Err(DecodeError::Payload { .. })
        ));
    }

    #[test]
    fn corrupted_header_bytes_are_a_typed_error() {
        let mut bytes = encode(&update(1), &[1.0]);
        for b in &mut bytes[PREFIX_BYTES..PREFIX_BYTES + 4] {
            *b = 0xff;
        }
        assert!(matches!(
            decode(&bytes, 1 << 20),
            Err(DecodeError::Header(_))
        ));
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Reads `bytes` as a stream with [`read_message`].
    fn read_all(bytes: &[u8], limit: usize) -> Result<Message, ReadError> {
        let mut r = bytes;
        block_on(read_message(&mut r, limit))
    }

    /// The reader and `decode` agree on `bytes`: the same message, or the same kind of
    /// error (an announced size over the limit is `TooLarge` for the reader at once).
    fn assert_agree(bytes: &[u8], limit: usize) {
        let streamed = read_all(bytes, limit);
        let decoded = decode(bytes, limit);
        match (&streamed, &decoded) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(ReadError::Decode(a)), Err(b)) => {
                let announced_over = bytes
                    .first_chunk::<PREFIX_BYTES>()
                    .and_then(|p| check_prefix(p).ok())
                    .is_some_and(|l| l.total() > limit as u64);
                if announced_over {
                    assert!(matches!(a, DecodeError::TooLarge { .. }), "{a:?}");
                    assert!(
                        matches!(
                            b,
                            DecodeError::TooLarge { .. } | DecodeError::LengthMismatch { .. }
                        ),
                        "{b:?}"
                    );
                } else {
                    assert_eq!(
                        std::mem::discriminant(a),
                        std::mem::discriminant(b),
                        "reader {a:?}, decode {b:?}"
                    );
                }
            }
            _ => panic!("reader {streamed:?}, decode {decoded:?}"),
        }
    }

    #[test]
    fn reader_reads_valid_messages_of_every_size() {
        for n in [1usize, 3, 1000] {
            let payload: Vec<f32> = (0..n).map(|i| i as f32 - 0.5).collect();
            let bytes = encode(&update(9), &payload);
            let m = read_all(&bytes, bytes.len()).unwrap();
            assert_eq!(m.header, update(9));
            assert_eq!(m.payload, payload);
        }
        let fin = Header::Finish(Finish {
            reason: "x".into(),
            rounds_completed: 1,
        });
        let m = read_all(&encode(&fin, &[]), MAX_HELLO_BYTES).unwrap();
        assert_eq!(m.header, fin);
        assert!(m.payload.is_empty());
    }

    #[test]
    fn reader_refuses_an_oversized_announcement_from_the_prefix_alone() {
        block_on(async {
            // The peer announces 1 GiB and sends only the prefix, keeping the stream open:
            // the reader answers from the prefix, without waiting for (or allocating) more.
            let (mut tx, mut rx) = tokio::io::duplex(64);
            let good = encode(&update(1), &[1.0; 4]);
            let mut prefix = good[..PREFIX_BYTES].to_vec();
            prefix[12..20].copy_from_slice(&(1u64 << 30).to_le_bytes());
            use tokio::io::AsyncWriteExt;
            tx.write_all(&prefix).await.unwrap();
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                read_message(&mut rx, 1 << 20),
            )
            .await
            .expect("answered from the prefix");
            match r {
                Err(ReadError::Decode(DecodeError::TooLarge { got, limit })) => {
                    let header_len = u32::from_le_bytes([good[8], good[9], good[10], good[11]]);
                    assert_eq!(got, (1u64 << 30) + PREFIX_BYTES as u64 + header_len as u64);
                    assert_eq!(limit, 1 << 20);
                }
                other => panic!("{other:?}"),
            }
            drop(tx);
        });
    }

    #[test]
    fn reader_limit_is_exact() {
        let bytes = encode(&update(2), &[0.5; 100]);
        assert!(read_all(&bytes, bytes.len()).is_ok());
        assert!(matches!(
            read_all(&bytes, bytes.len() - 1),
            Err(ReadError::Decode(DecodeError::TooLarge { .. }))
        ));
    }

    #[test]
    fn reader_and_decode_agree_on_hand_made_faults() {
        let good = encode(&update(1), &[1.0; 100]);
        let limit = 1 << 20;
        let mut cases: Vec<Vec<u8>> = vec![
            good.clone(),
            good[..10].to_vec(),
            good[..good.len() - 4].to_vec(),
            [good.clone(), vec![0; 3]].concat(),
            vec![0u8; 300_000], // garbage over the limit: TooLarge, like decode
            vec![0u8; 30],
        ];
        for (off, v) in [
            (0usize, b'X'),
            (4, 9),
            (6, 1),
            (10, 0xff),
            (12, 1),
            (21, 0xff),
        ] {
            let mut b = good.clone();
            b[off] = v;
            cases.push(b);
        }
        let fin = Header::Finish(Finish {
            reason: String::new(),
            rounds_completed: 0,
        });
        cases.push(encode(&fin, &[1.0]));
        cases.push(encode(&update(1), &[]));
        for c in &cases {
            assert_agree(c, limit);
            assert_agree(c, 200_000);
        }
        assert!(matches!(
            read_all(&vec![0u8; 300_000], 200_000),
            Err(ReadError::Decode(DecodeError::TooLarge { .. }))
        ));
    }

    #[test]
    fn reader_reports_a_broken_stream_as_io() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
            }
        }
        assert!(matches!(
            block_on(read_message(&mut Broken, 1 << 20)),
            Err(ReadError::Io(_))
        ));
    }

    proptest! {
        #[test]
        fn reader_agrees_with_decode_on_mutated_messages(
            n in 0usize..40,
            edits in proptest::collection::vec((0usize..400, any::<u8>()), 0..4),
            cut in proptest::option::of(0usize..400),
            extra in 0usize..6,
            limit in prop_oneof![Just(1usize << 16), 0usize..400],
        ) {
            let mut bytes = encode(&update(5), &vec![0.25; n]);
            for (pos, val) in edits {
                let p = pos % bytes.len();
                bytes[p] = val;
            }
            if let Some(c) = cut {
                bytes.truncate(c.min(bytes.len()));
            }
            bytes.extend(std::iter::repeat_n(7u8, extra));
            assert_agree(&bytes, limit);
        }

        #[test]
        fn reader_agrees_with_decode_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            assert_agree(&bytes, 1 << 16);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, 1 << 16);
        }

        #[test]
        fn decode_never_panics_on_mutated_messages(pos in 0usize..200, val in any::<u8>(), n in 0usize..40) {
            let mut bytes = encode(&update(5), &vec![0.25; n]);
            let p = pos % bytes.len();
            bytes[p] = val;
            let _ = decode(&bytes, 1 << 16);
        }

        #[test]
        fn round_trip_arbitrary_payloads(payload in proptest::collection::vec(-1e6f32..1e6, 1..300), round in any::<u64>()) {
            let m = decode(&encode(&update(round), &payload), 1 << 20).unwrap();
            prop_assert_eq!(m.payload, payload);
            prop_assert_eq!(m.header, update(round));
        }
    }

    #[test]
    fn secagg_bytes_round_trip_and_padding_is_checked() {
        for len in [1usize, 3, 4, 5, 1000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8 | 0x80).collect();
            let (frame, payload) = bytes_payload(9, &bytes).unwrap();
            assert_eq!(frame.len as usize, len);
            let msg = decode(
                &encode(&Header::SecAggAnswer(frame), &payload),
                DEFAULT_MAX_MESSAGE_BYTES,
            )
            .unwrap();
            let Header::SecAggAnswer(f) = msg.header else {
                panic!("wrong kind")
            };
            assert_eq!(payload_bytes(&f, &msg.payload).unwrap(), bytes);
            // Any NaN bit pattern survives the f32 payload unchanged.
            let mut longer = msg.payload.clone();
            longer.push(0.0);
            assert!(payload_bytes(&f, &longer).is_err());
            if len % 4 != 0 {
                let mut dirty = msg.payload.clone();
                let last = dirty.len() - 1;
                dirty[last] = f32::from_bits(dirty[last].to_bits() | 0x8000_0000);
                assert!(payload_bytes(&f, &dirty).is_err(), "non-zero padding");
            }
        }
        assert!(bytes_payload(1, &[]).is_none());
        assert!(matches!(
            decode(
                &encode(
                    &Header::SecAggRequest(SecAggFrame { round: 1, len: 4 }),
                    &[]
                ),
                1 << 20
            ),
            Err(DecodeError::Payload { .. })
        ));
    }
}
