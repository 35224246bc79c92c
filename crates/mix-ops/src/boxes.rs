//! Boxes and binary pixel masks shared by the cut-and-paste methods
//! (CutMix, SaliencyMix, ResizeMix, GridMix; spec §5.0, §5.3, §5.6, §5.10, §5.11).
//!
//! Masks are built on the host as `H×W` `u8` (1 = pixel comes from the partner
//! `x[π]`), uploaded once per batch and applied with `where_cond`, so the
//! pasted pixels are bit-exact copies on any device and dtype.

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, RngCore};

/// A half-open box: rows `r1..r2`, columns `c1..c2`, already clipped to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutBox {
    /// First row (inclusive).
    pub r1: usize,
    /// Last row (exclusive).
    pub r2: usize,
    /// First column (inclusive).
    pub c1: usize,
    /// Last column (exclusive).
    pub c2: usize,
}

impl CutBox {
    /// The box `[rc − rows//2, rc + rows//2) × [cc − cols//2, cc + cols//2)` clipped
    /// to `h×w`. Halving with `//` makes an odd side lose one pixel, as upstream.
    pub fn centred(rc: usize, cc: usize, rows: usize, cols: usize, h: usize, w: usize) -> Self {
        let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
        let (rc, cc) = (rc as i64, cc as i64);
        let (half_r, half_c) = ((rows / 2) as i64, (cols / 2) as i64);
        Self {
            r1: clip(rc - half_r, h),
            r2: clip(rc + half_r, h),
            c1: clip(cc - half_c, w),
            c2: clip(cc + half_c, w),
        }
    }

    /// Number of pixels inside the box.
    pub fn area(&self) -> usize {
        (self.r2 - self.r1) * (self.c2 - self.c1)
    }

    /// Fraction of an `h×w` image outside the box: the corrected λ' of cut methods.
    pub fn keep_fraction(&self, h: usize, w: usize) -> f64 {
        1.0 - self.area() as f64 / (h * w) as f64
    }

    /// `h×w` mask with 1 inside the box.
    pub fn mask(&self, h: usize, w: usize) -> Vec<u8> {
        let mut m = vec![0u8; h * w];
        for r in self.r1..self.r2 {
            m[r * w + self.c1..r * w + self.c2].fill(1);
        }
        m
    }
}

/// Side length `trunc(size·√(1−λ))` of a CutMix/SaliencyMix box before halving.
pub fn cut_side(size: usize, lambda: f64) -> usize {
    (size as f64 * (1.0 - lambda).sqrt()) as usize
}

/// A uniformly random pixel coordinate in `0..n` (`U{0..n−1}`).
pub fn random_coord(rng: &mut dyn RngCore, n: usize) -> usize {
    rng.random_range(0..n)
}

/// `x` with every pixel where `from_partner` is 1 replaced by the same pixel
/// of `partner`. `from_partner` is row-major `H×W`, shared by the whole batch.
pub fn paste_where(x: &Tensor, partner: &Tensor, from_partner: &[u8]) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    Tensor::from_slice(from_partner, (1, 1, h, w), x.device())?
        .broadcast_as(x.shape())?
        .where_cond(partner, x)
}

/// Per-pixel weight of `x` (`1 − from_partner`) as a `1×1×H×W` f32 tensor, the
/// `mask` reported in [`crate::Mixed`].
pub fn keep_weight(from_partner: &[u8], h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let keep: Vec<f32> = from_partner.iter().map(|&m| 1.0 - m as f32).collect();
    Tensor::from_vec(keep, (1, 1, h, w), device)
}

/// `weight·x + (1 − weight)·partner` for a soft `1×1×H×W` weight of `x` given on
/// the host (SmoothMix, FMix). Returns the mixed images and the weight tensor.
pub fn blend_with_weight(
    x: &Tensor,
    partner: &Tensor,
    weight_of_x: &[f32],
) -> Result<(Tensor, Tensor)> {
    let (_, _, h, w) = x.dims4()?;
    let weight = Tensor::from_slice(weight_of_x, (1, 1, h, w), x.device())?;
    let wx = weight.to_dtype(x.dtype())?;
    let wp = (1.0 - &wx)?;
    let mixed = (x.broadcast_mul(&wx)? + partner.broadcast_mul(&wp)?)?;
    Ok((mixed, weight.to_dtype(DType::F32)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centred_box_halves_and_clips() {
        // Odd side 7 → half 3 → box of side 6; centre near the edge is clipped.
        let b = CutBox::centred(1, 30, 7, 7, 32, 32);
        assert_eq!(
            b,
            CutBox {
                r1: 0,
                r2: 4,
                c1: 27,
                c2: 32
            }
        );
        assert_eq!(b.area(), 20);
        assert_eq!(b.keep_fraction(32, 32), 1.0 - 20.0 / 1024.0);
        let m = b.mask(32, 32);
        assert_eq!(m.iter().map(|&v| v as usize).sum::<usize>(), 20);
        assert_eq!(m[3 * 32 + 27], 1);
        assert_eq!(m[4 * 32 + 27], 0);
        // A side ≤ 1 gives an empty box.
        assert_eq!(CutBox::centred(5, 5, 1, 1, 32, 32).area(), 0);
    }

    #[test]
    fn cut_side_truncates() {
        assert_eq!(cut_side(32, 0.0), 32);
        assert_eq!(cut_side(32, 1.0), 0);
        assert_eq!(cut_side(32, 0.75), 16);
        assert_eq!(cut_side(32, 0.5), 22); // 32·0.7071 = 22.6
    }

    #[test]
    fn paste_where_copies_exact_pixels() -> Result<()> {
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu)?;
        let p = Tensor::ones((2, 3, 4, 4), DType::F32, &Device::Cpu)?;
        let b = CutBox {
            r1: 1,
            r2: 3,
            c1: 0,
            c2: 2,
        };
        let out = paste_where(&x, &p, &b.mask(4, 4))?;
        assert_eq!(out.sum_all()?.to_scalar::<f32>()?, 2.0 * 3.0 * 4.0);
        assert_eq!(out.get(1)?.get(2)?.get(2)?.get(1)?.to_scalar::<f32>()?, 1.0);
        assert_eq!(out.get(1)?.get(2)?.get(2)?.get(2)?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
