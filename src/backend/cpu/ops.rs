//! Fast element-wise and row-wise CPU ops. Each mirrors the function of the
//! same name in [`super::reference`], which the tests hold it to.

use rayon::prelude::*;

use super::isa::Isa;
use super::simd::{self, multiversion};
use crate::backend::train::Dropout;
use crate::rng;

/// Rows per rayon task: below this, splitting costs more than it saves.
const MIN_ROWS_PER_TASK: usize = 16;

multiversion! {
    fn layer_norm_rows(rows: &mut [f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
        let cols = gamma.len();
        for (r, row) in rows.chunks_exact_mut(cols).enumerate() {
            if let Some(residual) = residual {
                for (v, res) in row.iter_mut().zip(&residual[r * cols..(r + 1) * cols]) {
                    *v += res;
                }
            }
            let mean = simd::sum(row) / cols as f32;
            let mut acc = [0.0f32; simd::LANES];
            let chunks = row.chunks_exact(simd::LANES);
            let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for chunk in chunks {
                for (a, v) in acc.iter_mut().zip(chunk) {
                    *a += (v - mean) * (v - mean);
                }
            }
            let var = (acc.iter().sum::<f32>() + tail) / cols as f32;
            let inv_std = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv_std * g + b;
            }
        }
    }
}

/// `x = LayerNorm(x + residual)` over rows of `gamma.len()`.
pub fn layer_norm(
    isa: Isa,
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let cols = gamma.len();
    x.par_chunks_mut(cols * MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(i, rows)| {
            let start = i * cols * MIN_ROWS_PER_TASK;
            let residual = residual.map(|r| &r[start..start + rows.len()]);
            layer_norm_rows(isa, rows, residual, gamma, beta, eps);
        });
}

/// In-place softmax of each row of `cols`: attention's, over every score.
pub fn softmax_rows(isa: Isa, x: &mut [f32], cols: usize) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `Isa::detect` only reports features the CPU has.
        return unsafe { avx512::softmax_rows(x, cols) };
    }
    softmax_rows_generic(isa, x, cols)
}

multiversion! {
    /// [`softmax_rows`] on the AVX2 and portable paths, written once: the
    /// vectorised [`simd::exp`] is what makes it cheap.
    fn softmax_rows_generic(x: &mut [f32], cols: usize) {
        for row in x.chunks_exact_mut(cols) {
            let max = simd::max(row);
            let mut acc = [0.0f32; simd::LANES];
            let mut chunks = row.chunks_exact_mut(simd::LANES);
            for chunk in &mut chunks {
                for (a, v) in acc.iter_mut().zip(chunk.iter_mut()) {
                    *v = simd::exp(*v - max);
                    *a += *v;
                }
            }
            let mut sum = acc.iter().sum::<f32>();
            for v in chunks.into_remainder() {
                *v = simd::exp(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Softmax in AVX-512 intrinsics. The generic body would compile here too,
/// but Rust never fuses `a * b + c` into an FMA, and the exponential's
/// polynomial is most of softmax's work: with FMAs and `vscalefps` for
/// `2ⁿ` it runs in about half the instructions.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::backend::cpu::simd::lane_mask;

    /// `e^x` per lane: [`super::simd::exp`]'s clamp, reduction and
    /// polynomial, with fused multiply-adds.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(88.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// # Safety
    /// The host must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_rows(x: &mut [f32], cols: usize) {
        for row in x.chunks_exact_mut(cols) {
            let p = row.as_mut_ptr();
            // Masked loads and stores cover the tail, lanes `..cols`.
            let lanes = |j: usize| lane_mask(cols - j);
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for j in (0..cols).step_by(16) {
                // SAFETY: masked-off lanes are not accessed; the rest lie
                // in the row.
                let v = unsafe { _mm512_mask_loadu_ps(max, lanes(j), p.add(j)) };
                max = _mm512_max_ps(max, v);
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
            let mut sum = _mm512_setzero_ps();
            for j in (0..cols).step_by(16) {
                let m = lanes(j);
                // SAFETY: as above.
                unsafe {
                    let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(j)), max));
                    sum = _mm512_mask_add_ps(sum, m, sum, e);
                    _mm512_mask_storeu_ps(p.add(j), m, e);
                }
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            for j in (0..cols).step_by(16) {
                let m = lanes(j);
                // SAFETY: as above.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(m, p.add(j));
                    _mm512_mask_storeu_ps(p.add(j), m, _mm512_mul_ps(v, inv));
                }
            }
        }
    }
}

multiversion! {
    /// Softmax backward in place, over rows of `cols`: given `d`, the
    /// gradient of `p = softmax(scale · s)`, leaves the gradient of `s`,
    /// `p ⊙ (d − Σ d ⊙ p) · scale`.
    pub fn softmax_backward_rows(d: &mut [f32], p: &[f32], cols: usize, scale: f32) {
        for (d_row, p_row) in d.chunks_exact_mut(cols).zip(p.chunks_exact(cols)) {
            let dot = simd::dot(d_row, p_row);
            for (g, &pv) in d_row.iter_mut().zip(p_row) {
                *g = pv * (*g - dot) * scale;
            }
        }
    }
}

multiversion! {
    pub fn mean_pool(out: &mut [f32], input: &[f32], offsets: &[usize]) {
        let cols = out.len() / (offsets.len() - 1);
        for (s, seq) in offsets.windows(2).enumerate() {
            let pooled = &mut out[s * cols..(s + 1) * cols];
            pooled.fill(0.0);
            for row in input[seq[0] * cols..seq[1] * cols].chunks_exact(cols) {
                for (p, v) in pooled.iter_mut().zip(row) {
                    *p += v;
                }
            }
            let inv = 1.0 / (seq[1] - seq[0]) as f32;
            pooled.iter_mut().for_each(|p| *p *= inv);
        }
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    pub fn embedding(
        out: &mut [f32],
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        word: &[f32],
        position: &[f32],
        token_type: &[f32],
        hidden: usize,
    ) {
        for seq in offsets.windows(2) {
            for t in seq[0]..seq[1] {
                let w = &word[ids[t] as usize * hidden..][..hidden];
                let p = &position[(t - seq[0]) * hidden..][..hidden];
                let y = &token_type[type_ids[t] as usize * hidden..][..hidden];
                let o = &mut out[t * hidden..][..hidden];
                for c in 0..hidden {
                    o[c] = w[c] + p[c] + y[c];
                }
            }
        }
    }
}

multiversion! {
    /// Applies `dropout` to `x`, whose first element is element `first` of
    /// the masked tensor (the mask is a function of the element's index, so
    /// any split of the tensor between threads gives the same result).
    /// Multiversioned: the counter hash vectorises with AVX-512's 64-bit
    /// multiplies, which matters on attention probabilities (batch × heads
    /// × len² elements, three passes per layer in training).
    pub fn dropout_slice(x: &mut [f32], dropout: Dropout, first: usize) {
        if dropout.is_off() {
            return;
        }
        let keep_scale = 1.0 / (1.0 - dropout.p);
        for (i, v) in x.iter_mut().enumerate() {
            *v = dropped(*v, dropout, keep_scale, first + i);
        }
    }
}

multiversion! {
    /// `dst = dropout(src)`: [`dropout_slice`] applied to a copy of `src`,
    /// the same mask bit for bit, in one pass instead of a copy and a
    /// pass (attention regenerates dropped probabilities from the saved
    /// ones this way).
    pub fn dropout_into(dst: &mut [f32], src: &[f32], dropout: Dropout, first: usize) {
        assert_eq!(dst.len(), src.len(), "dropout_into: lengths differ");
        let keep_scale = 1.0 / (1.0 - dropout.p);
        for (i, (d, &v)) in dst.iter_mut().zip(src).enumerate() {
            *d = dropped(v, dropout, keep_scale, first + i);
        }
    }
}

/// Element `index` of a tensor, `v`, after `dropout` (`keep_scale` is
/// `1 / (1 - p)`): the mask is a hash of the index.
#[inline(always)]
fn dropped(v: f32, dropout: Dropout, keep_scale: f32, index: usize) -> f32 {
    let u = rng::uniform_at(dropout.seed, index as u64);
    if u < dropout.p {
        0.0
    } else {
        v * keep_scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_is_the_same_mask_on_every_path() {
        let dropout = Dropout { p: 0.1, seed: 42 };
        let input: Vec<f32> = (0..10_007).map(|i| i as f32 * 0.5 + 1.0).collect();
        let mut want = input.clone();
        dropout_slice(Isa::Portable, &mut want, dropout, 123);
        for isa in Isa::available() {
            let mut got = input.clone();
            dropout_slice(isa, &mut got, dropout, 123);
            assert_eq!(got, want, "{}", isa.name());
        }
        let dropped = want.iter().filter(|&&v| v == 0.0).count() as f64 / want.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped {dropped}");
        let kept = input.iter().zip(&want).find(|(_, &w)| w != 0.0).unwrap();
        assert_eq!(*kept.1, kept.0 / 0.9);
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; input.len()];
            dropout_into(isa, &mut got, &input, dropout, 123);
            assert_eq!(got, want, "dropout_into {}", isa.name());
        }
    }
}
