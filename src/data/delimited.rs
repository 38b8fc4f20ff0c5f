//! CSV and TSV: a header row, then one record per row, RFC 4180 quoting
//! (a quoted field may hold the delimiter, `""` and line breaks) for both.

use csv::{ReaderBuilder, StringRecord, Trim};

use super::rows::{self, Rows};
use super::DataSpec;
use crate::error::{Error, Result};

/// Where the wanted fields sit in each record.
struct Columns {
    text: usize,
    label: usize,
    text_pair: Option<usize>,
    /// Fields in the header, which every record must match.
    width: usize,
}

/// Reads `text` (the whole file) into `rows`.
pub(super) fn read(text: &str, delimiter: u8, spec: &DataSpec, rows: &mut Rows) -> Result<()> {
    let mut reader = ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        // Records with the wrong number of fields are bad rows, reported
        // below with their line, not parse errors that stop the file.
        .flexible(true)
        .trim(Trim::Headers)
        .from_reader(text.as_bytes());
    let header = reader.headers().map_err(|e| parse_error(rows, &e))?.clone();
    let columns = Columns {
        text: column(rows, &header, &spec.text_column, "--text-column")?,
        label: column(rows, &header, &spec.label_column, "--label-column")?,
        text_pair: match &spec.text_pair_column {
            Some(name) => Some(column(rows, &header, name, "--text-pair-column")?),
            None => None,
        },
        width: header.len(),
    };
    let mut record = StringRecord::new();
    loop {
        let line_before = reader.position().line() as usize;
        if !reader
            .read_record(&mut record)
            .map_err(|e| parse_error(rows, &e))?
        {
            return Ok(());
        }
        let line = record.position().map_or(line_before, |p| p.line() as usize);
        rows.push(line, example(&record, &columns, spec, line))?;
    }
}

fn example(
    record: &StringRecord,
    columns: &Columns,
    spec: &DataSpec,
    line: usize,
) -> std::result::Result<super::Example, rows::BadRow> {
    if record.len() != columns.width {
        return Err(format!(
            "the record has {} fields but the header has {}; is a delimiter or a quote missing or unescaped? (quote fields that hold the delimiter, and double quotes inside them)",
            record.len(),
            columns.width
        ));
    }
    // In range: the width matches the header, which holds every index.
    let field = |i: usize| record.get(i).unwrap_or_default();
    rows::example(
        spec,
        line,
        field(columns.text).to_string(),
        columns.text_pair.map(|i| field(i).to_string()),
        field(columns.label),
    )
}

/// The index of `name` in the header, or an error listing the columns found.
fn column(rows: &Rows, header: &StringRecord, name: &str, flag: &str) -> Result<usize> {
    let matches: Vec<usize> = header
        .iter()
        .enumerate()
        .filter(|(_, h)| *h == name)
        .map(|(i, _)| i)
        .collect();
    match matches.as_slice() {
        [index] => Ok(*index),
        [] => {
            let found: Vec<String> = header.iter().map(|h| format!("{h:?}")).collect();
            Err(Error::Invalid(format!(
                "{} line 1: the header has no column {name:?}; columns found: {}; name the right one with {flag} (or fix the header row)",
                rows.path().display(),
                found.join(", ")
            )))
        }
        several => Err(Error::Invalid(format!(
            "{} line 1: the header has {} columns named {name:?} (columns {}); rename all but one",
            rows.path().display(),
            several.len(),
            several
                .iter()
                .map(|i| (i + 1).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A csv-crate error, which (UTF-8 having been checked) is rare: it names its
/// own position.
fn parse_error(rows: &Rows, error: &csv::Error) -> Error {
    let line = error.position().map_or(1, |p| p.line());
    Error::Invalid(format!(
        "{} line {line}: cannot parse: {error}",
        rows.path().display()
    ))
}
