//! Shared test helpers: tiny random BERT checkpoints written in code, the
//! fixture readers, and comparisons.
#![allow(dead_code)] // each test binary uses a different subset

pub mod gpu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The sentences of `forward.json`, as JSON objects (text, n_tokens, tokens).
pub fn fixture_sentences() -> Vec<serde_json::Value> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("forward.json")).unwrap()).unwrap();
    json["sentences"].as_array().unwrap().clone()
}

/// The all-MiniLM-L6-v2 directory that `scripts/fetch-assets.sh` unpacks.
pub fn minilm_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-assets.sh first",
        dir.display()
    );
    dir
}

/// Deterministic pseudo-random numbers in [-scale, scale].
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_f32(&mut self, scale: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }

    pub fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.next_f32(scale)).collect()
    }
}

pub const TINY_VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "ran",
    "fast", "slow", "a", "big", "small", "##s", "##ing", ".",
];

/// A tiny BERT: 2 layers, hidden 16, 4 heads, intermediate 32.
pub fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": TINY_VOCAB.len(),
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 32,
        "hidden_act": "gelu",
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "position_embedding_type": "absolute",
        "pad_token_id": 0
    })
}

/// Random tensors, with Hugging Face names, for [`tiny_config`].
pub fn tiny_tensors(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    let (v, h, i, p) = (TINY_VOCAB.len(), 16, 32, 64);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32| {
        let len = shape.iter().product();
        tensors.push((name, shape, rng.vec(len, scale)));
    };
    add("embeddings.word_embeddings.weight".into(), vec![v, h], 0.5);
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![p, h],
        0.5,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, h],
        0.5,
    );
    let add_norm = |tensors: &mut Vec<_>, prefix: String, rng: &mut Rng| {
        tensors.push((
            format!("{prefix}.weight"),
            vec![h],
            (0..h).map(|_| 1.0 + rng.next_f32(0.1)).collect::<Vec<_>>(),
        ));
        tensors.push((format!("{prefix}.bias"), vec![h], rng.vec(h, 0.1)));
    };
    add_norm(&mut tensors, "embeddings.LayerNorm".into(), &mut rng);
    for l in 0..2 {
        let pre = format!("encoder.layer.{l}");
        let mut linear = |tensors: &mut Vec<_>, name: String, out: usize, inp: usize| {
            tensors.push((
                format!("{name}.weight"),
                vec![out, inp],
                rng.vec(out * inp, 0.3),
            ));
            tensors.push((format!("{name}.bias"), vec![out], rng.vec(out, 0.1)));
        };
        for part in ["query", "key", "value"] {
            linear(&mut tensors, format!("{pre}.attention.self.{part}"), h, h);
        }
        linear(&mut tensors, format!("{pre}.attention.output.dense"), h, h);
        linear(&mut tensors, format!("{pre}.intermediate.dense"), i, h);
        linear(&mut tensors, format!("{pre}.output.dense"), h, i);
        let mut rng2 = Rng::new(seed + 100 + l as u64);
        add_norm(
            &mut tensors,
            format!("{pre}.attention.output.LayerNorm"),
            &mut rng2,
        );
        add_norm(&mut tensors, format!("{pre}.output.LayerNorm"), &mut rng2);
    }
    let mut rng3 = Rng::new(seed + 7);
    tensors.push((
        "pooler.dense.weight".into(),
        vec![h, h],
        rng3.vec(h * h, 0.3),
    ));
    tensors.push(("pooler.dense.bias".into(), vec![h], rng3.vec(h, 0.1)));
    tensors
}

/// Serialises `tensors` as safetensors in `dtype` (F32, F16 or BF16).
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) -> Vec<u8> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let bytes = match dtype {
                Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => data
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => data
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                other => panic!("unsupported test dtype {other:?}"),
            };
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Writes a complete tiny model directory (config, weights, vocab.txt).
pub fn write_tiny_model(dir: &Path, config: &serde_json::Value, weights: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    std::fs::write(dir.join("vocab.txt"), TINY_VOCAB.join("\n") + "\n").unwrap();
}

/// Tensors of a fixture file, as f32 (ids widened from i64).
pub struct Fixture {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data: Vec<f32> = match view.dtype() {
                    Dtype::F32 => view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    Dtype::I64 => view
                        .data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                        .collect(),
                    other => panic!("unexpected fixture dtype {other:?}"),
                };
                (name, (view.shape().to_vec(), data))
            })
            .collect();
        Fixture { tensors }
    }

    pub fn get(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no {name}"))
    }

    pub fn try_get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(|(_, data)| data.as_slice())
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.get(name).1.iter().map(|&v| v as u32).collect()
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Compares `analytic` with central differences of `loss` at every element
/// of `x` (or a sample of `max_checks` of them): relative L2 error <= 1e-2
/// (f32 arithmetic, step 1e-2; gradient norms floored at 1e-3 per element).
pub fn check_gradient(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    max_checks: usize,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}");
    let step = (x.len() / max_checks).max(1);
    let eps = 1e-2f32;
    let (mut diff2, mut norm2, mut count) = (0.0f64, 0.0f64, 0.0f64);
    let mut probe = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        probe[i] = x[i] + eps;
        let up = loss(&probe);
        probe[i] = x[i] - eps;
        let down = loss(&probe);
        probe[i] = x[i];
        let numeric = (up - down) / (2.0 * eps as f64);
        diff2 += (numeric - analytic[i] as f64).powi(2);
        norm2 += numeric.powi(2).max((analytic[i] as f64).powi(2));
        count += 1.0;
    }
    // Floor: gradients that are zero in exact arithmetic (the attention key
    // bias: softmax is shift-invariant) are compared in absolute terms.
    let relative = (diff2 / norm2.max(1e-6 * count)).sqrt();
    assert!(relative <= 1e-2, "{name}: relative error {relative:e}");
}

/// `Σ out ⊙ r`: a scalar whose gradient with respect to `out` is `r`.
pub fn dot(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// LoRA of rank `rank` (alpha 3) on every encoder linear.
pub fn lora_on_every_linear(rank: usize) -> bertrt::lora::LoraSpec {
    use bertrt::lora::{LoraSpec, LoraTarget};
    LoraSpec {
        rank,
        alpha: 3.0,
        targets: vec![
            LoraTarget::Query,
            LoraTarget::Key,
            LoraTarget::Value,
            LoraTarget::Dense,
            LoraTarget::Intermediate,
            LoraTarget::Output,
        ],
    }
}
