//! `gen-configs`: one JSON config per (backbone, mode, α, epochs) and launch scripts,
//! laid out as upstream's `auto_train_mixups.py` does (spec §6.1):
//! `{out}/{bb}/mix_mode{mode}/{bb}_mixups_{loss}_alpha{α}_ep{E}.json`, dots in values
//! written as `_`. Output is a pure function of the options (no timestamps), so a
//! rerun is byte-identical.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_config::{HeadLoss, OneOrMany, RunConfig};

use crate::methods::{loss_name, method, py_number, Backbone, METHODS};

/// The upstream generator's epoch list (`runner.max_epochs: [400, 800, 1200]`, spec §6.1);
/// the README's 200-epoch column has to be asked for explicitly, as upstream.
pub const DEFAULT_EPOCHS: [usize; 3] = [400, 800, 1200];

/// `lr_config.min_lr` of AutoMix/SAMix (spec §3.2).
pub const AUTOMIX_MIN_LR: f64 = 0.05;

/// Default `model.attention_weights` for AttentiveMix+ (the frozen ImageNet ResNet-18);
/// the file itself is not part of the repository.
pub const DEFAULT_ATTENTION_WEIGHTS: &str = "weights/resnet18_imagenet.safetensors";

/// Launch scripts written next to each backbone's configs.
pub const SCRIPT_NAMES: [&str; 3] = ["train_1gpu.sh", "train_multi_gpu.sh", "train_slurm.sh"];

/// Where `gen-configs` writes without `--out`: a directory of its own, never the
/// committed `configs/cifar10` tree.
pub const DEFAULT_OUT: &str = "configs/generated";

/// The file at the root of every tree `gen-configs` writes: the command and the list of
/// files it wrote. A tree holding it is owned by the generator (rewritten and pruned on
/// regeneration); a non-empty directory without it is never written into.
pub const MANIFEST_NAME: &str = "gen-configs.manifest";

/// An `--alpha` entry: a value for every mode, or (`mode=value`) for one mode.
#[derive(Debug, Clone, PartialEq)]
pub struct AlphaOverride {
    /// The mode it applies to; `None` = every mode that uses α.
    pub mode: Option<String>,
    /// The α value.
    pub value: f64,
}

impl AlphaOverride {
    /// Parses `0.2` or `mixup=0.5`.
    pub fn parse(s: &str) -> Result<Self> {
        let (mode, v) = match s.split_once('=') {
            Some((m, v)) => (Some(m.trim().to_string()), v),
            None => (None, s),
        };
        let value: f64 = v
            .trim()
            .parse()
            .with_context(|| format!("--alpha: `{s}` is not a number or mode=number"))?;
        if !(value.is_finite() && value > 0.0) {
            bail!("--alpha: `{s}`: α must be > 0");
        }
        if let Some(m) = &mode {
            if method(m).is_none() {
                bail!("--alpha: `{s}`: unknown mode `{m}`");
            }
        }
        Ok(Self { mode, value })
    }

    fn flag(&self) -> String {
        match &self.mode {
            Some(m) => format!("{m}={}", py_number(self.value)),
            None => py_number(self.value),
        }
    }
}

/// Everything `gen-configs` varies.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    /// `max_epochs` values, one config each.
    pub epochs: Vec<usize>,
    /// Backbones, one directory each.
    pub backbones: Vec<Backbone>,
    /// Mode items; an item with several modes is one multi-mode config.
    pub modes: Vec<Vec<String>>,
    /// α overrides; empty = the table's α.
    pub alphas: Vec<AlphaOverride>,
    /// Loss for every `MixUpClassification` config; `None` = the table's (CE_soft for PuzzleMix).
    pub loss: Option<HeadLoss>,
    /// `mix_prob` of multi-mode configs; `None` = uniform.
    pub mix_prob: Option<Vec<f64>>,
    /// `data.dir`; `None` = the schema default.
    pub data_dir: Option<String>,
    /// `model.attention_weights` of AttentiveMix+ configs.
    pub attention_weights: String,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            epochs: DEFAULT_EPOCHS.to_vec(),
            backbones: vec![Backbone::R18],
            modes: METHODS.iter().map(|m| vec![m.mode.to_string()]).collect(),
            alphas: Vec::new(),
            loss: None,
            mix_prob: None,
            data_dir: None,
            attention_weights: DEFAULT_ATTENTION_WEIGHTS.into(),
        }
    }
}

/// Parses a `--modes` item: `mixup` or `mixup+cutmix` (one multi-mode config).
pub fn parse_mode_item(s: &str) -> Result<Vec<String>> {
    let modes: Vec<String> = s.split('+').map(|m| m.trim().to_string()).collect();
    for m in &modes {
        if method(m).is_none() {
            let known: Vec<_> = METHODS.iter().map(|m| m.mode).collect();
            bail!("--modes: unknown mode `{m}` (known: {})", known.join(", "));
        }
    }
    Ok(modes)
}

/// One generated file, path relative to the output directory.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedFile {
    /// Path below `--out`.
    pub path: PathBuf,
    /// Exact contents.
    pub contents: String,
}

/// One config before it is written.
struct Entry {
    /// `mix_mode…/{stem}.json`, relative to the backbone directory.
    rel: String,
    config: RunConfig,
}

fn join_numbers(v: &[f64]) -> String {
    v.iter()
        .map(|a| py_number(*a))
        .collect::<Vec<_>>()
        .join("-")
}

/// The α values to sweep for one mode on one backbone.
fn alphas_for(opts: &GenOptions, mode: &str, backbone: Backbone) -> Vec<f64> {
    let m = method(mode).expect("modes are checked when parsed");
    let own: Vec<f64> = opts
        .alphas
        .iter()
        .filter(|a| a.mode.as_deref() == Some(mode))
        .map(|a| a.value)
        .collect();
    let global: Vec<f64> = opts
        .alphas
        .iter()
        .filter(|a| a.mode.is_none())
        .map(|a| a.value)
        .collect();
    let picked = if !own.is_empty() {
        own
    } else if !global.is_empty() && !m.alpha_unused {
        global
    } else {
        vec![m.alpha(backbone)]
    };
    let mut out: Vec<f64> = Vec::new();
    for a in picked {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

fn cartesian(lists: &[Vec<f64>]) -> Vec<Vec<f64>> {
    lists.iter().fold(vec![Vec::new()], |acc, list| {
        acc.iter()
            .flat_map(|prefix| {
                list.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push(*v);
                    p
                })
            })
            .collect()
    })
}

fn check(opts: &GenOptions) -> Result<()> {
    if opts.epochs.is_empty() || opts.epochs.contains(&0) {
        bail!("--epochs: give one or more positive epoch counts");
    }
    if opts.backbones.is_empty() {
        bail!("--backbone: give r18 and/or rx50");
    }
    if opts.modes.is_empty() {
        bail!("--modes: give at least one mode");
    }
    for item in &opts.modes {
        if item.len() > 1 {
            if let Some(m) = item.iter().find(|m| method(m).is_some_and(|m| m.learned)) {
                bail!("--modes: `{m}` trains its own MixBlock and cannot be part of a multi-mode item `{}`", item.join("+"));
            }
            let unique: BTreeSet<_> = item.iter().collect();
            if unique.len() != item.len() {
                bail!("--modes: `{}` names a mode twice", item.join("+"));
            }
        }
    }
    if opts.loss == Some(HeadLoss::CeNone) {
        if let Some(item) = opts
            .modes
            .iter()
            .find(|i| i.iter().any(|m| m == "puzzlemix"))
        {
            bail!(
                "--loss CE_none: `{}` includes puzzlemix, whose per-sample λ needs CE_soft or CE_sigm (spec §3.4)",
                item.join("+")
            );
        }
    }
    if let Some(p) = &opts.mix_prob {
        let multi: Vec<_> = opts.modes.iter().filter(|i| i.len() > 1).collect();
        if multi.is_empty() {
            bail!("--mix-prob: applies only to multi-mode items (e.g. --modes mixup+cutmix)");
        }
        for item in multi {
            if item.len() != p.len() {
                bail!(
                    "--mix-prob: {} value(s) given for the {} modes of `{}`",
                    p.len(),
                    item.len(),
                    item.join("+")
                );
            }
        }
    }
    for a in &opts.alphas {
        if let Some(m) = &a.mode {
            if !opts.modes.iter().any(|item| item.contains(m)) {
                bail!(
                    "--alpha: `{}` names a mode that --modes does not select",
                    a.flag()
                );
            }
        }
    }
    Ok(())
}

fn entries(opts: &GenOptions, backbone: Backbone) -> Result<Vec<Entry>> {
    let bb = backbone.tag();
    let mut out = Vec::new();
    let mut seen_items = BTreeSet::new();
    for item in &opts.modes {
        if !seen_items.insert(item.clone()) {
            continue;
        }
        let multi = item.len() > 1;
        let first = method(&item[0]).expect("checked");
        let learned = first.learned;
        let loss = opts.loss.unwrap_or(
            if item
                .iter()
                .any(|m| method(m).is_some_and(|m| m.loss == HeadLoss::CeSoft))
            {
                HeadLoss::CeSoft
            } else {
                HeadLoss::CeNone
            },
        );
        let modes_joined = item.join("_");
        let dir = format!("mix_mode{modes_joined}");
        let prefix = if learned {
            format!("{bb}_{}", first.mode)
        } else if multi {
            format!("{bb}_mixups_{}_multi_mode", loss_name(loss))
        } else {
            format!("{bb}_mixups_{}", loss_name(loss))
        };
        let name_prefix = if learned {
            format!("{bb}_{}", first.mode)
        } else {
            format!("{bb}_{modes_joined}_{}", loss_name(loss))
        };
        let per_mode: Vec<Vec<f64>> = item.iter().map(|m| alphas_for(opts, m, backbone)).collect();
        let prob_suffix = match (&opts.mix_prob, multi) {
            (Some(p), true) => format!("_mix_prob{}", join_numbers(p)),
            _ => String::new(),
        };
        for alphas in cartesian(&per_mode) {
            let mut seen_epochs = BTreeSet::new();
            for &epochs in &opts.epochs {
                if !seen_epochs.insert(epochs) {
                    continue;
                }
                let suffix = format!("_alpha{}{prob_suffix}_ep{epochs}", join_numbers(&alphas))
                    .replace('.', "_");
                let stem = format!("{prefix}{suffix}");
                let mut cfg = RunConfig {
                    name: format!("{name_prefix}{suffix}"),
                    max_epochs: epochs,
                    work_dir: Some(format!("work_dirs/cifar10/{bb}/{dir}/{stem}")),
                    ..RunConfig::default()
                };
                if multi {
                    cfg.model.mix_mode = OneOrMany::Many(item.clone());
                    cfg.model.alpha = Some(OneOrMany::Many(alphas.clone()));
                    cfg.model.mix_prob = opts.mix_prob.clone();
                } else {
                    cfg.model.mix_mode = OneOrMany::One(item[0].clone());
                    cfg.model.alpha = Some(OneOrMany::One(alphas[0]));
                }
                cfg.model.backbone.arch = backbone.arch();
                if learned {
                    cfg.lr_config.min_lr = AUTOMIX_MIN_LR;
                } else {
                    cfg.model.head.loss = loss;
                }
                if item.iter().any(|m| m == "attentivemix") {
                    cfg.model.attention_weights = Some(opts.attention_weights.clone());
                }
                if let Some(d) = &opts.data_dir {
                    cfg.data.dir = d.clone();
                }
                cfg.validate()
                    .map_err(|e| anyhow::anyhow!("generated config {bb}/{dir}/{stem}.json: {e}"))?;
                out.push(Entry {
                    rel: format!("{dir}/{stem}.json"),
                    config: cfg,
                });
            }
        }
    }
    Ok(out)
}

/// The flags that reproduce these backbones' files (recorded in script headers and the
/// manifest), without `--out`.
fn command_line(opts: &GenOptions, backbones: &[Backbone]) -> String {
    let tags: Vec<&str> = backbones.iter().map(|b| b.tag()).collect();
    let mut s = format!("cargo xtask gen-configs --backbone {}", tags.join(","));
    let epochs: Vec<String> = opts.epochs.iter().map(|e| e.to_string()).collect();
    let _ = write!(s, " --epochs {}", epochs.join(","));
    let default_modes = GenOptions::default().modes;
    if opts.modes != default_modes {
        let items: Vec<String> = opts.modes.iter().map(|i| i.join("+")).collect();
        let _ = write!(s, " --modes {}", items.join(","));
    }
    if !opts.alphas.is_empty() {
        let a: Vec<String> = opts.alphas.iter().map(|a| a.flag()).collect();
        let _ = write!(s, " --alpha {}", a.join(","));
    }
    if let Some(l) = opts.loss {
        let _ = write!(s, " --loss {}", loss_name(l));
    }
    if let Some(p) = &opts.mix_prob {
        let p: Vec<String> = p.iter().map(|v| py_number(*v)).collect();
        let _ = write!(s, " --mix-prob {}", p.join(","));
    }
    if let Some(d) = &opts.data_dir {
        let _ = write!(s, " --data-dir {d}");
    }
    if opts.attention_weights != DEFAULT_ATTENTION_WEIGHTS {
        let _ = write!(s, " --attention-weights {}", opts.attention_weights);
    }
    s
}

fn config_array(entries: &[Entry]) -> String {
    let mut s = String::from("CONFIGS=(\n");
    for e in entries {
        let _ = writeln!(s, "  {}", e.rel);
    }
    s.push_str(")\n");
    s
}

const RUNNER_DOC: &str =
    "#   RUNNER    runner binary (default: target/release/runner, relative to the working\n\
#             directory; build it with `cargo build --release -p runner --features cuda`)\n";

const DEVICE_DOC: &str =
    "# Device: every run gets `--device cuda:0` (the GPU that CUDA_VISIBLE_DEVICES selects)\n\
# unless the extra arguments name one (`--device cpu`, `--device=cuda:1`), which is then\n\
# passed instead (the runner takes a single --device).\n";

/// Sets `DEVICE_ARGS` to `--device cuda:0`, or to nothing when the script's arguments
/// name a device (they reach the runner after it, and the runner refuses two).
const DEVICE_ARGS: &str = r#"DEVICE_ARGS=(--device cuda:0)
for arg in "$@"; do
  case "$arg" in
    --device | --device=*) DEVICE_ARGS=() ;;
  esac
done
"#;

/// `"${DEVICE_ARGS[@]}"`, written so that an empty array is no error under `set -u`
/// (bash before 4.4).
const DEVICE_EXPANSION: &str = "${DEVICE_ARGS[@]+\"${DEVICE_ARGS[@]}\"}";

const RESUME_DOC: &str =
    "# Every run is started with `--resume auto`: a run whose work dir holds a checkpoint\n\
# continues from it, a finished run (result.json) is skipped, any other starts fresh, so\n\
# re-running this script after an interruption completes a half-finished sweep.\n";

fn script_1gpu(cmd: &str, bb: &str, entries: &[Entry]) -> String {
    format!(
        r#"#!/usr/bin/env bash
# mixbench: trains the {n} configs below one after another on one GPU.
# Generated by `{cmd}`; regenerate instead of editing.
#
# Usage, from the repository root (runs write to work_dirs/, data is read from data.dir):
#   bash configs/cifar10/{bb}/train_1gpu.sh [runner args...]   (wherever --out put it)
# Extra arguments go to every run, e.g. --data /path/to/cifar10.
{RESUME_DOC}{DEVICE_DOC}# Environment:
{RUNNER_DOC}#   CUDA_VISIBLE_DEVICES  GPU to train on (default: 0); the runner sees it as cuda:0
# A failed run is reported and the next one starts; the exit status says whether any failed.
set -uo pipefail
RUNNER="${{RUNNER:-target/release/runner}}"
export CUDA_VISIBLE_DEVICES="${{CUDA_VISIBLE_DEVICES:-0}}"
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
{DEVICE_ARGS}{configs}
failed=0
for cfg in "${{CONFIGS[@]}}"; do
  echo "[$(date '+%F %T')] GPU $CUDA_VISIBLE_DEVICES: $cfg"
  if ! "$RUNNER" --config "$HERE/$cfg" {DEVICE_EXPANSION} --resume auto "$@"; then
    echo "FAILED: $cfg" >&2
    failed=$((failed + 1))
  fi
done
echo "$((${{#CONFIGS[@]}} - failed)) of ${{#CONFIGS[@]}} runs succeeded"
[ "$failed" -eq 0 ]
"#,
        n = entries.len(),
        configs = config_array(entries),
    )
}

fn script_multi_gpu(cmd: &str, bb: &str, entries: &[Entry]) -> String {
    format!(
        r#"#!/usr/bin/env bash
# mixbench: trains the {n} configs below on several GPUs of one machine, one run per GPU
# at a time. The GPUs share one queue: each takes the next unclaimed config when its run
# ends, so long and short runs balance out.
# Generated by `{cmd}`; regenerate instead of editing.
#
# Usage, from the repository root (runs write to work_dirs/, data is read from data.dir):
#   GPUS=0,1,2,3 bash configs/cifar10/{bb}/train_multi_gpu.sh [runner args...]   (wherever --out put it)
# Extra arguments go to every run, e.g. --data /path/to/cifar10.
{RESUME_DOC}{DEVICE_DOC}# Environment:
{RUNNER_DOC}#   GPUS      comma-separated GPU indices (default: every GPU `nvidia-smi` lists)
# The exit status says whether any run failed.
set -uo pipefail
RUNNER="${{RUNNER:-target/release/runner}}"
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
if [ -z "${{GPUS:-}}" ]; then
  GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
fi
IFS=',' read -r -a GPU_IDS <<< "$GPUS"
{DEVICE_ARGS}{configs}
QUEUE="$(mktemp -d)"
trap 'rm -rf "$QUEUE"' EXIT
trap 'trap - INT TERM; kill 0' INT TERM

# Runs configs on one GPU until none is left; `mkdir` claims a config atomically.
worker() {{
  local gpu="$1" i failed=0
  shift
  for i in "${{!CONFIGS[@]}}"; do
    mkdir "$QUEUE/$i" 2>/dev/null || continue
    echo "[$(date '+%F %T')] GPU $gpu: ${{CONFIGS[$i]}}"
    if ! CUDA_VISIBLE_DEVICES="$gpu" "$RUNNER" --config "$HERE/${{CONFIGS[$i]}}" {DEVICE_EXPANSION} --resume auto "$@"; then
      echo "FAILED on GPU $gpu: ${{CONFIGS[$i]}}" >&2
      failed=1
    fi
  done
  return "$failed"
}}

pids=()
for gpu in "${{GPU_IDS[@]}}"; do
  worker "$gpu" "$@" &
  pids+=("$!")
done
status=0
for pid in "${{pids[@]}}"; do
  wait "$pid" || status=1
done
exit "$status"
"#,
        n = entries.len(),
        configs = config_array(entries),
    )
}

fn script_slurm(cmd: &str, bb: &str, entries: &[Entry]) -> String {
    format!(
        r#"#!/usr/bin/env bash
#SBATCH --job-name=mixbench-{bb}
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=5
#SBATCH --output=slurm-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
# mixbench: a Slurm array job with one task per config ({n} configs), each task training
# one config on one GPU with srun.
# Generated by `{cmd}`; regenerate instead of editing.
#
# Usage, from the repository root (the job's working directory; runs write to work_dirs/):
#   bash configs/cifar10/{bb}/train_slurm.sh [runner args...]   (wherever --out put it)
# The script submits itself with `sbatch --array=0-{last}`; extra arguments go to every run,
# e.g. --data /path/to/cifar10.
{RESUME_DOC}# Preemption and time limits: a task is requeued when preempted (--requeue), and 120 s
# before its time limit Slurm sends SIGTERM to this script (--signal=B:TERM@120), which
# forwards it to the runner; the runner writes a checkpoint and exits, and the requeued
# task (or the next submission) resumes from it.
{DEVICE_DOC}# Environment:
{RUNNER_DOC}#             (it must be reachable from the compute nodes)
#   PARTITION     Slurm partition (default: the cluster's default)
#   MAX_PARALLEL  at most this many tasks at once (default: no limit)
#   SBATCH_EXTRA  more sbatch options, e.g. "--time=72:00:00 --account=X"
#   SRUN_EXTRA    more srun options
set -euo pipefail
{configs}
if [ -z "${{SLURM_ARRAY_TASK_ID:-}}" ]; then
  HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
  ARRAY="0-$((${{#CONFIGS[@]}} - 1))${{MAX_PARALLEL:+%$MAX_PARALLEL}}"
  # shellcheck disable=SC2086
  exec sbatch ${{PARTITION:+--partition="$PARTITION"}} --array="$ARRAY" \
    --export="ALL,MIXBENCH_CONFIG_DIR=$HERE" ${{SBATCH_EXTRA:-}} \
    "$HERE/$(basename "${{BASH_SOURCE[0]}}")" "$@"
fi
: "${{MIXBENCH_CONFIG_DIR:?submit with bash (not sbatch) so the task knows the config directory}}"
RUNNER="${{RUNNER:-target/release/runner}}"
cfg="${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}"
{DEVICE_ARGS}echo "[$(date '+%F %T')] task $SLURM_ARRAY_TASK_ID on $(hostname): $cfg"
# The runner runs in the background so that this shell can take SIGTERM and pass it on.
child=""
on_term() {{
  echo "[$(date '+%F %T')] SIGTERM: asking the runner to checkpoint and stop"
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null || true
}}
trap on_term TERM
# shellcheck disable=SC2086
srun ${{SRUN_EXTRA:-}} "$RUNNER" --config "$MIXBENCH_CONFIG_DIR/$cfg" {DEVICE_EXPANSION} \
  --resume auto "$@" &
child=$!
status=0
wait "$child" || status=$?
# A trapped signal interrupts `wait`; wait on until the runner has saved and exited.
while kill -0 "$child" 2>/dev/null; do
  status=0
  wait "$child" || status=$?
done
exit "$status"
"#,
        n = entries.len(),
        last = entries.len().saturating_sub(1),
        configs = config_array(entries),
    )
}

/// Every file `gen-configs` writes, in a fixed order: per backbone its configs, then
/// its three launch scripts; last the manifest ([`MANIFEST_NAME`]) listing the others.
pub fn generate(opts: &GenOptions) -> Result<Vec<GeneratedFile>> {
    check(opts)?;
    let mut files = Vec::new();
    let mut seen = BTreeSet::new();
    let backbones: Vec<Backbone> = opts
        .backbones
        .iter()
        .copied()
        .filter(|b| seen.insert(*b))
        .collect();
    for &backbone in &backbones {
        let bb = backbone.tag();
        let entries = entries(opts, backbone)?;
        for e in &entries {
            files.push(GeneratedFile {
                path: Path::new(bb).join(&e.rel),
                contents: e.config.to_json_pretty(),
            });
        }
        let cmd = command_line(opts, &[backbone]);
        let scripts = [
            script_1gpu(&cmd, bb, &entries),
            script_multi_gpu(&cmd, bb, &entries),
            script_slurm(&cmd, bb, &entries),
        ];
        for (name, contents) in SCRIPT_NAMES.iter().zip(scripts) {
            files.push(GeneratedFile {
                path: Path::new(bb).join(name),
                contents,
            });
        }
    }
    let mut manifest = format!(
        "# Written by `cargo xtask gen-configs`: the files below, relative to this directory.\n\
         # Regenerate with `{} --out <this directory>`, which rewrites\n\
         # them and deletes the ones it no longer generates; do not edit by hand.\n",
        command_line(opts, &backbones)
    );
    for f in &files {
        let _ = writeln!(manifest, "{}", f.path.display());
    }
    files.push(GeneratedFile {
        path: PathBuf::from(MANIFEST_NAME),
        contents: manifest,
    });
    Ok(files)
}

/// The files a manifest lists. Entries that are not plain relative paths below the
/// tree (absolute, `..`) are an error: pruning must never reach outside it.
pub fn read_manifest(path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let p = PathBuf::from(l.trim());
            if !p
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                bail!(
                    "{}:{}: `{l}` is not a path inside the tree",
                    path.display(),
                    i + 1
                );
            }
            Ok(p)
        })
        .collect()
}

/// The warning for AttentiveMix+ configs that name attention weights missing below
/// `base` (the directory runs start from); `None` when no AttentiveMix+ config is
/// generated or the file exists.
pub fn missing_attention_weights(opts: &GenOptions, base: &Path) -> Option<String> {
    let attentive = opts
        .modes
        .iter()
        .any(|item| item.iter().any(|m| m == "attentivemix"));
    let path = Path::new(&opts.attention_weights);
    let full = base.join(path);
    (attentive && !full.is_file()).then(|| {
        format!(
            "warning: the AttentiveMix+ configs name attention weights `{}` \
             (model.attention_weights), which do not exist below {}, where runs start; the \
             runner cannot start those configs until the file is there (or regenerate with \
             --attention-weights FILE)",
            opts.attention_weights,
            base.display()
        )
    })
}

/// What [`write()`] did besides writing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteReport {
    /// Files of the previous generation that this one no longer writes, deleted
    /// (paths below `out`).
    pub pruned: Vec<PathBuf>,
}

/// Writes the files below `out` (scripts executable). `out` must be missing, empty, or
/// a tree this generator wrote (it holds [`MANIFEST_NAME`]): a non-empty directory
/// without a manifest is refused, so a hand-made or committed tree is never
/// overwritten by accident. In an owned tree, the files the old manifest lists and
/// `files` lacks are deleted (and directories left empty by that), so no stale config
/// survives a regeneration; files the manifest does not list are never touched.
pub fn write(out: &Path, files: &[GeneratedFile]) -> Result<WriteReport> {
    let manifest = out.join(MANIFEST_NAME);
    let mut old: Vec<PathBuf> = Vec::new();
    if out.exists() {
        if !out.is_dir() {
            bail!("{}: exists and is not a directory", out.display());
        }
        if manifest.is_file() {
            old = read_manifest(&manifest)?;
        } else {
            let non_empty = std::fs::read_dir(out)
                .with_context(|| format!("{}: cannot list", out.display()))?
                .next()
                .is_some();
            if non_empty {
                bail!(
                    "{} is not empty and was not written by gen-configs (it has no {MANIFEST_NAME}); \
                     refusing to write into it. Pass another --out (default {DEFAULT_OUT}), or \
                     delete the directory to regenerate it",
                    out.display()
                );
            }
        }
    }
    for f in files {
        let path = out.join(&f.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        }
        std::fs::write(&path, &f.contents)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        #[cfg(unix)]
        if path.extension().is_some_and(|e| e == "sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("{}: cannot make executable", path.display()))?;
        }
    }
    let new: BTreeSet<&Path> = files.iter().map(|f| f.path.as_path()).collect();
    let mut report = WriteReport::default();
    for rel in old {
        if new.contains(rel.as_path()) {
            continue;
        }
        let path = out.join(&rel);
        match std::fs::remove_file(&path) {
            Ok(()) => report.pruned.push(rel.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot delete", path.display())),
        }
        // Remove the directories this left empty, up to (not including) `out`.
        let mut dir = rel.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if std::fs::remove_dir(out.join(d)).is_err() {
                break; // not empty (or already gone)
            }
            dir = d.parent();
        }
    }
    Ok(report)
}

/// Differences between `files` and what lies below `out`: missing or different
/// files, and files in the generated backbone directories that `files` lacks.
pub fn diff_tree(out: &Path, files: &[GeneratedFile]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut expected = BTreeSet::new();
    for f in files {
        let path = out.join(&f.path);
        expected.insert(path.clone());
        match std::fs::read(&path) {
            Ok(bytes) if bytes == f.contents.as_bytes() => {}
            Ok(_) => problems.push(format!("{}: differs", path.display())),
            Err(_) => problems.push(format!("{}: missing", path.display())),
        }
    }
    let roots: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|f| f.path.components().next())
        .map(|c| out.join(c))
        .collect();
    let mut stack: Vec<PathBuf> = roots.into_iter().collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e
                .with_context(|| format!("{}: cannot list", dir.display()))?
                .path();
            if p.is_dir() {
                stack.push(p);
            } else if !expected.contains(&p) {
                problems.push(format!("{}: not generated by these flags", p.display()));
            }
        }
    }
    problems.sort();
    Ok(problems)
}
