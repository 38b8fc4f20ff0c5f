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
        let batch = TokenBatch::from_encoded(inputs.iter().map(|input| &input.tokens.encoded));
        self.sequence_logits(&batch)
    }
}

/// A text split into words as its tokenizer pre-tokenizes it
/// ([`BertTokenizer::words`]) and tokenized with each token's word: what a tagger runs on, and what reads its logits back as words and
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
        let words = texts
            .iter()
            .map(|text| Ok(char_offsets(text, tokenizer.words(text)?)))
            .collect::<Result<Vec<Vec<Word>>>>()?;
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
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
        BertTokenizer::from_dir(dir.path(), 64).unwrap()
    }

    fn tags() -> Vec<String> {
        TAGS.iter().map(|t| t.to_string()).collect()
    }

    /// Logits that give each token its word's tag (from `word_tags`, one
    /// per word) and the special tokens `O`.
    fn logits(input: &TextWords, word_tags: &[&str]) -> Vec<f32> {
        assert_eq!(input.words.len(), word_tags.len(), "one tag per word");
        input
            .tokens
            .word_ids
            .iter()
            .flat_map(|word| {
                let tag = word.map_or("O", |w| word_tags[w]);
                TAGS.iter().map(move |t| if *t == tag { 4.0 } else { 0.0 })
            })
            .collect()
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
            input.tokens.encoded.tokens,
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
        assert_eq!(&input.tokens.encoded.tokens[4..5], ["zurich"]);
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
                input.tokens.encoded.tokens,
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

    #[test]
    fn char_offsets_count_characters_not_bytes() {
        let text = "é x 东京";
        let words = char_offsets(text, vec![0..2, 3..4, 5..8, 8..11]);
        let chars: Vec<Range<usize>> = words.iter().map(|w| w.chars.clone()).collect();
        assert_eq!(chars, [0..1, 2..3, 4..5, 5..6]);
    }
}
