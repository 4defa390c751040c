//! The communication graph of a round: who shares keys and masks with whom.
//!
//! For degree k < n − 1 (k even) it is the Harary graph H(k, n) of Bell et al. 2020 on a
//! uniformly random permutation of the participants: the n participants sit on a ring in
//! permuted order and each is connected to the k/2 nodes before and the k/2 after it. With
//! k = n − 1 it is the complete graph of Bonawitz et al. 2017.
//!
//! The permutation is a Fisher–Yates shuffle of the participant indices (their positions
//! in the sorted participant list) driven by ChaCha20 keyed with the round's 32-byte
//! `graph_seed`, with unbiased rejection sampling written out here, so that a node
//! recomputes exactly the server's graph from the seed without relying on the shuffle of
//! any particular `rand` version.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// A k-regular graph over participant indices `0..n`.
#[derive(Debug, Clone)]
pub struct Graph {
    n: u32,
    degree: u32,
    /// Participant at each ring position.
    ring: Vec<u32>,
    /// Ring position of each participant.
    position: Vec<u32>,
}

/// Uniform integer in `0..=max` from 32-bit words (plain rejection sampling).
fn uniform_up_to(rng: &mut ChaCha20Rng, max: u32) -> u32 {
    let range = u64::from(max) + 1;
    // Largest multiple of `range` that fits in 2^32.
    let zone = (1u64 << 32) - (1u64 << 32) % range;
    loop {
        let v = u64::from(rng.next_u32());
        if v < zone {
            return (v % range) as u32;
        }
    }
}

impl Graph {
    /// The graph for `n` participants of degree `degree` from `seed`. The caller validates
    /// `n >= 3` and that `degree` is `n − 1` or even and below `n − 1` (see
    /// [`crate::RoundContext::validate`]); other values are clamped to the complete graph.
    pub fn new(n: u32, degree: u32, seed: &[u8; 32]) -> Self {
        let degree = if degree >= n.saturating_sub(1) || degree % 2 == 1 {
            n.saturating_sub(1)
        } else {
            degree
        };
        let mut ring: Vec<u32> = (0..n).collect();
        let mut rng = ChaCha20Rng::from_seed(*seed);
        for i in (1..ring.len()).rev() {
            let j = uniform_up_to(&mut rng, i as u32) as usize;
            ring.swap(i, j);
        }
        let mut position = vec![0u32; n as usize];
        for (pos, &node) in ring.iter().enumerate() {
            position[node as usize] = pos as u32;
        }
        Self {
            n,
            degree,
            ring,
            position,
        }
    }

    /// Number of participants.
    pub fn len(&self) -> u32 {
        self.n
    }

    /// Whether the graph has no participants.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Neighbours per node.
    pub fn degree(&self) -> u32 {
        self.degree
    }

    /// Participants in ring order (the permutation); neighbours are within k/2 ring steps.
    pub fn ring_order(&self) -> &[u32] {
        &self.ring
    }

    /// Whether every node is connected to every other.
    pub fn is_complete(&self) -> bool {
        self.degree + 1 >= self.n
    }

    /// The neighbours of participant `i` (never `i` itself), in increasing index order.
    /// Empty for an index out of range.
    pub fn neighbours(&self, i: u32) -> Vec<u32> {
        if i >= self.n {
            return Vec::new();
        }
        let mut out: Vec<u32> = if self.is_complete() {
            (0..self.n).filter(|&j| j != i).collect()
        } else {
            let p = self.position[i as usize];
            let half = self.degree / 2;
            (1..=half)
                .flat_map(|d| [(p + d) % self.n, (p + self.n - d) % self.n])
                .map(|q| self.ring[q as usize])
                .collect()
        };
        out.sort_unstable();
        out
    }

    /// Whether `i` and `j` are distinct neighbours.
    pub fn are_neighbours(&self, i: u32, j: u32) -> bool {
        if i == j || i >= self.n || j >= self.n {
            return false;
        }
        if self.is_complete() {
            return true;
        }
        let (a, b) = (self.position[i as usize], self.position[j as usize]);
        let d = a.abs_diff(b);
        d.min(self.n - d) <= self.degree / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harary_graph_is_k_regular_symmetric_and_seeded() {
        for (n, k) in [(10u32, 4u32), (101, 12), (1000, 30), (31, 28)] {
            let g = Graph::new(n, k, &[9; 32]);
            assert_eq!(g.degree(), k);
            for i in 0..n {
                let nb = g.neighbours(i);
                assert_eq!(nb.len(), k as usize, "n={n} k={k} i={i}");
                assert!(!nb.contains(&i));
                for &j in &nb {
                    assert!(g.are_neighbours(i, j));
                    assert!(g.neighbours(j).contains(&i));
                }
                let count = (0..n).filter(|&j| g.are_neighbours(i, j)).count();
                assert_eq!(count, k as usize);
            }
            let again = Graph::new(n, k, &[9; 32]);
            assert_eq!(again.neighbours(3), g.neighbours(3));
            let other = Graph::new(n, k, &[10; 32]);
            assert_ne!(other.ring, g.ring);
        }
    }

    #[test]
    fn complete_graph_for_degree_n_minus_1() {
        let g = Graph::new(5, 4, &[0; 32]);
        assert!(g.is_complete());
        assert_eq!(g.neighbours(2), vec![0, 1, 3, 4]);
        assert!(g.neighbours(9).is_empty());
        assert!(!g.are_neighbours(2, 2));
    }

    #[test]
    fn permutation_is_roughly_uniform() {
        // Position of participant 0 over many seeds: each of 8 positions about 1/8.
        let mut counts = [0u32; 8];
        for s in 0..8000u32 {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&s.to_le_bytes());
            let g = Graph::new(8, 2, &seed);
            counts[g.position[0] as usize] += 1;
        }
        for c in counts {
            assert!((850..1150).contains(&c), "{counts:?}");
        }
    }
}
