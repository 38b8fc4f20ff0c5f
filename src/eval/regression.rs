//! Regression metrics: RMSE, MAE, Pearson and Spearman correlation.

use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq)]
pub struct RegressionReport {
    pub rmse: f64,
    pub mae: f64,
    pub pearson: f64,
    pub spearman: f64,
    pub n: usize,
}

impl RegressionReport {
    /// # Panics
    /// If the lengths differ.
    pub fn compute(gold: &[f32], predicted: &[f32]) -> Self {
        assert_eq!(gold.len(), predicted.len(), "one prediction per example");
        let n = gold.len();
        let errors = gold.iter().zip(predicted).map(|(g, p)| (*p - *g) as f64);
        let (squared, absolute) = errors.fold((0.0, 0.0), |(s, a), e| (s + e * e, a + e.abs()));
        let count = n.max(1) as f64;
        let gold: Vec<f64> = gold.iter().map(|&v| v as f64).collect();
        let predicted: Vec<f64> = predicted.iter().map(|&v| v as f64).collect();
        RegressionReport {
            rmse: (squared / count).sqrt(),
            mae: absolute / count,
            pearson: pearson(&gold, &predicted),
            spearman: pearson(&ranks(&gold), &ranks(&predicted)),
            n,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "rmse": self.rmse,
            "mae": self.mae,
            "pearson": self.pearson,
            "spearman": self.spearman,
            "n": self.n,
        })
    }
}

/// Pearson correlation; 0 when either side is constant.
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx * syy).sqrt()
}

/// Ranks from 1, ties sharing their average rank (as scipy's `rankdata`).
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let average = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = average;
        }
        start = end;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_inverse_predictions() {
        let gold = [1.0, 2.0, 3.0, 4.0];
        let same = RegressionReport::compute(&gold, &gold);
        assert_eq!((same.rmse, same.pearson, same.spearman), (0.0, 1.0, 1.0));
        let inverse = RegressionReport::compute(&gold, &[8.0, 6.0, 4.0, 2.0]);
        assert!((inverse.pearson + 1.0).abs() < 1e-12);
        assert!((inverse.spearman + 1.0).abs() < 1e-12);
    }

    #[test]
    fn spearman_uses_average_ranks_for_ties() {
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138
        let r = RegressionReport::compute(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!(
            (r.spearman - 0.948_683_298_050_513_8).abs() < 1e-12,
            "{}",
            r.spearman
        );
        // Monotone but non-linear: Spearman 1, Pearson below 1.
        let r = RegressionReport::compute(&[1.0, 2.0, 3.0, 4.0], &[1.0, 4.0, 9.0, 100.0]);
        assert_eq!(r.spearman, 1.0);
        assert!(r.pearson < 0.9);
    }
}
