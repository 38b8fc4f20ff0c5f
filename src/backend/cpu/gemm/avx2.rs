//! AVX2+FMA micro-kernel: 6 × 16 tile, 12 ymm accumulators, two B vectors
//! and one A broadcast live per K step (15 of 16 registers).
//!
//! AVX2 has no cheap masked stores, so partial-width tiles are staged
//! through a stack buffer; row edges use a kernel instantiated for the exact
//! row count.

use std::arch::x86_64::*;

use super::{gelu, Kernel, Tile};

const MR: usize = 6;
const NR: usize = 16;

pub(super) static KERNEL: Kernel = Kernel {
    mr: MR,
    nr: NR,
    k_pack: 1,
    // A 256 × 16 B micro-panel (16 KiB) stays in L1 across the row loop,
    // and a 96 × 256 A block (96 KiB) in L2.
    kc: 256,
    mc: 96,
    tile,
    reads_a_in_place: false,
    pack_a,
    pack_a_transposed: super::pack::pack_a_transposed,
    pack_b,
    gelu: gelu_slice,
};

/// # Safety
/// The host must support AVX2 and FMA, and `t` must satisfy the contract on
/// [`Tile`].
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(t: &Tile) {
    // SAFETY (all arms): forwarded contract; `rows` selects the panel height.
    unsafe { for_tile_rows!(tile_rows, t, MR, [6, 5, 4, 3, 2, 1]) }
}

/// # Safety
/// As for [`tile`], with `t.rows == R`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_rows<const R: usize>(t: &Tile) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (mut a, mut b) = (t.a, t.b);
    for _ in 0..t.kc {
        // SAFETY: the packed panels hold `kc` steps of `R` and `NR` floats;
        // the pointers advance one step per iteration.
        unsafe {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*a.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
            a = a.add(R);
            b = b.add(NR);
        }
    }
    if t.cols == NR {
        // SAFETY: forwarded contract; the tile is full width.
        unsafe { store(t, t.c, t.ldc, t.bias, acc) };
        return;
    }
    // Partial width: copy the valid columns into a full-width buffer, run
    // the same epilogue there, and copy them back.
    let mut c_buf = [[0.0f32; NR]; R];
    let mut bias_buf = [0.0f32; NR];
    for (i, row) in c_buf.iter_mut().enumerate() {
        if t.beta != 0.0 {
            // SAFETY: row `i < rows` of the tile holds `cols` floats.
            let src = unsafe { std::slice::from_raw_parts(t.c.add(i * t.ldc), t.cols) };
            row[..t.cols].copy_from_slice(src);
        }
    }
    let bias = if t.bias.is_null() {
        std::ptr::null()
    } else {
        // SAFETY: a non-null bias holds `cols` floats.
        bias_buf[..t.cols].copy_from_slice(unsafe { std::slice::from_raw_parts(t.bias, t.cols) });
        bias_buf.as_ptr()
    };
    // SAFETY: the buffers are full `R × NR` tiles.
    unsafe { store(t, c_buf.as_mut_ptr().cast(), NR, bias, acc) };
    for (i, row) in c_buf.iter().enumerate() {
        // SAFETY: as for the copy in.
        let dst = unsafe { std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), t.cols) };
        dst.copy_from_slice(&row[..t.cols]);
    }
}

/// Applies `alpha`, `beta`, bias and GELU to the accumulators and writes a
/// full-width tile to `c`.
///
/// # Safety
/// `c` must hold `R` rows of `NR` floats at stride `ldc`, and `bias`, unless
/// null, `NR` floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store<const R: usize>(
    t: &Tile,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    acc: [[__m256; 2]; R],
) {
    let alpha = _mm256_set1_ps(t.alpha);
    let beta = _mm256_set1_ps(t.beta);
    let mut bias_v = [_mm256_setzero_ps(); 2];
    if !bias.is_null() {
        for (h, v) in bias_v.iter_mut().enumerate() {
            // SAFETY: `bias` holds `NR` floats.
            *v = unsafe { _mm256_loadu_ps(bias.add(8 * h)) };
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for h in 0..2 {
            // SAFETY: row `i < R`, lanes `8h..8h+8` of `NR`.
            let ch = unsafe { c.add(i * ldc + 8 * h) };
            let mut v = _mm256_fmadd_ps(row[h], alpha, bias_v[h]);
            if t.beta != 0.0 {
                // SAFETY: as above.
                v = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(ch) }, beta, v);
            }
            if t.gelu {
                v = gelu_vec(v);
            }
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(ch, v) };
        }
    }
}

/// A row of the GELU table in a ymm.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn table(row: &[f32; gelu::INTERVALS]) -> __m256 {
    // SAFETY: `row` holds 8 floats, exactly one ymm load.
    unsafe { _mm256_loadu_ps(row.as_ptr()) }
}

/// GELU of 8 lanes; the algorithm is described in `gelu.rs`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn gelu_vec(x: __m256) -> __m256 {
    let limit = _mm256_set1_ps(gelu::LIMIT);
    let a = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    // `minps` returns its second operand for NaN, like `f32::min`.
    let a_clamped = _mm256_min_ps(a, limit);
    let idx = _mm256_cvttps_epi32(_mm256_mul_ps(a_clamped, _mm256_set1_ps(gelu::INV_WIDTH)));
    let idx = _mm256_min_epi32(idx, _mm256_set1_epi32(gelu::INTERVALS as i32 - 1));
    let t = _mm256_sub_ps(
        a_clamped,
        _mm256_permutevar8x32_ps(table(&gelu::CENTERS), idx),
    );
    let mut q = _mm256_permutevar8x32_ps(table(&gelu::COEFFS[gelu::DEGREE]), idx);
    for row in gelu::COEFFS[..gelu::DEGREE].iter().rev() {
        q = _mm256_fmadd_ps(q, t, _mm256_permutevar8x32_ps(table(row), idx));
    }
    // Ordered compare: NaN is not "beyond the table" and keeps propagating.
    let beyond = _mm256_cmp_ps::<_CMP_GE_OQ>(a, limit);
    let r = _mm256_andnot_ps(beyond, _mm256_mul_ps(x, q));
    let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_setzero_ps());
    _mm256_blendv_ps(r, _mm256_sub_ps(x, r), positive)
}

/// # Safety
/// The host must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice(x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let p = chunk.as_mut_ptr();
        // SAFETY: the chunk holds 8 floats.
        unsafe { _mm256_storeu_ps(p, gelu_vec(_mm256_loadu_ps(p))) };
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        // Stage the tail so it gets the same arithmetic as full vectors.
        let mut buf = [0.0f32; 8];
        buf[..rest.len()].copy_from_slice(rest);
        // SAFETY: `buf` holds 8 floats.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), gelu_vec(_mm256_loadu_ps(buf.as_ptr()))) };
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}

/// Packs A into `mr`-row panels like [`super::pack::pack_a`], transposing
/// in registers (the scalar version's strided stores cost a sixth of the
/// GEMM time when M is large). Also used by the AVX-512 kernel.
///
/// # Safety
/// The host must support AVX2.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pack_a(
    src: &[f32],
    lda: usize,
    mc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    assert!(
        mc == 0 || kc == 0 || src.len() >= (mc - 1) * lda + kc,
        "A block out of bounds"
    );
    for (r, panel) in dst[..mc * kc].chunks_mut(mr * kc).enumerate() {
        let rows = panel.len() / kc;
        // SAFETY: the panel's rows exist in `src` (asserted above) and the
        // panel holds `kc * rows` floats.
        unsafe { transpose_block(&src[r * mr * lda..], lda, rows, kc, panel, rows, mr * lda) };
    }
}

/// Packs B into `nr`-column panels like [`super::pack::pack_b`]; the
/// transposed case (weights, Kᵀ in attention) transposes in registers.
///
/// # Safety
/// The host must support AVX2.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pack_b(
    src: &[f32],
    ldb: usize,
    transposed: bool,
    k: usize,
    n: usize,
    nr: usize,
    dst: &mut [f32],
) {
    if !transposed || k == 0 {
        // Row-major B packs by plain row copies already.
        return super::pack::pack_b(src, ldb, transposed, k, n, nr, dst);
    }
    assert!(n == 0 || src.len() >= (n - 1) * ldb + k, "B out of bounds");
    let panel_len = k * nr;
    for (q, panel) in dst[..n.div_ceil(nr) * panel_len]
        .chunks_exact_mut(panel_len)
        .enumerate()
    {
        let cols = nr.min(n - q * nr);
        // SAFETY: the panel's source rows exist (asserted above) and the
        // panel holds `k * nr` floats.
        unsafe { transpose_block(&src[q * nr * ldb..], ldb, cols, k, panel, nr, nr * ldb) };
        if cols < nr {
            for out in panel.chunks_exact_mut(nr) {
                out[cols..].fill(0.0);
            }
        }
    }
}

/// Writes `rows` rows of `kc` floats from `src` (row stride `ld`) column by
/// column: element `(i, p)` goes to `dst[p * stride + i]`. Rows go 8, then
/// 4 at a time through registers, the last 0..3 one by one. `ahead` is the
/// prefetch distance: the same columns of the rows one panel further down.
///
/// # Safety
/// `src` must hold `(rows - 1) * ld + kc` floats and `dst`
/// `(kc - 1) * stride + rows`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn transpose_block(
    src: &[f32],
    ld: usize,
    rows: usize,
    kc: usize,
    dst: &mut [f32],
    stride: usize,
    ahead: usize,
) {
    let mut i = 0;
    while i + 8 <= rows {
        // SAFETY: rows `i..i + 8` exist; forwarded bounds.
        unsafe { transpose_rows::<8>(&src[i * ld..], ld, kc, &mut dst[i..], stride, ahead) };
        i += 8;
    }
    if i + 4 <= rows {
        // SAFETY: rows `i..i + 4` exist; forwarded bounds.
        unsafe { transpose_rows::<4>(&src[i * ld..], ld, kc, &mut dst[i..], stride, ahead) };
        i += 4;
    }
    for ii in i..rows {
        for (p, &v) in src[ii * ld..][..kc].iter().enumerate() {
            dst[p * stride + ii] = v;
        }
    }
}

/// Writes `R` (8 or 4) rows of `kc` floats from `src` (row stride `lda`)
/// column by column: element `(i, p)` goes to `dst[p * stride + i]`.
///
/// # Safety
/// `src` must hold `(R - 1) * lda + kc` floats and `dst`
/// `(kc - 1) * stride + R`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn transpose_rows<const R: usize>(
    src: &[f32],
    lda: usize,
    kc: usize,
    dst: &mut [f32],
    stride: usize,
    ahead: usize,
) {
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut p = 0;
    while p + 8 <= kc {
        // SAFETY: row `i < R`, columns `p..p + 8 <= kc`.
        let row = |i: usize| unsafe {
            _mm_prefetch::<_MM_HINT_T0>(s.add(i * lda + p).wrapping_add(ahead).cast());
            _mm256_loadu_ps(s.add(i * lda + p))
        };
        // Column `p + q` goes to `d[(p + q) * stride..]`.
        // SAFETY: `(p + q) * stride + R <= (kc - 1) * stride + R`.
        let out = |q: usize| unsafe { d.add((p + q) * stride) };
        // Interleave pairs, then quads: element `j` of the result holds
        // columns `j` and `j + 4` of the four rows in its 128-bit halves.
        let quads = |r0, r1, r2, r3| {
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            [
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xee>(t0, t2),
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xee>(t1, t3),
            ]
        };
        let lo = quads(row(0), row(1), row(2), row(3));
        if R == 8 {
            let hi = quads(row(4), row(5), row(6), row(7));
            for (q, (&l, &h)) in lo.iter().zip(&hi).enumerate() {
                // SAFETY: see `out`; 8 floats fit because `R == 8`.
                unsafe {
                    _mm256_storeu_ps(out(q), _mm256_permute2f128_ps::<0x20>(l, h));
                    _mm256_storeu_ps(out(q + 4), _mm256_permute2f128_ps::<0x31>(l, h));
                }
            }
        } else {
            for (q, &l) in lo.iter().enumerate() {
                // SAFETY: see `out`; 4 floats.
                unsafe {
                    _mm_storeu_ps(out(q), _mm256_castps256_ps128(l));
                    _mm_storeu_ps(out(q + 4), _mm256_extractf128_ps::<1>(l));
                }
            }
        }
        p += 8;
    }
    for p in p..kc {
        for i in 0..R {
            dst[p * stride + i] = src[i * lda + p];
        }
    }
}
