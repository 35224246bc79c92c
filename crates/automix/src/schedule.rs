//! EMA momentum schedule of the k encoder (§5.12.6, upstream `CosineScheduleHook` with
//! `warming_up="constant"`, `adjust_scope=[0.1, 1.0]`).

use crate::config::AutoMixConfig;

/// Momentum `m(t)` for the 0-based global iteration `iter` of `total_iters`.
///
/// `m = start` for `t < t0 = trunc(adjust_start·T)`, then
/// `m = end − (end − start)·(cos(π·t/T) + 1)/2`. The cosine uses `t/T` (not `(t−t0)/(T−t0)`),
/// so `m` jumps from `start` to ≈ the cosine value at `t0`, as upstream does.
pub fn cosine_momentum(
    iter: usize,
    total_iters: usize,
    start: f64,
    end: f64,
    adjust_start: f64,
) -> f64 {
    if total_iters == 0 {
        return start;
    }
    let t0 = (adjust_start * total_iters as f64).trunc() as usize;
    if iter < t0 {
        return start;
    }
    let progress = iter.min(total_iters) as f64 / total_iters as f64;
    end - (end - start) * ((std::f64::consts::PI * progress).cos() + 1.0) / 2.0
}

/// [`cosine_momentum`] with the configured start, end and adjust scope.
pub fn momentum_at(cfg: &AutoMixConfig, iter: usize, total_iters: usize) -> f64 {
    cosine_momentum(
        iter,
        total_iters,
        cfg.momentum_start,
        cfg.momentum_end,
        cfg.momentum_adjust_start,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_at_start_middle_end() {
        let cfg = AutoMixConfig::default();
        let total = 1000;
        assert_eq!(momentum_at(&cfg, 0, total), 0.999);
        assert_eq!(momentum_at(&cfg, 99, total), 0.999);
        // At t0 = 100 the cosine of t/T takes over (a small jump, as upstream).
        let at_t0 = momentum_at(&cfg, 100, total);
        let expected_t0 =
            0.999999 - (0.999999 - 0.999) * ((std::f64::consts::PI * 0.1).cos() + 1.0) / 2.0;
        assert!((at_t0 - expected_t0).abs() < 1e-15);
        assert!(at_t0 > 0.999 && at_t0 < 0.99903);
        let middle = momentum_at(&cfg, 500, total);
        assert!(
            (middle - (0.999 + 0.999999) / 2.0).abs() < 1e-12,
            "{middle}"
        );
        assert!((momentum_at(&cfg, 1000, total) - 0.999999).abs() < 1e-15);
        // Monotone after t0.
        let mut prev = at_t0;
        for t in 101..=1000 {
            let m = momentum_at(&cfg, t, total);
            assert!(m >= prev);
            prev = m;
        }
    }
}
