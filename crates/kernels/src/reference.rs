//! Reference implementations from candle's stock ops: the fallback on devices and dtypes the
//! custom ops do not cover, and the ground truth in tests and benchmarks.

use crate::ConvParams;
use candle_core::{bail, Result, Tensor};

/// candle's own `conv2d` (its backward uses `conv_transpose2d` for the input gradient).
pub fn conv2d(x: &Tensor, w: &Tensor, cfg: ConvParams) -> Result<Tensor> {
    x.conv2d(w, cfg.padding, cfg.stride, 1, cfg.groups)
}

/// Training-mode BatchNorm from generic ops: returns `(y, batch_mean, biased batch_var)` with
/// the statistics detached, matching [`crate::batch_norm_train`].
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("reference::batch_norm_train: input must be [N, C, ...], got {dims:?}");
    }
    let (n, c) = (dims[0], dims[1]);
    let x3 = x.reshape((n, c, ()))?;
    let mean = x3.mean_keepdim(2)?.mean_keepdim(0)?;
    let centered = x3.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
    let y = centered
        .broadcast_div(&(&var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.reshape((1, c, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1))?)?
        .reshape(dims)?;
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

/// The running-statistics update from generic ops, `running ← (1 − m)·running + m·batch` with
/// the unbiased variance (`count` values per channel), written back in place. This is the
/// formulation the fused update reproduces bit for bit.
pub fn update_running_stats(
    running: crate::RunningStats<'_>,
    mean: &Tensor,
    biased_var: &Tensor,
    count: usize,
) -> Result<()> {
    let m = running.momentum;
    let dtype = running.mean.dtype();
    let mean = mean.detach().flatten_all()?.to_dtype(dtype)?;
    let unbiased = (biased_var.detach().flatten_all()? * (count as f64 / (count - 1) as f64))?
        .to_dtype(dtype)?;
    let new_mean = ((running.mean.detach() * (1.0 - m))? + (mean * m)?)?;
    let new_var = ((running.var.detach() * (1.0 - m))? + (unbiased * m)?)?;
    running.mean.slice_set(&new_mean.contiguous()?, 0, 0)?;
    running.var.slice_set(&new_var.contiguous()?, 0, 0)
}

/// Soft-target cross-entropy from generic ops, `(1/N) Σ_i Σ_c −t_ic · log softmax(z_i)_c`,
/// matching [`crate::soft_cross_entropy`] (which skips `t = 0` terms; here they add `0 · log p`,
/// the same unless a logit is infinite).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
    (targets * log_probs)?.sum(1)?.mean_all()?.neg()
}
