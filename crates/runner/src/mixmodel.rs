//! The network as seen by the mixing methods that need one (PuzzleMix, AttentiveMix+).

use backbones::{AttentionNet, CifarResNet};
use candle_core::{Result, Tensor, Var};
use mix_ops::MixModel;

/// Gives mixing methods the trained backbone (for input gradients) and the
/// frozen attention network, if the run has one.
pub struct NetMixModel<'a> {
    /// The backbone being trained.
    pub net: &'a CifarResNet,
    /// AttentiveMix+'s frozen attention network.
    pub attention: Option<&'a AttentionNet>,
}

impl MixModel for NetMixModel<'_> {
    fn input_gradient(&self, images: &Tensor, labels: &Tensor) -> Result<Tensor> {
        // Evaluation mode: BatchNorm uses (and does not update) its running
        // statistics, and no optimizer step follows, so the pass leaves the
        // model exactly as it was (checked in tests/e2e.rs).
        let input = Var::from_tensor(&images.detach())?;
        let logits = self.net.forward_t(input.as_tensor(), false)?;
        let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
        let grads = loss.backward()?;
        grads
            .get(input.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the input images".into()))
    }

    fn attention_features(&self, images: &Tensor) -> Result<Tensor> {
        match self.attention {
            Some(net) => net.attention_features(images),
            None => Err(candle_core::Error::Msg(
                "attentivemix needs `model.attention_weights` (a safetensors attention network)"
                    .into(),
            )),
        }
    }
}
