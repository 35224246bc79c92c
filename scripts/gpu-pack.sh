#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed) and writes the one folder that
# `scripts/gpu-check.sh --pack DIR` needs on a bare GPU machine (no Rust, no network, no
# ../shared), at most 60 MiB so that it travels with the working tree:
#
#   scripts/gpu-pack.sh [DIR]         # DIR defaults to gpu-pack (ignored by git)
#
#   DIR/bin/runner.xz, cuda_agreement.xz, cuda_trajectory.xz   stripped, xz -9 (half the size
#                               of gzip -9 for these binaries)
#   DIR/data/data_batch_1.bin   the first 5,000 training records (official binary format)
#   DIR/data/test_batch.bin     the first 1,000 test records
#   DIR/manifest.json           commit, features, toolchain, sizes and sha256s (gpu-check
#                               verifies them before it runs anything)
#
# Environment:
#   MIXBENCH_SHARED            the shared folder (default ../shared): tools/cuda-toolchain.sh,
#                              and data/cifar10-jpegq75.pack when CIFAR10_DIR is not set
#   MIXBENCH_CUDA_TARGET_DIR   the CUDA build's target dir (else CARGO_TARGET_DIR, else
#                              $HOME/.cache/mixbench/cuda-target, as .ci/run); the cold build
#                              takes about 18 minutes on 2 cores, later ones seconds. Cargo
#                              goes by modification times: in a target dir copied from another
#                              checkout, touch this tree's crates/ first
#   CIFAR10_DIR                the official .bin files to take the subset from
#   GPU_PACK_TRAIN, GPU_PACK_TEST   records in the subset (default 5000 and 1000)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

dir=${1:-gpu-pack}
shared=${MIXBENCH_SHARED:-$(cd .. && pwd)/shared}
train=${GPU_PACK_TRAIN:-5000}
test=${GPU_PACK_TEST:-1000}
max_bytes=$((60 * 1024 * 1024))
features=cuda,cudnn
helper=(python3 "$repo/scripts/gpu-check-helper.py")
log() { echo "gpu-pack: $*" >&2; }
die() { echo "gpu-pack: $*" >&2; exit 1; }

case $dir in "" | / | . | .. | "$repo") die "DIR $dir: name a folder of its own (e.g. gpu-pack)" ;; esac
if [[ -e $dir && ! -f $dir/manifest.json ]] && [[ -n $(ls -A "$dir" 2>/dev/null) ]]; then
    die "$dir exists and is not a pack (no manifest.json): not overwriting it"
fi
((train >= 640)) || die "GPU_PACK_TRAIN=$train: cuda_trajectory needs 640 training records"
((train <= 10000 && test >= 1 && test <= 10000)) || die "GPU_PACK_TRAIN / GPU_PACK_TEST: 1..10000 records"

# --- build (release: these binaries run on the GPU) ----------------------------------------------------
export CARGO_TARGET_DIR=${MIXBENCH_CUDA_TARGET_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/mixbench/cuda-target}}
[[ -x $shared/tools/cuda-toolchain.sh ]] || die "$shared/tools/cuda-toolchain.sh: not found (set MIXBENCH_SHARED)"
cargo fetch --quiet
cuda_env=$(mktemp)
stage=""
trap 'rm -f "$cuda_env"; [[ -n $stage ]] && rm -rf "$stage"' EXIT
"$shared/tools/cuda-toolchain.sh" --cudnn >"$cuda_env"
# shellcheck disable=SC1090
source "$cuda_env"
# cudaforge gives nvcc half the cores unless told: candle's kernels are most of a cold build.
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
log "building runner and the CUDA test binaries (--features $features) in $CARGO_TARGET_DIR"
# One cargo invocation for the runner and the test binaries: separate ones resolve features
# with and without dev-dependencies and build candle and its nvcc kernels twice.
executables=$(cargo test --release --features "$features" -p runner -p kernels -p backbones \
    --no-run --message-format=json | python3 -c 'import json, sys
found = {}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    target = m["target"]
    if target["name"] in ("cuda_agreement", "cuda_trajectory") and target["kind"] == ["test"]:
        found[target["name"]] = m["executable"]
    elif target["name"] == "runner" and target["kind"] == ["bin"] and not m["profile"]["test"]:
        found["runner"] = m["executable"]
for name in ("runner", "cuda_agreement", "cuda_trajectory"):
    print(found.get(name, ""))')
{ read -r runner_bin; read -r agreement; read -r trajectory; } <<<"$executables"
[[ -x $runner_bin ]] || die "cargo test --no-run named no runner executable"
[[ -x $agreement ]] || die "cargo test --no-run named no cuda_agreement executable"
[[ -x $trajectory ]] || die "cargo test --no-run named no cuda_trajectory executable"

# --- the pack, staged beside DIR and moved into place when complete --------------------------
stage="$dir.partial.$$"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/data"
for pair in "runner=$runner_bin" "cuda_agreement=$agreement" \
    "cuda_trajectory=$trajectory"; do
    name=${pair%%=*} src=${pair#*=}
    strip -o "$stage/bin/$name" "$src"
    xz -9 -T1 "$stage/bin/$name"
    log "bin/$name.xz: $(stat -c %s "$stage/bin/$name.xz") bytes (from $src)"
done

if [[ -n ${CIFAR10_DIR:-} ]]; then
    data_src=$CIFAR10_DIR data_desc=$CIFAR10_DIR
else
    # No official files here: decode the shared JPEG copy (md5-checked by the unpacker).
    data_src=$(mktemp -d) data_desc="cifar10-jpegq75.pack (unpacked)"
    trap 'rm -f "$cuda_env"; rm -rf "$data_src"; [[ -n $stage ]] && rm -rf "$stage"' EXIT
    python3 -c 'import PIL' 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check pillow
    log "no CIFAR10_DIR: unpacking $shared/data/cifar10-jpegq75.pack"
    python3 "$shared/tools/cifar-unpack.py" "$shared/data/cifar10-jpegq75.pack" "$data_src" >&2
fi
"${helper[@]}" subset "$data_src" "$stage/data" --train "$train" --test "$test" >&2

nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
"${helper[@]}" manifest-write "$stage" \
    "commit=$(git rev-parse HEAD)" "describe=$(git describe --always --dirty)" \
    "features=$features" "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "nvcc=$nvcc_version" \
    "cuda_compute_cap=${CUDA_COMPUTE_CAP:-}" "train_records=$train" "test_records=$test" \
    "data_source=$data_desc"

total=$(du -sb "$stage" | cut -f1)
if ((total > max_bytes)); then
    du -ab "$stage" >&2
    die "the pack is $total bytes, over the $max_bytes-byte (60 MiB) limit"
fi
rm -rf "$dir"
mv "$stage" "$dir"
stage=""
(cd "$dir" && find . -type f -printf '%10s  %P\n' | sort -k2)
printf '%10s  total (%s MiB; limit 60 MiB)\n' "$total" "$(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}')"
log "run on the GPU machine: scripts/gpu-check.sh --pack $dir  (carry: [\"$dir\"])"
