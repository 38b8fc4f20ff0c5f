//! Gradient checkpointing recomputes each layer's activations in backward
//! from the layer's saved input, with the forward's dropout seeds: the
//! training step must come out bit for bit as without it, whatever the
//! head, with LoRA adapters and with frozen bottom layers.

mod common;

use std::path::Path;

use bertrt::backend::cpu::CpuBackend;
use bertrt::checkpoint::Checkpoint;
use bertrt::config::BertConfig;
use bertrt::model::{Pooling, TokenBatch};
use bertrt::train::classifier::{ForwardMode, Group, SequenceClassifier, Targets};
use safetensors::Dtype;

/// The tiny model grown to four layers (a second tiny model's two layers
/// stacked on the first's), so that backward recomputes several layers
/// below the top one.
fn four_layer_checkpoint(dir: &Path) -> (BertConfig, Checkpoint) {
    let mut config = common::tiny_config();
    config["num_hidden_layers"] = 4.into();
    let mut tensors = common::tiny_tensors(3);
    let upper = common::tiny_tensors(4)
        .into_iter()
        .filter(|(name, _, _)| name.starts_with("encoder.layer."))
        .map(|(name, shape, data)| {
            let name = name
                .replace("encoder.layer.1.", "encoder.layer.3.")
                .replace("encoder.layer.0.", "encoder.layer.2.");
            (name, shape, data)
        });
    tensors.extend(upper);
    common::write_tiny_model(
        dir,
        &config,
        &common::safetensors_bytes(&tensors, Dtype::F32),
    );
    (
        BertConfig::from_file(&dir.join("config.json")).unwrap(),
        Checkpoint::open(&dir.join("model.safetensors")).unwrap(),
    )
}

/// Two micro-batches of different sizes: the second reuses (and shrinks)
/// the buffers the first sized, and its gradients add to the first's.
fn batches() -> [TokenBatch; 2] {
    [
        TokenBatch {
            ids: vec![2, 5, 6, 7, 3, 2, 10, 11, 12, 13, 3, 2, 3],
            type_ids: vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
            offsets: vec![0, 5, 11, 13],
        },
        TokenBatch {
            ids: vec![2, 14, 15, 3, 2, 16, 10, 17, 3],
            type_ids: vec![0; 9],
            offsets: vec![0, 4, 9],
        },
    ]
}

const SEQUENCE_LABELS: [&[usize]; 2] = [&[1, 0, 2], &[2, 1]];

fn sequence_targets(batch: usize) -> Targets<'static> {
    Targets::Classes {
        labels: SEQUENCE_LABELS[batch],
        class_weights: None,
    }
}

/// Every token of [`batches`] labeled, but `[CLS]`/`[SEP]` (ignored).
const TOKEN_LABELS: [&[Option<usize>]; 2] = [
    &[
        None,
        Some(0),
        Some(2),
        Some(1),
        None,
        None,
        Some(1),
        Some(1),
        Some(0),
        Some(2),
        None,
        None,
        None,
    ],
    &[
        None,
        Some(2),
        Some(0),
        None,
        None,
        Some(1),
        Some(1),
        Some(0),
        None,
    ],
];

fn token_targets(batch: usize) -> Targets<'static> {
    Targets::Tokens(TOKEN_LABELS[batch])
}

/// One training step's results, as bits: each micro-batch's logits and
/// loss, and every parameter's gradient (None: frozen).
#[derive(Debug, PartialEq)]
struct Step {
    logits: Vec<Vec<u32>>,
    losses: Vec<u32>,
    grads: Vec<(String, Option<Vec<u32>>)>,
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Forward and backward of each micro-batch, dropout on (a seed per
/// micro-batch, as training draws them), gradients accumulated.
fn step(
    model: &mut SequenceClassifier<CpuBackend>,
    targets: fn(usize) -> Targets<'static>,
) -> Step {
    model.params.zero_grads(&model.backend);
    let (mut logits, mut losses) = (Vec::new(), Vec::new());
    for (i, batch) in batches().iter().enumerate() {
        let mode = ForwardMode {
            dropout_seed: Some(100 + i as u64),
        };
        logits.push(bits(&model.forward(batch, mode).unwrap()));
        losses.push(model.backward(batch, targets(i), 0.5).to_bits());
    }
    let grads = model
        .params
        .export(&model.backend)
        .into_iter()
        .map(|(name, _, _)| {
            let grad = model.params.grad_of(&model.backend, &name);
            (name, grad.as_deref().map(bits))
        })
        .collect();
    Step {
        logits,
        losses,
        grads,
    }
}

/// The step of a model from `build`, with checkpointing off and on.
fn assert_checkpointing_changes_nothing(
    build: impl Fn() -> SequenceClassifier<CpuBackend>,
    targets: fn(usize) -> Targets<'static>,
) -> Step {
    let mut plain = build();
    assert!(!plain.grad_checkpointing());
    let expected = step(&mut plain, targets);
    let mut checkpointed = build();
    checkpointed.set_grad_checkpointing(true);
    assert!(checkpointed.grad_checkpointing());
    let first = step(&mut checkpointed, targets);
    assert!(first == expected, "checkpointing changed the step");
    // The shared buffers, warm now, give the same again.
    assert!(step(&mut checkpointed, targets) == expected);
    let trained = expected.grads.iter().filter(|(_, g)| g.is_some()).count();
    assert!(trained > 0, "nothing trained");
    expected
}

fn dropout_is_on(config: &BertConfig) {
    assert!(config.hidden_dropout_prob > 0.0 && config.attention_probs_dropout_prob > 0.0);
}

#[test]
fn sequence_classifier_step_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, ckpt) = four_layer_checkpoint(tmp.path());
    dropout_is_on(&config);
    for pooling in [Pooling::Pooler, Pooling::Mean] {
        assert_checkpointing_changes_nothing(
            || {
                SequenceClassifier::new(
                    CpuBackend::new(2),
                    config.clone(),
                    &ckpt,
                    pooling,
                    3,
                    0.2,
                    5,
                )
                .unwrap()
            },
            sequence_targets,
        );
    }
}

#[test]
fn token_classifier_step_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, ckpt) = four_layer_checkpoint(tmp.path());
    assert_checkpointing_changes_nothing(
        || {
            SequenceClassifier::new_token_classifier(
                CpuBackend::new(2),
                config.clone(),
                &ckpt,
                3,
                0.2,
                5,
            )
            .unwrap()
        },
        token_targets,
    );
}

/// Adapters on every linear, B nonzero so that they change what each
/// layer computes (and so what the recompute must reproduce).
#[test]
fn lora_step_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, ckpt) = four_layer_checkpoint(tmp.path());
    let build = || {
        let mut model = SequenceClassifier::new(
            CpuBackend::new(2),
            config.clone(),
            &ckpt,
            Pooling::Pooler,
            3,
            0.2,
            5,
        )
        .unwrap();
        model.add_lora(common::lora_on_every_linear(2), 9);
        let mut rng = common::Rng::new(4);
        for id in model.adapter_params() {
            let param = &model.params[id];
            if param.name.contains("lora_B") {
                let (name, len) = (param.name.clone(), param.len());
                model
                    .params
                    .set(&model.backend, &name, &rng.vec(len, 0.5))
                    .unwrap();
            }
        }
        model
    };
    let step = assert_checkpointing_changes_nothing(build, sequence_targets);
    let adapter_grads = step
        .grads
        .iter()
        .filter(|(name, grad)| name.contains("lora_") && grad.is_some())
        .count();
    assert_eq!(adapter_grads, 4 * 6 * 2);
}

/// Backward stops at the lowest trained layer: checkpointing recomputes
/// only the layers it reaches.
#[test]
fn frozen_bottom_layers_step_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, ckpt) = four_layer_checkpoint(tmp.path());
    for frozen in 1..=3 {
        let build = || {
            let mut model = SequenceClassifier::new(
                CpuBackend::new(2),
                config.clone(),
                &ckpt,
                Pooling::Cls,
                3,
                0.2,
                5,
            )
            .unwrap();
            model.set_trainable(Group::Embeddings, false);
            for l in 0..frozen {
                model.set_trainable(Group::Layer(l), false);
            }
            model
        };
        let step = assert_checkpointing_changes_nothing(build, sequence_targets);
        let trained_layer = |l: usize| {
            step.grads
                .iter()
                .any(|(name, grad)| name.contains(&format!("layer.{l}.")) && grad.is_some())
        };
        assert!((0..4).all(|l| trained_layer(l) == (l >= frozen)));
    }
}
