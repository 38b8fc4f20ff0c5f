//! The fine-tuning loop: data in, the best checkpoint (by dev metric) out as
//! a calibrated artifact.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::artifact::{
    self, Artifact, ArtifactMeta, Calibration, DataFile, Preprocessing, ProblemType, Thresholds,
};
use crate::backend::train::{AdamW, TrainBackend};
use crate::backend::Precision;
use crate::classify::argmax;
use crate::config::BertConfig;
use crate::data::{self, Alignment, DataSpec, Dataset, LabelSet, TagSet, TagSpec};
use crate::error::{Error, Result};
use crate::eval::calibration::{
    expected_calibration_error, fit_temperature, nll, sigmoid, softmax_with_temperature,
};
use crate::eval::thresholds::{self, Counts, DEFAULT_THRESHOLD};
use crate::eval::{ClassificationReport, EntityReport, MultiLabelReport, RegressionReport};
use crate::lora::{self, AdapterBase};
use crate::model::{ModelFiles, TokenBatch};
use crate::rng;
use crate::tokenize::{BertTokenizer, Encoded};
use crate::train::classifier::{ForwardMode, Group, SequenceClassifier, Targets};
use crate::train::loss;
use crate::train::loss_scale::{LossScaleConfig, LossScaler, StepOutcome};
use crate::train::progress::Progress;
use crate::train::recipe::{linear_schedule, Metric, Task, TrainRecipe, UnfreezePhase, Unfrozen};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub steps: usize,
    pub best: serde_json::Value,
    pub samples_per_second: f64,
    pub stopped_early: bool,
    /// fp16: optimizer steps skipped for inf/NaN gradients (None for
    /// fp32 and bf16, which never skip).
    pub skipped_steps: Option<u64>,
}

/// The gold answers of a split.
enum Gold {
    /// Label ids, for classification.
    Classes(Vec<usize>),
    /// Multi-label: `[examples, labels]` of 0 or 1.
    LabelSets { multi_hot: Vec<f32>, labels: usize },
    /// Numbers, for regression.
    Values(Vec<f32>),
    /// Token classification, per sentence.
    Tags {
        /// Each token's training label (None: ignored by the loss).
        token_labels: Vec<Vec<Option<usize>>>,
        /// Each word's gold tag id.
        word_tags: Vec<Vec<usize>>,
        /// Each word's first token (None: truncated away or no token).
        first_subwords: Vec<Vec<Option<usize>>>,
    },
}

impl Gold {
    /// Multi-hot rows from each example's label indices.
    fn label_sets(sets: Vec<Vec<usize>>, labels: usize) -> Self {
        let mut multi_hot = vec![0.0; sets.len() * labels];
        for (row, set) in multi_hot.chunks_exact_mut(labels.max(1)).zip(&sets) {
            set.iter().for_each(|&l| row[l] = 1.0);
        }
        Gold::LabelSets { multi_hot, labels }
    }
}

/// A tokenized split with its gold answers.
struct Split {
    record: DataFile,
    encoded: Vec<Encoded>,
    gold: Gold,
}

impl Split {
    fn load(
        path: &Path,
        spec: &DataSpec,
        tokenizer: &BertTokenizer,
        gold: impl FnOnce(&Dataset) -> Result<Gold>,
    ) -> Result<Self> {
        let dataset = data::read_dataset(path, spec)?;
        let gold = gold(&dataset)?;
        let encoded = if spec.text_pair_column.is_some() {
            let pairs: Vec<(&str, &str)> = dataset
                .examples
                .iter()
                .map(|e| (e.text.as_str(), e.text_pair.as_deref().unwrap_or("")))
                .collect();
            tokenizer.encode_pair_batch(&pairs)?
        } else {
            let texts: Vec<&str> = dataset.examples.iter().map(|e| e.text.as_str()).collect();
            tokenizer.encode_batch(&texts)?
        };
        Ok(Split {
            record: DataFile {
                path: dataset.path,
                sha256: dataset.sha256,
                examples: dataset.examples.len(),
                skipped: dataset.skipped,
            },
            encoded,
            gold,
        })
    }

    /// A tagged split (token classification): words tokenized with their
    /// word index per token, tags aligned to subwords.
    fn load_tagged(
        path: &Path,
        spec: &TagSpec,
        tokenizer: &BertTokenizer,
        tag_set: impl FnOnce(&data::TaggedDataset) -> TagSet,
        alignment: Alignment,
    ) -> Result<(Self, TagSet)> {
        let dataset = data::read_tagged(path, spec)?;
        let tag_set = tag_set(&dataset);
        let word_tags = tag_set.encode(&dataset)?;
        let words: Vec<Vec<&str>> = dataset
            .sentences
            .iter()
            .map(|s| s.words.iter().map(String::as_str).collect())
            .collect();
        let tokenized = tokenizer.encode_words_batch(&words)?;
        let token_labels = tokenized
            .iter()
            .zip(&word_tags)
            .map(|(t, tags)| data::align_tags(&t.word_ids, tags, &tag_set, alignment))
            .collect();
        let first_subwords = tokenized
            .iter()
            .zip(&word_tags)
            .map(|(t, tags)| data::first_subwords(&t.word_ids, tags.len()))
            .collect();
        let split = Split {
            record: DataFile {
                path: dataset.path,
                sha256: dataset.sha256,
                examples: dataset.sentences.len(),
                skipped: 0,
            },
            encoded: tokenized.into_iter().map(|t| t.encoded).collect(),
            gold: Gold::Tags {
                token_labels,
                word_tags,
                first_subwords,
            },
        };
        Ok((split, tag_set))
    }

    fn lengths(&self) -> Vec<usize> {
        self.encoded.iter().map(|e| e.ids.len()).collect()
    }

    fn tokens(&self, indices: &[usize]) -> TokenBatch {
        TokenBatch::from_encoded(indices.iter().map(|&i| &self.encoded[i]))
    }

    /// The gold answers of `indices`, owned, for [`BatchGold::targets`].
    fn batch_gold(&self, indices: &[usize]) -> BatchGold {
        match &self.gold {
            Gold::Classes(labels) => {
                BatchGold::Classes(indices.iter().map(|&i| labels[i]).collect())
            }
            Gold::LabelSets { multi_hot, labels } => BatchGold::MultiHot(
                indices
                    .iter()
                    .flat_map(|&i| &multi_hot[i * labels..(i + 1) * labels])
                    .copied()
                    .collect(),
            ),
            Gold::Values(values) => BatchGold::Values(indices.iter().map(|&i| values[i]).collect()),
            // Packed like the batch's tokens: sequence after sequence.
            Gold::Tags { token_labels, .. } => BatchGold::Tokens(
                indices
                    .iter()
                    .flat_map(|&i| &token_labels[i])
                    .copied()
                    .collect(),
            ),
        }
    }
}

enum BatchGold {
    Classes(Vec<usize>),
    MultiHot(Vec<f32>),
    Values(Vec<f32>),
    Tokens(Vec<Option<usize>>),
}

/// The loss settings of single-label classification.
#[derive(Clone, Copy)]
struct ClassLoss<'a> {
    class_weights: Option<&'a [f32]>,
    /// 0: cross-entropy (the backend's op, so `--focal-gamma 0` trains
    /// exactly as without it).
    focal_gamma: f32,
}

impl BatchGold {
    /// How many terms the batch's loss averages: examples, or labeled
    /// tokens for token classification.
    fn loss_terms(&self) -> usize {
        match self {
            BatchGold::Classes(labels) => labels.len(),
            BatchGold::Values(values) => values.len(),
            // Examples x labels: the same share as examples alone.
            BatchGold::MultiHot(targets) => targets.len(),
            BatchGold::Tokens(labels) => labels.iter().flatten().count(),
        }
    }

    fn targets<'a>(&'a self, loss: ClassLoss<'a>) -> Targets<'a> {
        match self {
            BatchGold::Classes(labels) if loss.focal_gamma > 0.0 => Targets::Focal {
                labels,
                class_weights: loss.class_weights,
                gamma: loss.focal_gamma,
            },
            BatchGold::Classes(labels) => Targets::Classes {
                labels,
                class_weights: loss.class_weights,
            },
            BatchGold::MultiHot(targets) => Targets::MultiHot(targets),
            BatchGold::Values(values) => Targets::Values(values),
            BatchGold::Tokens(labels) => Targets::Tokens(labels),
        }
    }
}

/// Dev-set evaluation of the current parameters.
pub struct Evaluation {
    pub loss: f64,
    pub report: Report,
    /// `[examples, outputs]`, in dev order (empty for token
    /// classification, whose per-token logits are scored batch by batch).
    pub logits: Vec<f32>,
}

pub enum Report {
    Classification(ClassificationReport),
    MultiLabel(MultiLabelReport),
    Regression(RegressionReport),
    Entities(EntityReport),
}

impl Evaluation {
    fn score(&self, metric: Metric) -> f64 {
        match (&self.report, metric) {
            (_, Metric::Loss) => -self.loss,
            (Report::Classification(r), Metric::MacroF1) => r.macro_f1,
            (Report::Classification(r), Metric::Accuracy) => r.accuracy,
            (Report::MultiLabel(r), Metric::MicroF1) => r.micro_f1,
            (Report::MultiLabel(r), Metric::MacroF1) => r.macro_f1,
            (Report::Regression(r), Metric::Pearson) => r.pearson,
            (Report::Regression(r), Metric::Spearman) => r.spearman,
            (Report::Regression(r), Metric::Rmse) => -r.rmse,
            (Report::Entities(r), Metric::EntityF1) => r.overall.f1,
            _ => unreachable!("the recipe checks that the metric fits the task"),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut json = match &self.report {
            Report::Classification(r) => classification_summary(r),
            Report::MultiLabel(r) => multi_label_summary(r),
            Report::Regression(r) => serde_json::json!({
                "rmse": r.rmse,
                "mae": r.mae,
                "pearson": r.pearson,
                "spearman": r.spearman,
            }),
            Report::Entities(r) => r.summary_json(),
        };
        json["loss"] = self.loss.into();
        json
    }

    fn summary(&self) -> String {
        match &self.report {
            Report::Classification(r) => format!(
                "loss {:.4} accuracy {:.4} macro_f1 {:.4}",
                self.loss, r.accuracy, r.macro_f1
            ),
            Report::MultiLabel(r) => format!(
                "loss {:.4} micro_f1 {:.4} macro_f1 {:.4}",
                self.loss, r.micro_f1, r.macro_f1
            ),
            Report::Regression(r) => format!(
                "loss {:.4} rmse {:.4} pearson {:.4} spearman {:.4}",
                self.loss, r.rmse, r.pearson, r.spearman
            ),
            Report::Entities(r) => format!(
                "loss {:.4} entity_f1 {:.4} precision {:.4} recall {:.4}",
                self.loss, r.overall.f1, r.overall.precision, r.overall.recall
            ),
        }
    }
}

fn classification_summary(r: &ClassificationReport) -> serde_json::Value {
    serde_json::json!({
        "accuracy": r.accuracy,
        "macro_f1": r.macro_f1,
        "weighted_f1": r.weighted_f1,
    })
}

fn multi_label_summary(r: &MultiLabelReport) -> serde_json::Value {
    serde_json::json!({
        "micro_f1": r.micro_f1,
        "macro_f1": r.macro_f1,
        "micro_precision": r.micro_precision,
        "micro_recall": r.micro_recall,
        "subset_accuracy": r.subset_accuracy,
    })
}

/// Sigmoid probabilities of multi-label logits.
fn label_probabilities(logits: &[f32]) -> Vec<f32> {
    logits.iter().map(|&z| sigmoid(z as f64) as f32).collect()
}

/// Per-label decision thresholds for multi-label dev probabilities and
/// gold flags (`[examples, labels]`): each label's dev F1 maximum, or 0.5
/// everywhere when `tune` is off.
fn label_thresholds(probs: &[f32], gold: &[bool], labels: usize, tune: bool) -> Vec<f32> {
    (0..labels)
        .map(|l| {
            if !tune {
                return DEFAULT_THRESHOLD;
            }
            thresholds::tune(
                &column(probs, l, labels),
                &column(gold, l, labels),
                Counts::f1,
            )
            .threshold
        })
        .collect()
}

fn multi_label_report(
    probs: &[f32],
    gold: &[bool],
    thresholds: &[f32],
    label_names: &[String],
) -> MultiLabelReport {
    let predicted: Vec<bool> = probs
        .iter()
        .enumerate()
        .map(|(i, &p)| p >= thresholds[i % thresholds.len()])
        .collect();
    MultiLabelReport::compute(label_names, gold, &predicted)
}

fn evaluate<B: TrainBackend>(
    model: &mut SequenceClassifier<B>,
    split: &Split,
    label_names: &[String],
    batch_size: usize,
    tune_thresholds: bool,
) -> Result<Evaluation> {
    if let Gold::Tags {
        token_labels,
        word_tags,
        first_subwords,
    } = &split.gold
    {
        return evaluate_tags(
            model,
            split,
            TagGold {
                token_labels,
                word_tags,
                first_subwords,
            },
            label_names,
            batch_size,
        );
    }
    let outputs = model.num_labels;
    let mut logits = vec![0.0f32; split.encoded.len() * outputs];
    for indices in data::eval_batches(&split.lengths(), batch_size) {
        let batch_logits =
            model.forward(&split.tokens(&indices), ForwardMode { dropout_seed: None })?;
        for (row, &i) in batch_logits.chunks_exact(outputs).zip(&indices) {
            logits[i * outputs..(i + 1) * outputs].copy_from_slice(row);
        }
    }
    Ok(match &split.gold {
        Gold::Classes(labels) => {
            let predictions: Vec<usize> = logits.chunks_exact(outputs).map(argmax).collect();
            Evaluation {
                loss: nll(&logits, outputs, labels, 1.0),
                report: Report::Classification(ClassificationReport::compute(
                    label_names,
                    labels,
                    &predictions,
                )),
                logits,
            }
        }
        Gold::LabelSets { multi_hot, labels } => {
            let mut scratch = vec![0.0; logits.len()];
            let loss = loss::bce_with_logits(&mut scratch, &logits, multi_hot) as f64;
            let gold: Vec<bool> = multi_hot.iter().map(|&y| y > 0.5).collect();
            // Scored with the thresholds this checkpoint would be saved
            // with: at a fixed 0.5, rare labels score 0 for many epochs and
            // checkpoints could not be told apart.
            let probs = label_probabilities(&logits);
            let thresholds = label_thresholds(&probs, &gold, *labels, tune_thresholds);
            Evaluation {
                loss,
                report: Report::MultiLabel(multi_label_report(
                    &probs,
                    &gold,
                    &thresholds,
                    label_names,
                )),
                logits,
            }
        }
        Gold::Values(values) => {
            let report = RegressionReport::compute(values, &logits);
            Evaluation {
                loss: report.rmse.powi(2),
                report: Report::Regression(report),
                logits,
            }
        }
        Gold::Tags { .. } => unreachable!("scored by evaluate_tags"),
    })
}

/// The parts of [`Gold::Tags`].
struct TagGold<'a> {
    token_labels: &'a [Vec<Option<usize>>],
    word_tags: &'a [Vec<usize>],
    first_subwords: &'a [Vec<Option<usize>>],
}

/// Token classification on dev: the loss over labeled tokens and entity
/// scores of each word's tag read at its first subword (a word without a
/// token, cut off by truncation, is predicted `O`).
fn evaluate_tags<B: TrainBackend>(
    model: &mut SequenceClassifier<B>,
    split: &Split,
    gold: TagGold,
    label_names: &[String],
    batch_size: usize,
) -> Result<Evaluation> {
    let classes = model.num_labels;
    let mut predicted: Vec<Vec<&str>> = vec![Vec::new(); split.encoded.len()];
    let (mut loss_sum, mut labeled) = (0.0f64, 0usize);
    for indices in data::eval_batches(&split.lengths(), batch_size) {
        let batch = split.tokens(&indices);
        let logits = model.forward(&batch, ForwardMode { dropout_seed: None })?;
        let labels: Vec<Option<usize>> = indices
            .iter()
            .flat_map(|&i| &gold.token_labels[i])
            .copied()
            .collect();
        let batch_labeled = labels.iter().flatten().count();
        let mut scratch = vec![0.0; logits.len()];
        let batch_loss = loss::token_cross_entropy(&mut scratch, &logits, &labels, classes);
        loss_sum += batch_loss as f64 * batch_labeled as f64;
        labeled += batch_labeled;
        for (k, &i) in indices.iter().enumerate() {
            let sequence = &logits[batch.offsets[k] * classes..batch.offsets[k + 1] * classes];
            predicted[i] = gold.first_subwords[i]
                .iter()
                .map(|first| match first {
                    Some(p) => {
                        label_names[argmax(&sequence[p * classes..(p + 1) * classes])].as_str()
                    }
                    None => "O",
                })
                .collect();
        }
    }
    let gold_tags: Vec<Vec<&str>> = gold
        .word_tags
        .iter()
        .map(|tags| tags.iter().map(|&t| label_names[t].as_str()).collect())
        .collect();
    Ok(Evaluation {
        loss: loss_sum / labeled.max(1) as f64,
        report: Report::Entities(EntityReport::compute(&gold_tags, &predicted)),
        logits: Vec::new(),
    })
}

/// Appends JSON lines to `<out>.metrics.jsonl` while training; each saved
/// artifact carries a copy.
struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    fn create(out: &Path) -> Result<Self> {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".metrics.jsonl");
        let path = out.with_file_name(name);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    fn write(&mut self, line: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))
    }

    fn contents(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.path).map_err(|e| Error::io(&self.path, e))
    }
}

/// Whether training goes on after an evaluation.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    StopEarly,
}

/// Everything a run keeps between steps.
struct Trainer<'a, B: TrainBackend> {
    recipe: &'a TrainRecipe,
    model: SequenceClassifier<B>,
    train: Split,
    valid: Split,
    label_names: Vec<String>,
    problem_type: ProblemType,
    class_weights: Option<Vec<f32>>,
    tokenizer: BertTokenizer,
    base_config: serde_json::Value,
    /// LoRA adapters saved apart from their base: the base model.
    adapter_base: Option<AdapterBase>,
    recipe_json: serde_json::Value,
    data_records: BTreeMap<String, DataFile>,
    log: MetricsLog,
    progress: Progress,
    steps_per_epoch: usize,
    best_score: f64,
    best: serde_json::Value,
    evals_without_improvement: usize,
    /// Optimizer steps so far, over all phases (skipped ones included).
    step: usize,
    samples_seen: usize,
    /// fp16's dynamic loss scale; disabled (scale 1) otherwise. One for the
    /// whole run, as a `GradScaler` outlives optimizer restarts.
    loss_scaler: LossScaler,
}

/// What to do with one step's gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
enum GradStep {
    /// Multiply the gradients by `grad_factor` (the loss scale undone and
    /// the clipping in one pass; 1: leave them) and apply AdamW.
    /// `grad_norm` is the true (unscaled, unclipped) norm.
    Apply { grad_norm: f64, grad_factor: f32 },
    /// fp16 overflow: no update this step; the loss scale backs off from
    /// `scale` to `new_scale`.
    Skip { scale: f32, new_scale: f32 },
    /// A non-finite loss or gradient that no loss scale explains (fp32 and
    /// bf16, or fp16 already at its minimum scale): training cannot go on.
    Stop,
}

/// Decides a step from its loss and the norm of its gradients as backward
/// left them (times the loss scale), and updates `scaler`. As with
/// PyTorch's `GradScaler`, only the gradients decide whether an fp16 step
/// is skipped.
fn grad_step(
    scaler: &mut LossScaler,
    loss: f32,
    scaled_grad_norm: f64,
    max_grad_norm: f32,
) -> GradStep {
    let found_inf = !scaled_grad_norm.is_finite();
    if !scaler.enabled() && (found_inf || !loss.is_finite()) {
        return GradStep::Stop;
    }
    // The scale this step ran at: `update` may grow it for the next one.
    let inv_scale = scaler.inv_scale() as f64;
    match scaler.update(found_inf) {
        StepOutcome::Skipped { at_floor: true, .. } => GradStep::Stop,
        StepOutcome::Skipped {
            scale, new_scale, ..
        } => GradStep::Skip { scale, new_scale },
        StepOutcome::Applied { .. } => {
            let grad_norm = scaled_grad_norm * inv_scale;
            let clip = if grad_norm > max_grad_norm as f64 {
                max_grad_norm as f64 / grad_norm
            } else {
                1.0
            };
            GradStep::Apply {
                grad_norm,
                grad_factor: (inv_scale * clip) as f32,
            }
        }
    }
}

/// Why training into `out` stopped at `step` (0-based) of `epoch` on a
/// non-finite loss or gradient; `loss_scaled`: fp16 that overflowed at the
/// minimum loss scale.
fn non_finite_error(out: &Path, loss_scaled: bool, loss: f32, step: usize, epoch: usize) -> Error {
    let what = if loss.is_finite() || loss_scaled {
        "gradient"
    } else {
        "loss"
    };
    let (at_floor, bf16_hint) = if loss_scaled {
        (", even at the minimum loss scale", ", or --precision bf16")
    } else {
        ("", "")
    };
    Error::Invalid(format!(
        "non-finite {what} at step {} (epoch {}){at_floor}; training stopped. The last good checkpoint in {} is intact. Try a lower --lr or --max-grad-norm{bf16_hint}.",
        step + 1,
        epoch + 1,
        out.display(),
    ))
}

impl<B: TrainBackend> Trainer<'_, B> {
    /// Trains for `epochs` epochs from epoch `first_epoch` with one
    /// warm-up and decay (a whole run, or one phase of gradual unfreezing);
    /// returns the dev score of the last evaluation, or None if training
    /// stopped early.
    fn run_phase(&mut self, epochs: usize, first_epoch: usize) -> Result<Option<f64>> {
        let recipe = self.recipe;
        let phase_steps = self.steps_per_epoch * epochs;
        let warmup = (recipe.warmup_ratio * phase_steps as f32).ceil() as usize;
        // Owned: the loop below also borrows `self` mutably.
        let class_weights = self.class_weights.clone();
        let class_loss = ClassLoss {
            class_weights: class_weights.as_deref(),
            focal_gamma: recipe.focal_gamma,
        };
        let mut last_score = None;
        let mut phase_step = 0;
        // AdamW's bias correction counts the updates it made, as PyTorch's
        // optimizer state does: fp16's skipped steps are not among them.
        let mut updates = 0;
        for epoch in first_epoch..first_epoch + epochs {
            let batches = data::epoch_batches(
                &self.train.lengths(),
                recipe.batch_size,
                recipe.seed,
                epoch,
                recipe.bucket_by_length,
            );
            for group in batches.chunks(recipe.grad_accum) {
                let step_started = Instant::now();
                let step = self.step;
                let group_examples: usize = group.iter().map(Vec::len).sum();
                let golds: Vec<BatchGold> =
                    group.iter().map(|i| self.train.batch_gold(i)).collect();
                let group_weight: usize = golds.iter().map(BatchGold::loss_terms).sum();
                let model = &mut self.model;
                model.params.zero_grads(&model.backend);
                let loss_scale = self.loss_scaler.scale();
                let mut loss = 0.0f32;
                for (micro, (indices, gold)) in group.iter().zip(&golds).enumerate() {
                    let batch = self.train.tokens(indices);
                    let dropout_seed =
                        rng::derive_seed(recipe.seed, (step * recipe.grad_accum + micro) as u64);
                    model.forward(
                        &batch,
                        ForwardMode {
                            dropout_seed: Some(dropout_seed),
                        },
                    )?;
                    // Each micro-batch's loss is a mean over its terms: weighted
                    // by their count, the sum is the mean over the whole group.
                    let share = gold.loss_terms() as f32 / group_weight.max(1) as f32;
                    loss += share
                        * model.backward(&batch, gold.targets(class_loss), share * loss_scale);
                }
                let scaled_grad_norm = model.params.grad_norm(&model.backend);
                // The schedule follows the step count, skipped fp16 steps
                // included, as a PyTorch loop calling scheduler.step() every
                // step does (the Hugging Face Trainer holds it instead): the
                // decay still ends at 0 on the last step.
                let lr = linear_schedule(recipe.lr, phase_step, warmup, phase_steps);
                let grad_norm = match grad_step(
                    &mut self.loss_scaler,
                    loss,
                    scaled_grad_norm,
                    recipe.max_grad_norm,
                ) {
                    GradStep::Stop => {
                        return Err(non_finite_error(
                            &recipe.out,
                            self.loss_scaler.enabled(),
                            loss,
                            step,
                            epoch,
                        ));
                    }
                    GradStep::Skip { scale, new_scale } => {
                        self.progress.message(&format!(
                            "step {}: inf/NaN gradients at loss scale {scale}; update skipped, loss scale now {new_scale}",
                            step + 1
                        ));
                        None
                    }
                    GradStep::Apply {
                        grad_norm,
                        grad_factor,
                    } => {
                        if grad_factor != 1.0 {
                            model.params.scale_grads(&model.backend, grad_factor);
                        }
                        updates += 1;
                        model.params.adamw_step(
                            &model.backend,
                            AdamW {
                                lr,
                                beta1: recipe.adam_beta1,
                                beta2: recipe.adam_beta2,
                                eps: recipe.adam_eps,
                                weight_decay: recipe.weight_decay,
                                step: updates,
                            },
                        );
                        Some(grad_norm)
                    }
                };
                self.samples_seen += group_examples;
                let samples_per_s = group_examples as f64 / step_started.elapsed().as_secs_f64();
                let steps_per_epoch = self.steps_per_epoch;
                let mut record = serde_json::json!({
                    "step": step + 1,
                    "epoch": epoch as f64 + (step % steps_per_epoch + 1) as f64 / steps_per_epoch as f64,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "samples_per_s": samples_per_s,
                });
                if self.loss_scaler.enabled() {
                    record["loss_scale"] = loss_scale.into();
                    record["skipped"] = grad_norm.is_none().into();
                }
                self.log.write(record)?;
                self.progress.step(step, epoch + 1, loss, lr, samples_per_s);
                self.step += 1;
                phase_step += 1;

                let end_of_epoch = self.step.is_multiple_of(steps_per_epoch);
                let scheduled = recipe
                    .eval_every
                    .is_some_and(|n| self.step.is_multiple_of(n));
                if end_of_epoch || scheduled {
                    let (score, flow) = self.evaluate_and_keep_best(epoch + 1)?;
                    last_score = Some(score);
                    if flow == Flow::StopEarly {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(last_score)
    }

    /// Evaluates on dev, saves the model if it is the best so far, and
    /// applies `--patience`; returns the dev score.
    fn evaluate_and_keep_best(&mut self, epoch: usize) -> Result<(f64, Flow)> {
        let recipe = self.recipe;
        let evaluation = evaluate(
            &mut self.model,
            &self.valid,
            &self.label_names,
            recipe.batch_size * 2,
            recipe.tune_thresholds,
        )?;
        let metric = recipe.selection_metric();
        let score = evaluation.score(metric);
        let improved = score > self.best_score;
        let step = self.step;
        self.log.write(serde_json::json!({"step": step, "epoch": epoch, "eval": evaluation.to_json(), "improved": improved}))?;
        self.progress.message(&format!(
            "eval at step {step}: {}{}",
            evaluation.summary(),
            if improved { " (best, saved)" } else { "" }
        ));
        if improved {
            self.best_score = score;
            self.evals_without_improvement = 0;
            self.save(&evaluation, epoch)?;
            return Ok((score, Flow::Continue));
        }
        self.evals_without_improvement += 1;
        if recipe
            .patience
            .is_some_and(|p| self.evals_without_improvement >= p)
        {
            self.progress.message(&format!(
                "early stop: no improvement in {} evaluations",
                self.evals_without_improvement
            ));
            return Ok((score, Flow::StopEarly));
        }
        Ok((score, Flow::Continue))
    }

    /// Writes the current model, calibrated and with tuned thresholds.
    fn save(&mut self, evaluation: &Evaluation, epoch: usize) -> Result<()> {
        let recipe = self.recipe;
        let metric = recipe.selection_metric();
        let meta = ArtifactMeta {
            format_version: artifact::FORMAT_VERSION_WITHOUT_THRESHOLDS,
            bertrt_version: crate::VERSION.into(),
            task: self.problem_type.task().into(),
            labels: self.label_names.clone(),
            preprocessing: Preprocessing {
                max_length: recipe.max_length,
                truncation_side: "right".into(),
                truncation_strategy: "longest_first".into(),
                lowercase: self.tokenizer.lowercase(),
                pooling: recipe.pooling,
                text_pair: recipe.text_pair_column.is_some(),
                label_alignment: (recipe.task == Task::TokenClassification)
                    .then(|| recipe.alignment()),
            },
            temperature: 1.0,
            calibration: None,
            thresholds: None,
            recipe: self.recipe_json.clone(),
            data: self.data_records.clone(),
            best: serde_json::Value::Null,
            adapter_base: self.adapter_base.clone(),
        };
        let meta = match &self.valid.gold {
            Gold::Classes(labels) if recipe.calibrate => calibrated(meta, evaluation, labels),
            _ => meta,
        };
        let thresholds = decision_thresholds(
            evaluation,
            &self.valid.gold,
            &self.label_names,
            meta.temperature,
            metric,
            recipe.tune_thresholds,
        );
        let mut best = serde_json::json!({"step": self.step, "epoch": epoch, "metric": metric, "dev": evaluation.to_json()});
        if let Some(t) = &thresholds {
            best["dev_with_thresholds"] = t.dev_after.clone();
            self.progress.message(&format!(
                "decision thresholds tuned on dev ({}): {} -> {}",
                t.method, t.dev_before, t.dev_after
            ));
        }
        self.best = best.clone();
        let meta = ArtifactMeta {
            format_version: if thresholds.is_some() {
                artifact::FORMAT_VERSION
            } else {
                artifact::FORMAT_VERSION_WITHOUT_THRESHOLDS
            },
            thresholds,
            best,
            ..meta
        };
        let model = &self.model;
        let mut extra = vec![("metrics.jsonl", self.log.contents()?)];
        let (tensors, tensors_file) = match (model.lora(), &self.adapter_base) {
            (Some(spec), Some(base)) => {
                let task_type = match self.problem_type {
                    ProblemType::TokenClassification => "TOKEN_CLS",
                    _ => "SEQ_CLS",
                };
                let config = lora::adapter_config(
                    spec,
                    model.config.num_hidden_layers,
                    &base.model,
                    task_type,
                    &model.modules_to_save(),
                );
                extra.push((lora::ADAPTER_CONFIG, artifact::pretty(&config)));
                (model.adapter_tensors(), lora::ADAPTER_WEIGHTS)
            }
            (Some(_), None) => (model.merged_tensors(), "model.safetensors"),
            (None, _) => (model.params.export(&model.backend), "model.safetensors"),
        };
        Artifact {
            config: &artifact::classifier_config(
                &self.base_config,
                &self.label_names,
                self.problem_type,
            ),
            tensors: &tensors,
            tensors_file,
            tokenizer: &self.tokenizer,
            meta: &meta,
            extra: &extra,
        }
        .write(&recipe.out)
    }

    /// SHA-256 of each group's parameters, to show in the log which ones
    /// a phase moved.
    fn group_checksums(&self) -> serde_json::Value {
        let model = &self.model;
        model
            .groups()
            .into_iter()
            .map(|group| {
                (
                    group_name(group),
                    model
                        .params
                        .checksum(&model.backend, &model.group(group))
                        .into(),
                )
            })
            .collect::<serde_json::Map<String, serde_json::Value>>()
            .into()
    }

    /// Gradual unfreezing: each phase trains its set with a fresh optimizer
    /// (moments and bias correction for every trainable parameter: moments
    /// kept from a phase with a different step count would be mis-scaled)
    /// and a fresh warm-up and decay, and is undone if dev got worse.
    /// Returns whether training stopped early.
    fn run_unfreeze_schedule(&mut self, phases: &[UnfreezePhase]) -> Result<bool> {
        // The starting point is the first phase's baseline (and a candidate
        // for the best model: a schedule that only hurts keeps it).
        let (mut score, flow) = self.evaluate_and_keep_best(0)?;
        if flow == Flow::StopEarly {
            return Ok(true);
        }
        let mut epoch = 0;
        for (index, phase) in phases.iter().enumerate() {
            let unfrozen = phase.trainable;
            unfreeze(&mut self.model, unfrozen);
            self.model.params.reset_optimizer();
            let trainable: Vec<String> = self
                .model
                .groups()
                .into_iter()
                .filter(|&g| {
                    self.model
                        .group(g)
                        .iter()
                        .all(|&id| self.model.params.is_trainable(id))
                })
                .map(group_name)
                .collect();
            let line = serde_json::json!({
                "event": "phase_start",
                "phase": index + 1,
                "unfrozen": unfrozen.to_string(),
                "epochs": phase.epochs,
                "step": self.step,
                "trainable": trainable,
                "weights": self.group_checksums(),
            });
            self.log.write(line)?;
            self.progress.message(&format!(
                "phase {}: training {unfrozen} for {} epochs",
                index + 1,
                phase.epochs
            ));
            let start = self.model.params.snapshot(&self.model.backend);
            let Some(end_score) = self.run_phase(phase.epochs, epoch)? else {
                return Ok(true);
            };
            epoch += phase.epochs;
            let rolled_back = end_score < score;
            if rolled_back {
                self.model.params.restore(&self.model.backend, &start);
                let line = serde_json::json!({
                    "event": "rollback",
                    "phase": index + 1,
                    "step": self.step,
                    "metric": self.recipe.selection_metric(),
                    "dev_score_before": score,
                    "dev_score_after": end_score,
                });
                self.log.write(line)?;
                self.progress.message(&format!(
                    "phase {}: dev got worse ({score:.4} -> {end_score:.4}); rolled back to the weights it started from",
                    index + 1
                ));
            } else {
                score = end_score;
            }
            let line = serde_json::json!({
                "event": "phase_end",
                "phase": index + 1,
                "step": self.step,
                "rolled_back": rolled_back,
                "dev_score": score,
                "weights": self.group_checksums(),
            });
            self.log.write(line)?;
        }
        Ok(false)
    }
}

fn group_name(group: Group) -> String {
    match group {
        Group::Embeddings => "embeddings".into(),
        Group::Layer(l) => format!("layer.{l}"),
        Group::Head => "head".into(),
    }
}

/// Checks that every phase's layers exist, before any training.
fn check_phases(phases: &[UnfreezePhase], layers: usize) -> Result<()> {
    for phase in phases {
        if let Unfrozen::Top(n) = phase.trainable {
            if n > layers {
                return Err(Error::Invalid(format!(
                    "unfreeze_schedule: phase top{n} asks for more layers than the model has ({layers} layers); use top{layers} or all"
                )));
            }
        }
    }
    Ok(())
}

/// Makes exactly `unfrozen` trainable.
fn unfreeze<B: TrainBackend>(model: &mut SequenceClassifier<B>, unfrozen: Unfrozen) {
    let layers = model.config.num_hidden_layers;
    for group in model.groups() {
        let trainable = match (group, unfrozen) {
            (Group::Head, _) | (_, Unfrozen::All) => true,
            (Group::Layer(l), Unfrozen::Top(n)) => l + n >= layers,
            _ => false,
        };
        model.set_trainable(group, trainable);
    }
}

/// Runs `recipe` on `backend`.
pub fn finetune<B: TrainBackend>(
    backend: B,
    recipe: &TrainRecipe,
    quiet: bool,
) -> Result<TrainSummary> {
    artifact::check_replaceable(&recipe.out)?;
    let files = ModelFiles::locate(&recipe.model)?;
    // Its linears hold rounded int8 weights, not trainable f32 ones.
    if crate::quant::is_int8_artifact(&recipe.model)? {
        return Err(Error::Invalid(format!(
            "{} is an INT8 model (written by `bertrt quantize`), which is for inference only; \
             fine-tune the fp32 model it was quantized from (the --model given to \
             `bertrt quantize`), then quantize the result",
            recipe.model.display()
        )));
    }
    let config = BertConfig::from_file(&files.config)?;
    if recipe.max_length > config.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "max_length {} exceeds the model's max_position_embeddings {}",
            recipe.max_length, config.max_position_embeddings
        )));
    }
    let base_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&files.config).map_err(|e| Error::io(&files.config, e))?,
    )
    .map_err(|e| Error::Config {
        path: files.config.clone(),
        message: e.to_string(),
    })?;
    let tokenizer = BertTokenizer::from_dir(&files.dir, recipe.max_length)?;
    let spec = DataSpec {
        text_column: recipe.text_column.clone(),
        label_column: recipe.label_column.clone(),
        text_pair_column: recipe.text_pair_column.clone(),
        multi_label_delimiter: (recipe.task == Task::MultiLabel)
            .then(|| recipe.label_delimiter.clone()),
        numeric_labels: recipe.task == Task::Regression,
        skip_bad_rows: recipe.skip_bad_rows,
    };
    let mut tag_names = Vec::new();
    let (train, valid, label_set) = match recipe.task {
        Task::Classification => {
            let mut label_set = None;
            let train = Split::load(&recipe.train, &spec, &tokenizer, |d| {
                let set = LabelSet::from_training(d);
                let ids = set.encode(d)?;
                label_set = Some(set);
                Ok(Gold::Classes(ids))
            })?;
            let label_set = label_set.expect("set while loading the training split");
            let valid = Split::load(&recipe.valid, &spec, &tokenizer, |d| {
                Ok(Gold::Classes(label_set.encode(d)?))
            })?;
            (train, valid, Some(label_set))
        }
        Task::MultiLabel => {
            let mut label_set = None;
            let train = Split::load(&recipe.train, &spec, &tokenizer, |d| {
                let set = LabelSet::from_training_label_sets(d);
                let gold = Gold::label_sets(set.encode_label_sets(d)?, set.len());
                label_set = Some(set);
                Ok(gold)
            })?;
            let label_set = label_set.expect("set while loading the training split");
            let valid = Split::load(&recipe.valid, &spec, &tokenizer, |d| {
                Ok(Gold::label_sets(
                    label_set.encode_label_sets(d)?,
                    label_set.len(),
                ))
            })?;
            (train, valid, Some(label_set))
        }
        Task::Regression => {
            let values = |d: &Dataset| Ok(Gold::Values(d.numeric_labels()?));
            let train = Split::load(&recipe.train, &spec, &tokenizer, values)?;
            let valid = Split::load(&recipe.valid, &spec, &tokenizer, values)?;
            (train, valid, None)
        }
        Task::TokenClassification => {
            let spec = TagSpec {
                tokens_column: recipe.tokens_column.clone(),
                tags_column: recipe.tags_column.clone(),
            };
            let alignment = recipe.alignment();
            let (train, tag_set) = Split::load_tagged(
                &recipe.train,
                &spec,
                &tokenizer,
                TagSet::from_training,
                alignment,
            )?;
            let (valid, _) = Split::load_tagged(
                &recipe.valid,
                &spec,
                &tokenizer,
                |_| tag_set.clone(),
                alignment,
            )?;
            tag_names = tag_set.tags().to_vec();
            (train, valid, None)
        }
    };
    // Regression has one output, named after the label column.
    let label_names = match (&label_set, recipe.task) {
        (Some(set), _) => set.labels().to_vec(),
        (None, Task::TokenClassification) => tag_names,
        (None, _) => vec![recipe.label_column.clone()],
    };
    if recipe.task == Task::TokenClassification && label_names.len() < 2 {
        return Err(Error::Invalid(format!(
            "{}: only one tag ({:?}) in the training data; token classification needs at least two (e.g. O and B-TYPE)",
            recipe.train.display(),
            label_names
        )));
    }
    if recipe.task == Task::Classification && label_names.len() < 2 {
        return Err(Error::Invalid(format!(
            "{}: only one label ({:?}) in the training data; classification needs at least two",
            recipe.train.display(),
            label_names
        )));
    }
    if label_names.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no row has a label (column {:?}); multi-label training needs labels, separated by {:?} or given as a JSON list",
            recipe.train.display(),
            recipe.label_column,
            recipe.label_delimiter
        )));
    }
    let problem_type = match recipe.task {
        Task::Classification => ProblemType::SingleLabel,
        Task::MultiLabel => ProblemType::MultiLabel,
        Task::Regression => ProblemType::Regression,
        Task::TokenClassification => ProblemType::TokenClassification,
    };

    let lora = recipe.lora();
    if files.adapter.is_some() && lora.is_some() && !recipe.merge_lora {
        return Err(Error::Invalid(format!(
            "{}: LoRA adapters saved apart from their base; new adapters on top of it can only be saved merged (--merge-lora)",
            recipe.model.display()
        )));
    }
    let ckpt = files.checkpoint()?;
    // Unmerged adapters are saved apart from the base: record which file
    // they go with, by path and content.
    let adapter_base = match &lora {
        Some(_) if !recipe.merge_lora => {
            Some(AdapterBase::new(&files.dir, &recipe.out, ckpt.sha256())?)
        }
        _ => None,
    };
    let mut model = match recipe.task {
        Task::TokenClassification => SequenceClassifier::new_token_classifier(
            backend,
            config,
            &ckpt,
            label_names.len(),
            recipe.head_dropout,
            recipe.seed,
        )?,
        _ => SequenceClassifier::new(
            backend,
            config,
            &ckpt,
            recipe.pooling,
            label_names.len(),
            recipe.head_dropout,
            recipe.seed,
        )?,
    };
    drop(ckpt);
    if let Some(spec) = lora {
        model.add_lora(spec, recipe.seed);
    }
    apply_strategies(&mut model, recipe)?;
    model.set_grad_checkpointing(recipe.grad_checkpointing);
    let class_weights = match (&recipe.class_weights, &label_set, &train.gold) {
        (Some(spec), Some(set), Gold::Classes(labels)) => Some(class_weights(spec, set, labels)?),
        _ => None,
    };

    let schedule = recipe.unfreeze_phases()?;
    let epochs = match &schedule {
        Some(phases) => {
            check_phases(phases, model.config.num_hidden_layers)?;
            phases.iter().map(|p| p.epochs).sum()
        }
        None => recipe.epochs,
    };
    let micro_batches_per_epoch = train.encoded.len().div_ceil(recipe.batch_size);
    let steps_per_epoch = micro_batches_per_epoch.div_ceil(recipe.grad_accum);
    let log = MetricsLog::create(&recipe.out)?;
    let mut progress = Progress::new(steps_per_epoch * epochs, quiet);
    progress.message(&format!(
        "fine-tuning {} on {} examples ({} labels), {} epochs x {} steps, {} parameters, {}",
        recipe.model.display(),
        train.encoded.len(),
        label_names.len(),
        epochs,
        steps_per_epoch,
        model.params.parameter_count(),
        model.backend.describe(),
    ));
    if recipe.grad_checkpointing {
        let mib = |checkpointing| {
            let floats =
                model.layer_activation_floats(recipe.batch_size, recipe.max_length, checkpointing);
            floats as f64 * 4.0 / (1 << 20) as f64
        };
        progress.message(&format!(
            "checkpointing: keeping each layer's input and one layer's activations, \
             {:.1} MiB instead of {:.1} MiB for {} sequences of {} tokens",
            mib(true),
            mib(false),
            recipe.batch_size,
            recipe.max_length,
        ));
    }
    if let Gold::Tags { first_subwords, .. } = &valid.gold {
        // Training scores dev on one truncated sequence per sentence, as it
        // trains; `bertrt eval` runs long sentences in windows instead.
        let cut = valid
            .encoded
            .iter()
            .zip(first_subwords)
            .filter(|(e, words)| e.ids.len() >= recipe.max_length && words.contains(&None))
            .count();
        if cut > 0 {
            progress.message(&format!(
                "{cut} of {} validation sentences are longer than --max-length {}: dev scoring predicts their cut words O, where `bertrt eval` tags every word (in windows); raise --max-length to score them whole",
                valid.encoded.len(),
                recipe.max_length,
            ));
        }
    }

    let data_records = BTreeMap::from([
        ("train".to_string(), train.record.clone()),
        ("valid".to_string(), valid.record.clone()),
    ]);
    let mut trainer = Trainer {
        recipe,
        model,
        train,
        valid,
        label_names,
        problem_type,
        class_weights,
        tokenizer,
        base_config,
        adapter_base,
        recipe_json: serde_json::to_value(recipe).expect("serialisable"),
        data_records,
        log,
        progress,
        steps_per_epoch,
        best_score: f64::NEG_INFINITY,
        best: serde_json::Value::Null,
        evals_without_improvement: 0,
        step: 0,
        samples_seen: 0,
        loss_scaler: if recipe.precision == Precision::Fp16 {
            LossScaler::new(LossScaleConfig::default())
        } else {
            LossScaler::disabled()
        },
    };
    let started = Instant::now();
    let stopped_early = match schedule {
        Some(phases) => trainer.run_unfreeze_schedule(&phases)?,
        None => trainer.run_phase(recipe.epochs, 0)?.is_none(),
    };
    // The saved model was the best, not necessarily the last: give it the
    // whole log, then drop the live copy.
    let Trainer {
        log,
        best,
        step,
        samples_seen,
        loss_scaler,
        ..
    } = trainer;
    if !best.is_null() {
        artifact::replace_file(&recipe.out, "metrics.jsonl", &log.contents()?)?;
    }
    let live_log = log.path.clone();
    drop(log);
    std::fs::remove_file(&live_log).map_err(|e| Error::io(&live_log, e))?;
    Ok(TrainSummary {
        out: recipe.out.clone(),
        steps: step,
        best,
        samples_per_second: samples_seen as f64 / started.elapsed().as_secs_f64(),
        stopped_early,
        skipped_steps: loss_scaler
            .enabled()
            .then(|| loss_scaler.state().skipped_steps),
    })
}

/// Runs `recipe` once per seed (the "single-run trap": one seed's score is
/// not a result), each into `OUT/seed-N`, and reports every dev metric of
/// the best checkpoints as mean and sample standard deviation.
pub fn finetune_seeds<B: TrainBackend>(
    mut backend: impl FnMut() -> B,
    recipe: &TrainRecipe,
    seeds: &[u64],
    quiet: bool,
) -> Result<serde_json::Value> {
    let mut runs = Vec::new();
    for &seed in seeds {
        let run = TrainRecipe {
            seed,
            out: recipe.out.join(format!("seed-{seed}")),
            ..recipe.clone()
        };
        runs.push(finetune(backend(), &run, quiet)?);
    }
    let metric_names: Vec<String> = runs
        .first()
        .and_then(|r| r.best["dev"].as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let stats: serde_json::Map<String, serde_json::Value> = metric_names
        .into_iter()
        .map(|name| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.best["dev"][&name].as_f64())
                .collect();
            let (mean, std) = mean_and_std(&values);
            (name, serde_json::json!({"mean": mean, "std": std}))
        })
        .collect();
    Ok(serde_json::json!({
        "seeds": seeds,
        "dev": stats,
        "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
    }))
}

/// One seed's line in [`finetune_seeds`]'s report.
fn run_json(run: &TrainSummary) -> serde_json::Value {
    let mut json = serde_json::json!({"out": run.out, "best": run.best, "steps": run.steps});
    if let Some(skipped) = run.skipped_steps {
        json["skipped_steps"] = skipped.into();
    }
    json
}

/// Mean and sample standard deviation (0 for a single value).
fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Freezing and per-group learning rates from the recipe (a LoRA model
/// keeps the freezing [`SequenceClassifier::add_lora`] set).
fn apply_strategies<B: TrainBackend>(
    model: &mut SequenceClassifier<B>,
    recipe: &TrainRecipe,
) -> Result<()> {
    let layers = model.config.num_hidden_layers;
    if recipe.freeze_bottom > layers {
        return Err(Error::Invalid(format!(
            "--freeze-bottom {} exceeds the model's {layers} layers",
            recipe.freeze_bottom
        )));
    }
    let frozen_layers = if recipe.head_only {
        layers
    } else {
        recipe.freeze_bottom
    };
    let embeddings_frozen =
        recipe.head_only || recipe.freeze_embeddings || recipe.freeze_bottom > 0;
    for group in model.groups() {
        let (trainable, depth) = match group {
            Group::Embeddings => (!embeddings_frozen, layers),
            Group::Layer(l) => (l >= frozen_layers, layers - 1 - l),
            Group::Head => (true, 0),
        };
        // With LoRA the base stays as add_lora froze it.
        if model.lora().is_none() {
            model.set_trainable(group, trainable);
        }
        let mut scale = recipe.layer_lr_decay.map_or(1.0, |d| d.powi(depth as i32));
        if group == Group::Head {
            scale = recipe.head_lr.map_or(1.0, |head_lr| head_lr / recipe.lr);
        }
        model.set_lr_scale(group, scale);
    }
    Ok(())
}

/// Per-class loss weights: "balanced" gives class c the weight
/// `n / (classes · count_c)` (scikit-learn's definition); otherwise `spec`
/// is a JSON file `{label: weight}` covering every label.
fn class_weights(spec: &str, labels: &LabelSet, train_labels: &[usize]) -> Result<Vec<f32>> {
    if spec == "balanced" {
        let mut counts = vec![0usize; labels.len()];
        train_labels.iter().for_each(|&l| counts[l] += 1);
        let n = train_labels.len() as f32;
        return Ok(counts
            .iter()
            .map(|&c| n / (labels.len() as f32 * c.max(1) as f32))
            .collect());
    }
    let path = Path::new(spec);
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let map: BTreeMap<String, f32> = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        message: format!(
            "class weights must be a JSON object {{label: weight}} (or use \"balanced\"): {e}"
        ),
    })?;
    labels
        .labels()
        .iter()
        .map(|label| match map.get(label) {
            Some(&w) if w > 0.0 && w.is_finite() => Ok(w),
            Some(w) => Err(Error::Config {
                path: path.into(),
                message: format!("weight {w} for label {label:?} must be positive"),
            }),
            None => Err(Error::Config {
                path: path.into(),
                message: format!("no weight for label {label:?}"),
            }),
        })
        .collect()
}

/// Temperature scaling on the dev logits (Guo et al. 2017).
fn calibrated(meta: ArtifactMeta, evaluation: &Evaluation, gold: &[usize]) -> ArtifactMeta {
    let classes = meta.labels.len();
    let temperature = fit_temperature(&evaluation.logits, classes, gold);
    let ece = |t: f32| {
        let probs = softmax_with_temperature(&evaluation.logits, classes, t);
        expected_calibration_error(&probs, classes, gold, 15)
    };
    ArtifactMeta {
        temperature,
        calibration: Some(Calibration {
            method: "temperature scaling on dev".into(),
            temperature,
            dev_nll_before: nll(&evaluation.logits, classes, gold, 1.0),
            dev_nll_after: nll(&evaluation.logits, classes, gold, temperature),
            dev_ece_before: ece(1.0),
            dev_ece_after: ece(temperature),
        }),
        ..meta
    }
}

/// The decision thresholds to store with a checkpoint, from its dev
/// evaluation: per label for multi-label models (each maximising that
/// label's F1; 0.5 everywhere when `tune` is off), the positive class's
/// for binary classifiers (maximising the selection metric on calibrated
/// probabilities; None when `tune` is off or the metric is the loss, which
/// no threshold changes). None for other tasks.
fn decision_thresholds(
    evaluation: &Evaluation,
    gold: &Gold,
    label_names: &[String],
    temperature: f32,
    metric: Metric,
    tune: bool,
) -> Option<Thresholds> {
    match gold {
        Gold::LabelSets { multi_hot, labels } => {
            let probs = label_probabilities(&evaluation.logits);
            let gold: Vec<bool> = multi_hot.iter().map(|&y| y > 0.5).collect();
            let values = label_thresholds(&probs, &gold, *labels, tune);
            let report = |thresholds: &[f32]| {
                multi_label_summary(&multi_label_report(&probs, &gold, thresholds, label_names))
            };
            Some(Thresholds {
                method: if tune {
                    "per label: the dev F1 maximum".into()
                } else {
                    "default 0.5 (tuning off)".into()
                },
                values: label_names
                    .iter()
                    .cloned()
                    .zip(values.iter().copied())
                    .collect(),
                dev_before: report(&vec![DEFAULT_THRESHOLD; *labels]),
                dev_after: report(&values),
            })
        }
        Gold::Classes(gold) if tune && label_names.len() == 2 => {
            let score: fn(&Counts) -> f64 = match metric {
                Metric::MacroF1 => |c| (c.f1() + c.negative_f1()) / 2.0,
                Metric::Accuracy => Counts::accuracy,
                _ => return None,
            };
            let probs = softmax_with_temperature(&evaluation.logits, 2, temperature);
            let positive_probs: Vec<f32> = probs.chunks_exact(2).map(|p| p[1]).collect();
            let positive: Vec<bool> = gold.iter().map(|&g| g == 1).collect();
            let tuned = thresholds::tune(&positive_probs, &positive, score);
            let report = |threshold: f32| {
                let predicted: Vec<usize> = positive_probs
                    .iter()
                    .map(|&p| usize::from(p >= threshold))
                    .collect();
                classification_summary(&ClassificationReport::compute(
                    label_names,
                    gold,
                    &predicted,
                ))
            };
            Some(Thresholds {
                method: format!(
                    "positive class {:?}: the dev {} maximum",
                    label_names[1],
                    serde_json::to_value(metric)
                        .expect("serialisable")
                        .as_str()
                        .unwrap_or_default()
                ),
                values: BTreeMap::from([(label_names[1].clone(), tuned.threshold)]),
                dev_before: report(DEFAULT_THRESHOLD),
                dev_after: report(tuned.threshold),
            })
        }
        _ => None,
    }
}

/// Column `index` of row-major `values` with rows of `width`.
fn column<T: Copy>(values: &[T], index: usize, width: usize) -> Vec<T> {
    values.iter().skip(index).step_by(width).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp16_scaler() -> LossScaler {
        LossScaler::new(LossScaleConfig::default())
    }

    #[test]
    fn without_scaling_clips_as_before_and_stops_on_non_finite() {
        let mut scaler = LossScaler::disabled();
        assert_eq!(
            grad_step(&mut scaler, 0.7, 0.5, 1.0),
            GradStep::Apply {
                grad_norm: 0.5,
                grad_factor: 1.0
            }
        );
        assert_eq!(
            grad_step(&mut scaler, 0.7, 4.0, 1.0),
            GradStep::Apply {
                grad_norm: 4.0,
                grad_factor: 0.25
            }
        );
        for (loss, norm) in [
            (0.7, f64::INFINITY),
            (0.7, f64::NAN),
            (f32::NAN, 0.5),
            (f32::INFINITY, 0.5),
        ] {
            assert_eq!(grad_step(&mut scaler, loss, norm, 1.0), GradStep::Stop);
        }
        assert_eq!(scaler.scale(), 1.0);
    }

    #[test]
    fn fp16_unscales_and_clips_in_one_factor() {
        let mut scaler = fp16_scaler();
        let scale = 65536.0;
        assert_eq!(
            grad_step(&mut scaler, 0.7, 0.5 * scale, 1.0),
            GradStep::Apply {
                grad_norm: 0.5,
                grad_factor: 1.0 / 65536.0
            }
        );
        assert_eq!(
            grad_step(&mut scaler, 0.7, 4.0 * scale, 1.0),
            GradStep::Apply {
                grad_norm: 4.0,
                grad_factor: 0.25 / 65536.0
            }
        );
    }

    #[test]
    fn fp16_overflow_skips_and_halves_the_scale() {
        let mut scaler = fp16_scaler();
        assert_eq!(
            grad_step(&mut scaler, 0.7, f64::INFINITY, 1.0),
            GradStep::Skip {
                scale: 65536.0,
                new_scale: 32768.0
            }
        );
        assert_eq!(
            grad_step(&mut scaler, 0.7, f64::NAN, 1.0),
            GradStep::Skip {
                scale: 32768.0,
                new_scale: 16384.0
            }
        );
        // The next good step unscales by the scale it ran at.
        assert_eq!(
            grad_step(&mut scaler, 0.7, 0.5 * 16384.0, 1.0),
            GradStep::Apply {
                grad_norm: 0.5,
                grad_factor: 1.0 / 16384.0
            }
        );
        assert_eq!(scaler.state().skipped_steps, 2);
    }

    /// GradScaler semantics: the loss (computed in f32) does not decide.
    #[test]
    fn fp16_non_finite_loss_with_finite_gradients_applies() {
        let mut scaler = fp16_scaler();
        assert!(matches!(
            grad_step(&mut scaler, f32::NAN, 0.5 * 65536.0, 1.0),
            GradStep::Apply { .. }
        ));
        assert_eq!(scaler.scale(), 65536.0);
    }

    #[test]
    fn fp16_scale_doubles_after_2000_finite_steps() {
        let mut scaler = fp16_scaler();
        for _ in 0..2000 {
            // Every one of them, the 2000th included, unscales by 2^16.
            assert_eq!(
                grad_step(&mut scaler, 0.7, 0.5 * 65536.0, 1.0),
                GradStep::Apply {
                    grad_norm: 0.5,
                    grad_factor: 1.0 / 65536.0
                }
            );
        }
        assert_eq!(scaler.scale(), 131072.0);
        assert_eq!(
            grad_step(&mut scaler, 0.7, 0.5 * 131072.0, 1.0),
            GradStep::Apply {
                grad_norm: 0.5,
                grad_factor: 1.0 / 131072.0
            }
        );
    }

    #[test]
    fn fp16_stops_when_gradients_overflow_at_the_minimum_scale() {
        let mut scaler = fp16_scaler();
        // 16 halvings take 2^16 to the floor of 1; the 17th overflow has no
        // scale left to shed.
        for _ in 0..16 {
            assert!(matches!(
                grad_step(&mut scaler, 0.7, f64::INFINITY, 1.0),
                GradStep::Skip { .. }
            ));
        }
        assert_eq!(scaler.scale(), 1.0);
        assert_eq!(
            grad_step(&mut scaler, 0.7, f64::INFINITY, 1.0),
            GradStep::Stop
        );
    }

    #[test]
    fn non_finite_errors_name_the_cause_and_a_remedy() {
        let out = Path::new("runs/model");
        let fp32 = non_finite_error(out, false, f32::NAN, 4, 0).to_string();
        assert!(fp32.contains("non-finite loss at step 5 (epoch 1); training stopped"));
        assert!(fp32.contains("runs/model is intact") && !fp32.contains("bf16"));
        assert!(non_finite_error(out, false, 0.7, 4, 0)
            .to_string()
            .contains("non-finite gradient at step 5"));
        let fp16 = non_finite_error(out, true, f32::NAN, 4, 0).to_string();
        assert!(fp16
            .contains("non-finite gradient at step 5 (epoch 1), even at the minimum loss scale"));
        assert!(fp16.contains("--precision bf16"));
    }

    /// Injected overflows: the gradients overflow fp16 whenever the scaled
    /// largest gradient passes 65504. Every applied step sees the true norm
    /// exactly (the scale is a power of two), and only overflowing steps
    /// are skipped.
    #[test]
    fn fp16_under_injected_overflow_applies_exact_unscaled_norms() {
        let (true_norm, max_grad) = (0.75f64, 3.0f64);
        let mut scaler = fp16_scaler();
        let mut skipped = 0;
        for _ in 0..6000 {
            let scale = scaler.scale() as f64;
            let scaled_norm = if max_grad * scale > 65504.0 {
                f64::INFINITY
            } else {
                true_norm * scale
            };
            match grad_step(&mut scaler, 0.7, scaled_norm, 1.0) {
                GradStep::Apply {
                    grad_norm,
                    grad_factor,
                } => {
                    assert_eq!(grad_norm, true_norm);
                    assert_eq!(grad_factor as f64, 1.0 / scale);
                }
                GradStep::Skip { .. } => skipped += 1,
                GradStep::Stop => panic!("stopped at scale {scale}"),
            }
        }
        // 3 * 2^14 fits, 3 * 2^15 does not: two skips bring 2^16 down to
        // 2^14; each probe of 2^15 (after 2000 good steps) is skipped again.
        assert_eq!(scaler.state().skipped_steps, skipped);
        assert_eq!(skipped, 2 + 2);
        assert!(scaler.scale() <= 16384.0);
    }
}
