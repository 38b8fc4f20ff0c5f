//! Classification metrics against hand-computed scikit-learn values, and
//! temperature scaling / calibration error on synthetic logits.

use bertrt::classify::{Decision, Prediction};
use bertrt::eval::calibration::{
    expected_calibration_error, fit_temperature, nll, softmax_with_temperature, TEMPERATURE_RANGE,
};
use bertrt::eval::thresholds::{self, Counts};
use bertrt::eval::{ClassificationReport, MultiLabelReport};
use bertrt::rng::Rng;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

fn labels(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Five classes: `a`, `b` ordinary; `c` in gold but never predicted; `d`
/// predicted but absent from gold; `e` neither.
fn five_class_report() -> ClassificationReport {
    let gold = [0, 0, 0, 0, 1, 1, 1, 2, 2];
    let pred = [0, 0, 1, 3, 1, 1, 0, 0, 1];
    ClassificationReport::compute(&labels(&["a", "b", "c", "d", "e"]), &gold, &pred)
}

#[test]
fn matches_sklearn_on_a_hand_computed_example() {
    // sklearn.metrics.classification_report(gold, pred, labels=range(5),
    // zero_division=0), worked out by hand.
    let r = five_class_report();
    assert_eq!(r.n, 9);
    assert!(close(r.accuracy, 4.0 / 9.0));
    let expected = [
        // precision, recall, f1, support
        (0.5, 0.5, 0.5, 4),
        (0.5, 2.0 / 3.0, 4.0 / 7.0, 3),
        (0.0, 0.0, 0.0, 2), // never predicted: precision 0, not NaN
        (0.0, 0.0, 0.0, 0), // absent from gold: recall 0
        (0.0, 0.0, 0.0, 0),
    ];
    for (m, (p, rc, f1, support)) in r.per_class.iter().zip(expected) {
        assert!(
            close(m.precision, p),
            "{} precision {}",
            m.label,
            m.precision
        );
        assert!(close(m.recall, rc), "{} recall {}", m.label, m.recall);
        assert!(close(m.f1, f1), "{} f1 {}", m.label, m.f1);
        assert_eq!(m.support, support, "{} support", m.label);
    }
    // Macro over all five labels, absent ones included.
    assert!(close(r.macro_f1, (0.5 + 4.0 / 7.0) / 5.0), "{}", r.macro_f1);
    assert!(close(r.weighted_f1, 26.0 / 63.0), "{}", r.weighted_f1);
    assert_eq!(
        r.confusion,
        [
            vec![2, 1, 0, 1, 0],
            vec![1, 2, 0, 0, 0],
            vec![1, 1, 0, 0, 0],
            vec![0; 5],
            vec![0; 5],
        ]
    );
}

#[test]
fn binary_example() {
    // gold: 6 ham, 4 spam; 1 ham flagged, 1 spam missed.
    let gold = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1];
    let pred = [0, 0, 0, 0, 0, 1, 1, 1, 1, 0];
    let r = ClassificationReport::compute(&labels(&["ham", "spam"]), &gold, &pred);
    assert!(close(r.accuracy, 0.8));
    let spam = &r.per_class[1];
    assert!(close(spam.precision, 0.75) && close(spam.recall, 0.75) && close(spam.f1, 0.75));
    let ham = &r.per_class[0];
    assert!(close(ham.precision, 5.0 / 6.0) && close(ham.recall, 5.0 / 6.0));
    assert!(close(r.macro_f1, (5.0 / 6.0 + 0.75) / 2.0));
    assert!(close(r.weighted_f1, (5.0 / 6.0 * 6.0 + 0.75 * 4.0) / 10.0));
}

#[test]
fn perfect_and_empty_predictions() {
    let names = labels(&["x", "y"]);
    let r = ClassificationReport::compute(&names, &[0, 1, 1], &[0, 1, 1]);
    assert_eq!((r.accuracy, r.macro_f1, r.weighted_f1), (1.0, 1.0, 1.0));
    let empty = ClassificationReport::compute(&names, &[], &[]);
    assert_eq!(
        (empty.n, empty.accuracy, empty.macro_f1, empty.weighted_f1),
        (0, 0.0, 0.0, 0.0)
    );
}

#[test]
fn json_has_the_documented_shape() {
    let j = five_class_report().to_json();
    assert_eq!(j["n"], 9);
    assert!(close(j["accuracy"].as_f64().unwrap(), 4.0 / 9.0));
    assert!(j["macro_f1"].is_f64() && j["weighted_f1"].is_f64());
    assert_eq!(j["per_class"]["b"]["support"], 3);
    assert!(close(
        j["per_class"]["b"]["f1"].as_f64().unwrap(),
        4.0 / 7.0
    ));
    assert_eq!(j["per_class"]["c"]["precision"], 0.0);
    assert_eq!(
        j["confusion_matrix"]["labels"],
        serde_json::json!(["a", "b", "c", "d", "e"])
    );
    assert_eq!(
        j["confusion_matrix"]["matrix"][0],
        serde_json::json!([2, 1, 0, 1, 0])
    );
}

#[test]
fn table_is_aligned_and_complete() {
    let gold = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1];
    let pred = [0, 0, 0, 0, 0, 1, 1, 1, 1, 0];
    let r = ClassificationReport::compute(&labels(&["ham", "spam"]), &gold, &pred);
    let table = r.to_table();
    println!("{table}");
    for needle in [
        "precision",
        "recall",
        "f1-score",
        "support",
        "accuracy",
        "macro avg",
        "weighted avg",
        "confusion matrix",
    ] {
        assert!(table.contains(needle), "missing {needle:?} in\n{table}");
    }
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{table}"))
            .to_string()
    };
    assert_eq!(
        row("spam").split_whitespace().collect::<Vec<_>>(),
        ["spam", "0.7500", "0.7500", "0.7500", "4"]
    );
    assert_eq!(
        row("accuracy").split_whitespace().collect::<Vec<_>>(),
        ["accuracy", "0.8000", "10"]
    );
    assert_eq!(
        row("ham").len(),
        row("weighted avg").len(),
        "columns line up"
    );
    assert_eq!(row("accuracy").len(), row("macro avg").len());
    // Confusion rows: gold ham -> 5 ham, 1 spam.
    let confusion: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("confusion"))
        .collect();
    assert_eq!(
        confusion[2].split_whitespace().collect::<Vec<_>>(),
        ["ham", "5", "1"]
    );
    assert_eq!(
        confusion[3].split_whitespace().collect::<Vec<_>>(),
        ["spam", "1", "3"]
    );
}

#[test]
fn softmax_is_stable_and_normalised() {
    let probs = softmax_with_temperature(&[1000.0, 0.0, -1000.0, 1.0, 2.0, 3.0], 3, 1.0);
    assert!(probs.iter().all(|p| p.is_finite()));
    assert!((probs[0] - 1.0).abs() < 1e-7 && probs[1] == 0.0);
    for row in probs.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    // A high temperature flattens, a low one sharpens; argmax is unchanged.
    let hot = softmax_with_temperature(&[1.0, 2.0, 3.0], 3, 100.0);
    let cold = softmax_with_temperature(&[1.0, 2.0, 3.0], 3, 0.1);
    assert!(hot[2] < 0.35 && hot[2] > hot[1]);
    assert!(cold[2] > 0.9999);
}

#[test]
fn nll_of_uniform_logits_is_log_k() {
    let logits = [0.0f32; 12];
    assert!((nll(&logits, 4, &[0, 1, 3], 1.0) - 4f64.ln()).abs() < 1e-12);
    let confident = nll(&[50.0, -50.0], 2, &[0], 1.0);
    assert!((0.0..1e-12).contains(&confident));
    let wrong = nll(&[500.0, -500.0], 2, &[1], 1.0);
    assert!((wrong - 1000.0).abs() < 1e-9, "no overflow: {wrong}");
}

/// Logits with spread 3, and labels drawn from `softmax(logits / t)`.
fn synthetic(n: usize, k: usize, t: f32, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let logits: Vec<f32> = (0..n * k).map(|_| 3.0 * rng.normal()).collect();
    let probs = softmax_with_temperature(&logits, k, t);
    let gold = probs
        .chunks(k)
        .map(|row| {
            let u = rng.next_f32();
            let mut cumulative = 0.0;
            row.iter()
                .position(|&p| {
                    cumulative += p;
                    u < cumulative
                })
                .unwrap_or(k - 1)
        })
        .collect();
    (logits, gold)
}

#[test]
fn temperature_fit_recovers_the_true_temperature() {
    let (logits, gold) = synthetic(20_000, 4, 2.0, 11);
    let t = fit_temperature(&logits, 4, &gold);
    assert!((t - 2.0).abs() < 0.1, "fitted {t}");
    assert!(nll(&logits, 4, &gold, t) < nll(&logits, 4, &gold, 1.0));
    assert_eq!(t, fit_temperature(&logits, 4, &gold), "deterministic");

    let (logits, gold) = synthetic(20_000, 3, 0.5, 12);
    let t = fit_temperature(&logits, 3, &gold);
    assert!((t - 0.5).abs() < 0.03, "fitted {t}");
}

#[test]
fn temperature_fit_edge_cases() {
    assert_eq!(fit_temperature(&[], 3, &[]), 1.0);
    assert_eq!(fit_temperature(&[f32::NAN, 0.0], 2, &[0]), 1.0);
    // Perfectly separated: NLL keeps falling as T -> 0; the range bounds it.
    let t = fit_temperature(&[5.0, -5.0, -5.0, 5.0], 2, &[0, 1]);
    assert!((t - TEMPERATURE_RANGE.0).abs() < 1e-3, "fitted {t}");
    // Uninformative logits that are always wrong: as flat as allowed.
    let t = fit_temperature(&[5.0, -5.0, -5.0, 5.0], 2, &[1, 0]);
    assert!((t - TEMPERATURE_RANGE.1).abs() < 1e-2, "fitted {t}");
}

#[test]
fn ece_is_zero_when_calibrated_and_large_when_overconfident() {
    // Ten predictions at confidence 0.7, seven right.
    let probs: Vec<f32> = (0..10).flat_map(|_| [0.7, 0.3]).collect();
    let gold = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1];
    assert!(expected_calibration_error(&probs, 2, &gold, 15) < 1e-6);
    // Same hits at confidence 0.99.
    let probs: Vec<f32> = (0..10).flat_map(|_| [0.99, 0.01]).collect();
    let ece = expected_calibration_error(&probs, 2, &gold, 15);
    assert!((ece - 0.29).abs() < 1e-6, "{ece}");
    // Two bins weighted by their share: |0.5 - 0.9| * 0.5 + |1 - 0.6| * 0.5.
    let probs = [0.9, 0.1, 0.9, 0.1, 0.6, 0.4, 0.6, 0.4];
    let ece = expected_calibration_error(&probs, 2, &[0, 1, 0, 0], 10);
    assert!((ece - 0.4).abs() < 1e-6, "{ece}");
    assert_eq!(expected_calibration_error(&[], 2, &[], 15), 0.0);
}

#[test]
fn temperature_scaling_lowers_ece_of_an_overconfident_model() {
    let (logits, gold) = synthetic(20_000, 4, 2.0, 13);
    let raw = expected_calibration_error(&softmax_with_temperature(&logits, 4, 1.0), 4, &gold, 15);
    let t = fit_temperature(&logits, 4, &gold);
    let scaled = expected_calibration_error(&softmax_with_temperature(&logits, 4, t), 4, &gold, 15);
    assert!(raw > 0.05, "T = 1 is overconfident here: ECE {raw}");
    assert!(scaled < 0.02, "ECE after scaling {scaled} (T = {t})");
}

#[test]
fn multi_label_report_matches_sklearn_by_hand() {
    // Rows are examples, columns labels a, b, c.
    let gold = [
        true, false, true, //
        false, true, false, //
        true, true, false, //
        false, false, false,
    ];
    let predicted = [
        true, false, false, //
        false, true, true, //
        true, false, false, //
        false, false, false,
    ];
    let r = MultiLabelReport::compute(&labels(&["a", "b", "c"]), &gold, &predicted);
    // f1_score(gold, pred, average="micro"): tp 3, fp 1, fn 2.
    assert!(close(r.micro_precision, 0.75));
    assert!(close(r.micro_recall, 0.6));
    assert!(close(r.micro_f1, 2.0 / 3.0));
    // average="macro": (1 + 2/3 + 0) / 3.
    assert!(close(r.macro_f1, 5.0 / 9.0), "{}", r.macro_f1);
    assert!(close(r.subset_accuracy, 0.25));
    let scores: Vec<(f64, f64, f64, usize)> = r
        .per_label
        .iter()
        .map(|m| (m.precision, m.recall, m.f1, m.support))
        .collect();
    assert_eq!(
        scores,
        [
            (1.0, 1.0, 1.0, 2),
            (1.0, 0.5, 2.0 / 3.0, 2),
            (0.0, 0.0, 0.0, 1)
        ]
    );
    let j = r.to_json();
    assert_eq!(j["per_label"]["b"]["support"], 2);
    assert!(r.to_table().contains("micro avg"));
}

#[test]
fn threshold_tuning_finds_the_f1_maximum_and_keeps_the_default_on_ties() {
    let probs = [0.9, 0.8, 0.45, 0.4, 0.3, 0.2];
    let positive = [true, true, true, false, true, false];
    let tuned = thresholds::tune(&probs, &positive, Counts::f1);
    // At 0.5: tp 2, fn 2 -> 2/3. Between 0.3 and 0.2: tp 4, fp 1 -> 8/9.
    assert!(close(tuned.before, 2.0 / 3.0));
    assert!(close(tuned.after, 8.0 / 9.0));
    assert!((tuned.threshold - 0.25).abs() < 1e-6, "{tuned:?}");
    assert_eq!(
        Counts::at(&probs, &positive, tuned.threshold),
        Counts {
            true_positives: 4,
            false_positives: 1,
            false_negatives: 0,
            true_negatives: 1
        }
    );

    // Already perfect at 0.5, and no positives at all: 0.5 stays.
    for (probs, positive) in [
        (vec![0.9, 0.7, 0.3, 0.1], vec![true, true, false, false]),
        (vec![0.9, 0.1], vec![false, false]),
    ] {
        let tuned = thresholds::tune(&probs, &positive, Counts::f1);
        assert_eq!(tuned.threshold, thresholds::DEFAULT_THRESHOLD);
        assert_eq!(tuned.before, tuned.after);
    }
}

#[test]
fn decisions_apply_the_stored_thresholds() {
    let logits = [0.0f32, 1.0, 2.0, -2.0]; // two examples, two outputs
    let binary = Decision::PositiveThreshold {
        positive: 1,
        threshold: 0.8,
    };
    // p(second) = 0.73 and 0.018: below 0.8 both, so the first class.
    let labels: Vec<usize> = binary
        .apply(&logits, 2, 1.0)
        .iter()
        .map(|p| match p {
            Prediction::Class { label, .. } => *label,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(labels, [0, 0]);
    assert_eq!(
        Decision::Argmax.apply(&logits, 2, 1.0)[0],
        Prediction::Class {
            label: 1,
            probs: softmax_with_temperature(&logits[..2], 2, 1.0)
        }
    );
    let multi = Decision::MultiLabel {
        thresholds: vec![0.4, 0.9],
    };
    // sigmoid: 0.5, 0.73 | 0.88, 0.12.
    let sets: Vec<Vec<usize>> = multi
        .apply(&logits, 2, 1.0)
        .into_iter()
        .map(|p| match p {
            Prediction::Labels { labels, .. } => labels,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sets, [vec![0], vec![0]]);
}
