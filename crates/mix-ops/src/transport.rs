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
    /// Whether every `eps·C` is finite (not so for an infinite or NaN `eps`).
    finite_dist: bool,
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
        let finite_dist = eps_dist.iter().all(|v| v.is_finite());
        Self {
            grid,
            eps_dist,
            finite_dist,
        }
    }

    /// The plan for one sample (see [`greedy_transport`]).
    pub fn plan(&self, mask: &[f32], saliency: &[f32]) -> Vec<Option<usize>> {
        let cost = self.cost(mask, saliency);
        // The lane-wise search finds the reference's argmin on NaN-free rows only. Finite
        // distances minus finite saliencies (times 0 or 1) are never NaN, and the rounds only
        // add 1; checking the T² inputs spares a scan of the T⁴ costs.
        let nan_free = self.finite_dist && saliency.iter().all(|v| v.is_finite());
        if nan_free {
            self.plan_from(cost, first_argmin_lanes)
        } else {
            self.plan_from(cost, first_argmin)
        }
    }

    /// `eps·C[p,q] − g[p]·[M[q] > 0]`, `T²×T²` row-major, in `f32` as in the reference.
    fn cost(&self, mask: &[f32], saliency: &[f32]) -> Vec<f32> {
        let cells = self.grid * self.grid;
        assert_eq!(mask.len(), cells, "mask must have grid² entries");
        assert_eq!(saliency.len(), cells, "saliency must have grid² entries");
        let mut cost = self.eps_dist.clone();
        for (p, row) in cost.chunks_mut(cells).enumerate() {
            for (c, &m) in row.iter_mut().zip(mask) {
                let occupied = if m > 0.0 { 1f32 } else { 0f32 };
                *c -= saliency[p] * occupied;
            }
        }
        cost
    }

    /// The greedy rounds on a cost matrix, with `argmin` for the row searches.
    fn plan_from(
        &self,
        mut cost: Vec<f32>,
        argmin: impl Fn(&[f32]) -> usize,
    ) -> Vec<Option<usize>> {
        let grid = self.grid;
        let cells = grid * grid;
        let row_argmin = |cost: &[f32], p: usize| argmin(&cost[p * cells..(p + 1) * cells]);
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

/// The reference's argmin: the first index of the smallest value (strict `<`, so a NaN at
/// index 0 wins and later NaNs are skipped).
fn first_argmin(row: &[f32]) -> usize {
    let mut best = 0;
    for (q, &v) in row.iter().enumerate() {
        if v < row[best] {
            best = q;
        }
    }
    best
}

/// [`first_argmin`] on a NaN-free row, as 8 interleaved searches that the compiler keeps in
/// vector registers: each lane keeps its first smallest value and index, and the lanes holding
/// the overall minimum give up their smallest index. Equal values (including `0.0` and `-0.0`)
/// resolve to the first index as in the sequential loop. Most of a transport plan's time is
/// these searches (`T` rounds of re-planning over `T²`-cell rows).
fn first_argmin_lanes(row: &[f32]) -> usize {
    const LANES: usize = 8;
    if row.len() < LANES {
        return first_argmin(row);
    }
    let (head, rest) = row.split_at(LANES);
    let mut min: [f32; LANES] = head.try_into().expect("LANES values");
    let mut at: [u32; LANES] = std::array::from_fn(|lane| lane as u32);
    let mut chunks = rest.chunks_exact(LANES);
    for (k, chunk) in chunks.by_ref().enumerate() {
        let base = ((k + 1) * LANES) as u32;
        for lane in 0..LANES {
            let smaller = chunk[lane] < min[lane];
            min[lane] = if smaller { chunk[lane] } else { min[lane] };
            at[lane] = if smaller {
                base + lane as u32
            } else {
                at[lane]
            };
        }
    }
    let tail = chunks.remainder();
    let tail_start = (row.len() - tail.len()) as u32;
    let (mut best, mut best_at) = (min[0], at[0]);
    let candidates = min.into_iter().zip(at).skip(1).chain(
        tail.iter()
            .enumerate()
            .map(|(i, &v)| (v, tail_start + i as u32)),
    );
    for (v, q) in candidates {
        if v < best || (v == best && q < best_at) {
            (best, best_at) = (v, q);
        }
    }
    best_at as usize
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn lane_argmin_is_the_sequential_first_argmin() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Few distinct values make ties; ±0 and infinities are where a careless lane search
        // and the sequential `<` part ways.
        let palette = [
            -1.5f32,
            -0.0,
            0.0,
            0.25,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for trial in 0..4000 {
            let len = 1 + trial % 70;
            let row: Vec<f32> = (0..len)
                .map(|_| match rng.random_range(0..4) {
                    0 => rng.random_range(-2.0..2.0),
                    _ => palette[rng.random_range(0..palette.len() - (trial % 3))],
                })
                .collect();
            assert_eq!(
                first_argmin_lanes(&row),
                first_argmin(&row),
                "trial {trial}: {row:?}"
            );
        }
        assert_eq!(first_argmin_lanes(&[f32::INFINITY; 13]), 0);
        assert_eq!(
            first_argmin_lanes(&[0.0, 1.0, -0.0, 2.0, 3.0, 4.0, 5.0, 6.0, -0.0]),
            0
        );
    }

    #[test]
    fn plans_with_the_lane_search_equal_the_sequential_ones() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for trial in 0..120 {
            let grid = [2usize, 4, 8, 16][trial % 4];
            let cells = grid * grid;
            let mask: Vec<f32> = (0..cells)
                .map(|_| [0.0, 0.5, 1.0][rng.random_range(0..3)])
                .collect();
            // Coarse saliency values create ties in the costs.
            let mut saliency: Vec<f32> = (0..cells)
                .map(|_| rng.random_range(0..4) as f32 / cells as f32)
                .collect();
            match trial % 10 {
                7 => saliency[rng.random_range(0..cells)] = f32::INFINITY,
                9 => saliency[rng.random_range(0..cells)] = f32::NAN,
                _ => {}
            }
            let eps = [0.8f32, 0.01, 0.0, f32::NAN, f32::INFINITY][trial % 5];
            let planner = GreedyTransport::new(grid, eps);
            let cost = planner.cost(&mask, &saliency);
            assert_eq!(
                planner.plan(&mask, &saliency),
                planner.plan_from(cost, first_argmin),
                "trial {trial}"
            );
        }
    }
}
