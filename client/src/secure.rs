//! The node's side of secure aggregation: it keeps its clipped update after training and
//! answers the five stages with `dpfl-secagg`'s [`Client`], signing with its certificate
//! key and checking its neighbours' keys against the certificates the server forwards,
//! each chain-checked against the federation CA first.
//!
//! The update leaves the node only inside a masked input, encoded by the fixed-point
//! encoder (stochastic rounding from the OS CSPRNG) or, in DP mode `distributed`, by
//! [`DistributedEncoder`] (public rotation seed, conditional rounding, this node's
//! integer noise share from the OS CSPRNG), after the node checked the protocol's
//! threshold and size against the contributor bounds the noise is accounted with.
//!
//! Before round 1 (`[standardize]` with secure aggregation) the node holds its feature
//! statistics instead (f64, round [`dpfl_common::wire::STATS_ROUND`]) and puts them into
//! their own SecAgg+ instance, fixed point over the request's range or, in DP mode
//! `distributed`, encoded like a training update by [`DistributedEncoder`] at the
//! statistics' own public parameters (clip `sqrt(3d + 1)`, this node's integer noise share
//! included), with the same threshold and size checks at setup. Protocol round ids
//! must increase across every instance this node takes part in, statistics and training
//! alike (checked here, whatever client state a change of vector length replaces).

use dpfl_certs::{Credentials, PeerCertificates};
use dpfl_common::dp::encoding::DistributedEncoder;
use dpfl_common::wire::{SecAggSpec, StatsSecAgg};
use dpfl_secagg::messages::{FromNode, ToNode};
use dpfl_secagg::params::ThreatModel;
use dpfl_secagg::sign::SignatureError;
use dpfl_secagg::{
    Client, ClientConfig, EcdsaP256Signer, EcdsaP256Verifier, Encoding, StageRequest, Verifier,
};
use rand::rngs::OsRng;
use rand::SeedableRng;
use std::sync::{Arc, Mutex};

/// The neighbours' keys of the current round, filled from verified certificates.
#[derive(Clone, Default)]
struct SharedVerifier(Arc<Mutex<EcdsaP256Verifier>>);

impl Verifier for SharedVerifier {
    fn verify(&self, node: &str, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let table = self
            .0
            .lock()
            .map_err(|_| SignatureError::UnknownSigner(node.to_string()))?;
        table.verify(node, message, signature)
    }
}

/// What a node keeps for the stages of one instance.
enum Input {
    /// A training round's clipped update.
    Update { spec: SecAggSpec, update: Vec<f32> },
    /// The feature statistics, `count | sum | sum_sq | label_counts` (`len` values; the
    /// values are wiped once they left, masked).
    Stats {
        spec: StatsSecAgg,
        values: Vec<f64>,
        len: u32,
    },
}

/// An input kept for the secure-aggregation stages of one round (training round, or
/// [`dpfl_common::wire::STATS_ROUND`] for the statistics).
struct Held {
    round: u64,
    input: Input,
}

/// A node's secure-aggregation state (kept across reconnections: protocol round ids it
/// has seen are never accepted again).
pub struct SecureNode {
    name: String,
    signer_der: Vec<u8>,
    peers: PeerCertificates,
    verifier: SharedVerifier,
    client: Option<(ClientConfig, Client<EcdsaP256Signer, SharedVerifier>)>,
    held: Option<Held>,
    /// Participants of the protocol round in progress (the encoder's headroom).
    participants: u32,
    /// The last protocol round id this node set up (ids only increase).
    last_round: Option<u64>,
    /// Whether this node revealed unmasking shares in a statistics instance.
    stats_revealed: bool,
    /// The collusion this node assumes (it checks every announced graph against it).
    threat: ThreatModel,
}

impl std::fmt::Debug for SecureNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureNode")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SecureNode {
    /// Loads the node's certificate key (PKCS#8, P-256) and the federation CA.
    /// `threat`: the collusion and dropouts this node assumes; rounds whose (n, k, t) are
    /// not secure under it are refused, whatever the server chose.
    pub fn new(name: &str, credentials: &Credentials, threat: ThreatModel) -> Result<Self, String> {
        let (g, d) = (threat.adversarial_rate, threat.dropout_rate);
        let rate = |r: f64| r.is_finite() && (0.0..1.0).contains(&r);
        if !(rate(g) && rate(d) && g + d <= 0.9) {
            return Err(format!(
                "secure-aggregation threat: adversarial and dropout rates must be in [0, 1) \
                 with a sum of at most 0.9, got {g} and {d}"
            ));
        }
        let key = dpfl_certs::load_key(&credentials.key).map_err(|e| e.to_string())?;
        let signer_der = match key {
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => {
                return Err(format!(
                    "{}: secure aggregation needs a PKCS#8 P-256 key",
                    credentials.key.display()
                ))
            }
        };
        // Check now that the key can sign, not in the middle of a round.
        EcdsaP256Signer::from_pkcs8(&signer_der).map_err(|e| e.to_string())?;
        let peers = PeerCertificates::new(&credentials.ca).map_err(|e| e.to_string())?;
        Ok(Self {
            name: name.to_string(),
            signer_der,
            peers,
            verifier: SharedVerifier::default(),
            client: None,
            held: None,
            participants: 0,
            last_round: None,
            stats_revealed: false,
            threat,
        })
    }

    /// Keeps `update` (clipped here to the round's C) for round `round`'s stages,
    /// replacing any earlier one.
    pub fn hold(&mut self, round: u64, spec: SecAggSpec, mut update: Vec<f32>) {
        // Clip a hair inside C so the encoder's norm check holds after f32 rounding.
        dpfl_common::dp::clip_in_place(&mut update, spec.clip_norm * (1.0 - 1e-5));
        self.held = Some(Held {
            round,
            input: Input::Update { spec, update },
        });
    }

    /// Whether statistics fit a request's range (the check [`SecureNode::hold_stats`]
    /// makes; callers run it before recording a release for them).
    pub fn check_stats(spec: StatsSecAgg, values: &[f64]) -> Result<(), String> {
        spec.validate()?;
        if let Some(d) = &spec.distributed {
            if d.params.dim != values.len() {
                return Err(format!(
                    "distributed DP parameters for {} statistics, this node has {}",
                    d.params.dim,
                    values.len()
                ));
            }
        }
        let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
        if !norm.is_finite() || norm > spec.clip_norm {
            return Err(format!(
                "statistics of L2 norm {norm} do not fit the secure sum's range {}",
                spec.clip_norm
            ));
        }
        Ok(())
    }

    /// `Err` once this node revealed unmasking shares in a statistics instance: the
    /// statistics do not change between instances, so a server that unmasked sums over
    /// different sets of nodes could solve for one node's statistics from their
    /// differences. One instance that reached unmasking per node process; kept across
    /// reconnections (a restarted node process starts afresh).
    pub fn may_hold_stats(&self) -> Result<(), String> {
        if self.stats_revealed {
            return Err(
                "this node already revealed shares for one secure sum of its \
                        statistics and takes part in no other (their differences would \
                        give statistics of single nodes)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Keeps the feature statistics `values` for their secure sum (round
    /// [`dpfl_common::wire::STATS_ROUND`]), replacing anything held. `Err` when they do
    /// not fit the request's range (L2 norm above its bound).
    pub fn hold_stats(&mut self, spec: StatsSecAgg, values: Vec<f64>) -> Result<(), String> {
        self.may_hold_stats()?;
        Self::check_stats(spec, &values)?;
        let len = u32::try_from(values.len()).map_err(|_| "too many statistics".to_string())?;
        self.held = Some(Held {
            round: dpfl_common::wire::STATS_ROUND,
            input: Input::Stats { spec, values, len },
        });
        Ok(())
    }

    /// Answers one stage of training round `round`.
    pub fn handle(
        &mut self,
        round: u64,
        vector_len: u32,
        request: StageRequest,
    ) -> Result<FromNode, String> {
        let held = self
            .held
            .as_ref()
            .filter(|h| h.round == round)
            .ok_or_else(|| format!("nothing held for round {round}"))?;
        // Distributed DP encodes the rotated update, padded to a power of two; statistics
        // are their own vector.
        let model_len = vector_len;
        let (vector_len, bits, distributed) = match &held.input {
            Input::Update { spec, .. } => (
                match &spec.distributed {
                    Some(d) => u32::try_from(d.params.padded_dim())
                        .map_err(|_| "distributed DP dimension too large".to_string())?,
                    None => vector_len,
                },
                spec.bits,
                spec.distributed,
            ),
            Input::Stats { spec, len, .. } => match &spec.distributed {
                Some(d) => (
                    u32::try_from(d.params.padded_dim())
                        .map_err(|_| "distributed DP dimension too large".to_string())?,
                    spec.bits,
                    spec.distributed,
                ),
                None => (*len, spec.bits, None),
            },
        };
        let config = ClientConfig {
            vector_len,
            bits,
            threat_model: Some(self.threat),
        };
        if self.client.as_ref().map(|(c, _)| *c) != Some(config) {
            let signer =
                EcdsaP256Signer::from_pkcs8(&self.signer_der).map_err(|e| e.to_string())?;
            let client = Client::new(self.name.clone(), config, signer, self.verifier.clone());
            self.client = Some((config, client));
        }
        let Some((_, client)) = self.client.as_mut() else {
            return Err("secure aggregation client missing".into());
        };
        let e = |e: dpfl_secagg::ClientError| e.to_string();
        match request.message {
            ToNode::Setup(setup) => {
                // The context must bind the encoding this node was asked for: a server that
                // told one node another scale than its peers would find that node's input
                // standing out in the sum.
                let expected = match self.held.as_ref().map(|h| &h.input) {
                    Some(Input::Update { spec, .. }) => spec.encoding_digest(),
                    Some(Input::Stats { spec, .. }) => spec.encoding_digest(),
                    None => return Err("secure-aggregation setup with nothing held".into()),
                };
                if setup.context.encoding != expected {
                    return Err(
                        "the secure-aggregation context binds another encoding (clip norm, \
                         ring width or noise parameters) than this node's request"
                            .into(),
                    );
                }
                // One id sequence across every instance (a new vector length replaces the
                // protocol client, and with it the client's own record of ids).
                let id = setup.context.round;
                if let Some(last) = self.last_round.filter(|last| id <= *last) {
                    return Err(format!(
                        "protocol round {id} is not after {last}, the last this node took \
                         part in"
                    ));
                }
                self.last_round = Some(id);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let mut table = EcdsaP256Verifier::new();
                for c in &request.certificates {
                    match self.peers.verify(&c.der, now) {
                        Ok(name) if name == c.node => {
                            if let Err(err) = table.insert_certificate(&c.node, &c.der) {
                                tracing::warn!(peer = %c.node, "unusable neighbour key: {err}");
                            }
                        }
                        Ok(name) => tracing::warn!(
                            peer = %c.node,
                            "forwarded certificate names {name}; ignored"
                        ),
                        Err(err) => tracing::warn!(
                            peer = %c.node,
                            "forwarded certificate refused: {err}"
                        ),
                    }
                }
                *self
                    .verifier
                    .0
                    .lock()
                    .map_err(|_| "verifier lock poisoned".to_string())? = table;
                self.participants = setup.context.len();
                if let Some(d) = &distributed {
                    // The noise is accounted over `min_contributors` shares: the protocol
                    // must not unmask a sum of fewer, nor sum more than the headroom holds.
                    let ctx = &setup.context;
                    if (ctx.threshold as usize) < d.params.min_contributors {
                        return Err(format!(
                            "secure aggregation threshold {} is below the {} contributors \
                             distributed DP accounts for",
                            ctx.threshold, d.params.min_contributors
                        ));
                    }
                    if ctx.len() as usize > d.params.max_contributors {
                        return Err(format!(
                            "{} participants, above the {} distributed DP's headroom holds",
                            ctx.len(),
                            d.params.max_contributors
                        ));
                    }
                }
                client
                    .handle_setup(&setup, &mut OsRng)
                    .map(FromNode::Keys)
                    .map_err(e)
            }
            ToNode::NeighbourKeys(m) => client
                .handle_neighbour_keys(&m, &mut OsRng)
                .map(FromNode::Shares)
                .map_err(e),
            ToNode::Shares(m) => {
                let held = self.held.as_mut().ok_or("nothing held")?;
                // Stochastic rounding (and, in distributed mode, the integer noise share)
                // needs draws per coordinate: a ChaCha20 stream keyed from the OS CSPRNG
                // once per input (a getrandom call per coordinate cost ~0.1 s per update).
                let mut rng =
                    rand_chacha::ChaCha20Rng::from_rng(OsRng).map_err(|e| e.to_string())?;
                let x = match &mut held.input {
                    Input::Update { spec, update } => {
                        if update.len() != model_len as usize {
                            return Err(format!(
                                "held update has {} values, the model {model_len}",
                                update.len()
                            ));
                        }
                        let x = match &spec.distributed {
                            // Rotation from the round's public seed, conditional rounding
                            // and this node's integer noise share.
                            Some(d) => DistributedEncoder::new(d.params, d.rotation_seed)
                                .and_then(|enc| enc.encode(update, &mut rng))
                                .map_err(|e| e.to_string())?,
                            None => Encoding::FixedPoint {
                                clip: spec.clip_norm,
                                bits: spec.bits,
                            }
                            .encoder(self.participants)
                            .and_then(|enc| enc.encode(update, &mut rng))
                            .map_err(|e| e.to_string())?,
                        };
                        // The update leaves, masked: nothing of it is kept.
                        update.iter_mut().for_each(|v| *v = 0.0);
                        *update = Vec::new();
                        x
                    }
                    Input::Stats { spec, values, .. } => {
                        let x = match &spec.distributed {
                            // Normalised statistics lie in [0, 1]: f32 keeps them to 1e-7,
                            // far below the noise; the encoder clips to C after rotating.
                            Some(d) => {
                                let v: Vec<f32> = values.iter().map(|x| *x as f32).collect();
                                DistributedEncoder::new(d.params, d.rotation_seed)
                                    .and_then(|enc| enc.encode(&v, &mut rng))
                                    .map_err(|e| e.to_string())?
                            }
                            None => dpfl_secagg::FixedPoint::new(
                                spec.clip_norm,
                                spec.bits,
                                self.participants.max(1),
                            )
                            .and_then(|fp| fp.encode_f64(values, &mut rng))
                            .map_err(|e| e.to_string())?,
                        };
                        values.iter_mut().for_each(|v| *v = 0.0);
                        *values = Vec::new();
                        x
                    }
                };
                let out = client.handle_shares(&m, &x).map_err(e)?;
                Ok(FromNode::MaskedInput(out))
            }
            ToNode::Survivors(m) => client
                .handle_survivors(&m)
                .map(FromNode::Signature)
                .map_err(e),
            ToNode::Unmask(m) => {
                if matches!(
                    self.held.as_ref().map(|h| &h.input),
                    Some(Input::Stats { .. })
                ) {
                    if self.stats_revealed {
                        return Err("this node already revealed shares for one secure sum \
                                    of its statistics and reveals none for another"
                            .into());
                    }
                    self.stats_revealed = true;
                }
                client.handle_unmask(&m).map(FromNode::Unmask).map_err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpfl_certs::Layout;
    use dpfl_common::wire::STATS_ROUND;
    use dpfl_secagg::messages::RoundSetup;
    use dpfl_secagg::{GraphParams, RoundContext};

    fn node() -> (tempfile::TempDir, SecureNode) {
        let (dir, s) = node_with(crate::default_secagg_threat());
        (dir, s.unwrap())
    }

    /// node-1 of a three-node dev federation, assuming `threat`.
    fn node_with(threat: ThreatModel) -> (tempfile::TempDir, Result<SecureNode, String>) {
        let dir = tempfile::tempdir().unwrap();
        dpfl_certs::create_dev_federation(dir.path(), &["localhost".into()], "node", 3, false)
            .unwrap();
        let layout = Layout::new(dir.path().to_path_buf());
        let s = SecureNode::new("node-1", &Credentials::node(&layout, "node-1"), threat);
        (dir, s)
    }

    fn setup(round: u64, bits: u8, vector_len: u32, encoding: [u8; 32]) -> StageRequest {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(round);
        let names = ["node-1", "node-2", "node-3"].map(String::from).to_vec();
        let params = GraphParams {
            degree: 2,
            threshold: 2,
        };
        let context = RoundContext::new(round, names, params, bits, vector_len, &mut rng)
            .unwrap()
            .with_encoding(encoding);
        StageRequest {
            message: ToNode::Setup(RoundSetup { context }),
            certificates: Vec::new(),
        }
    }

    /// Statistics that do not fit the request's range are refused before anything is
    /// kept; held statistics take part with their own vector length; protocol round ids
    /// only increase, also when a training round's update replaces the statistics (and
    /// with them the protocol client).
    #[test]
    fn held_statistics_fit_their_range_and_ids_only_increase_across_instances() {
        let (_dir, mut s) = node();
        let spec = StatsSecAgg {
            clip_norm: 2.0,
            bits: 62,
            distributed: None,
        };
        let e = s.hold_stats(spec, vec![1.5, 1.5, 0.0]).unwrap_err();
        assert!(e.contains("do not fit"), "{e}");
        let narrow = StatsSecAgg { bits: 8, ..spec };
        assert!(s.hold_stats(narrow, vec![1.0, 0.0, 0.0]).is_err());
        let stats = spec.encoding_digest();
        assert!(
            s.handle(STATS_ROUND, 100, setup(10, 62, 3, stats)).is_err(),
            "nothing held"
        );
        s.hold_stats(spec, vec![1.0, 1.0, 0.5]).unwrap();
        // The model has 100 parameters; the statistics' instance has 3 values.
        assert!(matches!(
            s.handle(STATS_ROUND, 100, setup(11, 62, 3, stats)),
            Ok(FromNode::Keys(_))
        ));
        let e = s
            .handle(STATS_ROUND, 100, setup(11, 62, 3, stats))
            .unwrap_err();
        assert!(e.contains("not after 11"), "{e}");
        // A training round's update: another vector length and ring, a new protocol
        // client, the same id rule.
        let train = SecAggSpec {
            clip_norm: 1.0,
            bits: 32,
            distributed: None,
        };
        s.hold(1, train, vec![0.1; 4]);
        let d = train.encoding_digest();
        let e = s.handle(1, 4, setup(9, 32, 4, d)).unwrap_err();
        assert!(e.contains("not after 11"), "{e}");
        assert!(matches!(
            s.handle(1, 4, setup(12, 32, 4, d)),
            Ok(FromNode::Keys(_))
        ));
    }

    /// A server that ran a second statistics instance over another set of nodes could
    /// subtract two unmasked sums: once this node revealed shares in one statistics
    /// instance it holds no statistics again and reveals nothing for another, while
    /// training rounds go on.
    #[test]
    fn statistics_are_revealed_for_one_instance_only() {
        let (_dir, mut s) = node();
        let spec = StatsSecAgg {
            clip_norm: 2.0,
            bits: 62,
            distributed: None,
        };
        s.hold_stats(spec, vec![1.0, 0.5, 0.5]).unwrap();
        assert!(s.may_hold_stats().is_ok());
        // As after the unmasking stage of an instance (driving all five stages needs
        // two more protocol clients; `stats_revealed` is what that stage sets).
        s.stats_revealed = true;
        let e = s.hold_stats(spec, vec![1.0, 0.5, 0.5]).unwrap_err();
        assert!(e.contains("takes part in no other"), "{e}");
        assert!(s.may_hold_stats().is_err());
        // Training is not affected.
        let train = SecAggSpec {
            clip_norm: 1.0,
            bits: 32,
            distributed: None,
        };
        s.hold(1, train, vec![0.1; 4]);
        assert!(matches!(
            s.handle(1, 4, setup(30, 32, 4, train.encoding_digest())),
            Ok(FromNode::Keys(_))
        ));
    }

    /// A server that announces a threshold too small for the collusion the node assumes
    /// (here 30 %: 2 of 7 participants, so a threshold of 2 would let the server and two
    /// colluders rebuild a victim's mask seeds) is refused before the node advertises a
    /// key; a threshold of 3 is taken. An impossible threat is refused at start.
    #[test]
    fn a_graph_too_weak_for_the_nodes_own_threat_model_is_refused() {
        let mut bad = crate::default_secagg_threat();
        bad.adversarial_rate = 0.95;
        assert!(node_with(bad).1.is_err());
        let mut threat = crate::default_secagg_threat();
        threat.adversarial_rate = 0.3;
        let (_dir, s) = node_with(threat);
        let mut s = s.unwrap();
        let spec = SecAggSpec {
            clip_norm: 1.0,
            bits: 32,
            distributed: None,
        };
        s.hold(1, spec, vec![0.1; 4]);
        let names: Vec<String> = (1..=7).map(|i| format!("node-{i}")).collect();
        let ctx = |round: u64, threshold: u32| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(round);
            let params = GraphParams {
                degree: 6,
                threshold,
            };
            let context = RoundContext::new(round, names.clone(), params, 32, 4, &mut rng)
                .unwrap()
                .with_encoding(spec.encoding_digest());
            StageRequest {
                message: ToNode::Setup(RoundSetup { context }),
                certificates: Vec::new(),
            }
        };
        let e = s.handle(1, 4, ctx(40, 2)).unwrap_err();
        assert!(e.contains("do not protect 7 participants"), "{e}");
        assert!(matches!(s.handle(1, 4, ctx(41, 3)), Ok(FromNode::Keys(_))));
    }

    /// The attack the binding exists for: a server tells this node a clip norm 2^40 times
    /// smaller than its peers' (its encoding then dominates the sum, which gives its input
    /// to ~40 bits) and announces a context bound to the peers' encoding. The node
    /// refuses before it advertises a key; the context of its own encoding is accepted.
    #[test]
    fn a_context_bound_to_another_encoding_than_the_nodes_request_is_refused() {
        let (_dir, mut s) = node();
        let mine = SecAggSpec {
            clip_norm: 1.0,
            bits: 40,
            distributed: None,
        };
        let peers = SecAggSpec {
            clip_norm: (2f64).powi(40),
            ..mine
        };
        s.hold(3, mine, vec![0.1; 4]);
        let e = s
            .handle(3, 4, setup(20, 40, 4, peers.encoding_digest()))
            .unwrap_err();
        assert!(e.contains("another encoding"), "{e}");
        // Unbound (the zero digest) is refused as well.
        assert!(s.handle(3, 4, setup(21, 40, 4, [0; 32])).is_err());
        assert!(matches!(
            s.handle(3, 4, setup(22, 40, 4, mine.encoding_digest())),
            Ok(FromNode::Keys(_))
        ));
        // Statistics: the same rule with the statistics' own digest.
        let stats = StatsSecAgg {
            clip_norm: 2.0,
            bits: 62,
            distributed: None,
        };
        s.hold_stats(stats, vec![1.0, 0.5, 0.5]).unwrap();
        let wide = StatsSecAgg {
            clip_norm: 2e12,
            ..stats
        };
        assert!(s
            .handle(STATS_ROUND, 4, setup(23, 62, 3, wide.encoding_digest()))
            .is_err());
        assert!(matches!(
            s.handle(STATS_ROUND, 4, setup(24, 62, 3, stats.encoding_digest())),
            Ok(FromNode::Keys(_))
        ));
    }

    /// Distributed DP statistics: the parameters must be for this node's vector, and the
    /// protocol's threshold must reach the contributors the noise is accounted over.
    #[test]
    fn distributed_statistics_need_their_dimension_and_the_accounted_threshold() {
        use dpfl_common::dp::distributed::{DistributedParams, Mechanism};
        use dpfl_common::wire::DistributedRound;
        let (_dir, mut s) = node();
        // 2 features, 1 class: 7 values, clip sqrt(7), padded to 8.
        let params = DistributedParams {
            mechanism: Mechanism::Skellam,
            bits: 32,
            clip_norm: 7f64.sqrt(),
            noise_multiplier: 1.0,
            min_contributors: 3,
            max_contributors: 3,
            dim: 7,
            beta: (-0.5f64).exp(),
            headroom: 3.0,
        };
        let spec = StatsSecAgg {
            clip_norm: params.clip_norm,
            bits: 32,
            distributed: Some(DistributedRound {
                params,
                rotation_seed: 7,
            }),
        };
        let e = s.hold_stats(spec, vec![1.0; 6]).unwrap_err();
        assert!(e.contains("distributed DP parameters for 7"), "{e}");
        let mut other = spec;
        other.bits = 30;
        assert!(
            s.hold_stats(other, vec![0.5; 7]).is_err(),
            "ring and parameters disagree"
        );
        s.hold_stats(spec, vec![1.0, 1.0, 0.5, 0.5, 0.3, 0.3, 1.0])
            .unwrap();
        // Threshold 2 of 3: a sum of 2 shares would carry less noise than accounted.
        let e = s
            .handle(STATS_ROUND, 100, setup(10, 32, 8, spec.encoding_digest()))
            .unwrap_err();
        assert!(e.contains("threshold 2 is below the 3"), "{e}");
    }
}
