//! End-to-end tests: the real server and real client nodes in one process, talking QUIC
//! with mutual TLS over 127.0.0.1, on slices of Fashion-MNIST.

use dpfl_certs::{Credentials, Layout};
use dpfl_client::NodeError;
use dpfl_common::config::DpMode;
use dpfl_common::dp::{accountant, l2_norm, RawDelta};
use dpfl_common::model::init_params;
use dpfl_common::wire::{self, Header, Hello, Message};
use dpfl_server::strategy::TrainSettings;
use dpfl_server::Server;
use dpfl_tests::{init_logs, metrics, start, Federation};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_clients_improve_the_global_model_over_quic_mtls() {
    init_logs();
    let fed = Federation::new(3);
    let cfg = fed.server_config(
        "fedavg",
        &[
            ("rounds", "3"),
            ("min_clients", "3"),
            ("strategy.min_fit_clients", "3"),
        ],
    );
    let spec = cfg.spec();
    let s = start(Server::bind(cfg).unwrap());
    let clients: Vec<_> = (1..=3)
        .map(|i| tokio::spawn(dpfl_client::run(fed.client(s.addr, i, 3, 1500))))
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        let r = within(c).await.unwrap().unwrap();
        assert_eq!(r.rounds_trained, 3);
        assert_eq!(r.finish_reason, "completed all rounds");
    }
    assert_eq!(summary.rounds_completed, 3);
    let m = metrics(&fed.out("fedavg"));
    assert_eq!(m.len(), 3);
    for line in &m {
        assert_eq!(line["participants"], 3);
        for key in [
            "round",
            "participants",
            "train_loss",
            "test_accuracy",
            "test_loss",
            "seconds",
        ] {
            assert!(!line[key].is_null(), "{key} missing in {line}");
        }
    }
    // The untrained model is at chance (~10 %); after three rounds it is far above.
    let test = dpfl_ml::DataSource::FashionMnistTest
        .load()
        .unwrap()
        .take(2000);
    let dd = dpfl_ml::DeviceData::new(&test, &spec, tch::Device::Cpu).unwrap();
    let mut mlp = dpfl_ml::Mlp::new(&spec, tch::Device::Cpu).unwrap();
    let before = mlp.evaluate(&dd, &init_params(&spec, 0)).unwrap();
    let after = summary.test_accuracy.unwrap();
    assert!(
        after > before.accuracy + 0.4,
        "accuracy {} -> {after}",
        before.accuracy
    );
    let losses: Vec<f64> = m.iter().map(|l| l["test_loss"].as_f64().unwrap()).collect();
    assert!(losses[2] < losses[0], "{losses:?}");
    // The final model is a safetensors file other tools read, equal to what was evaluated.
    let (s2, params) =
        dpfl_ml::export::load_safetensors(&fed.out("fedavg").join("model.safetensors")).unwrap();
    assert_eq!(s2, spec);
    let again = mlp.evaluate(&dd, &params).unwrap();
    assert!((again.accuracy - after).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_with_a_certificate_from_another_ca_is_refused() {
    init_logs();
    let fed = Federation::new(1);
    let other = Federation::new(1);
    let cfg = fed.server_config("other-ca", &[("rounds", "1"), ("min_clients", "1")]);
    let s = start(Server::bind(cfg).unwrap());
    // Trusts the real federation's CA (so it accepts the server) but presents a node
    // certificate signed by another CA.
    let mut stranger = fed.client(s.addr, 1, 1, 200);
    stranger.credentials = Credentials {
        ca: fed.layout.ca_cert(),
        ..Credentials::node(&other.layout, "node-1")
    };
    let err = within(dpfl_client::run(stranger)).await.unwrap_err();
    assert!(matches!(err, NodeError::Authentication(_)), "{err}");
    // The server is unharmed: a legitimate node completes the run.
    let ok = within(dpfl_client::run(fed.client(s.addr, 1, 1, 200)))
        .await
        .unwrap();
    assert_eq!(ok.rounds_trained, 1);
    within(s.done).await.unwrap().unwrap();
}

/// A hand-made QUIC peer with a valid certificate, for sending bad bytes.
async fn raw_connection(
    layout: &Layout,
    node: &str,
    addr: std::net::SocketAddr,
) -> quinn::Connection {
    let ep = dpfl_certs::quic::client_endpoint(
        &Credentials::node(layout, node),
        wire::ALPN,
        Duration::from_secs(30),
    )
    .unwrap();
    ep.connect(addr, "localhost").unwrap().await.unwrap()
}

async fn send_hello(conn: &quinn::Connection, bytes: &[u8]) -> Result<Message, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    s.write_all(bytes).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    let answer = r.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
    wire::decode(&answer, 1 << 20).map_err(|e| e.to_string())
}

fn hello(dp: DpMode) -> Vec<u8> {
    wire::encode(
        &Header::Hello(Hello {
            software: "test".into(),
            dp_mode: dp,
            input_dim: 784,
            num_classes: 10,
        }),
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_oversized_and_malformed_messages_do_not_take_the_server_down() {
    init_logs();
    let fed = Federation::new(3);
    let cfg = fed.server_config(
        "garbage",
        &[
            ("rounds", "2"),
            ("min_clients", "2"),
            ("strategy.min_fit_clients", "1"),
            ("round_timeout_secs", "20"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());

    // 1. Garbage instead of a hello: refused with a typed reason.
    let c = raw_connection(&fed.layout, "node-3", s.addr).await;
    match send_hello(&c, b"\x00\x01 definitely not dpfl").await {
        Ok(Message {
            header: Header::Refused(r),
            ..
        }) => assert!(r.detail.contains("malformed"), "{r:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // 2. An oversized hello: the bounded read gives up; the connection is dropped.
    let c = raw_connection(&fed.layout, "node-3", s.addr).await;
    let big = vec![7u8; 200_000];
    assert!(send_hello(&c, &big).await.is_err());
    // 3. A wrong DP mode is refused with a clear message.
    let c = raw_connection(&fed.layout, "node-3", s.addr).await;
    match send_hello(&c, &hello(DpMode::Central)).await {
        Ok(Message {
            header: Header::Refused(r),
            ..
        }) => assert!(r.detail.contains("dp mode"), "{r:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // 4. A node that joins properly, then answers train requests with garbage.
    let c = raw_connection(&fed.layout, "node-2", s.addr).await;
    assert!(matches!(
        send_hello(&c, &hello(DpMode::None)).await,
        Ok(Message {
            header: Header::Welcome(_),
            ..
        })
    ));
    let evil = tokio::spawn(async move {
        let mut answered = 0;
        while let Ok((mut send, mut recv)) = c.accept_bi().await {
            let req = recv.read_to_end(64 << 20).await.unwrap();
            if matches!(
                wire::decode(&req, 64 << 20).map(|m| m.header),
                Ok(Header::Finish(_))
            ) {
                break;
            }
            let mut bytes = wire::encode(
                &Header::Failed {
                    round: 1,
                    reason: String::new(),
                },
                &[],
            );
            bytes.truncate(bytes.len() - 3); // malformed
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            answered += 1;
        }
        answered
    });
    // A real node joins; the federation runs both rounds at quorum 1.
    let good = within(dpfl_client::run(fed.client(s.addr, 1, 2, 300)))
        .await
        .unwrap();
    assert_eq!(good.rounds_trained, 2);
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 2);
    assert_eq!(within(evil).await.unwrap(), 2);
    assert_eq!(
        summary.rejected.get("malformed"),
        Some(&2),
        "{:?}",
        summary.rejected
    );
    let m = metrics(&fed.out("garbage"));
    assert_eq!(m[0]["participants"], 1);
    assert_eq!(m[0]["failed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_dp_updates_on_the_wire_are_the_clipped_update_plus_noise_of_scale_zc() {
    init_logs();
    let fed = Federation::new(2);
    let (z, c) = (0.5, 0.1);
    let cfg = fed.server_config(
        "local",
        &[
            ("rounds", "1"),
            ("min_clients", "2"),
            ("dp.mode", "\"local\""),
            ("dp.noise_multiplier", &z.to_string()),
            ("dp.clip_norm", &c.to_string()),
            ("dp.sampling_rate", "1.0"),
        ],
    );
    let spec = cfg.spec();
    let train_cfg: TrainSettings = cfg.train.clone();
    let round1 = train_cfg.for_round(1, cfg.strategy.seed);
    let global = init_params(&spec, cfg.model.init_seed);
    let mut server = Server::bind(cfg).unwrap();
    let mut observed = server.observe_updates();
    let s = start(server);
    let mut node1 = fed.client(s.addr, 1, 2, 400);
    node1.dp_mode = DpMode::Local;
    let mut node2 = fed.client(s.addr, 2, 2, 400);
    node2.dp_mode = DpMode::Local;
    let (train, _) = dpfl_client::prepare_data(&node1).unwrap();
    let h1 = tokio::spawn(dpfl_client::run(node1));
    let h2 = tokio::spawn(dpfl_client::run(node2));
    let summary = within(s.done).await.unwrap().unwrap();
    let r1 = within(h1).await.unwrap().unwrap();
    within(h2).await.unwrap().unwrap();
    let seen = std::iter::from_fn(|| observed.try_recv().ok())
        .find(|u| u.node == "node-1")
        .expect("node-1's update was observed");
    // Nothing but the noised delta leaves the node.
    assert_eq!(seen.meta.num_examples, 0);
    assert!(seen.meta.metrics.is_none() && seen.meta.clipped.is_none());
    // Reproduce node-1's clipped update (training is deterministic on CPU).
    dpfl_ml::model::set_threads(1);
    let dd = dpfl_ml::DeviceData::new(&train, &spec, tch::Device::Cpu).unwrap();
    let raw = dpfl_ml::Mlp::new(&spec, tch::Device::Cpu)
        .unwrap()
        .train(&dd, &round1, &global)
        .unwrap();
    let clipped = RawDelta::new(raw.delta).clip(c);
    assert!(clipped.was_clipped(), "the test wants the bound to bind");
    let diff: Vec<f64> = seen
        .delta
        .iter()
        .zip(clipped.as_slice())
        .map(|(a, b)| (*a - *b) as f64)
        .collect();
    let n = diff.len() as f64;
    let mean = diff.iter().sum::<f64>() / n;
    let sd = (diff.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    assert!(mean.abs() < 6.0 * z * c / n.sqrt(), "noise mean {mean}");
    assert!(
        (sd / (z * c) - 1.0).abs() < 0.03,
        "noise s.d. {sd}, expected {}",
        z * c
    );
    assert!(
        l2_norm(&seen.delta) > 10.0 * c,
        "the noise dominates a clipped update"
    );
    // Ledger: each client's spend against the server matches the calculator, and the node
    // computed the same figure on its own.
    let expect = accountant::epsilon(1.0, z / 2.0, 1, 1e-5).unwrap().0;
    let ledger = &summary.ledger;
    assert!((ledger.clients["node-1"].epsilon - expect).abs() < 1e-9);
    assert!((r1.epsilon.unwrap() - expect).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn central_dp_ledger_matches_the_calculator_and_training_stops_at_target_epsilon() {
    init_logs();
    let fed = Federation::new(2);
    // A target between the epsilon of 3 and of 4 rounds at q = 1, z = 2: the run must
    // stop after round 3.
    let e3 = accountant::epsilon(1.0, 2.0, 3, 1e-5).unwrap().0;
    let e4 = accountant::epsilon(1.0, 2.0, 4, 1e-5).unwrap().0;
    let target = format!("{}", (e3 + e4) / 2.0);
    let cfg = fed.server_config(
        "central",
        &[
            ("rounds", "10"),
            ("min_clients", "2"),
            ("dp.mode", "\"central\""),
            ("dp.noise_multiplier", "2.0"),
            ("dp.clip_norm", "0.5"),
            ("dp.sampling_rate", "1.0"),
            ("dp.target_epsilon", &target),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let mut clients = Vec::new();
    for i in 1..=2 {
        let mut c = fed.client(s.addr, i, 2, 300);
        c.dp_mode = DpMode::Central;
        clients.push(tokio::spawn(dpfl_client::run(c)));
    }
    let summary = within(s.done).await.unwrap().unwrap();
    let finish = summary.finish.clone().unwrap();
    assert!(finish.contains("privacy budget reached"), "{finish}");
    assert_eq!(summary.rounds_completed, 3);
    let calc = accountant::epsilon(1.0, 2.0, 3, 1e-5).unwrap().0;
    assert!(
        (summary.ledger.epsilon() - calc).abs() < 1e-9,
        "{} vs {calc}",
        summary.ledger.epsilon()
    );
    assert!(summary.ledger.epsilon() < e4);
    let m = metrics(&fed.out("central"));
    assert_eq!(m.len(), 3);
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line["dp_mode"], "central");
        assert_eq!(line["noise_multiplier"], 2.0);
        assert_eq!(line["clip_norm"], 0.5);
        assert_eq!(line["delta"], 1e-5);
        assert!(line["clipped_fraction"].is_number());
        let e = accountant::epsilon(1.0, 2.0, i as u64 + 1, 1e-5).unwrap().0;
        assert!((line["epsilon"].as_f64().unwrap() - e).abs() < 1e-9);
    }
    for c in clients {
        let r = within(c).await.unwrap().unwrap();
        assert!(r.finish_reason.contains("privacy budget"));
        // The node's own central-mode figure as of the last round it saw.
        assert!((r.epsilon.unwrap() - calc).abs() < 1e-9);
    }
}
