//! The model directory bertrt writes: Hugging Face files plus `bertrt.json`.
//!
//! - `config.json`: the base model's config with `architectures`,
//!   `id2label`, `label2id` and `problem_type` set, so `transformers` loads
//!   the directory as `BertForSequenceClassification` (or, for a token
//!   classifier, `BertForTokenClassification`);
//! - `model.safetensors`: Hugging Face names (`bert.*`, `classifier.*`); an
//!   INT8 model (`bertrt quantize`) stores its quantized linears as int8
//!   weights + f32 scales under the names documented in
//!   [`crate::model::linear`];
//! - `tokenizer.json`: the tokenizer with bertrt's truncation recorded;
//! - `bertrt.json`: what `transformers` has no place for ([`ArtifactMeta`]),
//!   and for INT8 models the [`QuantizationRecord`].
//!
//! A model trained with LoRA and saved unmerged holds PEFT's
//! `adapter_config.json` and `adapter_model.safetensors` instead of
//! `model.safetensors`, and `bertrt.json` records its base model
//! ([`crate::lora`]).
//!
//! A directory is written next to its destination and renamed into place,
//! so a crash never leaves a half-written model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::Alignment;
use crate::error::{Error, Result};
use crate::lora::AdapterBase;
use crate::model::Pooling;
use crate::tokenize::BertTokenizer;

/// The newest `bertrt.json` format this bertrt reads; bumped when the file
/// changes in a way an older reader would misread. Version 2 adds decision
/// thresholds (and multi-label models, which always have them); a model
/// without thresholds is still written as version 1, which older bertrt
/// reads correctly.
pub const FORMAT_VERSION: u32 = 2;
/// The version of a file without thresholds.
pub const FORMAT_VERSION_WITHOUT_THRESHOLDS: u32 = 1;
pub const META_FILE: &str = "bertrt.json";

/// How text becomes model input; a model is only valid with these settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Preprocessing {
    pub max_length: usize,
    pub truncation_side: String,
    pub truncation_strategy: String,
    pub lowercase: Option<bool>,
    pub pooling: Pooling,
    /// Whether inputs are text pairs (segment ids 0 and 1).
    pub text_pair: bool,
    /// Token classification: which subwords of a word were trained on its
    /// tag (predictions always read a word's first subword).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_alignment: Option<Alignment>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    pub method: String,
    pub temperature: f32,
    pub dev_nll_before: f64,
    pub dev_nll_after: f64,
    pub dev_ece_before: f64,
    pub dev_ece_after: f64,
}

/// Decision thresholds tuned on dev, and what they did there.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    /// How they were chosen.
    pub method: String,
    /// Label -> the probability at or above which it is predicted: every
    /// label of a multi-label model; the positive (second) class of a
    /// binary classifier, which otherwise predicts the other class.
    pub values: BTreeMap<String, f32>,
    /// Dev metrics with the default decision (argmax, or 0.5 per label).
    pub dev_before: serde_json::Value,
    /// Dev metrics with these thresholds (optimistic: tuned on the same
    /// data; judge them on a test set).
    pub dev_after: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataFile {
    pub path: PathBuf,
    pub sha256: String,
    pub examples: usize,
    pub skipped: usize,
}

/// `bertrt.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ArtifactMeta {
    pub format_version: u32,
    pub bertrt_version: String,
    pub task: String,
    pub labels: Vec<String>,
    pub preprocessing: Preprocessing,
    /// Logits are divided by this before softmax (1 when uncalibrated).
    pub temperature: f32,
    pub calibration: Option<Calibration>,
    /// Absent (older files, or not tuned): argmax / 0.5 per label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Thresholds>,
    /// The full training recipe, seed included.
    pub recipe: serde_json::Value,
    pub data: BTreeMap<String, DataFile>,
    /// Dev metrics of the saved checkpoint, with its epoch and step.
    pub best: serde_json::Value,
    /// LoRA adapters saved apart from their base: the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_base: Option<AdapterBase>,
}

impl ArtifactMeta {
    /// `bertrt.json` in `dir`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(META_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let json = read_meta_json(&path)?;
        if json.get("task").is_none() {
            // A model bertrt quantized but did not train: `bertrt.json`
            // holds only the quantization record.
            return Ok(None);
        }
        let meta: ArtifactMeta = serde_json::from_value(json).map_err(|e| Error::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if meta.format_version > FORMAT_VERSION {
            return Err(Error::Config {
                path,
                message: format!(
                    "format_version {} is newer than this bertrt reads ({FORMAT_VERSION}); upgrade bertrt",
                    meta.format_version
                ),
            });
        }
        Ok(Some(meta))
    }
}

/// `ArtifactMeta::task` and Hugging Face's `problem_type` of each head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemType {
    SingleLabel,
    MultiLabel,
    Regression,
    /// One label per token (`BertForTokenClassification`).
    TokenClassification,
}

impl ProblemType {
    /// The `task` in `bertrt.json`.
    pub fn task(self) -> &'static str {
        match self {
            ProblemType::SingleLabel => "sequence-classification",
            ProblemType::MultiLabel => "multi-label-classification",
            ProblemType::Regression => "regression",
            ProblemType::TokenClassification => "token-classification",
        }
    }

    /// `architectures` in `config.json`.
    pub fn architecture(self) -> &'static str {
        match self {
            ProblemType::TokenClassification => "BertForTokenClassification",
            _ => "BertForSequenceClassification",
        }
    }

    /// `problem_type` in `config.json`, which tells `transformers` which
    /// loss and output function the head has (a token classifier's is
    /// softmax cross-entropy whatever it says, one label per token).
    pub fn hugging_face(self) -> &'static str {
        match self {
            ProblemType::SingleLabel | ProblemType::TokenClassification => {
                "single_label_classification"
            }
            ProblemType::MultiLabel => "multi_label_classification",
            ProblemType::Regression => "regression",
        }
    }

    /// From `bertrt.json`'s `task` (unknown tasks read as single-label, as
    /// version 1 files only had that and regression).
    pub fn from_task(task: &str) -> Self {
        [
            ProblemType::MultiLabel,
            ProblemType::Regression,
            ProblemType::TokenClassification,
        ]
        .into_iter()
        .find(|p| p.task() == task)
        .unwrap_or(ProblemType::SingleLabel)
    }

    /// From `config.json`'s `problem_type` (absent: single-label, as
    /// `transformers` assumes for several labels).
    pub fn from_hugging_face(problem_type: &str) -> Self {
        [ProblemType::MultiLabel, ProblemType::Regression]
            .into_iter()
            .find(|p| p.hugging_face() == problem_type)
            .unwrap_or(ProblemType::SingleLabel)
    }
}

/// `bertrt.json` at `path` as JSON.
fn read_meta_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        message: e.to_string(),
    })
}

/// The `quantization` entry of `bertrt.json`: how an INT8 model was made
/// and how close it measured to the f32 model it came from. Kept beside
/// [`ArtifactMeta`]'s fields rather than among them, because a quantized
/// model need not be a trained one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QuantizationRecord {
    /// E.g. "int8 w8a8: weights per output channel, activations per token".
    pub method: String,
    /// SmoothQuant strength asked for (`None`: chosen per layer, see
    /// [`LayerError::alpha`]).
    pub smoothing_alpha: Option<f32>,
    /// Linear layers stored in INT8 (fused query/key/value as `...qkv`).
    pub int8_layers: Vec<String>,
    /// Linear layers kept in f32.
    pub f32_layers: Vec<String>,
    /// Where the calibration and accuracy sample came from, and its size.
    pub calibration_source: String,
    pub calibration_texts: usize,
    /// Mean-pooled cosine INT8 vs f32, worst and mean over the sample.
    pub worst_cosine: f64,
    pub mean_cosine: f64,
    /// Classifiers: fraction of the sample given the same label.
    pub label_agreement: Option<f64>,
    /// The bars the model was held to, and whether `--force` overrode them.
    pub min_cosine: f64,
    pub min_label_agreement: f64,
    pub passed: bool,
    /// Every encoder linear, in forward order.
    pub layer_errors: Vec<LayerError>,
}

/// How one linear measured: relative L2 error `‖y_int8 − y_f32‖ / ‖y_f32‖`
/// of its output on the f32 model's inputs, over all sample tokens and for
/// the worst sample text.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerError {
    pub layer: String,
    /// Whether it is stored INT8 (else it was kept f32, and the errors say
    /// what INT8 would have cost).
    pub int8: bool,
    /// SmoothQuant strength of its INT8 weights (0: plain W8A8).
    pub alpha: f32,
    pub relative_error: f64,
    pub worst_text_error: f64,
    /// The same for plain W8A8, for comparison.
    pub plain_relative_error: f64,
    pub plain_worst_text_error: f64,
}

pub const QUANTIZATION_KEY: &str = "quantization";

impl QuantizationRecord {
    /// The record in `dir`'s `bertrt.json`, if any.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(META_FILE);
        if !path.exists() {
            return Ok(None);
        }
        match read_meta_json(&path)?.get(QUANTIZATION_KEY) {
            None => Ok(None),
            Some(record) => serde_json::from_value(record.clone())
                .map(Some)
                .map_err(|e| Error::Config {
                    path,
                    message: format!("{QUANTIZATION_KEY}: {e}"),
                }),
        }
    }

    /// `bertrt.json` for the INT8 copy of the model in `source`: its own
    /// `bertrt.json` (if any) with this record added.
    pub fn meta_json(&self, source: &Path) -> Result<serde_json::Value> {
        let path = source.join(META_FILE);
        let mut json = if path.exists() {
            read_meta_json(&path)?
        } else {
            serde_json::json!({
                "format_version": FORMAT_VERSION,
                "bertrt_version": crate::VERSION,
            })
        };
        json[QUANTIZATION_KEY] = serde_json::to_value(self).expect("serialisable");
        Ok(json)
    }
}

/// `config.json` for a sequence classifier, multi-label classifier,
/// one-output regressor or token classifier, from the base model's.
pub fn classifier_config(
    base: &serde_json::Value,
    labels: &[String],
    problem_type: ProblemType,
) -> serde_json::Value {
    let mut config = base.clone();
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect();
    config["architectures"] = serde_json::json!([problem_type.architecture()]);
    config["id2label"] = id2label.into();
    config["label2id"] = label2id.into();
    config["problem_type"] = problem_type.hugging_face().into();
    config
}

/// Everything a model directory holds.
pub struct Artifact<'a> {
    pub config: &'a serde_json::Value,
    pub tensors: &'a [(String, Vec<usize>, Vec<f32>)],
    /// The file `tensors` go to: `model.safetensors`, or LoRA adapters'
    /// `adapter_model.safetensors`.
    pub tensors_file: &'a str,
    pub tokenizer: &'a BertTokenizer,
    pub meta: &'a ArtifactMeta,
    /// Further files (name, contents), e.g. the training log.
    pub extra: &'a [(&'a str, Vec<u8>)],
}

/// Refuses to let training replace a directory that is not a bertrt model:
/// `--out` pointing at the wrong place must not cost the user data.
pub fn check_replaceable(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let is_empty_dir = out.is_dir()
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_none();
    if is_empty_dir || out.join(META_FILE).exists() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: exists and is not a bertrt model directory (no {META_FILE}); refusing to replace it, choose another --out",
        out.display()
    )))
}

impl Artifact<'_> {
    /// Writes the directory beside `out`, then renames it into place
    /// (replacing a previous version of the model there).
    pub fn write(&self, out: &Path) -> Result<()> {
        write_dir_atomically(out, |staging| self.write_files(staging))
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        let write = |file: &str, bytes: &[u8]| write_durable(&dir.join(file), bytes);
        write("config.json", &pretty(self.config))?;
        write(
            META_FILE,
            &pretty(&serde_json::to_value(self.meta).expect("serialisable")),
        )?;
        write(self.tensors_file, &safetensors_bytes(self.tensors)?)?;
        let tokenizer_path = dir.join("tokenizer.json");
        self.tokenizer.save(&tokenizer_path)?;
        for (file, bytes) in self.extra {
            write(file, bytes)?;
        }
        Ok(())
    }
}

/// Fills a staging directory beside `out` with `fill`, then renames it into
/// place (replacing a previous bertrt model there, see
/// [`check_replaceable`]): a crash never leaves a half-written model.
pub fn write_dir_atomically(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_replaceable(out)?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a directory name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    if let Err(e) = fill(&staging) {
        // Best effort: the error that stopped the write is the one to report.
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }

    let previous = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        std::fs::rename(out, &previous).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
    if previous.exists() {
        std::fs::remove_dir_all(&previous).map_err(|e| Error::io(&previous, e))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` and syncs it, so it is durable before a rename
/// publishes it.
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Replaces one file of an existing model directory atomically (written
/// beside it, then renamed over it).
pub fn replace_file(dir: &Path, file: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(file);
    let staging = dir.join(format!(".{file}.tmp-{}", std::process::id()));
    std::fs::write(&staging, bytes).map_err(|e| Error::io(&staging, e))?;
    std::fs::rename(&staging, &path).map_err(|e| Error::io(&path, e))
}

pub fn pretty(value: &serde_json::Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("serialisable");
    bytes.push(b'\n');
    bytes
}

fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("cannot serialise tensors: {e}")))?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Invalid(format!("cannot serialise tensors: {e}")))
}
