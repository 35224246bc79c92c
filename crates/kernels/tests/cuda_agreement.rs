//! CPU ↔ CUDA agreement of every custom op. Needs a CUDA device and a build with
//! `--features cudnn` (convolutions) or `cuda` (the rest); otherwise each test prints
//! `SKIPPED (no CUDA device)` and passes, unless `MIXBENCH_REQUIRE_GPU=1`, which turns a skip
//! into a failure.
//!
//! Tolerances (max |cuda − cpu| / max |cpu| per tensor):
//! * convolutions: f32 1e-4, tf32 5e-3, bf16 3e-2 (bf16 has an 8-bit mantissa; its products
//!   are exact in f32 but inputs are rounded to ~4e-3 relative);
//! * BatchNorm(+ReLU) train forward/backward and eval forward/backward: 1e-4 (f32 only; statistics are summed in
//!   a different order);
//! * SGD update: 0 — bit-identical, by construction (same roundings, no FMA contraction);
//! * soft-target cross-entropy value and logits gradient: 1e-6 (both sides in f64, the same
//!   order within a row; the forward's sum over rows is a tree on CUDA, sequential on CPU).

/// Prints a skip notice on the process's stderr, which the test harness's output
/// capture does not swallow (a `println!` would only show with `--nocapture`).
macro_rules! skipped {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use candle_core::{Device, Result};

/// The CUDA device to test on, or `None` after printing why the test is skipped.
fn cuda_device(test: &str) -> Option<Device> {
    let require = std::env::var("MIXBENCH_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let why = if !cfg!(feature = "cuda") {
        Some("built without --features cuda".to_string())
    } else if !candle_core::utils::cuda_is_available() {
        Some("candle built without CUDA".to_string())
    } else {
        match Device::new_cuda(0) {
            Ok(d) => return Some(d),
            Err(e) => Some(format!("{e}")),
        }
    };
    let why = why.unwrap_or_default();
    if require {
        panic!("{test}: MIXBENCH_REQUIRE_GPU=1 but no CUDA device: {why}");
    }
    skipped!("{test}: SKIPPED (no CUDA device): {why}");
    None
}

#[test]
fn conv2d_agrees_with_cpu_in_every_precision() -> Result<()> {
    let Some(dev) = cuda_device("conv2d_agrees_with_cpu_in_every_precision") else {
        return Ok(());
    };
    #[cfg(feature = "cudnn")]
    return gpu::conv2d(&dev);
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = dev;
        if std::env::var("MIXBENCH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("MIXBENCH_REQUIRE_GPU=1 but built without --features cudnn");
        }
        skipped!("conv2d_agrees_with_cpu_in_every_precision: SKIPPED (built without cudnn)");
        Ok(())
    }
}

#[test]
fn batch_norm_relu_agrees_with_cpu() -> Result<()> {
    let Some(dev) = cuda_device("batch_norm_relu_agrees_with_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    return gpu::batch_norm(&dev);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(())
    }
}

#[test]
fn sgd_update_is_bit_identical_to_cpu() -> Result<()> {
    let Some(dev) = cuda_device("sgd_update_is_bit_identical_to_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    return gpu::sgd(&dev);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(())
    }
}

#[test]
fn add_relu_running_stats_and_multi_sgd_agree_with_cpu() -> Result<()> {
    let Some(dev) = cuda_device("add_relu_running_stats_and_multi_sgd_agree_with_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    return gpu::fused_extras(&dev);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(())
    }
}

#[test]
fn soft_cross_entropy_agrees_with_cpu() -> Result<()> {
    let Some(dev) = cuda_device("soft_cross_entropy_agrees_with_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    return gpu::soft_cross_entropy(&dev);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use std::sync::Mutex;

    /// Precision is process-wide: tests that set it run one at a time.
    static SETTINGS: Mutex<()> = Mutex::new(());

    fn pseudo_random(dims: &[usize], seed: u64) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
    }

    fn rel_err(cuda: &Tensor, cpu: &Tensor) -> Result<f32> {
        let a = cuda
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?;
        let b = cpu.flatten_all()?;
        let diff = (a - &b)?.abs()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.max(0)?.to_scalar::<f32>()?.max(1e-12);
        Ok(diff / scale)
    }

    fn check(what: &str, cuda: &Tensor, cpu: &Tensor, tol: f32) -> Result<()> {
        let e = rel_err(cuda, cpu)?;
        println!("{what}: relative error {e:.3e} (tolerance {tol:.0e})");
        assert!(e <= tol, "{what}: relative error {e} > {tol}");
        Ok(())
    }

    /// Output, input gradient and weight gradient of `sum(conv(x, w) * r)` on `dev`.
    fn conv_run(
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        cfg: kernels::ConvParams,
        dev: &Device,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let xv = Var::from_tensor(&x.to_device(dev)?)?;
        let wv = Var::from_tensor(&w.to_device(dev)?)?;
        let y = kernels::conv2d(xv.as_tensor(), wv.as_tensor(), cfg)?;
        let loss = (&y * r.to_device(dev)?)?.sum_all()?;
        let g = loss.backward()?;
        let dx = g.get(xv.as_tensor()).expect("dx").clone();
        let dw = g.get(wv.as_tensor()).expect("dw").clone();
        Ok((y, dx, dw))
    }

    #[cfg(feature = "cudnn")]
    pub fn conv2d(dev: &Device) -> Result<()> {
        use kernels::{ConvParams, Precision};
        let _guard = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
        // (batch, c_in, h, c_out, k, stride, padding, groups)
        let cases = [
            (4, 16, 12, 32, 3, 1, 1, 1),
            (4, 16, 12, 32, 3, 2, 1, 1),
            (4, 32, 9, 16, 1, 1, 0, 1),
            (4, 32, 10, 64, 1, 2, 0, 1),
            (2, 128, 8, 128, 3, 1, 1, 32),
            (2, 128, 8, 128, 3, 2, 1, 32),
            (2, 3, 32, 16, 3, 1, 1, 1),
        ];
        for (i, &(n, ci, h, co, k, stride, padding, groups)) in cases.iter().enumerate() {
            let cfg = ConvParams {
                stride,
                padding,
                groups,
            };
            let x = pseudo_random(&[n, ci, h, h + 1], 10 + i as u64)?;
            let w = (pseudo_random(&[co, ci / groups, k, k], 20 + i as u64)? * 0.2)?;
            let ho = (h + 2 * padding - k) / stride + 1;
            let wo = (h + 1 + 2 * padding - k) / stride + 1;
            let r = pseudo_random(&[n, co, ho, wo], 30 + i as u64)?;
            let (y0, dx0, dw0) = conv_run(&x, &w, &r, cfg, &Device::Cpu)?;
            for (p, tol) in [
                (Precision::F32, 1e-4),
                (Precision::Tf32, 5e-3),
                (Precision::Bf16, 3e-2),
            ] {
                for det in [false, true] {
                    kernels::set_precision(p);
                    kernels::set_deterministic(det);
                    let (y, dx, dw) = conv_run(&x, &w, &r, cfg, dev)?;
                    assert_eq!(
                        y.dtype(),
                        DType::F32,
                        "conv2d returns f32 in every precision"
                    );
                    let what = format!("conv {:?} {p} det={det}", cases[i]);
                    check(&format!("{what} y"), &y, &y0, tol)?;
                    check(&format!("{what} dx"), &dx, &dx0, tol)?;
                    check(&format!("{what} dw"), &dw, &dw0, tol)?;
                }
            }
        }
        // Deterministic algorithms give bit-identical results twice in a row.
        kernels::set_precision(Precision::F32);
        kernels::set_deterministic(true);
        let (n, ci, h, co) = (8, 64, 16, 64);
        let cfg = ConvParams {
            stride: 1,
            padding: 1,
            groups: 1,
        };
        let x = pseudo_random(&[n, ci, h, h], 1)?;
        let w = pseudo_random(&[co, ci, 3, 3], 2)?;
        let r = pseudo_random(&[n, co, h, h], 3)?;
        let a = conv_run(&x, &w, &r, cfg, dev)?;
        let b = conv_run(&x, &w, &r, cfg, dev)?;
        for (u, v) in [(&a.1, &b.1), (&a.2, &b.2)] {
            let u: Vec<f32> = u.flatten_all()?.to_vec1()?;
            let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
            assert!(
                u == v,
                "deterministic cuDNN algorithms must repeat bit for bit"
            );
        }
        // The image needs no gradient: a constant input gets none, the weight does.
        let xc = x.to_device(dev)?;
        let wv = Var::from_tensor(&w.to_device(dev)?)?;
        let g = kernels::conv2d(&xc, wv.as_tensor(), cfg)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&xc).is_none() && g.get(wv.as_tensor()).is_some());
        kernels::set_deterministic(false);
        Ok(())
    }

    pub fn batch_norm(dev: &Device) -> Result<()> {
        let eps = 1e-5;
        for dims in [[8usize, 16, 10, 10], [100, 64, 4, 4], [3, 5, 7, 1]] {
            let c = dims[1];
            let x = (pseudo_random(&dims, 1)? * 3.0)?.affine(1.0, 0.5)?;
            let w = pseudo_random(&[c], 2)?.affine(0.5, 1.0)?;
            let b = pseudo_random(&[c], 3)?;
            let r = pseudo_random(&dims, 4)?;
            for relu in [false, true] {
                let run = |d: &Device| -> Result<Vec<Tensor>> {
                    let xv = Var::from_tensor(&x.to_device(d)?)?;
                    let wv = Var::from_tensor(&w.to_device(d)?)?;
                    let bv = Var::from_tensor(&b.to_device(d)?)?;
                    let f = if relu {
                        kernels::batch_norm_relu_train
                    } else {
                        kernels::batch_norm_train
                    };
                    let (y, mean, var) = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), eps)?;
                    let g = (&y * r.to_device(d)?)?.sum_all()?.backward()?;
                    let get = |v: &Var| g.get(v.as_tensor()).expect("grad").clone();
                    // Eval mode (CUDA: fused forward, generic-op backward; CPU: fused both).
                    let eval = if relu {
                        kernels::batch_norm_relu_eval
                    } else {
                        kernels::batch_norm_eval
                    };
                    let (mean, var) = (mean.detach(), var.detach());
                    let (xt, wt, bt) = (xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
                    let ev = eval(xt, &mean, &var, wt, bt, eps)?;
                    let ge = (&ev * r.to_device(d)?)?.sum_all()?.backward()?;
                    let get_e = |v: &Var| ge.get(v.as_tensor()).expect("eval grad").clone();
                    // The input-only eval backward of the taped saliency pass.
                    let stats = Tensor::cat(&[&mean, &var], 0)?;
                    let taped_dx = kernels::batch_norm_eval_backward_input(
                        xt,
                        &stats,
                        wt,
                        bt,
                        &r.to_device(d)?,
                        eps,
                        relu,
                    )?;
                    Ok(vec![
                        y,
                        mean,
                        var,
                        get(&xv),
                        get(&wv),
                        get(&bv),
                        ev,
                        get_e(&xv),
                        get_e(&wv),
                        get_e(&bv),
                        taped_dx,
                    ])
                };
                let (gpu, cpu) = (run(dev)?, run(&Device::Cpu)?);
                let names = [
                    "y",
                    "mean",
                    "var",
                    "dx",
                    "dweight",
                    "dbias",
                    "eval y",
                    "eval dx",
                    "eval dweight",
                    "eval dbias",
                    "eval dx (input-only backward)",
                ];
                for ((name, g), c) in names.iter().zip(&gpu).zip(&cpu) {
                    check(&format!("bn {dims:?} relu={relu} {name}"), g, c, 1e-4)?;
                }
            }
        }
        Ok(())
    }

    pub fn sgd(dev: &Device) -> Result<()> {
        let n = 10_007;
        for (wd, mu, nesterov) in [
            (1e-4, 0.9, false),
            (5e-4, 0.9, true),
            (0.0, 0.9, false),
            (1e-4, 0.0, false),
        ] {
            let run = |d: &Device| -> Result<(Vec<f32>, Option<Vec<f32>>)> {
                let theta = pseudo_random(&[n], 1)?.to_device(d)?;
                let buf = if mu != 0.0 {
                    Some(Tensor::zeros(n, DType::F32, d)?)
                } else {
                    None
                };
                for k in 0..4u64 {
                    let grad = pseudo_random(&[n], 10 + k)?.to_device(d)?;
                    let step = kernels::SgdStep {
                        lr: 0.1 / (k + 1) as f64,
                        weight_decay: wd,
                        momentum: mu,
                        nesterov,
                        first: k == 0,
                    };
                    kernels::sgd_update(&theta, &grad, buf.as_ref(), &step)?;
                }
                let b = match &buf {
                    Some(b) => Some(b.to_device(&Device::Cpu)?.to_vec1()?),
                    None => None,
                };
                Ok((theta.to_device(&Device::Cpu)?.to_vec1()?, b))
            };
            let (g, c) = (run(dev)?, run(&Device::Cpu)?);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&g.0),
                bits(&c.0),
                "θ, wd {wd} μ {mu} nesterov {nesterov}"
            );
            if let (Some(a), Some(b)) = (&g.1, &c.1) {
                assert_eq!(bits(a), bits(b), "momentum buffer");
            }
            println!("sgd wd {wd} μ {mu} nesterov {nesterov}: bit-identical");
        }
        Ok(())
    }

    /// add_relu forward and gradients (bit-identical: one f32 add, a max and a 0/1 multiply),
    /// the running statistics written by the stats kernel (1e-4, as the batch statistics), and
    /// the multi-tensor SGD launch (bit-identical to the CPU's per-parameter update).
    pub fn fused_extras(dev: &Device) -> Result<()> {
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            let v: Vec<f32> = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            Ok(v.iter().map(|x| x.to_bits()).collect())
        };
        // add_relu, with exact cancellations so that a + b == 0 occurs.
        let dims = [4, 8, 9, 9];
        let a = pseudo_random(&dims, 1)?;
        let b = ((pseudo_random(&dims, 2)? * 0.5)? + a.neg()?.affine(0.5, 0.0)?)?;
        let b = Tensor::cat(&[&a.neg()?.narrow(0, 0, 1)?, &b.narrow(0, 1, 3)?], 0)?;
        let r = pseudo_random(&dims, 3)?;
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let av = Var::from_tensor(&a.to_device(d)?)?;
            let bv = Var::from_tensor(&b.to_device(d)?)?;
            let y = kernels::add_relu(av.as_tensor(), bv.as_tensor())?;
            let g = (&y * r.to_device(d)?)?.sum_all()?.backward()?;
            let ga = g.get(av.as_tensor()).expect("grad a").clone();
            let gb = g.get(bv.as_tensor()).expect("grad b").clone();
            Ok(vec![y, ga, gb])
        };
        let (gpu, cpu) = (run(dev)?, run(&Device::Cpu)?);
        for (name, (g, c)) in ["y", "da", "db"].iter().zip(gpu.iter().zip(&cpu)) {
            assert_eq!(bits(g)?, bits(c)?, "add_relu {name}");
        }
        // Running statistics updated inside the stats op.
        let x = (pseudo_random(&[16, 12, 6, 6], 4)? * 2.0)?.affine(1.0, 0.3)?;
        let w = pseudo_random(&[12], 5)?.affine(0.5, 1.0)?;
        let bias = pseudo_random(&[12], 6)?;
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let rm = pseudo_random(&[12], 7)?.to_device(d)?;
            let rv = pseudo_random(&[12], 8)?.affine(0.5, 1.0)?.to_device(d)?;
            let (xd, wd, bd) = (x.to_device(d)?, w.to_device(d)?, bias.to_device(d)?);
            for relu in [false, true] {
                let running = kernels::RunningStats {
                    mean: &rm,
                    var: &rv,
                    momentum: 0.1,
                };
                kernels::batch_norm_train_update(&xd, &wd, &bd, 1e-5, relu, running)?;
            }
            Ok(vec![rm, rv])
        };
        let (gpu, cpu) = (run(dev)?, run(&Device::Cpu)?);
        check("running mean", &gpu[0], &cpu[0], 1e-4)?;
        check("running var", &gpu[1], &cpu[1], 1e-4)?;
        // Multi-tensor SGD over 100 tensors of mixed sizes (two launches), 3 steps.
        let sizes: Vec<usize> = (0..100).map(|i| 1 + (i * 997) % 5000).collect();
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let thetas: Vec<Tensor> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| pseudo_random(&[n], 100 + i as u64)?.to_device(d))
                .collect::<Result<_>>()?;
            let bufs: Vec<Tensor> = thetas
                .iter()
                .map(|t| t.zeros_like())
                .collect::<Result<_>>()?;
            for k in 0..3u64 {
                let grads: Vec<Tensor> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| pseudo_random(&[n], 1000 * k + i as u64)?.to_device(d))
                    .collect::<Result<_>>()?;
                let params: Vec<kernels::SgdParam> = (0..sizes.len())
                    .map(|i| kernels::SgdParam {
                        theta: &thetas[i],
                        grad: &grads[i],
                        buf: Some(&bufs[i]),
                        step: kernels::SgdStep {
                            lr: 0.1,
                            weight_decay: 1e-4,
                            momentum: 0.9,
                            nesterov: false,
                            first: k == 0,
                        },
                    })
                    .collect();
                kernels::sgd_update_multi(&params)?;
            }
            Ok(thetas.into_iter().chain(bufs).collect())
        };
        let (gpu, cpu) = (run(dev)?, run(&Device::Cpu)?);
        for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            assert_eq!(bits(g)?, bits(c)?, "multi-tensor sgd, tensor {i}");
        }
        println!("add_relu, running statistics and multi-tensor sgd agree");
        Ok(())
    }

    /// Value and logits gradient of the fused soft cross-entropy on 300 rows (more than the
    /// forward block's 256 threads) of 10 classes, with mixed two-label targets.
    pub fn soft_cross_entropy(dev: &Device) -> Result<()> {
        let (n, c) = (300, 10);
        let z = (pseudo_random(&[n, c], 21)? * 4.0)?;
        let labels = |seed: u64| -> Result<Tensor> {
            let v: Vec<u32> = (0..n as u64)
                .map(|i| ((i * 7 + seed) % c as u64) as u32)
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu)
        };
        let one_hot = |y: &Tensor| -> Result<Tensor> {
            let classes = Tensor::arange(0u32, c as u32, &Device::Cpu)?.unsqueeze(0)?;
            y.unsqueeze(1)?.broadcast_eq(&classes)?.to_dtype(DType::F32)
        };
        let t = ((one_hot(&labels(3)?)? * 0.3)? + (one_hot(&labels(5)?)? * 0.7)?)?;
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let zv = Var::from_tensor(&z.to_device(d)?)?;
            let loss = kernels::soft_cross_entropy(zv.as_tensor(), &t.to_device(d)?)?;
            let g = (&loss * 2.0)?.backward()?;
            Ok(vec![loss, g.get(zv.as_tensor()).expect("grad z").clone()])
        };
        let (gpu, cpu) = (run(dev)?, run(&Device::Cpu)?);
        check("soft CE value", &gpu[0], &cpu[0], 1e-6)?;
        check("soft CE grad", &gpu[1], &cpu[1], 1e-6)
    }
}
