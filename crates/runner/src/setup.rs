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
    // Command-line values are checked as such, so an error names the flag, not the file.
    for (flag, value) in [
        ("--epochs", args.epochs),
        ("--limit-train", args.limit_train),
        ("--limit-test", args.limit_test),
        ("--batch-size", args.batch_size),
        ("--log-interval", args.log_interval),
        ("--checkpoint-interval", args.checkpoint_interval),
        ("--stop-after", args.stop_after),
    ] {
        if value == Some(0) {
            bail!("{flag}: must be at least 1");
        }
    }
    let mut cfg = RunConfig::load_with_overrides(path, &args.set)?;
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
    // The effective config (logged, checkpointed, compared on resume) names every α.
    let a = alphas(&cfg);
    cfg.model.alpha = Some(match a.len() {
        1 => bench_config::OneOrMany::One(a[0]),
        _ => bench_config::OneOrMany::Many(a),
    });
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
    if let Some(size) = cfg.model.mix_args.get("fmix").and_then(|a| a.get("size")) {
        if size != &serde_json::json!([32, 32]) {
            bail!("model.mix_args.fmix.size: {size} must equal the CIFAR image size [32, 32]");
        }
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
    let mut train = cifar_data::load_train(dir)?;
    let mut test = cifar_data::load_test(dir)?;
    if let Some(n) = cfg.data.limit_train {
        train.truncate(n);
    }
    if let Some(n) = cfg.data.limit_test {
        test.truncate(n);
    }
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

/// `--check-config`: everything a run would refuse at its start, without
/// training: the config, the data, the model (which catches widths the grouped
/// convolutions cannot split, and AutoMix/SAMix settings), and whether the
/// configured median window fits the run.
pub fn check_config(cfg: &RunConfig) -> Result<()> {
    // The data files are found, and the (smaller) test split's labels fit the head;
    // reading all 50,000 training images would make checking a sweep's configs slow.
    let dir = data_dir(cfg)?;
    cifar_data::detect_layout(dir)?;
    check_labels(cfg, &[("test", &cifar_data::load_test(dir)?)])?;
    if LEARNED_MODES.contains(&cfg.model.mix_mode.to_vec()[0].as_str()) {
        crate::automix_step::build_model(cfg, &Device::Cpu)?;
    } else {
        build_backbone(cfg, &Device::Cpu)?;
    }
    let evals = cfg.max_epochs / cfg.evaluation.interval;
    if cfg.evaluation.median_window + 1 > evals {
        bail!(
            "evaluation.median_window: the median covers {} evaluations but the run has {evals} ({} epochs, evaluated every {})",
            cfg.evaluation.median_window + 1,
            cfg.max_epochs,
            cfg.evaluation.interval
        );
    }
    Ok(())
}
