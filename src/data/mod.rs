//! Labeled text for fine-tuning: CSV, TSV and JSON Lines files in, checked
//! [`Example`]s out, plus the label vocabulary and the batch order; word-level
//! tagged sentences (CoNLL, JSON Lines) for token classification.
//!
//! Every error names the file and the 1-based line at fault and says what to
//! do, because the person reading it is fixing a data file, not our code.
//! Messages refer to the `bertrt finetune` flags `--text-column`,
//! `--label-column`, `--text-pair-column` and `--skip-bad-rows`.

mod batching;
mod checksum;
mod delimited;
mod jsonl;
mod labels;
mod rows;
mod tagged;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use batching::{epoch_batches, eval_batches};
pub use checksum::sha256_hex;
pub use labels::LabelSet;
pub use tagged::{
    align_tags, entity_type, first_subwords, read_tagged, Alignment, TagSet, TagSpec,
    TaggedDataset, TaggedSentence,
};

/// One labeled text (or text pair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text as written in the file (not trimmed: the tokenizer decides
    /// what whitespace means).
    pub text: String,
    /// The second segment, present exactly when
    /// [`DataSpec::text_pair_column`] is set.
    pub text_pair: Option<String>,
    /// The label, trimmed, so that `"spam"` and `"spam "` are one class;
    /// for a multi-label row, its labels joined by the delimiter (for
    /// messages).
    pub label: String,
    /// A multi-label row's labels (trimmed, each once, in file order;
    /// possibly none); empty for single-label rows.
    pub labels: Vec<String>,
    /// 1-based line of the row; for CSV/TSV the line the record starts on
    /// (a quoted field may span several lines).
    pub line: usize,
}

/// Which columns (CSV/TSV) or keys (JSON Lines) hold the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSpec {
    pub text_column: String,
    pub label_column: String,
    pub text_pair_column: Option<String>,
    /// Multi-label data: each label field holds a set of labels, a JSON
    /// list (JSON Lines) or a string split at this delimiter; an empty one
    /// is the empty set. None: one label per row.
    pub multi_label_delimiter: Option<String>,
    /// Regression: labels are numbers, and JSON Lines may give them as any
    /// JSON number (a class label may not be fractional).
    pub numeric_labels: bool,
    /// Skip (and count) rows whose text or label is missing, empty or of the
    /// wrong type instead of failing on the first one. Malformed files
    /// (invalid JSON or UTF-8, a header without the column) still fail.
    pub skip_bad_rows: bool,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            text_column: "text".into(),
            label_column: "label".into(),
            text_pair_column: None,
            multi_label_delimiter: None,
            numeric_labels: false,
            skip_bad_rows: false,
        }
    }
}

/// The examples of one file, with what is needed to record where they came
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub path: PathBuf,
    /// In file order.
    pub examples: Vec<Example>,
    /// Rows skipped under [`DataSpec::skip_bad_rows`].
    pub skipped: usize,
    /// SHA-256 of the file's bytes, lowercase hex, for training artifacts.
    pub sha256: String,
}

impl Dataset {
    /// The labels as finite numbers, for regression; a label that is not
    /// one is an error naming the file and line.
    pub fn numeric_labels(&self) -> Result<Vec<f32>> {
        self.examples
            .iter()
            .map(|e| {
                e.label
                    .trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "{} line {}: label {:?} is not a number; regression needs numeric labels",
                            self.path.display(),
                            e.line,
                            e.label
                        ))
                    })
            })
            .collect()
    }
}

/// The file formats, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Tsv,
    JsonLines,
}

impl Format {
    const ACCEPTED: &'static str = ".csv, .tsv, .jsonl or .json (JSON Lines)";

    fn of(path: &Path) -> Result<Self> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            Some("jsonl") | Some("json") => Ok(Format::JsonLines),
            Some(other) => Err(Error::Invalid(format!(
                "{}: unknown data format \".{other}\"; bertrt reads {}: rename or convert the file",
                path.display(),
                Self::ACCEPTED
            ))),
            None => Err(Error::Invalid(format!(
                "{}: no file extension, so the data format is unknown; bertrt reads {}: rename the file",
                path.display(),
                Self::ACCEPTED
            ))),
        }
    }
}

/// Reads a labeled data file; the format follows the extension (see
/// `Format`). Empty files, files without a single usable example and files
/// that are not UTF-8 are errors.
pub fn read_dataset(path: &Path, spec: &DataSpec) -> Result<Dataset> {
    let format = Format::of(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let sha256 = sha256_hex(&bytes);
    let text = utf8(path, &bytes)?;
    // Spreadsheet exports often start with a byte-order mark, which would
    // otherwise become part of the first column's name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(Error::Invalid(format!(
            "{}: the file is empty; expected a header row and labeled rows (CSV/TSV) or one JSON object per line",
            path.display()
        )));
    }
    let mut rows = rows::Rows::new(path, spec);
    match format {
        Format::Csv => delimited::read(text, b',', spec, &mut rows)?,
        Format::Tsv => delimited::read(text, b'\t', spec, &mut rows)?,
        Format::JsonLines => jsonl::read(text, spec, &mut rows)?,
    }
    let (examples, skipped) = rows.finish()?;
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
        skipped,
        sha256,
    })
}

/// The file as UTF-8, or an error naming the first line that is not.
fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        Error::Invalid(format!(
            "{} line {line}: not valid UTF-8 (byte offset {}); save the file as UTF-8",
            path.display(),
            e.valid_up_to()
        ))
    })
}
