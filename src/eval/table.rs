//! The report as text for a terminal, laid out like scikit-learn's
//! `classification_report`, so it reads the way practitioners expect.

use std::fmt::Write;

use super::ClassificationReport;

/// Digits after the decimal point: four, so small improvements show.
const DIGITS: usize = 4;
const SCORE_WIDTH: usize = 10;

impl ClassificationReport {
    /// Per-class precision, recall, F1 and support, accuracy, macro and
    /// weighted averages, then the confusion matrix (rows gold, columns
    /// predicted).
    pub fn to_table(&self) -> String {
        let name_width = self
            .per_class
            .iter()
            .map(|m| m.label.chars().count())
            .chain(["weighted avg".len()])
            .max()
            .unwrap_or_default();
        let mut out = String::new();
        let row = |out: &mut String, name: &str, scores: [Option<f64>; 3], support: usize| {
            let _ = write!(out, "{name:>name_width$}");
            for score in scores {
                match score {
                    Some(s) => {
                        let _ = write!(out, "{s:>SCORE_WIDTH$.DIGITS$}");
                    }
                    None => out.push_str(&" ".repeat(SCORE_WIDTH)),
                }
            }
            let _ = writeln!(out, "{support:>SCORE_WIDTH$}");
        };
        let _ = writeln!(
            out,
            "{:name_width$}{:>SCORE_WIDTH$}{:>SCORE_WIDTH$}{:>SCORE_WIDTH$}{:>SCORE_WIDTH$}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        for m in &self.per_class {
            row(
                &mut out,
                &m.label,
                [Some(m.precision), Some(m.recall), Some(m.f1)],
                m.support,
            );
        }
        out.push('\n');
        row(
            &mut out,
            "accuracy",
            [None, None, Some(self.accuracy)],
            self.n,
        );
        let k = self.per_class.len().max(1) as f64;
        let n = self.n.max(1) as f64;
        let mean = |score: fn(&super::ClassMetrics) -> f64| {
            self.per_class.iter().map(score).sum::<f64>() / k
        };
        let weighted = |score: fn(&super::ClassMetrics) -> f64| {
            self.per_class
                .iter()
                .map(|m| score(m) * m.support as f64)
                .sum::<f64>()
                / n
        };
        row(
            &mut out,
            "macro avg",
            [
                Some(mean(|m| m.precision)),
                Some(mean(|m| m.recall)),
                Some(self.macro_f1),
            ],
            self.n,
        );
        row(
            &mut out,
            "weighted avg",
            [
                Some(weighted(|m| m.precision)),
                Some(weighted(|m| m.recall)),
                Some(self.weighted_f1),
            ],
            self.n,
        );
        out.push('\n');
        self.write_confusion(&mut out);
        out
    }

    fn write_confusion(&self, out: &mut String) {
        let labels: Vec<&str> = self.per_class.iter().map(|m| m.label.as_str()).collect();
        let name_width = labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or_default();
        let count_width = self
            .confusion
            .iter()
            .flatten()
            .map(|c| c.to_string().len())
            .chain(labels.iter().map(|l| l.chars().count()))
            .max()
            .unwrap_or_default()
            + 2;
        let _ = writeln!(out, "confusion matrix (rows: gold, columns: predicted)");
        let _ = write!(out, "{:name_width$}", "");
        for label in &labels {
            let _ = write!(out, "{label:>count_width$}");
        }
        out.push('\n');
        for (label, row) in labels.iter().zip(&self.confusion) {
            let _ = write!(out, "{label:>name_width$}");
            for count in row {
                let _ = write!(out, "{count:>count_width$}");
            }
            out.push('\n');
        }
    }
}
