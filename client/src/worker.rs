//! The training worker: a thread of its own that owns the libtorch model and the node's
//! data (tensors are not `Sync`, and training must never block the async runtime). It
//! trains, turns the result into a privatized [`WireDelta`] (clip, noise) and evaluates.

use dpfl_common::config::DpMode;
use dpfl_common::dp::{privatize, GaussianNoise, RawDelta, WireDelta};
use dpfl_common::model::ModelSpec;
use dpfl_common::wire::{TrainMetrics, TrainRequest, UpdateMeta};
use dpfl_ml::standardize::{Bounds, FeatureStats, Standardizer};
use dpfl_ml::{Dataset, DeviceData, EvalOutcome, Mlp, TrainOutcome};
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::oneshot;

/// What one training request produced.
#[derive(Debug)]
pub struct TrainDone {
    /// The delta to send, already protected as the request demands.
    pub delta: WireDelta,
    /// Training statistics.
    pub outcome: TrainOutcome,
    /// Whether clipping changed the delta (`None` in `none` mode).
    pub clipped: Option<bool>,
    /// Seconds of local training.
    pub train_seconds: f64,
    /// Seconds spent clipping and adding noise.
    pub privatize_seconds: f64,
}

impl TrainDone {
    /// The update header for this result. In `local` mode nothing but the noised delta
    /// leaves the node: no example count, no metrics, no clipped bit.
    pub fn meta(&self, req: &TrainRequest) -> UpdateMeta {
        // Local and distributed modes do not trust the server: nothing about the node's
        // data leaves outside the noised update (no count, metrics or clipped bit).
        let local = matches!(req.privacy.mode, DpMode::Local | DpMode::Distributed);
        UpdateMeta {
            round: req.round,
            spec_hash: req.spec_hash,
            num_examples: if local { 0 } else { self.outcome.num_examples },
            metrics: (!local).then_some(TrainMetrics {
                loss: self.outcome.loss,
                accuracy: self.outcome.accuracy,
                steps: self.outcome.steps,
                seconds: self.train_seconds,
            }),
            clipped: if local { None } else { self.clipped },
        }
    }
}

/// The node's update pipeline: train from `global`, take the delta, clip and noise it as
/// `req.privacy` says. The real client and the simulator both run exactly this.
pub fn train_and_privatize(
    mlp: &mut Mlp,
    data: &DeviceData,
    req: &TrainRequest,
    global: &[f32],
    noise: &mut dyn GaussianNoise,
) -> Result<TrainDone, String> {
    let t0 = Instant::now();
    let outcome = mlp
        .train(data, &req.config, global)
        .map_err(|e| e.to_string())?;
    let train_seconds = t0.elapsed().as_secs_f64();
    privatize_outcome(outcome, train_seconds, req, noise)
}

/// The privatization half of [`train_and_privatize`]: clip and noise a trained outcome as
/// `req.privacy` says. The simulator's batched training hands each client's outcome here,
/// so batched and sequential clients go through the same pipeline.
pub fn privatize_outcome(
    outcome: TrainOutcome,
    train_seconds: f64,
    req: &TrainRequest,
    noise: &mut dyn GaussianNoise,
) -> Result<TrainDone, String> {
    let t1 = Instant::now();
    let raw = RawDelta::new(outcome.delta.clone());
    let clipped = match req.privacy.mode {
        DpMode::None => None,
        _ => Some(dpfl_common::dp::l2_norm(raw.as_slice()) > req.privacy.clip_norm),
    };
    let delta = privatize(raw, &req.privacy, noise).map_err(|e| e.to_string())?;
    Ok(TrainDone {
        delta,
        outcome,
        clipped,
        train_seconds,
        privatize_seconds: t1.elapsed().as_secs_f64(),
    })
}

enum Job {
    Setup(ModelSpec, oneshot::Sender<Result<(), String>>),
    Train(
        // Boxed: a request with distributed-DP parameters is the largest job by far.
        Box<TrainRequest>,
        Vec<f32>,
        oneshot::Sender<Result<TrainDone, String>>,
    ),
    Evaluate(Vec<f32>, oneshot::Sender<Result<EvalOutcome, String>>),
    Stats(StatsJob, oneshot::Sender<Result<FeatureStats, String>>),
    Standardize(Standardizer, oneshot::Sender<Result<u32, String>>),
}

/// What statistics the server asked for (already checked by the node).
#[derive(Debug, Clone)]
pub struct StatsJob {
    /// Public ranges to clip to and map to `[0, 1]` (`None`: raw values).
    pub bounds: Option<Bounds>,
    /// Label counts to keep (the model's classes).
    pub classes: usize,
    /// Divide by the row count (DP on: client-level sensitivity).
    pub normalized: bool,
    /// `local` mode: add Gaussian noise with this multiplier (at the statistics'
    /// sensitivity) before they leave the worker.
    pub noise_multiplier: Option<f64>,
}

/// Handle to the worker thread.
pub struct Worker {
    tx: mpsc::Sender<Job>,
}

struct State {
    device: tch::Device,
    train: Dataset,
    val: Dataset,
    noise: Box<dyn GaussianNoise>,
    model: Option<(ModelSpec, Mlp, DeviceData, DeviceData)>,
    /// The data as loaded, kept once a transform is applied (statistics are always of the
    /// raw data; a different transform starts again from it).
    raw: Option<(Dataset, Dataset)>,
    /// The federation's transform, once applied.
    standardized: Option<Standardizer>,
    /// Whether the data has missing values (they need the federated transform).
    missing: bool,
}

impl State {
    fn setup(&mut self, spec: ModelSpec) -> Result<(), String> {
        if self.model.as_ref().is_some_and(|(s, ..)| *s == spec) {
            return Ok(());
        }
        let mlp = Mlp::new(&spec, self.device).map_err(|e| e.to_string())?;
        let train = DeviceData::new(&self.train, &spec, self.device).map_err(|e| e.to_string())?;
        let val = DeviceData::new(&self.val, &spec, self.device).map_err(|e| e.to_string())?;
        self.model = Some((spec, mlp, train, val));
        Ok(())
    }

    fn stats(&mut self, job: &StatsJob) -> Result<FeatureStats, String> {
        let data = self.raw.as_ref().map_or(&self.train, |r| &r.0);
        let mut st = match &job.bounds {
            Some(b) => FeatureStats::of_bounded(data, job.classes, b).map_err(|e| e.to_string())?,
            None => FeatureStats::of(data, job.classes),
        };
        if job.normalized {
            st.normalize(data.len());
        }
        if let Some(z) = job.noise_multiplier {
            st.release(z, self.noise.as_mut())
                .map_err(|e| e.to_string())?;
        }
        Ok(st)
    }

    fn standardize(&mut self, s: Standardizer) -> Result<u32, String> {
        let dim = self.train.dim as u32;
        if self.standardized.as_ref() == Some(&s) {
            return Ok(dim);
        }
        let (train, val) = self
            .raw
            .get_or_insert_with(|| (self.train.clone(), self.val.clone()))
            .clone();
        let (mut train, mut val) = (train, val);
        s.apply(&mut train).map_err(|e| e.to_string())?;
        s.apply(&mut val).map_err(|e| e.to_string())?;
        self.train = train;
        self.val = val;
        self.standardized = Some(s);
        if let Some((spec, ..)) = self.model.take() {
            self.setup(spec)?;
        }
        Ok(dim)
    }

    fn train(&mut self, req: &TrainRequest, global: &[f32]) -> Result<TrainDone, String> {
        if self.missing && self.standardized.is_none() {
            return Err(
                "the data has missing values (missing=mean), which only federated \
                        standardisation imputes, and the server did not standardise \
                        ([standardize] enabled = true on the server)"
                    .into(),
            );
        }
        let (_, mlp, train, _) = self.model.as_mut().ok_or("model not set up")?;
        train_and_privatize(mlp, train, req, global, self.noise.as_mut())
    }

    fn evaluate(&mut self, params: &[f32]) -> Result<EvalOutcome, String> {
        let (_, mlp, _, val) = self.model.as_mut().ok_or("model not set up")?;
        mlp.evaluate(val, params).map_err(|e| e.to_string())
    }
}

impl Worker {
    /// Starts the worker with the node's training and validation data.
    ///
    /// `pin_cpus`: when not empty, the trainer thread (and the libtorch threads it starts,
    /// which inherit its mask) runs only on these CPUs: co-located nodes can be spread
    /// over the cores instead of being migrated between them.
    pub fn start(
        device: tch::Device,
        threads: usize,
        pin_cpus: &[usize],
        train: Dataset,
        val: Dataset,
        noise: Box<dyn GaussianNoise>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (pinned_tx, pinned_rx) = mpsc::channel::<std::io::Result<()>>();
        let pin_cpus = pin_cpus.to_vec();
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || {
                if !pin_cpus.is_empty() {
                    let pinned = pin_current_thread(&pin_cpus);
                    let failed = pinned.is_err();
                    let _ = pinned_tx.send(pinned);
                    if failed {
                        return;
                    }
                } else {
                    let _ = pinned_tx.send(Ok(()));
                }
                dpfl_ml::model::set_threads(threads);
                let missing = train
                    .features
                    .iter()
                    .chain(&val.features)
                    .any(|v| v.is_nan());
                let mut st = State {
                    device,
                    train,
                    val,
                    noise,
                    model: None,
                    raw: None,
                    standardized: None,
                    missing,
                };
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Setup(spec, reply) => {
                            let _ = reply.send(st.setup(spec));
                        }
                        Job::Train(req, global, reply) => {
                            let _ = reply.send(st.train(&req, &global));
                        }
                        Job::Evaluate(params, reply) => {
                            let _ = reply.send(st.evaluate(&params));
                        }
                        Job::Stats(job, reply) => {
                            let _ = reply.send(st.stats(&job));
                        }
                        Job::Standardize(s, reply) => {
                            let _ = reply.send(st.standardize(s));
                        }
                    }
                }
            })?;
        pinned_rx
            .recv()
            .map_err(|_| std::io::Error::other("the trainer thread did not start"))??;
        Ok(Self { tx })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Job,
    ) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| "training worker stopped".to_string())?;
        rx.await
            .map_err(|_| "training worker stopped".to_string())?
    }

    /// Builds the model for `spec` and moves the data to the device (checks it fits).
    pub async fn setup(&self, spec: ModelSpec) -> Result<(), String> {
        self.call(|tx| Job::Setup(spec, tx)).await
    }

    /// Trains from `global` and privatizes the delta.
    pub async fn train(&self, req: TrainRequest, global: Vec<f32>) -> Result<TrainDone, String> {
        self.call(|tx| Job::Train(Box::new(req), global, tx)).await
    }

    /// Evaluates `params` on the validation split.
    pub async fn evaluate(&self, params: Vec<f32>) -> Result<EvalOutcome, String> {
        self.call(|tx| Job::Evaluate(params, tx)).await
    }

    /// The feature statistics of the (raw) training data, as `job` asks.
    pub async fn stats(&self, job: StatsJob) -> Result<FeatureStats, String> {
        self.call(|tx| Job::Stats(job, tx)).await
    }

    /// Applies the federation's transform to the training and validation data (from the
    /// data as loaded; the same transform twice is a no-op). Returns the feature count.
    pub async fn standardize(&self, s: Standardizer) -> Result<u32, String> {
        self.call(|tx| Job::Standardize(s, tx)).await
    }
}

/// Restricts the calling thread to `cpus` (Linux `sched_setaffinity`).
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "CPU {c} cannot be pinned to (at most {}): {e}",
                    CpuSet::count()
                ),
            )
        })?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| std::io::Error::other(format!("pinning to CPUs {cpus:?}: {e}")))
}

/// The CPUs the calling thread may run on.
pub fn current_thread_cpus() -> std::io::Result<Vec<usize>> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    let set = sched_getaffinity(Pid::from_raw(0)).map_err(std::io::Error::other)?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_restricts_the_thread_to_the_given_cpus_and_bad_cpus_are_refused() {
        let allowed = current_thread_cpus().unwrap();
        assert!(!allowed.is_empty());
        let one = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(&[one]).unwrap();
            current_thread_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![one]);
        // The caller's own mask is untouched.
        assert_eq!(current_thread_cpus().unwrap(), allowed);
        // Past the kernel's set size: a typed error, not a panic.
        let e = pin_current_thread(&[1 << 20]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        // A CPU the machine does not have: the kernel refuses, the worker does not start.
        let absent = (0..1024).find(|c| !allowed.contains(c)).unwrap();
        let data = || Dataset::new(vec![0.0; 4], vec![0, 1], 2).unwrap();
        let w = Worker::start(
            tch::Device::Cpu,
            1,
            &[absent],
            data(),
            data(),
            Box::new(dpfl_common::dp::SimulationGaussian::seeded(1)),
        );
        assert!(w.is_err());
        // A CPU it has: the worker starts.
        let w = Worker::start(
            tch::Device::Cpu,
            1,
            &[one],
            data(),
            data(),
            Box::new(dpfl_common::dp::SimulationGaussian::seeded(1)),
        );
        assert!(w.is_ok());
    }
}
