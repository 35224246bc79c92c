//! `runner export`: a checkpoint's classifier backbone as a plain safetensors state dict, under
//! the names a PyTorch CIFAR ResNet (torchvision / OpenMixup layout) uses, without optimizer
//! state or the other networks of AutoMix/SAMix. `docs/evaluation.md` has the name mapping and
//! the PyTorch lines that load it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_config::RunConfig;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use clap::Args;
use serde_json::{json, Value};

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
    // Checked first so that a refused export costs nothing; checked again, atomically, when
    // the file is put in place.
    if args.out.exists() && !args.force {
        bail!(
            "--out {}: exists; pass --force to replace it",
            args.out.display()
        );
    }
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
    write_new_file(&args.out, &list, &info, args.force)?;
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

/// Writes `tensors` as a safetensors file at `out` through a staging file in the same
/// directory (created with the process's umask: 0644 under umask 022), then puts it in place:
/// with `force` by renaming over `out`; otherwise by a hard link, which fails rather than
/// replace a file that appeared meanwhile. A failed attempt leaves no staging file behind.
fn write_new_file(
    out: &Path,
    tensors: &[(String, Tensor)],
    info: &Value,
    force: bool,
) -> Result<()> {
    let Some(name) = out.file_name() else {
        bail!("--out {}: not a file path", out.display());
    };
    let mut staging_name = OsString::from(".");
    staging_name.push(name);
    staging_name.push(format!(".export-{}", std::process::id()));
    let staging = out.with_file_name(staging_name);
    train::checkpoint::save_checkpoint(&staging, tensors, info)
        .with_context(|| format!("--out {}", out.display()))?;
    let placed = if force {
        std::fs::rename(&staging, out).map_err(anyhow::Error::from)
    } else {
        match std::fs::hard_link(&staging, out) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(anyhow::anyhow!("exists; pass --force to replace it"))
            }
            // A file system without hard links: fall back to a checked rename.
            Err(_) if !out.exists() => std::fs::rename(&staging, out).map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        }
    };
    // After a hard link the staging name is a second name of the output; after a rename or
    // a failure it may be gone already.
    let _ = std::fs::remove_file(&staging);
    placed.with_context(|| format!("--out {}", out.display()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Persists the new directory entry (not possible on every platform).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

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

    #[cfg(unix)]
    #[test]
    fn write_new_file_refuses_to_replace_unless_forced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("w.safetensors");
        let list = vec![("fc.bias".to_string(), t(1.0))];
        write_new_file(&out, &list, &json!({}), false).unwrap();
        let err = write_new_file(&out, &list, &json!({}), false).unwrap_err();
        assert!(format!("{err:#}").contains("--force"), "{err:#}");
        let replaced = vec![("fc.bias".to_string(), t(2.0))];
        write_new_file(&out, &replaced, &json!({}), true).unwrap();
        let back = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert_eq!(
            back["fc.bias"]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![2.0]
        );
        // Like any new file: 0666 & !umask, never the 0600 of a hidden temporary file.
        let reference = dir.path().join("reference");
        File::create(&reference).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), mode(&reference));
        // Nothing but the output and the reference is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
