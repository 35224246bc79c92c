//! `--device` parsing.

use anyhow::{bail, Result};
use candle_core::Device;

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
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
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("--device: unknown device `{other}` (expected cpu, cuda or cuda:N)"),
    }
}
