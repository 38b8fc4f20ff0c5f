//! Text input, one text per line, from a file or stdin. Texts that contain
//! newlines come as JSON lines instead (`--jsonl`).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Texts from `path`, or from stdin when `None`. `\n` and `\r\n` both end a
/// line; an empty line is an empty text, not skipped.
pub struct Texts {
    source: String,
    reader: Box<dyn BufRead>,
    line: usize,
    jsonl: bool,
}

impl Texts {
    pub fn open(args: &InputArgs) -> Result<Self> {
        let path = args.input.as_deref();
        let (source, reader): (String, Box<dyn BufRead>) = match path {
            Some(path) => {
                let file = File::open(path)
                    .with_context(|| format!("cannot open input {}", path.display()))?;
                (path.display().to_string(), Box::new(BufReader::new(file)))
            }
            None => ("stdin".into(), Box::new(std::io::stdin().lock())),
        };
        Ok(Texts {
            source,
            reader,
            line: 0,
            jsonl: args.jsonl,
        })
    }

    /// Up to `max` more lines; empty at end of input.
    pub fn next_chunk(&mut self, max: usize) -> Result<Vec<String>> {
        let mut chunk = Vec::new();
        while chunk.len() < max {
            let mut raw = Vec::new();
            let read = self
                .reader
                .read_until(b'\n', &mut raw)
                .with_context(|| format!("cannot read {}", self.source))?;
            if read == 0 {
                break;
            }
            self.line += 1;
            if raw.ends_with(b"\n") {
                raw.pop();
                if raw.ends_with(b"\r") {
                    raw.pop();
                }
            }
            let text = String::from_utf8(raw)
                .with_context(|| format!("{} line {}: not valid UTF-8", self.source, self.line))?;
            chunk.push(if self.jsonl {
                self.parse_json_text(&text)?
            } else {
                text
            });
        }
        Ok(chunk)
    }

    /// A JSON string, or an object with a string field "text".
    fn parse_json_text(&self, line: &str) -> Result<String> {
        let at = || format!("{} line {}", self.source, self.line);
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        match value {
            serde_json::Value::String(text) => Ok(text),
            serde_json::Value::Object(mut map) => match map.remove("text") {
                Some(serde_json::Value::String(text)) => Ok(text),
                _ => bail!("{}: the object needs a string field \"text\"", at()),
            },
            _ => bail!("{}: expected a JSON string or {{\"text\": ...}}", at()),
        }
    }
}

/// Runs `handle` on successive chunks of up to `chunk` texts from `input`,
/// giving it buffered stdout to write JSON lines to; output order follows
/// input order and memory stays bounded on any input size.
pub fn for_each_chunk(
    input: &InputArgs,
    chunk: usize,
    mut handle: impl FnMut(&[&str], &mut dyn std::io::Write) -> Result<()>,
) -> Result<()> {
    let mut texts = Texts::open(input)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let owned = texts.next_chunk(chunk)?;
        if owned.is_empty() {
            break;
        }
        let borrowed: Vec<&str> = owned.iter().map(String::as_str).collect();
        handle(&borrowed, &mut out)?;
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}

/// Where texts come from.
#[derive(clap::Args)]
pub struct InputArgs {
    /// Read texts from FILE instead of stdin.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Each line is a JSON string or {"text": ...} (for texts with newlines).
    #[arg(long)]
    pub jsonl: bool,
}
