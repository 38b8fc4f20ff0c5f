use std::path::PathBuf;

use anyhow::{bail, Result};

use bertrt::backend::cpu::CpuBackend;
use bertrt::classify::{Classifier, Input};
use bertrt::tag::{self, Tagger};

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
    /// Token classifiers: print every word with its character offsets, tag
    /// and logits (`{"words": [{"text", "start", "end", "tag", "logits"}]}`)
    /// instead of the entities.
    #[arg(long)]
    words: bool,
    #[command(flatten)]
    numerics: super::quantize::Numerics,
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if tag::is_token_classifier(&args.model)? {
        return predict_entities(args);
    }
    if args.words {
        bail!(
            "--words is for token classifiers; {} is not one",
            args.model.display()
        );
    }
    let linears = args.numerics.load_linears(&args.model)?;
    let mut classifier =
        Classifier::load_with(CpuBackend::new(args.threads), &args.model, linears.as_ref())?;
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

/// Token classifiers: `{"entities": [{"type", "text", "start", "end",
/// "score"}]}` per line, offsets in characters of the line (or, with
/// `--words`, every word).
fn predict_entities(args: Args) -> Result<()> {
    let linears = args.numerics.load_linears(&args.model)?;
    let mut tagger =
        Tagger::load_with(CpuBackend::new(args.threads), &args.model, linears.as_ref())?;
    for_each_chunk(&args.input, args.batch_size, |texts, out| {
        if args.words {
            for words in tagger.predict_words(texts)? {
                writeln!(out, "{}", serde_json::json!({ "words": words }))?;
            }
            return Ok(());
        }
        for entities in tagger.predict(texts)? {
            writeln!(out, "{}", serde_json::json!({ "entities": entities }))?;
        }
        Ok(())
    })?;
    Ok(())
}
