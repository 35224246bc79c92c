//! Turning a config into the pieces of a run: data, backbone, mixing methods, loss.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use automix::{AutoMixConfig, AutoMixModel};
use backbones::{CifarResNet, CifarResNetConfig};
use bench_config::{Arch, HeadLoss as CfgLoss, InitScheme, PaddingMode, RunConfig};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cifar_data::CifarSplit;
use mix_ops::policy::ModePicker;
use mix_ops::MixMethod;
use train::loss::HeadLoss;

/// Modes run by the `automix` crate rather than by `mix-ops`.
pub const LEARNED_MODES: &[&str] = &["automix", "samix"];

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
    if let Some(size) = cfg.model.mix_args.get("fmix").and_then(|a| a.get("size")) {
        if size != &serde_json::json!([32, 32]) {
            bail!("model.mix_args.fmix.size: {size} must equal the CIFAR image size [32, 32]");
        }
    }
    if modes.iter().any(|m| m == "puzzlemix") && cfg.model.head.loss == CfgLoss::CeNone {
        bail!("model.head.loss: puzzlemix has a per-sample λ and needs CE_soft or CE_sigm (CE_none would weight every sample by the batch-mean λ)");
    }
    if modes.iter().any(|m| m == "attentivemix") {
        const HOW: &str = "docs/methods.md, AttentiveMix+, says how to make it";
        match &cfg.model.attention_weights {
            None => bail!("model.attention_weights: attentivemix needs a safetensors file of the attention network ({HOW})"),
            Some(p) if !Path::new(p).is_file() => bail!(
                "model.attention_weights: {p} {} ({HOW})",
                if Path::new(p).exists() { "is not a file" } else { "does not exist" }
            ),
            Some(_) => {}
        }
    }
    if LEARNED_MODES.contains(&modes[0].as_str()) {
        automix_config(cfg)?;
    }
    Ok(())
}

/// The AutoMix/SAMix settings of a run config: the mode's adapted CIFAR
/// defaults, α from `model.alpha` (if given), then the overrides of `model.automix`.
pub fn automix_config(cfg: &RunConfig) -> Result<AutoMixConfig> {
    let mode = cfg.model.mix_mode.to_vec()[0].clone();
    let mut base = match mode.as_str() {
        "samix" => serde_json::to_value(AutoMixConfig::samix())?,
        _ => serde_json::to_value(AutoMixConfig::automix())?,
    };
    base["alpha"] = serde_json::json!(alphas(cfg)[0]);
    if let Some(serde_json::Value::Object(over)) = &cfg.model.automix {
        for (k, v) in over {
            if k == "variant" {
                bail!("model.automix.variant: the variant is chosen by model.mix_mode");
            }
            base[k] = v.clone();
        }
    } else if cfg.model.automix.is_some() {
        bail!("model.automix: must be an object");
    }
    let am: AutoMixConfig =
        serde_json::from_value(base).map_err(|e| anyhow::anyhow!("model.automix: {e}"))?;
    am.validate()
        .map_err(|e| anyhow::anyhow!("model.automix: {e}"))?;
    Ok(am)
}

/// The AutoMix/SAMix model of a config (freshly initialised from `seed`).
pub fn build_automix_model(cfg: &RunConfig, device: &Device) -> Result<AutoMixModel> {
    Ok(AutoMixModel::new(
        automix_config(cfg)?,
        backbone_config(cfg),
        device,
        cfg.seed,
    )?)
}

/// Builds the configured mixing methods, in config order.
pub fn build_methods(cfg: &RunConfig) -> Result<Vec<Box<dyn MixMethod>>> {
    let modes = cfg.model.mix_mode.to_vec();
    modes
        .iter()
        .zip(alphas(cfg))
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

/// α of each configured mode: `model.alpha`, or when it is omitted each mode's
/// benchmark value for the configured backbone (1 where a mode has none).
pub fn alphas(cfg: &RunConfig) -> Vec<f64> {
    if let Some(a) = &cfg.model.alpha {
        return a.to_vec();
    }
    let backbone = match cfg.model.backbone.arch {
        Arch::Resnet18 => "r18",
        Arch::Resnext50 => "rx50",
    };
    cfg.model
        .mix_mode
        .to_vec()
        .iter()
        .map(|m| mix_ops::registry::default_alpha(m, backbone).unwrap_or(1.0))
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

/// Train and test splits, downloaded first when asked and missing, truncated to
/// the limits; every label must be a class of the head.
pub fn load_data(cfg: &RunConfig) -> Result<(Arc<CifarSplit>, Arc<CifarSplit>)> {
    let dir = data_dir(cfg)?;
    // With limits, only the files holding the first N images are read (a prefix of the
    // official files is a valid subset).
    let train = cifar_data::load_train_limited(dir, cfg.data.limit_train)?;
    let test = cifar_data::load_test_limited(dir, cfg.data.limit_test)?;
    check_labels(cfg, &[("training", &train), ("test", &test)])?;
    Ok((Arc::new(train), Arc::new(test)))
}

/// Every label must be a class of the head.
fn check_labels(cfg: &RunConfig, splits: &[(&str, &CifarSplit)]) -> Result<()> {
    let classes = cfg.model.head.num_classes;
    for (name, split) in splits {
        if let Some(&max) = split.labels.iter().max() {
            if max as usize >= classes {
                bail!(
                    "model.head.num_classes: {classes} classes, but the {name} data in {} has label {max}",
                    cfg.data.dir
                );
            }
        }
    }
    Ok(())
}

/// The data directory, downloaded into first when asked and missing.
fn data_dir(cfg: &RunConfig) -> Result<&Path> {
    let dir = Path::new(&cfg.data.dir);
    if dir.is_file() {
        bail!(
            "data.dir {}: is a file; name the directory holding the CIFAR-10 batches",
            dir.display()
        );
    }
    if cfg.data.download && cifar_data::load_test(dir).is_err() {
        cifar_data::download(dir)?;
    } else if !dir.exists() {
        bail!(
            "data.dir {}: does not exist; put the CIFAR-10 batches there or pass --download",
            dir.display()
        );
    }
    Ok(dir)
}

/// The note for a median window that covers more evaluations than the run makes: the run
/// is accepted (a smoke run of a few epochs) and its median takes every evaluation there is.
pub fn median_window_note(cfg: &RunConfig) -> Option<String> {
    let evals = cfg.max_epochs / cfg.evaluation.interval;
    let wanted = cfg.evaluation.median_window + 1;
    (wanted > evals).then(|| {
        format!(
            "note: evaluation.median_window {} asks for the median of {wanted} evaluations, but the run makes {evals} ({} epochs, evaluated every {}): the reported median is over all {evals}",
            cfg.evaluation.median_window, cfg.max_epochs, cfg.evaluation.interval
        )
    })
}

/// `--check-config`: everything a run would refuse at its start, without
/// training: the config, the data, the model (which catches widths the grouped
/// convolutions cannot split, and AutoMix/SAMix settings).
pub fn check_config(cfg: &RunConfig) -> Result<()> {
    // The data files are found, and the (smaller) test split's labels fit the head;
    // reading all 50,000 training images would make checking a sweep's configs slow.
    let dir = data_dir(cfg)?;
    cifar_data::detect_layout(dir)?;
    check_labels(
        cfg,
        &[(
            "test",
            &cifar_data::load_test_limited(dir, cfg.data.limit_test)?,
        )],
    )?;
    if LEARNED_MODES.contains(&cfg.model.mix_mode.to_vec()[0].as_str()) {
        build_automix_model(cfg, &Device::Cpu)?;
    } else {
        build_backbone(cfg, &Device::Cpu)?;
    }
    Ok(())
}
