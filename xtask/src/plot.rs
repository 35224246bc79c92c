//! SVG charts drawn with `plotters`: per-run curves against integer epochs (one panel
//! per quantity, a marker on every point), per-column learning curves of every method
//! (seeds as a mean with a min–max band), and per-column comparisons of methods (ours,
//! with the range over seeds, beside the published number). Text is written as SVG
//! `<text>` elements, so it stays crisp at any zoom, any Unicode (α, λ, †) renders, and no
//! font files are needed.

use anyhow::{anyhow, Result};
use plotters::coord::combinators::BindKeyPoints;
use plotters::coord::Shift;
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

/// One line of a [`band_curves`] chart: a method's curve over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct BandSeries {
    /// Legend text.
    pub label: String,
    /// `(1-based epoch, mean, min, max)` over the seeds, in epoch order; a band is drawn
    /// where min < max.
    pub points: Vec<(u32, f64, f64, f64)>,
}

const WIDTH: u32 = 900;
/// Colour of the note under a per-run chart's title (its status).
const NOTE_COLOR: RGBColor = RGBColor(178, 34, 34);
/// Characters per line of that note (16 px text in a 900 px chart).
const NOTE_LINE_CHARS: usize = 100;
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

/// `text` broken at spaces into lines of at most [`NOTE_LINE_CHARS`] characters (a longer
/// word stays whole), at most `max_lines` of them, the last ending in `…` when cut.
fn wrap(text: &str, max_lines: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= NOTE_LINE_CHARS => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(l) = lines.last_mut() {
            l.push_str(" …");
        }
    }
    lines
}

/// A chart of stacked panels sharing the x axis `epoch` (integer ticks), with `title` on
/// top and `note` (the run's status, e.g. `interrupted at epoch 15 of 30`) under it in
/// red; returns the SVG text. A panel without points says so; when no panel has any, the
/// chart is the title, the note and a line saying there is nothing to plot, not empty
/// panels.
pub fn epoch_panels(title: &str, note: Option<&str>, panels: &[Panel]) -> Result<String> {
    let mut svg = String::new();
    let note_lines = note.map(|n| wrap(n, 3)).unwrap_or_default();
    let note_height = 22 * note_lines.len() as u32;
    let empty = panels
        .iter()
        .all(|p| p.series.iter().all(|s| s.points.is_empty()));
    let body = if empty {
        60
    } else {
        PANEL_HEIGHT * panels.len().max(1) as u32
    };
    let height = body + note_height + 40;
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw_panels(&root, title, &note_lines, empty, panels)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The drawing of [`epoch_panels`] on `root`.
fn draw_panels(
    root: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    note_lines: &[String],
    empty: bool,
    panels: &[Panel],
) -> Result<()> {
    let note_height = 22 * note_lines.len() as u32;
    let root = root.titled(title, (FONT, 22).into_font()).map_err(err)?;
    let (note_area, root) = root.split_vertically(note_height);
    let note_style = (FONT, 16).into_font().color(&NOTE_COLOR);
    for (i, line) in note_lines.iter().enumerate() {
        note_area
            .draw(&Text::new(
                line.clone(),
                (20, 22 * i as i32),
                note_style.clone(),
            ))
            .map_err(err)?;
    }
    if empty {
        root.draw(&Text::new(
            "nothing to plot: the log has no evaluation and no train line",
            (20, 20),
            (FONT, 16).into_font(),
        ))
        .map_err(err)?;
        return Ok(());
    }
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
        let x_hi = x_hi.max(x_lo.saturating_add(1));
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
            .x_labels(((x_hi - x_lo) as usize).saturating_add(1).min(12))
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
    Ok(())
}

/// One chart of several learning curves against integer epochs (`x` = epoch, `y_label`
/// the quantity): each series' mean as a line (marker on every point) with its min–max
/// band (a `<polygon>`, where min < max), a legend naming each; returns the SVG text.
pub fn band_curves(title: &str, y_label: &str, series: &[BandSeries]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 2 * PANEL_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw_band_curves(&root, title, y_label, series)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The drawing of [`band_curves`] on `root`.
fn draw_band_curves(
    root: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    y_label: &str,
    series: &[BandSeries],
) -> Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let (Some((x_lo, x_hi)), Some((y_lo, y_hi))) = (
        points().map(|p| p.0).min().zip(points().map(|p| p.0).max()),
        padded(points().flat_map(|p| [p.1, p.2, p.3])),
    ) else {
        let root = root.titled(title, (FONT, 20).into_font()).map_err(err)?;
        root.draw(&Text::new(
            "no evaluation in the log",
            (20, 20),
            (FONT, 16).into_font(),
        ))
        .map_err(err)?;
        return Ok(());
    };
    let x_hi = x_hi.max(x_lo.saturating_add(1));
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_label)
        .x_labels(((x_hi - x_lo) as usize).saturating_add(1).min(12))
        .x_label_formatter(&|e| format!("{e}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        if s.points.iter().any(|p| p.2 < p.3) {
            let band: Vec<(u32, f64)> = s
                .points
                .iter()
                .map(|p| (p.0, p.3))
                .chain(s.points.iter().rev().map(|p| (p.0, p.2)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(band, color.mix(0.2).filled())))
                .map_err(err)?;
        }
        let marker = if s.points.len() <= 60 { 3 } else { 2 };
        chart
            .draw_series(
                LineSeries::new(s.points.iter().map(|p| (p.0, p.1)), color.stroke_width(2))
                    .point_size(marker),
            )
            .map_err(err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// A dot chart of methods (one row each, top to bottom): our value (filled circle; each
/// seed as a small ring and the min–max range over the seeds as an error bar when there
/// are several) and the published one (cross, in the legend only when some row has one),
/// on a shared `x_label` axis; returns the SVG text.
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
            // Each row's range over its seeds: a bar with end caps.
            let bar_style = ours_color.stroke_width(2);
            chart
                .draw_series(
                    rows.iter()
                        .enumerate()
                        .filter(|(_, r)| r.seeds.len() > 1)
                        .flat_map(|(i, r)| {
                            let y = y_of(i);
                            let lo = r.seeds.iter().copied().fold(f64::INFINITY, f64::min);
                            let hi = r.seeds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                            [
                                vec![(lo, y), (hi, y)],
                                vec![(lo, y - 2), (lo, y + 2)],
                                vec![(hi, y - 2), (hi, y + 2)],
                            ]
                            .map(|points| PathElement::new(points, bar_style))
                        }),
                )
                .map_err(err)?
                .label("ours, min–max over seeds")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], ours_color.stroke_width(2))
                });
        }
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
        let published = chart
            .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
                r.published
                    .map(|p| Cross::new((p, y_of(i)), 7, pub_color.stroke_width(3)))
            }))
            .map_err(err)?;
        if rows.iter().any(|r| r.published.is_some()) {
            published
                .label("published")
                .legend(move |(x, y)| Cross::new((x + 10, y), 7, pub_color.stroke_width(3)));
        }
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
            None,
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
            "ours, min–max over seeds",
            "test top-1 (%)",
        ] {
            assert!(svg.contains(text), "no {text} in {svg}");
        }
        // The one row with several seeds gets a bar and two caps; the legend one sample.
        let ours_stroke = r##"stroke="#1F77B4" stroke-width="2""##;
        let bars: Vec<&str> = svg
            .split("<polyline")
            .skip(1)
            .map(|e| e.split('>').next().unwrap())
            .filter(|e| e.contains(ours_stroke))
            .collect();
        assert_eq!(bars.len(), 3 + 1, "{svg}");
        // The bar runs from the lowest seed's ring (96.0) to the highest's (96.6).
        let points = bars[0].split("points=\"").nth(1).unwrap();
        let bar_x: Vec<i64> = points
            .split('"')
            .next()
            .unwrap()
            .split_whitespace()
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        let rings: Vec<i64> = svg
            .split("<circle")
            .skip(1)
            .map(|e| e.split('>').next().unwrap())
            .filter(|e| e.contains(r##"r="3""##) && e.contains(r##"fill="none""##))
            .map(|e| {
                let cx = e.split("cx=\"").nth(1).unwrap();
                cx.split('"').next().unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(rings.len(), 3 + 1, "three seeds and the legend's: {svg}");
        let (lo, hi) = (
            rings[..3].iter().min().unwrap(),
            rings[..3].iter().max().unwrap(),
        );
        assert_eq!(bar_x, [*lo, *hi], "{svg}");

        // Nothing published: no cross, no "published" legend entry; one seed each: no bars.
        let unpublished: Vec<CompareRow> = rows
            .iter()
            .map(|r| CompareRow {
                published: None,
                seeds: vec![r.ours],
                ..r.clone()
            })
            .collect();
        let svg = comparison("R-18, 30 epochs", "test top-1 (%)", &unpublished).unwrap();
        assert!(!svg.contains("published"), "{svg}");
        assert!(!svg.contains("min–max"), "{svg}");
        assert!(svg.contains("\nours\n"), "{svg}");
    }

    #[test]
    fn band_curves_draw_one_line_per_method_and_a_band_for_several_seeds() {
        let series = [
            BandSeries {
                label: "MixUp (α=1): mean of 3 seeds".into(),
                points: vec![
                    (1, 50.0, 48.0, 52.0),
                    (2, 60.0, 59.0, 61.5),
                    (3, 70.0, 69.0, 71.0),
                ],
            },
            BandSeries {
                label: "CutMix (α=0.2)".into(),
                points: vec![(1, 45.0, 45.0, 45.0), (2, 55.0, 55.0, 55.0)],
            },
        ];
        let svg = band_curves("R-18, 3 epochs", "test top-1 (%)", &series).unwrap();
        for text in [
            "MixUp (α=1): mean of 3 seeds",
            "CutMix (α=0.2)",
            "epoch",
            "test top-1 (%)",
        ] {
            assert!(svg.contains(text), "no {text} in {svg}");
        }
        assert_eq!(svg.matches("<polygon").count(), 1, "one band: {svg}");
        // Each line drawn in its colour (plus its legend sample).
        for color in ["#1F77B4", "#FF7F0E"] {
            let lines = svg
                .split("<polyline")
                .skip(1)
                .filter(|e| e.split('>').next().unwrap().contains(color))
                .count();
            assert_eq!(lines, 2, "{color}: {svg}");
        }
        assert_eq!(svg.matches("<circle").count(), 5, "a marker per point");
        let none = band_curves("R-18, 3 epochs", "test top-1 (%)", &[]).unwrap();
        assert!(none.contains("no evaluation in the log"), "{none}");
    }

    #[test]
    fn a_note_goes_under_the_title_and_nothing_logged_is_said_not_drawn_empty() {
        let top1 = Panel {
            y_label: "test top-1 (%)".into(),
            series: vec![Series {
                label: "head0".into(),
                points: vec![(1, 50.0), (2, 60.0)],
            }],
        };
        let empty = |y: &str| Panel {
            y_label: y.into(),
            series: vec![],
        };
        let svg = epoch_panels(
            "run",
            Some("interrupted at epoch 2 of 30 (or still running)"),
            &[top1, empty("train loss")],
        )
        .unwrap();
        assert!(svg.contains("interrupted at epoch 2 of 30"), "{svg}");
        assert!(svg.contains("train loss: no data in the log"), "{svg}");

        let svg = epoch_panels(
            "run",
            Some("no evaluation logged yet (0 of 30 epochs)"),
            &[
                empty("test top-1 (%)"),
                empty("train loss"),
                empty("learning rate"),
            ],
        )
        .unwrap();
        assert!(svg.contains("no evaluation logged yet"), "{svg}");
        assert!(svg.contains("nothing to plot"), "{svg}");
        assert!(
            !svg.contains("no data in the log"),
            "no empty panels: {svg}"
        );
        assert!(!svg.contains("epoch<"), "no axes: {svg}");

        // A long note is wrapped, at most three lines, the last cut with "…".
        let long = "word ".repeat(100);
        let lines = wrap(&long, 3);
        assert_eq!(lines.len(), 3);
        assert!(lines
            .iter()
            .all(|l| l.chars().count() <= NOTE_LINE_CHARS + 2));
        assert!(lines[2].ends_with(" …"));
    }
}
