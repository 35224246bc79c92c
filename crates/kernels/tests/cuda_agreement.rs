//! CPU ↔ CUDA agreement of every custom op. Needs a CUDA device and a build with
//! `--features cudnn` (convolutions) or `cuda` (the rest); otherwise each test prints
//! `SKIPPED (no CUDA device)` and passes, unless `MIXBENCH_REQUIRE_GPU=1`, which turns a skip
//! into a failure. The device is opened as the runner opens it (`kernels::cuda_device`: one
//! explicit stream, event tracking off).
//!
//! Every value is checked element by element: `|cuda − cpu| ≤ tol · scale + floor`, where
//! `scale` (per element, computed on the CPU) is the magnitude of the terms the value is
//! computed from, so that a rounding error of any summation order is proportional to it, and
//! `floor = 1e-2 · tol · max(scale)` only absorbs noise on values whose terms cancel exactly.
//! An error confined to small-magnitude values (one group of a grouped convolution, one
//! channel) fails, where a check against the tensor's largest value would pass it.
//!
//! * Convolutions: `scale` is the same convolution of the absolute values (`|x| ⊛ |w|` and the
//!   gradients of `Σ (|x| ⊛ |w|)·|r|`), which bounds every summation order's error. `tol`: f32
//!   1e-4 (FMA math; Winograd and FFT algorithms err by more than `u·n`), tf32 4e-3 (operands
//!   rounded or truncated to 10 mantissa bits: ≤ 2·2^-10 per product), bf16 1.5e-2 (operands
//!   rounded to 8 significant bits, ≤ 2·2^-8 per product, and the result rounded once more:
//!   ≤ 1.2e-2 in the worst case).
//! * BatchNorm(+ReLU), train and eval, forward, statistics, every gradient and the running
//!   statistics: 1e-5 of the terms' magnitude (f32; only summation orders differ, ≈ 1e-7).
//!   The ReLU cases use inputs whose batch statistics every summation order gets exactly
//!   (dyadic values, balanced around a dyadic mean), so that CPU and CUDA compute the same
//!   ReLU mask: with arbitrary data a value within an ulp of zero can flip it, which moves that
//!   channel's gradient by far more than rounding.
//! * SGD (single and multi-tensor) and residual add+ReLU: bit-identical, by construction (same
//!   roundings, no FMA contraction).
//! * Soft-target cross-entropy value and logits gradient: 1e-6 of the largest value (both
//!   sides in f64, the same order within a row; the forward's sum over rows is a tree on
//!   CUDA, sequential on CPU).
//!
//! Inputs given as views with a non-zero storage offset (padded with NaN, so that a kernel
//! that ignores the offset reads NaN and fails) go through the taped functions the backbones
//! train with (`conv2d_backward`, `batch_norm_train_saving` / `batch_norm_train_backward`,
//! `add_relu_backward`), which are also checked directly against the CPU.

/// Prints a skip notice on the process's stderr, which the test harness's output
/// capture does not swallow (a `println!` would only show with `--nocapture`).
macro_rules! skipped {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use candle_core::{Device, Result};

fn require_gpu() -> bool {
    std::env::var("MIXBENCH_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The CUDA device to test on, or `None` after printing why the test is skipped.
fn cuda_device(test: &str) -> Option<Device> {
    let why = if !cfg!(feature = "cuda") {
        "built without --features cuda".to_string()
    } else if !candle_core::utils::cuda_is_available() {
        "candle built without CUDA".to_string()
    } else {
        match kernels::cuda_device(0) {
            Ok(d) => return Some(d),
            Err(e) => format!("{e}"),
        }
    };
    if require_gpu() {
        panic!("{test}: MIXBENCH_REQUIRE_GPU=1 but no CUDA device: {why}");
    }
    skipped!("{test}: SKIPPED (no CUDA device): {why}");
    None
}

/// For the convolution tests: `true` in a `cudnn` build; otherwise a skip (a failure under
/// `MIXBENCH_REQUIRE_GPU=1`).
fn cudnn_built(test: &str) -> bool {
    if cfg!(feature = "cudnn") {
        return true;
    }
    if require_gpu() {
        panic!("{test}: MIXBENCH_REQUIRE_GPU=1 but built without --features cudnn");
    }
    skipped!("{test}: SKIPPED (built without cudnn)");
    false
}

#[test]
fn conv2d_agrees_with_cpu_in_every_precision() -> Result<()> {
    let test = "conv2d_agrees_with_cpu_in_every_precision";
    let Some(dev) = cuda_device(test) else {
        return Ok(());
    };
    if !cudnn_built(test) {
        return Ok(());
    }
    #[cfg(feature = "cudnn")]
    gpu::conv2d(&dev)?;
    let _ = dev;
    Ok(())
}

#[test]
fn conv_algorithm_falls_back_when_the_first_candidate_fails() -> Result<()> {
    let test = "conv_algorithm_falls_back_when_the_first_candidate_fails";
    let Some(dev) = cuda_device(test) else {
        return Ok(());
    };
    if !cudnn_built(test) {
        return Ok(());
    }
    #[cfg(feature = "cudnn")]
    gpu::conv_fallback(&dev)?;
    let _ = dev;
    Ok(())
}

#[test]
fn batch_norm_relu_agrees_with_cpu() -> Result<()> {
    let Some(dev) = cuda_device("batch_norm_relu_agrees_with_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    gpu::batch_norm(&dev)?;
    let _ = dev;
    Ok(())
}

#[test]
fn sgd_update_is_bit_identical_to_cpu() -> Result<()> {
    let Some(dev) = cuda_device("sgd_update_is_bit_identical_to_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    gpu::sgd(&dev)?;
    let _ = dev;
    Ok(())
}

#[test]
fn add_relu_running_stats_and_multi_sgd_agree_with_cpu() -> Result<()> {
    let Some(dev) = cuda_device("add_relu_running_stats_and_multi_sgd_agree_with_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    gpu::fused_extras(&dev)?;
    let _ = dev;
    Ok(())
}

#[test]
fn soft_cross_entropy_agrees_with_cpu() -> Result<()> {
    let Some(dev) = cuda_device("soft_cross_entropy_agrees_with_cpu") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    gpu::soft_cross_entropy(&dev)?;
    let _ = dev;
    Ok(())
}

#[test]
fn a_per_thread_stream_device_is_refused_on_a_second_thread() -> Result<()> {
    let Some(dev) = cuda_device("a_per_thread_stream_device_is_refused_on_a_second_thread") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    gpu::thread_rule(&dev)?;
    let _ = dev;
    Ok(())
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use std::sync::Mutex;

    /// Precision, determinism and the algorithm hook are process-wide: tests that set them run
    /// one at a time.
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

    /// `[N, C, ...]` values whose per-channel sums every order computes exactly: per channel a
    /// dyadic mean (0, 0.5 or −1) plus offsets `k/256` (|k| < 256) in ± pairs, shuffled over
    /// the channel's positions (one 0 when the count is odd). Sums of `x` and of `(x − mean)²`
    /// are exact in f32 lanes of up to 64 values and in f64, so CPU and CUDA get bit-equal
    /// batch statistics and therefore the same ReLU mask.
    fn exact_stats_input(dims: &[usize], seed: u64) -> Result<Tensor> {
        let (n, c) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        let count = n * plane;
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut x = vec![0f32; n * c * plane];
        for ch in 0..c {
            let base = [0.0f32, 0.5, -1.0][ch % 3];
            let mut values = Vec::with_capacity(count);
            for _ in 0..count / 2 {
                let k = (next() % 511) as i32 - 255;
                let o = k as f32 / 256.0;
                values.push(o);
                values.push(-o);
            }
            if count % 2 == 1 {
                values.push(0.0);
            }
            // Fisher–Yates, so that the ± pairs are spread over images and positions.
            for i in (1..count).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                values.swap(i, j);
            }
            for (j, v) in values.into_iter().enumerate() {
                let (img, q) = (j / plane, j % plane);
                x[(img * c + ch) * plane + q] = base + v;
            }
        }
        Tensor::from_vec(x, dims, &Device::Cpu)
    }

    /// `t` on `dev` as a view with a non-zero storage offset: narrowed out of a tensor with
    /// NaN-filled leading slices, returned with that parent (to check that nothing outside the
    /// view is written).
    fn offset_view(t: &Tensor, dev: &Device) -> Result<(Tensor, Tensor)> {
        let dims = t.dims();
        let lead = if dims.len() == 1 { 3 } else { 1 };
        let mut pad_dims = dims.to_vec();
        pad_dims[0] = lead;
        let pad = Tensor::full(f32::NAN, pad_dims, &Device::Cpu)?;
        let parent = Tensor::cat(&[&pad, t], 0)?.to_device(dev)?;
        let view = parent.narrow(0, lead, dims[0])?;
        assert!(view.is_contiguous() && view.layout().start_offset() > 0);
        Ok((view, parent))
    }

    /// The NaN padding of an [`offset_view`]'s parent is still all NaN.
    fn assert_pad_untouched(what: &str, parent: &Tensor, view_len: usize) -> Result<()> {
        let lead = parent.dim(0)? - view_len;
        let pad: Vec<f32> = parent
            .narrow(0, 0, lead)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        assert!(
            pad.iter().all(|v| v.is_nan()),
            "{what}: something wrote outside the view"
        );
        Ok(())
    }

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()
    }

    /// `|cuda − cpu| ≤ tol · scale + floor` element by element (see the file's docs); NaN
    /// fails.
    fn check_scaled(
        what: &str,
        cuda: &Tensor,
        cpu: &Tensor,
        scale: &Tensor,
        tol: f32,
    ) -> Result<()> {
        assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes");
        assert_eq!(scale.elem_count(), cpu.elem_count(), "{what}: scale shape");
        let (a, b, s) = (values(cuda)?, values(cpu)?, values(scale)?);
        let max_scale = s.iter().fold(0f32, |m, v| m.max(v.abs()));
        let floor = 1e-2 * tol * max_scale;
        let mut worst = (0usize, 0f32);
        for i in 0..a.len() {
            let ratio = (a[i] - b[i]).abs() / (tol * s[i].abs() + floor).max(f32::MIN_POSITIVE);
            if ratio.is_nan() {
                worst = (i, ratio);
                break;
            }
            if ratio > worst.1 {
                worst = (i, ratio);
            }
        }
        let i = worst.0;
        println!(
            "{what}: worst element {i} at {:.3} of the tolerance (cuda {}, cpu {}, scale {})",
            worst.1, a[i], b[i], s[i]
        );
        assert!(
            worst.1 <= 1.0,
            "{what}: element {i}: cuda {} vs cpu {} differ by {:e}, over {tol:e} × scale {} + {floor:e}",
            a[i],
            b[i],
            (a[i] - b[i]).abs(),
            s[i]
        );
        Ok(())
    }

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(values(t)?.iter().map(|x| x.to_bits()).collect())
    }

    /// Output, input gradient and weight gradient of `sum(conv(x, w) * r)` on `dev`, through
    /// candle's autograd.
    #[cfg(feature = "cudnn")]
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

    /// Resets the algorithm hook when dropped, so a failing test leaves it off.
    #[cfg(feature = "cudnn")]
    struct HookOff;
    #[cfg(feature = "cudnn")]
    impl Drop for HookOff {
        fn drop(&mut self) {
            kernels::test_hooks::fail_first_conv_algorithm(false);
        }
    }

    #[cfg(feature = "cudnn")]
    pub fn conv2d(dev: &Device) -> Result<()> {
        use kernels::{ConvParams, Precision};
        let _guard = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
        // (batch, c_in, h, c_out, k, stride, padding, groups); inputs are h × (h + 1).
        let cases = [
            (4, 16, 12, 32, 3, 1, 1, 1),
            (4, 16, 12, 32, 3, 2, 1, 1),
            (4, 32, 9, 16, 1, 1, 0, 1),
            (4, 32, 10, 64, 1, 2, 0, 1),
            (2, 128, 8, 128, 3, 1, 1, 32),
            (2, 128, 8, 128, 3, 2, 1, 32),
            (2, 3, 32, 16, 3, 1, 1, 1),
            // Batch 100, the networks' own shapes (cuDNN picks other algorithms there): the
            // stem, ResNet-18 stage 1, a stage-2 projection, ResNeXt-50's stage-3 grouped
            // stride-2 conv (8 channels per group), stage 4.
            (100, 3, 32, 64, 3, 1, 1, 1),
            (100, 64, 32, 64, 3, 1, 1, 1),
            (100, 64, 32, 128, 1, 2, 0, 1),
            (100, 256, 8, 256, 3, 2, 1, 32),
            (100, 512, 4, 512, 3, 1, 1, 1),
        ];
        for (i, &(n, ci, h, co, k, stride, padding, groups)) in cases.iter().enumerate() {
            let cfg = ConvParams {
                stride,
                padding,
                groups,
            };
            let x = pseudo_random(&[n, ci, h, h + 1], 10 + i as u64)?;
            // Weights of very different sizes per output channel (factor 1 to 1/64), so that
            // small-magnitude outputs and weight gradients exist and are checked for what they
            // are.
            let spread: Vec<f32> = (0..co).map(|o| 0.2 / (1 << (o % 7)) as f32).collect();
            let spread = Tensor::from_vec(spread, (co, 1, 1, 1), &Device::Cpu)?;
            let w =
                pseudo_random(&[co, ci / groups, k, k], 20 + i as u64)?.broadcast_mul(&spread)?;
            let ho = (h + 2 * padding - k) / stride + 1;
            let wo = (h + 1 + 2 * padding - k) / stride + 1;
            let r = pseudo_random(&[n, co, ho, wo], 30 + i as u64)?;
            let (y0, dx0, dw0) = conv_run(&x, &w, &r, cfg, &Device::Cpu)?;
            // Magnitudes of the terms: the same computation on absolute values.
            let (ys, dxs, dws) = conv_run(&x.abs()?, &w.abs()?, &r.abs()?, cfg, &Device::Cpu)?;
            let (xo, _) = offset_view(&x, dev)?;
            let (wo_, _) = offset_view(&w, dev)?;
            let (ro, _) = offset_view(&r, dev)?;
            for (p, tol) in [
                (Precision::F32, 1e-4),
                (Precision::Tf32, 4e-3),
                (Precision::Bf16, 1.5e-2),
            ] {
                for det in [false, true] {
                    kernels::set_precision(p);
                    kernels::set_deterministic(det);
                    let what = format!("conv {:?} {p} det={det}", cases[i]);
                    // candle's autograd over the op.
                    let (y, dx, dw) = conv_run(&x, &w, &r, cfg, dev)?;
                    assert_eq!(
                        y.dtype(),
                        DType::F32,
                        "conv2d returns f32 in every precision"
                    );
                    check_scaled(&format!("{what} y"), &y, &y0, &ys, tol)?;
                    check_scaled(&format!("{what} dx"), &dx, &dx0, &dxs, tol)?;
                    check_scaled(&format!("{what} dw"), &dw, &dw0, &dws, tol)?;
                    // The taped functions, on offset views: both gradients, then each alone.
                    let yt = kernels::conv2d(&xo, &wo_, cfg)?;
                    check_scaled(&format!("{what} y (offset views)"), &yt, &y0, &ys, tol)?;
                    let (gx, gw) = kernels::conv2d_backward(&xo, &wo_, &ro, cfg, true, true)?;
                    let (gx, gw) = (gx.expect("dx"), gw.expect("dw"));
                    check_scaled(&format!("{what} taped dx"), &gx, &dx0, &dxs, tol)?;
                    check_scaled(&format!("{what} taped dw"), &gw, &dw0, &dws, tol)?;
                    let (gx, none) = kernels::conv2d_backward(&xo, &wo_, &ro, cfg, true, false)?;
                    assert!(none.is_none(), "{what}: a weight gradient nobody asked for");
                    check_scaled(
                        &format!("{what} taped dx alone"),
                        &gx.expect("dx"),
                        &dx0,
                        &dxs,
                        tol,
                    )?;
                    let (none, gw) = kernels::conv2d_backward(&xo, &wo_, &ro, cfg, false, true)?;
                    assert!(none.is_none(), "{what}: an input gradient nobody asked for");
                    check_scaled(
                        &format!("{what} taped dw alone"),
                        &gw.expect("dw"),
                        &dw0,
                        &dws,
                        tol,
                    )?;
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
            assert!(
                bits(u)? == bits(v)?,
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

    /// With the hook failing every choice's first candidate, each pass (forward,
    /// backward-data, backward-filter) falls back to its next candidate, which is cached: the
    /// same shape's next call skips nothing. Values agree with the CPU as in [`conv2d`].
    /// Non-deterministic mode only: there the fixed algorithm is appended to the heuristics'
    /// list, so every pass has at least two candidates.
    #[cfg(feature = "cudnn")]
    pub fn conv_fallback(dev: &Device) -> Result<()> {
        use kernels::test_hooks::{conv_algorithms_skipped, fail_first_conv_algorithm};
        use kernels::{ConvParams, Precision};
        let _guard = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = ConvParams {
            stride: 1,
            padding: 1,
            groups: 1,
        };
        kernels::set_deterministic(false);
        // A batch size no other test uses, per precision, so that no choice is cached yet
        // (the cache is per thread, and each test runs on a thread of its own anyway).
        for (p, tol, n) in [(Precision::F32, 1e-4, 5), (Precision::Tf32, 4e-3, 7)] {
            kernels::set_precision(p);
            let x = pseudo_random(&[n, 16, 12, 13], 41)?;
            let w = (pseudo_random(&[24, 16, 3, 3], 42)? * 0.2)?;
            let r = pseudo_random(&[n, 24, 12, 13], 43)?;
            let (y0, dx0, dw0) = conv_run(&x, &w, &r, cfg, &Device::Cpu)?;
            let (ys, dxs, dws) = conv_run(&x.abs()?, &w.abs()?, &r.abs()?, cfg, &Device::Cpu)?;
            let before = conv_algorithms_skipped();
            let hooked = {
                let _off = HookOff;
                fail_first_conv_algorithm(true);
                conv_run(&x, &w, &r, cfg, dev)?
            };
            let skipped = conv_algorithms_skipped() - before;
            assert!(
                skipped >= 3,
                "{p}: each of the three passes must skip its failing first candidate, {skipped} skipped"
            );
            let what = format!("conv fallback {p}");
            check_scaled(&format!("{what} y"), &hooked.0, &y0, &ys, tol)?;
            check_scaled(&format!("{what} dx"), &hooked.1, &dx0, &dxs, tol)?;
            check_scaled(&format!("{what} dw"), &hooked.2, &dw0, &dws, tol)?;
            // Cached: the same shape again tries nothing new.
            let again = conv_algorithms_skipped();
            let (y, dx, dw) = conv_run(&x, &w, &r, cfg, dev)?;
            assert_eq!(
                conv_algorithms_skipped(),
                again,
                "{p}: the choice was not cached"
            );
            check_scaled(&format!("{what} y, cached"), &y, &y0, &ys, tol)?;
            check_scaled(&format!("{what} dx, cached"), &dx, &dx0, &dxs, tol)?;
            check_scaled(&format!("{what} dw, cached"), &dw, &dw0, &dws, tol)?;
        }
        kernels::set_precision(Precision::F32);
        Ok(())
    }

    /// Per-element magnitudes of the terms of BatchNorm's values (see the file's docs), from
    /// CPU tensors: input `x [N, C, ...]`, `weight`, `bias`, statistics `mean`/`var` and output
    /// gradient `dy`.
    struct BnScales {
        y: Tensor,
        mean: Tensor,
        var: Tensor,
        dx: Tensor,
        eval_dx: Tensor,
        dweight: Tensor,
        dbias: Tensor,
    }

    fn bn_scales(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        dy: &Tensor,
        eps: f64,
    ) -> Result<BnScales> {
        let c = w.elem_count();
        let mut bshape = vec![1usize; x.rank()];
        bshape[1] = c;
        let per_channel = |t: &Tensor| t.reshape(bshape.as_slice());
        // Mean over every axis but the channel's, as [C].
        let channel_mean = |t: &Tensor| -> Result<Tensor> {
            t.transpose(0, 1)?.contiguous()?.reshape((c, ()))?.mean(1)
        };
        let channel_sum = |t: &Tensor| -> Result<Tensor> {
            t.transpose(0, 1)?.contiguous()?.reshape((c, ()))?.sum(1)
        };
        let inv = (var + eps)?.sqrt()?.recip()?;
        let s = (w * &inv)?.abs()?;
        let abs_x_mean = channel_mean(&x.abs()?)?;
        let xhat = x
            .broadcast_sub(&per_channel(mean)?)?
            .broadcast_mul(&per_channel(&inv)?)?
            .abs()?;
        // y = x·s + (b − mean·s).
        let y = x
            .abs()?
            .broadcast_add(&per_channel(&(mean.abs()? + &abs_x_mean)?)?)?
            .broadcast_mul(&per_channel(&s)?)?
            .broadcast_add(&per_channel(&b.abs()?)?)?;
        let ady = dy.abs()?;
        let dy_xhat = (&ady * &xhat)?;
        let mean_dy = channel_mean(&ady)?;
        let mean_dy_xhat = channel_mean(&dy_xhat)?;
        // dx = k·(d − mean(d) − x̂·mean(d·x̂)), k = w·inv; x̂'s error from the mean's is
        // inv·(its terms' size).
        let xhat_terms = xhat.broadcast_add(&per_channel(&(&inv * &abs_x_mean)?)?)?;
        let dx = ady
            .broadcast_add(&per_channel(&mean_dy)?)?
            .add(&xhat_terms.broadcast_mul(&per_channel(&mean_dy_xhat)?)?)?
            .broadcast_mul(&per_channel(&s)?)?;
        let eval_dx = ady.broadcast_mul(&per_channel(&s)?)?;
        let dweight = (channel_sum(&dy_xhat)? + (&inv * &abs_x_mean)?.mul(&channel_sum(&ady)?)?)?;
        Ok(BnScales {
            y,
            mean: abs_x_mean,
            var: channel_mean(&x.sqr()?)?,
            dx,
            eval_dx,
            dweight,
            dbias: channel_sum(&ady)?,
        })
    }

    /// Every BatchNorm value on `d`: the autograd train and eval paths (fresh variables) and
    /// the taped train path plus the fused eval forward on offset views, with running
    /// statistics (also offset views) updated by the taped forward.
    struct BnRun {
        values: Vec<(&'static str, Tensor)>,
        parents: Vec<(Tensor, usize)>,
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_run(
        d: &Device,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        r: &Tensor,
        running: (&Tensor, &Tensor),
        eps: f64,
        relu: bool,
    ) -> Result<BnRun> {
        let xv = Var::from_tensor(&x.to_device(d)?)?;
        let wv = Var::from_tensor(&w.to_device(d)?)?;
        let bv = Var::from_tensor(&b.to_device(d)?)?;
        let rd = r.to_device(d)?;
        let train = if relu {
            kernels::batch_norm_relu_train
        } else {
            kernels::batch_norm_train
        };
        let (y, mean, var) = train(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), eps)?;
        let g = (&y * &rd)?.sum_all()?.backward()?;
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
        let ge = (&ev * &rd)?.sum_all()?.backward()?;
        let get_e = |v: &Var| ge.get(v.as_tensor()).expect("eval grad").clone();
        // The input-only eval backward of the taped saliency pass.
        let stats = Tensor::cat(&[&mean, &var], 0)?;
        let taped_eval_dx =
            kernels::batch_norm_eval_backward_input(xt, &stats, wt, bt, &rd, eps, relu)?;
        // The taped training functions, every input an offset view (on the CPU too, where it
        // is the same code path as a plain tensor).
        let (xo, _) = offset_view(x, d)?;
        let (wo, _) = offset_view(w, d)?;
        let (bo, _) = offset_view(b, d)?;
        let (ro, _) = offset_view(r, d)?;
        let (rm, rm_parent) = offset_view(running.0, d)?;
        let (rv, rv_parent) = offset_view(running.1, d)?;
        let run_stats = kernels::RunningStats {
            mean: &rm,
            var: &rv,
            momentum: 0.1,
        };
        let (yt, st) = kernels::batch_norm_train_saving(&xo, &wo, &bo, eps, relu, run_stats)?;
        let (so, _) = offset_view(&st, d)?;
        let (gx, gw, gb) = kernels::batch_norm_train_backward(&xo, &wo, &bo, &so, &ro, eps, relu)?;
        let c = w.elem_count();
        let eval_packed = kernels::batch_norm_eval_packed(&xo, &so, &wo, &bo, eps, relu)?;
        Ok(BnRun {
            values: vec![
                ("y", y),
                ("mean", mean),
                ("var", var),
                ("dx", get(&xv)),
                ("dweight", get(&wv)),
                ("dbias", get(&bv)),
                ("eval y", ev),
                ("eval dx", get_e(&xv)),
                ("eval dweight", get_e(&wv)),
                ("eval dbias", get_e(&bv)),
                ("eval dx (input-only backward)", taped_eval_dx),
                ("taped y", yt),
                ("taped mean", st.narrow(0, 0, c)?),
                ("taped var", st.narrow(0, c, c)?),
                ("taped dx", gx),
                ("taped dweight", gw),
                ("taped dbias", gb),
                ("eval packed y", eval_packed),
                ("running mean", rm),
                ("running var", rv),
            ],
            parents: vec![(rm_parent, c), (rv_parent, c)],
        })
    }

    pub fn batch_norm(dev: &Device) -> Result<()> {
        let eps = 1e-5;
        // Planes of 100, 16 and 7 values; 1,024 (more than the kernels' 256 threads, so their
        // strided loops repeat) at batch 4 and at batch 100 (ResNet-18 stage 1: several image
        // chunks per channel); ResNet-18 stage 4 and ResNeXt-50 stage 4 (2,048 channels).
        let shapes: [&[usize]; 7] = [
            &[8, 16, 10, 10],
            &[100, 64, 4, 4],
            &[3, 5, 7, 1],
            &[4, 8, 32, 32],
            &[100, 64, 32, 32],
            &[100, 512, 4, 4],
            &[100, 2048, 4, 4],
        ];
        for (si, dims) in shapes.iter().enumerate() {
            let c = dims[1];
            let seed = 100 * si as u64;
            let w = pseudo_random(&[c], seed + 2)?.affine(0.5, 1.0)?;
            let b = pseudo_random(&[c], seed + 3)?;
            let r = pseudo_random(dims, seed + 4)?;
            let rm0 = pseudo_random(&[c], seed + 5)?;
            let rv0 = pseudo_random(&[c], seed + 6)?.affine(0.5, 1.0)?;
            let random = (pseudo_random(dims, seed + 1)? * 3.0)?.affine(1.0, 0.5)?;
            let exact = exact_stats_input(dims, seed + 7)?;
            // Arbitrary data without ReLU; statistics exact for every order with and without.
            for (data, x, relu) in [
                ("random", &random, false),
                ("exact-stats", &exact, false),
                ("exact-stats", &exact, true),
            ] {
                let gpu = bn_run(dev, x, &w, &b, &r, (&rm0, &rv0), eps, relu)?;
                let cpu = bn_run(&Device::Cpu, x, &w, &b, &r, (&rm0, &rv0), eps, relu)?;
                for (parent, len) in &gpu.parents {
                    assert_pad_untouched("running statistics", parent, *len)?;
                }
                let (mean, var) = (&cpu.values[1].1, &cpu.values[2].1);
                let sc = bn_scales(x, &w, &b, mean, var, &r, eps)?;
                let n = (x.elem_count() / c) as f64;
                let running_mean_scale = (rm0.abs()? + &sc.mean)?;
                let running_var_scale = (rv0.abs()? + sc.var.affine(n / (n - 1.0), 0.0)?)?;
                for ((name, g), (_, cv)) in gpu.values.iter().zip(&cpu.values) {
                    let scale = match *name {
                        "y" | "eval y" | "taped y" | "eval packed y" => &sc.y,
                        "mean" | "taped mean" => &sc.mean,
                        "var" | "taped var" => &sc.var,
                        "dx" | "taped dx" => &sc.dx,
                        "eval dx" | "eval dx (input-only backward)" => &sc.eval_dx,
                        "dweight" | "eval dweight" | "taped dweight" => &sc.dweight,
                        "dbias" | "eval dbias" | "taped dbias" => &sc.dbias,
                        "running mean" => &running_mean_scale,
                        "running var" => &running_var_scale,
                        other => unreachable!("no scale for {other}"),
                    };
                    let what = format!("bn {dims:?} {data} relu={relu} {name}");
                    check_scaled(&what, g, cv, scale, 1e-5)?;
                }
            }
        }
        // An empty batch is refused on CUDA as on the CPU (no kernel runs over nothing).
        let x = pseudo_random(&[2, 3, 4, 4], 1)?
            .to_device(dev)?
            .narrow(0, 0, 0)?;
        let p = pseudo_random(&[3], 2)?.affine(0.5, 1.0)?.to_device(dev)?;
        let err = kernels::batch_norm_eval(&x, &p, &p, &p, &p, eps).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
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
            // `offset`: θ, its gradient and its buffer as views with a storage offset.
            let run = |d: &Device, offset: bool| -> Result<(Vec<f32>, Option<Vec<f32>>)> {
                let place = |t: Tensor| -> Result<(Tensor, Option<Tensor>)> {
                    if offset {
                        let (v, p) = offset_view(&t, d)?;
                        Ok((v, Some(p)))
                    } else {
                        Ok((t.to_device(d)?, None))
                    }
                };
                let (theta, theta_parent) = place(pseudo_random(&[n], 1)?)?;
                let (buf, buf_parent) = if mu != 0.0 {
                    let (b, p) = place(Tensor::zeros(n, DType::F32, &Device::Cpu)?)?;
                    (Some(b), p)
                } else {
                    (None, None)
                };
                for k in 0..4u64 {
                    let (grad, _) = place(pseudo_random(&[n], 10 + k)?)?;
                    let step = kernels::SgdStep {
                        lr: 0.1 / (k + 1) as f64,
                        weight_decay: wd,
                        momentum: mu,
                        nesterov,
                        first: k == 0,
                    };
                    kernels::sgd_update(&theta, &grad, buf.as_ref(), &step)?;
                }
                for parent in theta_parent.iter().chain(&buf_parent) {
                    assert_pad_untouched("sgd", parent, n)?;
                }
                let b = match &buf {
                    Some(b) => Some(values(b)?),
                    None => None,
                };
                Ok((values(&theta)?, b))
            };
            let cpu = run(&Device::Cpu, false)?;
            let to_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for offset in [false, true] {
                let g = run(dev, offset)?;
                let what = format!("wd {wd} μ {mu} nesterov {nesterov} offset views {offset}");
                assert_eq!(to_bits(&g.0), to_bits(&cpu.0), "θ, {what}");
                if let (Some(a), Some(b)) = (&g.1, &cpu.1) {
                    assert_eq!(to_bits(a), to_bits(b), "momentum buffer, {what}");
                }
                println!("sgd {what}: bit-identical");
            }
        }
        Ok(())
    }

    /// add_relu forward and gradients (bit-identical: one f32 add, a max and a 0/1 multiply),
    /// also through the taped `add_relu_backward` on offset views; the running statistics
    /// written by the statistics kernel (1e-5 of their terms); and the multi-tensor SGD launch
    /// (bit-identical to the CPU's per-parameter update).
    pub fn fused_extras(dev: &Device) -> Result<()> {
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
            let (ao, _) = offset_view(&a, d)?;
            let (bo, _) = offset_view(&b, d)?;
            let (ro, _) = offset_view(&r, d)?;
            let yo = kernels::add_relu(&ao, &bo)?;
            let go = kernels::add_relu_backward(&ao, &bo, &ro)?;
            Ok(vec![y, ga, gb, yo, go])
        };
        let (gpu, cpu) = (run(dev)?, run(&Device::Cpu)?);
        let names = [
            "y",
            "da",
            "db",
            "y (offset views)",
            "taped grad (offset views)",
        ];
        for (name, (g, c)) in names.iter().zip(gpu.iter().zip(&cpu)) {
            assert_eq!(bits(g)?, bits(c)?, "add_relu {name}");
        }
        // Running statistics updated inside the stats op.
        let x = (pseudo_random(&[16, 12, 6, 6], 4)? * 2.0)?.affine(1.0, 0.3)?;
        let w = pseudo_random(&[12], 5)?.affine(0.5, 1.0)?;
        let bias = pseudo_random(&[12], 6)?;
        let (rm0, rv0) = (
            pseudo_random(&[12], 7)?,
            pseudo_random(&[12], 8)?.affine(0.5, 1.0)?,
        );
        let run = |d: &Device| -> Result<Vec<Tensor>> {
            let (rm, rv) = (rm0.to_device(d)?, rv0.to_device(d)?);
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
        // Two updates of 0.1·batch each: terms of at most |initial| + the batch statistics.
        let n = (16 * 6 * 6) as f64;
        let abs_mean = x
            .abs()?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((12, ()))?
            .mean(1)?;
        let sq_mean = x
            .sqr()?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((12, ()))?
            .mean(1)?;
        let mean_scale = (rm0.abs()? + abs_mean)?;
        let var_scale = (rv0.abs()? + sq_mean.affine(n / (n - 1.0), 0.0)?)?;
        check_scaled("running mean", &gpu[0], &cpu[0], &mean_scale, 1e-5)?;
        check_scaled("running var", &gpu[1], &cpu[1], &var_scale, 1e-5)?;
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
        for (name, g, cv) in [("value", &gpu[0], &cpu[0]), ("grad", &gpu[1], &cpu[1])] {
            // 1e-6 of the largest value, as a per-element scale.
            let max = cv.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = cv.ones_like()?.affine(max as f64, 0.0)?;
            check_scaled(&format!("soft CE {name}"), g, cv, &scale, 1e-6)?;
        }
        Ok(())
    }

    /// A device on the per-thread default stream (`Device::new_cuda`) runs the ops on the
    /// thread that used it first and refuses them on another; a device from
    /// `kernels::cuda_device` (one explicit stream) runs them from any thread.
    pub fn thread_rule(dev: &Device) -> Result<()> {
        let per_thread = Device::new_cuda(0)?;
        let a = pseudo_random(&[4, 8, 9, 9], 1)?;
        let expected = bits(&kernels::add_relu(&a, &a)?)?;
        let on = |d: &Device| a.to_device(d);
        let at = on(&per_thread)?;
        assert_eq!(bits(&kernels::add_relu(&at, &at)?)?, expected);
        per_thread.synchronize()?;
        let refused = std::thread::scope(|s| {
            s.spawn(|| {
                kernels::add_relu(&at, &at)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .join()
            .expect("thread")
        });
        let err = refused.expect_err("a second thread on the per-thread default stream");
        assert!(err.contains("per-thread default stream"), "{err}");
        let ad = on(dev)?;
        let from_other_thread = std::thread::scope(|s| {
            s.spawn(|| -> Result<Vec<u32>> { bits(&kernels::add_relu(&ad, &ad)?) })
                .join()
                .expect("thread")
        })?;
        assert_eq!(from_other_thread, expected);
        assert_eq!(bits(&kernels::add_relu(&ad, &ad)?)?, expected);
        Ok(())
    }
}
