//! `dpfl-server`: parse arguments into a validated config, then run the same
//! [`dpfl_server::Server`] the tests run.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # A federation's server, from the server kit of `dpfl-certs init`:
  cd fed/server && dpfl-server --config server.toml --http
  # The same from flags, central DP, status page on 127.0.0.1:9464:
  dpfl-server --listen 0.0.0.0:4433 --certs fed/server --out runs/study --min-clients 3 \\
      --dp-mode central --noise-multiplier 1.0 --clip-norm 0.5 --sampling-rate 0.5 --http
  # Any key of the file, on the command line:
  dpfl-server --config server.toml --set strategy.server_optimizer.kind=\\\"fedadam\\\"
  # Every key with its default and meaning; the effective configuration:
  dpfl-server config --defaults
  dpfl-server --config server.toml --rounds 20 config

A run in --out that is complete is never overwritten: the server says so and exits with
status 1 (use --fresh or another --out). It exits with status 1 whenever no round ran.";

/// dpfl aggregation server: authenticates client nodes by certificate (mutual TLS over
/// QUIC), runs federated rounds (select, train, collect, aggregate, evaluate), keeps a
/// privacy ledger and checkpoints every round.
///
/// Settings come from a TOML file (see configs/) and can be overridden by the flags
/// below or by `--set key=value` for any key of the file (e.g. `--set dp.noise_multiplier=1.1`).
#[derive(Parser, Debug)]
#[command(
    name = "dpfl-server",
    version,
    allow_negative_numbers = true,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = false
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
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
    /// Held-out test data: fashion-mnist-test, idx:IMAGES,LABELS or csv:PATH[,OPTIONS]
    /// (key `test_data`).
    #[arg(long)]
    test_data: Option<String>,
    /// MLP layer widths, inputs to classes, e.g. 30,16,16,2 (key `model.layers`).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Network: mlp or cnn (key `model.kind`; the CNN is `[model.cnn]`).
    #[arg(long)]
    model: Option<String>,
    /// Warm start: the first global model is this safetensors file's weights (key
    /// `model.init_model`).
    #[arg(long)]
    init_model: Option<PathBuf>,
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
    /// Status endpoint for the operator: dashboard at /, JSON at /status, Prometheus
    /// metrics at /metrics (key `http_listen`; without a value 127.0.0.1:9464). It shows
    /// operator-only data: keep it on loopback.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9464")]
    http: Option<String>,
    /// Override any configuration key: --set strategy.server_optimizer.kind=fedadam
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the configuration as TOML: with --defaults every key with its default and
    /// meaning (docs/config-reference.toml), otherwise the effective configuration after
    /// the file, the flags and --set.
    Config {
        /// Every key with its default and meaning.
        #[arg(long)]
        defaults: bool,
    },
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
    if let Some(v) = &a.layers {
        o.push(("model.layers".into(), format!("{v:?}")));
    }
    if let Some(v) = &a.model {
        o.push(("model.kind".into(), q(v)));
    }
    if let Some(v) = &a.init_model {
        o.push(("model.init_model".into(), q(&v.display().to_string())));
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
    if let Some(v) = &a.http {
        o.push(("http_listen".into(), q(v)));
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
    let args = Args::parse();
    if let Some(Cmd::Config { defaults }) = &args.command {
        if *defaults {
            print!("{}", dpfl_server::config::reference()?);
        } else {
            let cfg = dpfl_server::ServerConfig::load(args.config.as_deref(), &overrides(&args)?)?;
            print!(
                "{}",
                toml::to_string(&cfg).context("printing the configuration")?
            );
        }
        return Ok(());
    }
    dpfl_server::service::init_tracing("info");
    let cfg = dpfl_server::ServerConfig::load(args.config.as_deref(), &overrides(&args)?)?;
    let server = dpfl_server::Server::bind(cfg)?;
    let summary = server.run(dpfl_server::service::shutdown_signal()).await?;
    println!(
        "done: {} rounds ({} in this run), test accuracy {}, {:.1}s",
        summary.rounds_completed,
        summary.rounds_run,
        summary
            .test_accuracy
            .map_or("-".into(), |a| format!("{a:.4}")),
        summary.seconds
    );
    anyhow::ensure!(
        summary.rounds_run > 0,
        "no round ran in this process ({})",
        summary
            .finish
            .as_deref()
            .unwrap_or("stopped before the first round")
    );
    Ok(())
}
