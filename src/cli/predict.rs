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
        for prediction in classifier.predict(&inputs)? {
            writeln!(out, "{}", prediction.to_json(&classifier.labels))?;
        }
        Ok(())
    })?;
    Ok(())
}
