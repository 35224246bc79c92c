//! The one training loop of every mode: epochs, evaluation, checkpoints, logs,
//! interrupts and divergence checks, around a [`StepModel`] that does the
//! per-step work (hand-crafted mixing + backbone in `net_step`, AutoMix/SAMix in
//! `automix_step`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bench_config::RunConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use cifar_data::{CifarSplit, LoaderConfig, TrainLoader};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use train::checkpoint;
use train::log::{EpochCsv, EpochRow, JsonLogger, TrainLine};
use train::metrics;
use train::schedule::cosine_lr;
use train::sgd::Sgd;

use crate::config::EffectiveConfig;
use crate::signals::{Interrupt, Signal};
use crate::workdir::{self, Start, WorkDir};
use crate::{setup, TrainArgs};

/// Where a step sits in the run (AutoMix's momentum schedule needs it).
#[derive(Debug, Clone, Copy)]
pub struct StepAt {
    /// 0-based iteration over the whole run.
    pub global: usize,
    /// Iterations in the whole run.
    pub total: usize,
}

/// One step's loss and the per-batch means to log beside it.
pub struct StepOutput {
    /// The loss to differentiate.
    pub loss: Tensor,
    /// Detached scalar batch means (e.g. `acc`, `acc_mix`, AutoMix's loss terms).
    pub logs: Vec<(&'static str, Tensor)>,
    /// Gradients of taped backbone forwards (`CifarResNet::forward_train`), which the
    /// backbone computes when `backward` reaches it: [`StepOutput::gradients`] adds them.
    pub tapes: Vec<backbones::TapeGrads>,
}

impl StepOutput {
    /// Every gradient of the loss: candle's `backward` plus the taped backbones' parameters.
    pub fn gradients(&self) -> Result<candle_core::backprop::GradStore> {
        let mut grads = self.loss.backward()?;
        for tape in &self.tapes {
            tape.add_to(&mut grads)?;
        }
        Ok(grads)
    }
}

/// The per-step work of one kind of model; everything around it is [`train`](fn@train).
pub trait StepModel {
    /// The checkpointed variable groups, by tensor-name prefix (`model.`, `mixblock.`, …).
    fn varmaps(&self) -> Vec<(&'static str, &VarMap)>;
    /// The optimizer over every trained variable.
    fn optimizer(&mut self) -> &mut Sgd;
    /// The loss of one batch and its logged values.
    fn step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        rng: &mut ChaCha8Rng,
        at: StepAt,
    ) -> Result<StepOutput>;
    /// Work after the optimizer update (AutoMix's momentum encoder).
    fn after_update(&mut self, _at: StepAt) -> Result<()> {
        Ok(())
    }
    /// Test `(head, top-1 %, top-5 %)` of every evaluated head.
    fn evaluate(&self, data: &CifarSplit, batch_size: usize) -> Result<Vec<(String, f64, f64)>>;
    /// The names of the heads [`StepModel::evaluate`] reports, in its order.
    fn heads(&self) -> Vec<&'static str>;
    /// The logged batch value that is the train accuracy of `metrics.csv` (top-1 % of the
    /// trained classifier on the mixed batch against the first label).
    fn train_acc_key(&self) -> &'static str {
        "acc"
    }
}

/// Evaluation history: per head, `(1-based epoch, top-1 %)`.
pub type History = BTreeMap<String, Vec<(usize, f64)>>;

/// The error a run stops with when a signal interrupted it (after checkpointing).
#[derive(Debug)]
pub struct Interrupted {
    /// The signal.
    pub signal: Signal,
    /// What to tell the user.
    pub message: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}

/// The error a run stops with when its loss or its weights became non-finite. The run's log
/// gets a `{"mode": "diverged"}` line first, so that a report never shows the run finished.
#[derive(Debug)]
pub struct Diverged {
    /// 1-based epoch in which the divergence was found.
    pub epoch: usize,
    /// 1-based iteration of a non-finite loss; `None` when the weights were found non-finite
    /// after the epoch.
    pub iter: Option<usize>,
    /// What to tell the user.
    pub message: String,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diverged {}

/// Trains `cfg` with the model `build` makes, in the config's work dir.
pub fn train<M: StepModel>(
    args: &TrainArgs,
    eff: EffectiveConfig,
    device: Device,
    build: impl FnOnce(&RunConfig, &Device) -> Result<M>,
) -> Result<()> {
    let cfg = eff.cfg.clone();
    let work_dir = WorkDir::open(Path::new(&cfg.work_dir()))?;
    let start = match workdir::start_point(args.resume, args.resume_from.as_deref(), &work_dir)? {
        Start::Finished => {
            let requested = serde_json::to_value(&cfg)?;
            match workdir::finished_run(&work_dir, &requested, args.epochs)? {
                Some(start) => start,
                None => {
                    eprintln!(
                        "{}: the run has finished ({} exists); nothing to do",
                        work_dir.path.display(),
                        work_dir.result_path().display()
                    );
                    return Ok(());
                }
            }
        }
        start => start,
    };
    work_dir.clean_leftovers(start == Start::Fresh)?;
    let (train_data, test_data) = setup::load_data(&cfg)?;
    let mut model = build(&cfg, &device)?;
    let mut run = Run::restore_or_start(args, &eff, &device, work_dir, start, &mut model)?;
    for note in crate::config::notes(&eff) {
        eprintln!("{note}");
    }
    eprintln!("{}", model_summary(&cfg, &model, &device));
    run.interrupt = Interrupt::install()?;
    let result = run.train(&mut model, &train_data, &test_data, args);
    if let Some(d) = result
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<Diverged>())
    {
        // Best effort: the divergence itself is the error to report.
        let _ = run.logger.write_fields(&[
            ("mode", json!("diverged")),
            ("epoch", json!(d.epoch)),
            ("iter", json!(d.iter)),
            ("reason", json!(d.message)),
        ]);
    }
    result
}

/// The one-line description of the trained network printed at the start (and logged).
fn model_summary<M: StepModel>(cfg: &RunConfig, model: &M, device: &Device) -> String {
    let b = setup::backbone_config(cfg);
    let arch = match b.arch {
        backbones::Arch::ResNet18 => "ResNet-18",
        backbones::Arch::ResNeXt50 => "ResNeXt-50 (32x4d)",
    };
    let parts: Vec<String> = model
        .varmaps()
        .iter()
        .map(|(prefix, vm)| {
            let n: usize =
                vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>() - buffer_elements(vm);
            format!(
                "{}{}",
                prefix.trim_end_matches('.'),
                format_args!(" {}", thousands(n))
            )
        })
        .collect();
    format!(
        "model: {arch}, base width {}, {} classes; parameters: {}; {}; device {} ({}), {} threads",
        b.base_width,
        b.num_classes,
        parts.join(", "),
        cfg.model.mix_mode.to_vec().join("+"),
        device_name(device),
        run_precision(cfg, device),
        rayon::current_num_threads()
    )
}

/// The arithmetic the run really uses (`f32` on the CPU whatever `train.precision` says,
/// unless bf16 is emulated there: `bf16-emulated`).
fn run_precision(cfg: &RunConfig, device: &Device) -> &'static str {
    crate::device::precision_label(device, crate::device::requested_precision(&cfg.train))
}

/// Elements of a VarMap's BatchNorm buffers (running statistics), which are not trained.
fn buffer_elements(vm: &VarMap) -> usize {
    let data = vm.data().lock().expect("VarMap lock");
    data.iter()
        .filter(|(k, _)| backbones::is_buffer(k))
        .map(|(_, v)| v.elem_count())
        .sum()
}

/// `11173962` as `11,173,962`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `cpu` or `cuda:N`.
fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// State of the run that is not the model's.
struct Run {
    cfg: RunConfig,
    device: Device,
    work_dir: WorkDir,
    logger: JsonLogger,
    mix_rng: ChaCha8Rng,
    history: History,
    /// Completed epochs.
    epoch: usize,
    /// Steps already done in epoch `epoch` (a checkpoint taken mid-epoch).
    iter_in_epoch: usize,
    /// The train meter of the unfinished log interval at a mid-epoch checkpoint.
    meter: Option<MeterState>,
    interrupt: Interrupt,
    /// The newest checkpoint written or resumed from (named in error messages).
    last_checkpoint: Option<PathBuf>,
    /// The per-epoch `metrics.csv`.
    csv: EpochCsv,
    /// The current epoch's train sums so far, for its `metrics.csv` row.
    epoch_stats: EpochStats,
    /// Steps trained by this invocation and when it started (the run's ETA).
    steps_done: usize,
    started: Instant,
    /// The logged value that is `metrics.csv`'s train accuracy.
    train_acc_key: &'static str,
}

/// An epoch's train totals: `(key, Σ value·images)`, images, training seconds.
#[derive(Clone, Default, Serialize, Deserialize)]
struct EpochStats {
    sums: Vec<(String, f64)>,
    images: usize,
    seconds: f64,
}

impl EpochStats {
    fn add(&mut self, line: &TrainLine, images: usize) {
        for (k, v) in &line.metrics {
            match self.sums.iter_mut().find(|(key, _)| key == k) {
                Some((_, sum)) => *sum += v * images as f64,
                None => self.sums.push((k.clone(), v * images as f64)),
            }
        }
        self.images += images;
    }

    fn mean(&self, key: &str) -> f64 {
        let n = self.images.max(1) as f64;
        self.sums
            .iter()
            .find(|(k, _)| k == key)
            .map_or(f64::NAN, |(_, s)| s / n)
    }
}

/// The checkpoint's metadata, as written and read back.
#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    epoch: usize,
    #[serde(default)]
    iter_in_epoch: usize,
    iter: usize,
    mix_rng: ChaCha8Rng,
    history: HistoryCompat,
    log_file: Option<String>,
    config: String,
    version: String,
    #[serde(default)]
    meter: Option<MeterState>,
    #[serde(default)]
    epoch_stats: Option<EpochStats>,
}

/// Checkpoints of earlier versions stored the single head's history as a list.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum HistoryCompat {
    Heads(History),
    Single(Vec<(usize, f64)>),
}

impl Run {
    fn restore_or_start<M: StepModel>(
        args: &TrainArgs,
        eff: &EffectiveConfig,
        device: &Device,
        work_dir: WorkDir,
        start: Start,
        model: &mut M,
    ) -> Result<Self> {
        let cfg = eff.cfg.clone();
        let Start::Resume(ckpt) = start else {
            let logger = new_log(&work_dir, eff, model, device)?;
            let csv = EpochCsv::open(&work_dir.path, 0, &model.heads())?;
            return Ok(Self {
                mix_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6d69_7862),
                cfg,
                device: device.clone(),
                work_dir,
                logger,
                history: History::new(),
                epoch: 0,
                iter_in_epoch: 0,
                meter: None,
                interrupt: Interrupt::never(),
                last_checkpoint: None,
                csv,
                epoch_stats: EpochStats::default(),
                steps_done: 0,
                started: Instant::now(),
                train_acc_key: model.train_acc_key(),
            });
        };
        let from_latest = args.resume_from.is_none();
        let (tensors, meta) = checkpoint::load_checkpoint(&ckpt, device)
            .map_err(|e| corrupt_checkpoint_error(&ckpt, &work_dir, from_latest, e.into()))?;
        let meta: CheckpointMeta = serde_json::from_value(meta)
            .with_context(|| format!("{}: unreadable checkpoint metadata", ckpt.display()))?;
        let saved_cfg: Value = serde_json::from_str(&meta.config)
            .with_context(|| format!("{}: the stored config is not JSON", ckpt.display()))?;
        let mut changed =
            workdir::result_changing_differences(&saved_cfg, &serde_json::to_value(&cfg)?);
        // `--epochs N` on resume changes the schedule on purpose: allowed, and logged.
        let saved_epochs = saved_cfg
            .get("max_epochs")
            .and_then(Value::as_u64)
            .map_or(cfg.max_epochs, |e| e as usize);
        let mut schedule_change = None;
        if args.epochs == Some(cfg.max_epochs) && saved_epochs != cfg.max_epochs {
            let done = meta.epoch + usize::from(meta.iter_in_epoch > 0);
            if cfg.max_epochs < done.max(1) {
                bail!(
                    "--epochs {}: the run in {} has already trained {} epoch(s)",
                    cfg.max_epochs,
                    work_dir.path.display(),
                    done
                );
            }
            changed.retain(|c| !c.starts_with("max_epochs:"));
            schedule_change = Some(format!(
                "max_epochs: {saved_epochs} -> {} (--epochs: the cosine schedule now ends at epoch {}; the remaining epochs follow it)",
                cfg.max_epochs, cfg.max_epochs
            ));
        }
        if !changed.is_empty() && !args.allow_config_change {
            bail!(
                "{}: the config differs from the checkpoint's in field(s) that change results: {}; resume with the original config, or pass --allow-config-change to continue anyway (recorded in the log)",
                ckpt.display(),
                changed.join("; ")
            );
        }
        for (prefix, vm) in model.varmaps() {
            checkpoint::load_varmap(vm, &tensors, prefix, &ckpt)?;
        }
        model
            .optimizer()
            .load_state(&checkpoint::strip_prefix(&tensors, "optim."), &ckpt)?;
        let logger = match &meta.log_file {
            Some(name) if work_dir.path.join(name).is_file() => {
                let logger = JsonLogger::append(&work_dir.path.join(name))?;
                if logger.dropped_bytes() > 0 {
                    eprintln!(
                        "{}: dropped an incomplete last line ({} bytes) before appending",
                        logger.path().display(),
                        logger.dropped_bytes()
                    );
                }
                logger
            }
            // `--resume-from` into another work dir: a new log, with its meta line.
            _ => {
                let mut logger = new_log(&work_dir, eff, model, device)?;
                logger.write_fields(&[
                    ("mode", json!("resumed")),
                    ("resumed_from", json!(ckpt.display().to_string())),
                    ("epoch", json!(meta.epoch)),
                ])?;
                logger
            }
        };
        let mut logger = logger;
        if let Some(change) = &schedule_change {
            eprintln!("note: resuming with a changed schedule: {change}");
            logger.write_fields(&[
                ("mode", json!("config_change")),
                ("epoch", json!(meta.epoch)),
                ("changed", json!([change])),
            ])?;
            // The finished run's result is kept under its own name; the longer run writes
            // result.json when it finishes.
            if work_dir.result_path().is_file() {
                let kept = work_dir.path.join(format!("result_ep{saved_epochs}.json"));
                std::fs::rename(work_dir.result_path(), &kept).with_context(|| {
                    format!("{}: cannot move aside", work_dir.result_path().display())
                })?;
                eprintln!(
                    "note: the {saved_epochs}-epoch result is kept as {}",
                    kept.display()
                );
            }
        }
        if !changed.is_empty() {
            eprintln!(
                "warning: resuming with a changed config: {}",
                changed.join("; ")
            );
            logger.write_fields(&[
                ("mode", json!("config_change")),
                ("epoch", json!(meta.epoch)),
                ("changed", json!(changed)),
            ])?;
        }
        let history = match meta.history {
            HistoryCompat::Heads(h) => h,
            HistoryCompat::Single(v) => History::from([("head0".to_string(), v)]),
        };
        eprintln!(
            "resuming {} from epoch {} iteration {}",
            ckpt.display(),
            meta.epoch,
            meta.iter_in_epoch
        );
        Ok(Self {
            csv: EpochCsv::open(&work_dir.path, meta.epoch, &model.heads())?,
            cfg,
            device: device.clone(),
            work_dir,
            logger,
            mix_rng: meta.mix_rng,
            history,
            epoch: meta.epoch,
            iter_in_epoch: meta.iter_in_epoch,
            meter: meta.meter,
            interrupt: Interrupt::never(),
            last_checkpoint: Some(ckpt),
            epoch_stats: meta.epoch_stats.unwrap_or_default(),
            steps_done: 0,
            started: Instant::now(),
            train_acc_key: model.train_acc_key(),
        })
    }

    fn train<M: StepModel>(
        &mut self,
        model: &mut M,
        train_data: &Arc<CifarSplit>,
        test_data: &CifarSplit,
        args: &TrainArgs,
    ) -> Result<()> {
        let max_epochs = self.cfg.max_epochs;
        let last_epoch = match args.stop_after {
            Some(n) => (self.epoch + n).min(max_epochs),
            None => max_epochs,
        };
        let iters = TrainLoader::count_batches(train_data.len(), self.cfg.data.batch_size, false);
        while self.epoch < last_epoch {
            self.train_epoch(model, train_data, iters, last_epoch, args.quiet)?;
            self.epoch += 1;
            self.iter_in_epoch = 0;
            let done = self.epoch;
            // Before the evaluation: weights that overflowed without a non-finite loss (yet)
            // must not be evaluated, logged or put in metrics.csv as if the epoch were good.
            self.check_state_finite(model, "after epoch")?;
            let heads = if done.is_multiple_of(self.cfg.evaluation.interval) || done == max_epochs {
                self.evaluate(model, test_data, args.quiet)?
            } else {
                Vec::new()
            };
            self.end_epoch(heads)?;
            let interrupted = self.interrupt.received();
            if done.is_multiple_of(self.cfg.checkpoint.interval)
                || done == max_epochs
                || done == last_epoch
                || interrupted.is_some()
            {
                self.save_checkpoint(model, iters)?;
            }
            if let Some(signal) = interrupted {
                return Err(self.interrupted(signal, iters).into());
            }
        }
        if last_epoch == max_epochs {
            self.summarize()?;
        } else if let Some(ckpt) = &self.last_checkpoint {
            eprintln!(
                "stopped after epoch {} of {max_epochs} (--stop-after); continue with --resume (checkpoint {})",
                self.epoch,
                ckpt.display()
            );
        }
        Ok(())
    }

    fn train_epoch<M: StepModel>(
        &mut self,
        model: &mut M,
        train_data: &Arc<CifarSplit>,
        iters: usize,
        last_epoch: usize,
        quiet: bool,
    ) -> Result<()> {
        let t_epoch = Instant::now();
        let c = &self.cfg;
        let epoch = self.epoch;
        let lr = cosine_lr(epoch, c.max_epochs, c.optimizer.lr, c.lr_config.min_lr);
        let loader = TrainLoader::new(
            train_data.clone(),
            LoaderConfig {
                batch_size: c.data.batch_size,
                workers: c.data.workers,
                prefetch: c.data.prefetch,
                padding_mode: setup::padding_mode(c),
                seed: c.seed,
                drop_last: false,
            },
            epoch,
            self.iter_in_epoch,
        )?;
        let total = iters * c.max_epochs;
        let bar = progress_bar(iters, epoch, c.max_epochs, quiet);
        bar.set_position(self.iter_in_epoch as u64);
        let mut meter = match self.meter.take() {
            Some(state) => Meter::restore(state, &self.device)?,
            None => Meter::default(),
        };
        // A host read per step is free on the CPU; on a GPU it would stall the
        // queue, so there the losses are checked when a log line is written.
        let check_every_step = self.device.is_cpu();
        let (mut data_wait, mut t_last, mut t_fetch) = (0.0, Instant::now(), Instant::now());
        let mut last_loss: Option<f32> = None;
        let steps_left_after_epoch = (last_epoch - epoch - 1) * iters;
        for (i, batch) in loader.enumerate() {
            let it = self.iter_in_epoch + i;
            data_wait += t_fetch.elapsed().as_secs_f64();
            let (x, y) = cifar_data::to_device_batch(&batch, &self.device)?;
            let at = StepAt {
                global: epoch * iters + it,
                total,
            };
            let out = model.step(&x, &y, &mut self.mix_rng, at)?;
            let grads = out.gradients()?;
            model.optimizer().step(&grads, lr)?;
            model.after_update(at)?;
            meter.add(it + 1, &out, batch.len)?;
            self.steps_done += 1;
            let done = it + 1;
            let flush = done.is_multiple_of(self.cfg.log.interval) || done == iters;
            if check_every_step || flush {
                if let Some(l) =
                    meter.check_finite(epoch + 1, iters, self.last_checkpoint.as_deref())?
                {
                    last_loss = Some(l);
                }
            }
            if flush {
                let elapsed = t_last.elapsed().as_secs_f64();
                let images = meter.images;
                let line = meter.flush(epoch + 1, done, lr, elapsed, data_wait)?;
                self.epoch_stats.add(&line, images);
                self.logger.write_train(&line)?;
                (data_wait, t_last) = (0.0, Instant::now());
            }
            if !quiet {
                let per_step = self.started.elapsed().as_secs_f64() / self.steps_done as f64;
                let epoch_left = (iters - done) as f64 * per_step;
                let run_left = epoch_left + steps_left_after_epoch as f64 * per_step;
                bar.set_message(progress_message(
                    last_loss,
                    lr,
                    batch.len as f64 / per_step,
                    epoch_left,
                    run_left,
                ));
            }
            bar.inc(1);
            if done < iters {
                if let Some(signal) = self.interrupt.received() {
                    bar.finish_and_clear();
                    meter.check_finite(epoch + 1, iters, self.last_checkpoint.as_deref())?;
                    self.iter_in_epoch = done;
                    self.meter = Some(meter.state()?);
                    self.epoch_stats.seconds += t_epoch.elapsed().as_secs_f64();
                    self.save_checkpoint(model, iters)?;
                    return Err(self.interrupted(signal, iters).into());
                }
            }
            t_fetch = Instant::now();
        }
        bar.finish_and_clear();
        self.epoch_stats.seconds += t_epoch.elapsed().as_secs_f64();
        Ok(())
    }

    /// The epoch's `metrics.csv` row and its line on the terminal.
    fn end_epoch(&mut self, heads: Vec<(String, f64, f64)>) -> Result<()> {
        let c = &self.cfg;
        let stats = std::mem::take(&mut self.epoch_stats);
        let row = EpochRow {
            epoch: self.epoch,
            lr: cosine_lr(
                self.epoch - 1,
                c.max_epochs,
                c.optimizer.lr,
                c.lr_config.min_lr,
            ),
            train_loss: stats.mean("loss"),
            train_acc: stats.mean(self.train_acc_key),
            heads,
            epoch_seconds: stats.seconds,
            img_per_s: stats.images as f64 / stats.seconds.max(1e-9),
        };
        self.csv.write(&row)?;
        let accs = match row.heads.as_slice() {
            [] => String::new(),
            [(_, t1, t5)] => format!("top-1 {t1:.2}  top-5 {t5:.2}  "),
            heads => {
                let shown: Vec<String> = heads
                    .iter()
                    .map(|(h, t1, _)| format!("{h} {t1:.2}"))
                    .collect();
                format!("top-1 {}  ", shown.join(", "))
            }
        };
        eprintln!(
            "epoch {}/{}: {accs}train loss {:.4}  {:.1} s ({:.0} img/s)",
            self.epoch, c.max_epochs, row.train_loss, row.epoch_seconds, row.img_per_s
        );
        Ok(())
    }

    fn interrupted(&self, signal: Signal, iters: usize) -> Interrupted {
        let at = if self.iter_in_epoch == 0 {
            format!("after epoch {}", self.epoch)
        } else {
            format!(
                "at epoch {}, iteration {}/{iters}",
                self.epoch + 1,
                self.iter_in_epoch
            )
        };
        Interrupted {
            signal,
            message: format!(
                "interrupted by {} {at}; checkpoint {} written; continue with the same command and --resume",
                signal.name(),
                self.last_checkpoint
                    .as_ref()
                    .map_or("(none)".into(), |p| p.display().to_string()),
            ),
        }
    }

    fn evaluate<M: StepModel>(
        &mut self,
        model: &M,
        test_data: &CifarSplit,
        quiet: bool,
    ) -> Result<Vec<(String, f64, f64)>> {
        let done = self.epoch;
        let c = &self.cfg;
        let spinner = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new_spinner().with_message(format!(
                "epoch {done}/{}: evaluating on {} test images",
                c.max_epochs,
                test_data.len()
            ))
        };
        spinner.enable_steady_tick(std::time::Duration::from_millis(200));
        let accs = model.evaluate(test_data, c.data.test_batch_size)?;
        spinner.finish_and_clear();
        let lr = cosine_lr(done - 1, c.max_epochs, c.optimizer.lr, c.lr_config.min_lr);
        let mut fields = Vec::new();
        for (head, top1, top5) in &accs {
            self.history
                .entry(head.clone())
                .or_default()
                .push((done, *top1));
            fields.push((format!("{head}_top1"), *top1));
            fields.push((format!("{head}_top5"), *top5));
        }
        let batches = test_data.len().div_ceil(c.data.test_batch_size);
        self.logger.write_val(done, batches, lr, &fields)?;
        Ok(accs)
    }

    /// Every tensor a checkpoint holds: the model's variables and the optimizer's state.
    fn state_tensors<M: StepModel>(model: &mut M) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = Vec::new();
        for (prefix, vm) in model.varmaps() {
            tensors.extend(checkpoint::varmap_tensors(vm, prefix));
        }
        tensors.extend(checkpoint::with_prefix(
            &model.optimizer().state_tensors()?,
            "optim.",
        ));
        Ok(tensors)
    }

    /// Stops the run ([`Diverged`]) when a weight or optimizer buffer is non-finite.
    fn check_state_finite<M: StepModel>(&self, model: &mut M, when: &str) -> Result<()> {
        self.refuse_non_finite(&Self::state_tensors(model)?, when)
    }

    fn refuse_non_finite(&self, tensors: &[(String, Tensor)], when: &str) -> Result<()> {
        let Some(name) = checkpoint::first_non_finite(tensors)? else {
            return Ok(());
        };
        let (epoch, iter) = match self.iter_in_epoch {
            0 => (self.epoch, None),
            i => (self.epoch + 1, Some(i)),
        };
        let at = match iter {
            None => format!("{when} {epoch}"),
            Some(i) => format!("at epoch {epoch}, iteration {i}"),
        };
        Err(Diverged {
            epoch,
            iter,
            message: format!(
                "training diverged: `{name}` holds non-finite values {at}; the run is stopped, and nothing of that state is evaluated or checkpointed{}",
                self.last_good()
            ),
        }
        .into())
    }

    /// Writes the checkpoint of the current position (an epoch boundary, or
    /// mid-epoch when interrupted), refusing to write non-finite tensors.
    fn save_checkpoint<M: StepModel>(&mut self, model: &mut M, iters: usize) -> Result<()> {
        let tensors = Self::state_tensors(model)?;
        self.refuse_non_finite(&tensors, "after epoch")?;
        let meta = CheckpointMeta {
            epoch: self.epoch,
            iter_in_epoch: self.iter_in_epoch,
            iter: self.epoch * iters + self.iter_in_epoch,
            mix_rng: self.mix_rng.clone(),
            history: HistoryCompat::Heads(self.history.clone()),
            log_file: self
                .logger
                .path()
                .file_name()
                .map(|f| f.to_string_lossy().into_owned()),
            config: self.cfg.to_json_pretty(),
            version: env!("CARGO_PKG_VERSION").into(),
            meter: self.meter.clone(),
            epoch_stats: (self.iter_in_epoch > 0).then(|| self.epoch_stats.clone()),
        };
        let meta = serde_json::to_value(&meta)?;
        let dir = &self.work_dir.path;
        let path = if self.iter_in_epoch == 0 {
            checkpoint::save_epoch_checkpoint(
                dir,
                self.epoch,
                &tensors,
                &meta,
                Some(self.cfg.checkpoint.max_keep),
            )?
        } else {
            let name = format!(
                "iter_{}.safetensors",
                self.epoch * iters + self.iter_in_epoch
            );
            let path = dir.join(&name);
            checkpoint::save_checkpoint(&path, &tensors, &meta)?;
            checkpoint::write_atomically(&dir.join(checkpoint::LATEST_POINTER), |tmp| {
                std::fs::write(tmp, format!("{name}\n"))
                    .map_err(|e| train::error::TrainError::io(tmp, e))
            })?;
            path
        };
        // A mid-epoch checkpoint is superseded by any later one.
        for entry in std::fs::read_dir(dir)? {
            let p = entry?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            if p != path
                && name.is_some_and(|n| n.starts_with("iter_") && n.ends_with(".safetensors"))
            {
                std::fs::remove_file(&p)?;
            }
        }
        self.last_checkpoint = Some(path);
        Ok(())
    }

    fn last_good(&self) -> String {
        match &self.last_checkpoint {
            Some(p) => format!("; the last good checkpoint is {}", p.display()),
            None => String::new(),
        }
    }

    fn summarize(&mut self) -> Result<()> {
        let window = self.cfg.evaluation.median_window;
        let summary = summary_json(&self.history, self.cfg.max_epochs, window);
        let fields: Vec<(&str, Value)> = summary
            .as_object()
            .expect("an object")
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        self.logger.write_fields(&fields)?;
        // result.json is the run's record: what finished, with which config, and every
        // evaluation (including those before a --resume-from into this work dir, which this
        // work dir's log lacks), so that a report and `--resume auto` can check it.
        let mut result = summary.clone();
        result["status"] = json!("finished");
        result["seed"] = json!(self.cfg.seed);
        result["config"] = serde_json::to_value(&self.cfg)?;
        result["history"] = serde_json::to_value(&self.history)?;
        let path = self.work_dir.result_path();
        checkpoint::write_atomically(&path, |tmp| {
            std::fs::write(
                tmp,
                serde_json::to_string_pretty(&result).expect("JSON") + "\n",
            )
            .map_err(|e| train::error::TrainError::io(tmp, e))
        })?;
        let pct = |v: &Value| v.as_f64().map_or("n/a".into(), |x| format!("{x:.2}%"));
        let head = match summary["best_head"].as_str() {
            Some(h) if self.history.len() > 1 => format!(" ({h})"),
            _ => String::new(),
        };
        let from = self.cfg.max_epochs.saturating_sub(window).max(1);
        println!(
            "finished {}: median top-1{head} over epochs {from}-{} {}, final {}",
            self.cfg.name,
            self.cfg.max_epochs,
            pct(&summary["median_top1"]),
            pct(&summary["final_top1"]),
        );
        for (what, p) in [
            ("result", Some(path.as_path())),
            ("log", Some(self.logger.path())),
            ("metrics", Some(self.csv.path())),
            ("checkpoint", self.last_checkpoint.as_deref()),
        ] {
            if let Some(p) = p {
                println!("  {what:<10} {}", p.display());
            }
        }
        Ok(())
    }
}

/// The progress bar's message: short enough for an 80-column terminal.
/// A new log in `work_dir`, opened with its meta line: environment (with the build's git
/// commit, the host, the thread pool's real size, the model summary), effective config,
/// seed, and the fields the method's recipe supplied.
fn new_log<M: StepModel>(
    work_dir: &WorkDir,
    eff: &EffectiveConfig,
    model: &M,
    device: &Device,
) -> Result<JsonLogger> {
    let cfg = &eff.cfg;
    let mut logger = JsonLogger::create(&work_dir.path)?;
    let recipe: serde_json::Map<String, Value> = eff
        .from_recipe
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    logger.write_fields(&[
        ("env_info", json!(env_info(device))),
        ("config", json!(cfg.to_json_pretty())),
        ("seed", json!(cfg.seed)),
        ("exp_name", json!(cfg.name)),
        ("config_source", json!(eff.origin)),
        ("recipe", Value::Object(recipe)),
        ("git_commit", json!(crate::build_info::GIT_COMMIT)),
        ("hostname", json!(crate::build_info::hostname())),
        ("threads", json!(rayon::current_num_threads())),
        ("precision", json!(run_precision(cfg, device))),
        ("model", json!(model_summary(cfg, model, device))),
    ])?;
    Ok(logger)
}

fn progress_message(
    loss: Option<f32>,
    lr: f64,
    img_per_s: f64,
    epoch_left: f64,
    run_left: f64,
) -> String {
    let loss = loss.map_or(String::new(), |l| format!("loss {l:.4} "));
    format!(
        "{loss}lr {lr:.4} {img_per_s:.0} img/s eta {} run {}",
        clock(epoch_left),
        clock(run_left)
    )
}

/// `m:ss` or `h:mm:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The error for a checkpoint that cannot be loaded; for the work dir's latest,
/// it names the older kept checkpoints `--resume-from` can use instead.
fn corrupt_checkpoint_error(
    ckpt: &Path,
    work_dir: &WorkDir,
    from_latest: bool,
    err: anyhow::Error,
) -> anyhow::Error {
    if !from_latest {
        return err;
    }
    let older: Vec<String> = checkpoint::list_epoch_checkpoints(&work_dir.path)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, p)| p != ckpt)
        .map(|(_, p)| p.display().to_string())
        .collect();
    if older.is_empty() {
        err.context("the latest checkpoint cannot be used and no older one is kept")
    } else {
        anyhow::anyhow!(
            "{err:#}; older kept checkpoint(s): {} (resume with --resume-from FILE)",
            older.join(", ")
        )
    }
}

/// The final-metric record. Per head: the median top-1 over epochs `E−window..E`
/// (the upstream summarizer) and over the last `window` epochs (the README's
/// wording); the reported values are the best head's (the only one, `head0`,
/// except for AutoMix/SAMix).
pub fn summary_json(history: &History, max_epochs: usize, window: usize) -> Value {
    let medians: Vec<(&str, f64)> = history
        .iter()
        .filter_map(|(h, v)| metrics::median_last_k(v, max_epochs, window).map(|m| (h.as_str(), m)))
        .collect();
    let best = automix::best_head(&medians);
    let best_history = best.and_then(|(h, _)| history.get(h));
    json!({
        "mode": "summary",
        "max_epochs": max_epochs,
        "median_top1": best.map(|b| b.1),
        "median_top1_last_window": best_history.and_then(|v| metrics::median_final_epochs(v, max_epochs, window)),
        "median_window_epochs": [max_epochs.saturating_sub(window), max_epochs],
        "final_top1": best_history.and_then(|v| v.last()).map(|h| h.1),
        "best_head": best.map(|b| b.0),
        "head_medians": medians.iter().map(|(h, m)| (h.to_string(), json!(m))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Train-line metrics accumulated on the device between log lines, so the loop
/// never waits on the host except when it writes a line (or checks losses).
#[derive(Default)]
struct Meter {
    /// `(key, Σ value·batch)`, the loss first.
    sums: Vec<(String, Tensor)>,
    images: usize,
    iters: usize,
    /// `(1-based iteration, loss)` not yet checked for finiteness.
    unchecked: Vec<(usize, Tensor)>,
}

/// A [`Meter`]'s sums on the host, kept in mid-epoch checkpoints so that a
/// resumed run writes the same log lines as an uninterrupted one.
#[derive(Clone, Serialize, Deserialize)]
struct MeterState {
    sums: Vec<(String, f32)>,
    images: usize,
    iters: usize,
}

impl Meter {
    fn add(&mut self, iter: usize, out: &StepOutput, n: usize) -> Result<()> {
        let loss = out.loss.detach();
        self.unchecked.push((iter, loss.clone()));
        let w = n as f64;
        for (key, value) in
            std::iter::once(("loss", &loss)).chain(out.logs.iter().map(|(k, v)| (*k, v)))
        {
            let v = (value.to_dtype(DType::F32)? * w)?;
            match self.sums.iter_mut().find(|(k, _)| k == key) {
                Some((_, sum)) => *sum = (&*sum + v)?,
                None => self.sums.push((key.to_string(), v)),
            }
        }
        self.images += n;
        self.iters += 1;
        Ok(())
    }

    /// Stops the run at the first non-finite loss since the last check;
    /// returns the newest loss checked.
    fn check_finite(
        &mut self,
        epoch: usize,
        iters: usize,
        last: Option<&Path>,
    ) -> Result<Option<f32>> {
        if self.unchecked.is_empty() {
            return Ok(None);
        }
        let losses: Vec<Tensor> = self
            .unchecked
            .iter()
            .map(|(_, l)| l.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        let values = Tensor::stack(&losses, 0)?.to_vec1::<f32>()?;
        if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
            let iter = self.unchecked[pos].0;
            return Err(Diverged {
                epoch,
                iter: Some(iter),
                message: format!(
                    "training diverged: the loss is {} at epoch {epoch}, iteration {iter}/{iters}; the run is stopped and no checkpoint of it is written{}",
                    values[pos],
                    last.map_or(String::new(), |p| format!("; the last good checkpoint is {}", p.display()))
                ),
            }
            .into());
        }
        self.unchecked.clear();
        Ok(values.last().copied())
    }

    /// The averaged train line; resets the sums.
    fn flush(
        &mut self,
        epoch: usize,
        iter: usize,
        lr: f64,
        elapsed: f64,
        data_wait: f64,
    ) -> Result<TrainLine> {
        let n = self.images.max(1) as f64;
        let iters = self.iters.max(1) as f64;
        let mut metrics = Vec::with_capacity(self.sums.len());
        for (k, v) in self.sums.drain(..) {
            metrics.push((k, v.to_scalar::<f32>()? as f64 / n));
        }
        let line = TrainLine {
            epoch,
            iter,
            lr,
            memory_mb: peak_memory_mb(),
            data_time: data_wait / iters,
            metrics,
            time: elapsed / iters,
        };
        (self.images, self.iters) = (0, 0);
        Ok(line)
    }

    fn state(&self) -> Result<MeterState> {
        let mut sums = Vec::with_capacity(self.sums.len());
        for (k, v) in &self.sums {
            sums.push((k.clone(), v.to_scalar::<f32>()?));
        }
        Ok(MeterState {
            sums,
            images: self.images,
            iters: self.iters,
        })
    }

    fn restore(state: MeterState, device: &Device) -> Result<Self> {
        let mut sums = Vec::with_capacity(state.sums.len());
        for (k, v) in state.sums {
            sums.push((k, Tensor::new(v, device)?));
        }
        Ok(Self {
            sums,
            images: state.images,
            iters: state.iters,
            unchecked: Vec::new(),
        })
    }
}

/// Peak resident memory of the process in MB (Linux), the CPU analogue of
/// mmcv's `memory` field.
pub fn peak_memory_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The `env_info` string of the log's meta line: version, commit, host, device and the
/// size of the thread pool the CPU kernels actually use (`--threads`, `RAYON_NUM_THREADS`).
pub fn env_info(device: &Device) -> String {
    format!(
        "mixbench {} ({}) | candle-core 0.11 | host {} | device {} | threads {}",
        env!("CARGO_PKG_VERSION"),
        crate::build_info::GIT_COMMIT,
        crate::build_info::hostname(),
        device_name(device),
        rayon::current_num_threads()
    )
}

fn progress_bar(len: usize, epoch: usize, max_epochs: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    // `wide_bar` takes what the rest of the line leaves, so the line fits the terminal.
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{wide_bar}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{max_epochs}", epoch + 1));
    bar
}
