//! Shamir t-of-k secret sharing of 32-byte secrets over the prime field GF(p), p = 2^61 − 1.
//!
//! A secret is cut into [`LIMBS`] limbs (four of 7 bytes and one of 4 bytes, each well
//! below p) and every limb is shared with its own random polynomial of degree t − 1; the
//! share of the holder with evaluation point x is the five polynomial values at x. A field
//! this large allows far more than the 255 holders of GF(256) schemes (the evaluation
//! points are participant indices + 1, up to [`crate::MAX_PARTICIPANTS`]).
//!
//! Reconstruction interpolates at 0 from the first t shares and then **checks every extra
//! share** against the same polynomial and that every limb of the result has the width it
//! must have, so a wrong share is reported as [`ShamirError::Inconsistent`] rather than
//! turned into a silently wrong secret whenever more than t shares are available (and, with
//! exactly t, whenever it pushes a limb out of range, which a random error does with
//! probability above 1 − 2^-29). Callers that hold a commitment to the secret (the
//! self-mask seed's hash, the mask key's public key) check it as well. Cost: O(t²) field
//! operations for the weights at 0 and O(t²) per extra share.
//!
//! This module knows nothing about who holds which share.

use rand::{CryptoRng, RngCore};
use zeroize::Zeroize;

/// The field modulus, the Mersenne prime 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;

/// Limbs per 32-byte secret.
pub const LIMBS: usize = 5;

/// Bytes of the secret in each limb (the last one takes the rest).
const LIMB_BYTES: [usize; LIMBS] = [7, 7, 7, 7, 4];

/// One holder's share of one secret: the polynomial values at the holder's point.
pub type ShareValue = [u64; LIMBS];

/// Shares with their holders' evaluation points, as [`reconstruct`] takes them.
pub type PointShares = Vec<(u32, ShareValue)>;

/// Errors splitting or reconstructing a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// The threshold is below 1 or above the number of holders.
    #[error("threshold {threshold} is invalid for {holders} holders (need 1 <= t <= holders)")]
    Threshold {
        /// Asked threshold.
        threshold: usize,
        /// Number of holders.
        holders: usize,
    },
    /// Fewer shares than the threshold: the secret is undetermined.
    #[error("{have} shares cannot determine a secret with threshold {need}")]
    NotEnoughShares {
        /// Shares available.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// An evaluation point is 0, out of the field or repeated.
    #[error("evaluation point {0} is zero or repeated")]
    BadPoint(u64),
    /// A share value is not a field element.
    #[error("share value {0:#x} is not below the field modulus")]
    OutOfField(u64),
    /// The shares do not lie on one polynomial of degree t − 1, or the secret they give is
    /// not a 32-byte value: at least one share is wrong.
    #[error("shares are inconsistent: at least one is wrong")]
    Inconsistent,
}

#[inline]
fn reduce128(x: u128) -> u64 {
    // x < 2^122 for products of reduced elements.
    let r = (x as u64 & P) + (x >> 61) as u64;
    let r = (r & P) + (r >> 61);
    if r >= P {
        r - P
    } else {
        r
    }
}

#[inline]
fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P {
        s - P
    } else {
        s
    }
}

#[inline]
fn sub(a: u64, b: u64) -> u64 {
    if a >= b {
        a - b
    } else {
        a + P - b
    }
}

#[inline]
fn mul(a: u64, b: u64) -> u64 {
    reduce128(a as u128 * b as u128)
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// Inverse of a nonzero element (Fermat).
fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

/// A uniformly random field element (rejection sampling on 61-bit words).
fn random_element<R: RngCore + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < P {
            return v;
        }
    }
}

fn to_limbs(secret: &[u8; 32]) -> ShareValue {
    let mut limbs = [0u64; LIMBS];
    let mut at = 0;
    for (limb, &len) in limbs.iter_mut().zip(LIMB_BYTES.iter()) {
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(&secret[at..at + len]);
        *limb = u64::from_le_bytes(bytes);
        bytes.zeroize();
        at += len;
    }
    limbs
}

fn from_limbs(limbs: &ShareValue) -> Option<[u8; 32]> {
    let mut secret = [0u8; 32];
    let mut at = 0;
    for (&limb, &len) in limbs.iter().zip(LIMB_BYTES.iter()) {
        if limb >> (8 * len) != 0 {
            secret.zeroize();
            return None;
        }
        secret[at..at + len].copy_from_slice(&limb.to_le_bytes()[..len]);
        at += len;
    }
    Some(secret)
}

fn check_points(points: &[u32]) -> Result<(), ShamirError> {
    let mut seen = std::collections::HashSet::with_capacity(points.len());
    for &x in points {
        if x == 0 || u64::from(x) >= P || !seen.insert(x) {
            return Err(ShamirError::BadPoint(x.into()));
        }
    }
    Ok(())
}

/// Splits `secret` into one share per evaluation point in `points` (distinct, nonzero) so
/// that any `threshold` of them determine it and fewer reveal nothing about it.
pub fn split<R: CryptoRng + RngCore + ?Sized>(
    secret: &[u8; 32],
    threshold: usize,
    points: &[u32],
    rng: &mut R,
) -> Result<Vec<ShareValue>, ShamirError> {
    if threshold == 0 || threshold > points.len() {
        return Err(ShamirError::Threshold {
            threshold,
            holders: points.len(),
        });
    }
    check_points(points)?;
    let mut shares = vec![[0u64; LIMBS]; points.len()];
    let mut coefficients = vec![0u64; threshold];
    let mut limbs = to_limbs(secret);
    for (l, &limb) in limbs.iter().enumerate() {
        coefficients[0] = limb;
        for c in coefficients.iter_mut().skip(1) {
            *c = random_element(rng);
        }
        for (share, &x) in shares.iter_mut().zip(points) {
            // Horner.
            let x = u64::from(x);
            share[l] = coefficients
                .iter()
                .rev()
                .fold(0, |acc, &c| add(mul(acc, x), c));
        }
    }
    coefficients.zeroize();
    limbs.zeroize();
    Ok(shares)
}

/// Lagrange weights at `z` for the points `xs` (distinct): the value at z of the
/// polynomial through (xs[j], y_j) is Σ w_j y_j.
fn lagrange_weights(xs: &[u64], z: u64) -> Vec<u64> {
    xs.iter()
        .enumerate()
        .map(|(j, &xj)| {
            let (mut num, mut den) = (1u64, 1u64);
            for (m, &xm) in xs.iter().enumerate() {
                if m != j {
                    num = mul(num, sub(z, xm));
                    den = mul(den, sub(xj, xm));
                }
            }
            mul(num, inv(den))
        })
        .collect()
}

/// Reconstructs a secret from `(point, share)` pairs with threshold `threshold`: from the
/// first t shares, after checking that every further share lies on the same polynomial and
/// that the result is a 32-byte value.
pub fn reconstruct(
    shares: &[(u32, ShareValue)],
    threshold: usize,
) -> Result<[u8; 32], ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::Threshold {
            threshold,
            holders: shares.len(),
        });
    }
    if shares.len() < threshold {
        return Err(ShamirError::NotEnoughShares {
            have: shares.len(),
            need: threshold,
        });
    }
    let points: Vec<u32> = shares.iter().map(|(x, _)| *x).collect();
    check_points(&points)?;
    for (_, value) in shares {
        if let Some(&bad) = value.iter().find(|&&v| v >= P) {
            return Err(ShamirError::OutOfField(bad));
        }
    }
    let (base, extra) = shares.split_at(threshold);
    let xs: Vec<u64> = base.iter().map(|(x, _)| u64::from(*x)).collect();
    let interpolate = |weights: &[u64]| -> ShareValue {
        let mut out = [0u64; LIMBS];
        for (l, o) in out.iter_mut().enumerate() {
            *o = base
                .iter()
                .zip(weights)
                .fold(0, |acc, ((_, y), &w)| add(acc, mul(w, y[l])));
        }
        out
    };
    for (x, value) in extra {
        if interpolate(&lagrange_weights(&xs, u64::from(*x))) != *value {
            return Err(ShamirError::Inconsistent);
        }
    }
    let mut limbs = interpolate(&lagrange_weights(&xs, 0));
    let secret = from_limbs(&limbs).ok_or(ShamirError::Inconsistent);
    limbs.zeroize();
    secret
}

/// Encodes a share value as 40 little-endian bytes (for encryption).
pub(crate) fn share_to_bytes(value: &ShareValue, out: &mut [u8]) {
    for (chunk, v) in out.chunks_exact_mut(8).zip(value) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// Decodes a share value from 40 bytes, refusing values outside the field.
pub(crate) fn share_from_bytes(bytes: &[u8]) -> Result<ShareValue, ShamirError> {
    let mut value = [0u64; LIMBS];
    for (v, chunk) in value.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *v = u64::from_le_bytes(b);
        if *v >= P {
            return Err(ShamirError::OutOfField(*v));
        }
    }
    Ok(value)
}

/// Bytes of an encoded share value.
pub(crate) const SHARE_BYTES: usize = 8 * LIMBS;

/// Checks that a share value is made of field elements.
pub(crate) fn check_share(value: &ShareValue) -> Result<(), ShamirError> {
    match value.iter().find(|&&v| v >= P) {
        Some(&bad) => Err(ShamirError::OutOfField(bad)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn field_arithmetic_matches_u128_reference() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for _ in 0..10_000 {
            let a = random_element(&mut rng);
            let b = random_element(&mut rng);
            let p = P as u128;
            assert_eq!(mul(a, b) as u128, (a as u128 * b as u128) % p);
            assert_eq!(add(a, b) as u128, (a as u128 + b as u128) % p);
            assert_eq!(sub(a, b) as u128, (a as u128 + p - b as u128) % p);
            if a != 0 {
                assert_eq!(mul(a, inv(a)), 1);
            }
        }
        assert_eq!(mul(P - 1, P - 1), 1);
    }

    #[test]
    fn limbs_round_trip_and_reject_overwide_values() {
        let secret: [u8; 32] = std::array::from_fn(|i| 0xff - i as u8);
        assert_eq!(from_limbs(&to_limbs(&secret)), Some(secret));
        let mut limbs = to_limbs(&secret);
        limbs[4] |= 1 << 40;
        assert_eq!(from_limbs(&limbs), None);
    }

    #[test]
    fn known_polynomial() {
        // secret limb 0 = 5, threshold 2 with a fixed slope: shares at 1, 2 interpolate back.
        let xs = [1u64, 2];
        let w = lagrange_weights(&xs, 0);
        // p(x) = 5 + 3x: p(1) = 8, p(2) = 11.
        assert_eq!(add(mul(w[0], 8), mul(w[1], 11)), 5);
    }

    #[test]
    fn supports_more_than_255_holders() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = [7u8; 32];
        let points: Vec<u32> = (1..=1000).collect();
        let shares = split(&secret, 600, &points, &mut rng).unwrap();
        let mut pairs: Vec<(u32, ShareValue)> = points.iter().copied().zip(shares).collect();
        pairs.reverse();
        assert_eq!(reconstruct(&pairs[..601], 600).unwrap(), secret);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let s = [1u8; 32];
        assert!(matches!(
            split(&s, 0, &[1, 2], &mut rng),
            Err(ShamirError::Threshold { .. })
        ));
        assert!(matches!(
            split(&s, 3, &[1, 2], &mut rng),
            Err(ShamirError::Threshold { .. })
        ));
        assert_eq!(
            split(&s, 2, &[1, 1], &mut rng),
            Err(ShamirError::BadPoint(1))
        );
        assert_eq!(split(&s, 1, &[0], &mut rng), Err(ShamirError::BadPoint(0)));
        let shares = split(&s, 2, &[1, 2, 3], &mut rng).unwrap();
        let mut pairs = vec![(1, shares[0]), (2, shares[1])];
        pairs[1].1[0] = P;
        assert_eq!(reconstruct(&pairs, 2), Err(ShamirError::OutOfField(P)));
        assert!(share_from_bytes(&[0xff; SHARE_BYTES]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any t of the k shares give the secret back; with an extra share too.
        #[test]
        fn any_t_of_k_reconstruct(
            secret in proptest::array::uniform32(any::<u8>()),
            k in 2usize..40,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
            pick_seed in any::<u64>(),
        ) {
            let t = 1 + ((k - 1) as f64 * t_frac) as usize;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let points: Vec<u32> = (0..k as u32).map(|i| 3 * i + 7).collect();
            let shares = split(&secret, t, &points, &mut rng).unwrap();
            let mut pairs: Vec<(u32, ShareValue)> = points.iter().copied().zip(shares).collect();
            let mut pick = ChaCha20Rng::seed_from_u64(pick_seed);
            rand::seq::SliceRandom::shuffle(pairs.as_mut_slice(), &mut pick);
            prop_assert_eq!(reconstruct(&pairs[..t], t).unwrap(), secret);
            prop_assert_eq!(reconstruct(&pairs, t).unwrap(), secret);
            if t > 1 {
                prop_assert_eq!(
                    reconstruct(&pairs[..t - 1], t),
                    Err(ShamirError::NotEnoughShares { have: t - 1, need: t })
                );
            }
        }

        /// Below the threshold the secret is undetermined: for t − 1 shares and *any*
        /// candidate secret there is a polynomial of degree t − 1 through both, so the
        /// shares are equally consistent with every secret.
        #[test]
        fn below_threshold_every_secret_is_consistent(
            secret in proptest::array::uniform32(any::<u8>()),
            candidate in proptest::array::uniform32(any::<u8>()),
            t in 2usize..12,
            seed in any::<u64>(),
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let points: Vec<u32> = (1..=t as u32 + 3).collect();
            let shares = split(&secret, t, &points, &mut rng).unwrap();
            let held: Vec<(u32, ShareValue)> =
                points.iter().copied().zip(shares).take(t - 1).collect();
            // Put the candidate secret at point 0 and interpolate the other shares.
            let cand = to_limbs(&candidate);
            let mut xs: Vec<u64> = vec![0];
            xs.extend(held.iter().map(|(x, _)| u64::from(*x)));
            let ys: Vec<ShareValue> = std::iter::once(cand).chain(held.iter().map(|(_, y)| *y)).collect();
            // The polynomial through these t points exists and reproduces every held share
            // and gives the candidate at 0; extend to a full share set and reconstruct.
            let z = u64::from(points[t - 1]);
            let w = lagrange_weights(&xs, z);
            let mut extra = [0u64; LIMBS];
            for (l, e) in extra.iter_mut().enumerate() {
                *e = ys.iter().zip(&w).fold(0, |acc, (y, &wj)| add(acc, mul(wj, y[l])));
            }
            let mut forged = held.clone();
            forged.push((points[t - 1], extra));
            prop_assert_eq!(reconstruct(&forged, t).unwrap(), candidate);
        }

        /// A corrupted extra share is detected.
        #[test]
        fn corrupted_extra_share_is_detected(
            secret in proptest::array::uniform32(any::<u8>()),
            t in 1usize..10,
            seed in any::<u64>(),
            limb in 0usize..LIMBS,
            delta in 1u64..P,
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let points: Vec<u32> = (1..=t as u32 + 1).collect();
            let shares = split(&secret, t, &points, &mut rng).unwrap();
            let mut pairs: Vec<(u32, ShareValue)> = points.iter().copied().zip(shares).collect();
            pairs[t].1[limb] = add(pairs[t].1[limb], delta);
            prop_assert_eq!(reconstruct(&pairs, t), Err(ShamirError::Inconsistent));
        }
    }
}
