//! Admission control: allow- and deny-lists of node names or certificate fingerprints
//! checked after the TLS handshake (re-read from a file on every connection and every
//! round, so a revocation takes effect without a restart, for connected nodes too),
//! identities bound to keys ([`Pins`]), a handshake rate limit, a cap on the handshakes in
//! progress from one source address ([`SourceLimiter`]), and the counters that report
//! refused attempts as one log line per interval ([`RefusalLog`]).

use crate::config::AdmissionConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Why a verified peer is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// On the deny-list (revoked).
    #[error("node {0} is revoked (deny-list)")]
    Revoked(String),
    /// Not on a non-empty allow-list.
    #[error("node {0} is not on the allow-list")]
    NotAllowed(String),
    /// The lists file could not be read.
    #[error("admission lists file: {0}")]
    ListsFile(String),
    /// The name is bound to another key.
    #[error(
        "identity {node} is bound to key sha256:{pinned}, this certificate carries key \
         sha256:{presented}; refused (rotate a key explicitly with `rekey {node} \
         sha256:<new key>` in the admission lists file)"
    )]
    KeyMismatch {
        /// Name.
        node: String,
        /// Key fingerprint the name is bound to.
        pinned: String,
        /// Key fingerprint presented.
        presented: String,
    },
    /// The identity store could not be written.
    #[error("identity store: {0}")]
    Store(String),
}

/// Allow, deny and rekey entries from the configuration and the lists file, read once.
#[derive(Debug, Clone, Default)]
pub struct Lists {
    allow: Vec<String>,
    deny: Vec<String>,
    /// Explicit key rotations: name -> new key fingerprint (hex, lowercase).
    rekey: BTreeMap<String, String>,
}

impl Lists {
    /// Reads the configuration's lists and the lists file (if any).
    pub fn load(cfg: &AdmissionConfig) -> Result<Self, AdmissionError> {
        let mut l = Lists {
            allow: cfg.allow.clone(),
            deny: cfg.deny.clone(),
            rekey: BTreeMap::new(),
        };
        if let Some(path) = &cfg.lists_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| AdmissionError::ListsFile(format!("{}: {e}", path.display())))?;
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("allow"), Some(v), None) => l.allow.push(v.to_string()),
                    (Some("deny"), Some(v), None) => l.deny.push(v.to_string()),
                    (Some("rekey"), Some(name), Some(fp)) => {
                        let hex = fp
                            .strip_prefix("sha256:")
                            .unwrap_or(fp)
                            .to_ascii_lowercase();
                        l.rekey.insert(name.to_string(), hex);
                    }
                    _ => {
                        return Err(AdmissionError::ListsFile(format!(
                            "cannot read line {line:?} (expected `allow NAME`, `deny NAME` or \
                             `rekey NAME sha256:KEY`)"
                        )))
                    }
                }
            }
        }
        Ok(l)
    }

    /// Allow/deny decision for one peer (`fingerprint`: of its certificate).
    pub fn admit(&self, node: &str, fingerprint: &str) -> Result<(), AdmissionError> {
        let fp = format!("sha256:{fingerprint}");
        let matches = |list: &[String]| {
            list.iter()
                .any(|e| e == node || e.eq_ignore_ascii_case(&fp))
        };
        if matches(&self.deny) {
            return Err(AdmissionError::Revoked(node.to_string()));
        }
        if !self.allow.is_empty() && !matches(&self.allow) {
            return Err(AdmissionError::NotAllowed(node.to_string()));
        }
        Ok(())
    }
}

/// Identities bound to keys ("trust on first use", persisted): the first public key seen
/// for a node name is that node's identity, so a second certificate with the same name
/// but another key (issued by mistake, or by a compromised operator workflow) cannot
/// impersonate it. A restarted node reconnects with the same key and is welcome; a key
/// rotation is an explicit operator action (`rekey NAME sha256:KEY` in the lists file).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Pins {
    /// name -> SHA-256 of the SubjectPublicKeyInfo, lowercase hex.
    keys: BTreeMap<String, String>,
    #[serde(skip)]
    path: Option<PathBuf>,
}

impl Pins {
    /// Loads the store at `path` (empty when it does not exist yet).
    pub fn open(path: &Path) -> Result<Self, AdmissionError> {
        let mut pins: Pins = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| AdmissionError::Store(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Pins::default(),
            Err(e) => return Err(AdmissionError::Store(format!("{}: {e}", path.display()))),
        };
        pins.path = Some(path.to_path_buf());
        Ok(pins)
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Checks `key` (SPKI fingerprint) against the name's binding, binding it on first use
    /// or when the lists carry an explicit `rekey` to exactly this key.
    pub fn check(&mut self, node: &str, key: &str, lists: &Lists) -> Result<(), AdmissionError> {
        let rotate = lists.rekey.get(node).is_some_and(|k| k == key);
        match self.keys.get(node) {
            Some(pinned) if pinned == key => return Ok(()),
            Some(pinned) if !rotate => {
                return Err(AdmissionError::KeyMismatch {
                    node: node.to_string(),
                    pinned: pinned.clone(),
                    presented: key.to_string(),
                })
            }
            _ => {}
        }
        if rotate {
            tracing::warn!(%node, key, "identity rebound to a new key (rekey entry)");
        }
        // On disk first: a binding that could not be persisted is not made.
        let mut keys = self.keys.clone();
        keys.insert(node.to_string(), key.to_string());
        self.save(&keys)?;
        self.keys = keys;
        Ok(())
    }

    fn save(&self, keys: &BTreeMap<String, String>) -> Result<(), AdmissionError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        #[derive(Serialize)]
        struct OnDisk<'a> {
            keys: &'a BTreeMap<String, String>,
        }
        let bytes = serde_json::to_vec_pretty(&OnDisk { keys })
            .map_err(|e| AdmissionError::Store(e.to_string()))?;
        crate::checkpoint::write_atomic(path, &bytes)
            .map_err(|e| AdmissionError::Store(format!("{}: {e}", path.display())))
    }
}

/// Allow/deny decision for one peer, reading the lists file now.
pub fn admit(cfg: &AdmissionConfig, node: &str, fingerprint: &str) -> Result<(), AdmissionError> {
    Lists::load(cfg)?.admit(node, fingerprint)
}

/// Token bucket limiting handshakes per second.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `per_sec` handshakes per second, bursts up to the same number.
    pub fn new(per_sec: u32, now: Instant) -> Self {
        Self {
            rate: per_sec.max(1) as f64,
            tokens: per_sec.max(1) as f64,
            last: now,
        }
    }

    /// Takes a token if one is available.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked mid-update.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Caps the handshakes in progress (TLS and hello not yet done) from one IP address, so
/// that one host with a real address cannot take every connection slot with half-open
/// handshakes. A slot is released when its [`SourceSlot`] is dropped.
#[derive(Debug)]
pub struct SourceLimiter {
    max: usize,
    in_progress: Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake in progress from an address; dropping it frees the slot.
#[derive(Debug)]
pub struct SourceSlot {
    owner: Arc<SourceLimiter>,
    ip: IpAddr,
}

impl SourceLimiter {
    /// At most `max` handshakes at once from one address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            in_progress: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip` (IPv4-mapped IPv6 counts as IPv4), or `None` when it has `max`.
    pub fn try_enter(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        let mut map = lock(&self.in_progress);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Handshakes in progress from `ip`.
    pub fn in_progress(&self, ip: IpAddr) -> usize {
        lock(&self.in_progress)
            .get(&ip.to_canonical())
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.owner.in_progress);
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Reason counted for a stateless retry (not a refusal: every new connection gets one).
pub const RETRY: &str = "retry";

/// Connection attempts turned away before a node joined, counted by reason and reported as
/// one line per interval: a flood of Initials or half-open handshakes must not become a
/// flood of log lines.
#[derive(Debug, Default)]
pub struct RefusalLog {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

/// What [`RefusalLog::take`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalSummary {
    /// Counts by reason since the previous report.
    pub counts: BTreeMap<&'static str, u64>,
    /// Attempts refused (everything but stateless retries).
    pub refused: u64,
}

impl RefusalSummary {
    /// `reason=count` pairs, in reason order.
    pub fn line(&self) -> String {
        self.counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl RefusalLog {
    /// Counts one attempt turned away for `reason`.
    pub fn count(&self, reason: &'static str) {
        *lock(&self.counts).entry(reason).or_insert(0) += 1;
    }

    /// The counts since the last call (and resets them); `None` when there were none.
    pub fn take(&self) -> Option<RefusalSummary> {
        let counts = std::mem::take(&mut *lock(&self.counts));
        if counts.is_empty() {
            return None;
        }
        let refused = counts
            .iter()
            .filter(|(k, _)| **k != RETRY)
            .map(|(_, v)| v)
            .sum();
        Some(RefusalSummary { counts, refused })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deny_beats_allow_and_fingerprints_work() {
        let cfg = AdmissionConfig {
            allow: vec!["a".into(), "sha256:ABCD".into()],
            deny: vec!["b".into()],
            ..Default::default()
        };
        assert!(admit(&cfg, "a", "00").is_ok());
        assert!(admit(&cfg, "c", "abcd").is_ok());
        assert_eq!(
            admit(&cfg, "b", "00"),
            Err(AdmissionError::Revoked("b".into()))
        );
        assert_eq!(
            admit(&cfg, "d", "00"),
            Err(AdmissionError::NotAllowed("d".into()))
        );
        assert!(admit(&AdmissionConfig::default(), "anyone", "00").is_ok());
    }

    #[test]
    fn lists_file_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lists");
        std::fs::write(&p, "# revoked\n").unwrap();
        let cfg = AdmissionConfig {
            lists_file: Some(p.clone()),
            ..Default::default()
        };
        assert!(admit(&cfg, "x", "00").is_ok());
        std::fs::write(&p, "deny x\n").unwrap();
        assert!(matches!(
            admit(&cfg, "x", "00"),
            Err(AdmissionError::Revoked(_))
        ));
        std::fs::write(&p, "nonsense\n").unwrap();
        assert!(matches!(
            admit(&cfg, "x", "00"),
            Err(AdmissionError::ListsFile(_))
        ));
    }

    #[test]
    fn a_name_is_bound_to_its_first_key_until_an_explicit_rekey() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("identities.json");
        let lists_path = dir.path().join("lists");
        std::fs::write(&lists_path, "").unwrap();
        let cfg = AdmissionConfig {
            lists_file: Some(lists_path.clone()),
            ..Default::default()
        };
        let mut pins = Pins::open(&store).unwrap();
        let lists = Lists::load(&cfg).unwrap();
        pins.check("node-1", "aaaa", &lists).unwrap();
        pins.check("node-1", "aaaa", &lists).unwrap(); // reconnection with the same key
        let e = pins.check("node-1", "bbbb", &lists).unwrap_err();
        assert!(matches!(e, AdmissionError::KeyMismatch { .. }), "{e}");
        // The binding survives a restart.
        let mut again = Pins::open(&store).unwrap();
        assert!(again.check("node-1", "bbbb", &lists).is_err());
        // Rotation is explicit, and only to the named key.
        std::fs::write(&lists_path, "rekey node-1 sha256:BBBB\n").unwrap();
        let lists = Lists::load(&cfg).unwrap();
        assert!(again.check("node-1", "cccc", &lists).is_err());
        again.check("node-1", "bbbb", &lists).unwrap();
        assert!(again.check("node-1", "aaaa", &Lists::default()).is_err());
    }

    #[test]
    fn source_limiter_caps_each_address_and_frees_slots_on_drop() {
        let l = SourceLimiter::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.try_enter(a).unwrap();
        let s2 = l.try_enter(mapped).unwrap();
        assert!(l.try_enter(a).is_none(), "mapped IPv6 is the same source");
        let s3 = l.try_enter(b).unwrap();
        assert_eq!(l.in_progress(a), 2);
        drop(s1);
        assert_eq!(l.in_progress(a), 1);
        let s4 = l.try_enter(a).unwrap();
        drop((s2, s3, s4));
        assert_eq!(l.in_progress(a), 0);
        assert!(lock(&l.in_progress).is_empty(), "no entries left behind");
    }

    #[test]
    fn refusal_log_reports_counts_once_per_take() {
        let log = RefusalLog::default();
        assert_eq!(log.take(), None);
        for _ in 0..5000 {
            log.count(RETRY);
        }
        log.count("rate_limit");
        log.count("per_source");
        log.count("rate_limit");
        let s = log.take().unwrap();
        assert_eq!(s.refused, 3);
        assert_eq!(s.line(), "per_source=1 rate_limit=2 retry=5000");
        assert_eq!(log.take(), None, "counts reset after a report");
        log.count(RETRY);
        assert_eq!(log.take().unwrap().refused, 0);
    }

    #[test]
    fn rate_limiter_refills() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, t0);
        assert!(r.try_acquire(t0));
        assert!(r.try_acquire(t0));
        assert!(!r.try_acquire(t0));
        assert!(r.try_acquire(t0 + Duration::from_millis(600)));
    }
}
