//! A 20-step ResNet-18 MixUp training trajectory on real CIFAR-10 images, CPU vs CUDA.
//!
//! Same init (built on the CPU, copied), same 20 batches of 32 images from `data_batch_1.bin`
//! under `$CIFAR10_DIR`, MixUp with a fixed λ = 0.7 against the reversed batch, SGD lr 0.1,
//! momentum 0.9, weight decay 1e-4 through `kernels::sgd_update` (the update `train::Sgd`
//! runs), CUDA in strict f32 with deterministic cuDNN algorithms.
//!
//! CUDA runs the taped training forward (`CifarResNet::forward_train`, what the runner trains
//! with) and candle's autograd; the CPU reference runs candle's autograd. Tolerances: CUDA
//! taped vs CUDA autograd within 1e-5 relative at every step; step-0 loss within 1e-4 relative (only summation order differs); every later
//! loss within 0.05 + 5 % of the CPU one (the trajectories separate slowly through rounding);
//! the loss after 20 steps below the first one on both devices.
//!
//! Without a CUDA device (or a build without `--features cuda`) it prints
//! `SKIPPED (no CUDA device)`; without the data, `SKIPPED (no CIFAR10_DIR)`.
//! `MIXBENCH_REQUIRE_GPU=1` turns either skip into a failure.

/// Prints a skip notice on the process's stderr, which the test harness's output
/// capture does not swallow (a `println!` would only show with `--nocapture`).
macro_rules! skipped {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use candle_core::{Device, Result};

fn require() -> bool {
    std::env::var("MIXBENCH_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn skip(why: &str) {
    assert!(!require(), "MIXBENCH_REQUIRE_GPU=1 but {why}");
    skipped!("resnet18_trajectory_matches_cpu: SKIPPED ({why})");
}

#[test]
fn resnet18_trajectory_matches_cpu() -> Result<()> {
    if !cfg!(feature = "cuda") || !candle_core::utils::cuda_is_available() {
        skip("no CUDA device");
        return Ok(());
    }
    let Ok(dev) = Device::new_cuda(0) else {
        skip("no CUDA device");
        return Ok(());
    };
    let Some(images) = std::env::var_os("CIFAR10_DIR").and_then(|d| {
        let d = std::path::PathBuf::from(d);
        [
            d.join("data_batch_1.bin"),
            d.join("cifar-10-batches-bin/data_batch_1.bin"),
        ]
        .into_iter()
        .find(|p| p.exists())
    }) else {
        skip("no CIFAR10_DIR");
        return Ok(());
    };
    run(&dev, &std::fs::read(images)?)
}

fn run(dev: &Device, raw: &[u8]) -> Result<()> {
    use backbones::{Arch, CifarResNet, CifarResNetConfig};
    use candle_core::{DType, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    const STEPS: usize = 20;
    const BATCH: usize = 32;
    const LAMBDA: f64 = 0.7;
    let record = 1 + 3072;
    assert!(
        raw.len() >= STEPS * BATCH * record,
        "data_batch_1.bin too short"
    );
    let mean = [0.4914f32, 0.4822, 0.4465];
    let std = [0.2023f32, 0.1994, 0.2010];
    let batch = |k: usize| -> Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(BATCH * 3072);
        let mut y = Vec::with_capacity(BATCH);
        for i in 0..BATCH {
            let r = &raw[(k * BATCH + i) * record..][..record];
            y.push(r[0] as u32);
            for (j, &p) in r[1..].iter().enumerate() {
                let c = j / 1024;
                x.push((p as f32 / 255.0 - mean[c]) / std[c]);
            }
        }
        Ok((
            Tensor::from_vec(x, (BATCH, 3, 32, 32), &Device::Cpu)?,
            Tensor::from_vec(y, BATCH, &Device::Cpu)?,
        ))
    };

    kernels::set_precision(kernels::Precision::F32);
    kernels::set_deterministic(true);
    let init = VarMap::new();
    let cfg = CifarResNetConfig {
        arch: Arch::ResNet18,
        ..Default::default()
    };
    let net = CifarResNet::new(
        cfg,
        VarBuilder::from_varmap(&init, DType::F32, &Device::Cpu),
    )?;
    net.init_weights(&init, 7)?;

    // `taped`: the backward the runner trains with (`forward_train`), else candle's autograd.
    let trajectory = |d: &Device, taped: bool| -> Result<Vec<f32>> {
        // A fresh map on `d` holding copies of the initial values.
        let varmap = VarMap::new();
        let net = CifarResNet::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, d))?;
        {
            let src = init.data().lock().expect("lock");
            let dst = varmap.data().lock().expect("lock");
            for (name, var) in dst.iter() {
                var.set(&src[name].as_tensor().to_device(d)?)?;
            }
        }
        let params: Vec<Var> = varmap
            .data()
            .lock()
            .expect("lock")
            .iter()
            .filter(|(n, _)| !backbones::is_buffer(n))
            .map(|(_, v)| v.clone())
            .collect();
        let mut bufs: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut losses = Vec::new();
        for k in 0..STEPS {
            let (x, y) = batch(k)?;
            let (x, y) = (x.to_device(d)?, y.to_device(d)?);
            let rev = Tensor::from_vec((0..BATCH as u32).rev().collect::<Vec<_>>(), BATCH, d)?;
            let xm = ((&x * LAMBDA)? + (x.index_select(&rev, 0)? * (1.0 - LAMBDA))?)?;
            let (logits, tape) = if taped {
                net.forward_train(&xm, None)?
            } else {
                (net.forward_t(&xm, true)?, None)
            };
            assert_eq!(tape.is_some(), taped, "the tape applies on {d:?}");
            let ce = |t: &Tensor| candle_nn::loss::cross_entropy(&logits, t);
            let loss = ((ce(&y)? * LAMBDA)? + (ce(&y.index_select(&rev, 0)?)? * (1.0 - LAMBDA))?)?;
            losses.push(loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?);
            let mut grads = loss.backward()?;
            if let Some(tape) = tape {
                tape.add_to(&mut grads)?;
            }
            for (p, buf) in params.iter().zip(bufs.iter_mut()) {
                let Some(g) = grads.get(p.as_tensor()) else {
                    continue;
                };
                let first = buf.is_none();
                if first {
                    *buf = Some(p.as_tensor().zeros_like()?);
                }
                let step = kernels::SgdStep {
                    lr: 0.1,
                    weight_decay: 1e-4,
                    momentum: 0.9,
                    nesterov: false,
                    first,
                };
                kernels::sgd_update(p.as_tensor(), g, buf.as_ref(), &step)?;
            }
        }
        Ok(losses)
    };
    // CPU through candle's autograd (the reference); CUDA both ways.
    let cpu = trajectory(&Device::Cpu, false)?;
    let gpu = trajectory(dev, true)?;
    let gpu_autograd = trajectory(dev, false)?;
    kernels::set_deterministic(false);
    for (k, (t, a)) in gpu.iter().zip(&gpu_autograd).enumerate() {
        // The same ops on the same device with deterministic algorithms: equal up to rounding
        // (bit-equal on the CPU, tests/tape.rs).
        assert!(
            (t - a).abs() <= 1e-5 * a.abs().max(1.0),
            "step {k}: cuda taped {t} vs cuda autograd {a}"
        );
    }
    for (k, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        println!("step {k:2}: cpu {c:.6} cuda {g:.6} diff {:+.2e}", g - c);
    }
    assert!(
        ((gpu[0] - cpu[0]) / cpu[0]).abs() <= 1e-4,
        "step 0: {} vs {}",
        gpu[0],
        cpu[0]
    );
    for (k, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        assert!(
            (g - c).abs() <= 0.05 + 0.05 * c.abs(),
            "step {k}: cuda {g} vs cpu {c}"
        );
    }
    assert!(
        cpu[STEPS - 1] < cpu[0] && gpu[STEPS - 1] < gpu[0],
        "loss must fall"
    );
    Ok(())
}
