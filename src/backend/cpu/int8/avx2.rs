//! 256-bit kernels: one tile body (16 columns = 2 ymm, `MR` rows), built
//! for two ways of summing 4 byte products per 32-bit lane:
//!
//! * AVX2 ([`SignFold`], 4 × 16): `vpmaddubsw` multiplies unsigned by
//!   signed bytes and adds pairs into a *saturating* `i16`, so `u8 + 128`
//!   activations (`2 · 255 · 127 > 32767`) would clip. Instead both
//!   operands stay symmetric: `|w| · (x · sign w) = x · w` with `|w|` in
//!   `0..=127` and `x · sign w` in `-127..=127`, so a pair is at most
//!   `2 · 127² = 32258` and nothing saturates (`vpsignb`, `vpabsb`); then
//!   `vpmaddwd` by 1 widens the pairs to `i32`. Exact, at 4 instructions per
//!   vector product. Register budget: 8 accumulators, 2 weight vectors and
//!   their magnitudes, the ones, the broadcast and 2 temporaries (16).
//! * AVX-VNNI ([`VexVnni`], 6 × 16): one `vpdpbusd` on `q + 128`
//!   activations, like the AVX-512 kernel; 12 accumulators cover its
//!   latency × throughput.
//!
//! Column edges use `vmaskmovps` (only for partial tiles: it is slow on
//! AMD); row edges an instantiation for the exact row count.

use std::arch::x86_64::*;

use super::{quantize_row_with, Kernel, Tile, GROUP, PANEL};

const NR: usize = 16;

pub(super) static KERNEL: Kernel = Kernel {
    mr: SignFold::MR,
    nr: NR,
    offset: SignFold::OFFSET,
    tile: tile_avx2,
    quantize,
    // ~1M multiply-adds: 16 µs at 135 GOP/s.
    parallel_macs: 1 << 20,
};

pub(super) static KERNEL_VNNI: Kernel = Kernel {
    mr: VexVnni::MR,
    nr: NR,
    offset: VexVnni::OFFSET,
    tile: tile_avx_vnni,
    quantize,
    // Half the AVX-512 rate per instruction: half its threshold (untimed).
    parallel_macs: 1 << 21,
};

/// The VNNI tile body with the EVEX `vpdpbusd` (AVX-512 VNNI + VL), which
/// computes exactly what the VEX form does: lets hosts without AVX-VNNI
/// (this one) test everything in [`KERNEL_VNNI`] but the opcode.
#[cfg(test)]
pub(super) static KERNEL_VNNI_EVEX: Kernel = Kernel {
    mr: EvexVnni::MR,
    nr: NR,
    offset: EvexVnni::OFFSET,
    tile: tile_evex_vnni,
    quantize,
    parallel_macs: 1 << 21,
};

/// # Safety
/// The host must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize(x: &[f32], multipliers: Option<&[f32]>, q: &mut [u8], xor: u8) -> f32 {
    quantize_row_with(x, multipliers, q, xor)
}

/// A way to add 4 byte products per 32-bit lane.
trait Dot {
    /// Tile rows the registers allow.
    const MR: usize;
    /// Activations are `q + 128` rather than `q`.
    const OFFSET: bool;
    /// `acc` plus, per 32-bit lane, the sum of the 4 products of the
    /// activation bytes in `x` and the weight bytes in `w`.
    ///
    /// # Safety
    /// The host must support the implementation's instruction set.
    unsafe fn dot(acc: __m256i, x: __m256i, w: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` on sign-folded operands (see the module docs).
struct SignFold;

impl Dot for SignFold {
    const MR: usize = 4;
    const OFFSET: bool = false;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dot(acc: __m256i, x: __m256i, w: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// AVX-VNNI `vpdpbusd` (VEX).
struct VexVnni;

impl Dot for VexVnni {
    const MR: usize = 6;
    const OFFSET: bool = true;

    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    unsafe fn dot(acc: __m256i, x: __m256i, w: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, x, w)
    }
}

/// AVX-512 VNNI `vpdpbusd` on ymm (EVEX), for tests.
#[cfg(test)]
struct EvexVnni;

#[cfg(test)]
impl Dot for EvexVnni {
    const MR: usize = VexVnni::MR;
    const OFFSET: bool = true;

    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot(acc: __m256i, x: __m256i, w: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, x, w)
    }
}

/// # Safety
/// The host must support AVX2 and FMA, and `t` must satisfy the contract on
/// [`Tile`] for `nr = 16`, `rows <= 4`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(t: &Tile) {
    // SAFETY: forwarded contract.
    unsafe { tile_any::<SignFold>(t) }
}

/// # Safety
/// The host must support AVX2, FMA and AVX-VNNI, and `t` must satisfy the
/// contract on [`Tile`] for `nr = 16`, `rows <= 6`.
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn tile_avx_vnni(t: &Tile) {
    // SAFETY: forwarded contract.
    unsafe { tile_any::<VexVnni>(t) }
}

/// # Safety
/// The host must support AVX2, FMA and AVX-512 VNNI + VL, and `t` must
/// satisfy the contract on [`Tile`] for `nr = 16`, `rows <= 6`.
#[cfg(test)]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
unsafe fn tile_evex_vnni(t: &Tile) {
    // SAFETY: forwarded contract.
    unsafe { tile_any::<EvexVnni>(t) }
}

/// Inlined into the `#[target_feature]` entry points above, which is what
/// lets its intrinsics (and `D::dot`) compile to inline instructions.
///
/// # Safety
/// As for the entry points, with `t.rows <= D::MR`.
#[inline(always)]
unsafe fn tile_any<D: Dot>(t: &Tile) {
    debug_assert!(t.rows <= D::MR);
    // SAFETY (all arms): forwarded contract; `rows` selects the tile height.
    unsafe {
        match t.rows {
            // The guards drop heights a kernel never sees at compile time.
            6 if D::MR >= 6 => tile_rows::<D, 6>(t),
            5 if D::MR >= 5 => tile_rows::<D, 5>(t),
            4 => tile_rows::<D, 4>(t),
            3 => tile_rows::<D, 3>(t),
            2 => tile_rows::<D, 2>(t),
            1 => tile_rows::<D, 1>(t),
            _ => unreachable!("tile rows {} outside 1..={}", t.rows, D::MR),
        }
    }
}

/// # Safety
/// As for [`tile_any`], with `t.rows == R`.
#[inline(always)]
unsafe fn tile_rows<D: Dot, const R: usize>(t: &Tile) {
    // SAFETY: the caller's instruction set covers AVX2 and `D`; the
    // pointers are valid per the `Tile` contract (`col_sums` holds 16
    // entries, each row `groups` groups of 4 bytes, the panel `groups`
    // steps of `PANEL * 4`), advancing one group per iteration.
    unsafe {
        let mut start = [_mm256_setzero_si256(); 2];
        if D::OFFSET {
            // `q + 128` activations: starting at `-128 · Σ qw` cancels it.
            for (v, s) in start.iter_mut().enumerate() {
                let sums = _mm256_loadu_si256(t.col_sums.add(8 * v).cast());
                *s = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(sums));
            }
        }
        let mut acc = [start; R];
        let (mut a, mut b) = (t.a, t.b);
        for _ in 0..t.groups {
            let w0 = _mm256_loadu_si256(b.cast());
            let w1 = _mm256_loadu_si256(b.add(32).cast());
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(a.add(i * t.lda).cast::<i32>().read_unaligned());
                row[0] = D::dot(row[0], x, w0);
                row[1] = D::dot(row[1], x, w1);
            }
            a = a.add(GROUP);
            b = b.add(PANEL * GROUP);
        }
        store(t, acc);
    }
}

/// Dequantizes, adds the bias and writes the tile's `cols` valid columns.
///
/// # Safety
/// As for [`tile_any`]; inlined into the entry points for their AVX2/FMA.
#[inline(always)]
unsafe fn store<const R: usize>(t: &Tile, acc: [[__m256i; 2]; R]) {
    let full = t.cols == NR;
    // SAFETY: AVX2/FMA per the caller; `col_scales` holds 16 entries,
    // `row_scales` `rows`; masked (partial) accesses touch only the `cols`
    // valid bias entries and columns, and `wrapping_add` because a vector
    // past `cols` may start past the end.
    unsafe {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut masks = [_mm256_setzero_si256(); 2];
        let mut scales = [_mm256_setzero_ps(); 2];
        let mut bias = [_mm256_setzero_ps(); 2];
        for v in 0..2 {
            let left = t.cols as i32 - 8 * v as i32;
            masks[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
            scales[v] = _mm256_loadu_ps(t.col_scales.add(8 * v));
            if !t.bias.is_null() {
                let p = t.bias.wrapping_add(8 * v);
                bias[v] = if full {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, masks[v])
                };
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let sx = _mm256_set1_ps(*t.row_scales.add(i));
            let c = t.c.wrapping_add(i * t.ldc);
            for v in 0..2 {
                let y = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(row[v]),
                    _mm256_mul_ps(sx, scales[v]),
                    bias[v],
                );
                let p = c.wrapping_add(8 * v);
                if full {
                    _mm256_storeu_ps(p, y);
                } else {
                    _mm256_maskstore_ps(p, masks[v], y);
                }
            }
        }
    }
}
