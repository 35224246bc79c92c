//! CUDA implementations of the custom ops (feature `cuda`; convolutions need `cudnn`).
//!
//! Every launch goes to the candle device's own stream (`CudaDevice::cuda_stream`), so it is
//! ordered with candle's kernels without events. Kernels receive raw device pointers taken from
//! candle's storages. That is sound because all work of a device is on that one stream: the
//! pointer is only used by work queued after the producers and before any free, and candle frees
//! memory stream-ordered (`cuMemFreeAsync`).
//!
//! "One stream" needs a device opened on an explicit stream ([`crate::cuda_device`], candle's
//! `Device::new_cuda_with_stream`): then every host thread queues onto it. On a device from
//! `Device::new_cuda` (the per-thread default stream: one stream per host thread) the ops run
//! only on the thread that used the device first and return an error elsewhere
//! ([`check_thread`], `crate::thread_rule`).

pub(crate) mod batch_norm;
#[cfg(feature = "cudnn")]
pub(crate) mod conv;
pub(crate) mod loss;
pub(crate) mod residual;
pub(crate) mod sgd;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{bail, DType, Layout, Result};

/// PTX of `kernels.cu`, compiled by build.rs.
pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/mixbench_kernels.ptx"));
/// Module name under which candle caches the loaded PTX per device.
pub(crate) const MODULE: &str = "mixbench_kernels";

/// Launches kernel `$name` of our PTX on `$dev`'s stream with `$cfg` and by-reference args.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        $crate::cuda::check_thread(&$dev, $name)?;
        let f = $dev.get_or_load_custom_func($name, $crate::cuda::MODULE, $crate::cuda::PTX)?;
        let mut b = f.builder();
        $( b.arg($arg); )+
        // SAFETY: argument types and order match the kernel signature in kernels.cu.
        unsafe { b.launch($cfg) }.w()?;
    }};
}
pub(crate) use launch;

/// The handle cudarc gives the per-thread default stream (`CU_STREAM_PER_THREAD`).
const PER_THREAD_STREAM: usize = 0x2;

/// First users of the devices that run on the per-thread default stream.
static PER_THREAD_STREAM_USERS: crate::thread_rule::FirstThread<
    candle_core::cuda_backend::DeviceId,
> = crate::thread_rule::FirstThread::new();

/// Refuses to queue work for `dev` from this thread when that would not be ordered with the
/// device's other work: only for a device on the per-thread default stream used before by
/// another thread (see the module docs). Explicit streams pass with one comparison.
pub(crate) fn check_thread(dev: &CudaDevice, op: &str) -> Result<()> {
    if dev.cuda_stream().cu_stream() as usize == PER_THREAD_STREAM {
        PER_THREAD_STREAM_USERS.check(dev.id(), op)
    } else {
        Ok(())
    }
}

/// Raw device address of a contiguous tensor argument (its layout's start offset applied).
pub(crate) fn dev_ptr(s: &CudaStorage, l: &Layout, op: &str, arg: &str) -> Result<u64> {
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("{op}: {arg} must be contiguous");
    };
    let stream = s.device.cuda_stream();
    // The SyncOnDrop guards are dropped at once: with a single stream there is nothing to sync.
    let (base, elem) = match &s.slice {
        CudaStorageSlice::F32(v) => (v.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(v) => (v.device_ptr(&stream).0, 2),
        _ => bail!("{op}: {arg} must be f32 or bf16, got {:?}", s.dtype()),
    };
    Ok(base + (start * elem) as u64)
}

/// Device address of a contiguous CUDA tensor that an op uses out of band (not one of its
/// inputs): the statistics, weight and bias of the BatchNorm ops, the running statistics the
/// stats kernel writes. The read guard is released at once; the address stays valid because the
/// op holds the tensor and all work is ordered on the one stream.
pub(crate) fn tensor_ptr(t: &candle_core::Tensor, op: &str, arg: &str) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cuda(s) => dev_ptr(s, layout, op, arg),
        _ => bail!("{op}: {arg} must be on the CUDA device"),
    }
}

/// A fresh, uninitialised device buffer of `len` elements of `dtype` (f32, bf16, or f64 for
/// scratch sums), with its address. Every caller overwrites all of it.
pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, len: usize) -> Result<(CudaStorage, u64)> {
    // Every op allocates its output before launching: refuse here, before any allocation.
    check_thread(dev, "kernels")?;
    let stream = dev.cuda_stream();
    // SAFETY: the buffer is fully written by the kernel or cuDNN call that follows.
    let storage = match dtype {
        DType::F32 => {
            let s = unsafe { dev.alloc::<f32>(len.max(1))? };
            CudaStorage::wrap_cuda_slice(s, dev.clone())
        }
        DType::BF16 => {
            let s = unsafe { dev.alloc::<half::bf16>(len.max(1))? };
            CudaStorage::wrap_cuda_slice(s, dev.clone())
        }
        DType::F64 => {
            let s = unsafe { dev.alloc::<f64>(len.max(1))? };
            CudaStorage::wrap_cuda_slice(s, dev.clone())
        }
        other => bail!("kernels: cannot allocate {other:?} on CUDA"),
    };
    let ptr = match &storage.slice {
        CudaStorageSlice::F32(v) => v.device_ptr(&stream).0,
        CudaStorageSlice::BF16(v) => v.device_ptr(&stream).0,
        CudaStorageSlice::F64(v) => v.device_ptr(&stream).0,
        _ => unreachable!(),
    };
    Ok((storage, ptr))
}

/// One block per `blocks` item with `threads` threads (≤ 1024).
pub(crate) fn cfg(blocks: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for a loop over `len` items: a warp multiple, at most `max`.
pub(crate) fn threads_for(len: usize, max: usize) -> usize {
    len.div_ceil(32).clamp(1, max / 32) * 32
}
