//! The one place where convolutions are computed.
//!
//! Every convolution of every backbone in this crate goes through [`Conv2d`],
//! so a faster kernel can be swapped in here without touching the networks.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::init::{ParamKind, ParamRegistry};

/// A bias-free 2-D convolution (`weight`: `out × in/groups × k × k`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    /// `weight.detach()`, made once: same storage (updates in place reach it), no graph.
    weight_untracked: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
}

/// Shape of one convolution layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel side.
    pub kernel: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub padding: usize,
    /// Channel groups; must divide both channel counts.
    pub groups: usize,
}

impl Conv2d {
    /// Creates (or loads) the weight `<prefix>.weight` and records it for initialization.
    pub fn new(spec: ConvSpec, vb: VarBuilder, reg: &mut ParamRegistry) -> Result<Self> {
        let ConvSpec {
            in_channels,
            out_channels,
            kernel,
            groups,
            ..
        } = spec;
        if groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
            candle_core::bail!(
                "conv `{}`: groups {groups} must divide in ({in_channels}) and out ({out_channels}) channels",
                vb.prefix()
            );
        }
        let kind = ParamKind::ConvWeight {
            fan_in: in_channels / groups * kernel * kernel,
            fan_out: out_channels * kernel * kernel,
        };
        let shape = (out_channels, in_channels / groups, kernel, kernel);
        let weight = reg.get(&vb, shape, "weight", kind)?;
        Ok(Self {
            weight_untracked: weight.detach(),
            weight,
            stride: spec.stride,
            padding: spec.padding,
            groups,
        })
    }

    /// The kernel tensor.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the convolution to an `N×C×H×W` batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The kernels crate's op computes the backward with GEMMs (candle's own
        // input gradient is a naive transposed convolution) and runs every group
        // in one call; on CUDA (feature `cudnn`) it runs cuDNN forward/backward-data/
        // backward-filter; elsewhere it falls back to candle's conv2d.
        kernels::conv2d(x, &self.weight, self.params())
    }

    /// The convolution as [`Self::forward`], outside candle's autograd (weight detached): a
    /// step of the taped training forward (`crate::tape`).
    pub(crate) fn forward_untracked(&self, x: &Tensor) -> Result<Tensor> {
        kernels::conv2d(&x.detach(), &self.weight_untracked, self.params())
    }

    /// Backward of [`Self::forward_untracked`] at input `x`: pushes the weight's gradient to
    /// `sink` and returns the input's if `need_input`.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        grad_out: &Tensor,
        need_input: bool,
        sink: &mut crate::tape::GradSink,
    ) -> Result<Option<Tensor>> {
        let need_w = self.weight.track_op();
        let (gx, gw) = kernels::conv2d_backward(
            x,
            &self.weight_untracked,
            grad_out,
            self.params(),
            need_input,
            need_w,
        )?;
        if let Some(gw) = gw {
            sink.push(&self.weight, gw);
        }
        Ok(gx)
    }

    fn params(&self) -> kernels::ConvParams {
        kernels::ConvParams {
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
        }
    }
}
