//! Times the Winograd transforms alone, single-threaded, on the CIFAR ResNet plane sizes, and
//! prints one JSON object (µs per image, best of `--reps` rounds). Compare with the products:
//! a forward's GEMMs take `2·XI·C·K·tiles` flops per image (`XI` = 16 for F(2×2, 3×3), 36 for
//! F(4×4, 3×3)).
//!
//! `cargo run -p kernels --release --example winograd_transforms -- [--reps 5]`

use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--reps expects a number"))
        .unwrap_or(5);
    kernels::keep_freed_memory();
    let rows: Vec<_> = kernels::bench_hooks::transform_timings(reps)
        .into_iter()
        .map(|t| {
            json!({
                "tile": t.tile,
                "channels": t.channels,
                "side": t.side,
                "images": t.images,
                "input_us": (t.input_us * 100.0).round() / 100.0,
                "output_us": (t.output_us * 100.0).round() / 100.0,
                "grad_out_us": (t.grad_out_us * 100.0).round() / 100.0,
            })
        })
        .collect();
    println!(
        "{}",
        json!({ "unit": "microseconds per image, one thread", "reps": reps, "transforms": rows })
    );
}
