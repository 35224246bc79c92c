//! Residual `relu(a + b)` as one fused op forward and one backward (CPU kernel below, CUDA
//! kernels in `kernels.cu`).
//!
//! Same values as candle's `(a + b)?.relu()`, bit for bit on the CPU, gradient included:
//! candle's ReLU backward passes the gradient where `a + b >= 0` (so also at exactly 0, where
//! PyTorch's does not), and this op keeps that convention so that CPU results do not change.
//! The backward recomputes `a + b` from its inputs instead of storing a mask.

use crate::cpu;
use candle_core::Tensor;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape};

/// Elements per parallel chunk of the CPU kernels.
const CHUNK: usize = 1 << 14;

/// `relu(a + b)` for two tensors of the same shape, differentiable in both.
///
/// f32 on the CPU (or on one CUDA device with feature `cuda`): one op forward, one backward
/// whose single output is the gradient of both inputs. Elsewhere: `(a + b)?.relu()`.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!(
            "kernels::add_relu: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        );
    }
    if !crate::fused_covers(&[a, b]) {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}

struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "kernels-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::counters::record(crate::OpKind::AddReluForward, 1);
        let a = cpu::f32_slice(s1, l1, self.name(), "lhs")?;
        let b = cpu::f32_slice(s2, l2, self.name(), "rhs")?;
        let y = cpu::par_new_vec(a.len(), 0, CHUNK, |i, y| {
            let (a, b) = (&a[i * CHUNK..][..y.len()], &b[i * CHUNK..][..y.len()]);
            cpu::with_avx2(
                #[inline(always)]
                || {
                    for j in 0..y.len() {
                        // candle: add, then relu as `v.max(0f32)`.
                        y[j].write((a[j] + b[j]).max(0f32));
                    }
                },
            )
        });
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
        crate::counters::record(crate::OpKind::AddReluForward, 1);
        let y = crate::cuda::residual::forward((s1, l1), (s2, l2))?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = add_relu_backward(a, b, grad_res)?;
        let ga = a.track_op().then(|| g.clone());
        let gb = b.track_op().then_some(g);
        Ok((ga, gb))
    }
}

/// The gradient of both inputs of [`add_relu`]`(a, b)` given the output gradient `grad`
/// (`grad · [a + b >= 0]`), for a caller that runs its own backward pass: the same op candle's
/// autograd runs for [`add_relu`] (generic ops where that op does not run).
pub fn add_relu_backward(a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Tensor> {
    // The kernels read b and grad by a's element count: on CUDA a wrong shape reads out of
    // bounds, so check before any launch.
    for (name, t) in [("b", b), ("grad", grad)] {
        if t.shape() != a.shape() {
            bail!(
                "kernels::add_relu_backward: {name} {:?} does not match a {:?}",
                t.dims(),
                a.dims()
            );
        }
    }
    if !crate::fused_covers(&[a, b, grad]) {
        let mask = (a + b)?.ge(0.0)?.to_dtype(grad.dtype())?;
        return grad * mask;
    }
    a.contiguous()?
        .apply_op3_no_bwd(&b.contiguous()?, &grad.contiguous()?, &AddReluBackwardOp)
}

/// `(a, b, grad_y) -> grad_y · [a + b >= 0]`, the gradient of both inputs.
struct AddReluBackwardOp;

impl CustomOp3 for AddReluBackwardOp {
    fn name(&self) -> &'static str {
        "kernels-add-relu-backward"
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
        crate::counters::record(crate::OpKind::AddReluBackward, 1);
        let a = cpu::f32_slice(s1, l1, self.name(), "lhs")?;
        let b = cpu::f32_slice(s2, l2, self.name(), "rhs")?;
        let dy = cpu::f32_slice(s3, l3, self.name(), "output gradient")?;
        let g = cpu::par_new_vec(a.len(), 0, CHUNK, |i, g| {
            let at = i * CHUNK;
            let (a, b, dy) = (
                &a[at..][..g.len()],
                &b[at..][..g.len()],
                &dy[at..][..g.len()],
            );
            cpu::with_avx2(
                #[inline(always)]
                || {
                    for j in 0..g.len() {
                        // candle: grad * (arg >= 0) as f32.
                        g[j].write(dy[j] * if a[j] + b[j] >= 0.0 { 1f32 } else { 0f32 });
                    }
                },
            )
        });
        Ok((CpuStorage::F32(g), l1.shape().clone()))
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
        crate::counters::record(crate::OpKind::AddReluBackward, 1);
        let g = crate::cuda::residual::backward((s1, l1), (s2, l2), (s3, l3))?;
        Ok((g, l1.shape().clone()))
    }
}
