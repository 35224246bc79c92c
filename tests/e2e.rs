//! End-to-end tests of the `runner` binary on real CIFAR-10 images (tiny
//! networks, CPU). They need the official binary files in `CIFAR10_DIR`;
//! without it they are skipped loudly, except under `CI=true` where that fails.

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn every_hand_crafted_mode_trains_with_finite_decreasing_loss() {
    let Some(data) = data_dir("every_hand_crafted_mode_trains") else {
        return;
    };
    let modes = [
        ("vanilla", 1.0),
        ("mixup", 1.0),
        ("cutmix", 0.2),
        ("manifoldmix", 2.0),
        ("smoothmix", 0.5),
        ("saliencymix", 0.2),
        ("fmix", 0.2),
        ("puzzlemix", 1.0),
        ("gridmix", 0.2),
        ("resizemix", 1.0),
    ];
    for (mode, alpha) in modes {
        let tmp = tempfile::tempdir().unwrap();
        let loss = if mode == "puzzlemix" {
            "CE_soft"
        } else {
            "CE_none"
        };
        let cfg = tiny_config(
            tmp.path(),
            &data,
            json!(mode),
            json!(alpha),
            json!({"model": {"head": {"loss": loss}}}),
        );
        run_ok(runner().arg("--config").arg(&cfg));
        let lines = log_lines(&tmp.path().join("work"));
        let losses = train_losses(&lines);
        assert!(
            losses.iter().all(|(_, l)| l.is_finite()),
            "{mode}: {losses:?}"
        );
        let (first, last) = (
            mean_loss_of_epoch(&losses, 1),
            mean_loss_of_epoch(&losses, 3),
        );
        assert!(
            last < first,
            "{mode}: loss did not decrease ({first} → {last})"
        );
        eprintln!("{mode}: mean train loss epoch 1 {first:.4} → epoch 3 {last:.4}");
        let summary = lines.last().unwrap();
        assert_eq!(summary["mode"], "summary", "{mode}");
    }
}

#[test]
fn attentivemix_trains_with_a_cifar_checkpoint_as_attention_network() {
    let Some(data) = data_dir("attentivemix_trains") else {
        return;
    };
    // The attention network: a vanilla tiny run's final checkpoint.
    let teacher = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        teacher.path(),
        &data,
        json!("vanilla"),
        json!(1.0),
        json!({"max_epochs": 1}),
    );
    run_ok(runner().arg("--config").arg(&cfg));
    let weights = latest_checkpoint(&teacher.path().join("work"));

    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        tmp.path(),
        &data,
        json!("attentivemix"),
        json!(2.0),
        json!({"model": {"attention_weights": weights}}),
    );
    run_ok(runner().arg("--config").arg(&cfg));
    let losses = train_losses(&log_lines(&tmp.path().join("work")));
    assert!(losses.iter().all(|(_, l)| l.is_finite()));
    assert!(mean_loss_of_epoch(&losses, 3) < mean_loss_of_epoch(&losses, 1));
}

#[test]
fn resumed_run_continues_exactly_like_an_uninterrupted_one() {
    let Some(data) = data_dir("resume") else {
        return;
    };
    let extra = json!({"max_epochs": 2, "log": {"interval": 1},
                       "data": {"limit_train": 200, "limit_test": 100, "batch_size": 20}});
    let whole = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        whole.path(),
        &data,
        json!("mixup"),
        json!(1.0),
        extra.clone(),
    );
    run_ok(runner().arg("--config").arg(&cfg));

    let split = tempfile::tempdir().unwrap();
    let cfg = tiny_config(split.path(), &data, json!("mixup"), json!(1.0), extra);
    run_ok(
        runner()
            .arg("--config")
            .arg(&cfg)
            .args(["--stop-after", "1"]),
    );
    run_ok(runner().arg("--config").arg(&cfg).arg("--resume"));

    let a = log_lines(&whole.path().join("work"));
    let b = log_lines(&split.path().join("work"));
    let pick = |lines: &[Value], mode: &str| -> Vec<(u64, u64, f64)> {
        lines
            .iter()
            .filter(|l| l["mode"] == mode)
            .map(|l| {
                let key = if mode == "train" {
                    "loss"
                } else {
                    "head0_top1"
                };
                (
                    l["epoch"].as_u64().unwrap(),
                    l["iter"].as_u64().unwrap(),
                    l[key].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // The first step after the resume point and every later one match.
    assert_eq!(pick(&a, "train"), pick(&b, "train"));
    assert_eq!(pick(&a, "val"), pick(&b, "val"));
}

#[test]
fn an_existing_run_is_never_overwritten() {
    let Some(data) = data_dir("no_overwrite") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        tmp.path(),
        &data,
        json!("vanilla"),
        json!(1.0),
        json!({"max_epochs": 1, "data": {"limit_train": 100, "limit_test": 100}}),
    );
    run_ok(runner().arg("--config").arg(&cfg));
    let ckpt = latest_checkpoint(&tmp.path().join("work"));
    let before = std::fs::read(&ckpt).unwrap();
    let out = runner()
        .arg("--config")
        .arg(&cfg)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds a run") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(std::fs::read(&ckpt).unwrap(), before);
}

/// Learning check: a tiny ResNet on 5,000 real training images for a few
/// hundred steps must be clearly above chance (10%) on 1,000 test images.
#[test]
fn tiny_resnet_learns_real_cifar10() {
    let Some(data) = data_dir("tiny_resnet_learns") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        tmp.path(),
        &data,
        json!("vanilla"),
        json!(1.0),
        json!({
            "model": {"backbone": {"base_width": 16}},
            "data": {"limit_train": 5000, "limit_test": 1000, "batch_size": 50, "workers": 2},
            "max_epochs": 4,
            "optimizer": {"lr": 0.05},
            "checkpoint": {"interval": 4},
            "log": {"interval": 50},
        }),
    );
    let out = run_ok(runner().arg("--config").arg(&cfg));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("finished config: median top-1 over epochs 1-4"),
        "{stdout}"
    );
    let result = std::fs::read(tmp.path().join("work/result.json")).unwrap();
    let summary: Value = serde_json::from_slice(&result).expect("result.json");
    // The per-epoch CSV: a header and one row per epoch.
    let csv = std::fs::read_to_string(tmp.path().join("work/metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "epoch,lr,train_loss,train_acc,head0_top1,head0_top5,epoch_seconds,img_per_s"
    );
    assert_eq!(csv.lines().count(), 5, "{csv}");
    let top1 = summary["final_top1"].as_f64().unwrap();
    eprintln!("tiny ResNet (width 16), 400 steps on 5,000 images: test top-1 {top1:.1}%");
    assert!(top1 > 30.0, "top-1 {top1}% is not clearly above chance");
}

#[test]
fn automix_and_samix_train_and_resume_identically() {
    let Some(data) = data_dir("automix_and_samix") else {
        return;
    };
    for mode in ["automix", "samix"] {
        let extra = json!({"max_epochs": 2, "log": {"interval": 2}, "lr_config": {"min_lr": 0.05},
                           "data": {"limit_train": 200, "limit_test": 100, "batch_size": 20}});
        let whole = tempfile::tempdir().unwrap();
        let cfg = tiny_config(whole.path(), &data, json!(mode), json!(2.0), extra.clone());
        run_ok(runner().arg("--config").arg(&cfg));
        let a = log_lines(&whole.path().join("work"));
        let losses: Vec<f64> = a
            .iter()
            .filter(|l| l["mode"] == "train")
            .flat_map(|l| {
                [
                    "loss",
                    "loss_mix_q",
                    "loss_one_q",
                    "loss_mix_k",
                    "loss_mask",
                ]
                .map(|k| l[k].as_f64().unwrap())
            })
            .collect();
        assert!(
            !losses.is_empty() && losses.iter().all(|v| v.is_finite()),
            "{mode}: {losses:?}"
        );
        // metrics.csv: a finite train accuracy (the q encoder's, on the mixed batch) and the
        // four heads' columns.
        let csv = std::fs::read_to_string(whole.path().join("work/metrics.csv")).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let acc_col = header.iter().position(|h| *h == "train_acc").unwrap();
        assert!(header.contains(&"acc_one_q_top1"), "{mode}: {header:?}");
        for row in csv.lines().skip(1) {
            let acc: f64 = row.split(',').nth(acc_col).unwrap().parse().unwrap();
            assert!(
                (0.0..=100.0).contains(&acc),
                "{mode}: train_acc {acc} in {row}"
            );
        }
        let val = a.iter().find(|l| l["mode"] == "val").expect("a val line");
        for head in ["acc_mix_k", "acc_one_k", "acc_mix_q", "acc_one_q"] {
            assert!(
                val[format!("{head}_top1")].is_f64(),
                "{mode}: {head} missing in {val}"
            );
        }
        assert!(
            a.last().unwrap()["median_top1"].is_f64(),
            "{mode}: no summary"
        );
        // The learned masks of the trained MixBlock, drawn by `runner preview`.
        let png = whole.path().join("masks.png");
        let out = runner()
            .args(["preview", "--samples", "4", "--config"])
            .arg(&cfg)
            .arg("--checkpoint")
            .arg(latest_checkpoint(&whole.path().join("work")))
            .arg("--out")
            .arg(&png)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");

        let split = tempfile::tempdir().unwrap();
        let cfg = tiny_config(split.path(), &data, json!(mode), json!(2.0), extra);
        run_ok(
            runner()
                .arg("--config")
                .arg(&cfg)
                .args(["--stop-after", "1"]),
        );
        run_ok(runner().arg("--config").arg(&cfg).arg("--resume"));
        let b = log_lines(&split.path().join("work"));
        assert_eq!(
            results_only(&a),
            results_only(&b),
            "{mode}: resumed run diverged"
        );
    }
}

#[test]
fn preview_writes_a_png_grid_for_every_method() {
    let Some(data) = data_dir("preview") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &data, json!("mixup"), json!(1.0), json!({}));
    let out_png = tmp.path().join("grid.png");
    let out = runner()
        .args(["preview", "--samples", "4", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out_png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&out_png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    // Width and height from the IHDR chunk: one row per hand-crafted mode but attentivemix.
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert!(height > 9 * 64, "height {height}");

    // A fixed λ: methods that do not draw a Beta λ say they ignore it; the others do not.
    let again = runner()
        .args([
            "preview",
            "--samples",
            "4",
            "--lam",
            "0.5",
            "--modes",
            "mixup,puzzlemix",
        ])
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out_png)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("puzzlemix ignores --lam"), "{err}");
    assert!(!err.contains("mixup ignores"), "{err}");
    // Not a PNG at the path: replaced only with --force.
    std::fs::write(&out_png, b"my notes").unwrap();
    let refused = runner()
        .args(["preview", "--samples", "2", "--modes", "mixup"])
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out_png)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert_eq!(std::fs::read(&out_png).unwrap(), b"my notes");
}

/// `train.precision: "bf16"` on the CPU with `MIXBENCH_CPU_BF16=emulate`: bf16's numerics on
/// f32 units. It trains (not in f32: its losses differ from the f32 run's), is deterministic
/// and resumes exactly like f32, the log says `bf16-emulated`, and a resume without the
/// variable is refused rather than continued in f32.
#[test]
fn emulated_bf16_trains_differently_from_f32_and_resumes_exactly() {
    let Some(data) = data_dir("emulated_bf16") else {
        return;
    };
    let extra = |precision: &str| {
        json!({"max_epochs": 2, "log": {"interval": 1}, "train": {"precision": precision},
               "data": {"limit_train": 200, "limit_test": 100, "batch_size": 20}})
    };
    let emulated = || {
        let mut c = runner();
        c.env("MIXBENCH_CPU_BF16", "emulate");
        c
    };
    let train_losses_of = |work: &std::path::Path| -> Vec<f64> {
        train_losses(&log_lines(work))
            .into_iter()
            .map(|(_, loss)| loss)
            .collect()
    };
    let whole = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        whole.path(),
        &data,
        json!("mixup"),
        json!(1.0),
        extra("bf16"),
    );
    run_ok(emulated().arg("--config").arg(&cfg));
    let a = log_lines(&whole.path().join("work"));
    assert_eq!(a[0]["precision"], "bf16-emulated", "{}", a[0]);
    assert!(a[0]["model"]
        .as_str()
        .is_some_and(|m| m.contains("device cpu (bf16-emulated)")));

    let split = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        split.path(),
        &data,
        json!("mixup"),
        json!(1.0),
        extra("bf16"),
    );
    run_ok(
        emulated()
            .arg("--config")
            .arg(&cfg)
            .args(["--stop-after", "1"]),
    );
    // Without the variable the resume is refused, naming the field and the way out.
    let out = run_any(runner().arg("--config").arg(&cfg).arg("--resume"));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("train.precision: \"bf16\" on the CPU") && err.contains("MIXBENCH_CPU_BF16"),
        "{err}"
    );
    // A misspelt value is an error naming the variable, not an f32 run.
    let out = run_any(
        runner()
            .env("MIXBENCH_CPU_BF16", "yes")
            .arg("--config")
            .arg(&cfg)
            .arg("--resume"),
    );
    assert!(
        !out.status.success() && stderr_of(&out).contains("MIXBENCH_CPU_BF16: unknown value"),
        "{}",
        stderr_of(&out)
    );
    run_ok(emulated().arg("--config").arg(&cfg).arg("--resume"));
    let b = log_lines(&split.path().join("work"));
    assert_eq!(results_only(&a), results_only(&b));

    let f32_run = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        f32_run.path(),
        &data,
        json!("mixup"),
        json!(1.0),
        extra("f32"),
    );
    run_ok(runner().arg("--config").arg(&cfg));
    let (bf16_losses, f32_losses) = (
        train_losses_of(&whole.path().join("work")),
        train_losses_of(&f32_run.path().join("work")),
    );
    assert_eq!(bf16_losses.len(), f32_losses.len());
    assert_ne!(bf16_losses, f32_losses, "bf16 emulation trained in f32");
    // The same recipe in both: the first step's loss (same weights, same batch) agrees to
    // bf16's precision.
    let first = (bf16_losses[0] - f32_losses[0]).abs() / f32_losses[0];
    assert!(first < 2e-2, "{bf16_losses:?} vs {f32_losses:?}");
}
