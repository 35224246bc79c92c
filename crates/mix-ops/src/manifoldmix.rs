//! ManifoldMix (spec §5.4): MixUp applied inside the backbone after a random
//! stage. This method only draws λ, π and the stage; the backbone mixes.

use candle_core::{Result, Tensor};
use rand::Rng;
use serde::Deserialize;

use crate::args::MixArgs;
use crate::sample::{perm_tensor, permutation};
use crate::{FeatureMix, MixContext, MixMethod, Mixed, MixedLabels};

/// `mix_args` of ManifoldMix.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManifoldMixArgs {
    /// Stage range `(low, high)` with an EXCLUSIVE upper bound, like numpy's
    /// `randint`: the CIFAR-10 value `(0, 3)` draws stages {0, 1, 2}, never 3.
    /// Stage 0 mixes the input images. Valid: `0 ≤ low < high ≤ 4`. (Upstream
    /// checks `high < 4`, which would forbid ever mixing after layer3; the
    /// backbone supports it, so `high = 4` is allowed here.)
    pub layer: (usize, usize),
}

impl Default for ManifoldMixArgs {
    fn default() -> Self {
        Self { layer: (0, 3) }
    }
}

impl MixArgs for ManifoldMixArgs {
    fn validate(&self) -> std::result::Result<(), String> {
        let (low, high) = self.layer;
        if low >= high || high > 4 {
            return Err(format!(
                "field `layer`: ({low}, {high}) must satisfy 0 ≤ low < high ≤ 4 \
                 (exclusive upper bound; stages are 0 = input, 1..=3 = after layer1..3)"
            ));
        }
        Ok(())
    }
}

/// ManifoldMix with its α (CIFAR-10: 2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ManifoldMix {
    /// Beta(α, α) parameter.
    pub alpha: f64,
    /// Method options.
    pub args: ManifoldMixArgs,
}

impl Default for ManifoldMix {
    fn default() -> Self {
        Self {
            alpha: 2.0,
            args: ManifoldMixArgs::default(),
        }
    }
}

impl MixMethod for ManifoldMix {
    fn name(&self) -> &'static str {
        "manifoldmix"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let lambda = ctx.draw_lambda(self.alpha);
        let perm = perm_tensor(&permutation(ctx.rng, images.dim(0)?), images.device())?;
        let (low, high) = self.args.layer;
        let layer = ctx.rng.random_range(low..high);
        Ok(Mixed {
            images: images.clone(),
            labels: MixedLabels::permuted(labels, &perm, lambda)?,
            feature_mix: Some(FeatureMix {
                layer,
                lambda,
                perm,
            }),
            mask: None,
        })
    }
}
