//! The model specification server and clients agree on, and the flat parameter layout.
//!
//! A model is an MLP given by its layer sizes. Its parameters travel as one flat `f32`
//! vector in a fixed order: tensors sorted by name (`fc0.bias`, `fc0.weight`, ...), each
//! row-major. The spec hash covers the layer sizes, the activation and that order, so two
//! peers with the same hash lay out the same vector the same way.
//!
//! This module knows nothing of libtorch: `dpfl-ml` builds the network from a [`ModelSpec`]
//! and checks its variables against [`ModelSpec::layout`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// 32-byte SHA-256 digest identifying a model spec.
pub type SpecHash = [u8; 32];

/// Largest model the protocol accepts, in parameters (bounds every allocation made from a
/// peer-supplied spec).
pub const MAX_PARAMS: usize = 256 * 1024 * 1024;

/// An MLP: `layers[0]` inputs, hidden layers with ReLU, `layers.last()` output logits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Layer widths including input and output, e.g. `[784, 200, 200, 10]`.
    pub layers: Vec<usize>,
}

/// Why a model spec is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Fewer than two layers, or a zero width.
    #[error("model spec needs at least two layers of non-zero width, got {0:?}")]
    Shape(Vec<usize>),
    /// Parameter count above [`MAX_PARAMS`].
    #[error("model spec has {0} parameters, more than the limit of {MAX_PARAMS}")]
    TooLarge(usize),
}

/// One named tensor inside the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSlot {
    /// Variable name as libtorch's `VarStore` names it (`fc0.weight`).
    pub name: String,
    /// Shape (`[out, in]` for weights, `[out]` for biases).
    pub shape: Vec<usize>,
    /// Offset of the first element in the flat vector.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

impl Default for ModelSpec {
    /// The "2NN" of the FedAvg paper: 784-200-200-10.
    fn default() -> Self {
        Self {
            layers: vec![784, 200, 200, 10],
        }
    }
}

impl ModelSpec {
    /// Builds and validates a spec.
    pub fn new(layers: Vec<usize>) -> Result<Self, SpecError> {
        let spec = Self { layers };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks shape and size limits; call on every spec that came from a file or a peer.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.layers.len() < 2 || self.layers.contains(&0) {
            return Err(SpecError::Shape(self.layers.clone()));
        }
        let mut total: usize = 0;
        for w in self.layers.windows(2) {
            let n = w[0]
                .checked_mul(w[1])
                .and_then(|x| x.checked_add(w[1]))
                .ok_or(SpecError::TooLarge(usize::MAX))?;
            total = total
                .checked_add(n)
                .ok_or(SpecError::TooLarge(usize::MAX))?;
            if total > MAX_PARAMS {
                return Err(SpecError::TooLarge(total));
            }
        }
        Ok(())
    }

    /// Number of input features.
    pub fn inputs(&self) -> usize {
        self.layers[0]
    }

    /// Number of output classes.
    pub fn outputs(&self) -> usize {
        self.layers[self.layers.len() - 1]
    }

    /// Total parameter count (199,210 for the default).
    pub fn num_params(&self) -> usize {
        self.layers.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }

    /// Name of the linear layer `i` (`fc0`, `fc1`, ...).
    pub fn layer_name(i: usize) -> String {
        format!("fc{i}")
    }

    /// The tensors in wire order: sorted by name, each row-major.
    pub fn layout(&self) -> Vec<TensorSlot> {
        let mut named: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, w) in self.layers.windows(2).enumerate() {
            let base = Self::layer_name(i);
            named.push((format!("{base}.weight"), vec![w[1], w[0]]));
            named.push((format!("{base}.bias"), vec![w[1]]));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut offset = 0;
        named
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let slot = TensorSlot {
                    name,
                    shape,
                    offset,
                    len,
                };
                offset += len;
                slot
            })
            .collect()
    }

    /// SHA-256 over a canonical description (architecture, activation, wire order).
    pub fn hash(&self) -> SpecHash {
        let mut h = Sha256::new();
        h.update(b"dpfl-mlp-relu-v1");
        for slot in self.layout() {
            h.update(slot.name.as_bytes());
            h.update([0u8]);
            for d in &slot.shape {
                h.update((*d as u64).to_le_bytes());
            }
        }
        h.finalize().into()
    }
}

/// Deterministic initial parameters in wire order, as PyTorch's `nn.Linear` initialises
/// them: weights and biases uniform in `±1/sqrt(fan_in)`. Generated here rather than by
/// libtorch's global RNG so that the server and the simulator get the same start from the
/// same seed on any device, without libtorch.
pub fn init_params(spec: &ModelSpec, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let mut out = vec![0f32; spec.num_params()];
    // Initialise layer by layer (weights then biases) so the values do not depend on the
    // sorted wire order, then place them.
    let layout = spec.layout();
    for (i, w) in spec.layers.windows(2).enumerate() {
        let bound = 1.0 / (w[0] as f64).sqrt();
        for suffix in ["weight", "bias"] {
            let name = format!("{}.{suffix}", ModelSpec::layer_name(i));
            if let Some(slot) = layout.iter().find(|s| s.name == name) {
                for v in &mut out[slot.offset..slot.offset + slot.len] {
                    *v = rng.gen_range(-bound..bound) as f32;
                }
            }
        }
    }
    out
}

/// Short hex form of a hash for logs.
pub fn short_hex(hash: &SpecHash) -> String {
    hash[..6].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_2nn_with_199210_params() {
        assert_eq!(ModelSpec::default().num_params(), 199_210);
    }

    #[test]
    fn layout_is_sorted_contiguous_and_complete() {
        let spec = ModelSpec::new(vec![3, 4, 2]).unwrap();
        let names: Vec<_> = spec.layout().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight"]);
        let layout = spec.layout();
        assert_eq!(layout[0].offset, 0);
        assert_eq!(layout[1].offset, 4);
        assert_eq!(layout[1].shape, vec![4, 3]);
        assert_eq!(layout[2].offset, 16);
        assert_eq!(layout[3].offset, 18);
        let total: usize = layout.iter().map(|s| s.len).sum();
        assert_eq!(total, spec.num_params());
    }

    #[test]
    fn init_is_deterministic_and_bounded() {
        let spec = ModelSpec::new(vec![100, 10, 3]).unwrap();
        let a = init_params(&spec, 1);
        assert_eq!(a, init_params(&spec, 1));
        assert_ne!(a, init_params(&spec, 2));
        let w0 = &spec.layout()[1];
        assert!(a[w0.offset..w0.offset + w0.len]
            .iter()
            .all(|v| v.abs() <= 0.1));
        assert!(a.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn hash_depends_on_every_width() {
        let a = ModelSpec::new(vec![784, 200, 10]).unwrap().hash();
        let b = ModelSpec::new(vec![784, 201, 10]).unwrap().hash();
        let c = ModelSpec::new(vec![784, 200, 10]).unwrap().hash();
        assert_ne!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn rejects_degenerate_and_huge_specs() {
        assert!(matches!(ModelSpec::new(vec![5]), Err(SpecError::Shape(_))));
        assert!(matches!(
            ModelSpec::new(vec![5, 0, 2]),
            Err(SpecError::Shape(_))
        ));
        assert!(matches!(
            ModelSpec::new(vec![1 << 20, 1 << 20]),
            Err(SpecError::TooLarge(_))
        ));
        assert!(ModelSpec::new(vec![usize::MAX, 2]).is_err());
    }
}
