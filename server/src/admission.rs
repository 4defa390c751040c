//! Admission control after the TLS handshake: allow- and deny-lists of node names or
//! certificate fingerprints (re-read from a file on every connection and every round, so a
//! revocation takes effect without a restart, for connected nodes too), identities bound
//! to keys ([`Pins`]), and a handshake rate limit.

use crate::config::AdmissionConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
        self.keys.insert(node.to_string(), key.to_string());
        self.save()
    }

    fn save(&self) -> Result<(), AdmissionError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| AdmissionError::Store(e.to_string()))?;
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
    fn rate_limiter_refills() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, t0);
        assert!(r.try_acquire(t0));
        assert!(r.try_acquire(t0));
        assert!(!r.try_acquire(t0));
        assert!(r.try_acquire(t0 + Duration::from_millis(600)));
    }
}
