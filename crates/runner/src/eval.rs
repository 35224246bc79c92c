//! `runner eval`: a checkpoint's backbone on the CIFAR-10 test set — accuracy, calibration
//! (NLL, ECE), FGSM robustness and CIFAR-10-C corruptions computed on the fly — as one JSON
//! object. See `docs/evaluation.md`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use backbones::CifarResNet;
use bench_config::RunConfig;
use candle_core::{Device, Tensor, Var};
use cifar_data::{image_rng, CifarSplit, Corruption, U8Batch, IMAGE_BYTES, MEAN, STD};
use clap::Args;
use serde_json::{json, Map, Value};
use train::metrics;

use crate::output::{OutputFile, Replace};
use crate::setup;

/// Options of `runner eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The run's JSON config (for the backbone's architecture and the data dir); by default
    /// the config stored in the checkpoint.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The checkpoint whose backbone is evaluated (`model.*`, or `model_q.*` for AutoMix/SAMix).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Override `data.dir`.
    #[arg(long, value_name = "DIR")]
    pub data: Option<String>,
    /// Evaluate the first N test images only (default: all 10,000; the config's
    /// `data.limit_test` does not apply).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Images per forward pass (default: the config's `data.test_batch_size`); results do not
    /// depend on it.
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// FGSM step in pixel units (the attack moves every pixel by eps/255).
    #[arg(long, value_name = "E", default_value_t = 8.0)]
    pub fgsm_eps: f64,
    /// Comma-separated corruption names, `all` or `none`.
    #[arg(long, value_name = "LIST", default_value = "all")]
    pub corruptions: String,
    /// Comma-separated severities in 1..=5.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1,2,3,4,5"
    )]
    pub severities: Vec<usize>,
    /// Seed of the random corruptions (noise).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Also write the JSON object to this file (atomically; checked before the evaluation).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace `--out` if it exists.
    #[arg(long)]
    pub force: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// The corruptions named by `--corruptions`.
pub fn parse_corruptions(list: &str) -> Result<Vec<Corruption>> {
    match list.trim() {
        "all" => return Ok(Corruption::ALL.to_vec()),
        "none" | "" => return Ok(Vec::new()),
        _ => {}
    }
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim) {
        if name == "all" || name == "none" {
            bail!("--corruptions: `{name}` stands alone (got `{list}`); give `all`, `none` or a list of names");
        }
        let Some(c) = Corruption::from_name(name) else {
            let known: Vec<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
            bail!(
                "--corruptions: unknown corruption `{name}` (known: {}, or all / none)",
                known.join(", ")
            );
        };
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// The severities of `--severities`, sorted and without repeats.
fn check_severities(severities: &[usize]) -> Result<Vec<usize>> {
    if let Some(s) = severities.iter().find(|s| !(1..=5).contains(*s)) {
        bail!("--severities: {s} is not a severity (1..=5)");
    }
    let set: BTreeSet<usize> = severities.iter().copied().collect();
    if set.is_empty() {
        bail!("--severities: at least one severity is needed");
    }
    Ok(set.into_iter().collect())
}

/// `runner eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let corruptions = parse_corruptions(&args.corruptions)?;
    let severities = check_severities(&args.severities)?;
    if !args.fgsm_eps.is_finite() || args.fgsm_eps < 0.0 {
        bail!("--fgsm-eps: {} must be a finite value ≥ 0", args.fgsm_eps);
    }
    for (flag, value) in [("--limit", args.limit), ("--batch-size", args.batch_size)] {
        if value == Some(0) {
            bail!("{flag}: must be at least 1");
        }
    }
    let out = match &args.out {
        Some(path) => {
            let replace = if args.force {
                Replace::Always
            } else {
                Replace::Never
            };
            Some(OutputFile::check(
                "--out",
                path,
                replace,
                &[&args.checkpoint],
            )?)
        }
        None => None,
    };
    let device = crate::device::parse_device(&args.device)?;
    let (tensors, meta) = train::checkpoint::load_checkpoint(&args.checkpoint, &device)?;
    let (mut cfg, config_source) =
        config_for_checkpoint(args.config.as_deref(), &meta, &args.checkpoint)?;
    if let Some(d) = &args.data {
        cfg.data.dir = d.clone();
    }
    cfg.validate().with_context(|| config_source.clone())?;
    if !device.is_cuda() && cfg.train.precision == bench_config::Precision::Bf16 {
        // A network trained in bf16 on a GPU evaluates in f32 on the CPU (which has no bf16
        // path); the train config's precision is not the evaluation's, so say which ran.
        eprintln!("note: {config_source} trained in bf16; the CPU evaluates in f32");
        cfg.train.precision = bench_config::Precision::F32;
    }
    crate::device::configure_from(&device, &cfg.train).with_context(|| config_source.clone())?;

    let dir = Path::new(&cfg.data.dir);
    let test = cifar_data::load_test_limited(dir, args.limit)?;
    if test.is_empty() {
        bail!("data.dir {}: no test images", dir.display());
    }
    let classes = cfg.model.head.num_classes;
    if let Some(&max) = test.labels.iter().max() {
        if max as usize >= classes {
            bail!("model.head.num_classes: {classes} classes, but the test data has label {max}");
        }
    }

    let (varmap, _) = setup::build_backbone(&cfg, &device)?;
    // Every pass runs over detached weights: the FGSM backward then computes only the input
    // gradient, and no pass records a graph through the weights.
    let net = setup::frozen_view(&cfg, &varmap, &device)?;
    let prefix =
        crate::export::load_backbone(&varmap, &tensors, &args.checkpoint).with_context(|| {
            format!("the checkpoint does not match the backbone of {config_source}")
        })?;
    drop(tensors);

    let batch_size = args.batch_size.unwrap_or(cfg.data.test_batch_size);
    let progress = |msg: String| {
        if !args.quiet {
            let _ = writeln!(std::io::stderr(), "eval: {msg}");
        }
    };
    let n = test.len();

    let clean = clean_pass(&net, &test, batch_size, &device)?;
    progress(format!(
        "{n} images: top-1 {:.2}%, NLL {:.4}, ECE {:.4}",
        clean.top1, clean.nll, clean.ece
    ));

    let mut fgsm_correct = 0;
    for b in cifar_data::test_batches(&test, batch_size) {
        let (x, y) = cifar_data::to_device_batch(&b, &device)?;
        let adv = fgsm(&net, &x, &y, args.fgsm_eps)?;
        fgsm_correct += metrics::topk_correct(&net.forward_t(&adv, false)?, &y, 1)?;
    }
    let fgsm_top1 = metrics::accuracy_pct(fgsm_correct, n);
    progress(format!(
        "FGSM eps {}/255: top-1 {fgsm_top1:.2}%",
        args.fgsm_eps
    ));

    let mut per_corruption = Map::new();
    let mut corruption_means = Vec::new();
    for &c in &corruptions {
        let mut entry = Map::new();
        let mut values = Vec::new();
        for &s in &severities {
            let mut correct = 0;
            for (k, b) in cifar_data::test_batches(&test, batch_size).enumerate() {
                let corrupted = corrupt_batch(&b, k * batch_size, c, s, args.seed);
                let (x, y) = cifar_data::to_device_batch(&corrupted, &device)?;
                correct += metrics::topk_correct(&net.forward_t(&x, false)?, &y, 1)?;
            }
            let top1 = metrics::accuracy_pct(correct, n);
            progress(format!("{} severity {s}: top-1 {top1:.2}%", c.name()));
            entry.insert(s.to_string(), json!(top1));
            values.push(top1);
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        entry.insert("mean".into(), json!(mean));
        corruption_means.push(mean);
        per_corruption.insert(c.name().into(), Value::Object(entry));
    }
    if !corruption_means.is_empty() {
        let mean = corruption_means.iter().sum::<f64>() / corruption_means.len() as f64;
        per_corruption.insert("mean".into(), json!(mean));
    }

    let report = json!({
        "checkpoint": args.checkpoint.display().to_string(),
        "config": config_source,
        "backbone_prefix": prefix,
        "images": n,
        "top1": clean.top1,
        "top5": clean.top5,
        "nll": clean.nll,
        "ece": clean.ece,
        "fgsm": {"eps": args.fgsm_eps, "top1": fgsm_top1},
        "corruptions": Value::Object(per_corruption),
        "seed": args.seed,
    });
    let text = serde_json::to_string_pretty(&report)? + "\n";
    // Printed first: a file that cannot be written after all never costs the evaluation.
    print!("{text}");
    std::io::stdout().flush()?;
    if let Some(out) = &out {
        out.write(|tmp| std::fs::write(tmp, &text).map_err(Into::into))?;
    }
    Ok(())
}

/// The config to rebuild a checkpoint's network with, and how to name it in messages and
/// reports: the `--config` file when given, else the config the runner stored in the
/// checkpoint (which always matches the trained network).
pub fn config_for_checkpoint(
    config: Option<&Path>,
    meta: &Value,
    checkpoint: &Path,
) -> Result<(RunConfig, String)> {
    match config {
        Some(p) => Ok((RunConfig::load(p)?, p.display().to_string())),
        None => match crate::export::checkpoint_config(meta, checkpoint)? {
            Some(cfg) => Ok((cfg, format!("{} (stored config)", checkpoint.display()))),
            None => bail!(
                "--config: {} stores no config (not written by the runner); pass the run's --config",
                checkpoint.display()
            ),
        },
    }
}

/// Accuracy and calibration on clean images.
struct Clean {
    top1: f64,
    top5: f64,
    nll: f64,
    ece: f64,
}

fn clean_pass(
    net: &CifarResNet,
    data: &CifarSplit,
    batch_size: usize,
    device: &Device,
) -> Result<Clean> {
    let k5 = 5.min(net.num_classes());
    let (mut c1, mut c5) = (0, 0);
    let mut samples = Vec::with_capacity(data.len());
    for b in cifar_data::test_batches(data, batch_size) {
        let (x, y) = cifar_data::to_device_batch(&b, device)?;
        let logits = net.forward_t(&x, false)?;
        let c = metrics::topk_corrects(&logits, &y, &[1, k5])?;
        c1 += c[0];
        c5 += c[1];
        samples.extend(metrics::calibration_samples(&logits, &y)?);
    }
    let n = data.len();
    Ok(Clean {
        top1: metrics::accuracy_pct(c1, n),
        top5: metrics::accuracy_pct(c5, n),
        nll: metrics::mean_nll(&samples),
        ece: metrics::expected_calibration_error(&samples, metrics::ECE_BINS),
    })
}

/// One FGSM step (Goodfellow et al. 2015) on normalized images `x`:
/// `x + (eps/255)/std_c · sign(∇ₓ CE)`, clipped so the de-normalized image stays in `[0, 1]`.
/// `net` runs in evaluation mode (BatchNorm's running statistics, which it leaves unchanged)
/// and should be built over detached weights (`setup::frozen_view`) so the backward computes
/// only the input gradient.
pub fn fgsm(net: &CifarResNet, x: &Tensor, y: &Tensor, eps: f64) -> Result<Tensor> {
    let device = x.device();
    let input = Var::from_tensor(&x.detach())?;
    let logits = net.forward_t(input.as_tensor(), false)?;
    // The summed loss: only the gradient's sign is used, and the sum keeps each sample's
    // gradient as large as on its own (a mean would scale it down by the batch size).
    let loss = (candle_nn::loss::cross_entropy(&logits, y)? * x.dim(0)? as f64)?;
    let grads = loss.backward()?;
    let grad = grads
        .get(input.as_tensor())
        .context("FGSM: no gradient reached the input images")?;
    // Per channel, in the normalized units of `cifar_data::to_device_batch`.
    let per_channel = |f: &dyn Fn(usize) -> f32| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            (0..3).map(f).collect::<Vec<f32>>(),
            (1, 3, 1, 1),
            device,
        )?)
    };
    let scaled = |v: f32| (v as f64 * 255.0) as f32;
    let step = per_channel(&|c| (eps / scaled(STD[c]) as f64) as f32)?;
    let lo = per_channel(&|c| (0.0 - scaled(MEAN[c])) / scaled(STD[c]))?;
    let hi = per_channel(&|c| (255.0 - scaled(MEAN[c])) / scaled(STD[c]))?;
    let adv = (x + grad.sign()?.broadcast_mul(&step)?)?;
    Ok(adv.broadcast_maximum(&lo)?.broadcast_minimum(&hi)?.detach())
}

/// Batch `b` (whose first image is test image `start`) under corruption `c` at severity `s`,
/// every image with its own generator ([`cifar_data::image_rng`]), on the process's threads.
fn corrupt_batch(b: &U8Batch, start: usize, c: Corruption, s: usize, seed: u64) -> U8Batch {
    let threads = rayon::current_num_threads().clamp(1, b.len.max(1));
    let per_thread = b.len.div_ceil(threads).max(1);
    let mut pixels = vec![0u8; b.pixels.len()];
    std::thread::scope(|scope| {
        for (t, chunk) in pixels.chunks_mut(per_thread * IMAGE_BYTES).enumerate() {
            scope.spawn(move || {
                for (k, out) in chunk.chunks_mut(IMAGE_BYTES).enumerate() {
                    let i = t * per_thread + k;
                    let mut rng = image_rng(seed, c, s, (start + i) as u64);
                    out.copy_from_slice(&c.apply(b.image(i), s, &mut rng));
                }
            });
        }
    });
    U8Batch {
        pixels,
        labels: b.labels.clone(),
        len: b.len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn corruption_lists_parse() {
        assert_eq!(
            parse_corruptions("all").unwrap().len(),
            Corruption::ALL.len()
        );
        assert!(parse_corruptions("none").unwrap().is_empty());
        assert_eq!(
            parse_corruptions("contrast, gaussian_noise,contrast").unwrap(),
            vec![Corruption::Contrast, Corruption::GaussianNoise]
        );
        let err = parse_corruptions("fog").unwrap_err().to_string();
        assert!(err.contains("fog") && err.contains("pixelate"), "{err}");
        let err = parse_corruptions("all,none").unwrap_err().to_string();
        assert!(err.contains("`all` stands alone"), "{err}");
        assert_eq!(check_severities(&[3, 1, 3]).unwrap(), vec![1, 3]);
        assert!(check_severities(&[0]).is_err());
        assert!(check_severities(&[6]).is_err());
    }

    #[test]
    fn corrupted_batches_do_not_depend_on_batching() {
        let images: Vec<u8> = (0..5 * IMAGE_BYTES).map(|k| (k * 7 % 251) as u8).collect();
        let split = CifarSplit {
            images,
            labels: vec![0, 1, 2, 3, 4],
        };
        let whole: Vec<u8> = cifar_data::test_batches(&split, 5)
            .flat_map(|b| corrupt_batch(&b, 0, Corruption::ShotNoise, 2, 9).pixels)
            .collect();
        let pieces: Vec<u8> = cifar_data::test_batches(&split, 2)
            .enumerate()
            .flat_map(|(k, b)| corrupt_batch(&b, 2 * k, Corruption::ShotNoise, 2, 9).pixels)
            .collect();
        assert_eq!(whole, pieces);
        assert_ne!(whole, split.images);
    }

    /// The attack moves every pixel by at most eps/255 (exactly, where the gradient is
    /// non-zero and no clipping happens), stays in the image range, and leaves the model as
    /// it was.
    #[test]
    fn fgsm_moves_pixels_by_eps_within_range() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let cfg = backbones::CifarResNetConfig {
            base_width: 4,
            stage_blocks: Some([1, 1, 1, 1]),
            // Not the benchmark's zero-initialised residual branches: through those, only the
            // pixels under the stride-8 grid of the shortcut convolutions would get a gradient.
            init: backbones::InitScheme::PytorchDefault,
            ..Default::default()
        };
        let net =
            CifarResNet::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        net.init_weights(&varmap, 1).unwrap();
        let pixels: Vec<u8> = (0..4 * IMAGE_BYTES).map(|k| (k * 13 % 256) as u8).collect();
        let b = U8Batch {
            pixels: pixels.clone(),
            labels: vec![0, 1, 2, 3],
            len: 4,
        };
        let (x, y) = cifar_data::to_device_batch(&b, &dev).unwrap();
        let adv = fgsm(&net, &x, &y, 8.0).unwrap();
        let moved = cifar_data::denormalize_to_u8(&adv).unwrap();
        let mut changed = 0;
        for (&a, &p) in moved.iter().zip(&pixels) {
            let d = (a as i32 - p as i32).abs();
            assert!(d <= 8, "moved by {d}");
            changed += (d == 8) as usize;
        }
        assert!(
            changed > pixels.len() / 2,
            "{changed} of {} moved by eps",
            pixels.len()
        );
        // eps = 0 is the clean image.
        let same = fgsm(&net, &x, &y, 0.0).unwrap();
        assert_eq!(cifar_data::denormalize_to_u8(&same).unwrap(), pixels);
    }
}
