//! The in-process numbers `bench/load.sh` compares the server against: the
//! work one `/embed` request costs, without HTTP, queueing or batching.
//!
//! ```text
//! cargo run --release --example serve_baseline -- MODEL_DIR "TEXT" [ITERATIONS] [THREADS] [float32|bfloat16|int8]
//! ```
//!
//! It loads the model exactly as `bertrt serve` does (the same replica type,
//! backend and tokenizer settings) and times the calls a server request makes
//! on its way through: tokenize, pack, forward + pool on the replica, L2
//! normalize. Prints p50/p95/p99 of one text, of the forward + pool alone, and
//! of 32-text batches with their throughput in texts per second.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bertrt::backend::cpu::CpuBackend;
use bertrt::embed::l2_normalize;
use bertrt::model::TokenBatch;
use bertrt::serve;
use bertrt::serve::model::{self, LinearNumerics, Model, Task};
use bertrt::tokenize::BertTokenizer;

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

/// What one `/embed` request with `texts` costs the server's model side.
fn embed(tokenizer: &BertTokenizer, replica: &mut dyn Model, task: Task, texts: &[&str]) {
    let encoded: Vec<_> = texts.iter().map(|t| tokenizer.encode(t).unwrap()).collect();
    let batch = TokenBatch::from_encoded(&encoded);
    for mut row in replica.run(task, &batch).unwrap() {
        l2_normalize(&mut row);
    }
}

fn main() -> bertrt::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage =
        "usage: serve_baseline MODEL_DIR TEXT [ITERATIONS] [THREADS] [float32|bfloat16|int8]";
    let dir = PathBuf::from(args.next().expect(usage));
    let text = args.next().expect(usage);
    let iterations: usize = args.next().map_or(2000, |n| n.parse().expect(usage));
    let threads: usize = args.next().map_or(0, |n| n.parse().expect(usage));
    let numerics = match args.next().as_deref() {
        None | Some("float32") => LinearNumerics::Float32,
        Some("bfloat16") => LinearNumerics::Bfloat16,
        Some("int8") => LinearNumerics::Int8,
        Some(_) => panic!("{usage}"),
    };

    let (linears, numerics) = serve::linears_for(&dir, numerics)?;
    let loaded = model::load(&dir, 1, linears.as_ref(), numerics, None, true, || {
        CpuBackend::new(threads)
    })?;
    let tokenizer = &loaded.tokenizer;
    let mut replica = loaded.replicas.into_iter().next().expect("one replica");
    let task = Task::Embed(loaded.info.pooling);
    let tokens = tokenizer.encode(&text)?.ids.len();
    println!(
        "in-process, {}, {} ({tokens} tokens per text)",
        loaded.info.backend,
        numerics.name()
    );
    println!("{:<34} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "p99 ms");

    let one = [text.as_str()];
    let [p50, p95, p99] = percentiles(time(iterations, || {
        embed(tokenizer, replica.as_mut(), task, &one);
    }));
    println!(
        "{:<34} {p50:>9.3} {p95:>9.3} {p99:>9.3}",
        "embed 1 text (tokenize..normalize)"
    );

    let batch = TokenBatch::from_encoded(&[tokenizer.encode(&text)?]);
    let [p50, p95, p99] = percentiles(time(iterations, || {
        replica.run(task, &batch).unwrap();
    }));
    println!(
        "{:<34} {p50:>9.3} {p95:>9.3} {p99:>9.3}",
        "forward + pool 1 text"
    );

    let many = [text.as_str(); 32];
    let samples = time(iterations.div_ceil(16).max(20), || {
        embed(tokenizer, replica.as_mut(), task, &many);
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
