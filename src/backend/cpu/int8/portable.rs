//! Plain-Rust kernel: the fallback without AVX2 and on other architectures.
//! Activations are plain `i8`; fixed-width inner loops over a whole panel
//! let the compiler vectorise with the target's baseline.

use super::{quantize_row, Kernel, Tile, GROUP, PANEL};

const MR: usize = 4;

pub(super) static KERNEL: Kernel = Kernel {
    mr: MR,
    nr: PANEL,
    offset: false,
    tile,
    quantize: quantize_row,
    // ~65k multiply-adds: 19 µs at 7 GOP/s.
    parallel_macs: 1 << 16,
};

/// # Safety
/// `t` must satisfy the contract on [`Tile`] for `nr = PANEL`.
unsafe fn tile(t: &Tile) {
    let mut acc = [[0i32; PANEL]; MR];
    let step = PANEL * GROUP;
    // SAFETY: `b` is the first column of a panel holding `groups` steps.
    let b = unsafe { std::slice::from_raw_parts(t.b, t.groups * step) };
    for (i, row) in acc.iter_mut().enumerate().take(t.rows) {
        // SAFETY: row `i < rows` holds `groups * GROUP` bytes at `i * lda`.
        let a = unsafe { std::slice::from_raw_parts(t.a.add(i * t.lda), t.groups * GROUP) };
        for (ag, bg) in a.chunks_exact(GROUP).zip(b.chunks_exact(step)) {
            for (sum, bj) in row.iter_mut().zip(bg.chunks_exact(GROUP)) {
                for (&x, &w) in ag.iter().zip(bj) {
                    *sum += x as i8 as i32 * w as i32;
                }
            }
        }
    }
    // SAFETY: `col_scales` holds `nr` entries, `row_scales` `rows`, and a
    // non-null `bias` `cols`.
    let (col_scales, row_scales, bias) = unsafe {
        (
            std::slice::from_raw_parts(t.col_scales, PANEL),
            std::slice::from_raw_parts(t.row_scales, t.rows),
            (!t.bias.is_null()).then(|| std::slice::from_raw_parts(t.bias, t.cols)),
        )
    };
    for (i, (row, &sx)) in acc.iter().zip(row_scales).enumerate() {
        // SAFETY: row `i < rows` of the tile holds `cols` floats.
        let c = unsafe { std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), t.cols) };
        for (j, out) in c.iter_mut().enumerate() {
            let b = bias.map_or(0.0, |b| b[j]);
            *out = (row[j] as f32).mul_add(sx * col_scales[j], b);
        }
    }
}
