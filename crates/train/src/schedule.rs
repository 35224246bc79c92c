//! Learning-rate and momentum schedules (spec §3.2, §5.12.6).

use std::f64::consts::PI;

/// Cosine annealing from `start` (at `t = 0`) to `end` (at `t = total`):
/// `end + ½·(start − end)·(1 + cos(π·t/total))`. `t > total` is clamped to `total`; a
/// `total` of 0 gives `end`.
pub fn cosine_anneal(t: f64, total: f64, start: f64, end: f64) -> f64 {
    if total <= 0.0 {
        return end;
    }
    let progress = (t / total).clamp(0.0, 1.0);
    end + 0.5 * (start - end) * (1.0 + (PI * progress).cos())
}

/// The learning rate of 0-based epoch `epoch0` of `max_epochs` (mmcv's per-epoch
/// `CosineAnnealingLrUpdaterHook`, no warm-up): `min + ½·(base − min)·(1 + cos(π·e/E))`.
/// Every iteration of the epoch uses this value; the last epoch still has a non-zero LR.
pub fn cosine_lr(epoch0: usize, max_epochs: usize, base_lr: f64, min_lr: f64) -> f64 {
    cosine_anneal(epoch0 as f64, max_epochs as f64, base_lr, min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_lr_at_start_middle_and_last_epoch() {
        assert_eq!(cosine_lr(0, 200, 0.1, 0.0), 0.1);
        assert!((cosine_lr(100, 200, 0.1, 0.0) - 0.05).abs() < 1e-15);
        let last = 0.05 * (1.0 + (PI * 199.0 / 200.0).cos());
        assert!((cosine_lr(199, 200, 0.1, 0.0) - last).abs() < 1e-15);
        assert!(last > 0.0 && last < 1e-5, "{last}");
        // AutoMix: min_lr = 0.05.
        assert!((cosine_lr(200, 400, 0.1, 0.05) - 0.075).abs() < 1e-15);
        assert!((cosine_lr(399, 400, 0.1, 0.05) - 0.05).abs() < 1e-6);
    }

    #[test]
    fn cosine_anneal_goes_from_start_to_end() {
        assert_eq!(cosine_anneal(0.0, 10.0, 0.999, 0.999999), 0.999);
        assert_eq!(cosine_anneal(10.0, 10.0, 0.999, 0.999999), 0.999999);
        assert_eq!(cosine_anneal(12.0, 10.0, 0.999, 0.999999), 0.999999);
        assert!(
            (cosine_anneal(2.5, 10.0, 1.0, 0.0) - 0.5 * (1.0 + (PI / 4.0).cos())).abs() < 1e-15
        );
    }
}
