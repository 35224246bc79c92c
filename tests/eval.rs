//! `runner eval` and `runner export` on a tiny network trained for one epoch on real CIFAR-10.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

fn number(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn eval_reports_accuracy_calibration_fgsm_and_corruptions_and_export_writes_the_backbone() {
    let Some(data) = data_dir("eval_and_export") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        dir.path(),
        &data,
        json!("mixup"),
        json!(1.0),
        json!({"max_epochs": 1, "data": {"limit_train": 500, "limit_test": 100}}),
    );
    run_ok(runner().arg("--config").arg(&cfg));
    let ckpt = latest_checkpoint(&dir.path().join("work"));

    // --- eval ---
    let report_file = dir.path().join("eval.json");
    let eval = |force: bool| {
        let mut cmd = runner();
        cmd.arg("eval")
            .arg("--config")
            .arg(&cfg)
            .arg("--checkpoint")
            .arg(&ckpt)
            .args(["--limit", "200", "--batch-size", "64"])
            .args(["--corruptions", "gaussian_noise,contrast,jpeg_compression"])
            .args(["--severities", "1,5", "--seed", "3", "--quiet"])
            .arg("--out")
            .arg(&report_file);
        if force {
            cmd.arg("--force");
        }
        succeeded(cmd.output().expect("runner starts"))
    };
    let out = eval(false);
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let written: Value = serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    assert_eq!(v, written, "--out holds what was printed");

    assert_eq!(v["images"], 200);
    assert_eq!(v["checkpoint"], ckpt.display().to_string());
    assert_eq!(v["backbone_prefix"], "model.");
    let top1 = number(&v["top1"], "top1");
    let top5 = number(&v["top5"], "top5");
    assert!((0.0..=100.0).contains(&top1), "top1 {top1}");
    assert!(top1 <= top5 && top5 <= 100.0, "top1 {top1}, top5 {top5}");
    let nll = number(&v["nll"], "nll");
    assert!(nll.is_finite() && nll > 0.0, "nll {nll}");
    let ece = number(&v["ece"], "ece");
    assert!((0.0..=1.0).contains(&ece), "ece {ece}");
    assert_eq!(number(&v["fgsm"]["eps"], "eps"), 8.0);
    let fgsm = number(&v["fgsm"]["top1"], "fgsm top1");
    // The attack does not help (slack: a step against the gradient's sign can flip a sample
    // to right by accident).
    assert!(
        (0.0..=100.0).contains(&fgsm) && fgsm <= top1 + 2.0,
        "fgsm {fgsm} vs clean {top1}"
    );

    let corruptions = v["corruptions"].as_object().unwrap();
    let mut names: Vec<&String> = corruptions.keys().collect();
    names.sort();
    assert_eq!(
        names,
        vec!["contrast", "gaussian_noise", "jpeg_compression", "mean"]
    );
    let mut means = Vec::new();
    for name in ["contrast", "gaussian_noise", "jpeg_compression"] {
        let c = &corruptions[name];
        let s1 = number(&c["1"], name);
        let s5 = number(&c["5"], name);
        assert!(c.get("3").is_none(), "only the asked severities: {c}");
        for s in [s1, s5] {
            assert!((0.0..=100.0).contains(&s), "{name}: {s}");
        }
        let mean = number(&c["mean"], name);
        assert!((mean - (s1 + s5) / 2.0).abs() < 1e-9, "{name}: {c}");
        means.push(mean);
    }
    let overall = number(&corruptions["mean"], "mean");
    assert!((overall - means.iter().sum::<f64>() / 3.0).abs() < 1e-9);

    // The same seed gives the same report (noise included).
    let again: Value = serde_json::from_slice(&eval(true).stdout).unwrap();
    assert_eq!(again, v);

    // Without --config the checkpoint's stored config rebuilds the network (the default
    // config would be a width-64 ResNet-18 and could not load these width-8 weights).
    let stored = runner()
        .arg("eval")
        .arg("--checkpoint")
        .arg(&ckpt)
        .arg("--data")
        .arg(&data)
        .args([
            "--limit",
            "200",
            "--batch-size",
            "64",
            "--corruptions",
            "none",
            "--quiet",
        ])
        .output()
        .unwrap();
    let stored: Value = serde_json::from_slice(&succeeded(stored).stdout).unwrap();
    assert_eq!(stored["top1"], v["top1"]);
    assert!(
        stored["config"]
            .as_str()
            .unwrap()
            .ends_with("(stored config)"),
        "{stored}"
    );

    // A network trained in bf16 (on a GPU: the CPU refuses to train in bf16) evaluates in
    // f32 on the CPU, and says so instead of refusing or pretending.
    let bf16_cfg = dir.path().join("bf16.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["train"] = json!({"precision": "bf16"});
    std::fs::write(&bf16_cfg, c.to_string()).unwrap();
    let bf16_eval = succeeded(
        runner()
            .arg("eval")
            .arg("--config")
            .arg(&bf16_cfg)
            .arg("--checkpoint")
            .arg(&ckpt)
            .args(["--limit", "100", "--quiet"])
            .output()
            .unwrap(),
    );
    assert!(
        stderr_of(&bf16_eval).contains("trained in bf16; the CPU evaluates in f32"),
        "{}",
        stderr_of(&bf16_eval)
    );
    let v: Value = serde_json::from_slice(&bf16_eval.stdout).unwrap();
    assert_eq!(v["images"], 100);

    // Bad arguments are refused with the flag named.
    let bad = runner()
        .arg("eval")
        .arg("--config")
        .arg(&cfg)
        .arg("--checkpoint")
        .arg(&ckpt)
        .args(["--corruptions", "fog"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        stderr_of(&bad).contains("--corruptions"),
        "{}",
        stderr_of(&bad)
    );

    // --- export ---
    let exported = dir.path().join("backbone.safetensors");
    let export = |force: bool| {
        let mut cmd = runner();
        cmd.arg("export")
            .arg("--checkpoint")
            .arg(&ckpt)
            .arg("--out")
            .arg(&exported);
        if force {
            cmd.arg("--force");
        }
        cmd.output().expect("runner starts")
    };
    succeeded(export(false));
    let weights = candle_core::safetensors::load(&exported, &candle_core::Device::Cpu).unwrap();
    let (checkpoint, _) =
        train::checkpoint::load_checkpoint(&ckpt, &candle_core::Device::Cpu).unwrap();
    assert!(
        weights.keys().all(|k| !k.starts_with("optim.")
            && !k.starts_with("model.")
            && !k.starts_with("model_q.")),
        "{:?}",
        weights.keys().collect::<Vec<_>>()
    );
    assert_eq!(weights["conv1.weight"].dims(), [8, 3, 3, 3]);
    assert_eq!(weights["fc.weight"].dims(), [10, 64]);
    assert!(weights.contains_key("layer2.0.downsample.1.running_var"));
    // Exactly the checkpoint's model, tensor for tensor.
    let model_keys = checkpoint
        .keys()
        .filter(|k| k.starts_with("model."))
        .count();
    assert_eq!(weights.len(), model_keys);
    for (name, t) in &weights {
        let source = &checkpoint[&format!("model.{name}")];
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = source.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // As any new file (0644 under the usual umask 022), never a temporary file's 0600.
        let reference = dir.path().join("reference");
        std::fs::File::create(&reference).unwrap();
        assert_eq!(mode(&exported), mode(&reference));
        assert_eq!(mode(&exported), 0o644, "the test expects umask 022");
    }

    // An existing file is kept unless --force.
    std::fs::write(&exported, b"keep me").unwrap();
    let refused = export(false);
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("--force"),
        "{}",
        stderr_of(&refused)
    );
    assert_eq!(std::fs::read(&exported).unwrap(), b"keep me");
    succeeded(export(true));
    let replaced = candle_core::safetensors::load(&exported, &candle_core::Device::Cpu).unwrap();
    assert_eq!(replaced.len(), weights.len());
    // No staging file is left beside it.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("backbone"))
        .collect();
    names.sort();
    assert_eq!(names, vec!["backbone.safetensors"]);

    // --- nothing at an output path is destroyed ---
    let ckpt_bytes = std::fs::read(&ckpt).unwrap();
    let over_source = runner()
        .arg("export")
        .arg("--checkpoint")
        .arg(&ckpt)
        .arg("--out")
        .arg(&ckpt)
        .arg("--force")
        .output()
        .unwrap();
    assert!(!over_source.status.success());
    assert!(
        stderr_of(&over_source).contains("is the input file"),
        "{}",
        stderr_of(&over_source)
    );
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        ckpt_bytes,
        "the checkpoint is intact"
    );
    let eval_to = |out: &Path| {
        runner()
            .arg("eval")
            .arg("--checkpoint")
            .arg(&ckpt)
            .args([
                "--limit",
                "100",
                "--corruptions",
                "none",
                "--quiet",
                "--force",
            ])
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let refused = eval_to(Path::new("/dev/null"));
        assert!(!refused.status.success());
        assert!(
            stderr_of(&refused).contains("is a device node"),
            "{}",
            stderr_of(&refused)
        );
        assert!(std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        let fifo = dir.path().join("fifo");
        if std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success())
        {
            let refused = eval_to(&fifo);
            assert!(
                stderr_of(&refused).contains("is a FIFO"),
                "{}",
                stderr_of(&refused)
            );
            assert!(std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo());
        }
    }
    // An unwritable --out fails before the evaluation, not after it.
    let unwritable = eval_to(&dir.path().join("no-such-dir/eval.json"));
    assert!(!unwritable.status.success());
    assert!(unwritable.stdout.is_empty(), "no evaluation ran");
    assert!(
        stderr_of(&unwritable).contains("cannot create a file there"),
        "{}",
        stderr_of(&unwritable)
    );
}
