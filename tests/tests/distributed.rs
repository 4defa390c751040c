//! Distributed DP end to end over QUIC/mTLS: real server, real nodes, secure aggregation
//! carrying the nodes' integer-noised encodings (issue 12).

use dpfl_common::config::DpMode;
use dpfl_common::dp::distributed::{self, DistributedParams, Mechanism};
use dpfl_server::Server;
use dpfl_tests::{init_logs, operator_metrics, start, Federation, SMALL_MODEL};
use std::time::Duration;

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(900), f)
        .await
        .expect("finished in time")
}

const ROUNDS: u64 = 3;
const Z: f64 = 0.02;
const CLIP: f64 = 2.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_dp_over_secure_aggregation_trains_and_the_ledger_reports_both_epsilons() {
    init_logs();
    let fed = Federation::new(4);
    let cfg = fed.server_config(
        "distributed",
        &[
            ("rounds", "3"),
            ("min_clients", "4"),
            ("strategy.min_fit_clients", "4"),
            ("dp.mode", "\"distributed\""),
            ("dp.noise_multiplier", "0.02"),
            ("dp.clip_norm", "2.0"),
            ("dp.sampling_rate", "1.0"),
            ("secure_aggregation", "true"),
            ("secagg.stage_timeout_secs", "60"),
            ("secagg.bits", "20"),
            ("secagg.mechanism", "\"skellam\""),
            // Accounted over 2 shares, so that 3 or 4 nodes are both released: with 3, the
            // absence of one node would decide whether any round is released (a 4-node
            // federation needs all four on the complete graph), and the ledger refuses such
            // a run (`release_flip_probability`).
            ("secagg.min_contributors", "2"),
            ("secagg.max_contributors", "4"),
        ],
    );
    let mut server = Server::bind(cfg).unwrap();
    let mut observed = server.observe_updates();
    let s = start(server);
    let clients: Vec<_> = (1..=4)
        .map(|i| {
            let mut c = fed.client(s.addr, i, 4, 1000);
            c.dp_mode = DpMode::Distributed;
            // The nodes accept this test's small z and the round's 2 contributors.
            c.policy.min_noise_multiplier = Z;
            c.policy.min_contributors = 2;
            tokio::spawn(dpfl_client::run(c))
        })
        .collect();
    let summary = within(s.done).await.unwrap().unwrap();
    let params = DistributedParams {
        mechanism: Mechanism::Skellam,
        bits: 20,
        clip_norm: CLIP,
        noise_multiplier: Z,
        min_contributors: 2,
        max_contributors: 4,
        dim: SMALL_MODEL[0] * SMALL_MODEL[1]
            + SMALL_MODEL[1]
            + SMALL_MODEL[1] * SMALL_MODEL[2]
            + SMALL_MODEL[2],
        beta: (-0.5f64).exp(),
        headroom: 3.0,
    };
    // Each node's own books: ROUNDS participations at these parameters, against the server.
    let own = distributed::server_epsilon(&params, ROUNDS, 1e-5).unwrap();
    for c in clients {
        let r = within(c).await.unwrap().unwrap();
        assert_eq!(r.rounds_trained, ROUNDS);
        let e = r.epsilon.expect("the node keeps books in distributed mode");
        assert!((e - own).abs() < 1e-9, "node {e} vs {own}");
    }
    assert_eq!(summary.rounds_completed, ROUNDS);
    assert!(
        observed.try_recv().is_err(),
        "no individual update reached the server"
    );
    // Three short rounds on 1,000 examples a node, with the nodes' noise: well above
    // chance (0.1).
    let acc = summary.test_accuracy.unwrap();
    assert!(acc > 0.4, "accuracy {acc}");
    // Both labelled epsilons, as the accountant gives them for these parameters.
    let d = summary
        .ledger
        .distributed
        .as_ref()
        .expect("distributed ledger");
    assert_eq!(d.params, params);
    assert_eq!(d.releases.len() as u64, ROUNDS);
    // Everyone is sampled (q = 1) and 3 or 4 participants are both released: the release
    // decision never depends on one node.
    assert_eq!(d.release_flip, 0.0);
    assert!(d.unreleased.is_empty());
    let e = d.epsilons();
    let model = distributed::model_epsilon(&params, 1.0, ROUNDS, 1e-5).unwrap();
    assert!((e.model_observers - model).abs() < 1e-9, "{e:?} vs {model}");
    assert!((e.server - own).abs() < 1e-9, "{e:?} vs {own}");
    // Replace-one sensitivity against the server costs more than add/remove for the
    // model's observers (q = 1 here: no amplification on either side).
    assert!(e.server > e.model_observers, "{e:?}");
    assert!((summary.ledger.epsilon() - e.model_observers).abs() < 1e-12);
    let op = operator_metrics(&fed.out("distributed"));
    assert_eq!(op.len() as u64, ROUNDS);
    for line in &op {
        assert_eq!(line["participants"], 4, "{line}");
        assert_eq!(line["model_updated"], true, "{line}");
    }
    eprintln!("distributed DP: accuracy {acc}, epsilons {e:?}");
}
