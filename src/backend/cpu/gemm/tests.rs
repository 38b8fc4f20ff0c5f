//! Every instruction-set path against the `f64` references.

use super::*;

/// Deterministic values in `[-1, 1)` (no `rand` dependency).
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Largest difference, relative to the reference's largest magnitude (at
/// least 1).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(1.0f64, |m, &v| m.max((v as f64).abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    // NaN in `got` must fail, and `max` would drop it.
    if got.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    diff / scale
}

const TOL: f64 = 1e-5;

fn check_linear(isa: Isa, m: usize, n: usize, k: usize, with_bias: bool, epilogue: Epilogue) {
    let seed = (m * 1_000_003 + n * 1009 + k) as u64;
    let x = random(m * k, seed);
    let w = random(n * k, seed + 1);
    let bias = random(n, seed + 2);
    let bias = with_bias.then_some(&bias[..]);
    let mut want = vec![0.0; m * n];
    linear_reference(&x, m, &w, n, k, bias, epilogue, &mut want);
    let packed = PackedWeight::pack_for(&w, n, k, isa);
    let mut got = vec![f32::NAN; m * n];
    linear(&x, m, &packed, bias, epilogue, &mut got);
    let err = rel_err(&got, &want);
    assert!(
        err <= TOL,
        "{}: m={m} n={n} k={k} bias={with_bias} {epilogue:?}: err {err}",
        isa.name()
    );
}

#[test]
fn linear_matches_reference_on_odd_shapes() {
    let ms = [1, 2, 7, 13, 16, 33, 100];
    let ns = [1, 5, 17, 33, 384];
    let ks = [1, 3, 31, 384, 1537];
    let variants = [
        (false, Epilogue::None),
        (true, Epilogue::None),
        (false, Epilogue::Gelu),
        (true, Epilogue::Gelu),
    ];
    for isa in Isa::available() {
        for (im, &m) in ms.iter().enumerate() {
            for (i_n, &n) in ns.iter().enumerate() {
                for (ik, &k) in ks.iter().enumerate() {
                    // Every size meets every variant without running all
                    // 4 × 175 reference products.
                    let (with_bias, epilogue) = variants[(im + i_n + ik) % variants.len()];
                    check_linear(isa, m, n, k, with_bias, epilogue);
                }
            }
        }
    }
}

#[test]
fn linear_covers_several_m_and_k_blocks() {
    for isa in Isa::available() {
        check_linear(isa, 333, 70, 600, true, Epilogue::Gelu);
        check_linear(isa, 300, 129, 257, false, Epilogue::None);
    }
}

#[test]
fn linear_with_other_thread_counts() {
    for threads in [1, 3, 4] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for isa in Isa::available() {
                check_linear(isa, 50, 200, 300, true, Epilogue::Gelu);
                check_linear(isa, 7, 40, 2000, true, Epilogue::None);
            }
        });
    }
}

#[test]
fn linear_without_k_is_bias_and_epilogue() {
    for isa in Isa::available() {
        for epilogue in [Epilogue::None, Epilogue::Gelu] {
            check_linear(isa, 3, 20, 0, true, epilogue);
            check_linear(isa, 3, 20, 0, false, epilogue);
        }
    }
}

#[test]
fn pack_unpack_round_trip() {
    for isa in Isa::available() {
        for (n, k) in [(1, 1), (5, 3), (33, 17), (384, 31), (70, 0)] {
            let w = random(n * k, (n * 31 + k) as u64);
            let packed = PackedWeight::pack_for(&w, n, k, isa);
            assert_eq!((packed.n(), packed.k(), packed.isa()), (n, k, isa));
            assert_eq!(packed.unpack(), w, "{}: n={n} k={k}", isa.name());
        }
    }
}

/// `(m, n, k, lda pad, ldb pad, ldc pad, alpha, beta)`.
type StridedCase = (usize, usize, usize, usize, usize, usize, f32, f32);

/// Odd sizes, several K blocks, `beta` 0, 1 and others, and an A whose
/// rows are 4 KiB apart (packed even by kernels that read A in place).
const STRIDED_CASES: [StridedCase; 8] = [
    (1, 1, 1, 0, 0, 0, 1.0, 0.0),
    (13, 17, 64, 5, 3, 7, 0.125, 0.0),
    (64, 100, 32, 96, 64, 1, 1.0, 1.0),
    (200, 45, 300, 2, 11, 3, -0.5, 0.75),
    (37, 64, 513, 0, 0, 0, 2.0, -1.0),
    (150, 33, 7, 1, 1, 1, 1.0, 0.5),
    (300, 385, 1100, 3, 0, 2, 1.0, 1.0),
    (40, 50, 1000, 24, 0, 0, 1.0, 0.0),
];

/// Runs `gemm` (an sgemm under test, given a bias for the threaded one) on
/// every case and every layout of A and B, against the `f64` reference —
/// on A and B rounded to bf16 when `bf16` (a bf16 GEMM must then match to
/// f32 accuracy: the products of bf16 values are exact in f32).
fn check_strided(
    name: &str,
    with_bias: bool,
    bf16: bool,
    gemm: impl Fn(&Case, Strided, Strided, Option<&[f32]>, &mut [f32]),
) {
    for &(m, n, k, pa, pb, pc, alpha, beta) in &STRIDED_CASES {
        for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
            // Stored shapes: A is m × k (k × m when transposed), B k × n.
            let (a_rows, a_cols) = if a_t { (k, m) } else { (m, k) };
            let (b_rows, b_cols) = if b_t { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (a_cols + pa, b_cols + pb, n + pc);
            let seed = (m * 7919 + n * 31 + k) as u64;
            let a = random(a_rows * lda, seed);
            let b = random(b_rows * ldb, seed + 1);
            let bias = random(n, seed + 3);
            let bias = with_bias.then_some(&bias[..]);
            let round = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|&x| if bf16 { round_bf16(x) } else { x })
                    .collect()
            };
            let (a_ref, b_ref) = (round(&a), round(&b));
            let view = |data, ld, t| {
                if t {
                    Strided::transposed(data, ld)
                } else {
                    Strided::rows(data, ld)
                }
            };
            let (a, b) = (view(&a[..], lda, a_t), view(&b[..], ldb, b_t));
            let (a_ref, b_ref) = (view(&a_ref[..], lda, a_t), view(&b_ref[..], ldb, b_t));
            let mut want = random(m * ldc, seed + 2);
            if beta == 0.0 {
                // BLAS semantics: with beta == 0 old NaNs must not leak.
                want.iter_mut().step_by(3).for_each(|v| *v = f32::NAN);
            }
            let mut got = want.clone();
            sgemm_strided_reference(m, n, k, alpha, a_ref, b_ref, beta, &mut want, ldc);
            if let Some(bias) = bias {
                for row in want.chunks_mut(ldc) {
                    row[..n].iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            }
            let case = Case {
                m,
                n,
                k,
                alpha,
                beta,
                ldc,
            };
            gemm(&case, a, b, bias, &mut got);
            // Padding columns of C must be untouched (they hold the same
            // input in both, or NaN in both).
            let (mut got_valid, mut want_valid) = (Vec::new(), Vec::new());
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if i % ldc < n {
                    got_valid.push(g);
                    want_valid.push(w);
                } else {
                    assert_eq!(g.to_bits(), w.to_bits(), "padding of C written");
                }
            }
            let err = rel_err(&got_valid, &want_valid);
            assert!(
                err <= TOL,
                "{name}: m={m} n={n} k={k} a_t={a_t} b_t={b_t}: err {err}"
            );
        }
    }
}

/// The shape and scalars of one [`STRIDED_CASES`] entry.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    ldc: usize,
}

#[test]
fn sgemm_strided_matches_reference() {
    for isa in Isa::available() {
        check_strided(isa.name(), false, false, |t, a, b, _, c| {
            gemm_strided(
                Precision::Fp32,
                isa,
                t.m,
                t.n,
                t.k,
                t.alpha,
                a,
                b,
                t.beta,
                c,
                t.ldc,
            )
        });
    }
}

/// The single-threaded strided GEMM in bf16 (attention's products) on every
/// path a backend can be capped at: the portable bf16 kernel below AVX-512,
/// AVX512_BF16 where the host has it.
#[test]
fn bf16_gemm_strided_matches_reference_on_rounded_inputs() {
    for isa in Isa::available() {
        let name = format!("bf16 strided, {}", isa.name());
        check_strided(&name, false, true, |t, a, b, _, c| {
            gemm_strided(
                Precision::Bf16,
                isa,
                t.m,
                t.n,
                t.k,
                t.alpha,
                a,
                b,
                t.beta,
                c,
                t.ldc,
            )
        });
    }
}

#[test]
fn threaded_sgemm_matches_reference() {
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for isa in Isa::available() {
            for with_bias in [false, true] {
                let name = format!("{} x{threads} bias={with_bias}", isa.name());
                check_strided(&name, with_bias, false, |t, a, b, bias, c| {
                    pool.install(|| {
                        gemm_with(
                            kernel(isa),
                            t.m,
                            t.n,
                            t.k,
                            t.alpha,
                            a,
                            b,
                            t.beta,
                            bias,
                            c,
                            t.ldc,
                        )
                    })
                });
            }
        }
    }
}

/// `x` rounded to the nearest bf16, as an f32.
fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16::to_bf16(x) as u32) << 16)
}

#[test]
fn bf16_rounds_to_nearest_even() {
    let bits = bf16::to_bf16;
    assert_eq!(bits(1.0), 0x3f80);
    assert_eq!(bits(-2.0), 0xc000);
    // Ties go to the even neighbour; anything above a tie rounds up.
    assert_eq!(bits(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(bits(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert_eq!(bits(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(bits(f32::INFINITY), 0x7f80);
    assert_eq!(bits(f32::MAX), 0x7f80, "overflow rounds to infinity");
    assert!(f32::from_bits((bits(f32::NAN) as u32) << 16).is_nan());
    assert_eq!(bits(f32::from_bits(0x8000_0001)), 0x8000, "denormals flush");
}

#[test]
fn bf16_gemm_matches_reference_on_rounded_inputs() {
    let mut kernels = vec![("portable", &bf16::PORTABLE)];
    if bf16::native(Isa::detect()) {
        kernels.push(("avx512bf16", bf16::kernel(Isa::detect())));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for (name, kern) in kernels {
        for with_bias in [false, true] {
            check_strided(name, with_bias, true, |t, a, b, bias, c| {
                pool.install(|| {
                    gemm_with(kern, t.m, t.n, t.k, t.alpha, a, b, t.beta, bias, c, t.ldc)
                })
            });
        }
    }
}

/// The AVX512_BF16 packers (one pass: convert, then transpose slots in
/// registers) against the portable ones, bit for bit, on odd shapes and
/// strides (partial row groups and panels, odd K, K tails past 32), with
/// rounding ties among the values.
#[test]
fn bf16_native_packers_match_portable_bit_for_bit() {
    if !bf16::native(Isa::detect()) {
        eprintln!("no AVX512_BF16 on this host: nothing to compare");
        return;
    }
    let native = bf16::kernel(Isa::detect());
    let portable = &bf16::PORTABLE;
    let (mr, nr) = (native.mr, native.nr);
    let values = |len: usize, seed: u64| -> Vec<f32> {
        let mut v = random(len, seed);
        for (i, x) in v.iter_mut().enumerate() {
            let high = x.to_bits() & 0xffff_0000;
            // Exact ties (to even, both ways) and values just below one.
            match i % 5 {
                0 => *x = f32::from_bits(high | 0x8000),
                1 => *x = f32::from_bits(high | 0x7fff),
                _ => {}
            }
        }
        v
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // Unwritten slots differ: NaN in one, another NaN pattern in the other.
    let buffers = |len: usize| (vec![f32::NAN; len], vec![f32::from_bits(0x7fc0_1234); len]);
    for (rows, k) in [
        (1usize, 1usize),
        (5, 3),
        (12, 32),
        (13, 33),
        (16, 31),
        (17, 64),
        (33, 65),
        (40, 100),
        (144, 1024),
    ] {
        let steps = k.div_ceil(2);
        let seed = (rows * 1009 + k) as u64;
        // Row-major: A as it is, and B read transposed (a weight).
        let ld = k + 3;
        let src = values(rows * ld, seed);
        let (mut want, mut got) = buffers(rows * steps);
        // SAFETY: the native kernel runs on this host (checked above).
        unsafe {
            (portable.pack_a)(&src, ld, rows, k, mr, &mut want);
            (native.pack_a)(&src, ld, rows, k, mr, &mut got);
        }
        assert_eq!(bits(&got), bits(&want), "pack_a {rows}x{k}");
        let (mut want, mut got) = buffers(rows.div_ceil(nr) * steps * nr);
        // SAFETY: as above.
        unsafe {
            (portable.pack_b)(&src, ld, true, k, rows, nr, &mut want);
            (native.pack_b)(&src, ld, true, k, rows, nr, &mut got);
        }
        assert_eq!(bits(&got), bits(&want), "pack_b transposed {k}x{rows}");
        // Stored K-major: A read transposed, B as it is.
        let ld = rows + 5;
        let src = values(k * ld, seed + 1);
        let (mut want, mut got) = buffers(rows * steps);
        // SAFETY: as above.
        unsafe {
            (portable.pack_a_transposed)(&src, ld, rows, k, mr, &mut want);
            (native.pack_a_transposed)(&src, ld, rows, k, mr, &mut got);
        }
        assert_eq!(bits(&got), bits(&want), "pack_a_transposed {rows}x{k}");
        let (mut want, mut got) = buffers(rows.div_ceil(nr) * steps * nr);
        // SAFETY: as above.
        unsafe {
            (portable.pack_b)(&src, ld, false, k, rows, nr, &mut want);
            (native.pack_b)(&src, ld, false, k, rows, nr, &mut got);
        }
        assert_eq!(bits(&got), bits(&want), "pack_b {k}x{rows}");
    }
}

#[test]
fn bf16_packed_weight_rounds_once_and_runs_linear() {
    for (n, k) in [(1, 1), (5, 3), (33, 17), (70, 0)] {
        let w = random(n * k, (n * 31 + k) as u64);
        let packed = PackedWeight::pack_bf16(&w, n, k, Isa::detect());
        assert!(packed.is_bf16());
        let rounded: Vec<f32> = w.iter().map(|&v| round_bf16(v)).collect();
        assert_eq!(packed.unpack(), rounded, "n={n} k={k}");
    }
    // Odd K, several K blocks, bias and GELU epilogues.
    for (m, n, k) in [(1, 384, 384), (13, 33, 1537), (100, 17, 31)] {
        let seed = (m * 1_000_003 + n * 1009 + k) as u64;
        let x = random(m * k, seed);
        let w = random(n * k, seed + 1);
        let bias = random(n, seed + 2);
        let round = |v: &[f32]| v.iter().map(|&x| round_bf16(x)).collect::<Vec<_>>();
        let packed = PackedWeight::pack_bf16(&w, n, k, Isa::detect());
        for epilogue in [Epilogue::None, Epilogue::Gelu] {
            let mut want = vec![0.0; m * n];
            linear_reference(
                &round(&x),
                m,
                &round(&w),
                n,
                k,
                Some(&bias),
                epilogue,
                &mut want,
            );
            let mut got = vec![f32::NAN; m * n];
            linear(&x, m, &packed, Some(&bias), epilogue, &mut got);
            let err = rel_err(&got, &want);
            assert!(err <= TOL, "m={m} n={n} k={k} {epilogue:?}: err {err}");
        }
    }
}

#[test]
fn gelu_matches_reference() {
    let xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 5e-5).collect();
    let want: Vec<f32> = xs.iter().map(|&x| gelu_erf(x)).collect();
    for isa in Isa::available() {
        // Odd length exercises the vector tail.
        let mut got = xs.clone();
        gelu_inplace_isa(isa, &mut got);
        let worst = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(worst <= 1e-6, "{}: worst {worst}", isa.name());
        let mut special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, 0.0];
        gelu_inplace_isa(isa, &mut special);
        assert!(special[0].is_nan(), "{}", isa.name());
        assert_eq!(
            special[1..],
            [f32::INFINITY, 0.0, 1e30, 0.0, 0.0],
            "{}",
            isa.name()
        );
    }
    assert!((gelu_erf(1.0) - 0.841_344_8).abs() < 1e-7);
    assert!((gelu_erf(-3.0) + 0.004_049_694).abs() < 1e-9);
}
