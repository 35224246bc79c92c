//! CIFAR ResNet-18 / ResNeXt-50 32×4d backbones with a classification head,
//! the ManifoldMix feature-mixing hook and stage-wise forwards (AutoMix), plus
//! the frozen ImageNet ResNet-18 attention network of AttentiveMix+.
//!
//! All variables (BatchNorm running statistics included) live in a candle
//! `VarMap` under torchvision-like names; [`is_buffer`] tells buffers from
//! trained parameters. Convolutions and batch normalization are each computed
//! in exactly one place ([`conv::Conv2d`], [`norm::BatchNorm2d`]) so faster
//! kernels can be swapped in.
//!
//! ```
//! use backbones::{param_count, Arch, CifarResNet, CifarResNetConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! // A tiny ResNet-18 (the benchmark uses `CifarResNetConfig::default()`).
//! let cfg = CifarResNetConfig {
//!     arch: Arch::ResNet18,
//!     base_width: 4,
//!     stage_blocks: Some([1, 1, 1, 1]),
//!     ..Default::default()
//! };
//! let net = CifarResNet::new(cfg, vb)?;
//! net.init_weights(&varmap, 42)?; // deterministic from the seed
//! let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &dev)?;
//! let logits = net.forward_t(&x, true)?;
//! assert_eq!(logits.dims(), &[2, 10]);
//! assert_eq!(net.forward_until(&x, 3, false)?.dims(), &[2, 16, 8, 8]);
//! assert!(param_count(&varmap) > 0);
//! # Ok(())
//! # }
//! ```

pub mod attention;
pub mod blocks;
pub mod cifar;
pub mod conv;
pub mod frozen;
pub mod init;
pub mod norm;
pub mod tape;

pub use attention::{AttentionNet, ImageNetResNet18, CIFAR_ATTENTION_INPUT};
pub use cifar::{Arch, CifarResNet, CifarResNetConfig, ClsHead};
pub use frozen::DetachedVarMap;
pub use init::{InitScheme, ParamKind, ParamRegistry, ParamSpec};
/// The custom ops the backbones run on (re-exported so the runner can set their precision and
/// determinism without a direct dependency).
pub use kernels;
pub use norm::BatchNorm2d;
pub use tape::TapeGrads;

use candle_nn::VarMap;

/// Whether a `VarMap` entry is a buffer (BatchNorm running statistic or step
/// counter) that the optimizer must skip, judged by its name.
pub fn is_buffer(var_name: &str) -> bool {
    var_name.ends_with("running_mean")
        || var_name.ends_with("running_var")
        || var_name.ends_with("num_batches_tracked")
}

/// Number of trainable scalars in `varmap` (every variable that is not a buffer).
pub fn param_count(varmap: &VarMap) -> usize {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| !is_buffer(name))
        .map(|(_, v)| v.elem_count())
        .sum()
}
