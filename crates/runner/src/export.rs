//! `runner export`: a checkpoint's classifier backbone as a plain safetensors state dict, under
//! the names a PyTorch CIFAR ResNet (torchvision / OpenMixup layout) uses, without optimizer
//! state or the other networks of AutoMix/SAMix. `docs/evaluation.md` has the name mapping and
//! the PyTorch lines that load it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_config::RunConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use clap::Args;
use serde_json::{json, Value};

use crate::output::{OutputFile, Replace};
use crate::setup;

/// Options of `runner export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The checkpoint to export (e.g. `work_dirs/<run>/epoch_800.safetensors`).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The run's config, to check the weights against its backbone; by default the config
    /// stored in the checkpoint.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Replace `--out` if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Checkpoint prefixes of the classifier backbone, in the order they are looked for:
/// `model.` (every hand-crafted mode), `model_q.` (AutoMix/SAMix: the SGD-trained q encoder,
/// whose `fc` is `Head_one`).
pub const BACKBONE_PREFIXES: [&str; 2] = ["model.", "model_q."];

/// Names under a backbone prefix that belong to no backbone: AutoMix/SAMix's second head.
const NOT_BACKBONE: [&str; 1] = ["head_mix."];

/// PyTorch's BatchNorm step counter: carried along when a checkpoint has it, but not a
/// variable of this project's networks.
const BN_COUNTER: &str = ".num_batches_tracked";

/// The backbone's tensors of a checkpoint, unprefixed (`conv1.weight`, …): everything under
/// the first of [`BACKBONE_PREFIXES`] that has a `conv1.weight`, less `head_mix.*`. Returns the
/// prefix too.
pub fn backbone_tensors(
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<(&'static str, HashMap<String, Tensor>)> {
    let Some(prefix) = BACKBONE_PREFIXES
        .into_iter()
        .find(|p| tensors.contains_key(&format!("{p}conv1.weight")))
    else {
        bail!(
            "{}: no backbone in the checkpoint (neither `model.conv1.weight` nor `model_q.conv1.weight`)",
            file.display()
        );
    };
    let backbone = tensors
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(prefix)?;
            (!NOT_BACKBONE.iter().any(|p| name.starts_with(p)))
                .then(|| (name.to_string(), v.clone()))
        })
        .collect();
    Ok((prefix, backbone))
}

/// Copies a checkpoint's backbone into `varmap` (built by `setup::build_backbone`), strictly:
/// a missing or extra variable or a shape mismatch is an error naming the checkpoint key.
/// Returns the prefix it was found under.
pub fn load_backbone(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<&'static str> {
    let (prefix, backbone) = backbone_tensors(tensors, file)?;
    // Back under the prefix, so that errors name the key as it is in the file.
    let vars: HashMap<String, Tensor> = backbone
        .into_iter()
        .filter(|(k, _)| !k.ends_with(BN_COUNTER))
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect();
    train::checkpoint::load_varmap(varmap, &vars, prefix, file)?;
    Ok(prefix)
}

/// The config a checkpoint was trained with (stored in its metadata by the runner), if any.
pub fn checkpoint_config(meta: &Value, file: &Path) -> Result<Option<RunConfig>> {
    match meta.get("config").and_then(Value::as_str) {
        None => Ok(None),
        Some(text) => Ok(Some(RunConfig::from_json(
            text,
            &format!("{} (stored config)", file.display()),
        )?)),
    }
}

/// `runner export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    // Checked first so that a refused export costs nothing (and never names the checkpoint
    // itself); checked again when the file is put in place.
    let replace = if args.force {
        Replace::Always
    } else {
        Replace::Never
    };
    let out = OutputFile::check("--out", &args.out, replace, &[&args.checkpoint])?;
    let device = Device::Cpu;
    let ckpt = &args.checkpoint;
    let (tensors, meta) = train::checkpoint::load_checkpoint(ckpt, &device)?;
    let cfg = match &args.config {
        Some(p) => Some(RunConfig::load(p)?),
        None => checkpoint_config(&meta, ckpt)?,
    };
    let (prefix, backbone) = backbone_tensors(&tensors, ckpt)?;
    let mut info = json!({
        "format": "pt",
        "names": "torchvision",
        "source": ckpt.display().to_string(),
        "source_prefix": prefix,
        "epoch": meta.get("epoch"),
    });
    if let Some(cfg) = &cfg {
        // The file must be exactly the config's backbone: a strict load proves it.
        let (varmap, _) = setup::build_backbone(cfg, &device)?;
        load_backbone(&varmap, &tensors, ckpt)
            .with_context(|| "the checkpoint does not match the config's backbone".to_string())?;
        let b = setup::backbone_config(cfg);
        info["backbone"] = json!({
            "arch": format!("{:?}", b.arch),
            "base_width": b.base_width,
            "stage_blocks": b.blocks(),
            "groups": b.groups(),
            "num_classes": b.num_classes,
        });
    }
    let mut list: Vec<(String, Tensor)> = backbone.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    out.write(|tmp| train::checkpoint::save_checkpoint(tmp, &list, &info).map_err(Into::into))?;
    let parameters: usize = list
        .iter()
        .filter(|(k, _)| !backbones::is_buffer(k) && !k.ends_with(BN_COUNTER))
        .map(|(_, t)| t.elem_count())
        .sum();
    println!(
        "{}",
        json!({
            "out": args.out.display().to_string(),
            "tensors": list.len(),
            "parameters": parameters,
            "source_prefix": prefix,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: f32) -> Tensor {
        Tensor::new(&[v], &Device::Cpu).unwrap()
    }

    #[test]
    fn backbone_tensors_strip_the_prefix_and_skip_other_networks() {
        let file = Path::new("ckpt.safetensors");
        let hand: HashMap<String, Tensor> = [
            ("model.conv1.weight", 1.0),
            ("model.fc.bias", 2.0),
            ("optim.model.conv1.weight.momentum", 3.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), t(v)))
        .collect();
        let (prefix, b) = backbone_tensors(&hand, file).unwrap();
        assert_eq!(prefix, "model.");
        let mut names: Vec<_> = b.keys().cloned().collect();
        names.sort();
        assert_eq!(names, vec!["conv1.weight", "fc.bias"]);

        let learned: HashMap<String, Tensor> = [
            "model_q.conv1.weight",
            "model_q.layer1.0.bn1.num_batches_tracked",
            "model_q.head_mix.weight",
            "model_k.conv1.weight",
            "mixblock.query.weight",
        ]
        .into_iter()
        .map(|k| (k.to_string(), t(0.0)))
        .collect();
        let (prefix, b) = backbone_tensors(&learned, file).unwrap();
        assert_eq!(prefix, "model_q.");
        let mut names: Vec<_> = b.keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            vec!["conv1.weight", "layer1.0.bn1.num_batches_tracked"]
        );

        let err = backbone_tensors(&HashMap::new(), file).unwrap_err();
        assert!(err.to_string().contains("no backbone"), "{err}");
    }
}
