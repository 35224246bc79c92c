//! SmoothMix (spec §5.5): blend with one Gaussian kernel `K` for the whole
//! batch, `x_mix = x·(1−K) + x[π]·K`.
//!
//! Reference quirk reproduced by default: the returned λ (weight of `y_a = y`)
//! is `mean(K)` although `x` contributes `1 − K`, i.e. the label weights are
//! swapped relative to the pixels. `correct_labels = true` returns `1 − mean(K)`.

use candle_core::{Result, Tensor};
use rand::{Rng, RngCore};
use serde::Deserialize;

use crate::args::MixArgs;
use crate::boxes::{blend_with_weight, random_coord};
use crate::sample::{perm_tensor, permutation};
use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// `mix_args` of SmoothMix (none in the CIFAR-10 config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmoothMixArgs {
    /// Return λ = `1 − mean(K)` (the weight `x` really has) instead of the
    /// reference's `mean(K)`. Default `false`: reproduce the reference.
    pub correct_labels: bool,
}

impl MixArgs for SmoothMixArgs {}

/// SmoothMix. α is drawn and discarded (the reference draws it and never uses
/// it), so the RNG stream advances exactly as for the other methods.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothMix {
    /// Beta(α, α) parameter (drawn, unused; CIFAR-10: 0.5 for R-18, 0.2 for RX-50).
    pub alpha: f64,
    /// Method options.
    pub args: SmoothMixArgs,
}

impl Default for SmoothMix {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            args: SmoothMixArgs::default(),
        }
    }
}

/// The kernel's random parameters: centre offsets and width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothKernel {
    /// Row offset of the peak from the image centre, in `−H/2..H/2`.
    pub dr: i64,
    /// Column offset of the peak from the image centre, in `−W/2..W/2`.
    pub dc: i64,
    /// Gaussian σ in pixels, in `[H/4, H/2)`.
    pub sigma: f64,
}

impl SmoothKernel {
    /// Draws the column offset, then the row offset, then σ = `(0.25 + u/4)·H`.
    pub fn sample(rng: &mut dyn RngCore, h: usize, w: usize) -> Self {
        let dc = random_coord(rng, w) as i64 - (w / 2) as i64;
        let dr = random_coord(rng, h) as i64 - (h / 2) as i64;
        let u: f64 = rng.random();
        Self {
            dr,
            dc,
            sigma: (0.25 + u / 4.0) * h as f64,
        }
    }

    /// Peak position `(H/2 − 0.5 + dr, W/2 − 0.5 + dc)` (15.5 + offset on 32×32).
    pub fn centre(&self, h: usize, w: usize) -> (f64, f64) {
        (
            h as f64 / 2.0 - 0.5 + self.dr as f64,
            w as f64 / 2.0 - 0.5 + self.dc as f64,
        )
    }

    /// `K[i, j] = exp(−((i − ci)² + (j − cj)²) / (2σ²))`, row-major `h×w`.
    pub fn values(&self, h: usize, w: usize) -> Vec<f64> {
        let (ci, cj) = self.centre(h, w);
        let denom = 2.0 * self.sigma * self.sigma;
        (0..h * w)
            .map(|k| {
                let (di, dj) = ((k / w) as f64 - ci, (k % w) as f64 - cj);
                (-(di * di + dj * dj) / denom).exp()
            })
            .collect()
    }
}

impl MixMethod for SmoothMix {
    fn name(&self) -> &'static str {
        "smoothmix"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let (n, _, h, w) = images.dims4()?;
        // Upstream draws a Beta λ it never uses (λ is the kernel's mean); drawn here too so
        // the random stream stays upstream's.
        let _unused_lambda = crate::sample::beta_lambda(ctx.rng, self.alpha);
        let perm = perm_tensor(&permutation(ctx.rng, n), images.device())?;
        let kernel = SmoothKernel::sample(ctx.rng, h, w).values(h, w);
        let mean_k = kernel.iter().sum::<f64>() / (h * w) as f64;
        let keep: Vec<f32> = kernel.iter().map(|&k| (1.0 - k) as f32).collect();
        let partner = images.index_select(&perm, 0)?;
        let (mixed, weight) = blend_with_weight(images, &partner, &keep)?;
        let lambda = if self.args.correct_labels {
            1.0 - mean_k
        } else {
            mean_k
        };
        Ok(Mixed {
            images: mixed,
            labels: MixedLabels::permuted(labels, &perm, lambda)?,
            feature_mix: None,
            mask: Some(weight),
        })
    }
}
