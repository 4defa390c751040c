//! `dpfl-predict`: applies a saved global model (with the standardisation and class names
//! stored in its file; a TorchScript model with its module file) to a data set; writes one
//! prediction per row and, when the data has labels, prints accuracy and, for two classes,
//! AUC and F1. The work is `dpfl_client::predict::run`, which the tests call too.

use anyhow::Result;
use clap::Parser;
use dpfl_client::predict::{run, PredictOptions};
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  dpfl-predict --model runs/x/model.safetensors --data csv:new.csv,label=diagnosis
  dpfl-predict --model runs/x/model.safetensors --data 'csv:new.csv,label=none' --out pred.csv
  dpfl-predict --model runs/x/model.safetensors --module model.pt --data fashion-mnist-test";

/// Predicts with a federated model: the same feature transform as in training (saved in
/// the model file), one row of class probabilities per example.
#[derive(Parser, Debug)]
#[command(name = "dpfl-predict", version, after_help = EXAMPLES)]
struct Args {
    /// Model file written by the server (`model.safetensors`, or `model-best.safetensors`).
    #[arg(long)]
    model: PathBuf,
    /// The TorchScript module file the model was trained with (a TorchScript model only;
    /// its spec hash must be the one recorded in the model file).
    #[arg(long)]
    module: Option<PathBuf>,
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
    let options = PredictOptions {
        model: a.model,
        module: a.module,
        data: a.data.parse()?,
        out: a.out,
        metrics_json: a.metrics_json,
        limit: a.limit,
        device: a.device,
    };
    let report = run(&options)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "wrote {} predictions to {}",
        report.rows,
        options.out.display()
    );
    if let Some(s) = report.scores {
        let mut line = format!(
            "examples={} correct={} accuracy={:.4}",
            s.n, s.correct, s.accuracy
        );
        if let Some(auc) = s.auc {
            line += &format!(" auc={auc:.4}");
        }
        if let Some(f1) = s.f1 {
            line += &format!(" f1={f1:.4}");
        }
        println!("{line}");
    }
    Ok(())
}
