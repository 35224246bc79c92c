//! With feature `cuda`, compiles `src/cuda/kernels.cu` to PTX with nvcc (found as
//! `$CUDA_ROOT/bin/nvcc`, `$CUDA_HOME/bin/nvcc` or on `PATH`) for `compute_$CUDA_COMPUTE_CAP`
//! (default 80), so that the PTX is embedded in the binary and JIT-compiled by the driver.
//! The CPU build does nothing here and needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

/// Tensors per multi-tensor SGD launch (`src/sgd.rs` includes the same file).
const SGD_MULTI_MAX: usize = include!("src/sgd_multi_max.in");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/sgd_multi_max.in");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // candle-kernels reads the same variable; a PTX for an older virtual architecture still
    // loads on newer GPUs (the driver JIT-compiles it), never the other way round.
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_end_matches('a').to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "80".to_string());
    let ptx = out.join("mixbench_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        // The multi-tensor SGD argument block's size, from the definition the Rust side uses.
        .arg(format!("-DSGD_MULTI_MAX={SGD_MULTI_MAX}"))
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "kernels: could not run {} ({e}); feature `cuda` needs nvcc \
                 (source <(../shared/tools/cuda-toolchain.sh) on GPU-less machines)",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "kernels: nvcc failed on src/cuda/kernels.cu"
    );
}
