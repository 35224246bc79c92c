//! Fused BatchNorm: training mode as custom ops (CPU kernels in `cpu::batch_norm`, CUDA launches
//! in `cuda::batch_norm`), evaluation mode as a broadcast affine.

use crate::cpu::{self, batch_norm::BnGeom};
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

/// Views `x [N, C, ...]` as `[N, C, plane]`.
fn geometry(x: &Shape) -> Result<BnGeom> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("kernels::batch_norm: input must be [N, C, ...], got {dims:?}");
    }
    Ok(BnGeom {
        batch: dims[0],
        channels: dims[1],
        plane: dims[2..].iter().product(),
    })
}

fn check_params(name: &str, t: &Tensor, channels: usize) -> Result<()> {
    if t.dims() != [channels] {
        bail!(
            "kernels::batch_norm: {name} must have shape [{channels}], got {:?}",
            t.dims()
        );
    }
    Ok(())
}

/// Whether the fused ops cover these tensors: f32 on the CPU, or (feature `cuda`) f32 on one
/// CUDA device.
fn fused_covers(tensors: &[&Tensor]) -> bool {
    let f32_args = tensors.iter().all(|t| t.dtype() == DType::F32);
    let on_cpu = tensors.iter().all(|t| matches!(t.device(), Device::Cpu));
    #[cfg(feature = "cuda")]
    let on_cuda = tensors
        .iter()
        .all(|t| t.device().is_cuda() && t.device().same_device(tensors[0].device()));
    #[cfg(not(feature = "cuda"))]
    let on_cuda = false;
    f32_args && (on_cpu || on_cuda)
}

/// Training-mode BatchNorm of `x [N, C, ...]` with per-channel `weight` and `bias` (`[C]`).
///
/// Returns `(y, batch_mean, batch_var)` where `batch_var` is the biased variance (divided by
/// the element count) used to normalise. `y` is differentiable in `x`, `weight` and `bias`;
/// the statistics are returned detached, for the caller's running-statistics update (which
/// conventionally uses the unbiased variance: multiply by `n / (n - 1)`).
///
/// On CPU f32 (and CUDA f32 with feature `cuda`) the forward and the whole backward are single
/// fused ops; elsewhere the same function is built from candle's generic ops.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_impl(x, weight, bias, eps, false)
}

/// [`batch_norm_train`] followed by ReLU, fused: `relu(bn(x))`, with the same statistics.
///
/// The gradient is zero where `bn(x) <= 0`, as PyTorch's ReLU backward. (candle's own `relu`
/// passes the gradient at exactly 0, so the unfused fallback differs there, and only there.)
pub fn batch_norm_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_impl(x, weight, bias, eps, true)
}

fn batch_norm_train_impl(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let geom = geometry(x.shape())?;
    check_params("weight", weight, geom.channels)?;
    check_params("bias", bias, geom.channels)?;
    if !fused_covers(&[x, weight, bias]) {
        let (y, mean, var) = crate::reference::batch_norm_train(x, weight, bias, eps)?;
        let y = if relu { y.relu()? } else { y };
        return Ok((y, mean, var));
    }
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&BnStatsOp { geom })?;
    let mean = stats.narrow(0, 0, geom.channels)?;
    let var = stats.narrow(0, geom.channels, geom.channels)?;
    // One parameter tensor so the op stays binary: gradients flow back through `cat` to
    // weight and bias, while the statistics come from a no-backward op and stay detached.
    let params = Tensor::cat(&[weight, bias, &mean, &var], 0)?;
    let y = x.apply_op2(&params, BnTrainOp { geom, eps, relu })?;
    Ok((y, mean, var))
}

/// Evaluation-mode BatchNorm: `(x - running_mean) / sqrt(running_var + eps) * weight + bias`
/// with per-channel `[C]` tensors, as one broadcast multiply-add (differentiable in all inputs).
pub fn batch_norm_eval(
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let geom = geometry(x.shape())?;
    for (name, t) in [
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ] {
        check_params(name, t, geom.channels)?;
    }
    let mut bshape = vec![1usize; x.rank()];
    bshape[1] = geom.channels;
    let scale = weight.div(&(running_var + eps)?.sqrt()?)?;
    let shift = bias.sub(&running_mean.mul(&scale)?)?;
    x.broadcast_mul(&scale.reshape(bshape.as_slice())?)?
        .broadcast_add(&shift.reshape(bshape.as_slice())?)
}

/// `x -> [mean (C), biased var (C)]`.
struct BnStatsOp {
    geom: BnGeom,
}

impl CustomOp1 for BnStatsOp {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::counters::record(crate::OpKind::BnStats, 1);
        let x = cpu::f32_slice(s, l, self.name(), "input")?;
        let stats = cpu::batch_norm::bn_stats(&self.geom, x);
        Ok((CpuStorage::F32(stats), Shape::from(2 * self.geom.channels)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::counters::record(crate::OpKind::BnStats, 1);
        let stats = crate::cuda::batch_norm::stats(&self.geom, s, l)?;
        Ok((stats, Shape::from(2 * self.geom.channels)))
    }
}

/// `(x, [weight, bias, mean, var]) -> y`; backward in one fused op.
struct BnTrainOp {
    geom: BnGeom,
    eps: f64,
    relu: bool,
}

impl CustomOp2 for BnTrainOp {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::counters::record(crate::OpKind::BnForward, 1);
        let x = cpu::f32_slice(s1, l1, self.name(), "input")?;
        let params = cpu::f32_slice(s2, l2, self.name(), "parameters")?;
        let y = cpu::batch_norm::bn_forward(&self.geom, x, params, self.eps, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::counters::record(crate::OpKind::BnForward, 1);
        let y =
            crate::cuda::batch_norm::forward(&self.geom, (s1, l1), (s2, l2), self.eps, self.relu)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = BnBackwardOp {
            geom: self.geom,
            eps: self.eps,
            relu: self.relu,
        };
        let packed = x.apply_op3_no_bwd(params, &grad_res.contiguous()?, &op)?;
        let n = x.elem_count();
        let grad_x = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let grad_params = packed.narrow(0, n, 4 * self.geom.channels)?;
        Ok((Some(grad_x), Some(grad_params)))
    }
}

/// `(x, params, grad_y) -> [grad_x (flat), grad_params (4C)]`.
struct BnBackwardOp {
    geom: BnGeom,
    eps: f64,
    relu: bool,
}

impl CustomOp3 for BnBackwardOp {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-backward"
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
        crate::counters::record(crate::OpKind::BnBackward, 2);
        let x = cpu::f32_slice(s1, l1, self.name(), "input")?;
        let params = cpu::f32_slice(s2, l2, self.name(), "parameters")?;
        let dy = cpu::f32_slice(s3, l3, self.name(), "output gradient")?;
        let packed = cpu::batch_norm::bn_backward(&self.geom, x, params, dy, self.eps, self.relu);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
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
        crate::counters::record(crate::OpKind::BnBackward, 2);
        let packed = crate::cuda::batch_norm::backward(
            &self.geom,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            self.eps,
            self.relu,
        )?;
        let len = l1.shape().elem_count() + 4 * self.geom.channels;
        Ok((packed, Shape::from(len)))
    }
}
