//! JSON Lines: one JSON object per line; blank lines are ignored.

use serde_json::{Map, Value};

use super::rows::{self, BadRow, RawLabel, Rows};
use super::{DataSpec, Example};
use crate::error::{Error, Result};

/// Reads `text` (the whole file) into `rows`.
pub(super) fn read(text: &str, spec: &DataSpec, rows: &mut Rows) -> Result<()> {
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let object = object(rows, line, raw)?;
        rows.push(line, example(&object, spec, line))?;
    }
    Ok(())
}

/// The line parsed as a JSON object; anything else is an error, not a bad
/// row: the file is not JSON Lines, or is corrupt.
fn object(rows: &Rows, line: usize, raw: &str) -> Result<Map<String, Value>> {
    let at = format!("{} line {line}", rows.path().display());
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(Value::Array(_)) => Err(Error::Invalid(format!(
            "{at}: found a JSON array; bertrt reads JSON Lines, one object per line such as {{\"text\": \"...\", \"label\": \"...\"}} (convert an array with: jq -c '.[]' FILE)"
        ))),
        Ok(other) => Err(Error::Invalid(format!(
            "{at}: found {}, expected a JSON object such as {{\"text\": \"...\", \"label\": \"...\"}}",
            kind(&other)
        ))),
        Err(e) => {
            let hint = if raw.trim_start().starts_with('[') {
                "this looks like a JSON array; bertrt reads JSON Lines, one object per line (convert with: jq -c '.[]' FILE)"
            } else {
                "each line must hold one complete JSON object (pretty-printed JSON spanning several lines is not JSON Lines)"
            };
            // serde_json's message ends in " at line 1 column N", which
            // would contradict the file line; keep the column only.
            let message = e.to_string();
            let reason = message.split(" at line ").next().unwrap_or_default();
            Err(Error::Invalid(format!(
                "{at}: invalid JSON at column {}: {reason}; {hint}",
                e.column()
            )))
        }
    }
}

fn example(object: &Map<String, Value>, spec: &DataSpec, line: usize) -> Result<Example, BadRow> {
    let text = text_field(object, &spec.text_column, "--text-column")?;
    let text_pair = match &spec.text_pair_column {
        Some(key) => Some(text_field(object, key, "--text-pair-column")?),
        None => None,
    };
    let key = &spec.label_column;
    let label = match field(object, key, "--label-column")? {
        Value::Array(items) => RawLabel::List(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    scalar_label(item, false).ok_or_else(|| {
                        format!(
                            "item {} of the label list {key:?} is {}; a label must be a string, an integer or a boolean",
                            i + 1,
                            kind(item)
                        )
                    })
                })
                .collect::<Result<_, BadRow>>()?,
        ),
        other => RawLabel::Text(scalar_label(other, spec.numeric_labels).ok_or_else(|| {
            format!(
                "label {key:?} is {}; a label must be a string, an integer or a boolean (or, with --task multi-label, a list of them; with --task regression, any number)",
                kind(other)
            )
        })?),
    };
    rows::example(spec, line, text, text_pair, label)
}

/// A label written as a string, an integer or a boolean: exported data sets
/// use all three to name classes. Any number with `numeric` (regression
/// targets); elsewhere a fractional number is refused, as it usually means
/// continuous targets given to a classifier.
fn scalar_label(value: &Value, numeric: bool) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if numeric || n.is_i64() || n.is_u64() => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A string field; missing, null and non-string values are bad rows.
fn text_field(object: &Map<String, Value>, key: &str, flag: &str) -> Result<String, BadRow> {
    match field(object, key, flag)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("{key:?} is {}; text must be a string", kind(other))),
    }
}

/// The value under `key`; a missing key or null is a bad row whose message
/// lists the keys the line does have, since the usual cause is a wrong name.
fn field<'a>(object: &'a Map<String, Value>, key: &str, flag: &str) -> Result<&'a Value, BadRow> {
    match object.get(key) {
        Some(Value::Null) => Err(format!("{key:?} is null")),
        Some(value) => Ok(value),
        None => {
            let keys: Vec<String> = object.keys().map(|k| format!("{k:?}")).collect();
            Err(format!(
                "no key {key:?}; keys on this line: {}; name the right one with {flag}",
                if keys.is_empty() {
                    "none".to_string()
                } else {
                    keys.join(", ")
                }
            ))
        }
    }
}

/// A JSON value's kind and, when short, the value itself, for messages.
fn kind(value: &Value) -> String {
    let name = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let shown = value.to_string();
    if shown.len() <= 40 && !matches!(value, Value::Null) {
        format!("{name} ({shown})")
    } else {
        name.to_string()
    }
}
