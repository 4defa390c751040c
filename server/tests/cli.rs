//! The `dpfl-server` binary as an operator meets it: the configuration reference in the
//! docs equals the code, `--help` has examples, logs go to stderr without colour codes,
//! a run in which no round ran exits non-zero, and a finished run is never overwritten.
//! Every network target is 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dpfl-server"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_configuration_reference_in_the_docs_is_what_the_code_prints() {
    let out = bin().args(["config", "--defaults"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let path = repo().join("docs").join("config-reference.toml");
    if std::env::var_os("DPFL_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &printed).unwrap();
    }
    let docs = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        docs == printed,
        "docs/config-reference.toml is out of date: regenerate it with \
         `target/release/dpfl-server config --defaults > docs/config-reference.toml` (or run \
         this test with DPFL_UPDATE_DOCS=1)"
    );
    // Every key has its meaning next to it, and the effective configuration prints too.
    assert!(printed.contains("# Rounds to run"));
    let eff = bin()
        .args(["--dp-mode", "central", "--set", "dp.delta=-1e-6", "config"])
        .output()
        .unwrap();
    assert!(!eff.status.success(), "a negative delta is refused");
    assert!(
        String::from_utf8_lossy(&eff.stderr).contains("delta"),
        "{}",
        String::from_utf8_lossy(&eff.stderr)
    );
    let eff = bin().args(["--rounds", "7", "config"]).output().unwrap();
    assert!(String::from_utf8_lossy(&eff.stdout).contains("rounds = 7"));
}

#[test]
fn help_shows_examples_and_negative_numbers_are_values() {
    let help = bin().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("Examples:") && text.contains("config --defaults"),
        "{text}"
    );
    assert!(text.contains("--http"), "{text}");
    // `--noise-multiplier -1` is read as a value and refused for what it is.
    let neg = bin()
        .args(["--noise-multiplier", "-1", "--dp-mode", "central", "config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&neg.stderr);
    assert!(!neg.status.success());
    assert!(
        err.contains("noise") && !err.contains("unexpected argument"),
        "{err}"
    );
}

fn kits(dir: &Path) -> PathBuf {
    let out = dir.join("fed");
    dpfl_certs::create_kits(
        &out,
        &dpfl_certs::KitOptions {
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            nodes: vec!["node-1".into()],
            days: 365,
            ca_days: 3650,
            server_addr: None,
            dp_mode: "none".into(),
            force: false,
        },
    )
    .unwrap();
    out
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn server(fed: &Path, out: &Path, port: u16, extra: &[&str], stderr: &Path) -> Child {
    bin()
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--certs", fed.join("server").to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .args(["--rounds", "1", "--min-clients", "1"])
        .args(["--set", "model.layers=[784, 32, 10]"])
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap()
}

fn finish(child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if t0.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("dpfl-server did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().unwrap()
}

fn wait_for(path: &Path, text: &str) {
    let t0 = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{text:?} never logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn logs_go_to_stderr_without_colour_and_a_run_without_rounds_exits_non_zero() {
    // Audit: the main job's server.log (stderr) was empty: logs went to stdout.
    let tmp = tempfile::tempdir().unwrap();
    let fed = kits(tmp.path());
    let log = tmp.path().join("server.log");
    let child = server(
        &fed,
        &tmp.path().join("run"),
        free_port(),
        &["--set", "status_log_secs=0.2"],
        &log,
    );
    wait_for(&log, "server listening");
    // The periodic line says whom the server waits for.
    wait_for(
        &log,
        "round 1 waits for clients: 0 of 1 (min_clients) connected",
    );
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = finish(child, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&log).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "no round ran: the exit status must say so"
    );
    assert!(stderr.contains("no round ran"), "{stderr}");
    assert!(stderr.contains(" INFO "), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a log file: {stderr:?}"
    );
    assert!(
        !stdout.contains("INFO") && !stdout.contains('\x1b'),
        "{stdout}"
    );
    // The server kit has no CA key, so no warning about it.
    assert!(!stderr.contains("holds the CA key"), "{stderr}");
}

#[test]
fn a_rerun_of_a_finished_job_exits_non_zero_and_leaves_summary_json_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let fed = kits(tmp.path());
    let run = tmp.path().join("run");
    let port = free_port();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = || {
        let layout = dpfl_certs::Layout::new(fed.join("node-1"));
        let mut c = dpfl_client::ClientConfig::new(
            format!("127.0.0.1:{port}").parse().unwrap(),
            dpfl_certs::Credentials::node(&layout, "node-1"),
            dpfl_ml::DataSource::FashionMnistTrain,
        );
        c.limit = Some(300);
        c.device = "cpu".into();
        c.give_up_after = Duration::from_secs(30);
        c
    };
    let first = server(&fed, &run, port, &[], &tmp.path().join("first.log"));
    let n = rt.spawn(dpfl_client::run(node()));
    let out = finish(first, Duration::from_secs(120));
    let first_log = std::fs::read_to_string(tmp.path().join("first.log")).unwrap();
    assert!(out.status.success(), "{first_log}");
    // A line when the round starts: attempt, how many selected, the deadline.
    assert!(
        first_log.contains(
            "round 1/1 started (attempt 1): 1 of 1 connected nodes selected; deadline in 5 min"
        ),
        "{first_log}"
    );
    assert!(first_log.contains("client joined"), "{first_log}");
    assert_eq!(rt.block_on(n).unwrap().unwrap().rounds_trained, 1);
    let summary = std::fs::read(run.join("summary.json")).unwrap();
    let model = std::fs::read(run.join("model.safetensors")).unwrap();
    // Again, without --fresh: nothing to do.
    let log = tmp.path().join("second.log");
    let t0 = Instant::now();
    let second = server(&fed, &run, port, &["--set", "finished_linger_secs=3"], &log);
    wait_for(&log, "is complete");
    let n = rt.spawn(dpfl_client::run(node()));
    let out = finish(second, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    assert!(t0.elapsed() < Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("is complete: 1 of 1 rounds"), "{stderr}");
    assert!(stderr.contains("--fresh"), "{stderr}");
    let told = rt.block_on(n).unwrap().unwrap();
    assert!(
        told.finish_reason.contains("run already complete"),
        "{}",
        told.finish_reason
    );
    assert_eq!(std::fs::read(run.join("summary.json")).unwrap(), summary);
    assert_eq!(std::fs::read(run.join("model.safetensors")).unwrap(), model);
}
