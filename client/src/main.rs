//! `dpfl-client`: parse arguments into a [`dpfl_client::ClientConfig`] and run the node.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # From a node kit made by `dpfl-certs init` (its run-node.sh holds this line):
  dpfl-client --server fl.example.org:4433 --certs . --name node-1 \\
      --data csv:/data/records.csv,label=diagnosis --dp-mode central
  # A node whose key never left it (dpfl-certs request / sign):
  dpfl-client --server fl.example.org:4433 --certs certs --name hospital-a --data idx:IMG,LBL
  # The dev federation on this machine (certs-dev/ from `dpfl-certs init`):
  dpfl-client --server 127.0.0.1:4433 --name node-1 --data fashion-mnist --shard 1/10

The server's certificate must carry the host of --server (or --server-name). The node
retries with backoff (DNS failures included) until --give-up-after-secs.";

/// dpfl client node: trains the federation's model on this organisation's private data
/// (never sent anywhere), clips and noises each update as the federation's DP mode
/// requires, and talks to the aggregation server over QUIC with mutual TLS.
#[derive(Parser, Debug)]
#[command(
    name = "dpfl-client",
    version,
    allow_negative_numbers = true,
    after_help = EXAMPLES
)]
struct Args {
    /// Server address (host:port); a host name is resolved before every attempt.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: String,
    /// Name the server's certificate must carry (default: the host part of --server).
    #[arg(long)]
    server_name: Option<String>,
    /// Folder holding ca.pem and <name>.pem / <name>.key: the node's kit (default:
    /// certs-dev/<name>, the kit `dpfl-certs init` makes).
    #[arg(long)]
    certs: Option<PathBuf>,
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
    /// Pin the training thread(s) to these CPUs, e.g. `--pin-cpus 2` or `--pin-cpus 0,1`
    /// (Linux): spreads co-located nodes over the cores (see scripts/run-main-job.sh --pin).
    #[arg(long, value_delimiter = ',')]
    pin_cpus: Vec<usize>,
    /// DP mode this node agrees to: none, local, central or distributed. Must equal the
    /// server's.
    #[arg(long, default_value = "none")]
    dp_mode: String,
    /// In local and distributed mode, refuse rounds whose noise multiplier is below this (the node owns
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
    /// In distributed mode, refuse rounds whose noise is accounted over fewer
    /// contributors than this (if the others colluded with the server, this node's share
    /// carries 1/sqrt(n) of the noise).
    #[arg(long, default_value_t = 2)]
    min_contributors: usize,
    /// Where the node records what its data has spent (default: <certs>/<name>.privacy.json).
    #[arg(long)]
    privacy_state: Option<PathBuf>,
    /// Give up after this many seconds without a working connection.
    #[arg(long, default_value_t = 600.0)]
    give_up_after_secs: f64,
    /// Seconds one connection attempt may take (a dead address answers nothing).
    #[arg(long, default_value_t = 5.0)]
    connect_timeout_secs: f64,
    /// Seconds of silence after which the server is presumed dead and the node reconnects.
    #[arg(long, default_value_t = 10)]
    idle_timeout_secs: u64,
    /// Noise sampler in local mode: opendp (exact, default) or grid (floating-point-safe
    /// discrete Gaussian on a power-of-two grid, ~1000x faster).
    #[arg(long, default_value = "opendp")]
    sampler: String,
    /// The model this node agrees to train, e.g. mlp:784,200,200,10,
    /// cnn:1x28x28:32,64:5:512,10 (input CxHxW, conv channels, kernel, dense widths to the
    /// classes) or torchscript:model.pt:784:10 (a module file, features, classes; required
    /// for a TorchScript federation). A server that trains another model is refused.
    /// Default: the server's.
    #[arg(long, conflicts_with = "layers")]
    model: Option<String>,
    /// Shorthand for --model mlp:W0,W1,...: MLP layer widths, inputs to classes.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Append a JSON line per round (own epsilon, loss, timings) to this file.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Take part only in securely aggregated exchanges: refuse train requests without
    /// secure aggregation and requests for the feature statistics in the clear.
    #[arg(long)]
    secure_aggregation: bool,
    /// Fraction of a secure-aggregation round's participants this node assumes may collude
    /// with the server: rounds whose graph and threshold do not keep its input private
    /// under that assumption (and --secagg-dropout-rate) are refused.
    #[arg(long, default_value_t = 0.05)]
    secagg_adversarial_rate: f64,
    /// Fraction of a secure-aggregation round's participants this node assumes may drop out.
    #[arg(long, default_value_t = 0.05)]
    secagg_dropout_rate: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    // Logs to stderr, colour only on a terminal (stdout: the result line).
    init_tracing();
    let a = Args::parse();
    let (host, _port) = split_host_port(&a.server)?;
    let certs = a
        .certs
        .clone()
        .unwrap_or_else(|| PathBuf::from("certs-dev").join(&a.name));
    let layout = dpfl_certs::Layout::new(&certs);
    // Resolved before every attempt (DNS failures are retried like a dead server).
    let placeholder = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut cfg = dpfl_client::ClientConfig::new(
        placeholder,
        dpfl_certs::Credentials::node(&layout, &a.name),
        a.data.parse()?,
    );
    cfg.server_host = Some(a.server.clone());
    cfg.server_name = a.server_name.clone().unwrap_or(host);
    cfg.expected_name = Some(a.name.clone());
    anyhow::ensure!(
        a.give_up_after_secs.is_finite() && a.give_up_after_secs > 0.0,
        "--give-up-after-secs must be > 0"
    );
    anyhow::ensure!(
        a.connect_timeout_secs.is_finite() && a.connect_timeout_secs > 0.0,
        "--connect-timeout-secs must be > 0"
    );
    cfg.connect_timeout = std::time::Duration::from_secs_f64(a.connect_timeout_secs);
    cfg.shard = a.shard.as_deref().map(str::parse).transpose()?;
    cfg.shard_seed = a.shard_seed;
    cfg.limit = a.limit;
    cfg.val_fraction = a.val_fraction;
    cfg.device = a.device;
    cfg.threads = a.threads;
    cfg.pin_cpus = a.pin_cpus;
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
        min_contributors: a.min_contributors,
    };
    cfg.privacy_state = Some(
        a.privacy_state
            .unwrap_or_else(|| certs.join(format!("{}.privacy.json", a.name))),
    );
    cfg.give_up_after = std::time::Duration::from_secs_f64(a.give_up_after_secs);
    cfg.idle_timeout = std::time::Duration::from_secs(a.idle_timeout_secs.max(3));
    cfg.log_file = a.log_file;
    cfg.sampler = a.sampler.parse()?;
    cfg.secure_aggregation = a.secure_aggregation;
    cfg.secagg_threat.adversarial_rate = a.secagg_adversarial_rate;
    cfg.secagg_threat.dropout_rate = a.secagg_dropout_rate;
    cfg.model = match (&a.model, &a.layers) {
        (Some(m), _) => Some(match dpfl_ml::torchscript::parse_arg(m) {
            Some(script) => script.context("--model")?,
            None => m.parse().context("--model")?,
        }),
        (None, Some(l)) => Some(dpfl_common::ModelSpec::new(l.clone()).context("--layers")?),
        (None, None) => None,
    };
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

fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

/// The host and port of `host:port` (`[v6]:port` too): the host is the name the server's
/// certificate must carry unless --server-name says otherwise.
fn split_host_port(s: &str) -> Result<(String, u16)> {
    let (host, port) = s
        .rsplit_once(':')
        .with_context(|| format!("--server {s:?}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--server {s:?}: bad port {port:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    anyhow::ensure!(!host.is_empty(), "--server {s:?}: empty host");
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_server_name_defaults_to_the_host_of_server() {
        assert_eq!(
            super::split_host_port("fl.example.org:4433").unwrap(),
            ("fl.example.org".into(), 4433)
        );
        assert_eq!(
            super::split_host_port("[::1]:4433").unwrap(),
            ("::1".into(), 4433)
        );
        assert_eq!(
            super::split_host_port("127.0.0.1:9").unwrap(),
            ("127.0.0.1".into(), 9)
        );
        assert!(super::split_host_port("fl.example.org").is_err());
        assert!(super::split_host_port(":4433").is_err());
    }
}
