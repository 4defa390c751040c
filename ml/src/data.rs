//! Data sets: loading CSV and IDX files (gzip or plain), the built-in Fashion-MNIST, and
//! deterministic shards.
//!
//! A [`Dataset`] is a dense `f32` feature matrix (row-major) with `i64` labels. Pixel
//! data from IDX files is scaled to [0, 1]; CSV tables (`crate::csv`) are taken as they
//! are and scaled by federated standardisation.

pub use crate::csv::{CsvOptions, Table};
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
    /// One cell of a table is unusable.
    #[error("{path}: line {line}, column {column} ({name:?}): {what}")]
    Cell {
        /// File.
        path: PathBuf,
        /// 1-based line number in the file.
        line: usize,
        /// 1-based column number (options take 0-based indices: this minus one).
        column: usize,
        /// Header name of the column (`col<i>` without a header).
        name: String,
        /// What is wrong.
        what: String,
    },
    /// A data source string that cannot be parsed.
    #[error("unknown data source {0:?}: use fashion-mnist, fashion-mnist-test, idx:IMAGES,LABELS or csv:PATH[,label=COL][,features=COLS][,drop=COLS][,delimiter=C][,missing=refuse|mean][,classes=A|B][,skip=N][,header=auto|yes|no]")]
    Source(String),
    /// A `csv:` option that cannot be used.
    #[error("{0}")]
    CsvOption(String),
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
    /// A CSV table: feature and label columns, delimiter, missing values and class names
    /// as [`CsvOptions`] say.
    Csv {
        /// File.
        path: PathBuf,
        /// Columns, delimiter, missing values, classes.
        options: CsvOptions,
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
            let (path, options) = crate::csv::parse_source(rest).map_err(DataError::CsvOption)?;
            return Ok(Self::Csv { path, options });
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
            Self::Csv { path, options } => {
                write!(f, "csv:{}{}", path.display(), options.to_source_suffix())
            }
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
            Self::Csv { path, options } => Ok(crate::csv::load_table(path, options, None)?.data),
        }
    }

    /// Loads the data set with what a table knows about it: feature and class names and
    /// missing cells (empty names and no missing cells for image data).
    pub fn load_table(&self) -> Result<Table, DataError> {
        match self {
            Self::Csv { path, options } => crate::csv::load_table(path, options, None),
            other => Ok(Table {
                data: other.load()?,
                feature_names: Vec::new(),
                class_names: Vec::new(),
                groups: Vec::new(),
                missing: 0,
                labelled: true,
            }),
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

/// Loads a CSV file with default options except the label: comma-separated numbers, an
/// optional header row, the label in the column named or numbered by `label` (default:
/// the last column).
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
    let mut options = CsvOptions::default();
    if let Some(l) = label {
        options
            .parse_option("label", l)
            .map_err(DataError::CsvOption)?;
    }
    let t = crate::csv::load_table(path, &options, group)?;
    Ok((t.data, t.groups))
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
            DataSource::Csv {
                options: CsvOptions { label: Some(_), .. },
                ..
            }
        ));
        assert!("mnist".parse::<DataSource>().is_err());
    }
}
