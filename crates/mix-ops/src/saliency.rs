//! OpenCV's `StaticSaliencyFineGrained` (Montabone & Ruiz 2010 centre-surround
//! saliency), the map SaliencyMix uses (spec §5.6), re-derived from the
//! algorithm's description for 8-bit images.
//!
//! Steps: gray conversion with OpenCV's 15-bit fixed-point BGR weights (3735,
//! 19235, 9798) applied to the channels as stored (the reference passes RGB, so
//! gray = 0.114·R + 0.587·G + 0.299·B), two 3×3 Gaussian blurs (`[1,2,1]/4` separable, reflect-101
//! border, rounded to 8 bit), an integral image, and for each of six surround
//! half-sizes `n` the mean of the clamped window `[p−n+1, p+n]` excluding the
//! centre pixel; on-response `max(centre − mean, 0)` and off-response
//! `max(mean − centre, 0)` truncated to 8 bit, summed over scales, each sum
//! rescaled to 0..255 by its own maximum, and combined as
//! `255·(on + off)/max(max_on, max_off)`.
//!
//! Where OpenCV's C++ relies on undefined behaviour we pick the x86 outcome:
//! a 0/0 rescale (an image with no contrast) yields 0, and a combined value
//! above 255 wraps modulo 256 (truncation to `int`, then to `u8`).

/// Surround half-sizes used by OpenCV: 3·4, 3·4·2, 3·4·4, 7·4, 7·4·2, 7·4·4.
pub const SCALES: [i64; 6] = [12, 24, 48, 28, 56, 112];

/// Fine-grained saliency of one 8-bit image given as three `h×w` planes
/// (channel-major, channel 0 first). Returns the row-major `h×w` 8-bit map.
///
/// # Panics
/// If `chw.len() != 3·h·w` or the image is smaller than 2×2.
pub fn fine_grained_saliency(chw: &[u8], h: usize, w: usize) -> Vec<u8> {
    assert_eq!(chw.len(), 3 * h * w, "saliency input must be 3×{h}×{w}");
    assert!(h >= 2 && w >= 2, "saliency needs an image of at least 2×2");
    let gray = blur3(&blur3(&to_gray(chw, h * w), h, w), h, w);
    let integral = integral_image(&gray, h, w);
    let mut sum_on = vec![0u16; h * w];
    let mut sum_off = vec![0u16; h * w];
    for &n in &SCALES {
        for r in 0..h {
            for c in 0..w {
                let centre = gray[r * w + c];
                let mean = surround_mean(&integral, h, w, r as i64, c as i64, n, centre);
                let on = centre as f32 - mean;
                let off = mean - centre as f32;
                sum_on[r * w + c] += if on > 0.0 { on as u8 as u16 } else { 0 };
                sum_off[r * w + c] += if off > 0.0 { off as u8 as u16 } else { 0 };
            }
        }
    }
    let on = rescale_to_u8(&sum_on);
    let off = rescale_to_u8(&sum_off);
    let max_val = on.iter().chain(off.iter()).copied().max().unwrap_or(0);
    on.iter()
        .zip(&off)
        .map(|(&a, &b)| {
            let v = 255.0 * (a as u32 + b as u32) as f32 as f64 / max_val as f32 as f64;
            wrap_to_u8(v)
        })
        .collect()
}

/// Index of the first maximum in row-major order (numpy `argmax`).
pub fn argmax_first(map: &[u8]) -> usize {
    let mut best = 0;
    for (i, &v) in map.iter().enumerate() {
        if v > map[best] {
            best = i;
        }
    }
    best
}

/// OpenCV's fixed-point gray weights for 8-bit input (`imgproc/src/color.hpp`,
/// `gray_shift = 15`): B, G, R = round(0.114, 0.587, 0.299 · 2^15); they sum to 2^15.
const GRAY_SHIFT: u32 = 15;
const GRAY_B: u32 = 3735;
const GRAY_G: u32 = 19235;
const GRAY_R: u32 = 9798;

/// OpenCV's 8-bit `BGR2GRAY`: `(B·3735 + G·19235 + R·9798 + 2^14) >> 15`. The reference
/// passes RGB data to this BGR conversion, so channel 0 (R as stored) gets the B weight and
/// channel 2 (B) the R weight.
fn to_gray(chw: &[u8], plane: usize) -> Vec<u8> {
    (0..plane)
        .map(|i| {
            let (c0, c1, c2) = (
                chw[i] as u32,
                chw[plane + i] as u32,
                chw[2 * plane + i] as u32,
            );
            ((c0 * GRAY_B + c1 * GRAY_G + c2 * GRAY_R + (1 << (GRAY_SHIFT - 1))) >> GRAY_SHIFT)
                as u8
        })
        .collect()
}

fn reflect101(i: i64, n: usize) -> usize {
    let n = n as i64;
    let i = if i < 0 { -i } else { i };
    (if i >= n { 2 * n - 2 - i } else { i }) as usize
}

/// 3×3 Gaussian (`[1,2,1]⊗[1,2,1]/16`), reflect-101 border, round half up:
/// OpenCV's bit-exact 8-bit path, whose intermediate row sums are exact.
fn blur3(img: &[u8], h: usize, w: usize) -> Vec<u8> {
    const K: [u32; 3] = [1, 2, 1];
    let mut out = vec![0u8; h * w];
    for r in 0..h {
        for c in 0..w {
            let mut s = 0u32;
            for (dr, kr) in K.iter().enumerate() {
                let rr = reflect101(r as i64 + dr as i64 - 1, h);
                for (dc, kc) in K.iter().enumerate() {
                    let cc = reflect101(c as i64 + dc as i64 - 1, w);
                    s += kr * kc * img[rr * w + cc] as u32;
                }
            }
            out[r * w + c] = ((s + 8) >> 4) as u8;
        }
    }
    out
}

/// `(h+1)×(w+1)` integral image: `I[r][c] = Σ img[..r, ..c]`.
fn integral_image(img: &[u8], h: usize, w: usize) -> Vec<i64> {
    let mut integral = vec![0i64; (h + 1) * (w + 1)];
    for r in 0..h {
        let mut row = 0i64;
        for c in 0..w {
            row += img[r * w + c] as i64;
            integral[(r + 1) * (w + 1) + c + 1] = integral[r * (w + 1) + c + 1] + row;
        }
    }
    integral
}

/// Mean of the window `[p−n+1, p+n+1)` in integral coordinates (clamped to
/// the image), excluding the centre pixel; computed in f32 as OpenCV does.
fn surround_mean(integral: &[i64], h: usize, w: usize, r: i64, c: i64, n: i64, centre: u8) -> f32 {
    let clamp_r = |v: i64| v.clamp(0, h as i64) as usize;
    let clamp_c = |v: i64| v.clamp(0, w as i64) as usize;
    let (r1, r2) = (clamp_r(r - n + 1), clamp_r(r + n + 1));
    let (c1, c2) = (clamp_c(c - n + 1), clamp_c(c + n + 1));
    let at = |rr: usize, cc: usize| integral[rr * (w + 1) + cc];
    let total = (at(r2, c2) + at(r1, c1) - at(r2, c1) - at(r1, c2)) as f32;
    let count = ((r2 - r1) * (c2 - c1)) as i64 - 1;
    (total - centre as f32) / count as f32
}

/// `255·v/max(v)` truncated to 8 bit; all zeros when the maximum is 0.
fn rescale_to_u8(sums: &[u16]) -> Vec<u8> {
    let max = sums.iter().copied().max().unwrap_or(0);
    sums.iter()
        .map(|&v| {
            if max == 0 {
                0
            } else {
                wrap_to_u8(255.0 * (v as f32 / max as f32) as f64)
            }
        })
        .collect()
}

/// Double → `u8` the way x86 C++ casts it: truncate to `int`, keep the low byte;
/// NaN (0/0) → 0.
fn wrap_to_u8(v: f64) -> u8 {
    if v.is_nan() {
        0
    } else {
        (v as i64 & 0xff) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb_from_gray(gray: &[u8]) -> Vec<u8> {
        gray.iter().chain(gray).chain(gray).copied().collect()
    }

    /// A lone pixel whose blurred mass stays below the smallest surround
    /// window (~168 px) never raises a window mean by a whole grey level, so
    /// only the pixel itself responds.
    #[test]
    fn single_bright_pixel_is_the_peak() {
        for &(r, c) in &[(10usize, 20usize), (0, 0), (31, 5), (17, 31)] {
            let mut img = vec![0u8; 32 * 32];
            img[r * 32 + c] = 128;
            let map = fine_grained_saliency(&rgb_from_gray(&img), 32, 32);
            assert_eq!(argmax_first(&map), r * 32 + c, "peak at ({r},{c})");
            assert_eq!(map[r * 32 + c], 255);
        }
    }

    #[test]
    fn single_dark_pixel_is_the_peak() {
        let mut img = vec![100u8; 32 * 32];
        img[7 * 32 + 9] = 0;
        let map = fine_grained_saliency(&rgb_from_gray(&img), 32, 32);
        assert_eq!(argmax_first(&map), 7 * 32 + 9);
    }

    /// On and off maps are each rescaled by their own maximum: a full-contrast
    /// spot lifts far-away means by one grey level, and that tiny off-response
    /// is stretched to 255 too (the algorithm's behaviour, kept as is).
    #[test]
    fn on_and_off_maps_are_normalized_separately() {
        let mut img = vec![0u8; 32 * 32];
        img[10 * 32 + 20] = 255;
        let map = fine_grained_saliency(&rgb_from_gray(&img), 32, 32);
        assert_eq!(map[10 * 32 + 20], 255);
        assert_eq!(map[24], 255);
        assert_eq!(argmax_first(&map), 24);
    }

    #[test]
    fn uniform_image_has_zero_map_and_argmax_at_origin() {
        let map = fine_grained_saliency(&rgb_from_gray(&[90u8; 32 * 32]), 32, 32);
        assert!(map.iter().all(|&v| v == 0));
        assert_eq!(argmax_first(&map), 0);
    }

    #[test]
    fn gray_uses_bgr_weights_on_stored_channels() {
        // Pure "red" in channel 0 gets the BLUE weight 0.114 (reference quirk).
        let gray = to_gray(&[255, 0, 0], 1);
        assert_eq!(gray, vec![29]); // round(255·0.114)
        assert_eq!(to_gray(&[0, 0, 255], 1), vec![76]); // round(255·0.299)
        assert_eq!(to_gray(&[255, 255, 255], 1), vec![255]);
    }

    /// Hand-computed with OpenCV's 15-bit weights, `(c0·3735 + c1·19235 + c2·9798 + 2^14) >> 15`,
    /// on pixels where the 14-bit weights `(c0·1868 + c1·9617 + c2·4899 + 2^13) >> 14` differ.
    #[test]
    fn gray_uses_opencv_15_bit_weights() {
        assert_eq!(GRAY_B + GRAY_G + GRAY_R, 1 << 15);
        let cases: [([u8; 3], u8); 3] = [
            // 250·3735 + 16384 = 950134 → 28.996 → 28 (14-bit: 475192 / 16384 = 29.003 → 29).
            // Channel 0 takes the B weight: (0, 0, 250) would give 75.
            ([250, 0, 0], 28),
            // 110·19235 + 70·9798 + 16384 = 2818094 → 86.001 → 86 (14-bit: 1408992 → 85.998 → 85).
            ([0, 110, 70], 86),
            // 85·19235 + 196·9798 + 16384 = 3571767 → 109.002 → 109 (14-bit: 1785841 → 108).
            ([0, 85, 196], 109),
        ];
        for (px, want) in cases {
            assert_eq!(to_gray(&px, 1), vec![want], "{px:?}");
        }
        assert_eq!(to_gray(&[0, 0, 250], 1), vec![75]);
        // Planar layout: two pixels, channel-major.
        assert_eq!(to_gray(&[250, 0, 0, 110, 0, 70], 2), vec![28, 86]);
    }

    #[test]
    fn blur_spreads_with_reflect101_and_rounding() {
        let mut img = vec![0u8; 16];
        img[5] = 160; // (1,1) in a 4×4
        let b = blur3(&img, 4, 4);
        assert_eq!(b[5], 40); // 160·4/16
        assert_eq!(b[6], 20); // 160·2/16
        assert_eq!(b[10], 10); // 160·1/16
        assert_eq!(b[4], 40); // column −1 mirrors column 1: 160·(2+2)/16
                              // Reflect-101: row −1 mirrors row 1, so (0, 1) sees the peak from both sides.
        let mut edge = vec![0u8; 16];
        edge[4] = 160; // (1,0)
        assert_eq!(blur3(&edge, 4, 4)[0], 40); // rows −1 and 1 both hold the peak: 2·(1·2)·160/16
    }

    #[test]
    fn integral_and_window_mean() {
        let img: Vec<u8> = (0..16).collect();
        let integral = integral_image(&img, 4, 4);
        assert_eq!(integral[4 * 5 + 4], (0..16).sum::<i64>());
        // A window covering the whole 4×4 image, minus the centre pixel (5).
        let mean = surround_mean(&integral, 4, 4, 1, 1, 12, 5);
        assert!((mean - (120.0 - 5.0) / 15.0).abs() < 1e-6);
    }
}
