//! GFLOP/s of `linear` on BERT shapes, with f32 and bf16 weights (criterion,
//! throughput in "elements" = flops), plus a compact table at one and all
//! threads when run with `cargo bench --bench gemm`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bertrt::backend::cpu::gemm::{self, Epilogue, PackedWeight, Strided};
use bertrt::backend::cpu::isa::Isa;
use criterion::{criterion_group, BenchmarkId, Criterion, SamplingMode, Throughput};

/// `(N, K)` = (out_features, in_features) of BERT-small/base/large layers.
const SHAPES: [(usize, usize); 11] = [
    (384, 384),
    (1152, 384),
    (1536, 384),
    (384, 1536),
    (768, 768),
    (2304, 768),
    (3072, 768),
    (768, 3072),
    (1024, 1024),
    (4096, 1024),
    (1024, 4096),
];
/// Tokens per call.
const MS: [usize; 4] = [16, 128, 512, 2048];
/// FFN-up layers, which carry the GELU epilogue.
const GELU_SHAPES: [(usize, usize); 3] = [(1536, 384), (3072, 768), (4096, 1024)];

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

struct Case {
    m: usize,
    x: Vec<f32>,
    w: PackedWeight,
    bias: Vec<f32>,
    out: Vec<f32>,
}

impl Case {
    /// With `bf16`, the weight is packed for the bf16 kernel.
    fn new(m: usize, n: usize, k: usize, bf16: bool) -> Case {
        let w = values(n * k, 2);
        Case {
            m,
            x: values(m * k, 1),
            w: if bf16 {
                PackedWeight::pack_bf16(&w, n, k, Isa::detect())
            } else {
                PackedWeight::pack(&w, n, k)
            },
            bias: values(n, 3),
            out: vec![0.0; m * n],
        }
    }

    fn flops(&self) -> u64 {
        2 * (self.m * self.w.n() * self.w.k()) as u64
    }

    fn run(&mut self, epilogue: Epilogue) {
        gemm::linear(
            black_box(&self.x),
            self.m,
            &self.w,
            Some(&self.bias),
            epilogue,
            &mut self.out,
        );
        black_box(&self.out);
    }
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    // Flat sampling keeps the big shapes to ten calls; short windows keep the
    // whole run near a minute.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500));
    group
}

fn linear(c: &mut Criterion) {
    linear_in(c, "linear", false);
    linear_in(c, "linear_bf16", true);
}

fn linear_in(c: &mut Criterion, name: &str, bf16: bool) {
    let mut group = configure(c, name);
    for (n, k) in SHAPES {
        for m in MS {
            let mut case = Case::new(m, n, k, bf16);
            group.throughput(Throughput::Elements(case.flops()));
            group.bench_function(BenchmarkId::new(format!("{n}x{k}"), m), |b| {
                b.iter(|| case.run(Epilogue::None))
            });
        }
    }
    group.finish();
}

fn linear_gelu(c: &mut Criterion) {
    let mut group = configure(c, "linear_gelu");
    for (n, k) in GELU_SHAPES {
        for m in MS {
            let mut case = Case::new(m, n, k, false);
            group.throughput(Throughput::Elements(case.flops()));
            group.bench_function(BenchmarkId::new(format!("{n}x{k}"), m), |b| {
                b.iter(|| case.run(Epilogue::Gelu))
            });
        }
    }
    group.finish();
}

/// Attention-shaped strided products (BERT-base: hidden 768, head 64, fused
/// QKV rows of 2304), single-threaded as the attention loop calls them.
fn sgemm_strided(c: &mut Criterion) {
    const HEAD: usize = 64;
    const LD: usize = 3 * 768;
    let mut group = configure(c, "sgemm_strided");
    for seq in [128, 512] {
        let qkv = values(seq * LD, 4);
        let mut scores = vec![0.0; seq * seq];
        let mut ctx = vec![0.0; seq * HEAD];
        group.throughput(Throughput::Elements(2 * (seq * seq * HEAD) as u64));
        group.bench_function(BenchmarkId::new("qk_t", seq), |b| {
            b.iter(|| {
                let (q, k) = (&qkv[..], &qkv[768..]);
                gemm::sgemm_strided(
                    seq,
                    seq,
                    HEAD,
                    0.125,
                    Strided::rows(q, LD),
                    Strided::transposed(k, LD),
                    0.0,
                    &mut scores,
                    seq,
                );
                black_box(&scores);
            })
        });
        group.bench_function(BenchmarkId::new("p_v", seq), |b| {
            b.iter(|| {
                let v = &qkv[2 * 768..];
                gemm::sgemm_strided(
                    seq,
                    HEAD,
                    seq,
                    1.0,
                    Strided::rows(&scores, seq),
                    Strided::rows(v, LD),
                    0.0,
                    &mut ctx,
                    HEAD,
                );
                black_box(&ctx);
            })
        });
    }
    group.finish();
}

/// Best-of-several GFLOP/s for one case, spending about `budget`.
fn gflops(case: &mut Case, budget: Duration) -> f64 {
    case.run(Epilogue::None);
    let start = Instant::now();
    let mut best = f64::INFINITY;
    while start.elapsed() < budget || best.is_infinite() {
        let t = Instant::now();
        case.run(Epilogue::None);
        best = best.min(t.elapsed().as_secs_f64());
    }
    case.flops() as f64 / best / 1e9
}

/// `threads × shape` rows, one column per M.
fn table() {
    let all = rayon::current_num_threads();
    let mut counts = vec![1];
    if all > 1 {
        counts.push(all);
    }
    println!("\nlinear GFLOP/s (best of ~0.1 s per cell)");
    print!("{:>5} {:>8} {:>11}", "dtype", "threads", "N x K");
    for m in MS {
        print!(" {:>8}", format!("M={m}"));
    }
    println!();
    for threads in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for (dtype, bf16) in [("f32", false), ("bf16", true)] {
                for (n, k) in SHAPES {
                    print!("{dtype:>5} {threads:>8} {:>11}", format!("{n}x{k}"));
                    for m in MS {
                        let mut case = Case::new(m, n, k, bf16);
                        print!(" {:>8.1}", gflops(&mut case, Duration::from_millis(100)));
                    }
                    println!();
                }
            }
        });
    }
}

criterion_group!(benches, linear, linear_gelu, sgemm_strided);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    // The table only when benchmarking, not under `cargo test --benches`.
    if std::env::args().any(|a| a == "--bench") {
        table();
    }
}
