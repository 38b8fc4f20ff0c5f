//! Helpers for SIMD without intrinsics: element-wise kernels are written once
//! as plain loops over fixed-width lane arrays, and [`multiversion!`] compiles
//! each for AVX-512, AVX2+FMA and the portable target, picked by [`Isa`] at
//! run time. LLVM turns the lane loops into full-width vector code.
//!
//! [`Isa`]: super::isa::Isa

/// Lanes per accumulator array: one AVX-512 register, two AVX2 registers.
pub const LANES: usize = 16;

/// Defines `fn name(isa: Isa, args..)` that runs `body` compiled for `isa`.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::backend::cpu::isa::Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            fn avx512($($arg: $ty),*) {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) {
                body($($arg),*)
            }

            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::detect` only reports features the CPU has.
                $crate::backend::cpu::isa::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                $crate::backend::cpu::isa::Isa::Avx2Fma => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// An AVX-512 write mask with lanes `0..min(count, 16)` set: how the
/// intrinsic kernels load and store the partial vector at a row's end.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn lane_mask(count: usize) -> std::arch::x86_64::__mmask16 {
    if count >= 16 {
        0xffff
    } else {
        ((1u32 << count) - 1) as std::arch::x86_64::__mmask16
    }
}

/// Sum of a slice, accumulated in [`LANES`] independent lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// `Σ x·y`, in lane partial sums.
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let xs = x.chunks_exact(LANES);
    let ys = y.chunks_exact(LANES);
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (xc, yc) in xs.zip(ys) {
        for ((a, u), v) in acc.iter_mut().zip(xc).zip(yc) {
            *a += u * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ (x - mean)²`, in lane partial sums.
#[inline(always)]
pub fn sum_squared_deviation(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += (v - mean) * (v - mean);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            // Not `f32::max`: its NaN rule costs a compare and blend per
            // vector; scores are never NaN.
            *a = if *v > *a { *v } else { *a };
        }
    }
    tail.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `e^x` to about 2 ulp for x in [-87, 88] (clamped outside, so softmax
/// scores far below the row maximum give ~1e-38 rather than 0).
///
/// Cody–Waite reduction `x = n·ln2 + r`, |r| <= ln2/2, then a degree-6
/// Taylor polynomial for `e^r` and `2^n` built in the exponent bits. Written
/// without branches or calls so that it vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let rounded = x * LOG2E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // `rounded`'s low mantissa bits hold n (two's complement), and
    // ROUND's low 23 bits are zero, so shifting `bits + 127` left by 23
    // leaves `(n + 127) << 23`: 2^n without a float-to-int conversion,
    // whose saturating `as` kept LLVM from vectorising this function.
    let two_to_n = f32::from_bits(rounded.to_bits().wrapping_add(127) << 23);
    p * two_to_n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn reductions_handle_tails() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 - 3.0).collect();
        assert_eq!(sum(&x), x.iter().sum::<f32>());
        assert_eq!(max(&x), 33.0);
        assert_eq!(dot(&x, &x), x.iter().map(|v| v * v).sum::<f32>());
    }
}
