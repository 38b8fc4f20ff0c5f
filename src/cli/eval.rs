use std::path::PathBuf;

use anyhow::Result;

use bertrt::backend::cpu::CpuBackend;
use bertrt::classify::{Classifier, Decision, Input, Prediction};
use bertrt::data::{self, DataSpec, LabelSet};
use bertrt::eval::calibration::{expected_calibration_error, nll, softmax_with_temperature};
use bertrt::eval::{ClassificationReport, EntityReport, MultiLabelReport, RegressionReport};
use bertrt::tag::{self, Tagger};
use bertrt::train::loss::bce_with_logits;

#[derive(clap::Args)]
pub struct Args {
    /// A fine-tuned model directory.
    #[arg(long)]
    model: PathBuf,
    /// Labeled data: .csv, .tsv or .jsonl; token classifiers: .conll or
    /// .jsonl with word and tag lists.
    #[arg(long)]
    data: PathBuf,
    /// Token classifiers, JSON Lines: key of the word list.
    #[arg(long, default_value = "tokens")]
    tokens_column: String,
    /// Token classifiers, JSON Lines: key of the tag list.
    #[arg(long, default_value = "tags")]
    tags_column: String,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long, default_value = "label")]
    label_column: String,
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Multi-label models: separates the labels in a label string (JSON
    /// lists need none) [default: the model's training setting].
    #[arg(long)]
    label_delimiter: Option<String>,
    /// Print a readable table instead of JSON.
    #[arg(long)]
    report: bool,
    /// Binary classifiers: score the most probable class, ignoring the
    /// decision threshold tuned on dev (to see what the threshold buys).
    #[arg(long)]
    argmax: bool,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    numerics: super::quantize::Numerics,
}

pub fn run(args: Args) -> Result<()> {
    if tag::is_token_classifier(&args.model)? {
        return evaluate_tagger(args);
    }
    let linears = args.numerics.load_linears(&args.model)?;
    let mut classifier =
        Classifier::load_with(CpuBackend::new(args.threads), &args.model, linears.as_ref())?;
    let multi_label = matches!(classifier.decision, Decision::MultiLabel { .. });
    if args.argmax {
        anyhow::ensure!(
            !multi_label && !classifier.regression,
            "--argmax applies to single-label classifiers; {} is {}",
            args.model.display(),
            if multi_label {
                "multi-label"
            } else {
                "a regression model"
            }
        );
        classifier.decision = Decision::Argmax;
    }
    let trained_delimiter = classifier
        .meta
        .as_ref()
        .and_then(|m| m.recipe["label_delimiter"].as_str().map(String::from));
    let spec = DataSpec {
        text_column: args.text_column,
        label_column: args.label_column,
        text_pair_column: args.text_pair_column,
        multi_label_delimiter: multi_label.then(|| {
            args.label_delimiter
                .or(trained_delimiter)
                .unwrap_or_else(|| "|".into())
        }),
        numeric_labels: classifier.regression,
        skip_bad_rows: false,
    };
    let dataset = data::read_dataset(&args.data, &spec)?;
    let classes = classifier.labels.len();
    let mut logits = Vec::with_capacity(dataset.examples.len() * classes);
    for chunk in dataset.examples.chunks(args.batch_size.max(1)) {
        let inputs: Vec<Input> = chunk
            .iter()
            .map(|e| Input {
                text: &e.text,
                pair: e.text_pair.as_deref(),
            })
            .collect();
        let encoded = classifier.encode(&inputs)?;
        logits.extend(classifier.logits_encoded(&encoded)?);
    }
    if classifier.regression {
        let gold = dataset.numeric_labels()?;
        let report = RegressionReport::compute(&gold, &logits);
        if args.report {
            outln!(
                "n {}  rmse {:.4}  mae {:.4}  pearson {:.4}  spearman {:.4}",
                report.n,
                report.rmse,
                report.mae,
                report.pearson,
                report.spearman
            )?;
        } else {
            outln!("{}", serde_json::to_string_pretty(&report.to_json())?)?;
        }
        return Ok(());
    }
    let label_set = LabelSet::from_labels(classifier.labels.clone())?;
    if multi_label {
        return print_multi_label(&classifier, &label_set, &dataset, &logits, args.report);
    }
    let gold = label_set.encode(&dataset)?;
    let predictions: Vec<usize> = classifier
        .decide(&logits)
        .iter()
        .map(|p| match p {
            Prediction::Class { label, .. } => *label,
            _ => unreachable!("a single-label decision gives classes"),
        })
        .collect();
    let report = ClassificationReport::compute(&classifier.labels, &gold, &predictions);
    if args.report {
        outln!("{}", report.to_table())?;
        return Ok(());
    }
    let probs = softmax_with_temperature(&logits, classes, classifier.temperature);
    let mut json = report.to_json();
    json["loss"] = nll(&logits, classes, &gold, classifier.temperature).into();
    json["ece"] = expected_calibration_error(&probs, classes, &gold, 15).into();
    json["temperature"] = classifier.temperature.into();
    if let Decision::PositiveThreshold { threshold, .. } = classifier.decision {
        json["threshold"] = threshold.into();
    }
    outln!("{}", serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

/// Micro/macro F1, subset accuracy and per-label scores of a multi-label
/// model (its stored thresholds applied), as JSON or, with `table`, a table.
fn print_multi_label<B: bertrt::backend::Backend>(
    classifier: &Classifier<B>,
    label_set: &LabelSet,
    dataset: &data::Dataset,
    logits: &[f32],
    table: bool,
) -> Result<()> {
    let classes = classifier.labels.len();
    let mut gold = vec![false; logits.len()];
    let mut targets = vec![0.0f32; logits.len()];
    for (i, set) in label_set.encode_label_sets(dataset)?.iter().enumerate() {
        for &l in set {
            gold[i * classes + l] = true;
            targets[i * classes + l] = 1.0;
        }
    }
    let mut predicted = vec![false; logits.len()];
    for (i, prediction) in classifier.decide(logits).iter().enumerate() {
        if let Prediction::Labels { labels, .. } = prediction {
            labels
                .iter()
                .for_each(|&l| predicted[i * classes + l] = true);
        }
    }
    let report = MultiLabelReport::compute(&classifier.labels, &gold, &predicted);
    if table {
        outln!("{}", report.to_table())?;
        return Ok(());
    }
    let mut json = report.to_json();
    json["loss"] = bce_with_logits(&mut vec![0.0; logits.len()], logits, &targets).into();
    if let Decision::MultiLabel { thresholds } = &classifier.decision {
        json["thresholds"] = classifier
            .labels
            .iter()
            .zip(thresholds)
            .map(|(label, &t)| (label.clone(), t.into()))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    outln!("{}", serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

/// Entity-level precision, recall and F1 (overall and per type) of a
/// token classifier on tagged sentences.
fn evaluate_tagger(args: Args) -> Result<()> {
    let linears = args.numerics.load_linears(&args.model)?;
    let mut tagger =
        Tagger::load_with(CpuBackend::new(args.threads), &args.model, linears.as_ref())?;
    let spec = data::TagSpec {
        tokens_column: args.tokens_column,
        tags_column: args.tags_column,
    };
    let dataset = data::read_tagged(&args.data, &spec)?;
    // Tags the model cannot output are an error, as in training.
    data::TagSet::from_tags(tagger.tags.clone()).encode(&dataset)?;
    let mut predicted: Vec<Vec<String>> = Vec::with_capacity(dataset.sentences.len());
    for chunk in dataset.sentences.chunks(args.batch_size.max(1)) {
        let words: Vec<Vec<&str>> = chunk
            .iter()
            .map(|s| s.words.iter().map(String::as_str).collect())
            .collect();
        for tags in tagger.tag_words(&words)? {
            predicted.push(
                tags.iter()
                    .map(|t| t.map_or("O".to_string(), |t| tagger.tags[t.tag].clone()))
                    .collect(),
            );
        }
    }
    let gold: Vec<Vec<String>> = dataset.sentences.iter().map(|s| s.tags.clone()).collect();
    let report = EntityReport::compute(&gold, &predicted);
    if args.report {
        outln!("{}", report.to_table())?;
    } else {
        outln!("{}", serde_json::to_string_pretty(&report.to_json())?)?;
    }
    Ok(())
}
