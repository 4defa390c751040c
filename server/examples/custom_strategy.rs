//! A user-defined strategy, plugged into the real server.
//!
//! `LossFilteredFedAvg` keeps the built-in client selection and server optimizer of
//! [`FedAvg`] but aggregates only the updates whose reported training loss is at most the
//! median of the round: a simple guard against nodes with broken data. It buffers the
//! round's results (a filter needs them all), tells which nodes it dropped, and falls back
//! to keeping the previous model when nothing is left.
//!
//! Run it: `cargo run --release -p dpfl-server --example custom_strategy`
//! (a server and three client nodes over QUIC/mTLS on 127.0.0.1, Fashion-MNIST slices).

use dpfl_server::strategy::{
    Failure, FedAvg, FedAvgConfig, FitPlan, FitResult, NodeId, Strategy, StrategyError,
    TrainSettings,
};
use rand::RngCore;

/// FedAvg over the better half of the round's updates, by reported training loss.
pub struct LossFilteredFedAvg {
    inner: FedAvg,
    round: Vec<FitResult>,
    /// Nodes dropped in the last aggregated round.
    pub dropped: Vec<NodeId>,
}

impl LossFilteredFedAvg {
    /// For a model of `num_params` parameters.
    pub fn new(cfg: FedAvgConfig, train: TrainSettings, num_params: usize) -> Self {
        Self {
            inner: FedAvg::new(cfg, train, num_params),
            round: Vec::new(),
            dropped: Vec::new(),
        }
    }
}

impl Strategy for LossFilteredFedAvg {
    fn name(&self) -> String {
        format!("loss-filtered({})", self.inner.name())
    }

    fn configure_fit(
        &mut self,
        round: u64,
        available: &[NodeId],
        rng: &mut dyn RngCore,
    ) -> FitPlan {
        self.round.clear();
        self.inner.configure_fit(round, available, rng)
    }

    fn accumulate(&mut self, _round: u64, result: FitResult) -> Result<(), StrategyError> {
        self.round.push(result);
        Ok(())
    }

    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &[f32],
        failures: &[Failure],
    ) -> Result<Option<Vec<f32>>, StrategyError> {
        let mut losses: Vec<f64> = self
            .round
            .iter()
            .map(|r| r.metrics.as_ref().map_or(f64::INFINITY, |m| m.loss))
            .collect();
        losses.sort_by(f64::total_cmp);
        let Some(median) = losses.get(losses.len().saturating_sub(1) / 2).copied() else {
            return Ok(None);
        };
        self.dropped.clear();
        for r in std::mem::take(&mut self.round) {
            let loss = r.metrics.as_ref().map_or(f64::INFINITY, |m| m.loss);
            if loss <= median {
                self.inner.accumulate(round, r)?;
            } else {
                self.dropped.push(r.node);
            }
        }
        self.inner.aggregate_fit(round, global, failures)
    }

    fn state(&self) -> serde_json::Value {
        self.inner.state()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), StrategyError> {
        self.inner.restore(state)
    }
}

/// Runs a small federation with this strategy: certificates in `dir`, three nodes.
pub async fn run_demo(
    dir: &std::path::Path,
    rounds: u64,
) -> anyhow::Result<dpfl_server::RunSummary> {
    let certs = dir.join("certs");
    dpfl_certs::create_dev_federation(&certs, &["localhost".into()], "node", 3, true)?;
    let overrides: Vec<(String, String)> = vec![
        ("listen".into(), "\"127.0.0.1:0\"".into()),
        (
            "certs_dir".into(),
            format!("{:?}", certs.display().to_string()),
        ),
        (
            "out_dir".into(),
            format!("{:?}", dir.join("run").display().to_string()),
        ),
        ("rounds".into(), rounds.to_string()),
        ("min_clients".into(), "3".into()),
        ("resume".into(), "false".into()),
        ("model.layers".into(), "[784, 32, 10]".into()),
        ("test_data".into(), "\"fashion-mnist-test\"".into()),
        ("test_limit".into(), "2000".into()),
    ];
    let cfg = dpfl_server::ServerConfig::load(None, &overrides)?;
    let strategy = LossFilteredFedAvg::new(
        cfg.strategy.clone(),
        cfg.train.clone(),
        cfg.spec().num_params(),
    );
    let server = dpfl_server::Server::bind_with_strategy(cfg, Box::new(strategy))?;
    let addr = server.local_addr()?;
    let run = tokio::spawn(server.run(std::future::pending::<()>()));
    let layout = dpfl_certs::Layout::new(&certs);
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let mut c = dpfl_client::ClientConfig::new(
            addr,
            dpfl_certs::Credentials::node(&layout, &format!("node-{i}")),
            dpfl_ml::DataSource::FashionMnistTrain,
        );
        c.shard = Some(dpfl_ml::Shard { index: i, count: 3 });
        c.limit = Some(1000);
        c.device = "cpu".into();
        nodes.push(tokio::spawn(dpfl_client::run(c)));
    }
    let summary = run.await??;
    for n in nodes {
        n.await??;
    }
    Ok(summary)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = run_demo(dir.path(), 5).await?;
    println!(
        "loss-filtered FedAvg: {} rounds, test accuracy {:.4}",
        s.rounds_completed,
        s.test_accuracy.unwrap_or(f64::NAN)
    );
    Ok(())
}
