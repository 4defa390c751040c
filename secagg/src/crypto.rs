//! The round's key derivations, encryption and signed transcripts, all bound to the round
//! context digest.
//!
//! - Share encryption: ChaCha20-Poly1305 under HKDF-SHA256(salt = context digest,
//!   ikm = X25519(c_u, c_v), info = "share-key" ‖ round ‖ sender ‖ receiver); the associated
//!   data repeats the digest, sender and receiver. Each key encrypts exactly one message
//!   (one direction of one pair in one round, from fresh per-round keys), so the nonce is
//!   fixed at zero.
//! - Pairwise mask seed: HKDF-SHA256(salt = context digest, ikm = X25519(s_u, s_v),
//!   info = "pairwise-mask" ‖ round ‖ lower id ‖ higher id).
//! - Self-mask key: HKDF-SHA256(salt = context digest, ikm = b, info = "self-mask" ‖ id).
//! - Self-mask commitment: SHA-256("self-mask-commitment" ‖ digest ‖ id ‖ b), advertised
//!   with the keys so the server can check a reconstructed b.
//! - Signed messages: the key advertisement (digest ‖ round ‖ id ‖ c_pk ‖ s_pk ‖
//!   commitment) and the survivor set (digest ‖ round ‖ id ‖ SHA-256(survivor indices)).
//!
//! Every string is prefixed with "dpfl-secagg/v1/" and every variable-length field with its
//! length.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

use crate::shamir::{share_from_bytes, share_to_bytes, ShamirError, ShareValue, SHARE_BYTES};

/// Bytes of an encrypted share pair (two share values and the Poly1305 tag).
pub const CIPHERTEXT_BYTES: usize = 2 * SHARE_BYTES + 16;

fn push_id(buf: &mut Vec<u8>, id: &str) {
    buf.push(id.len() as u8);
    buf.extend_from_slice(id.as_bytes());
}

/// The bytes a node signs to advertise its keys.
pub(crate) fn advertise_message(
    digest: &[u8; 32],
    round: u64,
    node: &str,
    c_pk: &[u8; 32],
    s_pk: &[u8; 32],
    commitment: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(200);
    m.extend_from_slice(b"dpfl-secagg/v1/advertise\0");
    m.extend_from_slice(digest);
    m.extend_from_slice(&round.to_le_bytes());
    push_id(&mut m, node);
    m.extend_from_slice(c_pk);
    m.extend_from_slice(s_pk);
    m.extend_from_slice(commitment);
    m
}

/// The bytes a node signs to confirm the survivor set it was shown.
pub(crate) fn survivors_message(
    digest: &[u8; 32],
    round: u64,
    node: &str,
    survivors: &[u32],
) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update((survivors.len() as u64).to_le_bytes());
    for s in survivors {
        h.update(s.to_le_bytes());
    }
    let mut m = Vec::with_capacity(120);
    m.extend_from_slice(b"dpfl-secagg/v1/survivors\0");
    m.extend_from_slice(digest);
    m.extend_from_slice(&round.to_le_bytes());
    push_id(&mut m, node);
    m.extend_from_slice(&h.finalize());
    m
}

/// Commitment to a self-mask seed.
pub(crate) fn commitment(digest: &[u8; 32], node: &str, b: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"dpfl-secagg/v1/self-mask-commitment\0");
    h.update(digest);
    h.update([node.len() as u8]);
    h.update(node.as_bytes());
    h.update(b);
    h.finalize().into()
}

/// X25519 with a peer's public key; `None` if the result is not contributory (the peer
/// sent a low-order point, which would make the shared secret public).
pub(crate) fn agree(secret: &StaticSecret, peer: &[u8; 32]) -> Option<SharedSecret> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    shared.was_contributory().then_some(shared)
}

fn share_cipher(
    shared: &SharedSecret,
    digest: &[u8; 32],
    round: u64,
    sender: &str,
    receiver: &str,
) -> ChaCha20Poly1305 {
    let hk = Hkdf::<Sha256>::new(Some(digest), shared.as_bytes());
    let mut info = Vec::with_capacity(160);
    info.extend_from_slice(b"dpfl-secagg/v1/share-key\0");
    info.extend_from_slice(&round.to_le_bytes());
    push_id(&mut info, sender);
    push_id(&mut info, receiver);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 8160.
    let _ = hk.expand(&info, key.as_mut_slice());
    ChaCha20Poly1305::new(key.as_slice().into())
}

fn share_aad(digest: &[u8; 32], sender: &str, receiver: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(180);
    aad.extend_from_slice(b"dpfl-secagg/v1/share\0");
    aad.extend_from_slice(digest);
    push_id(&mut aad, sender);
    push_id(&mut aad, receiver);
    aad
}

/// Encrypts a receiver's shares of the sender's self-mask seed and mask key.
pub(crate) fn encrypt_shares(
    shared: &SharedSecret,
    digest: &[u8; 32],
    round: u64,
    sender: &str,
    receiver: &str,
    b_share: &ShareValue,
    s_share: &ShareValue,
) -> Vec<u8> {
    let mut plain = Zeroizing::new([0u8; 2 * SHARE_BYTES]);
    share_to_bytes(b_share, &mut plain[..SHARE_BYTES]);
    share_to_bytes(s_share, &mut plain[SHARE_BYTES..]);
    let aad = share_aad(digest, sender, receiver);
    share_cipher(shared, digest, round, sender, receiver)
        .encrypt(
            &[0u8; 12].into(),
            Payload {
                msg: plain.as_slice(),
                aad: &aad,
            },
        )
        // Encryption of 80 bytes cannot fail (only plaintexts over 2^38 bytes do).
        .unwrap_or_default()
}

/// Why a ciphertext could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Wrong length, key, associated data or tag.
    Aead,
    /// Decrypted, but a value is outside the field.
    Share(ShamirError),
}

/// Decrypts the shares a sender addressed to the receiver.
pub(crate) fn decrypt_shares(
    shared: &SharedSecret,
    digest: &[u8; 32],
    round: u64,
    sender: &str,
    receiver: &str,
    ciphertext: &[u8],
) -> Result<(ShareValue, ShareValue), OpenError> {
    if ciphertext.len() != CIPHERTEXT_BYTES {
        return Err(OpenError::Aead);
    }
    let aad = share_aad(digest, sender, receiver);
    let plain = Zeroizing::new(
        share_cipher(shared, digest, round, sender, receiver)
            .decrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| OpenError::Aead)?,
    );
    if plain.len() != 2 * SHARE_BYTES {
        return Err(OpenError::Aead);
    }
    let b = share_from_bytes(&plain[..SHARE_BYTES]).map_err(OpenError::Share)?;
    let s = share_from_bytes(&plain[SHARE_BYTES..]).map_err(OpenError::Share)?;
    Ok((b, s))
}

/// The key of a node's self mask: HKDF of its seed b with the context digest, so that the
/// self mask is bound to the round even if a seed were ever reused.
pub(crate) fn self_mask_key(digest: &[u8; 32], node: &str, b: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(digest), b);
    let mut info = Vec::with_capacity(100);
    info.extend_from_slice(b"dpfl-secagg/v1/self-mask\0");
    push_id(&mut info, node);
    let mut key = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(&info, key.as_mut_slice());
    key
}

/// The seed of the pairwise mask between two participants (order-independent).
pub(crate) fn pairwise_seed(
    shared: &SharedSecret,
    digest: &[u8; 32],
    round: u64,
    a: &str,
    b: &str,
) -> Zeroizing<[u8; 32]> {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let hk = Hkdf::<Sha256>::new(Some(digest), shared.as_bytes());
    let mut info = Vec::with_capacity(160);
    info.extend_from_slice(b"dpfl-secagg/v1/pairwise-mask\0");
    info.extend_from_slice(&round.to_le_bytes());
    push_id(&mut info, lo);
    push_id(&mut info, hi);
    let mut seed = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(&info, seed.as_mut_slice());
    seed
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn shares_decrypt_only_in_their_direction_and_round() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let cu = StaticSecret::random_from_rng(&mut rng);
        let cv = StaticSecret::random_from_rng(&mut rng);
        let (pu, pv) = (
            PublicKey::from(&cu).to_bytes(),
            PublicKey::from(&cv).to_bytes(),
        );
        let suv = agree(&cu, &pv).unwrap();
        let svu = agree(&cv, &pu).unwrap();
        let d = [3u8; 32];
        let (b, s) = ([1u64, 2, 3, 4, 5], [6u64, 7, 8, 9, 10]);
        let ct = encrypt_shares(&suv, &d, 5, "u", "v", &b, &s);
        assert_eq!(ct.len(), CIPHERTEXT_BYTES);
        assert_eq!(decrypt_shares(&svu, &d, 5, "u", "v", &ct), Ok((b, s)));
        assert_eq!(
            decrypt_shares(&svu, &d, 5, "v", "u", &ct),
            Err(OpenError::Aead)
        );
        assert_eq!(
            decrypt_shares(&svu, &d, 6, "u", "v", &ct),
            Err(OpenError::Aead)
        );
        assert_eq!(
            decrypt_shares(&svu, &[4; 32], 5, "u", "v", &ct),
            Err(OpenError::Aead)
        );
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert_eq!(
            decrypt_shares(&svu, &d, 5, "u", "v", &bad),
            Err(OpenError::Aead)
        );
        assert_eq!(
            decrypt_shares(&svu, &d, 5, "u", "v", &ct[1..]),
            Err(OpenError::Aead)
        );
        // The pairwise seed is symmetric and bound to the round.
        assert_eq!(
            *pairwise_seed(&suv, &d, 5, "u", "v"),
            *pairwise_seed(&svu, &d, 5, "v", "u")
        );
        assert_ne!(
            *pairwise_seed(&suv, &d, 5, "u", "v"),
            *pairwise_seed(&suv, &d, 6, "u", "v")
        );
    }

    #[test]
    fn low_order_points_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let c = StaticSecret::random_from_rng(&mut rng);
        assert!(agree(&c, &[0u8; 32]).is_none());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(agree(&c, &one).is_none());
    }
}
