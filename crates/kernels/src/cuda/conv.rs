//! Convolutions through cuDNN (feature `cudnn`): forward, backward-data and backward-filter,
//! all groups in one call, NCHW, f32 or bf16 data with f32 accumulation.
//!
//! Per thread and device there is one cuDNN handle bound to the device's stream, a cache of
//! descriptors per (shape, dtype, precision, determinism) holding for each pass the algorithm
//! that ran, and one workspace that only ever grows. So after the first step of a run, a
//! convolution call is one cuDNN launch with nothing rebuilt, allocated or zeroed (cuDNN needs
//! no zeroed workspace).
//!
//! The first call of a shape and pass chooses its algorithm (`crate::conv_algo`): the
//! candidates come from cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`, not
//! `cudnnFind*`, PyTorch's `benchmark=True`, which times every algorithm) plus a fixed
//! known-good algorithm, tried first under [`crate::deterministic`]. Each candidate is tried for
//! real: its math type set on the pass's own convolution descriptor (as PyTorch does after
//! choosing, so cuDNN runs the kernel the heuristic ranked; strict f32 takes FMA-math
//! candidates only), its workspace queried, capped ([`conv_algo::MAX_WORKSPACE_BYTES`]) and
//! allocated, the convolution run. The first that runs is cached; NOT_SUPPORTED,
//! EXECUTION_FAILED and workspace failures move on to the next.

use super::{alloc, dev_ptr};
use crate::conv_algo::{self, Attempt, Heuristic, StatusClass};
use crate::cpu::geom::ConvGeom;
use crate::Precision;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{bail, DType, Layout, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

// The numbering `conv_algo::classify_status` assumes, checked against the bindings in use.
const _: () = {
    use sys::cudnnStatus_t as S;
    assert!(matches!(
        conv_algo::classify_status(S::CUDNN_STATUS_NOT_SUPPORTED as u32),
        StatusClass::NotSupported
    ));
    assert!(matches!(
        conv_algo::classify_status(S::CUDNN_STATUS_EXECUTION_FAILED as u32),
        StatusClass::ExecutionFailed
    ));
    assert!(matches!(
        conv_algo::classify_status(S::CUDNN_STATUS_BAD_PARAM as u32),
        StatusClass::Other
    ));
};

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

/// Which pass of a convolution.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    Forward = 0,
    BackwardData = 1,
    BackwardFilter = 2,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::BackwardData => "backward-data",
            Pass::BackwardFilter => "backward-filter",
        }
    }
}

/// An algorithm of one of the three passes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    BackwardData(sys::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// A candidate: an algorithm and the math type to run it with.
type Candidate = (Algo, sys::cudnnMathType_t);

/// The algorithm that ran for one pass, and its workspace size.
#[derive(Clone, Copy)]
struct Chosen {
    algo: Algo,
    workspace: usize,
}

/// Descriptors of one convolution shape plus, per pass, the algorithm chosen for it (lazily).
/// Each pass has its own convolution descriptor because each carries its algorithm's math
/// type.
struct Plan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: [ConvDesc; 3],
    chosen: [Option<Chosen>; 3],
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    geom: ConvGeom,
    bf16: bool,
    /// The precision's own math type (`base_math`), as a number.
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

/// The math type a precision starts from (PyTorch's choice): strict FP32 FMA kernels only;
/// TF32 `DEFAULT_MATH`, which lets FP32 data use TF32 tensor cores; bf16 data tensor-op math.
fn base_math(p: Precision) -> sys::cudnnMathType_t {
    match p {
        Precision::F32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        Precision::Tf32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        Precision::Bf16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// The known-good algorithm of each pass (PyTorch's deterministic choice).
fn fixed_algo(pass: Pass) -> Algo {
    match pass {
        Pass::Forward => Algo::Forward(
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        ),
        Pass::BackwardData => Algo::BackwardData(
            sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        ),
        Pass::BackwardFilter => Algo::BackwardFilter(
            sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        ),
    }
}

fn new_plan(g: &ConvGeom, bf16: bool, math: sys::cudnnMathType_t) -> Result<Plan> {
    let dt = if bf16 {
        sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16
    } else {
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT
    };
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let i = |v: usize| v as i32;
    let conv_desc = || -> Result<ConvDesc> {
        // SAFETY: a fresh descriptor, set once, owned by the plan.
        unsafe {
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
            result::set_convolution_math_type(conv.0, math).map_err(err)?;
            Ok(conv)
        }
    };
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
        Ok(Plan {
            x,
            w,
            y,
            conv: [conv_desc()?, conv_desc()?, conv_desc()?],
            chosen: [None; 3],
        })
    }
}

/// cuDNN's heuristic ranking for `pass` (every result it returns, usable or not).
fn heuristics(
    h: sys::cudnnHandle_t,
    plan: &Plan,
    pass: Pass,
) -> Result<Vec<Heuristic<Algo, sys::cudnnMathType_t>>> {
    let det = |d: sys::cudnnDeterminism_t| d == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
    let ok = |s: sys::cudnnStatus_t| s == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
    let conv = plan.conv[pass as usize].0;
    let mut n = 0;
    // SAFETY: live descriptors and handle; cuDNN writes at most `len` results and their count.
    unsafe {
        match pass {
            Pass::Forward => {
                let mut r = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
                result::get_convolution_forward_algorithm(
                    h,
                    plan.x.0,
                    plan.w.0,
                    conv,
                    plan.y.0,
                    r.len() as i32,
                    &mut n,
                    r.as_mut_ptr(),
                )
                .map_err(err)?;
                Ok(r[..n.clamp(0, r.len() as i32) as usize]
                    .iter()
                    .map(|r| Heuristic {
                        algo: Algo::Forward(r.algo),
                        usable: ok(r.status),
                        deterministic: det(r.determinism),
                        math: r.mathType,
                    })
                    .collect())
            }
            Pass::BackwardData => {
                let mut r = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 6];
                result::get_convolution_backward_data_algorithm(
                    h,
                    plan.w.0,
                    plan.y.0,
                    conv,
                    plan.x.0,
                    r.len() as i32,
                    &mut n,
                    r.as_mut_ptr(),
                )
                .map_err(err)?;
                Ok(r[..n.clamp(0, r.len() as i32) as usize]
                    .iter()
                    .map(|r| Heuristic {
                        algo: Algo::BackwardData(r.algo),
                        usable: ok(r.status),
                        deterministic: det(r.determinism),
                        math: r.mathType,
                    })
                    .collect())
            }
            Pass::BackwardFilter => {
                let mut r = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 7];
                result::get_convolution_backward_filter_algorithm(
                    h,
                    plan.x.0,
                    plan.y.0,
                    conv,
                    plan.w.0,
                    r.len() as i32,
                    &mut n,
                    r.as_mut_ptr(),
                )
                .map_err(err)?;
                Ok(r[..n.clamp(0, r.len() as i32) as usize]
                    .iter()
                    .map(|r| Heuristic {
                        algo: Algo::BackwardFilter(r.algo),
                        usable: ok(r.status),
                        deterministic: det(r.determinism),
                        math: r.mathType,
                    })
                    .collect())
            }
        }
    }
}

/// Workspace bytes `algo` needs with the plan's descriptors (the pass's math type included).
///
/// # Safety
/// `h` and the plan's descriptors are alive.
unsafe fn workspace_size(
    h: sys::cudnnHandle_t,
    plan: &Plan,
    algo: Algo,
) -> std::result::Result<usize, result::CudnnError> {
    match algo {
        Algo::Forward(a) => result::get_convolution_forward_workspace_size(
            h,
            plan.x.0,
            plan.w.0,
            plan.conv[Pass::Forward as usize].0,
            plan.y.0,
            a,
        ),
        Algo::BackwardData(a) => result::get_convolution_backward_data_workspace_size(
            h,
            plan.w.0,
            plan.y.0,
            plan.conv[Pass::BackwardData as usize].0,
            plan.x.0,
            a,
        ),
        Algo::BackwardFilter(a) => result::get_convolution_backward_filter_workspace_size(
            h,
            plan.x.0,
            plan.y.0,
            plan.conv[Pass::BackwardFilter as usize].0,
            plan.w.0,
            a,
        ),
    }
}

/// Device addresses of one call, named after the forward: the pass writes one of them and
/// reads the other two (forward writes `y`, backward-data `x` (its gradient), backward-filter
/// `w` (its gradient); `y` is the output gradient in both backward passes).
#[derive(Clone, Copy)]
struct Buffers {
    x: u64,
    w: u64,
    y: u64,
}

/// Runs `algo` (overwriting its output: beta = 0).
///
/// # Safety
/// `h` and the plan's descriptors are alive, the buffers are live and shaped as the
/// descriptors, and the workspace has `ws_len` bytes.
unsafe fn launch(
    h: sys::cudnnHandle_t,
    plan: &Plan,
    algo: Algo,
    (ws, ws_len): (u64, usize),
    b: Buffers,
) -> std::result::Result<(), result::CudnnError> {
    let (alpha, beta) = (1f32, 0f32);
    let a = &alpha as *const f32 as *const c_void;
    let z = &beta as *const f32 as *const c_void;
    let ws = ws as *mut c_void;
    match algo {
        Algo::Forward(algo) => result::convolution_forward(
            h,
            a,
            plan.x.0,
            b.x as *const c_void,
            plan.w.0,
            b.w as *const c_void,
            plan.conv[Pass::Forward as usize].0,
            algo,
            ws,
            ws_len,
            z,
            plan.y.0,
            b.y as *mut c_void,
        ),
        Algo::BackwardData(algo) => result::convolution_backward_data(
            h,
            a,
            plan.w.0,
            b.w as *const c_void,
            plan.y.0,
            b.y as *const c_void,
            plan.conv[Pass::BackwardData as usize].0,
            algo,
            ws,
            ws_len,
            z,
            plan.x.0,
            b.x as *mut c_void,
        ),
        Algo::BackwardFilter(algo) => result::convolution_backward_filter(
            h,
            a,
            plan.x.0,
            b.x as *const c_void,
            plan.y.0,
            b.y as *const c_void,
            plan.conv[Pass::BackwardFilter as usize].0,
            algo,
            ws,
            ws_len,
            z,
            plan.w.0,
            b.w as *mut c_void,
        ),
    }
}

/// Grows `slot` to at least `need` bytes (grow-only: the old buffer is freed stream-ordered,
/// after the work that used it) and returns its address and length.
fn ensure_workspace(
    dev: &CudaDevice,
    slot: &mut Option<CudaSlice<u8>>,
    need: usize,
) -> Result<(u64, usize)> {
    let have = slot.as_ref().map_or(0, |w| w.len());
    if need > have {
        // Free first, so that the old buffer's memory can serve the new one.
        *slot = None;
        // SAFETY: cuDNN workspaces need no initialisation.
        *slot = Some(unsafe { dev.alloc::<u8>(need)? });
    }
    Ok(match slot {
        Some(w) => (w.device_ptr(&dev.cuda_stream()).0, w.len()),
        None => (0, 0),
    })
}

/// What a cuDNN error means while trying candidates: a skippable [`Attempt`], or an error.
fn attempt_of(e: result::CudnnError, stage: &str) -> Result<Attempt> {
    let detail = format!("{stage}: {:?}", e.0);
    Ok(match conv_algo::classify_status(e.0 as u32) {
        StatusClass::NotSupported => Attempt::NotSupported(detail),
        StatusClass::ExecutionFailed => Attempt::ExecutionFailed(detail),
        StatusClass::AllocFailed => Attempt::AllocFailed(detail),
        StatusClass::Other => return Err(err(e)),
    })
}

/// Runs `pass` of the convolution `geom` on `buffers`, with the algorithm chosen for this
/// shape (choosing it first, by running the candidates, on the shape's first call).
fn run(dev: &CudaDevice, geom: &ConvGeom, bf16: bool, pass: Pass, buffers: Buffers) -> Result<()> {
    let what = format!("kernels-conv2d ({})", pass.name());
    super::check_thread(dev, &what)?;
    let precision = crate::precision();
    let math = base_math(precision);
    let key = Key {
        geom: *geom,
        bf16,
        math: math as u32,
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
                // SAFETY: valid handle and stream; cuDNN then queues on the device's stream.
                unsafe { result::set_stream(h.0, stream.cu_stream() as *mut _) }.map_err(err)?;
                e.insert(DeviceState {
                    plans: HashMap::new(),
                    workspace: None,
                    handle: h,
                })
            }
        };
        let DeviceState {
            plans,
            workspace,
            handle,
        } = st;
        let h = handle.0;
        if let std::collections::hash_map::Entry::Vacant(e) = plans.entry(key) {
            e.insert(new_plan(geom, bf16, math)?);
        }
        let plan = plans.get_mut(&key).expect("inserted above");
        if let Some(c) = plan.chosen[pass as usize] {
            let ws = ensure_workspace(dev, workspace, c.workspace)?;
            // SAFETY: descriptors alive; buffers and workspace as `launch` requires.
            return unsafe { launch(h, plan, c.algo, ws, buffers) }.map_err(err);
        }
        let required = (precision == Precision::F32).then_some(math);
        let candidates: Vec<Candidate> = conv_algo::candidates(
            &heuristics(h, plan, pass)?,
            (fixed_algo(pass), math),
            key.deterministic,
            required,
        );
        let conv = plan.conv[pass as usize].0;
        let mut need = 0;
        let chosen =
            conv_algo::first_that_runs(pass.name(), &candidates, conv_algo::fail_first(), |c| {
                let (algo, algo_math) = c;
                // SAFETY (all calls): live descriptors and handle; buffers as `launch` requires.
                unsafe {
                    result::set_convolution_math_type(conv, algo_math).map_err(err)?;
                    need = match workspace_size(h, plan, algo) {
                        Ok(n) => n,
                        Err(e) => return attempt_of(e, "workspace size"),
                    };
                    if need > conv_algo::MAX_WORKSPACE_BYTES {
                        return Ok(Attempt::AllocFailed(format!(
                            "asks for {need} bytes, over the {} byte cap",
                            conv_algo::MAX_WORKSPACE_BYTES
                        )));
                    }
                    let ws = match ensure_workspace(dev, workspace, need) {
                        Ok(ws) => ws,
                        Err(e) => {
                            return Ok(Attempt::AllocFailed(format!("{need} bytes: {e}")));
                        }
                    };
                    match launch(h, plan, algo, ws, buffers) {
                        Ok(()) => Ok(Attempt::Ran),
                        Err(e) => attempt_of(e, "run"),
                    }
                }
            })
            .map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
        // The descriptor keeps the math type set for the candidate that ran (the last tried).
        plan.chosen[pass as usize] = Some(Chosen {
            algo: chosen.0,
            workspace: need,
        });
        Ok(())
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
    let (out, yp) = alloc(dev, dtype(bf16), g.batch * g.c_out * g.h_out * g.w_out)?;
    let buffers = Buffers {
        x: xp,
        w: wp,
        y: yp,
    };
    run(dev, g, bf16, Pass::Forward, buffers)?;
    Ok(out)
}

fn dtype(bf16: bool) -> DType {
    if bf16 {
        DType::BF16
    } else {
        DType::F32
    }
}

/// One gradient of the convolution: the input's (`need_x`, backward-data) or the weight's
/// (backward-filter), in its own buffer. The front asks for each separately, so that a kept
/// weight gradient does not keep an activation-sized input gradient alive.
pub(crate) fn backward(
    g: &ConvGeom,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
    need_x: bool,
    need_w: bool,
) -> Result<CudaStorage> {
    let name = "kernels-conv2d-backward";
    if need_x == need_w {
        bail!("{name} (cuDNN): one gradient per call (need_x {need_x}, need_w {need_w})");
    }
    let dev = &x.device;
    let bf16 = data_type(x, "input")?;
    if data_type(w, "weight")? != bf16 || data_type(dy, "output gradient")? != bf16 {
        bail!("{name} (cuDNN): input, weight and gradient dtypes differ");
    }
    let xp = dev_ptr(x, xl, name, "input")?;
    let wp = dev_ptr(w, wl, name, "weight")?;
    let dyp = dev_ptr(dy, dyl, name, "output gradient")?;
    if need_x {
        let (out, dxp) = alloc(dev, dtype(bf16), g.batch * g.c_in * g.h * g.w)?;
        let buffers = Buffers {
            x: dxp,
            w: wp,
            y: dyp,
        };
        run(dev, g, bf16, Pass::BackwardData, buffers)?;
        Ok(out)
    } else {
        let w_len = g.c_out * (g.c_in / g.groups) * g.kh * g.kw;
        let (out, dwp) = alloc(dev, dtype(bf16), w_len)?;
        let buffers = Buffers {
            x: xp,
            w: dwp,
            y: dyp,
        };
        run(dev, g, bf16, Pass::BackwardFilter, buffers)?;
        Ok(out)
    }
}
