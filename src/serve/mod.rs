//! `bertrt serve`: an HTTP server with dynamic batching.
//!
//! Request path: the handler (`routes`) parses and validates the body,
//! reserves a place in the bounded [`queue`] (429 when full), tokenizes
//! (inline when short, else on the blocking pool), and queues the tokens; a
//! `worker` thread per model replica pulls batches formed under the token
//! and request budgets, runs the model and replies. Every stage is measured
//! in `metrics`.
//!
//! Lifecycle: the model is loaded (errors surface before binding), the
//! server binds and prints `listening on ADDR`, each worker runs a warm-up
//! forward and `/health` turns 200 when all have. SIGTERM or SIGINT stops
//! accepting, lets in-flight requests finish (at most the drain timeout),
//! and returns.

mod error;
mod metrics;
pub mod model;
pub mod queue;
mod request;
mod routes;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::model::{LinearLoader, TokenBatch};
use crate::quant::{self, Bf16Linears, Int8Linears};
use metrics::Metrics;
use model::LinearNumerics;
use queue::{Limits, Queue};
use routes::App;

pub struct Options {
    pub model: PathBuf,
    /// What the linear layers run in; an INT8 model directory runs INT8
    /// whatever is asked here.
    pub numerics: LinearNumerics,
    pub host: String,
    /// 0 picks a free port (the bound address is printed).
    pub port: u16,
    /// Defaults to the model's position limit.
    pub max_input_length: Option<usize>,
    /// False: refuse over-long inputs (422) instead of truncating them.
    pub truncate: bool,
    pub limits: Limits,
    /// Model replicas, each with its own thread pool.
    pub workers: usize,
    /// Threads per replica; 0 splits the cores evenly across replicas.
    pub threads: usize,
    pub max_body_bytes: usize,
    pub drain_timeout: Duration,
}

/// How the CPU replicas load `dir`'s linear layers for `numerics`, and the
/// numerics they then run in (an INT8 model directory is served INT8).
pub fn linears_for(
    dir: &std::path::Path,
    numerics: LinearNumerics,
) -> Result<(Box<dyn LinearLoader<CpuBackend>>, LinearNumerics)> {
    if numerics == LinearNumerics::Bfloat16 {
        return Ok((Box::new(Bf16Linears), numerics));
    }
    let (linears, quantization) = Int8Linears::for_model(dir, numerics == LinearNumerics::Int8)?;
    if let Some(q) = &quantization {
        eprintln!("{}", q.summary());
    }
    let stored_int8 = quantization.is_none() && quant::is_int8_artifact(dir)?;
    let numerics = if stored_int8 {
        LinearNumerics::Int8
    } else {
        numerics
    };
    Ok((Box::new(linears), numerics))
}

/// Serves until SIGTERM or SIGINT, then drains and returns.
pub fn run(options: Options) -> Result<()> {
    check(&options)?;
    let threads = match options.threads {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / options.workers).max(1)
        }
        n => n,
    };
    let (linears, numerics) = linears_for(&options.model, options.numerics)?;
    let loaded = model::load(
        &options.model,
        options.workers,
        linears.as_ref(),
        numerics,
        options.max_input_length,
        options.truncate,
        || CpuBackend::new(threads),
    )?;
    let info = loaded.info;
    let warmup_task = info.head.warmup_task(info.pooling);
    let warmup_input = TokenBatch::from_encoded(&[loaded
        .tokenizer
        .encode("warm-up: the model runs once before serving")?]);

    let queue = Queue::new(options.limits);
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicUsize::new(0));
    eprintln!(
        "serving {} with {} worker(s) on {}",
        info.id, options.workers, info.backend
    );
    let workers = worker::spawn(
        loaded.replicas,
        &queue,
        &metrics,
        warmup_task,
        &warmup_input,
        &ready,
    );
    let app = Arc::new(App {
        info,
        tokenizer: loaded.tokenizer,
        queue: Arc::clone(&queue),
        metrics,
        ready,
        workers: options.workers,
        truncate: options.truncate,
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bertrt-http")
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the HTTP runtime: {e}")))?;
    let drained = runtime.block_on(serve_http(app, &options))?;
    queue.close();
    if drained {
        for handle in workers {
            // A worker only ends by panicking outside a batch, already reported.
            let _ = handle.join();
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn check(options: &Options) -> Result<()> {
    let limits = &options.limits;
    for (value, flag) in [
        (options.workers, "--workers"),
        (limits.max_batch_tokens, "--max-batch-tokens"),
        (limits.max_batch_requests, "--max-batch-requests"),
        (limits.capacity, "--max-queue"),
        (options.max_body_bytes, "--max-body-bytes"),
    ] {
        if value == 0 {
            return Err(Error::Invalid(format!("{flag} must be at least 1")));
        }
    }
    Ok(())
}

/// Binds, serves until a stop signal, then drains. Returns whether every
/// in-flight request finished within the drain timeout.
async fn serve_http(app: Arc<App>, options: &Options) -> Result<bool> {
    // Handlers go in before anything is printed, so a signal sent as soon as
    // the address appears is a graceful stop, not the default kill.
    let stop = stop_signal()?;
    let listener = tokio::net::TcpListener::bind((options.host.as_str(), options.port))
        .await
        .map_err(|e| {
            Error::Invalid(format!(
                "cannot listen on {}:{}: {e}",
                options.host, options.port
            ))
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Invalid(format!("cannot read the bound address: {e}")))?;
    eprintln!("listening on {address}");

    let begin_drain = Arc::new(tokio::sync::Notify::new());
    let router = routes::router(app, options.max_body_bytes);
    let server = {
        let begin_drain = Arc::clone(&begin_drain);
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { begin_drain.notified().await })
                .await
        })
    };
    stop.await;
    eprintln!(
        "stopping: no new connections, draining in-flight requests (at most {:?})",
        options.drain_timeout
    );
    // `notify_one` keeps a permit if the server is not waiting yet.
    begin_drain.notify_one();
    match tokio::time::timeout(options.drain_timeout, server).await {
        Ok(_) => {
            eprintln!("drained; exiting");
            Ok(true)
        }
        Err(_) => {
            eprintln!("drain timeout passed; exiting with requests still in flight");
            Ok(false)
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    let install =
        |e: std::io::Error| Error::Invalid(format!("cannot install signal handlers: {e}"));
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).map_err(install)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(install)?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        let _ = install;
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
