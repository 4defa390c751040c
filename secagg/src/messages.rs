//! The messages of a round, in the order they travel.
//!
//! | stage | server → node | node → server |
//! |---|---|---|
//! | 0 advertise keys | [`RoundSetup`] (to every participant) | [`AdvertiseKeys`] |
//! | 1 share keys | [`NeighbourKeys`] (the node's neighbours' signed keys) | [`EncryptedShares`] (one ciphertext per neighbour) |
//! | 2 masked input | [`ForwardedShares`] (ciphertexts addressed to the node) | [`MaskedInput`] |
//! | 3 consistency | [`SurvivorSet`] (whose masked input arrived) | [`SurvivorSignature`] |
//! | 4 unmasking | [`UnmaskRequest`] (neighbours' signatures, which shares to reveal) | [`UnmaskResponse`] |
//!
//! Plain structs with serde derives, for bincode; [`ToNode`] and [`FromNode`] wrap them
//! for a transport that carries one message type per direction. Participants are named by
//! their index in the round's sorted participant list. Every message carries the round
//! number; every field is validated by the receiving state machine (lengths, ranges,
//! membership, signatures), never trusted.
//!
//! A masked input's payload is raw little-endian bytes, ⌈b/8⌉ per coordinate, so that a
//! 32-bit ring costs exactly 4 bytes per coordinate (bincode would varint-encode a
//! `Vec<u32>` to up to 5).

use crate::context::RoundContext;
use crate::shamir::ShareValue;
use serde::{Deserialize, Serialize};

/// The stages of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// Nodes advertise their signed public keys.
    AdvertiseKeys,
    /// Nodes send encrypted shares of their secrets to their neighbours.
    ShareKeys,
    /// Nodes send their masked inputs.
    MaskedInput,
    /// Nodes sign the survivor set they were shown.
    Consistency,
    /// Nodes reveal the shares needed to unmask the sum.
    Unmasking,
}

impl Stage {
    /// A short name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Stage::AdvertiseKeys => "advertise-keys",
            Stage::ShareKeys => "share-keys",
            Stage::MaskedInput => "masked-input",
            Stage::Consistency => "consistency",
            Stage::Unmasking => "unmasking",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Server → every participant: the round's context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundSetup {
    /// Everything the round is bound to.
    pub context: RoundContext,
}

/// A node's public keys for one round, signed with its certificate key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAdvertisement {
    /// X25519 public key for encrypting shares (c).
    pub c_pk: [u8; 32],
    /// X25519 public key for pairwise masks (s).
    pub s_pk: [u8; 32],
    /// SHA-256 commitment to the self-mask seed b.
    pub commitment: [u8; 32],
    /// Signature over context digest, round, node name and the three values above.
    pub signature: Vec<u8>,
}

/// Node → server: stage 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// Round.
    pub round: u64,
    /// The node's signed keys.
    pub keys: KeyAdvertisement,
}

/// A participant's keys as forwarded by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerKeys {
    /// Participant index.
    pub peer: u32,
    /// Its signed keys.
    pub keys: KeyAdvertisement,
}

/// Server → node: the keys of the node's neighbours that advertised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// Round.
    pub round: u64,
    /// One entry per neighbour that advertised.
    pub keys: Vec<PeerKeys>,
}

/// An encrypted pair of shares (self-mask seed, mask key) between two participants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ciphertext {
    /// The other participant: the receiver in [`EncryptedShares`], the sender in
    /// [`ForwardedShares`].
    pub peer: u32,
    /// ChaCha20-Poly1305 ciphertext and tag.
    pub data: Vec<u8>,
}

/// Node → server: stage 1, one ciphertext per neighbour in [`NeighbourKeys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShares {
    /// Round.
    pub round: u64,
    /// Ciphertexts by receiver.
    pub shares: Vec<Ciphertext>,
}

/// Server → node: the ciphertexts addressed to the node by neighbours that sent theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedShares {
    /// Round.
    pub round: u64,
    /// Ciphertexts by sender.
    pub shares: Vec<Ciphertext>,
}

/// Node → server: stage 2, the masked input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// Round.
    pub round: u64,
    /// y mod 2^b, ⌈b/8⌉ little-endian bytes per coordinate.
    pub data: Vec<u8>,
}

/// Server → node: the participants whose masked input arrived (sorted indices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorSet {
    /// Round.
    pub round: u64,
    /// Sorted participant indices.
    pub survivors: Vec<u32>,
}

/// Node → server: stage 3, the node's signature over the survivor set it was shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorSignature {
    /// Round.
    pub round: u64,
    /// Signature over context digest, round, node name and the survivor set's hash.
    pub signature: Vec<u8>,
}

/// A participant's signature as forwarded by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSignature {
    /// Participant index.
    pub peer: u32,
    /// Its signature over the survivor set.
    pub signature: Vec<u8>,
}

/// Server → node: the neighbours' survivor-set signatures and the shares asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Round.
    pub round: u64,
    /// Signatures of the node's neighbours over the survivor set.
    pub signatures: Vec<PeerSignature>,
    /// Neighbours (survivors) whose self-mask seed share is asked for.
    pub self_mask: Vec<u32>,
    /// Neighbours (dropped after sharing) whose mask-key share is asked for.
    pub mask_key: Vec<u32>,
}

/// One share revealed for a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerShare {
    /// Whose secret the share is of.
    pub peer: u32,
    /// The share (field elements).
    pub share: ShareValue,
}

/// Node → server: stage 4, the shares asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// Round.
    pub round: u64,
    /// Shares of survivors' self-mask seeds, in the order asked.
    pub self_mask: Vec<PeerShare>,
    /// Shares of dropped nodes' mask keys, in the order asked.
    pub mask_key: Vec<PeerShare>,
}

/// Any server → node message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToNode {
    /// Stage 0.
    Setup(RoundSetup),
    /// Stage 1.
    NeighbourKeys(NeighbourKeys),
    /// Stage 2.
    Shares(ForwardedShares),
    /// Stage 3.
    Survivors(SurvivorSet),
    /// Stage 4.
    Unmask(UnmaskRequest),
}

impl ToNode {
    /// The round the message belongs to.
    pub fn round(&self) -> u64 {
        match self {
            ToNode::Setup(m) => m.context.round,
            ToNode::NeighbourKeys(m) => m.round,
            ToNode::Shares(m) => m.round,
            ToNode::Survivors(m) => m.round,
            ToNode::Unmask(m) => m.round,
        }
    }

    /// The stage whose answer the message asks for.
    pub fn stage(&self) -> Stage {
        match self {
            ToNode::Setup(_) => Stage::AdvertiseKeys,
            ToNode::NeighbourKeys(_) => Stage::ShareKeys,
            ToNode::Shares(_) => Stage::MaskedInput,
            ToNode::Survivors(_) => Stage::Consistency,
            ToNode::Unmask(_) => Stage::Unmasking,
        }
    }
}

/// Any node → server message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromNode {
    /// Stage 0.
    Keys(AdvertiseKeys),
    /// Stage 1.
    Shares(EncryptedShares),
    /// Stage 2.
    MaskedInput(MaskedInput),
    /// Stage 3.
    Signature(SurvivorSignature),
    /// Stage 4.
    Unmask(UnmaskResponse),
}

impl FromNode {
    /// The round the message belongs to.
    pub fn round(&self) -> u64 {
        match self {
            FromNode::Keys(m) => m.round,
            FromNode::Shares(m) => m.round,
            FromNode::MaskedInput(m) => m.round,
            FromNode::Signature(m) => m.round,
            FromNode::Unmask(m) => m.round,
        }
    }

    /// The stage the message answers.
    pub fn stage(&self) -> Stage {
        match self {
            FromNode::Keys(_) => Stage::AdvertiseKeys,
            FromNode::Shares(_) => Stage::ShareKeys,
            FromNode::MaskedInput(_) => Stage::MaskedInput,
            FromNode::Signature(_) => Stage::Consistency,
            FromNode::Unmask(_) => Stage::Unmasking,
        }
    }
}

/// Packs a vector mod 2^b into ⌈b/8⌉ little-endian bytes per coordinate.
pub(crate) fn pack(values: &[u64], bytes_per_coordinate: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * bytes_per_coordinate);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes()[..bytes_per_coordinate]);
    }
    out
}

/// Adds a packed vector into `acc` (wrapping), after checking its length and that every
/// coordinate is below 2^b. Nothing is added unless the whole payload is valid.
pub(crate) fn add_packed(
    acc: &mut [u64],
    data: &[u8],
    bytes_per_coordinate: usize,
    ring_mask: u64,
) -> Result<(), String> {
    if data.len() != acc.len() * bytes_per_coordinate {
        return Err(format!(
            "payload of {} bytes, expected {} ({} coordinates of {bytes_per_coordinate} bytes)",
            data.len(),
            acc.len() * bytes_per_coordinate,
            acc.len()
        ));
    }
    let read = |chunk: &[u8]| {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(b)
    };
    // Only a ring narrower than its bytes can receive out-of-range values.
    if u64::from(ring_mask.count_ones()) != 8 * bytes_per_coordinate as u64 {
        if let Some(i) = data
            .chunks_exact(bytes_per_coordinate)
            .position(|c| read(c) & !ring_mask != 0)
        {
            return Err(format!("coordinate {i} is not below the ring modulus"));
        }
    }
    match bytes_per_coordinate {
        4 => {
            for (a, c) in acc.iter_mut().zip(data.chunks_exact(4)) {
                *a = a.wrapping_add(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
        }
        8 => {
            for (a, c) in acc.iter_mut().zip(data.chunks_exact(8)) {
                *a = a.wrapping_add(u64::from_le_bytes([
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                ]));
            }
        }
        _ => {
            for (a, c) in acc.iter_mut().zip(data.chunks_exact(bytes_per_coordinate)) {
                *a = a.wrapping_add(read(c));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_add_round_trip() {
        for (bits, bpc) in [(8u8, 1usize), (20, 3), (32, 4), (33, 5), (64, 8)] {
            let mask = crate::context::ring_mask(bits);
            let v: Vec<u64> = (0..100u64)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & mask)
                .collect();
            let packed = pack(&v, bpc);
            assert_eq!(packed.len(), 100 * bpc);
            let mut acc = vec![0u64; 100];
            add_packed(&mut acc, &packed, bpc, mask).unwrap();
            assert_eq!(acc, v);
            assert!(add_packed(&mut acc, &packed[1..], bpc, mask).is_err());
            if bits % 8 != 0 {
                let mut bad = packed.clone();
                bad[bpc - 1] |= 0x80;
                let before = acc.clone();
                assert!(add_packed(&mut acc, &bad, bpc, mask).is_err());
                assert_eq!(acc, before, "nothing added from an invalid payload");
            }
        }
    }

    #[test]
    fn a_32_bit_masked_input_costs_4_bytes_per_coordinate_in_bincode() {
        let m = FromNode::MaskedInput(MaskedInput {
            round: 1,
            data: vec![0xab; 4 * 199_210],
        });
        let bytes = bincode::serde::encode_to_vec(&m, bincode::config::standard()).unwrap();
        assert!(bytes.len() <= 4 * 199_210 + 16, "{}", bytes.len());
        let (back, _): (FromNode, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, m);
    }
}
