//! The in-process numbers `bench/load.sh` compares the server against: the
//! same text, embedded without HTTP, queueing or batching.
//!
//! ```text
//! cargo run --release --example serve_baseline -- MODEL_DIR "TEXT" [ITERATIONS] [THREADS]
//! ```
//!
//! Prints p50/p95/p99 of one-text embedding (tokenize + forward + pool +
//! normalize, what one `/embed` request costs the model) and of the forward
//! alone, then the throughput of 32-text batches in texts per second.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bertrt::backend::cpu::CpuBackend;
use bertrt::embed::Embedder;

fn percentiles(mut samples: Vec<Duration>) -> [f64; 3] {
    samples.sort();
    [50.0, 95.0, 99.0].map(|p| {
        let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
        samples[rank].as_secs_f64() * 1e3
    })
}

fn time(iterations: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..iterations.div_ceil(10) {
        f();
    }
    (0..iterations)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

fn main() -> bertrt::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: serve_baseline MODEL_DIR TEXT [ITERATIONS] [THREADS]";
    let dir = PathBuf::from(args.next().expect(usage));
    let text = args.next().expect(usage);
    let iterations: usize = args.next().map_or(2000, |n| n.parse().expect(usage));
    let threads: usize = args.next().map_or(0, |n| n.parse().expect(usage));

    let mut embedder = Embedder::load(CpuBackend::new(threads), &dir, None, None, true)?;
    let tokens = embedder.tokenizer.encode(&text)?.ids.len();
    println!(
        "in-process, {} ({tokens} tokens per text)",
        embedder.model.backend_description()
    );
    println!("{:<34} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "p99 ms");

    let one = [text.as_str()];
    let [p50, p95, p99] = percentiles(time(iterations, || {
        embedder.embed(&one).unwrap();
    }));
    println!(
        "{:<34} {p50:>9.3} {p95:>9.3} {p99:>9.3}",
        "embed 1 text (tokenize..normalize)"
    );

    let batch = bertrt::model::TokenBatch::from_encoded(&[embedder.tokenizer.encode(&text)?]);
    let mut workspace = bertrt::model::Workspace::new(embedder.model.backend());
    let [p50, p95, p99] = percentiles(time(iterations, || {
        embedder.model.forward(&batch, &mut workspace).unwrap();
    }));
    println!("{:<34} {p50:>9.3} {p95:>9.3} {p99:>9.3}", "forward 1 text");

    let many = [text.as_str(); 32];
    let samples = time(iterations.div_ceil(16).max(20), || {
        embedder.embed(&many).unwrap();
    });
    let total: Duration = samples.iter().sum();
    let [p50, p95, p99] = percentiles(samples.clone());
    println!("{:<34} {p50:>9.3} {p95:>9.3} {p99:>9.3}", "embed 32 texts");
    println!(
        "batch-32 throughput: {:.1} texts/s",
        32.0 * samples.len() as f64 / total.as_secs_f64()
    );
    Ok(())
}
