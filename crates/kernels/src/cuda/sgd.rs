//! The fused SGD update on CUDA: one launch per parameter updates θ and its momentum buffer.

use super::{cfg, dev_ptr, launch};
use crate::sgd::SgdStep;
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
