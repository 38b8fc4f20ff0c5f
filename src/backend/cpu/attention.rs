//! Fused multi-head self-attention on the CPU.
//!
//! Work is split into (sequence, block of query rows) tasks run in parallel;
//! each task loops over the heads and, per head, computes its block of scores
//! `Q·Kᵀ/√d` against the keys of its own sequence only (the padding mask),
//! applies softmax and multiplies by `V`, writing straight into its rows of
//! the output. Only one `block × seq_len` score tile per thread exists at a
//! time, never the whole `seq × seq` matrix.

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm;
use super::isa::Isa;
use super::ops;

/// Query rows per task: small enough to give both cores work at seq 64,
/// large enough that the score tile (block × seq) makes a decent GEMM.
const QUERY_BLOCK: usize = 32;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub fn attention(
    isa: Isa,
    out: &mut [f32],
    qkv: &[f32],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
) {
    let hidden = heads * head_dim;
    // Tasks in row order, so `out` can be split into disjoint row ranges.
    let mut tasks = Vec::new();
    let mut rest = out;
    for seq in offsets.windows(2) {
        let mut row = seq[0];
        while row < seq[1] {
            let rows = QUERY_BLOCK.min(seq[1] - row);
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(rows * hidden);
            tasks.push((seq[0], seq[1], row, block));
            rest = tail;
            row += rows;
        }
    }
    tasks.into_par_iter().for_each(|(start, end, row, block)| {
        SCORES.with_borrow_mut(|scores| {
            attend_block(isa, block, qkv, start, end, row, heads, head_dim, scores)
        });
    });
}

/// The output rows `row..row + block.len() / hidden` of the sequence
/// `start..end`, for every head.
#[allow(clippy::too_many_arguments)]
fn attend_block(
    isa: Isa,
    block: &mut [f32],
    qkv: &[f32],
    start: usize,
    end: usize,
    row: usize,
    heads: usize,
    head_dim: usize,
    scores: &mut Vec<f32>,
) {
    let hidden = heads * head_dim;
    let stride = 3 * hidden;
    let queries = block.len() / hidden;
    let keys = end - start;
    let scale = 1.0 / (head_dim as f32).sqrt();
    scores.resize(queries * keys, 0.0);
    for h in 0..heads {
        let q = &qkv[row * stride + h * head_dim..];
        let k = &qkv[start * stride + hidden + h * head_dim..];
        let v = &qkv[start * stride + 2 * hidden + h * head_dim..];
        gemm::sgemm_strided(
            queries, keys, head_dim, scale, q, stride, k, stride, true, 0.0, scores, keys,
        );
        ops::softmax_rows(isa, scores, keys);
        gemm::sgemm_strided(
            queries,
            head_dim,
            keys,
            1.0,
            scores,
            keys,
            v,
            stride,
            false,
            0.0,
            &mut block[h * head_dim..],
            hidden,
        );
    }
}
