//! The federation's class names (string labels), agreed at join: the server's CSV test
//! table's, else the first admitted node's list. Every later node must declare the same
//! list in the same order, or a label index would mean another class on it.
//!
//! The list is durable: it is written to `operator/classes.json` (atomically, like a
//! checkpoint) before it is kept in memory, so before the node that set it gets its
//! welcome, and a resumed server reads it back, so a restart does not let the next node
//! to join choose another list. `--fresh` sets the file aside with the run's other files.
//! The file is operator-only: a node's class names can come from its data.
//!
//! No sockets; the service calls [`FederationClasses::lock`] in its hello check.

use crate::checkpoint::write_atomic;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Where the list is kept, under the run's `operator/` folder.
pub const CLASSES_FILE: &str = "classes.json";

/// Why the class list cannot be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum ClassesError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a class list.
    #[error("{path}: not a class list ({reason}); move it aside or use --fresh")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The test table names other classes than the run recorded.
    #[error(
        "the test data's classes ({table}) are not this run's ({recorded}, recorded in \
         {path}): give the test table the same classes= list, or use --fresh"
    )]
    Conflict {
        /// The file.
        path: PathBuf,
        /// The test table's, `|`-separated.
        table: String,
        /// The recorded ones, `|`-separated.
        recorded: String,
    },
    /// A thread panicked while holding the list.
    #[error("the class list's lock is poisoned")]
    Poisoned,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassFile {
    classes: Vec<String>,
}

/// The federation's class list and the file that keeps it.
#[derive(Debug)]
pub struct FederationClasses {
    path: PathBuf,
    names: Mutex<Vec<String>>,
}

/// The list, locked: a hello is checked against it and may set it under one lock, so two
/// nodes joining at once cannot both set it.
pub struct ClassGuard<'a> {
    path: &'a Path,
    names: MutexGuard<'a, Vec<String>>,
}

fn write(path: &Path, names: &[String]) -> Result<(), ClassesError> {
    let file = ClassFile {
        classes: names.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| ClassesError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes).map_err(|source| ClassesError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<Option<Vec<String>>, ClassesError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ClassesError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let f: ClassFile = serde_json::from_slice(&bytes).map_err(|e| ClassesError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Some(f.classes))
}

impl FederationClasses {
    /// The list of a run whose file is `path`: on `resume`, the recorded one when there is
    /// one (a test table that names other classes is refused); else the test table's
    /// (`table`, empty when it names none), recorded at once when it names some.
    pub fn open(path: PathBuf, table: Vec<String>, resume: bool) -> Result<Self, ClassesError> {
        let recorded = match resume {
            true => read(&path)?.filter(|r| !r.is_empty()),
            false => None,
        };
        let names = match recorded {
            Some(r) if !table.is_empty() && r != table => {
                return Err(ClassesError::Conflict {
                    path,
                    table: table.join("|"),
                    recorded: r.join("|"),
                })
            }
            Some(r) => r,
            None => {
                if !table.is_empty() {
                    write(&path, &table)?;
                }
                table
            }
        };
        Ok(Self {
            path,
            names: Mutex::new(names),
        })
    }

    /// Locks the list.
    pub fn lock(&self) -> Result<ClassGuard<'_>, ClassesError> {
        Ok(ClassGuard {
            path: &self.path,
            names: self.names.lock().map_err(|_| ClassesError::Poisoned)?,
        })
    }
}

impl ClassGuard<'_> {
    /// The federation's classes (empty: none declared yet).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Makes `node`'s list the federation's when there is none yet (nothing when `node`
    /// names none or one is set): written to the file first, kept only once it is there.
    pub fn adopt(&mut self, node: &[String]) -> Result<(), ClassesError> {
        if !self.names.is_empty() || node.is_empty() {
            return Ok(());
        }
        write(self.path, node)?;
        *self.names = node.to_vec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split('|').map(String::from).collect()
    }

    #[test]
    fn the_first_list_is_recorded_before_it_is_kept_and_a_resume_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator").join(CLASSES_FILE);
        let c = FederationClasses::open(path.clone(), Vec::new(), true).unwrap();
        assert!(c.lock().unwrap().names().is_empty());
        assert!(!path.exists());
        // A node without names sets nothing; the first with names sets them, once.
        c.lock().unwrap().adopt(&[]).unwrap();
        assert!(!path.exists());
        c.lock().unwrap().adopt(&v("neg|pos")).unwrap();
        c.lock().unwrap().adopt(&v("pos|neg")).unwrap();
        assert_eq!(c.lock().unwrap().names(), v("neg|pos"));
        drop(c);

        // A restarted server holds the next node to the recorded list.
        let again = FederationClasses::open(path.clone(), Vec::new(), true).unwrap();
        assert_eq!(again.lock().unwrap().names(), v("neg|pos"));
        // A test table with the same list agrees; one with another list is refused,
        // naming both.
        assert!(FederationClasses::open(path.clone(), v("neg|pos"), true).is_ok());
        let e = FederationClasses::open(path.clone(), v("pos|neg"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pos|neg") && e.contains("neg|pos"), "{e}");
        // A fresh run does not read it.
        let fresh = FederationClasses::open(path.clone(), Vec::new(), false).unwrap();
        assert!(fresh.lock().unwrap().names().is_empty());
    }

    #[test]
    fn a_list_that_cannot_be_recorded_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        // The file's folder is a file: the write fails.
        std::fs::write(dir.path().join("operator"), b"").unwrap();
        let path = dir.path().join("operator").join(CLASSES_FILE);
        // (A resume cannot read it either: refused rather than taken for no list.)
        assert!(matches!(
            FederationClasses::open(path.clone(), Vec::new(), true),
            Err(ClassesError::Io { .. })
        ));
        let c = FederationClasses::open(path, Vec::new(), false).unwrap();
        assert!(matches!(
            c.lock().unwrap().adopt(&v("a|b")),
            Err(ClassesError::Io { .. })
        ));
        assert!(c.lock().unwrap().names().is_empty());
    }

    #[test]
    fn a_test_tables_list_is_recorded_and_a_corrupt_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLASSES_FILE);
        FederationClasses::open(path.clone(), v("a|b"), false).unwrap();
        assert_eq!(read(&path).unwrap(), Some(v("a|b")));
        std::fs::write(&path, b"{\"classes\": 3}").unwrap();
        assert!(matches!(
            FederationClasses::open(path, Vec::new(), true),
            Err(ClassesError::Corrupt { .. })
        ));
    }
}
