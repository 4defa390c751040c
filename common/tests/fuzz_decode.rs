//! Fuzzing the decoder that reads peer bytes (`wire::decode`: every hello, request,
//! update and evaluation result goes through it). `cargo fuzz` needs a nightly toolchain,
//! which this project does not use, so this is a mutation fuzzer on stable:
//!
//! - in the normal suite: every corpus file (`fuzz/corpus/`, committed), each truncated at
//!   every length, each byte replaced by 0, 0xff and two bit-flips, and the length fields
//!   patched to extreme values: no panic, and whatever is accepted is canonical;
//! - `FUZZ_SECONDS=300 cargo test --release -p dpfl-common --test fuzz_decode -- --ignored --nocapture`:
//!   random stacked mutations (seeded, reported) for as long as asked.
//!
//! `FUZZ_REGENERATE=1` rewrites the corpus from the message kinds below.

use dpfl_common::config::{ClientPrivacy, DpMode, TrainConfig};
use dpfl_common::model::ModelSpec;
use dpfl_common::wire::*;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

const LIMIT: usize = 1 << 20;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let spec = ModelSpec::new(vec![4, 3, 2]).unwrap();
    let hello = Hello {
        software: "dpfl".into(),
        dp_mode: DpMode::Local,
        input_dim: 4,
        num_classes: 2,
        num_examples: 1000,
        num_eval_examples: 0,
        class_names: vec!["benign".into(), "malignant".into()],
    };
    let welcome = Welcome {
        node: "node-1".into(),
        spec_hash: spec.hash(),
        spec: spec.clone(),
        dp: DpAgreement {
            mode: DpMode::Central,
            noise_multiplier: 1.1,
            sampling_rate: 0.1,
            delta: 1e-5,
        },
    };
    let train = TrainRequest {
        round: 3,
        spec_hash: spec.hash(),
        config: TrainConfig::default(),
        privacy: ClientPrivacy::NONE,
        secure_aggregation: None,
    };
    let update = UpdateMeta {
        round: 3,
        spec_hash: spec.hash(),
        num_examples: 60,
        metrics: Some(TrainMetrics {
            loss: 0.3,
            accuracy: 0.9,
            steps: 2,
            seconds: 0.1,
        }),
        clipped: Some(false),
    };
    let p = spec.num_params();
    vec![
        ("hello", encode(&Header::Hello(hello), &[])),
        ("welcome", encode(&Header::Welcome(welcome), &[])),
        (
            "refused",
            encode(
                &Header::Refused(Refusal {
                    kind: RefusalKind::DpMode,
                    detail: "mode".into(),
                }),
                &[],
            ),
        ),
        ("train", encode(&Header::Train(train), &vec![0.5; p])),
        ("update", encode(&Header::Update(update), &vec![-0.25; p])),
        (
            "evaluate",
            encode(
                &Header::Evaluate(EvaluateRequest {
                    round: 4,
                    spec_hash: spec.hash(),
                }),
                &[1.0; 5],
            ),
        ),
        (
            "eval_result",
            encode(
                &Header::EvalResult(EvalResult {
                    round: 4,
                    loss: 0.2,
                    accuracy: 0.5,
                    num_examples: 7,
                }),
                &[],
            ),
        ),
        (
            "failed",
            encode(
                &Header::Failed {
                    round: 1,
                    reason: "no data".into(),
                },
                &[],
            ),
        ),
        (
            "finish",
            encode(
                &Header::Finish(Finish {
                    reason: "done".into(),
                    rounds_completed: 9,
                }),
                &[],
            ),
        ),
        ("held", encode(&Header::Held(update_meta(&spec)), &[])),
        ("secagg_request", {
            let (frame, payload) = bytes_payload(4, &[7, 1, 255, 0, 9, 3]).unwrap();
            encode(&Header::SecAggRequest(frame), &payload)
        }),
        ("secagg_answer", {
            let (frame, payload) = bytes_payload(4, &[0xff; 8]).unwrap();
            encode(&Header::SecAggAnswer(frame), &payload)
        }),
        (
            "stats_request",
            encode(
                &Header::StatsRequest(StatsRequest {
                    spec_hash: spec.hash(),
                    lo: vec![0.0; 4],
                    hi: vec![1.0; 4],
                    local_noise_multiplier: None,
                    central_noise_multiplier: Some(2.0),
                    normalized: true,
                    secure_aggregation: Some(StatsSecAgg {
                        clip_norm: 13f64.sqrt(),
                        bits: 62,
                        distributed: None,
                    }),
                }),
                &[],
            ),
        ),
        (
            "stats_request_distributed",
            encode(
                &Header::StatsRequest(StatsRequest {
                    spec_hash: spec.hash(),
                    lo: vec![0.0; 4],
                    hi: vec![1.0; 4],
                    local_noise_multiplier: None,
                    central_noise_multiplier: None,
                    normalized: true,
                    secure_aggregation: Some(StatsSecAgg {
                        clip_norm: 13f64.sqrt(),
                        bits: 20,
                        distributed: Some(dpfl_common::wire::DistributedRound {
                            params: dpfl_common::dp::distributed::DistributedParams {
                                mechanism: dpfl_common::dp::distributed::Mechanism::Skellam,
                                bits: 20,
                                clip_norm: 13f64.sqrt(),
                                noise_multiplier: 2.0,
                                min_contributors: 3,
                                max_contributors: 100,
                                dim: 14,
                                beta: (-0.5f64).exp(),
                                headroom: 3.0,
                            },
                            rotation_seed: 0x5eed,
                        }),
                    }),
                }),
                &[],
            ),
        ),
        (
            "stats_held",
            encode(
                &Header::StatsHeld(StatsHeld {
                    spec_hash: spec.hash(),
                }),
                &[],
            ),
        ),
        (
            "stats",
            encode(
                &Header::Stats(StatsReport {
                    spec_hash: spec.hash(),
                    count: vec![10.0; 4],
                    sum: vec![5.0, 1e6, -3.0, 0.0],
                    sum_sq: vec![3.0, 1e12, 9.0, 0.0],
                    label_counts: vec![4.0, 6.0],
                    bounded: false,
                    normalized: false,
                    noised: false,
                }),
                &[],
            ),
        ),
        (
            "standardize",
            encode(
                &Header::Standardize(StandardizeSpec {
                    spec_hash: spec.hash(),
                    mean: vec![0.5; 4],
                    std: vec![2.0; 4],
                    lo: vec![],
                    hi: vec![],
                }),
                &[],
            ),
        ),
        (
            "standardized",
            encode(&Header::Standardized { features: 4 }, &[]),
        ),
    ]
}

fn update_meta(spec: &ModelSpec) -> UpdateMeta {
    UpdateMeta {
        round: 4,
        spec_hash: spec.hash(),
        num_examples: 60,
        metrics: None,
        clipped: None,
    }
}

fn corpus() -> Vec<Vec<u8>> {
    if std::env::var_os("FUZZ_REGENERATE").is_some() {
        std::fs::create_dir_all(corpus_dir()).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(corpus_dir().join(format!("{name}.bin")), bytes).unwrap();
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let c: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(c.len() >= 12, "corpus missing: run with FUZZ_REGENERATE=1");
    c
}

/// Decodes; whatever is accepted must re-encode to the same bytes (nothing silently
/// ignored, no second reading of the same message).
fn check(bytes: &[u8]) {
    if let Ok(m) = decode(bytes, LIMIT) {
        assert_eq!(
            encode(&m.header, &m.payload),
            bytes,
            "accepted bytes must be canonical"
        );
    }
}

#[test]
fn corpus_decodes_and_survives_systematic_mutations() {
    for seed in &corpus() {
        assert!(
            decode(seed, LIMIT).is_ok(),
            "corpus entries are valid messages"
        );
        for len in 0..seed.len() {
            check(&seed[..len]);
        }
        for i in 0..seed.len() {
            for v in [0u8, 0xff, seed[i] ^ 0x01, seed[i] ^ 0x80] {
                let mut m = seed.clone();
                m[i] = v;
                check(&m);
            }
        }
        for (off, len) in [(8usize, 4usize), (12, 8)] {
            for v in [0u64, 1, 3, u32::MAX as u64, u64::MAX, seed.len() as u64] {
                let mut m = seed.clone();
                m[off..off + len].copy_from_slice(&v.to_le_bytes()[..len]);
                check(&m);
            }
        }
    }
}

#[test]
#[ignore = "long run: FUZZ_SECONDS=300 cargo test --release -p dpfl-common --test fuzz_decode -- --ignored"]
fn random_mutations_for_fuzz_seconds() {
    let secs: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let corpus = corpus();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let start = std::time::Instant::now();
    let (mut execs, mut accepted) = (0u64, 0u64);
    while start.elapsed().as_secs() < secs {
        for _ in 0..1000 {
            let mut m = corpus[rng.gen_range(0..corpus.len())].clone();
            for _ in 0..rng.gen_range(1..8) {
                match rng.gen_range(0..5) {
                    0 if !m.is_empty() => {
                        let i = rng.gen_range(0..m.len());
                        m[i] = rng.gen();
                    }
                    1 if !m.is_empty() => {
                        let n = rng.gen_range(0..m.len());
                        m.truncate(n);
                    }
                    2 => {
                        let i = rng.gen_range(0..=m.len());
                        let n = rng.gen_range(1..64);
                        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                        m.splice(i..i, junk);
                    }
                    3 if m.len() > 20 => {
                        let off = [8usize, 12][rng.gen_range(0..2)];
                        let v: u32 = rng.gen();
                        m[off..off + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    _ if m.len() > 2 => {
                        let i = rng.gen_range(0..m.len() - 1);
                        m.swap(i, i + 1);
                    }
                    _ => {}
                }
            }
            if decode(&m, LIMIT).is_ok() {
                accepted += 1;
            }
            check(&m);
            execs += 1;
        }
    }
    println!(
        "fuzz: {execs} inputs in {secs}s (seed {seed}), {accepted} decoded as valid, no panic"
    );
}
