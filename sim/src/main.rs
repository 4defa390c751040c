//! `dpfl-sim EXPERIMENT.toml`: run a privacy simulation and write tables and plots.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;

/// dpfl simulator: many virtual clients on one machine, driving the same coordinator,
/// strategies, DP and client update code as the real server and nodes. Writes, into
/// <out>/<name>/: <config>.jsonl per configuration, summary.csv, accuracy.{png,svg} and,
/// for private runs, frontier.{png,svg} (accuracy against epsilon).
#[derive(Parser, Debug)]
#[command(name = "dpfl-sim", version)]
struct Args {
    /// Experiment file (see experiments/).
    experiment: PathBuf,
    /// Results folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Transport: memory (default) or quic (real server and nodes on 127.0.0.1).
    #[arg(long)]
    transport: Option<String>,
    /// Override any key of the experiment: --set rounds=5 --set dp.noise_multiplier=1.2
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let mut overrides = Vec::new();
    if let Some(t) = &a.transport {
        overrides.push(("transport".to_string(), format!("{t:?}")));
    }
    for s in &a.set {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
        overrides.push((k.trim().to_string(), v.trim().to_string()));
    }
    let configs = dpfl_sim::experiment::load(&a.experiment, &overrides)?;
    println!(
        "{}: {} configuration(s)",
        a.experiment.display(),
        configs.len()
    );
    let bar = indicatif::ProgressBar::new(configs.iter().map(|c| c.config.rounds).sum());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} rounds  {elapsed_precise} eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (dir, finished) = dpfl_sim::run_experiment(configs, &a.out, &mut |done, _total, label| {
        bar.set_position(done);
        bar.set_message(label.to_string());
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    bar.finish_and_clear();
    print!("{}", dpfl_sim::report::table(&finished));
    println!("results in {}", dir.display());
    Ok(())
}
