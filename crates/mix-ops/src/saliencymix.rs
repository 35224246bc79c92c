//! SaliencyMix (spec §5.6): CutMix whose box is centred on the saliency peak
//! of ONE image, the partner of sample 0 (`x[π[0]]`), shared by the batch.
//!
//! Divergence from upstream (documented on purpose): the reference hands the
//! *normalized float32* image to OpenCV's 8-bit fine-grained saliency, which
//! then reads float bytes as 8-bit data, so its peak is an arbitrary
//! deterministic function of the image (and the result may wrap when
//! re-scaled, depending on the OpenCV version). Bit-exact reproduction is
//! neither possible nor meaningful; we de-normalize `x[π[0]]` to 8-bit RGB
//! (`round((v·std + mean)·255)`, clamped) and run the algorithm as designed
//! ([`crate::saliency`]), taking the row-major first argmax of the 8-bit map.

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use crate::args::MixArgs;
use crate::boxes::{cut_side, keep_weight, paste_where, CutBox};
use crate::norm::{denormalize_to_u8, CIFAR10_MEAN, CIFAR10_STD};
use crate::saliency::{argmax_first, fine_grained_saliency};
use crate::sample::{perm_tensor, permutation};
use crate::{MixContext, MixMethod, Mixed, MixedLabels};

/// `mix_args` of SaliencyMix: how to undo the input normalization.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaliencyMixArgs {
    /// Per-channel RGB mean used to normalize the images (CIFAR-10 default).
    pub mean: [f64; 3],
    /// Per-channel RGB std used to normalize the images (CIFAR-10 default).
    pub std: [f64; 3],
}

impl Default for SaliencyMixArgs {
    fn default() -> Self {
        Self {
            mean: CIFAR10_MEAN,
            std: CIFAR10_STD,
        }
    }
}

impl MixArgs for SaliencyMixArgs {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.std.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(format!(
                "field `std`: {:?} must be finite and > 0",
                self.std
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(format!("field `mean`: {:?} must be finite", self.mean));
        }
        Ok(())
    }
}

/// SaliencyMix with its α (CIFAR-10: 0.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaliencyMix {
    /// Beta(α, α) parameter.
    pub alpha: f64,
    /// Method options.
    pub args: SaliencyMixArgs,
}

impl Default for SaliencyMix {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            args: SaliencyMixArgs::default(),
        }
    }
}

impl SaliencyMix {
    /// Row and column of the saliency peak of one normalized `3×H×W` image.
    pub fn saliency_peak(&self, image: &Tensor) -> Result<(usize, usize)> {
        let (c, h, w) = image.dims3()?;
        if c != 3 {
            candle_core::bail!("saliencymix needs 3-channel RGB images, got {c} channels");
        }
        let values = image
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rgb = denormalize_to_u8(&values, &self.args.mean, &self.args.std);
        let peak = argmax_first(&fine_grained_saliency(&rgb, h, w));
        Ok((peak / w, peak % w))
    }
}

impl MixMethod for SaliencyMix {
    fn name(&self) -> &'static str {
        "saliencymix"
    }

    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let (n, _, h, w) = images.dims4()?;
        let lambda = ctx.draw_lambda(self.alpha);
        let perm_host = permutation(ctx.rng, n);
        let perm = perm_tensor(&perm_host, images.device())?;
        let (rc, cc) = self.saliency_peak(&images.get(perm_host[0] as usize)?)?;
        let cut = CutBox::centred(rc, cc, cut_side(h, lambda), cut_side(w, lambda), h, w);
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
