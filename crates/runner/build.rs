//! Records the git commit the runner is built from (`MIXBENCH_GIT_COMMIT`), for the run
//! logs: a result must name the code that produced it. `unknown` outside a git checkout.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Uncommitted changes to tracked files make the commit an approximation: say so.
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let id = if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    };
    println!("cargo:rustc-env=MIXBENCH_GIT_COMMIT={id}");
    // Rebuilt when HEAD moves (a commit, a checkout) or the index changes (staging).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for f in ["HEAD", "index"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head_ref}");
        }
    }
    // Any change to the workspace's crates can flip the `-dirty` mark (cargo watches the
    // directory tree's modification times).
    println!("cargo:rerun-if-changed=..");
    println!("cargo:rerun-if-changed=build.rs");
}
