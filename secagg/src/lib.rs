//! Secure aggregation for dpfl: the server learns the sum of the surviving nodes' vectors
//! and nothing else about any one of them.
//!
//! The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning", CCS) with the sparse random graph of Bell et al.
//! 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS; SecAgg+)
//! and the signed survivor-set check of Bonawitz's actively secure variant. Per round:
//!
//! 1. Every node makes two X25519 key pairs (c for encrypting shares, s for masks) and a
//!    self-mask seed b, and advertises the public keys and a commitment to b signed with its
//!    certificate key ([`sign`]).
//! 2. The server's announced seed fixes a Harary graph H(k, n) on a random permutation of
//!    the participants ([`graph`]); each node verifies its neighbours' signatures and sends
//!    each neighbour t-of-k Shamir shares ([`shamir`], GF(2^61 − 1)) of b and s_sk,
//!    encrypted (ChaCha20-Poly1305 under HKDF of the X25519 secret).
//! 3. Each node sends y = x + PRG(b) + Σ_v ±PRG(s_uv) mod 2^b ([`FixedPoint`] encodes
//!    floats), PRG = ChaCha20 keyed by HKDF of b (self mask) or of the X25519 secret
//!    s_u·s_v (pairwise masks, + for the smaller participant index), both with the round
//!    context in the derivation.
//! 4. The server shows the survivors the set of nodes whose y arrived; each signs it, and
//!    a node only continues if at least t of its neighbours signed the same set.
//! 5. Survivors reveal b-shares of surviving neighbours and s-shares of dropped ones (never
//!    both for one peer); the server reconstructs, removes the masks and gets Σ x.
//!
//! [`params`] chooses (k, t) from n and the tolerated dropout and collusion rates.
//!
//! Transports bound every read with [`RoundContext::max_from_node_bytes`] and
//! [`RoundContext::max_to_node_bytes`] (bincode, standard configuration); the state
//! machines then validate every field.
//!
//! The crate is pure: [`Client`] and [`Server`] are state machines that take messages
//! ([`messages`], serde structs) and return messages, with explicit stage transitions;
//! they own no socket, read no clock and take the RNG as an argument (seeded in tests,
//! the OS CSPRNG in deployments). Deadlines are the caller's: it tells the server when a
//! stage is over ([`Server::close_stage`]) or that a node is gone
//! ([`Server::handle_dropout`]).
//!
//! Not covered: the server chooses the graph seed after seeing who takes part (a
//! malicious server could try seeds to surround a victim with colluders; Bell et al.
//! assume the graph is honestly sampled), malicious nodes that send wrong masked inputs
//! or wrong shares (detected on reconstruction where possible, but they can spoil the
//! sum), and DP noise (the caller adds it before encoding).

pub mod client;
pub mod context;
mod crypto;
pub mod fixed_point;
pub mod graph;
pub mod messages;
pub mod params;
mod prg;
pub mod server;
pub mod shamir;
pub mod sign;
pub mod transport;

pub use client::{Client, ClientConfig, ClientError};
pub use context::{ContextError, RoundContext};
pub use crypto::CIPHERTEXT_BYTES;
pub use fixed_point::{FixedPoint, FixedPointError};
pub use messages::*;
pub use params::{AdversaryClass, GraphParams, ParamError, ThreatModel};
pub use server::{Aggregate, Server, ServerError, ShareKind, Transition};
pub use sign::{EcdsaP256Signer, EcdsaP256Verifier, SignatureError, Signer, Verifier};
pub use transport::{Encoding, PeerCertificate, StageRequest, SumEncoder, TransportError};

/// A participant's name (its certificate's node name).
pub type NodeId = String;

/// Most participants in one round.
pub const MAX_PARTICIPANTS: usize = 100_000;
/// Longest participant name, in bytes (as certificate node names).
pub const MAX_NODE_ID_LEN: usize = 64;
/// Most coordinates in one input (2^28: 1 GiB of 32-bit values).
pub const MAX_VECTOR_LEN: u32 = 1 << 28;
/// Longest signature accepted, in bytes.
pub const MAX_SIGNATURE_LEN: usize = 256;
