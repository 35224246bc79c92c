//! `conv2d` as a candle custom op with a fast backward (CPU kernels in `cpu::conv`, cuDNN calls
//! in `cuda::conv`).

use crate::cpu::{self, geom::ConvGeom};
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

/// Stride, zero padding and group count of a 2-D convolution (same on both spatial axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    /// Step between neighbouring output positions, in input pixels.
    pub stride: usize,
    /// Zero padding added on each side of both spatial axes.
    pub padding: usize,
    /// Number of channel groups; input and output channels must both divide by it.
    pub groups: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            groups: 1,
        }
    }
}

/// Checks shapes and returns the geometry of `x [N, C_in, H, W] (*) w [C_out, C_in/groups, kh, kw]`.
fn geometry(x: &Shape, w: &Shape, cfg: ConvParams) -> Result<ConvGeom> {
    let (batch, c_in, h, wd) = match x.dims() {
        &[n, c, h, w] => (n, c, h, w),
        d => bail!("kernels::conv2d: input must be [N, C, H, W], got {d:?}"),
    };
    let (c_out, c_in_per_group, kh, kw) = match w.dims() {
        &[o, i, kh, kw] => (o, i, kh, kw),
        d => bail!("kernels::conv2d: weight must be [C_out, C_in/groups, kh, kw], got {d:?}"),
    };
    if cfg.stride == 0 || cfg.groups == 0 {
        bail!("kernels::conv2d: stride and groups must be positive, got {cfg:?}");
    }
    if c_in != c_in_per_group * cfg.groups || c_out % cfg.groups != 0 {
        bail!(
            "kernels::conv2d: input channels {c_in}, weight {:?} and groups {} do not match",
            w.dims(),
            cfg.groups
        );
    }
    if h + 2 * cfg.padding < kh || wd + 2 * cfg.padding < kw {
        bail!(
            "kernels::conv2d: kernel {kh}x{kw} larger than padded input {}x{}",
            h + 2 * cfg.padding,
            wd + 2 * cfg.padding
        );
    }
    Ok(ConvGeom {
        batch,
        c_in,
        h,
        w: wd,
        c_out,
        kh,
        kw,
        stride: cfg.stride,
        padding: cfg.padding,
        groups: cfg.groups,
        h_out: (h + 2 * cfg.padding - kh) / cfg.stride + 1,
        w_out: (wd + 2 * cfg.padding - kw) / cfg.stride + 1,
    })
}

/// 2-D convolution (no bias, dilation 1) of `x [N, C_in, H, W]` with
/// `w [C_out, C_in/groups, kh, kw]`, differentiable in both arguments.
///
/// On CPU f32 tensors this runs the custom im2col + GEMM op, whose backward computes the input
/// gradient with GEMM + col2im and the weight gradient with im2col + GEMM, all groups in one
/// call. On CUDA f32 tensors in a build with feature `cudnn` the same op runs cuDNN's forward,
/// backward-data and backward-filter (all groups in one call), in the arithmetic that
/// [`crate::precision`] selects: f32, TF32, or bf16 autocast (inputs cast to bf16, result cast
/// back to f32, so the caller sees f32 either way). On the CPU, bf16 rounds the operands and
/// the result to bf16 around the f32 kernels (the same casts: the CUDA path's CPU twin, see
/// `cpu::bf16`; no faster than f32). Other devices and dtypes use candle's own `conv2d`, so
/// callers can always use it.
pub fn conv2d(x: &Tensor, w: &Tensor, cfg: ConvParams) -> Result<Tensor> {
    let geom = geometry(x.shape(), w.shape(), cfg)?;
    let f32_args = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    let on_cpu = matches!(x.device(), Device::Cpu) && matches!(w.device(), Device::Cpu);
    if on_cpu && f32_args {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, Conv2dOp { geom });
    }
    #[cfg(feature = "cudnn")]
    if f32_args && x.device().is_cuda() && x.device().same_device(w.device()) {
        if crate::precision() == crate::Precision::Bf16 {
            // Autocast: the casts are ordinary candle ops, so their backward casts the bf16
            // gradients back to f32 for the f32 master weights.
            let xb = x.to_dtype(DType::BF16)?.contiguous()?;
            let wb = w.to_dtype(DType::BF16)?.contiguous()?;
            return xb.apply_op2(&wb, Conv2dOp { geom })?.to_dtype(DType::F32);
        }
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, Conv2dOp { geom });
    }
    x.conv2d(w, cfg.padding, cfg.stride, 1, cfg.groups)
}

/// Forward op; its backward runs [`Conv2dBackwardOp`].
struct Conv2dOp {
    geom: ConvGeom,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "kernels-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        crate::counters::record(crate::OpKind::ConvForward, 1);
        let x = cpu::f32_slice(s1, l1, self.name(), "input")?;
        let w = cpu::f32_slice(s2, l2, self.name(), "weight")?;
        let out = if crate::precision() == crate::Precision::Bf16 {
            // The CUDA autocast's casts around f32 arithmetic (`cpu::bf16`).
            let mut out =
                cpu::conv::conv2d_forward(g, &cpu::bf16::rounded(x), &cpu::bf16::rounded(w));
            cpu::bf16::round_in_place(&mut out);
            out
        } else {
            cpu::conv::conv2d_forward(g, x, w)
        };
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.c_out, g.h_out, g.w_out)),
        ))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.geom;
        crate::counters::record(crate::OpKind::ConvForward, 1);
        let out = crate::cuda::conv::forward(g, (s1, l1), (s2, l2))?;
        Ok((out, Shape::from((g.batch, g.c_out, g.h_out, g.w_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Inputs that no gradient can reach (e.g. the image batch) skip their GEMMs.
        backward_op(self.geom, x, w, grad_res, x.track_op(), w.track_op())
    }
}

/// Runs [`Conv2dBackwardOp`] and unpacks its result into gradients shaped like `x` and `w`:
/// on the CPU one op whose packed result both gradients view (one chunked pass computes both),
/// on CUDA one op per gradient.
fn backward_op(
    geom: ConvGeom,
    x: &Tensor,
    w: &Tensor,
    grad_out: &Tensor,
    need_x: bool,
    need_w: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !need_x && !need_w {
        return Ok((None, None));
    }
    if need_x && need_w && x.device().is_cuda() {
        // Two ops, two buffers (cuDNN's backward-data and backward-filter are two calls
        // anyway): a weight gradient kept until the optimizer step must not keep the
        // activation-sized input gradient alive, as a view of one packed buffer would.
        let (grad_x, _) = backward_op(geom, x, w, grad_out, true, false)?;
        let (_, grad_w) = backward_op(geom, x, w, grad_out, false, true)?;
        return Ok((grad_x, grad_w));
    }
    let op = Conv2dBackwardOp {
        geom,
        need_x,
        need_w,
    };
    let packed = x.apply_op3_no_bwd(w, &grad_out.contiguous()?, &op)?;
    if !(need_x && need_w) {
        return Ok((need_x.then(|| packed.clone()), need_w.then_some(packed)));
    }
    crate::counters::record_views(4);
    let n = x.elem_count();
    let grad_x = Some(packed.narrow(0, 0, n)?.reshape(x.shape())?);
    let grad_w = Some(packed.narrow(0, n, w.elem_count())?.reshape(w.shape())?);
    Ok((grad_x, grad_w))
}

/// The gradients of [`conv2d`]`(x, w, cfg)` given the output gradient `grad_out`, for a
/// caller that runs its own backward pass (`need_x` / `need_w` select which): the same op and
/// arithmetic (precision included) as the backward candle's autograd runs for [`conv2d`].
/// Other devices and dtypes differentiate candle's `conv2d` on a private graph.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    grad_out: &Tensor,
    cfg: ConvParams,
    need_x: bool,
    need_w: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let geom = geometry(x.shape(), w.shape(), cfg)?;
    let out_dims = [geom.batch, geom.c_out, geom.h_out, geom.w_out];
    if grad_out.dims() != out_dims {
        // The kernels read grad_out by this shape: on CUDA a wrong one reads out of bounds.
        bail!(
            "kernels::conv2d_backward: grad_out must be {out_dims:?} (the output of x {:?} and w {:?}), got {:?}",
            x.dims(),
            w.dims(),
            grad_out.dims()
        );
    }
    let f32_args = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    let on_cpu = matches!(x.device(), Device::Cpu) && matches!(w.device(), Device::Cpu);
    if on_cpu && f32_args {
        return backward_op(
            geom,
            &x.contiguous()?,
            &w.contiguous()?,
            grad_out,
            need_x,
            need_w,
        );
    }
    #[cfg(feature = "cudnn")]
    if f32_args && x.device().is_cuda() && x.device().same_device(w.device()) {
        if crate::precision() == crate::Precision::Bf16 {
            // As the autocast of `conv2d`: bf16 operands, gradients cast back to f32.
            let xb = x.to_dtype(DType::BF16)?.contiguous()?;
            let wb = w.to_dtype(DType::BF16)?.contiguous()?;
            let gb = grad_out.to_dtype(DType::BF16)?;
            let (gx, gw) = backward_op(geom, &xb, &wb, &gb, need_x, need_w)?;
            let to_f32 = |t: Option<Tensor>| t.map(|t| t.to_dtype(DType::F32)).transpose();
            return Ok((to_f32(gx)?, to_f32(gw)?));
        }
        return backward_op(
            geom,
            &x.contiguous()?,
            &w.contiguous()?,
            grad_out,
            need_x,
            need_w,
        );
    }
    let (xv, wv) = (
        candle_core::Var::from_tensor(&x.detach())?,
        candle_core::Var::from_tensor(&w.detach())?,
    );
    let y = xv
        .as_tensor()
        .conv2d(wv.as_tensor(), cfg.padding, cfg.stride, 1, cfg.groups)?;
    let grads = (y * grad_out.detach())?.sum_all()?.backward()?;
    let pick = |v: &candle_core::Var, need: bool| need.then(|| grads.get(v.as_tensor()).cloned());
    Ok((pick(&xv, need_x).flatten(), pick(&wv, need_w).flatten()))
}

/// `(x, w, grad_out) -> [grad_x (flat, if needed), grad_w (flat, if needed)]`.
struct Conv2dBackwardOp {
    geom: ConvGeom,
    need_x: bool,
    need_w: bool,
}

impl Conv2dBackwardOp {
    /// A single gradient comes out in its own shape (no views to make); both, flat and packed.
    fn output_shape(&self, x: &Shape, w: &Shape) -> Shape {
        match (self.need_x, self.need_w) {
            (true, false) => x.clone(),
            (false, true) => w.clone(),
            _ => Shape::from(
                self.need_x as usize * x.elem_count() + self.need_w as usize * w.elem_count(),
            ),
        }
    }

    /// One cuDNN call per needed gradient (backward-data, backward-filter; on CUDA the front
    /// makes one op call per gradient).
    fn count(&self) {
        let launches = self.need_x as u64 + self.need_w as u64;
        crate::counters::record(crate::OpKind::ConvBackward, launches);
    }
}

impl CustomOp3 for Conv2dBackwardOp {
    fn name(&self) -> &'static str {
        "kernels-conv2d-backward"
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
        self.count();
        let x = cpu::f32_slice(s1, l1, self.name(), "input")?;
        let w = cpu::f32_slice(s2, l2, self.name(), "weight")?;
        let dy = cpu::f32_slice(s3, l3, self.name(), "output gradient")?;
        let (g, need_x, need_w) = (&self.geom, self.need_x, self.need_w);
        let packed = if crate::precision() == crate::Precision::Bf16 {
            // As the forward: bf16 operands (the output gradient included), bf16 results.
            let (x, w, dy) = (
                cpu::bf16::rounded(x),
                cpu::bf16::rounded(w),
                cpu::bf16::rounded(dy),
            );
            let mut packed = cpu::conv::conv2d_backward(g, &x, &w, &dy, need_x, need_w);
            cpu::bf16::round_in_place(&mut packed);
            packed
        } else {
            cpu::conv::conv2d_backward(g, x, w, dy, need_x, need_w)
        };
        let shape = self.output_shape(l1.shape(), l2.shape());
        Ok((CpuStorage::F32(packed), shape))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.geom;
        self.count();
        let out =
            crate::cuda::conv::backward(g, (s1, l1), (s2, l2), (s3, l3), self.need_x, self.need_w)?;
        Ok((out, self.output_shape(l1.shape(), l2.shape())))
    }
}
