//! Crash-safe checkpoints: after every round the server writes the global model, the round
//! number, the strategy state, the privacy ledger and a fingerprint of the run
//! configuration to one file, atomically (temporary file, fsync, rename, fsync of the
//! directory). A crash leaves either the previous checkpoint or the new one, never a mix.
//!
//! File layout: `"DPFLCKPT" | json_len u64 LE | json | params (f32 LE)`.

use crate::coordinator::Snapshot;
use crate::ledger::Ledger;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"DPFLCKPT";

/// Errors reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a checkpoint, or corrupted.
    #[error("{path}: corrupted checkpoint: {what}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Written by a run with another configuration.
    #[error("{path} was written with a different configuration; resuming would mix two runs (use another out_dir, or --fresh to discard it)")]
    ConfigMismatch {
        /// File.
        path: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
struct Meta {
    config: String,
    completed_rounds: u64,
    num_params: usize,
    ledger: Ledger,
    strategy: serde_json::Value,
}

/// Writes `data` to `path` atomically.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Saves a snapshot.
pub fn save(path: &Path, config_fingerprint: &str, s: &Snapshot) -> Result<(), CheckpointError> {
    let meta = Meta {
        config: config_fingerprint.to_string(),
        completed_rounds: s.completed_rounds,
        num_params: s.global.len(),
        ledger: s.ledger.clone(),
        strategy: s.strategy.clone(),
    };
    let json = serde_json::to_vec(&meta).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(16 + json.len() + 4 * s.global.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(bytemuck::cast_slice(&s.global));
    write_atomic(path, &out).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a snapshot if the file exists; checks it belongs to this configuration.
pub fn load(path: &Path, config_fingerprint: &str) -> Result<Option<Snapshot>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |what: &str| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[8..16]);
    let json_len = u64::from_le_bytes(l) as usize;
    let json_end = 16usize
        .checked_add(json_len)
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| corrupt("truncated"))?;
    let meta: Meta =
        serde_json::from_slice(&bytes[16..json_end]).map_err(|e| corrupt(&e.to_string()))?;
    if meta.config != config_fingerprint {
        return Err(CheckpointError::ConfigMismatch {
            path: path.to_path_buf(),
        });
    }
    let params = &bytes[json_end..];
    if params.len() != meta.num_params * 4 {
        return Err(corrupt("parameter bytes do not match the recorded count"));
    }
    Ok(Some(Snapshot {
        completed_rounds: meta.completed_rounds,
        global: Arc::new(dpfl_common::wire::f32_from_le_bytes(params)),
        ledger: meta.ledger,
        strategy: meta.strategy,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpfl_common::config::DpMode;

    #[test]
    fn save_load_round_trip_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ckpt.bin");
        assert!(load(&p, "cfg").unwrap().is_none());
        let s = Snapshot {
            completed_rounds: 4,
            global: Arc::new(vec![1.0, -2.5, 3.25]),
            ledger: Ledger::new(DpMode::Central, 1e-5),
            strategy: serde_json::json!({"clip": 0.5}),
        };
        save(&p, "cfg", &s).unwrap();
        let back = load(&p, "cfg").unwrap().unwrap();
        assert_eq!(back.completed_rounds, 4);
        assert_eq!(*back.global, *s.global);
        assert_eq!(back.strategy, s.strategy);
        assert!(matches!(
            load(&p, "other"),
            Err(CheckpointError::ConfigMismatch { .. })
        ));
        // Truncation is detected, not mis-read.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        assert!(matches!(
            load(&p, "cfg"),
            Err(CheckpointError::Corrupt { .. })
        ));
        assert!(!dir.path().join("ckpt.tmp").exists());
    }
}
