//! LoRA: the adapter ops and the adapted model against central finite
//! differences, step 0 equal to the base model, training that moves only
//! adapters and head, merged and unmerged models that agree, and
//! `finetune --lora-rank` artifacts (merged, and adapters apart from their
//! base) loaded by the normal loaders.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bertrt::backend::cpu::CpuBackend;
use bertrt::backend::train::{AdamW, Lora, TrainBackend};
use bertrt::checkpoint::Checkpoint;
use bertrt::classify::Classifier;
use bertrt::config::BertConfig;
use bertrt::lora::{LoraSpec, LoraTarget, ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX};
use bertrt::model::{Pooling, TokenBatch};
use bertrt::train::classifier::{ForwardMode, SequenceClassifier, Targets};
use common::{check_gradient as check, dot, max_abs_diff, Rng};
use safetensors::Dtype;

fn backend() -> CpuBackend {
    CpuBackend::new(2)
}

/// The adapter op on the middle third of a wider output (a key adapter on
/// the fused QKV output): the other columns untouched, and the gradients
/// of the input, A and B against finite differences.
#[test]
fn lora_ops_match_finite_differences() {
    let be = backend();
    let (rows, k, n, r, width) = (7, 9, 5, 3, 15);
    let columns = n..2 * n;
    let scale = 1.5;
    let mut rng = Rng::new(1);
    let x = rng.vec(rows * k, 1.0);
    let a = rng.vec(r * k, 1.0);
    let b = rng.vec(n * r, 1.0);
    let base = rng.vec(rows * width, 1.0);
    let d_out = rng.vec(rows * width, 1.0);
    let forward = |x: &[f32], a: &[f32], b: &[f32]| {
        let mut out = base.clone();
        let mut xa = vec![0.0; rows * r];
        let (a, b) = (a.to_vec(), b.to_vec());
        let lora = Lora {
            a: &a,
            b: &b,
            scale,
        };
        be.lora_forward(&mut out, columns.clone(), &mut xa, &x.to_vec(), lora, rows);
        (out, xa)
    };
    let (out, xa) = forward(&x, &a, &b);
    for (i, (o, b)) in out.iter().zip(&base).enumerate() {
        if !columns.contains(&(i % width)) {
            assert_eq!(o.to_bits(), b.to_bits(), "column {} moved", i % width);
        }
    }
    // d_input is added to: start it from a known value.
    let d_input_before = rng.vec(rows * k, 1.0);
    let mut d_x = d_input_before.clone();
    let (mut d_a, mut d_b, mut scratch) = (vec![0.0; r * k], vec![0.0; n * r], vec![0.0; rows * r]);
    be.lora_backward(
        &mut d_x,
        Some((&mut d_a, &mut d_b)),
        &mut scratch,
        &d_out,
        columns.clone(),
        &xa,
        &x,
        Lora {
            a: &a,
            b: &b,
            scale,
        },
        rows,
    );
    let d_x: Vec<f32> = d_x
        .iter()
        .zip(&d_input_before)
        .map(|(d, b)| d - b)
        .collect();
    check("d_input", &x, &d_x, 100, |x| {
        dot(&forward(x, &a, &b).0, &d_out)
    });
    check("d_A", &a, &d_a, 100, |a| dot(&forward(&x, a, &b).0, &d_out));
    check("d_B", &b, &d_b, 100, |b| dot(&forward(&x, &a, b).0, &d_out));
}

/// A tiny model (hidden 16, 2 layers) on disk, with its checkpoint.
fn tiny_checkpoint(dir: &Path) -> (BertConfig, Checkpoint) {
    common::write_tiny_model(
        dir,
        &common::tiny_config(),
        &common::safetensors_bytes(&common::tiny_tensors(3), Dtype::F32),
    );
    (
        BertConfig::from_file(&dir.join("config.json")).unwrap(),
        Checkpoint::open(&dir.join("model.safetensors")).unwrap(),
    )
}

fn tiny_batch() -> TokenBatch {
    TokenBatch {
        ids: vec![2, 5, 6, 7, 3, 2, 10, 11, 12, 13, 3, 2, 3],
        type_ids: vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        offsets: vec![0, 5, 11, 13],
    }
}

const LABELS: [usize; 3] = [1, 0, 2];

fn cross_entropy(logits: &[f32], labels: &[usize]) -> f64 {
    let classes = logits.len() / labels.len();
    let total: f64 = logits
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &label)| {
            let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
            let log_sum = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            log_sum - row[label] as f64
        })
        .sum();
    total / labels.len() as f64
}

fn value_of(model: &SequenceClassifier<CpuBackend>, name: &str) -> Vec<f32> {
    model
        .params
        .export(&model.backend)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .2
}

/// Adapters on every linear of both layers, B made nonzero, dropout on:
/// each adapter matrix's gradient (which for the lower layer's passes
/// through the upper layer's adapters' input gradients) against finite
/// differences of the loss; the frozen base gets no gradient at all.
#[test]
fn adapted_model_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, ckpt) = tiny_checkpoint(tmp.path());
    let batch = tiny_batch();
    let mut model =
        SequenceClassifier::new(backend(), config, &ckpt, Pooling::Pooler, 3, 0.2, 5).unwrap();
    model.add_lora(common::lora_on_every_linear(2), 9);
    let adapter_names: Vec<String> = model
        .adapter_params()
        .into_iter()
        .map(|id| model.params[id].name.clone())
        .collect();
    assert_eq!(adapter_names.len(), 2 * 6 * 2);
    let mut rng = Rng::new(4);
    for name in adapter_names.iter().filter(|n| n.contains("lora_B")) {
        let len = value_of(&model, name).len();
        model
            .params
            .set(&model.backend, name, &rng.vec(len, 0.5))
            .unwrap();
    }
    let mode = ForwardMode {
        dropout_seed: Some(77),
    };
    model.forward(&batch, mode).unwrap();
    model.params.zero_grads(&model.backend);
    let targets = Targets::Classes {
        labels: &LABELS,
        class_weights: None,
    };
    model.backward(&batch, targets, 1.0);
    for frozen in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.dense.bias",
    ] {
        assert!(
            model.params.grad_of(&model.backend, frozen).is_none(),
            "{frozen} has a gradient"
        );
    }
    assert!(model
        .params
        .grad_of(&model.backend, "classifier.weight")
        .is_some());
    for name in &adapter_names {
        let grad = model.params.grad_of(&model.backend, name).unwrap();
        let value = value_of(&model, name);
        check(name, &value, &grad, 24, |v| {
            model.params.set(&model.backend, name, v).unwrap();
            let logits = model.forward(&batch, mode).unwrap();
            model.params.set(&model.backend, name, &value).unwrap();
            cross_entropy(&logits, &LABELS)
        });
    }
}

/// B starts at zero, so before any step the adapted model computes
/// exactly (bit for bit) what the base model does.
#[test]
fn step_zero_logits_equal_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, ckpt) = tiny_checkpoint(tmp.path());
    let batch = tiny_batch();
    let eval = ForwardMode { dropout_seed: None };
    let new = || {
        SequenceClassifier::new(backend(), config.clone(), &ckpt, Pooling::Pooler, 3, 0.1, 5)
            .unwrap()
    };
    let mut base = new();
    let mut adapted = new();
    adapted.add_lora(common::lora_on_every_linear(4), 1);
    let (want, got) = (
        base.forward(&batch, eval).unwrap(),
        adapted.forward(&batch, eval).unwrap(),
    );
    assert_eq!(
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

/// A few AdamW steps: every base parameter bit-identical, every adapter
/// matrix and the head moved; the merged weights, loaded as a plain model,
/// give the adapted model's logits.
#[test]
fn training_moves_only_adapters_and_head_and_merging_keeps_the_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, ckpt) = tiny_checkpoint(tmp.path());
    let batch = tiny_batch();
    let mut model =
        SequenceClassifier::new(backend(), config.clone(), &ckpt, Pooling::Pooler, 3, 0.1, 5)
            .unwrap();
    model.add_lora(
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            targets: vec![LoraTarget::Key, LoraTarget::Dense, LoraTarget::Output],
        },
        2,
    );
    let before = model.params.snapshot(&model.backend);
    for step in 0..4u32 {
        model.params.zero_grads(&model.backend);
        model
            .forward(
                &batch,
                ForwardMode {
                    dropout_seed: Some(step as u64),
                },
            )
            .unwrap();
        let targets = Targets::Classes {
            labels: &LABELS,
            class_weights: None,
        };
        model.backward(&batch, targets, 1.0);
        model.params.adamw_step(
            &model.backend,
            AdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step: step + 1,
            },
        );
    }
    let after = model.params.snapshot(&model.backend);
    let mut moved = Vec::new();
    for ((param, old), new) in model.params.iter().zip(&before).zip(&after) {
        let same = old.iter().zip(new).all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            moved.push(param.name.clone());
        }
    }
    let mut expected: Vec<String> = (0..2)
        .flat_map(|l| {
            [
                "attention.self.key",
                "attention.output.dense",
                "output.dense",
            ]
            .into_iter()
            .flat_map(move |m| {
                ["lora_A", "lora_B"].map(|ab| format!("bert.encoder.layer.{l}.{m}.{ab}.weight"))
            })
        })
        .chain(
            [
                "bert.pooler.dense.weight",
                "bert.pooler.dense.bias",
                "classifier.weight",
                "classifier.bias",
            ]
            .map(String::from),
        )
        .collect();
    moved.sort();
    expected.sort();
    assert_eq!(moved, expected);

    let eval = ForwardMode { dropout_seed: None };
    let adapted = model.forward(&batch, eval).unwrap();
    let merged_dir = tmp.path().join("merged");
    std::fs::create_dir(&merged_dir).unwrap();
    let merged_path = merged_dir.join("model.safetensors");
    std::fs::write(
        &merged_path,
        common::safetensors_bytes(&model.merged_tensors(), Dtype::F32),
    )
    .unwrap();
    let merged_ckpt = Checkpoint::open(&merged_path).unwrap();
    let mut plain =
        SequenceClassifier::new(backend(), config, &merged_ckpt, Pooling::Pooler, 3, 0.1, 5)
            .unwrap();
    let merged = plain.forward(&batch, eval).unwrap();
    let diff = max_abs_diff(&adapted, &merged);
    assert!(diff <= 1e-5, "merged vs adapted logits differ by {diff}");
    assert!(
        max_abs_diff(&adapted, &model.forward(&tiny_batch(), eval).unwrap()) == 0.0,
        "eval forward is deterministic"
    );
}

fn bertrt(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bertrt"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const TRAIN: &[(&str, &str)] = &[
    ("the cat sat on the mat", "cat"),
    ("a big cat sat", "cat"),
    ("the small cats sat on a mat", "cat"),
    ("the dog ran fast", "dog"),
    ("a big dog ran", "dog"),
    ("the small dogs ran slow", "dog"),
];

/// `bertrt finetune` of the tiny model in `dir/tiny` (written if absent)
/// into `dir/out`.
fn tiny_run(dir: &Path, out: &str, extra: &[&str]) -> (bool, String, String) {
    let model = dir.join("tiny");
    if !model.exists() {
        common::write_tiny_model(
            &model,
            &common::tiny_config(),
            &common::safetensors_bytes(&common::tiny_tensors(1), Dtype::F32),
        );
    }
    let data = dir.join("train.jsonl");
    let rows: String = TRAIN
        .iter()
        .map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string() + "\n")
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.join(out);
    let mut args = vec![
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "--valid",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--max-length",
        "16",
        "--lr",
        "1e-2",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    bertrt(&args)
}

/// Tensor name (without `bert.`) -> bytes.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name.trim_start_matches("bert.").to_string(),
                view.data().to_vec(),
            )
        })
        .collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn logits(dir: &Path, texts: &[&str]) -> bertrt::Result<Vec<f32>> {
    let mut classifier = Classifier::load(backend(), dir)?;
    let encoded = classifier.tokenizer.encode_batch(texts)?;
    classifier.logits_encoded(&encoded)
}

const TEXTS: &[&str] = &["the cat sat", "a dog ran fast", "small mat"];

/// `--merge-lora` writes a plain model in which exactly the adapted
/// weights and the head differ from the base; without it the directory
/// holds PEFT's adapter files and no weights of its own, and loads (base +
/// adapters merged at load) to the very same logits, which are also those
/// of the adapted training model rebuilt from the saved adapters.
#[test]
fn finetune_lora_merged_and_unmerged_artifacts_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lora = ["--lora-rank", "2", "--lora-targets", "key,dense,output"];
    let (ok, _, err) = tiny_run(dir, "merged", &[&lora[..], &["--merge-lora"]].concat());
    assert!(ok, "{err}");
    let (ok, _, err) = tiny_run(dir, "adapters", &lora);
    assert!(ok, "{err}");

    // Merged: a plain model; only the adapted weights and the head moved.
    let base = tensors(&dir.join("tiny/model.safetensors"));
    let merged = tensors(&dir.join("merged/model.safetensors"));
    let moved: Vec<&String> = merged
        .iter()
        .filter(|(name, data)| base.get(*name) != Some(data))
        .map(|(name, _)| name)
        .collect();
    let mut expected: Vec<String> = (0..2)
        .flat_map(|l| {
            [
                "attention.self.key",
                "attention.output.dense",
                "output.dense",
            ]
            .map(|m| format!("encoder.layer.{l}.{m}.weight"))
        })
        .chain(
            [
                "classifier.bias",
                "classifier.weight",
                "pooler.dense.bias",
                "pooler.dense.weight",
            ]
            .map(String::from),
        )
        .collect();
    expected.sort();
    assert_eq!(moved, expected.iter().collect::<Vec<_>>());
    assert!(!dir.join("merged").join(ADAPTER_CONFIG).exists());
    let meta = read_json(&dir.join("merged/bertrt.json"));
    assert!(meta.get("adapter_base").is_none());
    assert_eq!(meta["recipe"]["lora_rank"], 2);

    // Unmerged: PEFT's files, the adapters and the head only.
    let adapters = dir.join("adapters");
    assert!(!adapters.join("model.safetensors").exists());
    let saved: Vec<String> = tensors(&adapters.join(ADAPTER_WEIGHTS))
        .into_keys()
        .collect();
    assert_eq!(saved.len(), 2 * 3 * 2 + 4, "{saved:?}");
    assert!(
        saved.iter().all(|n| n.starts_with(PEFT_PREFIX)),
        "{saved:?}"
    );
    assert!(saved.contains(&format!(
        "{PEFT_PREFIX}bert.encoder.layer.1.output.dense.lora_B.weight"
    )));
    assert!(saved.contains(&format!("{PEFT_PREFIX}classifier.weight")));
    let config = read_json(&adapters.join(ADAPTER_CONFIG));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["r"], 2);
    assert_eq!(config["lora_alpha"], 4.0);
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["classifier", "pooler"])
    );
    assert_eq!(
        config["target_modules"][5],
        "bert.encoder.layer.1.output.dense"
    );
    let base_dir = PathBuf::from(config["base_model_name_or_path"].as_str().unwrap());
    assert_eq!(
        base_dir.canonicalize().unwrap(),
        dir.join("tiny").canonicalize().unwrap()
    );
    let meta = read_json(&adapters.join("bertrt.json"));
    assert_eq!(meta["adapter_base"]["sha256"].as_str().unwrap().len(), 64);

    // Merged at save and merged at load: the same weights, the same logits.
    let from_merged = logits(&dir.join("merged"), TEXTS).unwrap();
    let from_adapters = logits(&adapters, TEXTS).unwrap();
    assert_eq!(from_merged, from_adapters);

    // Moved together, the adapters find their base by its relative path.
    assert_eq!(meta["adapter_base"]["relative"], "../tiny");
    let moved = dir.join("moved");
    std::fs::create_dir(&moved).unwrap();
    for name in ["tiny", "adapters"] {
        std::fs::rename(dir.join(name), moved.join(name)).unwrap();
    }
    assert_eq!(
        logits(&moved.join("adapters"), TEXTS).unwrap(),
        from_adapters
    );
    // Another model at the recorded path: the base is the candidate whose
    // SHA-256 is the recorded one, here the relative path's.
    let other = dir.join("tiny");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(
        other.join("model.safetensors"),
        common::safetensors_bytes(&common::tiny_tensors(2), Dtype::F32),
    )
    .unwrap();
    assert_eq!(
        logits(&moved.join("adapters"), TEXTS).unwrap(),
        from_adapters
    );
    std::fs::remove_dir_all(&other).unwrap();
    for name in ["tiny", "adapters"] {
        std::fs::rename(moved.join(name), dir.join(name)).unwrap();
    }

    // The training model (adapters unmerged) rebuilt from the saved files.
    let (config, ckpt) = (
        BertConfig::from_file(&dir.join("tiny/config.json")).unwrap(),
        Checkpoint::open(&dir.join("tiny/model.safetensors")).unwrap(),
    );
    let mut model =
        SequenceClassifier::new(backend(), config, &ckpt, Pooling::Pooler, 2, 0.1, 0).unwrap();
    model.add_lora(
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            targets: vec![LoraTarget::Key, LoraTarget::Dense, LoraTarget::Output],
        },
        0,
    );
    let saved = Checkpoint::open(&adapters.join(ADAPTER_WEIGHTS)).unwrap();
    for (name, shape) in saved.shapes() {
        let values = saved.tensor(&name, &shape).unwrap();
        let name = name.strip_prefix(PEFT_PREFIX).unwrap();
        model.params.set(&model.backend, name, &values[..]).unwrap();
    }
    let classifier = Classifier::load(backend(), &adapters).unwrap();
    let batch = TokenBatch::from_encoded(&classifier.tokenizer.encode_batch(TEXTS).unwrap());
    let unmerged = model
        .forward(&batch, ForwardMode { dropout_seed: None })
        .unwrap();
    let diff = max_abs_diff(&unmerged, &from_adapters);
    assert!(diff <= 1e-5, "unmerged vs loaded logits differ by {diff}");

    // `bertrt predict` reads the adapter directory like any model.
    let input = dir.join("texts.txt");
    std::fs::write(&input, TEXTS.join("\n")).unwrap();
    let (ok, stdout, err) = bertrt(&[
        "predict",
        "--model",
        adapters.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(stdout.lines().count(), TEXTS.len());

    // A changed base is refused, as is a missing one.
    std::fs::write(
        dir.join("tiny/model.safetensors"),
        common::safetensors_bytes(&common::tiny_tensors(2), Dtype::F32),
    )
    .unwrap();
    let err = logits(&adapters, TEXTS).unwrap_err().to_string();
    assert!(
        err.contains("SHA-256") && err.contains("--merge-lora"),
        "{err}"
    );
    std::fs::remove_file(dir.join("tiny/model.safetensors")).unwrap();
    let err = logits(&adapters, TEXTS).unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("tiny"), "{err}");
}

/// LoRA settings are checked before any training, naming the setting.
#[test]
fn lora_settings_that_make_no_sense_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (extra, expected) in [
        (&["--lora-alpha", "8"][..], "need lora_rank"),
        (&["--merge-lora"][..], "need lora_rank"),
        (&["--lora-rank", "2", "--head-only"][..], "head_only"),
        (
            &["--lora-rank", "2", "--freeze-bottom", "1"][..],
            "freeze_bottom",
        ),
        (
            &["--lora-rank", "2", "--unfreeze-schedule", "head:1,all:1"][..],
            "unfreeze_schedule",
        ),
        (
            &["--lora-rank", "2", "--layer-lr-decay", "0.9"][..],
            "layer_lr_decay",
        ),
        (
            &["--lora-rank", "2", "--lora-targets", "query,query"][..],
            "twice",
        ),
        (&["--lora-rank", "2", "--lora-alpha", "0"][..], "lora_alpha"),
        (
            &["--lora-rank", "2", "--lora-targets", "pooler"][..],
            "pooler",
        ),
    ] {
        let (ok, _, err) = tiny_run(tmp.path(), "out", extra);
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    assert!(!tmp.path().join("out").exists());
}
