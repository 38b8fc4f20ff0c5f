//! Word-level tagged sentences for token classification: CoNLL files (one
//! `word<TAB or spaces>tag` per line, a blank line between sentences) or
//! JSON Lines with a list of words and a list of tags per line; the BIO tag
//! vocabulary; and the alignment of word tags to subword tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{sha256_hex, utf8};
use crate::error::{Error, Result};

/// One sentence: its words and their BIO tags (as many tags as words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedSentence {
    pub words: Vec<String>,
    pub tags: Vec<String>,
    /// 1-based line of each word (CoNLL: one line per word; JSON Lines:
    /// the sentence's line for all).
    pub lines: Vec<usize>,
}

impl TaggedSentence {
    /// The line the sentence starts on.
    pub fn line(&self) -> usize {
        self.lines.first().copied().unwrap_or(0)
    }
}

/// Which JSON Lines keys hold the words and the tags (CoNLL files have
/// fixed columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSpec {
    pub tokens_column: String,
    pub tags_column: String,
}

impl Default for TagSpec {
    fn default() -> Self {
        TagSpec {
            tokens_column: "tokens".into(),
            tags_column: "tags".into(),
        }
    }
}

/// The sentences of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedDataset {
    pub path: PathBuf,
    pub sentences: Vec<TaggedSentence>,
    /// SHA-256 of the file's bytes, lowercase hex, for training artifacts.
    pub sha256: String,
}

const ACCEPTED: &str = ".conll, .bio, .iob or .txt (CoNLL columns) or .jsonl/.json (JSON Lines)";

/// Reads a tagged file: CoNLL by extension `.conll`, `.bio`, `.iob` or
/// `.txt`, JSON Lines by `.jsonl` or `.json`. Tags must be BIO (`O`,
/// `B-TYPE`, `I-TYPE`); a sentence without words, a tag count that differs
/// from the word count and a file without sentences are errors naming the
/// file and line.
pub fn read_tagged(path: &Path, spec: &TagSpec) -> Result<TaggedDataset> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let sha256 = sha256_hex(&bytes);
    let text = utf8(path, &bytes)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let sentences = match extension.as_deref() {
        Some("conll" | "bio" | "iob" | "txt") => read_conll(path, text)?,
        Some("jsonl" | "json") => read_jsonl(path, text, spec)?,
        _ => {
            return Err(Error::Invalid(format!(
                "{}: unknown tagged-data format; token classification reads {ACCEPTED}: rename or convert the file",
                path.display()
            )))
        }
    };
    if sentences.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no tagged sentences; expected {}",
            path.display(),
            if extension.as_deref().is_some_and(|e| e.starts_with("json")) {
                format!(
                    "one JSON object per line with a {:?} list and a {:?} list",
                    spec.tokens_column, spec.tags_column
                )
            } else {
                "one `word<TAB>tag` per line and a blank line between sentences".into()
            }
        )));
    }
    for sentence in &sentences {
        check_bio(path, sentence)?;
    }
    Ok(TaggedDataset {
        path: path.to_path_buf(),
        sentences,
        sha256,
    })
}

/// CoNLL: the word is the first column, the tag the last (so CoNLL-2003's
/// `word POS chunk NER` works too); `-DOCSTART-` lines are document
/// separators, not words.
fn read_conll(path: &Path, text: &str) -> Result<Vec<TaggedSentence>> {
    let mut sentences = Vec::new();
    let mut current = TaggedSentence {
        words: Vec::new(),
        tags: Vec::new(),
        lines: Vec::new(),
    };
    let mut finish = |current: &mut TaggedSentence| {
        if !current.words.is_empty() {
            sentences.push(std::mem::replace(
                current,
                TaggedSentence {
                    words: Vec::new(),
                    tags: Vec::new(),
                    lines: Vec::new(),
                },
            ));
        }
    };
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            finish(&mut current);
            continue;
        }
        let fields: Vec<&str> = if line.contains('\t') {
            line.split('\t').map(str::trim).collect()
        } else {
            line.split_whitespace().collect()
        };
        if fields[0] == "-DOCSTART-" {
            finish(&mut current);
            continue;
        }
        let (word, tag) = match (fields.first(), fields.last()) {
            (Some(word), Some(tag)) if fields.len() >= 2 && !word.is_empty() && !tag.is_empty() => {
                (*word, *tag)
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{} line {number}: expected a word and a tag separated by a tab or spaces, found {line:?}; put a blank line between sentences and nothing else on a line",
                    path.display()
                )))
            }
        };
        current.words.push(word.to_string());
        current.tags.push(tag.to_string());
        current.lines.push(number);
    }
    finish(&mut current);
    Ok(sentences)
}

fn read_jsonl(path: &Path, text: &str, spec: &TagSpec) -> Result<Vec<TaggedSentence>> {
    let mut sentences = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: String| Error::Invalid(format!("{} line {number}: {what}", path.display()));
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            at(format!(
                "invalid JSON ({e}); each line must be one JSON object"
            ))
        })?;
        let strings = |column: &str, flag: &str| -> Result<Vec<String>> {
            let list = value
                .get(column)
                .and_then(|v| v.as_array())
                .ok_or_else(|| {
                    at(format!(
                        "no {column:?} list of strings; name the key with {flag}"
                    ))
                })?;
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        at(format!(
                            "{column:?} entry {i} is {v}, not a string; every word and tag must be a string"
                        ))
                    })
                })
                .collect()
        };
        let words = strings(&spec.tokens_column, "--tokens-column")?;
        let tags = strings(&spec.tags_column, "--tags-column")?;
        if words.is_empty() {
            return Err(at(format!(
                "empty sentence ({:?} has no words); remove the line",
                spec.tokens_column
            )));
        }
        if words.len() != tags.len() {
            return Err(at(format!(
                "{} words but {} tags; give every word exactly one tag",
                words.len(),
                tags.len()
            )));
        }
        let lines = vec![number; words.len()];
        sentences.push(TaggedSentence { words, tags, lines });
    }
    Ok(sentences)
}

/// Every tag is `O`, `B-TYPE` or `I-TYPE` (the entity metric reads BIO).
fn check_bio(path: &Path, sentence: &TaggedSentence) -> Result<()> {
    for ((word, tag), line) in sentence
        .words
        .iter()
        .zip(&sentence.tags)
        .zip(&sentence.lines)
    {
        if entity_type(tag).is_none() && tag != "O" {
            return Err(Error::Invalid(format!(
                "{} line {line}: tag {tag:?} of word {word:?} is not a BIO tag (O, B-TYPE or I-TYPE); convert the tags to BIO",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The entity type of a `B-` or `I-` tag.
pub fn entity_type(tag: &str) -> Option<&str> {
    tag.strip_prefix("B-")
        .or_else(|| tag.strip_prefix("I-"))
        .filter(|t| !t.is_empty())
}

/// The tags of a token classifier, in output order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSet {
    tags: Vec<String>,
    index: HashMap<String, usize>,
}

impl TagSet {
    /// The distinct tags of a training set, sorted by code point (so the
    /// order does not depend on the data's order).
    pub fn from_training(dataset: &TaggedDataset) -> Self {
        let mut tags: Vec<String> = dataset
            .sentences
            .iter()
            .flat_map(|s| s.tags.iter().cloned())
            .collect();
        tags.sort_unstable();
        tags.dedup();
        Self::from_tags(tags)
    }

    /// Tags in a given order (a saved model's `id2label`).
    pub fn from_tags(tags: Vec<String>) -> Self {
        let index = tags
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        TagSet { tags, index }
    }

    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Every sentence's tag ids; a tag the set lacks (a dev tag unseen in
    /// training) is an error naming it, the file and the line.
    pub fn encode(&self, dataset: &TaggedDataset) -> Result<Vec<Vec<usize>>> {
        dataset
            .sentences
            .iter()
            .map(|s| {
                s.tags
                    .iter()
                    .zip(&s.lines)
                    .map(|(tag, line)| {
                        self.index.get(tag).copied().ok_or_else(|| {
                            Error::Invalid(format!(
                                "{} line {line}: tag {tag:?} was not seen in training (the model's tags: {}); add examples of it to the training data or map it to a known tag",
                                dataset.path.display(),
                                self.tags.join(", ")
                            ))
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// The id a later subword of a word tagged `id` gets under
    /// [`Alignment::AllSubwords`]: `I-TYPE` for `B-TYPE` when the set has
    /// it (a word's continuation is inside its entity), else `id`.
    fn continuation(&self, id: usize) -> usize {
        self.tags[id]
            .strip_prefix("B-")
            .and_then(|t| self.index.get(&format!("I-{t}")))
            .copied()
            .unwrap_or(id)
    }
}

/// Which subwords of a word carry its tag in training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Alignment {
    /// The first subword; the rest are ignored by the loss (-100).
    FirstSubword,
    /// Every subword: the first the word's tag, the rest its `I-` form.
    AllSubwords,
}

/// The training label of each token of an encoded sentence, from the
/// tokenizer's word index per token (None for special tokens) and the
/// sentence's tag ids; None is ignored by the loss. Words cut off by
/// truncation get no label.
pub fn align_tags(
    word_ids: &[Option<usize>],
    tags: &[usize],
    tag_set: &TagSet,
    alignment: Alignment,
) -> Vec<Option<usize>> {
    let mut previous = None;
    word_ids
        .iter()
        .map(|&word| {
            let first = word.is_some() && word != previous;
            previous = word;
            let tag = tags[word?];
            match alignment {
                _ if first => Some(tag),
                Alignment::AllSubwords => Some(tag_set.continuation(tag)),
                Alignment::FirstSubword => None,
            }
        })
        .collect()
}

/// The token position of each word's first subword (None: the word has no
/// token, cut off by truncation or empty after normalisation).
pub fn first_subwords(word_ids: &[Option<usize>], words: usize) -> Vec<Option<usize>> {
    let mut first = vec![None; words];
    for (position, word) in word_ids.iter().enumerate() {
        if let Some(w) = *word {
            if w < words && first[w].is_none() {
                first[w] = Some(position);
            }
        }
    }
    first
}
