//! 2-D convolution on contiguous NCHW f32 buffers: im2col + GEMM forward, GEMM + col2im
//! input gradient, im2col + GEMM weight gradient. Groups are handled inside the same call.
//!
//! Work is split over chunks of whole images. When the output plane is small (late ResNet
//! stages) several images share one chunk so each GEMM packs the weight once for many columns.

use super::geom::ConvGeom;
use super::matmul::{matmul, MatRef};
use super::winograd;
use super::{
    chunks_per_run, copy_short, give_back, has_avx2, par_extend, split_images, sum_in_order,
    take_buffer, Schedule,
};
use rayon::prelude::*;

/// Columns per GEMM we aim for: enough that packing the weight is amortised.
const TARGET_GEMM_COLUMNS: usize = 256;
/// Columns per weight-gradient GEMM (its reduction dimension) we aim for.
const TARGET_REDUCTION_COLUMNS: usize = 1024;

impl ConvGeom {
    /// Images per chunk, and whether the GEMMs themselves run multithreaded.
    ///
    /// The forward aims for `TARGET_GEMM_COLUMNS` columns and at least two chunks per thread,
    /// so rayon can rebalance when a core is busy with something else. The weight gradient
    /// reduces over the columns into a weight-sized accumulator, which is memory-bound when
    /// chunks are narrow, so the backward aims for `TARGET_REDUCTION_COLUMNS` instead.
    fn schedule(&self, backward: bool) -> Schedule {
        // The backward's chunks are grouped into one contiguous run per thread anyway.
        if backward {
            split_images(self.batch, self.plane_out(), TARGET_REDUCTION_COLUMNS, 1)
        } else {
            split_images(self.batch, self.plane_out(), TARGET_GEMM_COLUMNS, 2)
        }
    }

    /// Range of output positions `o` along one axis whose input index
    /// `o * stride + offset - padding` falls inside `[0, size)`.
    fn valid_range(&self, offset: usize, size: usize, out_size: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if self.padding > offset {
            (self.padding - offset).div_ceil(s)
        } else {
            0
        };
        let hi = if size + self.padding > offset {
            ((size + self.padding - offset - 1) / s + 1).min(out_size)
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// Writes the column matrix of `image` into `col` (`c_in*kh*kw` rows, `row_stride` apart,
    /// starting at column `col_offset`).
    fn im2col(&self, image: &[f32], col: &mut [f32], row_stride: usize, col_offset: usize) {
        // The split pays where several kernel columns read each input row (3×3), not for 1×1.
        if self.stride == 2 && self.kw > 1 {
            self.im2col_stride2(image, col, row_stride, col_offset)
        } else {
            self.im2col_any_stride(image, col, row_stride, col_offset)
        }
    }

    /// [`Self::im2col`] for any stride: stride-2 runs through [`gather_every_other`], larger
    /// strides element by element.
    fn im2col_any_stride(
        &self,
        image: &[f32],
        col: &mut [f32],
        row_stride: usize,
        col_offset: usize,
    ) {
        let (wo, s, p) = (self.w_out, self.stride, self.padding);
        let mut row = 0;
        for c in 0..self.c_in {
            let plane = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ki in 0..self.kh {
                let (oy_lo, oy_hi) = self.valid_range(ki, self.h, self.h_out);
                for kj in 0..self.kw {
                    let (ox_lo, ox_hi) = self.valid_range(kj, self.w, self.w_out);
                    let dst = &mut col[row * row_stride + col_offset..][..self.plane_out()];
                    dst[..oy_lo * wo].fill(0.0);
                    dst[oy_hi * wo..].fill(0.0);
                    for oy in oy_lo..oy_hi {
                        let iy = oy * s + ki - p;
                        let src = &plane[iy * self.w..(iy + 1) * self.w];
                        let out = &mut dst[oy * wo..(oy + 1) * wo];
                        zero_padding(&mut out[..ox_lo]);
                        zero_padding(&mut out[ox_hi..]);
                        if ox_hi > ox_lo {
                            let ix0 = ox_lo * s + kj - p;
                            if s == 1 {
                                out[ox_lo..ox_hi].copy_from_slice(&src[ix0..ix0 + (ox_hi - ox_lo)]);
                            } else if s == 2 {
                                gather_every_other(&src[ix0..], &mut out[ox_lo..ox_hi]);
                            } else {
                                for (o, ox) in out[ox_lo..ox_hi].iter_mut().zip(0..) {
                                    *o = src[ix0 + ox * s];
                                }
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }

    /// Adds the column matrix `col` (layout as in [`Self::im2col`]) back onto `image`.
    /// [`Self::im2col`] for stride 2: each input row is split once into its even and odd
    /// columns, so every run of the column matrix is a contiguous copy from one of the two
    /// (element-by-element gathers of 4–16 floats, and the loop overhead around them, were a
    /// third of a late-stage stride-2 convolution's time). Same values in the same places.
    fn im2col_stride2(&self, image: &[f32], col: &mut [f32], row_stride: usize, col_offset: usize) {
        let (h, w, wo, p) = (self.h, self.w, self.w_out, self.padding);
        let half = w.div_ceil(2);
        // Row iy of the plane as `half` evens then `half` odds.
        let mut split = take_buffer(2 * half * h);
        let mut row = 0;
        for c in 0..self.c_in {
            let plane = &image[c * h * w..(c + 1) * h * w];
            for (line, halves) in plane.chunks_exact(w).zip(split.chunks_exact_mut(2 * half)) {
                let (even, odd) = halves.split_at_mut(half);
                for (m, pair) in line.chunks_exact(2).enumerate() {
                    even[m] = pair[0];
                    odd[m] = pair[1];
                }
                if w % 2 == 1 {
                    even[half - 1] = line[w - 1];
                }
            }
            for ki in 0..self.kh {
                let (oy_lo, oy_hi) = self.valid_range(ki, h, self.h_out);
                for kj in 0..self.kw {
                    let (ox_lo, ox_hi) = self.valid_range(kj, w, wo);
                    let dst = &mut col[row * row_stride + col_offset..][..self.plane_out()];
                    dst[..oy_lo * wo].fill(0.0);
                    dst[oy_hi * wo..].fill(0.0);
                    // Input column 2·ox + kj - p: one parity for the whole run.
                    let ix0 = 2 * ox_lo + kj - p;
                    let (parity, start) = (ix0 % 2, ix0 / 2);
                    for oy in oy_lo..oy_hi {
                        let iy = 2 * oy + ki - p;
                        let out = &mut dst[oy * wo..(oy + 1) * wo];
                        zero_padding(&mut out[..ox_lo]);
                        zero_padding(&mut out[ox_hi..]);
                        if ox_hi > ox_lo {
                            let source = &split[(2 * iy + parity) * half + start..];
                            copy_short(&mut out[ox_lo..ox_hi], &source[..ox_hi - ox_lo]);
                        }
                    }
                    row += 1;
                }
            }
        }
        give_back(split);
    }

    fn col2im_add(&self, col: &[f32], row_stride: usize, col_offset: usize, image: &mut [f32]) {
        let (wo, s, p) = (self.w_out, self.stride, self.padding);
        let mut row = 0;
        for c in 0..self.c_in {
            let plane = &mut image[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ki in 0..self.kh {
                let (oy_lo, oy_hi) = self.valid_range(ki, self.h, self.h_out);
                for kj in 0..self.kw {
                    let (ox_lo, ox_hi) = self.valid_range(kj, self.w, self.w_out);
                    let src_rows = &col[row * row_stride + col_offset..][..self.plane_out()];
                    if ox_hi > ox_lo {
                        for oy in oy_lo..oy_hi {
                            let iy = oy * s + ki - p;
                            let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                            let src = &src_rows[oy * wo + ox_lo..oy * wo + ox_hi];
                            let ix0 = ox_lo * s + kj - p;
                            if s == 1 {
                                for (d, v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                                    *d += v;
                                }
                            } else if s == 2 {
                                add_every_other(&mut dst[ix0..], src);
                            } else {
                                for (i, v) in src.iter().enumerate() {
                                    dst[ix0 + i * s] += v;
                                }
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
}

/// Zeroes a row's padding columns. They are usually 0 or 1 elements long (one im2col row
/// has two per output row), where a `memset` call costs more than the stores.
/// `out[i] = src[2i]` (stride-2 im2col rows): blocks of 8 as AVX2 shuffles where the CPU has
/// them and the block's 16 source floats lie in `src`, element by element otherwise.
fn gather_every_other(src: &[f32], out: &mut [f32]) {
    let blocks = if has_avx2() {
        (out.len() / 8).min(src.len() / 16)
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    if blocks > 0 {
        // SAFETY: AVX2 is available; reads src[..16·blocks], writes out[..8·blocks], both
        // within the slices by the choice of `blocks`.
        unsafe { every_other_avx2::gather(src.as_ptr(), out.as_mut_ptr(), blocks) }
    }
    for (i, o) in out.iter_mut().enumerate().skip(8 * blocks) {
        *o = src[2 * i];
    }
}

/// `dst[2i] += src[i]` (stride-2 col2im rows), in blocks of 8 like [`gather_every_other`]:
/// the same additions, so the same bits.
fn add_every_other(dst: &mut [f32], src: &[f32]) {
    let blocks = if has_avx2() {
        (src.len() / 8).min(dst.len() / 16)
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    if blocks > 0 {
        // SAFETY: AVX2 is available; reads and writes dst[..16·blocks], reads src[..8·blocks],
        // both within the slices by the choice of `blocks`.
        unsafe { every_other_avx2::add(dst.as_mut_ptr(), src.as_ptr(), blocks) }
    }
    for (i, v) in src.iter().enumerate().skip(8 * blocks) {
        dst[2 * i] += v;
    }
}

/// The AVX2 blocks of [`gather_every_other`] and [`add_every_other`].
#[cfg(target_arch = "x86_64")]
mod every_other_avx2 {
    use std::arch::x86_64::*;

    /// Even and odd elements of 16 floats, each in order.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn split(a: __m256, b: __m256) -> (__m256, __m256) {
        let order =
            |x: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(x)));
        (
            order(_mm256_shuffle_ps::<0x88>(a, b)),
            order(_mm256_shuffle_ps::<0xDD>(a, b)),
        )
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gather(src: *const f32, out: *mut f32, blocks: usize) {
        for k in 0..blocks {
            let (even, _) = split(
                _mm256_loadu_ps(src.add(16 * k)),
                _mm256_loadu_ps(src.add(16 * k + 8)),
            );
            _mm256_storeu_ps(out.add(8 * k), even);
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn add(dst: *mut f32, src: *const f32, blocks: usize) {
        for k in 0..blocks {
            let (even, odd) = split(
                _mm256_loadu_ps(dst.add(16 * k)),
                _mm256_loadu_ps(dst.add(16 * k + 8)),
            );
            let even = _mm256_add_ps(even, _mm256_loadu_ps(src.add(8 * k)));
            // Interleave back: even 0, odd 0, even 1, …
            let (lo, hi) = (_mm256_unpacklo_ps(even, odd), _mm256_unpackhi_ps(even, odd));
            _mm256_storeu_ps(dst.add(16 * k), _mm256_permute2f128_ps::<0x20>(lo, hi));
            _mm256_storeu_ps(dst.add(16 * k + 8), _mm256_permute2f128_ps::<0x31>(lo, hi));
        }
    }
}

#[inline(always)]
fn zero_padding(cols: &mut [f32]) {
    match cols {
        [] => {}
        [a] => *a = 0.0,
        [a, b] => {
            *a = 0.0;
            *b = 0.0;
        }
        _ => cols.fill(0.0),
    }
}

/// Forward convolution: `x` is `[batch, c_in, h, w]`, `weight` is
/// `[c_out, c_in/groups, kh, kw]`; returns `[batch, c_out, h_out, w_out]`.
pub(crate) fn conv2d_forward(g: &ConvGeom, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    conv2d_forward_into(g, x, weight, &mut out);
    out
}

/// [`conv2d_forward`] appending its `batch * c_out * h_out * w_out` elements to `out`.
fn conv2d_forward_into(g: &ConvGeom, x: &[f32], weight: &[f32], out: &mut Vec<f32>) {
    if winograd::applies(g) {
        return winograd::forward_into(g, x, weight, out);
    }
    if super::grouped::applies(g) {
        return super::grouped::forward_into(g, x, weight, out);
    }
    let sched = g.schedule(false);
    let (cog, kg, plane) = (g.c_out_per_group(), g.k_per_group(), g.plane_out());
    let (len, chunk) = (
        g.batch * g.image_out(),
        sched.images_per_chunk * g.image_out(),
    );
    par_extend(out, len, chunk, |i, out_chunk| {
        let first = i * sched.images_per_chunk;
        let images = out_chunk.len() / g.image_out();
        let cols = images * plane;
        let x_chunk = &x[first * g.image_in()..(first + images) * g.image_in()];
        let direct_input = g.is_pointwise() && images == 1;
        // Scratch from the thread's pool: im2col and the GEMM overwrite every element.
        let col_len = if direct_input { 0 } else { g.k_columns(cols) };
        let mut col_storage = take_buffer(col_len);
        for b in 0..if direct_input { 0 } else { images } {
            let img = &x_chunk[b * g.image_in()..(b + 1) * g.image_in()];
            g.im2col(img, &mut col_storage, cols, b * plane);
        }
        let col: &[f32] = if direct_input {
            x_chunk
        } else {
            &col_storage[..col_len]
        };
        // One image: GEMM writes NCHW directly. Several: GEMM writes [c_out, images*plane]
        // and the rows are then scattered to each image.
        let staging_len = if images == 1 { 0 } else { g.c_out * cols };
        let mut staging = take_buffer(staging_len);
        let dst: &mut [f32] = if images == 1 {
            &mut *out_chunk
        } else {
            &mut staging[..staging_len]
        };
        for grp in 0..g.groups {
            matmul(
                cog,
                cols,
                kg,
                &mut dst[grp * cog * cols..],
                cols,
                false,
                MatRef::row_major(&weight[grp * cog * kg..(grp + 1) * cog * kg], kg),
                MatRef::row_major(&col[grp * kg * cols..(grp + 1) * kg * cols], cols),
                sched.parallelism,
            );
        }
        if images > 1 {
            for co in 0..g.c_out {
                for b in 0..images {
                    out_chunk[b * g.image_out() + co * plane..][..plane]
                        .copy_from_slice(&staging[co * cols + b * plane..][..plane]);
                }
            }
        }
        give_back(col_storage);
        give_back(staging);
    });
}

/// Fewest input channels per group for which [`input_grad_as_conv`] computes the input
/// gradient (its GEMM has this many rows).
const MIN_TRANSPOSED_ROWS: usize = 8;

/// For stride 1 the input gradient is itself a convolution: of `grad_out` with the kernel
/// flipped spatially and input/output channels swapped (per group), padded by `k - 1 - p`.
/// That reuses the forward's well-shaped GEMMs instead of a tall GEMM plus col2im.
///
/// Not where the input has fewer than [`MIN_TRANSPOSED_ROWS`] channels per group and fewer
/// than the output (the stem's three against 16–64): that conv's GEMM would have as few rows,
/// fed by an im2col of the whole `grad_out` (`9·c_out` rows, 236 MB for the stem at width 64
/// and batch 100) that costs several times the GEMM, where the im2col path's GEMM writes only
/// `9·c_in` rows of columns (stem input gradient 14.5 → 6.3 ms there). ResNeXt's 4-channel
/// groups (as many in as out) keep the transposed conv.
fn input_grad_as_conv(g: &ConvGeom) -> Option<ConvGeom> {
    if g.stride != 1 || g.padding + 1 > g.kh || g.kh != g.kw {
        return None;
    }
    if g.kh > 1
        && g.c_in_per_group() < MIN_TRANSPOSED_ROWS
        && g.c_in_per_group() < g.c_out_per_group()
    {
        return None;
    }
    Some(ConvGeom {
        c_in: g.c_out,
        h: g.h_out,
        w: g.w_out,
        c_out: g.c_in,
        padding: g.kh - 1 - g.padding,
        h_out: g.h,
        w_out: g.w,
        ..*g
    })
}

/// The kernel of [`input_grad_as_conv`]: `[c_in, c_out/groups, kh, kw]`, spatially flipped.
fn flip_transpose_weight(g: &ConvGeom, weight: &[f32]) -> Vec<f32> {
    let (cog, cig, kk) = (g.c_out_per_group(), g.c_in_per_group(), g.kh * g.kw);
    let mut flipped = vec![0f32; weight.len()];
    for grp in 0..g.groups {
        for co in 0..cog {
            for ci in 0..cig {
                let src = &weight[((grp * cog + co) * cig + ci) * kk..][..kk];
                let dst = &mut flipped[((grp * cig + ci) * cog + co) * kk..][..kk];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        }
    }
    flipped
}

/// A backward work item: the first image of the chunk and its slice of the input gradient.
type BackwardChunk<'a> = (usize, Option<&'a mut [f32]>);

/// Gradients of [`conv2d_forward`], packed in one buffer: `grad_x` (when `need_grad_x`)
/// followed by `grad_weight` (when `need_grad_w`).
pub(crate) fn conv2d_backward(
    g: &ConvGeom,
    x: &[f32],
    weight: &[f32],
    grad_out: &[f32],
    need_grad_x: bool,
    need_grad_w: bool,
) -> Vec<f32> {
    let sched = g.schedule(true);
    let (cog, kg, plane) = (g.c_out_per_group(), g.k_per_group(), g.plane_out());
    let weight_len = g.c_out * kg;
    let grad_x_len = if need_grad_x {
        g.batch * g.image_in()
    } else {
        0
    };
    let grad_w_len = if need_grad_w { weight_len } else { 0 };
    let transposed_conv = if need_grad_x {
        input_grad_as_conv(g)
    } else {
        None
    };
    let mut packed = Vec::with_capacity(grad_x_len + grad_w_len);
    match &transposed_conv {
        Some(geom) => conv2d_forward_into(
            geom,
            grad_out,
            &flip_transpose_weight(g, weight),
            &mut packed,
        ),
        // Zeros (in parallel) that the im2col path below adds each chunk's columns onto.
        None => par_extend(
            &mut packed,
            grad_x_len,
            sched.images_per_chunk * g.image_in(),
            |_, _| {},
        ),
    }
    packed.resize(grad_x_len + grad_w_len, 0.0);
    let (grad_x, grad_w) = packed.split_at_mut(grad_x_len);
    if winograd::applies(g) {
        // Stride 1, padding 1: the input gradient was the (Winograd) conv above.
        debug_assert!(!need_grad_x || transposed_conv.is_some());
        if need_grad_w {
            winograd::weight_grad(g, x, grad_out, grad_w);
        }
        return packed;
    }
    // Grouped 3×3: the weight gradient is the direct kernel's (`cpu::grouped`); the input
    // gradient was the direct grouped conv above (stride 1), or is im2col's below (stride 2).
    let direct_grad_w = need_grad_w && super::grouped::applies(g);
    let need_grad_w = need_grad_w && !direct_grad_w;
    let need_grad_x = need_grad_x && transposed_conv.is_none();
    if direct_grad_w {
        super::grouped::weight_grad(g, x, grad_out, grad_w);
    }
    if !need_grad_x && !need_grad_w {
        return packed;
    }
    let chunk_count = g.batch.div_ceil(sched.images_per_chunk);
    let mut grad_x_chunks: Vec<Option<&mut [f32]>> = if need_grad_x {
        grad_x
            .chunks_mut(sched.images_per_chunk * g.image_in())
            .map(Some)
            .collect()
    } else {
        (0..chunk_count).map(|_| None).collect()
    };
    let chunks: Vec<(usize, Option<&mut [f32]>)> = grad_x_chunks
        .drain(..)
        .enumerate()
        .map(|(i, gx)| (i * sched.images_per_chunk, gx))
        .collect();

    // `overwrite_grad_w`: the first chunk of a run stores its weight gradient instead of adding
    // it to a fresh zeroed accumulator (0 + x == x, so the sums are unchanged). Reading a page of
    // a fresh calloc'd buffer before writing it costs a copy-on-write fault with a TLB flush on
    // every core, which dominated the stride-2 backward.
    let run_chunk = |first: usize,
                     grad_x_chunk: Option<&mut [f32]>,
                     grad_w_acc: &mut [f32],
                     overwrite_grad_w: bool| {
        let images = (g.batch - first).min(sched.images_per_chunk);
        let cols = images * plane;
        let dy_chunk = &grad_out[first * g.image_out()..(first + images) * g.image_out()];
        let x_chunk = &x[first * g.image_in()..(first + images) * g.image_in()];
        // Scratch from the thread's pool; each is overwritten whole before it is read.
        let gathered_len = if images == 1 { 0 } else { g.c_out * cols };
        let mut gathered = take_buffer(gathered_len);
        let dy: &[f32] = if images == 1 {
            dy_chunk
        } else {
            for co in 0..g.c_out {
                for b in 0..images {
                    gathered[co * cols + b * plane..][..plane]
                        .copy_from_slice(&dy_chunk[b * g.image_out() + co * plane..][..plane]);
                }
            }
            &gathered[..gathered_len]
        };
        let direct = g.is_pointwise() && images == 1;
        let col_len = if direct { 0 } else { g.k_columns(cols) };
        if need_grad_w {
            let mut col_storage = take_buffer(col_len);
            for b in 0..if direct { 0 } else { images } {
                let img = &x_chunk[b * g.image_in()..(b + 1) * g.image_in()];
                g.im2col(img, &mut col_storage, cols, b * plane);
            }
            let col: &[f32] = if direct {
                x_chunk
            } else {
                &col_storage[..col_len]
            };
            for grp in 0..g.groups {
                matmul(
                    cog,
                    kg,
                    cols,
                    &mut grad_w_acc[grp * cog * kg..(grp + 1) * cog * kg],
                    kg,
                    !overwrite_grad_w,
                    MatRef::row_major(&dy[grp * cog * cols..(grp + 1) * cog * cols], cols),
                    MatRef::transposed(&col[grp * kg * cols..(grp + 1) * kg * cols], cols),
                    sched.parallelism,
                );
            }
            give_back(col_storage);
        }
        if let Some(gx) = grad_x_chunk {
            let mut dcol_storage = take_buffer(col_len);
            let dcol: &mut [f32] = if direct {
                &mut *gx
            } else {
                &mut dcol_storage[..col_len]
            };
            for grp in 0..g.groups {
                matmul(
                    kg,
                    cols,
                    cog,
                    &mut dcol[grp * kg * cols..(grp + 1) * kg * cols],
                    cols,
                    false,
                    MatRef::transposed(&weight[grp * cog * kg..(grp + 1) * cog * kg], kg),
                    MatRef::row_major(&dy[grp * cog * cols..(grp + 1) * cog * cols], cols),
                    sched.parallelism,
                );
            }
            if !direct {
                // `gx` holds the zeros `par_extend` wrote when `packed` was created.
                for b in 0..images {
                    let img = &mut gx[b * g.image_in()..(b + 1) * g.image_in()];
                    g.col2im_add(&dcol_storage, cols, b * plane, img);
                }
            }
            give_back(dcol_storage);
        }
        give_back(gathered);
    };

    // One weight-gradient accumulator per contiguous run of chunks, summed in order at the end.
    let per_run = chunks_per_run(chunks.len());
    let mut grouped: Vec<Vec<BackwardChunk>> = Vec::new();
    for chunk in chunks {
        if grouped.last().is_none_or(|g| g.len() == per_run) {
            grouped.push(Vec::with_capacity(per_run));
        }
        grouped.last_mut().expect("just pushed").push(chunk);
    }
    let partial_grad_w: Vec<Vec<f32>> = grouped
        .into_par_iter()
        .map(|run| {
            let mut acc = if need_grad_w {
                vec![0f32; weight_len]
            } else {
                Vec::new()
            };
            for (i, (first, gx)) in run.into_iter().enumerate() {
                run_chunk(first, gx, &mut acc, i == 0);
            }
            acc
        })
        .collect();
    sum_in_order(&partial_grad_w, grad_w);
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_other_helpers_match_their_definitions() {
        for src_len in [0, 1, 15, 16, 17, 31, 32, 33, 64] {
            let src: Vec<f32> = (0..src_len).map(|i| i as f32 * 0.37 - 3.0).collect();
            for out_len in [0, 1, 7, 8, 9, 15, 16, 17, 32] {
                if out_len > 0 && 2 * (out_len - 1) >= src_len {
                    continue;
                }
                let mut out = vec![f32::NAN; out_len];
                gather_every_other(&src, &mut out);
                for (i, o) in out.iter().enumerate() {
                    assert_eq!(
                        o.to_bits(),
                        src[2 * i].to_bits(),
                        "gather {src_len}/{out_len}"
                    );
                }
                let add: Vec<f32> = (0..out_len).map(|i| i as f32 * 1.1 + 0.3).collect();
                let mut fast = src.clone();
                add_every_other(&mut fast, &add);
                let mut slow = src.clone();
                for (i, v) in add.iter().enumerate() {
                    slow[2 * i] += v;
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "add {src_len}/{out_len}");
            }
        }
    }

    #[test]
    fn stride2_im2col_matches_the_element_by_element_one() {
        // 3×3 with padding 1 and 0, 1×1, even and odd planes, a column offset.
        for (c_in, h, w, k, padding) in [
            (3, 8, 8, 3, 1),
            (2, 7, 9, 3, 1),
            (2, 16, 16, 3, 1),
            (2, 5, 6, 3, 0),
            (4, 8, 8, 1, 0),
            (2, 9, 7, 1, 0),
        ] {
            let (h_out, w_out) = ((h + 2 * padding - k) / 2 + 1, (w + 2 * padding - k) / 2 + 1);
            let g = ConvGeom {
                batch: 1,
                c_in,
                h,
                w,
                c_out: 1,
                kh: k,
                kw: k,
                stride: 2,
                padding,
                groups: 1,
                h_out,
                w_out,
            };
            let image: Vec<f32> = (0..c_in * h * w).map(|i| i as f32 * 0.5 + 1.0).collect();
            let (rows, plane) = (c_in * k * k, h_out * w_out);
            let (row_stride, offset) = (plane + 5, 3);
            let (mut fast, mut slow) = (
                vec![f32::NAN; rows * row_stride],
                vec![f32::NAN; rows * row_stride],
            );
            g.im2col_stride2(&image, &mut fast, row_stride, offset);
            g.im2col_any_stride(&image, &mut slow, row_stride, offset);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fast),
                bits(&slow),
                "{c_in}×{h}×{w}, {k}×{k}, padding {padding}"
            );
            assert!(slow.iter().any(|x| *x > 1.0));
        }
    }
}
