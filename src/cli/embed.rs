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
    /// Run the encoder's linear layers in INT8: an f32 model is quantized on
    /// load (calibrated on built-in sentences, as `bertrt quantize` does);
    /// an INT8 model (from `bertrt quantize`) runs INT8 without this flag.
    #[arg(long)]
    int8: bool,
}

#[derive(Serialize)]
struct Line<'a> {
    embedding: &'a [f32],
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let linears = super::quantize::load_linears(&args.model.model, args.int8)?;
    let mut embedder = Embedder::load_with(
        CpuBackend::new(args.threads),
        &args.model.model,
        args.model.max_length,
        args.pooling,
        args.normalize,
        &linears,
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
