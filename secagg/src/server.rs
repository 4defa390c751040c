//! The server's side of a round: a state machine over stages with explicit transitions.
//!
//! ```text
//! Server::new(context)            -> setup(): RoundSetup for every participant
//! loop over the five stages:
//!     handle_message(node, FromNode)   for each answer (validated; a refusal changes nothing)
//!     handle_dropout(node)             when the caller knows a node is gone
//!     is_stage_complete()              everyone asked has answered (or dropped)
//!     close_stage()                    the deadline passed or all answered: whoever has not
//!                                      answered is dropped; returns the next stage's
//!                                      messages, or the Aggregate after unmasking
//! ```
//!
//! Survivor sets, in the notation of Bonawitz et al.: U1 advertised keys, U2 sent shares,
//! U3 sent a masked input (their inputs are in the sum), U4 signed the survivor set, U5
//! answered the unmask request. A node dropped at any point receives nothing more and its
//! later messages are refused; one whose masked input arrived stays in the sum.
//!
//! The round aborts (every later call returns [`ServerError::Aborted`]) when too few nodes
//! are left at a stage to go on, or when a secret that unmasking needs has fewer than t
//! share holders left. That last check runs **before** any share is asked for and again
//! before any is used, so an aborted round reveals no secret: the server holds y values
//! and, at most, fewer than t shares of any secret.

use crate::context::{ContextError, RoundContext};
use crate::crypto::{
    agree, commitment, pairwise_seed, self_mask_key, survivors_message, CIPHERTEXT_BYTES,
};
use crate::graph::Graph;
use crate::messages::{
    add_packed, Ciphertext, EncryptedShares, ForwardedShares, FromNode, KeyAdvertisement,
    MaskedInput, NeighbourKeys, PeerKeys, PeerShare, PeerSignature, RoundSetup, Stage, SurvivorSet,
    SurvivorSignature, ToNode, UnmaskRequest, UnmaskResponse,
};
use crate::prg::{apply_masks, MaskSign};
use crate::shamir::{check_share, reconstruct, PointShares};
use crate::sign::{SignatureError, Verifier};
use crate::{NodeId, MAX_SIGNATURE_LEN};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// The two secrets of a node that shares are held of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareKind {
    /// The self-mask seed b (reconstructed for survivors).
    SelfMask,
    /// The mask key s_sk (reconstructed for nodes that dropped after sharing).
    MaskKey,
}

impl std::fmt::Display for ShareKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShareKind::SelfMask => "self-mask seed",
            ShareKind::MaskKey => "mask key",
        })
    }
}

/// Why the server refused a call, or why the round ended without a sum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// The context is invalid.
    #[error("invalid round context: {0}")]
    Context(#[from] ContextError),
    /// A sender that is not a participant.
    #[error("{0:?} is not a participant of this round")]
    UnknownNode(String),
    /// A message of another round.
    #[error("message for round {got}, this round is {expected}")]
    WrongRound {
        /// This round.
        expected: u64,
        /// The message's.
        got: u64,
    },
    /// A message of another stage.
    #[error("message for stage {got}, the round is at {expected}")]
    WrongStage {
        /// Current stage.
        expected: Stage,
        /// The message's stage.
        got: Stage,
    },
    /// A participant that was not asked in this stage or was dropped.
    #[error("{node:?} is not expected to answer {stage} (dropped or not asked)")]
    NotExpected {
        /// Sender.
        node: NodeId,
        /// Stage.
        stage: Stage,
    },
    /// A second answer to the same stage.
    #[error("{node:?} already answered {stage}")]
    Duplicate {
        /// Sender.
        node: NodeId,
        /// Stage.
        stage: Stage,
    },
    /// A message whose content is invalid.
    #[error("message from {node:?}: {what}")]
    Malformed {
        /// Sender.
        node: NodeId,
        /// What is wrong.
        what: String,
    },
    /// A signature that does not verify (only with a verifier).
    #[error("signature of {node:?}: {source}")]
    BadSignature {
        /// Signer.
        node: NodeId,
        /// Why.
        source: SignatureError,
    },
    /// Too few nodes left to go on: the round is aborted.
    #[error("aborted at {stage}: {have} nodes left, need {need}")]
    TooFewSurvivors {
        /// Stage.
        stage: Stage,
        /// Nodes left.
        have: usize,
        /// Needed.
        need: usize,
    },
    /// A secret that unmasking needs has fewer than t shares (or holders) left: the round
    /// is aborted and nothing is reconstructed.
    #[error("aborted: {have} shares of the {kind} of {node:?}, need {need}")]
    NotEnoughShares {
        /// Whose secret.
        node: NodeId,
        /// Which secret.
        kind: ShareKind,
        /// Shares (or live holders) available.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// Shares that do not reconstruct a secret matching its commitment: a holder lied.
    #[error("aborted: shares of the {kind} of {node:?} are inconsistent ({why})")]
    Reconstruction {
        /// Whose secret.
        node: NodeId,
        /// Which secret.
        kind: ShareKind,
        /// Detail.
        why: String,
    },
    /// The round was aborted earlier (the first error said why).
    #[error("the round was aborted")]
    Aborted,
    /// The round is over.
    #[error("the round is finished")]
    Finished,
}

/// The result of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// Round.
    pub round: u64,
    /// Σ x over the survivors, mod 2^b.
    pub sum: Vec<u64>,
    /// Whose inputs are in the sum (U3), sorted.
    pub survivors: Vec<NodeId>,
}

/// What closing a stage produced.
#[derive(Debug)]
pub enum Transition {
    /// Messages of the next stage, one per node still in the round.
    Send(Vec<(NodeId, ToNode)>),
    /// The round is complete.
    Done(Aggregate),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Finished,
    Aborted,
}

/// The server's secure-aggregation state machine for one round.
pub struct Server {
    ctx: RoundContext,
    digest: [u8; 32],
    neighbours: Vec<Vec<u32>>,
    verifier: Option<Box<dyn Verifier + Send + Sync>>,
    stage: Stage,
    phase: Phase,
    /// Not reported dropped.
    alive: Vec<bool>,
    /// Asked to answer the current stage.
    expected: Vec<bool>,
    /// Answered the current stage.
    answered: Vec<bool>,
    u1: Vec<bool>,
    u2: Vec<bool>,
    u3: Vec<bool>,
    keys: Vec<Option<KeyAdvertisement>>,
    outbox: Vec<Vec<Ciphertext>>,
    sum: Vec<u64>,
    signatures: Vec<Option<Vec<u8>>>,
    requests: Vec<Option<(Vec<u32>, Vec<u32>)>>,
    b_shares: Vec<PointShares>,
    s_shares: Vec<PointShares>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("round", &self.ctx.round)
            .field("stage", &self.stage)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

fn count(v: &[bool]) -> usize {
    v.iter().filter(|&&b| b).count()
}

impl Server {
    /// A round over `context` (validated), at stage advertise-keys.
    pub fn new(context: RoundContext) -> Result<Self, ServerError> {
        context.validate()?;
        let n = context.len() as usize;
        let graph = Graph::new(context.len(), context.degree, &context.graph_seed);
        let neighbours = (0..context.len()).map(|i| graph.neighbours(i)).collect();
        Ok(Self {
            digest: context.digest(),
            neighbours,
            verifier: None,
            stage: Stage::AdvertiseKeys,
            phase: Phase::Running,
            alive: vec![true; n],
            expected: vec![true; n],
            answered: vec![false; n],
            u1: vec![false; n],
            u2: vec![false; n],
            u3: vec![false; n],
            keys: vec![None; n],
            outbox: vec![Vec::new(); n],
            sum: vec![0; context.vector_len as usize],
            signatures: vec![None; n],
            requests: vec![None; n],
            b_shares: vec![Vec::new(); n],
            s_shares: vec![Vec::new(); n],
            ctx: context,
        })
    }

    /// Also verify key advertisements and survivor-set signatures as they arrive, so that
    /// a node with a bad signature is dropped instead of making its neighbours abort.
    pub fn with_verifier(mut self, verifier: Box<dyn Verifier + Send + Sync>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// The message every participant gets first.
    pub fn setup(&self) -> RoundSetup {
        RoundSetup {
            context: self.ctx.clone(),
        }
    }

    /// The round's context.
    pub fn context(&self) -> &RoundContext {
        &self.ctx
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// How many masked inputs are in the sum (the survivors of the masked-input stage);
    /// 0 before that stage closed. A caller that must not unmask sums of fewer than some
    /// number of inputs checks it before sending the unmasking requests.
    pub fn masked_inputs(&self) -> usize {
        count(&self.u3)
    }

    /// Whether the round ended (with a sum or aborted).
    pub fn is_over(&self) -> bool {
        self.phase != Phase::Running
    }

    /// Nodes asked in this stage that have neither answered nor dropped.
    pub fn pending(&self) -> Vec<NodeId> {
        (0..self.ctx.len())
            .filter(|&i| {
                let i = i as usize;
                self.expected[i] && self.alive[i] && !self.answered[i]
            })
            .filter_map(|i| self.ctx.node(i).map(str::to_string))
            .collect()
    }

    /// Whether every node asked in this stage has answered or dropped.
    pub fn is_stage_complete(&self) -> bool {
        self.phase == Phase::Running
            && (0..self.answered.len())
                .all(|i| !self.expected[i] || !self.alive[i] || self.answered[i])
    }

    /// The shares the server holds of `node`'s two secrets (self-mask seed, mask key),
    /// with the holders' evaluation points: what an audit (or a test) can try to
    /// reconstruct from after an abort.
    pub fn shares_held(&self, node: &str) -> Option<(PointShares, PointShares)> {
        let i = self.ctx.index_of(node)? as usize;
        Some((self.b_shares[i].clone(), self.s_shares[i].clone()))
    }

    /// The sum of the masked inputs received so far (mod 2^b): what the server sees.
    pub fn masked_sum(&self) -> Vec<u64> {
        let mask = self.ctx.ring_mask();
        self.sum.iter().map(|v| v & mask).collect()
    }

    fn running(&self) -> Result<(), ServerError> {
        match self.phase {
            Phase::Running => Ok(()),
            Phase::Finished => Err(ServerError::Finished),
            Phase::Aborted => Err(ServerError::Aborted),
        }
    }

    fn index(&self, node: &str) -> Result<usize, ServerError> {
        self.ctx
            .index_of(node)
            .map(|i| i as usize)
            .ok_or_else(|| ServerError::UnknownNode(node.chars().take(80).collect()))
    }

    fn name(&self, i: usize) -> NodeId {
        self.ctx.node(i as u32).unwrap_or_default().to_string()
    }

    /// The caller learned that `node` is gone (disconnected, timed out): it is asked
    /// nothing more and its later messages are refused. Idempotent.
    pub fn handle_dropout(&mut self, node: &str) -> Result<(), ServerError> {
        let i = self.index(node)?;
        self.alive[i] = false;
        Ok(())
    }

    /// An answer from `from` (the authenticated sender). A refused message changes
    /// nothing.
    pub fn handle_message(&mut self, from: &str, msg: FromNode) -> Result<(), ServerError> {
        self.running()?;
        let i = self.index(from)?;
        if msg.round() != self.ctx.round {
            return Err(ServerError::WrongRound {
                expected: self.ctx.round,
                got: msg.round(),
            });
        }
        if msg.stage() != self.stage {
            return Err(ServerError::WrongStage {
                expected: self.stage,
                got: msg.stage(),
            });
        }
        if !self.expected[i] || !self.alive[i] {
            return Err(ServerError::NotExpected {
                node: self.name(i),
                stage: self.stage,
            });
        }
        if self.answered[i] {
            return Err(ServerError::Duplicate {
                node: self.name(i),
                stage: self.stage,
            });
        }
        match msg {
            FromNode::Keys(m) => self.on_keys(i, m.keys)?,
            FromNode::Shares(m) => self.on_shares(i, m)?,
            FromNode::MaskedInput(m) => self.on_masked_input(i, &m)?,
            FromNode::Signature(m) => self.on_signature(i, m)?,
            FromNode::Unmask(m) => self.on_unmask(i, m)?,
        }
        self.answered[i] = true;
        Ok(())
    }

    fn malformed(&self, i: usize, what: impl Into<String>) -> ServerError {
        ServerError::Malformed {
            node: self.name(i),
            what: what.into(),
        }
    }

    fn on_keys(&mut self, i: usize, keys: KeyAdvertisement) -> Result<(), ServerError> {
        if keys.signature.len() > MAX_SIGNATURE_LEN {
            return Err(self.malformed(i, "signature too long"));
        }
        if let Some(v) = &self.verifier {
            let name = self.name(i);
            let m = crate::crypto::advertise_message(
                &self.digest,
                self.ctx.round,
                &name,
                &keys.c_pk,
                &keys.s_pk,
                &keys.commitment,
            );
            v.verify(&name, &m, &keys.signature)
                .map_err(|source| ServerError::BadSignature { node: name, source })?;
        }
        self.keys[i] = Some(keys);
        Ok(())
    }

    fn on_shares(&mut self, i: usize, m: EncryptedShares) -> Result<(), ServerError> {
        // Exactly one ciphertext for each neighbour the node was given keys of, in any order.
        let mut want: Vec<u32> = self.neighbours[i]
            .iter()
            .copied()
            .filter(|&v| self.u1[v as usize])
            .collect();
        let mut got: Vec<u32> = m.shares.iter().map(|c| c.peer).collect();
        got.sort_unstable();
        want.sort_unstable();
        if got != want {
            return Err(self.malformed(
                i,
                format!(
                    "ciphertexts for {} receivers, expected one for each of its {} neighbours with keys",
                    got.len(),
                    want.len()
                ),
            ));
        }
        if let Some(c) = m.shares.iter().find(|c| c.data.len() != CIPHERTEXT_BYTES) {
            return Err(self.malformed(
                i,
                format!(
                    "ciphertext for {} has {} bytes, expected {CIPHERTEXT_BYTES}",
                    c.peer,
                    c.data.len()
                ),
            ));
        }
        self.outbox[i] = m.shares;
        Ok(())
    }

    fn on_masked_input(&mut self, i: usize, m: &MaskedInput) -> Result<(), ServerError> {
        let (bpc, mask) = (self.ctx.bytes_per_coordinate(), self.ctx.ring_mask());
        add_packed(&mut self.sum, &m.data, bpc, mask).map_err(|e| self.malformed(i, e))
    }

    fn on_signature(&mut self, i: usize, m: SurvivorSignature) -> Result<(), ServerError> {
        if m.signature.len() > MAX_SIGNATURE_LEN {
            return Err(self.malformed(i, "signature too long"));
        }
        if let Some(v) = &self.verifier {
            let name = self.name(i);
            let msg = survivors_message(&self.digest, self.ctx.round, &name, &self.u3_list());
            v.verify(&name, &msg, &m.signature)
                .map_err(|source| ServerError::BadSignature { node: name, source })?;
        }
        self.signatures[i] = Some(m.signature);
        Ok(())
    }

    fn on_unmask(&mut self, i: usize, m: UnmaskResponse) -> Result<(), ServerError> {
        let Some((self_mask, mask_key)) = &self.requests[i] else {
            return Err(self.malformed(i, "no unmask request was sent to this node"));
        };
        let matches = |got: &[PeerShare], want: &[u32]| {
            got.len() == want.len() && got.iter().zip(want).all(|(g, w)| g.peer == *w)
        };
        if !matches(&m.self_mask, self_mask) || !matches(&m.mask_key, mask_key) {
            return Err(self.malformed(i, "shares do not answer the request"));
        }
        if let Some(bad) = m
            .self_mask
            .iter()
            .chain(&m.mask_key)
            .find_map(|s| check_share(&s.share).err())
        {
            return Err(self.malformed(i, bad.to_string()));
        }
        let x = i as u32 + 1;
        for s in m.self_mask {
            self.b_shares[s.peer as usize].push((x, s.share));
        }
        for s in m.mask_key {
            self.s_shares[s.peer as usize].push((x, s.share));
        }
        Ok(())
    }

    fn u3_list(&self) -> Vec<u32> {
        (0..self.ctx.len())
            .filter(|&i| self.u3[i as usize])
            .collect()
    }

    fn abort(&mut self, e: ServerError) -> ServerError {
        self.phase = Phase::Aborted;
        // Drop what is no longer needed; keep shares and the masked sum for audits.
        self.outbox = Vec::new();
        e
    }

    /// Ends the current stage: nodes asked that have not answered are dropped, and the
    /// next stage's messages are returned (or the aggregate after unmasking). Errors abort
    /// the round.
    pub fn close_stage(&mut self) -> Result<Transition, ServerError> {
        self.running()?;
        let r = match self.stage {
            Stage::AdvertiseKeys => self.close_advertise(),
            Stage::ShareKeys => self.close_share_keys(),
            Stage::MaskedInput => self.close_masked_input(),
            Stage::Consistency => self.close_consistency(),
            Stage::Unmasking => self.finish(),
        };
        r.map_err(|e| self.abort(e))
    }

    /// Members of the current stage: answered and still there.
    fn members(&self) -> Vec<bool> {
        (0..self.answered.len())
            .map(|i| self.answered[i] && self.alive[i])
            .collect()
    }

    fn next_stage(&mut self, stage: Stage, expected: Vec<bool>) {
        self.stage = stage;
        self.expected = expected;
        self.answered = vec![false; self.answered.len()];
    }

    fn close_advertise(&mut self) -> Result<Transition, ServerError> {
        let u1 = self.members();
        let need = self.ctx.threshold as usize + 1;
        if count(&u1) < need {
            return Err(ServerError::TooFewSurvivors {
                stage: Stage::AdvertiseKeys,
                have: count(&u1),
                need,
            });
        }
        let mut out = Vec::with_capacity(count(&u1));
        for u in (0..u1.len()).filter(|&u| u1[u]) {
            let keys = self.neighbours[u]
                .iter()
                .filter(|&&v| u1[v as usize])
                .filter_map(|&v| {
                    self.keys[v as usize]
                        .clone()
                        .map(|keys| PeerKeys { peer: v, keys })
                })
                .collect();
            out.push((
                self.name(u),
                ToNode::NeighbourKeys(NeighbourKeys {
                    round: self.ctx.round,
                    keys,
                }),
            ));
        }
        self.u1 = u1.clone();
        self.next_stage(Stage::ShareKeys, u1);
        Ok(Transition::Send(out))
    }

    fn close_share_keys(&mut self) -> Result<Transition, ServerError> {
        let u2 = self.members();
        let need = self.ctx.threshold as usize + 1;
        if count(&u2) < need {
            return Err(ServerError::TooFewSurvivors {
                stage: Stage::ShareKeys,
                have: count(&u2),
                need,
            });
        }
        let mut inbox: Vec<Vec<Ciphertext>> = vec![Vec::new(); u2.len()];
        for (sender, cts) in std::mem::take(&mut self.outbox).into_iter().enumerate() {
            if !u2[sender] {
                continue;
            }
            for c in cts {
                let receiver = c.peer as usize;
                if receiver < u2.len() && u2[receiver] {
                    inbox[receiver].push(Ciphertext {
                        peer: sender as u32,
                        data: c.data,
                    });
                }
            }
        }
        let mut out = Vec::with_capacity(count(&u2));
        for (v, shares) in inbox.into_iter().enumerate() {
            if u2[v] {
                out.push((
                    self.name(v),
                    ToNode::Shares(ForwardedShares {
                        round: self.ctx.round,
                        shares,
                    }),
                ));
            }
        }
        self.u2 = u2.clone();
        self.next_stage(Stage::MaskedInput, u2);
        Ok(Transition::Send(out))
    }

    fn close_masked_input(&mut self) -> Result<Transition, ServerError> {
        // Every masked input that arrived is in the sum, so its sender is a survivor even
        // if it has gone since.
        let u3 = self.answered.clone();
        let t = self.ctx.threshold as usize;
        if count(&u3) < t {
            return Err(ServerError::TooFewSurvivors {
                stage: Stage::MaskedInput,
                have: count(&u3),
                need: t,
            });
        }
        self.u3 = u3;
        let list = self.u3_list();
        let expected: Vec<bool> = (0..self.u3.len())
            .map(|i| self.u3[i] && self.alive[i])
            .collect();
        let out = (0..expected.len())
            .filter(|&i| expected[i])
            .map(|i| {
                (
                    self.name(i),
                    ToNode::Survivors(SurvivorSet {
                        round: self.ctx.round,
                        survivors: list.clone(),
                    }),
                )
            })
            .collect();
        self.next_stage(Stage::Consistency, expected);
        Ok(Transition::Send(out))
    }

    /// Dropped after sharing: their pairwise masks are in some survivor's input.
    fn dropped_after_sharing(&self) -> Vec<usize> {
        (0..self.u2.len())
            .filter(|&d| self.u2[d] && !self.u3[d])
            .filter(|&d| self.neighbours[d].iter().any(|&u| self.u3[u as usize]))
            .collect()
    }

    /// Checks that every secret unmasking needs has at least t holders among `holders`.
    fn check_holders(&self, holders: &[bool]) -> Result<(), ServerError> {
        let t = self.ctx.threshold as usize;
        let live = |w: usize| {
            self.neighbours[w]
                .iter()
                .filter(|&&v| holders[v as usize])
                .count()
        };
        for w in (0..self.u3.len()).filter(|&w| self.u3[w]) {
            if live(w) < t {
                return Err(ServerError::NotEnoughShares {
                    node: self.name(w),
                    kind: ShareKind::SelfMask,
                    have: live(w),
                    need: t,
                });
            }
        }
        for d in self.dropped_after_sharing() {
            if live(d) < t {
                return Err(ServerError::NotEnoughShares {
                    node: self.name(d),
                    kind: ShareKind::MaskKey,
                    have: live(d),
                    need: t,
                });
            }
        }
        Ok(())
    }

    fn close_consistency(&mut self) -> Result<Transition, ServerError> {
        let u4 = self.members();
        // Before asking anyone for a share: every needed secret must be recoverable from
        // the nodes still here (holders of a node's shares are its neighbours in U2; every
        // member of U4 is in U2).
        self.check_holders(&u4)?;
        let mut out = Vec::with_capacity(count(&u4));
        for u in (0..u4.len()).filter(|&u| u4[u]) {
            let signatures = self.neighbours[u]
                .iter()
                .filter(|&&v| u4[v as usize])
                .filter_map(|&v| {
                    self.signatures[v as usize]
                        .clone()
                        .map(|signature| PeerSignature { peer: v, signature })
                })
                .collect();
            let self_mask: Vec<u32> = self.neighbours[u]
                .iter()
                .copied()
                .filter(|&v| self.u3[v as usize])
                .collect();
            let mask_key: Vec<u32> = self.neighbours[u]
                .iter()
                .copied()
                .filter(|&v| self.u2[v as usize] && !self.u3[v as usize])
                .collect();
            self.requests[u] = Some((self_mask.clone(), mask_key.clone()));
            out.push((
                self.name(u),
                ToNode::Unmask(UnmaskRequest {
                    round: self.ctx.round,
                    signatures,
                    self_mask,
                    mask_key,
                }),
            ));
        }
        self.next_stage(Stage::Unmasking, u4);
        Ok(Transition::Send(out))
    }

    fn finish(&mut self) -> Result<Transition, ServerError> {
        let t = self.ctx.threshold as usize;
        let dropped = self.dropped_after_sharing();
        // Counts first: reconstruct nothing unless everything can be.
        for w in (0..self.u3.len()).filter(|&w| self.u3[w]) {
            if self.b_shares[w].len() < t {
                return Err(ServerError::NotEnoughShares {
                    node: self.name(w),
                    kind: ShareKind::SelfMask,
                    have: self.b_shares[w].len(),
                    need: t,
                });
            }
        }
        for &d in &dropped {
            if self.s_shares[d].len() < t {
                return Err(ServerError::NotEnoughShares {
                    node: self.name(d),
                    kind: ShareKind::MaskKey,
                    have: self.s_shares[d].len(),
                    need: t,
                });
            }
        }
        let mut seeds: Vec<(Zeroizing<[u8; 32]>, MaskSign)> = Vec::new();
        for w in (0..self.u3.len()).filter(|&w| self.u3[w]) {
            let name = self.name(w);
            let bad = |why: String| ServerError::Reconstruction {
                node: name.clone(),
                kind: ShareKind::SelfMask,
                why,
            };
            let b =
                Zeroizing::new(reconstruct(&self.b_shares[w], t).map_err(|e| bad(e.to_string()))?);
            let committed = self.keys[w].as_ref().map(|k| k.commitment);
            if committed != Some(commitment(&self.digest, &name, &b)) {
                return Err(bad("the seed does not match its commitment".into()));
            }
            seeds.push((self_mask_key(&self.digest, &name, &b), MaskSign::Sub));
        }
        for &d in &dropped {
            let name = self.name(d);
            let bad = |why: String| ServerError::Reconstruction {
                node: name.clone(),
                kind: ShareKind::MaskKey,
                why,
            };
            let bytes =
                Zeroizing::new(reconstruct(&self.s_shares[d], t).map_err(|e| bad(e.to_string()))?);
            let sk = StaticSecret::from(*bytes);
            let advertised = self.keys[d].as_ref().map(|k| k.s_pk);
            if advertised != Some(PublicKey::from(&sk).to_bytes()) {
                return Err(bad("the key does not match its public key".into()));
            }
            for &u in self.neighbours[d].iter().filter(|&&u| self.u3[u as usize]) {
                let u_name = self.name(u as usize);
                let shared = self.keys[u as usize]
                    .as_ref()
                    .and_then(|k| agree(&sk, &k.s_pk))
                    .ok_or_else(|| bad(format!("no usable key agreement with {u_name:?}")))?;
                let seed = pairwise_seed(&shared, &self.digest, self.ctx.round, &name, &u_name);
                // u added +PRG(s_ud) if u < d and −PRG otherwise: take it back out.
                let sign = if (u as usize) < d {
                    MaskSign::Sub
                } else {
                    MaskSign::Add
                };
                seeds.push((seed, sign));
            }
        }
        let refs: Vec<(&[u8; 32], MaskSign)> = seeds.iter().map(|(s, g)| (&**s, *g)).collect();
        let mut sum = std::mem::take(&mut self.sum);
        apply_masks(&mut sum, &refs, self.ctx.bits);
        self.phase = Phase::Finished;
        let survivors = (0..self.u3.len())
            .filter(|&w| self.u3[w])
            .map(|w| self.name(w))
            .collect();
        Ok(Transition::Done(Aggregate {
            round: self.ctx.round,
            sum,
            survivors,
        }))
    }
}
