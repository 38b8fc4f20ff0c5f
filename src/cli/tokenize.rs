use anyhow::Result;
use serde::Serialize;

use bertrt::config::BertConfig;
use bertrt::model::ModelFiles;
use bertrt::tokenize::BertTokenizer;

use super::input::{for_each_chunk, InputArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    #[command(flatten)]
    input: InputArgs,
}

#[derive(Serialize)]
struct Line<'a> {
    ids: &'a [u32],
    tokens: &'a [String],
}

pub fn run(args: Args) -> Result<()> {
    let files = ModelFiles::locate(&args.model.model)?;
    let config = BertConfig::from_file(&files.config)?;
    let max_length = args
        .model
        .max_length
        .unwrap_or(config.max_position_embeddings);
    let tokenizer = BertTokenizer::from_dir(&files.dir, max_length)?;
    for_each_chunk(&args.input, 1024, |texts, out| {
        for encoded in tokenizer.encode_batch(texts)? {
            let line = Line {
                ids: &encoded.ids,
                tokens: &encoded.tokens,
            };
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })?;
    Ok(())
}
