//! The step of AutoMix / SAMix (`mix_mode: "automix" | "samix"`): the
//! `automix` crate's model (two encoders, MixBlock, momentum updates) under the
//! same loop, logs and checkpoints as every other mode.

use anyhow::{Context, Result};
use automix::AutoMixModel;
use bench_config::RunConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use cifar_data::CifarSplit;
use rand_chacha::ChaCha8Rng;
use train::metrics;
use train::sgd::Sgd;

use crate::session::{StepAt, StepModel, StepOutput};
use crate::setup;

/// SGD over the model's groups, with the config's momentum and weight decay for the encoder.
pub fn optimizer(model: &AutoMixModel, cfg: &RunConfig) -> Result<Sgd> {
    let mut sgd: Option<Sgd> = None;
    for group in model.optimizer_groups() {
        let (name, vars, mut opts) = (group.name, group.vars, group.options);
        if name == "q" {
            opts = crate::net_step::sgd_options(cfg);
        } else {
            opts.momentum = cfg.optimizer.momentum;
            opts.nesterov = cfg.optimizer.nesterov;
        }
        match &mut sgd {
            None => sgd = Some(Sgd::new(vars, opts)?),
            Some(s) => s.add_group(vars, opts)?,
        }
    }
    sgd.context("the AutoMix model has no optimizer group")
}

/// AutoMix/SAMix with its optimizer.
pub struct AutoMixStep {
    model: AutoMixModel,
    sgd: Sgd,
    device: Device,
}

impl AutoMixStep {
    /// Builds the model and optimizer of `cfg`.
    pub fn new(cfg: &RunConfig, device: &Device) -> Result<Self> {
        if cfg.lr_config.min_lr != automix::MIN_LR {
            eprintln!(
                "note: lr_config.min_lr is {} (the AutoMix/SAMix recipe uses {})",
                cfg.lr_config.min_lr,
                automix::MIN_LR
            );
        }
        let model = setup::build_automix_model(cfg, device)?;
        let sgd = optimizer(&model, cfg)?;
        Ok(Self {
            model,
            sgd,
            device: device.clone(),
        })
    }
}

impl StepModel for AutoMixStep {
    fn varmaps(&self) -> Vec<(&'static str, &VarMap)> {
        self.model.varmaps().to_vec()
    }

    fn optimizer(&mut self) -> &mut Sgd {
        &mut self.sgd
    }

    fn step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        rng: &mut ChaCha8Rng,
        _at: StepAt,
    ) -> Result<StepOutput> {
        let out = self.model.train_step(x, y, rng)?;
        Ok(StepOutput {
            loss: out.loss,
            logs: out.logs,
            tapes: out.tapes,
        })
    }

    fn after_update(&mut self, at: StepAt) -> Result<()> {
        self.model
            .momentum_update(self.model.momentum_at(at.global, at.total))?;
        Ok(())
    }

    fn heads(&self) -> Vec<&'static str> {
        automix::EVAL_HEADS.to_vec()
    }

    /// The q encoder's mixed-sample head: the classifier SGD trains, on the batch it trains on.
    fn train_acc_key(&self) -> &'static str {
        "acc_mix_q"
    }

    /// Top-1 / top-5 (%) of each of the four predictors (§5.12.7).
    fn evaluate(&self, data: &CifarSplit, batch_size: usize) -> Result<Vec<(String, f64, f64)>> {
        let mut counts: Vec<(&'static str, usize, usize)> = Vec::new();
        for b in cifar_data::test_batches(data, batch_size) {
            let (x, y) = cifar_data::to_device_batch(&b, &self.device)?;
            for (i, (head, logits)) in self.model.eval_logits(&x)?.into_iter().enumerate() {
                let c = metrics::topk_corrects(&logits, &y, &[1, 5.min(logits.dim(1)?)])?;
                if counts.len() <= i {
                    counts.push((head, 0, 0));
                }
                counts[i].1 += c[0];
                counts[i].2 += c[1];
            }
        }
        let n = data.len().max(1) as f64;
        Ok(counts
            .into_iter()
            .map(|(h, c1, c5)| (h.to_string(), 100.0 * c1 as f64 / n, 100.0 * c5 as f64 / n))
            .collect())
    }
}
