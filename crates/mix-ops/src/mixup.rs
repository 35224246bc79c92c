//! MixUp (spec §5.2): `x_mix = λ·x + (1−λ)·x[π]`, λ ~ Beta(α, α).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::sample::{perm_tensor, permutation};
use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// MixUp with its α (CIFAR-10 benchmark value: 1.0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixUp {
    /// Beta(α, α) parameter.
    pub alpha: f64,
}

impl Default for MixUp {
    fn default() -> Self {
        Self { alpha: 1.0 }
    }
}

/// Blends `x` with `x[π]` using one scalar weight.
pub fn mixup_blend(x: &Tensor, perm: &Tensor, lambda: f64) -> Result<Tensor> {
    let partner = x.index_select(perm, 0)?;
    (x * lambda)? + (partner * (1.0 - lambda))?
}

impl MixMethod for MixUp {
    fn name(&self) -> &'static str {
        "mixup"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let lambda = ctx.draw_lambda(self.alpha);
        let perm = perm_tensor(&permutation(ctx.rng, images.dim(0)?), images.device())?;
        Ok(Mixed {
            images: mixup_blend(images, &perm, lambda)?,
            labels: MixedLabels::permuted(labels, &perm, lambda)?,
            feature_mix: None,
            mask: None,
        })
    }
}
