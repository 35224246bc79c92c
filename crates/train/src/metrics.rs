//! Accuracy metrics and the reported summary statistic (spec §3.3, §3.4).

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, D};
use mix_ops::MixedLabels;

/// `N` `f32` flags: 1 where every logit of the row is finite, 0 where the row holds a NaN or an
/// infinity. Computed on the logits' device (no host sync).
fn finite_rows(logits: &Tensor) -> Result<Tensor> {
    // |x| < ∞ is false for ±∞ and for NaN (every comparison with NaN is false).
    let finite = logits.abs()?.lt(f64::INFINITY)?.to_dtype(DType::F32)?;
    finite.min(D::Minus1)
}

/// Rank of each sample's label among its logits (0 = top-1), `N` as `f32`.
///
/// Ties are broken towards the lower class index, like a stable descending sort, so that
/// constant logits are not counted as correct for every label. A row holding any non-finite
/// logit gets rank `≥ C`, so it is wrong for every `k`: with a NaN no logit compares greater
/// than the label's, which would otherwise make the label rank first.
fn label_rank(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let (n, c) = logits.dims2()?;
    let labels = labels.to_dtype(DType::U32)?.unsqueeze(1)?.contiguous()?;
    let label_logit = logits.gather(&labels, 1)?;
    let above = logits.broadcast_gt(&label_logit)?.to_dtype(DType::F32)?;
    let tied = logits.broadcast_eq(&label_logit)?.to_dtype(DType::F32)?;
    let classes = Tensor::arange(0u32, c as u32, logits.device())?
        .unsqueeze(0)?
        .broadcast_as((n, c))?;
    let before = classes.broadcast_lt(&labels)?.to_dtype(DType::F32)?;
    let rank = (above + (tied * before)?)?.sum(1)?;
    // Non-finite rows: add C (the rank itself stays finite, since comparisons yield 0/1).
    let penalty = ((1.0 - finite_rows(&logits)?)? * c as f64)?;
    rank + penalty
}

/// Number of samples whose label is among the `k` highest logits (`logits`: `N×C`,
/// `labels`: `N` integer class indices). `k` must be in `1..=C`. A sample whose logits hold
/// any NaN or ±∞ counts as wrong.
pub fn topk_correct(logits: &Tensor, labels: &Tensor, k: usize) -> Result<usize> {
    let c = logits.dim(D::Minus1)?;
    if k == 0 || k > c {
        candle_core::bail!("top-k accuracy needs 1 <= k <= {c} classes, got k = {k}");
    }
    let hits = label_rank(logits, labels)?.lt(k as f64)?;
    let count = hits.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(count.round() as usize)
}

/// [`topk_correct`] for several `k` at once (one ranking pass), e.g. `&[1, 5]` for evaluation.
/// A sample whose logits hold any NaN or ±∞ counts as wrong.
pub fn topk_corrects(logits: &Tensor, labels: &Tensor, ks: &[usize]) -> Result<Vec<usize>> {
    let c = logits.dim(D::Minus1)?;
    if let Some(k) = ks.iter().find(|&&k| k == 0 || k > c) {
        candle_core::bail!("top-k accuracy needs 1 <= k <= {c} classes, got k = {k}");
    }
    let rank = label_rank(logits, labels)?;
    ks.iter()
        .map(|&k| {
            let count = rank
                .lt(k as f64)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(count.round() as usize)
        })
        .collect()
}

/// `100·correct/total` (0 for an empty set).
pub fn accuracy_pct(correct: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * correct as f64 / total as f64
    }
}

/// The logged `acc_mix` of a mixed batch, in percent (logging only, spec §3.4).
///
/// With `λ̄` = λ (or its batch mean): if `λ̄ > 0.5`,
/// `λ̄·%[top-1 = y_a] + (1−λ̄)·%[second-ranked = y_b]`, else
/// `(1−λ̄)·%[top-1 = y_b] + λ̄·%[second-ranked = y_a]`. A sample whose logits hold any NaN
/// or ±∞ counts as wrong in both terms.
pub fn acc_mix(logits: &Tensor, labels: &MixedLabels) -> Result<f64> {
    Ok(acc_mix_tensor(logits, labels)?.to_scalar::<f32>()? as f64)
}

/// [`acc_mix`] (non-finite rows count as wrong) as a 0-dim f32 tensor left on the logits' device, so a training
/// loop can accumulate it without a host sync per step (a per-sample λ is
/// averaged on the host; only PuzzleMix has one, and it syncs anyway).
pub fn acc_mix_tensor(logits: &Tensor, labels: &MixedLabels) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let (n, c) = logits.dims2()?;
    if c < 2 {
        candle_core::bail!("acc_mix needs at least 2 classes, got {c}");
    }
    let lam = labels.lambda.mean()?;
    let first = logits.argmax_keepdim(1)?;
    let classes = Tensor::arange(0u32, c as u32, logits.device())?
        .unsqueeze(0)?
        .broadcast_as((n, c))?;
    let is_first = classes.broadcast_eq(&first)?;
    let masked = is_first.where_cond(
        &Tensor::full(f32::NEG_INFINITY, (n, c), logits.device())?,
        &logits,
    )?;
    let second = masked.argmax(1)?;
    let first = first.squeeze(1)?;
    let finite = finite_rows(&logits)?;
    let pct = |pred: &Tensor, y: &Tensor| -> Result<Tensor> {
        (pred.eq(&y.to_dtype(DType::U32)?)?.to_dtype(DType::F32)? * &finite)?.sum_all()?
            * (100.0 / n as f64)
    };
    if lam > 0.5 {
        (pct(&first, &labels.y_a)? * lam)? + (pct(&second, &labels.y_b)? * (1.0 - lam))?
    } else {
        (pct(&first, &labels.y_b)? * (1.0 - lam))? + (pct(&second, &labels.y_a)? * lam)?
    }
}

/// Median with `numpy.median` semantics: the middle value of the sorted values, or the mean of
/// the two middle values for an even count. NaN if `values` is empty or contains a NaN.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        0.5 * (sorted[mid - 1] + sorted[mid])
    }
}

/// Median of the evaluations whose 1-based epoch lies in `first..=last`; a later entry for
/// the same epoch (a resumed run re-evaluating it) replaces an earlier one. `None` if the
/// history has no evaluation of epoch `last` (the run has not finished).
fn median_over_epochs(history: &[(usize, f64)], first: usize, last: usize) -> Option<f64> {
    let by_epoch: BTreeMap<usize, f64> = history
        .iter()
        .filter(|(epoch, _)| (first..=last).contains(epoch))
        .copied()
        .collect();
    by_epoch.contains_key(&last).then(|| {
        let values: Vec<f64> = by_epoch.values().copied().collect();
        median(&values)
    })
}

/// The reported metric (spec §3.3), as the upstream summarizer computes it: the median of
/// top-1 over the evaluations with epoch `≥ E − window`, i.e. epochs `E−window..=E`
/// (`window + 1` values; 11 for the README's "last 10 epochs"). `history` holds
/// `(1-based epoch, top-1 %)`. `None` until epoch `E` has been evaluated.
pub fn median_last_k(history: &[(usize, f64)], max_epochs: usize, window: usize) -> Option<f64> {
    median_over_epochs(history, max_epochs.saturating_sub(window), max_epochs)
}

/// The literal README variant: the median over exactly the last `window` epochs
/// `E−window+1..=E` (10 values for `window = 10`). `None` until epoch `E` has been evaluated.
pub fn median_final_epochs(
    history: &[(usize, f64)],
    max_epochs: usize,
    window: usize,
) -> Option<f64> {
    median_over_epochs(history, (max_epochs + 1).saturating_sub(window), max_epochs)
}

/// Number of equal-width confidence bins of the reported expected calibration error (Guo et al.,
/// "On Calibration of Modern Neural Networks", ICML 2017).
pub const ECE_BINS: usize = 15;

/// What calibration metrics need of one classified sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationSample {
    /// The highest softmax probability (the confidence of the top-1 prediction).
    pub confidence: f64,
    /// Whether the top-1 prediction is the label (ties to the lower class index, as
    /// [`topk_correct`]; a row with a NaN or ±∞ logit is wrong).
    pub correct: bool,
    /// `−log softmax(logits)[label]`: the sample's negative log-likelihood.
    pub nll: f64,
}

/// Per-sample confidence, correctness and negative log-likelihood of a batch (`logits`: `N×C`,
/// `labels`: `N` class indices), computed on the logits' device with one host transfer.
/// Non-finite logits give a non-finite confidence and NLL and count as wrong.
pub fn calibration_samples(logits: &Tensor, labels: &Tensor) -> Result<Vec<CalibrationSample>> {
    let logits = logits.to_dtype(DType::F32)?;
    let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = labels.to_dtype(DType::U32)?.unsqueeze(1)?.contiguous()?;
    let nll = log_p.gather(&idx, 1)?.squeeze(1)?.neg()?;
    let confidence = log_p.max(D::Minus1)?.exp()?;
    let correct = label_rank(&logits, labels)?.lt(1.0)?.to_dtype(DType::F32)?;
    let host = Tensor::stack(&[confidence, correct, nll], 0)?.to_vec2::<f32>()?;
    Ok((0..host[0].len())
        .map(|i| CalibrationSample {
            confidence: host[0][i] as f64,
            correct: host[1][i] > 0.5,
            nll: host[2][i] as f64,
        })
        .collect())
}

/// Mean negative log-likelihood of `samples` (NaN for none; not finite when a sample's is not).
pub fn mean_nll(samples: &[CalibrationSample]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.iter().map(|s| s.nll).sum::<f64>() / samples.len() as f64
}

/// Expected calibration error (Guo et al. 2017) over `bins` equal-width confidence bins
/// `((m−1)/M, m/M]`: `Σ_m |B_m|/n · |accuracy(B_m) − mean confidence(B_m)|`, a fraction in
/// `[0, 1]` (0 for no samples). A confidence of exactly 0 falls in the first bin; a non-finite
/// one (from non-finite logits) counts as confidence 0, so such a wrong sample adds nothing
/// to the gap of its bin.
pub fn expected_calibration_error(samples: &[CalibrationSample], bins: usize) -> f64 {
    assert!(
        bins > 0,
        "expected_calibration_error needs at least one bin"
    );
    if samples.is_empty() {
        return 0.0;
    }
    // Per bin: count, Σ confidence, Σ correct.
    let mut acc = vec![(0usize, 0.0f64, 0.0f64); bins];
    for s in samples {
        let conf = if s.confidence.is_finite() {
            s.confidence.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Bin m (0-based) holds (m/M, (m+1)/M]: ceil(conf·M) − 1.
        let m = ((conf * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        acc[m].0 += 1;
        acc[m].1 += conf;
        acc[m].2 += if s.correct { 1.0 } else { 0.0 };
    }
    let n = samples.len() as f64;
    acc.iter()
        .filter(|(count, _, _)| *count > 0)
        .map(|&(_, conf, correct)| (correct - conf).abs() / n)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use mix_ops::Lambda;

    fn t2<const N: usize>(v: &[[f32; 4]; N]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn labels(v: &[u32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn topk_counts_labels_among_the_k_highest_logits() {
        let z = t2(&[
            [0.1, 0.9, 0.5, 0.2], // ranking 1, 2, 3, 0
            [3.0, 2.0, 1.0, 0.0], // ranking 0, 1, 2, 3
            [0.0, 0.0, 0.0, 0.0], // ties: ranking by index
        ]);
        let y = labels(&[2, 3, 1]);
        assert_eq!(topk_correct(&z, &y, 1).unwrap(), 0);
        assert_eq!(topk_correct(&z, &y, 2).unwrap(), 2); // samples 0 and 2
        assert_eq!(topk_correct(&z, &y, 3).unwrap(), 2);
        assert_eq!(topk_correct(&z, &y, 4).unwrap(), 3);
        assert_eq!(topk_correct(&z, &labels(&[1, 0, 0]), 1).unwrap(), 3);
        assert_eq!(topk_corrects(&z, &y, &[1, 2, 4]).unwrap(), vec![0, 2, 3]);
        assert!(topk_corrects(&z, &y, &[1, 5]).is_err());
        assert!(topk_correct(&z, &y, 5).is_err());
        assert!(topk_correct(&z, &y, 0).is_err());
        assert_eq!(accuracy_pct(2, 3), 200.0 / 3.0);
    }

    #[test]
    fn non_finite_rows_count_as_wrong_for_every_k() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let z = t2(&[
            [nan, nan, nan, nan],  // all NaN: no logit beats the label
            [0.1, 0.9, nan, 0.2],  // one NaN elsewhere in the row
            [inf, 0.0, 0.0, 0.0],  // +∞ on the label
            [0.0, -inf, 0.0, 0.0], // −∞ elsewhere
            [1.0, 2.0, 3.0, 4.0],  // finite, label ranked first
            [0.0, nan, inf, -inf], // mixed
            [4.0, 3.0, 2.0, 1.0],  // finite, label ranked second
        ]);
        let y = labels(&[0, 1, 0, 0, 3, 0, 1]);
        assert_eq!(topk_correct(&z, &y, 1).unwrap(), 1);
        assert_eq!(topk_correct(&z, &y, 2).unwrap(), 2);
        assert_eq!(topk_correct(&z, &y, 4).unwrap(), 2);
        assert_eq!(topk_corrects(&z, &y, &[1, 2, 4]).unwrap(), vec![1, 2, 2]);
        // The same in f64 (converted to f32 on the way).
        let z64 = z.to_dtype(DType::F64).unwrap();
        assert_eq!(topk_corrects(&z64, &y, &[1, 4]).unwrap(), vec![1, 2]);

        // acc_mix: a NaN row is wrong in both terms.
        let z = t2(&[[nan, nan, nan, nan], [3.0, 2.0, 1.0, 0.0]]);
        let mixed = MixedLabels {
            y_a: labels(&[0, 0]),
            y_b: labels(&[1, 1]),
            lambda: Lambda::Scalar(0.7),
        };
        // Only the finite row counts: top-1 = y_a and second = y_b in 1 of 2 samples.
        assert!((acc_mix(&z, &mixed).unwrap() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn acc_mix_weights_first_and_second_predictions() {
        let z = t2(&[
            [0.1, 0.9, 0.5, 0.2], // first 1, second 2
            [3.0, 2.0, 1.0, 0.0], // first 0, second 1
        ]);
        let y_a = labels(&[1, 2]);
        let y_b = labels(&[2, 1]);
        // λ = 0.7: top-1 = y_a in 1/2 samples, second = y_b in 2/2.
        let high = MixedLabels {
            y_a: y_a.clone(),
            y_b: y_b.clone(),
            lambda: Lambda::Scalar(0.7),
        };
        assert!((acc_mix(&z, &high).unwrap() - (0.7 * 50.0 + 0.3 * 100.0)).abs() < 1e-9);
        // λ̄ = 0.25 (per-sample mean): roles swapped; top-1 = y_b in 0/2, second = y_a in 0/2.
        let low = MixedLabels {
            y_a,
            y_b,
            lambda: Lambda::PerSample(Tensor::new(&[0.0f32, 0.5], &Device::Cpu).unwrap()),
        };
        assert!(acc_mix(&z, &low).unwrap().abs() < 1e-9);
        let swapped = MixedLabels {
            y_a: labels(&[0, 3]),
            y_b: labels(&[1, 0]),
            lambda: Lambda::Scalar(0.25),
        };
        // top-1 = y_b: both; second = y_a: none → 0.75·100.
        assert!((acc_mix(&z, &swapped).unwrap() - 75.0).abs() < 1e-9);
    }

    #[test]
    fn median_follows_numpy_for_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
        assert!(median(&[1.0, f64::NAN]).is_nan());
    }

    #[test]
    fn median_last_k_uses_epochs_from_e_minus_window_to_e() {
        // E = 12, window 10: epochs 2..=12 (11 values) vs 3..=12 (10 values).
        let top1 = [
            50.0, 90.0, 91.0, 95.0, 92.0, 94.0, 93.0, 96.0, 97.0, 89.0, 98.0, 99.0,
        ];
        let history: Vec<(usize, f64)> =
            top1.iter().enumerate().map(|(i, &v)| (i + 1, v)).collect();
        // Epochs 2..=12 sorted: 89 90 91 92 93 94 95 96 97 98 99 → 94.
        assert_eq!(median_last_k(&history, 12, 10), Some(94.0));
        // Epochs 3..=12 sorted: 89 91 92 93 94 95 96 97 98 99 → (94 + 95)/2.
        assert_eq!(median_final_epochs(&history, 12, 10), Some(94.5));
        // Not finished yet.
        assert_eq!(median_last_k(&history[..11], 12, 10), None);
        assert_eq!(median_final_epochs(&history[..11], 12, 10), None);
        // Window longer than the run: everything counts.
        assert_eq!(median_last_k(&history[..3], 3, 10), Some(90.0));
        // A re-evaluated epoch (resume) replaces the earlier record.
        let mut resumed = history.clone();
        resumed.push((12, 10.0));
        // Epochs 2..=12 sorted: 10 89 90 91 92 93 94 95 96 97 98 → 93.
        assert_eq!(median_last_k(&resumed, 12, 10), Some(93.0));
    }

    fn sample(confidence: f64, correct: bool) -> CalibrationSample {
        CalibrationSample {
            confidence,
            correct,
            nll: 0.0,
        }
    }

    #[test]
    fn ece_matches_hand_computed_bins() {
        // Perfectly calibrated: 4 samples at 0.75 confidence, 3 right.
        let calibrated: Vec<_> = [true, true, true, false]
            .iter()
            .map(|&c| sample(0.75, c))
            .collect();
        assert!(expected_calibration_error(&calibrated, 15).abs() < 1e-12);
        // Two bins of 15: 0.95 (bin 15) right and wrong → |0.5 − 0.95|·2/4; 0.3 (bin 5) right
        // twice → |1 − 0.3|·2/4. ECE = 0.225 + 0.35.
        let s = [
            sample(0.95, true),
            sample(0.95, false),
            sample(0.3, true),
            sample(0.3, true),
        ];
        assert!((expected_calibration_error(&s, 15) - 0.575).abs() < 1e-12);
        // One bin: |accuracy − mean confidence| over everything = |0.75 − 0.625|.
        assert!((expected_calibration_error(&s, 1) - 0.125).abs() < 1e-12);
        // Bin edges are right-closed: 1/3 lies in bin 1 of 3, just above it in bin 2.
        let edge = [sample(1.0 / 3.0, true), sample(1.0 / 3.0 + 1e-9, false)];
        // Bin 1: |1 − 1/3|/2; bin 2: |0 − (1/3 + 1e-9)|/2.
        let want = (2.0 / 3.0) / 2.0 + (1.0 / 3.0 + 1e-9) / 2.0;
        assert!((expected_calibration_error(&edge, 3) - want).abs() < 1e-12);
        // Always right at confidence 1, always wrong at confidence 1: 0 and 1.
        assert_eq!(expected_calibration_error(&[sample(1.0, true)], 15), 0.0);
        assert_eq!(expected_calibration_error(&[sample(1.0, false)], 15), 1.0);
        assert_eq!(expected_calibration_error(&[], 15), 0.0);
        // A non-finite confidence counts as 0 (and the sample is wrong).
        assert_eq!(
            expected_calibration_error(&[sample(f64::NAN, false)], 15),
            0.0
        );
    }

    #[test]
    fn calibration_samples_give_softmax_confidence_and_nll() {
        let ln2 = 2f32.ln();
        // Row 0: logits (ln 2, 0, 0, 0) → p = (2/5, 1/5, 1/5, 1/5); label 0 (top-1).
        // Row 1: uniform → p = 1/4 each, top-1 is class 0 by the tie rule; label 2 (wrong).
        // Row 2: a NaN.
        let z = t2(&[
            [ln2, 0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0, 1.0],
            [0.0, f32::NAN, 0.0, 0.0],
        ]);
        let s = calibration_samples(&z, &labels(&[0, 2, 0])).unwrap();
        assert!((s[0].confidence - 0.4).abs() < 1e-6);
        assert!(s[0].correct);
        assert!((s[0].nll - (2.5f64).ln()).abs() < 1e-6);
        assert!((s[1].confidence - 0.25).abs() < 1e-6);
        assert!(!s[1].correct);
        assert!((s[1].nll - 4f64.ln()).abs() < 1e-6);
        assert!(!s[2].correct && !s[2].nll.is_finite());
        let mean = mean_nll(&s[..2]);
        assert!((mean - (2.5f64.ln() + 4f64.ln()) / 2.0).abs() < 1e-6);
        assert!(mean_nll(&[]).is_nan());
        // ECE of the two finite rows, 15 bins: 0.4 in bin 6 (right), 0.25 in bin 4 (wrong):
        // (|1 − 0.4| + |0 − 0.25|)/2.
        assert!((expected_calibration_error(&s[..2], ECE_BINS) - 0.425).abs() < 1e-6);
    }
}
