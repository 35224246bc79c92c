//! `report`: reads the JSONL logs of finished or running runs and writes the
//! benchmark table (methods × epochs, spec §3.3 metric) as Markdown and CSV, plus
//! accuracy-curve plots.
//!
//! Log format (spec §8.3): the first line is a meta object whose `config` holds the
//! run's config (JSON text or object); every `{"mode": "val", "epoch": e, …}` line
//! holds the test accuracies of 1-based epoch `e`, one `<head>_top1` key per
//! evaluated head (`head0_top1`, or AutoMix's `acc_{mix,one}_{k,q}_top1`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::methods::{method, published, published_value, table_index, Backbone, Published};
use crate::plot::{line_plot, Series};

/// One run: its config fields that place it in the table, and its evaluations.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The work directory (the log files' folder).
    pub dir: PathBuf,
    /// Config `name`.
    pub name: String,
    /// Config `model.backbone.arch`.
    pub backbone: Backbone,
    /// Config `model.mix_mode` as a list.
    pub modes: Vec<String>,
    /// Config `model.alpha` as a list.
    pub alphas: Vec<f64>,
    /// Config `model.head.loss` (`CE_none` when absent).
    pub loss: String,
    /// Config `max_epochs`.
    pub max_epochs: usize,
    /// Config `evaluation.median_window` (10 when absent).
    pub median_window: usize,
    /// 1-based epoch → head name (key without `_top1`) → top-1 %.
    pub val: BTreeMap<usize, BTreeMap<String, f64>>,
}

/// The reported numbers of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Last evaluated epoch.
    pub last_epoch: usize,
    /// `last_epoch ≥ max_epochs`.
    pub finished: bool,
    /// Head whose median is reported (the best one, spec §5.12.7).
    pub head: String,
    /// Median over epochs `end−w..end` (`end` = `max_epochs`, or the last epoch if unfinished).
    pub median: f64,
    /// Median over epochs `end−w+1..end` (README wording: "last 10 epochs"), best head.
    pub median_last_w: f64,
    /// Evaluations inside the `end−w..end` window.
    pub n_values: usize,
}

/// `numpy.median`: the middle value, or the mean of the two middle values.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Run {
    /// Best-head median over epochs `from..=to`, with the head's name.
    fn best_head_median(&self, from: usize, to: usize) -> Option<(String, f64, usize)> {
        let mut per_head: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (_, heads) in self.val.range(from..=to) {
            for (h, v) in heads {
                per_head.entry(h).or_default().push(*v);
            }
        }
        let mut best: Option<(String, f64, usize)> = None;
        for (h, vals) in per_head {
            let m = median(&vals).expect("non-empty");
            if best.as_ref().is_none_or(|b| m > b.1) {
                best = Some((h.to_string(), m, vals.len()));
            }
        }
        best
    }

    /// The run's reported numbers; `None` before its first evaluation.
    pub fn summary(&self) -> Option<Summary> {
        let last_epoch = *self.val.keys().next_back()?;
        let finished = last_epoch >= self.max_epochs;
        let end = if finished {
            self.max_epochs
        } else {
            last_epoch
        };
        let w = self.median_window;
        let (head, median, n_values) = self.best_head_median(end.saturating_sub(w), end)?;
        let median_last_w = self
            .best_head_median((end + 1).saturating_sub(w), end)
            .map(|b| b.1)
            .unwrap_or(median);
        Some(Summary {
            last_epoch,
            finished,
            head,
            median,
            median_last_w,
            n_values,
        })
    }

    /// Single table mode, if the run uses exactly one.
    fn single_mode(&self) -> Option<&str> {
        (self.modes.len() == 1).then(|| self.modes[0].as_str())
    }

    /// Trained by `AutoMixup` (AutoMix/SAMix), whose heads' losses are fixed (the
    /// config's `model.head.loss` does not apply).
    pub fn is_learned(&self) -> bool {
        self.single_mode()
            .and_then(method)
            .is_some_and(|m| m.learned)
    }

    /// Row label: the table's method name, `+`-joined modes for a multi-mode run,
    /// and the loss when it differs from the table's.
    pub fn label(&self) -> String {
        let mut s = match self.single_mode().and_then(method) {
            Some(m) => m.display.to_string(),
            None => self.modes.join("+"),
        };
        let learned = self
            .single_mode()
            .and_then(method)
            .is_some_and(|m| m.learned);
        if !learned && self.loss != self.default_loss() {
            let _ = write!(s, " [{}]", self.loss);
        }
        s
    }

    fn default_loss(&self) -> &'static str {
        if self.modes.iter().any(|m| m == "puzzlemix") {
            "CE_soft"
        } else {
            "CE_none"
        }
    }

    /// α column: "–" when the method ignores α, else the values joined by `/`.
    pub fn alpha_label(&self) -> String {
        if self
            .single_mode()
            .and_then(method)
            .is_some_and(|m| m.alpha_unused)
        {
            return "–".into();
        }
        self.alphas
            .iter()
            .map(|a| format!("{a}"))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The published number of this run's cell, when the run uses the table's
    /// method, α and loss.
    pub fn published<'a>(&self, table: &'a [Published]) -> Option<&'a Published> {
        let mode = self.single_mode()?;
        let m = method(mode)?;
        let alpha_ok = m.alpha_unused || self.alphas.first() == Some(&m.alpha(self.backbone));
        let loss_ok = self.is_learned() || self.loss == self.default_loss();
        if !(alpha_ok && loss_ok) {
            return None;
        }
        published_value(table, self.backbone, mode, self.max_epochs)
    }

    fn row_key(&self) -> RowKey {
        let first = self.modes.first().map(String::as_str).unwrap_or("");
        let idx = if self.modes.len() == 1 {
            table_index(first)
        } else {
            usize::MAX
        };
        (
            idx,
            self.modes.join("+"),
            self.alpha_label(),
            self.loss.clone(),
        )
    }
}

fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn list_of<T>(v: Option<&Value>, one: impl Fn(&Value) -> Option<T>) -> Option<Vec<T>> {
    match v? {
        Value::Array(a) => a.iter().map(one).collect(),
        x => one(x).map(|x| vec![x]),
    }
}

/// Reads the table-relevant fields of a config (JSON object).
fn run_from_config(cfg: &Value, dir: &Path, origin: &str) -> Result<Run> {
    let need = |p: &str| field(cfg, p).with_context(|| format!("{origin}: config has no `{p}`"));
    let name = need("name")?
        .as_str()
        .with_context(|| format!("{origin}: config `name` is not a string"))?
        .to_string();
    let max_epochs = need("max_epochs")?
        .as_u64()
        .with_context(|| format!("{origin}: config `max_epochs` is not a positive integer"))?
        as usize;
    let modes = list_of(Some(need("model.mix_mode")?), |v| {
        v.as_str().map(String::from)
    })
    .with_context(|| format!("{origin}: config `model.mix_mode` is not a string or list"))?;
    let alphas = list_of(Some(need("model.alpha")?), Value::as_f64)
        .with_context(|| format!("{origin}: config `model.alpha` is not a number or list"))?;
    let arch = need("model.backbone.arch")?
        .as_str()
        .with_context(|| format!("{origin}: config `model.backbone.arch` is not a string"))?;
    let backbone =
        Backbone::parse(arch).with_context(|| format!("{origin}: config `model.backbone.arch`"))?;
    let loss = field(cfg, "model.head.loss")
        .and_then(Value::as_str)
        .unwrap_or("CE_none")
        .to_string();
    let median_window = field(cfg, "evaluation.median_window")
        .and_then(Value::as_u64)
        .unwrap_or(10) as usize;
    Ok(Run {
        dir: dir.to_path_buf(),
        name,
        backbone,
        modes,
        alphas,
        loss,
        max_epochs,
        median_window,
        val: BTreeMap::new(),
    })
}

/// A log line that [`read_log_lenient`] skipped: its 1-based line number and why.
pub type SkippedLine = (usize, String);

/// Parses one JSONL log into its run, printing a warning (`warning: <file>:<line>: …`) on
/// stderr for every line it skips (see [`read_log_lenient`]).
pub fn read_log(path: &Path) -> Result<Run> {
    let (run, skipped) = read_log_lenient(path)?;
    for (line, reason) in skipped {
        eprintln!("warning: {}:{line}: {reason}; line skipped", path.display());
    }
    Ok(run)
}

/// Parses one JSONL log into its run and the lines it skipped. An unreadable line after the
/// meta line (not JSON: a torn write, a crash, disk corruption; or a `val` line without an
/// integer `epoch` or a `*_top1` accuracy) is skipped and returned as `(1-based line number,
/// reason)`, so one bad line never hides a whole run. The meta line itself must be readable:
/// without it the run cannot be placed in the table, and that is an error naming the file.
pub fn read_log_lenient(path: &Path) -> Result<(Run, Vec<SkippedLine>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let origin = path.display().to_string();
    let complete_last_line = text.ends_with('\n');
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let Some(&(first_no, first)) = lines.first() else {
        bail!("{origin}: empty log");
    };
    let first_no = first_no + 1;
    let meta: Value = serde_json::from_str(first)
        .with_context(|| format!("{origin}:{first_no}: the meta line is not JSON"))?;
    let cfg = match meta.get("config") {
        Some(Value::String(s)) => serde_json::from_str(s)
            .with_context(|| format!("{origin}:{first_no}: meta `config` is not JSON text"))?,
        Some(v @ Value::Object(_)) => v.clone(),
        _ => bail!(
            "{origin}:{first_no}: the first line has no `config` (expected the run's meta line)"
        ),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut run = run_from_config(&cfg, dir, &origin)?;
    let mut skipped = Vec::new();
    for (k, &(i, line)) in lines.iter().enumerate().skip(1) {
        let line_no = i + 1;
        let rec: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if k + 1 == lines.len() && !complete_last_line => {
                skipped.push((line_no, "truncated last line (a run still writing?)".into()));
                continue;
            }
            Err(e) => {
                skipped.push((line_no, format!("not JSON ({e})")));
                continue;
            }
        };
        if rec.get("mode").and_then(Value::as_str) != Some("val") {
            continue;
        }
        let Some(epoch) = rec.get("epoch").and_then(Value::as_u64) else {
            skipped.push((line_no, "val line without an integer `epoch`".into()));
            continue;
        };
        let heads: BTreeMap<String, f64> = rec
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.strip_suffix("_top1")?.to_string(), v.as_f64()?)))
            .collect();
        if heads.is_empty() {
            skipped.push((line_no, "val line without a `*_top1` accuracy".into()));
            continue;
        }
        run.val.insert(epoch as usize, heads);
    }
    Ok((run, skipped))
}

fn is_log(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.ends_with(".log.json") || name.ends_with(".jsonl")
}

fn collect_logs(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let entries =
        std::fs::read_dir(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut children: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot list", path.display()))?;
    children.sort();
    for c in children {
        if c.is_dir() {
            collect_logs(&c, out)?;
        } else if is_log(&c) {
            out.push(c);
        }
    }
    Ok(())
}

/// Finds every log below the given files/directories and returns one run per
/// (directory, name); logs of a resumed run are merged in file-name order, later
/// evaluations of an epoch replacing earlier ones.
pub fn load_runs(paths: &[PathBuf]) -> Result<Vec<Run>> {
    let mut logs = Vec::new();
    for p in paths {
        if !p.exists() {
            bail!("{}: no such file or directory", p.display());
        }
        collect_logs(p, &mut logs)?;
    }
    logs.sort();
    logs.dedup();
    let mut runs: BTreeMap<(PathBuf, String), Run> = BTreeMap::new();
    for log in &logs {
        let run = read_log(log)?;
        match runs.entry((run.dir.clone(), run.name.clone())) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(run);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                let (prev, new) = (e.get_mut(), run);
                if (prev.max_epochs, &prev.modes, &prev.alphas)
                    != (new.max_epochs, &new.modes, &new.alphas)
                {
                    bail!(
                        "{}: logs of run `{}` disagree on max_epochs/mix_mode/alpha",
                        log.display(),
                        new.name
                    );
                }
                prev.val.extend(new.val);
            }
        }
    }
    Ok(runs.into_values().collect())
}

/// Sort key of a table row: table position, modes, α label, loss.
type RowKey = (usize, String, String, String);

/// One row of the table: a (backbone, method, α, loss) with its runs by epochs.
struct Row<'a> {
    label: String,
    alpha: String,
    cells: BTreeMap<usize, (&'a Run, Summary)>,
}

/// Groups runs into table rows per backbone. When two runs fill the same cell the
/// one with more evaluated epochs wins (a warning names both).
fn rows(runs: &[Run]) -> BTreeMap<Backbone, Vec<Row<'_>>> {
    let mut grouped: BTreeMap<Backbone, BTreeMap<RowKey, Row>> = BTreeMap::new();
    for run in runs {
        let Some(summary) = run.summary() else {
            eprintln!(
                "warning: {}: no evaluation yet, not in the table",
                run.dir.display()
            );
            continue;
        };
        let row = grouped
            .entry(run.backbone)
            .or_default()
            .entry(run.row_key())
            .or_insert_with(|| Row {
                label: run.label(),
                alpha: run.alpha_label(),
                cells: BTreeMap::new(),
            });
        match row.cells.get(&run.max_epochs) {
            Some((other, s)) if s.last_epoch >= summary.last_epoch => {
                eprintln!(
                    "warning: {} and {} fill the same cell; keeping the first",
                    other.dir.display(),
                    run.dir.display()
                );
            }
            Some((other, _)) => {
                eprintln!(
                    "warning: {} and {} fill the same cell; keeping the second",
                    other.dir.display(),
                    run.dir.display()
                );
                row.cells.insert(run.max_epochs, (run, summary));
            }
            None => {
                row.cells.insert(run.max_epochs, (run, summary));
            }
        }
    }
    grouped
        .into_iter()
        .map(|(b, r)| (b, r.into_values().collect()))
        .collect()
}

fn backbone_title(b: Backbone) -> &'static str {
    match b {
        Backbone::R18 => "ResNet-18 (CIFAR)",
        Backbone::Rx50 => "ResNeXt-50 32x4d (CIFAR)",
    }
}

/// The Markdown and CSV texts of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Tables {
    /// Markdown, one table per backbone.
    pub markdown: String,
    /// Long-format CSV, one line per run.
    pub csv: String,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Builds the tables; with `compare`, every cell that has a published number
/// shows it and our difference.
pub fn tables(runs: &[Run], compare: bool) -> Result<Tables> {
    let table = published()?;
    let mut md = String::from("# CIFAR-10 mixup benchmark: our results\n\n");
    md.push_str(
        "Median top-1 test accuracy (%) over the evaluations of epochs E−10..E (11 values, as \
         upstream's summarizer does; spec §3.3). AutoMix/SAMix: the best head's median \
         (spec §5.12.7). \"(ep e/E)\" marks an unfinished run: the median of epochs e−10..e.\n",
    );
    if compare {
        md.push_str(
            "Cells with a published number read `ours (pub published, ours − published)`.\n",
        );
    }
    let mut csv = String::from(
        "backbone,method,mix_mode,alpha,loss,epochs,last_epoch,finished,head,top1_median,\
         top1_median_last10,n_values,published,diff,name,work_dir\n",
    );
    for (backbone, rows) in rows(runs) {
        let mut epochs: Vec<usize> = rows.iter().flat_map(|r| r.cells.keys().copied()).collect();
        epochs.sort_unstable();
        epochs.dedup();
        let _ = write!(md, "\n## {}\n\n| Method | α |", backbone_title(backbone));
        for e in &epochs {
            let _ = write!(md, " {e} ep |");
        }
        md.push_str("\n|---|:---:|");
        md.push_str(&":---:|".repeat(epochs.len()));
        md.push('\n');
        for row in &rows {
            let _ = write!(md, "| {} | {} |", row.label, row.alpha);
            for e in &epochs {
                let Some((run, s)) = row.cells.get(e) else {
                    md.push_str(" – |");
                    continue;
                };
                let mut cell = format!("{:.2}", s.median);
                if !s.finished {
                    let _ = write!(cell, " (ep {}/{})", s.last_epoch, run.max_epochs);
                }
                let publ = run.published(&table);
                if let (true, Some(p)) = (compare, publ) {
                    let _ = write!(
                        cell,
                        " (pub {:.2}, {:+.2})",
                        p.top1_median,
                        s.median - p.top1_median
                    );
                }
                let _ = write!(md, " {cell} |");
                let alpha_csv = if row.alpha == "–" {
                    "-".to_string()
                } else {
                    run.alphas
                        .iter()
                        .map(|a| format!("{a}"))
                        .collect::<Vec<_>>()
                        .join("+")
                };
                let fields = [
                    backbone.published_name().to_string(),
                    row.label.clone(),
                    run.modes.join("+"),
                    alpha_csv,
                    if run.is_learned() {
                        "-".to_string()
                    } else {
                        run.loss.clone()
                    },
                    e.to_string(),
                    s.last_epoch.to_string(),
                    s.finished.to_string(),
                    s.head.clone(),
                    format!("{:.2}", s.median),
                    format!("{:.2}", s.median_last_w),
                    s.n_values.to_string(),
                    publ.map(|p| format!("{:.2}", p.top1_median))
                        .unwrap_or_default(),
                    publ.map(|p| format!("{:+.2}", s.median - p.top1_median))
                        .unwrap_or_default(),
                    run.name.clone(),
                    run.dir.display().to_string(),
                ];
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                csv.push_str(&line.join(","));
                csv.push('\n');
            }
            md.push('\n');
        }
    }
    Ok(Tables { markdown: md, csv })
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes one accuracy-curve PNG per run (every head) and one per (backbone, epochs)
/// comparing the table rows (their reported head) into `dir`; returns the files.
pub fn write_plots(runs: &[Run], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut written = Vec::new();
    let mut save = |name: String, bytes: Vec<u8>| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        written.push(path);
        Ok(())
    };
    let curve = |run: &Run, head: &str| -> Vec<(f64, f64)> {
        run.val
            .iter()
            .filter_map(|(e, h)| h.get(head).map(|v| (*e as f64, *v)))
            .collect()
    };
    for run in runs {
        let mut heads: Vec<&String> = run.val.values().flat_map(|h| h.keys()).collect();
        heads.sort();
        heads.dedup();
        let series: Vec<Series> = heads
            .iter()
            .map(|h| Series {
                label: format!("{h} top-1"),
                points: curve(run, h),
            })
            .collect();
        let title = format!("{} ({} ep)", run.name, run.max_epochs);
        save(
            format!("run_{}.png", file_safe(&run.name)),
            line_plot(&title, "epoch", "top-1 %", &series)?,
        )?;
    }
    for (backbone, rows) in rows(runs) {
        let mut by_epochs: BTreeMap<usize, Vec<Series>> = BTreeMap::new();
        for row in &rows {
            for (e, (run, s)) in &row.cells {
                let label = match row.alpha.as_str() {
                    "–" => row.label.clone(),
                    a => format!("{} a={a}", row.label),
                };
                by_epochs.entry(*e).or_default().push(Series {
                    label,
                    points: curve(run, &s.head),
                });
            }
        }
        for (e, series) in by_epochs {
            let title = format!("{}, {e} epochs: test top-1", backbone_title(backbone));
            save(
                format!("compare_{}_ep{e}.png", backbone.tag()),
                line_plot(&title, "epoch", "top-1 %", &series)?,
            )?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_matches_numpy() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
