//! Direct grouped 3×3 convolution (stride 1 or 2, padding 1): the forward and weight gradient
//! of ResNeXt's 32-group layers and, through the flipped-kernel transposed convolution, the
//! input gradient of the stride-1 ones (stride 2's stays im2col's col2im).
//!
//! im2col + GEMM gives each group a GEMM with as many rows as the group has output channels
//! (4 in ResNeXt-50's stage 1), which leaves most of the GEMM microkernel idle: those layers
//! ran at 25–40 GFLOP/s against 150–170 for the 1×1 convolutions beside them. Here each image's
//! group is copied once into zero-padded planes whose rows are `w + 2` apart, so the input of
//! output position `p` (flattened over padded rows) for tap `(ky, kx)` sits at the constant
//! offset `p + ky·(w + 2) + kx`: a tap is one contiguous load for 8 positions at a time, on
//! any plane size. Blocks of 4 output channels × 16 positions keep 8 accumulators in
//! registers; each sums over the group's input channels, then the 9 taps, in that fixed order
//! (deterministic; not the GEMM's order, so results differ from im2col in the last bits). The
//! two padding columns of each row are computed and dropped (6 % extra at 32×32, 50 % at 4×4).
//! Stride 2 splits the padded plane into its four phases (even/odd rows × columns), where
//! every tap is again a constant offset ([`Padded`]).
//!
//! The weight gradient ([`weight_grad`]) uses the same layout: the output gradient is laid out
//! in padded rows too (zero in the two padding columns), so `∂w[co][ci][tap]` is a dot product
//! of two contiguous runs per image, summed in 8 lanes over a run of images and then across
//! lanes. Images are split into one contiguous run per thread and the runs' sums added in
//! order, so the result depends on the thread count only.

use super::geom::ConvGeom;
use super::{give_back, has_avx2_fma, par_extend, split_images, sum_in_order, take_buffer};

/// Output channels per register block.
const CO_BLOCK: usize = 4;
/// Output positions per register block (two AVX2 vectors).
const P_BLOCK: usize = 16;
/// Output positions per chunk of work the forward aims for (as the im2col path's columns).
const TARGET_POSITIONS: usize = 256;

/// Whether [`forward_into`] and [`weight_grad`] compute `g`: grouped, 3×3, stride 1 or 2,
/// padding 1, on a CPU with AVX2 and FMA, unless `MIXBENCH_CPU_CONV=im2col` asks for im2col
/// everywhere.
pub(crate) fn applies(g: &ConvGeom) -> bool {
    g.groups > 1
        && g.kh == 3
        && g.kw == 3
        && (g.stride == 1 || g.stride == 2)
        && g.padding == 1
        && g.h_out == (g.h - 1) / g.stride + 1
        && g.w_out == (g.w - 1) / g.stride + 1
        && has_avx2_fma()
        && !super::winograd::im2col_only()
}

/// The padded-plane layout of one image's group.
///
/// Stride 1: one zero-padded plane per channel, rows `w + 2` apart; output position `p =
/// y·row + x` reads tap `(ky, kx)` at `p + ky·row + kx`. Stride 2: the padded plane split into
/// its four phases (even/odd rows × even/odd columns), each with rows `⌈(w + 2) / 2⌉` apart;
/// tap `(ky, kx)` of output `(y, x)` is padded pixel `(2y + ky, 2x + kx)`, which sits in phase
/// `(ky mod 2, kx mod 2)` at `(y + ky/2, x + kx/2)`: again a constant offset per tap.
struct Padded {
    stride: usize,
    /// Row length of the (phase) planes and of the computed output rows.
    row: usize,
    /// Floats per phase plane (the whole padded plane for stride 1).
    phase: usize,
    /// Output positions computed per channel: `h_out` rows of `row`, rounded up to
    /// [`P_BLOCK`]; the columns past `w_out` are computed and dropped.
    span: usize,
    /// Floats per padded channel (its phases): every tap of every computed position is inside.
    channel: usize,
    /// Where tap `ky·3 + kx` of output position 0 reads, within a channel.
    offsets: [usize; 9],
}

impl Padded {
    fn of(g: &ConvGeom) -> Self {
        let stride = g.stride;
        let (rows, row) = ((g.h + 2).div_ceil(stride), (g.w + 2).div_ceil(stride));
        let span = (g.h_out * row).div_ceil(P_BLOCK) * P_BLOCK;
        // The farthest in-phase offset is 2·row + 2 (stride 1) or row + 1 (stride 2).
        let reach = (2 / stride) * row + 2 / stride;
        let phase = (span + reach).max(rows * row);
        let phases = stride * stride;
        let offsets = std::array::from_fn(|t| {
            let (ky, kx) = (t / 3, t % 3);
            let which = (ky % stride) * stride + kx % stride;
            which * phase + (ky / stride) * row + kx / stride
        });
        Padded {
            stride,
            row,
            phase,
            span,
            channel: phases * phase,
            offsets,
        }
    }

    /// Whether every tap of every computed position lies inside a channel.
    fn taps_inside(&self) -> bool {
        self.offsets.iter().all(|&o| o + self.span <= self.channel)
    }
}

/// Every group's weights as `[group][co block][ci][tap][CO_BLOCK]` ([`group_weights_len`]
/// floats a group), zero beyond a group's output channels, so a block's four weights of one
/// input channel and tap are adjacent.
fn pack_weights(g: &ConvGeom, weight: &[f32]) -> Vec<f32> {
    let (cig, cog) = (g.c_in_per_group(), g.c_out_per_group());
    let per_group = group_weights_len(g);
    let mut packed = vec![0f32; g.groups * per_group];
    for grp in 0..g.groups {
        for co in 0..cog {
            let (b, j) = (co / CO_BLOCK, co % CO_BLOCK);
            let src = &weight[(grp * cog + co) * cig * 9..][..cig * 9];
            let dst = &mut packed[grp * per_group + b * cig * 9 * CO_BLOCK..];
            for (ci_tap, &v) in src.iter().enumerate() {
                dst[ci_tap * CO_BLOCK + j] = v;
            }
        }
    }
    packed
}

/// Floats of one group's packed weights ([`pack_weights`]).
fn group_weights_len(g: &ConvGeom) -> usize {
    g.c_out_per_group().div_ceil(CO_BLOCK) * g.c_in_per_group() * 9 * CO_BLOCK
}

/// The forward of `g` (which [`applies`]), appending its `batch · c_out · h · w` outputs.
pub(crate) fn forward_into(g: &ConvGeom, x: &[f32], weight: &[f32], out: &mut Vec<f32>) {
    assert!(
        applies(g),
        "grouped direct conv: unsupported geometry {g:?}"
    );
    let (plane_in, plane) = (g.h * g.w, g.h_out * g.w_out);
    let sched = split_images(g.batch, plane, TARGET_POSITIONS, 2);
    let (cig, cog) = (g.c_in_per_group(), g.c_out_per_group());
    let lay = Padded::of(g);
    // Every group's packed weights once, shared by all chunks.
    let (per_group, packed) = (group_weights_len(g), pack_weights(g, weight));
    let image_out = g.c_out * plane;
    par_extend(
        out,
        g.batch * image_out,
        sched.images_per_chunk * image_out,
        |i, out_chunk| {
            let first = i * sched.images_per_chunk;
            let images = out_chunk.len() / image_out;
            let mut pad = take_buffer(cig * lay.channel);
            let mut acc = take_buffer(CO_BLOCK * lay.span);
            for b in 0..images {
                let img = &x[(first + b) * g.image_in()..][..g.image_in()];
                for grp in 0..g.groups {
                    let planes = &img[grp * cig * plane_in..][..cig * plane_in];
                    fill_padded(g, &lay, planes, &mut pad);
                    let w_grp = &packed[grp * per_group..][..per_group];
                    let out_grp =
                        &mut out_chunk[b * image_out + grp * cog * plane..][..cog * plane];
                    for blk in 0..cog.div_ceil(CO_BLOCK) {
                        let w_blk = &w_grp[blk * cig * 9 * CO_BLOCK..][..cig * 9 * CO_BLOCK];
                        // SAFETY: AVX2 and FMA are available (`applies`); the slices' lengths
                        // are checked inside against the layout before any pointer read.
                        unsafe { block_avx2(&lay, cig, &pad, w_blk, &mut acc) };
                        let n = CO_BLOCK.min(cog - blk * CO_BLOCK);
                        for j in 0..n {
                            let dst = &mut out_grp[(blk * CO_BLOCK + j) * plane..][..plane];
                            let src = &acc[j * lay.span..];
                            for y in 0..g.h_out {
                                dst[y * g.w_out..][..g.w_out]
                                    .copy_from_slice(&src[y * lay.row..][..g.w_out]);
                            }
                        }
                    }
                }
            }
            give_back(pad);
            give_back(acc);
        },
    );
}

/// The weight gradient (`[c_out, c_in/groups, 3, 3]`) of [`forward_into`] at input `x` for
/// the output gradient `grad_out`, written to `grad_w`.
pub(crate) fn weight_grad(g: &ConvGeom, x: &[f32], grad_out: &[f32], grad_w: &mut [f32]) {
    use rayon::prelude::*;
    assert!(
        applies(g),
        "grouped direct conv: unsupported geometry {g:?}"
    );
    let (cig, cog) = (g.c_in_per_group(), g.c_out_per_group());
    let (plane_in, plane) = (g.h * g.w, g.h_out * g.w_out);
    let lay = Padded::of(g);
    let runs = rayon::current_num_threads().clamp(1, g.batch.max(1));
    let per_run = g.batch.div_ceil(runs);
    let w_len = g.c_out * cig * 9;
    let parts: Vec<Vec<f32>> = (0..g.batch.div_ceil(per_run))
        .into_par_iter()
        .map(|r| {
            let (first, images) = (r * per_run, per_run.min(g.batch - r * per_run));
            let mut part = vec![0f32; w_len];
            let mut xs = take_buffer(images * cig * lay.channel);
            let mut dys = take_buffer(images * cog * lay.span);
            for grp in 0..g.groups {
                for b in 0..images {
                    let img =
                        &x[(first + b) * g.image_in() + grp * cig * plane_in..][..cig * plane_in];
                    fill_padded(g, &lay, img, &mut xs[b * cig * lay.channel..]);
                    let dy =
                        &grad_out[(first + b) * g.image_out() + grp * cog * plane..][..cog * plane];
                    fill_rows(
                        g,
                        &lay,
                        dy,
                        &mut dys[b * cog * lay.span..][..cog * lay.span],
                    );
                }
                let dst = &mut part[grp * cog * cig * 9..][..cog * cig * 9];
                // SAFETY: AVX2 and FMA are available (`applies`); lengths are checked inside.
                unsafe { weight_grad_avx2(&lay, images, cig, cog, &xs, &dys, dst) };
            }
            give_back(xs);
            give_back(dys);
            part
        })
        .collect();
    sum_in_order(&parts, &mut grad_w[..w_len]);
}

/// `rows` = the output-gradient `planes` with rows `lay.row` apart, zero in the columns past
/// `w_out` and after the last row, `lay.span` floats per plane: the output positions
/// [`forward_into`] computes, so the dropped ones contribute nothing.
fn fill_rows(g: &ConvGeom, lay: &Padded, planes: &[f32], rows: &mut [f32]) {
    rows.fill(0.0);
    for (c, plane) in planes.chunks_exact(g.h_out * g.w_out).enumerate() {
        let ch = &mut rows[c * lay.span..][..lay.span];
        for (y, row) in plane.chunks_exact(g.w_out).enumerate() {
            ch[y * lay.row..][..g.w_out].copy_from_slice(row);
        }
    }
}

/// `dst[co][ci][tap] = Σ_b Σ_p dys[b][co][p] · xs[b][ci][p + off(tap)]` for one group.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weight_grad_avx2(
    lay: &Padded,
    images: usize,
    cig: usize,
    cog: usize,
    xs: &[f32],
    dys: &[f32],
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(
        xs.len() >= images * cig * lay.channel,
        "grouped dW: padded input too short"
    );
    assert!(
        dys.len() >= images * cog * lay.span,
        "grouped dW: output gradient too short"
    );
    assert!(
        dst.len() >= cog * cig * 9,
        "grouped dW: destination too short"
    );
    assert!(lay.span.is_multiple_of(8) && lay.taps_inside());
    let offsets = lay.offsets;
    let (xp, dp) = (xs.as_ptr(), dys.as_ptr());
    for co in 0..cog {
        for ci in 0..cig {
            let mut acc = [_mm256_setzero_ps(); 9];
            for b in 0..images {
                let dy = dp.add((b * cog + co) * lay.span);
                let xc = xp.add((b * cig + ci) * lay.channel);
                for p in (0..lay.span).step_by(8) {
                    let d = _mm256_loadu_ps(dy.add(p));
                    for (a, &off) in acc.iter_mut().zip(&offsets) {
                        // In bounds: p + 7 + off < span + off ≤ channel (asserted).
                        *a = _mm256_fmadd_ps(d, _mm256_loadu_ps(xc.add(p + off)), *a);
                    }
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                // Pairwise, in a fixed order.
                let s4 = [
                    lanes[0] + lanes[4],
                    lanes[1] + lanes[5],
                    lanes[2] + lanes[6],
                    lanes[3] + lanes[7],
                ];
                dst[(co * cig + ci) * 9 + t] = (s4[0] + s4[2]) + (s4[1] + s4[3]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn weight_grad_avx2(
    _: &Padded,
    _: usize,
    _: usize,
    _: usize,
    _: &[f32],
    _: &[f32],
    _: &mut [f32],
) {
    unreachable!("grouped direct conv needs AVX2 (`applies` is false elsewhere)")
}

/// `pad` = the group's `cig` planes, zero-padded by one pixel, in `lay`'s layout (one plane
/// with rows `lay.row` apart for stride 1, its four phases for stride 2), each channel
/// `lay.channel` floats, zero everywhere else.
fn fill_padded(g: &ConvGeom, lay: &Padded, planes: &[f32], pad: &mut [f32]) {
    let cig = planes.len() / (g.h * g.w);
    let pad = &mut pad[..cig * lay.channel];
    pad.fill(0.0);
    for (c, plane) in planes.chunks_exact(g.h * g.w).enumerate() {
        let ch = &mut pad[c * lay.channel..][..lay.channel];
        if lay.stride == 1 {
            for (y, row) in plane.chunks_exact(g.w).enumerate() {
                ch[(y + 1) * lay.row + 1..][..g.w].copy_from_slice(row);
            }
            continue;
        }
        // Padded pixel (y + 1, x + 1) goes to phase ((y + 1) mod 2, (x + 1) mod 2), at
        // ((y + 1) / 2, (x + 1) / 2): even x to the odd-column phase at x / 2, odd x to the
        // even-column phase at (x + 1) / 2.
        for (y, row) in plane.chunks_exact(g.w).enumerate() {
            let (py, a) = ((y + 1) % 2, y.div_ceil(2));
            let (even_cols, odd_cols) = ch.split_at_mut((py * 2 + 1) * lay.phase);
            let even_cols = &mut even_cols[py * 2 * lay.phase + a * lay.row..][..lay.row];
            let odd_cols = &mut odd_cols[a * lay.row..][..lay.row];
            for (k, pair) in row.chunks_exact(2).enumerate() {
                odd_cols[k] = pair[0];
                even_cols[k + 1] = pair[1];
            }
            if g.w % 2 == 1 {
                odd_cols[g.w / 2] = row[g.w - 1];
            }
        }
    }
}

/// `acc[j][p] = Σ_ci Σ_tap w[ci][tap][j] · pad[ci][p + off(tap)]` for the block's 4 output
/// channels `j` and every computed position `p < lay.span`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(lay: &Padded, cig: usize, pad: &[f32], w: &[f32], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(
        pad.len() >= cig * lay.channel,
        "grouped conv: padded input too short"
    );
    assert!(
        w.len() >= cig * 9 * CO_BLOCK,
        "grouped conv: packed weights too short"
    );
    assert!(
        acc.len() >= CO_BLOCK * lay.span,
        "grouped conv: accumulator too short"
    );
    assert!(lay.span.is_multiple_of(P_BLOCK) && lay.taps_inside());
    let offsets = lay.offsets;
    let (pp, wp, ap) = (pad.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
    for p0 in (0..lay.span).step_by(P_BLOCK) {
        let mut s = [[_mm256_setzero_ps(); 2]; CO_BLOCK];
        for ci in 0..cig {
            let base = pp.add(ci * lay.channel + p0);
            let wci = wp.add(ci * 9 * CO_BLOCK);
            for (t, &off) in offsets.iter().enumerate() {
                // In bounds: p0 + 15 + off < span + off ≤ channel (asserted).
                let v0 = _mm256_loadu_ps(base.add(off));
                let v1 = _mm256_loadu_ps(base.add(off + 8));
                for (j, sj) in s.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*wci.add(t * CO_BLOCK + j));
                    sj[0] = _mm256_fmadd_ps(wv, v0, sj[0]);
                    sj[1] = _mm256_fmadd_ps(wv, v1, sj[1]);
                }
            }
        }
        for (j, sj) in s.iter().enumerate() {
            _mm256_storeu_ps(ap.add(j * lay.span + p0), sj[0]);
            _mm256_storeu_ps(ap.add(j * lay.span + p0 + 8), sj[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_avx2(_: &Padded, _: usize, _: &[f32], _: &[f32], _: &mut [f32]) {
    unreachable!("grouped direct conv needs AVX2 (`applies` is false elsewhere)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values;

    /// f64 direct grouped convolution and its weight gradient for output gradient `dy`.
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (cig, cog) = (g.c_in_per_group(), g.c_out_per_group());
        let mut y = vec![0f64; g.batch * g.c_out * g.h_out * g.w_out];
        let mut gw = vec![0f64; g.c_out * cig * 9];
        for b in 0..g.batch {
            for co in 0..g.c_out {
                let grp = co / cog;
                for oy in 0..g.h_out {
                    for ox in 0..g.w_out {
                        let yi = ((b * g.c_out + co) * g.h_out + oy) * g.w_out + ox;
                        for ci in 0..cig {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy * g.stride + ky, ox * g.stride + kx);
                                    if iy < 1 || ix < 1 || iy > g.h || ix > g.w {
                                        continue;
                                    }
                                    let xv = x[((b * g.c_in + grp * cig + ci) * g.h + iy - 1) * g.w
                                        + ix
                                        - 1] as f64;
                                    let wi = ((co * cig + ci) * 3 + ky) * 3 + kx;
                                    y[yi] += xv * w[wi] as f64;
                                    gw[wi] += dy[yi] as f64 * xv;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, gw)
    }

    /// (batch, c_in, c_out, side, groups, stride): ResNeXt's 4/4 and 32/32 groups, 3 outputs
    /// per group (a partial register block), odd and tiny planes, both strides.
    const CASES: [(usize, usize, usize, usize, usize, usize); 10] = [
        (2, 16, 16, 32, 4, 1),
        (3, 64, 64, 4, 2, 1),
        (2, 8, 12, 7, 4, 1),
        (1, 6, 6, 1, 3, 1),
        (5, 8, 8, 5, 2, 1),
        (2, 16, 16, 32, 4, 2),
        (3, 64, 64, 8, 2, 2),
        (2, 8, 12, 7, 4, 2),
        (1, 6, 6, 1, 3, 2),
        (2, 8, 8, 6, 2, 2),
    ];

    fn geom(case: (usize, usize, usize, usize, usize, usize)) -> ConvGeom {
        let (batch, c_in, c_out, side, groups, stride) = case;
        let side_out = (side - 1) / stride + 1;
        ConvGeom {
            batch,
            c_in,
            h: side,
            w: side,
            c_out,
            kh: 3,
            kw: 3,
            stride,
            padding: 1,
            groups,
            h_out: side_out,
            w_out: side_out,
        }
    }

    #[test]
    fn weight_gradient_matches_f64_and_depends_on_the_thread_count_only() {
        if !has_avx2_fma() {
            eprintln!("SKIPPED grouped direct conv: this CPU has no AVX2/FMA");
            return;
        }
        for case in CASES {
            let g = geom(case);
            let x = test_values(g.batch * g.image_in(), 3);
            let dy = test_values(g.batch * g.image_out(), 4);
            let mut gw = vec![f32::NAN; g.c_out * g.c_in_per_group() * 9];
            weight_grad(&g, &x, &dy, &mut gw);
            let w = test_values(gw.len(), 2);
            let want = reference(&g, &x, &w, &dy).1;
            let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            for (i, (a, e)) in gw.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - e).abs() <= 1e-5 * scale,
                    "{g:?}: weight gradient {i}: {a} vs {e}"
                );
            }
            let mut again = vec![0f32; gw.len()];
            weight_grad(&g, &x, &dy, &mut again);
            assert_eq!(gw, again, "{g:?}: not reproducible");
        }
    }

    #[test]
    fn matches_an_f64_direct_convolution_on_every_plane_size() {
        if !has_avx2_fma() {
            eprintln!("SKIPPED grouped direct conv: this CPU has no AVX2/FMA");
            return;
        }
        // (batch, c_in, c_out, side, groups): ResNeXt's 4/4 and 32/32 groups, 3 outputs per
        // group (a partial register block), odd and tiny planes.
        for case in CASES {
            let g = geom(case);
            let x = test_values(g.batch * g.image_in(), 1);
            let w = test_values(g.c_out * g.c_in_per_group() * 9, 2);
            let mut out = Vec::new();
            forward_into(&g, &x, &w, &mut out);
            let dy = test_values(g.batch * g.image_out(), 4);
            let want = reference(&g, &x, &w, &dy).0;
            assert_eq!(out.len(), want.len());
            let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            for (i, (a, e)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - e).abs() <= 1e-6 * scale,
                    "{g:?}: output {i}: {a} vs {e}"
                );
            }
        }
    }
}
