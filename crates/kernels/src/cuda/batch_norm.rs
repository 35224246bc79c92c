//! Fused training-mode BatchNorm(+ReLU) on CUDA: the launches behind the BN ops' `cuda_fwd`.
//! Same math and packing as `cpu::batch_norm`; kernels in `kernels.cu`.

use super::{alloc, cfg, dev_ptr, launch, threads_for};
use crate::cpu::batch_norm::{BnGeom, RunningCoefs};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};

/// Threads of the per-channel reduction blocks.
const REDUCE_THREADS: usize = 512;

/// `[mean (C), biased var (C)]`; with `running = (mean ptr, var ptr, coefs)` the same launch
/// updates the running statistics in place (thread 0 of each channel's block).
pub(crate) fn stats(
    g: &BnGeom,
    x: &CudaStorage,
    xl: &Layout,
    running: Option<(u64, u64, RunningCoefs)>,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let xp = dev_ptr(x, xl, "kernels-batch-norm-stats", "input")?;
    let (out, op) = alloc(dev, DType::F32, 2 * g.channels)?;
    let (n, c, p) = (g.batch as i32, g.channels as i32, g.plane as i32);
    let (rm, rv, k) = running.unwrap_or((0, 0, RunningCoefs::new(0.0, 2)));
    let update = running.is_some() as i32;
    let threads = threads_for(g.batch * g.plane, REDUCE_THREADS);
    launch!(
        dev,
        "mixbench_bn_stats_f32",
        cfg(g.channels, threads),
        &xp,
        &op,
        &n,
        &c,
        &p,
        &rm,
        &rv,
        &k.keep,
        &k.take,
        &k.unbias,
        &update
    );
    Ok(out)
}

/// `y = relu?(x·scale + shift)` from weight, bias and `stats = [mean, var]` (device address).
pub(crate) fn forward(
    g: &BnGeom,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    stats: u64,
    eps: f64,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let name = "kernels-batch-norm-train";
    let xp = dev_ptr(x, xl, name, "input")?;
    let wp = dev_ptr(w, wl, name, "weight")?;
    let bp = dev_ptr(b, bl, name, "bias")?;
    let (out, yp) = alloc(dev, DType::F32, g.batch * g.channels * g.plane)?;
    let (c, p, r) = (g.channels as i32, g.plane as i32, relu as i32);
    let planes = g.batch * g.channels;
    let threads = threads_for(g.plane, 256);
    launch!(
        dev,
        "mixbench_bn_fwd_f32",
        cfg(planes, threads),
        &xp,
        &wp,
        &bp,
        &stats,
        &yp,
        &c,
        &p,
        &eps,
        &r
    );
    Ok(out)
}

/// `[grad_x (N·C·P), grad_weight (C), grad_bias (C)]`, as `cpu::batch_norm::bn_backward`;
/// `(w, b)` are device addresses.
pub(crate) fn backward(
    g: &BnGeom,
    (x, xl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    (stats, sl): (&CudaStorage, &Layout),
    (wp, bp): (u64, u64),
    eps: f64,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let name = "kernels-batch-norm-backward";
    let xp = dev_ptr(x, xl, name, "input")?;
    let dyp = dev_ptr(dy, dyl, name, "output gradient")?;
    let sp = dev_ptr(stats, sl, name, "statistics")?;
    let nx = g.batch * g.channels * g.plane;
    let (out, dxp) = alloc(dev, DType::F32, nx + 2 * g.channels)?;
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
        &wp,
        &bp,
        &sp,
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
        &wp,
        &bp,
        &sp,
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
