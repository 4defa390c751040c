//! The privacy ledger: what every round released and what every client spent.
//!
//! Per round: mode, q, z, C, participants, and epsilon so far at the configured delta. Per
//! client: rounds joined and epsilon spent. Epsilons are recomputed from the recorded
//! rounds (never accumulated by hand), so a ledger restored from a checkpoint reports
//! exactly what an uninterrupted run would.
//!
//! What "epsilon" means per mode (DESIGN.md section 4):
//! - `central`: the federation-level guarantee for every client: the sampled Gaussian with
//!   multiplier z at rate q over all released rounds; the tighter of RDP (with
//!   amplification) and opendp zCDP (without).
//! - `local`, **against the server** (`client_epsilon`): each client's own spend over the
//!   rounds it took part in; sensitivity 2C against noise zC, i.e. multiplier z/2, no
//!   amplification (the server sees who was sampled).
//! - `local`, **aggregate view** (`epsilon`): against someone who sees only the aggregates
//!   or the final model, the sum of m noised updates carries noise z*C*sqrt(m) for
//!   sensitivity C; counted conservatively with sqrt(m - 1) (the other participants' noise
//!   only) and amplified by sampling. It assumes the other participants add their noise
//!   honestly.

use crate::strategy::{NodeId, RoundPrivacy};
use dpfl_common::config::DpMode;
use dpfl_common::dp::accountant::{self, AccountError, Method, RdpAccountant};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One round in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRound {
    /// Round number.
    pub round: u64,
    /// Mode.
    pub mode: DpMode,
    /// Sampling rate q.
    pub sampling_rate: f64,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Clipping bound C used.
    pub clip_norm: f64,
    /// Clients whose update was accepted.
    pub participants: usize,
    /// Population sampled from.
    pub population: usize,
    /// Epsilon after this round (central: federation level; local: aggregate view).
    pub epsilon: f64,
    /// Which bound gave `epsilon`.
    pub method: Method,
}

/// One client's spend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClientSpend {
    /// Rounds in which this client's update was accepted.
    pub rounds_joined: u64,
    /// Epsilon spent: local mode, against the server; central mode, the federation level.
    pub epsilon: f64,
}

/// The ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Mode of the federation.
    pub mode: DpMode,
    /// delta of every reported epsilon.
    pub delta: f64,
    /// Released rounds, in order.
    pub rounds: Vec<LedgerRound>,
    /// Per-client spend.
    pub clients: BTreeMap<NodeId, ClientSpend>,
}

/// Largest per-client epsilon in local mode (sensitivity 2C: multiplier z/2, q = 1).
pub fn local_client_epsilon(z: f64, rounds: u64, delta: f64) -> Result<f64, AccountError> {
    Ok(accountant::epsilon(1.0, z / 2.0, rounds, delta)?.0)
}

impl Ledger {
    /// An empty ledger.
    pub fn new(mode: DpMode, delta: f64) -> Self {
        Self {
            mode,
            delta,
            rounds: Vec::new(),
            clients: BTreeMap::new(),
        }
    }

    /// Epsilon so far (0 when DP is off or nothing was released).
    pub fn epsilon(&self) -> f64 {
        self.rounds.last().map_or(0.0, |r| r.epsilon)
    }

    /// Largest epsilon any single client has spent.
    pub fn max_client_epsilon(&self) -> f64 {
        self.clients.values().map(|c| c.epsilon).fold(0.0, f64::max)
    }

    /// The figure a `target_epsilon` is compared with: central, the federation epsilon;
    /// local, the largest per-client spend.
    pub fn budget_epsilon(&self) -> f64 {
        match self.mode {
            DpMode::Local => self.max_client_epsilon(),
            _ => self.epsilon(),
        }
    }

    fn round_multiplier(r: &LedgerRound) -> f64 {
        match r.mode {
            DpMode::Local => r.noise_multiplier * ((r.participants.max(2) - 1) as f64).sqrt(),
            _ => r.noise_multiplier,
        }
    }

    /// Epsilon over a list of (q, z) rounds: min of RDP and opendp zCDP.
    fn epsilon_of(steps: &[(f64, f64)], delta: f64) -> Result<(f64, Method), AccountError> {
        if steps.is_empty() {
            return Ok((0.0, Method::Rdp));
        }
        let mut groups: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for (q, z) in steps {
            *groups.entry((q.to_bits(), z.to_bits())).or_default() += 1;
        }
        let mut rdp = RdpAccountant::default();
        for ((q, z), n) in &groups {
            rdp.compose(f64::from_bits(*q), f64::from_bits(*z), *n)?;
        }
        let rdp_eps = rdp.epsilon(delta)?;
        let zs: Vec<f64> = steps.iter().map(|(_, z)| *z).collect();
        let zcdp = accountant::zcdp_epsilon(&zs, delta).unwrap_or(f64::INFINITY);
        Ok(if zcdp < rdp_eps {
            (zcdp, Method::Zcdp)
        } else {
            (rdp_eps, Method::Rdp)
        })
    }

    /// The epsilon after one more round like `p` with `participants` accepted updates,
    /// without recording it (for `target_epsilon` checks before a round starts).
    pub fn epsilon_if(&self, p: &RoundPrivacy, participants: usize) -> Result<f64, AccountError> {
        match self.mode {
            // Worst case for the budget: a client that joined every round so far joins again.
            DpMode::Local => {
                let most = self
                    .clients
                    .values()
                    .map(|c| c.rounds_joined)
                    .max()
                    .unwrap_or(0);
                local_client_epsilon(p.noise_multiplier, most + 1, self.delta)
            }
            _ => {
                let mut steps = self.steps();
                let next = Self::row(0, p, participants);
                steps.push((next.sampling_rate, Self::round_multiplier(&next)));
                Ok(Self::epsilon_of(&steps, self.delta)?.0)
            }
        }
    }

    fn steps(&self) -> Vec<(f64, f64)> {
        self.rounds
            .iter()
            .map(|r| (r.sampling_rate, Self::round_multiplier(r)))
            .collect()
    }

    fn row(round: u64, p: &RoundPrivacy, participants: usize) -> LedgerRound {
        LedgerRound {
            round,
            mode: p.mode,
            sampling_rate: p.sampling_rate,
            noise_multiplier: p.noise_multiplier,
            clip_norm: p.clip_norm,
            participants,
            population: p.population,
            epsilon: 0.0,
            method: Method::Rdp,
        }
    }

    fn push(
        &mut self,
        round: u64,
        p: &RoundPrivacy,
        participants: usize,
        joined: &[NodeId],
    ) -> Result<(), AccountError> {
        let mut row = Self::row(round, p, participants);
        let mut steps = self.steps();
        steps.push((row.sampling_rate, Self::round_multiplier(&row)));
        let (eps, method) = Self::epsilon_of(&steps, self.delta)?;
        row.epsilon = eps;
        row.method = method;
        self.rounds.push(row);
        for n in joined {
            self.clients.entry(n.clone()).or_default().rounds_joined += 1;
        }
        self.refresh_clients()
    }

    fn refresh_clients(&mut self) -> Result<(), AccountError> {
        let z = self.rounds.last().map(|r| r.noise_multiplier);
        let central = self.epsilon();
        let delta = self.delta;
        let mode = self.mode;
        // One accountant call per distinct participation count, not per client: a
        // population of thousands shares a few dozen counts.
        let mut by_count: BTreeMap<u64, f64> = BTreeMap::new();
        for c in self.clients.values_mut() {
            c.epsilon = match (mode, z) {
                (DpMode::Local, Some(z)) => match by_count.get(&c.rounds_joined) {
                    Some(e) => *e,
                    None => {
                        let e = local_client_epsilon(z, c.rounds_joined, delta)?;
                        by_count.insert(c.rounds_joined, e);
                        e
                    }
                },
                _ => central,
            };
        }
        Ok(())
    }

    /// Records a released round and the clients whose updates it used.
    pub fn record(
        &mut self,
        round: u64,
        p: &RoundPrivacy,
        joined: &[NodeId],
    ) -> Result<(), AccountError> {
        if !p.released && p.mode != DpMode::Local {
            return Ok(());
        }
        self.push(round, p, joined.len(), joined)
    }

    /// A human-readable summary for the end of a run.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "privacy ledger: mode={} delta={:e} rounds released={} ",
            self.mode,
            self.delta,
            self.rounds.len()
        );
        match self.mode {
            DpMode::Local => s.push_str(&format!(
                "| per-client epsilon against the server: max {:.4} | aggregate-view epsilon {:.4}",
                self.max_client_epsilon(),
                self.epsilon()
            )),
            _ => s.push_str(&format!("| epsilon {:.4} (every client)", self.epsilon())),
        }
        for (n, c) in &self.clients {
            s.push_str(&format!(
                "\n  {n}: rounds joined {}, epsilon {:.4}",
                c.rounds_joined, c.epsilon
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privacy(mode: DpMode, q: f64, z: f64) -> RoundPrivacy {
        RoundPrivacy {
            mode,
            sampling_rate: q,
            noise_multiplier: z,
            clip_norm: 1.0,
            clipped_fraction: None,
            population: 100,
            released: true,
        }
    }

    #[test]
    fn central_ledger_matches_the_calculator() {
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        let p = privacy(DpMode::Central, 0.1, 1.0);
        for r in 1..=10 {
            l.record(r, &p, &["a".to_string()]).unwrap();
        }
        let (calc, _) = accountant::epsilon(0.1, 1.0, 10, 1e-5).unwrap();
        assert!((l.epsilon() - calc).abs() < 1e-12);
        // Reference (q=0.1, z=1, T=10): RDP 3.442.
        assert!((l.epsilon() / 3.442 - 1.0).abs() < 0.01);
        assert_eq!(l.clients["a"].rounds_joined, 10);
        assert_eq!(l.clients["a"].epsilon, l.epsilon());
        // Epsilon grows monotonically round by round.
        assert!(l.rounds.windows(2).all(|w| w[0].epsilon < w[1].epsilon));
    }

    #[test]
    fn local_ledger_counts_each_clients_own_rounds() {
        let mut l = Ledger::new(DpMode::Local, 1e-5);
        let p = privacy(DpMode::Local, 0.5, 2.0);
        l.record(1, &p, &["a".into(), "b".into()]).unwrap();
        l.record(2, &p, &["a".into()]).unwrap();
        assert_eq!(l.clients["a"].rounds_joined, 2);
        assert_eq!(l.clients["b"].rounds_joined, 1);
        // Against the server: multiplier z/2 = 1, q = 1 -> one round is rho = 0.5, 4.728.
        assert!(
            (l.clients["b"].epsilon - 4.728).abs() < 0.01,
            "{}",
            l.clients["b"].epsilon
        );
        assert!(l.clients["a"].epsilon > l.clients["b"].epsilon);
        assert_eq!(l.budget_epsilon(), l.clients["a"].epsilon);
        // The next round's worst case is a client joining for the third time.
        let next = l.epsilon_if(&p, 2).unwrap();
        assert!((next - local_client_epsilon(2.0, 3, 1e-5).unwrap()).abs() < 1e-12);
    }

    #[test]
    fn unreleased_central_round_costs_nothing() {
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        let mut p = privacy(DpMode::Central, 0.1, 1.0);
        p.released = false;
        l.record(1, &p, &[]).unwrap();
        assert!(l.rounds.is_empty());
        assert_eq!(l.epsilon(), 0.0);
    }

    #[test]
    fn ledger_round_trips_through_json() {
        let mut l = Ledger::new(DpMode::Central, 1e-5);
        l.record(1, &privacy(DpMode::Central, 0.2, 1.5), &["x".into()])
            .unwrap();
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }
}
