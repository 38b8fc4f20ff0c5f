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

/// Chains per limit loop: enough independent multiply-adds to cover the
/// instruction's latency at its full throughput.
const CHAINS: usize = 12;

/// This host's f32 FMA and bf16 `vdpbf16ps` limits (GFLOP/s) on the
/// current pool, measured as issue 4 measured its reference (516 and 931
/// GFLOP/s on 2 threads): [`CHAINS`] independent zmm chains on every pool
/// thread at once, best of 5 rounds of ~20 ms (other jobs on a shared host
/// only ever lower it), for the "% limit" column. `None` where the host
/// lacks the instructions.
fn limits() -> [Option<f64>; 2] {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx512 {
        const ITERS: u64 = 2_000_000;
        let best = |chains: unsafe fn(u64) -> f32, flops_per_op: u64| {
            let round = || {
                rayon::broadcast(|_| {
                    let start = Instant::now();
                    // SAFETY: callers pass chains whose features the host has.
                    black_box(unsafe { chains(ITERS) });
                    (ITERS * CHAINS as u64 * flops_per_op) as f64
                        / start.elapsed().as_secs_f64()
                        / 1e9
                })
                .iter()
                .sum::<f64>()
            };
            (0..5).map(|_| round()).reduce(f64::max)
        };
        // A zmm FMA is 16 multiply-adds; `vdpbf16ps` 32.
        let f32_limit = best(fma_chains, 32);
        let bf16_limit = gemm::bf16_native(Isa::Avx512)
            .then(|| best(bf16_chains, 64))
            .flatten();
        return [f32_limit, bf16_limit];
    }
    [None, None]
}

/// `iters` rounds of [`CHAINS`] independent `vfmadd` zmm; a sum of the
/// results so the loop is kept.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_chains(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (x, y) = (
        black_box(_mm512_set1_ps(0.999)),
        black_box(_mm512_set1_ps(1e-3)),
    );
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iters {
        for a in &mut acc {
            *a = _mm512_fmadd_ps(*a, x, y);
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

/// `iters` rounds of [`CHAINS`] independent `vdpbf16ps` zmm.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn bf16_chains(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let ones = black_box(_mm512_cvtne2ps_pbh(
        _mm512_set1_ps(1e-3),
        _mm512_set1_ps(1e-3),
    ));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iters {
        for a in &mut acc {
            *a = _mm512_dpbf16_ps(*a, ones, ones);
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

/// `threads × shape` rows, one column per M, and the row's best cell as a
/// share of the host's limit for the dtype.
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
    println!(" {:>8}", "% limit");
    for threads in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let limits = limits();
            let show = |l: Option<f64>| l.map_or("not measured".into(), |l| format!("{l:.0}"));
            println!(
                "limits on {threads} thread(s), GFLOP/s: f32 FMA {}, bf16 vdpbf16ps {}",
                show(limits[0]),
                show(limits[1])
            );
            for ((dtype, bf16), limit) in [("f32", false), ("bf16", true)].into_iter().zip(limits) {
                for (n, k) in SHAPES {
                    print!("{dtype:>5} {threads:>8} {:>11}", format!("{n}x{k}"));
                    let mut best = 0.0f64;
                    for m in MS {
                        let mut case = Case::new(m, n, k, bf16);
                        let g = gflops(&mut case, Duration::from_millis(100));
                        best = best.max(g);
                        print!(" {g:>8.1}");
                    }
                    let share = limit.map_or("-".into(), |l| format!("{:.1}%", 100.0 * best / l));
                    println!(" {share:>8}");
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
