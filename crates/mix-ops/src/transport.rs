//! PuzzleMix's greedy optimal-transport rearrangement (spec §5.9.5): a
//! per-sample assignment of source patches to destination patches on a `T×T`
//! grid, and the patch move it implies.

use candle_core::{DType, Result, Tensor};

/// Runs `greedy_transport(M, g, eps)` of spec §5.9.5 on one sample.
///
/// `mask` and `saliency` are the `grid × grid` cell values in row-major order
/// (`p = row·T + col`). Returns, for every destination cell `q`, the source cell
/// whose patch lands there, or `None` where no source won `q` (the reference
/// then writes an all-zero patch).
///
/// Reproduced reference behaviour: the cost is computed in `f32`; row and
/// column argmins take the first index on ties; a column whose planned costs
/// are all positive is "won" by an unplanned row (whose fight value is 0), so it
/// gets no patch at all; the plan of the last of `T` rounds is returned even if
/// conflicts remain.
pub fn greedy_transport(
    mask: &[f32],
    saliency: &[f32],
    grid: usize,
    eps: f32,
) -> Vec<Option<usize>> {
    GreedyTransport::new(grid, eps).plan(mask, saliency)
}

/// [`greedy_transport`] with the distance term `eps·C` computed once, for
/// planning many samples on the same grid.
#[derive(Debug, Clone)]
pub struct GreedyTransport {
    grid: usize,
    /// `eps·C[p,q]`, `T²×T²`, in `f32` as in the reference.
    eps_dist: Vec<f32>,
}

impl GreedyTransport {
    /// Precomputes `eps·C` for a `grid × grid` cell grid.
    pub fn new(grid: usize, eps: f32) -> Self {
        let cells = grid * grid;
        let scale = ((grid.max(2) - 1) * (grid.max(2) - 1)) as f32;
        let mut eps_dist = vec![0f32; cells * cells];
        for p in 0..cells {
            let (rp, cp) = ((p / grid) as i64, (p % grid) as i64);
            for q in 0..cells {
                let (rq, cq) = ((q / grid) as i64, (q % grid) as i64);
                let dist = ((rp - rq) * (rp - rq) + (cp - cq) * (cp - cq)) as f32 / scale;
                eps_dist[p * cells + q] = eps * dist;
            }
        }
        Self { grid, eps_dist }
    }

    /// The plan for one sample (see [`greedy_transport`]).
    pub fn plan(&self, mask: &[f32], saliency: &[f32]) -> Vec<Option<usize>> {
        let grid = self.grid;
        let cells = grid * grid;
        assert_eq!(mask.len(), cells, "mask must have grid² entries");
        assert_eq!(saliency.len(), cells, "saliency must have grid² entries");
        let mut cost = self.eps_dist.clone();
        for (p, row) in cost.chunks_mut(cells).enumerate() {
            for (c, &m) in row.iter_mut().zip(mask) {
                let occupied = if m > 0.0 { 1f32 } else { 0f32 };
                *c -= saliency[p] * occupied;
            }
        }
        let row_argmin = |cost: &[f32], p: usize| -> usize {
            let row = &cost[p * cells..(p + 1) * cells];
            let mut best = 0;
            for (q, &v) in row.iter().enumerate() {
                if v < row[best] {
                    best = q;
                }
            }
            best
        };
        let mut row_best: Vec<usize> = (0..cells).map(|p| row_argmin(&cost, p)).collect();
        let mut winner: Vec<Option<usize>> = vec![None; cells];
        // Per column: the best planned row so far (lowest cost, first row on ties).
        let mut best_planned: Vec<Option<(usize, f32)>> = vec![None; cells];
        for round in 0..grid {
            best_planned.iter_mut().for_each(|b| *b = None);
            for (p, &q) in row_best.iter().enumerate() {
                let v = cost[p * cells + q];
                if best_planned[q].is_none_or(|(_, bv)| v < bv) {
                    best_planned[q] = Some((p, v));
                }
            }
            for (q, w) in winner.iter_mut().enumerate() {
                // fight[·, q] is cost[p, q] on planned rows and 0 on the others; its
                // argmin (first row on ties) must be a planned row for q to be won.
                let first_unplanned = if row_best[0] != q {
                    Some(0)
                } else {
                    (0..cells).find(|&p| row_best[p] != q)
                };
                *w = match (best_planned[q], first_unplanned) {
                    (None, _) => None,
                    (Some((p, _)), None) => Some(p),
                    (Some((p, v)), Some(u)) => (v < 0.0 || (v == 0.0 && p < u)).then_some(p),
                };
            }
            if round + 1 == grid {
                break;
            }
            // Losers pay +1 on the cell they wanted and re-plan.
            for p in 0..cells {
                let q = row_best[p];
                if winner[q] != Some(p) {
                    cost[p * cells + q] += 1.0;
                    row_best[p] = row_argmin(&cost, p);
                }
            }
        }
        winner
    }
}

/// For every output pixel of a `side × side` image (`side = grid·patch`), the
/// input pixel it copies under a transport plan (row-major pixel indices), or
/// `None` where the destination patch has no source.
pub fn patch_pixel_sources(
    plan: &[Option<usize>],
    grid: usize,
    patch: usize,
) -> Vec<Option<usize>> {
    let side = grid * patch;
    let mut out = vec![None; side * side];
    for (q, src) in plan.iter().enumerate() {
        let Some(p) = *src else { continue };
        let (qr, qc) = (q / grid, q % grid);
        let (pr, pc) = (p / grid, p % grid);
        for dr in 0..patch {
            for dc in 0..patch {
                let dst = (qr * patch + dr) * side + qc * patch + dc;
                let src = (pr * patch + dr) * side + pc * patch + dc;
                out[dst] = Some(src);
            }
        }
    }
    out
}

/// `move_patches` of spec §5.9.5 for a whole batch: output patch `q` of sample
/// `n` is input patch `plans[n][q]` of the same sample, or all zeros where
/// there is none. `images`: `N×C×side×side` with `side = grid·patch`.
pub fn move_patches(
    images: &Tensor,
    plans: &[Vec<Option<usize>>],
    grid: usize,
    patch: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    let side = grid * patch;
    if h != side || w != side || plans.len() != n {
        candle_core::bail!(
            "move_patches: images {:?} do not match {} plans on a {grid}×{grid} grid of {patch}-pixel patches",
            images.dims(),
            plans.len()
        );
    }
    let pixels = side * side;
    let mut index = Vec::with_capacity(n * pixels);
    let mut keep = Vec::with_capacity(n * pixels);
    for (sample, plan) in plans.iter().enumerate() {
        for src in patch_pixel_sources(plan, grid, patch) {
            index.push((sample * pixels + src.unwrap_or(0)) as u32);
            keep.push(if src.is_some() { 1f32 } else { 0f32 });
        }
    }
    let device = images.device();
    let index = Tensor::from_vec(index, n * pixels, device)?;
    let keep = Tensor::from_vec(keep, (n, 1, h, w), device)?.to_dtype(images.dtype())?;
    let moved = images
        .permute((0, 2, 3, 1))?
        .reshape((n * pixels, c))?
        .index_select(&index, 0)?
        .reshape((n, h, w, c))?
        .permute((0, 3, 1, 2))?;
    moved.broadcast_mul(&keep)
}

/// Average-pools each `side × side` map of `maps` (`n` maps, row-major) with a
/// `k × k` window; returns `n` maps of `(side/k)²` values.
pub(crate) fn avg_pool_maps(maps: &[f32], n: usize, side: usize, k: usize) -> Vec<f32> {
    let g = side / k;
    let mut out = vec![0f32; n * g * g];
    for s in 0..n {
        let map = &maps[s * side * side..(s + 1) * side * side];
        for r in 0..g {
            for c in 0..g {
                let mut acc = 0f64;
                for dr in 0..k {
                    let row = (r * k + dr) * side + c * k;
                    acc += map[row..row + k].iter().map(|&v| v as f64).sum::<f64>();
                }
                out[(s * g + r) * g + c] = (acc / (k * k) as f64) as f32;
            }
        }
    }
    out
}

/// Flattens a tensor to host `f32` values.
pub(crate) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}
