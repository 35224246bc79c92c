//! Every committed config is accepted by `runner --check-config`, and bad
//! configs fail with one line naming the file and the field.

use std::path::{Path, PathBuf};
use std::process::Command;

fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_runner"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
}

#[test]
fn every_committed_config_passes_check_config() {
    // `--check-config` also reads the data (labels against the head's classes).
    let Some(data) = cifar_data::cifar10_dir_for_tests() else {
        eprintln!("SKIPPED every_committed_config_passes_check_config: set CIFAR10_DIR");
        return;
    };
    let mut files = Vec::new();
    json_files(&repo_root().join("configs"), &mut files);
    assert!(!files.is_empty(), "no configs under configs/");
    for f in &files {
        let out = runner()
            .arg("--check-config")
            .arg("--config")
            .arg(f)
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("{} configs accepted", files.len());
}

#[test]
fn bad_configs_fail_with_one_line_naming_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (r#"{"model": {"mix_mode": "mixupp"}}"#, "mixupp"),
        (r#"{"model": {"alpha": 0}}"#, "model.alpha"),
        (
            r#"{"model": {"mix_mode": ["mixup", "cutmix"], "alpha": [1]}}"#,
            "model.alpha",
        ),
        (
            r#"{"model": {"mix_mode": ["mixup", "cutmix"], "alpha": [1, 1], "mix_prob": [0.3, 0.3]}}"#,
            "model.mix_prob",
        ),
        (
            r#"{"model": {"backbone": {"arch": "resnet34"}}}"#,
            "resnet34",
        ),
        (r#"{"optimiser": {}}"#, "optimiser"),
        (
            r#"{"model": {"mix_mode": "cutmix", "alpha": 0.2, "mix_args": {"cutmix": {"boxes": 2}}}}"#,
            "boxes",
        ),
        (r#"{"model": {"mix_mode": "puzzlemix"}}"#, "model.head.loss"),
        (r#"{"max_epochs": "many"}"#, "max_epochs"),
        ("{ not json", "config.json"),
    ];
    for (json, needle) in cases {
        let path = tmp.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        let out = runner()
            .arg("--check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{json} was accepted");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{json}: not one line: {err}"
        );
        assert!(err.contains("config.json"), "{json}: file not named: {err}");
        assert!(err.contains(needle), "{json}: `{needle}` not named: {err}");
    }
    let out = runner()
        .args(["--config", "/nonexistent/x.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.json"));
}

#[test]
fn schema_describes_every_section_with_its_documentation() {
    let out = runner().arg("schema").output().unwrap();
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let props = &schema["properties"];
    for section in [
        "model",
        "data",
        "optimizer",
        "lr_config",
        "max_epochs",
        "seed",
        "train",
    ] {
        assert!(props.get(section).is_some(), "no `{section}` in the schema");
    }
    let text = schema.to_string();
    assert!(
        text.contains("Images per training batch"),
        "field docs missing"
    );
}
