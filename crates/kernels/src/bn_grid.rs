//! Launch geometry of the CUDA BatchNorm kernels (`cuda::batch_norm`, `kernels.cu`), kept
//! device-neutral so that it is tested on any machine.
//!
//! * Reductions (batch statistics, the backward's two sums) run on a 2-D grid: one block per
//!   (chunk of images, channel), each adding its chunk's values in a fixed tree; a second pass
//!   adds the chunks in chunk order (deterministic). One block per channel, as before, left
//!   most of the GPU idle at 64 channels (64 blocks for 132 SMs on an H100).
//! * Element-wise passes (normalisation, input gradient) run `elementwise_blocks` blocks per
//!   channel (grid `(blocks, C)`), each striding over the channel's `N·P` values, instead of one
//!   block per `P`-value plane (16 of 32 lanes busy on 4×4 planes).
//!
//! Both walk a channel's values as `(image, position)` pairs without a division per value (see
//! `ChannelWalk` in kernels.cu), with 32-bit indices: [`check_fits`] refuses what they cannot
//! index.

use crate::cpu::batch_norm::BnGeom;
use candle_core::{bail, Result};

/// Threads per block of every BatchNorm kernel (at most; fewer for small channels).
pub(crate) const MAX_THREADS: usize = 256;

/// Blocks the reductions aim for: ≈ 8 per SM on a 132-SM H100, enough to hide memory latency.
const TARGET_REDUCE_BLOCKS: usize = 1024;

/// A reduction block gets at least this many values when the channel has them, so that the
/// second pass over chunks stays short and blocks are not mostly reduction overhead.
const MIN_VALUES_PER_REDUCE_BLOCK: usize = 1024;

/// Values per thread the element-wise passes aim for (a few loads in flight per thread).
const VALUES_PER_THREAD: usize = 4;

/// How the reductions split each channel's images: `chunks` blocks per channel (grid
/// `(chunks, C)`), block `k` taking images `[k·images_per_chunk, min(N, (k+1)·images_per_chunk))`,
/// none of them empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReduceGrid {
    /// Blocks per channel.
    pub chunks: usize,
    /// Images per block (the last block may have fewer).
    pub images_per_chunk: usize,
}

/// The reduction grid of `g`: about [`TARGET_REDUCE_BLOCKS`] blocks in all, none with fewer
/// than [`MIN_VALUES_PER_REDUCE_BLOCK`] values unless a channel has fewer, whole images per
/// block.
pub(crate) fn reduce_grid(g: &BnGeom) -> ReduceGrid {
    let batch = g.batch.max(1);
    let wanted = TARGET_REDUCE_BLOCKS.div_ceil(g.channels.max(1));
    let affordable = (g.batch * g.plane / MIN_VALUES_PER_REDUCE_BLOCK).max(1);
    let chunks = wanted.min(affordable).clamp(1, batch);
    let images_per_chunk = batch.div_ceil(chunks);
    ReduceGrid {
        // Recounted so that no block is left without images.
        chunks: batch.div_ceil(images_per_chunk),
        images_per_chunk,
    }
}

/// Blocks per channel of the element-wise passes (grid `(blocks, C)`).
pub(crate) fn elementwise_blocks(g: &BnGeom) -> usize {
    (g.batch * g.plane)
        .div_ceil(MAX_THREADS * VALUES_PER_THREAD)
        .clamp(1, 65_535)
}

/// Refuses geometries the kernels cannot index: a channel's `N·P` values and every dimension
/// must fit an `i32` (the walk's indices), and the channel count the grid's y dimension.
pub(crate) fn check_fits(g: &BnGeom, op: &str) -> Result<()> {
    let per_channel = g.batch.checked_mul(g.plane);
    if per_channel.is_none_or(|v| v > i32::MAX as usize) || g.channels > 65_535 {
        bail!(
            "{op}: {} images × {} channels × {} values per plane is beyond the CUDA kernels' \
             limits (N·H·W ≤ 2^31 − 1, C ≤ 65535)",
            g.batch,
            g.channels,
            g.plane
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(batch: usize, channels: usize, plane: usize) -> BnGeom {
        BnGeom {
            batch,
            channels,
            plane,
        }
    }

    /// kernels.cu's `ChannelWalk`, step for step: the flat per-channel index `start`,
    /// `start + stride`, ... as `(image, position)` from image `img0`, while the image is
    /// below `img_end`.
    fn walk(img0: usize, start: usize, stride: usize, p: usize, img_end: usize) -> Vec<usize> {
        let (mut img, mut q) = (img0 + start / p, start % p);
        let (step_img, step_q) = (stride / p, stride % p);
        let mut visited = Vec::new();
        while img < img_end {
            visited.push(img * p + q);
            img += step_img;
            q += step_q;
            if q >= p {
                q -= p;
                img += 1;
            }
        }
        visited
    }

    #[test]
    fn reduction_chunks_cover_every_image_once_with_none_empty() {
        for (n, c, p) in [
            (100, 64, 1024),
            (100, 512, 16),
            (100, 2048, 16),
            (100, 256, 64),
            (8, 16, 100),
            (3, 5, 7),
            (1, 1, 1),
            (7, 1, 100_000),
            (4, 8, 1024),
        ] {
            let g = geom(n, c, p);
            let r = reduce_grid(&g);
            let mut covered = Vec::new();
            for k in 0..r.chunks {
                let (a, b) = (
                    k * r.images_per_chunk,
                    ((k + 1) * r.images_per_chunk).min(n),
                );
                assert!(a < b, "{g:?}: chunk {k} of {r:?} is empty");
                covered.extend(a..b);
            }
            assert_eq!(covered, (0..n).collect::<Vec<_>>(), "{g:?}: {r:?}");
            // At least half the chunks asked for (whole images per chunk round them down).
            let ideal = TARGET_REDUCE_BLOCKS
                .div_ceil(c)
                .min((n * p / MIN_VALUES_PER_REDUCE_BLOCK).max(1))
                .min(n);
            assert!(2 * r.chunks >= ideal, "{g:?}: {r:?}, ideal {ideal}");
        }
        // ResNet-18's first stage at batch 100: 64 blocks before, now 15 per channel.
        assert_eq!(
            reduce_grid(&geom(100, 64, 1024)),
            ReduceGrid {
                chunks: 15,
                images_per_chunk: 7
            }
        );
    }

    #[test]
    fn the_channel_walk_visits_each_value_once() {
        for p in [1, 7, 16, 100, 1024] {
            for n in [1, 3, 13] {
                // Reductions: one block's threads over a chunk; element-wise: all blocks.
                for (threads, blocks) in [(32, 1), (256, 1), (32, 3), (256, 7)] {
                    let stride = threads * blocks;
                    let (img0, img_end) = (1.min(n - 1), n);
                    let mut all: Vec<usize> = (0..stride)
                        .flat_map(|start| walk(img0, start, stride, p, img_end))
                        .collect();
                    all.sort_unstable();
                    let expected: Vec<usize> = (img0 * p..img_end * p).collect();
                    assert_eq!(
                        all, expected,
                        "p {p} n {n} threads {threads} blocks {blocks}"
                    );
                }
            }
        }
    }

    #[test]
    fn element_wise_blocks_give_each_thread_a_few_values() {
        assert_eq!(elementwise_blocks(&geom(100, 64, 1024)), 100);
        assert_eq!(elementwise_blocks(&geom(100, 2048, 16)), 2);
        assert_eq!(elementwise_blocks(&geom(1, 3, 1)), 1);
        assert_eq!(elementwise_blocks(&geom(100_000, 1, 100_000)), 65_535);
    }

    #[test]
    fn geometries_beyond_32_bit_indices_are_refused() {
        assert!(check_fits(&geom(100, 2048, 1024), "bn").is_ok());
        let err = check_fits(&geom(1 << 16, 1, 1 << 16), "kernels-batch-norm")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("kernels-batch-norm: 65536 images"), "{err}");
        assert!(check_fits(&geom(1, 70_000, 1), "bn").is_err());
    }
}
