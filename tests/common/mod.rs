//! Helpers shared by the runner's end-to-end test files: tiny configs on real
//! CIFAR-10 images, running the binary, reading its logs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

/// The runner binary, without the caller's `MIXBENCH_CPU_BF16` (the tests that want the bf16
/// emulation set it themselves; the refusal tests must not inherit it).
pub fn runner() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.env_remove("MIXBENCH_CPU_BF16");
    cmd
}

pub fn data_dir(test: &str) -> Option<PathBuf> {
    let dir = cifar_data::cifar10_dir_for_tests();
    if dir.is_none() {
        eprintln!("SKIPPED {test}: set CIFAR10_DIR to a directory with the CIFAR-10 .bin files");
    }
    dir
}

/// A tiny-network config (stem width 8, one block per stage) for smoke runs.
pub fn tiny_config(dir: &Path, data: &Path, modes: Value, alpha: Value, extra: Value) -> PathBuf {
    let mut cfg = json!({
        "model": {
            "mix_mode": modes,
            "alpha": alpha,
            "backbone": {"arch": "resnet18", "base_width": 8, "stage_blocks": [1, 1, 1, 1]},
        },
        "data": {"dir": data, "batch_size": 50, "test_batch_size": 250,
                 "limit_train": 1000, "limit_test": 500, "workers": 1},
        "max_epochs": 3,
        "checkpoint": {"interval": 1},
        "log": {"interval": 5},
        "work_dir": dir.join("work"),
    });
    merge(&mut cfg, extra);
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    path
}

pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    succeeded(cmd.arg("--quiet").output().expect("runner starts"))
}

/// `out`, after asserting that the runner exited 0 (its output in the message if not).
pub fn succeeded(out: Output) -> Output {
    assert!(
        out.status.success(),
        "runner failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every JSON line of the run's log.
pub fn log_lines(work: &Path) -> Vec<Value> {
    let log = std::fs::read_dir(work)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".log.json"))
        .expect("a .log.json file");
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The checkpoint the work dir's `latest` pointer names.
pub fn latest_checkpoint(work: &Path) -> PathBuf {
    let name = std::fs::read_to_string(work.join("latest")).expect("a latest pointer");
    let path = work.join(name.trim());
    assert!(path.is_file(), "{} missing", path.display());
    path
}

pub fn train_losses(lines: &[Value]) -> Vec<(u64, f64)> {
    lines
        .iter()
        .filter(|l| l["mode"] == "train")
        .map(|l| (l["epoch"].as_u64().unwrap(), l["loss"].as_f64().unwrap()))
        .collect()
}

pub fn mean_loss_of_epoch(losses: &[(u64, f64)], epoch: u64) -> f64 {
    let v: Vec<f64> = losses
        .iter()
        .filter(|(e, _)| *e == epoch)
        .map(|(_, l)| *l)
        .collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// Runs the command (quietly) and returns its output, whatever its status.
pub fn run_any(cmd: &mut Command) -> Output {
    cmd.arg("--quiet").output().expect("runner starts")
}

/// The stderr of a run as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The train and val lines of a log without their timing fields, for comparing runs.
pub fn results_only(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l["mode"] == "train" || l["mode"] == "val")
        .map(|l| {
            let mut l = l.clone();
            for k in ["time", "data_time", "memory"] {
                l.as_object_mut().unwrap().remove(k);
            }
            l
        })
        .collect()
}

/// The smallest run that still trains: 200 images in batches of 20, 100 test images.
pub fn small_run() -> Value {
    json!({"max_epochs": 2, "log": {"interval": 1},
           "data": {"limit_train": 200, "limit_test": 100, "batch_size": 20}})
}
