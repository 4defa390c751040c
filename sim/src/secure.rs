//! Secure aggregation in the in-memory simulator: every simulated node runs the
//! deployment's protocol client (`dpfl_secagg::Client`, ECDSA P-256 keys made here, a
//! seeded RNG for keys, masks and stochastic rounding), so a simulation exercises the same
//! stages, graph and unmasking as a federation over QUIC, at thousands of participants.
//!
//! It also keeps each node's encoded input, so that every round's unmasked sum can be
//! checked against the plaintext sum of the survivors' inputs, exactly (mod 2^b).

use dpfl_common::wire::SecAggSpec;
use dpfl_secagg::messages::{FromNode, ToNode};
use dpfl_secagg::{Client, ClientConfig, EcdsaP256Signer, EcdsaP256Verifier, Encoding};
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::Arc;

type SimClient = Client<EcdsaP256Signer, Arc<EcdsaP256Verifier>>;

/// The protocol side of every simulated node.
pub(crate) struct SimSecAgg {
    clients: HashMap<String, SimClient>,
    held: HashMap<String, (SecAggSpec, Vec<f32>)>,
    encoded: HashMap<String, Vec<u64>>,
    participants: u32,
    /// Protocol keys and masks (deterministic per run).
    rng: rand_chacha::ChaCha20Rng,
    /// Encoding randomness: per (protocol round, node) streams of this seed.
    seed: u64,
    index: HashMap<String, u64>,
}

impl SimSecAgg {
    /// Keys for `names`, inputs of `vector_len` values mod 2^`bits`.
    pub(crate) fn new(
        names: &[String],
        vector_len: u32,
        bits: u8,
        seed: u64,
    ) -> Result<Self, String> {
        let mut verifier = EcdsaP256Verifier::new();
        let mut signers = Vec::with_capacity(names.len());
        for n in names {
            let (s, _) = EcdsaP256Signer::generate().map_err(|e| e.to_string())?;
            verifier
                .insert_public_key(n, s.public_key())
                .map_err(|e| e.to_string())?;
            signers.push(s);
        }
        let verifier = Arc::new(verifier);
        let config = ClientConfig {
            vector_len,
            bits,
            threat_model: None,
        };
        let clients = names
            .iter()
            .zip(signers)
            .map(|(n, s)| {
                (
                    n.clone(),
                    Client::new(n.clone(), config, s, verifier.clone()),
                )
            })
            .collect();
        Ok(Self {
            clients,
            held: HashMap::new(),
            encoded: HashMap::new(),
            participants: 0,
            rng: rand_chacha::ChaCha20Rng::seed_from_u64(seed),
            seed: dpfl_ml::partition::derive_seed(seed, 0xE2C0),
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i as u64))
                .collect(),
        })
    }

    /// A node trained: it keeps its update (clipped to the round's C).
    pub(crate) fn hold(&mut self, node: &str, spec: SecAggSpec, mut update: Vec<f32>) {
        dpfl_common::dp::clip_in_place(&mut update, spec.clip_norm * (1.0 - 1e-5));
        self.held.insert(node.to_string(), (spec, update));
        self.encoded.remove(node);
    }

    /// A node's answer to a stage message.
    pub(crate) fn answer(&mut self, node: &str, msg: &ToNode) -> Result<FromNode, String> {
        let input = match msg {
            ToNode::Shares(m) => Some(self.encode(node, m.round, self.participants)?),
            _ => None,
        };
        let client = self
            .clients
            .get_mut(node)
            .ok_or_else(|| format!("{node} has no protocol client"))?;
        let e = |e: dpfl_secagg::ClientError| e.to_string();
        match msg {
            ToNode::Setup(s) => {
                self.participants = s.context.len();
                client
                    .handle_setup(s, &mut self.rng)
                    .map(FromNode::Keys)
                    .map_err(e)
            }
            ToNode::NeighbourKeys(m) => client
                .handle_neighbour_keys(m, &mut self.rng)
                .map(FromNode::Shares)
                .map_err(e),
            ToNode::Shares(m) => {
                let x = input.ok_or_else(|| format!("{node} encoded nothing"))?;
                let out = client.handle_shares(m, &x).map_err(e)?;
                self.encoded.insert(node.to_string(), x);
                Ok(FromNode::MaskedInput(out))
            }
            ToNode::Survivors(m) => client
                .handle_survivors(m)
                .map(FromNode::Signature)
                .map_err(e),
            ToNode::Unmask(m) => client.handle_unmask(m).map(FromNode::Unmask).map_err(e),
        }
    }

    /// `node`'s encoded input for protocol round `protocol_round` of `participants`: the
    /// deployment's encoder (distributed DP's, or fixed point), with stochastic rounding
    /// and noise from a ChaCha20 stream seeded by (run seed, protocol round, node), so the
    /// input is the same whether the protocol runs or the sum is taken directly.
    pub(crate) fn encode(
        &self,
        node: &str,
        protocol_round: u64,
        participants: u32,
    ) -> Result<Vec<u64>, String> {
        let (spec, update) = self
            .held
            .get(node)
            .ok_or_else(|| format!("{node} holds no update"))?;
        let index = self
            .index
            .get(node)
            .ok_or_else(|| format!("{node} is not a simulated node"))?;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(self.seed);
        rng.set_stream(protocol_round.rotate_left(32) ^ *index);
        match &spec.distributed {
            // The deployment's distributed-DP encoder (seeded noise shares here).
            Some(dr) => {
                dpfl_common::dp::encoding::DistributedEncoder::new(dr.params, dr.rotation_seed)
                    .and_then(|enc| enc.encode(update, &mut rng))
                    .map_err(|e| e.to_string())
            }
            None => Encoding::FixedPoint {
                clip: spec.clip_norm,
                bits: spec.bits,
            }
            .encoder(participants)
            .and_then(|enc| enc.encode(update, &mut rng))
            .map_err(|e| e.to_string()),
        }
    }

    /// `secure_sum = "sum"`: the sum mod 2^`bits` of the encoded inputs of `nodes` (protocol
    /// round `protocol_round`), encoded on `threads` threads; what the protocol would
    /// unmask with no dropout.
    pub(crate) fn direct_sum(
        &self,
        nodes: &[String],
        protocol_round: u64,
        bits: u8,
        threads: usize,
    ) -> Result<Vec<u64>, String> {
        let mask = ring_mask(bits);
        let participants = u32::try_from(nodes.len()).map_err(|e| e.to_string())?;
        let fold = |chunk: &[String]| -> Result<Vec<u64>, String> {
            let mut sum: Vec<u64> = Vec::new();
            for n in chunk {
                let x = self.encode(n, protocol_round, participants)?;
                if sum.is_empty() {
                    sum = vec![0; x.len()];
                }
                if x.len() != sum.len() {
                    return Err(format!("{n} encoded {} values, not {}", x.len(), sum.len()));
                }
                add_mod(&mut sum, &x, mask);
            }
            Ok(sum)
        };
        let partials: Vec<Result<Vec<u64>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .chunks(nodes.len().div_ceil(threads.max(1)).max(1))
                .map(|chunk| s.spawn(move || fold(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("an encoding thread failed".into()))
                })
                .collect()
        });
        let mut sum: Vec<u64> = Vec::new();
        for p in partials {
            let p = p?;
            if sum.is_empty() {
                sum = p;
                continue;
            }
            if p.len() != sum.len() {
                return Err("encoded inputs of different lengths".into());
            }
            add_mod(&mut sum, &p, mask);
        }
        Ok(sum)
    }

    /// SHA-256 (as the coordinator's report) of the plaintext sum mod 2^`bits` of the
    /// inputs `survivors` encoded; `None` if one of them encoded nothing.
    pub(crate) fn plaintext_digest(&self, survivors: &[String], bits: u8) -> Option<[u8; 32]> {
        let mask = ring_mask(bits);
        let mut sum: Vec<u64> = Vec::new();
        for s in survivors {
            let x = self.encoded.get(s)?;
            if sum.is_empty() {
                sum = vec![0; x.len()];
            }
            add_mod(&mut sum, x, mask);
        }
        Some(dpfl_server::coordinator::sum_digest(&sum))
    }
}

/// `sum += x` coordinate-wise, mod 2^b (`mask` = 2^b - 1).
fn add_mod(sum: &mut [u64], x: &[u64], mask: u64) {
    for (a, b) in sum.iter_mut().zip(x) {
        *a = a.wrapping_add(*b) & mask;
    }
}

/// 2^b - 1: the ring Z/2^b's values as a bit mask.
fn ring_mask(bits: u8) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}
