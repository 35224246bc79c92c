//! A run's work directory: the exclusive lock held for the whole run, the
//! choice between starting, resuming and doing nothing, leftovers of killed
//! runs, and the check that a resumed run is still the run it claims to be.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::Value;
use train::checkpoint;

/// How `--resume` picks up a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResumeMode {
    /// Continue from the work dir's latest checkpoint; an error when there is none.
    Latest,
    /// For sweeps that get preempted and requeued: resume when the work dir holds a
    /// checkpoint, start fresh when it holds none, do nothing when the run has finished.
    Auto,
}

/// Name of the lock file inside a work dir.
pub const LOCK_FILE: &str = ".lock";

/// A locked work directory. The lock is an OS file lock, so it is released
/// when the process exits, however it exits.
pub struct WorkDir {
    /// The directory.
    pub path: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// Creates (if needed) and locks `path`; a second run on the same directory
    /// is refused with the holder's pid.
    pub fn open(path: &Path) -> Result<Self> {
        if path.exists() && !path.is_dir() {
            bail!("work_dir {}: is a file, not a directory", path.display());
        }
        std::fs::create_dir_all(path)
            .with_context(|| format!("work_dir {}: cannot create", path.display()))?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("{}: cannot open the lock file", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "work_dir {} is in use by another run (pid {}); wait for it or use another --work-dir",
                    path.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", lock_path.display()));
            }
        }
        (|| {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(lock, "{}", std::process::id())?;
            lock.flush()
        })()
        .with_context(|| format!("{}: cannot write the lock file", lock_path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The final result file.
    pub fn result_path(&self) -> PathBuf {
        self.path.join("result.json")
    }

    /// Removes what killed runs leave behind: temporary files of interrupted
    /// atomic writes and, when a fresh run starts, logs of earlier runs that died
    /// before writing any checkpoint (nothing can resume them).
    pub fn clean_leftovers(&self, fresh: bool) -> Result<()> {
        for p in checkpoint::clean_stale_temp_files(&self.path)? {
            eprintln!("removed {} (left by an interrupted write)", p.display());
        }
        if fresh {
            for entry in std::fs::read_dir(&self.path)? {
                let p = entry?.path();
                if p.to_string_lossy().ends_with(".log.json") {
                    std::fs::remove_file(&p)
                        .with_context(|| format!("{}: cannot remove", p.display()))?;
                    eprintln!(
                        "removed {} (a run that stopped before its first checkpoint)",
                        p.display()
                    );
                }
            }
        }
        Ok(())
    }
}

/// What a training invocation does in its work dir.
#[derive(Debug, PartialEq)]
pub enum Start {
    /// A new run.
    Fresh,
    /// Continue from this checkpoint.
    Resume(PathBuf),
    /// `--resume auto` on a run whose `result.json` exists: nothing to do.
    Finished,
}

/// `--resume-from` must name a checkpoint file.
pub fn check_resume_from(p: &Path) -> Result<()> {
    if p.is_dir() {
        bail!(
            "--resume-from: {} is a directory; name a checkpoint file in it (e.g. {}/epoch_N.safetensors)",
            p.display(),
            p.display()
        );
    }
    if !p.is_file() {
        bail!("--resume-from: {} does not exist", p.display());
    }
    Ok(())
}

/// Reads a finished run's `result.json`, refusing anything a run did not write: not JSON,
/// not a summary object, a missing or out-of-range median, a status other than `finished`.
pub fn read_result(path: &Path) -> std::result::Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read ({e})"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON ({e})"))?;
    if v.get("mode").and_then(Value::as_str) != Some("summary") {
        return Err("not a run summary (no \"mode\": \"summary\")".into());
    }
    if let Some(status) = v.get("status") {
        if status != "finished" {
            return Err(format!("status is {status}, not \"finished\""));
        }
    }
    if v.get("max_epochs").and_then(Value::as_u64).is_none() {
        return Err("no integer max_epochs".into());
    }
    let top1 = |key: &str| v.get(key).and_then(Value::as_f64);
    for key in ["median_top1", "final_top1"] {
        match top1(key) {
            Some(x) if (0.0..=100.0).contains(&x) => {}
            Some(x) => return Err(format!("{key} {x} is not a percentage")),
            None if v.get(key).is_some_and(Value::is_null) => {}
            None => return Err(format!("no {key}")),
        }
    }
    Ok(v)
}

/// `--resume auto` found `result.json`: nothing to do (`None`) when it is a sound record of
/// the requested run. A record that is unreadable is moved aside and the run is resumed from
/// its latest checkpoint, which writes it again; a finished run of another config (another
/// seed, other epochs, …) is an error — except a longer `--epochs`, which extends the run.
pub fn finished_run(
    work_dir: &WorkDir,
    requested: &Value,
    epochs_flag: Option<usize>,
) -> Result<Option<Start>> {
    let path = work_dir.result_path();
    let latest = checkpoint::find_latest_checkpoint(&work_dir.path)?;
    let result = match read_result(&path) {
        Ok(v) => v,
        Err(why) => {
            let Some(ckpt) = latest else {
                bail!(
                    "{}: {why}, and {} holds no checkpoint to finish the run from; remove the file or use another --work-dir",
                    path.display(),
                    work_dir.path.display()
                );
            };
            let kept = work_dir.path.join("result.json.invalid");
            std::fs::rename(&path, &kept)
                .with_context(|| format!("{}: cannot move aside", path.display()))?;
            eprintln!(
                "warning: {}: {why}; kept as {}; resuming from {} to write it again",
                path.display(),
                kept.display(),
                ckpt.display()
            );
            return Ok(Some(Start::Resume(ckpt)));
        }
    };
    // The config the run finished with: in result.json, or (older runs) its last checkpoint.
    let saved = match result.get("config") {
        Some(c @ Value::Object(_)) => Some(c.clone()),
        _ => match &latest {
            Some(ckpt) => checkpoint::read_checkpoint_meta(ckpt)
                .ok()
                .and_then(|m| m.get("config")?.as_str().map(String::from))
                .and_then(|t| serde_json::from_str(&t).ok()),
            None => None,
        },
    };
    let Some(saved) = saved else {
        return Ok(None);
    };
    let mut changed = result_changing_differences(&saved, requested);
    let requested_epochs = requested.get("max_epochs").and_then(Value::as_u64);
    if epochs_flag.is_some() && epochs_flag.map(|e| e as u64) == requested_epochs {
        let before = changed.len();
        changed.retain(|c| !c.starts_with("max_epochs:"));
        if changed.is_empty() && before > 0 {
            // An explicit --epochs N on a finished run: extend it from its last checkpoint.
            return match latest {
                Some(ckpt) => Ok(Some(Start::Resume(ckpt))),
                None => bail!(
                    "--epochs: {} holds no checkpoint to extend the run from",
                    work_dir.path.display()
                ),
            };
        }
    }
    if !changed.is_empty() {
        bail!(
            "work_dir {} holds a finished run of another config ({}); use another --work-dir for this one",
            work_dir.path.display(),
            changed.join("; ")
        );
    }
    Ok(None)
}

/// Decides how to start, refusing to overwrite an existing run.
pub fn start_point(
    resume: Option<ResumeMode>,
    resume_from: Option<&Path>,
    work_dir: &WorkDir,
) -> Result<Start> {
    if let Some(p) = resume_from {
        check_resume_from(p)?;
        return Ok(Start::Resume(p.to_path_buf()));
    }
    let latest = checkpoint::find_latest_checkpoint(&work_dir.path)?;
    let finished = work_dir.result_path().is_file();
    match (resume, latest) {
        (Some(ResumeMode::Auto), _) if finished => Ok(Start::Finished),
        (Some(_), Some(ckpt)) => Ok(Start::Resume(ckpt)),
        (Some(ResumeMode::Auto), None) => Ok(Start::Fresh),
        (Some(ResumeMode::Latest), None) => bail!(
            "--resume: {} holds no checkpoint to resume from",
            work_dir.path.display()
        ),
        (None, latest) if latest.is_some() || finished => bail!(
            "work_dir {} already holds a run; pass --resume to continue it or --work-dir to start elsewhere",
            work_dir.path.display()
        ),
        (None, _) => Ok(Start::Fresh),
    }
}

/// Config fields that cannot change a run's results (cadence, I/O, threads,
/// where the data and outputs live), so a resumed run may change them.
const RESULT_NEUTRAL: &[&str] = &[
    "name",
    "work_dir",
    "data.dir",
    "data.download",
    "data.workers",
    "data.prefetch",
    "log.interval",
    "checkpoint.interval",
    "checkpoint.max_keep",
    "train.deterministic",
];

/// The dotted paths whose values differ between a checkpoint's config and the
/// current one, ignoring [`RESULT_NEUTRAL`] fields.
pub fn result_changing_differences(saved: &Value, current: &Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &with_defaults(saved), &mut a);
    flatten("", &with_defaults(current), &mut b);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !RESULT_NEUTRAL.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &BTreeMap<String, Value>| {
                m.get(k).map_or("(absent)".to_string(), |v| v.to_string())
            };
            format!("{k}: {} -> {}", show(&a), show(&b))
        })
        .collect()
}

/// A stored config with every defaulted section spelled out, so that a section omitted when
/// at its defaults (`train`) compares equal to the same values written out.
fn with_defaults(v: &Value) -> Value {
    let mut v = v.clone();
    if let Value::Object(map) = &mut v {
        if !map.contains_key("train") {
            let defaults =
                serde_json::to_value(bench_config::TrainConfig::default()).expect("serializes");
            map.insert("train".into(), defaults);
        }
    }
    v
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Null => {}
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_second_open_of_a_locked_work_dir_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let _held = WorkDir::open(tmp.path()).unwrap();
        let err = WorkDir::open(tmp.path()).err().unwrap().to_string();
        assert!(
            err.contains("in use by another run") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
    }

    #[test]
    fn the_lock_is_released_with_its_holder() {
        let tmp = tempfile::tempdir().unwrap();
        drop(WorkDir::open(tmp.path()).unwrap());
        WorkDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn a_file_is_not_a_work_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = WorkDir::open(&file).err().unwrap().to_string();
        assert!(err.contains("is a file, not a directory"), "{err}");
    }

    #[test]
    fn differences_ignore_result_neutral_fields() {
        let saved = json!({"seed": 0, "log": {"interval": 50}, "data": {"workers": 2, "limit_train": null}, "optimizer": {"lr": 0.1}});
        let now = json!({"seed": 1, "log": {"interval": 5}, "data": {"workers": 1, "limit_train": 100}, "optimizer": {"lr": 0.1}});
        let d = result_changing_differences(&saved, &now);
        assert_eq!(
            d,
            vec![
                "data.limit_train: (absent) -> 100".to_string(),
                "seed: 0 -> 1".to_string()
            ]
        );
    }

    #[test]
    fn an_omitted_section_equals_its_defaults_written_out() {
        let saved = json!({"seed": 0});
        let now = json!({"seed": 0, "train": {"precision": "tf32", "deterministic": true}});
        assert_eq!(
            result_changing_differences(&saved, &now),
            Vec::<String>::new()
        );
        let now = json!({"seed": 0, "train": {"precision": "f32", "deterministic": false}});
        assert_eq!(
            result_changing_differences(&saved, &now),
            vec!["train.precision: \"tf32\" -> \"f32\"".to_string()]
        );
    }

    #[test]
    fn only_a_sound_result_json_is_a_finished_run() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("result.json");
        let check = |text: &str| {
            std::fs::write(&p, text).unwrap();
            read_result(&p)
        };
        for bad in [
            "",
            "garbage",
            "[]",
            r#"{"mode": "summary"}"#,
            r#"{"mode": "summary", "max_epochs": 2, "median_top1": 200.0, "final_top1": 20.0}"#,
            r#"{"mode": "summary", "max_epochs": 2, "median_top1": 20.0}"#,
            r#"{"mode": "summary", "max_epochs": 2, "median_top1": 20.0, "final_top1": 20.0, "status": "diverged"}"#,
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        check(r#"{"mode": "summary", "max_epochs": 2, "median_top1": 20.5, "final_top1": 21.0}"#)
            .unwrap();
        check(r#"{"mode": "summary", "max_epochs": 2, "median_top1": null, "final_top1": null, "status": "finished"}"#)
            .unwrap();
    }

    #[test]
    fn auto_resume_refuses_a_finished_run_of_another_config_and_extends_with_epochs() {
        let tmp = tempfile::tempdir().unwrap();
        let wd = WorkDir::open(tmp.path()).unwrap();
        let cfg = json!({"seed": 0, "max_epochs": 4});
        std::fs::write(
            wd.result_path(),
            json!({"mode": "summary", "status": "finished", "max_epochs": 4, "median_top1": 20.0,
                   "final_top1": 20.0, "config": cfg})
            .to_string(),
        )
        .unwrap();
        assert_eq!(finished_run(&wd, &cfg, None).unwrap(), None);
        let other_seed = json!({"seed": 1, "max_epochs": 4});
        let e = finished_run(&wd, &other_seed, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("seed: 0 -> 1") && e.contains("another --work-dir"),
            "{e}"
        );
        let longer = json!({"seed": 0, "max_epochs": 8});
        // Longer without --epochs (a config file that says 8): another run.
        assert!(finished_run(&wd, &longer, None).is_err());
        // With --epochs 8: extended from the last checkpoint (none here: an error saying so).
        let e = finished_run(&wd, &longer, Some(8)).unwrap_err().to_string();
        assert!(e.contains("no checkpoint to extend"), "{e}");
        std::fs::write(tmp.path().join("epoch_4.safetensors"), b"x").unwrap();
        assert!(matches!(
            finished_run(&wd, &longer, Some(8)).unwrap(),
            Some(Start::Resume(_))
        ));
    }

    #[test]
    fn an_unreadable_result_json_is_kept_aside_and_the_run_resumed() {
        let tmp = tempfile::tempdir().unwrap();
        let wd = WorkDir::open(tmp.path()).unwrap();
        std::fs::write(wd.result_path(), "").unwrap();
        let e = finished_run(&wd, &json!({}), None).unwrap_err().to_string();
        assert!(e.contains("no checkpoint to finish the run from"), "{e}");
        assert!(
            wd.result_path().is_file(),
            "kept when nothing can replace it"
        );
        std::fs::write(tmp.path().join("epoch_2.safetensors"), b"x").unwrap();
        assert!(matches!(
            finished_run(&wd, &json!({}), None).unwrap(),
            Some(Start::Resume(_))
        ));
        assert!(!wd.result_path().exists());
        assert!(tmp.path().join("result.json.invalid").is_file());
    }

    #[test]
    fn auto_resume_starts_fresh_resumes_or_does_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let wd = WorkDir::open(tmp.path()).unwrap();
        let auto = Some(ResumeMode::Auto);
        assert_eq!(start_point(auto, None, &wd).unwrap(), Start::Fresh);
        std::fs::write(tmp.path().join("epoch_1.safetensors"), b"x").unwrap();
        assert!(matches!(
            start_point(auto, None, &wd).unwrap(),
            Start::Resume(_)
        ));
        assert!(start_point(None, None, &wd).is_err());
        std::fs::write(wd.result_path(), b"{}").unwrap();
        assert_eq!(start_point(auto, None, &wd).unwrap(), Start::Finished);
    }

    #[test]
    fn resume_from_a_directory_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let wd = WorkDir::open(&tmp.path().join("w")).unwrap();
        let err = start_point(None, Some(tmp.path()), &wd)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a directory"), "{err}");
    }
}
