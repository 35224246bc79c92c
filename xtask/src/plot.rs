//! Minimal line plots into an RGB buffer, encoded as PNG: axes, tick labels, one
//! coloured line per series and a legend, drawn with a built-in 5×7 pixel font.

use anyhow::{Context, Result};

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
}

const WIDTH: usize = 920;
const HEIGHT: usize = 500;
const PLOT_LEFT: usize = 60;
const PLOT_RIGHT: usize = 700;
const PLOT_TOP: usize = 30;
const PLOT_BOTTOM: usize = 455;
/// The y axis shows at most this many percentage points below the best value, so the
/// interesting end of a 40 → 97 % training curve is not squashed.
const MAX_Y_SPAN: f64 = 20.0;

/// Colours for series, cycled when there are more series than colours.
const PALETTE: [[u8; 3]; 14] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [0, 0, 128],
    [128, 0, 0],
    [0, 100, 0],
    [0, 0, 0],
];

struct Canvas {
    rgb: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            rgb: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < WIDTH && (y as usize) < HEIGHT {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    /// A 2-pixel-wide segment, clipped to the plot area.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=steps {
            let x = x0 + (x1 - x0) * s / steps;
            let y = y0 + (y1 - y0) * s / steps;
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                let (px, py) = (x + dx, y + dy);
                if px >= PLOT_LEFT as i64
                    && px <= PLOT_RIGHT as i64
                    && py >= PLOT_TOP as i64
                    && py <= PLOT_BOTTOM as i64
                {
                    self.set(px, py, c);
                }
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.set(x + i as i64 * 6 + col, y + r as i64, c);
                    }
                }
            }
        }
    }
}

/// Pixel width of a text drawn by [`Canvas::text`].
fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * 6
}

/// A tick step from 1-2-5 × 10^k giving at most `max_ticks` ticks over `span`.
fn tick_step(span: f64, max_ticks: f64) -> f64 {
    let mut mag = 10f64.powf((span / max_ticks).log10().floor());
    loop {
        for m in [1.0, 2.0, 5.0] {
            if span / (m * mag) <= max_ticks {
                return m * mag;
            }
        }
        mag *= 10.0;
    }
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Draws the series as lines over a shared x/y range and returns the PNG bytes.
pub fn line_plot(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<Vec<u8>> {
    let mut canvas = Canvas::new();
    let black = [0, 0, 0];
    let grey = [225, 225, 225];
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 100.0);
    }
    let y_hi = y_max.ceil().max(y_min.floor() + 1.0);
    let y_lo = y_min.max(y_max - MAX_Y_SPAN).floor();
    let x_lo = 0.0;
    let (w, h) = (
        (PLOT_RIGHT - PLOT_LEFT) as f64,
        (PLOT_BOTTOM - PLOT_TOP) as f64,
    );
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        let px = PLOT_LEFT as f64 + (x - x_lo) / (x_max - x_lo) * w;
        let py = PLOT_BOTTOM as f64 - (y.clamp(y_lo - 1.0, y_hi) - y_lo) / (y_hi - y_lo) * h;
        (px.round() as i64, py.round() as i64)
    };

    let y_step = tick_step(y_hi - y_lo, 10.0);
    let mut v = (y_lo / y_step).ceil() * y_step;
    while v <= y_hi + 1e-9 {
        let (_, py) = to_px(x_lo, v);
        canvas.rect(PLOT_LEFT as i64, py, PLOT_RIGHT as i64, py, grey);
        let label = tick_label(v, y_step);
        canvas.text(
            PLOT_LEFT as i64 - 6 - text_width(&label),
            py - 3,
            &label,
            black,
        );
        v += y_step;
    }
    let x_step = tick_step(x_max - x_lo, 10.0);
    let mut v = x_lo;
    while v <= x_max + 1e-9 {
        let (px, _) = to_px(v, y_lo);
        canvas.rect(px, PLOT_BOTTOM as i64, px, PLOT_BOTTOM as i64 + 4, black);
        let label = tick_label(v, x_step);
        canvas.text(
            px - text_width(&label) / 2,
            PLOT_BOTTOM as i64 + 8,
            &label,
            black,
        );
        v += x_step;
    }
    let (l, r, t, b) = (
        PLOT_LEFT as i64,
        PLOT_RIGHT as i64,
        PLOT_TOP as i64,
        PLOT_BOTTOM as i64,
    );
    canvas.rect(l, t, l, b, black);
    canvas.rect(l, b, r, b, black);
    canvas.rect(r, t, r, b, black);
    canvas.rect(l, t, r, t, black);
    canvas.text(l, 10, title, black);
    canvas.text(
        (l + r) / 2 - text_width(x_label) / 2,
        b + 24,
        x_label,
        black,
    );
    canvas.text(4, t - 14, y_label, black);

    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let px: Vec<(i64, i64)> = s.points.iter().map(|&(x, y)| to_px(x, y)).collect();
        if px.len() == 1 {
            canvas.rect(px[0].0 - 1, px[0].1 - 1, px[0].0 + 1, px[0].1 + 1, c);
        }
        for pair in px.windows(2) {
            canvas.line(pair[0], pair[1], c);
        }
        let ly = t + 4 + i as i64 * 14;
        canvas.rect(r + 12, ly, r + 26, ly + 6, c);
        canvas.text(r + 32, ly, &s.label, black);
    }

    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, WIDTH as u32, HEIGHT as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("PNG header")?;
        writer.write_image_data(&canvas.rgb).context("PNG data")?;
    }
    Ok(bytes)
}

/// 5×7 glyph rows (bit 4 = leftmost pixel); lowercase letters are drawn as capitals
/// and characters without a glyph as a small box.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' | '–' | '−' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '*' => [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        'Α'..='ω' => [0x00, 0x00, 0x0D, 0x12, 0x12, 0x12, 0x0D],
        ' ' => [0; 7],
        _ => [0x00, 0x1F, 0x11, 0x11, 0x11, 0x1F, 0x00],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_decodes_with_the_expected_size_and_coloured_pixels() {
        let s = vec![
            Series {
                label: "mixup".into(),
                points: (1..=50)
                    .map(|e| (e as f64, 80.0 + e as f64 * 0.3))
                    .collect(),
            },
            Series {
                label: "cutmix".into(),
                points: vec![(10.0, 90.0)],
            },
        ];
        let bytes = line_plot("t", "epoch", "top-1 %", &s).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH as u32, HEIGHT as u32));
        let has = |c: [u8; 3]| buf.chunks(3).any(|p| p == c);
        assert!(has(PALETTE[0]) && has(PALETTE[1]));
    }

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(800.0, 10.0), 100.0);
        assert_eq!(tick_step(20.0, 10.0), 2.0);
        assert_eq!(tick_step(3.0, 10.0), 0.5);
    }
}
