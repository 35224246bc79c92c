//! Fused training-mode BatchNorm(+ReLU) on CUDA: the launches behind the BN ops' `cuda_fwd`.
//! Same math and packing as `cpu::batch_norm`; kernels in `kernels.cu`.

use super::{alloc, cfg, dev_ptr, launch, threads_for};
use crate::cpu::batch_norm::BnGeom;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};

/// Threads of the per-channel reduction blocks.
const REDUCE_THREADS: usize = 512;

/// `[mean (C), biased var (C)]`.
pub(crate) fn stats(g: &BnGeom, x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
    let dev = &x.device;
    let xp = dev_ptr(x, xl, "kernels-batch-norm-stats", "input")?;
    let (out, op) = alloc(dev, DType::F32, 2 * g.channels)?;
    let (n, c, p) = (g.batch as i32, g.channels as i32, g.plane as i32);
    let threads = threads_for(g.batch * g.plane, REDUCE_THREADS);
    launch!(
        dev,
        "mixbench_bn_stats_f32",
        cfg(g.channels, threads),
        &xp,
        &op,
        &n,
        &c,
        &p
    );
    Ok(out)
}

/// `y = relu?(x·scale + shift)`; `params = [weight, bias, mean, var]`.
pub(crate) fn forward(
    g: &BnGeom,
    (x, xl): (&CudaStorage, &Layout),
    (params, pl): (&CudaStorage, &Layout),
    eps: f64,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let name = "kernels-batch-norm-train";
    let xp = dev_ptr(x, xl, name, "input")?;
    let pp = dev_ptr(params, pl, name, "parameters")?;
    let (out, yp) = alloc(dev, DType::F32, g.batch * g.channels * g.plane)?;
    let (c, p, r) = (g.channels as i32, g.plane as i32, relu as i32);
    let planes = g.batch * g.channels;
    let threads = threads_for(g.plane, 256);
    launch!(
        dev,
        "mixbench_bn_fwd_f32",
        cfg(planes, threads),
        &xp,
        &pp,
        &yp,
        &c,
        &p,
        &eps,
        &r
    );
    Ok(out)
}

/// `[grad_x (N·C·P), grad_params (4C)]`, as `cpu::batch_norm::bn_backward`.
pub(crate) fn backward(
    g: &BnGeom,
    (x, xl): (&CudaStorage, &Layout),
    (params, pl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    eps: f64,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let name = "kernels-batch-norm-backward";
    let xp = dev_ptr(x, xl, name, "input")?;
    let pp = dev_ptr(params, pl, name, "parameters")?;
    let dyp = dev_ptr(dy, dyl, name, "output gradient")?;
    let nx = g.batch * g.channels * g.plane;
    let (out, dxp) = alloc(dev, DType::F32, nx + 4 * g.channels)?;
    let gpp = dxp + 4 * nx as u64;
    let (n, c, p, r) = (
        g.batch as i32,
        g.channels as i32,
        g.plane as i32,
        relu as i32,
    );
    let threads = threads_for(g.batch * g.plane, REDUCE_THREADS);
    launch!(
        dev,
        "mixbench_bn_bwd_reduce_f32",
        cfg(g.channels, threads),
        &xp,
        &pp,
        &dyp,
        &gpp,
        &n,
        &c,
        &p,
        &eps,
        &r
    );
    let threads = threads_for(g.plane, 256);
    launch!(
        dev,
        "mixbench_bn_bwd_dx_f32",
        cfg(g.batch * g.channels, threads),
        &xp,
        &pp,
        &dyp,
        &gpp,
        &dxp,
        &n,
        &c,
        &p,
        &eps,
        &r
    );
    Ok(out)
}
