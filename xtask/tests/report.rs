//! `report` on hand-written fixture logs (`tests/fixtures/work_dirs`): medians
//! computed by hand, table layout, CSV, published comparison, plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use xtask::methods::Backbone;
use xtask::report::{load_runs, read_log, read_log_lenient, tables, Run};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/work_dirs")
}

fn run_named<'a>(runs: &'a [Run], name: &str) -> &'a Run {
    runs.iter().find(|r| r.name == name).unwrap()
}

#[test]
fn medians_of_the_fixture_runs() {
    let runs = load_runs(&[fixtures()]).unwrap();
    assert_eq!(runs.len(), 4, "the two cutmix logs are one resumed run");

    // Epochs 10..20: 90.1 90.5 91.0 90.2 91.3 90.8 91.1 90.9 91.2 90.7 91.4 → sorted 6th = 90.9;
    // epochs 11..20 → middle pair (90.9, 91.0).
    let s = run_named(&runs, "r18_mixup_CE_none_alpha1_ep20")
        .summary()
        .unwrap();
    assert!(s.finished && s.last_epoch == 20 && s.head == "head0" && s.n_values == 11);
    assert!((s.median - 90.9).abs() < 1e-9 && (s.median_last_w - 90.95).abs() < 1e-9);

    // Unfinished (15/30): epochs 5..8 from the first log (65..68), 9..15 from the
    // resumed log (89..95, replacing 69, 70) → median 90; epochs 6..15 → (90 + 91)/2.
    let s = run_named(&runs, "r18_cutmix_CE_none_alpha0_2_ep30")
        .summary()
        .unwrap();
    assert!(!s.finished && s.last_epoch == 15 && s.n_values == 11);
    assert_eq!((s.median, s.median_last_w), (90.0, 90.5));

    // AutoMix, epochs 2..12: one_k = 72..82 → 77; mix_k = 78..68 → 73; one_q = 76/77
    // alternating (six 76s) → 76; mix_q = 60 → reported max: one_k 77.
    // Epochs 3..12: one_k 77.5, mix_k 72.5, one_q 76.5 → 77.5.
    let s = run_named(&runs, "r18_automix_alpha2_ep12")
        .summary()
        .unwrap();
    assert_eq!(
        (s.head.as_str(), s.median, s.median_last_w),
        ("acc_one_k", 77.0, 77.5)
    );

    // Three epochs only: median of 10, 30, 20.
    let s = run_named(&runs, "rx50_puzzlemix_CE_soft_alpha1_ep3")
        .summary()
        .unwrap();
    assert_eq!((s.median, s.n_values), (20.0, 3));
}

#[test]
fn table_layout_and_csv() {
    let runs = load_runs(&[fixtures()]).unwrap();
    let t = tables(&runs, false).unwrap();
    let md: Vec<&str> = t.markdown.lines().collect();
    let r18 = md
        .iter()
        .position(|l| l.starts_with("## ResNet-18"))
        .unwrap();
    assert_eq!(
        &md[r18 + 2..r18 + 7],
        [
            "| Method | α | 12 ep | 20 ep | 30 ep |",
            "|---|:---:|:---:|:---:|:---:|",
            "| MixUp | 1 | – | 90.90 | – |",
            "| CutMix | 0.2 | – | – | 90.00 (ep 15/30) |",
            "| AutoMix | 2 | 77.00 | – | – |",
        ]
    );
    let rx50 = md
        .iter()
        .position(|l| l.starts_with("## ResNeXt-50"))
        .unwrap();
    assert_eq!(
        &md[rx50 + 2..rx50 + 5],
        [
            "| Method | α | 3 ep |",
            "|---|:---:|:---:|",
            "| PuzzleMix | 1 | 20.00 |"
        ]
    );
    let csv: Vec<&str> = t.csv.lines().collect();
    assert_eq!(csv.len(), 5);
    assert!(csv[0].starts_with("backbone,method,mix_mode,alpha,loss,epochs,last_epoch,finished,head,top1_median,top1_median_last10,"));
    let mixup = csv.iter().find(|l| l.contains(",mixup,")).unwrap();
    assert!(
        mixup.starts_with("ResNet-18,MixUp,mixup,1,CE_none,20,20,true,head0,90.90,90.95,11,,,r18_mixup_CE_none_alpha1_ep20,"),
        "{mixup}"
    );
    let cutmix = csv.iter().find(|l| l.contains(",cutmix,")).unwrap();
    assert!(
        cutmix.contains(",30,15,false,head0,90.00,90.50,11,"),
        "{cutmix}"
    );
    let automix = csv.iter().find(|l| l.contains(",automix,")).unwrap();
    assert!(
        automix.contains(",automix,2,-,12,12,true,acc_one_k,77.00,77.50,11,"),
        "{automix}"
    );
}

fn synthetic(mode: &str, alpha: f64, epochs: usize, accs: &[(usize, f64)]) -> Run {
    Run {
        dir: PathBuf::from(format!("work_dirs/{mode}")),
        name: format!("r18_{mode}_ep{epochs}"),
        backbone: Backbone::R18,
        modes: vec![mode.into()],
        alphas: vec![alpha],
        loss: "CE_none".into(),
        max_epochs: epochs,
        median_window: 10,
        val: accs
            .iter()
            .map(|&(e, v)| (e, BTreeMap::from([("head0".to_string(), v)])))
            .collect(),
    }
}

#[test]
fn published_numbers_sit_beside_ours_only_for_the_tables_settings() {
    let flat = |v: f64| (790..=800).map(|e| (e, v)).collect::<Vec<_>>();
    let runs = vec![
        synthetic("mixup", 1.0, 800, &flat(96.5)),
        synthetic("cutmix", 0.5, 800, &flat(96.0)),
    ];
    let t = tables(&runs, true).unwrap();
    assert!(
        t.markdown
            .contains("| MixUp | 1 | 96.50 (pub 96.62, -0.12) |"),
        "{}",
        t.markdown
    );
    assert!(
        t.markdown.contains("| CutMix | 0.5 | 96.00 |"),
        "{}",
        t.markdown
    );
    assert!(
        t.csv
            .contains(",96.50,96.50,11,96.62,-0.12,r18_mixup_ep800,"),
        "{}",
        t.csv
    );
}

#[test]
fn a_log_without_meta_line_is_an_error_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("xtask-report-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x.log.json");
    std::fs::write(
        &path,
        "{\"mode\": \"val\", \"epoch\": 1, \"head0_top1\": 1}\n",
    )
    .unwrap();
    let e = read_log(&path).unwrap_err().to_string();
    assert!(e.contains("x.log.json") && e.contains("config"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_cli_writes_markdown_csv_and_plots() {
    let out = std::env::temp_dir().join(format!("xtask-report-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("report")
        .arg(fixtures())
        .arg("--compare-published")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| MixUp | 1 | – | 90.90 | – |"));
    for f in [
        "benchmark.md",
        "benchmark.csv",
        "plots/run_r18_mixup_CE_none_alpha1_ep20.png",
        "plots/run_r18_automix_alpha2_ep12.png",
        "plots/compare_r18_ep20.png",
        "plots/compare_rx50_ep3.png",
    ] {
        let bytes = std::fs::read(out.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        if f.ends_with(".png") {
            assert_eq!(&bytes[1..4], b"PNG", "{f}");
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn unreadable_lines_are_skipped_and_named_not_fatal() {
    let dir = std::env::temp_dir().join(format!("xtask-report-lenient-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run_dir = dir.join("r18_mixup");
    std::fs::create_dir_all(&run_dir).unwrap();
    let meta = r#"{"env_info": "t", "config": "{\"name\": \"r18_mixup_CE_none_alpha1_ep3\", \"model\": {\"mix_mode\": \"mixup\", \"alpha\": 1.0, \"backbone\": {\"arch\": \"resnet18\"}}, \"max_epochs\": 3}", "seed": 0, "exp_name": "x"}"#;
    let log = [
        meta,
        r#"{"mode": "val", "epoch": 1, "iter": 10, "head0_top1": 50.0}"#,
        r#"{"mode": "val", "epoch": 2, "iter": 10, "head0_to"#, // a torn write, then a newline
        r#"{"mode": "val", "epoch": "three", "head0_top1": 70.0}"#,
        r#"{"mode": "val", "epoch": 2, "iter": 10, "head0_top5": 99.0}"#,
        r#"{"mode": "val", "epoch": 3, "iter": 10, "head0_top1": 80.0}"#,
    ]
    .join("\n")
        + "\n";
    let path = run_dir.join("20240101_000000.log.json");
    std::fs::write(&path, log).unwrap();

    let (run, skipped) = read_log_lenient(&path).unwrap();
    assert_eq!(run.val.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
    let lines: Vec<usize> = skipped.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, vec![3, 4, 5], "{skipped:?}");
    assert!(skipped[0].1.contains("not JSON"), "{skipped:?}");

    // The table still comes out; the CLI names each skipped line as file:line on stderr.
    let runs = load_runs(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(runs.len(), 1);
    let out = dir.join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("report")
        .arg(&dir)
        .arg("--no-plots")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for line in [3, 4, 5] {
        let at = format!("20240101_000000.log.json:{line}:");
        assert!(stderr.contains(&at), "no warning for line {line}: {stderr}");
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("MixUp"));
    std::fs::remove_dir_all(&dir).unwrap();
}
