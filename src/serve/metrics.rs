//! Prometheus metrics, written out by hand in the text exposition format.
//!
//! Histograms use fixed buckets chosen so that `histogram_quantile` gives
//! usable p50/p95/p99: latency buckets are roughly 1.5-2x apart from 50 µs to
//! 10 s, so an interpolated quantile is off by at most one bucket step.
//! Everything is lock-free atomics except the two label maps (route × status,
//! predicted class), whose locks are held for one map update.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Seconds; shared by every latency histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.001_5, 0.002, 0.003, 0.005,
    0.007_5, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const TOKEN_BUCKETS: &[f64] = &[
    16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0,
];
const INPUT_LENGTH_BUCKETS: &[f64] = &[4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
const CONFIDENCE_BUCKETS: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99];

/// A cumulative histogram over fixed upper bounds (`+Inf` implied).
struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (non-cumulative) counts; the last slot is `+Inf`.
    counts: Vec<AtomicU64>,
    /// The running sum, as `f64` bits (updated by compare-and-swap).
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, value: f64) {
        let slot = self.bounds.partition_point(|&bound| bound < value);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(bound) => format!("{bound}"),
                None => "+Inf".into(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// The routes that get their own label; anything else is counted as
/// `"other"` so that scanners cannot blow up the label set.
pub const ROUTES: &[&str] = &[
    "/embed",
    "/predict",
    "/tokenize",
    "/info",
    "/health",
    "/metrics",
];

pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// One per entry of [`ROUTES`], then one for `"other"`.
    request_duration: Vec<Histogram>,
    queue_duration: Histogram,
    inference_duration: Histogram,
    tokenization_duration: Histogram,
    batch_size: Histogram,
    batch_tokens: Histogram,
    input_length: Histogram,
    predictions: Mutex<BTreeMap<String, u64>>,
    confidence: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            request_duration: (0..=ROUTES.len())
                .map(|_| Histogram::new(LATENCY_BUCKETS))
                .collect(),
            queue_duration: Histogram::new(LATENCY_BUCKETS),
            inference_duration: Histogram::new(LATENCY_BUCKETS),
            tokenization_duration: Histogram::new(LATENCY_BUCKETS),
            batch_size: Histogram::new(BATCH_SIZE_BUCKETS),
            batch_tokens: Histogram::new(TOKEN_BUCKETS),
            input_length: Histogram::new(INPUT_LENGTH_BUCKETS),
            predictions: Mutex::default(),
            confidence: Histogram::new(CONFIDENCE_BUCKETS),
        }
    }
}

/// The label for a request path: itself when it is one of [`ROUTES`].
pub fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|route| **route == path)
        .copied()
        .unwrap_or("other")
}

impl Metrics {
    pub fn record_request(&self, path: &str, status: u16, took: Duration) {
        let route = route_label(path);
        *lock(&self.requests).entry((route, status)).or_default() += 1;
        let slot = ROUTES
            .iter()
            .position(|r| *r == route)
            .unwrap_or(ROUTES.len());
        self.request_duration[slot].observe(took.as_secs_f64());
    }

    pub fn record_queue_time(&self, took: Duration) {
        self.queue_duration.observe(took.as_secs_f64());
    }

    pub fn record_batch(&self, sequences: usize, tokens: usize, took: Duration) {
        self.batch_size.observe(sequences as f64);
        self.batch_tokens.observe(tokens as f64);
        self.inference_duration.observe(took.as_secs_f64());
    }

    pub fn record_tokenization(&self, took: Duration, input_lengths: impl Iterator<Item = usize>) {
        self.tokenization_duration.observe(took.as_secs_f64());
        for len in input_lengths {
            self.input_length.observe(len as f64);
        }
    }

    pub fn record_prediction(&self, label: &str, confidence: f32) {
        *lock(&self.predictions).entry(label.to_owned()).or_default() += 1;
        self.confidence.observe(f64::from(confidence));
    }

    /// The exposition text; `queue_depth` is sampled by the caller.
    pub fn render(&self, queue_depth: usize) -> String {
        let mut out = String::with_capacity(16 * 1024);
        header(
            &mut out,
            "bertrt_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), count) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "bertrt_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        header(
            &mut out,
            "bertrt_request_duration_seconds",
            "histogram",
            "Time from request received to response ready, by route.",
        );
        for (route, histogram) in ROUTES.iter().chain(&["other"]).zip(&self.request_duration) {
            histogram.write(
                &mut out,
                "bertrt_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        let histograms = [
            (
                "bertrt_queue_duration_seconds",
                "Time a request waited in the batch queue.",
                &self.queue_duration,
            ),
            (
                "bertrt_inference_duration_seconds",
                "Model time per batch (forward, pooling or head).",
                &self.inference_duration,
            ),
            (
                "bertrt_tokenization_duration_seconds",
                "Tokenization time per request.",
                &self.tokenization_duration,
            ),
            (
                "bertrt_batch_size",
                "Sequences per batch.",
                &self.batch_size,
            ),
            (
                "bertrt_batch_tokens",
                "Tokens per batch.",
                &self.batch_tokens,
            ),
            (
                "bertrt_input_length_tokens",
                "Tokens per input, special tokens included, after truncation.",
                &self.input_length,
            ),
            (
                "bertrt_prediction_confidence",
                "Probability of each predicted class per /predict input (score of each entity for a token classifier).",
                &self.confidence,
            ),
        ];
        for (name, help, histogram) in histograms {
            header(&mut out, name, "histogram", help);
            histogram.write(&mut out, name, "");
        }
        header(
            &mut out,
            "bertrt_queue_depth",
            "gauge",
            "Requests waiting in the batch queue.",
        );
        let _ = writeln!(out, "bertrt_queue_depth {queue_depth}");
        header(
            &mut out,
            "bertrt_predictions_total",
            "counter",
            "Predicted classes per /predict input (entities by type for a token classifier).",
        );
        for (label, count) in lock(&self.predictions).iter() {
            let _ = writeln!(
                out,
                "bertrt_predictions_total{{label=\"{}\"}} {count}",
                escape_label(label)
            );
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values may contain `\`, `"` and newlines, which the format escapes.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Metrics must keep working after a panic elsewhere poisoned a lock: the
/// maps hold plain counts, which a panic cannot leave half-updated.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        metrics.record_batch(3, 100, Duration::from_millis(4));
        metrics.record_batch(1, 10, Duration::from_millis(1));
        let text = metrics.render(2);
        assert!(text.contains("bertrt_batch_size_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("bertrt_batch_size_bucket{le=\"4\"} 2\n"));
        assert!(text.contains("bertrt_batch_size_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("bertrt_batch_tokens_sum 110\n"));
        assert!(text.contains("bertrt_inference_duration_seconds_count 2\n"));
        assert!(text.contains("bertrt_queue_depth 2\n"));
    }

    #[test]
    fn requests_are_labelled_by_known_route_only() {
        let metrics = Metrics::default();
        metrics.record_request("/embed", 200, Duration::from_micros(300));
        metrics.record_request("/../../etc/passwd", 404, Duration::from_micros(10));
        metrics.record_prediction("a \"quoted\" label", 0.97);
        let text = metrics.render(0);
        assert!(text.contains("bertrt_requests_total{route=\"/embed\",status=\"200\"} 1\n"));
        assert!(text.contains("bertrt_requests_total{route=\"other\",status=\"404\"} 1\n"));
        assert!(text.contains(
            "bertrt_request_duration_seconds_bucket{route=\"/embed\",le=\"0.0003\"} 1\n"
        ));
        assert!(text.contains("bertrt_predictions_total{label=\"a \\\"quoted\\\" label\"} 1\n"));
        assert!(text.contains("bertrt_prediction_confidence_bucket{le=\"0.99\"} 1\n"));
    }
}
