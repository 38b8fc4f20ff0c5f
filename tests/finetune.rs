//! `bertrt finetune`, `eval` and `predict` end to end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::Dtype;

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

fn write_jsonl(path: &Path, rows: &[(&str, &str)]) {
    let text: String = rows
        .iter()
        .map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    common::write_tiny_model(
        &model,
        &common::tiny_config(),
        &common::safetensors_bytes(&common::tiny_tensors(1), Dtype::F32),
    );
    model
}

const TINY_TRAIN: &[(&str, &str)] = &[
    ("the cat sat on the mat", "cat"),
    ("a big cat sat", "cat"),
    ("the small cats sat on a mat", "cat"),
    ("the dog ran fast", "dog"),
    ("a big dog ran", "dog"),
    ("the small dogs ran slow", "dog"),
];

fn tiny_run(dir: &Path, out: &str, extra: &[&str]) -> (bool, String, String) {
    let model = tiny_model(dir);
    let train = dir.join("train.jsonl");
    let valid = dir.join("valid.jsonl");
    write_jsonl(&train, TINY_TRAIN);
    write_jsonl(&valid, &TINY_TRAIN[1..5]);
    let out = dir.join(out);
    let mut args = vec![
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        valid.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--max-length",
        "16",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    bertrt(&args)
}

#[test]
fn same_seed_same_model_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "a", &["--seed", "7"]);
    assert!(ok, "{err}");
    let (ok, _, err) = tiny_run(tmp.path(), "b", &["--seed", "7"]);
    assert!(ok, "{err}");
    let (ok, _, err) = tiny_run(tmp.path(), "c", &["--seed", "8"]);
    assert!(ok, "{err}");
    let weights = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(weights("a"), weights("b"));
    assert_ne!(weights("a"), weights("c"));
}

#[test]
fn artifact_has_hf_files_and_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, err) = tiny_run(tmp.path(), "out", &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("\"steps\": 6"), "{stdout}");
    let out = tmp.path().join("out");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "bertrt.json",
        "metrics.jsonl",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"]["0"], "cat");
    assert_eq!(config["label2id"]["dog"], 1);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bertrt.json")).unwrap()).unwrap();
    assert_eq!(meta["labels"], serde_json::json!(["cat", "dog"]));
    assert_eq!(meta["recipe"]["lr"].as_f64().unwrap() as f32, 3e-5);
    assert_eq!(
        meta["recipe"]["weight_decay"].as_f64().unwrap() as f32,
        0.01
    );
    assert_eq!(meta["preprocessing"]["max_length"], 16);
    assert_eq!(meta["data"]["train"]["sha256"].as_str().unwrap().len(), 64);
    assert!(meta["temperature"].as_f64().unwrap() > 0.0);
    let names = safetensors_names(&out.join("model.safetensors"));
    assert!(names.contains(&"bert.encoder.layer.1.attention.self.key.weight".to_string()));
    assert!(names.contains(&"classifier.weight".to_string()));
    // Every step is logged; the live log beside the output is gone.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps = log.lines().filter(|l| l.contains("\"grad_norm\"")).count();
    assert_eq!(steps, 6);
    assert!(!tmp.path().join("out.metrics.jsonl").exists());
    // No staging directories left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.tensors().into_keys().collect()
}

#[test]
fn toml_config_with_command_line_override() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = tmp.path().join("train.toml");
    std::fs::write(&toml, "epochs = 5\nlr = 1e-4\nseed = 3\n").unwrap();
    let (ok, stdout, err) = tiny_run(tmp.path(), "out", &["--config", toml.to_str().unwrap()]);
    assert!(ok, "{err}");
    // --epochs 2 on the command line beats the file's 5.
    assert!(stdout.contains("\"steps\": 6"), "{stdout}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out/bertrt.json")).unwrap())
            .unwrap();
    assert_eq!(meta["recipe"]["seed"], 3);
    assert_eq!(meta["recipe"]["lr"].as_f64().unwrap() as f32, 1e-4);
}

#[test]
fn fp16_is_refused_on_the_cpu_and_an_unusable_cuda_device_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "out", &["--precision", "fp16"]);
    assert!(!ok);
    assert!(
        err.contains("--device cuda") && err.contains("bf16"),
        "{err}"
    );
    let toml = tmp.path().join("train.toml");
    std::fs::write(&toml, "precision = \"fp16\"\n").unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "out", &["--config", toml.to_str().unwrap()]);
    assert!(!ok && err.contains("--device cuda"), "{err}");
    // No machine has a device 99: built without kernels, without a driver
    // or with GPUs, the command fails naming the device and the reason.
    let (ok, _, err) = tiny_run(tmp.path(), "out", &["--device", "cuda:99"]);
    assert!(!ok);
    assert!(err.contains("cannot use --device cuda:99: "), "{err}");
    let (ok, _, err) = tiny_run(tmp.path(), "out", &["--device", "gpu"]);
    assert!(!ok && err.contains("cpu, cuda or cuda:N"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

/// The loss-scale fields are fp16's; fp32 records and reports are as
/// before, and the device is not part of the recipe.
#[test]
fn fp32_logs_no_loss_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, err) = tiny_run(tmp.path(), "out", &["--device", "cpu"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(report.get("skipped_steps").is_none(), "{report}");
    let steps: Vec<_> = log_lines(&tmp.path().join("out"))
        .into_iter()
        .filter(|l| l.get("grad_norm").is_some())
        .collect();
    assert_eq!(steps.len(), 6);
    for step in &steps {
        assert!(step["grad_norm"].as_f64().unwrap().is_finite(), "{step}");
        assert!(step.get("loss_scale").is_none() && step.get("skipped").is_none());
    }
    let meta = read_json(&tmp.path().join("out/bertrt.json"));
    assert_eq!(meta["recipe"]["precision"], "fp32");
    assert!(meta["recipe"].get("device").is_none());
}

#[test]
fn refuses_to_replace_a_directory_that_is_not_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("precious")).unwrap();
    std::fs::write(tmp.path().join("precious/notes.txt"), "keep me").unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "precious", &[]);
    assert!(!ok);
    assert!(err.contains("refusing to replace"), "{err}");
    assert!(tmp.path().join("precious/notes.txt").exists());
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "out", &[]);
    assert!(ok, "{err}");
    let before = std::fs::read(tmp.path().join("out/model.safetensors")).unwrap();
    let (ok, _, err) = tiny_run(
        tmp.path(),
        "out",
        &["--lr", "1e30", "--max-grad-norm", "1e30"],
    );
    assert!(!ok);
    assert!(
        err.contains("non-finite") && err.contains("intact"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(tmp.path().join("out/model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn unseen_dev_label_and_empty_text_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let train = tmp.path().join("train.jsonl");
    let valid = tmp.path().join("valid.jsonl");
    write_jsonl(&train, TINY_TRAIN);
    write_jsonl(&valid, &[("the cat", "cat"), ("a bird", "bird")]);
    let out = tmp.path().join("out");
    let args = |valid: &Path| {
        vec![
            "finetune".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--train".into(),
            train.display().to_string(),
            "--valid".into(),
            valid.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--max-length".into(),
            "16".into(),
            "--quiet".into(),
        ]
    };
    let run = |a: Vec<String>| bertrt(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, _, err) = run(args(&valid));
    assert!(!ok);
    assert!(err.contains("bird") && err.contains("line 2"), "{err}");

    write_jsonl(&valid, &[("the cat", "cat"), ("", "dog")]);
    let (ok, _, err) = run(args(&valid));
    assert!(!ok);
    assert!(
        err.contains("line 2") && err.contains("valid.jsonl"),
        "{err}"
    );
    let mut skipping = args(&valid);
    skipping.push("--skip-bad-rows".into());
    let (ok, _, err) = run(skipping);
    assert!(ok, "{err}");
}

/// The real path on a small slice of VADER with MiniLM: loss falls, the
/// artifact reloads for eval and predict.
#[test]
fn minilm_on_a_vader_slice_learns_and_reloads() {
    let model = common::minilm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let texts = [
        ("I love this movie, it is wonderful", "positive"),
        ("What a fantastic, joyful experience", "positive"),
        ("Absolutely brilliant and moving", "positive"),
        ("The best purchase I have made all year", "positive"),
        ("This is terrible, I hate it", "negative"),
        ("An awful, boring waste of time", "negative"),
        ("The worst product, it broke immediately", "negative"),
        ("Disappointing and painfully dull", "negative"),
    ];
    let train = tmp.path().join("train.jsonl");
    write_jsonl(&train, &texts);
    let out = tmp.path().join("out");
    let (ok, _, err) = bertrt(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        train.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-4",
        "--warmup-ratio",
        "0",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 8);
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[6] + losses[7]) / 2.0;
    assert!(last < first, "loss did not fall: {losses:?}");

    let (ok, stdout, err) = bertrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        train.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(report["accuracy"].as_f64().unwrap() >= 0.75, "{report}");
    assert_eq!(
        report["confusion_matrix"]["labels"],
        serde_json::json!(["negative", "positive"])
    );

    let (ok, _, err) = bertrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        train.to_str().unwrap(),
        "--report",
    ]);
    assert!(ok, "{err}");

    let input = tmp.path().join("input.txt");
    std::fs::write(
        &input,
        "Absolutely brilliant and moving\nAn awful, boring waste of time\n",
    )
    .unwrap();
    let (ok, stdout, err) = bertrt(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let sum: f64 = row["probs"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }
    assert_eq!(rows[0]["label"], "positive");
    assert_eq!(rows[1]["label"], "negative");
}

fn tensors(path: &Path) -> std::collections::HashMap<String, Vec<u8>> {
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

/// Which tensors changed from the base model, by name.
fn moved(dir: &Path, out: &str) -> Vec<String> {
    let base = tensors(&dir.join("tiny/model.safetensors"));
    let trained = tensors(&dir.join(out).join("model.safetensors"));
    let mut moved: Vec<String> = trained
        .iter()
        .filter(|(name, data)| base.get(*name) != Some(data))
        .map(|(name, _)| name.clone())
        .collect();
    moved.sort();
    moved
}

#[test]
fn freeze_bottom_keeps_lower_layers_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "out", &["--freeze-bottom", "1", "--lr", "1e-3"]);
    assert!(ok, "{err}");
    let moved = moved(tmp.path(), "out");
    assert!(
        moved
            .iter()
            .all(|n| !n.starts_with("embeddings.") && !n.starts_with("encoder.layer.0.")),
        "{moved:?}"
    );
    assert!(
        moved.iter().any(|n| n.starts_with("encoder.layer.1.")),
        "{moved:?}"
    );
    assert!(moved.contains(&"classifier.weight".to_string()));
}

#[test]
fn freeze_embeddings_and_head_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "emb", &["--freeze-embeddings", "--lr", "1e-3"]);
    assert!(ok, "{err}");
    let moved_emb = moved(tmp.path(), "emb");
    assert!(
        moved_emb.iter().all(|n| !n.starts_with("embeddings.")),
        "{moved_emb:?}"
    );
    assert!(
        moved_emb.iter().any(|n| n.starts_with("encoder.layer.0.")),
        "{moved_emb:?}"
    );

    let (ok, _, err) = tiny_run(tmp.path(), "head", &["--head-only", "--lr", "1e-3"]);
    assert!(ok, "{err}");
    let moved_head = moved(tmp.path(), "head");
    assert_eq!(
        moved_head,
        [
            "classifier.bias",
            "classifier.weight",
            "pooler.dense.bias",
            "pooler.dense.weight"
        ]
    );
}

#[test]
fn layer_lr_decay_and_class_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tiny_run(
        tmp.path(),
        "out",
        &[
            "--layer-lr-decay",
            "0.5",
            "--head-lr",
            "1e-3",
            "--class-weights",
            "balanced",
        ],
    );
    assert!(ok, "{err}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out/bertrt.json")).unwrap())
            .unwrap();
    assert_eq!(meta["recipe"]["class_weights"], "balanced");
    assert_eq!(meta["recipe"]["layer_lr_decay"].as_f64().unwrap(), 0.5);

    let weights = tmp.path().join("weights.json");
    std::fs::write(&weights, r#"{"cat": 1.0}"#).unwrap();
    let (ok, _, err) = tiny_run(
        tmp.path(),
        "out2",
        &["--class-weights", weights.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(
        err.contains("weights.json") && err.contains("\"dog\""),
        "{err}"
    );
}

#[test]
fn several_seeds_report_mean_and_std() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, err) = tiny_run(tmp.path(), "runs", &["--seeds", "1,2"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["seeds"], serde_json::json!([1, 2]));
    assert!(report["dev"]["macro_f1"]["mean"].is_number(), "{report}");
    assert!(report["dev"]["macro_f1"]["std"].as_f64().unwrap() >= 0.0);
    for seed in [1, 2] {
        assert!(tmp
            .path()
            .join(format!("runs/seed-{seed}/bertrt.json"))
            .exists());
    }
}

#[test]
fn regression_task_trains_saves_and_predicts_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = tmp.path().join("scores.csv");
    std::fs::write(
        &data,
        "text,score\nthe cat sat,1.5\na big cat sat on a mat,2.0\nthe dog ran,-1.0\na big dog ran fast,-2.5\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let base = [
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "--valid",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--task",
        "regression",
        "--label-column",
        "score",
        "--max-length",
        "16",
        "--epochs",
        "3",
        "--lr",
        "1e-3",
        "--quiet",
    ];
    let (ok, stdout, err) = bertrt(&base);
    assert!(ok, "{err}");
    assert!(stdout.contains("\"pearson\""), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["problem_type"], "regression");
    assert_eq!(config["id2label"]["0"], "score");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bertrt.json")).unwrap()).unwrap();
    assert_eq!(meta["task"], "regression");
    assert!(meta["calibration"].is_null());

    let input = tmp.path().join("in.txt");
    std::fs::write(&input, "the cat sat\n").unwrap();
    let (ok, stdout, err) = bertrt(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let row: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(row["score"].is_number(), "{row}");

    let (ok, stdout, err) = bertrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--label-column",
        "score",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        report["spearman"].is_number() && report["rmse"].is_number(),
        "{report}"
    );

    // A label that is not a number is named with its line.
    std::fs::write(&data, "text,score\nthe cat sat,1.5\nthe dog ran,high\n").unwrap();
    let (ok, _, err) = bertrt(&base);
    assert!(!ok);
    assert!(err.contains("line 3") && err.contains("\"high\""), "{err}");
    // Classification metrics do not fit regression.
    let mut wrong = base.to_vec();
    wrong.extend(["--metric", "macro-f1"]);
    let (ok, _, err) = bertrt(&wrong);
    assert!(!ok && err.contains("metric does not fit"), "{err}");
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

fn log_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Predictions of `model` for `lines`, one JSON object each.
fn predict(model: &Path, dir: &Path, lines: &str) -> Vec<serde_json::Value> {
    let input = dir.join("predict-input.txt");
    std::fs::write(&input, lines).unwrap();
    let (ok, stdout, err) = bertrt(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn multi_label_trains_tunes_thresholds_and_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let rows: &[(&str, &[&str])] = &[
        ("the big cat sat", &["cat", "big"]),
        ("a cat sat on the mat", &["cat"]),
        ("the big dog ran", &["dog", "big"]),
        ("a dog ran fast", &["dog"]),
        ("the cat sat on the dog", &["cat", "dog"]),
        ("the mat", &[]),
        ("a big mat", &["big"]),
        ("the small dog ran slow", &["dog"]),
    ];
    // Training labels as JSON lists, dev labels as "|"-separated CSV.
    let train = tmp.path().join("train.jsonl");
    let lines: String = rows
        .iter()
        .map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string() + "\n")
        .collect();
    std::fs::write(&train, lines).unwrap();
    let valid = tmp.path().join("valid.csv");
    let csv: String = rows
        .iter()
        .map(|(t, l)| format!("{t},{}\n", l.join("|")))
        .collect();
    std::fs::write(&valid, format!("text,label\n{csv}")).unwrap();
    let out = tmp.path().join("out");
    let (ok, stdout, err) = bertrt(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        valid.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--task",
        "multi-label",
        "--max-length",
        "16",
        "--batch-size",
        "2",
        "--epochs",
        "6",
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["best"]["metric"], "micro_f1", "{summary}");
    assert!(summary["best"]["dev"]["macro_f1"].is_number(), "{summary}");

    let losses: Vec<f64> = log_lines(&out)
        .iter()
        .filter_map(|v| v["grad_norm"].as_f64().and(v["loss"].as_f64()))
        .collect();
    assert_eq!(losses.len(), 24);
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    assert!(
        mean(&losses[20..]) < mean(&losses[..4]),
        "loss did not fall: {losses:?}"
    );

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["problem_type"], "multi_label_classification");
    assert_eq!(
        config["id2label"],
        serde_json::json!({"0": "big", "1": "cat", "2": "dog"})
    );
    let meta_path = out.join("bertrt.json");
    let mut meta = read_json(&meta_path);
    assert_eq!(meta["task"], "multi-label-classification");
    assert_eq!(meta["format_version"], 2);
    assert!(meta["calibration"].is_null());
    let thresholds = meta["thresholds"]["values"].as_object().unwrap();
    assert_eq!(
        thresholds.keys().collect::<Vec<_>>(),
        ["big", "cat", "dog"],
        "{meta}"
    );
    assert!(thresholds
        .values()
        .all(|t| t.as_f64().is_some_and(|t| t > 0.0 && t <= 1.0)));
    assert!(
        meta["thresholds"]["dev_after"]["micro_f1"]
            .as_f64()
            .unwrap()
            >= meta["thresholds"]["dev_before"]["micro_f1"]
                .as_f64()
                .unwrap()
    );

    let rows = predict(&out, tmp.path(), "the big cat sat\nthe mat\n");
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert!(row["labels"].is_array(), "{row}");
        let probs = row["probs"].as_object().unwrap();
        assert_eq!(probs.len(), 3);
        assert!(probs
            .values()
            .all(|p| (0.0..=1.0).contains(&p.as_f64().unwrap())));
    }

    let (ok, stdout, err) = bertrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        valid.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in ["micro_f1", "macro_f1", "subset_accuracy", "loss"] {
        assert!(report[key].is_number(), "{key}: {report}");
    }
    assert_eq!(report["per_label"].as_object().unwrap().len(), 3);
    assert_eq!(report["thresholds"], meta["thresholds"]["values"]);
    let (ok, stdout, err) = bertrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        valid.to_str().unwrap(),
        "--report",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("micro avg"), "{stdout}");

    // The stored thresholds decide: 0 predicts every label, above 1 none.
    for (threshold, expected) in [(0.0, 3), (1.5, 0)] {
        for t in meta["thresholds"]["values"]
            .as_object_mut()
            .unwrap()
            .values_mut()
        {
            *t = threshold.into();
        }
        write_json(&meta_path, &meta);
        for row in predict(&out, tmp.path(), "the big cat sat\nthe mat\n") {
            assert_eq!(row["labels"].as_array().unwrap().len(), expected, "{row}");
        }
    }
}

#[test]
fn binary_threshold_is_tuned_stored_and_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, err) = tiny_run(tmp.path(), "out", &["--lr", "1e-3"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        summary["best"]["dev_with_thresholds"]["macro_f1"].is_number(),
        "{summary}"
    );
    let out = tmp.path().join("out");
    let meta_path = out.join("bertrt.json");
    let mut meta = read_json(&meta_path);
    assert_eq!(meta["format_version"], 2);
    let thresholds = &meta["thresholds"];
    assert_eq!(
        thresholds["values"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["dog"],
        "the second label is the positive class: {meta}"
    );
    for side in ["dev_before", "dev_after"] {
        assert!(thresholds[side]["macro_f1"].is_number(), "{meta}");
    }
    assert!(
        thresholds["dev_after"]["macro_f1"].as_f64()
            >= thresholds["dev_before"]["macro_f1"].as_f64()
    );

    // predict and eval apply the stored threshold.
    let texts = "the cat sat on the mat\nthe dog ran fast\n";
    for (threshold, label, accuracy) in [(0.0, "dog", 0.5), (1.5, "cat", 0.5)] {
        meta["thresholds"]["values"]["dog"] = threshold.into();
        write_json(&meta_path, &meta);
        for row in predict(&out, tmp.path(), texts) {
            assert_eq!(row["label"], label, "{row}");
        }
        let (ok, stdout, err) = bertrt(&[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--data",
            tmp.path().join("valid.jsonl").to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["threshold"], threshold, "{report}");
        assert_eq!(report["accuracy"], accuracy, "{report}");
    }

    let (ok, _, err) = tiny_run(tmp.path(), "untuned", &["--no-threshold-tuning"]);
    assert!(ok, "{err}");
    let meta = read_json(&tmp.path().join("untuned/bertrt.json"));
    assert!(meta.get("thresholds").is_none(), "{meta}");
    assert_eq!(meta["format_version"], 1);
    assert_eq!(meta["recipe"]["tune_thresholds"], false);
}

#[test]
fn focal_gamma_zero_is_cross_entropy_and_gamma_two_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "ce", &["--lr", "1e-3"]);
    assert!(ok, "{err}");
    let (ok, _, err) = tiny_run(tmp.path(), "zero", &["--lr", "1e-3", "--focal-gamma", "0"]);
    assert!(ok, "{err}");
    assert_eq!(weights("ce"), weights("zero"));
    let (ok, _, err) = tiny_run(
        tmp.path(),
        "focal",
        &[
            "--lr",
            "1e-3",
            "--focal-gamma",
            "2",
            "--class-weights",
            "balanced",
        ],
    );
    assert!(ok, "{err}");
    assert_ne!(weights("ce"), weights("focal"));
    let meta = read_json(&tmp.path().join("focal/bertrt.json"));
    assert_eq!(meta["recipe"]["focal_gamma"], 2.0);

    let (ok, _, err) = tiny_run(tmp.path(), "bad", &["--focal-gamma=-1"]);
    assert!(!ok && err.contains("focal_gamma must be >= 0"), "{err}");
    let (ok, _, err) = tiny_run(
        tmp.path(),
        "bad",
        &["--focal-gamma", "1", "--task", "multi-label"],
    );
    assert!(!ok && err.contains("classification only"), "{err}");
}

fn events<'a>(log: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    log.iter().filter(|l| l["event"] == kind).collect()
}

#[test]
fn gradual_unfreezing_follows_the_schedule_and_freezes_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, err) = tiny_run(
        tmp.path(),
        "out",
        &["--unfreeze-schedule", "head:1,top1:1,all:1", "--lr", "1e-3"],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("\"steps\": 9"), "{stdout}");
    let log = log_lines(&tmp.path().join("out"));
    // The starting point is evaluated before the first phase.
    assert_eq!(log[0]["step"], 0);
    assert!(log[0]["eval"].is_object(), "{}", log[0]);
    let starts = events(&log, "phase_start");
    let ends = events(&log, "phase_end");
    assert_eq!((starts.len(), ends.len()), (3, 3));
    let expected = [
        (0, "head", vec!["head"]),
        (3, "top1", vec!["layer.1", "head"]),
        (6, "all", vec!["embeddings", "layer.0", "layer.1", "head"]),
    ];
    for (i, (step, unfrozen, trainable)) in expected.iter().enumerate() {
        let (start, end) = (starts[i], ends[i]);
        assert_eq!(start["step"], *step);
        assert_eq!(start["unfrozen"], *unfrozen);
        assert_eq!(start["trainable"], serde_json::json!(trainable));
        assert_eq!(end["step"], *step + 3);
        for (group, checksum) in start["weights"].as_object().unwrap() {
            let same = end["weights"][group] == *checksum;
            if end["rolled_back"] == true || !trainable.contains(&group.as_str()) {
                assert!(same, "phase {}: {group} changed", i + 1);
            } else {
                assert!(!same, "phase {}: {group} did not train", i + 1);
            }
        }
    }
    // Each phase restarts warm-up and decay: the same learning rates.
    let lrs: Vec<f64> = log.iter().filter_map(|l| l["lr"].as_f64()).collect();
    assert_eq!(lrs.len(), 9);
    assert_eq!(lrs[0..3], lrs[3..6]);
    assert_eq!(lrs[0..3], lrs[6..9]);

    let (ok, _, err) = tiny_run(tmp.path(), "bad", &["--unfreeze-schedule", "head:1,top3:1"]);
    assert!(
        !ok && err.contains("top3") && err.contains("2 layers"),
        "{err}"
    );
    let (ok, _, err) = tiny_run(tmp.path(), "bad", &["--unfreeze-schedule", "head,all:1"]);
    assert!(
        !ok && err.contains("\"head\"") && err.contains("WHAT:EPOCHS"),
        "{err}"
    );
    let (ok, _, err) = tiny_run(
        tmp.path(),
        "bad",
        &["--unfreeze-schedule", "head:1", "--head-only"],
    );
    assert!(!ok && err.contains("drop head_only"), "{err}");
}

#[test]
fn a_phase_that_hurts_dev_is_rolled_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let train = tmp.path().join("train.jsonl");
    write_jsonl(&train, TINY_TRAIN);
    // Dev disagrees with training on every row, so learning hurts dev.
    let swapped: Vec<(&str, &str)> = TINY_TRAIN
        .iter()
        .map(|&(t, l)| (t, if l == "cat" { "dog" } else { "cat" }))
        .collect();
    let valid = tmp.path().join("valid.jsonl");
    write_jsonl(&valid, &swapped);
    let out = tmp.path().join("out");
    let (ok, stdout, err) = bertrt(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        valid.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-length",
        "16",
        "--batch-size",
        "2",
        "--unfreeze-schedule",
        "head:1,all:1",
        "--metric",
        "loss",
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let log = log_lines(&out);
    let rollbacks = events(&log, "rollback");
    assert_eq!(rollbacks.len(), 2, "{log:?}");
    for (i, rollback) in rollbacks.iter().enumerate() {
        assert_eq!(rollback["phase"], i + 1);
        assert!(
            rollback["dev_score_after"].as_f64() < rollback["dev_score_before"].as_f64(),
            "{rollback}"
        );
    }
    for (start, end) in events(&log, "phase_start")
        .iter()
        .zip(events(&log, "phase_end"))
    {
        assert_eq!(end["rolled_back"], true);
        assert_eq!(
            start["weights"], end["weights"],
            "weights not restored exactly"
        );
    }
    // Nothing beat the starting point, which is what was saved: the base
    // encoder, bit for bit, with the new head.
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["best"]["step"], 0, "{summary}");
    assert_eq!(
        moved(tmp.path(), "out"),
        ["classifier.bias", "classifier.weight"]
    );
}

/// Checkpointing changes what memory holds, not what is computed: the same
/// model bit for bit, with and without gradual unfreezing.
#[test]
fn grad_checkpointing_trains_the_same_model_and_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tiny_run(tmp.path(), "plain", &["--seed", "7"]);
    assert!(ok, "{err}");
    let (ok, _, err) = tiny_run(
        tmp.path(),
        "checkpointed",
        &["--seed", "7", "--grad-checkpointing"],
    );
    assert!(ok, "{err}");
    let weights = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(weights("plain"), weights("checkpointed"));
    let recipe = |d: &str| read_json(&tmp.path().join(d).join("bertrt.json"))["recipe"].clone();
    assert_eq!(recipe("plain")["grad_checkpointing"], false);
    assert_eq!(recipe("checkpointed")["grad_checkpointing"], true);

    // Gradual unfreezing moves the lowest trained layer between phases.
    let unfreeze = ["--unfreeze-schedule", "head:1,top1:1,all:1", "--lr", "1e-3"];
    let (ok, _, err) = tiny_run(tmp.path(), "plain-unfrozen", &unfreeze);
    assert!(ok, "{err}");
    let checkpointed = [&unfreeze[..], &["--grad-checkpointing"]].concat();
    let (ok, _, err) = tiny_run(tmp.path(), "checkpointed-unfrozen", &checkpointed);
    assert!(ok, "{err}");
    assert_eq!(weights("plain-unfrozen"), weights("checkpointed-unfrozen"));

    // Not quiet: the run says what checkpointing keeps.
    let dir = tmp.path();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (ok, _, err) = bertrt(&[
        "finetune",
        "--model",
        &path("tiny"),
        "--train",
        &path("train.jsonl"),
        "--valid",
        &path("valid.jsonl"),
        "--out",
        &path("logged"),
        "--epochs",
        "1",
        "--max-length",
        "16",
        "--grad-checkpointing",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("checkpointing: keeping each layer's input and one layer's activations"),
        "{err}"
    );
}
