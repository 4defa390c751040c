//! Admission control after the TLS handshake: allow- and deny-lists of node names or
//! certificate fingerprints (re-read from a file on every connection, so a revocation
//! takes effect without a restart), and a handshake rate limit.

use crate::config::AdmissionConfig;
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
}

/// Allow/deny decision for one peer.
pub fn admit(cfg: &AdmissionConfig, node: &str, fingerprint: &str) -> Result<(), AdmissionError> {
    let mut allow = cfg.allow.clone();
    let mut deny = cfg.deny.clone();
    if let Some(path) = &cfg.lists_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AdmissionError::ListsFile(format!("{}: {e}", path.display())))?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            match line.split_once(char::is_whitespace) {
                Some(("allow", v)) => allow.push(v.trim().to_string()),
                Some(("deny", v)) => deny.push(v.trim().to_string()),
                _ => {
                    return Err(AdmissionError::ListsFile(format!(
                        "cannot read line {line:?} (expected `allow NAME` or `deny NAME`)"
                    )))
                }
            }
        }
    }
    let fp = format!("sha256:{fingerprint}");
    let matches = |list: &[String]| {
        list.iter()
            .any(|e| e == node || e.eq_ignore_ascii_case(&fp))
    };
    if matches(&deny) {
        return Err(AdmissionError::Revoked(node.to_string()));
    }
    if !allow.is_empty() && !matches(&allow) {
        return Err(AdmissionError::NotAllowed(node.to_string()));
    }
    Ok(())
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
    fn rate_limiter_refills() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, t0);
        assert!(r.try_acquire(t0));
        assert!(r.try_acquire(t0));
        assert!(!r.try_acquire(t0));
        assert!(r.try_acquire(t0 + Duration::from_millis(600)));
    }
}
