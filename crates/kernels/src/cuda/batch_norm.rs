//! Fused training-mode BatchNorm(+ReLU) on CUDA: the launches behind the BN ops' `cuda_fwd`.
//! Same math and packing as `cpu::batch_norm`; kernels in `kernels.cu`, launch geometry in
//! `bn_grid` (reductions on a (chunk, channel) grid with a fixed-order second pass; element-wise
//! passes striding over each channel's values).

use super::{alloc, dev_ptr, launch, threads_for};
use crate::bn_grid::{self, MAX_THREADS};
use crate::cpu::batch_norm::{BnGeom, RunningCoefs};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};

/// Grid `(blocks, channels)` of `threads` threads.
fn grid(blocks: usize, channels: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, channels.max(1) as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The reduction grid of `g` with its launch configuration, and a scratch buffer of two f64
/// partial sums per (channel, chunk).
fn reduce_launch(
    g: &BnGeom,
    dev: &candle_core::cuda_backend::CudaDevice,
) -> Result<(bn_grid::ReduceGrid, LaunchConfig, CudaStorage, u64)> {
    let r = bn_grid::reduce_grid(g);
    let threads = threads_for(r.images_per_chunk * g.plane, MAX_THREADS);
    let (scratch, ptr) = alloc(dev, DType::F64, 2 * g.channels * r.chunks)?;
    Ok((r, grid(r.chunks, g.channels, threads), scratch, ptr))
}

/// Launch configuration of the element-wise passes (normalisation, input gradient).
fn elementwise_launch(g: &BnGeom) -> LaunchConfig {
    let threads = threads_for(g.batch * g.plane, MAX_THREADS);
    grid(bn_grid::elementwise_blocks(g), g.channels, threads)
}

/// `[mean (C), biased var (C)]`; with `running = (mean ptr, var ptr, coefs)` the second pass
/// also updates the running statistics in place. Two launches: partial sums per (chunk,
/// channel), then one thread per channel.
pub(crate) fn stats(
    g: &BnGeom,
    x: &CudaStorage,
    xl: &Layout,
    running: Option<(u64, u64, RunningCoefs)>,
) -> Result<CudaStorage> {
    let name = "kernels-batch-norm-stats";
    bn_grid::check_fits(g, name)?;
    let dev = &x.device;
    let xp = dev_ptr(x, xl, name, "input")?;
    let (out, op) = alloc(dev, DType::F32, 2 * g.channels)?;
    let (n, c, p) = (g.batch as i32, g.channels as i32, g.plane as i32);
    let (r, cfg, _scratch, part) = reduce_launch(g, dev)?;
    let ipc = r.images_per_chunk as i32;
    launch!(
        dev,
        "mixbench_bn_stats_partial_f32",
        cfg,
        &xp,
        &part,
        &n,
        &c,
        &p,
        &ipc
    );
    let (rm, rv, k) = running.unwrap_or((0, 0, RunningCoefs::new(0.0, 2)));
    let update = running.is_some() as i32;
    let chunks = r.chunks as i32;
    let count = (g.batch * g.plane) as f64;
    let threads = threads_for(g.channels, MAX_THREADS);
    launch!(
        dev,
        "mixbench_bn_stats_final_f32",
        grid(g.channels.div_ceil(threads), 1, threads),
        &part,
        &op,
        &c,
        &chunks,
        &count,
        &rm,
        &rv,
        &k.keep,
        &k.take,
        &k.unbias,
        &update
    );
    // The scratch buffer is freed stream-ordered, after the launches that read it.
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
    let name = "kernels-batch-norm-train";
    bn_grid::check_fits(g, name)?;
    let dev = &x.device;
    let xp = dev_ptr(x, xl, name, "input")?;
    let wp = dev_ptr(w, wl, name, "weight")?;
    let bp = dev_ptr(b, bl, name, "bias")?;
    let (out, yp) = alloc(dev, DType::F32, g.batch * g.channels * g.plane)?;
    let (n, c, p, r) = (
        g.batch as i32,
        g.channels as i32,
        g.plane as i32,
        relu as i32,
    );
    launch!(
        dev,
        "mixbench_bn_fwd_f32",
        elementwise_launch(g),
        &xp,
        &wp,
        &bp,
        &stats,
        &yp,
        &n,
        &c,
        &p,
        &eps,
        &r
    );
    Ok(out)
}

/// `[grad_x (N·C·P), grad_weight (C), grad_bias (C)]`, as `cpu::batch_norm::bn_backward`;
/// `(w, b)` are device addresses. Two launches: the two sums per (chunk, channel), then the
/// input gradient, whose blocks finish the sums (and write the parameter gradients).
pub(crate) fn backward(
    g: &BnGeom,
    (x, xl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    (stats, sl): (&CudaStorage, &Layout),
    (wp, bp): (u64, u64),
    eps: f64,
    relu: bool,
) -> Result<CudaStorage> {
    let name = "kernels-batch-norm-backward";
    bn_grid::check_fits(g, name)?;
    let dev = &x.device;
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
    let (rg, cfg, _scratch, part) = reduce_launch(g, dev)?;
    let (ipc, chunks) = (rg.images_per_chunk as i32, rg.chunks as i32);
    launch!(
        dev,
        "mixbench_bn_bwd_partial_f32",
        cfg,
        &xp,
        &wp,
        &bp,
        &sp,
        &dyp,
        &part,
        &n,
        &c,
        &p,
        &ipc,
        &eps,
        &r
    );
    launch!(
        dev,
        "mixbench_bn_bwd_dx_f32",
        elementwise_launch(g),
        &xp,
        &wp,
        &bp,
        &sp,
        &dyp,
        &part,
        &chunks,
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
