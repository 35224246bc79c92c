//! CIFAR-10-C corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
//! Common Corruptions and Perturbations", ICLR 2019), computed on the fly from clean test images.
//!
//! Every function takes one image in the [`crate::CifarSplit`] layout (3×32×32 CHW `u8`, the R
//! plane, then G, then B) and a severity in `1..=5`, and returns the corrupted image in the same
//! layout. The parameters are those of `make_cifar_c.py` in `hendrycks/robustness`
//! (`ImageNet-C/create_c/make_cifar_c.py`); `docs/evaluation.md` lists them and what is not
//! reproduced bit-exactly. As there, float results are turned into bytes by truncation
//! (`np.uint8(x·255)`), while the PIL-based ones (pixelate, JPEG) stay in 8 bits throughout.
//!
//! The random corruptions draw from the `rng` they are given; [`image_rng`] derives one per
//! `(seed, corruption, severity, image index)`, so a corrupted test set does not depend on how
//! it is batched or parallelised.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};

use crate::split::IMAGE_BYTES;

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;

/// The severities every corruption defines.
pub const SEVERITIES: [usize; 5] = [1, 2, 3, 4, 5];

/// One CIFAR-10-C corruption.
///
/// The discriminants are stable (they seed [`image_rng`]); new corruptions get new numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Corruption {
    /// [`gaussian_noise`].
    GaussianNoise = 0,
    /// [`shot_noise`].
    ShotNoise = 1,
    /// [`impulse_noise`].
    ImpulseNoise = 2,
    /// [`defocus_blur`].
    DefocusBlur = 3,
    /// [`gaussian_blur`].
    GaussianBlur = 4,
    /// [`contrast`].
    Contrast = 5,
    /// [`brightness`].
    Brightness = 6,
    /// [`pixelate`].
    Pixelate = 7,
    /// [`jpeg_compression`].
    JpegCompression = 8,
}

impl Corruption {
    /// Every implemented corruption, in CIFAR-10-C's order.
    pub const ALL: [Corruption; 9] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::DefocusBlur,
        Corruption::GaussianBlur,
        Corruption::Contrast,
        Corruption::Brightness,
        Corruption::Pixelate,
        Corruption::JpegCompression,
    ];

    /// The CIFAR-10-C name (`gaussian_noise`, …, the `.npy` file stem of the released set).
    pub fn name(self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::DefocusBlur => "defocus_blur",
            Corruption::GaussianBlur => "gaussian_blur",
            Corruption::Contrast => "contrast",
            Corruption::Brightness => "brightness",
            Corruption::Pixelate => "pixelate",
            Corruption::JpegCompression => "jpeg_compression",
        }
    }

    /// The corruption called `name` (as [`Self::name`] spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether the result depends on the random generator (the three noises).
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Corruption::GaussianNoise | Corruption::ShotNoise | Corruption::ImpulseNoise
        )
    }

    /// Applies the corruption at `severity` (`1..=5`) to one CHW image; deterministic ones
    /// ignore `rng`.
    ///
    /// # Panics
    /// When `image` is not 3072 bytes or `severity` is not in `1..=5`.
    pub fn apply<R: Rng + ?Sized>(self, image: &[u8], severity: usize, rng: &mut R) -> Vec<u8> {
        match self {
            Corruption::GaussianNoise => gaussian_noise(image, severity, rng),
            Corruption::ShotNoise => shot_noise(image, severity, rng),
            Corruption::ImpulseNoise => impulse_noise(image, severity, rng),
            Corruption::DefocusBlur => defocus_blur(image, severity),
            Corruption::GaussianBlur => gaussian_blur(image, severity),
            Corruption::Contrast => contrast(image, severity),
            Corruption::Brightness => brightness(image, severity),
            Corruption::Pixelate => pixelate(image, severity),
            Corruption::JpegCompression => jpeg_compression(image, severity),
        }
    }
}

/// The generator for image `index` of a corrupted set: ChaCha8 keyed by the four numbers
/// (little-endian `seed`, corruption number, `severity`, `index`), so every image's noise is
/// fixed by its position alone.
pub fn image_rng(seed: u64, corruption: Corruption, severity: usize, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(corruption as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(severity as u64).to_le_bytes());
    key[24..].copy_from_slice(&index.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Checks the arguments; returns the 0-based severity index.
fn check(image: &[u8], severity: usize) -> usize {
    assert_eq!(
        image.len(),
        IMAGE_BYTES,
        "a corruption takes one 3×32×32 CHW image"
    );
    assert!(
        (1..=5).contains(&severity),
        "corruption severity must be in 1..=5, got {severity}"
    );
    severity - 1
}

fn to_unit(image: &[u8]) -> Vec<f64> {
    image.iter().map(|&v| v as f64 / 255.0).collect()
}

/// `np.uint8(np.clip(x, 0, 1) * 255)`: clipped, scaled, truncated (NaN becomes 0).
fn to_u8(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0) as u8)
        .collect()
}

/// `clip(x + N(0, c²))`, c = [0.04, 0.06, 0.08, 0.09, 0.10].
pub fn gaussian_noise<R: Rng + ?Sized>(image: &[u8], severity: usize, rng: &mut R) -> Vec<u8> {
    let c = [0.04, 0.06, 0.08, 0.09, 0.10][check(image, severity)];
    let out: Vec<f64> = to_unit(image)
        .into_iter()
        .map(|x| {
            let z: f64 = StandardNormal.sample(rng);
            x + c * z
        })
        .collect();
    to_u8(&out)
}

/// `clip(Poisson(x·c) / c)`, c = [500, 250, 100, 75, 50].
pub fn shot_noise<R: Rng + ?Sized>(image: &[u8], severity: usize, rng: &mut R) -> Vec<u8> {
    let c = [500.0, 250.0, 100.0, 75.0, 50.0][check(image, severity)];
    // Only 256 distinct rates exist; building each distribution once per image keeps the
    // per-value cost to one draw.
    let mut dists: Vec<Option<Poisson<f64>>> = vec![None; 256];
    let out: Vec<f64> = image
        .iter()
        .map(|&v| {
            let rate = v as f64 / 255.0 * c;
            if rate <= 0.0 {
                // numpy's poisson(0) is 0; rand_distr rejects a zero rate.
                return 0.0;
            }
            let d = dists[v as usize]
                .get_or_insert_with(|| Poisson::new(rate).expect("a positive finite rate"));
            d.sample(rng) / c
        })
        .collect();
    to_u8(&out)
}

/// Salt and pepper as `skimage.util.random_noise(mode='s&p', amount=c)`: each value
/// independently, with probability `c`, becomes 0 or 1 (even odds); c = [.01, .02, .03, .05,
/// .07].
pub fn impulse_noise<R: Rng + ?Sized>(image: &[u8], severity: usize, rng: &mut R) -> Vec<u8> {
    let c = [0.01, 0.02, 0.03, 0.05, 0.07][check(image, severity)];
    let out: Vec<f64> = to_unit(image)
        .into_iter()
        .map(|x| {
            if rng.random::<f64>() < c {
                if rng.random::<bool>() {
                    1.0
                } else {
                    0.0
                }
            } else {
                x
            }
        })
        .collect();
    to_u8(&out)
}

/// OpenCV's reflection without repeating the edge (`BORDER_REFLECT_101`: `dcb|abcd|cba`), for
/// offsets smaller than `n`.
fn reflect101(i: isize, n: usize) -> usize {
    let n = n as isize;
    let j = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    j.clamp(0, n - 1) as usize
}

/// The 1-D Gaussian of `cv2.getGaussianKernel(3, sigma)`.
fn cv2_gaussian3(sigma: f64) -> [f64; 3] {
    let side = (-1.0 / (2.0 * sigma * sigma)).exp();
    let sum = 1.0 + 2.0 * side;
    [side / sum, 1.0 / sum, side / sum]
}

/// `make_cifar_c.disk(radius, alias_blur)`: the aliased disk `X² + Y² ≤ r²` on the grid
/// `-8..=8`, normalised to sum 1, then `cv2.GaussianBlur(ksize=(3, 3), sigmaX=alias_blur)`
/// (border `BORDER_REFLECT_101`). Row-major 17×17.
pub fn defocus_kernel(radius: f64, alias_blur: f64) -> Vec<f64> {
    const K: usize = 17;
    let mut disk = vec![0.0; K * K];
    for (i, row) in disk.chunks_mut(K).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let (y, x) = (i as f64 - 8.0, j as f64 - 8.0);
            *v = if x * x + y * y <= radius * radius {
                1.0
            } else {
                0.0
            };
        }
    }
    let total: f64 = disk.iter().sum();
    disk.iter_mut().for_each(|v| *v /= total);
    let g = cv2_gaussian3(alias_blur);
    let pass = |src: &[f64], horizontal: bool| -> Vec<f64> {
        let mut out = vec![0.0; K * K];
        for i in 0..K {
            for j in 0..K {
                out[i * K + j] = (0..3)
                    .map(|t| {
                        let d = t as isize - 1;
                        let (si, sj) = if horizontal {
                            (i, reflect101(j as isize + d, K))
                        } else {
                            (reflect101(i as isize + d, K), j)
                        };
                        g[t] * src[si * K + sj]
                    })
                    .sum();
            }
        }
        out
    };
    pass(&pass(&disk, true), false)
}

/// Each channel correlated (`cv2.filter2D`, border `BORDER_REFLECT_101`) with
/// [`defocus_kernel`]`(r, a)`, (r, a) = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5,
/// 0.1)].
pub fn defocus_blur(image: &[u8], severity: usize) -> Vec<u8> {
    let (r, a) =
        [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)][check(image, severity)];
    let kernel = defocus_kernel(r, a);
    // Most of the 17×17 kernel is (numerically) zero for these radii: skip those taps.
    let taps: Vec<(isize, isize, f64)> = kernel
        .iter()
        .enumerate()
        .filter(|(_, &w)| w != 0.0)
        .map(|(k, &w)| ((k / 17) as isize - 8, (k % 17) as isize - 8, w))
        .collect();
    let x = to_unit(image);
    let mut out = vec![0.0; IMAGE_BYTES];
    for c in 0..3 {
        let plane = &x[c * PLANE..(c + 1) * PLANE];
        for i in 0..SIDE {
            for j in 0..SIDE {
                out[c * PLANE + i * SIDE + j] = taps
                    .iter()
                    .map(|&(di, dj, w)| {
                        let si = reflect101(i as isize + di, SIDE);
                        let sj = reflect101(j as isize + dj, SIDE);
                        w * plane[si * SIDE + sj]
                    })
                    .sum();
            }
        }
    }
    to_u8(&out)
}

/// `skimage.filters.gaussian(x, sigma=c, multichannel=True)`: a separable Gaussian per channel
/// (scipy's `gaussian_filter`, truncate 4.0, so radius `int(4σ + 0.5)`; mode `'nearest'`),
/// c = [.4, .6, .7, .8, 1].
pub fn gaussian_blur(image: &[u8], severity: usize) -> Vec<u8> {
    let sigma: f64 = [0.4, 0.6, 0.7, 0.8, 1.0][check(image, severity)];
    let radius = (4.0 * sigma + 0.5) as isize;
    let mut weights: Vec<f64> = (-radius..=radius)
        .map(|k| (-0.5 * (k * k) as f64 / (sigma * sigma)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    weights.iter_mut().for_each(|w| *w /= total);
    let clamp = |i: isize| i.clamp(0, SIDE as isize - 1) as usize;
    let mut x = to_unit(image);
    let mut tmp = vec![0.0; PLANE];
    for plane in x.chunks_mut(PLANE) {
        // Along rows (axis 0), then along columns (axis 1), as scipy orders the axes.
        for i in 0..SIDE {
            for j in 0..SIDE {
                tmp[i * SIDE + j] = weights
                    .iter()
                    .enumerate()
                    .map(|(t, w)| w * plane[clamp(i as isize + t as isize - radius) * SIDE + j])
                    .sum();
            }
        }
        for i in 0..SIDE {
            for j in 0..SIDE {
                plane[i * SIDE + j] = weights
                    .iter()
                    .enumerate()
                    .map(|(t, w)| w * tmp[i * SIDE + clamp(j as isize + t as isize - radius)])
                    .sum();
            }
        }
    }
    to_u8(&x)
}

/// `(x − m)·c + m` with `m` each channel's mean over the image, c = [.75, .5, .4, .3, .15].
pub fn contrast(image: &[u8], severity: usize) -> Vec<u8> {
    let c = [0.75, 0.5, 0.4, 0.3, 0.15][check(image, severity)];
    let mut x = to_unit(image);
    for (plane, bytes) in x.chunks_mut(PLANE).zip(image.chunks(PLANE)) {
        // The mean from the exact integer sum: a flat channel then is its own mean to the last
        // bit and comes back unchanged (a float sum can land just below, and truncation would
        // then take one off).
        let sum: u64 = bytes.iter().map(|&v| v as u64).sum();
        let mean = sum as f64 / PLANE as f64 / 255.0;
        plane.iter_mut().for_each(|v| *v = (*v - mean) * c + mean);
    }
    to_u8(&x)
}

/// `skimage.color.rgb2hsv` of one pixel.
fn rgb2hsv([r, g, b]: [f64; 3]) -> [f64; 3] {
    let v = r.max(g).max(b);
    let delta = v - r.min(g).min(b);
    if delta == 0.0 {
        return [0.0, 0.0, v];
    }
    let s = delta / v;
    // skimage assigns red, then green, then blue: with ties the last match wins.
    let h = if b == v {
        4.0 + (r - g) / delta
    } else if g == v {
        2.0 + (b - r) / delta
    } else {
        (g - b) / delta
    };
    [(h / 6.0).rem_euclid(1.0), s, v]
}

/// `skimage.color.hsv2rgb` of one pixel.
fn hsv2rgb([h, s, v]: [f64; 3]) -> [f64; 3] {
    let hi = (h * 6.0).floor();
    let f = h * 6.0 - hi;
    let p = v * (1.0 - s);
    let q = v * (1.0 - f * s);
    let t = v * (1.0 - (1.0 - f) * s);
    match (hi as i64).rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// RGB → HSV, `V ← clip(V + c)`, back to RGB, c = [.05, .1, .15, .2, .3].
pub fn brightness(image: &[u8], severity: usize) -> Vec<u8> {
    let c = [0.05, 0.1, 0.15, 0.2, 0.3][check(image, severity)];
    let x = to_unit(image);
    let mut out = vec![0.0; IMAGE_BYTES];
    for p in 0..PLANE {
        let [h, s, v] = rgb2hsv([x[p], x[PLANE + p], x[2 * PLANE + p]]);
        let rgb = hsv2rgb([h, s, (v + c).clamp(0.0, 1.0)]);
        for (ch, value) in rgb.into_iter().enumerate() {
            out[ch * PLANE + p] = value;
        }
    }
    to_u8(&out)
}

/// Bits of PIL's fixed-point resampling coefficients (`PRECISION_BITS` in `Resample.c`).
const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `precompute_coeffs` for the BOX filter, normalised to 8-bit fixed point
/// (`normalize_coeffs_8bpc`): per output index, the first input index and the weights.
///
/// PIL's box filter counts an input pixel fully for every output pixel whose footprint
/// (`(x + ½)·scale ± ½·max(scale, 1)`) contains the input pixel's centre — for an integral
/// downscaling ratio this is the area average.
fn pil_box_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 0.5 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncation, then clamping, as in Resample.c.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let w: Vec<f64> = (0..xmax.max(0))
                .map(|x| {
                    let t = ((x + xmin) as f64 - center + 0.5) / filterscale;
                    if t > -0.5 && t <= 0.5 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let ww: f64 = w.iter().sum();
            let one = (1i64 << PIL_PRECISION_BITS) as f64;
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if ww != 0.0 { k / ww } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i64
                    } else {
                        (0.5 + k * one) as i64
                    }
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

/// One 8-bit channel (`h` rows of `w`) resized with PIL's BOX filter to `out_w × out_h`:
/// horizontal pass, then vertical, each rounded to 8 bits, as `Image.resize` does.
fn pil_resize_box(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let apply = |coeffs: &[(usize, Vec<i64>)], get: &dyn Fn(usize) -> u8| -> Vec<u8> {
        coeffs
            .iter()
            .map(|(xmin, k)| {
                let acc = k
                    .iter()
                    .enumerate()
                    .fold(1i64 << (PIL_PRECISION_BITS - 1), |acc, (x, &kx)| {
                        acc + get(xmin + x) as i64 * kx
                    });
                (acc >> PIL_PRECISION_BITS).clamp(0, 255) as u8
            })
            .collect()
    };
    let horizontal = pil_box_coeffs(w, out_w);
    let mut mid = Vec::with_capacity(out_w * h);
    for row in src.chunks(w) {
        mid.extend(apply(&horizontal, &|x| row[x]));
    }
    let vertical = pil_box_coeffs(h, out_h);
    let mut out = vec![0u8; out_w * out_h];
    for j in 0..out_w {
        let column = apply(&vertical, &|y| mid[y * out_w + j]);
        for (i, v) in column.into_iter().enumerate() {
            out[i * out_w + j] = v;
        }
    }
    out
}

/// PIL BOX resize to `int(32·c)` and back to 32, c = [0.95, 0.9, 0.85, 0.75, 0.65] (sides 30,
/// 28, 27, 24, 20).
pub fn pixelate(image: &[u8], severity: usize) -> Vec<u8> {
    let c = [0.95, 0.9, 0.85, 0.75, 0.65][check(image, severity)];
    let small = (SIDE as f64 * c) as usize;
    image
        .chunks(PLANE)
        .flat_map(|plane| {
            let down = pil_resize_box(plane, SIDE, SIDE, small, small);
            pil_resize_box(&down, small, small, SIDE, SIDE)
        })
        .collect()
}

/// A JPEG round trip at quality c = [80, 65, 58, 50, 40]: baseline encoding with the IJG
/// quality scaling of the Annex K tables and 4:2:0 chroma subsampling (PIL's defaults), then
/// decoding to RGB.
pub fn jpeg_compression(image: &[u8], severity: usize) -> Vec<u8> {
    let quality = [80u8, 65, 58, 50, 40][check(image, severity)];
    let mut rgb = vec![0u8; IMAGE_BYTES];
    for p in 0..PLANE {
        for c in 0..3 {
            rgb[3 * p + c] = image[c * PLANE + p];
        }
    }
    let mut encoded = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut encoded, quality);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    // Encoding and decoding a well-formed 32×32 RGB buffer in memory cannot fail short of a
    // bug in the codec crates.
    encoder
        .encode(&rgb, SIDE as u16, SIDE as u16, jpeg_encoder::ColorType::Rgb)
        .expect("JPEG encoding of a 32×32 RGB image");
    let options = zune_jpeg::zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(zune_jpeg::zune_core::colorspace::ColorSpace::RGB);
    let decoded =
        zune_jpeg::JpegDecoder::new_with_options(std::io::Cursor::new(&encoded[..]), options)
            .decode()
            .expect("JPEG decoding of the encoder's own output");
    assert_eq!(decoded.len(), IMAGE_BYTES, "decoded JPEG is 32×32 RGB");
    let mut out = vec![0u8; IMAGE_BYTES];
    for p in 0..PLANE {
        for c in 0..3 {
            out[c * PLANE + p] = decoded[3 * p + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A textured test image away from 0 and 255 (so clipping hides no change): smooth
    /// gradients plus seeded noise, different per channel.
    fn textured(seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let f = 2.0 + seed as f64;
        (0..IMAGE_BYTES)
            .map(|k| {
                let (c, i, j) = (k / PLANE, (k % PLANE) / SIDE, k % SIDE);
                let (y, x) = (i as f64, j as f64);
                let base = 110.0 + 2.0 * y - 1.5 * x - 15.0 * c as f64
                    + 40.0 * (x / f + c as f64).sin() * (y / (f + 2.0)).cos();
                (base + rng.random_range(-5.0..5.0)).clamp(20.0, 235.0) as u8
            })
            .collect()
    }

    fn mean_abs_change(a: &[u8], b: &[u8]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).abs())
            .sum::<f64>()
            / a.len() as f64
    }

    #[test]
    fn every_corruption_grows_with_severity_and_is_deterministic_for_a_seed() {
        // Over a few images: for one image a quantizer (JPEG) need not be monotone.
        let images: Vec<Vec<u8>> = (0..6).map(textured).collect();
        for c in Corruption::ALL {
            assert_eq!(Corruption::from_name(c.name()), Some(c));
            let changes: Vec<f64> = SEVERITIES
                .iter()
                .map(|&s| {
                    let mut total = 0.0;
                    for (i, img) in images.iter().enumerate() {
                        let a = c.apply(img, s, &mut image_rng(3, c, s, i as u64));
                        let b = c.apply(img, s, &mut image_rng(3, c, s, i as u64));
                        assert_eq!(a, b, "{} severity {s} is not deterministic", c.name());
                        if c.is_random() {
                            let other = c.apply(img, s, &mut image_rng(4, c, s, i as u64));
                            assert_ne!(a, other, "{} ignores the seed", c.name());
                        }
                        total += mean_abs_change(img, &a);
                    }
                    total / images.len() as f64
                })
                .collect();
            assert!(changes[0] > 0.0, "{}: {changes:?}", c.name());
            assert!(
                changes.windows(2).all(|w| w[1] > w[0]),
                "{}: mean |change| per severity {changes:?}",
                c.name()
            );
        }
        assert_eq!(Corruption::from_name("fog"), None);
    }

    #[test]
    fn image_rng_separates_every_key_component() {
        let draw = |mut r: ChaCha8Rng| r.random::<u64>();
        let base = draw(image_rng(1, Corruption::ShotNoise, 2, 3));
        assert_ne!(base, draw(image_rng(2, Corruption::ShotNoise, 2, 3)));
        assert_ne!(base, draw(image_rng(1, Corruption::GaussianNoise, 2, 3)));
        assert_ne!(base, draw(image_rng(1, Corruption::ShotNoise, 3, 3)));
        assert_ne!(base, draw(image_rng(1, Corruption::ShotNoise, 2, 4)));
    }

    /// Channel 0 half 0 and half 100 (mean 50), channel 1 flat 200, channel 2 flat 0.
    fn halves() -> Vec<u8> {
        let mut img = vec![0u8; IMAGE_BYTES];
        img[PLANE / 2..PLANE].fill(100);
        img[PLANE..2 * PLANE].fill(200);
        img
    }

    #[test]
    fn contrast_pulls_each_channel_towards_its_mean() {
        let img = halves();
        // Severity 1 (c = 0.75): (0 − 50)·0.75 + 50 = 12.5 → 12; (100 − 50)·0.75 + 50 = 87.5 → 87.
        let out = contrast(&img, 1);
        assert!(out[..PLANE / 2].iter().all(|&v| v == 12));
        assert!(out[PLANE / 2..PLANE].iter().all(|&v| v == 87));
        // Flat channels are their own mean.
        assert!(out[PLANE..2 * PLANE].iter().all(|&v| v == 200));
        assert!(out[2 * PLANE..].iter().all(|&v| v == 0));
        // Severity 5 (c = 0.15): 50 ∓ 7.5 → 42.5 → 42 and 57.5 → 57.
        let out = contrast(&img, 5);
        assert_eq!((out[0], out[PLANE - 1]), (42, 57));
    }

    #[test]
    fn brightness_adds_to_the_hsv_value() {
        let mut img = vec![0u8; IMAGE_BYTES];
        // Pixel 0: gray 100; pixel 1: (102, 51, 0), V = 0.4, S = 1, H = 1/12; pixel 2: pure red.
        img[0] = 100;
        img[PLANE] = 100;
        img[2 * PLANE] = 100;
        img[1] = 102;
        img[PLANE + 1] = 51;
        img[2] = 255;
        let out = brightness(&img, 1);
        let px = |p: usize| [out[p], out[PLANE + p], out[2 * PLANE + p]];
        // Gray: V = 100/255 + 0.05 → 112.75 → 112 in every channel.
        assert_eq!(px(0), [112, 112, 112]);
        // V = 0.45, same hue and saturation: (0.45, 0.225, 0)·255 = (114.75, 57.375, 0).
        assert_eq!(px(1), [114, 57, 0]);
        // V is already 1.
        assert_eq!(px(2), [255, 0, 0]);
        // Black: S = 0, V = 0.3 at severity 5 → 76.5 → 76.
        assert_eq!(brightness(&img, 5)[3], 76);
        // Round trips of the colour conversions.
        for rgb in [
            [0.2, 0.5, 0.9],
            [0.9, 0.1, 0.4],
            [0.3, 0.3, 0.8],
            [0.7, 0.7, 0.2],
        ] {
            let back = hsv2rgb(rgb2hsv(rgb));
            assert!(rgb.iter().zip(back).all(|(a, b)| (a - b).abs() < 1e-12));
        }
    }

    #[test]
    fn pil_box_resize_averages_pairs_and_repeats_pixels() {
        // 4 → 2: each output is the rounded mean of two inputs.
        let out = pil_resize_box(&[10, 21, 30, 40, 0, 0, 255, 254], 4, 2, 2, 2);
        assert_eq!(out, vec![16, 35, 0, 255]);
        // 2 → 4: nearest pixel, each repeated.
        let out = pil_resize_box(&[7, 9], 2, 1, 4, 1);
        assert_eq!(out, vec![7, 7, 9, 9]);
        // 3 → 2 (scale 1.5, footprints [0, 1.5) and [1.5, 3)): centres 0.5 | 1.5 falls in the
        // first footprint's closed end, so [x0, x1] and [x2].
        let out = pil_resize_box(&[10, 20, 90], 3, 1, 2, 1);
        assert_eq!(out, vec![15, 90]);
    }

    #[test]
    fn pixelate_averages_blocks() {
        // A constant image stays constant at every severity.
        let flat = vec![77u8; IMAGE_BYTES];
        for s in SEVERITIES {
            assert_eq!(pixelate(&flat, s), flat);
        }
        // Severity 4: 32 → 24 → 32. Columns alternate 0/200; scale 4/3 puts 1 or 2 source
        // columns in each small column, so every value is 0, 100 or 200 and the mean is kept.
        let img: Vec<u8> = (0..IMAGE_BYTES)
            .map(|k| if k % 2 == 0 { 0 } else { 200 })
            .collect();
        let out = pixelate(&img, 4);
        assert!(out.iter().all(|&v| v == 0 || v == 100 || v == 200));
        assert!(out.contains(&100));
        // Rows are unaffected (every row is the same), so all rows of a plane are equal.
        assert!(out[..PLANE].chunks(SIDE).all(|row| row == &out[..SIDE]));
    }

    #[test]
    fn jpeg_round_trip_keeps_a_flat_image_flat() {
        let mut img = vec![0u8; IMAGE_BYTES];
        img[..PLANE].fill(120);
        img[PLANE..2 * PLANE].fill(64);
        img[2 * PLANE..].fill(200);
        for s in SEVERITIES {
            let out = jpeg_compression(&img, s);
            for c in 0..3 {
                let plane = &out[c * PLANE..(c + 1) * PLANE];
                assert!(plane.iter().all(|&v| v == plane[0]), "severity {s}");
                assert!(
                    (plane[0] as i32 - img[c * PLANE] as i32).abs() <= 2,
                    "severity {s} channel {c}: {}",
                    plane[0]
                );
            }
        }
    }

    #[test]
    fn defocus_kernel_is_normalised_and_matches_the_disk() {
        for (r, a) in [(0.3, 0.4), (1.0, 0.2), (1.5, 0.1)] {
            let k = defocus_kernel(r, a);
            assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            // Symmetric about the centre.
            assert!((0..289).all(|i| (k[i] - k[288 - i]).abs() < 1e-15));
        }
        // Radius 0.3: a single tap blurred by the 3×3 Gaussian: centre = g₁², corner = g₀².
        let k = defocus_kernel(0.3, 0.4);
        let g = cv2_gaussian3(0.4);
        assert!((k[8 * 17 + 8] - g[1] * g[1]).abs() < 1e-15);
        assert!((k[7 * 17 + 7] - g[0] * g[0]).abs() < 1e-15);
        assert_eq!(k[6 * 17 + 8], 0.0);
        // Reflection without repeating the edge.
        assert_eq!(
            [-2, -1, 0, 31, 32, 33].map(|i| reflect101(i, 32)),
            [2, 1, 0, 31, 30, 29]
        );
    }

    #[test]
    #[should_panic(expected = "severity")]
    fn severity_out_of_range_panics() {
        contrast(&vec![0u8; IMAGE_BYTES], 6);
    }
}
