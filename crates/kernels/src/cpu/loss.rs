//! Soft-target cross-entropy on contiguous `[rows, classes]` f32 buffers.
//!
//! Each row's log-sum-exp and every sum are taken in f64 (the rows are short and few), in a
//! fixed order, so the CUDA kernels (`soft_ce` in `kernels.cu`), which do the same in f64,
//! agree to the last bit in practice.

/// `(max, log Σ exp(z − max))` folded into `log Σ exp(z)`, in f64.
fn log_sum_exp(z: &[f32]) -> f64 {
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// `(1/rows) Σ_i Σ_c t_ic · (lse_i − z_ic)` over `rows × classes` logits and targets; terms with `t = 0` are skipped, so a class that
/// no target names cannot turn the loss into `0 · ∞`.
pub(crate) fn soft_cross_entropy(
    logits: &[f32],
    targets: &[f32],
    rows: usize,
    classes: usize,
) -> f32 {
    let mut total = 0f64;
    for (z, t) in logits
        .chunks_exact(classes)
        .zip(targets.chunks_exact(classes))
    {
        let lse = log_sum_exp(z);
        for (&zc, &tc) in z.iter().zip(t) {
            if tc != 0.0 {
                total += tc as f64 * (lse - zc as f64);
            }
        }
    }
    (total / rows.max(1) as f64) as f32
}

/// Gradient of [`soft_cross_entropy`] (`rows × classes` logits) times the upstream gradient `grad`:
/// `grad / rows · (softmax(z_i) · Σ_c t_ic − t_i)` per row.
pub(crate) fn soft_cross_entropy_grad(
    logits: &[f32],
    targets: &[f32],
    rows: usize,
    classes: usize,
    grad: f32,
) -> Vec<f32> {
    let scale = grad as f64 / rows.max(1) as f64;
    let mut out = Vec::with_capacity(logits.len());
    for (z, t) in logits
        .chunks_exact(classes)
        .zip(targets.chunks_exact(classes))
    {
        let lse = log_sum_exp(z);
        let mass: f64 = t.iter().map(|&v| v as f64).sum();
        out.extend(
            z.iter()
                .zip(t)
                .map(|(&zc, &tc)| (scale * ((zc as f64 - lse).exp() * mass - tc as f64)) as f32),
        );
    }
    out
}
