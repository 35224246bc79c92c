//! Head losses on mixed labels (spec §3.4).
//!
//! Every loss takes logits `z` (`N×C`) and [`MixedLabels`] `(y_a, y_b, λ)`. The mixed target of
//! sample `i` is `t_i = λ_i·onehot(y_a,i) + (1−λ_i)·onehot(y_b,i)`; plain labels are the trivial
//! mixture `λ = 1, y_a = y_b`, for which every loss reduces to its plain form.

use candle_core::{DType, Result, Tensor, D};
use mix_ops::labels::one_hot;
use mix_ops::{Lambda, MixedLabels};

/// Which head loss a configuration uses (the config-name suffix of the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLoss {
    /// `ClsHead` + plain cross-entropy: `λ·CE(z, y_a) + (1−λ)·CE(z, y_b)`.
    CeNone,
    /// `ClsMixupHead` + soft-target cross-entropy on `t`.
    CeSoft,
    /// `ClsMixupHead` + binary cross-entropy with logits on `t`, summed over classes.
    CeSigm,
}

/// Plain cross-entropy `CE(z, y) = (1/N) Σ_i −log softmax(z_i)[y_i]` as a 0-dim tensor.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let targets = one_hot(labels, logits.dim(D::Minus1)?)?.to_dtype(logits.dtype())?;
    kernels::soft_cross_entropy(logits, &targets)
}

/// The loss of one head on (possibly mixed) labels, averaged over the batch (spec §3.4).
///
/// * [`HeadLoss::CeNone`]: `λ·CE(z, y_a) + (1−λ)·CE(z, y_b)`, each CE a batch mean. With a
///   per-sample λ this reproduces the reference exactly, which multiplies the batch-mean CE by
///   each `λ_i` and then averages, i.e. uses `mean(λ)`: `λ̄·CE(z, y_a) + (1−λ̄)·CE(z, y_b)`.
///   That is not the per-sample mixture (which is why PuzzleMix is configured with `CeSoft`).
/// * [`HeadLoss::CeSoft`]: `(1/N) Σ_i Σ_c −t_ic·log softmax(z_i)_c`.
/// * [`HeadLoss::CeSigm`]: `(1/N) Σ_i Σ_c BCEWithLogits(z_ic, t_ic)`; when `y_a = y_b` the
///   class gets target 1.
///
/// Both cross-entropies are one fused op ([`kernels::soft_cross_entropy`]) on soft targets:
/// `CeNone` is the soft cross-entropy with the targets `λ̄·onehot(y_a) + (1−λ̄)·onehot(y_b)`,
/// the same sum regrouped (equal up to rounding), with terms of zero weight skipped as before.
pub fn mixed_loss(logits: &Tensor, labels: &MixedLabels, loss: HeadLoss) -> Result<Tensor> {
    match loss {
        HeadLoss::CeNone => kernels::soft_cross_entropy(logits, &ce_none_targets(logits, labels)?),
        HeadLoss::CeSoft => kernels::soft_cross_entropy(logits, &targets(logits, labels)?),
        HeadLoss::CeSigm => {
            let targets = targets(logits, labels)?;
            // max(z, 0) − z·t + log(1 + exp(−|z|)) never exponentiates a positive number.
            let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
            let bce = ((logits.relu()? - (logits * targets)?)? + softplus_neg_abs)?;
            bce.sum(1)?.mean_all()
        }
    }
}

/// Targets of [`HeadLoss::CeNone`]: the batch-mean λ's mixture of the two one-hot labels.
fn ce_none_targets(logits: &Tensor, labels: &MixedLabels) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    let t = match &labels.lambda {
        // Plain labels (and λ = 0) need one one-hot only.
        Lambda::Scalar(l) if *l == 1.0 => one_hot(&labels.y_a, classes)?,
        Lambda::Scalar(l) if *l == 0.0 => one_hot(&labels.y_b, classes)?,
        Lambda::Scalar(_) => labels.soft_targets(classes)?,
        Lambda::PerSample(l) => {
            let l_mean = l.to_dtype(DType::F32)?.mean_all()?;
            let a = one_hot(&labels.y_a, classes)?.broadcast_mul(&l_mean)?;
            let b = one_hot(&labels.y_b, classes)?.broadcast_mul(&(1.0 - &l_mean)?)?;
            (a + b)?
        }
    };
    t.to_dtype(logits.dtype())
}

fn targets(logits: &Tensor, labels: &MixedLabels) -> Result<Tensor> {
    labels
        .soft_targets(logits.dim(D::Minus1)?)?
        .to_dtype(logits.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Row 0: softmax = [1/6, 2/6, 3/6]; row 1: softmax = [3/5, 1/5, 1/5].
    fn logits() -> Tensor {
        let l2 = 2f32.ln();
        let l3 = 3f32.ln();
        Tensor::new(&[[0.0, l2, l3], [l3, 0.0, 0.0]], &Device::Cpu).unwrap()
    }

    fn labels(v: &[u32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn value(t: Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn ln(x: f64) -> f64 {
        x.ln()
    }

    #[test]
    fn plain_labels_give_plain_cross_entropy_for_softmax_losses() {
        let y = labels(&[2, 0]);
        // −log(3/6) and −log(3/5), averaged.
        let expected = 0.5 * (ln(2.0) + ln(5.0 / 3.0));
        let plain = MixedLabels::plain(&y);
        let ce = value(cross_entropy(&logits(), &y).unwrap());
        assert!((ce - expected).abs() < 1e-6, "{ce} vs {expected}");
        for loss in [HeadLoss::CeNone, HeadLoss::CeSoft] {
            let got = value(mixed_loss(&logits(), &plain, loss).unwrap());
            assert!(
                (got - expected).abs() < 1e-6,
                "{loss:?}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn scalar_lambda_ce_none_and_ce_soft_match_hand_values() {
        let y_a = labels(&[2, 0]);
        let y_b = labels(&[1, 2]);
        let mixed = MixedLabels {
            y_a,
            y_b,
            lambda: Lambda::Scalar(0.25),
        };
        let ce_a = 0.5 * (ln(2.0) + ln(5.0 / 3.0));
        let ce_b = 0.5 * (ln(3.0) + ln(5.0));
        let expected = 0.25 * ce_a + 0.75 * ce_b;
        for loss in [HeadLoss::CeNone, HeadLoss::CeSoft] {
            let got = value(mixed_loss(&logits(), &mixed, loss).unwrap());
            assert!(
                (got - expected).abs() < 1e-6,
                "{loss:?}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn per_sample_lambda_ce_none_uses_the_mean_and_ce_soft_the_per_sample_mixture() {
        let mixed = MixedLabels {
            y_a: labels(&[2, 0]),
            y_b: labels(&[1, 2]),
            lambda: Lambda::PerSample(Tensor::new(&[1.0f32, 0.5], &Device::Cpu).unwrap()),
        };
        // Per-sample −log p terms: sample 0: a → ln 2, b → ln 3; sample 1: a → ln 5/3, b → ln 5.
        let (a0, b0, a1, b1) = (ln(2.0), ln(3.0), ln(5.0 / 3.0), ln(5.0));
        let mean_lambda = 0.75;
        let ce_none = mean_lambda * 0.5 * (a0 + a1) + (1.0 - mean_lambda) * 0.5 * (b0 + b1);
        let ce_soft = 0.5 * ((1.0 * a0 + 0.0 * b0) + (0.5 * a1 + 0.5 * b1));
        let got_none = value(mixed_loss(&logits(), &mixed, HeadLoss::CeNone).unwrap());
        let got_soft = value(mixed_loss(&logits(), &mixed, HeadLoss::CeSoft).unwrap());
        assert!((got_none - ce_none).abs() < 1e-6, "{got_none} vs {ce_none}");
        assert!((got_soft - ce_soft).abs() < 1e-6, "{got_soft} vs {ce_soft}");
        assert!(
            (ce_none - ce_soft).abs() > 1e-2,
            "the example must separate the two"
        );
    }

    /// BCE with logits for one entry, computed directly from the definition.
    fn bce(z: f64, t: f64) -> f64 {
        let p = 1.0 / (1.0 + (-z).exp());
        -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())
    }

    #[test]
    fn ce_sigm_sums_over_classes_and_averages_over_samples() {
        let z = [[0.0, 2f64.ln(), 3f64.ln()], [3f64.ln(), 0.0, 0.0]];
        // Scalar λ = 0.25, y_a = [2, 0], y_b = [1, 0]: sample 1 has y_a = y_b → target 1.
        let mixed = MixedLabels {
            y_a: labels(&[2, 0]),
            y_b: labels(&[1, 0]),
            lambda: Lambda::Scalar(0.25),
        };
        let t = [[0.0, 0.75, 0.25], [1.0, 0.0, 0.0]];
        let mut expected = 0.0;
        for i in 0..2 {
            for c in 0..3 {
                expected += bce(z[i][c], t[i][c]);
            }
        }
        expected /= 2.0;
        let got = value(mixed_loss(&logits(), &mixed, HeadLoss::CeSigm).unwrap());
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");

        // Per-sample λ = [0.5, 1]: targets [0, .5, .5] and [1, 0, 0].
        let per_sample = MixedLabels {
            lambda: Lambda::PerSample(Tensor::new(&[0.5f32, 1.0], &Device::Cpu).unwrap()),
            ..mixed
        };
        let t = [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]];
        let mut expected = 0.0;
        for i in 0..2 {
            for c in 0..3 {
                expected += bce(z[i][c], t[i][c]);
            }
        }
        expected /= 2.0;
        let got = value(mixed_loss(&logits(), &per_sample, HeadLoss::CeSigm).unwrap());
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn losses_are_finite_for_extreme_logits() {
        let z = Tensor::new(&[[1000f32, -1000.0, 0.0]], &Device::Cpu).unwrap();
        let mixed = MixedLabels {
            y_a: labels(&[0]),
            y_b: labels(&[1]),
            lambda: Lambda::Scalar(0.5),
        };
        for loss in [HeadLoss::CeNone, HeadLoss::CeSoft, HeadLoss::CeSigm] {
            let got = value(mixed_loss(&z, &mixed, loss).unwrap());
            assert!(got.is_finite(), "{loss:?} gave {got}");
        }
        // BCE: class 0: z=1000,t=.5 → 500; class 1: z=−1000,t=.5 → 500; class 2: ln 2.
        let got = value(mixed_loss(&z, &mixed, HeadLoss::CeSigm).unwrap());
        assert!((got - (1000.0 + 2f64.ln())).abs() < 1e-3, "{got}");
    }
}
