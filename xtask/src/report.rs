//! `report`: reads the JSONL logs (and `result.json`) of finished, running or failed runs
//! and writes the benchmark table (methods × epochs, the median of the last epochs' test
//! top-1) as Markdown and CSV, plus plots.
//!
//! Log format (`crates/train/src/log.rs`): the first line is a meta object whose
//! `config` holds the run's effective config (JSON text or object); every
//! `{"mode": "val", "epoch": e, …}` line holds the test accuracies of 1-based epoch
//! `e`, one `<head>_top1` key per evaluated head (`head0_top1`, or AutoMix's
//! `acc_{mix,one}_{k,q}_top1`); `{"mode": "train", …}` lines hold the training loss
//! and learning rate; `config_change` lines list the result-changing fields a resume
//! changed; a `summary` line (the runner's final record, also written to `result.json`)
//! says the run finished; a `{"mode": "diverged", "epoch": e, "iter": i, "reason": …}` line
//! says it stopped on a non-finite loss or weights. Other lines (`resumed`) are not needed.
//!
//! Each run gets a [`Status`]: finished (a summary line or `result.json` that agrees with
//! the logged evaluations), unfinished (interrupted or still running), or failed (diverged,
//! ended without a result after its final evaluation, an invalid top-1, a `result.json` that
//! cannot be read or disagrees with the log, an unreadable log). A failed run is listed with
//! its reason and counted in no cell; one bad run never stops the others' table.
//!
//! Only runs on the benchmark recipe fill the table's cells (see [`Run::nonrecipe_reasons`]);
//! the others are left out, or shown in rows of their own marked `†k` when asked for.
//! Several runs of one cell (seeds) are aggregated: the cell shows the median of their
//! metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::methods::{method, published, published_value, table_index, Backbone, Published};
use crate::plot::{band_curves, comparison, epoch_panels, BandSeries, CompareRow, Panel, Series};

/// Images in the CIFAR-10 training set (the recipe trains on all of them).
pub const TRAIN_IMAGES: usize = 50_000;
/// Images in the CIFAR-10 test set (the recipe evaluates on all of them).
pub const TEST_IMAGES: usize = 10_000;
/// The recipe's `model.backbone.base_width`.
pub const RECIPE_BASE_WIDTH: usize = 64;
/// The recipe's `data.batch_size`.
pub const RECIPE_BATCH_SIZE: usize = 100;

/// Logged or stored top-1 values further apart than this disagree (the log rounds floats
/// to 5 decimals; `result.json` keeps full precision).
pub const AGREEMENT_TOLERANCE: f64 = 1e-4;

/// A `diverged` log line: the run stopped because its loss or weights became non-finite.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    /// 1-based epoch in which it happened (`None` when the line has no integer `epoch`).
    pub epoch: Option<usize>,
    /// Iteration, when the line names one.
    pub iter: Option<usize>,
    /// The runner's one-line reason.
    pub reason: String,
}

impl Divergence {
    /// `diverged at epoch E: <detail>` (the problem text of [`Status::Failed`]).
    pub fn describe(&self) -> String {
        let mut s = String::from("diverged");
        if let Some(e) = self.epoch {
            let _ = write!(s, " at epoch {e}");
        }
        let _ = write!(s, ": ");
        if let Some(i) = self.iter {
            let _ = write!(s, "iteration {i}, ");
        }
        s.push_str(if self.reason.is_empty() {
            "no reason logged"
        } else {
            &self.reason
        });
        s
    }
}

/// How a run's records say it ended; the last such record wins, and a later `val` or
/// `summary` line (a resumed run that went on) clears a divergence.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// A `summary` log line or a `result.json` says the run finished.
    Finished {
        /// Where it says so (`result.json`, `the log's summary line`).
        source: String,
        /// The `median_top1` it claims (`None`: it names none).
        median_top1: Option<f64>,
    },
    /// A `diverged` log line.
    Diverged(Divergence),
}

/// What the report makes of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Evaluated up to `max_epochs`, with a `summary` line or `result.json` that agrees with
    /// the evaluations.
    Finished,
    /// Interrupted or still running: the last evaluated epoch (`None`: none yet).
    Unfinished {
        /// The last evaluated epoch.
        last_epoch: Option<usize>,
    },
    /// Its numbers cannot be reported; the problems, each `<short>: <detail>`.
    Failed(Vec<String>),
}

impl Status {
    /// `finished`, `unfinished` or `failed` (the CSV's `status`).
    pub fn name(&self) -> &'static str {
        match self {
            Status::Finished => "finished",
            Status::Unfinished { .. } => "unfinished",
            Status::Failed(_) => "failed",
        }
    }

    /// The problems' short forms (text before the first `": "`), `; `-joined; empty unless
    /// failed.
    pub fn short(&self) -> String {
        match self {
            Status::Failed(problems) => {
                let mut shorts: Vec<&str> = Vec::new();
                for p in problems {
                    let short = p.split_once(": ").map_or(p.as_str(), |(s, _)| s);
                    if !shorts.contains(&short) {
                        shorts.push(short);
                    }
                }
                shorts.join("; ")
            }
            _ => String::new(),
        }
    }

    /// The problems, `; `-joined; empty unless failed.
    pub fn detail(&self) -> String {
        match self {
            Status::Failed(problems) => problems.join("; "),
            _ => String::new(),
        }
    }
}

/// One `train` log line's numbers (either may be missing, e.g. `null` for a non-finite loss).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrainPoint {
    /// Training loss averaged over the log interval.
    pub loss: Option<f64>,
    /// Learning rate.
    pub lr: Option<f64>,
}

/// One run: its config fields that place it in the table (or keep it out), and its
/// evaluations and training curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The work directory (the log files' folder).
    pub dir: PathBuf,
    /// Config `name` (the work directory's name when absent).
    pub name: String,
    /// Config `model.backbone.arch`.
    pub backbone: Backbone,
    /// Config `model.mix_mode` as a list.
    pub modes: Vec<String>,
    /// Config `model.alpha` as a list; each mode's table α when absent.
    pub alphas: Vec<f64>,
    /// Config `model.head.loss` (`CE_none` when absent).
    pub loss: String,
    /// Config `max_epochs` (400 when absent).
    pub max_epochs: usize,
    /// Config `evaluation.median_window` (10 when absent).
    pub median_window: usize,
    /// Config `seed` (the meta line's `seed`, or 0, when absent).
    pub seed: u64,
    /// Config `model.backbone.base_width` (64 when absent).
    pub base_width: usize,
    /// Config `model.backbone.stage_blocks` (`None`: the architecture's).
    pub stage_blocks: Option<Vec<usize>>,
    /// Config `data.batch_size` (100 when absent).
    pub batch_size: usize,
    /// Config `data.limit_train` (`None`: every training image).
    pub limit_train: Option<usize>,
    /// Config `data.limit_test` (`None`: every test image).
    pub limit_test: Option<usize>,
    /// Other settings that differ from the recipe (optimizer, init, padding, …), as
    /// `field value (recipe value)`.
    pub other_deviations: Vec<String>,
    /// Result-changing fields a resume changed (`config_change` log lines).
    pub config_changes: Vec<String>,
    /// Settings on which the run's logs (merged after a resume) disagree.
    pub log_disagreements: Vec<String>,
    /// 1-based epoch → head name (key without `_top1`) → top-1 % (valid values only; an
    /// invalid one is a problem instead). Epochs only `result.json`'s history holds are
    /// filled in from it.
    pub val: BTreeMap<usize, BTreeMap<String, f64>>,
    /// `(1-based epoch, iteration)` → train line; a line logged again after a resume
    /// replaces the earlier one.
    pub train: BTreeMap<(usize, usize), TrainPoint>,
    /// How its records say it ended (`None`: they do not, e.g. still running).
    pub end: Option<End>,
    /// Why its numbers cannot be trusted, each `<short>: <detail>` (e.g. `invalid top-1: …`,
    /// `result.json disagrees with the log: …`); any makes the run failed.
    pub problems: Vec<String>,
    /// Whether the fields that place it in the table were read: `false` for a log whose
    /// meta line or config cannot be read and for logs of one run that disagree on
    /// `max_epochs`/`mix_mode`/`alpha`. Such a run is failed and listed, but in no cell.
    pub placeable: bool,
}

impl Default for Run {
    /// The recipe's ResNet-18 MixUp run (the config `{}`), with no evaluations.
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            name: String::new(),
            backbone: Backbone::R18,
            modes: vec!["mixup".into()],
            alphas: vec![1.0],
            loss: "CE_none".into(),
            max_epochs: 400,
            median_window: 10,
            seed: 0,
            base_width: RECIPE_BASE_WIDTH,
            stage_blocks: None,
            batch_size: RECIPE_BATCH_SIZE,
            limit_train: None,
            limit_test: None,
            other_deviations: Vec::new(),
            config_changes: Vec::new(),
            log_disagreements: Vec::new(),
            val: BTreeMap::new(),
            train: BTreeMap::new(),
            end: None,
            problems: Vec::new(),
            placeable: true,
        }
    }
}

/// The reported numbers of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Last evaluated epoch.
    pub last_epoch: usize,
    /// `last_epoch ≥ max_epochs` (whether the run finished is [`Run::status`]).
    pub reached_max_epochs: bool,
    /// Head whose median is reported (the best one, as upstream's summarizer).
    pub head: String,
    /// Median over epochs `end−w..end` (`end` = `max_epochs`, or the last epoch if
    /// unfinished; `w` = `evaluation.median_window`, so `w = 0` is epoch `end` alone).
    pub median: f64,
    /// Median over epochs `end−w+1..end` (README wording: "last 10 epochs"), best head;
    /// `None` for `w = 0` (no epochs), as the runner's `median_top1_last_window`.
    pub median_last_w: Option<f64>,
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

/// Arithmetic mean; `None` for no values.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Sample standard deviation (`numpy.std(ddof=1)`); `None` for fewer than two values.
pub fn sample_std(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let m = mean(values)?;
    let ss: f64 = values.iter().map(|v| (v - m) * (v - m)).sum();
    Some((ss / (values.len() - 1) as f64).sqrt())
}

/// The epoch count a name claims with a trailing `_ep<E>` (as generated config names do).
fn claimed_epochs(name: &str) -> Option<usize> {
    let (_, tail) = name.rsplit_once("_ep")?;
    if tail.is_empty() || !tail.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tail.parse().ok()
}

impl Run {
    /// Best-head median over epochs `from..=to`, with the head's name.
    fn best_head_median(&self, from: usize, to: usize) -> Option<(String, f64, usize)> {
        if from > to {
            return None;
        }
        let mut per_head: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (_, heads) in self.val.range(from..=to) {
            for (h, v) in heads {
                per_head.entry(h).or_default().push(*v);
            }
        }
        let mut best: Option<(String, f64, usize)> = None;
        for (h, vals) in per_head {
            let Some(m) = median(&vals) else { continue };
            if best.as_ref().is_none_or(|b| m > b.1) {
                best = Some((h.to_string(), m, vals.len()));
            }
        }
        best
    }

    /// The numbers of its evaluations; `None` before its first evaluation. Whether they
    /// are reported is [`Run::status`].
    pub fn summary(&self) -> Option<Summary> {
        let last_epoch = *self.val.keys().next_back()?;
        let reached_max_epochs = last_epoch >= self.max_epochs;
        let end = if reached_max_epochs {
            self.max_epochs
        } else {
            last_epoch
        };
        let w = self.median_window;
        let (head, median, n_values) = self.best_head_median(end.saturating_sub(w), end)?;
        let median_last_w = self
            .best_head_median(end.saturating_add(1).saturating_sub(w), end)
            .map(|b| b.1);
        Some(Summary {
            last_epoch,
            reached_max_epochs,
            head,
            median,
            median_last_w,
            n_values,
        })
    }

    /// Why the run is not the benchmark recipe (empty when it is): a smaller or
    /// reshaped backbone, a subset of the data, another batch size, a `max_epochs`
    /// that differs from the `_ep<E>` its name or work directory claims, other
    /// optimizer/initialisation/augmentation settings, a config changed on resume,
    /// logs that disagree, or an unfinished run (`"unfinished"`).
    pub fn nonrecipe_reasons(&self) -> Vec<String> {
        let mut r = Vec::new();
        if self.base_width != RECIPE_BASE_WIDTH {
            r.push(format!(
                "model.backbone.base_width {} (recipe {RECIPE_BASE_WIDTH})",
                self.base_width
            ));
        }
        if let Some(b) = &self.stage_blocks {
            r.push(format!(
                "model.backbone.stage_blocks {b:?} (recipe: the architecture's)"
            ));
        }
        if self.batch_size != RECIPE_BATCH_SIZE {
            r.push(format!(
                "data.batch_size {} (recipe {RECIPE_BATCH_SIZE})",
                self.batch_size
            ));
        }
        if let Some(n) = self.limit_train {
            r.push(format!(
                "data.limit_train {n} (recipe: all {TRAIN_IMAGES} images)"
            ));
        }
        if let Some(n) = self.limit_test {
            r.push(format!(
                "data.limit_test {n} (recipe: all {TEST_IMAGES} images)"
            ));
        }
        let dir_name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (what, text) in [("name", self.name.as_str()), ("work dir", &dir_name)] {
            if let Some(e) = claimed_epochs(text).filter(|&e| e != self.max_epochs) {
                r.push(format!(
                    "max_epochs {}, but its {what} says _ep{e}",
                    self.max_epochs
                ));
            }
        }
        r.extend(self.other_deviations.iter().cloned());
        if !self.config_changes.is_empty() {
            r.push(format!(
                "config changed on resume: {}",
                self.config_changes.join("; ")
            ));
        }
        if !self.log_disagreements.is_empty() {
            r.push(format!(
                "its logs disagree on {}",
                self.log_disagreements.join(", ")
            ));
        }
        if matches!(
            self.status(),
            Status::Unfinished {
                last_epoch: Some(_)
            }
        ) {
            r.push("unfinished".into());
        }
        r
    }

    /// Finished, unfinished or failed (see [`Status`]): failed with its problems, a
    /// divergence, or evaluations up to `max_epochs` without a result (no summary line, no
    /// `result.json`: the run diverged or crashed after its final evaluation, which runners
    /// older than the `diverged` line did not log); finished when it says so and has
    /// evaluated `max_epochs`; unfinished otherwise.
    pub fn status(&self) -> Status {
        let mut problems = self.problems.clone();
        if let Some(End::Diverged(d)) = &self.end {
            problems.push(d.describe());
        }
        if !problems.is_empty() {
            return Status::Failed(problems);
        }
        let last_epoch = self.val.keys().next_back().copied();
        match (last_epoch, &self.end) {
            (Some(e), Some(End::Finished { .. })) if e >= self.max_epochs => Status::Finished,
            (Some(e), _) if e >= self.max_epochs => Status::Failed(vec![format!(
                "no result after its final evaluation: epoch {e} is evaluated, but there is \
                 neither a `summary` log line nor a result.json (it diverged, crashed or was \
                 killed after evaluating)"
            )]),
            (_, Some(End::Finished { source, .. })) => Status::Failed(vec![format!(
                "{source} disagrees with the log: it says the run finished, but {}",
                match last_epoch {
                    Some(e) => format!("the last evaluated epoch is {e} of {}", self.max_epochs),
                    None => "no evaluation is logged".into(),
                }
            )]),
            _ => Status::Unfinished { last_epoch },
        }
    }

    /// Mean training loss of each epoch's train lines (lines without a finite loss skipped).
    pub fn train_loss_per_epoch(&self) -> BTreeMap<usize, f64> {
        let mut sums: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
        for ((e, _), p) in &self.train {
            if let Some(l) = p.loss.filter(|l| l.is_finite()) {
                let s = sums.entry(*e).or_default();
                s.0 += l;
                s.1 += 1;
            }
        }
        sums.into_iter()
            .map(|(e, (sum, n))| (e, sum / n as f64))
            .collect()
    }

    /// Learning rate of each epoch: that of its first train line (the schedule is per epoch).
    pub fn lr_per_epoch(&self) -> BTreeMap<usize, f64> {
        let mut out = BTreeMap::new();
        for ((e, _), p) in &self.train {
            if let Some(lr) = p.lr {
                out.entry(*e).or_insert(lr);
            }
        }
        out
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
        if !self.is_learned() && self.loss != self.default_loss() {
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

    /// The recipe-relevant settings, compared when logs of one run are merged.
    fn settings(&self) -> [(&'static str, String); 6] {
        [
            ("seed", self.seed.to_string()),
            ("model.backbone.base_width", self.base_width.to_string()),
            (
                "model.backbone.stage_blocks",
                format!("{:?}", self.stage_blocks),
            ),
            ("data.batch_size", self.batch_size.to_string()),
            ("data.limit_train", format!("{:?}", self.limit_train)),
            ("data.limit_test", format!("{:?}", self.limit_test)),
        ]
    }
}

fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn list_of<T>(v: Option<&Value>, one: impl Fn(&Value) -> Option<T>) -> Option<Vec<T>> {
    match v? {
        Value::Array(a) => a.iter().map(one).collect(),
        x => one(x).map(|x| vec![x]),
    }
}

/// A non-negative integer field: `None` when absent or `null`, an error when of another type.
fn opt_usize(cfg: &Value, path: &str, origin: &str) -> Result<Option<usize>> {
    field(cfg, path)
        .map(|v| {
            v.as_u64()
                .map(|n| n as usize)
                .with_context(|| format!("{origin}: config `{path}` is not a non-negative integer"))
        })
        .transpose()
}

/// Settings outside the table's row/column keys that the recipe fixes, with their
/// recipe values; a run whose logged config has another value is not the recipe.
fn other_deviations(cfg: &Value, learned: bool) -> Vec<String> {
    let min_lr = if learned {
        crate::gen::AUTOMIX_MIN_LR
    } else {
        0.0
    };
    let numbers = [
        ("optimizer.lr", 0.1),
        ("optimizer.momentum", 0.9),
        ("optimizer.weight_decay", 1e-4),
        ("lr_config.min_lr", min_lr),
        ("model.mix_repeat", 1.0),
        ("model.head.num_classes", 10.0),
    ];
    let mut out = Vec::new();
    for (path, want) in numbers {
        if let Some(v) = field(cfg, path) {
            if v.as_f64()
                .is_none_or(|x| (x - want).abs() > 1e-12 * want.abs().max(1.0))
            {
                out.push(format!("{path} {v} (recipe {want})"));
            }
        }
    }
    let others = [
        ("optimizer.nesterov", Value::Bool(false)),
        ("model.backbone.init", Value::from("benchmark")),
        ("data.padding_mode", Value::from("constant")),
    ];
    for (path, want) in others {
        if let Some(v) = field(cfg, path).filter(|v| **v != want) {
            out.push(format!("{path} {v} (recipe {want})"));
        }
    }
    out
}

/// Reads the fields of a config (JSON object) that place a run in the table. Absent
/// fields take the schema's defaults (`model.alpha`: each mode's table α).
fn run_from_config(cfg: &Value, meta: &Value, dir: &Path, origin: &str) -> Result<Run> {
    let defaults = Run::default();
    let name = match field(cfg, "name") {
        Some(v) => v
            .as_str()
            .with_context(|| format!("{origin}: config `name` is not a string"))?
            .to_string(),
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into()),
    };
    let max_epochs = opt_usize(cfg, "max_epochs", origin)?.unwrap_or(defaults.max_epochs);
    let modes = match field(cfg, "model.mix_mode") {
        Some(v) => list_of(Some(v), |v| v.as_str().map(String::from)).with_context(|| {
            format!("{origin}: config `model.mix_mode` is not a string or list")
        })?,
        None => defaults.modes.clone(),
    };
    let backbone = match field(cfg, "model.backbone.arch") {
        Some(v) => {
            let arch = v.as_str().with_context(|| {
                format!("{origin}: config `model.backbone.arch` is not a string")
            })?;
            Backbone::parse(arch)
                .with_context(|| format!("{origin}: config `model.backbone.arch`"))?
        }
        None => defaults.backbone,
    };
    let alphas = match field(cfg, "model.alpha") {
        Some(v) => list_of(Some(v), Value::as_f64)
            .with_context(|| format!("{origin}: config `model.alpha` is not a number or list"))?,
        None => modes
            .iter()
            .map(|m| {
                method(m).map(|m| m.alpha(backbone)).with_context(|| {
                    format!("{origin}: config has no `model.alpha` and `{m}` is not a table mode")
                })
            })
            .collect::<Result<_>>()?,
    };
    let loss = field(cfg, "model.head.loss")
        .and_then(Value::as_str)
        .unwrap_or("CE_none")
        .to_string();
    let median_window =
        opt_usize(cfg, "evaluation.median_window", origin)?.unwrap_or(defaults.median_window);
    let seed = match field(cfg, "seed").or_else(|| field(meta, "seed")) {
        Some(v) => v
            .as_u64()
            .with_context(|| format!("{origin}: config `seed` is not a non-negative integer"))?,
        None => 0,
    };
    let stage_blocks = match field(cfg, "model.backbone.stage_blocks") {
        Some(v) => Some(
            list_of(Some(v), |x| x.as_u64().map(|n| n as usize)).with_context(|| {
                format!("{origin}: config `model.backbone.stage_blocks` is not a list of integers")
            })?,
        ),
        None => None,
    };
    let learned = modes.len() == 1 && method(&modes[0]).is_some_and(|m| m.learned);
    Ok(Run {
        dir: dir.to_path_buf(),
        name,
        backbone,
        alphas,
        loss,
        max_epochs,
        median_window,
        seed,
        base_width: opt_usize(cfg, "model.backbone.base_width", origin)?
            .unwrap_or(RECIPE_BASE_WIDTH),
        stage_blocks,
        batch_size: opt_usize(cfg, "data.batch_size", origin)?.unwrap_or(RECIPE_BATCH_SIZE),
        limit_train: opt_usize(cfg, "data.limit_train", origin)?,
        limit_test: opt_usize(cfg, "data.limit_test", origin)?,
        other_deviations: other_deviations(cfg, learned),
        modes,
        ..defaults
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
    let mut run = run_from_config(&cfg, &meta, dir, &origin)?;
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
        match rec.get("mode").and_then(Value::as_str) {
            Some("val") => {}
            Some("train") => {
                if let Some(epoch) = rec.get("epoch").and_then(Value::as_u64) {
                    let iter = rec.get("iter").and_then(Value::as_u64).unwrap_or(k as u64);
                    let point = TrainPoint {
                        loss: rec.get("loss").and_then(Value::as_f64),
                        lr: rec.get("lr").and_then(Value::as_f64),
                    };
                    run.train.insert((epoch as usize, iter as usize), point);
                }
                continue;
            }
            Some("config_change") => {
                let changed = list_of(rec.get("changed"), |v| v.as_str().map(String::from))
                    .unwrap_or_else(|| vec!["(fields not named)".into()]);
                run.config_changes.extend(changed);
                continue;
            }
            Some("summary") => {
                let median_top1 = match rec.get("median_top1").map(top1_value) {
                    Some(Ok(v)) => Some(v),
                    Some(Err(why)) if !rec["median_top1"].is_null() => {
                        run.problems.push(format!(
                            "invalid top-1: {origin}:{line_no}: summary `median_top1` is {why}"
                        ));
                        None
                    }
                    _ => None,
                };
                run.end = Some(End::Finished {
                    source: "the log's summary line".into(),
                    median_top1,
                });
                continue;
            }
            Some("diverged") => {
                let reason = match rec.get("reason") {
                    Some(Value::String(s)) => s.clone(),
                    None | Some(Value::Null) => String::new(),
                    Some(other) => other.to_string(),
                };
                run.end = Some(End::Diverged(Divergence {
                    epoch: rec.get("epoch").and_then(Value::as_u64).map(|e| e as usize),
                    iter: rec.get("iter").and_then(Value::as_u64).map(|i| i as usize),
                    reason,
                }));
                continue;
            }
            _ => continue,
        }
        let Some(epoch) = rec.get("epoch").and_then(Value::as_u64) else {
            skipped.push((line_no, "val line without an integer `epoch`".into()));
            continue;
        };
        let mut heads: BTreeMap<String, f64> = BTreeMap::new();
        let mut any_top1 = false;
        for (key, v) in rec.as_object().into_iter().flatten() {
            let Some(head) = key.strip_suffix("_top1") else {
                continue;
            };
            any_top1 = true;
            match top1_value(v) {
                Ok(x) => {
                    heads.insert(head.to_string(), x);
                }
                Err(why) => run.problems.push(format!(
                    "invalid top-1: {origin}:{line_no}: epoch {epoch} `{key}` is {why}"
                )),
            }
        }
        if !any_top1 {
            skipped.push((line_no, "val line without a `*_top1` accuracy".into()));
            continue;
        }
        // The run went on after any divergence an earlier session logged.
        if matches!(run.end, Some(End::Diverged(_))) {
            run.end = None;
        }
        if !heads.is_empty() {
            run.val.insert(epoch as usize, heads);
        }
    }
    Ok((run, skipped))
}

/// A top-1 percentage: a finite JSON number in `[0, 100]`; otherwise why not (`null` is
/// what the runner's log writes for a non-finite value).
fn top1_value(v: &Value) -> std::result::Result<f64, String> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) if x.is_finite() && (0.0..=100.0).contains(&x) => Ok(x),
            Some(x) => Err(format!("{x}, outside [0, 100]")),
            None => Err(format!("{n}, not a float")),
        },
        Value::Null => Err("null (a non-finite value)".into()),
        other => Err(format!("{other}, not a number")),
    }
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
/// evaluations of an epoch replacing earlier ones. Then each run's `result.json` (in its
/// directory) is read and checked against the logs, filling in the epochs only its history
/// holds (see [`check_result_json`]).
///
/// Problems of one run never stop the others: a log that cannot be read (meta line,
/// config fields) makes its directory's run failed (or, when no other log there names a
/// run, a failed entry of its own); logs of one run that disagree on
/// max_epochs/mix_mode/alpha make it failed and unplaceable; logs that disagree on another
/// recipe setting (seed, base width, data limits, …) make it non-recipe. Only a path that
/// does not exist or cannot be listed is an error.
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
    // Directory → problems of its logs that cannot be read.
    let mut unreadable: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for log in &logs {
        let run = match read_log(log) {
            Ok(run) => run,
            Err(e) => {
                let dir = log.parent().unwrap_or(Path::new(".")).to_path_buf();
                unreadable
                    .entry(dir)
                    .or_default()
                    .push(format!("unreadable log: {e:#}"));
                continue;
            }
        };
        match runs.entry((run.dir.clone(), run.name.clone())) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(run);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                merge_log(e.get_mut(), run, log);
            }
        }
    }
    let mut unplaced = Vec::new();
    for (dir, problems) in unreadable {
        let mut in_dir = runs.iter_mut().filter(|((d, _), _)| *d == dir);
        match (in_dir.next(), in_dir.next()) {
            // A work dir holds one run: its unreadable log is that run's.
            (Some((_, run)), None) => run.problems.extend(problems),
            _ => unplaced.push(Run {
                name: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| dir.display().to_string()),
                dir,
                problems,
                placeable: false,
                ..Run::default()
            }),
        }
    }
    let mut runs: Vec<Run> = runs.into_values().chain(unplaced).collect();
    for run in &mut runs {
        if run.placeable {
            check_result_json(run);
            check_logged_summary(run);
        }
    }
    Ok(runs)
}

/// Merges the run of a later log (`log`) of the same directory and name into `prev`.
fn merge_log(prev: &mut Run, new: Run, log: &Path) {
    if (prev.max_epochs, &prev.modes, &prev.alphas) != (new.max_epochs, &new.modes, &new.alphas)
        && prev.placeable
    {
        prev.problems.push(format!(
            "logs disagree: {} says max_epochs {}, mix_mode {}, alpha {:?}; an earlier log of \
             the run says max_epochs {}, mix_mode {}, alpha {:?}",
            log.display(),
            new.max_epochs,
            new.modes.join("+"),
            new.alphas,
            prev.max_epochs,
            prev.modes.join("+"),
            prev.alphas
        ));
        prev.placeable = false;
    }
    for ((what, a), (_, b)) in prev.settings().into_iter().zip(new.settings()) {
        let what = what.to_string();
        if a != b && !prev.log_disagreements.contains(&what) {
            prev.log_disagreements.push(what);
        }
    }
    for d in new.other_deviations {
        if !prev.other_deviations.contains(&d) {
            prev.other_deviations.push(d);
        }
    }
    prev.config_changes.extend(new.config_changes);
    let went_on = !new.val.is_empty() || new.end.is_some();
    prev.val.extend(new.val);
    prev.train.extend(new.train);
    if went_on {
        prev.end = new.end;
    }
    prev.problems.extend(new.problems);
}

/// `x` rounded to 5 decimals, for messages (the log's precision).
fn shown(x: f64) -> f64 {
    (x * 1e5).round() / 1e5
}

/// The problem with a claimed final median (`claimed`, from `source`, found at `at`)
/// against the run's evaluations, if any: no median, or one that differs from the
/// evaluations' by more than [`AGREEMENT_TOLERANCE`]. (A claim by a run not evaluated up to
/// `max_epochs` is a problem of [`Run::status`].)
fn claimed_median_problem(
    run: &Run,
    source: &str,
    at: &str,
    claimed: Option<f64>,
    hint: &str,
) -> Option<String> {
    let Some(claimed) = claimed else {
        return Some(format!("no result: {source}{at} names no `median_top1`"));
    };
    let s = run.summary().filter(|s| s.reached_max_epochs)?;
    ((s.median - claimed).abs() > AGREEMENT_TOLERANCE).then(|| {
        format!(
            "{source} disagrees with the log: {at}median_top1 {}, the evaluations of epochs \
             {}..{} give {} ({}){hint}",
            shown(claimed),
            run.max_epochs.saturating_sub(run.median_window),
            run.max_epochs,
            shown(s.median),
            s.head
        )
    })
}

/// Checks a finished run's `summary` log line (when no `result.json` was read) against its
/// evaluations.
fn check_logged_summary(run: &mut Run) {
    let Some(End::Finished {
        source,
        median_top1,
    }) = &run.end
    else {
        return;
    };
    if source == RESULT_JSON {
        return;
    }
    if let Some(p) = claimed_median_problem(run, source, "", *median_top1, "") {
        run.problems.push(p);
    }
}

/// The run's final record, written by the runner when the run finishes.
const RESULT_JSON: &str = "result.json";

/// The fields of a `result.json` the report uses.
struct ResultFile {
    max_epochs: usize,
    median_top1: f64,
    seed: Option<u64>,
    window: Option<(usize, usize)>,
    /// head → epoch → top-1 (a later entry of an epoch replacing an earlier one).
    history: Option<BTreeMap<String, BTreeMap<usize, f64>>>,
}

/// Parses a `result.json`; the error is the run's problem text.
fn parse_result(bytes: &[u8], path: &Path) -> std::result::Result<ResultFile, String> {
    let at = path.display();
    let unreadable = |why: String| format!("{RESULT_JSON} unreadable: {at}: {why}");
    let text = String::from_utf8_lossy(bytes);
    if text.trim().is_empty() {
        return Err(unreadable("empty".into()));
    }
    let v: Value =
        serde_json::from_str(&text).map_err(|e| unreadable(format!("not JSON ({e})")))?;
    let Some(obj) = v.as_object() else {
        return Err(unreadable("not a JSON object".into()));
    };
    match obj.get("status") {
        None => {}
        Some(Value::String(s)) if s == "finished" => {}
        Some(other) => return Err(unreadable(format!("`status` is {other}, not \"finished\""))),
    }
    let max_epochs = obj
        .get("max_epochs")
        .and_then(Value::as_u64)
        .ok_or_else(|| unreadable("no integer `max_epochs`".into()))? as usize;
    let median_top1 = match obj.get("median_top1") {
        None | Some(Value::Null) => return Err(unreadable("no `median_top1`".into())),
        Some(v) => {
            top1_value(v).map_err(|why| format!("invalid top-1: {at}: `median_top1` is {why}"))?
        }
    };
    let seed = match obj.get("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| unreadable(format!("`seed` is {v}, not an integer")))?,
        ),
    };
    let window = match obj.get("median_window_epochs") {
        None => None,
        Some(v) => {
            let pair = v
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)));
            Some(pair.ok_or_else(|| {
                unreadable(format!("`median_window_epochs` is {v}, not [first, last]"))
            })?)
        }
    };
    let history = match obj.get("history") {
        None => None,
        Some(v) => {
            let shape = || unreadable("`history` is not {head: [[epoch, top1], …]}".into());
            let mut heads = BTreeMap::new();
            for (head, entries) in v.as_object().ok_or_else(shape)? {
                let mut by_epoch = BTreeMap::new();
                for entry in entries.as_array().ok_or_else(shape)? {
                    let pair = entry
                        .as_array()
                        .filter(|p| p.len() == 2)
                        .ok_or_else(shape)?;
                    let epoch = pair[0].as_u64().ok_or_else(shape)? as usize;
                    let top1 = top1_value(&pair[1]).map_err(|why| {
                        format!("invalid top-1: {at}: history `{head}` epoch {epoch} is {why}")
                    })?;
                    by_epoch.insert(epoch, top1);
                }
                heads.insert(head.clone(), by_epoch);
            }
            Some(heads)
        }
    };
    Ok(ResultFile {
        max_epochs,
        median_top1,
        seed,
        window,
        history,
    })
}

/// Reads the run's `result.json`, if its directory has one, and checks it against the
/// logs: its `max_epochs`, `seed` and median window against the config, its `history` (the
/// complete evaluation history) against every logged evaluation, and its `median_top1`
/// against the median of the merged evaluations. When they agree, the run's evaluations
/// take the history's values (full precision; the log rounds to 5 decimals) and gain the
/// epochs only the history holds (a run resumed with `--resume-from` into a new work dir
/// logs only the later ones). Anything unreadable or disagreeing is a problem of the run;
/// an agreeing result makes it finished. A `result.json` without `history` (older runners)
/// is checked on the rest.
pub fn check_result_json(run: &mut Run) {
    let path = run.dir.join(RESULT_JSON);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            run.problems
                .push(format!("{RESULT_JSON} unreadable: {}: {e}", path.display()));
            return;
        }
    };
    let r = match parse_result(&bytes, &path) {
        Ok(r) => r,
        Err(problem) => {
            run.problems.push(problem);
            return;
        }
    };
    let disagrees = format!("{RESULT_JSON} disagrees with the log: {}", path.display());
    let mut problems = Vec::new();
    if r.max_epochs != run.max_epochs {
        problems.push(format!(
            "{disagrees}: max_epochs {}, the log's config says {}",
            r.max_epochs, run.max_epochs
        ));
    }
    if let Some(seed) = r.seed.filter(|s| *s != run.seed) {
        problems.push(format!(
            "{disagrees}: seed {seed}, the log's config says {}",
            run.seed
        ));
    }
    let window = (
        run.max_epochs.saturating_sub(run.median_window),
        run.max_epochs,
    );
    if let Some(w) = r.window.filter(|w| *w != window) {
        problems.push(format!(
            "{disagrees}: median_window_epochs [{}, {}], the log's config gives [{}, {}]",
            w.0, w.1, window.0, window.1
        ));
    }
    if let Some(End::Diverged(d)) = &run.end {
        problems.push(format!("{disagrees}: the log ends with: {}", d.describe()));
    }
    if let Some(history) = &r.history {
        let mut differ = Vec::new();
        for (epoch, heads) in &run.val {
            for (head, logged) in heads {
                match history.get(head).and_then(|h| h.get(epoch)) {
                    None => differ.push(format!(
                        "the log has epoch {epoch} `{head}`, the history does not"
                    )),
                    Some(v) if (v - logged).abs() > AGREEMENT_TOLERANCE => differ.push(format!(
                        "epoch {epoch} `{head}`: logged {}, history {}",
                        shown(*logged),
                        shown(*v)
                    )),
                    Some(_) => {}
                }
            }
        }
        if !differ.is_empty() {
            let n = differ.len();
            differ.truncate(3);
            if n > 3 {
                differ.push(format!("{} more", n - 3));
            }
            problems.push(format!("{disagrees}: {}", differ.join(", ")));
        }
    }
    if !problems.is_empty() {
        run.problems.extend(problems);
        return;
    }
    let hint = match r.history {
        Some(history) => {
            for (head, epochs) in history {
                for (epoch, v) in epochs {
                    run.val.entry(epoch).or_default().insert(head.clone(), v);
                }
            }
            ""
        }
        None => {
            " (this result.json has no `history` to fill in epochs the logs lack, as after \
             --resume-from into a new work dir)"
        }
    };
    run.end = Some(End::Finished {
        source: RESULT_JSON.into(),
        median_top1: Some(r.median_top1),
    });
    let at = format!("{}: ", path.display());
    if let Some(p) = claimed_median_problem(run, RESULT_JSON, &at, Some(r.median_top1), hint) {
        run.problems.push(p);
    }
}

/// Sort key of a table row: table position, modes, α label, loss.
type RowKey = (usize, String, String, String);

/// The runs of one table cell: the counted ones, one per seed, and the failed ones.
#[derive(Debug, Clone)]
pub struct Cell<'a> {
    /// The cell's counted (finished or, in a marked row, unfinished) runs with their
    /// summaries, by seed.
    pub runs: BTreeMap<u64, (&'a Run, Summary)>,
    /// The cell's failed runs: shown as failed, counted in none of its numbers.
    pub failed: Vec<&'a Run>,
}

impl<'a> Cell<'a> {
    /// Each counted run's metric (median over its last epochs), in seed order.
    pub fn metrics(&self) -> Vec<f64> {
        self.runs.values().map(|(_, s)| s.median).collect()
    }

    /// The reported value: the median over seeds of each counted run's metric; `None` when
    /// every run of the cell failed.
    pub fn median(&self) -> Option<f64> {
        median(&self.metrics())
    }

    /// A run of the cell (counted first), for what its runs share (the published number).
    pub fn any_run(&self) -> Option<&'a Run> {
        self.runs
            .values()
            .map(|(r, _)| *r)
            .chain(self.failed.iter().copied())
            .next()
    }

    /// The lowest last evaluated epoch of an unfinished run of the cell.
    fn unfinished_progress(&self) -> Option<usize> {
        self.runs
            .values()
            .filter(|(_, s)| !s.reached_max_epochs)
            .map(|(_, s)| s.last_epoch)
            .min()
    }

    /// The Markdown cell text (without the published comparison): the median over seeds,
    /// `(n=k)`, unfinished progress and failed runs; or, with no counted run, the failure.
    fn text(&self, epochs: usize) -> String {
        let Some(cell_median) = self.median() else {
            return match self.failed.as_slice() {
                [one] => format!("failed: {}", one.status().short()),
                many => format!("{} runs failed", many.len()),
            };
        };
        let mut text = format!("{cell_median:.2}");
        if self.runs.len() > 1 {
            let _ = write!(text, " (n={})", self.runs.len());
        }
        if let Some(last) = self.unfinished_progress() {
            let _ = write!(text, " (ep {last}/{epochs})");
        }
        if !self.failed.is_empty() {
            let _ = write!(text, " ({} failed)", self.failed.len());
        }
        text
    }
}

/// One row of the table: a (backbone, method, α, loss), on the recipe or, marked,
/// with one set of non-recipe reasons.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    /// Method label.
    pub label: String,
    /// α label.
    pub alpha: String,
    /// Why the row's runs are not the recipe (empty for a recipe row).
    pub reasons: Vec<String>,
    /// Footnote number of `reasons` (`†k`); `None` for a recipe row.
    pub mark: Option<usize>,
    /// Cells by epochs (`max_epochs`).
    pub cells: BTreeMap<usize, Cell<'a>>,
}

impl Row<'_> {
    /// Label with its `†k` mark.
    pub fn marked_label(&self) -> String {
        match self.mark {
            Some(k) => format!("{} †{k}", self.label),
            None => self.label.clone(),
        }
    }
}

/// How runs were placed: the rows per backbone, the footnotes of the marked rows, and
/// what was left out and why.
#[derive(Debug, Clone)]
pub struct Layout<'a> {
    /// Rows per backbone, recipe rows before their marked variants.
    pub rows: BTreeMap<Backbone, Vec<Row<'a>>>,
    /// Footnote `k` (1-based) is `footnotes[k - 1]`: the reasons of rows marked `†k`.
    pub footnotes: Vec<Vec<String>>,
    /// Runs left out of the table, with why (failed runs are in `failed` instead).
    pub left_out: Vec<(&'a Run, String)>,
    /// Every failed run (in a cell or not), with its status.
    pub failed: Vec<(&'a Run, Status)>,
    /// Warnings (duplicate seeds in a cell).
    pub warnings: Vec<String>,
}

/// Groups runs into table rows per backbone. Non-recipe runs are left out unless
/// `include_nonrecipe`, and then go to rows of their own, one per set of reasons.
/// Runs of a cell are aggregated per seed; when two runs of a cell share a seed, the
/// one with more evaluated epochs is kept (the first on a tie) and a warning names both.
/// Failed runs are listed in [`Layout::failed`] and, when placeable and shown, sit in
/// their cell's `failed` list.
pub fn layout(runs: &[Run], include_nonrecipe: bool) -> Layout<'_> {
    type Key = (RowKey, Vec<String>);
    let mut grouped: BTreeMap<Backbone, BTreeMap<Key, Row>> = BTreeMap::new();
    let mut left_out = Vec::new();
    let mut failed = Vec::new();
    let mut warnings = Vec::new();
    for run in runs {
        let status = run.status();
        let is_failed = matches!(status, Status::Failed(_));
        if is_failed {
            failed.push((run, status.clone()));
            if !run.placeable {
                continue;
            }
        }
        let summary = run.summary();
        if summary.is_none() && !is_failed {
            left_out.push((run, "no evaluation yet".to_string()));
            continue;
        }
        let reasons = run.nonrecipe_reasons();
        if !reasons.is_empty() && !include_nonrecipe {
            if !is_failed {
                let why = reasons
                    .iter()
                    .map(|r| match (&status, r.as_str()) {
                        (
                            Status::Unfinished {
                                last_epoch: Some(e),
                            },
                            "unfinished",
                        ) => format!("unfinished (epoch {e}/{})", run.max_epochs),
                        _ => r.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                left_out.push((run, format!("not the benchmark recipe: {why}")));
            }
            continue;
        }
        let row = grouped
            .entry(run.backbone)
            .or_default()
            .entry((run.row_key(), reasons.clone()))
            .or_insert_with(|| Row {
                label: run.label(),
                alpha: run.alpha_label(),
                reasons,
                mark: None,
                cells: BTreeMap::new(),
            });
        let cell = row.cells.entry(run.max_epochs).or_insert_with(|| Cell {
            runs: BTreeMap::new(),
            failed: Vec::new(),
        });
        let summary = match summary {
            Some(s) if !is_failed => s,
            _ => {
                cell.failed.push(run);
                continue;
            }
        };
        match cell.runs.get(&run.seed) {
            Some((other, s)) => {
                let keep_new = summary.last_epoch > s.last_epoch;
                warnings.push(format!(
                    "{} and {} are the same cell and seed {}; keeping the {}",
                    other.dir.display(),
                    run.dir.display(),
                    run.seed,
                    if keep_new { "second" } else { "first" }
                ));
                if keep_new {
                    cell.runs.insert(run.seed, (run, summary));
                }
            }
            None => {
                cell.runs.insert(run.seed, (run, summary));
            }
        }
    }
    let mut footnotes: Vec<Vec<String>> = Vec::new();
    let rows = grouped
        .into_iter()
        .map(|(b, rows)| {
            let mut rows: Vec<Row> = rows.into_values().collect();
            for row in &mut rows {
                if row.reasons.is_empty() {
                    continue;
                }
                let k = match footnotes.iter().position(|f| *f == row.reasons) {
                    Some(i) => i + 1,
                    None => {
                        footnotes.push(row.reasons.clone());
                        footnotes.len()
                    }
                };
                row.mark = Some(k);
            }
            (b, rows)
        })
        .collect();
    Layout {
        rows,
        footnotes,
        left_out,
        failed,
        warnings,
    }
}

fn backbone_title(b: Backbone) -> &'static str {
    match b {
        Backbone::R18 => "ResNet-18 (CIFAR)",
        Backbone::Rx50 => "ResNeXt-50 32x4d (CIFAR)",
    }
}

/// What [`tables`] shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableOptions {
    /// Put the published number and our difference in every cell that has one.
    pub compare_published: bool,
    /// Show non-recipe runs in rows of their own, marked `†k`, instead of leaving them out.
    pub include_nonrecipe: bool,
}

/// The Markdown and CSV texts of the table, and what to tell the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Tables {
    /// Markdown, one table per backbone, then the failed runs.
    pub markdown: String,
    /// Long-format CSV, one line per run in the table (failed ones included).
    pub csv: String,
    /// Notes for stderr: failed runs, runs left out and why, duplicate seeds.
    pub warnings: Vec<String>,
    /// How many runs failed (listed under "Failed runs").
    pub failed_runs: usize,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Text for a Markdown table cell: `|` escaped, line breaks as spaces.
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// The CSV header of [`tables`].
pub const CSV_HEADER: &str = "backbone,method,mix_mode,alpha,loss,epochs,seed,last_epoch,finished,\
head,top1_median,top1_median_last10,n_values,cell_n,cell_median,cell_mean,cell_std,published,\
diff,recipe,nonrecipe,base_width,stage_blocks,batch_size,limit_train,limit_test,name,work_dir,\
status,failure";

fn opt_str<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

/// Builds the tables (see [`TableOptions`]).
pub fn tables(runs: &[Run], opts: &TableOptions) -> Result<Tables> {
    let table = published()?;
    let lay = layout(runs, opts.include_nonrecipe);
    let mut md = String::from("# CIFAR-10 mixup benchmark: our results\n\n");
    md.push_str(
        "Median top-1 test accuracy (%) over the evaluations of epochs E−10..E (11 values, as \
         upstream's summarizer does); AutoMix/SAMix: the best head's median. A cell with \
         several runs (seeds) shows the median over them of each run's metric and their \
         number, `(n=k)`; benchmark.csv has every run and the cell's mean and standard \
         deviation. Method, metric and differences from upstream: docs/benchmark.md.\n\n",
    );
    md.push_str(
        "Only runs on the benchmark recipe (full data, base width 64, standard stage blocks, \
         batch 100, the recipe's optimizer, `max_epochs` as the run's name says, finished) \
         fill the cells",
    );
    if opts.include_nonrecipe {
        md.push_str("; other runs are in rows marked †k, explained under each table.\n\n");
    } else {
        let n = lay
            .left_out
            .iter()
            .filter(|(_, why)| why.starts_with("not the benchmark recipe"))
            .count();
        if n == 0 {
            md.push_str(".\n\n");
        } else {
            let _ = writeln!(
                md,
                "; {n} other run(s) are left out (`cargo xtask report --include-nonrecipe` \
                 shows them, marked †).\n"
            );
        }
    }
    if !lay.failed.is_empty() {
        let _ = writeln!(
            md,
            "{} run(s) failed (diverged, ended without a result, or left records that \
             disagree or cannot be read); they count in no cell: a cell reads `(k failed)` \
             beside its value, or `failed: …` when no run of it counts. They are listed \
             under \"Failed runs\" at the end.\n",
            lay.failed.len()
        );
    }
    if opts.compare_published {
        md.push_str(
            "Cells with a published number (xtask/src/published.csv) read \
             `ours (pub published, ours − published)`.\n",
        );
    }
    let mut csv = format!("{CSV_HEADER}\n");
    for (backbone, rows) in &lay.rows {
        let mut epochs: Vec<usize> = rows.iter().flat_map(|r| r.cells.keys().copied()).collect();
        epochs.sort_unstable();
        epochs.dedup();
        let _ = write!(md, "\n## {}\n\n| Method | α |", backbone_title(*backbone));
        for e in &epochs {
            let _ = write!(md, " {e} ep |");
        }
        md.push_str("\n|---|:---:|");
        md.push_str(&":---:|".repeat(epochs.len()));
        md.push('\n');
        let mut marks: Vec<usize> = Vec::new();
        for row in rows {
            if let Some(k) = row.mark {
                if !marks.contains(&k) {
                    marks.push(k);
                }
            }
            let _ = write!(md, "| {} | {} |", row.marked_label(), row.alpha);
            for e in &epochs {
                let Some(cell) = row.cells.get(e) else {
                    md.push_str(" – |");
                    continue;
                };
                let metrics = cell.metrics();
                let cell_median = cell.median();
                let mut text = cell.text(*e);
                let publ = cell.any_run().and_then(|r| r.published(&table));
                if let (true, Some(p), Some(m)) = (opts.compare_published, publ, cell_median) {
                    let _ = write!(
                        text,
                        " (pub {:.2}, {:+.2})",
                        p.top1_median,
                        m - p.top1_median
                    );
                }
                let _ = write!(md, " {} |", md_cell(&text));
                let two = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_default();
                let cell_fields = [
                    metrics.len().to_string(),
                    two(cell_median),
                    two(mean(&metrics)),
                    two(sample_std(&metrics)),
                    two(publ.map(|p| p.top1_median)),
                    publ.zip(cell_median)
                        .map(|(p, m)| format!("{:+.2}", m - p.top1_median))
                        .unwrap_or_default(),
                ];
                let counted = cell.runs.values().map(|(r, s)| (*r, Some(s)));
                let failed = cell.failed.iter().map(|r| (*r, None));
                for (run, s) in counted.chain(failed) {
                    let status = run.status();
                    let alpha_csv = if row.alpha == "–" {
                        "-".to_string()
                    } else {
                        run.alphas
                            .iter()
                            .map(|a| format!("{a}"))
                            .collect::<Vec<_>>()
                            .join("+")
                    };
                    let last_epoch = run.val.keys().next_back().map(|e| e.to_string());
                    let mut fields = vec![
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
                        run.seed.to_string(),
                        last_epoch.unwrap_or_default(),
                        (status == Status::Finished).to_string(),
                        s.map(|s| s.head.clone()).unwrap_or_default(),
                        two(s.map(|s| s.median)),
                        two(s.and_then(|s| s.median_last_w)),
                        s.map(|s| s.n_values.to_string()).unwrap_or_default(),
                    ];
                    fields.extend(cell_fields.iter().cloned());
                    fields.extend([
                        row.reasons.is_empty().to_string(),
                        row.reasons.join("; "),
                        run.base_width.to_string(),
                        run.stage_blocks
                            .as_ref()
                            .map(|b| {
                                b.iter()
                                    .map(|x| x.to_string())
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            })
                            .unwrap_or_default(),
                        run.batch_size.to_string(),
                        opt_str(&run.limit_train),
                        opt_str(&run.limit_test),
                        run.name.clone(),
                        run.dir.display().to_string(),
                        status.name().to_string(),
                        status.detail(),
                    ]);
                    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                    csv.push_str(&line.join(","));
                    csv.push('\n');
                }
            }
            md.push('\n');
        }
        if !marks.is_empty() {
            md.push('\n');
            for k in marks {
                let _ = writeln!(
                    md,
                    "†{k} Not the benchmark recipe: {}.  ",
                    lay.footnotes[k - 1].join("; ")
                );
            }
        }
    }
    if !lay.failed.is_empty() {
        md.push_str("\n## Failed runs\n\n| Run | Seed | Work dir | Why |\n|---|:---:|---|---|\n");
        for (run, status) in &lay.failed {
            let _ = writeln!(
                md,
                "| `{}` | {} | `{}` | {} |",
                md_cell(&run.name),
                if run.placeable {
                    run.seed.to_string()
                } else {
                    "?".into()
                },
                md_cell(&run.dir.display().to_string()),
                md_cell(&status.detail())
            );
        }
    }
    let mut warnings: Vec<String> = lay
        .failed
        .iter()
        .map(|(run, status)| {
            format!(
                "{} (`{}`): failed: {}",
                run.dir.display(),
                run.name,
                status.detail()
            )
        })
        .collect();
    warnings.extend(lay.left_out.iter().map(|(run, why)| {
        format!(
            "{} (`{}`, seed {}): left out of the table, {why}",
            run.dir.display(),
            run.name,
            run.seed
        )
    }));
    if !opts.include_nonrecipe && lay.left_out.iter().any(|(_, w)| w.starts_with("not the")) {
        warnings.push("--include-nonrecipe shows the non-recipe runs in rows marked †".into());
    }
    warnings.extend(lay.warnings);
    Ok(Tables {
        markdown: md,
        csv,
        warnings,
        failed_runs: lay.failed.len(),
    })
}

/// `s` with every character other than ASCII letters, digits, `-`, `_` and `.` replaced by `_`.
pub fn file_safe(s: &str) -> String {
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

/// File stems of the per-run plots, in `runs` order: `run_<name>_seed<seed>`, and
/// `_2`, `_3`, … appended to later runs that would share a stem (same name and seed
/// in different work directories).
pub fn run_plot_stems(runs: &[Run]) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    runs.iter()
        .map(|run| {
            let stem = format!("run_{}_seed{}", file_safe(&run.name), run.seed);
            let n = seen.entry(stem.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                stem
            } else {
                format!("{stem}_{n}")
            }
        })
        .collect()
}

/// What a per-run plot says of the run under its title: `interrupted at epoch E of N (or
/// still running)`, `no evaluation logged yet (0 of N epochs)`, `FAILED: …`, or nothing for
/// a finished run.
pub fn run_plot_note(run: &Run) -> Option<String> {
    match run.status() {
        Status::Finished => None,
        Status::Unfinished {
            last_epoch: Some(e),
        } => Some(format!(
            "interrupted at epoch {e} of {} (or still running)",
            run.max_epochs
        )),
        Status::Unfinished { last_epoch: None } => Some(format!(
            "no evaluation logged yet (0 of {} epochs)",
            run.max_epochs
        )),
        status @ Status::Failed(_) => Some(format!("FAILED: {}", status.detail())),
    }
}

/// The learning curve of each run of a cell's row: per epoch, the mean, min and max over
/// the counted runs (seeds) of their reported head's test top-1.
fn row_curve(cell: &Cell) -> Vec<(u32, f64, f64, f64)> {
    let mut by_epoch: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (run, s) in cell.runs.values() {
        for (e, heads) in &run.val {
            if let Some(v) = heads.get(&s.head) {
                by_epoch.entry(*e).or_default().push(*v);
            }
        }
    }
    by_epoch
        .into_iter()
        .filter_map(|(e, vals)| {
            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Some((u32::try_from(e).ok()?, mean(&vals)?, lo, hi))
        })
        .collect()
}

/// Writes the plots into `dir` and returns the files:
/// - per run `<stem>.svg` (see [`run_plot_stems`]) with its test top-1 (every head), mean
///   train loss and learning rate per epoch, and [`run_plot_note`] under the title (a run
///   with nothing logged gets the note and a line saying so instead of empty panels);
/// - per table column `curves_<bb>_ep<E>.svg`: the test top-1 learning curve of every row
///   (the reported head; several seeds as their mean with a min–max band);
/// - per table column `compare_<bb>_ep<E>.svg`: each row's value (median over seeds, each
///   seed, the min–max range over seeds) beside the published number.
///
/// Rows are those of the table ([`layout`] with `include_nonrecipe`); failed runs are in
/// neither column figure. A plot that cannot be drawn is skipped with a line in the returned
/// warnings, never stopping the others.
pub fn write_plots(
    runs: &[Run],
    include_nonrecipe: bool,
    dir: &Path,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut written = Vec::new();
    let mut warnings = Vec::new();
    let mut save = |name: String, svg: Result<String>| -> Result<()> {
        let path = dir.join(name);
        match svg {
            Ok(text) => {
                std::fs::write(&path, text)
                    .with_context(|| format!("{}: cannot write", path.display()))?;
                written.push(path);
            }
            Err(e) => warnings.push(format!("{}: not drawn: {e:#}", path.display())),
        }
        Ok(())
    };
    let to_points = |m: BTreeMap<usize, f64>| -> Vec<(u32, f64)> {
        m.into_iter()
            .filter_map(|(e, v)| Some((u32::try_from(e).ok()?, v)))
            .collect()
    };
    for (run, stem) in runs.iter().zip(run_plot_stems(runs)) {
        let mut heads: Vec<&String> = run.val.values().flat_map(|h| h.keys()).collect();
        heads.sort();
        heads.dedup();
        let top1: Vec<Series> = heads
            .iter()
            .map(|h| Series {
                label: h.to_string(),
                points: to_points(
                    run.val
                        .iter()
                        .filter_map(|(e, hs)| hs.get(*h).map(|v| (*e, *v)))
                        .collect(),
                ),
            })
            .collect();
        let one = |label: &str, m| {
            let points = to_points(m);
            if points.is_empty() {
                Vec::new()
            } else {
                vec![Series {
                    label: label.into(),
                    points,
                }]
            }
        };
        let panels = [
            Panel {
                y_label: "test top-1 (%)".into(),
                series: top1,
            },
            Panel {
                y_label: "train loss".into(),
                series: one(
                    "mean of the epoch's train lines",
                    run.train_loss_per_epoch(),
                ),
            },
            Panel {
                y_label: "learning rate".into(),
                series: one("lr", run.lr_per_epoch()),
            },
        ];
        let mut title = if run.placeable {
            format!(
                "{}: {} α={}, seed {}, {} epochs",
                run.name,
                run.modes.join("+"),
                run.alpha_label(),
                run.seed,
                run.max_epochs
            )
        } else {
            run.name.clone()
        };
        if run.placeable && !run.nonrecipe_reasons().is_empty() {
            title.push_str(" (not the recipe)");
        }
        let note = run_plot_note(run);
        save(
            format!("{stem}.svg"),
            epoch_panels(&title, note.as_deref(), &panels),
        )?;
    }
    let table = published()?;
    for (backbone, rows) in layout(runs, include_nonrecipe).rows {
        let mut by_epochs: BTreeMap<usize, (Vec<CompareRow>, Vec<BandSeries>)> = BTreeMap::new();
        for row in &rows {
            for (e, cell) in &row.cells {
                let Some(ours) = cell.median() else {
                    continue;
                };
                let mut label = row.marked_label();
                if row.alpha != "–" {
                    let _ = write!(label, " (α={})", row.alpha);
                }
                let (compare, curves) = by_epochs.entry(*e).or_default();
                compare.push(CompareRow {
                    label: label.clone(),
                    ours,
                    seeds: cell.metrics(),
                    published: cell
                        .any_run()
                        .and_then(|r| r.published(&table))
                        .map(|p| p.top1_median),
                });
                let n = cell.runs.len();
                if n > 1 {
                    let _ = write!(label, ": mean of {n} seeds");
                }
                curves.push(BandSeries {
                    label,
                    points: row_curve(cell),
                });
            }
        }
        for (e, (compare, curves)) in by_epochs {
            let title = format!(
                "{}, {e} epochs: median test top-1 of the last epochs",
                backbone_title(backbone)
            );
            save(
                format!("compare_{}_ep{e}.svg", backbone.tag()),
                comparison(&title, "test top-1 (%)", &compare),
            )?;
            let title = format!(
                "{}, {e} epochs: test top-1 per epoch (band: min–max over seeds)",
                backbone_title(backbone)
            );
            save(
                format!("curves_{}_ep{e}.svg", backbone.tag()),
                band_curves(&title, "test top-1 (%)", &curves),
            )?;
        }
    }
    Ok((written, warnings))
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

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(sample_std(&[1.0]), None);
        assert!((sample_std(&[1.0, 2.0, 6.0]).unwrap() - 7f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn epochs_claimed_by_names() {
        assert_eq!(claimed_epochs("r18_mixups_CE_none_alpha1_ep800"), Some(800));
        assert_eq!(claimed_epochs("r18_mixup"), None);
        assert_eq!(claimed_epochs("x_epoch"), None);
    }
}
