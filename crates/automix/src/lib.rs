//! AutoMix and SAMix (spec §5.12, §5.13): a learned MixBlock that mixes image pairs with a
//! pixel mask computed from stage-3 features of a momentum (EMA) encoder.
//!
//! * [`AutoMixModel`] holds the q side (`Enc_q` + `Head_one_q` + `Head_mix_q`, trained by SGD),
//!   the k side (same layout, EMA copy, never receives gradients) and the [`MixBlock`].
//! * [`AutoMixModel::train_step`] runs the four forwards of §5.12.5 and returns the total loss;
//!   the runner takes `StepOutput::gradients` (candle's `backward` plus the q encoder's taped
//!   gradients), runs the SGD step over [`AutoMixModel::optimizer_groups`], and then
//!   [`AutoMixModel::momentum_update`] with [`AutoMixModel::momentum_at`].
//! * [`AutoMixModel::eval_logits`] gives the four predictors of §5.12.7.
//!
//! ```
//! use automix::{AutoMixConfig, AutoMixModel};
//! use backbones::CifarResNetConfig;
//! use candle_core::{Device, Tensor};
//! use rand::SeedableRng;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let net = CifarResNetConfig { base_width: 4, stage_blocks: Some([1, 1, 1, 1]), ..Default::default() };
//! let model = AutoMixModel::new(AutoMixConfig::samix(), net, &dev, 0)?;
//! let mut sgd = model.new_optimizer()?;
//! let x = Tensor::randn(0f32, 1., (4, 3, 32, 32), &dev)?;
//! let y = Tensor::new(&[0u32, 1, 2, 3], &dev)?;
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let out = model.train_step(&x, &y, &mut rng)?;
//! sgd.step(&out.gradients()?, 0.1)?;
//! model.momentum_update(model.momentum_at(0, 100))?;
//! assert_eq!(model.eval_logits(&x)?.len(), 4);
//! # Ok(())
//! # }
//! ```
//!
//! # Adaptations and ambiguity choices (spec §9 item 10)
//!
//! * **Config.** No CIFAR-10 AutoMix/SAMix config exists upstream. [`AutoMixConfig::automix`]
//!   adapts `cifar100/automix/basic/r18_l2_a2_near_L1_01_mlr5e_2.py` and
//!   [`AutoMixConfig::samix`] adapts
//!   `cifar100/samix/basic/r18_l2_a2_bili_val_dp0_mul_x_cat_L1_var_01_mlr5e_2.py` to 10
//!   classes (the head size comes from the backbone config) and the CIFAR-10 data pipeline.
//!   The cosine LR must end at [`MIN_LR`] = 0.05 (the runner's `lr.min_lr`); every parameter,
//!   MixBlock included, uses SGD 0.1 / 0.9 / wd 1e-4.
//! * **SAMix `mask_adjust`.** Default 0.25 (the generated "CIFAR" 800-epoch config), not the
//!   base config's 0; the adjustment rescales toward **λ_mb**, as the upstream code does (its
//!   comments say λ_bb), and happens before the `lam_margin` override.
//! * **AutoMix MixBlock sees no λ** on CIFAR (no λ concatenation); query and key share one conv.
//! * **SAMix `neg_weight = 0.5`** of `Head_mix_k` is a no-op; `L_mix_k` is the soft CE, equal
//!   to the AutoMix mixed CE for a scalar λ.
//! * **BN buffers are not EMA'd**: the k encoder's running statistics evolve from its own
//!   train-mode forwards on `x` (through all stages, as upstream computes every stage) and on
//!   `x_mb`. The SAMix ConvNeck BN runs in train mode in both MixBlock calls.
//! * **Heads.** `Head_one` of each side is the backbone's own `fc` (`model_q.fc.*`), `Head_mix`
//!   is a second GAP+Linear (`model_q.head_mix.*`); the k side mirrors this under `model_k.`.
//!   Initialisation follows the backbone config's scheme (the benchmark scheme by default, which
//!   is what §5.12.3 prescribes); the k side starts as an exact copy of the q side.
//! * **Gradient isolation.** The k side is built from detached views of its variables, so
//!   backward never computes k gradients (rather than computing and discarding them).
//! * **Upsampling** is implemented as a matmul with a PyTorch-equivalent interpolation matrix
//!   (nearest, or bilinear with `align_corners = false`), since candle has no bilinear backward.
//! * **Momentum schedule.** `m = 0.999` before `t0 = trunc(0.1·T)`, then the cosine of `t/T`
//!   toward 0.999999 (the jump at `t0` is reproduced).
//! * **Randomness.** Per step, λ_mb, λ_bb (each Beta(2, 2)), π_mb, π_bb and one `U(0,1)` for
//!   `mask_adjust` are drawn from the caller's RNG in that order (the uniform is drawn even
//!   when `mask_adjust = 0`, so the stream does not depend on it).
//! * **Training logs.** `acc_mix_q`, `acc_one_q`, `acc_mix_k` are top-1 % against `y` (= `y_a`)
//!   on the respective batch (upstream does not define them further in the spec).
//! * **Reported number.** All four heads are evaluated (`acc_{mix,one}_{k,q}_top{1,5}`); the
//!   reported value is, per head, the median over epochs `E−10..E` (11 values), and then the
//!   maximum over the four heads ([`best_head`]). Upstream's summarizer instead takes 11–13
//!   records and the max over its own prefix choice; the README does not say which of k/q it
//!   reports.
//! * **Preview.** [`AutoMixModel::masks_for_preview`] shows the MixBlock's own mixture with
//!   eval-mode BN (no state change), not the training-time train-mode forward.

pub mod config;
pub mod mask;
pub mod mixblock;
pub mod model;
mod params;
pub mod schedule;

pub use config::{AutoMixConfig, HeadWeights, MaskLossMode, Upsampling, Variant, MIN_LR};
pub use mixblock::{samix_lam_rescale, MixBlock};
pub use model::{
    best_head, AutoMixModel, OptimizerGroup, StepOutput, EVAL_HEADS, PREFIX_K, PREFIX_MIXBLOCK,
    PREFIX_Q,
};
pub use schedule::{cosine_momentum, momentum_at};
