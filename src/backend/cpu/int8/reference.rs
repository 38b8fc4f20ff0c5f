//! The obvious loops on the same quantized values as the kernels.

use super::{check_operands, quantize_row, QuantizedWeight};
use crate::backend::cpu::gemm::gelu_erf;

/// What [`super::linear_int8`] computes, one output at a time: the same
/// per-row activation quantization (after the weight's smoothing, if any), an exact `i32` dot product with the
/// int8 weights, and the same epilogue
/// `fma(f32(dot), sx[i] · sw[j], bias[j])` (an FMA because that is what the
/// SIMD kernels do; `f32::mul_add` rounds once, like them), then the
/// double-precision GELU. Without GELU the kernels match it bit for bit.
pub fn linear_int8_reference(
    x: &[f32],
    m: usize,
    w: &QuantizedWeight,
    bias: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) {
    let (n, k) = (w.n(), w.k());
    check_operands(x, m, n, k, bias, out);
    let qw = w.to_int8();
    let mut qx = vec![0u8; k];
    for i in 0..m {
        let sx = quantize_row(&x[i * k..][..k], w.activation_multipliers(), &mut qx, 0);
        for (j, o) in out[i * n..][..n].iter_mut().enumerate() {
            let dot: i32 = qx
                .iter()
                .zip(&qw[j * k..][..k])
                .map(|(&a, &b)| a as i8 as i32 * b as i32)
                .sum();
            let b = bias.map_or(0.0, |b| b[j]);
            let v = (dot as f32).mul_add(sx * w.scales()[j], b);
            *o = if gelu { gelu_erf(v) } else { v };
        }
    }
}
