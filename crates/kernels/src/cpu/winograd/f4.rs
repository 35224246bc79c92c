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
//!
//! On CPUs with AVX2 the input, output and output-gradient transforms of 8×8, 16×16 and
//! 32×32 planes instead run as explicit AVX2 code (`mod avx2`) 8 tiles at a time, loading each
//! tile column as one run from phase-split padded rows instead of gathering element by
//! element; they do the same operations in the same order, so the same bits (tested against
//! the slice loops, their portable twin).

use super::{give_back, plane_stride, take_buffer, tile_grid, Tile};
use crate::cpu::geom::ConvGeom;
use crate::cpu::has_avx2;
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
    transform_input_with(g, x, images, v, scratch, has_avx2())
}

/// [`transform_input`]; `use_avx2` (only where [`has_avx2`]) takes [`avx2::transform_input`]
/// for the planes it handles.
#[inline(always)]
fn transform_input_with(
    g: &ConvGeom,
    x: &[f32],
    images: usize,
    v: &mut [f32],
    scratch: &mut Vec<f32>,
    use_avx2: bool,
) {
    if use_avx2 && avx2::handles(g) {
        return avx2::transform_input(g, x, images, v, scratch);
    }
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

/// [`transform_input`] in explicit AVX2 code, 8 tiles at a time: the same operations as the
/// slice loops (so the same bits) without their element-by-element gather of every tile's 36
/// inputs, which with the loop overhead of short rows made this transform half as slow as
/// the products it feeds (136 µs an image at 64 channels, 32×32).
mod avx2 {
    use super::{tile_grid, SIDE};
    use crate::cpu::geom::ConvGeom;
    use crate::cpu::has_avx2;
    #[cfg(target_arch = "x86_64")]
    use crate::cpu::winograd::store_lanes;
    use crate::cpu::winograd::ChunkTiling;

    /// Whether [`transform_input`] handles `g`: planes a multiple of 4 a side with 2 or 4 tiles
    /// a row or a multiple of 8 (8×8, 16×16, 32×32, …), so that each tile row of a block of 8
    /// tiles is one run of a phase row.
    pub(super) fn handles(g: &ConvGeom) -> bool {
        let (th, tw, _) = tile_grid(g, 4);
        g.h == 4 * th && g.w == 4 * tw && (tw == 2 || tw == 4 || tw.is_multiple_of(8))
    }

    /// See [`super::transform_input`]; `g` must be [`handles`]d and [`has_avx2`] true.
    /// (Not inlined: inlined, it changed how the slice loops of the other planes compiled,
    /// making them 1.5–2× slower.)
    #[inline(never)]
    pub(super) fn transform_input(
        g: &ConvGeom,
        x: &[f32],
        images: usize,
        v: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        assert!(
            has_avx2() && handles(g),
            "f4 avx2 input transform: unsupported plane"
        );
        let chunk = ChunkTiling::new(g, 4, images, g.c_in);
        chunk.check(SIDE * SIDE, v.len(), 0, x.len(), "f4 avx2 input transform");
        let ChunkTiling {
            th,
            tw,
            tiles,
            t_total,
            xi_stride,
            ..
        } = chunk;
        // Each image's zero-padded plane (rows -1..=4·th, columns -1..=4·tw) split by column
        // phase: `phases[b · plane_len + (row · 4 + p) · len + q]` is padded column `4q + p`,
        // so column `j` of the tiles `tx..` of a tile row is the run from `q = tx + j / 4` of
        // phase `j % 4`. One more, all-zero plane after the last image feeds the lanes of a
        // last, partial block of 8 tiles.
        let (rows, len) = (4 * th + 2, tw + 1);
        let plane_len = rows * 4 * len;
        scratch.clear();
        scratch.resize((images + 1) * plane_len, 0.0);
        let plane = g.h * g.w;
        for c in 0..g.c_in {
            for b in 0..images {
                let src = &x[(b * g.c_in + c) * plane..][..plane];
                for (y, line) in src.chunks_exact(g.w).enumerate() {
                    let phase_rows = &mut scratch[b * plane_len + (y + 1) * 4 * len..][..4 * len];
                    // Padded column 4q + p is input column 4q + p - 1.
                    for (q, cells) in line.chunks_exact(4).enumerate() {
                        phase_rows[len + q] = cells[0];
                        phase_rows[2 * len + q] = cells[1];
                        phase_rows[3 * len + q] = cells[2];
                        phase_rows[q + 1] = cells[3];
                    }
                }
            }
            let geometry = Phases {
                len,
                plane_len,
                tw,
                tiles,
            };
            // SAFETY: AVX2 is available (asserted). Reads: a lane of tile (b, ty, tx), b ≤
            // images, reads plane b of `scratch` ((images + 1) · plane_len floats) at offsets
            // up to ((4·ty + 5) · 4 + 3) · len + tx + 1 < rows · 4 · len = plane_len, as
            // ty < th and tx < tw < len. Writes: `v[ξ·xi_stride + c·t_total + t]` for ξ < 36
            // and t < t_total only (the last block masked), below the asserted length.
            unsafe {
                channel_avx2(
                    scratch.as_ptr(),
                    &geometry,
                    t_total,
                    v.as_mut_ptr().add(c * t_total),
                    xi_stride,
                )
            }
        }
    }

    /// See [`super::transform_output`]; `g` must be [`handles`]d and [`has_avx2`] true.
    #[inline(never)]
    pub(super) fn transform_output(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32]) {
        assert!(
            has_avx2() && handles(g),
            "f4 avx2 output transform: unsupported plane"
        );
        let chunk = ChunkTiling::new(g, 4, images, g.c_out);
        // A last partial block reads up to 4 floats past its plane's tiles: into the next
        // channel's, or the 16 floats of padding after the last one.
        chunk.check(
            SIDE * SIDE,
            m.len(),
            4,
            out.len(),
            "f4 avx2 output transform",
        );
        let (t_total, xi_stride) = (chunk.t_total, chunk.xi_stride);
        let tiling = Tiling::of(g, &chunk);
        for k in 0..g.c_out {
            // SAFETY: AVX2 is available (asserted). Reads `m[ξ·xi_stride + k·t_total + t]`
            // for t < t_total rounded up to 8 (t_total is a multiple of 4), within the asserted
            // length; writes the 4×4 outputs of tiles t < t_total of channel k, within `out`.
            unsafe {
                output_channel_avx2(
                    m.as_ptr().add(k * t_total),
                    xi_stride,
                    &tiling,
                    k,
                    out.as_mut_ptr(),
                )
            }
        }
    }

    /// See [`super::transform_grad_out`]; `g` must be [`handles`]d and [`has_avx2`] true.
    #[inline(never)]
    pub(super) fn transform_grad_out(g: &ConvGeom, dy: &[f32], images: usize, z: &mut [f32]) {
        assert!(
            has_avx2() && handles(g),
            "f4 avx2 gradient transform: unsupported plane"
        );
        let chunk = ChunkTiling::new(g, 4, images, g.c_out);
        chunk.check(
            SIDE * SIDE,
            z.len(),
            0,
            dy.len(),
            "f4 avx2 gradient transform",
        );
        let (t_total, xi_stride) = (chunk.t_total, chunk.xi_stride);
        let tiling = Tiling::of(g, &chunk);
        for k in 0..g.c_out {
            // SAFETY: AVX2 is available (asserted). Reads the 4×4 output gradients of tiles
            // t < t_total of channel k, within `dy`; writes `z[ξ·xi_stride + k·t_total + t]`
            // for t < t_total only (the last block masked), within the asserted length.
            unsafe {
                grad_out_channel_avx2(
                    dy.as_ptr(),
                    &tiling,
                    k,
                    z.as_mut_ptr().add(k * t_total),
                    xi_stride,
                )
            }
        }
    }

    /// Where the tiles of a chunk's output planes lie.
    struct Tiling {
        tw: usize,
        tiles: usize,
        t_total: usize,
        channels: usize,
        width: usize,
    }

    impl Tiling {
        /// The output planes (channels `g.c_out`) of a chunk.
        fn of(g: &ConvGeom, chunk: &ChunkTiling) -> Self {
            Self {
                tw: chunk.tw,
                tiles: chunk.tiles,
                t_total: chunk.t_total,
                channels: g.c_out,
                width: g.w,
            }
        }

        /// Offsets in the NCHW planes of channel `k` of the first cell (row 0, column 0) of
        /// tiles `t0 + 2n`, n < 4: the starts of a block's 4 runs of 2 tiles (row `i` of a run
        /// is `i · width` further). Runs past the last tile get offsets that must not be used.
        fn run_starts(&self, t0: usize, k: usize) -> [usize; 4] {
            let plane = self.tiles * 16;
            std::array::from_fn(|n| {
                let t = t0 + 2 * n;
                let (b, within) = (t / self.tiles, t % self.tiles);
                let (ty, tx) = (within / self.tw, within % self.tw);
                (b * self.channels + k) * plane + 4 * ty * self.width + 4 * tx
            })
        }
    }

    /// The layout of the phase-split planes of [`transform_input`].
    struct Phases {
        len: usize,
        plane_len: usize,
        tw: usize,
        tiles: usize,
    }

    /// Row `i` of `Bᵀ d` for six vectors `d`, in [`super::b_transpose_row`]'s operation order.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn b_transpose(
        i: usize,
        d: &[std::arch::x86_64::__m256; SIDE],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let (two, four, five) = (
            _mm256_set1_ps(2.0),
            _mm256_set1_ps(4.0),
            _mm256_set1_ps(5.0),
        );
        match i {
            0 => _mm256_add_ps(
                _mm256_sub_ps(_mm256_mul_ps(four, d[0]), _mm256_mul_ps(five, d[2])),
                d[4],
            ),
            1 => _mm256_sub_ps(
                _mm256_add_ps(d[3], d[4]),
                _mm256_mul_ps(four, _mm256_add_ps(d[1], d[2])),
            ),
            2 => _mm256_add_ps(
                _mm256_sub_ps(d[4], d[3]),
                _mm256_mul_ps(four, _mm256_sub_ps(d[1], d[2])),
            ),
            3 => _mm256_add_ps(
                _mm256_sub_ps(d[4], d[2]),
                _mm256_mul_ps(two, _mm256_sub_ps(d[3], d[1])),
            ),
            4 => _mm256_sub_ps(
                _mm256_sub_ps(d[4], d[2]),
                _mm256_mul_ps(two, _mm256_sub_ps(d[3], d[1])),
            ),
            _ => _mm256_add_ps(
                _mm256_sub_ps(_mm256_mul_ps(four, d[1]), _mm256_mul_ps(five, d[3])),
                d[5],
            ),
        }
    }

    /// `V` of the `t_total` tiles of one channel (all images) from the phase-split planes
    /// (see [`transform_input`]), into `v[ξ·xi_stride + t]`, 8 tiles at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn channel_avx2(
        phases: *const f32,
        p: &Phases,
        t_total: usize,
        v: *mut f32,
        xi_stride: usize,
    ) {
        use std::arch::x86_64::*;
        let zero = _mm256_setzero_ps();
        // Tiles per run: a whole block of 8 from one tile row, or 4 or 2 from each of 2 or
        // 4 consecutive tile rows (of one image or the next).
        let run = p.tw.min(8);
        for t0 in (0..t_total).step_by(8) {
            // The first cell of each run: tile (b, ty, tx) at row 4·ty, column 4·tx; lanes
            // past the last tile read the zero plane.
            let mut starts = [phases; 4];
            for (g, start) in starts.iter_mut().enumerate().take(8 / run) {
                let t = t0 + g * run;
                let (b, within) = if t < t_total {
                    (t / p.tiles, t % p.tiles)
                } else {
                    (t_total / p.tiles, 0)
                };
                let (ty, tx) = (within / p.tw, within % p.tw);
                *start = phases.add(b * p.plane_len + 4 * ty * 4 * p.len + tx);
            }
            let mut cells = [[zero; SIDE]; SIDE];
            for (r, cells_r) in cells.iter_mut().enumerate() {
                for (j, cell) in cells_r.iter_mut().enumerate() {
                    let offset = (r * 4 + j % 4) * p.len + j / 4;
                    *cell = match run {
                        8 => _mm256_loadu_ps(starts[0].add(offset)),
                        4 => _mm256_set_m128(
                            _mm_loadu_ps(starts[1].add(offset)),
                            _mm_loadu_ps(starts[0].add(offset)),
                        ),
                        _ => {
                            // Two floats, unaligned.
                            let pair = |g: usize| {
                                _mm_castsi128_ps(_mm_loadl_epi64(
                                    starts[g].add(offset) as *const __m128i
                                ))
                            };
                            _mm256_set_m128(
                                _mm_movelh_ps(pair(2), pair(3)),
                                _mm_movelh_ps(pair(0), pair(1)),
                            )
                        }
                    };
                }
            }
            let valid = (t_total - t0).min(8);
            for i in 0..SIDE {
                // Bᵀ on the rows (for each column j) …
                let mut rows = [zero; SIDE];
                for (j, row) in rows.iter_mut().enumerate() {
                    let column = [
                        cells[0][j],
                        cells[1][j],
                        cells[2][j],
                        cells[3][j],
                        cells[4][j],
                        cells[5][j],
                    ];
                    *row = b_transpose(i, &column);
                }
                // … then B on the columns.
                for jj in 0..SIDE {
                    let dst = v.add((i * SIDE + jj) * xi_stride + t0);
                    let value = b_transpose(jj, &rows);
                    store_lanes(dst, value, valid);
                }
            }
        }
    }

    /// Row `i` of `Aᵀ m` for six vectors `m`, in [`super::a_transpose_row`]'s order.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn a_transpose(
        i: usize,
        m: &[std::arch::x86_64::__m256; SIDE],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let k = |value: f32| _mm256_set1_ps(value);
        match i {
            0 => _mm256_add_ps(
                _mm256_add_ps(m[0], _mm256_add_ps(m[1], m[2])),
                _mm256_add_ps(m[3], m[4]),
            ),
            1 => _mm256_add_ps(
                _mm256_sub_ps(m[1], m[2]),
                _mm256_mul_ps(k(2.0), _mm256_sub_ps(m[3], m[4])),
            ),
            2 => _mm256_add_ps(
                _mm256_add_ps(m[1], m[2]),
                _mm256_mul_ps(k(4.0), _mm256_add_ps(m[3], m[4])),
            ),
            _ => _mm256_add_ps(
                _mm256_add_ps(
                    _mm256_sub_ps(m[1], m[2]),
                    _mm256_mul_ps(k(8.0), _mm256_sub_ps(m[3], m[4])),
                ),
                m[5],
            ),
        }
    }

    /// Row `r` of `A d` for four vectors `d`, in [`super::a_row`]'s order.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn a_row(r: usize, d: &[std::arch::x86_64::__m256; 4]) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let k = |value: f32| _mm256_set1_ps(value);
        match r {
            0 => d[0],
            1 => _mm256_add_ps(_mm256_add_ps(d[0], d[1]), _mm256_add_ps(d[2], d[3])),
            2 => _mm256_add_ps(_mm256_sub_ps(d[0], d[1]), _mm256_sub_ps(d[2], d[3])),
            3 => _mm256_add_ps(
                _mm256_add_ps(d[0], _mm256_mul_ps(k(4.0), d[2])),
                _mm256_mul_ps(k(2.0), _mm256_add_ps(d[1], _mm256_mul_ps(k(4.0), d[3]))),
            ),
            4 => _mm256_sub_ps(
                _mm256_add_ps(d[0], _mm256_mul_ps(k(4.0), d[2])),
                _mm256_mul_ps(k(2.0), _mm256_add_ps(d[1], _mm256_mul_ps(k(4.0), d[3]))),
            ),
            _ => d[3],
        }
    }

    /// `Y = Aᵀ M A` for the tiles of channel `k` (`m` at the channel's first tile), into the
    /// NCHW `out`, 8 tiles at a time: the 4 vectors of an output row's 4 columns are
    /// interleaved into 4 runs of 2 tiles × 4 columns, each stored at its tile.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn output_channel_avx2(
        m: *const f32,
        xi_stride: usize,
        tiling: &Tiling,
        k: usize,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let zero = _mm256_setzero_ps();
        for t0 in (0..tiling.t_total).step_by(8) {
            let valid = (tiling.t_total - t0).min(8);
            let mut s = [[zero; SIDE]; 4];
            for j in 0..SIDE {
                let mut column = [zero; SIDE];
                for (r, cell) in column.iter_mut().enumerate() {
                    *cell = _mm256_loadu_ps(m.add((r * SIDE + j) * xi_stride + t0));
                }
                // Aᵀ M on the rows: s[i][j] for each column j …
                for (i, s_i) in s.iter_mut().enumerate() {
                    s_i[j] = a_transpose(i, &column);
                }
            }
            let starts = tiling.run_starts(t0, k);
            for (i, s_i) in s.iter().enumerate() {
                // … then A on the columns: y[i][jj].
                let y = [
                    a_transpose(0, s_i),
                    a_transpose(1, s_i),
                    a_transpose(2, s_i),
                    a_transpose(3, s_i),
                ];
                let (lo01, hi01) = (
                    _mm256_unpacklo_ps(y[0], y[1]),
                    _mm256_unpackhi_ps(y[0], y[1]),
                );
                let (lo23, hi23) = (
                    _mm256_unpacklo_ps(y[2], y[3]),
                    _mm256_unpackhi_ps(y[2], y[3]),
                );
                let q = [
                    _mm256_shuffle_ps::<0x44>(lo01, lo23),
                    _mm256_shuffle_ps::<0xEE>(lo01, lo23),
                    _mm256_shuffle_ps::<0x44>(hi01, hi23),
                    _mm256_shuffle_ps::<0xEE>(hi01, hi23),
                ];
                // Run n: tiles 2n and 2n + 1, 4 columns each (one tile row, as runs are ≥ 2).
                let runs = [
                    _mm256_permute2f128_ps::<0x20>(q[0], q[1]),
                    _mm256_permute2f128_ps::<0x20>(q[2], q[3]),
                    _mm256_permute2f128_ps::<0x31>(q[0], q[1]),
                    _mm256_permute2f128_ps::<0x31>(q[2], q[3]),
                ];
                for (run, start) in runs.iter().zip(starts).take(valid / 2) {
                    _mm256_storeu_ps(out.add(start + i * tiling.width), *run);
                }
            }
        }
    }

    /// `Z = A ∂Y Aᵀ` for the tiles of channel `k` of the NCHW `dy`, into `z` (at the channel's
    /// first tile), 8 tiles at a time: 4 runs of 2 tiles × 4 columns of an output-gradient
    /// row are de-interleaved into the row's 4 column vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn grad_out_channel_avx2(
        dy: *const f32,
        tiling: &Tiling,
        k: usize,
        z: *mut f32,
        xi_stride: usize,
    ) {
        use std::arch::x86_64::*;
        let zero = _mm256_setzero_ps();
        for t0 in (0..tiling.t_total).step_by(8) {
            let valid = (tiling.t_total - t0).min(8);
            // d[i][jj]: output gradient (i, jj) of the 8 tiles.
            let starts = tiling.run_starts(t0, k);
            let mut d = [[zero; 4]; 4];
            for (i, d_i) in d.iter_mut().enumerate() {
                let mut runs = [zero; 4];
                for (run, start) in runs.iter_mut().zip(starts).take(valid / 2) {
                    *run = _mm256_loadu_ps(dy.add(start + i * tiling.width));
                }
                let u = [
                    _mm256_permute2f128_ps::<0x20>(runs[0], runs[2]),
                    _mm256_permute2f128_ps::<0x31>(runs[0], runs[2]),
                    _mm256_permute2f128_ps::<0x20>(runs[1], runs[3]),
                    _mm256_permute2f128_ps::<0x31>(runs[1], runs[3]),
                ];
                let (lo01, hi01) = (
                    _mm256_unpacklo_ps(u[0], u[1]),
                    _mm256_unpackhi_ps(u[0], u[1]),
                );
                let (lo23, hi23) = (
                    _mm256_unpacklo_ps(u[2], u[3]),
                    _mm256_unpackhi_ps(u[2], u[3]),
                );
                *d_i = [
                    _mm256_shuffle_ps::<0x44>(lo01, lo23),
                    _mm256_shuffle_ps::<0xEE>(lo01, lo23),
                    _mm256_shuffle_ps::<0x44>(hi01, hi23),
                    _mm256_shuffle_ps::<0xEE>(hi01, hi23),
                ];
            }
            for r in 0..SIDE {
                // Row r of A ∂Y (for each column jj) …
                let a = [
                    a_row(r, &[d[0][0], d[1][0], d[2][0], d[3][0]]),
                    a_row(r, &[d[0][1], d[1][1], d[2][1], d[3][1]]),
                    a_row(r, &[d[0][2], d[1][2], d[2][2], d[3][2]]),
                    a_row(r, &[d[0][3], d[1][3], d[2][3], d[3][3]]),
                ];
                // … then Aᵀ on the columns.
                for q in 0..SIDE {
                    let dst = z.add((r * SIDE + q) * xi_stride + t0);
                    let value = a_row(q, &a);
                    store_lanes(dst, value, valid);
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn output_channel_avx2(_: *const f32, _: usize, _: &Tiling, _: usize, _: *mut f32) {
        unreachable!("has_avx2 is false off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn grad_out_channel_avx2(_: *const f32, _: &Tiling, _: usize, _: *mut f32, _: usize) {
        unreachable!("has_avx2 is false off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn channel_avx2(_: *const f32, _: &Phases, _: usize, _: *mut f32, _: usize) {
        unreachable!("has_avx2 is false off x86-64")
    }
}

/// See [`Tile::transform_output`].
#[inline(always)]
fn transform_output(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32]) {
    transform_output_with(g, m, images, out, has_avx2())
}

/// [`transform_output`]; `use_avx2` (only where [`has_avx2`]) takes
/// [`avx2::transform_output`] for the planes it handles.
#[inline(always)]
fn transform_output_with(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32], use_avx2: bool) {
    if use_avx2 && avx2::handles(g) {
        return avx2::transform_output(g, m, images, out);
    }
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
    transform_grad_out_with(g, dy, images, z, has_avx2())
}

/// [`transform_grad_out`]; `use_avx2` (only where [`has_avx2`]) takes
/// [`avx2::transform_grad_out`] for the planes it handles.
#[inline(always)]
fn transform_grad_out_with(g: &ConvGeom, dy: &[f32], images: usize, z: &mut [f32], use_avx2: bool) {
    if use_avx2 && avx2::handles(g) {
        return avx2::transform_grad_out(g, dy, images, z);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(batch: usize, c: usize, side: usize) -> ConvGeom {
        super::super::same_3x3(batch, c, c, side, side)
    }

    #[test]
    fn avx2_input_transform_gives_the_bits_of_the_slice_loops() {
        if !has_avx2() {
            eprintln!("SKIPPED (no AVX2)");
            return;
        }
        // 2, 4 and 8 tiles a row; an odd image count leaves a last block of 4 tiles (8×8).
        for (images, side) in [(3, 8), (2, 16), (1, 32), (2, 32)] {
            let g = geom(images, 3, side);
            assert!(avx2::handles(&g));
            let x: Vec<f32> = (0..images * 3 * side * side)
                .map(|i| ((i * 37) % 101) as f32 * 0.013 - 0.6)
                .collect();
            let (_, _, tiles) = tile_grid(&g, 4);
            let len = SIDE * SIDE * plane_stride(3 * images * tiles);
            let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            let mut scratch = Vec::new();
            transform_input_with(&g, &x, images, &mut fast, &mut scratch, true);
            transform_input_with(&g, &x, images, &mut slow, &mut scratch, false);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "{images} images of {side}×{side}");
            assert!(slow.iter().any(|x| !x.is_nan() && *x != 0.0));
        }
        assert!(!avx2::handles(&geom(1, 3, 12)) && !avx2::handles(&geom(1, 3, 10)));
    }

    #[test]
    fn avx2_output_and_gradient_transforms_give_the_bits_of_the_slice_loops() {
        if !has_avx2() {
            eprintln!("SKIPPED (no AVX2)");
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (images, side) in [(3, 8), (2, 16), (1, 32), (2, 32)] {
            let g = geom(images, 3, side);
            let (_, _, tiles) = tile_grid(&g, 4);
            let len = SIDE * SIDE * plane_stride(3 * images * tiles);
            let m: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 97) as f32 * 0.021 - 1.0)
                .collect();
            let plane_len = images * 3 * side * side;
            let (mut fast, mut slow) = (vec![f32::NAN; plane_len], vec![f32::NAN; plane_len]);
            transform_output_with(&g, &m, images, &mut fast, true);
            transform_output_with(&g, &m, images, &mut slow, false);
            assert_eq!(
                bits(&fast),
                bits(&slow),
                "output, {images} images of {side}×{side}"
            );
            assert!(slow.iter().all(|x| x.is_finite()));

            let dy = &m[..plane_len];
            let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            transform_grad_out_with(&g, dy, images, &mut fast, true);
            transform_grad_out_with(&g, dy, images, &mut slow, false);
            assert_eq!(
                bits(&fast),
                bits(&slow),
                "gradient, {images} images of {side}×{side}"
            );
            assert!(slow.iter().any(|x| !x.is_nan() && *x != 0.0));
        }
    }
}
