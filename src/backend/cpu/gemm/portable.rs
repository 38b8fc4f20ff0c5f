//! Plain-Rust micro-kernel: the fallback for hosts without AVX2 and for
//! other architectures. Fixed-width inner loops let the compiler vectorise
//! with whatever the target baseline offers.

use super::{gelu, Kernel, Tile};

pub(super) const MR: usize = 4;
pub(super) const NR: usize = 16;

pub(super) static KERNEL: Kernel = Kernel {
    mr: MR,
    nr: NR,
    k_pack: 1,
    kc: 256,
    mc: 128,
    tile,
    reads_a_in_place: false,
    pack_a: super::pack::pack_a,
    pack_a_transposed: super::pack::pack_a_transposed,
    pack_b: super::pack::pack_b,
    gelu: gelu::gelu_slice_scalar,
};

/// # Safety
/// `t` must satisfy the contract on [`Tile`].
unsafe fn tile(t: &Tile) {
    let mut acc = [[0.0f32; NR]; MR];
    // SAFETY: the packed panels hold `kc * rows` and `kc * NR` floats.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(t.a, t.kc * t.rows),
            std::slice::from_raw_parts(t.b, t.kc * NR),
        )
    };
    for (ap, bp) in a.chunks_exact(t.rows).zip(b.chunks_exact(NR)) {
        for (row, &av) in acc.iter_mut().zip(ap) {
            for (c, &bv) in row.iter_mut().zip(bp) {
                *c += av * bv;
            }
        }
    }
    // SAFETY: forwarded contract.
    unsafe { store(t, &acc) }
}

/// Applies `alpha`, `beta`, bias and GELU to the accumulators and writes the
/// tile's valid `rows × cols` (also the bf16 portable kernel's epilogue).
///
/// # Safety
/// `t` must satisfy the contract on [`Tile`], with `cols <= C`.
pub(super) unsafe fn store<const R: usize, const C: usize>(t: &Tile, acc: &[[f32; C]; R]) {
    let bias = if t.bias.is_null() {
        &[][..]
    } else {
        // SAFETY: a non-null bias holds `cols` floats.
        unsafe { std::slice::from_raw_parts(t.bias, t.cols) }
    };
    for (i, row) in acc.iter().enumerate().take(t.rows) {
        // SAFETY: row `i < rows` of the tile holds `cols` floats.
        let c = unsafe { std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), t.cols) };
        for (j, out) in c.iter_mut().enumerate() {
            let mut v = t.alpha * row[j];
            if t.beta != 0.0 {
                v += t.beta * *out;
            }
            if let Some(b) = bias.get(j) {
                v += b;
            }
            *out = if t.gelu { gelu::gelu_scalar(v) } else { v };
        }
    }
}
