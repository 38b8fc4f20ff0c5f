//! The checks every row passes whatever the file format, and the
//! skip-or-fail policy of [`DataSpec::skip_bad_rows`].

use std::path::Path;

use super::{DataSpec, Example};
use crate::error::{Error, Result};

/// A row that cannot become an example; the message says why, without the
/// file and line, which [`Rows::push`] adds.
pub(super) type BadRow = String;

/// Collects a file's examples, skipping or failing on bad rows.
pub(super) struct Rows<'a> {
    path: &'a Path,
    skip_bad_rows: bool,
    examples: Vec<Example>,
    skipped: usize,
    /// Shown when every row was skipped: usually a wrong column name.
    first_skipped: Option<String>,
}

impl<'a> Rows<'a> {
    pub(super) fn new(path: &'a Path, spec: &DataSpec) -> Self {
        Rows {
            path,
            skip_bad_rows: spec.skip_bad_rows,
            examples: Vec::new(),
            skipped: 0,
            first_skipped: None,
        }
    }

    /// The file being read, for messages.
    pub(super) fn path(&self) -> &Path {
        self.path
    }

    /// Keeps a good row; skips a bad one or fails on it.
    pub(super) fn push(
        &mut self,
        line: usize,
        row: std::result::Result<Example, BadRow>,
    ) -> Result<()> {
        match row {
            Ok(example) => self.examples.push(example),
            Err(why) => {
                let at = format!("line {line}: {why}");
                if !self.skip_bad_rows {
                    return Err(Error::Invalid(format!(
                        "{} {at}; fix or remove the row, or pass --skip-bad-rows to skip such rows",
                        self.path.display()
                    )));
                }
                self.skipped += 1;
                self.first_skipped.get_or_insert(at);
            }
        }
        Ok(())
    }

    /// The examples and the number of skipped rows; an error if none is left.
    pub(super) fn finish(self) -> Result<(Vec<Example>, usize)> {
        if !self.examples.is_empty() {
            return Ok((self.examples, self.skipped));
        }
        Err(Error::Invalid(match self.first_skipped {
            Some(first) => format!(
                "{}: no usable examples: every row ({}) was skipped as bad; the first, {first}",
                self.path.display(),
                self.skipped
            ),
            None => format!(
                "{}: no examples, only a header; add labeled rows",
                self.path.display()
            ),
        }))
    }
}

/// A label field as read from the file.
pub(super) enum RawLabel {
    Text(String),
    /// A JSON list (JSON Lines only).
    List(Vec<String>),
}

/// Builds an example from its fields, rejecting empty (or all-whitespace)
/// text and single labels: they would train on nothing or on a class named
/// "". A multi-label row may have no labels (none applies).
pub(super) fn example(
    spec: &DataSpec,
    line: usize,
    text: String,
    text_pair: Option<String>,
    label: RawLabel,
) -> std::result::Result<Example, BadRow> {
    if text.trim().is_empty() {
        return Err(format!("text (column \"{}\") is empty", spec.text_column));
    }
    if let (Some(pair), Some(column)) = (&text_pair, &spec.text_pair_column) {
        if pair.trim().is_empty() {
            return Err(format!("text pair (column \"{column}\") is empty"));
        }
    }
    let column = &spec.label_column;
    let (label, labels) = match (&spec.multi_label_delimiter, label) {
        (None, RawLabel::Text(label)) => {
            let label = label.trim();
            if label.is_empty() {
                return Err(format!("label (column \"{column}\") is empty"));
            }
            (label.to_string(), Vec::new())
        }
        (None, RawLabel::List(_)) => {
            return Err(format!(
                "label {column:?} is a list; for several labels per text use --task multi-label"
            ))
        }
        (Some(delimiter), RawLabel::Text(text)) => {
            // Empty parts ("a|b|") are dropped: a trailing delimiter names
            // no label.
            let labels = distinct(text.split(delimiter.as_str()).map(str::trim));
            (labels.join(delimiter), labels)
        }
        (Some(delimiter), RawLabel::List(items)) => {
            if let Some(i) = items.iter().position(|l| l.trim().is_empty()) {
                return Err(format!(
                    "item {} of the label list {column:?} is empty; remove it or name the label",
                    i + 1
                ));
            }
            let labels = distinct(items.iter().map(|l| l.trim()));
            (labels.join(delimiter), labels)
        }
    };
    Ok(Example {
        text,
        text_pair,
        label,
        labels,
        line,
    })
}

/// The non-empty labels, each once, in first-seen order.
fn distinct<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for label in labels.filter(|l| !l.is_empty()) {
        if !out.iter().any(|seen| seen == label) {
            out.push(label.to_string());
        }
    }
    out
}
