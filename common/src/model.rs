//! The model specification server and clients agree on, and the flat parameter layout.
//!
//! A model is an MLP given by its layer sizes, optionally behind a stack of convolutions
//! ([`Arch::Cnn`]). Its parameters travel as one flat `f32` vector in a fixed order:
//! tensors sorted by name (`conv0.bias`, `conv0.weight`, ..., `fc0.bias`, `fc0.weight`,
//! ...), each row-major. The spec hash covers the architecture, the layer sizes, the
//! activation and that order, so two peers with the same hash lay out the same vector the
//! same way.
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

/// Most convolution layers a spec may have.
pub const MAX_CONV_LAYERS: usize = 8;

/// The fully connected layers (`layers[0]` inputs, hidden layers with ReLU,
/// `layers.last()` output logits) and what comes before them ([`Arch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Widths of the fully connected layers including input and output, e.g.
    /// `[784, 200, 200, 10]`. Behind convolutions, `layers[0]` is the flattened output of
    /// the last pooling (checked by [`ModelSpec::validate`]).
    pub layers: Vec<usize>,
    /// What precedes the fully connected layers (nothing for an MLP).
    #[serde(default)]
    pub arch: Arch,
}

/// The part of the network before the fully connected layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// None: the input row goes straight into `fc0`.
    #[default]
    Mlp,
    /// Convolutions on an image: each layer is a `kernel x kernel` convolution (stride 1,
    /// zero padding `kernel / 2`, so the size is kept), ReLU, then 2x2 max pooling
    /// (stride 2, rounding down). The input row is read as `[channels, height, width]`.
    Cnn {
        /// `[channels, height, width]` of one example.
        input: [usize; 3],
        /// Output channels of each convolution, e.g. `[32, 64]`.
        channels: Vec<usize>,
        /// Odd kernel size, e.g. 5.
        kernel: usize,
    },
    /// A TorchScript module (`torch.jit.script(m).save(path)`): `layers` is
    /// `[inputs, classes]` and the parameters are the module's, by their PyTorch names.
    TorchScript {
        /// SHA-256 of the module file: peers with another file have another spec hash.
        sha256: [u8; 32],
        /// The module's parameters (`fc1.weight`, ...) and shapes, sorted by name.
        params: Vec<(String, Vec<usize>)>,
        /// Where this process reads the module from; local, never sent nor hashed (a
        /// spec from a peer has none).
        #[serde(skip)]
        path: Option<std::path::PathBuf>,
    },
}

/// Most tensors a TorchScript spec may name.
pub const MAX_SCRIPT_TENSORS: usize = 256;

/// Why a model spec is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Fewer than two layers, or a zero width.
    #[error("model spec needs at least two layers of non-zero width, got {0:?}")]
    Shape(Vec<usize>),
    /// Parameter count above [`MAX_PARAMS`].
    #[error("model spec has {0} parameters, more than the limit of {MAX_PARAMS}")]
    TooLarge(usize),
    /// A convolution stack that cannot be built or does not meet the dense layers.
    #[error("convolutional model: {0}")]
    Cnn(String),
    /// A TorchScript parameter list that cannot be laid out.
    #[error("TorchScript model: {0}")]
    Script(String),
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
            arch: Arch::Mlp,
        }
    }
}

impl std::fmt::Display for ModelSpec {
    /// `mlp 784-200-200-10`, or `cnn 1x28x28 conv5 32-64 fc 3136-512-10`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dash = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("-")
        };
        match &self.arch {
            Arch::Mlp => write!(f, "mlp {}", dash(&self.layers)),
            Arch::Cnn {
                input,
                channels,
                kernel,
            } => write!(
                f,
                "cnn {}x{}x{} conv{kernel} {} fc {}",
                input[0],
                input[1],
                input[2],
                dash(channels),
                dash(&self.layers)
            ),
            Arch::TorchScript { sha256, params, .. } => write!(
                f,
                "torchscript sha256:{} ({} tensors, {} inputs, {} classes)",
                short_hex(sha256),
                params.len(),
                self.layers[0],
                self.outputs()
            ),
        }
    }
}

/// Why a `--model` argument cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseSpecError {
    /// Not one of the two forms.
    #[error("model {0:?}: expected mlp:W0,W1,...,CLASSES or cnn:CxHxW:CH1,CH2,...:KERNEL:HIDDEN,...,CLASSES")]
    Syntax(String),
    /// Well formed, but not a valid spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl std::str::FromStr for ModelSpec {
    type Err = ParseSpecError;

    /// Reads the form [`ModelSpec::to_arg`] writes: `mlp:784,200,200,10` or
    /// `cnn:1x28x28:32,64:5:512,10` (input, channels, kernel, then the dense widths after
    /// the convolutions: hidden ones and the classes).
    fn from_str(s: &str) -> Result<Self, ParseSpecError> {
        let syntax = || ParseSpecError::Syntax(s.to_string());
        let list = |v: &str, sep: char| {
            v.split(sep)
                .map(|x| x.trim().parse::<usize>().map_err(|_| syntax()))
                .collect::<Result<Vec<_>, _>>()
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        match parts.as_slice() {
            ["mlp", layers] => Ok(Self::new(list(layers, ',')?)?),
            ["cnn", input, channels, kernel, dense] => {
                let input: [usize; 3] = list(input, 'x')?.try_into().map_err(|_| syntax())?;
                let kernel = kernel.trim().parse::<usize>().map_err(|_| syntax())?;
                let dense = list(dense, ',')?;
                let (classes, hidden) = dense.split_last().ok_or_else(syntax)?;
                Ok(Self::cnn(
                    input,
                    list(channels, ',')?,
                    kernel,
                    hidden,
                    *classes,
                )?)
            }
            _ => Err(syntax()),
        }
    }
}

impl ModelSpec {
    /// The `--model` argument that gives this spec back (see the [`std::str::FromStr`] impl).
    pub fn to_arg(&self) -> String {
        let join = |v: &[usize], sep: &str| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(sep)
        };
        match &self.arch {
            Arch::Mlp => format!("mlp:{}", join(&self.layers, ",")),
            Arch::Cnn {
                input,
                channels,
                kernel,
            } => format!(
                "cnn:{}:{}:{kernel}:{}",
                join(input, "x"),
                join(channels, ","),
                join(&self.layers[1..], ",")
            ),
            Arch::TorchScript { path, .. } => format!(
                "torchscript:{}:{}:{}",
                path.as_ref()
                    .map_or("MODULE.pt".into(), |p| p.display().to_string()),
                self.layers[0],
                self.outputs()
            ),
        }
    }

    /// Builds and validates an MLP spec.
    pub fn new(layers: Vec<usize>) -> Result<Self, SpecError> {
        let spec = Self {
            layers,
            arch: Arch::Mlp,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Builds and validates a CNN: the convolutions of [`Arch::Cnn`], then fully connected
    /// layers of widths `hidden` (ReLU) and `classes` logits. The first dense layer's input
    /// width is derived from the convolutions.
    pub fn cnn(
        input: [usize; 3],
        channels: Vec<usize>,
        kernel: usize,
        hidden: &[usize],
        classes: usize,
    ) -> Result<Self, SpecError> {
        let flat = conv_output(input, &channels, kernel)?;
        let mut layers = vec![flat];
        layers.extend_from_slice(hidden);
        layers.push(classes);
        let spec = Self {
            layers,
            arch: Arch::Cnn {
                input,
                channels,
                kernel,
            },
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks shape and size limits; call on every spec that came from a file or a peer.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.layers.len() < 2 || self.layers.contains(&0) {
            return Err(SpecError::Shape(self.layers.clone()));
        }
        let mut total: usize = 0;
        if let Arch::TorchScript { params, .. } = &self.arch {
            if self.layers.len() != 2 {
                return Err(SpecError::Shape(self.layers.clone()));
            }
            if params.is_empty() || params.len() > MAX_SCRIPT_TENSORS {
                return Err(SpecError::Script(format!(
                    "{} tensors, expected 1 to {MAX_SCRIPT_TENSORS}",
                    params.len()
                )));
            }
            for (i, (name, shape)) in params.iter().enumerate() {
                if name.is_empty() || name.len() > 128 || shape.len() > 8 {
                    return Err(SpecError::Script(format!(
                        "tensor {i}: a name of 1 to 128 bytes and at most 8 dimensions"
                    )));
                }
                if i > 0 && params[i - 1].0 >= *name {
                    return Err(SpecError::Script(
                        "tensor names must be sorted and distinct".into(),
                    ));
                }
                let n = shape
                    .iter()
                    .try_fold(1usize, |a, d| a.checked_mul(*d))
                    .ok_or(SpecError::TooLarge(usize::MAX))?;
                total = total
                    .checked_add(n)
                    .ok_or(SpecError::TooLarge(usize::MAX))?;
                if total > MAX_PARAMS {
                    return Err(SpecError::TooLarge(total));
                }
            }
            return Ok(());
        }
        if let Arch::Cnn {
            input,
            channels,
            kernel,
        } = &self.arch
        {
            let flat = conv_output(*input, channels, *kernel)?;
            if flat != self.layers[0] {
                return Err(SpecError::Cnn(format!(
                    "the convolutions give {flat} features, the first dense layer takes {}",
                    self.layers[0]
                )));
            }
            let mut c_in = input[0];
            for c in channels {
                let n = c_in
                    .checked_mul(kernel * kernel)
                    .and_then(|x| x.checked_add(1))
                    .and_then(|x| x.checked_mul(*c))
                    .ok_or(SpecError::TooLarge(usize::MAX))?;
                total = total
                    .checked_add(n)
                    .ok_or(SpecError::TooLarge(usize::MAX))?;
                c_in = *c;
            }
            if total > MAX_PARAMS {
                return Err(SpecError::TooLarge(total));
            }
        }
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

    /// Number of input features (`channels * height * width` for a CNN).
    pub fn inputs(&self) -> usize {
        match &self.arch {
            Arch::Mlp | Arch::TorchScript { .. } => self.layers[0],
            Arch::Cnn { input, .. } => input.iter().product(),
        }
    }

    /// Whether this is a TorchScript module.
    pub fn is_script(&self) -> bool {
        matches!(self.arch, Arch::TorchScript { .. })
    }

    /// Whether this is a plain MLP.
    pub fn is_mlp(&self) -> bool {
        self.arch == Arch::Mlp
    }

    /// Number of output classes.
    pub fn outputs(&self) -> usize {
        self.layers[self.layers.len() - 1]
    }

    /// Total parameter count (199,210 for the default).
    pub fn num_params(&self) -> usize {
        if let Arch::TorchScript { params, .. } = &self.arch {
            return params
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
        }
        let conv: usize = self
            .conv_shapes()
            .iter()
            .map(|(w, b)| w.iter().product::<usize>() + b)
            .sum();
        conv + self
            .layers
            .windows(2)
            .map(|w| w[0] * w[1] + w[1])
            .sum::<usize>()
    }

    /// Name of the linear layer `i` (`fc0`, `fc1`, ...).
    pub fn layer_name(i: usize) -> String {
        format!("fc{i}")
    }

    /// Name of the convolution `i` (`conv0`, `conv1`, ...).
    pub fn conv_name(i: usize) -> String {
        format!("conv{i}")
    }

    /// Weight shape `[out, in, k, k]` and bias length of each convolution (none for an MLP).
    pub fn conv_shapes(&self) -> Vec<(Vec<usize>, usize)> {
        match &self.arch {
            Arch::Mlp | Arch::TorchScript { .. } => Vec::new(),
            Arch::Cnn {
                input,
                channels,
                kernel,
            } => {
                let mut c_in = input[0];
                channels
                    .iter()
                    .map(|c| {
                        let shape = vec![*c, c_in, *kernel, *kernel];
                        c_in = *c;
                        (shape, *c)
                    })
                    .collect()
            }
        }
    }

    /// The tensors in wire order: sorted by name, each row-major.
    pub fn layout(&self) -> Vec<TensorSlot> {
        let mut named: Vec<(String, Vec<usize>)> = Vec::new();
        if let Arch::TorchScript { params, .. } = &self.arch {
            named.extend(params.iter().cloned());
        }
        for (i, (w, b)) in self.conv_shapes().into_iter().enumerate() {
            let base = Self::conv_name(i);
            named.push((format!("{base}.weight"), w));
            named.push((format!("{base}.bias"), vec![b]));
        }
        let dense = if self.is_script() {
            0
        } else {
            self.layers.len() - 1
        };
        for (i, w) in self.layers.windows(2).take(dense).enumerate() {
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
        match &self.arch {
            // Unchanged since the first version: existing checkpoints and peers agree.
            Arch::Mlp => h.update(b"dpfl-mlp-relu-v1"),
            Arch::Cnn { input, kernel, .. } => {
                h.update(b"dpfl-cnn-relu-maxpool2-v1");
                for d in input.iter().chain([kernel]) {
                    h.update((*d as u64).to_le_bytes());
                }
            }
            // The file and the interface; the layout below adds names and shapes.
            Arch::TorchScript { sha256, .. } => {
                h.update(b"dpfl-torchscript-v1");
                h.update(sha256);
                for d in &self.layers {
                    h.update((*d as u64).to_le_bytes());
                }
            }
        }
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
    let conv = spec.conv_shapes();
    let fan_ins = conv
        .iter()
        .enumerate()
        .map(|(i, (w, _))| (ModelSpec::conv_name(i), w[1] * w[2] * w[3]))
        .chain(
            spec.layers
                .windows(2)
                .enumerate()
                .map(|(i, w)| (ModelSpec::layer_name(i), w[0])),
        );
    for (base, fan_in) in fan_ins {
        // PyTorch's default for both nn.Conv2d and nn.Linear.
        let bound = 1.0 / (fan_in as f64).sqrt();
        for suffix in ["weight", "bias"] {
            let name = format!("{base}.{suffix}");
            if let Some(slot) = layout.iter().find(|s| s.name == name) {
                for v in &mut out[slot.offset..slot.offset + slot.len] {
                    *v = rng.gen_range(-bound..bound) as f32;
                }
            }
        }
    }
    out
}

/// Features after the convolutions of [`Arch::Cnn`]: `channels.last() * h' * w'` where
/// every layer keeps the size and halves it by pooling (rounding down).
fn conv_output(input: [usize; 3], channels: &[usize], kernel: usize) -> Result<usize, SpecError> {
    let bad = |m: String| Err(SpecError::Cnn(m));
    if input.contains(&0) {
        return bad(format!("input {input:?} has a zero dimension"));
    }
    if channels.is_empty() || channels.len() > MAX_CONV_LAYERS || channels.contains(&0) {
        return bad(format!(
            "needs 1 to {MAX_CONV_LAYERS} convolutions of non-zero width, got {channels:?}"
        ));
    }
    if kernel.is_multiple_of(2) || kernel > 15 {
        return bad(format!("kernel must be odd and at most 15, got {kernel}"));
    }
    let (mut h, mut w) = (input[1], input[2]);
    for _ in channels {
        h /= 2;
        w /= 2;
    }
    if h == 0 || w == 0 {
        return bad(format!(
            "{} poolings leave nothing of a {}x{} image",
            channels.len(),
            input[1],
            input[2]
        ));
    }
    let flat = channels[channels.len() - 1]
        .checked_mul(h)
        .and_then(|x| x.checked_mul(w))
        .ok_or(SpecError::TooLarge(usize::MAX))?;
    if input
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .is_none()
    {
        return Err(SpecError::TooLarge(usize::MAX));
    }
    Ok(flat)
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

    #[test]
    fn mlp_hash_is_unchanged_by_the_arch_field() {
        // The hash of the 2NN before architectures existed (checkpoints and peers rely on it).
        let h = ModelSpec::default().hash();
        let mut old = Sha256::new();
        old.update(b"dpfl-mlp-relu-v1");
        for (name, shape) in [
            ("fc0.bias", vec![200u64]),
            ("fc0.weight", vec![200, 784]),
            ("fc1.bias", vec![200]),
            ("fc1.weight", vec![200, 200]),
            ("fc2.bias", vec![10]),
            ("fc2.weight", vec![10, 200]),
        ] {
            old.update(name.as_bytes());
            old.update([0u8]);
            for d in shape {
                old.update(d.to_le_bytes());
            }
        }
        let old: SpecHash = old.finalize().into();
        assert_eq!(h, old);
        assert_eq!(ModelSpec::default().to_string(), "mlp 784-200-200-10");
    }

    #[test]
    fn the_fedavg_cnn_has_the_papers_parameter_count() {
        // McMahan et al. 2017, "CNN" on 28x28x1: 1,663,370 parameters.
        let spec = ModelSpec::cnn([1, 28, 28], vec![32, 64], 5, &[512], 10).unwrap();
        assert_eq!(spec.layers, vec![3136, 512, 10]);
        assert_eq!(spec.num_params(), 1_663_370);
        assert_eq!(spec.inputs(), 784);
        assert_eq!(spec.outputs(), 10);
        let names: Vec<_> = spec.layout().iter().map(|s| s.name.clone()).collect();
        assert_eq!(
            names,
            [
                "conv0.bias",
                "conv0.weight",
                "conv1.bias",
                "conv1.weight",
                "fc0.bias",
                "fc0.weight",
                "fc1.bias",
                "fc1.weight"
            ]
        );
        assert_eq!(spec.layout()[1].shape, vec![32, 1, 5, 5]);
        assert_eq!(spec.layout()[3].shape, vec![64, 32, 5, 5]);
        let total: usize = spec.layout().iter().map(|s| s.len).sum();
        assert_eq!(total, spec.num_params());
        assert_eq!(init_params(&spec, 1).len(), spec.num_params());
        assert_eq!(spec.to_string(), "cnn 1x28x28 conv5 32-64 fc 3136-512-10");
    }

    #[test]
    fn model_arguments_round_trip() {
        for spec in [
            ModelSpec::default(),
            ModelSpec::new(vec![30, 16, 16, 2]).unwrap(),
            ModelSpec::cnn([1, 28, 28], vec![32, 64], 5, &[512], 10).unwrap(),
            ModelSpec::cnn([3, 32, 32], vec![8], 3, &[], 4).unwrap(),
        ] {
            assert_eq!(spec.to_arg().parse::<ModelSpec>().unwrap(), spec);
        }
        assert_eq!(
            "cnn:1x28x28:32,64:5:512,10"
                .parse::<ModelSpec>()
                .unwrap()
                .num_params(),
            1_663_370
        );
        for bad in [
            "",
            "mlp",
            "mlp:",
            "mlp:3,x",
            "cnn:1x28:8:5:10",
            "cnn:1x28x28:8:5:",
            "rnn:3,2",
        ] {
            assert!(
                matches!(bad.parse::<ModelSpec>(), Err(ParseSpecError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "mlp:5".parse::<ModelSpec>(),
            Err(ParseSpecError::Spec(SpecError::Shape(_)))
        ));
        assert!(matches!(
            "cnn:1x28x28:8:4:10".parse::<ModelSpec>(),
            Err(ParseSpecError::Spec(SpecError::Cnn(_)))
        ));
    }

    #[test]
    fn cnn_hash_covers_the_convolutions_and_the_input() {
        let a = ModelSpec::cnn([1, 28, 28], vec![16, 32], 5, &[128], 10).unwrap();
        let b = ModelSpec::cnn([1, 28, 28], vec![16, 32], 3, &[128], 10).unwrap();
        let c = ModelSpec::cnn([1, 29, 29], vec![16, 32], 5, &[128], 10).unwrap();
        let d = ModelSpec::cnn([1, 28, 28], vec![16, 33], 5, &[128], 10).unwrap();
        let mlp = ModelSpec::new(a.layers.clone()).unwrap();
        let hashes = [a.hash(), b.hash(), c.hash(), d.hash(), mlp.hash()];
        for i in 0..hashes.len() {
            for j in 0..i {
                assert_ne!(hashes[i], hashes[j], "{i} vs {j}");
            }
        }
        // 29x29 pools to 7x7 like 28x28: same parameters, different input, different hash.
        assert_eq!(a.num_params(), c.num_params());
    }

    #[test]
    fn a_torchscript_spec_is_its_file_and_its_sorted_parameters() {
        let spec = |sha: u8, params: Vec<(&str, Vec<usize>)>| ModelSpec {
            layers: vec![4, 2],
            arch: Arch::TorchScript {
                sha256: [sha; 32],
                params: params
                    .into_iter()
                    .map(|(n, s)| (n.to_string(), s))
                    .collect(),
                path: None,
            },
        };
        let a = spec(1, vec![("fc.bias", vec![2]), ("fc.weight", vec![2, 4])]);
        a.validate().unwrap();
        assert_eq!(a.num_params(), 10);
        assert_eq!(a.inputs(), 4);
        assert_eq!(a.outputs(), 2);
        let names: Vec<_> = a.layout().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["fc.bias", "fc.weight"]);
        assert_eq!(a.layout()[1].offset, 2);
        // The file, the names, the shapes and the interface are all in the hash; where this
        // process keeps the file is not.
        let mut here = a.clone();
        if let Arch::TorchScript { path, .. } = &mut here.arch {
            *path = Some("/tmp/m.pt".into());
        }
        assert_eq!(here.hash(), a.hash());
        assert_eq!(here.to_arg(), "torchscript:/tmp/m.pt:4:2");
        let b = spec(2, vec![("fc.bias", vec![2]), ("fc.weight", vec![2, 4])]);
        let c = spec(1, vec![("fc.bias", vec![2]), ("fc.weights", vec![2, 4])]);
        let d = spec(1, vec![("fc.bias", vec![2]), ("fc.weight", vec![4, 2])]);
        let mut e = a.clone();
        e.layers = vec![4, 3];
        for other in [&b, &c, &d, &e] {
            assert_ne!(other.hash(), a.hash(), "{other:?}");
        }
        assert!(a.to_string().starts_with("torchscript sha256:010101010101"));
        // Peers cannot announce unsorted, duplicate, empty or huge parameter lists.
        for bad in [
            spec(1, vec![("fc.weight", vec![2, 4]), ("fc.bias", vec![2])]),
            spec(1, vec![("w", vec![2]), ("w", vec![2])]),
            spec(1, vec![]),
            spec(1, vec![("", vec![2])]),
            spec(1, vec![("w", vec![1 << 20, 1 << 20])]),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let mut three = a.clone();
        three.layers = vec![4, 3, 2];
        assert!(three.validate().is_err());
    }

    #[test]
    fn bad_cnns_are_refused() {
        let cnn = |input, ch: Vec<usize>, k| ModelSpec::cnn(input, ch, k, &[8], 10);
        assert!(matches!(
            cnn([1, 28, 28], vec![], 5),
            Err(SpecError::Cnn(_))
        ));
        assert!(matches!(
            cnn([1, 28, 28], vec![4, 0], 5),
            Err(SpecError::Cnn(_))
        ));
        assert!(matches!(
            cnn([1, 28, 28], vec![4], 4),
            Err(SpecError::Cnn(_))
        ));
        assert!(matches!(
            cnn([0, 28, 28], vec![4], 5),
            Err(SpecError::Cnn(_))
        ));
        assert!(matches!(
            cnn([1, 3, 3], vec![4, 4], 3),
            Err(SpecError::Cnn(_))
        ));
        assert!(matches!(
            cnn([1, 28, 28], vec![4; 9], 1),
            Err(SpecError::Cnn(_))
        ));
        // A peer cannot announce dense layers that do not meet the convolutions.
        let mut spec = ModelSpec::cnn([1, 28, 28], vec![4], 5, &[8], 10).unwrap();
        spec.layers[0] += 1;
        assert!(matches!(spec.validate(), Err(SpecError::Cnn(_))));
        let huge = ModelSpec::cnn([1, 1 << 20, 1 << 20], vec![1 << 20], 15, &[8], 10);
        assert!(huge.is_err());
    }
}
