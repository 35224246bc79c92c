//! `report` on hand-written fixture logs (`tests/fixtures/work_dirs`): medians
//! computed by hand, table layout, CSV, published comparison, plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use xtask::methods::Backbone;
use xtask::report::{
    load_runs, read_log, read_log_lenient, run_plot_stems, tables, End, Run, Status, TableOptions,
    CSV_HEADER,
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
    assert!(s.reached_max_epochs && s.last_epoch == 20 && s.head == "head0" && s.n_values == 11);
    assert!((s.median - 90.9).abs() < 1e-9 && (s.median_last_w.unwrap() - 90.95).abs() < 1e-9);

    // Unfinished (15/30): epochs 5..8 from the first log (65..68), 9..15 from the
    // resumed log (89..95, replacing 69, 70) → median 90; epochs 6..15 → (90 + 91)/2.
    let s = run_named(&runs, "r18_cutmix_CE_none_alpha0_2_ep30")
        .summary()
        .unwrap();
    assert!(!s.reached_max_epochs && s.last_epoch == 15 && s.n_values == 11);
    assert_eq!((s.median, s.median_last_w), (90.0, Some(90.5)));

    // AutoMix, epochs 2..12: one_k = 72..82 → 77; mix_k = 78..68 → 73; one_q = 76/77
    // alternating (six 76s) → 76; mix_q = 60 → reported max: one_k 77.
    // Epochs 3..12: one_k 77.5, mix_k 72.5, one_q 76.5 → 77.5.
    let s = run_named(&runs, "r18_automix_alpha2_ep12")
        .summary()
        .unwrap();
    assert_eq!(
        (s.head.as_str(), s.median, s.median_last_w),
        ("acc_one_k", 77.0, Some(77.5))
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
        end: Some(End::Finished {
            source: "result.json".into(),
            median_top1: None,
        }),
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
    // The unfinished run's plot says so; the finished ones' say nothing of the kind.
    assert!(read("plots/run_r18_cutmix_CE_none_alpha0_2_ep30_seed0.svg")
        .contains("interrupted at epoch 15 of 30"));
    assert!(!read("plots/run_r18_mixup_CE_none_alpha1_ep20_seed0.svg").contains("interrupted"));
    // Per column: the methods, ours (no published number at these epochs, so no
    // "published" legend entry), and every method's learning curve.
    for (col, methods) in [
        ("r18_ep20", &["MixUp (α=1)"][..]),
        ("r18_ep12", &["AutoMix (α=2)"][..]),
        ("r18_ep30", &["CutMix †1 (α=0.2)"][..]),
        ("rx50_ep3", &["PuzzleMix (α=1)"][..]),
    ] {
        let f = format!("plots/compare_{col}.svg");
        let svg = read(&f);
        assert!(svg.contains("<svg"), "{f}");
        for text in methods.iter().chain(&["test top-1 (%)", "ours"]) {
            assert!(svg.contains(text), "{f}: no {text}");
        }
        assert!(!svg.contains("published"), "{f}: nothing published drawn");
        let f = format!("plots/curves_{col}.svg");
        let svg = read(&f);
        for text in methods.iter().chain(&["test top-1 (%)", "epoch"]) {
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
        r#"{"mode": "summary", "max_epochs": 3, "median_top1": 65.0}"#,
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
    assert!(String::from_utf8_lossy(&o.stdout).contains("| MixUp | 1 | 65.00 |"));
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

/// A fresh temporary directory for one test.
fn temp_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("xtask-report-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

fn val_line(epoch: usize, top1: f64) -> String {
    format!(r#"{{"mode": "val", "epoch": {epoch}, "iter": 10, "head0_top1": {top1}}}"#)
}

fn summary_line(max_epochs: usize, median: f64) -> String {
    format!(r#"{{"mode": "summary", "max_epochs": {max_epochs}, "median_top1": {median}}}"#)
}

/// A run config: `mode` at its table α, `epochs` epochs, `seed`, plus `extra` fields.
fn config(name: &str, mode: &str, epochs: usize, seed: u64, extra: &str) -> String {
    format!(
        r#"{{"name": "{name}", "model": {{"mix_mode": "{mode}"}}, "max_epochs": {epochs}, "seed": {seed}{extra}}}"#
    )
}

/// Writes a work dir's log (meta line + `lines`).
fn write_run(dir: &Path, config: &str, lines: &[String]) {
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    write_log(dir, config, &lines);
}

fn report_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("report")
        .args(args)
        .output()
        .unwrap()
}

fn status_of<'a>(runs: &'a [Run], dir: &str) -> (&'a Run, Status) {
    let run = runs
        .iter()
        .find(|r| r.dir.ends_with(dir))
        .unwrap_or_else(|| panic!("no run in {dir}"));
    (run, run.status())
}

fn assert_failed(runs: &[Run], dir: &str, wants: &[&str]) {
    let (_, status) = status_of(runs, dir);
    let Status::Failed(_) = &status else {
        panic!("{dir}: {status:?}, expected failed")
    };
    for want in wants {
        assert!(
            status.detail().contains(want),
            "{dir}: no `{want}` in {status:?}"
        );
    }
}

#[test]
fn a_diverged_run_is_failed_listed_and_counted_in_no_cell() {
    let root = temp_root("diverged");
    let runs_dir = root.join("runs");
    let finished = |e: usize, vals: &[f64]| -> Vec<String> {
        let mut lines: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| val_line(i + 1, *v))
            .collect();
        lines.push(summary_line(e, median_of(vals)));
        lines
    };
    // Two MixUp seeds finished; a third diverged in epoch 3 (the runner's `diverged` line).
    write_run(
        &runs_dir.join("mixup_s0"),
        &config("r18_mixup_ep4", "mixup", 4, 0, ""),
        &finished(4, &[50.0, 60.0, 70.0, 80.0]),
    );
    write_run(
        &runs_dir.join("mixup_s1"),
        &config("r18_mixup_ep4", "mixup", 4, 1, ""),
        &finished(4, &[52.0, 62.0, 72.0, 82.0]),
    );
    let diverged = r#"{"mode": "diverged", "epoch": 3, "iter": 17, "reason": "the loss is NaN"}"#;
    write_run(
        &runs_dir.join("mixup_s2"),
        &config("r18_mixup_ep4", "mixup", 4, 2, ""),
        &[val_line(1, 10.0), val_line(2, 10.0), diverged.into()],
    );
    // CutMix's only run diverged.
    write_run(
        &runs_dir.join("cutmix"),
        &config("r18_cutmix_ep4", "cutmix", 4, 0, ""),
        &[val_line(1, 30.0), val_line(2, 40.0), diverged.into()],
    );
    // A log of an older runner: its weights overflowed after the last evaluation, which it
    // logged (7 %), and it exited without a summary line, a result.json or a `diverged` line.
    write_run(
        &runs_dir.join("gridmix"),
        &config("r18_gridmix_ep4", "gridmix", 4, 0, ""),
        &[
            val_line(1, 40.0),
            val_line(2, 50.0),
            val_line(3, 60.0),
            val_line(4, 7.0),
        ],
    );
    // Diverged, then resumed from an earlier checkpoint and finished: the later records win.
    let mut resumed = vec![val_line(1, 40.0), diverged.to_string()];
    resumed.extend(finished(4, &[40.0, 45.0, 50.0, 55.0]));
    write_run(
        &runs_dir.join("fmix"),
        &config("r18_fmix_ep4", "fmix", 4, 0, ""),
        &resumed,
    );

    let runs = load_runs(std::slice::from_ref(&runs_dir)).unwrap();
    assert_failed(
        &runs,
        "mixup_s2",
        &["diverged at epoch 3", "iteration 17", "NaN"],
    );
    assert_failed(&runs, "cutmix", &["diverged at epoch 3"]);
    assert_failed(&runs, "gridmix", &["no result after its final evaluation"]);
    assert_eq!(status_of(&runs, "fmix").1, Status::Finished);
    assert_eq!(status_of(&runs, "mixup_s0").1, Status::Finished);

    let t = tables(&runs, &DEFAULT).unwrap();
    let md = &t.markdown;
    // Seeds 0 and 1 give 65 and 67: the cell is their median, the failed seed counts in
    // nothing but is said.
    for line in [
        "| MixUp | 1 | 66.00 (n=2) (1 failed) |",
        "| CutMix | 0.2 | failed: diverged at epoch 3 |",
        "| GridMix | 0.2 | failed: no result after its final evaluation |",
        "| FMix* | 0.2 | 47.50 |",
    ] {
        assert!(md.lines().any(|l| l == line), "no `{line}` in\n{md}");
    }
    assert!(!md.contains("7.00"), "{md}");
    let failed_section = md.split("## Failed runs").nth(1).expect(md);
    for dir in ["mixup_s2", "cutmix", "gridmix"] {
        assert!(
            failed_section.contains(&format!("runs/{dir}`")),
            "{dir}: {md}"
        );
    }
    assert!(!failed_section.contains("fmix"), "{md}");
    assert_eq!(t.failed_runs, 3);
    // The CSV has every run of the table, the failed ones with their status and no metric.
    let csv: Vec<&str> = t.csv.lines().collect();
    assert_eq!(csv.len(), 1 + 6, "{}", t.csv);
    let line = csv.iter().find(|l| l.contains("runs/mixup_s2")).unwrap();
    assert_eq!(csv_column(&t.csv, line, "status"), "failed");
    assert_eq!(csv_column(&t.csv, line, "finished"), "false");
    assert_eq!(csv_column(&t.csv, line, "top1_median"), "");
    assert_eq!(csv_column(&t.csv, line, "cell_n"), "2");
    assert_eq!(csv_column(&t.csv, line, "cell_median"), "66.00");
    assert!(csv_column(&t.csv, line, "failure").starts_with("diverged at epoch 3"));
    let line = csv.iter().find(|l| l.contains("runs/mixup_s0")).unwrap();
    assert_eq!(csv_column(&t.csv, line, "status"), "finished");
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("runs/cutmix") && w.contains("failed: diverged at epoch 3")),
        "{:?}",
        t.warnings
    );
    std::fs::remove_dir_all(&root).unwrap();
}

fn median_of(values: &[f64]) -> f64 {
    xtask::report::median(values).unwrap()
}

#[test]
fn median_window_zero_reports_the_last_evaluation_and_never_panics() {
    let root = temp_root("window0");
    let runs_dir = root.join("runs");
    // `evaluation.median_window: 0` (which the runner accepts): the median of epoch E alone.
    write_run(
        &runs_dir.join("w0"),
        &config(
            "r18_mixup_ep3",
            "mixup",
            3,
            0,
            r#", "evaluation": {"median_window": 0}"#,
        ),
        &[
            val_line(1, 50.0),
            val_line(2, 60.0),
            val_line(3, 55.0),
            summary_line(3, 55.0),
        ],
    );
    let runs = load_runs(std::slice::from_ref(&runs_dir)).unwrap();
    let s = runs[0].summary().unwrap();
    assert_eq!((s.median, s.n_values, s.median_last_w), (55.0, 1, None));
    assert_eq!(runs[0].status(), Status::Finished);
    let out = root.join("report");
    let o = report_cli(&[runs_dir.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| MixUp | 1 | 55.00 |"));
    let csv = std::fs::read_to_string(out.join("benchmark.csv")).unwrap();
    let line = csv.lines().nth(1).unwrap();
    assert_eq!(csv_column(&csv, line, "top1_median"), "55.00");
    assert_eq!(csv_column(&csv, line, "top1_median_last10"), "");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A `result.json` as the runner writes it: the old fields, and with `history` the new ones.
fn result_json(
    max_epochs: usize,
    median: f64,
    seed: u64,
    history: Option<&[(usize, f64)]>,
) -> String {
    let mut r = serde_json::json!({
        "mode": "summary",
        "max_epochs": max_epochs,
        "median_top1": median,
        "median_top1_last_window": median,
        "median_window_epochs": [max_epochs.saturating_sub(10), max_epochs],
        "final_top1": 0.0,
        "best_head": "head0",
        "head_medians": {"head0": median},
    });
    if let Some(h) = history {
        r["status"] = "finished".into();
        r["seed"] = seed.into();
        r["config"] = serde_json::json!({"max_epochs": max_epochs, "seed": seed});
        r["history"] = serde_json::json!({"head0": h.iter().map(|(e, v)| serde_json::json!([e, v])).collect::<Vec<_>>()});
    }
    serde_json::to_string_pretty(&r).unwrap()
}

#[test]
fn result_json_history_fills_the_epochs_a_run_resumed_into_a_new_work_dir_did_not_log() {
    let root = temp_root("resumed-elsewhere");
    let runs_dir = root.join("runs");
    let history: Vec<(usize, f64)> = [10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 21.0, 22.0, 21.5, 22.5]
        .iter()
        .enumerate()
        .map(|(i, v)| (i + 1, *v))
        .collect();
    let cfg = config("r18_mixup_ep10", "mixup", 10, 0, "");
    // The first work dir: epochs 1..6, then the run was moved with --resume-from.
    let first: Vec<String> = history[..6].iter().map(|(e, v)| val_line(*e, *v)).collect();
    write_run(&runs_dir.join("a"), &cfg, &first);
    // The new work dir logs epochs 7..10 only; its result.json has the whole history.
    let mut second = vec![r#"{"mode": "resumed", "epoch": 6}"#.to_string()];
    second.extend(history[6..].iter().map(|(e, v)| val_line(*e, *v)));
    let all: Vec<f64> = history.iter().map(|(_, v)| *v).collect();
    let full_median = median_of(&all); // 19.0; the new log alone gives 21.75
    second.push(summary_line(10, full_median));
    write_run(&runs_dir.join("b"), &cfg, &second);
    std::fs::write(
        runs_dir.join("b/result.json"),
        result_json(10, full_median, 0, Some(&history)),
    )
    .unwrap();

    let runs = load_runs(std::slice::from_ref(&runs_dir)).unwrap();
    let (b, status) = status_of(&runs, "b");
    assert_eq!(status, Status::Finished);
    assert_eq!(b.val.len(), 10);
    assert_eq!(b.summary().unwrap().median, 19.0);
    let (_, status) = status_of(&runs, "a");
    assert_eq!(
        status,
        Status::Unfinished {
            last_epoch: Some(6)
        }
    );
    let t = tables(&runs, &DEFAULT).unwrap();
    assert!(
        t.markdown.contains("| MixUp | 1 | 19.00 |"),
        "{}",
        t.markdown
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn an_unreadable_or_disagreeing_result_json_fails_its_run_but_not_the_table() {
    let root = temp_root("result-json");
    let runs_dir = root.join("runs");
    let vals = [(1, 50.0), (2, 60.0), (3, 70.0)];
    let lines = |with_summary: bool| -> Vec<String> {
        let mut l: Vec<String> = vals.iter().map(|(e, v)| val_line(*e, *v)).collect();
        if with_summary {
            l.push(summary_line(3, 60.0));
        }
        l
    };
    let good_history: &[(usize, f64)] = &vals;
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("good_new", result_json(3, 60.0, 0, Some(good_history)), &[]),
        ("good_old", result_json(3, 60.0, 1, None), &[]),
        ("empty", String::new(), &["result.json unreadable", "empty"]),
        (
            "garbage",
            "{\"mode\": \"summ".into(),
            &["result.json unreadable", "not JSON"],
        ),
        (
            "array",
            "[60.0]".into(),
            &["result.json unreadable", "not a JSON object"],
        ),
        (
            "no_median",
            r#"{"status": "finished", "max_epochs": 3}"#.into(),
            &["result.json unreadable", "no `median_top1`"],
        ),
        (
            "not_finished",
            r#"{"status": "running", "max_epochs": 3, "median_top1": 60.0}"#.into(),
            &["result.json unreadable", "`status` is \"running\""],
        ),
        (
            "median_differs",
            result_json(3, 65.0, 0, None),
            &[
                "result.json disagrees with the log",
                "median_top1 65",
                "give 60",
                "no `history`",
            ],
        ),
        (
            "history_differs",
            result_json(3, 60.0, 0, Some(&[(1, 50.0), (2, 61.0), (3, 70.0)])),
            &[
                "result.json disagrees with the log",
                "epoch 2 `head0`: logged 60, history 61",
            ],
        ),
        (
            "seed_differs",
            result_json(3, 60.0, 5, Some(good_history)),
            &["result.json disagrees with the log", "seed 5"],
        ),
        (
            "epochs_differ",
            result_json(4, 60.0, 0, None),
            &["result.json disagrees with the log", "max_epochs 4"],
        ),
        (
            "invalid_value",
            result_json(3, 60.0, 0, Some(&[(1, 50.0), (2, 200.0), (3, 70.0)])),
            &["invalid top-1", "200, outside [0, 100]"],
        ),
    ];
    for (i, (dir, result, _)) in cases.iter().enumerate() {
        let seed = if *dir == "good_old" { 1 } else { 0 };
        // Different seeds keep the runs of the one cell apart.
        let seed = if dir.starts_with("good") {
            seed
        } else {
            10 + i as u64
        };
        let mut result = result.clone();
        if !dir.starts_with("good") && result.contains("\"seed\": 0") {
            result = result.replace("\"seed\": 0", &format!("\"seed\": {seed}"));
        }
        write_run(
            &runs_dir.join(dir),
            &config("r18_mixup_ep3", "mixup", 3, seed, ""),
            &lines(false),
        );
        std::fs::write(runs_dir.join(dir).join("result.json"), result).unwrap();
    }
    // Without result.json, the log's summary line is checked the same way.
    write_run(
        &runs_dir.join("summary_only"),
        &config("r18_mixup_ep3", "mixup", 3, 2, ""),
        &lines(true),
    );
    let mut bad_summary = lines(false);
    bad_summary.push(summary_line(3, 20.5));
    write_run(
        &runs_dir.join("summary_differs"),
        &config("r18_mixup_ep3", "mixup", 3, 99, ""),
        &bad_summary,
    );

    let runs = load_runs(std::slice::from_ref(&runs_dir)).unwrap();
    for (dir, _, wants) in &cases {
        if wants.is_empty() {
            assert_eq!(status_of(&runs, dir).1, Status::Finished, "{dir}");
        } else {
            assert_failed(&runs, dir, wants);
        }
    }
    assert_eq!(status_of(&runs, "summary_only").1, Status::Finished);
    assert_failed(
        &runs,
        "summary_differs",
        &[
            "the log's summary line disagrees with the log",
            "median_top1 20.5",
        ],
    );
    let t = tables(&runs, &DEFAULT).unwrap();
    let failed = cases.iter().filter(|c| !c.2.is_empty()).count() + 1;
    assert_eq!(t.failed_runs, failed);
    assert!(
        t.markdown
            .contains(&format!("| MixUp | 1 | 60.00 (n=3) ({failed} failed) |")),
        "{}",
        t.markdown
    );
    let failed_section = t.markdown.split("## Failed runs").nth(1).unwrap();
    assert_eq!(
        failed_section.matches("| `r18_mixup_ep3` |").count(),
        failed
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_top1_outside_0_100_or_not_finite_fails_the_run_and_is_never_reported() {
    let root = temp_root("values");
    let runs_dir = root.join("runs");
    let cfg = |seed| config("r18_mixup_ep3", "mixup", 3, seed, "");
    let case = |dir: &str, seed: u64, bad: &str| {
        write_run(
            &runs_dir.join(dir),
            &cfg(seed),
            &[
                val_line(1, 50.0),
                format!(r#"{{"mode": "val", "epoch": 2, "head0_top1": {bad}}}"#),
                val_line(3, 70.0),
                summary_line(3, 60.0),
            ],
        );
    };
    case("hand_edited", 0, "200.0");
    case("negative", 1, "-3");
    case("non_finite", 2, "null");
    case("text", 3, "\"60\"");
    let runs = load_runs(std::slice::from_ref(&runs_dir)).unwrap();
    assert_failed(
        &runs,
        "hand_edited",
        &[
            "invalid top-1",
            "epoch 2 `head0_top1` is 200, outside [0, 100]",
        ],
    );
    assert_failed(&runs, "negative", &["invalid top-1", "-3, outside"]);
    assert_failed(&runs, "non_finite", &["invalid top-1", "null"]);
    assert_failed(&runs, "text", &["invalid top-1", "not a number"]);
    let t = tables(&runs, &DEFAULT).unwrap();
    assert!(
        t.markdown.contains("| MixUp | 1 | 4 runs failed |"),
        "{}",
        t.markdown
    );
    assert!(!t.markdown.contains("200.00") && !t.markdown.contains("60.00"));
    for line in t.csv.lines().skip(1) {
        assert_eq!(csv_column(&t.csv, line, "top1_median"), "", "{line}");
        assert_eq!(csv_column(&t.csv, line, "cell_median"), "", "{line}");
        assert_eq!(csv_column(&t.csv, line, "status"), "failed", "{line}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn one_broken_run_never_takes_the_table_down() {
    let root = temp_root("broken");
    let runs_dir = root.join("runs");
    write_run(
        &runs_dir.join("good"),
        &config("r18_mixup_ep3", "mixup", 3, 0, ""),
        &[
            val_line(1, 50.0),
            val_line(2, 60.0),
            val_line(3, 70.0),
            summary_line(3, 60.0),
        ],
    );
    // A meta line torn by a crash.
    std::fs::create_dir_all(runs_dir.join("torn_meta")).unwrap();
    std::fs::write(
        runs_dir.join("torn_meta/20240101_000000.log.json"),
        "{\"env_info\": \"t\", \"conf\n",
    )
    .unwrap();
    // A config field of the wrong type.
    write_run(
        &runs_dir.join("bad_field"),
        &config("r18_cutmix_ep3", "cutmix", 3, 0, "")
            .replace("\"max_epochs\": 3", "\"max_epochs\": \"3\""),
        &[val_line(1, 50.0)],
    );
    // Two logs of one run that disagree on max_epochs.
    write_run(
        &runs_dir.join("two_logs"),
        &config("r18_fmix_ep3", "fmix", 3, 0, ""),
        &[val_line(1, 50.0)],
    );
    let later = runs_dir.join("two_logs/20240102_000000.log.json");
    let meta = serde_json::json!({"config": config("r18_fmix_ep3", "fmix", 5, 0, "")});
    std::fs::write(&later, format!("{meta}\n{}\n", val_line(2, 55.0))).unwrap();

    let runs = load_runs(std::slice::from_ref(&runs_dir)).unwrap();
    assert_eq!(status_of(&runs, "good").1, Status::Finished);
    assert_failed(
        &runs,
        "torn_meta",
        &["unreadable log", "meta line is not JSON"],
    );
    assert_failed(
        &runs,
        "bad_field",
        &[
            "unreadable log",
            "`max_epochs` is not a non-negative integer",
        ],
    );
    assert_failed(
        &runs,
        "two_logs",
        &["logs disagree", "max_epochs 5", "max_epochs 3"],
    );

    let out = root.join("report");
    let args = [runs_dir.as_os_str(), "--out".as_ref(), out.as_os_str()];
    let o = report_cli(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("| MixUp | 1 | 60.00 |"), "{stdout}");
    let failed_section = stdout.split("## Failed runs").nth(1).expect(&stdout);
    for dir in ["torn_meta", "bad_field", "two_logs"] {
        assert!(
            failed_section.contains(&format!("runs/{dir}`")),
            "{dir}: {stdout}"
        );
        assert!(stderr.contains(&format!("runs/{dir}")), "{dir}: {stderr}");
    }
    assert!(stderr.contains("3 run(s) failed"), "{stderr}");
    assert!(out.join("plots/run_r18_mixup_ep3_seed0.svg").is_file());
    // --strict: the same report, and exit status 2.
    std::fs::remove_dir_all(&out).unwrap();
    let mut strict = args.to_vec();
    strict.push("--strict".as_ref());
    let o = report_cli(&strict);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::read_to_string(out.join("benchmark.md"))
        .unwrap()
        .contains("| MixUp | 1 | 60.00 |"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn column_plots_overlay_the_methods_with_seed_bands_and_run_plots_say_how_the_run_stands() {
    let root = temp_root("plots");
    let runs_dir = root.join("runs");
    let finished = |vals: &[f64]| -> Vec<String> {
        let mut lines: Vec<String> = vals
            .iter()
            .enumerate()
            .flat_map(|(i, v)| {
                [
                    format!(
                        r#"{{"mode": "train", "epoch": {}, "iter": 5, "lr": 0.1, "loss": 2.0}}"#,
                        i + 1
                    ),
                    val_line(i + 1, *v),
                ]
            })
            .collect();
        lines.push(summary_line(vals.len(), median_of(vals)));
        lines
    };
    for (seed, base) in [(0, 50.0), (1, 52.0), (2, 49.0)] {
        write_run(
            &runs_dir.join(format!("mixup_s{seed}")),
            &config("r18_mixup_ep3", "mixup", 3, seed, ""),
            &finished(&[base, base + 10.0, base + 20.0]),
        );
    }
    write_run(
        &runs_dir.join("cutmix"),
        &config("r18_cutmix_ep3", "cutmix", 3, 0, ""),
        &finished(&[40.0, 50.0, 60.0]),
    );
    write_run(
        &runs_dir.join("gridmix"),
        &config("r18_gridmix_ep30", "gridmix", 30, 0, ""),
        &[val_line(1, 30.0), val_line(2, 35.0)],
    );
    write_run(
        &runs_dir.join("fmix"),
        &config("r18_fmix_ep30", "fmix", 30, 0, ""),
        &[],
    );
    let out = root.join("report");
    let o = report_cli(&[
        runs_dir.as_os_str(),
        "--include-nonrecipe".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |f: &str| std::fs::read_to_string(out.join("plots").join(f)).unwrap();

    // One figure per column with every method: MixUp's three seeds as a mean and a band,
    // CutMix's one run as a line without a band.
    let curves = read("curves_r18_ep3.svg");
    for text in [
        "MixUp (α=1): mean of 3 seeds",
        "CutMix (α=0.2)",
        "min–max over seeds",
    ] {
        assert!(curves.contains(text), "no {text}: {curves}");
    }
    assert_eq!(curves.matches("<polygon").count(), 1, "{curves}");
    assert_eq!(
        curves.matches("<circle").count(),
        6,
        "a marker per mean point"
    );
    // The dot plot: MixUp's seeds' range as an error bar, no "published" entry (none at 3 epochs).
    let compare = read("compare_r18_ep3.svg");
    assert!(compare.contains("ours, min–max over seeds"), "{compare}");
    assert!(!compare.contains("published"), "{compare}");
    // The interrupted run's plot says so; the run with nothing logged says that instead of
    // drawing three empty panels.
    let gridmix = read("run_r18_gridmix_ep30_seed0.svg");
    assert!(
        gridmix.contains("interrupted at epoch 2 of 30"),
        "{gridmix}"
    );
    let fmix = read("run_r18_fmix_ep30_seed0.svg");
    assert!(
        fmix.contains("no evaluation logged yet (0 of 30 epochs)"),
        "{fmix}"
    );
    assert!(fmix.contains("nothing to plot"), "{fmix}");
    assert!(!fmix.contains("no data in the log"), "{fmix}");
    assert!(!read("run_r18_mixup_ep3_seed0.svg").contains("interrupted"));
    std::fs::remove_dir_all(&root).unwrap();
}
