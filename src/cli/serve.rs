use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

use super::quantize::Dtype;
use bertrt::serve::model::LinearNumerics;
use bertrt::serve::queue::Limits;
use bertrt::serve::{self, Options};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: a Hugging Face encoder (embeddings) or a fine-tuned artifact.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    numerics: super::quantize::Numerics,
    /// Address to bind; loopback by default, so exposing the server is a choice.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0: any free port; the bound address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Token budget per batch (a single larger request runs alone).
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Inputs per batch, and per request (more is refused with 422); a
    /// token classifier's text over the max input length counts once per
    /// window.
    #[arg(long, default_value_t = 64)]
    max_batch_requests: usize,
    /// Longest a request waits for others to join its batch; only spent while
    /// more requests are on their way.
    #[arg(long, default_value_t = 2.0)]
    max_wait_ms: f64,
    /// Requests waiting for a model before new ones get 429.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Truncate inputs to this many tokens, special tokens included (a token
    /// classifier runs longer texts in windows of this many instead)
    /// [default: the model's max_position_embeddings].
    #[arg(long, alias = "max-length")]
    max_input_length: Option<usize>,
    /// Refuse inputs over the max input length (422) instead of truncating them.
    #[arg(long)]
    no_truncate: bool,
    /// Model replicas, each on its own thread pool.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// CPU threads per worker (0: the cores split evenly across workers).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Largest request body accepted; larger ones get 413.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout_secs: f64,
}

pub fn run(args: Args) -> Result<()> {
    let duration = |value: f64, flag: &str| match Duration::try_from_secs_f64(value) {
        Ok(duration) => Ok(duration),
        Err(_) => bail!("{flag} must be a non-negative number, got {value}"),
    };
    serve::run(Options {
        model: args.model,
        numerics: match (args.numerics.int8, args.numerics.dtype) {
            (true, _) => LinearNumerics::Int8,
            (false, Dtype::Bf16) => LinearNumerics::Bfloat16,
            (false, Dtype::Fp32) => LinearNumerics::Float32,
        },
        host: args.host,
        port: args.port,
        max_input_length: args.max_input_length,
        truncate: !args.no_truncate,
        limits: Limits {
            max_batch_tokens: args.max_batch_tokens,
            max_batch_requests: args.max_batch_requests,
            max_wait: duration(args.max_wait_ms / 1e3, "--max-wait-ms")?,
            capacity: args.max_queue,
        },
        workers: args.workers,
        threads: args.threads,
        max_body_bytes: args.max_body_bytes,
        drain_timeout: duration(args.drain_timeout_secs, "--drain-timeout-secs")?,
    })?;
    Ok(())
}
