//! The kernels of `kernels/*.cu`, as PTX that `build.rs` compiled with nvcc
//! and that is embedded here, loaded into a context by the driver's JIT.
//!
//! Without `cfg(bertrt_cuda_kernels)` (no nvcc at build time) nothing is
//! embedded and [`Kernels::load`] reports [`CudaInitError::NoKernels`].

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

    pub const SOURCES: [Source; 7] = [
        source!("attention"),
        source!("embedding"),
        source!("epilogue"),
        source!("layernorm"),
        source!("pointwise"),
        source!("pooling"),
        source!("softmax"),
    ];
}

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
}

impl Kernels {
    /// Loads the PTX for `compute_capability` (compute_90 on sm_90 and newer,
    /// compute_80 on sm_80/sm_86/sm_89).
    #[cfg(bertrt_cuda_kernels)]
    pub fn load(
        ctx: &Arc<CudaContext>,
        compute_capability: (i32, i32),
    ) -> Result<Self, CudaInitError> {
        use std::collections::HashMap;

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
        })
    }

    #[cfg(not(bertrt_cuda_kernels))]
    pub fn load(_: &Arc<CudaContext>, _: (i32, i32)) -> Result<Self, CudaInitError> {
        Err(CudaInitError::NoKernels)
    }
}
