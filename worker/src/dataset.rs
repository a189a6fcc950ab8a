//! A hospital's local tabular dataset, read and encoded into model inputs.
//!
//! This is the one place where patient rows are read: [`load`] parses a CSV
//! file (plain or gzip-compressed), checks every row against a job's
//! [`FeatureSpec`], splits the rows into train and test sets
//! ([`SplitOptions`]) and encodes them as row-major `f32` features and
//! `0`/`1` labels ([`EncodedDataset`]); [`count_split`] counts the two
//! splits without a spec, for the dataset's size release. Nothing here
//! sends anything anywhere; only DP releases computed on the result leave
//! the site.
//!
//! Which split a record lands in depends on that record alone: a keyed
//! hash of its fields decides. The DP guarantees of everything released
//! from either split are for one record added or removed; a shuffle of
//! all rows would let one record move every other record across the split,
//! and the training sets of neighbouring datasets would differ in many.
//!
//! Every site of a job receives the same [`FeatureSpec`], so every site
//! produces the same input layout ([`FeatureSpec::encoded_names`]): numeric
//! columns first, standardised with the mean and standard deviation of the
//! site's own training split, then each categorical column one-hot encoded
//! over its listed levels.
//!
//! Loading is all or nothing: the first bad row fails the whole load with a
//! [`DatasetError`] naming the file, the physical line (header = line 1),
//! the column and the value at fault, so no model is ever trained on part of
//! a file.
//!
//! ```no_run
//! use std::path::Path;
//! use meridian_worker::dataset::{self, CategoricalFeature, FeatureSpec, SplitOptions};
//!
//! let spec = FeatureSpec {
//!     label: "HeartDisease".into(),
//!     positive_label: "Yes".into(),
//!     negative_labels: vec!["No".into()],
//!     numeric: vec!["BMI".into(), "SleepTime".into()],
//!     categorical: vec![CategoricalFeature {
//!         column: "Sex".into(),
//!         levels: vec!["Female".into(), "Male".into()],
//!     }],
//! };
//! let split = SplitOptions { test_fraction: 0.2, seed: 7 };
//! let data = dataset::load(Path::new("heart.csv.gz"), &spec, &split)?;
//! assert_eq!(data.dim, 4); // BMI, SleepTime, Sex=Female, Sex=Male
//! # Ok::<(), meridian_worker::dataset::DatasetError>(())
//! ```

mod lines;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;
use lines::LineTracker;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use meridian_spec::job::{CategoricalFeature, FeatureSpec};
use meridian_spec::reason::{ReasonCode, SiteReason};

/// How the rows are split into train and test sets.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitOptions {
    /// Chance that a record is held out for testing, strictly between 0 and
    /// 1: the test set has about `rows * test_fraction` rows.
    pub test_fraction: f64,
    /// Key of the hash that assigns each record: the same records and seed
    /// give the same split, whatever the spec reads.
    pub seed: u64,
}

impl SplitOptions {
    /// Whether the record with these fields is held out for testing: the
    /// first 53 bits of SHA-256 over the seed and the record's trimmed,
    /// length-prefixed fields, as a fraction, below `test_fraction`.
    pub fn holds_out(&self, record: &csv::ByteRecord) -> bool {
        let digest = record_digest(self.seed, record);
        let bits = u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8])) >> 11;
        (bits as f64 / (1u64 << 53) as f64) < self.test_fraction
    }

    /// Checks the options on their own, collecting every problem, each
    /// naming its field (`split.test_fraction`).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        if self.test_fraction > 0.0 && self.test_fraction < 1.0 {
            Ok(())
        } else {
            Err(vec![format!("split.test_fraction must be strictly between 0 and 1, got {}", self.test_fraction)])
        }
    }
}

/// A dataset encoded for training: features and labels, split in two.
///
/// Both splits keep the file's order. Test rows are standardised with the
/// training split's statistics, as a model would see new patients.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedDataset {
    /// Inputs per row: [`FeatureSpec::input_dim`].
    pub dim: usize,
    /// Training features, row-major, `n_train() * dim` values.
    pub train_x: Vec<f32>,
    /// Training labels, `0` or `1`, one per training row.
    pub train_y: Vec<u8>,
    /// Test features, row-major, `n_test() * dim` values.
    pub test_x: Vec<f32>,
    /// Test labels, `0` or `1`, one per test row.
    pub test_y: Vec<u8>,
    /// Name of each input, as [`FeatureSpec::encoded_names`].
    pub encoded_names: Vec<String>,
    /// `(mean, std)` of each numeric column over the training split, in
    /// [`FeatureSpec::numeric`] order; `std` is 1 for a constant column.
    pub standardisation: Vec<(f64, f64)>,
}

impl EncodedDataset {
    /// Number of training rows.
    pub fn n_train(&self) -> usize {
        self.train_y.len()
    }

    /// Number of test rows.
    pub fn n_test(&self) -> usize {
        self.test_y.len()
    }
}

/// Why a dataset could not be read or encoded.
///
/// Every message is one line and names what is at fault: the spec field,
/// the file, and for a bad row ([`DatasetError::Row`]) its 1-based physical
/// line (header = line 1, blank lines and lines inside quoted values
/// counted, any line-break style) and a [`RowError`] naming the column and
/// value, as in `heart.csv:42: column "BMI": cannot parse "abc" as a number`.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The feature spec is invalid; see [`FeatureSpec::validate`].
    #[error("invalid feature spec: {}", problems.join("; "))]
    InvalidSpec {
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The split options are invalid; see [`SplitOptions::validate`].
    #[error("invalid split options: {}", problems.join("; "))]
    InvalidSplit {
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The file could not be opened or its first bytes read.
    #[error("{}: cannot open: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading failed part-way, e.g. a truncated or corrupt gzip stream.
    #[error("{}:{line}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The line (of the decompressed text) that reading had reached.
        line: u64,
        /// The cause.
        source: csv::Error,
    },
    /// The file has no header row: it is empty or holds only blank lines.
    #[error("{}: the file is empty, but a header row is required", path.display())]
    NoHeader {
        /// The file.
        path: PathBuf,
    },
    /// A value that standardisation takes beyond `f32`'s range.
    #[error(
        "{}: column {column:?}: a {split} value is too far from the training split's mean ({mean:e}) for its standard deviation ({std:e}) to be standardised in 32-bit floats",
        path.display()
    )]
    Unstandardisable {
        /// The file.
        path: PathBuf,
        /// The (encoded) column.
        column: String,
        /// `training` or `test`.
        split: &'static str,
        /// The training split's mean of the column.
        mean: f64,
        /// The training split's standard deviation of the column.
        std: f64,
    },
    /// A column named by the spec is not in the header.
    #[error(
        "{}: column {column:?} required by {field} is not in the header (columns: {})",
        path.display(),
        printable_list(columns)
    )]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column looked for.
        column: String,
        /// The spec field naming it, e.g. `features.numeric[3]`.
        field: String,
        /// The header's columns.
        columns: Vec<String>,
    },
    /// A column named by the spec is in the header more than once.
    #[error(
        "{}: column {column:?} required by {field} is in the header twice (columns {first} and {second})",
        path.display()
    )]
    DuplicateColumn {
        /// The file.
        path: PathBuf,
        /// The column looked for.
        column: String,
        /// The spec field naming it.
        field: String,
        /// 1-based position of its first occurrence.
        first: usize,
        /// 1-based position of its second occurrence.
        second: usize,
    },
    /// A data row is bad: the first one in the file.
    #[error("{}:{line}: {fault}", path.display())]
    Row {
        /// The file.
        path: PathBuf,
        /// The row's 1-based physical line, where it starts.
        line: u64,
        /// What is wrong with the row (boxed, so the error stays small).
        fault: Box<RowError>,
    },
    /// The file has a header but no data rows.
    #[error("{}: no data rows after the header", path.display())]
    NoRows {
        /// The file.
        path: PathBuf,
    },
    /// The split would leave the train or the test set without rows.
    #[error(
        "{}: test_fraction {test_fraction} (split_seed {seed}) splits {rows} rows into {train} train and {test} test rows, but both need at least one",
        path.display()
    )]
    EmptySplit {
        /// The file.
        path: PathBuf,
        /// Data rows in the file.
        rows: usize,
        /// The requested test fraction.
        test_fraction: f64,
        /// The split's seed.
        seed: u64,
        /// Training rows the split would give.
        train: usize,
        /// Test rows the split would give.
        test: usize,
    },
}

impl DatasetError {
    /// What of this error may leave the site: its [`ReasonCode`] and the
    /// columns of `spec` it concerns. The message itself names the file, the
    /// line and the value, and stays in the site's log.
    pub fn reason(&self, spec: &FeatureSpec) -> SiteReason {
        let with = |code, column: &str| SiteReason::new(code).column(spec, column);
        match self {
            DatasetError::InvalidSpec { .. } | DatasetError::InvalidSplit { .. } => {
                SiteReason::new(ReasonCode::Internal)
            }
            DatasetError::Open { .. } | DatasetError::Read { .. } | DatasetError::NoHeader { .. } => {
                SiteReason::new(ReasonCode::DataUnreadable)
            }
            DatasetError::MissingColumn { column, .. } | DatasetError::DuplicateColumn { column, .. } => {
                with(ReasonCode::SchemaMismatch, column)
            }
            // An encoded name is its numeric column's name.
            DatasetError::Unstandardisable { column, .. } => with(ReasonCode::SchemaMismatch, column),
            DatasetError::NoRows { .. } | DatasetError::EmptySplit { .. } => SiteReason::new(ReasonCode::TooFewRows),
            DatasetError::Row { fault, .. } => fault.reason(spec),
        }
    }
}

impl RowError {
    /// The code and column of this fault: an empty cell is a missing
    /// value, any other bad value a schema mismatch.
    pub fn reason(&self, spec: &FeatureSpec) -> SiteReason {
        let (column, value) = match self {
            RowError::FieldCount { .. } => return SiteReason::new(ReasonCode::DataUnreadable),
            RowError::NotANumber { column, value }
            | RowError::NotFinite { column, value }
            | RowError::OutOfRange { column, value }
            | RowError::UnknownLevel { column, value, .. }
            | RowError::UnknownLabel { column, value, .. } => (column, value),
        };
        let code = if value.is_empty() { ReasonCode::MissingValues } else { ReasonCode::SchemaMismatch };
        SiteReason::new(code).column(spec, column)
    }
}

/// What is wrong with a data row; [`DatasetError::Row`] adds its file and line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RowError {
    /// The row has a different number of fields than the header.
    #[error("the row has {found} fields, but the header has {expected}")]
    FieldCount {
        /// Fields in the header.
        expected: usize,
        /// Fields in the row.
        found: usize,
    },
    /// A numeric column holds something that is not a number.
    #[error("column {column:?}: cannot parse {value:?} as a number")]
    NotANumber {
        /// The column.
        column: String,
        /// The value, trimmed.
        value: String,
    },
    /// A numeric column holds NaN or an infinity (or a number too large for
    /// an `f64`).
    #[error("column {column:?}: {value:?} is not a finite number")]
    NotFinite {
        /// The column.
        column: String,
        /// The value, trimmed.
        value: String,
    },
    /// A numeric value beyond what training in `f32` can represent.
    #[error("column {column:?}: {value:?} is outside the range of 32-bit floats (±3.4e38) that training uses")]
    OutOfRange {
        /// The column.
        column: String,
        /// The value, trimmed.
        value: String,
    },
    /// A categorical column holds a value that is not one of its levels.
    #[error("column {column:?}: value {value:?} is not one of the levels {levels:?}")]
    UnknownLevel {
        /// The column.
        column: String,
        /// The value, trimmed.
        value: String,
        /// The levels the spec allows.
        levels: Vec<String>,
    },
    /// The label column holds a value that is neither the positive label
    /// nor a negative one.
    #[error(
        "column {column:?}: label {value:?} is neither the positive label {positive:?} nor one of the negative labels {negatives:?}"
    )]
    UnknownLabel {
        /// The label column.
        column: String,
        /// The value, trimmed.
        value: String,
        /// The positive label.
        positive: String,
        /// The negative labels.
        negatives: Vec<String>,
    },
}

/// The largest magnitude a numeric value may have: `f32::MAX`.
const MAX_NUMERIC: f64 = f32::MAX as f64;

/// Column names joined for an error message, control characters and
/// other unprintable ones escaped (`\n`, `\u{12}`), so a malformed header
/// cannot turn a one-line error into several lines or garbage.
fn printable_list(columns: &[String]) -> String {
    columns.iter().map(|c| c.escape_debug().to_string()).collect::<Vec<_>>().join(", ")
}

/// Reads the column names in the header of a CSV or gzip-compressed CSV
/// file, trimmed, without a leading UTF-8 byte order mark.
pub fn read_header(path: &Path) -> Result<Vec<String>, DatasetError> {
    let mut reader = open(path)?;
    header(path, &mut reader)
}

/// Reads, checks, splits and encodes the dataset at `path`.
///
/// The file is CSV with a header row, optionally gzip-compressed (detected
/// by its magic bytes, whatever its name). Values are trimmed of surrounding
/// whitespace and may be quoted; columns the spec does not name are ignored.
/// The spec and split options are validated first; then the first bad row
/// fails the whole load. Each row goes to the test set when its keyed hash
/// ([`SplitOptions::holds_out`]) says so.
pub fn load(path: &Path, spec: &FeatureSpec, split: &SplitOptions) -> Result<EncodedDataset, DatasetError> {
    spec.validate().map_err(|problems| DatasetError::InvalidSpec { problems })?;
    split.validate().map_err(|problems| DatasetError::InvalidSplit { problems })?;

    let mut reader = open(path)?;
    let columns = header(path, &mut reader)?;
    let layout = Layout::new(path, spec, &columns)?;
    let rows = read_rows(path, &layout, &mut reader, split)?;

    let n = rows.labels.len();
    if n == 0 {
        return Err(DatasetError::NoRows { path: path.to_path_buf() });
    }
    let (test, train): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| rows.held_out[i]);
    if test.is_empty() || train.is_empty() {
        return Err(DatasetError::EmptySplit {
            path: path.to_path_buf(),
            rows: n,
            test_fraction: split.test_fraction,
            seed: split.seed,
            train: train.len(),
            test: test.len(),
        });
    }

    let standardisation = rows.standardisation(spec.numeric.len(), &train);
    let (train_x, train_y) = rows.encode(spec, &standardisation, &train);
    let (test_x, test_y) = rows.encode(spec, &standardisation, &test);
    // A test value far from a nearly constant training column can still
    // leave f32's range once standardised: refuse rather than train on ∞.
    let dim = spec.input_dim().max(1);
    for (split, x) in [("training", &train_x), ("test", &test_x)] {
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            let j = i % dim;
            let (mean, std) = standardisation.get(j).copied().unwrap_or((0.0, 1.0));
            return Err(DatasetError::Unstandardisable {
                path: path.to_path_buf(),
                column: spec.encoded_names().get(j).cloned().unwrap_or_default(),
                split,
                mean,
                std,
            });
        }
    }
    Ok(EncodedDataset {
        dim: spec.input_dim(),
        train_x,
        train_y,
        test_x,
        test_y,
        encoded_names: spec.encoded_names(),
        standardisation,
    })
}

/// The sizes of a dataset's two splits, and a digest of its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitSizes {
    /// Records in the training split.
    pub train: u64,
    /// Records in the test split.
    pub test: u64,
    /// SHA-256 over the header and every record's fields, hex: when it
    /// changes, the records changed and their sizes are released anew.
    /// It never leaves the site (it is a function of the records).
    pub digest: String,
}

/// Counts the records of `path` in each split of `split`, whatever a job
/// will read of them: the exact sizes the dataset's size release noises.
/// A record only has to be a CSV record; its values are checked when a
/// job loads them.
pub fn count_split(path: &Path, split: &SplitOptions) -> Result<SplitSizes, DatasetError> {
    split.validate().map_err(|problems| DatasetError::InvalidSplit { problems })?;
    let mut reader = open(path)?;
    let columns = header(path, &mut reader)?;
    let mut digest = Sha256::new();
    for column in &columns {
        digest.update((column.len() as u64).to_le_bytes());
        digest.update(column.as_bytes());
    }
    let (mut train, mut test) = (0u64, 0u64);
    let mut record = csv::ByteRecord::new();
    while next_record(path, &mut reader, &mut record)? {
        digest.update(record_digest(0, &record));
        if split.holds_out(&record) {
            test += 1;
        } else {
            train += 1;
        }
    }
    Ok(SplitSizes { train, test, digest: hex::encode(digest.finalize()) })
}

/// What the configuration declares a column to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// The label column.
    Label,
    /// A column of numbers.
    Numeric,
    /// A column of categories.
    Categorical,
}

impl ColumnKind {
    /// The kind as `worker.toml` names it: `label`, `numeric` or `categorical`.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnKind::Label => "label",
            ColumnKind::Numeric => "numeric",
            ColumnKind::Categorical => "categorical",
        }
    }
}

impl std::fmt::Display for ColumnKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a declared column holds over a whole file, for the site's own
/// eyes (`meridian worker --check`): it never leaves the site.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnSurvey {
    /// The column.
    pub name: String,
    /// What the configuration declares it to be.
    pub kind: ColumnKind,
    /// Cells that are empty (after trimming).
    pub empty: u64,
    /// Numeric cells that do not parse as a finite number within f32's range.
    pub not_numeric: u64,
    /// Distinct values and how often each appears (label and categorical
    /// columns; the 20 most frequent).
    pub values: Vec<(String, u64)>,
}

/// A whole file read against the columns its configuration declares.
#[derive(Clone, Debug, PartialEq)]
pub struct Survey {
    /// Data records.
    pub rows: u64,
    /// Records with another number of fields than the header.
    pub bad_width: u64,
    /// Declared columns missing from the header.
    pub missing: Vec<String>,
    /// Each declared column that is present.
    pub columns: Vec<ColumnSurvey>,
}

/// Reads every record of `path` and counts, per declared column, the cells
/// a job would refuse: empty ones and, in numeric columns, those that are
/// not finite numbers. Every row is read; nothing stops at the first fault.
pub fn survey(path: &Path, label: &str, numeric: &[String], categorical: &[String]) -> Result<Survey, DatasetError> {
    let mut reader = open(path)?;
    let header = header(path, &mut reader)?;
    let declared = std::iter::once((label, ColumnKind::Label))
        .chain(numeric.iter().map(|c| (c.as_str(), ColumnKind::Numeric)))
        .chain(categorical.iter().map(|c| (c.as_str(), ColumnKind::Categorical)));
    let mut missing = Vec::new();
    let mut columns: Vec<(usize, ColumnSurvey, HashMap<Vec<u8>, u64>)> = Vec::new();
    for (name, kind) in declared {
        match header.iter().position(|h| h == name) {
            Some(at) => {
                let survey =
                    ColumnSurvey { name: name.to_string(), kind, empty: 0, not_numeric: 0, values: Vec::new() };
                columns.push((at, survey, HashMap::new()))
            }
            None => missing.push(name.to_string()),
        }
    }
    let (mut rows, mut bad_width) = (0u64, 0u64);
    let mut record = csv::ByteRecord::new();
    while next_record(path, &mut reader, &mut record)? {
        rows += 1;
        if record.len() != header.len() {
            bad_width += 1;
            continue;
        }
        for (at, column, values) in &mut columns {
            let cell = record[*at].trim_ascii();
            if cell.is_empty() {
                column.empty += 1;
            } else if column.kind == ColumnKind::Numeric {
                let number = std::str::from_utf8(cell).ok().and_then(|s| s.parse::<f64>().ok());
                if !number.is_some_and(|v| v.is_finite() && v.abs() <= MAX_NUMERIC) {
                    column.not_numeric += 1;
                }
            } else {
                *values.entry(cell.to_vec()).or_insert(0) += 1;
            }
        }
    }
    let columns = columns
        .into_iter()
        .map(|(_, mut column, values)| {
            let mut values: Vec<(String, u64)> =
                values.into_iter().map(|(v, n)| (String::from_utf8_lossy(&v).into_owned(), n)).collect();
            values.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            values.truncate(20);
            column.values = values;
            column
        })
        .collect();
    Ok(Survey { rows, bad_width, missing, columns })
}

/// Reads the next record into `record`; false at the end of the file.
fn next_record(path: &Path, reader: &mut CsvReader, record: &mut csv::ByteRecord) -> Result<bool, DatasetError> {
    reader.read_byte_record(record).map_err(|source| {
        let line = reader.get_ref().current_line();
        DatasetError::Read { path: path.to_path_buf(), line, source }
    })
}

/// SHA-256 of `seed` and a record's trimmed fields, each prefixed by its length.
fn record_digest(seed: u64, record: &csv::ByteRecord) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(seed.to_le_bytes());
    for field in record.iter() {
        let field = field.trim_ascii();
        hash.update((field.len() as u64).to_le_bytes());
        hash.update(field);
    }
    hash.finalize().into()
}

/// The decompressed bytes of a dataset file.
enum Source {
    /// An uncompressed file.
    Plain(File),
    /// A gzip file, possibly of several concatenated members.
    Gzip(Box<MultiGzDecoder<BufReader<File>>>),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(file) => file.read(buf),
            Source::Gzip(decoder) => decoder.read(buf),
        }
    }
}

/// The CSV reader every function here reads through.
type CsvReader = csv::Reader<LineTracker<Source>>;

/// Opens `path` as CSV, decompressing it if it starts with the gzip magic
/// bytes `1f 8b`.
fn open(path: &Path) -> Result<CsvReader, DatasetError> {
    let opened = || -> io::Result<Source> {
        let mut file = File::open(path)?;
        let mut magic = [0u8; 2];
        let mut filled = 0;
        while filled < magic.len() {
            match file.read(&mut magic[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        file.seek(SeekFrom::Start(0))?;
        Ok(if magic[..filled] == [0x1f, 0x8b] {
            Source::Gzip(Box::new(MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file))))
        } else {
            Source::Plain(file)
        })
    };
    let source = opened().map_err(|source| DatasetError::Open { path: path.to_path_buf(), source })?;
    Ok(csv::ReaderBuilder::new()
        .has_headers(true)
        // Rows of the wrong width are reported by `read_rows`, with their line.
        .flexible(true)
        // Trimmed by hand: `csv`'s trimming copies every record.
        .trim(csv::Trim::None)
        .buffer_capacity(1 << 16)
        .from_reader(LineTracker::new(source)))
}

/// Reads the header row: trimmed column names, without a byte order mark.
fn header(path: &Path, reader: &mut CsvReader) -> Result<Vec<String>, DatasetError> {
    let record = match reader.byte_headers() {
        Ok(record) => record,
        Err(source) => {
            let line = reader.get_ref().current_line();
            return Err(DatasetError::Read { path: path.to_path_buf(), line, source });
        }
    };
    if record.is_empty() {
        return Err(DatasetError::NoHeader { path: path.to_path_buf() });
    }
    Ok(record
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let name = if i == 0 { name.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(name) } else { name };
            String::from_utf8_lossy(name.trim_ascii()).into_owned()
        })
        .collect())
}

/// Where the spec's columns are in the file, and the value lookups for the
/// label and the categorical columns.
struct Layout<'s> {
    /// The spec, for the names and values quoted in errors.
    spec: &'s FeatureSpec,
    /// Fields per row: the header's width.
    width: usize,
    /// Index of the label column.
    label: usize,
    /// Label value to class.
    classes: HashMap<&'s [u8], u8>,
    /// Index of each numeric column, in spec order.
    numeric: Vec<usize>,
    /// Index of each categorical column and its level-to-position map, in
    /// spec order.
    categorical: Vec<(usize, HashMap<&'s [u8], u32>)>,
}

impl<'s> Layout<'s> {
    /// Finds the spec's columns among `columns`, the header of `path`.
    fn new(path: &Path, spec: &'s FeatureSpec, columns: &[String]) -> Result<Self, DatasetError> {
        let find = |field: String, column: &str| -> Result<usize, DatasetError> {
            let mut at = columns.iter().enumerate().filter(|(_, c)| *c == column).map(|(i, _)| i);
            match (at.next(), at.next()) {
                (Some(i), None) => Ok(i),
                (Some(first), Some(second)) => Err(DatasetError::DuplicateColumn {
                    path: path.to_path_buf(),
                    column: column.to_owned(),
                    field,
                    first: first + 1,
                    second: second + 1,
                }),
                (None, _) => Err(DatasetError::MissingColumn {
                    path: path.to_path_buf(),
                    column: column.to_owned(),
                    field,
                    columns: columns.to_vec(),
                }),
            }
        };

        let label = find("features.label".into(), &spec.label)?;
        let mut classes = HashMap::with_capacity(1 + spec.negative_labels.len());
        classes.insert(spec.positive_label.as_bytes(), 1);
        for value in &spec.negative_labels {
            classes.insert(value.as_bytes(), 0);
        }
        let numeric = spec
            .numeric
            .iter()
            .enumerate()
            .map(|(i, column)| find(format!("features.numeric[{i}]"), column))
            .collect::<Result<_, _>>()?;
        let categorical = spec
            .categorical
            .iter()
            .enumerate()
            .map(|(i, feature)| {
                let index = find(format!("features.categorical[{i}].column"), &feature.column)?;
                let levels = feature.levels.iter().zip(0..).map(|(level, k)| (level.as_bytes(), k)).collect();
                Ok((index, levels))
            })
            .collect::<Result<_, _>>()?;
        Ok(Layout { spec, width: columns.len(), label, classes, numeric, categorical })
    }
}

/// The checked values of every row, in file order, before splitting.
struct Rows {
    /// Numeric values, row-major, one per numeric column.
    numeric: Vec<f64>,
    /// Level positions, row-major, one per categorical column.
    levels: Vec<u32>,
    /// Class of each row.
    labels: Vec<u8>,
    /// Whether each row is in the test split.
    held_out: Vec<bool>,
}

/// Reads and checks every data row, failing on the first bad one.
fn read_rows(
    path: &Path,
    layout: &Layout<'_>,
    reader: &mut CsvReader,
    split: &SplitOptions,
) -> Result<Rows, DatasetError> {
    let mut rows = Rows { numeric: Vec::new(), levels: Vec::new(), labels: Vec::new(), held_out: Vec::new() };
    let mut record = csv::ByteRecord::new();
    while next_record(path, reader, &mut record)? {
        let start = record.position().map_or(0, csv::Position::byte);
        let line = reader.get_mut().record_line(start);
        if let Err(fault) = rows.push(layout, &record) {
            // Only the header starts without a line break before it.
            let line = line.or(record.position().map(csv::Position::line)).unwrap_or(0);
            return Err(DatasetError::Row { path: path.to_path_buf(), line, fault: Box::new(fault) });
        }
        rows.held_out.push(split.holds_out(&record));
    }
    Ok(rows)
}

impl Rows {
    /// Checks `record` and appends its values; after an error the rows are
    /// incomplete, and the load is abandoned.
    fn push(&mut self, layout: &Layout<'_>, record: &csv::ByteRecord) -> Result<(), RowError> {
        if record.len() != layout.width {
            return Err(RowError::FieldCount { expected: layout.width, found: record.len() });
        }
        let spec = layout.spec;
        let field = |index: usize| record[index].trim_ascii();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();

        let value = field(layout.label);
        let Some(&class) = layout.classes.get(value) else {
            return Err(RowError::UnknownLabel {
                column: spec.label.clone(),
                value: text(value),
                positive: spec.positive_label.clone(),
                negatives: spec.negative_labels.clone(),
            });
        };
        for (column, &index) in spec.numeric.iter().zip(&layout.numeric) {
            let value = field(index);
            let number = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| RowError::NotANumber { column: column.clone(), value: text(value) })?;
            if !number.is_finite() {
                return Err(RowError::NotFinite { column: column.clone(), value: text(value) });
            }
            // Training runs in f32: a value beyond its range would become infinite.
            if number.abs() > MAX_NUMERIC {
                return Err(RowError::OutOfRange { column: column.clone(), value: text(value) });
            }
            self.numeric.push(number);
        }
        for (feature, (index, levels)) in spec.categorical.iter().zip(&layout.categorical) {
            let value = field(*index);
            let &level = levels.get(value).ok_or_else(|| RowError::UnknownLevel {
                column: feature.column.clone(),
                value: text(value),
                levels: feature.levels.clone(),
            })?;
            self.levels.push(level);
        }
        self.labels.push(class);
        Ok(())
    }

    /// `(mean, std)` of each of the `width` numeric columns over the rows
    /// `train`: the population standard deviation, or 1 for a column that is
    /// constant there.
    fn standardisation(&self, width: usize, train: &[usize]) -> Vec<(f64, f64)> {
        let n = train.len() as f64;
        (0..width)
            .map(|j| {
                let values = || train.iter().map(|&row| self.numeric[row * width + j]);
                let (min, max) =
                    values().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
                if min == max {
                    // Exactly constant: the mean is the value itself, while
                    // summing could leave a rounding error as a tiny std.
                    return (min, 1.0);
                }
                let mean = values().sum::<f64>() / n;
                let variance = values().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
                (mean, variance.sqrt())
            })
            .collect()
    }

    /// Features and labels of the rows `which`, in that order.
    fn encode(&self, spec: &FeatureSpec, standardisation: &[(f64, f64)], which: &[usize]) -> (Vec<f32>, Vec<u8>) {
        let dim = spec.input_dim();
        let n_numeric = spec.numeric.len();
        let n_categorical = spec.categorical.len();
        let offsets: Vec<usize> = spec
            .categorical
            .iter()
            .scan(n_numeric, |offset, feature| {
                let at = *offset;
                *offset += feature.levels.len();
                Some(at)
            })
            .collect();

        let mut x = vec![0.0f32; which.len() * dim];
        let mut y = Vec::with_capacity(which.len());
        // `dim` is at least 1: a valid spec has a feature.
        for (out, &row) in x.chunks_exact_mut(dim.max(1)).zip(which) {
            let numeric = &self.numeric[row * n_numeric..][..n_numeric];
            for ((slot, &value), &(mean, std)) in out.iter_mut().zip(numeric).zip(standardisation) {
                *slot = ((value - mean) / std) as f32;
            }
            let levels = &self.levels[row * n_categorical..][..n_categorical];
            for (&offset, &level) in offsets.iter().zip(levels) {
                out[offset + level as usize] = 1.0;
            }
            y.push(self.labels[row]);
        }
        (x, y)
    }
}

#[cfg(test)]
mod tests;
