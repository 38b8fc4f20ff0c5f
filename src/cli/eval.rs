use std::path::PathBuf;

use anyhow::Result;

use bertrt::backend::cpu::CpuBackend;
use bertrt::classify::{Classifier, Input};
use bertrt::data::{self, DataSpec, LabelSet};
use bertrt::eval::calibration::{expected_calibration_error, nll, softmax_with_temperature};
use bertrt::eval::{ClassificationReport, RegressionReport};

#[derive(clap::Args)]
pub struct Args {
    /// A fine-tuned model directory.
    #[arg(long)]
    model: PathBuf,
    /// Labeled data: .csv, .tsv or .jsonl.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long, default_value = "label")]
    label_column: String,
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Print a readable table instead of JSON.
    #[arg(long)]
    report: bool,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Run the encoder's linear layers in INT8: an f32 model is quantized on
    /// load (calibrated on built-in sentences, as `bertrt quantize` does);
    /// an INT8 model (from `bertrt quantize`) runs INT8 without this flag.
    #[arg(long)]
    int8: bool,
}

pub fn run(args: Args) -> Result<()> {
    let linears = super::quantize::load_linears(&args.model, args.int8)?;
    let mut classifier =
        Classifier::load_with(CpuBackend::new(args.threads), &args.model, &linears)?;
    let spec = DataSpec {
        text_column: args.text_column,
        label_column: args.label_column,
        text_pair_column: args.text_pair_column,
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
            println!(
                "n {}  rmse {:.4}  mae {:.4}  pearson {:.4}  spearman {:.4}",
                report.n, report.rmse, report.mae, report.pearson, report.spearman
            );
        } else {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        }
        return Ok(());
    }
    let gold = LabelSet::from_labels(classifier.labels.clone())?.encode(&dataset)?;
    let predictions: Vec<usize> = logits
        .chunks_exact(classes)
        .map(|row| {
            (0..classes)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0)
        })
        .collect();
    let report = ClassificationReport::compute(&classifier.labels, &gold, &predictions);
    if args.report {
        println!("{}", report.to_table());
        return Ok(());
    }
    let probs = softmax_with_temperature(&logits, classes, classifier.temperature);
    let mut json = report.to_json();
    json["loss"] = nll(&logits, classes, &gold, classifier.temperature).into();
    json["ece"] = expected_calibration_error(&probs, classes, &gold, 15).into();
    json["temperature"] = classifier.temperature.into();
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
