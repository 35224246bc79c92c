//! Training augmentation (spec §1.3) and the seeded random streams behind it.
//!
//! Every random choice is a pure function of `(seed, epoch, position)`: the epoch's order comes
//! from a ChaCha8 stream keyed by `(seed, epoch)`, and the crop/flip draws of batch `b` from a
//! stream keyed by `(seed, epoch, b)`. A run resumed at any epoch or batch, with any number of
//! worker threads, therefore sees exactly the same batches.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::split::IMAGE_BYTES;

/// Side length of a CIFAR image.
pub const SIDE: usize = 32;
/// Pixels added on each side before the random crop.
pub const PAD: usize = 4;
/// Largest crop offset: the crop's top-left corner lies in `0..=MAX_OFFSET` of the padded image.
pub const MAX_OFFSET: usize = 2 * PAD;

/// How the 4-pixel border of `RandomCrop(32, padding=4)` is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingMode {
    /// Zeros (black), torchvision's default and the CIFAR-10 config's choice.
    #[default]
    Constant,
    /// Mirror without repeating the edge pixel (numpy/torch `reflect`), as the CIFAR-100 config.
    Reflect,
}

/// The random choices for one training image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AugmentParams {
    /// Top offset of the crop in the padded 40×40 image, `0..=8`.
    pub top: usize,
    /// Left offset of the crop in the padded image, `0..=8`.
    pub left: usize,
    /// Whether the crop is mirrored left-right afterwards.
    pub flip: bool,
}

impl AugmentParams {
    /// The identity transform (centre crop, no flip).
    pub const IDENTITY: AugmentParams = AugmentParams {
        top: PAD,
        left: PAD,
        flip: false,
    };

    /// Draws `top, left ∈ U{0..8}` and `flip ~ Bernoulli(0.5)`, in that order.
    pub fn sample(rng: &mut impl Rng) -> Self {
        let top = rng.random_range(0..=MAX_OFFSET);
        let left = rng.random_range(0..=MAX_OFFSET);
        let flip = rng.random_bool(0.5);
        AugmentParams { top, left, flip }
    }
}

// Separate tags keep the order and augmentation streams independent even for equal keys.
const ORDER_STREAM: u64 = 0x006f_7264_6572; // "order"
const AUGMENT_STREAM: u64 = 0x6175_676d; // "augm"

fn keyed_rng(tag: u64, seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&tag.to_le_bytes());
    key[8..16].copy_from_slice(&seed.to_le_bytes());
    key[16..24].copy_from_slice(&epoch.to_le_bytes());
    key[24..].copy_from_slice(&index.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// The order in which epoch `epoch` visits `n` images: a uniformly random permutation that
/// depends only on `(seed, epoch)`.
pub fn epoch_permutation(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut keyed_rng(ORDER_STREAM, seed, epoch as u64, 0));
    order
}

/// The augmentation parameters of the `count` images of batch `batch` in epoch `epoch`.
pub fn batch_augment_params(
    seed: u64,
    epoch: usize,
    batch: usize,
    count: usize,
) -> Vec<AugmentParams> {
    let mut rng = keyed_rng(AUGMENT_STREAM, seed, epoch as u64, batch as u64);
    (0..count)
        .map(|_| AugmentParams::sample(&mut rng))
        .collect()
}

/// Maps a padded-image coordinate (`0..40`) to a source coordinate, or `None` for zero padding.
#[inline]
fn source_index(padded: usize, mode: PaddingMode) -> Option<usize> {
    let p = padded as isize - PAD as isize;
    let n = SIDE as isize;
    if (0..n).contains(&p) {
        return Some(p as usize);
    }
    match mode {
        PaddingMode::Constant => None,
        PaddingMode::Reflect => Some(if p < 0 { -p } else { 2 * (n - 1) - p } as usize),
    }
}

/// Pads, crops and optionally flips one CHW `u8` image (`src`, 3072 bytes) into `dst`.
///
/// `dst[c][y][x] = padded[c][y + top][x' + left]` with `x' = 31 − x` when flipping and `x`
/// otherwise, where `padded` is `src` with a 4-pixel border filled according to `mode`.
pub fn augment_image(src: &[u8], dst: &mut [u8], params: AugmentParams, mode: PaddingMode) {
    assert_eq!(
        src.len(),
        IMAGE_BYTES,
        "augment_image: source must be 3072 bytes"
    );
    assert_eq!(
        dst.len(),
        IMAGE_BYTES,
        "augment_image: destination must be 3072 bytes"
    );
    assert!(
        params.top <= MAX_OFFSET && params.left <= MAX_OFFSET,
        "augment_image: crop offsets must be in 0..=8"
    );
    let mut cols = [None; SIDE];
    for (x, col) in cols.iter_mut().enumerate() {
        let xc = if params.flip { SIDE - 1 - x } else { x };
        *col = source_index(xc + params.left, mode);
    }
    for c in 0..3 {
        let plane = &src[c * SIDE * SIDE..(c + 1) * SIDE * SIDE];
        let out_plane = &mut dst[c * SIDE * SIDE..(c + 1) * SIDE * SIDE];
        for (y, out_row) in out_plane.chunks_exact_mut(SIDE).enumerate() {
            match source_index(y + params.top, mode) {
                None => out_row.fill(0),
                Some(sy) => {
                    let row = &plane[sy * SIDE..(sy + 1) * SIDE];
                    for (o, col) in out_row.iter_mut().zip(&cols) {
                        *o = col.map_or(0, |sx| row[sx]);
                    }
                }
            }
        }
    }
}
