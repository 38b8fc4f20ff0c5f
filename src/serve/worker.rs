//! Model worker threads: each owns one replica, pulls batches from the
//! queue, and answers every request in the batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::metrics::Metrics;
use super::model::{Model, Task};
use super::queue::{Batch, Queue};
use crate::model::TokenBatch;

/// Starts one thread per replica. Each runs a warm-up forward on
/// `warmup_input` first and then counts itself in `ready`, which `/health`
/// reads; a replica whose warm-up fails never becomes ready.
pub fn spawn(
    replicas: Vec<Box<dyn Model>>,
    queue: &Arc<Queue>,
    metrics: &Arc<Metrics>,
    warmup: Task,
    warmup_input: &TokenBatch,
    ready: &Arc<AtomicUsize>,
) -> Vec<JoinHandle<()>> {
    replicas
        .into_iter()
        .enumerate()
        .map(|(index, mut model)| {
            let queue = Arc::clone(queue);
            let metrics = Arc::clone(metrics);
            let ready = Arc::clone(ready);
            let warmup_input = warmup_input.clone();
            std::thread::Builder::new()
                .name(format!("bertrt-worker-{index}"))
                .spawn(move || {
                    match guarded(|| model.run(warmup, &warmup_input)) {
                        Ok(_) => {
                            ready.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(error) => {
                            eprintln!("worker {index}: warm-up failed: {error}");
                            return;
                        }
                    }
                    while let Some(batch) = queue.next_batch() {
                        serve_batch(model.as_mut(), batch, &metrics);
                    }
                })
                .expect("cannot start a model worker thread")
        })
        .collect()
}

/// Runs `batch` and replies to each request with its rows, in input order.
/// A failure (error or panic) fails this batch's requests only.
fn serve_batch(model: &mut dyn Model, batch: Batch, metrics: &Metrics) {
    let started = Instant::now();
    for job in &batch.jobs {
        metrics.record_queue_time(started - job.enqueued);
    }
    let result = guarded(|| model.run(batch.task, &batch.inputs));
    metrics.record_batch(
        batch.inputs.sequences(),
        batch.inputs.tokens(),
        started.elapsed(),
    );
    match result {
        Ok(rows) if rows.len() == batch.inputs.sequences() => {
            let mut rows = rows.into_iter();
            for job in batch.jobs {
                let mine = rows.by_ref().take(job.inputs.sequences()).collect();
                // The client may have gone; nothing to do then.
                let _ = job.reply.send(Ok(mine));
            }
        }
        Ok(rows) => {
            let message = format!(
                "the model returned {} rows for {} inputs",
                rows.len(),
                batch.inputs.sequences()
            );
            fail(batch, &message);
        }
        Err(error) => {
            eprintln!("inference failed: {error}");
            fail(batch, &error);
        }
    }
}

fn fail(batch: Batch, message: &str) {
    for job in batch.jobs {
        let _ = job.reply.send(Err(message.to_owned()));
    }
}

/// Runs `f`, turning both its error and a panic into a message. The replica
/// stays usable after a panic: its buffers are resized on every forward.
fn guarded(f: impl FnOnce() -> crate::Result<Vec<Vec<f32>>>) -> Result<Vec<Vec<f32>>, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("inference panicked: {what}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::model::Pooling;
    use crate::serve::queue::{Job, Limits, Reply};

    /// Echoes each sequence's first id; panics on id 666.
    struct Echo;

    impl Model for Echo {
        fn embed(&mut self, batch: &TokenBatch, _: Pooling) -> crate::Result<Vec<Vec<f32>>> {
            Ok(batch.offsets[..batch.sequences()]
                .iter()
                .map(|&start| {
                    if batch.ids[start] == 666 {
                        panic!("poisoned input");
                    }
                    vec![batch.ids[start] as f32]
                })
                .collect())
        }

        fn classify(&mut self, _: &TokenBatch) -> crate::Result<Vec<Vec<f32>>> {
            Err(crate::Error::Invalid("no head".into()))
        }
    }

    fn send(queue: &Arc<Queue>, ids: &[u32]) -> oneshot::Receiver<Reply> {
        let (reply, receiver) = oneshot::channel();
        let admission = queue.admit().unwrap();
        let inputs = TokenBatch {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
            offsets: (0..=ids.len()).collect(),
        };
        let job = Job {
            task: Task::Embed(Pooling::Mean),
            inputs,
            enqueued: Instant::now(),
            reply,
        };
        queue.push(job, admission).unwrap();
        receiver
    }

    #[test]
    fn a_panic_fails_its_batch_and_the_worker_keeps_serving() {
        let queue = Queue::new(Limits {
            max_batch_tokens: 1,
            max_batch_requests: 1,
            max_wait: Duration::ZERO,
            capacity: 16,
        });
        let metrics = Arc::new(Metrics::default());
        let ready = Arc::new(AtomicUsize::new(0));
        let poisoned = send(&queue, &[666]);
        let fine = send(&queue, &[7]);
        let pair = send(&queue, &[3, 4]);
        let workers = spawn(
            vec![Box::new(Echo)],
            &queue,
            &metrics,
            Task::Embed(Pooling::Mean),
            &TokenBatch {
                ids: vec![1],
                type_ids: vec![0],
                offsets: vec![0, 1],
            },
            &ready,
        );
        let error = poisoned.blocking_recv().unwrap().unwrap_err();
        assert!(error.contains("panicked: poisoned input"), "{error}");
        assert_eq!(fine.blocking_recv().unwrap().unwrap(), [[7.0]]);
        assert_eq!(pair.blocking_recv().unwrap().unwrap(), [[3.0], [4.0]]);
        assert_eq!(ready.load(Ordering::SeqCst), 1);
        queue.close();
        for worker in workers {
            worker.join().unwrap();
        }
    }
}
