use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use bertrt::config::BertConfig;
use bertrt::model::ModelFiles;
use bertrt::tokenize::BertTokenizer;

use super::input::{InputArgs, Texts};

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
    let mut texts_in = Texts::open(&args.input)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let chunk = texts_in.next_chunk(1024)?;
        if chunk.is_empty() {
            break;
        }
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for encoded in tokenizer.encode_batch(&texts)? {
            serde_json::to_writer(
                &mut out,
                &Line {
                    ids: &encoded.ids,
                    tokens: &encoded.tokens,
                },
            )?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}
