//! Batched multi-client training: the K virtual clients of one simulated round trained
//! together as one batched model, so that a mini-batch step costs one set of libtorch
//! calls for all K clients instead of K sets.
//!
//! Every client's weights are stacked into `[K, out, in]` and `[K, out]` tensors and the
//! forward pass is a batched matrix multiply (`baddbmm`). Each client keeps everything that
//! makes its training its own, so the result equals [`Mlp::train`](crate::Mlp::train) run
//! client by client up to float rounding:
//!
//! - its data order: the same seeded shuffle of its own examples as the sequential loop;
//! - its loss: the mean cross-entropy over its own mini-batch (a padded, masked batch when
//!   clients' batches differ in size), plus its own FedProx term;
//! - its optimizer state: SGD (momentum, weight decay, as `torch::optim::SGD`, no Nesterov)
//!   and Adam (L2 weight decay, as `torch::optim::Adam`) are written out here per client;
//! - its number of steps: clients are sorted by step count, so the clients still training
//!   at step `t` are a prefix of the stack and only that prefix is computed and updated.
//!
//! Since the summed loss of independent clients has, for each client's weights, exactly
//! that client's gradient, one backward pass serves all K.
//!
//! It does not clip or add noise: per-client deltas come back as [`TrainOutcome`]s and go
//! through the same privatization as sequentially trained ones. It knows nothing about
//! rounds or the network.

use dpfl_common::config::{OptimizerKind, TrainConfig};
use dpfl_common::model::{ModelSpec, TensorSlot};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::model::{ModelError, TrainOutcome};

/// The examples of K clients, concatenated on one device.
pub struct BatchedData {
    xs: Tensor,
    ys: Tensor,
    /// First row of each client in `xs`.
    offsets: Vec<usize>,
    /// Rows per client.
    lens: Vec<usize>,
}

impl BatchedData {
    /// Gathers the rows `parts[k]` of `data` for every client k onto `device` (one copy),
    /// checking them against the model spec.
    pub fn new(
        data: &Dataset,
        parts: &[&[usize]],
        spec: &ModelSpec,
        device: Device,
    ) -> Result<Self, ModelError> {
        if data.dim != spec.inputs() {
            return Err(ModelError::Features {
                data: data.dim,
                model: spec.inputs(),
            });
        }
        let all: Vec<usize> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let sub = data.subset(&all);
        if let Some(l) = sub.labels.iter().find(|l| **l as usize >= spec.outputs()) {
            return Err(ModelError::Label {
                label: *l,
                classes: spec.outputs(),
            });
        }
        let n = sub.len() as i64;
        let xs = Tensor::from_slice(&sub.features)
            .view([n, sub.dim as i64])
            .to_device(device);
        let ys = Tensor::from_slice(&sub.labels).to_device(device);
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        let offsets = lens
            .iter()
            .scan(0usize, |acc, l| {
                let o = *acc;
                *acc += l;
                Some(o)
            })
            .collect();
        Ok(Self {
            xs,
            ys,
            offsets,
            lens,
        })
    }

    /// Number of clients.
    pub fn clients(&self) -> usize {
        self.lens.len()
    }
}

/// One client's mini-batches for a round, in the order the sequential loop takes them
/// (row indices local to the client). Identical to [`Mlp::train`](crate::Mlp::train)'s
/// schedule: a fresh seeded shuffle per epoch, or as many epochs as `max_steps` needs.
pub fn schedule(len: usize, cfg: &TrainConfig) -> Vec<Vec<i64>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<i64> = (0..len as i64).collect();
    let batch = cfg.batch_size.max(1) as usize;
    let max_steps = cfg.max_steps.map(u64::from).unwrap_or(u64::MAX);
    let epochs = if cfg.max_steps.is_some() {
        u32::MAX
    } else {
        cfg.epochs
    };
    let mut out = Vec::new();
    if len == 0 {
        return out;
    }
    'outer: for _ in 0..epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            if out.len() as u64 >= max_steps {
                break 'outer;
            }
            out.push(chunk.to_vec());
        }
    }
    out
}

/// Per-parameter optimizer state, stacked over clients like the weights.
enum OptState {
    Sgd { momentum: Option<Tensor> },
    Adam { m: Tensor, v: Tensor },
}

/// One stacked parameter (`[K, ...]`) with its wire slot and optimizer state.
struct Param {
    slot: TensorSlot,
    /// A weight stored as `[K, in, out]` (its slot says `[out, in]`).
    transposed: bool,
    /// `[K, ...]`, no autograd.
    value: Tensor,
    /// The global value `[1, ...]` (FedProx anchor, delta base).
    global: Tensor,
    state: OptState,
}

/// Trains K clients from `global` as `cfg` says, one batched model for all of them, and
/// returns each client's outcome in the order of `data`'s clients. A client whose training
/// diverged gets its own error, as it would sequentially; an error for the whole call means
/// the batch could not be set up or run.
pub fn train_batched(
    spec: &ModelSpec,
    data: &BatchedData,
    cfg: &TrainConfig,
    global: &[f32],
    device: Device,
) -> Result<Vec<Result<TrainOutcome, ModelError>>, ModelError> {
    if !spec.is_mlp() {
        return Err(ModelError::Unsupported(format!(
            "batched training handles MLPs only, not {spec}"
        )));
    }
    if global.len() != spec.num_params() {
        return Err(ModelError::Length {
            expected: spec.num_params(),
            got: global.len(),
        });
    }
    let k = data.clients();
    if k == 0 {
        return Ok(Vec::new());
    }
    // Schedules, clients sorted by step count (descending, stable) so the clients still
    // training at any step are a prefix of the stack.
    let schedules: Vec<Vec<Vec<i64>>> = data.lens.iter().map(|l| schedule(*l, cfg)).collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by_key(|c| std::cmp::Reverse(schedules[*c].len()));
    let total_steps = schedules[order[0]].len();
    let b = schedules
        .iter()
        .flat_map(|s| s.iter().map(Vec::len))
        .max()
        .unwrap_or(1)
        .max(1);
    // Row indices [T, K, B] into data.xs (padding points at row 0 with weight 0),
    // weights [T, K, B] (1/n for a client's n real rows), rows per client and step.
    let mut idx = vec![0i64; total_steps * k * b];
    let mut weight = vec![0f32; total_steps * k * b];
    let mut rows = vec![0f32; total_steps * k];
    let mut active = vec![0usize; total_steps];
    for (slot, &c) in order.iter().enumerate() {
        for (t, chunk) in schedules[c].iter().enumerate() {
            active[t] = active[t].max(slot + 1);
            rows[t * k + slot] = chunk.len() as f32;
            let base = (t * k + slot) * b;
            for (j, r) in chunk.iter().enumerate() {
                idx[base + j] = data.offsets[c] as i64 + r;
                weight[base + j] = 1.0 / chunk.len() as f32;
            }
        }
    }
    let (ti, ki, bi) = (total_steps as i64, k as i64, b as i64);
    let idx = Tensor::from_slice(&idx)
        .view([ti, ki, bi])
        .to_device(device);
    let weight = Tensor::from_slice(&weight)
        .view([ti, ki, bi])
        .to_device(device);
    let rows_t = Tensor::from_slice(&rows).view([ti, ki]).to_device(device);

    // Stacked parameters, initialised to the global model.
    let global_t = Tensor::from_slice(global).to_device(device);
    let mut params: Vec<Param> = spec
        .layout()
        .into_iter()
        .map(|slot| {
            let mut shape: Vec<i64> = vec![1];
            shape.extend(slot.shape.iter().map(|d| *d as i64));
            let mut g = global_t
                .narrow(0, slot.offset as i64, slot.len as i64)
                .view(shape.as_slice());
            // Weights are kept as [K, in, out], so the forward pass multiplies contiguous
            // matrices; the wire order is restored on export.
            let transposed = slot.shape.len() == 2;
            if transposed {
                g = g.transpose(1, 2);
            }
            let mut kshape = g.size();
            kshape[0] = ki;
            // A copy of its own: with K = 1 `contiguous` would alias the global.
            let value = g.expand(kshape.as_slice(), false).copy();
            let state = match cfg.optimizer {
                OptimizerKind::Sgd => OptState::Sgd {
                    momentum: (cfg.momentum != 0.0).then(|| value.zeros_like()),
                },
                OptimizerKind::Adam => OptState::Adam {
                    m: value.zeros_like(),
                    v: value.zeros_like(),
                },
            };
            Param {
                slot,
                transposed,
                value,
                global: g,
                state,
            }
        })
        .collect();
    // Layer l's (weight, bias) positions in `params`.
    let layers: Vec<(usize, usize)> = (0..spec.layers.len() - 1)
        .map(|i| {
            let base = ModelSpec::layer_name(i);
            let find = |n: String| {
                params.iter().position(|p| p.slot.name == n).ok_or_else(|| {
                    ModelError::Diverged(format!("variable {n} missing from the layout"))
                })
            };
            Ok((
                find(format!("{base}.weight"))?,
                find(format!("{base}.bias"))?,
            ))
        })
        .collect::<Result<_, ModelError>>()?;

    let loss_sum = Tensor::zeros([ki], (Kind::Float, device));
    let correct = Tensor::zeros([ki], (Kind::Int64, device));
    let dim = data.xs.size()[1];
    for (t, &ka) in active.iter().enumerate() {
        let ka = ka as i64;
        let it = idx.get(t as i64).narrow(0, 0, ka);
        let wt = weight.get(t as i64).narrow(0, 0, ka);
        let nt = rows_t.get(t as i64).narrow(0, 0, ka);
        let flat = it.reshape([-1]);
        let xb = data.xs.index_select(0, &flat).view([ka, bi, dim]);
        let yb = data.ys.index_select(0, &flat).view([ka, bi]);
        // Fresh leaves over the active prefix (views of the stacked storage).
        let leaves: Vec<Tensor> = params
            .iter()
            .map(|p| p.value.narrow(0, 0, ka).detach().set_requires_grad(true))
            .collect();
        let last = layers.len() - 1;
        let mut h = xb;
        for (i, (w, bias)) in layers.iter().enumerate() {
            h = leaves[*bias]
                .unsqueeze(1)
                .baddbmm(&h, &leaves[*w], 1.0, 1.0);
            if i < last {
                h = h.relu();
            }
        }
        let logp = h.log_softmax(-1, Kind::Float);
        let nll = -logp.gather(2, &yb.unsqueeze(-1), false).squeeze_dim(-1);
        // Per-client mean over its own rows: [ka].
        let mut per_client = (nll * &wt).sum_dim_intlist(1, false, Kind::Float);
        if cfg.prox_mu > 0.0 {
            let mut prox = Tensor::zeros([ka], (Kind::Float, device));
            for (leaf, p) in leaves.iter().zip(&params) {
                let dims: Vec<i64> = (1..leaf.dim() as i64).collect();
                prox += (leaf - &p.global).square().sum_dim_intlist(
                    dims.as_slice(),
                    false,
                    Kind::Float,
                );
            }
            per_client += prox * (cfg.prox_mu / 2.0);
        }
        let total = per_client.sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[&total], &leaves, false, false)?;
        let step = (t + 1) as i32;
        tch::no_grad(|| {
            for ((leaf, p), g) in leaves.iter().zip(params.iter_mut()).zip(grads) {
                update(leaf, &mut p.state, g, cfg, ka, step);
            }
            let _ = loss_sum
                .narrow(0, 0, ka)
                .g_add_(&(per_client.detach() * &nt));
            let hits = h
                .argmax(-1, false)
                .eq_tensor(&yb)
                .logical_and(&wt.gt(0.0))
                .sum_dim_intlist(1, false, Kind::Int64);
            let _ = correct.narrow(0, 0, ka).g_add_(&hits);
        });
    }

    // Deltas [K, P] in wire order, client rows in the caller's order.
    let parts: Vec<Tensor> = params
        .iter()
        .map(|p| {
            if p.transposed {
                p.value.transpose(1, 2).reshape([ki, -1])
            } else {
                p.value.view([ki, -1])
            }
        })
        .collect();
    let stacked = Tensor::cat(&parts, 1) - global_t.unsqueeze(0);
    let mut inverse = vec![0i64; k];
    for (slot, &c) in order.iter().enumerate() {
        inverse[c] = slot as i64;
    }
    let inv = Tensor::from_slice(&inverse).to_device(device);
    let stacked = stacked
        .index_select(0, &inv)
        .to_device(Device::Cpu)
        .contiguous();
    let loss_sum = loss_sum.index_select(0, &inv).to_device(Device::Cpu);
    let correct = correct.index_select(0, &inv).to_device(Device::Cpu);
    let p = spec.num_params();
    let mut flat = vec![0f32; k * p];
    stacked.f_copy_data(&mut flat, k * p)?;
    let mut losses = vec![0f32; k];
    loss_sum.f_copy_data(&mut losses, k)?;
    let mut hits = vec![0i64; k];
    correct.f_copy_data(&mut hits, k)?;
    Ok(flat
        .chunks(p)
        .enumerate()
        .map(|(c, delta)| {
            let seen: usize = schedules[c].iter().map(Vec::len).sum();
            let (loss, accuracy) = if seen > 0 {
                (losses[c] as f64 / seen as f64, hits[c] as f64 / seen as f64)
            } else {
                (0.0, 0.0)
            };
            if !loss.is_finite() {
                return Err(ModelError::Diverged(format!("loss is {loss}")));
            }
            if delta.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::Diverged("non-finite parameters".into()));
            }
            Ok(TrainOutcome {
                delta: delta.to_vec(),
                loss,
                accuracy,
                steps: schedules[c].len() as u64,
                num_examples: data.lens[c] as u64,
            })
        })
        .collect())
}

/// One optimizer step on the active prefix `leaf` (a view of the stacked value), in place,
/// with the same arithmetic as libtorch's SGD and Adam.
fn update(
    leaf: &Tensor,
    state: &mut OptState,
    grad: Tensor,
    cfg: &TrainConfig,
    ka: i64,
    step: i32,
) {
    let mut d = if cfg.weight_decay != 0.0 {
        grad + leaf * cfg.weight_decay
    } else {
        grad
    };
    let mut w = leaf.shallow_clone();
    match state {
        OptState::Sgd { momentum } => {
            if let Some(buf) = momentum {
                let mut b = buf.narrow(0, 0, ka);
                let _ = b.g_mul_scalar_(cfg.momentum).g_add_(&d);
                let _ = w.g_sub_(&(&b * cfg.lr));
            } else {
                // `d` is this step's own gradient: scale it in place.
                let _ = d.g_mul_scalar_(cfg.lr);
                let _ = w.g_sub_(&d);
            }
        }
        OptState::Adam { m, v } => {
            let mut m = m.narrow(0, 0, ka);
            let mut v = v.narrow(0, 0, ka);
            let _ = m.g_mul_scalar_(cfg.beta1).g_add_(&(&d * (1.0 - cfg.beta1)));
            let _ = v
                .g_mul_scalar_(cfg.beta2)
                .g_add_(&(&d * &d * (1.0 - cfg.beta2)));
            let bc1 = 1.0 - cfg.beta1.powi(step);
            let bc2 = 1.0 - cfg.beta2.powi(step);
            let denom = v.sqrt() / bc2.sqrt() + 1e-8;
            let _ = w.g_add_(&(m / denom * (-cfg.lr / bc1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceData, Mlp};
    use dpfl_common::model::init_params;

    /// 120 rows of 6 features, 3 classes, deterministic and not linearly trivial.
    fn data() -> Dataset {
        let mut f = Vec::new();
        let mut l = Vec::new();
        for i in 0..120 {
            let c = (i * 7 % 3) as i64;
            for j in 0..6 {
                let x =
                    ((i * 13 + j * 5) as f32 * 0.61).sin() + if j as i64 == c { 0.8 } else { 0.0 };
                f.push(x);
            }
            l.push(c);
        }
        Dataset::new(f, l, 6).unwrap()
    }

    /// Client parts of unequal sizes (one empty, partial last batches, different steps).
    fn parts() -> Vec<Vec<usize>> {
        let sizes = [37usize, 0, 5, 50, 16, 12];
        let mut next = 0;
        sizes
            .iter()
            .map(|s| {
                // Interleaved rows, so clients do not hold contiguous blocks.
                let p: Vec<usize> = (0..*s).map(|j| (next + j * 3) % 120).collect();
                next += 1;
                p
            })
            .collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn check(cfg: &TrainConfig) {
        tch::set_num_threads(1);
        let spec = ModelSpec::new(vec![6, 9, 7, 3]).unwrap();
        let global = init_params(&spec, 11);
        let d = data();
        let parts = parts();
        let refs: Vec<&[usize]> = parts.iter().map(Vec::as_slice).collect();
        let bd = BatchedData::new(&d, &refs, &spec, Device::Cpu).unwrap();
        let batched = train_batched(&spec, &bd, cfg, &global, Device::Cpu).unwrap();
        assert_eq!(batched.len(), parts.len());
        let mut mlp = Mlp::new(&spec, Device::Cpu).unwrap();
        for (p, b) in parts.iter().zip(&batched) {
            let dd = DeviceData::new(&d.subset(p), &spec, Device::Cpu).unwrap();
            let s = mlp.train(&dd, cfg, &global).unwrap();
            let b = b.as_ref().unwrap();
            assert_eq!(b.steps, s.steps, "{cfg:?}");
            assert_eq!(b.num_examples, s.num_examples);
            let diff = max_abs_diff(&b.delta, &s.delta);
            assert!(diff <= 2e-5, "max |delta diff| {diff} for {cfg:?}");
            assert!((b.loss - s.loss).abs() <= 1e-5, "{} vs {}", b.loss, s.loss);
            assert!((b.accuracy - s.accuracy).abs() <= 1e-12);
            if s.steps > 0 {
                assert!(s.delta.iter().any(|v| *v != 0.0), "training moved nothing");
            }
            // A batch of one is the same computation.
            let alone = BatchedData::new(&d, &[p.as_slice()], &spec, Device::Cpu).unwrap();
            let a = train_batched(&spec, &alone, cfg, &global, Device::Cpu).unwrap();
            let a = a[0].as_ref().unwrap();
            let diff = max_abs_diff(&a.delta, &s.delta);
            assert!(diff <= 2e-5, "alone: max |delta diff| {diff} for {cfg:?}");
        }
    }

    #[test]
    fn sgd_matches_sequential_training() {
        check(&TrainConfig {
            epochs: 2,
            batch_size: 8,
            lr: 0.1,
            seed: 5,
            ..TrainConfig::default()
        });
    }

    #[test]
    fn sgd_momentum_weight_decay_and_prox_match_sequential_training() {
        check(&TrainConfig {
            epochs: 3,
            batch_size: 16,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-3,
            prox_mu: 0.5,
            seed: 9,
            ..TrainConfig::default()
        });
    }

    #[test]
    fn adam_and_max_steps_match_sequential_training() {
        check(&TrainConfig {
            max_steps: Some(7),
            batch_size: 10,
            optimizer: OptimizerKind::Adam,
            lr: 0.01,
            weight_decay: 1e-4,
            seed: 2,
            ..TrainConfig::default()
        });
    }

    #[test]
    fn schedule_is_the_sequential_order() {
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 4,
            seed: 3,
            ..TrainConfig::default()
        };
        let s = schedule(10, &cfg);
        // 3 batches per epoch (4, 4, 2), each epoch a permutation of 0..10.
        assert_eq!(
            s.iter().map(Vec::len).collect::<Vec<_>>(),
            [4, 4, 2, 4, 4, 2]
        );
        for epoch in s.chunks(3) {
            let mut rows: Vec<i64> = epoch.iter().flatten().copied().collect();
            rows.sort_unstable();
            assert_eq!(rows, (0..10).collect::<Vec<_>>());
        }
        assert!(schedule(0, &cfg).is_empty());
        let capped = TrainConfig {
            max_steps: Some(5),
            ..cfg
        };
        assert_eq!(schedule(10, &capped).len(), 5);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let spec = ModelSpec::new(vec![6, 3]).unwrap();
        let d = data();
        let p = [0usize, 1];
        let bd = BatchedData::new(&d, &[&p], &spec, Device::Cpu).unwrap();
        assert!(matches!(
            train_batched(&spec, &bd, &TrainConfig::default(), &[0.0], Device::Cpu),
            Err(ModelError::Length { .. })
        ));
        let narrow = ModelSpec::new(vec![5, 3]).unwrap();
        assert!(matches!(
            BatchedData::new(&d, &[&p], &narrow, Device::Cpu),
            Err(ModelError::Features { .. })
        ));
        let two = ModelSpec::new(vec![6, 2]).unwrap();
        let with_class_2: Vec<usize> = (0..120).collect();
        assert!(matches!(
            BatchedData::new(&d, &[&with_class_2], &two, Device::Cpu),
            Err(ModelError::Label { .. })
        ));
    }
}
