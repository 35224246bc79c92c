//! The benchmark's method table (spec §5.14) and its published results (spec §7).

use anyhow::{bail, Context, Result};
use bench_config::{Arch, HeadLoss};

/// A backbone of the benchmark, with the short tag used in file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backbone {
    /// CIFAR ResNet-18 (`r18`).
    R18,
    /// CIFAR ResNeXt-50 32x4d (`rx50`).
    Rx50,
}

impl Backbone {
    /// Both backbones, in table order.
    pub const ALL: [Backbone; 2] = [Backbone::R18, Backbone::Rx50];

    /// File-name tag, as the upstream config prefixes (`r18`, `rx50`).
    pub fn tag(self) -> &'static str {
        match self {
            Backbone::R18 => "r18",
            Backbone::Rx50 => "rx50",
        }
    }

    /// Name used in the published tables and their CSV.
    pub fn published_name(self) -> &'static str {
        match self {
            Backbone::R18 => "ResNet-18",
            Backbone::Rx50 => "ResNeXt-50-32x4d",
        }
    }

    /// The config schema's architecture.
    pub fn arch(self) -> Arch {
        match self {
            Backbone::R18 => Arch::Resnet18,
            Backbone::Rx50 => Arch::Resnext50,
        }
    }

    /// Parses `r18` / `rx50` (also the architecture names `resnet18` / `resnext50`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "r18" | "resnet18" => Ok(Backbone::R18),
            "rx50" | "resnext50" => Ok(Backbone::Rx50),
            _ => bail!("unknown backbone `{s}` (expected r18 or rx50)"),
        }
    }
}

/// One row of the benchmark table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Method {
    /// `mix_mode` value in the config.
    pub mode: &'static str,
    /// Row label of the published table.
    pub display: &'static str,
    /// α of the table for ResNet-18.
    pub alpha_r18: f64,
    /// α of the table for ResNeXt-50.
    pub alpha_rx50: f64,
    /// Head loss that produced the published row.
    pub loss: HeadLoss,
    /// Trained by the `AutoMixup` model (own MixBlock, `min_lr` 0.05) rather than `MixUpClassification`.
    pub learned: bool,
    /// α is not used by the method (the table shows "–").
    pub alpha_unused: bool,
}

const fn row(mode: &'static str, display: &'static str, a18: f64, a50: f64) -> Method {
    Method {
        mode,
        display,
        alpha_r18: a18,
        alpha_rx50: a50,
        loss: HeadLoss::CeNone,
        learned: false,
        alpha_unused: false,
    }
}

/// The 13 rows of the README table (spec §5.14), in table order. Vanilla's α is
/// the schema default 1, which the method never reads.
pub const METHODS: [Method; 13] = [
    Method {
        alpha_unused: true,
        ..row("vanilla", "Vanilla", 1.0, 1.0)
    },
    row("mixup", "MixUp", 1.0, 1.0),
    row("cutmix", "CutMix", 0.2, 0.2),
    row("manifoldmix", "ManifoldMix", 2.0, 2.0),
    row("smoothmix", "SmoothMix", 0.5, 0.2),
    row("saliencymix", "SaliencyMix", 0.2, 0.2),
    row("attentivemix", "AttentiveMix+", 2.0, 2.0),
    row("fmix", "FMix*", 0.2, 0.2),
    Method {
        loss: HeadLoss::CeSoft,
        ..row("puzzlemix", "PuzzleMix", 1.0, 1.0)
    },
    row("gridmix", "GridMix", 0.2, 0.2),
    row("resizemix", "ResizeMix*", 1.0, 1.0),
    Method {
        learned: true,
        ..row("automix", "AutoMix", 2.0, 2.0)
    },
    Method {
        learned: true,
        ..row("samix", "SAMix*", 2.0, 2.0)
    },
];

/// The method of a mode name, if it is one of the table's.
pub fn method(mode: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.mode == mode)
}

/// Position of a mode in the table (unknown modes sort last).
pub fn table_index(mode: &str) -> usize {
    METHODS
        .iter()
        .position(|m| m.mode == mode)
        .unwrap_or(METHODS.len())
}

impl Method {
    /// The table's α for a backbone.
    pub fn alpha(&self, backbone: Backbone) -> f64 {
        match backbone {
            Backbone::R18 => self.alpha_r18,
            Backbone::Rx50 => self.alpha_rx50,
        }
    }
}

/// Config-file spelling of a loss (`CE_none`, `CE_soft`, `CE_sigm`).
pub fn loss_name(loss: HeadLoss) -> &'static str {
    match loss {
        HeadLoss::CeNone => "CE_none",
        HeadLoss::CeSoft => "CE_soft",
        HeadLoss::CeSigm => "CE_sigm",
    }
}

/// Parses `CE_none` / `CE_soft` / `CE_sigm`.
pub fn parse_loss(s: &str) -> Result<HeadLoss> {
    match s {
        "CE_none" => Ok(HeadLoss::CeNone),
        "CE_soft" => Ok(HeadLoss::CeSoft),
        "CE_sigm" => Ok(HeadLoss::CeSigm),
        _ => bail!("unknown loss `{s}` (expected CE_none, CE_soft or CE_sigm)"),
    }
}

/// Formats a number as Python's `str()` does for the values of the table
/// (`1`, `0.2`, `0.5`): integers without a fractional part.
pub fn py_number(v: f64) -> String {
    format!("{v}")
}

/// The published results, spec §7.4, verbatim (long format).
pub const PUBLISHED_CSV: &str = include_str!("published.csv");

/// One published number.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// `ResNet-18` or `ResNeXt-50-32x4d`.
    pub backbone: Backbone,
    /// Row label (`MixUp`, `FMix*`, …).
    pub method: String,
    /// Mode name.
    pub mix_mode: String,
    /// α of the row; `None` for "–".
    pub alpha: Option<f64>,
    /// Training epochs.
    pub epochs: usize,
    /// Median top-1 in percent.
    pub top1_median: f64,
}

/// Parses [`PUBLISHED_CSV`].
pub fn published() -> Result<Vec<Published>> {
    let mut lines = PUBLISHED_CSV.lines();
    let header = lines.next().context("published CSV: empty")?;
    if header != "backbone,method,mix_mode,alpha,epochs,top1_median" {
        bail!("published CSV: unexpected header `{header}`");
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').collect();
            let ctx = || format!("published CSV line {}: `{line}`", i + 2);
            if f.len() != 6 {
                bail!("{}: expected 6 fields", ctx());
            }
            let backbone = match f[0] {
                "ResNet-18" => Backbone::R18,
                "ResNeXt-50-32x4d" => Backbone::Rx50,
                b => bail!("{}: unknown backbone `{b}`", ctx()),
            };
            Ok(Published {
                backbone,
                method: f[1].to_string(),
                mix_mode: f[2].to_string(),
                alpha: if f[3] == "-" {
                    None
                } else {
                    Some(f[3].parse().with_context(ctx)?)
                },
                epochs: f[4].parse().with_context(ctx)?,
                top1_median: f[5].parse().with_context(ctx)?,
            })
        })
        .collect()
}

/// The published number for a cell, if the table has one.
pub fn published_value<'a>(
    table: &'a [Published],
    backbone: Backbone,
    mode: &str,
    epochs: usize,
) -> Option<&'a Published> {
    table
        .iter()
        .find(|p| p.backbone == backbone && p.mix_mode == mode && p.epochs == epochs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_csv_covers_the_table_with_its_alphas() {
        let table = published().unwrap();
        assert_eq!(table.len(), 2 * 13 * 4);
        for p in &table {
            let m = method(&p.mix_mode).expect("known mode");
            assert_eq!(m.display, p.method);
            match p.alpha {
                None => assert!(m.alpha_unused),
                Some(a) => assert_eq!(a, m.alpha(p.backbone), "{p:?}"),
            }
        }
        let v = published_value(&table, Backbone::Rx50, "samix", 800).unwrap();
        assert_eq!(v.top1_median, 97.93);
        let v = published_value(&table, Backbone::R18, "vanilla", 200).unwrap();
        assert_eq!(v.top1_median, 94.87);
    }

    #[test]
    fn numbers_print_like_python() {
        assert_eq!(py_number(1.0), "1");
        assert_eq!(py_number(0.2), "0.2");
        assert_eq!(py_number(2.0), "2");
    }
}
