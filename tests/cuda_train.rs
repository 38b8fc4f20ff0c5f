//! CUDA training against the CPU: every [`TrainBackend`] op of the CUDA
//! backend against the CPU backend (fp32) on random inputs (odd shapes,
//! empty and length-1 sequences, dropout on and off), whole training steps
//! of random-weight classifiers (tiny and MiniLM-shaped) in fp32, bf16 and
//! fp16, and an ignored timing test (`--include-ignored`, run by
//! `scripts/gpu-check.sh`) for the side-by-side table against PyTorch.
//!
//! Without a GPU every test prints "skipped: no CUDA device" (or "skipped:
//! built without CUDA kernels") and returns; `BERTRT_REQUIRE_CUDA=1` makes
//! that a failure (see tests/common/gpu.rs).

mod common;

use std::io::Write;
use std::time::Instant;

use bertrt::backend::cpu::CpuBackend;
use bertrt::backend::cuda::{CudaBackend, CudaTensor};
use bertrt::backend::train::{attention_probs_len, AdamW, Dropout, Lora, TrainBackend};
use bertrt::backend::{Backend, Precision};
use bertrt::checkpoint::Checkpoint;
use bertrt::config::BertConfig;
use bertrt::model::{Pooling, TokenBatch};
use bertrt::train::classifier::{ForwardMode, SequenceClassifier, Targets};
use common::gpu::{cuda, random_batch, start, RandomBert};
use common::Rng;

/// Lengths 1, 7, 0 (empty), 33 and 130.
const OFFSETS: [usize; 6] = [0, 1, 8, 8, 41, 171];
const TOKENS: usize = 171;

fn cpu() -> CpuBackend {
    CpuBackend::new(2)
}

/// Worst `|got - want|` relative to the largest `|want|` (at least 1e-3).
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_nan() != b.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs()
            }
        })
        .fold(0.0f32, f32::max)
        / scale
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    let error = relative_error(got, want);
    assert!(
        error <= tolerance,
        "{what}: relative error {error:e} > {tolerance:e}"
    );
}

/// The same data on both backends.
struct Pair {
    gpu: CudaTensor,
    cpu: Vec<f32>,
}

fn pair(be: &CudaBackend, data: Vec<f32>) -> Pair {
    Pair {
        gpu: TrainBackend::upload(be, &data),
        cpu: data,
    }
}

#[test]
fn linear_and_lora_match_cpu() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(1);
    let (rows, n, k, r) = (TOKENS, 45, 37, 5);
    let input = pair(be, rng.vec(rows * k, 1.0));
    let weight = pair(be, rng.vec(n * k, 0.3));
    let bias = pair(be, rng.vec(n, 0.3));
    let mut out = pair(be, vec![f32::NAN; rows * n]);
    be.linear_forward(&mut out.gpu, &input.gpu, &weight.gpu, &bias.gpu, rows);
    cpu().linear_forward(&mut out.cpu, &input.cpu, &weight.cpu, &bias.cpu, rows);
    assert_close("linear forward", &be.to_host(&out.gpu), &out.cpu, 1e-5);

    // Gradients accumulate onto what is there; d_input is overwritten.
    let d_out = pair(be, rng.vec(rows * n, 1.0));
    let mut d_input = pair(be, vec![f32::NAN; rows * k]);
    let mut d_weight = pair(be, rng.vec(n * k, 1.0));
    let mut d_bias = pair(be, rng.vec(n, 1.0));
    be.linear_backward(
        Some(&mut d_input.gpu),
        Some((&mut d_weight.gpu, &mut d_bias.gpu)),
        &d_out.gpu,
        &input.gpu,
        &weight.gpu,
        rows,
    );
    cpu().linear_backward(
        Some(&mut d_input.cpu),
        Some((&mut d_weight.cpu, &mut d_bias.cpu)),
        &d_out.cpu,
        &input.cpu,
        &weight.cpu,
        rows,
    );
    assert_close(
        "linear d_input",
        &be.to_host(&d_input.gpu),
        &d_input.cpu,
        1e-5,
    );
    assert_close(
        "linear d_weight",
        &be.to_host(&d_weight.gpu),
        &d_weight.cpu,
        1e-5,
    );
    assert_close("linear d_bias", &be.to_host(&d_bias.gpu), &d_bias.cpu, 1e-5);

    // LoRA on the middle third of a fused output, as a key adapter.
    let width = 3 * n;
    let columns = n..2 * n;
    let a = pair(be, rng.vec(r * k, 0.3));
    let b = pair(be, rng.vec(n * r, 0.3));
    let mut fused = pair(be, rng.vec(rows * width, 1.0));
    let mut xa = pair(be, vec![f32::NAN; rows * r]);
    let scale = 2.0;
    be.lora_forward(
        &mut fused.gpu,
        columns.clone(),
        &mut xa.gpu,
        &input.gpu,
        Lora {
            a: &a.gpu,
            b: &b.gpu,
            scale,
        },
        rows,
    );
    cpu().lora_forward(
        &mut fused.cpu,
        columns.clone(),
        &mut xa.cpu,
        &input.cpu,
        Lora {
            a: &a.cpu,
            b: &b.cpu,
            scale,
        },
        rows,
    );
    assert_close("lora forward", &be.to_host(&fused.gpu), &fused.cpu, 1e-5);
    assert_close("lora xa", &be.to_host(&xa.gpu), &xa.cpu, 1e-5);

    let d_fused = pair(be, rng.vec(rows * width, 1.0));
    let mut d_in = pair(be, rng.vec(rows * k, 1.0));
    let mut d_a = pair(be, rng.vec(r * k, 1.0));
    let mut d_b = pair(be, rng.vec(n * r, 1.0));
    let mut scratch = pair(be, vec![f32::NAN; rows * r]);
    be.lora_backward(
        &mut d_in.gpu,
        Some((&mut d_a.gpu, &mut d_b.gpu)),
        &mut scratch.gpu,
        &d_fused.gpu,
        columns.clone(),
        &xa.gpu,
        &input.gpu,
        Lora {
            a: &a.gpu,
            b: &b.gpu,
            scale,
        },
        rows,
    );
    cpu().lora_backward(
        &mut d_in.cpu,
        Some((&mut d_a.cpu, &mut d_b.cpu)),
        &mut scratch.cpu,
        &d_fused.cpu,
        columns,
        &xa.cpu,
        &input.cpu,
        Lora {
            a: &a.cpu,
            b: &b.cpu,
            scale,
        },
        rows,
    );
    assert_close("lora d_input", &be.to_host(&d_in.gpu), &d_in.cpu, 1e-5);
    assert_close("lora d_A", &be.to_host(&d_a.gpu), &d_a.cpu, 1e-5);
    assert_close("lora d_B", &be.to_host(&d_b.gpu), &d_b.cpu, 1e-5);
}

#[test]
fn attention_matches_cpu_with_and_without_dropout() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(2);
    for (heads, head_dim) in [(3, 32), (2, 64), (2, 40)] {
        for p in [0.0, 0.1] {
            let dropout = Dropout { p, seed: 77 };
            let hidden = heads * head_dim;
            let qkv = pair(be, rng.vec(TOKENS * 3 * hidden, 1.5));
            let probs_len = attention_probs_len(&OFFSETS, heads);
            let mut out = pair(be, vec![f32::NAN; TOKENS * hidden]);
            let mut probs = pair(be, vec![f32::NAN; probs_len]);
            be.attention_forward(
                &mut out.gpu,
                &mut probs.gpu,
                &qkv.gpu,
                &OFFSETS,
                heads,
                head_dim,
                dropout,
            );
            cpu().attention_forward(
                &mut out.cpu,
                &mut probs.cpu,
                &qkv.cpu,
                &OFFSETS,
                heads,
                head_dim,
                dropout,
            );
            let what = format!("attention h{heads} d{head_dim} p{p}");
            assert_close(
                &format!("{what} probs"),
                &be.to_host(&probs.gpu),
                &probs.cpu,
                1e-5,
            );
            assert_close(
                &format!("{what} out"),
                &be.to_host(&out.gpu),
                &out.cpu,
                1e-5,
            );

            let d_out = pair(be, rng.vec(TOKENS * hidden, 1.0));
            let mut d_qkv = pair(be, vec![f32::NAN; TOKENS * 3 * hidden]);
            be.attention_backward(
                &mut d_qkv.gpu,
                &d_out.gpu,
                &qkv.gpu,
                &probs.gpu,
                &OFFSETS,
                heads,
                head_dim,
                dropout,
            );
            cpu().attention_backward(
                &mut d_qkv.cpu,
                &d_out.cpu,
                &qkv.cpu,
                &probs.cpu,
                &OFFSETS,
                heads,
                head_dim,
                dropout,
            );
            assert_close(
                &format!("{what} d_qkv"),
                &be.to_host(&d_qkv.gpu),
                &d_qkv.cpu,
                1e-5,
            );
        }
    }
}

#[test]
fn elementwise_and_normalisation_match_cpu() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(3);
    for cols in [37, 384, 768] {
        let rows = TOKENS;
        let x = pair(be, rng.vec(rows * cols, 3.0));
        let gamma = pair(be, rng.vec(cols, 1.0));
        let beta = pair(be, rng.vec(cols, 1.0));
        let mut out = pair(be, vec![f32::NAN; rows * cols]);
        let mut mean = pair(be, vec![f32::NAN; rows]);
        let mut rstd = pair(be, vec![f32::NAN; rows]);
        be.layer_norm_forward(
            &mut out.gpu,
            &x.gpu,
            &gamma.gpu,
            &beta.gpu,
            1e-12,
            &mut mean.gpu,
            &mut rstd.gpu,
        );
        cpu().layer_norm_forward(
            &mut out.cpu,
            &x.cpu,
            &gamma.cpu,
            &beta.cpu,
            1e-12,
            &mut mean.cpu,
            &mut rstd.cpu,
        );
        assert_close("layer norm forward", &be.to_host(&out.gpu), &out.cpu, 1e-5);
        assert_close("layer norm rstd", &be.to_host(&rstd.gpu), &rstd.cpu, 1e-5);

        let d_out = pair(be, rng.vec(rows * cols, 1.0));
        let mut d_x = pair(be, vec![f32::NAN; rows * cols]);
        let mut d_gamma = pair(be, rng.vec(cols, 1.0));
        let mut d_beta = pair(be, rng.vec(cols, 1.0));
        be.layer_norm_backward(
            &mut d_x.gpu,
            Some((&mut d_gamma.gpu, &mut d_beta.gpu)),
            &d_out.gpu,
            &x.gpu,
            &gamma.gpu,
            &mean.gpu,
            &rstd.gpu,
        );
        cpu().layer_norm_backward(
            &mut d_x.cpu,
            Some((&mut d_gamma.cpu, &mut d_beta.cpu)),
            &d_out.cpu,
            &x.cpu,
            &gamma.cpu,
            &mean.cpu,
            &rstd.cpu,
        );
        assert_close("layer norm d_x", &be.to_host(&d_x.gpu), &d_x.cpu, 1e-5);
        assert_close(
            "layer norm d_gamma",
            &be.to_host(&d_gamma.gpu),
            &d_gamma.cpu,
            1e-5,
        );
        assert_close(
            "layer norm d_beta",
            &be.to_host(&d_beta.gpu),
            &d_beta.cpu,
            1e-5,
        );
    }

    for n in [1, 1001, 300_007] {
        let pre = pair(be, rng.vec(n, 4.0));
        let mut out = pair(be, vec![f32::NAN; n]);
        be.gelu_forward(&mut out.gpu, &pre.gpu);
        cpu().gelu_forward(&mut out.cpu, &pre.cpu);
        assert_close("gelu forward", &be.to_host(&out.gpu), &out.cpu, 1e-6);
        let mut d = pair(be, rng.vec(n, 1.0));
        be.gelu_backward(&mut d.gpu, &pre.gpu);
        cpu().gelu_backward(&mut d.cpu, &pre.cpu);
        assert_close("gelu backward", &be.to_host(&d.gpu), &d.cpu, 1e-6);

        let y = pair(be, rng.vec(n, 1.0));
        let mut d = pair(be, rng.vec(n, 1.0));
        be.tanh_backward(&mut d.gpu, &y.gpu);
        cpu().tanh_backward(&mut d.cpu, &y.cpu);
        assert_close("tanh backward", &be.to_host(&d.gpu), &d.cpu, 1e-6);

        let a = pair(be, rng.vec(n, 1.0));
        let b = pair(be, rng.vec(n, 1.0));
        let mut sum = pair(be, vec![f32::NAN; n]);
        be.add(&mut sum.gpu, &a.gpu, &b.gpu);
        cpu().add(&mut sum.cpu, &a.cpu, &b.cpu);
        assert_eq!(be.to_host(&sum.gpu), sum.cpu, "add");
        be.add_assign(&mut sum.gpu, &a.gpu);
        cpu().add_assign(&mut sum.cpu, &a.cpu);
        assert_eq!(be.to_host(&sum.gpu), sum.cpu, "add_assign");
        be.scale(&mut sum.gpu, 0.37);
        cpu().scale(&mut sum.cpu, 0.37);
        assert_eq!(be.to_host(&sum.gpu), sum.cpu, "scale");

        // The same mask bit for bit: the counter hash is the CPU's.
        let dropout = Dropout { p: 0.1, seed: 5 };
        be.dropout(&mut sum.gpu, dropout);
        cpu().dropout(&mut sum.cpu, dropout);
        assert_eq!(be.to_host(&sum.gpu), sum.cpu, "dropout");

        let squares = be.sum_squares(&sum.gpu);
        let want = cpu().sum_squares(&sum.cpu);
        assert!(
            (squares - want).abs() <= 1e-5 * want.max(1e-30),
            "sum_squares {squares} vs {want}"
        );
        let squares = be.sum_squares_all(&[&a.gpu, &sum.gpu, &b.gpu]);
        let want = cpu().sum_squares_all(&[&a.cpu, &sum.cpu, &b.cpu]);
        assert!(
            (squares - want).abs() <= 1e-5 * want.max(1e-30),
            "sum_squares_all {squares} vs {want}"
        );
    }
}

#[test]
fn non_finite_gradients_show_in_the_norm() {
    let Some(be) = cuda() else { return };
    for bad in [f32::INFINITY, f32::NAN] {
        let mut data = vec![0.5f32; 10_000];
        data[7777] = bad;
        let grad = TrainBackend::upload(be, &data);
        assert!(
            !be.sum_squares(&grad).is_finite(),
            "a {bad} gradient gives a finite norm"
        );
    }
    // A square that overflows f32 is an overflow too (fp16 loss scaling).
    let grad = TrainBackend::upload(be, &[3e19f32, 1.0]);
    assert!(!be.sum_squares(&grad).is_finite());
}

#[test]
fn gathers_scatters_losses_and_adamw_match_cpu() {
    let Some(be) = cuda() else { return };
    let mut rng = Rng::new(4);
    let (hidden, vocab) = (40, 50);
    let batch = random_batch(&[1, 7, 0, 33, 130], vocab, 9);
    let tokens = batch.ids.len();
    let word = pair(be, rng.vec(vocab * hidden, 1.0));
    let position = pair(be, rng.vec(200 * hidden, 1.0));
    let token_type = pair(be, rng.vec(2 * hidden, 1.0));
    let mut out = pair(be, vec![f32::NAN; tokens * hidden]);
    be.embedding_forward(
        &mut out.gpu,
        &batch.ids,
        &batch.type_ids,
        &batch.offsets,
        &word.gpu,
        &position.gpu,
        &token_type.gpu,
        hidden,
    );
    cpu().embedding_forward(
        &mut out.cpu,
        &batch.ids,
        &batch.type_ids,
        &batch.offsets,
        &word.cpu,
        &position.cpu,
        &token_type.cpu,
        hidden,
    );
    assert_close("embedding forward", &be.to_host(&out.gpu), &out.cpu, 1e-6);

    let d_out = pair(be, rng.vec(tokens * hidden, 1.0));
    let mut d_word = pair(be, rng.vec(vocab * hidden, 1.0));
    let mut d_position = pair(be, rng.vec(200 * hidden, 1.0));
    let mut d_type = pair(be, rng.vec(2 * hidden, 1.0));
    be.embedding_backward(
        &mut d_word.gpu,
        &mut d_position.gpu,
        &mut d_type.gpu,
        &d_out.gpu,
        &batch.ids,
        &batch.type_ids,
        &batch.offsets,
    );
    cpu().embedding_backward(
        &mut d_word.cpu,
        &mut d_position.cpu,
        &mut d_type.cpu,
        &d_out.cpu,
        &batch.ids,
        &batch.type_ids,
        &batch.offsets,
    );
    // Atomic adds in any order: rounding differences only.
    assert_close(
        "embedding d_word",
        &be.to_host(&d_word.gpu),
        &d_word.cpu,
        1e-5,
    );
    assert_close(
        "embedding d_position",
        &be.to_host(&d_position.gpu),
        &d_position.cpu,
        1e-5,
    );
    assert_close(
        "embedding d_type",
        &be.to_host(&d_type.gpu),
        &d_type.cpu,
        1e-5,
    );

    let sequences = batch.offsets.len() - 1;
    let pooled_grad = pair(be, rng.vec(sequences * hidden, 1.0));
    let mut d_tokens = pair(be, vec![f32::NAN; tokens * hidden]);
    be.mean_pool_backward(&mut d_tokens.gpu, &pooled_grad.gpu, &batch.offsets, hidden);
    cpu().mean_pool_backward(&mut d_tokens.cpu, &pooled_grad.cpu, &batch.offsets, hidden);
    assert_close(
        "mean pool backward",
        &be.to_host(&d_tokens.gpu),
        &d_tokens.cpu,
        1e-6,
    );

    let cls_rows: Vec<usize> = batch.offsets[..sequences]
        .iter()
        .zip(&batch.offsets[1..])
        .filter(|(a, b)| a < b)
        .map(|(a, _)| *a)
        .collect();
    let cls_grad = pair(be, rng.vec(cls_rows.len() * hidden, 1.0));
    be.scatter_rows(&mut d_tokens.gpu, &cls_grad.gpu, &cls_rows, hidden);
    cpu().scatter_rows(&mut d_tokens.cpu, &cls_grad.cpu, &cls_rows, hidden);
    assert_eq!(be.to_host(&d_tokens.gpu), d_tokens.cpu, "scatter_rows");

    for classes in [2, 7] {
        let rows = 33;
        let logits = pair(be, rng.vec(rows * classes, 4.0));
        let labels: Vec<usize> = (0..rows).map(|i| (i * 5) % classes).collect();
        let weights: Vec<f32> = (0..rows).map(|i| 0.5 + (i % 3) as f32).collect();
        for weights in [None, Some(&weights[..])] {
            let mut d = pair(be, vec![f32::NAN; rows * classes]);
            let loss = be.cross_entropy(&mut d.gpu, &logits.gpu, &labels, weights, classes);
            let want = cpu().cross_entropy(&mut d.cpu, &logits.cpu, &labels, weights, classes);
            assert!(
                (loss - want).abs() <= 1e-5 * want.abs().max(1.0),
                "cross-entropy {loss} vs {want}"
            );
            assert_close("cross-entropy gradient", &be.to_host(&d.gpu), &d.cpu, 1e-5);
        }
    }

    let predictions = pair(be, rng.vec(9, 2.0));
    let targets = rng.vec(9, 2.0);
    let mut d = pair(be, vec![f32::NAN; 9]);
    let loss = be.mse(&mut d.gpu, &predictions.gpu, &targets);
    let want = cpu().mse(&mut d.cpu, &predictions.cpu, &targets);
    assert_eq!(loss, want, "mse");
    assert_eq!(be.to_host(&d.gpu), d.cpu, "mse gradient");

    let n = 100_003;
    let mut param = pair(be, rng.vec(n, 1.0));
    let grad = pair(be, rng.vec(n, 0.1));
    let mut m = pair(be, rng.vec(n, 0.01));
    let mut v = pair(be, rng.vec(n, 0.01).iter().map(|x| x.abs()).collect());
    let update = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
    };
    be.adamw(&mut param.gpu, &grad.gpu, &mut m.gpu, &mut v.gpu, update);
    cpu().adamw(&mut param.cpu, &grad.cpu, &mut m.cpu, &mut v.cpu, update);
    assert_close("adamw param", &be.to_host(&param.gpu), &param.cpu, 1e-6);
    assert_close("adamw m", &be.to_host(&m.gpu), &m.cpu, 1e-6);
    assert_close("adamw v", &be.to_host(&v.gpu), &v.cpu, 1e-6);
}

/// A classifier on the random-weight checkpoint in `dir`, on `backend`.
fn classifier<B: TrainBackend>(backend: B, dir: &std::path::Path) -> SequenceClassifier<B> {
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    SequenceClassifier::new(backend, config, &ckpt, Pooling::Pooler, 3, 0.1, 7).unwrap()
}

/// One forward (dropout on) and backward; returns logits and loss.
fn step<B: TrainBackend>(
    model: &mut SequenceClassifier<B>,
    batch: &TokenBatch,
    labels: &[usize],
) -> (Vec<f32>, f32) {
    let logits = model
        .forward(
            batch,
            ForwardMode {
                dropout_seed: Some(11),
            },
        )
        .unwrap();
    model.params.zero_grads(&model.backend);
    let loss = model.backward(
        batch,
        Targets::Classes {
            labels,
            class_weights: None,
        },
        1.0,
    );
    (logits, loss)
}

fn adamw(step: u32) -> AdamW {
    AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step,
    }
}

/// Gradients of every parameter, as cosine similarity and relative L2
/// error against the CPU's: (worst cosine, worst relative error, its name).
fn compare_gradients(
    gpu: &SequenceClassifier<CudaBackend>,
    cpu: &SequenceClassifier<CpuBackend>,
) -> (f64, f64, String) {
    let mut worst = (1.0f64, 0.0f64, String::new());
    for (g, c) in gpu.params.iter().zip(cpu.params.iter()) {
        assert_eq!(g.name, c.name);
        let (Some(gg), Some(cg)) = (&g.grad, &c.grad) else {
            continue;
        };
        let got = gpu.backend.to_host(gg);
        let want = cpu.backend.to_host(cg);
        let dot: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let diff: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        // Floors: a gradient that is zero in exact arithmetic (the key
        // bias) is rounding noise on both sides.
        let cosine = if norm(&want) < 1e-6 {
            1.0
        } else {
            dot / (norm(&got) * norm(&want)).max(1e-30)
        };
        let relative = norm(&diff) / norm(&want).max(1e-4);
        worst.0 = worst.0.min(cosine);
        if relative > worst.1 {
            worst.1 = relative;
            worst.2 = g.name.clone();
        }
    }
    worst
}

/// A training step (dropout on) on the GPU in `precision` against the CPU
/// in fp32, then two AdamW steps: logits, loss, every gradient, every
/// parameter after.
fn training_steps_match_cpu(shape: RandomBert, lengths: &[usize], precision: Precision) {
    let Some(backend) = start() else { return };
    let dir = tempfile::tempdir().unwrap();
    shape.write(dir.path(), 3);
    let mut gpu = classifier(backend.with_precision(precision), dir.path());
    let mut cpu_model = classifier(cpu(), dir.path());
    let batch = random_batch(lengths, shape.vocab, 21);
    let labels: Vec<usize> = (0..lengths.len()).map(|i| i % 3).collect();
    // fp32 parity is float rounding; bf16 / fp16 operands round to 8 / 11
    // significant bits, which the bounds allow for.
    let (logit_tol, loss_tol, grad_cos, grad_rel) = match precision {
        Precision::Fp32 => (1e-4, 1e-5, 0.999_999, 1e-3),
        Precision::Fp16 => (1e-2, 1e-3, 0.999, 5e-2),
        Precision::Bf16 => (5e-2, 1e-2, 0.99, 2e-1),
    };
    for t in 1..=2 {
        let (gpu_logits, gpu_loss) = step(&mut gpu, &batch, &labels);
        let (cpu_logits, cpu_loss) = step(&mut cpu_model, &batch, &labels);
        let what = format!("{precision:?} step {t}");
        assert_close(
            &format!("{what} logits"),
            &gpu_logits,
            &cpu_logits,
            logit_tol,
        );
        assert!(
            ((gpu_loss - cpu_loss) / cpu_loss).abs() <= loss_tol,
            "{what}: loss {gpu_loss} vs {cpu_loss}"
        );
        let (cosine, relative, name) = compare_gradients(&gpu, &cpu_model);
        let _ = writeln!(
            std::io::stderr(),
            "{what}: loss {gpu_loss} vs {cpu_loss}; gradients: worst cosine {cosine:.7}, \
             worst relative L2 error {relative:.2e} ({name})"
        );
        assert!(cosine >= grad_cos, "{what}: gradient cosine {cosine}");
        assert!(
            relative <= grad_rel,
            "{what}: {name} relative error {relative:e}"
        );
        let (gpu_norm, cpu_norm) = (
            gpu.params.grad_norm(&gpu.backend),
            cpu_model.params.grad_norm(&cpu_model.backend),
        );
        assert!(
            (gpu_norm - cpu_norm).abs() <= grad_rel * cpu_norm,
            "{what}: grad norm {gpu_norm} vs {cpu_norm}"
        );
        gpu.params.adamw_step(&gpu.backend, adamw(t));
        cpu_model.params.adamw_step(&cpu_model.backend, adamw(t));
    }
    if precision == Precision::Fp32 {
        for (g, c) in gpu.params.iter().zip(cpu_model.params.iter()) {
            let got = gpu.backend.to_host(&g.value);
            let want = cpu_model.backend.to_host(&c.value);
            // Two AdamW steps move a weight by about 2·lr; a sign flip of a
            // near-zero gradient can move it 2·lr the other way.
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 4.1e-3, "{} after AdamW: {worst}", g.name);
        }
    }
}

fn tiny() -> RandomBert {
    RandomBert {
        hidden: 64,
        heads: 2,
        layers: 2,
        intermediate: 96,
        vocab: 100,
        positions: 160,
    }
}

fn minilm_shape() -> RandomBert {
    RandomBert {
        hidden: 384,
        heads: 12,
        layers: 6,
        intermediate: 1536,
        vocab: 30522,
        positions: 512,
    }
}

fn bert_base_shape() -> RandomBert {
    RandomBert {
        hidden: 768,
        heads: 12,
        layers: 12,
        intermediate: 3072,
        vocab: 30522,
        positions: 512,
    }
}

#[test]
fn tiny_training_step_matches_cpu() {
    training_steps_match_cpu(tiny(), &[1, 9, 33, 130], Precision::Fp32);
}

#[test]
fn minilm_shaped_training_step_matches_cpu() {
    training_steps_match_cpu(minilm_shape(), &[5, 64, 128, 17], Precision::Fp32);
}

#[test]
fn bf16_training_step_stays_close_to_fp32() {
    training_steps_match_cpu(minilm_shape(), &[5, 64, 128, 17], Precision::Bf16);
}

#[test]
fn fp16_training_step_stays_close_to_fp32() {
    training_steps_match_cpu(minilm_shape(), &[5, 64, 128, 17], Precision::Fp16);
}

/// Training throughput at batch 32 × 128 tokens for BERT-base and
/// MiniLM-L6 shapes (random weights), each precision: forward, backward,
/// global norm, clipping and AdamW, as `bertrt finetune`'s step. Prints
/// `timing:` lines that `scripts/gpu-check.sh` sets beside PyTorch's.
#[test]
#[ignore = "timing: run on a GPU with --include-ignored"]
fn train_timing() {
    let Some(probe) = start() else { return };
    let device = probe.describe();
    drop(probe);
    let (batch_size, seq) = (32, 128);
    for (name, shape) in [
        ("bert-base", bert_base_shape()),
        ("minilm-l6", minilm_shape()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        shape.write(dir.path(), 1);
        for precision in [Precision::Bf16, Precision::Fp16, Precision::Fp32] {
            let backend = start().unwrap().with_precision(precision);
            let mut model = classifier(backend, dir.path());
            let batch = random_batch(&vec![seq; batch_size], shape.vocab, 5);
            let labels: Vec<usize> = (0..batch_size).map(|i| i % 3).collect();
            let run = |model: &mut SequenceClassifier<CudaBackend>, t: u32| {
                step(model, &batch, &labels);
                let norm = model.params.grad_norm(&model.backend);
                if norm > 1.0 {
                    model
                        .params
                        .scale_grads(&model.backend, (1.0 / norm) as f32);
                }
                model.params.adamw_step(&model.backend, adamw(t));
            };
            for t in 1..=3 {
                run(&mut model, t);
            }
            model.backend.synchronize().unwrap();
            let steps = 15;
            let started = Instant::now();
            for t in 4..4 + steps {
                run(&mut model, t);
            }
            model.backend.synchronize().unwrap();
            let ms = started.elapsed().as_secs_f64() * 1e3 / steps as f64;
            if name == "bert-base" && precision == Precision::Bf16 {
                print_profile(dir.path(), &batch, &labels);
            }
            let (free, total) = cudarc::driver::result::mem_get_info().unwrap();
            drop(model);
            let used_mib = (total - free) as f64 / (1 << 20) as f64;
            let mode = format!("{precision:?}").to_lowercase();
            let _ = writeln!(
                std::io::stdout(),
                "timing: bertrt {name} {mode} train b{batch_size} s{seq}: {ms:.2} ms/step, \
                 {:.1} samples/s, peak {used_mib:.0} MiB ({device}; device memory in use, \
                 context included)",
                batch_size as f64 * 1e3 / ms
            );
        }
    }
}

/// Where a bf16 step's time goes, op by op (each op waited for, so the
/// total exceeds a real step): `profile:` lines for the results file.
fn print_profile(dir: &std::path::Path, batch: &TokenBatch, labels: &[usize]) {
    let backend = start()
        .unwrap()
        .with_precision(Precision::Bf16)
        .with_profiling();
    let mut model = classifier(backend, dir);
    let steps = 3;
    for t in 1..=steps {
        step(&mut model, batch, labels);
        model.params.grad_norm(&model.backend);
        model.params.adamw_step(&model.backend, adamw(t));
    }
    let ops = model.backend.profile();
    let total: f64 = ops.iter().map(|op| op.2).sum();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "profile: bert-base bf16 b32 s128, {:.2} ms/step with every op waited for",
        total * 1e3 / steps as f64
    );
    for (op, calls, secs) in ops {
        let _ = writeln!(
            out,
            "profile: {op:32} {:6} calls/step {:8.3} ms/step {:5.1}%",
            calls / steps as u64,
            secs * 1e3 / steps as f64,
            100.0 * secs / total
        );
    }
}
