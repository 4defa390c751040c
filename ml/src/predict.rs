//! Inference with a saved global model: the safetensors file with its metadata (layer
//! sizes, the federated standardisation, class and feature names), predictions for a
//! data set, and accuracy, AUC and F1 when labels are known.
//!
//! The same transform the federation trained with is applied before the forward pass, so a
//! model file is all inference needs. It does no training and opens no socket.

use crate::data::Dataset;
use crate::metrics;
use crate::model::{Mlp, ModelError};
use crate::standardize::{StandardizeError, Standardizer};
use dpfl_common::model::ModelSpec;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Errors of inference.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The model file cannot be read.
    #[error("{0}")]
    Export(#[from] crate::export::ExportError),
    /// The standardisation metadata cannot be used.
    #[error("{0}")]
    Standardize(#[from] StandardizeError),
    /// libtorch or shape error.
    #[error("{0}")]
    Model(#[from] ModelError),
    /// Data and model disagree.
    #[error("{0}")]
    Mismatch(String),
}

/// A global model as saved: parameters and what inference needs to use them.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFile {
    /// Architecture.
    pub spec: ModelSpec,
    /// Parameters in wire order.
    pub params: Vec<f32>,
    /// The federated standardisation the model was trained with, if any.
    pub standardizer: Option<Standardizer>,
    /// Class names in class-index order (empty: integer classes).
    pub class_names: Vec<String>,
    /// Feature names in input order (empty: unknown).
    pub feature_names: Vec<String>,
}

/// Names travel in metadata as a JSON-free list: `|`-separated, `|` and `\` escaped.
fn join_names(v: &[String]) -> String {
    v.iter()
        .map(|n| n.replace('\\', "\\\\").replace('|', "\\|"))
        .collect::<Vec<_>>()
        .join("|")
}

fn split_names(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (true, c) => {
                cur.push(c);
                esc = false;
            }
            (false, '\\') => esc = true,
            (false, '|') => out.push(std::mem::take(&mut cur)),
            (false, c) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

impl ModelFile {
    /// Metadata entries beyond the layer sizes.
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut m = self
            .standardizer
            .as_ref()
            .map(Standardizer::to_metadata)
            .unwrap_or_default();
        if !self.class_names.is_empty() {
            m.insert("classes".into(), join_names(&self.class_names));
        }
        if !self.feature_names.is_empty() {
            m.insert("features".into(), join_names(&self.feature_names));
        }
        m
    }

    /// Writes the file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), PredictError> {
        crate::export::save_safetensors_with_metadata(
            &self.spec,
            &self.params,
            path,
            &self.metadata(),
        )?;
        Ok(())
    }

    /// Reads a file written by [`ModelFile::save`] or by the server.
    pub fn load(path: &Path) -> Result<Self, PredictError> {
        let (spec, params, meta) = crate::export::load_safetensors_with_metadata(path)?;
        let standardizer = Standardizer::from_metadata(&meta)?;
        if let Some(s) = &standardizer {
            if s.mean.len() != spec.inputs() {
                return Err(PredictError::Mismatch(format!(
                    "{}: standardisation of {} features for a model of {} inputs",
                    path.display(),
                    s.mean.len(),
                    spec.inputs()
                )));
            }
        }
        let names = |k: &str| meta.get(k).map(|s| split_names(s)).unwrap_or_default();
        Ok(Self {
            spec,
            params,
            standardizer,
            class_names: names("classes"),
            feature_names: names("features"),
        })
    }
}

/// Predicted classes and class probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// Most probable class per row.
    pub class: Vec<i64>,
    /// Softmax probabilities, `rows * num_classes`, row-major.
    pub prob: Vec<f32>,
    /// Classes (model outputs).
    pub num_classes: usize,
}

/// Scores of predictions against labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Rows scored.
    pub n: usize,
    /// Accuracy.
    pub accuracy: f64,
    /// ROC AUC of class 1 (two classes, both present).
    pub auc: Option<f64>,
    /// F1 of class 1 (two classes).
    pub f1: Option<f64>,
}

/// Predicts every row of `data` (standardised first when the model file says so).
pub fn predict(
    model: &ModelFile,
    data: &Dataset,
    device: Device,
) -> Result<Predictions, PredictError> {
    if data.dim != model.spec.inputs() {
        return Err(PredictError::Mismatch(format!(
            "the data has {} features, the model takes {}",
            data.dim,
            model.spec.inputs()
        )));
    }
    let mut x = data.clone();
    match &model.standardizer {
        Some(s) => s.apply(&mut x)?,
        None if x.features.iter().any(|v| v.is_nan()) => {
            return Err(PredictError::Mismatch(
                "the data has missing values and the model file no standardisation to impute them"
                    .into(),
            ))
        }
        None => {}
    }
    let mut mlp = Mlp::new(&model.spec, device)?;
    mlp.load(&model.params)?;
    let k = model.spec.outputs();
    let mut class = Vec::with_capacity(x.len());
    let mut prob = Vec::with_capacity(x.len() * k);
    let n = x.len();
    let mut start = 0;
    while start < n {
        let len = (n - start).min(4096);
        let xs = Tensor::from_slice(&x.features[start * x.dim..(start + len) * x.dim])
            .view([len as i64, x.dim as i64])
            .to_device(device);
        let p = tch::no_grad(|| mlp.forward(&xs).map(|l| l.softmax(-1, Kind::Float)))?
            .to_device(Device::Cpu)
            .contiguous();
        let flat = Vec::<f32>::try_from(p.view([-1]))
            .map_err(|e| PredictError::Mismatch(format!("reading probabilities: {e}")))?;
        for row in flat.chunks(k) {
            let best = row
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (i, v)| {
                    if *v > b.1 {
                        (i, *v)
                    } else {
                        b
                    }
                });
            class.push(best.0 as i64);
        }
        prob.extend_from_slice(&flat);
        start += len;
    }
    Ok(Predictions {
        class,
        prob,
        num_classes: k,
    })
}

/// Accuracy, and for two classes AUC and F1, against `labels`.
pub fn score(p: &Predictions, labels: &[i64]) -> Scores {
    let binary = p.num_classes == 2;
    let pos: Vec<f64> = if binary {
        p.prob.chunks(2).map(|r| r[1] as f64).collect()
    } else {
        Vec::new()
    };
    Scores {
        n: labels.len(),
        accuracy: metrics::accuracy(&p.class, labels),
        auc: if binary {
            metrics::binary_auc(&pos, labels)
        } else {
            None
        },
        f1: binary.then(|| metrics::binary_f1(&p.class, labels)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standardize::FeatureStats;

    #[test]
    fn names_round_trip_with_separators() {
        let v = vec!["a|b".to_string(), "c\\d".into(), "".into(), "e".into()];
        assert_eq!(split_names(&join_names(&v)), v);
    }

    #[test]
    fn model_file_keeps_transform_and_names_and_predicts_through_them() {
        // One input, two classes: logits (0, x) after standardising x.
        let spec = ModelSpec::new(vec![1, 2]).unwrap();
        // Wire order: fc0.bias (2), fc0.weight (2x1).
        let params = vec![0.0, 0.0, 0.0, 1.0];
        let raw = Dataset::new(vec![100.0, 104.0, 98.0, 102.0], vec![1, 1, 0, 0], 1).unwrap();
        let st = Standardizer::from_stats(&FeatureStats::of(&raw, 2), None).unwrap();
        let file = ModelFile {
            spec,
            params,
            standardizer: Some(st),
            class_names: vec!["benign".into(), "malignant".into()],
            feature_names: vec!["radius".into()],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        file.save(&path).unwrap();
        let back = ModelFile::load(&path).unwrap();
        assert_eq!(back, file);
        let p = predict(&back, &raw, Device::Cpu).unwrap();
        // Mean 101: rows above it are class 1.
        assert_eq!(p.class, vec![0, 1, 0, 1]);
        let s = score(&p, &raw.labels);
        assert_eq!(s.accuracy, 0.5);
        // Positives at 100 and 104, negatives at 98 and 102: 3 of 4 pairs ordered.
        assert_eq!(s.auc, Some(0.75));
        assert_eq!(s.f1, Some(0.5));
        let wrong = Dataset::new(vec![1.0, 2.0], vec![0], 2).unwrap();
        assert!(predict(&back, &wrong, Device::Cpu).is_err());
    }
}
