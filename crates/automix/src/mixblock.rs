//! The MixBlock (`PixelMixBlock`, §5.12.4 / §5.13.1): a non-local attention block that turns
//! stage features of a sample pair into a pixel mask `N×2×H×W`.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::VarMap;
use rand::RngCore;

use crate::config::{AutoMixConfig, Upsampling, Variant};
use crate::params::{fill_const, fill_normal, softmax_last, var};

/// SAMix λ reshaping `r(λ) = (4/3·λ³ − 2λ² + k'λ) / (k' − 2/3)` with `k' = k + 1`
/// (`r(0)=0`, `r(0.5)=0.5`, `r(1)=1`).
pub fn samix_lam_rescale(lambda: f64, k: f64) -> f64 {
    let kp = k + 1.0;
    (4.0 / 3.0 * lambda.powi(3) - 2.0 * lambda.powi(2) + kp * lambda) / (kp - 2.0 / 3.0)
}

/// The `out_len × in_len` matrix `A` with `upsampled = A · x` along one axis, following
/// PyTorch's `interpolate` (nearest: `src = floor(i·in/out)`; bilinear, `align_corners=false`:
/// `src = max((i + ½)·in/out − ½, 0)`). Used as a matmul because candle has no bilinear backward.
pub fn upsample_matrix(
    in_len: usize,
    out_len: usize,
    mode: Upsampling,
    dev: &Device,
) -> Result<Tensor> {
    let scale = in_len as f64 / out_len as f64;
    let mut a = vec![0f32; out_len * in_len];
    for i in 0..out_len {
        let row = &mut a[i * in_len..(i + 1) * in_len];
        match mode {
            Upsampling::Nearest => {
                let src = ((i as f64 * scale).floor() as usize).min(in_len - 1);
                row[src] = 1.0;
            }
            Upsampling::Bilinear => {
                let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(in_len - 1);
                let i1 = (i0 + 1).min(in_len - 1);
                let w1 = (src - i0 as f64) as f32;
                row[i0] += 1.0 - w1;
                row[i1] += w1;
            }
        }
    }
    Tensor::from_vec(a, (out_len, in_len), dev)
}

/// 2-D batch normalisation (eps 1e-5, momentum 0.1, PyTorch conventions) whose running
/// statistics live in the VarMap as `running_mean` / `running_var`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Var,
    bias: Var,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    const EPS: f64 = 1e-5;
    const MOMENTUM: f64 = 0.1;

    fn new(vm: &VarMap, prefix: &str, channels: usize, dev: &Device) -> Result<Self> {
        Ok(Self {
            weight: var(vm, &format!("{prefix}.weight"), channels, dev)?,
            bias: var(vm, &format!("{prefix}.bias"), channels, dev)?,
            running_mean: var(vm, &format!("{prefix}.running_mean"), channels, dev)?,
            running_var: var(vm, &format!("{prefix}.running_var"), channels, dev)?,
        })
    }

    fn reset(&self) -> Result<()> {
        fill_const(&self.weight, 1.0)?;
        fill_const(&self.bias, 0.0)?;
        fill_const(&self.running_mean, 0.0)?;
        fill_const(&self.running_var, 1.0)
    }

    /// `x`: `N×C×L`. Train mode normalises with the biased batch statistics and updates the
    /// running statistics (unbiased variance); eval mode uses the running statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        let (mean, var) = if train {
            let count = x.dim(0)? * x.dim(2)?;
            let mean = x.mean_keepdim(2)?.mean_keepdim(0)?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
            let unbiased = (var.detach() * (count as f64 / (count.max(2) - 1) as f64))?;
            let m = Self::MOMENTUM;
            let rm = ((self.running_mean.as_tensor().detach() * (1.0 - m))?
                + (mean.detach().flatten_all()? * m)?)?;
            let rv = ((self.running_var.as_tensor().detach() * (1.0 - m))?
                + (unbiased.flatten_all()? * m)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().detach().reshape((1, c, 1))?,
                self.running_var.as_tensor().detach().reshape((1, c, 1))?,
            )
        };
        let inv_std = (var + Self::EPS)?.sqrt()?.recip()?;
        let scale = self.weight.as_tensor().reshape((1, c, 1))?;
        let shift = self.bias.as_tensor().reshape((1, c, 1))?;
        x.broadcast_sub(&mean)?
            .broadcast_mul(&inv_std)?
            .broadcast_mul(&scale)?
            .broadcast_add(&shift)
    }
}

/// 1×1 convolution stored as an `out×in×1×1` weight (plus optional bias), applied as a matmul
/// on `N×in×L`.
#[derive(Debug, Clone)]
struct Conv1x1 {
    weight: Var,
    bias: Option<Var>,
    out_ch: usize,
    in_ch: usize,
}

impl Conv1x1 {
    fn new(
        vm: &VarMap,
        prefix: &str,
        in_ch: usize,
        out_ch: usize,
        bias: bool,
        dev: &Device,
    ) -> Result<Self> {
        let weight = var(vm, &format!("{prefix}.weight"), (out_ch, in_ch, 1, 1), dev)?;
        let bias = if bias {
            Some(var(vm, &format!("{prefix}.bias"), out_ch, dev)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            out_ch,
            in_ch,
        })
    }

    /// Upstream init of the MixBlock: conv weights `N(0, 0.01²)`, bias 0.
    fn reset(&self, rng: &mut dyn RngCore) -> Result<()> {
        fill_normal(&self.weight, 0.01, rng)?;
        if let Some(b) = &self.bias {
            fill_const(b, 0.0)?;
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor().reshape((self.out_ch, self.in_ch))?;
        let y = w.broadcast_matmul(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().reshape((1, self.out_ch, 1))?),
            None => Ok(y),
        }
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        v
    }
}

/// How the value map `v` is computed from the partner features.
#[derive(Debug, Clone)]
enum ValueNet {
    /// AutoMix: conv1×1 `C → 1` with bias.
    Linear(Conv1x1),
    /// SAMix `ConvNeck`: conv1×1 `C → H` (no bias) → BN → ELU(1) → conv1×1 `H → 1` (no bias),
    /// `H` = [`AutoMixConfig::value_neck_channels_for`] (128 for ResNet-18).
    Neck {
        conv1: Conv1x1,
        bn: BatchNorm,
        conv2: Conv1x1,
    },
}

/// The learned mask generator.
#[derive(Debug, Clone)]
pub struct MixBlock {
    variant: Variant,
    inter_channels: usize,
    scale_factor: usize,
    upsampling: Upsampling,
    lam_mul_k: f64,
    query: Conv1x1,
    /// SAMix only: separate key conv (AutoMix shares the query conv).
    key: Option<Conv1x1>,
    value: ValueNet,
}

impl MixBlock {
    /// Creates the block's variables in `vm` under `prefix` (`""` for none), for stage
    /// features with `in_channels` channels; SAMix's ConvNeck gets `value_neck_channels`
    /// hidden channels (AutoMix ignores it). Call [`MixBlock::reset`] to initialise them.
    pub fn new(
        cfg: &AutoMixConfig,
        in_channels: usize,
        value_neck_channels: usize,
        vm: &VarMap,
        prefix: &str,
        dev: &Device,
    ) -> Result<Self> {
        let inter = (in_channels / cfg.mixblock_reduction).max(1);
        let p = |s: &str| {
            if prefix.is_empty() {
                s.to_string()
            } else {
                format!("{prefix}.{s}")
            }
        };
        let (query, key, value) = match cfg.variant {
            Variant::AutoMix => (
                Conv1x1::new(vm, &p("query"), in_channels, inter, true, dev)?,
                None,
                ValueNet::Linear(Conv1x1::new(vm, &p("value"), in_channels, 1, true, dev)?),
            ),
            Variant::SAMix => {
                let hidden = value_neck_channels;
                (
                    Conv1x1::new(vm, &p("query"), 2 * in_channels, inter, true, dev)?,
                    Some(Conv1x1::new(
                        vm,
                        &p("key"),
                        2 * in_channels,
                        inter,
                        true,
                        dev,
                    )?),
                    ValueNet::Neck {
                        conv1: Conv1x1::new(
                            vm,
                            &p("value_neck.conv1"),
                            in_channels,
                            hidden,
                            false,
                            dev,
                        )?,
                        bn: BatchNorm::new(vm, &p("value_neck.bn"), hidden, dev)?,
                        conv2: Conv1x1::new(vm, &p("value_neck.conv2"), hidden, 1, false, dev)?,
                    },
                )
            }
        };
        Ok(Self {
            variant: cfg.variant,
            inter_channels: inter,
            scale_factor: 1 << cfg.mask_layer,
            upsampling: cfg.upsampling(),
            lam_mul_k: cfg.lam_mul_k,
            query,
            key,
            value,
        })
    }

    /// Upstream initialisation: convs `N(0, 0.01²)`, biases 0, BN weight 1 / bias 0 and fresh
    /// running statistics.
    pub fn reset(&self, rng: &mut dyn RngCore) -> Result<()> {
        self.query.reset(rng)?;
        if let Some(k) = &self.key {
            k.reset(rng)?;
        }
        match &self.value {
            ValueNet::Linear(c) => c.reset(rng),
            ValueNet::Neck { conv1, bn, conv2 } => {
                conv1.reset(rng)?;
                bn.reset()?;
                conv2.reset(rng)
            }
        }
    }

    /// Every variable of the block (parameters and BN buffers).
    pub fn vars(&self) -> Vec<Var> {
        let mut v = self.query.vars();
        if let Some(k) = &self.key {
            v.extend(k.vars());
        }
        match &self.value {
            ValueNet::Linear(c) => v.extend(c.vars()),
            ValueNet::Neck { conv1, bn, conv2 } => {
                v.extend(conv1.vars());
                v.extend([
                    bn.weight.clone(),
                    bn.bias.clone(),
                    bn.running_mean.clone(),
                    bn.running_var.clone(),
                ]);
                v.extend(conv2.vars());
            }
        }
        v
    }

    /// Low-resolution mask logits `N×1×h×w` for features `feats` (`N×C×h×w`), weight λ and
    /// partner index `perm`. `train` only matters for SAMix's ConvNeck BN.
    pub fn mask_logits(
        &self,
        feats: &Tensor,
        lambda: f64,
        perm: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (n, c, h, w) = feats.dims4()?;
        let l = h * w;
        let xa = feats.reshape((n, c, l))?;
        let xb = xa.index_select(perm, 0)?;
        let (q, k, v) = match (&self.value, &self.key) {
            (ValueNet::Linear(value), _) => {
                // AutoMix on CIFAR sees no λ: query and key share one conv.
                let q = self.query.forward(&xa)?;
                let k = self.query.forward(&xb)?;
                (q, k, value.forward(&xb)?)
            }
            (ValueNet::Neck { conv1, bn, conv2 }, Some(key)) => {
                let r = samix_lam_rescale(lambda, self.lam_mul_k);
                let xa = (xa * (1.0 + r))?;
                let xb = (xb * (1.0 + (1.0 - r)))?;
                let x = Tensor::cat(&[&xa, &xb], 1)?;
                let q = self.query.forward(&x)?;
                let k = key.forward(&x)?;
                let hidden = bn.forward(&conv1.forward(&xb)?, train)?.elu(1.0)?;
                (q, k, conv2.forward(&hidden)?)
            }
            (ValueNet::Neck { .. }, None) => {
                candle_core::bail!("SAMix MixBlock without a key conv")
            }
        };
        // Attention in f32 whatever the feature dtype (upstream computes it in fp32).
        let q = q.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?; // N×L×C'
        let k = k.to_dtype(DType::F32)?.contiguous()?; // N×C'×L
        let v = v.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?; // N×L×1
        let logits = (q.matmul(&k)? / (self.inter_channels as f64).sqrt())?;
        let attn = softmax_last(&logits)?;
        attn.matmul(&v)?.reshape((n, 1, h, w))
    }

    /// Full mask `N×2×H×W` (`H = h·2^mask_layer`): channel 0 weights `x`, channel 1 weights
    /// `x[π]`; channel 1 = `sigmoid(upsample(logits))`, channel 0 = `1 − channel 1`.
    pub fn forward(
        &self,
        feats: &Tensor,
        lambda: f64,
        perm: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let logits = self.mask_logits(feats, lambda, perm, train)?;
        let (_, _, h, w) = logits.dims4()?;
        let dev = logits.device();
        let a_h = upsample_matrix(h, h * self.scale_factor, self.upsampling, dev)?;
        let a_wt = upsample_matrix(w, w * self.scale_factor, self.upsampling, dev)?.t()?;
        let up = a_h.broadcast_matmul(&logits)?.broadcast_matmul(&a_wt)?;
        let m = candle_nn::ops::sigmoid(&up)?;
        Tensor::cat(&[&(1.0 - &m)?, &m], 1)
    }

    /// Which variant this block implements.
    pub fn variant(&self) -> Variant {
        self.variant
    }
}

/// Mean over everything but dim 0 of an `N×…` tensor → `N`.
pub(crate) fn per_sample_mean(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    x.reshape((n, ()))?.mean(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutoMixConfig;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn block(cfg: &AutoMixConfig, c: usize) -> (MixBlock, VarMap) {
        let vm = VarMap::new();
        let mb = MixBlock::new(cfg, c, c / 2, &vm, "mixblock", &Device::Cpu).unwrap();
        mb.reset(&mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        (mb, vm)
    }

    fn perm(n: usize) -> Tensor {
        let p: Vec<u32> = (0..n as u32).rev().collect();
        Tensor::new(p.as_slice(), &Device::Cpu).unwrap()
    }

    #[test]
    fn lam_rescale_fixed_points() {
        assert!(samix_lam_rescale(0.0, 0.25).abs() < 1e-12);
        assert!((samix_lam_rescale(0.5, 0.25) - 0.5).abs() < 1e-12);
        assert!((samix_lam_rescale(1.0, 0.25) - 1.0).abs() < 1e-12);
        // Monotone and not the identity elsewhere.
        let r = samix_lam_rescale(0.25, 0.25);
        assert!(
            r > 0.0 && r < 0.5 && (r - 0.25).abs() > 1e-3,
            "r(0.25) = {r}"
        );
    }

    #[test]
    fn upsample_matrices_match_candle_forward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 1, 8, 8), &dev).unwrap();
        for (mode, reference) in [
            (Upsampling::Nearest, x.upsample_nearest2d(32, 32).unwrap()),
            (
                Upsampling::Bilinear,
                x.upsample_bilinear2d(32, 32, false).unwrap(),
            ),
        ] {
            let a = upsample_matrix(8, 32, mode, &dev).unwrap();
            let ours = a
                .broadcast_matmul(&x)
                .unwrap()
                .broadcast_matmul(&a.t().unwrap())
                .unwrap();
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{mode:?}: max diff {diff}");
        }
    }

    #[test]
    fn mask_channels_sum_to_one_and_lie_in_open_interval() {
        for cfg in [AutoMixConfig::automix(), AutoMixConfig::samix()] {
            let (mb, _vm) = block(&cfg, 16);
            // Large features so that the logits are far from 0 and the sigmoid is stressed.
            let f = (Tensor::randn(0f32, 1., (4, 16, 8, 8), &Device::Cpu).unwrap() * 50.0).unwrap();
            let mask = mb.forward(&f, 0.3, &perm(4), true).unwrap();
            assert_eq!(mask.dims(), &[4, 2, 32, 32]);
            let sum = mask.sum(1).unwrap();
            let err = (sum - 1.0)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-6, "{:?}: channel sum off by {err}", cfg.variant);
            let min = mask.min_all().unwrap().to_scalar::<f32>().unwrap();
            let max = mask.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(
                min > 0.0 && max < 1.0,
                "{:?}: range [{min}, {max}]",
                cfg.variant
            );
        }
    }

    #[test]
    fn samix_mask_depends_on_lambda_and_automix_does_not() {
        let f = Tensor::randn(0f32, 1., (3, 16, 8, 8), &Device::Cpu).unwrap();
        for (cfg, depends) in [
            (AutoMixConfig::automix(), false),
            (AutoMixConfig::samix(), true),
        ] {
            let (mb, _vm) = block(&cfg, 16);
            // Eval mode: the ConvNeck BN must not move between the two calls.
            let a = mb.forward(&f, 0.2, &perm(3), false).unwrap();
            let b = mb.forward(&f, 0.8, &perm(3), false).unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff > 1e-7, depends, "{:?}: diff {diff}", cfg.variant);
        }
    }

    #[test]
    fn convneck_bn_updates_running_stats_only_in_train_mode() {
        let (mb, vm) = block(&AutoMixConfig::samix(), 16);
        let rm = |vm: &VarMap| {
            vm.data().lock().unwrap()["mixblock.value_neck.bn.running_mean"]
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()
        };
        let before = rm(&vm);
        let f = (Tensor::randn(0f32, 1., (4, 16, 8, 8), &Device::Cpu).unwrap() + 3.0).unwrap();
        mb.forward(&f, 0.5, &perm(4), false).unwrap();
        assert_eq!(rm(&vm), before);
        mb.forward(&f, 0.5, &perm(4), true).unwrap();
        assert_ne!(rm(&vm), before);
        assert_eq!(mb.vars().len(), vm.all_vars().len());
    }
}
