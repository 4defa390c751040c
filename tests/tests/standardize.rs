//! Issue 15, federated standardisation over QUIC: three nodes with differently scaled,
//! label-skewed tables agree a mean and standard deviation before round 1, train on the
//! standardised data, and the saved model applies the same transform at inference. With
//! DP on, the statistics' release is a ledger row of its own.

use dpfl_client::ClientConfig;
use dpfl_common::config::DpMode;
use dpfl_common::dp::distributed::{self, DistributedParams, Mechanism};
use dpfl_server::Server;
use dpfl_tests::{init_logs, start, Federation};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(240);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .expect("test timed out")
}

/// Column scales far apart (as in the motivating table: an unscaled MLP stays at chance).
const SCALE: [f64; 4] = [1000.0, 0.001, 50.0, 1.0];
const OFFSET: [f64; 4] = [5000.0, 0.0, -20.0, 3.0];

/// `rows` rows, a fraction `pos` of them positive; every feature is the class direction
/// plus unit Gaussian noise, then scaled; `shift` moves this table's features (nodes differ);
/// every `missing_every`-th row has its second feature missing (`NA`).
fn table(rows: usize, pos: f64, shift: f64, missing_every: usize, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal = move || {
        // Box-Muller.
        let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen_range(0.0..1.0));
        (
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos(),
            v < pos,
        )
    };
    let mut s = String::from("f0,f1,f2,f3,outcome\n");
    for i in 0..rows {
        let (_, positive) = normal();
        let sign = if positive { 1.2 } else { -1.2 };
        let cells: Vec<String> = (0..4)
            .map(|j| {
                let x = OFFSET[j] + SCALE[j] * (sign + shift + normal().0);
                if j == 1 && missing_every > 0 && i % missing_every == 0 {
                    "NA".to_string()
                } else {
                    format!("{x:.6e}")
                }
            })
            .collect();
        s += &format!(
            "{},{}\n",
            cells.join(","),
            if positive { "pos" } else { "neg" }
        );
    }
    s
}

const OPTS: &str = "label=outcome,classes=neg|pos,missing=mean";

/// Writes the three nodes' tables and a test table; returns their data sources.
fn write_tables(dir: &Path) -> (Vec<String>, String) {
    // Sizes 150/300/450; 80 %, 25 % and 50 % positive; each shifted differently; node 2
    // has missing values.
    let nodes = [(150, 0.8, 0.3, 0), (300, 0.25, -0.2, 7), (450, 0.5, 0.0, 0)];
    let srcs = nodes
        .iter()
        .enumerate()
        .map(|(i, (n, p, shift, miss))| {
            let path = dir.join(format!("node{i}.csv"));
            std::fs::write(&path, table(*n, *p, *shift, *miss, 10 + i as u64)).unwrap();
            format!("csv:{},{OPTS}", path.display())
        })
        .collect();
    let test = dir.join("test.csv");
    std::fs::write(&test, table(400, 0.5, 0.0, 0, 99)).unwrap();
    (srcs, format!("csv:{},{OPTS}", test.display()))
}

fn node(fed: &Federation, addr: std::net::SocketAddr, i: usize, src: &str) -> ClientConfig {
    let mut c = fed.client(addr, i + 1, 3, 10_000);
    c.data = src.parse().unwrap();
    c.shard = None;
    c.limit = None;
    c
}

/// Pooled mean and population standard deviation, two passes in f64 over every present
/// value of every node's table (the reference the federated statistics must equal).
fn pooled(srcs: &[String]) -> (Vec<f64>, Vec<f64>) {
    let data: Vec<dpfl_ml::Dataset> = srcs
        .iter()
        .map(|s| s.parse::<dpfl_ml::DataSource>().unwrap().load().unwrap())
        .collect();
    let d = data[0].dim;
    let column = |j: usize| -> Vec<f64> {
        data.iter()
            .flat_map(|t| t.features.chunks(d).map(move |r| r[j] as f64))
            .filter(|x| !x.is_nan())
            .collect()
    };
    let mut mean = Vec::new();
    let mut std = Vec::new();
    for j in 0..d {
        let c = column(j);
        let m = c.iter().sum::<f64>() / c.len() as f64;
        let v = c.iter().map(|x| (x - m).powi(2)).sum::<f64>() / c.len() as f64;
        mean.push(m);
        std.push(v.sqrt());
    }
    (mean, std)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federated_standardisation_over_quic_equals_pooled_statistics_and_travels_with_the_model() {
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = fed.server_config(
        "std",
        &[
            ("rounds", "8"),
            ("min_clients", "3"),
            ("strategy.min_fit_clients", "3"),
            ("model.layers", "[4, 16, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("train.lr", "0.1"),
            ("standardize.enabled", "true"),
        ],
    );
    let mut server = Server::bind(cfg).unwrap();
    let mut seen = server.observe_statistics();
    let s = start(server);
    let clients: Vec<_> = (0..3)
        .map(|i| tokio::spawn(dpfl_client::run(node(&fed, s.addr, i, &srcs[i]))))
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        assert_eq!(within(c).await.unwrap().unwrap().rounds_trained, 8);
    }
    // In the clear the server holds every node's statistics (what secure aggregation
    // prevents, below).
    let mut senders = Vec::new();
    while let Ok(o) = seen.try_recv() {
        senders.push(o.node);
    }
    senders.sort();
    assert_eq!(senders, ["node-1", "node-2", "node-3"]);
    // The agreed transform is in the model file, and equals the pooled statistics.
    let out = fed.out("std");
    let model = dpfl_ml::predict::ModelFile::load(&out.join("model.safetensors")).unwrap();
    let t = model
        .standardizer
        .clone()
        .expect("the model carries its transform");
    let (mean, std) = pooled(&srcs);
    for j in 0..4 {
        assert!(
            (t.mean[j] - mean[j]).abs() <= 1e-9 * mean[j].abs().max(SCALE[j]),
            "feature {j}: mean {} vs pooled {}",
            t.mean[j],
            mean[j]
        );
        assert!(
            (t.std[j] - std[j]).abs() <= 1e-7 * std[j],
            "feature {j}: std {} vs pooled {}",
            t.std[j],
            std[j]
        );
    }
    assert!(t.bounds.is_none());
    // The same transform is kept for a restart.
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("standardize.json")).unwrap()).unwrap();
    assert_eq!(kept["contributors"], 3);
    assert_eq!(kept["standardizer"]["mean"][0].as_f64().unwrap(), t.mean[0]);
    // Training on standardised features is clearly better than chance (50 %).
    let acc = summary.test_accuracy.unwrap();
    assert!(acc > 0.85, "accuracy {acc}");
    // dpfl-predict's library on the raw test table applies the file's transform and
    // reproduces the server's accuracy on its (standardised) copy.
    let test = test_src
        .parse::<dpfl_ml::DataSource>()
        .unwrap()
        .load()
        .unwrap();
    let p = dpfl_ml::predict::predict(&model, &test, tch::Device::Cpu).unwrap();
    let scores = dpfl_ml::predict::score(&p, &test.labels);
    assert!(
        (scores.accuracy - acc).abs() < 1e-9,
        "prediction {} vs server {acc}",
        scores.accuracy
    );
    // Without the transform the same weights are useless on raw features.
    let mut raw = model.clone();
    raw.standardizer = None;
    let p = dpfl_ml::predict::predict(&raw, &test, tch::Device::Cpu).unwrap();
    assert!(dpfl_ml::predict::score(&p, &test.labels).accuracy < acc - 0.2);
    // No ledger row with DP off.
    assert!(summary.ledger.rounds.is_empty());
}

/// With central DP the statistics are released with the server's Gaussian noise; the
/// release is round 0 of the ledger (public and operator), with q = 1, multiplier 2 and
/// sensitivity sqrt(3d + 1), composed with the training rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dp_statistics_release_is_a_ledger_row_composed_with_training() {
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let bounds = "-1000:12000|-0.01:0.01|-300:300|-10:15";
    let cfg = fed.server_config(
        "std-dp",
        &[
            ("rounds", "2"),
            ("min_clients", "3"),
            ("strategy.min_fit_clients", "3"),
            ("model.layers", "[4, 16, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("dp.mode", "\"central\""),
            ("dp.noise_multiplier", "1.0"),
            ("dp.sampling_rate", "1.0"),
            ("standardize.enabled", "true"),
            ("standardize.bounds", &format!("{bounds:?}")),
            ("standardize.noise_multiplier", "2.0"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let mut c = node(&fed, s.addr, i, &srcs[i]);
            c.dp_mode = DpMode::Central;
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    // Client-level noise on the statistics of three nodes is large (sigma = 2 sqrt(13)
    // against counts near 3): the transform, and so training, may be poor; this test is
    // about the accounting. Nodes train every round (retries included).
    for c in clients {
        let n = within(c).await.unwrap().unwrap();
        assert!(n.rounds_trained >= 2);
        // The node's own books hold the statistics release too (z 2, then two rounds at 1).
        // Two rounds at z = 1 alone give 6.573 (analytic Gaussian, mu = sqrt(2)); with
        // the statistics 7.05141 (the references below): a bound at or above the latter
        // is one that charged the statistics.
        assert!(n.epsilon.unwrap() >= 7.051_413 - 1e-3, "{:?}", n.epsilon);
    }
    let rows = &summary.ledger.rounds;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let st = &rows[0];
    assert_eq!(st.round, 0);
    assert_eq!(st.noise_multiplier, 2.0);
    assert_eq!(st.sampling_rate, 1.0);
    assert_eq!(st.clip_norm, 13f64.sqrt(), "sensitivity sqrt(3 * 4 + 1)");
    assert_eq!(st.participants, 3);
    // Independent references (scipy 1.17, the analytic Gaussian mechanism of Balle and
    // Wang 2018 at delta 1e-5: q = 1 Gaussians compose into one with
    // mu = sqrt(sum 1/z^2)):
    //   z = 2 alone, mu = 0.5:             eps = 1.99309
    //   z = 2 then two rounds at z = 1, mu = 1.5: eps = 7.05141
    // Any valid accountant is at least these; the ledger's tightest bound (PLD) is within
    // 1 % of them.
    for (row, exact) in [(&rows[0], 1.993_091), (&rows[2], 7.051_413)] {
        assert!(
            row.epsilon >= exact - 1e-3 && row.epsilon <= exact * 1.01,
            "{} vs {exact}",
            row.epsilon
        );
    }
    // The public ledger lists the release as round 0.
    let public: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fed.out("std-dp").join("ledger.json")).unwrap())
            .unwrap();
    assert_eq!(public["releases"][0]["round"], 0);
    assert_eq!(public["releases"][0]["noise_multiplier"], 2.0);
    assert_eq!(public["releases"].as_array().unwrap().len(), 3);
    // The noised transform is still a usable one inside the bounds.
    let model =
        dpfl_ml::predict::ModelFile::load(&fed.out("std-dp").join("model.safetensors")).unwrap();
    let t = model.standardizer.unwrap();
    assert!(t.bounds.is_some() && t.std.iter().all(|s| *s > 0.0));
}

/// Issue 15: class names are agreed at join. A node whose `classes=` list differs from the
/// federation's (here: the server's test table's) is refused, and the message names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_another_class_list_is_refused_at_join() {
    init_logs();
    let fed = Federation::new(2);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = fed.server_config(
        "classes",
        &[
            ("rounds", "1"),
            ("min_clients", "1"),
            ("strategy.min_fit_clients", "1"),
            ("model.layers", "[4, 8, 2]"),
            ("test_data", &format!("{test_src:?}")),
        ],
    );
    let mut s = start(Server::bind(cfg).unwrap());
    // The same table read with the classes swapped: label 0 would mean `pos` here.
    let swapped = srcs[0].replace("classes=neg|pos", "classes=pos|neg");
    let e = within(dpfl_client::run(node(&fed, s.addr, 0, &swapped)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pos|neg") && e.contains("neg|pos") && e.contains("same order"),
        "{e}"
    );
    // A node with the federation's list joins and trains (the table without missing
    // values: this server does not standardise).
    let ok = within(dpfl_client::run(node(&fed, s.addr, 1, &srcs[2])))
        .await
        .unwrap();
    assert_eq!(ok.rounds_trained, 1);
    within(s.done).await.unwrap().unwrap();
    drop(s.shutdown.take());
}

/// Issue 15: with no test table naming classes, the first node to join sets the
/// federation's list, and it survives a server restart (`operator/classes.json`): the
/// resumed server refuses a node with another list, naming both, and accepts the list it
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_class_list_agreed_at_join_survives_a_server_restart() {
    init_logs();
    let fed = Federation::new(2);
    let (srcs, _) = write_tables(fed.dir.path());
    let cfg = |rounds: &str| {
        let mut c = fed.server_config(
            "classes-resume",
            &[
                ("rounds", rounds),
                ("min_clients", "1"),
                ("strategy.min_fit_clients", "1"),
                ("model.layers", "[4, 8, 2]"),
            ],
        );
        // No test table: nothing but the nodes names the classes.
        c.test_data = None;
        c
    };
    let recorded = fed
        .out("classes-resume")
        .join("operator")
        .join("classes.json");
    // The table without missing values (this server does not standardise).
    let s = start(Server::bind(cfg("1")).unwrap());
    assert!(!recorded.exists());
    let first = within(dpfl_client::run(node(&fed, s.addr, 1, &srcs[2])))
        .await
        .unwrap();
    assert_eq!(first.rounds_trained, 1);
    within(s.done).await.unwrap().unwrap();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&recorded).unwrap()).unwrap();
    assert_eq!(file["classes"], serde_json::json!(["neg", "pos"]));

    // Resumed for a second round: the first node to join now has the classes swapped.
    let mut s = start(Server::bind(cfg("2")).unwrap());
    let swapped = srcs[2].replace("classes=neg|pos", "classes=pos|neg");
    let e = within(dpfl_client::run(node(&fed, s.addr, 0, &swapped)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("classes are pos|neg") && e.contains("federation's are neg|pos"),
        "{e}"
    );
    let ok = within(dpfl_client::run(node(&fed, s.addr, 1, &srcs[2])))
        .await
        .unwrap();
    assert_eq!(ok.rounds_trained, 1);
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 2);
    drop(s.shutdown.take());
}

/// The agreed transform survives a server restart: the resumed server sends the same one
/// (from `standardize.json`) and asks nobody for statistics again, even when the node
/// that joins alone would give other statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_server_sends_the_transform_agreed_before_the_restart() {
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = |rounds: &str, min: &str| {
        fed.server_config(
            "resume",
            &[
                ("rounds", rounds),
                ("min_clients", min),
                // Part of the resume fingerprint: the same in both runs.
                ("strategy.min_fit_clients", "1"),
                ("model.layers", "[4, 16, 2]"),
                ("test_data", &format!("{test_src:?}")),
                ("train.lr", "0.1"),
                ("standardize.enabled", "true"),
            ],
        )
    };
    let s = start(Server::bind(cfg("2", "3")).unwrap());
    let clients: Vec<_> = (0..3)
        .map(|i| tokio::spawn(dpfl_client::run(node(&fed, s.addr, i, &srcs[i]))))
        .collect();
    within(s.done).await.unwrap().unwrap();
    for c in clients {
        within(c).await.unwrap().unwrap();
    }
    let out = fed.out("resume");
    let agreed = std::fs::read(out.join("standardize.json")).unwrap();
    let first = dpfl_ml::predict::ModelFile::load(&out.join("model.safetensors"))
        .unwrap()
        .standardizer
        .unwrap();
    // Two more rounds with one node: a fresh exchange would agree on its statistics alone.
    let s = start(Server::bind(cfg("4", "1")).unwrap());
    let n = within(dpfl_client::run(node(&fed, s.addr, 2, &srcs[2])))
        .await
        .unwrap();
    assert_eq!(n.rounds_trained, 2);
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 4);
    assert_eq!(std::fs::read(out.join("standardize.json")).unwrap(), agreed);
    let second = dpfl_ml::predict::ModelFile::load(&out.join("model.safetensors"))
        .unwrap()
        .standardizer
        .unwrap();
    assert_eq!(second, first);
    let alone = pooled(&srcs[2..]);
    assert!(
        (first.mean[0] - alone.0[0]).abs() > 1.0,
        "the check can tell them apart"
    );
}

/// Local DP: every node noises its own (bounded, normalised) statistics after checking the
/// multiplier against its own floor; the ledger row is against the server (z/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_dp_nodes_noise_their_own_statistics_and_refuse_too_little_noise() {
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let bounds = "-1000:12000|-0.01:0.01|-300:300|-10:15";
    let cfg = fed.server_config(
        "local",
        &[
            ("rounds", "1"),
            ("min_clients", "2"),
            ("strategy.min_fit_clients", "2"),
            ("model.layers", "[4, 16, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("dp.mode", "\"local\""),
            ("dp.noise_multiplier", "4.0"),
            ("dp.sampling_rate", "1.0"),
            ("standardize.enabled", "true"),
            ("standardize.bounds", &format!("{bounds:?}")),
            ("standardize.noise_multiplier", "4.0"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let mut c = node(&fed, s.addr, i, &srcs[i + 1]);
            c.dp_mode = DpMode::Local;
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    // Statistics and one update at z = 4 against the server (mu = sqrt(0.5), analytic
    // Gaussian at delta 1e-5: 2.94323 by scipy 1.17); statistics alone (mu = 0.5): 1.99309.
    // A retried attempt is a release of its own (more rows, more spend), so the first
    // training row is the one with a fixed reference.
    for c in clients {
        let n = within(c).await.unwrap().unwrap();
        assert!(n.rounds_trained >= 1);
        let e = n.epsilon.unwrap();
        assert!(e >= 2.942, "{e}");
    }
    let rows = &summary.ledger.rounds;
    assert_eq!((rows[0].round, rows[0].noise_multiplier), (0, 4.0));
    assert!(
        (1.992..=1.9931 * 1.01).contains(&rows[0].epsilon),
        "{rows:?}"
    );
    assert!(
        (2.942..=2.9433 * 1.01).contains(&rows[1].epsilon),
        "{rows:?}"
    );
    // The exact-statistics node count is operator-only; both nodes contributed.
    assert!(summary.ledger.clients.values().all(|c| c.statistics));
    // A node whose floor is above the statistics' multiplier refuses to send them.
    let cfg = fed.server_config(
        "local-floor",
        &[
            ("rounds", "1"),
            ("min_clients", "1"),
            ("model.layers", "[4, 16, 2]"),
            ("dp.mode", "\"local\""),
            ("dp.noise_multiplier", "4.0"),
            ("standardize.enabled", "true"),
            ("standardize.bounds", &format!("{bounds:?}")),
            ("standardize.noise_multiplier", "1.5"),
            ("test_data", &format!("{test_src:?}")),
        ],
    );
    let server = Server::bind(cfg).unwrap();
    let obs = server.observatory();
    let mut s = start(server);
    let mut c = node(&fed, s.addr, 2, &srcs[0]);
    c.dp_mode = DpMode::Local;
    c.policy.min_noise_multiplier = 2.0;
    c.give_up_after = Duration::from_secs(3);
    let n = tokio::spawn(dpfl_client::run(c));
    // The node answers the request for statistics with a refusal (its one answer); the
    // server then has nothing to agree and starts no round, until shut down.
    within(async {
        while obs.status().nodes.get("node-3").map_or(0, |n| n.answers) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = s.shutdown.take().unwrap().send(());
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_run, 0);
    assert!(summary.ledger.rounds.is_empty(), "nothing was released");
    let _ = within(n).await.unwrap();
}

/// A node whose statistics cannot be those of the examples it declared at join (here: 1000
/// rows counted, 10 declared) is refused and not counted: the transform is that of the
/// honest nodes alone, and they train.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn implausible_statistics_are_refused_and_not_counted() {
    use dpfl_common::wire::{self, Header, Hello, StatsReport};
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = fed.server_config(
        "hostile-stats",
        &[
            ("rounds", "2"),
            ("min_clients", "2"),
            ("strategy.min_fit_clients", "2"),
            ("model.layers", "[4, 16, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("standardize.enabled", "true"),
        ],
    );
    let server = Server::bind(cfg).unwrap();
    let obs = server.observatory();
    let s = start(server);
    // The hostile node: a hand-made QUIC peer with node-1's certificate.
    let hello = Hello {
        software: "hostile-test".into(),
        dp_mode: DpMode::None,
        input_dim: 4,
        num_classes: 2,
        num_examples: 10,
        num_eval_examples: 0,
        class_names: Vec::new(),
    };
    let (conn, w) = dpfl_tests::join_by_hand(&fed.layout, "node-1", s.addr, hello).await;
    let (mut tx, mut rx) = within(conn.accept_bi()).await.unwrap();
    let req = wire::read_message(&mut rx, 1 << 20).await.unwrap();
    assert!(matches!(req.header, Header::StatsRequest(_)), "{req:?}");
    let forged = StatsReport {
        spec_hash: w.spec_hash,
        count: vec![1000.0; 4],
        sum: vec![1e9; 4],
        sum_sq: vec![1e18; 4],
        label_counts: vec![500.0, 500.0],
        bounded: false,
        normalized: false,
        noised: false,
    };
    tx.write_all(&wire::encode(&Header::Stats(forged), &[]))
        .await
        .unwrap();
    tx.finish().unwrap();
    within(async {
        while obs.status().nodes.get("node-1").map_or(0, |n| n.answers) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Two honest nodes: their statistics alone make the transform.
    let clients: Vec<_> = (1..3)
        .map(|i| tokio::spawn(dpfl_client::run(node(&fed, s.addr, i, &srcs[i]))))
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        assert_eq!(within(c).await.unwrap().unwrap().rounds_trained, 2);
    }
    assert_eq!(summary.rounds_completed, 2);
    let t = dpfl_ml::predict::ModelFile::load(&fed.out("hostile-stats").join("model.safetensors"))
        .unwrap()
        .standardizer
        .unwrap();
    let (mean, std) = pooled(&srcs[1..]);
    for j in 0..4 {
        assert!((t.mean[j] - mean[j]).abs() <= 1e-9 * mean[j].abs().max(SCALE[j]));
        assert!((t.std[j] - std[j]).abs() <= 1e-7 * std[j]);
    }
    drop(conn);
}

/// The bounds of the secure-aggregation tests (every value of the tables lies inside).
const BOUNDS: &str = "-1000:12000|-0.01:0.01|-300:300|-10:15";

/// [`pooled`] after clipping every value to [`BOUNDS`] (what bounded statistics count).
fn pooled_clipped(srcs: &[String]) -> (Vec<f64>, Vec<f64>) {
    let b = dpfl_ml::standardize::Bounds::parse(BOUNDS, 4).unwrap();
    let data: Vec<dpfl_ml::Dataset> = srcs
        .iter()
        .map(|s| s.parse::<dpfl_ml::DataSource>().unwrap().load().unwrap())
        .collect();
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    for j in 0..4 {
        let c: Vec<f64> = data
            .iter()
            .flat_map(|t| t.features.chunks(4).map(move |r| r[j] as f64))
            .filter(|x| !x.is_nan())
            .map(|x| x.clamp(b.lo[j], b.hi[j]))
            .collect();
        let m = c.iter().sum::<f64>() / c.len() as f64;
        let v = c.iter().map(|x| (x - m).powi(2)).sum::<f64>() / c.len() as f64;
        mean.push(m);
        std.push(v.sqrt());
    }
    (mean, std)
}

fn secure_node(
    fed: &Federation,
    addr: std::net::SocketAddr,
    i: usize,
    src: &str,
    mode: DpMode,
) -> ClientConfig {
    let mut c = node(fed, addr, i, src);
    c.dp_mode = mode;
    c.secure_aggregation = true;
    c
}

/// Starts one secure node in DP mode `mode` per data source, node i on `srcs[i]`.
fn spawn_secure_nodes(
    fed: &Federation,
    addr: std::net::SocketAddr,
    srcs: &[String],
    mode: DpMode,
) -> Vec<tokio::task::JoinHandle<Result<dpfl_client::NodeSummary, dpfl_client::NodeError>>> {
    srcs.iter()
        .enumerate()
        .map(|(i, src)| tokio::spawn(dpfl_client::run(secure_node(fed, addr, i, src, mode))))
        .collect()
}

/// Issue 15, secure aggregation: the statistics are secure-summed. Three nodes that take
/// part only in securely aggregated exchanges hold their statistics; the server receives
/// none of them in the clear, and the unmasked sum gives the pooled mean and standard
/// deviation (to fixed-point precision); training then runs securely aggregated too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secure_summed_statistics_equal_the_pooled_ones_and_no_node_sends_them_in_the_clear() {
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = fed.server_config(
        "std-secure",
        &[
            ("rounds", "4"),
            ("min_clients", "3"),
            ("strategy.min_fit_clients", "3"),
            ("model.layers", "[4, 16, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("train.lr", "0.1"),
            ("secure_aggregation", "true"),
            ("standardize.enabled", "true"),
            ("standardize.bounds", &format!("{BOUNDS:?}")),
        ],
    );
    let mut server = Server::bind(cfg).unwrap();
    let mut seen = server.observe_statistics();
    let s = start(server);
    let clients = spawn_secure_nodes(&fed, s.addr, &srcs, DpMode::None);
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        assert_eq!(within(c).await.unwrap().unwrap().rounds_trained, 4);
    }
    assert!(
        seen.try_recv().is_err(),
        "no statistics reached the server in the clear"
    );
    let out = fed.out("std-secure");
    let t = dpfl_ml::predict::ModelFile::load(&out.join("model.safetensors"))
        .unwrap()
        .standardizer
        .expect("the model carries its transform");
    let (mean, std) = pooled_clipped(&srcs);
    for j in 0..4 {
        assert!(
            (t.mean[j] - mean[j]).abs() <= 1e-9 * mean[j].abs().max(SCALE[j]),
            "feature {j}: mean {} vs pooled {}",
            t.mean[j],
            mean[j]
        );
        assert!(
            (t.std[j] - std[j]).abs() <= 1e-7 * std[j],
            "feature {j}: std {} vs pooled {}",
            t.std[j],
            std[j]
        );
    }
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("standardize.json")).unwrap()).unwrap();
    assert_eq!(kept["contributors"], 3);
    // Standardised, securely aggregated training is clearly better than chance.
    let acc = summary.test_accuracy.unwrap();
    assert!(acc > 0.8, "accuracy {acc}");
    assert!(summary.ledger.rounds.is_empty());
}

/// Central DP with secure aggregation: the server noises the secure sum of the normalised
/// statistics exactly as it noises the clear sum, and the release is ledger round 0
/// (q = 1, multiplier 2, sensitivity sqrt(3d + 1)); nothing arrives in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn central_dp_noises_the_secure_sum_of_the_statistics_as_ledger_round_0() {
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = fed.server_config(
        "std-secure-dp",
        &[
            ("rounds", "2"),
            ("min_clients", "3"),
            ("strategy.min_fit_clients", "3"),
            ("model.layers", "[4, 16, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("dp.mode", "\"central\""),
            ("dp.noise_multiplier", "1.0"),
            ("dp.sampling_rate", "1.0"),
            ("secure_aggregation", "true"),
            ("standardize.enabled", "true"),
            ("standardize.bounds", &format!("{BOUNDS:?}")),
            ("standardize.noise_multiplier", "2.0"),
        ],
    );
    let mut server = Server::bind(cfg).unwrap();
    let mut seen = server.observe_statistics();
    let s = start(server);
    let clients = spawn_secure_nodes(&fed, s.addr, &srcs, DpMode::Central);
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        let n = within(c).await.unwrap().unwrap();
        assert!(n.rounds_trained >= 2);
        // The node's own books hold the statistics release (z 2) and two rounds at 1.
        // Two rounds at z = 1 alone give 6.573 (analytic Gaussian, mu = sqrt(2)); with
        // the statistics 7.05141 (the references below): a bound at or above the latter
        // is one that charged the statistics.
        assert!(n.epsilon.unwrap() >= 7.051_413 - 1e-3, "{:?}", n.epsilon);
    }
    assert!(seen.try_recv().is_err(), "no statistics in the clear");
    let rows = &summary.ledger.rounds;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let st = &rows[0];
    assert_eq!(st.round, 0);
    assert_eq!(st.noise_multiplier, 2.0);
    assert_eq!(st.sampling_rate, 1.0);
    assert_eq!(st.clip_norm, 13f64.sqrt(), "sensitivity sqrt(3 * 4 + 1)");
    assert_eq!(st.participants, 3);
    // The same independent references as the clear central test (analytic Gaussian
    // mechanism, scipy 1.17, delta 1e-5): z = 2 alone 1.99309; then two rounds at z = 1
    // (mu = 1.5) 7.05141.
    for (row, exact) in [(&rows[0], 1.993_091), (&rows[2], 7.051_413)] {
        assert!(
            row.epsilon >= exact - 1e-3 && row.epsilon <= exact * 1.01,
            "{} vs {exact}",
            row.epsilon
        );
    }
    let t = dpfl_ml::predict::ModelFile::load(&fed.out("std-secure-dp").join("model.safetensors"))
        .unwrap()
        .standardizer
        .unwrap();
    assert!(t.bounds.is_some() && t.std.iter().all(|s| *s > 0.0));
}

/// A node started with `--secure-aggregation` refuses a request for its statistics in
/// the clear (it checks its own configuration, not the server's word): the server
/// receives no statistics, agrees nothing and starts no round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_configured_for_secure_aggregation_refuses_clear_statistics() {
    init_logs();
    let fed = Federation::new(1);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = fed.server_config(
        "std-clear-ask",
        &[
            ("rounds", "1"),
            ("min_clients", "1"),
            ("strategy.min_fit_clients", "1"),
            ("model.layers", "[4, 8, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("standardize.enabled", "true"),
            ("standardize.bounds", &format!("{BOUNDS:?}")),
        ],
    );
    let mut server = Server::bind(cfg).unwrap();
    let mut seen = server.observe_statistics();
    let obs = server.observatory();
    let mut s = start(server);
    let mut c = secure_node(&fed, s.addr, 0, &srcs[0], DpMode::None);
    c.give_up_after = Duration::from_secs(3);
    let n = tokio::spawn(dpfl_client::run(c));
    // The refusal is the node's one answer.
    within(async {
        while obs.status().nodes.get("node-1").map_or(0, |n| n.answers) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = s.shutdown.take().unwrap().send(());
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_run, 0);
    assert!(seen.try_recv().is_err(), "the node sent no statistics");
    assert!(!fed.out("std-clear-ask").join("standardize.json").exists());
    let _ = within(n).await.unwrap();
}

/// A node that holds its statistics and then drops out of their secure sum (it closes its
/// connection at the first stage): the instance aborts (too few survivors), the server asks
/// again with a fresh protocol round id, and the honest nodes' secure sum gives their
/// pooled statistics; nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropout_in_the_statistics_secure_sum_is_retried_without_it() {
    use dpfl_common::wire::{self, Header, Hello, StatsHeld};
    init_logs();
    let fed = Federation::new(4);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let cfg = fed.server_config(
        "std-secure-dropout",
        &[
            ("rounds", "1"),
            ("min_clients", "3"),
            ("strategy.min_fit_clients", "3"),
            ("model.layers", "[4, 16, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("secure_aggregation", "true"),
            ("standardize.enabled", "true"),
            ("standardize.bounds", &format!("{BOUNDS:?}")),
        ],
    );
    let mut server = Server::bind(cfg).unwrap();
    let mut seen = server.observe_statistics();
    let obs = server.observatory();
    let s = start(server);
    // The dropout: a hand-made QUIC peer with node-4's certificate, joined first so that
    // it is one of the first instance's three participants.
    let hello = Hello {
        software: "dropout-test".into(),
        dp_mode: DpMode::None,
        input_dim: 4,
        num_classes: 2,
        num_examples: 100,
        num_eval_examples: 0,
        class_names: Vec::new(),
    };
    let (conn, w) = dpfl_tests::join_by_hand(&fed.layout, "node-4", s.addr, hello).await;
    within(async {
        while !obs.status().nodes.contains_key("node-4") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let dropout = tokio::spawn(async move {
        let mut stages = 0;
        loop {
            let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
                break;
            };
            let Ok(req) = wire::read_message(&mut rx, 1 << 20).await else {
                continue;
            };
            match req.header {
                Header::StatsRequest(r) => {
                    assert!(r.secure_aggregation.is_some(), "a secure request");
                    let held = Header::StatsHeld(StatsHeld {
                        spec_hash: w.spec_hash,
                    });
                    tx.write_all(&wire::encode(&held, &[])).await.unwrap();
                    tx.finish().unwrap();
                }
                Header::SecAggRequest(_) => {
                    // Gone before answering the first stage.
                    stages += 1;
                    conn.close(0u32.into(), b"dropping out");
                    break;
                }
                _ => {}
            }
        }
        stages
    });
    let clients = spawn_secure_nodes(&fed, s.addr, &srcs, DpMode::None);
    assert_eq!(within(dropout).await.unwrap(), 1, "it was a participant");
    within(s.done).await.unwrap().unwrap();
    for c in clients {
        assert_eq!(within(c).await.unwrap().unwrap().rounds_trained, 1);
    }
    assert!(seen.try_recv().is_err(), "no statistics in the clear");
    let out = fed.out("std-secure-dropout");
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("standardize.json")).unwrap()).unwrap();
    assert_eq!(kept["contributors"], 3);
    let t = dpfl_ml::predict::ModelFile::load(&out.join("model.safetensors"))
        .unwrap()
        .standardizer
        .unwrap();
    let (mean, std) = pooled_clipped(&srcs);
    for j in 0..4 {
        assert!((t.mean[j] - mean[j]).abs() <= 1e-9 * mean[j].abs().max(SCALE[j]));
        assert!((t.std[j] - std[j]).abs() <= 1e-7 * std[j]);
    }
}

/// The statistics' public parameters under distributed DP for the four-feature, two-class
/// tables of these tests (what `dpfl_server::prep` asks for).
fn distributed_statistics_params(z: f64, min: usize, max: usize) -> DistributedParams {
    DistributedParams {
        mechanism: Mechanism::Skellam,
        bits: dpfl_server::prep::STATS_DISTRIBUTED_BITS.into(),
        clip_norm: 13f64.sqrt(),
        noise_multiplier: z,
        min_contributors: min,
        max_contributors: max,
        dim: 3 * 4 + 2,
        beta: (-0.5f64).exp(),
        headroom: 3.0,
    }
}

/// The server configuration of the distributed-DP statistics tests (`z`: the statistics'
/// multiplier).
fn distributed_config<'a>(
    test_src: &'a str,
    z: &'a str,
    min_clients: &'a str,
) -> Vec<(&'a str, String)> {
    vec![
        ("rounds", "2".into()),
        ("min_clients", min_clients.into()),
        ("strategy.min_fit_clients", min_clients.into()),
        ("model.layers", "[4, 16, 2]".into()),
        ("test_data", format!("{test_src:?}")),
        ("train.lr", "0.1".into()),
        ("dp.mode", "\"distributed\"".into()),
        ("dp.noise_multiplier", "0.02".into()),
        ("dp.clip_norm", "2.0".into()),
        ("dp.sampling_rate", "1.0".into()),
        ("secure_aggregation", "true".into()),
        ("secagg.stage_timeout_secs", "60".into()),
        ("secagg.bits", "20".into()),
        ("secagg.mechanism", "\"skellam\"".into()),
        // As in tests/distributed.rs: accounted over 2 shares so that the absence of one
        // of four nodes never decides whether a round is released.
        ("secagg.min_contributors", "2".into()),
        ("secagg.max_contributors", "4".into()),
        ("standardize.enabled", "true".into()),
        ("standardize.bounds", format!("{BOUNDS:?}")),
        ("standardize.noise_multiplier", z.into()),
    ]
}

/// Issue 15 under `dp.mode = "distributed"`: four nodes hold their normalised statistics
/// and add their own integer noise shares inside one secure sum; the server sees no
/// statistics in the clear (nor any update), decodes only the noisy sum and adds no noise
/// of its own. The agreed transform is that of the noiseless sum of the same normalised
/// statistics within what the noise allows (every value of the sum within 6 of its
/// standard deviations, propagated through the transform); the ledger's round-0 row
/// holds the statistics' epsilon against observers of the transform and models, composed
/// with the training rounds in both labelled epsilons; each node's books hold the
/// statistics' share next to its rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_dp_statistics_carry_the_nodes_noise_shares_and_are_ledger_round_0() {
    init_logs();
    let fed = Federation::new(4);
    let (mut srcs, test_src) = write_tables(fed.dir.path());
    let fourth = fed.dir.path().join("node3.csv");
    std::fs::write(&fourth, table(200, 0.6, 0.1, 0, 13)).unwrap();
    srcs.push(format!("csv:{},{OPTS}", fourth.display()));
    const ZS: f64 = 0.01;
    let overrides = distributed_config(&test_src, "0.01", "4");
    let refs: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cfg = fed.server_config("std-distributed", &refs);
    let mut server = Server::bind(cfg).unwrap();
    let mut seen = server.observe_statistics();
    let mut updates = server.observe_updates();
    let s = start(server);
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let mut c = secure_node(&fed, s.addr, i, &srcs[i], DpMode::Distributed);
            // The nodes accept this test's small multipliers and 2 contributors.
            c.policy.min_noise_multiplier = ZS;
            c.policy.min_contributors = 2;
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(900), s.done)
        .await
        .expect("finished in time")
        .unwrap()
        .unwrap();
    let stats = distributed_statistics_params(ZS, 2, 4);
    let train = summary.ledger.distributed.as_ref().unwrap().params;
    let rounds = summary.rounds_completed;
    assert_eq!(rounds, 2);
    for c in clients {
        let n = within(c).await.unwrap().unwrap();
        // Own books: the statistics' share and each round, against the server (the node
        // composes parameter sets by adding their epsilons).
        let own = distributed::server_epsilon(&train, n.rounds_trained, 1e-5).unwrap()
            + distributed::server_epsilon(&stats, 1, 1e-5).unwrap();
        let e = n.epsilon.unwrap();
        assert!((e - own).abs() < 1e-9 * own, "node {e} vs {own}");
    }
    assert!(seen.try_recv().is_err(), "no statistics in the clear");
    assert!(updates.try_recv().is_err(), "no individual update");
    // Round 0: the statistics, every holder at q = 1, with their own parameters.
    let rows = &summary.ledger.rounds;
    assert_eq!(rows.len() as u64, rounds + 1, "{rows:?}");
    let st = &rows[0];
    assert_eq!(
        (st.round, st.sampling_rate, st.noise_multiplier),
        (0, 1.0, ZS)
    );
    assert_eq!(st.clip_norm, 13f64.sqrt());
    assert_eq!(st.participants, 4);
    let alone = distributed::model_epsilon_composed(&train, &[], &[(stats, 1)], 1e-5, 0.0).unwrap();
    assert!(
        (st.epsilon - alone).abs() < 1e-9 * alone,
        "{} vs {alone}",
        st.epsilon
    );
    let d = summary.ledger.distributed.as_ref().unwrap();
    let recorded = d.statistics.as_ref().expect("the statistics' release");
    assert_eq!((recorded.params, recorded.contributors), (stats, 4));
    assert_eq!(d.release_flip, 0.0);
    let e = d.epsilons();
    let model =
        distributed::model_epsilon_composed(&train, &[(1.0, rounds)], &[(stats, 1)], 1e-5, 0.0)
            .unwrap();
    let server =
        distributed::server_epsilon_composed(&[(train, rounds), (stats, 1)], 1e-5).unwrap();
    assert!(
        (e.model_observers - model).abs() < 1e-9 * model,
        "{e:?} vs {model}"
    );
    assert!(
        (e.server - server).abs() < 1e-9 * server,
        "{e:?} vs {server}"
    );
    assert!(e.model_observers > distributed::model_epsilon(&train, 1.0, rounds, 1e-5).unwrap());
    // The transform against the noiseless sum of the nodes' normalised statistics.
    let b = dpfl_ml::standardize::Bounds::parse(BOUNDS, 4).unwrap();
    let mut exact = dpfl_ml::standardize::FeatureStats::zeros(4, 2, true);
    for src in &srcs {
        let data = src.parse::<dpfl_ml::DataSource>().unwrap().load().unwrap();
        let mut one = dpfl_ml::standardize::FeatureStats::of_bounded(&data, 2, &b).unwrap();
        one.normalize(data.len());
        exact.merge(&one).unwrap();
    }
    let t =
        dpfl_ml::predict::ModelFile::load(&fed.out("std-distributed").join("model.safetensors"))
            .unwrap()
            .standardizer
            .unwrap();
    // Noise of the sum: 4 shares of variance (z C)^2 / 2 each.
    let e6 = 6.0 * ZS * 13f64.sqrt() * 2f64.sqrt();
    let mut off = 0.0f64;
    for j in 0..4 {
        let w = b.hi[j] - b.lo[j];
        let (n, s, q) = (exact.count[j], exact.sum[j], exact.sum_sq[j]);
        let m = (t.mean[j] - b.lo[j]) / w;
        let (m_lo, m_hi) = (
            ((s - e6) / (n + e6)).clamp(0.0, 1.0),
            ((s + e6) / (n - e6)).clamp(0.0, 1.0),
        );
        assert!(
            m >= m_lo - 1e-9 && m <= m_hi + 1e-9,
            "feature {j}: unit mean {m} outside [{m_lo}, {m_hi}]"
        );
        let v = (t.std[j] / w).powi(2);
        let v_lo = (q - e6) / (n + e6) - m_hi * m_hi;
        let v_hi = (q + e6) / (n - e6) - m_lo * m_lo;
        let fallback = v_lo <= 0.0 && (v - 1.0 / 12.0).abs() < 1e-9;
        assert!(
            fallback || (v >= v_lo.max(1e-4) - 1e-9 && v <= v_hi.min(0.25) + 1e-9),
            "feature {j}: unit variance {v} outside [{v_lo}, {v_hi}]"
        );
        off = off.max((m - s / n).abs());
    }
    assert!(
        off > 1e-7,
        "the transform carries noise (max unit-mean offset {off})"
    );
    let acc = summary.test_accuracy.unwrap();
    eprintln!(
        "distributed statistics: epsilon alone {alone:.3}, with {rounds} rounds {e:?}, \
         accuracy {acc}, max unit-mean offset {off:.4}"
    );
}

/// Under distributed DP a node checks the statistics' noise share against its own policy
/// (`check_share`): one of three nodes requires the noise to be accounted over at least 3
/// shares and the request says 2, so it refuses; the two others are too few for the
/// secure sum, nothing is released, and the refusing node's books stay empty while the
/// holders' record the share they were ready to add.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_a_statistics_share_its_policy_forbids() {
    init_logs();
    let fed = Federation::new(3);
    let (srcs, test_src) = write_tables(fed.dir.path());
    let overrides = distributed_config(&test_src, "0.5", "3");
    let refs: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cfg = fed.server_config("std-distributed-refuse", &refs);
    let mut server = Server::bind(cfg).unwrap();
    let mut seen = server.observe_statistics();
    let obs = server.observatory();
    let mut s = start(server);
    let books: Vec<std::path::PathBuf> = (0..3)
        .map(|i| fed.dir.path().join(format!("books-{i}.json")))
        .collect();
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let mut c = secure_node(&fed, s.addr, i, &srcs[i], DpMode::Distributed);
            c.policy.min_noise_multiplier = 0.02;
            c.policy.min_contributors = if i == 2 { 3 } else { 2 };
            c.privacy_state = Some(books[i].clone());
            c.give_up_after = Duration::from_secs(3);
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    // Every node answers the one request (two hold, one refuses).
    within(async {
        while (1..=3).any(|i| {
            obs.status()
                .nodes
                .get(&format!("node-{i}"))
                .map_or(0, |n| n.answers)
                == 0
        }) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = s.shutdown.take().unwrap().send(());
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_run, 0);
    assert!(summary.ledger.rounds.is_empty(), "nothing was released");
    assert!(seen.try_recv().is_err(), "no statistics in the clear");
    assert!(!fed
        .out("std-distributed-refuse")
        .join("standardize.json")
        .exists());
    for c in clients {
        let _ = within(c).await.unwrap();
    }
    let spent = |i: usize| -> usize {
        match std::fs::read(&books[i]) {
            Ok(b) => {
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                v["distributed"].as_object().map_or(0, |m| m.len())
            }
            Err(_) => 0,
        }
    };
    assert_eq!(spent(2), 0, "the refusing node recorded nothing");
    assert_eq!(
        (spent(0), spent(1)),
        (1, 1),
        "the holders recorded the statistics' share"
    );
}
