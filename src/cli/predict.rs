use std::path::PathBuf;

use anyhow::{bail, Result};

use bertrt::backend::cpu::CpuBackend;
use bertrt::classify::{Classifier, Input};

use super::input::{for_each_chunk, InputArgs};

#[derive(clap::Args)]
pub struct Args {
    /// A fine-tuned model directory.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    input: InputArgs,
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
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let linears = super::quantize::load_linears(&args.model, args.int8)?;
    let mut classifier =
        Classifier::load_with(CpuBackend::new(args.threads), &args.model, &linears)?;
    for_each_chunk(&args.input, args.batch_size, |texts, out| {
        let inputs: Vec<Input> = texts
            .iter()
            .map(|&text| Input { text, pair: None })
            .collect();
        if classifier.regression {
            let encoded = classifier.encode(&inputs)?;
            for score in classifier.logits_encoded(&encoded)? {
                writeln!(out, "{}", serde_json::json!({ "score": score }))?;
            }
            return Ok(());
        }
        for probs in classifier.probabilities(&inputs)? {
            let best = (0..probs.len())
                .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
                .unwrap_or(0);
            let by_label: serde_json::Map<String, serde_json::Value> = classifier
                .labels
                .iter()
                .zip(&probs)
                .map(|(label, p)| (label.clone(), (*p).into()))
                .collect();
            let line = serde_json::json!({"label": classifier.labels[best], "probs": by_label});
            writeln!(out, "{line}")?;
        }
        Ok(())
    })?;
    Ok(())
}
