//! `--device` parsing and the process-wide device settings of a run.

use anyhow::{bail, Result};
use candle_core::Device;

pub use backbones::kernels::Precision;

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device. A CUDA device is opened by
/// `kernels::cuda_device`: on one explicit stream that every host thread queues onto, event
/// tracking off, the memory pool keeping freed memory.
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
            Ok(backbones::kernels::cuda_device(ordinal)?)
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
