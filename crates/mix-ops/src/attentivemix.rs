//! AttentiveMix+ (spec §5.7): each sample keeps its own `k` most-attended cells
//! of a `7×7` attention grid and takes the rest from its partner.
//!
//! The attention comes from a frozen ImageNet network reached through
//! [`MixModel::attention_features`]; the caller runs it on the bilinearly
//! upsampled batch (224×224), without gradients, with BatchNorm in train mode
//! as the reference does — this module only consumes the `N×C×h×w` map.
//!
//! Reference behaviour reproduced (spec §5.7, §9 item 6):
//! * `λ ~ Beta(α, α)` (the docs' "Beta(α, 8)" does not match the code) and
//!   `k = clamp(trunc(h·w·λ), 1, h·w)` when `top_k` is `None`;
//! * the `grid_size` and `beta` config keys are accepted and **ignored**;
//! * the label weight is `λ' = mean(M_0)`, the mask mean of sample 0 only, used
//!   for the whole batch (other samples' pasted fractions differ slightly because
//!   cells are 4 or 5 pixels wide);
//! * ties among attention values go to the lower row-major cell index.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::args::MixArgs;
use crate::labels::MixedLabels;
use crate::sample::{perm_tensor, permutation};
use crate::transport::host_f32;
use crate::{MixContext, MixMethod, MixModel, Mixed};

/// AttentiveMix `mix_args` (spec §5.0). `Default` is the CIFAR-10 config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentiveMixArgs {
    /// Ignored by the reference (its parameter is called `grid_scale`); kept for configs.
    pub grid_size: usize,
    /// Fixed number of cells to keep; `None` = `trunc(h·w·λ)` clamped to `1..=h·w`.
    pub top_k: Option<usize>,
    /// Ignored by the reference; kept for configs.
    pub beta: f64,
}

impl Default for AttentiveMixArgs {
    fn default() -> Self {
        Self {
            grid_size: 32,
            top_k: None,
            beta: 8.0,
        }
    }
}

impl MixArgs for AttentiveMixArgs {
    /// Only `top_k` has an effect and is checked.
    fn validate(&self) -> std::result::Result<(), String> {
        if self.top_k == Some(0) {
            return Err("top_k: must be ≥ 1 or null".into());
        }
        Ok(())
    }
}

/// AttentiveMix+ with its α (CIFAR-10 benchmark value: 2.0) and `mix_args`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentiveMix {
    /// Beta(α, α) parameter.
    pub alpha: f64,
    /// Method hyper-parameters.
    pub args: AttentiveMixArgs,
}

impl Default for AttentiveMix {
    fn default() -> Self {
        Self {
            alpha: 2.0,
            args: AttentiveMixArgs::default(),
        }
    }
}

/// Number of kept cells: `top_k` if given (clamped to the grid), else
/// `clamp(trunc(cells·λ), 1, cells)`.
pub fn kept_cells(lambda: f64, cells: usize, top_k: Option<usize>) -> usize {
    match top_k {
        Some(k) => k.clamp(1, cells),
        None => ((cells as f64 * lambda).trunc() as usize).clamp(1, cells),
    }
}

/// Indices of the `k` largest entries of `scores` (row-major), ties to the lower index.
pub fn top_k_cells(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Nearest upsampling of an `gh×gw` grid to `h×w` with source index
/// `floor(t·g/size)` per axis (7 → 32 gives cell sizes 5,5,4,5,4,5,4).
pub fn upsample_grid(grid: &[f32], gh: usize, gw: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * w);
    for r in 0..h {
        let sr = r * gh / h;
        for c in 0..w {
            out.push(grid[sr * gw + c * gw / w]);
        }
    }
    out
}

impl AttentiveMix {
    /// The deterministic part: mixes `images` given the attention `features`
    /// (`N×C×gh×gw`), λ and π. Returns the mix and the per-sample kept cells.
    pub fn mix_with(
        &self,
        images: &Tensor,
        labels: &Tensor,
        features: &Tensor,
        lambda: f64,
        perm: &[u32],
    ) -> Result<(Mixed, Vec<Vec<usize>>)> {
        let (n, _, h, w) = images.dims4()?;
        let (fn_, _, gh, gw) = features.dims4()?;
        if fn_ != n || perm.len() != n || gh == 0 || gw == 0 || gh > h || gw > w {
            candle_core::bail!(
                "attentivemix: features {:?} / perm of {} do not fit images {:?}",
                features.dims(),
                perm.len(),
                images.dims()
            );
        }
        let cells = gh * gw;
        let attention = host_f32(&features.to_dtype(DType::F32)?.mean(1)?)?;
        let k = kept_cells(lambda, cells, self.args.top_k);
        let mut kept = Vec::with_capacity(n);
        let mut pixel_mask = Vec::with_capacity(n * h * w);
        for scores in attention.chunks(cells) {
            let top = top_k_cells(scores, k);
            let mut grid = vec![0f32; cells];
            top.iter().for_each(|&c| grid[c] = 1.0);
            pixel_mask.extend(upsample_grid(&grid, gh, gw, h, w));
            kept.push(top);
        }
        let lambda_label =
            pixel_mask[..h * w].iter().map(|&v| v as f64).sum::<f64>() / (h * w) as f64;
        let device = images.device();
        let mask = Tensor::from_vec(pixel_mask, (n, 1, h, w), device)?.to_dtype(images.dtype())?;
        let perm_t = perm_tensor(perm, device)?;
        let partner = images.index_select(&perm_t, 0)?;
        let mixed = (images.broadcast_mul(&mask)? + partner.broadcast_mul(&(1.0 - &mask)?)?)?;
        let labels =
            MixedLabels::permuted(labels, &perm_tensor(perm, labels.device())?, lambda_label)?;
        Ok((
            Mixed {
                images: mixed,
                labels,
                feature_mix: None,
                mask: Some(mask),
            },
            kept,
        ))
    }
}

impl MixMethod for AttentiveMix {
    fn name(&self) -> &'static str {
        "attentivemix"
    }

    /// Attention features of `images` first, then λ ~ Beta(α, α), then π (§5.7).
    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let model: &dyn MixModel = match ctx.model {
            Some(m) => m,
            None => {
                candle_core::bail!("attentivemix needs a model in MixContext (attention features)")
            }
        };
        let features = model.attention_features(images)?;
        let lambda = ctx.draw_lambda(self.alpha);
        let perm = permutation(ctx.rng, images.dim(0)?);
        Ok(self.mix_with(images, labels, &features, lambda, &perm)?.0)
    }
}
