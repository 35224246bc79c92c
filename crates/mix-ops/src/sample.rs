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

/// Redraws [`permutation_avoiding_fixed_points`] allows after its first draw, as upstream.
pub const FIXED_POINT_REDRAWS: usize = 10;

/// Like [`permutation`], but redraws while any `π(i) = i`: one draw plus up to
/// [`FIXED_POINT_REDRAWS`] (10) redraws, 11 draws in all, keeping the last draw if all
/// have a fixed point: the 2025 upstream CutMix/FMix behaviour (spec §5.0). The
/// benchmark-era default is the plain permutation.
pub fn permutation_avoiding_fixed_points(rng: &mut dyn RngCore, n: usize) -> Vec<u32> {
    redraw_while_fixed_points(n, || permutation(rng, n))
}

/// The redraw loop of [`permutation_avoiding_fixed_points`] over any source of draws.
fn redraw_while_fixed_points(n: usize, mut draw: impl FnMut() -> Vec<u32>) -> Vec<u32> {
    let has_fixed_point = |p: &[u32]| n > 1 && p.iter().enumerate().any(|(i, &v)| i as u32 == v);
    let mut p = draw();
    for _ in 0..FIXED_POINT_REDRAWS {
        if !has_fixed_point(&p) {
            break;
        }
        p = draw();
    }
    p
}

/// A permutation as a `u32` index tensor on `device`.
pub fn perm_tensor(perm: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(perm, perm.len(), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the redraw loop on a scripted sequence of draws; returns the kept draw and the
    /// number of draws made.
    fn scripted(n: usize, draws: &[Vec<u32>]) -> (Vec<u32>, usize) {
        let mut made = 0;
        let kept = redraw_while_fixed_points(n, || {
            made += 1;
            draws[(made - 1).min(draws.len() - 1)].clone()
        });
        (kept, made)
    }

    #[test]
    fn failing_draws_stop_after_one_plus_ten() {
        assert_eq!(FIXED_POINT_REDRAWS, 10);
        // Every draw has a fixed point: 1 + 10 draws, the last one kept.
        let mut draws: Vec<Vec<u32>> = (0..20).map(|_| vec![0, 2, 1]).collect();
        draws[10] = vec![2, 1, 0];
        let (kept, made) = scripted(3, &draws);
        assert_eq!(made, 11);
        assert_eq!(kept, vec![2, 1, 0]);
        // The 11th draw is the first derangement: it is drawn and kept.
        draws[10] = vec![1, 2, 0];
        assert_eq!(scripted(3, &draws), (vec![1, 2, 0], 11));
        // A derangement at the 12th draw comes too late.
        draws[10] = vec![0, 1, 2];
        draws[11] = vec![1, 2, 0];
        assert_eq!(scripted(3, &draws), (vec![0, 1, 2], 11));
    }

    #[test]
    fn a_derangement_or_a_single_element_is_kept_at_once() {
        assert_eq!(scripted(3, &[vec![1, 2, 0]]), (vec![1, 2, 0], 1));
        assert_eq!(scripted(1, &[vec![0]]), (vec![0], 1));
        assert_eq!(scripted(0, &[vec![]]), (vec![], 1));
        // The public function makes a real permutation.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7);
        let mut p = permutation_avoiding_fixed_points(&mut rng, 8);
        p.sort_unstable();
        assert_eq!(p, (0..8).collect::<Vec<u32>>());
    }
}
