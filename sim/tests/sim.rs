//! The simulator end to end: a small sweep writes every promised file, and the in-memory
//! transport and the real QUIC transport reach the same model from the same seed.

use dpfl_sim::experiment::{expand, Transport};

const SMALL: &str = r#"
name = "tiny"
rounds = 2
seed = 3
test_limit = 500
threads = 2
[model]
layers = [784, 16, 10]
[population]
clients = 20
examples_per_client = 30
[train]
batch_size = 10
lr = 0.1
[dp]
mode = "central"
sampling_rate = 0.5
clip_norm = 0.5
[sweep]
"dp.noise_multiplier" = [0.5, 2.0]
"#;

/// The largest coordinate-wise difference between two parameter vectors.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn a_small_sweep_writes_csv_jsonl_and_both_plot_formats() {
    let out = tempfile::tempdir().unwrap();
    let configs = expand(SMALL, &[]).unwrap();
    assert_eq!(configs.len(), 2);
    let mut calls = 0;
    let (dir, finished) =
        dpfl_sim::run_experiment(configs, out.path(), &mut |_, _, _| calls += 1).unwrap();
    assert_eq!(
        calls, 4,
        "progress after every round of every configuration"
    );
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], dpfl_sim::report::CSV_HEADER);
    assert_eq!(lines.len(), 3, "one row per configuration:\n{csv}");
    for f in &finished {
        assert_eq!(f.result.rounds, 2);
        let eps = f.result.epsilon.unwrap();
        let expect =
            dpfl_common::dp::accountant::epsilon(0.5, f.config.config.dp.noise_multiplier, 2, 1e-5)
                .unwrap()
                .0;
        assert!((eps - expect).abs() < 1e-9);
        let jsonl = std::fs::read_to_string(dir.join(format!("{}.jsonl", f.config.id))).unwrap();
        assert_eq!(jsonl.lines().count(), 2);
    }
    // More noise, less epsilon.
    assert!(finished[1].result.epsilon < finished[0].result.epsilon);
    for name in ["accuracy.png", "frontier.png"] {
        let b = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{name}");
    }
    for (name, axis) in [("accuracy.svg", "round"), ("frontier.svg", "epsilon")] {
        let s = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("</svg>"), "{name}");
        assert!(s.contains(axis), "{name} has no {axis} axis");
    }
}

#[test]
fn memory_and_quic_transports_reach_the_same_model() {
    let text = r#"
name = "transport"
rounds = 2
seed = 11
test_limit = 300
threads = 2
[model]
layers = [784, 16, 10]
[population]
clients = 3
examples_per_client = 120
[train]
batch_size = 16
lr = 0.1
[strategy]
min_fit_clients = 3
"#;
    let run = |t: Transport| {
        let mut cs = expand(text, &[]).unwrap();
        cs[0].config.transport = t;
        dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap()
    };
    let mem = run(Transport::Memory);
    let quic = run(Transport::Quic);
    assert_eq!(mem.rounds, 2);
    assert_eq!(quic.rounds, 2);
    assert_eq!(mem.final_params.len(), quic.final_params.len());
    // Documented non-determinism: updates are summed in arrival order (f32).
    let max_diff = max_abs_diff(&mem.final_params, &quic.final_params);
    assert!(max_diff < 1e-5, "max parameter difference {max_diff}");
    let (a, b) = (
        mem.final_accuracy().unwrap(),
        quic.final_accuracy().unwrap(),
    );
    assert!((a - b).abs() < 0.01, "{a} vs {b}");
}

/// The simulator trains and evaluates on the configured device. `auto` takes CUDA where
/// libtorch sees a GPU (the CUDA backend is loaded on demand) and the CPU elsewhere, where
/// it gives the CPU run's model bit for bit; `cuda` on a machine without one is refused
/// before round 1 by both transports, and a name that is no device by validation.
#[test]
fn the_device_key_picks_cpu_or_cuda_and_refuses_what_this_machine_lacks() {
    let text = r#"
name = "device"
rounds = 2
seed = 5
test_limit = 300
threads = 2
[model]
layers = [784, 16, 10]
[population]
clients = 4
examples_per_client = 60
[train]
batch_size = 16
lr = 0.1
"#;
    let with = |sets: &[(&str, &str)]| {
        let o: Vec<(String, String)> = sets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        expand(text, &o)
    };
    let bad = with(&[("device", "\"tpu\"")]);
    assert!(
        matches!(&bad, Err(e) if e.to_string().contains("device must be cpu, auto, cuda or cuda:N")),
        "{:?}",
        bad.map(|c| c.len())
    );
    let gpu = dpfl_ml::model::parse_device("auto").unwrap() != tch::Device::Cpu;
    let cpu = dpfl_sim::run::run(
        &with(&[("device", "\"cpu\"")]).unwrap()[0].config,
        &mut |_| {},
    )
    .unwrap();
    let auto = dpfl_sim::run::run(
        &with(&[("device", "\"auto\"")]).unwrap()[0].config,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(auto.rounds, 2);
    if gpu {
        // Float rounding differs between the devices; the model does not.
        let max_diff = max_abs_diff(&cpu.final_params, &auto.final_params);
        assert!(max_diff < 1e-3, "cpu and cuda models differ by {max_diff}");
        return;
    }
    assert_eq!(cpu.final_params, auto.final_params);
    for transport in ["\"memory\"", "\"quic\""] {
        let c = with(&[("device", "\"cuda\""), ("transport", transport)]).unwrap();
        match dpfl_sim::run::run(&c[0].config, &mut |_| {}) {
            Err(e) => assert!(e.to_string().contains("device"), "{transport}: {e}"),
            Ok(_) => panic!("{transport}: cuda accepted on a machine without a GPU"),
        }
    }
}

/// Distributed DP over the QUIC transport: real nodes encode their noised shares and run
/// SecAgg+ with the real server; the ledger's two epsilons equal the in-memory run's (they
/// depend on the settings, not on who was sampled).
#[test]
fn distributed_dp_runs_over_the_quic_transport_with_the_same_epsilons() {
    let text = r#"
name = "distributed-quic"
rounds = 2
seed = 5
test_limit = 300
threads = 2
secure_aggregation = true
[model]
layers = [784, 8, 10]
[population]
clients = 6
examples_per_client = 60
[train]
epochs = 3
batch_size = 10
lr = 0.1
[strategy]
min_fit_clients = 4
# Real nodes draw their noise from the OS CSPRNG (not seeded): a small z keeps the
# accuracy check about training, not about the noise draw.
[dp]
mode = "distributed"
sampling_rate = 1.0
noise_multiplier = 0.05
clip_norm = 0.5
delta = 1e-5
[secagg]
min_contributors = 4
max_contributors = 6
bits = 20
"#;
    let run = |t: Transport| {
        let mut cs = expand(text, &[]).unwrap();
        cs[0].config.transport = t;
        dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap()
    };
    let quic = run(Transport::Quic);
    let mem = run(Transport::Memory);
    assert_eq!(quic.rounds, 2, "{}", quic.finish);
    assert!(
        quic.rows
            .iter()
            .all(|r| !r.abandoned && r.participants >= 4),
        "{:?}",
        quic.rows
    );
    let (eq, em) = (quic.epsilon.unwrap(), mem.epsilon.unwrap());
    assert!(eq > 0.0 && (eq - em).abs() < 1e-9, "{eq} vs {em}");
    let (sq, sm) = (quic.epsilon_server.unwrap(), mem.epsilon_server.unwrap());
    assert!(sq >= eq && (sq - sm).abs() < 1e-9, "{sq} vs {sm}");
    let acc = quic.final_accuracy().unwrap();
    assert!(acc > 0.2, "the model did not train over QUIC ({acc})");
}

#[test]
fn poisoned_updates_break_fedavg_but_not_the_robust_rules() {
    let text = r#"
name = "robust"
rounds = 5
seed = 2
test_limit = 1000
threads = 2
[model]
layers = [784, 32, 10]
[population]
clients = 10
examples_per_client = 400
attack = { fraction = 0.2, kind = "sign_flip", factor = 4.0 }
[train]
batch_size = 20
lr = 0.1
[sweep]
"strategy.aggregator" = [{ kind = "mean" }, { kind = "median" }, { kind = "trimmed_mean", beta = 0.25 }, { kind = "multi_krum", f = 2, m = 5 }]
"#;
    let out = tempfile::tempdir().unwrap();
    let (_, finished) =
        dpfl_sim::run_experiment(expand(text, &[]).unwrap(), out.path(), &mut |_, _, _| {})
            .unwrap();
    let acc: Vec<f64> = finished
        .iter()
        .map(|f| f.result.final_accuracy().unwrap())
        .collect();
    let (mean, robust) = (acc[0], &acc[1..]);
    for r in robust {
        assert!(
            *r > 0.6 && *r > mean + 0.2,
            "robust {r} vs mean {mean}: {acc:?}"
        );
    }
}

#[test]
fn natural_partition_gives_one_client_per_value_of_the_csv_column() {
    // A small two-class problem with a `user` column: 4 users, uneven sizes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.csv");
    let mut csv = String::from("user,a,b,c,y\n");
    for i in 0..400 {
        let user = ["alice", "bob", "carol", "dave"][(i * 7 % 13) % 4];
        let y = i % 2;
        let s = if y == 0 { 1.0 } else { -1.0 };
        let j = ((i as f64) * 0.37).sin() * 0.2;
        csv.push_str(&format!("{user},{},{},{},{y}\n", s + j, -s + j, 0.5 * s));
    }
    std::fs::write(&path, csv).unwrap();
    let text = format!(
        r#"
name = "natural"
data = "csv:{},label=y"
test_data = "csv:{},label=y"
rounds = 3
threads = 2
[model]
layers = [3, 8, 2]
[population]
partition = {{ kind = "natural", column = "user" }}
[train]
batch_size = 16
lr = 0.1
"#,
        path.display(),
        dir.path().join("test.csv").display()
    );
    // The test set is the same data without the user column.
    let mut test = String::from("a,b,c,y\n");
    for line in std::fs::read_to_string(&path).unwrap().lines().skip(1) {
        test.push_str(line.split_once(',').unwrap().1);
        test.push('\n');
    }
    std::fs::write(dir.path().join("test.csv"), test).unwrap();
    let cs = expand(&text, &[]).unwrap();
    let pop = dpfl_sim::run::population(&cs[0].config).unwrap();
    assert_eq!(pop.names.len(), 4, "one client per user");
    assert_eq!(pop.parts.iter().map(Vec::len).sum::<usize>(), 400);
    let r = dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap();
    assert_eq!((r.clients, r.rounds), (4, 3));
    assert!(
        r.final_accuracy().unwrap() > 0.9,
        "{:?}",
        r.final_accuracy()
    );
}

const AUDITED: &str = r#"
name = "audit"
rounds = 1
seed = 4
test_limit = 200
threads = 2
eval_every = 1
[model]
layers = [784, 16, 10]
[population]
clients = 20
examples_per_client = 30
[train]
batch_size = 10
lr = 0.1
[dp]
mode = "central"
sampling_rate = 1.0
clip_norm = 1.0
noise_multiplier = 1.0
[audit]
canaries = 400
[sweep]
"audit.fault_noise_factor" = [1.0, 0.5, 0.0]
"#;

#[test]
fn the_audit_tracks_the_theory_and_flags_a_broken_noise_mechanism() {
    // Test-only fault injection: the same run with the configured noise, half of it and
    // none, while the ledger believes z = 1 throughout.
    let out = tempfile::tempdir().unwrap();
    let configs = expand(AUDITED, &[]).unwrap();
    let (dir, finished) = dpfl_sim::run_experiment(configs, out.path(), &mut |_, _, _| {}).unwrap();
    let audit = |i: usize| finished[i].result.audit.expect("audited");
    let (ok, half, off) = (audit(0), audit(1), audit(2));
    let theory = ok.theoretical.unwrap();
    assert!(ok.seen > 150 && ok.unseen > 150, "{ok:?}");
    // Honest run: the estimate stays within the theory (one release, final model).
    let e_ok = ok.epsilon_estimate.unwrap();
    assert!(e_ok < 1.2 * theory && !ok.flagged, "{ok:?}");
    assert!(ok.epsilon_lower_bound <= theory, "{ok:?}");
    // Half the noise: the estimate moves up accordingly (z = 0.5 is ~10 against ~4.4).
    let e_half = half.epsilon_estimate.unwrap();
    assert!(e_half > 1.5 * e_ok && half.flagged, "{half:?} vs {ok:?}");
    // No noise: far above the theory, flagged.
    assert!(
        off.epsilon_estimate.unwrap() > 3.0 * theory && off.flagged,
        "{off:?}"
    );
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    assert!(csv.lines().nth(3).unwrap().contains("true"), "{csv}");
}

#[test]
fn secure_aggregation_unmasks_exactly_the_plaintext_sum_from_3_to_1000_nodes() {
    for (n, dp) in [(3, "none"), (1000, "none"), (40, "central")] {
        let text = format!(
            r#"
name = "secagg-{n}"
rounds = 1
seed = 5
test_limit = 200
threads = 2
secure_aggregation = true
[model]
layers = [784, 2, 10]
[population]
clients = {n}
examples_per_client = 4
[train]
batch_size = 4
lr = 0.05
[strategy]
min_fit_clients = 3
[dp]
mode = "{dp}"
sampling_rate = 1.0
noise_multiplier = 1.0
clip_norm = 0.5
"#
        );
        let cs = expand(&text, &[]).unwrap();
        let t = std::time::Instant::now();
        let r = dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap();
        assert_eq!(r.rounds, 1, "n = {n}");
        assert_eq!(r.rows[0].participants, n, "n = {n}: every node survived");
        assert_eq!(
            r.secure_sum_exact,
            vec![true],
            "n = {n}: the unmasked sum is the plaintext sum"
        );
        eprintln!("n = {n} ({dp}): {:.1}s", t.elapsed().as_secs_f64());
    }
}

/// Batched multi-client training (`dpfl_ml::batched`) against one-by-one training, through
/// the simulator's privatization: each client's clipped and noised update agrees up to
/// float rounding, with the same clipped bit, from the same noise stream.
#[test]
fn batched_training_feeds_the_dp_pipeline_the_same_per_client_updates() {
    use dpfl_client::worker::{privatize_outcome, train_and_privatize};
    use dpfl_common::config::{ClientPrivacy, TrainConfig};
    use dpfl_common::dp::SimulationGaussian;
    use dpfl_common::model::{init_params, ModelSpec};
    use dpfl_common::wire::TrainRequest;
    use dpfl_common::DpMode;
    use dpfl_ml::{train_batched, BatchedData, DeviceData, Mlp};

    tch::set_num_threads(1);
    let data = dpfl_ml::DataSource::FashionMnistTrain.load().unwrap();
    let spec = ModelSpec::new(vec![784, 32, 10]).unwrap();
    let global = init_params(&spec, 4);
    // Unequal clients: partial last batches and different step counts.
    let sizes = [70usize, 33, 48, 5, 64];
    let mut next = 0;
    let parts: Vec<Vec<usize>> = sizes
        .iter()
        .map(|s| {
            let p = (next..next + s).collect();
            next += s;
            p
        })
        .collect();
    for mode in [DpMode::Central, DpMode::Local] {
        let req = TrainRequest {
            round: 1,
            spec_hash: spec.hash(),
            config: TrainConfig {
                epochs: 2,
                batch_size: 16,
                lr: 0.1,
                momentum: 0.9,
                seed: 21,
                ..TrainConfig::default()
            },
            privacy: ClientPrivacy {
                mode,
                // Small enough that some clients clip and (with these seeds) some do not.
                clip_norm: 1.5,
                noise_multiplier: if mode == DpMode::Local { 0.7 } else { 0.0 },
            },
            secure_aggregation: None,
        };
        let refs: Vec<&[usize]> = parts.iter().map(Vec::as_slice).collect();
        let bd = BatchedData::new(&data, &refs, &spec, tch::Device::Cpu).unwrap();
        let batched = train_batched(&spec, &bd, &req.config, &global, tch::Device::Cpu).unwrap();
        let mut mlp = Mlp::new(&spec, tch::Device::Cpu).unwrap();
        let mut clipped = Vec::new();
        for (c, (p, b)) in parts.iter().zip(batched).enumerate() {
            let mut n1 = SimulationGaussian::seeded(100 + c as u64);
            let mut n2 = SimulationGaussian::seeded(100 + c as u64);
            let dd = DeviceData::new(&data.subset(p), &spec, tch::Device::Cpu).unwrap();
            let one = train_and_privatize(&mut mlp, &dd, &req, &global, &mut n1).unwrap();
            let all = privatize_outcome(b.unwrap(), 0.0, &req, &mut n2).unwrap();
            assert_eq!(one.clipped, all.clipped, "client {c} ({mode:?})");
            assert_eq!(one.outcome.steps, all.outcome.steps);
            clipped.push(one.clipped);
            let (x, y) = (one.delta.into_vec(), all.delta.into_vec());
            let diff = max_abs_diff(&x, &y);
            assert!(diff < 1e-5, "client {c} ({mode:?}): max difference {diff}");
        }
        assert!(
            clipped.contains(&Some(true)) && clipped.contains(&Some(false)),
            "{clipped:?}"
        );
    }
}

#[test]
fn batched_and_sequential_simulations_reach_the_same_model() {
    let text = r#"
name = "batched"
rounds = 3
seed = 5
test_limit = 300
threads = 2
batch_clients = 3
[model]
layers = [784, 16, 10]
[population]
clients = 12
examples_per_client = 45
[train]
batch_size = 10
lr = 0.05
momentum = 0.5
[dp]
mode = "local"
clip_norm = 1.0
noise_multiplier = 0.3
sampling_rate = 0.5
"#;
    let run = |batched: bool| {
        let mut cs = expand(text, &[]).unwrap();
        cs[0].config.batched = batched;
        dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap()
    };
    let seq = run(false);
    let bat = run(true);
    assert_eq!(seq.rounds, 3);
    assert_eq!(bat.rounds, 3);
    let p: Vec<usize> = seq.rows.iter().map(|r| r.participants).collect();
    assert_eq!(
        p,
        bat.rows.iter().map(|r| r.participants).collect::<Vec<_>>()
    );
    let max_diff = max_abs_diff(&seq.final_params, &bat.final_params);
    assert!(max_diff < 1e-4, "max parameter difference {max_diff}");
    assert!(
        seq.final_params
            != dpfl_common::model::init_params(
                &dpfl_common::model::ModelSpec::new(vec![784, 16, 10]).unwrap(),
                0
            ),
        "the model trained"
    );
}

/// A table like a clinic's: an ID column, features on very different scales (one around
/// 1000, one around 0.1), string labels. Seeded, so the file is the same on every run.
fn clinic_csv(path: &std::path::Path, rows: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let mut s = String::from("id;area;smoothness;texture;diagnosis\n");
    for i in 0..rows {
        let m = rng.gen_bool(0.4);
        let shift = if m { 1.0 } else { -1.0 };
        let area = 800.0 + 150.0 * (shift + rng.gen_range(-1.2..1.2));
        let smooth = 0.1 + 0.01 * (shift + rng.gen_range(-1.2..1.2));
        let texture = 20.0 + 4.0 * rng.gen_range(-1.0..1.0);
        let label = if m { "malignant" } else { "benign" };
        s += &format!("P{i:05};{area:.1};{smooth:.5};{texture:.2};{label}\n");
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn federated_standardisation_trains_a_label_skewed_table_and_its_model_file_predicts_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (dir.path().join("train.csv"), dir.path().join("test.csv"));
    clinic_csv(&train, 600, 1);
    clinic_csv(&test, 300, 2);
    let opts = "label=diagnosis,drop=id,delimiter=semicolon,classes=benign|malignant";
    let text = format!(
        r#"
name = "clinic"
data = "csv:{},{opts}"
test_data = "csv:{},{opts}"
rounds = 8
seed = 5
threads = 2
[model]
layers = [3, 8, 2]
[population]
clients = 3
partition = {{ kind = "dirichlet", alpha = 0.5 }}
min_examples = 20
[train]
batch_size = 16
lr = 0.1
[strategy]
min_fit_clients = 3
[standardize]
enabled = true
"#,
        train.display(),
        test.display()
    );
    let configs = expand(&text, &[]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (rdir, finished) =
        dpfl_sim::run_experiment(configs, out.path(), &mut |_, _, _| {}).unwrap();
    let acc = finished[0].result.final_accuracy().unwrap();
    assert!(acc > 0.9, "accuracy {acc}");
    // The model file carries the transform (the pooled statistics of the training table,
    // computed here independently) and the names, and predicts exactly what was evaluated.
    let model = dpfl_ml::predict::ModelFile::load(
        &rdir.join(format!("{}.model.safetensors", finished[0].config.id)),
    )
    .unwrap();
    assert_eq!(model.class_names, vec!["benign", "malignant"]);
    assert_eq!(model.feature_names, vec!["area", "smoothness", "texture"]);
    let src: dpfl_ml::DataSource = format!("csv:{},{opts}", train.display()).parse().unwrap();
    let raw = src.load().unwrap();
    let st = model.standardizer.clone().unwrap();
    for j in 0..3 {
        let col: Vec<f64> = (0..raw.len())
            .map(|r| raw.features[r * 3 + j] as f64)
            .collect();
        let mean = col.iter().sum::<f64>() / col.len() as f64;
        let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / col.len() as f64;
        assert!(
            (st.mean[j] - mean).abs() < 1e-9 * mean.abs().max(1.0),
            "feature {j}"
        );
        assert!(
            (st.std[j] - var.sqrt()).abs() < 1e-6 * var.sqrt(),
            "feature {j}"
        );
    }
    let tsrc: dpfl_ml::DataSource = format!("csv:{},{opts}", test.display()).parse().unwrap();
    let tdata = tsrc.load().unwrap();
    let p = dpfl_ml::predict::predict(&model, &tdata, tch::Device::Cpu).unwrap();
    let s = dpfl_ml::predict::score(&p, &tdata.labels);
    assert!((s.accuracy - acc).abs() < 1e-9, "{} vs {acc}", s.accuracy);
    assert!(s.auc.unwrap() > 0.9 && s.f1.unwrap() > 0.8, "{s:?}");
}

/// Distributed DP in the simulator: every virtual client clips, encodes with the
/// deployment's `DistributedEncoder` (its integer noise share included) inside its
/// in-memory SecAgg+ client; the coordinator unmasks exactly the plaintext ring sum of the
/// survivors' encodings, decodes it, and the ledger reports both labelled epsilons.
#[test]
fn distributed_dp_runs_over_in_memory_secure_aggregation_with_both_epsilons() {
    for mechanism in ["skellam", "ddgauss"] {
        let text = format!(
            r#"
name = "dist-{mechanism}"
rounds = 2
seed = 7
test_limit = 300
threads = 2
secure_aggregation = true
[model]
layers = [784, 8, 10]
[population]
clients = 20
examples_per_client = 30
[train]
epochs = 3
batch_size = 10
lr = 0.1
[strategy]
min_fit_clients = 3
[dp]
mode = "distributed"
sampling_rate = 0.8
noise_multiplier = 0.5
clip_norm = 0.5
delta = 1e-5
# Accounted over 4 of about 16 sampled: whether a round is released depends on one client
# with probability ~4e-8 per round (inside delta); over 10 it would be ~5e-3, and no
# epsilon would hold.
[secagg]
min_contributors = 4
max_contributors = 20
bits = 20
mechanism = "{mechanism}"
"#
        );
        let cs = expand(&text, &[]).unwrap();
        let t = std::time::Instant::now();
        let r = dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap();
        eprintln!(
            "{mechanism}: {:.1}s, accuracy {:?}, epsilon {:?}, server {:?}, rows {:?}",
            t.elapsed().as_secs_f64(),
            r.final_accuracy(),
            r.epsilon,
            r.epsilon_server,
            r.rows.iter().map(|w| w.participants).collect::<Vec<_>>()
        );
        assert_eq!(r.rounds, 2, "{mechanism}: {}", r.finish);
        assert_eq!(
            r.secure_sum_exact,
            vec![true, true],
            "{mechanism}: every unmasked sum is the plaintext ring sum"
        );
        assert!(r.rows.iter().all(|w| w.participants >= 4), "{:?}", r.rows);
        // Chance is 0.1 on ten classes; the untrained [784, 8, 10] model is near it (this
        // configuration reaches about 0.3 with either DP mode, 0.42 without DP).
        let acc = r.final_accuracy().unwrap();
        assert!(acc > 0.2, "{mechanism}: the model did not train ({acc})");
        // Both epsilons: against observers of the models (amplified by q = 0.5) is below
        // the one against the server (no amplification), and neither is zero.
        let (model, server) = (r.epsilon.unwrap(), r.epsilon_server.unwrap());
        assert!(model > 0.0 && model.is_finite(), "{model}");
        assert!(server.is_finite() && model < server, "{model} vs {server}");
        // Some client took part in both rounds (10 of 20 expected each round) or at least
        // one: its actual spend is positive and at most the every-release figure.
        let max_client = r.epsilon_max_client.unwrap();
        assert!(
            max_client > 0.0 && max_client <= server + 1e-12,
            "{max_client}"
        );
        assert_eq!(
            r.rows.last().unwrap().epsilon,
            Some(model),
            "the rows carry the epsilon against observers of the models"
        );
    }
}

/// `secure_sum = "sum"` replaces the masking protocol by the sum it unmasks: with the same
/// seed, a run that takes the sum directly ends with exactly the model (bit for bit), the
/// rows and the epsilons of a run in which every client went through the five stages, for
/// distributed DP (both mechanisms) and for central DP over secure aggregation. Rounds
/// that can never be summed (more participants than `max_contributors`) are abandoned with
/// the model untouched and nothing released, and limits under which the release decision
/// would hinge on one client stop the run before its first round, in both modes.
#[test]
fn a_directly_taken_secure_sum_equals_the_protocols_bit_for_bit() {
    let base = |mode: &str, extra: &str| {
        format!(
            r#"
name = "sum-{mode}"
rounds = 2
seed = 11
test_limit = 200
threads = 2
secure_aggregation = true
secure_sum = "{mode}"
[model]
layers = [784, 6, 10]
[population]
clients = 16
examples_per_client = 20
[train]
epochs = 1
batch_size = 10
lr = 0.1
[strategy]
min_fit_clients = 3
[dp]
sampling_rate = 1.0
noise_multiplier = 0.5
clip_norm = 0.5
delta = 1e-5
{extra}
"#
        )
    };
    let cases = [
        (
            "distributed skellam",
            "mode = \"distributed\"\n[secagg]\nmin_contributors = 8\nmax_contributors = 16\nbits = 18\nmechanism = \"skellam\"",
        ),
        (
            "distributed ddgauss",
            "mode = \"distributed\"\n[secagg]\nmin_contributors = 8\nmax_contributors = 16\nbits = 14\nmechanism = \"ddgauss\"",
        ),
        ("central", "mode = \"central\"\n[secagg]\nbits = 32"),
    ];
    for (what, extra) in cases {
        let run = |mode: &str| {
            let cs = expand(&base(mode, extra), &[]).unwrap();
            dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap()
        };
        let (protocol, direct) = (run("protocol"), run("sum"));
        assert_eq!(protocol.rounds, 2, "{what}: {}", protocol.finish);
        assert!(
            !protocol.secure_sum_exact.is_empty() && protocol.secure_sum_exact.iter().all(|b| *b),
            "{what}: {:?}",
            protocol.secure_sum_exact
        );
        assert!(protocol
            .rows
            .iter()
            .all(|r| !r.abandoned && r.participants >= 3));
        let changed = protocol
            .final_params
            .iter()
            .zip(&dpfl_common::model::init_params(
                &dpfl_common::ModelSpec::new(vec![784, 6, 10]).unwrap(),
                dpfl_sim::experiment::SimConfig::default().model.init_seed,
            ))
            .any(|(a, b)| a != b);
        assert!(changed, "{what}: the model trained");
        assert_eq!(protocol.final_params.len(), direct.final_params.len());
        let first_difference = protocol
            .final_params
            .iter()
            .zip(&direct.final_params)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(first_difference, None, "{what}: same model bit for bit");
        let parts = |r: &dpfl_sim::run::RunResult| {
            r.rows.iter().map(|w| w.participants).collect::<Vec<_>>()
        };
        assert_eq!(parts(&protocol), parts(&direct), "{what}");
        assert_eq!(protocol.epsilon, direct.epsilon, "{what}");
        assert_eq!(protocol.epsilon_server, direct.epsilon_server, "{what}");
    }
    // Every round samples all 16, more than the 10 a sum may hold: abandoned, nothing
    // released (and one client more or less changes nothing: no epsilon is spent).
    for mode in ["protocol", "sum"] {
        let text = base(
            mode,
            "mode = \"distributed\"\n[secagg]\nmin_contributors = 8\nmax_contributors = 10\nbits = 18",
        );
        let cs = expand(&text, &[]).unwrap();
        let r = dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap();
        assert_eq!(r.rows.len(), 2, "{mode}: {}", r.finish);
        assert!(
            r.rows.iter().all(|w| w.abandoned && w.participants == 0),
            "{mode}: {:?}",
            r.rows
        );
        assert!(r.rows.iter().all(|w| w
            .note
            .as_deref()
            .is_some_and(|n| n.contains("secure aggregation"))));
        assert_eq!(r.epsilon, Some(0.0), "{mode}: nothing was released");
    }
    // At most 15 per sum and 16 clients, all sampled: whether a round is released would
    // hinge on one client (probability 1), so no epsilon holds and the run stops before
    // its first round, in both modes, with nothing released.
    for mode in ["protocol", "sum"] {
        let text = base(
            mode,
            "mode = \"distributed\"\n[secagg]\nmin_contributors = 8\nmax_contributors = 15\nbits = 18",
        );
        let cs = expand(&text, &[]).unwrap();
        let r = dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap();
        assert_eq!(r.rounds, 0, "{mode}: {}", r.finish);
        assert!(r.rows.is_empty(), "{mode}: {:?}", r.rows);
        assert_eq!(r.epsilon, Some(0.0), "{mode}: nothing was released");
        assert_eq!(
            r.final_params,
            dpfl_common::model::init_params(
                &dpfl_common::ModelSpec::new(vec![784, 6, 10]).unwrap(),
                dpfl_sim::experiment::SimConfig::default().model.init_seed,
            ),
            "{mode}: the model never changed"
        );
    }
}

/// A small CNN (two 5x5 convolutions of 8 and 16 channels, a 64-wide dense layer) on
/// Fashion-MNIST: 4 clients of 500 images, 4 rounds of 2 local epochs. Seen on a loaded
/// 2-core machine: test accuracy 0.78 in 6 s.
const CNN: &str = r#"
name = "cnn"
rounds = 4
seed = 1
test_limit = 1000
threads = 2
[model]
kind = "cnn"
[model.cnn]
channels = [8, 16]
hidden = [64]
[population]
clients = 4
examples_per_client = 500
[train]
epochs = 2
batch_size = 20
lr = 0.05
momentum = 0.9
[strategy]
min_fit_clients = 4
"#;

#[test]
fn a_cnn_learns_fashion_mnist_in_the_simulator() {
    let cs = expand(CNN, &[]).unwrap();
    let cfg = &cs[0].config;
    let spec = cfg.model.spec().unwrap();
    assert_eq!(spec.to_arg(), "cnn:1x28x28:8,16:5:64,10");
    let t0 = std::time::Instant::now();
    let r = dpfl_sim::run::run(cfg, &mut |_| {}).unwrap();
    let acc = r.final_accuracy().unwrap();
    eprintln!(
        "cnn {spec}: test accuracy {acc:.4} after {} rounds in {:.1}s",
        r.rounds,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(r.rounds, 4);
    assert_eq!(r.final_params.len(), spec.num_params());
    // Chance is 0.1.
    assert!(acc >= 0.6, "accuracy {acc}");
    // A batched simulation cannot run it: refused before anything runs.
    let batched = expand(CNN, &[("batched".into(), "true".into())]);
    assert!(
        matches!(&batched, Err(e) if e.to_string().contains("batched")),
        "{:?}",
        batched.err()
    );
}

#[test]
fn the_simulator_starts_from_a_warm_start_file() {
    let text = r#"
name = "warm"
rounds = 1
seed = 2
test_limit = 200
[model]
layers = [784, 16, 10]
[population]
clients = 2
examples_per_client = 40
[train]
batch_size = 10
lr = 0.0001
max_steps = 1
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("start.safetensors");
    let spec = dpfl_common::ModelSpec::new(vec![784, 16, 10]).unwrap();
    let start = dpfl_common::model::init_params(&spec, 99);
    dpfl_ml::export::save_safetensors(&spec, &start, &file).unwrap();
    let path = format!("{:?}", file.display().to_string());
    let cs = expand(text, &[("model.init_model".into(), path)]).unwrap();
    let r = dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap();
    let seeded = dpfl_common::model::init_params(&spec, 0);
    assert!(max_abs_diff(&r.final_params, &start) < 1e-3);
    assert!(max_abs_diff(&seeded, &start) > 0.01);
    // A file of another model is refused with its name and the mismatch.
    let other = dpfl_common::ModelSpec::new(vec![784, 8, 10]).unwrap();
    dpfl_ml::export::save_safetensors(&other, &dpfl_common::model::init_params(&other, 1), &file)
        .unwrap();
    let e = dpfl_sim::run::run(&cs[0].config, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("start.safetensors"), "{e}");
}
