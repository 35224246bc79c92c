//! The JSON-lines training log (spec §8.3): `<work_dir>/<YYYYmmdd_HHMMSS>.log.json`.
//!
//! Line 1 is the run meta (`env_info`, `config`, `seed`, `exp_name`); then `train` lines
//! (metrics averaged over the log interval) and one `val` line per epoch. Floats are rounded
//! to 5 decimals like mmcv's JSON logger; keys keep mmcv's order and separators (`", "`,
//! `": "`). Non-finite floats, which JSON cannot represent, are written as `null`. The file
//! name uses UTC (mmcv uses local time; this crate has no time-zone database).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::error::{TrainError, TrainResult};

/// Rounds to 5 decimals (mmcv's `round(x, 5)`).
pub fn round5(x: f64) -> f64 {
    (x * 1e5).round() / 1e5
}

/// `YYYYmmdd_HHMMSS` (UTC) of `time`.
pub fn timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}{month:02}{day:02}_{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Serializes `value` with floats rounded to 5 decimals and Python's `json.dumps` separators.
fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x.is_finite() {
                out.push_str(&Value::from(round5(x)).to_string());
            } else {
                out.push_str("null");
            }
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => write_fields(out, map.iter().map(|(k, v)| (k.as_str(), v))),
        other => out.push_str(&other.to_string()),
    }
}

fn write_fields<'a>(out: &mut String, fields: impl Iterator<Item = (&'a str, &'a Value)>) {
    out.push('{');
    for (i, (key, value)) in fields.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&Value::from(key).to_string());
        out.push_str(": ");
        write_value(out, value);
    }
    out.push('}');
}

/// One `train` line: metrics averaged over the last log interval.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainLine {
    /// 1-based epoch.
    pub epoch: usize,
    /// 1-based iteration within the epoch (50, 100, …).
    pub iter: usize,
    /// Learning rate in use.
    pub lr: f64,
    /// Peak device memory in MB, when known (omitted otherwise).
    pub memory_mb: Option<u64>,
    /// Mean data-loading time per iteration, seconds.
    pub data_time: f64,
    /// The averaged metrics in logging order (`loss`, `acc`, `acc_mix`, … ).
    pub metrics: Vec<(String, f64)>,
    /// Mean total time per iteration, seconds.
    pub time: f64,
}

/// One row of a run's per-epoch `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRow {
    /// 1-based epoch.
    pub epoch: usize,
    /// Learning rate of the epoch.
    pub lr: f64,
    /// Mean train loss over the epoch's images.
    pub train_loss: f64,
    /// Mean train top-1 (%) against the first label.
    pub train_acc: f64,
    /// `(head, top-1 %, top-5 %)` per evaluated head; empty when the epoch was not evaluated.
    pub heads: Vec<(String, f64, f64)>,
    /// Wall-clock seconds of the epoch's training (evaluation excluded).
    pub epoch_seconds: f64,
    /// Training images per second over the epoch.
    pub img_per_s: f64,
}

/// The per-epoch `metrics.csv` beside the JSON-lines log: one row per epoch, with a column
/// pair per evaluated head fixed when the file is created (an epoch without evaluation leaves
/// them empty, so every row has the header's fields).
pub struct EpochCsv {
    path: PathBuf,
    heads: Vec<String>,
}

impl EpochCsv {
    /// File name inside the work dir.
    pub const FILE: &'static str = "metrics.csv";

    /// Opens `work_dir/metrics.csv` for a run evaluating `heads`, keeping only complete rows of
    /// epochs `<= keep_through` (a resumed run repeats the epochs after its checkpoint, and a
    /// row torn by a crash — no newline, or fewer fields than the header — is dropped; its
    /// epoch is trained again). An existing header's head columns are kept.
    pub fn open(work_dir: &Path, keep_through: usize, heads: &[&str]) -> TrainResult<Self> {
        let path = work_dir.join(Self::FILE);
        let mut heads: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
            let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
            // A last line without its newline was cut off mid-write.
            if lines.last().is_some_and(|l| !l.ends_with('\n')) {
                lines.pop();
            }
            let mut kept = String::new();
            if let Some(header) = lines.first().map(|l| l.trim_end()) {
                let fields = header.split(',').count();
                heads = header
                    .split(',')
                    .filter_map(|f| f.strip_suffix("_top1"))
                    .map(String::from)
                    .collect();
                for line in lines.iter().skip(1).map(|l| l.trim_end()) {
                    let epoch = line.split(',').next().and_then(|e| e.parse::<usize>().ok());
                    if line.split(',').count() == fields && epoch.is_some_and(|e| e <= keep_through)
                    {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
                if !kept.is_empty() {
                    kept.insert_str(0, &format!("{header}\n"));
                }
            }
            crate::checkpoint::write_atomically(&path, |tmp| {
                std::fs::write(tmp, &kept).map_err(|e| TrainError::io(tmp, e))
            })?;
        }
        Ok(Self { path, heads })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a row (and the header first, for a new file).
    pub fn write(&mut self, row: &EpochRow) -> TrainResult<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| TrainError::io(&self.path, e))?;
        let empty = file.metadata().map(|m| m.len() == 0).unwrap_or(true);
        let mut text = String::new();
        if empty {
            text.push_str("epoch,lr,train_loss,train_acc");
            for h in &self.heads {
                text.push_str(&format!(",{h}_top1,{h}_top5"));
            }
            text.push_str(",epoch_seconds,img_per_s\n");
        }
        text.push_str(&format!(
            "{},{},{},{}",
            row.epoch,
            round5(row.lr),
            round5(row.train_loss),
            round5(row.train_acc)
        ));
        for h in &self.heads {
            match row.heads.iter().find(|(name, _, _)| name == h) {
                Some((_, t1, t5)) => text.push_str(&format!(",{},{}", round5(*t1), round5(*t5))),
                None => text.push_str(",,"),
            }
        }
        text.push_str(&format!(",{:.3},{:.1}\n", row.epoch_seconds, row.img_per_s));
        file.write_all(text.as_bytes())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Appends JSON lines to a run's log file.
pub struct JsonLogger {
    path: PathBuf,
    file: File,
    /// The partial last line [`JsonLogger::append`] cut off (lossy UTF-8), and its length.
    dropped: (u64, String),
}

impl JsonLogger {
    /// Creates a new log `<work_dir>/<YYYYmmdd_HHMMSS>.log.json` (UTC now). Fails rather than
    /// overwrite an existing file.
    pub fn create(work_dir: &Path) -> TrainResult<Self> {
        std::fs::create_dir_all(work_dir).map_err(|e| TrainError::io(work_dir, e))?;
        let path = work_dir.join(format!("{}.log.json", timestamp(SystemTime::now())));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(Self {
            path,
            file,
            dropped: (0, String::new()),
        })
    }

    /// Opens an existing log to continue it (resume); creates it if absent.
    ///
    /// A crash or a full disk can leave the file ending in part of a line; that partial line
    /// is cut off first (the file is truncated after its last `\n`), so the next line starts
    /// on a line of its own. What was cut is reported by [`JsonLogger::dropped_bytes`] and
    /// [`JsonLogger::dropped_text`], for the caller to mention.
    pub fn append(path: &Path) -> TrainResult<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        let dropped = cut_partial_last_line(&mut file).map_err(|e| TrainError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            dropped,
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of bytes [`JsonLogger::append`] cut from the end of the file (a partial last
    /// line without its newline); 0 when the file ended with a complete line.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped.0
    }

    /// The partial last line [`JsonLogger::append`] cut off, as lossy UTF-8 (empty when
    /// nothing was cut).
    pub fn dropped_text(&self) -> &str {
        &self.dropped.1
    }

    /// Writes one line with the given fields in order (floats rounded to 5 decimals).
    pub fn write_fields(&mut self, fields: &[(&str, Value)]) -> TrainResult<()> {
        let mut line = String::new();
        write_fields(&mut line, fields.iter().map(|(k, v)| (*k, v)));
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// Writes the first line: the run meta.
    pub fn write_meta(
        &mut self,
        env_info: &str,
        config: &str,
        seed: u64,
        exp_name: &str,
    ) -> TrainResult<()> {
        self.write_fields(&[
            ("env_info", Value::from(env_info)),
            ("config", Value::from(config)),
            ("seed", Value::from(seed)),
            ("exp_name", Value::from(exp_name)),
        ])
    }

    /// Writes a `train` line.
    pub fn write_train(&mut self, line: &TrainLine) -> TrainResult<()> {
        let mut fields: Vec<(&str, Value)> = vec![
            ("mode", Value::from("train")),
            ("epoch", Value::from(line.epoch)),
            ("iter", Value::from(line.iter)),
            ("lr", Value::from(line.lr)),
        ];
        if let Some(mb) = line.memory_mb {
            fields.push(("memory", Value::from(mb)));
        }
        fields.push(("data_time", Value::from(line.data_time)));
        for (key, value) in &line.metrics {
            fields.push((key.as_str(), Value::from(*value)));
        }
        fields.push(("time", Value::from(line.time)));
        self.write_fields(&fields)
    }

    /// Writes a `val` line for 1-based `epoch` (`iter` = number of validation batches).
    pub fn write_val(
        &mut self,
        epoch: usize,
        iter: usize,
        lr: f64,
        metrics: &[(String, f64)],
    ) -> TrainResult<()> {
        let mut fields: Vec<(&str, Value)> = vec![
            ("mode", Value::from("val")),
            ("epoch", Value::from(epoch)),
            ("iter", Value::from(iter)),
            ("lr", Value::from(lr)),
        ];
        for (key, value) in metrics {
            fields.push((key.as_str(), Value::from(*value)));
        }
        self.write_fields(&fields)
    }
}

/// Truncates `file` after its last `\n` (to empty if it has none) and returns the number of
/// bytes removed with their lossy UTF-8 text. Reads backwards from the end in blocks, so a
/// long log is not read whole.
fn cut_partial_last_line(file: &mut File) -> std::io::Result<(u64, String)> {
    const BLOCK: u64 = 4096;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut keep = 0;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if keep == len {
        return Ok((0, String::new()));
    }
    let mut tail = vec![0u8; (len - keep) as usize];
    file.seek(SeekFrom::Start(keep))?;
    file.read_exact(&mut tail)?;
    file.set_len(keep)?;
    file.sync_all()?;
    Ok((len - keep, String::from_utf8_lossy(&tail).into_owned()))
}

/// Batch-size-weighted running means of named metrics over a log interval.
#[derive(Debug, Clone, Default)]
pub struct RunningMean {
    // (name, Σ value·count, Σ count), in first-seen order.
    entries: Vec<(String, f64, f64)>,
}

impl RunningMean {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` observed on a batch of `count` samples.
    pub fn update(&mut self, key: &str, value: f64, count: usize) {
        let weight = count as f64;
        match self.entries.iter_mut().find(|(k, _, _)| k == key) {
            Some((_, sum, total)) => {
                *sum += value * weight;
                *total += weight;
            }
            None => self.entries.push((key.to_string(), value * weight, weight)),
        }
    }

    /// Adds several metrics of the same batch.
    pub fn update_all(&mut self, values: &[(&str, f64)], count: usize) {
        for (key, value) in values {
            self.update(key, *value, count);
        }
    }

    /// The weighted mean of `key`, if it was observed with a non-zero count.
    pub fn mean(&self, key: &str) -> Option<f64> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .filter(|(_, _, total)| *total > 0.0)
            .map(|(_, sum, total)| sum / total)
    }

    /// All weighted means in first-seen order.
    pub fn means(&self) -> Vec<(String, f64)> {
        self.entries
            .iter()
            .filter(|(_, _, total)| *total > 0.0)
            .map(|(k, sum, total)| (k.clone(), sum / total))
            .collect()
    }

    /// Whether nothing has been observed since the last [`RunningMean::clear`].
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything (start of a new log interval).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Reads a JSON-lines log. Blank lines are skipped; an unparsable final line without a
/// trailing newline (a write cut short by a crash) is dropped; any other unparsable line is
/// an error naming the file and line number.
pub fn read_log(path: &Path) -> TrainResult<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let complete_last_line = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut values = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => values.push(v),
            Err(_) if i + 1 == lines.len() && !complete_last_line => {}
            Err(e) => return Err(TrainError::format(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(values)
}

/// A log line [`read_log_lenient`] skipped: its 1-based line number and why.
pub type SkippedLine = (usize, String);

/// Reads a JSON-lines log like [`read_log`], but skips every unparsable line instead of
/// failing, returning the parsed values and the skipped lines as `(1-based line number,
/// reason)`. A torn final line (no trailing newline) is reported as skipped too. Invalid
/// UTF-8 is replaced by U+FFFD before parsing; only an I/O error is an error.
pub fn read_log_lenient(path: &Path) -> TrainResult<(Vec<Value>, Vec<SkippedLine>)> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let complete_last_line = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut values = Vec::with_capacity(lines.len());
    let mut skipped = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => values.push(v),
            Err(_) if i + 1 == lines.len() && !complete_last_line => {
                skipped.push((i + 1, "truncated last line (no newline)".to_string()));
            }
            Err(e) => skipped.push((i + 1, format!("not JSON: {e}"))),
        }
    }
    Ok((values, skipped))
}

/// `(epoch, value)` of metric `key` over the `val` lines, sorted by epoch; when an epoch was
/// evaluated more than once (a resumed run), the later line wins.
pub fn val_metric_history(lines: &[Value], key: &str) -> Vec<(usize, f64)> {
    let mut by_epoch = BTreeMap::new();
    for line in lines {
        if line.get("mode").and_then(Value::as_str) != Some("val") {
            continue;
        }
        let epoch = line.get("epoch").and_then(Value::as_u64);
        let value = line.get(key).and_then(Value::as_f64);
        if let (Some(epoch), Some(value)) = (epoch, value) {
            by_epoch.insert(epoch as usize, value);
        }
    }
    by_epoch.into_iter().collect()
}

/// [`val_metric_history`] of `head0_top1`, the MixUpClassification top-1 accuracy.
pub fn val_top1_history(lines: &[Value]) -> Vec<(usize, f64)> {
    val_metric_history(lines, "head0_top1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_times() {
        assert_eq!(timestamp(UNIX_EPOCH), "19700101_000000");
        // 2000-02-29 12:34:56 UTC = 951827696.
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(951_827_696)),
            "20000229_123456"
        );
        // 2026-11-24 20:34:15 UTC = 1795552455.
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1_795_552_455)),
            "20261124_203415"
        );
    }

    #[test]
    fn lines_round_floats_and_keep_field_order() {
        let dir = std::env::temp_dir().join(format!("train-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut log = JsonLogger::create(&dir).unwrap();
        let name = log
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            name.ends_with(".log.json") && name.len() == "YYYYmmdd_HHMMSS.log.json".len(),
            "{name}"
        );
        log.write_meta("candle 0.11.1", "{\"a\": 1}", 0, "r18_mixup")
            .unwrap();
        log.write_train(&TrainLine {
            epoch: 1,
            iter: 50,
            lr: 0.1,
            memory_mb: Some(1234),
            data_time: 0.0123456,
            metrics: vec![
                ("loss".into(), 2.123456789),
                ("acc".into(), 12.5),
                ("acc_mix".into(), f64::NAN),
            ],
            time: 0.1000049,
        })
        .unwrap();
        log.write_val(
            1,
            100,
            0.09999383,
            &[("head0_top1".into(), 41.23456), ("head0_top5".into(), 90.0)],
        )
        .unwrap();
        drop(log);
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"env_info": "candle 0.11.1", "config": "{\"a\": 1}", "seed": 0, "exp_name": "r18_mixup"}"#
        );
        assert_eq!(
            lines[1],
            r#"{"mode": "train", "epoch": 1, "iter": 50, "lr": 0.1, "memory": 1234, "data_time": 0.01235, "loss": 2.12346, "acc": 12.5, "acc_mix": null, "time": 0.1}"#
        );
        assert_eq!(
            lines[2],
            r#"{"mode": "val", "epoch": 1, "iter": 100, "lr": 0.09999, "head0_top1": 41.23456, "head0_top5": 90.0}"#
        );

        // Resume appends; a torn last line is ignored by the reader; duplicates → later wins.
        let mut log = JsonLogger::append(&dir.join(&name)).unwrap();
        log.write_val(2, 100, 0.05, &[("head0_top1".into(), 50.0)])
            .unwrap();
        log.write_val(1, 100, 0.1, &[("head0_top1".into(), 45.0)])
            .unwrap();
        drop(log);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(&name))
            .unwrap();
        f.write_all(b"{\"mode\": \"va").unwrap();
        let parsed = read_log(&dir.join(&name)).unwrap();
        assert_eq!(parsed.len(), 5);
        assert_eq!(val_top1_history(&parsed), vec![(1, 45.0), (2, 50.0)]);
        assert_eq!(val_metric_history(&parsed, "head0_top5"), vec![(1, 90.0)]);

        // A corrupt line in the middle is an error naming the file and line.
        std::fs::write(dir.join("bad.log.json"), "{}\nnot json\n{}\n").unwrap();
        let err = read_log(&dir.join("bad.log.json")).unwrap_err().to_string();
        assert!(
            err.contains("bad.log.json") && err.contains("line 2"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn append_cuts_a_partial_last_line_first() {
        let dir = std::env::temp_dir().join(format!("train-log-append-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.log.json");
        let complete = "{\"a\": 1}\n{\"mode\": \"val\", \"epoch\": 1}\n";
        std::fs::write(&path, format!("{complete}{{\"mode\": \"tr")).unwrap();
        let mut log = JsonLogger::append(&path).unwrap();
        assert_eq!(log.dropped_bytes(), "{\"mode\": \"tr".len() as u64);
        assert_eq!(log.dropped_text(), "{\"mode\": \"tr");
        log.write_val(2, 10, 0.1, &[("head0_top1".into(), 50.0)])
            .unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(complete), "{text}");
        assert_eq!(read_log(&path).unwrap().len(), 3);

        // A complete file is left alone.
        let log = JsonLogger::append(&path).unwrap();
        assert_eq!((log.dropped_bytes(), log.dropped_text()), (0, ""));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

        // A partial line longer than the read block, after a newline in an earlier block.
        let long = format!("{{\"x\": \"{}", "y".repeat(10_000));
        std::fs::write(&path, format!("{complete}{long}")).unwrap();
        let log = JsonLogger::append(&path).unwrap();
        assert_eq!(log.dropped_bytes(), long.len() as u64);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), complete);

        // No newline at all: everything goes; a missing file is created empty.
        std::fs::write(&path, "{\"env_in").unwrap();
        let log = JsonLogger::append(&path).unwrap();
        assert_eq!(log.dropped_bytes(), 8);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        let fresh = dir.join("new.log.json");
        let log = JsonLogger::append(&fresh).unwrap();
        assert_eq!(log.dropped_bytes(), 0);
        assert!(fresh.is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lenient_reading_skips_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("train-log-lenient-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.log.json");
        std::fs::write(
            &path,
            "{\"a\": 1}\nnot json\n\n{\"mode\": \"val\", \"epoch\": 1, \"head0_top1\": 5.0}\n{\"b\": \n{\"c\": 3}\n{\"mode\"",
        )
        .unwrap();
        assert!(read_log(&path).is_err());
        let (values, skipped) = read_log_lenient(&path).unwrap();
        assert_eq!(values.len(), 3);
        assert_eq!(val_top1_history(&values), vec![(1, 5.0)]);
        let lines: Vec<usize> = skipped.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![2, 5, 7]);
        assert!(skipped[0].1.contains("not JSON"), "{:?}", skipped);
        assert!(skipped[2].1.contains("truncated"), "{:?}", skipped);
        assert!(read_log_lenient(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn running_mean_weights_by_batch_size() {
        let mut m = RunningMean::new();
        m.update_all(&[("loss", 2.0), ("acc", 50.0)], 100);
        m.update_all(&[("loss", 1.0)], 300);
        assert_eq!(m.mean("loss"), Some(1.25));
        assert_eq!(m.mean("acc"), Some(50.0));
        assert_eq!(
            m.means(),
            vec![("loss".to_string(), 1.25), ("acc".to_string(), 50.0)]
        );
        m.clear();
        assert!(m.is_empty() && m.mean("loss").is_none());
    }

    #[test]
    fn epoch_csv_writes_a_header_and_drops_epochs_a_resume_repeats() {
        let dir = std::env::temp_dir().join(format!("train-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let row = |epoch| EpochRow {
            epoch,
            lr: 0.1,
            train_loss: 2.0,
            train_acc: 30.0,
            heads: vec![("head0".into(), 40.0, 90.0)],
            epoch_seconds: 1.5,
            img_per_s: 100.0,
        };
        let mut csv = EpochCsv::open(&dir, 0, &["head0"]).unwrap();
        for e in 1..=3 {
            csv.write(&row(e)).unwrap();
        }
        let text = std::fs::read_to_string(csv.path()).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            "epoch,lr,train_loss,train_acc,head0_top1,head0_top5,epoch_seconds,img_per_s"
        );
        assert_eq!(text.lines().nth(1).unwrap(), "1,0.1,2,30,40,90,1.500,100.0");
        let mut csv = EpochCsv::open(&dir, 2, &["head0"]).unwrap();
        csv.write(&row(3)).unwrap();
        let text = std::fs::read_to_string(csv.path()).unwrap();
        let epochs: Vec<&str> = text.lines().skip(1).map(|l| &l[..1]).collect();
        assert_eq!(epochs, ["1", "2", "3"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn epoch_csv_drops_torn_rows_and_keeps_columns_of_unevaluated_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let row = |epoch, heads: Vec<(String, f64, f64)>| EpochRow {
            epoch,
            lr: 0.1,
            train_loss: 2.0,
            train_acc: 30.0,
            heads,
            epoch_seconds: 1.5,
            img_per_s: 100.0,
        };
        // The first epoch is not evaluated: the head columns are there all the same.
        let mut csv = EpochCsv::open(dir.path(), 0, &["head0"]).unwrap();
        csv.write(&row(1, vec![])).unwrap();
        csv.write(&row(2, vec![("head0".into(), 40.0, 90.0)]))
            .unwrap();
        let text = std::fs::read_to_string(csv.path()).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "epoch,lr,train_loss,train_acc,head0_top1,head0_top5,epoch_seconds,img_per_s",
                "1,0.1,2,30,,,1.500,100.0",
                "2,0.1,2,30,40,90,1.500,100.0",
            ]
        );
        // A crash tore the row of epoch 12 after its first character: `1` must not pass as
        // epoch 1's row, nor a complete-looking row without its newline.
        for torn in ["1", "1,0.1,2,30,40,90,1.500,100.0"] {
            std::fs::write(csv.path(), format!("{text}{torn}")).unwrap();
            EpochCsv::open(dir.path(), 20, &["head0"]).unwrap();
            assert_eq!(std::fs::read_to_string(csv.path()).unwrap(), text, "{torn}");
        }
        std::fs::write(csv.path(), format!("{text}3,0.1,2\n")).unwrap();
        EpochCsv::open(dir.path(), 20, &["head0"]).unwrap();
        assert_eq!(std::fs::read_to_string(csv.path()).unwrap(), text);
    }
}
