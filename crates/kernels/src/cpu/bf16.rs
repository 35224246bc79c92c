//! bf16 numerics on f32 units: the CPU twin of the CUDA bf16 autocast convolution.
//!
//! Under [`crate::Precision::Bf16`] the CUDA path casts a convolution's operands to bf16, lets
//! cuDNN multiply them and accumulate in f32, and casts the result back through bf16 (forward:
//! `y`; backward: `grad_out` in, `grad_x` and `grad_w` out). The CPU ops reproduce those casts
//! around the f32 kernels: every operand and result is rounded to the nearest bf16 (ties to
//! even, as `__float2bfloat16_rn` and the `half` crate) and kept in f32 storage. A product of
//! two bf16 values is exact in f32, so the sums differ from a bf16 GEMM's only in their order.
//! This is slower than f32 (three extra passes over the data per call), never faster: it
//! exists for accuracy studies and as the reference a CPU bf16 kernel (AMX, AVX512-BF16) is
//! tested against, not for speed.

use rayon::prelude::*;

/// `x` rounded to the nearest bf16 (ties to even), as f32. NaN stays NaN (quietened), ±∞
/// stays, and a finite value past bf16's largest rounds to ±∞, as the hardware conversions do.
#[inline]
pub(crate) fn round_to_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((bits | 0x0040_0000) & 0xffff_0000);
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// Elements per parallel task: big enough that the split costs nothing next to the pass.
const CHUNK: usize = 1 << 16;

/// Rounds every element of `data` to bf16 in place ([`round_to_bf16`]).
pub(crate) fn round_in_place(data: &mut [f32]) {
    data.par_chunks_mut(CHUNK).for_each(|chunk| {
        for v in chunk {
            *v = round_to_bf16(*v);
        }
    });
}

/// A bf16-rounded copy of `data` ([`round_to_bf16`]).
pub(crate) fn rounded(data: &[f32]) -> Vec<f32> {
    let mut out = data.to_vec();
    round_in_place(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an independent rounding: the nearest of the two bf16 neighbours by exact
    /// (f64) distance, the even one on a tie.
    fn nearest_bf16(x: f32) -> f32 {
        let down = f32::from_bits(x.to_bits() & 0xffff_0000);
        let up = f32::from_bits((x.to_bits() & 0xffff_0000).wrapping_add(0x1_0000));
        let (dd, du) = ((x as f64 - down as f64).abs(), (up as f64 - x as f64).abs());
        if dd < du || (dd == du && (down.to_bits() >> 16) & 1 == 0) {
            down
        } else {
            up
        }
    }

    #[test]
    fn rounds_to_the_nearest_bf16_ties_to_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up to the even one.
        assert_eq!(
            round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(
            round_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(round_to_bf16(-2.5), -2.5);
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_to_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!(round_to_bf16(f32::NAN).is_nan());
        // A NaN whose payload sits in the low half only must not become ∞.
        assert!(round_to_bf16(f32::from_bits(0x7f80_0001)).is_nan());
        let mut s = 0x9e37_79b9u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s);
            if x.is_finite() && x.abs() < 3e38 {
                assert_eq!(
                    round_to_bf16(x).to_bits(),
                    nearest_bf16(x).to_bits(),
                    "{x:e}"
                );
            }
        }
    }

    #[test]
    fn the_parallel_pass_rounds_every_element() {
        let data: Vec<f32> = (0..3 * CHUNK + 17).map(|i| 1.0 + i as f32 * 1e-5).collect();
        let r = rounded(&data);
        assert!(r.iter().zip(&data).all(|(a, b)| *a == round_to_bf16(*b)));
        assert!(r.iter().all(|v| v.to_bits() & 0xffff == 0));
    }
}
