//! The pre-packed INT8 weight (layout in the module docs of `int8`).

use super::{quantize_row, Int8Isa, GROUP, MAX_K, PANEL};

/// One cache line of weights; the unit of the panel buffer, so that every
/// group of a panel (`PANEL * GROUP` = 3 lines) starts on a line and a zmm
/// load never splits one.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

// SAFETY: `Line` is 64 `i8`s with no padding (size 64 == align 64), so the
// all-zero pattern is valid and every bit pattern is a valid value.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; `repr(C)`, `Copy`, no padding, no pointers.
unsafe impl bytemuck::Pod for Line {}

/// A PyTorch `nn.Linear` weight `[n = out_features, k = in_features]`,
/// quantized to int8 per output channel and packed for the INT8 kernels.
#[derive(Clone)]
pub struct QuantizedWeight {
    n: usize,
    k: usize,
    isa: Int8Isa,
    /// `n.div_ceil(PANEL)` panels of `k.div_ceil(GROUP)` groups.
    data: Vec<Line>,
    /// Per output channel, padded with zeros to whole panels.
    scales: Vec<f32>,
    /// `Σ_p qw[j,p]` per output channel, padded with zeros to whole panels.
    col_sums: Vec<i32>,
    /// SmoothQuant migration, if any: the weights carry `s`, activations
    /// are multiplied by `1/s` before they are quantized.
    smoothing: Option<Smoothing>,
}

#[derive(Clone)]
struct Smoothing {
    /// `s`, one per input channel.
    divisors: Vec<f32>,
    /// `1/s`, what the activation quantization multiplies by.
    multipliers: Vec<f32>,
}

impl QuantizedWeight {
    /// Quantizes for the path [`Int8Isa::detect`] picks on this host.
    pub fn quantize(weight: &[f32], n: usize, k: usize) -> Self {
        Self::quantize_for(weight, n, k, Int8Isa::detect())
    }

    /// Quantizes the row-major `[n, k]` `weight` symmetrically per output
    /// channel (row): `scale = max |row| / 127`, values rounded to nearest
    /// (ties to even) in `-127..=127`. `isa` (one of [`Int8Isa::available`])
    /// picks the kernel [`super::linear_int8`] runs; the layout is the same
    /// for all.
    pub fn quantize_for(weight: &[f32], n: usize, k: usize, isa: Int8Isa) -> Self {
        assert!(
            weight.len() >= n * k,
            "weight has {} values, need {n}x{k}",
            weight.len()
        );
        let mut q = vec![0i8; n * k];
        let mut scales = vec![0.0; n];
        if k > 0 {
            for ((row, out), s) in weight
                .chunks_exact(k)
                .zip(q.chunks_exact_mut(k))
                .zip(&mut scales)
            {
                *s = quantize_row(row, None, bytemuck::cast_slice_mut(out), 0);
            }
        }
        Self::from_int8(&q, &scales, n, k, isa)
    }

    /// Quantizes `weight · diag(smoothing)` (`smoothing`: `k` positive
    /// per-input-channel factors) and divides activations by `smoothing`
    /// before quantizing them at run time: the same product, with the
    /// activations' outlier channels moved into the weights (SmoothQuant).
    pub fn quantize_smoothed(
        weight: &[f32],
        n: usize,
        k: usize,
        smoothing: &[f32],
        isa: Int8Isa,
    ) -> Self {
        assert!(
            weight.len() >= n * k,
            "weight has {} values, need {n}x{k}",
            weight.len()
        );
        assert_eq!(smoothing.len(), k, "one smoothing factor per input channel");
        let mut scaled = weight[..n * k].to_vec();
        if k > 0 {
            for row in scaled.chunks_exact_mut(k) {
                row.iter_mut().zip(smoothing).for_each(|(w, s)| *w *= s);
            }
        }
        Self::quantize_for(&scaled, n, k, isa).with_smoothing(smoothing)
    }

    /// Declares that the int8 weights carry the per-input-channel factors
    /// `smoothing` (as [`Self::quantize_smoothed`] makes them), so that
    /// activations are divided by them; for weights read back with
    /// [`Self::from_int8`].
    pub fn with_smoothing(mut self, smoothing: &[f32]) -> Self {
        assert_eq!(
            smoothing.len(),
            self.k,
            "one smoothing factor per input channel"
        );
        assert!(
            smoothing.iter().all(|s| s.is_finite() && *s > 0.0),
            "smoothing factors must be finite and positive"
        );
        self.smoothing = Some(Smoothing {
            divisors: smoothing.to_vec(),
            multipliers: smoothing.iter().map(|s| 1.0 / s).collect(),
        });
        self
    }

    /// Packs already-quantized weights: `q` row-major `[n, k]` in
    /// `-127..=127` (the symmetric range; the AVX2 kernel's overflow bound
    /// relies on it), dequantized as `q[j, p] * scales[j]`.
    pub fn from_int8(q: &[i8], scales: &[f32], n: usize, k: usize, isa: Int8Isa) -> Self {
        assert!(
            Int8Isa::available().contains(&isa),
            "{} is not available on this host",
            isa.name()
        );
        assert!(q.len() >= n * k, "q has {} values, need {n}x{k}", q.len());
        assert!(
            scales.len() >= n,
            "{} scales for {n} channels",
            scales.len()
        );
        assert!(k <= MAX_K, "k = {k} exceeds the INT8 limit {MAX_K}");
        let q = &q[..n * k];
        assert!(!q.contains(&i8::MIN), "int8 weights must lie in -127..=127");
        let panels = n.div_ceil(PANEL);
        let panel_bytes = k.div_ceil(GROUP) * PANEL * GROUP;
        let mut data = vec![Line([0; 64]); (panels * panel_bytes).div_ceil(64)];
        let bytes: &mut [i8] = bytemuck::cast_slice_mut(&mut data);
        let mut col_sums = vec![0; panels * PANEL];
        if k > 0 {
            for (j, (row, sum)) in q.chunks_exact(k).zip(&mut col_sums).enumerate() {
                let panel = &mut bytes[(j / PANEL) * panel_bytes..][..panel_bytes];
                for (p, &v) in row.iter().enumerate() {
                    panel[(p / GROUP) * PANEL * GROUP + (j % PANEL) * GROUP + p % GROUP] = v;
                }
                *sum = row.iter().map(|&v| v as i32).sum();
            }
        }
        let mut padded_scales = vec![0.0; panels * PANEL];
        padded_scales[..n].copy_from_slice(&scales[..n]);
        QuantizedWeight {
            n,
            k,
            isa,
            data,
            scales: padded_scales,
            col_sums,
            smoothing: None,
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

    /// The path [`super::linear_int8`] runs for this weight.
    pub fn isa(&self) -> Int8Isa {
        self.isa
    }

    /// Per-channel scales, `n` values.
    pub fn scales(&self) -> &[f32] {
        &self.scales[..self.n]
    }

    /// Per-channel sums of the int8 weights, `n` values.
    pub fn col_sums(&self) -> &[i32] {
        &self.col_sums[..self.n]
    }

    /// The per-input-channel smoothing factors `s` the weights carry, if any.
    pub fn smoothing(&self) -> Option<&[f32]> {
        self.smoothing.as_ref().map(|s| s.divisors.as_slice())
    }

    /// `1/s` per input channel, applied to activations before quantization.
    pub(super) fn activation_multipliers(&self) -> Option<&[f32]> {
        self.smoothing.as_ref().map(|s| s.multipliers.as_slice())
    }

    /// The int8 weights, row-major `[n, k]`.
    pub fn to_int8(&self) -> Vec<i8> {
        let (n, k) = (self.n, self.k);
        let panel_bytes = k.div_ceil(GROUP) * PANEL * GROUP;
        let bytes = self.panels();
        let mut out = vec![0; n * k];
        for (j, row) in out.chunks_exact_mut(k.max(1)).take(n).enumerate() {
            let panel = &bytes[(j / PANEL) * panel_bytes..];
            for (p, v) in row.iter_mut().enumerate() {
                *v = panel[(p / GROUP) * PANEL * GROUP + (j % PANEL) * GROUP + p % GROUP];
            }
        }
        out
    }

    /// Back to f32, row-major `[n, k]`: `q * scale / smoothing`.
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.k;
        let mut out: Vec<f32> = self.to_int8().into_iter().map(f32::from).collect();
        if k > 0 {
            for (row, &s) in out.chunks_exact_mut(k).zip(self.scales()) {
                row.iter_mut().for_each(|v| *v *= s);
                if let Some(smoothing) = self.smoothing() {
                    row.iter_mut().zip(smoothing).for_each(|(v, d)| *v /= d);
                }
            }
        }
        out
    }

    /// The packed panels.
    pub(super) fn panels(&self) -> &[i8] {
        bytemuck::cast_slice(&self.data)
    }

    /// Scales padded to whole panels.
    pub(super) fn padded_scales(&self) -> &[f32] {
        &self.scales
    }

    /// Column sums padded to whole panels.
    pub(super) fn padded_col_sums(&self) -> &[i32] {
        &self.col_sums
    }
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .field("smoothed", &self.smoothing.is_some())
            .finish_non_exhaustive()
    }
}
