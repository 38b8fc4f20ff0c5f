//! Fused multi-head self-attention on the CPU.
//!
//! Work is split into (sequence, block of query rows) tasks run in parallel;
//! each task loops over the heads and, per head, computes its block of scores
//! `Q·Kᵀ/√d` against the keys of its own sequence only (the padding mask),
//! applies softmax and multiplies by `V`, writing straight into its rows of
//! the output. Only one `block × seq_len` score tile per thread exists at a
//! time, never the whole `seq × seq` matrix — except in training, where
//! backward needs the probabilities and [`attention_saving`] stores them.
//!
//! The two products (`Q·Kᵀ`, `P·V`) run in the backend's [`Precision`]:
//! in bf16 their operands are rounded to bf16 and summed in f32, as
//! PyTorch's bf16 autocast runs `bmm`; scale, softmax and dropout stay f32.

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm::{self, Strided};
use super::isa::Isa;
use super::ops;
use crate::backend::train::Dropout;
use crate::backend::Precision;

/// Query rows per task: small enough to give both cores work at seq 64,
/// large enough that the score tile (block × seq) makes a decent GEMM.
const QUERY_BLOCK: usize = 32;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Inference attention over the fused `[tokens, 3 × hidden]` QKV rows.
pub fn attention(
    isa: Isa,
    precision: Precision,
    out: &mut [f32],
    qkv: &[f32],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
) {
    attend(isa, precision, out, qkv, offsets, heads, head_dim, None);
}

/// Training attention: as [`attention`], and also stores the probabilities
/// (before dropout) in `probs` — per sequence, per head, a `len × len` block
/// ([`crate::backend::train::attention_probs_len`]) — then applies `dropout`
/// to them, counting elements by their index in `probs`.
#[allow(clippy::too_many_arguments)]
pub fn attention_saving(
    isa: Isa,
    precision: Precision,
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    dropout: Dropout,
) {
    attend(
        isa,
        precision,
        out,
        qkv,
        offsets,
        heads,
        head_dim,
        Some((probs, dropout)),
    );
}

/// One task: output rows `row..` of the sequence `start..end`, and, when
/// training, the same rows of each head's probability block.
struct Task<'a> {
    start: usize,
    end: usize,
    row: usize,
    out: &'a mut [f32],
    /// Per head, this task's rows of the head's `len × len` block.
    probs: Vec<&'a mut [f32]>,
    /// Index in the whole probabilities buffer of this sequence's block.
    probs_base: usize,
}

#[allow(clippy::too_many_arguments)]
fn attend(
    isa: Isa,
    precision: Precision,
    out: &mut [f32],
    qkv: &[f32],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    saving: Option<(&mut [f32], Dropout)>,
) {
    let hidden = heads * head_dim;
    let (mut rest_probs, dropout) = match saving {
        Some((probs, dropout)) => (Some(probs), dropout),
        None => (None, Dropout::OFF),
    };
    // Tasks in row order, so `out` can be split into disjoint row ranges.
    let mut tasks = Vec::new();
    let mut rest = out;
    let mut probs_base = 0;
    for seq in offsets.windows(2) {
        let len = seq[1] - seq[0];
        if len == 0 {
            continue; // no rows, no probabilities
        }
        let first = tasks.len();
        let mut row = seq[0];
        while row < seq[1] {
            let rows = QUERY_BLOCK.min(seq[1] - row);
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(rows * hidden);
            tasks.push(Task {
                start: seq[0],
                end: seq[1],
                row,
                out: block,
                probs: Vec::new(),
                probs_base,
            });
            rest = tail;
            row += rows;
        }
        if let Some(probs) = rest_probs.take() {
            let (seq_probs, tail) = probs.split_at_mut(heads * len * len);
            for head_probs in seq_probs.chunks_mut(len * len) {
                for (task, rows) in tasks[first..]
                    .iter_mut()
                    .zip(head_probs.chunks_mut(QUERY_BLOCK * len))
                {
                    task.probs.push(rows);
                }
            }
            rest_probs = Some(tail);
        }
        probs_base += heads * len * len;
    }
    tasks.into_par_iter().for_each(|task| {
        SCORES.with_borrow_mut(|scores| {
            attend_block(isa, precision, task, qkv, heads, head_dim, dropout, scores)
        });
    });
}

/// Computes one [`Task`], every head.
#[allow(clippy::too_many_arguments)]
fn attend_block(
    isa: Isa,
    precision: Precision,
    mut task: Task,
    qkv: &[f32],
    heads: usize,
    head_dim: usize,
    dropout: Dropout,
    scores: &mut Vec<f32>,
) {
    let hidden = heads * head_dim;
    let stride = 3 * hidden;
    let queries = task.out.len() / hidden;
    let keys = task.end - task.start;
    let scale = 1.0 / (head_dim as f32).sqrt();
    scores.resize(queries * keys, 0.0);
    for h in 0..heads {
        let q = Strided::rows(&qkv[task.row * stride + h * head_dim..], stride);
        let k = Strided::transposed(&qkv[task.start * stride + hidden + h * head_dim..], stride);
        let v = Strided::rows(
            &qkv[task.start * stride + 2 * hidden + h * head_dim..],
            stride,
        );
        let softmax_into = |p: &mut [f32]| {
            gemm::gemm_strided(
                precision, isa, queries, keys, head_dim, scale, q, k, 0.0, p, keys,
            );
            ops::softmax_rows(isa, p, keys);
        };
        // Training computes the probabilities in their saved rows, and `V`
        // is multiplied by those, or by their dropped copy in `scores`.
        let probs: &[f32] = match task.probs.get_mut(h) {
            Some(saved) => {
                softmax_into(saved);
                if dropout.is_off() {
                    saved
                } else {
                    let first = task.probs_base + h * keys * keys + (task.row - task.start) * keys;
                    ops::dropout_into(isa, scores, saved, dropout, first);
                    scores
                }
            }
            None => {
                softmax_into(scores);
                scores
            }
        };
        let probs = Strided::rows(probs, keys);
        gemm::gemm_strided(
            precision,
            isa,
            queries,
            head_dim,
            keys,
            1.0,
            probs,
            v,
            0.0,
            &mut task.out[h * head_dim..],
            hidden,
        );
    }
}
