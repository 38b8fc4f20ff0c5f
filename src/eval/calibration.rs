//! Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural
//! Networks"): fine-tuned classifiers are usually overconfident, and dividing
//! the logits by one temperature `T > 1`, fitted on held-out data, makes their
//! probabilities match observed accuracy without changing any prediction.
//!
//! Logits and probabilities are row-major, `num_labels` values per example.
//! Sums run in `f64` and softmax goes through log-sum-exp, so large logits
//! and small temperatures neither overflow nor lose the answer.

/// The temperatures [`fit_temperature`] considers: far enough either way for
/// any sensible model, and bounded so a perfectly separated validation set
/// (whose NLL keeps falling as `T -> 0`) still gets a finite answer.
pub const TEMPERATURE_RANGE: (f32, f32) = (0.05, 20.0);

/// Golden-section steps: shrink the log-temperature interval from about 6
/// to under 1e-9, far below any difference that matters.
const SEARCH_STEPS: usize = 50;

/// Checks the shapes every function here relies on.
fn check_shapes(values: usize, num_labels: usize, gold: &[usize]) {
    assert!(num_labels > 0, "num_labels must be at least 1");
    assert_eq!(
        values,
        gold.len() * num_labels,
        "expected {} values ({} examples x {num_labels} labels), got {values}",
        gold.len() * num_labels,
        gold.len()
    );
    if let Some(bad) = gold.iter().find(|&&g| g >= num_labels) {
        panic!("gold label {bad} out of range for {num_labels} labels");
    }
}

/// `log(sum(exp(row / t)))`, shifted by the row's maximum so nothing
/// overflows.
fn log_sum_exp(row: &[f32], temperature: f64) -> f64 {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64 / temperature));
    let sum: f64 = row
        .iter()
        .map(|&z| (z as f64 / temperature - max).exp())
        .sum();
    max + sum.ln()
}

/// `1 / (1 + e^-z)` without overflow for large negative `z`: a
/// multi-label model's probability of one label.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Softmax of each row of `logits / temperature`.
///
/// # Panics
/// If `num_labels` is 0, `logits` is not a whole number of rows, or
/// `temperature` is not positive.
pub fn softmax_with_temperature(logits: &[f32], num_labels: usize, temperature: f32) -> Vec<f32> {
    assert!(num_labels > 0, "num_labels must be at least 1");
    assert!(
        logits.len().is_multiple_of(num_labels),
        "logits are not a whole number of rows"
    );
    assert!(
        temperature > 0.0,
        "temperature must be positive, got {temperature}"
    );
    let t = temperature as f64;
    logits
        .chunks(num_labels)
        .flat_map(|row| {
            let lse = log_sum_exp(row, t);
            row.iter().map(move |&z| (z as f64 / t - lse).exp() as f32)
        })
        .collect()
}

/// Mean negative log-likelihood of the gold labels under
/// `softmax(logits / temperature)`; 0 with no examples.
///
/// # Panics
/// If the shapes disagree (`logits.len() != gold.len() * num_labels`), a gold
/// label is out of range, or `temperature` is not positive.
pub fn nll(logits: &[f32], num_labels: usize, gold: &[usize], temperature: f32) -> f64 {
    check_shapes(logits.len(), num_labels, gold);
    assert!(
        temperature > 0.0,
        "temperature must be positive, got {temperature}"
    );
    mean_nll(logits, num_labels, gold, temperature as f64)
}

fn mean_nll(logits: &[f32], num_labels: usize, gold: &[usize], t: f64) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    let total: f64 = logits
        .chunks(num_labels)
        .zip(gold)
        .map(|(row, &g)| log_sum_exp(row, t) - row[g] as f64 / t)
        .sum();
    total / gold.len() as f64
}

/// The temperature in [`TEMPERATURE_RANGE`] that minimises [`nll`] on held-out
/// logits and gold labels.
///
/// The NLL is convex in `1 / T`, hence has a single minimum along `log T`,
/// which a golden-section search finds without derivatives or tuning, the
/// same way every run. With no examples, or non-finite logits (a diverged
/// model), there is nothing to fit and the answer is 1 (no scaling).
///
/// # Panics
/// As [`nll`].
pub fn fit_temperature(logits: &[f32], num_labels: usize, gold: &[usize]) -> f32 {
    check_shapes(logits.len(), num_labels, gold);
    if gold.is_empty() || logits.iter().any(|z| !z.is_finite()) {
        return 1.0;
    }
    let loss = |log_t: f64| mean_nll(logits, num_labels, gold, log_t.exp());
    let inverse_golden = (5f64.sqrt() - 1.0) / 2.0;
    let (mut lo, mut hi) = (
        (TEMPERATURE_RANGE.0 as f64).ln(),
        (TEMPERATURE_RANGE.1 as f64).ln(),
    );
    let mut a = hi - inverse_golden * (hi - lo);
    let mut b = lo + inverse_golden * (hi - lo);
    let (mut loss_a, mut loss_b) = (loss(a), loss(b));
    for _ in 0..SEARCH_STEPS {
        if loss_a <= loss_b {
            hi = b;
            b = a;
            loss_b = loss_a;
            a = hi - inverse_golden * (hi - lo);
            loss_a = loss(a);
        } else {
            lo = a;
            a = b;
            loss_a = loss_b;
            b = lo + inverse_golden * (hi - lo);
            loss_b = loss(b);
        }
    }
    (((lo + hi) / 2.0).exp() as f32).clamp(TEMPERATURE_RANGE.0, TEMPERATURE_RANGE.1)
}

/// Expected calibration error: examples are put in `bins` equal-width bins by
/// confidence (the largest probability, bin `i` holding `(i/bins,
/// (i+1)/bins]`), and the gap between each bin's accuracy and mean
/// confidence is averaged, weighted by the bin's share of examples. 0 is
/// perfectly calibrated; 15 bins is the usual choice. 0 with no examples.
///
/// # Panics
/// If `bins` is 0 or the shapes disagree (see [`nll`]).
pub fn expected_calibration_error(
    probs: &[f32],
    num_labels: usize,
    gold: &[usize],
    bins: usize,
) -> f64 {
    check_shapes(probs.len(), num_labels, gold);
    assert!(bins > 0, "bins must be at least 1");
    if gold.is_empty() {
        return 0.0;
    }
    // Per bin: examples, correct predictions, summed confidence.
    let mut tally = vec![(0usize, 0usize, 0f64); bins];
    for (row, &g) in probs.chunks(num_labels).zip(gold) {
        let (predicted, confidence) =
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &p)| {
                    if p > best.1 {
                        (i, p)
                    } else {
                        best
                    }
                });
        let confidence = confidence as f64;
        let bin = ((confidence * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        let entry = &mut tally[bin];
        entry.0 += 1;
        entry.1 += usize::from(predicted == g);
        entry.2 += confidence;
    }
    let n = gold.len() as f64;
    tally
        .iter()
        .filter(|(count, _, _)| *count > 0)
        .map(|&(count, correct, confidence)| {
            let count_f = count as f64;
            (count_f / n) * (correct as f64 / count_f - confidence / count_f).abs()
        })
        .sum()
}
