//! Residual blocks (spec §2.1), shared by the CIFAR and ImageNet networks.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::conv::{Conv2d, ConvSpec};
use crate::init::ParamRegistry;
use crate::norm::BatchNorm2d;
use crate::tape::{BlockTape, GradSink, LayerTape};

fn conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    vb: VarBuilder,
    reg: &mut ParamRegistry,
) -> Result<Conv2d> {
    let spec = ConvSpec {
        in_channels,
        out_channels,
        kernel,
        stride,
        padding: kernel / 2,
        groups,
    };
    Conv2d::new(spec, vb, reg)
}

/// Shortcut projection `conv1×1(stride) → BN`, named `downsample.0` / `downsample.1`.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Downsample {
    /// Present iff `stride ≠ 1` or the channel count changes.
    fn maybe_new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        vb: VarBuilder,
        reg: &mut ParamRegistry,
    ) -> Result<Option<Self>> {
        if stride == 1 && in_channels == out_channels {
            return Ok(None);
        }
        let vb = vb.pp("downsample");
        Ok(Some(Self {
            conv: conv(in_channels, out_channels, 1, stride, 1, vb.pp("0"), reg)?,
            bn: BatchNorm2d::new(out_channels, false, vb.pp("1"), reg)?,
        }))
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, train)
    }
}

fn shortcut(ds: &Option<Downsample>, x: &Tensor, train: bool) -> Result<Tensor> {
    match ds {
        Some(ds) => ds.forward_t(x, train),
        None => Ok(x.clone()),
    }
}

/// Two 3×3 convolutions (expansion 1).
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<Downsample>,
}

impl BasicBlock {
    /// `BasicBlock(in, out, stride)`; `bn2` is the zero-init residual BN.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        vb: VarBuilder,
        reg: &mut ParamRegistry,
    ) -> Result<Self> {
        Ok(Self {
            conv1: conv(in_channels, out_channels, 3, stride, 1, vb.pp("conv1"), reg)?,
            bn1: BatchNorm2d::new(out_channels, false, vb.pp("bn1"), reg)?,
            conv2: conv(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"), reg)?,
            bn2: BatchNorm2d::new(out_channels, true, vb.pp("bn2"), reg)?,
            downsample: Downsample::maybe_new(in_channels, out_channels, stride, vb, reg)?,
        })
    }

    /// `ReLU(BN2(conv2(ReLU(BN1(conv1(x))))) + shortcut(x))`; the residual add+ReLU is one
    /// fused op (`kernels::add_relu`).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        kernels::add_relu(&h, &shortcut(&self.downsample, x, train)?)
    }
}

/// 1×1 → grouped 3×3 (stride here, `style='pytorch'`) → 1×1 (expansion 4).
#[derive(Debug, Clone)]
pub struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    downsample: Option<Downsample>,
}

impl Bottleneck {
    /// `Bottleneck(in, out, stride)` with `mid` channels in the grouped conv;
    /// `bn3` is the zero-init residual BN.
    pub fn new(
        in_channels: usize,
        mid_channels: usize,
        out_channels: usize,
        stride: usize,
        groups: usize,
        vb: VarBuilder,
        reg: &mut ParamRegistry,
    ) -> Result<Self> {
        Ok(Self {
            conv1: conv(in_channels, mid_channels, 1, 1, 1, vb.pp("conv1"), reg)?,
            bn1: BatchNorm2d::new(mid_channels, false, vb.pp("bn1"), reg)?,
            conv2: conv(
                mid_channels,
                mid_channels,
                3,
                stride,
                groups,
                vb.pp("conv2"),
                reg,
            )?,
            bn2: BatchNorm2d::new(mid_channels, false, vb.pp("bn2"), reg)?,
            conv3: conv(mid_channels, out_channels, 1, 1, 1, vb.pp("conv3"), reg)?,
            bn3: BatchNorm2d::new(out_channels, true, vb.pp("bn3"), reg)?,
            downsample: Downsample::maybe_new(in_channels, out_channels, stride, vb, reg)?,
        })
    }

    /// `ReLU(BN3(conv3(…)) + shortcut(x))`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let h = self.bn2.forward_relu_t(&self.conv2.forward(&h)?, train)?;
        let h = self.bn3.forward_t(&self.conv3.forward(&h)?, train)?;
        kernels::add_relu(&h, &shortcut(&self.downsample, x, train)?)
    }
}

/// A block's main path as `(conv, bn, relu after the bn)` layers, in order.
type Layers<'a> = Vec<(&'a Conv2d, &'a BatchNorm2d, bool)>;

/// Forward of a block outside candle's autograd (BatchNorm in training mode if `train`, else
/// in evaluation mode), keeping what its backward needs.
fn block_forward_taped(
    layers: &Layers<'_>,
    downsample: &Option<Downsample>,
    x: &Tensor,
    train: bool,
) -> Result<(Tensor, BlockTape)> {
    let mut h = x.clone();
    let mut saved = Vec::with_capacity(layers.len());
    for (conv, bn, relu) in layers {
        let pre_bn = conv.forward_untracked(&h)?;
        let (y, stats) = bn.forward_taped(&pre_bn, *relu, train)?;
        saved.push(LayerTape {
            input: h,
            pre_bn,
            stats,
        });
        h = y;
    }
    let (shortcut, shortcut_tape) = match downsample {
        Some(ds) => {
            let pre_bn = ds.conv.forward_untracked(x)?;
            let (y, stats) = ds.bn.forward_taped(&pre_bn, false, train)?;
            let tape = LayerTape {
                input: x.clone(),
                pre_bn,
                stats,
            };
            (y, Some(tape))
        }
        None => (x.clone(), None),
    };
    let out = kernels::add_relu(&h, &shortcut)?;
    Ok((
        out,
        BlockTape {
            layers: saved,
            shortcut: shortcut_tape,
            residual: (h, shortcut),
        },
    ))
}

/// Backward of [`block_forward_taped`] (same `train`): parameter gradients into `sink`,
/// returns the input's.
fn block_backward(
    layers: &Layers<'_>,
    downsample: &Option<Downsample>,
    tape: &BlockTape,
    grad_out: &Tensor,
    train: bool,
    sink: &mut GradSink,
) -> Result<Tensor> {
    let (main, shortcut) = (&tape.residual.0, &tape.residual.1);
    let grad_sum = kernels::add_relu_backward(main, shortcut, grad_out)?;
    let mut g = grad_sum.clone();
    for ((conv, bn, relu), saved) in layers.iter().zip(&tape.layers).rev() {
        let grad_pre_bn = bn.backward_taped(&saved.pre_bn, &saved.stats, &g, *relu, train, sink)?;
        g = conv
            .backward(&saved.input, &grad_pre_bn, true, sink)?
            .expect("input gradient requested");
    }
    let grad_shortcut = match (downsample, &tape.shortcut) {
        (Some(ds), Some(saved)) => {
            let grad_pre_bn =
                ds.bn
                    .backward_taped(&saved.pre_bn, &saved.stats, &grad_sum, false, train, sink)?;
            ds.conv
                .backward(&saved.input, &grad_pre_bn, true, sink)?
                .expect("input gradient requested")
        }
        _ => grad_sum,
    };
    g + grad_shortcut
}

/// Either kind of residual block.
#[derive(Debug, Clone)]
pub enum Block {
    /// ResNet-18 block.
    Basic(BasicBlock),
    /// ResNeXt block.
    Bottleneck(Bottleneck),
}

impl Block {
    /// Runs the block.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward_t(x, train),
            Block::Bottleneck(b) => b.forward_t(x, train),
        }
    }

    fn layers(&self) -> (Layers<'_>, &Option<Downsample>) {
        match self {
            Block::Basic(b) => (
                vec![(&b.conv1, &b.bn1, true), (&b.conv2, &b.bn2, false)],
                &b.downsample,
            ),
            Block::Bottleneck(b) => (
                vec![
                    (&b.conv1, &b.bn1, true),
                    (&b.conv2, &b.bn2, true),
                    (&b.conv3, &b.bn3, false),
                ],
                &b.downsample,
            ),
        }
    }

    /// Forward outside candle's autograd (`crate::tape`), with what its backward needs; the
    /// same ops and values as `forward_t(x, train)`.
    pub(crate) fn forward_taped(&self, x: &Tensor, train: bool) -> Result<(Tensor, BlockTape)> {
        let (layers, downsample) = self.layers();
        block_forward_taped(&layers, downsample, x, train)
    }

    /// Backward of [`Self::forward_taped`] (same `train`): parameter gradients into `sink`,
    /// returns the input's gradient.
    pub(crate) fn backward(
        &self,
        tape: &BlockTape,
        grad_out: &Tensor,
        train: bool,
        sink: &mut GradSink,
    ) -> Result<Tensor> {
        let (layers, downsample) = self.layers();
        block_backward(&layers, downsample, tape, grad_out, train, sink)
    }
}

/// One stage (`layer1` … `layer4`): a sequence of blocks named `0`, `1`, ….
#[derive(Debug, Clone)]
pub struct Stage {
    blocks: Vec<Block>,
    out_channels: usize,
}

impl Stage {
    /// A stage of `num_blocks` ResNet BasicBlocks; only the first one strides.
    pub fn basic(
        in_channels: usize,
        out_channels: usize,
        num_blocks: usize,
        stride: usize,
        vb: VarBuilder,
        reg: &mut ParamRegistry,
    ) -> Result<Self> {
        let mut blocks = Vec::with_capacity(num_blocks);
        for i in 0..num_blocks {
            let (cin, s) = if i == 0 {
                (in_channels, stride)
            } else {
                (out_channels, 1)
            };
            blocks.push(Block::Basic(BasicBlock::new(
                cin,
                out_channels,
                s,
                vb.pp(i),
                reg,
            )?));
        }
        Ok(Self {
            blocks,
            out_channels,
        })
    }

    /// A stage of `num_blocks` ResNeXt bottlenecks; only the first one strides.
    #[allow(clippy::too_many_arguments)]
    pub fn bottleneck(
        in_channels: usize,
        mid_channels: usize,
        out_channels: usize,
        groups: usize,
        num_blocks: usize,
        stride: usize,
        vb: VarBuilder,
        reg: &mut ParamRegistry,
    ) -> Result<Self> {
        let mut blocks = Vec::with_capacity(num_blocks);
        for i in 0..num_blocks {
            let (cin, s) = if i == 0 {
                (in_channels, stride)
            } else {
                (out_channels, 1)
            };
            blocks.push(Block::Bottleneck(Bottleneck::new(
                cin,
                mid_channels,
                out_channels,
                s,
                groups,
                vb.pp(i),
                reg,
            )?));
        }
        Ok(Self {
            blocks,
            out_channels,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The blocks, in order.
    pub(crate) fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Runs the blocks in order.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        Ok(h)
    }
}
