//! Fused BatchNorm: training mode as custom ops (CPU kernels in `cpu::batch_norm`, CUDA launches
//! in `cuda::batch_norm`), evaluation mode as a broadcast affine.

use crate::cpu::{self, batch_norm::BnGeom};
use crate::fused_covers;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp1, Layout, Result,
    Shape, Storage, Tensor,
};

/// Views `x [N, C, ...]` as `[N, C, plane]`, refusing an input without values: no statistics
/// exist for it in training mode, and in evaluation mode the kernels would be launched over
/// nothing (a CUDA launch has at least one block, which must not write into a 1-element
/// placeholder buffer), so every mode and device gives the same error.
fn geometry(x: &Shape) -> Result<BnGeom> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("kernels::batch_norm: input must be [N, C, ...], got {dims:?}");
    }
    let geom = BnGeom {
        batch: dims[0],
        channels: dims[1],
        plane: dims[2..].iter().product(),
    };
    if geom.batch * geom.plane == 0 || geom.channels == 0 {
        bail!(
            "kernels::batch_norm: input {dims:?} is empty (N·H·W = {}, C = {}); BatchNorm needs at least one value per channel",
            geom.batch * geom.plane,
            geom.channels
        );
    }
    Ok(geom)
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

/// The geometry of `x` for an eval-mode BatchNorm on packed `[mean, var]` statistics, after
/// checking the shapes of `weight`, `bias` (`[C]`) and `stats` (`[2C]`).
fn eval_geometry(x: &Tensor, stats: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<BnGeom> {
    let geom = geometry(x.shape())?;
    check_params("weight", weight, geom.channels)?;
    check_params("bias", bias, geom.channels)?;
    check_params("stats", stats, 2 * geom.channels)?;
    Ok(geom)
}

/// Running statistics that a training-mode BatchNorm call updates in place with PyTorch's rule:
/// `running ← (1 − momentum)·running + momentum·batch`, the variance unbiased
/// (`biased · n / (n − 1)`, `n` values per channel).
#[derive(Debug, Clone, Copy)]
pub struct RunningStats<'a> {
    /// Running mean `[C]`, updated in place (its storage, so every view of it sees the update).
    pub mean: &'a Tensor,
    /// Running variance `[C]`, updated in place.
    pub var: &'a Tensor,
    /// Weight of the new batch statistic (PyTorch: 0.1).
    pub momentum: f64,
}

/// Training-mode BatchNorm of `x [N, C, ...]` with per-channel `weight` and `bias` (`[C]`).
///
/// Returns `(y, batch_mean, batch_var)` where `batch_var` is the biased variance (divided by
/// the element count) used to normalise. `y` is differentiable in `x`, `weight` and `bias`;
/// the statistics are returned detached, for the caller's running-statistics update (which
/// conventionally uses the unbiased variance: multiply by `n / (n - 1)`), or see
/// [`batch_norm_train_update`], which does that update inside the op.
///
/// On CPU f32 (and CUDA f32 with feature `cuda`) the forward and the whole backward are single
/// fused ops; elsewhere the same function is built from candle's generic ops.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (y, mean, var) = batch_norm_train_impl(x, weight, bias, eps, false, None)?;
    Ok((y, mean, var))
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
    batch_norm_train_impl(x, weight, bias, eps, true, None)
}

/// Training-mode BatchNorm (`relu`: fused with ReLU, as [`batch_norm_relu_train`]) that also
/// updates `running` in place, returning `y` only.
///
/// Fused path (f32 on CPU, or on CUDA with feature `cuda`, running statistics f32 and
/// contiguous on the same device): two ops forward, the batch statistics (whose op also writes
/// the running statistics: one CUDA launch for both) and the normalisation, and one op
/// backward. `weight` and `bias` enter the ops directly (no packing). The running update is
/// rounded exactly as the generic-op formulation `running·(1−m) + batch·m` in f32, so it is
/// bit-identical to it. Elsewhere: candle's generic ops.
pub fn batch_norm_train_update(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    running: RunningStats<'_>,
) -> Result<Tensor> {
    Ok(batch_norm_train_impl(x, weight, bias, eps, relu, Some(running))?.0)
}

fn batch_norm_train_impl(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    running: Option<RunningStats<'_>>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let geom = geometry(x.shape())?;
    check_params("weight", weight, geom.channels)?;
    check_params("bias", bias, geom.channels)?;
    if let Some(r) = &running {
        check_params("running_mean", r.mean, geom.channels)?;
        check_params("running_var", r.var, geom.channels)?;
    }
    if !fused_covers(&[x, weight, bias]) {
        let (y, mean, var) = crate::reference::batch_norm_train(x, weight, bias, eps)?;
        let y = if relu { y.relu()? } else { y };
        if let Some(r) = running {
            crate::reference::update_running_stats(r, &mean, &var, geom.count())?;
        }
        return Ok((y, mean, var));
    }
    let x = x.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    // The fused stats op writes the running statistics when they are f32, contiguous and on
    // x's device; otherwise they are updated with generic ops from the returned statistics.
    let fused_running = running.filter(|r| {
        [r.mean, r.var].iter().all(|t| {
            t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(x.device())
        })
    });
    let stats = x.apply_op1_no_bwd(&BnStatsOp {
        geom,
        running: fused_running.map(|r| {
            (
                r.mean.clone(),
                r.var.clone(),
                cpu::batch_norm::RunningCoefs::new(r.momentum, geom.count()),
            )
        }),
    })?;
    let c = geom.channels;
    if let (Some(r), None) = (running, fused_running) {
        let (mean, var) = (stats.narrow(0, 0, c)?, stats.narrow(0, c, c)?);
        crate::reference::update_running_stats(r, &mean, &var, geom.count())?;
    }
    // weight and bias are direct inputs (their gradients need no unpacking); the statistics
    // come from a no-backward op and are read by the ops out of band, so they stay detached.
    let y = x.apply_op3(
        &weight,
        &bias,
        BnNormOp {
            geom,
            eps,
            relu,
            stats: stats.clone(),
            eval: false,
        },
    )?;
    if running.is_some() {
        // Callers with running statistics only use `y`; skip the two views.
        return Ok((y, stats.clone(), stats));
    }
    Ok((y, stats.narrow(0, 0, c)?, stats.narrow(0, c, c)?))
}

/// [`batch_norm_train_update`] for a caller that runs its own backward pass: returns `y` and
/// the packed batch statistics `[mean (C), biased var (C)]` that
/// [`batch_norm_train_backward`] takes. Only where the fused ops cover the tensors
/// ([`fused_ops_cover`]); an error elsewhere.
pub fn batch_norm_train_saving(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    running: RunningStats<'_>,
) -> Result<(Tensor, Tensor)> {
    if !fused_covers(&[x, weight, bias]) {
        bail!("kernels::batch_norm_train_saving: f32 on the CPU or one CUDA device only");
    }
    let (y, stats, _) = batch_norm_train_impl(x, weight, bias, eps, relu, Some(running))?;
    Ok((y, stats))
}

/// Gradients `(x, weight, bias)` of [`batch_norm_train_saving`] (`relu` as there) given the
/// output gradient `grad_y`: the same fused op candle's autograd runs for it. The weight and
/// bias gradients share a small buffer of their own (one `[2C]` copy), so keeping them does
/// not keep the input gradient's buffer alive.
pub fn batch_norm_train_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: &Tensor,
    grad_y: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (gx, packed) = backward_packed(x, weight, bias, stats, grad_y, eps, relu)?;
    let (n, c) = (x.elem_count(), weight.elem_count());
    // `force_contiguous` copies just the slice (`copy` would clone the whole buffer).
    let params = packed.narrow(0, n, 2 * c)?.force_contiguous()?;
    crate::counters::record_views(3);
    Ok((gx, params.narrow(0, 0, c)?, params.narrow(0, c, c)?))
}

/// The fused backward op: `grad_x` (a view) and the whole packed result
/// `[grad_x, grad_weight, grad_bias]`.
fn backward_packed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: &Tensor,
    grad_y: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor)> {
    let geom = geometry(x.shape())?;
    // The kernels read every argument by x's geometry: on CUDA a wrong shape reads out of
    // bounds, so check them all before any launch.
    if grad_y.shape() != x.shape() {
        bail!(
            "kernels::batch_norm_train_backward: grad_y {:?} does not match x {:?}",
            grad_y.dims(),
            x.dims()
        );
    }
    check_params("weight", weight, geom.channels)?;
    check_params("bias", bias, geom.channels)?;
    check_params("stats", stats, 2 * geom.channels)?;
    if !fused_covers(&[x, weight, bias, stats, grad_y]) {
        bail!("kernels::batch_norm_train_backward: f32 on the CPU or one CUDA device only");
    }
    let op = BnBackwardOp {
        geom,
        eps,
        relu,
        weight: weight.contiguous()?,
        bias: bias.contiguous()?,
    };
    let packed =
        x.contiguous()?
            .apply_op3_no_bwd(&grad_y.contiguous()?, &stats.contiguous()?, &op)?;
    crate::counters::record_views(2);
    let gx = packed.narrow(0, 0, x.elem_count())?.reshape(x.shape())?;
    Ok((gx, packed))
}

/// Input gradient of eval-mode BatchNorm (+ReLU if `relu`) at input `x`, with the running
/// statistics packed as `stats = [running_mean (C), running_var (C)]`, for a caller that runs
/// its own backward pass and needs no parameter gradient (PuzzleMix's saliency pass through a
/// frozen network): `grad_x = grad_y · [y > 0] · weight / sqrt(running_var + eps)`.
///
/// On the CPU (f32) one op that reads `x` once to rebuild the ReLU mask; elsewhere candle's
/// generic ops ([`batch_norm_eval_backward_input_generic`]'s formula, the same on any device).
pub fn batch_norm_eval_backward_input(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad_y: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let geom = eval_geometry(x, stats, weight, bias)?;
    if grad_y.shape() != x.shape() {
        bail!(
            "kernels::batch_norm_eval_backward_input: grad_y {:?} does not match x {:?}",
            grad_y.dims(),
            x.dims()
        );
    }
    let on_cpu = matches!(x.device(), Device::Cpu);
    if !(on_cpu && fused_covers(&[x, stats, weight, bias, grad_y])) {
        return batch_norm_eval_backward_input_generic(x, stats, weight, bias, grad_y, eps, relu);
    }
    let op = BnEvalBackwardOp {
        geom,
        eps,
        relu,
        need_x: true,
        need_params: false,
        weight: weight.contiguous()?,
        bias: bias.contiguous()?,
        stats: stats.contiguous()?,
    };
    let packed = op.run(x, grad_y)?;
    crate::counters::record_views(1);
    packed.reshape(x.shape())
}

/// [`batch_norm_eval_backward_input`] from candle's generic ops, on any device and dtype (the
/// CPU op's twin; `tests` compares the two).
#[doc(hidden)]
pub fn batch_norm_eval_backward_input_generic(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad_y: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let c = weight.elem_count();
    let mut bshape = vec![1usize; x.rank()];
    bshape[1] = c;
    let (mean, var) = (stats.narrow(0, 0, c)?, stats.narrow(0, c, c)?);
    let scale = weight.detach().div(&(var + eps)?.sqrt()?)?;
    let dy = if relu {
        let shift = bias.detach().sub(&mean.mul(&scale)?)?;
        let y = x
            .detach()
            .broadcast_mul(&scale.reshape(bshape.as_slice())?)?
            .broadcast_add(&shift.reshape(bshape.as_slice())?)?;
        (grad_y.detach() * y.gt(0.0)?.to_dtype(grad_y.dtype())?)?
    } else {
        grad_y.detach()
    };
    dy.broadcast_mul(&scale.reshape(bshape.as_slice())?)
}

/// Whether the fused ops (convolution, BatchNorm, residual, loss) run natively on `t`: f32 on
/// the CPU, or f32 on CUDA in a build with feature `cuda`. A caller running its own backward
/// pass with [`conv2d_backward`](crate::conv2d_backward), [`batch_norm_train_backward`] and
/// [`add_relu_backward`](crate::add_relu_backward) needs this.
pub fn fused_ops_cover(t: &Tensor) -> bool {
    fused_covers(&[t])
}

/// Evaluation-mode BatchNorm: `(x - running_mean) / sqrt(running_var + eps) * weight + bias`
/// with per-channel `[C]` tensors, differentiable in `x`, `weight` and `bias`.
///
/// f32 on the CPU (or on one CUDA device with feature `cuda`), with running statistics that
/// need no gradient: one op forward (the training forward's kernel, given the running
/// statistics) and, on the CPU, one backward that computes only the gradients whose inputs
/// need one (PuzzleMix's saliency pass needs `x`'s alone; candle's generic backward would also
/// compute the others and accumulate them into fresh zeros). CUDA's backward and other devices
/// use candle's generic ops.
pub fn batch_norm_eval(
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    batch_norm_eval_impl(x, running_mean, running_var, weight, bias, eps, false)
}

/// [`batch_norm_eval`] followed by ReLU, fused; its gradient is zero where the output is
/// `<= 0`, as [`batch_norm_relu_train`]'s.
pub fn batch_norm_relu_eval(
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    batch_norm_eval_impl(x, running_mean, running_var, weight, bias, eps, true)
}

fn batch_norm_eval_impl(
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
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
    let stats_constant = !running_mean.track_op() && !running_var.track_op();
    if stats_constant && fused_covers(&[x, running_mean, running_var, weight, bias]) {
        // `[mean, var]` in one buffer, as the training forward's kernel reads its statistics.
        let stats = Tensor::cat(&[running_mean, running_var], 0)?;
        return eval_packed(geom, x, &stats, weight, bias, eps, relu);
    }
    let mut bshape = vec![1usize; x.rank()];
    bshape[1] = geom.channels;
    let scale = weight.div(&(running_var + eps)?.sqrt()?)?;
    let shift = bias.sub(&running_mean.mul(&scale)?)?;
    let y = x
        .broadcast_mul(&scale.reshape(bshape.as_slice())?)?
        .broadcast_add(&shift.reshape(bshape.as_slice())?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Evaluation-mode BatchNorm(+ReLU if `relu`) with the running statistics already packed as
/// `stats = [running_mean (C), running_var (C)]` (the layout [`batch_norm_eval_backward_input`]
/// takes), for a caller that keeps them for its own backward pass: the fused op of
/// [`batch_norm_eval`], differentiable in `x`, `weight` and `bias`. Only where the fused ops
/// cover the tensors ([`fused_ops_cover`]); an error elsewhere.
pub fn batch_norm_eval_packed(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let geom = eval_geometry(x, stats, weight, bias)?;
    if !fused_covers(&[x, stats, weight, bias]) {
        bail!("kernels::batch_norm_eval_packed: f32 on the CPU or one CUDA device only");
    }
    eval_packed(geom, x, stats, weight, bias, eps, relu)
}

/// The fused eval-mode op on packed statistics.
fn eval_packed(
    geom: BnGeom,
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        BnNormOp {
            geom,
            eps,
            relu,
            stats: stats.contiguous()?,
            eval: true,
        },
    )
}

/// CPU `(x, grad_y) -> [grad_x (if needed), grad_weight (C), grad_bias (C) (if needed)]` of
/// [`BnNormOp`] in eval mode, with weight, bias and running statistics read out of band.
struct BnEvalBackwardOp {
    geom: BnGeom,
    eps: f64,
    relu: bool,
    need_x: bool,
    need_params: bool,
    weight: Tensor,
    bias: Tensor,
    stats: Tensor,
}

impl BnEvalBackwardOp {
    /// The packed gradients at input `x` for output gradient `grad_y`, outside the autograd.
    fn run(&self, x: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op2_no_bwd(&grad_y.contiguous()?, self)
    }
}

impl CustomOp2 for BnEvalBackwardOp {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-eval-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::f32_slice(s1, l1, self.name(), "input")?;
        let dy = cpu::f32_slice(s2, l2, self.name(), "output gradient")?;
        let packed = with_cpu_f32(&self.weight, self.name(), "weight", |w| {
            with_cpu_f32(&self.bias, self.name(), "bias", |b| {
                with_cpu_f32(&self.stats, self.name(), "running statistics", |st| {
                    let grads = cpu::batch_norm::EvalGrads {
                        x: self.need_x,
                        params: self.need_params,
                    };
                    cpu::batch_norm::bn_eval_backward(
                        &self.geom, x, w, b, st, dy, self.eps, self.relu, grads,
                    )
                })
            })
        })???;
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

/// `x -> [mean (C), biased var (C)]`; with `running`, also updates the running mean and
/// variance in place (CPU: two nested in-place ops over `C` values; CUDA: the statistics'
/// second pass writes them, two launches in all).
struct BnStatsOp {
    geom: BnGeom,
    running: Option<(Tensor, Tensor, cpu::batch_norm::RunningCoefs)>,
}

impl CustomOp1 for BnStatsOp {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::counters::record(crate::OpKind::BnStats, 2);
        let x = cpu::f32_slice(s, l, self.name(), "input")?;
        let stats = cpu::batch_norm::bn_stats(&self.geom, x);
        if let Some((mean, var, coefs)) = &self.running {
            let c = self.geom.channels;
            // Distinct storages from x (read-locked by candle here), so no lock conflict.
            for (t, batch, is_var) in [(mean, &stats[..c], false), (var, &stats[c..], true)] {
                t.inplace_op1(&RunningUpdateOp {
                    batch: batch.to_vec(),
                    coefs: *coefs,
                    var: is_var,
                })?;
            }
        }
        Ok((CpuStorage::F32(stats), Shape::from(2 * self.geom.channels)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::counters::record(crate::OpKind::BnStats, 2);
        let running = match &self.running {
            Some((mean, var, coefs)) => Some((
                crate::cuda::tensor_ptr(mean, self.name(), "running mean")?,
                crate::cuda::tensor_ptr(var, self.name(), "running var")?,
                *coefs,
            )),
            None => None,
        };
        let stats = crate::cuda::batch_norm::stats(&self.geom, s, l, running)?;
        Ok((stats, Shape::from(2 * self.geom.channels)))
    }
}

/// CPU running-statistics update of one `[C]` tensor in place (part of [`BnStatsOp`]).
struct RunningUpdateOp {
    batch: Vec<f32>,
    coefs: cpu::batch_norm::RunningCoefs,
    var: bool,
}

impl InplaceOp1 for RunningUpdateOp {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-running"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        crate::counters::record(crate::OpKind::BnRunning, 0);
        let run = cpu::f32_slice_mut(s, l, self.name(), "running statistics")?;
        for (r, &b) in run.iter_mut().zip(&self.batch) {
            *r = cpu::batch_norm::running_update(*r, b, &self.coefs, self.var);
        }
        Ok(())
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor that an op reads out of band (a tensor
/// that is not one of the op's inputs, so candle has not locked it).
fn with_cpu_f32<R>(t: &Tensor, op: &str, arg: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(f(cpu::f32_slice(s, layout, op, arg)?)),
        _ => bail!("{op}: {arg} must be on the CPU"),
    }
}

/// `(x, weight, bias) -> y`, with the statistics `[mean, var]` read out of band: the batch's
/// (training; backward in one fused op) or the running ones (`eval`; the statistics are
/// constants, see [`BnNormOp::eval_backward`]).
struct BnNormOp {
    geom: BnGeom,
    eps: f64,
    relu: bool,
    stats: Tensor,
    eval: bool,
}

impl CustomOp3 for BnNormOp {
    fn name(&self) -> &'static str {
        if self.eval {
            "kernels-batch-norm-eval"
        } else {
            "kernels-batch-norm-train"
        }
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
        crate::counters::record(crate::OpKind::BnForward, 1);
        let x = cpu::f32_slice(s1, l1, self.name(), "input")?;
        let w = cpu::f32_slice(s2, l2, self.name(), "weight")?;
        let b = cpu::f32_slice(s3, l3, self.name(), "bias")?;
        let y = with_cpu_f32(&self.stats, self.name(), "statistics", |st| {
            cpu::batch_norm::bn_forward(&self.geom, x, w, b, st, self.eps, self.relu)
        })?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
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
        crate::counters::record(crate::OpKind::BnForward, 1);
        let stats = crate::cuda::tensor_ptr(&self.stats, self.name(), "statistics")?;
        let y = crate::cuda::batch_norm::forward(
            &self.geom,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            stats,
            self.eps,
            self.relu,
        )?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.eval {
            return self.eval_backward(x, weight, bias, res, grad_res);
        }
        // candle adds each gradient onto fresh zeros, so views of the packed result are fine.
        let (gx, packed) =
            backward_packed(x, weight, bias, &self.stats, grad_res, self.eps, self.relu)?;
        let (n, c) = (x.elem_count(), self.geom.channels);
        crate::counters::record_views(2);
        Ok((
            Some(gx),
            Some(packed.narrow(0, n, c)?),
            Some(packed.narrow(0, n + c, c)?),
        ))
    }
}

impl BnNormOp {
    /// Backward of the eval-mode normalisation (fixed statistics).
    fn eval_backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_w, need_b) = (x.track_op(), weight.track_op(), bias.track_op());
        let c = self.geom.channels;
        if !matches!(x.device(), Device::Cpu) {
            // Generic ops: dy·[y > 0]·scale, Σ dy·x̂, Σ dy over all but the channel axis.
            let mut bshape = vec![1usize; x.rank()];
            bshape[1] = c;
            let (mean, var) = (self.stats.narrow(0, 0, c)?, self.stats.narrow(0, c, c)?);
            let inv_std = (var + self.eps)?
                .sqrt()?
                .recip()?
                .reshape(bshape.as_slice())?;
            let dy = if self.relu {
                (grad_res * res.gt(0.0)?.to_dtype(DType::F32)?)?
            } else {
                grad_res.clone()
            };
            let sum_but_channels = |t: &Tensor| -> Result<Tensor> {
                let t = t.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
                t.sum(1)
            };
            let gx = if need_x {
                let scale = weight.reshape(bshape.as_slice())?.broadcast_mul(&inv_std)?;
                Some(dy.broadcast_mul(&scale)?)
            } else {
                None
            };
            let gw = if need_w {
                let xhat = x
                    .broadcast_sub(&mean.reshape(bshape.as_slice())?)?
                    .broadcast_mul(&inv_std)?;
                Some(sum_but_channels(&(&dy * xhat)?)?)
            } else {
                None
            };
            let gb = if need_b {
                Some(sum_but_channels(&dy)?)
            } else {
                None
            };
            return Ok((gx, gw, gb));
        }
        if !(need_x || need_w || need_b) {
            return Ok((None, None, None));
        }
        let op = BnEvalBackwardOp {
            geom: self.geom,
            eps: self.eps,
            relu: self.relu,
            need_x,
            need_params: need_w || need_b,
            weight: weight.clone(),
            bias: bias.clone(),
            stats: self.stats.clone(),
        };
        let packed = op.run(x, grad_res)?;
        let n = if need_x { x.elem_count() } else { 0 };
        let mut views = 0;
        let gx = if need_x {
            views += 2;
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?)
        } else {
            None
        };
        let gw = if need_w {
            views += 1;
            Some(packed.narrow(0, n, c)?)
        } else {
            None
        };
        let gb = if need_b {
            views += 1;
            Some(packed.narrow(0, n + c, c)?)
        } else {
            None
        };
        crate::counters::record_views(views);
        Ok((gx, gw, gb))
    }
}

/// `(x, grad_y, stats) -> [grad_x (flat), grad_weight (C), grad_bias (C)]`, with weight and
/// bias read out of band.
struct BnBackwardOp {
    geom: BnGeom,
    eps: f64,
    relu: bool,
    weight: Tensor,
    bias: Tensor,
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
        let dy = cpu::f32_slice(s2, l2, self.name(), "output gradient")?;
        let stats = cpu::f32_slice(s3, l3, self.name(), "statistics")?;
        let packed = with_cpu_f32(&self.weight, self.name(), "weight", |w| {
            with_cpu_f32(&self.bias, self.name(), "bias", |b| {
                cpu::batch_norm::bn_backward(&self.geom, x, w, b, stats, dy, self.eps, self.relu)
            })
        })??;
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
        let w = crate::cuda::tensor_ptr(&self.weight, self.name(), "weight")?;
        let b = crate::cuda::tensor_ptr(&self.bias, self.name(), "bias")?;
        let packed = crate::cuda::batch_norm::backward(
            &self.geom,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            (w, b),
            self.eps,
            self.relu,
        )?;
        let len = l1.shape().elem_count() + 2 * self.geom.channels;
        Ok((packed, Shape::from(len)))
    }
}
