//! `scripts/gpu-check.sh` without a GPU: its `--dry-run` (the same stages on the CPU with tiny
//! sizes) and the prerequisite checks that must stop a GPU run at once. What is checked is the
//! script's plumbing: every stage key in the JSON summary, the summary on every exit path,
//! per-stage caps and the overall deadline enforced (a stage made to hang with the test-only
//! `GPU_CHECK_TEST_HANG` is killed, process group included, and the rest still runs), a failing
//! `tests` stage skipping the rest, and a missing library or GPU stopping the run with one line.
//!
//! Data: a prefix of `$CIFAR10_DIR` when set, otherwise the script's synthetic files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const STAGES: [&str; 6] = ["prereq", "tests", "bench", "pytorch", "resnext50", "epoch"];
const LATER_STAGES: [&str; 4] = ["bench", "pytorch", "resnext50", "epoch"];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-check.sh")
}

/// One finished `gpu-check.sh` run.
struct Check {
    code: Option<i32>,
    summary: Value,
    stderr: String,
    wall: Duration,
    out: tempfile::TempDir,
}

impl Check {
    fn status(&self, stage: &str) -> &str {
        self.summary[stage]["status"]
            .as_str()
            .unwrap_or_else(|| panic!("summary has no {stage}.status:\n{}", self.dump()))
    }

    fn reason(&self, stage: &str) -> &str {
        self.summary[stage]["reason"].as_str().unwrap_or("")
    }

    fn run(&self, stage: &str, name: &str) -> &Value {
        let run = &self.summary[stage]["runs"][name];
        assert!(run.is_object(), "no {stage}.runs.{name}:\n{}", self.dump());
        run
    }

    fn dump(&self) -> String {
        format!(
            "exit {:?} after {:?}\nsummary: {}\nstderr:\n{}",
            self.code,
            self.wall,
            serde_json::to_string_pretty(&self.summary).unwrap(),
            self.stderr
        )
    }

    /// The pids that the test-only hang printed into its log.
    fn hang_pids(&self, log: &str) -> Vec<u32> {
        let text = std::fs::read_to_string(self.out.path().join(log)).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.starts_with("gpu-check test hang: pids"))
            .unwrap_or_else(|| panic!("{log} has no hang line:\n{text}\n{}", self.dump()));
        line.rsplit(':')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(|p| p.parse().unwrap())
            .collect()
    }
}

/// Called with the script's pid and its out folder while it runs.
type OnStart<'a> = &'a dyn Fn(u32, &Path);

/// Runs the script (`--runner` = this build's CPU runner, `--out` = a fresh folder) in its own
/// process group, killing the group and failing if it outlives `limit`. With `on_start`, calls
/// it with the script's pid and out folder while it runs.
fn check_with(
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
    on_start: Option<OnStart>,
) -> Check {
    use std::os::unix::process::CommandExt;
    let out = tempfile::tempdir().unwrap();
    let stdout_path = out.path().join("stdout.json");
    let stderr_path = out.path().join("stderr.txt");
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .args(args)
        .arg("--out")
        .arg(out.path().join("out"))
        .env_remove("OUT")
        .env_remove("GPU_CHECK_TEST_HANG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .process_group(0);
    if args.contains(&"--dry-run") {
        cmd.arg("--runner").arg(env!("CARGO_BIN_EXE_runner"));
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("bash starts");
    if let Some(f) = on_start {
        f(child.id(), &out.path().join("out"));
    }
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!(
                "gpu-check.sh still running after {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall = start.elapsed();
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let summary: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON summary ({e}):\n{stdout}\n{stderr}"));
    let file = std::fs::read_to_string(out.path().join("out/summary.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&file).unwrap(),
        summary,
        "summary.json differs from stdout"
    );
    let check = Check {
        code,
        summary,
        stderr,
        wall,
        out,
    };
    for stage in STAGES {
        check.status(stage);
    }
    check
}

fn check(args: &[&str], env: &[(&str, &str)]) -> Check {
    check_with(args, env, Duration::from_secs(120), None)
}

fn seconds(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A process that is gone (or a zombie left to init, which holds no resources).
fn process_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let gone = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        };
        if gone || Instant::now() > deadline {
            return gone;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_processes_gone(pids: &[u32], c: &Check) {
    assert_eq!(
        pids.len(),
        2,
        "the hang prints its shell's and its sleep's pids"
    );
    for &pid in pids {
        assert!(
            process_gone(pid),
            "process {pid} of the hung stage still runs\n{}",
            c.dump()
        );
    }
}

#[test]
fn dry_run_runs_every_stage_and_prints_one_summary() {
    let c = check(&["--dry-run"], &[]);
    assert_eq!(c.code, Some(0), "{}", c.dump());
    assert_eq!(c.summary["mode"], "dry-run");
    assert_eq!(c.summary["ok"], true);
    for stage in ["prereq", "tests", "bench", "resnext50", "epoch"] {
        assert_eq!(c.status(stage), "ok", "{stage}\n{}", c.dump());
    }
    // PyTorch runs when python3 has it, and is skipped with the reason when it has not.
    match c.status("pytorch") {
        "ok" => assert!(c.run("pytorch", "resnet18")["results"]["f32"]["step_ms"].is_number()),
        "skipped" => assert!(
            c.reason("pytorch").contains("not installed"),
            "{}",
            c.dump()
        ),
        other => panic!("pytorch {other}\n{}", c.dump()),
    }
    // The tests stage's CPU stand-in (no test binaries given).
    assert_eq!(c.run("tests", "check-config")["status"], "ok");
    for p in ["f32", "tf32"] {
        let run = c.run("bench", &format!("resnet18-{p}"));
        assert!(seconds(&run["mixup_ms"]) > 0.0, "{}", c.dump());
        assert!(seconds(&run["vanilla_ms"]) > 0.0, "{}", c.dump());
    }
    // The CPU has no bf16 kernels (the runner refuses bf16 unless emulated), so the dry run
    // does not ask for it.
    assert!(
        c.summary["bench"]["runs"].get("resnet18-bf16").is_none(),
        "{}",
        c.dump()
    );
    assert!(seconds(&c.run("resnext50", "resnext50-f32")["mixup_ms"]) > 0.0);
    // The data subset: 300 training and 100 test records, from CIFAR10_DIR or synthetic.
    let data = &c.summary["prereq"]["data"];
    assert_eq!(data["train_records"], 300, "{}", c.dump());
    assert_eq!(data["test_records"], 100, "{}", c.dump());
    let source = data["source"].as_str().unwrap();
    match std::env::var("CIFAR10_DIR") {
        Ok(dir) if !dir.is_empty() => assert!(source.contains(&dir), "{source}"),
        _ => assert!(source.starts_with("synthetic"), "{source}"),
    }
    let epoch = &c.summary["epoch"];
    assert_eq!(epoch["train_images"], 300);
    assert_eq!(epoch["test_images"], 100);
    let top1 = seconds(&epoch["top1"]);
    assert!((0.0..=100.0).contains(&top1), "{}", c.dump());
    assert!(seconds(&epoch["img_per_s"]) > 0.0);
    assert!(c.out.path().join("out/epoch/metrics.csv").is_file());
    assert!(seconds(&c.summary["elapsed_s"]) < seconds(&c.summary["deadline_s"]));
}

#[test]
fn a_hung_stage_is_killed_at_its_cap_and_later_stages_still_run() {
    let c = check(
        &[
            "--dry-run",
            "--budget",
            "bench=9",
            "--skip",
            "pytorch,resnext50",
        ],
        &[("GPU_CHECK_TEST_HANG", "bench")],
    );
    assert_eq!(c.code, Some(1), "{}", c.dump());
    assert_eq!(c.summary["ok"], false);
    assert_eq!(c.status("bench"), "out of time", "{}", c.dump());
    let hung = c.run("bench", "resnet18-f32");
    assert_eq!(hung["status"], "out of time", "{}", c.dump());
    // The hung command got its share of the stage (a half: f32 and tf32) and was killed at it.
    let budget = seconds(&hung["budget_s"]);
    assert!(budget <= 4.6, "{}", c.dump());
    assert!(seconds(&hung["seconds"]) < budget + 2.5, "{}", c.dump());
    assert!(
        seconds(&c.summary["bench"]["seconds"]) < 9.0 + 3.0,
        "{}",
        c.dump()
    );
    assert_processes_gone(&c.hang_pids("out/logs/bench-resnet18-f32.log"), &c);
    // The stage's other commands and the later stages still ran.
    assert_eq!(
        c.run("bench", "resnet18-tf32")["status"],
        "ok",
        "{}",
        c.dump()
    );
    assert_eq!(c.status("epoch"), "ok", "{}", c.dump());
    assert_eq!(c.status("pytorch"), "skipped");
    assert_eq!(c.reason("pytorch"), "--skip pytorch");
}

#[test]
fn the_overall_deadline_bounds_the_run_and_the_summary_is_still_printed() {
    // The epoch stage may use up to 100 s but the run only has 15: it gets what is left before
    // the deadline less the 5 s reserve, its hang is killed there, and the summary follows.
    let c = check(
        &[
            "--dry-run",
            "--deadline",
            "15",
            "--budget",
            "tests=5",
            "--budget",
            "epoch=100",
            "--skip",
            "bench,pytorch,resnext50",
        ],
        &[("GPU_CHECK_TEST_HANG", "epoch")],
    );
    assert_eq!(c.code, Some(1), "{}", c.dump());
    assert!(c.wall < Duration::from_secs(15), "{}", c.dump());
    assert!(seconds(&c.summary["elapsed_s"]) < 15.0);
    assert_eq!(c.status("tests"), "ok", "{}", c.dump());
    assert_eq!(c.status("epoch"), "out of time", "{}", c.dump());
    let budget = seconds(&c.summary["epoch"]["budget_s"]);
    assert!(budget <= 10.0, "{}", c.dump());
    let hung = c.run("epoch", "resnet18-mixup");
    assert!(seconds(&hung["seconds"]) < budget + 2.5, "{}", c.dump());
    assert_processes_gone(&c.hang_pids("out/logs/epoch.log"), &c);
}

#[test]
fn a_failing_tests_stage_skips_every_later_stage() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("cuda_agreement");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'test conv_agrees ... FAILED'\n\
         echo 'test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out'\n\
         exit 101\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = check(
        &["--dry-run", "--agreement-bin", fake.to_str().unwrap()],
        &[],
    );
    assert_eq!(c.code, Some(1), "{}", c.dump());
    assert_eq!(c.status("tests"), "failed", "{}", c.dump());
    let run = c.run("tests", "cuda_agreement");
    assert_eq!(run["passed"], 3);
    assert_eq!(run["failed"], 1);
    assert_eq!(run["failures"], serde_json::json!(["conv_agrees"]));
    for stage in LATER_STAGES {
        assert_eq!(c.status(stage), "skipped", "{stage}\n{}", c.dump());
        assert_eq!(c.reason(stage), "tests failed", "{stage}");
    }
    assert!(c.wall < Duration::from_secs(30), "{}", c.dump());
}

#[test]
fn sigterm_kills_the_running_stage_and_prints_the_summary() {
    let wait_for_hang = |pid: u32, out: &Path| {
        let log = out.join("logs/bench-resnet18-f32.log");
        let start = Instant::now();
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("pids")) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the hang never started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let c = check_with(
        &["--dry-run", "--skip", "pytorch"],
        &[("GPU_CHECK_TEST_HANG", "bench")],
        Duration::from_secs(90),
        Some(&wait_for_hang),
    );
    assert_eq!(c.code, Some(1), "{}", c.dump());
    assert_eq!(c.summary["interrupted_by"], "SIGTERM", "{}", c.dump());
    assert_eq!(c.status("bench"), "out of time", "{}", c.dump());
    assert_eq!(c.reason("bench"), "interrupted by SIGTERM");
    for stage in ["resnext50", "epoch"] {
        assert_eq!(c.status(stage), "skipped", "{stage}\n{}", c.dump());
        assert_eq!(c.reason(stage), "interrupted by SIGTERM");
    }
    assert_processes_gone(&c.hang_pids("out/logs/bench-resnet18-f32.log"), &c);
}

/// A prerequisite failure: exit 2, one `PREREQUISITE FAILED` line naming the problem, the
/// summary saying the same, and no stage run.
fn assert_stopped_at_prereq(c: &Check, says: &str) {
    assert_eq!(c.code, Some(2), "{}", c.dump());
    assert_eq!(c.status("prereq"), "failed", "{}", c.dump());
    assert!(c.reason("prereq").contains(says), "{}", c.dump());
    let lines: Vec<&str> = c
        .stderr
        .lines()
        .filter(|l| l.contains("PREREQUISITE FAILED"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", c.stderr);
    assert!(lines[0].contains(says), "{}", lines[0]);
    for stage in ["tests", "bench", "pytorch", "resnext50", "epoch"] {
        assert_eq!(c.status(stage), "skipped", "{stage}");
        assert_eq!(c.reason(stage), "prerequisites failed");
    }
}

#[test]
fn a_gpu_run_stops_at_once_without_binaries_libraries_or_a_device() {
    // No pack and no binaries.
    let c = check(&[], &[]);
    assert_stopped_at_prereq(&c, "give --pack DIR");

    // A binary that needs a library nobody has: /bin/true with its libc dependency renamed.
    let dir = tempfile::tempdir().unwrap();
    let mut elf = std::fs::read("/bin/true").unwrap();
    let needle = b"libc.so.6\0";
    match elf.windows(needle.len()).position(|w| w == needle) {
        Some(at) => {
            elf[at..at + needle.len()].copy_from_slice(b"libZ.so.6\0");
            let bin = dir.path().join("runner");
            std::fs::write(&bin, &elf).unwrap();
            let bin = bin.to_str().unwrap();
            let c = check(
                &[
                    "--runner",
                    bin,
                    "--agreement-bin",
                    bin,
                    "--trajectory-bin",
                    bin,
                ],
                &[],
            );
            assert_stopped_at_prereq(&c, "runner cannot load: libZ.so.6 not found");
        }
        None => eprintln!("SKIPPED the missing-library case: /bin/true does not name libc.so.6"),
    }

    // Binaries that load, but no GPU the process may use.
    let runner = env!("CARGO_BIN_EXE_runner");
    let c = check(
        &[
            "--runner",
            runner,
            "--agreement-bin",
            runner,
            "--trajectory-bin",
            runner,
        ],
        &[("CUDA_VISIBLE_DEVICES", "")],
    );
    assert_stopped_at_prereq(&c, "hides every GPU");
}

#[test]
fn a_pack_is_verified_before_anything_runs_and_its_data_subset_is_used() {
    // A pack as scripts/gpu-pack.sh writes it, less the CUDA binaries (a dry run does not use
    // them): a synthetic subset of 400/150 records and the manifest over it.
    let pack = tempfile::tempdir().unwrap();
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-check-helper.py");
    let data = pack.path().join("data");
    let ok = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    ok(Command::new("python3").arg(&helper).args([
        "synthetic",
        data.to_str().unwrap(),
        "--train",
        "400",
        "--test",
        "150",
    ]));
    ok(Command::new("python3").arg(&helper).args([
        "manifest-write",
        pack.path().to_str().unwrap(),
        "commit=0123abc",
        "features=cuda,cudnn",
    ]));
    let pack_arg = pack.path().to_str().unwrap();

    let c = check(
        &[
            "--dry-run",
            "--pack",
            pack_arg,
            "--skip",
            "bench,pytorch,resnext50",
        ],
        &[("CIFAR10_DIR", "")],
    );
    assert_eq!(c.code, Some(0), "{}", c.dump());
    let prereq = &c.summary["prereq"];
    assert_eq!(prereq["pack"]["commit"], "0123abc", "{}", c.dump());
    assert_eq!(prereq["data"]["source"], "pack subset");
    assert_eq!(prereq["data"]["train_records"], 400);
    assert_eq!(prereq["data"]["test_records"], 150);
    // The dry run's sizes, within the pack's subset.
    assert_eq!(c.summary["epoch"]["train_images"], 300);
    assert_eq!(c.status("epoch"), "ok", "{}", c.dump());

    // One changed byte: the manifest check stops the run.
    let file = data.join("test_batch.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let c = check(&["--dry-run", "--pack", pack_arg], &[]);
    assert_stopped_at_prereq(&c, "test_batch.bin: sha256 differs from the manifest");
}
