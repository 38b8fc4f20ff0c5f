//! Text to class probabilities with a fine-tuned model directory (a bertrt
//! artifact or any Hugging Face `BertForSequenceClassification`).

use std::path::Path;

use crate::artifact::ArtifactMeta;
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::eval::calibration::softmax_with_temperature;
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
        let (labels, regression) = match &meta {
            Some(meta) => (meta.labels.clone(), meta.task == "regression"),
            None => labels_from_config(&files.config)?,
        };
        let ckpt = Checkpoint::open(&files.weights)?;
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

    /// Calibrated probabilities, one row per input.
    pub fn probabilities(&mut self, inputs: &[Input]) -> Result<Vec<Vec<f32>>> {
        let encoded = self.encode(inputs)?;
        let logits = self.logits_encoded(&encoded)?;
        let classes = self.labels.len();
        Ok(softmax_with_temperature(&logits, classes, self.temperature)
            .chunks_exact(classes)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Labels in id order from a Hugging Face `config.json`'s `id2label`, and
/// whether its `problem_type` is regression.
fn labels_from_config(path: &Path) -> Result<(Vec<String>, bool)> {
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
    let regression = json["problem_type"] == "regression";
    Ok((
        labels.into_iter().map(Option::unwrap_or_default).collect(),
        regression,
    ))
}
