use anyhow::Result;

use bertrt::config::BertConfig;
use bertrt::model::ModelFiles;
use bertrt::tokenize::{BertTokenizer, TokenizerSource};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
}

pub fn run(args: Args) -> Result<()> {
    let files = ModelFiles::locate(&args.model.model)?;
    let config = BertConfig::from_file(&files.config)?;
    let ckpt = files.checkpoint()?;
    let max_length = args
        .model
        .max_length
        .unwrap_or(config.max_position_embeddings);
    let tokenizer = BertTokenizer::from_dir(&files.dir, max_length)?;
    let architecture = config
        .architectures
        .first()
        .map(String::as_str)
        .unwrap_or("BertModel");
    outln!("model:          {}", files.dir.display())?;
    outln!("architecture:   {architecture} ({})", config.model_type)?;
    outln!(
        "shape:          {} layers, hidden {}, {} heads, intermediate {}, vocab {}",
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.vocab_size
    )?;
    let parameters = ckpt.parameter_count();
    outln!("parameters:     {parameters}")?;
    outln!(
        "dtype:          {}",
        dtype_mix(&ckpt.parameters_by_dtype(), parameters)
    )?;
    let tokenizer_desc = match tokenizer.source() {
        TokenizerSource::TokenizerJson(path) => format!("{}", path.display()),
        TokenizerSource::VocabTxt { path, lowercase } => {
            format!("WordPiece from {} (lowercase: {lowercase})", path.display())
        }
    };
    outln!(
        "tokenizer:      {tokenizer_desc}, vocab {}",
        tokenizer.vocab_size()
    )?;
    outln!("max length:     {max_length}")?;
    outln!(
        "pooler:         {}",
        if ckpt.contains("pooler.dense.weight") {
            "yes"
        } else {
            "no"
        }
    )?;
    Ok(())
}

/// "F32", or for a mix (an INT8 model) each dtype's share of the
/// parameters: "I8 95.2%, F32 4.8%".
fn dtype_mix(by_dtype: &[(String, usize)], parameters: usize) -> String {
    match by_dtype {
        [] => "none".into(),
        [(dtype, _)] => dtype.clone(),
        mix => mix
            .iter()
            .map(|(dtype, n)| format!("{dtype} {:.1}%", 100.0 * *n as f64 / parameters as f64))
            .collect::<Vec<_>>()
            .join(", "),
    }
}
