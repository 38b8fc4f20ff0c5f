//! Accuracy, precision, recall and F1 with scikit-learn's definitions, so
//! numbers can be compared with a Python baseline.

use serde_json::{json, Map, Value};

/// One class's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold examples of this class.
    pub support: usize,
}

/// Metrics of one evaluation, as `sklearn.metrics.classification_report`
/// with `labels=` every class and `zero_division=0`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationReport {
    pub accuracy: f64,
    /// Unweighted mean F1 over every class of the label set, so rare classes
    /// count as much as common ones; a class absent from the gold labels
    /// counts with F1 0.
    pub macro_f1: f64,
    /// Mean F1 weighted by support.
    pub weighted_f1: f64,
    /// In label-set order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[gold][pred]`: examples of class `gold` predicted as `pred`.
    pub confusion: Vec<Vec<usize>>,
    /// Examples evaluated.
    pub n: usize,
}

/// `numerator / denominator`, or 0 when the denominator is 0 (a precision
/// for a class never predicted, a recall for a class never seen).
fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

impl ClassificationReport {
    /// Scores predictions `pred` against `gold`, both indices into `labels`.
    /// With no examples every score is 0.
    ///
    /// # Panics
    /// If `gold` and `pred` differ in length or hold an index out of range
    /// (a bug in the caller, not bad data).
    pub fn compute(labels: &[String], gold: &[usize], pred: &[usize]) -> Self {
        assert_eq!(
            gold.len(),
            pred.len(),
            "gold and predicted labels differ in number"
        );
        let k = labels.len();
        let mut confusion = vec![vec![0usize; k]; k];
        for (&g, &p) in gold.iter().zip(pred) {
            assert!(
                g < k && p < k,
                "label index out of range: gold {g}, predicted {p}, {k} labels"
            );
            confusion[g][p] += 1;
        }
        let n = gold.len();
        let per_class: Vec<ClassMetrics> = labels
            .iter()
            .enumerate()
            .map(|(c, label)| {
                let tp = confusion[c][c];
                let support: usize = confusion[c].iter().sum();
                let predicted: usize = confusion.iter().map(|row| row[c]).sum();
                // 2tp / (2tp + fp + fn), which equals 2PR / (P + R) when both
                // are defined and is what scikit-learn computes otherwise.
                ClassMetrics {
                    label: label.clone(),
                    precision: ratio(tp, predicted),
                    recall: ratio(tp, support),
                    f1: ratio(2 * tp, support + predicted),
                    support,
                }
            })
            .collect();
        let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
        let macro_f1 = if k == 0 {
            0.0
        } else {
            per_class.iter().map(|m| m.f1).sum::<f64>() / k as f64
        };
        let weighted_f1 = if n == 0 {
            0.0
        } else {
            per_class
                .iter()
                .map(|m| m.f1 * m.support as f64)
                .sum::<f64>()
                / n as f64
        };
        ClassificationReport {
            accuracy: ratio(correct, n),
            macro_f1,
            weighted_f1,
            per_class,
            confusion,
            n,
        }
    }

    /// The report as JSON, for training artifacts and `--metrics-out` files:
    /// `{"accuracy", "macro_f1", "weighted_f1", "n", "per_class": {label:
    /// {"precision", "recall", "f1", "support"}}, "confusion_matrix":
    /// {"labels": [...], "matrix": [[...]]}}` (matrix rows are gold labels).
    pub fn to_json(&self) -> Value {
        let per_class: Map<String, Value> = self
            .per_class
            .iter()
            .map(|m| {
                let scores = json!({
                    "precision": m.precision,
                    "recall": m.recall,
                    "f1": m.f1,
                    "support": m.support,
                });
                (m.label.clone(), scores)
            })
            .collect();
        let labels: Vec<&str> = self.per_class.iter().map(|m| m.label.as_str()).collect();
        json!({
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "n": self.n,
            "per_class": per_class,
            "confusion_matrix": {"labels": labels, "matrix": self.confusion},
        })
    }
}
