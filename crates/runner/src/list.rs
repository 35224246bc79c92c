//! `runner list`: the methods with their CIFAR-10 recipe and the backbones with their
//! parameter counts, as a table or JSON.

use anyhow::Result;
use bench_config::{Arch, RunConfig};
use candle_core::Device;
use clap::Args;
use serde_json::{json, Value};

use crate::config::Recipe;
use crate::setup;

/// Options of `runner list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What a method mixes, in a few words (the table's last column).
fn mixes(mode: &str) -> &'static str {
    match mode {
        "vanilla" => "no mixing (baseline)",
        "mixup" => "pixel-wise blend",
        "cutmix" => "one random box",
        "manifoldmix" => "blend of hidden features",
        "smoothmix" => "Gaussian-smoothed box",
        "saliencymix" => "box around the saliency peak",
        "attentivemix" => "top attention cells (pretrained net)",
        "fmix" => "low-frequency binary mask",
        "puzzlemix" => "saliency transport + graph cut",
        "gridmix" => "grid of cells",
        "resizemix" => "resized partner pasted",
        "automix" => "learned MixBlock masks",
        "samix" => "learned MixBlock masks (λ-aware)",
        _ => "",
    }
}

fn loss_name(cfg_loss: bench_config::HeadLoss) -> String {
    serde_json::to_value(cfg_loss)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The backbone of `arch` at the benchmark width, with its parameter count (BatchNorm running
/// statistics excluded).
fn backbone_row(arch: Arch) -> Result<Value> {
    let mut cfg = RunConfig::default();
    cfg.model.backbone.arch = arch;
    let (varmap, _) = setup::build_backbone(&cfg, &Device::Cpu)?;
    let data = varmap.data().lock().expect("VarMap lock");
    let parameters: usize = data
        .iter()
        .filter(|(k, _)| !backbones::is_buffer(k))
        .map(|(_, v)| v.elem_count())
        .sum();
    let b = setup::backbone_config(&cfg);
    Ok(json!({
        "arch": serde_json::to_value(arch)?,
        "parameters": parameters,
        "base_width": b.base_width,
        "stage_blocks": b.blocks(),
        "groups": (arch == Arch::Resnext50).then(|| b.groups()),
        "num_classes": b.num_classes,
    }))
}

/// `runner list`.
pub fn run(args: &ListArgs) -> Result<()> {
    let methods: Vec<Value> = bench_config::MIX_MODES
        .iter()
        .map(|&mode| {
            let modes = [mode.to_string()];
            let r18 = Recipe::of(&modes, Arch::Resnet18);
            let rx50 = Recipe::of(&modes, Arch::Resnext50);
            json!({
                "mode": mode,
                "alpha": {"resnet18": r18.alpha[0], "resnext50": rx50.alpha[0]},
                "alpha_used": mode != "vanilla",
                "loss": loss_name(r18.loss),
                "min_lr": r18.min_lr,
                "learned": setup::LEARNED_MODES.contains(&mode),
                "mixes": mixes(mode),
            })
        })
        .collect();
    let backbones = vec![
        backbone_row(Arch::Resnet18)?,
        backbone_row(Arch::Resnext50)?,
    ];
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"methods": methods, "backbones": backbones}))?
        );
        return Ok(());
    }
    println!(
        "methods (CIFAR-10 recipe; choose with --set model.mix_mode=MODE, see docs/methods.md):"
    );
    println!(
        "  {:<13} {:>12}  {:<8} {:<6}  mixes",
        "mode", "α r18/rx50", "loss", "min_lr"
    );
    for m in &methods {
        let alpha = if m["alpha_used"] == true {
            format!("{} / {}", m["alpha"]["resnet18"], m["alpha"]["resnext50"])
        } else {
            "–".into()
        };
        println!(
            "  {:<13} {:>12}  {:<8} {:<6}  {}",
            m["mode"].as_str().unwrap_or_default(),
            alpha,
            m["loss"].as_str().unwrap_or_default(),
            m["min_lr"].to_string(),
            m["mixes"].as_str().unwrap_or_default()
        );
    }
    println!("backbones (CIFAR variants, 10 classes; choose with --set model.backbone.arch=ARCH):");
    for b in &backbones {
        let blocks: Vec<String> = b["stage_blocks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.to_string())
            .collect();
        let grouped = match b["arch"].as_str() {
            Some("resnext50") => format!(", {} groups (32x4d)", b["groups"]),
            _ => String::new(),
        };
        println!(
            "  {:<10} {:>11} parameters  base width {}, blocks {}{grouped}",
            b["arch"].as_str().unwrap_or_default(),
            crate::session::thousands(b["parameters"].as_u64().unwrap_or(0) as usize),
            b["base_width"],
            blocks.join("-"),
        );
    }
    Ok(())
}
