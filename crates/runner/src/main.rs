//! `runner`: trains, checks, previews and benchmarks mixup methods on CIFAR-10
//! from a plain JSON config (see `docs/config.md`).

mod automix_run;
mod bench;
mod canvas;
mod device;
mod mixmodel;
mod preview;
mod setup;
mod trainer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Train and evaluate mixup methods on CIFAR-10 (OpenMixup's benchmark, on candle).
#[derive(Debug, Parser)]
#[command(name = "runner", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train (the default when no subcommand is given).
    Train(TrainArgs),
    /// Write a PNG grid of one mixed batch per method: originals, partners, masks, mixed images, λ.
    Preview(preview::PreviewArgs),
    /// Measure train-step, mixing and data-loading throughput; prints JSON.
    Bench(bench::BenchArgs),
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
    /// Continue the run in the work dir from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Continue from this checkpoint file.
    #[arg(long, value_name = "CHECKPOINT")]
    pub resume_from: Option<PathBuf>,
    /// Only parse and validate the config (and build the model), then exit.
    #[arg(long)]
    pub check_config: bool,
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
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => trainer::run(&cli.train),
        Some(Command::Train(args)) => trainer::run(&args),
        Some(Command::Preview(args)) => preview::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, the outermost naming the file or field.
            // The first line only: candle appends a backtrace after a newline when
            // RUST_BACKTRACE is set.
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or_default());
            ExitCode::from(2)
        }
    }
}
