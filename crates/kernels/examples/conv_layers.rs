//! Per-layer timing of the custom conv op over the distinct conv shapes of a CIFAR ResNet-18
//! at one base width, and their count-weighted sums: forward, forward+backward (autograd),
//! and the input gradient alone (`conv2d_backward`, as PuzzleMix's saliency pass runs it).
//!
//! `cargo run -p kernels --release --example conv_layers -- [--width 16] [--batch 100] [--reps 5]`
//!
//! Prints one JSON object; each time is the minimum over `--reps` calls after one warm-up.

use candle_core::{Device, Result, Tensor, Var};
use kernels::ConvParams;
use serde_json::json;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} expects a number"))
        })
        .unwrap_or(default)
}

fn best_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// Fixed uniform values in `[-scale, scale)`, the same in every run (for the digests).
fn pseudo_random(dims: &[usize], scale: f32) -> Result<Tensor> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

fn main() -> Result<()> {
    kernels::keep_freed_memory();
    let w = arg("--width", 16);
    let batch = arg("--batch", 100);
    let reps = arg("--reps", 5);
    // (name, c_in, c_out, input hw, kernel, stride, count in the network)
    let layers = [
        ("stem", 3, w, 32, 3, 1, 1),
        ("s1_3x3", w, w, 32, 3, 1, 4),
        ("s2_3x3_s2", w, 2 * w, 32, 3, 2, 1),
        ("s2_3x3", 2 * w, 2 * w, 16, 3, 1, 3),
        ("s2_1x1_s2", w, 2 * w, 32, 1, 2, 1),
        ("s3_3x3_s2", 2 * w, 4 * w, 16, 3, 2, 1),
        ("s3_3x3", 4 * w, 4 * w, 8, 3, 1, 3),
        ("s3_1x1_s2", 2 * w, 4 * w, 16, 1, 2, 1),
        ("s4_3x3_s2", 4 * w, 8 * w, 8, 3, 2, 1),
        ("s4_3x3", 8 * w, 8 * w, 4, 3, 1, 3),
        ("s4_1x1_s2", 4 * w, 8 * w, 8, 1, 2, 1),
    ];
    let mut rows = Vec::new();
    let (mut total_fwd, mut total_fwd_bwd, mut total_dx) = (0.0, 0.0, 0.0);
    let only = std::env::var("CONV_LAYER").ok();
    for (name, c_in, c_out, hw, k, stride, count) in layers {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let x = Var::from_tensor(&pseudo_random(&[batch, c_in, hw, hw], 1.0)?)?;
        let wt = Var::from_tensor(&pseudo_random(&[c_out, c_in, k, k], 0.05)?)?;
        let cfg = ConvParams {
            stride,
            padding: k / 2,
            groups: 1,
        };
        // The stem's input is the image: no input gradient, as in training.
        let xin: Tensor = if name == "stem" {
            x.as_tensor().detach()
        } else {
            x.as_tensor().clone()
        };
        let fwd = best_ms(reps, || kernels::conv2d(&xin, &wt, cfg).map(drop))?;
        let fwd_bwd = best_ms(reps, || {
            kernels::conv2d(&xin, &wt, cfg)?
                .sum_all()?
                .backward()
                .map(drop)
        })?;
        let y = kernels::conv2d(&xin, &wt, cfg)?;
        // The backward as the taped network runs it (`kernels::conv2d_backward`, no autograd
        // accumulation): the input gradient alone (PuzzleMix's saliency pass), the weight
        // gradient alone (the stem in training), and both (every other training layer).
        let gy = pseudo_random(y.dims(), 1.0)?;
        let (xd, wd) = (xin.detach(), wt.as_tensor().detach());
        let dx = best_ms(reps, || {
            kernels::conv2d_backward(&xd, &wd, &gy, cfg, true, false).map(drop)
        })?;
        let dw = best_ms(reps, || {
            kernels::conv2d_backward(&xd, &wd, &gy, cfg, false, true).map(drop)
        })?;
        let dx_dw = best_ms(reps, || {
            kernels::conv2d_backward(&xd, &wd, &gy, cfg, true, true).map(drop)
        })?;
        // Bit digest of the output and both gradients, to compare builds for bit-exactness.
        let grads = (&y * &y)?.sum_all()?.backward()?;
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        let mut tensors = vec![y];
        tensors.extend(grads.get(x.as_tensor()).cloned());
        tensors.extend(grads.get(wt.as_tensor()).cloned());
        for t in &tensors {
            for v in t.flatten_all()?.to_vec1::<f32>()? {
                digest = (digest ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
            }
        }
        total_fwd += fwd * count as f64;
        if name != "stem" {
            total_dx += dx * count as f64;
        }
        total_fwd_bwd += fwd_bwd * count as f64;
        rows.push(
            json!({"layer": name, "count": count, "fwd_ms": (fwd * 100.0).round() / 100.0,
            "fwd_bwd_ms": (fwd_bwd * 100.0).round() / 100.0,
            "dx_ms": (dx * 100.0).round() / 100.0, "dw_ms": (dw * 100.0).round() / 100.0,
            "dx_dw_ms": (dx_dw * 100.0).round() / 100.0,
            "digest": format!("{digest:016x}")}),
        );
    }
    let report = json!({"width": w, "batch": batch, "threads": rayon::current_num_threads(),
        "layers": rows, "net_conv_fwd_ms": total_fwd.round(), "net_conv_fwd_bwd_ms": total_fwd_bwd.round(),
        "net_conv_dx_ms": total_dx.round()});
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}
