//! The CPU convolution under `Precision::Bf16` (bf16 operands and results around f32
//! arithmetic, the CUDA autocast's CPU twin): forward, input gradient and weight gradient
//! against an f64 direct convolution of the bf16-rounded operands (tight: only the f32 sums'
//! order and the final rounding differ) and against the unrounded f32 result (bf16's
//! tolerance), over the shapes the networks use: 3×3 on 32×32, 4×4 planes, stride 2, 1×1,
//! grouped (ResNeXt), and the three-channel stem.
//!
//! Its own test binary: the precision is process-wide, and every test here sets bf16.

use candle_core::{Device, Result, Tensor, Var};
use kernels::{ConvParams, Precision};

/// Fixed values in [-1, 1), with some small ones so that rounding matters at every scale.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if i % 7 == 0 {
                v * 1e-3
            } else {
                v
            }
        })
        .collect()
}

/// Round to nearest bf16, ties to even, through an independent route (f64 distances).
fn bf16(x: f32) -> f32 {
    let down = f32::from_bits(x.to_bits() & 0xffff_0000);
    let up = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
    let (dd, du) = ((x as f64 - down as f64).abs(), (up as f64 - x as f64).abs());
    if dd < du || (dd == du && (down.to_bits() >> 16) & 1 == 0) {
        down
    } else {
        up
    }
}

/// Half the spacing of bf16 values around `e` (8 significant bits).
fn half_bf16_step(e: f64) -> f64 {
    if e == 0.0 {
        return 0.0;
    }
    2f64.powi(e.abs().log2().floor() as i32 - 8)
}

struct Case {
    name: &'static str,
    batch: usize,
    c_in: usize,
    c_out: usize,
    side: usize,
    k: usize,
    stride: usize,
    groups: usize,
}

impl Case {
    fn out_side(&self) -> usize {
        (self.side + 2 * (self.k / 2) - self.k) / self.stride + 1
    }
}

/// f64 direct convolution and its two gradients (for the output gradient `gy`).
fn reference(c: &Case, x: &[f32], w: &[f32], gy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (s, o, p) = (c.side, c.out_side(), c.k / 2);
    let (cig, cog) = (c.c_in / c.groups, c.c_out / c.groups);
    let mut y = vec![0f64; c.batch * c.c_out * o * o];
    let mut gx = vec![0f64; x.len()];
    let mut gw = vec![0f64; w.len()];
    for b in 0..c.batch {
        for co in 0..c.c_out {
            let grp = co / cog;
            for oy in 0..o {
                for ox in 0..o {
                    let yi = ((b * c.c_out + co) * o + oy) * o + ox;
                    for ci in 0..cig {
                        let cx = grp * cig + ci;
                        for ky in 0..c.k {
                            for kx in 0..c.k {
                                let iy = (oy * c.stride + ky) as isize - p as isize;
                                let ix = (ox * c.stride + kx) as isize - p as isize;
                                if iy < 0 || ix < 0 || iy >= s as isize || ix >= s as isize {
                                    continue;
                                }
                                let xi = ((b * c.c_in + cx) * s + iy as usize) * s + ix as usize;
                                let wi = ((co * cig + ci) * c.k + ky) * c.k + kx;
                                y[yi] += x[xi] as f64 * w[wi] as f64;
                                gx[xi] += gy[yi] as f64 * w[wi] as f64;
                                gw[wi] += gy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (y, gx, gw)
}

/// Largest |actual - expected| over the largest |expected| (the error relative to the
/// output's scale, as a sum's rounding error scales).
fn scaled_error(actual: &[f32], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = actual
        .iter()
        .zip(expected)
        .fold(0f64, |m, (a, e)| m.max((*a as f64 - e).abs()));
    worst / scale
}

fn check(c: &Case) -> Result<()> {
    kernels::set_precision(Precision::Bf16);
    let o = c.out_side();
    let x = values(c.batch * c.c_in * c.side * c.side, 1);
    let w: Vec<f32> = values(c.c_out * (c.c_in / c.groups) * c.k * c.k, 2)
        .iter()
        .map(|v| v * 0.2)
        .collect();
    let gy = values(c.batch * c.c_out * o * o, 3);
    let dev = Device::Cpu;
    let xt = Var::from_vec(x.clone(), (c.batch, c.c_in, c.side, c.side), &dev)?;
    let wt = Var::from_vec(w.clone(), (c.c_out, c.c_in / c.groups, c.k, c.k), &dev)?;
    let cfg = ConvParams {
        stride: c.stride,
        padding: c.k / 2,
        groups: c.groups,
    };
    let y = kernels::conv2d(xt.as_tensor(), wt.as_tensor(), cfg)?;
    let gy_t = Tensor::from_vec(gy.clone(), y.shape(), &dev)?;
    let grads = (&y * &gy_t)?.sum_all()?.backward()?;
    let got = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (y, gx, gw) = (
        got(&y)?,
        got(grads.get(xt.as_tensor()).expect("input gradient"))?,
        got(grads.get(wt.as_tensor()).expect("weight gradient"))?,
    );
    // The taped network's entry point gives the same bits as the autograd one.
    let (tx, tw) = kernels::conv2d_backward(
        &xt.as_tensor().detach(),
        &wt.as_tensor().detach(),
        &gy_t,
        cfg,
        true,
        true,
    )?;
    assert_eq!(got(&tx.expect("grad_x"))?, gx, "{}: taped grad_x", c.name);
    assert_eq!(got(&tw.expect("grad_w"))?, gw, "{}: taped grad_w", c.name);

    let round = |v: &[f32]| v.iter().map(|&v| bf16(v)).collect::<Vec<_>>();
    let exact_rounded = reference(c, &round(&x), &round(&w), &round(&gy));
    let unrounded = reference(c, &x, &w, &gy);
    for (what, ours, exact, f32_like) in [
        ("output", &y, &exact_rounded.0, &unrounded.0),
        ("grad_x", &gx, &exact_rounded.1, &unrounded.1),
        ("grad_w", &gw, &exact_rounded.2, &unrounded.2),
    ] {
        // Every result is a bf16 value.
        assert!(
            ours.iter().all(|v| v.to_bits() & 0xffff == 0),
            "{}: {what} not rounded to bf16",
            c.name
        );
        // Tight, element by element: the f64 sum of the same bf16 operands is within half a
        // bf16 step of ours (one rounding), give or take the f32 sums' own error (Winograd's
        // included, ≤ 5e-6 of the output's scale in the f32 tests; 2e-5 here).
        let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(exact.iter())
            .map(|(a, e)| (*a as f64 - e).abs() - half_bf16_step(*e) - 2e-5 * scale)
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(
            worst <= 0.0,
            "{}: {what} beyond half a bf16 step of the bf16-operand f64 result by {:e} of the scale",
            c.name,
            worst / scale
        );
        // Loose: against the unrounded operands' result, bf16's tolerance.
        let loose = scaled_error(ours, f32_like);
        assert!(
            loose < 1.5e-2,
            "{}: {what} vs f32 operands: {loose:e}",
            c.name
        );
        assert!(
            loose > 0.0,
            "{}: {what} identical to f32: rounding not applied",
            c.name
        );
    }
    Ok(())
}

#[test]
fn bf16_conv_3x3_on_32x32_planes() -> Result<()> {
    check(&Case {
        name: "3x3 32x32 (Winograd F4)",
        batch: 2,
        c_in: 32,
        c_out: 32,
        side: 32,
        k: 3,
        stride: 1,
        groups: 1,
    })
}

#[test]
fn bf16_conv_3x3_on_4x4_planes() -> Result<()> {
    check(&Case {
        name: "3x3 4x4 (Winograd F2)",
        batch: 3,
        c_in: 64,
        c_out: 64,
        side: 4,
        k: 3,
        stride: 1,
        groups: 1,
    })
}

#[test]
fn bf16_conv_3x3_stride_2() -> Result<()> {
    check(&Case {
        name: "3x3 stride 2",
        batch: 2,
        c_in: 16,
        c_out: 32,
        side: 16,
        k: 3,
        stride: 2,
        groups: 1,
    })
}

#[test]
fn bf16_conv_1x1_stride_2_and_1() -> Result<()> {
    check(&Case {
        name: "1x1 stride 2",
        batch: 2,
        c_in: 16,
        c_out: 32,
        side: 8,
        k: 1,
        stride: 2,
        groups: 1,
    })?;
    check(&Case {
        name: "1x1 stride 1",
        batch: 2,
        c_in: 32,
        c_out: 16,
        side: 8,
        k: 1,
        stride: 1,
        groups: 1,
    })
}

#[test]
fn bf16_conv_grouped() -> Result<()> {
    check(&Case {
        name: "3x3 grouped (32 groups of 4)",
        batch: 2,
        c_in: 128,
        c_out: 128,
        side: 8,
        k: 3,
        stride: 1,
        groups: 32,
    })?;
    check(&Case {
        name: "3x3 grouped stride 2",
        batch: 2,
        c_in: 64,
        c_out: 64,
        side: 8,
        k: 3,
        stride: 2,
        groups: 32,
    })
}

#[test]
fn bf16_conv_stem() -> Result<()> {
    check(&Case {
        name: "stem 3 -> 16",
        batch: 2,
        c_in: 3,
        c_out: 16,
        side: 32,
        k: 3,
        stride: 1,
        groups: 1,
    })
}
