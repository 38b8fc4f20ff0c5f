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
    let mut lines = LineCounter::new(text);
    let header = Header {
        fields: &header,
        line: lines.line_at(0),
    };
    let columns = Columns {
        text: header.column(rows, &spec.text_column, "--text-column")?,
        label: header.column(rows, &spec.label_column, "--label-column")?,
        text_pair: match &spec.text_pair_column {
            Some(name) => Some(header.column(rows, name, "--text-pair-column")?),
            None => None,
        },
        width: header.fields.len(),
    };
    let mut record = StringRecord::new();
    loop {
        let offset = reader.position().byte() as usize;
        if !reader
            .read_record(&mut record)
            .map_err(|e| parse_error(rows, &e))?
        {
            return Ok(());
        }
        let offset = record.position().map_or(offset, |p| p.byte() as usize);
        let line = lines.line_at(offset);
        rows.push(line, example(&record, &columns, spec, line))?;
    }
}

/// Line numbers from byte offsets. The csv crate's own record line is off
/// after `\r\n` and blank lines (it counts from where reading started, the
/// end of the previous record), so the first byte of the record is found by
/// skipping line breaks, and the line breaks before it are counted.
struct LineCounter<'a> {
    bytes: &'a [u8],
    counted_to: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        LineCounter {
            bytes: text.as_bytes(),
            counted_to: 0,
            line: 1,
        }
    }

    /// The 1-based line of the first character at or after `offset` that is
    /// not a line break; offsets must not decrease between calls.
    fn line_at(&mut self, offset: usize) -> usize {
        let mut start = offset.max(self.counted_to).min(self.bytes.len());
        while matches!(self.bytes.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        let breaks = self.bytes[self.counted_to..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.line += breaks;
        self.counted_to = start;
        self.line
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
        rows::RawLabel::Text(field(columns.label).to_string()),
    )
}

/// The header row and the line it is on.
struct Header<'a> {
    fields: &'a StringRecord,
    line: usize,
}

impl Header<'_> {
    /// The index of column `name`, or an error listing the columns found.
    fn column(&self, rows: &Rows, name: &str, flag: &str) -> Result<usize> {
        let at = format!("{} line {}", rows.path().display(), self.line);
        let matches: Vec<usize> = self
            .fields
            .iter()
            .enumerate()
            .filter(|(_, h)| *h == name)
            .map(|(i, _)| i)
            .collect();
        match matches.as_slice() {
            [index] => Ok(*index),
            [] => {
                let found: Vec<String> = self.fields.iter().map(|h| format!("{h:?}")).collect();
                Err(Error::Invalid(format!(
                    "{at}: the header has no column {name:?}; columns found: {}; name the right one with {flag} (or fix the header row)",
                    found.join(", ")
                )))
            }
            several => Err(Error::Invalid(format!(
                "{at}: the header has {} columns named {name:?} (columns {}); rename all but one",
                several.len(),
                several
                    .iter()
                    .map(|i| (i + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
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
