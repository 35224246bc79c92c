//! Residual `relu(a + b)` on CUDA: one launch forward, one backward (kernels in `kernels.cu`).

use super::{alloc, cfg, dev_ptr, launch};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};

fn grid(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    cfg(n.div_ceil(256).min(65_535), 256)
}

/// `y = max(a + b, 0)`.
pub(crate) fn forward(
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let name = "kernels-add-relu";
    let dev = &a.device;
    let ap = dev_ptr(a, al, name, "lhs")?;
    let bp = dev_ptr(b, bl, name, "rhs")?;
    let n = al.shape().elem_count();
    let (out, yp) = alloc(dev, DType::F32, n)?;
    let n64 = n as u64;
    launch!(dev, "mixbench_add_relu_f32", grid(n), &ap, &bp, &yp, &n64);
    Ok(out)
}

/// `g = dy · [a + b >= 0]`.
pub(crate) fn backward(
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let name = "kernels-add-relu-backward";
    let dev = &a.device;
    let ap = dev_ptr(a, al, name, "lhs")?;
    let bp = dev_ptr(b, bl, name, "rhs")?;
    let dyp = dev_ptr(dy, dyl, name, "output gradient")?;
    let n = al.shape().elem_count();
    let (out, gp) = alloc(dev, DType::F32, n)?;
    let n64 = n as u64;
    launch!(
        dev,
        "mixbench_add_relu_bwd_f32",
        grid(n),
        &ap,
        &bp,
        &dyp,
        &gp,
        &n64
    );
    Ok(out)
}
