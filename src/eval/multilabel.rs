//! Multi-label metrics: per-label precision, recall and F1, their micro
//! and macro averages, and exact-match (subset) accuracy, with
//! scikit-learn's definitions (`average="micro"`/`"macro"`,
//! `zero_division=0`).

use std::fmt::Write;

use serde_json::{json, Map, Value};

use super::thresholds::Counts;
use super::ClassMetrics;

#[derive(Debug, Clone, PartialEq)]
pub struct MultiLabelReport {
    /// Over every (example, label) decision pooled.
    pub micro_precision: f64,
    pub micro_recall: f64,
    pub micro_f1: f64,
    /// Unweighted mean of the per-label F1 scores.
    pub macro_f1: f64,
    /// Examples whose predicted label set equals the gold one.
    pub subset_accuracy: f64,
    /// In label-set order; support counts gold positives.
    pub per_label: Vec<ClassMetrics>,
    pub n: usize,
}

impl MultiLabelReport {
    /// Scores `predicted` against `gold`, both `[examples, labels]` row-major
    /// membership flags.
    ///
    /// # Panics
    /// If the lengths differ or are not whole rows of `labels.len()`.
    pub fn compute(labels: &[String], gold: &[bool], predicted: &[bool]) -> Self {
        let k = labels.len();
        assert!(k > 0, "at least one label");
        assert_eq!(gold.len(), predicted.len(), "one prediction per gold flag");
        assert!(gold.len().is_multiple_of(k), "whole rows of {k} labels");
        let n = gold.len() / k;
        let mut per_label_counts = vec![Counts::default(); k];
        let mut exact = 0;
        for (gold_row, predicted_row) in gold.chunks_exact(k).zip(predicted.chunks_exact(k)) {
            exact += usize::from(gold_row == predicted_row);
            for ((counts, &g), &p) in per_label_counts.iter_mut().zip(gold_row).zip(predicted_row) {
                *counts = counts.plus(p, g);
            }
        }
        let pooled = per_label_counts
            .iter()
            .fold(Counts::default(), |a, b| a.merged(b));
        let per_label: Vec<ClassMetrics> = labels
            .iter()
            .zip(&per_label_counts)
            .map(|(label, c)| ClassMetrics {
                label: label.clone(),
                precision: c.precision(),
                recall: c.recall(),
                f1: c.f1(),
                support: c.true_positives + c.false_negatives,
            })
            .collect();
        MultiLabelReport {
            micro_precision: pooled.precision(),
            micro_recall: pooled.recall(),
            micro_f1: pooled.f1(),
            macro_f1: per_label.iter().map(|m| m.f1).sum::<f64>() / k as f64,
            subset_accuracy: if n == 0 { 0.0 } else { exact as f64 / n as f64 },
            per_label,
            n,
        }
    }

    pub fn to_json(&self) -> Value {
        let per_label: Map<String, Value> = self
            .per_label
            .iter()
            .map(|m| {
                (
                    m.label.clone(),
                    json!({"precision": m.precision, "recall": m.recall, "f1": m.f1, "support": m.support}),
                )
            })
            .collect();
        json!({
            "micro_precision": self.micro_precision,
            "micro_recall": self.micro_recall,
            "micro_f1": self.micro_f1,
            "macro_f1": self.macro_f1,
            "subset_accuracy": self.subset_accuracy,
            "n": self.n,
            "per_label": per_label,
        })
    }

    /// Per-label precision, recall, F1 and support, then the averages.
    pub fn to_table(&self) -> String {
        let width = self
            .per_label
            .iter()
            .map(|m| m.label.chars().count())
            .chain(["subset accuracy".len()])
            .max()
            .unwrap_or_default();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:width$}{:>10}{:>10}{:>10}{:>10}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        for m in &self.per_label {
            let _ = writeln!(
                out,
                "{:>width$}{:>10.4}{:>10.4}{:>10.4}{:>10}",
                m.label, m.precision, m.recall, m.f1, m.support
            );
        }
        let support: usize = self.per_label.iter().map(|m| m.support).sum();
        let _ = writeln!(
            out,
            "\n{:>width$}{:>10.4}{:>10.4}{:>10.4}{:>10}",
            "micro avg", self.micro_precision, self.micro_recall, self.micro_f1, support
        );
        let k = self.per_label.len().max(1) as f64;
        let mean =
            |score: fn(&ClassMetrics) -> f64| self.per_label.iter().map(score).sum::<f64>() / k;
        let _ = writeln!(
            out,
            "{:>width$}{:>10.4}{:>10.4}{:>10.4}{:>10}",
            "macro avg",
            mean(|m| m.precision),
            mean(|m| m.recall),
            self.macro_f1,
            support
        );
        let _ = writeln!(
            out,
            "{:>width$}{:>30.4}{:>10}",
            "subset accuracy", self.subset_accuracy, self.n
        );
        out
    }
}
