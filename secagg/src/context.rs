//! The round context: everything a secure-aggregation round is bound to.
//!
//! The server announces it once per round ([`crate::RoundSetup`]); every node validates it
//! and every signature, key derivation, AEAD associated data and mask seed of the round
//! includes its SHA-256 digest, so nothing from another round, another participant list or
//! other parameters verifies, decrypts or unmasks in this one.
//!
//! Participants are referred to by their **index** in the sorted participant list: the
//! index decides the sign of a pairwise mask (+ for the smaller index) and index + 1 is the
//! participant's Shamir evaluation point.

use crate::params::{check_shape, GraphParams};
use crate::{NodeId, MAX_NODE_ID_LEN, MAX_PARTICIPANTS, MAX_VECTOR_LEN};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The parameters of one round of secure aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundContext {
    /// Protocol round number. It must be unique per attempt (derive it from the training
    /// round and the attempt when a round is retried): nodes refuse rounds they have seen.
    pub round: u64,
    /// Participants, sorted and distinct.
    pub participants: Vec<NodeId>,
    /// Neighbours per node (n − 1: complete graph).
    pub degree: u32,
    /// Shares needed to reconstruct a secret.
    pub threshold: u32,
    /// Ring width b: inputs and sums are vectors mod 2^b.
    pub bits: u8,
    /// Coordinates per input.
    pub vector_len: u32,
    /// Seed of the graph's permutation, drawn by the server.
    pub graph_seed: [u8; 32],
    /// The caller's digest of how inputs are encoded (scale, range, noise parameters):
    /// bound like every other field, so participants told different encodings cannot
    /// complete a round together. Opaque to this crate; zero unless set
    /// ([`RoundContext::with_encoding`]).
    pub encoding: [u8; 32],
}

/// An invalid round context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// Too few or too many participants.
    #[error("{n} participants is outside 3..={MAX_PARTICIPANTS}")]
    Participants {
        /// Number given.
        n: usize,
    },
    /// A participant name that cannot be used.
    #[error(
        "invalid participant name {0:?}: use 1-{MAX_NODE_ID_LEN} characters from [A-Za-z0-9._-]"
    )]
    NodeId(String),
    /// Participants not strictly increasing (unsorted or repeated).
    #[error("participants must be sorted and distinct; {0:?} is out of order or repeated")]
    Order(String),
    /// Degree and threshold do not fit the population.
    #[error("graph parameters: {0}")]
    Params(String),
    /// Ring width outside 1..=64.
    #[error("ring width {0} is outside 1..=64 bits")]
    Bits(u8),
    /// Vector length outside 1..=MAX_VECTOR_LEN.
    #[error("vector length {0} is outside 1..={MAX_VECTOR_LEN}")]
    VectorLen(u32),
}

/// Checks a participant name (the same rule as certificate node names).
pub fn validate_node_id(id: &str) -> Result<(), ContextError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NODE_ID_LEN
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ContextError::NodeId(id.chars().take(80).collect()))
    }
}

impl RoundContext {
    /// A context for `participants` (any order, sorted here) with a fresh graph seed.
    pub fn new<R: CryptoRng + RngCore + ?Sized>(
        round: u64,
        mut participants: Vec<NodeId>,
        params: GraphParams,
        bits: u8,
        vector_len: u32,
        rng: &mut R,
    ) -> Result<Self, ContextError> {
        participants.sort();
        let mut graph_seed = [0u8; 32];
        rng.fill_bytes(&mut graph_seed);
        let ctx = Self {
            round,
            participants,
            degree: params.degree,
            threshold: params.threshold,
            bits,
            vector_len,
            graph_seed,
            encoding: [0; 32],
        };
        ctx.validate()?;
        Ok(ctx)
    }

    /// The same context bound to the caller's encoding digest.
    pub fn with_encoding(mut self, encoding: [u8; 32]) -> Self {
        self.encoding = encoding;
        self
    }

    /// Checks every field (what a node does before taking part).
    pub fn validate(&self) -> Result<(), ContextError> {
        let n = self.participants.len();
        if !(3..=MAX_PARTICIPANTS).contains(&n) {
            return Err(ContextError::Participants { n });
        }
        for id in &self.participants {
            validate_node_id(id)?;
        }
        for w in self.participants.windows(2) {
            if w[0] >= w[1] {
                return Err(ContextError::Order(w[1].clone()));
            }
        }
        check_shape(n as u32, self.params()).map_err(|e| ContextError::Params(e.to_string()))?;
        if !(1..=64).contains(&self.bits) {
            return Err(ContextError::Bits(self.bits));
        }
        if !(1..=MAX_VECTOR_LEN).contains(&self.vector_len) {
            return Err(ContextError::VectorLen(self.vector_len));
        }
        Ok(())
    }

    /// Number of participants.
    pub fn len(&self) -> u32 {
        self.participants.len() as u32
    }

    /// Whether there are no participants (never for a valid context).
    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    /// Degree and threshold.
    pub fn params(&self) -> GraphParams {
        GraphParams {
            degree: self.degree,
            threshold: self.threshold,
        }
    }

    /// Index of a participant.
    pub fn index_of(&self, node: &str) -> Option<u32> {
        self.participants
            .binary_search_by(|p| p.as_str().cmp(node))
            .ok()
            .map(|i| i as u32)
    }

    /// Name of the participant with index `i`.
    pub fn node(&self, i: u32) -> Option<&str> {
        self.participants.get(i as usize).map(String::as_str)
    }

    /// Bytes per coordinate of a masked input on the wire: ⌈b/8⌉.
    pub fn bytes_per_coordinate(&self) -> usize {
        usize::from(self.bits).div_ceil(8)
    }

    /// Bytes of a masked input's payload.
    pub fn masked_input_bytes(&self) -> usize {
        self.vector_len as usize * self.bytes_per_coordinate()
    }

    /// An upper bound on the bincode (standard configuration) size of any node → server
    /// message of this round: what the server's transport should pass to a bounded read.
    pub fn max_from_node_bytes(&self) -> usize {
        let k = self.degree as usize;
        let head = 5 + 9 + 9; // variant, round, one length prefix
        let sig = 9 + crate::MAX_SIGNATURE_LEN;
        let keys = head + 3 * 32 + sig;
        let shares = head + k * (5 + 9 + crate::CIPHERTEXT_BYTES);
        let masked = head + self.masked_input_bytes();
        let unmask = head + 9 + 2 * k * (5 + 9 * crate::shamir::LIMBS);
        keys.max(shares).max(masked).max(sig + head).max(unmask)
    }

    /// An upper bound on the bincode (standard configuration) size of any server → node
    /// message of this round: what a node's transport should pass to a bounded read.
    pub fn max_to_node_bytes(&self) -> usize {
        let (n, k) = (self.participants.len(), self.degree as usize);
        let head = 5 + 9 + 9;
        let sig = 9 + crate::MAX_SIGNATURE_LEN;
        let setup = head + n * (9 + crate::MAX_NODE_ID_LEN) + 5 + 5 + 1 + 5 + 32 + 32;
        let keys = head + k * (5 + 3 * 32 + sig);
        let shares = head + k * (5 + 9 + crate::CIPHERTEXT_BYTES);
        let survivors = head + n * 5;
        let unmask = head + k * (5 + sig) + 2 * (9 + k * 5);
        setup.max(keys).max(shares).max(survivors).max(unmask)
    }

    /// The mask selecting the low b bits.
    pub fn ring_mask(&self) -> u64 {
        ring_mask(self.bits)
    }

    /// SHA-256 over every field, with a domain separator and length prefixes.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"dpfl-secagg/v1/context\0");
        h.update(self.round.to_le_bytes());
        h.update((self.participants.len() as u64).to_le_bytes());
        for p in &self.participants {
            h.update([p.len() as u8]);
            h.update(p.as_bytes());
        }
        h.update(self.degree.to_le_bytes());
        h.update(self.threshold.to_le_bytes());
        h.update([self.bits]);
        h.update(self.vector_len.to_le_bytes());
        h.update(self.graph_seed);
        h.update(self.encoding);
        h.finalize().into()
    }
}

/// The mask selecting the low `bits` bits (`bits` in 1..=64).
pub(crate) fn ring_mask(bits: u8) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn ctx() -> RoundContext {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        RoundContext::new(
            7,
            vec!["c".into(), "a".into(), "b".into(), "d".into()],
            GraphParams {
                degree: 3,
                threshold: 2,
            },
            32,
            10,
            &mut rng,
        )
        .unwrap()
    }

    #[test]
    fn sorted_indexed_and_bound_by_digest() {
        let c = ctx();
        assert_eq!(c.participants, ["a", "b", "c", "d"]);
        assert_eq!(c.index_of("c"), Some(2));
        assert_eq!(c.index_of("e"), None);
        assert_eq!(c.node(3), Some("d"));
        let d = c.digest();
        for change in [
            |c: &mut RoundContext| c.round += 1,
            |c: &mut RoundContext| c.participants[3] = "e".into(),
            |c: &mut RoundContext| c.threshold = 3,
            |c: &mut RoundContext| c.bits = 31,
            |c: &mut RoundContext| c.vector_len = 11,
            |c: &mut RoundContext| c.graph_seed[0] ^= 1,
        ] {
            let mut other = c.clone();
            change(&mut other);
            assert_ne!(other.digest(), d);
        }
    }

    #[test]
    fn invalid_contexts_are_refused() {
        let c = ctx();
        type Change = fn(&mut RoundContext);
        let cases: Vec<(Change, &str)> = vec![
            (|c| c.participants.truncate(2), "participants"),
            (|c| c.participants[1] = "a".into(), "order"),
            (|c| c.participants.swap(0, 1), "order"),
            (|c| c.participants[0] = "a b".into(), "name"),
            (|c| c.participants[0] = "x".repeat(65), "name"),
            (|c| c.threshold = 1, "params"),
            (|c| c.threshold = 4, "params"),
            (|c| c.degree = 1, "params"),
            (|c| c.bits = 0, "bits"),
            (|c| c.bits = 65, "bits"),
            (|c| c.vector_len = 0, "len"),
            (|c| c.vector_len = MAX_VECTOR_LEN + 1, "len"),
        ];
        for (change, what) in cases {
            let mut bad = c.clone();
            change(&mut bad);
            assert!(bad.validate().is_err(), "{what}");
        }
        assert_eq!(c.bytes_per_coordinate(), 4);
        let mut c20 = c.clone();
        c20.bits = 20;
        assert_eq!(c20.bytes_per_coordinate(), 3);
        assert_eq!(c20.ring_mask(), (1 << 20) - 1);
    }
}
