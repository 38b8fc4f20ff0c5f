//! The class vocabulary: which label is output index 0, 1, ...

use std::collections::{HashMap, HashSet};

use super::{Dataset, Example};
use crate::error::{Error, Result};

/// Labels listed in the messages for unseen labels, at most.
const SHOWN_LABELS: usize = 20;

/// The classes of a classifier, in output order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSet {
    labels: Vec<String>,
    index: HashMap<String, usize>,
}

impl LabelSet {
    /// The distinct labels of a training set, sorted so that the order does
    /// not depend on row order: numerically when every label is an integer
    /// (`"2" < "10"`, `"-1" < "0"`), otherwise by Unicode code point.
    pub fn from_training(dataset: &Dataset) -> Self {
        Self::sorted(dataset.examples.iter().map(|e| e.label.clone()).collect())
    }

    /// The distinct labels of a multi-label training set's rows, sorted as
    /// [`Self::from_training`].
    pub fn from_training_label_sets(dataset: &Dataset) -> Self {
        Self::sorted(
            dataset
                .examples
                .iter()
                .flat_map(|e| e.labels.iter().cloned())
                .collect(),
        )
    }

    fn sorted(mut labels: Vec<String>) -> Self {
        labels.sort_unstable();
        labels.dedup();
        let numbers: Option<Vec<i128>> = labels.iter().map(|l| l.parse().ok()).collect();
        if let Some(numbers) = numbers {
            let mut pairs: Vec<(i128, String)> = numbers.into_iter().zip(labels).collect();
            // Ties ("1" and "01") keep their string order.
            pairs.sort();
            labels = pairs.into_iter().map(|(_, label)| label).collect();
        }
        Self::indexed(labels)
    }

    /// A label set in a given order, e.g. the `id2label` of a saved model,
    /// which must be kept as is. Duplicate or empty labels are errors.
    pub fn from_labels(labels: Vec<String>) -> Result<Self> {
        if let Some(empty) = labels.iter().position(|l| l.trim().is_empty()) {
            return Err(Error::Invalid(format!(
                "label {empty} is empty; every class needs a name"
            )));
        }
        let mut seen = HashSet::new();
        if let Some(duplicate) = labels.iter().find(|l| !seen.insert(l.as_str())) {
            return Err(Error::Invalid(format!(
                "label {duplicate:?} appears more than once; labels must be distinct"
            )));
        }
        Ok(Self::indexed(labels))
    }

    fn indexed(labels: Vec<String>) -> Self {
        let index = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i))
            .collect();
        LabelSet { labels, index }
    }

    /// The output index of `label`.
    pub fn index(&self, label: &str) -> Option<usize> {
        self.index.get(label).copied()
    }

    /// The labels in output order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The output index of every example's label. A label the training set
    /// did not have is an error (the model has no output for it) naming the
    /// first such row and counting the others.
    pub fn encode(&self, dataset: &Dataset) -> Result<Vec<usize>> {
        dataset
            .examples
            .iter()
            .map(|e| {
                self.index(&e.label).ok_or_else(|| {
                    self.unseen_label_error(dataset, e, &e.label, |e| {
                        self.index(&e.label).is_none()
                    })
                })
            })
            .collect()
    }

    /// The output indices of every multi-label row's labels, as
    /// [`Self::encode`] does for single labels.
    pub fn encode_label_sets(&self, dataset: &Dataset) -> Result<Vec<Vec<usize>>> {
        dataset
            .examples
            .iter()
            .map(|e| {
                e.labels
                    .iter()
                    .map(|label| {
                        self.index(label).ok_or_else(|| {
                            self.unseen_label_error(dataset, e, label, |e| {
                                e.labels.iter().any(|l| self.index(l).is_none())
                            })
                        })
                    })
                    .collect()
            })
            .collect()
    }

    fn unseen_label_error(
        &self,
        dataset: &Dataset,
        first: &Example,
        label: &str,
        has_unseen: impl Fn(&Example) -> bool,
    ) -> Error {
        let unseen = dataset.examples.iter().filter(|e| has_unseen(e)).count();
        let also = if unseen > 1 {
            format!(
                " ({} more rows have labels not in the training data)",
                unseen - 1
            )
        } else {
            String::new()
        };
        Error::Invalid(format!(
            "{} line {}: label {:?} does not occur in the training data{also}; known labels: {}; fix the label, or add examples of it to the training data",
            dataset.path.display(),
            first.line,
            label,
            self.shown()
        ))
    }

    /// The labels for a message, shortened when there are many.
    fn shown(&self) -> String {
        let mut shown: Vec<String> = self
            .labels
            .iter()
            .take(SHOWN_LABELS)
            .map(|l| format!("{l:?}"))
            .collect();
        if self.labels.len() > SHOWN_LABELS {
            shown.push(format!("and {} more", self.labels.len() - SHOWN_LABELS));
        }
        shown.join(", ")
    }
}
