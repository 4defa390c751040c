//! Data sets: loading CSV and IDX files (gzip or plain), the built-in Fashion-MNIST, and
//! deterministic shards.
//!
//! A [`Dataset`] is a dense `f32` feature matrix (row-major) with `i64` labels. Pixel
//! data from IDX files is scaled to [0, 1]; CSV features are taken as they are.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` package installs its files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Largest data set accepted from a file, in feature values (bounds allocations).
pub const MAX_VALUES: usize = 1 << 31;

/// Errors loading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not in the expected format.
    #[error("{path}: {what}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A data source string that cannot be parsed.
    #[error("unknown data source {0:?}: use fashion-mnist, fashion-mnist-test, idx:IMAGES,LABELS or csv:PATH[,label=COLUMN]")]
    Source(String),
    /// The built-in data set is not installed.
    #[error("Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with `apt-get install -y dataset-fashion-mnist` (as root)")]
    MissingFashionMnist,
    /// A shard specification that cannot be used.
    #[error("bad shard {0:?}: use i/n with 1 <= i <= n")]
    Shard(String),
    /// Labels and features disagree, or a label is negative.
    #[error("{0}")]
    Invalid(String),
}

/// A labelled data set in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major features, `len() * dim` values.
    pub features: Vec<f32>,
    /// One label per row, in `0..num_classes`.
    pub labels: Vec<i64>,
    /// Features per row.
    pub dim: usize,
}

impl Dataset {
    /// Builds and checks a data set.
    pub fn new(features: Vec<f32>, labels: Vec<i64>, dim: usize) -> Result<Self, DataError> {
        if dim == 0 || features.len() != labels.len() * dim {
            return Err(DataError::Invalid(format!(
                "{} feature values do not make {} rows of {dim}",
                features.len(),
                labels.len()
            )));
        }
        if let Some(l) = labels.iter().find(|l| **l < 0) {
            return Err(DataError::Invalid(format!("negative label {l}")));
        }
        Ok(Self {
            features,
            labels,
            dim,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Largest label + 1.
    pub fn num_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |m| *m as usize + 1)
    }

    /// The rows at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(&self.features[i * self.dim..(i + 1) * self.dim]);
            labels.push(self.labels[i]);
        }
        Dataset {
            features,
            labels,
            dim: self.dim,
        }
    }

    /// The first `n` rows (or all).
    pub fn take(&self, n: usize) -> Dataset {
        let idx: Vec<usize> = (0..n.min(self.len())).collect();
        self.subset(&idx)
    }

    /// Splits off the last `fraction` of a seeded shuffle as a validation set.
    /// With `fraction == 0` the training part is the data set unchanged (same order).
    pub fn split_validation(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        if fraction <= 0.0 {
            return (self.clone(), self.subset(&[]));
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed));
        let n_val = ((self.len() as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
        let (train, val) = idx.split_at(self.len() - n_val);
        (self.subset(train), self.subset(val))
    }
}

/// A named data source, as given on the command line or in a config file.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// Fashion-MNIST training set (60,000 images).
    FashionMnistTrain,
    /// Fashion-MNIST test set (10,000 images).
    FashionMnistTest,
    /// An IDX image file and an IDX label file.
    Idx {
        /// Images (idx3, u8).
        images: PathBuf,
        /// Labels (idx1, u8).
        labels: PathBuf,
    },
    /// A data set already in memory (simulations hand virtual clients their part).
    Memory(std::sync::Arc<Dataset>),
    /// A CSV file of numeric features and an integer label column.
    Csv {
        /// File.
        path: PathBuf,
        /// Label column: a header name or a 0-based index; default the last column.
        label: Option<String>,
    },
}

impl std::str::FromStr for DataSource {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "fashion-mnist" | "fashion-mnist-train" => return Ok(Self::FashionMnistTrain),
            "fashion-mnist-test" => return Ok(Self::FashionMnistTest),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("idx:") {
            let (images, labels) = rest
                .split_once(',')
                .ok_or_else(|| DataError::Source(s.into()))?;
            return Ok(Self::Idx {
                images: images.into(),
                labels: labels.into(),
            });
        }
        if let Some(rest) = s.strip_prefix("csv:") {
            let (path, label) = match rest.split_once(",label=") {
                Some((p, l)) => (p, Some(l.to_string())),
                None => (rest, None),
            };
            return Ok(Self::Csv {
                path: path.into(),
                label,
            });
        }
        Err(DataError::Source(s.into()))
    }
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FashionMnistTrain => write!(f, "fashion-mnist"),
            Self::FashionMnistTest => write!(f, "fashion-mnist-test"),
            Self::Idx { images, labels } => {
                write!(f, "idx:{},{}", images.display(), labels.display())
            }
            Self::Memory(d) => write!(f, "memory ({} rows)", d.len()),
            Self::Csv { path, label: None } => write!(f, "csv:{}", path.display()),
            Self::Csv {
                path,
                label: Some(l),
            } => write!(f, "csv:{},label={l}", path.display()),
        }
    }
}

impl DataSource {
    /// Loads the whole data set.
    pub fn load(&self) -> Result<Dataset, DataError> {
        match self {
            Self::FashionMnistTrain | Self::FashionMnistTest => {
                let prefix = if *self == Self::FashionMnistTrain {
                    "train"
                } else {
                    "t10k"
                };
                let dir = Path::new(FASHION_MNIST_DIR);
                let images = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
                let labels = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
                if !images.exists() || !labels.exists() {
                    return Err(DataError::MissingFashionMnist);
                }
                load_idx(&images, &labels)
            }
            Self::Idx { images, labels } => load_idx(images, labels),
            Self::Memory(d) => Ok(d.as_ref().clone()),
            Self::Csv { path, label } => load_csv(path, label.as_deref()),
        }
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_VALUES as u64 + 1024)
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn parse_idx(path: &Path, bytes: &[u8], want_dims: u8) -> Result<(Vec<usize>, usize), DataError> {
    let fmt = |what: String| DataError::Format {
        path: path.to_path_buf(),
        what,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(fmt("not an IDX file (bad magic)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(fmt(format!(
            "IDX element type {:#04x} unsupported (need unsigned byte, 0x08)",
            bytes[2]
        )));
    }
    let ndim = bytes[3];
    if ndim != want_dims {
        return Err(fmt(format!(
            "expected {want_dims} dimensions, file has {ndim}"
        )));
    }
    let header = 4 + 4 * ndim as usize;
    if bytes.len() < header {
        return Err(fmt("truncated IDX header".into()));
    }
    let dims: Vec<usize> = (0..ndim as usize)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let total = dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
    match total {
        Some(t) if t <= MAX_VALUES && bytes.len() == header + t => Ok((dims, header)),
        _ => Err(fmt(format!(
            "dimensions {dims:?} do not match {} data bytes",
            bytes.len() - header
        ))),
    }
}

/// Loads an IDX image file (u8, 3 dimensions) and label file (u8, 1 dimension).
pub fn load_idx(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let ib = read_maybe_gz(images)?;
    let lb = read_maybe_gz(labels)?;
    let (idims, ih) = parse_idx(images, &ib, 3)?;
    let (ldims, lh) = parse_idx(labels, &lb, 1)?;
    if idims[0] != ldims[0] {
        return Err(DataError::Invalid(format!(
            "{} images but {} labels",
            idims[0], ldims[0]
        )));
    }
    let dim = idims[1] * idims[2];
    let features = ib[ih..].iter().map(|b| *b as f32 / 255.0).collect();
    let labels = lb[lh..].iter().map(|b| *b as i64).collect();
    Dataset::new(features, labels, dim)
}

/// Loads a CSV file: comma-separated numbers, an optional header row, the label in the
/// column named or numbered by `label` (default: the last column).
pub fn load_csv(path: &Path, label: Option<&str>) -> Result<Dataset, DataError> {
    load_csv_grouped(path, label, None).map(|(d, _)| d)
}

/// As [`load_csv`], with one more column (named in the header) that says which client a
/// row belongs to: it is not a feature, and its values are returned per row.
pub fn load_csv_grouped(
    path: &Path,
    label: Option<&str>,
    group: Option<&str>,
) -> Result<(Dataset, Vec<String>), DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let fmt = |line: usize, what: String| DataError::Format {
        path: path.to_path_buf(),
        what: format!("line {line}: {what}"),
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, first)) = lines.next() else {
        return Err(fmt(1, "empty file".into()));
    };
    let first_cells: Vec<&str> = first.split(',').map(str::trim).collect();
    let has_header = group.is_some() || first_cells.iter().any(|c| c.parse::<f64>().is_err());
    let ncols = first_cells.len();
    if ncols < 2 {
        return Err(fmt(
            1,
            "need at least one feature column and a label column".into(),
        ));
    }
    let label_col = match label {
        None => ncols - 1,
        Some(l) => match l.parse::<usize>() {
            Ok(i) if i < ncols => i,
            _ => first_cells
                .iter()
                .position(|c| *c == l)
                .filter(|_| has_header)
                .ok_or_else(|| fmt(1, format!("label column {l:?} not found")))?,
        },
    };
    let group_col = match group {
        None => None,
        Some(g) => Some(
            first_cells
                .iter()
                .position(|c| *c == g)
                .filter(|i| *i != label_col)
                .ok_or_else(|| fmt(1, format!("client column {g:?} not found")))?,
        ),
    };
    let mut groups = Vec::new();
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let rows = std::iter::once((0, first))
        .filter(|_| !has_header)
        .chain(lines);
    for (i, line) in rows {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != ncols {
            return Err(fmt(
                i + 1,
                format!("{} columns, expected {ncols}", cells.len()),
            ));
        }
        for (c, cell) in cells.iter().enumerate() {
            if Some(c) == group_col {
                groups.push(cell.to_string());
                continue;
            }
            let v: f64 = cell
                .parse()
                .map_err(|_| fmt(i + 1, format!("{cell:?} is not a number")))?;
            if !v.is_finite() {
                return Err(fmt(i + 1, format!("{cell:?} is not finite")));
            }
            if c == label_col {
                if v.fract() != 0.0 || v < 0.0 {
                    return Err(fmt(i + 1, format!("label {cell:?} is not a class index")));
                }
                labels.push(v as i64);
            } else {
                features.push(v as f32);
            }
        }
        if features.len() > MAX_VALUES {
            return Err(fmt(i + 1, "data set too large".into()));
        }
    }
    let dim = ncols - 1 - usize::from(group_col.is_some());
    Ok((Dataset::new(features, labels, dim)?, groups))
}

/// One client's deterministic slice of a shared file: `i/n` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1-based shard index.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| DataError::Shard(s.into()))?;
        let index: usize = i.trim().parse().map_err(|_| DataError::Shard(s.into()))?;
        let count: usize = n.trim().parse().map_err(|_| DataError::Shard(s.into()))?;
        if index == 0 || count == 0 || index > count {
            return Err(DataError::Shard(s.into()));
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// Rows of shard `index` of `count` after a seeded shuffle: the shards of one seed are
    /// disjoint and cover the data set (an IID split).
    pub fn indices(&self, len: usize, seed: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..len).collect();
        idx.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed));
        let start = len * (self.index - 1) / self.count;
        let end = len * self.index / self.count;
        idx[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn csv_with_header_and_named_label() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "y,a,b\n1,0.5,2\n0,1.5,3\n").unwrap();
        let d = load_csv(&p, Some("y")).unwrap();
        assert_eq!(d.dim, 2);
        assert_eq!(d.labels, vec![1, 0]);
        assert_eq!(d.features, vec![0.5, 2.0, 1.5, 3.0]);
        let d = load_csv(&p, Some("0")).unwrap();
        assert_eq!(d.labels, vec![1, 0]);
    }

    #[test]
    fn csv_with_client_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "user,a,b,y\nalice,0.5,2,1\nbob,1.5,3,0\nalice,1,1,0\n").unwrap();
        let (d, g) = load_csv_grouped(&p, Some("y"), Some("user")).unwrap();
        assert_eq!(d.dim, 2);
        assert_eq!(g, vec!["alice", "bob", "alice"]);
        assert_eq!(d.features, vec![0.5, 2.0, 1.5, 3.0, 1.0, 1.0]);
    }

    #[test]
    fn csv_without_header_uses_last_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "0.5,2,1\n1.5,3,2\n").unwrap();
        let d = load_csv(&p, None).unwrap();
        assert_eq!(d.labels, vec![1, 2]);
        assert_eq!(d.num_classes(), 3);
    }

    #[test]
    fn csv_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "0.5,2,1\n1.5,x,2\n").unwrap();
        let e = load_csv(&p, None).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&p, "0.5,2,1\n1.5,2\n").unwrap();
        assert!(load_csv(&p, None).is_err());
        std::fs::write(&p, "0.5,2,1.5\n").unwrap();
        assert!(load_csv(&p, None).is_err());
    }

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn idx_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i.idx");
        let lab = dir.path().join("l.idx.gz");
        std::fs::write(&img, idx_bytes(&[2, 2, 2], &[0, 255, 0, 0, 51, 0, 0, 0])).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&idx_bytes(&[2], &[3, 7])).unwrap();
        std::fs::write(&lab, gz.finish().unwrap()).unwrap();
        let d = load_idx(&img, &lab).unwrap();
        assert_eq!(d.dim, 4);
        assert_eq!(d.labels, vec![3, 7]);
        assert_eq!(d.features[1], 1.0);
        assert!((d.features[4] - 0.2).abs() < 1e-6);
        // Truncated file and count mismatch are format errors, not panics.
        std::fs::write(&img, idx_bytes(&[2, 2, 2], &[0; 7])).unwrap();
        assert!(matches!(
            load_idx(&img, &lab),
            Err(DataError::Format { .. })
        ));
        std::fs::write(&img, idx_bytes(&[3, 1, 1], &[0; 3])).unwrap();
        assert!(matches!(load_idx(&img, &lab), Err(DataError::Invalid(_))));
    }

    #[test]
    fn shards_are_disjoint_and_cover() {
        let mut all: Vec<usize> = (1..=3)
            .flat_map(|i| Shard { index: i, count: 3 }.indices(100, 5))
            .collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(
            Shard { index: 2, count: 3 }.indices(100, 5),
            Shard { index: 2, count: 3 }.indices(100, 5)
        );
        assert!("0/3".parse::<Shard>().is_err());
        assert!("4/3".parse::<Shard>().is_err());
        assert_eq!("2/3".parse::<Shard>().unwrap().index, 2);
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            "fashion-mnist".parse::<DataSource>().unwrap(),
            DataSource::FashionMnistTrain
        );
        assert!(matches!(
            "csv:a.csv,label=y".parse::<DataSource>().unwrap(),
            DataSource::Csv { label: Some(_), .. }
        ));
        assert!("mnist".parse::<DataSource>().is_err());
    }
}
