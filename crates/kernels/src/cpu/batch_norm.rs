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

/// Independent partial sums per reduction: enough to fill two 8-wide vectors, so the adds of a
/// reduction pipeline instead of waiting on one another (a single running sum is latency-bound:
/// the BatchNorm reductions took 8–15 % of a step in `perf`).
const LANES: usize = 16;

/// `Σ f(v)` over `values`, in [`LANES`] interleaved partial sums added pairwise at the end, in
/// f64. The order is fixed by the length alone, so the result is reproducible. Call it only
/// with `#[inline(always)]` closures from inside a `with_avx2` closure, with plain loops in
/// between: a closure LLVM chose not to inline compiled this loop for SSE (`addps xmm`).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    pairwise(acc)
}

/// The partial sums added as a balanced tree, in f64.
#[inline(always)]
fn pairwise(acc: [f32; LANES]) -> f64 {
    let mut s: [f64; LANES] = std::array::from_fn(|i| acc[i] as f64);
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            s[i] += s[i + width];
        }
    }
    s[0]
}

/// Per-channel batch mean and biased variance, packed as `[mean (C), var (C)]`.
///
/// Two passes (mean, then squared deviations) so the variance does not suffer the
/// cancellation of `E[x²] - E[x]²` on activations with a large mean. Each image's plane is
/// reduced in f32 partial sums ([`lane_sum`]), the planes in f64.
pub(crate) fn bn_stats(g: &BnGeom, x: &[f32]) -> Vec<f32> {
    let count = g.count().max(1) as f64;
    let per_channel: Vec<(f32, f32)> = (0..g.channels)
        .into_par_iter()
        .map(|c| {
            super::with_avx2(
                #[inline(always)]
                || {
                    // Plain loops and inlined closures: see `lane_sum`.
                    let mut sum = 0f64;
                    for p in g.channel_planes(x, c) {
                        sum += lane_sum(
                            p,
                            #[inline(always)]
                            |v| v,
                        );
                    }
                    let m = (sum / count) as f32;
                    let mut sq = 0f64;
                    for p in g.channel_planes(x, c) {
                        sq += lane_sum(
                            p,
                            #[inline(always)]
                            |v| {
                                let d = v - m;
                                d * d
                            },
                        );
                    }
                    (m, (sq / count) as f32)
                },
            )
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
    super::par_new_vec(x.len(), 0, g.plane.max(1), |i, yp| {
        let xp = &x[i * g.plane..][..yp.len()];
        let (s, t) = (scale[i % c], shift[i % c]);
        super::with_avx2(
            #[inline(always)]
            || {
                if relu {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        o.write((v * s + t).max(0.0));
                    }
                } else {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        o.write(v * s + t);
                    }
                }
            },
        )
    })
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

/// `dy` where the fused ReLU passed the gradient (`relu`: its BN's `(scale, shift)`), else 0:
/// the mask is recomputed from x rather than stored. Written as a bit mask so that the loops
/// vectorise (a branch kept them scalar); only `y <= 0` blocks, so a NaN passes, as before.
#[inline(always)]
fn masked(xv: f32, dy: f32, relu: Option<(f32, f32)>) -> f32 {
    match relu {
        None => dy,
        Some((s, t)) => {
            let blocked = xv * s + t <= 0.0;
            f32::from_bits(dy.to_bits() & (!blocked as u32).wrapping_neg())
        }
    }
}

/// `(Σ masked dy, Σ masked dy · (x − m))` over one plane, in [`LANES`] partial sums each.
#[inline(always)]
fn masked_sums(xp: &[f32], dp: &[f32], m: f32, relu: Option<(f32, f32)>) -> (f64, f64) {
    match relu {
        Some(_) => masked_sums_with(
            xp,
            dp,
            m,
            #[inline(always)]
            |x, d| masked(x, d, relu),
        ),
        None => masked_sums_with(
            xp,
            dp,
            m,
            #[inline(always)]
            |_, d| d,
        ),
    }
}

/// [`masked_sums`] with the mask as a closure: two passes of [`lane_sum_pairs`] over the plane
/// (it is in L1 by then). One pass accumulating both sums was SLP-vectorised into 2-wide
/// `(a, b)` pairs with the partial sums on the stack, slower than scalar code.
#[inline(always)]
fn masked_sums_with(xp: &[f32], dp: &[f32], m: f32, dy: impl Fn(f32, f32) -> f32) -> (f64, f64) {
    let sum_dy = lane_sum_pairs(xp, dp, &dy);
    let sum_dy_xc = lane_sum_pairs(
        xp,
        dp,
        #[inline(always)]
        |x, d| dy(x, d) * (x - m),
    );
    (sum_dy, sum_dy_xc)
}

/// `Σ f(x, d)` over paired `xp`, `dp` (the shorter length), in [`LANES`] partial sums as
/// [`lane_sum`]: element `j` goes to partial sum `j % LANES`, in order.
#[inline(always)]
fn lane_sum_pairs(xp: &[f32], dp: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let n = xp.len().min(dp.len());
    let (xc, dc) = (xp[..n].chunks_exact(LANES), dp[..n].chunks_exact(LANES));
    let (xt, dt) = (xc.remainder(), dc.remainder());
    let mut acc = [0f32; LANES];
    for (xs, ds) in xc.zip(dc) {
        for ((a, &x), &d) in acc.iter_mut().zip(xs).zip(ds) {
            *a += f(x, d);
        }
    }
    for ((a, &x), &d) in acc.iter_mut().zip(xt).zip(dt) {
        *a += f(x, d);
    }
    pairwise(acc)
}

/// Per channel `(Σ dy, Σ dy · (x − mean))`, `dy` masked by the fused ReLU when `relu` gives
/// its BN's `(scale, shift)`: each plane in [`masked_sums`], the planes in f64.
fn channel_sums(
    g: &BnGeom,
    x: &[f32],
    grad_y: &[f32],
    mean: &[f32],
    relu: Option<(&[f32], &[f32])>,
) -> Vec<(f64, f64)> {
    (0..g.channels)
        .into_par_iter()
        .map(|ch| {
            let relu = relu.map(|(s, t)| (s[ch], t[ch]));
            super::with_avx2(
                #[inline(always)]
                move || {
                    let (mut sum_dy, mut sum_dy_xc) = (0f64, 0f64);
                    for (xp, dp) in g.channel_planes(x, ch).zip(g.channel_planes(grad_y, ch)) {
                        let (a, b) = masked_sums(xp, dp, mean[ch], relu);
                        sum_dy += a;
                        sum_dy_xc += b;
                    }
                    (sum_dy, sum_dy_xc)
                },
            )
        })
        .collect()
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
    // Σ dy and Σ dy·(x − mean) per channel (in LANES partial sums per plane, as `lane_sum`);
    // the latter times 1/σ is Σ dy·x̂.
    let sums: Vec<(f64, f64)> = channel_sums(g, x, grad_y, mean, relu.then_some((&scale, &shift)))
        .into_iter()
        .zip(&inv_std)
        .map(|((sum_dy, sum_dy_xc), &is)| (sum_dy, sum_dy_xc * is as f64))
        .collect();
    let n = g.count().max(1) as f32;
    let mean_dy: Vec<f32> = sums.iter().map(|s| s.0 as f32 / n).collect();
    let mean_dy_xhat: Vec<f32> = sums.iter().map(|s| s.1 as f32 / n).collect();
    let plane = g.plane.max(1);
    let mut out = super::par_new_vec(x.len(), 2 * c, plane, |i, gp| {
        let ch = i % c;
        let (xp, dp) = (
            &x[i * plane..][..gp.len()],
            &grad_y[i * plane..][..gp.len()],
        );
        let (m, is, k) = (mean[ch], inv_std[ch], weight[ch] * inv_std[ch]);
        let (mdy, mdyx) = (mean_dy[ch], mean_dy_xhat[ch]);
        let relu = relu.then_some((scale[ch], shift[ch]));
        // `move` and zipped slices, as in `bn_eval_backward`: a by-reference capture kept this
        // loop scalar.
        super::with_avx2(
            #[inline(always)]
            move || {
                for ((o, &xv), &dv) in gp.iter_mut().zip(xp).zip(dp) {
                    let d = masked(xv, dv, relu);
                    let xhat = (xv - m) * is;
                    o.write(k * (d - mdy - xhat * mdyx));
                }
            },
        )
    });
    out.extend(sums.iter().map(|s| s.1 as f32));
    out.extend(sums.iter().map(|s| s.0 as f32));
    out
}

/// Which gradients [`bn_eval_backward`] computes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EvalGrads {
    /// The input's.
    pub x: bool,
    /// The weight's and the bias's.
    pub params: bool,
}

/// Backward of [`bn_forward`] with fixed (running) statistics `stats`: `grad_x = dy · scale`
/// (`dy` masked by the fused ReLU), `d weight = Σ dy · x̂`, `d bias = Σ dy`. Returns
/// `grad_x` (if `grads.x`) followed by `[d weight (C), d bias (C)]` (if `grads.params`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_eval_backward(
    g: &BnGeom,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    stats: &[f32],
    grad_y: &[f32],
    eps: f64,
    relu: bool,
    grads: EvalGrads,
) -> Vec<f32> {
    let c = g.channels;
    let (mean, var) = (&stats[..c], &stats[c..2 * c]);
    let (scale, shift) = affine_coefficients(weight, bias, mean, var, eps);
    let plane = g.plane.max(1);
    let spare = if grads.params { 2 * c } else { 0 };
    let mut out = if grads.x {
        super::par_new_vec(x.len(), spare, plane, |i, gp| {
            let ch = i % c;
            let (xp, dp) = (
                &x[i * plane..][..gp.len()],
                &grad_y[i * plane..][..gp.len()],
            );
            let (s, t) = (scale[ch], shift[ch]);
            let relu = relu.then_some((s, t));
            // `move` and zipped slices: captured by reference, `s` and `relu` were re-read
            // from memory after every store (the output might alias them) and the loop stayed
            // scalar, 9× slower than the loop without ReLU.
            super::with_avx2(
                #[inline(always)]
                move || match relu {
                    Some(_) => {
                        for ((o, &xv), &d) in gp.iter_mut().zip(xp).zip(dp) {
                            o.write(masked(xv, d, relu) * s);
                        }
                    }
                    None => {
                        for (o, &d) in gp.iter_mut().zip(dp) {
                            o.write(d * s);
                        }
                    }
                },
            )
        })
    } else {
        Vec::with_capacity(spare)
    };
    if grads.params {
        let sums: Vec<(f64, f64)> =
            channel_sums(g, x, grad_y, mean, relu.then_some((&scale, &shift)))
                .into_iter()
                .zip(var)
                .map(|((sum_dy, sum_dy_xc), &v)| {
                    (sum_dy, sum_dy_xc * (1.0 / (v as f64 + eps).sqrt()))
                })
                .collect();
        out.extend(sums.iter().map(|s| s.1 as f32));
        out.extend(sums.iter().map(|s| s.0 as f32));
    }
    out
}
