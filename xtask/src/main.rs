//! `cargo xtask`: generate benchmark configs and launch scripts, and report results.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use xtask::gen::{self, AlphaOverride, GenOptions, DEFAULT_ATTENTION_WEIGHTS};
use xtask::methods::{parse_loss, Backbone};
use xtask::report;

/// Workspace tasks of the CIFAR-10 mixup benchmark.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write one JSON config per (backbone, mode, α, epochs) plus launch scripts
    /// (1 GPU, N GPUs, Slurm), laid out like upstream's auto_train_mixups.py.
    GenConfigs(GenArgs),
    /// Read run logs and write the benchmark table (Markdown + CSV) and SVG plots.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
struct GenArgs {
    /// Epoch counts, one config each (upstream's default list; add 200 for the README's first column).
    #[arg(long, value_delimiter = ',', default_value = "400,800,1200")]
    epochs: Vec<usize>,
    /// Backbones: r18 and/or rx50.
    #[arg(long, value_delimiter = ',', default_value = "r18")]
    backbone: Vec<String>,
    /// Modes, one config each; `a+b` is one multi-mode config. Default: the 13 rows of the table.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// α values: `0.2,1` sweeps every mode that uses α; `mixup=0.5` sets one mode. Default: the table's α.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    alpha: Vec<String>,
    /// Loss of every MixUpClassification config: CE_none, CE_soft or CE_sigm.
    /// Default: the table's (CE_soft for PuzzleMix, CE_none otherwise).
    #[arg(long)]
    loss: Option<String>,
    /// Mode probabilities of the multi-mode configs (default: uniform).
    #[arg(long, value_delimiter = ',')]
    mix_prob: Option<Vec<f64>>,
    /// `data.dir` of every config (default: the schema's `data/cifar10`).
    #[arg(long)]
    data_dir: Option<String>,
    /// `model.attention_weights` of AttentiveMix+ configs (the frozen ImageNet ResNet-18).
    #[arg(long, default_value = DEFAULT_ATTENTION_WEIGHTS)]
    attention_weights: String,
    /// Output directory; configs go to `<out>/<backbone>/mix_mode<mode>/`. It must be new,
    /// empty, or a tree gen-configs wrote (it holds gen-configs.manifest), which is then
    /// regenerated: files it no longer generates are deleted. The committed tree is
    /// `--out configs/cifar10 --backbone r18,rx50`.
    #[arg(long, default_value = gen::DEFAULT_OUT)]
    out: PathBuf,
    /// Write nothing; fail if the files under --out differ from what these flags generate.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// Work directories (searched recursively for `*.log.json` / `*.jsonl`) or log files.
    #[arg(required = true)]
    work_dirs: Vec<PathBuf>,
    /// Output directory for benchmark.md, benchmark.csv and plots/.
    #[arg(long, default_value = "work_dirs/report")]
    out: PathBuf,
    /// Put the published numbers (xtask/src/published.csv) and our difference beside ours.
    #[arg(long)]
    compare_published: bool,
    /// Show runs that are not the benchmark recipe (smaller backbone, data subset, other
    /// batch size or optimizer, epochs unlike their name, unfinished) in rows marked †k,
    /// instead of leaving them out.
    #[arg(long)]
    include_nonrecipe: bool,
    /// Skip the plots.
    #[arg(long)]
    no_plots: bool,
    /// Exit with status 2 when any run failed (diverged, ended without a result, records
    /// that disagree or cannot be read), after writing everything. Without it, failed runs
    /// are listed in the report and on stderr and the exit status is 0.
    #[arg(long)]
    strict: bool,
}

/// The exit status of `report --strict` when some run failed (1 is an error: no report).
const EXIT_FAILED_RUNS: u8 = 2;

fn gen_options(a: &GenArgs) -> Result<GenOptions> {
    let mut opts = GenOptions {
        epochs: a.epochs.clone(),
        backbones: a
            .backbone
            .iter()
            .map(|b| Backbone::parse(b))
            .collect::<Result<_>>()?,
        alphas: a
            .alpha
            .iter()
            .map(|s| AlphaOverride::parse(s))
            .collect::<Result<_>>()?,
        loss: a
            .loss
            .as_deref()
            .map(parse_loss)
            .transpose()
            .context("--loss")?,
        mix_prob: a.mix_prob.clone(),
        data_dir: a.data_dir.clone(),
        attention_weights: a.attention_weights.clone(),
        ..GenOptions::default()
    };
    if !a.modes.is_empty() {
        opts.modes = a
            .modes
            .iter()
            .map(|m| gen::parse_mode_item(m))
            .collect::<Result<_>>()?;
    }
    Ok(opts)
}

fn gen_configs(a: &GenArgs) -> Result<()> {
    let opts = gen_options(a)?;
    let files = gen::generate(&opts)?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    if let Some(w) = gen::missing_attention_weights(&opts, &cwd) {
        eprintln!("{w}");
    }
    if a.check {
        let problems = gen::diff_tree(&a.out, &files)?;
        if !problems.is_empty() {
            bail!(
                "{} is not what these flags generate:\n  {}",
                a.out.display(),
                problems.join("\n  ")
            );
        }
        println!("{}: {} files up to date", a.out.display(), files.len());
        return Ok(());
    }
    let written = gen::write(&a.out, &files)?;
    let configs = files
        .iter()
        .filter(|f| f.path.extension().is_some_and(|e| e == "json"))
        .count();
    let scripts = files
        .iter()
        .filter(|f| f.path.extension().is_some_and(|e| e == "sh"))
        .count();
    println!(
        "wrote {configs} configs, {scripts} scripts and {} under {}",
        gen::MANIFEST_NAME,
        a.out.display()
    );
    if !written.pruned.is_empty() {
        println!(
            "deleted {} file(s) of the previous generation that these flags no longer write",
            written.pruned.len()
        );
    }
    Ok(())
}

/// Writes the report; returns how many runs failed.
fn report_cmd(a: &ReportArgs) -> Result<usize> {
    let runs = report::load_runs(&a.work_dirs)?;
    if runs.is_empty() {
        bail!("no run logs (*.log.json, *.jsonl) found under the given paths");
    }
    let opts = report::TableOptions {
        compare_published: a.compare_published,
        include_nonrecipe: a.include_nonrecipe,
    };
    let t = report::tables(&runs, &opts)?;
    for w in &t.warnings {
        eprintln!("note: {w}");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let md = a.out.join("benchmark.md");
    let csv = a.out.join("benchmark.csv");
    std::fs::write(&md, &t.markdown).with_context(|| format!("{}: cannot write", md.display()))?;
    std::fs::write(&csv, &t.csv).with_context(|| format!("{}: cannot write", csv.display()))?;
    print!("{}", t.markdown);
    eprintln!("wrote {} and {}", md.display(), csv.display());
    if !a.no_plots {
        let (plots, problems) =
            report::write_plots(&runs, a.include_nonrecipe, &a.out.join("plots"))?;
        for p in &problems {
            eprintln!("warning: {p}");
        }
        eprintln!(
            "wrote {} plots under {}",
            plots.len(),
            a.out.join("plots").display()
        );
    }
    if t.failed_runs > 0 {
        eprintln!(
            "{} run(s) failed; see \"Failed runs\" in {}",
            t.failed_runs,
            md.display()
        );
    }
    Ok(t.failed_runs)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::GenConfigs(a) => gen_configs(a).map(|()| ExitCode::SUCCESS),
        Command::Report(a) => report_cmd(a).map(|failed| {
            if a.strict && failed > 0 {
                ExitCode::from(EXIT_FAILED_RUNS)
            } else {
                ExitCode::SUCCESS
            }
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
