//! Single-precision GEMM: `nn.Linear` with fused bias/GELU, and a strided
//! sgemm for attention.
//!
//! BLIS-style structure, kept in separate pieces so later kernels (bf16,
//! int8) can reuse the driver:
//!
//! * `pack`: panel layouts. Weights are packed once ([`PackedWeight`]);
//!   A blocks are packed per call into thread-local scratch.
//! * micro-kernels (`avx512`, `avx2`, `portable`): one `rows × cols` tile of
//!   C over one K block, accumulating in registers, with the epilogue
//!   (`alpha`, `beta`, bias, GELU) applied in registers before the store.
//! * the driver here: K blocking, M blocking, tile loops, and the split of
//!   the output between rayon threads.

/// `$tile_rows::<R>($t)` for `R = $t.rows`, one arm per listed height: the
/// micro-kernels are instantiated per row count (accumulators in registers
/// need a constant height), and every kernel dispatches the same way.
macro_rules! for_tile_rows {
    ($tile_rows:ident, $t:expr, $mr:expr, [$($rows:literal),+]) => {
        match $t.rows {
            $($rows => $tile_rows::<$rows>($t),)+
            _ => unreachable!("tile rows {} outside 1..={}", $t.rows, $mr),
        }
    };
}

mod bf16;
mod gelu;
mod pack;
mod portable;
mod reference;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;

use std::cell::RefCell;

use rayon::prelude::*;

use crate::backend::cpu::isa::Isa;
use crate::backend::Precision;

pub use pack::PackedWeight;
/// For tests of other ops' erf-based math (GELU's backward).
#[cfg(test)]
pub(crate) use reference::erfc_f64;
pub use reference::{linear_reference, sgemm_strided_reference};

/// Fused epilogue applied after bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// Exact GELU, `0.5 * x * (1 + erf(x / sqrt 2))`.
    Gelu,
}

/// A matrix read in place: logical element `(r, c)` is `data[r * ld + c]`,
/// or `data[c * ld + r]` when `transposed` (a row-major matrix read as its
/// transpose). Backward passes multiply by transposed weights, activations
/// and gradients; reading them this way spares an explicit transpose.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub transposed: bool,
}

impl<'a> Strided<'a> {
    /// Row-major with row stride `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Strided {
            data,
            ld,
            transposed: false,
        }
    }

    /// The transpose of the row-major matrix in `data` (row stride `ld`).
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        Strided {
            data,
            ld,
            transposed: true,
        }
    }

    /// The view whose `(0, 0)` is this view's `(r, c)`.
    fn offset(self, r: usize, c: usize) -> Self {
        let at = if self.transposed {
            c * self.ld + r
        } else {
            r * self.ld + c
        };
        Strided {
            data: &self.data[at..],
            ..self
        }
    }

    /// Panics unless the view holds a logical `rows × cols` matrix.
    fn check(self, rows: usize, cols: usize, name: &str) {
        let (stored_rows, stored_cols) = if self.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let need = strided_len(stored_rows, stored_cols, self.ld, name);
        assert!(
            self.data.len() >= need,
            "{name}: {} values, need {need} for {rows}x{cols} (ld {})",
            self.data.len(),
            self.ld
        );
    }
}

/// Exact GELU of one value, computed in double precision (the reference the
/// SIMD GELU is tested against).
pub fn gelu_erf(x: f32) -> f32 {
    reference::gelu_f64(x as f64) as f32
}

/// Exact GELU in place, vectorised; within 1e-6 absolute of [`gelu_erf`].
pub fn gelu_inplace(x: &mut [f32]) {
    gelu_inplace_isa(Isa::detect(), x)
}

fn gelu_inplace_isa(isa: Isa, x: &mut [f32]) {
    // SAFETY: `kernel` only returns kernels for instruction sets this host
    // runs (`Isa::detect`/`Isa::available` are capped by the host).
    unsafe { (kernel(isa).gelu)(x) }
}

/// One micro-kernel call: `C = epilogue(alpha * A·B + beta * C + bias)` on a
/// `rows × cols` tile over `kc` packed steps of K (a step is
/// [`Kernel::k_pack`] values of K).
///
/// Every pointer must be valid for what the kernel touches: `a` for the
/// `rows × kc` slots that [`ALayout`] places, `b` for `kc * nr` (packed B
/// panel), `c` for `rows` rows of `cols` floats at stride `ldc`, and
/// `bias`, unless null, for `cols` floats.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub a: *const f32,
    pub a_layout: ALayout,
    pub b: *const f32,
    /// This tile's share of the B slice the driver reads next, which the
    /// kernel prefetches into L1 as it goes, `prefetch_step` floats (at
    /// most one cache line) per step of K; null for none. A hint: kernels
    /// may ignore it, and it may point past the panels (prefetches never
    /// fault).
    pub prefetch: *const f32,
    pub prefetch_step: usize,
    pub c: *mut f32,
    pub ldc: usize,
    /// This tile's first bias entry, or null for no bias.
    pub bias: *const f32,
    pub rows: usize,
    pub cols: usize,
    pub kc: usize,
    pub alpha: f32,
    /// `0` means C is write-only (BLAS semantics: old NaNs do not leak).
    pub beta: f32,
    pub gelu: bool,
}

/// Where a [`Tile`] finds element `(i, p)` of its A (row `i`, step `p` of K).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ALayout {
    /// A packed panel: `a[p * rows + i]`.
    Packed,
    /// A row-major A read in place: `a[i * stride + p]`.
    Rows(usize),
    /// A row-major matrix read in place as its transpose (a gradient
    /// `dYᵀ`): `a[p * stride + i]`, a panel with a longer step.
    Columns(usize),
}

/// Packs an A block: `(src, lda, mc, kc, mr, dst)`, see [`pack::pack_a`].
type PackAFn = unsafe fn(&[f32], usize, usize, usize, usize, &mut [f32]);
/// Packs B: `(src, ldb, transposed, k, n, nr, dst)`, see [`pack::pack_b`].
type PackBFn = unsafe fn(&[f32], usize, bool, usize, usize, usize, &mut [f32]);

/// A micro-kernel and the blocking that suits it.
pub(crate) struct Kernel {
    /// Tile rows (A panel height).
    pub mr: usize,
    /// Tile columns (B panel width).
    pub nr: usize,
    /// Values of K per packed 32-bit slot: 1 for f32, 2 for bf16 pairs.
    /// Packed panels hold `k.div_ceil(k_pack)` steps, the tail zero-padded.
    pub k_pack: usize,
    /// Largest K block (in values of K, a multiple of `k_pack`).
    pub kc: usize,
    /// Largest M block packed at once.
    pub mc: usize,
    /// Computes one [`Tile`]; `1 <= rows <= mr`, `1 <= cols <= nr`.
    pub tile: unsafe fn(&Tile),
    /// The tile also reads A in place ([`ALayout::Rows`] and
    /// [`ALayout::Columns`]), which the driver then prefers to packing it
    /// ([`a_layout`]).
    pub reads_a_in_place: bool,
    pub pack_a: PackAFn,
    /// Packs an A block read transposed: element `(i, p)` at `src[p * lda + i]`.
    pub pack_a_transposed: PackAFn,
    pub pack_b: PackBFn,
    /// GELU over a slice.
    pub gelu: unsafe fn(&mut [f32]),
}

/// The kernel for `isa`. Callers only pass instruction sets the host runs.
fn kernel(isa: Isa) -> &'static Kernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => &avx512::KERNEL,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => &avx2::KERNEL,
        _ => &portable::KERNEL,
    }
}

/// Per-thread packing buffers, reused so steady-state calls do not allocate.
#[derive(Default)]
struct Scratch {
    a: pack::AlignedBuf,
    b: pack::AlignedBuf,
}

thread_local! {
    // Borrowed only inside the single-threaded driver, which never yields to
    // rayon, so the borrow cannot be re-entered.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// What the driver needs about its C region.
#[derive(Clone, Copy)]
struct Out {
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    alpha: f32,
    beta: f32,
    gelu: bool,
}

/// `C[m × n] = epilogue(alpha * A·B + beta * C + bias)` on one thread.
///
/// `a` starts at A's first element; `b` holds packed panels for all of K,
/// starting at the region's first panel.
///
/// # Safety
/// `out` must be valid as described for [`Tile`] over the whole `m × n`
/// region, which no other thread may access meanwhile; `a` must hold an
/// `m × k` matrix and `b` `n.div_ceil(nr) * k.div_ceil(k_pack) * nr` slots; `k > 0`.
#[allow(clippy::too_many_arguments)] // operands and shape of one GEMM
unsafe fn gemm_block(
    kern: &Kernel,
    a: Strided,
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    out: Out,
    apack: &mut pack::AlignedBuf,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    // Even blocks: 385 must not become 384 + 1.
    let kc_step = k
        .div_ceil(k.div_ceil(kern.kc))
        .next_multiple_of(kern.k_pack);
    let mc_step = m.div_ceil(m.div_ceil(kern.mc)).next_multiple_of(mr);
    let k_steps = k.div_ceil(kern.k_pack);
    let apack = apack.get_mut(mc_step.min(m) * kc_step.div_ceil(kern.k_pack));
    let a_layout = a_layout(kern, a);
    let mut tile = Tile {
        a: std::ptr::null(),
        a_layout,
        b: std::ptr::null(),
        prefetch: std::ptr::null(),
        prefetch_step: 0,
        c: out.c,
        ldc: out.ldc,
        bias: std::ptr::null(),
        rows: 0,
        cols: 0,
        kc: 0,
        alpha: out.alpha,
        beta: out.beta,
        gelu: false,
    };
    for pc in (0..k).step_by(kc_step) {
        let kc = kc_step.min(k - pc);
        let last = pc + kc == k;
        let steps = kc.div_ceil(kern.k_pack);
        tile.kc = steps;
        // Later K blocks accumulate onto the first; bias and GELU go on once,
        // with the last block.
        tile.beta = if pc == 0 { out.beta } else { 1.0 };
        tile.gelu = last && out.gelu;
        for ic in (0..m).step_by(mc_step) {
            let mc = mc_step.min(m - ic);
            let block = a.offset(ic, pc);
            if a_layout == ALayout::Packed {
                let pack_a = if block.transposed {
                    kern.pack_a_transposed
                } else {
                    kern.pack_a
                };
                // SAFETY: the kernel's instruction set runs on this host.
                unsafe { pack_a(block.data, block.ld, mc, kc, mr, apack) };
            }
            let panels = n.div_ceil(nr);
            // Weights stream from DRAM once per forward, and a B slice read
            // on first use left the block's first tile waiting on memory:
            // cold, M = 32 and 64 ran 10% and 7% below a cache-resident
            // weight. So the tiles over each slice share out fetching the
            // next one (MiniLM forward: fp32 1x32 6% faster, bf16 3-4% at
            // 1x32 to 1x128). Two tiles or fewer would each fetch more than
            // a line per step, which measured slower than none (M = 16).
            let row_tiles = mc.div_ceil(mr);
            let (prefetch_share, prefetch_step) = if row_tiles >= 3 {
                let share = (steps * nr).div_ceil(row_tiles);
                (share, share.div_ceil(steps))
            } else {
                (0, 0)
            };
            for (q, j0) in (0..n).step_by(nr).enumerate() {
                tile.cols = nr.min(n - j0);
                tile.b = b[(q * k_steps + pc / kern.k_pack) * nr..].as_ptr();
                // Where the next slice starts: the next panel's, else the
                // first panel's for the next block of M, or of K.
                let next_b = if q + 1 < panels {
                    Some(((q + 1) * k_steps + pc / kern.k_pack) * nr)
                } else if ic + mc < m {
                    Some(pc / kern.k_pack * nr)
                } else if !last {
                    Some((pc + kc) / kern.k_pack * nr)
                } else {
                    None
                };
                tile.bias = if last && !out.bias.is_null() {
                    // SAFETY: `j0 < n` and the caller's bias holds `n` floats.
                    unsafe { out.bias.add(j0) }
                } else {
                    std::ptr::null()
                };
                for ir in (0..mc).step_by(mr) {
                    tile.rows = mr.min(mc - ir);
                    (tile.prefetch, tile.prefetch_step) = match next_b {
                        Some(offset) if prefetch_step > 0 => (
                            b.as_ptr().wrapping_add(offset + ir / mr * prefetch_share),
                            prefetch_step,
                        ),
                        _ => (std::ptr::null(), 0),
                    };
                    tile.a = match a_layout {
                        ALayout::Packed => apack[ir * steps..].as_ptr(),
                        ALayout::Rows(ld) => block.data[ir * ld..].as_ptr(),
                        ALayout::Columns(_) => block.data[ir..].as_ptr(),
                    };
                    // SAFETY: `(ic + ir, j0)` lies inside the caller's region.
                    tile.c = unsafe { out.c.add((ic + ir) * out.ldc + j0) };
                    // SAFETY: the packed panels hold `kc * rows` / `kc * nr`
                    // floats from these pointers, and the tile is inside the
                    // region the caller vouched for.
                    unsafe { (kern.tile)(&tile) };
                }
            }
        }
    }
}

/// How `kern` reads A: in place where it can, else from packed blocks.
///
/// A row-major A read in place saves the copy (3-6% of a MiniLM forward
/// at batch 1) and measured as fast or faster at every M — except when
/// A's rows lie a multiple of 4 KiB apart: the tile's rows then fall into
/// the same L1 sets and evict each other (K = 1024 or 3072 ran at 87-90%
/// of the FMA limit in place, 94-96% packed).
///
/// A transposed A (`dYᵀ` in a weight gradient) already holds each step's
/// rows side by side, as a packed panel does, so it is read in place
/// too: packing it was 2.6% of a fp32 training step.
fn a_layout(kern: &Kernel, a: Strided) -> ALayout {
    const L1_ALIAS_BYTES: usize = 4096;
    if !kern.reads_a_in_place {
        ALayout::Packed
    } else if a.transposed {
        ALayout::Columns(a.ld)
    } else if (a.ld * std::mem::size_of::<f32>()).is_multiple_of(L1_ALIAS_BYTES) {
        ALayout::Packed
    } else {
        ALayout::Rows(a.ld)
    }
}

/// `C = epilogue(beta * C + bias)`: the whole GEMM when `k == 0`.
///
/// # Safety
/// As for [`gemm_block`].
unsafe fn no_k(kern: &Kernel, m: usize, n: usize, out: Out) {
    for i in 0..m {
        // SAFETY: row `i < m` of the region, `n` floats.
        let row = unsafe { std::slice::from_raw_parts_mut(out.c.add(i * out.ldc), n) };
        for (j, v) in row.iter_mut().enumerate() {
            let old = if out.beta == 0.0 { 0.0 } else { out.beta * *v };
            // SAFETY: `j < n`, and a non-null bias holds `n` floats.
            let b = if out.bias.is_null() {
                0.0
            } else {
                unsafe { *out.bias.add(j) }
            };
            *v = old + b;
        }
        if out.gelu {
            // SAFETY: the kernel's instruction set runs on this host.
            unsafe { (kern.gelu)(row) };
        }
    }
}

/// A raw C pointer that rayon tasks may share: each task writes a disjoint
/// rectangle of C.
#[derive(Clone, Copy)]
struct SharedOut(Out);

impl SharedOut {
    /// By method, so closures capture the `Sync` wrapper, not the raw field.
    fn get(self) -> Out {
        self.0
    }
}
// SAFETY: tasks only write disjoint regions of C and read bias; see `linear`.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// Below this many multiply-adds a second thread costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Packing one element of A costs about as much as this many multiply-adds
/// per row (it is a strided copy), which matters when splitting over N makes
/// every thread pack all of A.
const PACK_COST_COLS: usize = 16;

/// Splits `count` units into `parts` contiguous ranges whose sizes differ by
/// at most one; returns range `i`.
fn split(count: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    (i * count / parts)..((i + 1) * count / parts)
}

/// Chooses a `tm × tn` grid of thread regions (`tm` splits M by whole tiles,
/// `tn` splits N by whole panels) minimising the busiest thread's work.
fn thread_grid(kern: &Kernel, m: usize, n: usize, threads: usize) -> (usize, usize) {
    let m_tiles = m.div_ceil(kern.mr);
    let panels = n.div_ceil(kern.nr);
    let mut best = (1, 1);
    let mut best_cost = usize::MAX;
    // Prefer splitting N on ties: each thread then streams only its share
    // of the weight, which is what stays in its own L2.
    for tn in (1..=threads).rev() {
        if !threads.is_multiple_of(tn) {
            continue;
        }
        let tm = threads / tn;
        if tm > m_tiles || tn > panels {
            continue;
        }
        let rows = (0..tm)
            .map(|i| {
                let t = split(m_tiles, tm, i);
                (t.end * kern.mr).min(m) - t.start * kern.mr
            })
            .max()
            .unwrap_or(0);
        let cols = panels.div_ceil(tn) * kern.nr;
        let cost = rows * (cols + PACK_COST_COLS);
        if cost < best_cost {
            best_cost = cost;
            best = (tm, tn);
        }
    }
    best
}

/// `out[m, n] = epilogue(x[m, k] · Wᵀ + bias)`, with `x` row-major (stride
/// `k`) and `out` row-major (stride `n`). Runs on the current rayon pool,
/// splitting over N when M is small and over M when it is large; uses the
/// instruction set `w` was packed for.
pub fn linear(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    let (n, k) = (w.n(), w.k());
    assert!(x.len() >= m * k, "x has {} values, need {m}x{k}", x.len());
    assert!(
        out.len() >= m * n,
        "out has {} values, need {m}x{n}",
        out.len()
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "bias has {} values, need {n}", b.len());
    }
    let region = Out {
        c: out.as_mut_ptr(),
        ldc: n,
        bias: bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
        alpha: 1.0,
        beta: 0.0,
        gelu: epilogue == Epilogue::Gelu,
    };
    // SAFETY: `out` holds the `m × n` region at stride `n`, `bias` `n`
    // floats, `x` an `m × k` matrix and the panels all of W (checked above).
    unsafe { threaded_gemm(w.kernel(), Strided::rows(x, k), w.panels(), m, n, k, region) };
}

/// `C = epilogue(alpha·A·B + beta·C + bias)` with B already packed (all of
/// K, every panel), on the current rayon pool: the output is cut into a
/// grid of thread regions (see [`thread_grid`]), each computed by
/// [`gemm_block`].
///
/// # Safety
/// `out` must be valid over the whole `m × n` region (and its bias over `n`
/// floats) and not accessed by anyone else meanwhile; `a` must hold an
/// `m × k` matrix and `b` `n.div_ceil(nr) * k.div_ceil(k_pack) * nr` slots.
unsafe fn threaded_gemm(
    kern: &Kernel,
    a: Strided,
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    out: Out,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: forwarded contract.
        unsafe { no_k(kern, m, n, out) };
        return;
    }
    let threads = if m * n * k < PARALLEL_MIN_MACS {
        1
    } else {
        rayon::current_num_threads()
    };
    let (tm, tn) = thread_grid(kern, m, n, threads);
    let m_tiles = m.div_ceil(kern.mr);
    let panels = n.div_ceil(kern.nr);
    let shared = SharedOut(out);
    let run = |t: usize| {
        let rows = split(m_tiles, tm, t / tn);
        let cols = split(panels, tn, t % tn);
        let (i0, j0) = (rows.start * kern.mr, cols.start * kern.nr);
        let (i1, j1) = ((rows.end * kern.mr).min(m), (cols.end * kern.nr).min(n));
        let mut sub = shared.get();
        // SAFETY: `(i0, j0)` is inside the region (and `j0` inside `bias`);
        // the sub-regions of different `t` are disjoint.
        unsafe {
            sub.c = sub.c.add(i0 * sub.ldc + j0);
            if !sub.bias.is_null() {
                sub.bias = sub.bias.add(j0);
            }
        }
        let b = &b[cols.start * k.div_ceil(kern.k_pack) * kern.nr..];
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // SAFETY: the sub-region lies in the caller's region, is written
            // by this task only, and `a`/`b` hold what the caller vouched for.
            unsafe { gemm_block(kern, a.offset(i0, 0), b, i1 - i0, j1 - j0, k, sub, &mut s.a) };
        });
    };
    if tm * tn == 1 {
        run(0);
    } else {
        (0..tm * tn).into_par_iter().with_max_len(1).for_each(run);
    }
}

thread_local! {
    // The packed B of a threaded `sgemm`, kept by the calling thread between
    // calls so steady-state calls do not allocate. Taken out while in use: a
    // call nested through rayon work stealing gets a fresh buffer instead of
    // a borrow panic.
    static SHARED_B: std::cell::Cell<pack::AlignedBuf> = std::cell::Cell::default();
}

/// `c[i*ldc + j] = beta·c[i*ldc + j] + alpha·Σ_p a(i,p)·b(p,j) (+ bias[j])`
/// for an `m × n` C, on the current rayon pool (B packed by all threads,
/// then the output split between them as [`linear`] does). `beta == 0`
/// ignores the old contents of `c`, as BLAS does. Runs `isa`'s kernel.
#[allow(clippy::too_many_arguments)] // the BLAS sgemm signature, plus bias and path
pub fn sgemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_with(kernel(isa), m, n, k, alpha, a, b, beta, bias, c, ldc)
}

/// [`sgemm`] with the products in bf16 (A and B rounded to bf16, to
/// nearest even, as they are packed) and the sums in f32: what PyTorch's
/// bf16 autocast does to a matmul. Runs on AVX512_BF16 (`vdpbf16ps`) where
/// the host has it and `isa` is AVX-512 ([`bf16_native`]), else on a
/// portable kernel with the same numbers.
#[allow(clippy::too_many_arguments)] // the BLAS sgemm signature, plus bias and path
pub fn gemm_bf16(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_with(bf16::kernel(isa), m, n, k, alpha, a, b, beta, bias, c, ldc)
}

/// Whether [`gemm_bf16`] on `isa` runs on the host's bf16 instructions
/// (rather than the slower portable kernel).
pub fn bf16_native(isa: Isa) -> bool {
    bf16::native(isa)
}

/// The threaded GEMM with kernel `kern`.
#[allow(clippy::too_many_arguments)] // `sgemm` plus the kernel
fn gemm_with(
    kern: &Kernel,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    a.check(m, k, "a");
    b.check(k, n, "b");
    assert!(c.len() >= strided_len(m, n, ldc, "c"), "c too short");
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "bias has {} values, need {n}", bias.len());
    }
    if m == 0 || n == 0 {
        return;
    }
    let out = Out {
        c: c.as_mut_ptr(),
        ldc,
        bias: bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
        alpha,
        beta,
        gelu: false,
    };
    let mut packed = SHARED_B.take();
    let k_steps = k.div_ceil(kern.k_pack);
    let panel_len = k_steps * kern.nr;
    let panels = packed.get_mut(n.div_ceil(kern.nr) * panel_len);
    if panel_len > 0 {
        // A few chunks per thread, so uneven chunks still balance.
        let chunk_panels = n
            .div_ceil(kern.nr)
            .div_ceil(4 * rayon::current_num_threads())
            .max(1);
        panels
            .par_chunks_mut(chunk_panels * panel_len)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let j0 = chunk * chunk_panels * kern.nr;
                let cols = (dst.len() / k_steps).min(n - j0);
                let src = b.offset(0, j0);
                // SAFETY: the kernel's instruction set runs on this host;
                // `src` holds the `k × cols` block (checked above).
                unsafe { (kern.pack_b)(src.data, src.ld, src.transposed, k, cols, kern.nr, dst) };
            });
    }
    // SAFETY: `c` holds the region at stride `ldc` and `bias` `n` floats
    // (checked above); `a` is `m × k`; all panels were packed.
    unsafe { threaded_gemm(kern, a, panels, m, n, k, out) };
    SHARED_B.set(packed);
}

/// Single-threaded strided sgemm (no rayon inside; call it from parallel
/// loops): `c[i*ldc + j] = beta·c[i*ldc + j] + alpha·Σ_p a(i,p)·b(p,j)` for
/// an `m × n` C. `beta == 0` ignores the old contents of `c`. Packs into
/// thread-local scratch; no allocation in steady state. Runs the widest
/// f32 kernel this host has ([`gemm_strided`] picks precision and path).
#[allow(clippy::too_many_arguments)] // the BLAS sgemm signature
pub fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_strided(
        Precision::Fp32,
        Isa::detect(),
        m,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        ldc,
    )
}

/// Minimum length of a strided `rows × cols` matrix with leading dimension
/// `ld`; panics if `ld` is too small for `cols`.
fn strided_len(rows: usize, cols: usize, ld: usize, name: &str) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    assert!(ld >= cols, "{name}: leading dimension {ld} < {cols}");
    (rows - 1) * ld + cols
}

/// The kernel of a backend capped at `isa` multiplying in `precision`:
/// bf16 is [`gemm_bf16`]'s kernel (AVX512_BF16 or its portable twin).
fn kernel_for(precision: Precision, isa: Isa) -> &'static Kernel {
    match precision {
        Precision::Fp32 => kernel(isa),
        Precision::Bf16 => bf16::kernel(isa),
        Precision::Fp16 => unreachable!("CpuBackend::with_precision refuses fp16"),
    }
}

/// [`sgemm_strided`] in `precision` on a backend capped at `isa`: with
/// [`Precision::Bf16`], A and B are rounded to bf16 as they are packed and
/// the sums stay f32 (attention's batched matmuls under PyTorch's bf16
/// autocast), through the same driver as f32.
#[allow(clippy::too_many_arguments)] // the BLAS sgemm signature, plus the numerics
pub fn gemm_strided(
    precision: Precision,
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(c.len() >= strided_len(m, n, ldc, "c"), "c too short");
    // SAFETY: `c` is borrowed mutably and holds the region (checked above).
    unsafe {
        gemm_strided_ptr(
            precision,
            isa,
            m,
            n,
            k,
            alpha,
            a,
            b,
            beta,
            c.as_mut_ptr(),
            ldc,
        )
    }
}

/// [`gemm_strided`] into a C given by pointer, for parallel tasks that each
/// write their own columns of one matrix (attention heads): their regions
/// interleave, so they cannot be split into disjoint slices.
///
/// # Safety
/// `c` must be valid for reads and writes of the `m × n` region at stride
/// `ldc`, and no other thread may access that region meanwhile.
#[allow(clippy::too_many_arguments)] // `gemm_strided` with C by pointer
pub unsafe fn gemm_strided_ptr(
    precision: Precision,
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    b: Strided,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    b.check(k, n, "b");
    let kern = kernel_for(precision, isa);
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        let panels = pack_b_into(kern, b, k, n, &mut s.b);
        // SAFETY: forwarded contract; the panels hold all of B.
        unsafe { gemm_on_thread(kern, panels, m, n, k, alpha, a, beta, c, ldc, &mut s.a) };
    });
}

/// `C = alpha·A·B + beta·C` on the calling thread with B's panels packed
/// (all of K) by `kern`'s packer: what [`gemm_strided_ptr`] and
/// [`gemm_packed_ptr`] share once B is packed.
///
/// # Safety
/// As for [`gemm_strided_ptr`]; `panels` must hold `kern`'s packing of a
/// `k × n` matrix.
#[allow(clippy::too_many_arguments)] // one GEMM's operands, shape and scratch
unsafe fn gemm_on_thread(
    kern: &Kernel,
    panels: &[f32],
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    apack: &mut pack::AlignedBuf,
) {
    a.check(m, k, "a");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "c: leading dimension {ldc} < {n}");
    let out = Out {
        c,
        ldc,
        bias: std::ptr::null(),
        alpha,
        beta,
        gelu: false,
    };
    if k == 0 {
        // SAFETY: the caller vouches for the region.
        unsafe { no_k(kern, m, n, out) };
    } else {
        // SAFETY: the caller vouches for the region; `a` and the packed B
        // are sized for the shape.
        unsafe { gemm_block(kern, a, panels, m, n, k, out, apack) };
    }
}

/// Packs the `k × n` matrix `b` (already checked to hold it) into `buf`
/// as `kern`'s panels, every panel over all of K; returns them.
fn pack_b_into<'b>(
    kern: &Kernel,
    b: Strided,
    k: usize,
    n: usize,
    buf: &'b mut pack::AlignedBuf,
) -> &'b [f32] {
    let panels = buf.get_mut(n.div_ceil(kern.nr) * k.div_ceil(kern.k_pack) * kern.nr);
    // SAFETY: the kernel's instruction set runs on this host; `b` holds
    // the `k × n` matrix.
    unsafe { (kern.pack_b)(b.data, b.ld, b.transposed, k, n, kern.nr, panels) };
    panels
}

/// A right operand packed once for several single-threaded products:
/// attention packs a head's `Kᵀ` and `V` once and multiplies every block
/// of query rows by them, instead of packing them again per block. The
/// buffer is kept across packs, so steady-state use does not allocate.
#[derive(Default)]
pub struct PackedB {
    kern: Option<&'static Kernel>,
    k: usize,
    n: usize,
    panels: pack::AlignedBuf,
}

impl PackedB {
    /// Packs the logical `k × n` matrix `b` for products in `precision` on
    /// a backend capped at `isa` (see [`gemm_strided`]).
    pub fn pack(&mut self, precision: Precision, isa: Isa, b: Strided, k: usize, n: usize) {
        b.check(k, n, "b");
        let kern = kernel_for(precision, isa);
        pack_b_into(kern, b, k, n, &mut self.panels);
        (self.kern, self.k, self.n) = (Some(kern), k, n);
    }
}

/// [`gemm_strided_ptr`] with B packed beforehand: `C = alpha·A·B + beta·C`
/// for the `m × b.k` matrix `a`, on the calling thread.
///
/// # Safety
/// As for [`gemm_strided_ptr`], over the `m × b.n` region of `c`.
pub unsafe fn gemm_packed_ptr(
    b: &PackedB,
    m: usize,
    alpha: f32,
    a: Strided,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    let kern = b.kern.expect("PackedB::pack before use");
    let (n, k) = (b.n, b.k);
    let panels = &b.panels.as_slice()[..n.div_ceil(kern.nr) * k.div_ceil(kern.k_pack) * kern.nr];
    SCRATCH.with(|s| {
        // SAFETY: forwarded contract; `panels` is `b`, packed by `kern`.
        unsafe {
            gemm_on_thread(
                kern,
                panels,
                m,
                n,
                k,
                alpha,
                a,
                beta,
                c,
                ldc,
                &mut s.borrow_mut().a,
            )
        };
    });
}
