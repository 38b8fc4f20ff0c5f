//! AVX-512 VNNI kernel: 8 × 48 tile, 24 zmm accumulators, three weight
//! vectors and one activation broadcast live per group of 4 k (28 of 32
//! registers). Per group: 3 loads and 8 broadcasts feed 24 `vpdpbusd`
//! (1536 multiply-adds), so the loads never limit the dot-product unit.
//!
//! Column edges use write masks; row edges a kernel instantiated for the
//! exact row count.

use std::arch::x86_64::*;

use super::{quantize_row_with, Kernel, Tile, GROUP, PANEL};
use crate::backend::cpu::simd::lane_mask;

const MR: usize = 8;
/// Vectors of 16 columns per tile.
const V: usize = PANEL / 16;

pub(super) static KERNEL: Kernel = Kernel {
    mr: MR,
    nr: PANEL,
    offset: true,
    tile,
    quantize,
    // ~4.2M multiply-adds: 19 µs at 450 GOP/s.
    parallel_macs: 1 << 22,
};

/// # Safety
/// The host must support AVX-512F/BW/DQ/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn quantize(x: &[f32], multipliers: Option<&[f32]>, q: &mut [u8], xor: u8) -> f32 {
    quantize_row_with(x, multipliers, q, xor)
}

/// # Safety
/// The host must support AVX-512F/BW/DQ/VL and VNNI, and `t` must satisfy
/// the contract on [`Tile`] for `nr = PANEL`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn tile(t: &Tile) {
    // SAFETY (all arms): forwarded contract; `rows` selects the tile height.
    unsafe {
        match t.rows {
            8 => tile_rows::<8>(t),
            7 => tile_rows::<7>(t),
            6 => tile_rows::<6>(t),
            5 => tile_rows::<5>(t),
            4 => tile_rows::<4>(t),
            3 => tile_rows::<3>(t),
            2 => tile_rows::<2>(t),
            1 => tile_rows::<1>(t),
            _ => unreachable!("tile rows {} outside 1..={MR}", t.rows),
        }
    }
}

/// # Safety
/// As for [`tile`], with `t.rows == R`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_rows<const R: usize>(t: &Tile) {
    // `vpdpbusd` multiplies `q + 128`: starting at `-128 · Σ qw` cancels it.
    let mut start = [_mm512_setzero_si512(); V];
    for (v, s) in start.iter_mut().enumerate() {
        // SAFETY: `col_sums` holds `PANEL` entries.
        let sums = unsafe { _mm512_loadu_si512(t.col_sums.add(16 * v).cast()) };
        *s = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(sums));
    }
    let mut acc = [start; R];
    let (mut a, mut b) = (t.a, t.b);
    for _ in 0..t.groups {
        // SAFETY: each row holds `groups` groups of 4 bytes and the panel
        // `groups` steps of `PANEL * 4`; the pointers advance one group per
        // iteration.
        unsafe {
            let mut w = [_mm512_setzero_si512(); V];
            for (v, wv) in w.iter_mut().enumerate() {
                *wv = _mm512_loadu_si512(b.add(64 * v).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(a.add(i * t.lda).cast::<i32>().read_unaligned());
                for (r, &wv) in row.iter_mut().zip(&w) {
                    *r = _mm512_dpbusd_epi32(*r, x, wv);
                }
            }
            a = a.add(GROUP);
            b = b.add(PANEL * GROUP);
        }
    }
    // SAFETY: forwarded contract.
    unsafe { store(t, acc) }
}

/// Dequantizes, adds the bias and writes the tile's `cols` valid columns.
///
/// # Safety
/// As for [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
unsafe fn store<const R: usize>(t: &Tile, acc: [[__m512i; V]; R]) {
    let mut masks = [0; V];
    let mut scales = [_mm512_setzero_ps(); V];
    let mut bias = [_mm512_setzero_ps(); V];
    for v in 0..V {
        masks[v] = lane_mask(t.cols.saturating_sub(16 * v));
        // SAFETY: `col_scales` holds `PANEL` entries.
        scales[v] = unsafe { _mm512_loadu_ps(t.col_scales.add(16 * v)) };
        if !t.bias.is_null() {
            // SAFETY: masked-off lanes are not accessed, so this reads only
            // the tile's `cols` bias entries; `wrapping_add` because a
            // vector past `cols` may start past the end.
            bias[v] = unsafe { _mm512_maskz_loadu_ps(masks[v], t.bias.wrapping_add(16 * v)) };
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: `row_scales` holds `rows` entries.
        let sx = _mm512_set1_ps(unsafe { *t.row_scales.add(i) });
        let c = t.c.wrapping_add(i * t.ldc);
        for v in 0..V {
            let y = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(row[v]),
                _mm512_mul_ps(sx, scales[v]),
                bias[v],
            );
            // SAFETY: row `i < rows`; the mask covers only `cols` columns.
            unsafe { _mm512_mask_storeu_ps(c.wrapping_add(16 * v), masks[v], y) };
        }
    }
}
