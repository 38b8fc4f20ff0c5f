//! INT8 inference end to end on all-MiniLM-L6-v2: accuracy against f32 on
//! the fixture sentences, the accuracy guard of `bertrt quantize`, INT8
//! artifacts (round trip, corrupt tensors) and a classifier's label
//! agreement on a tiny model.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bertrt::backend::cpu::isa::Isa;
use bertrt::backend::cpu::CpuBackend;
use bertrt::backend::Precision;
use bertrt::embed::Embedder;
use bertrt::model::{BertModel, F32Linears, LinearLoader, ModelFiles, Pooling};
use bertrt::quant::{self, Int8Linears, Quantization, QuantizeOptions, Sample, BUILTIN_SOURCE};
use common::cosine;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn fixture_texts() -> Vec<String> {
    common::fixture_sentences()
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect()
}

fn embedder(dir: &Path, linears: &dyn LinearLoader<CpuBackend>) -> Embedder<CpuBackend> {
    Embedder::load_with(
        CpuBackend::new(0),
        dir,
        None,
        Some(Pooling::Mean),
        false,
        linears,
    )
    .unwrap()
}

/// Mean-pooled embeddings of `texts`, each alone (as the fixtures were made).
fn embed_each(embedder: &mut Embedder<CpuBackend>, texts: &[String]) -> Vec<Vec<f32>> {
    texts
        .iter()
        .map(|t| embedder.embed(&[t.as_str()]).unwrap().remove(0))
        .collect()
}

/// The `--int8` quantization of MiniLM (built-in calibration sentences).
fn minilm_int8() -> &'static (Int8Linears, Quantization) {
    static CELL: OnceLock<(Int8Linears, Quantization)> = OnceLock::new();
    CELL.get_or_init(|| {
        let (linears, q) = Int8Linears::for_model(&common::minilm_dir(), true).unwrap();
        (linears, q.expect("an f32 model is calibrated"))
    })
}

#[test]
fn int8_minilm_matches_f32_on_every_fixture_sentence() {
    let dir = common::minilm_dir();
    let (linears, quantization) = minilm_int8();
    println!("{}", quantization.report());
    assert!(quantization.passes());
    // Per-linear SmoothQuant strength keeps every linear INT8 on MiniLM.
    assert_eq!(quantization.int8_layers(), 24, "{}", quantization.report());
    let texts = fixture_texts();
    let f32 = embed_each(&mut embedder(&dir, &F32Linears), &texts);
    let int8 = embed_each(&mut embedder(&dir, linears), &texts);
    for (i, (a, b)) in int8.iter().zip(&f32).enumerate() {
        let c = cosine(a, b);
        println!("fixture sentence {i}: cosine {c:.5}");
        assert!(c >= 0.995, "sentence {i} ({:?}): cosine {c}", texts[i]);
    }
}

/// MiniLM's INT8 artifact, written once for the tests that read it.
fn minilm_artifact() -> &'static Path {
    static CELL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = CELL.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("minilm-int8");
        let (_, quantization) = minilm_int8();
        quant::write_int8_artifact(&common::minilm_dir(), &out, quantization, false).unwrap();
        (tmp, out)
    });
    path
}

/// INT8 models, quantized on load or stored, run attention's products in
/// bf16 where the host multiplies bf16 natively (`quant::int8_attention`);
/// f32 models, and INT8 artifacts read dequantized, keep f32.
#[test]
fn int8_models_run_attention_in_bf16_where_native() {
    let attention = |dir: &Path, linears: &dyn LinearLoader<CpuBackend>| {
        let files = ModelFiles::locate(dir).unwrap();
        let model = BertModel::load_with(CpuBackend::new(1), &files, linears).unwrap();
        model.backend().precision()
    };
    let minilm = common::minilm_dir();
    let native = quant::int8_attention(Isa::detect());
    assert_eq!(attention(&minilm, &minilm_int8().0), native);
    assert_eq!(attention(minilm_artifact(), &Int8Linears::stored()), native);
    assert_eq!(attention(&minilm, &Int8Linears::stored()), Precision::Fp32);
    assert_eq!(attention(minilm_artifact(), &F32Linears), Precision::Fp32);
    // Emulated bf16 would be slower than f32.
    assert_eq!(quant::int8_attention(Isa::Avx2Fma), Precision::Fp32);
    assert_eq!(
        native == Precision::Bf16,
        bertrt::backend::cpu::gemm::bf16_native(Isa::detect())
    );
}

#[test]
fn int8_artifact_round_trips() {
    let out = minilm_artifact();
    let (linears, quantization) = minilm_int8();
    let texts = fixture_texts();
    let on_load = embed_each(&mut embedder(&common::minilm_dir(), linears), &texts);
    let stored = embed_each(&mut embedder(out, &Int8Linears::stored()), &texts);
    // The artifact holds exactly the weights quantization on load makes.
    assert_eq!(stored, on_load);

    // Backends without INT8 kernels read the weights dequantized.
    let f32 = embed_each(&mut embedder(&common::minilm_dir(), &F32Linears), &texts);
    let dequantized = embed_each(&mut embedder(out, &F32Linears), &texts);
    for (i, (a, b)) in dequantized.iter().zip(&f32).enumerate() {
        assert!(
            cosine(a, b) >= 0.995,
            "sentence {i}: cosine {}",
            cosine(a, b)
        );
    }

    let record = bertrt::artifact::QuantizationRecord::read(out)
        .unwrap()
        .expect("bertrt.json records the quantization");
    assert_eq!(record.int8_layers.len(), quantization.int8_layers());
    assert_eq!(record.int8_layers.len() + record.f32_layers.len(), 24);
    assert!(record.passed);
    assert_eq!(record.calibration_source, BUILTIN_SOURCE);
    assert_eq!(record.worst_cosine, quantization.worst_cosine);
    assert_eq!(record.layer_errors.len(), 24);
    for file in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "1_Pooling/config.json",
    ] {
        assert!(out.join(file).exists(), "{file} not copied");
    }
    let size = |dir: &Path| {
        std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(size(out) < size(&common::minilm_dir()) * 3 / 4);

    // Quantizing twice is refused rather than compounding the error.
    let err = quant::quantize(out, &Sample::builtin(), &QuantizeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("already INT8"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of the artifact with `edit` applied to its tensors
/// (name, dtype, shape, bytes); returns the load error.
fn load_error_after(edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("edited");
    copy_dir(minilm_artifact(), &dir);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let err = Embedder::load_with(
        CpuBackend::new(1),
        &dir,
        None,
        None,
        false,
        &Int8Linears::stored(),
    )
    .err()
    .expect("a corrupt INT8 tensor must not load");
    let message = err.to_string();
    assert!(
        message.contains("model.safetensors"),
        "names the file: {message}"
    );
    message
}

#[test]
fn corrupt_int8_tensors_are_clear_errors() {
    let (_, quantization) = minilm_int8();
    let layer = quantization
        .plan
        .keys()
        .find(|l| l.ends_with("intermediate.dense"))
        .unwrap()
        .clone();
    let scale = format!("{layer}.weight_scale");
    let weight = format!("{layer}.weight_int8");

    let message = load_error_after(|t| {
        let entry = t.iter_mut().find(|e| e.0 == scale).unwrap();
        entry.2 = vec![5];
        entry.3.truncate(20);
    });
    assert!(
        message.contains(&scale) && message.contains("[5]"),
        "{message}"
    );

    let message = load_error_after(|t| {
        let entry = t.iter_mut().find(|e| e.0 == weight).unwrap();
        entry.3[7] = 0x80;
    });
    assert!(
        message.contains(&weight) && message.contains("-128"),
        "{message}"
    );

    let message = load_error_after(|t| t.retain(|e| e.0 != scale));
    assert!(
        message.contains(&scale) && message.contains("missing"),
        "{message}"
    );

    let message = load_error_after(|t| {
        let entry = t.iter_mut().find(|e| e.0 == weight).unwrap();
        entry.1 = Dtype::U8;
    });
    assert!(
        message.contains(&weight) && message.contains("U8"),
        "{message}"
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

#[test]
fn quantize_refuses_below_the_bar_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plain-w8a8");
    let model = common::minilm_dir();
    // Plain W8A8 on every linear: no smoothing, nothing kept f32.
    let args = [
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--alpha",
        "0",
        "--max-f32-layers",
        "0",
    ];
    let (ok, stdout, stderr) = bertrt(&args);
    assert!(!ok, "must refuse: {stdout}");
    assert!(
        stderr.contains("misses the accuracy bar") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(
        stdout.contains("worst") && stdout.contains("encoder.layer.5.output.dense"),
        "{stdout}"
    );
    assert!(!out.exists());

    let (ok, stdout, stderr) = bertrt(&[&args[..], &["--force"]].concat());
    assert!(ok, "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(stdout.contains("24 of 24 linears INT8"), "{stdout}");
    let record = bertrt::artifact::QuantizationRecord::read(&out)
        .unwrap()
        .unwrap();
    assert!(!record.passed && record.worst_cosine < 0.995);
    assert_eq!(record.smoothing_alpha, Some(0.0));

    // The INT8 model serves embed like any model.
    let input = tmp.path().join("texts.txt");
    std::fs::write(&input, "INT8 on the CPU\n").unwrap();
    let (ok, stdout, stderr) = bertrt(&[
        "embed",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["embedding"].as_array().unwrap().len(), 384);

    // --int8 quantizes an f32 model on load and says how it measured.
    let (ok, stdout, stderr) = bertrt(&[
        "embed",
        "--int8",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("int8: 24 of 24 linears INT8"), "{stderr}");
    assert_eq!(stdout.lines().count(), 1);
}

/// A tiny classifier (random weights): label agreement is measured, the
/// artifact loads as a classifier and predicts as quantization on load does.
#[test]
fn classifier_label_agreement_and_artifact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-classifier");
    let mut config = common::tiny_config();
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = serde_json::json!({"0": "neg", "1": "pos"});
    config["label2id"] = serde_json::json!({"neg": 0, "pos": 1});
    let mut tensors = common::tiny_tensors(3);
    let mut rng = common::Rng::new(11);
    tensors.push(("classifier.weight".into(), vec![2, 16], rng.vec(32, 0.5)));
    tensors.push(("classifier.bias".into(), vec![2], rng.vec(2, 0.1)));
    common::write_tiny_model(
        &dir,
        &config,
        &common::safetensors_bytes(&tensors, Dtype::F32),
    );

    let texts: Vec<String> = [
        "the cat sat on the mat",
        "a big dog ran fast",
        "small cats",
        "",
    ]
    .iter()
    .cycle()
    .take(40)
    .enumerate()
    .map(|(i, t)| format!("{t} {}", common::TINY_VOCAB[5 + i % 15]))
    .collect();
    let options = QuantizeOptions {
        min_cosine: 0.0,
        ..QuantizeOptions::default()
    };
    let quantization =
        quant::quantize(&dir, &Sample::from_texts("tiny", texts.clone()), &options).unwrap();
    println!("{}", quantization.report());
    let agreement = quantization
        .label_agreement
        .expect("a classifier is judged on labels");
    assert!((0.0..=1.0).contains(&agreement));

    let out = tmp.path().join("tiny-int8");
    quant::write_int8_artifact(&dir, &out, &quantization, true).unwrap();
    let inputs: Vec<bertrt::classify::Input> = texts
        .iter()
        .map(|text| bertrt::classify::Input { text, pair: None })
        .collect();
    let probabilities = |dir: &Path, linears: &Int8Linears| {
        bertrt::classify::Classifier::load_with(CpuBackend::new(1), dir, linears)
            .unwrap()
            .probabilities(&inputs)
            .unwrap()
    };
    assert_eq!(
        probabilities(&out, &Int8Linears::stored()),
        probabilities(&dir, &Int8Linears::with_plan(quantization.plan.clone()))
    );
    let record = bertrt::artifact::QuantizationRecord::read(&out)
        .unwrap()
        .unwrap();
    assert_eq!(record.label_agreement, Some(agreement));

    // predict runs the INT8 artifact; eval --int8 quantizes the f32 one.
    let input = tmp.path().join("texts.txt");
    std::fs::write(&input, "the cat sat\na big dog\n").unwrap();
    let (ok, stdout, stderr) = bertrt(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let data = tmp.path().join("dev.csv");
    std::fs::write(
        &data,
        "text,label\nthe cat sat,neg\na big dog ran,pos\nsmall cats,neg\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = bertrt(&[
        "eval",
        "--int8",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("label agreement"), "{stderr}");
    assert!(stdout.contains("accuracy"), "{stdout}");

    // info counts each int8 weight as the f32 one it replaces (scales and
    // smoothing factors are not parameters) and shows the dtype mix.
    let info = |dir: &Path| {
        let (ok, stdout, stderr) = bertrt(&["info", "--model", dir.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        stdout
    };
    let field = |text: &str, name: &str| -> String {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..].trim().to_owned()
    };
    let (f32_info, int8_info) = (info(&dir), info(&out));
    assert_eq!(
        field(&int8_info, "parameters:"),
        field(&f32_info, "parameters:")
    );
    assert_eq!(field(&f32_info, "dtype:"), "F32");
    let mix = field(&int8_info, "dtype:");
    assert!(
        mix.starts_with("I8 ") && mix.contains("%, F32 "),
        "{int8_info}"
    );

    // An INT8 model is not a starting point for fine-tuning.
    let (ok, _, stderr) = bertrt(&[
        "finetune",
        "--model",
        out.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "--valid",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("from-int8").to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains(out.to_str().unwrap())
            && stderr.contains("INT8")
            && stderr.contains("fine-tune the fp32 model"),
        "{stderr}"
    );
}

/// A tiny token classifier (random weights): quantize judges it on tag
/// agreement, not on the encoder's cosine alone.
#[test]
fn token_classifier_tag_agreement() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-tagger");
    let mut config = common::tiny_config();
    config["architectures"] = serde_json::json!(["BertForTokenClassification"]);
    config["id2label"] = serde_json::json!({"0": "O", "1": "B-ANIMAL", "2": "I-ANIMAL"});
    config["label2id"] = serde_json::json!({"O": 0, "B-ANIMAL": 1, "I-ANIMAL": 2});
    let mut tensors = common::tiny_tensors(5);
    let mut rng = common::Rng::new(12);
    tensors.push(("classifier.weight".into(), vec![3, 16], rng.vec(48, 0.5)));
    tensors.push(("classifier.bias".into(), vec![3], rng.vec(3, 0.1)));
    common::write_tiny_model(
        &dir,
        &config,
        &common::safetensors_bytes(&tensors, Dtype::F32),
    );
    let word = |i: usize| common::TINY_VOCAB[5 + i % 12];
    let texts: Vec<String> = (0..30)
        .map(|i| format!("the cat sat {} {}", word(i), word(i * 7)))
        .collect();
    let options = QuantizeOptions {
        min_cosine: 0.0,
        ..QuantizeOptions::default()
    };
    let sample = Sample::from_texts("tiny", texts);
    let quantization = quant::quantize(&dir, &sample, &options).unwrap();
    let agreement = quantization
        .label_agreement
        .expect("a token classifier is judged on its tags");
    assert!((0.0..=1.0).contains(&agreement));

    // Below the bar (here: any disagreement at all) it is refused.
    let strict = QuantizeOptions {
        min_cosine: 0.0,
        min_label_agreement: 1.0,
        max_f32_layers: Some(0),
        ..QuantizeOptions::default()
    };
    let strict = quant::quantize(&dir, &sample, &strict).unwrap();
    assert_eq!(
        strict.passes(),
        strict.label_agreement == Some(1.0),
        "the tag agreement decides"
    );
}
