//! CutMix (spec §5.3): paste one box of `x[π]` into every image; λ is
//! corrected to the exact pasted area.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::args::MixArgs;
use crate::boxes::{cut_side, keep_weight, paste_where, random_coord, CutBox};
use crate::sample::{perm_tensor, permutation, permutation_avoiding_fixed_points};
use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// `mix_args` of CutMix (none in the CIFAR-10 config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CutMixArgs {
    /// Redraw π (one draw plus up to 10 redraws) while it has a fixed point, as 2025 upstream
    /// does (§5.0). Default `false`: the benchmark-era plain permutation.
    pub avoid_fixed_points: bool,
}

impl MixArgs for CutMixArgs {}

/// CutMix with its α (CIFAR-10: 0.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CutMix {
    /// Beta(α, α) parameter.
    pub alpha: f64,
    /// Method options.
    pub args: CutMixArgs,
}

impl Default for CutMix {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            args: CutMixArgs::default(),
        }
    }
}

/// The partner permutation of CutMix/FMix, honouring the fixed-point flag.
pub fn partner_permutation(
    rng: &mut dyn rand::RngCore,
    n: usize,
    avoid_fixed_points: bool,
) -> Vec<u32> {
    if avoid_fixed_points {
        permutation_avoiding_fixed_points(rng, n)
    } else {
        permutation(rng, n)
    }
}

/// Draws the CutMix box for λ on an `h×w` image: sides `trunc(size·√(1−λ))`,
/// centre row then centre column uniform over the image.
pub fn sample_cut_box(rng: &mut dyn rand::RngCore, lambda: f64, h: usize, w: usize) -> CutBox {
    let (rows, cols) = (cut_side(h, lambda), cut_side(w, lambda));
    let rc = random_coord(rng, h);
    let cc = random_coord(rng, w);
    CutBox::centred(rc, cc, rows, cols, h, w)
}

impl MixMethod for CutMix {
    fn name(&self) -> &'static str {
        "cutmix"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let (n, _, h, w) = images.dims4()?;
        let lambda = ctx.draw_lambda(self.alpha);
        let perm = partner_permutation(ctx.rng, n, self.args.avoid_fixed_points);
        let perm = perm_tensor(&perm, images.device())?;
        let cut = sample_cut_box(ctx.rng, lambda, h, w);
        let from_partner = cut.mask(h, w);
        let partner = images.index_select(&perm, 0)?;
        Ok(Mixed {
            images: paste_where(images, &partner, &from_partner)?,
            labels: MixedLabels::permuted(labels, &perm, cut.keep_fraction(h, w))?,
            feature_mix: None,
            mask: Some(keep_weight(&from_partner, h, w, images.device())?),
        })
    }
}
