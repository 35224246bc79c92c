//! The fused SGD update on CUDA: one launch per parameter updates θ and its momentum buffer.

use super::{cfg, dev_ptr, launch, tensor_ptr};
use crate::sgd::{SgdParam, SgdStep};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, Layout, Result};

/// θ (in place), grad, buf: the momentum buffer is written too, through its device address.
/// candle sees `buf` as a read-only source of the in-place op on θ; writing it from the kernel is
/// sound because nothing else reads or writes it on another stream (see the module docs of
/// `cuda`), and the caller owns the buffer exclusively.
pub(crate) fn update(
    step: &SgdStep,
    (theta, tl): (&CudaStorage, &Layout),
    (grad, gl): (&CudaStorage, &Layout),
    buf: Option<(&CudaStorage, &Layout)>,
) -> Result<()> {
    let name = "kernels-sgd";
    let dev = &theta.device;
    let n = tl.shape().elem_count();
    if gl.shape().elem_count() != n {
        bail!(
            "{name}: gradient shape {:?} != parameter shape {:?}",
            gl.shape(),
            tl.shape()
        );
    }
    let tp = dev_ptr(theta, tl, name, "parameter")?;
    let gp = dev_ptr(grad, gl, name, "gradient")?;
    let bp = match buf {
        Some((b, bl)) => dev_ptr(b, bl, name, "momentum buffer")?,
        None => 0,
    };
    let flags = step.flags(buf.is_some());
    let (n64, wd, mu, lr) = (
        n as u64,
        step.weight_decay as f32,
        step.momentum as f32,
        step.lr as f32,
    );
    let threads = 256;
    let blocks = n.div_ceil(threads).min(4096);
    launch!(
        dev,
        "mixbench_sgd_f32",
        cfg(blocks, threads),
        &tp,
        &gp,
        &bp,
        &n64,
        &wd,
        &mu,
        &lr,
        &flags
    );
    Ok(())
}

/// Tensors per multi-tensor launch: `src/sgd_multi_max.in`, which build.rs also passes to nvcc
/// as `SGD_MULTI_MAX`, the array length of the CUDA struct.
pub(crate) const MAX_TENSORS: usize = crate::sgd::MULTI_MAX_TENSORS;

/// The kernel's by-value argument `SgdMultiArgs` (kernels.cu): same field order and layout.
/// Both sides assert the same size and offsets (kernels.cu with `static_assert`), so a change
/// to one alone fails the build instead of passing garbage pointers.
#[repr(C)]
#[derive(Clone, Copy)]
struct SgdMultiArgs {
    theta: [u64; MAX_TENSORS],
    grad: [u64; MAX_TENSORS],
    buf: [u64; MAX_TENSORS],
    n: [u64; MAX_TENSORS],
    count: u32,
    _pad: u32,
}

const _: () = {
    assert!(std::mem::size_of::<SgdMultiArgs>() == 32 * MAX_TENSORS + 8);
    assert!(std::mem::offset_of!(SgdMultiArgs, n) == 24 * MAX_TENSORS);
    assert!(std::mem::offset_of!(SgdMultiArgs, count) == 32 * MAX_TENSORS);
    // With the kernel's four 4-byte scalars, under the 4 KiB kernel-parameter limit.
    assert!(std::mem::size_of::<SgdMultiArgs>() + 16 <= 4096);
};

// SAFETY: plain old data with C layout, mirrored field by field by the CUDA struct.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for SgdMultiArgs {}

/// One launch updating up to [`MAX_TENSORS`] parameters (same step, same device, f32,
/// contiguous) and their buffers in place. θ and the buffers are written through their
/// addresses, as in [`update`]: the caller owns them exclusively and everything is ordered on
/// the device's one stream.
pub(crate) fn update_multi(step: &SgdStep, params: &[SgdParam<'_>]) -> Result<()> {
    let name = "kernels-sgd-multi";
    if params.is_empty() {
        return Ok(());
    }
    if params.len() > MAX_TENSORS {
        bail!("{name}: at most {MAX_TENSORS} tensors per launch");
    }
    let dev = match &*params[0].theta.storage_and_layout().0 {
        candle_core::Storage::Cuda(s) => s.device.clone(),
        _ => bail!("{name}: parameters must be on a CUDA device"),
    };
    let mut args = SgdMultiArgs {
        theta: [0; MAX_TENSORS],
        grad: [0; MAX_TENSORS],
        buf: [0; MAX_TENSORS],
        n: [0; MAX_TENSORS],
        count: params.len() as u32,
        _pad: 0,
    };
    let mut max_n = 0;
    for (i, p) in params.iter().enumerate() {
        args.theta[i] = tensor_ptr(p.theta, name, "parameter")?;
        args.grad[i] = tensor_ptr(p.grad, name, "gradient")?;
        args.buf[i] = match p.buf {
            Some(b) => tensor_ptr(b, name, "momentum buffer")?,
            None => 0,
        };
        let n = p.theta.elem_count();
        args.n[i] = n as u64;
        max_n = max_n.max(n);
    }
    let flags = step.flags(params[0].buf.is_some());
    let (wd, mu, lr) = (
        step.weight_decay as f32,
        step.momentum as f32,
        step.lr as f32,
    );
    let threads = 256;
    let mut config = cfg(max_n.div_ceil(threads).min(512), threads);
    config.grid_dim.1 = params.len() as u32;
    launch!(
        dev,
        "mixbench_sgd_multi_f32",
        config,
        &args,
        &wd,
        &mu,
        &lr,
        &flags
    );
    Ok(())
}
