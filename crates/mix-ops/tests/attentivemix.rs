//! AttentiveMix+ (spec §5.7).

use candle_core::{Device, Result, Tensor};
use mix_ops::attentivemix::{
    kept_cells, top_k_cells, upsample_grid, AttentiveMix, AttentiveMixArgs,
};
use mix_ops::{build_method, Lambda, MixContext, MixModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A network stand-in returning a fixed `N×C×7×7` feature map.
struct FixedFeatures(Tensor);

impl MixModel for FixedFeatures {
    fn input_gradient(&self, _images: &Tensor, _labels: &Tensor) -> Result<Tensor> {
        candle_core::bail!("not a classifier")
    }
    fn attention_features(&self, images: &Tensor) -> Result<Tensor> {
        assert_eq!(images.dim(0)?, self.0.dim(0)?);
        Ok(self.0.clone())
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn random(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn upsampled_cells_are_5_5_4_5_4_5_4_pixels() {
    let grid: Vec<f32> = (0..49).map(|i| i as f32).collect();
    let up = upsample_grid(&grid, 7, 7, 32, 32);
    let mut rows = [0usize; 7];
    let mut cols = [0usize; 7];
    for r in 0..32 {
        rows[(up[r * 32] as usize) / 7] += 1;
    }
    for c in 0..32 {
        cols[(up[c] as usize) % 7] += 1;
    }
    assert_eq!(rows, [5, 5, 4, 5, 4, 5, 4]);
    assert_eq!(cols, [5, 5, 4, 5, 4, 5, 4]);
    // Every pixel comes from the cell given by floor(t·7/32) on each axis.
    for r in 0..32 {
        for c in 0..32 {
            assert_eq!(up[r * 32 + c] as usize, (r * 7 / 32) * 7 + c * 7 / 32);
        }
    }
}

#[test]
fn kept_cell_count_follows_lambda_or_top_k() {
    assert_eq!(kept_cells(0.0, 49, None), 1);
    assert_eq!(kept_cells(0.01, 49, None), 1);
    assert_eq!(kept_cells(0.5, 49, None), 24);
    assert_eq!(kept_cells(0.999, 49, None), 48);
    assert_eq!(kept_cells(1.0, 49, None), 49);
    assert_eq!(kept_cells(0.3, 49, Some(6)), 6);
    assert_eq!(kept_cells(0.3, 49, Some(100)), 49);
    assert_eq!(top_k_cells(&[0.1, 0.5, 0.5, 0.9], 3), vec![3, 1, 2]);
}

#[test]
fn each_grid_keeps_exactly_k_most_attended_cells_and_mixes_per_formula() {
    let n = 5;
    let x = random((n, 3, 32, 32), 1);
    let y = Tensor::new(&[0u32, 1, 2, 3, 4], &Device::Cpu).unwrap();
    let features = random((n, 8, 7, 7), 2);
    let attention = host(&features.mean(1).unwrap());
    let perm = [2u32, 0, 1, 4, 3];
    let method = AttentiveMix::default();
    for lambda in [0.0, 0.13, 0.5, 0.77, 1.0] {
        let k = ((49.0 * lambda) as usize).clamp(1, 49);
        let (mixed, kept) = method.mix_with(&x, &y, &features, lambda, &perm).unwrap();
        let m = host(mixed.mask.as_ref().unwrap());
        for i in 0..n {
            assert_eq!(kept[i].len(), k);
            // The kept cells are the k largest channel-mean attentions.
            let scores = &attention[i * 49..(i + 1) * 49];
            let threshold = kept[i].iter().map(|&c| scores[c]).fold(f32::MAX, f32::min);
            let above = scores.iter().filter(|&&s| s > threshold).count();
            assert!(above < k);
            // Sampling the mask at one pixel per cell gives back a grid with k ones.
            let ones = (0..49)
                .filter(|&cell| {
                    let (r, c) = (cell / 7 * 32 / 7 + 1, cell % 7 * 32 / 7 + 1);
                    m[i * 1024 + r * 32 + c] == 1.0
                })
                .count();
            assert_eq!(ones, k);
            assert!(m[i * 1024..(i + 1) * 1024]
                .iter()
                .all(|&v| v == 0.0 || v == 1.0));
        }
        // λ' = mean(M_0).
        let mean0 = m[..1024].iter().map(|&v| v as f64).sum::<f64>() / 1024.0;
        match mixed.labels.lambda {
            Lambda::Scalar(l) => assert_eq!(l, mean0),
            Lambda::PerSample(_) => panic!("attentivemix uses one λ"),
        }
        // x_mix = M·x + (1−M)·x[π].
        let xs = host(&x);
        let out = host(&mixed.images);
        for i in 0..n {
            let p = perm[i] as usize;
            for j in 0..3072 {
                let w = m[i * 1024 + j % 1024];
                let expected = w * xs[i * 3072 + j] + (1.0 - w) * xs[p * 3072 + j];
                assert!((out[i * 3072 + j] - expected).abs() < 1e-6);
            }
        }
        assert_eq!(
            mixed.labels.y_b.to_vec1::<u32>().unwrap(),
            vec![2, 0, 1, 4, 3]
        );
    }
}

#[test]
fn fixed_feature_map_picks_the_expected_cells() {
    // Channel mean of sample 0 is highest at cells 48, 0, 24; sample 1 at 6, 42.
    let n = 2;
    let mut f = vec![0f32; n * 2 * 49];
    for (cell, v) in [(48, 9.0), (0, 8.0), (24, 7.0)] {
        f[cell] = v;
        f[49 + cell] = v;
    }
    for (cell, v) in [(6, 5.0), (42, 4.0), (10, 1.0)] {
        f[2 * 49 + cell] = v;
        f[3 * 49 + cell] = v;
    }
    let features = Tensor::from_vec(f, (n, 2, 7, 7), &Device::Cpu).unwrap();
    let x = random((n, 3, 32, 32), 3);
    let y = Tensor::new(&[1u32, 7], &Device::Cpu).unwrap();
    let method = AttentiveMix {
        alpha: 2.0,
        args: AttentiveMixArgs {
            top_k: Some(2),
            ..AttentiveMixArgs::default()
        },
    };
    let (mixed, kept) = method.mix_with(&x, &y, &features, 0.9, &[1, 0]).unwrap();
    assert_eq!(kept, vec![vec![48, 0], vec![6, 42]]);
    // Cell 48 is the 4×4 bottom-right corner, cell 0 the 5×5 top-left one.
    let lambda = match mixed.labels.lambda {
        Lambda::Scalar(l) => l,
        Lambda::PerSample(_) => unreachable!(),
    };
    assert_eq!(lambda, (16.0 + 25.0) / 1024.0);

    // Through the trait: the model is used, the draw is seeded.
    let model = FixedFeatures(features);
    let boxed = build_method("attentivemix", 2.0, None).unwrap();
    assert_eq!(boxed.name(), "attentivemix");
    let run = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = boxed
            .mix(&x, &y, &mut MixContext::with_model(&mut rng, &model))
            .unwrap();
        host(m.mask.as_ref().unwrap())
    };
    assert_eq!(run(4), run(4));
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let err = boxed
        .mix(&x, &y, &mut MixContext::new(&mut rng))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a model"), "{err}");
}

#[test]
fn args_default_to_the_cifar_config_and_ignore_grid_size_and_beta() {
    let args: AttentiveMixArgs = serde_json::from_str("{}").unwrap();
    assert_eq!(args, AttentiveMixArgs::default());
    assert_eq!((args.grid_size, args.top_k, args.beta), (32, None, 8.0));
    assert!(serde_json::from_str::<AttentiveMixArgs>(r#"{"grid_scale": 32}"#).is_err());
    let odd = serde_json::json!({"grid_size": 7, "beta": 100.0});
    assert!(build_method("attentivemix", 2.0, Some(&odd)).is_ok());
    let bad = serde_json::json!({"top_k": 0});
    let err = build_method("attentivemix", 2.0, Some(&bad))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("top_k"), "{err}");
}
