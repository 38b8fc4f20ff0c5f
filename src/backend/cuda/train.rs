//! [`TrainBackend`] for CUDA: the backward ops, and the forward ops that
//! keep what backward needs.
//!
//! Matrix products (linear layers, LoRA) are cuBLAS `GemmEx` on fp32
//! buffers, multiplying in the backend's [`Precision`]: fp32 (cuBLAS's
//! default math, no TF32), or bf16 / fp16 operands (rounded on the device
//! into scratch copies) on the tensor cores with f32 sums, which is what
//! PyTorch's autocast does to matmuls. (cuBLAS's `COMPUTE_32F_FAST_16BF`
//! on f32 operands gave the same numbers as `_FAST_16F` on an H200, so it
//! is not relied on to round to bf16.) Attention's six products are fp32
//! cuBLAS `GemmBatchedEx` calls over (sequence, head) blocks, one per
//! distinct sequence length, with the probabilities kept for backward as on
//! the CPU. Everything else is our kernels in fp32: `attention_train.cu`
//! (the softmax rows between those products),
//! `layernorm_train.cu`, `epilogue_train.cu`, `scatter_train.cu`,
//! `pointwise_train.cu`, `dropout.cu`, `cross_entropy.cu` and
//! `optimizer.cu`. Dropout masks are the CPU's bit for bit (same counter
//! hash, same element indices), so a seed trains the same model on both up
//! to float rounding.
//!
//! Reductions that return a number to the host (`sum_squares`,
//! `cross_entropy`, `mse`) wait for the stream; everything else is queued.

use std::ops::Range;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{check, cublas_op, elementwise, int, row_threads, CudaBackend, CudaTensor};
use crate::backend::train::{
    attention_probs_len, mse_on_host, AdamW, Dropout, Lora, ParamGrads, TrainBackend,
};
use crate::backend::{Activation, Backend, Precision};

/// Rows (one warp each) per block of the attention row kernels: must match
/// BERTRT_ATTN_SOFTMAX_ROWS in kernels/attention_train.cu.
const ATTENTION_SOFTMAX_ROWS: usize = 4;
/// Blocks of the per-block partial sums of LayerNorm's backward.
const LAYER_NORM_PARTS: usize = 256;
/// At most this many partial sums per tensor in `sum_squares_all`.
const SUM_SQUARES_BLOCKS: usize = 256;

/// Buffers the training ops reuse across calls (grown, never shrunk).
#[derive(Default)]
pub(super) struct Scratch {
    /// All ones: bias gradients are `d_outᵀ · ones`, a GEMV on cuBLAS.
    ones: Option<CudaSlice<f32>>,
    /// Per-block partial sums (LayerNorm's gamma and beta, squared norms).
    partials: Option<CudaSlice<f32>>,
    /// Attention's `dropout(P)` and backward's `dS`, the probabilities'
    /// layout.
    dropped: Option<CudaSlice<f32>>,
    d_scores: Option<CudaSlice<f32>>,
    /// The inf/NaN flag of `grad_sumsq_f32`.
    found_inf: Option<CudaSlice<i32>>,
    /// GEMM operands rounded to bf16 or fp16 (their bits).
    half_a: Option<CudaSlice<u16>>,
    half_b: Option<CudaSlice<u16>>,
}

/// A GEMM operand as the CPU's `gemm::Strided`: element `(i, j)` at
/// `i * ld + j` (`transposed` false) or `j * ld + i` (true), from `address`.
#[derive(Clone, Copy)]
struct Operand {
    address: u64,
    ld: usize,
    transposed: bool,
}

impl Operand {
    fn rows(tensor: &CudaTensor, backend: &CudaBackend, ld: usize) -> Self {
        Self::rows_at(tensor, backend, 0, ld)
    }

    /// Starting `offset` elements into `tensor`.
    fn rows_at(tensor: &CudaTensor, backend: &CudaBackend, offset: usize, ld: usize) -> Self {
        Operand {
            address: backend.tensor_address(tensor) + 4 * offset as u64,
            ld,
            transposed: false,
        }
    }

    fn transposed(self) -> Self {
        Operand {
            transposed: true,
            ..self
        }
    }
}

/// Grows `slot` to at least `len` elements (contents undefined).
fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    backend: &CudaBackend,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(check(
            "allocation",
            backend.stream.alloc_zeros::<T>(len.max(1)),
        ));
    }
}

impl CudaBackend {
    fn train_kernel(&self, name: &str) -> &cudarc::driver::CudaFunction {
        self.kernels
            .train
            .get(name)
            .unwrap_or_else(|| panic!("CUDA backend: kernel {name} is not loaded"))
    }

    /// Row-major `c[m, n] (ld ldc) = alpha · a[m, k] · b[k, n] + beta · c`
    /// on f32 buffers, multiplied in the backend's precision: in bf16 or
    /// fp16 the operands are rounded into scratch copies first (the span
    /// each covers, so strides and offsets carry over) and cuBLAS runs the
    /// 16-bit product on the tensor cores with f32 sums into f32 `c`.
    #[allow(clippy::too_many_arguments)] // the BLAS signature
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: u64,
        ldc: usize,
    ) {
        let (kernel, data_type) = match self.precision {
            Precision::Fp32 => return self.gemm_f32(m, n, k, alpha, a, b, beta, c, ldc),
            Precision::Bf16 => ("round_to_bf16", cudaDataType::CUDA_R_16BF),
            Precision::Fp16 => ("round_to_f16", cudaDataType::CUDA_R_16F),
        };
        if m == 0 || n == 0 {
            return;
        }
        let mut scratch = self.train_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Scratch { half_a, half_b, .. } = &mut *scratch;
        let round = |operand: Operand, outer: usize, inner: usize, slot: &mut Option<_>| {
            let span = (outer - 1) * operand.ld + inner;
            grow(self, &mut *slot, span);
            let address = self.address(slot.as_ref());
            self.launch(
                "round operand to 16 bits",
                self.train_kernel(kernel),
                elementwise(span),
                &[&address, &operand.address, &(span as u64)],
            );
            Operand { address, ..operand }
        };
        let (a_outer, a_inner) = if a.transposed { (k, m) } else { (m, k) };
        let (b_outer, b_inner) = if b.transposed { (n, k) } else { (k, n) };
        let a = round(a, a_outer, a_inner, half_a);
        let b = round(b, b_outer, b_inner, half_b);
        let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
        self.gemm_typed(data_type, compute, m, n, k, alpha, a, b, beta, c, ldc);
    }

    /// [`Self::gemm`] in fp32 whatever the precision (cuBLAS's default
    /// math: no TF32).
    #[allow(clippy::too_many_arguments)]
    fn gemm_f32(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: u64,
        ldc: usize,
    ) {
        let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let data_type = cudaDataType::CUDA_R_32F;
        self.gemm_typed(data_type, compute, m, n, k, alpha, a, b, beta, c, ldc);
    }

    /// cuBLAS `GemmEx` with operands of `data_type` and an f32 `c`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_typed(
        &self,
        data_type: cudaDataType,
        compute: cublasComputeType_t,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: u64,
        ldc: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        assert!(k > 0, "gemm with k = 0");
        // cuBLAS is column-major: row-major C = A·B is column-major
        // Cᵀ = Bᵀ·Aᵀ, and a row-major operand read column-major is its
        // transpose, so B goes first, transposed exactly when it is not.
        check("bind context", self.ctx.bind_to_thread());
        self.profiled("gemm", || {
            // SAFETY: callers pass buffers holding the m·k, k·n and m·n
            // elements (with their leading dimensions) that the product
            // reads and writes; alpha and beta outlive the call, which only
            // queues.
            check("cuBLAS GemmEx", unsafe {
                gemm_ex(
                    *self.blas.handle(),
                    cublas_op(b.transposed),
                    cublas_op(a.transposed),
                    int("gemm n", n),
                    int("gemm m", m),
                    int("gemm k", k),
                    (&alpha as *const f32).cast(),
                    b.address as *const _,
                    data_type,
                    int("gemm ld", b.ld),
                    a.address as *const _,
                    data_type,
                    int("gemm ld", a.ld),
                    (&beta as *const f32).cast(),
                    c as *mut _,
                    cudaDataType::CUDA_R_32F,
                    int("gemm ldc", ldc),
                    compute,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            })
        });
    }

    /// Row-major `c_i[m, n] = alpha · a_i[m, k] · b_i[k, n]` for every i
    /// (c overwritten), fp32, one cuBLAS `GemmBatchedEx`: operands are
    /// (leading dimension, transposed, device addresses), c (ldc, addresses).
    #[allow(clippy::too_many_arguments)]
    fn gemm_batched(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: (usize, bool, &[u64]),
        b: (usize, bool, &[u64]),
        c: (usize, &[u64]),
    ) {
        let count = c.1.len();
        assert!(
            a.2.len() == count && b.2.len() == count,
            "gemm_batched: pointer counts"
        );
        if count == 0 || m == 0 || n == 0 {
            return;
        }
        assert!(k > 0, "gemm_batched with k = 0");
        let (a_ptrs, b_ptrs, c_ptrs) = (
            self.copy_to_device(a.2),
            self.copy_to_device(b.2),
            self.copy_to_device(c.1),
        );
        let beta = 0.0f32;
        check("bind context", self.ctx.bind_to_thread());
        // Column-major as in gemm_typed: B first, the roles of m and n swapped.
        let status = self.profiled("gemm_batched", || {
            // SAFETY: each pointer addresses a matrix of the stated shape and
            // leading dimension inside a live buffer (the caller's
            // AttentionLayout); the pointer arrays live until the stream
            // frees them in order, after this call.
            unsafe {
                cudarc::cublas::sys::cublasGemmBatchedEx(
                    *self.blas.handle(),
                    cublas_op(b.1),
                    cublas_op(a.1),
                    int("gemm n", n),
                    int("gemm m", m),
                    int("gemm k", k),
                    (&alpha as *const f32).cast(),
                    self.address(Some(&b_ptrs)) as *const *const _,
                    cudaDataType::CUDA_R_32F,
                    int("gemm ld", b.0),
                    self.address(Some(&a_ptrs)) as *const *const _,
                    cudaDataType::CUDA_R_32F,
                    int("gemm ld", a.0),
                    (&beta as *const f32).cast(),
                    self.address(Some(&c_ptrs)) as *const *mut _,
                    cudaDataType::CUDA_R_32F,
                    int("gemm ldc", c.0),
                    int("batch", count),
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        });
        assert_eq!(
            status,
            cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
            "CUDA backend: cuBLAS GemmBatchedEx failed"
        );
    }

    /// Dropout in place on the `n` floats at `address`, element `i` masked
    /// by its index `i` (a whole tensor, as the CPU's ops::dropout_slice).
    fn dropout_at(&self, address: u64, n: usize, dropout: Dropout) {
        self.launch(
            "dropout",
            self.train_kernel("dropout_f32"),
            elementwise(n),
            &[&address, &(n as u64), &dropout.p, &dropout.seed, &0u64],
        );
    }

    /// `d_bias[n] += Σ over rows of d_out[rows, n]`, as `d_outᵀ · ones`.
    fn add_column_sums(&self, d_bias: &mut CudaTensor, d_out: &CudaTensor, rows: usize, n: usize) {
        let mut scratch = self.train_scratch.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.ones.as_ref().is_none_or(|o| o.len() < rows) {
            scratch.ones = Some(check(
                "copy to device",
                self.stream.clone_htod(&vec![1.0f32; rows]),
            ));
        }
        let ones = self.address(scratch.ones.as_ref());
        // Always fp32: a bias gradient is a sum of many small terms, and a
        // GEMV is memory bound anyway.
        self.gemm_f32(
            n,
            1,
            rows,
            1.0,
            Operand::rows(d_out, self, n).transposed(),
            Operand {
                address: ones,
                ld: 1,
                transposed: false,
            },
            1.0,
            self.tensor_address(d_bias),
            1,
        );
    }
}

impl TrainBackend for CudaBackend {
    fn upload(&self, data: &[f32]) -> CudaTensor {
        CudaBackend::upload(self, data)
    }

    fn zero(&self, tensor: &mut CudaTensor) {
        if let Some(buf) = tensor.buf.as_mut().filter(|_| tensor.len > 0) {
            let mut view = buf.slice_mut(0..tensor.len);
            check("memset", self.stream.memset_zeros(&mut view));
        }
    }

    fn copy(&self, dst: &mut CudaTensor, src: &CudaTensor) {
        assert_eq!(dst.len, src.len, "copy: lengths differ");
        if src.len == 0 {
            return;
        }
        let from = src
            .buf
            .as_ref()
            .expect("non-empty source")
            .slice(0..src.len);
        let mut to = dst
            .buf
            .as_mut()
            .expect("non-empty destination")
            .slice_mut(0..src.len);
        check("device copy", self.stream.memcpy_dtod(&from, &mut to));
    }

    fn embedding_forward(
        &self,
        out: &mut CudaTensor,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        word: &CudaTensor,
        position: &CudaTensor,
        token_type: &CudaTensor,
        hidden: usize,
    ) {
        self.embedding(
            out, ids, type_ids, offsets, word, position, token_type, hidden,
        );
    }

    fn linear_forward(
        &self,
        out: &mut CudaTensor,
        input: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        rows: usize,
    ) {
        let n = bias.len;
        let k = weight.len / n;
        assert!(input.len >= rows * k, "linear_forward: input too small");
        assert!(out.len >= rows * n, "linear_forward: output too small");
        // out[rows, n] = input[rows, k] · Wᵀ, W being [n, k].
        self.gemm(
            rows,
            n,
            k,
            1.0,
            Operand::rows(input, self, k),
            Operand::rows(weight, self, k).transposed(),
            0.0,
            self.tensor_address(out),
            n,
        );
        if rows > 0 {
            self.add_bias(out, bias, rows, n, Activation::Identity);
        }
    }

    fn linear_backward(
        &self,
        d_input: Option<&mut CudaTensor>,
        param_grads: ParamGrads<CudaTensor>,
        d_out: &CudaTensor,
        input: &CudaTensor,
        weight: &CudaTensor,
        rows: usize,
    ) {
        if rows == 0 {
            return;
        }
        let n = d_out.len / rows;
        let k = weight.len / n;
        if let Some(d_input) = d_input {
            assert!(
                d_input.len >= rows * k,
                "linear_backward: d_input too small"
            );
            // d_input[rows, k] = d_out[rows, n] · W[n, k].
            self.gemm(
                rows,
                k,
                n,
                1.0,
                Operand::rows(d_out, self, n),
                Operand::rows(weight, self, k),
                0.0,
                self.tensor_address(d_input),
                k,
            );
        }
        let Some((d_weight, d_bias)) = param_grads else {
            return;
        };
        assert!(
            d_weight.len >= n * k && d_bias.len >= n,
            "linear_backward: gradients too small"
        );
        // d_weight[n, k] += d_outᵀ[n, rows] · input[rows, k].
        self.gemm(
            n,
            k,
            rows,
            1.0,
            Operand::rows(d_out, self, n).transposed(),
            Operand::rows(input, self, k),
            1.0,
            self.tensor_address(d_weight),
            k,
        );
        self.add_column_sums(d_bias, d_out, rows, n);
    }

    fn lora_forward(
        &self,
        out: &mut CudaTensor,
        columns: Range<usize>,
        xa: &mut CudaTensor,
        input: &CudaTensor,
        lora: Lora<CudaTensor>,
        rows: usize,
    ) {
        if rows == 0 {
            return;
        }
        let n = columns.len();
        let r = lora.b.len / n;
        let k = lora.a.len / r;
        let width = out.len / rows;
        assert!(
            xa.len >= rows * r && columns.end <= width,
            "lora_forward: shapes"
        );
        // xa[rows, r] = input[rows, k] · Aᵀ.
        self.gemm(
            rows,
            r,
            k,
            1.0,
            Operand::rows(input, self, k),
            Operand::rows(lora.a, self, k).transposed(),
            0.0,
            self.tensor_address(xa),
            r,
        );
        // out[:, columns] += scale · xa · Bᵀ.
        self.gemm(
            rows,
            n,
            r,
            lora.scale,
            Operand::rows(xa, self, r),
            Operand::rows(lora.b, self, r).transposed(),
            1.0,
            self.tensor_address(out) + 4 * columns.start as u64,
            width,
        );
    }

    fn lora_backward(
        &self,
        d_input: &mut CudaTensor,
        param_grads: ParamGrads<CudaTensor>,
        scratch: &mut CudaTensor,
        d_out: &CudaTensor,
        columns: Range<usize>,
        xa: &CudaTensor,
        input: &CudaTensor,
        lora: Lora<CudaTensor>,
        rows: usize,
    ) {
        if rows == 0 {
            return;
        }
        let n = columns.len();
        let r = lora.b.len / n;
        let k = lora.a.len / r;
        let width = d_out.len / rows;
        assert!(
            scratch.len >= rows * r && d_input.len >= rows * k,
            "lora_backward: shapes"
        );
        let d_out_block = Operand::rows_at(d_out, self, columns.start, width);
        // g[rows, r] = scale · d_out[rows, columns] · B[n, r].
        self.gemm(
            rows,
            r,
            n,
            lora.scale,
            d_out_block,
            Operand::rows(lora.b, self, r),
            0.0,
            self.tensor_address(scratch),
            r,
        );
        // d_input[rows, k] += g · A[r, k].
        self.gemm(
            rows,
            k,
            r,
            1.0,
            Operand::rows(scratch, self, r),
            Operand::rows(lora.a, self, k),
            1.0,
            self.tensor_address(d_input),
            k,
        );
        let Some((d_a, d_b)) = param_grads else {
            return;
        };
        // d_A[r, k] += gᵀ · input.
        self.gemm(
            r,
            k,
            rows,
            1.0,
            Operand::rows(scratch, self, r).transposed(),
            Operand::rows(input, self, k),
            1.0,
            self.tensor_address(d_a),
            k,
        );
        // d_B[n, r] += scale · d_out[:, columns]ᵀ · xa.
        self.gemm(
            n,
            r,
            rows,
            lora.scale,
            d_out_block.transposed(),
            Operand::rows(xa, self, r),
            1.0,
            self.tensor_address(d_b),
            r,
        );
    }

    fn gelu_forward(&self, out: &mut CudaTensor, pre: &CudaTensor) {
        assert!(out.len >= pre.len, "gelu_forward: output too small");
        if pre.len == 0 {
            return;
        }
        self.launch(
            "gelu_forward",
            self.train_kernel("gelu_forward_f32"),
            elementwise(pre.len),
            &[
                &self.tensor_address(out),
                &self.tensor_address(pre),
                &(pre.len as u64),
            ],
        );
    }

    fn gelu_backward(&self, d: &mut CudaTensor, pre: &CudaTensor) {
        assert!(pre.len >= d.len, "gelu_backward: pre too small");
        if d.len == 0 {
            return;
        }
        // One row of all the elements, no bias partials.
        self.launch(
            "gelu_backward",
            self.train_kernel("bias_gelu_backward_f32"),
            LaunchConfig {
                grid_dim: (d.len.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                &self.tensor_address(d),
                &0u64,
                &self.tensor_address(pre),
                &1i32,
                &int("gelu elements", d.len),
            ],
        );
    }

    fn layer_norm_forward(
        &self,
        out: &mut CudaTensor,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        mean: &mut CudaTensor,
        rstd: &mut CudaTensor,
    ) {
        let cols = gamma.len;
        let rows = mean.len;
        assert!(
            x.len >= rows * cols && out.len >= rows * cols && rstd.len >= rows,
            "layer_norm_forward: shapes"
        );
        if rows == 0 {
            return;
        }
        self.launch(
            "layer_norm_forward",
            self.train_kernel("layer_norm_forward_f32"),
            super::rows_config(rows, cols),
            &[
                &self.tensor_address(out),
                // Read only: the kernel writes x back only with a residual.
                &self.tensor_address(x),
                &0u64,
                &self.tensor_address(gamma),
                &self.tensor_address(beta),
                &self.tensor_address(mean),
                &self.tensor_address(rstd),
                &eps,
                &int("cols", cols),
            ],
        );
    }

    fn layer_norm_backward(
        &self,
        d_x: &mut CudaTensor,
        param_grads: ParamGrads<CudaTensor>,
        d_out: &CudaTensor,
        x: &CudaTensor,
        gamma: &CudaTensor,
        mean: &CudaTensor,
        rstd: &CudaTensor,
    ) {
        let cols = gamma.len;
        let rows = mean.len;
        assert!(
            cols <= 2048,
            "layer_norm_backward: {cols} columns (the kernel holds at most 2048 per row)"
        );
        assert!(
            d_x.len >= rows * cols && d_out.len >= rows * cols && x.len >= rows * cols,
            "layer_norm_backward: shapes"
        );
        if rows == 0 {
            return;
        }
        let parts = rows.min(LAYER_NORM_PARTS);
        let mut scratch = self.train_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (d_gamma_partials, d_beta_partials) = if param_grads.is_some() {
            grow(self, &mut scratch.partials, 2 * parts * cols);
            let base = self.address(scratch.partials.as_ref());
            (base, base + 4 * (parts * cols) as u64)
        } else {
            (0, 0)
        };
        self.launch(
            "layer_norm_backward",
            self.train_kernel("layer_norm_backward_f32"),
            LaunchConfig {
                grid_dim: (parts as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                &self.tensor_address(d_x),
                &d_gamma_partials,
                &d_beta_partials,
                &self.tensor_address(d_out),
                &self.tensor_address(x),
                &self.tensor_address(gamma),
                &self.tensor_address(mean),
                &self.tensor_address(rstd),
                &int("rows", rows),
                &int("cols", cols),
            ],
        );
        let Some((d_gamma, d_beta)) = param_grads else {
            return;
        };
        for (grad, partials) in [(d_gamma, d_gamma_partials), (d_beta, d_beta_partials)] {
            self.launch(
                "column_sum",
                self.train_kernel("column_sum_f32"),
                LaunchConfig {
                    grid_dim: (cols.div_ceil(256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    &self.tensor_address(grad),
                    &partials,
                    &int("parts", parts),
                    &int("cols", cols),
                ],
            );
        }
    }

    fn add(&self, out: &mut CudaTensor, a: &CudaTensor, b: &CudaTensor) {
        let n = out.len;
        assert!(a.len >= n && b.len >= n, "add: inputs too small");
        if n == 0 {
            return;
        }
        self.launch(
            "add",
            self.train_kernel("add_f32"),
            elementwise(n),
            &[
                &self.tensor_address(out),
                &self.tensor_address(a),
                &self.tensor_address(b),
                &(n as u64),
            ],
        );
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) {
        let n = x.len;
        assert!(y.len >= n, "add_assign: y too small");
        if n == 0 {
            return;
        }
        let x_address = self.tensor_address(x);
        self.launch(
            "add_assign",
            self.train_kernel("add_f32"),
            elementwise(n),
            &[&x_address, &x_address, &self.tensor_address(y), &(n as u64)],
        );
    }

    fn attention_forward(
        &self,
        out: &mut CudaTensor,
        probs: &mut CudaTensor,
        qkv: &CudaTensor,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
        dropout: Dropout,
    ) {
        let Some(&tokens) = offsets.last() else {
            return;
        };
        let hidden = heads * head_dim;
        assert!(
            qkv.len >= tokens * 3 * hidden,
            "attention_forward: qkv too small"
        );
        assert!(
            out.len >= tokens * hidden,
            "attention_forward: output too small"
        );
        let probs_len = attention_probs_len(offsets, heads);
        assert!(
            probs.len >= probs_len,
            "attention_forward: probabilities too small"
        );
        let layout = AttentionLayout::new(self, offsets, heads, head_dim);
        if layout.max_len == 0 || heads == 0 || head_dim == 0 {
            return;
        }
        let (qkv_at, probs_at) = (self.tensor_address(qkv), self.tensor_address(probs));
        let stride = 3 * hidden;
        // Scores: probs = scale · Q Kᵀ, per (sequence, head).
        layout.products(
            self,
            |len, block| {
                (
                    [len, len, head_dim],
                    [
                        (qkv_at, block.q, stride, false),
                        (qkv_at, block.k, stride, true),
                        (probs_at, block.probs, len, false),
                    ],
                )
            },
            1.0 / (head_dim as f32).sqrt(),
        );
        let mut scratch = self.train_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let dropped_at = if dropout.is_off() {
            probs_at
        } else {
            grow(self, &mut scratch.dropped, probs_len);
            self.address(scratch.dropped.as_ref())
        };
        layout.rows(
            self,
            "attention_softmax_train",
            |offsets, probs_base, grid| {
                self.launch(
                    "attention_softmax_train",
                    self.train_kernel("attention_softmax_train_f32"),
                    grid,
                    &[
                        &probs_at,
                        &if dropout.is_off() { 0 } else { dropped_at },
                        &offsets,
                        &probs_base,
                        &dropout.p,
                        &dropout.seed,
                    ],
                )
            },
        );
        // out = dropout(P) · V.
        let out_at = self.tensor_address(out);
        layout.products(
            self,
            |len, block| {
                (
                    [len, head_dim, len],
                    [
                        (dropped_at, block.probs, len, false),
                        (qkv_at, block.v, stride, false),
                        (out_at, block.out, hidden, false),
                    ],
                )
            },
            1.0,
        );
    }

    fn attention_backward(
        &self,
        d_qkv: &mut CudaTensor,
        d_out: &CudaTensor,
        qkv: &CudaTensor,
        probs: &CudaTensor,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
        dropout: Dropout,
    ) {
        let Some(&tokens) = offsets.last() else {
            return;
        };
        let hidden = heads * head_dim;
        assert!(
            qkv.len >= tokens * 3 * hidden && d_qkv.len >= tokens * 3 * hidden,
            "attention_backward: qkv too small"
        );
        assert!(
            d_out.len >= tokens * hidden,
            "attention_backward: d_out too small"
        );
        let probs_len = attention_probs_len(offsets, heads);
        assert!(
            probs.len >= probs_len,
            "attention_backward: probabilities too small"
        );
        let layout = AttentionLayout::new(self, offsets, heads, head_dim);
        if layout.max_len == 0 || heads == 0 || head_dim == 0 {
            return;
        }
        let stride = 3 * hidden;
        let (qkv_at, probs_at) = (self.tensor_address(qkv), self.tensor_address(probs));
        let (d_qkv_at, d_out_at) = (self.tensor_address(d_qkv), self.tensor_address(d_out));
        let mut scratch = self.train_scratch.lock().unwrap_or_else(|e| e.into_inner());
        grow(self, &mut scratch.d_scores, probs_len);
        let d_scores_at = self.address(scratch.d_scores.as_ref());
        // dropout(P), regenerated from P and the seed.
        let dropped_at = if dropout.is_off() {
            probs_at
        } else {
            grow(self, &mut scratch.dropped, probs_len);
            let dropped = scratch.dropped.as_mut().expect("grown above");
            let from = probs.buf.as_ref().expect("non-empty probabilities");
            check(
                "device copy",
                self.stream.memcpy_dtod(
                    &from.slice(0..probs_len),
                    &mut dropped.slice_mut(0..probs_len),
                ),
            );
            let address = self.address(Some(&*dropped));
            self.launch(
                "dropout",
                self.train_kernel("dropout_f32"),
                elementwise(probs_len),
                &[
                    &address,
                    &(probs_len as u64),
                    &dropout.p,
                    &dropout.seed,
                    &0u64,
                ],
            );
            address
        };
        // d_v = dropout(P)ᵀ · d_out.
        layout.products(
            self,
            |len, block| {
                (
                    [len, head_dim, len],
                    [
                        (dropped_at, block.probs, len, true),
                        (d_out_at, block.out, hidden, false),
                        (d_qkv_at, block.v, stride, false),
                    ],
                )
            },
            1.0,
        );
        // The gradient of dropout(P): d_out · Vᵀ, then dS in place.
        layout.products(
            self,
            |len, block| {
                (
                    [len, len, head_dim],
                    [
                        (d_out_at, block.out, hidden, false),
                        (qkv_at, block.v, stride, true),
                        (d_scores_at, block.probs, len, false),
                    ],
                )
            },
            1.0,
        );
        layout.rows(
            self,
            "attention_softmax_backward",
            |offsets, probs_base, grid| {
                self.launch(
                    "attention_softmax_backward",
                    self.train_kernel("attention_softmax_backward_f32"),
                    grid,
                    &[
                        &d_scores_at,
                        &probs_at,
                        &offsets,
                        &probs_base,
                        &(1.0 / (head_dim as f32).sqrt()),
                        &dropout.p,
                        &dropout.seed,
                    ],
                )
            },
        );
        // d_q = dS · K, d_k = dSᵀ · Q.
        layout.products(
            self,
            |len, block| {
                (
                    [len, head_dim, len],
                    [
                        (d_scores_at, block.probs, len, false),
                        (qkv_at, block.k, stride, false),
                        (d_qkv_at, block.q, stride, false),
                    ],
                )
            },
            1.0,
        );
        layout.products(
            self,
            |len, block| {
                (
                    [len, head_dim, len],
                    [
                        (d_scores_at, block.probs, len, true),
                        (qkv_at, block.q, stride, false),
                        (d_qkv_at, block.k, stride, false),
                    ],
                )
            },
            1.0,
        );
    }

    fn dropout(&self, x: &mut CudaTensor, dropout: Dropout) {
        if dropout.is_off() || x.len == 0 {
            return;
        }
        self.dropout_at(self.tensor_address(x), x.len, dropout);
    }

    fn embedding_backward(
        &self,
        d_word: &mut CudaTensor,
        d_position: &mut CudaTensor,
        d_token_type: &mut CudaTensor,
        d_out: &CudaTensor,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
    ) {
        let Some(&tokens) = offsets.last() else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let hidden = d_out.len / ids.len().max(1);
        let positions: Vec<u32> = offsets
            .windows(2)
            .flat_map(|w| 0..(w[1] - w[0]) as u32)
            .collect();
        assert_eq!(offsets[0], 0, "embedding_backward: offsets start at 0");
        assert!(
            ids.len() >= tokens && type_ids.len() >= tokens && d_out.len >= tokens * hidden,
            "embedding_backward: shapes"
        );
        let ids = self.copy_to_device(&ids[..tokens]);
        let type_ids = self.copy_to_device(&type_ids[..tokens]);
        let positions = self.copy_to_device(&positions);
        self.launch(
            "embedding_backward",
            self.train_kernel("embedding_backward_f32"),
            LaunchConfig {
                grid_dim: (int("tokens", tokens) as u32, 1, 1),
                block_dim: (row_threads(hidden), 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                &self.tensor_address(d_word),
                &self.tensor_address(d_position),
                &self.tensor_address(d_token_type),
                &self.tensor_address(d_out),
                &self.address(Some(&ids)),
                &self.address(Some(&type_ids)),
                &self.address(Some(&positions)),
                &int("hidden", hidden),
            ],
        );
    }

    fn scatter_rows(
        &self,
        d_input: &mut CudaTensor,
        d_out: &CudaTensor,
        rows: &[usize],
        cols: usize,
    ) {
        TrainBackend::zero(self, d_input);
        assert!(
            rows.iter().all(|&r| (r + 1) * cols <= d_input.len),
            "scatter_rows: row index out of range"
        );
        assert!(
            d_out.len >= rows.len() * cols,
            "scatter_rows: d_out too small"
        );
        if rows.is_empty() || cols == 0 {
            return;
        }
        let indices: Vec<u64> = rows.iter().map(|&r| r as u64).collect();
        let indices = self.copy_to_device(&indices);
        self.launch(
            "scatter_rows",
            self.train_kernel("scatter_rows_f32"),
            super::rows_config(rows.len(), cols),
            &[
                &self.tensor_address(d_input),
                &self.tensor_address(d_out),
                &self.address(Some(&indices)),
                &int("cols", cols),
            ],
        );
    }

    fn mean_pool_backward(
        &self,
        d_input: &mut CudaTensor,
        d_out: &CudaTensor,
        offsets: &[usize],
        cols: usize,
    ) {
        let batch = offsets.len().saturating_sub(1);
        if batch == 0 || cols == 0 {
            return;
        }
        assert!(
            batch <= 65535,
            "mean_pool_backward: more than 65535 sequences"
        );
        assert!(
            d_input.len >= offsets[batch] * cols && d_out.len >= batch * cols,
            "mean_pool_backward: shapes"
        );
        self.with_offsets(offsets, |offsets| {
            self.launch(
                "mean_pool_backward",
                self.train_kernel("mean_pool_backward_f32"),
                LaunchConfig {
                    grid_dim: (cols.div_ceil(128) as u32, batch as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    &self.tensor_address(d_input),
                    &self.tensor_address(d_out),
                    &offsets,
                    &int("cols", cols),
                ],
            )
        });
    }

    fn tanh_backward(&self, d: &mut CudaTensor, y: &CudaTensor) {
        assert!(y.len >= d.len, "tanh_backward: y too small");
        if d.len == 0 {
            return;
        }
        self.launch(
            "tanh_backward",
            self.train_kernel("tanh_backward_f32"),
            elementwise(d.len),
            &[
                &self.tensor_address(d),
                &self.tensor_address(y),
                &(d.len as u64),
            ],
        );
    }

    fn cross_entropy(
        &self,
        d_logits: &mut CudaTensor,
        logits: &CudaTensor,
        labels: &[usize],
        weights: Option<&[f32]>,
        classes: usize,
    ) -> f32 {
        let rows = labels.len();
        if rows == 0 {
            return 0.0;
        }
        assert!(
            logits.len >= rows * classes && d_logits.len >= rows * classes,
            "cross_entropy: shapes"
        );
        let total: f32 = weights.map_or(rows as f32, |w| w[..rows].iter().sum());
        let device_labels: Vec<i32> = labels
            .iter()
            .map(|&l| {
                assert!(l < classes, "cross_entropy: label {l} of {classes} classes");
                l as i32
            })
            .collect();
        let device_labels = self.copy_to_device(&device_labels);
        let device_weights = weights.map(|w| self.copy_to_device(&w[..rows]));
        let losses = check("allocation", self.stream.alloc_zeros::<f32>(rows));
        self.launch(
            "cross_entropy",
            self.train_kernel("cross_entropy_f32"),
            super::rows_config(rows, classes),
            &[
                &self.address(Some(&losses)),
                &self.tensor_address(d_logits),
                &self.tensor_address(logits),
                &self.address(Some(&device_labels)),
                &self.address(device_weights.as_ref()),
                &(1.0 / total),
                &1.0f32,
                &int("classes", classes),
            ],
        );
        let losses = check("copy to host", self.stream.clone_dtoh(&losses));
        check(
            "stream synchronize (a kernel failed?)",
            self.stream.synchronize(),
        );
        losses.iter().map(|&l| l as f64).sum::<f64>() as f32
    }

    fn mse(
        &self,
        d_predictions: &mut CudaTensor,
        predictions: &CudaTensor,
        targets: &[f32],
    ) -> f32 {
        let predictions = self.to_host(predictions);
        let mut gradient = vec![0.0f32; d_predictions.len];
        let loss = mse_on_host(&mut gradient, &predictions, targets);
        self.upload_into(d_predictions, &gradient);
        loss
    }

    fn sum_squares(&self, x: &CudaTensor) -> f64 {
        self.sum_squares_all(&[x])
    }

    /// One `grad_sumsq_f32` launch per tensor into its own slice of the
    /// partial sums, then a single copy to the host and one wait; the
    /// partials are added in f64, in a fixed order.
    fn sum_squares_all(&self, tensors: &[&CudaTensor]) -> f64 {
        let blocks: Vec<usize> = tensors
            .iter()
            .map(|x| x.len.div_ceil(256).min(SUM_SQUARES_BLOCKS))
            .collect();
        let total: usize = blocks.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let mut scratch = self.train_scratch.lock().unwrap_or_else(|e| e.into_inner());
        grow(self, &mut scratch.partials, total);
        grow(self, &mut scratch.found_inf, 1);
        let partials = self.address(scratch.partials.as_ref());
        let found_inf = self.address(scratch.found_inf.as_ref());
        let mut at = 0;
        for (x, &count) in tensors.iter().zip(&blocks).filter(|(_, &c)| c > 0) {
            self.launch(
                "grad_sumsq",
                self.train_kernel("grad_sumsq_f32"),
                LaunchConfig {
                    grid_dim: (count as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    &(partials + 4 * at as u64),
                    &self.tensor_address(x),
                    &(x.len as u64),
                    &1.0f32,
                    &found_inf,
                ],
            );
            at += count;
        }
        let partials = scratch.partials.as_ref().expect("grown above");
        let mut host = vec![0.0f32; total];
        check(
            "copy to host",
            self.stream
                .memcpy_dtoh(&partials.slice(0..total), &mut host),
        );
        check(
            "stream synchronize (a kernel failed?)",
            self.stream.synchronize(),
        );
        // A non-finite gradient makes its block's sum non-finite: the norm
        // says so, as on the CPU.
        host.iter().map(|&p| p as f64).sum()
    }

    fn scale(&self, x: &mut CudaTensor, factor: f32) {
        if x.len == 0 {
            return;
        }
        self.launch(
            "scale",
            self.train_kernel("scale_f32"),
            elementwise(x.len),
            &[&self.tensor_address(x), &(x.len as u64), &factor],
        );
    }

    fn adamw(
        &self,
        param: &mut CudaTensor,
        grad: &CudaTensor,
        m: &mut CudaTensor,
        v: &mut CudaTensor,
        update: AdamW,
    ) {
        let n = param.len;
        assert!(
            grad.len >= n && m.len >= n && v.len >= n,
            "adamw: gradient or moments too small"
        );
        if n == 0 {
            return;
        }
        let AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            step,
        } = update;
        // The bias corrections in f32, exactly as the CPU computes them.
        let correction1 = 1.0 - beta1.powi(step as i32);
        let correction2 = 1.0 - beta2.powi(step as i32);
        self.launch(
            "adamw",
            self.train_kernel("adamw_f32_f32"),
            elementwise(n),
            &[
                &self.tensor_address(param),
                &0u64,
                &self.tensor_address(grad),
                &self.tensor_address(m),
                &self.tensor_address(v),
                &(n as u64),
                &lr,
                &beta1,
                &beta2,
                &eps,
                &weight_decay,
                &correction1,
                &correction2,
                &0u64,
                &0u64,
            ],
        );
    }
}

/// Where one (sequence, head) block's operands start, in elements: its
/// query, key and value columns in qkv (and the same columns of d_qkv), its
/// output columns, and its `len × len` block of probabilities.
#[derive(Clone, Copy)]
struct HeadBlock {
    q: usize,
    k: usize,
    v: usize,
    out: usize,
    probs: usize,
}

/// A packed batch's attention blocks grouped by sequence length, so that
/// each product is one batched GEMM per distinct length (one in all for a
/// batch of equal lengths), plus the offsets for the row kernels.
struct AttentionLayout<'a> {
    offsets: &'a [usize],
    heads: usize,
    max_len: usize,
    /// (length, its blocks), lengths > 0.
    groups: Vec<(usize, Vec<HeadBlock>)>,
    probs_base: CudaSlice<u64>,
}

impl<'a> AttentionLayout<'a> {
    fn new(backend: &CudaBackend, offsets: &'a [usize], heads: usize, head_dim: usize) -> Self {
        let hidden = heads * head_dim;
        let mut groups: Vec<(usize, Vec<HeadBlock>)> = Vec::new();
        let mut base = Vec::with_capacity(offsets.len());
        let mut at = 0;
        for w in offsets.windows(2) {
            let (start, len) = (w[0], w[1] - w[0]);
            base.push(at as u64);
            if len > 0 {
                let index = match groups.iter().position(|(l, _)| *l == len) {
                    Some(index) => index,
                    None => {
                        groups.push((len, Vec::new()));
                        groups.len() - 1
                    }
                };
                for h in 0..heads {
                    let q = start * 3 * hidden + h * head_dim;
                    groups[index].1.push(HeadBlock {
                        q,
                        k: q + hidden,
                        v: q + 2 * hidden,
                        out: start * hidden + h * head_dim,
                        probs: at + h * len * len,
                    });
                }
            }
            at += heads * len * len;
        }
        let max_len = groups.iter().map(|(len, _)| *len).max().unwrap_or(0);
        AttentionLayout {
            offsets,
            heads,
            max_len,
            groups,
            probs_base: backend.copy_to_device(&base),
        }
    }

    /// One batched product per length group: `operands(len, block)` gives
    /// `[m, n, k]` and, for A, B and C, (buffer address, element offset,
    /// leading dimension, transposed); `C = alpha · A · B` (C overwritten).
    #[allow(clippy::type_complexity)]
    fn products(
        &self,
        backend: &CudaBackend,
        operands: impl Fn(usize, &HeadBlock) -> ([usize; 3], [(u64, usize, usize, bool); 3]),
        alpha: f32,
    ) {
        for (len, blocks) in &self.groups {
            let (shape, [a, b, c]) = operands(*len, &blocks[0]);
            let mut pointers: [Vec<u64>; 3] = Default::default();
            for block in blocks {
                let (_, matrices) = operands(*len, block);
                for (list, (address, offset, _, _)) in pointers.iter_mut().zip(matrices) {
                    list.push(address + 4 * offset as u64);
                }
            }
            let [m, n, k] = shape;
            backend.gemm_batched(
                m,
                n,
                k,
                alpha,
                (a.2, a.3, &pointers[0]),
                (b.2, b.3, &pointers[1]),
                (c.2, &pointers[2]),
            );
        }
    }

    /// Launches a row kernel over every (row, head, sequence).
    fn rows(&self, backend: &CudaBackend, what: &str, launch: impl FnOnce(u64, u64, LaunchConfig)) {
        let batch = self.offsets.len() - 1;
        assert!(
            self.heads <= 65535 && batch <= 65535,
            "{what}: more than 65535 heads or sequences"
        );
        let grid = LaunchConfig {
            grid_dim: (
                self.max_len.div_ceil(ATTENTION_SOFTMAX_ROWS) as u32,
                self.heads as u32,
                batch as u32,
            ),
            block_dim: (32 * ATTENTION_SOFTMAX_ROWS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let probs_base = backend.address(Some(&self.probs_base));
        backend.with_offsets(self.offsets, |offsets| launch(offsets, probs_base, grid));
    }
}
