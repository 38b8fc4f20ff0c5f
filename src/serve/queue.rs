//! The bounded request queue and the dynamic batching policy.
//!
//! Workers pull: a worker that is free asks for the next batch, so batches
//! grow while the model is busy and requests never wait behind a batch that
//! was formed too early. A batch takes the oldest request, then requests for
//! the same task in the same length bucket, then (if budget remains) requests
//! from other buckets, up to the token budget and the sequence cap.
//!
//! Batches are packed (no padding), so mixing lengths costs no padding
//! compute; bucketing is a preference that keeps short requests together, so
//! their latency is not set by a long neighbour when there are enough of them
//! to fill a batch, without ever leaving budget unused.
//!
//! The `--max-wait-ms` delay is only spent when more work is known to be on
//! its way (requests admitted and still being tokenized): a lone request at
//! low load runs at once instead of waiting for company that is not coming.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::model::Task;
use crate::model::TokenBatch;

/// What a request gets back: one row per input, or why not.
pub type Reply = Result<Vec<Vec<f32>>, String>;

/// One HTTP request's inputs, tokenized, waiting for a model.
pub struct Job {
    pub task: Task,
    pub inputs: TokenBatch,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Reply>,
}

impl Job {
    /// Length bucket: powers of two, so 17..=32 tokens share a bucket.
    fn bucket(&self) -> u32 {
        self.inputs.max_len().next_power_of_two().trailing_zeros()
    }
}

/// Jobs that run in one forward pass, with their inputs packed together.
pub struct Batch {
    pub task: Task,
    pub inputs: TokenBatch,
    pub jobs: Vec<Job>,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Token budget per batch; a single request over it runs alone.
    pub max_batch_tokens: usize,
    /// Sequences per batch.
    pub max_batch_requests: usize,
    pub max_wait: Duration,
    /// Requests waiting (admitted or queued) before new ones get 429.
    pub capacity: usize,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    Full,
    Closed,
}

pub struct Queue {
    limits: Limits,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    queued_tokens: usize,
    queued_sequences: usize,
    /// Requests admitted and being tokenized, not yet pushed.
    incoming: usize,
    closed: bool,
}

impl State {
    fn waiting(&self) -> usize {
        self.jobs.len() + self.incoming
    }

    fn take(&mut self, index: usize) -> Job {
        let job = self.jobs.remove(index).expect("index within the queue");
        self.queued_tokens -= job.inputs.tokens();
        self.queued_sequences -= job.inputs.sequences();
        job
    }
}

/// A place in the queue held while a request is tokenized; dropping it
/// without [`Queue::push`] gives the place back.
pub struct Admission {
    queue: Arc<Queue>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.queue.lock().incoming -= 1;
        self.queue.changed.notify_all();
    }
}

impl Queue {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Queue {
            limits,
            state: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Requests queued, not yet taken by a worker.
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Reserves a place before the (costly) tokenization, so an overloaded
    /// server refuses work before doing any.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Rejected> {
        let mut state = self.lock();
        if state.closed {
            return Err(Rejected::Closed);
        }
        if state.waiting() >= self.limits.capacity {
            return Err(Rejected::Full);
        }
        state.incoming += 1;
        Ok(Admission {
            queue: Arc::clone(self),
        })
    }

    /// Queues `job` in the place `admission` reserved.
    pub fn push(&self, job: Job, admission: Admission) -> Result<(), Rejected> {
        let mut state = self.lock();
        if state.closed {
            return Err(Rejected::Closed);
        }
        state.queued_tokens += job.inputs.tokens();
        state.queued_sequences += job.inputs.sequences();
        state.jobs.push_back(job);
        drop(state);
        // Releases the reservation and wakes the workers.
        drop(admission);
        Ok(())
    }

    /// Stops admitting; workers finish what is queued, then get `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Blocks until a batch is ready, per the policy in the module docs;
    /// `None` once the queue is closed and empty.
    pub fn next_batch(&self) -> Option<Batch> {
        let limits = &self.limits;
        let mut state = self.lock();
        loop {
            // Requests whose client went away are dropped unserved.
            state.jobs.retain(|job| !job.reply.is_closed());
            state.queued_tokens = state.jobs.iter().map(|j| j.inputs.tokens()).sum();
            state.queued_sequences = state.jobs.iter().map(|j| j.inputs.sequences()).sum();
            let Some(oldest) = state.jobs.front() else {
                if state.closed {
                    return None;
                }
                state = self.wait(state, None);
                continue;
            };
            let deadline = oldest.enqueued + limits.max_wait;
            let full = state.queued_tokens >= limits.max_batch_tokens
                || state.queued_sequences >= limits.max_batch_requests;
            let now = Instant::now();
            if full || state.incoming == 0 || state.closed || now >= deadline {
                return Some(self.form_batch(&mut state));
            }
            state = self.wait(state, Some(deadline - now));
        }
    }

    fn form_batch(&self, state: &mut State) -> Batch {
        let limits = &self.limits;
        let first = state.take(0);
        let (task, bucket) = (first.task, first.bucket());
        let mut tokens = first.inputs.tokens();
        let mut sequences = first.inputs.sequences();
        let mut jobs = vec![first];
        for same_bucket_only in [true, false] {
            let mut i = 0;
            while i < state.jobs.len() {
                let job = &state.jobs[i];
                let fits = tokens + job.inputs.tokens() <= limits.max_batch_tokens
                    && sequences + job.inputs.sequences() <= limits.max_batch_requests;
                if job.task == task && fits && (!same_bucket_only || job.bucket() == bucket) {
                    let job = state.take(i);
                    tokens += job.inputs.tokens();
                    sequences += job.inputs.sequences();
                    jobs.push(job);
                } else {
                    i += 1;
                }
            }
        }
        let inputs = pack(jobs.iter().map(|job| &job.inputs));
        Batch { task, inputs, jobs }
    }

    fn wait<'a>(
        &self,
        state: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        match timeout {
            Some(timeout) => {
                self.changed
                    .wait_timeout(state, timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// The state holds no invariant a panic could break mid-update (every
    /// update is a few integer and deque operations), so a poisoned lock is
    /// still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Concatenates packed batches into one.
fn pack<'a>(parts: impl Iterator<Item = &'a TokenBatch>) -> TokenBatch {
    let mut packed = TokenBatch {
        offsets: vec![0],
        ..Default::default()
    };
    for part in parts {
        let base = packed.ids.len();
        packed.ids.extend_from_slice(&part.ids);
        packed.type_ids.extend_from_slice(&part.type_ids);
        packed
            .offsets
            .extend(part.offsets[1..].iter().map(|offset| base + offset));
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pooling;

    fn limits() -> Limits {
        Limits {
            max_batch_tokens: 100,
            max_batch_requests: 4,
            max_wait: Duration::from_millis(50),
            capacity: 8,
        }
    }

    fn inputs(lengths: &[usize]) -> TokenBatch {
        let mut offsets = vec![0];
        for len in lengths {
            offsets.push(offsets.last().unwrap() + len);
        }
        let tokens = *offsets.last().unwrap();
        TokenBatch {
            ids: (0..tokens as u32).collect(),
            type_ids: vec![0; tokens],
            offsets,
        }
    }

    fn push(queue: &Arc<Queue>, task: Task, lengths: &[usize]) -> oneshot::Receiver<Reply> {
        let (reply, receiver) = oneshot::channel();
        let admission = queue.admit().unwrap();
        let job = Job {
            task,
            inputs: inputs(lengths),
            enqueued: Instant::now(),
            reply,
        };
        queue.push(job, admission).unwrap();
        receiver
    }

    const EMBED: Task = Task::Embed(Pooling::Mean);

    #[test]
    fn batches_prefer_the_oldest_requests_bucket_then_fill() {
        let queue = Queue::new(limits());
        let _a = push(&queue, EMBED, &[10]);
        let _b = push(&queue, EMBED, &[60]);
        let _c = push(&queue, Task::Classify, &[10]);
        let _d = push(&queue, EMBED, &[12, 9]);
        let _e = push(&queue, EMBED, &[20]);
        let batch = queue.next_batch().unwrap();
        assert_eq!(batch.task, EMBED);
        // [10] then [12, 9] (same bucket), then [60] fits the budget, [20]
        // would pass the 100-token budget.
        let lengths: Vec<usize> = batch.jobs.iter().map(|j| j.inputs.tokens()).collect();
        assert_eq!(lengths, [10, 21, 60]);
        assert_eq!(batch.inputs.offsets, [0, 10, 22, 31, 91]);
        assert_eq!(&batch.inputs.ids[10..13], &[0, 1, 2]);
        let batch = queue.next_batch().unwrap();
        assert_eq!(batch.task, Task::Classify);
        let batch = queue.next_batch().unwrap();
        assert_eq!(batch.inputs.offsets, [0, 20]);
        assert_eq!(queue.depth(), 0);
    }

    #[test]
    fn oversized_request_runs_alone() {
        let queue = Queue::new(limits());
        let _a = push(&queue, EMBED, &[64, 64]);
        let _b = push(&queue, EMBED, &[5]);
        assert_eq!(queue.next_batch().unwrap().jobs.len(), 1);
        assert_eq!(queue.next_batch().unwrap().inputs.offsets, [0, 5]);
    }

    #[test]
    fn full_queue_rejects_and_places_come_back() {
        let queue = Queue::new(Limits {
            capacity: 2,
            ..limits()
        });
        let _a = push(&queue, EMBED, &[3]);
        let held = queue.admit().unwrap();
        assert_eq!(queue.admit().err(), Some(Rejected::Full));
        drop(held);
        let _b = push(&queue, EMBED, &[3]);
        assert_eq!(queue.admit().err(), Some(Rejected::Full));
        queue.next_batch().unwrap();
        assert!(queue.admit().is_ok());
    }

    #[test]
    fn waits_for_admitted_requests_up_to_max_wait() {
        let queue = Queue::new(limits());
        let _a = push(&queue, EMBED, &[3]);
        let admission = queue.admit().unwrap();
        let start = Instant::now();
        let pusher = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                let (reply, receiver) = oneshot::channel();
                let job = Job {
                    task: EMBED,
                    inputs: inputs(&[4]),
                    enqueued: Instant::now(),
                    reply,
                };
                queue.push(job, admission).unwrap();
                receiver
            })
        };
        let batch = queue.next_batch().unwrap();
        let _b = pusher.join().unwrap();
        assert_eq!(batch.jobs.len(), 2, "the admitted request joined the batch");
        assert!(start.elapsed() < Duration::from_millis(45));
    }

    #[test]
    fn lone_request_does_not_wait() {
        let queue = Queue::new(Limits {
            max_wait: Duration::from_secs(10),
            ..limits()
        });
        let _a = push(&queue, EMBED, &[3]);
        let start = Instant::now();
        queue.next_batch().unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn abandoned_requests_are_skipped_and_close_drains() {
        let queue = Queue::new(limits());
        drop(push(&queue, EMBED, &[3]));
        let _b = push(&queue, EMBED, &[4]);
        queue.close();
        assert_eq!(queue.admit().err(), Some(Rejected::Closed));
        assert_eq!(queue.next_batch().unwrap().inputs.offsets, [0, 4]);
        assert!(queue.next_batch().is_none());
    }
}
