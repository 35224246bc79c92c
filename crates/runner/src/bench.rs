//! `runner bench`: train-step throughput, mixing cost and data-loading speed, as JSON.
//!
//! Every figure of one invocation is measured in the same process on the same
//! machine, so the ratios it prints (mixing vs. a step, a method's step vs. a
//! vanilla step) are the numbers to quote.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use bench_config::{Arch, RunConfig};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use mix_ops::MixContext;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use train::sgd::Sgd;

use crate::mixmodel::NetMixModel;
use crate::setup;

/// Options of `runner bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// `resnet18` or `resnext50`.
    #[arg(long, default_value = "resnet18")]
    pub arch: String,
    /// Images per step.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Channels of the stem (64 = the real network).
    #[arg(long, default_value_t = 64)]
    pub base_width: usize,
    /// Comma-separated modes whose whole train step is timed (`automix` and
    /// `samix` included: their step runs the momentum encoder and MixBlock too).
    #[arg(long, value_delimiter = ',', default_value = "vanilla,mixup,cutmix")]
    pub step_modes: Vec<String>,
    /// Comma-separated modes whose mixing alone is timed (`all` = every hand-crafted mode).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub mix_modes: Vec<String>,
    /// Timed steps per mode (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// CIFAR-10 directory for the load+augment measurement (skipped when absent).
    #[arg(long, value_name = "DIR")]
    pub data: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Loader threads for the load+augment measurement.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Arithmetic of convolutions and matmuls: `f32`, `tf32` or `bf16` (as
    /// `train.precision`; on the CPU f32 and tf32 both compute in f32, and bf16 is refused
    /// unless MIXBENCH_CPU_BF16=emulate).
    #[arg(long, default_value = "tf32")]
    pub precision: crate::device::Precision,
    /// Restrict cuDNN to deterministic algorithms (as `train.deterministic`).
    #[arg(long)]
    pub deterministic: bool,
    /// Instead of timing, count the ops of one steady-state train step per `--step-modes`
    /// mode (candle tensors created per phase, autograd graph, gradient entries, custom-op
    /// calls and their CUDA launches) and print them with a digest of the weights, running
    /// statistics, momentum buffers and losses after `--steps` + 1 steps (see
    /// docs/performance.md, "Counting ops").
    #[arg(long)]
    pub count_ops: bool,
    /// Run the backbone's backward through candle's autograd (`forward_mix`) instead of the
    /// taped forward the runner trains with (`forward_train`), for before/after comparisons.
    #[arg(long)]
    pub autograd: bool,
}

/// Entry point of `runner bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let device = crate::device::parse_device(&args.device)?;
    crate::device::configure(&device, args.precision, args.deterministic, "--precision")?;
    let mut cfg = RunConfig::default();
    cfg.model.backbone.arch = match args.arch.as_str() {
        "resnet18" | "r18" => Arch::Resnet18,
        "resnext50" | "rx50" => Arch::Resnext50,
        other => bail!("--arch: unknown architecture `{other}` (resnet18 or resnext50)"),
    };
    cfg.model.backbone.base_width = args.base_width;
    if args.steps == 0 || args.batch == 0 {
        bail!("--steps and --batch must be positive");
    }
    let mut report = json!({
        "impl": "mixbench",
        "arch": args.arch,
        "device": args.device,
        "dtype": "f32",
        "precision": crate::device::precision_label(&device, args.precision),
        "deterministic": args.deterministic,
        "cudnn_conv": backbones::kernels::CUDNN_CONV,
        "batch": args.batch,
        "base_width": args.base_width,
        "threads": rayon_threads(),
        "backbone_backward": if args.autograd { "candle autograd" } else { "taped" },
    });

    let (x, y) = synthetic_batch(args.batch, &device)?;
    if args.count_ops {
        let mut counts = serde_json::Map::new();
        for mode in &args.step_modes {
            counts.insert(
                mode.clone(),
                count_train_step(&cfg, mode, (&x, &y), args.steps, &device, !args.autograd)?,
            );
        }
        report["count_ops"] = Value::Object(counts);
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut steps = serde_json::Map::new();
    let mut vanilla_ms = None;
    for mode in &args.step_modes {
        let StepTime {
            step_ms: ms,
            phase_ms,
            phase_cpu_utilisation,
        } = time_train_step(&cfg, mode, (&x, &y), args.steps, &device, !args.autograd)?;
        if mode == "vanilla" {
            vanilla_ms = Some(ms);
        }
        let mut entry = json!({
            "step_ms": ms,
            "images_per_s": args.batch as f64 * 1000.0 / ms,
            "epoch_s_estimate": 50_000.0 / args.batch as f64 * ms / 1000.0,
        });
        if let Some(p) = phase_ms {
            entry["phase_ms"] = p;
        }
        if let Some(u) = phase_cpu_utilisation {
            entry["phase_cpu_utilisation"] = u;
        }
        steps.insert(mode.clone(), entry);
    }
    if let Some(v) = vanilla_ms {
        for (_, s) in steps.iter_mut() {
            s["ratio_to_vanilla"] = json!(s["step_ms"].as_f64().unwrap() / v);
        }
    }
    report["train_step"] = Value::Object(steps);

    let mix_modes: Vec<String> = if args.mix_modes.iter().any(|m| m == "all") {
        mix_ops::registry::MIX_MODES
            .iter()
            .filter(|m| !setup::LEARNED_MODES.contains(m) && **m != "attentivemix")
            .map(|m| m.to_string())
            .collect()
    } else {
        args.mix_modes.clone()
    };
    let (varmap, _) = setup::build_backbone(&cfg, &device)?;
    let net = setup::frozen_view(&cfg, &varmap, &device)?;
    let mut mixing = serde_json::Map::new();
    for mode in &mix_modes {
        let ms = time_mixing(&net, mode, &x, &y, args.steps.max(5), &device)?;
        let mut entry = json!({ "mix_ms": ms });
        if let Some(v) = vanilla_ms {
            entry["fraction_of_vanilla_step"] = json!(ms / v);
        }
        if mode == "puzzlemix" {
            let parts = puzzlemix_parts(&net, &x, &y, args.steps.max(5), &device)?;
            if let Some(v) = vanilla_ms {
                // A PuzzleMix step is a vanilla step plus this mixing; with the mean over B it
                // is the ratio a long run averages, which the few timed steps only sample.
                let per_step = parts["saliency_ms"].as_f64().unwrap_or(f64::NAN)
                    + parts["masks_ms_mean"].as_f64().unwrap_or(f64::NAN);
                entry["expected_step_ratio_to_vanilla"] = json!(1.0 + per_step / v);
            }
            entry["parts"] = parts;
        }
        mixing.insert(mode.clone(), entry);
    }
    report["mixing"] = Value::Object(mixing);

    if let Some(dir) = &args.data {
        let train = cifar_data::load_train(Path::new(dir))?;
        let ips = cifar_data::bench_load_augment(&train, args.batch, args.workers, 100);
        report["load_augment_images_per_s"] = json!(ips);
        if let Some(v) = vanilla_ms {
            report["load_augment_fraction_of_vanilla_step"] =
                json!(args.batch as f64 / ips * 1000.0 / v);
        }
    }
    report["peak_rss_mb"] = json!(crate::session::peak_memory_mb());
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A uniform [-1, 1) random batch with labels cycling through the classes (seeded on CPU, so
/// `--count-ops` digests are reproducible).
fn synthetic_batch(n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let data: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|_| rand::Rng::random::<f32>(&mut rng) * 2.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(data, (n, 3, 32, 32), &Device::Cpu)?.to_device(device)?;
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    Ok((x, Tensor::from_vec(labels, n, device)?))
}

fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

/// The bench config of one mode: its benchmark α, and CE_soft for PuzzleMix (which needs it).
fn mode_config(cfg: &RunConfig, mode: &str) -> RunConfig {
    let mut cfg = cfg.clone();
    cfg.model.mix_mode = bench_config::OneOrMany::One(mode.to_string());
    // Each mode's benchmark α (resolved by `setup::alphas`).
    cfg.model.alpha = None;
    if mode == "puzzlemix" {
        cfg.model.head.loss = bench_config::HeadLoss::CeSoft;
    }
    cfg
}

/// What a timed or counted hand-crafted train step needs, built as the runner builds it.
struct HandCraftedStep {
    method: Box<dyn mix_ops::MixMethod>,
    loss_kind: train::loss::HeadLoss,
    net: backbones::CifarResNet,
    /// The backbone over detached weights (PuzzleMix's saliency pass).
    frozen: backbones::CifarResNet,
    sgd: Sgd,
    varmap: candle_nn::VarMap,
}

impl HandCraftedStep {
    fn new(cfg: &RunConfig, device: &Device) -> Result<Self> {
        let (varmap, net) = setup::build_backbone(cfg, device)?;
        Ok(Self {
            method: setup::build_methods(cfg)?.remove(0),
            loss_kind: setup::head_loss(cfg),
            frozen: setup::frozen_view(cfg, &varmap, device)?,
            sgd: Sgd::new(
                train::sgd::trainable_vars(&varmap, backbones::is_buffer),
                crate::net_step::sgd_options(cfg),
            )?,
            net,
            varmap,
        })
    }
}

/// One full train step (mix, forward, loss, backward, SGD): median milliseconds of `steps`, and
/// on the CPU the median of each phase.
fn time_train_step(
    cfg: &RunConfig,
    mode: &str,
    (x, y): (&Tensor, &Tensor),
    steps: usize,
    device: &Device,
    taped: bool,
) -> Result<StepTime> {
    let cfg = &mode_config(cfg, mode);
    if setup::LEARNED_MODES.contains(&mode) {
        return time_automix_step(cfg, x, y, steps, device);
    }
    let HandCraftedStep {
        method,
        loss_kind,
        net,
        frozen,
        mut sgd,
        ..
    } = HandCraftedStep::new(cfg, device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut phases = PhaseTimes::new(device, &["mix", "forward_and_loss", "backward", "sgd"]);
    for i in 0..=steps {
        sync(device)?;
        let mut clock = phases.start();
        let mix_model = NetMixModel {
            net: &frozen,
            attention: None,
        };
        let mixed = method.mix(x, y, &mut MixContext::with_model(&mut rng, &mix_model))?;
        clock.mark();
        let (logits, tape) = forward(&net, &mixed, taped)?;
        let loss = train::loss::mixed_loss(&logits, &mixed.labels, loss_kind)?;
        clock.mark();
        let mut grads = loss.backward()?;
        if let Some(tape) = tape {
            tape.add_to(&mut grads)?;
        }
        clock.mark();
        sgd.step(&grads, 0.1)?;
        clock.mark();
        let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        sync(device)?;
        if i > 0 {
            phases.record(clock);
        }
    }
    Ok(phases.summary())
}

/// Per-step wall time and, on the CPU, the wall and process CPU time of each phase (a phase
/// ends at a `mark`; on the CPU every op has finished when it returns, so reading the clocks
/// between phases costs nothing, while on a GPU it would need a sync, which changes what is
/// timed).
struct PhaseTimes {
    names: &'static [&'static str],
    per_phase: bool,
    threads: usize,
    steps: Vec<f64>,
    /// Per recorded step: `(wall ms, CPU ms)` of each phase.
    phases: Vec<Vec<(f64, Option<f64>)>>,
}

/// The clocks of one step in progress.
struct StepClock {
    start: Instant,
    per_phase: bool,
    /// `(wall ms since start, process CPU ms)` at the start and each mark.
    marks: Vec<(f64, Option<f64>)>,
}

impl StepClock {
    fn mark(&mut self) {
        if self.per_phase {
            self.marks.push((
                self.start.elapsed().as_secs_f64() * 1000.0,
                process_cpu_ms(),
            ));
        }
    }
}

impl PhaseTimes {
    fn new(device: &Device, names: &'static [&'static str]) -> Self {
        Self {
            names,
            per_phase: device.is_cpu(),
            threads: rayon_threads(),
            steps: Vec::new(),
            phases: Vec::new(),
        }
    }

    fn start(&self) -> StepClock {
        let mut clock = StepClock {
            start: Instant::now(),
            per_phase: self.per_phase,
            marks: Vec::new(),
        };
        clock.mark();
        clock
    }

    fn record(&mut self, clock: StepClock) {
        self.steps
            .push(clock.start.elapsed().as_secs_f64() * 1000.0);
        if self.per_phase {
            let phases = clock
                .marks
                .windows(2)
                .map(|w| (w[1].0 - w[0].0, w[1].1.zip(w[0].1).map(|(b, a)| b - a)))
                .collect();
            self.phases.push(phases);
        }
    }

    /// Median step time; on the CPU also `phase_ms` (median wall time of each phase) and
    /// `phase_cpu_utilisation`: per phase, the median of process CPU time / (wall time ×
    /// threads), 1 = every thread busy throughout. Rayon's idle workers spin briefly before
    /// they sleep, and that spinning counts as busy, so short parallel sections read high (a
    /// little above 1 even, with the calling thread on top of the pool's).
    fn summary(&self) -> StepTime {
        let step_ms = train::metrics::median(&self.steps);
        if !self.per_phase || self.phases.is_empty() {
            return StepTime {
                step_ms,
                phase_ms: None,
                phase_cpu_utilisation: None,
            };
        }
        let mut wall = serde_json::Map::new();
        let mut busy = serde_json::Map::new();
        for (k, name) in self.names.iter().enumerate() {
            let w: Vec<f64> = self.phases.iter().map(|p| p[k].0).collect();
            wall.insert(name.to_string(), json!(train::metrics::median(&w)));
            let u: Vec<f64> = self
                .phases
                .iter()
                .filter_map(|p| {
                    let (w, cpu) = p[k];
                    cpu.filter(|_| w > 0.0)
                        .map(|c| c / (w * self.threads as f64))
                })
                .collect();
            if !u.is_empty() {
                busy.insert(name.to_string(), json!(train::metrics::median(&u)));
            }
        }
        StepTime {
            step_ms,
            phase_ms: Some(Value::Object(wall)),
            phase_cpu_utilisation: (!busy.is_empty()).then_some(Value::Object(busy)),
        }
    }
}

/// CPU time of this process so far (every thread), in milliseconds; `None` where unsupported.
fn process_cpu_ms() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid, writable timespec for the duration of the call.
        let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } == 0;
        ok.then(|| t.tv_sec as f64 * 1000.0 + t.tv_nsec as f64 / 1e6)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The training forward of a bench step: taped (as the runner trains) or through candle's
/// autograd (`--autograd`).
fn forward(
    net: &backbones::CifarResNet,
    mixed: &mix_ops::Mixed,
    taped: bool,
) -> Result<(Tensor, Option<backbones::TapeGrads>)> {
    let mix = mixed.feature_mix.as_ref();
    Ok(if taped {
        net.forward_train(&mixed.images, mix)?
    } else {
        (net.forward_mix(&mixed.images, true, mix)?, None)
    })
}

/// Median step time, and on the CPU the median of each phase of it.
struct StepTime {
    step_ms: f64,
    phase_ms: Option<Value>,
    phase_cpu_utilisation: Option<Value>,
}

/// Milliseconds of one AutoMix/SAMix step (four forwards, backward, SGD, EMA update), and on
/// the CPU the median of each phase: `forwards_and_losses` (`Enc_k(x)`, the MixBlock twice,
/// `Enc_k(x_mb)`, `Enc_q(x)`, `Enc_q(x_bb)` and the losses), `backward` (the q encoder's two
/// full backwards, `Enc_k(x_mb)`'s input-only one and the MixBlock's), `sgd`, `momentum_update`.
fn time_automix_step(
    cfg: &RunConfig,
    x: &Tensor,
    y: &Tensor,
    steps: usize,
    device: &Device,
) -> Result<StepTime> {
    let model = crate::setup::build_automix_model(cfg, device)?;
    let mut sgd = crate::automix_step::optimizer(&model, cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut phases = PhaseTimes::new(
        device,
        &["forwards_and_losses", "backward", "sgd", "momentum_update"],
    );
    for i in 0..=steps {
        sync(device)?;
        let mut clock = phases.start();
        let out = model.train_step(x, y, &mut rng)?;
        clock.mark();
        let grads = out.gradients()?;
        clock.mark();
        sgd.step(&grads, 0.1)?;
        clock.mark();
        model.momentum_update(model.momentum_at(i, 1000))?;
        clock.mark();
        let _ = out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        sync(device)?;
        if i > 0 {
            phases.record(clock);
        }
    }
    Ok(phases.summary())
}

/// Milliseconds of the mixing call alone, median of `reps`.
fn time_mixing(
    net: &backbones::CifarResNet,
    mode: &str,
    x: &Tensor,
    y: &Tensor,
    reps: usize,
    device: &Device,
) -> Result<f64> {
    let alpha = mix_ops::registry::default_alpha(mode, "r18").unwrap_or(1.0);
    let method = mix_ops::registry::build_method(mode, alpha, None)?;
    let mix_model = NetMixModel {
        net,
        attention: None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (ms, _) = median_ms(reps, device, || {
        Ok(method
            .mix(x, y, &mut MixContext::with_model(&mut rng, &mix_model))?
            .images)
    })?;
    Ok(ms)
}

/// Median milliseconds of `reps` calls of `f` after one warm-up call, each until its tensor
/// is on the host (synced before the clock starts), and the last call's tensor.
fn median_ms(
    reps: usize,
    device: &Device,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<(f64, Tensor)> {
    let mut times = Vec::new();
    let mut last = None;
    for i in 0..=reps {
        sync(device)?;
        let t = Instant::now();
        let out = f()?;
        let _ = out.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        last = Some(out);
    }
    let last = last.expect("the warm-up call at least");
    Ok((train::metrics::median(&times), last))
}

/// PuzzleMix's mixing in its two parts, milliseconds: the saliency pass (median of `reps`),
/// and the rest of the call (`mix_with`: graph cuts, transport, patch moves) on that saliency
/// for each block count B (median of `reps` draws each). B is uniform over {2, 4, 8, 16} and
/// costs grow steeply with it, so `masks_ms_mean` (over B) is the expected per-step cost, which
/// `mix_ms`'s few random draws only sample.
fn puzzlemix_parts(
    net: &backbones::CifarResNet,
    x: &Tensor,
    y: &Tensor,
    reps: usize,
    device: &Device,
) -> Result<Value> {
    use mix_ops::puzzlemix::{saliency_from_gradient, PuzzleDraws, PuzzleMix};
    use mix_ops::MixModel;
    let model = NetMixModel {
        net,
        attention: None,
    };
    let (saliency_ms, saliency) = median_ms(reps, device, || {
        Ok(saliency_from_gradient(&model.input_gradient(x, y)?)?)
    })?;
    let method = PuzzleMix::default();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut by_blocks = serde_json::Map::new();
    let mut total = 0.0;
    for blocks in [2usize, 4, 8, 16] {
        // Each call draws α0 and π afresh (microseconds) with B fixed.
        let (ms, _) = median_ms(reps, device, || {
            let draws = PuzzleDraws {
                blocks,
                ..method.draw(&mut rng, x.dim(0)?)
            };
            Ok(method.mix_with(x, y, &saliency, &draws)?.0.images)
        })?;
        by_blocks.insert(blocks.to_string(), json!(ms));
        total += ms;
    }
    Ok(json!({
        "saliency_ms": saliency_ms,
        "masks_ms_by_blocks": by_blocks,
        "masks_ms_mean": total / 4.0,
    }))
}

/// The CPU kernels' thread pool size (`--threads`, `RAYON_NUM_THREADS`, or every core).
fn rayon_threads() -> usize {
    rayon::current_num_threads()
}

/// The id the next candle tensor will get. Tensor ids come from one process-wide counter that
/// every op creating a tensor (views included) advances by one; the probe itself takes one.
fn next_tensor_id() -> Result<u64> {
    let probe = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let id = format!("{:?}", probe.id());
    let digits: String = id.chars().filter(|c| c.is_ascii_digit()).collect();
    Ok(digits.parse::<u64>()? + 1)
}

/// Tensors created since `since` (a [`next_tensor_id`] value), not counting the probe.
fn tensors_since(since: u64) -> Result<u64> {
    Ok(next_tensor_id()? - since - 1)
}

fn custom_op_counts() -> (Value, u64, u64) {
    let mut m = serde_json::Map::new();
    let (mut calls, mut launches) = (0, 0);
    for c in backbones::kernels::op_counts() {
        if c.calls > 0 {
            m.insert(
                c.kind.name().to_string(),
                json!({ "calls": c.calls, "cuda_launches": c.cuda_launches }),
            );
        }
        // In-place ops (SGD, the CPU running update) create no tensor.
        use backbones::kernels::OpKind;
        if !matches!(c.kind, OpKind::Sgd | OpKind::SgdMulti | OpKind::BnRunning) {
            calls += c.calls;
        }
        launches += c.cuda_launches;
    }
    (Value::Object(m), calls, launches)
}

/// FNV-1a over the bits of every tensor, in the given (sorted) order.
fn digest(tensors: &[(String, Tensor)], losses: &[f32]) -> Result<String> {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    for (name, t) in tensors {
        eat(name.as_bytes());
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for x in v {
            eat(&x.to_bits().to_le_bytes());
        }
    }
    for l in losses {
        eat(&l.to_bits().to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

/// Op counts of one steady-state train step (the second of `steps + 1`), by phase, and a
/// digest of the state after all steps.
fn count_train_step(
    cfg: &RunConfig,
    mode: &str,
    (x, y): (&Tensor, &Tensor),
    steps: usize,
    device: &Device,
    taped: bool,
) -> Result<Value> {
    let cfg = &mode_config(cfg, mode);
    if setup::LEARNED_MODES.contains(&mode) {
        bail!("--count-ops: `{mode}` is not supported (hand-crafted modes only)");
    }
    let HandCraftedStep {
        method,
        loss_kind,
        net,
        frozen,
        mut sgd,
        varmap,
    } = HandCraftedStep::new(cfg, device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut losses = Vec::new();
    let mut counted = Value::Null;
    for i in 0..=steps.max(1) {
        let counting = i == 1;
        let mut phase = serde_json::Map::new();
        let mut mark = next_tensor_id()?;
        backbones::kernels::reset_op_counts();
        let mut end_phase = |name: &str, mark: &mut u64| -> Result<()> {
            let n = tensors_since(*mark)?;
            phase.insert(name.to_string(), json!(n));
            *mark = next_tensor_id()?;
            Ok(())
        };
        let mix_model = NetMixModel {
            net: &frozen,
            attention: None,
        };
        let mixed = method.mix(x, y, &mut MixContext::with_model(&mut rng, &mix_model))?;
        end_phase("mix", &mut mark)?;
        let (logits, tape) = forward(&net, &mixed, taped)?;
        end_phase("forward", &mut mark)?;
        let loss = train::loss::mixed_loss(&logits, &mixed.labels, loss_kind)?;
        end_phase("loss", &mut mark)?;
        let graph = if counting {
            graph_stats(&loss)
        } else {
            Value::Null
        };
        let mut grads = loss.backward()?;
        if let Some(tape) = tape {
            tape.add_to(&mut grads)?;
        }
        end_phase("backward", &mut mark)?;
        let grad_entries = grads.get_ids().count();
        sgd.step(&grads, 0.1)?;
        end_phase("sgd", &mut mark)?;
        losses.push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        if counting {
            let (custom, custom_calls, custom_launches) = custom_op_counts();
            let tensors: u64 = phase.values().filter_map(Value::as_u64).sum();
            let views = graph["view_nodes"].as_u64().unwrap_or(0);
            let op_views = backbones::kernels::op_views();
            counted = json!({
                "candle_tensors_created": tensors,
                "candle_tensors_by_phase": Value::Object(phase),
                "autograd_graph": graph,
                "grad_store_entries_kept": grad_entries,
                "custom_ops": custom,
                "custom_op_calls_creating_tensors": custom_calls,
                "custom_op_cuda_launches": custom_launches,
                "custom_op_backward_views": op_views,
                // Every created tensor except the forward graph's views, the views of our ops'
                // backward and our ops' outputs is taken as one launch; plus our ops' own
                // launches (see docs/performance.md, "Counting ops").
                "cuda_launch_estimate": tensors.saturating_sub(views + op_views + custom_calls)
                    + custom_launches,
            });
        }
    }
    let mut state: Vec<(String, Tensor)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let mut buffers: Vec<(String, Tensor)> = sgd.state_tensors()?.into_iter().collect();
    buffers.retain(|(k, _)| k != train::sgd::STEP_KEY);
    state.extend(buffers);
    state.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(json!({
        "counted_step": 1,
        "step": counted,
        "steps_run": steps.max(1) + 1,
        "losses": losses,
        "state_digest": digest(&state, &losses)?,
    }))
}

/// The autograd graph that `loss.backward()` walks: op nodes (of which views, i.e. nodes
/// sharing their storage with another node or a variable) and variables.
fn graph_stats(loss: &Tensor) -> Value {
    let nodes = loss.sorted_nodes();
    let mut storages: std::collections::HashMap<usize, u64> = Default::default();
    let mut variables = 0u64;
    for n in &nodes {
        if n.is_variable() {
            variables += 1;
        }
        let (st, _) = n.storage_and_layout();
        *storages.entry(&*st as *const _ as usize).or_default() += 1;
    }
    let op_nodes = nodes.len() as u64 - variables;
    let views: u64 = storages.values().map(|c| c - 1).sum();
    json!({
        "op_nodes": op_nodes,
        "view_nodes": views,
        "variables": variables,
    })
}
