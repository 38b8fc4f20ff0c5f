//! What the server runs: a [`Model`] replica per worker, and the
//! [`ModelInfo`] every replica shares.
//!
//! The trait takes token batches, not text: tokenization happens on the HTTP
//! side so the model threads only run the encoder. A fine-tuned classifier
//! plugs in by implementing [`Model::classify`] and describing its labels in
//! [`ModelInfo::head`]; the routes, batching and metrics need no change.

use std::path::Path;

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::{BertModel, ModelFiles, Pooling, TokenBatch, Workspace};
use crate::tokenize::BertTokenizer;

/// What a queued request asks the model for. Only requests with the same
/// task share a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Embed(Pooling),
    Classify,
}

/// One model replica. Each worker thread owns one, with its own buffers and
/// thread pool, so replicas never contend.
pub trait Model: Send {
    /// One pooled vector per sequence of `batch`, in order (not normalized).
    fn embed(&mut self, batch: &TokenBatch, pooling: Pooling) -> Result<Vec<Vec<f32>>>;

    /// Class logits per sequence of `batch`, in the order of
    /// [`ClassifierHead::labels`]. Only called when [`ModelInfo::head`] is
    /// set; an encoder without a head answers with an error.
    fn classify(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>>;

    /// Runs `task` on `batch`.
    fn run(&mut self, task: Task, batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        match task {
            Task::Embed(pooling) => self.embed(batch, pooling),
            Task::Classify => self.classify(batch),
        }
    }
}

/// A sequence-classification head as `/predict` and `/info` see it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierHead {
    pub labels: Vec<String>,
    /// Calibration temperature: probabilities are `softmax(logits / T)`.
    pub temperature: Option<f32>,
}

/// Facts about the served model, shared by all replicas.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The model directory as given, reported as `model_id`.
    pub id: String,
    /// Storage dtype of the weights; inference runs in f32.
    pub weights_dtype: String,
    pub max_input_length: usize,
    pub hidden_size: usize,
    /// Pooling used when an `/embed` request does not name one.
    pub pooling: Pooling,
    pub has_pooler: bool,
    pub head: Option<ClassifierHead>,
    /// E.g. "cpu (avx2, 8 threads)", per replica.
    pub backend: String,
}

/// A plain BERT encoder: embeddings only, no classification head.
pub struct Encoder<B: Backend> {
    model: BertModel<B>,
    workspace: Workspace<B>,
}

impl<B: Backend> Encoder<B> {
    pub fn new(model: BertModel<B>) -> Self {
        let workspace = Workspace::new(model.backend());
        Encoder { model, workspace }
    }
}

impl<B: Backend> Model for Encoder<B> {
    fn embed(&mut self, batch: &TokenBatch, pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        self.model.forward(batch, &mut self.workspace)?;
        let pooled = self.model.pool(batch, &mut self.workspace, pooling)?;
        let hidden = self.model.config().hidden_size;
        Ok(pooled.chunks_exact(hidden).map(<[f32]>::to_vec).collect())
    }

    fn classify(&mut self, _batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        Err(Error::Invalid(NO_HEAD.into()))
    }
}

/// Why `/predict` is refused on a plain encoder, and how to get a model that
/// accepts it.
pub const NO_HEAD: &str = "this model has no classification head (it is a plain encoder, \
     usable with /embed); `bertrt finetune` produces a model with one";

/// The model directory loaded `replicas` times, each on its own backend from
/// `backend()`, with the tokenizer and the shared description.
pub struct Loaded {
    pub info: ModelInfo,
    pub tokenizer: BertTokenizer,
    pub replicas: Vec<Box<dyn Model>>,
}

/// Loads `dir`. `max_length` defaults to the model's position limit;
/// `tokenizer_limit` is where the tokenizer truncates (one past
/// `max_length` lets the caller detect over-long inputs instead).
pub fn load<B: Backend + 'static>(
    dir: &Path,
    replicas: usize,
    max_length: Option<usize>,
    truncate: bool,
    mut backend: impl FnMut() -> B,
) -> Result<Loaded> {
    let files = ModelFiles::locate(dir)?;
    let weights_dtype = Checkpoint::open(&files.weights)?.dominant_dtype();
    let models = (0..replicas)
        .map(|_| BertModel::load(backend(), &files))
        .collect::<Result<Vec<_>>>()?;
    let first = models
        .first()
        .ok_or_else(|| Error::Invalid("--workers must be at least 1".into()))?;
    let limit = first.config().max_position_embeddings;
    let max_input_length = max_length.unwrap_or(limit);
    if max_input_length > limit || max_input_length < 2 {
        return Err(Error::Invalid(format!(
            "--max-input-length {max_input_length} is outside 2..={limit} (the model's max_position_embeddings)"
        )));
    }
    // With truncation off the tokenizer keeps one extra token, so an input
    // that does not fit shows up as exactly `max_input_length + 1` tokens.
    let tokenizer_limit = max_input_length + usize::from(!truncate);
    let tokenizer = BertTokenizer::from_dir(dir, tokenizer_limit)?;
    let info = ModelInfo {
        id: dir.display().to_string(),
        weights_dtype,
        max_input_length,
        hidden_size: first.config().hidden_size,
        pooling: files
            .sentence_transformers_pooling()
            .unwrap_or(Pooling::Mean),
        has_pooler: first.has_pooler(),
        head: None,
        backend: first.backend_description(),
    };
    let replicas = models
        .into_iter()
        .map(|model| Box::new(Encoder::new(model)) as Box<dyn Model>)
        .collect();
    Ok(Loaded {
        info,
        tokenizer,
        replicas,
    })
}
