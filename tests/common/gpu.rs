//! CUDA test helpers: starting the backend or printing why a test is
//! skipped, and random BERT checkpoints of any shape built in code.

use std::io::Write;
use std::sync::OnceLock;

use bertrt::backend::cuda::{CudaBackend, CudaInitError};
use bertrt::model::TokenBatch;
use safetensors::Dtype;

use super::Rng;

/// The skip line for an init error that means "no GPU here", or `None`
/// for an error that is a real failure.
pub fn skip_reason(err: &CudaInitError) -> Option<&'static str> {
    match err {
        CudaInitError::NoKernels => Some("skipped: built without CUDA kernels"),
        CudaInitError::NoDevice(_) => Some("skipped: no CUDA device"),
        _ => None,
    }
}

/// Prints the skip line for `err`, or panics where skipping is not allowed:
/// an error other than "no kernels" / "no device", or any error under
/// `BERTRT_REQUIRE_CUDA=1`.
pub fn skip(err: &CudaInitError) {
    match skip_reason(err) {
        Some(_) if std::env::var_os("BERTRT_REQUIRE_CUDA").is_some_and(|v| v == "1") => {
            panic!("BERTRT_REQUIRE_CUDA=1 but the CUDA backend cannot start: {err}")
        }
        // Straight to stderr, past the test harness's capture, so that the
        // skip shows in a plain `cargo test`.
        Some(line) => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        None => panic!("the CUDA backend failed to start: {err}"),
    }
}

/// A backend of its own (for a model, which owns its backend).
pub fn start() -> Option<CudaBackend> {
    CudaBackend::new(0).map_err(|err| skip(&err)).ok()
}

/// One backend shared by the op tests (it is `Sync`; its ops queue on one
/// stream), so the kernels are JIT-compiled once.
pub fn cuda() -> Option<&'static CudaBackend> {
    static BACKEND: OnceLock<Result<CudaBackend, CudaInitError>> = OnceLock::new();
    BACKEND
        .get_or_init(|| CudaBackend::new(0))
        .as_ref()
        .map_err(skip)
        .ok()
}

/// A random BERT with Hugging Face tensor names, written to `dir`.
pub struct RandomBert {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub positions: usize,
}

impl RandomBert {
    pub fn write(&self, dir: &std::path::Path, seed: u64) {
        let mut rng = Rng::new(seed);
        let (h, i) = (self.hidden, self.intermediate);
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let len = shape.iter().product();
            let data = (0..len).map(|_| offset + rng.next_f32(scale)).collect();
            tensors.push((name, shape, data));
        };
        add(
            "embeddings.word_embeddings.weight".into(),
            vec![self.vocab, h],
            0.5,
            0.0,
        );
        add(
            "embeddings.position_embeddings.weight".into(),
            vec![self.positions, h],
            0.5,
            0.0,
        );
        add(
            "embeddings.token_type_embeddings.weight".into(),
            vec![2, h],
            0.5,
            0.0,
        );
        let norm = |add: &mut dyn FnMut(String, Vec<usize>, f32, f32), prefix: &str| {
            add(format!("{prefix}.weight"), vec![h], 0.1, 1.0);
            add(format!("{prefix}.bias"), vec![h], 0.1, 0.0);
        };
        norm(&mut add, "embeddings.LayerNorm");
        // Weights scaled by 1/sqrt(fan_in) keep activations O(1) at any width.
        let linear = |add: &mut dyn FnMut(String, Vec<usize>, f32, f32),
                      name: String,
                      out: usize,
                      inp: usize| {
            add(
                format!("{name}.weight"),
                vec![out, inp],
                1.7 / (inp as f32).sqrt(),
                0.0,
            );
            add(format!("{name}.bias"), vec![out], 0.1, 0.0);
        };
        for l in 0..self.layers {
            let pre = format!("encoder.layer.{l}");
            for part in ["query", "key", "value"] {
                linear(&mut add, format!("{pre}.attention.self.{part}"), h, h);
            }
            linear(&mut add, format!("{pre}.attention.output.dense"), h, h);
            norm(&mut add, &format!("{pre}.attention.output.LayerNorm"));
            linear(&mut add, format!("{pre}.intermediate.dense"), i, h);
            linear(&mut add, format!("{pre}.output.dense"), h, i);
            norm(&mut add, &format!("{pre}.output.LayerNorm"));
        }
        linear(&mut add, "pooler.dense".into(), h, h);
        let config = serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab,
            "hidden_size": h,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": i,
            "hidden_act": "gelu",
            "max_position_embeddings": self.positions,
            "type_vocab_size": 2,
            "layer_norm_eps": 1e-12,
            "position_embedding_type": "absolute",
            "pad_token_id": 0
        });
        super::write_tiny_model(
            dir,
            &config,
            &super::safetensors_bytes(&tensors, Dtype::F32),
        );
    }
}

pub fn random_batch(lengths: &[usize], vocab: usize, seed: u64) -> TokenBatch {
    let mut rng = Rng::new(seed);
    let mut batch = TokenBatch {
        offsets: vec![0],
        ..Default::default()
    };
    for &len in lengths {
        for t in 0..len {
            let r = (rng.next_f32(0.5) + 0.5) * vocab as f32;
            batch.ids.push((r as usize).min(vocab - 1) as u32);
            batch.type_ids.push((t >= len / 2) as u32);
        }
        batch.offsets.push(batch.ids.len());
    }
    batch
}
