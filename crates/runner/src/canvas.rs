//! A small RGB canvas for the preview grid: tiles, labels in an 8×8 bitmap font, PNG output.

use std::path::Path;

use anyhow::{Context, Result};
use font8x8::UnicodeFonts;

/// An RGB8 image.
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with one colour.
    pub fn new(width: usize, height: usize, fill: [u8; 3]) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&fill);
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    fn put(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let o = (y * self.width + x) * 3;
            self.pixels[o..o + 3].copy_from_slice(&rgb);
        }
    }

    /// Draws a CHW `u8` RGB image (`3×h×w`) at (x, y), each pixel as a `scale×scale` block.
    pub fn blit_chw(&mut self, chw: &[u8], h: usize, w: usize, x: usize, y: usize, scale: usize) {
        for r in 0..h * scale {
            for c in 0..w * scale {
                let (sr, sc) = (r / scale, c / scale);
                let i = sr * w + sc;
                self.put(x + c, y + r, [chw[i], chw[h * w + i], chw[2 * h * w + i]]);
            }
        }
    }

    /// Draws a single-channel map in [0, 1] (`h×w`) as gray at (x, y).
    pub fn blit_gray(&mut self, map: &[f32], h: usize, w: usize, x: usize, y: usize, scale: usize) {
        for r in 0..h * scale {
            for c in 0..w * scale {
                let v = (map[(r / scale) * w + c / scale].clamp(0.0, 1.0) * 255.0).round() as u8;
                self.put(x + c, y + r, [v, v, v]);
            }
        }
    }

    /// Draws a 1-pixel outline just outside the `w×h` area at (x, y), so that a tile as light
    /// as the background (an all-white mask) still shows its extent.
    pub fn frame(&mut self, x: usize, y: usize, w: usize, h: usize, rgb: [u8; 3]) {
        let (x0, y0) = (x.wrapping_sub(1), y.wrapping_sub(1));
        for c in 0..w + 2 {
            self.put(x0.wrapping_add(c), y0, rgb);
            self.put(x0.wrapping_add(c), y + h, rgb);
        }
        for r in 0..h + 2 {
            self.put(x0, y0.wrapping_add(r), rgb);
            self.put(x + w, y0.wrapping_add(r), rgb);
        }
    }

    /// The RGB value at (x, y) (tests).
    #[cfg(test)]
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let o = (y * self.width + x) * 3;
        [self.pixels[o], self.pixels[o + 1], self.pixels[o + 2]]
    }

    /// Writes ASCII text with its top-left corner at (x, y).
    pub fn text(&mut self, s: &str, x: usize, y: usize, rgb: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else {
                continue;
            };
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.put(x + k * 8 + col, y + row, rgb);
                    }
                }
            }
        }
    }

    /// Writes the image as a PNG file at `path` (callers put it in place: `output::OutputFile`).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        let mut buffered = std::io::BufWriter::new(file);
        let mut enc = png::Encoder::new(&mut buffered, self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.pixels)?;
        writer.finish()?;
        // Explicitly, so that a full disk is an error rather than a truncated image.
        std::io::Write::flush(&mut buffered)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_outlines_a_white_tile_on_a_white_canvas() {
        let mut c = Canvas::new(10, 10, [255, 255, 255]);
        c.blit_gray(&[1.0; 4], 2, 2, 3, 3, 2);
        c.frame(3, 3, 4, 4, [128, 128, 128]);
        assert_eq!(c.pixel(2, 2), [128, 128, 128]);
        assert_eq!(c.pixel(7, 7), [128, 128, 128]);
        assert_eq!(c.pixel(5, 2), [128, 128, 128]);
        assert_eq!(c.pixel(4, 4), [255, 255, 255], "inside stays the tile");
        assert_eq!(c.pixel(1, 1), [255, 255, 255], "nothing beyond the outline");
        // At the canvas edge the outline is clipped, not wrapped.
        c.frame(0, 0, 2, 2, [0, 0, 0]);
        assert_eq!(c.pixel(2, 0), [0, 0, 0]);
    }
}
