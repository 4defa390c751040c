//! Double-double arithmetic (about 106 bits of significand) for building the grid
//! sampler's probability tables precisely. Algorithms from Dekker (1971) and the QD
//! library (Hida, Li, Bailey): error-free `two_sum` / `two_prod`, then renormalisation.

/// An unevaluated sum `hi + lo` with `|lo| <= ulp(hi) / 2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dd {
    pub hi: f64,
    pub lo: f64,
}

fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

fn quick_two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    (s, b - (s - a))
}

fn two_prod(a: f64, b: f64) -> (f64, f64) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

/// ln 2 to double-double precision.
const LN2: Dd = Dd {
    hi: std::f64::consts::LN_2,
    lo: 2.319_046_813_846_299_6e-17,
};

impl Dd {
    pub(crate) const ZERO: Dd = Dd { hi: 0.0, lo: 0.0 };

    pub(crate) fn from(x: f64) -> Dd {
        Dd { hi: x, lo: 0.0 }
    }

    pub(crate) fn add(self, b: Dd) -> Dd {
        let (s, e) = two_sum(self.hi, b.hi);
        let (t, f) = two_sum(self.lo, b.lo);
        let (s, e) = quick_two_sum(s, e + t);
        let (hi, lo) = quick_two_sum(s, e + f);
        Dd { hi, lo }
    }

    pub(crate) fn neg(self) -> Dd {
        Dd {
            hi: -self.hi,
            lo: -self.lo,
        }
    }

    pub(crate) fn mul(self, b: Dd) -> Dd {
        let (p, e) = two_prod(self.hi, b.hi);
        let (hi, lo) = quick_two_sum(p, e + (self.hi * b.lo + self.lo * b.hi));
        Dd { hi, lo }
    }

    pub(crate) fn mul_f64(self, b: f64) -> Dd {
        self.mul(Dd::from(b))
    }

    pub(crate) fn div(self, b: Dd) -> Dd {
        let q1 = self.hi / b.hi;
        let r = self.add(b.mul_f64(q1).neg());
        let q2 = r.hi / b.hi;
        let r = r.add(b.mul_f64(q2).neg());
        let q3 = r.hi / b.hi;
        let (hi, lo) = quick_two_sum(q1, q2);
        Dd { hi, lo }.add(Dd::from(q3))
    }

    /// Multiplies by 2^e exactly.
    pub(crate) fn ldexp(self, e: i32) -> Dd {
        let f = 2f64.powi(e);
        Dd {
            hi: self.hi * f,
            lo: self.lo * f,
        }
    }

    /// exp(x) for x in [-745, 0], relative error around 1e-29.
    pub(crate) fn exp(self) -> Dd {
        if self.hi < -745.0 {
            return Dd::ZERO;
        }
        // x = m ln2 + r, |r| <= ln2 / 2; then exp(r) = exp(r / 2^10)^(2^10).
        let m = (self.hi / LN2.hi).round();
        let r = self.add(LN2.mul_f64(m).neg()).ldexp(-10);
        // Taylor series to r^14 / 14!: |r| < 3.4e-4, so the remainder is below 1e-52.
        let mut term = Dd::from(1.0);
        let mut sum = Dd::from(1.0);
        for k in 1..=14 {
            term = term.mul(r).div(Dd::from(k as f64));
            sum = sum.add(term);
        }
        for _ in 0..10 {
            sum = sum.mul(sum);
        }
        sum.ldexp(m as i32)
    }

    /// Rounds a non-negative value to the nearest integer.
    pub(crate) fn to_u128(self) -> u128 {
        if self.hi <= 0.0 {
            return 0;
        }
        if self.hi >= 9_007_199_254_740_992.0 {
            // hi is an integer; add the rounded low part.
            let hi = self.hi as u128;
            let lo = self.lo.round();
            if lo >= 0.0 {
                hi + lo as u128
            } else {
                hi - (-lo) as u128
            }
        } else {
            (self.hi + self.lo).round() as u128
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_agrees_with_f64_and_with_itself_beyond_f64() {
        for x in [-1.0, -2.5, -40.0, -97.9, -0.0001] {
            let e = Dd::from(x).exp();
            let f = x.exp();
            assert!(
                (e.hi - f).abs() <= f * 2.0 * f64::EPSILON,
                "{x}: {e:?} vs {f}"
            );
        }
        // exp(a) exp(b) = exp(a + b) with different range reductions on each side: agreement
        // far below f64 precision shows the low parts are right.
        for (a, b) in [
            (-1.0, -1.0),
            (-3.25, -40.5),
            (-0.001, -97.0),
            (-12.0, -12.0),
        ] {
            let lhs = Dd::from(a).exp().mul(Dd::from(b).exp());
            let rhs = Dd::from(a).add(Dd::from(b)).exp();
            let rel = lhs.add(rhs.neg()).hi / rhs.hi;
            assert!(rel.abs() < 1e-27, "{a} {b}: {rel}");
        }
    }

    #[test]
    fn division_and_rounding() {
        let third = Dd::from(1.0).div(Dd::from(3.0));
        let back = third.mul_f64(3.0);
        assert!((back.hi - 1.0 + back.lo).abs() < 1e-31);
        assert_eq!(
            Dd::from(2f64.powi(80)).add(Dd::from(3.0)).to_u128(),
            (1u128 << 80) + 3
        );
        assert_eq!(Dd::from(2.6).to_u128(), 3);
    }
}
