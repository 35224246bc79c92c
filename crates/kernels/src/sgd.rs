//! SGD with momentum and weight decay as an in-place update of one parameter.
//!
//! PyTorch's order, `g = grad + wd·θ; buf = μ·buf + g (first step: buf = g); θ -= lr·buf`
//! (Nesterov: `θ -= lr·(g + μ·buf)`), computed in f32 with exactly the roundings of the
//! generic-op formulation it replaces (each `x.affine(a, 0.0)` is `x·a + 0.0`), so the results
//! are bit-identical to it on the CPU and, with the CUDA kernel's explicit round-to-nearest
//! operations, on CUDA too.
//!
//! CPU: two in-place ops (the buffer, then θ). CUDA: one kernel launch per parameter that writes
//! both. Other dtypes or non-contiguous tensors: candle's generic ops, written back in place.

use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// Hyper-parameters of one update of one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// Learning rate of the parameter's group for this step.
    pub lr: f64,
    /// L2 weight decay (`g = grad + wd·θ`); 0 skips it.
    pub weight_decay: f64,
    /// Momentum μ; 0 means plain SGD and no buffer.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// First update of this buffer: `buf = g` instead of `μ·buf + g` (its old contents are
    /// ignored, so a fresh uninitialised or zero buffer is fine).
    pub first: bool,
}

impl SgdStep {
    /// Kernel flags: 1 weight decay, 2 momentum, 4 first step, 8 Nesterov.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn flags(&self, has_buf: bool) -> i32 {
        (self.weight_decay != 0.0) as i32
            | ((has_buf as i32) << 1)
            | ((self.first as i32) << 2)
            | (((self.nesterov && has_buf) as i32) << 3)
    }

    fn f32s(&self) -> (f32, f32, f32) {
        (
            self.weight_decay as f32,
            self.momentum as f32,
            self.lr as f32,
        )
    }
}

/// Updates `theta` (and `buf`, which must be given exactly when `step.momentum != 0`) in place
/// with gradient `grad`. All three must have the same shape and device. Neither tensor is
/// replaced, so views sharing their storage (e.g. a `Var` in a `VarMap`) see the update.
pub fn sgd_update(
    theta: &Tensor,
    grad: &Tensor,
    buf: Option<&Tensor>,
    step: &SgdStep,
) -> Result<()> {
    check(theta, grad, buf, step)?;
    if !fused_covers(theta, grad, buf) {
        return generic(theta, grad, buf, step);
    }
    // CPU: two in-place ops (buffer, then θ); CUDA: one launch.
    crate::counters::record(crate::OpKind::Sgd, 1);
    fused_update(theta, grad, buf, step)
}

/// The fused update of one covered parameter (f32, contiguous, one device).
fn fused_update(theta: &Tensor, grad: &Tensor, buf: Option<&Tensor>, step: &SgdStep) -> Result<()> {
    let op = SgdParamOp { step: *step };
    match buf {
        Some(buf) => {
            if theta.device().is_cpu() {
                buf.inplace_op3(grad, theta, &SgdBufOp { step: *step })?;
            }
            // On CUDA this one launch updates the buffer as well (see SgdParamOp).
            theta.inplace_op3(grad, buf, &op)
        }
        None => theta.inplace_op2(grad, &op),
    }
}

/// One parameter of a [`sgd_update_multi`] call.
#[derive(Debug, Clone, Copy)]
pub struct SgdParam<'a> {
    /// The parameter, updated in place.
    pub theta: &'a Tensor,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// Its momentum buffer (exactly when `step.momentum != 0`), updated in place.
    pub buf: Option<&'a Tensor>,
    /// The update's hyper-parameters.
    pub step: SgdStep,
}

/// [`sgd_update`] of many parameters, each bit-identical to its single-parameter update.
///
/// CUDA (feature `cuda`): the parameters that share hyper-parameters and device go through one
/// multi-tensor kernel launch per 96 tensors (pointers and sizes passed by value in the launch's
/// argument block, so nothing is uploaded); a ResNet-18 step is one launch. CPU: one pass over
/// the list, each parameter updated by the two in-place ops of [`sgd_update`] (candle lets an op
/// mutate one storage, and the update writes both θ and its buffer). Tensors the fused path does
/// not cover (other dtypes, non-contiguous) take [`sgd_update`]'s generic fallback.
pub fn sgd_update_multi(params: &[SgdParam<'_>]) -> Result<()> {
    let mut rest = Vec::new();
    let mut groups: Vec<(SgdStep, Vec<SgdParam<'_>>)> = Vec::new();
    for p in params {
        let covered =
            check(p.theta, p.grad, p.buf, &p.step).is_ok() && fused_covers(p.theta, p.grad, p.buf);
        if !covered {
            rest.push(*p);
            continue;
        }
        let dev = p.theta.device();
        match groups
            .iter_mut()
            .find(|(s, list)| *s == p.step && list[0].theta.device().same_device(dev))
        {
            Some((_, list)) => list.push(*p),
            None => groups.push((p.step, vec![*p])),
        }
    }
    for (step, list) in &groups {
        for chunk in list.chunks(MULTI_MAX_TENSORS) {
            // One launch per chunk on CUDA; the CPU makes the same count for the report.
            crate::counters::record(crate::OpKind::SgdMulti, 1);
            #[cfg(feature = "cuda")]
            if chunk[0].theta.device().is_cuda() {
                crate::cuda::sgd::update_multi(step, chunk)?;
                continue;
            }
            for p in chunk {
                fused_update(p.theta, p.grad, p.buf, step)?;
            }
        }
    }
    for p in rest {
        sgd_update(p.theta, p.grad, p.buf, &p.step)?;
    }
    Ok(())
}

/// Tensors per multi-tensor CUDA launch (see `cuda::sgd::update_multi`); the same number sizes
/// the kernel's argument block in kernels.cu (build.rs passes it to nvcc).
pub(crate) const MULTI_MAX_TENSORS: usize = include!("sgd_multi_max.in");

/// Shape and buffer checks shared by the single and multi-tensor updates.
fn check(theta: &Tensor, grad: &Tensor, buf: Option<&Tensor>, step: &SgdStep) -> Result<()> {
    if buf.is_some() != (step.momentum != 0.0) {
        bail!("kernels::sgd_update: a momentum buffer is needed exactly when momentum != 0");
    }
    for t in std::iter::once(grad).chain(buf) {
        if t.dims() != theta.dims() {
            bail!(
                "kernels::sgd_update: shape {:?} != parameter shape {:?}",
                t.dims(),
                theta.dims()
            );
        }
    }
    Ok(())
}

/// Whether the fused kernels take these tensors: f32, contiguous, one device (CPU, or CUDA in
/// a `cuda` build).
fn fused_covers(theta: &Tensor, grad: &Tensor, buf: Option<&Tensor>) -> bool {
    let all = || {
        std::iter::once(theta)
            .chain(std::iter::once(grad))
            .chain(buf)
    };
    all().all(|t| {
        t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(theta.device())
    }) && (theta.device().is_cpu() || cfg!(feature = "cuda"))
}

/// The generic-op formulation (the former `train::Sgd::step` body), results copied back.
fn generic(theta: &Tensor, grad: &Tensor, buf: Option<&Tensor>, step: &SgdStep) -> Result<()> {
    let th = theta.detach();
    let grad = grad.detach();
    let g = if step.weight_decay != 0.0 {
        (grad + th.affine(step.weight_decay, 0.0)?)?
    } else {
        grad
    };
    let direction = match buf {
        Some(buf) => {
            let new_buf = if step.first {
                g.copy()?
            } else {
                (buf.affine(step.momentum, 0.0)? + &g)?
            };
            let d = if step.nesterov {
                (&g + new_buf.affine(step.momentum, 0.0)?)?
            } else {
                new_buf.clone()
            };
            buf.slice_set(&new_buf.contiguous()?, 0, 0)?;
            d
        }
        None => g,
    };
    let updated = (th - direction.affine(step.lr, 0.0)?)?;
    theta.slice_set(&updated.contiguous()?, 0, 0)
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    crate::cpu::f32_slice(s, l, "kernels-sgd", what)
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    crate::cpu::f32_slice_mut(s, l, "kernels-sgd", "destination")
}

/// `g = grad + wd·θ`, rounded as `grad + (θ·wd + 0.0)`.
#[inline]
fn decayed(grad: f32, th: f32, wd: f32, on: bool) -> f32 {
    if on {
        grad + (th * wd + 0.0)
    } else {
        grad
    }
}

/// CPU: `buf = first ? g : (buf·μ + 0.0) + g`; sources `(grad, θ)`.
struct SgdBufOp {
    step: SgdStep,
}

impl InplaceOp3 for SgdBufOp {
    fn name(&self) -> &'static str {
        "kernels-sgd-buffer"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (wd, mu, _) = self.step.f32s();
        let wd_on = self.step.weight_decay != 0.0;
        let grad = slice(s2, l2, "gradient")?;
        let theta = slice(s3, l3, "parameter")?;
        let buf = slice_mut(s1, l1)?;
        for ((b, &gr), &th) in buf.iter_mut().zip(grad).zip(theta) {
            let g = decayed(gr, th, wd, wd_on);
            *b = if self.step.first {
                g
            } else {
                (*b * mu + 0.0) + g
            };
        }
        Ok(())
    }
}

/// θ update. CPU: sources `(grad, buf)` with `buf` already updated by [`SgdBufOp`]. CUDA: one
/// kernel updates `buf` and θ from their old values.
struct SgdParamOp {
    step: SgdStep,
}

impl SgdParamOp {
    fn cpu(&self, theta: &mut [f32], grad: &[f32], buf: Option<&[f32]>) {
        let (wd, mu, lr) = self.step.f32s();
        let wd_on = self.step.weight_decay != 0.0;
        for (i, th) in theta.iter_mut().enumerate() {
            let g = decayed(grad[i], *th, wd, wd_on);
            let d = match buf {
                Some(b) if self.step.nesterov => g + (b[i] * mu + 0.0),
                Some(b) => b[i],
                None => g,
            };
            *th -= d * lr + 0.0;
        }
    }
}

impl InplaceOp3 for SgdParamOp {
    fn name(&self) -> &'static str {
        "kernels-sgd"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let grad = slice(s2, l2, "gradient")?;
        let buf = slice(s3, l3, "momentum buffer")?;
        self.cpu(slice_mut(s1, l1)?, grad, Some(buf));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::sgd::update(&self.step, (s1, l1), (s2, l2), Some((s3, l3)))
    }
}

impl InplaceOp2 for SgdParamOp {
    fn name(&self) -> &'static str {
        "kernels-sgd"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let grad = slice(s2, l2, "gradient")?;
        self.cpu(slice_mut(s1, l1)?, grad, None);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda::sgd::update(&self.step, (s1, l1), (s2, l2), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused CPU update is bit-identical to the generic-op formulation, every option.
    #[test]
    fn fused_cpu_update_is_bit_identical_to_generic_ops() {
        let dev = Device::Cpu;
        let n = 257;
        let vals = |seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 997.0 - 1.0)
                .collect()
        };
        for (wd, mu, nesterov) in [
            (1e-4, 0.9, false),
            (0.0, 0.9, false),
            (5e-4, 0.9, true),
            (1e-4, 0.0, false),
        ] {
            let make = || Tensor::from_vec(vals(1), n, &dev).unwrap();
            let (t_fused, t_gen) = (make(), make());
            let bufs = (mu != 0.0).then(|| {
                (
                    Tensor::zeros(n, DType::F32, &dev).unwrap(),
                    Tensor::zeros(n, DType::F32, &dev).unwrap(),
                )
            });
            for k in 0..3u32 {
                let grad = Tensor::from_vec(vals(7 + k), n, &dev).unwrap();
                let step = SgdStep {
                    lr: 0.1 / (k + 1) as f64,
                    weight_decay: wd,
                    momentum: mu,
                    nesterov,
                    first: k == 0,
                };
                let (bf, bg) = match &bufs {
                    Some((a, b)) => (Some(a), Some(b)),
                    None => (None, None),
                };
                sgd_update(&t_fused, &grad, bf, &step).unwrap();
                generic(&t_gen, &grad, bg, &step).unwrap();
            }
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(
                bits(&t_fused),
                bits(&t_gen),
                "wd {wd} mu {mu} nesterov {nesterov}"
            );
            if let Some((a, b)) = &bufs {
                assert_eq!(bits(a), bits(b));
            }
        }
    }
}
