//! Shared test helpers: seeded random batches and host views of tensors.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use mix_ops::Mixed;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

pub const H: usize = 32;
pub const W: usize = 32;
pub const PIXELS: usize = H * W;

/// A seeded `n×3×32×32` batch of standard normal values and labels `0..n`
/// (distinct, so `y_b` reveals the partner permutation π).
pub fn batch(seed: u64, n: usize) -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let data: Vec<f32> = (0..n * 3 * PIXELS)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let x = Tensor::from_vec(data, (n, 3, H, W), &Device::Cpu).unwrap();
    let y = Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap();
    (x, y)
}

/// `x[n][c][r][col]` as nested vectors.
pub fn host4(t: &Tensor) -> Vec<Vec<Vec<Vec<f32>>>> {
    let (n, _, _, _) = t.dims4().unwrap();
    (0..n)
        .map(|i| t.get(i).unwrap().to_vec3::<f32>().unwrap())
        .collect()
}

/// The partner permutation recovered from `y_b` (labels were `0..n`).
pub fn perm_of(mixed: &Mixed) -> Vec<usize> {
    mixed
        .labels
        .y_b
        .to_vec1::<u32>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

/// The scalar λ of the mixed labels.
pub fn scalar_lambda(mixed: &Mixed) -> f64 {
    match mixed.labels.lambda {
        mix_ops::Lambda::Scalar(l) => l,
        mix_ops::Lambda::PerSample(_) => panic!("expected a scalar λ"),
    }
}

/// The shared `1×1×H×W` weight-of-x mask as a row-major vector.
pub fn mask_of(mixed: &Mixed) -> Vec<f32> {
    let m = mixed.mask.as_ref().expect("method reports a mask");
    assert_eq!(m.dims(), &[1, 1, H, W]);
    m.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts `out[i] == keep·x[i] + (1−keep)·x[π(i)]` per pixel within `tol`.
pub fn assert_blend(x: &Tensor, out: &Tensor, perm: &[usize], keep: &[f32], tol: f32) {
    let (xs, os) = (host4(x), host4(out));
    for (i, &p) in perm.iter().enumerate() {
        for c in 0..3 {
            for r in 0..H {
                for col in 0..W {
                    let k = keep[r * W + col];
                    let want = k * xs[i][c][r][col] + (1.0 - k) * xs[p][c][r][col];
                    let got = os[i][c][r][col];
                    assert!(
                        (got - want).abs() <= tol,
                        "sample {i} c{c} ({r},{col}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Asserts a binary keep mask selects pixels exactly: 1 → from `x`, 0 → from `x[π]`.
pub fn assert_exact_paste(x: &Tensor, out: &Tensor, perm: &[usize], keep: &[f32]) {
    assert!(
        keep.iter().all(|&k| k == 0.0 || k == 1.0),
        "mask must be binary"
    );
    assert_blend(x, out, perm, keep, 0.0);
}

/// The bounding box `(r1, r2, c1, c2)` of the pixels with keep == 0, and
/// whether those pixels fill it completely.
pub fn taken_box(keep: &[f32]) -> Option<(usize, usize, usize, usize, bool)> {
    let taken: Vec<usize> = (0..PIXELS).filter(|&i| keep[i] == 0.0).collect();
    if taken.is_empty() {
        return None;
    }
    let rows = taken.iter().map(|i| i / W);
    let cols = taken.iter().map(|i| i % W);
    let (r1, r2) = (rows.clone().min().unwrap(), rows.max().unwrap() + 1);
    let (c1, c2) = (cols.clone().min().unwrap(), cols.max().unwrap() + 1);
    let full = taken.len() == (r2 - r1) * (c2 - c1);
    Some((r1, r2, c1, c2, full))
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}
