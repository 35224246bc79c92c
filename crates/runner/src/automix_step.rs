//! The step of AutoMix / SAMix (`mix_mode: "automix" | "samix"`): the
//! `automix` crate's model (two encoders, MixBlock, momentum updates) under the
//! same loop, logs and checkpoints as every other mode.

use anyhow::{Context, Result};
use automix::{AutoMixConfig, AutoMixModel};
use bench_config::RunConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use cifar_data::CifarSplit;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use train::metrics;
use train::sgd::Sgd;

use crate::session::{StepAt, StepModel, StepOutput};
use crate::setup;

/// The AutoMix/SAMix settings of a run config: the mode's adapted CIFAR
/// defaults, α from `model.alpha` (if given), then the overrides of `model.automix`.
pub fn automix_config(cfg: &RunConfig) -> Result<AutoMixConfig> {
    let mode = cfg.model.mix_mode.to_vec()[0].clone();
    let mut base = match mode.as_str() {
        "samix" => serde_json::to_value(AutoMixConfig::samix())?,
        _ => serde_json::to_value(AutoMixConfig::automix())?,
    };
    base["alpha"] = json!(setup::alphas(cfg)[0]);
    if let Some(Value::Object(over)) = &cfg.model.automix {
        for (k, v) in over {
            if k == "variant" {
                anyhow::bail!("model.automix.variant: the variant is chosen by model.mix_mode");
            }
            base[k] = v.clone();
        }
    } else if cfg.model.automix.is_some() {
        anyhow::bail!("model.automix: must be an object");
    }
    let am: AutoMixConfig =
        serde_json::from_value(base).map_err(|e| anyhow::anyhow!("model.automix: {e}"))?;
    am.validate()
        .map_err(|e| anyhow::anyhow!("model.automix: {e}"))?;
    Ok(am)
}

/// Builds the model of a config (freshly initialised from `seed`).
pub fn build_model(cfg: &RunConfig, device: &Device) -> Result<AutoMixModel> {
    Ok(AutoMixModel::new(
        automix_config(cfg)?,
        setup::backbone_config(cfg),
        device,
        cfg.seed,
    )?)
}

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
        let model = build_model(cfg, device)?;
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
