//! Every kernel against the reference on the same quantized values, and the
//! quantized product against f32.

use super::*;
use crate::backend::cpu::gemm::{linear_reference, Epilogue};

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

/// Every kernel this host runs, named, with the weight path to quantize
/// for (the layout is shared, so the test-only kernel borrows one).
fn kernels() -> Vec<(&'static str, Int8Isa, &'static Kernel)> {
    let named = Int8Isa::available()
        .into_iter()
        .map(|isa| (isa.name(), isa, kernel(isa)));
    #[cfg(target_arch = "x86_64")]
    let named = named.chain(
        Int8Isa::available()
            .contains(&Int8Isa::Avx512Vnni)
            .then_some((
                "avx-vnni body (evex)",
                Int8Isa::Avx512Vnni,
                &avx2::KERNEL_VNNI_EVEX,
            )),
    );
    named.collect()
}

/// Runs `kern` and the reference on one random case and compares: bit for
/// bit without GELU; within the SIMD GELU's accuracy (1e-6 absolute near
/// zero, a few ulps beyond) with it.
#[allow(clippy::too_many_arguments)] // the case, spelled out for messages
fn check(
    name: &str,
    isa: Int8Isa,
    kern: &Kernel,
    m: usize,
    n: usize,
    k: usize,
    with_bias: bool,
    gelu: bool,
) {
    let seed = (m * 1_000_003 + n * 1009 + k) as u64;
    // Rows of different magnitudes, so row scales differ.
    let mut x = random(m * k, seed);
    for (i, row) in x.chunks_mut(k.max(1)).enumerate() {
        row.iter_mut().for_each(|v| *v *= 1.0 + i as f32 * 0.37);
    }
    let w = random(n * k, seed + 1);
    let bias = random(n, seed + 2);
    let bias = with_bias.then_some(&bias[..]);
    let q = QuantizedWeight::quantize_for(&w, n, k, isa);
    let mut want = vec![0.0; m * n];
    linear_int8_reference(&x, m, &q, bias, gelu, &mut want);
    let mut got = vec![f32::NAN; m * n];
    linear_with(kern, &x, m, &q, bias, gelu, &mut got);
    for (idx, (&g, &r)) in got.iter().zip(&want).enumerate() {
        let ok = if gelu {
            (g - r).abs() <= 1e-6 * r.abs().max(1.0)
        } else {
            g.to_bits() == r.to_bits() || g == r
        };
        assert!(
            ok,
            "{name}: m={m} n={n} k={k} bias={with_bias} gelu={gelu}: \
             out[{}, {}] = {g}, reference {r}",
            idx / n,
            idx % n
        );
    }
}

#[test]
fn every_path_matches_reference_on_odd_shapes() {
    let ms = [1, 3, 17, 64, 130];
    let ns = [1, 7, 33, 384];
    let ks = [4, 31, 384, 1536];
    let variants = [(false, false), (true, false), (false, true), (true, true)];
    for (name, isa, kern) in kernels() {
        for (im, &m) in ms.iter().enumerate() {
            for (i_n, &n) in ns.iter().enumerate() {
                for (ik, &k) in ks.iter().enumerate() {
                    // Every size meets every variant without running all
                    // 4 × 80 reference products.
                    let (with_bias, gelu) = variants[(im + i_n + ik) % variants.len()];
                    check(name, isa, kern, m, n, k, with_bias, gelu);
                }
            }
        }
    }
}

#[test]
fn every_path_splits_over_other_thread_counts() {
    for threads in [1, 3, 4] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for (name, isa, kern) in kernels() {
                // All above every kernel's `parallel_macs`. Parallel quantization and an
                // M split; an N split at small M; several weight blocks
                // (K = 3000 makes panels of 141 KiB, BLOCK_BYTES holds 2).
                check(name, isa, kern, 200, 100, 400, true, true);
                check(name, isa, kern, 7, 400, 2000, true, false);
                check(name, isa, kern, 20, 300, 3000, false, false);
            }
        });
    }
}

/// Calls from inside rayon tasks: a thread waiting on its own call's tasks
/// may run another call, which must not touch the busy scratch buffer.
#[test]
fn nested_calls_agree() {
    let (m, n, k) = (64, 200, 400);
    let x = random(m * k, 5);
    let q = QuantizedWeight::quantize(&random(n * k, 6), n, k);
    let mut want = vec![0.0; m * n];
    linear_int8(&x, m, &q, None, true, &mut want);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let outs: Vec<Vec<f32>> = pool.install(|| {
        (0..8)
            .into_par_iter()
            .map(|_| {
                let mut out = vec![0.0; m * n];
                linear_int8(&x, m, &q, None, true, &mut out);
                out
            })
            .collect()
    });
    for out in outs {
        assert_eq!(out, want);
    }
}

#[test]
fn without_k_the_output_is_the_bias() {
    for (name, isa, kern) in kernels() {
        for gelu in [false, true] {
            check(name, isa, kern, 3, 20, 0, true, gelu);
            check(name, isa, kern, 3, 20, 0, false, gelu);
        }
    }
}

#[test]
fn non_finite_rows_give_nan_rows() {
    let (m, n, k) = (3, 40, 64);
    let mut x = random(m * k, 7);
    x[5] = f32::NAN;
    x[2 * k + 9] = f32::INFINITY;
    let w = random(n * k, 8);
    for (name, isa, kern) in kernels() {
        let q = QuantizedWeight::quantize_for(&w, n, k, isa);
        let mut out = vec![0.0; m * n];
        linear_with(kern, &x, m, &q, None, false, &mut out);
        for (i, row) in out.chunks(n).enumerate() {
            let finite = i == 1;
            assert!(
                row.iter()
                    .all(|v| v.is_finite() == finite && v.is_nan() != finite),
                "{name}: row {i}: {row:?}"
            );
        }
    }
}

#[test]
fn weight_quantization_round_trips() {
    for isa in Int8Isa::available() {
        for (n, k) in [(1, 1), (5, 3), (33, 17), (50, 384), (70, 0)] {
            let mut w = random(n * k, (n * 31 + k) as u64);
            if n > 2 && k > 0 {
                // A zero channel: scale 0, all weights 0.
                w[2 * k..3 * k].fill(0.0);
            }
            let q = QuantizedWeight::quantize_for(&w, n, k, isa);
            assert_eq!((q.n(), q.k(), q.isa()), (n, k, isa));
            let ints = q.to_int8();
            let deq = q.dequantize();
            for j in 0..n {
                let row = &w[j * k..][..k];
                let qrow = &ints[j * k..][..k];
                let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(q.scales()[j], max / 127.0);
                assert_eq!(q.col_sums()[j], qrow.iter().map(|&v| v as i32).sum::<i32>());
                if max > 0.0 {
                    // The largest magnitude maps to ±127 exactly.
                    assert_eq!(qrow.iter().map(|v| v.unsigned_abs()).max(), Some(127));
                } else {
                    assert!(qrow.iter().all(|&v| v == 0));
                }
                // Rounding to nearest: within half a step (plus the
                // rounding of the scale itself).
                let step = q.scales()[j];
                for (p, (&d, &v)) in deq[j * k..][..k].iter().zip(row).enumerate() {
                    assert!(
                        (d - v).abs() <= 0.5 * step * (1.0 + 1e-5),
                        "{}: n={n} k={k} w[{j},{p}] = {v} -> {d}",
                        isa.name()
                    );
                }
            }
            let again = QuantizedWeight::from_int8(&ints, q.scales(), n, k, isa);
            assert_eq!(again.to_int8(), ints);
            assert_eq!(again.col_sums(), q.col_sums());
        }
    }
}

#[test]
fn rows_round_to_nearest_even() {
    let x = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -127.0, 0.49];
    let mut q = [0u8; 9];
    assert_eq!(quantize_row(&x, None, &mut q, 0), 1.0);
    let q: Vec<i8> = q.iter().map(|&v| v as i8).collect();
    assert_eq!(q, [127, 0, 2, 2, 0, -2, 64, -127, 0]);
    let mut offset = [0u8; 9];
    quantize_row(&x, None, &mut offset, 0x80);
    assert_eq!(offset[..3], [255, 128, 130]);
    let mut zero = [7u8; 3];
    assert_eq!(quantize_row(&[0.0; 3], None, &mut zero, 0), 0.0);
    assert_eq!(zero, [0; 3]);
}

/// `vpmaddubsw` saturates pairs at `i16`: the largest products, all of one
/// sign, must still sum exactly on every path.
#[test]
fn extreme_products_do_not_saturate() {
    let (m, n, k) = (5, 40, 1536);
    let x: Vec<f32> = (0..m * k)
        .map(|i| if (i / 3) % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut w: Vec<f32> = x[..k].iter().cycle().take(n * k).copied().collect();
    // Half the channels the negation: the most negative sums too.
    for v in &mut w[n / 2 * k..] {
        *v = -*v;
    }
    for (name, isa, kern) in kernels() {
        let q = QuantizedWeight::quantize_for(&w, n, k, isa);
        let mut out = vec![0.0; m * n];
        linear_with(kern, &x, m, &q, None, false, &mut out);
        for (idx, &v) in out.iter().enumerate() {
            let want = if idx % n < n / 2 {
                k as f32
            } else {
                -(k as f32)
            };
            assert_eq!(v, want, "{name}: out[{}, {}]", idx / n, idx % n);
        }
    }
}

#[test]
#[should_panic(expected = "-127..=127")]
fn from_int8_rejects_minus_128() {
    QuantizedWeight::from_int8(&[1, -128], &[1.0], 1, 2, Int8Isa::Portable);
}

/// INT8 against f32 on the same inputs: every output within the worst case
/// of the two quantization errors, and small on average.
fn check_against_f32(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (f64, f64) {
    let bias = random(n, 99);
    let mut exact = vec![0.0; m * n];
    linear_reference(x, m, w, n, k, Some(&bias), Epilogue::None, &mut exact);
    let q = QuantizedWeight::quantize(w, n, k);
    let mut got = vec![0.0; m * n];
    linear_int8(x, m, &q, Some(&bias), false, &mut got);
    let (mut err2, mut ref2, mut dot, mut got2) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for i in 0..m {
        let xr = &x[i * k..][..k];
        let sx = xr.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
        for j in 0..n {
            let wr = &w[j * k..][..k];
            let sw = q.scales()[j] as f64;
            // |Δx| <= sx/2, |Δw| <= sw/2, so
            // |Σ (x+Δx)(w+Δw) - Σ xw| <= Σ (|x| sw + |w| sx)/2 + k sx sw/4.
            let bound: f64 = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| (a.abs() as f64 * sw + b.abs() as f64 * sx) / 2.0)
                .sum::<f64>()
                + k as f64 * sx * sw / 4.0;
            let (g, e) = (got[i * n + j] as f64, exact[i * n + j] as f64);
            assert!(
                (g - e).abs() <= bound * 1.01 + 1e-5 * e.abs().max(1.0),
                "m={m} n={n} k={k}: out[{i},{j}] = {g}, f32 {e}, bound {bound}"
            );
            err2 += (g - e) * (g - e);
            ref2 += e * e;
            dot += g * e;
            got2 += g * g;
        }
    }
    ((err2 / ref2).sqrt(), dot / (ref2.sqrt() * got2.sqrt()))
}

#[test]
fn int8_is_close_to_f32() {
    let (m, n, k) = (64, 384, 384);
    let x = random(m * k, 1);
    let w = random(n * k, 2);
    let (rel, cos) = check_against_f32(&x, &w, m, n, k);
    // Uniform data: each factor's rounding error is uniform over a step of
    // max/127, which predicts a relative RMS error of sqrt(1/2)/127 = 0.56%.
    assert!(rel < 0.008, "relative RMS error {rel}");
    assert!(cos > 0.9999, "cosine {cos}");

    // An outlier channel (as in BERT's FFN inputs) coarsens its rows' step
    // 20-fold: still within the bound, but visibly worse.
    let mut x = x;
    for row in x.chunks_mut(k) {
        row[17] = 20.0;
    }
    let (rel_outlier, _) = check_against_f32(&x, &w, m, n, k);
    assert!(rel_outlier > 2.0 * rel, "outlier {rel_outlier} vs {rel}");
}

#[test]
fn detect_is_available() {
    let available = Int8Isa::available();
    assert!(available.contains(&Int8Isa::detect()));
    assert_eq!(available[0], Int8Isa::Portable);
}

/// SmoothQuant factors for `x` `[m, k]` and `w` `[n, k]`:
/// `s[p] = sqrt(max |x[:, p]| / max |w[:, p]|)` (α = 0.5).
fn smoothing_for(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    let channel_max = |a: &[f32]| {
        let mut max = vec![0.0f32; k];
        for row in a.chunks(k) {
            max.iter_mut()
                .zip(row)
                .for_each(|(m, v)| *m = m.max(v.abs()));
        }
        max
    };
    let (xm, wm) = (channel_max(x), channel_max(w));
    xm.iter().zip(&wm).map(|(a, b)| (a / b).sqrt()).collect()
}

#[test]
fn smoothed_weights_match_reference_on_every_path() {
    for (name, isa, kern) in kernels() {
        for (m, n, k) in [(3, 33, 31), (17, 96, 384), (130, 50, 1536)] {
            let mut x = random(m * k, (m + n + k) as u64);
            for row in x.chunks_mut(k) {
                row[k / 2] *= 30.0;
            }
            let w = random(n * k, 3);
            let bias = random(n, 4);
            let q = QuantizedWeight::quantize_smoothed(&w, n, k, &smoothing_for(&x, &w, k), isa);
            let mut want = vec![0.0; m * n];
            linear_int8_reference(&x, m, &q, Some(&bias), false, &mut want);
            let mut got = vec![f32::NAN; m * n];
            linear_with(kern, &x, m, &q, Some(&bias), false, &mut got);
            assert_eq!(got, want, "{name}: m={m} n={n} k={k}");
        }
    }
}

#[test]
fn smoothing_restores_precision_lost_to_an_outlier_channel() {
    let (m, n, k) = (64, 384, 384);
    let mut x = random(m * k, 1);
    for row in x.chunks_mut(k) {
        row[17] = 20.0;
    }
    let w = random(n * k, 2);
    let mut exact = vec![0.0; m * n];
    linear_reference(&x, m, &w, n, k, None, Epilogue::None, &mut exact);
    let relative_error = |q: &QuantizedWeight| {
        let mut got = vec![0.0; m * n];
        linear_int8(&x, m, q, None, false, &mut got);
        let err: f64 = got
            .iter()
            .zip(&exact)
            .map(|(g, e)| ((g - e) as f64).powi(2))
            .sum();
        let norm: f64 = exact.iter().map(|e| (*e as f64).powi(2)).sum();
        (err / norm).sqrt()
    };
    let plain = relative_error(&QuantizedWeight::quantize(&w, n, k));
    let smoothed =
        QuantizedWeight::quantize_smoothed(&w, n, k, &smoothing_for(&x, &w, k), Int8Isa::detect());
    let smooth = relative_error(&smoothed);
    assert!(smooth < 0.5 * plain, "smoothed {smooth} vs plain {plain}");
    // Dequantizing undoes the factors.
    let deq = smoothed.dequantize();
    let worst = deq
        .iter()
        .zip(&w)
        .map(|(d, v)| (d - v).abs())
        .fold(0.0, f32::max);
    assert!(worst < 0.05, "dequantized weight off by {worst}");
}
