//! `--device` parsing and the process-wide device settings of a run.

use anyhow::{bail, Result};
use candle_core::Device;

pub use backbones::kernels::Precision;

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device. A CUDA device comes back tuned for
/// training (see [`tune_cuda`]).
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--device: `{s}` is not cuda:N"))?,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this runner was built without CUDA; rebuild with `--features cuda`");
            }
            let device = Device::new_cuda(ordinal)?;
            tune_cuda(&device)?;
            Ok(device)
        }
        other => bail!("--device: unknown device `{other}` (expected cpu, cuda or cuda:N)"),
    }
}

/// Sets the run's numeric settings (`train.precision`, `train.deterministic`) for the whole
/// process. Call once, after [`parse_device`] and before the first forward pass: cuDNN
/// algorithm choices are cached per shape with the settings in force at the time.
///
/// * `precision` selects cuDNN's math for convolutions (f32: FMA only; tf32: tensor cores;
///   bf16: autocast, see `kernels::conv2d`) and whether candle's f32 matmuls may use TF32.
///   CPU computation is f32 whatever it says.
/// * `deterministic` restricts cuDNN to algorithms it reports as deterministic.
///
/// Errors when the device cannot honour the request (bf16 without cuDNN convolutions).
pub fn configure(device: &Device, precision: Precision, deterministic: bool) -> Result<()> {
    if device.is_cuda() && precision == Precision::Bf16 && !backbones::kernels::CUDNN_CONV {
        bail!(
            "train.precision: \"bf16\" needs the cuDNN convolutions; rebuild the runner with \
             `--features cudnn` (or use \"tf32\" / \"f32\")"
        );
    }
    backbones::kernels::set_precision(precision);
    backbones::kernels::set_deterministic(deterministic);
    // candle's own f32 GEMMs (the FC head, AutoMix's attention): TF32 unless strict f32.
    candle_core::cuda::set_gemm_reduced_precision_f32(precision != Precision::F32);
    Ok(())
}

/// [`configure`] with the config file's spelling of the fields. The training entry calls it
/// with the run's `cfg.train` right after opening the device.
pub fn configure_from(device: &Device, cfg: &bench_config::TrainConfig) -> Result<()> {
    let precision = match cfg.precision {
        bench_config::Precision::F32 => Precision::F32,
        bench_config::Precision::Tf32 => Precision::Tf32,
        bench_config::Precision::Bf16 => Precision::Bf16,
    };
    configure(device, precision, cfg.deterministic)
}

/// Host-overhead settings for a freshly opened CUDA device:
///
/// * CUDA event tracking off. candle's tensors all live on the device's one stream, where
///   the two events cudarc creates and records per allocation order nothing; they only cost
///   driver calls. (Safe only as long as everything uses that one stream, which all of
///   mixbench does; it applies to tensors created after this call.)
/// * The default memory pool keeps freed memory (release threshold = max) instead of
///   returning it to the driver at every synchronisation, so the per-op allocations that
///   candle makes are served from the pool.
#[cfg(feature = "cuda")]
fn tune_cuda(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(dev) = device else {
        return Ok(());
    };
    // SAFETY: see the doc comment: one stream per device throughout the process.
    unsafe { dev.disable_event_tracking() };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread()?;
    // SAFETY: the device handle comes from a live context; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())?;
        let mut threshold: u64 = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn tune_cuda(_device: &Device) -> Result<()> {
    Ok(())
}
