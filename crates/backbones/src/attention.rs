//! The frozen attention network of AttentiveMix+ (spec §5.7): a torchvision
//! ImageNet ResNet-18 loaded strictly from a safetensors file, or one of this
//! project's own CIFAR checkpoints.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::blocks::Stage;
use crate::cifar::{Arch, CifarResNet, CifarResNetConfig};
use crate::conv::{Conv2d, ConvSpec};
use crate::init::{InitScheme, ParamRegistry, ParamSpec};
use crate::norm::BatchNorm2d;

/// torchvision's ResNet-18 body (7×7/2 stem, BN, ReLU, 3×3/2 max-pool with
/// padding 1, stages of `b, 2b, 4b, 8b` channels with strides 1,2,2,2), returning
/// the `layer4` map (`N×8b×7×7` for 224×224 input). No classifier.
#[derive(Debug, Clone)]
pub struct ImageNetResNet18 {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: [Stage; 4],
    base_width: usize,
    registry: ParamRegistry,
}

/// Pads the two spatial dimensions with `value` on every side.
fn pad_spatial(x: &Tensor, pad: usize, value: f64) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let rows = Tensor::full(value, (n, c, pad, w), x.device())?.to_dtype(x.dtype())?;
    let x = Tensor::cat(&[&rows, x, &rows], 2)?;
    let cols = Tensor::full(value, (n, c, h + 2 * pad, pad), x.device())?.to_dtype(x.dtype())?;
    Tensor::cat(&[&cols, &x, &cols], 3)
}

impl ImageNetResNet18 {
    /// Builds the network with stem width `base_width` (64 for torchvision's
    /// ResNet-18) under torchvision names (`conv1`, `bn1`, `layer1.0.conv1`, …).
    /// Fresh variables follow PyTorch's default init (no zero-init residual):
    /// this network is only ever used with loaded weights, random ones are for tests.
    pub fn new(base_width: usize, vb: VarBuilder) -> Result<Self> {
        let mut reg = ParamRegistry::new(InitScheme::PytorchDefault);
        let stem = ConvSpec {
            in_channels: 3,
            out_channels: base_width,
            kernel: 7,
            stride: 2,
            padding: 3,
            groups: 1,
        };
        let conv1 = Conv2d::new(stem, vb.pp("conv1"), &mut reg)?;
        let bn1 = BatchNorm2d::new(base_width, false, vb.pp("bn1"), &mut reg)?;
        let mut stages = Vec::with_capacity(4);
        let mut in_ch = base_width;
        for i in 0..4 {
            let out = base_width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let svb = vb.pp(format!("layer{}", i + 1));
            stages.push(Stage::basic(in_ch, out, 2, stride, svb, &mut reg)?);
            in_ch = out;
        }
        let layers: [Stage; 4] = stages
            .try_into()
            .map_err(|_| candle_core::Error::Msg("four stages expected".into()))?;
        Ok(Self {
            conv1,
            bn1,
            layers,
            base_width,
            registry: reg,
        })
    }

    /// Loads a torchvision-named safetensors file strictly (see `load_strict`
    /// for the key rules). The stem width is read from `conv1.weight`, so the
    /// standard file gives the 64-wide network. `fc.*` keys are ignored.
    pub fn load(
        path: impl AsRef<Path>,
        prefix: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = strip_prefix(read_all(path, device)?, prefix);
        Self::from_tensors(path, prefix, tensors, dtype, device)
    }

    fn from_tensors(
        path: &Path,
        prefix: Option<&str>,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let width = match tensors.get("conv1.weight") {
            Some(t) => t.dim(0)?,
            None => candle_core::bail!(
                "{}: missing key `{}conv1.weight`",
                path.display(),
                prefix.unwrap_or("")
            ),
        };
        load_strict(path, prefix, tensors, &["fc."], dtype, device, |vb| {
            let net = Self::new(width, vb)?;
            let specs = net.registry.specs().to_vec();
            Ok((net, specs))
        })
    }

    /// Stem width.
    pub fn base_width(&self) -> usize {
        self.base_width
    }

    /// Every variable with its full name and role.
    pub fn var_specs(&self) -> &[ParamSpec] {
        self.registry.specs()
    }

    /// Overwrites the network's variables in `varmap` with seeded PyTorch-default
    /// values (see [`ParamRegistry::init_weights`]).
    pub fn init_weights(&self, varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
        self.registry.init_weights(varmap, seed)
    }

    /// The `layer4` map; BN uses batch statistics (and updates its running
    /// statistics) when `train` is true.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let h = pad_spatial(&h, 1, f64::NEG_INFINITY)?.max_pool2d_with_stride(3, 2)?;
        let mut h = h;
        for stage in &self.layers {
            h = stage.forward_t(&h, train)?;
        }
        Ok(h)
    }
}

/// The attention network of AttentiveMix+.
#[derive(Debug, Clone)]
pub enum AttentionNet {
    /// torchvision ImageNet ResNet-18 (the reference's choice).
    ImageNet(ImageNetResNet18),
    /// One of this project's CIFAR networks; images are bilinearly resized to
    /// `input_size × input_size` first (56 gives a 7×7 `layer4` map, the grid
    /// the ImageNet network produces).
    Cifar {
        /// The network (its classifier is unused).
        net: CifarResNet,
        /// Side of the resized input.
        input_size: usize,
    },
}

/// Input side at which a CIFAR network's `layer4` map is 7×7 (total stride 8).
pub const CIFAR_ATTENTION_INPUT: usize = 56;

impl AttentionNet {
    /// Loads a torchvision ResNet-18 file (see [`ImageNetResNet18::load`]).
    pub fn imagenet_from_file(
        path: impl AsRef<Path>,
        prefix: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::ImageNet(ImageNetResNet18::load(
            path,
            prefix,
            DType::F32,
            device,
        )?))
    }

    /// Loads a CIFAR checkpoint of this project strictly (every variable of
    /// `cfg`'s network, classifier included, must be present under `prefix`).
    pub fn cifar_from_file(
        path: impl AsRef<Path>,
        cfg: CifarResNetConfig,
        prefix: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = strip_prefix(read_all(path, device)?, prefix);
        Self::cifar_from_tensors(path, cfg, prefix, tensors, device)
    }

    /// Loads an attention network from a safetensors file, recognizing what it
    /// holds: the one network in the file is found by its `conv1.weight` key
    /// (bare, or under a prefix such as `backbone.` or `model.`); a 7×7 stem
    /// means a torchvision ImageNet ResNet-18, a 3×3 stem one of this project's
    /// CIFAR networks, whose configuration (architecture, width, blocks per
    /// stage, classes) is read off the key names and shapes. Loading is strict
    /// either way. A file holding several networks (e.g. an AutoMix checkpoint)
    /// needs [`Self::load_with_prefix`].
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let all = read_all(path, device)?;
        let mut prefixes: Vec<&str> = all
            .keys()
            .filter_map(|k| k.strip_suffix("conv1.weight"))
            .filter(|p| (p.is_empty() || p.ends_with('.')) && !p.contains("layer"))
            .collect();
        prefixes.sort();
        match prefixes.as_slice() {
            [p] => {
                let p = p.to_string();
                Self::from_tensors(path, Some(&p), strip_prefix(all, Some(&p)), device)
            }
            [] => candle_core::bail!(
                "{}: no `conv1.weight` key, not a ResNet checkpoint",
                path.display()
            ),
            many => candle_core::bail!(
                "{}: several networks in the file (key prefixes {many:?}); pick one with AttentionNet::load_with_prefix",
                path.display()
            ),
        }
    }

    /// Like [`Self::load`], for the network whose keys start with `prefix`
    /// (keys outside the prefix are ignored).
    pub fn load_with_prefix(
        path: impl AsRef<Path>,
        prefix: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = strip_prefix(read_all(path, device)?, prefix);
        Self::from_tensors(path, prefix, tensors, device)
    }

    fn from_tensors(
        path: &Path,
        prefix: Option<&str>,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let p = prefix.unwrap_or("");
        let stem = match tensors.get("conv1.weight") {
            Some(t) => t.dims().to_vec(),
            None => candle_core::bail!("{}: missing key `{p}conv1.weight`", path.display()),
        };
        match stem.as_slice() {
            [_, 3, 7, 7] => Ok(Self::ImageNet(ImageNetResNet18::from_tensors(
                path,
                prefix,
                tensors,
                DType::F32,
                device,
            )?)),
            [width, 3, 3, 3] => {
                let cfg = infer_cifar_config(path, p, *width, &tensors)?;
                Self::cifar_from_tensors(path, cfg, prefix, tensors, device)
            }
            other => candle_core::bail!(
                "{}: key `{p}conv1.weight` has shape {other:?}; expected a 7×7 (ImageNet) or 3×3 (CIFAR) stem over 3 channels",
                path.display()
            ),
        }
    }

    fn cifar_from_tensors(
        path: &Path,
        cfg: CifarResNetConfig,
        prefix: Option<&str>,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let net = load_strict(path, prefix, tensors, &[], DType::F32, device, |vb| {
            let net = CifarResNet::new(cfg, vb)?;
            let specs = net.var_specs().to_vec();
            Ok((net, specs))
        })?;
        Ok(Self::Cifar {
            net,
            input_size: CIFAR_ATTENTION_INPUT,
        })
    }

    /// The attention feature map of §5.7, detached: the ImageNet network sees the
    /// (still CIFAR-normalized) images bilinearly upsampled ×7
    /// (`align_corners = false`, 32→224) and runs with BatchNorm in training mode
    /// (batch statistics; running statistics are updated, as in the reference),
    /// without building an autograd graph through the images. Output
    /// `N×512×7×7` for the standard network.
    pub fn attention_features(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.detach();
        let out = match self {
            AttentionNet::ImageNet(net) => {
                let xs = x.upsample_bilinear2d_with_scale(7.0, 7.0, false)?;
                net.forward_t(&xs, true)?
            }
            AttentionNet::Cifar { net, input_size } => {
                let xs = x.upsample_bilinear2d(*input_size, *input_size, false)?;
                net.features(&xs, true)?
            }
        };
        Ok(out.detach())
    }
}

/// Reads every tensor of a safetensors file; errors name the file.
fn read_all(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| {
        candle_core::Error::Msg(format!(
            "cannot read safetensors file {}: {e}",
            path.display()
        ))
    })
}

/// Keeps the keys under `prefix`, stripped; with no prefix every key is kept.
fn strip_prefix(all: HashMap<String, Tensor>, prefix: Option<&str>) -> HashMap<String, Tensor> {
    match prefix {
        None | Some("") => all,
        Some(p) => all
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(p).map(|s| (s.to_string(), v)))
            .collect(),
    }
}

/// Reads a CIFAR network's configuration off a checkpoint's (prefix-stripped)
/// keys: ResNeXt iff blocks have a `conv3`, blocks per stage from the block
/// indices present, classes from `fc.weight`. Groups follow the crate's rule
/// for the width; a checkpoint that used other groups fails the shape check.
fn infer_cifar_config(
    path: &Path,
    prefix: &str,
    base_width: usize,
    tensors: &HashMap<String, Tensor>,
) -> Result<CifarResNetConfig> {
    let arch = if tensors.contains_key("layer1.0.conv3.weight") {
        Arch::ResNeXt50
    } else {
        Arch::ResNet18
    };
    let mut blocks = [0usize; 4];
    for (s, b) in blocks.iter_mut().enumerate() {
        while tensors.contains_key(&format!("layer{}.{}.conv1.weight", s + 1, *b)) {
            *b += 1;
        }
    }
    if let Some(s) = blocks.iter().position(|&b| b == 0) {
        candle_core::bail!(
            "{}: missing key `{prefix}layer{}.0.conv1.weight`",
            path.display(),
            s + 1
        );
    }
    let num_classes = match tensors.get("fc.weight") {
        Some(t) => t.dim(0)?,
        None => candle_core::bail!("{}: missing key `{prefix}fc.weight`", path.display()),
    };
    Ok(CifarResNetConfig {
        arch,
        base_width,
        stage_blocks: Some(blocks),
        num_classes,
        init: InitScheme::Benchmark,
    })
}

/// A `VarBuilder` backend over loaded tensors that reports a missing key or a
/// wrong shape with the key's name and the file.
struct StrictTensors {
    tensors: HashMap<String, Tensor>,
    file: String,
    prefix: String,
}

impl candle_nn::var_builder::SimpleBackend for StrictTensors {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{}: key `{}{name}` has shape {:?}, expected {:?}",
                self.file,
                self.prefix,
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("{}: missing key `{}{name}`", self.file, self.prefix),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Builds a network from `tensors` through a strict backend, then rejects keys
/// the network did not ask for, except `*.num_batches_tracked` (PyTorch's BN
/// step counter, which has no role here) and keys starting with one of
/// `ignored_prefixes`.
fn load_strict<T>(
    path: &Path,
    prefix: Option<&str>,
    tensors: HashMap<String, Tensor>,
    ignored_prefixes: &[&str],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<(T, Vec<ParamSpec>)>,
) -> Result<T> {
    let file = path.display().to_string();
    let prefix = prefix.unwrap_or("").to_string();
    let keys: Vec<String> = tensors.keys().cloned().collect();
    let backend = StrictTensors {
        tensors,
        file: file.clone(),
        prefix: prefix.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let (net, specs) = build(vb)?;
    let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut unexpected: Vec<&String> = keys
        .iter()
        .filter(|k| !wanted.contains(k.as_str()))
        .filter(|k| !k.ends_with(".num_batches_tracked"))
        .filter(|k| !ignored_prefixes.iter().any(|p| k.starts_with(p)))
        .collect();
    unexpected.sort();
    if let Some(first) = unexpected.first() {
        candle_core::bail!(
            "{file}: unexpected key `{prefix}{first}` ({} unexpected in total)",
            unexpected.len()
        );
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_pads_with_negative_infinity() {
        // All-negative input: zero padding would leak zeros into the border maxima.
        let v: Vec<f32> = (0..16).map(|i| -(i as f32) - 1.0).collect();
        let x = Tensor::from_vec(v, (1, 1, 4, 4), &Device::Cpu).unwrap();
        let y = pad_spatial(&x, 1, f64::NEG_INFINITY)
            .unwrap()
            .max_pool2d_with_stride(3, 2)
            .unwrap();
        // torch.nn.MaxPool2d(3, 2, padding=1) windows: rows/cols {0,1}, {1,2,3}.
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![-1.0, -2.0, -5.0, -6.0]);
    }
}
