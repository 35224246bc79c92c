//! AutoMix / SAMix hyper-parameters (spec §5.12, §5.13), adapted to CIFAR-10.

use backbones::{Arch, CifarResNetConfig};
use serde::{Deserialize, Serialize};

/// Which learned-mixing method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// AutoMix (§5.12): shared query/key conv, linear value conv, nearest upsampling, L1 mask loss.
    #[serde(rename = "automix", alias = "AutoMix")]
    AutoMix,
    /// SAMix (§5.13): λ-scaled features, concatenated query/key input, ConvNeck value net,
    /// bilinear upsampling, L1 − 2·Var mask loss, `mask_adjust = 0.25`.
    #[serde(rename = "samix", alias = "SAMix")]
    SAMix,
}

/// How the low-resolution mask logits are brought to image size (before the sigmoid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upsampling {
    /// Nearest neighbour (AutoMix).
    Nearest,
    /// Bilinear with `align_corners = false` (SAMix).
    Bilinear,
}

/// Mask loss form (§5.12.5 / §5.13.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskLossMode {
    /// `w·max(|1 − m̄ − λ_mb| − margin, 0)` (AutoMix).
    #[serde(rename = "L1")]
    L1,
    /// `w·[max(|1 − m̄ − λ_mb| − margin, 0) − 2·max(Var(m), 0)]` (SAMix).
    #[serde(rename = "L1+Variance")]
    L1Variance,
}

/// Weights of the three training losses of the classifier heads (`head_weights` upstream;
/// `head_one_k` is evaluated only, so it has no weight here).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadWeights {
    /// Weight of `L_mix_q` (q encoder on the backbone-mixed batch). Default 1.
    pub mix_q: f64,
    /// Weight of `L_one_q` (q encoder on the clean batch). Default 1.
    pub one_q: f64,
    /// Weight of `L_mix_k` (k encoder on the MixBlock-mixed batch; the only classification
    /// loss that trains the MixBlock). Default 1.
    pub mix_k: f64,
}

impl Default for HeadWeights {
    fn default() -> Self {
        Self {
            mix_q: 1.0,
            one_q: 1.0,
            mix_k: 1.0,
        }
    }
}

/// Configuration of an AutoMix / SAMix model. `Default` is the adapted CIFAR-10 AutoMix
/// config (§5.12.1); [`AutoMixConfig::samix`] is the SAMix one. Fields that differ between
/// the two variants are `Option`s whose `None` means "the variant's default", so a JSON file
/// that only says `{"variant": "samix"}` gets every SAMix value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoMixConfig {
    /// AutoMix or SAMix (default AutoMix).
    pub variant: Variant,
    /// Beta(α, α) parameter for both λ_mb and λ_bb (default 2).
    pub alpha: f64,
    /// 0-based index of the residual stage whose output feeds the MixBlock (`mask_layer`,
    /// default 2 = layer3, 8×8 on CIFAR); the mask is upsampled by `2^mask_layer`.
    pub mask_layer: usize,
    /// Channel reduction of the MixBlock's query/key convs: `C' = C / reduction` (default 2).
    pub mixblock_reduction: usize,
    /// Upsampling of the mask logits; `None` = nearest (AutoMix) / bilinear (SAMix).
    pub upsampling: Option<Upsampling>,
    /// SAMix λ-rescale constant `k` of `r(λ)` (`lam_mul_k`, default 0.25; AutoMix ignores it).
    pub lam_mul_k: f64,
    /// Hidden width of SAMix's ConvNeck value net (upstream `value_neck_cfg.hid_channels`);
    /// `None` = upstream's value for the backbone, whatever its `base_width`
    /// ([`AutoMixConfig::value_neck_channels_for`]). AutoMix ignores it.
    pub value_neck_channels: Option<usize>,
    /// Probability per iteration of rescaling the backbone mask toward λ_mb (§5.13.3);
    /// `None` = 0 (AutoMix) / 0.25 (SAMix, the "CIFAR" generated config).
    pub mask_adjust: Option<f64>,
    /// If `λ_bb ≤ lam_margin` or `1 − λ_bb ≤ lam_margin` the backbone mask is the constant
    /// λ_bb (plain MixUp), default 0.08.
    pub lam_margin: f64,
    /// Weight of the mask loss (`mask_loss`, default 0.1).
    pub mask_loss_weight: f64,
    /// Dead zone of the L1 mask term (`mask_loss_margin`, default 0.1).
    pub mask_loss_margin: f64,
    /// Mask loss form; `None` = L1 (AutoMix) / L1+Variance (SAMix).
    pub mask_loss_mode: Option<MaskLossMode>,
    /// Weights of the classification losses.
    pub head_weights: HeadWeights,
    /// EMA momentum before the cosine part of the schedule (`momentum`, default 0.999).
    pub momentum_start: f64,
    /// EMA momentum the cosine schedule reaches at the last iteration (default 0.999999).
    pub momentum_end: f64,
    /// Fraction of the total iterations after which the cosine momentum schedule starts
    /// (`adjust_scope[0]`, default 0.1); before it the momentum is `momentum_start`.
    pub momentum_adjust_start: f64,
    /// Learning-rate multiplier of the MixBlock parameter group relative to the encoder
    /// (default 1: upstream uses one optimizer with the same LR, momentum and weight decay
    /// for every parameter).
    pub mixblock_lr_scale: f64,
    /// Weight-decay of the MixBlock parameter group (default 1e-4, like every parameter).
    pub mixblock_weight_decay: f64,
}

/// Final learning rate of the cosine schedule for AutoMix/SAMix (§3.2; the runner's
/// `lr.min_lr` must be set to this value for these methods).
pub const MIN_LR: f64 = 0.05;

impl Default for AutoMixConfig {
    fn default() -> Self {
        Self {
            variant: Variant::AutoMix,
            alpha: 2.0,
            mask_layer: 2,
            mixblock_reduction: 2,
            upsampling: None,
            lam_mul_k: 0.25,
            value_neck_channels: None,
            mask_adjust: None,
            lam_margin: 0.08,
            mask_loss_weight: 0.1,
            mask_loss_margin: 0.1,
            mask_loss_mode: None,
            head_weights: HeadWeights::default(),
            momentum_start: 0.999,
            momentum_end: 0.999999,
            momentum_adjust_start: 0.1,
            mixblock_lr_scale: 1.0,
            mixblock_weight_decay: 1e-4,
        }
    }
}

impl AutoMixConfig {
    /// The adapted CIFAR-10 AutoMix config (same as `Default`).
    pub fn automix() -> Self {
        Self::default()
    }

    /// The adapted CIFAR-10 SAMix config (§5.13, `mask_adjust = 0.25`).
    pub fn samix() -> Self {
        Self {
            variant: Variant::SAMix,
            ..Self::default()
        }
    }

    /// Upsampling actually used.
    pub fn upsampling(&self) -> Upsampling {
        self.upsampling.unwrap_or(match self.variant {
            Variant::AutoMix => Upsampling::Nearest,
            Variant::SAMix => Upsampling::Bilinear,
        })
    }

    /// `mask_adjust` probability actually used.
    pub fn mask_adjust(&self) -> f64 {
        self.mask_adjust.unwrap_or(match self.variant {
            Variant::AutoMix => 0.0,
            Variant::SAMix => 0.25,
        })
    }

    /// SAMix ConvNeck hidden width actually used with `backbone`: `value_neck_channels`, or
    /// upstream's `hid_channels` — 128 in the ResNet-18 config, 512 in the ResNeXt-50 one (half
    /// the stage-3 width at the benchmark's base width 64). Upstream fixes the number in the
    /// config, so it does not follow a narrower `base_width`.
    pub fn value_neck_channels_for(&self, backbone: &CifarResNetConfig) -> usize {
        self.value_neck_channels.unwrap_or(match backbone.arch {
            Arch::ResNet18 => 128,
            Arch::ResNeXt50 => 512,
        })
    }

    /// Mask-loss form actually used.
    pub fn mask_loss_mode(&self) -> MaskLossMode {
        self.mask_loss_mode.unwrap_or(match self.variant {
            Variant::AutoMix => MaskLossMode::L1,
            Variant::SAMix => MaskLossMode::L1Variance,
        })
    }

    /// Checks value ranges; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, field: &str, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("automix config: `{field}` {what}"))
            }
        };
        check(
            self.alpha > 0.0 && self.alpha.is_finite(),
            "alpha",
            "must be > 0",
        )?;
        check(
            (1..=3).contains(&self.mask_layer),
            "mask_layer",
            "must be 1, 2 or 3 (stage index of layer2..layer4)",
        )?;
        check(
            self.mixblock_reduction >= 1,
            "mixblock_reduction",
            "must be ≥ 1",
        )?;
        check(
            self.lam_mul_k > 0.0 && self.lam_mul_k.is_finite(),
            "lam_mul_k",
            "must be > 0",
        )?;
        check(
            self.value_neck_channels != Some(0),
            "value_neck_channels",
            "must be ≥ 1 (or null for upstream's width)",
        )?;
        check(
            (0.0..=1.0).contains(&self.mask_adjust()),
            "mask_adjust",
            "must lie in [0, 1]",
        )?;
        check(
            (0.0..0.5).contains(&self.lam_margin),
            "lam_margin",
            "must lie in [0, 0.5)",
        )?;
        check(
            self.mask_loss_weight >= 0.0,
            "mask_loss_weight",
            "must be ≥ 0",
        )?;
        check(
            self.mask_loss_margin >= 0.0,
            "mask_loss_margin",
            "must be ≥ 0",
        )?;
        let hw = &self.head_weights;
        check(
            hw.mix_q >= 0.0 && hw.one_q >= 0.0 && hw.mix_k >= 0.0,
            "head_weights",
            "must be ≥ 0",
        )?;
        check(
            (0.0..1.0).contains(&self.momentum_start),
            "momentum_start",
            "must lie in [0, 1)",
        )?;
        check(
            (0.0..=1.0).contains(&self.momentum_end),
            "momentum_end",
            "must lie in [0, 1]",
        )?;
        check(
            (0.0..=1.0).contains(&self.momentum_adjust_start),
            "momentum_adjust_start",
            "must lie in [0, 1]",
        )?;
        check(
            self.mixblock_lr_scale >= 0.0,
            "mixblock_lr_scale",
            "must be ≥ 0",
        )?;
        check(
            self.mixblock_weight_decay >= 0.0,
            "mixblock_weight_decay",
            "must be ≥ 0",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_defaults_resolve_from_json() {
        let samix: AutoMixConfig = serde_json::from_str(r#"{"variant": "samix"}"#).unwrap();
        assert_eq!(samix.mask_adjust(), 0.25);
        assert_eq!(samix.upsampling(), Upsampling::Bilinear);
        assert_eq!(samix.mask_loss_mode(), MaskLossMode::L1Variance);
        let automix: AutoMixConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(automix, AutoMixConfig::automix());
        assert_eq!(automix.mask_adjust(), 0.0);
        assert_eq!(automix.upsampling(), Upsampling::Nearest);
        assert_eq!(automix.mask_loss_mode(), MaskLossMode::L1);
        let explicit: AutoMixConfig =
            serde_json::from_str(r#"{"variant": "samix", "mask_adjust": 0}"#).unwrap();
        assert_eq!(explicit.mask_adjust(), 0.0);
        // Round trip.
        let text = serde_json::to_string(&samix).unwrap();
        assert_eq!(serde_json::from_str::<AutoMixConfig>(&text).unwrap(), samix);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected_by_name() {
        let err = serde_json::from_str::<AutoMixConfig>(r#"{"alfa": 2}"#).unwrap_err();
        assert!(err.to_string().contains("alfa"), "{err}");
        let bad = AutoMixConfig {
            lam_margin: 0.7,
            ..AutoMixConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("lam_margin"));
        let bad = AutoMixConfig {
            alpha: 0.0,
            ..AutoMixConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("alpha"));
        let bad = AutoMixConfig {
            value_neck_channels: Some(0),
            ..AutoMixConfig::samix()
        };
        assert!(bad.validate().unwrap_err().contains("value_neck_channels"));
        assert!(AutoMixConfig::samix().validate().is_ok());
    }

    #[test]
    fn value_neck_width_is_upstreams_whatever_the_base_width() {
        let samix = AutoMixConfig::samix();
        for base_width in [8, 16, 64] {
            let r18 = CifarResNetConfig {
                base_width,
                ..CifarResNetConfig::default()
            };
            let rx50 = CifarResNetConfig {
                base_width,
                ..CifarResNetConfig::resnext50()
            };
            assert_eq!(samix.value_neck_channels_for(&r18), 128);
            assert_eq!(samix.value_neck_channels_for(&rx50), 512);
        }
        // At the benchmark width it is half the MixBlock's input channels, as upstream's configs.
        assert_eq!(CifarResNetConfig::default().stage_channels(3), 2 * 128);
        assert_eq!(CifarResNetConfig::resnext50().stage_channels(3), 2 * 512);
        let set: AutoMixConfig =
            serde_json::from_str(r#"{"variant": "samix", "value_neck_channels": 32}"#).unwrap();
        assert_eq!(
            set.value_neck_channels_for(&CifarResNetConfig::default()),
            32
        );
    }
}
