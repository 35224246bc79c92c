//! Random draws shared by every method: λ ~ Beta(α, α) and partner permutations.

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::RngCore;
use rand_distr::{Beta, Distribution};

/// Draws λ ~ Beta(α, α). `alpha` must be positive (configs are validated upstream).
pub fn beta_lambda(rng: &mut dyn RngCore, alpha: f64) -> f64 {
    let beta = Beta::new(alpha, alpha).expect("alpha must be > 0");
    beta.sample(rng)
}

/// A uniformly random permutation of `0..n` (the partner index π).
pub fn permutation(rng: &mut dyn RngCore, n: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    p.shuffle(rng);
    p
}

/// Like [`permutation`], but redraws (up to 10 times) while any `π(i) = i`,
/// keeping the last draw if all fail: the 2025 upstream CutMix/FMix behaviour
/// (spec §5.0). The benchmark-era default is the plain permutation.
pub fn permutation_avoiding_fixed_points(rng: &mut dyn RngCore, n: usize) -> Vec<u32> {
    let mut p = permutation(rng, n);
    for _ in 1..10 {
        if n <= 1 || p.iter().enumerate().all(|(i, &v)| i as u32 != v) {
            break;
        }
        p = permutation(rng, n);
    }
    p
}

/// A permutation as a `u32` index tensor on `device`.
pub fn perm_tensor(perm: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(perm, perm.len(), device)
}
