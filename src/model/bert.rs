//! The BERT encoder and pooler, mirroring Hugging Face's `modeling_bert.py`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/bert/modeling_bert.py>):
//! `BertEmbeddings`, `BertLayer` (self-attention, output dense + residual +
//! LayerNorm, intermediate GELU, output dense + residual + LayerNorm) and
//! `BertPooler`. Struct fields carry the checkpoint's names.

use crate::backend::{Activation, Backend};
use crate::checkpoint::Checkpoint;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::model::linear::{F32Linears, LinearKind, LinearLoader, ModelTensors};
use crate::model::{ModelFiles, Pooling, TokenBatch};

struct LayerNorm<B: Backend> {
    weight: B::Param,
    bias: B::Param,
}

impl<B: Backend> LayerNorm<B> {
    fn load(backend: &B, ckpt: &Checkpoint, prefix: &str, hidden: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: backend.param(ckpt.tensor(&format!("{prefix}.weight"), &[hidden])?),
            bias: backend.param(ckpt.tensor(&format!("{prefix}.bias"), &[hidden])?),
        })
    }
}

/// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
pub(crate) fn load_linear<B: Backend>(
    backend: &B,
    ckpt: &Checkpoint,
    prefix: &str,
    out_features: usize,
    in_features: usize,
) -> Result<B::Linear> {
    let weight = ckpt.tensor(&format!("{prefix}.weight"), &[out_features, in_features])?;
    let bias = ckpt.tensor(&format!("{prefix}.bias"), &[out_features])?;
    Ok(backend.prepare_linear(&weight, &bias, out_features, in_features))
}

struct BertEmbeddings<B: Backend> {
    word_embeddings: B::Param,
    position_embeddings: B::Param,
    token_type_embeddings: B::Param,
    layer_norm: LayerNorm<B>,
}

struct BertLayer<B: Backend> {
    /// `attention.self.{query,key,value}` concatenated into one
    /// `[3·hidden, hidden]` projection: one GEMM instead of three.
    attention_qkv: B::Linear,
    attention_output_dense: B::Linear,
    attention_output_layer_norm: LayerNorm<B>,
    intermediate_dense: B::Linear,
    output_dense: B::Linear,
    output_layer_norm: LayerNorm<B>,
}

impl<B: Backend> BertLayer<B> {
    fn load(
        backend: &B,
        tensors: &ModelTensors,
        config: &BertConfig,
        index: usize,
        loader: &dyn LinearLoader<B>,
    ) -> Result<Self> {
        let hidden = config.hidden_size;
        let prefix = format!("encoder.layer.{index}");
        let linear = |kind: LinearKind| loader.load(backend, tensors, &kind.spec(index, config));
        let ckpt = tensors.checkpoint;
        Ok(BertLayer {
            attention_qkv: linear(LinearKind::Qkv)?,
            attention_output_dense: linear(LinearKind::AttentionOutput)?,
            attention_output_layer_norm: LayerNorm::load(
                backend,
                ckpt,
                &format!("{prefix}.attention.output.LayerNorm"),
                hidden,
            )?,
            intermediate_dense: linear(LinearKind::Intermediate)?,
            output_dense: linear(LinearKind::Output)?,
            output_layer_norm: LayerNorm::load(
                backend,
                ckpt,
                &format!("{prefix}.output.LayerNorm"),
                hidden,
            )?,
        })
    }
}

/// Buffers for one forward pass, reused across calls so that a warm
/// workspace does not allocate. One per worker thread.
pub struct Workspace<B: Backend> {
    hidden: B::Tensor,
    qkv: B::Tensor,
    context: B::Tensor,
    projected: B::Tensor,
    intermediate: B::Tensor,
    cls: B::Tensor,
    pooled: B::Tensor,
    logits: B::Tensor,
}

impl<B: Backend> Workspace<B> {
    pub fn new(backend: &B) -> Self {
        Workspace {
            hidden: backend.new_tensor(),
            qkv: backend.new_tensor(),
            context: backend.new_tensor(),
            projected: backend.new_tensor(),
            intermediate: backend.new_tensor(),
            cls: backend.new_tensor(),
            pooled: backend.new_tensor(),
            logits: backend.new_tensor(),
        }
    }
}

pub struct BertModel<B: Backend> {
    backend: B,
    config: BertConfig,
    embeddings: BertEmbeddings<B>,
    layers: Vec<BertLayer<B>>,
    /// Absent in some sentence-embedding checkpoints.
    pooler_dense: Option<B::Linear>,
}

impl<B: Backend> BertModel<B> {
    /// Loads `config.json` and `model.safetensors` from a model directory.
    pub fn load(backend: B, files: &ModelFiles) -> Result<Self> {
        Self::load_with(backend, files, &F32Linears)
    }

    /// [`Self::load`] with `loader` choosing each encoder linear's form.
    pub fn load_with(backend: B, files: &ModelFiles, loader: &dyn LinearLoader<B>) -> Result<Self> {
        let config = BertConfig::from_file(&files.config)?;
        let ckpt = files.checkpoint()?;
        Self::from_checkpoint_with(backend, config, &ckpt, loader)
    }

    /// Loads every linear layer in f32 (an INT8 artifact's dequantized).
    pub fn from_checkpoint(backend: B, config: BertConfig, ckpt: &Checkpoint) -> Result<Self> {
        Self::from_checkpoint_with(backend, config, ckpt, &F32Linears)
    }

    /// Loads with `loader` choosing each encoder linear's form (the pooler
    /// stays f32: it runs on one row per sequence).
    pub fn from_checkpoint_with(
        backend: B,
        config: BertConfig,
        ckpt: &Checkpoint,
        loader: &dyn LinearLoader<B>,
    ) -> Result<Self> {
        let tensors = ModelTensors::new(ckpt)?;
        let backend = loader.configure(backend, &tensors);
        let hidden = config.hidden_size;
        let param = |name: &str, shape: &[usize]| -> Result<B::Param> {
            Ok(backend.param(ckpt.tensor(name, shape)?))
        };
        let embeddings = BertEmbeddings {
            word_embeddings: param(
                "embeddings.word_embeddings.weight",
                &[config.vocab_size, hidden],
            )?,
            position_embeddings: param(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, hidden],
            )?,
            token_type_embeddings: param(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, hidden],
            )?,
            layer_norm: LayerNorm::load(&backend, ckpt, "embeddings.LayerNorm", hidden)?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(&backend, &tensors, &config, i, loader))
            .collect::<Result<Vec<_>>>()?;
        let pooler_dense = if ckpt.contains("pooler.dense.weight") {
            Some(load_linear(&backend, ckpt, "pooler.dense", hidden, hidden)?)
        } else {
            None
        };
        Ok(BertModel {
            backend,
            config,
            embeddings,
            layers,
            pooler_dense,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_description(&self) -> String {
        self.backend.describe()
    }

    pub fn has_pooler(&self) -> bool {
        self.pooler_dense.is_some()
    }

    /// Runs the encoder; the last hidden state, `[tokens, hidden]` in packed
    /// order, is then in the workspace (see [`Self::last_hidden_state`]).
    pub fn forward(&self, batch: &TokenBatch, ws: &mut Workspace<B>) -> Result<()> {
        self.forward_observed(batch, ws, &mut |_, _, _| {})
    }

    /// [`Self::forward`], showing `observe` the input of every encoder
    /// linear (layer index, which linear, `[tokens, in_features]`) before it
    /// runs: for calibration and per-layer error reports.
    pub fn forward_observed(
        &self,
        batch: &TokenBatch,
        ws: &mut Workspace<B>,
        observe: &mut (dyn FnMut(usize, LinearKind, &B::Tensor) + Send),
    ) -> Result<()> {
        self.check_batch(batch)?;
        self.backend.run(|| self.encoder_ops(batch, ws, observe));
        Ok(())
    }

    fn encoder_ops(
        &self,
        batch: &TokenBatch,
        ws: &mut Workspace<B>,
        observe: &mut (dyn FnMut(usize, LinearKind, &B::Tensor) + Send),
    ) {
        let be = &self.backend;
        let c = &self.config;
        let (tokens, hidden) = (batch.tokens(), c.hidden_size);
        let eps = c.layer_norm_eps as f32;
        be.resize(&mut ws.hidden, tokens * hidden);
        be.resize(&mut ws.qkv, tokens * 3 * hidden);
        be.resize(&mut ws.context, tokens * hidden);
        be.resize(&mut ws.projected, tokens * hidden);
        be.resize(&mut ws.intermediate, tokens * c.intermediate_size);

        let emb = &self.embeddings;
        be.embedding(
            &mut ws.hidden,
            &batch.ids,
            &batch.type_ids,
            &batch.offsets,
            &emb.word_embeddings,
            &emb.position_embeddings,
            &emb.token_type_embeddings,
            hidden,
        );
        let norm = &emb.layer_norm;
        be.layer_norm(&mut ws.hidden, None, &norm.weight, &norm.bias, eps, hidden);

        for (index, layer) in self.layers.iter().enumerate() {
            observe(index, LinearKind::Qkv, &ws.hidden);
            be.matmul(
                &mut ws.qkv,
                &ws.hidden,
                tokens,
                &layer.attention_qkv,
                Activation::Identity,
            );
            be.attention(
                &mut ws.context,
                &ws.qkv,
                &batch.offsets,
                c.num_attention_heads,
                c.head_dim(),
            );
            observe(index, LinearKind::AttentionOutput, &ws.context);
            be.matmul(
                &mut ws.projected,
                &ws.context,
                tokens,
                &layer.attention_output_dense,
                Activation::Identity,
            );
            let norm = &layer.attention_output_layer_norm;
            be.layer_norm(
                &mut ws.projected,
                Some(&ws.hidden),
                &norm.weight,
                &norm.bias,
                eps,
                hidden,
            );
            std::mem::swap(&mut ws.hidden, &mut ws.projected);

            observe(index, LinearKind::Intermediate, &ws.hidden);
            be.matmul(
                &mut ws.intermediate,
                &ws.hidden,
                tokens,
                &layer.intermediate_dense,
                Activation::Gelu,
            );
            observe(index, LinearKind::Output, &ws.intermediate);
            be.matmul(
                &mut ws.projected,
                &ws.intermediate,
                tokens,
                &layer.output_dense,
                Activation::Identity,
            );
            let norm = &layer.output_layer_norm;
            be.layer_norm(
                &mut ws.projected,
                Some(&ws.hidden),
                &norm.weight,
                &norm.bias,
                eps,
                hidden,
            );
            std::mem::swap(&mut ws.hidden, &mut ws.projected);
        }
    }

    /// `[tokens, hidden]` from the last [`Self::forward`], in packed order.
    pub fn last_hidden_state(&self, ws: &Workspace<B>) -> Vec<f32> {
        self.backend.to_host(&ws.hidden)
    }

    /// One vector per sequence, `[sequences, hidden]`, from the last
    /// [`Self::forward`] on `batch`.
    pub fn pool(
        &self,
        batch: &TokenBatch,
        ws: &mut Workspace<B>,
        pooling: Pooling,
    ) -> Result<Vec<f32>> {
        self.pool_in_place(batch, ws, pooling)?;
        Ok(self.backend.to_host(&ws.pooled))
    }

    /// Logits `[sequences, classes]` of a classification `head` over the
    /// pooled output of the last [`Self::forward`] on `batch`.
    pub fn classify(
        &self,
        batch: &TokenBatch,
        ws: &mut Workspace<B>,
        pooling: Pooling,
        head: &B::Linear,
        classes: usize,
    ) -> Result<Vec<f32>> {
        self.pool_in_place(batch, ws, pooling)?;
        let be = &self.backend;
        be.resize(&mut ws.logits, batch.sequences() * classes);
        be.matmul(
            &mut ws.logits,
            &ws.pooled,
            batch.sequences(),
            head,
            Activation::Identity,
        );
        Ok(be.to_host(&ws.logits))
    }

    fn pool_in_place(
        &self,
        batch: &TokenBatch,
        ws: &mut Workspace<B>,
        pooling: Pooling,
    ) -> Result<()> {
        let be = &self.backend;
        let hidden = self.config.hidden_size;
        let sequences = batch.sequences();
        be.resize(&mut ws.pooled, sequences * hidden);
        match pooling {
            Pooling::Mean => be.mean_pool(&mut ws.pooled, &ws.hidden, &batch.offsets, hidden),
            Pooling::Cls => be.gather_rows(
                &mut ws.pooled,
                &ws.hidden,
                &batch.offsets[..sequences],
                hidden,
            ),
            Pooling::Pooler => {
                let dense = self.pooler_dense.as_ref().ok_or_else(|| {
                    Error::Invalid(
                        "this checkpoint has no pooler weights (pooler.dense.*); use --pooling mean or cls".into(),
                    )
                })?;
                be.resize(&mut ws.cls, sequences * hidden);
                be.gather_rows(&mut ws.cls, &ws.hidden, &batch.offsets[..sequences], hidden);
                be.matmul(
                    &mut ws.pooled,
                    &ws.cls,
                    sequences,
                    dense,
                    Activation::Identity,
                );
                be.tanh(&mut ws.pooled);
            }
        }
        Ok(())
    }

    /// Every id must index its table: the ops trust their inputs.
    fn check_batch(&self, batch: &TokenBatch) -> Result<()> {
        let c = &self.config;
        if batch.max_len() > c.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "a sequence of {} tokens exceeds the model's {} positions",
                batch.max_len(),
                c.max_position_embeddings
            )));
        }
        if let Some(id) = batch.ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {id} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if let Some(t) = batch
            .type_ids
            .iter()
            .find(|&&t| t as usize >= c.type_vocab_size)
        {
            return Err(Error::Invalid(format!(
                "token type id {t} is outside type_vocab_size {}",
                c.type_vocab_size
            )));
        }
        Ok(())
    }
}
