//! Preprocessing before round 1: federated standardisation of the clients' features.
//!
//! Each virtual client computes its count, sum and sum of squares per feature (and label
//! counts) on its own part; they are summed as the server would sum them, released with
//! Gaussian noise when DP is on (`central`: once, on the sum; `local`: by every client on
//! its own statistics before they leave it), and the resulting mean and standard deviation
//! are applied to every client's data and to the test set. The statistics travel in
//! memory here; the QUIC nodes (`dpfl-client`) do not exchange them yet.

use crate::experiment::SimConfig;
use crate::run::{noise, Population, SimError};
use dpfl_common::dp::accountant;
use dpfl_common::DpMode;
use dpfl_ml::standardize::{chance_level_warning, chance_loss, Bounds, FeatureStats, Standardizer};
use dpfl_ml::{DataSource, Dataset};
use std::sync::Arc;

/// What preprocessing produced: the transform, what its release cost, names from the table.
#[derive(Debug, Clone, Default)]
pub struct Prep {
    /// The transform applied to every client's data and the test set.
    pub standardizer: Option<Standardizer>,
    /// Epsilon of the statistics' Gaussian release (at the run's delta) for one **row**
    /// (add or remove one example), not one client: a client with `m` rows has group
    /// privacy only (an effective multiplier `z / m`), so it does not add to the training's
    /// client-level epsilon.
    pub epsilon: Option<f64>,
    /// Class names of a CSV table with string labels or `classes=`.
    pub class_names: Vec<String>,
    /// Feature names of a CSV table.
    pub feature_names: Vec<String>,
}

/// Standardises `pop` and `test` in place as `cfg.standardize` says.
pub fn standardize(
    cfg: &SimConfig,
    pop: &mut Population,
    test: Option<&mut Dataset>,
    seed: u64,
) -> Result<Prep, SimError> {
    let mut prep = Prep::default();
    if let Ok(DataSource::Csv { path, options }) = cfg.data.parse::<DataSource>() {
        let group = match &cfg.population.partition {
            dpfl_ml::partition::PartitionKind::Natural { column } => Some(column.as_str()),
            _ => None,
        };
        let t = dpfl_ml::csv::load_table(&path, &options, group)
            .map_err(|e| SimError::Data(e.to_string()))?;
        prep.class_names = t.class_names;
        prep.feature_names = t.feature_names;
    }
    let st = &cfg.standardize;
    let data = &pop.data;
    if !st.enabled {
        if data.features.iter().any(|v| v.is_nan()) {
            return Err(SimError::Data(
                "the data has missing values (missing=mean): they are imputed by federated standardisation; set standardize.enabled = true".into(),
            ));
        }
        return Ok(prep);
    }
    let bounds = st
        .bounds
        .as_deref()
        .map(|b| Bounds::parse(b, data.dim))
        .transpose()
        .map_err(|e| SimError::Setup(e.to_string()))?;
    let classes = cfg
        .model
        .spec()
        .map_err(|e| SimError::Setup(e.to_string()))?
        .outputs();
    let stats_of = |d: &Dataset| -> Result<FeatureStats, SimError> {
        match &bounds {
            Some(b) => FeatureStats::of_bounded(d, classes, b),
            None => Ok(FeatureStats::of(d, classes)),
        }
        .map_err(|e| SimError::Setup(e.to_string()))
    };
    let z = st.noise_multiplier;
    let mut sampler = noise(cfg.sampler, seed);
    let mut total = FeatureStats::zeros(data.dim, classes, bounds.is_some());
    for part in &pop.parts {
        let mut s = stats_of(&data.subset(part))?;
        if z > 0.0 && cfg.dp.mode == DpMode::Local {
            s.release(z, sampler.as_mut())
                .map_err(|e| SimError::Setup(e.to_string()))?;
        }
        total
            .merge(&s)
            .map_err(|e| SimError::Setup(e.to_string()))?;
    }
    if z > 0.0 && cfg.dp.mode != DpMode::Local {
        total
            .release(z, sampler.as_mut())
            .map_err(|e| SimError::Setup(e.to_string()))?;
    }
    if z > 0.0 {
        prep.epsilon = Some(
            accountant::rdp_epsilon(1.0, z, 1, cfg.dp.delta)
                .map_err(|e| SimError::Setup(e.to_string()))?,
        );
    }
    let s = Standardizer::from_stats(&total, bounds.as_ref())
        .map_err(|e| SimError::Setup(e.to_string()))?;
    let mut d = data.as_ref().clone();
    s.apply(&mut d)
        .map_err(|e| SimError::Setup(e.to_string()))?;
    pop.data = Arc::new(d);
    if let Some(t) = test {
        s.apply(t).map_err(|e| SimError::Setup(e.to_string()))?;
    }
    prep.standardizer = Some(s);
    Ok(prep)
}

/// The chance-level warning for a finished run, from its test losses and accuracies (the
/// simulator's rows carry the central evaluation) against the class frequencies of the
/// training data.
pub fn chance_warning(rows: &[crate::run::RoundRow], labels: &[i64]) -> Option<String> {
    let k = labels.iter().max().map_or(0, |m| *m as usize + 1);
    let mut counts = vec![0.0; k];
    for l in labels {
        counts[*l as usize] += 1.0;
    }
    let majority = counts.iter().cloned().fold(0.0, f64::max) / labels.len().max(1) as f64;
    let losses: Vec<f64> = rows.iter().filter_map(|r| r.test_loss).collect();
    let accs: Vec<f64> = rows.iter().filter_map(|r| r.test_accuracy).collect();
    chance_level_warning(&losses, &accs, chance_loss(&counts), majority, 3)
}
