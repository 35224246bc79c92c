//! Every committed config is accepted by `runner --check-config`, and bad
//! configs fail with one line naming the file and the field.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The runner, without the caller's `MIXBENCH_CPU_BF16` (the bf16 refusal case needs it unset).
fn runner() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.env_remove("MIXBENCH_CPU_BF16");
    cmd
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
    // AttentiveMix+ configs name an attention network each user makes (docs/methods.md): the
    // check refuses them while it is missing, and accepts them once it is there.
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("attention.safetensors");
    std::fs::write(&weights, b"checked for existence only").unwrap();
    for f in &files {
        let check = |extra: &[String]| {
            runner()
                .arg("--check-config")
                .arg("--config")
                .arg(f)
                .arg("--data")
                .arg(&data)
                .args(extra)
                .output()
                .unwrap()
        };
        let attentive = f.to_string_lossy().contains("attentivemix");
        if attentive {
            let out = check(&[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success()
                    && err.contains("model.attention_weights")
                    && err.contains("docs/methods.md"),
                "{}: {err}",
                f.display()
            );
        }
        let extra = if attentive {
            vec![
                "--set".to_string(),
                format!("model.attention_weights={}", weights.display()),
            ]
        } else {
            vec![]
        };
        let out = check(&extra);
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
        (
            r#"{"model": {"mix_mode": "puzzlemix", "head": {"loss": "CE_none"}}}"#,
            "model.head.loss",
        ),
        (r#"{"max_epochs": "many"}"#, "max_epochs"),
        // The CPU has no bf16 kernels: refused (without MIXBENCH_CPU_BF16=emulate), not trained
        // in f32 under a bf16 label.
        (
            r#"{"train": {"precision": "bf16"}}"#,
            "train.precision: \"bf16\" on the CPU",
        ),
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

/// Configs every check must refuse: the runner (before it reads any data) and the schema it
/// prints, so that an editor flags what a run would refuse. (Cross-field rules — `min_lr` ≤
/// `lr`, `mix_args` keys among the configured modes, probabilities summing to 1 — are the
/// runner's alone: a JSON Schema cannot state them.)
const REFUSED: &[&str] = &[
    r#"{"model": {"mix_mode": "mixupp"}}"#,
    r#"{"model": {"mix_mode": []}}"#,
    r#"{"model": {"mix_mode": ["mixup", "cutmix", "fmix", "gridmix", "resizemix", "vanilla"]}}"#,
    r#"{"model": {"alpha": 0}}"#,
    r#"{"model": {"alpha": -1}}"#,
    r#"{"model": {"alpha": "1"}}"#,
    r#"{"model": {"mix_mode": ["mixup", "cutmix"], "alpha": [1, 0]}}"#,
    r#"{"model": {"mix_repeat": 0}}"#,
    r#"{"model": {"mix_prob": [1.5]}}"#,
    r#"{"model": {"mix_prob": [-0.5]}}"#,
    r#"{"model": {"mix_args": {"cutmixx": {}}}}"#,
    r#"{"model": {"mix_mode": "cutmix", "mix_args": {"cutmix": 3}}}"#,
    r#"{"model": {"backbone": {"arch": "resnet34"}}}"#,
    r#"{"model": {"backbone": {"base_width": 0}}}"#,
    r#"{"model": {"backbone": {"stage_blocks": [0, 1, 1, 1]}}}"#,
    r#"{"model": {"backbone": {"stage_blocks": [1, 1, 1]}}}"#,
    r#"{"model": {"backbone": {"init": "xavier"}}}"#,
    r#"{"model": {"head": {"loss": "CE_hard"}}}"#,
    r#"{"model": {"head": {"num_classes": 1}}}"#,
    r#"{"model": {"automix": 3}}"#,
    r#"{"model": {"attention_weights": 3}}"#,
    r#"{"data": {"batch_size": 0}}"#,
    r#"{"data": {"test_batch_size": 0}}"#,
    r#"{"data": {"limit_train": 0}}"#,
    r#"{"data": {"limit_test": 0}}"#,
    r#"{"data": {"padding_mode": "edge"}}"#,
    r#"{"data": {"workers": -1}}"#,
    r#"{"data": {"dir": 5}}"#,
    r#"{"optimizer": {"lr": 0}}"#,
    r#"{"optimizer": {"lr": -0.1}}"#,
    r#"{"optimizer": {"momentum": -0.9}}"#,
    r#"{"optimizer": {"weight_decay": -0.0001}}"#,
    r#"{"lr_config": {"min_lr": -0.1}}"#,
    r#"{"max_epochs": 0}"#,
    r#"{"seed": -1}"#,
    r#"{"checkpoint": {"interval": 0}}"#,
    r#"{"checkpoint": {"max_keep": 0}}"#,
    r#"{"log": {"interval": 0}}"#,
    r#"{"evaluation": {"interval": 0}}"#,
    r#"{"evaluation": {"median_window": -1}}"#,
    r#"{"name": "../escape"}"#,
    r#"{"name": ".."}"#,
    r#"{"train": {"precision": "fp16"}}"#,
    r#"{"optimiser": {}}"#,
];

/// Validates JSON documents against a JSON Schema with Python's `jsonschema` package (the
/// reference implementation, independent of the schema's generator); `None` after a
/// `SKIPPED` line when it is not installed, except under `CI=true` (where `.ci/run` installs it).
fn python_validator(
    schema: &serde_json::Value,
    docs: &[serde_json::Value],
) -> Option<Vec<Vec<String>>> {
    let probe = Command::new("python3")
        .args(["-c", "import jsonschema"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with jsonschema is missing but CI=true (.ci/run installs it)"
        );
        eprintln!("SKIPPED schema check: needs python3 with the jsonschema package (pip install jsonschema)");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input.json");
    std::fs::write(
        &input,
        serde_json::json!({"schema": schema, "docs": docs}).to_string(),
    )
    .unwrap();
    let script = r#"
import json, sys, jsonschema
d = json.load(open(sys.argv[1]))
cls = jsonschema.validators.validator_for(d["schema"])
cls.check_schema(d["schema"])
v = cls(d["schema"])
print(json.dumps([[e.message for e in v.iter_errors(doc)] for doc in d["docs"]]))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_schema_refuses_what_the_runner_refuses_and_takes_every_committed_config() {
    let out = runner().arg("schema").output().unwrap();
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    let mut refused = Vec::new();
    for text in REFUSED {
        std::fs::write(&path, text).unwrap();
        let out = runner()
            .arg("--config")
            .arg(&path)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(!out.status.success(), "the runner accepts {text}");
        refused.push(serde_json::from_str::<serde_json::Value>(text).unwrap());
    }
    let mut files = Vec::new();
    json_files(&repo_root().join("configs"), &mut files);
    let mut accepted: Vec<serde_json::Value> = files
        .iter()
        .map(|f| serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
        .collect();
    accepted.push(serde_json::json!({}));
    let docs: Vec<serde_json::Value> = refused.iter().chain(&accepted).cloned().collect();
    let Some(errors) = python_validator(&schema, &docs) else {
        return;
    };
    for (text, errs) in REFUSED.iter().zip(&errors) {
        assert!(!errs.is_empty(), "the schema accepts {text}");
    }
    let names = files
        .iter()
        .map(|f| f.display().to_string())
        .chain(["{}".to_string()]);
    for (name, errs) in names.zip(&errors[REFUSED.len()..]) {
        assert!(errs.is_empty(), "{name}: {errs:?}");
    }
}

#[test]
fn the_schemas_mode_list_is_the_runners() {
    let mut known: Vec<&str> = mix_ops::registry::MIX_MODES.to_vec();
    known.extend(["automix", "samix"]);
    known.sort();
    let mut listed = bench_config::MIX_MODES.to_vec();
    listed.sort();
    assert_eq!(known, listed);
}

#[test]
fn list_names_every_method_with_its_recipe_and_the_backbones_with_their_parameters() {
    let out = runner().args(["list", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let methods = v["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 13);
    let get = |mode: &str| methods.iter().find(|m| m["mode"] == mode).unwrap().clone();
    assert_eq!(get("puzzlemix")["loss"], "CE_soft");
    assert_eq!(get("samix")["min_lr"], 0.05);
    assert_eq!(
        get("smoothmix")["alpha"],
        serde_json::json!({"resnet18": 0.5, "resnext50": 0.2})
    );
    let params: Vec<u64> = v["backbones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["parameters"].as_u64().unwrap())
        .collect();
    assert_eq!(params, [11_173_962, 22_992_714]);
    let table = runner().arg("list").output().unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("11,173,962") && text.contains("samix"),
        "{text}"
    );
}
