//! CIFAR ResNet-18 / ResNeXt-50 32×4d with the ManifoldMix hook (spec §2.2–§2.5).

use candle_core::{Result, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use mix_ops::mixup::mixup_blend;
use mix_ops::FeatureMix;
use serde::{Deserialize, Serialize};

use crate::blocks::{Block, Stage};
use crate::conv::{Conv2d, ConvSpec};
use crate::init::{InitScheme, ParamKind, ParamRegistry, ParamSpec};
use crate::norm::BatchNorm2d;
use crate::tape::{self, LayerTape, TapeGrads};

/// Which residual network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Arch {
    /// ResNet-18: BasicBlocks `[2,2,2,2]`, stage widths `b, 2b, 4b, 8b`.
    #[default]
    ResNet18,
    /// ResNeXt-50 32×4d: Bottlenecks `[3,4,6,3]`, stage outputs `4b, 8b, 16b, 32b`.
    ResNeXt50,
}

/// Configuration of a [`CifarResNet`].
///
/// Channel rule for `base_width = b` (stem width; 64 in the benchmark):
/// * ResNet-18: stage `i ∈ 0..4` has `b·2^i` channels.
/// * ResNeXt-50: stage `i` outputs `4·b·2^i` channels; its grouped 3×3 conv has
///   `mid = 2·b·2^i` channels (128, 256, 512, 1024 at `b = 64`, i.e. 32 groups × 4
///   channels × `2^i`), and `groups = gcd(32, 2·b)` so that the group count divides
///   every stage's `mid`. For any `b` that is a multiple of 16 this is 32 groups
///   (the benchmark's 32×4d); tiny test widths get fewer groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CifarResNetConfig {
    /// Network family.
    pub arch: Arch,
    /// Stem width (64 in the benchmark).
    pub base_width: usize,
    /// Blocks per stage; `None` = the architecture's (`[2,2,2,2]` / `[3,4,6,3]`).
    pub stage_blocks: Option<[usize; 4]>,
    /// Classifier outputs.
    pub num_classes: usize,
    /// Initialization recipe.
    pub init: InitScheme,
}

impl Default for CifarResNetConfig {
    /// The benchmark's ResNet-18 (10 classes, benchmark init).
    fn default() -> Self {
        Self {
            arch: Arch::ResNet18,
            base_width: 64,
            stage_blocks: None,
            num_classes: 10,
            init: InitScheme::Benchmark,
        }
    }
}

impl CifarResNetConfig {
    /// The benchmark's ResNeXt-50 32×4d (10 classes, benchmark init).
    pub fn resnext50() -> Self {
        Self {
            arch: Arch::ResNeXt50,
            ..Self::default()
        }
    }

    /// Blocks per stage after applying the default.
    pub fn blocks(&self) -> [usize; 4] {
        self.stage_blocks.unwrap_or(match self.arch {
            Arch::ResNet18 => [2, 2, 2, 2],
            Arch::ResNeXt50 => [3, 4, 6, 3],
        })
    }

    /// Group count of the ResNeXt grouped convolutions (see the channel rule above).
    pub fn groups(&self) -> usize {
        gcd(32, 2 * self.base_width)
    }

    /// Output channels of stage `stage` (0 = stem, 1..=4 = `layer1..layer4`).
    pub fn stage_channels(&self, stage: usize) -> usize {
        let b = self.base_width;
        match (stage, self.arch) {
            (0, _) => b,
            (s, Arch::ResNet18) => b << (s - 1),
            (s, Arch::ResNeXt50) => (4 * b) << (s - 1),
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Classification head (spec §2.4): global average pool, then `Linear(in → classes)` with bias.
#[derive(Debug, Clone)]
pub struct ClsHead {
    weight: Tensor,
    bias: Tensor,
}

impl ClsHead {
    /// Creates (or loads) `<prefix>.weight` (`classes × in`) and `<prefix>.bias`.
    pub fn new(
        in_channels: usize,
        num_classes: usize,
        vb: VarBuilder,
        reg: &mut ParamRegistry,
    ) -> Result<Self> {
        let fan_in = in_channels;
        let weight = reg.get(
            &vb,
            (num_classes, in_channels),
            "weight",
            ParamKind::LinearWeight { fan_in },
        )?;
        let bias = reg.get(&vb, num_classes, "bias", ParamKind::LinearBias { fan_in })?;
        Ok(Self { weight, bias })
    }

    /// Logits `N×classes` from an `N×C×h×w` feature map.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let pooled = features.mean((2, 3))?;
        pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// A CIFAR-variant ResNet (3×3/1 stem, no max-pool, stage strides 1,2,2,2) with
/// the classification head, the ManifoldMix hook and stage-wise forwards.
///
/// Variable names follow torchvision: `conv1`, `bn1`, `layer{1..4}.{i}.conv{1,2,3}`,
/// `.bn{1,2,3}`, `.downsample.{0,1}`, `fc`.
#[derive(Debug, Clone)]
pub struct CifarResNet {
    cfg: CifarResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: [Stage; 4],
    fc: ClsHead,
    registry: ParamRegistry,
}

impl CifarResNet {
    /// Builds the network. With a `VarBuilder::from_varmap` builder the variables
    /// are created with the configured scheme (candle's RNG); call
    /// [`Self::init_weights`] to make them a function of a seed.
    pub fn new(cfg: CifarResNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.base_width == 0 || cfg.num_classes == 0 {
            candle_core::bail!("CifarResNetConfig: base_width and num_classes must be positive");
        }
        if cfg.blocks().contains(&0) {
            candle_core::bail!("CifarResNetConfig: every stage needs at least one block");
        }
        let mut reg = ParamRegistry::new(cfg.init);
        let b = cfg.base_width;
        let stem = ConvSpec {
            in_channels: 3,
            out_channels: b,
            kernel: 3,
            stride: 1,
            padding: 1,
            groups: 1,
        };
        let conv1 = Conv2d::new(stem, vb.pp("conv1"), &mut reg)?;
        let bn1 = BatchNorm2d::new(b, false, vb.pp("bn1"), &mut reg)?;
        let blocks = cfg.blocks();
        let mut stages = Vec::with_capacity(4);
        let mut in_ch = b;
        for (i, &n) in blocks.iter().enumerate() {
            let out = cfg.stage_channels(i + 1);
            let stride = if i == 0 { 1 } else { 2 };
            let svb = vb.pp(format!("layer{}", i + 1));
            let stage = match cfg.arch {
                Arch::ResNet18 => Stage::basic(in_ch, out, n, stride, svb, &mut reg)?,
                Arch::ResNeXt50 => {
                    let mid = (2 * b) << i;
                    Stage::bottleneck(in_ch, mid, out, cfg.groups(), n, stride, svb, &mut reg)?
                }
            };
            stages.push(stage);
            in_ch = out;
        }
        let layers: [Stage; 4] = stages
            .try_into()
            .map_err(|_| candle_core::Error::Msg("four stages expected".into()))?;
        let fc = ClsHead::new(in_ch, cfg.num_classes, vb.pp("fc"), &mut reg)?;
        Ok(Self {
            cfg,
            conv1,
            bn1,
            layers,
            fc,
            registry: reg,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &CifarResNetConfig {
        &self.cfg
    }

    /// Classifier outputs.
    pub fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }

    /// Channels of the output of `stage` (0 = stem, 1..=4 = `layer1..layer4`).
    pub fn feature_channels(&self, stage: usize) -> usize {
        self.cfg.stage_channels(stage)
    }

    /// The classification head (GAP + FC).
    pub fn head(&self) -> &ClsHead {
        &self.fc
    }

    /// Every variable of the network (parameters and buffers) with its full name and role.
    pub fn var_specs(&self) -> &[ParamSpec] {
        self.registry.specs()
    }

    /// Overwrites all variables in `varmap` (which must be the map the network was
    /// built from) with the configured scheme, drawing from `ChaCha8Rng::seed_from_u64(seed)`.
    pub fn init_weights(&self, varmap: &VarMap, seed: u64) -> Result<()> {
        self.registry.init_weights(varmap, seed)
    }

    fn stage_forward(&self, x: &Tensor, stage: usize, train: bool) -> Result<Tensor> {
        match stage {
            0 => self.bn1.forward_relu_t(&self.conv1.forward(x)?, train),
            1..=4 => self.layers[stage - 1].forward_t(x, train),
            _ => candle_core::bail!("stage index {stage} out of range 0..=4"),
        }
    }

    /// Output of `stage` (0 = stem after ReLU, 1..=4 = `layer1..layer4`) for images `x`.
    pub fn forward_until(&self, x: &Tensor, stage: usize, train: bool) -> Result<Tensor> {
        if stage > 4 {
            candle_core::bail!("forward_until: stage {stage} out of range 0..=4");
        }
        let mut h = x.clone();
        for s in 0..=stage {
            h = self.stage_forward(&h, s, train)?;
        }
        Ok(h)
    }

    /// Logits from `z`, the output of `stage`, running the remaining stages and the head.
    pub fn forward_from(&self, z: &Tensor, stage: usize, train: bool) -> Result<Tensor> {
        if stage > 4 {
            candle_core::bail!("forward_from: stage {stage} out of range 0..=4");
        }
        let mut h = z.clone();
        for s in stage + 1..=4 {
            h = self.stage_forward(&h, s, train)?;
        }
        self.fc.forward(&h)
    }

    /// The `layer4` feature map.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_until(x, 4, train)
    }

    /// Logits, optionally mixing features on the way (ManifoldMix, spec §2.5):
    /// `layer 0` mixes the input before the stem, `layer L ∈ 1..=3` mixes the output
    /// of stage `L`, as `z ← λ·z + (1−λ)·z[π]` with gradients through both terms.
    pub fn forward_mix(&self, x: &Tensor, train: bool, mix: Option<&FeatureMix>) -> Result<Tensor> {
        let Some(mix) = mix else {
            return self.forward_t(x, train);
        };
        if mix.layer > 3 {
            candle_core::bail!(
                "FeatureMix.layer must be in 0..=3 (0 = input, L = output of stage L), got {}",
                mix.layer
            );
        }
        let n = x.dim(0)?;
        if mix.perm.dims() != [n] {
            candle_core::bail!(
                "FeatureMix.perm must have shape [{n}] (the batch size), got {:?}",
                mix.perm.dims()
            );
        }
        let mut h = if mix.layer == 0 {
            mixup_blend(x, &mix.perm, mix.lambda)?
        } else {
            x.clone()
        };
        for s in 0..=4 {
            h = self.stage_forward(&h, s, train)?;
            if s >= 1 && s == mix.layer {
                h = mixup_blend(&h, &mix.perm, mix.lambda)?;
            }
        }
        self.fc.forward(&h)
    }

    /// Logits.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_from(&self.forward_until(x, 4, train)?, 4, train)
    }

    /// Training-mode logits, the same values as `forward_mix(x, true, mix)`, with the
    /// backbone's backward run by the backbone ([`crate::tape`]) when it can: no feature mix
    /// and the conditions of [`Self::features_train`]. Then the second value holds the
    /// backbone parameters' gradients once candle's `backward` has run; add them to its
    /// `GradStore` with [`TapeGrads::add_to`] (the head's are in the `GradStore` already).
    /// Otherwise it is `None` and candle's autograd carries every gradient.
    pub fn forward_train(
        &self,
        x: &Tensor,
        mix: Option<&FeatureMix>,
    ) -> Result<(Tensor, Option<TapeGrads>)> {
        if mix.is_some() {
            return Ok((self.forward_mix(x, true, mix)?, None));
        }
        let (features, tape) = self.features_train(x)?;
        Ok((self.fc.forward(&features)?, tape))
    }

    /// Training-mode `layer4` features, the same values as `features(x, true)`, taped as
    /// [`Self::forward_train`] when it can: tensors the fused ops cover, and trained weights or
    /// an input that needs a gradient (a frozen network, as AutoMix's momentum encoder, then
    /// computes only the input's). Otherwise candle's autograd.
    pub fn features_train(&self, x: &Tensor) -> Result<(Tensor, Option<TapeGrads>)> {
        let needs_backward = self.conv1.weight().track_op() || x.track_op();
        if !needs_backward || !kernels::fused_ops_cover(x) {
            return Ok((self.features(x, true)?, None));
        }
        let (features, grads) = self.features_taped(x, true)?;
        Ok((features, Some(grads)))
    }

    /// Evaluation-mode logits, the same values as `forward_t(x, false)`. For a frozen network
    /// (built over [`crate::DetachedVarMap`]) and an input that needs a gradient, the backbone's
    /// backward is taped ([`crate::tape`]) and computes the input's gradient alone: PuzzleMix's
    /// saliency pass. Otherwise candle's autograd.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let frozen = !self.conv1.weight().track_op();
        if !(frozen && x.track_op() && kernels::fused_ops_cover(x)) {
            return self.forward_t(x, false);
        }
        let (features, _no_grads) = self.features_taped(x, false)?;
        self.fc.forward(&features)
    }

    /// `layer4` features computed outside candle's autograd (BatchNorm in training mode if
    /// `train`), attached to `x`'s graph through one node whose backward replays the blocks in
    /// reverse; the backbone's parameter gradients arrive in the returned [`TapeGrads`].
    fn features_taped(&self, x: &Tensor, train: bool) -> Result<(Tensor, TapeGrads)> {
        let anchor = self.conv1.weight();
        let need_input = x.track_op();
        let stem_pre = self.conv1.forward_untracked(x)?;
        let (mut h, stem_stats) = self.bn1.forward_taped(&stem_pre, true, train)?;
        let stem = LayerTape {
            input: x.detach(),
            pre_bn: stem_pre,
            stats: stem_stats,
        };
        let mut tapes = Vec::new();
        for block in self.layers.iter().flat_map(|s| s.blocks()) {
            let (y, tape) = block.forward_taped(&h, train)?;
            tapes.push(tape);
            h = y;
        }
        let grads = TapeGrads::default();
        let (net, out) = (self.clone(), grads.clone());
        let backward = move |grad: &Tensor| {
            tape::collect(&out, |sink| {
                let mut tapes = tapes;
                let mut g = grad.clone();
                let blocks: Vec<&Block> = net.layers.iter().flat_map(|s| s.blocks()).collect();
                for block in blocks.iter().rev() {
                    // Each block's saved activations are freed as soon as its backward is done.
                    let tape = tapes.pop().expect("one tape per block");
                    g = block.backward(&tape, &g, train, sink)?;
                }
                let g = net
                    .bn1
                    .backward_taped(&stem.pre_bn, &stem.stats, &g, true, train, sink)?;
                net.conv1.backward(&stem.input, &g, need_input, sink)
            })
        };
        let features = tape::attach(x, anchor, h, Box::new(backward))?;
        Ok((features, grads))
    }
}

impl ModuleT for CifarResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        CifarResNet::forward_t(self, xs, train)
    }
}
