//! Crash safety with real processes: the server is killed with SIGKILL after some rounds,
//! restarted with the same configuration, later stopped with SIGTERM and restarted again;
//! the client nodes keep retrying and rejoin on their own. The final ledger must count
//! every released model: every round of an uninterrupted run, plus any round whose model
//! left the server before the crash and that ran again after it; its epsilon is the
//! calculator's for that many releases. A fault-injection test kills the server exactly
//! in the window between release and checkpoint.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: u64 = 12;
const NODES: usize = 3;

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const Q: f64 = 0.7;
const Z: f64 = 1.2;

fn server(dir: &Path, certs: &Path, out: &str, port: u16) -> Child {
    server_with(dir, certs, out, port, ROUNDS, None)
}

fn server_with(
    dir: &Path,
    certs: &Path,
    out: &str,
    port: u16,
    rounds: u64,
    fault: Option<&str>,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{out}.log")))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpfl-server"));
    match fault {
        Some(f) => cmd.env("DPFL_FAULT", f),
        None => cmd.env_remove("DPFL_FAULT"),
    };
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--certs", certs.to_str().unwrap()])
        .args(["--out", dir.join(out).to_str().unwrap()])
        .args([
            "--rounds",
            &rounds.to_string(),
            "--min-clients",
            &NODES.to_string(),
        ])
        .args([
            "--dp-mode",
            "central",
            "--noise-multiplier",
            &Z.to_string(),
            "--clip-norm",
            "0.5",
            "--sampling-rate",
            &Q.to_string(),
        ])
        .args([
            "--set",
            "model.layers=[784, 32, 10]",
            "--set",
            "strategy.min_fit_clients=1",
        ])
        .args(["--set", "strategy.server_optimizer.kind=\"fedavgm\""])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn rounds_done(dir: &Path, out: &str) -> usize {
    std::fs::read_to_string(dir.join(out).join("metrics.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn wait_for_rounds(dir: &Path, out: &str, n: usize, child: &mut Child) {
    let t0 = Instant::now();
    while rounds_done(dir, out) < n {
        assert!(child.try_wait().unwrap().is_none(), "server exited early");
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn nodes(
    rt: &tokio::runtime::Runtime,
    certs: &Path,
    port: u16,
) -> Vec<tokio::task::JoinHandle<Result<dpfl_client::NodeSummary, dpfl_client::NodeError>>> {
    let layout = dpfl_certs::Layout::new(certs);
    (1..=NODES)
        .map(|i| {
            let mut c = dpfl_client::ClientConfig::new(
                format!("127.0.0.1:{port}").parse().unwrap(),
                dpfl_certs::Credentials::node(&layout, &format!("node-{i}")),
                dpfl_ml::DataSource::FashionMnistTrain,
            );
            c.shard = Some(dpfl_ml::Shard {
                index: i,
                count: NODES,
            });
            c.limit = Some(1500);
            c.device = "cpu".into();
            c.dp_mode = dpfl_common::DpMode::Central;
            c.give_up_after = Duration::from_secs(60);
            // A SIGKILLed server sends nothing: notice within seconds, not a minute.
            c.idle_timeout = Duration::from_secs(3);
            rt.spawn(dpfl_client::run(c))
        })
        .collect()
}

fn ledger(dir: &Path, out: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(out).join("ledger.json")).unwrap())
        .unwrap()
}

/// Round numbers of the releases in a public ledger.
fn releases(l: &serde_json::Value) -> Vec<u64> {
    l["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .collect()
}

fn final_epsilon(l: &serde_json::Value) -> f64 {
    l["epsilon"].as_f64().unwrap()
}

/// A dev federation (CA, server, `NODES` nodes) under `dir/certs`.
fn dev_certs(dir: &Path) -> std::path::PathBuf {
    let certs = dir.join("certs");
    dpfl_certs::create_dev_federation(
        &certs,
        &["localhost".into(), "127.0.0.1".into()],
        "node",
        NODES,
        false,
    )
    .unwrap();
    certs
}

/// The ledger of a run that a crash or a stop ended `lifetimes - 1` times: each process
/// released consecutive rounds, starting from its checkpoint, which is never past the
/// journal (a restart may re-run released rounds, never skip one), and the last process
/// ended at round `last`. The checkpoint may lag the journal by more than one round: a
/// round whose Poisson sample is empty closes in the same step as the round before it,
/// and both are journaled before either is checkpointed.
fn assert_lifetimes(rounds: &[u64], lifetimes: usize, last: u64) {
    assert_eq!(rounds.first(), Some(&1), "{rounds:?}");
    assert_eq!(rounds.last(), Some(&last), "{rounds:?}");
    let restarts = rounds.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(
        restarts < lifetimes,
        "{restarts} restarts in {lifetimes} processes: {rounds:?}"
    );
    assert!(
        rounds.windows(2).all(|w| w[1] >= 1 && w[1] <= w[0] + 1),
        "a restart skipped a round: {rounds:?}"
    );
}

fn calculator(steps: u64) -> f64 {
    dpfl_common::dp::accountant::epsilon(Q, Z, steps, 1e-5)
        .unwrap()
        .0
}

#[test]
fn killed_and_restarted_server_ends_with_the_ledger_of_an_uninterrupted_run() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dev_certs(dir);

    // Reference: one uninterrupted run.
    let port = free_port();
    let mut s = server(dir, &certs, "straight", port);
    let ns = nodes(&rt, &certs, port);
    assert!(s.wait().unwrap().success());
    for n in ns {
        rt.block_on(n).unwrap().unwrap();
    }

    // Interrupted: SIGKILL after 3 rounds, restart, SIGTERM after 7, restart.
    let port = free_port();
    let mut s = server(dir, &certs, "crashy", port);
    let ns = nodes(&rt, &certs, port);
    wait_for_rounds(dir, "crashy", 3, &mut s);
    s.kill().unwrap(); // SIGKILL: no chance to clean up
    s.wait().unwrap();
    let killed_at = rounds_done(dir, "crashy");
    let mut s = server(dir, &certs, "crashy", port);
    wait_for_rounds(dir, "crashy", 7, &mut s);
    let term = Command::new("kill")
        .args(["-TERM", &s.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = s.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM must end the server cleanly: {status}"
    );
    let mut s = server(dir, &certs, "crashy", port);
    assert!(s.wait().unwrap().success());
    let mut rejoined = 0;
    for n in ns {
        let summary = rt.block_on(n).unwrap().unwrap();
        rejoined += summary.connections;
    }
    assert!(
        rejoined >= 3 * NODES as u32,
        "every node reconnected after each restart: {rejoined}"
    );
    assert!(killed_at < ROUNDS as usize);

    let (a, b) = (ledger(dir, "straight"), ledger(dir, "crashy"));
    assert_eq!(
        releases(&a),
        (1..=ROUNDS).collect::<Vec<_>>(),
        "no round lost or counted twice without a crash"
    );
    // After crashes: every round is there; a round whose model left before the crash and
    // that ran again afterwards is a second release and is counted twice.
    assert_lifetimes(&releases(&b), 3, ROUNDS);
    assert!((final_epsilon(&a) - calculator(ROUNDS)).abs() < 1e-9);
    let n = releases(&b).len() as u64;
    assert!((final_epsilon(&b) - calculator(n)).abs() < 1e-9);
    // Metrics: at least one line per round; a round that ran again after the kill (its
    // metrics line was written, its checkpoint not yet) appears twice.
    assert!(rounds_done(dir, "crashy") >= ROUNDS as usize);
}

#[test]
fn a_crash_between_release_and_checkpoint_leaves_a_ledger_that_counts_the_release() {
    // Audit: the next round's request (carrying the new noised model) went out before the
    // round's ledger and checkpoint were durable; a crash in that window released a model
    // the ledger never recorded.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dev_certs(dir);
    let rounds = 5;
    let port = free_port();
    // Abort right after round 3's model went out in round 4's requests, before round 3's
    // checkpoint.
    let mut s = server_with(
        dir,
        &certs,
        "fault",
        port,
        rounds,
        Some("abort-after-release:3"),
    );
    let ns = nodes(&rt, &certs, port);
    let status = s.wait().unwrap();
    assert!(!status.success(), "the injected fault aborts the server");
    // Round 3 was journaled before its release. So may be rounds 4, 5 if their Poisson
    // samples were empty: such a round closes, and is released, in the same step as the
    // round before it.
    let journaled = releases(&ledger(dir, "fault"));
    assert!(
        journaled.starts_with(&[1, 2, 3]),
        "round 3 was journaled before its release: {journaled:?}"
    );
    assert_lifetimes(&journaled, 1, *journaled.last().unwrap());
    let mut s = server_with(dir, &certs, "fault", port, rounds, None);
    assert!(s.wait().unwrap().success());
    for n in ns {
        rt.block_on(n).unwrap().unwrap();
    }
    let l = ledger(dir, "fault");
    // Round 3 ran again from the checkpoint of round 2: two releases of round 3 (and of 4
    // when it was journaled before the abort).
    let expected: Vec<u64> = journaled.iter().copied().chain(3..=rounds).collect();
    assert_eq!(releases(&l), expected);
    assert!((final_epsilon(&l) - calculator(expected.len() as u64)).abs() < 1e-9);
}
