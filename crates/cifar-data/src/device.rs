//! Moving batches to a candle device and normalizing there (spec §1.2–1.3).

use candle_core::{DType, Device, Tensor};

use crate::loader::U8Batch;

/// Per-channel RGB mean on the `[0, 1]` scale.
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// Per-channel RGB "std" on the `[0, 1]` scale (the widely copied CIFAR values, used verbatim).
pub const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];

/// `(255·mean_c, 255·std_c)` as `1×3×1×1` tensors on `device`, computed in f64.
fn channel_constants(device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let scaled =
        |v: [f32; 3]| -> Vec<f32> { v.iter().map(|&x| (x as f64 * 255.0) as f32).collect() };
    let mean = Tensor::from_vec(scaled(MEAN), (1, 3, 1, 1), device)?;
    let std = Tensor::from_vec(scaled(STD), (1, 3, 1, 1), device)?;
    Ok((mean, std))
}

/// Uploads a batch as `u8` and normalizes it on the device:
/// `x = (v − 255·mean_c) / (255·std_c)`, an `f32` tensor of shape `N×3×32×32`, plus the labels
/// as a `u32` tensor of shape `N`.
pub fn to_device_batch(b: &U8Batch, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let pixels = Tensor::from_slice(&b.pixels, (b.len, 3, 32, 32), device)?;
    let (mean, std) = channel_constants(device)?;
    let x = pixels
        .to_dtype(DType::F32)?
        .broadcast_sub(&mean)?
        .broadcast_div(&std)?;
    let y = Tensor::from_slice(&b.labels, b.len, device)?;
    Ok((x, y))
}

/// Inverts [`to_device_batch`]'s normalization: `N×3×H×W` (or `3×H×W`) normalized floats →
/// bytes `round(clamp(x·255·std_c + 255·mean_c, 0, 255))` in the same CHW order.
pub fn denormalize_to_u8(x: &Tensor) -> candle_core::Result<Vec<u8>> {
    let x4 = match x.rank() {
        4 => x.clone(),
        3 => x.unsqueeze(0)?,
        r => candle_core::bail!(
            "denormalize_to_u8: expected a 3-D or 4-D image tensor, got rank {r}"
        ),
    };
    if x4.dim(1)? != 3 {
        candle_core::bail!(
            "denormalize_to_u8: expected 3 channels, got shape {:?}",
            x.dims()
        );
    }
    let (mean, std) = channel_constants(x.device())?;
    x4.to_dtype(DType::F32)?
        .broadcast_mul(&std)?
        .broadcast_add(&mean)?
        .clamp(0f32, 255f32)?
        .round()?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()
}
