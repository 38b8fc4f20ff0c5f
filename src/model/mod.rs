//! BERT, written once over the [`Backend`](crate::backend::Backend) ops.

mod bert;
pub mod linear;

pub(crate) use bert::load_linear;
pub use bert::{BertModel, Workspace};
pub use linear::{F32Linears, LinearKind, LinearLoader, LinearSpec};

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::lora::Adapter;
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
    /// `model.safetensors`: the directory's own, or for LoRA adapters
    /// saved apart from their base, the base model's at the first of its
    /// candidate paths where one exists.
    pub weights: PathBuf,
    /// LoRA adapters to merge into the base at load (see [`crate::lora`]).
    pub adapter: Option<Adapter>,
    /// The base model's `model.safetensors` at its other candidate paths,
    /// other files than `weights`: [`Self::checkpoint`] takes the first
    /// of them all whose SHA-256 is the recorded one.
    other_bases: Vec<PathBuf>,
}

/// The base model's `model.safetensors` in each of the directories `tried`
/// where it exists, in order, each file once: the recorded and the relative
/// path usually lead to the same file, which need not be hashed twice.
fn existing_bases(tried: &[PathBuf]) -> Vec<PathBuf> {
    let mut found: Vec<(PathBuf, PathBuf)> = Vec::new();
    for weights in tried.iter().map(|dir| dir.join("model.safetensors")) {
        // Fails for a file that does not exist.
        let Ok(file) = weights.canonicalize() else {
            continue;
        };
        if found.iter().all(|(_, seen)| *seen != file) {
            found.push((weights, file));
        }
    }
    found.into_iter().map(|(weights, _)| weights).collect()
}

impl ModelFiles {
    /// Checks the directory holds what we can load, with an actionable error
    /// when it does not (notably the pickle-only case). A directory with
    /// LoRA adapters (`adapter_config.json`) and no `model.safetensors`
    /// takes its weights from the recorded base model.
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: not a directory; --model takes a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)",
                dir.display()
            )));
        }
        let config = dir.join("config.json");
        let mut weights = dir.join("model.safetensors");
        let mut adapter = None;
        let mut other_bases = Vec::new();
        if !weights.exists() {
            if let Some(found) = Adapter::read(dir)? {
                let tried = found.base.candidates(dir);
                let mut bases = existing_bases(&tried).into_iter();
                weights = bases.next().ok_or_else(|| {
                    let tried: Vec<String> =
                        tried.iter().map(|d| d.display().to_string()).collect();
                    Error::Invalid(format!(
                        "{}: LoRA adapters on the base model {}, whose model.safetensors is missing (looked in {}); put the base model back at one of those paths, or retrain with --merge-lora for a self-contained model",
                        dir.display(),
                        found.base.model.display(),
                        tried.join(" and ")
                    ))
                })?;
                other_bases = bases.collect();
                adapter = Some(found);
            } else if dir.join("pytorch_model.bin").exists() {
                return Err(Error::PickleOnly { dir: dir.into() });
            } else {
                return Err(Error::MissingFile {
                    dir: dir.into(),
                    file: "model.safetensors",
                });
            }
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
            adapter,
            other_bases,
        })
    }

    /// The weights, with LoRA adapters merged in where the directory has
    /// them (into the candidate base whose SHA-256 is the one they were
    /// trained on).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        match &self.adapter {
            Some(adapter) => adapter.checkpoint(&self.weights, &self.other_bases),
            None => Checkpoint::open(&self.weights),
        }
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
