//! The training command: composes loader → mixing → backbone → loss → SGD, with
//! evaluation, logs and resumable checkpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bench_config::RunConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use cifar_data::{CifarSplit, LoaderConfig, TrainLoader};
use indicatif::{ProgressBar, ProgressStyle};
use mix_ops::{MixContext, MixedLabels};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use train::checkpoint;
use train::log::JsonLogger;
use train::metrics;
use train::schedule::cosine_lr;
use train::sgd::Sgd;

use crate::device::parse_device;
use crate::mixmodel::NetMixModel;
use crate::setup;
use crate::TrainArgs;

/// Entry point of `runner --config …`.
pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = setup::load_config(args)?;
    let device = parse_device(&args.device)?;
    if args.check_config {
        // Building the model catches what JSON validation cannot (e.g. widths
        // that the grouped convolutions cannot split).
        if !setup::LEARNED_MODES.contains(&cfg.model.mix_mode.to_vec()[0].as_str()) {
            setup::build_backbone(&cfg, &Device::Cpu)?;
        }
        println!("{}: ok", args.config.as_ref().unwrap().display());
        return Ok(());
    }
    let mode = cfg.model.mix_mode.to_vec();
    if setup::LEARNED_MODES.contains(&mode[0].as_str()) {
        return crate::automix_run::run(args, cfg, device);
    }
    Trainer::new(args, cfg, device)?.train(args)
}

/// Where a run keeps its files.
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    /// The newest checkpoint named by `latest`, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(checkpoint::find_latest_checkpoint(&self.0)?)
    }
}

/// Picks the checkpoint to resume from, refusing to overwrite an existing run.
pub fn resume_point(args: &TrainArgs, work_dir: &WorkDir) -> Result<Option<PathBuf>> {
    if let Some(p) = &args.resume_from {
        if !p.is_file() {
            bail!("--resume-from: {} does not exist", p.display());
        }
        return Ok(Some(p.clone()));
    }
    let latest = work_dir.latest()?;
    if args.resume {
        if latest.is_none() {
            bail!(
                "--resume: {} holds no checkpoint to resume from",
                work_dir.0.display()
            );
        }
        return Ok(latest);
    }
    if latest.is_some() {
        bail!(
            "work_dir {} already holds a run; pass --resume to continue it or --work-dir to start elsewhere",
            work_dir.0.display()
        );
    }
    Ok(None)
}

/// What a run restores from its checkpoint, or starts fresh with.
pub struct RunState<H> {
    /// Epochs already trained.
    pub start_epoch: usize,
    /// The mixing RNG, at its saved position.
    pub mix_rng: ChaCha8Rng,
    /// Evaluation history so far.
    pub history: H,
    /// The run's log (appended to when resuming).
    pub logger: JsonLogger,
}

/// Restores the variables of `varmaps` (by checkpoint prefix), the optimizer
/// state and the run state from `resume`; without a checkpoint, starts a new
/// log with its meta line.
pub fn restore_or_start<H: Default + serde::de::DeserializeOwned>(
    cfg: &RunConfig,
    device: &Device,
    work_dir: &WorkDir,
    resume: Option<PathBuf>,
    varmaps: &[(&str, &VarMap)],
    sgd: &mut Sgd,
) -> Result<RunState<H>> {
    let Some(ckpt) = resume else {
        let mut logger = JsonLogger::create(&work_dir.0)?;
        logger.write_meta(
            &env_info(device),
            &cfg.to_json_pretty(),
            cfg.seed,
            &cfg.name,
        )?;
        return Ok(RunState {
            start_epoch: 0,
            mix_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6d69_7862),
            history: H::default(),
            logger,
        });
    };
    let (tensors, meta) = checkpoint::load_checkpoint(&ckpt, device)?;
    for (prefix, vm) in varmaps {
        checkpoint::load_varmap(vm, &tensors, prefix, &ckpt)?;
    }
    sgd.load_state(&checkpoint::strip_prefix(&tensors, "optim."), &ckpt)?;
    let field = |key: &str| -> Result<Value> {
        meta.get(key).cloned().with_context(|| {
            format!(
                "{}: `{key}` missing from the checkpoint metadata",
                ckpt.display()
            )
        })
    };
    let start_epoch: usize = serde_json::from_value(field("epoch")?)?;
    let mix_rng = serde_json::from_value(field("mix_rng")?)
        .with_context(|| format!("{}: mix_rng state", ckpt.display()))?;
    let history = serde_json::from_value(field("history")?)
        .with_context(|| format!("{}: history", ckpt.display()))?;
    let log_file: String = serde_json::from_value(field("log_file")?)?;
    let logger = JsonLogger::append(&work_dir.0.join(log_file))?;
    eprintln!("resuming {} from epoch {start_epoch}", ckpt.display());
    Ok(RunState {
        start_epoch,
        mix_rng,
        history,
        logger,
    })
}

/// The checkpoint metadata shared by every mode.
pub fn checkpoint_meta<H: serde::Serialize>(
    cfg: &RunConfig,
    epoch: usize,
    iters_per_epoch: usize,
    mix_rng: &ChaCha8Rng,
    history: &H,
    logger: &JsonLogger,
) -> Result<Value> {
    Ok(json!({
        "epoch": epoch,
        "iter": epoch * iters_per_epoch,
        "mix_rng": serde_json::to_value(mix_rng)?,
        "history": serde_json::to_value(history)?,
        "log_file": logger.path().file_name().map(|f| f.to_string_lossy().into_owned()),
        "config": cfg.to_json_pretty(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// The training loader of one epoch (order and augmentation fixed by seed and epoch).
pub fn epoch_loader(cfg: &RunConfig, data: &Arc<CifarSplit>, epoch: usize) -> Result<TrainLoader> {
    Ok(TrainLoader::new(
        data.clone(),
        LoaderConfig {
            batch_size: cfg.data.batch_size,
            workers: cfg.data.workers,
            prefetch: cfg.data.prefetch,
            padding_mode: setup::padding_mode(cfg),
            seed: cfg.seed,
            drop_last: false,
        },
        epoch,
        0,
    )?)
}

struct Trainer {
    cfg: RunConfig,
    device: Device,
    varmap: VarMap,
    net: backbones::CifarResNet,
    /// The same network over detached weights, for PuzzleMix's saliency pass.
    frozen: backbones::CifarResNet,
    attention: Option<backbones::AttentionNet>,
    methods: Vec<Box<dyn mix_ops::MixMethod>>,
    picker: mix_ops::policy::ModePicker,
    loss: train::loss::HeadLoss,
    sgd: Sgd,
    mix_rng: ChaCha8Rng,
    train_data: Arc<CifarSplit>,
    test_data: Arc<CifarSplit>,
    work_dir: WorkDir,
    logger: JsonLogger,
    /// (1-based epoch, top-1 %) of every evaluation so far.
    history: Vec<(usize, f64)>,
    start_epoch: usize,
}

impl Trainer {
    fn new(args: &TrainArgs, cfg: RunConfig, device: Device) -> Result<Self> {
        let work_dir = WorkDir(PathBuf::from(cfg.work_dir()));
        let resume = resume_point(args, &work_dir)?;
        std::fs::create_dir_all(&work_dir.0)
            .with_context(|| format!("work_dir {}: cannot create", work_dir.0.display()))?;
        let (train_data, test_data) = setup::load_data(&cfg)?;
        let (varmap, net) = setup::build_backbone(&cfg, &device)?;
        let frozen = setup::frozen_view(&cfg, &varmap, &device)?;
        let attention = match &cfg.model.attention_weights {
            Some(p) => Some(crate::mixmodel::load_attention(Path::new(p), &device)?),
            None => None,
        };
        let mut sgd = Sgd::new(
            train::sgd::trainable_vars(&varmap, backbones::is_buffer),
            sgd_options(&cfg),
        )?;
        let state: RunState<Vec<(usize, f64)>> = restore_or_start(
            &cfg,
            &device,
            &work_dir,
            resume,
            &[("model.", &varmap)],
            &mut sgd,
        )?;
        Ok(Self {
            methods: setup::build_methods(&cfg)?,
            picker: setup::mode_picker(&cfg),
            loss: setup::head_loss(&cfg),
            cfg,
            device,
            varmap,
            net,
            frozen,
            attention,
            sgd,
            mix_rng: state.mix_rng,
            train_data,
            test_data,
            work_dir,
            logger: state.logger,
            history: state.history,
            start_epoch: state.start_epoch,
        })
    }

    fn train(mut self, args: &TrainArgs) -> Result<()> {
        let max_epochs = self.cfg.max_epochs;
        let last_epoch = match args.stop_after {
            Some(n) => (self.start_epoch + n).min(max_epochs),
            None => max_epochs,
        };
        for epoch in self.start_epoch..last_epoch {
            self.train_epoch(epoch, args.quiet)?;
            let done = epoch + 1;
            if done % self.cfg.evaluation.interval == 0 || done == max_epochs {
                self.evaluate(done)?;
            }
            if done % self.cfg.checkpoint.interval == 0 || done == max_epochs || done == last_epoch
            {
                self.save_checkpoint(done)?;
            }
        }
        if last_epoch == max_epochs {
            self.summarize()?;
        }
        Ok(())
    }

    fn train_epoch(&mut self, epoch: usize, quiet: bool) -> Result<()> {
        let c = &self.cfg;
        let lr = cosine_lr(epoch, c.max_epochs, c.optimizer.lr, c.lr_config.min_lr);
        let loader = epoch_loader(c, &self.train_data, epoch)?;
        let iters = loader.batches_per_epoch();
        let bar = progress_bar(iters, epoch, c.max_epochs, quiet);
        let mut meter = TrainMeter::new(&self.device)?;
        let mut data_wait = 0.0;
        let mut t_last = Instant::now();
        let mut t_fetch = Instant::now();
        for (it, batch) in loader.enumerate() {
            data_wait += t_fetch.elapsed().as_secs_f64();
            let (x, y) = cifar_data::to_device_batch(&batch, &self.device)?;
            let (loss, first) = self.mixed_step(&x, &y)?;
            let grads = loss.backward()?;
            self.sgd.step(&grads, lr)?;
            meter.add(&loss, &first, batch.len)?;
            bar.inc(1);
            let done = it + 1;
            if done % self.cfg.log.interval == 0 || done == iters {
                let elapsed = t_last.elapsed().as_secs_f64();
                let images = meter.images;
                let line = meter.flush(epoch + 1, done, lr, elapsed, data_wait)?;
                let loss_v = line.metrics[0].1;
                let ips = images as f64 / elapsed.max(1e-9);
                bar.set_message(format!("loss {loss_v:.4} lr {lr:.4} {ips:.0} img/s"));
                self.logger.write_train(&line)?;
                t_last = Instant::now();
                data_wait = 0.0;
            }
            t_fetch = Instant::now();
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// One batch: mixes `mix_repeat` times, returns the summed loss (each
    /// repeat divided by the repeat count) and the first repeat's outputs for logging.
    fn mixed_step(&mut self, x: &Tensor, y: &Tensor) -> Result<(Tensor, StepLog)> {
        let picks = self.picker.pick(&mut self.mix_rng);
        let scale = 1.0 / picks.len() as f64;
        let mix_model = NetMixModel {
            net: &self.frozen,
            attention: self.attention.as_ref(),
        };
        let mut total: Option<Tensor> = None;
        let mut first = None;
        for idx in picks {
            let mut ctx = MixContext::with_model(&mut self.mix_rng, &mix_model);
            let mixed = self.methods[idx].mix(x, y, &mut ctx)?;
            let logits = self
                .net
                .forward_mix(&mixed.images, true, mixed.feature_mix.as_ref())?;
            let loss = (train::loss::mixed_loss(&logits, &mixed.labels, self.loss)? * scale)?;
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
            if first.is_none() {
                first = Some(StepLog {
                    logits: logits.detach(),
                    labels: mixed.labels,
                });
            }
        }
        Ok((
            total.expect("at least one repeat"),
            first.expect("at least one repeat"),
        ))
    }

    fn evaluate(&mut self, epoch: usize) -> Result<()> {
        let (top1, top5) = evaluate(
            &self.net,
            &self.test_data,
            self.cfg.data.test_batch_size,
            &self.device,
        )?;
        let lr = cosine_lr(
            epoch - 1,
            self.cfg.max_epochs,
            self.cfg.optimizer.lr,
            self.cfg.lr_config.min_lr,
        );
        self.history.push((epoch, top1));
        let iters = self.test_data.len().div_ceil(self.cfg.data.test_batch_size);
        self.logger.write_val(
            epoch,
            iters,
            lr,
            &[("head0_top1".into(), top1), ("head0_top5".into(), top5)],
        )?;
        eprintln!(
            "epoch {epoch}/{}: top-1 {top1:.2}  top-5 {top5:.2}",
            self.cfg.max_epochs
        );
        Ok(())
    }

    fn save_checkpoint(&self, epoch: usize) -> Result<()> {
        let mut tensors = checkpoint::varmap_tensors(&self.varmap, "model.");
        tensors.extend(checkpoint::with_prefix(
            &self.sgd.state_tensors()?,
            "optim.",
        ));
        let iters = self.train_data.len().div_ceil(self.cfg.data.batch_size);
        let meta = checkpoint_meta(
            &self.cfg,
            epoch,
            iters,
            &self.mix_rng,
            &self.history,
            &self.logger,
        )?;
        checkpoint::save_epoch_checkpoint(
            &self.work_dir.0,
            epoch,
            &tensors,
            &meta,
            Some(self.cfg.checkpoint.max_keep),
        )?;
        Ok(())
    }

    fn summarize(&mut self) -> Result<()> {
        let summary = summary_json(
            &self.history,
            self.cfg.max_epochs,
            self.cfg.evaluation.median_window,
        );
        let fields: Vec<(&str, Value)> = SUMMARY_KEYS
            .iter()
            .map(|k| (*k, summary[*k].clone()))
            .collect();
        self.logger.write_fields(&fields)?;
        let path = self.work_dir.0.join("result.json");
        write_atomic(&path, &serde_json::to_string_pretty(&summary)?)?;
        println!("{}", serde_json::to_string(&summary)?);
        Ok(())
    }
}

const SUMMARY_KEYS: [&str; 6] = [
    "mode",
    "max_epochs",
    "median_top1",
    "median_top1_last_window",
    "median_window_epochs",
    "final_top1",
];

/// The final-metric record: median top-1 over the last `window + 1` epochs (the
/// upstream summarizer) and over the last `window` (the README's wording).
pub fn summary_json(history: &[(usize, f64)], max_epochs: usize, window: usize) -> Value {
    json!({
        "mode": "summary",
        "max_epochs": max_epochs,
        "median_top1": metrics::median_last_k(history, max_epochs, window),
        "median_top1_last_window": metrics::median_final_epochs(history, max_epochs, window),
        "median_window_epochs": [max_epochs.saturating_sub(window), max_epochs],
        "final_top1": history.last().map(|h| h.1),
    })
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// Top-1 and top-5 accuracy (%) of `net` in evaluation mode over `data`.
pub fn evaluate(
    net: &backbones::CifarResNet,
    data: &CifarSplit,
    batch_size: usize,
    device: &Device,
) -> Result<(f64, f64)> {
    let mut c1 = 0usize;
    let mut c5 = 0usize;
    for b in cifar_data::test_batches(data, batch_size) {
        let (x, y) = cifar_data::to_device_batch(&b, device)?;
        let logits = net.forward_t(&x, false)?;
        c1 += metrics::topk_correct(&logits, &y, 1)?;
        c5 += metrics::topk_correct(&logits, &y, 5.min(logits.dim(1)?))?;
    }
    let n = data.len().max(1) as f64;
    Ok((100.0 * c1 as f64 / n, 100.0 * c5 as f64 / n))
}

/// The first repeat's logits and labels, for the logged accuracies.
pub struct StepLog {
    logits: Tensor,
    labels: MixedLabels,
}

/// Train metrics accumulated on the device between log lines, so that the
/// training loop never waits on the host except when it writes a line.
struct TrainMeter {
    loss: Tensor,
    acc: Tensor,
    acc_mix: Tensor,
    mixed: bool,
    images: usize,
    iters: usize,
}

impl TrainMeter {
    fn new(device: &Device) -> Result<Self> {
        Ok(Self {
            loss: Tensor::zeros((), DType::F32, device)?,
            acc: Tensor::zeros((), DType::F32, device)?,
            acc_mix: Tensor::zeros((), DType::F32, device)?,
            mixed: false,
            images: 0,
            iters: 0,
        })
    }

    fn add(&mut self, loss: &Tensor, step: &StepLog, n: usize) -> Result<()> {
        let w = n as f64;
        self.loss = (&self.loss + (loss.detach().to_dtype(DType::F32)? * w)?)?;
        let correct = step
            .logits
            .argmax(1)?
            .eq(&step.labels.y_a)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        self.acc = (&self.acc + correct)?;
        if !step.labels.is_plain() {
            self.mixed = true;
            self.acc_mix =
                (&self.acc_mix + (metrics::acc_mix_tensor(&step.logits, &step.labels)? * w)?)?;
        }
        self.images += n;
        self.iters += 1;
        Ok(())
    }

    /// The averaged train line; resets the meter.
    fn flush(
        &mut self,
        epoch: usize,
        iter: usize,
        lr: f64,
        elapsed: f64,
        data_wait: f64,
    ) -> Result<train::log::TrainLine> {
        let n = self.images.max(1) as f64;
        let iters = self.iters.max(1) as f64;
        let mut metrics = vec![
            ("loss".to_string(), self.loss.to_scalar::<f32>()? as f64 / n),
            (
                "acc".to_string(),
                100.0 * self.acc.to_scalar::<f32>()? as f64 / n,
            ),
        ];
        if self.mixed {
            metrics.push((
                "acc_mix".to_string(),
                self.acc_mix.to_scalar::<f32>()? as f64 / n,
            ));
        }
        let line = train::log::TrainLine {
            epoch,
            iter,
            lr,
            memory_mb: peak_memory_mb(),
            data_time: data_wait / iters,
            metrics,
            time: elapsed / iters,
        };
        let device = self.loss.device().clone();
        *self = Self::new(&device)?;
        Ok(line)
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

/// The `env_info` string of the log's meta line.
pub fn env_info(device: &Device) -> String {
    format!(
        "mixbench {} | candle-core 0.11 | device {device:?} | threads {}",
        env!("CARGO_PKG_VERSION"),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}

/// SGD options of the config (spec §3.1).
pub fn sgd_options(cfg: &RunConfig) -> train::sgd::GroupOptions {
    train::sgd::GroupOptions {
        lr: train::sgd::GroupLr::Scale(1.0),
        weight_decay: cfg.optimizer.weight_decay,
        momentum: cfg.optimizer.momentum,
        nesterov: cfg.optimizer.nesterov,
    }
}

pub fn progress_bar(len: usize, epoch: usize, max_epochs: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{max_epochs}", epoch + 1));
    bar
}
