//! Which examples go into which batch, and in what order.

use crate::rng::{derive_seed, Rng};

/// Batches per length-sorted window when bucketing: large enough that
/// batches hold similar lengths, small enough that the order stays random.
const BUCKET_WINDOW_BATCHES: usize = 50;

/// The training batches of one epoch: a permutation of `0..lengths.len()`
/// cut into batches of `batch_size` (the last one may be smaller).
///
/// The order depends only on `seed` and `epoch`, so a run is reproducible and
/// a resumed run replays the same epochs. With `bucketed`, each window of
/// `batch_size * 50` shuffled examples is sorted by length before it is cut,
/// and the batches are then shuffled: each batch holds similar lengths, so
/// less compute goes to padding, while what a batch contains still varies
/// from epoch to epoch.
///
/// # Panics
/// If `batch_size` is 0.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
    bucketed: bool,
) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch size must be at least 1");
    let mut rng = Rng::new(derive_seed(seed, epoch as u64));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    if !bucketed {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    for window in order.chunks_mut(batch_size.saturating_mul(BUCKET_WINDOW_BATCHES)) {
        // Stable: equal lengths keep their shuffled order.
        window.sort_by_key(|&i| lengths[i]);
    }
    // Windows are whole multiples of `batch_size`, so only the very last
    // batch can be partial.
    let mut batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    rng.shuffle(&mut batches);
    batches
}

/// Evaluation batches, longest examples first: batches hold similar lengths
/// (little padding), and a batch too large for memory fails at once rather
/// than at the end. Callers put predictions back in example order using the
/// indices.
///
/// # Panics
/// If `batch_size` is 0.
pub fn eval_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch size must be at least 1");
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}
