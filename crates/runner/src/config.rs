//! The run's effective config, from the command line: the `--config` file (or, to continue a
//! run, the config its checkpoint stores), then `--set` overrides, the command-line flags and
//! the method's recipe for every recipe field the user did not set.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_config::{Arch, HeadLoss, OneOrMany, RunConfig};
use serde_json::{json, Value};

use crate::{setup, TrainArgs};

/// A config ready to run, and where its values came from.
#[derive(Debug, Clone)]
pub struct EffectiveConfig {
    /// The config.
    pub cfg: RunConfig,
    /// Where it was read: the `--config` file, or `<checkpoint> (stored config)`.
    pub origin: String,
    /// Fields the method's recipe supplied, with their values (logged at the start).
    pub from_recipe: Vec<(&'static str, Value)>,
}

/// The fields whose CIFAR-10 values depend on the method (and, for α, the backbone).
pub const RECIPE_FIELDS: [&str; 3] = ["model.alpha", "model.head.loss", "lr_config.min_lr"];

/// A method's CIFAR-10 recipe for its [`RECIPE_FIELDS`].
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// α of each mode (the README table; 1 for a mode without one).
    pub alpha: Vec<f64>,
    /// `CE_soft` when a mode has a per-sample λ (PuzzleMix), else `CE_none`.
    pub loss: HeadLoss,
    /// 0.05 for AutoMix/SAMix (their configs' `min_lr`), else 0.
    pub min_lr: f64,
}

impl Recipe {
    /// The recipe of `modes` on `arch`.
    pub fn of(modes: &[String], arch: Arch) -> Self {
        let backbone = match arch {
            Arch::Resnet18 => "r18",
            Arch::Resnext50 => "rx50",
        };
        Self {
            alpha: modes
                .iter()
                .map(|m| mix_ops::registry::default_alpha(m, backbone).unwrap_or(1.0))
                .collect(),
            loss: if modes.iter().any(|m| m == "puzzlemix") {
                HeadLoss::CeSoft
            } else {
                HeadLoss::CeNone
            },
            min_lr: if modes
                .iter()
                .any(|m| setup::LEARNED_MODES.contains(&m.as_str()))
            {
                automix::MIN_LR
            } else {
                0.0
            },
        }
    }

    /// The recipe of a config's modes and backbone.
    pub fn of_config(cfg: &RunConfig) -> Self {
        Self::of(&cfg.model.mix_mode.to_vec(), cfg.model.backbone.arch)
    }

    /// The recipe's value of `field` (one of [`RECIPE_FIELDS`]) as JSON.
    pub fn value(&self, field: &str) -> Value {
        match field {
            "model.alpha" => match self.alpha.as_slice() {
                [a] => json!(a),
                many => json!(many),
            },
            "model.head.loss" => serde_json::to_value(self.loss).expect("serializes"),
            "lr_config.min_lr" => json!(self.min_lr),
            other => unreachable!("not a recipe field: {other}"),
        }
    }
}

/// The dotted `path` of a JSON document, if present and not null.
fn get_path<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let v = path.split('.').try_fold(doc, |node, key| node.get(key))?;
    (!v.is_null()).then_some(v)
}

/// Fills the recipe fields of `cfg` (parsed from `doc` after `--set`) that the user did not
/// set: absent from the config text and from `--set`, or — when `--set` changed the mode or
/// the backbone — written in the text with the recipe value of the text's own method (a
/// generated config spells its recipe out; switching its mode brings the new recipe).
/// Returns the fields filled, with their values.
pub fn apply_recipe(
    cfg: &mut RunConfig,
    text_doc: &Value,
    set_paths: &[String],
) -> Result<Vec<(&'static str, Value)>> {
    let text_cfg: RunConfig =
        serde_json::from_value(text_doc.clone()).context("the config text")?;
    let text_recipe = Recipe::of_config(&text_cfg);
    let recipe = Recipe::of_config(cfg);
    let mut filled = Vec::new();
    for field in RECIPE_FIELDS {
        let set = set_paths
            .iter()
            .any(|p| field == p || field.starts_with(&format!("{p}.")));
        let written = get_path(text_doc, field);
        let explicit = set
            || written.is_some_and(|v| {
                text_recipe.value(field) == recipe.value(field)
                    || !same_value(v, &text_recipe.value(field))
            });
        if explicit {
            continue;
        }
        let value = recipe.value(field);
        match field {
            "model.alpha" => {
                cfg.model.alpha = Some(match recipe.alpha.as_slice() {
                    [a] => OneOrMany::One(*a),
                    many => OneOrMany::Many(many.to_vec()),
                })
            }
            "model.head.loss" => cfg.model.head.loss = recipe.loss,
            "lr_config.min_lr" => cfg.lr_config.min_lr = recipe.min_lr,
            _ => unreachable!(),
        }
        filled.push((field, value));
    }
    Ok(filled)
}

/// JSON equality with numbers compared as numbers (`1` equals `1.0`, `[2]` equals `2`).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), y @ Value::Number(_)) | (y @ Value::Number(_), Value::Array(x)) => {
            x.len() == 1 && same_value(&x[0], y)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        _ => a == b,
    }
}

/// The config text a run starts from, and its origin: `--config FILE`; or, to continue a run
/// (`--resume-from CKPT`, or `--resume` with `--work-dir DIR`), the effective config its
/// checkpoint stores (the file plus every `--set` and flag of the run's start).
fn source(args: &TrainArgs) -> Result<(String, String, Option<PathBuf>)> {
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config", path.display()))?;
        return Ok((text, path.display().to_string(), Some(path.clone())));
    }
    let ckpt = match (&args.resume_from, args.resume, &args.work_dir) {
        (Some(p), _, _) => {
            if !p.is_file() {
                // start_point names the problem (missing, a directory) the same way later.
                crate::workdir::check_resume_from(p)?;
            }
            p.clone()
        }
        (None, Some(_), Some(dir)) => {
            let dir = Path::new(dir);
            match train::checkpoint::find_latest_checkpoint(dir)? {
                Some(p) => p,
                None => bail!(
                    "--resume: {} holds no checkpoint to resume from (a new run needs --config)",
                    dir.display()
                ),
            }
        }
        (None, Some(_), None) => bail!(
            "--config: name the run's config, or its work dir with --work-dir (its checkpoint stores the config)"
        ),
        (None, None, _) => bail!(
            "--config: a config file is required (see configs/ and docs/config.md); to continue a run, --resume --work-dir DIR or --resume-from CHECKPOINT"
        ),
    };
    let meta = train::checkpoint::read_checkpoint_meta(&ckpt)?;
    let Some(text) = meta.get("config").and_then(Value::as_str) else {
        bail!(
            "--config: {} stores no config; pass the run's --config",
            ckpt.display()
        );
    };
    Ok((
        text.to_string(),
        format!("{} (stored config)", ckpt.display()),
        None,
    ))
}

/// The effective config of a training invocation (see the module documentation); validated,
/// with every mode's α spelled out.
pub fn load(args: &TrainArgs) -> Result<EffectiveConfig> {
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
    let (text, origin, file) = source(args)?;
    // Syntax and field errors are reported against the text as it is.
    let mut cfg = RunConfig::from_json(&text, &origin)?;
    let text_doc = serde_json::to_value(&cfg)?;
    let mut doc: Value = serde_json::from_str(&text)?;
    let set_paths = bench_config::apply_overrides(&mut doc, &args.set)?;
    if !set_paths.is_empty() {
        cfg = RunConfig::from_json(&doc.to_string(), &format!("{origin} (with --set)"))?;
    }
    // The text as written (not defaulted): which recipe fields it spells out.
    let written: Value = serde_json::from_str(&text)?;
    if cfg.name.is_empty() {
        cfg.name = file
            .as_deref()
            .and_then(Path::file_stem)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
    }
    apply_flags(&mut cfg, args);
    let mut written_with_modes = written.clone();
    // The text's own method: its modes and backbone as parsed (defaults included).
    for key in ["model.mix_mode", "model.backbone.arch"] {
        if let Some(v) = get_path(&text_doc, key) {
            bench_config::apply_overrides(&mut written_with_modes, &[format!("{key}={v}")])?;
        }
    }
    let from_recipe = apply_recipe(&mut cfg, &written_with_modes, &set_paths)?;
    cfg.validate().with_context(|| origin.clone())?;
    setup::check_modes(&cfg).with_context(|| origin.clone())?;
    // The effective config (logged, checkpointed, compared on resume) names every α.
    let a = setup::alphas(&cfg);
    cfg.model.alpha = Some(match a.len() {
        1 => OneOrMany::One(a[0]),
        _ => OneOrMany::Many(a),
    });
    Ok(EffectiveConfig {
        cfg,
        origin,
        from_recipe,
    })
}

/// The command-line flags that override config fields.
fn apply_flags(cfg: &mut RunConfig, args: &TrainArgs) {
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
}

/// The notes printed when a run (or `--check-config`) starts: the recipe fields that differ
/// from the schema's defaults, and a median window longer than the run.
pub fn notes(eff: &EffectiveConfig) -> Vec<String> {
    [recipe_note(eff), crate::setup::median_window_note(&eff.cfg)]
        .into_iter()
        .flatten()
        .collect()
}

/// The line that says which fields came from the method's recipe, when one of them differs
/// from the schema's default (α 1, `CE_none`, `min_lr` 0: what a config without the field
/// meant before recipes followed the mode). The log's meta line lists every recipe field.
pub fn recipe_note(eff: &EffectiveConfig) -> Option<String> {
    let defaults = Recipe {
        alpha: vec![1.0; eff.cfg.model.mix_mode.to_vec().len()],
        loss: HeadLoss::CeNone,
        min_lr: 0.0,
    };
    if eff
        .from_recipe
        .iter()
        .all(|(k, v)| same_value(v, &defaults.value(k)))
    {
        return None;
    }
    let modes = eff.cfg.model.mix_mode.to_vec().join("+");
    let fields: Vec<String> = eff
        .from_recipe
        .iter()
        .map(|(k, v)| format!("{k} {}", v.as_str().map_or(v.to_string(), String::from)))
        .collect();
    Some(format!(
        "recipe: {} from the CIFAR-10 recipe of {modes}",
        fields.join(", ")
    ))
}
