//! Winograd F(4×4, 3×3): each 4×4 block of outputs ("tile") from a 6×6 block of the input,
//! 36 transform positions, 2.25 multiply-adds per output and channel pair where F(2×2, 3×3)
//! needs 4 (the interpolation points 0, ±1, ±2 and ∞ of Lavin & Gray, 2016).
//!
//! Every transform works one channel at a time over the tiles of all of a chunk's images
//! (`T` of them), so its arithmetic runs in `T`-long vectors whatever the plane size: a tile's
//! 36 inputs (or 16 output gradients) are first gathered element by element into `T`-long
//! rows. The weight transforms run in f64 over all input channels at once (they are per
//! channel pair, not per tile, so f64 costs little) and keep their rounding out of the error
//! budget.

use super::{give_back, plane_stride, take_buffer, tile_grid, Tile};
use crate::cpu::conv::ConvGeom;
use rayon::prelude::*;

/// The F(4×4, 3×3) variant.
pub(crate) struct F4;

/// Side of the input tile.
const SIDE: usize = 6;

/// `G` (6×3): `U = G g Gᵀ`.
const G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

impl Tile for F4 {
    const OUT: usize = 4;
    const XI: usize = SIDE * SIDE;
    // A tile is 4× the outputs of an F(2×2, 3×3) tile: a quarter of its tile counts gives
    // chunks of the same images.
    const FORWARD_TILES: usize = 128;
    const BACKWARD_TILES: usize = 256;

    fn transform_weight(k_out: usize, c_in: usize, weight: &[f32]) -> Vec<f32> {
        let mut u = vec![0f32; Self::XI * k_out * c_in];
        u.par_chunks_mut(Self::XI * c_in)
            .enumerate()
            .for_each_init(Vec::new, |buf, (k, u_k)| {
                let g_k = &weight[k * c_in * 9..][..c_in * 9];
                crate::cpu::with_avx2(
                    #[inline(always)]
                    || transform_weight_row(c_in, g_k, u_k, buf),
                )
            });
        u
    }

    #[inline(always)]
    fn transform_input(
        g: &ConvGeom,
        x: &[f32],
        images: usize,
        v: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        transform_input(g, x, images, v, scratch)
    }

    #[inline(always)]
    fn transform_output(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32]) {
        transform_output(g, m, images, out)
    }

    #[inline(always)]
    fn transform_grad_out(g: &ConvGeom, dy: &[f32], images: usize, z: &mut [f32]) {
        transform_grad_out(g, dy, images, z)
    }

    fn weight_grad_from_transformed(k_out: usize, c_in: usize, du: &[f32], grad_w: &mut [f32]) {
        grad_w[..k_out * c_in * 9]
            .par_chunks_mut(c_in * 9)
            .enumerate()
            .for_each_init(Vec::new, |buf, (k, grad_k)| {
                let du_k = &du[k * Self::XI * c_in..][..Self::XI * c_in];
                crate::cpu::with_avx2(
                    #[inline(always)]
                    || weight_grad_row(c_in, du_k, grad_k, buf),
                )
            });
    }
}

/// `out = Σ coef · row` over three `(coef, row)` terms, element-wise in f64.
#[inline(always)]
fn combine3(out: &mut [f64], terms: [(f64, &[f64]); 3]) {
    let n = out.len();
    let [(a, x), (b, y), (c, z)] = terms.map(|(k, r)| (k, &r[..n]));
    for t in 0..n {
        out[t] = a * x[t] + b * y[t] + c * z[t];
    }
}

/// `U[ξ][c]` of one output channel from its `[C, 3, 3]` kernel `g`, in f64 over all `c` at
/// once: `G g` (6×3), then `(G g) Gᵀ` (6×6). `buf`: the thread's scratch, every part of which
/// is written before it is read.
#[inline(always)]
fn transform_weight_row(c_in: usize, g: &[f32], u_k: &mut [f32], buf: &mut Vec<f64>) {
    buf.resize((9 + 18 + 1) * c_in, 0.0);
    let (rows, rest) = buf.split_at_mut(9 * c_in);
    let (gg, out) = rest.split_at_mut(18 * c_in);
    for (c, kernel) in g.chunks_exact(9).enumerate() {
        for (rs, &v) in kernel.iter().enumerate() {
            rows[rs * c_in + c] = v as f64;
        }
    }
    let row = |rs: usize| &rows[rs * c_in..][..c_in];
    for i in 0..SIDE {
        for s in 0..3 {
            let terms = [0, 1, 2].map(|r| (G[i][r], row(r * 3 + s)));
            combine3(&mut gg[(i * 3 + s) * c_in..][..c_in], terms);
        }
    }
    for i in 0..SIDE {
        let gg_row = |s: usize| &gg[(i * 3 + s) * c_in..][..c_in];
        for (j, gj) in G.iter().enumerate() {
            combine3(out, [0, 1, 2].map(|s| (gj[s], gg_row(s))));
            for (d, &v) in u_k[(i * SIDE + j) * c_in..][..c_in]
                .iter_mut()
                .zip(out.iter())
            {
                *d = v as f32;
            }
        }
    }
}

/// `∂g[c]` (`[C, 3, 3]`) of one output channel from its `∂U[ξ][c]`, in f64 over all `c` at
/// once: `Gᵀ ∂U` (3×6), then `(Gᵀ ∂U) G` (3×3). `buf`: as for [`transform_weight_row`].
#[inline(always)]
fn weight_grad_row(c_in: usize, du_k: &[f32], grad_k: &mut [f32], buf: &mut Vec<f64>) {
    buf.resize((SIDE * SIDE + 3 * SIDE + 1) * c_in, 0.0);
    let (rows, rest) = buf.split_at_mut(SIDE * SIDE * c_in);
    let (q, out) = rest.split_at_mut(3 * SIDE * c_in);
    for (d, &v) in rows.iter_mut().zip(du_k) {
        *d = v as f64;
    }
    let row = |i: usize, j: usize| &rows[(i * SIDE + j) * c_in..][..c_in];
    for r in 0..3 {
        for j in 0..SIDE {
            let dst = &mut q[(r * SIDE + j) * c_in..][..c_in];
            dst.fill(0.0);
            for (i, gi) in G.iter().enumerate() {
                if gi[r] != 0.0 {
                    for (d, &v) in dst.iter_mut().zip(row(i, j)) {
                        *d += gi[r] * v;
                    }
                }
            }
        }
    }
    for r in 0..3 {
        for s in 0..3 {
            out.fill(0.0);
            for (j, gj) in G.iter().enumerate() {
                if gj[s] != 0.0 {
                    for (d, &v) in out.iter_mut().zip(&q[(r * SIDE + j) * c_in..][..c_in]) {
                        *d += v * gj[s];
                    }
                }
            }
            for (c, &v) in out.iter().enumerate() {
                grad_k[c * 9 + r * 3 + s] = v as f32;
            }
        }
    }
}

/// Row `i` of `Bᵀ d` for six rows `d` (element-wise over the tiles):
/// `Bᵀ = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
/// 0 4 0 -5 0 1]`.
#[inline(always)]
fn b_transpose_row(i: usize, dst: &mut [f32], d: [&[f32]; SIDE]) {
    let n = dst.len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|s| &s[..n]);
    match i {
        0 => (0..n).for_each(|t| dst[t] = 4.0 * d0[t] - 5.0 * d2[t] + d4[t]),
        1 => (0..n).for_each(|t| dst[t] = (d3[t] + d4[t]) - 4.0 * (d1[t] + d2[t])),
        2 => (0..n).for_each(|t| dst[t] = (d4[t] - d3[t]) + 4.0 * (d1[t] - d2[t])),
        3 => (0..n).for_each(|t| dst[t] = (d4[t] - d2[t]) + 2.0 * (d3[t] - d1[t])),
        4 => (0..n).for_each(|t| dst[t] = (d4[t] - d2[t]) - 2.0 * (d3[t] - d1[t])),
        _ => (0..n).for_each(|t| dst[t] = 4.0 * d1[t] - 5.0 * d3[t] + d5[t]),
    }
}

/// Row `i` of `Aᵀ m` for six rows `m`:
/// `Aᵀ = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]`.
#[inline(always)]
fn a_transpose_row(i: usize, dst: &mut [f32], m: [&[f32]; SIDE]) {
    let n = dst.len();
    let [m0, m1, m2, m3, m4, m5] = m.map(|s| &s[..n]);
    match i {
        0 => (0..n).for_each(|t| dst[t] = m0[t] + (m1[t] + m2[t]) + (m3[t] + m4[t])),
        1 => (0..n).for_each(|t| dst[t] = (m1[t] - m2[t]) + 2.0 * (m3[t] - m4[t])),
        2 => (0..n).for_each(|t| dst[t] = (m1[t] + m2[t]) + 4.0 * (m3[t] + m4[t])),
        _ => (0..n).for_each(|t| dst[t] = (m1[t] - m2[t]) + 8.0 * (m3[t] - m4[t]) + m5[t]),
    }
}

/// Row `r` of `A d` for four rows `d` (`A = Aᵀᵀ`, 6×4).
#[inline(always)]
fn a_row(r: usize, dst: &mut [f32], d: [&[f32]; 4]) {
    let n = dst.len();
    let [d0, d1, d2, d3] = d.map(|s| &s[..n]);
    match r {
        0 => dst.copy_from_slice(d0),
        1 => (0..n).for_each(|t| dst[t] = (d0[t] + d1[t]) + (d2[t] + d3[t])),
        2 => (0..n).for_each(|t| dst[t] = (d0[t] - d1[t]) + (d2[t] - d3[t])),
        3 => (0..n).for_each(|t| dst[t] = (d0[t] + 4.0 * d2[t]) + 2.0 * (d1[t] + 4.0 * d3[t])),
        4 => (0..n).for_each(|t| dst[t] = (d0[t] + 4.0 * d2[t]) - 2.0 * (d1[t] + 4.0 * d3[t])),
        _ => dst.copy_from_slice(d3),
    }
}

/// See [`Tile::transform_input`].
#[inline(always)]
fn transform_input(g: &ConvGeom, x: &[f32], images: usize, v: &mut [f32], scratch: &mut Vec<f32>) {
    let (th, tw, tiles) = tile_grid(g, 4);
    let t_total = images * tiles;
    // Zero-padded plane, row-major: rows -1..=4·th, columns -1..=4·tw.
    let (ph, pw) = (4 * th + 2, 4 * tw + 2);
    scratch.clear();
    scratch.resize(ph * pw + (SIDE * SIDE + SIDE) * t_total, 0.0);
    let (pad, rest) = scratch.split_at_mut(ph * pw);
    let (gathered, rows) = rest.split_at_mut(SIDE * SIDE * t_total);
    let plane = g.h * g.w;
    let xi_stride = plane_stride(g.c_in * t_total);
    for c in 0..g.c_in {
        for b in 0..images {
            let src = &x[(b * g.c_in + c) * plane..][..plane];
            for y in 0..g.h {
                pad[(y + 1) * pw + 1..][..g.w].copy_from_slice(&src[y * g.w..][..g.w]);
            }
            for ty in 0..th {
                let at = b * tiles + ty * tw;
                for r in 0..SIDE {
                    let line = &pad[(4 * ty + r) * pw..][..pw];
                    for tx in 0..tw {
                        let cells: &[f32; SIDE] = line[4 * tx..][..SIDE].try_into().unwrap();
                        for (j, &value) in cells.iter().enumerate() {
                            gathered[(r * SIDE + j) * t_total + at + tx] = value;
                        }
                    }
                }
            }
        }
        let d = |r: usize, j: usize| &gathered[(r * SIDE + j) * t_total..][..t_total];
        for i in 0..SIDE {
            // Bᵀ on the rows (for each column j) …
            for j in 0..SIDE {
                let dst = &mut rows[j * t_total..][..t_total];
                b_transpose_row(i, dst, std::array::from_fn(|r| d(r, j)));
            }
            // … then B on the columns.
            let cols: [&[f32]; SIDE] = std::array::from_fn(|j| &rows[j * t_total..][..t_total]);
            for jj in 0..SIDE {
                let dst = &mut v[(i * SIDE + jj) * xi_stride + c * t_total..][..t_total];
                b_transpose_row(jj, dst, cols);
            }
        }
    }
}

/// See [`Tile::transform_output`].
#[inline(always)]
fn transform_output(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32]) {
    let (th, tw, tiles) = tile_grid(g, 4);
    let t_total = images * tiles;
    let (ho, wo) = (g.h_out, g.w_out);
    let xi_stride = plane_stride(g.c_out * t_total);
    let mut buf = take_buffer((4 * SIDE + 16) * t_total);
    let (s, y) = buf[..(4 * SIDE + 16) * t_total].split_at_mut(4 * SIDE * t_total);
    for k in 0..g.c_out {
        let mm = |i: usize, j: usize| &m[(i * SIDE + j) * xi_stride + k * t_total..][..t_total];
        // Aᵀ M on the rows: s[i][j] for each column j …
        for i in 0..4 {
            for j in 0..SIDE {
                let dst = &mut s[(i * SIDE + j) * t_total..][..t_total];
                a_transpose_row(i, dst, std::array::from_fn(|r| mm(r, j)));
            }
        }
        // … then A on the columns: y[i][jj].
        for i in 0..4 {
            let cols: [&[f32]; SIDE] =
                std::array::from_fn(|j| &s[(i * SIDE + j) * t_total..][..t_total]);
            for jj in 0..4 {
                a_transpose_row(jj, &mut y[(i * 4 + jj) * t_total..][..t_total], cols);
            }
        }
        for b in 0..images {
            let dst = &mut out[(b * g.c_out + k) * ho * wo..][..ho * wo];
            for ty in 0..th {
                let at = b * tiles + ty * tw;
                for i in 0..4.min(ho - 4 * ty) {
                    let row = &mut dst[(4 * ty + i) * wo..][..wo];
                    for tx in 0..tw {
                        for jj in 0..4.min(wo - 4 * tx) {
                            row[4 * tx + jj] = y[(i * 4 + jj) * t_total + at + tx];
                        }
                    }
                }
            }
        }
    }
    give_back(buf);
}

/// See [`Tile::transform_grad_out`].
#[inline(always)]
fn transform_grad_out(g: &ConvGeom, dy: &[f32], images: usize, z: &mut [f32]) {
    let (th, tw, tiles) = tile_grid(g, 4);
    let t_total = images * tiles;
    let (ho, wo) = (g.h_out, g.w_out);
    let xi_stride = plane_stride(g.c_out * t_total);
    let mut buf = take_buffer(20 * t_total);
    // d[i][j]: output gradient (i, j) of every tile; then a row of A ∂Y.
    let (d, a) = buf[..20 * t_total].split_at_mut(16 * t_total);
    // Rows and columns beyond a plane that is not a multiple of 4 stay zero.
    d.fill(0.0);
    for k in 0..g.c_out {
        for b in 0..images {
            let src = &dy[(b * g.c_out + k) * ho * wo..][..ho * wo];
            for ty in 0..th {
                let at = b * tiles + ty * tw;
                for i in 0..4.min(ho - 4 * ty) {
                    let row = &src[(4 * ty + i) * wo..][..wo];
                    for tx in 0..tw {
                        for jj in 0..4.min(wo - 4 * tx) {
                            d[(i * 4 + jj) * t_total + at + tx] = row[4 * tx + jj];
                        }
                    }
                }
            }
        }
        let dd = |i: usize, j: usize| &d[(i * 4 + j) * t_total..][..t_total];
        for r in 0..SIDE {
            // Row r of A ∂Y (for each column j) …
            for j in 0..4 {
                let dst = &mut a[j * t_total..][..t_total];
                a_row(r, dst, std::array::from_fn(|i| dd(i, j)));
            }
            // … then Aᵀ on the columns.
            let cols: [&[f32]; 4] = std::array::from_fn(|j| &a[j * t_total..][..t_total]);
            for q in 0..SIDE {
                let dst = &mut z[(r * SIDE + q) * xi_stride + k * t_total..][..t_total];
                a_row(q, dst, cols);
            }
        }
    }
    give_back(buf);
}
