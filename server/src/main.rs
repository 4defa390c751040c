//! `dpfl-server`: parse arguments into a validated config, then run the same
//! [`dpfl_server::Server`] the tests run.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;

/// dpfl aggregation server: authenticates client nodes by certificate (mutual TLS over
/// QUIC), runs federated rounds (select, train, collect, aggregate, evaluate), keeps a
/// privacy ledger and checkpoints every round.
///
/// Settings come from a TOML file (see configs/) and can be overridden by the flags
/// below or by `--set key=value` for any key of the file (e.g. `--set dp.noise_multiplier=1.1`).
#[derive(Parser, Debug)]
#[command(name = "dpfl-server", version, allow_negative_numbers = true)]
struct Args {
    /// TOML configuration file. Without it, built-in defaults are used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// UDP address to listen on, e.g. 127.0.0.1:4433 (key `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Directory with ca.pem, server.pem and server.key (key `certs_dir`).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Number of rounds (key `rounds`).
    #[arg(long)]
    rounds: Option<u64>,
    /// Clients that must be connected before a round starts (key `min_clients`).
    #[arg(long)]
    min_clients: Option<usize>,
    /// Output directory for metrics.jsonl, ledger.json, model.safetensors and the
    /// checkpoint (key `out_dir`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Held-out test data: fashion-mnist-test, idx:IMAGES,LABELS or csv:PATH[,label=COL]
    /// (key `test_data`).
    #[arg(long)]
    test_data: Option<String>,
    /// Differential privacy mode: none, local or central (key `dp.mode`).
    #[arg(long)]
    dp_mode: Option<String>,
    /// Noise multiplier z (key `dp.noise_multiplier`).
    #[arg(long)]
    noise_multiplier: Option<f64>,
    /// L2 clipping bound C (key `dp.clip_norm`).
    #[arg(long)]
    clip_norm: Option<f64>,
    /// Poisson client sampling rate q per round under DP (key `dp.sampling_rate`).
    #[arg(long)]
    sampling_rate: Option<f64>,
    /// Stop before the round that would exceed this epsilon (key `dp.target_epsilon`).
    #[arg(long)]
    target_epsilon: Option<f64>,
    /// Ignore an existing checkpoint and start from round 1 (key `resume = false`).
    #[arg(long)]
    fresh: bool,
    /// Override any configuration key: --set strategy.server_optimizer.kind=fedadam
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn overrides(a: &Args) -> Result<Vec<(String, String)>> {
    let mut o = Vec::new();
    let q = |s: &str| format!("{s:?}");
    if let Some(v) = &a.listen {
        o.push(("listen".into(), q(v)));
    }
    if let Some(v) = &a.certs {
        o.push(("certs_dir".into(), q(&v.display().to_string())));
    }
    if let Some(v) = a.rounds {
        o.push(("rounds".into(), v.to_string()));
    }
    if let Some(v) = a.min_clients {
        o.push(("min_clients".into(), v.to_string()));
    }
    if let Some(v) = &a.out {
        o.push(("out_dir".into(), q(&v.display().to_string())));
    }
    if let Some(v) = &a.test_data {
        o.push(("test_data".into(), q(v)));
    }
    if let Some(v) = &a.dp_mode {
        o.push(("dp.mode".into(), q(v)));
    }
    if let Some(v) = a.noise_multiplier {
        o.push(("dp.noise_multiplier".into(), format!("{v:?}")));
    }
    if let Some(v) = a.clip_norm {
        o.push(("dp.clip_norm".into(), format!("{v:?}")));
    }
    if let Some(v) = a.sampling_rate {
        o.push(("dp.sampling_rate".into(), format!("{v:?}")));
    }
    if let Some(v) = a.target_epsilon {
        o.push(("dp.target_epsilon".into(), format!("{v:?}")));
    }
    if a.fresh {
        o.push(("resume".into(), "false".into()));
    }
    for s in &a.set {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
        o.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(o)
}

#[tokio::main]
async fn main() -> Result<()> {
    dpfl_server::service::init_tracing("info");
    let args = Args::parse();
    let cfg = dpfl_server::ServerConfig::load(args.config.as_deref(), &overrides(&args)?)?;
    let server = dpfl_server::Server::bind(cfg)?;
    let summary = server.run(dpfl_server::service::shutdown_signal()).await?;
    println!(
        "done: {} rounds, test accuracy {}, {:.1}s",
        summary.rounds_completed,
        summary
            .test_accuracy
            .map_or("-".into(), |a| format!("{a:.4}")),
        summary.seconds
    );
    Ok(())
}
