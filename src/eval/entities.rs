//! Entity-level precision, recall and F1 over BIO tags, as `seqeval`
//! computes them in its default mode (`seqeval.metrics.f1_score` without
//! `mode="strict"`): an entity counts as found only when its type, first and
//! last word all match a gold entity.
//!
//! Spans follow `seqeval.metrics.sequence_labeling.get_entities`: an entity
//! starts at `B-X`, and also at an `I-X` that follows `O`, the start of the
//! sentence or a tag of another type (an `I-` without its `B-` is not
//! dropped); it ends before `O`, `B-` or a change of type, or at the end of
//! the sentence. So `I-PER I-PER` is one PER entity, `B-PER I-LOC` is a PER
//! and a LOC entity, and `B-PER B-PER` two PER entities.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;

use crate::data::entity_type;

/// An entity of a sentence: `words[start..end]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entity {
    pub kind: String,
    pub start: usize,
    /// Exclusive.
    pub end: usize,
}

/// The entities of one sentence's BIO tags (see the module docs).
pub fn entities<S: AsRef<str>>(tags: &[S]) -> Vec<Entity> {
    let mut found = Vec::new();
    let mut open: Option<(&str, usize)> = None;
    for (i, tag) in tags.iter().enumerate() {
        let tag = tag.as_ref();
        let kind = entity_type(tag);
        let begins = tag.starts_with("B-");
        let continues =
            matches!((open, kind), (Some((open_kind, _)), Some(k)) if !begins && k == open_kind);
        if continues {
            continue;
        }
        if let Some((open_kind, start)) = open.take() {
            found.push(Entity {
                kind: open_kind.to_string(),
                start,
                end: i,
            });
        }
        open = kind.map(|k| (k, i));
    }
    if let Some((kind, start)) = open {
        found.push(Entity {
            kind: kind.to_string(),
            start,
            end: tags.len(),
        });
    }
    found
}

/// Counts and scores of one entity type, or of all pooled.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntityScores {
    /// Gold entities (seqeval's support).
    pub gold: usize,
    pub predicted: usize,
    pub correct: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl EntityScores {
    fn from_counts(gold: usize, predicted: usize, correct: usize) -> Self {
        // seqeval's zero_division default: 0 where a ratio is undefined.
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let (precision, recall) = (ratio(correct, predicted), ratio(correct, gold));
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        EntityScores {
            gold,
            predicted,
            correct,
            precision,
            recall,
            f1,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "gold": self.gold,
            "predicted": self.predicted,
            "correct": self.correct,
        })
    }
}

/// Entity-level scores of predicted against gold tag sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityReport {
    /// Micro-averaged over all entities (seqeval's headline numbers).
    pub overall: EntityScores,
    /// Per entity type, gold or predicted, sorted by name.
    pub per_type: BTreeMap<String, EntityScores>,
    /// Fraction of words whose predicted tag equals the gold one.
    pub word_accuracy: f64,
}

impl EntityReport {
    /// Scores sentence by sentence (entities never cross sentences).
    ///
    /// # Panics
    /// If the sentences or their lengths differ.
    pub fn compute<S: AsRef<str>, T: AsRef<str>>(gold: &[Vec<S>], predicted: &[Vec<T>]) -> Self {
        assert_eq!(gold.len(), predicted.len(), "one prediction per sentence");
        let mut counts: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        let (mut words, mut words_right) = (0usize, 0usize);
        for (g, p) in gold.iter().zip(predicted) {
            assert_eq!(g.len(), p.len(), "one predicted tag per word");
            words += g.len();
            words_right += g
                .iter()
                .zip(p)
                .filter(|(a, b)| a.as_ref() == b.as_ref())
                .count();
            let gold_entities = entities(g);
            let predicted_entities = entities(p);
            let gold_set: HashSet<&Entity> = gold_entities.iter().collect();
            for e in &gold_entities {
                counts.entry(e.kind.clone()).or_default().0 += 1;
            }
            for e in &predicted_entities {
                let c = counts.entry(e.kind.clone()).or_default();
                c.1 += 1;
                if gold_set.contains(e) {
                    c.2 += 1;
                }
            }
        }
        let per_type: BTreeMap<String, EntityScores> = counts
            .iter()
            .map(|(k, &(g, p, c))| (k.clone(), EntityScores::from_counts(g, p, c)))
            .collect();
        let total = counts.values().fold((0, 0, 0), |acc, &(g, p, c)| {
            (acc.0 + g, acc.1 + p, acc.2 + c)
        });
        EntityReport {
            overall: EntityScores::from_counts(total.0, total.1, total.2),
            per_type,
            word_accuracy: if words == 0 {
                0.0
            } else {
                words_right as f64 / words as f64
            },
        }
    }

    /// The headline numbers (flat, for training logs and seed statistics).
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::json!({
            "entity_precision": self.overall.precision,
            "entity_recall": self.overall.recall,
            "entity_f1": self.overall.f1,
            "word_accuracy": self.word_accuracy,
        })
    }

    /// Headline numbers, counts and per-type scores.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self.summary_json();
        json["entities"] = self.overall.to_json();
        json["per_type"] = self
            .per_type
            .iter()
            .map(|(k, s)| (k.clone(), s.to_json()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        json
    }

    /// seqeval's `classification_report` layout.
    pub fn to_table(&self) -> String {
        let width = self
            .per_type
            .keys()
            .map(|k| k.chars().count())
            .chain(["micro avg".len()])
            .max()
            .unwrap_or_default();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:width$}{:>10}{:>10}{:>10}{:>10}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        let row = |out: &mut String, name: &str, s: &EntityScores| {
            let _ = writeln!(
                out,
                "{name:>width$}{:>10.4}{:>10.4}{:>10.4}{:>10}",
                s.precision, s.recall, s.f1, s.gold
            );
        };
        for (kind, scores) in &self.per_type {
            row(&mut out, kind, scores);
        }
        out.push('\n');
        row(&mut out, "micro avg", &self.overall);
        let _ = writeln!(out, "\nword accuracy {:.4}", self.word_accuracy);
        out
    }
}
