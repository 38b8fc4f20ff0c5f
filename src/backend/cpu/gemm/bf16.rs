//! bf16 GEMM: A and B rounded to bf16 as they are packed, products summed in
//! f32 — the numbers of PyTorch's bf16 autocast matmul, at twice the f32
//! multiply rate on AVX512_BF16 hosts (`vdpbf16ps`).
//!
//! Layout: the f32 panel layouts of [`super::pack`] with one *pair* of K
//! values per 32-bit slot. The slot for row `i`, step `q` holds
//! `bf16(a(i, 2q))` in its low half and `bf16(a(i, 2q + 1))` in its high
//! half (zero past K): the operand layout of `vdpbf16ps`, which multiplies
//! pairs and adds both products into one f32 lane. Slots live in f32
//! buffers as bit patterns (never used as floats), so the driver and its
//! scratch serve both kernels.
//!
//! Packing converts as it lays out, in one pass over the source: a row of
//! f32 values becomes its slots in order (`vcvtne2ps2bf16` on 32 values
//! gives their 16 slots), so packing a row-major operand into panels is a
//! transpose of slots, done on the converted registers before they are
//! stored.

use std::cell::RefCell;

use super::{portable, Kernel, Tile};
use crate::backend::cpu::isa::Isa;

/// `x` rounded to bf16 (to nearest, ties to even), as bits. NaN stays a
/// quiet NaN; denormals flush to a signed zero, as `vcvtne2ps2bf16` does.
pub(super) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return (bits >> 16) as u16 | 0x0040;
    }
    if bits & 0x7f80_0000 == 0 {
        return (bits >> 16) as u16 & 0x8000;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// One slot: `lo` and `hi` rounded to bf16.
fn pair(lo: f32, hi: f32) -> f32 {
    f32::from_bits(to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16)
}

/// The two f32 values of a slot.
fn unpair(slot: f32) -> (f32, f32) {
    let bits = slot.to_bits();
    (
        f32::from_bits(bits << 16),
        f32::from_bits(bits & 0xffff_0000),
    )
}

/// Whether a backend capped at `isa` runs the AVX512_BF16 kernel (the host
/// must have it, and `isa` must be AVX-512).
pub(super) fn native(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 kernel for a backend capped at `isa`.
pub(super) fn kernel(isa: Isa) -> &'static Kernel {
    #[cfg(target_arch = "x86_64")]
    if native(isa) {
        return &native_kernel::KERNEL;
    }
    &PORTABLE
}

/// The two conversions every packer is made of, scalar or SIMD.
trait Convert {
    /// Row `i` of `src` (stride `ld`, `k` values) becomes `k.div_ceil(2)`
    /// slots down column `i` of `dst`: slot `q` at `dst[q * stride + i]`.
    ///
    /// # Safety
    /// The implementation's instruction set must run on this host.
    unsafe fn rows_to_panel(
        src: &[f32],
        ld: usize,
        rows: usize,
        k: usize,
        dst: &mut [f32],
        stride: usize,
    );

    /// `dst[i] = pair(lo[i], hi[i])`, `hi` None meaning zeros.
    ///
    /// # Safety
    /// As for [`Self::rows_to_panel`].
    unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, dst: &mut [f32]);
}

struct Scalar;

impl Convert for Scalar {
    unsafe fn rows_to_panel(
        src: &[f32],
        ld: usize,
        rows: usize,
        k: usize,
        dst: &mut [f32],
        stride: usize,
    ) {
        for i in 0..rows {
            for (q, values) in src[i * ld..][..k].chunks(2).enumerate() {
                dst[q * stride + i] = pair(values[0], values.get(1).copied().unwrap_or(0.0));
            }
        }
    }

    unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, dst: &mut [f32]) {
        for (i, slot) in dst.iter_mut().enumerate() {
            *slot = pair(lo[i], hi.map_or(0.0, |h| h[i]));
        }
    }
}

thread_local! {
    // One step's slots for a whole A block read transposed, before they are
    // split between its panels.
    static SLOTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packs a row-major A block: each `mr`-row panel converted and transposed
/// in one pass.
///
/// # Safety
/// `C`'s instruction set must run on this host.
unsafe fn pack_a<C: Convert>(
    src: &[f32],
    lda: usize,
    mc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    let steps = kc.div_ceil(2);
    for (r, panel) in dst[..mc * steps].chunks_mut(mr * steps).enumerate() {
        let rows = panel.len() / steps;
        // SAFETY: forwarded contract.
        unsafe { C::rows_to_panel(&src[r * mr * lda..], lda, rows, kc, panel, rows) };
    }
}

/// Packs an A block read transposed (`a(i, p) = src[p * lda + i]`): each
/// slot row interleaves two source rows, converted whole (all `mc` rows of
/// the block in one call) and then split between the panels.
///
/// # Safety
/// As for [`pack_a`].
unsafe fn pack_a_transposed<C: Convert>(
    src: &[f32],
    lda: usize,
    mc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    let steps = kc.div_ceil(2);
    SLOTS.with_borrow_mut(|slots| {
        slots.resize(mc, 0.0);
        for q in 0..steps {
            let lo = &src[2 * q * lda..][..mc];
            let hi = (2 * q + 1 < kc).then(|| &src[(2 * q + 1) * lda..][..mc]);
            // SAFETY: forwarded contract.
            unsafe { C::interleave(lo, hi, slots) };
            for (r, panel) in dst[..mc * steps].chunks_mut(mr * steps).enumerate() {
                let rows = panel.len() / steps;
                panel[q * rows..(q + 1) * rows].copy_from_slice(&slots[r * mr..][..rows]);
            }
        }
    });
}

/// Packs B (`k × n`) into `nr`-column panels of slots.
///
/// # Safety
/// As for [`pack_a`].
unsafe fn pack_b<C: Convert>(
    src: &[f32],
    ldb: usize,
    transposed: bool,
    k: usize,
    n: usize,
    nr: usize,
    dst: &mut [f32],
) {
    let steps = k.div_ceil(2);
    let panel_len = steps * nr;
    if panel_len == 0 {
        return;
    }
    for (q, panel) in dst[..n.div_ceil(nr) * panel_len]
        .chunks_exact_mut(panel_len)
        .enumerate()
    {
        let j0 = q * nr;
        let cols = nr.min(n - j0);
        if transposed {
            // `b(p, j) = src[j * ldb + p]`: the panel's columns are source
            // rows, pairs adjacent in them.
            // SAFETY: forwarded contract.
            unsafe { C::rows_to_panel(&src[j0 * ldb..], ldb, cols, k, panel, nr) };
        } else {
            for (step, out) in panel.chunks_exact_mut(nr).enumerate() {
                let lo = &src[2 * step * ldb + j0..][..cols];
                let hi = (2 * step + 1 < k).then(|| &src[(2 * step + 1) * ldb + j0..][..cols]);
                // SAFETY: forwarded contract.
                unsafe { C::interleave(lo, hi, &mut out[..cols]) };
            }
        }
        if cols < nr {
            for out in panel.chunks_exact_mut(nr) {
                out[cols..].fill(0.0);
            }
        }
    }
}

pub(super) static PORTABLE: Kernel = Kernel {
    mr: portable::MR,
    nr: portable::NR,
    k_pack: 2,
    kc: 512,
    mc: 128,
    tile: portable_tile,
    reads_a_in_place: false,
    pack_a: pack_a::<Scalar>,
    pack_a_transposed: pack_a_transposed::<Scalar>,
    pack_b: pack_b::<Scalar>,
    gelu: super::gelu::gelu_slice_scalar,
};

/// # Safety
/// `t` must satisfy the contract on [`Tile`] (`kc` counts slots).
unsafe fn portable_tile(t: &Tile) {
    const NR: usize = portable::NR;
    let mut acc = [[0.0f32; NR]; portable::MR];
    // SAFETY: the packed panels hold `kc * rows` and `kc * NR` slots.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(t.a, t.kc * t.rows),
            std::slice::from_raw_parts(t.b, t.kc * NR),
        )
    };
    for (ap, bp) in a.chunks_exact(t.rows).zip(b.chunks_exact(NR)) {
        for (row, &av) in acc.iter_mut().zip(ap) {
            let (a0, a1) = unpair(av);
            for (c, &bv) in row.iter_mut().zip(bp) {
                let (b0, b1) = unpair(bv);
                *c += a0 * b0 + a1 * b1;
            }
        }
    }
    // SAFETY: forwarded contract.
    unsafe { portable::store(t, &acc) }
}

#[cfg(target_arch = "x86_64")]
mod native_kernel {
    //! The AVX512_BF16 kernel: the f32 AVX-512 kernel's 12 × 32 tile with
    //! `vdpbf16ps` (two K values per instruction) in place of `vfmadd`.

    use std::arch::x86_64::*;

    use super::super::{avx512, Kernel, Tile};
    use super::{pack_a, pack_a_transposed, pack_b, Convert};
    use crate::backend::cpu::simd::lane_mask;

    const MR: usize = avx512::MR;
    const NR: usize = avx512::NR;

    pub(in super::super) static KERNEL: Kernel = Kernel {
        mr: MR,
        nr: NR,
        k_pack: 2,
        // The f32 kernel's 512-float K block in bytes.
        kc: 1024,
        mc: 144,
        tile,
        reads_a_in_place: false,
        pack_a: pack_a::<Avx512Bf16>,
        pack_a_transposed: pack_a_transposed::<Avx512Bf16>,
        pack_b: pack_b::<Avx512Bf16>,
        gelu: avx512::gelu_slice,
    };

    struct Avx512Bf16;

    /// Transposes a 16 × 16 matrix of 32-bit elements held one row per
    /// register: pairs of rows interleaved, then quads, then 128-bit lanes
    /// gathered across registers in two rounds.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose16(v: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let r = &v[4 * g..4 * g + 4];
            // Within each 128-bit lane: elements 0, 1 (lo) or 2, 3 (hi) of
            // two rows, alternating.
            let (lo01, hi01) = (
                _mm512_unpacklo_epi32(r[0], r[1]),
                _mm512_unpackhi_epi32(r[0], r[1]),
            );
            let (lo23, hi23) = (
                _mm512_unpacklo_epi32(r[2], r[3]),
                _mm512_unpackhi_epi32(r[2], r[3]),
            );
            // Register `4g + m`, lane `L`: column `4L + m` of rows `4g..4g + 4`.
            t[4 * g] = _mm512_unpacklo_epi64(lo01, lo23);
            t[4 * g + 1] = _mm512_unpackhi_epi64(lo01, lo23);
            t[4 * g + 2] = _mm512_unpacklo_epi64(hi01, hi23);
            t[4 * g + 3] = _mm512_unpackhi_epi64(hi01, hi23);
        }
        for m in 0..4 {
            // Lanes 0 and 2 (0x88) or 1 and 3 (0xdd) of each operand.
            let even_a = _mm512_shuffle_i32x4::<0x88>(t[m], t[4 + m]);
            let odd_a = _mm512_shuffle_i32x4::<0xdd>(t[m], t[4 + m]);
            let even_b = _mm512_shuffle_i32x4::<0x88>(t[8 + m], t[12 + m]);
            let odd_b = _mm512_shuffle_i32x4::<0xdd>(t[8 + m], t[12 + m]);
            // Column `4L + m` is lane `L` of the four row groups in turn.
            v[m] = _mm512_shuffle_i32x4::<0x88>(even_a, even_b);
            v[4 + m] = _mm512_shuffle_i32x4::<0x88>(odd_a, odd_b);
            v[8 + m] = _mm512_shuffle_i32x4::<0xdd>(even_a, even_b);
            v[12 + m] = _mm512_shuffle_i32x4::<0xdd>(odd_a, odd_b);
        }
    }

    impl Convert for Avx512Bf16 {
        /// Sixteen rows at a time: 32 values of each become its 16 slots
        /// in one register (`vcvtne2ps2bf16`, in order), the 16 × 16 slots
        /// are transposed in registers, and each register then holds one
        /// step for the 16 rows: one masked store.
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
        unsafe fn rows_to_panel(
            src: &[f32],
            ld: usize,
            rows: usize,
            k: usize,
            dst: &mut [f32],
            stride: usize,
        ) {
            let steps = k.div_ceil(2);
            if rows == 0 || steps == 0 {
                return;
            }
            assert!(src.len() >= (rows - 1) * ld + k, "rows out of bounds");
            assert!(
                dst.len() >= (steps - 1) * stride + rows,
                "panel out of bounds"
            );
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            for i0 in (0..rows).step_by(16) {
                let live = (rows - i0).min(16);
                let mut p = 0;
                while p < k {
                    // Masked lanes read as zero: that pads an odd tail, and
                    // rows past `live` (all lanes masked) read nothing.
                    let lo_mask = lane_mask(k - p);
                    let hi_mask = lane_mask((k - p).saturating_sub(16));
                    let mut v = [_mm512_setzero_si512(); 16];
                    for (i, slots) in v.iter_mut().enumerate() {
                        let (lo, hi) = if i < live { (lo_mask, hi_mask) } else { (0, 0) };
                        // `wrapping_add`: a fully masked row's address may
                        // lie past the end of `src`.
                        let row = s.wrapping_add((i0 + i) * ld + p);
                        // SAFETY: the masks cover only values `p..k` of rows
                        // below `rows` (asserted in bounds).
                        *slots = unsafe {
                            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                                _mm512_maskz_loadu_ps(hi, row.wrapping_add(16)),
                                _mm512_maskz_loadu_ps(lo, row),
                            ))
                        };
                    }
                    transpose16(&mut v);
                    let row_mask = lane_mask(live);
                    for (j, step) in v.iter().take((k - p).div_ceil(2)).enumerate() {
                        // SAFETY: step `p / 2 + j < steps`, lanes `i0..i0 +
                        // live` of it: inside `dst` (asserted above).
                        unsafe {
                            _mm512_mask_storeu_epi32(
                                d.add((p / 2 + j) * stride + i0).cast(),
                                row_mask,
                                *step,
                            )
                        };
                    }
                    p += 32;
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
        unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, dst: &mut [f32]) {
            let n = dst.len();
            assert!(
                lo.len() >= n && hi.is_none_or(|h| h.len() >= n),
                "rows out of bounds"
            );
            // Lane i of the result takes 16-bit elements i (lo) and 16 + i (hi).
            let order = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            let mut i = 0;
            while i < n {
                let mask = lane_mask(n - i);
                // SAFETY: the mask covers elements `i..n`, inside both rows.
                let (l, h) = unsafe {
                    (
                        _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(i)),
                        match hi {
                            Some(h) => _mm512_maskz_loadu_ps(mask, h.as_ptr().add(i)),
                            None => _mm512_setzero_ps(),
                        },
                    )
                };
                // SAFETY: both are 512 bits of plain data.
                let halves =
                    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(h, l)) };
                let slots = _mm512_permutexvar_epi16(order, halves);
                // SAFETY: as for the loads.
                unsafe { _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(i).cast(), mask, slots) };
                i += 16;
            }
        }
    }

    /// # Safety
    /// The host must support AVX512-F/BW/DQ/VL/BF16, and `t` must satisfy
    /// the contract on [`Tile`] (`kc` counts slots).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    unsafe fn tile(t: &Tile) {
        // SAFETY (all arms): forwarded contract; `rows` selects the height.
        unsafe { for_tile_rows!(tile_rows, t, MR, [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]) }
    }

    /// # Safety
    /// As for [`tile`], with `t.rows == R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn tile_rows<const R: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (mut a, mut b) = (t.a.cast::<i32>(), t.b.cast::<i32>());
        let mut prefetch = t.prefetch;
        for _ in 0..t.kc {
            if !prefetch.is_null() {
                // As in the f32 kernel.
                _mm_prefetch::<_MM_HINT_T0>(prefetch.cast());
                prefetch = prefetch.wrapping_add(t.prefetch_step);
            }
            // SAFETY: the packed panels hold `kc` steps of `R` and `NR`
            // slots; the pointers advance one step per iteration.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i)));
                    row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
                }
                a = a.add(R);
                b = b.add(NR);
            }
        }
        // SAFETY: forwarded contract.
        unsafe { avx512::store(t, acc) }
    }
}
