//! Results that cannot lie and runs that cannot collide (tiny networks, real
//! CIFAR-10, CPU): divergence, the work-dir lock, resume checks, checkpoint
//! integrity, leftovers, `--resume auto` and interrupts.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn files_named(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| pred(n))
        .collect();
    v.sort();
    v
}

/// A small MixUp run stopped after its first epoch (resumable): its temp dir and config.
fn stopped_after_one_epoch(test: &str) -> Option<(tempfile::TempDir, std::path::PathBuf)> {
    let data = data_dir(test)?;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &data, json!("mixup"), json!(1.0), small_run());
    run_ok(
        runner()
            .arg("--config")
            .arg(&cfg)
            .args(["--stop-after", "1"]),
    );
    Some((tmp, cfg))
}

#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let Some((tmp, cfg)) = stopped_after_one_epoch("divergence") else {
        return;
    };
    let work = tmp.path().join("work");
    let good = std::fs::read(work.join("epoch_1.safetensors")).unwrap();

    // The same run continued with lr 1e6 (an explicit, logged config change) diverges.
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["optimizer"] = json!({"lr": 1e6});
    std::fs::write(&cfg, c.to_string()).unwrap();
    let out = run_any(
        runner()
            .arg("--config")
            .arg(&cfg)
            .args(["--resume", "--allow-config-change"]),
    );
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("training diverged") && err.contains("epoch 2, iteration"),
        "{err}"
    );
    assert!(
        err.contains("epoch_1.safetensors"),
        "names the last good one: {err}"
    );
    assert_eq!(
        err.trim().lines().last().unwrap().matches("error:").count(),
        1
    );
    assert_eq!(
        std::fs::read(work.join("epoch_1.safetensors")).unwrap(),
        good
    );
    assert_eq!(
        files_named(&work, |n| n.ends_with(".safetensors")),
        vec!["epoch_1.safetensors"]
    );
    assert!(!work.join("result.json").exists());
    // No val line reports an accuracy from the diverged weights.
    let vals: Vec<Value> = log_lines(&work)
        .into_iter()
        .filter(|l| l["mode"] == "val")
        .collect();
    assert_eq!(vals.len(), 1, "{vals:?}");
}

#[test]
fn a_fresh_run_with_a_huge_lr_fails_without_a_result() {
    let Some(data) = data_dir("divergence_fresh") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut extra = small_run();
    extra["optimizer"] = json!({"lr": 1e6});
    let cfg = tiny_config(tmp.path(), &data, json!("vanilla"), json!(1.0), extra);
    let out = run_any(runner().arg("--config").arg(&cfg));
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("training diverged"),
        "{}",
        stderr_of(&out)
    );
    let work = tmp.path().join("work");
    assert!(files_named(&work, |n| n.ends_with(".safetensors")).is_empty());
    assert!(!work.join("result.json").exists());
}

#[test]
fn a_locked_work_dir_is_refused_with_the_holders_pid() {
    let Some(data) = data_dir("lock") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &data, json!("vanilla"), json!(1.0), small_run());
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut lock = std::fs::File::create(work.join(".lock")).unwrap();
    lock.try_lock().unwrap();
    writeln!(lock, "4242").unwrap();
    let out = run_any(runner().arg("--config").arg(&cfg));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("in use by another run (pid 4242)"), "{err}");
    drop(lock);
    run_ok(runner().arg("--config").arg(&cfg));
}

#[test]
fn resume_refuses_a_changed_config_unless_told() {
    let Some((_tmp, cfg)) = stopped_after_one_epoch("resume_config") else {
        return;
    };
    let out = run_any(runner().arg("--config").arg(&cfg).args([
        "--resume",
        "--seed",
        "7",
        "--limit-train",
        "100",
    ]));
    let err = stderr_of(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("seed: 0 -> 7") && err.contains("data.limit_train: 200 -> 100"),
        "{err}"
    );
    // Fields that cannot change results may differ.
    run_ok(
        runner()
            .arg("--config")
            .arg(&cfg)
            .args(["--resume", "--log-interval", "3"]),
    );
}

#[test]
fn an_explicit_config_change_is_logged() {
    let Some((tmp, cfg)) = stopped_after_one_epoch("resume_config_override") else {
        return;
    };
    run_ok(runner().arg("--config").arg(&cfg).args([
        "--resume",
        "--seed",
        "7",
        "--allow-config-change",
    ]));
    let lines = log_lines(&tmp.path().join("work"));
    let change = lines
        .iter()
        .find(|l| l["mode"] == "config_change")
        .expect("a config_change line");
    assert_eq!(change["changed"], json!(["seed: 0 -> 7"]));
}

#[test]
fn a_half_written_log_line_is_cut_before_resuming() {
    let Some((tmp, cfg)) = stopped_after_one_epoch("torn_log") else {
        return;
    };
    let work = tmp.path().join("work");
    let log = files_named(&work, |n| n.ends_with(".log.json")).remove(0);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(work.join(&log))
        .unwrap();
    f.write_all(b"{\"mode\": \"train\", \"epo").unwrap();
    drop(f);
    run_ok(runner().arg("--config").arg(&cfg).arg("--resume"));
    // Every line parses (log_lines unwraps each one) and the run finished.
    let lines = log_lines(&work);
    assert!(lines.last().unwrap()["median_top1"].is_number());
}

#[test]
fn resume_from_into_a_new_work_dir_writes_a_meta_line() {
    let Some((tmp, cfg)) = stopped_after_one_epoch("resume_from") else {
        return;
    };
    let ckpt = latest_checkpoint(&tmp.path().join("work"));
    let other = tmp.path().join("other");
    run_ok(
        runner()
            .arg("--config")
            .arg(&cfg)
            .arg("--resume-from")
            .arg(&ckpt)
            .arg("--work-dir")
            .arg(&other),
    );
    let lines = log_lines(&other);
    assert!(lines[0]["env_info"].is_string() && lines[0]["config"].is_string());
    // The config's default precision is "tf32"; the CPU computes f32, and the log says so.
    assert_eq!(lines[0]["precision"], "f32", "{}", lines[0]);
    assert!(
        lines[0]["model"]
            .as_str()
            .is_some_and(|m| m.contains("device cpu (f32)")),
        "{}",
        lines[0]
    );
    assert!(lines.iter().any(|l| l["mode"] == "val"));
}

#[test]
fn a_corrupt_latest_checkpoint_is_refused_and_older_ones_named() {
    let Some(data) = data_dir("corrupt_checkpoint") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut extra = small_run();
    extra["max_epochs"] = json!(3);
    extra["checkpoint"] = json!({"interval": 1, "max_keep": 2});
    let cfg = tiny_config(tmp.path(), &data, json!("vanilla"), json!(1.0), extra);
    run_ok(
        runner()
            .arg("--config")
            .arg(&cfg)
            .args(["--stop-after", "2"]),
    );
    let work = tmp.path().join("work");
    let latest = latest_checkpoint(&work);
    let mut bytes = std::fs::read(&latest).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x01;
    std::fs::write(&latest, bytes).unwrap();
    let out = run_any(runner().arg("--config").arg(&cfg).arg("--resume"));
    let err = stderr_of(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("epoch_2.safetensors")
            && err.contains("epoch_1.safetensors")
            && err.contains("--resume-from"),
        "{err}"
    );
    let ok = work.join("epoch_1.safetensors");
    run_ok(
        runner()
            .arg("--config")
            .arg(&cfg)
            .arg("--resume-from")
            .arg(&ok),
    );
}

#[test]
fn leftovers_of_killed_runs_are_cleaned_at_start() {
    let Some(data) = data_dir("leftovers") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &data, json!("vanilla"), json!(1.0), small_run());
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join(".tmpAbC123"), vec![0u8; 1000]).unwrap();
    std::fs::write(work.join("epoch_1.safetensors.tmp"), b"partial").unwrap();
    std::fs::write(
        work.join("20260101_000000.log.json"),
        b"{\"env_info\": \"x\"}\n",
    )
    .unwrap();
    run_ok(runner().arg("--config").arg(&cfg));
    let names = files_named(&work, |_| true);
    assert!(
        !names
            .iter()
            .any(|n| n.contains("tmp") || n.starts_with("20260101")),
        "{names:?}"
    );
}

#[test]
fn resume_auto_starts_resumes_and_skips_finished_runs() {
    let Some(data) = data_dir("resume_auto") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &data, json!("mixup"), json!(1.0), small_run());
    let auto = || {
        let mut c = runner();
        c.arg("--config").arg(&cfg).args(["--resume", "auto"]);
        c
    };
    run_ok(auto().args(["--stop-after", "1"]));
    run_ok(&mut auto());
    let work = tmp.path().join("work");
    let result = std::fs::read(work.join("result.json")).unwrap();
    let out = run_ok(&mut auto());
    assert!(
        stderr_of(&out).contains("nothing to do"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(std::fs::read(work.join("result.json")).unwrap(), result);
}

#[test]
fn bad_inputs_fail_with_one_line_naming_the_field() {
    let Some(data) = data_dir("bad_inputs") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a_file = tmp.path().join("a_file");
    std::fs::write(&a_file, "x").unwrap();
    let cases: Vec<(Value, Vec<&str>, &str)> = vec![
        (
            json!({"data": {"limit_test": 0}}),
            vec![],
            "data.limit_test",
        ),
        (
            json!({"data": {"test_batch_size": 0}}),
            vec![],
            "data.test_batch_size",
        ),
        (
            json!({"model": {"head": {"num_classes": 5}}}),
            vec![],
            "model.head.num_classes",
        ),
        (
            json!({"model": {"mix_repeat": 0}}),
            vec![],
            "model.mix_repeat",
        ),
        (
            json!({"name": "../escape", "work_dir": null}),
            vec![],
            "name",
        ),
        (json!({}), vec!["--epochs", "0"], "--epochs"),
        (json!({}), vec!["--stop-after", "0"], "--stop-after"),
        (json!({"data": {"dir": a_file}}), vec![], "is a file"),
        (
            json!({"work_dir": a_file}),
            vec![],
            "is a file, not a directory",
        ),
        (
            json!({}),
            vec!["--resume-from", tmp.path().to_str().unwrap()],
            "is a directory",
        ),
        (
            json!({"model": {"mix_mode": "fmix", "mix_args": {"fmix": {"size": [16, 16]}}}}),
            vec![],
            "model.mix_args.fmix.size",
        ),
    ];
    for (i, (extra, args, expect)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = tiny_config(&dir, &data, json!("mixup"), json!(1.0), extra.clone());
        let out = run_any(runner().arg("--config").arg(&cfg).args(&args));
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{extra} {args:?} passed");
        assert_eq!(err.trim().lines().count(), 1, "{extra} {args:?}: {err}");
        assert!(
            err.contains(expect),
            "{extra} {args:?}: want `{expect}` in {err}"
        );
        assert!(!dir.join("work").join("result.json").exists());
    }
    // A multi-mode config may omit α (each mode's default is used).
    let cfg = tiny_config(
        tmp.path(),
        &data,
        json!(["mixup", "cutmix"]),
        json!(1.0),
        json!({"evaluation": {"median_window": 2}}),
    );
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["model"].as_object_mut().unwrap().remove("alpha");
    std::fs::write(&cfg, c.to_string()).unwrap();
    let out = run_any(runner().arg("--config").arg(&cfg).arg("--check-config"));
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn check_config_catches_what_a_run_would_hit() {
    let Some(data) = data_dir("check_config") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(Value, Value, &str)> = vec![
        (
            json!("mixup"),
            json!({"data": {"dir": tmp.path().join("missing")}}),
            "does not exist",
        ),
        (
            json!("automix"),
            json!({"model": {"automix": {"mask_layer": 7}}}),
            "model.automix",
        ),
    ];
    for (mode, extra, expect) in cases {
        let cfg = tiny_config(tmp.path(), &data, mode.clone(), json!(2.0), extra.clone());
        let out = run_any(runner().arg("--config").arg(&cfg).arg("--check-config"));
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{mode} {extra} passed");
        assert!(
            err.contains(expect),
            "{mode} {extra}: want `{expect}` in {err}"
        );
    }
    // One rule for the check and the run: a median window longer than the run is accepted
    // by both, with a note (the median then takes every evaluation).
    let cfg = tiny_config(
        tmp.path(),
        &data,
        json!("mixup"),
        json!(1.0),
        json!({"max_epochs": 5}),
    );
    let out = run_any(runner().arg("--config").arg(&cfg).arg("--check-config"));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("evaluation.median_window 10 asks for the median of 11"),
        "{}",
        stderr_of(&out)
    );
}

/// SIGTERM mid-epoch: the run finishes its step, checkpoints at that iteration
/// and exits 143; resuming continues exactly like an uninterrupted run.
#[test]
fn sigterm_mid_epoch_checkpoints_and_resumes_bit_identically() {
    let Some(data) = data_dir("sigterm") else {
        return;
    };
    let mut extra = small_run();
    extra["data"]["limit_train"] = json!(1000);
    extra["data"]["batch_size"] = json!(10);
    let whole = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        whole.path(),
        &data,
        json!("cutmix"),
        json!(0.2),
        extra.clone(),
    );
    run_ok(runner().arg("--config").arg(&cfg));
    let expected = results_only(&log_lines(&whole.path().join("work")));

    let split = tempfile::tempdir().unwrap();
    let cfg = tiny_config(split.path(), &data, json!("cutmix"), json!(0.2), extra);
    let work = split.path().join("work");
    let child = runner()
        .arg("--config")
        .arg(&cfg)
        .arg("--quiet")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps of epoch 1 are logged, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let steps = std::fs::read_dir(&work)
            .ok()
            .and_then(|mut d| {
                d.find(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".log.json")
                })
            })
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .map_or(0, |t| t.matches("\"mode\": \"train\"").count());
        if steps >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the run logged no steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(
        err.contains("interrupted by SIGTERM") && err.contains("--resume"),
        "{err}"
    );
    let pointer = std::fs::read_to_string(work.join("latest")).unwrap();
    assert!(
        pointer.trim().starts_with("iter_"),
        "mid-epoch checkpoint expected, got {pointer}"
    );
    run_ok(runner().arg("--config").arg(&cfg).arg("--resume"));
    assert_eq!(results_only(&log_lines(&work)), expected);
}
