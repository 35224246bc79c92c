//! `runner`: trains, checks, previews and benchmarks mixup methods on CIFAR-10
//! from a plain JSON config (see `docs/config.md`).

mod automix_step;
mod bench;
mod build_info;
mod canvas;
mod config;
mod device;
mod eval;
mod export;
mod list;
mod mixmodel;
mod net_step;
mod output;
mod preview;
mod session;
mod setup;
mod signals;
mod workdir;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// The version line: says whether this binary can use a GPU.
#[cfg(feature = "cudnn")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CUDA + cuDNN)");
#[cfg(all(feature = "cuda", not(feature = "cudnn")))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CUDA, without cuDNN)");
#[cfg(not(feature = "cuda"))]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (CPU only; build with --features cuda,cudnn for NVIDIA GPUs)"
);

/// Train and evaluate mixup methods on CIFAR-10 (OpenMixup's benchmark, on candle).
#[derive(Debug, Parser)]
#[command(name = "runner", version = VERSION, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
    /// Threads of the CPU kernels (default: every core, or RAYON_NUM_THREADS); the log records
    /// the pool's actual size.
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train (the default when no subcommand is given).
    Train(TrainArgs),
    /// Write a PNG grid of one mixed batch per method: originals, partners, masks, mixed images, λ.
    Preview(preview::PreviewArgs),
    /// Measure train-step, mixing and data-loading throughput; prints JSON.
    Bench(bench::BenchArgs),
    /// Print the JSON Schema of the config (for editor completion and checking).
    Schema,
    /// Evaluate a checkpoint: top-1/5, NLL, ECE, FGSM and CIFAR-10-C corruptions; prints JSON.
    Eval(eval::EvalArgs),
    /// Write a checkpoint's backbone as a PyTorch-named safetensors file.
    Export(export::ExportArgs),
    /// List the methods with their CIFAR-10 recipe and the backbones with their parameters.
    List(list::ListArgs),
}

/// Options shared by training and config checking.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The run's JSON config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Continue the run in the work dir from its latest checkpoint. `--resume auto`
    /// (for sweeps): resume if there is a checkpoint, start fresh if there is none,
    /// do nothing if the run has finished.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "latest", value_name = "MODE")]
    pub resume: Option<workdir::ResumeMode>,
    /// Resume even though the config differs from the checkpoint's in fields that
    /// change results (the differences are recorded in the log).
    #[arg(long)]
    pub allow_config_change: bool,
    /// Continue from this checkpoint file.
    #[arg(long, value_name = "CHECKPOINT")]
    pub resume_from: Option<PathBuf>,
    /// Only parse and validate the config (and build the model), then exit.
    #[arg(long)]
    pub check_config: bool,
    /// Print the effective config (defaults, the method's recipe, `--set` and flags applied)
    /// as JSON, then exit.
    #[arg(long)]
    pub print_config: bool,
    /// Override `max_epochs`.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override `data.limit_train` (use the first N training images).
    #[arg(long, value_name = "N")]
    pub limit_train: Option<usize>,
    /// Override `data.limit_test` (use the first N test images).
    #[arg(long, value_name = "N")]
    pub limit_test: Option<usize>,
    /// Override `data.batch_size`.
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Override `data.dir`.
    #[arg(long, value_name = "DIR")]
    pub data: Option<String>,
    /// Download the official CIFAR-10 archive into the data dir if it is missing.
    #[arg(long)]
    pub download: bool,
    /// Override `work_dir`.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<String>,
    /// Override `seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override `log.interval` (iterations between train log lines).
    #[arg(long, value_name = "N")]
    pub log_interval: Option<usize>,
    /// Override `checkpoint.interval` (epochs between checkpoints).
    #[arg(long, value_name = "N")]
    pub checkpoint_interval: Option<usize>,
    /// Stop after this many epochs of this invocation (the run stays resumable).
    #[arg(long, value_name = "N")]
    pub stop_after: Option<usize>,
    /// Override any config field before validation, e.g. `--set model.backbone.base_width=16`
    /// (VALUE is JSON, or a string); repeatable; recorded in the log's config.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `runner [train] --config …`: prints or checks the effective config, or trains it with the
/// step model its mode needs.
fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let eff = config::load(args)?;
    if args.print_config {
        print!("{}", eff.cfg.to_json_pretty());
        return Ok(());
    }
    let device = device::parse_device(&args.device)?;
    device::configure_from(&device, &eff.cfg.train).with_context(|| eff.origin.clone())?;
    if args.check_config {
        setup::check_config(&eff.cfg).with_context(|| eff.origin.clone())?;
        for note in config::notes(&eff) {
            eprintln!("{note}");
        }
        println!("{}: ok", eff.origin);
        return Ok(());
    }
    if setup::LEARNED_MODES.contains(&eff.cfg.model.mix_mode.to_vec()[0].as_str()) {
        session::train(args, eff, device, automix_step::AutoMixStep::new)
    } else {
        session::train(args, eff, device, net_step::NetStep::new)
    }
}

/// `--threads N`: the size of the global thread pool of the CPU kernels (rayon, which candle
/// and the gemm crate also read through `RAYON_NUM_THREADS`). Before any thread exists.
fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let Some(n) = threads else {
        return Ok(());
    };
    if n == 0 {
        anyhow::bail!("--threads: must be at least 1");
    }
    // SAFETY (edition 2024's rule): no other thread exists yet to read the environment.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("--threads: {e}"))
}

fn main() -> ExitCode {
    // Before any thread exists: every step frees and reallocates large buffers.
    backbones::kernels::keep_freed_memory();
    let cli = Cli::parse();
    let result = match set_threads(cli.threads) {
        Err(e) => Err(e),
        Ok(()) => run_command(cli),
    };
    exit_code(result)
}

/// Subcommands whose work is their standard output (`runner list | head`): a closed pipe ends
/// them quietly, as for any Unix filter, instead of a panic in `println!`. Training keeps
/// Rust's default (SIGPIPE ignored), so a reader that goes away never kills a run without
/// its checkpoint.
fn quiet_on_closed_stdout(cli: &Cli) {
    let printing = match &cli.command {
        None => cli.train.print_config,
        Some(Command::Train(a)) => a.print_config,
        Some(Command::Preview(_)) => false,
        Some(_) => true,
    };
    #[cfg(unix)]
    if printing {
        // SAFETY: restoring the default disposition of a signal, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    #[cfg(not(unix))]
    let _ = printing;
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    quiet_on_closed_stdout(&cli);
    match cli.command {
        None => train(&cli.train),
        Some(Command::Train(args)) => train(&args),
        Some(Command::Preview(args)) => preview::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::Eval(args)) => eval::run(&args),
        Some(Command::Export(args)) => export::run(&args),
        Some(Command::List(args)) => list::run(&args),
        Some(Command::Schema) => {
            serde_json::to_string_pretty(&bench_config::RunConfig::json_schema())
                .map(|s| println!("{s}"))
                .map_err(Into::into)
        }
    }
}

/// The error's chain of causes joined by `: `, each cause's first line only, skipping a cause
/// whose text the message already ends with (errors that print their source themselves,
/// such as `path: No space left on device`).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.lines().next().unwrap_or_default();
        if text.is_empty() || msg.ends_with(text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(text);
    }
    msg
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<session::Interrupted>() => {
            let i = e.downcast_ref::<session::Interrupted>().expect("checked");
            eprintln!("{i}");
            ExitCode::from(i.signal.exit_code())
        }
        Err(e) => {
            // One line: the chain of causes joined, the outermost naming the file or field.
            // The first line only: candle appends a backtrace after a newline when
            // RUST_BACKTRACE is set.
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_one_line_without_a_repeated_cause() {
        let io = std::io::Error::other("No space left on device");
        let e = anyhow::Error::new(train::TrainError::io(
            std::path::Path::new("/w/metrics.csv"),
            io,
        ))
        .context("starting the run");
        assert_eq!(
            one_line(&e),
            "starting the run: /w/metrics.csv: No space left on device"
        );
        let multi = anyhow::anyhow!("first line\nbacktrace ...").context("outer");
        assert_eq!(one_line(&multi), "outer: first line");
    }
}
