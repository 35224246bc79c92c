//! FMix (spec §5.8): a binary mask from thresholded low-frequency noise, one
//! mask for the whole batch; `x_mix = M·x + (1−M)·x[π]`, label λ = the sampled λ.
//!
//! Upstream quirk kept on purpose: the complex spectrum is built from ROWS 0
//! and 1 of the frequency grid (not from the real/imaginary pair), so only
//! column frequencies 0 and 1 survive and every mask varies along columns as a
//! single sinusoid. The inverse real FFT of that 2-coefficient spectrum is
//! evaluated in closed form.

use std::f64::consts::PI;

use candle_core::{Result, Tensor};
use rand::{Rng, RngCore};
use rand_distr::{Beta, Distribution, StandardNormal};
use serde::Deserialize;

use crate::args::MixArgs;
use crate::boxes::blend_with_weight;
use crate::cutmix::partner_permutation;
use crate::sample::perm_tensor;
use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// `mix_args` of FMix (CIFAR-10 config values by default).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FMixArgs {
    /// Spectrum decay: amplitudes scale as `max(freq, 1/max(h,w))^(−decay_power)`.
    pub decay_power: f64,
    /// Mask size `(rows, cols)`; must equal the images' spatial size.
    pub size: (usize, usize),
    /// Half-width (as a fraction of the pixels) of a linear 1→0 ramp around the
    /// threshold; 0 gives a binary mask.
    pub max_soft: f64,
    /// Draw λ ~ Beta(α+1, α) instead of Beta(α, α).
    pub reformulate: bool,
    /// Redraw π while it has a fixed point (2025 upstream, §5.0). Default `false`.
    pub avoid_fixed_points: bool,
}

impl Default for FMixArgs {
    fn default() -> Self {
        Self {
            decay_power: 3.0,
            size: (32, 32),
            max_soft: 0.0,
            reformulate: false,
            avoid_fixed_points: false,
        }
    }
}

impl MixArgs for FMixArgs {
    fn validate(&self) -> std::result::Result<(), String> {
        if !self.decay_power.is_finite() {
            return Err(format!(
                "field `decay_power`: {} must be finite",
                self.decay_power
            ));
        }
        if self.size.0 < 2 || self.size.1 < 3 {
            return Err(format!(
                "field `size`: {:?} must be at least (2, 3)",
                self.size
            ));
        }
        if !(0.0..=1.0).contains(&self.max_soft) {
            return Err(format!(
                "field `max_soft`: {} must be in [0, 1]",
                self.max_soft
            ));
        }
        Ok(())
    }
}

/// FMix with its α (CIFAR-10: 0.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FMix {
    /// Beta parameter.
    pub alpha: f64,
    /// Method options.
    pub args: FMixArgs,
}

impl Default for FMix {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            args: FMixArgs::default(),
        }
    }
}

/// numpy's `fftfreq(n)[k]`: `k/n` for `k < ⌈n/2⌉`, else `(k − n)/n`.
fn fftfreq(n: usize, k: usize) -> f64 {
    let k = k as f64;
    let n_f = n as f64;
    if (k as usize) < n.div_ceil(2) {
        k / n_f
    } else {
        (k - n_f) / n_f
    }
}

/// The min–max normalized low-frequency image `L` (row-major `h×w`, in
/// [0, 1]), drawing the full `h × F × 2` Gaussian spectrum (`F = w//2 + 1`,
/// or `+ 2` for odd `w`, as upstream) so the RNG use matches upstream's shape.
pub fn low_freq_image(rng: &mut dyn RngCore, h: usize, w: usize, decay_power: f64) -> Vec<f64> {
    let n_cols = if w % 2 == 1 { w / 2 + 2 } else { w / 2 + 1 };
    let noise: Vec<f64> = (0..h * n_cols * 2)
        .map(|_| StandardNormal.sample(&mut *rng))
        .collect();
    let floor_freq = 1.0 / h.max(w) as f64;
    // Spectrum row `r` (only rows 0 and 1 are used, the upstream quirk).
    let spec = |r: usize, c: usize, t: usize| {
        let fx = fftfreq(w, c);
        let fy = fftfreq(h, r);
        let freq = (fx * fx + fy * fy).sqrt().max(floor_freq);
        freq.powf(-decay_power) * noise[(r * n_cols + c) * 2 + t]
    };
    // B[p, t] = (1/h) Σ_c A[c, t]·e^{2πi·c·p/h}, A[c, t] = spec[0,c,t] + i·spec[1,c,t];
    // the column axis is zero-padded (or cut) from F to h entries.
    let used_cols = n_cols.min(h);
    let mut image = vec![0.0; h * w];
    for p in 0..h {
        let mut b = [(0.0f64, 0.0f64); 2];
        for (t, bt) in b.iter_mut().enumerate() {
            for c in 0..used_cols {
                let (re, im) = (spec(0, c, t), spec(1, c, t));
                let (s, co) = (2.0 * PI * (c * p) as f64 / h as f64).sin_cos();
                bt.0 += re * co - im * s;
                bt.1 += re * s + im * co;
            }
            bt.0 /= h as f64;
            bt.1 /= h as f64;
        }
        // Inverse real DFT of length w from coefficients 0 and 1 (DC imag ignored).
        for q in 0..w {
            let (s, co) = (2.0 * PI * q as f64 / w as f64).sin_cos();
            let first = b[1].0 * co - b[1].1 * s;
            image[p * w + q] = (b[0].0 + 2.0 * first) / w as f64;
        }
    }
    let min = image.iter().copied().fold(f64::INFINITY, f64::min);
    let max = image.iter().map(|v| v - min).fold(0.0, f64::max);
    // A flat image (probability zero) would divide 0 by 0; keep it at 0.
    let max = if max > 0.0 { max } else { 1.0 };
    image.iter().map(|v| (v - min) / max).collect()
}

/// Thresholds `image` so that its `num` largest pixels are 1 (`num` = ⌈λ·HW⌉
/// or ⌊λ·HW⌋ with probability ½ each), with an optional linear soft band of
/// `trunc(HW·min(max_soft, λ, 1−λ))` pixels on each side. Ties in the
/// descending sort keep the lower index first.
pub fn binarize(rng: &mut dyn RngCore, image: &[f64], lambda: f64, max_soft: f64) -> Vec<f32> {
    let size = image.len();
    let mut order: Vec<usize> = (0..size).collect();
    order.sort_by(|&a, &b| image[b].total_cmp(&image[a]));
    let u: f64 = rng.random();
    let target = lambda * size as f64;
    let num = if u > 0.5 {
        target.ceil()
    } else {
        target.floor()
    } as usize;
    let eff_soft = if max_soft > lambda || max_soft > 1.0 - lambda {
        lambda.min(1.0 - lambda)
    } else {
        max_soft
    };
    let soft = (size as f64 * eff_soft) as usize;
    let low = num.saturating_sub(soft).min(size);
    let high = (num + soft).min(size);
    let mut mask = vec![0.0f32; size];
    for &i in &order[..high] {
        mask[i] = 1.0;
    }
    let band = high - low;
    for (k, &i) in order[low..high].iter().enumerate() {
        mask[i] = if band == 1 {
            1.0
        } else {
            1.0 - k as f32 / (band - 1) as f32
        };
    }
    mask
}

impl MixMethod for FMix {
    fn name(&self) -> &'static str {
        "fmix"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let (n, _, h, w) = images.dims4()?;
        if self.args.size != (h, w) {
            candle_core::bail!(
                "fmix: mix_args field `size` {:?} does not match the images' {h}×{w}",
                self.args.size
            );
        }
        let (a, b) = if self.args.reformulate {
            (self.alpha + 1.0, self.alpha)
        } else {
            (self.alpha, self.alpha)
        };
        let drawn = Beta::new(a, b)
            .map_err(|e| candle_core::Error::Msg(format!("fmix: bad alpha {}: {e}", self.alpha)))?
            .sample(&mut *ctx.rng);
        let lambda = ctx.take_fixed_lambda(drawn);
        let image = low_freq_image(ctx.rng, h, w, self.args.decay_power);
        let keep = binarize(ctx.rng, &image, lambda, self.args.max_soft);
        let perm = partner_permutation(ctx.rng, n, self.args.avoid_fixed_points);
        let perm = perm_tensor(&perm, images.device())?;
        let partner = images.index_select(&perm, 0)?;
        let (mixed, weight) = blend_with_weight(images, &partner, &keep)?;
        Ok(Mixed {
            images: mixed,
            labels: MixedLabels::permuted(labels, &perm, lambda)?,
            feature_mix: None,
            mask: Some(weight),
        })
    }
}
