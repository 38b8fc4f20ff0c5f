//! Decision thresholds tuned on dev: the probability at which a label is
//! predicted, chosen to maximise a metric of the resulting confusion counts
//! (per-label F1 for multi-label models; the selection metric for the
//! positive class of a binary classifier).

/// Outcomes of a yes/no decision over a set of examples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
    pub true_negatives: usize,
}

impl Counts {
    /// The counts when `probs[i] >= threshold` predicts `positive[i]`.
    pub fn at(probs: &[f32], positive: &[bool], threshold: f32) -> Self {
        let mut counts = Counts::default();
        for (&p, &gold) in probs.iter().zip(positive) {
            counts.add(p >= threshold, gold);
        }
        counts
    }

    /// These counts with one more decision.
    pub fn plus(mut self, predicted: bool, gold: bool) -> Self {
        self.add(predicted, gold);
        self
    }

    /// The counts of two sets of decisions together.
    pub fn merged(&self, other: &Counts) -> Self {
        Counts {
            true_positives: self.true_positives + other.true_positives,
            false_positives: self.false_positives + other.false_positives,
            false_negatives: self.false_negatives + other.false_negatives,
            true_negatives: self.true_negatives + other.true_negatives,
        }
    }

    fn add(&mut self, predicted: bool, gold: bool) {
        match (predicted, gold) {
            (true, true) => self.true_positives += 1,
            (true, false) => self.false_positives += 1,
            (false, true) => self.false_negatives += 1,
            (false, false) => self.true_negatives += 1,
        }
    }

    /// F1 of the positive class, `2tp / (2tp + fp + fn)`; 0 when undefined
    /// (scikit-learn's `zero_division=0`).
    pub fn f1(&self) -> f64 {
        ratio(
            2 * self.true_positives,
            2 * self.true_positives + self.false_positives + self.false_negatives,
        )
    }

    /// F1 of the negative class.
    pub fn negative_f1(&self) -> f64 {
        ratio(
            2 * self.true_negatives,
            2 * self.true_negatives + self.false_positives + self.false_negatives,
        )
    }

    pub fn accuracy(&self) -> f64 {
        ratio(
            self.true_positives + self.true_negatives,
            self.true_positives + self.false_positives + self.false_negatives + self.true_negatives,
        )
    }

    pub fn precision(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }

    pub fn recall(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        )
    }
}

fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

/// The untuned decision: a label whose probability reaches one half.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// A tuned threshold and the metric at the default and at the tuned one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuned {
    pub threshold: f32,
    pub before: f64,
    pub after: f64,
}

/// The threshold on `probs` that maximises `metric` against `positive`.
///
/// Every distinct decision is tried (thresholds halfway between
/// consecutive distinct probabilities, and above the highest); among equal
/// scores the threshold nearest [`DEFAULT_THRESHOLD`] wins, and the default
/// is kept unless another strictly beats it, so a small dev set does not
/// move the decision for nothing.
///
/// # Panics
/// If the lengths differ.
pub fn tune(probs: &[f32], positive: &[bool], metric: impl Fn(&Counts) -> f64) -> Tuned {
    assert_eq!(probs.len(), positive.len(), "one gold answer per example");
    let before = metric(&Counts::at(probs, positive, DEFAULT_THRESHOLD));
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    // Walk the threshold down from above the highest probability: each
    // group of equal probabilities turns positive at once.
    let mut counts = Counts::default();
    for &gold in positive {
        counts.add(false, gold);
    }
    let highest = order.first().map_or(1.0, |&i| probs[i] as f64);
    let mut candidates = vec![((highest + 1.0) / 2.0, metric(&counts))];
    let mut start = 0;
    while start < order.len() {
        let value = probs[order[start]];
        let mut end = start;
        while end < order.len() && probs[order[end]] == value {
            if positive[order[end]] {
                counts.false_negatives -= 1;
                counts.true_positives += 1;
            } else {
                counts.true_negatives -= 1;
                counts.false_positives += 1;
            }
            end += 1;
        }
        let next = order.get(end).map_or(0.0, |&i| probs[i] as f64);
        candidates.push(((value as f64 + next) / 2.0, metric(&counts)));
        start = end;
    }
    let distance = |t: f64| (t - DEFAULT_THRESHOLD as f64).abs();
    let best = candidates
        .iter()
        .filter(|(t, _)| t.is_finite())
        .max_by(|a, b| {
            a.1.total_cmp(&b.1)
                .then(distance(b.0).total_cmp(&distance(a.0)))
        })
        .map(|&(t, _)| t as f32);
    // Score the threshold as it will be stored and applied (f32).
    match best.map(|t| (t, metric(&Counts::at(probs, positive, t)))) {
        Some((threshold, after)) if after > before => Tuned {
            threshold,
            before,
            after,
        },
        _ => Tuned {
            threshold: DEFAULT_THRESHOLD,
            before,
            after: before,
        },
    }
}
