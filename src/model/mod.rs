//! BERT, written once over the [`Backend`](crate::backend::Backend) ops.

mod bert;
pub mod linear;

pub(crate) use bert::load_linear;
pub use bert::{BertModel, Workspace};
pub use linear::{F32Linears, LinearKind, LinearLoader, LinearSpec};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tokenize::Encoded;

/// Sequences packed back to back, without padding (see
/// [`crate::backend`] for why).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// `offsets[s]..offsets[s + 1]` are the tokens of sequence `s`.
    pub offsets: Vec<usize>,
}

impl TokenBatch {
    pub fn from_encoded<'a>(encoded: impl IntoIterator<Item = &'a Encoded>) -> Self {
        let mut batch = TokenBatch {
            offsets: vec![0],
            ..Default::default()
        };
        for e in encoded {
            batch.ids.extend_from_slice(&e.ids);
            batch.type_ids.extend_from_slice(&e.type_ids);
            batch.offsets.push(batch.ids.len());
        }
        batch
    }

    pub fn sequences(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn max_len(&self) -> usize {
        self.offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }
}

/// How token states become one vector per sequence.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the sequence's token states (sentence-transformers' default).
    Mean,
    /// The `[CLS]` token's state.
    Cls,
    /// BERT's pooler: dense + tanh over `[CLS]`, what
    /// `BertForSequenceClassification` feeds its classifier.
    Pooler,
}

/// The files of a Hugging Face model directory.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: PathBuf,
}

impl ModelFiles {
    /// Checks the directory holds what we can load, with an actionable error
    /// when it does not (notably the pickle-only case).
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: not a directory; --model takes a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)",
                dir.display()
            )));
        }
        let config = dir.join("config.json");
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            if dir.join("pytorch_model.bin").exists() {
                return Err(Error::PickleOnly { dir: dir.into() });
            }
            return Err(Error::MissingFile {
                dir: dir.into(),
                file: "model.safetensors",
            });
        }
        if !config.exists() {
            return Err(Error::MissingFile {
                dir: dir.into(),
                file: "config.json",
            });
        }
        Ok(ModelFiles {
            dir: dir.into(),
            config,
            weights,
        })
    }

    /// Pooling named by a sentence-transformers `1_Pooling/config.json`, if any.
    pub fn sentence_transformers_pooling(&self) -> Option<Pooling> {
        let text = std::fs::read_to_string(self.dir.join("1_Pooling/config.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        let flag = |key: &str| json.get(key).and_then(|v| v.as_bool()) == Some(true);
        if flag("pooling_mode_mean_tokens") {
            Some(Pooling::Mean)
        } else if flag("pooling_mode_cls_token") {
            Some(Pooling::Cls)
        } else {
            None
        }
    }
}
