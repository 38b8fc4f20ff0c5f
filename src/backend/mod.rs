//! The op set the model is written against.
//!
//! The BERT math in [`crate::model`] calls only these ops, so a backend is
//! exactly this trait: [`cpu::CpuBackend`] (SIMD, multi-threaded) and
//! [`cpu::ReferenceBackend`] (the obvious loops, the yardstick every fast op
//! is tested against) today, CUDA next.
//!
//! Batches are *packed*: the tokens of all sequences are stored back to back
//! and `offsets` (length `batch + 1`, as FlashAttention's `cu_seqlens`) marks
//! where each sequence starts. This is how the padding mask is expressed: a
//! token attends only to keys of its own sequence, and no compute is spent on
//! pad positions, so an input gives the same result alone or in any batch.

pub mod cpu;
pub mod cuda;
pub mod train;

use crate::checkpoint::HostTensor;

/// What matrix products compute in. Everything else (master weights,
/// gradients, optimizer state, attention, LayerNorm, activations) stays f32.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    /// Operands rounded to bf16, products summed in f32: PyTorch's bf16
    /// autocast for matmuls.
    Bf16,
    /// Operands rounded to fp16, products summed in f32, with dynamic loss
    /// scaling in training: PyTorch's fp16 autocast with `GradScaler`.
    /// CUDA only (CPUs have no fast fp16 dot product; bf16 is their half
    /// precision).
    Fp16,
}

/// Applied to a matmul's output after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// Exact erf GELU, as Hugging Face's `"gelu"`.
    Gelu,
}

pub trait Backend: Send + Sync {
    /// Activations: a flat row-major f32 buffer.
    type Tensor: Send + Sync;
    /// A read-only parameter (embedding table, LayerNorm gain or bias).
    type Param: Send + Sync;
    /// A linear layer's weight and bias in the layout the backend's GEMM wants.
    type Linear: Send + Sync;

    /// For logs and `bertrt info`, e.g. "cpu (avx512, 2 threads)".
    fn describe(&self) -> String;

    fn param(&self, data: HostTensor) -> Self::Param;
    /// `weight` is PyTorch's `[out_features, in_features]`.
    fn prepare_linear(
        &self,
        weight: &[f32],
        bias: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> Self::Linear;

    fn new_tensor(&self) -> Self::Tensor;
    /// Sets the length, reusing capacity: a warm workspace does not allocate.
    fn resize(&self, tensor: &mut Self::Tensor, len: usize);
    fn to_host(&self, tensor: &Self::Tensor) -> Vec<f32>;

    /// `out[t] = word[ids[t]] + position[t - start of its sequence] + token_type[type_ids[t]]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding(
        &self,
        out: &mut Self::Tensor,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        word: &Self::Param,
        position: &Self::Param,
        token_type: &Self::Param,
        hidden: usize,
    );

    /// `out[rows, out_features] = activation(input[rows, in_features] · Wᵀ + b)`.
    fn matmul(
        &self,
        out: &mut Self::Tensor,
        input: &Self::Tensor,
        rows: usize,
        layer: &Self::Linear,
        activation: Activation,
    );

    /// `x = LayerNorm(x + residual)` over rows of `cols`.
    fn layer_norm(
        &self,
        x: &mut Self::Tensor,
        residual: Option<&Self::Tensor>,
        gamma: &Self::Param,
        beta: &Self::Param,
        eps: f32,
        cols: usize,
    );

    /// Multi-head self-attention. `qkv` is `[tokens, 3 * heads * head_dim]`
    /// (query, key and value projections side by side); `out` is
    /// `[tokens, heads * head_dim]`. Scores are scaled by `1/sqrt(head_dim)`.
    fn attention(
        &self,
        out: &mut Self::Tensor,
        qkv: &Self::Tensor,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
    );

    /// `out[i] = input[rows[i]]`, rows of `cols` (the `[CLS]` rows for the pooler).
    fn gather_rows(
        &self,
        out: &mut Self::Tensor,
        input: &Self::Tensor,
        rows: &[usize],
        cols: usize,
    );

    /// `out[s] = mean of input's rows in sequence s`.
    fn mean_pool(
        &self,
        out: &mut Self::Tensor,
        input: &Self::Tensor,
        offsets: &[usize],
        cols: usize,
    );

    fn tanh(&self, x: &mut Self::Tensor);

    /// Softmax over each row of `cols`.
    fn softmax(&self, x: &mut Self::Tensor, cols: usize);

    /// Runs `ops` (a whole forward pass) on the backend's own threads, so the
    /// ops inside start their parallel work in place instead of each handing
    /// off to those threads and waiting to be woken: a per-op cost that
    /// dominates short inputs.
    fn run<R: Send>(&self, ops: impl FnOnce() -> R + Send) -> R {
        ops()
    }
}
