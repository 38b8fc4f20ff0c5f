//! The CUDA backend against the CPU: every op against `ReferenceBackend` on
//! random inputs (odd shapes, length-1 and empty sequences, several K/V
//! tiles), whole encoders with random weights built in code against the CPU
//! backend, and all-MiniLM-L6-v2 against the PyTorch fixture when the model
//! is on disk.
//!
//! Without a GPU (or a build without kernels) every test prints
//! "skipped: no CUDA device" (or "skipped: built without CUDA kernels") to
//! stderr and returns. With `BERTRT_REQUIRE_CUDA=1` (as
//! `scripts/gpu-check.sh` sets) a skip is a failure instead, so a broken
//! device setup cannot pass silently.

mod common;

use std::io::Write;
use std::path::PathBuf;

use bertrt::backend::cpu::{CpuBackend, ReferenceBackend};
use bertrt::backend::cuda::{CudaBackend, CudaInitError, CudaTensor};
use bertrt::backend::{Activation, Backend};
use bertrt::checkpoint::HostTensor;
use bertrt::model::{BertModel, ModelFiles, Pooling, TokenBatch, Workspace};
use bertrt::tokenize::BertTokenizer;
use common::gpu::{cuda, random_batch, skip_reason, start, RandomBert};
use common::{max_abs_diff, Rng};
use safetensors::Dtype;

/// Lengths 1, 7, 0 (empty), 33, 130 and 300: a single token, odd lengths,
/// several attention query blocks and several K/V tiles for every head size.
const OFFSETS: [usize; 7] = [0, 1, 8, 8, 41, 171, 471];
const TOKENS: usize = 471;

fn upload(be: &CudaBackend, data: &[f32]) -> CudaTensor {
    be.upload(data)
}

/// A device buffer filled with NaN, so that an element a kernel forgets to
/// write fails the comparison.
fn poisoned(be: &CudaBackend, len: usize) -> CudaTensor {
    be.upload(&vec![f32::NAN; len])
}

fn param(data: Vec<f32>) -> HostTensor {
    data.into()
}

#[test]
fn init_errors_say_what_is_missing() {
    assert_eq!(
        CudaInitError::NoKernels.to_string(),
        "built without CUDA kernels (nvcc not found at build time)"
    );
    assert!(CudaInitError::NoDevice("cuInit failed".into())
        .to_string()
        .starts_with("no CUDA device found"));
    // On this machine: either it starts, or it says why in those words.
    match CudaBackend::new(0) {
        Ok(be) => {
            let _ = writeln!(std::io::stderr(), "CUDA backend: {}", be.describe());
        }
        Err(err) => {
            let line = skip_reason(&err).unwrap_or_else(|| panic!("unexpected error: {err}"));
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

#[test]
fn tensors_resize_like_vectors() {
    let Some(be) = cuda() else { return };
    let mut t = be.new_tensor();
    assert!(be.to_host(&t).is_empty());
    be.resize(&mut t, 5);
    assert_eq!(be.to_host(&t), vec![0.0; 5]);
    be.upload_into(&mut t, &[1.0, 2.0, 3.0]);
    be.resize(&mut t, 6); // grows the allocation: keeps the prefix
    assert_eq!(be.to_host(&t), vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
    be.resize(&mut t, 2);
    be.resize(&mut t, 4); // within capacity: the regrown tail is zero again
    assert_eq!(be.to_host(&t), vec![1.0, 2.0, 0.0, 0.0]);
    assert!(t.capacity() >= 6);
}

#[test]
fn matmul_with_bias_and_gelu() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(1);
    for (n, k) in [
        (5, 3),
        (37, 19),
        (384, 384),
        (70, 1537),
        (1536, 384),
        (3, 1),
    ] {
        let weight = rng.vec(n * k, 0.5);
        let bias = rng.vec(n, 0.5);
        for rows in [1, TOKENS] {
            let input = rng.vec(rows * k, 1.0);
            let ref_layer = ReferenceBackend.prepare_linear(&weight, &bias, n, k);
            let layer = be.prepare_linear(&weight, &bias, n, k);
            let x = upload(be, &input);
            for activation in [Activation::Identity, Activation::Gelu] {
                let mut want = vec![0.0; rows * n];
                ReferenceBackend.matmul(&mut want, &input, rows, &ref_layer, activation);
                let mut out = poisoned(be, rows * n);
                be.matmul(&mut out, &x, rows, &layer, activation);
                let diff = max_abs_diff(&be.to_host(&out), &want);
                assert!(
                    diff < 1e-4 * (k as f32).sqrt(),
                    "{rows}x{n}x{k} {activation:?}: {diff}"
                );
            }
        }
    }
}

#[test]
fn layer_norm_with_and_without_residual() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(2);
    for cols in [1, 17, 384, 768, 1000] {
        let x = rng.vec(TOKENS * cols, 3.0);
        let residual = rng.vec(TOKENS * cols, 1.0);
        let gamma = rng.vec(cols, 1.0);
        let beta = rng.vec(cols, 1.0);
        let (g, b) = (upload(be, &gamma), upload(be, &beta));
        let r = upload(be, &residual);
        for use_residual in [false, true] {
            let mut want = x.clone();
            ReferenceBackend.layer_norm(
                &mut want,
                use_residual.then_some(&residual),
                &param(gamma.clone()),
                &param(beta.clone()),
                1e-12,
                cols,
            );
            let mut got = upload(be, &x);
            be.layer_norm(&mut got, use_residual.then_some(&r), &g, &b, 1e-12, cols);
            let diff = max_abs_diff(&be.to_host(&got), &want);
            // cols = 1 normalises to exactly beta; otherwise float rounding.
            assert!(diff < 2e-5, "cols {cols} residual {use_residual}: {diff}");
        }
    }
}

#[test]
fn attention_over_packed_sequences() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(3);
    // Every kernel instance (head_dim <= 32, <= 64, <= 128), exact and
    // partial fits, and BERT-base's and MiniLM's shapes.
    for (heads, head_dim) in [
        (12, 32),
        (12, 64),
        (2, 64),
        (3, 5),
        (2, 48),
        (4, 100),
        (1, 128),
    ] {
        let hidden = heads * head_dim;
        let qkv = rng.vec(TOKENS * 3 * hidden, 2.0);
        let mut want = vec![0.0; TOKENS * hidden];
        ReferenceBackend.attention(&mut want, &qkv, &OFFSETS, heads, head_dim);
        let mut got = poisoned(be, TOKENS * hidden);
        be.attention(&mut got, &upload(be, &qkv), &OFFSETS, heads, head_dim);
        let diff = max_abs_diff(&be.to_host(&got), &want);
        assert!(diff < 2e-5, "{heads}x{head_dim}: {diff}");
    }
}

#[test]
fn attention_of_a_lone_token_is_its_value() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(4);
    let (heads, head_dim) = (2, 32);
    let hidden = heads * head_dim;
    let qkv = rng.vec(3 * hidden, 5.0);
    let mut got = poisoned(be, hidden);
    be.attention(&mut got, &upload(be, &qkv), &[0, 1], heads, head_dim);
    assert_eq!(be.to_host(&got), qkv[2 * hidden..].to_vec());
}

#[test]
fn embedding_matches_reference() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(5);
    for hidden in [19, 384] {
        let word = rng.vec(50 * hidden, 1.0);
        let position = rng.vec(300 * hidden, 1.0);
        let token_type = rng.vec(2 * hidden, 1.0);
        let ids: Vec<u32> = (0..TOKENS).map(|t| (t * 7 % 50) as u32).collect();
        let types: Vec<u32> = (0..TOKENS).map(|t| (t % 3 == 0) as u32).collect();
        let mut want = vec![0.0; TOKENS * hidden];
        ReferenceBackend.embedding(
            &mut want,
            &ids,
            &types,
            &OFFSETS,
            &param(word.clone()),
            &param(position.clone()),
            &param(token_type.clone()),
            hidden,
        );
        let mut got = poisoned(be, TOKENS * hidden);
        be.embedding(
            &mut got,
            &ids,
            &types,
            &OFFSETS,
            &upload(be, &word),
            &upload(be, &position),
            &upload(be, &token_type),
            hidden,
        );
        // Same additions in the same order: bit-identical.
        assert_eq!(be.to_host(&got), want, "hidden {hidden}");
    }
}

#[test]
fn pooling_softmax_tanh_match_reference() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(6);
    // Mean pooling of an empty sequence is 0/0 on both: leave it out.
    let offsets = [0, 1, 8, 41, 171, 471];
    let sequences = offsets.len() - 1;
    for cols in [1, 19, 384, 700] {
        let states = rng.vec(TOKENS * cols, 1.0);
        let x = upload(be, &states);

        let mut want = vec![0.0; sequences * cols];
        ReferenceBackend.mean_pool(&mut want, &states, &offsets, cols);
        let mut got = poisoned(be, sequences * cols);
        be.mean_pool(&mut got, &x, &offsets, cols);
        let diff = max_abs_diff(&be.to_host(&got), &want);
        assert!(diff < 2e-6, "mean_pool cols {cols}: {diff}");

        let rows = [0, 1, 8, 41, 470, 8];
        let mut want = vec![0.0; rows.len() * cols];
        ReferenceBackend.gather_rows(&mut want, &states, &rows, cols);
        let mut got = poisoned(be, rows.len() * cols);
        be.gather_rows(&mut got, &x, &rows, cols);
        assert_eq!(be.to_host(&got), want, "gather_rows cols {cols}");
    }
    for (rows, cols) in [(13, 31), (1, 1), (4, 2), (3, 1000)] {
        let logits = rng.vec(rows * cols, 20.0);
        let mut want = logits.clone();
        ReferenceBackend.softmax(&mut want, cols);
        let mut got = upload(be, &logits);
        be.softmax(&mut got, cols);
        let diff = max_abs_diff(&be.to_host(&got), &want);
        assert!(diff < 2e-6, "softmax {rows}x{cols}: {diff}");
    }
    for len in [1, 301, 100_000] {
        let values = rng.vec(len, 4.0);
        let mut want = values.clone();
        ReferenceBackend.tanh(&mut want);
        let mut got = upload(be, &values);
        be.tanh(&mut got);
        let diff = max_abs_diff(&be.to_host(&got), &want);
        assert!(diff < 2e-6, "tanh {len}: {diff}");
    }
}

/// Hidden states and the three poolings of one forward pass.
fn outputs<B: Backend>(model: &BertModel<B>, batch: &TokenBatch) -> [Vec<f32>; 4] {
    let mut ws = Workspace::new(model.backend());
    model.forward(batch, &mut ws).unwrap();
    [
        model.last_hidden_state(&ws),
        model.pool(batch, &mut ws, Pooling::Mean).unwrap(),
        model.pool(batch, &mut ws, Pooling::Cls).unwrap(),
        model.pool(batch, &mut ws, Pooling::Pooler).unwrap(),
    ]
}

fn compare_models(config: RandomBert, lengths: &[usize], tolerance: f32) {
    let Some(cuda) = start() else { return };
    let dir = tempfile::tempdir().unwrap();
    config.write(dir.path(), 11);
    let files = ModelFiles::locate(dir.path()).unwrap();
    let gpu = BertModel::load(cuda, &files).unwrap();
    let cpu = BertModel::load(CpuBackend::new(0), &files).unwrap();
    let batch = random_batch(lengths, config.vocab, 12);
    let want = outputs(&cpu, &batch);
    // Twice: the second pass runs on a warm workspace (no allocation).
    for pass in 0..2 {
        let got = outputs(&gpu, &batch);
        for (what, (g, w)) in ["hidden", "mean", "cls", "pooler"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let diff = max_abs_diff(g, w);
            assert!(diff < tolerance, "pass {pass} {what}: max abs diff {diff}");
        }
    }
}

#[test]
fn tiny_bert_matches_cpu() {
    compare_models(
        RandomBert {
            hidden: 16,
            heads: 4,
            layers: 2,
            intermediate: 32,
            vocab: 20,
            positions: 64,
        },
        &[1, 5, 17, 64],
        1e-4,
    );
}

#[test]
fn minilm_shaped_bert_matches_cpu() {
    // head_dim 32, as all-MiniLM-L6-v2.
    compare_models(
        RandomBert {
            hidden: 384,
            heads: 12,
            layers: 2,
            intermediate: 1536,
            vocab: 1000,
            positions: 512,
        },
        &[1, 9, 128, 300, 512],
        5e-4,
    );
}

#[test]
fn bert_base_shaped_bert_matches_cpu() {
    // head_dim 64, as BERT-base.
    compare_models(
        RandomBert {
            hidden: 768,
            heads: 12,
            layers: 1,
            intermediate: 3072,
            vocab: 1000,
            positions: 512,
        },
        &[1, 33, 128, 128, 200],
        5e-4,
    );
}

/// The repository: where this binary was built or, for a test binary carried
/// to another machine (`scripts/gpu-check.sh`), the current directory.
fn repo_root() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").is_dir() {
        built
    } else {
        std::env::current_dir().unwrap()
    }
}

/// `$BERTRT_MINILM_DIR`, else `assets/models/all-MiniLM-L6-v2`, if present.
fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("BERTRT_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("assets/models/all-MiniLM-L6-v2"));
    dir.join("model.safetensors").exists().then_some(dir)
}

/// The f32 tensors of a fixture file, by name.
fn fixture_tensors(name: &str) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(repo_root().join("tests/fixtures").join(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, view)| view.dtype() == Dtype::F32)
        .map(|(name, view)| {
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, data)
        })
        .collect()
}

#[test]
fn minilm_matches_pytorch_and_cpu() {
    let Some(cuda) = start() else { return };
    let Some(dir) = minilm_dir() else {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: all-MiniLM-L6-v2 not present (set BERTRT_MINILM_DIR)"
        );
        return;
    };
    let files = ModelFiles::locate(&dir).unwrap();
    let gpu = BertModel::load(cuda, &files).unwrap();
    let cpu = BertModel::load(CpuBackend::new(0), &files).unwrap();
    let tokenizer = BertTokenizer::from_dir(&dir, 512).unwrap();
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("tests/fixtures/forward.json")).unwrap(),
    )
    .unwrap();
    let encoded: Vec<_> = json["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| tokenizer.encode(s["text"].as_str().unwrap()).unwrap())
        .collect();
    let fixture = fixture_tensors("forward.safetensors");
    // A weights copy stored in fp16 (to travel to a device) is not the
    // fixture's model: compare it with the CPU only.
    let fp32 = std::fs::metadata(files.weights.as_path()).unwrap().len() > 60_000_000;
    for (i, e) in encoded.iter().enumerate() {
        let batch = TokenBatch::from_encoded([e]);
        let [hidden, mean, _, pooler] = outputs(&gpu, &batch);
        if fp32 {
            for (what, got) in [
                ("last_hidden_state", &hidden),
                ("mean_pooled", &mean),
                ("pooler_output", &pooler),
            ] {
                let diff = max_abs_diff(got, &fixture[&format!("s{i}.{what}")]);
                assert!(diff <= 1e-4, "sentence {i} {what} vs PyTorch: {diff}");
            }
        }
        let want = outputs(&cpu, &batch);
        let diff = max_abs_diff(&hidden, &want[0]);
        assert!(diff <= 1e-4, "sentence {i} vs CPU: {diff}");
    }
    // All sentences in one packed batch.
    let batch = TokenBatch::from_encoded(&encoded);
    let (got, want) = (outputs(&gpu, &batch), outputs(&cpu, &batch));
    for (what, (g, w)) in ["hidden", "mean", "cls", "pooler"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        let diff = max_abs_diff(g, w);
        assert!(diff <= 1e-4, "batch {what} vs CPU: {diff}");
    }
}

/// Forward time of random encoders at serving shapes: numbers for the GPU
/// log, not assertions (fp32, cuBLAS sgemm without TF32).
/// `scripts/gpu-check.sh` runs it (`--include-ignored`).
#[test]
#[ignore = "timing: run on a GPU with --include-ignored"]
fn forward_timing() {
    for (name, config) in [
        (
            "MiniLM-L6 shape",
            RandomBert {
                hidden: 384,
                heads: 12,
                layers: 6,
                intermediate: 1536,
                vocab: 1000,
                positions: 512,
            },
        ),
        (
            "BERT-base shape",
            RandomBert {
                hidden: 768,
                heads: 12,
                layers: 12,
                intermediate: 3072,
                vocab: 1000,
                positions: 512,
            },
        ),
    ] {
        let Some(cuda) = start() else { return };
        let dir = tempfile::tempdir().unwrap();
        config.write(dir.path(), 21);
        let model = BertModel::load(cuda, &ModelFiles::locate(dir.path()).unwrap()).unwrap();
        let batch = random_batch(&[128; 32], config.vocab, 22);
        let mut ws = Workspace::new(model.backend());
        for _ in 0..3 {
            model.forward(&batch, &mut ws).unwrap();
        }
        model.backend().synchronize().unwrap();
        let runs = 20;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            model.forward(&batch, &mut ws).unwrap();
        }
        model.backend().synchronize().unwrap();
        let seconds = start.elapsed().as_secs_f64() / runs as f64;
        let _ = writeln!(
            std::io::stderr(),
            "timing: {name}, fp32 forward, 32 x 128 tokens on {}: {:.2} ms/batch, {:.0} sequences/s",
            model.backend_description(),
            seconds * 1e3,
            32.0 / seconds
        );
    }
}
