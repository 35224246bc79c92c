//! Operations on MixBlock masks: mixing, `mask_adjust`, `lam_margin` and the mask loss
//! (§5.12.5, §5.13.1, §5.13.3).

use candle_core::{DType, Result, Tensor};

use crate::config::MaskLossMode;
use crate::mixblock::per_sample_mean;

/// `x ⊙ mask[:,0] + x[π] ⊙ mask[:,1]` for images `x` (`N×C×H×W`) and a mask `N×2×H×W`.
pub fn mix_with_mask(x: &Tensor, perm: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(x.dtype())?;
    let w_a = mask.narrow(1, 0, 1)?;
    let w_b = mask.narrow(1, 1, 1)?;
    let partner = x.index_select(perm, 0)?;
    x.broadcast_mul(&w_a)? + partner.broadcast_mul(&w_b)?
}

/// SAMix `mask_adjust` (§5.13.3): per sample, rescales a (detached) mask so that the mean of
/// channel 0 equals `lambda` (upstream passes λ_mb here). Samples whose clamped channel-0 mean
/// is within 1e−8 of `lambda` keep their mask.
pub fn adjust_mask_to_lambda(mask: &Tensor, lambda: f64) -> Result<Tensor> {
    let (n, _, h, w) = mask.dims4()?;
    let c0 = mask.narrow(1, 0, 1)?;
    let a = c0.clamp(1e-8f32, 1.0f32 - 1e-8)?;
    let mu = per_sample_mean(&a)?.reshape((n, 1, 1, 1))?;
    let shape = (n, 1, h, w);
    let too_high = mu.gt(lambda + 1e-8)?.broadcast_as(shape)?;
    let too_low = mu.lt(lambda - 1e-8)?.broadcast_as(shape)?;
    let scaled_down = a.broadcast_mul(&(lambda / &mu)?)?;
    let scale_up = ((1.0 - lambda) / (1.0 - &mu)?)?;
    let scaled_up = (1.0 - (1.0 - &a)?.broadcast_mul(&scale_up)?)?;
    let c0_new = too_high.where_cond(&scaled_down, &too_low.where_cond(&scaled_up, &c0)?)?;
    Tensor::cat(&[&c0_new, &(1.0 - &c0_new)?], 1)
}

/// Whether λ is within `margin` of 0 or 1, where the backbone mask degenerates to MixUp.
pub fn outside_lam_margin(lambda: f64, margin: f64) -> bool {
    lambda <= margin || 1.0 - lambda <= margin
}

/// `lam_margin` rule: if [`outside_lam_margin`], returns the constant mask
/// `[λ, 1 − λ]` (same shape, dtype, device as `mask`); otherwise `mask` unchanged.
pub fn apply_lam_margin(mask: &Tensor, lambda: f64, margin: f64) -> Result<Tensor> {
    if !outside_lam_margin(lambda, margin) {
        return Ok(mask.clone());
    }
    let (n, _, h, w) = mask.dims4()?;
    let ones = Tensor::ones((n, 1, h, w), mask.dtype(), mask.device())?;
    Tensor::cat(&[&(&ones * lambda)?, &(&ones * (1.0 - lambda))?], 1)
}

/// Mask loss on the MixBlock mask `mask` (`N×2×H×W`, with gradient) for weight `lambda`
/// (λ_mb): `weight·max(|1 − m̄ − λ| − margin, 0)`, minus `weight·2·max(Var(m), 0)` for
/// [`MaskLossMode::L1Variance`], where `m = mask[:,1]`, `m̄` its mean over N×H×W and `Var` the
/// biased variance over the same elements. Returns a scalar f32 tensor.
///
/// The loss is computed in f64 and rounded to f32 once at the end: the two means run over
/// N·H·W elements (102,400 at batch 100), and candle sums a strided view one element at a
/// time, so an f32 sum drifts by ~1e−4 relative (PyTorch's pairwise sum does not).
pub fn mask_loss(
    mask: &Tensor,
    lambda: f64,
    weight: f64,
    margin: f64,
    mode: MaskLossMode,
) -> Result<Tensor> {
    let m = mask.narrow(1, 1, 1)?.to_dtype(DType::F64)?;
    let m_bar = m.mean_all()?;
    let l1 = ((1.0 - &m_bar)? - lambda)?.abs()?;
    let l1 = (l1 - margin)?.relu()?;
    let loss = match mode {
        MaskLossMode::L1 => l1,
        MaskLossMode::L1Variance => {
            let var = m.broadcast_sub(&m_bar)?.sqr()?.mean_all()?.relu()?;
            (l1 - (var * 2.0)?)?
        }
    };
    (loss * weight)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn random_mask(n: usize) -> Tensor {
        let m = Tensor::rand(0.01f32, 0.99, (n, 1, 32, 32), &Device::Cpu).unwrap();
        Tensor::cat(&[&(1.0 - &m).unwrap(), &m], 1).unwrap()
    }

    #[test]
    fn lam_margin_gives_constant_mask_outside_and_keeps_it_inside() {
        let mask = random_mask(3);
        for lam in [0.0, 0.05, 0.08, 0.92, 0.97, 1.0] {
            assert!(outside_lam_margin(lam, 0.08));
            let m = apply_lam_margin(&mask, lam, 0.08).unwrap();
            assert_eq!(m.dims(), mask.dims());
            let c0 = m.narrow(1, 0, 1).unwrap();
            let c1 = m.narrow(1, 1, 1).unwrap();
            assert!((scalar(&c0.min_all().unwrap()) - lam).abs() < 1e-6);
            assert!((scalar(&c0.max_all().unwrap()) - lam).abs() < 1e-6);
            assert!((scalar(&c1.min_all().unwrap()) - (1.0 - lam)).abs() < 1e-6);
            assert!((scalar(&c1.max_all().unwrap()) - (1.0 - lam)).abs() < 1e-6);
        }
        for lam in [0.1, 0.5, 0.9] {
            assert!(!outside_lam_margin(lam, 0.08));
            let m = apply_lam_margin(&mask, lam, 0.08).unwrap();
            assert_eq!(
                scalar(&(m - &mask).unwrap().abs().unwrap().max_all().unwrap()),
                0.0
            );
        }
    }

    #[test]
    fn mask_adjust_matches_lambda_per_sample() {
        let mask = random_mask(4);
        for lam in [0.2, 0.5, 0.83] {
            let adj = adjust_mask_to_lambda(&mask, lam).unwrap();
            let means = per_sample_mean(&adj.narrow(1, 0, 1).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for m in means {
                assert!((m as f64 - lam).abs() < 1e-5, "mean {m} vs λ {lam}");
            }
            let sum_err = scalar(
                &(adj.sum(1).unwrap() - 1.0)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap(),
            );
            assert!(sum_err < 1e-6);
            assert!(scalar(&adj.min_all().unwrap()) >= 0.0);
        }
    }

    #[test]
    fn mask_loss_l1_and_variance_terms() {
        // m = 0.2 on half the pixels and 0.6 on the other half: m̄ = 0.4, Var = 0.04.
        let half = Tensor::full(0.2f32, (2, 1, 16, 32), &Device::Cpu).unwrap();
        let other = Tensor::full(0.6f32, (2, 1, 16, 32), &Device::Cpu).unwrap();
        let m = Tensor::cat(&[&half, &other], 2).unwrap();
        let mask = Tensor::cat(&[&(1.0 - &m).unwrap(), &m], 1).unwrap();
        // |1 − 0.4 − 0.3| = 0.3 → (0.3 − 0.1)·0.1 = 0.02.
        let l1 = scalar(&mask_loss(&mask, 0.3, 0.1, 0.1, MaskLossMode::L1).unwrap());
        assert!((l1 - 0.02).abs() < 1e-6, "{l1}");
        // Inside the margin the L1 term vanishes.
        let l1_in = scalar(&mask_loss(&mask, 0.55, 0.1, 0.1, MaskLossMode::L1).unwrap());
        assert!(l1_in.abs() < 1e-7, "{l1_in}");
        let lv = scalar(&mask_loss(&mask, 0.3, 0.1, 0.1, MaskLossMode::L1Variance).unwrap());
        assert!((lv - (0.02 - 0.1 * 2.0 * 0.04)).abs() < 1e-6, "{lv}");
    }

    /// `mask_loss` in f64 on the host, from the mask's f32 values.
    fn host_mask_loss(m: &[f32], lambda: f64, weight: f64, margin: f64, var_term: bool) -> f64 {
        let n = m.len() as f64;
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = m.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let l1 = ((1.0 - mean - lambda).abs() - margin).max(0.0);
        weight
            * if var_term {
                l1 - 2.0 * var.max(0.0)
            } else {
                l1
            }
    }

    #[test]
    fn mask_loss_is_exact_to_f32_rounding_at_batch_100() {
        // Batch 100, constant m = 0.3, λ 0.2, the default weight and margin: a sequential f32
        // sum over the strided channel-1 view put m̄ at 0.30029 and the loss off by −2.9e−5.
        let m = Tensor::full(0.3f32, (100, 1, 32, 32), &Device::Cpu).unwrap();
        let mask = Tensor::cat(&[&(1.0 - &m).unwrap(), &m], 1).unwrap();
        let exact = host_mask_loss(&[0.3f32], 0.2, 0.1, 0.1, false);
        for mode in [MaskLossMode::L1, MaskLossMode::L1Variance] {
            let loss = mask_loss(&mask, 0.2, 0.1, 0.1, mode).unwrap();
            assert_eq!(loss.dtype(), DType::F32);
            let err = scalar(&loss) - exact;
            assert!(err.abs() < 1e-8, "{mode:?}: loss off by {err:e}");
        }
        // Spread values: both terms within f32 rounding of the f64 value.
        let m = Tensor::rand(0.25f32, 0.35, (100, 1, 32, 32), &Device::Cpu).unwrap();
        let host: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        let mask = Tensor::cat(&[&(1.0 - &m).unwrap(), &m], 1).unwrap();
        for (mode, var_term) in [(MaskLossMode::L1, false), (MaskLossMode::L1Variance, true)] {
            let exact = host_mask_loss(&host, 0.2, 0.1, 0.1, var_term);
            let err = scalar(&mask_loss(&mask, 0.2, 0.1, 0.1, mode).unwrap()) - exact;
            assert!(err.abs() < 1e-8, "{mode:?}: loss off by {err:e}");
        }
    }

    #[test]
    fn mask_loss_gradient_reaches_the_f32_mask() {
        let m = Var::from_tensor(&Tensor::rand(0.2f32, 0.4, (2, 1, 4, 4), &Device::Cpu).unwrap())
            .unwrap();
        let mask = Tensor::cat(&[&(1.0 - m.as_tensor()).unwrap(), m.as_tensor()], 1).unwrap();
        let loss = mask_loss(&mask, 0.2, 0.1, 0.1, MaskLossMode::L1).unwrap();
        let grad = loss.backward().unwrap().get(m.as_tensor()).unwrap().clone();
        assert_eq!(grad.dtype(), DType::F32);
        // 1 − m̄ − λ > margin, so d loss / d m_i = −weight / (N·H·W).
        let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
        for v in g {
            assert!((v as f64 + 0.1 / 32.0).abs() < 1e-9, "{v}");
        }
    }

    #[test]
    fn mix_with_mask_weights_x_by_channel_zero() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &dev).unwrap();
        let perm = Tensor::new(&[1u32, 0], &dev).unwrap();
        let ones = Tensor::ones((2, 1, 32, 32), DType::F32, &dev).unwrap();
        let zeros = ones.zeros_like().unwrap();
        let keep = Tensor::cat(&[&ones, &zeros], 1).unwrap();
        let mixed = mix_with_mask(&x, &perm, &keep).unwrap();
        assert_eq!(
            scalar(&(mixed - &x).unwrap().abs().unwrap().max_all().unwrap()),
            0.0
        );
        let swap = Tensor::cat(&[&zeros, &ones], 1).unwrap();
        let mixed = mix_with_mask(&x, &perm, &swap).unwrap();
        let partner = x.index_select(&perm, 0).unwrap();
        assert_eq!(
            scalar(&(mixed - partner).unwrap().abs().unwrap().max_all().unwrap()),
            0.0
        );
    }
}
