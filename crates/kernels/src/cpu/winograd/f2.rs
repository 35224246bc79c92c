//! Winograd F(2×2, 3×3): each 2×2 block of outputs ("tile") from a 4×4 block of the input,
//! 16 transform positions. The transforms use only ±1 and ½, so the rounding error stays
//! within a few ulps of the direct convolution's. Used where the channel counts are too small
//! for [`super::f4`]'s heavier transforms to pay off.
//!
//! On CPUs with AVX2 the transforms of the CIFAR plane sizes (4×4 and 8×8 input, 16×16 and
//! 32×32 input, output and output gradient) run as explicit AVX2 code (`mod avx2`), 8 tiles at
//! a time; the slice loops beside them are the portable twin and compute the same bits, which
//! the tests check. The slice loops run a few vectors per row, and their loop and bounds
//! overhead, not the arithmetic, was most of their time.

use super::{give_back, plane_stride, take_buffer, tile_grid, Tile};
use crate::cpu::geom::ConvGeom;
use crate::cpu::{copy_short, has_avx2};
use rayon::prelude::*;

/// The F(2×2, 3×3) variant.
pub(crate) struct F2;

impl Tile for F2 {
    const OUT: usize = 2;
    const XI: usize = 16;
    const FORWARD_TILES: usize = 512;
    const BACKWARD_TILES: usize = 1024;

    fn transform_weight(k_out: usize, c_in: usize, weight: &[f32]) -> Vec<f32> {
        transform_weight(k_out, c_in, weight)
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
        weight_grad_from_transformed(k_out, c_in, du, grad_w)
    }
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

/// `U[k][ξ][c] = (G g[k][c] Gᵀ)[ξ]` for a `[K, C, 3, 3]` kernel (see [`Tile::transform_weight`]).
fn transform_weight(k_out: usize, c_in: usize, weight: &[f32]) -> Vec<f32> {
    let mut u = vec![0f32; 16 * k_out * c_in];
    u.par_chunks_mut(16 * c_in)
        .enumerate()
        .for_each(|(k, u_k)| {
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
                        u_k[(i * 4 + j) * c_in + c] = v;
                    }
                }
            }
        });
    u
}

/// `V[ξ][c][t] = (Bᵀ d B)[ξ]` for every tile `t` of `images` images of `x` (NCHW), into `v`
/// (16 planes of `C · T` floats, `T = images · tiles`, [`plane_stride`] apart).
#[inline(always)]
fn transform_input(g: &ConvGeom, x: &[f32], images: usize, v: &mut [f32], scratch: &mut Vec<f32>) {
    let (_, tw, _) = tile_grid(g, 2);
    if tw >= 8 {
        transform_input_wide(g, x, images, v, scratch, has_avx2())
    } else if has_avx2() && avx2::handles_narrow(g) {
        avx2::transform_input_narrow(g, x, images, v, scratch)
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

/// [`transform_input`] for planes with at least 8 tiles a row; `use_avx2` (only where
/// [`has_avx2`]) takes [`avx2::tile_rows`] for rows of whole 8-tile blocks.
#[inline(always)]
fn transform_input_wide(
    g: &ConvGeom,
    x: &[f32],
    images: usize,
    v: &mut [f32],
    scratch: &mut Vec<f32>,
    use_avx2: bool,
) {
    let (th, tw, tiles) = tile_grid(g, 2);
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
    let whole_blocks = use_avx2 && tw.is_multiple_of(8);
    for c in 0..g.c_in {
        for b in 0..images {
            let src = &x[(b * g.c_in + c) * plane..][..plane];
            if whole_blocks && g.w.is_multiple_of(16) {
                avx2::split_rows(src, g.w, pad, half);
            }
            for y in 0..g.h {
                if whole_blocks && g.w.is_multiple_of(16) {
                    break;
                }
                let (even, odd) = pad[(y + 1) * row_len..][..row_len].split_at_mut(half);
                let line = &src[y * g.w..][..g.w];
                // Padded column x + 1: even x lands in the odd half and vice versa.
                if g.w % 2 == 1 {
                    odd[g.w / 2] = line[g.w - 1];
                }
                split_pairs(line, odd, &mut even[1..]);
            }
            if whole_blocks {
                avx2::tile_rows(pad, half, th, tw, v, xi_stride, c * t_total + b * tiles);
                continue;
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

/// The tile rows of [`transform_input_wide`] in explicit AVX2 code, 8 tiles at a time: the same
/// operations as the slice loops, so the same bits. The slice loops run a few vectors each and
/// their loop and bounds-check overhead was most of the transform's time (22 µs an image at 16
/// channels, 32×32, in cache); 8-float arrays instead compiled to anything from 18 to 37 µs
/// depending on the code around them.
mod avx2 {
    use super::tile_grid;
    use crate::cpu::geom::ConvGeom;
    use crate::cpu::has_avx2;
    #[cfg(target_arch = "x86_64")]
    use crate::cpu::winograd::store_lanes;
    use crate::cpu::winograd::ChunkTiling;

    /// Whether [`transform_output`] and [`transform_grad_out`] handle `g`: even-sided planes
    /// with rows of whole 8-tile blocks (16×16, 32×32, …).
    pub(super) fn handles(g: &ConvGeom) -> bool {
        let (th, tw, _) = tile_grid(g, 2);
        g.h_out == 2 * th && g.w_out == 2 * tw && tw.is_multiple_of(8)
    }

    /// Whether [`transform_input_narrow`] handles `g`: even-sided planes of 2 or 4 tiles a
    /// row (4×4, 8×8), so that a block of 8 tiles is 4 or 2 runs of one tile row each.
    pub(super) fn handles_narrow(g: &ConvGeom) -> bool {
        let (th, tw, _) = tile_grid(g, 2);
        g.h == 2 * th && g.w == 2 * tw && (tw == 2 || tw == 4)
    }

    /// [`super::transform_input_narrow`] for the planes of [`handles_narrow`], 8 tiles at a
    /// time from each image's padded plane with its even and odd columns apart (as in
    /// [`super::transform_input_wide`]); `has_avx2` must be true.
    #[inline(never)]
    pub(super) fn transform_input_narrow(
        g: &ConvGeom,
        x: &[f32],
        images: usize,
        v: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        assert!(
            has_avx2() && handles_narrow(g),
            "f2 avx2 input transform: unsupported plane"
        );
        let chunk = ChunkTiling::new(g, 2, images, g.c_in);
        chunk.check(16, v.len(), 0, x.len(), "f2 avx2 input transform");
        let ChunkTiling {
            th,
            tw,
            tiles,
            t_total,
            xi_stride,
            ..
        } = chunk;
        // Per image: rows -1..=2·th of the zero-padded plane, each as `half = tw + 1` evens
        // then `half` odds (padded column 2q + p at p·half + q); one more all-zero plane
        // after the last image feeds the lanes of a last, partial block.
        let (half, rows) = (tw + 1, 2 * th + 2);
        let plane_len = rows * 2 * half;
        scratch.clear();
        scratch.resize((images + 1) * plane_len, 0.0);
        let plane = g.h * g.w;
        for c in 0..g.c_in {
            for b in 0..images {
                let src = &x[(b * g.c_in + c) * plane..][..plane];
                for (y, line) in src.chunks_exact(g.w).enumerate() {
                    let padded = &mut scratch[b * plane_len + (y + 1) * 2 * half..][..2 * half];
                    // Input column 2q + p is padded column 2q + p + 1.
                    for (q, pair) in line.chunks_exact(2).enumerate() {
                        padded[half + q] = pair[0];
                        padded[q + 1] = pair[1];
                    }
                }
            }
            // SAFETY: AVX2 is available (asserted). Reads: a run of tile (b, ty, tx), b ≤
            // images, reads plane b of `scratch` at offsets up to (2·ty + 3) · 2·half + half
            // + tx + 1 + (run - 1) < rows · 2 · half, as ty < th and tx + run ≤ tw < half.
            // Writes: `v[ξ·xi_stride + c·t_total + t]` for t < t_total only (the last block
            // masked), within the asserted length.
            unsafe {
                narrow_channel_avx2(
                    scratch.as_ptr(),
                    [half, plane_len, tw, tiles, t_total],
                    v.as_mut_ptr().add(c * t_total),
                    xi_stride,
                )
            }
        }
    }

    /// `V` of the `t_total` tiles of one channel from the padded planes of
    /// [`transform_input_narrow`] (`layout` = half, plane length, tiles a row, tiles an image,
    /// t_total), into `v[ξ·xi_stride + t]`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn narrow_channel_avx2(
        planes: *const f32,
        layout: [usize; 5],
        v: *mut f32,
        xi_stride: usize,
    ) {
        use std::arch::x86_64::*;
        let [half, plane_len, tw, tiles, t_total] = layout;
        let row_len = 2 * half;
        for t0 in (0..t_total).step_by(8) {
            // The first cell of each run of `tw` tiles (one tile row), or of the zero plane.
            let mut starts = [planes; 4];
            for (n, start) in starts.iter_mut().enumerate().take(8 / tw) {
                let t = t0 + n * tw;
                let (b, ty) = if t < t_total {
                    (t / tiles, t % tiles / tw)
                } else {
                    (t_total / tiles, 0)
                };
                *start = planes.add(b * plane_len + 2 * ty * row_len);
            }
            // Input (r, j) of the 8 tiles: column j is evens from 0 (j = 0), odds from 0,
            // evens from 1, odds from 1.
            let load = |r: usize, j: usize| -> __m256 {
                let offset = r * row_len + (j % 2) * half + j / 2;
                if tw == 4 {
                    _mm256_set_m128(
                        _mm_loadu_ps(starts[1].add(offset)),
                        _mm_loadu_ps(starts[0].add(offset)),
                    )
                } else {
                    let pair = |n: usize| {
                        _mm_castsi128_ps(_mm_loadl_epi64(starts[n].add(offset) as *const __m128i))
                    };
                    _mm256_set_m128(
                        _mm_movelh_ps(pair(2), pair(3)),
                        _mm_movelh_ps(pair(0), pair(1)),
                    )
                }
            };
            let mut cells = [[_mm256_setzero_ps(); 4]; 4];
            for (r, cells_r) in cells.iter_mut().enumerate() {
                for (j, cell) in cells_r.iter_mut().enumerate() {
                    *cell = load(r, j);
                }
            }
            let valid = (t_total - t0).min(8);
            for i in 0..4 {
                // Bᵀ on the rows: d0-d2, d1+d2, d2-d1, d1-d3 (for each column j) …
                let mut t = [_mm256_setzero_ps(); 4];
                for (j, t_j) in t.iter_mut().enumerate() {
                    let d = [cells[0][j], cells[1][j], cells[2][j], cells[3][j]];
                    *t_j = match i {
                        0 => _mm256_sub_ps(d[0], d[2]),
                        1 => _mm256_add_ps(d[1], d[2]),
                        2 => _mm256_sub_ps(d[2], d[1]),
                        _ => _mm256_sub_ps(d[1], d[3]),
                    };
                }
                // … then B on the columns: c0-c2, c1+c2, c2-c1, c1-c3.
                let out = [
                    _mm256_sub_ps(t[0], t[2]),
                    _mm256_add_ps(t[1], t[2]),
                    _mm256_sub_ps(t[2], t[1]),
                    _mm256_sub_ps(t[1], t[3]),
                ];
                for (j, value) in out.iter().enumerate() {
                    let dst = v.add((i * 4 + j) * xi_stride + t0);
                    store_lanes(dst, *value, valid);
                }
            }
        }
    }

    /// The rows of `src` (`width` floats each, a multiple of 16) into rows 1.. of the padded
    /// plane `pad` (rows of `2·half` floats, `half = width / 2 + 1`) as
    /// [`super::transform_input_wide`] lays them out: even columns to the odd half from 0, odd
    /// columns to the even half from 1 (what [`super::split_pairs`] does, with shuffles).
    pub(super) fn split_rows(src: &[f32], width: usize, pad: &mut [f32], half: usize) {
        assert!(has_avx2() && width.is_multiple_of(16) && half == width / 2 + 1);
        let rows = src.len() / width;
        assert!(
            pad.len() >= (rows + 1) * 2 * half,
            "split_rows: padded plane too short"
        );
        // SAFETY: AVX2 is available (asserted); reads the `rows · width` floats of `src`,
        // writes row y + 1 of `pad` at [1, half) and [half, 2·half - 1), within the asserted
        // length.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            split_rows_avx2(src.as_ptr(), rows, width, pad.as_mut_ptr(), half)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn split_rows_avx2(
        src: *const f32,
        rows: usize,
        width: usize,
        pad: *mut f32,
        half: usize,
    ) {
        use std::arch::x86_64::*;
        for y in 0..rows {
            let (line, row) = (src.add(y * width), pad.add((y + 1) * 2 * half));
            for m in (0..width / 2).step_by(8) {
                let (a, b) = (
                    _mm256_loadu_ps(line.add(2 * m)),
                    _mm256_loadu_ps(line.add(2 * m + 8)),
                );
                let order = |pairs: __m256| {
                    _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(pairs)))
                };
                _mm256_storeu_ps(row.add(half + m), order(_mm256_shuffle_ps::<0x88>(a, b)));
                _mm256_storeu_ps(row.add(1 + m), order(_mm256_shuffle_ps::<0xDD>(a, b)));
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn narrow_channel_avx2(_: *const f32, _: [usize; 5], _: *mut f32, _: usize) {
        unreachable!("has_avx2 is false off x86-64")
    }

    /// See [`super::transform_output`]; `g` must be [`handles`]d and [`has_avx2`] true.
    #[inline(never)]
    pub(super) fn transform_output(g: &ConvGeom, m: &[f32], images: usize, out: &mut [f32]) {
        assert!(
            has_avx2() && handles(g),
            "f2 avx2 output transform: unsupported plane"
        );
        let chunk = ChunkTiling::new(g, 2, images, g.c_out);
        chunk.check(16, m.len(), 0, out.len(), "f2 avx2 output transform");
        let ChunkTiling {
            th,
            tw,
            tiles,
            t_total,
            xi_stride,
            ..
        } = chunk;
        let plane = g.h_out * g.w_out;
        for k in 0..g.c_out {
            for b in 0..images {
                // SAFETY: AVX2 is available (asserted); reads `m[ξ·xi_stride + k·t_total + t]`
                // for the image's tiles t, writes its plane of channel k: both within the
                // asserted lengths.
                unsafe {
                    output_plane_avx2(
                        m.as_ptr().add(k * t_total + b * tiles),
                        xi_stride,
                        th,
                        tw,
                        out.as_mut_ptr().add((b * g.c_out + k) * plane),
                    )
                }
            }
        }
    }

    /// See [`super::transform_grad_out`]; `g` must be [`handles`]d and [`has_avx2`] true.
    #[inline(never)]
    pub(super) fn transform_grad_out(g: &ConvGeom, dy: &[f32], images: usize, z: &mut [f32]) {
        assert!(
            has_avx2() && handles(g),
            "f2 avx2 gradient transform: unsupported plane"
        );
        let chunk = ChunkTiling::new(g, 2, images, g.c_out);
        chunk.check(16, z.len(), 0, dy.len(), "f2 avx2 gradient transform");
        let ChunkTiling {
            th,
            tw,
            tiles,
            t_total,
            xi_stride,
            ..
        } = chunk;
        let plane = g.h_out * g.w_out;
        for k in 0..g.c_out {
            for b in 0..images {
                // SAFETY: AVX2 is available (asserted); reads the image's plane of channel k,
                // writes `z[ξ·xi_stride + k·t_total + t]` for its tiles t: both within the
                // asserted lengths.
                unsafe {
                    grad_out_plane_avx2(
                        dy.as_ptr().add((b * g.c_out + k) * plane),
                        th,
                        tw,
                        z.as_mut_ptr().add(k * t_total + b * tiles),
                        xi_stride,
                    )
                }
            }
        }
    }

    /// `Y = Aᵀ M A` of one plane's tiles (`m` at its first tile) into the plane `out`, 8 tiles
    /// at a time; each output row's even and odd columns are interleaved into 16 floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn output_plane_avx2(
        m: *const f32,
        xi_stride: usize,
        th: usize,
        tw: usize,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let width = 2 * tw;
        for ty in 0..th {
            for tx in (0..tw).step_by(8) {
                let t = ty * tw + tx;
                let mm = |i: usize, j: usize| _mm256_loadu_ps(m.add((i * 4 + j) * xi_stride + t));
                // Aᵀ M on the rows: s0 = m0+m1+m2, s1 = m1-m2-m3 (for each column j) …
                let mut s = [[_mm256_setzero_ps(); 4]; 2];
                let [s0, s1] = &mut s;
                for (j, (s0, s1)) in s0.iter_mut().zip(s1.iter_mut()).enumerate() {
                    let (m0, m1, m2, m3) = (mm(0, j), mm(1, j), mm(2, j), mm(3, j));
                    *s0 = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
                    *s1 = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
                }
                for (i, c) in s.iter().enumerate() {
                    // … then A on the columns: y0 = c0+c1+c2, y1 = c1-c2-c3.
                    let y0 = _mm256_add_ps(_mm256_add_ps(c[0], c[1]), c[2]);
                    let y1 = _mm256_sub_ps(_mm256_sub_ps(c[1], c[2]), c[3]);
                    let (lo, hi) = (_mm256_unpacklo_ps(y0, y1), _mm256_unpackhi_ps(y0, y1));
                    let row = out.add((2 * ty + i) * width + 2 * tx);
                    _mm256_storeu_ps(row, _mm256_permute2f128_ps::<0x20>(lo, hi));
                    _mm256_storeu_ps(row.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
                }
            }
        }
    }

    /// `Z = A ∂Y Aᵀ` of one plane's tiles (`dy` the plane) into `z` (at its first tile), 8
    /// tiles at a time; each gradient row's 16 floats are split into even and odd columns.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn grad_out_plane_avx2(
        dy: *const f32,
        th: usize,
        tw: usize,
        z: *mut f32,
        xi_stride: usize,
    ) {
        use std::arch::x86_64::*;
        let width = 2 * tw;
        for ty in 0..th {
            for tx in (0..tw).step_by(8) {
                let t = ty * tw + tx;
                // d[r][p]: row r of each tile, even (p = 0) or odd (p = 1) column.
                let mut d = [[_mm256_setzero_ps(); 2]; 2];
                for (r, d_r) in d.iter_mut().enumerate() {
                    let row = dy.add((2 * ty + r) * width + 2 * tx);
                    let (a, b) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                    let split = |pairs: __m256| {
                        _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(pairs)))
                    };
                    d_r[0] = split(_mm256_shuffle_ps::<0x88>(a, b));
                    d_r[1] = split(_mm256_shuffle_ps::<0xDD>(a, b));
                }
                let negate = |x: __m256| _mm256_xor_ps(x, _mm256_set1_ps(-0.0));
                // A ∂Y on the rows: d0, d0+d1, d0-d1, -d1 (for even and odd columns p) …
                let a: [[__m256; 2]; 4] = [
                    d[0],
                    [
                        _mm256_add_ps(d[0][0], d[1][0]),
                        _mm256_add_ps(d[0][1], d[1][1]),
                    ],
                    [
                        _mm256_sub_ps(d[0][0], d[1][0]),
                        _mm256_sub_ps(d[0][1], d[1][1]),
                    ],
                    [negate(d[1][0]), negate(d[1][1])],
                ];
                // … then Aᵀ on the columns: c0, c0+c1, c0-c1, -c1.
                for (i, [c0, c1]) in a.iter().enumerate() {
                    let at = |j: usize| z.add((i * 4 + j) * xi_stride + t);
                    _mm256_storeu_ps(at(0), *c0);
                    _mm256_storeu_ps(at(1), _mm256_add_ps(*c0, *c1));
                    _mm256_storeu_ps(at(2), _mm256_sub_ps(*c0, *c1));
                    _mm256_storeu_ps(at(3), negate(*c1));
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn output_plane_avx2(_: *const f32, _: usize, _: usize, _: usize, _: *mut f32) {
        unreachable!("has_avx2 is false off x86-64")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn grad_out_plane_avx2(_: *const f32, _: usize, _: usize, _: *mut f32, _: usize) {
        unreachable!("has_avx2 is false off x86-64")
    }

    /// `V` of every tile of one padded, deinterleaved plane `pad` (rows of `2·half` floats:
    /// `half` evens, then `half` odds, `half = tw + 1`): the 16 positions of tile `ty·tw + t`
    /// go to `v[ξ·xi_stride + at + ty·tw + t]`. `tw` must be a multiple of 8 and
    /// [`has_avx2`].
    pub(super) fn tile_rows(
        pad: &[f32],
        half: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        xi_stride: usize,
        at: usize,
    ) {
        assert!(
            has_avx2() && tw.is_multiple_of(8) && half == tw + 1,
            "tile_rows: {tw} tiles a row"
        );
        assert!(
            pad.len() >= (2 * th + 2) * 2 * half,
            "tile_rows: padded plane too short"
        );
        if th == 0 || tw == 0 {
            return;
        }
        assert!(
            15 * xi_stride + at + th * tw <= v.len(),
            "tile_rows: output planes too short"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is available (asserted); every read is within the first `2·th + 2`
        // rows of `pad` (the last at row `2·th + 1`, column `half + tw`, below `2·half`), and
        // every write within `v` (the last at `15·xi_stride + at + th·tw - 1`), both asserted.
        unsafe {
            tile_rows_avx2(
                pad.as_ptr(),
                2 * half,
                half,
                th,
                tw,
                v.as_mut_ptr(),
                xi_stride,
                at,
            )
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_rows_avx2(
        pad: *const f32,
        row_len: usize,
        half: usize,
        th: usize,
        tw: usize,
        v: *mut f32,
        xi_stride: usize,
        at: usize,
    ) {
        use std::arch::x86_64::*;
        for ty in 0..th {
            let rows: [*const f32; 4] = std::array::from_fn(|r| pad.add((2 * ty + r) * row_len));
            let out = v.add(at + ty * tw);
            for t0 in (0..tw).step_by(8) {
                // The four padded rows at the evens from t0 and t0 + 1, the odds likewise.
                let load = |offset: usize| -> [__m256; 4] {
                    std::array::from_fn(|r| _mm256_loadu_ps(rows[r].add(offset)))
                };
                let (e0, e1, o0, o1) =
                    (load(t0), load(t0 + 1), load(half + t0), load(half + t0 + 1));
                for i in 0..4 {
                    // Bᵀ on the rows: d0-d2, d1+d2, d2-d1, d1-d3 …
                    let row = |d: [__m256; 4]| match i {
                        0 => _mm256_sub_ps(d[0], d[2]),
                        1 => _mm256_add_ps(d[1], d[2]),
                        2 => _mm256_sub_ps(d[2], d[1]),
                        _ => _mm256_sub_ps(d[1], d[3]),
                    };
                    let (e0, e1, o0, o1) = (row(e0), row(e1), row(o0), row(o1));
                    // … then B on the columns: c0-c2, c1+c2, c2-c1, c1-c3.
                    let dst = |j: usize| out.add((i * 4 + j) * xi_stride + t0);
                    _mm256_storeu_ps(dst(0), _mm256_sub_ps(e0, e1));
                    _mm256_storeu_ps(dst(1), _mm256_add_ps(o0, e1));
                    _mm256_storeu_ps(dst(2), _mm256_sub_ps(e1, o0));
                    _mm256_storeu_ps(dst(3), _mm256_sub_ps(o0, o1));
                }
            }
        }
    }
}

/// [`transform_input`] for planes with fewer than 8 tiles a row: each tile's 16 inputs
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
    let (th, tw, tiles) = tile_grid(g, 2);
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
                copy_short(&mut pad[(y + 1) * pw + 1..], &src[y * g.w..][..g.w]);
            }
            // Each of the 16 rows of `gathered` takes the tile row's `tw` values as one
            // contiguous run (every other padded column from `j`).
            for ty in 0..th {
                let at = b * tiles + ty * tw;
                for r in 0..4 {
                    let line = &pad[(2 * ty + r) * pw..][..pw];
                    for j in 0..4 {
                        let dst = &mut gathered[(r * 4 + j) * t_total + at..][..tw];
                        for (d, &value) in dst.iter_mut().zip(line[j..].iter().step_by(2)) {
                            *d = value;
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
    let (th, tw, tiles) = tile_grid(g, 2);
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
    let (th, tw, tiles) = tile_grid(g, 2);
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

/// `∂g[k][c] = Gᵀ ∂U[k][c] G` for every channel pair, from `du` (`[K][16][C]`, as `U`).
fn weight_grad_from_transformed(k_out: usize, c_in: usize, du: &[f32], grad_w: &mut [f32]) {
    grad_w[..k_out * c_in * 9]
        .par_chunks_mut(c_in * 9)
        .enumerate()
        .for_each(|(k, grad_k)| {
            for c in 0..c_in {
                let at = |xi: usize| du[(k * 16 + xi) * c_in + c];
                // Gᵀ u: rows u0 + (u1+u2)/2, (u1-u2)/2, (u1+u2)/2 + u3.
                let q: [[f32; 4]; 3] = [
                    std::array::from_fn(|j| at(j) + 0.5 * (at(4 + j) + at(8 + j))),
                    std::array::from_fn(|j| 0.5 * (at(4 + j) - at(8 + j))),
                    std::array::from_fn(|j| 0.5 * (at(4 + j) + at(8 + j)) + at(12 + j)),
                ];
                let dst = &mut grad_k[c * 9..][..9];
                for (r, d) in q.iter().zip(dst.chunks_exact_mut(3)) {
                    d[0] = r[0] + 0.5 * (r[1] + r[2]);
                    d[1] = 0.5 * (r[1] - r[2]);
                    d[2] = 0.5 * (r[1] + r[2]) + r[3];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::winograd::same_3x3;

    #[test]
    fn avx2_transforms_give_the_bits_of_the_slice_loops() {
        if !has_avx2() {
            eprintln!("SKIPPED (no AVX2)");
            return;
        }
        // 32×32 and 16×16 planes (2 and 1 blocks of 8 tiles a row), two images, 3 channels.
        for side in [32, 16] {
            let g = same_3x3(2, 3, 4, side, side);
            let x: Vec<f32> = (0..2 * 3 * side * side)
                .map(|i| ((i * 37) % 101) as f32 * 0.013 - 0.6)
                .collect();
            let (_, _, tiles) = tile_grid(&g, 2);
            let len = 16 * plane_stride(3 * 2 * tiles);
            let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            let mut scratch = Vec::new();
            transform_input_wide(&g, &x, 2, &mut fast, &mut scratch, true);
            transform_input_wide(&g, &x, 2, &mut slow, &mut scratch, false);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "{side}×{side}");
            assert!(slow.iter().any(|x| !x.is_nan() && *x != 0.0));

            // The output and output-gradient transforms (4 output channels).
            assert!(avx2::handles(&g));
            let len = 16 * plane_stride(4 * 2 * tiles);
            let m: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 97) as f32 * 0.021 - 1.0)
                .collect();
            let plane_len = 2 * 4 * side * side;
            let (mut fast, mut slow) = (vec![f32::NAN; plane_len], vec![f32::NAN; plane_len]);
            transform_output_with(&g, &m, 2, &mut fast, true);
            transform_output_with(&g, &m, 2, &mut slow, false);
            assert_eq!(bits(&fast), bits(&slow), "output, {side}×{side}");
            assert!(slow.iter().all(|x| x.is_finite()));
            let dy = &m[..plane_len];
            let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            transform_grad_out_with(&g, dy, 2, &mut fast, true);
            transform_grad_out_with(&g, dy, 2, &mut slow, false);
            assert_eq!(bits(&fast), bits(&slow), "gradient, {side}×{side}");
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // The narrow planes: 4×4 (3 images: a last block of 4 tiles) and 8×8.
        for (images, side) in [(3, 4), (2, 4), (1, 8), (3, 8)] {
            let g = same_3x3(images, 3, 3, side, side);
            assert!(avx2::handles_narrow(&g));
            let x: Vec<f32> = (0..images * 3 * side * side)
                .map(|i| ((i * 37) % 101) as f32 * 0.013 - 0.6)
                .collect();
            let (_, _, tiles) = tile_grid(&g, 2);
            let len = 16 * plane_stride(3 * images * tiles);
            let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            let mut scratch = Vec::new();
            avx2::transform_input_narrow(&g, &x, images, &mut fast, &mut scratch);
            transform_input_narrow(&g, &x, images, &mut slow, &mut scratch);
            assert_eq!(bits(&fast), bits(&slow), "{images} images of {side}×{side}");
        }
        assert!(!avx2::handles(&same_3x3(1, 1, 1, 8, 8)));
    }

    #[test]
    fn pair_split_and_join_are_inverse_deinterleaves() {
        for len in 0..40 {
            let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let (mut first, mut second) = (vec![-1.0; len / 2 + 1], vec![-1.0; len / 2 + 1]);
            split_pairs(&src, &mut first, &mut second);
            for m in 0..len / 2 {
                assert_eq!(
                    (first[m], second[m]),
                    (src[2 * m], src[2 * m + 1]),
                    "len {len}"
                );
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
}
