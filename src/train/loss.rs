//! Head losses computed on the host: the logits of a batch are small
//! (`sequences x labels`), so these run in `f64` beside the backend's
//! cross-entropy and MSE ops. Each returns the loss and writes its gradient
//! with respect to the logits.

use crate::eval::calibration::sigmoid;

/// Binary cross-entropy with logits over every (example, label) pair, the
/// mean over all of them (PyTorch's `BCEWithLogitsLoss()`, which
/// `BertForSequenceClassification` uses for `multi_label_classification`).
///
/// Written as `max(z, 0) - z·y + ln(1 + e^-|z|)`, which neither overflows
/// nor loses precision for large `|z|`; the gradient is `(σ(z) - y) / n`.
///
/// # Panics
/// If the lengths differ.
pub fn bce_with_logits(d_logits: &mut [f32], logits: &[f32], targets: &[f32]) -> f32 {
    assert_eq!(logits.len(), targets.len(), "one target per logit");
    assert_eq!(logits.len(), d_logits.len(), "one gradient per logit");
    let n = logits.len().max(1) as f64;
    let mut loss = 0.0f64;
    for ((d, &z), &y) in d_logits.iter_mut().zip(logits).zip(targets) {
        let (z, y) = (z as f64, y as f64);
        loss += z.max(0.0) - z * y + (-z.abs()).exp().ln_1p();
        *d = ((sigmoid(z) - y) / n) as f32;
    }
    (loss / n) as f32
}

/// Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection")
/// over softmax rows of `classes` logits: `-α_y (1 - p_y)^γ ln p_y`, which
/// down-weights examples the model already gets right so training attends
/// to the hard ones. `class_weights` are the per-class `α` (all 1 when
/// None); the result is normalised by `Σ α_y` like weighted cross-entropy,
/// so `gamma` 0 is exactly (weighted) cross-entropy.
///
/// With `q = 1 - p_y` (the sum of the other probabilities, which keeps its
/// precision when `p_y` is near 1) the gradient is
/// `α_y q^γ (1 + γ p_y (-ln p_y) / q) (p - onehot(y))`; `-ln p_y / q`
/// tends to 1 as `q → 0`, so nothing divides by zero.
///
/// # Panics
/// If the shapes disagree or a label is out of range.
pub fn focal(
    d_logits: &mut [f32],
    logits: &[f32],
    labels: &[usize],
    class_weights: Option<&[f32]>,
    gamma: f32,
    classes: usize,
) -> f32 {
    assert_eq!(logits.len(), labels.len() * classes, "logit shape");
    assert_eq!(logits.len(), d_logits.len(), "one gradient per logit");
    let gamma = gamma as f64;
    let alpha = |label: usize| class_weights.map_or(1.0, |w| w[label] as f64);
    let total: f64 = labels.iter().map(|&l| alpha(l)).sum();
    let mut loss = 0.0f64;
    for ((row, d_row), &label) in logits
        .chunks_exact(classes)
        .zip(d_logits.chunks_exact_mut(classes))
        .zip(labels)
    {
        assert!(label < classes, "label {label} out of range");
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
        let exps: Vec<f64> = row.iter().map(|&z| (z as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let probs: Vec<f64> = exps.iter().map(|e| e / sum).collect();
        let p = probs[label];
        let neg_log_p = sum.ln() - (row[label] as f64 - max);
        let q: f64 = probs
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != label)
            .map(|(_, p)| p)
            .sum();
        let q_gamma = q.powf(gamma);
        // -ln(p)/q = -ln(1 - q)/q, which tends to 1 as q -> 0.
        let log_ratio = if q > 0.0 { neg_log_p / q } else { 1.0 };
        let a = alpha(label);
        loss += a * q_gamma * neg_log_p;
        let scale = a * q_gamma * (1.0 + gamma * p * log_ratio) / total;
        for (j, (d, &pj)) in d_row.iter_mut().zip(&probs).enumerate() {
            let onehot = if j == label { 1.0 } else { 0.0 };
            *d = (scale * (pj - onehot)) as f32;
        }
    }
    (loss / total) as f32
}

/// Softmax cross-entropy per token, the mean over the labeled tokens
/// (PyTorch's `CrossEntropyLoss(ignore_index=-100)`, which
/// `BertForTokenClassification` uses): `labels[i]` None is Hugging Face's
/// -100 (a special token or a word's later subword) and neither adds to the
/// loss nor gets a gradient. For a labeled token the gradient is
/// `(softmax(z) - onehot(y)) / n`, `n` the number of labeled tokens; a
/// batch without any labeled token has loss 0 and no gradient (where
/// PyTorch would return NaN).
///
/// # Panics
/// If the shapes disagree or a label is out of range.
pub fn token_cross_entropy(
    d_logits: &mut [f32],
    logits: &[f32],
    labels: &[Option<usize>],
    classes: usize,
) -> f32 {
    assert_eq!(logits.len(), labels.len() * classes, "logit shape");
    assert_eq!(logits.len(), d_logits.len(), "one gradient per logit");
    let labeled = labels.iter().flatten().count().max(1) as f64;
    let mut loss = 0.0f64;
    for ((row, d_row), label) in logits
        .chunks_exact(classes)
        .zip(d_logits.chunks_exact_mut(classes))
        .zip(labels)
    {
        let Some(label) = *label else {
            d_row.fill(0.0);
            continue;
        };
        assert!(label < classes, "label {label} out of range");
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
        let sum: f64 = row.iter().map(|&z| (z as f64 - max).exp()).sum();
        loss += sum.ln() - (row[label] as f64 - max);
        for (j, (d, &z)) in d_row.iter_mut().zip(row).enumerate() {
            let onehot = if j == label { 1.0 } else { 0.0 };
            *d = (((z as f64 - max).exp() / sum - onehot) / labeled) as f32;
        }
    }
    (loss / labeled) as f32
}
