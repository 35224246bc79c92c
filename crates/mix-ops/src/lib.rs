//! Mixup-family augmentations on plain candle tensors.
//!
//! Every method takes a batch of normalized images (`N×C×H×W`, any dtype the
//! method supports, any device) and integer labels (`N`, `u32`), draws its
//! randomness from the caller's RNG, and returns the mixed images plus the
//! mixed-label triple `(y_a, y_b, λ)` described in the benchmark spec (§3.4).
//! Methods that need a network (ManifoldMix, PuzzleMix, AttentiveMix+) reach it
//! only through the small [`MixModel`] trait or return a [`FeatureMix`]
//! instruction, so this crate never depends on a particular backbone.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use mix_ops::{MixContext, MixMethod, mixup::MixUp};
//! use rand::SeedableRng;
//! let x = Tensor::randn(0f32, 1., (4, 3, 32, 32), &Device::Cpu).unwrap();
//! let y = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap();
//! let mut rng = rand::rngs::StdRng::seed_from_u64(0);
//! let mixed = MixUp::default().mix(&x, &y, &mut MixContext::new(&mut rng)).unwrap();
//! assert_eq!(mixed.images.dims(), x.dims());
//! ```

use candle_core::{Result, Tensor};
use rand::RngCore;

pub mod args;
pub mod labels;
pub mod policy;
pub mod sample;

pub mod boxes;
pub mod graphcut;
pub mod norm;
pub mod registry;
pub mod saliency;
pub mod transport;

pub mod attentivemix;
pub mod cutmix;
pub mod fmix;
pub mod gridmix;
pub mod manifoldmix;
pub mod mixup;
pub mod puzzlemix;
pub mod resizemix;
pub mod saliencymix;
pub mod smoothmix;
pub mod vanilla;

pub use labels::{Lambda, MixedLabels};
pub use registry::{build_method, MixConfigError, MIX_MODES};

/// An instruction to mix hidden features inside the backbone (ManifoldMix, §2.5):
/// `z ← λ·z + (1−λ)·z[π]` applied to the output of stage `layer`
/// (`layer == 0` mixes the input images before the stem).
#[derive(Debug, Clone)]
pub struct FeatureMix {
    /// 0 = input images, `L ≥ 1` = output of stage `L`.
    pub layer: usize,
    /// Weight of the un-permuted features.
    pub lambda: f64,
    /// Partner index π (`N`, `u32`) on the images' device.
    pub perm: Tensor,
}

/// The output of one mixing step.
#[derive(Debug, Clone)]
pub struct Mixed {
    /// Mixed images, same shape, dtype and device as the input.
    pub images: Tensor,
    /// Label triple `(y_a, y_b, λ)`.
    pub labels: MixedLabels,
    /// Set by methods that mix inside the network; `images` is then the input unchanged.
    pub feature_mix: Option<FeatureMix>,
    /// Per-pixel weight of the original image `x` (`N×1×H×W` or `1×1×H×W`), for
    /// methods that have one; used by previews and tests.
    pub mask: Option<Tensor>,
}

/// Access to a network, for the methods whose mixing depends on one.
pub trait MixModel {
    /// Gradient of the batch-mean cross-entropy w.r.t. the input images, taken
    /// with the model in evaluation mode. Must leave parameters and BatchNorm
    /// statistics untouched (PuzzleMix saliency, §5.9).
    fn input_gradient(&self, images: &Tensor, labels: &Tensor) -> Result<Tensor>;
    /// Feature map `N×C×h×w` of a frozen attention network (AttentiveMix+, §5.7).
    fn attention_features(&self, images: &Tensor) -> Result<Tensor>;
}

/// What a mixing step may use besides the batch.
pub struct MixContext<'a> {
    /// The run's random stream; every random choice of a method comes from here.
    pub rng: &'a mut dyn RngCore,
    /// The network, for methods that need one (`None` for the rest).
    pub model: Option<&'a dyn MixModel>,
    /// A λ to use instead of the Beta draw (figures: `runner preview --lam`);
    /// `None` in training.
    pub fixed_lambda: Option<f64>,
    /// Set when a method used [`MixContext::fixed_lambda`]: methods whose λ does not come from
    /// a Beta(α, α) draw (PuzzleMix, ResizeMix, SmoothMix, …) leave it unset, so a caller can
    /// say that the fixed λ was ignored.
    pub used_fixed_lambda: bool,
}

impl<'a> MixContext<'a> {
    /// A context with an RNG and no model.
    pub fn new(rng: &'a mut dyn RngCore) -> Self {
        Self {
            rng,
            model: None,
            fixed_lambda: None,
            used_fixed_lambda: false,
        }
    }

    /// A context with an RNG and a model.
    pub fn with_model(rng: &'a mut dyn RngCore, model: &'a dyn MixModel) -> Self {
        Self {
            rng,
            model: Some(model),
            fixed_lambda: None,
            used_fixed_lambda: false,
        }
    }

    /// The method's λ ~ Beta(α, α), or [`MixContext::fixed_lambda`] when set. The
    /// Beta draw is made either way, so every later draw is the same as without
    /// a fixed λ.
    pub fn draw_lambda(&mut self, alpha: f64) -> f64 {
        let drawn = sample::beta_lambda(self.rng, alpha);
        self.take_fixed_lambda(drawn)
    }

    /// [`MixContext::fixed_lambda`] when set (and noted as used), else `drawn`.
    pub fn take_fixed_lambda(&mut self, drawn: f64) -> f64 {
        match self.fixed_lambda {
            Some(l) => {
                self.used_fixed_lambda = true;
                l
            }
            None => drawn,
        }
    }
}

/// One mixing method. Implementations hold their hyper-parameters (α and the
/// method's `mix_args`) and are cheap to construct.
pub trait MixMethod: Send + Sync {
    /// The `mix_mode` name used in configs (`"mixup"`, `"cutmix"`, …).
    fn name(&self) -> &'static str;
    /// Mixes one batch. `images`: `N×C×H×W`; `labels`: `N` (`u32`).
    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed>;
}

/// Threads for the CPU work of a method (PuzzleMix's per-sample graph cuts): the
/// `RAYON_NUM_THREADS` the process's thread pool honours (`runner --threads N` sets it), else
/// every core. Results never depend on it.
pub fn worker_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
