//! bf16 GEMM: A and B rounded to bf16 as they are packed, products summed in
//! f32 — the numbers of PyTorch's bf16 autocast matmul, at twice the f32
//! multiply rate on AVX512_BF16 hosts (`vdpbf16ps`).
//!
//! Layout: the f32 panel layouts of [`super::pack`] with one *pair* of K
//! values per 32-bit slot. The slot for row `i`, step `q` holds
//! `bf16(a(i, 2q))` in its low half and `bf16(a(i, 2q + 1))` in its high
//! half (zero past K): the operand layout of `vdpbf16ps`, which multiplies
//! pairs and adds both products into one f32 lane. Slots live in f32
//! buffers as bit patterns (never used as floats), so the driver, its
//! scratch and the f32 transposing packers serve both kernels.

use std::cell::RefCell;

use super::{pack, portable, Kernel, Tile};
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
    /// Row `r` of `src` (stride `ld`, `k` values) becomes `k.div_ceil(2)`
    /// slots at `dst[r * k.div_ceil(2)..]`.
    ///
    /// # Safety
    /// The implementation's instruction set must run on this host.
    unsafe fn rows_to_slots(src: &[f32], ld: usize, rows: usize, k: usize, dst: &mut [f32]);

    /// `dst[i] = pair(lo[i], hi[i])`, `hi` None meaning zeros.
    ///
    /// # Safety
    /// As for [`Self::rows_to_slots`].
    unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, dst: &mut [f32]);

    /// The f32 packers, applied to slots.
    const PACK_A: super::PackAFn;
    const PACK_B: super::PackBFn;
}

struct Scalar;

impl Convert for Scalar {
    unsafe fn rows_to_slots(src: &[f32], ld: usize, rows: usize, k: usize, dst: &mut [f32]) {
        let steps = k.div_ceil(2);
        for r in 0..rows {
            let row = &src[r * ld..][..k];
            for (q, slot) in dst[r * steps..][..steps].iter_mut().enumerate() {
                *slot = pair(row[2 * q], row.get(2 * q + 1).copied().unwrap_or(0.0));
            }
        }
    }

    unsafe fn interleave(lo: &[f32], hi: Option<&[f32]>, dst: &mut [f32]) {
        for (i, slot) in dst.iter_mut().enumerate() {
            *slot = pair(lo[i], hi.map_or(0.0, |h| h[i]));
        }
    }

    const PACK_A: super::PackAFn = pack::pack_a;
    const PACK_B: super::PackBFn = pack::pack_b;
}

thread_local! {
    // Slot rows before they are transposed into panels.
    static SLOTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packs a row-major A block: rows to slots, then the f32 panel transpose.
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
    SLOTS.with_borrow_mut(|slots| {
        slots.resize(mc * steps, 0.0);
        // SAFETY: forwarded contract.
        unsafe {
            C::rows_to_slots(src, lda, mc, kc, slots);
            (C::PACK_A)(slots, steps, mc, steps, mr, dst);
        }
    });
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
    if transposed {
        // `b(p, j) = src[j * ldb + p]`: pairs are adjacent in a source row.
        SLOTS.with_borrow_mut(|slots| {
            slots.resize(n * steps, 0.0);
            // SAFETY: forwarded contract.
            unsafe {
                C::rows_to_slots(src, ldb, n, k, slots);
                (C::PACK_B)(slots, steps, true, steps, n, nr, dst);
            }
        });
        return;
    }
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
        for (step, out) in panel.chunks_exact_mut(nr).enumerate() {
            let lo = &src[2 * step * ldb + j0..][..cols];
            let hi = (2 * step + 1 < k).then(|| &src[(2 * step + 1) * ldb + j0..][..cols]);
            // SAFETY: forwarded contract.
            unsafe { C::interleave(lo, hi, &mut out[..cols]) };
            out[cols..].fill(0.0);
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

    use super::super::{avx2, avx512, Kernel, Tile};
    use super::{pack_a, pack_a_transposed, pack_b, Convert};

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
        pack_a: pack_a::<Avx512Bf16>,
        pack_a_transposed: pack_a_transposed::<Avx512Bf16>,
        pack_b: pack_b::<Avx512Bf16>,
        gelu: avx512::gelu_slice,
    };

    struct Avx512Bf16;

    /// Lanes `0..min(count, 16)` set.
    fn mask16(count: usize) -> __mmask16 {
        if count >= 16 {
            0xffff
        } else {
            ((1u32 << count) - 1) as __mmask16
        }
    }

    impl Convert for Avx512Bf16 {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
        unsafe fn rows_to_slots(src: &[f32], ld: usize, rows: usize, k: usize, dst: &mut [f32]) {
            let steps = k.div_ceil(2);
            assert!(
                rows == 0 || src.len() >= (rows - 1) * ld + k,
                "rows out of bounds"
            );
            assert!(dst.len() >= rows * steps, "slots out of bounds");
            for r in 0..rows {
                let (s, d) = (src[r * ld..].as_ptr(), dst[r * steps..].as_mut_ptr());
                let mut p = 0;
                while p < k {
                    // 32 values become 16 slots; masked lanes read as zero,
                    // which pads an odd tail.
                    let lo_mask = mask16(k - p);
                    let hi_mask = mask16((k - p).saturating_sub(16));
                    // SAFETY: the masks cover only values `p..k` of the row
                    // (asserted in bounds); `wrapping_add` because the upper
                    // address may lie past the end when fully masked.
                    let pairs = unsafe {
                        _mm512_cvtne2ps_pbh(
                            _mm512_maskz_loadu_ps(hi_mask, s.wrapping_add(p + 16)),
                            _mm512_maskz_loadu_ps(lo_mask, s.add(p)),
                        )
                    };
                    let out_mask = mask16((k - p).div_ceil(2));
                    // SAFETY: slots `p / 2..steps` of the row exist.
                    unsafe {
                        _mm512_mask_storeu_epi32(
                            d.add(p / 2).cast(),
                            out_mask,
                            std::mem::transmute::<__m512bh, __m512i>(pairs),
                        )
                    };
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
                let mask = mask16(n - i);
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

        const PACK_A: super::super::PackAFn = avx2::pack_a;
        const PACK_B: super::super::PackBFn = avx2::pack_b;
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
        for _ in 0..t.kc {
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
