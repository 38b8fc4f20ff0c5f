//! Encoder forward latency of all-MiniLM-L6-v2 on the CPU backend, f32,
//! bf16 (`--dtype bf16`) and INT8 (quantized on load as `--int8` does:
//! built-in calibration sentences, SmoothQuant per linear): batch 1 at
//! sequence lengths 16..512 and 32 × 128, with p50/p95/p99 per shape.
//!
//! Criterion reports means; for tail latency every iteration is timed on its
//! own (`iter_custom`), and the percentiles are printed as a table and
//! written to `target/bench-encoder.json`.

use std::path::Path;
use std::time::{Duration, Instant};

use bertrt::backend::cpu::gemm;
use bertrt::backend::cpu::isa::Isa;
use bertrt::backend::cpu::CpuBackend;
use bertrt::model::{BertModel, ModelFiles, TokenBatch, Workspace};
use bertrt::quant::{Bf16Linears, Int8Linears};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const SHAPES: &[(usize, usize)] = &[
    (1, 16),
    (1, 32),
    (1, 64),
    (1, 128),
    (1, 256),
    (1, 512),
    (32, 128),
];

/// `batch` sequences of exactly `seq` tokens: [CLS] ordinary wordpieces [SEP].
fn token_batch(batch: usize, seq: usize) -> TokenBatch {
    let mut ids = Vec::with_capacity(batch * seq);
    for s in 0..batch {
        ids.push(101);
        ids.extend((0..seq - 2).map(|t| 2000 + ((s * 7919 + t * 104_729) % 20_000) as u32));
        ids.push(102);
    }
    TokenBatch {
        type_ids: vec![0; ids.len()],
        ids,
        offsets: (0..=batch).map(|s| s * seq).collect(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank].as_secs_f64() * 1e3
}

/// p50/p95/p99 (ms) and the sample count per shape of [`SHAPES`].
type Latencies = Vec<([f64; 3], usize)>;

fn measure(c: &mut Criterion, group_name: &str, model: &BertModel<CpuBackend>) -> Latencies {
    let mut ws = Workspace::new(model.backend());
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mut rows = Vec::new();
    for &(batch, seq) in SHAPES {
        let input = token_batch(batch, seq);
        let mut samples = Vec::new();
        group.bench_function(BenchmarkId::from_parameter(format!("{batch}x{seq}")), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    model.forward(&input, &mut ws).unwrap();
                    let took = start.elapsed();
                    samples.push(took);
                    total += took;
                }
                total
            })
        });
        samples.sort();
        rows.push((
            [50.0, 95.0, 99.0].map(|p| percentile(&samples, p)),
            samples.len(),
        ));
    }
    group.finish();
    rows
}

fn shapes_json(rows: &Latencies) -> Vec<serde_json::Value> {
    SHAPES
        .iter()
        .zip(rows)
        .map(|(&(batch, seq), ([p50, p95, p99], n))| {
            serde_json::json!({
                "batch": batch, "seq": seq, "samples": n,
                "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            })
        })
        .collect()
}

fn encoder(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/models/all-MiniLM-L6-v2");
    let files = ModelFiles::locate(&dir)
        .unwrap_or_else(|e| panic!("{e}\nrun scripts/fetch-assets.sh first"));
    let model = BertModel::load(CpuBackend::new(0), &files).unwrap();
    let f32_rows = measure(c, "minilm_l6_forward", &model);
    drop(model);

    let bf16 = BertModel::load_with(CpuBackend::new(0), &files, &Bf16Linears).unwrap();
    let bf16_rows = measure(c, "minilm_l6_forward_bf16", &bf16);
    drop(bf16);

    let (linears, quantization) = Int8Linears::for_model(&dir, true).unwrap();
    let quantization = quantization.expect("an f32 model is calibrated");
    let int8 = BertModel::load_with(CpuBackend::new(0), &files, &linears).unwrap();
    let int8_rows = measure(c, "minilm_l6_forward_int8", &int8);

    let backend = int8.backend();
    println!(
        "\nall-MiniLM-L6-v2 forward, {}, INT8 path {} (ms)\n{}",
        int8.backend_description(),
        backend.int8_isa().name(),
        quantization.summary()
    );
    println!(
        "{:>6} {:>5} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>9} {:>9}",
        "batch",
        "seq",
        "f32 p50",
        "p95",
        "p99",
        "bf16 p50",
        "p95",
        "p99",
        "int8 p50",
        "p95",
        "p99",
        "bf16/f32",
        "int8/f32"
    );
    for (i, &(batch, seq)) in SHAPES.iter().enumerate() {
        let (f, b, q) = (f32_rows[i].0, bf16_rows[i].0, int8_rows[i].0);
        println!(
            "{batch:>6} {seq:>5} | {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} {:>8.3} | {:>8.2}x {:>8.2}x",
            f[0],
            f[1],
            f[2],
            b[0],
            b[1],
            b[2],
            q[0],
            q[1],
            q[2],
            b[0] / f[0],
            q[0] / f[0]
        );
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-encoder.json");
    let report = serde_json::json!({
        "model": "all-MiniLM-L6-v2",
        "backend": int8.backend_description(),
        "shapes": shapes_json(&f32_rows),
        "bf16": {
            "native": gemm::bf16_native(Isa::detect()),
            "shapes": shapes_json(&bf16_rows),
        },
        "int8": {
            "path": backend.int8_isa().name(),
            "quantization": quantization.summary(),
            "shapes": shapes_json(&int8_rows),
        },
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    println!("written to {}", out.display());
}

criterion_group!(benches, encoder);
criterion_main!(benches);
