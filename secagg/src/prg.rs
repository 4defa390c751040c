//! Mask expansion: ChaCha20 keystreams added to or subtracted from a vector mod 2^b.
//!
//! A mask is the keystream of ChaCha20 (RFC 8439, zero nonce, counter from 0) keyed with a
//! 32-byte seed, read as little-endian 32-bit words when b <= 32 (one word per coordinate,
//! so 32-bit budgets cost exactly one 4-byte word) and as 64-bit words otherwise. Every seed
//! is used for one mask only (self-mask seeds are fresh per round; pairwise seeds come from
//! HKDF over the round's context), so the fixed nonce is safe.
//!
//! Expansion dominates client CPU (1 + k keystreams of the model's size), so all masks of a
//! call are applied chunk by chunk: for each block of coordinates every cipher writes its
//! next keystream block into a small buffer that stays in L1 and is folded into the
//! accumulator while it is hot. Arithmetic is wrapping mod 2^64 and reduced mod 2^b at the
//! end, which is exact because 2^b divides 2^64.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;

/// Whether a mask is added or subtracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MaskSign {
    Add,
    Sub,
}

/// Coordinates processed per block.
const BLOCK: usize = 1024;

/// Applies `seeds` (each with its sign) to `acc` and reduces every element mod 2^bits.
pub(crate) fn apply_masks(acc: &mut [u64], seeds: &[(&[u8; 32], MaskSign)], bits: u8) {
    let mut ciphers: Vec<(ChaCha20, MaskSign)> = seeds
        .iter()
        .map(|(key, sign)| (ChaCha20::new((*key).into(), &[0u8; 12].into()), *sign))
        .collect();
    if bits > 32 {
        fold_keystreams::<u64>(acc, &mut ciphers, u64::from_le);
    } else {
        fold_keystreams::<u32>(acc, &mut ciphers, |w| u64::from(u32::from_le(w)));
    }
    let mask = crate::context::ring_mask(bits);
    for a in acc.iter_mut() {
        *a &= mask;
    }
}

/// Folds every cipher's keystream, read as little-endian words of type `W` (one per
/// coordinate), into `acc` with its sign, block by block; the buffer is wiped afterwards.
fn fold_keystreams<W: bytemuck::Pod + Default>(
    acc: &mut [u64],
    ciphers: &mut [(ChaCha20, MaskSign)],
    to_u64: impl Fn(W) -> u64,
) {
    let mut words = [W::default(); BLOCK];
    for block in acc.chunks_mut(BLOCK) {
        let words = &mut words[..block.len()];
        for (cipher, sign) in ciphers.iter_mut() {
            words.fill(W::default());
            cipher.apply_keystream(bytemuck::cast_slice_mut(words));
            match sign {
                MaskSign::Add => {
                    for (a, w) in block.iter_mut().zip(words.iter()) {
                        *a = a.wrapping_add(to_u64(*w));
                    }
                }
                MaskSign::Sub => {
                    for (a, w) in block.iter_mut().zip(words.iter()) {
                        *a = a.wrapping_sub(to_u64(*w));
                    }
                }
            }
        }
    }
    words.fill(W::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_subtract_cancels_and_streams_differ() {
        for bits in [1u8, 20, 32, 33, 64] {
            let mask = crate::context::ring_mask(bits);
            let x: Vec<u64> = (0..3000u64).map(|i| (i * 7919) & mask).collect();
            let (k1, k2) = ([1u8; 32], [2u8; 32]);
            let mut y = x.clone();
            apply_masks(&mut y, &[(&k1, MaskSign::Add), (&k2, MaskSign::Sub)], bits);
            assert_ne!(y, x);
            apply_masks(&mut y, &[(&k2, MaskSign::Add)], bits);
            apply_masks(&mut y, &[(&k1, MaskSign::Sub)], bits);
            assert_eq!(y, x, "bits {bits}");
        }
    }

    #[test]
    fn blocks_continue_one_keystream() {
        // Block boundaries must not restart or skip the stream: compare with the keystream
        // computed in one piece.
        let key = [0x42u8; 32];
        let mut acc = vec![0u64; BLOCK + 5];
        apply_masks(&mut acc, &[(&key, MaskSign::Add)], 32);
        let mut ks = vec![0u8; (BLOCK + 5) * 4];
        ChaCha20::new(&key.into(), &[0u8; 12].into()).apply_keystream(&mut ks);
        for (i, a) in acc.iter().enumerate() {
            let w = u32::from_le_bytes([ks[4 * i], ks[4 * i + 1], ks[4 * i + 2], ks[4 * i + 3]]);
            assert_eq!(*a, u64::from(w));
        }
    }
}
