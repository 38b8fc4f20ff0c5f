use anyhow::{bail, Result};
use serde::Serialize;

use bertrt::backend::cpu::CpuBackend;
use bertrt::backend::Backend;
use bertrt::embed::Embedder;
use bertrt::model::Pooling;

use super::device::{start_cuda, Device};
use super::input::{for_each_chunk, InputArgs};
use super::quantize::Dtype;

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
    /// Where the encoder runs: cpu, cuda (device 0) or cuda:N; CUDA runs
    /// fp32 only.
    #[arg(long, default_value_t = Device::Cpu)]
    device: Device,
    /// CPU threads (0: one per core; --device cpu only).
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
    match args.device {
        Device::Cpu => {
            let linears = args.numerics.load_linears(&args.model.model)?;
            let embedder = Embedder::load_with(
                CpuBackend::new(args.threads),
                &args.model.model,
                args.model.max_length,
                args.pooling,
                args.normalize,
                linears.as_ref(),
            )?;
            embed_all(embedder, &args)
        }
        Device::Cuda(ordinal) => {
            if args.numerics.int8 || args.numerics.dtype != Dtype::Fp32 {
                bail!(
                    "--device cuda runs the encoder in fp32; --int8 and --dtype bf16 are CPU paths"
                );
            }
            let embedder = Embedder::load(
                start_cuda(ordinal)?,
                &args.model.model,
                args.model.max_length,
                args.pooling,
                args.normalize,
            )?;
            embed_all(embedder, &args)
        }
    }
}

/// Embeds every input line, in order, one JSON line each.
fn embed_all<B: Backend>(mut embedder: Embedder<B>, args: &Args) -> Result<()> {
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
    })
}
