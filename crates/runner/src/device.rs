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
///   On the CPU, f32 and tf32 both compute in f32 (as PyTorch ignores TF32 there).
/// * `deterministic` restricts cuDNN to algorithms it reports as deterministic.
///
/// Errors, naming `field` (the config field or flag that asked), when the device cannot
/// honour the request: bf16 without cuDNN convolutions, or bf16 on the CPU, which has no bf16
/// kernels (a run must not train in f32 while its config says bf16), unless [`CPU_BF16_ENV`]
/// asks for the emulation.
pub fn configure(
    device: &Device,
    precision: Precision,
    deterministic: bool,
    field: &str,
) -> Result<()> {
    if precision == Precision::Bf16 {
        if device.is_cuda() && !backbones::kernels::CUDNN_CONV {
            bail!(
                "{field}: \"bf16\" needs the cuDNN convolutions; rebuild the runner with \
                 `--features cudnn` (or use \"tf32\" / \"f32\")"
            );
        }
        if !device.is_cuda() && !cpu_bf16_emulated()? {
            bail!(
                "{}",
                cpu_bf16_refusal(field, backbones::kernels::cpu_bf16_units())
            );
        }
    }
    backbones::kernels::set_precision(precision);
    backbones::kernels::set_deterministic(deterministic);
    // candle's own f32 GEMMs (the FC head, AutoMix's attention): TF32 unless strict f32.
    candle_core::cuda::set_gemm_reduced_precision_f32(precision != Precision::F32);
    Ok(())
}

/// The environment variable that lets `"bf16"` run on the CPU without bf16 units:
/// `MIXBENCH_CPU_BF16=emulate` gives the convolutions bf16's numerics on f32 units (operands
/// and results rounded to bf16, as the CUDA autocast casts them; see `kernels::conv2d`). It is
/// slower than f32, never faster: for accuracy studies of bf16 training on a machine without
/// the hardware, and the log says `bf16-emulated`.
pub const CPU_BF16_ENV: &str = "MIXBENCH_CPU_BF16";

/// Whether [`CPU_BF16_ENV`] asks for bf16 emulation on the CPU (`emulate`; unset or empty:
/// no). Any other value is an error naming the variable, not a silent f32 run.
pub fn cpu_bf16_emulated() -> Result<bool> {
    match std::env::var(CPU_BF16_ENV) {
        Ok(v) if v == "emulate" => Ok(true),
        Ok(v) if v.is_empty() => Ok(false),
        Ok(v) => bail!("{CPU_BF16_ENV}: unknown value {v:?} (expected \"emulate\", or unset)"),
        Err(_) => Ok(false),
    }
}

/// The arithmetic a run's convolutions and matmuls really use: the requested precision on
/// CUDA; on the CPU f32 (where tf32 means f32, as in PyTorch), or bf16 where [`configure`]
/// accepted it (emulated, [`CPU_BF16_ENV`]). The log and the start-up line report this (as
/// [`precision_label`]), so a CPU run's default `"tf32"` is not read as TF32.
pub fn effective_precision(device: &Device, requested: Precision) -> Precision {
    if device.is_cuda() {
        requested
    } else if requested == Precision::Bf16 && cpu_bf16_emulated().unwrap_or(false) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// [`effective_precision`] as the log, the start-up line and `runner bench` spell it:
/// `bf16-emulated` for bf16 on the CPU, else the precision's config spelling.
pub fn precision_label(device: &Device, requested: Precision) -> &'static str {
    match effective_precision(device, requested) {
        Precision::Bf16 if !device.is_cuda() => "bf16-emulated",
        p => p.as_str(),
    }
}

/// The config's `train.precision` as the kernels' [`Precision`].
pub fn requested_precision(cfg: &bench_config::TrainConfig) -> Precision {
    match cfg.precision {
        bench_config::Precision::F32 => Precision::F32,
        bench_config::Precision::Tf32 => Precision::Tf32,
        bench_config::Precision::Bf16 => Precision::Bf16,
    }
}

/// [`configure`] with the config file's spelling of the fields. The training entry calls it
/// with the run's `cfg.train` right after opening the device.
pub fn configure_from(device: &Device, cfg: &bench_config::TrainConfig) -> Result<()> {
    configure(
        device,
        requested_precision(cfg),
        cfg.deterministic,
        "train.precision",
    )
}

/// Why bf16 is refused on the CPU (unless emulated): the bf16 units this CPU lacks, or, where
/// it has them, that the CPU bf16 kernels do not exist yet.
fn cpu_bf16_refusal(field: &str, units: backbones::kernels::CpuBf16Units) -> String {
    let instead = "use \"f32\" or \"tf32\" (both compute in f32 on the CPU), or set \
                   MIXBENCH_CPU_BF16=emulate for bf16's numerics on f32 units (slower than f32)";
    if units.any() {
        format!(
            "{field}: \"bf16\" on the CPU has no AMX or AVX512-BF16 kernels yet (this CPU has \
             {units}); {instead}"
        )
    } else {
        format!(
            "{field}: \"bf16\" on the CPU needs AMX-BF16 or AVX512-BF16, and this CPU has \
             {units}; {instead}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backbones::kernels::CpuBf16Units;

    #[test]
    fn cpu_bf16_refusal_names_the_field_and_the_units() {
        let none = cpu_bf16_refusal("train.precision", CpuBf16Units::default());
        assert_eq!(
            none,
            "train.precision: \"bf16\" on the CPU needs AMX-BF16 or AVX512-BF16, and this CPU \
             has neither AMX-BF16 nor AVX512-BF16; use \"f32\" or \"tf32\" (both compute in \
             f32 on the CPU), or set MIXBENCH_CPU_BF16=emulate for bf16's numerics on f32 \
             units (slower than f32)"
        );
        let amx = CpuBf16Units {
            amx_bf16: true,
            avx512_bf16: false,
        };
        let msg = cpu_bf16_refusal("--precision", amx);
        assert!(msg
            .starts_with("--precision: \"bf16\" on the CPU has no AMX or AVX512-BF16 kernels yet"));
        assert!(
            msg.contains("this CPU has AMX-BF16 (no AVX512-BF16)"),
            "{msg}"
        );
    }

    #[test]
    fn bf16_on_the_cpu_is_refused_and_f32_tf32_are_not() {
        let cpu = Device::Cpu;
        let err = configure(&cpu, Precision::Bf16, false, "train.precision").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("train.precision: \"bf16\" on the CPU"));
        for p in [Precision::F32, Precision::Tf32] {
            configure(&cpu, p, false, "train.precision").unwrap();
            assert_eq!(effective_precision(&cpu, p), Precision::F32);
        }
    }
}
