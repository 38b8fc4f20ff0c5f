//! INT8 `nn.Linear`: weights quantized once per output channel, activations
//! quantized per token (row) on every call, `u8 × s8 → s32` dot products,
//! and dequantize + bias (+ GELU) fused into the store.
//!
//! # Quantization
//! Symmetric, no zero points, 127 levels each side:
//!
//! * weight row `j` (one output channel): `sw[j] = max_p |W[j,p]| / 127`,
//!   `qw[j,p] = round(W[j,p] · 127 / max_p |W[j,p]|)` in `-127..=127`;
//! * activation row `i` (one token), at run time, the same with `sx[i]`;
//! * `out[i,j] = fma(f32(Σ_p qx[i,p]·qw[j,p]), sx[i]·sw[j], bias[j])`, then
//!   GELU if asked.
//!
//! Optionally with SmoothQuant's per-input-channel migration
//! (<https://arxiv.org/abs/2211.10438>): a weight quantized as `W·diag(s)`
//! quantizes its activations as `x·diag(1/s)`, the product unchanged. A
//! large `s[p]` for an outlier channel `p` shrinks it in every row, so
//! it no longer coarsens the step of all the row's other channels. The
//! multiply is fused into the activation quantization (one more multiply
//! per value, no extra pass).
//!
//! The integer sum is exact on every path (`|Σ| <= 127²·k < 2³¹` for
//! `k <= MAX_K`), and every path rounds the same float operations in the
//! same order, so each kernel matches [`linear_int8_reference`] bit for bit
//! up to GELU, which the kernels take from the vectorised
//! [`gemm::gelu_inplace`].
//!
//! # Layouts
//! * Weights ([`QuantizedWeight`]): `PANEL`-column panels. Within a panel,
//!   for each group of 4 consecutive k, column `j`'s 4 values are adjacent
//!   (the `vpdpbusd` operand layout: one 32-bit lane = one column's 4
//!   products), so a group is `PANEL * 4` bytes. K is padded to a multiple
//!   of 4 and N to whole panels, with zero weights.
//! * Activations: quantized row-major, row stride k rounded up to 4, one
//!   byte per value: `q + 128` for the VNNI kernels (`vpdpbusd` needs an
//!   unsigned operand; each accumulator starts at `-128 · Σ_p qw[j,p]` to
//!   cancel the offset), plain two's complement `q` for the others.
//!   Quantizing *is* the packing: the kernels broadcast 4 bytes of each row
//!   straight from this buffer, because a quantized row is a quarter of the
//!   f32 row and `MR` sequential streams prefetch well, so an A panel copy
//!   would buy nothing.
//!
//! # Kernels
//! `avx512` (`vpdpbusd` zmm, 8 × 48 tiles), `avx2` (256-bit, 4 × 16 with
//! `vpmaddubsw`/`vpmaddwd` on sign-folded operands, or 6 × 16 with AVX-VNNI),
//! and `portable`. Each tile runs all of K at once (no K blocking: a BERT
//! weight panel is at most `48 × 4096` bytes, streamed from L2), so partial
//! sums never leave registers. The driver walks L2-sized blocks of panels,
//! all row tiles within a block, and splits the output over rayon threads.

mod portable;
mod reference;
mod weight;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use crate::backend::cpu::gemm;
use crate::backend::cpu::isa::Isa;

pub use reference::linear_int8_reference;
pub use weight::QuantizedWeight;

/// Columns per weight panel: the AVX-512 tile width (3 zmm), a multiple of
/// every kernel's `nr`, and a divisor of BERT's 384/768/1152/1536/3072.
const PANEL: usize = 48;
/// K values per dot-product group (`vpdpbusd` sums 4 byte products).
const GROUP: usize = 4;
/// Largest supported K: `127 · 127 · MAX_K < 2³¹`, so the exact integer sum
/// fits in `i32`. (The VNNI accumulators may wrap on the way, since they
/// also carry the `+128` offset, but wrapping arithmetic is exact modulo
/// 2³² and the final value is in range.)
pub const MAX_K: usize = 1 << 17;

/// The instruction sets of the INT8 kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Int8Isa {
    /// Plain Rust.
    Portable,
    /// AVX2 `vpmaddubsw` + `vpmaddwd` (Haswell and later, Zen).
    Avx2,
    /// 256-bit `vpdpbusd` with VEX encoding (Alder Lake and later, Zen 5).
    AvxVnni,
    /// 512-bit `vpdpbusd` (Cascade Lake and later, Zen 4).
    Avx512Vnni,
}

impl Int8Isa {
    /// The fastest path on this host, capped like [`Isa::detect`] by
    /// `BERTRT_ISA` (`avx2` allows the 256-bit paths, `portable` none).
    pub fn detect() -> Int8Isa {
        Int8Isa::best_under(Isa::detect())
    }

    /// Every path this host can run, for tests that compare them.
    pub fn available() -> Vec<Int8Isa> {
        let host = Isa::available().into_iter().max().unwrap_or(Isa::Portable);
        [
            Int8Isa::Portable,
            Int8Isa::Avx2,
            Int8Isa::AvxVnni,
            Int8Isa::Avx512Vnni,
        ]
        .into_iter()
        .filter(|isa| isa.runs_under(host))
        .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Int8Isa::Portable => "portable",
            Int8Isa::Avx2 => "avx2",
            Int8Isa::AvxVnni => "avx-vnni",
            Int8Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The fastest path allowed under the f32 instruction set `cap`.
    pub fn best_under(cap: Isa) -> Int8Isa {
        [Int8Isa::Avx512Vnni, Int8Isa::AvxVnni, Int8Isa::Avx2]
            .into_iter()
            .find(|isa| isa.runs_under(cap))
            .unwrap_or(Int8Isa::Portable)
    }

    /// Whether this host runs the path, given the f32 instruction set `cap`
    /// it is allowed (each INT8 path needs its f32 level for the epilogue).
    fn runs_under(self, cap: Isa) -> bool {
        let (avx_vnni, avx512_vnni) = vnni();
        match self {
            Int8Isa::Portable => true,
            Int8Isa::Avx2 => cap >= Isa::Avx2Fma,
            Int8Isa::AvxVnni => cap >= Isa::Avx2Fma && avx_vnni,
            Int8Isa::Avx512Vnni => cap >= Isa::Avx512 && avx512_vnni,
        }
    }
}

/// Whether the host has AVX-VNNI and AVX-512 VNNI (which [`Isa`] does not
/// track). Off x86-64 [`Isa`] caps everything at portable anyway.
#[cfg(target_arch = "x86_64")]
fn vnni() -> (bool, bool) {
    (
        is_x86_feature_detected!("avxvnni"),
        is_x86_feature_detected!("avx512vnni"),
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni() -> (bool, bool) {
    (false, false)
}

/// Quantizes one row: writes `q` (`-127..=127`, stored as `q ^ xor`, so
/// `xor = 0x80` gives `q + 128`) for each value of `x`, multiplied first by
/// its channel's entry of `multipliers` if given (SmoothQuant's `1/s`, see
/// [`QuantizedWeight::quantize_smoothed`]), and returns the scale
/// `max |x| / 127` of the (multiplied) row.
///
/// Inlined into each kernel's `#[target_feature]` wrapper so one body
/// vectorises for every instruction set; all of them compute the same
/// values (one rounding per product, ties to even). A zero row gives
/// `q = 0` and scale 0; NaN or infinity gives `q = 0` and a NaN or infinite
/// scale, so the non-finite input shows in the output as with f32.
#[inline(always)]
fn quantize_row_with(x: &[f32], multipliers: Option<&[f32]>, q: &mut [u8], xor: u8) -> f32 {
    // Integer max of the magnitude bits, which order non-negative floats
    // like their values (NaN above infinity): an integer reduction
    // vectorises without the caveats of a float one.
    let magnitude = |v: f32| v.to_bits() & 0x7fff_ffff;
    let max_bits = match multipliers {
        None => x.iter().fold(0u32, |m, &v| m.max(magnitude(v))),
        Some(mul) => x
            .iter()
            .zip(mul)
            .fold(0u32, |m, (&v, &c)| m.max(magnitude(v * c))),
    };
    let max = f32::from_bits(max_bits);
    let inv = 127.0 / max;
    // `|v * inv| <= 127 (1 + 2⁻²³)²`, so adding 1.5 · 2²³ lands in
    // [2²³, 2²⁴), where the float step is 1: the sum is rounded to an
    // integer (ties to even) and that integer, `-127..=127`, sits in the
    // low mantissa bits. Pure integer work after one add, so it
    // vectorises (a saturating `f32 as i8` does not). NaN products (zero
    // or non-finite rows) give 0.
    let level = |v: f32| {
        let q = (v * inv + ROUND_MAGIC)
            .to_bits()
            .wrapping_sub(ROUND_MAGIC.to_bits());
        (q as u8) ^ xor
    };
    match multipliers {
        None => {
            for (d, &v) in q.iter_mut().zip(x) {
                *d = level(v);
            }
        }
        Some(mul) => {
            for ((d, &v), &c) in q.iter_mut().zip(x).zip(mul) {
                *d = level(v * c);
            }
        }
    }
    max / 127.0
}

/// `1.5 · 2²³`: adding it rounds a float of magnitude below 2²² to an
/// integer held in the low mantissa bits (see [`quantize_row_with`]).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// [`quantize_row_with`] for the portable path, the reference and weights.
fn quantize_row(x: &[f32], multipliers: Option<&[f32]>, q: &mut [u8], xor: u8) -> f32 {
    quantize_row_with(x, multipliers, q, xor)
}

/// One micro-kernel call: a `rows × cols` tile of
/// `out = fma(f32(qx · qwᵀ), sx · sw, bias)` over all of K.
///
/// Every pointer must be valid for what the kernel touches: `a` for `rows`
/// rows of `groups * 4` bytes at stride `lda`; `b` (a column inside a
/// panel) for `groups` steps of `PANEL * 4` bytes, reading the kernel's
/// `nr` columns (`nr * 4` bytes) of each; `col_sums` and `col_scales` for
/// `nr` entries; `row_scales` for `rows`; `bias`, unless null, for `cols`;
/// `c` for `rows` rows of `cols` floats at stride `ldc`.
#[derive(Clone, Copy)]
struct Tile {
    a: *const u8,
    lda: usize,
    b: *const i8,
    groups: usize,
    rows: usize,
    cols: usize,
    col_sums: *const i32,
    col_scales: *const f32,
    row_scales: *const f32,
    /// This tile's first bias entry, or null for no bias.
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
}

/// [`quantize_row_with`]'s signature: row, channel multipliers, output,
/// xor.
type QuantizeRow = unsafe fn(&[f32], Option<&[f32]>, &mut [u8], u8) -> f32;

/// A micro-kernel, its tile shape and its activation format.
struct Kernel {
    /// Most rows per tile.
    mr: usize,
    /// Columns per tile; divides `PANEL`.
    nr: usize,
    /// Activations are stored as `q + 128` (`u8`), not as `q`.
    offset: bool,
    /// Computes one [`Tile`]; `1 <= rows <= mr`, `1 <= cols <= nr`.
    tile: unsafe fn(&Tile),
    /// [`quantize_row_with`] compiled for the kernel's instruction set.
    quantize: QuantizeRow,
    /// Below this many multiply-adds one thread beats several: about 20 µs
    /// of this kernel on one core. Waking a second thread and splitting
    /// cost about 10 µs on a 2-core Zen 4 (AVX-512 VNNI at 16 × 384 × 384,
    /// 10 µs of work: 435 GOP/s on one thread, 240-400 on two; at
    /// 16 × 1152 × 384, 31 µs: 450 on one, 650 on two).
    parallel_macs: usize,
}

/// The kernel for `isa`. Callers only pass paths the host runs.
fn kernel(isa: Int8Isa) -> &'static Kernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Int8Isa::Avx512Vnni => &avx512::KERNEL,
        #[cfg(target_arch = "x86_64")]
        Int8Isa::AvxVnni => &avx2::KERNEL_VNNI,
        #[cfg(target_arch = "x86_64")]
        Int8Isa::Avx2 => &avx2::KERNEL,
        _ => &portable::KERNEL,
    }
}

/// Quantized activations and their row scales, kept per thread so that
/// steady-state calls do not allocate.
#[derive(Default)]
struct Scratch {
    a: Vec<u8>,
    scales: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Below this many activation values, quantize them on the calling thread.
const PARALLEL_MIN_QUANT: usize = 1 << 16;
/// Weight bytes per block of panels: the block is re-read once per row
/// tile, so it should stay in L2 (1-2 MiB per core on current x86).
const BLOCK_BYTES: usize = 384 << 10;

/// `out[m, n] = epilogue(x[m, k] · Wᵀ + bias)` in INT8, with `x` and `out`
/// row-major (strides `k` and `n`); `gelu` applies exact (erf) GELU after
/// the bias. Runs on the current rayon pool with the kernel `w` was
/// quantized for, splitting over M when there are enough row tiles (each
/// task then quantizes its own rows) and over N when there are not.
pub fn linear_int8(
    x: &[f32],
    m: usize,
    w: &QuantizedWeight,
    bias: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) {
    linear_with(kernel(w.isa()), x, m, w, bias, gelu, out);
}

/// [`linear_int8`] with the kernel given (tests run kernels that no
/// [`Int8Isa`] names).
fn linear_with(
    kern: &Kernel,
    x: &[f32],
    m: usize,
    w: &QuantizedWeight,
    bias: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) {
    let (n, k) = (w.n(), w.k());
    check_operands(x, m, n, k, bias, out);
    if m == 0 || n == 0 {
        return;
    }
    let lda = k.next_multiple_of(GROUP);
    let threads = if m * n * k < kern.parallel_macs || k == 0 {
        1
    } else {
        rayon::current_num_threads()
    };
    let (tm, tn) = thread_grid(m.div_ceil(kern.mr), n.div_ceil(PANEL), threads);
    let out = Out {
        c: out.as_mut_ptr(),
        bias: bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
        gelu,
    };
    let x = &x[..m * k];
    let run = |s: &mut Scratch| {
        // Grow only: shrinking and regrowing would re-zero the tail on every
        // call as K alternates between layers.
        if s.a.len() < m * lda {
            s.a.resize(m * lda, 0);
        }
        if s.scales.len() < m {
            s.scales.resize(m, 0.0);
        }
        let (a, scales) = (&mut s.a[..m * lda], &mut s.scales[..m]);
        // SAFETY: `out` holds `m * n` floats and `bias` `n` (checked above).
        unsafe {
            if tn == 1 {
                gemm_split_m(kern, w, x, a, scales, tm, out);
            } else {
                quantize_rows(
                    kern,
                    x,
                    k,
                    w.activation_multipliers(),
                    a,
                    scales,
                    x.len() >= PARALLEL_MIN_QUANT,
                );
                gemm_grid(kern, w, a, scales, (tm, tn), out);
            }
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => run(&mut s),
        // This thread is already inside `linear_int8` (rayon may run another
        // call on it while the first waits for its tasks): use a fresh
        // buffer rather than share the busy one.
        Err(_) => run(&mut Scratch::default()),
    });
}

/// Panics unless the operands hold an `m × k` input, `n` bias values and an
/// `m × n` output.
fn check_operands(x: &[f32], m: usize, n: usize, k: usize, bias: Option<&[f32]>, out: &[f32]) {
    assert!(x.len() >= m * k, "x has {} values, need {m}x{k}", x.len());
    assert!(
        out.len() >= m * n,
        "out has {} values, need {m}x{n}",
        out.len()
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "bias has {} values, need {n}", b.len());
    }
}

/// Quantizes the `k`-value rows of `x` into `a` (one row per
/// `k.next_multiple_of(GROUP)` bytes, padding set to `q = 0`) and their
/// scales into `scales`, in the kernel's format.
fn quantize_rows(
    kern: &Kernel,
    x: &[f32],
    k: usize,
    multipliers: Option<&[f32]>,
    a: &mut [u8],
    scales: &mut [f32],
    parallel: bool,
) {
    let xor = if kern.offset { 0x80 } else { 0 };
    if k == 0 {
        // Empty rows: nothing to scale (and `chunks` rejects 0).
        scales.fill(0.0);
        return;
    }
    let lda = k.next_multiple_of(GROUP);
    let one = |((row, q), s): ((&[f32], &mut [u8]), &mut f32)| {
        let (q, pad) = q.split_at_mut(k);
        // SAFETY: the kernel's instruction set runs on this host.
        *s = unsafe { (kern.quantize)(row, multipliers, q, xor) };
        pad.fill(xor);
    };
    if parallel {
        x.par_chunks(k)
            .zip(a.par_chunks_mut(lda))
            .zip(scales.par_iter_mut())
            .with_min_len(8)
            .for_each(one);
    } else {
        x.chunks(k)
            .zip(a.chunks_mut(lda))
            .zip(scales.iter_mut())
            .for_each(one);
    }
}

/// The output region and epilogue of one call.
#[derive(Clone, Copy)]
struct Out {
    /// `out[0]`; rows of `n` floats.
    c: *mut f32,
    /// `bias[0]`, or null.
    bias: *const f32,
    gelu: bool,
}

/// An [`Out`] that rayon tasks may share: each task writes a disjoint
/// rectangle of it.
#[derive(Clone, Copy)]
struct SharedOut(Out);

impl SharedOut {
    /// By method, so closures capture the `Sync` wrapper, not the raw field.
    fn get(self) -> Out {
        self.0
    }
}
// SAFETY: tasks only write disjoint regions of `c` and read `bias`.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// Splits `count` units into `parts` contiguous ranges whose sizes differ by
/// at most one; returns range `i`.
fn split(count: usize, parts: usize, i: usize) -> Range<usize> {
    (i * count / parts)..((i + 1) * count / parts)
}

/// Chooses a `tm × tn` grid of thread regions (`tm` splits M by whole row
/// tiles, `tn` splits N by whole panels) minimising the busiest thread's
/// tile area. On ties it splits M: each thread then quantizes just its own
/// rows, inside the same parallel task (see [`gemm_split_m`]).
fn thread_grid(m_tiles: usize, panels: usize, threads: usize) -> (usize, usize) {
    let mut best = (1, 1);
    let mut best_cost = usize::MAX;
    for tn in 1..=threads {
        if !threads.is_multiple_of(tn) {
            continue;
        }
        let tm = threads / tn;
        if tm > m_tiles || tn > panels {
            continue;
        }
        let cost = m_tiles.div_ceil(tm) * panels.div_ceil(tn);
        if cost < best_cost {
            best_cost = cost;
            best = (tm, tn);
        }
    }
    best
}

/// The whole product over `tm` tasks that split M: each quantizes its
/// rows of `x` into its part of `a` and `scales`, then multiplies them by
/// the whole weight. One fork-join per call, and each task reads back the
/// rows it just wrote, from its own cache.
///
/// # Safety
/// `out.c` must be valid for `m * w.n()` floats that nothing else accesses
/// meanwhile, and a non-null `out.bias` for `w.n()`; `a` holds
/// `m * k.next_multiple_of(GROUP)` bytes and `scales` `m` floats, with
/// `m = x.len() / k`, `k = w.k() > 0` unless `tm == 1`.
unsafe fn gemm_split_m(
    kern: &Kernel,
    w: &QuantizedWeight,
    x: &[f32],
    a: &mut [u8],
    scales: &mut [f32],
    tm: usize,
    out: Out,
) {
    let (m, k) = (scales.len(), w.k());
    let panels = 0..w.n().div_ceil(PANEL);
    if tm == 1 {
        quantize_rows(kern, x, k, w.activation_multipliers(), a, scales, false);
        // SAFETY: forwarded contract, for all rows.
        unsafe { gemm_block(kern, w, a, scales, 0..m, panels, out) };
        return;
    }
    let lda = k.next_multiple_of(GROUP);
    let rows_per = m.div_ceil(kern.mr).div_ceil(tm) * kern.mr;
    let shared = SharedOut(out);
    a.par_chunks_mut(rows_per * lda)
        .zip(scales.par_chunks_mut(rows_per))
        .zip(x.par_chunks(rows_per * k))
        .enumerate()
        .with_max_len(1)
        .for_each(|(t, ((a, scales), x))| {
            quantize_rows(kern, x, k, w.activation_multipliers(), a, scales, false);
            let rows = t * rows_per..t * rows_per + scales.len();
            // SAFETY: the row ranges of different tasks are disjoint.
            unsafe { gemm_block(kern, w, a, scales, rows, panels.clone(), shared.get()) };
        });
}

/// The whole product over a `tm × tn` grid of tasks, on activations
/// already quantized.
///
/// # Safety
/// As for [`gemm_split_m`]; `a` and `scales` hold the quantized rows.
unsafe fn gemm_grid(
    kern: &Kernel,
    w: &QuantizedWeight,
    a: &[u8],
    scales: &[f32],
    (tm, tn): (usize, usize),
    out: Out,
) {
    let m = scales.len();
    let lda = w.k().next_multiple_of(GROUP);
    let m_tiles = m.div_ceil(kern.mr);
    let panels = w.n().div_ceil(PANEL);
    let shared = SharedOut(out);
    (0..tm * tn).into_par_iter().with_max_len(1).for_each(|t| {
        let tiles = split(m_tiles, tm, t / tn);
        let rows = tiles.start * kern.mr..(tiles.end * kern.mr).min(m);
        let (a, scales) = (&a[rows.start * lda..], &scales[rows.start..]);
        // SAFETY: the regions of different `t` are disjoint rectangles
        // of the caller's output (the grid partitions rows and panels).
        unsafe {
            gemm_block(
                kern,
                w,
                a,
                scales,
                rows,
                split(panels, tn, t % tn),
                shared.get(),
            )
        };
    });
}

/// Output rows `rows` × the columns of weight panels `panels`, on one
/// thread; `a` and `scales` start at row `rows.start`.
///
/// # Safety
/// As for [`gemm_split_m`], for this region, which no other thread may
/// access meanwhile.
unsafe fn gemm_block(
    kern: &Kernel,
    w: &QuantizedWeight,
    a: &[u8],
    scales: &[f32],
    rows: Range<usize>,
    panels: Range<usize>,
    out: Out,
) {
    let n = w.n();
    let lda = w.k().next_multiple_of(GROUP);
    let groups = lda / GROUP;
    let panel_bytes = groups * PANEL * GROUP;
    let block = (BLOCK_BYTES / panel_bytes.max(1)).clamp(1, panels.len().max(1));
    let data = w.panels();
    let mut tile = Tile {
        a: std::ptr::null(),
        lda,
        b: std::ptr::null(),
        groups,
        rows: 0,
        cols: 0,
        col_sums: std::ptr::null(),
        col_scales: std::ptr::null(),
        row_scales: std::ptr::null(),
        bias: std::ptr::null(),
        c: out.c,
        ldc: n,
    };
    for first in panels.clone().step_by(block) {
        let cols = first * PANEL..((first + block).min(panels.end) * PANEL).min(n);
        for i in rows.clone().step_by(kern.mr) {
            tile.rows = kern.mr.min(rows.end - i);
            tile.a = a[(i - rows.start) * lda..].as_ptr();
            tile.row_scales = scales[i - rows.start..].as_ptr();
            for j in cols.clone().step_by(kern.nr) {
                tile.cols = kern.nr.min(cols.end - j);
                // `wrapping_add`: with `k == 0` there are no panels, and the
                // kernel then reads none.
                tile.b = data
                    .as_ptr()
                    .wrapping_add((j / PANEL) * panel_bytes + (j % PANEL) * GROUP);
                tile.col_sums = w.padded_col_sums()[j..].as_ptr();
                tile.col_scales = w.padded_scales()[j..].as_ptr();
                // SAFETY: `i < m` and `j < n`: inside the caller's output and
                // bias.
                unsafe {
                    tile.c = out.c.add(i * n + j);
                    if !out.bias.is_null() {
                        tile.bias = out.bias.add(j);
                    }
                }
                // SAFETY: the kernel's instruction set runs on this host;
                // the weight arrays are padded to whole panels and the tile
                // lies inside the region the caller vouched for.
                unsafe { (kern.tile)(&tile) };
            }
            if out.gelu {
                for r in i..i + tile.rows {
                    // SAFETY: row `r` of the region, columns `cols`, which
                    // this thread alone writes.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(out.c.add(r * n + cols.start), cols.len())
                    };
                    // While the tile rows are still in L1/L2.
                    gemm::gelu_inplace(row);
                }
            }
        }
    }
}
