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

use std::path::Path;

use crate::artifact::{ArtifactMeta, ProblemType};
use crate::backend::Backend;
use crate::classify::labels_from_config;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::eval::entities;
use crate::model::{BertModel, F32Linears, LinearLoader, ModelFiles, TokenBatch, Workspace};
use crate::tokenize::BertTokenizer;

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
        Ok(self
            .word_logits(sentences)?
            .iter()
            .map(|words| {
                words
                    .iter()
                    .map(|logits| logits.as_deref().map(best_tag))
                    .collect()
            })
            .collect())
    }

    /// Each word's logits (at its first subword), for sentences given as
    /// words; None for a word with no token.
    pub fn word_logits(&mut self, sentences: &[Vec<&str>]) -> Result<Vec<Vec<Option<Vec<f32>>>>> {
        let tokenized = self.tokenizer.encode_words_batch(sentences)?;
        let batch = TokenBatch::from_encoded(tokenized.iter().map(|t| &t.encoded));
        let logits = self.token_logits(&batch)?;
        let classes = self.tags.len();
        Ok(tokenized
            .iter()
            .zip(sentences)
            .enumerate()
            .map(|(s, (t, words))| {
                crate::data::first_subwords(&t.word_ids, words.len())
                    .into_iter()
                    .map(|first| {
                        first.map(|p| {
                            let row = (batch.offsets[s] + p) * classes;
                            logits[row..row + classes].to_vec()
                        })
                    })
                    .collect()
            })
            .collect())
    }

    /// Each whitespace-separated word of each text with its character
    /// offsets, tag and logits, for inspecting a model (and for comparing
    /// it with `transformers`).
    pub fn predict_words(&mut self, texts: &[&str]) -> Result<Vec<Vec<WordPrediction>>> {
        let split: Vec<Vec<Word>> = texts.iter().map(|t| whitespace_words(t)).collect();
        let sentences: Vec<Vec<&str>> = split
            .iter()
            .map(|words| words.iter().map(|w| w.text).collect())
            .collect();
        let logits = self.word_logits(&sentences)?;
        Ok(split
            .iter()
            .zip(logits)
            .map(|(words, logits)| {
                words
                    .iter()
                    .zip(logits)
                    .map(|(word, logits)| WordPrediction {
                        text: word.text.to_string(),
                        start: word.char_start,
                        end: word.char_end,
                        tag: logits
                            .as_deref()
                            .map(|z| self.tags[best_tag(z).tag].clone()),
                        logits,
                    })
                    .collect()
            })
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

    /// The entities of each text, in text order.
    pub fn predict(&mut self, texts: &[&str]) -> Result<Vec<Vec<EntitySpan>>> {
        let split: Vec<Vec<Word>> = texts.iter().map(|t| whitespace_words(t)).collect();
        let sentences: Vec<Vec<&str>> = split
            .iter()
            .map(|words| words.iter().map(|w| w.text).collect())
            .collect();
        let tagged = self.tag_words(&sentences)?;
        Ok(split
            .iter()
            .zip(&tagged)
            .map(|(words, tags)| self.entity_spans(words, tags))
            .collect())
    }

    fn entity_spans(&self, words: &[Word], tags: &[Option<WordTag>]) -> Vec<EntitySpan> {
        let names: Vec<&str> = tags
            .iter()
            .map(|t| t.map_or("O", |t| self.tags[t.tag].as_str()))
            .collect();
        entities(&names)
            .into_iter()
            .map(|e| {
                let (first, last) = (&words[e.start], &words[e.end - 1]);
                let probabilities: Vec<f32> = tags[e.start..e.end]
                    .iter()
                    .flatten()
                    .map(|t| t.probability)
                    .collect();
                EntitySpan {
                    kind: e.kind,
                    text: first.line[first.byte_start..last.byte_end].to_string(),
                    start: first.char_start,
                    end: last.char_end,
                    score: probabilities.iter().sum::<f32>() / probabilities.len().max(1) as f32,
                }
            })
            .collect()
    }
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

/// A whitespace-separated word of a text, with byte and character offsets.
struct Word<'a> {
    line: &'a str,
    text: &'a str,
    byte_start: usize,
    byte_end: usize,
    char_start: usize,
    char_end: usize,
}

fn whitespace_words(line: &str) -> Vec<Word<'_>> {
    let mut words = Vec::new();
    let mut open: Option<(usize, usize)> = None;
    let mut chars = 0;
    for (byte, c) in line.char_indices() {
        match (c.is_whitespace(), open) {
            (true, Some((byte_start, char_start))) => {
                words.push(Word {
                    line,
                    text: &line[byte_start..byte],
                    byte_start,
                    byte_end: byte,
                    char_start,
                    char_end: chars,
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
            line,
            text: &line[byte_start..],
            byte_start,
            byte_end: line.len(),
            char_start,
            char_end: chars,
        });
    }
    words
}
