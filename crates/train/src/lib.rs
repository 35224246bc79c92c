//! Training machinery shared by the runner and AutoMix (spec §3, §8.2, §8.3):
//!
//! * [`loss`]: the three head losses on mixed labels (`CE_none`, `CE_soft`, `CE_sigm`);
//! * [`sgd`]: SGD with momentum and weight decay (PyTorch semantics), parameter groups;
//! * [`schedule`]: per-epoch cosine learning rate and a general cosine annealing helper;
//! * [`metrics`]: top-k accuracy, `acc_mix`, and the median-of-last-epochs summary;
//! * [`checkpoint`]: atomic safetensors checkpoints with JSON metadata and retention;
//! * [`log`]: the JSON-lines training log and its reader.

pub mod checkpoint;
pub mod error;
pub mod log;
pub mod loss;
pub mod metrics;
pub mod schedule;
pub mod sgd;

pub use error::{TrainError, TrainResult};
pub use loss::{cross_entropy, mixed_loss, HeadLoss};
pub use schedule::{cosine_anneal, cosine_lr};
pub use sgd::{trainable_vars, GroupLr, GroupOptions, Sgd};
