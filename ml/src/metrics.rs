//! Classification metrics beyond accuracy: ROC AUC and F1 for two classes.
//!
//! Pure functions over predictions and labels; class 1 is the positive class.

/// Fraction of `pred` equal to `labels` (0 for no rows).
pub fn accuracy(pred: &[i64], labels: &[i64]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len() as f64
}

/// Area under the ROC curve of `scores` for the positive class 1: the probability that a
/// random positive scores above a random negative, ties counting one half (the
/// Mann-Whitney statistic, computed from average ranks). `None` when either class is
/// absent.
pub fn binary_auc(scores: &[f64], labels: &[i64]) -> Option<f64> {
    let n = scores.len().min(labels.len());
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their average.
        let avg = (i + j + 2) as f64 / 2.0;
        for k in &idx[i..=j] {
            if labels[*k] == 1 {
                rank_sum_pos += avg;
            }
        }
        i = j + 1;
    }
    let pos = labels[..n].iter().filter(|l| **l == 1).count() as f64;
    let neg = n as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    Some((rank_sum_pos - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// F1 score of the positive class 1: `2 TP / (2 TP + FP + FN)`; 0 when there is no
/// positive in either the predictions or the labels.
pub fn binary_f1(pred: &[i64], labels: &[i64]) -> f64 {
    let (mut tp, mut fp, mut fneg) = (0u64, 0u64, 0u64);
    for (p, l) in pred.iter().zip(labels) {
        match (*p == 1, *l == 1) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fneg += 1,
            _ => {}
        }
    }
    let d = 2 * tp + fp + fneg;
    if d == 0 {
        0.0
    } else {
        2.0 * tp as f64 / d as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_hand_counted_pairs() {
        // Positives 0.8, 0.4; negatives 0.5, 0.1. Pairs (pos > neg): (0.8,0.5), (0.8,0.1),
        // (0.4,0.1) = 3 of 4: sklearn.metrics.roc_auc_score gives 0.75 as well.
        assert_eq!(binary_auc(&[0.8, 0.5, 0.4, 0.1], &[1, 0, 1, 0]), Some(0.75));
        // A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
        assert_eq!(binary_auc(&[0.9, 0.5, 0.5], &[1, 1, 0]), Some(0.75));
        assert_eq!(binary_auc(&[0.1, 0.2, 0.3], &[0, 1, 1]), Some(1.0));
        assert_eq!(binary_auc(&[0.3, 0.2], &[0, 1]), Some(0.0));
        assert_eq!(binary_auc(&[0.3, 0.2], &[1, 1]), None);
    }

    #[test]
    fn f1_and_accuracy() {
        // TP 2, FP 1, FN 1: F1 = 4 / 6.
        let pred = [1, 1, 1, 0, 0];
        let lab = [1, 1, 0, 1, 0];
        assert!((binary_f1(&pred, &lab) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(accuracy(&pred, &lab), 0.6);
        assert_eq!(binary_f1(&[0, 0], &[0, 0]), 0.0);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }
}
