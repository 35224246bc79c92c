//! Vanilla (spec §5.1): no mixing; labels stay plain class ids.

use candle_core::{Result, Tensor};

use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// No mixing. Draws nothing from the RNG; α is irrelevant and not stored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Vanilla;

impl MixMethod for Vanilla {
    fn name(&self) -> &'static str {
        "vanilla"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, _ctx: &mut MixContext<'_>) -> Result<Mixed> {
        Ok(Mixed {
            images: images.clone(),
            labels: MixedLabels::plain(labels),
            feature_mix: None,
            mask: None,
        })
    }
}
