//! The CUDA backend: the [`Backend`] ops on one NVIDIA GPU, through cudarc.
//!
//! Element-wise, normalisation, attention and pooling ops are our kernels
//! (`kernels/*.cu`, compiled to PTX by `build.rs` and embedded, see
//! `kernels`); dense layers are cuBLAS `sgemm` followed by a bias (+GELU)
//! epilogue kernel. Everything is fp32 (cuBLAS in its default, non-TF32 math
//! mode), so results stay within float rounding of the CPU reference.
//!
//! The CUDA driver and cuBLAS are loaded at run time (cudarc's
//! `dynamic-loading`): building needs no CUDA, only `nvcc` for the kernels.
//! [`CudaBackend::new`] says why it cannot start: built without kernels, no
//! driver or device, a GPU older than sm_80, or no cuBLAS.
//!
//! All work is queued on one stream owned by the backend, in call order;
//! only [`Backend::to_host`] (and [`CudaBackend::synchronize`]) waits for it.
//! The trait's ops return nothing, so a CUDA error inside one panics with the
//! op's name; an asynchronous kernel fault surfaces at the next `to_host`.
//! Host-side inputs of the ops (token ids, `offsets`, row indices) are
//! copied to the device on each call, except `offsets`, which is cached:
//! a forward pass passes the same offsets to every layer's attention.

mod kernels;
mod train;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg,
};

use crate::backend::{Activation, Backend, Precision};
use crate::checkpoint::HostTensor;
use kernels::Kernels;

/// Why [`CudaBackend::new`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum CudaInitError {
    #[error("built without CUDA kernels (nvcc not found at build time)")]
    NoKernels,
    #[error("no CUDA device found ({0})")]
    NoDevice(String),
    #[error(
        "CUDA device {ordinal} ({name}) has compute capability {major}.{minor}; \
         bertrt's kernels need 8.0 (sm_80) or newer"
    )]
    UnsupportedDevice {
        ordinal: usize,
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("cuBLAS could not be loaded ({0}); add its directory to LD_LIBRARY_PATH")]
    NoCublas(String),
    #[error("CUDA error while starting the backend: {0}")]
    Driver(String),
}

/// A device buffer of `f32` with a length and a capacity, like a `Vec`:
/// the activations ([`Backend::Tensor`]) and the read-only parameters
/// ([`Backend::Param`]) of the CUDA backend.
pub struct CudaTensor {
    /// `None` until the first non-empty allocation.
    buf: Option<CudaSlice<f32>>,
    len: usize,
}

impl CudaTensor {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// The underlying allocation (`capacity()` elements, of which the first
    /// `len()` are the tensor), for code that launches its own kernels.
    pub fn buffer(&self) -> Option<&CudaSlice<f32>> {
        self.buf.as_ref()
    }
}

/// A linear layer on the device: PyTorch's `[out_features, in_features]`
/// weight, row-major, as cuBLAS reads it transposed, and the bias.
pub struct CudaLinear {
    weight: CudaTensor,
    bias: CudaTensor,
    out_features: usize,
    in_features: usize,
}

impl CudaLinear {
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }
}

/// The `offsets` last copied to the device, reused while they do not change.
struct OffsetsCache {
    host: Vec<usize>,
    device: CudaSlice<i32>,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    offsets: Mutex<Option<OffsetsCache>>,
    /// What training's matrix products multiply in (cuBLAS compute type).
    precision: Precision,
    /// Buffers training's ops reuse across calls.
    train_scratch: Mutex<train::Scratch>,
    /// Per-op (calls, seconds) when profiling ([`CudaBackend::with_profiling`]).
    profile: Option<Mutex<HashMap<&'static str, (u64, f64)>>>,
}

impl CudaBackend {
    /// Opens GPU `ordinal` (0 for the first), loads the kernels and cuBLAS.
    pub fn new(ordinal: usize) -> Result<Self, CudaInitError> {
        if !kernels::BUILT {
            return Err(CudaInitError::NoKernels);
        }
        // SAFETY: only tries to dlopen the driver library (cudarc would
        // panic on first use if it were missing).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaInitError::NoDevice(
                "the CUDA driver library libcuda.so was not found".into(),
            ));
        }
        let no_device = |e: DriverError| CudaInitError::NoDevice(driver_error(&e));
        let count = CudaContext::device_count().map_err(no_device)?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaInitError::NoDevice(format!(
                "the driver reports {count} device(s); asked for device {ordinal}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(no_device)?;
        let driver = |e: DriverError| CudaInitError::Driver(driver_error(&e));
        let name = ctx.name().map_err(driver)?;
        let compute_capability = ctx.compute_capability().map_err(driver)?;
        let (major, minor) = compute_capability;
        if major < 8 {
            return Err(CudaInitError::UnsupportedDevice {
                ordinal,
                name,
                major,
                minor,
            });
        }
        // SAFETY: set before any buffer exists; the backend queues all its
        // work on one stream, so cudarc's per-buffer events (for
        // cross-stream ordering) are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver)?;
        let kernels = Kernels::load(&ctx, compute_capability)?;
        // SAFETY: as for the driver library above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaInitError::NoCublas(
                "libcublas.so was not found on the library path".into(),
            ));
        }
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| CudaInitError::NoCublas(e.to_string()))?;
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            kernels,
            ordinal,
            name,
            compute_capability,
            offsets: Mutex::new(None),
            precision: Precision::Fp32,
            train_scratch: Mutex::default(),
            profile: None,
        })
    }

    /// Training's matrix products multiply in `precision`: fp32 (cuBLAS's
    /// default math, no TF32), or bf16 / fp16 operands on the tensor cores
    /// with f32 sums; storage, attention and LayerNorm stay f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Times every kernel and GEMM by name, waiting for the GPU before and
    /// after each: a development tool for finding where a step's time
    /// goes (the waits slow the whole run down), read with
    /// [`CudaBackend::profile`].
    pub fn with_profiling(mut self) -> Self {
        self.profile = Some(Mutex::default());
        self
    }

    /// `(op, calls, seconds)` recorded since profiling began, the most
    /// expensive first; empty when not profiling.
    pub fn profile(&self) -> Vec<(&'static str, u64, f64)> {
        let Some(profile) = &self.profile else {
            return Vec::new();
        };
        let profile = profile.lock().unwrap_or_else(|e| e.into_inner());
        let mut ops: Vec<_> = profile
            .iter()
            .map(|(&op, &(calls, secs))| (op, calls, secs))
            .collect();
        ops.sort_by(|a, b| b.2.total_cmp(&a.2));
        ops
    }

    /// Runs `queue` (which queues GPU work), timed under `op` when
    /// profiling.
    fn profiled<R>(&self, op: &'static str, queue: impl FnOnce() -> R) -> R {
        let Some(profile) = &self.profile else {
            return queue();
        };
        check("stream synchronize", self.stream.synchronize());
        let started = std::time::Instant::now();
        let result = queue();
        check(
            "stream synchronize (a kernel failed?)",
            self.stream.synchronize(),
        );
        let secs = started.elapsed().as_secs_f64();
        let mut profile = profile.lock().unwrap_or_else(|e| e.into_inner());
        let entry = profile.entry(op).or_default();
        entry.0 += 1;
        entry.1 += secs;
        result
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work; reports an asynchronous kernel fault.
    pub fn synchronize(&self) -> Result<(), DriverError> {
        self.stream.synchronize()
    }

    /// A tensor holding a copy of `data`.
    pub fn upload(&self, data: &[f32]) -> CudaTensor {
        let mut tensor = self.new_tensor();
        self.upload_into(&mut tensor, data);
        tensor
    }

    /// Resizes `tensor` to `data.len()` and copies `data` into it.
    pub fn upload_into(&self, tensor: &mut CudaTensor, data: &[f32]) {
        self.reserve(tensor, data.len());
        tensor.len = data.len();
        if let Some(buf) = tensor.buf.as_mut() {
            let mut dst = buf.slice_mut(0..data.len());
            check("copy to device", self.stream.memcpy_htod(data, &mut dst));
        }
    }

    /// Makes the capacity at least `len`, keeping the first `tensor.len`
    /// elements; new elements are zero.
    fn reserve(&self, tensor: &mut CudaTensor, len: usize) {
        if len <= tensor.capacity() {
            return;
        }
        let mut grown = check("allocation", self.stream.alloc_zeros::<f32>(len));
        if let (Some(old), true) = (tensor.buf.as_ref(), tensor.len > 0) {
            let mut dst = grown.slice_mut(0..tensor.len);
            check(
                "device copy",
                self.stream.memcpy_dtod(&old.slice(0..tensor.len), &mut dst),
            );
        }
        tensor.buf = Some(grown);
    }

    fn copy_to_device<T: DeviceRepr>(&self, data: &[T]) -> CudaSlice<T> {
        check("copy to device", self.stream.clone_htod(data))
    }

    /// The raw device address of a buffer (0 for none), for kernel arguments.
    fn address<T>(&self, buf: Option<&CudaSlice<T>>) -> u64 {
        buf.map_or(0, |b| b.device_ptr(&self.stream).0)
    }

    fn tensor_address(&self, tensor: &CudaTensor) -> u64 {
        self.address(tensor.buf.as_ref())
    }

    /// Runs `f` with `offsets` on the device (as `i32`), copying them only
    /// when they differ from the last call's. The lock is held while `f`
    /// queues its kernel, so another thread cannot replace the buffer first
    /// (a replaced buffer is freed in stream order, after that kernel).
    fn with_offsets<R>(&self, offsets: &[usize], f: impl FnOnce(u64) -> R) -> R {
        let mut cache = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().is_none_or(|c| c.host != offsets) {
            let device: Vec<i32> = offsets
                .iter()
                .map(|&o| i32::try_from(o).expect("token offset exceeds i32"))
                .collect();
            *cache = Some(OffsetsCache {
                host: offsets.to_vec(),
                device: self.copy_to_device(&device),
            });
        }
        let device = &cache.as_ref().unwrap().device;
        f(self.address(Some(device)))
    }

    /// `out[rows, n] = activation(out + bias)`, the epilogue after a GEMM.
    fn add_bias(
        &self,
        out: &mut CudaTensor,
        bias: &CudaTensor,
        rows: usize,
        n: usize,
        activation: Activation,
    ) {
        assert!(bias.len >= n, "bias too small");
        let act = match activation {
            Activation::Identity => 0i32,
            Activation::Gelu => 1,
        };
        let threads = row_threads(n);
        self.launch(
            "bias + activation",
            &self.kernels.bias_act,
            LaunchConfig {
                grid_dim: (
                    n.div_ceil(threads as usize) as u32,
                    rows.min(65535) as u32,
                    1,
                ),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                &self.tensor_address(out),
                &self.tensor_address(bias),
                &int("rows", rows),
                &int("out_features", n),
                &act,
            ],
        );
    }

    fn launch(
        &self,
        what: &'static str,
        func: &CudaFunction,
        cfg: LaunchConfig,
        args: &[&dyn Arg],
    ) {
        let mut builder = self.stream.launch_builder(func);
        for arg in args {
            arg.push(&mut builder);
        }
        // SAFETY: each caller passes the argument list of its kernel's
        // signature and checks, before launching, that every buffer holds
        // the elements the kernel indexes.
        self.profiled(what, || check(what, unsafe { builder.launch(cfg) }));
    }
}

/// A kernel argument: a device address (`u64`) or a scalar.
trait Arg {
    fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! impl_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>) {
                builder.arg(self);
            }
        }
    )*};
}
impl_arg!(u64, i32, f32);

/// "CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected".
fn driver_error(e: &DriverError) -> String {
    match e.error_string() {
        Ok(text) => format!("{:?}: {}", e.0, text.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

fn check<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("CUDA backend: {what} failed: {e}"))
}

fn int(what: &str, v: usize) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("CUDA backend: {what} = {v} exceeds i32"))
}

/// Threads for a block that walks a row of `cols`: a multiple of 32, at
/// most 256.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// Grid-stride launches over `n` elements: 256 threads, at most 4096 blocks.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// cuBLAS's operation for an operand read as stored or transposed.
fn cublas_op(transposed: bool) -> cublasOperation_t {
    if transposed {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

fn rows_config(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (int("rows", rows) as u32, 1, 1),
        block_dim: (row_threads(cols), 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Param = CudaTensor;
    type Linear = CudaLinear;

    fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!(
            "cuda ({}, sm_{major}{minor}, device {})",
            self.name, self.ordinal
        )
    }

    fn param(&self, data: HostTensor) -> CudaTensor {
        self.upload(&data)
    }

    fn prepare_linear(
        &self,
        weight: &[f32],
        bias: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> CudaLinear {
        assert_eq!(weight.len(), out_features * in_features, "weight shape");
        assert_eq!(bias.len(), out_features, "bias shape");
        CudaLinear {
            weight: self.upload(weight),
            bias: self.upload(bias),
            out_features,
            in_features,
        }
    }

    fn new_tensor(&self) -> CudaTensor {
        CudaTensor { buf: None, len: 0 }
    }

    /// As `Vec::resize(len, 0.0)`: keeps the first `min(len, old len)`
    /// elements and zeroes the rest; never shrinks the allocation.
    fn resize(&self, tensor: &mut CudaTensor, len: usize) {
        if len > tensor.capacity() {
            self.reserve(tensor, len);
        } else if len > tensor.len {
            let buf = tensor.buf.as_mut().expect("capacity implies a buffer");
            let mut tail = buf.slice_mut(tensor.len..len);
            check("memset", self.stream.memset_zeros(&mut tail));
        }
        tensor.len = len;
    }

    fn to_host(&self, tensor: &CudaTensor) -> Vec<f32> {
        let mut host = vec![0.0; tensor.len];
        if let Some(buf) = tensor.buf.as_ref().filter(|_| tensor.len > 0) {
            check(
                "copy to host",
                self.stream
                    .memcpy_dtoh(&buf.slice(0..tensor.len), &mut host),
            );
        }
        check(
            "stream synchronize (a kernel failed?)",
            self.stream.synchronize(),
        );
        host
    }

    fn embedding(
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
        let batch = offsets.len().saturating_sub(1);
        if batch == 0 || hidden == 0 {
            return;
        }
        let (first, end) = (offsets[0], offsets[batch]);
        assert!(
            ids.len() >= end && type_ids.len() >= end,
            "embedding: ids shorter than offsets"
        );
        assert!(out.len >= end * hidden, "embedding: output too small");
        let max_len = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        assert!(
            position.len >= max_len * hidden,
            "embedding: sequence longer than the position table"
        );
        // Indices are trusted, as on the CPU (the model checks them).
        debug_assert!(ids[first..end]
            .iter()
            .all(|&i| (i as usize + 1) * hidden <= word.len));
        debug_assert!(type_ids[first..end]
            .iter()
            .all(|&i| (i as usize + 1) * hidden <= token_type.len));
        if end == first {
            return;
        }
        let ids = self.copy_to_device(&ids[..end]);
        let type_ids = self.copy_to_device(&type_ids[..end]);
        self.with_offsets(offsets, |offsets| {
            self.launch(
                "embedding",
                &self.kernels.embedding,
                rows_config(end - first, hidden),
                &[
                    &self.tensor_address(out),
                    &self.address(Some(&ids)),
                    &self.address(Some(&type_ids)),
                    &offsets,
                    &int("batch", batch),
                    &self.tensor_address(word),
                    &self.tensor_address(position),
                    &self.tensor_address(token_type),
                    &int("hidden", hidden),
                ],
            )
        });
    }

    fn matmul(
        &self,
        out: &mut CudaTensor,
        input: &CudaTensor,
        rows: usize,
        layer: &CudaLinear,
        activation: Activation,
    ) {
        let (n, k) = (layer.out_features, layer.in_features);
        assert!(input.len >= rows * k, "matmul: input too small");
        assert!(out.len >= rows * n, "matmul: output too small");
        if rows == 0 || n == 0 {
            return;
        }
        // Row-major out[rows, n] = input[rows, k] · W[n, k]ᵀ is, read
        // column-major, outᶜ[n, rows] = Wᶜ[k, n]ᵀ · inputᶜ[k, rows].
        let cfg = GemmConfig {
            transa: cublas_op(true),
            transb: cublas_op(false),
            m: int("out_features", n),
            n: int("rows", rows),
            k: int("in_features", k),
            alpha: 1.0f32,
            lda: int("in_features", k).max(1),
            ldb: int("in_features", k).max(1),
            beta: 0.0f32,
            ldc: int("out_features", n),
        };
        check("bind context", self.ctx.bind_to_thread());
        let out_buf = out.buf.as_mut().expect("non-empty output");
        let mut out_view = out_buf.slice_mut(0..rows * n);
        if k == 0 {
            check("memset", self.stream.memset_zeros(&mut out_view));
        } else {
            let weight = layer.weight.buf.as_ref().expect("non-empty weight");
            let input_view = input
                .buf
                .as_ref()
                .expect("non-empty input")
                .slice(0..rows * k);
            // SAFETY: the views hold exactly m·k, k·n and m·n elements.
            check("cuBLAS sgemm", unsafe {
                self.blas.gemm(cfg, weight, &input_view, &mut out_view)
            });
        }
        self.add_bias(out, &layer.bias, rows, n, activation);
    }

    fn layer_norm(
        &self,
        x: &mut CudaTensor,
        residual: Option<&CudaTensor>,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        cols: usize,
    ) {
        assert!(cols > 0, "layer_norm: cols is 0");
        let rows = x.len / cols;
        assert!(
            gamma.len >= cols && beta.len >= cols,
            "layer_norm: gamma/beta too small"
        );
        if let Some(r) = residual {
            assert!(r.len >= rows * cols, "layer_norm: residual too small");
        }
        if rows == 0 {
            return;
        }
        self.launch(
            "layer_norm",
            &self.kernels.layer_norm,
            rows_config(rows, cols),
            &[
                &self.tensor_address(x),
                &residual.map_or(0, |r| self.tensor_address(r)),
                &self.tensor_address(gamma),
                &self.tensor_address(beta),
                &eps,
                &int("cols", cols),
            ],
        );
    }

    fn attention(
        &self,
        out: &mut CudaTensor,
        qkv: &CudaTensor,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
    ) {
        let batch = offsets.len().saturating_sub(1);
        if batch == 0 || heads == 0 || head_dim == 0 {
            return;
        }
        let hidden = heads * head_dim;
        let tokens = offsets[batch];
        assert!(qkv.len >= tokens * 3 * hidden, "attention: qkv too small");
        assert!(out.len >= tokens * hidden, "attention: output too small");
        let max_len = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        if max_len == 0 {
            return;
        }
        // Must match BQ = 128 / T in kernels/attention.cu.
        let (func, queries_per_block) = match head_dim {
            1..=32 => (&self.kernels.attention_d32, 128),
            33..=64 => (&self.kernels.attention_d64, 64),
            65..=128 => (&self.kernels.attention_d128, 32),
            _ => panic!("CUDA backend: attention with head_dim {head_dim} > 128 is not supported"),
        };
        let query_blocks = max_len.div_ceil(queries_per_block);
        let cfg = LaunchConfig {
            grid_dim: (
                int("attention blocks", batch * query_blocks) as u32,
                int("heads", heads).min(65535) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        assert!(heads <= 65535, "attention: more than 65535 heads");
        let scale = 1.0 / (head_dim as f32).sqrt();
        self.with_offsets(offsets, |offsets| {
            self.launch(
                "attention",
                func,
                cfg,
                &[
                    &self.tensor_address(out),
                    &self.tensor_address(qkv),
                    &offsets,
                    &int("query blocks", query_blocks),
                    &int("heads", heads),
                    &int("head_dim", head_dim),
                    &scale,
                ],
            )
        });
    }

    fn gather_rows(&self, out: &mut CudaTensor, input: &CudaTensor, rows: &[usize], cols: usize) {
        assert!(
            out.len >= rows.len() * cols,
            "gather_rows: output too small"
        );
        assert!(
            rows.iter().all(|&r| (r + 1) * cols <= input.len),
            "gather_rows: row index out of range"
        );
        if rows.is_empty() || cols == 0 {
            return;
        }
        let indices: Vec<u64> = rows.iter().map(|&r| r as u64).collect();
        let indices = self.copy_to_device(&indices);
        self.launch(
            "gather_rows",
            &self.kernels.gather_rows,
            rows_config(rows.len(), cols),
            &[
                &self.tensor_address(out),
                &self.tensor_address(input),
                &self.address(Some(&indices)),
                &int("cols", cols),
            ],
        );
    }

    fn mean_pool(&self, out: &mut CudaTensor, input: &CudaTensor, offsets: &[usize], cols: usize) {
        let batch = offsets.len().saturating_sub(1);
        if batch == 0 || cols == 0 {
            return;
        }
        assert!(out.len >= batch * cols, "mean_pool: output too small");
        assert!(
            input.len >= offsets[batch] * cols,
            "mean_pool: input too small"
        );
        assert!(batch <= 65535, "mean_pool: more than 65535 sequences");
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(128) as u32, batch as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.with_offsets(offsets, |offsets| {
            self.launch(
                "mean_pool",
                &self.kernels.mean_pool,
                cfg,
                &[
                    &self.tensor_address(out),
                    &self.tensor_address(input),
                    &offsets,
                    &int("cols", cols),
                ],
            )
        });
    }

    fn tanh(&self, x: &mut CudaTensor) {
        if x.len == 0 {
            return;
        }
        self.launch(
            "tanh",
            &self.kernels.tanh,
            elementwise(x.len),
            &[&self.tensor_address(x), &(x.len as u64)],
        );
    }

    fn softmax(&self, x: &mut CudaTensor, cols: usize) {
        assert!(cols > 0, "softmax: cols is 0");
        let rows = x.len / cols;
        if rows == 0 {
            return;
        }
        self.launch(
            "softmax",
            &self.kernels.softmax_rows,
            rows_config(rows, cols),
            &[&self.tensor_address(x), &int("cols", cols)],
        );
    }
}
