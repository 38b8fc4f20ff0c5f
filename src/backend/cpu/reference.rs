//! The reference backend: every op as the obvious loop, in f32 like PyTorch's
//! CPU kernels. It is the yardstick for [`super::CpuBackend`] (compared op by
//! op and end to end in tests) and the readable statement of each op's math.

use super::gemm;
use crate::backend::{Activation, Backend};
use crate::checkpoint::HostTensor;

pub struct ReferenceBackend;

pub struct ReferenceLinear {
    /// `[out_features, in_features]`, as stored by PyTorch.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Backend for ReferenceBackend {
    type Tensor = Vec<f32>;
    type Param = HostTensor;
    type Linear = ReferenceLinear;

    fn describe(&self) -> String {
        "cpu reference (scalar loops, 1 thread)".into()
    }

    fn param(&self, data: HostTensor) -> HostTensor {
        data
    }

    fn prepare_linear(&self, weight: &[f32], bias: &[f32], _: usize, _: usize) -> ReferenceLinear {
        ReferenceLinear {
            weight: weight.to_vec(),
            bias: bias.to_vec(),
        }
    }

    fn new_tensor(&self) -> Vec<f32> {
        Vec::new()
    }

    fn resize(&self, tensor: &mut Vec<f32>, len: usize) {
        tensor.resize(len, 0.0);
    }

    fn to_host(&self, tensor: &Vec<f32>) -> Vec<f32> {
        tensor.clone()
    }

    fn embedding(
        &self,
        out: &mut Vec<f32>,
        ids: &[u32],
        type_ids: &[u32],
        offsets: &[usize],
        word: &HostTensor,
        position: &HostTensor,
        token_type: &HostTensor,
        hidden: usize,
    ) {
        embedding(
            out, ids, type_ids, offsets, word, position, token_type, hidden,
        );
    }

    fn matmul(
        &self,
        out: &mut Vec<f32>,
        input: &Vec<f32>,
        rows: usize,
        layer: &ReferenceLinear,
        activation: Activation,
    ) {
        let n = layer.bias.len();
        let k = layer.weight.len() / n;
        gemm::linear_reference(
            &input[..rows * k],
            rows,
            &layer.weight,
            n,
            k,
            Some(&layer.bias),
            super::epilogue(activation),
            &mut out[..rows * n],
        );
    }

    fn layer_norm(
        &self,
        x: &mut Vec<f32>,
        residual: Option<&Vec<f32>>,
        gamma: &HostTensor,
        beta: &HostTensor,
        eps: f32,
        cols: usize,
    ) {
        layer_norm(x, residual.map(|r| r.as_slice()), gamma, beta, eps, cols);
    }

    fn attention(
        &self,
        out: &mut Vec<f32>,
        qkv: &Vec<f32>,
        offsets: &[usize],
        heads: usize,
        head_dim: usize,
    ) {
        attention(out, qkv, offsets, heads, head_dim);
    }

    fn gather_rows(&self, out: &mut Vec<f32>, input: &Vec<f32>, rows: &[usize], cols: usize) {
        gather_rows(out, input, rows, cols);
    }

    fn mean_pool(&self, out: &mut Vec<f32>, input: &Vec<f32>, offsets: &[usize], cols: usize) {
        mean_pool(out, input, offsets, cols);
    }

    fn tanh(&self, x: &mut Vec<f32>) {
        x.iter_mut().for_each(|v| *v = v.tanh());
    }

    fn softmax(&self, x: &mut Vec<f32>, cols: usize) {
        x.chunks_exact_mut(cols).for_each(softmax_row);
    }
}

#[allow(clippy::too_many_arguments)]
pub fn embedding(
    out: &mut [f32],
    ids: &[u32],
    type_ids: &[u32],
    offsets: &[usize],
    word: &[f32],
    position: &[f32],
    token_type: &[f32],
    hidden: usize,
) {
    for seq in offsets.windows(2) {
        for t in seq[0]..seq[1] {
            let w = ids[t] as usize * hidden;
            let p = (t - seq[0]) * hidden;
            let y = type_ids[t] as usize * hidden;
            for c in 0..hidden {
                out[t * hidden + c] = word[w + c] + position[p + c] + token_type[y + c];
            }
        }
    }
}

pub fn layer_norm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    cols: usize,
) {
    for (r, row) in x.chunks_exact_mut(cols).enumerate() {
        if let Some(residual) = residual {
            for (v, res) in row.iter_mut().zip(&residual[r * cols..(r + 1) * cols]) {
                *v += res;
            }
        }
        let mean = row.iter().sum::<f32>() / cols as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
        let inv_std = 1.0 / (var + eps).sqrt();
        for c in 0..cols {
            row[c] = (row[c] - mean) * inv_std * gamma[c] + beta[c];
        }
    }
}

pub fn attention(out: &mut [f32], qkv: &[f32], offsets: &[usize], heads: usize, head_dim: usize) {
    let hidden = heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut scores = Vec::new();
    for seq in offsets.windows(2) {
        let (start, end) = (seq[0], seq[1]);
        for h in 0..heads {
            let q_col = h * head_dim;
            let k_col = hidden + h * head_dim;
            let v_col = 2 * hidden + h * head_dim;
            for i in start..end {
                scores.clear();
                for j in start..end {
                    let dot: f32 = (0..head_dim)
                        .map(|d| qkv[i * 3 * hidden + q_col + d] * qkv[j * 3 * hidden + k_col + d])
                        .sum();
                    scores.push(dot * scale);
                }
                softmax_row(&mut scores);
                for d in 0..head_dim {
                    out[i * hidden + q_col + d] = (start..end)
                        .map(|j| scores[j - start] * qkv[j * 3 * hidden + v_col + d])
                        .sum();
                }
            }
        }
    }
}

pub fn gather_rows(out: &mut [f32], input: &[f32], rows: &[usize], cols: usize) {
    for (i, &r) in rows.iter().enumerate() {
        out[i * cols..(i + 1) * cols].copy_from_slice(&input[r * cols..(r + 1) * cols]);
    }
}

pub fn mean_pool(out: &mut [f32], input: &[f32], offsets: &[usize], cols: usize) {
    for (s, seq) in offsets.windows(2).enumerate() {
        let count = (seq[1] - seq[0]) as f32;
        for c in 0..cols {
            out[s * cols + c] = (seq[0]..seq[1]).map(|t| input[t * cols + c]).sum::<f32>() / count;
        }
    }
}

pub fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}
