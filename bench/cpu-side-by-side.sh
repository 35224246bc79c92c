#!/usr/bin/env bash
# mixbench vs PyTorch on this CPU, in one run: the same CIFAR ResNet train step (batch 100,
# MixUp, f32) at each base width, the two programs alternating, best of REPS each. Prints one
# JSON object with both throughputs and their ratio per width.
#
#   bench/cpu-side-by-side.sh [WIDTHS (default 16,64)] [REPS (default 2)]
#
# Needs a release runner (built here if missing) and PyTorch in .venv-ref
# (`python3 -m venv .venv-ref && .venv-ref/bin/pip install torch numpy`). Run it on a quiet
# machine: anything else running moves both numbers. Threads: both use all cores
# (THREADS=N pins both to N).
set -euo pipefail
cd "$(dirname "$0")/.."

widths="${1:-16,64}"
reps="${2:-2}"
arch="${ARCH:-resnet18}"
steps="${STEPS:-5}"
py="${PYTHON:-.venv-ref/bin/python}"
runner="${RUNNER:-target/release/runner}"
threads="${THREADS:-$(nproc)}"

[[ -x $runner ]] || cargo build --release -p runner >&2
"$py" -c 'import torch' 2>/dev/null || {
    echo "no PyTorch in $py: python3 -m venv .venv-ref && .venv-ref/bin/pip install torch numpy" >&2
    exit 2
}

best() { sort -g | tail -1; }
rows=()
for w in ${widths//,/ }; do
    ours=() theirs=()
    for ((r = 0; r < reps; r++)); do
        ours+=("$(RAYON_NUM_THREADS=$threads "$runner" bench --arch "$arch" --batch 100 \
            --base-width "$w" --step-modes mixup --mix-modes mixup --steps "$steps" \
            | "$py" -c 'import json,sys; print(json.load(sys.stdin)["train_step"]["mixup"]["images_per_s"])')")
        theirs+=("$("$py" bench/reference.py bench --arch "$arch" --mix mixup --device cpu \
            --batch 100 --base-width "$w" --threads "$threads" --steps "$steps" \
            | "$py" -c 'import json,sys; print(json.load(sys.stdin)["images_per_s"])')")
    done
    a=$(printf '%s\n' "${ours[@]}" | best)
    b=$(printf '%s\n' "${theirs[@]}" | best)
    rows+=("{\"base_width\": $w, \"mixbench_img_per_s\": $a, \"pytorch_img_per_s\": $b, \"ratio\": $("$py" -c "print(round($a / $b, 3))")}")
done
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
printf '{"arch": "%s", "batch": 100, "mix": "mixup", "threads": %s, "reps": %s, "steps": %s, "torch": "%s", "rows": [%s]}\n' \
    "$arch" "$threads" "$reps" "$steps" "$torch_version" "$(IFS=,; echo "${rows[*]}")"
