//! The backward half of the op set, for backends that train.
//!
//! Each op is the gradient of a forward op (llm.c style: no autograd, the
//! activations each backward needs are kept explicitly by the caller).
//! Weight and bias gradients *accumulate* (so gradient accumulation across
//! micro-batches is free); input gradients are *overwritten*.

use std::ops::Range;

use super::Backend;

/// Dropout with a counter-based mask: element `i` of the tensor is dropped
/// when `rng::uniform_at(seed, i) < p`, kept ones are scaled by `1/(1-p)`.
/// The same `Dropout` applied to the gradient is the backward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const OFF: Dropout = Dropout { p: 0.0, seed: 0 };

    pub fn is_off(&self) -> bool {
        self.p == 0.0
    }
}

/// One AdamW update (decoupled weight decay, as PyTorch's `AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
}

/// The gradients of a layer's weight and bias, or None when it is frozen.
pub type ParamGrads<'a, T> = Option<(&'a mut T, &'a mut T)>;

/// A LoRA adapter's matrices (see [`crate::lora`]): A `[r, in]`, B
/// `[out, r]`, and the scale `alpha / r` of their product.
#[derive(Clone, Copy, Debug)]
pub struct Lora<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    pub scale: f32,
}

/// Length of the probabilities buffer of [`TrainBackend::attention_forward`]:
/// for each sequence, for each head, `len × len`, in that order.
pub fn attention_probs_len(offsets: &[usize], heads: usize) -> usize {
    offsets
        .windows(2)
        .map(|w| heads * (w[1] - w[0]).pow(2))
        .sum()
}

/// Mean squared error of `predictions` against `targets`, writing its
/// gradient to `d_predictions`: [`TrainBackend::mse`] on host memory (one
/// value per sequence, so every backend computes it here).
pub fn mse_on_host(d_predictions: &mut [f32], predictions: &[f32], targets: &[f32]) -> f32 {
    let n = targets.len() as f32;
    let mut loss = 0.0f64;
    for ((d, &p), &t) in d_predictions.iter_mut().zip(predictions).zip(targets) {
        let error = p - t;
        loss += (error as f64).powi(2);
        *d = 2.0 * error / n;
    }
    (loss / n as f64) as f32
}

pub trait TrainBackend: Backend {
    fn upload(&self, data: &[f32]) -> Self::Tensor;
    fn zero(&self, tensor: &mut Self::Tensor);
    /// `dst = src` (same length).
    fn copy(&self, dst: &mut Self::Tensor, src: &Self::Tensor);

    /// [`Backend::embedding`] over trainable tables.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Tensor,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        word: &Self::Tensor,
        position: &Self::Tensor,
        token_type: &Self::Tensor,
        hidden: usize,
    );

    /// `out[rows, n] = input[rows, k] · weightᵀ + bias`, weight `[n, k]` unpacked.
    fn linear_forward(
        &self,
        out: &mut Self::Tensor,
        input: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        rows: usize,
    );

    /// Gradients of [`Self::linear_forward`]: `d_input = d_out·weight` and,
    /// unless the layer is frozen (`param_grads` None), `d_weight +=
    /// d_outᵀ·input`, `d_bias += Σ d_out`.
    fn linear_backward(
        &self,
        d_input: Option<&mut Self::Tensor>,
        param_grads: ParamGrads<Self::Tensor>,
        d_out: &Self::Tensor,
        input: &Self::Tensor,
        weight: &Self::Tensor,
        rows: usize,
    );

    /// LoRA's update of a linear layer's output: `out[:, columns] +=
    /// scale · (input · Aᵀ) · Bᵀ`, `out` being `[rows, width]` and
    /// `columns` `out`'s B rows long (a query, key or value adapter updates
    /// its third of the fused QKV output). Writes `input · Aᵀ` `[rows, r]`
    /// to `xa` for backward.
    fn lora_forward(
        &self,
        out: &mut Self::Tensor,
        columns: Range<usize>,
        xa: &mut Self::Tensor,
        input: &Self::Tensor,
        lora: Lora<Self::Tensor>,
        rows: usize,
    );

    /// Gradients of [`Self::lora_forward`], factored through the rank so
    /// nothing `[out, in]`-sized is formed: with `g = scale · d_out[:,
    /// columns] · B` `[rows, r]` (written to `scratch`), `d_input += g · A`
    /// (added: the frozen layer's own [`Self::linear_backward`] wrote it),
    /// and unless frozen (`param_grads` None) `d_A += gᵀ · input` and
    /// `d_B += scale · d_out[:, columns]ᵀ · xa`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        d_input: &mut Self::Tensor,
        param_grads: ParamGrads<Self::Tensor>,
        scratch: &mut Self::Tensor,
        d_out: &Self::Tensor,
        columns: Range<usize>,
        xa: &Self::Tensor,
        input: &Self::Tensor,
        lora: Lora<Self::Tensor>,
        rows: usize,
    );

    /// `out = gelu(pre)`.
    fn gelu_forward(&self, out: &mut Self::Tensor, pre: &Self::Tensor);
    /// `d *= gelu'(pre)`.
    fn gelu_backward(&self, d: &mut Self::Tensor, pre: &Self::Tensor);

    /// `out = LayerNorm(x)`, saving each row's mean and 1/std for backward.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_forward(
        &self,
        out: &mut Self::Tensor,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
        mean: &mut Self::Tensor,
        rstd: &mut Self::Tensor,
    );

    /// `d_x`, and unless frozen (`param_grads` None) the accumulated
    /// gradients of gamma and beta.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        d_x: &mut Self::Tensor,
        param_grads: ParamGrads<Self::Tensor>,
        d_out: &Self::Tensor,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        mean: &Self::Tensor,
        rstd: &Self::Tensor,
    );

    /// `out = a + b` (residual connections).
    fn add(&self, out: &mut Self::Tensor, a: &Self::Tensor, b: &Self::Tensor);
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor);

    /// Attention as [`Backend::attention`], with dropout on the attention
    /// probabilities (as BERT), saving the probabilities (before dropout) for
    /// backward: per sequence, per head, a `len × len` block.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Tensor,
        probs: &mut Self::Tensor,
        qkv: &Self::Tensor,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
        dropout: Dropout,
    );

    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        d_qkv: &mut Self::Tensor,
        d_out: &Self::Tensor,
        qkv: &Self::Tensor,
        probs: &Self::Tensor,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
        dropout: Dropout,
    );

    /// Applies the dropout mask in place (forward on activations, backward on
    /// their gradients).
    fn dropout(&self, x: &mut Self::Tensor, dropout: Dropout);

    /// Scatter-adds token gradients into the three embedding tables.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        d_word: &mut Self::Tensor,
        d_position: &mut Self::Tensor,
        d_token_type: &mut Self::Tensor,
        d_out: &Self::Tensor,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
    );

    /// `d_input` = 0 except `d_input[rows[i]] = d_out[i]` (backward of
    /// [`Backend::gather_rows`]).
    fn scatter_rows(
        &self,
        d_input: &mut Self::Tensor,
        d_out: &Self::Tensor,
        rows: &[usize],
        cols: usize,
    );

    /// Backward of [`Backend::mean_pool`]: each token gets its sequence's
    /// gradient divided by the sequence length.
    fn mean_pool_backward(
        &self,
        d_input: &mut Self::Tensor,
        d_out: &Self::Tensor,
        offsets: &[usize],
        cols: usize,
    );

    /// `d *= 1 - y²` where `y = tanh(x)`.
    fn tanh_backward(&self, d: &mut Self::Tensor, y: &Self::Tensor);

    /// Per-example weighted softmax cross-entropy over rows of `classes`.
    /// Returns `Σ weight_i · loss_i / Σ weight_i` and writes its gradient
    /// with respect to the logits (`weights` None: all 1).
    fn cross_entropy(
        &self,
        d_logits: &mut Self::Tensor,
        logits: &Self::Tensor,
        labels: &[usize],
        weights: Option<&[f32]>,
        classes: usize,
    ) -> f32;

    /// Mean squared error of `predictions` (one per row) against `targets`;
    /// writes its gradient.
    fn mse(
        &self,
        d_predictions: &mut Self::Tensor,
        predictions: &Self::Tensor,
        targets: &[f32],
    ) -> f32;

    fn sum_squares(&self, x: &Self::Tensor) -> f64;

    /// Σ [`Self::sum_squares`] over `tensors` (the global gradient norm):
    /// a backend that waits for a device to read a sum overrides it to
    /// wait once, not once per tensor.
    fn sum_squares_all(&self, tensors: &[&Self::Tensor]) -> f64 {
        tensors.iter().map(|x| self.sum_squares(x)).sum()
    }
    fn scale(&self, x: &mut Self::Tensor, factor: f32);

    fn adamw(
        &self,
        param: &mut Self::Tensor,
        grad: &Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        update: AdamW,
    );
}
