//! Tabular CSV data: which columns are features and which is the label, delimiters,
//! RFC 4180 quotes, missing values and class names from string labels.
//!
//! Options come from the data source string (`csv:PATH,label=y,drop=id,delimiter=;`, see
//! [`CsvOptions::parse_option`]). Every error names the file, the line and, where one
//! cell is at fault, the column (1-based number, header name and 0-based index, the
//! index being what options take).
//!
//! This module does not scale features: federated standardisation (`crate::standardize`)
//! does, with statistics agreed across nodes. With `missing=mean` a missing feature is
//! kept as NaN here and replaced by the (federated) mean when the transform is applied.

use crate::data::{DataError, Dataset, MAX_VALUES};
use std::path::{Path, PathBuf};

/// Largest CSV file read, in bytes (bounds the allocation before parsing).
pub const MAX_CSV_BYTES: u64 = 4 << 30;

/// Most distinct class names a file may define.
pub const MAX_CLASSES: usize = 1024;

/// Cells read as a missing value.
pub const MISSING_TOKENS: [&str; 7] = ["", "NA", "N/A", "NaN", "nan", "null", "?"];

/// One column, or a range of columns, named in an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnSel {
    /// A header name.
    Name(String),
    /// A 0-based index.
    Index(usize),
    /// 0-based indices `start..end` (`end` excluded).
    Range(usize, usize),
}

impl ColumnSel {
    fn parse(s: &str) -> Self {
        if let Ok(i) = s.parse::<usize>() {
            return Self::Index(i);
        }
        if let Some((a, b)) = s.split_once("..") {
            if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                return Self::Range(a, b);
            }
        }
        Self::Name(s.to_string())
    }
}

impl std::fmt::Display for ColumnSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(n) => write!(f, "{n}"),
            Self::Index(i) => write!(f, "{i}"),
            Self::Range(a, b) => write!(f, "{a}..{b}"),
        }
    }
}

/// What to do with a missing feature value (see [`MISSING_TOKENS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingPolicy {
    /// Refuse the file, naming line and column (default).
    #[default]
    Refuse,
    /// Keep the cell as NaN; federated standardisation replaces it with the federated
    /// mean of its column. A missing label is always refused.
    Mean,
}

/// Whether the first (non-skipped) row is a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Header {
    /// A header when a cell of the first row is neither a number nor a missing value.
    #[default]
    Auto,
    /// Always.
    Yes,
    /// Never.
    No,
}

/// How to read a CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// Label column (default: the last).
    pub label: Option<ColumnSel>,
    /// No label column (`label=none`: data to predict; every label reads 0).
    pub unlabeled: bool,
    /// Feature columns, in this order (default: every column but the label, the dropped
    /// ones and the client column).
    pub features: Option<Vec<ColumnSel>>,
    /// Columns that are neither features nor label (IDs, dates).
    pub drop: Vec<ColumnSel>,
    /// Cell separator.
    pub delimiter: u8,
    /// Missing feature values.
    pub missing: MissingPolicy,
    /// Class names in class-index order. Labels may then be names or indices. Without
    /// it, labels must be integer class indices: string labels are refused, since the
    /// names found in one node's file need not be those of another's.
    pub classes: Option<Vec<String>>,
    /// Leading lines skipped before the header or the first row.
    pub skip: usize,
    /// Header row.
    pub header: Header,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            label: None,
            unlabeled: false,
            features: None,
            drop: Vec::new(),
            delimiter: b',',
            missing: MissingPolicy::Refuse,
            classes: None,
            skip: 0,
            header: Header::Auto,
        }
    }
}

fn list(v: &str) -> Vec<ColumnSel> {
    v.split('|')
        .filter(|s| !s.is_empty())
        .map(ColumnSel::parse)
        .collect()
}

impl CsvOptions {
    /// Applies one `key=value` option of a `csv:` data source. Lists are separated by `|`;
    /// a column is a header name, a 0-based index or a range `a..b` (b excluded).
    ///
    /// `label=COL`, `features=COLS`, `drop=COLS`, `delimiter=,|;|tab|semicolon|comma|pipe`
    /// (or any one ASCII character), `missing=refuse|mean`, `classes=A|B|...`, `skip=N`,
    /// `header=auto|yes|no`.
    pub fn parse_option(&mut self, key: &str, value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Err(format!("csv option {key}= has no value"));
        }
        match key {
            "label" if value == "none" => {
                self.unlabeled = true;
                self.label = None;
            }
            "label" => {
                self.unlabeled = false;
                self.label = Some(ColumnSel::parse(value));
            }
            "features" => self.features = Some(list(value)),
            "drop" => self.drop.extend(list(value)),
            "delimiter" | "sep" => {
                self.delimiter = match value {
                    "tab" | "\\t" => b'\t',
                    "semicolon" => b';',
                    "comma" => b',',
                    "pipe" => b'|',
                    "space" => b' ',
                    v if v.len() == 1 && v.is_ascii() && v != "\"" => v.as_bytes()[0],
                    v => return Err(format!("delimiter {v:?}: use one ASCII character other than a quote, tab or semicolon")),
                }
            }
            "missing" => {
                self.missing = match value {
                    "refuse" => MissingPolicy::Refuse,
                    "mean" => MissingPolicy::Mean,
                    v => return Err(format!("missing={v:?}: use refuse or mean")),
                }
            }
            "classes" => {
                let names: Vec<String> = value.split('|').map(str::to_string).collect();
                let mut sorted = names.clone();
                sorted.sort();
                sorted.dedup();
                if names.len() < 2 || sorted.len() != names.len() || names.iter().any(String::is_empty) {
                    return Err(format!("classes={value:?}: name at least two distinct, non-empty classes, separated by |"));
                }
                if names.len() > MAX_CLASSES {
                    return Err(format!("classes: more than {MAX_CLASSES} names"));
                }
                self.classes = Some(names);
            }
            "skip" => {
                self.skip = value
                    .parse()
                    .map_err(|_| format!("skip={value:?}: expected a number of lines"))?
            }
            "header" => {
                self.header = match value {
                    "auto" => Header::Auto,
                    "yes" | "true" => Header::Yes,
                    "no" | "false" => Header::No,
                    v => return Err(format!("header={v:?}: use auto, yes or no")),
                }
            }
            k => {
                return Err(format!(
                    "unknown csv option {k:?}: use label, features, drop, delimiter, missing, classes, skip or header"
                ))
            }
        }
        Ok(())
    }

    /// The options as they are written in a data source string (after `csv:PATH`).
    pub fn to_source_suffix(&self) -> String {
        let join = |v: &[ColumnSel]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("|")
        };
        let mut s = String::new();
        if let Some(l) = &self.label {
            s += &format!(",label={l}");
        }
        if self.unlabeled {
            s += ",label=none";
        }
        if let Some(f) = &self.features {
            s += &format!(",features={}", join(f));
        }
        if !self.drop.is_empty() {
            s += &format!(",drop={}", join(&self.drop));
        }
        if self.delimiter != b',' {
            match self.delimiter {
                b'\t' => s += ",delimiter=tab",
                b';' => s += ",delimiter=semicolon",
                d => s += &format!(",delimiter={}", d as char),
            }
        }
        if self.missing == MissingPolicy::Mean {
            s += ",missing=mean";
        }
        if let Some(c) = &self.classes {
            s += &format!(",classes={}", c.join("|"));
        }
        if self.skip > 0 {
            s += &format!(",skip={}", self.skip);
        }
        match self.header {
            Header::Auto => {}
            Header::Yes => s += ",header=yes",
            Header::No => s += ",header=no",
        }
        s
    }
}

/// A table read from a CSV file.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Features and labels. With `missing=mean`, missing features are NaN.
    pub data: Dataset,
    /// Feature names (header names, or `col<i>` without a header), in feature order.
    pub feature_names: Vec<String>,
    /// Class names in class-index order; empty when labels are integer indices.
    pub class_names: Vec<String>,
    /// Values of the client column, one per row, when one was asked for.
    pub groups: Vec<String>,
    /// Number of missing feature cells (NaN in `data`).
    pub missing: usize,
    /// Whether the file has a label column (`label=none`: every label is 0).
    pub labelled: bool,
}

/// A parse error at a cell.
struct CellError {
    column: usize,
    what: String,
}

/// Splits one line into cells: RFC 4180 quotes (`"a,b"`, `""` for a quote inside), cells
/// trimmed of spaces outside quotes. A quote left open at the end of the line is an error
/// (fields spanning lines are not supported).
fn split_line(line: &str, delim: u8) -> Result<Vec<String>, CellError> {
    let bytes = line.as_bytes();
    let mut cells = Vec::new();
    let mut cell: Vec<u8> = Vec::new();
    let mut i = 0;
    let mut quoted = false;
    let mut was_quoted = false;
    let mut quote_open_col = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if quoted {
            if b == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    cell.push(b'"');
                    i += 1;
                } else {
                    quoted = false;
                }
            } else {
                cell.push(b);
            }
        } else if b == delim {
            cells.push(finish_cell(&cell, was_quoted));
            cell.clear();
            was_quoted = false;
        } else if b == b'"' {
            if cell.iter().any(|c| !c.is_ascii_whitespace()) || was_quoted {
                return Err(CellError {
                    column: cells.len(),
                    what: "a quote inside an unquoted cell (quote the whole cell and double inner quotes)".into(),
                });
            }
            cell.clear();
            quoted = true;
            was_quoted = true;
            quote_open_col = cells.len();
        } else {
            if was_quoted && !b.is_ascii_whitespace() {
                return Err(CellError {
                    column: cells.len(),
                    what: "text after the closing quote".into(),
                });
            }
            if !was_quoted {
                cell.push(b);
            }
        }
        i += 1;
    }
    if quoted {
        return Err(CellError {
            column: quote_open_col,
            what: "quote not closed on this line (cells spanning lines are not supported)".into(),
        });
    }
    cells.push(finish_cell(&cell, was_quoted));
    Ok(cells)
}

fn finish_cell(cell: &[u8], quoted: bool) -> String {
    let s = String::from_utf8_lossy(cell);
    if quoted {
        s.into_owned()
    } else {
        s.trim().to_string()
    }
}

fn is_missing(cell: &str) -> bool {
    MISSING_TOKENS.contains(&cell)
}

/// Reads a CSV file as `opts` say; `group` names a client column (natural partitions):
/// neither feature nor label, its values are returned per row.
pub fn load_table(path: &Path, opts: &CsvOptions, group: Option<&str>) -> Result<Table, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_CSV_BYTES {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            what: format!("{len} bytes, more than the limit of {MAX_CSV_BYTES}"),
        });
    }
    let raw = std::fs::read(path).map_err(io)?;
    let text = match std::str::from_utf8(&raw) {
        Ok(t) => t,
        Err(e) => {
            let line = raw[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            return Err(DataError::Format {
                path: path.to_path_buf(),
                what: format!("line {line}: not UTF-8 text"),
            });
        }
    };
    parse_table(
        path,
        text.strip_prefix('\u{feff}').unwrap_or(text),
        opts,
        group,
    )
}

struct Ctx<'a> {
    path: &'a Path,
    names: Vec<String>,
}

impl Ctx<'_> {
    fn line(&self, line: usize, what: impl Into<String>) -> DataError {
        DataError::Format {
            path: self.path.to_path_buf(),
            what: format!("line {line}: {}", what.into()),
        }
    }
    fn cell(&self, line: usize, col: usize, what: impl Into<String>) -> DataError {
        DataError::Cell {
            path: self.path.to_path_buf(),
            line,
            column: col + 1,
            name: self.names.get(col).cloned().unwrap_or_default(),
            what: what.into(),
        }
    }
    /// Resolves a selection to 0-based column indices, in order.
    fn resolve(
        &self,
        sel: &ColumnSel,
        ncols: usize,
        header_line: usize,
        has_header: bool,
        role: &str,
    ) -> Result<Vec<usize>, DataError> {
        match sel {
            ColumnSel::Index(i) if *i < ncols => Ok(vec![*i]),
            ColumnSel::Index(i) => Err(self.line(
                header_line,
                format!("{role} column index {i} out of range: the file has {ncols} columns (indices 0..{ncols})"),
            )),
            ColumnSel::Range(a, b) if a < b && *b <= ncols => Ok((*a..*b).collect()),
            ColumnSel::Range(a, b) => Err(self.line(
                header_line,
                format!("{role} columns {a}..{b}: the file has {ncols} columns (indices 0..{ncols})"),
            )),
            ColumnSel::Name(n) if !has_header => Err(self.line(
                header_line,
                format!("{role} column {n:?} named, but the file has no header row (use 0-based indices or header=yes)"),
            )),
            ColumnSel::Name(n) => {
                let hits: Vec<usize> = (0..ncols).filter(|i| self.names[*i] == *n).collect();
                match hits.as_slice() {
                    [i] => Ok(vec![*i]),
                    [] => Err(self.line(
                        header_line,
                        format!("no {role} column named {n:?}; the header has {}", preview(&self.names)),
                    )),
                    _ => Err(self.line(
                        header_line,
                        format!("{role} column name {n:?} appears {} times in the header; use its index", hits.len()),
                    )),
                }
            }
        }
    }
}

fn preview(names: &[String]) -> String {
    let shown: Vec<String> = names.iter().take(12).map(|n| format!("{n:?}")).collect();
    if names.len() > 12 {
        format!("{}, ... ({} columns)", shown.join(", "), names.len())
    } else {
        shown.join(", ")
    }
}

fn parse_table(
    path: &Path,
    text: &str,
    opts: &CsvOptions,
    group: Option<&str>,
) -> Result<Table, DataError> {
    let mut ctx = Ctx {
        path,
        names: Vec::new(),
    };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .skip(opts.skip)
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((first_no, first)) = lines.next() else {
        return Err(ctx.line(opts.skip + 1, "no rows"));
    };
    let first_cells =
        split_line(first, opts.delimiter).map_err(|e| ctx.cell(first_no, e.column, e.what))?;
    let ncols = first_cells.len();
    let names_needed = group.is_some()
        || matches!(opts.label, Some(ColumnSel::Name(_)))
        || opts
            .drop
            .iter()
            .chain(opts.features.iter().flatten())
            .any(|c| matches!(c, ColumnSel::Name(_)));
    let has_header = match opts.header {
        Header::Yes => true,
        Header::No => false,
        Header::Auto => {
            names_needed
                || first_cells
                    .iter()
                    .any(|c| !is_missing(c) && c.parse::<f64>().is_err())
        }
    };
    ctx.names = if has_header {
        first_cells.clone()
    } else {
        (0..ncols).map(|i| format!("col{i}")).collect()
    };
    if ncols < 2 - usize::from(opts.unlabeled) {
        let hint = if opts.delimiter == b',' && first.contains(';') {
            " (the line holds `;`: add delimiter=semicolon)"
        } else if opts.delimiter == b',' && first.contains('\t') {
            " (the line holds tabs: add delimiter=tab)"
        } else {
            ""
        };
        return Err(ctx.line(
            first_no,
            format!(
                "one column with delimiter {:?}; need at least one feature and a label{hint}",
                opts.delimiter as char
            ),
        ));
    }
    let label_col = match &opts.label {
        _ if opts.unlabeled => usize::MAX,
        None => ncols - 1,
        Some(sel) => match ctx
            .resolve(sel, ncols, first_no, has_header, "label")?
            .as_slice()
        {
            [i] => *i,
            _ => return Err(ctx.line(first_no, "the label is one column, not a range")),
        },
    };
    let group_col = match group {
        None => None,
        Some(g) => {
            let i = ctx.resolve(
                &ColumnSel::Name(g.into()),
                ncols,
                first_no,
                has_header,
                "client",
            )?[0];
            if i == label_col {
                return Err(ctx.line(first_no, format!("client column {g:?} is the label column")));
            }
            Some(i)
        }
    };
    let mut dropped = vec![false; ncols];
    for sel in &opts.drop {
        for i in ctx.resolve(sel, ncols, first_no, has_header, "dropped")? {
            if i == label_col {
                return Err(ctx.line(
                    first_no,
                    format!("dropped column {sel} is the label column"),
                ));
            }
            dropped[i] = true;
        }
    }
    let feature_cols: Vec<usize> = match &opts.features {
        None => (0..ncols)
            .filter(|i| *i != label_col && Some(*i) != group_col && !dropped[*i])
            .collect(),
        Some(sels) => {
            let mut cols = Vec::new();
            for sel in sels {
                for i in ctx.resolve(sel, ncols, first_no, has_header, "feature")? {
                    if i == label_col || Some(i) == group_col {
                        return Err(ctx.line(
                            first_no,
                            format!("feature column {sel} is also the label or client column"),
                        ));
                    }
                    if !dropped[i] {
                        if cols.contains(&i) {
                            return Err(ctx.line(
                                first_no,
                                format!("feature column {} selected twice", ctx.names[i]),
                            ));
                        }
                        cols.push(i);
                    }
                }
            }
            cols
        }
    };
    if feature_cols.is_empty() {
        return Err(ctx.line(first_no, "no feature columns left"));
    }
    let rows: Box<dyn Iterator<Item = (usize, &str)>> = if has_header {
        Box::new(lines)
    } else {
        Box::new(std::iter::once((first_no, first)).chain(lines))
    };
    let mut features = Vec::new();
    let mut label_cells: Vec<(usize, String)> = Vec::new();
    let mut groups = Vec::new();
    let mut missing = 0usize;
    for (line_no, line) in rows {
        let cells =
            split_line(line, opts.delimiter).map_err(|e| ctx.cell(line_no, e.column, e.what))?;
        if cells.len() != ncols {
            return Err(ctx.line(
                line_no,
                format!(
                    "{} columns, expected {ncols} as on line {first_no}",
                    cells.len()
                ),
            ));
        }
        for &c in &feature_cols {
            let cell = &cells[c];
            if is_missing(cell) {
                match opts.missing {
                    MissingPolicy::Refuse => {
                        return Err(ctx.cell(line_no, c, format!("missing value {cell:?} (add missing=mean to impute the federated mean)")))
                    }
                    MissingPolicy::Mean => {
                        missing += 1;
                        features.push(f32::NAN);
                        continue;
                    }
                }
            }
            let v: f64 = cell.parse().map_err(|_| {
                ctx.cell(line_no, c, format!("{cell:?} is not a number (drop the column with drop={} or choose features=...)", ctx.names[c]))
            })?;
            if !v.is_finite() || v.abs() > f32::MAX as f64 {
                return Err(ctx.cell(line_no, c, format!("{cell:?} is not a finite f32")));
            }
            features.push(v as f32);
        }
        if opts.unlabeled {
            label_cells.push((line_no, "0".into()));
            if let Some(g) = group_col {
                groups.push(cells[g].clone());
            }
            continue;
        }
        let lab = &cells[label_col];
        if is_missing(lab) {
            return Err(ctx.cell(
                line_no,
                label_col,
                "missing label (rows without a label cannot be used)",
            ));
        }
        label_cells.push((line_no, lab.clone()));
        if let Some(g) = group_col {
            groups.push(cells[g].clone());
        }
        if features.len() > MAX_VALUES {
            return Err(ctx.line(line_no, "data set too large"));
        }
    }
    if label_cells.is_empty() {
        return Err(ctx.line(first_no, "no data rows"));
    }
    let (labels, class_names) = if opts.unlabeled {
        (
            vec![0; label_cells.len()],
            opts.classes.clone().unwrap_or_default(),
        )
    } else {
        labels(&ctx, label_col, &label_cells, opts.classes.as_deref())?
    };
    let data = Dataset::new(features, labels, feature_cols.len())?;
    Ok(Table {
        data,
        feature_names: feature_cols.iter().map(|i| ctx.names[*i].clone()).collect(),
        class_names,
        groups,
        missing,
        labelled: !opts.unlabeled,
    })
}

fn as_index(cell: &str) -> Option<i64> {
    let v: f64 = cell.parse().ok()?;
    (v.is_finite() && v.fract() == 0.0 && v >= 0.0 && v < i64::MAX as f64).then_some(v as i64)
}

fn labels(
    ctx: &Ctx<'_>,
    col: usize,
    cells: &[(usize, String)],
    classes: Option<&[String]>,
) -> Result<(Vec<i64>, Vec<String>), DataError> {
    if let Some(names) = classes {
        let mut out = Vec::with_capacity(cells.len());
        for (line, c) in cells {
            let i = match names.iter().position(|n| n == c) {
                Some(i) => i as i64,
                None => match as_index(c) {
                    Some(i) if (i as usize) < names.len() => i,
                    _ => {
                        return Err(ctx.cell(
                            *line,
                            col,
                            format!("label {c:?} is none of the classes {}", names.join("|")),
                        ))
                    }
                },
            };
            out.push(i);
        }
        return Ok((out, names.to_vec()));
    }
    // String labels need the class list: numbering the names found in one file would
    // number them differently on a node that lacks a class (a label-skewed split).
    if let Some((line, c)) = cells.iter().find(|(_, c)| c.parse::<f64>().is_err()) {
        return Err(ctx.cell(
            *line,
            col,
            format!(
                "label {c:?} is a name: list the classes with classes=A|B|... (the same list, \
                 in the same order, on every node, so that every node numbers them alike)"
            ),
        ));
    }
    let mut out = Vec::with_capacity(cells.len());
    for (line, c) in cells {
        match as_index(c) {
            Some(i) if (i as usize) < MAX_CLASSES => out.push(i),
            _ => {
                return Err(ctx.cell(
                    *line,
                    col,
                    format!("label {c:?} is not a class index 0..{MAX_CLASSES} (string labels: name the classes with classes=A|B|...)"),
                ))
            }
        }
    }
    Ok((out, Vec::new()))
}

/// Splits `PATH,key=value,...` into the path and options.
pub fn parse_source(rest: &str) -> Result<(PathBuf, CsvOptions), String> {
    let mut opts = CsvOptions::default();
    // The path ends at the first `,key=` whose key is an option name.
    let keys = [
        "label",
        "features",
        "drop",
        "delimiter",
        "sep",
        "missing",
        "classes",
        "skip",
        "header",
    ];
    let mut path_end = rest.len();
    for (i, _) in rest.match_indices(',') {
        let tail = &rest[i + 1..];
        if let Some((k, _)) = tail.split_once('=') {
            if keys.contains(&k) || (!k.contains(',') && !k.contains('/') && !k.is_empty()) {
                path_end = i;
                break;
            }
        }
    }
    let path = &rest[..path_end];
    if path.is_empty() {
        return Err("csv: needs a path".into());
    }
    if path_end < rest.len() {
        // Options are separated by commas; a value never holds a comma, except
        // `delimiter=,` which is the default.
        let mut parts = rest[path_end + 1..].split(',').peekable();
        while let Some(part) = parts.next() {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("csv option {part:?}: expected key=value"))?;
            let v = if (k == "delimiter" || k == "sep") && v.is_empty() && parts.peek() == Some(&"")
            {
                parts.next();
                "comma"
            } else {
                v
            };
            opts.parse_option(k, v)?;
        }
    }
    Ok((path.into(), opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    fn load(text: &str, opts: &str) -> Result<Table, String> {
        let (_d, p) = write(text);
        let (_, o) = parse_source(&format!("{},{opts}", p.display()))?;
        load_table(&p, &o, None).map_err(|e| e.to_string())
    }

    fn load_err(text: &str, opts: &str) -> String {
        let (_d, p) = write(text);
        let src = if opts.is_empty() {
            format!("{}", p.display())
        } else {
            format!("{},{opts}", p.display())
        };
        let (_, o) = parse_source(&src).unwrap();
        let e = load_table(&p, &o, None).unwrap_err().to_string();
        assert!(e.contains("t.csv"), "error names no file: {e}");
        e
    }

    #[test]
    fn features_label_and_drop_by_name_and_index() {
        let text = "id,age,score,y\nP1,30,1.5,yes\nP2,40,2.5,no\n";
        let t = load(text, "label=y,drop=id,classes=no|yes").unwrap();
        assert_eq!(t.feature_names, vec!["age", "score"]);
        assert_eq!(t.data.features, vec![30.0, 1.5, 40.0, 2.5]);
        assert_eq!(t.class_names, vec!["no", "yes"]);
        assert_eq!(t.data.labels, vec![1, 0]);
        let t = load(text, "label=3,features=2|1,classes=yes|no").unwrap();
        assert_eq!(t.feature_names, vec!["score", "age"]);
        assert_eq!(t.data.features, vec![1.5, 30.0, 2.5, 40.0]);
        assert_eq!(t.data.labels, vec![0, 1]);
        let t = load(text, "label=y,features=1..3,classes=no|yes").unwrap();
        assert_eq!(t.data.dim, 2);
        assert_eq!(t.data.labels, vec![1, 0]);
    }

    #[test]
    fn semicolon_delimiter_and_quotes() {
        let e = load_err("a;b;y\n1;2;0\n", "");
        assert!(e.contains("delimiter=semicolon"), "{e}");
        let t = load("\"a;x\";b;y\n1;2;0\n3;\"4\";1\n", "delimiter=semicolon").unwrap();
        assert_eq!(t.feature_names, vec!["a;x", "b"]);
        assert_eq!(t.data.features, vec![1.0, 2.0, 3.0, 4.0]);
        let t = load("\"a,b\",c,y\n\"1\",2,0\n", "").unwrap();
        assert_eq!(t.feature_names, vec!["a,b", "c"]);
    }

    #[test]
    fn quoted_delimiter_inside_cell() {
        let cells = split_line("\"Doe, J\",\"say \"\"hi\"\"\", 3 ", b',')
            .ok()
            .unwrap();
        assert_eq!(cells, vec!["Doe, J", "say \"hi\"", "3"]);
    }

    #[test]
    fn error_unclosed_quote_names_line_and_column() {
        let e = load_err("a,b,y\n1,\"2,0\n", "");
        assert!(e.contains("line 2") && e.contains("column 2"), "{e}");
    }

    #[test]
    fn error_text_after_quote_names_column() {
        let e = load_err("a,b,y\n1,\"2\"x,0\n", "");
        assert!(
            e.contains("line 2") && e.contains("column 2") && e.contains("closing quote"),
            "{e}"
        );
    }

    #[test]
    fn error_not_a_number_names_line_and_column() {
        let e = load_err("id,a,y\nP00001,1,0\nP00002,2,1\n", "");
        assert!(
            e.contains("line 2")
                && e.contains("column 1")
                && e.contains("\"id\"")
                && e.contains("drop=id"),
            "{e}"
        );
    }

    #[test]
    fn error_missing_value_refused_names_line_and_column() {
        let e = load_err("a,b,y\n1,2,0\n3,NA,1\n", "");
        assert!(
            e.contains("line 3")
                && e.contains("column 2")
                && e.contains("\"b\"")
                && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn missing_mean_keeps_nan() {
        let t = load("a,b,y\n1,2,0\n3,,1\n", "missing=mean").unwrap();
        assert_eq!(t.missing, 1);
        assert!(t.data.features[3].is_nan());
    }

    #[test]
    fn error_missing_label_names_line_and_column() {
        let e = load_err("a,b,y\n1,2,0\n3,4,\n", "missing=mean");
        assert!(
            e.contains("line 3") && e.contains("column 3") && e.contains("missing label"),
            "{e}"
        );
    }

    #[test]
    fn error_wrong_column_count_names_line() {
        let e = load_err("a,b,y\n1,2,0\n3,1\n", "");
        assert!(
            e.contains("line 3") && e.contains("2 columns, expected 3"),
            "{e}"
        );
    }

    #[test]
    fn error_unknown_label_name_names_header_line() {
        let e = load_err("a,b,y\n1,2,0\n", "label=diagnosis");
        assert!(
            e.contains("line 1") && e.contains("no label column named \"diagnosis\""),
            "{e}"
        );
    }

    #[test]
    fn error_index_out_of_range() {
        let e = load_err("a,b,y\n1,2,0\n", "drop=7");
        assert!(
            e.contains("line 1") && e.contains("index 7 out of range"),
            "{e}"
        );
    }

    #[test]
    fn error_label_not_a_class_names_column() {
        let e = load_err("a,y\n1,0\n2,1.5\n", "");
        assert!(
            e.contains("line 3") && e.contains("column 2") && e.contains("\"y\""),
            "{e}"
        );
        let e = load_err("a,y\n1,cat\n2,dog\n3,bird\n", "classes=cat|dog");
        assert!(
            e.contains("line 4") && e.contains("column 2") && e.contains("none of the classes"),
            "{e}"
        );
    }

    #[test]
    fn error_string_labels_without_class_list() {
        let e = load_err("a,y\n1,0\n2,benign\n", "");
        assert!(
            e.contains("line 3") && e.contains("column 2") && e.contains("classes="),
            "{e}"
        );
        let e = load_err("a,y\n1,malignant\n2,benign\n", "");
        assert!(
            e.contains("line 2") && e.contains("\"malignant\" is a name"),
            "{e}"
        );
    }

    #[test]
    fn error_not_finite_names_column() {
        let e = load_err("a,b,y\n1,inf,0\n", "");
        assert!(
            e.contains("line 2") && e.contains("column 2") && e.contains("finite"),
            "{e}"
        );
    }

    #[test]
    fn error_name_without_header() {
        let e = load_err("1,2,0\n3,4,1\n", "header=no,label=y");
        assert!(e.contains("line 1") && e.contains("no header row"), "{e}");
    }

    #[test]
    fn error_not_utf8_names_line() {
        let (_d, p) = write("a,y\n1,0\n");
        std::fs::write(&p, b"a,y\n1,0\n\xff,1\n").unwrap();
        let e = load_table(&p, &CsvOptions::default(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.csv") && e.contains("line 3") && e.contains("UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn skip_lines_and_sklearn_count_header() {
        // scikit-learn's breast_cancer.csv: a first row of counts and class names.
        let t = load(
            "3,2,malignant,benign\n1.0,2.0,0\n3.0,4.0,1\n5,6,1\n",
            "skip=1,header=no,classes=malignant|benign",
        )
        .unwrap();
        assert_eq!(t.data.len(), 3);
        assert_eq!(t.data.dim, 2);
        assert_eq!(t.data.labels, vec![0, 1, 1]);
        assert_eq!(t.class_names, vec!["malignant", "benign"]);
    }

    #[test]
    fn unlabelled_data_for_prediction() {
        let t = load("a,b\n1,2\n3,4\n", "label=none").unwrap();
        assert!(!t.labelled);
        assert_eq!(t.data.dim, 2);
        assert_eq!(t.data.labels, vec![0, 0]);
    }

    #[test]
    fn option_errors() {
        let mut o = CsvOptions::default();
        assert!(o.parse_option("delimiter", "::").is_err());
        assert!(o.parse_option("missing", "zero").is_err());
        assert!(o.parse_option("classes", "a|a").is_err());
        assert!(o.parse_option("colour", "red").is_err());
        assert!(parse_source("x.csv,label=").is_err());
        assert!(parse_source("x.csv,colour=red").is_err());
        let (p, o) = parse_source("/d/x.csv,label=y,delimiter=tab,drop=id|2..4").unwrap();
        assert_eq!(p, PathBuf::from("/d/x.csv"));
        assert_eq!(o.delimiter, b'\t');
        assert_eq!(
            o.drop,
            vec![ColumnSel::Name("id".into()), ColumnSel::Range(2, 4)]
        );
        let again = parse_source(&format!("/d/x.csv{}", o.to_source_suffix()))
            .unwrap()
            .1;
        assert_eq!(again, o);
    }
}
