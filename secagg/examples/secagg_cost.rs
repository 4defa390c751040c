//! Cost of secure aggregation for a 199,210-parameter update: client and server CPU per
//! round and bytes up and down per node, for n = 10, 100 and 1,000 at 0 % and 5 % dropout.
//!
//! ```text
//! cargo run --release -p dpfl-secagg --example secagg_cost [-- --len N --sizes 10,100]
//! ```
//!
//! Every node runs the whole protocol in this one thread (real ECDSA identities, seeded
//! RNG), so CPU times are thread CPU times of exactly the calls of one party. Dropouts
//! happen after sharing and before the masked input, the costliest case for the server
//! (it reconstructs the dropped nodes' mask keys and recomputes their pairwise masks).
//! Bytes are bincode (standard config) sizes of the messages. "+ encode" is the
//! FixedPoint encoding of the update, outside the protocol proper; "of which unmask" is
//! the server's last step (reconstruction and mask removal). Parameters come from the
//! finder with γ = 5 % and δ = 5 % (at least one node) against a curious server; the last
//! row uses the semi-malicious finder at n = 1,000.

use dpfl_secagg::params::find_params;
use dpfl_secagg::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeSet;
use std::time::Duration;

fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t0 = cpu_now();
    let r = f();
    *acc += cpu_now() - t0;
    r
}

fn size<T: serde::Serialize>(m: &T) -> usize {
    bincode::serde::encode_to_vec(m, bincode::config::standard())
        .map(|v| v.len())
        .unwrap_or(0)
}

/// One measured configuration (`dpfl-bench` includes this file for its table).
pub struct Row {
    pub n: usize,
    pub dropped: usize,
    pub params: GraphParams,
    pub adversary: &'static str,
    pub client_mean: Duration,
    pub client_max: Duration,
    pub encode_mean: Duration,
    pub server: Duration,
    pub unmask: Duration,
    pub up_mean: f64,
    pub down_mean: f64,
    pub up_max: usize,
}

/// Runs one round of `n` nodes with `len`-value updates and the given dropout rate.
pub fn run(
    n: usize,
    len: u32,
    dropout: f64,
    adversary: AdversaryClass,
    seed: u64,
) -> Result<Row, Box<dyn std::error::Error>> {
    let dropped_count = (dropout * n as f64).ceil() as usize;
    let threat = ThreatModel {
        adversarial_rate: 0.05,
        dropout_rate: 0.05f64.max(1.0 / n as f64),
        adversary,
    };
    let params = find_params(n as u32, &threat)?;
    let bits = 32u8;
    let fp = FixedPoint::new(1.0, bits, n as u32)?;

    // Identities (not timed: certificates exist before any round).
    let mut verifier = EcdsaP256Verifier::new();
    let mut signers = Vec::with_capacity(n);
    let names: Vec<NodeId> = (0..n).map(|i| format!("node-{i:04}")).collect();
    for name in &names {
        let (s, _) = EcdsaP256Signer::generate()?;
        verifier.insert_public_key(name, s.public_key())?;
        signers.push(s);
    }
    let verifier = std::sync::Arc::new(verifier);
    let config = ClientConfig {
        vector_len: len,
        bits,
        threat_model: None,
    };
    let mut clients: Vec<_> = signers
        .into_iter()
        .zip(&names)
        .map(|(s, name)| Client::new(name.clone(), config, s, verifier.clone()))
        .collect();

    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut server_cpu = Duration::ZERO;
    let mut unmask_cpu = Duration::ZERO;
    let ctx = timed(&mut server_cpu, || {
        RoundContext::new(1, names.clone(), params, bits, len, &mut rng)
    })?;
    let mut server = timed(&mut server_cpu, || Server::new(ctx.clone()))?;
    let mut dropped = BTreeSet::new();
    while dropped.len() < dropped_count {
        dropped.insert(rng.gen_range(0..n));
    }

    let mut client_cpu = vec![Duration::ZERO; n];
    let mut encode_cpu = vec![Duration::ZERO; n];
    let mut up = vec![0usize; n];
    let mut down = vec![0usize; n];
    let mut expected = vec![0u64; len as usize];
    let setup = timed(&mut server_cpu, || server.setup());
    let mut outgoing: Vec<(NodeId, ToNode)> = names
        .iter()
        .map(|p| (p.clone(), ToNode::Setup(setup.clone())))
        .collect();
    let aggregate = loop {
        for (to, msg) in outgoing.drain(..) {
            let i = ctx.index_of(&to).ok_or("unknown node")? as usize;
            down[i] += size(&msg);
            let c = &mut clients[i];
            let answer = match &msg {
                ToNode::Setup(m) => {
                    timed(&mut client_cpu[i], || c.handle_setup(m, &mut rng)).map(FromNode::Keys)
                }
                ToNode::NeighbourKeys(m) => {
                    timed(&mut client_cpu[i], || c.handle_neighbour_keys(m, &mut rng))
                        .map(FromNode::Shares)
                }
                ToNode::Shares(m) => {
                    if dropped.contains(&i) {
                        timed(&mut server_cpu, || server.handle_dropout(&to))?;
                        continue;
                    }
                    // The node's clipped update and its encoding.
                    let mut update: Vec<f32> =
                        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                    let norm = update
                        .iter()
                        .map(|x| f64::from(*x).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    for x in update.iter_mut() {
                        *x = (f64::from(*x) / norm * 0.999) as f32;
                    }
                    let x = timed(&mut encode_cpu[i], || fp.encode(&update, &mut rng))?;
                    for (a, v) in expected.iter_mut().zip(&x) {
                        *a = a.wrapping_add(*v) & 0xffff_ffff;
                    }
                    timed(&mut client_cpu[i], || c.handle_shares(m, &x)).map(FromNode::MaskedInput)
                }
                ToNode::Survivors(m) => {
                    timed(&mut client_cpu[i], || c.handle_survivors(m)).map(FromNode::Signature)
                }
                ToNode::Unmask(m) => {
                    timed(&mut client_cpu[i], || c.handle_unmask(m)).map(FromNode::Unmask)
                }
            }?;
            up[i] += size(&answer);
            timed(&mut server_cpu, || server.handle_message(&to, answer))?;
        }
        let last = server.stage() == Stage::Unmasking;
        let before = server_cpu;
        let transition = timed(&mut server_cpu, || server.close_stage())?;
        if last {
            unmask_cpu = server_cpu - before;
        }
        match transition {
            Transition::Send(next) => outgoing = next,
            Transition::Done(agg) => break agg,
        }
    };
    if aggregate.sum != expected {
        return Err("the unmasked sum differs from the plaintext sum".into());
    }
    let live: Vec<usize> = (0..n).filter(|i| !dropped.contains(i)).collect();
    let mean = |v: &[Duration]| live.iter().map(|&i| v[i]).sum::<Duration>() / live.len() as u32;
    Ok(Row {
        n,
        dropped: dropped_count,
        params,
        adversary: match adversary {
            AdversaryClass::CuriousServer => "curious",
            AdversaryClass::SemiMaliciousServer => "semi-mal.",
        },
        client_mean: mean(&client_cpu),
        client_max: live
            .iter()
            .map(|&i| client_cpu[i])
            .max()
            .unwrap_or_default(),
        encode_mean: mean(&encode_cpu),
        server: server_cpu,
        unmask: unmask_cpu,
        up_mean: live.iter().map(|&i| up[i]).sum::<usize>() as f64 / live.len() as f64,
        down_mean: live.iter().map(|&i| down[i]).sum::<usize>() as f64 / live.len() as f64,
        up_max: live.iter().map(|&i| up[i]).max().unwrap_or(0),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let len: u32 = arg("--len")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(199_210);
    let sizes: Vec<usize> = match arg("--sizes") {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![10, 100, 1000],
    };
    let f32_bytes = 4.0 * f64::from(len);
    println!("update: {len} parameters ({f32_bytes} bytes as f32), ring 2^32");
    println!(
        "| n | dropped | server | k | t | client CPU mean (max) | + encode | server CPU | of which unmask | up / node | up ÷ f32 (max) | down / node |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cases: Vec<(usize, f64, AdversaryClass)> = Vec::new();
    for &n in &sizes {
        for d in [0.0, 0.05] {
            cases.push((n, d, AdversaryClass::CuriousServer));
        }
    }
    if sizes.contains(&1000) {
        cases.push((1000, 0.05, AdversaryClass::SemiMaliciousServer));
    }
    for (i, (n, d, class)) in cases.into_iter().enumerate() {
        let r = run(n, len, d, class, i as u64 + 1)?;
        println!(
            "| {} | {} | {} | {} | {} | {:.1} ms ({:.1} ms) | {:.1} ms | {:.0} ms | {:.0} ms | {:.0} B | {:.4}x | {:.0} B |",
            r.n,
            r.dropped,
            r.adversary,
            r.params.degree,
            r.params.threshold,
            r.client_mean.as_secs_f64() * 1e3,
            r.client_max.as_secs_f64() * 1e3,
            r.encode_mean.as_secs_f64() * 1e3,
            r.server.as_secs_f64() * 1e3,
            r.unmask.as_secs_f64() * 1e3,
            r.up_mean,
            r.up_max as f64 / f32_bytes,
            r.down_mean,
        );
    }
    Ok(())
}
