//! Batching: the augmented, prefetching training loader and the sequential test batches.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver};
use serde::{Deserialize, Serialize};

use crate::augment::{augment_image, batch_augment_params, epoch_permutation, PaddingMode};
use crate::error::DataError;
use crate::split::{CifarSplit, IMAGE_BYTES};

/// A batch of `u8` images on the host, ready for [`crate::to_device_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct U8Batch {
    /// `len × 3 × 32 × 32` bytes, CHW per image.
    pub pixels: Vec<u8>,
    /// One class index per image.
    pub labels: Vec<u32>,
    /// Number of images.
    pub len: usize,
}

impl U8Batch {
    /// The 3072 CHW bytes of image `i`. Panics when `i >= len`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }
}

/// Options of the training loader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    /// Images per batch (100 in the benchmark).
    pub batch_size: usize,
    /// Background threads that build batches; 0 builds them on the calling thread. The
    /// batches are identical for every value.
    pub workers: usize,
    /// Batches built ahead of the consumer (shared out among the workers, at least one each).
    pub prefetch: usize,
    /// Border fill of the random crop.
    pub padding_mode: PaddingMode,
    /// Seed of the data order and the augmentation.
    pub seed: u64,
    /// Drop a final partial batch (the benchmark keeps it; 50,000 / 100 has none anyway).
    pub drop_last: bool,
}

impl Default for LoaderConfig {
    /// The benchmark's settings: batch 100, 4 workers, zero padding, seed 0.
    fn default() -> Self {
        LoaderConfig {
            batch_size: 100,
            workers: 4,
            prefetch: 8,
            padding_mode: PaddingMode::Constant,
            seed: 0,
            drop_last: false,
        }
    }
}

/// Everything needed to build any batch of one epoch; shared read-only by the workers.
struct EpochPlan {
    split: Arc<CifarSplit>,
    order: Vec<usize>,
    batch_size: usize,
    n_batches: usize,
    seed: u64,
    epoch: usize,
    padding_mode: PaddingMode,
}

impl EpochPlan {
    fn build(&self, batch: usize) -> U8Batch {
        let start = batch * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        let indices = &self.order[start..end];
        let params = batch_augment_params(self.seed, self.epoch, batch, indices.len());
        let mut pixels = vec![0u8; indices.len() * IMAGE_BYTES];
        let mut labels = Vec::with_capacity(indices.len());
        for ((&idx, p), dst) in indices
            .iter()
            .zip(&params)
            .zip(pixels.chunks_exact_mut(IMAGE_BYTES))
        {
            augment_image(self.split.image(idx), dst, *p, self.padding_mode);
            labels.push(self.split.labels[idx] as u32);
        }
        U8Batch {
            pixels,
            labels,
            len: indices.len(),
        }
    }
}

/// One epoch of augmented training batches, in a seeded random order.
///
/// Batch `b` of epoch `e` is a pure function of `(seed, e, b)` (see [`crate::augment`]), so a
/// loader created with `start_batch = b` continues a run exactly, whatever the worker count.
/// With `workers > 0` the batches are built on background threads, each keeping up to its share
/// of `prefetch` finished batches queued; they are delivered in order. Dropping the loader stops
/// and joins the threads.
pub struct TrainLoader {
    plan: Arc<EpochPlan>,
    next_batch: usize,
    start_batch: usize,
    receivers: Vec<Receiver<U8Batch>>,
    workers: Vec<JoinHandle<()>>,
}

impl TrainLoader {
    /// Starts epoch `epoch` (0-based) at batch `start_batch` (0 for a fresh epoch).
    ///
    /// Errors when `batch_size` is 0, the split is empty, or `start_batch` is beyond the epoch.
    pub fn new(
        split: Arc<CifarSplit>,
        cfg: LoaderConfig,
        epoch: usize,
        start_batch: usize,
    ) -> Result<Self, DataError> {
        if cfg.batch_size == 0 {
            return Err(DataError::Config("batch_size must be at least 1".into()));
        }
        if split.is_empty() {
            return Err(DataError::Config("the training split has no images".into()));
        }
        let n_batches = Self::count_batches(split.len(), cfg.batch_size, cfg.drop_last);
        if start_batch > n_batches {
            return Err(DataError::Config(format!(
                "start_batch {start_batch} is beyond the {n_batches} batches of an epoch"
            )));
        }
        let plan = Arc::new(EpochPlan {
            order: epoch_permutation(split.len(), cfg.seed, epoch),
            split,
            batch_size: cfg.batch_size,
            n_batches,
            seed: cfg.seed,
            epoch,
            padding_mode: cfg.padding_mode,
        });
        let n_workers = cfg.workers.min(n_batches - start_batch);
        let mut receivers = Vec::with_capacity(n_workers);
        let mut workers = Vec::with_capacity(n_workers);
        if n_workers > 0 {
            let per_worker = cfg.prefetch.div_ceil(n_workers).max(1);
            for w in 0..n_workers {
                let (tx, rx) = bounded(per_worker);
                let plan = Arc::clone(&plan);
                let handle = std::thread::Builder::new()
                    .name(format!("cifar-loader-{w}"))
                    .spawn(move || {
                        for b in (start_batch + w..plan.n_batches).step_by(n_workers) {
                            if tx.send(plan.build(b)).is_err() {
                                return; // the loader was dropped
                            }
                        }
                    })
                    .map_err(|e| DataError::Config(format!("cannot start a loader thread: {e}")))?;
                receivers.push(rx);
                workers.push(handle);
            }
        }
        Ok(TrainLoader {
            plan,
            next_batch: start_batch,
            start_batch,
            receivers,
            workers,
        })
    }

    /// Batches in an epoch of `n_images` images.
    pub fn count_batches(n_images: usize, batch_size: usize, drop_last: bool) -> usize {
        if drop_last {
            n_images / batch_size
        } else {
            n_images.div_ceil(batch_size)
        }
    }

    /// Batches in this loader's full epoch (including any skipped by `start_batch`).
    pub fn batches_per_epoch(&self) -> usize {
        self.plan.n_batches
    }

    /// The epoch this loader serves.
    pub fn epoch(&self) -> usize {
        self.plan.epoch
    }

    /// Index within the epoch of the batch the next call to `next()` returns.
    pub fn next_batch_index(&self) -> usize {
        self.next_batch
    }

    /// The dataset indices of the epoch in visiting order.
    pub fn order(&self) -> &[usize] {
        &self.plan.order
    }
}

impl Iterator for TrainLoader {
    type Item = U8Batch;

    fn next(&mut self) -> Option<U8Batch> {
        if self.next_batch >= self.plan.n_batches {
            return None;
        }
        let b = self.next_batch;
        self.next_batch += 1;
        if self.receivers.is_empty() {
            return Some(self.plan.build(b));
        }
        let w = (b - self.start_batch) % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(batch) => Some(batch),
            // A worker only hangs up early by panicking; surface that instead of a short epoch.
            Err(_) => panic!("cifar-data loader thread {w} died while building batch {b}"),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.plan.n_batches - self.next_batch;
        (left, Some(left))
    }
}

impl ExactSizeIterator for TrainLoader {}

impl Drop for TrainLoader {
    fn drop(&mut self) {
        // Disconnecting the channels makes every blocked `send` fail, so the threads exit.
        self.receivers.clear();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// The split in order, in batches of `batch_size` (the last one may be smaller), without
/// augmentation. Panics when `batch_size` is 0.
pub fn test_batches(split: &CifarSplit, batch_size: usize) -> impl Iterator<Item = U8Batch> + '_ {
    assert!(
        batch_size > 0,
        "test_batches: batch_size must be at least 1"
    );
    (0..split.len()).step_by(batch_size).map(move |start| {
        let end = (start + batch_size).min(split.len());
        U8Batch {
            pixels: split.images[start * IMAGE_BYTES..end * IMAGE_BYTES].to_vec(),
            labels: split.labels[start..end].iter().map(|&l| l as u32).collect(),
            len: end - start,
        }
    })
}

/// Measures load + augment throughput of [`TrainLoader`] in images per second over `n_batches`
/// batches (continuing into further epochs if needed), with `workers` threads and a prefetch
/// of two batches per worker. The split is copied once before timing starts.
pub fn bench_load_augment(
    split: &CifarSplit,
    batch_size: usize,
    workers: usize,
    n_batches: usize,
) -> f64 {
    let split = Arc::new(split.clone());
    let cfg = LoaderConfig {
        batch_size: batch_size.max(1),
        workers,
        prefetch: 2 * workers.max(1),
        ..LoaderConfig::default()
    };
    if split.is_empty() || n_batches == 0 {
        return 0.0;
    }
    let started = Instant::now();
    let mut images = 0usize;
    let mut batches = 0usize;
    let mut epoch = 0;
    while batches < n_batches {
        let loader = TrainLoader::new(Arc::clone(&split), cfg.clone(), epoch, 0)
            .expect("bench_load_augment: loader configuration is valid by construction");
        for batch in loader.take(n_batches - batches) {
            images += batch.len;
            batches += 1;
        }
        epoch += 1;
    }
    images as f64 / started.elapsed().as_secs_f64()
}
