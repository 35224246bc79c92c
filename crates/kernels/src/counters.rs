//! Invocation counters of the custom ops, for `runner bench --count-ops`.
//!
//! Every custom op records one invocation per call (on any device) together with the number of
//! CUDA kernel launches (or cuDNN calls) that the same call makes on CUDA, as documented at each
//! op. On CPU the launch figure is what the CUDA build would launch for the same call, so a CPU
//! run predicts the CUDA count of our ops. Counting is a relaxed atomic add per call.

use std::sync::atomic::{AtomicU64, Ordering};

/// Kinds of custom-op calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `conv2d` forward (1 cuDNN call).
    ConvForward,
    /// `conv2d` backward (1 cuDNN call per needed gradient: data, filter).
    ConvBackward,
    /// BatchNorm batch statistics, with the running-statistics update folded in (2 launches:
    /// partial sums per chunk of images and channel, then one thread per channel).
    BnStats,
    /// BatchNorm(+ReLU) normalisation (1 launch).
    BnForward,
    /// BatchNorm(+ReLU) backward (2 launches: partial sums, then the input gradient, whose
    /// blocks finish the sums).
    BnBackward,
    /// Running-statistics update as a separate in-place op (CPU side of the folded update:
    /// 0 CUDA launches, the CUDA stats kernel writes them).
    BnRunning,
    /// Residual `relu(a + b)` forward (1 launch).
    AddReluForward,
    /// Residual `relu(a + b)` backward (1 launch).
    AddReluBackward,
    /// SGD update of one parameter (1 launch).
    Sgd,
    /// SGD update of many parameters in one pass (1 launch per chunk of parameters).
    SgdMulti,
    /// Soft-target cross-entropy forward (1 launch).
    SoftCeForward,
    /// Soft-target cross-entropy backward (1 launch).
    SoftCeBackward,
}

const KINDS: [OpKind; 12] = [
    OpKind::ConvForward,
    OpKind::ConvBackward,
    OpKind::BnStats,
    OpKind::BnForward,
    OpKind::BnBackward,
    OpKind::BnRunning,
    OpKind::AddReluForward,
    OpKind::AddReluBackward,
    OpKind::Sgd,
    OpKind::SgdMulti,
    OpKind::SoftCeForward,
    OpKind::SoftCeBackward,
];

impl OpKind {
    /// Stable name used in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::ConvForward => "conv2d_forward",
            OpKind::ConvBackward => "conv2d_backward",
            OpKind::BnStats => "batch_norm_stats",
            OpKind::BnForward => "batch_norm_forward",
            OpKind::BnBackward => "batch_norm_backward",
            OpKind::BnRunning => "batch_norm_running_update",
            OpKind::AddReluForward => "add_relu_forward",
            OpKind::AddReluBackward => "add_relu_backward",
            OpKind::Sgd => "sgd_update",
            OpKind::SgdMulti => "sgd_update_multi",
            OpKind::SoftCeForward => "soft_cross_entropy_forward",
            OpKind::SoftCeBackward => "soft_cross_entropy_backward",
        }
    }
}

static CALLS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];
static LAUNCHES: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

/// Records one call of `kind` that makes `cuda_launches` launches on CUDA.
pub(crate) fn record(kind: OpKind, cuda_launches: u64) {
    let i = kind as usize;
    CALLS[i].fetch_add(1, Ordering::Relaxed);
    LAUNCHES[i].fetch_add(cuda_launches, Ordering::Relaxed);
}

static VIEWS: AtomicU64 = AtomicU64::new(0);

/// Records `n` view tensors (narrow/reshape of a packed result; no launch) that an op's
/// backward creates.
pub(crate) fn record_views(n: u64) {
    VIEWS.fetch_add(n, Ordering::Relaxed);
}

/// View tensors created by the custom ops' backward since the last [`reset_op_counts`]: they
/// count as candle tensors but launch nothing.
pub fn op_views() -> u64 {
    VIEWS.load(Ordering::Relaxed)
}

/// Counts of one op kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpCount {
    /// The op kind.
    pub kind: OpKind,
    /// Calls since the last [`reset_op_counts`].
    pub calls: u64,
    /// CUDA launches (kernels or cuDNN calls) those calls make on CUDA.
    pub cuda_launches: u64,
}

/// Counts of every kind since the last [`reset_op_counts`] (process-wide, all threads).
pub fn op_counts() -> Vec<OpCount> {
    KINDS
        .iter()
        .map(|&kind| OpCount {
            kind,
            calls: CALLS[kind as usize].load(Ordering::Relaxed),
            cuda_launches: LAUNCHES[kind as usize].load(Ordering::Relaxed),
        })
        .collect()
}

/// Sets every counter to zero.
pub fn reset_op_counts() {
    VIEWS.store(0, Ordering::Relaxed);
    for i in 0..KINDS.len() {
        CALLS[i].store(0, Ordering::Relaxed);
        LAUNCHES[i].store(0, Ordering::Relaxed);
    }
}
