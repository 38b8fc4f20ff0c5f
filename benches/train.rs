//! Training throughput: one optimizer step (forward, backward, AdamW) of
//! all-MiniLM-L6-v2 sequence classification at batch 16 × 128 tokens, the
//! shape the PyTorch comparison uses, with the linear layers in fp32 and in
//! bf16 (`--precision bf16`). Prints samples/s (p50 step time) for each.

use std::path::Path;
use std::time::{Duration, Instant};

use bertrt::backend::cpu::CpuBackend;
use bertrt::backend::train::AdamW;
use bertrt::backend::Backend;
use bertrt::backend::Precision;
use bertrt::checkpoint::Checkpoint;
use bertrt::config::BertConfig;
use bertrt::model::{Pooling, TokenBatch};
use bertrt::train::classifier::{ForwardMode, SequenceClassifier, Targets};
use criterion::{criterion_group, criterion_main, Criterion};

const BATCH: usize = 16;
const SEQ: usize = 128;

fn train_step(c: &mut Criterion) {
    for precision in [Precision::Fp32, Precision::Bf16] {
        train_step_in(c, precision);
    }
}

fn train_step_in(c: &mut Criterion, precision: Precision) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/all-MiniLM-L6-v2");
    let config =
        BertConfig::from_file(&dir.join("config.json")).expect("run scripts/fetch-assets.sh first");
    let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let mut model = SequenceClassifier::new(
        CpuBackend::new(0).with_precision(precision),
        config,
        &ckpt,
        Pooling::Pooler,
        3,
        0.1,
        1,
    )
    .unwrap();
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|i| 2000 + (i * 7919 % 20_000) as u32)
        .collect();
    let batch = TokenBatch {
        type_ids: vec![0; ids.len()],
        ids,
        offsets: (0..=BATCH).map(|s| s * SEQ).collect(),
    };
    let labels: Vec<usize> = (0..BATCH).map(|i| i % 3).collect();
    let mut step = 0u32;
    let mut samples = Vec::new();
    let mut group = c.benchmark_group("minilm_l6_train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20));
    let name = format!("{BATCH}x{SEQ}_{precision:?}").to_lowercase();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                step += 1;
                model.params.zero_grads(&model.backend);
                model
                    .forward(
                        &batch,
                        ForwardMode {
                            dropout_seed: Some(step as u64),
                        },
                    )
                    .unwrap();
                model.backward(
                    &batch,
                    Targets::Classes {
                        labels: &labels,
                        class_weights: None,
                    },
                    1.0,
                );
                model.params.adamw_step(
                    &model.backend,
                    AdamW {
                        lr: 3e-5,
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                        weight_decay: 0.01,
                        step,
                    },
                );
                let took = start.elapsed();
                samples.push(took);
                total += took;
            }
            total
        })
    });
    group.finish();
    if samples.is_empty() {
        // Filtered out on the command line.
        return;
    }
    samples.sort();
    let p50 = samples[samples.len() / 2].as_secs_f64();
    println!(
        "\ntraining step {BATCH}x{SEQ} on {}, {precision:?} matmuls: p50 {:.3} s, {:.1} samples/s ({} steps)",
        model.backend.describe(),
        p50,
        BATCH as f64 / p50,
        samples.len()
    );
}

criterion_group!(benches, train_step);
criterion_main!(benches);
