//! Text to entities with a token-classification model directory (a bertrt
//! artifact or any Hugging Face `BertForTokenClassification` with BIO
//! labels).
//!
//! A text is split into words at whitespace (as the CoNLL and JSON Lines
//! training data is), the words are tokenized with the tokenizer's word
//! index per token, and each word takes the tag predicted at its first
//! subword, the token its tag was trained on. Tags become entities as the
//! entity metric reads them ([`crate::eval::entities`]), and an entity's
//! character offsets are those of its first and last word in the original
//! text.

use std::ops::Range;
use std::path::Path;

use crate::artifact::{ArtifactMeta, ProblemType};
use crate::backend::Backend;
use crate::classify::labels_from_config;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::eval::entities;
use crate::model::{
    BertModel, F32Linears, LinearLoader, ModelFiles, Pooling, TokenBatch, Workspace,
};
use crate::tokenize::{BertTokenizer, WordsEncoded};

pub struct Tagger<B: Backend> {
    pub model: BertModel<B>,
    pub tokenizer: BertTokenizer,
    /// In output order.
    pub tags: Vec<String>,
    pub meta: Option<ArtifactMeta>,
    /// `classifier.weight` `[tags, hidden]` and `classifier.bias`: applied
    /// on the host, a few dot products per token.
    weight: Vec<f32>,
    bias: Vec<f32>,
    workspace: Workspace<B>,
}

/// A word's predicted tag (an index into [`Tagger::tags`]) and its softmax
/// probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WordTag {
    pub tag: usize,
    pub probability: f32,
}

/// One word of a text as the model sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WordPrediction {
    pub text: String,
    /// Character offsets in the text.
    pub start: usize,
    pub end: usize,
    /// None: the word has no token (cut off by `max_length`).
    pub tag: Option<String>,
    pub logits: Option<Vec<f32>>,
}

/// An entity found in a text; `start..end` are character (Unicode scalar)
/// offsets, so `text.chars().skip(start).take(end - start)` is `text`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EntitySpan {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
    pub start: usize,
    pub end: usize,
    /// The mean probability of its words' predicted tags.
    pub score: f32,
}

/// The labels and head of a model directory, from `bertrt.json` or else
/// `config.json`.
fn labels_and_problem(
    dir: &Path,
    meta: Option<&ArtifactMeta>,
) -> Result<(Vec<String>, ProblemType)> {
    match meta {
        Some(meta) => Ok((meta.labels.clone(), ProblemType::from_task(&meta.task))),
        None => labels_from_config(&ModelFiles::locate(dir)?.config),
    }
}

/// Whether the model directory holds a token classifier (so `predict` and
/// `eval` know which head to load).
pub fn is_token_classifier(dir: &Path) -> Result<bool> {
    let meta = ArtifactMeta::read(dir)?;
    let (_, problem_type) = labels_and_problem(dir, meta.as_ref())?;
    Ok(problem_type == ProblemType::TokenClassification)
}

impl<B: Backend> Tagger<B> {
    pub fn load(backend: B, dir: &Path) -> Result<Self> {
        Self::load_with(backend, dir, &F32Linears)
    }

    /// [`Self::load`] with the encoder's linear layers made by `linears`
    /// (bf16 or INT8 on the CPU).
    pub fn load_with(backend: B, dir: &Path, linears: &dyn LinearLoader<B>) -> Result<Self> {
        let files = ModelFiles::locate(dir)?;
        let config = BertConfig::from_file(&files.config)?;
        let meta = ArtifactMeta::read(dir)?;
        let (tags, problem_type) = labels_and_problem(dir, meta.as_ref())?;
        if problem_type != ProblemType::TokenClassification {
            return Err(Error::Invalid(format!(
                "{}: not a token classifier (its task is {:?}); fine-tune one with bertrt finetune --task token-classification",
                dir.display(),
                problem_type.task()
            )));
        }
        let ckpt = files.checkpoint()?;
        let hidden = config.hidden_size;
        let weight = ckpt.tensor("classifier.weight", &[tags.len(), hidden])?;
        let bias = ckpt.tensor("classifier.bias", &[tags.len()])?;
        let max_length = meta.as_ref().map_or(config.max_position_embeddings, |m| {
            m.preprocessing.max_length
        });
        let model = BertModel::from_checkpoint_with(backend, config, &ckpt, linears)?;
        let tokenizer = BertTokenizer::from_dir(dir, max_length)?;
        let workspace = Workspace::new(model.backend());
        Ok(Tagger {
            model,
            tokenizer,
            tags,
            meta,
            weight: weight.to_vec(),
            bias: bias.to_vec(),
            workspace,
        })
    }

    /// Each word's tag, for sentences given as words; None for a word with
    /// no token (cut off by `max_length`, or nothing left after
    /// normalisation), which reads as `O`.
    pub fn tag_words(&mut self, sentences: &[Vec<&str>]) -> Result<Vec<Vec<Option<WordTag>>>> {
        let tokenized = self.tokenizer.encode_words_batch(sentences)?;
        let batch = TokenBatch::from_encoded(tokenized.iter().map(|t| &t.encoded));
        let logits = self.sequence_logits(&batch)?;
        let classes = self.tags.len();
        Ok(tokenized
            .iter()
            .zip(sentences)
            .zip(&logits)
            .map(|((t, words), logits)| {
                first_subword_rows(&t.word_ids, words.len(), logits, classes)
                    .into_iter()
                    .map(|row| row.map(best_tag))
                    .collect()
            })
            .collect())
    }

    /// Each whitespace-separated word of each text with its character
    /// offsets, tag and logits, for inspecting a model (and for comparing
    /// it with `transformers`).
    pub fn predict_words(&mut self, texts: &[&str]) -> Result<Vec<Vec<WordPrediction>>> {
        let inputs = TextWords::encode_batch(&self.tokenizer, texts)?;
        let logits = self.text_logits(&inputs)?;
        Ok(inputs
            .iter()
            .zip(&logits)
            .map(|(input, logits)| input.word_predictions(&self.tags, logits))
            .collect())
    }

    /// Logits `[tokens, tags]` of a token batch, in packed order.
    pub fn token_logits(&mut self, batch: &TokenBatch) -> Result<Vec<f32>> {
        self.model.forward(batch, &mut self.workspace)?;
        let hidden_states = self.model.last_hidden_state(&self.workspace);
        let hidden = self.model.config().hidden_size;
        Ok(hidden_states
            .chunks_exact(hidden)
            .flat_map(|h| {
                self.weight
                    .chunks_exact(hidden)
                    .zip(&self.bias)
                    .map(move |(w, b)| b + w.iter().zip(h).map(|(w, x)| w * x).sum::<f32>())
            })
            .collect())
    }

    /// [`Self::token_logits`] split per sequence: `[tokens, tags]` of each
    /// sequence of `batch`, in order, as [`TextWords::entities`] takes them.
    pub fn sequence_logits(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        let logits = self.token_logits(batch)?;
        let classes = self.tags.len();
        Ok(batch
            .offsets
            .windows(2)
            .map(|s| logits[s[0] * classes..s[1] * classes].to_vec())
            .collect())
    }

    /// One pooled vector per sequence of `batch`, packed `[sequences,
    /// hidden]`: the encoder under the head, as an embedder.
    pub fn pooled(&mut self, batch: &TokenBatch, pooling: Pooling) -> Result<Vec<f32>> {
        self.model.forward(batch, &mut self.workspace)?;
        self.model.pool(batch, &mut self.workspace, pooling)
    }

    /// The entities of each text, in text order.
    pub fn predict(&mut self, texts: &[&str]) -> Result<Vec<Vec<EntitySpan>>> {
        let inputs = TextWords::encode_batch(&self.tokenizer, texts)?;
        let logits = self.text_logits(&inputs)?;
        Ok(inputs
            .iter()
            .zip(&logits)
            .map(|(input, logits)| input.entities(&self.tags, logits))
            .collect())
    }

    fn text_logits(&mut self, inputs: &[TextWords]) -> Result<Vec<Vec<f32>>> {
        let batch = TokenBatch::from_encoded(inputs.iter().map(|input| &input.tokens.encoded));
        self.sequence_logits(&batch)
    }
}

/// A text split into words at whitespace and tokenized with each token's
/// word: what a tagger runs on, and what reads its logits back as words and
/// entities in the text's own offsets. Kept apart from the model so that a
/// server can tokenize on its request threads and decode there too.
pub struct TextWords {
    text: String,
    words: Vec<Word>,
    pub tokens: WordsEncoded,
}

impl TextWords {
    pub fn encode(tokenizer: &BertTokenizer, text: &str) -> Result<Self> {
        Ok(Self::encode_batch(tokenizer, &[text])?.remove(0))
    }

    /// Splits and tokenizes `texts` (in parallel), in input order.
    pub fn encode_batch(tokenizer: &BertTokenizer, texts: &[&str]) -> Result<Vec<Self>> {
        let words: Vec<Vec<Word>> = texts.iter().map(|text| whitespace_words(text)).collect();
        let sentences: Vec<Vec<&str>> = texts
            .iter()
            .zip(&words)
            .map(|(text, words)| words.iter().map(|w| &text[w.bytes.clone()]).collect())
            .collect();
        let tokens = tokenizer.encode_words_batch(&sentences)?;
        Ok(texts
            .iter()
            .zip(words)
            .zip(tokens)
            .map(|((text, words), tokens)| TextWords {
                text: (*text).to_owned(),
                words,
                tokens,
            })
            .collect())
    }

    /// The entities of the text, in text order, from the logits `[tokens,
    /// tags.len()]` of its tokens ([`Tagger::sequence_logits`]).
    pub fn entities(&self, tags: &[String], logits: &[f32]) -> Vec<EntitySpan> {
        let tagged: Vec<Option<WordTag>> = self
            .word_rows(logits, tags.len())
            .into_iter()
            .map(|row| row.map(best_tag))
            .collect();
        let names: Vec<&str> = tagged
            .iter()
            .map(|t| t.map_or("O", |t| tags[t.tag].as_str()))
            .collect();
        entities(&names)
            .into_iter()
            .map(|e| {
                let (first, last) = (&self.words[e.start], &self.words[e.end - 1]);
                let probabilities: Vec<f32> = tagged[e.start..e.end]
                    .iter()
                    .flatten()
                    .map(|t| t.probability)
                    .collect();
                EntitySpan {
                    kind: e.kind,
                    text: self.text[first.bytes.start..last.bytes.end].to_string(),
                    start: first.chars.start,
                    end: last.chars.end,
                    score: probabilities.iter().sum::<f32>() / probabilities.len().max(1) as f32,
                }
            })
            .collect()
    }

    /// Every word with its offsets, tag and logits, from the logits of the
    /// text's tokens.
    pub fn word_predictions(&self, tags: &[String], logits: &[f32]) -> Vec<WordPrediction> {
        self.words
            .iter()
            .zip(self.word_rows(logits, tags.len()))
            .map(|(word, row)| WordPrediction {
                text: self.text[word.bytes.clone()].to_string(),
                start: word.chars.start,
                end: word.chars.end,
                tag: row.map(|z| tags[best_tag(z).tag].clone()),
                logits: row.map(<[f32]>::to_vec),
            })
            .collect()
    }

    fn word_rows<'l>(&self, logits: &'l [f32], classes: usize) -> Vec<Option<&'l [f32]>> {
        first_subword_rows(&self.tokens.word_ids, self.words.len(), logits, classes)
    }
}

/// Each word's row of a sequence's `logits` (`[tokens, classes]`) at its
/// first subword; None for a word with no token.
fn first_subword_rows<'l>(
    word_ids: &[Option<usize>],
    words: usize,
    logits: &'l [f32],
    classes: usize,
) -> Vec<Option<&'l [f32]>> {
    crate::data::first_subwords(word_ids, words)
        .into_iter()
        .map(|first| first.map(|p| &logits[p * classes..(p + 1) * classes]))
        .collect()
}

/// The most probable tag of a token's logits, with its softmax probability.
fn best_tag(logits: &[f32]) -> WordTag {
    let (tag, &top) = logits
        .iter()
        .enumerate()
        .fold((0, &f32::NEG_INFINITY), |best, (i, z)| {
            if *z > *best.1 {
                (i, z)
            } else {
                best
            }
        });
    let sum: f32 = logits.iter().map(|&z| (z - top).exp()).sum();
    WordTag {
        tag,
        probability: 1.0 / sum,
    }
}

/// A whitespace-separated word: its byte and character ranges in the text.
struct Word {
    bytes: Range<usize>,
    chars: Range<usize>,
}

fn whitespace_words(line: &str) -> Vec<Word> {
    let mut words = Vec::new();
    let mut open: Option<(usize, usize)> = None;
    let mut chars = 0;
    for (byte, c) in line.char_indices() {
        match (c.is_whitespace(), open) {
            (true, Some((byte_start, char_start))) => {
                words.push(Word {
                    bytes: byte_start..byte,
                    chars: char_start..chars,
                });
                open = None;
            }
            (false, None) => open = Some((byte, chars)),
            _ => {}
        }
        chars += 1;
    }
    if let Some((byte_start, char_start)) = open {
        words.push(Word {
            bytes: byte_start..line.len(),
            chars: char_start..chars,
        });
    }
    words
}
