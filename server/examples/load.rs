//! Load harness: one `dpfl-server` process and N (default 1,000) concurrent authenticated
//! QUIC connections from this process, each with its own node certificate, running rounds
//! of a small model. Reports what the server held: connections, rounds, seconds per round,
//! peak memory and CPU time, read from /proc. Traffic stays on 127.0.0.1 and the run is
//! bounded in clients, rounds and time.
//!
//! `cargo run --release -p dpfl-server --example load -- [clients] [rounds]`

use dpfl_common::wire::{self, Header, Hello, Message, UpdateMeta};
use dpfl_common::DpMode;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn proc_stat(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((hwm, ticks / 100.0))
}

async fn node(
    ep: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    rounds_done: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let conn = ep.connect_with(cfg, addr, "localhost")?.await?;
    let (mut s, mut r) = conn.open_bi().await?;
    let hello = Hello {
        software: "load".into(),
        dp_mode: DpMode::None,
        input_dim: 16,
        num_classes: 2,
        num_examples: 1000,
        num_eval_examples: 0,
        class_names: Vec::new(),
    };
    s.write_all(&wire::encode(&Header::Hello(hello), &[]))
        .await?;
    s.finish()?;
    let w = wire::decode(&r.read_to_end(1 << 20).await?, 1 << 20)?;
    let Header::Welcome(w) = w.header else {
        anyhow::bail!("refused: {:?}", w.header);
    };
    let n = w.spec.num_params();
    while let Ok((mut s, mut r)) = conn.accept_bi().await {
        let req = wire::decode(&r.read_to_end(1 << 20).await?, 1 << 20)?;
        match req {
            Message {
                header: Header::Train(t),
                ..
            } => {
                let meta = UpdateMeta {
                    round: t.round,
                    spec_hash: t.spec_hash,
                    num_examples: 1,
                    metrics: None,
                    clipped: None,
                };
                s.write_all(&wire::encode(&Header::Update(meta), &vec![0.001; n]))
                    .await?;
                s.finish()?;
                rounds_done.fetch_add(1, Ordering::Relaxed);
            }
            _ => break,
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let clients: usize = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
        .min(5000);
    let rounds: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .min(100);
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?
        .join("dpfl-server");
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let t0 = Instant::now();
    dpfl_certs::create_dev_federation(&certs, &["localhost".into()], "node", clients, false)?;
    println!(
        "{clients} node certificates in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = Command::new(bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--certs",
            certs.to_str().unwrap_or_default(),
        ])
        .args(["--out", dir.path().join("run").to_str().unwrap_or_default()])
        .args([
            "--rounds",
            &rounds.to_string(),
            "--min-clients",
            &clients.to_string(),
        ])
        .args([
            "--set",
            "model.layers=[16, 8, 2]",
            "--set",
            "admission.handshakes_per_sec=5000",
        ])
        .args([
            "--set",
            "round_timeout_secs=60",
            "--set",
            &format!("strategy.min_fit_clients={clients}"),
        ])
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let done = Arc::new(AtomicUsize::new(0));
    let layout = dpfl_certs::Layout::new(&certs);
    let start = Instant::now();
    let tasks = rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let mut tasks = Vec::new();
        for i in 1..=clients {
            let creds = dpfl_certs::Credentials::node(&layout, &format!("node-{i}"));
            let tls = dpfl_certs::client_tls(&creds, wire::ALPN)?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
            let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
            cfg.transport_config(Arc::new(dpfl_certs::quic::transport(
                Duration::from_secs(60),
                8,
                dpfl_certs::quic::Windows::for_messages(1 << 20),
            )?));
            tasks.push(tokio::spawn(node(
                ep.clone(),
                cfg,
                format!("127.0.0.1:{port}").parse()?,
                done.clone(),
            )));
        }
        Ok::<_, anyhow::Error>(tasks)
    })?;
    let (mut hwm, mut cpu) = (0u64, 0f64);
    let status = loop {
        if let Some((h, c)) = proc_stat(server.id()) {
            hwm = hwm.max(h);
            cpu = c;
        }
        if let Some(s) = server.try_wait()? {
            break s;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "load run exceeded 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = start.elapsed().as_secs_f64();
    let failed = rt.block_on(async {
        let mut failed = 0;
        for t in tasks {
            if !matches!(t.await, Ok(Ok(()))) {
                failed += 1;
            }
        }
        failed
    });
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap_or_default();
    let per_round: Vec<String> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            format!(
                "{} clients in {:.2}s",
                v["participants"],
                v["seconds"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    println!(
        "server exit: {status}; {} updates answered; {failed} client tasks failed",
        done.load(Ordering::Relaxed)
    );
    println!("rounds: {}", per_round.join(", "));
    println!(
        "wall {secs:.1}s; server peak RSS {:.0} MiB; server CPU {cpu:.1}s",
        hwm as f64 / 1024.0
    );
    Ok(())
}
