//! AVX-512 micro-kernel: 12 × 32 tile, 24 zmm accumulators, two B vectors
//! and one A broadcast live per K step (27 of 32 registers).
//!
//! Column edges use write masks (masked loads do not fault), so partial
//! tiles need no staging; row edges use a kernel instantiated for the exact
//! row count.

use std::arch::x86_64::*;

use super::{gelu, ALayout, Kernel, Tile};
use crate::backend::cpu::simd::lane_mask;

pub(super) const MR: usize = 12;
pub(super) const NR: usize = 32;

pub(super) static KERNEL: Kernel = Kernel {
    mr: MR,
    nr: NR,
    k_pack: 1,
    // Measured on Zen 4: long K blocks beat L1-sized ones (fewer passes over
    // C; the B micro-panel streams from L2 fast enough), and a 144 × 512 A
    // block (288 KiB) stays in a 1 MiB L2 next to the B panels.
    kc: 512,
    mc: 144,
    tile,
    reads_a_in_place: true,
    pack_a: super::avx2::pack_a,
    pack_a_transposed: super::pack::pack_a_transposed,
    pack_b: super::avx2::pack_b,
    gelu: gelu_slice,
};

/// # Safety
/// The host must support AVX-512F/BW/DQ/VL, and `t` must satisfy the
/// contract on [`Tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn tile(t: &Tile) {
    // SAFETY (all arms): forwarded contract; `rows` selects the panel height.
    unsafe {
        match t.a_layout {
            ALayout::Packed => for_tile_rows!(
                tile_rows_packed,
                t,
                MR,
                [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
            ),
            ALayout::Rows(_) => for_tile_rows!(
                tile_rows_in_place,
                t,
                MR,
                [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
            ),
            ALayout::Columns(_) => for_tile_rows!(
                tile_rows_columns,
                t,
                MR,
                [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
            ),
        }
    }
}

/// # Safety
/// As for [`tile`], with `t.rows == R` and a packed A panel.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn tile_rows_packed<const R: usize>(t: &Tile) {
    // SAFETY: forwarded contract.
    unsafe { tile_rows::<R, PACKED>(t) }
}

/// # Safety
/// As for [`tile`], with `t.rows == R` and A read in place by rows.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn tile_rows_in_place<const R: usize>(t: &Tile) {
    // SAFETY: forwarded contract.
    unsafe { tile_rows::<R, ROWS>(t) }
}

/// # Safety
/// As for [`tile`], with `t.rows == R` and A read in place by columns.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn tile_rows_columns<const R: usize>(t: &Tile) {
    // SAFETY: forwarded contract.
    unsafe { tile_rows::<R, COLUMNS>(t) }
}

/// [`ALayout`] as a const parameter, so each layout gets its own loop with
/// the constant strides folded in.
const PACKED: u8 = 0;
const ROWS: u8 = 1;
const COLUMNS: u8 = 2;

/// # Safety
/// As for [`tile`], with `t.rows == R`; `LAYOUT` is `t.a_layout`'s kind.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn tile_rows<const R: usize, const LAYOUT: u8>(t: &Tile) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (mut a, mut b) = (t.a, t.b);
    // Element `(i, p)` of A at `a[p * step + i * row]`.
    let (row, step) = match (LAYOUT, t.a_layout) {
        (ROWS, ALayout::Rows(stride)) => (stride, 1),
        (COLUMNS, ALayout::Columns(stride)) => (1, stride),
        _ => (1, R),
    };
    let mut prefetch = t.prefetch;
    for _ in 0..t.kc {
        if !prefetch.is_null() {
            // Into L1 (T0): to L2 (T1) measured no faster than none on Zen 4.
            _mm_prefetch::<_MM_HINT_T0>(prefetch.cast());
            prefetch = prefetch.wrapping_add(t.prefetch_step);
        }
        // SAFETY: A holds `kc` steps of `R` rows where `t.a_layout` says
        // and the B panel `kc` steps of `NR` floats; the
        // pointers advance one step per iteration.
        unsafe {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i * row));
                acc_row[0] = _mm512_fmadd_ps(ai, b0, acc_row[0]);
                acc_row[1] = _mm512_fmadd_ps(ai, b1, acc_row[1]);
            }
            a = a.add(step);
            b = b.add(NR);
        }
    }
    // SAFETY: forwarded contract.
    unsafe { store(t, acc) }
}

/// Applies `alpha`, `beta`, bias and GELU to the accumulators and writes the
/// tile's `cols` valid columns.
///
/// # Safety
/// As for [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub(super) unsafe fn store<const R: usize>(t: &Tile, acc: [[__m512; 2]; R]) {
    let masks = [lane_mask(t.cols), lane_mask(t.cols.saturating_sub(16))];
    let alpha = _mm512_set1_ps(t.alpha);
    let beta = _mm512_set1_ps(t.beta);
    let mut bias = [_mm512_setzero_ps(); 2];
    if !t.bias.is_null() {
        for (h, v) in bias.iter_mut().enumerate() {
            // SAFETY: masked-off lanes are not accessed, so this reads only
            // the tile's `cols` bias entries; `wrapping_add` because the
            // upper half's address may lie past the end when `cols <= 16`.
            *v = unsafe { _mm512_maskz_loadu_ps(masks[h], t.bias.wrapping_add(16 * h)) };
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let c = t.c.wrapping_add(i * t.ldc);
        for h in 0..2 {
            let ch = c.wrapping_add(16 * h);
            let mut v = _mm512_fmadd_ps(row[h], alpha, bias[h]);
            if t.beta != 0.0 {
                // SAFETY: row `i < rows`; masked lanes cover only `cols`.
                let old = unsafe { _mm512_maskz_loadu_ps(masks[h], ch) };
                v = _mm512_fmadd_ps(old, beta, v);
            }
            if t.gelu {
                v = gelu_vec(v);
            }
            // SAFETY: as for the load.
            unsafe { _mm512_mask_storeu_ps(ch, masks[h], v) };
        }
    }
}

/// A row of the GELU table in a zmm; lanes 8..16 are never indexed.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
fn table(row: &[f32; gelu::INTERVALS]) -> __m512 {
    // SAFETY: `row` holds 8 floats, exactly one ymm load.
    _mm512_castps256_ps512(unsafe { _mm256_loadu_ps(row.as_ptr()) })
}

/// GELU of 16 lanes; the algorithm is described in `gelu.rs`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
fn gelu_vec(x: __m512) -> __m512 {
    let limit = _mm512_set1_ps(gelu::LIMIT);
    let a = _mm512_abs_ps(x);
    // `minps` returns its second operand for NaN, like `f32::min`.
    let a_clamped = _mm512_min_ps(a, limit);
    let idx = _mm512_cvttps_epi32(_mm512_mul_ps(a_clamped, _mm512_set1_ps(gelu::INV_WIDTH)));
    let idx = _mm512_min_epi32(idx, _mm512_set1_epi32(gelu::INTERVALS as i32 - 1));
    let t = _mm512_sub_ps(a_clamped, _mm512_permutexvar_ps(idx, table(&gelu::CENTERS)));
    let mut q = _mm512_permutexvar_ps(idx, table(&gelu::COEFFS[gelu::DEGREE]));
    for row in gelu::COEFFS[..gelu::DEGREE].iter().rev() {
        q = _mm512_fmadd_ps(q, t, _mm512_permutexvar_ps(idx, table(row)));
    }
    // Ordered compare: NaN is not "beyond the table" and keeps propagating.
    let beyond = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, limit);
    let r = _mm512_maskz_mul_ps(!beyond, x, q);
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
    _mm512_mask_sub_ps(r, positive, x, r)
}

/// # Safety
/// The host must support AVX-512F/BW/DQ/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn gelu_slice(x: &mut [f32]) {
    for chunk in x.chunks_mut(16) {
        let mask = lane_mask(chunk.len());
        let p = chunk.as_mut_ptr();
        // SAFETY: the mask covers exactly the chunk's elements.
        unsafe { _mm512_mask_storeu_ps(p, mask, gelu_vec(_mm512_maskz_loadu_ps(mask, p))) };
    }
}
