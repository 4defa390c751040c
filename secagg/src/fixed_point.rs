//! Fixed-point encoding of clipped float updates into the ring Z/2^b, and decoding of sums.
//!
//! With L2 clip C every coordinate satisfies |x_i| <= C. With at most n summands and b bits,
//! each value is scaled by s = (M − 1)/C where M = ⌊(2^(b−1) − 1)/n⌋ and rounded
//! **stochastically** (up with probability equal to the fractional part, so the encoding is
//! unbiased), giving integers in [−M, M] stored in two's complement mod 2^b. A sum of up to
//! n of them lies in [−(2^(b−1) − 1), 2^(b−1) − 1] and never wraps: the encoding reserves
//! ⌈log2 n⌉ bits of headroom (a little less where n is not a power of two). The decoder
//! reads the sum as signed and divides by s; its error per coordinate is below m/s for m
//! summands (each rounding moves a value by less than 1/s).
//!
//! The encoder refuses non-finite values and vectors whose norm exceeds C (clipping is the
//! caller's job; only float slack of 10^-6·C is tolerated and clamped).

use rand::RngCore;

/// Errors of the fixed-point codec.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FixedPointError {
    /// Parameters out of range.
    #[error("fixed point: {0}")]
    Params(String),
    /// A value is NaN or infinite.
    #[error("coordinate {index} is not finite")]
    NotFinite {
        /// Position.
        index: usize,
    },
    /// The vector was not clipped to the norm the encoder was made for.
    #[error("L2 norm {norm} exceeds the clip {clip}")]
    NotClipped {
        /// Norm of the vector.
        norm: f64,
        /// Clip of the encoder.
        clip: f64,
    },
    /// A sum element outside the ring.
    #[error("sum element {index} = {value} is not below 2^{bits}")]
    OutOfRing {
        /// Position.
        index: usize,
        /// Value.
        value: u64,
        /// Ring width.
        bits: u8,
    },
}

/// Encoder/decoder between clipped f32 vectors and vectors mod 2^b.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    clip: f64,
    bits: u8,
    max_summands: u32,
    bound: i64,
    scale: f64,
}

impl FixedPoint {
    /// A codec for vectors of L2 norm at most `clip`, `bits` bits per coordinate (2..=64)
    /// and sums of at most `max_summands` vectors.
    pub fn new(clip: f64, bits: u8, max_summands: u32) -> Result<Self, FixedPointError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(FixedPointError::Params(format!(
                "clip must be finite and > 0, got {clip}"
            )));
        }
        if !(2..=64).contains(&bits) {
            return Err(FixedPointError::Params(format!(
                "bits must be in 2..=64, got {bits}"
            )));
        }
        if max_summands == 0 {
            return Err(FixedPointError::Params("max_summands must be >= 1".into()));
        }
        let half = (1u128 << (bits - 1)) - 1;
        let bound = (half / u128::from(max_summands)) as i64;
        if bound < 2 {
            return Err(FixedPointError::Params(format!(
                "{bits} bits leave no precision for {max_summands} summands"
            )));
        }
        // Keep the scaled magnitude within f64's exact integers.
        let bound = bound.min(1 << 52);
        Ok(Self {
            clip,
            bits,
            max_summands,
            bound,
            scale: (bound - 1) as f64 / clip,
        })
    }

    /// Ring width b.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// The scale s (encoded = round(x · s)).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Largest magnitude of one encoded coordinate, M.
    pub fn bound(&self) -> i64 {
        self.bound
    }

    /// Largest number of summands a decoded sum may have.
    pub fn max_summands(&self) -> u32 {
        self.max_summands
    }

    /// Largest error per coordinate of a decoded sum of `summands` vectors.
    pub fn error_bound(&self, summands: u32) -> f64 {
        f64::from(summands) / self.scale
    }

    fn mask(&self) -> u64 {
        if self.bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits) - 1
        }
    }

    /// Encodes a clipped vector with stochastic rounding driven by `rng`.
    pub fn encode<R: RngCore + ?Sized>(
        &self,
        x: &[f32],
        rng: &mut R,
    ) -> Result<Vec<u64>, FixedPointError> {
        self.encode_values(x.iter().map(|&v| f64::from(v)), rng)
    }

    /// [`FixedPoint::encode`] for f64 values (statistics whose precision f32 would lose:
    /// sums of many rows); the same checks and the same rounding.
    pub fn encode_f64<R: RngCore + ?Sized>(
        &self,
        x: &[f64],
        rng: &mut R,
    ) -> Result<Vec<u64>, FixedPointError> {
        self.encode_values(x.iter().copied(), rng)
    }

    fn encode_values<I, R>(&self, x: I, rng: &mut R) -> Result<Vec<u64>, FixedPointError>
    where
        I: Iterator<Item = f64> + Clone,
        R: RngCore + ?Sized,
    {
        let mut sq = 0.0f64;
        for (index, v) in x.clone().enumerate() {
            if !v.is_finite() {
                return Err(FixedPointError::NotFinite { index });
            }
            sq += v * v;
        }
        let norm = sq.sqrt();
        if norm > self.clip * (1.0 + 1e-6) {
            return Err(FixedPointError::NotClipped {
                norm,
                clip: self.clip,
            });
        }
        let mask = self.mask();
        let bound = self.bound as f64;
        Ok(x.map(|v| {
            let z = (v.clamp(-self.clip, self.clip) * self.scale).clamp(-bound, bound);
            let floor = z.floor();
            // 53 random bits: uniform in [0, 1).
            let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            let rounded = if u < z - floor { floor + 1.0 } else { floor };
            (rounded as i64 as u64) & mask
        })
        .collect())
    }

    /// Decodes a sum (mod 2^b) of encoded vectors.
    pub fn decode_sum(&self, sum: &[u64]) -> Result<Vec<f64>, FixedPointError> {
        let mask = self.mask();
        let half = 1u64 << (self.bits - 1);
        sum.iter()
            .enumerate()
            .map(|(index, &v)| {
                if v & !mask != 0 {
                    return Err(FixedPointError::OutOfRing {
                        index,
                        value: v,
                        bits: self.bits,
                    });
                }
                let signed = if v >= half {
                    -((mask - v) as i64) - 1
                } else {
                    v as i64
                };
                Ok(signed as f64 / self.scale)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn add_mod(acc: &mut [u64], v: &[u64], bits: u8) {
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        for (a, b) in acc.iter_mut().zip(v) {
            *a = a.wrapping_add(*b) & mask;
        }
    }

    fn clipped(rng: &mut ChaCha20Rng, d: usize, clip: f64) -> Vec<f32> {
        let v: Vec<f64> = (0..d)
            .map(|_| (rand::RngCore::next_u32(rng) as f64 / u32::MAX as f64) - 0.5)
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        let scale = clip / norm * 0.999;
        v.iter().map(|x| (x * scale) as f32).collect()
    }

    #[test]
    fn no_wrap_with_n_summands_at_the_bound() {
        // Every summand puts all its norm on one coordinate, with the same sign: the worst
        // case for wrapping.
        for bits in [8u8, 16, 20, 32, 64] {
            for n in [1u32, 3, 100, 1000] {
                let Ok(fp) = FixedPoint::new(2.0, bits, n) else {
                    continue;
                };
                let mut rng = ChaCha20Rng::seed_from_u64(u64::from(bits) * 7 + u64::from(n));
                for sign in [1.0f32, -1.0] {
                    let x = [2.0f32 * sign, 0.0];
                    let mut sum = vec![0u64; 2];
                    for _ in 0..n {
                        add_mod(&mut sum, &fp.encode(&x, &mut rng).unwrap(), bits);
                    }
                    let dec = fp.decode_sum(&sum).unwrap();
                    let truth = 2.0 * f64::from(sign) * f64::from(n);
                    assert!(
                        (dec[0] - truth).abs() <= fp.error_bound(n),
                        "bits {bits} n {n}: {} vs {truth}",
                        dec[0]
                    );
                    assert_eq!(dec[1], 0.0);
                }
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let fp = FixedPoint::new(1.0, 8, 1).unwrap();
        // 0.3 / resolution is fractional; the mean of many encodings approaches it.
        let x = [0.3f32 / fp.scale() as f32 * 2.5];
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut total = 0.0;
        let trials = 20_000;
        for _ in 0..trials {
            total += fp.decode_sum(&fp.encode(&x, &mut rng).unwrap()).unwrap()[0];
        }
        let mean = total / f64::from(trials);
        assert!(
            (mean - f64::from(x[0])).abs() < 0.02 / fp.scale(),
            "{mean} vs {}",
            x[0]
        );
    }

    #[test]
    fn refuses_bad_inputs() {
        assert!(FixedPoint::new(0.0, 32, 10).is_err());
        assert!(FixedPoint::new(f64::NAN, 32, 10).is_err());
        assert!(FixedPoint::new(1.0, 1, 10).is_err());
        assert!(FixedPoint::new(1.0, 65, 10).is_err());
        assert!(FixedPoint::new(1.0, 32, 0).is_err());
        assert!(FixedPoint::new(1.0, 8, 1000).is_err());
        let fp = FixedPoint::new(1.0, 16, 4).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(
            fp.encode(&[0.5, f32::NAN], &mut rng),
            Err(FixedPointError::NotFinite { index: 1 })
        );
        assert!(matches!(
            fp.encode(&[1.0, 1.0], &mut rng),
            Err(FixedPointError::NotClipped { .. })
        ));
        assert!(matches!(
            fp.decode_sum(&[1 << 16]),
            Err(FixedPointError::OutOfRing { .. })
        ));
    }

    /// f64 values keep their precision: sums of large counts decode to within the
    /// rounding bound, far below f32's resolution at that magnitude.
    #[test]
    fn f64_values_keep_their_precision() {
        let fp = FixedPoint::new(4.0e6, 62, 3).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let xs = [
            [1_000_000.123_456_789f64, 0.5],
            [2_000_000.000_000_1, -0.25],
            [999_999.987_654_321, 0.125],
        ];
        let mut sum = vec![0u64; 2];
        for x in &xs {
            add_mod(&mut sum, &fp.encode_f64(x, &mut rng).unwrap(), 62);
        }
        let dec = fp.decode_sum(&sum).unwrap();
        let truth = [
            1_000_000.123_456_789f64 + 2_000_000.000_000_1 + 999_999.987_654_321,
            0.375,
        ];
        for (a, b) in dec.iter().zip(truth) {
            assert!((a - b).abs() <= fp.error_bound(3), "{a} vs {b}");
        }
        // f32 could not hold the first sum to better than 0.25.
        assert!(fp.error_bound(3) < 1e-8);
        assert!(matches!(
            fp.encode_f64(&[4.1e6, 0.0], &mut rng),
            Err(FixedPointError::NotClipped { .. })
        ));
        assert_eq!(
            fp.encode_f64(&[f64::INFINITY], &mut rng),
            Err(FixedPointError::NotFinite { index: 0 })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The decoded sum of encoded clipped vectors equals the true sum within m/s.
        #[test]
        fn decoded_sum_within_rounding_bound(
            seed in any::<u64>(),
            n in 1u32..200,
            m_frac in 0.0f64..=1.0,
            bits in prop_oneof![Just(16u8), Just(24), Just(32), Just(48), Just(64)],
            clip in 0.01f64..100.0,
            d in 1usize..64,
        ) {
            let Ok(fp) = FixedPoint::new(clip, bits, n) else { return Ok(()); };
            let m = 1 + ((n - 1) as f64 * m_frac) as u32;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut sum = vec![0u64; d];
            let mut truth = vec![0f64; d];
            for _ in 0..m {
                let x = clipped(&mut rng, d, clip);
                for (t, v) in truth.iter_mut().zip(&x) {
                    *t += f64::from(*v);
                }
                add_mod(&mut sum, &fp.encode(&x, &mut rng).unwrap(), bits);
            }
            let dec = fp.decode_sum(&sum).unwrap();
            for (a, b) in dec.iter().zip(&truth) {
                prop_assert!((a - b).abs() <= fp.error_bound(m) * (1.0 + 1e-9) + 1e-12 * clip * f64::from(m),
                    "{a} vs {b} bound {}", fp.error_bound(m));
            }
        }
    }
}
