//! The AutoMix / SAMix model: q encoder and heads (SGD), k encoder and heads (EMA only),
//! MixBlock, and the per-step procedure of §5.12.5.

use backbones::{is_buffer, CifarResNet, CifarResNetConfig, ClsHead, ParamRegistry, TapeGrads};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use mix_ops::sample::{beta_lambda, perm_tensor, permutation};
use mix_ops::MixedLabels;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use train::{mixed_loss, GroupLr, GroupOptions, HeadLoss, Sgd, TrainResult};

use crate::config::{AutoMixConfig, Variant};
use crate::mask::{adjust_mask_to_lambda, apply_lam_margin, mask_loss, mix_with_mask};
use crate::mixblock::MixBlock;
use crate::schedule;

/// Checkpoint prefix of the q side (encoder `Enc_q` with `Head_one_q` as its `fc`, and
/// `head_mix.*` = `Head_mix_q`).
pub const PREFIX_Q: &str = "model_q.";
/// Checkpoint prefix of the momentum (k) side, same layout as [`PREFIX_Q`].
pub const PREFIX_K: &str = "model_k.";
/// Checkpoint prefix of the MixBlock.
pub const PREFIX_MIXBLOCK: &str = "mixblock.";

/// Names of the four evaluated predictors (§5.12.7), in upstream order; the runner logs
/// `<name>_top1` / `<name>_top5` for each.
pub const EVAL_HEADS: [&str; 4] = ["acc_mix_k", "acc_one_k", "acc_mix_q", "acc_one_q"];

/// Name of the second classifier head inside each side's VarMap.
const HEAD_MIX: &str = "head_mix";

/// One side (q or k): encoder whose `fc` is `Head_one`, plus `Head_mix`.
struct Side {
    net: CifarResNet,
    head_mix: ClsHead,
    head_registry: ParamRegistry,
}

impl Side {
    fn new(cfg: CifarResNetConfig, vb: VarBuilder) -> Result<Self> {
        let net = CifarResNet::new(cfg, vb.clone())?;
        let mut head_registry = ParamRegistry::new(cfg.init);
        let head_mix = ClsHead::new(
            net.feature_channels(4),
            cfg.num_classes,
            vb.pp(HEAD_MIX),
            &mut head_registry,
        )?;
        Ok(Self {
            net,
            head_mix,
            head_registry,
        })
    }

    /// `layer4` features → (`Head_one` logits, `Head_mix` logits).
    fn heads(&self, feats: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.net.head().forward(feats)?,
            self.head_mix.forward(feats)?,
        ))
    }
}

/// One SGD parameter group: its name, its `(prefixed name, Var)` list and its options.
#[derive(Debug, Clone)]
pub struct OptimizerGroup {
    /// `"q"` or `"mixblock"`.
    pub name: &'static str,
    /// The group's trainable variables (BN buffers excluded), names with their prefix.
    pub vars: Vec<(String, Var)>,
    /// Learning-rate relation, weight decay and momentum.
    pub options: GroupOptions,
}

/// Everything one training step produces.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Total loss `w_mq·L_mix_q + w_oq·L_one_q + w_mk·L_mix_k + L_mask` (0-dim, with graph):
    /// differentiate it with [`StepOutput::gradients`]. Its gradient reaches the q encoder/heads only through the two
    /// q terms and the MixBlock only through `L_mix_k` and `L_mask`; the k side gets none.
    pub loss: Tensor,
    /// The q-side part `w_mq·L_mix_q + w_oq·L_one_q` (0-dim, with graph).
    pub loss_q: Tensor,
    /// The MixBlock part `w_mk·L_mix_k + L_mask` (0-dim, with graph).
    pub loss_mixblock: Tensor,
    /// Detached 0-dim f32 values for logging: `loss_mix_q`, `loss_one_q`, `loss_mix_k`,
    /// `loss_mask`, `loss_q` (the q-side part of `loss`), `loss_mixblock` (the MixBlock part),
    /// `acc_mix_q`, `acc_one_q`, `acc_mix_k` (top-1 % against `y_a`).
    pub logs: Vec<(&'static str, Tensor)>,
    /// λ of the MixBlock mixture.
    pub lambda_mb: f64,
    /// λ of the backbone mixture (the weight of `y` in `L_mix_q`).
    pub lambda_bb: f64,
    /// Whether `mask_adjust` fired this step.
    pub mask_adjusted: bool,
    /// Whether the `lam_margin` rule replaced the backbone mask by the constant λ_bb.
    pub lam_margin_applied: bool,
    /// The q encoder's parameter gradients: its two training forwards are taped
    /// (`CifarResNet::features_train`), so their gradients arrive here when a backward reaches
    /// them. [`StepOutput::gradients`] adds them to candle's.
    pub tapes: Vec<TapeGrads>,
}

impl StepOutput {
    /// Every gradient of [`StepOutput::loss`]: candle's `backward` plus the q encoder's taped
    /// parameter gradients.
    pub fn gradients(&self) -> Result<GradStore> {
        self.gradients_of(&self.loss)
    }

    /// [`StepOutput::gradients`] of one part of the loss (`loss_q`, `loss_mixblock`). A taped
    /// forward backs up once, so each step's graph takes one backward through the q encoder.
    pub fn gradients_of(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        for tape in &self.tapes {
            tape.add_to(&mut grads)?;
        }
        Ok(grads)
    }

    /// The logged values as host scalars (one device sync).
    pub fn log_values(&self) -> Result<Vec<(&'static str, f64)>> {
        let mut out = Vec::with_capacity(self.logs.len() + 1);
        out.push(("loss", self.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?));
        for (k, v) in &self.logs {
            out.push((*k, v.to_dtype(DType::F64)?.to_scalar::<f64>()?));
        }
        Ok(out)
    }
}

/// AutoMix / SAMix (§5.12, §5.13).
pub struct AutoMixModel {
    cfg: AutoMixConfig,
    device: Device,
    vm_q: VarMap,
    vm_k: VarMap,
    vm_mixblock: VarMap,
    q: Side,
    k: Side,
    mixblock: MixBlock,
}

impl AutoMixModel {
    /// Builds the model on `device` with fresh VarMaps and initialises it deterministically
    /// from `seed` (§5.12.3): the q encoder and heads with `backbone_cfg.init` (the benchmark
    /// scheme: Kaiming fan-out, zero-init residual, FC `N(0, 0.01²)`), the MixBlock with
    /// `N(0, 0.01²)` convs; then the k side is an exact copy of the q side.
    pub fn new(
        cfg: AutoMixConfig,
        backbone_cfg: CifarResNetConfig,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let stage = cfg.mask_layer + 1;
        let vm_q = VarMap::new();
        let vm_k = VarMap::new();
        let vm_mixblock = VarMap::new();
        let q = Side::new(
            backbone_cfg,
            VarBuilder::from_varmap(&vm_q, DType::F32, device),
        )?;
        let k = Side::new(
            backbone_cfg,
            backbones::DetachedVarMap::new(vm_k.clone()).into_var_builder(DType::F32, device),
        )?;
        let mixblock = MixBlock::new(
            &cfg,
            q.net.feature_channels(stage),
            cfg.value_neck_channels_for(&backbone_cfg),
            &vm_mixblock,
            "",
            device,
        )?;
        let model = Self {
            cfg,
            device: device.clone(),
            vm_q,
            vm_k,
            vm_mixblock,
            q,
            k,
            mixblock,
        };
        model.init_weights(seed)?;
        Ok(model)
    }

    /// Re-initialises every variable from `seed` (see [`AutoMixModel::new`]).
    pub fn init_weights(&self, seed: u64) -> Result<()> {
        self.q.net.init_weights(&self.vm_q, seed)?;
        self.q
            .head_registry
            .init_weights(&self.vm_q, seed.wrapping_add(1))?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(2));
        self.mixblock.reset(&mut rng)?;
        self.copy_q_to_k()
    }

    /// Copies every q variable (parameters and buffers) onto its k twin.
    fn copy_q_to_k(&self) -> Result<()> {
        let q = self.vm_q.data().lock().expect("VarMap mutex poisoned");
        let k = self.vm_k.data().lock().expect("VarMap mutex poisoned");
        for (name, vk) in k.iter() {
            let vq = q.get(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("k variable `{name}` has no q twin"))
            })?;
            vk.set(&vq.as_tensor().detach())?;
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &AutoMixConfig {
        &self.cfg
    }

    /// The device everything lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of classes of the heads.
    pub fn num_classes(&self) -> usize {
        self.q.net.num_classes()
    }

    /// Every state variable with its checkpoint prefix: `model_q.` (trained by SGD),
    /// `model_k.` (EMA and its own BN statistics), `mixblock.` (SGD; SAMix BN statistics).
    /// Names inside the maps are unprefixed (`layer1.0.conv1.weight`, `head_mix.weight`,
    /// `query.weight`, …), so `train::checkpoint::{varmap_tensors, load_varmap}` with these
    /// prefixes save and restore the whole model.
    pub fn varmaps(&self) -> [(&'static str, &VarMap); 3] {
        [
            (PREFIX_Q, &self.vm_q),
            (PREFIX_K, &self.vm_k),
            (PREFIX_MIXBLOCK, &self.vm_mixblock),
        ]
    }

    fn trainable(vm: &VarMap, prefix: &str) -> Vec<(String, Var)> {
        let data = vm.data().lock().expect("VarMap mutex poisoned");
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| !is_buffer(name))
            .map(|(name, v)| (format!("{prefix}{name}"), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Trainable q-side parameters (`Enc_q`, `Head_one_q`, `Head_mix_q`), prefixed names,
    /// BN buffers excluded.
    pub fn q_vars(&self) -> Vec<(String, Var)> {
        Self::trainable(&self.vm_q, PREFIX_Q)
    }

    /// Trainable MixBlock parameters, prefixed names, BN buffers excluded.
    pub fn mixblock_vars(&self) -> Vec<(String, Var)> {
        Self::trainable(&self.vm_mixblock, PREFIX_MIXBLOCK)
    }

    /// k-side parameters updated by [`AutoMixModel::momentum_update`] (never by an optimizer).
    pub fn k_vars(&self) -> Vec<(String, Var)> {
        Self::trainable(&self.vm_k, PREFIX_K)
    }

    /// The optimizer groups: `q` (the reference recipe: scheduled LR, momentum 0.9, wd 1e-4)
    /// and `mixblock` (LR scale `mixblock_lr_scale`, wd `mixblock_weight_decay`, momentum 0.9).
    /// The k side is in no group.
    pub fn optimizer_groups(&self) -> Vec<OptimizerGroup> {
        let q_opts = GroupOptions::reference();
        let mb_opts = GroupOptions {
            lr: GroupLr::Scale(self.cfg.mixblock_lr_scale),
            weight_decay: self.cfg.mixblock_weight_decay,
            ..GroupOptions::reference()
        };
        vec![
            OptimizerGroup {
                name: "q",
                vars: self.q_vars(),
                options: q_opts,
            },
            OptimizerGroup {
                name: "mixblock",
                vars: self.mixblock_vars(),
                options: mb_opts,
            },
        ]
    }

    /// A ready SGD over [`AutoMixModel::optimizer_groups`].
    pub fn new_optimizer(&self) -> TrainResult<Sgd> {
        let mut groups = self.optimizer_groups().into_iter();
        let first = groups.next().expect("at least one group");
        let mut sgd = Sgd::new(first.vars, first.options)?;
        for group in groups {
            sgd.add_group(group.vars, group.options)?;
        }
        Ok(sgd)
    }

    /// EMA momentum for the 0-based global iteration `iter` of `total_iters` (§5.12.6); set
    /// before the iteration, applied after its optimizer step.
    pub fn momentum_at(&self, iter: usize, total_iters: usize) -> f64 {
        schedule::momentum_at(&self.cfg, iter, total_iters)
    }

    /// `θ_k ← m·θ_k + (1 − m)·θ_q` for every k parameter (encoder, `Head_one_k`,
    /// `Head_mix_k`); BN running statistics of the k encoder are not touched.
    pub fn momentum_update(&self, m: f64) -> Result<()> {
        let q = self.vm_q.data().lock().expect("VarMap mutex poisoned");
        let k = self.vm_k.data().lock().expect("VarMap mutex poisoned");
        for (name, vk) in k.iter() {
            if is_buffer(name) {
                continue;
            }
            let vq = q.get(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("k variable `{name}` has no q twin"))
            })?;
            // One in-place pass, the bits of `(θ_k·m) + (θ_q·(1 − m))` (kernels::ema).
            kernels::ema_update(vk.as_tensor(), vq.as_tensor(), m)?;
        }
        Ok(())
    }

    /// Stage index (1..=4) of the features that feed the MixBlock.
    fn mask_stage(&self) -> usize {
        self.cfg.mask_layer + 1
    }

    /// One training forward (§5.12.5), in upstream order: `Enc_k(x)` (train mode), MixBlock
    /// twice, `Enc_k(x_mb)`, `Enc_q(x)`, `Enc_q(x_bb)`. `images`: `N×3×H×W` normalised f32,
    /// `labels`: `N` u32. Random draws from `rng`: λ_mb, λ_bb, π_mb, π_bb, then one `U(0,1)`
    /// for `mask_adjust`. The caller then runs `backward` on [`StepOutput::loss`], steps the
    /// optimizer, and calls [`AutoMixModel::momentum_update`].
    pub fn train_step(
        &self,
        images: &Tensor,
        labels: &Tensor,
        rng: &mut dyn RngCore,
    ) -> Result<StepOutput> {
        let n = images.dim(0)?;
        let dev = images.device();
        let lambda_mb = beta_lambda(rng, self.cfg.alpha);
        let lambda_bb = beta_lambda(rng, self.cfg.alpha);
        let perm_mb = perm_tensor(&permutation(rng, n), dev)?;
        let perm_bb = perm_tensor(&permutation(rng, n), dev)?;
        let adjust_draw: f64 = rng.random();

        // k encoder on the clean batch: the MixBlock's input. The later stages run too, as
        // upstream (their BN running statistics are updated by this forward).
        let stage = self.mask_stage();
        let feats = self.k.net.forward_until(images, stage, true)?;
        let _ = self.k.net.forward_from(&feats, stage, true)?;
        let feats = feats.detach();

        let mask_mb = self.mixblock.forward(&feats, lambda_mb, &perm_mb, true)?;
        let mut mask_bb = self
            .mixblock
            .forward(&feats, lambda_bb, &perm_bb, true)?
            .detach();
        let mask_adjusted = self.cfg.mask_adjust() > adjust_draw;
        if mask_adjusted {
            mask_bb = adjust_mask_to_lambda(&mask_bb, lambda_mb)?;
        }
        let lam_margin_applied = crate::mask::outside_lam_margin(lambda_bb, self.cfg.lam_margin);
        mask_bb = apply_lam_margin(&mask_bb, lambda_bb, self.cfg.lam_margin)?;

        let loss_mask = mask_loss(
            &mask_mb,
            lambda_mb,
            self.cfg.mask_loss_weight,
            self.cfg.mask_loss_margin,
            self.cfg.mask_loss_mode(),
        )?;
        let x_mb = mix_with_mask(images, &perm_mb, &mask_mb)?;
        let x_bb = mix_with_mask(images, &perm_bb, &mask_bb)?;
        let labels_mb = MixedLabels::permuted(labels, &perm_mb, lambda_mb)?;
        let labels_bb = MixedLabels::permuted(labels, &perm_bb, lambda_bb)?;

        // L_mix_k: k weights are detached, so the gradient reaches only the MixBlock; the
        // taped forward's backward computes the input gradient alone (its weight-gradient
        // collection stays empty).
        let (feats_k_mb, _no_grads) = self.k.net.features_train(&x_mb)?;
        let logits_mix_k = self.k.head_mix.forward(&feats_k_mb)?;
        let k_loss = match self.cfg.variant {
            Variant::AutoMix => HeadLoss::CeNone,
            // SAMix's `Head_mix_k` is a soft-CE head (its neg_weight is a no-op, §5.13.2).
            Variant::SAMix => HeadLoss::CeSoft,
        };
        let loss_mix_k = mixed_loss(&logits_mix_k, &labels_mb, k_loss)?;

        // The q encoder's two training forwards run their backward themselves (taped).
        let (feats_q, tape_one) = self.q.net.features_train(images)?;
        let logits_one_q = self.q.net.head().forward(&feats_q)?;
        let loss_one_q = mixed_loss(&logits_one_q, &MixedLabels::plain(labels), HeadLoss::CeNone)?;
        let (feats_q_bb, tape_mix) = self.q.net.features_train(&x_bb)?;
        let logits_mix_q = self.q.head_mix.forward(&feats_q_bb)?;
        let loss_mix_q = mixed_loss(&logits_mix_q, &labels_bb, HeadLoss::CeNone)?;

        let w = self.cfg.head_weights;
        let loss_q = ((&loss_mix_q * w.mix_q)? + (&loss_one_q * w.one_q)?)?;
        let loss_mixblock = ((&loss_mix_k * w.mix_k)? + &loss_mask)?;
        let loss = (&loss_q + &loss_mixblock)?;

        let logs = vec![
            ("loss_mix_q", loss_mix_q.detach()),
            ("loss_one_q", loss_one_q.detach()),
            ("loss_mix_k", loss_mix_k.detach()),
            ("loss_mask", loss_mask.detach()),
            ("loss_q", loss_q.detach()),
            ("loss_mixblock", loss_mixblock.detach()),
            ("acc_mix_q", top1_pct(&logits_mix_q, labels)?),
            ("acc_one_q", top1_pct(&logits_one_q, labels)?),
            ("acc_mix_k", top1_pct(&logits_mix_k, labels)?),
        ];
        Ok(StepOutput {
            loss,
            loss_q,
            loss_mixblock,
            logs,
            lambda_mb,
            lambda_bb,
            mask_adjusted,
            lam_margin_applied,
            tapes: tape_one.into_iter().chain(tape_mix).collect(),
        })
    }

    /// Eval-mode logits of the four predictors (§5.12.7), named as in [`EVAL_HEADS`]:
    /// `Head_mix_k(Enc_k(x))`, `Head_one_k(Enc_k(x))`, `Head_mix_q(Enc_q(x))`,
    /// `Head_one_q(Enc_q(x))`. No state changes.
    pub fn eval_logits(&self, x: &Tensor) -> Result<Vec<(&'static str, Tensor)>> {
        let (one_k, mix_k) = self.k.heads(&self.k.net.features(x, false)?)?;
        let (one_q, mix_q) = self.q.heads(&self.q.net.features(x, false)?)?;
        Ok(vec![
            (EVAL_HEADS[0], mix_k.detach()),
            (EVAL_HEADS[1], one_k.detach()),
            (EVAL_HEADS[2], mix_q.detach()),
            (EVAL_HEADS[3], one_q.detach()),
        ])
    }

    /// A MixBlock mixture for `runner preview`: draws λ ~ Beta(α, α) and π from `rng`, runs
    /// the k encoder and the MixBlock in eval mode (running BN statistics, no state change),
    /// and returns it as a [`mix_ops::Mixed`]: mixed images, labels `(y, y[π], λ)` and the
    /// per-pixel weight of `x` (`N×1×H×W`). This is the MixBlock's own mixture `x_mb` (what
    /// the `L_mix_k` loss sees), before `mask_adjust` and `lam_margin`, which only concern the
    /// backbone mixture.
    pub fn masks_for_preview(
        &self,
        images: &Tensor,
        labels: &Tensor,
        rng: &mut dyn RngCore,
    ) -> Result<mix_ops::Mixed> {
        let n = images.dim(0)?;
        if labels.dims() != [n] {
            candle_core::bail!(
                "masks_for_preview: labels must have shape [{n}], got {:?}",
                labels.dims()
            );
        }
        let lambda = beta_lambda(rng, self.cfg.alpha);
        let perm = perm_tensor(&permutation(rng, n), images.device())?;
        let feats = self.k.net.forward_until(images, self.mask_stage(), false)?;
        let mask = self
            .mixblock
            .forward(&feats, lambda, &perm, false)?
            .detach();
        Ok(mix_ops::Mixed {
            images: mix_with_mask(images, &perm, &mask)?,
            labels: mix_ops::MixedLabels::permuted(labels, &perm, lambda)?,
            feature_mix: None,
            mask: Some(mask.narrow(1, 0, 1)?),
        })
    }
}

/// Top-1 accuracy in percent against `labels`, as a detached 0-dim f32 tensor.
fn top1_pct(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let pred = logits.argmax(D::Minus1)?;
    let hits = pred
        .eq(&labels.to_dtype(pred.dtype())?)?
        .to_dtype(DType::F32)?;
    (hits.mean_all()? * 100.0).map(|t| t.detach())
}

/// The number the benchmark reports for AutoMix/SAMix (§5.12.7, our choice): given the
/// per-head medians over the final epochs, the best head and its median.
pub fn best_head<'a>(medians: &[(&'a str, f64)]) -> Option<(&'a str, f64)> {
    medians
        .iter()
        .copied()
        .filter(|(_, v)| v.is_finite())
        .max_by(|a, b| a.1.total_cmp(&b.1))
}
