//! Gradient parity with PyTorch: `BertForSequenceClassification` on
//! all-MiniLM-L6-v2, pooler pooling, dropout off (`tests/fixtures/cls_grad.*`).

mod common;

use bertrt::backend::cpu::CpuBackend;
use bertrt::backend::Precision;
use bertrt::checkpoint::Checkpoint;
use bertrt::config::BertConfig;
use bertrt::model::{Pooling, TokenBatch};
use bertrt::tokenize::BertTokenizer;
use bertrt::train::classifier::{ForwardMode, SequenceClassifier, Targets};
use common::{max_abs_diff, Fixture};

fn l2(x: &[f32]) -> f64 {
    x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
}

/// The fixture's batch through a classifier on `backend`, with the
/// fixture's head: logits, loss, and the model (gradients accumulated).
fn run_fixture(
    backend: CpuBackend,
) -> (
    Vec<f32>,
    f32,
    SequenceClassifier<CpuBackend>,
    serde_json::Value,
    Fixture,
) {
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
    model.params.zero_grads(&model.backend);
    let loss = model.backward(
        &batch,
        Targets::Classes {
            labels: &labels,
            class_weights: None,
        },
        1.0,
    );
    (logits, loss, model, json, fixture)
}

#[test]
fn loss_logits_and_gradients_match_pytorch() {
    let (logits, loss, model, json, fixture) = run_fixture(CpuBackend::new(0));
    let diff = max_abs_diff(&logits, &fixture.get("logits").1);
    assert!(diff <= 1e-4, "logits max abs diff {diff}");
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

/// bf16 matmuls (linear layers and attention's products; f32 sums, f32
/// everything else) against PyTorch's fp32 numbers: what bf16 rounding
/// costs, bounded. Measured here: logits 3.7e-4 abs, loss 8.3e-5 rel, worst
/// gradient 1.1e-2 rel (layer 0 query weight), global norm 2.2e-4 rel, the
/// key bias (zero in exact arithmetic) 6.3e-6 abs; the bounds are about
/// five times that, so a broken kernel (wrong pairs, a lost K tail) fails
/// them by orders of magnitude.
#[test]
fn bf16_matmuls_stay_close_to_pytorch_fp32() {
    let backend = CpuBackend::new(0).with_precision(Precision::Bf16);
    let (logits, loss, model, json, fixture) = run_fixture(backend);
    let diff = max_abs_diff(&logits, &fixture.get("logits").1);
    let want_loss = json["loss"].as_f64().unwrap();
    let loss_err = (loss as f64 - want_loss).abs() / want_loss;
    let mut worst: (f64, String) = (0.0, String::new());
    for name in json["grad_norms"].as_object().unwrap().keys() {
        let Some(want) = fixture.try_get(&format!("grad.{name}")) else {
            continue;
        };
        let got = model.params.grad_of(&model.backend, name).unwrap();
        let diff: Vec<f32> = got.iter().zip(want).map(|(a, b)| a - b).collect();
        // As above: norms floored where the exact gradient is zero.
        if name.ends_with("attention.self.key.bias") {
            // Zero in exact arithmetic: rows of d_s sum to zero, so d_k's
            // column sums cancel — but not once d_s is rounded to bf16 as
            // an operand of d_k = d_sᵀ·q (as under autocast), so what is
            // left is that rounding: bounded in absolute terms.
            let abs = l2(&diff);
            assert!(abs <= 3e-5, "{name}: absolute error {abs}");
            continue;
        }
        let relative = l2(&diff) / l2(want).max(1e-4);
        if relative > worst.0 {
            worst = (relative, name.clone());
        }
    }
    let global = model.params.grad_norm(&model.backend);
    let global_err = (global - json["global_grad_norm"].as_f64().unwrap()).abs() / global;
    eprintln!(
        "bf16 vs PyTorch fp32: logits max abs {diff:.2e}, loss rel {loss_err:.2e}, \
         worst gradient rel {:.2e} ({}), global norm rel {global_err:.2e}",
        worst.0, worst.1
    );
    assert!(diff <= 2e-3, "logits max abs diff {diff}");
    assert!(loss_err <= 5e-4, "loss relative error {loss_err}");
    assert!(worst.0 <= 5e-2, "{}: relative error {}", worst.1, worst.0);
    assert!(
        global_err <= 2e-2,
        "global norm relative error {global_err}"
    );
}
