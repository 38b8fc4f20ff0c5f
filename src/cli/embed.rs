use anyhow::{bail, Result};
use serde::Serialize;

use bertrt::backend::cpu::CpuBackend;
use bertrt::embed::Embedder;
use bertrt::model::Pooling;

use super::input::{for_each_chunk, InputArgs};

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
    #[command(flatten)]
    numerics: super::quantize::Numerics,
}

#[derive(Serialize)]
struct Line<'a> {
    embedding: &'a [f32],
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let linears = args.numerics.load_linears(&args.model.model)?;
    let mut embedder = Embedder::load_with(
        CpuBackend::new(args.threads),
        &args.model.model,
        args.model.max_length,
        args.pooling,
        args.normalize,
        linears.as_ref(),
    )?;
    for_each_chunk(&args.input, args.batch_size, |texts, out| {
        for embedding in embedder.embed(texts)? {
            serde_json::to_writer(
                &mut *out,
                &Line {
                    embedding: &embedding,
                },
            )?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })?;
    Ok(())
}
