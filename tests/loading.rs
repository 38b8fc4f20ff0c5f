//! Checkpoint loading on tiny models built in code: every bad input gives an
//! error naming the file and the problem; F16/BF16 and `bert.`-prefixed
//! checkpoints load.

mod common;

use std::path::Path;

use bertrt::backend::cpu::CpuBackend;
use bertrt::model::{BertModel, ModelFiles, Pooling, TokenBatch, Workspace};
use bertrt::tokenize::BertTokenizer;
use common::{safetensors_bytes, tiny_config, tiny_tensors, write_tiny_model};
use safetensors::Dtype;

fn load(dir: &Path) -> bertrt::Result<BertModel<CpuBackend>> {
    BertModel::load(CpuBackend::new(1), &ModelFiles::locate(dir)?)
}

fn load_error(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "{message:?} does not mention {needle:?}"
        );
    }
}

fn tiny_model(dir: &Path) {
    write_tiny_model(
        dir,
        &tiny_config(),
        &safetensors_bytes(&tiny_tensors(1), Dtype::F32),
    );
}

fn embed(dir: &Path) -> Vec<f32> {
    let model = load(dir).unwrap();
    let tokenizer = BertTokenizer::from_dir(dir, 64).unwrap();
    let encoded = tokenizer
        .encode_batch(&["the cats sat on the mat .", "a big dog ran"])
        .unwrap();
    let batch = TokenBatch::from_encoded(&encoded);
    let mut ws = Workspace::new(model.backend());
    model.forward(&batch, &mut ws).unwrap();
    model.pool(&batch, &mut ws, Pooling::Pooler).unwrap()
}

#[test]
fn tiny_model_loads_from_vocab_txt() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    let out = embed(tmp.path());
    assert_eq!(out.len(), 2 * 16);
    assert!(out.iter().all(|v| v.is_finite()));
}

#[test]
fn missing_config() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    assert_mentions(
        &load_error(tmp.path()),
        &["config.json", &tmp.path().display().to_string()],
    );
}

#[test]
fn missing_weights() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    assert_mentions(&load_error(tmp.path()), &["no model.safetensors"]);
}

#[test]
fn missing_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    std::fs::remove_file(tmp.path().join("vocab.txt")).unwrap();
    let err = BertTokenizer::from_dir(tmp.path(), 64)
        .err()
        .unwrap()
        .to_string();
    assert_mentions(&err, &["tokenizer.json or vocab.txt"]);
}

#[test]
fn pickle_only_directory_explains_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("pytorch_model.bin"),
        b"PK\x03\x04 not executed",
    )
    .unwrap();
    assert_mentions(
        &load_error(tmp.path()),
        &["pytorch_model.bin", "pickle", "safe_serialization=True"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = tiny_tensors(1)
        .into_iter()
        .filter(|(name, _, _)| name != "encoder.layer.1.intermediate.dense.weight")
        .collect();
    write_tiny_model(
        tmp.path(),
        &tiny_config(),
        &safetensors_bytes(&tensors, Dtype::F32),
    );
    assert_mentions(
        &load_error(tmp.path()),
        &[
            "model.safetensors",
            "missing tensor",
            "encoder.layer.1.intermediate.dense.weight",
        ],
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config["intermediate_size"] = 48.into();
    write_tiny_model(
        tmp.path(),
        &config,
        &safetensors_bytes(&tiny_tensors(1), Dtype::F32),
    );
    assert_mentions(
        &load_error(tmp.path()),
        &[
            "encoder.layer.0.intermediate.dense.weight",
            "[32, 16]",
            "[48, 16]",
        ],
    );
}

#[test]
fn unsupported_config_fields_are_named() {
    for (field, value) in [
        ("model_type", "roberta"),
        ("hidden_act", "relu"),
        ("position_embedding_type", "relative_key"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = tiny_config();
        config[field] = value.into();
        write_tiny_model(
            tmp.path(),
            &config,
            &safetensors_bytes(&tiny_tensors(1), Dtype::F32),
        );
        assert_mentions(
            &load_error(tmp.path()),
            &["config.json", field, value, "unsupported"],
        );
    }
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = safetensors_bytes(&tiny_tensors(1), Dtype::F32);
    write_tiny_model(tmp.path(), &tiny_config(), &bytes[..bytes.len() - 100]);
    assert_mentions(
        &load_error(tmp.path()),
        &["model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn corrupt_safetensors_header() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = safetensors_bytes(&tiny_tensors(1), Dtype::F32);
    bytes[8..16].copy_from_slice(b"not json");
    write_tiny_model(tmp.path(), &tiny_config(), &bytes);
    assert_mentions(
        &load_error(tmp.path()),
        &["model.safetensors", "truncated or corrupt"],
    );

    std::fs::write(tmp.path().join("model.safetensors"), b"abc").unwrap();
    assert_mentions(
        &load_error(tmp.path()),
        &["model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn half_precision_checkpoints_load_exactly() {
    // Round the weights through f16/bf16 first, so the f32 checkpoint holds
    // the same values and outputs must be identical.
    for (dtype, round) in [
        (
            Dtype::F16,
            (|v: f32| half::f16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::BF16, |v: f32| half::bf16::from_f32(v).to_f32()),
    ] {
        let rounded: Vec<_> = tiny_tensors(3)
            .into_iter()
            .map(|(n, s, d)| (n, s, d.into_iter().map(round).collect::<Vec<_>>()))
            .collect();
        let f32_dir = tempfile::tempdir().unwrap();
        let half_dir = tempfile::tempdir().unwrap();
        write_tiny_model(
            f32_dir.path(),
            &tiny_config(),
            &safetensors_bytes(&rounded, Dtype::F32),
        );
        write_tiny_model(
            half_dir.path(),
            &tiny_config(),
            &safetensors_bytes(&rounded, dtype),
        );
        assert_eq!(embed(f32_dir.path()), embed(half_dir.path()), "{dtype:?}");
    }
}

#[test]
fn bert_prefixed_names_load() {
    let plain = tempfile::tempdir().unwrap();
    tiny_model(plain.path());
    let prefixed = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = tiny_tensors(1)
        .into_iter()
        .map(|(n, s, d)| (format!("bert.{n}"), s, d))
        .collect();
    write_tiny_model(
        prefixed.path(),
        &tiny_config(),
        &safetensors_bytes(&tensors, Dtype::F32),
    );
    assert_eq!(embed(plain.path()), embed(prefixed.path()));
}

#[test]
fn unsupported_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path());
    // Re-encode one tensor as F64.
    let tensors = tiny_tensors(1);
    let encoded: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = tensors
        .iter()
        .map(|(n, s, d)| {
            if n == "pooler.dense.bias" {
                (
                    n.clone(),
                    s.clone(),
                    d.iter().flat_map(|v| (*v as f64).to_le_bytes()).collect(),
                    Dtype::F64,
                )
            } else {
                (
                    n.clone(),
                    s.clone(),
                    d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Dtype::F32,
                )
            }
        })
        .collect();
    let views: Vec<_> = encoded
        .iter()
        .map(|(n, s, b, t)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*t, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    assert_mentions(&load_error(tmp.path()), &["pooler.dense.bias", "F64"]);
}
