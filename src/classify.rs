//! Text to class probabilities with a fine-tuned model directory (a bertrt
//! artifact or any Hugging Face `BertForSequenceClassification`).

use std::path::Path;

use crate::artifact::{ArtifactMeta, ProblemType};
use crate::backend::Backend;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::eval::calibration::{sigmoid, softmax_with_temperature};
use crate::eval::thresholds::DEFAULT_THRESHOLD;
use crate::model::{
    load_linear, BertModel, F32Linears, LinearLoader, ModelFiles, Pooling, TokenBatch, Workspace,
};
use crate::tokenize::{BertTokenizer, Encoded};

/// One input: a text, or a text pair for pair tasks.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub text: &'a str,
    pub pair: Option<&'a str>,
}

pub struct Classifier<B: Backend> {
    pub model: BertModel<B>,
    head: B::Linear,
    pub tokenizer: BertTokenizer,
    pub labels: Vec<String>,
    pub pooling: Pooling,
    /// Divides logits before softmax (from calibration; 1 if none).
    pub temperature: f32,
    /// One numeric output (`problem_type` regression) instead of classes.
    pub regression: bool,
    /// How outputs become a prediction (thresholds included).
    pub decision: Decision,
    pub meta: Option<ArtifactMeta>,
    workspace: Workspace<B>,
}

impl<B: Backend> Classifier<B> {
    pub fn load(backend: B, dir: &Path) -> Result<Self> {
        Self::load_with(backend, dir, &F32Linears)
    }

    /// [`Self::load`] with `linears` choosing each encoder linear's form
    /// (e.g. `crate::quant::Int8Linears`); the classifier head stays f32.
    pub fn load_with(backend: B, dir: &Path, linears: &dyn LinearLoader<B>) -> Result<Self> {
        let files = ModelFiles::locate(dir)?;
        let config = BertConfig::from_file(&files.config)?;
        let meta = ArtifactMeta::read(dir)?;
        let (labels, problem_type) = match &meta {
            Some(meta) => (meta.labels.clone(), ProblemType::from_task(&meta.task)),
            None => labels_from_config(&files.config)?,
        };
        if problem_type == ProblemType::TokenClassification {
            return Err(Error::Invalid(format!(
                "{}: a token classifier (BertForTokenClassification), not a sequence classifier; load it with bertrt::tag::Tagger (bertrt predict and eval do)",
                dir.display()
            )));
        }
        let decision = Decision::new(problem_type, &labels, meta.as_ref());
        let regression = problem_type == ProblemType::Regression;
        let ckpt = files.checkpoint()?;
        let hidden = config.hidden_size;
        let max_length = meta.as_ref().map_or(config.max_position_embeddings, |m| {
            m.preprocessing.max_length
        });
        let pooling = meta
            .as_ref()
            .map_or(Pooling::Pooler, |m| m.preprocessing.pooling);
        let temperature = meta.as_ref().map_or(1.0, |m| m.temperature);
        let model = BertModel::from_checkpoint_with(backend, config, &ckpt, linears)?;
        let head = load_linear(model.backend(), &ckpt, "classifier", labels.len(), hidden)?;
        let tokenizer = BertTokenizer::from_dir(dir, max_length)?;
        let workspace = Workspace::new(model.backend());
        Ok(Classifier {
            model,
            head,
            tokenizer,
            labels,
            pooling,
            temperature,
            regression,
            decision,
            meta,
            workspace,
        })
    }

    pub fn encode(&self, inputs: &[Input]) -> Result<Vec<Encoded>> {
        if inputs.iter().all(|i| i.pair.is_none()) {
            let texts: Vec<&str> = inputs.iter().map(|i| i.text).collect();
            return self.tokenizer.encode_batch(&texts);
        }
        let pairs: Vec<(&str, &str)> = inputs
            .iter()
            .map(|i| (i.text, i.pair.unwrap_or("")))
            .collect();
        self.tokenizer.encode_pair_batch(&pairs)
    }

    /// Raw logits `[inputs, labels]` for already tokenized inputs.
    pub fn logits_encoded(&mut self, encoded: &[Encoded]) -> Result<Vec<f32>> {
        self.logits(&TokenBatch::from_encoded(encoded))
    }

    /// Raw logits `[sequences, labels]` of a token batch.
    pub fn logits(&mut self, batch: &TokenBatch) -> Result<Vec<f32>> {
        self.model.forward(batch, &mut self.workspace)?;
        self.model.classify(
            batch,
            &mut self.workspace,
            self.pooling,
            &self.head,
            self.labels.len(),
        )
    }

    /// Pooled encoder output `[sequences, hidden]` of a token batch (the
    /// fine-tuned encoder used as an embedder).
    pub fn pooled(&mut self, batch: &TokenBatch, pooling: Pooling) -> Result<Vec<f32>> {
        self.model.forward(batch, &mut self.workspace)?;
        self.model.pool(batch, &mut self.workspace, pooling)
    }

    /// Calibrated probabilities, one row per input: softmax over the
    /// classes, or one sigmoid per label for a multi-label model.
    pub fn probabilities(&mut self, inputs: &[Input]) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .predict(inputs)?
            .into_iter()
            .map(|p| match p {
                Prediction::Class { probs, .. } | Prediction::Labels { probs, .. } => probs,
                Prediction::Score(score) => vec![score],
            })
            .collect())
    }

    /// The prediction for each input, thresholds applied.
    pub fn predict(&mut self, inputs: &[Input]) -> Result<Vec<Prediction>> {
        let encoded = self.encode(inputs)?;
        let logits = self.logits_encoded(&encoded)?;
        Ok(self.decide(&logits))
    }

    /// Predictions from raw logits `[inputs, labels]`.
    pub fn decide(&self, logits: &[f32]) -> Vec<Prediction> {
        self.decision
            .apply(logits, self.labels.len(), self.temperature)
    }
}

/// How a model's outputs become a prediction.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Softmax over the classes; the most probable one.
    Argmax,
    /// Binary: class `positive` when its calibrated probability reaches
    /// `threshold` (tuned on dev), else the other class.
    PositiveThreshold { positive: usize, threshold: f32 },
    /// One sigmoid per label; label `l` is predicted when its probability
    /// reaches `thresholds[l]`.
    MultiLabel { thresholds: Vec<f32> },
    /// Regression: the output itself.
    Score,
}

/// One input's prediction.
#[derive(Clone, Debug, PartialEq)]
pub enum Prediction {
    /// Single-label: the class index and every class's probability.
    Class {
        label: usize,
        probs: Vec<f32>,
    },
    /// Multi-label: the predicted label indices (possibly none) and every
    /// label's probability.
    Labels {
        labels: Vec<usize>,
        probs: Vec<f32>,
    },
    Score(f32),
}

impl Prediction {
    /// `{"label", "probs": {label: p}}`, `{"labels": [...], "probs"}` or
    /// `{"score"}`.
    pub fn to_json(&self, names: &[String]) -> serde_json::Value {
        let by_label = |probs: &[f32]| -> serde_json::Map<String, serde_json::Value> {
            names
                .iter()
                .zip(probs)
                .map(|(name, p)| (name.clone(), (*p).into()))
                .collect()
        };
        match self {
            Prediction::Class { label, probs } => {
                serde_json::json!({"label": names[*label], "probs": by_label(probs)})
            }
            Prediction::Labels { labels, probs } => serde_json::json!({
                "labels": labels.iter().map(|&l| names[l].as_str()).collect::<Vec<_>>(),
                "probs": by_label(probs),
            }),
            Prediction::Score(score) => serde_json::json!({ "score": score }),
        }
    }
}

impl Decision {
    /// The rule for a model of `problem_type` with `labels`, using the
    /// thresholds in `meta` (a label without one uses 0.5). A threshold
    /// for a binary classifier applies to its second label.
    pub fn new(problem_type: ProblemType, labels: &[String], meta: Option<&ArtifactMeta>) -> Self {
        let thresholds = meta.and_then(|m| m.thresholds.as_ref());
        let threshold_of = |label: &String| thresholds.and_then(|t| t.values.get(label).copied());
        match problem_type {
            ProblemType::Regression => Decision::Score,
            ProblemType::MultiLabel => Decision::MultiLabel {
                thresholds: labels
                    .iter()
                    .map(|l| threshold_of(l).unwrap_or(DEFAULT_THRESHOLD))
                    .collect(),
            },
            // Per token: the most probable tag.
            ProblemType::TokenClassification => Decision::Argmax,
            ProblemType::SingleLabel => match labels.get(1).and_then(threshold_of) {
                Some(threshold) if labels.len() == 2 => Decision::PositiveThreshold {
                    positive: 1,
                    threshold,
                },
                _ => Decision::Argmax,
            },
        }
    }

    /// Predictions from logits `[inputs, outputs]`; `temperature` divides
    /// single-label logits before softmax.
    pub fn apply(&self, logits: &[f32], outputs: usize, temperature: f32) -> Vec<Prediction> {
        match self {
            Decision::Score => logits.iter().map(|&s| Prediction::Score(s)).collect(),
            Decision::MultiLabel { thresholds } => logits
                .chunks_exact(outputs)
                .map(|row| {
                    let probs: Vec<f32> = row.iter().map(|&z| sigmoid(z as f64) as f32).collect();
                    let labels = (0..outputs)
                        .filter(|&l| probs[l] >= thresholds[l])
                        .collect();
                    Prediction::Labels { labels, probs }
                })
                .collect(),
            Decision::Argmax | Decision::PositiveThreshold { .. } => {
                softmax_with_temperature(logits, outputs, temperature)
                    .chunks_exact(outputs)
                    .map(|probs| {
                        let label = match self {
                            Decision::PositiveThreshold {
                                positive,
                                threshold,
                            } => {
                                if probs[*positive] >= *threshold {
                                    *positive
                                } else {
                                    1 - *positive
                                }
                            }
                            _ => argmax(probs),
                        };
                        Prediction::Class {
                            label,
                            probs: probs.to_vec(),
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The index of the largest value (the last of equal ones, as
/// `Iterator::max_by`).
pub fn argmax(values: &[f32]) -> usize {
    (0..values.len())
        .max_by(|&a, &b| values[a].total_cmp(&values[b]))
        .unwrap_or(0)
}

/// Labels in id order from a Hugging Face `config.json`'s `id2label`, and
/// its `problem_type` (token classification when `architectures` names
/// `BertForTokenClassification`).
pub(crate) fn labels_from_config(path: &Path) -> Result<(Vec<String>, ProblemType)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        message: e.to_string(),
    })?;
    let id2label = json["id2label"].as_object().ok_or_else(|| Error::Config {
        path: path.into(),
        message:
            "no id2label: this is not a sequence classifier (fine-tune one with bertrt finetune)"
                .into(),
    })?;
    let mut labels = vec![None; id2label.len()];
    for (id, label) in id2label {
        let slot = id
            .parse::<usize>()
            .ok()
            .and_then(|i| labels.get_mut(i))
            .ok_or_else(|| Error::Config {
                path: path.into(),
                message: format!("id2label key {id:?} is not an id in 0..{}", id2label.len()),
            })?;
        *slot = Some(label.as_str().unwrap_or_default().to_string());
    }
    let token_classifier = json["architectures"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == "BertForTokenClassification"));
    let problem_type = if token_classifier {
        ProblemType::TokenClassification
    } else {
        ProblemType::from_hugging_face(json["problem_type"].as_str().unwrap_or(""))
    };
    Ok((
        labels.into_iter().map(Option::unwrap_or_default).collect(),
        problem_type,
    ))
}
