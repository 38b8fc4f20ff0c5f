//! Gradient parity with PyTorch: `BertForSequenceClassification` on
//! all-MiniLM-L6-v2, pooler pooling, dropout off (`tests/fixtures/cls_grad.*`).

mod common;

use bertrt::backend::cpu::CpuBackend;
use bertrt::checkpoint::Checkpoint;
use bertrt::config::BertConfig;
use bertrt::model::{Pooling, TokenBatch};
use bertrt::tokenize::BertTokenizer;
use bertrt::train::classifier::{ForwardMode, SequenceClassifier, Targets};
use common::{max_abs_diff, Fixture};

fn l2(x: &[f32]) -> f64 {
    x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn loss_logits_and_gradients_match_pytorch() {
    let dir = common::minilm_dir();
    let fixture = Fixture::open("cls_grad.safetensors");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::fixture("cls_grad.json")).unwrap()).unwrap();
    let texts: Vec<&str> = json["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let labels: Vec<usize> = json["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as usize)
        .collect();

    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    let backend = CpuBackend::new(0);
    let mut model =
        SequenceClassifier::new(backend, config, &ckpt, Pooling::Pooler, 3, 0.1, 0).unwrap();
    model
        .params
        .set(
            &model.backend,
            "classifier.weight",
            &fixture.get("classifier.weight").1,
        )
        .unwrap();

    let tokenizer = BertTokenizer::from_dir(&dir, 512).unwrap();
    let encoded = tokenizer.encode_batch(&texts).unwrap();
    let batch = TokenBatch::from_encoded(&encoded);
    let logits = model
        .forward(&batch, ForwardMode { dropout_seed: None })
        .unwrap();
    let diff = max_abs_diff(&logits, &fixture.get("logits").1);
    assert!(diff <= 1e-4, "logits max abs diff {diff}");

    model.params.zero_grads(&model.backend);
    let loss = model.backward(
        &batch,
        Targets::Classes {
            labels: &labels,
            class_weights: None,
        },
        1.0,
    );
    let want_loss = json["loss"].as_f64().unwrap();
    assert!(
        (loss as f64 - want_loss).abs() <= 1e-5,
        "loss {loss} vs {want_loss}"
    );

    let mut checked = 0;
    for name in json["grad_norms"].as_object().unwrap().keys() {
        let key = format!("grad.{name}");
        let Some(want) = fixture.try_get(&key) else {
            continue;
        };
        let got = model
            .params
            .grad_of(&model.backend, name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let diff: Vec<f32> = got.iter().zip(want).map(|(a, b)| a - b).collect();
        // The key bias's gradient is zero in exact arithmetic (softmax is
        // shift-invariant); its stored norm, 1e-10, is rounding noise, so norms are floored at 1e-4.
        let relative = l2(&diff) / l2(want).max(1e-4);
        assert!(relative <= 1e-4, "{name}: relative error {relative:e}");
        checked += 1;
    }
    assert_eq!(checked, 24, "every stored gradient compared");

    // Every parameter's gradient norm, and the global norm.
    for (name, want) in json["grad_norms"].as_object().unwrap() {
        let got = l2(&model.params.grad_of(&model.backend, name).unwrap());
        let want = want.as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want.max(1e-3),
            "{name}: norm {got} vs {want}"
        );
    }
    let global = model.params.grad_norm(&model.backend);
    let want = json["global_grad_norm"].as_f64().unwrap();
    assert!(
        (global - want).abs() / want <= 1e-4,
        "global grad norm {global} vs {want}"
    );
}
