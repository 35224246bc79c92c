//! Fast custom ops for training convolutional networks with candle, on CPU and CUDA.
//!
//! * [`conv2d`]: convolution whose backward computes the input and weight gradients in one op,
//!   all groups in one call. On CPU: im2col + GEMM forward, GEMM + col2im (or flipped-kernel
//!   conv) input gradient, im2col + GEMM weight gradient. On CUDA (feature `cudnn`): cuDNN
//!   forward, backward-data and backward-filter with cached descriptors and algorithms.
//!   Stock candle computes the input gradient with a naive `conv_transpose2d`, the weight
//!   gradient (under `cudnn`) with a naive direct conv, and runs one convolution per group.
//! * [`batch_norm_train`] / [`batch_norm_relu_train`]: training-mode BatchNorm (optionally
//!   fused with ReLU) whose forward and whole backward are each one fused op (CPU and CUDA).
//! * [`add_relu`]: residual `relu(a + b)`, one op forward and one backward (CPU and CUDA).
//! * [`batch_norm_eval`] / [`batch_norm_relu_eval`]: evaluation-mode BatchNorm (optionally
//!   fused with ReLU), one op forward; on CPU one backward computing only the needed gradients.
//! * [`soft_cross_entropy`]: the mixed-label (soft-target) cross-entropy of a batch, one op
//!   forward and one backward (CPU and CUDA).
//! * [`sgd_update`] / [`sgd_update_multi`]: the SGD-with-momentum update in place, of one
//!   parameter or of many (one multi-tensor launch on CUDA).
//! * [`ema_update`]: a momentum copy's parameter update `θ_k ← m·θ_k + (1 − m)·θ_q` in place,
//!   one CPU pass (generic ops elsewhere).
//!
//! Each op's backward is also a function (`conv2d_backward`, `batch_norm_train_backward`,
//! `add_relu_backward`), for callers that run their own backward pass (the backbones' taped
//! training forward), with `fused_ops_cover` telling where they run natively.
//!
//! Device code is kept apart: module `cpu` holds the CPU kernels on plain slices, module `cuda`
//! (feature `cuda`) the CUDA launches; the op plumbing in the top-level modules is shared.
//! On devices and dtypes that an op does not cover, every function falls back to candle's
//! generic ops ([`reference`](mod@reference)), so callers never need to branch.

mod batch_norm;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod bn_grid;
mod conv;
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
mod conv_algo;
mod counters;
mod cpu;
mod cpu_features;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod ema;
mod loss;
mod memory;
pub mod reference;
mod residual;
mod settings;
mod sgd;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod thread_rule;

pub use batch_norm::{
    batch_norm_eval, batch_norm_eval_backward_input, batch_norm_eval_backward_input_generic,
    batch_norm_eval_packed, batch_norm_relu_eval, batch_norm_relu_train, batch_norm_train,
    batch_norm_train_backward, batch_norm_train_saving, batch_norm_train_update, fused_ops_cover,
    RunningStats,
};
pub use conv::{conv2d, conv2d_backward, ConvParams};
pub use counters::{op_counts, op_views, reset_op_counts, OpCount, OpKind};
pub use cpu_features::{cpu_bf16_units, CpuBf16Units};
pub use device::cuda_device;
pub use ema::ema_update;
pub use loss::soft_cross_entropy;
pub use memory::keep_freed_memory;
pub use residual::{add_relu, add_relu_backward};
pub use settings::{deterministic, precision, set_deterministic, set_precision, Precision};
pub use sgd::{sgd_update, sgd_update_multi, SgdParam, SgdStep};

/// Hooks for the device tests (`tests/cuda_agreement.rs`); not part of the API.
#[doc(hidden)]
pub mod test_hooks {
    pub use crate::conv_algo::{conv_algorithms_skipped, fail_first_conv_algorithm};
}

/// Timing hooks for the kernel benchmarks (`examples/`); not part of the API.
#[doc(hidden)]
pub mod bench_hooks {
    pub use crate::cpu::winograd::{transform_timings, TransformTiming};
}

/// Whether the fused ops (BatchNorm, residual, loss) cover these tensors: f32 on the CPU, or
/// (feature `cuda`) f32 on one CUDA device.
pub(crate) fn fused_covers(tensors: &[&candle_core::Tensor]) -> bool {
    use candle_core::{DType, Device};
    let f32_args = tensors.iter().all(|t| t.dtype() == DType::F32);
    let on_cpu = tensors.iter().all(|t| matches!(t.device(), Device::Cpu));
    let on_cuda = cfg!(feature = "cuda")
        && tensors
            .iter()
            .all(|t| t.device().is_cuda() && t.device().same_device(tensors[0].device()));
    f32_args && (on_cpu || on_cuda)
}

/// Whether this build routes CUDA f32 convolutions through cuDNN (feature `cudnn`).
pub const CUDNN_CONV: bool = cfg!(feature = "cudnn");
