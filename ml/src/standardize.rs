//! Federated standardisation: per-feature count, sum and sum of squares (and label counts)
//! from each holder of data, combined into one global mean and standard deviation that
//! every holder applies, and saved with the model so inference applies the same transform.
//!
//! Without DP the statistics are sums, so combining the parts gives exactly the pooled
//! statistics (up to float rounding). With DP, [`FeatureStats::release`] adds Gaussian
//! noise calibrated to the L2 sensitivity of one row, which needs bounded features: each
//! feature is clipped to a public range `[lo, hi]` ([`Bounds`]) and mapped to
//! `u = (clip(x) - lo) / (hi - lo)` in `[0, 1]` before it is counted. Adding or removing
//! one row then changes each of the `d` counts by at most 1, each of the `d` sums and the
//! `d` sums of squares by at most 1, and one label count by 1, so the L2 sensitivity is
//! `sqrt(3d + 1)` ([`FeatureStats::sensitivity`]). The release is the Gaussian mechanism
//! with noise multiplier `z` (zCDP `rho = 1 / (2 z^2)`). The bounds must not be taken from
//! the private data: they come from documentation or domain knowledge.
//!
//! Missing values (NaN, from `missing=mean`) are not counted; the transform replaces them
//! by the mean of their column, which is 0 after standardising.
//!
//! This module does no I/O and holds no socket: callers move the statistics.

use crate::data::Dataset;
use dpfl_common::dp::{GaussianNoise, NoiseError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Smallest standard deviation used; constant features are divided by 1 instead.
pub const MIN_STD: f64 = 1e-8;
/// Smallest unit variance (on the public range) of a bounded feature: (1 % of the range)^2.
const MIN_UNIT_VAR: f64 = 1e-4;

/// Errors of federated standardisation.
#[derive(Debug, thiserror::Error)]
pub enum StandardizeError {
    /// Two parts disagree on the number of features or classes.
    #[error("statistics of {got} features and {got_classes} classes do not combine with {expected} features and {expected_classes} classes")]
    Shape {
        /// Features expected.
        expected: usize,
        /// Classes expected.
        expected_classes: usize,
        /// Features given.
        got: usize,
        /// Classes given.
        got_classes: usize,
    },
    /// A bound pair is not `lo < hi`, or bounds do not match the features.
    #[error("bounds: {0}")]
    Bounds(String),
    /// A statistic is not finite, or a count is negative.
    #[error("statistics: {0}")]
    Invalid(String),
    /// Noise could not be drawn.
    #[error("noise: {0}")]
    Noise(#[from] NoiseError),
    /// Metadata in a model file that cannot be read.
    #[error("standardisation metadata: {0}")]
    Metadata(String),
}

/// Public per-feature ranges; features are clipped to them before they are counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// Lower end per feature.
    pub lo: Vec<f64>,
    /// Upper end per feature.
    pub hi: Vec<f64>,
}

impl Bounds {
    /// Checks `lo < hi`, finite, and one pair per feature.
    pub fn new(lo: Vec<f64>, hi: Vec<f64>) -> Result<Self, StandardizeError> {
        if lo.len() != hi.len() || lo.is_empty() {
            return Err(StandardizeError::Bounds(format!(
                "{} lower and {} upper ends",
                lo.len(),
                hi.len()
            )));
        }
        for (i, (l, h)) in lo.iter().zip(&hi).enumerate() {
            if !(l.is_finite() && h.is_finite() && l < h) {
                return Err(StandardizeError::Bounds(format!(
                    "feature {i}: [{l}, {h}] is not a range lo < hi"
                )));
            }
        }
        Ok(Self { lo, hi })
    }

    /// Parses `lo:hi|lo:hi|...`, or one `lo:hi` for all `dim` features.
    pub fn parse(s: &str, dim: usize) -> Result<Self, StandardizeError> {
        let pairs: Result<Vec<(f64, f64)>, StandardizeError> = s
            .split('|')
            .map(|p| {
                let (a, b) = p
                    .split_once(':')
                    .ok_or_else(|| StandardizeError::Bounds(format!("{p:?}: expected lo:hi")))?;
                let a: f64 = a.trim().parse().map_err(|_| {
                    StandardizeError::Bounds(format!("{p:?}: {a:?} is not a number"))
                })?;
                let b: f64 = b.trim().parse().map_err(|_| {
                    StandardizeError::Bounds(format!("{p:?}: {b:?} is not a number"))
                })?;
                Ok::<_, StandardizeError>((a, b))
            })
            .collect();
        let mut pairs = pairs?;
        if pairs.len() == 1 && dim > 1 {
            pairs = vec![pairs[0]; dim];
        }
        if pairs.len() != dim {
            return Err(StandardizeError::Bounds(format!(
                "{} ranges for {dim} features",
                pairs.len()
            )));
        }
        Self::new(
            pairs.iter().map(|p| p.0).collect(),
            pairs.iter().map(|p| p.1).collect(),
        )
    }

    fn unit(&self, j: usize, x: f64) -> f64 {
        (x.clamp(self.lo[j], self.hi[j]) - self.lo[j]) / (self.hi[j] - self.lo[j])
    }
}

/// Sufficient statistics of one part of the data: per feature the number of present
/// values, their sum and sum of squares; per class the number of rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    /// Present (non-missing) values per feature.
    pub count: Vec<f64>,
    /// Sum per feature.
    pub sum: Vec<f64>,
    /// Sum of squares per feature.
    pub sum_sq: Vec<f64>,
    /// Rows per class.
    pub label_counts: Vec<f64>,
    /// Whether the values were clipped and mapped to `[0, 1]` by bounds.
    pub bounded: bool,
}

impl FeatureStats {
    /// Statistics of `data` (raw values), with `num_classes` label counts.
    pub fn of(data: &Dataset, num_classes: usize) -> Self {
        Self::collect(data, num_classes, None)
    }

    /// Statistics of `data` after clipping to `bounds` and mapping to `[0, 1]` (the form
    /// whose sensitivity is bounded; see the module docs).
    pub fn of_bounded(
        data: &Dataset,
        num_classes: usize,
        bounds: &Bounds,
    ) -> Result<Self, StandardizeError> {
        if bounds.lo.len() != data.dim {
            return Err(StandardizeError::Bounds(format!(
                "{} ranges for {} features",
                bounds.lo.len(),
                data.dim
            )));
        }
        Ok(Self::collect(data, num_classes, Some(bounds)))
    }

    fn collect(data: &Dataset, num_classes: usize, bounds: Option<&Bounds>) -> Self {
        let d = data.dim;
        let mut s = Self::zeros(d, num_classes, bounds.is_some());
        for row in 0..data.len() {
            for j in 0..d {
                let x = data.features[row * d + j];
                if x.is_nan() {
                    continue;
                }
                let v = match bounds {
                    Some(b) => b.unit(j, x as f64),
                    None => x as f64,
                };
                s.count[j] += 1.0;
                s.sum[j] += v;
                s.sum_sq[j] += v * v;
            }
            if let Some(c) = s.label_counts.get_mut(data.labels[row] as usize) {
                *c += 1.0;
            }
        }
        s
    }

    /// Empty statistics.
    pub fn zeros(dim: usize, num_classes: usize, bounded: bool) -> Self {
        Self {
            count: vec![0.0; dim],
            sum: vec![0.0; dim],
            sum_sq: vec![0.0; dim],
            label_counts: vec![0.0; num_classes],
            bounded,
        }
    }

    /// Number of features.
    pub fn dim(&self) -> usize {
        self.count.len()
    }

    /// Checks lengths agree and every value is finite (call on statistics from a peer).
    pub fn validate(&self) -> Result<(), StandardizeError> {
        let d = self.count.len();
        if self.sum.len() != d || self.sum_sq.len() != d || d == 0 {
            return Err(StandardizeError::Invalid(format!(
                "{} counts, {} sums, {} sums of squares",
                d,
                self.sum.len(),
                self.sum_sq.len()
            )));
        }
        let all = self
            .count
            .iter()
            .chain(&self.sum)
            .chain(&self.sum_sq)
            .chain(&self.label_counts);
        if all.clone().any(|v| !v.is_finite()) {
            return Err(StandardizeError::Invalid("a value is not finite".into()));
        }
        Ok(())
    }

    /// Adds another part's statistics (same features, same classes, same form).
    pub fn merge(&mut self, other: &FeatureStats) -> Result<(), StandardizeError> {
        other.validate()?;
        if other.dim() != self.dim()
            || other.label_counts.len() != self.label_counts.len()
            || other.bounded != self.bounded
        {
            return Err(StandardizeError::Shape {
                expected: self.dim(),
                expected_classes: self.label_counts.len(),
                got: other.dim(),
                got_classes: other.label_counts.len(),
            });
        }
        let add = |a: &mut Vec<f64>, b: &Vec<f64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.count, &other.count);
        add(&mut self.sum, &other.sum);
        add(&mut self.sum_sq, &other.sum_sq);
        add(&mut self.label_counts, &other.label_counts);
        Ok(())
    }

    /// L2 sensitivity of bounded statistics to adding or removing one row: `sqrt(3d + 1)`.
    pub fn sensitivity(&self) -> f64 {
        ((3 * self.dim() + 1) as f64).sqrt()
    }

    /// Releases bounded statistics through the Gaussian mechanism with noise multiplier
    /// `z` (standard deviation `z * sensitivity()` on every value; zCDP `1 / (2 z^2)`).
    /// Unbounded statistics have no finite sensitivity and are refused.
    pub fn release(
        &mut self,
        z: f64,
        noise: &mut dyn GaussianNoise,
    ) -> Result<(), StandardizeError> {
        if !self.bounded {
            return Err(StandardizeError::Bounds(
                "a DP release needs bounded features (configure a range per feature)".into(),
            ));
        }
        let sens = self.sensitivity();
        for v in [
            &mut self.count,
            &mut self.sum,
            &mut self.sum_sq,
            &mut self.label_counts,
        ] {
            let mut f: Vec<f32> = v.iter().map(|x| *x as f32).collect();
            noise.add_calibrated(&mut f, z, sens)?;
            *v = f.into_iter().map(f64::from).collect();
        }
        Ok(())
    }
}

impl FeatureStats {
    /// Divides every statistic by `rows` (the holder's row count, at least 1): per-feature
    /// fractions of present values, means of unit values and of their squares, and class
    /// fractions. One holder's normalised bounded statistics have L2 norm at most
    /// `sqrt(3d + 1)` whatever its size, the client-level sensitivity
    /// ([`FeatureStats::sensitivity`] under add/remove of a whole holder).
    pub fn normalize(&mut self, rows: usize) {
        let n = rows.max(1) as f64;
        for v in [
            &mut self.count,
            &mut self.sum,
            &mut self.sum_sq,
            &mut self.label_counts,
        ] {
            v.iter_mut().for_each(|x| *x /= n);
        }
    }

    /// The statistics as a wire report.
    pub fn to_report(
        &self,
        spec_hash: dpfl_common::model::SpecHash,
        normalized: bool,
        noised: bool,
    ) -> dpfl_common::wire::StatsReport {
        dpfl_common::wire::StatsReport {
            spec_hash,
            count: self.count.clone(),
            sum: self.sum.clone(),
            sum_sq: self.sum_sq.clone(),
            label_counts: self.label_counts.clone(),
            bounded: self.bounded,
            normalized,
            noised,
        }
    }

    /// The statistics as one vector, `count | sum | sum_sq | label_counts` (3d + classes
    /// values): what a node puts into the secure sum of the statistics.
    pub fn to_vector(&self) -> Vec<f64> {
        let mut v = Vec::with_capacity(3 * self.dim() + self.label_counts.len());
        for part in [&self.count, &self.sum, &self.sum_sq, &self.label_counts] {
            v.extend_from_slice(part);
        }
        v
    }

    /// The inverse of [`FeatureStats::to_vector`] for `dim` features and `num_classes`
    /// classes (length and finiteness checked).
    pub fn from_vector(
        v: &[f64],
        dim: usize,
        num_classes: usize,
        bounded: bool,
    ) -> Result<Self, StandardizeError> {
        if v.len() != 3 * dim + num_classes {
            return Err(StandardizeError::Invalid(format!(
                "{} values for {dim} features and {num_classes} classes (expected {})",
                v.len(),
                3 * dim + num_classes
            )));
        }
        let s = Self {
            count: v[..dim].to_vec(),
            sum: v[dim..2 * dim].to_vec(),
            sum_sq: v[2 * dim..3 * dim].to_vec(),
            label_counts: v[3 * dim..].to_vec(),
            bounded,
        };
        s.validate()?;
        Ok(s)
    }

    /// The statistics of a wire report (shape and finiteness checked).
    pub fn from_report(r: &dpfl_common::wire::StatsReport) -> Result<Self, StandardizeError> {
        let s = Self {
            count: r.count.clone(),
            sum: r.sum.clone(),
            sum_sq: r.sum_sq.clone(),
            label_counts: r.label_counts.clone(),
            bounded: r.bounded,
        };
        s.validate()?;
        Ok(s)
    }
}

/// The transform every holder applies: `(clip(x) - mean) / std`, missing values to 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    /// Mean per feature.
    pub mean: Vec<f64>,
    /// Standard deviation per feature (at least [`MIN_STD`]; 1 for constant features).
    pub std: Vec<f64>,
    /// Ranges features are clipped to first (when the statistics were bounded).
    pub bounds: Option<Bounds>,
}

impl Standardizer {
    /// Mean and standard deviation from combined (possibly noisy) statistics. Noisy
    /// values are projected back onto what is possible: a count of at least 1, a unit
    /// mean in `[0, 1]`, a unit variance in `[1e-4, 1/4]` (1/12, the uniform's, when the
    /// noise drove it to 0 or below). Post-processing: no privacy cost.
    pub fn from_stats(
        stats: &FeatureStats,
        bounds: Option<&Bounds>,
    ) -> Result<Self, StandardizeError> {
        stats.validate()?;
        if stats.bounded != bounds.is_some() {
            return Err(StandardizeError::Bounds(
                "bounded statistics need their bounds (and unbounded ones none)".into(),
            ));
        }
        if let Some(b) = bounds {
            if b.lo.len() != stats.dim() {
                return Err(StandardizeError::Bounds(format!(
                    "{} ranges for {} features",
                    b.lo.len(),
                    stats.dim()
                )));
            }
        }
        let mut mean = Vec::with_capacity(stats.dim());
        let mut std = Vec::with_capacity(stats.dim());
        for j in 0..stats.dim() {
            let n = stats.count[j].max(1.0);
            let mut m = stats.sum[j] / n;
            let mut var = stats.sum_sq[j] / n - m * m;
            if let Some(b) = bounds {
                m = m.clamp(0.0, 1.0);
                // A noisy variance at or below 0 carries no information: fall back to the
                // uniform distribution's 1/12 on the public range, not to a raw 1.0 (which,
                // for a range of hundreds, multiplied the feature by hundreds and made
                // training diverge); a positive one is floored at (1 % of the range)^2.
                var = if var <= 0.0 {
                    1.0 / 12.0
                } else {
                    var.clamp(MIN_UNIT_VAR, 0.25)
                };
                let w = b.hi[j] - b.lo[j];
                mean.push(b.lo[j] + m * w);
                std.push(var.sqrt() * w);
            } else {
                mean.push(m);
                std.push(var.max(0.0).sqrt());
            }
        }
        for s in &mut std {
            if *s < MIN_STD {
                *s = 1.0;
            }
        }
        Ok(Self {
            mean,
            std,
            bounds: bounds.cloned(),
        })
    }

    /// Standardises `data` in place; missing values (NaN) become 0, the mean.
    pub fn apply(&self, data: &mut Dataset) -> Result<(), StandardizeError> {
        if data.dim != self.mean.len() {
            return Err(StandardizeError::Shape {
                expected: self.mean.len(),
                expected_classes: 0,
                got: data.dim,
                got_classes: 0,
            });
        }
        let d = data.dim;
        for (i, x) in data.features.iter_mut().enumerate() {
            let j = i % d;
            if x.is_nan() {
                *x = 0.0;
                continue;
            }
            let mut v = *x as f64;
            if let Some(b) = &self.bounds {
                v = v.clamp(b.lo[j], b.hi[j]);
            }
            *x = ((v - self.mean[j]) / self.std[j]) as f32;
        }
        Ok(())
    }

    /// The transform as safetensors metadata entries (`standardize.mean`, `.std`,
    /// `.lo`, `.hi`: comma-separated decimals that round-trip exactly).
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let join = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:?}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut m = HashMap::new();
        m.insert("standardize.mean".into(), join(&self.mean));
        m.insert("standardize.std".into(), join(&self.std));
        if let Some(b) = &self.bounds {
            m.insert("standardize.lo".into(), join(&b.lo));
            m.insert("standardize.hi".into(), join(&b.hi));
        }
        m
    }

    /// Reads the transform back from metadata; `None` when the file has none.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Option<Self>, StandardizeError> {
        let parse = |k: &str| -> Result<Option<Vec<f64>>, StandardizeError> {
            meta.get(k)
                .map(|s| {
                    s.split(',')
                        .map(|x| {
                            x.parse::<f64>()
                                .ok()
                                .filter(|v| v.is_finite())
                                .ok_or_else(|| StandardizeError::Metadata(format!("{k}: {x:?}")))
                        })
                        .collect()
                })
                .transpose()
        };
        let (Some(mean), Some(std)) = (parse("standardize.mean")?, parse("standardize.std")?)
        else {
            return Ok(None);
        };
        if mean.len() != std.len() || std.iter().any(|s| *s <= 0.0) {
            return Err(StandardizeError::Metadata(
                "mean and std differ in length, or a std is not positive".into(),
            ));
        }
        let bounds = match (parse("standardize.lo")?, parse("standardize.hi")?) {
            (Some(lo), Some(hi)) => Some(Bounds::new(lo, hi)?),
            (None, None) => None,
            _ => return Err(StandardizeError::Metadata("lo without hi".into())),
        };
        if bounds.as_ref().is_some_and(|b| b.lo.len() != mean.len()) {
            return Err(StandardizeError::Metadata(
                "bounds and mean differ in length".into(),
            ));
        }
        Ok(Some(Self { mean, std, bounds }))
    }
}

impl Standardizer {
    /// The transform as the wire message that tells nodes to apply it.
    pub fn to_spec(
        &self,
        spec_hash: dpfl_common::model::SpecHash,
    ) -> dpfl_common::wire::StandardizeSpec {
        let (lo, hi) = self
            .bounds
            .as_ref()
            .map_or((Vec::new(), Vec::new()), |b| (b.lo.clone(), b.hi.clone()));
        dpfl_common::wire::StandardizeSpec {
            spec_hash,
            mean: self.mean.clone(),
            std: self.std.clone(),
            lo,
            hi,
        }
    }

    /// The transform of a wire message, checked: `dim` features, finite means, positive
    /// finite standard deviations, and ranges `lo < hi` (or none).
    pub fn from_spec(
        s: &dpfl_common::wire::StandardizeSpec,
        dim: usize,
    ) -> Result<Self, StandardizeError> {
        if s.mean.len() != dim || s.std.len() != dim {
            return Err(StandardizeError::Shape {
                expected: dim,
                expected_classes: 0,
                got: s.mean.len().max(s.std.len()),
                got_classes: 0,
            });
        }
        if s.mean.iter().any(|m| !m.is_finite())
            || s.std.iter().any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(StandardizeError::Invalid(
                "a mean is not finite or a standard deviation not positive and finite".into(),
            ));
        }
        let bounds = match (s.lo.is_empty(), s.hi.is_empty()) {
            (true, true) => None,
            _ => {
                let b = Bounds::new(s.lo.clone(), s.hi.clone())?;
                if b.lo.len() != dim {
                    return Err(StandardizeError::Bounds(format!(
                        "{} ranges for {dim} features",
                        b.lo.len()
                    )));
                }
                Some(b)
            }
        };
        Ok(Self {
            mean: s.mean.clone(),
            std: s.std.clone(),
            bounds,
        })
    }
}

/// The loss of a model that knows only the class frequencies: their entropy in nats
/// (`ln(classes)` for balanced classes). Counts may be noisy; negative ones count as 0.
pub fn chance_loss(label_counts: &[f64]) -> f64 {
    let total: f64 = label_counts.iter().map(|c| c.max(0.0)).sum();
    if total <= 0.0 {
        return 0.0;
    }
    label_counts
        .iter()
        .map(|c| c.max(0.0) / total)
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum()
}

/// A warning when training makes no progress, as a model at chance does: the last `after`
/// rounds' (at least one) losses all lie within 2% of `chance` ([`chance_loss`]), or their
/// accuracies are all no better than always answering the most frequent class
/// (`majority`, its share). Unscaled features often leave a model there.
pub fn chance_level_warning(
    losses: &[f64],
    accuracies: &[f64],
    chance: f64,
    majority: f64,
    after: usize,
) -> Option<String> {
    let after = after.max(1);
    let tail = |v: &[f64]| (v.len() >= after).then(|| v[v.len() - after..].to_vec());
    let rounds = losses.len().max(accuracies.len());
    let hint = "the model is not learning; standardise the features (federated standardisation) \
                or lower the learning rate";
    if let Some(t) = tail(losses) {
        if chance > 0.0 && t.iter().all(|l| (l - chance).abs() <= 0.02 * chance) {
            return Some(format!(
                "loss {:.4} after {rounds} rounds is still at chance level ({chance:.4}, the \
                 entropy of the labels): {hint}",
                t[after - 1]
            ));
        }
    }
    if let Some(t) = tail(accuracies) {
        if majority > 0.0 && t.iter().all(|a| *a <= majority + 1e-9) {
            return Some(format!(
                "accuracy {:.4} after {rounds} rounds is no better than always answering the \
                 most frequent class ({majority:.4}): {hint}",
                t[after - 1]
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn noisy_bounded_variances_never_blow_features_up() {
        // Three features on [-300, 300] (width 600): a noisy unit variance below 0 (no
        // information: the uniform's 1/12), a tiny positive one (floored at 1 % of the
        // range) and a sound one (kept).
        let b = Bounds::new(vec![-300.0; 3], vec![300.0; 3]).unwrap();
        let stats = FeatureStats {
            count: vec![3.0; 3],
            sum: vec![1.5; 3],
            // unit mean 0.5: variances -0.1, 1e-9, 0.04
            sum_sq: vec![3.0 * (0.25 - 0.1), 3.0 * (0.25 + 1e-9), 3.0 * (0.25 + 0.04)],
            label_counts: vec![],
            bounded: true,
        };
        let s = Standardizer::from_stats(&stats, Some(&b)).unwrap();
        assert!(
            (s.std[0] - 600.0 / 12f64.sqrt()).abs() < 1e-9,
            "{:?}",
            s.std
        );
        assert!((s.std[1] - 6.0).abs() < 1e-9, "{:?}", s.std);
        assert!((s.std[2] - 120.0).abs() < 1e-9, "{:?}", s.std);
        // Any value in the range maps to at most range / std: 100 at the floor.
        let mut d = Dataset::new(vec![300.0, 300.0, 300.0], vec![0], 3).unwrap();
        s.apply(&mut d).unwrap();
        assert!(
            d.features.iter().all(|v| v.abs() <= 100.0 + 1e-3),
            "{:?}",
            d.features
        );
    }

    #[test]
    fn statistics_round_trip_through_one_vector() {
        let st = FeatureStats {
            count: vec![1.0, 2.0],
            sum: vec![3.0, 4.0],
            sum_sq: vec![5.0, 6.0],
            label_counts: vec![7.0, 8.0, 9.0],
            bounded: true,
        };
        let v = st.to_vector();
        assert_eq!(v, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(FeatureStats::from_vector(&v, 2, 3, true).unwrap(), st);
        assert!(FeatureStats::from_vector(&v, 2, 2, true).is_err());
        let mut bad = v.clone();
        bad[4] = f64::NAN;
        assert!(FeatureStats::from_vector(&bad, 2, 3, true).is_err());
    }

    fn table(n: usize, seed: u64) -> Dataset {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let mut f = Vec::new();
        let mut l = Vec::new();
        for _ in 0..n {
            f.push(rng.gen_range(0.0..2000.0f32));
            f.push(rng.gen_range(-0.1..0.3f32));
            f.push(5.0);
            l.push(rng.gen_range(0..2));
        }
        Dataset::new(f, l, 3).unwrap()
    }

    /// Two-pass mean and population standard deviation in f64: the reference.
    #[allow(clippy::needless_range_loop)]
    fn pooled(d: &Dataset) -> (Vec<f64>, Vec<f64>) {
        let n = d.len() as f64;
        let mut mean = vec![0.0; d.dim];
        for r in 0..d.len() {
            for j in 0..d.dim {
                mean[j] += d.features[r * d.dim + j] as f64 / n;
            }
        }
        let mut var = vec![0.0; d.dim];
        for r in 0..d.len() {
            for j in 0..d.dim {
                let e = d.features[r * d.dim + j] as f64 - mean[j];
                var[j] += e * e / n;
            }
        }
        (mean, var.into_iter().map(f64::sqrt).collect())
    }

    #[test]
    fn federated_statistics_equal_pooled_without_dp() {
        let all = table(1000, 7);
        // Three holders of different sizes.
        let parts = [
            all.subset(&(0..100).collect::<Vec<_>>()),
            all.subset(&(100..400).collect::<Vec<_>>()),
            all.subset(&(400..1000).collect::<Vec<_>>()),
        ];
        let mut combined = FeatureStats::zeros(3, 2, false);
        for p in &parts {
            combined.merge(&FeatureStats::of(p, 2)).unwrap();
        }
        let s = Standardizer::from_stats(&combined, None).unwrap();
        let (mean, std) = pooled(&all);
        for j in 0..2 {
            assert!(
                (s.mean[j] - mean[j]).abs() <= 1e-9 * mean[j].abs().max(1.0),
                "{j}"
            );
            assert!(
                (s.std[j] - std[j]).abs() <= 1e-6 * std[j],
                "{j}: {} {}",
                s.std[j],
                std[j]
            );
        }
        // The constant feature is centred and left unscaled.
        assert_eq!((s.mean[2], s.std[2]), (5.0, 1.0));
        let zeros = all.labels.iter().filter(|l| **l == 0).count() as f64;
        assert_eq!(combined.label_counts, vec![zeros, 1000.0 - zeros]);
        // Applied, every part lands on the pooled standard scale.
        let mut t = all.clone();
        s.apply(&mut t).unwrap();
        let (m2, s2) = pooled(&t);
        assert!(
            m2[0].abs() < 1e-5 && (s2[0] - 1.0).abs() < 1e-5,
            "{m2:?} {s2:?}"
        );
    }

    #[test]
    fn bounded_statistics_map_back_to_data_units() {
        let all = table(500, 3);
        let b = Bounds::parse("0:2000|-0.1:0.3|0:10", 3).unwrap();
        let st = FeatureStats::of_bounded(&all, 2, &b).unwrap();
        let s = Standardizer::from_stats(&st, Some(&b)).unwrap();
        let (mean, std) = pooled(&all);
        for j in 0..2 {
            assert!((s.mean[j] - mean[j]).abs() < 1e-6 * mean[j].abs().max(1.0));
            assert!((s.std[j] - std[j]).abs() < 1e-4 * std[j]);
        }
        assert_eq!(st.sensitivity(), 10f64.sqrt());
    }

    #[test]
    fn dp_release_noise_has_the_calibrated_scale() {
        struct Seeded(rand_chacha::ChaCha20Rng);
        impl GaussianNoise for Seeded {
            fn add_noise(&mut self, v: &mut [f32], sigma: f64) -> Result<(), NoiseError> {
                let n = rand_distr::Normal::new(0.0, sigma).unwrap();
                v.iter_mut().for_each(|x| *x += self.0.sample(n) as f32);
                Ok(())
            }
            fn name(&self) -> &'static str {
                "seeded"
            }
        }
        // 200 features: 601 noisy values with sigma = z * sqrt(3 * 200 + 1).
        let d = Dataset::new(vec![0.5; 200], vec![0], 200).unwrap();
        let b = Bounds::parse("0:1", 200).unwrap();
        let clean = FeatureStats::of_bounded(&d, 1, &b).unwrap();
        let mut noisy = clean.clone();
        let mut rng = Seeded(rand_chacha::ChaCha20Rng::seed_from_u64(1));
        noisy.release(2.0, &mut rng).unwrap();
        let diffs: Vec<f64> = noisy
            .count
            .iter()
            .zip(&clean.count)
            .chain(noisy.sum.iter().zip(&clean.sum))
            .chain(noisy.sum_sq.iter().zip(&clean.sum_sq))
            .map(|(a, b)| a - b)
            .collect();
        let sd = (diffs.iter().map(|x| x * x).sum::<f64>() / diffs.len() as f64).sqrt();
        let want = 2.0 * 601f64.sqrt();
        assert!((sd / want - 1.0).abs() < 0.1, "{sd} vs {want}");
        // Unbounded statistics have no finite sensitivity.
        let mut raw = FeatureStats::of(&d, 1);
        assert!(raw.release(2.0, &mut rng).is_err());
        // Noisy statistics still give a usable transform.
        let s = Standardizer::from_stats(&noisy, Some(&b)).unwrap();
        assert!(s.std.iter().all(|x| *x > 0.0) && s.mean.iter().all(|m| (0.0..=1.0).contains(m)));
    }

    #[test]
    fn missing_values_are_not_counted_and_become_the_mean() {
        let mut d = Dataset::new(vec![1.0, f32::NAN, 3.0, 4.0], vec![0, 1], 2).unwrap();
        let st = FeatureStats::of(&d, 2);
        assert_eq!(st.count, vec![2.0, 1.0]);
        let s = Standardizer::from_stats(&st, None).unwrap();
        s.apply(&mut d).unwrap();
        assert_eq!(d.features[1], 0.0);
        assert_eq!(d.features[0], -1.0);
    }

    #[test]
    fn shapes_that_differ_do_not_merge() {
        let mut a = FeatureStats::zeros(3, 2, false);
        assert!(a.merge(&FeatureStats::zeros(2, 2, false)).is_err());
        assert!(a.merge(&FeatureStats::zeros(3, 3, false)).is_err());
        let mut bad = FeatureStats::zeros(3, 2, false);
        bad.sum[0] = f64::NAN;
        assert!(a.merge(&bad).is_err());
    }

    #[test]
    fn metadata_round_trips() {
        let s = Standardizer {
            mean: vec![0.1, 1e10, -3.0],
            std: vec![0.3, 2.5, 1.0],
            bounds: Some(Bounds::new(vec![0.0, 0.0, -5.0], vec![1.0, 2e10, 5.0]).unwrap()),
        };
        assert_eq!(
            Standardizer::from_metadata(&s.to_metadata()).unwrap(),
            Some(s)
        );
        assert_eq!(Standardizer::from_metadata(&HashMap::new()).unwrap(), None);
        let mut m = HashMap::new();
        m.insert("standardize.mean".to_string(), "1,x".to_string());
        m.insert("standardize.std".to_string(), "1,1".to_string());
        assert!(Standardizer::from_metadata(&m).is_err());
    }

    #[test]
    fn chance_level_is_flagged() {
        let ln2 = 2f64.ln();
        assert!((chance_loss(&[5.0, 5.0]) - ln2).abs() < 1e-12);
        // 37 % / 63 %: -(0.37 ln 0.37 + 0.63 ln 0.63) = 0.6589557 (Python math.log).
        assert!((chance_loss(&[37.0, 63.0]) - 0.658_955_7).abs() < 1e-6);
        let flag = |l: &[f64], a: &[f64]| chance_level_warning(l, a, ln2, 0.6, 3).is_some();
        // The motivating run: loss 0.6934, accuracy 0.4985.
        assert!(flag(&[0.6934, 0.6933, 0.6932], &[]));
        assert!(!flag(&[0.6934, 0.6933], &[]));
        assert!(!flag(&[0.69, 0.5, 0.3], &[]));
        // Only the last rounds count.
        assert!(flag(&[0.3, 0.6934, 0.6933, 0.6932], &[]));
        assert!(!flag(&[0.6934, 0.6933, 0.6932, 0.4], &[]));
        // A diverged model (loss 19) that always answers one class.
        assert!(flag(&[19.0, 19.0, 19.0], &[0.37, 0.37, 0.37]));
        // An over-confident but useful one (DP noise): loss above chance, accuracy 0.83.
        assert!(!flag(&[1.1, 1.2, 1.1], &[0.8, 0.83, 0.83]));
        assert!(chance_level_warning(&[ln2; 5], &[], 0.0, 0.0, 3).is_none());
    }
}
