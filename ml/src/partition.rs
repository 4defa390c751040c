//! Partitions of one data set across (virtual) clients: IID, Dirichlet(alpha) over labels,
//! label shards (the FedAvg paper's pathological non-IID split), and natural partitions
//! from a per-row group key. Each returns one index list per client; the same seed gives
//! the same partition.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How to split a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PartitionKind {
    /// Shuffle and cut into equal parts.
    Iid,
    /// Per class, client proportions drawn from Dirichlet(alpha): small alpha, few labels per client.
    Dirichlet {
        /// Concentration.
        alpha: f64,
    },
    /// Sort by label, cut into `clients * shards_per_client` shards, deal `shards_per_client` to each.
    Shards {
        /// Shards (so at most this many labels) per client.
        shards_per_client: usize,
    },
    /// One client per distinct value of a CSV column.
    Natural {
        /// Column naming the client.
        column: String,
    },
}

/// Errors building a partition.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    /// Not enough examples for the clients asked for.
    #[error("cannot give {clients} clients at least one example each from {examples} examples")]
    TooFewExamples {
        /// Clients.
        clients: usize,
        /// Examples.
        examples: usize,
    },
    /// Bad parameter.
    #[error("{0}")]
    Invalid(String),
}

/// IID: a seeded shuffle cut into `clients` nearly equal parts.
pub fn iid(n: usize, clients: usize, seed: u64) -> Result<Vec<Vec<usize>>, PartitionError> {
    if clients == 0 || n < clients {
        return Err(PartitionError::TooFewExamples {
            clients,
            examples: n,
        });
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    Ok((0..clients)
        .map(|c| idx[n * c / clients..n * (c + 1) / clients].to_vec())
        .collect())
}

/// IID with a fixed number of examples per client, drawn without replacement while the
/// data lasts and then from fresh shuffles (so with `clients * per_client > n` examples
/// repeat across clients: a synthetic enlargement of the data set, never within a client).
pub fn iid_fixed(
    n: usize,
    clients: usize,
    per_client: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if n == 0 || per_client == 0 || per_client > n {
        return Err(PartitionError::Invalid(format!(
            "examples_per_client must be in 1..={n}, got {per_client}"
        )));
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut pool: Vec<usize> = Vec::new();
    let mut out = Vec::with_capacity(clients);
    for _ in 0..clients {
        if pool.len() < per_client {
            let mut fresh: Vec<usize> = (0..n).collect();
            fresh.shuffle(&mut rng);
            // Remaining examples first, so each pass uses every example once.
            fresh.retain(|i| !pool.contains(i));
            pool.extend(fresh);
        }
        out.push(pool.drain(..per_client).collect());
    }
    Ok(out)
}

fn by_label(labels: &[i64]) -> BTreeMap<i64, Vec<usize>> {
    let mut m: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        m.entry(*l).or_default().push(i);
    }
    m
}

/// Dirichlet(alpha) over labels (Hsu et al. 2019): for each class, split its examples
/// across clients in proportions drawn from Dirichlet(alpha). Redraws (up to 100 times)
/// until every client has at least `min_size` examples.
pub fn dirichlet(
    labels: &[i64],
    clients: usize,
    alpha: f64,
    min_size: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::Invalid(format!(
            "alpha must be > 0, got {alpha}"
        )));
    }
    if clients == 0 || labels.len() < clients * min_size.max(1) {
        return Err(PartitionError::TooFewExamples {
            clients,
            examples: labels.len(),
        });
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| PartitionError::Invalid(e.to_string()))?;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let classes = by_label(labels);
    for _ in 0..100 {
        let mut parts = vec![Vec::new(); clients];
        for idx in classes.values() {
            let mut idx = idx.clone();
            idx.shuffle(&mut rng);
            let w: Vec<f64> = (0..clients)
                .map(|_| gamma.sample(&mut rng).max(1e-300))
                .collect();
            let total: f64 = w.iter().sum();
            let mut start = 0usize;
            let mut acc = 0.0;
            for (c, wc) in w.iter().enumerate() {
                acc += wc / total;
                let end = if c + 1 == clients {
                    idx.len()
                } else {
                    ((acc * idx.len() as f64).round() as usize).min(idx.len())
                };
                parts[c].extend_from_slice(&idx[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if parts.iter().all(|p| p.len() >= min_size) {
            for p in &mut parts {
                p.shuffle(&mut rng);
            }
            return Ok(parts);
        }
    }
    Err(PartitionError::Invalid(format!(
        "Dirichlet({alpha}) left a client with fewer than {min_size} examples in 100 draws; use fewer clients or a larger alpha"
    )))
}

/// Label shards: sort by label (ties in seeded random order), cut into
/// `clients * shards_per_client` equal shards, give each client `shards_per_client` of them.
pub fn shards(
    labels: &[i64],
    clients: usize,
    shards_per_client: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let total = clients * shards_per_client;
    if shards_per_client == 0 || total == 0 || labels.len() < total {
        return Err(PartitionError::TooFewExamples {
            clients,
            examples: labels.len(),
        });
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..labels.len()).collect();
    idx.shuffle(&mut rng);
    idx.sort_by_key(|i| labels[*i]);
    let n = idx.len();
    let mut shard_ids: Vec<usize> = (0..total).collect();
    shard_ids.shuffle(&mut rng);
    Ok(shard_ids
        .chunks(shards_per_client)
        .map(|ids| {
            ids.iter()
                .flat_map(|s| idx[n * s / total..n * (s + 1) / total].iter().copied())
                .collect()
        })
        .collect())
}

/// One client per distinct key, in key order.
pub fn natural(keys: &[String]) -> Vec<(String, Vec<usize>)> {
    let mut m: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        m.entry(k.as_str()).or_default().push(i);
    }
    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Number of distinct labels in a client's part.
pub fn label_count(labels: &[i64], part: &[usize]) -> usize {
    let mut seen: Vec<i64> = part.iter().map(|i| labels[*i]).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// Mean total-variation distance between each client's label distribution and the
/// global one (0 = IID; close to 1 = every client sees other labels).
pub fn label_skew(labels: &[i64], parts: &[Vec<usize>]) -> f64 {
    let classes = labels.iter().max().map_or(0, |m| *m as usize + 1);
    let mut global = vec![0f64; classes];
    for l in labels {
        global[*l as usize] += 1.0 / labels.len() as f64;
    }
    let mut total = 0.0;
    for p in parts {
        let mut local = vec![0f64; classes];
        for i in p {
            local[labels[*i] as usize] += 1.0 / p.len().max(1) as f64;
        }
        total += 0.5
            * local
                .iter()
                .zip(&global)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
    }
    total / parts.len().max(1) as f64
}

/// A random seed derived from a base seed and a purpose, for independent streams.
pub fn derive_seed(base: u64, purpose: u64) -> u64 {
    ChaCha20Rng::seed_from_u64(base ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15)).gen()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<i64> {
        (0..n).map(|i| (i % 10) as i64).collect()
    }

    fn sizes_sum_and_disjoint(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        assert_eq!(all.len(), n);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "overlapping parts");
    }

    #[test]
    fn iid_covers_and_is_reproducible() {
        let p = iid(10_003, 10, 1).unwrap();
        sizes_sum_and_disjoint(&p, 10_003);
        assert_eq!(p, iid(10_003, 10, 1).unwrap());
        assert_ne!(p, iid(10_003, 10, 2).unwrap());
        assert!(label_skew(&labels(10_003), &p) < 0.1);
    }

    #[test]
    fn dirichlet_small_alpha_is_skewed_large_alpha_is_not() {
        let l = labels(6000);
        let skewed = dirichlet(&l, 20, 0.1, 5, 3).unwrap();
        sizes_sum_and_disjoint(&skewed, 6000);
        let flat = dirichlet(&l, 20, 1000.0, 5, 3).unwrap();
        let (s, f) = (label_skew(&l, &skewed), label_skew(&l, &flat));
        assert!(s > 0.5 && f < 0.1, "skew {s} vs {f}");
        assert_eq!(skewed, dirichlet(&l, 20, 0.1, 5, 3).unwrap());
    }

    #[test]
    fn shards_give_at_most_k_labels() {
        let l = labels(6000);
        let p = shards(&l, 50, 2, 9).unwrap();
        sizes_sum_and_disjoint(&p, 6000);
        assert!(p.iter().all(|c| label_count(&l, c) <= 2));
        assert_eq!(p, shards(&l, 50, 2, 9).unwrap());
    }

    #[test]
    fn fixed_size_clients_enlarge_by_resampling_without_repeats_inside_a_client() {
        let p = iid_fixed(100, 30, 10, 4).unwrap();
        assert_eq!(p.len(), 30);
        for c in &p {
            let mut s = c.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), 10);
        }
        // The first 10 clients use each example exactly once.
        sizes_sum_and_disjoint(&p[..10], 100);
        assert_eq!(p, iid_fixed(100, 30, 10, 4).unwrap());
    }

    #[test]
    fn natural_groups_by_key() {
        let keys: Vec<String> = ["b", "a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let p = natural(&keys);
        assert_eq!(
            p,
            vec![
                ("a".into(), vec![1]),
                ("b".into(), vec![0, 2]),
                ("c".into(), vec![3])
            ]
        );
    }

    #[test]
    fn impossible_requests_are_errors() {
        assert!(iid(5, 10, 0).is_err());
        assert!(shards(&labels(10), 10, 2, 0).is_err());
        assert!(dirichlet(&labels(100), 10, 0.0, 1, 0).is_err());
    }
}
