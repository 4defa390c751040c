//! `dpfl-predict`: applies a saved global model (with the standardisation and class names
//! stored in its file) to a data set; writes one prediction per row and, when the data
//! has labels, prints accuracy and, for two classes, AUC and F1.

use anyhow::{bail, Context, Result};
use clap::Parser;
use dpfl_ml::predict::{predict, score, ModelFile};
use dpfl_ml::DataSource;
use std::io::Write;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  dpfl-predict --model runs/x/model.safetensors --data csv:new.csv,label=diagnosis
  dpfl-predict --model runs/x/model.safetensors --data 'csv:new.csv,label=none' --out pred.csv";

/// Predicts with a federated model: the same feature transform as in training (saved in
/// the model file), one row of class probabilities per example.
#[derive(Parser, Debug)]
#[command(name = "dpfl-predict", version, after_help = EXAMPLES)]
struct Args {
    /// Model file written by the server (`model.safetensors`, or `model-best.safetensors`).
    #[arg(long)]
    model: PathBuf,
    /// Data: csv:PATH[,OPTIONS] (label=none for data without labels), idx:..., fashion-mnist-test.
    #[arg(long)]
    data: String,
    /// Where to write predictions (CSV: row, predicted class, one probability per class).
    #[arg(long, default_value = "predictions.csv")]
    out: PathBuf,
    /// Also write the scores as JSON here.
    #[arg(long)]
    metrics_json: Option<PathBuf>,
    /// Use at most this many rows (the first ones).
    #[arg(long)]
    limit: Option<usize>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let model =
        ModelFile::load(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
    let source: DataSource = a.data.parse()?;
    let mut table = source.load_table()?;
    if let Some(n) = a.limit {
        table.data = table.data.take(n);
    }
    if !model.feature_names.is_empty()
        && !table.feature_names.is_empty()
        && model.feature_names != table.feature_names
    {
        eprintln!(
            "warning: the data's feature columns ({}) are not the model's ({}); check features= and drop=",
            table.feature_names.join(", "),
            model.feature_names.join(", ")
        );
    }
    if table.labelled
        && !model.class_names.is_empty()
        && !table.class_names.is_empty()
        && model.class_names != table.class_names
    {
        bail!(
            "the data's classes ({}) are not the model's ({}): give the same classes= list",
            table.class_names.join("|"),
            model.class_names.join("|")
        );
    }
    let device = dpfl_ml::model::parse_device(&a.device)?;
    let p = predict(&model, &table.data, device)?;
    let name = |c: i64| {
        model
            .class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| c.to_string())
    };
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?,
    );
    let probs: Vec<String> = (0..p.num_classes as i64)
        .map(|c| format!("p_{}", name(c)))
        .collect();
    writeln!(out, "row,predicted,{}", probs.join(","))?;
    for (i, c) in p.class.iter().enumerate() {
        let row = &p.prob[i * p.num_classes..(i + 1) * p.num_classes];
        let row: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
        writeln!(out, "{i},{},{}", name(*c), row.join(","))?;
    }
    out.flush()?;
    println!("wrote {} predictions to {}", p.class.len(), a.out.display());
    if table.labelled {
        let s = score(&p, &table.data.labels);
        let mut line = format!("examples={} accuracy={:.4}", s.n, s.accuracy);
        if let Some(auc) = s.auc {
            line += &format!(" auc={auc:.4}");
        }
        if let Some(f1) = s.f1 {
            line += &format!(" f1={f1:.4}");
        }
        println!("{line}");
        if let Some(path) = &a.metrics_json {
            let v = serde_json::json!({
                "examples": s.n, "accuracy": s.accuracy, "auc": s.auc, "f1": s.f1,
            });
            std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")?;
        }
    }
    Ok(())
}
