//! The QUIC transport: the real `dpfl-server` and one real `dpfl-client` node per virtual
//! client, in this process, talking QUIC with mutual TLS over 127.0.0.1 (certificates in a
//! temporary directory). For populations small enough to hold one connection and one
//! training thread per client.
//!
//! Same seed, same final model as the in-memory transport, up to one documented source of
//! non-determinism: updates are folded into the running sum in arrival order, and f32
//! addition is not associative, so the last bits can differ.

use crate::experiment::SimConfig;
use crate::run::{budget_epsilon, Population, RoundRow, RunResult, SimError};
use dpfl_common::dp::GaussianNoise;
use dpfl_ml::partition::derive_seed;
use dpfl_ml::DataSource;
use dpfl_server::{Server, ServerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest population this transport accepts (one connection and thread per client).
pub const MAX_QUIC_CLIENTS: usize = 200;

pub(crate) fn run_quic(
    cfg: &SimConfig,
    pop: &Population,
    test: Option<dpfl_ml::Dataset>,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult, SimError> {
    if pop.names.len() > MAX_QUIC_CLIENTS {
        return Err(SimError::Transport(format!(
            "{} clients is more than the QUIC transport's {MAX_QUIC_CLIENTS}; use the in-memory transport",
            pop.names.len()
        )));
    }
    if cfg.population.attack.is_some() {
        return Err(SimError::Transport(
            "attacks are simulated by the in-memory transport only".into(),
        ));
    }
    // Every node would fail on a device this machine lacks: refuse it once, up front.
    crate::run::sim_device(cfg)?;
    let started = Instant::now();
    let tmp = tempfile::tempdir().map_err(|e| SimError::Transport(e.to_string()))?;
    let certs = tmp.path().join("certs");
    dpfl_certs::create_dev_federation(
        &certs,
        &["localhost".into()],
        "node",
        pop.names.len(),
        false,
    )
    .map_err(|e| SimError::Transport(e.to_string()))?;
    // Every certificate is issued: the CA key has no business next to the server's.
    std::fs::remove_file(dpfl_certs::Layout::new(&certs).ca_key())
        .map_err(|e| SimError::Transport(e.to_string()))?;
    let test_path = match &test {
        Some(t) => {
            // Hand the server the test set as a CSV it can read back.
            let p = tmp.path().join("test.csv");
            write_csv(&p, t).map_err(|e| SimError::Transport(e.to_string()))?;
            Some(format!("csv:{}", p.display()))
        }
        None => None,
    };
    let out = tmp.path().join("server");
    let scfg = ServerConfig {
        listen: "127.0.0.1:0"
            .parse()
            .map_err(|e| SimError::Transport(format!("{e}")))?,
        certs_dir: certs.clone(),
        rounds: cfg.rounds,
        min_clients: pop.names.len(),
        round_timeout_secs: 3600.0,
        eval_timeout_secs: 600.0,
        max_round_retries: cfg.max_round_retries,
        out_dir: out.clone(),
        test_data: test_path,
        test_limit: None,
        resume: false,
        model: cfg.model.clone(),
        train: cfg.train.clone(),
        strategy: cfg.strategy.clone(),
        dp: cfg.dp,
        secure_aggregation: cfg.secure_aggregation,
        secagg: cfg.secagg,
        eval_threads: 1,
        // As the in-memory transport: simulated clients' weights are not capped.
        update_limits: dpfl_server::coordinator::UpdateLimits {
            max_weight_share: 1.0,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let server_noise: Box<dyn GaussianNoise> =
        crate::run::noise(cfg.sampler, derive_seed(cfg.seed, 2));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| SimError::Transport(e.to_string()))?;
    let layout = dpfl_certs::Layout::new(&certs);
    let summary = rt.block_on(async {
        let server = Server::bind_with_noise(scfg, server_noise)
            .map_err(|e| SimError::Transport(e.to_string()))?;
        let addr = server
            .local_addr()
            .map_err(|e| SimError::Transport(e.to_string()))?;
        let handle = tokio::spawn(server.run(std::future::pending::<()>()));
        let mut clients = Vec::new();
        for (i, name) in pop.names.iter().enumerate() {
            let data = Arc::new(pop.data.subset(&pop.parts[i]));
            let mut c = dpfl_client::ClientConfig::new(
                addr,
                dpfl_certs::Credentials::node(&layout, name),
                DataSource::Memory(data),
            );
            c.device = cfg.device.clone();
            c.dp_mode = cfg.dp.mode;
            // Every node states the experiment's model (a TorchScript node needs the file).
            c.model = Some(
                cfg.model
                    .spec()
                    .map_err(|e| SimError::Transport(e.to_string()))?,
            );
            // Simulated nodes take the experiment's noise as given (a real node's floor is
            // its operator's choice; see dpfl-client --min-noise-multiplier).
            c.policy.min_noise_multiplier = 0.0;
            c.give_up_after = Duration::from_secs(60);
            let noise = crate::run::noise(cfg.sampler, derive_seed(cfg.seed, 1000 + i as u64));
            clients.push(tokio::spawn(dpfl_client::run_with_noise(c, noise)));
        }
        let summary = handle
            .await
            .map_err(|e| SimError::Transport(e.to_string()))?
            .map_err(|e| SimError::Transport(e.to_string()))?;
        for c in clients {
            c.await
                .map_err(|e| SimError::Transport(e.to_string()))?
                .map_err(|e| SimError::Transport(e.to_string()))?;
        }
        Ok::<_, SimError>(summary)
    })?;
    // Read against the experiment's spec (a TorchScript file cannot describe its module).
    let spec = cfg
        .model
        .spec()
        .map_err(|e| SimError::Transport(e.to_string()))?;
    let params = dpfl_ml::export::load_params_for(&spec, &out.join("model.safetensors"))
        .map_err(|e| SimError::Transport(e.to_string()))?;
    // The operator stream has every field (the public one, with DP on, only covered ones).
    let metrics = std::fs::read_to_string(out.join("operator").join("metrics.jsonl"))
        .map_err(|e| SimError::Transport(e.to_string()))?;
    let mut rows = Vec::new();
    for line in metrics.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| SimError::Transport(e.to_string()))?;
        let round = v["round"].as_u64().unwrap_or(0);
        rows.push(RoundRow {
            round,
            participants: v["participants"].as_u64().unwrap_or(0) as usize,
            test_accuracy: v["test_accuracy"].as_f64(),
            test_loss: v["test_loss"].as_f64(),
            epsilon: v["epsilon"].as_f64(),
            elapsed: started.elapsed().as_secs_f64(),
            abandoned: v["abandoned"].as_bool().unwrap_or(false),
            note: v["note"].as_str().map(str::to_string),
        });
        progress(round);
    }
    let (epsilon, epsilon_max_client, epsilon_server) = budget_epsilon(cfg, &summary.ledger);
    Ok(RunResult {
        secure_sum_exact: Vec::new(),
        audit: None,
        rounds: summary.rounds_completed,
        rows,
        final_params: params,
        epsilon,
        epsilon_max_client,
        epsilon_server,
        delta: cfg.dp.mode.is_private().then_some(cfg.dp.delta),
        finish: summary.finish.unwrap_or_else(|| "stopped".into()),
        seconds: started.elapsed().as_secs_f64(),
        clients: pop.names.len(),
    })
}

fn write_csv(path: &std::path::Path, d: &dpfl_ml::Dataset) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (row, label) in d.features.chunks(d.dim).zip(&d.labels) {
        for v in row {
            // `{}` prints the shortest representation that reads back to the same f32.
            write!(f, "{v},")?;
        }
        writeln!(f, "{label}")?;
    }
    f.flush()
}
