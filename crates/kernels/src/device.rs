//! Opening a CUDA device the way the custom ops need it.

use candle_core::{Device, Result};

/// Opens CUDA device `ordinal` on one explicit stream, set up for training with these ops:
///
/// * **One explicit stream** (candle's `Device::new_cuda_with_stream`). candle's cuBLAS and
///   cuRAND handles, its kernels, our kernels and our cuDNN handles (bound in `cuda::conv`) all
///   queue onto it, from whichever host thread. `Device::new_cuda` would use the per-thread
///   default stream instead: a separate stream per host thread, with nothing ordering their
///   work (see `thread_rule`).
/// * **Event tracking off.** With every piece of work on that one stream, stream order is all
///   the ordering there is to have; the two events cudarc would create per allocation and
///   record per use order nothing and cost driver calls. This is sound only while nothing
///   creates a second stream on the device (mixbench does not); it applies to tensors created
///   from here on.
/// * **The memory pool keeps freed memory** (release threshold = max) instead of returning it
///   to the driver at every synchronisation, so candle's per-op allocations are served from
///   the pool.
///
/// An error in a build without feature `cuda` or without a device.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let device = Device::new_cuda_with_stream(ordinal)?;
        let Device::Cuda(dev) = &device else {
            unreachable!("new_cuda_with_stream returns a CUDA device");
        };
        // SAFETY: every use of this device's memory is on its one stream (see above).
        unsafe { dev.disable_event_tracking() };
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let wrap = |e: result::DriverError| candle_core::Error::Cuda(format!("{e:?}").into());
        ctx.bind_to_thread().map_err(wrap)?;
        // SAFETY: the device handle comes from a live context; the attribute takes a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(wrap)?;
            let mut threshold: u64 = u64::MAX;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            )
            .map_err(wrap)?;
        }
        Ok(device)
    }
    #[cfg(not(feature = "cuda"))]
    candle_core::bail!(
        "kernels::cuda_device({ordinal}): built without feature `cuda` (rebuild with --features cuda)"
    )
}
