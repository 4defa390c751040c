//! Inference with a saved global model: the safetensors file with its metadata (layer
//! sizes, the federated standardisation, class and feature names), predictions for a
//! data set, and accuracy, AUC and F1 when labels are known.
//!
//! The same transform the federation trained with is applied before the forward pass, so a
//! model file is all inference needs for the built-in networks. A TorchScript model's file
//! holds its parameters and its spec hash, not the module: [`ModelFile::with_module`]
//! pairs it with the module file, which must give the same spec hash. It does no training
//! and opens no socket.

use crate::data::Dataset;
use crate::metrics;
use crate::model::{Mlp, ModelError};
use crate::standardize::{StandardizeError, Standardizer};
use dpfl_common::model::ModelSpec;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    /// A TorchScript model without its module file.
    #[error(
        "the model is a {spec}: its file holds the parameters, not the module; give the \
         module file it was trained with (dpfl-predict --module model.pt)"
    )]
    NeedsModule {
        /// The model.
        spec: String,
    },
    /// A module file for a model that is not a TorchScript module.
    #[error("{}: a module file was given, but the model is a built-in {spec}", module.display())]
    NotScript {
        /// The module file given.
        module: PathBuf,
        /// The model.
        spec: String,
    },
    /// The module file is not the one the model was trained with.
    #[error("{0}")]
    ModuleMismatch(Box<ModuleMismatch>),
}

/// A module file whose spec hash is not the one recorded with the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} is not the module this model was trained with: the module gives spec hash \
     {module_hash} ({module_spec}), the model file records {model_hash} ({model_spec})",
    module.display()
)]
pub struct ModuleMismatch {
    /// The module file given.
    pub module: PathBuf,
    /// Spec hash of the module file (hex).
    pub module_hash: String,
    /// The module file's spec.
    pub module_spec: String,
    /// Spec hash recorded with the model (hex).
    pub model_hash: String,
    /// The model file's spec.
    pub model_spec: String,
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

    /// Pairs a TorchScript model with its module file: the module's spec (the file's
    /// SHA-256 and its parameters' names and shapes, for the model's inputs and classes)
    /// must have the spec hash recorded with the model.
    pub fn with_module(mut self, module: &Path) -> Result<Self, PredictError> {
        if !self.spec.is_script() {
            return Err(PredictError::NotScript {
                module: module.to_path_buf(),
                spec: self.spec.to_string(),
            });
        }
        let given =
            crate::torchscript::script_spec(module, self.spec.inputs(), self.spec.outputs())?;
        if given.hash() != self.spec.hash() {
            return Err(PredictError::ModuleMismatch(Box::new(ModuleMismatch {
                module: module.to_path_buf(),
                module_hash: crate::export::hex(&given.hash()),
                module_spec: given.to_string(),
                model_hash: crate::export::hex(&self.spec.hash()),
                model_spec: self.spec.to_string(),
            })));
        }
        self.spec = given;
        Ok(self)
    }

    /// Whether inference can build the network: a built-in one, or a TorchScript module
    /// paired with its file ([`ModelFile::with_module`]).
    fn check_runnable(&self) -> Result<(), PredictError> {
        match &self.spec.arch {
            dpfl_common::model::Arch::TorchScript { path: None, .. } => {
                Err(PredictError::NeedsModule {
                    spec: self.spec.to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Reads a file written by [`ModelFile::save`] or by the server (a TorchScript
    /// model's then needs [`ModelFile::with_module`]).
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
    /// Rows whose predicted class is the label.
    pub correct: usize,
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
    model.check_runnable()?;
    let mut mlp = Mlp::new(&model.spec, device)?;
    predict_with(&mut mlp, model, data)
}

/// As [`predict`] on a network already built for the model's spec (the server's
/// evaluator keeps one). The network is left in training mode.
pub fn predict_with(
    mlp: &mut Mlp,
    model: &ModelFile,
    data: &Dataset,
) -> Result<Predictions, PredictError> {
    if mlp.spec().hash() != model.spec.hash() {
        return Err(PredictError::Mismatch(format!(
            "the network is {}, the model {}",
            mlp.spec(),
            model.spec
        )));
    }
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
    mlp.load(&model.params)?;
    mlp.set_eval(true)?;
    let out = forward_rows(mlp, &x, model.spec.outputs());
    mlp.set_eval(false)?;
    out
}

/// Class probabilities and the most probable class of every row, in the batches
/// [`Mlp::evaluate`] uses, the class being the logits' argmax as there: predictions count
/// exactly the correct answers the server's evaluation counts.
fn forward_rows(mlp: &Mlp, x: &Dataset, k: usize) -> Result<Predictions, PredictError> {
    let device = mlp.device();
    let mut class = Vec::with_capacity(x.len());
    let mut prob = Vec::with_capacity(x.len() * k);
    let n = x.len();
    let batch = mlp.eval_batch_rows();
    let mut start = 0;
    while start < n {
        let len = (n - start).min(batch);
        let xs = Tensor::from_slice(&x.features[start * x.dim..(start + len) * x.dim])
            .view([len as i64, x.dim as i64])
            .to_device(device);
        let (p, c) = tch::no_grad(|| {
            mlp.forward(&xs)
                .map(|l| (l.softmax(-1, Kind::Float), l.argmax(-1, false)))
        })?;
        let read = |t: Tensor| t.to_device(Device::Cpu).contiguous().view([-1]);
        let flat = Vec::<f32>::try_from(read(p))
            .map_err(|e| PredictError::Mismatch(format!("reading probabilities: {e}")))?;
        let best = Vec::<i64>::try_from(read(c))
            .map_err(|e| PredictError::Mismatch(format!("reading classes: {e}")))?;
        class.extend_from_slice(&best);
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
        correct: p.class.iter().zip(labels).filter(|(c, l)| c == l).count(),
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
    fn a_module_file_goes_with_torchscript_models_only() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("m.pt");
        let mlp = ModelFile {
            spec: ModelSpec::new(vec![1, 2]).unwrap(),
            params: vec![0.0; 4],
            standardizer: None,
            class_names: Vec::new(),
            feature_names: Vec::new(),
        };
        match mlp.with_module(&module) {
            Err(PredictError::NotScript { module: m, spec }) => {
                assert_eq!(m, module);
                assert_eq!(spec, "mlp 1-2");
            }
            other => panic!("{other:?}"),
        }
        // A TorchScript model as loaded from its file (no module path) does not run
        // without its module, and says so before touching libtorch.
        let script = ModelFile {
            spec: ModelSpec {
                layers: vec![1, 2],
                arch: dpfl_common::model::Arch::TorchScript {
                    sha256: [1; 32],
                    params: vec![
                        ("fc.bias".into(), vec![2]),
                        ("fc.weight".into(), vec![2, 1]),
                    ],
                    path: None,
                },
            },
            params: vec![0.0; 4],
            standardizer: None,
            class_names: Vec::new(),
            feature_names: Vec::new(),
        };
        let data = Dataset::new(vec![1.0], vec![0], 1).unwrap();
        let e = predict(&script, &data, Device::Cpu).unwrap_err();
        assert!(matches!(e, PredictError::NeedsModule { .. }), "{e}");
        assert!(e.to_string().contains("--module"), "{e}");
        // A module file that cannot be read is an error, not a mismatch.
        assert!(matches!(
            script.with_module(&module),
            Err(PredictError::Model(_))
        ));
    }

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
