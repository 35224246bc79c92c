//! The network as seen by the mixing methods that need one (PuzzleMix, AttentiveMix+).

use std::path::Path;

use backbones::{AttentionNet, CifarResNet};
use candle_core::{Result, Tensor, Var};
use mix_ops::MixModel;

/// Gives mixing methods the trained backbone (for input gradients) and the
/// frozen attention network, if the run has one.
pub struct NetMixModel<'a> {
    /// The backbone being trained, built over detached weights
    /// (`setup::frozen_view`), so the saliency backward computes no weight gradients.
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
        // Over a frozen view (as the runner passes) the backbone's backward is taped and
        // computes the input's gradient alone.
        let logits = self.net.forward_eval(input.as_tensor())?;
        // The fused cross-entropy op (one op forward and backward), as in training.
        let loss = train::loss::cross_entropy(&logits, labels)?;
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

/// Loads an attention network: a torchvision-named ResNet-18 file, or a mixbench
/// checkpoint (whose backbone sits under `model.` beside the optimizer state).
pub fn load_attention(path: &Path, device: &candle_core::Device) -> Result<AttentionNet> {
    AttentionNet::load(path, device).or_else(|first| {
        AttentionNet::load_with_prefix(path, Some("model."), device).map_err(|_| first)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn snapshot(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
        let mut all: Vec<_> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// PuzzleMix's saliency pass: a real input gradient, and the model —
    /// parameters and BatchNorm running statistics — exactly as before.
    #[test]
    fn input_gradient_leaves_parameters_and_bn_statistics_unchanged() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let cfg = backbones::CifarResNetConfig {
            base_width: 4,
            stage_blocks: Some([1, 1, 1, 1]),
            ..Default::default()
        };
        let net =
            CifarResNet::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        net.init_weights(&varmap, 3).unwrap();
        // The runner's saliency pass runs over a frozen view of the same weights.
        let frozen_vb =
            backbones::DetachedVarMap::new(varmap.clone()).into_var_builder(DType::F32, &dev);
        let frozen = CifarResNet::new(cfg, frozen_vb).unwrap();
        // Make the running statistics non-trivial first, as during training.
        let x = Tensor::randn(0f32, 1., (6, 3, 32, 32), &dev).unwrap();
        net.forward_t(&x, true).unwrap();
        let before = snapshot(&varmap);
        assert!(before
            .iter()
            .any(|(k, v)| k.ends_with("running_mean") && v.iter().any(|&x| x != 0.0)));

        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 5], &dev).unwrap();
        let model = NetMixModel {
            net: &frozen,
            attention: None,
        };
        let grad = model.input_gradient(&x, &y).unwrap();
        assert_eq!(grad.dims(), x.dims());
        let norm = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite());
        assert_eq!(snapshot(&varmap), before);
        // The same gradient as candle's autograd through the trainable network (which also
        // computes every weight gradient), bit for bit.
        let direct = NetMixModel {
            net: &net,
            attention: None,
        }
        .input_gradient(&x, &y)
        .unwrap();
        let diff = (&grad - &direct)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert_eq!(snapshot(&varmap), before);
        assert!(model.attention_features(&x).is_err());
    }
}
