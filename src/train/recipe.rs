//! The training recipe: every setting of a fine-tuning run, with the
//! defaults an experienced practitioner would pick (BERT paper / HF Trainer
//! practice: lr 3e-5 with 10% linear warm-up then linear decay, AdamW with
//! decay 0.01 except biases and LayerNorm, clipping at 1.0, batch 16,
//! 3 epochs, early stopping on dev macro-F1).
//!
//! Settings come from a TOML file and the command line; the command line
//! wins. The resolved recipe is stored in the artifact.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::Precision;
use crate::data::Alignment;
use crate::error::{Error, Result};
use crate::lora::{LoraSpec, LoraTarget};
use crate::model::Pooling;
use crate::tokenize::check_room_for_text;

/// What the model learns to predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One label per text, softmax + cross-entropy.
    Classification,
    /// One number per text (the label column holds numbers), MSE.
    Regression,
    /// Any number of labels per text (a JSON list or a delimited string),
    /// one sigmoid per label, binary cross-entropy.
    MultiLabel,
    /// One BIO tag per word (CoNLL or JSON Lines words and tags), softmax +
    /// cross-entropy per token; scored by entity-level F1.
    TokenClassification,
}

/// What "better" means for early stopping and checkpoint selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    MacroF1,
    /// Multi-label: F1 over every (example, label) decision pooled.
    MicroF1,
    Accuracy,
    Loss,
    Pearson,
    Spearman,
    Rmse,
    /// Token classification: entity-level F1 (seqeval).
    EntityF1,
}

impl Metric {
    fn fits(self, task: Task) -> bool {
        match self {
            Metric::Loss => true,
            Metric::MacroF1 => matches!(task, Task::Classification | Task::MultiLabel),
            Metric::EntityF1 => task == Task::TokenClassification,
            Metric::MicroF1 => task == Task::MultiLabel,
            Metric::Accuracy => task == Task::Classification,
            Metric::Pearson | Metric::Spearman | Metric::Rmse => task == Task::Regression,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainRecipe {
    pub model: PathBuf,
    pub train: PathBuf,
    pub valid: PathBuf,
    pub out: PathBuf,
    #[serde(default = "defaults::text_column")]
    pub text_column: String,
    #[serde(default = "defaults::label_column")]
    pub label_column: String,
    #[serde(default)]
    pub text_pair_column: Option<String>,
    /// Token classification, JSON Lines: the key of each line's word list.
    #[serde(default = "defaults::tokens_column")]
    pub tokens_column: String,
    /// Token classification, JSON Lines: the key of each line's tag list.
    #[serde(default = "defaults::tags_column")]
    pub tags_column: String,
    /// Token classification: train on every subword of a word (the later
    /// ones with the word's `I-` tag), not only the first.
    #[serde(default)]
    pub label_all_subwords: bool,
    #[serde(default)]
    pub skip_bad_rows: bool,
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    #[serde(default = "defaults::one")]
    pub grad_accum: usize,
    #[serde(default = "defaults::lr")]
    pub lr: f32,
    #[serde(default = "defaults::warmup_ratio")]
    pub warmup_ratio: f32,
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f32,
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f32,
    #[serde(default = "defaults::adam_beta1")]
    pub adam_beta1: f32,
    #[serde(default = "defaults::adam_beta2")]
    pub adam_beta2: f32,
    #[serde(default = "defaults::adam_eps")]
    pub adam_eps: f32,
    #[serde(default = "defaults::max_length")]
    pub max_length: usize,
    #[serde(default = "defaults::pooling")]
    pub pooling: Pooling,
    #[serde(default = "defaults::head_dropout")]
    pub head_dropout: f32,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Evaluate every N optimizer steps as well as at each epoch's end.
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// Stop after this many evaluations without improvement.
    #[serde(default)]
    pub patience: Option<usize>,
    #[serde(default = "defaults::task")]
    pub task: Task,
    /// [default: macro_f1 for classification, pearson for regression]
    #[serde(default)]
    pub metric: Option<Metric>,
    /// Batch examples of similar length together (less attention work).
    #[serde(default = "defaults::yes")]
    pub bucket_by_length: bool,
    /// Fit a softmax temperature on dev (calibrated probabilities).
    #[serde(default = "defaults::yes")]
    pub calibrate: bool,
    /// CPU threads (0: one per core).
    #[serde(default)]
    pub threads: usize,
    /// What the linear layers multiply in (master weights stay fp32).
    #[serde(default)]
    pub precision: Precision,
    /// Gradient checkpointing: keep only each encoder layer's input from
    /// the forward pass and recompute the layer's activations in backward
    /// (one layer's activations held instead of all, for about 30% more
    /// compute).
    #[serde(default)]
    pub grad_checkpointing: bool,
    /// Keep the embeddings fixed.
    #[serde(default)]
    pub freeze_embeddings: bool,
    /// Keep the embeddings and the lowest N encoder layers fixed.
    #[serde(default)]
    pub freeze_bottom: usize,
    /// Train only the pooler and classifier on a frozen encoder.
    #[serde(default)]
    pub head_only: bool,
    /// Discriminative learning rates: layer l of L gets lr · decay^(L−l),
    /// the embeddings lr · decay^L, the head the full lr.
    #[serde(default)]
    pub layer_lr_decay: Option<f32>,
    /// Learning rate of the pooler and classifier [default: lr].
    #[serde(default)]
    pub head_lr: Option<f32>,
    /// Loss weights per class: "balanced" (n / (classes · count)) or a JSON
    /// file mapping label to weight.
    #[serde(default)]
    pub class_weights: Option<String>,
    /// Focal loss exponent for classification (0: cross-entropy).
    #[serde(default)]
    pub focal_gamma: f32,
    /// Multi-label: separates the labels in a label string (a JSON list
    /// needs none).
    #[serde(default = "defaults::label_delimiter")]
    pub label_delimiter: String,
    /// Tune decision thresholds on dev: per label for multi-label models
    /// (each label's F1), the positive class's for binary classifiers (the
    /// selection metric).
    #[serde(default = "defaults::yes")]
    pub tune_thresholds: bool,
    /// Gradual unfreezing: phases `what:epochs`, e.g.
    /// "head:1,top2:1,top6:1,all:1" (see [`UnfreezePhase`]); replaces
    /// `epochs` and the freezing settings.
    #[serde(default)]
    pub unfreeze_schedule: Option<String>,
    /// LoRA: the rank of an adapter on each target linear, the base model
    /// frozen (0: no LoRA, every parameter trains).
    #[serde(default)]
    pub lora_rank: usize,
    /// LoRA: the update is scaled by `lora_alpha / lora_rank`
    /// [default: 2 · lora_rank].
    #[serde(default)]
    pub lora_alpha: Option<f32>,
    /// LoRA: the linears of every layer that get an adapter
    /// [default: query, value].
    #[serde(default)]
    pub lora_targets: Option<Vec<LoraTarget>>,
    /// LoRA: save the adapters merged into the base weights (a plain
    /// Hugging Face model) instead of apart from the base model.
    #[serde(default)]
    pub merge_lora: bool,
}

/// One phase of gradual unfreezing: what trains, for how many epochs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnfreezePhase {
    pub trainable: Unfrozen,
    pub epochs: usize,
}

/// What trains in a phase; the rest of the model stays fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfrozen {
    /// The pooler and classifier.
    Head,
    /// The head and the top N encoder layers.
    Top(usize),
    /// Everything, embeddings included.
    All,
}

impl std::fmt::Display for Unfrozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfrozen::Head => write!(f, "head"),
            Unfrozen::Top(n) => write!(f, "top{n}"),
            Unfrozen::All => write!(f, "all"),
        }
    }
}

/// Parses "head:1,top2:1,all:1".
fn parse_unfreeze_schedule(text: &str) -> Result<Vec<UnfreezePhase>> {
    let bad = |part: &str, why: &str| {
        Error::Invalid(format!(
            "unfreeze_schedule {text:?}: phase {part:?} {why}; write phases as WHAT:EPOCHS separated by commas, WHAT being head, topN or all (e.g. \"head:1,top2:1,all:1\")"
        ))
    };
    text.split(',')
        .map(|part| {
            let part = part.trim();
            let (what, epochs) = part
                .split_once(':')
                .ok_or_else(|| bad(part, "has no \":EPOCHS\""))?;
            let epochs: usize = epochs
                .trim()
                .parse()
                .ok()
                .filter(|&e| e > 0)
                .ok_or_else(|| bad(part, "needs a whole number of epochs, at least 1"))?;
            let trainable = match what.trim() {
                "head" => Unfrozen::Head,
                "all" => Unfrozen::All,
                top => match top.strip_prefix("top").map(str::parse::<usize>) {
                    Some(Ok(n)) if n > 0 => Unfrozen::Top(n),
                    _ => return Err(bad(part, "does not name head, topN (N >= 1) or all")),
                },
            };
            Ok(UnfreezePhase { trainable, epochs })
        })
        .collect()
}

mod defaults {
    use crate::model::Pooling;
    use crate::train::recipe::Task;
    pub fn text_column() -> String {
        "text".into()
    }
    pub fn label_column() -> String {
        "label".into()
    }
    pub fn tokens_column() -> String {
        "tokens".into()
    }
    pub fn tags_column() -> String {
        "tags".into()
    }
    pub fn epochs() -> usize {
        3
    }
    pub fn batch_size() -> usize {
        16
    }
    pub fn one() -> usize {
        1
    }
    pub fn lr() -> f32 {
        3e-5
    }
    pub fn warmup_ratio() -> f32 {
        0.1
    }
    pub fn weight_decay() -> f32 {
        0.01
    }
    pub fn max_grad_norm() -> f32 {
        1.0
    }
    pub fn adam_beta1() -> f32 {
        0.9
    }
    pub fn adam_beta2() -> f32 {
        0.999
    }
    pub fn adam_eps() -> f32 {
        1e-8
    }
    pub fn max_length() -> usize {
        128
    }
    pub fn pooling() -> Pooling {
        Pooling::Pooler
    }
    pub fn head_dropout() -> f32 {
        0.1
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn task() -> Task {
        Task::Classification
    }
    pub fn yes() -> bool {
        true
    }
    pub fn label_delimiter() -> String {
        "|".into()
    }
}

impl TrainRecipe {
    /// The recipe from an optional TOML file overlaid with command-line
    /// settings (`overrides`: a JSON object of the flags given; absent flags
    /// are left out or null).
    pub fn resolve(toml_file: Option<&Path>, overrides: serde_json::Value) -> Result<Self> {
        let mut merged = serde_json::Map::new();
        if let Some(path) = toml_file {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
                path: path.into(),
                message: e.to_string(),
            })?;
            let json = serde_json::to_value(table).map_err(|e| Error::Config {
                path: path.into(),
                message: e.to_string(),
            })?;
            merged.extend(json.as_object().cloned().unwrap_or_default());
        }
        if let serde_json::Value::Object(flags) = overrides {
            merged.extend(flags.into_iter().filter(|(_, v)| !v.is_null()));
        }
        let recipe: TrainRecipe = serde_json::from_value(merged.into()).map_err(|e| {
            let source = toml_file.map_or("the command line".to_string(), |p| {
                format!("{} and the command line", p.display())
            });
            Error::Invalid(format!("training settings from {source}: {e}"))
        })?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// The selection metric, defaulted per task.
    pub fn selection_metric(&self) -> Metric {
        self.metric.unwrap_or(match self.task {
            Task::Classification => Metric::MacroF1,
            Task::Regression => Metric::Pearson,
            Task::MultiLabel => Metric::MicroF1,
            Task::TokenClassification => Metric::EntityF1,
        })
    }

    /// Token classification: which subwords carry a word's tag.
    pub fn alignment(&self) -> Alignment {
        if self.label_all_subwords {
            Alignment::AllSubwords
        } else {
            Alignment::FirstSubword
        }
    }

    /// The LoRA adapters to train, if any: alpha defaults to twice the rank
    /// (scale 2 whatever the rank, so a learning rate tuned at one rank
    /// carries over to another), the targets to PEFT's BERT default.
    pub fn lora(&self) -> Option<LoraSpec> {
        (self.lora_rank > 0).then(|| LoraSpec {
            rank: self.lora_rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f32),
            targets: self
                .lora_targets
                .clone()
                .unwrap_or_else(|| LoraTarget::DEFAULT.to_vec()),
        })
    }

    /// The gradual-unfreezing phases, if a schedule is set (checked when
    /// the recipe was resolved).
    pub fn unfreeze_phases(&self) -> Result<Option<Vec<UnfreezePhase>>> {
        self.unfreeze_schedule
            .as_deref()
            .map(parse_unfreeze_schedule)
            .transpose()
    }

    fn validate(&self) -> Result<()> {
        let check = |ok: bool, message: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Invalid(message.into()))
            }
        };
        check(self.epochs > 0, "epochs must be at least 1")?;
        check(self.batch_size > 0, "batch_size must be at least 1")?;
        check(self.grad_accum > 0, "grad_accum must be at least 1")?;
        check(self.lr > 0.0 && self.lr.is_finite(), "lr must be positive")?;
        check(
            (0.0..1.0).contains(&self.warmup_ratio),
            "warmup_ratio must be in [0, 1)",
        )?;
        check(self.weight_decay >= 0.0, "weight_decay must be >= 0")?;
        check(self.max_grad_norm > 0.0, "max_grad_norm must be positive")?;
        check(
            (0.0..1.0).contains(&self.head_dropout),
            "head_dropout must be in [0, 1)",
        )?;
        check_room_for_text(self.max_length, "max_length (--max-length)")?;
        check(self.eval_every != Some(0), "eval_every must be at least 1")?;
        check(self.patience != Some(0), "patience must be at least 1")?;
        check(
            self.layer_lr_decay.is_none_or(|d| d > 0.0 && d <= 1.0),
            "layer_lr_decay must be in (0, 1]",
        )?;
        check(
            self.head_lr.is_none_or(|lr| lr > 0.0),
            "head_lr must be positive",
        )?;
        check(
            self.selection_metric().fits(self.task),
            "metric does not fit the task (classification: macro_f1, accuracy, loss; multi-label: micro_f1, macro_f1, loss; regression: pearson, spearman, rmse, loss; token-classification: entity_f1, loss)",
        )?;
        check(
            self.task == Task::Classification || self.class_weights.is_none(),
            "class_weights apply to classification only",
        )?;
        check(
            self.focal_gamma >= 0.0 && self.focal_gamma.is_finite(),
            "focal_gamma must be >= 0",
        )?;
        check(
            self.task == Task::Classification || self.focal_gamma == 0.0,
            "focal_gamma applies to classification only",
        )?;
        check(
            self.task == Task::TokenClassification || !self.label_all_subwords,
            "label_all_subwords applies to token-classification only",
        )?;
        check(
            self.task != Task::TokenClassification || self.text_pair_column.is_none(),
            "token-classification reads words and tags, not text pairs; drop text_pair_column",
        )?;
        check(
            !self.label_delimiter.is_empty(),
            "label_delimiter must not be empty",
        )?;
        if self.unfreeze_phases()?.is_some() {
            check(
                !self.head_only && !self.freeze_embeddings && self.freeze_bottom == 0,
                "unfreeze_schedule decides what trains in each phase; drop head_only, freeze_embeddings and freeze_bottom",
            )?;
        }
        self.validate_lora()
    }

    /// LoRA settings: only with a rank, and not with the settings that
    /// decide which base parameters train (LoRA freezes them all).
    fn validate_lora(&self) -> Result<()> {
        let check = |ok: bool, message: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Invalid(message.into()))
            }
        };
        if self.lora_rank == 0 {
            return check(
                self.lora_alpha.is_none() && self.lora_targets.is_none() && !self.merge_lora,
                "lora_alpha, lora_targets and merge_lora need lora_rank (at least 1)",
            );
        }
        check(
            self.lora_alpha.is_none_or(|a| a > 0.0 && a.is_finite()),
            "lora_alpha must be positive",
        )?;
        if let Some(targets) = &self.lora_targets {
            check(
                !targets.is_empty(),
                "lora_targets must name at least one of query, key, value, dense, intermediate, output",
            )?;
            let mut unique = targets.clone();
            unique.sort();
            unique.dedup();
            check(
                unique.len() == targets.len(),
                "lora_targets names a linear twice",
            )?;
        }
        check(
            !self.head_only && self.freeze_bottom == 0 && self.unfreeze_schedule.is_none(),
            "lora_rank freezes the whole base model and trains adapters on every layer; drop head_only, freeze_bottom and unfreeze_schedule",
        )?;
        check(
            self.layer_lr_decay.is_none(),
            "layer_lr_decay scales the learning rates of base layers, which lora_rank freezes; drop it (head_lr still sets the head's)",
        )
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear
/// warm-up over `warmup` steps, then linear decay to 0 at the last step.
/// Step `s` uses the value at `s + 1`, so no step is spent at lr 0.
pub fn linear_schedule(base_lr: f32, step: usize, warmup: usize, total: usize) -> f32 {
    if step < warmup {
        base_lr * (step + 1) as f32 / warmup as f32
    } else {
        let span = total.saturating_sub(warmup).max(1) as f32;
        base_lr * total.saturating_sub(step) as f32 / span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lrs: Vec<f32> = (0..10).map(|s| linear_schedule(1.0, s, 2, 10)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert!(lrs[2..].windows(2).all(|w| w[1] < w[0]));
        assert!((lrs[9] - 1.0 / 8.0).abs() < 1e-6);
    }

    #[test]
    fn command_line_overrides_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.toml");
        std::fs::write(&path, "model = \"m\"\ntrain = \"t.csv\"\nvalid = \"v.csv\"\nout = \"o\"\nlr = 1e-4\nepochs = 5\n")
            .unwrap();
        let recipe =
            TrainRecipe::resolve(Some(&path), serde_json::json!({"epochs": 2, "lr": null}))
                .unwrap();
        assert_eq!(recipe.epochs, 2);
        assert_eq!(recipe.lr, 1e-4);
        assert_eq!(recipe.batch_size, 16);

        std::fs::write(&path, "model = \"m\"\nlearning_rate = 1\n").unwrap();
        let err = TrainRecipe::resolve(Some(&path), serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("learning_rate"), "{err}");
    }
}
