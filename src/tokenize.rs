//! Tokenization through the `tokenizers` crate, under our own padding and
//! truncation policy.
//!
//! A `tokenizer.json` may carry its own padding and truncation (the shipped
//! MiniLM one pads and truncates at 128); both are replaced here so that the
//! model's limit and the user's `--max-length` are the only ones in force.
//! Padding is never done by the tokenizer: batches are packed (see
//! [`crate::model::TokenBatch`]).

use std::ops::Range;
use std::path::{Path, PathBuf};

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, EncodeInput, ModelWrapper, NormalizerWrapper, OffsetReferential, OffsetType,
    PostProcessor, PreTokenizer, PreTokenizerWrapper, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};

/// The shortest max length that leaves room for text beside BERT's
/// `[CLS]` and `[SEP]`: at two every input is those two tokens alone, so
/// every text would embed, classify and tag the same (a token classifier's
/// windows would hold no words).
pub const MIN_MAX_LENGTH: usize = 3;

/// Refuses a max length under [`MIN_MAX_LENGTH`], naming the `setting` (a
/// flag or field) it came from.
pub fn check_room_for_text(max_length: usize, setting: &str) -> Result<()> {
    if max_length < MIN_MAX_LENGTH {
        return Err(Error::Invalid(format!(
            "{setting} {max_length} leaves no room for text beside [CLS] and [SEP], so every input would run as those two tokens alone; set it to at least {MIN_MAX_LENGTH}"
        )));
    }
    Ok(())
}

/// One tokenized input (or text pair), special tokens included.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub tokens: Vec<String>,
}

/// One token of [`BertTokenizer::spans`].
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSpan {
    pub id: u32,
    /// The vocabulary entry, e.g. `##s` or `[CLS]`.
    pub token: String,
    /// Added by the tokenizer (`[CLS]`, `[SEP]`), not read from the text.
    pub special: bool,
    /// `[start, stop)` in characters of the text; `None` for special tokens.
    pub chars: Option<(usize, usize)>,
}

/// A sentence given as words, tokenized: each token's word (None for
/// special tokens), for aligning word-level tags with subwords.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WordsEncoded {
    pub encoded: Encoded,
    pub word_ids: Vec<Option<usize>>,
    /// Each word's token count before truncation (special tokens aside):
    /// more than `word_ids` holds for a word that `max_length` cut, so a
    /// caller can tell that the sentence did not fit and split it at words.
    pub word_lengths: Vec<usize>,
}

/// Where the vocabulary came from, recorded so artifacts can say how text was
/// preprocessed.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerSource {
    TokenizerJson(PathBuf),
    /// WordPiece built from `vocab.txt`, with `do_lower_case` from
    /// `tokenizer_config.json` (default true, as in Hugging Face).
    VocabTxt {
        path: PathBuf,
        lowercase: bool,
    },
}

pub struct BertTokenizer {
    inner: Tokenizer,
    source: TokenizerSource,
    max_length: usize,
    /// Whether text splits into words as BERT splits it, which
    /// [`Self::least_words`] relies on.
    splits_as_bert: bool,
}

impl BertTokenizer {
    /// Loads `tokenizer.json` from `dir`, else builds WordPiece from
    /// `vocab.txt`. Inputs longer than `max_length` tokens (special tokens
    /// included) are truncated on the right; a `max_length` that leaves no
    /// room for text beside the special tokens is refused.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        let (mut inner, source) = if json.exists() {
            let inner = Tokenizer::from_file(&json).map_err(|e| Error::Tokenizer {
                path: json.clone(),
                message: format!("cannot load tokenizer: {e}"),
            })?;
            (inner, TokenizerSource::TokenizerJson(json))
        } else if vocab.exists() {
            let lowercase = read_do_lower_case(&dir.join("tokenizer_config.json"))?;
            let inner = wordpiece_from_vocab(&vocab, lowercase)?;
            (
                inner,
                TokenizerSource::VocabTxt {
                    path: vocab,
                    lowercase,
                },
            )
        } else {
            return Err(Error::MissingFile {
                dir: dir.into(),
                file: "tokenizer.json or vocab.txt",
            });
        };
        let special_tokens = special_tokens(&inner);
        if max_length <= special_tokens {
            return Err(Error::Tokenizer {
                path: dir.into(),
                message: format!(
                    "a max length of {max_length} tokens leaves no room for text beside the {special_tokens} special tokens this tokenizer adds; it must be at least {}",
                    special_tokens + 1
                ),
            });
        }
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer {
                path: dir.into(),
                message: format!("cannot truncate at {max_length}: {e}"),
            })?;
        Ok(BertTokenizer {
            splits_as_bert: splits_as_bert(&inner),
            inner,
            source,
            max_length,
        })
    }

    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokens added to every text (`[CLS]` and `[SEP]` for BERT), which
    /// count against `max_length`.
    pub fn special_tokens(&self) -> usize {
        special_tokens(&self.inner)
    }

    /// At most as many words as [`Self::words`] finds in `text` that take
    /// a token, counted in one pass over its bytes rather than by
    /// tokenizing it: runs between ASCII spaces, tabs and line breaks that
    /// hold an ASCII letter or digit. BERT's normalizer keeps such a
    /// character, and those breaks as whitespace (unlike form feeds, which
    /// it drops), its pre-tokenizer splits there (and at punctuation), and
    /// WordPiece gives every word a token (`[UNK]` at worst). None for a
    /// tokenizer that splits text otherwise, where no such bound holds.
    pub fn least_words(&self, text: &str) -> Option<usize> {
        self.splits_as_bert.then(|| {
            text.as_bytes()
                .split(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                .filter(|run| run.iter().any(u8::is_ascii_alphanumeric))
                .count()
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the normalizer lowercases (None when it has no BERT
    /// normalizer to ask).
    pub fn lowercase(&self) -> Option<bool> {
        match &self.source {
            TokenizerSource::VocabTxt { lowercase, .. } => Some(*lowercase),
            TokenizerSource::TokenizerJson(_) => {
                let json: serde_json::Value =
                    serde_json::from_str(&self.inner.to_string(false).ok()?).ok()?;
                json["normalizer"]["lowercase"].as_bool()
            }
        }
    }

    /// Writes `tokenizer.json` with bertrt's truncation in it, so the file
    /// states how the model's inputs were made.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, true).map_err(|e| Error::Tokenizer {
            path: path.into(),
            message: format!("cannot write tokenizer: {e}"),
        })
    }

    /// Encodes text pairs, in parallel, in input order.
    pub fn encode_pair_batch(&self, pairs: &[(&str, &str)]) -> Result<Vec<Encoded>> {
        let inputs: Vec<EncodeInput> = pairs.iter().map(|&(a, b)| (a, b).into()).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::Invalid(format!("tokenization failed: {e}")))?;
        Ok(encodings.into_iter().map(to_encoded).collect())
    }

    pub fn encode(&self, text: &str) -> Result<Encoded> {
        self.encode_input(text.into())
    }

    /// A text pair: `[CLS] a [SEP] b [SEP]` with segment ids 0 then 1.
    pub fn encode_pair(&self, first: &str, second: &str) -> Result<Encoded> {
        self.encode_input((first, second).into())
    }

    /// Encodes many texts, in parallel across cores, in input order.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Encoded>> {
        let inputs: Vec<EncodeInput> = texts.iter().map(|t| (*t).into()).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::Invalid(format!("tokenization failed: {e}")))?;
        Ok(encodings.into_iter().map(to_encoded).collect())
    }

    /// The tokens of `text` (truncated as [`Self::encode`] does) with the
    /// characters each was read from, for showing how a text is split.
    pub fn spans(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenSpan>> {
        let encoding = self
            .inner
            .encode_char_offsets(text, add_special_tokens)
            .map_err(|e| Error::Invalid(format!("tokenization failed: {e}")))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_special_tokens_mask())
            .zip(encoding.get_offsets())
            .map(|(((&id, token), &special), &offsets)| TokenSpan {
                id,
                token: token.clone(),
                special: special == 1,
                chars: (special == 0).then_some(offsets),
            })
            .collect())
    }

    /// The words of a raw text as this tokenizer sees them: byte ranges of
    /// `text`, in order, not overlapping, none empty or with whitespace at
    /// either end. A word is a piece of the tokenizer's own pre-tokenization
    /// of the text (added tokens split out, then its normalizer, then its
    /// pre-tokenizer), the words `Encoding::word_ids` of the raw text
    /// count, mapped back to the original text. For BERT (the
    /// `BertNormalizer` and `BertPreTokenizer` of a `tokenizer.json`, or
    /// those built from `vocab.txt`) that is `BasicTokenizer`'s split:
    /// whitespace separates words and every punctuation character (Unicode
    /// `P*`, and the ASCII symbols `!`-`/`, `:`-`@`, `[`-`` ` ``, `{`-`~`)
    /// is a word of its own, so `don't` is `don`, `'`, `t` and `Paris.` is
    /// `Paris`, `.`; with `handle_chinese_chars` each CJK ideograph is a
    /// word too (that split is the normalizer's, which pads them with
    /// spaces, not the pre-tokenizer's); symbols outside those ranges (`€`,
    /// `×`) stay inside their word. A tokenizer with no pre-tokenizer gets
    /// `BertPreTokenizer`'s split. Pieces whose
    /// original characters overlap (a normalizer that expands one character
    /// into several, split apart) are one word.
    pub fn words(&self, text: &str) -> Result<Vec<Range<usize>>> {
        let mut pretokenized = self
            .inner
            .get_added_vocabulary()
            .extract_and_normalize(self.inner.get_normalizer(), text);
        match self.inner.get_pre_tokenizer() {
            Some(pre_tokenizer) => pre_tokenizer.pre_tokenize(&mut pretokenized),
            None => BertPreTokenizer.pre_tokenize(&mut pretokenized),
        }
        .map_err(|e| Error::Invalid(format!("pre-tokenization failed: {e}")))?;
        let mut words: Vec<Range<usize>> = Vec::new();
        for (_, (start, end), _) in
            pretokenized.get_splits(OffsetReferential::Original, OffsetType::Byte)
        {
            // A piece's original span may take in the whitespace that a
            // pre-tokenizer such as Metaspace or ByteLevel attaches to it.
            let Some(piece) = text.get(start..end) else {
                continue;
            };
            let start = start + (piece.len() - piece.trim_start().len());
            let end = start + piece.trim().len();
            if start == end {
                continue;
            }
            match words.last_mut() {
                Some(last) if start < last.end => last.end = last.end.max(end),
                _ => words.push(start..end),
            }
        }
        Ok(words)
    }

    /// Encodes sentences already split into words (each word pre-tokenized
    /// further by the tokenizer, as `transformers`' `is_split_into_words`),
    /// in parallel, in input order.
    pub fn encode_words_batch(&self, sentences: &[Vec<&str>]) -> Result<Vec<WordsEncoded>> {
        let inputs: Vec<EncodeInput> = sentences.iter().map(|w| w.as_slice().into()).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::Invalid(format!("tokenization failed: {e}")))?;
        Ok(encodings
            .into_iter()
            .zip(sentences)
            .map(|(encoding, words)| WordsEncoded {
                word_ids: encoding
                    .get_word_ids()
                    .iter()
                    .map(|w| w.map(|w| w as usize))
                    .collect(),
                word_lengths: word_lengths(&encoding, words.len()),
                encoded: to_encoded(encoding),
            })
            .collect())
    }

    fn encode_input(&self, input: EncodeInput) -> Result<Encoded> {
        self.inner
            .encode(input, true)
            .map(to_encoded)
            .map_err(|e| Error::Invalid(format!("tokenization failed: {e}")))
    }
}

/// Tokens the post-processor adds to a single text.
fn special_tokens(tokenizer: &Tokenizer) -> usize {
    tokenizer
        .get_post_processor()
        .map_or(0, |processor| processor.added_tokens(false))
}

/// Whether [`BertTokenizer::least_words`] holds for `tokenizer`: BERT's
/// normalizer (or none) and pre-tokenizer (or none, which
/// [`BertTokenizer::words`] replaces with BERT's), WordPiece, and no added
/// token that spans whitespace and so joins words.
fn splits_as_bert(tokenizer: &Tokenizer) -> bool {
    matches!(
        tokenizer.get_normalizer(),
        None | Some(NormalizerWrapper::BertNormalizer(_))
    ) && matches!(
        tokenizer.get_pre_tokenizer(),
        None | Some(PreTokenizerWrapper::BertPreTokenizer(_))
    ) && matches!(tokenizer.get_model(), ModelWrapper::WordPiece(_))
        && tokenizer
            .get_added_tokens_decoder()
            .values()
            .all(|token| !token.content.contains(char::is_whitespace))
}

/// Each word's token count in `encoding` and in the pieces truncation cut
/// off it (its overflowing encodings, which keep their word ids).
fn word_lengths(encoding: &tokenizers::Encoding, words: usize) -> Vec<usize> {
    let mut lengths = vec![0; words];
    let pieces = std::iter::once(encoding).chain(encoding.get_overflowing());
    for word in pieces.flat_map(|piece| piece.get_word_ids().iter().flatten()) {
        if let Some(length) = lengths.get_mut(*word as usize) {
            *length += 1;
        }
    }
    lengths
}

fn to_encoded(encoding: tokenizers::Encoding) -> Encoded {
    Encoded {
        ids: encoding.get_ids().to_vec(),
        type_ids: encoding.get_type_ids().to_vec(),
        tokens: encoding.get_tokens().to_vec(),
    }
}

fn read_do_lower_case(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(true);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
        path: path.into(),
        message: format!("invalid JSON: {e}"),
    })?;
    match json.get("do_lower_case") {
        None => Ok(true),
        Some(value) => value.as_bool().ok_or_else(|| Error::Tokenizer {
            path: path.into(),
            message: format!("do_lower_case must be true or false, found {value}"),
        }),
    }
}

/// The pipeline of Hugging Face's `BertTokenizerFast` built from `vocab.txt`:
/// BERT normalizer (accents stripped when lowercasing), BERT pre-tokenizer,
/// WordPiece with `##` continuations, `[CLS] .. [SEP]` post-processing.
fn wordpiece_from_vocab(vocab: &Path, lowercase: bool) -> Result<Tokenizer> {
    let tokenizer_error = |message: String| Error::Tokenizer {
        path: vocab.into(),
        message,
    };
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| tokenizer_error(format!("cannot read vocabulary: {e}")))?;
    let special_id = |token: &str| {
        tokenizers::Model::token_to_id(&model, token)
            .ok_or_else(|| tokenizer_error(format!("vocabulary lacks {token}")))
    };
    let cls = special_id("[CLS]")?;
    let sep = special_id("[SEP]")?;
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .into_iter()
        .filter(|token| tokenizers::Model::token_to_id(&model, token).is_some())
        .map(|token| AddedToken::from(token, true))
        .collect();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )))
        .with_decoder(Some(WordPieceDecoder::default()));
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}
