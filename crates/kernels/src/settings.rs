//! Process-wide numeric settings of the custom ops: precision and determinism.
//!
//! Global rather than per call because they are a property of the run (one config field each),
//! and threading them through every backbone layer would change every signature for a value that
//! never varies within a run.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Arithmetic used by convolutions (and candle's f32 matmuls) on CUDA. On the CPU, f32 and
/// tf32 both compute in f32, and bf16 gives the convolutions bf16 numerics on f32 units (each
/// operand and result rounded to bf16, as the CUDA casts do; slower than f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Strict f32: cuDNN restricted to FMA math, no tensor-core down-conversion.
    #[default]
    F32,
    /// f32 storage, TF32 tensor-core math for convolutions and matmuls (PyTorch's default for
    /// cuDNN convolutions).
    Tf32,
    /// bf16 autocast for convolutions: inputs and weights are cast to bf16, cuDNN accumulates in
    /// f32, and results come back as f32. Master weights, gradients and BatchNorm statistics
    /// stay f32.
    Bf16,
}

impl Precision {
    /// The config spelling: `"f32"`, `"tf32"` or `"bf16"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown precision {other:?} (expected \"f32\", \"tf32\" or \"bf16\")"
            )),
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);
static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Sets the precision of convolutions for the rest of the process. Descriptors already
/// cached keep theirs, so call it before the first CUDA convolution.
pub fn set_precision(p: Precision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The current convolution precision (default [`Precision::F32`]).
pub fn precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Tf32,
        2 => Precision::Bf16,
        _ => Precision::F32,
    }
}

/// Restricts cuDNN to algorithms that it reports as deterministic (bit-reproducible run to run
/// on the same GPU and library versions). The CPU kernels are always deterministic. Call before
/// the first CUDA convolution: algorithm choices are cached per shape.
pub fn set_deterministic(on: bool) {
    DETERMINISTIC.store(on, Ordering::Relaxed);
}

/// Whether deterministic cuDNN algorithms are required (default false).
pub fn deterministic() -> bool {
    DETERMINISTIC.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_round_trips_through_its_spelling() {
        for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
        }
        assert!("fp16".parse::<Precision>().is_err());
    }
}
