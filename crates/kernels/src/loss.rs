//! Soft-target cross-entropy as one op forward and one backward (CPU kernels in `cpu::loss`,
//! CUDA kernels in `kernels.cu`).
//!
//! Built from generic ops (log-softmax, multiply, two reductions, and the one-hot/λ arithmetic
//! around them), the loss of a mixed batch was ≈ 30 candle ops forward and ≈ 100 backward, each
//! a CUDA launch, for a `100 × 10` matrix.

use crate::cpu;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `(1/N) Σ_i Σ_c −t_ic · log softmax(z_i)_c` for logits `z` and targets `t` (both `N × C`),
/// as a 0-dim tensor, differentiable in `logits` (and in `targets`, through the fallback).
///
/// Terms with `t_ic = 0` are skipped, so a row's unnamed classes never contribute `0 · ∞`.
/// Rows need not sum to one: the gradient is `(softmax(z_i) · Σ_c t_ic − t_i) / N`.
///
/// f32 on the CPU (or on one CUDA device with feature `cuda`) with targets that need no
/// gradient: one op forward, one backward, log-sum-exp and sums in f64. Elsewhere: candle's
/// generic ops ([`crate::reference::soft_cross_entropy`]).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, classes) = match logits.dims() {
        &[n, c] if c > 0 => (n, c),
        d => bail!("kernels::soft_cross_entropy: logits must be [N, C] with C > 0, got {d:?}"),
    };
    if targets.dims() != [rows, classes] {
        bail!(
            "kernels::soft_cross_entropy: targets {:?} must have the logits' shape [{rows}, {classes}]",
            targets.dims()
        );
    }
    if !crate::fused_covers(&[logits, targets]) || targets.track_op() {
        return crate::reference::soft_cross_entropy(logits, targets);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, SoftCeOp { rows, classes })
}

struct SoftCeOp {
    rows: usize,
    classes: usize,
}

impl CustomOp2 for SoftCeOp {
    fn name(&self) -> &'static str {
        "kernels-soft-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::counters::record(crate::OpKind::SoftCeForward, 1);
        let z = cpu::f32_slice(s1, l1, self.name(), "logits")?;
        let t = cpu::f32_slice(s2, l2, self.name(), "targets")?;
        let loss = cpu::loss::soft_cross_entropy(z, t, self.rows, self.classes);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::counters::record(crate::OpKind::SoftCeForward, 1);
        let out = crate::cuda::loss::forward((s1, l1), (s2, l2), self.rows, self.classes)?;
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // `soft_cross_entropy` only takes this op for targets without gradient.
        let op = SoftCeBackwardOp {
            rows: self.rows,
            classes: self.classes,
        };
        let grad = logits.apply_op3_no_bwd(targets, &grad_res.contiguous()?, &op)?;
        Ok((Some(grad), None))
    }
}

/// `(logits, targets, grad_loss) -> grad_logits`.
struct SoftCeBackwardOp {
    rows: usize,
    classes: usize,
}

impl CustomOp3 for SoftCeBackwardOp {
    fn name(&self) -> &'static str {
        "kernels-soft-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::counters::record(crate::OpKind::SoftCeBackward, 1);
        let z = cpu::f32_slice(s1, l1, self.name(), "logits")?;
        let t = cpu::f32_slice(s2, l2, self.name(), "targets")?;
        let g = cpu::f32_slice(s3, l3, self.name(), "output gradient")?;
        let Some(&g) = g.first() else {
            bail!("{}: empty output gradient", self.name());
        };
        let grad = cpu::loss::soft_cross_entropy_grad(z, t, self.rows, self.classes, g);
        Ok((CpuStorage::F32(grad), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::counters::record(crate::OpKind::SoftCeBackward, 1);
        let out =
            crate::cuda::loss::backward((s1, l1), (s2, l2), (s3, l3), self.rows, self.classes)?;
        Ok((out, l1.shape().clone()))
    }
}
