//! Whole rounds of secure aggregation in memory: real clients, real server, real ECDSA
//! signatures, seeded RNGs; dropouts at every stage, a malicious server's tricks.

use dpfl_secagg::params::find_params;
use dpfl_secagg::shamir::{reconstruct, ShamirError};
use dpfl_secagg::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;
use std::sync::Arc;

type TestClient = Client<EcdsaP256Signer, Arc<EcdsaP256Verifier>>;

/// Participants with real P-256 identities.
struct Federation {
    names: Vec<NodeId>,
    verifier: Arc<EcdsaP256Verifier>,
    keys: Vec<Vec<u8>>,
}

impl Federation {
    fn new(n: usize) -> Self {
        let mut verifier = EcdsaP256Verifier::new();
        let mut names = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("node-{i:04}");
            let (signer, der) = EcdsaP256Signer::generate().unwrap();
            verifier
                .insert_public_key(&name, signer.public_key())
                .unwrap();
            names.push(name);
            keys.push(der);
        }
        Self {
            names,
            verifier: Arc::new(verifier),
            keys,
        }
    }

    fn clients(&self, config: ClientConfig) -> Vec<TestClient> {
        self.names
            .iter()
            .zip(&self.keys)
            .map(|(name, der)| {
                Client::new(
                    name.clone(),
                    config,
                    EcdsaP256Signer::from_pkcs8(der).unwrap(),
                    self.verifier.clone(),
                )
            })
            .collect()
    }
}

/// The stage at which a node stops answering (it answers every earlier one).
type Drops = BTreeMap<usize, Stage>;

/// How the server's messages are tampered with before delivery (a malicious server).
type Tamper<'a> = &'a mut dyn FnMut(Stage, &mut Vec<(NodeId, ToNode)>);

struct Outcome {
    result: Result<Aggregate, ServerError>,
    server: Server,
    client_errors: BTreeMap<usize, ClientError>,
}

struct Round<'a> {
    fed: &'a Federation,
    clients: Vec<TestClient>,
    ctx: RoundContext,
    inputs: Vec<Vec<u64>>,
    drops: Drops,
    /// Report drops to the server (otherwise the stage simply closes without them).
    report_drops: bool,
    server_verifies: bool,
    rng: ChaCha20Rng,
}

impl<'a> Round<'a> {
    fn new(
        fed: &'a Federation,
        round: u64,
        params: GraphParams,
        bits: u8,
        len: u32,
        seed: u64,
    ) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let ctx = RoundContext::new(round, fed.names.clone(), params, bits, len, &mut rng).unwrap();
        let mask = ctx.ring_mask();
        let inputs = (0..fed.names.len())
            .map(|_| (0..len).map(|_| rng.next_u64() & mask).collect())
            .collect();
        let config = ClientConfig {
            vector_len: len,
            bits,
            threat_model: None,
        };
        Self {
            fed,
            clients: fed.clients(config),
            ctx,
            inputs,
            drops: Drops::new(),
            report_drops: true,
            server_verifies: false,
            rng,
        }
    }

    fn run(&mut self, tamper: Tamper<'_>) -> Outcome {
        let mut server = Server::new(self.ctx.clone()).unwrap();
        if self.server_verifies {
            server = server.with_verifier(Box::new(self.fed.verifier.clone()));
        }
        let setup = server.setup();
        let mut outgoing: Vec<(NodeId, ToNode)> = self
            .ctx
            .participants
            .iter()
            .map(|p| (p.clone(), ToNode::Setup(setup.clone())))
            .collect();
        let mut client_errors = BTreeMap::new();
        let mut stage = Stage::AdvertiseKeys;
        loop {
            tamper(stage, &mut outgoing);
            for (to, msg) in outgoing.drain(..) {
                let bytes =
                    bincode::serde::encode_to_vec(&msg, bincode::config::standard()).unwrap();
                assert!(bytes.len() <= self.ctx.max_to_node_bytes(), "{stage}");
                let i = self.ctx.index_of(&to).unwrap() as usize;
                if self.drops.get(&i).is_some_and(|&s| s <= stage) {
                    if self.report_drops {
                        server.handle_dropout(&to).unwrap();
                    }
                    continue;
                }
                let c = &mut self.clients[i];
                let answer = match &msg {
                    ToNode::Setup(m) => c.handle_setup(m, &mut self.rng).map(FromNode::Keys),
                    ToNode::NeighbourKeys(m) => c
                        .handle_neighbour_keys(m, &mut self.rng)
                        .map(FromNode::Shares),
                    ToNode::Shares(m) => c
                        .handle_shares(m, &self.inputs[i])
                        .map(FromNode::MaskedInput),
                    ToNode::Survivors(m) => c.handle_survivors(m).map(FromNode::Signature),
                    ToNode::Unmask(m) => c.handle_unmask(m).map(FromNode::Unmask),
                };
                match answer {
                    Ok(a) => {
                        // Every message survives a bincode round trip.
                        let bytes =
                            bincode::serde::encode_to_vec(&a, bincode::config::standard()).unwrap();
                        assert!(bytes.len() <= self.ctx.max_from_node_bytes(), "{stage}");
                        let (a, _): (FromNode, usize) =
                            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                                .unwrap();
                        server.handle_message(&to, a).unwrap();
                    }
                    Err(e) => {
                        client_errors.insert(i, e);
                    }
                }
            }
            assert!(server.is_stage_complete() || !self.report_drops || !client_errors.is_empty());
            match server.close_stage() {
                Ok(Transition::Send(next)) => {
                    outgoing = next;
                    stage = outgoing
                        .first()
                        .map(|(_, m)| m.stage())
                        .unwrap_or(server.stage());
                }
                Ok(Transition::Done(agg)) => {
                    return Outcome {
                        result: Ok(agg),
                        server,
                        client_errors,
                    }
                }
                Err(e) => {
                    return Outcome {
                        result: Err(e),
                        server,
                        client_errors,
                    }
                }
            }
        }
    }

    fn expected_sum(&self, survivors: &[NodeId]) -> Vec<u64> {
        let mask = self.ctx.ring_mask();
        let mut sum = vec![0u64; self.ctx.vector_len as usize];
        for s in survivors {
            let i = self.ctx.index_of(s).unwrap() as usize;
            for (a, x) in sum.iter_mut().zip(&self.inputs[i]) {
                *a = a.wrapping_add(*x) & mask;
            }
        }
        sum
    }

    /// Nodes whose inputs must be in the sum: all but those dropped before their masked
    /// input (given that no client aborted).
    fn expected_survivors(&self) -> Vec<NodeId> {
        self.ctx
            .participants
            .iter()
            .enumerate()
            .filter(|(i, _)| self.drops.get(i).is_none_or(|&s| s > Stage::MaskedInput))
            .map(|(_, n)| n.clone())
            .collect()
    }

    fn neighbours(&self, i: usize) -> Vec<u32> {
        graph::Graph::new(self.ctx.len(), self.ctx.degree, &self.ctx.graph_seed)
            .neighbours(i as u32)
    }
}

fn no_tamper() -> impl FnMut(Stage, &mut Vec<(NodeId, ToNode)>) {
    |_, _| {}
}

fn finder(n: usize) -> GraphParams {
    find_params(
        n as u32,
        &ThreatModel {
            adversarial_rate: 0.05,
            dropout_rate: 0.05,
            adversary: AdversaryClass::CuriousServer,
        },
    )
    .unwrap()
}

fn assert_exact_sum(round: &mut Round<'_>) -> Aggregate {
    let out = round.run(&mut no_tamper());
    assert!(out.client_errors.is_empty(), "{:?}", out.client_errors);
    let agg = out.result.unwrap();
    assert_eq!(agg.survivors, round.expected_survivors());
    assert_eq!(agg.sum, round.expected_sum(&agg.survivors));
    agg
}

#[test]
fn sum_is_exact_for_many_population_sizes() {
    for (n, bits, len) in [
        (3usize, 32u8, 17u32),
        (4, 1, 5),
        (5, 64, 33),
        (7, 20, 100),
        (10, 32, 1000),
        (25, 33, 64),
        (60, 32, 64),
        (150, 16, 32),
    ] {
        let fed = Federation::new(n);
        let mut round = Round::new(&fed, 1, finder(n), bits, len, n as u64);
        assert_exact_sum(&mut round);
    }
}

#[test]
fn sum_is_exact_with_1000_nodes_and_the_finders_graph() {
    let fed = Federation::new(1000);
    let params = finder(1000);
    assert_eq!((params.degree, params.threshold), (30, 17));
    let mut round = Round::new(&fed, 1, params, 32, 8, 1000);
    // A few dropouts at different stages too.
    round.drops = [
        (3, Stage::ShareKeys),
        (500, Stage::MaskedInput),
        (999, Stage::Unmasking),
    ]
    .into();
    assert_exact_sum(&mut round);
}

#[test]
fn full_size_update_with_fixed_point_at_n_10() {
    const D: usize = 199_210;
    let n = 10;
    let fed = Federation::new(n);
    let params = GraphParams {
        degree: 9,
        threshold: 6,
    };
    let mut round = Round::new(&fed, 1, params, 32, D as u32, 7);
    let fp = FixedPoint::new(1.0, 32, n as u32).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let mut floats = Vec::new();
    for i in 0..n {
        let v: Vec<f32> = (0..D).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let v: Vec<f32> = v
            .iter()
            .map(|x| (f64::from(*x) / norm * 0.999) as f32)
            .collect();
        round.inputs[i] = fp.encode(&v, &mut rng).unwrap();
        floats.push(v);
    }
    round.drops = [(4, Stage::MaskedInput)].into();
    let agg = assert_exact_sum(&mut round);
    let decoded = fp.decode_sum(&agg.sum).unwrap();
    let m = agg.survivors.len() as u32;
    for (j, d) in decoded.iter().enumerate() {
        let truth: f64 = (0..n)
            .filter(|&i| i != 4)
            .map(|i| f64::from(floats[i][j]))
            .sum();
        assert!(
            (d - truth).abs() <= fp.error_bound(m),
            "{j}: {d} vs {truth}"
        );
    }
}

/// Picks dropouts at random stages so that no node loses more than `budget` neighbours.
fn random_drops(round: &Round<'_>, budget: usize, seed: u64, stages: &[Stage]) -> Drops {
    let n = round.ctx.len() as usize;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut lost = vec![0usize; n];
    let mut drops = Drops::new();
    for _ in 0..4 * n {
        let d = rng.gen_range(0..n);
        if drops.contains_key(&d) {
            continue;
        }
        let nb = round.neighbours(d);
        if nb.iter().all(|&v| lost[v as usize] < budget) {
            for &v in &nb {
                lost[v as usize] += 1;
            }
            drops.insert(d, stages[rng.gen_range(0..stages.len())]);
        }
    }
    drops
}

const ALL_STAGES: [Stage; 5] = [
    Stage::AdvertiseKeys,
    Stage::ShareKeys,
    Stage::MaskedInput,
    Stage::Consistency,
    Stage::Unmasking,
];

#[test]
fn dropouts_at_every_stage_up_to_k_minus_t_neighbours() {
    let n = 60;
    let fed = Federation::new(n);
    let params = GraphParams {
        degree: 10,
        threshold: 6,
    };
    for (seed, report) in [(1u64, true), (2, false), (3, true), (4, false)] {
        let mut round = Round::new(&fed, seed, params, 32, 50, seed);
        round.report_drops = report;
        round.drops = random_drops(&round, 4, seed, &ALL_STAGES);
        assert!(round.drops.len() >= 5, "{:?}", round.drops);
        assert_exact_sum(&mut round);
    }
    // Each stage alone, with one node losing exactly k − t = 4 neighbours.
    for stage in ALL_STAGES {
        let mut round = Round::new(&fed, 10, params, 32, 50, 10);
        let nb = round.neighbours(0);
        round.drops = nb.iter().take(4).map(|&v| (v as usize, stage)).collect();
        assert_exact_sum(&mut round);
    }
}

#[test]
fn beyond_k_minus_t_dropped_neighbours_the_round_aborts_and_nothing_unmasks() {
    let n = 30;
    let fed = Federation::new(n);
    let params = GraphParams {
        degree: 8,
        threshold: 5,
    };
    for stage in [
        Stage::ShareKeys,
        Stage::MaskedInput,
        Stage::Consistency,
        Stage::Unmasking,
    ] {
        let mut round = Round::new(&fed, 1, params, 32, 20, 5);
        // Node 0 loses k − t + 1 = 4 neighbours.
        let nb = round.neighbours(0);
        round.drops = nb.iter().take(4).map(|&v| (v as usize, stage)).collect();
        let out = round.run(&mut no_tamper());
        let err = out.result.unwrap_err();
        let ServerError::NotEnoughShares {
            node,
            kind,
            have,
            need,
        } = &err
        else {
            panic!("{stage}: {err:?}");
        };
        assert_eq!(*need, 5, "{stage}");
        assert!(*have < 5);
        // The secret the server needed cannot be rebuilt from what it holds.
        let (b, s) = out.server.shares_held(node).unwrap();
        let held = match kind {
            ShareKind::SelfMask => b,
            ShareKind::MaskKey => s,
        };
        assert!(matches!(
            reconstruct(&held, 5),
            Err(ShamirError::NotEnoughShares { .. })
        ));
        // And the round is over: nothing more is accepted.
        let mut server = out.server;
        assert_eq!(server.close_stage().unwrap_err(), ServerError::Aborted);
    }
    // Dropping before the keys are advertised: node 0 is left with too few neighbours to
    // share its secrets and aborts itself, so its input is never masked or sent. Whether
    // the round then succeeds depends on how many neighbours the others lost (node 0
    // included); either way no survivor's input is exposed.
    let mut round = Round::new(&fed, 2, params, 32, 20, 6);
    let nb = round.neighbours(0);
    round.drops = nb
        .iter()
        .take(4)
        .map(|&v| (v as usize, Stage::AdvertiseKeys))
        .collect();
    let out = round.run(&mut no_tamper());
    assert!(matches!(
        out.client_errors.get(&0),
        Some(ClientError::TooFewNeighbours {
            stage: Stage::ShareKeys,
            have: 4,
            need: 5
        })
    ));
    match out.result {
        Ok(agg) => {
            assert!(!agg.survivors.contains(&fed.names[0]));
            assert_eq!(agg.sum, round.expected_sum(&agg.survivors));
        }
        Err(ServerError::NotEnoughShares {
            node, kind, need, ..
        }) => {
            let (b, s) = out.server.shares_held(&node).unwrap();
            let held = if kind == ShareKind::SelfMask { b } else { s };
            assert!(reconstruct(&held, need).is_err());
        }
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn below_t_survivors_the_round_aborts_before_any_share_is_asked() {
    let fed = Federation::new(8);
    let params = GraphParams {
        degree: 7,
        threshold: 5,
    };
    let mut round = Round::new(&fed, 1, params, 32, 10, 1);
    round.drops = (0..4).map(|i| (i, Stage::MaskedInput)).collect();
    let out = round.run(&mut no_tamper());
    assert!(matches!(
        out.result,
        Err(ServerError::TooFewSurvivors {
            stage: Stage::MaskedInput,
            have: 4,
            need: 5
        })
    ));
    for name in &fed.names {
        let (b, s) = out.server.shares_held(name).unwrap();
        assert!(b.is_empty() && s.is_empty());
    }
}

#[test]
fn a_request_for_both_kinds_of_share_is_refused() {
    let fed = Federation::new(12);
    let params = GraphParams {
        degree: 6,
        threshold: 4,
    };
    // Some node has a surviving neighbour; ask node 0 for both shares of it.
    let mut round = Round::new(&fed, 1, params, 32, 10, 2);
    let victim_neighbour = round.neighbours(0)[0];
    let mut tamper = |stage: Stage, msgs: &mut Vec<(NodeId, ToNode)>| {
        if stage == Stage::Unmasking {
            for (to, m) in msgs.iter_mut() {
                if to == "node-0000" {
                    if let ToNode::Unmask(r) = m {
                        r.mask_key.push(victim_neighbour);
                    }
                }
            }
        }
    };
    let out = round.run(&mut tamper);
    assert_eq!(
        out.client_errors.get(&0),
        Some(&ClientError::BothShareKinds {
            peer: victim_neighbour
        })
    );

    // Across two requests: the first reveals the self-mask share, the second asks for the
    // mask-key share of the same peer.
    let mut round = Round::new(&fed, 2, params, 32, 10, 3);
    let mut first: Option<UnmaskRequest> = None;
    let mut tamper = |stage: Stage, msgs: &mut Vec<(NodeId, ToNode)>| {
        if stage == Stage::Unmasking {
            for (to, m) in msgs.iter() {
                if to == "node-0000" {
                    if let ToNode::Unmask(r) = m {
                        first = Some(r.clone());
                    }
                }
            }
        }
    };
    let out = round.run(&mut tamper);
    out.result.unwrap();
    let first = first.unwrap();
    let peer = first.self_mask[0];
    // Same request again: fine (idempotent). The other kind: refused.
    round.clients[0].handle_unmask(&first).unwrap();
    let mut second = first.clone();
    second.self_mask.clear();
    second.mask_key = vec![peer];
    assert_eq!(
        round.clients[0].handle_unmask(&second),
        Err(ClientError::BothShareKinds { peer })
    );
    // After a refusal the node has aborted and answers nothing more.
    assert_eq!(
        round.clients[0].handle_unmask(&first),
        Err(ClientError::Aborted)
    );

    // A mask-key share of a survivor contradicts the signed survivor set.
    let mut round = Round::new(&fed, 3, params, 32, 10, 4);
    let mut tamper = |stage: Stage, msgs: &mut Vec<(NodeId, ToNode)>| {
        if stage == Stage::Unmasking {
            for (to, m) in msgs.iter_mut() {
                if to == "node-0001" {
                    if let ToNode::Unmask(r) = m {
                        let p = r.self_mask.remove(0);
                        r.mask_key.push(p);
                    }
                }
            }
        }
    };
    let out = round.run(&mut tamper);
    assert!(matches!(
        out.client_errors.get(&1),
        Some(ClientError::ShareKindMismatch {
            kind: "mask-key",
            ..
        })
    ));
}

#[test]
fn a_substituted_public_key_fails_signature_verification() {
    let fed = Federation::new(10);
    let params = GraphParams {
        degree: 4,
        threshold: 3,
    };
    let mut round = Round::new(&fed, 1, params, 32, 10, 5);
    let mut attacker = ChaCha20Rng::seed_from_u64(666);
    let mut swapped = None;
    let mut tamper = |stage: Stage, msgs: &mut Vec<(NodeId, ToNode)>| {
        if stage == Stage::ShareKeys {
            for (to, m) in msgs.iter_mut() {
                if to == "node-0000" {
                    if let ToNode::NeighbourKeys(k) = m {
                        let entry = &mut k.keys[0];
                        attacker.fill_bytes(&mut entry.keys.c_pk);
                        swapped = Some(entry.peer);
                    }
                }
            }
        }
    };
    let out = round.run(&mut tamper);
    let peer = fed.names[swapped.unwrap() as usize].clone();
    assert_eq!(
        out.client_errors.get(&0),
        Some(&ClientError::BadSignature {
            peer,
            source: SignatureError::Invalid
        })
    );
    assert!(round.clients[0].is_aborted());
    // The others carry on without node 0.
    let agg = out.result.unwrap();
    assert!(!agg.survivors.contains(&fed.names[0]));
    assert_eq!(agg.sum, round.expected_sum(&agg.survivors));
}

#[test]
fn a_server_with_a_verifier_drops_forged_advertisements() {
    let fed = Federation::new(6);
    let params = GraphParams {
        degree: 5,
        threshold: 3,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let ctx = RoundContext::new(1, fed.names.clone(), params, 32, 4, &mut rng).unwrap();
    let mut server = Server::new(ctx.clone())
        .unwrap()
        .with_verifier(Box::new(fed.verifier.clone()));
    let mut c = fed.clients(ClientConfig {
        vector_len: 4,
        bits: 32,
        threat_model: None,
    });
    let mut keys = c[0].handle_setup(&server.setup(), &mut rng).unwrap();
    keys.keys.s_pk[0] ^= 1;
    assert!(matches!(
        server.handle_message("node-0000", FromNode::Keys(keys.clone())),
        Err(ServerError::BadSignature { .. })
    ));
    // Node 1's genuine keys presented as node 0's: refused too.
    let keys1 = c[1].handle_setup(&server.setup(), &mut rng).unwrap();
    assert!(matches!(
        server.handle_message("node-0000", FromNode::Keys(keys1.clone())),
        Err(ServerError::BadSignature { .. })
    ));
    server
        .handle_message("node-0001", FromNode::Keys(keys1.clone()))
        .unwrap();
    assert!(matches!(
        server.handle_message("node-0001", FromNode::Keys(keys1)),
        Err(ServerError::Duplicate { .. })
    ));
    assert!(matches!(
        server.handle_message("stranger", FromNode::Keys(keys)),
        Err(ServerError::UnknownNode(_))
    ));
}

#[test]
fn a_masked_input_from_another_round_is_rejected_or_useless() {
    let fed = Federation::new(6);
    let params = GraphParams {
        degree: 5,
        threshold: 4,
    };
    // Rounds 1 and 2 with the same nodes and inputs, driven by hand up to the masked
    // inputs; node 2's round-1 masked input is then replayed into round 2.
    let r1 = Round::new(&fed, 1, params, 32, 40, 8);
    let inputs = r1.inputs.clone();
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let ctx1 = r1.ctx.clone();
    let ctx2 = RoundContext::new(2, fed.names.clone(), params, 32, 40, &mut rng).unwrap();
    let config = ClientConfig {
        vector_len: 40,
        bits: 32,
        threat_model: None,
    };

    let run_to_masked =
        |ctx: &RoundContext, seed: u64| -> (Server, Vec<TestClient>, Vec<MaskedInput>) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut clients = fed.clients(config);
            let mut server = Server::new(ctx.clone()).unwrap();
            let setup = server.setup();
            for c in clients.iter_mut() {
                let a = c.handle_setup(&setup, &mut rng).unwrap();
                server.handle_message(c.id(), FromNode::Keys(a)).unwrap();
            }
            let Transition::Send(msgs) = server.close_stage().unwrap() else {
                panic!()
            };
            for (to, m) in msgs {
                let ToNode::NeighbourKeys(m) = m else {
                    panic!()
                };
                let i = ctx.index_of(&to).unwrap() as usize;
                let a = clients[i].handle_neighbour_keys(&m, &mut rng).unwrap();
                server.handle_message(&to, FromNode::Shares(a)).unwrap();
            }
            let Transition::Send(msgs) = server.close_stage().unwrap() else {
                panic!()
            };
            let mut masked = Vec::new();
            for (to, m) in msgs {
                let ToNode::Shares(m) = m else { panic!() };
                let i = ctx.index_of(&to).unwrap() as usize;
                masked.push(clients[i].handle_shares(&m, &inputs[i]).unwrap());
            }
            (server, clients, masked)
        };
    let (_, _, masked1) = run_to_masked(&ctx1, 20);
    let (mut server2, mut clients2, masked2) = run_to_masked(&ctx2, 21);

    // The replay as is: refused by its round number.
    assert_eq!(
        server2.handle_message("node-0002", FromNode::MaskedInput(masked1[2].clone())),
        Err(ServerError::WrongRound {
            expected: 2,
            got: 1
        })
    );
    // With the round number rewritten it is accepted as bytes but unmasks to garbage: the
    // masks are bound to the round.
    let mut forged = masked1[2].clone();
    forged.round = 2;
    assert_ne!(forged.data, masked2[2].data);
    for (i, m) in masked2.into_iter().enumerate() {
        let m = if i == 2 { forged.clone() } else { m };
        server2
            .handle_message(&fed.names[i], FromNode::MaskedInput(m))
            .unwrap();
    }
    let Transition::Send(msgs) = server2.close_stage().unwrap() else {
        panic!()
    };
    let mut sigs = Vec::new();
    for (to, m) in msgs {
        let ToNode::Survivors(m) = m else { panic!() };
        let i = ctx2.index_of(&to).unwrap() as usize;
        sigs.push((to, clients2[i].handle_survivors(&m).unwrap()));
    }
    for (to, s) in sigs {
        server2.handle_message(&to, FromNode::Signature(s)).unwrap();
    }
    let Transition::Send(msgs) = server2.close_stage().unwrap() else {
        panic!()
    };
    for (to, m) in msgs {
        let ToNode::Unmask(m) = m else { panic!() };
        let i = ctx2.index_of(&to).unwrap() as usize;
        let a = clients2[i].handle_unmask(&m).unwrap();
        server2.handle_message(&to, FromNode::Unmask(a)).unwrap();
    }
    let Transition::Done(agg) = server2.close_stage().unwrap() else {
        panic!()
    };
    let mut truth = vec![0u64; 40];
    for x in &inputs {
        for (a, v) in truth.iter_mut().zip(x) {
            *a = a.wrapping_add(*v) & 0xffff_ffff;
        }
    }
    assert_ne!(agg.sum, truth);

    // A node refuses a setup for a round it has already taken part in.
    let mut c = fed.clients(config).remove(0);
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    c.handle_setup(
        &RoundSetup {
            context: ctx2.clone(),
        },
        &mut rng,
    )
    .unwrap();
    assert_eq!(
        c.handle_setup(&RoundSetup { context: ctx1 }, &mut rng),
        Err(ClientError::StaleRound { last: 2, got: 1 })
    );
    assert_eq!(
        c.handle_setup(&RoundSetup { context: ctx2 }, &mut rng),
        Err(ClientError::StaleRound { last: 2, got: 2 })
    );
}

#[test]
fn an_inconsistent_survivor_set_makes_honest_nodes_abort() {
    let n = 10;
    let fed = Federation::new(n);
    // t > k/2: two disjoint groups cannot both gather t agreeing neighbours.
    let params = GraphParams {
        degree: 9,
        threshold: 6,
    };
    let mut round = Round::new(&fed, 1, params, 32, 10, 11);
    // The server tells nodes 5..9 that node 9 dropped (to get its mask key from them) and
    // nodes 0..4 that everyone survived (to get node 9's self-mask seed from them).
    let mut tamper = |stage: Stage, msgs: &mut Vec<(NodeId, ToNode)>| {
        if stage == Stage::Consistency {
            for (to, m) in msgs.iter_mut() {
                let i: usize = to[5..].parse().unwrap();
                if let ToNode::Survivors(s) = m {
                    if (5..9).contains(&i) {
                        s.survivors.retain(|&v| v != 9);
                    }
                }
            }
        }
        if stage == Stage::Unmasking {
            // Ask each group for the share kind its story justifies.
            for (to, m) in msgs.iter_mut() {
                let i: usize = to[5..].parse().unwrap();
                if let ToNode::Unmask(r) = m {
                    if (5..9).contains(&i) {
                        r.self_mask.retain(|&v| v != 9);
                        r.mask_key.push(9);
                    }
                }
            }
        }
    };
    let out = round.run(&mut tamper);
    for i in 0..n {
        assert!(
            matches!(
                out.client_errors.get(&i),
                Some(ClientError::TooFewSignatures { .. })
            ),
            "node {i}: {:?}",
            out.client_errors.get(&i)
        );
    }
    // No share of node 9's secrets was revealed.
    let (b, s) = out.server.shares_held("node-0009").unwrap();
    assert!(b.is_empty() && s.is_empty());
    assert!(out.result.is_err());
}

#[test]
fn a_masked_input_looks_uniform() {
    // The input is all zeros (maximally non-uniform); its masked version must pass a
    // chi-square test over 16 buckets of its top bits.
    let n = 5;
    let fed = Federation::new(n);
    let params = GraphParams {
        degree: 4,
        threshold: 3,
    };
    let len = 100_000u32;
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let ctx = RoundContext::new(1, fed.names.clone(), params, 32, len, &mut rng).unwrap();
    let config = ClientConfig {
        vector_len: len,
        bits: 32,
        threat_model: None,
    };
    let mut clients = fed.clients(config);
    let mut server = Server::new(ctx.clone()).unwrap();
    let setup = server.setup();
    for c in clients.iter_mut() {
        let a = c.handle_setup(&setup, &mut rng).unwrap();
        server.handle_message(c.id(), FromNode::Keys(a)).unwrap();
    }
    let Transition::Send(msgs) = server.close_stage().unwrap() else {
        panic!()
    };
    for (to, m) in msgs {
        let ToNode::NeighbourKeys(m) = m else {
            panic!()
        };
        let i = ctx.index_of(&to).unwrap() as usize;
        let a = clients[i].handle_neighbour_keys(&m, &mut rng).unwrap();
        server.handle_message(&to, FromNode::Shares(a)).unwrap();
    }
    let Transition::Send(msgs) = server.close_stage().unwrap() else {
        panic!()
    };
    let (to, ToNode::Shares(m)) = &msgs[0] else {
        panic!()
    };
    let i = ctx.index_of(to).unwrap() as usize;
    let zeros = vec![0u64; len as usize];
    let y = clients[i].handle_shares(m, &zeros).unwrap();
    let mut buckets = [0f64; 16];
    for w in y.data.chunks_exact(4) {
        let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        buckets[(v >> 28) as usize] += 1.0;
    }
    let expected = f64::from(len) / 16.0;
    let chi2: f64 = buckets
        .iter()
        .map(|c| (c - expected).powi(2) / expected)
        .sum();
    // 15 degrees of freedom: P[chi2 > 37.70] = 0.001.
    assert!(chi2 < 37.70, "chi2 = {chi2}, buckets {buckets:?}");
    let mut low = [0f64; 16];
    for w in y.data.chunks_exact(4) {
        low[usize::from(w[0] & 0xf)] += 1.0;
    }
    let chi2: f64 = low.iter().map(|c| (c - expected).powi(2) / expected).sum();
    assert!(chi2 < 37.70, "low bits chi2 = {chi2}");
}

#[test]
fn nodes_with_a_threat_model_refuse_weak_parameters() {
    let fed = Federation::new(100);
    let threat = ThreatModel {
        adversarial_rate: 0.05,
        dropout_rate: 0.05,
        adversary: AdversaryClass::CuriousServer,
    };
    let config = ClientConfig {
        vector_len: 4,
        bits: 32,
        threat_model: Some(threat),
    };
    let mut c = fed.clients(config).remove(0);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let weak = GraphParams {
        degree: 12,
        threshold: 3,
    };
    let ctx = RoundContext::new(1, fed.names.clone(), weak, 32, 4, &mut rng).unwrap();
    assert!(matches!(
        c.handle_setup(&RoundSetup { context: ctx }, &mut rng),
        Err(ClientError::InsecureParameters { .. })
    ));
    let ctx = RoundContext::new(2, fed.names.clone(), finder(100), 32, 4, &mut rng).unwrap();
    c.handle_setup(&RoundSetup { context: ctx }, &mut rng)
        .unwrap();
    // A context for another vector length or ring width is refused too.
    let ctx = RoundContext::new(3, fed.names.clone(), finder(100), 31, 4, &mut rng).unwrap();
    assert!(matches!(
        c.handle_setup(&RoundSetup { context: ctx }, &mut rng),
        Err(ClientError::Mismatch { .. })
    ));
}

#[test]
fn malformed_messages_are_refused_without_changing_state() {
    let fed = Federation::new(5);
    let params = GraphParams {
        degree: 4,
        threshold: 3,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let ctx = RoundContext::new(1, fed.names.clone(), params, 20, 6, &mut rng).unwrap();
    let config = ClientConfig {
        vector_len: 6,
        bits: 20,
        threat_model: None,
    };
    let mut clients = fed.clients(config);
    let mut server = Server::new(ctx.clone()).unwrap();
    let setup = server.setup();
    // A message for a later stage is refused by both sides.
    assert!(matches!(
        clients[0].handle_survivors(&SurvivorSet {
            round: 1,
            survivors: vec![]
        }),
        Err(ClientError::Aborted)
    ));
    assert_eq!(server.pending().len(), 5);
    assert!(!server.is_stage_complete());
    for c in clients.iter_mut() {
        let a = c.handle_setup(&setup, &mut rng).unwrap();
        server.handle_message(c.id(), FromNode::Keys(a)).unwrap();
    }
    assert!(server.pending().is_empty() && server.is_stage_complete());
    assert!(matches!(
        server.handle_message(
            "node-0000",
            FromNode::MaskedInput(MaskedInput {
                round: 1,
                data: vec![]
            })
        ),
        Err(ServerError::WrongStage { .. })
    ));
    assert!(matches!(
        clients[0].handle_survivors(&SurvivorSet {
            round: 1,
            survivors: vec![]
        }),
        Err(ClientError::WrongStage { .. })
    ));
    let Transition::Send(msgs) = server.close_stage().unwrap() else {
        panic!()
    };
    let mut shares = Vec::new();
    for (to, m) in msgs {
        let ToNode::NeighbourKeys(m) = m else {
            panic!()
        };
        let i = ctx.index_of(&to).unwrap() as usize;
        // A duplicated entry is refused (and aborts that node): try it on a clone first.
        let a = clients[i].handle_neighbour_keys(&m, &mut rng).unwrap();
        shares.push((to, a));
    }
    // Missing one receiver, a short ciphertext: refused; the genuine one then accepted.
    let (to0, s0) = &shares[0];
    let mut missing = s0.clone();
    missing.shares.pop();
    assert!(matches!(
        server.handle_message(to0, FromNode::Shares(missing)),
        Err(ServerError::Malformed { .. })
    ));
    let mut short = s0.clone();
    short.shares[0].data.pop();
    assert!(matches!(
        server.handle_message(to0, FromNode::Shares(short)),
        Err(ServerError::Malformed { .. })
    ));
    for (to, s) in shares {
        server.handle_message(&to, FromNode::Shares(s)).unwrap();
    }
    let Transition::Send(msgs) = server.close_stage().unwrap() else {
        panic!()
    };
    let input = vec![(1u64 << 20) - 1; 6];
    for (to, m) in msgs {
        let ToNode::Shares(m) = m else { panic!() };
        let i = ctx.index_of(&to).unwrap() as usize;
        // Caller errors do not abort the node.
        assert!(matches!(
            clients[i].handle_shares(&m, &input[..5]),
            Err(ClientError::InputLength { .. })
        ));
        assert!(matches!(
            clients[i].handle_shares(&m, &[1 << 20; 6]),
            Err(ClientError::InputOutOfRange { .. })
        ));
        // A tampered ciphertext aborts it.
        if i == 0 {
            let mut bad = m.clone();
            bad.shares[0].data[3] ^= 1;
            assert!(matches!(
                clients[i].handle_shares(&bad, &input),
                Err(ClientError::Decryption { .. })
            ));
            assert!(clients[i].is_aborted());
            continue;
        }
        let y = clients[i].handle_shares(&m, &input).unwrap();
        // 20-bit ring: 3 bytes per coordinate; a value with bit 20 set is refused.
        assert_eq!(y.data.len(), 18);
        let mut over = y.clone();
        over.data[2] |= 0x10;
        assert!(matches!(
            server.handle_message(&to, FromNode::MaskedInput(over)),
            Err(ServerError::Malformed { .. })
        ));
        server
            .handle_message(&to, FromNode::MaskedInput(y))
            .unwrap();
    }
    // Node 0 never answered: the others still produce the right sum.
    let Transition::Send(msgs) = server.close_stage().unwrap() else {
        panic!()
    };
    let mut sigs = Vec::new();
    for (to, m) in msgs {
        let ToNode::Survivors(m) = m else { panic!() };
        let i = ctx.index_of(&to).unwrap() as usize;
        sigs.push((to, clients[i].handle_survivors(&m).unwrap()));
    }
    for (to, s) in sigs {
        server.handle_message(&to, FromNode::Signature(s)).unwrap();
    }
    let Transition::Send(msgs) = server.close_stage().unwrap() else {
        panic!()
    };
    for (to, m) in msgs {
        let ToNode::Unmask(m) = m else { panic!() };
        let i = ctx.index_of(&to).unwrap() as usize;
        let a = clients[i].handle_unmask(&m).unwrap();
        let mut wrong = a.clone();
        wrong.self_mask.reverse();
        wrong.self_mask.push(wrong.self_mask[0].clone());
        assert!(matches!(
            server.handle_message(&to, FromNode::Unmask(wrong)),
            Err(ServerError::Malformed { .. })
        ));
        server.handle_message(&to, FromNode::Unmask(a)).unwrap();
    }
    let Transition::Done(agg) = server.close_stage().unwrap() else {
        panic!()
    };
    assert_eq!(agg.survivors.len(), 4);
    assert!(agg
        .sum
        .iter()
        .all(|&v| v == (4 * ((1u64 << 20) - 1)) & ((1 << 20) - 1)));
    assert_eq!(server.close_stage().unwrap_err(), ServerError::Finished);
}

#[test]
fn state_machines_can_move_between_threads() {
    fn send<T: Send>() {}
    send::<Server>();
    send::<Client<EcdsaP256Signer, EcdsaP256Verifier>>();
    send::<Client<EcdsaP256Signer, Arc<EcdsaP256Verifier>>>();
}
