//! The network of a [`ModelSpec`] in libtorch (an MLP, or a CNN: convolutions, ReLU and
//! max pooling before the dense layers): build it, load and export the flat parameter
//! vector in wire order, train locally (SGD or Adam, optional FedProx term) and evaluate.
//!
//! `tch::Tensor` is `Send` but not `Sync`: a [`Mlp`] lives on one thread. Callers in async
//! code run it on a blocking thread of its own.

use dpfl_common::config::{OptimizerKind, TrainConfig};
use dpfl_common::model::{Arch, ModelSpec, TensorSlot};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};

use crate::data::Dataset;

/// Errors from the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Parameter vector of the wrong length.
    #[error("parameter vector has {got} values, the model needs {expected}")]
    Length {
        /// Expected length.
        expected: usize,
        /// Received length.
        got: usize,
    },
    /// Data does not fit the model.
    #[error("data has {data} features per row, the model expects {model}")]
    Features {
        /// Features in the data.
        data: usize,
        /// Model inputs.
        model: usize,
    },
    /// A label outside the model's classes.
    #[error("label {label} is outside the model's {classes} classes")]
    Label {
        /// Offending label.
        label: i64,
        /// Number of outputs.
        classes: usize,
    },
    /// Device name not understood or unavailable.
    #[error("device {0:?}: use auto, cpu, cuda or cuda:N (CUDA must be available)")]
    Device(String),
    /// The operation does not support this architecture.
    #[error("{0}")]
    Unsupported(String),
    /// Training diverged (non-finite loss or parameters).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// libtorch error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Loads libtorch's CUDA backend (`libtorch_cuda.so`) into the process, once, where this
/// machine has an NVIDIA driver, and says whether it is loaded.
///
/// The backend registers itself with libtorch when its library is loaded, but nothing in
/// tch's API calls into it, so the linker's `--as-needed` leaves it out of every binary
/// and CUDA is never seen as available (`tch::Cuda::is_available()` stays false even on a
/// GPU machine). It is loaded here only when a device that may be CUDA is asked for and a
/// driver is there (`/dev/nvidiactl`, `/dev/nvidia0`, `/proc/driver/nvidia/version`, or
/// WSL's `/dev/dxg`): without one CUDA cannot be available, and the library (hundreds of
/// MB, ~0.1-0.4 s to load) would only cost a CPU node start-up time and memory. `false`
/// also with a CPU-only libtorch (no such library): then only `cpu` is available.
pub fn load_cuda() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| nvidia_driver_present() && load_cuda_library())
}

fn nvidia_driver_present() -> bool {
    [
        "/dev/nvidiactl",
        "/dev/nvidia0",
        "/proc/driver/nvidia/version",
        "/dev/dxg",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

/// [`load_cuda`] without its driver check (and without its once-only memory): maps the
/// `libtorch_cuda.so` that sits beside the `libtorch_cpu.so` this process loaded
/// (the same build: a backend of another torch version would register itself against a
/// mismatched ABI); by name (runpath, `LD_LIBRARY_PATH`) only when that directory cannot be
/// read. A binary calls it through [`parse_device`] at start-up, before any thread trains:
/// the backend registers its kernels with libtorch's dispatcher as it loads.
pub fn load_cuda_library() -> bool {
    let path = match libtorch_dir() {
        Some(dir) => {
            let p = dir.join("libtorch_cuda.so");
            if !p.exists() {
                return false; // a CPU-only libtorch
            }
            p
        }
        None => std::path::PathBuf::from("libtorch_cuda.so"),
    };
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path to the CUDA backend of the libtorch build this
    // process already runs (or the one the loader finds when that cannot be told), so its
    // initialisers register against the same ABI. The handle is never closed: the backend
    // stays mapped for the life of the process.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, read
        // before any other dl* call on this thread.
        let why = unsafe {
            let e = libc::dlerror();
            (!e.is_null()).then(|| std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned())
        };
        tracing::warn!(library = %path.display(), error = why.as_deref().unwrap_or("unknown"), "libtorch's CUDA backend did not load: CUDA unavailable");
        return false;
    }
    tracing::debug!(library = %path.display(), "libtorch CUDA backend loaded");
    true
}

/// The directory this process loaded `libtorch_cpu.so` from (read from /proc/self/maps).
pub fn libtorch_dir() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
}

/// A device as named (`auto`, `cpu`, `cuda` = `cuda:0`, `cuda:N`), before asking whether
/// this machine has it.
enum DeviceName {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceName {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda(0)),
            _ => s.strip_prefix("cuda:")?.parse().ok().map(Self::Cuda),
        }
    }
}

/// Whether `s` is a device name [`parse_device`] understands, available here or not (a
/// configuration is checked with it before the machine that runs it is known).
pub fn is_device_name(s: &str) -> bool {
    DeviceName::parse(s).is_some()
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` and `cuda*` load the CUDA backend
/// first ([`load_cuda`]).
pub fn parse_device(s: &str) -> Result<Device, ModelError> {
    let name = DeviceName::parse(s).ok_or_else(|| ModelError::Device(s.into()))?;
    if !matches!(name, DeviceName::Cpu) {
        load_cuda();
    }
    match name {
        DeviceName::Auto => Ok(Device::cuda_if_available()),
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(n) if i64::try_from(n).is_ok_and(|n| n < tch::Cuda::device_count()) => {
            Ok(Device::Cuda(n))
        }
        DeviceName::Cuda(_) => Err(ModelError::Device(s.into())),
    }
}

/// Human-readable device name for logs.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A data set resident on a device.
pub struct DeviceData {
    xs: Tensor,
    ys: Tensor,
    len: usize,
}

impl DeviceData {
    /// Copies a data set to `device`, checking it against the model spec.
    pub fn new(data: &Dataset, spec: &ModelSpec, device: Device) -> Result<Self, ModelError> {
        if data.dim != spec.inputs() {
            return Err(ModelError::Features {
                data: data.dim,
                model: spec.inputs(),
            });
        }
        if let Some(l) = data.labels.iter().find(|l| **l as usize >= spec.outputs()) {
            return Err(ModelError::Label {
                label: *l,
                classes: spec.outputs(),
            });
        }
        let n = data.len() as i64;
        let xs = Tensor::from_slice(&data.features)
            .view([n, data.dim as i64])
            .to_device(device);
        let ys = Tensor::from_slice(&data.labels).to_device(device);
        Ok(Self {
            xs,
            ys,
            len: data.len(),
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Result of local training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// `w_local - w_global` in wire order.
    pub delta: Vec<f32>,
    /// Mean loss over the steps.
    pub loss: f64,
    /// Training accuracy over the steps.
    pub accuracy: f64,
    /// Steps taken.
    pub steps: u64,
    /// Examples in the client's training set.
    pub num_examples: u64,
}

/// Result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOutcome {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Examples evaluated.
    pub num_examples: u64,
}

/// The network of a [`ModelSpec`] on one device (the name predates convolutions: a CNN
/// spec builds a CNN).
pub struct Mlp {
    spec: ModelSpec,
    vs: nn::VarStore,
    /// (weight, bias) per convolution, for the forward pass (empty for an MLP).
    convs: Vec<(Tensor, Tensor)>,
    /// `[channels, height, width]` the input rows are viewed as before the convolutions.
    image: Option<[i64; 3]>,
    /// Zero padding of every convolution (`kernel / 2`).
    padding: i64,
    /// (weight, bias) per dense layer, for the forward pass (empty for TorchScript).
    layers: Vec<(Tensor, Tensor)>,
    /// The TorchScript module whose parameters the var store holds.
    script: Option<tch::TrainableCModule>,
    /// All variables in wire order, with their slots.
    wire: Vec<(TensorSlot, Tensor)>,
}

impl Mlp {
    /// Builds the network (parameters zero until [`Mlp::load`]).
    pub fn new(spec: &ModelSpec, device: Device) -> Result<Self, ModelError> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut convs = Vec::new();
        for (i, (w, b)) in spec.conv_shapes().into_iter().enumerate() {
            let p = &root / ModelSpec::conv_name(i);
            let shape: Vec<i64> = w.iter().map(|d| *d as i64).collect();
            let weight = p.var("weight", &shape, nn::Init::Const(0.0));
            let bias = p.var("bias", &[b as i64], nn::Init::Const(0.0));
            convs.push((weight, bias));
        }
        let script = match &spec.arch {
            Arch::TorchScript { sha256, path, .. } => {
                let path = path.as_ref().ok_or_else(|| {
                    ModelError::Unsupported(format!(
                        "the model is {spec}: this process needs the module file (--model \
                         torchscript:PATH:INPUTS:CLASSES, or model.kind = \"torchscript\")"
                    ))
                })?;
                let bytes = std::fs::read(path)
                    .map_err(|e| ModelError::Unsupported(format!("{}: {e}", path.display())))?;
                if crate::torchscript::sha256(&bytes) != *sha256 {
                    return Err(ModelError::Unsupported(format!(
                        "{} is not the module of {spec} (its SHA-256 differs)",
                        path.display()
                    )));
                }
                let mut m = tch::TrainableCModule::load_data(&mut bytes.as_slice(), vs.root())?;
                m.f_set_train()?;
                Some(m)
            }
            _ => None,
        };
        let (image, padding) = match &spec.arch {
            Arch::Mlp | Arch::TorchScript { .. } => (None, 0),
            Arch::Cnn { input, kernel, .. } => (
                Some([input[0] as i64, input[1] as i64, input[2] as i64]),
                (*kernel / 2) as i64,
            ),
        };
        let mut layers = Vec::new();
        let dense = if spec.is_script() {
            0
        } else {
            spec.layers.len() - 1
        };
        for (i, w) in spec.layers.windows(2).take(dense).enumerate() {
            let p = &root / ModelSpec::layer_name(i);
            let weight = p.var("weight", &[w[1] as i64, w[0] as i64], nn::Init::Const(0.0));
            let bias = p.var("bias", &[w[1] as i64], nn::Init::Const(0.0));
            layers.push((weight, bias));
        }
        let vars = vs.variables();
        let mut wire = Vec::new();
        for slot in spec.layout() {
            // tch names a module's parameters with `_` for PyTorch's `.`.
            let key = match script {
                Some(_) => slot.name.replace('.', "_"),
                None => slot.name.clone(),
            };
            let t = vars.get(&key).ok_or_else(|| {
                ModelError::Diverged(format!("variable {} missing from the var store", slot.name))
            })?;
            wire.push((slot, t.shallow_clone()));
        }
        Ok(Self {
            spec: spec.clone(),
            vs,
            convs,
            image,
            padding,
            layers,
            script,
            wire,
        })
    }

    /// The spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Rows per forward pass when evaluating or predicting (the same in both, so both
    /// see the same logits).
    pub fn eval_batch_rows(&self) -> usize {
        // Convolutions hold far more activations per example than dense layers.
        if self.image.is_some() {
            512
        } else {
            4096
        }
    }

    /// Puts a TorchScript module in inference (`true`) or training mode (dropout, batch
    /// norm); the built-in networks behave the same in both.
    pub fn set_eval(&mut self, eval: bool) -> Result<(), ModelError> {
        if let Some(m) = &mut self.script {
            if eval {
                m.f_set_eval()?;
            } else {
                m.f_set_train()?;
            }
        }
        Ok(())
    }

    /// Logits for a batch (a TorchScript module's output must be `[batch, classes]`).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, ModelError> {
        if let Some(m) = &self.script {
            let out = m.forward_ts(&[xs])?;
            let n = xs.size().first().copied().unwrap_or(0);
            if out.size() != [n, self.spec.outputs() as i64] {
                return Err(ModelError::Unsupported(format!(
                    "the module's output has shape {:?}, expected [{n}, {}]",
                    out.size(),
                    self.spec.outputs()
                )));
            }
            return Ok(out);
        }
        let last = self.layers.len() - 1;
        let mut h = xs.shallow_clone();
        if let Some([c, hh, ww]) = self.image {
            h = h.view([-1, c, hh, ww]);
            for (w, b) in &self.convs {
                h = h
                    .conv2d(w, Some(b), [1, 1], [self.padding, self.padding], [1, 1], 1)
                    .relu()
                    .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
            h = h.flatten(1, -1);
        }
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.linear(w, Some(b));
            if i < last {
                h = h.relu();
            }
        }
        Ok(h)
    }

    /// Loads a flat parameter vector (wire order).
    pub fn load(&mut self, flat: &[f32]) -> Result<(), ModelError> {
        if flat.len() != self.spec.num_params() {
            return Err(ModelError::Length {
                expected: self.spec.num_params(),
                got: flat.len(),
            });
        }
        let device = self.device();
        let all = Tensor::from_slice(flat).to_device(device);
        tch::no_grad(|| {
            for (slot, t) in &mut self.wire {
                let shape: Vec<i64> = slot.shape.iter().map(|d| *d as i64).collect();
                let src = all
                    .narrow(0, slot.offset as i64, slot.len as i64)
                    .view(shape.as_slice());
                t.copy_(&src);
            }
        });
        Ok(())
    }

    /// Exports the parameters as a flat vector (wire order).
    pub fn to_flat(&self) -> Result<Vec<f32>, ModelError> {
        let parts: Vec<Tensor> = self.wire.iter().map(|(_, t)| t.detach().view(-1)).collect();
        let cat = Tensor::cat(&parts, 0).to_device(Device::Cpu).contiguous();
        let mut out = vec![0f32; self.spec.num_params()];
        cat.f_copy_data(&mut out, self.spec.num_params())?;
        Ok(out)
    }

    /// Trains from `global` on `data` as `cfg` says and returns the delta.
    pub fn train(
        &mut self,
        data: &DeviceData,
        cfg: &TrainConfig,
        global: &[f32],
    ) -> Result<TrainOutcome, ModelError> {
        self.load(global)?;
        let mut opt = match cfg.optimizer {
            OptimizerKind::Sgd => nn::Sgd {
                momentum: cfg.momentum,
                dampening: 0.0,
                wd: cfg.weight_decay,
                nesterov: false,
            }
            .build(&self.vs, cfg.lr)?,
            OptimizerKind::Adam => nn::Adam {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                wd: cfg.weight_decay,
                eps: 1e-8,
                amsgrad: false,
            }
            .build(&self.vs, cfg.lr)?,
        };
        let anchors: Vec<Tensor> = if cfg.prox_mu > 0.0 {
            self.wire.iter().map(|(_, t)| t.detach().copy()).collect()
        } else {
            Vec::new()
        };
        let device = self.device();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut order: Vec<i64> = (0..data.len as i64).collect();
        let batch = cfg.batch_size as usize;
        let max_steps = cfg.max_steps.map(u64::from).unwrap_or(u64::MAX);
        let mut steps = 0u64;
        let mut seen = 0u64;
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        // With max_steps, cycle through as many epochs as the step budget needs.
        let epochs = if cfg.max_steps.is_some() {
            u32::MAX
        } else {
            cfg.epochs
        };
        'outer: for _ in 0..epochs {
            if data.len == 0 || steps >= max_steps {
                break;
            }
            order.shuffle(&mut rng);
            // The epoch's order goes to the device in one copy and each step takes a slice
            // of it: a copy from pageable host memory per step would wait for the device
            // every step, so on CUDA the host could never queue ahead of the GPU.
            let order_t = Tensor::from_slice(&order).to_device(device);
            for (c, chunk) in order.chunks(batch).enumerate() {
                if steps >= max_steps {
                    break 'outer;
                }
                let idx = order_t.narrow(0, (c * batch) as i64, chunk.len() as i64);
                let xb = data.xs.index_select(0, &idx);
                let yb = data.ys.index_select(0, &idx);
                let logits = self.forward(&xb)?;
                let mut loss = logits.cross_entropy_for_logits(&yb);
                if cfg.prox_mu > 0.0 {
                    let mut prox = Tensor::zeros([], (Kind::Float, device));
                    for ((_, w), a) in self.wire.iter().zip(&anchors) {
                        prox += (w - a).square().sum(Kind::Float);
                    }
                    loss += prox * (cfg.prox_mu / 2.0);
                }
                opt.backward_step(&loss);
                tch::no_grad(|| {
                    loss_sum += loss.detach() * chunk.len() as f64;
                    correct += logits.argmax(-1, false).eq_tensor(&yb).sum(Kind::Int64);
                });
                steps += 1;
                seen += chunk.len() as u64;
            }
        }
        let loss = if seen > 0 {
            loss_sum.double_value(&[]) / seen as f64
        } else {
            0.0
        };
        let accuracy = if seen > 0 {
            correct.int64_value(&[]) as f64 / seen as f64
        } else {
            0.0
        };
        if !loss.is_finite() {
            return Err(ModelError::Diverged(format!("loss is {loss}")));
        }
        let mut delta = self.to_flat()?;
        for (d, g) in delta.iter_mut().zip(global) {
            *d -= *g;
        }
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Diverged("non-finite parameters".into()));
        }
        Ok(TrainOutcome {
            delta,
            loss,
            accuracy,
            steps,
            num_examples: data.len as u64,
        })
    }

    /// Evaluates `params` on `data`.
    pub fn evaluate(
        &mut self,
        data: &DeviceData,
        params: &[f32],
    ) -> Result<EvalOutcome, ModelError> {
        self.load(params)?;
        if data.len == 0 {
            return Ok(EvalOutcome {
                loss: 0.0,
                accuracy: 0.0,
                num_examples: 0,
            });
        }
        if let Some(m) = &mut self.script {
            m.f_set_eval()?;
        }
        let result = tch::no_grad(|| -> Result<(f64, i64), ModelError> {
            let mut loss = 0f64;
            let mut correct = 0i64;
            let n = data.len as i64;
            let mut start = 0i64;
            while start < n {
                // Convolutions hold far more activations per example than dense layers.
                let len = (n - start).min(self.eval_batch_rows() as i64);
                let xb = data.xs.narrow(0, start, len);
                let yb = data.ys.narrow(0, start, len);
                let logits = self.forward(&xb)?;
                loss += logits.cross_entropy_for_logits(&yb).double_value(&[]) * len as f64;
                correct += logits
                    .argmax(-1, false)
                    .eq_tensor(&yb)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                start += len;
            }
            Ok((loss, correct))
        });
        if let Some(m) = &mut self.script {
            m.f_set_train()?;
        }
        let (loss, correct) = result?;
        Ok(EvalOutcome {
            loss: loss / data.len as f64,
            accuracy: correct as f64 / data.len as f64,
            num_examples: data.len as u64,
        })
    }
}

/// Sets libtorch's intra-op thread count (several client processes on few cores each want 1).
pub fn set_threads(n: usize) {
    tch::set_num_threads(n.max(1) as i32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpfl_common::model::init_params;

    fn toy() -> (ModelSpec, Dataset) {
        // Two well-separated classes in 4 dimensions.
        let mut f = Vec::new();
        let mut l = Vec::new();
        for i in 0..200 {
            let c = i % 2;
            let s = if c == 0 { 1.0 } else { -1.0 };
            let j = (i as f32 * 0.37).sin() * 0.1;
            f.extend_from_slice(&[s + j, s - j, -s, 0.5 * s]);
            l.push(c as i64);
        }
        (
            ModelSpec::new(vec![4, 8, 2]).unwrap(),
            Dataset::new(f, l, 4).unwrap(),
        )
    }

    #[test]
    fn load_and_export_round_trip_in_wire_order() {
        let spec = ModelSpec::new(vec![3, 4, 2]).unwrap();
        let mut m = Mlp::new(&spec, Device::Cpu).unwrap();
        let flat: Vec<f32> = (0..spec.num_params()).map(|i| i as f32).collect();
        m.load(&flat).unwrap();
        assert_eq!(m.to_flat().unwrap(), flat);
        // fc0.bias comes first in wire order: the forward pass must read it as the bias.
        let zeros = Tensor::zeros([1, 3], (Kind::Float, Device::Cpu));
        let mut p = vec![0f32; spec.num_params()];
        p[0] = 1.0; // fc0.bias[0]
        let w1 = &spec.layout()[3]; // fc1.weight [2, 4]
        p[w1.offset] = 2.0; // fc1.weight[0][0]
        m.load(&p).unwrap();
        let out = Vec::<f32>::try_from(m.forward(&zeros).unwrap().view(-1)).unwrap();
        assert_eq!(out, vec![2.0, 0.0]);
        assert!(matches!(m.load(&[1.0]), Err(ModelError::Length { .. })));
    }

    #[test]
    fn training_learns_and_is_deterministic() {
        set_threads(1);
        let (spec, data) = toy();
        let dd = DeviceData::new(&data, &spec, Device::Cpu).unwrap();
        let init = init_params(&spec, 3);
        let cfg = TrainConfig {
            epochs: 5,
            batch_size: 16,
            lr: 0.1,
            ..TrainConfig::default()
        };
        let mut m = Mlp::new(&spec, Device::Cpu).unwrap();
        let before = m.evaluate(&dd, &init).unwrap();
        let out = m.train(&dd, &cfg, &init).unwrap();
        let trained: Vec<f32> = init.iter().zip(&out.delta).map(|(a, b)| a + b).collect();
        let after = m.evaluate(&dd, &trained).unwrap();
        assert!(after.accuracy > 0.95, "{after:?}");
        assert!(after.loss < before.loss);
        assert_eq!(out.steps, 5 * 13);
        let again = Mlp::new(&spec, Device::Cpu)
            .unwrap()
            .train(&dd, &cfg, &init)
            .unwrap();
        assert_eq!(again.delta, out.delta);
    }

    #[test]
    fn max_steps_and_adam_and_prox() {
        let (spec, data) = toy();
        let dd = DeviceData::new(&data, &spec, Device::Cpu).unwrap();
        let init = init_params(&spec, 3);
        let mut m = Mlp::new(&spec, Device::Cpu).unwrap();
        let cfg = TrainConfig {
            max_steps: Some(30),
            batch_size: 16,
            optimizer: OptimizerKind::Adam,
            lr: 0.01,
            ..TrainConfig::default()
        };
        assert_eq!(m.train(&dd, &cfg, &init).unwrap().steps, 30);
        let norm = |d: &[f32]| d.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let plain = TrainConfig {
            epochs: 5,
            lr: 0.2,
            ..TrainConfig::default()
        };
        let prox = TrainConfig {
            prox_mu: 1.0,
            ..plain.clone()
        };
        let d0 = norm(&m.train(&dd, &plain, &init).unwrap().delta);
        let d1 = norm(&m.train(&dd, &prox, &init).unwrap().delta);
        assert!(d1 < d0, "FedProx should stay closer: {d1} vs {d0}");
    }

    /// 1x8x8 images: class 0 is bright in the top half, class 1 in the bottom half, with
    /// a seeded speckle; no single pixel decides.
    fn toy_images() -> Dataset {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut f = Vec::new();
        let mut l = Vec::new();
        for i in 0..240 {
            let c = i % 2;
            for row in 0..8 {
                for _ in 0..8 {
                    let lit = (row < 4) == (c == 0);
                    let base = if lit { 0.6 } else { 0.0 };
                    f.push(base + rng.gen_range(0.0..0.5f32));
                }
            }
            l.push(c as i64);
        }
        Dataset::new(f, l, 64).unwrap()
    }

    #[test]
    fn a_cnn_trains_and_keeps_the_wire_order() {
        set_threads(1);
        let spec = ModelSpec::cnn([1, 8, 8], vec![4, 6], 3, &[8], 2).unwrap();
        let mut m = Mlp::new(&spec, Device::Cpu).unwrap();
        // Every variable is in the layout, in wire order, with libtorch's conv shapes.
        let flat: Vec<f32> = (0..spec.num_params()).map(|i| i as f32 * 1e-3).collect();
        m.load(&flat).unwrap();
        assert_eq!(m.to_flat().unwrap(), flat);
        assert_eq!(m.vs.variables().len(), spec.layout().len());
        // With every weight zero the logits are the last bias (conv biases pass through
        // ReLU and pooling into a zero dense layer).
        let mut p = vec![0f32; spec.num_params()];
        let last_bias = spec
            .layout()
            .iter()
            .find(|s| s.name == "fc1.bias")
            .unwrap()
            .offset;
        p[last_bias] = 3.0;
        p[last_bias + 1] = -1.0;
        m.load(&p).unwrap();
        let xs = Tensor::ones([2, 64], (Kind::Float, Device::Cpu));
        let out = Vec::<f32>::try_from(m.forward(&xs).unwrap().view(-1)).unwrap();
        assert_eq!(out, vec![3.0, -1.0, 3.0, -1.0]);

        let data = toy_images();
        let dd = DeviceData::new(&data, &spec, Device::Cpu).unwrap();
        let init = init_params(&spec, 9);
        let cfg = TrainConfig {
            epochs: 8,
            batch_size: 16,
            lr: 0.1,
            momentum: 0.9,
            ..TrainConfig::default()
        };
        let before = m.evaluate(&dd, &init).unwrap();
        let out = m.train(&dd, &cfg, &init).unwrap();
        let trained: Vec<f32> = init.iter().zip(&out.delta).map(|(a, b)| a + b).collect();
        let after = m.evaluate(&dd, &trained).unwrap();
        assert!(after.accuracy > 0.95, "{before:?} -> {after:?}");
        assert!(after.loss < before.loss);
        let again = Mlp::new(&spec, Device::Cpu)
            .unwrap()
            .train(&dd, &cfg, &init)
            .unwrap();
        assert_eq!(again.delta, out.delta, "seeded training is deterministic");
        // An MLP of the same dense widths is another model: it takes 24 features, not 64.
        assert!(matches!(
            DeviceData::new(
                &data,
                &ModelSpec::new(spec.layers.clone()).unwrap(),
                Device::Cpu
            ),
            Err(ModelError::Features { .. })
        ));
    }

    #[test]
    fn data_that_does_not_fit_is_refused() {
        let (spec, data) = toy();
        let wide = ModelSpec::new(vec![5, 2]).unwrap();
        assert!(matches!(
            DeviceData::new(&data, &wide, Device::Cpu),
            Err(ModelError::Features { .. })
        ));
        let one_class = ModelSpec::new(vec![4, 1]).unwrap();
        assert!(matches!(
            DeviceData::new(&data, &one_class, Device::Cpu),
            Err(ModelError::Label { .. })
        ));
        let _ = spec;
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        for ok in ["auto", "cpu", "cuda", "cuda:0", "cuda:7"] {
            assert!(is_device_name(ok), "{ok}");
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda0", "CPU", ""] {
            assert!(!is_device_name(bad), "{bad}");
            assert!(
                matches!(parse_device(bad), Err(ModelError::Device(_))),
                "{bad}"
            );
        }
    }

    fn mapped(library: &str) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .any(|l| l.ends_with(library))
    }

    /// Without `load_cuda`, the linker's `--as-needed` keeps libtorch's CUDA backend out of
    /// the process, so a GPU is never seen. With a CUDA build of libtorch (setup.sh's
    /// torch wheel is one) the loader maps it; `auto` loads it where there is an NVIDIA
    /// driver and leaves CPU-only machines alone; without a GPU `auto` answers cpu and
    /// `cuda` is refused with a clear error.
    #[test]
    fn the_cuda_backend_that_as_needed_linking_left_out_is_loaded_where_a_driver_is() {
        let dir = libtorch_dir().expect("libtorch_cpu.so is mapped in a test binary");
        let cuda_build = dir.join("libtorch_cuda.so").exists();
        let dev = parse_device("auto").unwrap();
        assert_eq!(
            mapped("/libtorch_cuda.so"),
            cuda_build && nvidia_driver_present(),
            "auto must load the CUDA backend exactly where a driver can use it"
        );
        if tch::Cuda::is_available() {
            assert_eq!(dev, Device::Cuda(0));
        } else {
            assert_eq!(dev, Device::Cpu);
            assert!(matches!(parse_device("cuda"), Err(ModelError::Device(_))));
            assert!(matches!(parse_device("cuda:0"), Err(ModelError::Device(_))));
        }
        // The loader itself, driver or not, runs in its own process
        // (`ml/tests/cuda_backend.rs`): it registers kernels while nothing else trains.
    }
}
