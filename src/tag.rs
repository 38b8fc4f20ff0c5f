//! Text to entities with a token-classification model directory (a bertrt
//! artifact or any Hugging Face `BertForTokenClassification` with BIO
//! labels).
//!
//! A raw text is split into words as the model's tokenizer pre-tokenizes
//! it ([`BertTokenizer::words`]: for BERT at whitespace and around every
//! punctuation character, so `Paris.` is `Paris` and `.`), the words are
//! tokenized with the tokenizer's word index per token, and each word takes
//! the tag predicted at its first subword, the token its tag was trained
//! on. Tags become entities as the entity metric reads them
//! ([`crate::eval::entities`]), and an entity spans the original text from
//! its first word's start to its last word's end (so `New York` keeps its
//! inner whitespace), in character offsets.
//!
//! Why the tokenizer's own split rather than rules written here: it is the
//! code that tokenizes the text, so a word is exactly what the tokenizer
//! (and the Hugging Face pipeline, through `word_ids`) calls one, with its
//! offsets mapped back through normalization; BERT's CJK split lives in its
//! normalizer (`handle_chinese_chars`), not its pre-tokenizer, and a
//! `tokenizer.json` may turn it off or use another pre-tokenizer, all of
//! which hand-written rules would have to copy and keep in step. It
//! matches training where the training words were split the same way, as
//! WNUT-16 and CoNLL-2003 split off sentence punctuation. Datasets differ on
//! contractions, hyphens and abbreviations, though: CoNLL-2003 keeps `U.S.`
//! and hyphenated words such as `Anglo-Dutch` whole, and other data may keep
//! `don't` whole. Each training word is tokenized whole, so there such a
//! word is one word tagged at its first subword, while BERT's split of raw
//! text makes every `.`, `-` and `'` a word of its own; an entity still
//! spans the pieces when they are tagged `B-`, `I-`, `I-`.
//!
//! A text too long for the tokenizer's `max_length` is not cut: as Hugging
//! Face's pipeline does with `stride`, its words are split into overlapping
//! windows that each fit, every window runs, and each word is read from the
//! window in which it has the most context ([`WordWindows`]).

use std::ops::Range;
use std::path::Path;

use crate::artifact::{ArtifactMeta, ProblemType};
use crate::backend::Backend;
use crate::classify::labels_from_config;
use crate::config::BertConfig;
use crate::data::first_subwords;
use crate::error::{Error, Result};
use crate::eval::entities;
use crate::model::{
    BertModel, F32Linears, LinearLoader, ModelFiles, Pooling, TokenBatch, Workspace,
};
use crate::tokenize::{BertTokenizer, Encoded, WordsEncoded};

/// Consecutive windows of a text too long for `max_length` share up to this
/// fraction of a window's tokens: a quarter, 127 of the 510 tokens that
/// `max_length` 512 leaves beside `[CLS]` and `[SEP]` (close to the 128 of
/// Hugging Face's question-answering `doc_stride`). A word in an overlap is
/// read from the window where it lies farther from the cut, so every word
/// keeps about half an overlap (some 64 tokens) of context on its cut side,
/// while the text costs only about 4/3 of its own tokens to run.
pub const OVERLAP_DIVISOR: usize = 4;

/// Most tokens a tagger runs in one forward pass (`serve`'s default
/// `--max-batch-tokens`): a long input is many windows, and one pass over
/// all of them would take memory in proportion to its whole length.
pub const FORWARD_TOKENS: usize = 16384;

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
    /// None: the word has no token (nothing of it left after
    /// normalisation); a long text's words are all tagged ([`WordWindows`]).
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

    /// Each word's tag, for sentences given as words (a sentence longer
    /// than `max_length` in windows, [`WordWindows`]); None for a word with
    /// no token (nothing left after normalisation), which reads as `O`.
    pub fn tag_words(&mut self, sentences: &[Vec<&str>]) -> Result<Vec<Vec<Option<WordTag>>>> {
        let windowed = WordWindows::encode_batch(&self.tokenizer, sentences)?;
        let logits = self.windows_logits(&windowed.iter().collect::<Vec<_>>())?;
        let classes = self.tags.len();
        Ok(windowed
            .iter()
            .zip(&logits)
            .map(|(windows, logits)| {
                windows
                    .word_rows(logits, classes)
                    .into_iter()
                    .map(|row| row.map(best_tag))
                    .collect()
            })
            .collect())
    }

    /// Each word of each text ([`BertTokenizer::words`]) with its character
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
        self.windows_logits(&inputs.iter().map(|input| &input.tokens).collect::<Vec<_>>())
    }

    /// The windows of all `sentences` run in batches of at most
    /// [`FORWARD_TOKENS`] tokens, and their logits split per sentence:
    /// `[tokens, tags]` of its windows' tokens in order, as
    /// [`WordWindows::word_rows`] reads them.
    fn windows_logits(&mut self, sentences: &[&WordWindows]) -> Result<Vec<Vec<f32>>> {
        let mut logits = Vec::new();
        let mut windows = sentences.iter().flat_map(|s| s.encoded()).peekable();
        while windows.peek().is_some() {
            let mut tokens = 0;
            let batch = std::iter::from_fn(|| {
                let window =
                    windows.next_if(|w| tokens == 0 || tokens + w.ids.len() <= FORWARD_TOKENS)?;
                tokens += window.ids.len();
                Some(window)
            });
            logits.extend(self.token_logits(&TokenBatch::from_encoded(batch))?);
        }
        let classes = self.tags.len();
        let mut rest = logits.as_slice();
        Ok(sentences
            .iter()
            .map(|sentence| {
                let (mine, after) = rest.split_at(sentence.token_count() * classes);
                rest = after;
                mine.to_vec()
            })
            .collect())
    }
}

/// One sequence the model runs for a sentence: its words `words`,
/// tokenized (`tokens.word_ids` count from `words.start`).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub words: Range<usize>,
    pub tokens: WordsEncoded,
}

/// A sentence's words tokenized for a tagger, in windows that each fit the
/// tokenizer's `max_length`.
///
/// A sentence that fits is one window, tokenized exactly as
/// [`BertTokenizer::encode_words_batch`] tokenizes it. A longer one is split
/// between words (a word's subwords stay together) into windows of at most
/// `max_length` tokens, special tokens included, each sharing up to a
/// quarter of a window ([`OVERLAP_DIVISOR`]) with the next and none with
/// the one after. Each word is read from the window that owns it: of those
/// holding its first subword, the one where that subword lies farthest from
/// a cut (an edge of the window inside the sentence; the earlier window on
/// a tie), where it has the most context. Two windows thus split their
/// overlap in the middle: its first half belongs to the earlier window, its
/// second half to the later. A word with more tokens than a window holds is
/// the one exception to keeping words whole: it gets a window of its own,
/// cut to its first tokens, and is still tagged at its first subword.
#[derive(Clone, Debug, PartialEq)]
pub struct WordWindows {
    /// In sentence order.
    pub windows: Vec<Window>,
    /// Each word's row in the logits of the windows' tokens in order: its
    /// first subword in the window that owns it; None for a word with no
    /// token.
    rows: Vec<Option<usize>>,
}

impl WordWindows {
    /// Tokenizes `sentences` (in parallel), in input order; a sentence that
    /// does not fit is tokenized again, window by window.
    pub fn encode_batch(tokenizer: &BertTokenizer, sentences: &[Vec<&str>]) -> Result<Vec<Self>> {
        let whole = tokenizer.encode_words_batch(sentences)?;
        let splits: Vec<Option<Vec<Range<usize>>>> = whole.iter().map(window_ranges).collect();
        // The windows of all sentences in one (parallel) call.
        let pieces: Vec<Vec<&str>> = sentences
            .iter()
            .zip(&splits)
            .flat_map(|(words, split)| {
                split
                    .iter()
                    .flatten()
                    .map(|range| words[range.clone()].to_vec())
            })
            .collect();
        let mut pieces = tokenizer.encode_words_batch(&pieces)?.into_iter();
        Ok(whole
            .into_iter()
            .zip(splits)
            .map(|(whole, split)| {
                let words = whole.word_lengths.len();
                let windows = match split {
                    None => vec![Window {
                        words: 0..words,
                        tokens: whole,
                    }],
                    Some(ranges) => {
                        let tokens = pieces.by_ref().take(ranges.len());
                        ranges
                            .into_iter()
                            .zip(tokens)
                            .map(|(words, tokens)| Window { words, tokens })
                            .collect()
                    }
                };
                WordWindows {
                    rows: owned_rows(&windows, words),
                    windows,
                }
            })
            .collect())
    }

    /// The model's input sequences, one per window, in order.
    pub fn encoded(&self) -> impl Iterator<Item = &Encoded> {
        self.windows.iter().map(|window| &window.tokens.encoded)
    }

    /// Tokens in all windows, special tokens included.
    pub fn token_count(&self) -> usize {
        self.encoded().map(|encoded| encoded.ids.len()).sum()
    }

    /// The sentence's own tokens with one `[CLS]` and `[SEP]`: what it
    /// would take as one sequence, counting the words that windows share
    /// once.
    pub fn text_token_count(&self) -> usize {
        let mut counted = 0;
        let words: usize = self
            .windows
            .iter()
            .map(|window| {
                let start = window.words.start;
                let new = counted.max(start) - start..window.words.end - start;
                counted = window.words.end;
                window.tokens.word_lengths[new].iter().sum::<usize>()
            })
            .sum();
        words + 2
    }

    /// Each word's row of `logits` (`[tokens, classes]`, the windows' tokens
    /// in order): its first subword in the window that owns it; None for a
    /// word with no token.
    fn word_rows<'l>(&self, logits: &'l [f32], classes: usize) -> Vec<Option<&'l [f32]>> {
        self.rows
            .iter()
            .map(|row| row.map(|r| &logits[r * classes..(r + 1) * classes]))
            .collect()
    }
}

/// The word ranges of the windows that a tokenized sentence is split into;
/// None when it fits whole.
fn window_ranges(whole: &WordsEncoded) -> Option<Vec<Range<usize>>> {
    let kept = whole.word_ids.iter().flatten().count();
    if kept == whole.word_lengths.iter().sum::<usize>() {
        return None;
    }
    // Truncation kept exactly as many tokens as `max_length` leaves room
    // for beside the special tokens: a window's capacity.
    Some(split_words(
        &whole.word_lengths,
        kept,
        kept / OVERLAP_DIVISOR,
    ))
}

/// The fewest windows ([`WordWindows`]) a text with `words` words that take
/// a token each can run as, in windows of `capacity` tokens beside the
/// special tokens: a lower bound found without tokenizing the text. Words
/// of one token pack tightest, the first window holding `capacity` of them
/// and each later one `capacity - capacity / OVERLAP_DIVISOR` more beside
/// those it shares with the one before; longer words only take more
/// windows, and words without tokens none. A text without words is one
/// window. `capacity` is at least 1 ([`BertTokenizer::from_dir`] refuses
/// less).
pub fn fewest_windows(words: usize, capacity: usize) -> usize {
    let beyond_the_first = words.saturating_sub(capacity);
    1 + beyond_the_first.div_ceil(capacity - capacity / OVERLAP_DIVISOR)
}

/// Windows over words of `lengths` tokens each, as word ranges in order:
/// each as many words as fit in `capacity` tokens (a longer word alone),
/// consecutive ones sharing up to `overlap` tokens of whole words, and no
/// word in more than two.
fn split_words(lengths: &[usize], capacity: usize, overlap: usize) -> Vec<Range<usize>> {
    let mut windows: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    while start < lengths.len() {
        let end = start + words_within(&lengths[start..], capacity).max(1);
        windows.push(start..end);
        if end == lengths.len() {
            break;
        }
        // The next window starts back at the last words of this one, within
        // the overlap and so that it still takes in the word after them,
        // but never before this window's predecessor ends. With no room it
        // shares nothing, not even words without tokens, which would make a
        // window of their own before a word longer than the capacity.
        let room = overlap.min(capacity.saturating_sub(lengths[end]));
        let shared = match room {
            0 => 0,
            _ => words_within(lengths[start + 1..end].iter().rev(), room),
        };
        let predecessor_end = windows.len().checked_sub(2).map_or(0, |i| windows[i].end);
        start = (end - shared).max(predecessor_end);
    }
    windows
}

/// How many of `lengths`, taken in order, fit in `budget` tokens.
fn words_within<'a>(lengths: impl IntoIterator<Item = &'a usize>, budget: usize) -> usize {
    lengths
        .into_iter()
        .scan(0, |total, &length| {
            *total += length;
            (*total <= budget).then_some(())
        })
        .count()
}

/// Each word's row in the logits of `windows`' tokens in order: its first
/// subword in the window where that subword lies farthest from a cut (an
/// edge of the window inside the sentence; the sentence's own start and end
/// cut nothing), the earlier window on a tie; None for a word with no token.
fn owned_rows(windows: &[Window], words: usize) -> Vec<Option<usize>> {
    // (tokens from the nearest cut, row) of each word's best window so far.
    let mut best: Vec<Option<(usize, usize)>> = vec![None; words];
    let mut offset = 0;
    for (index, window) in windows.iter().enumerate() {
        let word_ids = &window.tokens.word_ids;
        // The window's first and last tokens of the text (special tokens
        // aside), if it has any.
        let first_text = word_ids.iter().position(Option::is_some).unwrap_or(0);
        let last_text = word_ids.iter().rposition(Option::is_some).unwrap_or(0);
        let (cut_before, cut_after) = (index > 0, index + 1 < windows.len());
        let firsts = first_subwords(word_ids, window.words.len());
        for (word, row) in window.words.clone().zip(firsts) {
            let Some(row) = row else { continue };
            let from_cut = match (cut_before, cut_after) {
                (true, true) => (row - first_text).min(last_text - row),
                (true, false) => row - first_text,
                (false, true) => last_text - row,
                (false, false) => usize::MAX,
            };
            if best[word].is_none_or(|(best_from_cut, _)| from_cut > best_from_cut) {
                best[word] = Some((from_cut, offset + row));
            }
        }
        offset += word_ids.len();
    }
    best.into_iter().map(|b| b.map(|(_, row)| row)).collect()
}

/// A text split into words as its tokenizer pre-tokenizes it
/// ([`BertTokenizer::words`]) and tokenized with each token's word: what a tagger runs on, and what reads its logits back as words and
/// entities in the text's own offsets. Kept apart from the model so that a
/// server can tokenize on its request threads and decode there too.
pub struct TextWords {
    text: String,
    words: Vec<Word>,
    /// The words tokenized: one window, or several for a text longer than
    /// `max_length`.
    pub tokens: WordWindows,
}

impl TextWords {
    pub fn encode(tokenizer: &BertTokenizer, text: &str) -> Result<Self> {
        Ok(Self::encode_batch(tokenizer, &[text])?.remove(0))
    }

    /// Splits and tokenizes `texts` (in parallel), in input order.
    pub fn encode_batch(tokenizer: &BertTokenizer, texts: &[&str]) -> Result<Vec<Self>> {
        let words = texts
            .iter()
            .map(|text| Ok(char_offsets(text, tokenizer.words(text)?)))
            .collect::<Result<Vec<Vec<Word>>>>()?;
        let sentences: Vec<Vec<&str>> = texts
            .iter()
            .zip(&words)
            .map(|(text, words)| words.iter().map(|w| &text[w.bytes.clone()]).collect())
            .collect();
        let tokens = WordWindows::encode_batch(tokenizer, &sentences)?;
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
    /// tags.len()]` of its windows' tokens in order (its windows' rows of
    /// [`Tagger::sequence_logits`], concatenated).
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
    /// text's windows' tokens, as [`Self::entities`] takes them.
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
        self.tokens.word_rows(logits, classes)
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

/// A word: its byte and character ranges in the text.
#[derive(Clone, Debug, PartialEq)]
struct Word {
    bytes: Range<usize>,
    chars: Range<usize>,
}

/// Words given as byte ranges of `text` (in order, not overlapping) with
/// their character ranges added.
fn char_offsets(text: &str, words: Vec<Range<usize>>) -> Vec<Word> {
    let (mut byte, mut chars) = (0, 0);
    let mut to_chars = |to: usize| {
        chars += text[byte..to].chars().count();
        byte = to;
        chars
    };
    words
        .into_iter()
        .map(|bytes| Word {
            chars: to_chars(bytes.start)..to_chars(bytes.end),
            bytes,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: &[&str] = &[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "live", "in", "paris", "new", "york",
        "st", "louis", "he", "flew", "to", "then", "don", "t", "'", ".", ",", "-", "!", "and",
        "muller", "zurich", "koln", "wohnt", "nicht", "东", "京", "。",
    ];
    const TAGS: [&str; 3] = ["B-LOC", "I-LOC", "O"];

    fn tokenizer() -> BertTokenizer {
        tokenizer_at(64)
    }

    fn tokenizer_at(max_length: usize) -> BertTokenizer {
        BertTokenizer::from_dir(vocab_dir().path(), max_length).unwrap()
    }

    /// A model directory with [`VOCAB`] as its `vocab.txt`.
    fn vocab_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
        dir
    }

    fn tags() -> Vec<String> {
        TAGS.iter().map(|t| t.to_string()).collect()
    }

    /// Logits that give each token its word's tag (from `word_tags`, one
    /// per word) and the special tokens `O`.
    fn logits(input: &TextWords, word_tags: &[&str]) -> Vec<f32> {
        assert_eq!(input.words.len(), word_tags.len(), "one tag per word");
        token_words(&input.tokens)
            .into_iter()
            .flat_map(|word| {
                let tag = word.map_or("O", |w| word_tags[w]);
                TAGS.iter().map(move |t| if *t == tag { 4.0 } else { 0.0 })
            })
            .collect()
    }

    /// The sentence's word of each token of the windows, in order.
    fn token_words(windowed: &WordWindows) -> Vec<Option<usize>> {
        windowed
            .windows
            .iter()
            .flat_map(|window| {
                let first = window.words.start;
                window
                    .tokens
                    .word_ids
                    .iter()
                    .map(move |w| w.map(|w| first + w))
            })
            .collect()
    }

    /// The tokens of a text that fits one window.
    fn tokens(input: &TextWords) -> &[String] {
        assert_eq!(input.tokens.windows.len(), 1);
        &input.tokens.windows[0].tokens.encoded.tokens
    }

    fn words(input: &TextWords) -> Vec<&str> {
        input
            .words
            .iter()
            .map(|w| &input.text[w.bytes.clone()])
            .collect()
    }

    /// The entities as `(text, start, end)`, each checked to be the
    /// characters `start..end` of the text.
    fn entities_of(input: &TextWords, word_tags: &[&str]) -> Vec<(String, usize, usize)> {
        input
            .entities(&tags(), &logits(input, word_tags))
            .into_iter()
            .map(|e| {
                assert_eq!(e.kind, "LOC");
                let slice: String = input
                    .text
                    .chars()
                    .skip(e.start)
                    .take(e.end - e.start)
                    .collect();
                assert_eq!(slice, e.text, "{e:?}");
                (e.text, e.start, e.end)
            })
            .collect()
    }

    #[test]
    fn sentence_punctuation_is_a_word_and_not_part_of_the_entity() {
        let tokenizer = tokenizer();
        let input = TextWords::encode(&tokenizer, "I live in Paris.").unwrap();
        assert_eq!(words(&input), ["I", "live", "in", "Paris", "."]);
        assert_eq!(
            tokens(&input),
            ["[CLS]", "i", "live", "in", "paris", ".", "[SEP]"]
        );
        assert_eq!(
            entities_of(&input, &["O", "O", "O", "B-LOC", "O"]),
            [("Paris".to_string(), 10, 15)]
        );
        let predictions = input.word_predictions(&tags(), &logits(&input, &["O"; 5]));
        let spans: Vec<(&str, usize, usize)> = predictions
            .iter()
            .map(|w| (w.text.as_str(), w.start, w.end))
            .collect();
        assert_eq!(
            spans,
            [
                ("I", 0, 1),
                ("live", 2, 6),
                ("in", 7, 9),
                ("Paris", 10, 15),
                (".", 15, 16)
            ]
        );
    }

    #[test]
    fn entities_span_whitespace_and_punctuation_between_their_words() {
        let tokenizer = tokenizer();
        let text = "He flew to  New York, then St. Louis!";
        let input = TextWords::encode(&tokenizer, text).unwrap();
        assert_eq!(
            words(&input),
            ["He", "flew", "to", "New", "York", ",", "then", "St", ".", "Louis", "!"]
        );
        let found = entities_of(
            &input,
            &[
                "O", "O", "O", "B-LOC", "I-LOC", "O", "O", "B-LOC", "I-LOC", "I-LOC", "O",
            ],
        );
        assert_eq!(
            found,
            [
                ("New York".to_string(), 12, 20),
                ("St. Louis".to_string(), 27, 36)
            ]
        );
        // Apostrophes and hyphens are BERT punctuation: words of their own.
        let input = TextWords::encode(&tokenizer, "don't New-York").unwrap();
        assert_eq!(words(&input), ["don", "'", "t", "New", "-", "York"]);
        assert_eq!(
            entities_of(&input, &["O", "O", "O", "B-LOC", "I-LOC", "I-LOC"]),
            [("New-York".to_string(), 6, 14)]
        );
    }

    #[test]
    fn non_ascii_text_has_character_offsets_and_cjk_characters_are_words() {
        let tokenizer = tokenizer();
        // Accents are stripped by the normalizer but the words and offsets
        // are the input's; the em dash is punctuation, `€` and `×` are not.
        let text = "Müller wohnt in Zürich—nicht in Köln! €5 2×3";
        let input = TextWords::encode(&tokenizer, text).unwrap();
        assert_eq!(
            words(&input),
            [
                "Müller", "wohnt", "in", "Zürich", "—", "nicht", "in", "Köln", "!", "€5", "2×3"
            ]
        );
        assert_eq!(&tokens(&input)[4..5], ["zurich"]);
        let tags = [
            "B-LOC", "O", "O", "B-LOC", "O", "O", "O", "B-LOC", "O", "O", "O",
        ];
        assert_eq!(
            entities_of(&input, &tags),
            [
                ("Müller".to_string(), 0, 6),
                ("Zürich".to_string(), 16, 22),
                ("Köln".to_string(), 32, 36)
            ]
        );
        let input = TextWords::encode(&tokenizer, "我住在东京。 in 东京").unwrap();
        assert_eq!(
            words(&input),
            ["我", "住", "在", "东", "京", "。", "in", "东", "京"]
        );
        assert_eq!(
            entities_of(
                &input,
                &["O", "O", "O", "B-LOC", "I-LOC", "O", "O", "B-LOC", "I-LOC"]
            ),
            [("东京".to_string(), 3, 5), ("东京".to_string(), 10, 12)]
        );
    }

    #[test]
    fn words_are_the_tokenizers_words_of_the_raw_text() {
        // Tokenized as words, a text gives the tokens it gives whole, so
        // each word is one the tokenizer itself would count.
        let tokenizer = tokenizer();
        for text in [
            "I live in Paris.",
            " \tHe flew\u{a0}to New York,then St.Louis!! ",
            "don't [MASK] Zürich—Köln 东京。",
            "",
            "   ",
        ] {
            let input = TextWords::encode(&tokenizer, text).unwrap();
            assert_eq!(
                tokens(&input),
                tokenizer.encode(text).unwrap().tokens,
                "{text:?}"
            );
            for word in words(&input) {
                assert!(
                    !word.is_empty() && word.trim() == word,
                    "{text:?}: {word:?}"
                );
            }
        }
        assert!(TextWords::encode(&tokenizer, "   ")
            .unwrap()
            .words
            .is_empty());
    }

    #[test]
    fn a_tokenizer_json_pre_tokenizer_is_followed() {
        // The same vocabulary with a pre-tokenizer that splits at whitespace
        // only: `Paris.` is then one word, as that tokenizer sees it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tokenizer().save(&path).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["pre_tokenizer"] = serde_json::json!({"type": "WhitespaceSplit"});
        std::fs::write(&path, json.to_string()).unwrap();
        let tokenizer = BertTokenizer::from_dir(dir.path(), 64).unwrap();
        let input = TextWords::encode(&tokenizer, "I live in Paris. 东京").unwrap();
        assert_eq!(words(&input), ["I", "live", "in", "Paris.", "东", "京"]);
    }

    /// How many tokens the words `words` have, of `lengths`.
    fn tokens_in(lengths: &[usize], words: Range<usize>) -> usize {
        lengths[words].iter().sum()
    }

    #[test]
    fn windows_break_between_words_within_the_capacity_and_overlap() {
        assert_eq!(split_words(&[1; 20], 8, 2), [0..8, 6..14, 12..20]);
        // A word over the capacity has a window of its own, shared with none.
        assert_eq!(split_words(&[1, 1, 9, 1, 1], 4, 1), [0..2, 2..3, 3..5]);
        let lengths = [2, 1, 3, 1, 1, 2, 4, 1, 1, 2, 1, 3, 1, 2, 1, 1, 6, 1, 2];
        let mut shared_words = 0;
        for (capacity, overlap) in [(4, 1), (5, 1), (6, 1), (8, 2), (10, 2), (12, 3)] {
            let windows = split_words(&lengths, capacity, overlap);
            let case = format!("capacity {capacity}, overlap {overlap}: {windows:?}");
            assert_eq!(windows[0].start, 0, "{case}");
            assert_eq!(windows.last().unwrap().end, lengths.len(), "{case}");
            for window in &windows {
                let fits = tokens_in(&lengths, window.clone()) <= capacity;
                assert!(fits || window.len() == 1, "{case}");
            }
            for pair in windows.windows(2) {
                let (earlier, later) = (&pair[0], &pair[1]);
                assert!(
                    earlier.start < later.start && later.start <= earlier.end,
                    "{case}"
                );
                assert!(earlier.end < later.end, "{case}");
                assert!(
                    tokens_in(&lengths, later.start..earlier.end) <= overlap,
                    "{case}"
                );
                shared_words += earlier.end - later.start;
            }
            for triple in windows.windows(3) {
                assert!(triple[0].end <= triple[2].start, "{case}");
            }
        }
        assert!(shared_words > 0, "some windows overlap");
    }

    /// Every pattern of word lengths, small enough to try them all.
    fn all_lengths(words: usize, longest: usize) -> impl Iterator<Item = Vec<usize>> {
        let patterns = (longest + 1).pow(words as u32);
        (0..patterns).map(move |mut code| {
            (0..words)
                .map(|_| {
                    let length = code % (longest + 1);
                    code /= longest + 1;
                    length
                })
                .collect()
        })
    }

    #[test]
    fn fewest_windows_bounds_every_split_and_is_reached_by_one_token_words() {
        for capacity in 1..=8 {
            let longest = if capacity <= 4 { capacity + 1 } else { 2 };
            for words in 1..=7 {
                for lengths in all_lengths(words, longest) {
                    // A text that fits is one window (`window_ranges`).
                    let windows = match lengths.iter().sum::<usize>() <= capacity {
                        true => 1,
                        false => split_words(&lengths, capacity, capacity / OVERLAP_DIVISOR).len(),
                    };
                    let with_tokens = lengths.iter().filter(|&&l| l > 0).count();
                    assert!(
                        windows >= fewest_windows(with_tokens, capacity),
                        "capacity {capacity}, lengths {lengths:?}: {windows} windows"
                    );
                }
            }
            for words in capacity + 1..=60 {
                let windows = split_words(&vec![1; words], capacity, capacity / OVERLAP_DIVISOR);
                assert_eq!(windows.len(), fewest_windows(words, capacity), "{capacity}");
            }
        }
        assert_eq!(fewest_windows(0, 62), 1);
        assert_eq!(fewest_windows(62, 62), 1);
        assert_eq!(fewest_windows(63, 62), 2);
    }

    #[test]
    fn least_words_never_counts_more_words_with_tokens_than_there_are() {
        let tokenizer = tokenizer();
        for text in [
            "I live in Paris and he flew to New York",
            " \tHe flew\u{a0}to New York,then St.Louis!! \r\n",
            "don't [MASK] Zürich—Köln 东京。 [UNK]x",
            // Dropped by BERT's normalizer, joining or emptying runs.
            "a\u{b}b c\u{c}d e\u{85}f \u{200b} \u{fffd} \0 \u{301}",
            "",
            "   ",
        ] {
            let input = TextWords::encode(&tokenizer, text).unwrap();
            let with_tokens = input.tokens.rows.iter().flatten().count();
            let least = tokenizer.least_words(text).unwrap();
            assert!(least <= with_tokens, "{text:?}: {least} > {with_tokens}");
        }
        assert_eq!(tokenizer.least_words("I live in Paris."), Some(4));
        // A tokenizer that splits otherwise gives no bound.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tokenizer.save(&path).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["pre_tokenizer"] = serde_json::json!({"type": "WhitespaceSplit"});
        std::fs::write(&path, json.to_string()).unwrap();
        let whitespace_split = BertTokenizer::from_dir(dir.path(), 64).unwrap();
        assert_eq!(whitespace_split.least_words("I live"), None);
    }

    #[test]
    fn a_max_length_without_room_for_words_is_refused_and_one_token_windows_tag_every_word() {
        let dir = vocab_dir();
        for max_length in [0, 1, 2] {
            let refused = BertTokenizer::from_dir(dir.path(), max_length)
                .err()
                .expect("no room for words");
            assert!(
                refused.to_string().contains("it must be at least 3"),
                "{refused}"
            );
        }
        // At 3 each window holds one token: every word still takes a row.
        let input = TextWords::encode(&tokenizer_at(3), "I live in Paris.").unwrap();
        assert_eq!(input.tokens.windows.len(), 5);
        assert!(input.tokens.rows.iter().all(Option::is_some));
    }

    #[test]
    fn a_long_text_runs_in_windows_that_split_their_overlap_in_the_middle() {
        // `max_length` 10: windows of 8 words (one token each) sharing 2.
        let tokenizer = tokenizer_at(10);
        let text =
            "I live in Paris and he flew to New York then St Louis and I live in Zurich then Koln";
        let input = TextWords::encode(&tokenizer, text).unwrap();
        assert_eq!(input.words.len(), 20);
        let windows = &input.tokens.windows;
        let ranges: Vec<Range<usize>> = windows.iter().map(|w| w.words.clone()).collect();
        assert_eq!(ranges, [0..8, 6..14, 12..20]);
        // 30 tokens in windows, 22 in the text as one sequence.
        assert_eq!(input.tokens.token_count(), 30);
        assert_eq!(input.tokens.text_token_count(), 22);
        let whole = TextWords::encode(&tokenizer_at(64), text).unwrap();
        assert_eq!(whole.tokens.text_token_count(), whole.tokens.token_count());
        let all_words = words(&input);
        for window in windows {
            // Each window is its words tokenized on their own.
            let alone = tokenizer
                .encode_words_batch(&[all_words[window.words.clone()].to_vec()])
                .unwrap()
                .remove(0);
            assert_eq!(window.tokens, alone);
            assert!(window.tokens.encoded.ids.len() <= 10);
        }
        // Words 6 and 7 are in windows 0 and 1: the first to the earlier;
        // likewise 12 and 13 between windows 1 and 2.
        let window_of_row = |row: usize| {
            let mut end = 0;
            windows
                .iter()
                .position(|w| {
                    end += w.tokens.encoded.ids.len();
                    row < end
                })
                .unwrap()
        };
        let owners: Vec<usize> = input
            .tokens
            .rows
            .iter()
            .map(|row| window_of_row(row.expect("every word has a token")))
            .collect();
        let mut expected = vec![0; 7];
        expected.extend([1; 6]);
        expected.extend([2; 7]);
        assert_eq!(owners, expected);
        // Each word reads its own first subword.
        let token_words = token_words(&input.tokens);
        for (word, row) in input.tokens.rows.iter().enumerate() {
            assert_eq!(token_words[row.unwrap()], Some(word));
        }
        // Entities in every window are found, with the text's offsets.
        let mut tags = ["O"; 20];
        for (word, tag) in [
            (3, "B-LOC"),
            (8, "B-LOC"),
            (9, "I-LOC"),
            (11, "B-LOC"),
            (12, "I-LOC"),
            (17, "B-LOC"),
            (19, "B-LOC"),
        ] {
            tags[word] = tag;
        }
        let found: Vec<String> = entities_of(&input, &tags)
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(found, ["Paris", "New York", "St Louis", "Zurich", "Koln"]);
    }

    #[test]
    fn char_offsets_count_characters_not_bytes() {
        let text = "é x 东京";
        let words = char_offsets(text, vec![0..2, 3..4, 5..8, 8..11]);
        let chars: Vec<Range<usize>> = words.iter().map(|w| w.chars.clone()).collect();
        assert_eq!(chars, [0..1, 2..3, 4..5, 5..6]);
    }
}
