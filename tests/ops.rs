//! Every fast CPU op against its plain reference (`ReferenceBackend`), on
//! random inputs with odd sizes, for every instruction set this host runs.

mod common;

use bertrt::backend::cpu::isa::Isa;
use bertrt::backend::cpu::{CpuBackend, ReferenceBackend};
use bertrt::backend::{Activation, Backend, Precision};
use bertrt::checkpoint::HostTensor;
use common::{max_abs_diff, Rng};

/// Sequences of lengths 1, 7, 33 and 130: a single token, odd lengths and
/// more than one attention query block.
const OFFSETS: [usize; 5] = [0, 1, 8, 41, 171];
const TOKENS: usize = 171;

fn backends() -> Vec<(Isa, CpuBackend)> {
    Isa::available()
        .into_iter()
        .map(|isa| (isa, CpuBackend::with_isa(2, isa)))
        .collect()
}

fn param(data: Vec<f32>) -> HostTensor {
    data.into()
}

#[test]
fn matmul_with_bias_and_gelu() {
    let mut rng = Rng::new(1);
    for (n, k) in [(5, 3), (37, 19), (384, 384), (70, 1537)] {
        let weight = rng.vec(n * k, 0.5);
        let bias = rng.vec(n, 0.5);
        let input = rng.vec(TOKENS * k, 1.0);
        for activation in [Activation::Identity, Activation::Gelu] {
            let want = {
                let layer = ReferenceBackend.prepare_linear(&weight, &bias, n, k);
                let mut out = vec![0.0; TOKENS * n];
                ReferenceBackend.matmul(&mut out, &input, TOKENS, &layer, activation);
                out
            };
            for (isa, be) in backends() {
                let layer = be.prepare_linear(&weight, &bias, n, k);
                let mut out = vec![0.0; TOKENS * n];
                be.matmul(&mut out, &input, TOKENS, &layer, activation);
                let diff = max_abs_diff(&out, &want);
                assert!(
                    diff < 1e-4 * (k as f32).sqrt(),
                    "{isa:?} {n}x{k} {activation:?}: {diff}"
                );
            }
        }
    }
}

#[test]
fn layer_norm_with_and_without_residual() {
    let mut rng = Rng::new(2);
    for cols in [1, 17, 384] {
        let x = rng.vec(TOKENS * cols, 3.0);
        let residual = rng.vec(TOKENS * cols, 1.0);
        let gamma = param(rng.vec(cols, 1.0));
        let beta = param(rng.vec(cols, 1.0));
        for use_residual in [false, true] {
            let res = use_residual.then_some(&residual);
            let mut want = x.clone();
            ReferenceBackend.layer_norm(&mut want, res, &gamma, &beta, 1e-12, cols);
            for (isa, be) in backends() {
                let mut got = x.clone();
                be.layer_norm(&mut got, res, &gamma, &beta, 1e-12, cols);
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 1e-5, "{isa:?} cols {cols}: {diff}");
            }
        }
    }
}

#[test]
fn attention_over_packed_sequences() {
    let mut rng = Rng::new(3);
    for (heads, head_dim) in [(12, 32), (2, 64), (3, 5)] {
        let hidden = heads * head_dim;
        let qkv = rng.vec(TOKENS * 3 * hidden, 2.0);
        let mut want = vec![0.0; TOKENS * hidden];
        ReferenceBackend.attention(&mut want, &qkv, &OFFSETS, heads, head_dim);
        for (isa, be) in backends() {
            let mut got = vec![f32::NAN; TOKENS * hidden];
            be.attention(&mut got, &qkv, &OFFSETS, heads, head_dim);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "{isa:?} {heads}x{head_dim}: {diff}");
        }
    }
}

/// With the backend in bf16 (`--dtype bf16`, bf16 training), `Q·Kᵀ` and
/// `P·V` take bf16 operands: the output moves off the f32 reference by
/// about bf16's rounding (2⁻⁹ relative per operand), no more — a lost pair
/// or K tail would be off by the values themselves (up to 2) — and it does
/// move, so the products really ran in bf16. Measured: at most 9.7e-3 on
/// every path; bound 5e-2.
#[test]
fn attention_in_bf16_stays_within_bf16_rounding_of_f32() {
    let mut rng = Rng::new(3);
    for (heads, head_dim) in [(12, 32), (2, 64), (3, 5)] {
        let hidden = heads * head_dim;
        let qkv = rng.vec(TOKENS * 3 * hidden, 2.0);
        let mut want = vec![0.0; TOKENS * hidden];
        ReferenceBackend.attention(&mut want, &qkv, &OFFSETS, heads, head_dim);
        for isa in Isa::available() {
            let be = CpuBackend::with_isa(2, isa).with_precision(Precision::Bf16);
            let mut got = vec![f32::NAN; TOKENS * hidden];
            be.attention(&mut got, &qkv, &OFFSETS, heads, head_dim);
            let diff = max_abs_diff(&got, &want);
            eprintln!("bf16 attention {isa:?} {heads}x{head_dim}: max abs diff {diff:.2e}");
            assert!(diff < 5e-2, "{isa:?} {heads}x{head_dim}: {diff}");
            assert!(
                diff > 1e-4,
                "{isa:?} {heads}x{head_dim}: f32 numbers ({diff})"
            );
        }
    }
}

/// Embedding, mean pooling, softmax and tanh on one backend.
fn small_ops<B: Backend<Tensor = Vec<f32>, Param = HostTensor>>(be: &B) -> [Vec<f32>; 4] {
    let mut rng = Rng::new(4);
    let hidden = 19;
    let word = param(rng.vec(50 * hidden, 1.0));
    let position = param(rng.vec(200 * hidden, 1.0));
    let token_type = param(rng.vec(2 * hidden, 1.0));
    let ids: Vec<u32> = (0..TOKENS).map(|t| (t * 7 % 50) as u32).collect();
    let types: Vec<u32> = (0..TOKENS).map(|t| (t % 3 == 0) as u32).collect();
    let states = rng.vec(TOKENS * hidden, 1.0);
    let mut embedded = vec![0.0; TOKENS * hidden];
    be.embedding(
        &mut embedded,
        &ids,
        &types,
        &OFFSETS,
        &word,
        &position,
        &token_type,
        hidden,
    );
    let mut pooled = vec![0.0; (OFFSETS.len() - 1) * hidden];
    be.mean_pool(&mut pooled, &states, &OFFSETS, hidden);
    let mut probs = rng.vec(13 * 31, 20.0);
    be.softmax(&mut probs, 31);
    let mut squashed = rng.vec(301, 4.0);
    be.tanh(&mut squashed);
    [embedded, pooled, probs, squashed]
}

#[test]
fn embedding_pooling_softmax_tanh() {
    let want = small_ops(&ReferenceBackend);
    for (isa, be) in backends() {
        let got = small_ops(&be);
        for (what, (g, w)) in ["embedding", "mean_pool", "softmax", "tanh"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let diff = max_abs_diff(g, w);
            assert!(diff < 2e-6, "{isa:?} {what}: {diff}");
        }
    }
}

/// An empty sequence in a packed batch has no rows and no probabilities:
/// training's attention, forward and backward, gives the same numbers with
/// it as without it.
#[test]
fn training_attention_skips_empty_sequences() {
    use bertrt::backend::train::{attention_probs_len, Dropout, TrainBackend};
    let mut rng = Rng::new(9);
    let (heads, head_dim) = (2, 8);
    let hidden = heads * head_dim;
    let with_empty = [0, 3, 3, 8];
    let without = [0, 3, 8];
    let qkv = rng.vec(8 * 3 * hidden, 1.0);
    let d_out = rng.vec(8 * hidden, 1.0);
    let dropout = Dropout { p: 0.1, seed: 3 };
    let be = CpuBackend::new(2);
    let run = |offsets: &[usize]| {
        let mut out = vec![f32::NAN; 8 * hidden];
        let mut probs = vec![f32::NAN; attention_probs_len(offsets, heads)];
        be.attention_forward(
            &mut out, &mut probs, &qkv, offsets, heads, head_dim, dropout,
        );
        let mut d_qkv = vec![f32::NAN; qkv.len()];
        be.attention_backward(
            &mut d_qkv, &d_out, &qkv, &probs, offsets, heads, head_dim, dropout,
        );
        (out, probs, d_qkv)
    };
    assert_eq!(run(&with_empty), run(&without));
}
