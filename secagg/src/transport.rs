//! What a transport carries for one stage, and how a node's update becomes a ring vector.
//!
//! [`StageRequest`] is the server → node message of a stage: the protocol message plus,
//! with the setup, the DER certificates of the node's neighbours, so that the node can
//! check their signed keys against the federation CA (the caller chain-checks them; this
//! crate only reads the key). Node → server answers are plain [`FromNode`] values.
//! [`encode_to_node`] / [`decode_to_node`] and [`encode_from_node`] / [`decode_from_node`]
//! are bincode (standard configuration) with a size limit, so a transport never
//! deserialises more than the round allows.
//!
//! [`SumEncoder`] is the seam between a float update and the protocol's input in Z/2^b:
//! the node encodes, the server decodes the unmasked sum. [`FixedPoint`] is the only
//! encoder here; a distributed-DP encoder (rotation, integer noise) implements the same
//! trait.

use crate::fixed_point::{FixedPoint, FixedPointError};
use crate::messages::{FromNode, ToNode};
use crate::NodeId;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Longest DER certificate forwarded with a setup, in bytes.
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// A participant's certificate, as the server saw it in the participant's TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCertificate {
    /// Participant name.
    pub node: NodeId,
    /// Its certificate, DER.
    pub der: Vec<u8>,
}

/// Server → node: one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRequest {
    /// The protocol message.
    pub message: ToNode,
    /// With [`ToNode::Setup`]: the certificates of the node's neighbours (empty otherwise).
    pub certificates: Vec<PeerCertificate>,
}

/// A stage message that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Longer than the limit.
    #[error("stage message of {got} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Bytes.
        got: usize,
        /// Limit.
        limit: usize,
    },
    /// Not a valid message.
    #[error("malformed stage message: {0}")]
    Malformed(String),
    /// Bytes left after the message.
    #[error("{0} trailing bytes after the stage message")]
    Trailing(usize),
    /// A certificate too large or too many of them.
    #[error("certificates: {0}")]
    Certificates(String),
}

/// The most bytes of certificates a setup for `degree` neighbours may carry.
pub fn max_certificate_bytes(degree: u32) -> usize {
    (degree as usize).saturating_mul(MAX_CERTIFICATE_BYTES + 9 + 9 + crate::MAX_NODE_ID_LEN)
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, TransportError> {
    bincode::serde::encode_to_vec(value, config())
        .map_err(|e| TransportError::Malformed(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], limit: usize) -> Result<T, TransportError> {
    if bytes.len() > limit {
        return Err(TransportError::TooLarge {
            got: bytes.len(),
            limit,
        });
    }
    // The byte length bounds every allocation bincode makes: it checks each announced
    // length against what is left of the slice before it allocates.
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| TransportError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(TransportError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Encodes a server → node stage.
pub fn encode_to_node(request: &StageRequest) -> Result<Vec<u8>, TransportError> {
    encode(request)
}

/// Decodes a server → node stage of at most `limit` bytes; certificates are checked for
/// size and count (at most `max_certificates`).
pub fn decode_to_node(
    bytes: &[u8],
    limit: usize,
    max_certificates: usize,
) -> Result<StageRequest, TransportError> {
    let r: StageRequest = decode(bytes, limit)?;
    if r.certificates.len() > max_certificates {
        return Err(TransportError::Certificates(format!(
            "{} certificates, at most {max_certificates} expected",
            r.certificates.len()
        )));
    }
    if let Some(c) = r
        .certificates
        .iter()
        .find(|c| c.der.len() > MAX_CERTIFICATE_BYTES || c.node.len() > crate::MAX_NODE_ID_LEN)
    {
        return Err(TransportError::Certificates(format!(
            "certificate of {} bytes for a name of {} bytes is too large",
            c.der.len(),
            c.node.len()
        )));
    }
    Ok(r)
}

/// Encodes a node → server answer.
pub fn encode_from_node(answer: &FromNode) -> Result<Vec<u8>, TransportError> {
    encode(answer)
}

/// Decodes a node → server answer of at most `limit` bytes (use
/// [`crate::RoundContext::max_from_node_bytes`]).
pub fn decode_from_node(bytes: &[u8], limit: usize) -> Result<FromNode, TransportError> {
    decode(bytes, limit)
}

/// Turns a float update into the protocol's input (a vector mod 2^b) on the node, and the
/// unmasked sum back into floats on the server. Implementations fix the ring width and
/// how many inputs a sum may hold.
pub trait SumEncoder {
    /// Ring width b.
    fn bits(&self) -> u8;
    /// Encodes one node's update (randomness from `rng`: the OS CSPRNG in deployments).
    fn encode(&self, update: &[f32], rng: &mut dyn RngCore) -> Result<Vec<u64>, FixedPointError>;
    /// Decodes the sum of encoded updates.
    fn decode_sum(&self, sum: &[u64]) -> Result<Vec<f64>, FixedPointError>;
}

impl SumEncoder for FixedPoint {
    fn bits(&self) -> u8 {
        FixedPoint::bits(self)
    }

    fn encode(&self, update: &[f32], rng: &mut dyn RngCore) -> Result<Vec<u64>, FixedPointError> {
        FixedPoint::encode(self, update, rng)
    }

    fn decode_sum(&self, sum: &[u64]) -> Result<Vec<f64>, FixedPointError> {
        FixedPoint::decode_sum(self, sum)
    }
}

/// The encoders a round may use (what the train request announces).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    /// [`FixedPoint`]: clip to `clip`, stochastic rounding, log2(n) bits of headroom.
    FixedPoint {
        /// L2 clip norm C.
        clip: f64,
        /// Ring width b.
        bits: u8,
    },
}

impl Encoding {
    /// The encoder for a round of `participants` inputs.
    pub fn encoder(&self, participants: u32) -> Result<Box<dyn SumEncoder>, FixedPointError> {
        match *self {
            Encoding::FixedPoint { clip, bits } => {
                Ok(Box::new(FixedPoint::new(clip, bits, participants.max(1))?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{MaskedInput, SurvivorSet};
    use rand::SeedableRng;

    #[test]
    fn stage_messages_round_trip_within_limits_only() {
        let req = StageRequest {
            message: ToNode::Survivors(SurvivorSet {
                round: 7,
                survivors: vec![0, 1, 2],
            }),
            certificates: vec![PeerCertificate {
                node: "n1".into(),
                der: vec![1, 2, 3],
            }],
        };
        let bytes = encode_to_node(&req).unwrap();
        assert_eq!(decode_to_node(&bytes, bytes.len(), 1).unwrap(), req);
        assert!(matches!(
            decode_to_node(&bytes, bytes.len() - 1, 1),
            Err(TransportError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_to_node(&bytes, bytes.len(), 0),
            Err(TransportError::Certificates(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            decode_to_node(&long, long.len(), 1),
            Err(TransportError::Trailing(1))
        ));
        let ans = FromNode::MaskedInput(MaskedInput {
            round: 7,
            data: vec![9; 40],
        });
        let bytes = encode_from_node(&ans).unwrap();
        assert_eq!(decode_from_node(&bytes, bytes.len()).unwrap(), ans);
        assert!(decode_from_node(&bytes[..bytes.len() - 1], 1000).is_err());
    }

    #[test]
    fn fixed_point_encoding_sums_back_to_the_float_sum() {
        let enc = Encoding::FixedPoint {
            clip: 1.0,
            bits: 32,
        }
        .encoder(3)
        .unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let xs = [vec![0.5f32, -0.25], vec![-0.5, 0.5], vec![0.1, 0.1]];
        let mask = (1u64 << 32) - 1;
        let mut sum = vec![0u64; 2];
        for x in &xs {
            for (s, v) in sum.iter_mut().zip(enc.encode(x, &mut rng).unwrap()) {
                *s = s.wrapping_add(v) & mask;
            }
        }
        let back = enc.decode_sum(&sum).unwrap();
        // Reference: the plain float sums 0.1 and 0.35, within 3 rounding steps.
        let step = 3.0 / ((((1u64 << 31) - 1) / 3 - 1) as f64);
        assert!((back[0] - 0.1).abs() <= step, "{}", back[0]);
        assert!((back[1] - 0.35).abs() <= step, "{}", back[1]);
    }
}
