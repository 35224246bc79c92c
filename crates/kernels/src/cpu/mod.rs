//! CPU implementations on contiguous f32 slices. Device-independent shape handling and the
//! candle custom-op plumbing live in the parent modules, so a CUDA implementation only needs
//! to provide the same kernels.

pub(crate) mod batch_norm;
pub(crate) mod conv;
pub(crate) mod matmul;

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
