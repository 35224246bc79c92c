//! Winograd F(2×2, 3×3) for 3×3, stride-1, padding-1, ungrouped convolutions on NCHW f32.
//!
//! Each 2×2 block of outputs ("tile") is computed from a 4×4 block of the input with 16
//! multiplications per channel pair instead of 36, so the three GEMM-bound passes of a
//! training step (forward, input gradient, weight gradient) do 2.25× fewer multiply-adds.
//! These convolutions carry ≈ 88 % of CIFAR ResNet-18's arithmetic; it is also how oneDNN
//! (PyTorch's CPU backend) gets past the GEMM rate on them.
//!
//! With `U = G g Gᵀ` (weights), `V = Bᵀ d B` (input tile) and `Y = Aᵀ (U ⊙ V) A`, the work
//! per transform position ξ ∈ 0..16 is one GEMM over channels:
//! * forward: `M[ξ] (K×T) = U[ξ] (K×C) · V[ξ] (C×T)`, then `Y = Aᵀ M A` per tile;
//! * weight gradient: `∂U[ξ] (K×C) = Z[ξ] (K×T) · V[ξ]ᵀ` with `Z = A ∂Y Aᵀ`, then
//!   `∂g = Gᵀ ∂U G`;
//! * input gradient: a forward with the flipped, channel-swapped kernel (see `conv.rs`).
//!
//! F(2×2, 3×3)'s transforms use only ±1 and ½, so the rounding error stays within a few ulps of
//! the direct convolution's (F(4×4, 3×3) would save more but loses ≈ 2 more digits). Work is
//! split over chunks of whole images with a fixed thread-count-only split, so results are
//! bit-reproducible, as resuming relies on.

use super::conv::ConvGeom;
use super::matmul::{matmul, MatRef};
use super::{chunks_per_run, split_images, sum_in_order, Schedule};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Transform positions of one tile (4×4).
const XI: usize = 16;
/// Tiles per forward chunk we aim for: enough columns to amortise packing `U[ξ]`.
const FORWARD_TILES: usize = 512;
/// Tiles per weight-gradient chunk: the reduction length between updates of the `∂U`
/// accumulator (16·K·C floats).
const BACKWARD_TILES: usize = 1024;
/// Below this many channels the GEMMs are too thin to win over im2col's single GEMM.
const MIN_CHANNELS: usize = 8;

thread_local! {
    /// Buffers kept by each thread between calls: the transformed tiles of one chunk are
    /// megabytes, and fresh allocations of that size cost a page fault per 4 KiB (20 % of the
    /// time in `perf`), plus a TLB-flushing copy-on-write fault when calloc'd.
    static POOL: std::cell::Cell<Vec<Vec<f32>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A buffer of at least `len` floats from this thread's pool, with unspecified contents: the
/// smallest pooled one that is large enough, else the largest, grown (growing zero-fills the
/// new part, which `perf` showed as 2 % of a step when buffers were taken in LIFO order).
/// (Taken out of the pool rather than borrowed: a GEMM's own rayon tasks may run another
/// chunk on this thread meanwhile, which then simply gets a buffer of its own.)
fn take_buffer(len: usize) -> Vec<f32> {
    let mut pool = POOL.with(|p| p.take());
    let fit = (0..pool.len())
        .filter(|&i| pool[i].len() >= len)
        .min_by_key(|&i| pool[i].len())
        .or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
    let mut buf = fit.map(|i| pool.swap_remove(i)).unwrap_or_default();
    POOL.with(|p| p.set(pool));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    buf
}

/// Returns a buffer of [`take_buffer`] to this thread's pool.
/// A full pool keeps its four largest buffers.
fn give_back(buf: Vec<f32>) {
    let mut pool = POOL.with(|p| p.take());
    pool.push(buf);
    if pool.len() > 4 {
        let smallest = (0..pool.len()).min_by_key(|&i| pool[i].len()).unwrap_or(0);
        pool.swap_remove(smallest);
    }
    POOL.with(|p| p.set(pool));
}

/// Whether eligible CPU convolutions use Winograd: yes, unless `MIXBENCH_CPU_CONV=im2col` is in
/// the environment (im2col + GEMM, for side-by-side measurements; results differ in the last
/// bits). Read once per process.
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("MIXBENCH_CPU_CONV").map_or(true, |v| v != "im2col"))
}

/// Whether `g` is a convolution this module computes (and Winograd is enabled).
pub(crate) fn applies(g: &ConvGeom) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.padding == 1
        && g.groups == 1
        && g.h_out == g.h
        && g.w_out == g.w
        && g.c_in >= MIN_CHANNELS
        && g.c_out >= MIN_CHANNELS
        && enabled()
}

/// Tile grid of one image plane: rows, columns, tiles.
fn tile_grid(g: &ConvGeom) -> (usize, usize, usize) {
    let (th, tw) = (g.h.div_ceil(2), g.w.div_ceil(2));
    (th, tw, th * tw)
}

/// Distance between the 16 transform planes of a `V`, `M` or `Z` buffer holding `len` floats
/// each: one cache line more than `len`. The transforms read or write all 16 planes at once;
/// at power-of-two distances (`C · T` often is one) the 16 streams fall into the same cache
/// sets and evict each other, which made the input transform 3× slower.
fn plane_stride(len: usize) -> usize {
    len + 16
}

/// `dst = a + b` element-wise (equal lengths; written so it vectorises).
#[inline(always)]
fn add(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
        *d = a + b;
    }
}

/// `dst = a - b` element-wise.
#[inline(always)]
fn sub(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
        *d = a - b;
    }
}

/// `dst = -a` element-wise.
#[inline(always)]
fn neg(dst: &mut [f32], a: &[f32]) {
    for (d, a) in dst.iter_mut().zip(a) {
        *d = -a;
    }
}

/// `first[m] = src[2m]`, `second[m] = src[2m + 1]` for every whole pair of `src`.
/// Blocks of 8 pairs as fixed-size arrays, which compile to two loads and a few shuffles
/// (the element-wise loop stayed scalar: a third of a 32×32 transform's time).
#[inline(always)]
fn split_pairs(src: &[f32], first: &mut [f32], second: &mut [f32]) {
    let n = src.len() / 2;
    let (first, second) = (&mut first[..n], &mut second[..n]);
    let blocks = n / 8;
    for ((s, a), b) in src
        .chunks_exact(16)
        .zip(first.chunks_exact_mut(8))
        .zip(second.chunks_exact_mut(8))
    {
        let s: &[f32; 16] = s.try_into().unwrap();
        let a: &mut [f32; 8] = a.try_into().unwrap();
        let b: &mut [f32; 8] = b.try_into().unwrap();
        *a = std::array::from_fn(|k| s[2 * k]);
        *b = std::array::from_fn(|k| s[2 * k + 1]);
    }
    for m in blocks * 8..n {
        first[m] = src[2 * m];
        second[m] = src[2 * m + 1];
    }
}

/// `dst[2m] = first[m]`, `dst[2m + 1] = second[m]` for every whole pair of `dst`
/// (the inverse of [`split_pairs`], in the same fixed-size blocks).
#[inline(always)]
fn join_pairs(first: &[f32], second: &[f32], dst: &mut [f32]) {
    let n = dst.len() / 2;
    let (first, second) = (&first[..n], &second[..n]);
    let blocks = n / 8;
    for ((d, a), b) in dst
        .chunks_exact_mut(16)
        .zip(first.chunks_exact(8))
        .zip(second.chunks_exact(8))
    {
        let d: &mut [f32; 16] = d.try_into().unwrap();
        let a: &[f32; 8] = a.try_into().unwrap();
        let b: &[f32; 8] = b.try_into().unwrap();
        *d = std::array::from_fn(|k| if k % 2 == 0 { a[k / 2] } else { b[k / 2] });
    }
    for m in blocks * 8..n {
        dst[2 * m] = first[m];
        dst[2 * m + 1] = second[m];
    }
}

/// `U[ξ][k][c] = (G g[k][c] Gᵀ)[ξ]` for a `[K, C, 3, 3]` kernel.
fn transform_weight(k_out: usize, c_in: usize, weight: &[f32]) -> Vec<f32> {
    let mut u = vec![0f32; XI * k_out * c_in];
    for k in 0..k_out {
        for c in 0..c_in {
            let g = &weight[(k * c_in + c) * 9..][..9];
            // G g: 4×3, rows g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2.
            let mut gg = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, d) = (g[j], g[3 + j], g[6 + j]);
                gg[0][j] = a;
                gg[1][j] = 0.5 * (a + b + d);
                gg[2][j] = 0.5 * (a - b + d);
                gg[3][j] = d;
            }
            for (i, row) in gg.iter().enumerate() {
                let (a, b, d) = (row[0], row[1], row[2]);
                let vals = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                for (j, v) in vals.into_iter().enumerate() {
                    u[((i * 4 + j) * k_out + k) * c_in + c] = v;
                }
            }
        }
    }
    u
}

/// `V[ξ][c][t] = (Bᵀ d B)[ξ]` for every tile `t` of `images` images of `x` (NCHW), into `v`
/// (16 planes of `C · T` floats, `T = images · tiles`, [`plane_stride`] apart).
fn transform_input(g: &ConvGeom, x: &[f32], images: usize, v: &mut [f32], scratch: &mut Vec<f32>) {
    super::with_avx2(
        #[inline(always)]
        || transform_input_impl(g, x, images, v, scratch),
    )
}

/// One channel at a time, over the tiles of all the chunk's images at once: wide planes
/// (≥ 8 tiles a row) row by row straight from a zero-padded, even/odd-split copy of the plane;
/// narrow ones through a gather of each tile's 16 inputs into 16 `T`-long rows, so the
/// arithmetic still runs in full vectors (a 4×4 plane's tile rows are 2 tiles long).
#[inline(always)]
fn transform_input_impl(
    g: &ConvGeom,
    x: &[f32],
    images: usize,
    v: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (_, tw, _) = tile_grid(g);
    if tw >= 8 {
        transform_input_wide(g, x, images, v, scratch)
    } else {
        transform_input_narrow(g, x, images, v, scratch)
    }
}

/// Bᵀ on the rows of one tile row: row `i` of `Bᵀ d` for the padded rows `d0..d3`
/// (`d0-d2, d1+d2, d2-d1, d1-d3`).
#[inline(always)]
fn input_rows(i: usize, dst: &mut [f32], d: [&[f32]; 4]) {
    match i {
        0 => sub(dst, d[0], d[2]),
        1 => add(dst, d[1], d[2]),
        2 => sub(dst, d[2], d[1]),
        _ => sub(dst, d[1], d[3]),
    }
}

/// [`transform_input_impl`] for planes with at least 8 tiles a row.
#[inline(always)]
fn transform_input_wide(
    g: &ConvGeom,
    x: &[f32],
    images: usize,
    v: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (th, tw, tiles) = tile_grid(g);
    let t_total = images * tiles;
    // Zero-padded plane: rows -1..=2·th, columns -1..=2·tw, as `tw + 1` evens then `tw + 1`
    // odds, so column j of every tile in a tile row is one contiguous run (e, o, e+1, o+1).
    let (ph, half) = (2 * th + 2, tw + 1);
    let row_len = 2 * half;
    scratch.clear();
    scratch.resize(ph * row_len + row_len, 0.0);
    let (pad, row) = scratch.split_at_mut(ph * row_len);
    let plane = g.h * g.w;
    let xi_stride = plane_stride(g.c_in * t_total);
    for c in 0..g.c_in {
        for b in 0..images {
            let src = &x[(b * g.c_in + c) * plane..][..plane];
            for y in 0..g.h {
                let (even, odd) = pad[(y + 1) * row_len..][..row_len].split_at_mut(half);
                let line = &src[y * g.w..][..g.w];
                // Padded column x + 1: even x lands in the odd half and vice versa.
                if g.w % 2 == 1 {
                    odd[g.w / 2] = line[g.w - 1];
                }
                split_pairs(line, odd, &mut even[1..]);
            }
            for ty in 0..th {
                let at = c * t_total + b * tiles + ty * tw;
                let d: [&[f32]; 4] =
                    std::array::from_fn(|r| &pad[(2 * ty + r) * row_len..][..row_len]);
                for i in 0..4 {
                    input_rows(i, row, d);
                    let (e, o) = row.split_at(half);
                    let out = |j: usize| (i * 4 + j) * xi_stride + at;
                    // … then B on the columns: c0-c2, c1+c2, c2-c1, c1-c3.
                    sub(&mut v[out(0)..][..tw], &e[..tw], &e[1..]);
                    add(&mut v[out(1)..][..tw], &o[..tw], &e[1..]);
                    sub(&mut v[out(2)..][..tw], &e[1..], &o[..tw]);
                    sub(&mut v[out(3)..][..tw], &o[..tw], &o[1..]);
                }
            }
        }
    }
}

/// [`transform_input_impl`] for planes with fewer than 8 tiles a row: each tile's 16 inputs
/// are gathered element by element (runs of 2–6 floats: `memmove` calls cost more than the
/// copies) into 16 `T`-long rows, then combined row-wise.
#[inline(always)]
fn transform_input_narrow(
    g: &ConvGeom,
    x: &[f32],
    images: usize,
    v: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (th, tw, tiles) = tile_grid(g);
    let t_total = images * tiles;
    // Zero-padded plane, row-major: rows -1..=2·th, columns -1..=2·tw.
    let (ph, pw) = (2 * th + 2, 2 * tw + 2);
    scratch.clear();
    scratch.resize(ph * pw + 20 * t_total, 0.0);
    let (pad, rest) = scratch.split_at_mut(ph * pw);
    let (gathered, rows) = rest.split_at_mut(16 * t_total);
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
                for tx in 0..tw {
                    for r in 0..4 {
                        let line = &pad[(2 * ty + r) * pw + 2 * tx..][..4];
                        for (j, &value) in line.iter().enumerate() {
                            gathered[(r * 4 + j) * t_total + at + tx] = value;
                        }
                    }
                }
            }
        }
        let d = |r: usize, j: usize| &gathered[(r * 4 + j) * t_total..][..t_total];
        for i in 0..4 {
            for j in 0..4 {
                let dst = &mut rows[j * t_total..][..t_total];
                input_rows(i, dst, [d(0, j), d(1, j), d(2, j), d(3, j)]);
            }
            // … then B on the columns.
            let t = |j: usize| &rows[j * t_total..][..t_total];
            let out = |j: usize| (i * 4 + j) * xi_stride + c * t_total;
            sub(&mut v[out(0)..][..t_total], t(0), t(2));
            add(&mut v[out(1)..][..t_total], t(1), t(2));
            sub(&mut v[out(2)..][..t_total], t(2), t(1));
            sub(&mut v[out(3)..][..t_total], t(1), t(3));
        }
    }
}

/// `Y = Aᵀ M A` per tile, from `m` (16 planes of `K · T`) into `images` NCHW output images.
fn transform_output(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32]) {
    super::with_avx2(
        #[inline(always)]
        || transform_output_impl(g, m, images, out),
    )
}

/// One output channel at a time over all the chunk's tiles (see [`transform_input_impl`]).
#[inline(always)]
fn transform_output_impl(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32]) {
    let (th, tw, tiles) = tile_grid(g);
    let t_total = images * tiles;
    let (ho, wo) = (g.h_out, g.w_out);
    let xi_stride = plane_stride(g.c_out * t_total);
    let mut buf = take_buffer(12 * t_total);
    let (s, y) = buf[..12 * t_total].split_at_mut(8 * t_total);
    for k in 0..g.c_out {
        let mm = |i: usize, j: usize| &m[(i * 4 + j) * xi_stride + k * t_total..][..t_total];
        // Aᵀ M on the rows: s0 = m0+m1+m2, s1 = m1-m2-m3 (for each column j).
        for j in 0..4 {
            let (s0, s1) = s[2 * j * t_total..(2 * j + 2) * t_total].split_at_mut(t_total);
            for (((s0, s1), (m0, m1)), (m2, m3)) in s0
                .iter_mut()
                .zip(s1.iter_mut())
                .zip(mm(0, j).iter().zip(mm(1, j)))
                .zip(mm(2, j).iter().zip(mm(3, j)))
            {
                *s0 = m0 + m1 + m2;
                *s1 = m1 - m2 - m3;
            }
        }
        // … then A on the columns: y[i][0] = c0+c1+c2, y[i][1] = c1-c2-c3.
        for i in 0..2 {
            let col = |j: usize| &s[(2 * j + i) * t_total..][..t_total];
            let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
            let (y0, y1) = y[2 * i * t_total..(2 * i + 2) * t_total].split_at_mut(t_total);
            for (((y0, y1), (c0, c1)), (c2, c3)) in y0
                .iter_mut()
                .zip(y1.iter_mut())
                .zip(c0.iter().zip(c1))
                .zip(c2.iter().zip(c3))
            {
                *y0 = c0 + c1 + c2;
                *y1 = c1 - c2 - c3;
            }
        }
        for b in 0..images {
            let dst = &mut out[(b * g.c_out + k) * ho * wo..][..ho * wo];
            for ty in 0..th {
                let at = b * tiles + ty * tw;
                for i in 0..2 {
                    let row_y = 2 * ty + i;
                    if row_y >= ho {
                        continue;
                    }
                    let y_even = &y[2 * i * t_total + at..][..tw];
                    let y_odd = &y[(2 * i + 1) * t_total + at..][..tw];
                    let row = &mut dst[row_y * wo..][..wo];
                    if wo % 2 == 1 {
                        row[wo - 1] = y_even[wo / 2];
                    }
                    join_pairs(y_even, y_odd, row);
                }
            }
        }
    }
    give_back(buf);
}

/// `Z[ξ][k][t] = (A ∂Y Aᵀ)[ξ]` for every tile of `images` NCHW output-gradient images.
fn transform_grad_out(g: &ConvGeom, dy: &[f32], images: usize, z: &mut [f32]) {
    super::with_avx2(
        #[inline(always)]
        || transform_grad_out_impl(g, dy, images, z),
    )
}

/// One output channel at a time over all the chunk's tiles (see [`transform_input_impl`]).
#[inline(always)]
fn transform_grad_out_impl(g: &ConvGeom, dy: &[f32], images: usize, z: &mut [f32]) {
    let (th, tw, tiles) = tile_grid(g);
    let t_total = images * tiles;
    let (ho, wo) = (g.h_out, g.w_out);
    let xi_stride = plane_stride(g.c_out * t_total);
    let mut buf = take_buffer(12 * t_total);
    // d[2·r + parity]: tile row r, even or odd column, over all tiles; then the rows of A ∂Y.
    let (d, a) = buf[..12 * t_total].split_at_mut(4 * t_total);
    // Rows and columns beyond an odd-sized plane stay zero.
    d.fill(0.0);
    for k in 0..g.c_out {
        for b in 0..images {
            let src = &dy[(b * g.c_out + k) * ho * wo..][..ho * wo];
            for ty in 0..th {
                let at = b * tiles + ty * tw;
                for r in 0..2 {
                    let y = 2 * ty + r;
                    if y >= ho {
                        continue;
                    }
                    let (even, odd) =
                        d[2 * r * t_total..(2 * r + 2) * t_total].split_at_mut(t_total);
                    let (even, odd) = (&mut even[at..][..tw], &mut odd[at..][..tw]);
                    let line = &src[y * wo..][..wo];
                    if wo % 2 == 1 {
                        even[wo / 2] = line[wo - 1];
                    }
                    split_pairs(line, even, odd);
                }
            }
        }
        // A ∂Y on the rows: d0, d0+d1, d0-d1, -d1 (for even and odd columns p).
        let dd = |r: usize, p: usize| &d[(2 * r + p) * t_total..][..t_total];
        for p in 0..2 {
            a[p * t_total..][..t_total].copy_from_slice(dd(0, p));
            add(&mut a[(2 + p) * t_total..][..t_total], dd(0, p), dd(1, p));
            sub(&mut a[(4 + p) * t_total..][..t_total], dd(0, p), dd(1, p));
            neg(&mut a[(6 + p) * t_total..][..t_total], dd(1, p));
        }
        // … then Aᵀ on the columns: c0, c0+c1, c0-c1, -c1.
        for i in 0..4 {
            let (c0, c1) = (
                &a[2 * i * t_total..][..t_total],
                &a[(2 * i + 1) * t_total..][..t_total],
            );
            let out = |j: usize| (i * 4 + j) * xi_stride + k * t_total;
            z[out(0)..][..t_total].copy_from_slice(c0);
            add(&mut z[out(1)..][..t_total], c0, c1);
            sub(&mut z[out(2)..][..t_total], c0, c1);
            neg(&mut z[out(3)..][..t_total], c1);
        }
    }
    give_back(buf);
}

/// `∂g[k][c] = Gᵀ ∂U[k][c] G` for every channel pair, from `du` (`16 · K · C`).
fn weight_grad_from_transformed(k_out: usize, c_in: usize, du: &[f32], grad_w: &mut [f32]) {
    for k in 0..k_out {
        for c in 0..c_in {
            let at = |xi: usize| du[(xi * k_out + k) * c_in + c];
            // Gᵀ u: rows u0 + (u1+u2)/2, (u1-u2)/2, (u1+u2)/2 + u3.
            let q: [[f32; 4]; 3] = [
                std::array::from_fn(|j| at(j) + 0.5 * (at(4 + j) + at(8 + j))),
                std::array::from_fn(|j| 0.5 * (at(4 + j) - at(8 + j))),
                std::array::from_fn(|j| 0.5 * (at(4 + j) + at(8 + j)) + at(12 + j)),
            ];
            let dst = &mut grad_w[(k * c_in + c) * 9..][..9];
            for (r, d) in q.iter().zip(dst.chunks_exact_mut(3)) {
                d[0] = r[0] + 0.5 * (r[1] + r[2]);
                d[1] = 0.5 * (r[1] - r[2]);
                d[2] = 0.5 * (r[1] + r[2]) + r[3];
            }
        }
    }
}

/// Forward convolution of `x` (`[batch, C, h, w]`) with `weight` (`[K, C, 3, 3]`) into `out`
/// (`[batch, K, h, w]`). `g` must satisfy [`applies`] (except for the switch).
pub(crate) fn forward_into(g: &ConvGeom, x: &[f32], weight: &[f32], out: &mut [f32]) {
    let (_, _, tiles) = tile_grid(g);
    let Schedule {
        images_per_chunk,
        parallelism,
    } = split_images(g.batch, tiles, FORWARD_TILES, 1);
    let u = transform_weight(g.c_out, g.c_in, weight);
    let image_in = g.c_in * g.h * g.w;
    let image_out = g.c_out * g.h_out * g.w_out;
    out.par_chunks_mut(images_per_chunk * image_out)
        .enumerate()
        .for_each(|(i, out_chunk)| {
            let first = i * images_per_chunk;
            let images = out_chunk.len() / image_out;
            let t = images * tiles;
            let mut v_buf = take_buffer(XI * plane_stride(g.c_in * t));
            let mut m_buf = take_buffer(XI * plane_stride(g.c_out * t));
            let mut scratch = take_buffer(0);
            let (v, m) = (
                &mut v_buf[..XI * plane_stride(g.c_in * t)],
                &mut m_buf[..XI * plane_stride(g.c_out * t)],
            );
            transform_input(
                g,
                &x[first * image_in..][..images * image_in],
                images,
                v,
                &mut scratch,
            );
            for xi in 0..XI {
                matmul(
                    g.c_out,
                    t,
                    g.c_in,
                    &mut m[xi * plane_stride(g.c_out * t)..][..g.c_out * t],
                    t,
                    false,
                    MatRef::row_major(&u[xi * g.c_out * g.c_in..][..g.c_out * g.c_in], g.c_in),
                    MatRef::row_major(&v[xi * plane_stride(g.c_in * t)..][..g.c_in * t], t),
                    parallelism,
                );
            }
            transform_output(g, m, images, out_chunk);
            give_back(v_buf);
            give_back(m_buf);
            give_back(scratch);
        });
}

/// Weight gradient (`[K, C, 3, 3]`) of [`forward_into`] given the output gradient `grad_out`.
///
/// Each thread reduces a fixed contiguous run of chunks into its own `∂U`; the runs are summed
/// in order, so the result depends on the thread count only ([`super::chunks_per_run`]).
pub(crate) fn weight_grad(g: &ConvGeom, x: &[f32], grad_out: &[f32], grad_w: &mut [f32]) {
    let (_, _, tiles) = tile_grid(g);
    let Schedule {
        images_per_chunk,
        parallelism,
    } = split_images(g.batch, tiles, BACKWARD_TILES, 1);
    let image_in = g.c_in * g.h * g.w;
    let image_out = g.c_out * g.h_out * g.w_out;
    let du_len = XI * g.c_out * g.c_in;
    let firsts: Vec<usize> = (0..g.batch).step_by(images_per_chunk).collect();
    let partial: Vec<Vec<f32>> = firsts
        .par_chunks(chunks_per_run(firsts.len()))
        .map(|run| {
            let mut du = vec![0f32; du_len];
            let mut scratch = take_buffer(0);
            let mut v_buf = take_buffer(XI * plane_stride(g.c_in * images_per_chunk * tiles));
            let mut z_buf = take_buffer(XI * plane_stride(g.c_out * images_per_chunk * tiles));
            for (n, &first) in run.iter().enumerate() {
                let images = (g.batch - first).min(images_per_chunk);
                let t = images * tiles;
                let (v, z) = (
                    &mut v_buf[..XI * plane_stride(g.c_in * t)],
                    &mut z_buf[..XI * plane_stride(g.c_out * t)],
                );
                transform_input(
                    g,
                    &x[first * image_in..][..images * image_in],
                    images,
                    v,
                    &mut scratch,
                );
                let dy = &grad_out[first * image_out..][..images * image_out];
                transform_grad_out(g, dy, images, z);
                for xi in 0..XI {
                    matmul(
                        g.c_out,
                        g.c_in,
                        t,
                        &mut du[xi * g.c_out * g.c_in..][..g.c_out * g.c_in],
                        g.c_in,
                        // The first chunk stores (no read of the fresh buffer, see `conv.rs`).
                        n > 0,
                        MatRef::row_major(&z[xi * plane_stride(g.c_out * t)..][..g.c_out * t], t),
                        MatRef::transposed(&v[xi * plane_stride(g.c_in * t)..][..g.c_in * t], t),
                        parallelism,
                    );
                }
            }
            give_back(scratch);
            give_back(v_buf);
            give_back(z_buf);
            du
        })
        .collect();
    let mut du = vec![0f32; du_len];
    sum_in_order(&partial, &mut du);
    weight_grad_from_transformed(g.c_out, g.c_in, &du, grad_w);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(batch: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> ConvGeom {
        ConvGeom {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 1,
            groups: 1,
            h_out: h,
            w_out: w,
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Direct convolution in f64, the reference.
    fn direct(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; g.batch * g.c_out * g.h * g.w];
        for b in 0..g.batch {
            for k in 0..g.c_out {
                for y in 0..g.h {
                    for xx in 0..g.w {
                        let mut s = 0f64;
                        for c in 0..g.c_in {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = (y + i, xx + j);
                                    if iy == 0 || ix == 0 || iy > g.h || ix > g.w {
                                        continue;
                                    }
                                    let xv = x[((b * g.c_in + c) * g.h + iy - 1) * g.w + ix - 1];
                                    s += xv as f64 * w[((k * g.c_in + c) * 3 + i) * 3 + j] as f64;
                                }
                            }
                        }
                        out[((b * g.c_out + k) * g.h + y) * g.w + xx] = s;
                    }
                }
            }
        }
        out
    }

    fn max_rel(actual: &[f32], expected: &[f64]) -> f64 {
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = actual
            .iter()
            .zip(expected)
            .fold(0f64, |m, (a, e)| m.max((*a as f64 - e).abs()));
        diff / scale
    }

    #[test]
    fn forward_matches_direct_convolution_on_even_and_odd_planes() {
        for (b, c, k, h, w) in [
            (3, 8, 12, 8, 8),
            (2, 9, 8, 5, 7),
            (1, 16, 8, 1, 1),
            (4, 8, 8, 2, 3),
            // Wide planes (≥ 8 tiles a row: no gather), even, odd and past one 8-pair block.
            (2, 8, 8, 16, 16),
            (1, 8, 9, 17, 15),
            (1, 8, 8, 3, 35),
        ] {
            let g = geom(b, c, k, h, w);
            let x = values(b * c * h * w, 1);
            let wt = values(k * c * 9, 2);
            let mut out = vec![f32::NAN; b * k * h * w];
            forward_into(&g, &x, &wt, &mut out);
            let err = max_rel(&out, &direct(&g, &x, &wt));
            assert!(err < 1e-6, "{b}x{c}x{h}x{w} -> {k}: relative error {err:e}");
        }
    }

    #[test]
    fn weight_gradient_matches_direct_correlation() {
        for (b, c, k, h, w) in [
            (3, 8, 12, 8, 8),
            (2, 9, 8, 5, 7),
            (5, 8, 8, 4, 4),
            (2, 8, 8, 16, 16),
            (1, 8, 8, 15, 17),
            (1, 8, 8, 3, 35),
        ] {
            let g = geom(b, c, k, h, w);
            let x = values(b * c * h * w, 3);
            let dy = values(b * k * h * w, 4);
            let mut grad = vec![f32::NAN; k * c * 9];
            weight_grad(&g, &x, &dy, &mut grad);
            // ∂w[k][c][i][j] = Σ dy[b][k][y][x] · x[b][c][y+i-1][x+j-1]
            let mut expected = vec![0f64; k * c * 9];
            for bb in 0..b {
                for kk in 0..k {
                    for cc in 0..c {
                        for i in 0..3 {
                            for j in 0..3 {
                                let mut s = 0f64;
                                for y in 0..h {
                                    for xx in 0..w {
                                        let (iy, ix) = (y + i, xx + j);
                                        if iy == 0 || ix == 0 || iy > h || ix > w {
                                            continue;
                                        }
                                        s += dy[((bb * k + kk) * h + y) * w + xx] as f64
                                            * x[((bb * c + cc) * h + iy - 1) * w + ix - 1] as f64;
                                    }
                                }
                                expected[((kk * c + cc) * 3 + i) * 3 + j] += s;
                            }
                        }
                    }
                }
            }
            let err = max_rel(&grad, &expected);
            assert!(err < 1e-6, "{b}x{c}x{h}x{w} -> {k}: relative error {err:e}");
        }
    }

    #[test]
    fn pair_split_and_join_are_inverse_deinterleaves() {
        for len in 0..40 {
            let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let (mut first, mut second) = (vec![-1.0; len / 2 + 1], vec![-1.0; len / 2 + 1]);
            split_pairs(&src, &mut first, &mut second);
            for m in 0..len / 2 {
                assert_eq!((first[m], second[m]), (src[2 * m], src[2 * m + 1]), "len {len}");
            }
            assert_eq!((first[len / 2], second[len / 2]), (-1.0, -1.0), "len {len}");
            let mut joined = vec![-1.0; len];
            join_pairs(&first, &second, &mut joined);
            assert_eq!(joined[..len / 2 * 2], src[..len / 2 * 2], "len {len}");
            if len % 2 == 1 {
                assert_eq!(joined[len - 1], -1.0, "len {len}");
            }
        }
    }

    #[test]
    fn weight_gradient_is_reproducible() {
        let g = geom(7, 8, 8, 6, 6);
        let x = values(7 * 8 * 36, 5);
        let dy = values(7 * 8 * 36, 6);
        let mut a = vec![0f32; 8 * 8 * 9];
        let mut b = vec![1f32; 8 * 8 * 9];
        weight_grad(&g, &x, &dy, &mut a);
        weight_grad(&g, &x, &dy, &mut b);
        assert_eq!(a, b);
    }
}
