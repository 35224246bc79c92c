//! Forward values and every gradient of the custom ops against candle's stock ops, plus a
//! finite-difference check on tiny cases.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::{reference, ConvParams};

/// Deterministic values in [-1, 1) from a xorshift stream, so failures reproduce.
fn pseudo_random(dims: &[usize], seed: u64) -> Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
}

/// Largest absolute difference, relative to the reference's largest magnitude (at least 1).
fn relative_error(actual: &Tensor, expected: &Tensor) -> Result<f32> {
    assert_eq!(actual.dims(), expected.dims());
    let diff = (actual - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(diff / scale)
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) -> Result<()> {
    let err = relative_error(actual, expected)?;
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
    Ok(())
}

struct ConvCase {
    batch: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    cfg: ConvParams,
}

/// Positional constructor keeps the case table one line per case.
#[allow(clippy::too_many_arguments)]
const fn case(
    batch: usize,
    c_in: usize,
    c_out: usize,
    hw: (usize, usize),
    k: usize,
    stride: usize,
    padding: usize,
    groups: usize,
) -> ConvCase {
    ConvCase {
        batch,
        c_in,
        c_out,
        h: hw.0,
        w: hw.1,
        k,
        cfg: ConvParams {
            stride,
            padding,
            groups,
        },
    }
}

const CONV_CASES: &[ConvCase] = &[
    case(3, 4, 6, (7, 7), 3, 1, 1, 1),
    case(3, 4, 6, (8, 8), 3, 2, 1, 1),
    case(3, 4, 6, (6, 5), 3, 1, 0, 1),
    // Square only with stride 2: candle's own conv backward mishandles non-square strided inputs.
    case(3, 4, 6, (7, 7), 3, 2, 0, 1),
    case(3, 8, 4, (5, 5), 1, 1, 0, 1),
    case(3, 8, 12, (6, 6), 1, 2, 0, 1),
    case(3, 8, 8, (9, 9), 3, 2, 1, 4),
    case(3, 8, 12, (6, 6), 3, 1, 1, 4),
    case(3, 8, 8, (5, 5), 1, 1, 0, 4),
    // Small planes: several images share one GEMM (the late-stage path).
    case(3, 6, 5, (4, 4), 3, 1, 1, 1),
    case(5, 8, 8, (2, 2), 3, 1, 1, 4),
    case(9, 4, 6, (2, 2), 3, 1, 1, 1),
    // 3x3, stride 1, padding 1, >= 8 channels: Winograd F(2x2, 3x3) (odd and even planes).
    case(3, 8, 12, (7, 7), 3, 1, 1, 1),
    case(4, 16, 8, (8, 6), 3, 1, 1, 1),
    case(9, 8, 8, (2, 2), 3, 1, 1, 1),
    case(1, 8, 8, (5, 5), 3, 1, 1, 1),
    // ≥ 32 channels and planes ≥ 8 a side: Winograd F(4x4, 3x3) (a multiple of 4 and not).
    case(2, 32, 40, (8, 8), 3, 1, 1, 1),
    case(1, 32, 32, (10, 9), 3, 1, 1, 1),
    // One image: the GEMMs themselves run multithreaded.
    case(1, 4, 6, (7, 7), 3, 2, 1, 1),
];

/// Forward and both gradients of `kernels::conv2d` against candle's `conv2d` with autograd.
#[test]
fn conv2d_matches_candle_forward_and_gradients() -> Result<()> {
    for (i, c) in CONV_CASES.iter().enumerate() {
        let seed = 100 * i as u64;
        let x = Var::from_tensor(&pseudo_random(&[c.batch, c.c_in, c.h, c.w], seed + 1)?)?;
        let w = Var::from_tensor(&pseudo_random(
            &[c.c_out, c.c_in / c.cfg.groups, c.k, c.k],
            seed + 2,
        )?)?;
        let ours = kernels::conv2d(x.as_tensor(), w.as_tensor(), c.cfg)?;
        let stock = reference::conv2d(x.as_tensor(), w.as_tensor(), c.cfg)?;
        let what = format!("case {i} ({:?}, k {})", c.cfg, c.k);
        assert_close(&format!("{what} forward"), &ours, &stock, 1e-5)?;

        let probe = pseudo_random(stock.dims(), seed + 3)?;
        let g_ours = (ours * &probe)?.sum_all()?.backward()?;
        let g_stock = (stock * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("grad x", &x), ("grad w", &w)] {
            let a = g_ours.get(v).expect("custom op produced the gradient");
            let b = g_stock.get(v).expect("candle produced the gradient");
            assert_close(&format!("{what} {name}"), a, b, 1e-4)?;
        }
    }
    Ok(())
}

/// When the input is a constant (the image batch), only the weight gradient is produced.
#[test]
fn conv2d_skips_input_gradient_for_constant_input() -> Result<()> {
    let cfg = ConvParams {
        stride: 1,
        padding: 1,
        groups: 1,
    };
    let x = pseudo_random(&[2, 3, 5, 5], 7)?;
    let w = Var::from_tensor(&pseudo_random(&[4, 3, 3, 3], 8)?)?;
    let g_ours = kernels::conv2d(&x, w.as_tensor(), cfg)?
        .sqr()?
        .sum_all()?
        .backward()?;
    let g_stock = reference::conv2d(&x, w.as_tensor(), cfg)?
        .sqr()?
        .sum_all()?
        .backward()?;
    assert!(g_ours.get(&x).is_none());
    assert_close(
        "grad w",
        g_ours.get(&w).expect("weight gradient"),
        g_stock.get(&w).expect("weight gradient"),
        1e-4,
    )
}

#[test]
fn conv2d_rejects_mismatched_shapes() -> Result<()> {
    let x = pseudo_random(&[2, 6, 5, 5], 1)?;
    let w = pseudo_random(&[4, 4, 3, 3], 2)?;
    let err = kernels::conv2d(&x, &w, ConvParams::default()).unwrap_err();
    assert!(err.to_string().contains("groups"), "{err}");
    let grouped = ConvParams {
        groups: 3,
        ..ConvParams::default()
    };
    let w = pseudo_random(&[4, 2, 3, 3], 2)?;
    assert!(kernels::conv2d(&x, &w, grouped).is_err());
    Ok(())
}

/// Non-CPU-f32 inputs take candle's path and still give the same values.
#[test]
fn conv2d_falls_back_for_other_dtypes() -> Result<()> {
    let cfg = ConvParams {
        stride: 2,
        padding: 1,
        groups: 2,
    };
    let x = pseudo_random(&[2, 4, 6, 6], 3)?;
    let w = pseudo_random(&[6, 2, 3, 3], 4)?;
    let ours = kernels::conv2d(&x.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?, cfg)?;
    assert_eq!(ours.dtype(), DType::F64);
    let stock = reference::conv2d(&x, &w, cfg)?;
    assert_close("f64 fallback", &ours.to_dtype(DType::F32)?, &stock, 1e-5)
}

/// Forward, statistics and all three gradients of the fused BatchNorm against generic ops.
#[test]
fn batch_norm_train_matches_generic_ops() -> Result<()> {
    // Planes of 16 (whole blocks of the CPU kernel's 16 partial sums), 1, 3 and 35 (two
    // blocks and a remainder).
    let shapes = [
        vec![3usize, 5, 4, 4],
        vec![6, 5],
        vec![2, 3, 3, 1],
        vec![3, 4, 5, 7],
    ];
    for (i, dims) in shapes.into_iter().enumerate() {
        for relu in [false, true] {
            let seed = 1000 + 10 * i as u64;
            let c = dims[1];
            // An offset mean exercises the two-pass variance.
            let x = Var::from_tensor(&pseudo_random(&dims, seed)?.affine(3.0, 2.0)?)?;
            let w = Var::from_tensor(&(pseudo_random(&[c], seed + 1)? + 1.5)?)?;
            let b = Var::from_tensor(&pseudo_random(&[c], seed + 2)?)?;
            let eps = 1e-5;
            let (y, mean, var) = if relu {
                kernels::batch_norm_relu_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps)?
            } else {
                kernels::batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps)?
            };
            let (y_ref, mean_ref, var_ref) =
                reference::batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps)?;
            let y_ref = if relu { y_ref.relu()? } else { y_ref };
            let what = format!("bn {dims:?} relu={relu}");
            assert_close(&format!("{what} y"), &y, &y_ref, 1e-5)?;
            assert_close(&format!("{what} mean"), &mean, &mean_ref, 1e-5)?;
            assert_close(&format!("{what} var"), &var, &var_ref, 1e-5)?;

            let probe = pseudo_random(&dims, seed + 3)?;
            let g = (y * &probe)?.sum_all()?.backward()?;
            let g_ref = (y_ref * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("grad x", &x), ("grad w", &w), ("grad b", &b)] {
                let a = g.get(v).expect("custom op produced the gradient");
                let e = g_ref.get(v).expect("generic ops produced the gradient");
                assert_close(&format!("{what} {name}"), a, e, 1e-4)?;
            }
        }
    }
    Ok(())
}

#[test]
fn batch_norm_eval_is_the_running_stats_affine() -> Result<()> {
    let x = pseudo_random(&[2, 3, 2, 2], 5)?;
    let rm = Tensor::new(&[0.5f32, -1.0, 0.0], &Device::Cpu)?;
    let rv = Tensor::new(&[1.0f32, 4.0, 0.25], &Device::Cpu)?;
    let w = Tensor::new(&[2.0f32, 1.0, -1.0], &Device::Cpu)?;
    let b = Tensor::new(&[0.0f32, 1.0, 0.5], &Device::Cpu)?;
    let y = kernels::batch_norm_eval(&x, &rm, &rv, &w, &b, 0.0)?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let ys = y.flatten_all()?.to_vec1::<f32>()?;
    let (m, v, g, bb) = (
        [0.5, -1.0, 0.0],
        [1.0, 4.0, 0.25],
        [2.0, 1.0, -1.0],
        [0.0, 1.0, 0.5],
    );
    for (i, (&xv, &yv)) in xs.iter().zip(&ys).enumerate() {
        let c = (i / 4) % 3;
        let expected = (xv - m[c]) / f32::sqrt(v[c]) * g[c] + bb[c];
        assert!(
            (yv - expected).abs() < 1e-6,
            "element {i}: {yv} vs {expected}"
        );
    }
    Ok(())
}

/// Central finite differences of `loss(x) = sum(f(x) * probe)` at a few coordinates of `var`.
fn finite_difference_check(
    what: &str,
    var: &Var,
    analytic: &Tensor,
    loss: &dyn Fn() -> Result<f32>,
) -> Result<()> {
    let base = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let analytic = analytic.flatten_all()?.to_vec1::<f32>()?;
    let h = 1e-2f32;
    let step = (base.len() / 7).max(1);
    for i in (0..base.len()).step_by(step) {
        let mut plus = base.clone();
        plus[i] += h;
        var.set(&Tensor::from_vec(plus, var.dims(), &Device::Cpu)?)?;
        let l_plus = loss()?;
        let mut minus = base.clone();
        minus[i] -= h;
        var.set(&Tensor::from_vec(minus, var.dims(), &Device::Cpu)?)?;
        let l_minus = loss()?;
        var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu)?)?;
        let numeric = (l_plus - l_minus) / (2.0 * h);
        let err = (numeric - analytic[i]).abs() / analytic[i].abs().max(1.0);
        assert!(
            err < 1e-2,
            "{what}[{i}]: numeric {numeric} vs analytic {}",
            analytic[i]
        );
    }
    Ok(())
}

/// Non-square strided inputs, which candle's own conv backward cannot be compared on.
#[test]
fn finite_differences_agree_on_non_square_strided_conv() -> Result<()> {
    let cfg = ConvParams {
        stride: 2,
        padding: 1,
        groups: 1,
    };
    let x = Var::from_tensor(&pseudo_random(&[2, 3, 7, 6], 21)?)?;
    let w = Var::from_tensor(&pseudo_random(&[4, 3, 3, 3], 22)?)?;
    let probe = pseudo_random(&[2, 4, 4, 3], 23)?;
    let forward = || (kernels::conv2d(x.as_tensor(), w.as_tensor(), cfg)? * &probe)?.sum_all();
    let grads = forward()?.backward()?;
    let loss = || forward()?.to_scalar::<f32>();
    for (name, v) in [("x", &x), ("w", &w)] {
        let g = grads.get(v).expect("gradient").clone();
        finite_difference_check(name, v, &g, &loss)?;
    }
    Ok(())
}

#[test]
fn finite_differences_agree_on_tiny_cases() -> Result<()> {
    let cfg = ConvParams {
        stride: 2,
        padding: 1,
        groups: 2,
    };
    let x = Var::from_tensor(&pseudo_random(&[2, 4, 5, 5], 11)?)?;
    let w = Var::from_tensor(&pseudo_random(&[4, 2, 3, 3], 12)?)?;
    let bn_w = Var::from_tensor(&(pseudo_random(&[4], 13)? + 1.0)?)?;
    let bn_b = Var::from_tensor(&pseudo_random(&[4], 14)?)?;
    let probe = pseudo_random(&[2, 4, 3, 3], 15)?;
    // conv -> BN, so both ops' backward passes are in the chain (no ReLU: its kink would
    // make central differences unreliable; the fused ReLU is checked against generic ops).
    let forward = || -> Result<Tensor> {
        let y = kernels::conv2d(x.as_tensor(), w.as_tensor(), cfg)?;
        let (y, _, _) = kernels::batch_norm_train(&y, bn_w.as_tensor(), bn_b.as_tensor(), 1e-5)?;
        (y * &probe)?.sum_all()
    };
    let grads = forward()?.backward()?;
    let loss = || forward()?.to_scalar::<f32>();
    for (name, v) in [
        ("x", &x),
        ("w", &w),
        ("bn weight", &bn_w),
        ("bn bias", &bn_b),
    ] {
        let g = grads.get(v).expect("gradient").clone();
        finite_difference_check(name, v, &g, &loss)?;
    }
    Ok(())
}

/// The fused residual add+ReLU is bit-identical to candle's `(a + b)?.relu()`, forward and
/// both gradients, including inputs whose sum is exactly 0 (candle passes the gradient there).
#[test]
fn add_relu_is_bit_identical_to_candle_ops() -> Result<()> {
    let dims = [3, 5, 6, 7];
    let a0 = pseudo_random(&dims, 31)?;
    // Every third value of b cancels a exactly; exact zeros on both sides too.
    let b0 = {
        let a = a0.flatten_all()?.to_vec1::<f32>()?;
        let r = pseudo_random(&dims, 32)?.flatten_all()?.to_vec1::<f32>()?;
        let v: Vec<f32> = (0..a.len())
            .map(|i| match i % 5 {
                0 | 3 => -a[i],
                1 => 0.0,
                _ => r[i],
            })
            .collect();
        Tensor::from_vec(v, &dims, &Device::Cpu)?
    };
    let probe = pseudo_random(&dims, 33)?;
    let (a, b) = (Var::from_tensor(&a0)?, Var::from_tensor(&b0)?);
    let fused = kernels::add_relu(a.as_tensor(), b.as_tensor())?;
    let stock = (a.as_tensor() + b.as_tensor())?.relu()?;
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    assert_eq!(bits(&fused)?, bits(&stock)?, "forward");
    let gf = (&fused * &probe)?.sum_all()?.backward()?;
    let gs = (&stock * &probe)?.sum_all()?.backward()?;
    for (name, v) in [("a", &a), ("b", &b)] {
        let (f, s) = (
            gf.get(v).expect("fused grad"),
            gs.get(v).expect("stock grad"),
        );
        assert_eq!(bits(f)?, bits(s)?, "gradient of {name}");
    }
    // Only one input tracked: the other gets no gradient, the tracked one the same.
    let y = kernels::add_relu(a.as_tensor(), &b0)?;
    let g = (y * &probe)?.sum_all()?.backward()?;
    assert_eq!(bits(g.get(&a).expect("grad"))?, bits(gf.get(&a).unwrap())?);
    Ok(())
}

/// Finite differences through conv -> add_relu away from the kink.
#[test]
fn finite_differences_agree_on_add_relu() -> Result<()> {
    let a = Var::from_tensor(&pseudo_random(&[2, 3, 4, 4], 41)?)?;
    let b = Var::from_tensor(&pseudo_random(&[2, 3, 4, 4], 42)?)?;
    let probe = pseudo_random(&[2, 3, 4, 4], 43)?;
    // Shift sums away from 0 by more than the difference step, so no value crosses the kink.
    let sum = (a.as_tensor() + b.as_tensor())?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let shift: Vec<f32> = sum
        .iter()
        .map(|&s| {
            if s.abs() < 0.05 {
                0.1f32.copysign(s)
            } else {
                0.0
            }
        })
        .collect();
    let shift = Tensor::from_vec(shift, a.dims(), &Device::Cpu)?;
    let forward = || -> Result<Tensor> {
        let y = kernels::add_relu(&(a.as_tensor() + &shift)?, b.as_tensor())?;
        (y * &probe)?.sum_all()
    };
    let grads = forward()?.backward()?;
    let loss = || forward()?.to_scalar::<f32>();
    for (name, v) in [("a", &a), ("b", &b)] {
        let g = grads.get(v).expect("gradient").clone();
        finite_difference_check(name, v, &g, &loss)?;
    }
    Ok(())
}

/// The running-statistics update inside the fused BN op is bit-identical to the generic-op
/// formulation (`reference::update_running_stats`), mean and unbiased variance.
#[test]
fn fused_running_update_is_bit_identical_to_generic_ops() -> Result<()> {
    let x = pseudo_random(&[4, 6, 5, 5], 51)?;
    let w = (pseudo_random(&[6], 52)? + 1.0)?;
    let b = pseudo_random(&[6], 53)?;
    let start_mean = pseudo_random(&[6], 54)?;
    let start_var = (pseudo_random(&[6], 55)? + 2.0)?;
    let (fm, fv) = (start_mean.copy()?, start_var.copy()?);
    let (gm, gv) = (start_mean.copy()?, start_var.copy()?);
    for relu in [false, true] {
        let running = kernels::RunningStats {
            mean: &fm,
            var: &fv,
            momentum: 0.1,
        };
        let y = kernels::batch_norm_train_update(&x, &w, &b, 1e-5, relu, running)?;
        let (y_ref, mean, var) = if relu {
            kernels::batch_norm_relu_train(&x, &w, &b, 1e-5)?
        } else {
            kernels::batch_norm_train(&x, &w, &b, 1e-5)?
        };
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            y_ref.flatten_all()?.to_vec1::<f32>()?
        );
        let running = kernels::RunningStats {
            mean: &gm,
            var: &gv,
            momentum: 0.1,
        };
        reference::update_running_stats(running, &mean, &var, 4 * 5 * 5)?;
        assert_eq!(fm.to_vec1::<f32>()?, gm.to_vec1::<f32>()?, "running mean");
        assert_eq!(fv.to_vec1::<f32>()?, gv.to_vec1::<f32>()?, "running var");
    }
    assert_ne!(fm.to_vec1::<f32>()?, start_mean.to_vec1::<f32>()?);
    Ok(())
}

#[test]
fn soft_cross_entropy_matches_generic_ops() -> Result<()> {
    // Rows: a two-label mixture, a one-hot row, a row with mass 0.6 (not a distribution), and
    // large logits (the log-sum-exp must not overflow).
    let t = Tensor::new(
        &[
            [0.25f32, 0.0, 0.75, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.1, 0.2, 0.3, 0.0],
            [0.5, 0.5, 0.0, 0.0],
        ],
        &Device::Cpu,
    )?;
    let z0 = (pseudo_random(&[4, 4], 77)? * 3.0)?;
    let big = Tensor::new(&[[0f32, 0.0, 0.0, 0.0]; 3], &Device::Cpu)?;
    let big = Tensor::cat(
        &[
            &big,
            &Tensor::new(&[[80f32, 79.0, -50.0, 0.0]], &Device::Cpu)?,
        ],
        0,
    )?;
    let z = Var::from_tensor(&(z0 + big)?)?;
    let loss = kernels::soft_cross_entropy(z.as_tensor(), &t)?;
    let loss_ref = reference::soft_cross_entropy(z.as_tensor(), &t)?;
    assert_eq!(loss.dims(), loss_ref.dims());
    assert_close("soft CE value", &loss, &loss_ref, 1e-6)?;
    // An upstream factor other than 1 reaches the gradient.
    let g = (&loss * 3.0)?.backward()?;
    let g_ref = (&loss_ref * 3.0)?.backward()?;
    let (a, e) = (
        g.get(z.as_tensor()).unwrap(),
        g_ref.get(z.as_tensor()).unwrap(),
    );
    assert_close("soft CE grad", a, e, 1e-6)?;
    Ok(())
}

#[test]
fn soft_cross_entropy_skips_zero_targets_and_rejects_bad_shapes() -> Result<()> {
    // −∞ logit on a class of target 0: the generic ops give 0·∞ = NaN, the fused op skips it.
    let z = Tensor::new(&[[0f32, f32::NEG_INFINITY], [1.0, 2.0]], &Device::Cpu)?;
    let t = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
    let loss = kernels::soft_cross_entropy(&z, &t)?.to_scalar::<f32>()?;
    let expected = 0.5 * (0.0 + (1.0 + 1f64.exp().recip()).ln()) as f32;
    assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    let err = kernels::soft_cross_entropy(&z, &t.narrow(0, 0, 1)?).unwrap_err();
    assert!(format!("{err}").contains("targets"), "{err}");
    Ok(())
}

#[test]
fn batch_norm_eval_fused_matches_generic_ops_and_skips_unneeded_gradients() -> Result<()> {
    for (i, dims) in [vec![3usize, 4, 5, 7], vec![2, 3, 4, 4]]
        .into_iter()
        .enumerate()
    {
        let c = dims[1];
        let seed = 2000 + 10 * i as u64;
        let x = Var::from_tensor(&pseudo_random(&dims, seed)?.affine(2.0, 0.5)?)?;
        let w = Var::from_tensor(&(pseudo_random(&[c], seed + 1)? + 1.5)?)?;
        let b = Var::from_tensor(&pseudo_random(&[c], seed + 2)?)?;
        let rm = pseudo_random(&[c], seed + 3)?;
        let rv = (pseudo_random(&[c], seed + 4)?.abs()? + 0.5)?;
        // Running statistics that track gradients take the generic ops: the reference.
        let (rm_var, rv_var) = (Var::from_tensor(&rm)?, Var::from_tensor(&rv)?);
        let probe = pseudo_random(&dims, seed + 5)?;
        for relu in [false, true] {
            let eval = if relu {
                kernels::batch_norm_relu_eval
            } else {
                kernels::batch_norm_eval
            };
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let y = eval(xt, &rm, &rv, wt, bt, 1e-5)?;
            let y_ref = eval(xt, rm_var.as_tensor(), rv_var.as_tensor(), wt, bt, 1e-5)?;
            let what = format!("bn eval {dims:?} relu={relu}");
            assert_close(&format!("{what} y"), &y, &y_ref, 1e-6)?;
            let g = (&y * &probe)?.sum_all()?.backward()?;
            let g_ref = (&y_ref * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("grad x", &x), ("grad w", &w), ("grad b", &b)] {
                let (a, e) = (g.get(v).expect("fused"), g_ref.get(v).expect("generic"));
                assert_close(&format!("{what} {name}"), a, e, 1e-5)?;
            }
            // Detached weight and bias (PuzzleMix's saliency pass): only the input's gradient.
            let y = eval(xt, &rm, &rv, &wt.detach(), &bt.detach(), 1e-5)?;
            let g_x = (&y * &probe)?.sum_all()?.backward()?;
            assert_close(
                &format!("{what} grad x alone"),
                g_x.get(xt).expect("input gradient"),
                g_ref.get(xt).expect("generic"),
                1e-5,
            )?;
            // The same input gradient outside the autograd (the taped saliency pass), from
            // the CPU op and from its generic-op twin.
            let stats = Tensor::cat(&[&rm, &rv], 0)?;
            let taped =
                kernels::batch_norm_eval_backward_input(xt, &stats, wt, bt, &probe, 1e-5, relu)?;
            let twin = kernels::batch_norm_eval_backward_input_generic(
                xt, &stats, wt, bt, &probe, 1e-5, relu,
            )?;
            for (name, t) in [("taped", &taped), ("generic twin", &twin)] {
                assert_eq!(t.dims(), xt.dims(), "{what} {name}");
                assert_close(
                    &format!("{what} grad x {name}"),
                    t,
                    g_ref.get(xt).expect("generic"),
                    1e-5,
                )?;
            }
            // Bit for bit what candle's autograd gets from the same op.
            let flat = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
            assert_eq!(
                flat(&taped)?,
                flat(g_x.get(xt).expect("input gradient"))?,
                "{what}"
            );
        }
    }
    Ok(())
}

#[test]
fn batch_norm_eval_backward_input_rejects_mismatched_shapes() -> Result<()> {
    let x = pseudo_random(&[2, 3, 4, 4], 1)?;
    let (w, b) = (pseudo_random(&[3], 2)?, pseudo_random(&[3], 3)?);
    let stats = (pseudo_random(&[6], 4)?.abs()? + 0.5)?;
    let bad_grad = pseudo_random(&[2, 3, 4, 5], 5)?;
    let err = kernels::batch_norm_eval_backward_input(&x, &stats, &w, &b, &bad_grad, 1e-5, true)
        .unwrap_err();
    assert!(format!("{err}").contains("grad_y"), "{err}");
    let err = kernels::batch_norm_eval_backward_input(&x, &w, &w, &b, &x, 1e-5, true).unwrap_err();
    assert!(format!("{err}").contains("stats"), "{err}");
    Ok(())
}

/// The error of `result`, whose message (its first line: candle appends a backtrace when
/// `RUST_BACKTRACE` is set) must contain every one of `parts`.
fn expect_error<T: std::fmt::Debug>(what: &str, result: Result<T>, parts: &[&str]) {
    let err = result.expect_err(what).to_string();
    let message = err.lines().next().unwrap_or_default();
    for part in parts {
        assert!(message.contains(part), "{what}: {message:?} lacks {part:?}");
    }
}

/// The backward functions check every argument's shape before their kernels run (on CUDA the
/// kernels read by the input's geometry, so a wrong shape would read out of bounds): the error
/// names the argument and both shapes.
#[test]
fn backward_functions_reject_mismatched_shapes() -> Result<()> {
    let cfg = ConvParams {
        stride: 2,
        padding: 1,
        groups: 1,
    };
    let x = pseudo_random(&[2, 4, 6, 6], 1)?;
    let w = pseudo_random(&[8, 4, 3, 3], 2)?;
    // The output is [2, 8, 3, 3]; a larger grad_out would be read in part, a smaller one past
    // its end.
    for bad in [[2, 8, 3, 4], [2, 8, 2, 3], [1, 8, 3, 3]] {
        let g = pseudo_random(&bad, 3)?;
        let got = format!("got {bad:?}");
        expect_error(
            "conv2d_backward",
            kernels::conv2d_backward(&x, &w, &g, cfg, true, true),
            &[
                "kernels::conv2d_backward: grad_out must be [2, 8, 3, 3]",
                "x [2, 4, 6, 6]",
                &got,
            ],
        );
    }

    let x = pseudo_random(&[4, 3, 5, 5], 4)?;
    let (w, b) = (pseudo_random(&[3], 5)?, pseudo_random(&[3], 6)?);
    let stats = (pseudo_random(&[6], 7)?.abs()? + 0.5)?;
    let gy = pseudo_random(&[4, 3, 5, 5], 8)?;
    let (short3, long7) = (pseudo_random(&[2], 9)?, pseudo_random(&[7], 10)?);
    let bn = |w: &Tensor, b: &Tensor, stats: &Tensor, gy: &Tensor| {
        kernels::batch_norm_train_backward(&x, w, b, stats, gy, 1e-5, true)
    };
    let gy_bad = pseudo_random(&[4, 3, 5, 4], 11)?;
    expect_error(
        "bn grad_y",
        bn(&w, &b, &stats, &gy_bad),
        &[
            "kernels::batch_norm_train_backward: grad_y [4, 3, 5, 4]",
            "x [4, 3, 5, 5]",
        ],
    );
    expect_error(
        "bn stats",
        bn(&w, &b, &long7, &gy),
        &["stats must have shape [6], got [7]"],
    );
    expect_error(
        "bn weight",
        bn(&short3, &b, &stats, &gy),
        &["weight must have shape [3], got [2]"],
    );
    expect_error(
        "bn bias",
        bn(&w, &short3, &stats, &gy),
        &["bias must have shape [3], got [2]"],
    );
    // The right shapes pass (the checks reject only what is wrong).
    bn(&w, &b, &stats, &gy)?;

    let a = pseudo_random(&[2, 3, 4, 4], 12)?;
    let (b_bad, dy_bad) = (pseudo_random(&[2, 3, 4, 5], 13)?, pseudo_random(&[96], 14)?);
    expect_error(
        "add_relu_backward b",
        kernels::add_relu_backward(&a, &b_bad, &a),
        &[
            "kernels::add_relu_backward: b [2, 3, 4, 5]",
            "a [2, 3, 4, 4]",
        ],
    );
    // Same element count, other shape: refused too.
    expect_error(
        "add_relu_backward grad",
        kernels::add_relu_backward(&a, &a, &dy_bad),
        &["kernels::add_relu_backward: grad [96]", "a [2, 3, 4, 4]"],
    );
    kernels::add_relu_backward(&a, &a, &a)?;
    Ok(())
}

/// An input with no value per channel (empty batch or planes, or no channels) is refused by
/// every BatchNorm function, evaluation mode included, instead of launching kernels over nothing.
#[test]
fn batch_norm_rejects_empty_inputs() -> Result<()> {
    let (w, b) = (pseudo_random(&[3], 1)?, pseudo_random(&[3], 2)?);
    let (mean, var) = (
        pseudo_random(&[3], 3)?,
        (pseudo_random(&[3], 4)?.abs()? + 0.5)?,
    );
    let stats = Tensor::cat(&[&mean, &var], 0)?;
    for dims in [[0, 3, 4, 4], [2, 3, 0, 4]] {
        let x = Tensor::zeros(&dims, DType::F32, &Device::Cpu)?;
        let msg = format!("input {dims:?} is empty");
        let parts = [
            "kernels::batch_norm:",
            msg.as_str(),
            "at least one value per channel",
        ];
        expect_error(
            "eval",
            kernels::batch_norm_eval(&x, &mean, &var, &w, &b, 1e-5),
            &parts,
        );
        expect_error(
            "eval relu",
            kernels::batch_norm_relu_eval(&x, &mean, &var, &w, &b, 1e-5),
            &parts,
        );
        expect_error(
            "eval packed",
            kernels::batch_norm_eval_packed(&x, &stats, &w, &b, 1e-5, true),
            &parts,
        );
        expect_error("train", kernels::batch_norm_train(&x, &w, &b, 1e-5), &parts);
    }
    let no_channels = Tensor::zeros((2, 0, 4, 4), DType::F32, &Device::Cpu)?;
    let empty = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
    expect_error(
        "no channels",
        kernels::batch_norm_eval(&no_channels, &empty, &empty, &empty, &empty, 1e-5),
        &["input [2, 0, 4, 4] is empty", "C = 0"],
    );
    Ok(())
}
