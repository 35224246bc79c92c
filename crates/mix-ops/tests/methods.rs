//! Property tests of every hand-crafted method (method-checklist.md), over
//! several seeds, on seeded random normal batches.

mod common;

use common::*;
use mix_ops::boxes::CutBox;
use mix_ops::cutmix::{CutMix, CutMixArgs};
use mix_ops::fmix::{FMix, FMixArgs};
use mix_ops::gridmix::{grid_mask, pyslice, GridMix, GridParams};
use mix_ops::manifoldmix::ManifoldMix;
use mix_ops::mixup::MixUp;
use mix_ops::norm::{denormalize_to_u8, CIFAR10_MEAN, CIFAR10_STD};
use mix_ops::resizemix::{ResizeMix, ResizeMixArgs};
use mix_ops::saliency::{argmax_first, fine_grained_saliency};
use mix_ops::saliencymix::SaliencyMix;
use mix_ops::sample::{beta_lambda, permutation};
use mix_ops::smoothmix::{SmoothKernel, SmoothMix, SmoothMixArgs};
use mix_ops::vanilla::Vanilla;
use mix_ops::{MixContext, MixMethod, Mixed};
use rand::Rng;

const SEEDS: std::ops::Range<u64> = 0..12;

fn run(method: &dyn MixMethod, seed: u64, n: usize) -> (candle_core::Tensor, Mixed) {
    let (x, y) = batch(seed, n);
    let mut rng = rng(seed);
    let mixed = method.mix(&x, &y, &mut MixContext::new(&mut rng)).unwrap();
    assert_eq!(mixed.images.dims(), x.dims());
    (x, mixed)
}

#[test]
fn vanilla_leaves_everything_untouched() {
    let (x, mixed) = run(&Vanilla, 1, 8);
    assert!(mixed.labels.is_plain());
    assert_eq!(host4(&mixed.images), host4(&x));
    assert!(mixed.feature_mix.is_none() && mixed.mask.is_none());
}

#[test]
fn mixup_is_a_convex_blend() {
    for seed in SEEDS {
        let (x, mixed) = run(&MixUp::default(), seed, 8);
        let lambda = scalar_lambda(&mixed);
        assert!((0.0..=1.0).contains(&lambda));
        let keep = vec![lambda as f32; PIXELS];
        assert_blend(&x, &mixed.images, &perm_of(&mixed), &keep, 1e-6);
        let targets = mixed.labels.soft_targets(8).unwrap().sum(1).unwrap();
        for s in targets.to_vec1::<f32>().unwrap() {
            assert!((s - 1.0).abs() < 1e-6);
        }
    }
}

#[test]
fn cutmix_pastes_one_box_with_exact_lambda() {
    let method = CutMix::default();
    let mut clipped_or_empty = 0;
    for seed in 0..40 {
        let (x, mixed) = run(&method, seed, 8);
        let keep = mask_of(&mixed);
        let perm = perm_of(&mixed);
        assert_exact_paste(&x, &mixed.images, &perm, &keep);
        let kept = keep.iter().sum::<f32>() as f64 / PIXELS as f64;
        let lambda = scalar_lambda(&mixed);
        assert_eq!(lambda, kept, "λ' must equal the fraction of pixels from x");
        // Replaying the first draw gives the sampled λ, hence the unclipped side.
        let sampled = beta_lambda(&mut rng(seed), method.alpha);
        let side = 2 * (((32.0 * (1.0 - sampled).sqrt()) as usize) / 2);
        match taken_box(&keep) {
            None => {
                assert_eq!(lambda, 1.0);
                clipped_or_empty += 1;
            }
            Some((r1, r2, c1, c2, full)) => {
                assert!(full, "taken pixels must form one box");
                assert_eq!(lambda, 1.0 - ((r2 - r1) * (c2 - c1)) as f64 / 1024.0);
                assert!(r2 - r1 <= side && c2 - c1 <= side);
                if r1 > 0 && r2 < H {
                    assert_eq!(r2 - r1, side, "unclipped rows span the full side");
                } else {
                    clipped_or_empty += 1;
                }
                if c1 > 0 && c2 < W {
                    assert_eq!(c2 - c1, side);
                }
            }
        }
    }
    assert!(
        clipped_or_empty < 40,
        "some boxes must be unclipped for the test to bite"
    );
}

#[test]
fn cutmix_fixed_point_flag_changes_only_the_permutation() {
    let method = CutMix {
        alpha: 1.0,
        args: CutMixArgs {
            avoid_fixed_points: true,
        },
    };
    let mut fixed = 0;
    for seed in SEEDS {
        let (x, mixed) = run(&method, seed, 16);
        let perm = perm_of(&mixed);
        fixed += perm.iter().enumerate().filter(|(i, &p)| *i == p).count();
        assert_exact_paste(&x, &mixed.images, &perm, &mask_of(&mixed));
    }
    assert!(fixed <= 2, "{fixed} fixed points with avoidance on");
}

#[test]
fn manifoldmix_draws_layers_0_to_2_only() {
    let method = ManifoldMix::default();
    let (x, y) = batch(0, 4);
    let mut rng = rng(3);
    let mut seen = [0usize; 4];
    for _ in 0..600 {
        let mixed = method.mix(&x, &y, &mut MixContext::new(&mut rng)).unwrap();
        let fm = mixed.feature_mix.as_ref().expect("feature mix instruction");
        seen[fm.layer] += 1;
        assert_eq!(fm.lambda, scalar_lambda(&mixed));
        let perm: Vec<u32> = fm.perm.to_vec1().unwrap();
        assert_eq!(perm, mixed.labels.y_b.to_vec1::<u32>().unwrap());
        assert!(mixed.mask.is_none());
    }
    assert_eq!(seen[3], 0, "layer 3 must never be drawn");
    assert!(
        seen[..3].iter().all(|&c| c > 150),
        "layers 0..2 roughly uniform: {seen:?}"
    );
    let mixed = method.mix(&x, &y, &mut MixContext::new(&mut rng)).unwrap();
    assert_eq!(
        host4(&mixed.images),
        host4(&x),
        "images pass through unchanged"
    );
}

#[test]
fn smoothmix_gaussian_kernel_and_swapped_labels() {
    for seed in SEEDS {
        for correct_labels in [false, true] {
            let method = SmoothMix {
                alpha: 0.5,
                args: SmoothMixArgs { correct_labels },
            };
            let (x, mixed) = run(&method, seed, 8);
            let keep = mask_of(&mixed);
            let perm = perm_of(&mixed);
            // Replay the documented draw order: λ (unused), π, then the kernel.
            let mut replay = rng(seed);
            beta_lambda(&mut replay, 0.5);
            permutation(&mut replay, 8);
            let k = SmoothKernel::sample(&mut replay, H, W);
            assert!((-16..=15).contains(&k.dr) && (-16..=15).contains(&k.dc));
            assert!((8.0..16.0).contains(&k.sigma), "σ = {}", k.sigma);
            // Independent check of the kernel formula: peak at (15.5+dr, 15.5+dc).
            let (ci, cj) = (15.5 + k.dr as f64, 15.5 + k.dc as f64);
            let mut mean_k = 0.0;
            for r in 0..H {
                for c in 0..W {
                    let d2 = (r as f64 - ci).powi(2) + (c as f64 - cj).powi(2);
                    let want = (-d2 / (2.0 * k.sigma * k.sigma)).exp();
                    mean_k += want / PIXELS as f64;
                    assert!((1.0 - keep[r * W + c] as f64 - want).abs() < 1e-6);
                }
            }
            let peak = (0..PIXELS)
                .min_by(|&a, &b| keep[a].total_cmp(&keep[b]))
                .unwrap();
            assert!(((peak / W) as f64 - ci).abs() <= 0.5 && ((peak % W) as f64 - cj).abs() <= 0.5);
            assert_blend(&x, &mixed.images, &perm, &keep, 1e-5);
            let lambda = scalar_lambda(&mixed);
            let want = if correct_labels { 1.0 - mean_k } else { mean_k };
            assert!((lambda - want).abs() < 1e-9, "λ {lambda} vs {want}");
        }
    }
}

/// Dark normalized images, each with one moderately bright pixel (8-bit 140
/// on 13) at its own location: the unique saliency peak (see `saliency` tests).
fn spotted_batch(
    n: usize,
) -> (
    candle_core::Tensor,
    candle_core::Tensor,
    Vec<(usize, usize)>,
) {
    let spots: Vec<(usize, usize)> = (0..n)
        .map(|i| ((i * 7 + 3) % H, (i * 13 + 5) % W))
        .collect();
    let mut data = Vec::with_capacity(n * 3 * PIXELS);
    for &(r, c) in &spots {
        for ch in 0..3 {
            for p in 0..PIXELS {
                let v = if p == r * W + c { 0.55 } else { 0.05 };
                data.push(((v - CIFAR10_MEAN[ch]) / CIFAR10_STD[ch]) as f32);
            }
        }
    }
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Tensor::from_vec(data, (n, 3, H, W), &dev).unwrap();
    let y = candle_core::Tensor::arange(0u32, n as u32, &dev).unwrap();
    (x, y, spots)
}

#[test]
fn saliencymix_box_is_centred_on_the_partner_of_sample_0() {
    let method = SaliencyMix::default();
    let (x, y, spots) = spotted_batch(12);
    for seed in SEEDS {
        let mut r = rng(seed);
        let mixed = method.mix(&x, &y, &mut MixContext::new(&mut r)).unwrap();
        let perm = perm_of(&mixed);
        let keep = mask_of(&mixed);
        assert_exact_paste(&x, &mixed.images, &perm, &keep);
        let sampled = beta_lambda(&mut rng(seed), method.alpha);
        let side = (32.0 * (1.0 - sampled).sqrt()) as usize;
        let (rc, cc) = spots[perm[0]];
        let expected = CutBox::centred(rc, cc, side, side, H, W);
        let half = (side / 2) as i64;
        assert_eq!(expected.r1 as i64, (rc as i64 - half).max(0));
        assert_eq!(expected.c2 as i64, (cc as i64 + half).min(32));
        let taken: Vec<f32> = expected
            .mask(H, W)
            .iter()
            .map(|&m| 1.0 - m as f32)
            .collect();
        assert_eq!(keep, taken, "box must be centred at the spot of x[π[0]]");
        assert_eq!(scalar_lambda(&mixed), 1.0 - expected.area() as f64 / 1024.0);
    }
}

#[test]
fn saliencymix_on_random_images_uses_the_saliency_argmax() {
    let method = SaliencyMix::default();
    for seed in 0..4 {
        let (x, mixed) = run(&method, seed, 8);
        let perm = perm_of(&mixed);
        let img = x
            .get(perm[0])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let map =
            fine_grained_saliency(&denormalize_to_u8(&img, &CIFAR10_MEAN, &CIFAR10_STD), H, W);
        let peak = argmax_first(&map);
        let side = (32.0 * (1.0 - beta_lambda(&mut rng(seed), method.alpha)).sqrt()) as usize;
        let b = CutBox::centred(peak / W, peak % W, side, side, H, W);
        let taken: Vec<f32> = b.mask(H, W).iter().map(|&m| 1.0 - m as f32).collect();
        assert_eq!(mask_of(&mixed), taken);
        assert_eq!(scalar_lambda(&mixed), b.keep_fraction(H, W));
    }
}

#[test]
fn fmix_mask_has_lambda_pixels_and_label_is_sampled_lambda() {
    let method = FMix::default();
    for seed in 0..20 {
        let (x, mixed) = run(&method, seed, 8);
        let keep = mask_of(&mixed);
        let lambda = scalar_lambda(&mixed);
        let sum = keep.iter().sum::<f32>() as f64;
        let target = 1024.0 * lambda;
        assert!(
            sum == target.floor() || sum == target.ceil(),
            "sum {sum} vs 1024λ {target}"
        );
        let mut replay = rng(seed);
        let sampled: f64 = rand_distr::Distribution::sample(
            &rand_distr::Beta::new(0.2, 0.2).unwrap(),
            &mut replay,
        );
        assert_eq!(lambda, sampled, "label λ is the sampled λ");
        assert_exact_paste(&x, &mixed.images, &perm_of(&mixed), &keep);
    }
}

#[test]
fn fmix_masks_vary_along_columns_as_one_sinusoid() {
    // Upstream quirk: only column frequencies 0 and 1 survive, so each row of
    // the low-frequency image is a + b·cos(2πq/32 + φ): its DFT along columns
    // has no energy beyond frequency 1.
    let image = mix_ops::fmix::low_freq_image(&mut rng(5), H, W, 3.0);
    for r in 0..H {
        let row = &image[r * W..(r + 1) * W];
        for k in 2..=16 {
            let (mut re, mut im) = (0.0, 0.0);
            for (q, v) in row.iter().enumerate() {
                let a = 2.0 * std::f64::consts::PI * (k * q) as f64 / W as f64;
                re += v * a.cos();
                im += v * a.sin();
            }
            assert!(
                re.hypot(im) < 1e-9,
                "row {r} has energy at column frequency {k}"
            );
        }
    }
    assert_eq!(image.iter().copied().fold(f64::INFINITY, f64::min), 0.0);
    assert!((image.iter().copied().fold(0.0, f64::max) - 1.0).abs() < 1e-12);
}

#[test]
fn fmix_soft_and_reformulated_variants() {
    let method = FMix {
        alpha: 1.0,
        args: FMixArgs {
            max_soft: 0.1,
            reformulate: true,
            ..FMixArgs::default()
        },
    };
    for seed in SEEDS {
        let (x, mixed) = run(&method, seed, 8);
        let keep = mask_of(&mixed);
        assert!(keep.iter().all(|&k| (0.0..=1.0).contains(&k)));
        assert!(
            keep.iter().any(|&k| k > 0.0 && k < 1.0),
            "soft band present"
        );
        assert_blend(&x, &mixed.images, &perm_of(&mixed), &keep, 1e-5);
    }
    let bad = FMix::default();
    let (x, y) = batch(0, 2);
    let small = x.narrow(2, 0, 16).unwrap();
    let err = bad
        .mix(&small, &y, &mut MixContext::new(&mut rng(0)))
        .unwrap_err();
    assert!(err.to_string().contains("`size`"), "{err}");
}

#[test]
fn gridmix_binary_holes_from_partner_with_exact_lambda() {
    let method = GridMix::default();
    for seed in 0..30 {
        let (x, mixed) = run(&method, seed, 8);
        let keep = mask_of(&mixed);
        assert_exact_paste(&x, &mixed.images, &perm_of(&mixed), &keep);
        let holes = keep.iter().filter(|&&k| k == 0.0).count();
        assert_eq!(scalar_lambda(&mixed), 1.0 - holes as f64 / 1024.0);
        let mut replay = rng(seed);
        beta_lambda(&mut replay, method.alpha);
        let n: usize = replay.random_range(2..=6);
        assert!((2..=6).contains(&n));
    }
}

#[test]
fn gridmix_python_slices_wrap_negative_offsets() {
    assert_eq!(pyslice(-6, -2, 32), 26..30);
    assert!(pyslice(-3, 2, 32).is_empty());
    assert_eq!(pyslice(30, 40, 32), 30..32);
    assert_eq!(pyslice(-40, 3, 32), 0..3);
    // Crop 45×22 (area 1, aspect 0.5), n = 3 → 15-px cells, 7-px holes (λ = 0.75).
    let params = |ux: f64| GridParams {
        n: 3,
        area_ratio: 1.0,
        aspect: 0.5,
        offset: (ux, 0.0),
    };
    let holes = |mask: &[u8]| -> (Vec<usize>, Vec<usize>) {
        let rows = (0..H)
            .filter(|r| (0..W).any(|c| mask[r * W + c] == 1))
            .collect();
        let cols = (0..W)
            .filter(|c| (0..H).any(|r| mask[r * W + c] == 1))
            .collect();
        (rows, cols)
    };
    let rows: Vec<usize> = (0..7).chain(15..22).collect();
    // ux = 0.5: column offset −6; the first hole (−6..1) is an empty Python slice.
    let m = grid_mask(&params(0.5), 0.75, 1.0, H, W).unwrap();
    let cols: Vec<usize> = (9..16).chain(24..31).collect();
    assert_eq!(holes(&m), (rows.clone(), cols.clone()));
    assert_eq!(
        m.iter().map(|&v| v as usize).sum::<usize>(),
        rows.len() * cols.len()
    );
    // ux = 0.95: offset −12; the first hole (−12..−5) wraps to columns 20..27.
    let m = grid_mask(&params(0.95), 0.75, 1.0, H, W).unwrap();
    let cols: Vec<usize> = (3..10).chain(18..27).collect();
    assert_eq!(holes(&m), (rows.clone(), cols.clone()));
    assert_eq!(
        m.iter().map(|&v| v as usize).sum::<usize>(),
        rows.len() * cols.len()
    );
}

#[test]
fn resizemix_pastes_the_whole_partner_resized() {
    for (alpha, use_alpha) in [(1.0, true), (0.2, true), (1.0, false)] {
        let method = ResizeMix {
            alpha,
            args: ResizeMixArgs {
                use_alpha,
                ..ResizeMixArgs::default()
            },
        };
        for seed in SEEDS {
            let (x, mixed) = run(&method, seed, 8);
            let keep = mask_of(&mixed);
            let perm = perm_of(&mixed);
            let mut replay = rng(seed);
            permutation(&mut replay, 8);
            let tau = method.sample_tau(&mut replay);
            assert!((0.1..=0.8).contains(&tau), "τ = {tau}");
            let (r1, r2, c1, c2, full) = taken_box(&keep).expect("box is never empty (τ ≥ 0.1)");
            assert!(full);
            let side = 2 * (((32.0 * tau) as usize) / 2);
            assert!(r2 - r1 <= side && c2 - c1 <= side);
            let (bh, bw) = (r2 - r1, c2 - c1);
            assert_eq!(scalar_lambda(&mixed), 1.0 - (bh * bw) as f64 / 1024.0);
            let (xs, os) = (host4(&x), host4(&mixed.images));
            for i in 0..8 {
                for c in 0..3 {
                    for r in 0..H {
                        for col in 0..W {
                            let want = if (r1..r2).contains(&r) && (c1..c2).contains(&col) {
                                let sr = ((r - r1) * H / bh).min(H - 1);
                                let sc = ((col - c1) * W / bw).min(W - 1);
                                xs[perm[i]][c][sr][sc]
                            } else {
                                xs[i][c][r][col]
                            };
                            assert_eq!(os[i][c][r][col], want);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn methods_keep_dtype_and_work_in_bf16() {
    let methods: Vec<Box<dyn MixMethod>> = vec![
        Box::new(CutMix::default()),
        Box::new(FMix::default()),
        Box::new(SmoothMix::default()),
        Box::new(GridMix::default()),
        Box::new(ResizeMix::default()),
        Box::new(SaliencyMix::default()),
    ];
    let (x, y) = batch(9, 4);
    let x = x.to_dtype(candle_core::DType::BF16).unwrap();
    for m in methods {
        let mixed = m.mix(&x, &y, &mut MixContext::new(&mut rng(1))).unwrap();
        assert_eq!(
            mixed.images.dtype(),
            candle_core::DType::BF16,
            "{}",
            m.name()
        );
    }
}

/// `MixContext::fixed_lambda` pins λ (figures) without changing any later draw.
#[test]
fn a_fixed_lambda_is_used_and_leaves_the_rest_of_the_stream_alone() {
    use mix_ops::MixContext;
    use rand::{RngCore, SeedableRng};
    let device = candle_core::Device::Cpu;
    let images = candle_core::Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &device).unwrap();
    let labels = candle_core::Tensor::new(&[0u32, 1, 2, 3], &device).unwrap();
    // Methods whose label λ is the drawn λ itself (box methods re-derive it from the box).
    for mode in ["mixup", "fmix", "manifoldmix"] {
        let method = mix_ops::registry::build_method(mode, 1.0, None).unwrap();
        let mut free = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut pinned = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        method
            .mix(&images, &labels, &mut MixContext::new(&mut free))
            .unwrap();
        let mut ctx = MixContext::new(&mut pinned);
        ctx.fixed_lambda = Some(0.3);
        let mixed = method.mix(&images, &labels, &mut ctx).unwrap();
        let lam = mixed.labels.lambda.mean().unwrap();
        assert!((lam - 0.3).abs() < 0.01, "{mode}: λ {lam}");
        if mode == "mixup" || mode == "manifoldmix" {
            assert_eq!(free.next_u64(), pinned.next_u64(), "{mode}: stream shifted");
        }
    }
}
