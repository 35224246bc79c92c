//! GridMix (spec §5.10): a grid of square holes inside a random crop; holes
//! (mask 1) show the partner `x[π]`. One mask for the whole batch.
//!
//! The crop may be larger than the image (up to 45 px on 32×32), which makes
//! its offset negative; hole slices then follow Python semantics (a negative
//! bound counts from the far border, then clamps), so some holes wrap to the
//! opposite border or vanish. This is reproduced exactly.

use candle_core::{Result, Tensor};
use rand::{Rng, RngCore};
use serde::Deserialize;

use crate::args::MixArgs;
use crate::boxes::{keep_weight, paste_where};
use crate::sample::{perm_tensor, permutation};
use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// `mix_args` of GridMix (CIFAR-10 config values by default).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GridMixArgs {
    /// Holes per crop row, drawn from `U{low..high}` (inclusive).
    pub n_holes: (usize, usize),
    /// Hole height / width.
    pub hole_aspect_ratio: f64,
    /// Crop area as a fraction of the image, `U(low, high)`.
    pub cut_area_ratio: (f64, f64),
    /// Crop height / width, `U(low, high)`.
    pub cut_aspect_ratio: (f64, f64),
}

impl Default for GridMixArgs {
    fn default() -> Self {
        Self {
            n_holes: (2, 6),
            hole_aspect_ratio: 1.0,
            cut_area_ratio: (0.5, 1.0),
            cut_aspect_ratio: (0.5, 2.0),
        }
    }
}

impl MixArgs for GridMixArgs {
    fn validate(&self) -> std::result::Result<(), String> {
        let (lo, hi) = self.n_holes;
        if lo < 1 || lo > hi {
            return Err(format!(
                "field `n_holes`: ({lo}, {hi}) must satisfy 1 ≤ low ≤ high"
            ));
        }
        if !(self.hole_aspect_ratio.is_finite() && self.hole_aspect_ratio > 0.0) {
            return Err(format!(
                "field `hole_aspect_ratio`: {} must be > 0",
                self.hole_aspect_ratio
            ));
        }
        let (lo, hi) = self.cut_area_ratio;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(format!(
                "field `cut_area_ratio`: ({lo}, {hi}) must satisfy 0 < low ≤ high ≤ 1"
            ));
        }
        let (lo, hi) = self.cut_aspect_ratio;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(format!(
                "field `cut_aspect_ratio`: ({lo}, {hi}) must satisfy 0 < low ≤ high"
            ));
        }
        Ok(())
    }
}

/// GridMix with its α (CIFAR-10: 0.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridMix {
    /// Beta(α, α) parameter.
    pub alpha: f64,
    /// Method options.
    pub args: GridMixArgs,
}

impl Default for GridMix {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            args: GridMixArgs::default(),
        }
    }
}

/// The random quantities of one GridMix mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridParams {
    /// Holes per crop row.
    pub n: usize,
    /// Crop area ratio.
    pub area_ratio: f64,
    /// Crop aspect ratio (height / width).
    pub aspect: f64,
    /// Crop offset fractions (column, row) in [0, 1).
    pub offset: (f64, f64),
}

fn uniform(rng: &mut dyn RngCore, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Python slice `[a:b]` on an axis of length `len`, as a half-open range.
pub fn pyslice(a: i64, b: i64, len: usize) -> std::ops::Range<usize> {
    let norm = |v: i64| {
        let v = if v < 0 { v + len as i64 } else { v };
        v.clamp(0, len as i64) as usize
    };
    let (start, end) = (norm(a), norm(b));
    start..end.max(start)
}

/// The `h×w` hole mask (1 = from the partner) for `params`, λ and the hole aspect ratio.
pub fn grid_mask(
    params: &GridParams,
    lambda: f64,
    hole_aspect: f64,
    h: usize,
    w: usize,
) -> Result<Vec<u8>> {
    let area = ((h * w) as f64 * params.area_ratio) as i64;
    let cw = (area as f64 / params.aspect).sqrt() as i64;
    let ch = (cw as f64 * params.aspect) as i64;
    let xc1 = ((w as i64 - cw) as f64 * params.offset.0) as i64;
    let yc1 = ((h as i64 - ch) as f64 * params.offset.1) as i64;
    let n = params.n as i64;
    if n > cw / 2 {
        candle_core::bail!("gridmix: {n} holes do not fit a crop {cw} px wide (need n ≤ width/2)");
    }
    let pw = (cw as f64 / n as f64).ceil() as i64;
    let ph = (pw as f64 * hole_aspect) as i64;
    if ph < 1 {
        candle_core::bail!("gridmix: hole height {ph} < 1 (hole_aspect_ratio too small)");
    }
    let ny = (ch as f64 / ph as f64).ceil() as i64;
    let rho = (1.0 - lambda).sqrt();
    let hw = ((pw as f64 * rho) as i64).max(1).min(pw - 1);
    let hh = ((ph as f64 * rho) as i64).max(1).min(ph - 1);
    let mut mask = vec![0u8; h * w];
    for i in 0..=n {
        for j in 0..=ny {
            let x1 = (pw * i).min(cw);
            let y1 = (ph * j).min(ch);
            let x2 = (x1 + hw).min(cw);
            let y2 = (y1 + hh).min(ch);
            let cols = pyslice(xc1 + x1, xc1 + x2, w);
            for r in pyslice(yc1 + y1, yc1 + y2, h) {
                mask[r * w + cols.start..r * w + cols.end].fill(1);
            }
        }
    }
    Ok(mask)
}

impl MixMethod for GridMix {
    fn name(&self) -> &'static str {
        "gridmix"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let (batch, _, h, w) = images.dims4()?;
        let lambda = ctx.draw_lambda(self.alpha);
        let (lo, hi) = self.args.n_holes;
        let n = ctx.rng.random_range(lo..=hi);
        let area_ratio = uniform(ctx.rng, self.args.cut_area_ratio);
        let aspect = uniform(ctx.rng, self.args.cut_aspect_ratio);
        let perm = perm_tensor(&permutation(ctx.rng, batch), images.device())?;
        let offset = (ctx.rng.random::<f64>(), ctx.rng.random::<f64>());
        let params = GridParams {
            n,
            area_ratio,
            aspect,
            offset,
        };
        let from_partner = grid_mask(&params, lambda, self.args.hole_aspect_ratio, h, w)?;
        let taken = from_partner.iter().map(|&m| m as usize).sum::<usize>();
        let partner = images.index_select(&perm, 0)?;
        Ok(Mixed {
            images: paste_where(images, &partner, &from_partner)?,
            labels: MixedLabels::permuted(labels, &perm, 1.0 - taken as f64 / (h * w) as f64)?,
            feature_mix: None,
            mask: Some(keep_weight(&from_partner, h, w, images.device())?),
        })
    }
}
