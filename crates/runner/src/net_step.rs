//! The step of every hand-crafted mode: mix the batch (`mix-ops`), forward the
//! backbone (with ManifoldMix's hidden-layer hook), mixed-label loss.

use std::path::Path;

use anyhow::Result;
use bench_config::RunConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use cifar_data::CifarSplit;
use mix_ops::MixContext;
use rand_chacha::ChaCha8Rng;
use train::metrics;
use train::sgd::Sgd;

use crate::mixmodel::NetMixModel;
use crate::session::{StepAt, StepModel, StepOutput};
use crate::setup;

/// A CIFAR backbone trained under one or more hand-crafted mixing methods.
pub struct NetStep {
    device: Device,
    varmap: VarMap,
    net: backbones::CifarResNet,
    /// The same network over detached weights, for PuzzleMix's saliency pass.
    frozen: backbones::CifarResNet,
    attention: Option<backbones::AttentionNet>,
    methods: Vec<Box<dyn mix_ops::MixMethod>>,
    picker: mix_ops::policy::ModePicker,
    loss: train::loss::HeadLoss,
    sgd: Sgd,
}

impl NetStep {
    /// Builds the backbone, methods, loss and optimizer of `cfg` (freshly initialised).
    pub fn new(cfg: &RunConfig, device: &Device) -> Result<Self> {
        let (varmap, net) = setup::build_backbone(cfg, device)?;
        let frozen = setup::frozen_view(cfg, &varmap, device)?;
        let attention = match &cfg.model.attention_weights {
            Some(p) => Some(crate::mixmodel::load_attention(Path::new(p), device)?),
            None => None,
        };
        let sgd = Sgd::new(
            train::sgd::trainable_vars(&varmap, backbones::is_buffer),
            sgd_options(cfg),
        )?;
        Ok(Self {
            device: device.clone(),
            methods: setup::build_methods(cfg)?,
            picker: setup::mode_picker(cfg),
            loss: setup::head_loss(cfg),
            varmap,
            net,
            frozen,
            attention,
            sgd,
        })
    }
}

impl StepModel for NetStep {
    fn varmaps(&self) -> Vec<(&'static str, &VarMap)> {
        vec![("model.", &self.varmap)]
    }

    fn optimizer(&mut self) -> &mut Sgd {
        &mut self.sgd
    }

    /// Mixes `mix_repeat` times; the loss is the mean over repeats, the logged
    /// accuracies are the first repeat's.
    fn step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        rng: &mut ChaCha8Rng,
        _at: StepAt,
    ) -> Result<StepOutput> {
        let picks = self.picker.pick(&mut *rng);
        let scale = 1.0 / picks.len() as f64;
        let mix_model = NetMixModel {
            net: &self.frozen,
            attention: self.attention.as_ref(),
        };
        let mut total: Option<Tensor> = None;
        let mut logs = Vec::new();
        let mut tapes = Vec::new();
        for (r, idx) in picks.into_iter().enumerate() {
            let mut ctx = MixContext::with_model(&mut *rng, &mix_model);
            let mixed = self.methods[idx].mix(x, y, &mut ctx)?;
            let (logits, tape) = self
                .net
                .forward_train(&mixed.images, mixed.feature_mix.as_ref())?;
            tapes.extend(tape);
            let loss = (train::loss::mixed_loss(&logits, &mixed.labels, self.loss)? * scale)?;
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
            if r == 0 {
                let logits = logits.detach();
                let acc = (logits
                    .argmax(1)?
                    .eq(&mixed.labels.y_a)?
                    .to_dtype(DType::F32)?
                    .mean_all()?
                    * 100.0)?;
                logs.push(("acc", acc));
                if !mixed.labels.is_plain() {
                    logs.push(("acc_mix", metrics::acc_mix_tensor(&logits, &mixed.labels)?));
                }
            }
        }
        Ok(StepOutput {
            loss: total.expect("at least one repeat"),
            logs,
            tapes,
        })
    }

    fn heads(&self) -> Vec<&'static str> {
        vec!["head0"]
    }

    fn evaluate(&self, data: &CifarSplit, batch_size: usize) -> Result<Vec<(String, f64, f64)>> {
        let (top1, top5) = evaluate(&self.net, data, batch_size, &self.device)?;
        Ok(vec![("head0".to_string(), top1, top5)])
    }
}

/// Top-1 and top-5 accuracy (%) of `net` in evaluation mode over `data`.
pub fn evaluate(
    net: &backbones::CifarResNet,
    data: &CifarSplit,
    batch_size: usize,
    device: &Device,
) -> Result<(f64, f64)> {
    let (mut c1, mut c5) = (0usize, 0usize);
    for b in cifar_data::test_batches(data, batch_size) {
        let (x, y) = cifar_data::to_device_batch(&b, device)?;
        let logits = net.forward_t(&x, false)?;
        let c = metrics::topk_corrects(&logits, &y, &[1, 5.min(logits.dim(1)?)])?;
        c1 += c[0];
        c5 += c[1];
    }
    let n = data.len().max(1) as f64;
    Ok((100.0 * c1 as f64 / n, 100.0 * c5 as f64 / n))
}

/// SGD options of the config (spec §3.1).
pub fn sgd_options(cfg: &RunConfig) -> train::sgd::GroupOptions {
    train::sgd::GroupOptions {
        lr: train::sgd::GroupLr::Scale(1.0),
        weight_decay: cfg.optimizer.weight_decay,
        momentum: cfg.optimizer.momentum,
        nesterov: cfg.optimizer.nesterov,
    }
}
