//! Helpers for the end-to-end tests: a throw-away federation (certificates in a temp
//! dir), a server running in-process on 127.0.0.1:0, and real client nodes.

use dpfl_certs::{Credentials, Layout};
use dpfl_client::ClientConfig;
use dpfl_server::{RunSummary, Server, ServerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::oneshot;

/// Model used by most tests: small enough to train in milliseconds, big enough to learn
/// Fashion-MNIST well above chance.
pub const SMALL_MODEL: [usize; 3] = [784, 32, 10];

/// Certificates and output directories of one test federation.
pub struct Federation {
    /// Keeps the temp dir alive.
    pub dir: tempfile::TempDir,
    /// Certificate layout.
    pub layout: Layout,
}

impl Federation {
    /// A CA, a server certificate for 127.0.0.1/localhost and `n` nodes `node-1..n`.
    pub fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        dpfl_certs::create_dev_federation(
            &certs,
            &["localhost".into(), "127.0.0.1".into()],
            "node",
            n,
            false,
        )
        .expect("certificates");
        Self {
            layout: Layout::new(certs),
            dir,
        }
    }

    /// Server config writing into `<tmp>/<name>`.
    pub fn server_config(&self, name: &str, overrides: &[(&str, &str)]) -> ServerConfig {
        let mut o: Vec<(String, String)> = vec![
            ("listen".into(), "\"127.0.0.1:0\"".into()),
            (
                "certs_dir".into(),
                format!("{:?}", self.layout.dir().display().to_string()),
            ),
            (
                "out_dir".into(),
                format!("{:?}", self.out(name).display().to_string()),
            ),
            ("model.layers".into(), format!("{SMALL_MODEL:?}")),
            ("test_data".into(), "\"fashion-mnist-test\"".into()),
            ("test_limit".into(), "2000".into()),
            ("round_timeout_secs".into(), "60".into()),
        ];
        o.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        ServerConfig::load(None, &o).expect("server config")
    }

    /// Output directory of a run.
    pub fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client `i` (1-based) of `n`, with a shard of Fashion-MNIST capped at `limit`.
    pub fn client(&self, addr: SocketAddr, i: usize, n: usize, limit: usize) -> ClientConfig {
        let mut c = ClientConfig::new(
            addr,
            Credentials::node(&self.layout, &format!("node-{i}")),
            dpfl_ml::DataSource::FashionMnistTrain,
        );
        c.shard = Some(dpfl_ml::Shard { index: i, count: n });
        c.limit = Some(limit);
        c.device = "cpu".into();
        c.give_up_after = Duration::from_secs(20);
        c
    }
}

/// A server running in-process.
pub struct RunningServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// Completes with the run's summary.
    pub done: tokio::task::JoinHandle<Result<RunSummary, dpfl_server::ServerError>>,
    /// Send to shut the server down (as SIGTERM would).
    pub shutdown: Option<oneshot::Sender<()>>,
}

/// Binds and starts a server.
pub fn start(server: Server) -> RunningServer {
    let addr = server.local_addr().expect("bound address");
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    RunningServer {
        addr,
        done,
        shutdown: Some(tx),
    }
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Reads `metrics.jsonl` of a run.
pub fn metrics(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// Reads `operator/metrics.jsonl` of a run (every field, operator-only).
pub fn operator_metrics(out: &std::path::Path) -> Vec<serde_json::Value> {
    metrics(&out.join("operator"))
}

/// A hand-made QUIC peer with `node`'s certificate that says `hello` and returns its
/// connection and the server's welcome (tests that play a misbehaving node go on from
/// there by hand).
pub async fn join_by_hand(
    layout: &Layout,
    node: &str,
    addr: SocketAddr,
    hello: dpfl_common::wire::Hello,
) -> (quinn::Connection, dpfl_common::wire::Welcome) {
    use dpfl_common::wire::{self, Header};
    let ep = dpfl_certs::quic::client_endpoint(
        &Credentials::node(layout, node),
        wire::ALPN,
        Duration::from_secs(30),
    )
    .expect("client endpoint");
    let conn = ep
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("connected");
    let (mut tx, mut rx) = conn.open_bi().await.expect("stream");
    tx.write_all(&wire::encode(&Header::Hello(hello), &[]))
        .await
        .expect("hello sent");
    tx.finish().expect("hello finished");
    let answer = rx.read_to_end(1 << 20).await.expect("welcome read");
    let welcome = wire::decode(&answer, 1 << 20).expect("welcome decoded");
    let Header::Welcome(w) = welcome.header else {
        panic!("not welcomed: {welcome:?}")
    };
    (conn, w)
}
