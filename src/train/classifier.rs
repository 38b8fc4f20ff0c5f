//! `BertForSequenceClassification` and `BertForTokenClassification` for
//! training: forward with the activations backward needs, and the
//! hand-written backward pass. Both heads share one encoder forward and
//! backward; only what feeds the classifier differs ([`HeadKind`]).
//!
//! Mirrors Hugging Face's model: embeddings → LayerNorm → dropout; per layer
//! self-attention (dropout on the probabilities), output dense → dropout →
//! residual LayerNorm, intermediate GELU, output dense → dropout → residual
//! LayerNorm; pooling (BERT pooler, `[CLS]` or mean) for a sequence head,
//! every token's hidden state for a token head; dropout; classifier.
//!
//! With LoRA ([`SequenceClassifier::add_lora`]) the chosen linears add
//! their adapter's low-rank update to their output, and backward reaches
//! through the frozen encoder to the adapters only.
//!
//! With gradient checkpointing ([`SequenceClassifier::set_grad_checkpointing`])
//! forward keeps only each encoder layer's input, and backward runs each
//! layer's forward again from it, into one set of buffers that all layers
//! share, just before the layer's own backward.

use std::ops::Range;

use crate::backend::train::{attention_probs_len, Dropout, Lora, TrainBackend};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::lora::{self, LoraSpec, LoraTarget, PEFT_PREFIX};
use crate::model::{Pooling, TokenBatch};
use crate::rng::{self, Rng};
use crate::train::loss;
use crate::train::params::{ParamId, ParamStore};

struct LayerParams {
    qkv_weight: ParamId,
    qkv_bias: ParamId,
    attention_output_weight: ParamId,
    attention_output_bias: ParamId,
    attention_norm_weight: ParamId,
    attention_norm_bias: ParamId,
    intermediate_weight: ParamId,
    intermediate_bias: ParamId,
    output_weight: ParamId,
    output_bias: ParamId,
    output_norm_weight: ParamId,
    output_norm_bias: ParamId,
    adapters: Vec<LayerAdapter>,
}

/// The linear layers of an encoder layer, as adapters see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linear {
    /// Query, key and value fused: `[3·hidden, hidden]`.
    Qkv,
    AttentionOutput,
    Intermediate,
    Output,
}

/// One LoRA adapter of an encoder layer.
struct LayerAdapter {
    /// `{module}` of `{module}.weight`, the Hugging Face layer it adapts.
    module: String,
    linear: Linear,
    /// The columns of the linear's output it updates (a third of the fused
    /// QKV output for query, key or value; all of them otherwise).
    columns: Range<usize>,
    rank: usize,
    a: ParamId,
    b: ParamId,
}

/// What one layer's backward needs from its forward, besides the layer's
/// input ([`Activations::layer_inputs`]).
struct LayerActivations<B: Backend> {
    qkv: B::Tensor,
    probs: B::Tensor,
    context: B::Tensor,
    attention_sum: B::Tensor,
    attention_mean: B::Tensor,
    attention_rstd: B::Tensor,
    attention_normed: B::Tensor,
    intermediate_pre: B::Tensor,
    intermediate: B::Tensor,
    output_sum: B::Tensor,
    output_mean: B::Tensor,
    output_rstd: B::Tensor,
    /// `input · Aᵀ` of each adapter, in [`LayerParams::adapters`] order.
    lora_xa: Vec<B::Tensor>,
}

impl<B: Backend> LayerActivations<B> {
    fn new(backend: &B) -> Self {
        LayerActivations {
            qkv: backend.new_tensor(),
            probs: backend.new_tensor(),
            context: backend.new_tensor(),
            attention_sum: backend.new_tensor(),
            attention_mean: backend.new_tensor(),
            attention_rstd: backend.new_tensor(),
            attention_normed: backend.new_tensor(),
            intermediate_pre: backend.new_tensor(),
            intermediate: backend.new_tensor(),
            output_sum: backend.new_tensor(),
            output_mean: backend.new_tensor(),
            output_rstd: backend.new_tensor(),
            lora_xa: Vec::new(),
        }
    }
}

/// Where the layers' activations wait between forward and backward.
enum LayerStore<B: Backend> {
    /// Each layer keeps its own.
    PerLayer(Vec<LayerActivations<B>>),
    /// Gradient checkpointing: one set that each layer fills in turn, in
    /// forward and again in backward, recomputed from the layer's input,
    /// so that only one layer's activations are held at a time.
    Shared(LayerActivations<B>),
}

impl<B: Backend> LayerStore<B> {
    fn new(backend: &B, layers: usize, checkpointing: bool) -> Self {
        if checkpointing {
            LayerStore::Shared(LayerActivations::new(backend))
        } else {
            LayerStore::PerLayer(
                (0..layers)
                    .map(|_| LayerActivations::new(backend))
                    .collect(),
            )
        }
    }

    fn layer(&self, l: usize) -> &LayerActivations<B> {
        match self {
            LayerStore::PerLayer(layers) => &layers[l],
            LayerStore::Shared(shared) => shared,
        }
    }

    fn layer_mut(&mut self, l: usize) -> &mut LayerActivations<B> {
        match self {
            LayerStore::PerLayer(layers) => &mut layers[l],
            LayerStore::Shared(shared) => shared,
        }
    }
}

/// Every activation of one forward pass plus scratch for backward, sized
/// on each forward from the batch (buffers keep their capacity).
struct Activations<B: Backend> {
    embedding_sum: B::Tensor,
    embedding_mean: B::Tensor,
    embedding_rstd: B::Tensor,
    /// The hidden states entering each layer: all that gradient
    /// checkpointing keeps of a layer through the forward pass.
    layer_inputs: Vec<B::Tensor>,
    layers: LayerStore<B>,
    last_hidden: B::Tensor,
    /// Pooling input (`[CLS]` rows) and output (pooler: after tanh).
    cls: B::Tensor,
    pooled: B::Tensor,
    head_input: B::Tensor,
    logits: B::Tensor,
    // Backward scratch.
    d_logits: B::Tensor,
    d_head_input: B::Tensor,
    d_cls: B::Tensor,
    d_hidden: B::Tensor,
    d_branch: B::Tensor,
    d_sum: B::Tensor,
    d_wide: B::Tensor,
    d_qkv: B::Tensor,
    /// `scale · d_out · B` of the adapter being differentiated.
    d_lora: B::Tensor,
}

/// Dropout sites, each with its own mask stream.
#[derive(Clone, Copy)]
enum Site {
    Embeddings,
    AttentionProbs(usize),
    AttentionOutput(usize),
    Output(usize),
    Head,
}

impl Site {
    fn label(self) -> u64 {
        match self {
            Site::Embeddings => 0,
            Site::Head => 1,
            Site::AttentionProbs(l) => 16 + 4 * l as u64,
            Site::AttentionOutput(l) => 17 + 4 * l as u64,
            Site::Output(l) => 18 + 4 * l as u64,
        }
    }
}

/// What the head is trained to predict, for one batch.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Single-label classification: cross-entropy, optionally weighted per
    /// class.
    Classes {
        labels: &'a [usize],
        class_weights: Option<&'a [f32]>,
    },
    /// Single-label classification with focal loss ([`loss::focal`]);
    /// class weights act as its per-class alpha.
    Focal {
        labels: &'a [usize],
        class_weights: Option<&'a [f32]>,
        gamma: f32,
    },
    /// Multi-label classification: `[sequences, num_labels]` of 0 or 1, one
    /// sigmoid per label, binary cross-entropy ([`loss::bce_with_logits`]).
    MultiHot(&'a [f32]),
    /// Regression on one output: mean squared error.
    Values(&'a [f32]),
    /// Token classification: one entry per token of the batch, in packed
    /// order; None (Hugging Face's -100) is ignored by the loss
    /// ([`loss::token_cross_entropy`]).
    Tokens(&'a [Option<usize>]),
}

/// What the classifier reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadKind {
    /// One pooled vector per sequence (`BertForSequenceClassification`).
    Sequence,
    /// Every token's last hidden state (`BertForTokenClassification`, which
    /// has no pooler): logits `[tokens, num_labels]`.
    Token,
}

/// Training-time settings of the forward pass.
#[derive(Clone, Copy, Debug)]
pub struct ForwardMode {
    /// None: evaluation (no dropout).
    pub dropout_seed: Option<u64>,
}

pub struct SequenceClassifier<B: TrainBackend> {
    pub backend: B,
    pub config: BertConfig,
    pub pooling: Pooling,
    pub kind: HeadKind,
    pub num_labels: usize,
    pub head_dropout: f32,
    pub params: ParamStore<B>,
    word_embeddings: ParamId,
    position_embeddings: ParamId,
    token_type_embeddings: ParamId,
    embedding_norm_weight: ParamId,
    embedding_norm_bias: ParamId,
    layers: Vec<LayerParams>,
    pooler: Option<(ParamId, ParamId)>,
    classifier_weight: ParamId,
    classifier_bias: ParamId,
    /// The adapters' settings, once [`Self::add_lora`] added them.
    lora: Option<LoraSpec>,
    acts: Activations<B>,
    dropouts: Option<u64>,
}

impl<B: TrainBackend> SequenceClassifier<B> {
    /// A classifier on the encoder in `ckpt`. The head comes from the
    /// checkpoint when it holds one of the right shape (resuming a
    /// fine-tuned model), else it is new: weight ~ N(0, 0.02), bias 0, as
    /// Hugging Face initialises it.
    pub fn new(
        backend: B,
        config: BertConfig,
        ckpt: &Checkpoint,
        pooling: Pooling,
        num_labels: usize,
        head_dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        Self::build(
            backend,
            config,
            ckpt,
            pooling,
            HeadKind::Sequence,
            num_labels,
            head_dropout,
            seed,
        )
    }

    /// A token classifier (`BertForTokenClassification`) on the encoder in
    /// `ckpt`: no pooler (the checkpoint's, if any, is left out, as
    /// `transformers` does), the head loaded or new as in [`Self::new`].
    pub fn new_token_classifier(
        backend: B,
        config: BertConfig,
        ckpt: &Checkpoint,
        num_labels: usize,
        head_dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        Self::build(
            backend,
            config,
            ckpt,
            Pooling::Cls,
            HeadKind::Token,
            num_labels,
            head_dropout,
            seed,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        backend: B,
        config: BertConfig,
        ckpt: &Checkpoint,
        pooling: Pooling,
        kind: HeadKind,
        num_labels: usize,
        head_dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut params = ParamStore::default();
        let p = &mut params;
        let be = &backend;
        let word_embeddings = p.load(
            be,
            ckpt,
            "bert.embeddings.word_embeddings.weight",
            &[config.vocab_size, h],
        )?;
        let position_embeddings = p.load(
            be,
            ckpt,
            "bert.embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type_embeddings = p.load(
            be,
            ckpt,
            "bert.embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let embedding_norm_weight = p.load(be, ckpt, "bert.embeddings.LayerNorm.weight", &[h])?;
        let embedding_norm_bias = p.load(be, ckpt, "bert.embeddings.LayerNorm.bias", &[h])?;
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let pre = format!("bert.encoder.layer.{l}");
            let qkv = |suffix: &str| -> Vec<String> {
                ["query", "key", "value"]
                    .iter()
                    .map(|part| format!("{pre}.attention.self.{part}.{suffix}"))
                    .collect()
            };
            layers.push(LayerParams {
                qkv_weight: p.load_stacked(
                    be,
                    ckpt,
                    &format!("{pre}.attention.self.qkv.weight"),
                    &qkv("weight"),
                    &[h, h],
                )?,
                qkv_bias: p.load_stacked(
                    be,
                    ckpt,
                    &format!("{pre}.attention.self.qkv.bias"),
                    &qkv("bias"),
                    &[h],
                )?,
                attention_output_weight: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.attention.output.dense.weight"),
                    &[h, h],
                )?,
                attention_output_bias: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.attention.output.dense.bias"),
                    &[h],
                )?,
                attention_norm_weight: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.attention.output.LayerNorm.weight"),
                    &[h],
                )?,
                attention_norm_bias: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.attention.output.LayerNorm.bias"),
                    &[h],
                )?,
                intermediate_weight: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.intermediate.dense.weight"),
                    &[i, h],
                )?,
                intermediate_bias: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.intermediate.dense.bias"),
                    &[i],
                )?,
                output_weight: p.load(be, ckpt, &format!("{pre}.output.dense.weight"), &[h, i])?,
                output_bias: p.load(be, ckpt, &format!("{pre}.output.dense.bias"), &[h])?,
                output_norm_weight: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.output.LayerNorm.weight"),
                    &[h],
                )?,
                output_norm_bias: p.load(
                    be,
                    ckpt,
                    &format!("{pre}.output.LayerNorm.bias"),
                    &[h],
                )?,
                adapters: Vec::new(),
            });
        }
        let pooler = if kind == HeadKind::Token {
            None
        } else if ckpt.contains("bert.pooler.dense.weight") {
            Some((
                p.load(be, ckpt, "bert.pooler.dense.weight", &[h, h])?,
                p.load(be, ckpt, "bert.pooler.dense.bias", &[h])?,
            ))
        } else if pooling == Pooling::Pooler {
            return Err(Error::Invalid(format!(
                "{}: no pooler weights (pooler.dense.*); use --pooling cls or mean",
                ckpt.path().display()
            )));
        } else {
            None
        };
        let head_shape_matches = ckpt.tensor("classifier.weight", &[num_labels, h]).is_ok()
            && ckpt.tensor("classifier.bias", &[num_labels]).is_ok();
        let (classifier_weight, classifier_bias) = if head_shape_matches {
            (
                p.load(be, ckpt, "classifier.weight", &[num_labels, h])?,
                p.load(be, ckpt, "classifier.bias", &[num_labels])?,
            )
        } else {
            let mut rng = Rng::new(rng::derive_seed(seed, 0xC1A5));
            let weight: Vec<f32> = (0..num_labels * h).map(|_| 0.02 * rng.normal()).collect();
            let whole = |name: &str, rows| vec![(name.to_string(), 0..rows)];
            (
                p.add(
                    be,
                    "classifier.weight",
                    &[num_labels, h],
                    whole("classifier.weight", num_labels),
                    &weight,
                ),
                p.add(
                    be,
                    "classifier.bias",
                    &[num_labels],
                    whole("classifier.bias", num_labels),
                    &vec![0.0; num_labels],
                ),
            )
        };
        let acts = Activations {
            embedding_sum: backend.new_tensor(),
            embedding_mean: backend.new_tensor(),
            embedding_rstd: backend.new_tensor(),
            layer_inputs: (0..config.num_hidden_layers)
                .map(|_| backend.new_tensor())
                .collect(),
            layers: LayerStore::new(&backend, config.num_hidden_layers, false),
            last_hidden: backend.new_tensor(),
            cls: backend.new_tensor(),
            pooled: backend.new_tensor(),
            head_input: backend.new_tensor(),
            logits: backend.new_tensor(),
            d_logits: backend.new_tensor(),
            d_head_input: backend.new_tensor(),
            d_cls: backend.new_tensor(),
            d_hidden: backend.new_tensor(),
            d_branch: backend.new_tensor(),
            d_sum: backend.new_tensor(),
            d_wide: backend.new_tensor(),
            d_qkv: backend.new_tensor(),
            d_lora: backend.new_tensor(),
        };
        Ok(SequenceClassifier {
            backend,
            config,
            pooling,
            kind,
            num_labels,
            head_dropout,
            params,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_norm_weight,
            embedding_norm_bias,
            layers,
            pooler,
            classifier_weight,
            classifier_bias,
            lora: None,
            acts,
            dropouts: None,
        })
    }

    /// Adds a LoRA adapter on each of `spec.targets` in every encoder layer
    /// and freezes the base model (embeddings and encoder); the head (pooler
    /// and classifier) keeps training, as it must for a new task (PEFT's
    /// `modules_to_save`; bertrt's head includes the pooler, whose tanh
    /// projection was trained for next-sentence prediction, or not at all).
    /// A is drawn as PEFT draws it (`kaiming_uniform_(a=√5)`: uniform in
    /// ±1/√in), B is zero, so the model starts out computing exactly what
    /// the base model does. Adapters are named as PEFT names them
    /// (`{module}.lora_A.weight`), and get weight decay like other matrices.
    pub fn add_lora(&mut self, spec: LoraSpec, seed: u64) {
        let (h, i) = (self.config.hidden_size, self.config.intermediate_size);
        let rank = spec.rank;
        let mut rng = Rng::new(rng::derive_seed(seed, 0x10_4A));
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for &target in &spec.targets {
                let (linear, columns, inputs) = match target {
                    LoraTarget::Query => (Linear::Qkv, 0..h, h),
                    LoraTarget::Key => (Linear::Qkv, h..2 * h, h),
                    LoraTarget::Value => (Linear::Qkv, 2 * h..3 * h, h),
                    LoraTarget::Dense => (Linear::AttentionOutput, 0..h, h),
                    LoraTarget::Intermediate => (Linear::Intermediate, 0..i, h),
                    LoraTarget::Output => (Linear::Output, 0..h, i),
                };
                let module = target.module(l);
                let bound = 1.0 / (inputs as f32).sqrt();
                let a: Vec<f32> = (0..rank * inputs)
                    .map(|_| bound * (2.0 * rng.next_f32() - 1.0))
                    .collect();
                let outputs = columns.len();
                let mut add = |matrix: &str, shape: [usize; 2], data: &[f32]| {
                    let name = format!("{module}.{matrix}.weight");
                    let parts = vec![(name.clone(), 0..shape[0])];
                    self.params.add(&self.backend, &name, &shape, parts, data)
                };
                let a = add("lora_A", [rank, inputs], &a);
                let b = add("lora_B", [outputs, rank], &vec![0.0; outputs * rank]);
                layer.adapters.push(LayerAdapter {
                    module,
                    linear,
                    columns,
                    rank,
                    a,
                    b,
                });
            }
        }
        for group in self.groups() {
            self.set_trainable(group, group == Group::Head);
        }
        self.lora = Some(spec);
    }

    /// The LoRA settings, if the model has adapters.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    /// Every LoRA adapter matrix (A and B of each adapter).
    pub fn adapter_params(&self) -> Vec<ParamId> {
        self.layers
            .iter()
            .flat_map(|l| &l.adapters)
            .flat_map(|a| [a.a, a.b])
            .collect()
    }

    /// Every Hugging Face tensor of the model with each LoRA adapter merged
    /// into its layer (`W + s·B·A`, [`lora::merge`]): the model as a plain
    /// `BertFor*Classification`, for saving.
    pub fn merged_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let adapter_names: Vec<&str> = self
            .adapter_params()
            .into_iter()
            .map(|id| self.params[id].name.as_str())
            .collect();
        let mut tensors: Vec<_> = self
            .params
            .export(&self.backend)
            .into_iter()
            .filter(|(name, _, _)| !adapter_names.contains(&name.as_str()))
            .collect();
        let scale = self.lora.as_ref().map_or(0.0, LoraSpec::scale);
        for adapter in self.layers.iter().flat_map(|l| &l.adapters) {
            let weight_name = format!("{}.weight", adapter.module);
            let (_, _, weight) = tensors
                .iter_mut()
                .find(|(name, _, _)| *name == weight_name)
                .expect("every adapted layer is exported");
            let a = self.backend.to_host(&self.params[adapter.a].value);
            let b = self.backend.to_host(&self.params[adapter.b].value);
            lora::merge(weight, &a, &b, scale, adapter.rank);
        }
        tensors
    }

    /// The LoRA adapters and the head, named as PEFT saves them in
    /// `adapter_model.safetensors` (`base_model.model.` + the Hugging Face
    /// name): what an adapter artifact holds beside its base model.
    pub fn adapter_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let saved: Vec<&str> = self
            .adapter_params()
            .into_iter()
            .chain(self.group(Group::Head))
            .map(|id| self.params[id].name.as_str())
            .collect();
        self.params
            .export(&self.backend)
            .into_iter()
            .filter(|(name, _, _)| saved.contains(&name.as_str()))
            .map(|(name, shape, data)| (format!("{PEFT_PREFIX}{name}"), shape, data))
            .collect()
    }

    /// The modules an adapter artifact saves whole besides the adapters
    /// (PEFT's `modules_to_save`): the classifier, and the pooler where the
    /// model has one.
    pub fn modules_to_save(&self) -> Vec<&'static str> {
        let mut modules = vec!["classifier"];
        if self.pooler.is_some() {
            modules.push("pooler");
        }
        modules
    }

    /// Gradient checkpointing: forward keeps only each encoder layer's
    /// input, and backward recomputes a layer's activations from it just
    /// before that layer's backward (about one more forward pass of
    /// compute for one layer's activations instead of every layer's).
    /// Switching frees the activations held so far.
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.acts.layers = LayerStore::new(&self.backend, self.layers.len(), on);
    }

    pub fn grad_checkpointing(&self) -> bool {
        matches!(self.acts.layers, LayerStore::Shared(_))
    }

    /// The f32 values the encoder layers hold from forward to backward on
    /// `sequences` sequences of `len` tokens, with or without gradient
    /// checkpointing: every layer's input, and the activations of every
    /// layer or of the one being worked on.
    pub fn layer_activation_floats(
        &self,
        sequences: usize,
        len: usize,
        checkpointing: bool,
    ) -> usize {
        let c = &self.config;
        let (t, h, inter) = (sequences * len, c.hidden_size, c.intermediate_size);
        // Per token: QKV (3h), context, attention sum and its normed
        // output, output sum (h each); intermediate before and after GELU;
        // each LayerNorm's mean and 1/std; the adapters' `input · Aᵀ`.
        // Per sequence and head: the len × len attention probabilities.
        let activations = |lp: &LayerParams| {
            let ranks: usize = lp.adapters.iter().map(|a| a.rank).sum();
            t * (7 * h + 2 * inter + 4 + ranks) + sequences * c.num_attention_heads * len * len
        };
        let per_layer = self.layers.iter().map(activations);
        let held = if checkpointing {
            per_layer.max().unwrap_or(0)
        } else {
            per_layer.sum()
        };
        self.layers.len() * t * h + held
    }

    fn dropout(&self, site: Site) -> Dropout {
        dropout_for(&self.config, self.head_dropout, self.dropouts, site)
    }

    /// Runs the model, keeping activations; returns the logits
    /// `[sequences, num_labels]` (a token head: `[tokens, num_labels]`, in
    /// packed order) on the host.
    pub fn forward(&mut self, batch: &TokenBatch, mode: ForwardMode) -> Result<Vec<f32>> {
        self.dropouts = mode.dropout_seed;
        self.encoder_forward(batch)?;
        let be = &self.backend;
        let (t, h) = (batch.tokens(), self.config.hidden_size);
        let sequences = batch.sequences();
        let p = &self.params;

        // Head.
        let head_dropout = self.dropout(Site::Head);
        let acts = &mut self.acts;
        let rows = match self.kind {
            HeadKind::Sequence => sequences,
            HeadKind::Token => t,
        };
        be.resize(&mut acts.pooled, rows * h);
        match (self.kind, self.pooling) {
            (HeadKind::Token, _) => be.copy(&mut acts.pooled, &acts.last_hidden),
            (HeadKind::Sequence, Pooling::Mean) => {
                be.mean_pool(&mut acts.pooled, &acts.last_hidden, &batch.offsets, h)
            }
            (HeadKind::Sequence, Pooling::Cls) => be.gather_rows(
                &mut acts.pooled,
                &acts.last_hidden,
                &batch.offsets[..sequences],
                h,
            ),
            (HeadKind::Sequence, Pooling::Pooler) => {
                let (w, b) = self.pooler.expect("checked at construction");
                be.resize(&mut acts.cls, sequences * h);
                be.gather_rows(
                    &mut acts.cls,
                    &acts.last_hidden,
                    &batch.offsets[..sequences],
                    h,
                );
                be.linear_forward(
                    &mut acts.pooled,
                    &acts.cls,
                    &p[w].value,
                    &p[b].value,
                    sequences,
                );
                be.tanh(&mut acts.pooled);
            }
        }
        be.resize(&mut acts.head_input, rows * h);
        be.copy(&mut acts.head_input, &acts.pooled);
        be.dropout(&mut acts.head_input, head_dropout);
        be.resize(&mut acts.logits, rows * self.num_labels);
        be.linear_forward(
            &mut acts.logits,
            &acts.head_input,
            &p[self.classifier_weight].value,
            &p[self.classifier_bias].value,
            rows,
        );
        Ok(be.to_host(&acts.logits))
    }
}

impl<B: TrainBackend> SequenceClassifier<B> {
    /// Embeddings and encoder layers, shared by both heads: the last
    /// hidden state `[tokens, hidden]` lands in `acts.last_hidden`, with
    /// every activation backward needs (with gradient checkpointing, each
    /// layer's input and the top layer's activations).
    fn encoder_forward(&mut self, batch: &TokenBatch) -> Result<()> {
        let be = &self.backend;
        let c = &self.config;
        let (t, h) = (batch.tokens(), c.hidden_size);
        if batch.max_len() > c.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "a sequence of {} tokens exceeds the model's {} positions",
                batch.max_len(),
                c.max_position_embeddings
            )));
        }
        let p = &self.params;
        let dropout = self.dropout(Site::Embeddings);
        let acts = &mut self.acts;
        be.resize(&mut acts.embedding_sum, t * h);
        be.resize(&mut acts.embedding_mean, t);
        be.resize(&mut acts.embedding_rstd, t);
        be.embedding_forward(
            &mut acts.embedding_sum,
            &batch.ids,
            &batch.type_ids,
            &batch.offsets,
            &p[self.word_embeddings].value,
            &p[self.position_embeddings].value,
            &p[self.token_type_embeddings].value,
            h,
        );
        let first = &mut acts.layer_inputs[0];
        be.resize(first, t * h);
        be.layer_norm_forward(
            first,
            &acts.embedding_sum,
            &p[self.embedding_norm_weight].value,
            &p[self.embedding_norm_bias].value,
            c.layer_norm_eps as f32,
            &mut acts.embedding_mean,
            &mut acts.embedding_rstd,
        );
        be.dropout(first, dropout);
        for l in 0..self.layers.len() {
            self.layer_forward(l, batch);
        }
        Ok(())
    }

    /// Layer `l` from its input in `acts.layer_inputs`: keeps what its
    /// backward needs in the layer's activation set and writes its output
    /// to the next layer's input (the top layer's: `acts.last_hidden`).
    /// Gradient checkpointing runs it again in backward, with the same
    /// dropout seeds, so the recomputed activations are the forward's.
    fn layer_forward(&mut self, l: usize, batch: &TokenBatch) {
        let scale = self.lora.as_ref().map_or(0.0, LoraSpec::scale);
        let Self {
            backend: be,
            config: c,
            params: p,
            acts,
            layers,
            ..
        } = self;
        let (t, h, inter) = (batch.tokens(), c.hidden_size, c.intermediate_size);
        let eps = c.layer_norm_eps as f32;
        let dropout_of = |site| dropout_for(c, self.head_dropout, self.dropouts, site);
        let lp = &layers[l];
        let (inputs, later_inputs) = acts.layer_inputs.split_at_mut(l + 1);
        let input = &inputs[l];
        let output = match later_inputs.first_mut() {
            Some(next) => next,
            None => &mut acts.last_hidden,
        };
        let a = acts.layers.layer_mut(l);
        // Adapters may have come after the set was made.
        a.lora_xa.resize_with(lp.adapters.len(), || be.new_tensor());
        let adapters = Adapters {
            list: &lp.adapters,
            scale,
            rows: t,
        };
        be.resize(&mut a.qkv, t * 3 * h);
        adapters.linear_forward(
            be,
            p,
            Linear::Qkv,
            (lp.qkv_weight, lp.qkv_bias),
            &mut a.lora_xa,
            &mut a.qkv,
            input,
        );
        be.resize(
            &mut a.probs,
            attention_probs_len(&batch.offsets, c.num_attention_heads),
        );
        be.resize(&mut a.context, t * h);
        be.attention_forward(
            &mut a.context,
            &mut a.probs,
            &a.qkv,
            &batch.offsets,
            c.num_attention_heads,
            c.head_dim(),
            dropout_of(Site::AttentionProbs(l)),
        );
        be.resize(&mut a.attention_sum, t * h);
        adapters.linear_forward(
            be,
            p,
            Linear::AttentionOutput,
            (lp.attention_output_weight, lp.attention_output_bias),
            &mut a.lora_xa,
            &mut a.attention_sum,
            &a.context,
        );
        be.dropout(&mut a.attention_sum, dropout_of(Site::AttentionOutput(l)));
        be.add_assign(&mut a.attention_sum, input);
        be.resize(&mut a.attention_mean, t);
        be.resize(&mut a.attention_rstd, t);
        be.resize(&mut a.attention_normed, t * h);
        be.layer_norm_forward(
            &mut a.attention_normed,
            &a.attention_sum,
            &p[lp.attention_norm_weight].value,
            &p[lp.attention_norm_bias].value,
            eps,
            &mut a.attention_mean,
            &mut a.attention_rstd,
        );
        be.resize(&mut a.intermediate_pre, t * inter);
        be.resize(&mut a.intermediate, t * inter);
        adapters.linear_forward(
            be,
            p,
            Linear::Intermediate,
            (lp.intermediate_weight, lp.intermediate_bias),
            &mut a.lora_xa,
            &mut a.intermediate_pre,
            &a.attention_normed,
        );
        be.gelu_forward(&mut a.intermediate, &a.intermediate_pre);
        be.resize(&mut a.output_sum, t * h);
        adapters.linear_forward(
            be,
            p,
            Linear::Output,
            (lp.output_weight, lp.output_bias),
            &mut a.lora_xa,
            &mut a.output_sum,
            &a.intermediate,
        );
        be.dropout(&mut a.output_sum, dropout_of(Site::Output(l)));
        be.add_assign(&mut a.output_sum, &a.attention_normed);
        be.resize(&mut a.output_mean, t);
        be.resize(&mut a.output_rstd, t);
        be.resize(output, t * h);
        be.layer_norm_forward(
            output,
            &a.output_sum,
            &p[lp.output_norm_weight].value,
            &p[lp.output_norm_bias].value,
            eps,
            &mut a.output_mean,
            &mut a.output_rstd,
        );
    }
}

/// Parameters that are frozen or given a learning rate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Embeddings,
    Layer(usize),
    /// Pooler and classifier.
    Head,
}

impl<B: TrainBackend> SequenceClassifier<B> {
    /// The parameters of `group`.
    pub fn group(&self, group: Group) -> Vec<ParamId> {
        match group {
            Group::Embeddings => vec![
                self.word_embeddings,
                self.position_embeddings,
                self.token_type_embeddings,
                self.embedding_norm_weight,
                self.embedding_norm_bias,
            ],
            Group::Layer(l) => {
                let lp = &self.layers[l];
                vec![
                    lp.qkv_weight,
                    lp.qkv_bias,
                    lp.attention_output_weight,
                    lp.attention_output_bias,
                    lp.attention_norm_weight,
                    lp.attention_norm_bias,
                    lp.intermediate_weight,
                    lp.intermediate_bias,
                    lp.output_weight,
                    lp.output_bias,
                    lp.output_norm_weight,
                    lp.output_norm_bias,
                ]
            }
            Group::Head => {
                let mut ids = vec![self.classifier_weight, self.classifier_bias];
                if let Some((w, b)) = self.pooler {
                    ids.extend([w, b]);
                }
                ids
            }
        }
    }

    /// Every group, bottom to top.
    pub fn groups(&self) -> Vec<Group> {
        std::iter::once(Group::Embeddings)
            .chain((0..self.layers.len()).map(Group::Layer))
            .chain(std::iter::once(Group::Head))
            .collect()
    }

    pub fn set_trainable(&mut self, group: Group, trainable: bool) {
        for id in self.group(group) {
            self.params[id].trainable = trainable;
        }
    }

    pub fn set_lr_scale(&mut self, group: Group, scale: f32) {
        for id in self.group(group) {
            self.params[id].lr_scale = scale;
        }
    }

    /// The lowest layer backward must reach: below it nothing trains
    /// (neither the layer nor its adapters).
    fn lowest_trained_layer(&self) -> usize {
        let p = &self.params;
        if p.is_trainable(self.word_embeddings) {
            return 0;
        }
        self.layers
            .iter()
            .position(|lp| {
                p.is_trainable(lp.qkv_weight) || lp.adapters.iter().any(|a| p.is_trainable(a.a))
            })
            .unwrap_or(self.layers.len())
    }

    /// The loss of the last [`Self::forward`] against `targets`, and its
    /// gradients, times `grad_scale`, added to the parameters' gradients.
    /// Returns the (unscaled) loss.
    pub fn backward(&mut self, batch: &TokenBatch, targets: Targets, grad_scale: f32) -> f32 {
        let lowest = self.lowest_trained_layer();
        let Self {
            backend: be,
            config: c,
            params: p,
            acts,
            layers,
            ..
        } = self;
        let (t, h) = (batch.tokens(), c.hidden_size);
        let sequences = batch.sequences();
        let rows = match self.kind {
            HeadKind::Sequence => sequences,
            HeadKind::Token => t,
        };
        be.resize(&mut acts.d_logits, rows * self.num_labels);
        let loss = match targets {
            Targets::Classes {
                labels,
                class_weights,
            } => {
                let weights: Option<Vec<f32>> =
                    class_weights.map(|w| labels.iter().map(|&l| w[l]).collect());
                be.cross_entropy(
                    &mut acts.d_logits,
                    &acts.logits,
                    labels,
                    weights.as_deref(),
                    self.num_labels,
                )
            }
            Targets::Values(values) => be.mse(&mut acts.d_logits, &acts.logits, values),
            // Host losses: the logits are a few values per sequence.
            Targets::Focal {
                labels,
                class_weights,
                gamma,
            } => {
                let logits = be.to_host(&acts.logits);
                let mut d_logits = vec![0.0; logits.len()];
                let loss = loss::focal(
                    &mut d_logits,
                    &logits,
                    labels,
                    class_weights,
                    gamma,
                    self.num_labels,
                );
                acts.d_logits = be.upload(&d_logits);
                loss
            }
            Targets::MultiHot(targets) => {
                let logits = be.to_host(&acts.logits);
                let mut d_logits = vec![0.0; logits.len()];
                let loss = loss::bce_with_logits(&mut d_logits, &logits, targets);
                acts.d_logits = be.upload(&d_logits);
                loss
            }
            Targets::Tokens(labels) => {
                let logits = be.to_host(&acts.logits);
                let mut d_logits = vec![0.0; logits.len()];
                let loss =
                    loss::token_cross_entropy(&mut d_logits, &logits, labels, self.num_labels);
                acts.d_logits = be.upload(&d_logits);
                loss
            }
        };
        be.scale(&mut acts.d_logits, grad_scale);

        // Classifier and head dropout.
        be.resize(&mut acts.d_head_input, rows * h);
        let (w, b) = (self.classifier_weight, self.classifier_bias);
        let (weight, grads) = p.weight_and_grads(w, b);
        be.linear_backward(
            Some(&mut acts.d_head_input),
            grads,
            &acts.d_logits,
            &acts.head_input,
            weight,
            rows,
        );
        let dropout_of = |site| dropout_for(c, self.head_dropout, self.dropouts, site);
        be.dropout(&mut acts.d_head_input, dropout_of(Site::Head));
        let encoder_trains = lowest < layers.len();

        // Pooling.
        be.resize(&mut acts.d_hidden, t * h);
        match (self.kind, self.pooling) {
            (HeadKind::Token, _) => be.copy(&mut acts.d_hidden, &acts.d_head_input),
            (HeadKind::Sequence, Pooling::Mean) => {
                be.mean_pool_backward(&mut acts.d_hidden, &acts.d_head_input, &batch.offsets, h)
            }
            (HeadKind::Sequence, Pooling::Cls) => be.scatter_rows(
                &mut acts.d_hidden,
                &acts.d_head_input,
                &batch.offsets[..sequences],
                h,
            ),
            (HeadKind::Sequence, Pooling::Pooler) => {
                let (w, b) = self.pooler.expect("checked at construction");
                be.tanh_backward(&mut acts.d_head_input, &acts.pooled);
                be.resize(&mut acts.d_cls, sequences * h);
                let (weight, grads) = p.weight_and_grads(w, b);
                be.linear_backward(
                    encoder_trains.then_some(&mut acts.d_cls),
                    grads,
                    &acts.d_head_input,
                    &acts.cls,
                    weight,
                    sequences,
                );
                if encoder_trains {
                    be.scatter_rows(
                        &mut acts.d_hidden,
                        &acts.d_cls,
                        &batch.offsets[..sequences],
                        h,
                    );
                }
            }
        }
        if encoder_trains {
            self.encoder_backward(batch, lowest);
        }
        loss
    }

    /// The encoder's backward pass, from the gradient of its last hidden
    /// state in `acts.d_hidden` down to layer `lowest` (and the
    /// embeddings when they train), shared by both heads.
    fn encoder_backward(&mut self, batch: &TokenBatch, lowest: usize) {
        let (be, c, acts) = (&self.backend, &self.config, &mut self.acts);
        let (t, h, inter) = (batch.tokens(), c.hidden_size, c.intermediate_size);
        be.resize(&mut acts.d_branch, t * h);
        be.resize(&mut acts.d_sum, t * h);
        be.resize(&mut acts.d_wide, t * inter);
        be.resize(&mut acts.d_qkv, t * 3 * h);
        // Layers, last to first. With checkpointing, each is recomputed
        // from its input first (rewriting the next layer's input, whose
        // backward is done), but for the top one: forward left it in the
        // shared set.
        let top = self.layers.len() - 1;
        for l in (lowest..=top).rev() {
            if self.grad_checkpointing() && l < top {
                self.layer_forward(l, batch);
            }
            self.layer_backward(l, batch);
        }

        let Self {
            backend: be,
            params: p,
            acts,
            ..
        } = self;
        let dropout_of = |site| dropout_for(&self.config, self.head_dropout, self.dropouts, site);
        // Embeddings: dropout, LayerNorm, lookup.
        be.dropout(&mut acts.d_hidden, dropout_of(Site::Embeddings));
        let (gamma, grads) =
            p.weight_and_grads(self.embedding_norm_weight, self.embedding_norm_bias);
        be.layer_norm_backward(
            &mut acts.d_sum,
            grads,
            &acts.d_hidden,
            &acts.embedding_sum,
            gamma,
            &acts.embedding_mean,
            &acts.embedding_rstd,
        );
        let tables = p.grads_mut([
            self.word_embeddings,
            self.position_embeddings,
            self.token_type_embeddings,
        ]);
        let Some([word, position, token_type]) = tables else {
            return;
        };
        be.embedding_backward(
            word,
            position,
            token_type,
            &acts.d_sum,
            &batch.ids,
            &batch.type_ids,
            &batch.offsets,
        );
    }

    /// Layer `l`'s backward, from its activations: `acts.d_hidden` holds
    /// the gradient of the layer's output on entry and of its input on
    /// exit; the scratch gradients are sized for the batch.
    fn layer_backward(&mut self, l: usize, batch: &TokenBatch) {
        let scale = self.lora.as_ref().map_or(0.0, LoraSpec::scale);
        let Self {
            backend: be,
            config: c,
            params: p,
            acts,
            layers,
            ..
        } = self;
        let t = batch.tokens();
        let dropout_of = |site| dropout_for(c, self.head_dropout, self.dropouts, site);
        let lp = &layers[l];
        let a = acts.layers.layer(l);
        let input = &acts.layer_inputs[l];
        let adapters = Adapters {
            list: &lp.adapters,
            scale,
            rows: t,
        };
        // Output LayerNorm over (dropout(dense(intermediate)) + attention_normed).
        let (gamma, grads) = p.weight_and_grads(lp.output_norm_weight, lp.output_norm_bias);
        be.layer_norm_backward(
            &mut acts.d_sum,
            grads,
            &acts.d_hidden,
            &a.output_sum,
            gamma,
            &a.output_mean,
            &a.output_rstd,
        );
        be.copy(&mut acts.d_branch, &acts.d_sum);
        be.dropout(&mut acts.d_branch, dropout_of(Site::Output(l)));
        let (weight, grads) = p.weight_and_grads(lp.output_weight, lp.output_bias);
        be.linear_backward(
            Some(&mut acts.d_wide),
            grads,
            &acts.d_branch,
            &a.intermediate,
            weight,
            t,
        );
        adapters.backward(
            be,
            p,
            Linear::Output,
            &a.lora_xa,
            &mut acts.d_wide,
            &mut acts.d_lora,
            &acts.d_branch,
            &a.intermediate,
        );
        be.gelu_backward(&mut acts.d_wide, &a.intermediate_pre);
        let (weight, grads) = p.weight_and_grads(lp.intermediate_weight, lp.intermediate_bias);
        be.linear_backward(
            Some(&mut acts.d_hidden),
            grads,
            &acts.d_wide,
            &a.attention_normed,
            weight,
            t,
        );
        adapters.backward(
            be,
            p,
            Linear::Intermediate,
            &a.lora_xa,
            &mut acts.d_hidden,
            &mut acts.d_lora,
            &acts.d_wide,
            &a.attention_normed,
        );
        // Residual: attention_normed feeds both the FFN and the sum.
        be.add_assign(&mut acts.d_hidden, &acts.d_sum);

        // Attention LayerNorm over (dropout(dense(context)) + input).
        let (gamma, grads) = p.weight_and_grads(lp.attention_norm_weight, lp.attention_norm_bias);
        be.layer_norm_backward(
            &mut acts.d_sum,
            grads,
            &acts.d_hidden,
            &a.attention_sum,
            gamma,
            &a.attention_mean,
            &a.attention_rstd,
        );
        be.copy(&mut acts.d_branch, &acts.d_sum);
        be.dropout(&mut acts.d_branch, dropout_of(Site::AttentionOutput(l)));
        let (weight, grads) =
            p.weight_and_grads(lp.attention_output_weight, lp.attention_output_bias);
        // d_hidden is free again: use it for d_context.
        be.linear_backward(
            Some(&mut acts.d_hidden),
            grads,
            &acts.d_branch,
            &a.context,
            weight,
            t,
        );
        adapters.backward(
            be,
            p,
            Linear::AttentionOutput,
            &a.lora_xa,
            &mut acts.d_hidden,
            &mut acts.d_lora,
            &acts.d_branch,
            &a.context,
        );
        be.attention_backward(
            &mut acts.d_qkv,
            &acts.d_hidden,
            &a.qkv,
            &a.probs,
            &batch.offsets,
            c.num_attention_heads,
            c.head_dim(),
            dropout_of(Site::AttentionProbs(l)),
        );
        let (weight, grads) = p.weight_and_grads(lp.qkv_weight, lp.qkv_bias);
        be.linear_backward(
            Some(&mut acts.d_hidden),
            grads,
            &acts.d_qkv,
            input,
            weight,
            t,
        );
        adapters.backward(
            be,
            p,
            Linear::Qkv,
            &a.lora_xa,
            &mut acts.d_hidden,
            &mut acts.d_lora,
            &acts.d_qkv,
            input,
        );
        be.add_assign(&mut acts.d_hidden, &acts.d_sum);
    }
}

/// A layer's adapters during one pass over `rows` tokens.
struct Adapters<'a> {
    list: &'a [LayerAdapter],
    scale: f32,
    rows: usize,
}

impl Adapters<'_> {
    /// The encoder linear `linear` (its `(weight, bias)` parameters) on
    /// `input`, into `out`, plus the update of each adapter on it: every
    /// linear of a layer's forward.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward<B: TrainBackend>(
        &self,
        be: &B,
        p: &ParamStore<B>,
        linear: Linear,
        (weight, bias): (ParamId, ParamId),
        xa: &mut [B::Tensor],
        out: &mut B::Tensor,
        input: &B::Tensor,
    ) {
        be.linear_forward(out, input, &p[weight].value, &p[bias].value, self.rows);
        self.forward(be, p, linear, xa, out, input);
    }

    /// Adds the update of each adapter on `linear` to the linear's output
    /// `out`, from its `input`; `xa` is the layer's [`LayerActivations::lora_xa`].
    fn forward<B: TrainBackend>(
        &self,
        be: &B,
        p: &ParamStore<B>,
        linear: Linear,
        xa: &mut [B::Tensor],
        out: &mut B::Tensor,
        input: &B::Tensor,
    ) {
        for (adapter, xa) in self.list.iter().zip(xa) {
            if adapter.linear != linear {
                continue;
            }
            be.resize(xa, self.rows * adapter.rank);
            let lora = Lora {
                a: &p[adapter.a].value,
                b: &p[adapter.b].value,
                scale: self.scale,
            };
            be.lora_forward(out, adapter.columns.clone(), xa, input, lora, self.rows);
        }
    }

    /// Backward of [`Self::forward`]: adds each adapter's share to
    /// `d_input` (the linear's input gradient, already written by the
    /// frozen linear's backward) and accumulates its A and B gradients.
    #[allow(clippy::too_many_arguments)]
    fn backward<B: TrainBackend>(
        &self,
        be: &B,
        p: &mut ParamStore<B>,
        linear: Linear,
        xa: &[B::Tensor],
        d_input: &mut B::Tensor,
        scratch: &mut B::Tensor,
        d_out: &B::Tensor,
        input: &B::Tensor,
    ) {
        for (adapter, xa) in self.list.iter().zip(xa) {
            if adapter.linear != linear {
                continue;
            }
            be.resize(scratch, self.rows * adapter.rank);
            let (lora, grads) = p.lora_and_grads(adapter.a, adapter.b, self.scale);
            be.lora_backward(
                d_input,
                grads,
                scratch,
                d_out,
                adapter.columns.clone(),
                xa,
                input,
                lora,
                self.rows,
            );
        }
    }
}

fn dropout_for(config: &BertConfig, head_dropout: f32, seed: Option<u64>, site: Site) -> Dropout {
    let p = match site {
        Site::Embeddings | Site::AttentionOutput(_) | Site::Output(_) => config.hidden_dropout_prob,
        Site::AttentionProbs(_) => config.attention_probs_dropout_prob,
        Site::Head => head_dropout,
    };
    match seed {
        Some(seed) if p > 0.0 => Dropout {
            p,
            seed: rng::derive_seed(seed, site.label()),
        },
        _ => Dropout::OFF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// A MiniLM-L6-shaped classifier (6 layers, hidden 384, 12 heads,
    /// intermediate 1536; a small vocabulary) with random weights.
    fn minilm_shaped(dir: &std::path::Path) -> SequenceClassifier<CpuBackend> {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "model_type": "bert",
            "vocab_size": 100,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "max_position_embeddings": 128,
        }))
        .unwrap();
        let (h, i) = (384, 1536);
        let mut shapes = vec![
            (
                "embeddings.word_embeddings.weight".to_string(),
                vec![100, h],
            ),
            ("embeddings.position_embeddings.weight".into(), vec![128, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..6 {
            let linears = [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ];
            for (name, out, inputs) in linears {
                shapes.push((
                    format!("encoder.layer.{l}.{name}.weight"),
                    vec![out, inputs],
                ));
                shapes.push((format!("encoder.layer.{l}.{name}.bias"), vec![out]));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                shapes.push((format!("encoder.layer.{l}.{norm}.weight"), vec![h]));
                shapes.push((format!("encoder.layer.{l}.{norm}.bias"), vec![h]));
            }
        }
        let mut rng = Rng::new(1);
        let tensors = shapes
            .into_iter()
            .map(|(name, shape)| {
                let values = (0..shape.iter().product()).map(|_| 0.02 * rng.normal());
                (name, shape, values.collect())
            })
            .collect();
        // The weights come as overrides of a file that holds a placeholder.
        let placeholder = [0u8; 4];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &placeholder)
                .unwrap();
        let path = dir.join("model.safetensors");
        std::fs::write(
            &path,
            safetensors::serialize([("placeholder", view)], None).unwrap(),
        )
        .unwrap();
        let ckpt = Checkpoint::open(&path).unwrap().with_overrides(tensors);
        let backend = CpuBackend::new(2);
        SequenceClassifier::new(backend, config, &ckpt, Pooling::Cls, 2, 0.1, 0).unwrap()
    }

    /// What the buffers of the encoder layers' activations hold, in f32
    /// values.
    fn held_floats(acts: &Activations<CpuBackend>) -> usize {
        let set = |a: &LayerActivations<CpuBackend>| -> usize {
            let tensors = [
                &a.qkv,
                &a.probs,
                &a.context,
                &a.attention_sum,
                &a.attention_mean,
                &a.attention_rstd,
                &a.attention_normed,
                &a.intermediate_pre,
                &a.intermediate,
                &a.output_sum,
                &a.output_mean,
                &a.output_rstd,
            ];
            tensors
                .into_iter()
                .chain(&a.lora_xa)
                .map(Vec::capacity)
                .sum()
        };
        let activations = match &acts.layers {
            LayerStore::PerLayer(layers) => layers.iter().map(set).sum(),
            LayerStore::Shared(shared) => set(shared),
        };
        acts.layer_inputs.iter().map(Vec::capacity).sum::<usize>() + activations
    }

    /// A training step on 2 sequences of 64 tokens with and without
    /// checkpointing, and again with LoRA adapters: the buffers hold what
    /// [`SequenceClassifier::layer_activation_floats`] counts, which for a
    /// batch of 16 × 128 tokens is about a fifth with checkpointing.
    #[test]
    fn checkpointing_holds_one_layers_activations() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = minilm_shaped(dir.path());
        let (sequences, len) = (2, 64);
        let batch = TokenBatch {
            ids: (0..sequences * len).map(|i| (i % 100) as u32).collect(),
            type_ids: vec![0; sequences * len],
            offsets: vec![0, len, 2 * len],
        };
        let held = |model: &mut SequenceClassifier<CpuBackend>, checkpointing| {
            model.set_grad_checkpointing(checkpointing);
            let mode = ForwardMode {
                dropout_seed: Some(3),
            };
            model.forward(&batch, mode).unwrap();
            let targets = Targets::Classes {
                labels: &[0, 1],
                class_weights: None,
            };
            model.backward(&batch, targets, 1.0);
            let held = held_floats(&model.acts);
            assert_eq!(
                held,
                model.layer_activation_floats(sequences, len, checkpointing)
            );
            held
        };
        let (plain, checkpointed) = (held(&mut model, false), held(&mut model, true));
        assert!(checkpointed * 3 < plain, "{checkpointed} vs {plain}");
        let mib = |checkpointing| {
            let floats = model.layer_activation_floats(16, 128, checkpointing);
            floats as f64 * 4.0 / (1 << 20) as f64
        };
        let (plain, checkpointed) = (mib(false), mib(true));
        eprintln!(
            "MiniLM-L6 shape, 16 x 128 tokens: {checkpointed:.1} MiB with checkpointing, \
             {plain:.1} MiB without"
        );
        assert!(checkpointed * 4.0 < plain);

        model.add_lora(
            LoraSpec {
                rank: 8,
                alpha: 16.0,
                targets: LoraTarget::DEFAULT.to_vec(),
            },
            0,
        );
        held(&mut model, false);
        held(&mut model, true);
    }
}
