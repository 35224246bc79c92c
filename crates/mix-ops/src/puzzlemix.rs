//! PuzzleMix (spec §5.9): saliency-guided multi-label graph-cut masks on a
//! random `B×B` block grid, plus a greedy optimal-transport rearrangement of
//! both images, with one λ per sample.
//!
//! The method needs the network: the saliency is the input gradient of the
//! plain cross-entropy, obtained through [`MixModel::input_gradient`], which the
//! caller must compute with the model in evaluation mode and without touching
//! parameters, gradients of parameters or BatchNorm running statistics (spec
//! §5.9.1; the runner's implementation is checked by the lead).
//!
//! Per-sample λ: the labels are `(y, y[π], λ)` with `λ_n = mean(M_n)`, returned
//! as [`Lambda::PerSample`]; they must be consumed by the CE_soft loss (§3.4).
//!
//! Reference behaviour reproduced here (all in spec §5.9):
//! * the block count is `B = 2^U{1..block_num−1}` (`block_num = 5` → {2,4,8,16});
//! * the graph-cut prior `α0 ~ Beta(α, α)` is *not* the label weight; λ is the
//!   mask mean;
//! * energies are truncated to integers before the α-β-swap (GCO's int32 costs),
//!   which starts from all labels 0, applies every swap move, keeps tied sites on the smaller
//!   label and stops after a cycle with no decrease, as GCO's `swap` (see [`crate::graphcut`]);
//! * the greedy transport can leave destination patches without a source; they
//!   become zeros (the normalized value 0) where the final mask selects them.
//!
//! Deviations, documented:
//! * the data costs stay exact (i64). The reference's gco-wrapper scales its int32 data costs
//!   by 100,000 in int32, which wraps around when one block holds a large share of the
//!   saliency (about a third at `B = 8`, under a tenth at `B = 16`) and then drops that block;
//! * a sample whose pooled saliency sums to zero (or is not finite) gets a
//!   uniform saliency instead of the reference's division by zero (NaN costs);
//! * negative quantized edge weights, only possible when de-normalized pixels
//!   leave `[0, 1]` (never for real CIFAR images, spec §5.9.4), are clamped to 0
//!   so that every swap move stays an exact min-cut;
//! * `t_batch_size` only chunks the reference's transport computation; the
//!   result does not depend on it, so it is accepted and ignored.

use candle_core::{DType, Result, Tensor};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use crate::args::MixArgs;
use crate::graphcut::GridEnergy;
use crate::labels::{Lambda, MixedLabels};
use crate::norm::{CIFAR10_MEAN, CIFAR10_STD};
use crate::sample::{beta_lambda, perm_tensor, permutation};
use crate::transport::{avg_pool_maps, host_f32, move_patches, GreedyTransport};
use crate::{MixContext, MixMethod, MixModel, Mixed};

/// PuzzleMix `mix_args` (spec §5.0). `Default` is the CIFAR-10 config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PuzzleMixArgs {
    /// Apply the optimal-transport rearrangement (§5.9.5).
    pub transport: bool,
    /// Chunk size of the reference's transport loop; has no effect on results.
    pub t_batch_size: Option<usize>,
    /// Transport patch side in pixels (`ts = min(t_size, s)`); −1 = the block side `s`.
    pub t_size: i64,
    /// The block count is drawn as `B = 2^U{1..block_num−1}` (2 ≤ block_num ≤ 6).
    pub block_num: usize,
    /// Smoothness weight; rescaled per batch to `β' = beta / B / 16`.
    pub beta: f64,
    /// Weight of the image-border discontinuity term within the pairwise cost.
    pub gamma: f64,
    /// Weight of the label prior pulling the mask mean toward `α0`.
    pub eta: f64,
    /// Pooling window of the border-discontinuity term (`ns = min(neigh_size, s)`).
    pub neigh_size: usize,
    /// Number of mask levels (2 → {0,1}, 3 → {0,0.5,1}).
    pub n_labels: usize,
    /// Distance weight of the transport cost.
    pub t_eps: f64,
}

impl Default for PuzzleMixArgs {
    fn default() -> Self {
        Self {
            transport: true,
            t_batch_size: None,
            t_size: 4,
            block_num: 5,
            beta: 1.2,
            gamma: 0.5,
            eta: 0.2,
            neigh_size: 4,
            n_labels: 3,
            t_eps: 0.8,
        }
    }
}

impl MixArgs for PuzzleMixArgs {
    fn validate(&self) -> std::result::Result<(), String> {
        let field = |name: &str, msg: String| Err(format!("{name}: {msg}"));
        if !(2..=6).contains(&self.block_num) {
            return field(
                "block_num",
                format!(
                    "must be in 2..=6 (B = 2^U{{1..block_num−1}} ≤ 32), got {}",
                    self.block_num
                ),
            );
        }
        if self.t_size != -1 && !(self.t_size > 0 && (self.t_size as u64).is_power_of_two()) {
            return field(
                "t_size",
                format!("must be −1 or a positive power of two, got {}", self.t_size),
            );
        }
        if !self.neigh_size.is_power_of_two() {
            return field(
                "neigh_size",
                format!("must be a positive power of two, got {}", self.neigh_size),
            );
        }
        if !(2..=3).contains(&self.n_labels) {
            return field("n_labels", format!("must be 2 or 3, got {}", self.n_labels));
        }
        if self.t_batch_size == Some(0) {
            return field("t_batch_size", "must be positive or null".into());
        }
        for (name, v) in [
            ("beta", self.beta),
            ("gamma", self.gamma),
            ("eta", self.eta),
            ("t_eps", self.t_eps),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return field(name, format!("must be finite and ≥ 0, got {v}"));
            }
        }
        Ok(())
    }
}

/// PuzzleMix with its α (CIFAR-10 benchmark value: 1.0) and `mix_args`.
#[derive(Debug, Clone, PartialEq)]
pub struct PuzzleMix {
    /// Beta(α, α) parameter of the graph-cut prior `α0`.
    pub alpha: f64,
    /// Method hyper-parameters.
    pub args: PuzzleMixArgs,
}

impl Default for PuzzleMix {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            args: PuzzleMixArgs::default(),
        }
    }
}

/// The per-batch random quantities of §5.9.2.
#[derive(Debug, Clone, PartialEq)]
pub struct PuzzleDraws {
    /// Graph-cut prior `α0 ~ Beta(α, α)`.
    pub alpha0: f64,
    /// Partner permutation π.
    pub perm: Vec<u32>,
    /// Blocks per side `B`.
    pub blocks: usize,
}

/// Intermediate results of one PuzzleMix step, for tests and previews.
#[derive(Debug, Clone)]
pub struct PuzzleTrace {
    /// The random draws used.
    pub draws: PuzzleDraws,
    /// Per-sample block masks (`B×B`, row-major, values `1 − l/(n_labels−1)`).
    pub block_masks: Vec<Vec<f32>>,
    /// The transport step, when enabled.
    pub transport: Option<TransportTrace>,
}

/// The transport plans of one batch (§5.9.5).
#[derive(Debug, Clone)]
pub struct TransportTrace {
    /// Transport cells per side `T`.
    pub grid: usize,
    /// Patch side in pixels `ts`.
    pub patch: usize,
    /// Per sample, for each destination cell, the source cell of `x` (plan1).
    pub plan_self: Vec<Vec<Option<usize>>>,
    /// Per sample, for each destination cell, the source cell of `x[π]` (plan2).
    pub plan_partner: Vec<Vec<Option<usize>>>,
}

/// `S[n,h,w] = sqrt(mean_c(g[n,c,h,w]²))` (spec §5.9.1), as `N×H×W` `f32`.
pub fn saliency_from_gradient(grad: &Tensor) -> Result<Tensor> {
    grad.to_dtype(DType::F32)?.sqr()?.mean(1)?.sqrt()
}

impl PuzzleMix {
    /// Draws `α0`, then π, then `B`, in the order of §5.9.2.
    pub fn draw(&self, rng: &mut dyn RngCore, batch: usize) -> PuzzleDraws {
        let alpha0 = beta_lambda(rng, self.alpha);
        let perm = permutation(rng, batch);
        let exponent = rng.random_range(1..self.args.block_num as u32);
        PuzzleDraws {
            alpha0,
            perm,
            blocks: 1usize << exponent,
        }
    }

    /// The deterministic part of PuzzleMix: mixes `images` (`N×3×side×side`,
    /// CIFAR-normalized) given their saliency (`N×side×side`) and the draws.
    pub fn mix_with(
        &self,
        images: &Tensor,
        labels: &Tensor,
        saliency: &Tensor,
        draws: &PuzzleDraws,
    ) -> Result<(Mixed, PuzzleTrace)> {
        let args = &self.args;
        let (n, channels, h, w) = images.dims4()?;
        if channels != 3 || h != w {
            candle_core::bail!(
                "puzzlemix expects N×3×S×S CIFAR-normalized images, got {:?}",
                images.dims()
            );
        }
        if saliency.dims() != [n, h, w] {
            candle_core::bail!(
                "puzzlemix: saliency {:?} does not match images {:?}",
                saliency.dims(),
                images.dims()
            );
        }
        let side = h;
        let blocks = draws.blocks;
        if draws.perm.len() != n || blocks < 2 || !side.is_multiple_of(blocks) {
            candle_core::bail!(
                "puzzlemix: draws (perm of {}, B = {blocks}) do not fit a batch of {n} {side}×{side} images",
                draws.perm.len()
            );
        }
        let block_side = side / blocks;
        let neigh = args.neigh_size.min(block_side);
        let t_side = if args.t_size < 0 {
            block_side
        } else {
            (args.t_size as usize).min(block_side)
        };
        if !block_side.is_multiple_of(neigh) || !side.is_multiple_of(t_side) {
            candle_core::bail!(
                "puzzlemix: block side {block_side} is not a multiple of neigh_size {neigh} / t_size {t_side}"
            );
        }
        let perm: Vec<usize> = draws.perm.iter().map(|&p| p as usize).collect();

        let sal = host_f32(saliency)?;
        let block_sal = normalized_pooled_saliency(&sal, n, side, block_side);
        let (pooled_px, pooled_side) = pooled_denormalized(images, neigh)?;

        let cells = blocks * blocks;
        let block_masks: Vec<Vec<f32>> = par_map(n, |i| {
            let p = perm[i];
            let pix_self =
                &pooled_px[i * 3 * pooled_side * pooled_side..][..3 * pooled_side * pooled_side];
            let pix_partner =
                &pooled_px[p * 3 * pooled_side * pooled_side..][..3 * pooled_side * pooled_side];
            self.block_mask(
                &block_sal[i * cells..(i + 1) * cells],
                &block_sal[p * cells..(p + 1) * cells],
                pix_self,
                pix_partner,
                pooled_side,
                blocks,
                draws.alpha0,
            )
        });

        let device = images.device();
        let perm_t = perm_tensor(&draws.perm, device)?;
        let partner = images.index_select(&perm_t, 0)?;
        let (grid, cell_masks, transport) = if args.transport {
            let (grid, patch, g1) = if t_side < block_side {
                let grid = side / t_side;
                (
                    grid,
                    t_side,
                    normalized_pooled_saliency(&sal, n, side, t_side),
                )
            } else {
                (blocks, block_side, block_sal.clone())
            };
            let cells_t = grid * grid;
            let masks: Vec<Vec<f32>> = block_masks
                .iter()
                .map(|m| nearest_resize(m, blocks, grid))
                .collect();
            let planner = GreedyTransport::new(grid, args.t_eps as f32);
            let plan_self = par_map(n, |i| {
                planner.plan(&masks[i], &g1[i * cells_t..(i + 1) * cells_t])
            });
            let plan_partner = par_map(n, |i| {
                let inverse: Vec<f32> = masks[i].iter().map(|&m| 1.0 - m).collect();
                let p = perm[i];
                planner.plan(&inverse, &g1[p * cells_t..(p + 1) * cells_t])
            });
            (
                grid,
                masks,
                Some(TransportTrace {
                    grid,
                    patch,
                    plan_self,
                    plan_partner,
                }),
            )
        } else {
            (blocks, block_masks.clone(), None)
        };

        let (x1, x2) = match &transport {
            Some(t) => (
                move_patches(images, &t.plan_self, t.grid, t.patch)?,
                move_patches(&partner, &t.plan_partner, t.grid, t.patch)?,
            ),
            None => (images.clone(), partner),
        };
        let pixel_mask: Vec<f32> = cell_masks
            .iter()
            .flat_map(|m| nearest_resize(m, grid, side))
            .collect();
        let lambdas: Vec<f32> = cell_masks
            .iter()
            .map(|m| (m.iter().map(|&v| v as f64).sum::<f64>() / m.len() as f64) as f32)
            .collect();
        let mask =
            Tensor::from_vec(pixel_mask, (n, 1, side, side), device)?.to_dtype(images.dtype())?;
        let mixed = (x1.broadcast_mul(&mask)? + x2.broadcast_mul(&(1.0 - &mask)?)?)?;
        let lambda = Tensor::from_vec(lambdas, n, labels.device())?;
        let labels = MixedLabels {
            y_a: labels.clone(),
            y_b: labels.index_select(&perm_tensor(&draws.perm, labels.device())?, 0)?,
            lambda: Lambda::PerSample(lambda),
        };
        Ok((
            Mixed {
                images: mixed,
                labels,
                feature_mix: None,
                mask: Some(mask),
            },
            PuzzleTrace {
                draws: draws.clone(),
                block_masks,
                transport,
            },
        ))
    }

    /// Unary/pairwise terms (§5.9.3) and graph-cut labelling (§5.9.4) of one sample.
    #[allow(clippy::too_many_arguments)]
    fn block_mask(
        &self,
        sal_self: &[f32],
        sal_partner: &[f32],
        pix_self: &[f32],
        pix_partner: &[f32],
        pooled_side: usize,
        blocks: usize,
        alpha0: f64,
    ) -> Vec<f32> {
        let args = &self.args;
        let b = blocks;
        let k = pooled_side / b;
        let beta = (args.beta / b as f64 / 16.0) as f32;
        let scale = beta * args.gamma as f32;
        // Index 0 = partner, 1 = self; first argument = upper/left block.
        let pix = [pix_partner, pix_self];
        let mut px = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        let mut py = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        for a in 0..2 {
            for c in 0..2 {
                let (x, y) = neighbour_penalty(pix[a], pix[c], pooled_side, k, b);
                px[a][c] = x.into_iter().map(|v| v * scale).collect();
                py[a][c] = y.into_iter().map(|v| v * scale).collect();
            }
        }
        let mut u1 = sal_self.to_vec();
        let mut u2 = sal_partner.to_vec();
        // Vertical borders: px index (m, col) = border between block rows m and m+1.
        for m in 0..b - 1 {
            for col in 0..b {
                let e = m * b + col;
                let upper = m * b + col;
                let lower = (m + 1) * b + col;
                u2[upper] += (px[1][0][e] + px[1][1][e]) / 2.0;
                u1[upper] += (px[0][1][e] + px[0][0][e]) / 2.0;
                u2[lower] += (px[0][1][e] + px[1][1][e]) / 2.0;
                u1[lower] += (px[1][0][e] + px[0][0][e]) / 2.0;
            }
        }
        // Horizontal borders: py index (row, m) = border between block columns m and m+1.
        for row in 0..b {
            for m in 0..b - 1 {
                let e = row * (b - 1) + m;
                let left = row * b + m;
                let right = row * b + m + 1;
                u2[left] += (py[1][0][e] + py[1][1][e]) / 2.0;
                u1[left] += (py[0][1][e] + py[0][0][e]) / 2.0;
                u2[right] += (py[0][1][e] + py[1][1][e]) / 2.0;
                u1[right] += (py[1][0][e] + py[0][0][e]) / 2.0;
            }
        }
        let smooth = |p: &[[Vec<f32>; 2]; 2], e: usize| {
            (p[1][0][e] + p[0][1][e] - p[1][1][e] - p[0][0][e]) / 2.0
        };

        let levels = args.n_labels;
        let steps = (levels - 1) as f64;
        let big = 1000.0 * (b * b) as f64;
        let eps = 1e-8;
        let prior: Vec<f64> = if levels == 3 {
            vec![
                -(alpha0 * alpha0 + eps).ln(),
                -(2.0 * alpha0 * (1.0 - alpha0) + eps).ln(),
                -((1.0 - alpha0) * (1.0 - alpha0) + eps).ln(),
            ]
        } else {
            vec![-(alpha0 + eps).ln(), -(1.0 - alpha0 + eps).ln()]
        }
        .into_iter()
        .map(|v| v * args.eta / (b * b) as f64)
        .collect();
        // V = (l − l')²/(L−1)²: every term is scaled by (L−1)² so that it stays integral.
        let v_scale = (levels - 1) * (levels - 1);
        let mut data = Vec::with_capacity(b * b * levels);
        for s in 0..b * b {
            for (l, prior_l) in prior.iter().enumerate() {
                let t = l as f64 / steps;
                let cost = big * ((1.0 - t) * u2[s] as f64 + t * u1[s] as f64 + prior_l);
                data.push(truncate_i32(cost) * v_scale as i64);
            }
        }
        let edge = |w: f32| truncate_i32(big * (w as f64 + beta as f64)).max(0);
        let vertical = (0..(b - 1) * b).map(|e| edge(smooth(&px, e))).collect();
        let horizontal = (0..b * (b - 1)).map(|e| edge(smooth(&py, e))).collect();
        let label_cost = (0..levels * levels)
            .map(|i| {
                let d = (i / levels) as i64 - (i % levels) as i64;
                d * d
            })
            .collect();
        let energy = GridEnergy {
            rows: b,
            cols: b,
            num_labels: levels,
            data,
            label_cost,
            vertical,
            horizontal,
        };
        debug_assert!(energy.validate().is_ok());
        energy
            .alpha_beta_swap(&vec![0; b * b])
            .into_iter()
            .map(|l| (1.0 - l as f64 / steps) as f32)
            .collect()
    }
}

impl MixMethod for PuzzleMix {
    fn name(&self) -> &'static str {
        "puzzlemix"
    }

    /// Saliency pass on `images` (through [`MixModel::input_gradient`], which must
    /// not change parameters or BatchNorm statistics), then the draws of §5.9.2,
    /// then [`PuzzleMix::mix_with`].
    fn mix(&self, images: &Tensor, labels: &Tensor, ctx: &mut MixContext<'_>) -> Result<Mixed> {
        let model: &dyn MixModel = match ctx.model {
            Some(m) => m,
            None => candle_core::bail!("puzzlemix needs a model in MixContext (input gradient)"),
        };
        let saliency = saliency_from_gradient(&model.input_gradient(images, labels)?)?;
        let draws = self.draw(ctx.rng, images.dim(0)?);
        Ok(self.mix_with(images, labels, &saliency, &draws)?.0)
    }
}

/// Maps `f` over `0..n` on up to [`crate::worker_threads`] threads (the graph
/// cuts and transport plans of different samples are independent); the result
/// does not depend on the thread count.
fn par_map<T: Send, F: Fn(usize) -> T + Sync>(n: usize, f: F) -> Vec<T> {
    let threads = crate::worker_threads().min(n);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                scope.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(f)
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("puzzlemix worker thread panicked"))
            .collect()
    })
}

/// numpy's `astype(int32)` on in-range values: truncation toward zero.
fn truncate_i32(v: f64) -> i64 {
    v.trunc().clamp(i32::MIN as f64, i32::MAX as f64) as i64
}

/// Average-pools each saliency map with a `k × k` window and normalizes it to
/// sum 1 per sample (uniform if the sum is zero or not finite).
fn normalized_pooled_saliency(sal: &[f32], n: usize, side: usize, k: usize) -> Vec<f32> {
    let mut pooled = avg_pool_maps(sal, n, side, k);
    let cells = (side / k) * (side / k);
    for map in pooled.chunks_mut(cells) {
        let total: f32 = map.iter().sum();
        if total.is_finite() && total > 0.0 {
            map.iter_mut().for_each(|v| *v /= total);
        } else {
            map.iter_mut().for_each(|v| *v = 1.0 / cells as f32);
        }
    }
    pooled
}

/// `avgpool_ns(x·std + mean)` on the device, returned on the host (`N×3×G×G`, G = side/ns).
fn pooled_denormalized(images: &Tensor, neigh: usize) -> Result<(Vec<f32>, usize)> {
    let device = images.device();
    let std = Tensor::new(&CIFAR10_STD.map(|v| v as f32), device)?.reshape((1, 3, 1, 1))?;
    let mean = Tensor::new(&CIFAR10_MEAN.map(|v| v as f32), device)?.reshape((1, 3, 1, 1))?;
    let pixels = images
        .to_dtype(DType::F32)?
        .broadcast_mul(&std)?
        .broadcast_add(&mean)?;
    let pooled = if neigh > 1 {
        pixels.avg_pool2d(neigh)?
    } else {
        pixels
    };
    let side = pooled.dim(3)?;
    Ok((host_f32(&pooled)?, side))
}

/// `NPx` and `NPy` of §5.9.3 for one pair of pooled images (`3×G×G` each, G = B·k):
/// the mean absolute channel difference across each block border, averaged over
/// the `k` pooled pixels along the border. Returns `((B−1)×B, B×(B−1))`.
fn neighbour_penalty(
    upper: &[f32],
    lower: &[f32],
    g: usize,
    k: usize,
    b: usize,
) -> (Vec<f32>, Vec<f32>) {
    let at = |img: &[f32], ch: usize, r: usize, c: usize| img[(ch * g + r) * g + c];
    let channel_mean = |r1: usize, c1: usize, r2: usize, c2: usize| -> f32 {
        (0..3)
            .map(|ch| (at(upper, ch, r1, c1) - at(lower, ch, r2, c2)).abs())
            .sum::<f32>()
            / 3.0
    };
    let mut px = vec![0f32; (b - 1) * b];
    let mut py = vec![0f32; b * (b - 1)];
    for m in 0..b - 1 {
        let edge_line = (m + 1) * k - 1;
        for blk in 0..b {
            let along: f32 = (blk * k..blk * k + k)
                .map(|c| channel_mean(edge_line, c, edge_line + 1, c))
                .sum();
            px[m * b + blk] = along / k as f32;
            let along: f32 = (blk * k..blk * k + k)
                .map(|r| channel_mean(r, edge_line, r, edge_line + 1))
                .sum();
            py[blk * (b - 1) + m] = along / k as f32;
        }
    }
    (px, py)
}

/// Nearest-neighbour resize of a square `from × from` map to `to × to`
/// (`src = floor(dst·from/to)`, PyTorch's `nearest`).
pub fn nearest_resize(map: &[f32], from: usize, to: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(to * to);
    for r in 0..to {
        let sr = r * from / to;
        for c in 0..to {
            out.push(map[sr * from + c * from / to]);
        }
    }
    out
}
