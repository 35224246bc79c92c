#!/usr/bin/env bash
# GPU check of the CUDA path, for a machine with an NVIDIA GPU. Prints ONE JSON summary on
# stdout (everything else goes to $OUT/*.log and stderr):
#   1. the CUDA agreement tests (kernels/tests/cuda_agreement.rs) and the 20-step ResNet-18
#      CPU-vs-CUDA trajectory (backbones/tests/cuda_trajectory.rs) with MIXBENCH_REQUIRE_GPU=1;
#   2. `runner bench --device cuda:0` for ResNet-18 and ResNeXt-50, batch 100, vanilla and
#      MixUp steps, in f32, tf32 and bf16, and ResNet-18 f32 once more with `--autograd`
#      (the backbone's backward through candle's autograd instead of the taped forward);
#   3. the PyTorch reference (`bench/reference.py bench`, f32 and bf16) when torch imports;
#   4. a 1-epoch ResNet-18 MixUp run on real CIFAR-10 (when data is available).
#
# Binaries: built here (`--features cuda,cudnn`, needs Rust and the toolchain of
# ../shared/tools/cuda-toolchain.sh) unless given, plain or gzipped:
#   MIXBENCH_RUNNER=path/to/runner[.gz]          prebuilt CUDA runner
#   MIXBENCH_TEST_BIN=path/to/cuda_agreement[.gz] prebuilt test binaries
#   MIXBENCH_TRAJ_BIN=path/to/cuda_trajectory[.gz]
#     (cargo test --release --features cuda,cudnn -p kernels -p backbones --no-run prints them)
# Data: CIFAR10_DIR with the official .bin files, or MIXBENCH_PACK=cifar10-jpegq75.pack
#   (unpacked with ../shared/tools/cifar-unpack.py, or MIXBENCH_UNPACKER=path/to/cifar-unpack.py).
# Other knobs: OUT (log folder, default gpu-check-out), GPU_CHECK_STEPS (timed bench steps,
#   default 10), GPU_CHECK_SKIP (comma list of: tests,bench,torch,epoch).
# Exit status: 0 when the tests passed and every requested part ran, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
STEPS="${GPU_CHECK_STEPS:-10}"
SKIP=",${GPU_CHECK_SKIP:-},"
work="$OUT/bin"
mkdir -p "$work"
log() { echo "gpu-check: $*" >&2; }
skip() { [[ $SKIP == *",$1,"* ]]; }

# CUDA libraries of the Python wheels (the device machines have no system CUDA toolkit).
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
if [[ -n $site ]]; then
    for d in "$site"/nvidia/cu13/lib "$site"/nvidia/cudnn/lib "$site"/nvidia/*/lib; do
        [[ -d $d && :${LD_LIBRARY_PATH:-}: != *":$d:"* ]] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export LD_LIBRARY_PATH
fi

# A given binary (plain or .gz) copied to $work/NAME; prints its path.
take() {
    local src=$1 name=$2
    if [[ $src == *.gz ]]; then gzip -dc "$src" >"$work/$name"; else cp "$src" "$work/$name"; fi
    chmod +x "$work/$name"
    echo "$work/$name"
}

build_status="prebuilt"
if [[ -n ${MIXBENCH_RUNNER:-} ]]; then
    runner=$(take "$MIXBENCH_RUNNER" runner)
else
    build_status="built"
    log "building the CUDA runner (log: $OUT/build.log)"
    (
        set -e
        cargo fetch
        "${MIXBENCH_SHARED:-../shared}/tools/cuda-toolchain.sh" --cudnn >"$OUT/cuda-env.sh"
        source "$OUT/cuda-env.sh"
        export CARGO_TARGET_DIR="${MIXBENCH_CUDA_TARGET_DIR:-$HOME/.cache/mixbench/cuda-target}"
        cargo build --release -p runner --features cuda,cudnn
        cargo test --release --features cuda,cudnn -p kernels -p backbones --no-run \
            --message-format=json | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] in ("cuda_agreement", "cuda_trajectory"):
        open(sys.argv[1] + "/" + m["target"]["name"] + ".path", "w").write(m["executable"])' "$OUT"
        cp "$CARGO_TARGET_DIR/release/runner" "$work/runner"
    ) >"$OUT/build.log" 2>&1 || build_status="failed"
    runner="$work/runner"
    [[ -z ${MIXBENCH_TEST_BIN:-} && -s $OUT/cuda_agreement.path ]] && MIXBENCH_TEST_BIN=$(cat "$OUT/cuda_agreement.path")
    [[ -z ${MIXBENCH_TRAJ_BIN:-} && -s $OUT/cuda_trajectory.path ]] && MIXBENCH_TRAJ_BIN=$(cat "$OUT/cuda_trajectory.path")
fi

# Real CIFAR-10 for the trajectory test and the epoch run.
data="${CIFAR10_DIR:-}"
if [[ -z $data && -n ${MIXBENCH_PACK:-} ]]; then
    data="$OUT/cifar10"
    unpacker="${MIXBENCH_UNPACKER:-${MIXBENCH_SHARED:-../shared}/tools/cifar-unpack.py}"
    [[ -f $data/test_batch.bin ]] || python3 "$unpacker" "$MIXBENCH_PACK" "$data" >"$OUT/unpack.log" 2>&1
fi
[[ -n $data ]] && export CIFAR10_DIR="$data"

# 1. Agreement tests.
tests_status="skipped"
if ! skip tests; then
    if [[ -n ${MIXBENCH_TEST_BIN:-} && -f $MIXBENCH_TEST_BIN ]]; then
        test_bin=$(take "$MIXBENCH_TEST_BIN" cuda_agreement)
        log "agreement tests (log: $OUT/tests.log)"
        tests_status="passed"
        MIXBENCH_REQUIRE_GPU=1 timeout 300 "$test_bin" --test-threads=1 --nocapture >"$OUT/tests.log" 2>&1 \
            || tests_status="failed"
        if [[ -n ${MIXBENCH_TRAJ_BIN:-} && -f $MIXBENCH_TRAJ_BIN ]]; then
            traj_bin=$(take "$MIXBENCH_TRAJ_BIN" cuda_trajectory)
            log "20-step trajectory (log: $OUT/trajectory.log)"
            MIXBENCH_REQUIRE_GPU=1 timeout 300 "$traj_bin" --nocapture >"$OUT/trajectory.log" 2>&1 \
                || tests_status="failed"
        else
            tests_status="$tests_status (no trajectory binary)"
        fi
    else
        tests_status="missing binary"
    fi
fi

# 2. runner bench on the GPU.
if ! skip bench && [[ -x $runner ]]; then
    for arch in resnet18 resnext50; do
        for prec in f32 tf32 bf16; do
            log "bench $arch $prec"
            timeout 240 "$runner" bench --device cuda:0 --arch "$arch" --batch 100 --steps "$STEPS" \
                --step-modes vanilla,mixup --mix-modes mixup --precision "$prec" \
                >"$OUT/bench-$arch-$prec.json" 2>"$OUT/bench-$arch-$prec.log" \
                || echo "{\"error\": \"exit $?\"}" >"$OUT/bench-$arch-$prec.json"
        done
    done
    # The same ResNet-18 step with the backbone's backward through candle's autograd instead
    # of the tape: what the taped forward gains on the GPU.
    log "bench resnet18 f32 autograd"
    timeout 240 "$runner" bench --device cuda:0 --arch resnet18 --batch 100 --steps "$STEPS" \
        --step-modes vanilla,mixup --mix-modes mixup --precision f32 --autograd \
        >"$OUT/bench-resnet18-f32-autograd.json" 2>"$OUT/bench-resnet18-f32-autograd.log" \
        || echo "{\"error\": \"exit $?\"}" >"$OUT/bench-resnet18-f32-autograd.json"
fi

# 3. PyTorch reference on the same GPU.
if ! skip torch && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    for arch in resnet18 resnext50; do
        for dt in f32 bf16; do
            log "pytorch $arch $dt"
            timeout 240 python3 bench/reference.py bench --arch "$arch" --mix mixup --device cuda \
                --batch 100 --dtype "$dt" --steps "$STEPS" >"$OUT/torch-$arch-$dt.json" 2>"$OUT/torch-$arch-$dt.log" \
                || echo "{\"error\": \"exit $?\"}" >"$OUT/torch-$arch-$dt.json"
        done
    done
fi

# 4. One real-data epoch.
if ! skip epoch && [[ -x $runner ]]; then
    if [[ -n $data && -f $data/test_batch.bin ]]; then
        log "1-epoch ResNet-18 MixUp run (log: $OUT/epoch.log)"
        rm -rf "$OUT/epoch-run"
        start=$(date +%s)
        timeout 300 "$runner" --config configs/cifar10/r18/mix_modemixup/r18_mixups_CE_none_alpha1_ep400.json \
            --data "$data" --epochs 1 --device cuda:0 --work-dir "$OUT/epoch-run" --quiet \
            >"$OUT/epoch.log" 2>&1
        echo "{\"exit\": $?, \"wall_s\": $(($(date +%s) - start))}" >"$OUT/epoch-status.json"
    fi
fi

# The one JSON summary. PyTorch's "f32" lets cuDNN use TF32 for convolutions (its default), so
# its fair partner is our tf32; ratios are ours / PyTorch's MixUp step time.
python3 - "$OUT" "$build_status" "$tests_status" <<'PY'
import glob, json, os, sys
out, build, tests = sys.argv[1:4]
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"unreadable: {e}"}
def step_ms(report, mode):
    try:
        return report["train_step"][mode]["step_ms"]
    except Exception:
        return None
summary = {"build": build, "tests": tests, "bench": {}, "pytorch": {}, "epoch": None}
for p in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    r = load(p)
    key = os.path.basename(p)[len("bench-"):-len(".json")]
    summary["bench"][key] = {"vanilla_ms": step_ms(r, "vanilla"), "mixup_ms": step_ms(r, "mixup"),
                             "error": r.get("error")}
for p in sorted(glob.glob(os.path.join(out, "torch-*.json"))):
    key = os.path.basename(p)[len("torch-"):-len(".json")]
    summary["pytorch"][key] = load(p)
for arch in ("resnet18", "resnext50"):
    t = summary["pytorch"].get(f"{arch}-f32", {})
    tb = summary["pytorch"].get(f"{arch}-bf16", {})
    for prec, ref in (("f32", t), ("tf32", t), ("bf16", tb)):
        t_ms = ref.get("step_ms") if isinstance(ref, dict) else None
        ours = summary["bench"].get(f"{arch}-{prec}", {}).get("mixup_ms")
        if t_ms and ours:
            summary.setdefault("ratio_to_pytorch", {})[f"{arch}-{prec}"] = round(ours / t_ms, 3)
st = os.path.join(out, "epoch-status.json")
if os.path.exists(st):
    e = load(st)
    vals = []
    for lp in glob.glob(os.path.join(out, "epoch-run", "*.log.json")):
        for line in open(lp):
            try:
                rec = json.loads(line)
            except Exception:
                continue
            if rec.get("mode") == "val":
                vals.append(rec.get("head0_top1"))
    e["val_top1"] = vals[-1] if vals else None
    summary["epoch"] = e
print(json.dumps(summary, indent=1))
ok = tests in ("passed", "skipped") and build != "failed"  # "passed (no trajectory binary)" fails
sys.exit(0 if ok else 1)
PY
