//! Command-line parsing and printing; every command is a few calls into the
//! library.
//!
//! Results go to stdout through [`outln!`] or a writer on the locked stdout,
//! never `println!`: that panics when the reader has gone (`bertrt info |
//! head -1`), where a write error lets [`run`] end quietly.
#![deny(clippy::print_stdout)]

/// `println!` that returns the write's `io::Result` instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod device;
mod embed;
mod eval;
mod finetune;
mod info;
mod input;
mod predict;
mod quantize;
mod serve;
mod tokenize;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bertrt",
    version,
    about = "Fine-tune and serve BERT-family encoders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model directory: architecture, parameters, dtype, tokenizer.
    Info(info::Args),
    /// Tokenize text lines (stdin or --input) to JSON lines of ids and tokens.
    Tokenize(tokenize::Args),
    /// Embed text lines (stdin or --input) to JSON lines {"embedding": [...]}.
    Embed(embed::Args),
    /// Fine-tune a sequence classifier; writes a calibrated model directory.
    Finetune(Box<finetune::Args>),
    /// Evaluate a fine-tuned model on labeled data (JSON, or --report table).
    Eval(eval::Args),
    /// Classify text lines to JSON lines {"label": ..., "probs": {...}}.
    Predict(predict::Args),
    /// Quantize a model to INT8, checked against f32; writes an INT8 model directory.
    Quantize(quantize::Args),
    /// Serve a model over HTTP with dynamic batching (/embed, /predict, /tokenize, /metrics).
    Serve(serve::Args),
}

/// Flags shared by every command that loads a model.
#[derive(clap::Args)]
struct ModelArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json or vocab.txt).
    #[arg(long)]
    model: PathBuf,
    /// Truncate inputs to this many tokens, special tokens included
    /// [default: the model's max_position_embeddings].
    #[arg(long)]
    max_length: Option<usize>,
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(args) => info::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Finetune(args) => finetune::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader stopped early (`| head`): it has all it wanted.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `error` is a write to a closed pipe, directly or through
/// `serde_json::to_writer` (whose error does not expose the `io::Error` as a
/// source).
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let kind = cause
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| cause.downcast_ref::<serde_json::Error>()?.io_error_kind());
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}
