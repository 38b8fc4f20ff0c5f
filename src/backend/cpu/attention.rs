//! Fused multi-head self-attention on the CPU.
//!
//! Work is split into (sequence, head) tasks run in parallel. Each task
//! packs its head's `Kᵀ` and `V` once, then walks its query rows in blocks:
//! per block it computes the scores `Q·Kᵀ/√d` against the keys of its own
//! sequence only (the padding mask), applies softmax and multiplies by `V`,
//! writing straight into its head's columns of the output. Only one
//! `block × seq_len` score tile per thread exists at a time, never the
//! whole `seq × seq` matrix — except in training, where backward needs the
//! probabilities and [`attention_saving`] stores them.
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

/// Query rows per block: a multiple of the AVX-512 and AVX2 tile heights
/// (12, 6), and a `block × seq` score tile that stays in L2 up to seq 1024.
const QUERY_BLOCK: usize = 48;

/// A task's scratch: its score tile and its head's packed `Kᵀ` and `V`.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: gemm::PackedB,
    values: gemm::PackedB,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
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

/// One (sequence, head) pair of a packed batch, and where its `len × len`
/// probabilities block starts in training's buffer
/// ([`crate::backend::train::attention_probs_len`]).
pub(super) struct HeadTask {
    pub start: usize,
    pub len: usize,
    pub head: usize,
    pub probs_offset: usize,
}

/// Every (sequence, head) pair, sequence by sequence; an empty sequence
/// has no rows and no probabilities, so no tasks.
pub(super) fn head_tasks(offsets: &[usize], heads: usize) -> Vec<HeadTask> {
    let mut tasks = Vec::new();
    let mut probs_offset = 0;
    for w in offsets.windows(2).filter(|w| w[1] > w[0]) {
        let len = w[1] - w[0];
        for head in 0..heads {
            tasks.push(HeadTask {
                start: w[0],
                len,
                head,
                probs_offset,
            });
            probs_offset += len * len;
        }
    }
    tasks
}

/// A [`HeadTask`] of the forward pass, with its probabilities block when
/// training.
struct Task<'a> {
    head: HeadTask,
    probs: Option<&'a mut [f32]>,
}

/// A pointer that (sequence, head) tasks share: each writes its own
/// head's columns of its own sequence's rows, which interleave with other
/// tasks' in the buffer, so they cannot be split into disjoint slices.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub *mut f32);
// SAFETY: only used by tasks whose writes never overlap (each task owns a
// distinct (sequence, head) block); the buffer outlives the parallel loop.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method, not field access, so closures capture the `Sync` wrapper
    /// rather than the raw pointer field.
    pub fn ptr(self) -> *mut f32 {
        self.0
    }
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
    let tokens = offsets.last().copied().unwrap_or(0);
    assert!(out.len() >= tokens * hidden, "attention output too short");
    assert!(qkv.len() >= tokens * 3 * hidden, "attention QKV too short");
    let (mut rest_probs, dropout) = match saving {
        Some((probs, dropout)) => (Some(probs), dropout),
        None => (None, Dropout::OFF),
    };
    let tasks: Vec<Task> = head_tasks(offsets, heads)
        .into_iter()
        .map(|head| {
            let probs = rest_probs.take().map(|probs| {
                let (block, tail) = probs.split_at_mut(head.len * head.len);
                rest_probs = Some(tail);
                block
            });
            Task { head, probs }
        })
        .collect();
    let out = SharedMut(out.as_mut_ptr());
    tasks.into_par_iter().for_each(|task| {
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: `out` holds every sequence's rows (checked above), and
            // each task writes only its own head's columns of them.
            unsafe {
                attend_head(
                    isa, precision, task, qkv, heads, head_dim, dropout, scratch, out,
                )
            }
        });
    });
}

/// Computes one [`Task`], a block of query rows at a time.
///
/// # Safety
/// `out` must hold the sequence's rows (`hidden` floats each), and no
/// other thread may access this head's columns of them meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_head(
    isa: Isa,
    precision: Precision,
    mut task: Task,
    qkv: &[f32],
    heads: usize,
    head_dim: usize,
    dropout: Dropout,
    scratch: &mut Scratch,
    out: SharedMut,
) {
    let hidden = heads * head_dim;
    let stride = 3 * hidden;
    let HeadTask {
        start,
        len,
        head,
        probs_offset,
    } = task.head;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let column = |part: usize| start * stride + part * hidden + head * head_dim;
    let k = Strided::transposed(&qkv[column(1)..], stride);
    let v = Strided::rows(&qkv[column(2)..], stride);
    scratch.keys.pack(precision, isa, k, head_dim, len);
    scratch.values.pack(precision, isa, v, len, head_dim);
    for first in (0..len).step_by(QUERY_BLOCK) {
        let queries = QUERY_BLOCK.min(len - first);
        let q = Strided::rows(&qkv[column(0) + first * stride..], stride);
        let softmax_into = |p: &mut [f32]| {
            // SAFETY: `p` holds `queries × len` floats, borrowed mutably.
            unsafe {
                gemm::gemm_packed_ptr(&scratch.keys, queries, scale, q, 0.0, p.as_mut_ptr(), len)
            };
            ops::softmax_rows(isa, p, len);
        };
        // Training computes the probabilities in their saved rows, and `V`
        // is multiplied by those, or by their dropped copy in `scores`.
        let probs: &[f32] = match task.probs.as_deref_mut() {
            Some(saved) => {
                let rows = &mut saved[first * len..(first + queries) * len];
                softmax_into(rows);
                if dropout.is_off() {
                    rows
                } else {
                    scratch.scores.resize(queries * len, 0.0);
                    let at = probs_offset + first * len;
                    ops::dropout_into(isa, &mut scratch.scores, rows, dropout, at);
                    &scratch.scores
                }
            }
            None => {
                scratch.scores.resize(queries * len, 0.0);
                softmax_into(&mut scratch.scores);
                &scratch.scores
            }
        };
        // SAFETY: rows `start + first ..` of the output, this head's
        // columns, which the caller gives this task alone.
        unsafe {
            let o = out.ptr().add((start + first) * hidden + head * head_dim);
            gemm::gemm_packed_ptr(
                &scratch.values,
                queries,
                1.0,
                Strided::rows(probs, len),
                0.0,
                o,
                hidden,
            );
        }
    }
}
