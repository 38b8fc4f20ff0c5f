//! The CPU backend: SIMD kernels picked at run time ([`isa`]), run on a
//! rayon pool of its own so that each serving worker can own one.

mod attention;
pub mod gemm;
pub mod int8;
pub mod isa;
mod ops;
pub mod reference;
mod simd;
pub mod train;

pub use reference::ReferenceBackend;

use isa::Isa;

use crate::backend::{Activation, Backend, Precision};
use crate::checkpoint::HostTensor;

pub struct CpuBackend {
    isa: Isa,
    pool: rayon::ThreadPool,
    /// What matrix products multiply in: attention's always, and training's
    /// linear layers (inference linears take theirs at load, see
    /// [`Self::prepare_linear_bf16`]).
    precision: Precision,
}

/// A linear layer in the precision chosen for it at load.
pub struct CpuLinear {
    weight: CpuWeight,
    bias: Vec<f32>,
}

enum CpuWeight {
    /// f32, packed for the GEMM micro-kernels.
    F32(gemm::PackedWeight),
    /// int8 per output channel, activations quantized per token on each call.
    Int8(int8::QuantizedWeight),
}

impl CpuBackend {
    /// A backend on `threads` threads (0: one per core), using the widest
    /// instruction set the host has.
    pub fn new(threads: usize) -> Self {
        Self::with_isa(threads, Isa::detect())
    }

    /// As [`CpuBackend::new`], capped at `isa`; tests use it to run every path.
    pub fn with_isa(threads: usize, isa: Isa) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("bertrt-cpu-{i}"))
            .build()
            .expect("cannot start CPU worker threads");
        CpuBackend {
            isa,
            pool,
            precision: Precision::Fp32,
        }
    }

    /// Attention's products, and training's linear layers, multiply in
    /// `precision` (bf16 runs on AVX512_BF16 where the host has it, see
    /// [`gemm::bf16_native`]). Inference with bf16 linears sets it through
    /// its loader ([`crate::quant::Bf16Linears`]), so attention matches them.
    ///
    /// Panics on [`Precision::Fp16`], which CPUs do not run (the CLI
    /// refuses it first, naming bf16).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        assert!(
            precision != Precision::Fp16,
            "the CPU backend has no fp16 path; use bf16"
        );
        self.precision = precision;
        self
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// What attention's products, and training's linears, multiply in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The INT8 path this backend's kernels run (capped like its [`Isa`]).
    pub fn int8_isa(&self) -> int8::Int8Isa {
        int8::Int8Isa::best_under(self.isa)
    }

    /// A linear layer whose products run in bf16 (the weight rounded once
    /// here, activations as they are packed; sums in f32).
    pub fn prepare_linear_bf16(
        &self,
        weight: &[f32],
        bias: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> CpuLinear {
        assert_eq!(bias.len(), out_features, "one bias per output feature");
        CpuLinear {
            weight: CpuWeight::F32(gemm::PackedWeight::pack_bf16(
                weight,
                out_features,
                in_features,
                self.isa,
            )),
            bias: bias.to_vec(),
        }
    }

    /// A linear layer that runs in INT8; `weight` was quantized for
    /// [`Self::int8_isa`].
    pub fn prepare_linear_int8(&self, weight: int8::QuantizedWeight, bias: &[f32]) -> CpuLinear {
        assert_eq!(
            weight.isa(),
            self.int8_isa(),
            "weight quantized for another path"
        );
        assert_eq!(bias.len(), weight.n(), "one bias per output channel");
        CpuLinear {
            weight: CpuWeight::Int8(weight),
            bias: bias.to_vec(),
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new(0)
    }
}

fn epilogue(activation: Activation) -> gemm::Epilogue {
    match activation {
        Activation::Identity => gemm::Epilogue::None,
        Activation::Gelu => gemm::Epilogue::Gelu,
    }
}

impl Backend for CpuBackend {
    type Tensor = Vec<f32>;
    type Param = HostTensor;
    type Linear = CpuLinear;

    fn describe(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            self.isa.name(),
            self.pool.current_num_threads()
        )
    }

    fn param(&self, data: HostTensor) -> HostTensor {
        data
    }

    fn prepare_linear(
        &self,
        weight: &[f32],
        bias: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> CpuLinear {
        CpuLinear {
            weight: CpuWeight::F32(gemm::PackedWeight::pack_for(
                weight,
                out_features,
                in_features,
                self.isa,
            )),
            bias: bias.to_vec(),
        }
    }

    fn new_tensor(&self) -> Vec<f32> {
        Vec::new()
    }

    fn resize(&self, tensor: &mut Vec<f32>, len: usize) {
        tensor.resize(len, 0.0);
    }

    fn to_host(&self, tensor: &Vec<f32>) -> Vec<f32> {
        tensor.clone()
    }

    fn embedding(
        &self,
        out: &mut Vec<f32>,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        word: &HostTensor,
        position: &HostTensor,
        token_type: &HostTensor,
        hidden: usize,
    ) {
        ops::embedding(
            self.isa, out, ids, type_ids, offsets, word, position, token_type, hidden,
        );
    }

    fn matmul(
        &self,
        out: &mut Vec<f32>,
        input: &Vec<f32>,
        rows: usize,
        layer: &CpuLinear,
        activation: Activation,
    ) {
        let bias = Some(layer.bias.as_slice());
        self.pool.install(|| match &layer.weight {
            CpuWeight::F32(weight) => {
                let (n, k) = (weight.n(), weight.k());
                gemm::linear(
                    &input[..rows * k],
                    rows,
                    weight,
                    bias,
                    epilogue(activation),
                    &mut out[..rows * n],
                )
            }
            CpuWeight::Int8(weight) => {
                let (n, k) = (weight.n(), weight.k());
                int8::linear_int8(
                    &input[..rows * k],
                    rows,
                    weight,
                    bias,
                    activation == Activation::Gelu,
                    &mut out[..rows * n],
                )
            }
        });
    }

    fn layer_norm(
        &self,
        x: &mut Vec<f32>,
        residual: Option<&Vec<f32>>,
        gamma: &HostTensor,
        beta: &HostTensor,
        eps: f32,
        cols: usize,
    ) {
        debug_assert_eq!(gamma.len(), cols);
        let residual = residual.map(|r| r.as_slice());
        self.pool
            .install(|| ops::layer_norm(self.isa, x, residual, gamma, beta, eps));
    }

    fn attention(
        &self,
        out: &mut Vec<f32>,
        qkv: &Vec<f32>,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
    ) {
        self.pool.install(|| {
            attention::attention(self.isa, self.precision, out, qkv, offsets, heads, head_dim)
        });
    }

    fn gather_rows(&self, out: &mut Vec<f32>, input: &Vec<f32>, rows: &[usize], cols: usize) {
        reference::gather_rows(out, input, rows, cols);
    }

    fn mean_pool(&self, out: &mut Vec<f32>, input: &Vec<f32>, offsets: &[usize], _cols: usize) {
        ops::mean_pool(self.isa, out, input, offsets);
    }

    fn tanh(&self, x: &mut Vec<f32>) {
        // Only the pooler uses it: batch × hidden values, not worth threads.
        x.iter_mut().for_each(|v| *v = v.tanh());
    }

    fn softmax(&self, x: &mut Vec<f32>, cols: usize) {
        ops::softmax_rows(self.isa, x, cols);
    }

    fn run<R: Send>(&self, ops: impl FnOnce() -> R + Send) -> R {
        // Ops called from a thread of this pool run on it directly.
        self.pool.install(ops)
    }
}
