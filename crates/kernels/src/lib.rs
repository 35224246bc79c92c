//! Fast custom ops for training convolutional networks with candle on CPU.
//!
//! * [`conv2d`]: im2col + GEMM convolution whose backward computes the input gradient with
//!   GEMM + col2im and the weight gradient with im2col + GEMM; grouped convolution runs all
//!   groups in one op. Stock candle computes the input gradient with a naive
//!   `conv_transpose2d` and runs one convolution per group.
//! * [`batch_norm_train`] / [`batch_norm_relu_train`]: training-mode BatchNorm (optionally
//!   fused with ReLU) whose forward and whole backward are each one fused op.
//! * [`batch_norm_eval`]: evaluation-mode BatchNorm as a broadcast affine.
//!
//! The custom ops run on CPU f32 tensors; on other devices or dtypes every function falls back
//! to candle's generic ops ([`reference`]), so callers never need to branch. Each op keeps its
//! kernels in plain slice functions (module `cpu`) behind the candle op plumbing, so a CUDA kernel can
//! be added as the op's `cuda_fwd` without changing the public API.

mod batch_norm;
mod conv;
mod cpu;
pub mod reference;

pub use batch_norm::{batch_norm_eval, batch_norm_relu_train, batch_norm_train};
pub use conv::{conv2d, ConvParams};
