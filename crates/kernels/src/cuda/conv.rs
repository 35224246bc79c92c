//! Convolutions through cuDNN (feature `cudnn`): forward, backward-data and backward-filter,
//! all groups in one call, NCHW, f32 or bf16 data with f32 accumulation.
//!
//! Per thread and device there is one cuDNN handle bound to candle's stream, a cache of
//! descriptors and chosen algorithms per (shape, dtype, math type, determinism), and one
//! workspace that only ever grows. So after the first step of a run, a convolution call is one
//! cuDNN launch with nothing rebuilt, allocated or zeroed (cuDNN needs no zeroed workspace).
//!
//! Algorithms come from cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`), the first
//! result that succeeded and, under [`crate::deterministic`], is marked deterministic. Not
//! `cudnnFind*` (PyTorch's `benchmark=True`): that times every algorithm with real buffers.

use super::{alloc, dev_ptr};
use crate::cpu::conv::ConvGeom;
use crate::Precision;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{bail, DType, Layout, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

fn err(e: result::CudnnError) -> candle_core::Error {
    candle_core::Error::Cuda(format!("cuDNN: {e:?}").into())
}

struct Handle(sys::cudnnHandle_t);
impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by create_handle, destroyed once.
        unsafe { result::destroy_handle(self.0) }.ok();
    }
}
struct TensorDesc(sys::cudnnTensorDescriptor_t);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        unsafe { result::destroy_tensor_descriptor(self.0) }.ok();
    }
}
struct FilterDesc(sys::cudnnFilterDescriptor_t);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        unsafe { result::destroy_filter_descriptor(self.0) }.ok();
    }
}
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        unsafe { result::destroy_convolution_descriptor(self.0) }.ok();
    }
}

/// Descriptors of one convolution shape plus the algorithms chosen for it (lazily, per pass).
struct Plan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
    fwd: Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>,
    bwd_data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    bwd_filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    geom: ConvGeom,
    bf16: bool,
    math: u32,
    deterministic: bool,
}

struct DeviceState {
    plans: HashMap<Key, Plan>,
    workspace: Option<CudaSlice<u8>>,
    // Declared last: dropped after the descriptors that were used with it.
    handle: Handle,
}

thread_local! {
    // cuDNN handles are not thread-safe, so, like candle, keep one per thread and device.
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

fn math_type(p: Precision) -> sys::cudnnMathType_t {
    match p {
        // Strict FP32: FMA kernels only (what PyTorch sets when TF32 is disallowed).
        Precision::F32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        Precision::Tf32 | Precision::Bf16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

fn new_plan(g: &ConvGeom, key: &Key) -> Result<Plan> {
    let dt = if key.bf16 {
        sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16
    } else {
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT
    };
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let i = |v: usize| v as i32;
    // SAFETY: fresh descriptors, set once, owned by the plan.
    unsafe {
        let x = TensorDesc(result::create_tensor_descriptor().map_err(err)?);
        result::set_tensor4d_descriptor(x.0, nchw, dt, [i(g.batch), i(g.c_in), i(g.h), i(g.w)])
            .map_err(err)?;
        let y = TensorDesc(result::create_tensor_descriptor().map_err(err)?);
        result::set_tensor4d_descriptor(
            y.0,
            nchw,
            dt,
            [i(g.batch), i(g.c_out), i(g.h_out), i(g.w_out)],
        )
        .map_err(err)?;
        let w = FilterDesc(result::create_filter_descriptor().map_err(err)?);
        result::set_filter4d_descriptor(
            w.0,
            dt,
            nchw,
            [i(g.c_out), i(g.c_in / g.groups), i(g.kh), i(g.kw)],
        )
        .map_err(err)?;
        let conv = ConvDesc(result::create_convolution_descriptor().map_err(err)?);
        // Compute type f32 for both f32 and bf16 data (bf16 "autocast" accumulates in f32).
        result::set_convolution2d_descriptor(
            conv.0,
            i(g.padding),
            i(g.padding),
            i(g.stride),
            i(g.stride),
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )
        .map_err(err)?;
        result::set_convolution_group_count(conv.0, i(g.groups)).map_err(err)?;
        let math = if key.math == sys::cudnnMathType_t::CUDNN_FMA_MATH as u32 {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        result::set_convolution_math_type(conv.0, math).map_err(err)?;
        Ok(Plan {
            x,
            w,
            y,
            conv,
            fwd: None,
            bwd_data: None,
            bwd_filter: None,
        })
    }
}

/// Picks the first heuristic result that succeeded (and is deterministic when required).
macro_rules! pick {
    ($results:expr, $count:expr, $det:expr, $what:expr) => {{
        let det_ok =
            |d: sys::cudnnDeterminism_t| !$det || d == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
        match $results[..$count as usize]
            .iter()
            .find(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && det_ok(r.determinism))
        {
            Some(r) => r.algo,
            None => bail!(
                "cuDNN offers no {}{} algorithm for this convolution",
                if $det { "deterministic " } else { "" },
                $what
            ),
        }
    }};
}

/// Which passes to run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// Runs `f(handle, plan, workspace_ptr, workspace_bytes)` with the plan of `geom` (algorithm for
/// `pass` chosen and workspace grown on first use).
fn with_plan<R>(
    dev: &CudaDevice,
    geom: &ConvGeom,
    bf16: bool,
    pass: Pass,
    f: impl FnOnce(sys::cudnnHandle_t, &Plan, u64, usize) -> Result<R>,
) -> Result<R> {
    let key = Key {
        geom: *geom,
        bf16,
        math: math_type(crate::precision()) as u32,
        deterministic: crate::deterministic(),
    };
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let st = match state.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stream = dev.cuda_stream();
                stream
                    .context()
                    .bind_to_thread()
                    .map_err(|e| candle_core::Error::Cuda(format!("{e:?}").into()))?;
                let h = Handle(result::create_handle().map_err(err)?);
                // SAFETY: valid handle and stream; cuDNN then queues on candle's stream.
                unsafe { result::set_stream(h.0, stream.cu_stream() as *mut _) }.map_err(err)?;
                e.insert(DeviceState {
                    plans: HashMap::new(),
                    workspace: None,
                    handle: h,
                })
            }
        };
        let h = st.handle.0;
        if let std::collections::hash_map::Entry::Vacant(e) = st.plans.entry(key) {
            e.insert(new_plan(geom, &key)?);
        }
        let plan = st.plans.get_mut(&key).expect("inserted above");
        let det = key.deterministic;
        // SAFETY (all calls below): descriptors and handle are alive and consistent.
        let need = unsafe {
            match pass {
                Pass::Forward => {
                    if plan.fwd.is_none() {
                        let mut n = 0;
                        let mut r = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
                        result::get_convolution_forward_algorithm(
                            h,
                            plan.x.0,
                            plan.w.0,
                            plan.conv.0,
                            plan.y.0,
                            r.len() as i32,
                            &mut n,
                            r.as_mut_ptr(),
                        )
                        .map_err(err)?;
                        let algo = pick!(r, n, det, "forward");
                        let ws = result::get_convolution_forward_workspace_size(
                            h,
                            plan.x.0,
                            plan.w.0,
                            plan.conv.0,
                            plan.y.0,
                            algo,
                        )
                        .map_err(err)?;
                        plan.fwd = Some((algo, ws));
                    }
                    plan.fwd.map(|a| a.1).unwrap_or(0)
                }
                Pass::BackwardData => {
                    if plan.bwd_data.is_none() {
                        let mut n = 0;
                        let mut r =
                            [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 6];
                        result::get_convolution_backward_data_algorithm(
                            h,
                            plan.w.0,
                            plan.y.0,
                            plan.conv.0,
                            plan.x.0,
                            r.len() as i32,
                            &mut n,
                            r.as_mut_ptr(),
                        )
                        .map_err(err)?;
                        let algo = pick!(r, n, det, "backward-data");
                        let ws = result::get_convolution_backward_data_workspace_size(
                            h,
                            plan.w.0,
                            plan.y.0,
                            plan.conv.0,
                            plan.x.0,
                            algo,
                        )
                        .map_err(err)?;
                        plan.bwd_data = Some((algo, ws));
                    }
                    plan.bwd_data.map(|a| a.1).unwrap_or(0)
                }
                Pass::BackwardFilter => {
                    if plan.bwd_filter.is_none() {
                        let mut n = 0;
                        let mut r =
                            [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 7];
                        result::get_convolution_backward_filter_algorithm(
                            h,
                            plan.x.0,
                            plan.y.0,
                            plan.conv.0,
                            plan.w.0,
                            r.len() as i32,
                            &mut n,
                            r.as_mut_ptr(),
                        )
                        .map_err(err)?;
                        let algo = pick!(r, n, det, "backward-filter");
                        let ws = result::get_convolution_backward_filter_workspace_size(
                            h,
                            plan.x.0,
                            plan.y.0,
                            plan.conv.0,
                            plan.w.0,
                            algo,
                        )
                        .map_err(err)?;
                        plan.bwd_filter = Some((algo, ws));
                    }
                    plan.bwd_filter.map(|a| a.1).unwrap_or(0)
                }
            }
        };
        let have = st.workspace.as_ref().map_or(0, |w| w.len());
        if need > have {
            // Grow only: the old buffer is freed stream-ordered, after the work that used it.
            st.workspace = None;
            // SAFETY: cuDNN workspaces need no initialisation.
            st.workspace = Some(unsafe { dev.alloc::<u8>(need)? });
        }
        let (ws_ptr, ws_len) = match &st.workspace {
            Some(w) => (w.device_ptr(&dev.cuda_stream()).0, w.len()),
            None => (0, 0),
        };
        let plan = st.plans.get(&key).expect("inserted above");
        f(h, plan, ws_ptr, ws_len)
    })
}

fn data_type(s: &CudaStorage, what: &str) -> Result<bool> {
    match s.dtype() {
        DType::F32 => Ok(false),
        DType::BF16 => Ok(true),
        other => bail!("kernels-conv2d (cuDNN): {what} must be f32 or bf16, got {other:?}"),
    }
}

/// `y = conv(x, w)`, same dtype as the inputs.
pub(crate) fn forward(
    g: &ConvGeom,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.device;
    let bf16 = data_type(x, "input")?;
    if data_type(w, "weight")? != bf16 {
        bail!("kernels-conv2d (cuDNN): input and weight dtypes differ");
    }
    let name = "kernels-conv2d";
    let xp = dev_ptr(x, xl, name, "input")?;
    let wp = dev_ptr(w, wl, name, "weight")?;
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let (out, yp) = alloc(dev, dtype, g.batch * g.c_out * g.h_out * g.w_out)?;
    with_plan(dev, g, bf16, Pass::Forward, |h, plan, ws, ws_len| {
        let (alpha, beta) = (1f32, 0f32);
        let algo = plan.fwd.expect("chosen").0;
        // SAFETY: pointers address live buffers of the shapes in the descriptors.
        unsafe {
            result::convolution_forward(
                h,
                &alpha as *const f32 as *const c_void,
                plan.x.0,
                xp as *const c_void,
                plan.w.0,
                wp as *const c_void,
                plan.conv.0,
                algo,
                ws as *mut c_void,
                ws_len,
                &beta as *const f32 as *const c_void,
                plan.y.0,
                yp as *mut c_void,
            )
        }
        .map_err(err)
    })?;
    Ok(out)
}

/// `[grad_x (if need_x), grad_w (if need_w)]`, flat, packed like the CPU op.
pub(crate) fn backward(
    g: &ConvGeom,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    need_x: bool,
    need_w: bool,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let bf16 = data_type(x, "input")?;
    if data_type(w, "weight")? != bf16 || data_type(dy, "output gradient")? != bf16 {
        bail!("kernels-conv2d-backward (cuDNN): input, weight and gradient dtypes differ");
    }
    let name = "kernels-conv2d-backward";
    let xp = dev_ptr(x, xl, name, "input")?;
    let wp = dev_ptr(w, wl, name, "weight")?;
    let dyp = dev_ptr(dy, dyl, name, "output gradient")?;
    let nx = if need_x {
        g.batch * g.c_in * g.h * g.w
    } else {
        0
    };
    let nw = if need_w { w_len(g) } else { 0 };
    let (dtype, elem) = if bf16 {
        (DType::BF16, 2)
    } else {
        (DType::F32, 4)
    };
    let (out, dxp) = alloc(dev, dtype, nx + nw)?;
    let dwp = dxp + (nx * elem) as u64;
    let (alpha, beta) = (1f32, 0f32);
    let a = &alpha as *const f32 as *const c_void;
    let b = &beta as *const f32 as *const c_void;
    if need_x {
        with_plan(dev, g, bf16, Pass::BackwardData, |h, plan, ws, ws_len| {
            let algo = plan.bwd_data.expect("chosen").0;
            // SAFETY: as in `forward`.
            unsafe {
                result::convolution_backward_data(
                    h,
                    a,
                    plan.w.0,
                    wp as *const c_void,
                    plan.y.0,
                    dyp as *const c_void,
                    plan.conv.0,
                    algo,
                    ws as *mut c_void,
                    ws_len,
                    b,
                    plan.x.0,
                    dxp as *mut c_void,
                )
            }
            .map_err(err)
        })?;
    }
    if need_w {
        with_plan(dev, g, bf16, Pass::BackwardFilter, |h, plan, ws, ws_len| {
            let algo = plan.bwd_filter.expect("chosen").0;
            // SAFETY: as in `forward`.
            unsafe {
                result::convolution_backward_filter(
                    h,
                    a,
                    plan.x.0,
                    xp as *const c_void,
                    plan.y.0,
                    dyp as *const c_void,
                    plan.conv.0,
                    algo,
                    ws as *mut c_void,
                    ws_len,
                    b,
                    plan.w.0,
                    dwp as *mut c_void,
                )
            }
            .map_err(err)
        })?;
    }
    Ok(out)
}

fn w_len(g: &ConvGeom) -> usize {
    g.c_out * (g.c_in / g.groups) * g.kh * g.kw
}
