//! A run is its work dir (tiny networks, real CIFAR-10, CPU): resuming and extending from
//! the directory alone, a method bringing its recipe, `result.json` as the run's checked
//! record, and divergences the log records.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The effective config `--print-config` prints.
fn printed_config(cfg: &Path, args: &[&str]) -> Value {
    let out = runner()
        .arg("--config")
        .arg(cfg)
        .args(args)
        .arg("--print-config")
        .output()
        .unwrap();
    serde_json::from_slice(&succeeded(out).stdout).expect("--print-config prints JSON")
}

#[test]
fn a_method_brings_its_recipe_unless_a_field_is_set() {
    let tmp = tempfile::tempdir().unwrap();
    // A generated-style config: the MixUp recipe spelled out.
    let cfg = tmp.path().join("mixup.json");
    std::fs::write(
        &cfg,
        json!({"model": {"mix_mode": "mixup", "alpha": 1.0, "head": {"loss": "CE_none"}},
               "lr_config": {"min_lr": 0.0}})
        .to_string(),
    )
    .unwrap();
    let recipe = |c: &Value| {
        (
            c["model"]["alpha"].clone(),
            c["model"]["head"]["loss"].clone(),
            c["lr_config"]["min_lr"].clone(),
        )
    };
    assert_eq!(
        recipe(&printed_config(&cfg, &[])),
        (json!(1.0), json!("CE_none"), json!(0.0))
    );
    assert_eq!(
        recipe(&printed_config(&cfg, &["--set", "model.mix_mode=samix"])),
        (json!(2.0), json!("CE_none"), json!(0.05))
    );
    assert_eq!(
        recipe(&printed_config(
            &cfg,
            &["--set", "model.mix_mode=puzzlemix"]
        )),
        (json!(1.0), json!("CE_soft"), json!(0.0))
    );
    // SmoothMix's α depends on the backbone too.
    assert_eq!(
        printed_config(
            &cfg,
            &[
                "--set",
                "model.mix_mode=smoothmix",
                "--set",
                "model.backbone.arch=resnext50"
            ]
        )["model"]["alpha"],
        json!(0.2)
    );
    // A field the user sets stays as set.
    assert_eq!(
        recipe(&printed_config(
            &cfg,
            &[
                "--set",
                "model.mix_mode=samix",
                "--set",
                "lr_config.min_lr=0.01",
                "--set",
                "model.alpha=1.5"
            ]
        )),
        (json!(1.5), json!("CE_none"), json!(0.01))
    );
    // So does a value in the file that is not its own method's recipe.
    std::fs::write(
        &cfg,
        json!({"model": {"mix_mode": "mixup", "head": {"loss": "CE_sigm"}}}).to_string(),
    )
    .unwrap();
    assert_eq!(
        printed_config(&cfg, &["--set", "model.mix_mode=puzzlemix"])["model"]["head"]["loss"],
        json!("CE_sigm")
    );
    // --check-config agrees with the run, and says where the fields came from.
    let out = runner()
        .arg("--config")
        .arg(&cfg)
        .args(["--set", "model.mix_mode=samix", "--check-config"])
        .args(["--data", "/nonexistent-for-this-test"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the data dir does not exist");
    assert_eq!(
        stderr_of(&out).trim().lines().count(),
        1,
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn the_work_dir_alone_resumes_extends_and_evaluates_a_run() {
    let Some(data) = data_dir("work_dir_alone") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &data, json!("mixup"), json!(1.0), small_run());
    let work = tmp.path().join("work");
    // Started with flags a resume must not need again.
    run_ok(runner().arg("--config").arg(&cfg).args([
        "--set",
        "seed=7",
        "--limit-train",
        "120",
        "--stop-after",
        "1",
    ]));
    std::fs::remove_file(&cfg).unwrap();
    let out = run_ok(runner().arg("--work-dir").arg(&work).arg("--resume"));
    assert!(work.join("result.json").is_file(), "{}", stderr_of(&out));
    let result = read_json(&work.join("result.json"));
    assert_eq!(result["status"], "finished");
    assert_eq!(result["seed"], 7);
    assert_eq!(result["config"]["data"]["limit_train"], 120);
    assert_eq!(result["history"]["head0"].as_array().unwrap().len(), 2);

    // Extending a finished run: an explicit, logged schedule change; the 2-epoch result is kept.
    let out = run_ok(
        runner()
            .arg("--work-dir")
            .arg(&work)
            .args(["--resume", "--epochs", "3"]),
    );
    assert!(
        stderr_of(&out).contains("max_epochs: 2 -> 3"),
        "{}",
        stderr_of(&out)
    );
    let extended = read_json(&work.join("result.json"));
    assert_eq!(extended["max_epochs"], 3);
    assert_eq!(extended["history"]["head0"].as_array().unwrap().len(), 3);
    assert_eq!(read_json(&work.join("result_ep2.json"))["max_epochs"], 2);
    let changes: Vec<Value> = log_lines(&work)
        .into_iter()
        .filter(|l| l["mode"] == "config_change")
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    // Shorter than what was trained is refused.
    let out = run_any(
        runner()
            .arg("--work-dir")
            .arg(&work)
            .args(["--resume", "--epochs", "2"]),
    );
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("already trained 3 epoch"),
        "{}",
        stderr_of(&out)
    );

    // --resume-from into a new work dir, without a config: result.json has every epoch.
    let ckpt = latest_checkpoint(&work);
    let moved = tmp.path().join("moved");
    run_ok(
        runner()
            .arg("--resume-from")
            .arg(&ckpt)
            .arg("--work-dir")
            .arg(&moved)
            .args(["--epochs", "4"]),
    );
    let moved_result = read_json(&moved.join("result.json"));
    let history = moved_result["history"]["head0"].as_array().unwrap();
    assert_eq!(history.len(), 4, "{moved_result}");
    assert_eq!(
        history[..3],
        extended["history"]["head0"].as_array().unwrap()[..]
    );

    // `eval` without --config uses the stored one.
    let out = runner()
        .arg("eval")
        .arg("--checkpoint")
        .arg(latest_checkpoint(&moved))
        .args(["--limit", "50", "--corruptions", "none", "--quiet"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&succeeded(out).stdout).unwrap();
    assert_eq!(report["images"], 50);
}

#[test]
fn resume_auto_checks_the_finished_run_it_skips() {
    let Some(data) = data_dir("resume_auto_checks") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &data, json!("mixup"), json!(1.0), small_run());
    let work = tmp.path().join("work");
    let auto = |extra: &[&str]| {
        let mut c = runner();
        c.arg("--config")
            .arg(&cfg)
            .args(["--resume", "auto"])
            .args(extra);
        run_any(&mut c)
    };
    assert!(auto(&[]).status.success());
    let good = std::fs::read(work.join("result.json")).unwrap();
    // Another seed is another run: refused, not called finished.
    let out = auto(&["--seed", "5"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("seed: 0 -> 5"),
        "{}",
        stderr_of(&out)
    );
    // An empty or garbage result.json is kept aside and written again from the checkpoint.
    for bad in ["", "{\"mode\": \"summary\", \"median_top1\": 200}"] {
        std::fs::write(work.join("result.json"), bad).unwrap();
        let out = auto(&[]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(std::fs::read(work.join("result.json")).unwrap(), good);
        assert_eq!(
            std::fs::read_to_string(work.join("result.json.invalid")).unwrap(),
            bad
        );
    }
}

#[test]
fn weights_that_overflow_after_the_last_evaluation_are_never_evaluated() {
    let Some(data) = data_dir("overflow_after_eval") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // One step per epoch at an absurd learning rate: the loss of that step is finite (it is
    // computed before the update), but the update leaves non-finite weights behind.
    let cfg = tiny_config(
        tmp.path(),
        &data,
        json!("mixup"),
        json!(1.0),
        json!({"max_epochs": 2, "optimizer": {"lr": 3e38},
               "data": {"limit_train": 20, "batch_size": 20, "limit_test": 50}}),
    );
    let out = run_any(runner().arg("--config").arg(&cfg));
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("training diverged"),
        "{}",
        stderr_of(&out)
    );
    let work = tmp.path().join("work");
    let lines = log_lines(&work);
    let diverged: Vec<&Value> = lines.iter().filter(|l| l["mode"] == "diverged").collect();
    assert_eq!(diverged.len(), 1, "{lines:?}");
    let epoch = diverged[0]["epoch"].as_u64().unwrap();
    // No val line and no metrics row for the diverged epoch.
    assert!(
        lines
            .iter()
            .filter(|l| l["mode"] == "val")
            .all(|l| l["epoch"].as_u64().unwrap() < epoch),
        "{lines:?}"
    );
    let csv = std::fs::read_to_string(work.join("metrics.csv")).unwrap_or_default();
    assert!(
        csv.lines()
            .skip(1)
            .all(|l| l.split(',').next().unwrap().parse::<u64>().unwrap() < epoch),
        "{csv}"
    );
    assert!(!work.join("result.json").exists());
}
