//! The kernels of `kernels/*.cu`, as PTX that `build.rs` compiled with nvcc
//! and that is embedded here, loaded into a context by the driver's JIT.
//!
//! Without `cfg(bertrt_cuda_kernels)` (no nvcc at build time) nothing is
//! embedded and [`Kernels::load`] reports [`CudaInitError::NoKernels`].

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};

use super::CudaInitError;

/// Whether this build embeds the kernels.
pub const BUILT: bool = cfg!(bertrt_cuda_kernels);

#[cfg(bertrt_cuda_kernels)]
mod ptx {
    /// One `kernels/<name>.cu`, compiled for each virtual architecture.
    pub struct Source {
        pub name: &'static str,
        pub compute_80: &'static str,
        pub compute_90: &'static str,
    }

    macro_rules! source {
        ($name:literal) => {
            Source {
                name: $name,
                compute_80: include_str!(concat!(env!("OUT_DIR"), "/", $name, ".compute_80.ptx")),
                compute_90: include_str!(concat!(env!("OUT_DIR"), "/", $name, ".compute_90.ptx")),
            }
        };
    }

    pub const SOURCES: [Source; 16] = [
        source!("attention"),
        source!("attention_train"),
        source!("cross_entropy"),
        source!("dropout"),
        source!("embedding"),
        source!("epilogue"),
        source!("epilogue_train"),
        source!("layernorm"),
        source!("layernorm_train"),
        source!("optimizer"),
        source!("pointwise"),
        source!("pointwise_train"),
        source!("pooling"),
        source!("reduce"),
        source!("scatter_train"),
        source!("softmax"),
    ];
}

/// The training kernels (issue 6) as `(file, function)`: fp32 / fp16 / bf16
/// storage instances where a kernel has them, fp32 arithmetic. Each file's opening comment gives the
/// algorithm and the launch geometry; `kernels/emu/check.cpp` holds every one
/// to a double-precision reference on the CPU.
#[cfg_attr(not(bertrt_cuda_kernels), allow(dead_code))]
pub(super) const TRAIN_KERNELS: &[(&str, &str)] = &[
    ("optimizer", "adamw_f32_f32"),
    ("optimizer", "adamw_f32_f16"),
    ("optimizer", "adamw_f32_bf16"),
    ("optimizer", "adamw_f16_f16"),
    ("optimizer", "adamw_bf16_bf16"),
    ("optimizer", "grad_sumsq_f32"),
    ("optimizer", "grad_sumsq_f16"),
    ("optimizer", "grad_sumsq_bf16"),
    ("optimizer", "unscale_f32"),
    ("optimizer", "unscale_f16"),
    ("optimizer", "unscale_bf16"),
    ("optimizer", "grad_norm_finish"),
    ("dropout", "dropout_f32"),
    ("dropout", "dropout_f16"),
    ("dropout", "dropout_bf16"),
    ("epilogue_train", "bias_gelu_forward_f32"),
    ("epilogue_train", "bias_gelu_forward_f16"),
    ("epilogue_train", "bias_gelu_forward_bf16"),
    ("epilogue_train", "bias_gelu_backward_f32"),
    ("epilogue_train", "bias_gelu_backward_f16"),
    ("epilogue_train", "bias_gelu_backward_bf16"),
    ("layernorm_train", "layer_norm_forward_f32"),
    ("layernorm_train", "layer_norm_forward_f16"),
    ("layernorm_train", "layer_norm_forward_bf16"),
    ("layernorm_train", "layer_norm_backward_f32"),
    ("layernorm_train", "layer_norm_backward_f16"),
    ("layernorm_train", "layer_norm_backward_bf16"),
    ("cross_entropy", "cross_entropy_f32"),
    ("cross_entropy", "cross_entropy_f16"),
    ("cross_entropy", "cross_entropy_bf16"),
    ("reduce", "column_sum_f32"),
    ("attention_train", "attention_softmax_train_f32"),
    ("attention_train", "attention_softmax_backward_f32"),
    ("scatter_train", "embedding_backward_f32"),
    ("scatter_train", "scatter_rows_f32"),
    ("scatter_train", "mean_pool_backward_f32"),
    ("pointwise_train", "gelu_forward_f32"),
    ("pointwise_train", "tanh_backward_f32"),
    ("pointwise_train", "add_f32"),
    ("pointwise_train", "scale_f32"),
    ("pointwise_train", "round_to_bf16"),
    ("pointwise_train", "round_to_f16"),
];

/// Every kernel function, loaded once per backend.
pub(super) struct Kernels {
    pub embedding: CudaFunction,
    pub layer_norm: CudaFunction,
    pub bias_act: CudaFunction,
    pub softmax_rows: CudaFunction,
    /// Attention for head_dim <= 32, <= 64 and <= 128.
    pub attention_d32: CudaFunction,
    pub attention_d64: CudaFunction,
    pub attention_d128: CudaFunction,
    pub mean_pool: CudaFunction,
    pub gather_rows: CudaFunction,
    pub tanh: CudaFunction,
    /// Every [`TRAIN_KERNELS`] function by name, loaded with the rest so a
    /// missing or unloadable kernel shows when the backend starts.
    pub train: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    /// Loads the PTX for `compute_capability` (compute_90 on sm_90 and newer,
    /// compute_80 on sm_80/sm_86/sm_89).
    #[cfg(bertrt_cuda_kernels)]
    pub fn load(
        ctx: &Arc<CudaContext>,
        compute_capability: (i32, i32),
    ) -> Result<Self, CudaInitError> {
        use cudarc::nvrtc::Ptx;

        let hopper = compute_capability.0 >= 9;
        let mut modules = HashMap::new();
        for source in &ptx::SOURCES {
            let text = if hopper {
                source.compute_90
            } else {
                source.compute_80
            };
            let module = ctx.load_module(Ptx::from_src(text)).map_err(|e| {
                CudaInitError::Driver(format!("loading kernels/{}.cu: {e}", source.name))
            })?;
            modules.insert(source.name, module);
        }
        let function = |file: &str, name: &str| {
            modules[file].load_function(name).map_err(|e| {
                CudaInitError::Driver(format!("kernel {name} in kernels/{file}.cu: {e}"))
            })
        };
        let train = TRAIN_KERNELS
            .iter()
            .map(|&(file, name)| Ok((name, function(file, name)?)))
            .collect::<Result<HashMap<_, _>, CudaInitError>>()?;
        Ok(Kernels {
            embedding: function("embedding", "embedding_f32")?,
            layer_norm: function("layernorm", "layer_norm_f32")?,
            bias_act: function("epilogue", "bias_act_f32")?,
            softmax_rows: function("softmax", "softmax_rows_f32")?,
            attention_d32: function("attention", "attention_d32_f32")?,
            attention_d64: function("attention", "attention_d64_f32")?,
            attention_d128: function("attention", "attention_d128_f32")?,
            mean_pool: function("pooling", "mean_pool_f32")?,
            gather_rows: function("pooling", "gather_rows_f32")?,
            tanh: function("pointwise", "tanh_f32")?,
            train,
        })
    }

    #[cfg(not(bertrt_cuda_kernels))]
    pub fn load(_: &Arc<CudaContext>, _: (i32, i32)) -> Result<Self, CudaInitError> {
        Err(CudaInitError::NoKernels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every registered training kernel is an entry of its file's PTX for
    /// both architectures (no GPU needed: this reads the embedded text).
    #[cfg(bertrt_cuda_kernels)]
    #[test]
    fn train_kernels_are_in_the_ptx() {
        for &(file, name) in TRAIN_KERNELS {
            let source = ptx::SOURCES
                .iter()
                .find(|s| s.name == file)
                .unwrap_or_else(|| panic!("kernels/{file}.cu is not in SOURCES"));
            let entry = format!(".entry {name}(");
            assert!(
                source.compute_80.contains(&entry),
                "{name} in {file} compute_80"
            );
            assert!(
                source.compute_90.contains(&entry),
                "{name} in {file} compute_90"
            );
        }
    }

    #[test]
    fn train_kernel_names_are_unique() {
        let mut names: Vec<_> = TRAIN_KERNELS.iter().map(|&(_, name)| name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TRAIN_KERNELS.len());
    }
}
