//! Training-mode BatchNorm on contiguous `[batch, channels, plane]` f32 buffers.
//!
//! Per-channel work is parallel over channels (reductions) or over `(image, channel)` planes
//! (element-wise passes), so each pass reads memory in contiguous runs of one plane.

use rayon::prelude::*;

/// Layout of a BatchNorm input viewed as `[batch, channels, plane]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BnGeom {
    pub batch: usize,
    pub channels: usize,
    pub plane: usize,
}

impl BnGeom {
    /// Values per channel (`batch · plane`).
    pub(crate) fn count(&self) -> usize {
        self.batch * self.plane
    }
    fn channel_planes<'a>(&self, data: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> {
        let (channels, plane) = (self.channels, self.plane);
        (0..self.batch).map(move |n| &data[(n * channels + c) * plane..][..plane])
    }
}

/// Per-channel batch mean and biased variance, packed as `[mean (C), var (C)]`.
///
/// Two passes (mean, then squared deviations) so the variance does not suffer the
/// cancellation of `E[x²] - E[x]²` on activations with a large mean.
pub(crate) fn bn_stats(g: &BnGeom, x: &[f32]) -> Vec<f32> {
    let count = g.count().max(1) as f64;
    let per_channel: Vec<(f32, f32)> = (0..g.channels)
        .into_par_iter()
        .map(|c| {
            let sum: f64 = g
                .channel_planes(x, c)
                .map(|p| p.iter().map(|&v| v as f64).sum::<f64>())
                .sum();
            let mean = sum / count;
            let m = mean as f32;
            let sq: f64 = g
                .channel_planes(x, c)
                .map(|p| {
                    p.iter()
                        .map(|&v| {
                            let d = v - m;
                            d * d
                        })
                        .sum::<f32>() as f64
                })
                .sum();
            (m, (sq / count) as f32)
        })
        .collect();
    let mut packed = vec![0f32; 2 * g.channels];
    for (c, (m, v)) in per_channel.into_iter().enumerate() {
        packed[c] = m;
        packed[g.channels + c] = v;
    }
    packed
}

/// Per-channel `(scale, shift)` with `y = x * scale + shift`.
fn affine_coefficients(
    weight: &[f32],
    bias: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = weight
        .iter()
        .zip(var)
        .map(|(&w, &v)| w / ((v as f64 + eps).sqrt() as f32))
        .collect();
    let shift = bias
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((&b, &m), &s)| b - m * s)
        .collect();
    (scale, shift)
}

/// `y = (x - mean) / sqrt(var + eps) * weight + bias`, optionally followed by ReLU.
/// `stats` is `[mean (C), var (C)]`.
pub(crate) fn bn_forward(
    g: &BnGeom,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    stats: &[f32],
    eps: f64,
    relu: bool,
) -> Vec<f32> {
    let c = g.channels;
    let (scale, shift) = affine_coefficients(weight, bias, &stats[..c], &stats[c..2 * c], eps);
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(g.plane.max(1))
        .zip(x.par_chunks(g.plane.max(1)))
        .enumerate()
        .for_each(|(i, (yp, xp))| {
            let (s, t) = (scale[i % c], shift[i % c]);
            if relu {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = (v * s + t).max(0.0);
                }
            } else {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = v * s + t;
                }
            }
        });
    y
}

/// Coefficients of the running-statistics update `running ← (1 − m)·running + m·batch`
/// (unbiased batch variance), as f32 multipliers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RunningCoefs {
    /// `1 − momentum`.
    pub keep: f32,
    /// `momentum`.
    pub take: f32,
    /// `count / (count − 1)`, turning the biased variance into the unbiased one.
    pub unbias: f32,
}

impl RunningCoefs {
    pub(crate) fn new(momentum: f64, count: usize) -> Self {
        Self {
            keep: (1.0 - momentum) as f32,
            take: momentum as f32,
            unbias: (count as f64 / (count.max(2) - 1) as f64) as f32,
        }
    }
}

/// The running-statistics update of one channel's mean (`var = false`) or variance, rounded
/// exactly as the generic-op formulation `(running·keep + 0) + (batch·take + 0)` (each scalar
/// multiply being candle's `affine(a, 0.0)`), with the variance first made unbiased as
/// `var·unbias + 0`.
#[inline]
pub(crate) fn running_update(running: f32, batch: f32, k: &RunningCoefs, var: bool) -> f32 {
    let batch = if var { batch * k.unbias + 0.0 } else { batch };
    (running * k.keep + 0.0) + (batch * k.take + 0.0)
}

/// Backward of [`bn_forward`] with batch statistics. Returns `grad_x` followed by
/// `[d weight (C), d bias (C)]`; the statistics' dependence on `x` is folded into `grad_x`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_backward(
    g: &BnGeom,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    stats: &[f32],
    grad_y: &[f32],
    eps: f64,
    relu: bool,
) -> Vec<f32> {
    let c = g.channels;
    let mean = &stats[..c];
    let var = &stats[c..2 * c];
    let (scale, shift) = affine_coefficients(weight, bias, mean, var, eps);
    let inv_std: Vec<f32> = var
        .iter()
        .map(|&v| 1.0 / ((v as f64 + eps).sqrt() as f32))
        .collect();
    // With fused ReLU the incoming gradient only passes where the output was positive;
    // the mask is recomputed from x rather than stored.
    let effective_grad = |xv: f32, dy: f32, ch: usize| -> f32 {
        if relu && xv * scale[ch] + shift[ch] <= 0.0 {
            0.0
        } else {
            dy
        }
    };
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (m, is) = (mean[ch], inv_std[ch]);
            let mut sum_dy = 0f64;
            let mut sum_dy_xhat = 0f64;
            for (xp, dp) in g.channel_planes(x, ch).zip(g.channel_planes(grad_y, ch)) {
                let mut a = 0f32;
                let mut b = 0f32;
                for (&xv, &dy) in xp.iter().zip(dp) {
                    let d = effective_grad(xv, dy, ch);
                    a += d;
                    b += d * (xv - m) * is;
                }
                sum_dy += a as f64;
                sum_dy_xhat += b as f64;
            }
            (sum_dy, sum_dy_xhat)
        })
        .collect();
    let n = g.count().max(1) as f32;
    let mut out = vec![0f32; x.len() + 2 * c];
    let (grad_x, grad_params) = out.split_at_mut(x.len());
    for (ch, &(sum_dy, sum_dy_xhat)) in sums.iter().enumerate() {
        grad_params[ch] = sum_dy_xhat as f32;
        grad_params[c + ch] = sum_dy as f32;
    }
    let mean_dy: Vec<f32> = sums.iter().map(|s| s.0 as f32 / n).collect();
    let mean_dy_xhat: Vec<f32> = sums.iter().map(|s| s.1 as f32 / n).collect();
    grad_x
        .par_chunks_mut(g.plane.max(1))
        .zip(x.par_chunks(g.plane.max(1)))
        .zip(grad_y.par_chunks(g.plane.max(1)))
        .enumerate()
        .for_each(|(i, ((gp, xp), dp))| {
            let ch = i % c;
            let (m, is, k) = (mean[ch], inv_std[ch], weight[ch] * inv_std[ch]);
            let (mdy, mdyx) = (mean_dy[ch], mean_dy_xhat[ch]);
            for ((o, &xv), &dy) in gp.iter_mut().zip(xp).zip(dp) {
                let d = effective_grad(xv, dy, ch);
                let xhat = (xv - m) * is;
                *o = k * (d - mdy - xhat * mdyx);
            }
        });
    out
}
