//! Plain-loop references that the fast paths are tested against.
//!
//! Everything here accumulates in `f64` and evaluates GELU with a
//! double-precision erf, so the references are more accurate than any `f32`
//! kernel and differences measure the kernel's error alone.

use super::{Epilogue, Strided};

use std::f64::consts::FRAC_2_SQRT_PI;

/// Below this the positive-term series is used, above it the continued
/// fraction; both converge quickly at the switch point.
const SERIES_LIMIT: f64 = 3.0;

/// `erf(x)` to about 1e-15 absolute (only the tests need `erf` itself).
#[cfg(test)]
fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < SERIES_LIMIT {
        erf_series(a)
    } else {
        1.0 - erfc_continued_fraction(a)
    };
    r.copysign(x)
}

/// `erfc(x)` with full relative accuracy in the tail (the GELU reference needs
/// `erfc` of large arguments for very negative inputs).
pub(crate) fn erfc_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return 2.0 - erfc_f64(-x);
    }
    if x < SERIES_LIMIT {
        1.0 - erf_series(x)
    } else {
        erfc_continued_fraction(x)
    }
}

/// `erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n (2x^2)^n x / (2n+1)!!` for
/// `x >= 0`; every term is positive, so there is no cancellation.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term > sum * 1e-18 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    FRAC_2_SQRT_PI * (-x2).exp() * sum
}

/// `erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))`
/// for `x >= 3`, evaluated bottom-up with enough terms for f64 precision.
fn erfc_continued_fraction(x: f64) -> f64 {
    if x > 27.0 {
        // exp(-x^2) underflows to zero well before this.
        return 0.0;
    }
    let mut tail = x;
    for n in (1..=120).rev() {
        tail = x + (n as f64 * 0.5) / tail;
    }
    0.5 * FRAC_2_SQRT_PI * (-x * x).exp() / tail
}

/// Exact GELU in double precision: `0.5 * x * (1 + erf(x / sqrt(2)))`, written
/// with `erfc` so that the negative tail keeps its relative accuracy.
pub(crate) fn gelu_f64(x: f64) -> f64 {
    0.5 * x * erfc_f64(-x * std::f64::consts::FRAC_1_SQRT_2)
}

fn apply_epilogue(v: f64, epilogue: Epilogue) -> f64 {
    match epilogue {
        Epilogue::None => v,
        Epilogue::Gelu => gelu_f64(v),
    }
}

/// Scalar reference for [`super::linear`]; accumulates in `f64`.
#[allow(clippy::too_many_arguments)] // mirrors `linear` plus the raw weight's shape
pub fn linear_reference(
    x: &[f32],
    m: usize,
    weight: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    assert!(x.len() >= m * k, "x has {} values, need {}", x.len(), m * k);
    assert!(weight.len() >= n * k, "weight too short");
    assert!(out.len() >= m * n, "out too short");
    if let Some(b) = bias {
        assert!(b.len() >= n, "bias too short");
    }
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let w = &weight[j * k..(j + 1) * k];
            let mut acc: f64 = row.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
            if let Some(b) = bias {
                acc += b[j] as f64;
            }
            out[i * n + j] = apply_epilogue(acc, epilogue) as f32;
        }
    }
}

/// Scalar reference for [`super::sgemm_strided`] and [`super::sgemm`]
/// (without bias); accumulates in `f64`. Like BLAS, `beta == 0` ignores the
/// old contents of `c` (even NaN).
#[allow(clippy::too_many_arguments)] // the BLAS sgemm signature
pub fn sgemm_strided_reference(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    let at = |s: Strided, r: usize, col: usize| {
        if s.transposed {
            s.data[col * s.ld + r]
        } else {
            s.data[r * s.ld + col]
        }
    };
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                acc += at(a, i, p) as f64 * at(b, p, j) as f64;
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * ldc + j] as f64
            };
            c[i * ldc + j] = (old + alpha as f64 * acc) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Values from Abramowitz & Stegun / mpmath.
        let cases = [
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.5, 0.999_593_047_982_555),
            (3.5, 0.999_999_256_901_627_7),
        ];
        for (x, want) in cases {
            assert!((erf_f64(x) - want).abs() < 1e-15, "erf({x})");
            assert!((erf_f64(-x) + want).abs() < 1e-15, "erf(-{x})");
        }
        let tails = [
            (3.0, 2.209_049_699_858_544e-5),
            (4.0, 1.541_725_790_028_002e-8),
            (5.0, 1.537_459_794_428_035e-12),
            (10.0, 2.088_487_583_762_545e-45),
        ];
        for (x, want) in tails {
            assert!((erfc_f64(x) / want - 1.0).abs() < 1e-14, "erfc({x})");
        }
        assert_eq!(erfc_f64(30.0), 0.0);
        assert!(erf_f64(f64::NAN).is_nan());
    }

    #[test]
    fn series_and_continued_fraction_agree_near_the_switch() {
        for i in 0..=40 {
            let x = 2.0 + i as f64 * 0.05;
            let series = 1.0 - erf_series(x);
            let cf = erfc_continued_fraction(x);
            assert!((series - cf).abs() < 3e-15, "x={x}: {series} vs {cf}");
        }
    }
}
