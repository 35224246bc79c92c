//! `runner preview`: one batch mixed by every method, drawn as a PNG grid —
//! originals, partners, masks (weight of the original) and mixed images, with λ.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench_config::RunConfig;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use mix_ops::{Lambda, MixContext, Mixed};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::canvas::Canvas;
use crate::mixmodel::NetMixModel;
use crate::output::{OutputFile, Replace, PNG_SIGNATURE};
use crate::setup;

/// Options of `runner preview`.
#[derive(Debug, Clone, Args)]
pub struct PreviewArgs {
    /// Config whose backbone, data dir and mix_args are used (default: built-in defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output PNG (an earlier preview at the path is replaced; any other file needs --force).
    #[arg(long, default_value = "preview.png")]
    pub out: PathBuf,
    /// Replace `--out` whatever it holds (never the checkpoint being read).
    #[arg(long)]
    pub force: bool,
    /// Comma-separated modes (default: every hand-crafted mode; attentivemix
    /// only with --attention-weights).
    #[arg(long, value_delimiter = ',')]
    pub modes: Option<Vec<String>>,
    /// Data directory (overrides the config's `data.dir`).
    #[arg(long, value_name = "DIR")]
    pub data: Option<String>,
    /// Checkpoint whose `model.` weights drive PuzzleMix's saliency (default: freshly
    /// initialised); without --config its stored config builds the network.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Safetensors attention network for AttentiveMix+.
    #[arg(long)]
    pub attention_weights: Option<PathBuf>,
    /// Images per row (2..=10; one per class so partners are identifiable).
    #[arg(long, default_value_t = 6)]
    pub samples: usize,
    /// Seed of the mixing draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Use this λ instead of drawing it (for figures; box methods still round it to pixels;
    /// methods whose λ is not a Beta draw — PuzzleMix, ResizeMix, SmoothMix — say they ignore it).
    #[arg(long, value_name = "LAMBDA")]
    pub lam: Option<f64>,
    /// Keep the first partner draw even when it pairs a sample with itself (by default a row
    /// is drawn again, up to 50 times, until every sample has another partner).
    #[arg(long)]
    pub allow_self_pairs: bool,
}

const SCALE: usize = 2;
const TILE: usize = 32 * SCALE;
const GAP: usize = 4;
const LABEL_W: usize = 112;

/// Entry point of `runner preview`.
pub fn run(args: &PreviewArgs) -> Result<()> {
    if !(2..=10).contains(&args.samples) {
        bail!("--samples: must be between 2 and 10, got {}", args.samples);
    }
    if let Some(l) = args.lam {
        if !(0.0..=1.0).contains(&l) {
            bail!("--lam: must lie in [0, 1], got {l}");
        }
    }
    let replace = if args.force {
        Replace::Always
    } else {
        Replace::IfStartsWith(PNG_SIGNATURE)
    };
    let sources: Vec<&Path> = args.checkpoint.iter().map(PathBuf::as_path).collect();
    let out = OutputFile::check("--out", &args.out, replace, &sources)?;
    let device = crate::device::parse_device(&args.device)?;
    // The checkpoint's own config rebuilds its network unless --config names one.
    let checkpoint = match &args.checkpoint {
        Some(p) => Some((p, train::checkpoint::load_checkpoint(p, &device)?)),
        None => None,
    };
    let mut cfg = match (&args.config, &checkpoint) {
        (Some(p), _) => RunConfig::load(p)?,
        (None, Some((p, (_, meta)))) => crate::eval::config_for_checkpoint(None, meta, p)?.0,
        (None, None) => RunConfig::default(),
    };
    if let Some(d) = &args.data {
        cfg.data.dir = d.clone();
    }
    let config_mode = cfg.model.mix_mode.to_vec()[0].clone();
    let (images, labels) = one_per_class(Path::new(&cfg.data.dir), args.samples, &device)?;

    let (varmap, _) = setup::build_backbone(&cfg, &device)?;
    let learned = match setup::LEARNED_MODES.contains(&config_mode.as_str()) {
        true => Some(crate::setup::build_automix_model(&cfg, &device)?),
        false => None,
    };
    if let Some((ckpt, (tensors, _))) = &checkpoint {
        let ckpt = ckpt.as_path();
        match &learned {
            Some(model) => {
                for (prefix, vm) in model.varmaps() {
                    train::checkpoint::load_varmap(vm, tensors, prefix, ckpt)?;
                }
            }
            None => train::checkpoint::load_varmap(&varmap, tensors, "model.", ckpt)?,
        }
    }
    let attention = match &args.attention_weights {
        Some(p) => Some(crate::mixmodel::load_attention(p, &device)?),
        None => None,
    };
    let modes: Vec<String> = match &args.modes {
        Some(m) => m.clone(),
        // An AutoMix/SAMix config previews its learned masks.
        None if setup::LEARNED_MODES.contains(&config_mode.as_str()) => vec![config_mode.clone()],
        None => mix_ops::registry::MIX_MODES
            .iter()
            .filter(|m| !setup::LEARNED_MODES.contains(m))
            .filter(|m| **m != "attentivemix" || attention.is_some())
            .map(|m| m.to_string())
            .collect(),
    };
    if args.checkpoint.is_none() && modes.iter().any(|m| m == "puzzlemix") {
        // A freshly initialised network (zero-init residual BN) gives near-zero, tied
        // saliency, so the transport leaves many cells empty: not what training sees.
        eprintln!(
            "warning: PuzzleMix's saliency comes from an untrained network here, so its row shows large flat areas; pass --checkpoint of a trained run for a representative picture"
        );
    }
    let frozen = setup::frozen_view(&cfg, &varmap, &device)?;
    // α per mode: the config's for its own modes, the benchmark value for the rest.
    let config_alphas: Vec<(String, f64)> = cfg
        .model
        .mix_mode
        .to_vec()
        .into_iter()
        .zip(setup::alphas(&cfg))
        .collect();
    let backbone = match cfg.model.backbone.arch {
        bench_config::Arch::Resnet18 => "r18",
        bench_config::Arch::Resnext50 => "rx50",
    };
    let mix_model = NetMixModel {
        net: &frozen,
        attention: attention.as_ref(),
    };

    let n = args.samples;
    let row_h = TILE + 12 + GAP * 2;
    let width = LABEL_W + n * (4 * TILE + 3 * 2 + GAP * 3) + GAP;
    let mut canvas = Canvas::new(width, 20 + modes.len() * row_h, [255, 255, 255]);
    canvas.text(
        "per sample: original | partner | mask (weight of original) | mixed",
        GAP,
        6,
        [0, 0, 0],
    );
    for (row, mode) in modes.iter().enumerate() {
        let alpha = config_alphas
            .iter()
            .find(|(m, _)| m == mode)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| mix_ops::registry::default_alpha(mode, backbone).unwrap_or(1.0));
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed.wrapping_add(row as u64));
        let own = labels.to_vec1::<u32>()?;
        let mut attempts = 0;
        let (mixed, used_lam) = loop {
            attempts += 1;
            let (mixed, used_lam) = if setup::LEARNED_MODES.contains(&mode.as_str()) {
                let Some(model) = &learned else {
                    bail!(
                        "--modes: `{mode}` previews need an {mode} config (and its --checkpoint)"
                    );
                };
                (model.masks_for_preview(&images, &labels, &mut rng)?, false)
            } else {
                let method =
                    mix_ops::registry::build_method(mode, alpha, cfg.model.mix_args.get(mode))
                        .with_context(|| format!("--modes: {mode}"))?;
                let mut ctx = MixContext::with_model(&mut rng, &mix_model);
                ctx.fixed_lambda = args.lam;
                let mixed = method
                    .mix(&images, &labels, &mut ctx)
                    .with_context(|| format!("preview of {mode}"))?;
                (mixed, ctx.used_fixed_lambda)
            };
            // A sample paired with itself shows no mixing at all: draw the row again (the
            // same random stream, continued), unless asked not to. Vanilla never pairs.
            let partners = mixed.labels.y_b.to_vec1::<u32>()?;
            let self_pairs = own.iter().zip(&partners).filter(|(a, b)| a == b).count();
            if self_pairs == 0 || args.allow_self_pairs || mode == "vanilla" || attempts == 50 {
                break (mixed, used_lam);
            }
        };
        if args.lam.is_some() && !used_lam && mode != "vanilla" {
            eprintln!("note: {mode} ignores --lam (its λ is not a Beta draw); its row shows the λ it made");
        }
        draw_row(
            &mut canvas,
            20 + row * row_h,
            mode,
            alpha,
            &images,
            &labels,
            &mixed,
        )?;
    }
    out.write(|tmp| canvas.save_png(tmp))?;
    println!(
        "wrote {} ({} modes × {n} samples)",
        args.out.display(),
        modes.len()
    );
    Ok(())
}

/// The first test image of each of the first `n` classes: distinct labels make
/// the partner of every sample readable from `y_b`.
fn one_per_class(dir: &Path, n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let test = cifar_data::load_test(dir)?;
    let mut pixels = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for class in 0..n as u8 {
        let i = (0..test.len())
            .find(|&i| test.labels[i] == class)
            .with_context(|| format!("{}: no test image of class {class}", dir.display()))?;
        pixels.extend_from_slice(test.image(i));
        labels.push(class as u32);
    }
    let batch = cifar_data::U8Batch {
        pixels,
        labels,
        len: n,
    };
    Ok(cifar_data::to_device_batch(&batch, device)?)
}

fn draw_row(
    canvas: &mut Canvas,
    y0: usize,
    mode: &str,
    alpha: f64,
    images: &Tensor,
    labels: &Tensor,
    mixed: &Mixed,
) -> Result<()> {
    let n = images.dim(0)?;
    let originals = cifar_data::denormalize_to_u8(images)?;
    let shown = match &mixed.feature_mix {
        // ManifoldMix mixes inside the network; show its input-level equivalent.
        Some(fm) => mix_ops::mixup::mixup_blend(images, &fm.perm, fm.lambda)?,
        None => mixed.images.clone(),
    };
    let mixed_u8 = cifar_data::denormalize_to_u8(&shown)?;
    let partner_ids = mixed.labels.y_b.to_vec1::<u32>()?;
    let own_ids = labels.to_vec1::<u32>()?;
    let lambdas: Vec<f64> = match &mixed.labels.lambda {
        Lambda::Scalar(l) => vec![*l; n],
        Lambda::PerSample(t) => t.to_dtype(DType::F64)?.to_vec1()?,
    };
    let masks: Vec<f32> = match (&mixed.mask, &mixed.feature_mix) {
        (Some(m), _) => m
            .to_dtype(DType::F32)?
            .broadcast_as((n, 1, 32, 32))?
            .flatten_all()?
            .to_vec1()?,
        (None, Some(fm)) => vec![fm.lambda as f32; n * 1024],
        (None, None) => lambdas.iter().flat_map(|&l| vec![l as f32; 1024]).collect(),
    };
    canvas.text(mode, GAP, y0 + TILE / 2 - 8, [0, 0, 0]);
    let sub = match &mixed.feature_mix {
        Some(fm) => format!("a={alpha} L{}", fm.layer),
        None => format!("a={alpha}"),
    };
    canvas.text(&sub, GAP, y0 + TILE / 2 + 4, [90, 90, 90]);
    for i in 0..n {
        let x0 = LABEL_W + i * (4 * TILE + 3 * 2 + GAP * 3);
        let partner = own_ids
            .iter()
            .position(|&id| id == partner_ids[i])
            .unwrap_or(i);
        let tiles_x = |k: usize| x0 + k * (TILE + 2);
        canvas.blit_chw(
            &originals[i * 3072..(i + 1) * 3072],
            32,
            32,
            tiles_x(0),
            y0,
            SCALE,
        );
        canvas.blit_chw(
            &originals[partner * 3072..(partner + 1) * 3072],
            32,
            32,
            tiles_x(1),
            y0,
            SCALE,
        );
        canvas.blit_gray(
            &masks[i * 1024..(i + 1) * 1024],
            32,
            32,
            tiles_x(2),
            y0,
            SCALE,
        );
        // An all-white mask (all original) would vanish into the background.
        canvas.frame(tiles_x(2), y0, TILE, TILE, [160, 160, 160]);
        canvas.blit_chw(
            &mixed_u8[i * 3072..(i + 1) * 3072],
            32,
            32,
            tiles_x(3),
            y0,
            SCALE,
        );
        canvas.text(
            &format!("lam={:.3}", lambdas[i]),
            tiles_x(1),
            y0 + TILE + 3,
            [0, 0, 160],
        );
    }
    Ok(())
}
