//! Times the custom ops against candle's stock ops on this machine, in the same run, and prints
//! one JSON object: per-op forward and forward+backward medians, and a CIFAR ResNet-18
//! (batch 32 by default) forward+backward train-step estimate built from each op set.
//!
//! `cargo run -p kernels --release --example conv_bench -- [--batch 32] [--reps 5] [--net-reps 3]`
//!
//! Timings are medians over `--reps` runs after one warm-up; on a shared machine they are noisy.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::{reference, ConvParams};
use serde_json::{json, Value};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} expects a number, got {v}"))
        })
        .unwrap_or(default)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

/// Milliseconds per call: one warm-up, then the median of `reps` timed calls.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Vec<f64>)> {
    f()?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(samples.clone()), samples))
}

#[derive(Clone, Copy, PartialEq)]
enum Impl {
    Ours,
    Stock,
}

impl Impl {
    fn conv(self, x: &Tensor, w: &Tensor, cfg: ConvParams) -> Result<Tensor> {
        match self {
            Impl::Ours => kernels::conv2d(x, w, cfg),
            Impl::Stock => reference::conv2d(x, w, cfg),
        }
    }

    fn bn(self, x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
        let eps = 1e-5;
        match self {
            Impl::Ours if relu => Ok(kernels::batch_norm_relu_train(x, w, b, eps)?.0),
            Impl::Ours => Ok(kernels::batch_norm_train(x, w, b, eps)?.0),
            Impl::Stock => {
                let y = reference::batch_norm_train(x, w, b, eps)?.0;
                if relu {
                    y.relu()
                } else {
                    Ok(y)
                }
            }
        }
    }
}

fn randn(dims: &[usize], std: f64) -> Result<Var> {
    Var::from_tensor(&Tensor::randn(0f32, std as f32, dims, &Device::Cpu)?)
}

fn conv_op_row(
    name: &str,
    batch: usize,
    (c_in, c_out, hw, k): (usize, usize, usize, usize),
    cfg: ConvParams,
    reps: usize,
) -> Result<Value> {
    let x = randn(&[batch, c_in, hw, hw], 1.0)?;
    let w = randn(&[c_out, c_in / cfg.groups, k, k], 0.05)?;
    let mut row = json!({"op": name, "input": [batch, c_in, hw, hw], "weight": w.dims(),
        "stride": cfg.stride, "padding": cfg.padding, "groups": cfg.groups});
    for (label, imp) in [("ours", Impl::Ours), ("stock", Impl::Stock)] {
        let (fwd, _) = time_ms(reps, || imp.conv(&x, &w, cfg).map(drop))?;
        let (fwd_bwd, _) = time_ms(reps, || {
            imp.conv(&x, &w, cfg)?.sum_all()?.backward().map(drop)
        })?;
        row[format!("{label}_fwd_ms")] = json!(fwd);
        row[format!("{label}_fwd_bwd_ms")] = json!(fwd_bwd);
    }
    row["speedup_fwd_bwd"] = json!(
        row["stock_fwd_bwd_ms"].as_f64().unwrap_or(f64::NAN)
            / row["ours_fwd_bwd_ms"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(row)
}

fn bn_op_row(batch: usize, channels: usize, hw: usize, reps: usize) -> Result<Value> {
    let x = randn(&[batch, channels, hw, hw], 1.0)?;
    let w = randn(&[channels], 1.0)?;
    let b = randn(&[channels], 1.0)?;
    let mut row = json!({"op": "batch_norm_relu_train", "input": [batch, channels, hw, hw]});
    for (label, imp) in [("ours", Impl::Ours), ("stock", Impl::Stock)] {
        let (fwd, _) = time_ms(reps, || imp.bn(&x, &w, &b, true).map(drop))?;
        let (fwd_bwd, _) = time_ms(reps, || {
            imp.bn(&x, &w, &b, true)?.sum_all()?.backward().map(drop)
        })?;
        row[format!("{label}_fwd_ms")] = json!(fwd);
        row[format!("{label}_fwd_bwd_ms")] = json!(fwd_bwd);
    }
    row["speedup_fwd_bwd"] = json!(
        row["stock_fwd_bwd_ms"].as_f64().unwrap_or(f64::NAN)
            / row["ours_fwd_bwd_ms"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(row)
}

/// Conv + BN parameters of one convolution layer.
struct ConvBn {
    w: Var,
    gamma: Var,
    beta: Var,
    cfg: ConvParams,
}

impl ConvBn {
    fn new(c_in: usize, c_out: usize, k: usize, stride: usize) -> Result<Self> {
        let fan_in = (c_in * k * k) as f64;
        Ok(Self {
            w: randn(&[c_out, c_in, k, k], (2.0 / fan_in).sqrt())?,
            gamma: Var::ones(c_out, DType::F32, &Device::Cpu)?,
            beta: Var::zeros(c_out, DType::F32, &Device::Cpu)?,
            cfg: ConvParams {
                stride,
                padding: k / 2,
                groups: 1,
            },
        })
    }

    fn forward(&self, imp: Impl, x: &Tensor, relu: bool) -> Result<Tensor> {
        let y = imp.conv(x, &self.w, self.cfg)?;
        imp.bn(&y, &self.gamma, &self.beta, relu)
    }
}

struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    shortcut: Option<ConvBn>,
}

/// CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks, global average pool, linear.
struct ResNet18 {
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    fc: Var,
}

impl ResNet18 {
    fn new() -> Result<Self> {
        let mut blocks = Vec::new();
        let mut c_in = 64;
        for (stage, width) in [64usize, 128, 256, 512].into_iter().enumerate() {
            for block in 0..2 {
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                let shortcut = if stride != 1 || c_in != width {
                    Some(ConvBn::new(c_in, width, 1, stride)?)
                } else {
                    None
                };
                blocks.push(BasicBlock {
                    conv1: ConvBn::new(c_in, width, 3, stride)?,
                    conv2: ConvBn::new(width, width, 3, 1)?,
                    shortcut,
                });
                c_in = width;
            }
        }
        Ok(Self {
            stem: ConvBn::new(3, 64, 3, 1)?,
            blocks,
            fc: randn(&[10, 512], 0.04)?,
        })
    }

    fn loss(&self, imp: Impl, images: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(imp, images, true)?;
        for b in &self.blocks {
            let out = b.conv1.forward(imp, &h, true)?;
            let out = b.conv2.forward(imp, &out, false)?;
            let skip = match &b.shortcut {
                Some(s) => s.forward(imp, &h, false)?,
                None => h,
            };
            h = (out + skip)?.relu()?;
        }
        let pooled = h.mean((2, 3))?;
        let logits = pooled.matmul(&self.fc.t()?)?;
        candle_nn::loss::cross_entropy(&logits, labels)
    }
}

fn main() -> Result<()> {
    kernels::keep_freed_memory();
    let batch = arg("--batch", 32);
    let reps = arg("--reps", 5);
    let net_reps = arg("--net-reps", 3);
    let p = |stride, padding, groups| ConvParams {
        stride,
        padding,
        groups,
    };
    let ops = vec![
        conv_op_row("conv3x3", batch, (64, 64, 32, 3), p(1, 1, 1), reps)?,
        conv_op_row("conv3x3_s2", batch, (64, 128, 32, 3), p(2, 1, 1), reps)?,
        conv_op_row("conv3x3", batch, (128, 128, 16, 3), p(1, 1, 1), reps)?,
        conv_op_row("conv3x3", batch, (256, 256, 8, 3), p(1, 1, 1), reps)?,
        conv_op_row("conv3x3", batch, (512, 512, 4, 3), p(1, 1, 1), reps)?,
        conv_op_row("conv1x1_s2", batch, (128, 256, 16, 1), p(2, 0, 1), reps)?,
        conv_op_row("conv3x3_g32", batch, (128, 128, 32, 3), p(1, 1, 32), reps)?,
        bn_op_row(batch, 64, 32, reps)?,
    ];

    let net = ResNet18::new()?;
    let images = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &Device::Cpu)?;
    let labels = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
        batch,
        &Device::Cpu,
    )?;
    let mut resnet = json!({"arch": "cifar_resnet18", "batch": batch, "reps": net_reps});
    for (label, imp) in [("ours", Impl::Ours), ("stock", Impl::Stock)] {
        let (step, samples) = time_ms(net_reps, || {
            net.loss(imp, &images, &labels)?.backward().map(drop)
        })?;
        resnet[format!("{label}_step_ms")] = json!(step);
        resnet[format!("{label}_step_ms_samples")] = json!(samples);
        resnet[format!("{label}_images_per_s")] = json!(batch as f64 * 1e3 / step);
    }
    resnet["speedup"] = json!(
        resnet["stock_step_ms"].as_f64().unwrap_or(f64::NAN)
            / resnet["ours_step_ms"].as_f64().unwrap_or(f64::NAN)
    );
    let report = json!({
        "threads": rayon::current_num_threads(),
        "note": "medians after one warm-up; shared machine, timings are noisy",
        "ops": ops,
        "resnet18_forward_backward": resnet,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(())
}
