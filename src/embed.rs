//! Text to sentence vectors: tokenizer + encoder + pooling, batched.

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{
    BertModel, F32Linears, LinearLoader, ModelFiles, Pooling, TokenBatch, Workspace,
};
use crate::tokenize::{check_room_for_text, BertTokenizer};

pub struct Embedder<B: Backend> {
    pub model: BertModel<B>,
    pub tokenizer: BertTokenizer,
    pub pooling: Pooling,
    pub normalize: bool,
    workspace: Workspace<B>,
}

impl<B: Backend> Embedder<B> {
    /// Loads the model in `dir`. `max_length` defaults to the model's
    /// position limit; `pooling` to what a sentence-transformers
    /// `1_Pooling/config.json` names, else mean.
    pub fn load(
        backend: B,
        dir: &Path,
        max_length: Option<usize>,
        pooling: Option<Pooling>,
        normalize: bool,
    ) -> Result<Self> {
        Self::load_with(backend, dir, max_length, pooling, normalize, &F32Linears)
    }

    /// [`Self::load`] with `linears` choosing each encoder linear's form
    /// (e.g. `crate::quant::Int8Linears`).
    pub fn load_with(
        backend: B,
        dir: &Path,
        max_length: Option<usize>,
        pooling: Option<Pooling>,
        normalize: bool,
        linears: &dyn LinearLoader<B>,
    ) -> Result<Self> {
        let files = ModelFiles::locate(dir)?;
        let model = BertModel::load_with(backend, &files, linears)?;
        let limit = model.config().max_position_embeddings;
        let max_length = max_length.unwrap_or(limit);
        check_room_for_text(max_length, "--max-length")?;
        if max_length > limit {
            return Err(Error::Invalid(format!(
                "--max-length {max_length} is over {limit}, the model's max_position_embeddings"
            )));
        }
        let tokenizer = BertTokenizer::from_dir(dir, max_length)?;
        let pooling = pooling
            .or_else(|| files.sentence_transformers_pooling())
            .unwrap_or(Pooling::Mean);
        if pooling == Pooling::Pooler && !model.has_pooler() {
            return Err(Error::Invalid(format!(
                "{}: no pooler weights (pooler.dense.*) in this checkpoint; use --pooling mean or cls",
                files.weights.display()
            )));
        }
        let workspace = Workspace::new(model.backend());
        Ok(Embedder {
            model,
            tokenizer,
            pooling,
            normalize,
            workspace,
        })
    }

    /// One vector per text, in input order.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encoded = self.tokenizer.encode_batch(texts)?;
        let batch = TokenBatch::from_encoded(&encoded);
        self.model.forward(&batch, &mut self.workspace)?;
        let pooled = self.model.pool(&batch, &mut self.workspace, self.pooling)?;
        let hidden = self.model.config().hidden_size;
        Ok(pooled
            .chunks_exact(hidden)
            .map(|v| {
                let mut v = v.to_vec();
                if self.normalize {
                    l2_normalize(&mut v);
                }
                v
            })
            .collect())
    }
}

/// Scales `v` to unit length (left as is when it is all zeros).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}
