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
    rng: rand_chacha::ChaCha20Rng,
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
                let (spec, update) = self
                    .held
                    .get(node)
                    .ok_or_else(|| format!("{node} holds no update"))?;
                let x = match &spec.distributed {
                    // The deployment's distributed-DP encoder (seeded noise shares here).
                    Some(dr) => dpfl_common::dp::encoding::DistributedEncoder::new(
                        dr.params,
                        dr.rotation_seed,
                    )
                    .and_then(|enc| enc.encode(update, &mut self.rng))
                    .map_err(|e| e.to_string())?,
                    None => Encoding::FixedPoint {
                        clip: spec.clip_norm,
                        bits: spec.bits,
                    }
                    .encoder(self.participants)
                    .and_then(|enc| enc.encode(update, &mut self.rng))
                    .map_err(|e| e.to_string())?,
                };
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

    /// SHA-256 (as the coordinator's report) of the plaintext sum mod 2^`bits` of the
    /// inputs `survivors` encoded; `None` if one of them encoded nothing.
    pub(crate) fn plaintext_digest(&self, survivors: &[String], bits: u8) -> Option<[u8; 32]> {
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let mut sum: Vec<u64> = Vec::new();
        for s in survivors {
            let x = self.encoded.get(s)?;
            if sum.is_empty() {
                sum = vec![0; x.len()];
            }
            for (a, b) in sum.iter_mut().zip(x) {
                *a = a.wrapping_add(*b) & mask;
            }
        }
        Some(dpfl_server::coordinator::sum_digest(&sum))
    }
}
