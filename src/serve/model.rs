//! What the server runs: a [`Model`] replica per worker, and the
//! [`ModelInfo`] every replica shares.
//!
//! The trait takes token batches, not text: tokenization happens on the HTTP
//! side so the model threads only run the encoder. A fine-tuned sequence
//! classifier plugs in through [`Model::classify`], a token classifier
//! through [`Model::tag`], each describing its labels in [`ModelInfo::head`];
//! the routes, batching and metrics need no change.

use std::path::Path;

use crate::artifact::ProblemType;
use crate::backend::Backend;
use crate::classify::{Classifier, Decision};
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::model::{BertModel, LinearLoader, ModelFiles, Pooling, TokenBatch, Workspace};
use crate::tag::{self, Tagger};
use crate::tokenize::{check_room_for_text, BertTokenizer};

/// What a queued request asks the model for. Only requests with the same
/// task share a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Embed(Pooling),
    Classify,
    Tag,
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

    /// Token logits per sequence of `batch`, `[tokens, tags]` flattened, in
    /// the order of [`Head::Tagger`]'s tags. Only a token classifier
    /// answers; the routes never ask another model.
    fn tag(&mut self, _batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        Err(Error::Invalid(
            "this model is not a token classifier".into(),
        ))
    }

    /// Runs `task` on `batch`.
    fn run(&mut self, task: Task, batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        match task {
            Task::Embed(pooling) => self.embed(batch, pooling),
            Task::Classify => self.classify(batch),
            Task::Tag => self.tag(batch),
        }
    }
}

/// The number format a served encoder's linear layers run in: one of the
/// CLI's `--dtype` ([`crate::backend::Precision`], which is also what
/// training multiplies in) or INT8, which only inference has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearNumerics {
    Float32,
    /// bf16 operands, f32 sums (`--dtype bf16`).
    Bfloat16,
    /// INT8 GEMMs (`--int8`, or an INT8 model directory).
    Int8,
}

impl LinearNumerics {
    /// As `/info` reports it (`model_dtype`).
    pub fn name(self) -> &'static str {
        match self {
            LinearNumerics::Float32 => "float32",
            LinearNumerics::Bfloat16 => "bfloat16",
            LinearNumerics::Int8 => "int8",
        }
    }
}

/// A sequence-classification head as `/predict` and `/info` see it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierHead {
    pub labels: Vec<String>,
    /// Calibration temperature: probabilities are `softmax(logits / T)`.
    pub temperature: Option<f32>,
    /// How logits become a prediction: the artifact's (argmax, a tuned
    /// binary threshold, per-label thresholds, or a raw regression score).
    pub decision: Decision,
}

/// What `/predict` answers with.
#[derive(Clone, Debug, PartialEq)]
pub enum Head {
    /// A plain encoder: no `/predict`, only `/embed`.
    Embedder,
    /// Scores per input.
    Classifier(ClassifierHead),
    /// Entities per input, read from these (BIO) tags.
    Tagger { tags: Vec<String> },
}

impl Head {
    /// As `/info` reports it (`task`): "embedding", or the `bertrt finetune
    /// --task` that makes such a model.
    pub fn task(&self) -> &'static str {
        match self {
            Head::Embedder => "embedding",
            Head::Classifier(head) => match head.decision {
                Decision::Argmax | Decision::PositiveThreshold { .. } => ProblemType::SingleLabel,
                Decision::MultiLabel { .. } => ProblemType::MultiLabel,
                Decision::Score => ProblemType::Regression,
            }
            .task(),
            Head::Tagger { .. } => ProblemType::TokenClassification.task(),
        }
    }

    /// The task a warm-up forward exercises: the one `/predict` runs, else
    /// `/embed` with `pooling`.
    pub fn warmup_task(&self, pooling: Pooling) -> Task {
        match self {
            Head::Embedder => Task::Embed(pooling),
            Head::Classifier(_) => Task::Classify,
            Head::Tagger { .. } => Task::Tag,
        }
    }
}

/// Facts about the served model, shared by all replicas.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The model directory as given, reported as `model_id`.
    pub id: String,
    /// Storage dtype of the weights in the checkpoint.
    pub weights_dtype: String,
    /// What inference runs in.
    pub numerics: LinearNumerics,
    pub max_input_length: usize,
    pub hidden_size: usize,
    /// Pooling used when an `/embed` request does not name one.
    pub pooling: Pooling,
    pub has_pooler: bool,
    pub head: Head,
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

impl<B: Backend> Model for Classifier<B> {
    fn embed(&mut self, batch: &TokenBatch, pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let hidden = self.model.config().hidden_size;
        let pooled = self.pooled(batch, pooling)?;
        Ok(pooled.chunks_exact(hidden).map(<[f32]>::to_vec).collect())
    }

    fn classify(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        let classes = self.labels.len();
        let logits = self.logits(batch)?;
        Ok(logits.chunks_exact(classes).map(<[f32]>::to_vec).collect())
    }
}

impl<B: Backend> Model for Tagger<B> {
    fn embed(&mut self, batch: &TokenBatch, pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let hidden = self.model.config().hidden_size;
        let pooled = self.pooled(batch, pooling)?;
        Ok(pooled.chunks_exact(hidden).map(<[f32]>::to_vec).collect())
    }

    fn classify(&mut self, _batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        Err(Error::Invalid(
            "this model is a token classifier; /predict answers with entities".into(),
        ))
    }

    fn tag(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>> {
        self.sequence_logits(batch)
    }
}

/// Replicas of one model and what [`ModelInfo`] needs from the first.
struct Replicas {
    models: Vec<Box<dyn Model>>,
    config: BertConfig,
    has_pooler: bool,
    backend: String,
    head: Head,
    /// The max length a fine-tuned model was trained with.
    trained_length: Option<usize>,
}

fn classifier_replicas<B: Backend + 'static>(
    dir: &Path,
    count: usize,
    linears: &dyn LinearLoader<B>,
    backend: &mut impl FnMut() -> B,
) -> Result<Replicas> {
    let classifiers = (0..count)
        .map(|_| Classifier::load_with(backend(), dir, linears))
        .collect::<Result<Vec<_>>>()?;
    let first = &classifiers[0];
    Ok(Replicas {
        config: first.model.config().clone(),
        has_pooler: first.model.has_pooler(),
        backend: first.model.backend_description(),
        head: Head::Classifier(ClassifierHead {
            labels: first.labels.clone(),
            temperature: (!first.regression).then_some(first.temperature),
            decision: first.decision.clone(),
        }),
        trained_length: Some(first.tokenizer.max_length()),
        models: classifiers
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Model>)
            .collect(),
    })
}

fn tagger_replicas<B: Backend + 'static>(
    dir: &Path,
    count: usize,
    linears: &dyn LinearLoader<B>,
    backend: &mut impl FnMut() -> B,
) -> Result<Replicas> {
    let taggers = (0..count)
        .map(|_| Tagger::load_with(backend(), dir, linears))
        .collect::<Result<Vec<_>>>()?;
    let first = &taggers[0];
    Ok(Replicas {
        config: first.model.config().clone(),
        has_pooler: first.model.has_pooler(),
        backend: first.model.backend_description(),
        head: Head::Tagger {
            tags: first.tags.clone(),
        },
        trained_length: Some(first.tokenizer.max_length()),
        models: taggers
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Model>)
            .collect(),
    })
}

fn encoder_replicas<B: Backend + 'static>(
    files: &ModelFiles,
    count: usize,
    linears: &dyn LinearLoader<B>,
    backend: &mut impl FnMut() -> B,
) -> Result<Replicas> {
    let models = (0..count)
        .map(|_| BertModel::load_with(backend(), files, linears))
        .collect::<Result<Vec<_>>>()?;
    let first = &models[0];
    Ok(Replicas {
        config: first.config().clone(),
        has_pooler: first.has_pooler(),
        backend: first.backend_description(),
        head: Head::Embedder,
        trained_length: None,
        models: models
            .into_iter()
            .map(|model| Box::new(Encoder::new(model)) as Box<dyn Model>)
            .collect(),
    })
}

/// Why `/predict` is refused on a plain encoder, and how to get a model that
/// accepts it.
pub const NO_HEAD: &str = "this model has no classification head (it is a plain encoder, \
     usable with /embed); `bertrt finetune` produces a model with one";

/// The replicas of one model directory, its tokenizer and their shared
/// description.
pub struct Loaded {
    pub info: ModelInfo,
    pub tokenizer: BertTokenizer,
    pub replicas: Vec<Box<dyn Model>>,
}

/// Loads `dir` once per replica, each on a fresh `backend()`, its linear
/// layers made by `linears` (which run in `numerics`). `max_length`
/// defaults to the model's position limit; with `truncate` off, inputs over
/// it are left for the caller to refuse instead of being cut.
pub fn load<B: Backend + 'static>(
    dir: &Path,
    replicas: usize,
    linears: &dyn LinearLoader<B>,
    numerics: LinearNumerics,
    max_length: Option<usize>,
    truncate: bool,
    mut backend: impl FnMut() -> B,
) -> Result<Loaded> {
    let files = ModelFiles::locate(dir)?;
    if replicas == 0 {
        return Err(Error::Invalid("--workers must be at least 1".into()));
    }
    let ckpt = files.checkpoint()?;
    let weights_dtype = ckpt.dominant_dtype();
    // A fine-tuned classifier (bertrt artifact or HF
    // BertFor{Sequence,Token}Classification) serves /predict as well as
    // /embed.
    let has_head = ckpt.contains("classifier.weight");
    drop(ckpt);
    let default_pooling = files
        .sentence_transformers_pooling()
        .unwrap_or(Pooling::Mean);
    let built = if !has_head {
        encoder_replicas(&files, replicas, linears, &mut backend)?
    } else if tag::is_token_classifier(dir)? {
        tagger_replicas(dir, replicas, linears, &mut backend)?
    } else {
        classifier_replicas(dir, replicas, linears, &mut backend)?
    };
    let Replicas {
        models: replicas,
        config: first_config,
        has_pooler,
        backend: backend_description,
        head,
        trained_length,
    } = built;
    let limit = first_config.max_position_embeddings;
    // A fine-tuned model was trained at its artifact's max length: serve
    // with the same preprocessing unless told otherwise.
    let max_input_length = max_length.or(trained_length).unwrap_or(limit);
    check_room_for_text(max_input_length, "--max-input-length")?;
    if max_input_length > limit {
        return Err(Error::Invalid(format!(
            "--max-input-length {max_input_length} is over {limit}, the model's max_position_embeddings"
        )));
    }
    // With truncation off the tokenizer keeps one extra token, so an input
    // that does not fit shows up as exactly `max_input_length + 1` tokens.
    let tokenizer_limit = max_input_length + usize::from(!truncate);
    let tokenizer = BertTokenizer::from_dir(dir, tokenizer_limit)?;
    let info = ModelInfo {
        id: dir.display().to_string(),
        weights_dtype,
        numerics,
        max_input_length,
        hidden_size: first_config.hidden_size,
        pooling: default_pooling,
        has_pooler,
        head,
        backend: backend_description,
    };
    Ok(Loaded {
        info,
        tokenizer,
        replicas,
    })
}
