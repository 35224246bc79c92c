//! Turning a config into the pieces of a run: data, backbone, mixing methods, loss.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use backbones::{CifarResNet, CifarResNetConfig};
use bench_config::{Arch, HeadLoss as CfgLoss, InitScheme, PaddingMode, RunConfig};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cifar_data::CifarSplit;
use mix_ops::policy::ModePicker;
use mix_ops::MixMethod;
use train::loss::HeadLoss;

use crate::TrainArgs;

/// Modes run by the `automix` crate rather than by `mix-ops`.
pub const LEARNED_MODES: &[&str] = &["automix", "samix"];

/// Loads the config named by `--config`, applies the command-line overrides
/// and validates it (structure, then every mode's arguments).
pub fn load_config(args: &TrainArgs) -> Result<RunConfig> {
    let Some(path) = &args.config else {
        bail!("--config: a config file is required (see configs/ and docs/config.md)");
    };
    let mut cfg = RunConfig::load(path)?;
    if let Some(e) = args.epochs {
        cfg.max_epochs = e;
    }
    if let Some(n) = args.limit_train {
        cfg.data.limit_train = Some(n);
    }
    if let Some(n) = args.limit_test {
        cfg.data.limit_test = Some(n);
    }
    if let Some(n) = args.batch_size {
        cfg.data.batch_size = n;
    }
    if let Some(d) = &args.data {
        cfg.data.dir = d.clone();
    }
    if args.download {
        cfg.data.download = true;
    }
    if let Some(w) = &args.work_dir {
        cfg.work_dir = Some(w.clone());
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(n) = args.log_interval {
        cfg.log.interval = n;
    }
    if let Some(n) = args.checkpoint_interval {
        cfg.checkpoint.interval = n;
    }
    let origin = path.display();
    cfg.validate().with_context(|| format!("{origin}"))?;
    check_modes(&cfg).with_context(|| format!("{origin}"))?;
    Ok(cfg)
}

/// Method-level checks: every mode is known and its `mix_args` parse, and the
/// loss can represent its labels.
pub fn check_modes(cfg: &RunConfig) -> Result<()> {
    let modes = cfg.model.mix_mode.to_vec();
    let learned: Vec<_> = modes
        .iter()
        .filter(|m| LEARNED_MODES.contains(&m.as_str()))
        .collect();
    if !learned.is_empty() && modes.len() > 1 {
        bail!(
            "model.mix_mode: `{}` trains its own MixBlock and cannot be combined with other modes",
            learned[0]
        );
    }
    if learned.is_empty() {
        build_methods(cfg)?;
    }
    if modes.iter().any(|m| m == "puzzlemix") && cfg.model.head.loss == CfgLoss::CeNone {
        bail!("model.head.loss: puzzlemix has a per-sample λ and needs CE_soft or CE_sigm (CE_none would weight every sample by the batch-mean λ)");
    }
    if modes.iter().any(|m| m == "attentivemix") && cfg.model.attention_weights.is_none() {
        bail!("model.attention_weights: attentivemix needs a safetensors file of the attention network (see docs/methods.md)");
    }
    Ok(())
}

/// Builds the configured mixing methods, in config order.
pub fn build_methods(cfg: &RunConfig) -> Result<Vec<Box<dyn MixMethod>>> {
    let modes = cfg.model.mix_mode.to_vec();
    let alphas = cfg.model.alpha.to_vec();
    modes
        .iter()
        .zip(alphas)
        .map(|(mode, alpha)| {
            let args = cfg.model.mix_args.get(mode);
            mix_ops::registry::build_method(mode, alpha, args).map_err(|e| match args {
                Some(_) if !matches!(e, mix_ops::MixConfigError::UnknownMode(_)) => {
                    anyhow::anyhow!("model.mix_args.{mode}: {e}")
                }
                _ => anyhow::anyhow!("model.mix_mode: {e}"),
            })
        })
        .collect()
}

/// The per-batch mode chooser of the config.
pub fn mode_picker(cfg: &RunConfig) -> ModePicker {
    ModePicker::new(
        cfg.model.mix_mode.to_vec(),
        cfg.model.mix_prob.clone(),
        cfg.model.mix_repeat,
    )
}

/// The head loss of the config.
pub fn head_loss(cfg: &RunConfig) -> HeadLoss {
    match cfg.model.head.loss {
        CfgLoss::CeNone => HeadLoss::CeNone,
        CfgLoss::CeSoft => HeadLoss::CeSoft,
        CfgLoss::CeSigm => HeadLoss::CeSigm,
    }
}

/// The backbone description of the config.
pub fn backbone_config(cfg: &RunConfig) -> CifarResNetConfig {
    let b = &cfg.model.backbone;
    CifarResNetConfig {
        arch: match b.arch {
            Arch::Resnet18 => backbones::Arch::ResNet18,
            Arch::Resnext50 => backbones::Arch::ResNeXt50,
        },
        base_width: b.base_width,
        stage_blocks: b.stage_blocks,
        num_classes: cfg.model.head.num_classes,
        init: match b.init {
            InitScheme::Benchmark => backbones::InitScheme::Benchmark,
            InitScheme::PytorchDefault => backbones::InitScheme::PytorchDefault,
        },
    }
}

/// A freshly initialised backbone and the VarMap holding its variables.
pub fn build_backbone(cfg: &RunConfig, device: &Device) -> Result<(VarMap, CifarResNet)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = CifarResNet::new(backbone_config(cfg), vb)?;
    net.init_weights(&varmap, cfg.seed)?;
    Ok((varmap, net))
}

/// A second view of the backbone over detached weights: same storage, always
/// current, but a backward through it computes only the input gradient (what
/// PuzzleMix's saliency needs), not every weight gradient.
pub fn frozen_view(cfg: &RunConfig, varmap: &VarMap, device: &Device) -> Result<CifarResNet> {
    let vb = backbones::DetachedVarMap::new(varmap.clone()).into_var_builder(DType::F32, device);
    Ok(CifarResNet::new(backbone_config(cfg), vb)?)
}

/// The loader's padding mode.
pub fn padding_mode(cfg: &RunConfig) -> cifar_data::PaddingMode {
    match cfg.data.padding_mode {
        PaddingMode::Constant => cifar_data::PaddingMode::Constant,
        PaddingMode::Reflect => cifar_data::PaddingMode::Reflect,
    }
}

/// Train and test splits, downloaded first when asked and missing, truncated to the limits.
pub fn load_data(cfg: &RunConfig) -> Result<(Arc<CifarSplit>, Arc<CifarSplit>)> {
    let dir = Path::new(&cfg.data.dir);
    if cfg.data.download && cifar_data::load_test(dir).is_err() {
        cifar_data::download(dir)?;
    }
    let mut train = cifar_data::load_train(dir)?;
    let mut test = cifar_data::load_test(dir)?;
    if let Some(n) = cfg.data.limit_train {
        train.truncate(n);
    }
    if let Some(n) = cfg.data.limit_test {
        test.truncate(n);
    }
    Ok((Arc::new(train), Arc::new(test)))
}
