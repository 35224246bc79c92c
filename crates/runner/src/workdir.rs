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
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        lock.flush()?;
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

/// Decides how to start, refusing to overwrite an existing run.
pub fn start_point(
    resume: Option<ResumeMode>,
    resume_from: Option<&Path>,
    work_dir: &WorkDir,
) -> Result<Start> {
    if let Some(p) = resume_from {
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
    flatten("", saved, &mut a);
    flatten("", current, &mut b);
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
