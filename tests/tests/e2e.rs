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
use dpfl_tests::{init_logs, metrics, operator_metrics, start, Federation};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

#[path = "../../server/examples/custom_strategy.rs"]
mod custom_strategy;

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
            ("strategy.fraction_evaluate", "1.0"),
        ],
    );
    let spec = cfg.spec();
    let s = start(Server::bind(cfg).unwrap());
    let clients: Vec<_> = (1..=3)
        .map(|i| {
            let mut c = fed.client(s.addr, i, 3, 1500);
            c.val_fraction = 0.2;
            tokio::spawn(dpfl_client::run(c))
        })
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
        // Federated evaluation on each node's held-out 20 %, next to the central one.
        assert_eq!(line["federated_examples"], 900);
        assert!(line["federated_accuracy"].as_f64().unwrap() > 0.3);
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
            num_examples: 1000,
            num_eval_examples: 0,
            class_names: Vec::new(),
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
    local_dp_on_the_wire(dpfl_client::NoiseSampler::Opendp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_dp_with_the_grid_sampler_puts_every_value_on_the_grid() {
    local_dp_on_the_wire(dpfl_client::NoiseSampler::Grid).await;
}

async fn local_dp_on_the_wire(sampler: dpfl_client::NoiseSampler) {
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
    node1.sampler = sampler;
    // The nodes' own floor (default z = 1) must be lowered by each node, not the server.
    node1.policy.min_noise_multiplier = z;
    let mut node2 = fed.client(s.addr, 2, 2, 400);
    node2.dp_mode = DpMode::Local;
    node2.sampler = sampler;
    node2.policy.min_noise_multiplier = z;
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
    if sampler == dpfl_client::NoiseSampler::Grid {
        let g = dpfl_common::dp::GridGaussian::grid(z * c);
        assert!(
            seen.delta.iter().all(|v| (*v as f64 / g).fract() == 0.0),
            "off-grid value"
        );
    }
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
            // The server plants 200 virtual canaries and audits the run at the end.
            ("dp.audit_canaries", "200"),
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
    // With DP on, the public outputs carry only what the guarantee covers (audit: train
    // loss, exact clipped fraction, sample sizes, failures and participation were public).
    let covered = [
        "round",
        "dp_mode",
        "epsilon",
        "delta",
        "noise_multiplier",
        "clip_norm",
        "clipped_fraction",
        "model_updated",
        "test_accuracy",
        "test_loss",
    ];
    for (i, line) in m.iter().enumerate() {
        for key in line.as_object().unwrap().keys() {
            assert!(
                covered.contains(&key.as_str()),
                "public metrics publish {key}"
            );
        }
        assert_eq!(line["dp_mode"], "central");
        assert_eq!(line["noise_multiplier"], 2.0);
        assert_eq!(line["clip_norm"], 0.5);
        assert_eq!(line["delta"], 1e-5);
        // Only a noised estimate could be published; without adaptive clipping, none.
        assert!(line["clipped_fraction"].is_null());
        let e = accountant::epsilon(1.0, 2.0, i as u64 + 1, 1e-5).unwrap().0;
        assert!((line["epsilon"].as_f64().unwrap() - e).abs() < 1e-9);
    }
    for file in ["ledger.json", "summary.json", "metrics.jsonl"] {
        let text = std::fs::read_to_string(fed.out("central").join(file)).unwrap();
        assert!(!text.contains("node-"), "{file} names a node");
        assert!(
            !text.contains("participants"),
            "{file} publishes participation"
        );
    }
    // The empirical audit sits next to the theory in the public summary.
    let a = summary.audit.expect("audit");
    assert_eq!(a.seen + a.unseen, 200);
    assert!(!a.flagged, "{a:?}");
    assert!(a.epsilon_estimate.unwrap().is_finite());
    assert_eq!(a.theoretical, Some(summary.ledger.epsilon()));
    let public: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fed.out("central").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert!(public["audit"]["epsilon_estimate"].is_number(), "{public}");
    // The operator's stream has everything.
    let op = operator_metrics(&fed.out("central"));
    assert_eq!(op.len(), 3);
    assert_eq!(op[0]["participants"], 2);
    assert!(op[0]["clipped_fraction"].is_number());
    for c in clients {
        let r = within(c).await.unwrap().unwrap();
        assert!(r.finish_reason.contains("privacy budget"));
        // The node's own central-mode figure as of the last round it saw.
        assert!((r.epsilon.unwrap() - calc).abs() < 1e-9);
    }
}

/// What a scripted node answers to a train request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// A constant delta of this value (honest, predictable).
    Constant(f32),
    /// Never answers (a killed process as seen from the server).
    Silent,
    /// Drops the connection on the first request.
    Crash,
    /// Round 1 honest; afterwards re-sends its round-1 update.
    Replay,
    /// Claims a later round.
    WrongRound,
    /// A NaN in the delta.
    Nan,
    /// A delta of the wrong length.
    Short,
    /// More bytes than the server accepts.
    Oversized,
    /// Finite values near f32::MAX (vetoed every round on main).
    Huge,
    /// Claims 10^12 examples (steered every round on main).
    HeavyClaim,
    /// A norm-1000 update (accepted in local mode on main).
    NormBomb,
    /// A `failed` answer whose reason forges log lines.
    ForgeLog,
}

/// A node driven by a script instead of training, with a valid certificate.
async fn scripted_node(
    layout: &Layout,
    name: &str,
    addr: std::net::SocketAddr,
    dp: DpMode,
    b: Behaviour,
) -> Result<(), String> {
    let conn = raw_connection(layout, name, addr).await;
    let welcome = match send_hello(&conn, &hello(dp)).await? {
        Message {
            header: Header::Welcome(w),
            ..
        } => w,
        other => return Err(format!("{name}: {:?}", other.header)),
    };
    let n = welcome.spec.num_params();
    let mut first: Option<Vec<u8>> = None;
    loop {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return Ok(());
        };
        let req = recv
            .read_to_end(64 << 20)
            .await
            .map_err(|e| e.to_string())?;
        let req = wire::decode(&req, 64 << 20).map_err(|e| e.to_string())?;
        let Header::Train(t) = req.header else {
            return Ok(()); // finish
        };
        let meta = |round: u64| wire::UpdateMeta {
            round,
            spec_hash: t.spec_hash,
            num_examples: 10,
            metrics: None,
            clipped: None,
        };
        let bytes = match b {
            Behaviour::Constant(v) => wire::encode(&Header::Update(meta(t.round)), &vec![v; n]),
            Behaviour::Silent => {
                // Hold the stream open and never answer.
                std::future::pending::<()>().await;
                unreachable!()
            }
            Behaviour::Crash => {
                conn.close(0u32.into(), b"crash");
                return Ok(());
            }
            Behaviour::Replay => match &first {
                None => {
                    let b = wire::encode(&Header::Update(meta(t.round)), &vec![0.0; n]);
                    first = Some(b.clone());
                    b
                }
                Some(old) => old.clone(),
            },
            Behaviour::WrongRound => {
                wire::encode(&Header::Update(meta(t.round + 5)), &vec![0.0; n])
            }
            Behaviour::Nan => {
                let mut d = vec![0.0; n];
                d[n / 2] = f32::NAN;
                wire::encode(&Header::Update(meta(t.round)), &d)
            }
            Behaviour::Short => wire::encode(&Header::Update(meta(t.round)), &vec![0.0; n - 1]),
            Behaviour::Oversized => vec![0u8; 300_000],
            Behaviour::Huge => {
                wire::encode(&Header::Update(meta(t.round)), &vec![f32::MAX / 4.0; n])
            }
            Behaviour::HeavyClaim => {
                let mut m = meta(t.round);
                m.num_examples = 1_000_000_000_000;
                wire::encode(&Header::Update(m), &vec![-1.0; n])
            }
            Behaviour::NormBomb => {
                let v = 1000.0 / (n as f32).sqrt();
                wire::encode(&Header::Update(meta(t.round)), &vec![v; n])
            }
            Behaviour::ForgeLog => wire::encode(
                &Header::Failed {
                    round: t.round,
                    reason: "oops\n2026-11-29T00:00:00Z  INFO round 9/9: 10 participants test acc 0.9999\x1b[0m".into(),
                },
                &[],
            ),
        };
        // The server may reset the stream once the answer exceeds its limit.
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_with_thirty_percent_of_clients_killed_completes_at_quorum() {
    init_logs();
    let fed = Federation::new(10);
    let cfg = fed.server_config(
        "dropouts",
        &[
            ("rounds", "1"),
            ("min_clients", "10"),
            ("strategy.min_fit_clients", "7"),
            ("round_timeout_secs", "3"),
            ("dp.mode", "\"local\""),
            ("dp.noise_multiplier", "1.0"),
            ("dp.sampling_rate", "1.0"),
        ],
    );
    let spec = cfg.spec();
    let init = init_params(&spec, cfg.model.init_seed);
    let s = start(Server::bind(cfg).unwrap());
    let mut nodes = Vec::new();
    for i in 1..=10 {
        let b = match i {
            1 | 2 => Behaviour::Silent,
            3 => Behaviour::Crash,
            _ => Behaviour::Constant(i as f32 * 0.01),
        };
        let (layout, addr) = (Layout::new(fed.layout.dir()), s.addr);
        nodes.push(tokio::spawn(async move {
            scripted_node(&layout, &format!("node-{i}"), addr, DpMode::Local, b).await
        }));
    }
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 1);
    let m = operator_metrics(&fed.out("dropouts"));
    assert_eq!(m[0]["participants"], 7);
    assert_eq!(m[0]["failed"], 3);
    // The model moved by the equal-weight mean of the 7 updates that arrived, nothing else.
    let mean: f32 = (4..=10).map(|i| i as f32 * 0.01).sum::<f32>() / 7.0;
    let (_, params) =
        dpfl_ml::export::load_safetensors(&fed.out("dropouts").join("model.safetensors")).unwrap();
    for (p, w) in params.iter().zip(&init) {
        assert!((p - (w + mean)).abs() < 1e-5);
    }
    // Local mode: the ledger charges every node the attempt asked, answered or not (a
    // node that answered late or was rejected has still released its noised update; the
    // over-count of the silent ones is the safe side).
    assert_eq!(summary.ledger.rounds.len(), 1);
    assert_eq!(summary.ledger.clients.len(), 10);
    assert!(summary
        .ledger
        .clients
        .values()
        .all(|c| c.rounds_joined == 1));
    for n in nodes {
        n.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_inputs_are_each_rejected_with_their_own_error_and_the_run_finishes() {
    init_logs();
    let fed = Federation::new(9);
    let other = Federation::new(1);
    // The model needs 101,800 payload bytes; 200 kB leaves room for a header, not for more.
    let cfg = fed.server_config(
        "hostile",
        &[
            ("rounds", "2"),
            ("min_clients", "7"),
            ("strategy.min_fit_clients", "2"),
            ("round_timeout_secs", "20"),
            ("max_message_bytes", "200000"),
            ("admission.deny", "[\"node-9\"]"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    // A revoked node is refused at the hello, with its reason.
    let revoked = raw_connection(&fed.layout, "node-9", s.addr).await;
    match send_hello(&revoked, &hello(DpMode::None)).await {
        Ok(Message {
            header: Header::Refused(r),
            ..
        }) => {
            assert_eq!(r.kind, wire::RefusalKind::NotAdmitted);
            assert!(r.detail.contains("revoked"), "{r:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A certificate from another CA never gets past TLS.
    let mut stranger = fed.client(s.addr, 1, 2, 100);
    stranger.credentials = Credentials {
        ca: fed.layout.ca_cert(),
        ..Credentials::node(&other.layout, "node-1")
    };
    assert!(matches!(
        within(dpfl_client::run(stranger)).await,
        Err(NodeError::Authentication(_))
    ));
    let script = [
        (3, Behaviour::Replay),
        (4, Behaviour::WrongRound),
        (5, Behaviour::Nan),
        (6, Behaviour::Short),
        (7, Behaviour::Oversized),
    ];
    let mut scripted = Vec::new();
    for (i, b) in script {
        let (layout, addr) = (Layout::new(fed.layout.dir()), s.addr);
        scripted.push(tokio::spawn(async move {
            scripted_node(&layout, &format!("node-{i}"), addr, DpMode::None, b).await
        }));
    }
    let honest: Vec<_> = (1..=2)
        .map(|i| tokio::spawn(dpfl_client::run(fed.client(s.addr, i, 2, 1500))))
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 2, "{:?}", summary.finish);
    for h in honest {
        assert_eq!(within(h).await.unwrap().unwrap().rounds_trained, 2);
    }
    let r = &summary.rejected;
    for (kind, at_least) in [
        ("replayed", 1),
        ("wrong_round", 2),
        ("non_finite", 2),
        ("length", 2),
        ("oversized", 2),
    ] {
        assert!(
            r.get(kind).copied().unwrap_or(0) >= at_least,
            "{kind}: {r:?}"
        );
    }
    // Only the honest nodes' updates were used, and the model is finite and learned.
    let m = metrics(&fed.out("hostile"));
    assert!(m
        .iter()
        .all(|l| l["participants"] == 2 || l["round"] == 1 && l["participants"] == 3));
    let acc = summary.test_accuracy.unwrap();
    assert!(acc > 0.5, "test accuracy {acc}");
    for h in scripted {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_defined_strategy_from_examples_runs_a_federation() {
    init_logs();
    use custom_strategy::LossFilteredFedAvg;
    use dpfl_server::strategy::{FitResult, Strategy};
    // The strategy itself: the update with the worst loss is left out.
    let mut s = LossFilteredFedAvg::new(Default::default(), Default::default(), 2);
    let mut rng = rand::rngs::mock::StepRng::new(0, 1);
    let plan = s.configure_fit(1, &["a".into(), "b".into(), "c".into()], &mut rng);
    assert_eq!(plan.nodes.len(), 3);
    for (n, loss, v) in [("a", 0.5, 1.0), ("b", 0.4, 3.0), ("c", 9.0, 100.0)] {
        s.accumulate(
            1,
            FitResult::new(
                n.into(),
                vec![v, v],
                1,
                Some(wire::TrainMetrics {
                    loss,
                    accuracy: 0.0,
                    steps: 1,
                    seconds: 0.0,
                }),
                None,
            ),
        )
        .unwrap();
    }
    let w = s.aggregate_fit(1, &[0.0, 0.0], &[]).unwrap().unwrap();
    assert_eq!(w, vec![2.0, 2.0]);
    assert_eq!(s.dropped, vec!["c".to_string()]);
    // And end to end, through the real server and nodes.
    let dir = tempfile::tempdir().unwrap();
    let summary = within(custom_strategy::run_demo(dir.path(), 3))
        .await
        .unwrap();
    assert_eq!(summary.rounds_completed, 3);
    // Three short rounds on 1,000 examples a node, half the updates filtered: well above
    // chance (0.1), not yet converged.
    assert!(
        summary.test_accuracy.unwrap() > 0.4,
        "{:?}",
        summary.test_accuracy
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_can_neither_veto_nor_steer_a_round_nor_forge_log_lines() {
    // Audit (hostile-peer test): values near f32::MAX overflowed the sum and discarded every
    // round; num_examples = 10^12 outweighed everyone; a newline in a `failed` reason forged
    // log lines.
    init_logs();
    let fed = Federation::new(5);
    let cfg = fed.server_config(
        "veto",
        &[
            ("rounds", "3"),
            ("min_clients", "5"),
            ("strategy.min_fit_clients", "2"),
            ("round_timeout_secs", "20"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let mut scripted = Vec::new();
    for (i, b) in [
        (3, Behaviour::Huge),
        (4, Behaviour::HeavyClaim),
        (5, Behaviour::ForgeLog),
    ] {
        let (layout, addr) = (Layout::new(fed.layout.dir()), s.addr);
        scripted.push(tokio::spawn(async move {
            scripted_node(&layout, &format!("node-{i}"), addr, DpMode::None, b).await
        }));
    }
    let honest: Vec<_> = (1..=2)
        .map(|i| tokio::spawn(dpfl_client::run(fed.client(s.addr, i, 2, 1500))))
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for h in honest {
        assert_eq!(within(h).await.unwrap().unwrap().rounds_trained, 3);
    }
    let r = &summary.rejected;
    assert!(r.get("magnitude").copied().unwrap_or(0) >= 3, "{r:?}");
    assert!(r.get("weight").copied().unwrap_or(0) >= 3, "{r:?}");
    let m = operator_metrics(&fed.out("veto"));
    assert_eq!(m.len(), 3);
    for line in &m {
        assert_eq!(line["model_updated"], true, "{line}");
        assert_eq!(line["participants"], 2, "{line}");
        for f in line["failures"].as_array().unwrap() {
            let f = f.as_str().unwrap();
            assert!(
                !f.contains('\n') && !f.contains('\x1b'),
                "unescaped peer text: {f:?}"
            );
        }
    }
    let acc = summary.test_accuracy.unwrap();
    assert!(acc > 0.5, "test accuracy {acc}");
    for h in scripted {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_mode_rejects_updates_no_honest_node_can_produce() {
    // Audit: a norm-1000 update (honest ~ sqrt(C^2 + (zC)^2 d)) was accepted in local mode.
    init_logs();
    let fed = Federation::new(4);
    let cfg = fed.server_config(
        "normbomb",
        &[
            ("rounds", "2"),
            ("min_clients", "4"),
            ("strategy.min_fit_clients", "1"),
            ("round_timeout_secs", "10"),
            ("dp.mode", "\"local\""),
            ("dp.noise_multiplier", "0.05"),
            ("dp.clip_norm", "1.0"),
            ("dp.sampling_rate", "1.0"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let mut nodes = Vec::new();
    for i in 1..=4 {
        let b = if i == 4 {
            Behaviour::NormBomb
        } else {
            Behaviour::Constant(0.001)
        };
        let (layout, addr) = (Layout::new(fed.layout.dir()), s.addr);
        nodes.push(tokio::spawn(async move {
            scripted_node(&layout, &format!("node-{i}"), addr, DpMode::Local, b).await
        }));
    }
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 2);
    assert_eq!(
        summary.rejected.get("norm").copied(),
        Some(2),
        "{:?}",
        summary.rejected
    );
    let m = operator_metrics(&fed.out("normbomb"));
    assert!(m.iter().all(|l| l["participants"] == 3), "{m:?}");
    for n in nodes {
        n.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_with_a_known_name_and_another_key_cannot_impersonate_the_node() {
    // Audit: a CA-signed certificate with an existing node's name but a new key replaced the
    // honest node and zeroed the model every round.
    init_logs();
    let fed = Federation::new(2);
    // Keep the honest node-1's credentials apart, then issue a second certificate for the
    // name "node-1" with a new key (the impostor's).
    let honest_dir = fed.dir.path().join("honest");
    std::fs::create_dir_all(&honest_dir).unwrap();
    for f in ["ca.pem", "node-1.pem", "node-1.key"] {
        std::fs::copy(fed.layout.dir().join(f), honest_dir.join(f)).unwrap();
    }
    let honest_creds = Credentials::node(&Layout::new(&honest_dir), "node-1");
    let cfg = fed.server_config(
        "impostor",
        &[
            ("rounds", "3"),
            ("min_clients", "2"),
            ("strategy.min_fit_clients", "2"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let mut c1 = fed.client(s.addr, 1, 2, 800);
    c1.credentials = honest_creds;
    let h1 = tokio::spawn(dpfl_client::run(c1));
    // Wait until the honest node-1 is known, then bring the impostor.
    let t0 = std::time::Instant::now();
    while !fed.out("impostor").join("identities.json").exists() {
        assert!(t0.elapsed() < TIMEOUT, "node-1 never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dpfl_certs::Federation::open(fed.layout.dir())
        .unwrap()
        .issue_node("node-1", true)
        .unwrap();
    let impostor = raw_connection(&fed.layout, "node-1", s.addr).await;
    match send_hello(&impostor, &hello(DpMode::None)).await {
        Ok(Message {
            header: Header::Refused(r),
            ..
        }) => {
            assert_eq!(r.kind, wire::RefusalKind::NotAdmitted);
            assert!(r.detail.contains("bound to key"), "{r:?}");
        }
        other => panic!("the impostor must be refused, got {other:?}"),
    }
    let h2 = tokio::spawn(dpfl_client::run(fed.client(s.addr, 2, 2, 800)));
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 3);
    let r1 = within(h1).await.unwrap().unwrap();
    assert_eq!(r1.rounds_trained, 3);
    assert_eq!(r1.connections, 1, "the honest node never lost its seat");
    within(h2).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_connected_node_takes_effect_by_the_next_round() {
    // Audit: a node added to the deny list kept being aggregated until it reconnected.
    init_logs();
    let fed = Federation::new(3);
    let lists = fed.dir.path().join("lists");
    std::fs::write(&lists, "# none revoked\n").unwrap();
    let cfg = fed.server_config(
        "revoke",
        &[
            // Rounds of this small model take ~10 ms: enough of them that the revoked node
            // tries to come back (and is refused) before the run ends.
            ("rounds", "120"),
            ("min_clients", "2"),
            ("strategy.min_fit_clients", "2"),
            (
                "admission.lists_file",
                &format!("{:?}", lists.display().to_string()),
            ),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let clients: Vec<_> = (1..=3)
        .map(|i| tokio::spawn(dpfl_client::run(fed.client(s.addr, i, 3, 1000))))
        .collect();
    let out = fed.out("revoke");
    let t0 = std::time::Instant::now();
    // Rounds may start with two nodes (min_clients 2): wait until node-3 has taken part in
    // one (all three did), so that it is a connected node that gets revoked.
    while !operator_metrics(&out)
        .iter()
        .any(|l| l["participants"] == 3)
    {
        assert!(t0.elapsed() < TIMEOUT, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let revoked_after = operator_metrics(&out).len();
    std::fs::write(&lists, "deny node-3\n").unwrap();
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 120);
    let m = operator_metrics(&out);
    // The round open when the list changed (and, since a round's requests go out before
    // the previous round's metrics line, possibly the next one) may still have node-3;
    // every later round must not.
    for line in &m[revoked_after + 2..] {
        assert_eq!(line["participants"], 2, "{line}");
    }
    let mut results = Vec::new();
    for c in clients {
        results.push(within(c).await.unwrap());
    }
    assert!(
        matches!(&results[2], Err(NodeError::Refused(m)) if m.contains("revoked")),
        "node-3 must end refused: {:?}",
        results[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journaled_release_survives_a_crash_before_the_first_checkpoint() {
    // Review finding: the journal was only read next to a checkpoint, so a crash after
    // round 1's release and before its checkpoint lost the release on restart.
    init_logs();
    let fed = Federation::new(2);
    let overrides = [
        ("rounds", "1"),
        ("min_clients", "2"),
        ("dp.mode", "\"central\""),
        ("dp.noise_multiplier", "2.0"),
        ("dp.sampling_rate", "1.0"),
    ];
    // What a crashed first attempt leaves: a journal with one release, no checkpoint.
    let mut journal = dpfl_server::ledger::Ledger::new(DpMode::Central, 1e-5);
    let p = dpfl_server::strategy::RoundPrivacy {
        mode: DpMode::Central,
        sampling_rate: 1.0,
        noise_multiplier: 2.0,
        clip_norm: 1.0,
        clipped_fraction: None,
        clipped_fraction_noised: None,
        population: 2,
        released: true,
    };
    journal.record(1, &p, &[]).unwrap();
    let op = fed.out("journal").join("operator");
    std::fs::create_dir_all(&op).unwrap();
    std::fs::write(
        op.join("ledger.json"),
        serde_json::to_vec(&journal).unwrap(),
    )
    .unwrap();
    let s = start(Server::bind(fed.server_config("journal", &overrides)).unwrap());
    let clients: Vec<_> = (1..=2)
        .map(|i| {
            let mut c = fed.client(s.addr, i, 2, 200);
            c.dp_mode = DpMode::Central;
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        within(c).await.unwrap().unwrap();
    }
    assert_eq!(
        summary.ledger.rounds.len(),
        2,
        "the journaled release stays charged"
    );
    let calc = accountant::epsilon(1.0, 2.0, 2, 1e-5).unwrap().0;
    assert!((summary.ledger.epsilon() - calc).abs() < 1e-9);
    // A journal that does not fit the checkpoint (another run's) stops the server.
    let mut other = dpfl_server::ledger::Ledger::new(DpMode::Central, 1e-5);
    let mut q = p;
    q.noise_multiplier = 3.0;
    other.record(1, &q, &[]).unwrap();
    std::fs::write(op.join("ledger.json"), serde_json::to_vec(&other).unwrap()).unwrap();
    let err = Server::bind(fed.server_config("journal", &overrides))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("does not match"), "{err}");
    // --fresh sets the previous run's files aside instead of mixing them in.
    let mut fresh = overrides.to_vec();
    fresh.push(("resume", "false"));
    Server::bind(fed.server_config("journal", &fresh)).unwrap();
    assert!(!op.join("ledger.json").exists());
    assert!(std::fs::read_dir(&op).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("replaced")));
}

/// Runs `rounds` of the main-job-like federation (4 nodes, equal shards) with or without
/// secure aggregation; returns the test accuracy, the seconds of each round and how many
/// individual updates the server saw.
async fn main_job_like(fed: &Federation, name: &str, secure: bool) -> (f64, Vec<f64>, usize) {
    let mut o: Vec<(&str, &str)> = vec![
        ("rounds", "3"),
        ("min_clients", "4"),
        ("strategy.min_fit_clients", "4"),
        ("secagg.stage_timeout_secs", "30"),
        // Clip far above any update of this model: the two runs differ only by the
        // fixed-point encoding.
        ("secagg.clip_norm", "100.0"),
    ];
    if secure {
        o.push(("secure_aggregation", "true"));
    }
    let cfg = fed.server_config(name, &o);
    let mut server = Server::bind(cfg).unwrap();
    let mut observed = server.observe_updates();
    let s = start(server);
    let clients: Vec<_> = (1..=4)
        .map(|i| tokio::spawn(dpfl_client::run(fed.client(s.addr, i, 4, 1000))))
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        let r = within(c).await.unwrap().unwrap();
        assert_eq!(r.rounds_trained, 3);
    }
    assert_eq!(summary.rounds_completed, 3);
    let m = operator_metrics(&fed.out(name));
    assert_eq!(m.len(), 3);
    for line in &m {
        assert_eq!(line["participants"], 4, "{line}");
    }
    let seconds = m.iter().map(|l| l["seconds"].as_f64().unwrap()).collect();
    let seen = std::iter::from_fn(|| observed.try_recv().ok()).count();
    (summary.test_accuracy.unwrap(), seconds, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secure_aggregation_trains_like_plain_fedavg_and_the_server_sees_no_update() {
    init_logs();
    let fed = Federation::new(4);
    let (plain, plain_secs, plain_seen) = main_job_like(&fed, "plain", false).await;
    let (secure, secure_secs, secure_seen) = main_job_like(&fed, "secure", true).await;
    assert_eq!(
        plain_seen, 12,
        "without secure aggregation every update is seen"
    );
    assert_eq!(
        secure_seen, 0,
        "with it the server never holds an individual update"
    );
    // Same seeds, equal shards (FedAvg weights equal): only the fixed-point rounding and
    // thread scheduling differ.
    assert!(plain > 0.5, "plain run accuracy {plain}");
    assert!(
        (secure - plain).abs() < 0.03,
        "secure {secure} vs plain {plain}"
    );
    eprintln!(
        "accuracy plain {plain} secure {secure}; round seconds: plain {plain_secs:?}, secure {secure_secs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn central_dp_with_secure_aggregation_noises_the_unmasked_sum_and_accounts_for_it() {
    init_logs();
    let fed = Federation::new(3);
    let cfg = fed.server_config(
        "central-sa",
        &[
            ("rounds", "2"),
            ("min_clients", "3"),
            ("strategy.min_fit_clients", "3"),
            ("dp.mode", "\"central\""),
            ("dp.noise_multiplier", "1.0"),
            ("dp.clip_norm", "0.5"),
            ("dp.sampling_rate", "1.0"),
            ("secure_aggregation", "true"),
        ],
    );
    let mut server = Server::bind(cfg).unwrap();
    let mut observed = server.observe_updates();
    let s = start(server);
    let clients: Vec<_> = (1..=3)
        .map(|i| {
            let mut c = fed.client(s.addr, i, 3, 300);
            c.dp_mode = DpMode::Central;
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        assert_eq!(within(c).await.unwrap().unwrap().rounds_trained, 2);
    }
    assert_eq!(summary.rounds_completed, 2);
    assert!(
        observed.try_recv().is_err(),
        "no individual update reached the server"
    );
    // The ledger counts the two releases exactly as for central DP without secure
    // aggregation (sensitivity C per node, noise z C on the sum).
    let calc = accountant::epsilon(1.0, 1.0, 2, 1e-5).unwrap().0;
    assert!((summary.ledger.epsilon() - calc).abs() < 1e-9);
    let op = operator_metrics(&fed.out("central-sa"));
    assert_eq!(op.len(), 2);
    for line in &op {
        assert_eq!(line["participants"], 3, "{line}");
        assert_eq!(line["model_updated"], true, "{line}");
        // No clipped bit travels with a masked input: nothing to report.
        assert!(line["clipped_fraction"].is_null(), "{line}");
    }
}

/// Issue 15: a tabular federation (string labels, an ID column, `;` delimiter) trains over
/// QUIC, and `dpfl-predict`'s library on the saved model file reproduces the server's final
/// test accuracy exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inference_on_the_saved_model_reproduces_the_servers_final_test_accuracy() {
    init_logs();
    let fed = Federation::new(2);
    let dir = fed.dir.path();
    // Two classes separated along a direction of three features on unit scale.
    let table = |rows: usize, phase: f64| {
        let mut s = String::from("id;a;b;c;diagnosis\n");
        for i in 0..rows {
            let m = i % 3 == 0;
            let sign = if m { 1.0 } else { -1.0 };
            let t = (i as f64 * 0.61 + phase).sin();
            let u = (i as f64 * 1.37 + phase).cos();
            s += &format!(
                "P{i:05};{:.4};{:.4};{:.4};{}\n",
                0.6 * sign + 0.7 * t,
                -0.4 * sign + 0.7 * u,
                0.8 * t * u,
                if m { "malignant" } else { "benign" }
            );
        }
        s
    };
    std::fs::write(dir.join("train.csv"), table(600, 0.0)).unwrap();
    std::fs::write(dir.join("test.csv"), table(300, 1.0)).unwrap();
    let opts = "label=diagnosis,drop=id,delimiter=semicolon,classes=benign|malignant";
    let test_src = format!("csv:{},{opts}", dir.join("test.csv").display());
    let cfg = fed.server_config(
        "tabular",
        &[
            ("rounds", "3"),
            ("min_clients", "2"),
            ("strategy.min_fit_clients", "2"),
            ("model.layers", "[3, 8, 2]"),
            ("test_data", &format!("{test_src:?}")),
            ("train.lr", "0.1"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let train_src: dpfl_ml::DataSource = format!("csv:{},{opts}", dir.join("train.csv").display())
        .parse()
        .unwrap();
    let clients: Vec<_> = (1..=2)
        .map(|i| {
            let mut c = fed.client(s.addr, i, 2, 1000);
            c.data = train_src.clone();
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for c in clients {
        assert_eq!(within(c).await.unwrap().unwrap().rounds_trained, 3);
    }
    let server_acc = summary.test_accuracy.unwrap();
    assert!(server_acc > 0.75, "accuracy {server_acc}");
    let model =
        dpfl_ml::predict::ModelFile::load(&fed.out("tabular").join("model.safetensors")).unwrap();
    // The server names the classes and features of its CSV test table in the file.
    assert_eq!(model.class_names, ["benign", "malignant"]);
    assert_eq!(model.feature_names, ["a", "b", "c"]);
    let test = test_src
        .parse::<dpfl_ml::DataSource>()
        .unwrap()
        .load()
        .unwrap();
    let p = dpfl_ml::predict::predict(&model, &test, tch::Device::Cpu).unwrap();
    let scores = dpfl_ml::predict::score(&p, &test.labels);
    assert_eq!(scores.n, 300);
    assert!(
        (scores.accuracy - server_acc).abs() < 1e-9,
        "prediction {} vs server {server_acc}",
        scores.accuracy
    );
    assert!(scores.auc.unwrap() > 0.8, "{scores:?}");
    // The server's central evaluation reports the same AUC and F1 for a two-class model.
    assert!((summary.test_auc.unwrap() - scores.auc.unwrap()).abs() < 1e-9);
    assert!((summary.test_f1.unwrap() - scores.f1.unwrap()).abs() < 1e-9);
    let m = metrics(&fed.out("tabular"));
    assert_eq!(m.len(), 3);
    assert!(m
        .iter()
        .all(|l| l["test_auc"].is_f64() && l["test_f1"].is_f64()));
    // The best round's model is kept next to the last one and scores the best accuracy.
    let best = m
        .iter()
        .map(|l| l["test_accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let (best_acc, best_round) = summary.best_test_accuracy.unwrap();
    assert_eq!(best_acc, best);
    assert_eq!(
        m[best_round as usize - 1]["test_accuracy"]
            .as_f64()
            .unwrap(),
        best
    );
    let best_model =
        dpfl_ml::predict::ModelFile::load(&fed.out("tabular").join("model-best.safetensors"))
            .unwrap();
    let p = dpfl_ml::predict::predict(&best_model, &test, tch::Device::Cpu).unwrap();
    let again = dpfl_ml::predict::score(&p, &test.labels).accuracy;
    assert!((again - best).abs() < 1e-9, "{again} vs {best}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_start_is_the_first_global_model_and_a_node_of_another_model_is_refused() {
    init_logs();
    let fed = Federation::new(2);
    let spec = dpfl_common::ModelSpec::new(dpfl_tests::SMALL_MODEL.to_vec()).unwrap();

    // A node configured for another model is refused at join and told which model the
    // federation trains (min_clients = 2: no round starts on this server).
    let cfg = fed.server_config("refuse", &[("min_clients", "2")]);
    let s = start(Server::bind(cfg).unwrap());
    let mut wrong = fed.client(s.addr, 2, 2, 100);
    wrong.model = Some(dpfl_common::ModelSpec::new(vec![784, 64, 10]).unwrap());
    match within(dpfl_client::run(wrong)).await {
        Err(NodeError::Refused(m)) => {
            for part in ["mlp 784-32-10", "mlp 784-64-10", "--model mlp:784,32,10"] {
                assert!(m.contains(part), "{part:?} missing from: {m}");
            }
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    s.done.abort();

    // A model trained centrally on 2000 training images: far above chance.
    let cpu = tch::Device::Cpu;
    let train = dpfl_ml::DataSource::FashionMnistTrain
        .load()
        .unwrap()
        .take(2000);
    let test = dpfl_ml::DataSource::FashionMnistTest
        .load()
        .unwrap()
        .take(2000);
    let mut mlp = dpfl_ml::Mlp::new(&spec, cpu).unwrap();
    let init = init_params(&spec, 5);
    let tc = dpfl_common::TrainConfig {
        epochs: 3,
        batch_size: 32,
        lr: 0.1,
        ..Default::default()
    };
    let dd = dpfl_ml::DeviceData::new(&train, &spec, cpu).unwrap();
    let delta = mlp.train(&dd, &tc, &init).unwrap().delta;
    let pre: Vec<f32> = init.iter().zip(&delta).map(|(a, b)| a + b).collect();
    let file = fed.dir.path().join("pretrained.safetensors");
    dpfl_ml::export::save_safetensors(&spec, &pre, &file).unwrap();
    let tdd = dpfl_ml::DeviceData::new(&test, &spec, cpu).unwrap();
    let pre_acc = mlp.evaluate(&tdd, &pre).unwrap().accuracy;
    let seeded_acc = mlp.evaluate(&tdd, &init_params(&spec, 0)).unwrap().accuracy;
    assert!(pre_acc > seeded_acc + 0.3, "{seeded_acc} -> {pre_acc}");

    // One round of one step at lr 1e-4 barely moves the first global model: the server's
    // test accuracy after it is the file's, far from the seeded start's.
    let path = format!("{:?}", file.display().to_string());
    let cfg = fed.server_config(
        "warm",
        &[
            ("rounds", "1"),
            ("min_clients", "1"),
            ("strategy.min_fit_clients", "1"),
            ("model.init_model", &path),
            ("train.lr", "0.0001"),
            ("train.max_steps", "1"),
        ],
    );
    let s = start(Server::bind(cfg).unwrap());
    let mut right = fed.client(s.addr, 1, 2, 100);
    right.model = Some(spec.clone());
    let node = tokio::spawn(dpfl_client::run(right));
    let summary = within(s.done).await.unwrap().unwrap();
    assert_eq!(within(node).await.unwrap().unwrap().rounds_trained, 1);
    let acc = summary.test_accuracy.unwrap();
    assert!(
        (acc - pre_acc).abs() < 0.02,
        "after one tiny step from the warm start: {acc}, the file: {pre_acc}, seeded: {seeded_acc}"
    );
}

/// Runs the project's venv Python (made by `scripts/setup.sh`) and returns its stdout.
fn venv_python(args: &[&std::path::Path]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect(".venv/bin/python (scripts/setup.sh makes it)");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Issue 15: a TorchScript module trains over QUIC; the server resolves its spec once (the
/// module file it was configured with vanishes after bind and the run still finishes and
/// saves the module's model); PyTorch and `dpfl-predict` (its library: the binary only
/// prints) read the saved model back with the module file and count the server's correct
/// answers; another module file is refused, naming both spec hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torchscript_module_trains_over_quic_and_pytorch_and_dpfl_predict_read_back_its_accuracy()
{
    init_logs();
    let fed = Federation::new(3);
    let dir = fed.dir.path();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let make = root.join("examples/torchscript/make_model.py");
    let check = root.join("examples/torchscript/check.py");
    let module = dir.join("model.pt");
    let other = dir.join("other.pt");
    venv_python(&[&make, &module]);
    venv_python(&[&make, &other, std::path::Path::new("1")]);
    let spec = dpfl_ml::torchscript::script_spec(&module, 784, 10).unwrap();
    let other_spec = dpfl_ml::torchscript::script_spec(&other, 784, 10).unwrap();
    // Same names and shapes, other file: another spec.
    assert_eq!(spec.layout(), other_spec.layout());
    assert_ne!(spec.hash(), other_spec.hash());
    // The server's own copy of the module, removed once the server is bound.
    let server_module = dir.join("server.pt");
    std::fs::copy(&module, &server_module).unwrap();
    let path = format!("{:?}", server_module.display().to_string());
    let script = |name: &str, extra: &[(&'static str, &'static str)]| {
        let mut o: Vec<(&str, &str)> = vec![
            ("model.kind", "\"torchscript\""),
            ("model.torchscript.path", &path),
            ("model.torchscript.inputs", "784"),
            ("model.torchscript.classes", "10"),
        ];
        o.extend_from_slice(extra);
        fed.server_config(name, &o)
    };

    // A node holding another module file is refused at join (no round starts here).
    let s = start(Server::bind(script("refuse", &[("min_clients", "3")])).unwrap());
    let mut wrong = fed.client(s.addr, 3, 3, 100);
    wrong.model = Some(other_spec.clone());
    match within(dpfl_client::run(wrong)).await {
        Err(NodeError::Refused(m)) => assert!(m.contains("torchscript sha256:"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    s.done.abort();

    let cfg = script(
        "script",
        &[
            ("rounds", "3"),
            ("min_clients", "2"),
            ("strategy.min_fit_clients", "2"),
            ("train.lr", "0.05"),
            ("train.momentum", "0.9"),
        ],
    );
    let server = Server::bind(cfg).unwrap();
    assert_eq!(server.spec().hash(), spec.hash());
    // Nothing the run agreed depends on the file any more (message limits, the welcome's
    // spec, evaluation, the saved model's spec).
    std::fs::remove_file(&server_module).unwrap();
    let s = start(server);
    let nodes: Vec<_> = (1..=2)
        .map(|i| {
            let mut c = fed.client(s.addr, i, 3, 600);
            c.model = Some(spec.clone());
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    for n in nodes {
        assert_eq!(within(n).await.unwrap().unwrap().rounds_trained, 3);
    }
    let acc = summary.test_accuracy.unwrap();
    assert!(acc > 0.5, "test accuracy {acc} (chance: 0.1)");
    // PyTorch reads the exported weights into the same module and scores the same 2000
    // test images: the same accuracy.
    let weights = fed.out("script").join("model.safetensors");
    let line = venv_python(&[&check, &module, &weights]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["examples"], 2000);
    let correct = v["correct"].as_u64().unwrap();
    eprintln!("torchscript: dpfl {acc}, PyTorch {correct}/2000");
    assert!(
        (correct as f64 - acc * 2000.0).abs() <= 1.0,
        "PyTorch {correct}/2000 vs the server's {acc}"
    );

    // dpfl-predict with the module file: exactly the server's count of correct answers.
    let predict = |module: Option<&std::path::Path>| {
        dpfl_client::predict::run(&dpfl_client::predict::PredictOptions {
            model: weights.clone(),
            module: module.map(|m| m.to_path_buf()),
            data: dpfl_ml::DataSource::FashionMnistTest,
            out: dir.join("predictions.csv"),
            metrics_json: None,
            limit: Some(2000),
            device: "cpu".into(),
        })
    };
    let report = predict(Some(&module)).unwrap();
    let scores = report.scores.unwrap();
    assert_eq!((report.rows, scores.n), (2000, 2000));
    assert_eq!(
        scores.correct,
        (acc * 2000.0).round() as usize,
        "dpfl-predict {}/2000 vs the server's {acc}",
        scores.correct
    );
    eprintln!("torchscript: dpfl-predict {}/2000", scores.correct);
    let csv = std::fs::read_to_string(dir.join("predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2001);
    // Another module file (same names and shapes) is refused, naming both spec hashes.
    let hex = |h: dpfl_common::model::SpecHash| -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    };
    use dpfl_client::predict::PredictRunError;
    use dpfl_ml::predict::PredictError;
    match predict(Some(&other)) {
        Err(PredictRunError::Model {
            source: PredictError::ModuleMismatch(m),
            ..
        }) => {
            assert_eq!(m.module_hash, hex(other_spec.hash()));
            assert_eq!(m.model_hash, hex(spec.hash()));
            assert_eq!(m.module, other);
            let text = m.to_string();
            assert!(
                text.contains(&m.module_hash) && text.contains(&m.model_hash),
                "{text}"
            );
        }
        got => panic!("expected a module mismatch, got {got:?}"),
    }
    // Without the module file: told to give it.
    assert!(matches!(
        predict(None),
        Err(PredictRunError::Model {
            source: PredictError::NeedsModule { .. },
            ..
        })
    ));
}
