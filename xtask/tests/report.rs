//! `report` on hand-written fixture logs (`tests/fixtures/work_dirs`): medians
//! computed by hand, table layout, CSV, published comparison, plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use xtask::methods::Backbone;
use xtask::report::{
    load_runs, read_log, read_log_lenient, run_plot_stems, tables, Run, TableOptions, CSV_HEADER,
};

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

const DEFAULT: TableOptions = TableOptions {
    compare_published: false,
    include_nonrecipe: false,
};
const WITH_NONRECIPE: TableOptions = TableOptions {
    compare_published: false,
    include_nonrecipe: true,
};

/// Splits one CSV line (RFC 4180 quoting) into its fields.
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

fn csv_column(csv: &str, line: &str, column: &str) -> String {
    let header = csv_fields(csv.lines().next().unwrap());
    let i = header.iter().position(|h| h == column).unwrap();
    let fields = csv_fields(line);
    assert_eq!(fields.len(), header.len(), "{line}");
    fields[i].clone()
}

#[test]
fn table_layout_and_csv() {
    let runs = load_runs(&[fixtures()]).unwrap();
    let t = tables(&runs, &DEFAULT).unwrap();
    let md: Vec<&str> = t.markdown.lines().collect();
    let r18 = md
        .iter()
        .position(|l| l.starts_with("## ResNet-18"))
        .unwrap();
    // The unfinished CutMix run is not the recipe: left out, and said so.
    assert_eq!(
        &md[r18 + 2..r18 + 6],
        [
            "| Method | α | 12 ep | 20 ep |",
            "|---|:---:|:---:|:---:|",
            "| MixUp | 1 | – | 90.90 |",
            "| AutoMix | 2 | 77.00 | – |",
        ]
    );
    assert!(
        t.markdown.contains("1 other run(s) are left out"),
        "{}",
        t.markdown
    );
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("r18_cutmix") && w.contains("unfinished (epoch 15/30)")),
        "{:?}",
        t.warnings
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
    assert_eq!(csv.len(), 4);
    assert_eq!(csv[0], CSV_HEADER);
    assert!(csv[0].starts_with("backbone,method,mix_mode,alpha,loss,epochs,seed,last_epoch,finished,head,top1_median,top1_median_last10,n_values,cell_n,cell_median,cell_mean,cell_std,published,diff,recipe,nonrecipe,base_width,stage_blocks,batch_size,limit_train,limit_test,name,work_dir"));
    let mixup = csv.iter().find(|l| l.contains(",mixup,")).unwrap();
    assert!(
        mixup.starts_with("ResNet-18,MixUp,mixup,1,CE_none,20,0,20,true,head0,90.90,90.95,11,1,90.90,90.90,,,,true,,64,,100,,,r18_mixup_CE_none_alpha1_ep20,"),
        "{mixup}"
    );
    let automix = csv.iter().find(|l| l.contains(",automix,")).unwrap();
    assert!(
        automix.contains(",automix,2,-,12,0,12,true,acc_one_k,77.00,77.50,11,"),
        "{automix}"
    );

    // Asked for, the unfinished run gets a marked row of its own and a footnote.
    let t = tables(&runs, &WITH_NONRECIPE).unwrap();
    assert!(
        t.markdown
            .contains("| CutMix †1 | 0.2 | – | – | 90.00 (ep 15/30) |"),
        "{}",
        t.markdown
    );
    assert!(
        t.markdown
            .contains("†1 Not the benchmark recipe: unfinished."),
        "{}",
        t.markdown
    );
    let cutmix = t.csv.lines().find(|l| l.contains(",cutmix,")).unwrap();
    assert!(
        cutmix.contains(",30,0,15,false,head0,90.00,90.50,11,"),
        "{cutmix}"
    );
    assert_eq!(csv_column(&t.csv, cutmix, "recipe"), "false");
    assert_eq!(csv_column(&t.csv, cutmix, "nonrecipe"), "unfinished");
}

fn synthetic(mode: &str, alpha: f64, epochs: usize, accs: &[(usize, f64)]) -> Run {
    Run {
        dir: PathBuf::from(format!("work_dirs/{mode}")),
        name: format!("r18_{mode}_ep{epochs}"),
        backbone: Backbone::R18,
        modes: vec![mode.into()],
        alphas: vec![alpha],
        max_epochs: epochs,
        val: accs
            .iter()
            .map(|&(e, v)| (e, BTreeMap::from([("head0".to_string(), v)])))
            .collect(),
        ..Run::default()
    }
}

fn flat(epochs: usize, v: f64) -> Vec<(usize, f64)> {
    (epochs - 10..=epochs).map(|e| (e, v)).collect()
}

#[test]
fn published_numbers_sit_beside_ours_only_for_the_tables_settings() {
    let runs = vec![
        synthetic("mixup", 1.0, 800, &flat(800, 96.5)),
        synthetic("cutmix", 0.5, 800, &flat(800, 96.0)),
    ];
    let compare = TableOptions {
        compare_published: true,
        include_nonrecipe: false,
    };
    let t = tables(&runs, &compare).unwrap();
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
            .contains(",96.50,96.50,11,1,96.50,96.50,,96.62,-0.12,true,"),
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
fn the_cli_writes_markdown_csv_and_svg_plots() {
    let out = std::env::temp_dir().join(format!("xtask-report-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("report")
        .arg(fixtures())
        .arg("--compare-published")
        .arg("--include-nonrecipe")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| MixUp | 1 | – | 90.90 | – |"));
    let read =
        |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
    read("benchmark.md");
    read("benchmark.csv");
    // Per run: test top-1 of every head, train loss and lr, against integer epochs.
    for (f, heads) in [
        ("plots/run_r18_mixup_CE_none_alpha1_ep20_seed0.svg", &[][..]),
        (
            "plots/run_r18_automix_alpha2_ep12_seed0.svg",
            &["acc_one_k", "acc_mix_k", "acc_one_q", "acc_mix_q"][..],
        ),
        (
            "plots/run_r18_cutmix_CE_none_alpha0_2_ep30_seed0.svg",
            &[][..],
        ),
    ] {
        let svg = read(f);
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{f}");
        for text in [
            "epoch",
            "test top-1 (%)",
            "train loss",
            "learning rate",
            "seed 0",
            "α=",
        ] {
            assert!(svg.contains(text), "{f}: no {text}");
        }
        for h in heads {
            assert!(svg.contains(h), "{f}: no {h}");
        }
        assert!(svg.contains("<circle"), "{f}: no markers");
    }
    // Per column: the methods, ours beside the published number.
    for (f, methods) in [
        ("plots/compare_r18_ep20.svg", &["MixUp (α=1)"][..]),
        ("plots/compare_r18_ep12.svg", &["AutoMix (α=2)"][..]),
        ("plots/compare_r18_ep30.svg", &["CutMix †1 (α=0.2)"][..]),
        ("plots/compare_rx50_ep3.svg", &["PuzzleMix (α=1)"][..]),
    ] {
        let svg = read(f);
        assert!(svg.contains("<svg"), "{f}");
        for text in methods
            .iter()
            .chain(&["test top-1 (%)", "ours", "published"])
        {
            assert!(svg.contains(text), "{f}: no {text}");
        }
    }
    let pngs = std::fs::read_dir(out.join("plots"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().unwrap() != "svg")
        .count();
    assert_eq!(pngs, 0, "only SVG plots");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn runs_sharing_a_name_get_their_own_plots() {
    let root = std::env::temp_dir().join(format!("xtask-report-names-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let vals: Vec<String> = (1..=3)
        .map(|e| {
            format!(
                r#"{{"mode": "val", "epoch": {e}, "head0_top1": {}}}"#,
                50 + e
            )
        })
        .collect();
    let lines: Vec<&str> = vals.iter().map(String::as_str).collect();
    let cfg = |seed: u64| {
        format!(
            r#"{{"name": "same", "model": {{"mix_mode": "mixup"}}, "max_epochs": 3, "seed": {seed}}}"#
        )
    };
    write_log(&root.join("runs/a"), &cfg(0), &lines);
    write_log(&root.join("runs/b"), &cfg(1), &lines);
    write_log(&root.join("runs/c"), &cfg(0), &lines);
    let out = root.join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("report")
        .arg(root.join("runs"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "run_same_seed0.svg",
        "run_same_seed1.svg",
        "run_same_seed0_2.svg",
    ] {
        assert!(out.join("plots").join(f).is_file(), "{f} missing");
    }
    std::fs::remove_dir_all(&root).unwrap();
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

fn nonrecipe_runs() -> Vec<Run> {
    let recipe = synthetic("mixup", 1.0, 800, &flat(800, 96.5));
    let small = Run {
        base_width: 16,
        dir: PathBuf::from("work_dirs/small"),
        ..synthetic("mixup", 1.0, 800, &flat(800, 80.0))
    };
    let subset = Run {
        limit_train: Some(2000),
        limit_test: Some(500),
        dir: PathBuf::from("work_dirs/subset"),
        ..synthetic("mixup", 1.0, 800, &flat(800, 70.0))
    };
    let reshaped = Run {
        stage_blocks: Some(vec![1, 1, 1, 1]),
        batch_size: 50,
        dir: PathBuf::from("work_dirs/reshaped"),
        ..synthetic("mixup", 1.0, 800, &flat(800, 60.0))
    };
    // `--epochs 2` on the 800-epoch config: its name still says ep800.
    let short = Run {
        name: "r18_mixups_CE_none_alpha1_ep800".into(),
        dir: PathBuf::from("work_dirs/r18_mixups_CE_none_alpha1_ep800"),
        ..synthetic("mixup", 1.0, 2, &[(1, 30.0), (2, 40.0)])
    };
    vec![recipe, small, subset, reshaped, short]
}

#[test]
fn nonrecipe_runs_are_left_out_or_marked_never_silently_in_a_cell() {
    let runs = nonrecipe_runs();
    assert!(runs[0].nonrecipe_reasons().is_empty());
    assert_eq!(
        runs[1].nonrecipe_reasons(),
        ["model.backbone.base_width 16 (recipe 64)"]
    );
    assert_eq!(
        runs[2].nonrecipe_reasons(),
        [
            "data.limit_train 2000 (recipe: all 50000 images)",
            "data.limit_test 500 (recipe: all 10000 images)"
        ]
    );
    assert_eq!(
        runs[3].nonrecipe_reasons(),
        [
            "model.backbone.stage_blocks [1, 1, 1, 1] (recipe: the architecture's)",
            "data.batch_size 50 (recipe 100)"
        ]
    );
    assert_eq!(
        runs[4].nonrecipe_reasons(),
        [
            "max_epochs 2, but its name says _ep800",
            "max_epochs 2, but its work dir says _ep800"
        ]
    );

    let t = tables(&runs, &DEFAULT).unwrap();
    assert!(
        t.markdown.contains("| MixUp | 1 | 96.50 |"),
        "{}",
        t.markdown
    );
    assert!(!t.markdown.contains('†') || t.markdown.contains("marked †)"));
    assert!(!t.markdown.contains("| 2 ep |") && !t.markdown.contains("80.00"));
    assert!(
        t.markdown.contains("4 other run(s) are left out"),
        "{}",
        t.markdown
    );
    assert_eq!(t.csv.lines().count(), 2, "{}", t.csv);
    for dir in [
        "small",
        "subset",
        "reshaped",
        "r18_mixups_CE_none_alpha1_ep800",
    ] {
        assert!(
            t.warnings
                .iter()
                .any(|w| w.contains(&format!("work_dirs/{dir} ")) && w.contains("left out")),
            "{dir}: {:?}",
            t.warnings
        );
    }

    let t = tables(&runs, &WITH_NONRECIPE).unwrap();
    let md = &t.markdown;
    for line in [
        "| Method | α | 2 ep | 800 ep |",
        "| MixUp | 1 | – | 96.50 |",
        "| MixUp †1 | 1 | – | 70.00 |",
        "| MixUp †2 | 1 | 35.00 | – |",
        "| MixUp †3 | 1 | – | 80.00 |",
        "| MixUp †4 | 1 | – | 60.00 |",
        "†3 Not the benchmark recipe: model.backbone.base_width 16 (recipe 64).  ",
        "†2 Not the benchmark recipe: max_epochs 2, but its name says _ep800; max_epochs 2, but its work dir says _ep800.  ",
    ] {
        assert!(md.lines().any(|l| l == line), "no `{line}` in\n{md}");
    }
    let csv: Vec<&str> = t.csv.lines().collect();
    assert_eq!(csv.len(), 6);
    let subset = csv.iter().find(|l| l.contains("work_dirs/subset")).unwrap();
    assert_eq!(csv_column(&t.csv, subset, "recipe"), "false");
    assert_eq!(csv_column(&t.csv, subset, "limit_train"), "2000");
    assert_eq!(csv_column(&t.csv, subset, "limit_test"), "500");
    assert_eq!(csv_column(&t.csv, subset, "cell_n"), "1");
    let reshaped = csv
        .iter()
        .find(|l| l.contains("work_dirs/reshaped"))
        .unwrap();
    assert_eq!(csv_column(&t.csv, reshaped, "stage_blocks"), "1 1 1 1");
    assert_eq!(csv_column(&t.csv, reshaped, "batch_size"), "50");
    let small = csv.iter().find(|l| l.contains("work_dirs/small")).unwrap();
    assert_eq!(csv_column(&t.csv, small, "base_width"), "16");
}

#[test]
fn seeds_of_a_cell_are_aggregated_not_overwritten() {
    let seeded = |seed: u64, v: f64| Run {
        seed,
        dir: PathBuf::from(format!("work_dirs/mixup_s{seed}")),
        ..synthetic("mixup", 1.0, 800, &flat(800, v))
    };
    let mut runs = vec![seeded(0, 96.0), seeded(1, 96.6), seeded(2, 96.2)];
    // The same seed again in another work dir, as far: the first is kept.
    runs.push(Run {
        dir: PathBuf::from("work_dirs/mixup_s1_again"),
        ..seeded(1, 10.0)
    });
    let mut with_pub = DEFAULT;
    with_pub.compare_published = true;
    let t = tables(&runs, &with_pub).unwrap();
    assert!(
        t.markdown.contains("finished) fill the cells.\n\n"),
        "no run is left out: {}",
        t.markdown
    );
    assert!(
        t.markdown
            .contains("| MixUp | 1 | 96.20 (n=3) (pub 96.62, -0.42) |"),
        "{}",
        t.markdown
    );
    let lines: Vec<&str> = t.csv.lines().skip(1).collect();
    assert_eq!(lines.len(), 3, "{}", t.csv);
    let seeds: Vec<String> = lines
        .iter()
        .map(|l| csv_column(&t.csv, l, "seed"))
        .collect();
    assert_eq!(seeds, ["0", "1", "2"]);
    for l in &lines {
        assert_eq!(csv_column(&t.csv, l, "cell_n"), "3");
        assert_eq!(csv_column(&t.csv, l, "cell_median"), "96.20");
        assert_eq!(csv_column(&t.csv, l, "cell_mean"), "96.27");
        // sqrt(((−0.2667)² + 0.3333² + (−0.0667)²) / 2) = 0.3055
        assert_eq!(csv_column(&t.csv, l, "cell_std"), "0.31");
        assert_eq!(csv_column(&t.csv, l, "diff"), "-0.42");
    }
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("mixup_s1_again") && w.contains("seed 1; keeping the first")),
        "{:?}",
        t.warnings
    );
}

#[test]
fn plot_names_of_runs_sharing_a_name_differ() {
    let a = synthetic("mixup", 1.0, 800, &flat(800, 96.0));
    let b = Run {
        seed: 1,
        ..a.clone()
    };
    let c = Run {
        dir: PathBuf::from("elsewhere"),
        ..a.clone()
    };
    assert_eq!(
        run_plot_stems(&[a, b, c]),
        [
            "run_r18_mixup_ep800_seed0",
            "run_r18_mixup_ep800_seed1",
            "run_r18_mixup_ep800_seed0_2"
        ]
    );
}

/// Writes a runner-style log: the meta line with `config` as JSON text, then `lines`.
fn write_log(dir: &Path, config: &str, lines: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let meta = serde_json::json!({"env_info": "t", "config": config, "seed": 0, "exp_name": "x"});
    let mut text = meta.to_string() + "\n";
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    let path = dir.join("20240101_000000.log.json");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn configs_without_alpha_and_full_runner_configs_are_read() {
    let root = std::env::temp_dir().join(format!("xtask-report-cfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let val = |e: usize, v: f64| format!(r#"{{"mode": "val", "epoch": {e}, "head0_top1": {v}}}"#);
    let vals: Vec<String> = (1..=3).map(|e| val(e, 50.0 + e as f64)).collect();
    let mut lines: Vec<&str> = vals.iter().map(String::as_str).collect();

    // Hand-written: no alpha, no arch, no seed.
    let hand = write_log(
        &root.join("hand"),
        r#"{"name": "cut", "model": {"mix_mode": "cutmix"}, "max_epochs": 3}"#,
        &lines,
    );
    let run = read_log(&hand).unwrap();
    assert_eq!((run.alphas.as_slice(), run.seed), (&[0.2][..], 0));
    assert!(run.nonrecipe_reasons().is_empty());

    // What the runner logs: every field, nulls included; a smoke run on a subset, with a
    // config change on resume and its train lines.
    let mut cfg = bench_config::RunConfig {
        name: "r18_smoke".into(),
        max_epochs: 3,
        seed: 7,
        ..bench_config::RunConfig::default()
    };
    cfg.data.limit_train = Some(100);
    cfg.model.backbone.base_width = 8;
    lines.extend([
        r#"{"mode": "train", "epoch": 1, "iter": 50, "lr": 0.1, "loss": 2.5}"#,
        r#"{"mode": "train", "epoch": 1, "iter": 100, "lr": 0.1, "loss": 2.0}"#,
        r#"{"mode": "config_change", "epoch": 2, "changed": ["optimizer.lr: 0.1 -> 0.2"]}"#,
        r#"{"mode": "resumed", "epoch": 2}"#,
        r#"{"mode": "summary", "max_epochs": 3, "median_top1": 52.0}"#,
    ]);
    let full = write_log(&root.join("full"), &cfg.to_json_pretty(), &lines);
    let run = read_log(&full).unwrap();
    assert_eq!(
        (run.seed, run.base_width, run.limit_train),
        (7, 8, Some(100))
    );
    assert_eq!((run.alphas.as_slice(), run.limit_test), (&[1.0][..], None));
    assert_eq!(run.train.len(), 2);
    assert_eq!(run.val.len(), 3);
    let reasons = run.nonrecipe_reasons();
    assert_eq!(
        reasons,
        [
            "model.backbone.base_width 8 (recipe 64)",
            "data.limit_train 100 (recipe: all 50000 images)",
            "config changed on resume: optimizer.lr: 0.1 -> 0.2"
        ]
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_report_cites_only_files_in_the_repository() {
    let runs = nonrecipe_runs();
    let all = TableOptions {
        compare_published: true,
        include_nonrecipe: true,
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for opts in [DEFAULT, all] {
        let md = tables(&runs, &opts).unwrap().markdown;
        assert!(!md.contains("spec") && !md.contains('§'), "{md}");
        let cited: Vec<&str> = md
            .split(|c: char| c.is_whitespace() || "`()[],;".contains(c))
            .map(|w| w.trim_end_matches('.'))
            .filter(|w| w.contains('/') && (w.ends_with(".md") || w.ends_with(".csv")))
            .collect();
        assert!(!cited.is_empty());
        for c in cited {
            assert!(
                root.join(c).is_file(),
                "the report cites {c}, not in the repository"
            );
        }
    }
}
