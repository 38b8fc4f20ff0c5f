//! The fine-tuning loop: data in, the best checkpoint (by dev metric) out as
//! a calibrated artifact.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::artifact::{self, Artifact, ArtifactMeta, Calibration, DataFile, Preprocessing};
use crate::backend::train::{AdamW, TrainBackend};
use crate::checkpoint::Checkpoint;
use crate::config::BertConfig;
use crate::data::{self, DataSpec, Dataset, LabelSet};
use crate::error::{Error, Result};
use crate::eval::calibration::{
    expected_calibration_error, fit_temperature, nll, softmax_with_temperature,
};
use crate::eval::{ClassificationReport, RegressionReport};
use crate::model::{ModelFiles, TokenBatch};
use crate::rng;
use crate::tokenize::{BertTokenizer, Encoded};
use crate::train::classifier::{ForwardMode, Group, SequenceClassifier, Targets};
use crate::train::progress::Progress;
use crate::train::recipe::{linear_schedule, Metric, Task, TrainRecipe};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub steps: usize,
    pub best: serde_json::Value,
    pub samples_per_second: f64,
    pub stopped_early: bool,
}

/// The gold answers of a split.
enum Gold {
    /// Label ids, for classification.
    Classes(Vec<usize>),
    /// Numbers, for regression.
    Values(Vec<f32>),
}

/// A tokenized split with its gold answers.
struct Split {
    dataset: Dataset,
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
            dataset,
            encoded,
            gold,
        })
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
            Gold::Values(values) => BatchGold::Values(indices.iter().map(|&i| values[i]).collect()),
        }
    }

    fn record(&self) -> DataFile {
        DataFile {
            path: self.dataset.path.clone(),
            sha256: self.dataset.sha256.clone(),
            examples: self.dataset.examples.len(),
            skipped: self.dataset.skipped,
        }
    }
}

enum BatchGold {
    Classes(Vec<usize>),
    Values(Vec<f32>),
}

impl BatchGold {
    fn targets<'a>(&'a self, class_weights: Option<&'a [f32]>) -> Targets<'a> {
        match self {
            BatchGold::Classes(labels) => Targets::Classes {
                labels,
                class_weights,
            },
            BatchGold::Values(values) => Targets::Values(values),
        }
    }
}

/// Dev-set evaluation of the current parameters.
pub struct Evaluation {
    pub loss: f64,
    pub report: Report,
    /// `[examples, outputs]`, in dev order.
    pub logits: Vec<f32>,
}

pub enum Report {
    Classification(ClassificationReport),
    Regression(RegressionReport),
}

impl Evaluation {
    fn score(&self, metric: Metric) -> f64 {
        match (&self.report, metric) {
            (_, Metric::Loss) => -self.loss,
            (Report::Classification(r), Metric::MacroF1) => r.macro_f1,
            (Report::Classification(r), Metric::Accuracy) => r.accuracy,
            (Report::Regression(r), Metric::Pearson) => r.pearson,
            (Report::Regression(r), Metric::Spearman) => r.spearman,
            (Report::Regression(r), Metric::Rmse) => -r.rmse,
            _ => unreachable!("the recipe checks that the metric fits the task"),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match &self.report {
            Report::Classification(r) => serde_json::json!({
                "loss": self.loss,
                "accuracy": r.accuracy,
                "macro_f1": r.macro_f1,
                "weighted_f1": r.weighted_f1,
            }),
            Report::Regression(r) => serde_json::json!({
                "loss": self.loss,
                "rmse": r.rmse,
                "mae": r.mae,
                "pearson": r.pearson,
                "spearman": r.spearman,
            }),
        }
    }

    fn summary(&self) -> String {
        match &self.report {
            Report::Classification(r) => format!(
                "loss {:.4} accuracy {:.4} macro_f1 {:.4}",
                self.loss, r.accuracy, r.macro_f1
            ),
            Report::Regression(r) => format!(
                "loss {:.4} rmse {:.4} pearson {:.4} spearman {:.4}",
                self.loss, r.rmse, r.pearson, r.spearman
            ),
        }
    }
}

fn evaluate<B: TrainBackend>(
    model: &mut SequenceClassifier<B>,
    split: &Split,
    label_names: &[String],
    batch_size: usize,
) -> Result<Evaluation> {
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
            let predictions: Vec<usize> = logits
                .chunks_exact(outputs)
                .map(|row| {
                    (0..outputs)
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                        .unwrap_or(0)
                })
                .collect();
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
        Gold::Values(values) => {
            let report = RegressionReport::compute(values, &logits);
            Evaluation {
                loss: report.rmse.powi(2),
                report: Report::Regression(report),
                logits,
            }
        }
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

/// Runs `recipe` on `backend`.
pub fn finetune<B: TrainBackend>(
    backend: B,
    recipe: &TrainRecipe,
    quiet: bool,
) -> Result<TrainSummary> {
    artifact::check_replaceable(&recipe.out)?;
    let files = ModelFiles::locate(&recipe.model)?;
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
        skip_bad_rows: recipe.skip_bad_rows,
    };
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
        Task::Regression => {
            let values = |d: &Dataset| Ok(Gold::Values(d.numeric_labels()?));
            let train = Split::load(&recipe.train, &spec, &tokenizer, values)?;
            let valid = Split::load(&recipe.valid, &spec, &tokenizer, values)?;
            (train, valid, None)
        }
    };
    // Regression has one output, named after the label column.
    let label_names = match &label_set {
        Some(set) => set.labels().to_vec(),
        None => vec![recipe.label_column.clone()],
    };
    if recipe.task == Task::Classification && label_names.len() < 2 {
        return Err(Error::Invalid(format!(
            "{}: only one label ({:?}) in the training data; classification needs at least two",
            recipe.train.display(),
            label_names
        )));
    }

    let ckpt = Checkpoint::open(&files.weights)?;
    let mut model = SequenceClassifier::new(
        backend,
        config,
        &ckpt,
        recipe.pooling,
        label_names.len(),
        recipe.head_dropout,
        recipe.seed,
    )?;
    drop(ckpt);
    apply_strategies(&mut model, recipe)?;
    let class_weights = match (&recipe.class_weights, &label_set, &train.gold) {
        (Some(spec), Some(set), Gold::Classes(labels)) => Some(class_weights(spec, set, labels)?),
        _ => None,
    };

    let micro_batches_per_epoch = train.encoded.len().div_ceil(recipe.batch_size);
    let steps_per_epoch = micro_batches_per_epoch.div_ceil(recipe.grad_accum);
    let total_steps = steps_per_epoch * recipe.epochs;
    let warmup = (recipe.warmup_ratio * total_steps as f32).ceil() as usize;
    let mut log = MetricsLog::create(&recipe.out)?;
    let mut progress = Progress::new(total_steps, quiet);
    progress.message(&format!(
        "fine-tuning {} on {} examples ({} labels), {} epochs x {} steps, {} parameters, {}",
        recipe.model.display(),
        train.encoded.len(),
        label_names.len(),
        recipe.epochs,
        steps_per_epoch,
        model.params.parameter_count(),
        model.backend.describe(),
    ));

    let recipe_json = serde_json::to_value(recipe).expect("serialisable");
    let data_records = BTreeMap::from([
        ("train".to_string(), train.record()),
        ("valid".to_string(), valid.record()),
    ]);
    let metric = recipe.selection_metric();
    let mut best_score = f64::NEG_INFINITY;
    let mut best = serde_json::Value::Null;
    let mut evals_without_improvement = 0;
    let mut stopped_early = false;
    let mut step = 0;
    let mut samples_seen = 0usize;
    let started = Instant::now();

    'epochs: for epoch in 0..recipe.epochs {
        let batches = data::epoch_batches(
            &train.lengths(),
            recipe.batch_size,
            recipe.seed,
            epoch,
            recipe.bucket_by_length,
        );
        for group in batches.chunks(recipe.grad_accum) {
            let step_started = Instant::now();
            let group_examples: usize = group.iter().map(Vec::len).sum();
            model.params.zero_grads(&model.backend);
            let mut loss = 0.0f32;
            for (micro, indices) in group.iter().enumerate() {
                let (batch, gold) = (train.tokens(indices), train.batch_gold(indices));
                let dropout_seed =
                    rng::derive_seed(recipe.seed, (step * recipe.grad_accum + micro) as u64);
                model.forward(
                    &batch,
                    ForwardMode {
                        dropout_seed: Some(dropout_seed),
                    },
                )?;
                let share = indices.len() as f32 / group_examples as f32;
                loss +=
                    share * model.backward(&batch, gold.targets(class_weights.as_deref()), share);
            }
            let grad_norm = model.params.grad_norm(&model.backend);
            if !loss.is_finite() || !grad_norm.is_finite() {
                return Err(Error::Invalid(format!(
                    "non-finite {} at step {} (epoch {}); training stopped. The last good checkpoint in {} is intact. Try a lower --lr or --max-grad-norm.",
                    if loss.is_finite() { "gradient" } else { "loss" },
                    step + 1,
                    epoch + 1,
                    recipe.out.display()
                )));
            }
            if grad_norm > recipe.max_grad_norm as f64 {
                model.params.scale_grads(
                    &model.backend,
                    (recipe.max_grad_norm as f64 / grad_norm) as f32,
                );
            }
            let lr = linear_schedule(recipe.lr, step, warmup, total_steps);
            model.params.adamw_step(
                &model.backend,
                AdamW {
                    lr,
                    beta1: recipe.adam_beta1,
                    beta2: recipe.adam_beta2,
                    eps: recipe.adam_eps,
                    weight_decay: recipe.weight_decay,
                    step: step as u32 + 1,
                },
            );
            samples_seen += group_examples;
            let samples_per_s = group_examples as f64 / step_started.elapsed().as_secs_f64();
            log.write(serde_json::json!({
                "step": step + 1,
                "epoch": epoch as f64 + (step % steps_per_epoch + 1) as f64 / steps_per_epoch as f64,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "samples_per_s": samples_per_s,
            }))?;
            progress.step(step, epoch + 1, loss, lr, samples_per_s);
            step += 1;

            let end_of_epoch = step % steps_per_epoch == 0;
            let scheduled = recipe.eval_every.is_some_and(|n| step % n == 0);
            if end_of_epoch || scheduled {
                let evaluation = evaluate(&mut model, &valid, &label_names, recipe.batch_size * 2)?;
                let score = evaluation.score(metric);
                let improved = score > best_score;
                log.write(serde_json::json!({"step": step, "epoch": epoch + 1, "eval": evaluation.to_json(), "improved": improved}))?;
                progress.message(&format!(
                    "eval at step {step}: {}{}",
                    evaluation.summary(),
                    if improved { " (best, saved)" } else { "" }
                ));
                if improved {
                    best_score = score;
                    evals_without_improvement = 0;
                    best = serde_json::json!({"step": step, "epoch": epoch + 1, "metric": metric, "dev": evaluation.to_json()});
                    let meta = ArtifactMeta {
                        format_version: artifact::FORMAT_VERSION,
                        bertrt_version: crate::VERSION.into(),
                        task: match recipe.task {
                            Task::Classification => "sequence-classification",
                            Task::Regression => "regression",
                        }
                        .into(),
                        labels: label_names.clone(),
                        preprocessing: Preprocessing {
                            max_length: recipe.max_length,
                            truncation_side: "right".into(),
                            truncation_strategy: "longest_first".into(),
                            lowercase: tokenizer.lowercase(),
                            pooling: recipe.pooling,
                            text_pair: recipe.text_pair_column.is_some(),
                        },
                        temperature: 1.0,
                        calibration: None,
                        recipe: recipe_json.clone(),
                        data: data_records.clone(),
                        best: best.clone(),
                    };
                    let meta = match &valid.gold {
                        Gold::Classes(labels) if recipe.calibrate => {
                            calibrated(meta, &evaluation, labels)
                        }
                        _ => meta,
                    };
                    Artifact {
                        config: &artifact::classifier_config(
                            &base_config,
                            &label_names,
                            recipe.task == Task::Regression,
                        ),
                        tensors: &model.params.export(&model.backend),
                        tokenizer: &tokenizer,
                        meta: &meta,
                        extra: &[("metrics.jsonl", log.contents()?)],
                    }
                    .write(&recipe.out)?;
                } else {
                    evals_without_improvement += 1;
                    if recipe
                        .patience
                        .is_some_and(|p| evals_without_improvement >= p)
                    {
                        progress.message(&format!(
                            "early stop: no improvement in {evals_without_improvement} evaluations"
                        ));
                        stopped_early = true;
                        break 'epochs;
                    }
                }
            }
        }
    }
    // The saved model was the best, not necessarily the last: give it the
    // whole log, then drop the live copy.
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
        "runs": runs.iter().map(|r| serde_json::json!({"out": r.out, "best": r.best, "steps": r.steps})).collect::<Vec<_>>(),
    }))
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

/// Freezing and per-group learning rates from the recipe.
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
        model.set_trainable(group, trainable);
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
