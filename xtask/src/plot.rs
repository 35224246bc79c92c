//! SVG charts drawn with `plotters`: per-run curves against integer epochs (one panel
//! per quantity, a marker on every point) and per-column comparisons of methods (ours
//! beside the published number). Text is written as SVG `<text>` elements, so it stays
//! crisp at any zoom, any Unicode (α, λ, †) renders, and no font files are needed.

use anyhow::{anyhow, Result};
use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(1-based epoch, value)` points, in epoch order.
    pub points: Vec<(u32, f64)>,
}

/// One panel of a per-run chart: a y quantity against epochs (with a legend when it
/// has several lines).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Axis label of the quantity, e.g. `test top-1 (%)`.
    pub y_label: String,
    /// Its lines; a panel without points says so instead of drawing axes.
    pub series: Vec<Series>,
}

/// One row of a comparison chart.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareRow {
    /// Method label (with α and marks).
    pub label: String,
    /// The reported value (median over seeds).
    pub ours: f64,
    /// Each seed's value, drawn small beside the median when there are several.
    pub seeds: Vec<f64>,
    /// The published number, if any.
    pub published: Option<f64>,
}

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 300;
const FONT: &str = "sans-serif";

/// Line colours, cycled when there are more series than colours (matplotlib's tab10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the SVG: {e:?}")
}

/// `[lo, hi]` padded by 5 % of the span (±0.5 for a single value), for an axis.
fn padded(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold(None, |acc: Option<(f64, f64)>, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })?;
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        (hi.abs() * 0.05).max(1e-3)
    };
    // A non-negative quantity (a learning rate) keeps a non-negative axis.
    let low = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    Some((low, hi + pad))
}

/// A chart of stacked panels sharing the x axis `epoch` (integer ticks), with `title`
/// on top; returns the SVG text.
pub fn epoch_panels(title: &str, panels: &[Panel]) -> Result<String> {
    let mut svg = String::new();
    let height = PANEL_HEIGHT * panels.len().max(1) as u32 + 40;
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, (FONT, 22).into_font()).map_err(err)?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            let points = || panel.series.iter().flat_map(|s| s.points.iter());
            let (Some((x_lo, x_hi)), Some((y_lo, y_hi))) = (
                points().map(|p| p.0).min().zip(points().map(|p| p.0).max()),
                padded(points().map(|p| p.1)),
            ) else {
                area.draw(&Text::new(
                    format!("{}: no data in the log", panel.y_label),
                    (60, 40),
                    (FONT, 16).into_font(),
                ))
                .map_err(err)?;
                continue;
            };
            let x_hi = x_hi.max(x_lo + 1);
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(panel.y_label.as_str())
                .x_labels(((x_hi - x_lo + 1) as usize).min(12))
                .x_label_formatter(&|e| format!("{e}"))
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(err)?;
            for (i, s) in panel.series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let marker = if s.points.len() <= 60 { 3 } else { 2 };
                chart
                    .draw_series(
                        LineSeries::new(s.points.iter().copied(), color.stroke_width(2))
                            .point_size(marker),
                    )
                    .map_err(err)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            // One line needs no legend: the axis label names it.
            if panel.series.len() > 1 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .label_font((FONT, 14))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK.mix(0.3))
                    .draw()
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A dot chart of methods (one row each, top to bottom): our value (filled circle; each
/// seed as a small ring when there are several) and the published one (cross), on a
/// shared `x_label` axis; returns the SVG text.
pub fn comparison(title: &str, x_label: &str, rows: &[CompareRow]) -> Result<String> {
    let mut svg = String::new();
    let n = rows.len().max(1);
    // Two rows' height of free space above the first row holds the legend.
    let height = 150 + 34 * (n as u32 + 2);
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let values = rows.iter().flat_map(|r| {
            std::iter::once(r.ours)
                .chain(r.seeds.iter().copied())
                .chain(r.published)
        });
        let (x_lo, x_hi) = padded(values).unwrap_or((0.0, 100.0));
        // Row i is drawn at y = 10 (n − 1 − i), so the first row is on top; tenths of a
        // row keep the axis integer (labelled only at the rows) with half-row margins.
        let y_of = |i: usize| 10 * (n - 1 - i) as i32;
        let keys: Vec<i32> = (0..n).map(y_of).collect();
        let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(190)
            .build_cartesian_2d(x_lo..x_hi, (-6..10 * n as i32 + 16).with_key_points(keys))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_label_formatter(&|y| {
                let i = n as i64 - 1 - (*y as i64 + 5).div_euclid(10);
                usize::try_from(i)
                    .ok()
                    .and_then(|i| labels.get(i).cloned())
                    .unwrap_or_default()
            })
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        let ours_color = PALETTE[0];
        let pub_color = PALETTE[3];
        let several = rows.iter().any(|r| r.seeds.len() > 1);
        if several {
            chart
                .draw_series(rows.iter().enumerate().flat_map(|(i, r)| {
                    let y = y_of(i);
                    r.seeds
                        .iter()
                        .filter(move |_| r.seeds.len() > 1)
                        .map(move |&v| Circle::new((v, y), 3, ours_color.stroke_width(1)))
                }))
                .map_err(err)?
                .label("ours, each seed")
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, ours_color.stroke_width(1)));
        }
        chart
            .draw_series(
                rows.iter()
                    .enumerate()
                    .map(|(i, r)| Circle::new((r.ours, y_of(i)), 6, ours_color.filled())),
            )
            .map_err(err)?
            .label(if several {
                "ours (median over seeds)"
            } else {
                "ours"
            })
            .legend(move |(x, y)| Circle::new((x + 10, y), 6, ours_color.filled()));
        chart
            .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
                r.published
                    .map(|p| Cross::new((p, y_of(i)), 7, pub_color.stroke_width(3)))
            }))
            .map_err(err)?
            .label("published")
            .legend(move |(x, y)| Cross::new((x + 10, y), 7, pub_color.stroke_width(3)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_write_svg_text_with_labels_and_integer_epochs() {
        let svg = epoch_panels(
            "MixUp α=1, λ ~ Beta(α, α)",
            &[
                Panel {
                    y_label: "test top-1 (%)".into(),
                    series: vec![Series {
                        label: "head0".into(),
                        points: vec![(1, 50.0), (2, 60.5), (3, 70.25)],
                    }],
                },
                Panel {
                    y_label: "train loss".into(),
                    series: vec![],
                },
            ],
        )
        .unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for text in ["α=1", "λ", "test top-1 (%)", "epoch", "train loss: no data"] {
            assert!(svg.contains(text), "no {text}");
        }
        assert!(!svg.contains(">1.5<"), "epoch ticks are integers");
        assert!(svg.contains("<circle"), "markers on the points");
    }

    #[test]
    fn comparison_names_every_method_and_the_published_numbers() {
        let rows = [
            CompareRow {
                label: "MixUp (α=1)".into(),
                ours: 96.2,
                seeds: vec![96.0, 96.2, 96.6],
                published: Some(96.62),
            },
            CompareRow {
                label: "CutMix <&> †1".into(),
                ours: 95.0,
                seeds: vec![95.0],
                published: None,
            },
        ];
        let svg = comparison("R-18, 800 epochs", "test top-1 (%)", &rows).unwrap();
        for text in [
            "MixUp (α=1)",
            "CutMix &lt;&amp;&gt; †1",
            "published",
            "ours (median over seeds)",
            "test top-1 (%)",
        ] {
            assert!(svg.contains(text), "no {text} in {svg}");
        }
    }
}
