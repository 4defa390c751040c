//! Aggregation rules: how the accepted client deltas of one round become one delta.
//!
//! - `mean`: weighted mean, **streaming**: each update is folded into a running sum as it
//!   arrives, so memory is O(parameters) whatever the number of clients. The sum is kept in
//!   f64: any f32 value times any u64 weight, summed over any number of clients, stays
//!   finite, so one update can never poison the sum of the others.
//! - `median`, `trimmed_mean`, `krum`, `multi_krum`: robust rules against poisoned updates.
//!   They need all updates of the round at once (O(clients x parameters) memory) and ignore
//!   example-count weights, as their definitions do.

use serde::{Deserialize, Serialize};

/// Which rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AggregatorKind {
    /// Weighted mean (FedAvg).
    #[default]
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise mean after dropping the `beta` fraction of largest and smallest values.
    TrimmedMean {
        /// Fraction trimmed at each end, in [0, 0.5).
        beta: f64,
    },
    /// Krum (Blanchard et al. 2017): the update closest to its `n - f - 2` neighbours.
    Krum {
        /// Number of Byzantine clients tolerated.
        f: usize,
    },
    /// Multi-Krum: the mean of the `m` best-scoring updates by the Krum score.
    MultiKrum {
        /// Byzantine clients tolerated.
        f: usize,
        /// Updates averaged.
        m: usize,
    },
}

impl AggregatorKind {
    /// Whether this rule folds updates as they arrive.
    pub fn is_streaming(&self) -> bool {
        matches!(self, AggregatorKind::Mean)
    }

    /// Range checks.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            AggregatorKind::TrimmedMean { beta } if !(0.0..0.5).contains(&beta) => {
                Err(format!("trimmed_mean beta must be in [0, 0.5), got {beta}"))
            }
            AggregatorKind::MultiKrum { m: 0, .. } => Err("multi_krum m must be >= 1".into()),
            _ => Ok(()),
        }
    }
}

/// Why a round cannot be aggregated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// No update arrived.
    #[error("no updates to aggregate")]
    Empty,
    /// An update of another length.
    #[error("update has {got} values, expected {expected}")]
    Length {
        /// Expected.
        expected: usize,
        /// Got.
        got: usize,
    },
    /// Krum needs more clients than `2f + 2`.
    #[error("krum with f = {f} needs more than {} updates, got {n}", 2 * f + 2)]
    TooFewForKrum {
        /// f.
        f: usize,
        /// Updates.
        n: usize,
    },
    /// A pre-summed aggregate (secure aggregation) given to a robust rule, which needs
    /// individual updates.
    #[error(
        "a robust aggregator needs individual updates; secure aggregation yields only their sum"
    )]
    NeedsIndividualUpdates,
}

/// Collects one round's updates under one rule.
#[derive(Debug, Clone)]
pub struct Accumulator {
    kind: AggregatorKind,
    len: usize,
    sum: Vec<f64>,
    weight: f64,
    buffered: Vec<Vec<f32>>,
    count: usize,
}

impl Accumulator {
    /// An empty accumulator for vectors of `len` values.
    pub fn new(kind: AggregatorKind, len: usize) -> Self {
        Self {
            kind,
            len,
            sum: if kind.is_streaming() {
                vec![0.0; len]
            } else {
                Vec::new()
            },
            weight: 0.0,
            buffered: Vec::new(),
            count: 0,
        }
    }

    /// Updates folded in so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Total weight folded in (mean only).
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Folds in one update with a weight (ignored by robust rules).
    pub fn add(&mut self, delta: Vec<f32>, weight: f64) -> Result<(), AggregateError> {
        if self.kind.is_streaming() {
            self.add_slice(&delta, weight)
        } else {
            self.check_len(&delta)?;
            self.count += 1;
            self.buffered.push(delta);
            Ok(())
        }
    }

    /// As [`Accumulator::add`] without taking ownership (robust rules copy the update).
    pub fn add_slice(&mut self, delta: &[f32], weight: f64) -> Result<(), AggregateError> {
        if !self.kind.is_streaming() {
            return self.add(delta.to_vec(), weight);
        }
        self.check_len(delta)?;
        self.count += 1;
        for (a, b) in self.sum.iter_mut().zip(delta) {
            *a += weight * *b as f64;
        }
        self.weight += weight;
        Ok(())
    }

    /// Folds in the sum of `count` updates, each with weight 1 (mean rule only: secure
    /// aggregation hands over nothing but the sum).
    pub fn add_sum(&mut self, sum: &[f64], count: usize) -> Result<(), AggregateError> {
        if !self.kind.is_streaming() {
            return Err(AggregateError::NeedsIndividualUpdates);
        }
        if sum.len() != self.len {
            return Err(AggregateError::Length {
                expected: self.len,
                got: sum.len(),
            });
        }
        for (a, b) in self.sum.iter_mut().zip(sum) {
            *a += *b;
        }
        self.count += count;
        self.weight += count as f64;
        Ok(())
    }

    fn check_len(&self, delta: &[f32]) -> Result<(), AggregateError> {
        if delta.len() != self.len {
            return Err(AggregateError::Length {
                expected: self.len,
                got: delta.len(),
            });
        }
        Ok(())
    }

    /// The weighted sum and total weight (mean rule only; robust rules return `None`).
    pub fn into_sum(self) -> Option<(Vec<f32>, f64)> {
        self.kind
            .is_streaming()
            .then(|| (self.sum.iter().map(|v| *v as f32).collect(), self.weight))
    }

    /// The aggregated delta under the rule.
    pub fn finish(self) -> Result<Vec<f32>, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        match self.kind {
            AggregatorKind::Mean => {
                let inv = if self.weight > 0.0 {
                    1.0 / self.weight
                } else {
                    0.0
                };
                Ok(self.sum.iter().map(|v| (v * inv) as f32).collect())
            }
            AggregatorKind::Median => Ok(coordinate_wise(&self.buffered, self.len, |col| {
                let n = col.len();
                if n % 2 == 1 {
                    col[n / 2]
                } else {
                    0.5 * (col[n / 2 - 1] + col[n / 2])
                }
            })),
            AggregatorKind::TrimmedMean { beta } => {
                let k = (beta * self.buffered.len() as f64).floor() as usize;
                Ok(coordinate_wise(&self.buffered, self.len, |col| {
                    let kept = &col[k..col.len() - k];
                    kept.iter().sum::<f32>() / kept.len() as f32
                }))
            }
            AggregatorKind::Krum { f } => {
                let best = krum_scores(&self.buffered, f)?;
                Ok(self.buffered[best[0]].clone())
            }
            AggregatorKind::MultiKrum { f, m } => {
                let best = krum_scores(&self.buffered, f)?;
                let chosen = &best[..m.min(best.len())];
                let mut out = vec![0f32; self.len];
                for &i in chosen {
                    add_scaled(&mut out, &self.buffered[i], 1.0);
                }
                let inv = 1.0 / chosen.len() as f32;
                out.iter_mut().for_each(|v| *v *= inv);
                Ok(out)
            }
        }
    }
}

/// `acc += w * x`, written so the compiler vectorises it.
pub fn add_scaled(acc: &mut [f32], x: &[f32], w: f32) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += w * b;
    }
}

fn coordinate_wise(updates: &[Vec<f32>], len: usize, f: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    let mut col = vec![0f32; updates.len()];
    (0..len)
        .map(|j| {
            for (c, u) in col.iter_mut().zip(updates) {
                *c = u[j];
            }
            col.sort_by(f32::total_cmp);
            f(&col)
        })
        .collect()
}

/// Indices of updates sorted by Krum score (best first).
fn krum_scores(updates: &[Vec<f32>], f: usize) -> Result<Vec<usize>, AggregateError> {
    let n = updates.len();
    if n <= 2 * f + 2 {
        return Err(AggregateError::TooFewForKrum { f, n });
    }
    let mut dist = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let d: f64 = updates[i]
                .iter()
                .zip(&updates[j])
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            dist[i][j] = d;
            dist[j][i] = d;
        }
    }
    let neighbours = n - f - 2;
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i][j]).collect();
            d.sort_by(f64::total_cmp);
            (d[..neighbours].iter().sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(scores.into_iter().map(|(_, i)| i).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: AggregatorKind, ups: &[(&[f32], f64)]) -> Result<Vec<f32>, AggregateError> {
        let mut acc = Accumulator::new(kind, ups[0].0.len());
        for (u, w) in ups {
            acc.add(u.to_vec(), *w)?;
        }
        acc.finish()
    }

    #[test]
    fn mean_is_weighted_by_examples() {
        // 3 examples at 1.0 and 1 example at 5.0 -> (3 + 5) / 4 = 2
        let out = run(
            AggregatorKind::Mean,
            &[(&[1.0, 0.0], 3.0), (&[5.0, 4.0], 1.0)],
        )
        .unwrap();
        assert_eq!(out, vec![2.0, 1.0]);
    }

    #[test]
    fn streaming_mean_keeps_no_updates() {
        let mut acc = Accumulator::new(AggregatorKind::Mean, 3);
        for _ in 0..100 {
            acc.add(vec![1.0; 3], 1.0).unwrap();
        }
        assert!(acc.buffered.is_empty());
        let (sum, w) = acc.into_sum().unwrap();
        assert_eq!((sum, w), (vec![100.0; 3], 100.0));
    }

    #[test]
    fn robust_rules_resist_an_outlier() {
        let ups: Vec<(&[f32], f64)> = vec![
            (&[1.0, 1.0], 1.0),
            (&[1.1, 0.9], 1.0),
            (&[0.9, 1.1], 1.0),
            (&[1.0, 1.05], 1.0),
            (&[1000.0, -1000.0], 1.0),
        ];
        let mean = run(AggregatorKind::Mean, &ups).unwrap();
        assert!(mean[0] > 100.0);
        let med = run(AggregatorKind::Median, &ups).unwrap();
        assert_eq!(med, vec![1.0, 1.0]);
        let tm = run(AggregatorKind::TrimmedMean { beta: 0.2 }, &ups).unwrap();
        assert!(
            (tm[0] - 1.0333).abs() < 1e-3 && (tm[1] - 1.0).abs() < 0.05,
            "{tm:?}"
        );
        let k = run(AggregatorKind::Krum { f: 1 }, &ups).unwrap();
        assert!(k[0] < 2.0);
        let mk = run(AggregatorKind::MultiKrum { f: 1, m: 3 }, &ups).unwrap();
        assert!((mk[0] - 1.0).abs() < 0.1, "{mk:?}");
        assert!(matches!(
            run(AggregatorKind::Krum { f: 2 }, &ups),
            Err(AggregateError::TooFewForKrum { .. })
        ));
    }

    #[test]
    fn one_huge_update_cannot_poison_the_sum() {
        // Audit: updates near f32::MAX overflowed the f32 sum to infinity and the whole
        // round was discarded. In f64 the honest part survives exactly.
        let mut acc = Accumulator::new(AggregatorKind::Mean, 2);
        acc.add(vec![f32::MAX, -f32::MAX], 1e12).unwrap();
        acc.add(vec![f32::MAX, -f32::MAX], 1e12).unwrap();
        assert!(acc.sum.iter().all(|v| v.is_finite()));
        let mut acc = Accumulator::new(AggregatorKind::Mean, 2);
        acc.add(vec![1.0, 2.0], 1.0).unwrap();
        acc.add(vec![3.0, 4.0], 1.0).unwrap();
        assert_eq!(acc.finish().unwrap(), vec![2.0, 3.0]);
    }

    #[test]
    fn wrong_length_and_empty_are_errors() {
        let mut acc = Accumulator::new(AggregatorKind::Mean, 3);
        assert!(matches!(
            acc.add(vec![1.0], 1.0),
            Err(AggregateError::Length { .. })
        ));
        assert_eq!(acc.finish(), Err(AggregateError::Empty));
    }
}
