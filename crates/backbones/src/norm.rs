//! The one place where batch normalization is computed.
//!
//! PyTorch `BatchNorm2d` semantics (spec §2.1): `eps = 1e-5`, `momentum = 0.1`
//! with `running ← (1 − momentum)·running + momentum·batch_stat`; in training
//! mode the batch is normalized with the *biased* batch variance while the
//! running variance is updated with the *unbiased* one. Running statistics are
//! variables named `<prefix>.running_mean` / `<prefix>.running_var`, so they
//! live in the `VarMap` and are saved with checkpoints; they are updated in
//! place and never take part in autograd.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarBuilder;

use crate::init::{ParamKind, ParamRegistry};

/// PyTorch's default BatchNorm epsilon.
pub const BN_EPS: f64 = 1e-5;
/// PyTorch's default BatchNorm momentum (weight of the new batch statistic).
pub const BN_MOMENTUM: f64 = 0.1;

/// Affine 2-D batch normalization with running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    /// `(weight, bias)` detached once: same storage (updates in place reach them), no graph.
    untracked: (Tensor, Tensor),
    running_mean: Var,
    running_var: Var,
    channels: usize,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// Creates (or loads) `<prefix>.{weight,bias,running_mean,running_var}`.
    /// `zero_init` marks the last BN of a residual branch (weight 0 under the
    /// benchmark init scheme).
    pub fn new(
        channels: usize,
        zero_init: bool,
        vb: VarBuilder,
        reg: &mut ParamRegistry,
    ) -> Result<Self> {
        let weight = reg.get(&vb, channels, "weight", ParamKind::BnWeight { zero_init })?;
        let bias = reg.get(&vb, channels, "bias", ParamKind::BnBias)?;
        let running_mean = reg.get(&vb, channels, "running_mean", ParamKind::RunningMean)?;
        let running_var = reg.get(&vb, channels, "running_var", ParamKind::RunningVar)?;
        // For a VarMap-backed builder these are the map's own variables (same
        // storage), so in-place updates land in the map; for a checkpoint-backed
        // builder they become private copies.
        Ok(Self {
            untracked: (weight.detach(), bias.detach()),
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            channels,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        })
    }

    /// Number of normalized channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Current running mean (detached copy-free view).
    pub fn running_mean(&self) -> Tensor {
        self.running_mean.as_detached_tensor()
    }

    /// Current running variance (detached copy-free view).
    pub fn running_var(&self) -> Tensor {
        self.running_var.as_detached_tensor()
    }

    /// Normalizes an `N×C×H×W` batch. `train = true` uses batch statistics and
    /// updates the running ones; `train = false` uses the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, false)
    }

    /// `ReLU(forward_t(x, train))`, fused into the BatchNorm op in training mode (one kernel
    /// forward and one backward instead of separate BN and ReLU passes). Its gradient is zero
    /// where the normalized value is exactly 0, as PyTorch's ReLU (candle's `relu` passes it).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, true)
    }

    fn forward_impl(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4()?;
        if c != self.channels {
            candle_core::bail!("batch norm expects {} channels, got {c}", self.channels);
        }
        let in_dtype = x.dtype();
        // Half-precision statistics lose too much; compute them in f32.
        let x = match in_dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let weight = self.weight.to_dtype(x.dtype())?;
        let bias = self.bias.to_dtype(x.dtype())?;
        let y = if train {
            check_batch_values(&x)?;
            // Fused ops on CPU and CUDA (generic ops elsewhere): the batch-statistics op also
            // updates the running statistics in place, with PyTorch's rule
            // (`running ← (1 − momentum)·running + momentum·batch`, unbiased variance).
            let running = kernels::RunningStats {
                mean: self.running_mean.as_tensor(),
                var: self.running_var.as_tensor(),
                momentum: self.momentum,
            };
            kernels::batch_norm_train_update(&x, &weight, &bias, self.eps, relu, running)?
        } else {
            let rm = self.running_mean().to_dtype(x.dtype())?;
            let rv = self.running_var().to_dtype(x.dtype())?;
            if relu {
                kernels::batch_norm_relu_eval(&x, &rm, &rv, &weight, &bias, self.eps)?
            } else {
                kernels::batch_norm_eval(&x, &rm, &rv, &weight, &bias, self.eps)?
            }
        };
        y.to_dtype(in_dtype)
    }

    /// Training-mode BatchNorm(+ReLU) outside candle's autograd, updating the running
    /// statistics as [`Self::forward_t`]: a step of the taped training forward
    /// (`crate::tape`). Returns `y` and the batch statistics its backward needs.
    pub(crate) fn forward_train_untracked(
        &self,
        x: &Tensor,
        relu: bool,
    ) -> Result<(Tensor, Tensor)> {
        check_batch_values(x)?;
        let running = kernels::RunningStats {
            mean: self.running_mean.as_tensor(),
            var: self.running_var.as_tensor(),
            momentum: self.momentum,
        };
        kernels::batch_norm_train_saving(
            &x.detach(),
            &self.untracked.0,
            &self.untracked.1,
            self.eps,
            relu,
            running,
        )
    }

    /// Backward of [`Self::forward_train_untracked`] at input `x` with statistics `stats`:
    /// pushes the weight's and bias's gradients to `sink`, returns the input's.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        stats: &Tensor,
        grad_y: &Tensor,
        relu: bool,
        sink: &mut crate::tape::GradSink,
    ) -> Result<Tensor> {
        let (gx, gw, gb) = kernels::batch_norm_train_backward(
            x,
            &self.untracked.0,
            &self.untracked.1,
            stats,
            grad_y,
            self.eps,
            relu,
        )?;
        sink.push(&self.weight, gw);
        sink.push(&self.bias, gb);
        Ok(gx)
    }

    /// A step of a taped forward (`crate::tape`): [`Self::forward_train_untracked`] if
    /// `train`, else [`Self::forward_eval_untracked`]. Returns `y` and the statistics the
    /// matching [`Self::backward_taped`] reads.
    pub(crate) fn forward_taped(
        &self,
        x: &Tensor,
        relu: bool,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        if train {
            self.forward_train_untracked(x, relu)
        } else {
            self.forward_eval_untracked(x, relu)
        }
    }

    /// Backward of [`Self::forward_taped`] (same `relu` and `train`): parameter gradients
    /// into `sink` (training mode only), returns the input's.
    pub(crate) fn backward_taped(
        &self,
        x: &Tensor,
        stats: &Tensor,
        grad_y: &Tensor,
        relu: bool,
        train: bool,
        sink: &mut crate::tape::GradSink,
    ) -> Result<Tensor> {
        if train {
            self.backward(x, stats, grad_y, relu, sink)
        } else {
            self.backward_eval_input(x, stats, grad_y, relu)
        }
    }

    /// Evaluation-mode BatchNorm(+ReLU) outside candle's autograd, the same values as
    /// [`Self::forward_t`]`(x, false)`: a step of the taped saliency forward (`crate::tape`).
    /// Returns `y` and the packed running statistics `[mean, var]` its backward reads (a copy,
    /// so a later update of the running statistics cannot change the backward).
    pub(crate) fn forward_eval_untracked(
        &self,
        x: &Tensor,
        relu: bool,
    ) -> Result<(Tensor, Tensor)> {
        let stats = Tensor::cat(&[self.running_mean(), self.running_var()], 0)?;
        let (w, b) = (&self.untracked.0, &self.untracked.1);
        let y = kernels::batch_norm_eval_packed(&x.detach(), &stats, w, b, self.eps, relu)?;
        Ok((y, stats))
    }

    /// Input gradient of [`Self::forward_eval_untracked`] at input `x` with statistics
    /// `stats`. Computes no parameter gradient, so it refuses a BatchNorm whose weight is
    /// trained (its gradient would be silently lost).
    pub(crate) fn backward_eval_input(
        &self,
        x: &Tensor,
        stats: &Tensor,
        grad_y: &Tensor,
        relu: bool,
    ) -> Result<Tensor> {
        if self.weight.track_op() || self.bias.track_op() {
            candle_core::bail!(
                "the eval-mode taped backward computes input gradients only; this BatchNorm's parameters are trained"
            );
        }
        let (w, b) = (&self.untracked.0, &self.untracked.1);
        kernels::batch_norm_eval_backward_input(x, stats, w, b, grad_y, self.eps, relu)
    }
}

/// Batch statistics need more than one value per channel.
fn check_batch_values(x: &Tensor) -> Result<()> {
    let (n, _, h, w) = x.dims4()?;
    if n * h * w < 2 {
        candle_core::bail!(
            "batch norm in training mode needs more than one value per channel, got input {:?}",
            x.dims()
        );
    }
    Ok(())
}
