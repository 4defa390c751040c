//! The node's side of a round: a state machine from server messages to answers.
//!
//! ```text
//! handle_setup(RoundSetup)            -> AdvertiseKeys
//! handle_neighbour_keys(NeighbourKeys) -> EncryptedShares
//! handle_shares(ForwardedShares, x)   -> MaskedInput
//! handle_survivors(SurvivorSet)       -> SurvivorSignature
//! handle_unmask(UnmaskRequest)        -> UnmaskResponse   (may be asked again)
//! ```
//!
//! Every message is validated in full before the state changes. A message for another
//! round or stage, or an input of the wrong shape, is refused and changes nothing; any
//! other refusal (a bad signature, a ciphertext that does not open, an inconsistent
//! survivor set, too few neighbours or signatures, a request for both kinds of share of a
//! peer) **aborts** the round: its secrets are dropped (zeroized) and every later message
//! of the round is refused with [`ClientError::Aborted`].
//!
//! What the node guarantees whatever the server does: it reveals, per peer, shares of at
//! most one of that peer's two secrets, and only after at least t of its neighbours signed
//! the survivor set it was shown; it masks its input with every neighbour whose shares it
//! holds; it never takes part in a round number it has already seen; with a
//! [`ThreatModel`] in its config, it refuses rounds whose (k, t) do not give that model's
//! guarantee for the announced population.

use crate::context::{ContextError, RoundContext};
use crate::crypto::{
    advertise_message, agree, commitment, decrypt_shares, encrypt_shares, pairwise_seed,
    self_mask_key, survivors_message, OpenError,
};
use crate::messages::{
    AdvertiseKeys, Ciphertext, EncryptedShares, ForwardedShares, KeyAdvertisement, MaskedInput,
    NeighbourKeys, PeerShare, RoundSetup, Stage, SurvivorSet, SurvivorSignature, UnmaskRequest,
    UnmaskResponse,
};
use crate::params::{is_secure, ThreatModel};
use crate::prg::{apply_masks, MaskSign};
use crate::shamir::{split, ShareValue};
use crate::sign::{SignatureError, Signer, Verifier};
use crate::{NodeId, MAX_SIGNATURE_LEN};
use rand::{CryptoRng, RngCore};
use std::collections::{BTreeMap, BTreeSet};
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

/// What a node expects of the rounds it takes part in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientConfig {
    /// Coordinates of its input (the model's parameter count).
    pub vector_len: u32,
    /// Ring width b.
    pub bits: u8,
    /// If set, rounds whose (n, k, t) do not give this model's privacy guarantee are
    /// refused (see [`crate::params::is_secure`]).
    pub threat_model: Option<ThreatModel>,
}

/// Why a node refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The round was aborted by an earlier refusal, or none is running.
    #[error("no round in progress (none started, or it was aborted)")]
    Aborted,
    /// A message of another round (not an abort: it may be stale).
    #[error("message for round {got}, the round in progress is {expected}")]
    WrongRound {
        /// Round in progress.
        expected: u64,
        /// Round of the message.
        got: u64,
    },
    /// A message of another stage (not an abort: it may be a duplicate).
    #[error("message for stage {got}, expected {expected}")]
    WrongStage {
        /// Stage expected.
        expected: Stage,
        /// Stage of the message.
        got: Stage,
    },
    /// A setup for a round number already seen (a replay).
    #[error("round {got} is not after round {last}, which this node has already seen")]
    StaleRound {
        /// Last round seen.
        last: u64,
        /// Round announced.
        got: u64,
    },
    /// The announced context is invalid.
    #[error("invalid round context: {0}")]
    Context(#[from] ContextError),
    /// This node is not among the participants.
    #[error("node {0:?} is not a participant of the round")]
    NotAParticipant(NodeId),
    /// The context disagrees with the node's configuration.
    #[error("the round's {what} is {got}, this node expects {expected}")]
    Mismatch {
        /// Which field.
        what: &'static str,
        /// Expected value.
        expected: u64,
        /// Announced value.
        got: u64,
    },
    /// (k, t) too weak for the node's threat model.
    #[error("degree {degree} and threshold {threshold} do not protect {n} participants under this node's threat model")]
    InsecureParameters {
        /// Participants.
        n: u32,
        /// Degree.
        degree: u32,
        /// Threshold.
        threshold: u32,
    },
    /// The input does not have the round's length (not an abort).
    #[error("input has {got} coordinates, the round has {expected}")]
    InputLength {
        /// Round's length.
        expected: u32,
        /// Given.
        got: usize,
    },
    /// An input coordinate outside the ring (not an abort).
    #[error("input coordinate {index} = {value} is not below 2^{bits}")]
    InputOutOfRange {
        /// Position.
        index: usize,
        /// Value.
        value: u64,
        /// Ring width.
        bits: u8,
    },
    /// A message names a participant it may not (not a neighbour, not eligible).
    #[error("{what}: participant {peer} is not allowed here")]
    UnexpectedPeer {
        /// Index.
        peer: u32,
        /// Where.
        what: &'static str,
    },
    /// A participant listed twice.
    #[error("{what}: participant {peer} is listed twice")]
    DuplicatePeer {
        /// Index.
        peer: u32,
        /// Where.
        what: &'static str,
    },
    /// A list longer than the node's neighbourhood.
    #[error("{what}: {got} entries, at most {max}")]
    TooLong {
        /// Which list.
        what: &'static str,
        /// Length.
        got: usize,
        /// Bound.
        max: usize,
    },
    /// A peer's key advertisement is not signed by the peer.
    #[error("keys of {peer:?}: {source}")]
    BadSignature {
        /// The peer.
        peer: NodeId,
        /// Why.
        source: SignatureError,
    },
    /// A peer's public key gives a non-contributory X25519 result.
    #[error("{peer:?} advertised a low-order public key")]
    WeakKey {
        /// The peer.
        peer: NodeId,
    },
    /// A ciphertext from a peer does not open (or holds non-field values).
    #[error("shares from {peer:?} do not decrypt")]
    Decryption {
        /// The peer.
        peer: NodeId,
    },
    /// Fewer than t neighbours at some stage: the node's secrets could not be
    /// reconstructed, or its mask would protect too little.
    #[error("{stage}: {have} neighbours, the threshold is {need}")]
    TooFewNeighbours {
        /// Stage.
        stage: Stage,
        /// Neighbours present.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// The survivor set is malformed or contradicts what the node knows.
    #[error("survivor set: {0}")]
    SurvivorSet(String),
    /// The node itself is missing from the survivor set although it sent its input.
    #[error("this node sent its masked input but is not in the survivor set")]
    NotASurvivor,
    /// Fewer than t neighbours signed the survivor set this node was shown.
    #[error("{valid} valid neighbour signatures on the survivor set, need {need}")]
    TooFewSignatures {
        /// Valid signatures.
        valid: usize,
        /// Threshold.
        need: usize,
    },
    /// The server asked for both the self-mask and the mask-key share of one peer (in one
    /// request or across requests).
    #[error("refused: both kinds of share requested for participant {peer}")]
    BothShareKinds {
        /// The peer.
        peer: u32,
    },
    /// A share kind that contradicts the signed survivor set (a self-mask share of a
    /// dropped peer or a mask-key share of a survivor).
    #[error("refused: {kind} share of participant {peer} contradicts the survivor set")]
    ShareKindMismatch {
        /// The peer.
        peer: u32,
        /// Kind asked.
        kind: &'static str,
    },
    /// Signing failed.
    #[error("signing: {0}")]
    Signing(SignatureError),
    /// A signature longer than [`MAX_SIGNATURE_LEN`].
    #[error("signature of {0} bytes is too long")]
    SignatureTooLong(usize),
}

impl ClientError {
    /// Whether the refusal leaves the round running (stale, duplicate or caller errors).
    pub fn is_benign(&self) -> bool {
        matches!(
            self,
            ClientError::WrongRound { .. }
                | ClientError::WrongStage { .. }
                | ClientError::InputLength { .. }
                | ClientError::InputOutOfRange { .. }
                | ClientError::StaleRound { .. }
        )
    }
}

/// Which of a peer's secrets a share was revealed of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Revealed {
    SelfMask,
    MaskKey,
}

/// A neighbour whose keys verified.
struct Peer {
    c_shared: SharedSecret,
    pairwise: Zeroizing<[u8; 32]>,
}

/// Shares a neighbour sent this node.
struct Held {
    b: Zeroizing<ShareValue>,
    s: Zeroizing<ShareValue>,
}

struct Round {
    /// The stage whose server message comes next.
    expect: Stage,
    ctx: RoundContext,
    digest: [u8; 32],
    me: u32,
    neighbours: BTreeSet<u32>,
    /// Until the masked input is sent.
    secrets: Option<Secrets>,
    /// Neighbours with verified keys (until the masked input is sent).
    peers: BTreeMap<u32, Peer>,
    /// Neighbours whose shares this node holds.
    held: BTreeMap<u32, Held>,
    survivors: Option<BTreeSet<u32>>,
    survivors_list: Vec<u32>,
    revealed: BTreeMap<u32, Revealed>,
}

/// The round in `state` if it is at `stage` (or unmasking again) of `round`.
fn active(state: &mut State, stage: Stage, round: u64) -> Result<&mut Round, ClientError> {
    match state {
        State::Active(r) => {
            if round != r.ctx.round {
                Err(ClientError::WrongRound {
                    expected: r.ctx.round,
                    got: round,
                })
            } else if stage != r.expect {
                Err(ClientError::WrongStage {
                    expected: r.expect,
                    got: stage,
                })
            } else {
                Ok(r)
            }
        }
        _ => Err(ClientError::Aborted),
    }
}

struct Secrets {
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    b: Zeroizing<[u8; 32]>,
}

enum State {
    Idle,
    Active(Box<Round>),
    Aborted,
}

/// A node's secure-aggregation state machine (one round at a time).
pub struct Client<S, V> {
    id: NodeId,
    config: ClientConfig,
    signer: S,
    verifier: V,
    last_round: Option<u64>,
    state: State,
}

impl<S: Signer, V: Verifier> Client<S, V> {
    /// A node named `id` (its certificate name), signing with `signer` and checking peers
    /// with `verifier`.
    pub fn new(id: impl Into<NodeId>, config: ClientConfig, signer: S, verifier: V) -> Self {
        Self {
            id: id.into(),
            config,
            signer,
            verifier,
            last_round: None,
            state: State::Idle,
        }
    }

    /// The node's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The round in progress and the stage whose message it expects next.
    pub fn progress(&self) -> Option<(u64, Stage)> {
        match &self.state {
            State::Active(r) => Some((r.ctx.round, r.expect)),
            _ => None,
        }
    }

    /// Whether the last round was aborted.
    pub fn is_aborted(&self) -> bool {
        matches!(self.state, State::Aborted)
    }

    /// The node's neighbours in the round in progress (participant indices).
    pub fn neighbours(&self) -> Vec<u32> {
        match &self.state {
            State::Active(r) => r.neighbours.iter().copied().collect(),
            _ => Vec::new(),
        }
    }

    fn outcome<T>(&mut self, r: Result<T, ClientError>) -> Result<T, ClientError> {
        if let Err(e) = &r {
            if !e.is_benign() {
                self.state = State::Aborted;
            }
        }
        r
    }

    /// Stage 0: checks the round's context and advertises fresh signed keys.
    pub fn handle_setup<R: CryptoRng + RngCore + ?Sized>(
        &mut self,
        setup: &RoundSetup,
        rng: &mut R,
    ) -> Result<AdvertiseKeys, ClientError> {
        let r = self.setup_inner(setup, rng);
        self.outcome(r)
    }

    fn setup_inner<R: CryptoRng + RngCore + ?Sized>(
        &mut self,
        setup: &RoundSetup,
        rng: &mut R,
    ) -> Result<AdvertiseKeys, ClientError> {
        let ctx = &setup.context;
        if let Some(last) = self.last_round {
            if ctx.round <= last {
                return Err(ClientError::StaleRound {
                    last,
                    got: ctx.round,
                });
            }
        }
        // From here on the round number is used up, whatever happens.
        self.last_round = Some(ctx.round);
        self.state = State::Idle;
        ctx.validate()?;
        let me = ctx
            .index_of(&self.id)
            .ok_or_else(|| ClientError::NotAParticipant(self.id.clone()))?;
        if ctx.vector_len != self.config.vector_len {
            return Err(ClientError::Mismatch {
                what: "vector length",
                expected: self.config.vector_len.into(),
                got: ctx.vector_len.into(),
            });
        }
        if ctx.bits != self.config.bits {
            return Err(ClientError::Mismatch {
                what: "ring width",
                expected: self.config.bits.into(),
                got: ctx.bits.into(),
            });
        }
        if let Some(threat) = &self.config.threat_model {
            if !is_secure(ctx.len(), ctx.params(), threat) {
                return Err(ClientError::InsecureParameters {
                    n: ctx.len(),
                    degree: ctx.degree,
                    threshold: ctx.threshold,
                });
            }
        }
        let digest = ctx.digest();
        let graph = crate::graph::Graph::new(ctx.len(), ctx.degree, &ctx.graph_seed);
        let neighbours: BTreeSet<u32> = graph.neighbours(me).into_iter().collect();

        let c_sk = StaticSecret::random_from_rng(&mut *rng);
        let s_sk = StaticSecret::random_from_rng(&mut *rng);
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(b.as_mut_slice());
        let c_pk = PublicKey::from(&c_sk).to_bytes();
        let s_pk = PublicKey::from(&s_sk).to_bytes();
        let commit = commitment(&digest, &self.id, &b);
        let message = advertise_message(&digest, ctx.round, &self.id, &c_pk, &s_pk, &commit);
        let signature = self.signer.sign(&message).map_err(ClientError::Signing)?;

        self.state = State::Active(Box::new(Round {
            expect: Stage::ShareKeys,
            ctx: ctx.clone(),
            digest,
            me,
            neighbours,
            secrets: Some(Secrets { c_sk, s_sk, b }),
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
            survivors: None,
            survivors_list: Vec::new(),
            revealed: BTreeMap::new(),
        }));
        Ok(AdvertiseKeys {
            round: ctx.round,
            keys: KeyAdvertisement {
                c_pk,
                s_pk,
                commitment: commit,
                signature,
            },
        })
    }

    /// Stage 1: verifies the neighbours' signed keys and sends each an encrypted share of
    /// the self-mask seed and of the mask key.
    pub fn handle_neighbour_keys<R: CryptoRng + RngCore + ?Sized>(
        &mut self,
        msg: &NeighbourKeys,
        rng: &mut R,
    ) -> Result<EncryptedShares, ClientError> {
        let r = self.neighbour_keys_inner(msg, rng);
        self.outcome(r)
    }

    fn neighbour_keys_inner<R: CryptoRng + RngCore + ?Sized>(
        &mut self,
        msg: &NeighbourKeys,
        rng: &mut R,
    ) -> Result<EncryptedShares, ClientError> {
        let id = &self.id;
        let verifier = &self.verifier;
        let r = active(&mut self.state, Stage::ShareKeys, msg.round)?;
        let what = "neighbour keys";
        if msg.keys.len() > r.neighbours.len() {
            return Err(ClientError::TooLong {
                what,
                got: msg.keys.len(),
                max: r.neighbours.len(),
            });
        }
        let secrets = r.secrets.as_ref().ok_or(ClientError::Aborted)?;
        let mut peers = BTreeMap::new();
        for entry in &msg.keys {
            let peer = entry.peer;
            if !r.neighbours.contains(&peer) {
                return Err(ClientError::UnexpectedPeer { peer, what });
            }
            if peers.contains_key(&peer) {
                return Err(ClientError::DuplicatePeer { peer, what });
            }
            let k = &entry.keys;
            if k.signature.len() > MAX_SIGNATURE_LEN {
                return Err(ClientError::SignatureTooLong(k.signature.len()));
            }
            let name = r.ctx.node(peer).unwrap_or_default();
            let message = advertise_message(
                &r.digest,
                r.ctx.round,
                name,
                &k.c_pk,
                &k.s_pk,
                &k.commitment,
            );
            verifier
                .verify(name, &message, &k.signature)
                .map_err(|source| ClientError::BadSignature {
                    peer: name.to_string(),
                    source,
                })?;
            let weak = || ClientError::WeakKey {
                peer: name.to_string(),
            };
            let c_shared = agree(&secrets.c_sk, &k.c_pk).ok_or_else(weak)?;
            let s_shared = agree(&secrets.s_sk, &k.s_pk).ok_or_else(weak)?;
            let pairwise = pairwise_seed(&s_shared, &r.digest, r.ctx.round, id, name);
            peers.insert(peer, Peer { c_shared, pairwise });
        }
        let t = r.ctx.threshold as usize;
        if peers.len() < t {
            return Err(ClientError::TooFewNeighbours {
                stage: Stage::ShareKeys,
                have: peers.len(),
                need: t,
            });
        }
        let points: Vec<u32> = peers.keys().map(|&p| p + 1).collect();
        let too_few = |_| ClientError::TooFewNeighbours {
            stage: Stage::ShareKeys,
            have: points.len(),
            need: t,
        };
        let b_shares = split(&secrets.b, t, &points, rng).map_err(too_few)?;
        let s_bytes = Zeroizing::new(secrets.s_sk.to_bytes());
        let s_shares = split(&s_bytes, t, &points, rng).map_err(too_few)?;
        let shares = peers
            .iter()
            .zip(b_shares.iter().zip(&s_shares))
            .map(|((&peer, p), (bs, ss))| Ciphertext {
                peer,
                data: encrypt_shares(
                    &p.c_shared,
                    &r.digest,
                    r.ctx.round,
                    id,
                    r.ctx.node(peer).unwrap_or_default(),
                    bs,
                    ss,
                ),
            })
            .collect();
        drop(Zeroizing::new(b_shares));
        drop(Zeroizing::new(s_shares));
        r.peers = peers;
        r.expect = Stage::MaskedInput;
        Ok(EncryptedShares {
            round: r.ctx.round,
            shares,
        })
    }

    /// Stage 2: decrypts the shares neighbours sent and masks the input `x` (values below
    /// 2^b, the round's length) with the self mask and one pairwise mask per neighbour
    /// whose shares arrived.
    pub fn handle_shares(
        &mut self,
        msg: &ForwardedShares,
        input: &[u64],
    ) -> Result<MaskedInput, ClientError> {
        let r = self.shares_inner(msg, input);
        self.outcome(r)
    }

    fn shares_inner(
        &mut self,
        msg: &ForwardedShares,
        input: &[u64],
    ) -> Result<MaskedInput, ClientError> {
        let id = &self.id;
        let r = active(&mut self.state, Stage::MaskedInput, msg.round)?;
        if input.len() != r.ctx.vector_len as usize {
            return Err(ClientError::InputLength {
                expected: r.ctx.vector_len,
                got: input.len(),
            });
        }
        let mask = r.ctx.ring_mask();
        if let Some((index, &value)) = input.iter().enumerate().find(|(_, v)| **v & !mask != 0) {
            return Err(ClientError::InputOutOfRange {
                index,
                value,
                bits: r.ctx.bits,
            });
        }
        let what = "forwarded shares";
        if msg.shares.len() > r.peers.len() {
            return Err(ClientError::TooLong {
                what,
                got: msg.shares.len(),
                max: r.peers.len(),
            });
        }
        let mut held = BTreeMap::new();
        for c in &msg.shares {
            let peer = c.peer;
            let p = r
                .peers
                .get(&peer)
                .ok_or(ClientError::UnexpectedPeer { peer, what })?;
            if held.contains_key(&peer) {
                return Err(ClientError::DuplicatePeer { peer, what });
            }
            let name = r.ctx.node(peer).unwrap_or_default();
            let (b, s) = decrypt_shares(&p.c_shared, &r.digest, r.ctx.round, name, id, &c.data)
                .map_err(|_: OpenError| ClientError::Decryption {
                    peer: name.to_string(),
                })?;
            held.insert(
                peer,
                Held {
                    b: Zeroizing::new(b),
                    s: Zeroizing::new(s),
                },
            );
        }
        let t = r.ctx.threshold as usize;
        if held.len() < t {
            return Err(ClientError::TooFewNeighbours {
                stage: Stage::MaskedInput,
                have: held.len(),
                need: t,
            });
        }
        let secrets = r.secrets.take().ok_or(ClientError::Aborted)?;
        let self_key = self_mask_key(&r.digest, id, &secrets.b);
        let mut seeds: Vec<(&[u8; 32], MaskSign)> = Vec::with_capacity(held.len() + 1);
        seeds.push((&self_key, MaskSign::Add));
        for peer in held.keys() {
            if let Some(p) = r.peers.get(peer) {
                let sign = if r.me < *peer {
                    MaskSign::Add
                } else {
                    MaskSign::Sub
                };
                seeds.push((&p.pairwise, sign));
            }
        }
        let mut y = input.to_vec();
        apply_masks(&mut y, &seeds, r.ctx.bits);
        drop(seeds);
        drop(secrets);
        let data = crate::messages::pack(&y, r.ctx.bytes_per_coordinate());
        r.peers.clear();
        r.held = held;
        r.expect = Stage::Consistency;
        Ok(MaskedInput {
            round: r.ctx.round,
            data,
        })
    }

    /// Stage 3: checks the survivor set and signs it.
    pub fn handle_survivors(
        &mut self,
        msg: &SurvivorSet,
    ) -> Result<SurvivorSignature, ClientError> {
        let r = self.survivors_inner(msg);
        self.outcome(r)
    }

    fn survivors_inner(&mut self, msg: &SurvivorSet) -> Result<SurvivorSignature, ClientError> {
        let r = active(&mut self.state, Stage::Consistency, msg.round)?;
        let n = r.ctx.len();
        if msg.survivors.len() > n as usize {
            return Err(ClientError::TooLong {
                what: "survivor set",
                got: msg.survivors.len(),
                max: n as usize,
            });
        }
        for w in msg.survivors.windows(2) {
            if w[0] >= w[1] {
                return Err(ClientError::SurvivorSet(format!(
                    "not sorted and distinct at {}",
                    w[1]
                )));
            }
        }
        if let Some(&last) = msg.survivors.last() {
            if last >= n {
                return Err(ClientError::SurvivorSet(format!(
                    "index {last} is not a participant"
                )));
            }
        }
        let survivors: BTreeSet<u32> = msg.survivors.iter().copied().collect();
        if !survivors.contains(&r.me) {
            return Err(ClientError::NotASurvivor);
        }
        let t = r.ctx.threshold as usize;
        if survivors.len() < t {
            return Err(ClientError::SurvivorSet(format!(
                "{} survivors, below the threshold {t}",
                survivors.len()
            )));
        }
        // A surviving neighbour sent its masked input, so it had sent its shares to every
        // neighbour that advertised, this node included.
        if let Some(v) = r
            .neighbours
            .iter()
            .find(|v| survivors.contains(v) && !r.held.contains_key(v))
        {
            return Err(ClientError::SurvivorSet(format!(
                "neighbour {v} is listed as a survivor but never sent shares to this node"
            )));
        }
        let message = survivors_message(&r.digest, r.ctx.round, &self.id, &msg.survivors);
        let signature = self.signer.sign(&message).map_err(ClientError::Signing)?;
        r.survivors = Some(survivors);
        r.survivors_list = msg.survivors.clone();
        r.expect = Stage::Unmasking;
        Ok(SurvivorSignature {
            round: r.ctx.round,
            signature,
        })
    }

    /// Stage 4: checks that at least t neighbours signed the same survivor set and reveals
    /// the shares asked for, refusing any request that would reveal both secrets of a peer.
    pub fn handle_unmask(&mut self, msg: &UnmaskRequest) -> Result<UnmaskResponse, ClientError> {
        let r = self.unmask_inner(msg);
        self.outcome(r)
    }

    fn unmask_inner(&mut self, msg: &UnmaskRequest) -> Result<UnmaskResponse, ClientError> {
        let verifier = &self.verifier;
        let r = active(&mut self.state, Stage::Unmasking, msg.round)?;
        let survivors = r.survivors.as_ref().ok_or(ClientError::Aborted)?;
        let k = r.neighbours.len();
        for (what, len) in [
            ("signatures", msg.signatures.len()),
            ("self-mask request", msg.self_mask.len()),
            ("mask-key request", msg.mask_key.len()),
        ] {
            if len > k {
                return Err(ClientError::TooLong {
                    what,
                    got: len,
                    max: k,
                });
            }
        }
        // The consistency check: t neighbours signed the set this node signed.
        let mut signers = BTreeSet::new();
        let mut valid = 0;
        for s in &msg.signatures {
            let what = "survivor signatures";
            if !r.neighbours.contains(&s.peer) {
                return Err(ClientError::UnexpectedPeer { peer: s.peer, what });
            }
            if !signers.insert(s.peer) {
                return Err(ClientError::DuplicatePeer { peer: s.peer, what });
            }
            if s.signature.len() > MAX_SIGNATURE_LEN {
                return Err(ClientError::SignatureTooLong(s.signature.len()));
            }
            // Only survivors count (a signature from a node this set calls dropped is
            // evidence of another story, not support for this one).
            if !survivors.contains(&s.peer) {
                continue;
            }
            let name = r.ctx.node(s.peer).unwrap_or_default();
            let message = survivors_message(&r.digest, r.ctx.round, name, &r.survivors_list);
            if verifier.verify(name, &message, &s.signature).is_ok() {
                valid += 1;
            }
        }
        let t = r.ctx.threshold as usize;
        if valid < t {
            return Err(ClientError::TooFewSignatures { valid, need: t });
        }
        // Which shares: never both kinds for one peer, in this request or across requests.
        let mut asked = BTreeMap::new();
        for (list, kind) in [
            (&msg.self_mask, Revealed::SelfMask),
            (&msg.mask_key, Revealed::MaskKey),
        ] {
            let what = match kind {
                Revealed::SelfMask => "self-mask request",
                Revealed::MaskKey => "mask-key request",
            };
            for &peer in list {
                if !r.held.contains_key(&peer) {
                    return Err(ClientError::UnexpectedPeer { peer, what });
                }
                match asked.insert(peer, kind) {
                    Some(k) if k == kind => {
                        return Err(ClientError::DuplicatePeer { peer, what });
                    }
                    Some(_) => return Err(ClientError::BothShareKinds { peer }),
                    None => {}
                }
                if matches!(r.revealed.get(&peer), Some(k) if *k != kind) {
                    return Err(ClientError::BothShareKinds { peer });
                }
                let survived = survivors.contains(&peer);
                if survived != (kind == Revealed::SelfMask) {
                    return Err(ClientError::ShareKindMismatch {
                        peer,
                        kind: match kind {
                            Revealed::SelfMask => "self-mask",
                            Revealed::MaskKey => "mask-key",
                        },
                    });
                }
            }
        }
        let mut self_mask = Vec::with_capacity(msg.self_mask.len());
        let mut mask_key = Vec::with_capacity(msg.mask_key.len());
        for (&peer, &kind) in &asked {
            r.revealed.insert(peer, kind);
        }
        for &peer in &msg.self_mask {
            if let Some(h) = r.held.get(&peer) {
                self_mask.push(PeerShare { peer, share: *h.b });
            }
        }
        for &peer in &msg.mask_key {
            if let Some(h) = r.held.get(&peer) {
                mask_key.push(PeerShare { peer, share: *h.s });
            }
        }
        Ok(UnmaskResponse {
            round: r.ctx.round,
            self_mask,
            mask_key,
        })
    }
}
