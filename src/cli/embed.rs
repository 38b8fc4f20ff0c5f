use std::io::Write;

use anyhow::{bail, Result};
use serde::Serialize;

use bertrt::backend::cpu::CpuBackend;
use bertrt::embed::Embedder;
use bertrt::model::Pooling;

use super::input::{InputArgs, Texts};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    #[command(flatten)]
    input: InputArgs,
    /// How token states become one vector [default: the model's
    /// sentence-transformers pooling config, else mean].
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    /// Scale each embedding to unit L2 norm.
    #[arg(long)]
    normalize: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Serialize)]
struct Line<'a> {
    embedding: &'a [f32],
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut embedder = Embedder::load(
        CpuBackend::new(args.threads),
        &args.model.model,
        args.model.max_length,
        args.pooling,
        args.normalize,
    )?;
    let mut texts_in = Texts::open(&args.input)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let chunk = texts_in.next_chunk(args.batch_size)?;
        if chunk.is_empty() {
            break;
        }
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for embedding in embedder.embed(&texts)? {
            serde_json::to_writer(
                &mut out,
                &Line {
                    embedding: &embedding,
                },
            )?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}
