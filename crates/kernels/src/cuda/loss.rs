//! Soft-target cross-entropy on CUDA: one launch forward, one backward (kernels in
//! `kernels.cu`, the same f64 arithmetic as `cpu::loss`).

use super::{alloc, cfg, dev_ptr, launch};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};

/// Threads of the forward's single block (a power of two, for its tree reduction).
const FORWARD_THREADS: usize = 256;

/// The 0-dim mean loss.
pub(crate) fn forward(
    (z, zl): (&CudaStorage, &Layout),
    (t, tl): (&CudaStorage, &Layout),
    rows: usize,
    classes: usize,
) -> Result<CudaStorage> {
    let name = "kernels-soft-cross-entropy";
    let dev = &z.device;
    let zp = dev_ptr(z, zl, name, "logits")?;
    let tp = dev_ptr(t, tl, name, "targets")?;
    let (out, op) = alloc(dev, DType::F32, 1)?;
    let (rows, classes) = (rows as u32, classes as u32);
    launch!(
        dev,
        "mixbench_soft_ce_f32",
        cfg(1, FORWARD_THREADS),
        &zp,
        &tp,
        &op,
        &rows,
        &classes
    );
    Ok(out)
}

/// The logits' gradient, given the upstream 0-dim gradient `g` (read on the device: no sync).
pub(crate) fn backward(
    (z, zl): (&CudaStorage, &Layout),
    (t, tl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    rows: usize,
    classes: usize,
) -> Result<CudaStorage> {
    let name = "kernels-soft-cross-entropy-backward";
    let dev = &z.device;
    let zp = dev_ptr(z, zl, name, "logits")?;
    let tp = dev_ptr(t, tl, name, "targets")?;
    let gp = dev_ptr(g, gl, name, "output gradient")?;
    let (out, dp) = alloc(dev, DType::F32, rows * classes)?;
    let (r, c) = (rows as u32, classes as u32);
    launch!(
        dev,
        "mixbench_soft_ce_bwd_f32",
        cfg(rows.div_ceil(128), 128),
        &zp,
        &tp,
        &gp,
        &dp,
        &r,
        &c
    );
    Ok(out)
}
