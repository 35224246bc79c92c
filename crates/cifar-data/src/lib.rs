//! CIFAR-10 for the mixup benchmark: loading, augmentation, prefetching batches and on-device
//! normalization (spec §1 and §8.1).
//!
//! * [`load_train`] / [`load_test`] read the official binary layout (`data_batch_N.bin`) or
//!   torchvision's python-pickle layout (`cifar-10-batches-py`), validating every file.
//! * [`TrainLoader`] yields one epoch of `u8` batches: a seeded random order, then
//!   RandomCrop(32, padding 4) and a horizontal flip with p = 0.5, built on background threads.
//!   Everything random is a pure function of `(seed, epoch, batch)`, so resumed runs repeat
//!   the same batches.
//! * [`to_device_batch`] uploads a batch and normalizes it on the device with [`MEAN`] / [`STD`].
//! * [`download`] (feature `download`, on by default) fetches and md5-checks the official archive.
//!
//! ```no_run
//! use std::{path::Path, sync::Arc};
//! use cifar_data::{load_train, to_device_batch, LoaderConfig, TrainLoader};
//!
//! let train = Arc::new(load_train(Path::new("data/cifar10"))?);
//! let cfg = LoaderConfig { batch_size: 100, workers: 4, ..LoaderConfig::default() };
//! let device = candle_core::Device::Cpu;
//! for epoch in 0..2 {
//!     for batch in TrainLoader::new(train.clone(), cfg.clone(), epoch, 0)? {
//!         let (x, y) = to_device_batch(&batch, &device)?; // f32 N×3×32×32, u32 N
//!         # let _ = (x, y);
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod augment;
pub mod corrupt;
mod device;
#[cfg(feature = "download")]
mod download;
mod error;
mod loader;
mod pickle;
mod split;

use std::path::{Path, PathBuf};

pub use augment::{
    augment_image, batch_augment_params, epoch_permutation, AugmentParams, PaddingMode,
};
pub use corrupt::{image_rng, Corruption, SEVERITIES};
pub use device::{denormalize_to_u8, to_device_batch, MEAN, STD};
#[cfg(feature = "download")]
pub use download::{download, download_from_url, install_archive, md5_hex, OFFICIAL_BINARY_MD5};
pub use error::{DataError, OFFICIAL_BINARY_URL};
pub use loader::{bench_load_augment, test_batches, LoaderConfig, TrainLoader, U8Batch};
pub use split::{
    detect_layout, load_binary_file, load_pickle_file, load_test, load_test_limited, load_train,
    load_train_limited, write_binary_batch, CifarSplit, Layout, IMAGE_BYTES, NUM_CLASSES,
    RECORDS_PER_FILE, RECORD_BYTES, TEST_BINARY_FILE, TRAIN_BINARY_FILES,
};

/// Class names in label order (torchvision order).
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// A relative path from the environment, resolved against the directory the command was
/// typed in: cargo runs each test binary in its package's directory, but leaves `PWD` (set by
/// the shell) alone; without `PWD`, the workspace root (where the README's commands run).
fn resolve_from_invocation_dir(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        return path;
    }
    let base = std::env::var_os("PWD")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    base.join(path)
}

/// Where tests that need the full dataset find it: the directory in the `CIFAR10_DIR`
/// environment variable (a relative one is taken relative to where `cargo test` was typed).
///
/// When the variable is unset this returns `None` after printing a loud
/// `SKIPPED: set CIFAR10_DIR=...` line to stderr, so the calling test can return early —
/// except under CI (`CI=true`), where a missing dataset must not pass silently: then it panics,
/// failing the test.
pub fn cifar10_dir_for_tests() -> Option<PathBuf> {
    match std::env::var_os("CIFAR10_DIR") {
        Some(dir) if !dir.is_empty() => Some(resolve_from_invocation_dir(PathBuf::from(dir))),
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "CIFAR10_DIR is not set but CI=true: the real-data tests must run in CI. \
                     Set CIFAR10_DIR to a directory holding data_batch_1..5.bin and test_batch.bin"
                );
            }
            // Written to the stderr handle, not with `eprintln!`, so the test harness's output
            // capture cannot hide that the test did not really run.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: set CIFAR10_DIR=/path/to/cifar-10-batches-bin (data_batch_1..5.bin, \
                 test_batch.bin) to run this real-data test ***\n"
            );
            None
        }
    }
}
