//! CPU implementations on contiguous f32 slices. Device-independent shape handling and the
//! candle custom-op plumbing live in the parent modules, so a CUDA implementation only needs
//! to provide the same kernels.

pub(crate) mod batch_norm;
pub(crate) mod conv;
pub(crate) mod matmul;
pub(crate) mod winograd;

use candle_core::{bail, CpuStorage, Layout, Result};

/// The contiguous f32 data of a CPU tensor argument, or an error naming the op and argument.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    arg: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => bail!("{op}: {arg} must be f32"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: {arg} must be contiguous"),
    }
}

/// Runs `f` in a function compiled for AVX2 and FMA when the CPU has them, else as is.
///
/// The crate is built for baseline x86-64 (SSE2) so that one binary runs everywhere; element-wise
/// loops inlined into `f` (mark their functions `#[inline(always)]`) get 8-wide vectors this way.
/// Results are unchanged: Rust never contracts `a * b + c` into an FMA on its own.
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { run(f) };
        }
    }
    f()
}
