//! CIFAR-10 normalization constants (spec §1.2), duplicated here so that
//! mix-ops does not depend on the data crate. SaliencyMix needs them to turn a
//! normalized image back into 8-bit RGB.

/// Per-channel RGB mean on the `[0, 1]` scale.
pub const CIFAR10_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
/// Per-channel RGB "std" on the `[0, 1]` scale (the widely-copied CIFAR values).
pub const CIFAR10_STD: [f64; 3] = [0.2023, 0.1994, 0.2010];

/// Inverts `(v/255 − mean)/std` channel by channel and rounds to `u8` (clamped).
/// `chw` is one image in channel-major order with `mean.len()` channels.
pub fn denormalize_to_u8(chw: &[f32], mean: &[f64; 3], std: &[f64; 3]) -> Vec<u8> {
    let plane = chw.len() / 3;
    chw.iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = i / plane.max(1);
            let pixel = (v as f64 * std[c] + mean[c]) * 255.0;
            pixel.round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denormalize_inverts_normalization() {
        let raw: Vec<u8> = vec![0, 17, 255, 128, 3, 200];
        let norm: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = i / 2;
                ((v as f64 / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]) as f32
            })
            .collect();
        assert_eq!(denormalize_to_u8(&norm, &CIFAR10_MEAN, &CIFAR10_STD), raw);
    }
}
