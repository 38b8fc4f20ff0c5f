//! Panel layouts for the f32 micro-kernels, and the pre-packed weight.
//!
//! * B (the `k × n` right operand) is cut into `nr`-column panels; panel `q`
//!   holds every row `p` of its columns contiguously, `nr` floats per row,
//!   zero-padded past `n`. Because a panel keeps all of K, any K blocking is
//!   an offset (`p0 * nr`) into it, so a weight is packed once for good.
//! * A (the `m × k` left operand) is packed per `mc × kc` block into
//!   `mr`-row panels laid out `[p][i]`; the last panel holds only the rows
//!   that exist (its row stride is that count, not `mr`), so edge tiles
//!   neither read padding nor compute on it.

use super::Kernel;
use crate::backend::cpu::isa::Isa;

/// One cache line of floats; the unit of [`AlignedBuf`].
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

// SAFETY: `Line` is 16 `f32`s with no padding (size 64 == align 64), so the
// all-zero pattern is valid and every bit pattern is a valid value.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; `repr(C)`, `Copy`, no padding, no pointers.
unsafe impl bytemuck::Pod for Line {}

/// A growable `f32` buffer aligned to 64 bytes, so panel rows start on cache
/// lines and 512-bit loads never split a line.
#[derive(Clone, Default)]
pub(crate) struct AlignedBuf {
    lines: Vec<Line>,
}

impl AlignedBuf {
    /// The first `len` floats, growing (never shrinking) the buffer so
    /// steady-state calls do not allocate. Contents are unspecified.
    pub(crate) fn get_mut(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line([0.0; 16]));
        }
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..len]
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        bytemuck::cast_slice(&self.lines)
    }
}

/// Packs the logical `k × n` matrix `b(p, j)` into `nr`-column panels (see the
/// module docs). `b(p, j)` is `src[j * ldb + p]` when `transposed` (an
/// `nn.Linear` weight, or Kᵀ in attention), else `src[p * ldb + j]`.
/// `dst` must hold `n.div_ceil(nr) * k * nr` floats.
pub(crate) fn pack_b(
    src: &[f32],
    ldb: usize,
    transposed: bool,
    k: usize,
    n: usize,
    nr: usize,
    dst: &mut [f32],
) {
    let panel_len = k * nr;
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
            // Read each source row once, contiguously; scatter down the panel.
            for jj in 0..cols {
                let row = &src[(j0 + jj) * ldb..][..k];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * nr + jj] = v;
                }
            }
        } else {
            for (p, out) in panel.chunks_exact_mut(nr).enumerate() {
                out[..cols].copy_from_slice(&src[p * ldb + j0..][..cols]);
            }
        }
        if cols < nr {
            for out in panel.chunks_exact_mut(nr) {
                out[cols..].fill(0.0);
            }
        }
    }
}

/// Packs the `mc × kc` block whose top-left element is `src[0]` (row stride
/// `lda`) into `mr`-row panels laid out `[p][i]`; panel `r` starts at
/// `dst[r * mr * kc]`.
pub(crate) fn pack_a(src: &[f32], lda: usize, mc: usize, kc: usize, mr: usize, dst: &mut [f32]) {
    for (r, panel) in dst[..mc * kc].chunks_mut(mr * kc).enumerate() {
        let rows = panel.len() / kc;
        let i0 = r * mr;
        for i in 0..rows {
            let row = &src[(i0 + i) * lda..][..kc];
            for (p, &v) in row.iter().enumerate() {
                panel[p * rows + i] = v;
            }
        }
    }
}

/// [`pack_a`] for an A read transposed: element `(i, p)` of the block is
/// `src[p * lda + i]`, so each panel row is a contiguous copy.
pub(crate) fn pack_a_transposed(
    src: &[f32],
    lda: usize,
    mc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    for (r, panel) in dst[..mc * kc].chunks_mut(mr * kc).enumerate() {
        let rows = panel.len() / kc;
        let i0 = r * mr;
        for (p, out) in panel.chunks_exact_mut(rows).enumerate() {
            out.copy_from_slice(&src[p * lda + i0..][..rows]);
        }
    }
}

/// A PyTorch `nn.Linear` weight `[n = out_features, k = in_features]`
/// (row-major), packed once at load time into the panel layout of one
/// micro-kernel: f32 for an instruction set, or bf16 ([`Self::pack_bf16`]).
pub struct PackedWeight {
    n: usize,
    k: usize,
    isa: Isa,
    kernel: &'static Kernel,
    data: AlignedBuf,
}

impl PackedWeight {
    /// Packs for the instruction set [`Isa::detect`] picks on this host.
    pub fn pack(weight: &[f32], n: usize, k: usize) -> Self {
        Self::pack_for(weight, n, k, Isa::detect())
    }

    /// Packs for `isa`, which must be one of [`Isa::available`]; `linear`
    /// then runs that instruction set's kernel (tests compare the paths).
    pub fn pack_for(weight: &[f32], n: usize, k: usize, isa: Isa) -> Self {
        assert!(
            Isa::available().contains(&isa),
            "{} is not available on this host",
            isa.name()
        );
        Self::pack_with(weight, n, k, isa, super::kernel(isa))
    }

    /// Packs for the bf16 kernel ([`super::gemm_bf16`]'s numbers: the
    /// weight rounded to bf16 once, activations as they are packed), on a
    /// backend capped at `isa`.
    pub fn pack_bf16(weight: &[f32], n: usize, k: usize, isa: Isa) -> Self {
        let path = if super::bf16_native(isa) {
            Isa::Avx512
        } else {
            Isa::Portable
        };
        Self::pack_with(weight, n, k, path, super::bf16::kernel(isa))
    }

    fn pack_with(weight: &[f32], n: usize, k: usize, isa: Isa, kernel: &'static Kernel) -> Self {
        assert!(
            weight.len() >= n * k,
            "weight has {} values, need {n}x{k}",
            weight.len()
        );
        let (nr, steps) = (kernel.nr, k.div_ceil(kernel.k_pack));
        let mut data = AlignedBuf::default();
        let panels = data.get_mut(n.div_ceil(nr) * steps * nr);
        // SAFETY: the kernel was chosen for this host.
        unsafe { (kernel.pack_b)(weight, k, true, k, n, nr, panels) };
        PackedWeight {
            n,
            k,
            isa,
            kernel,
            data,
        }
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The instruction set whose kernel this layout is for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether the weight is held in bf16 (packed by [`Self::pack_bf16`]).
    pub fn is_bf16(&self) -> bool {
        self.kernel.k_pack == 2
    }

    pub(crate) fn kernel(&self) -> &'static Kernel {
        self.kernel
    }

    /// Back to the `[n, k]` row-major weight (rounded to bf16 if packed so).
    pub fn unpack(&self) -> Vec<f32> {
        let (nr, k_pack) = (self.kernel.nr, self.kernel.k_pack);
        let (n, k) = (self.n, self.k);
        let steps = k.div_ceil(k_pack);
        let mut out = vec![0.0; n * k];
        let panels = self.panels();
        for (j, row) in out.chunks_exact_mut(k.max(1)).take(n).enumerate() {
            let panel = &panels[(j / nr) * steps * nr..];
            for (p, v) in row.iter_mut().enumerate() {
                let slot = panel[(p / k_pack) * nr + j % nr];
                *v = if k_pack == 1 {
                    slot
                } else {
                    // Element `p % 2` of a bf16 pair: low half first.
                    f32::from_bits((slot.to_bits() >> (16 * (p % 2))) << 16)
                };
            }
        }
        out
    }

    /// The packed panels, `n.div_ceil(nr) * k * nr` floats.
    pub(crate) fn panels(&self) -> &[f32] {
        self.data.as_slice()
    }
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .finish_non_exhaustive()
    }
}
