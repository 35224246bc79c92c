//! ResizeMix (spec §5.11): shrink the whole partner image `x[π]` (nearest
//! neighbour) into one random box; λ is corrected to the box area.

use candle_core::{Result, Tensor};
use rand::{Rng, RngCore};
use serde::Deserialize;

use crate::args::MixArgs;
use crate::boxes::{keep_weight, paste_where, random_coord, CutBox};
use crate::sample::{beta_lambda, perm_tensor, permutation};
use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// `mix_args` of ResizeMix (CIFAR-10 config values by default).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResizeMixArgs {
    /// Range `(low, high)` ⊂ [0, 1] of the box side as a fraction of the image side τ.
    pub scope: (f64, f64),
    /// Draw τ ~ Beta(α, α) and fall back to `U(scope)` when it leaves the scope
    /// (CIFAR-10 config: `true`); `false` draws `U(scope)` directly.
    pub use_alpha: bool,
}

impl Default for ResizeMixArgs {
    fn default() -> Self {
        Self {
            scope: (0.1, 0.8),
            use_alpha: true,
        }
    }
}

impl MixArgs for ResizeMixArgs {
    fn validate(&self) -> std::result::Result<(), String> {
        let (lo, hi) = self.scope;
        if !(0.0 <= lo && lo <= hi && hi <= 1.0) {
            return Err(format!(
                "field `scope`: ({lo}, {hi}) must satisfy 0 ≤ low ≤ high ≤ 1"
            ));
        }
        Ok(())
    }
}

/// ResizeMix with its α (CIFAR-10: 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeMix {
    /// Beta(α, α) parameter of τ (used when `use_alpha`).
    pub alpha: f64,
    /// Method options.
    pub args: ResizeMixArgs,
}

impl Default for ResizeMix {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            args: ResizeMixArgs::default(),
        }
    }
}

impl ResizeMix {
    /// Draws the box side fraction τ ∈ scope.
    pub fn sample_tau(&self, rng: &mut dyn RngCore) -> f64 {
        let (lo, hi) = self.args.scope;
        let uniform = |rng: &mut dyn RngCore| lo + (hi - lo) * rng.random::<f64>();
        if !self.args.use_alpha {
            return uniform(rng);
        }
        let tau = beta_lambda(rng, self.alpha);
        if tau < lo || tau > hi {
            uniform(rng)
        } else {
            tau
        }
    }
}

/// Source index of every destination pixel along one axis of length `len`:
/// inside `range` the PyTorch nearest rule `min(⌊dst·len/out⌋, len−1)` with
/// `out = range.len()` (exact integer form), elsewhere 0 (masked out later).
pub fn nearest_source_index(range: std::ops::Range<usize>, len: usize) -> Vec<u32> {
    let out = range.len();
    (0..len)
        .map(|i| {
            if range.contains(&i) {
                (((i - range.start) * len / out).min(len - 1)) as u32
            } else {
                0
            }
        })
        .collect()
}

impl MixMethod for ResizeMix {
    fn name(&self) -> &'static str {
        "resizemix"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let (n, _, h, w) = images.dims4()?;
        let perm = perm_tensor(&permutation(ctx.rng, n), images.device())?;
        let tau = self.sample_tau(ctx.rng);
        let (rows, cols) = ((h as f64 * tau) as usize, (w as f64 * tau) as usize);
        let cc = random_coord(ctx.rng, w);
        let rc = random_coord(ctx.rng, h);
        let cut = CutBox::centred(rc, cc, rows, cols, h, w);
        let from_partner = cut.mask(h, w);
        let device = images.device();
        // Nearest-resize x[π] into the box by gathering rows then columns;
        // pixels outside the box are discarded by the mask.
        let row_src = nearest_source_index(cut.r1..cut.r2, h);
        let col_src = nearest_source_index(cut.c1..cut.c2, w);
        let resized = images
            .index_select(&perm, 0)?
            .index_select(&Tensor::from_vec(row_src, h, device)?, 2)?
            .index_select(&Tensor::from_vec(col_src, w, device)?, 3)?;
        Ok(Mixed {
            images: paste_where(images, &resized, &from_partner)?,
            labels: MixedLabels::permuted(labels, &perm, cut.keep_fraction(h, w))?,
            feature_mix: None,
            mask: Some(keep_weight(&from_partner, h, w, device)?),
        })
    }
}
