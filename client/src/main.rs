//! `dpfl-client`: parse arguments into a [`dpfl_client::ClientConfig`] and run the node.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;

/// dpfl client node: trains the federation's model on this organisation's private data
/// (never sent anywhere), clips and noises each update as the federation's DP mode
/// requires, and talks to the aggregation server over QUIC with mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "dpfl-client", version, allow_negative_numbers = true)]
struct Args {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: String,
    /// Name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Directory holding ca.pem and <name>.pem / <name>.key (see dpfl-certs).
    #[arg(long, default_value = "certs-dev")]
    certs: PathBuf,
    /// Node name: selects <certs>/<name>.pem and .key. The server identifies the node by
    /// its certificate, not by this flag.
    #[arg(long)]
    name: String,
    /// Private data: fashion-mnist, idx:IMAGES,LABELS or csv:PATH[,label=COLUMN].
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Use only slice i of n of the data (1-based; a seeded shuffle, disjoint across i).
    #[arg(long)]
    shard: Option<String>,
    /// Seed of the shard shuffle (must be equal on all nodes sharing a file).
    #[arg(long, default_value_t = 0)]
    shard_seed: u64,
    /// Use at most this many examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Fraction of local data kept for federated evaluation.
    #[arg(long, default_value_t = 0.0)]
    val_fraction: f64,
    /// Training device: auto (CUDA if available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// libtorch threads for local training.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// DP mode this node agrees to: none, local or central. Must equal the server's.
    #[arg(long, default_value = "none")]
    dp_mode: String,
    /// In local mode, refuse rounds whose noise multiplier is below this (the node owns
    /// its privacy: the server cannot lower it).
    #[arg(long, default_value_t = 1.0)]
    min_noise_multiplier: f64,
    /// Refuse any round that would bring this node's epsilon (its own books, across runs
    /// and restarts) above this.
    #[arg(long)]
    max_epsilon: Option<f64>,
    /// delta of the node's own (epsilon, delta).
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Where the node records what its data has spent (default: <certs>/<name>.privacy.json).
    #[arg(long)]
    privacy_state: Option<PathBuf>,
    /// Give up after this many seconds without a working connection.
    #[arg(long, default_value_t = 600)]
    give_up_after_secs: u64,
    /// Seconds of silence after which the server is presumed dead and the node reconnects.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Noise sampler in local mode: opendp (exact, default) or grid (floating-point-safe
    /// discrete Gaussian on a power-of-two grid, ~1000x faster).
    #[arg(long, default_value = "opendp")]
    sampler: String,
    /// Append a JSON line per round (own epsilon, loss, timings) to this file.
    #[arg(long)]
    log_file: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let a = Args::parse();
    let server = tokio::net::lookup_host(&a.server)
        .await
        .with_context(|| format!("resolving {}", a.server))?
        .next()
        .with_context(|| format!("{} resolves to no address", a.server))?;
    let layout = dpfl_certs::Layout::new(&a.certs);
    let mut cfg = dpfl_client::ClientConfig::new(
        server,
        dpfl_certs::Credentials::node(&layout, &a.name),
        a.data.parse()?,
    );
    cfg.server_name = a.server_name;
    cfg.shard = a.shard.as_deref().map(str::parse).transpose()?;
    cfg.shard_seed = a.shard_seed;
    cfg.limit = a.limit;
    cfg.val_fraction = a.val_fraction;
    cfg.device = a.device;
    cfg.threads = a.threads;
    cfg.dp_mode = a.dp_mode.parse()?;
    anyhow::ensure!(
        a.min_noise_multiplier.is_finite() && a.min_noise_multiplier >= 0.0,
        "--min-noise-multiplier must be >= 0"
    );
    anyhow::ensure!(a.delta > 0.0 && a.delta < 1.0, "--delta must be in (0, 1)");
    if let Some(m) = a.max_epsilon {
        anyhow::ensure!(m.is_finite() && m > 0.0, "--max-epsilon must be > 0");
    }
    cfg.policy = dpfl_client::budget::Policy {
        min_noise_multiplier: a.min_noise_multiplier,
        max_epsilon: a.max_epsilon,
        delta: a.delta,
    };
    cfg.privacy_state = Some(
        a.privacy_state
            .unwrap_or_else(|| a.certs.join(format!("{}.privacy.json", a.name))),
    );
    cfg.give_up_after = std::time::Duration::from_secs(a.give_up_after_secs);
    cfg.idle_timeout = std::time::Duration::from_secs(a.idle_timeout_secs.max(3));
    cfg.log_file = a.log_file;
    cfg.sampler = a.sampler.parse()?;
    let s = dpfl_client::run(cfg).await?;
    println!(
        "{}: trained in {} rounds; server: {}{}",
        s.node,
        s.rounds_trained,
        s.finish_reason,
        s.epsilon
            .map_or(String::new(), |e| format!("; own epsilon {e:.4}"))
    );
    Ok(())
}
