//! What `dpfl-predict` does, as a library the tests call: read a saved global model (and,
//! for a TorchScript model, its module file, checked against the spec hash recorded with
//! the model), read a data set, write one prediction per row and score them when the data
//! has labels.
//!
//! It trains nothing and opens no socket; the binary only parses arguments and prints.

use dpfl_ml::data::DataError;
use dpfl_ml::predict::{predict, score, ModelFile, PredictError, Scores};
use dpfl_ml::DataSource;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What to predict with and on.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Model file written by the server (`model.safetensors`, `model-best.safetensors`).
    pub model: PathBuf,
    /// The TorchScript module file (a TorchScript model only).
    pub module: Option<PathBuf>,
    /// The data.
    pub data: DataSource,
    /// Where the predictions go (CSV: row, predicted class, one probability per class).
    pub out: PathBuf,
    /// Also write the scores as JSON here (labelled data only).
    pub metrics_json: Option<PathBuf>,
    /// Use at most this many rows (the first ones).
    pub limit: Option<usize>,
    /// Device: auto, cpu, cuda or cuda:N.
    pub device: String,
}

/// What a prediction run found.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictReport {
    /// Rows predicted.
    pub rows: usize,
    /// Scores against the labels (labelled data only).
    pub scores: Option<Scores>,
    /// Problems that did not stop the run (e.g. other feature columns than the model's).
    pub warnings: Vec<String>,
}

/// Why a prediction run failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictRunError {
    /// The model, its module or the inference failed.
    #[error("{path}: {source}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// Cause.
        source: PredictError,
    },
    /// The data cannot be read.
    #[error("{0}")]
    Data(#[from] DataError),
    /// The device name is not usable here.
    #[error("{0}")]
    Device(#[from] dpfl_ml::model::ModelError),
    /// The data's class names are not the model's.
    #[error(
        "the data's classes ({data}) are not the model's ({model}): give the same classes= list"
    )]
    Classes {
        /// The data's, `|`-separated.
        data: String,
        /// The model's, `|`-separated.
        model: String,
    },
    /// An output file cannot be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PredictRunError + '_ {
    move |source| PredictRunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the model (paired with its module when given), predicts every row and writes the
/// predictions (and the scores) to the files of `o`.
pub fn run(o: &PredictOptions) -> Result<PredictReport, PredictRunError> {
    let model_err = |source| PredictRunError::Model {
        path: o.model.clone(),
        source,
    };
    let mut model = ModelFile::load(&o.model).map_err(model_err)?;
    if let Some(module) = &o.module {
        model = model.with_module(module).map_err(model_err)?;
    }
    let mut table = o.data.load_table()?;
    if let Some(n) = o.limit {
        table.data = table.data.take(n);
    }
    let mut warnings = Vec::new();
    if !model.feature_names.is_empty()
        && !table.feature_names.is_empty()
        && model.feature_names != table.feature_names
    {
        warnings.push(format!(
            "the data's feature columns ({}) are not the model's ({}); check features= and drop=",
            table.feature_names.join(", "),
            model.feature_names.join(", ")
        ));
    }
    if table.labelled
        && !model.class_names.is_empty()
        && !table.class_names.is_empty()
        && model.class_names != table.class_names
    {
        return Err(PredictRunError::Classes {
            data: table.class_names.join("|"),
            model: model.class_names.join("|"),
        });
    }
    let device = dpfl_ml::model::parse_device(&o.device)?;
    let p = predict(&model, &table.data, device).map_err(model_err)?;
    let name = |c: i64| {
        usize::try_from(c)
            .ok()
            .and_then(|c| model.class_names.get(c).cloned())
            .unwrap_or_else(|| c.to_string())
    };
    let file = std::fs::File::create(&o.out).map_err(io(&o.out))?;
    let mut out = std::io::BufWriter::new(file);
    let probs: Vec<String> = (0..p.num_classes as i64)
        .map(|c| format!("p_{}", name(c)))
        .collect();
    writeln!(out, "row,predicted,{}", probs.join(",")).map_err(io(&o.out))?;
    for (i, c) in p.class.iter().enumerate() {
        let row = &p.prob[i * p.num_classes..(i + 1) * p.num_classes];
        let row: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
        writeln!(out, "{i},{},{}", name(*c), row.join(",")).map_err(io(&o.out))?;
    }
    out.flush().map_err(io(&o.out))?;
    let scores = table.labelled.then(|| score(&p, &table.data.labels));
    if let (Some(s), Some(path)) = (&scores, &o.metrics_json) {
        let v = serde_json::json!({
            "examples": s.n, "correct": s.correct, "accuracy": s.accuracy,
            "auc": s.auc, "f1": s.f1,
        });
        let text = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
        std::fs::write(path, text).map_err(io(path))?;
    }
    Ok(PredictReport {
        rows: p.class.len(),
        scores,
        warnings,
    })
}
