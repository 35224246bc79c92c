//! `gen-configs`: file names and layout, config validity, scripts, determinism,
//! and that the committed `configs/cifar10` tree is what the defaults generate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bench_config::{Arch, HeadLoss, OneOrMany, RunConfig};
use xtask::gen::{
    diff_tree, generate, missing_attention_weights, parse_mode_item, read_manifest, write,
    AlphaOverride, GenOptions, GeneratedFile, MANIFEST_NAME, SCRIPT_NAMES,
};
use xtask::methods::{Backbone, METHODS};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xtask-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn paths(files: &[GeneratedFile]) -> Vec<String> {
    files.iter().map(|f| f.path.display().to_string()).collect()
}

fn defaults_both() -> GenOptions {
    GenOptions {
        backbones: Backbone::ALL.to_vec(),
        ..GenOptions::default()
    }
}

#[test]
fn golden_listing_for_a_flag_set() {
    let opts = GenOptions {
        epochs: vec![200, 800],
        backbones: vec![Backbone::Rx50],
        modes: ["smoothmix", "puzzlemix", "samix", "mixup+cutmix"]
            .iter()
            .map(|m| parse_mode_item(m).unwrap())
            .collect(),
        mix_prob: Some(vec![0.7, 0.3]),
        ..GenOptions::default()
    };
    let got = paths(&generate(&opts).unwrap());
    let want = [
        "rx50/mix_modesmoothmix/rx50_mixups_CE_none_alpha0_2_ep200.json",
        "rx50/mix_modesmoothmix/rx50_mixups_CE_none_alpha0_2_ep800.json",
        "rx50/mix_modepuzzlemix/rx50_mixups_CE_soft_alpha1_ep200.json",
        "rx50/mix_modepuzzlemix/rx50_mixups_CE_soft_alpha1_ep800.json",
        "rx50/mix_modesamix/rx50_samix_alpha2_ep200.json",
        "rx50/mix_modesamix/rx50_samix_alpha2_ep800.json",
        "rx50/mix_modemixup_cutmix/rx50_mixups_CE_none_multi_mode_alpha1-0_2_mix_prob0_7-0_3_ep200.json",
        "rx50/mix_modemixup_cutmix/rx50_mixups_CE_none_multi_mode_alpha1-0_2_mix_prob0_7-0_3_ep800.json",
        "rx50/train_1gpu.sh",
        "rx50/train_multi_gpu.sh",
        "rx50/train_slurm.sh",
        "gen-configs.manifest",
    ];
    assert_eq!(got, want);
}

#[test]
fn defaults_are_the_13_table_rows_at_upstream_epochs_with_the_spec_names() {
    assert_eq!(METHODS.len(), 13);
    let files = generate(&defaults_both()).unwrap();
    let names = paths(&files);
    assert_eq!(names.len(), 2 * (13 * 3 + 3) + 1);
    assert_eq!(names.last().unwrap(), MANIFEST_NAME);
    for want in [
        "r18/mix_modemixup/r18_mixups_CE_none_alpha1_ep800.json",
        "r18/mix_modevanilla/r18_mixups_CE_none_alpha1_ep400.json",
        "r18/mix_modesmoothmix/r18_mixups_CE_none_alpha0_5_ep1200.json",
        "rx50/mix_modesmoothmix/rx50_mixups_CE_none_alpha0_2_ep1200.json",
        "r18/mix_modepuzzlemix/r18_mixups_CE_soft_alpha1_ep400.json",
        "r18/mix_modeautomix/r18_automix_alpha2_ep800.json",
        "rx50/mix_modesamix/rx50_samix_alpha2_ep1200.json",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}");
    }
    assert!(
        !names.iter().any(|n| n.contains("_ep200")),
        "200 is not an upstream default"
    );
}

#[test]
fn every_config_parses_validates_and_matches_its_name() {
    let mut seen_names = BTreeMap::new();
    for f in generate(&defaults_both()).unwrap() {
        if f.path.extension().unwrap() != "json" {
            continue;
        }
        let origin = f.path.display().to_string();
        let cfg = RunConfig::from_json(&f.contents, &origin).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.to_json_pretty(),
            f.contents,
            "{origin}: not the canonical form"
        );
        let stem = f.path.file_stem().unwrap().to_str().unwrap();
        assert!(
            stem.ends_with(&format!("_ep{}", cfg.max_epochs)),
            "{origin}"
        );
        let bb = f
            .path
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let arch = if bb == "r18" {
            Arch::Resnet18
        } else {
            Arch::Resnext50
        };
        assert_eq!(cfg.model.backbone.arch, arch, "{origin}");
        let OneOrMany::One(mode) = &cfg.model.mix_mode else {
            panic!("{origin}: single mode expected")
        };
        let dir = f
            .path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(dir, format!("mix_mode{mode}"));
        let learned = mode == "automix" || mode == "samix";
        assert_eq!(
            cfg.lr_config.min_lr,
            if learned { 0.05 } else { 0.0 },
            "{origin}"
        );
        let loss = if mode == "puzzlemix" {
            HeadLoss::CeSoft
        } else {
            HeadLoss::CeNone
        };
        assert_eq!(cfg.model.head.loss, loss, "{origin}");
        assert_eq!(
            cfg.model.attention_weights.is_some(),
            mode == "attentivemix",
            "{origin}"
        );
        assert_eq!(
            cfg.work_dir.as_deref(),
            Some(format!("work_dirs/cifar10/{bb}/{dir}/{stem}").as_str())
        );
        if let Some(other) = seen_names.insert(cfg.name.clone(), origin.clone()) {
            panic!("{origin} and {other} share the run name {}", cfg.name);
        }
    }
}

#[test]
fn alpha_overrides_sweep_or_target_one_mode_and_loss_overrides_apply() {
    let opts = GenOptions {
        epochs: vec![400],
        modes: ["vanilla", "mixup", "cutmix"]
            .iter()
            .map(|m| parse_mode_item(m).unwrap())
            .collect(),
        alphas: ["0.2", "1", "cutmix=0.5"]
            .iter()
            .map(|a| AlphaOverride::parse(a).unwrap())
            .collect(),
        loss: Some(HeadLoss::CeSigm),
        ..GenOptions::default()
    };
    let names: Vec<String> = paths(&generate(&opts).unwrap())
        .into_iter()
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert_eq!(
        names,
        [
            "r18/mix_modevanilla/r18_mixups_CE_sigm_alpha1_ep400.json",
            "r18/mix_modemixup/r18_mixups_CE_sigm_alpha0_2_ep400.json",
            "r18/mix_modemixup/r18_mixups_CE_sigm_alpha1_ep400.json",
            "r18/mix_modecutmix/r18_mixups_CE_sigm_alpha0_5_ep400.json",
        ]
    );
}

#[test]
fn bad_flags_are_clear_errors() {
    assert!(parse_mode_item("mixupp")
        .unwrap_err()
        .to_string()
        .contains("unknown mode `mixupp`"));
    assert!(AlphaOverride::parse("x").is_err());
    assert!(AlphaOverride::parse("mixup=-1").is_err());
    let multi_learned = GenOptions {
        modes: vec![parse_mode_item("automix+mixup").unwrap()],
        ..GenOptions::default()
    };
    assert!(generate(&multi_learned)
        .unwrap_err()
        .to_string()
        .contains("automix"));
    let puzzle_ce_none = GenOptions {
        loss: Some(HeadLoss::CeNone),
        ..GenOptions::default()
    };
    assert!(generate(&puzzle_ce_none)
        .unwrap_err()
        .to_string()
        .contains("puzzlemix"));
    let prob_without_multi = GenOptions {
        mix_prob: Some(vec![1.0]),
        ..GenOptions::default()
    };
    assert!(generate(&prob_without_multi)
        .unwrap_err()
        .to_string()
        .contains("--mix-prob"));
    let bad_prob = GenOptions {
        modes: vec![parse_mode_item("mixup+cutmix").unwrap()],
        mix_prob: Some(vec![0.9, 0.9]),
        ..GenOptions::default()
    };
    assert!(generate(&bad_prob)
        .unwrap_err()
        .to_string()
        .contains("model.mix_prob"));
}

#[test]
fn scripts_parse_and_name_each_config_of_their_backbone_once() {
    let dir = temp_dir("scripts");
    let files = generate(&defaults_both()).unwrap();
    write(&dir, &files).unwrap();
    for bb in ["r18", "rx50"] {
        let configs: Vec<String> = files
            .iter()
            .filter(|f| f.path.starts_with(bb) && f.path.extension().unwrap() == "json")
            .map(|f| f.path.strip_prefix(bb).unwrap().display().to_string())
            .collect();
        assert_eq!(configs.len(), 39);
        for script in SCRIPT_NAMES {
            let path = dir.join(bb).join(script);
            let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert!(out.status.success(), "{}: {:?}", path.display(), out);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("#!/usr/bin/env bash\n"));
            assert!(text.contains("RUNNER=\"${RUNNER:-target/release/runner}\""));
            assert!(text.contains("--device cuda:0"));
            let listed: Vec<&str> = text
                .lines()
                .filter(|l| l.trim_start().starts_with("mix_mode"))
                .map(str::trim)
                .collect();
            assert_eq!(listed, configs, "{}", path.display());
            for c in &configs {
                assert_eq!(text.matches(c.as_str()).count(), 1, "{c} in {script}");
            }
        }
        let slurm = std::fs::read_to_string(dir.join(bb).join("train_slurm.sh")).unwrap();
        assert!(slurm.contains("#SBATCH --gres=gpu:1") && slurm.contains("srun "));
        assert!(slurm.contains("sbatch --array=0-38"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), bytes);
            }
        }
    }
    out
}

#[test]
fn the_cli_rerun_is_byte_identical_and_check_passes() {
    let (a, b) = (temp_dir("rerun-a"), temp_dir("rerun-b"));
    let run = |out: &Path, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args([
                "gen-configs",
                "--backbone",
                "r18,rx50",
                "--epochs",
                "200,400",
            ])
            .args(["--modes", "mixup,automix,mixup+gridmix", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&a, &[]);
    run(&a, &[]);
    run(&b, &[]);
    let (ta, tb) = (read_tree(&a), read_tree(&b));
    assert_eq!(ta.len(), 2 * (3 * 2 + 3) + 1);
    assert_eq!(ta, tb);
    run(&a, &["--check"]);
    std::fs::write(a.join("r18/stray.json"), "{}").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "gen-configs",
            "--backbone",
            "r18,rx50",
            "--epochs",
            "200,400",
        ])
        .args(["--modes", "mixup,automix,mixup+gridmix", "--check", "--out"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("stray.json"));
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn committed_configs_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cifar10");
    let problems = diff_tree(&root, &generate(&defaults_both()).unwrap()).unwrap();
    assert!(
        problems.is_empty(),
        "configs/cifar10 is stale; run `cargo xtask gen-configs --backbone r18,rx50 --out configs/cifar10`:\n{}",
        problems.join("\n")
    );
}

/// Writes an executable shell script.
#[cfg(unix)]
fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/usr/bin/env bash\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Polls `cond` for up to 20 s.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

#[cfg(unix)]
#[test]
fn scripts_resume_auto_and_the_slurm_task_forwards_sigterm() {
    let dir = temp_dir("resume");
    let opts = GenOptions {
        modes: vec![vec!["mixup".to_string()], vec!["cutmix".to_string()]],
        epochs: vec![400],
        ..GenOptions::default()
    };
    write(&dir, &generate(&opts).unwrap()).unwrap();
    let r18 = dir.join("r18");
    for name in SCRIPT_NAMES {
        let text = std::fs::read_to_string(r18.join(name)).unwrap();
        assert!(text.contains("--resume auto"), "{name}");
    }
    let slurm = r18.join("train_slurm.sh");
    let text = std::fs::read_to_string(&slurm).unwrap();
    for line in [
        "#SBATCH --requeue\n",
        "#SBATCH --signal=B:TERM@120\n",
        "trap on_term TERM\n",
    ] {
        assert!(text.contains(line), "{line}");
    }

    // The 1-GPU script passes --resume auto (then the caller's arguments) to every run.
    let calls = dir.join("calls.txt");
    let fake_runner = dir.join("fake_runner");
    script(
        &fake_runner,
        &format!("echo \"$*\" >> '{}'\n", calls.display()),
    );
    let o = Command::new("bash")
        .arg(r18.join("train_1gpu.sh"))
        .args(["--data", "/d"])
        .env("RUNNER", &fake_runner)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 2, "{calls}");
    for l in lines {
        assert!(
            l.ends_with("--device cuda:0 --resume auto --data /d"),
            "{l}"
        );
    }

    // A Slurm task: SIGTERM to the batch shell reaches the runner, and the shell waits for the
    // runner to save and exit, then exits with its status.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    script(&bin.join("srun"), "exec \"$@\"\n");
    let marks = dir.join("marks.txt");
    let runner = dir.join("slow_runner");
    script(
        &runner,
        &format!(
            "m='{}'\n\
             trap 'echo term >> \"$m\"; sleep 0.5; echo saved >> \"$m\"; exit 0' TERM\n\
             echo started >> \"$m\"\n\
             for _ in $(seq 200); do sleep 0.1; done\n\
             echo timeout >> \"$m\"; exit 3\n",
            marks.display()
        ),
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .arg(&slurm)
        .env("RUNNER", &runner)
        .env("PATH", path)
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("MIXBENCH_CONFIG_DIR", &r18)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let read_marks = || std::fs::read_to_string(&marks).unwrap_or_default();
    assert!(eventually(|| read_marks().contains("started")));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut status = None;
    assert!(eventually(|| {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    assert_eq!(read_marks(), "started\nterm\nsaved\n");
    assert!(status.unwrap().success(), "{status:?}");
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(
        out.contains("r18_mixups_CE_none_alpha0_2_ep400.json"),
        "{out}"
    );
    assert!(out.contains("SIGTERM"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The runner argument lines a fake runner recorded (one line per call), sorted.
#[cfg(unix)]
fn recorded_calls(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.sort();
    lines
}

#[cfg(unix)]
#[test]
fn scripts_pass_cuda_0_unless_the_arguments_name_a_device() {
    let dir = temp_dir("device");
    let opts = GenOptions {
        modes: vec![vec!["mixup".to_string()], vec!["cutmix".to_string()]],
        epochs: vec![400],
        ..GenOptions::default()
    };
    write(&dir, &generate(&opts).unwrap()).unwrap();
    let r18 = dir.join("r18");
    let calls = dir.join("calls.txt");
    let fake_runner = dir.join("fake_runner");
    script(
        &fake_runner,
        &format!("echo \"$*\" >> '{}'\n", calls.display()),
    );
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    script(&bin.join("srun"), "exec \"$@\"\n");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cfg = |stem: &str| format!("{}/mix_mode{stem}_ep400.json", r18.display());
    let mixup = cfg("mixup/r18_mixups_CE_none_alpha1");
    let cutmix = cfg("cutmix/r18_mixups_CE_none_alpha0_2");
    for (args, device) in [
        (&["--data", "/d"][..], "--device cuda:0 "),
        (&["--device", "cpu", "--data", "/d"][..], ""),
        (&["--data", "/d", "--device=cuda:1"][..], ""),
    ] {
        let tail = format!("{device}--resume auto {}", args.join(" "));
        let want = vec![
            format!("--config {cutmix} {tail}"),
            format!("--config {mixup} {tail}"),
        ];
        for (name, env) in [
            ("train_1gpu.sh", &[][..]),
            ("train_multi_gpu.sh", &[("GPUS", "3,4")][..]),
        ] {
            let o = Command::new("bash")
                .arg(r18.join(name))
                .args(args)
                .env("RUNNER", &fake_runner)
                .envs(env.iter().copied())
                .output()
                .unwrap();
            assert!(o.status.success(), "{name} {args:?}: {o:?}");
            assert_eq!(recorded_calls(&calls), want, "{name} {args:?}");
        }
        // Slurm task 1: the second config of the list, cutmix (`want` is sorted).
        let o = Command::new("bash")
            .arg(r18.join("train_slurm.sh"))
            .args(args)
            .env("RUNNER", &fake_runner)
            .env("PATH", &path)
            .env("SLURM_ARRAY_TASK_ID", "1")
            .env("MIXBENCH_CONFIG_DIR", &r18)
            .output()
            .unwrap();
        assert!(o.status.success(), "slurm {args:?}: {o:?}");
        assert_eq!(recorded_calls(&calls), want[..1], "slurm {args:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn xtask_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(dir)
        .arg("gen-configs")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn without_out_it_writes_a_tree_of_its_own_and_warns_about_missing_weights() {
    let dir = temp_dir("default-out");
    // The repository's layout: a committed configs/cifar10 that must not be touched.
    std::fs::create_dir_all(dir.join("configs/cifar10/r18")).unwrap();
    std::fs::write(dir.join("configs/cifar10/r18/mine.json"), "{}").unwrap();
    let o = xtask_in(&dir, &["--epochs", "200"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tree = read_tree(&dir.join("configs/generated"));
    assert!(tree.contains_key(Path::new(MANIFEST_NAME)));
    assert!(tree.contains_key(Path::new(
        "r18/mix_modemixup/r18_mixups_CE_none_alpha1_ep200.json"
    )));
    assert_eq!(read_tree(&dir.join("configs/cifar10")).len(), 1);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("warning:") && stderr.contains("weights/resnet18_imagenet.safetensors"),
        "{stderr}"
    );

    // With the weights in place, or without AttentiveMix+ configs, no warning.
    std::fs::create_dir_all(dir.join("weights")).unwrap();
    std::fs::write(dir.join("weights/resnet18_imagenet.safetensors"), "x").unwrap();
    let o = xtask_in(&dir, &["--epochs", "200"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
    let mixup_only = GenOptions {
        modes: vec![vec!["mixup".to_string()]],
        ..GenOptions::default()
    };
    assert!(missing_attention_weights(&mixup_only, &dir.join("nowhere")).is_none());
    assert!(missing_attention_weights(&GenOptions::default(), &dir.join("nowhere")).is_some());
    assert!(missing_attention_weights(&GenOptions::default(), &dir).is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_non_empty_tree_it_did_not_write_is_refused() {
    let dir = temp_dir("refuse");
    std::fs::create_dir_all(dir.join("hand/r18")).unwrap();
    std::fs::write(dir.join("hand/r18/train_1gpu.sh"), "mine").unwrap();
    let o = xtask_in(&dir, &["--modes", "mixup", "--out", "hand"]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("not written by gen-configs"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.join("hand/r18/train_1gpu.sh")).unwrap(),
        "mine"
    );
    assert_eq!(read_tree(&dir.join("hand")).len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn regenerating_an_owned_tree_prunes_what_it_no_longer_generates() {
    let dir = temp_dir("prune");
    let first = [
        "--modes",
        "mixup,cutmix",
        "--epochs",
        "200,400",
        "--out",
        "t",
    ];
    let o = xtask_in(&dir, &first);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A file of the user's in the tree: not in the manifest, so never deleted.
    std::fs::write(dir.join("t/NOTES.txt"), "mine").unwrap();
    let second = ["--modes", "mixup", "--epochs", "400", "--out", "t"];
    let o = xtask_in(&dir, &second);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("deleted 3 file(s)"));
    let tree: Vec<String> = read_tree(&dir.join("t"))
        .keys()
        .map(|p| p.display().to_string())
        .collect();
    let mut want = vec![
        "NOTES.txt",
        MANIFEST_NAME,
        "r18/mix_modemixup/r18_mixups_CE_none_alpha1_ep400.json",
        "r18/train_1gpu.sh",
        "r18/train_multi_gpu.sh",
        "r18/train_slurm.sh",
    ];
    want.sort();
    let mut tree = tree;
    tree.sort();
    assert_eq!(tree, want);
    assert!(
        !dir.join("t/r18/mix_modecutmix").exists(),
        "emptied dirs are removed"
    );
    let listed = read_manifest(&dir.join("t").join(MANIFEST_NAME)).unwrap();
    assert_eq!(listed.len(), 4);
    let o = xtask_in(&dir, &[&second[..], &["--check"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_manifest_cannot_point_outside_its_tree() {
    let dir = temp_dir("manifest");
    std::fs::create_dir_all(dir.join("t")).unwrap();
    std::fs::write(dir.join("victim.txt"), "keep").unwrap();
    std::fs::write(
        dir.join("t").join(MANIFEST_NAME),
        "# comment\nr18/a.json\n../victim.txt\n",
    )
    .unwrap();
    let e = read_manifest(&dir.join("t").join(MANIFEST_NAME)).unwrap_err();
    assert!(e.to_string().contains("../victim.txt"), "{e}");
    let files = generate(&GenOptions {
        modes: vec![vec!["mixup".to_string()]],
        ..GenOptions::default()
    })
    .unwrap();
    assert!(write(&dir.join("t"), &files).is_err());
    assert_eq!(
        std::fs::read_to_string(dir.join("victim.txt")).unwrap(),
        "keep"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
