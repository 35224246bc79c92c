#!/usr/bin/env bash
# mixbench vs PyTorch on this CPU, in one run: the same CIFAR ResNet train step (batch 100,
# MixUp, f32) at each base width, the two programs alternating, best of REPS each. Where the
# CPU has bf16 units (AMX-BF16, AVX512-BF16) PyTorch also runs its bf16 autocast, a user's
# fastest PyTorch option there (BF16=1 forces it elsewhere, where it converts in software and
# ran 16-29x slower than its f32; BF16=0 skips it), and mixbench's bf16 status says why it
# cannot run where it cannot. With MIXBENCH_CPU_BF16=emulate in the environment the bf16
# column also times mixbench's emulated bf16 (bf16 numerics on f32 units). Prints one JSON object with the throughputs and ratios per
# width, and the CPU's bf16 units.
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
units=$(python3 -c 'import json
flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
print(json.dumps([u for u in ("amx_bf16", "avx512_bf16") if u in flags]))' 2>/dev/null || echo '[]')
bf16="${BF16:-auto}"
# MIXBENCH_CPU_BF16=emulate: beside PyTorch's bf16 autocast, mixbench's bf16 numerics on f32
# units (both are bf16 without bf16 hardware where the CPU has none).
emulate=0
[[ ${MIXBENCH_CPU_BF16:-} == emulate ]] && emulate=1
if [[ $bf16 == auto ]]; then
    if [[ $units == "[]" ]]; then bf16=0; else bf16=1; fi
fi

[[ -x $runner ]] || cargo build --release -p runner >&2
"$py" -c 'import torch' 2>/dev/null || {
    echo "no PyTorch in $py: python3 -m venv .venv-ref && .venv-ref/bin/pip install torch numpy" >&2
    exit 2
}

best() { sort -g | tail -1; }
rows=()
for w in ${widths//,/ }; do
    ours=() theirs=() theirs_bf16=() ours_emulated=()
    for ((r = 0; r < reps; r++)); do
        ours+=("$(RAYON_NUM_THREADS=$threads "$runner" bench --arch "$arch" --batch 100 \
            --base-width "$w" --step-modes mixup --mix-modes mixup --steps "$steps" \
            | "$py" -c 'import json,sys; print(json.load(sys.stdin)["train_step"]["mixup"]["images_per_s"])')")
        theirs+=("$("$py" bench/reference.py bench --arch "$arch" --mix mixup --device cpu \
            --batch 100 --base-width "$w" --threads "$threads" --steps "$steps" \
            | "$py" -c 'import json,sys; print(json.load(sys.stdin)["images_per_s"])')")
        if [[ $bf16 == 1 ]]; then
            theirs_bf16+=("$("$py" bench/reference.py bench --arch "$arch" --mix mixup \
                --device cpu --dtype bf16 --batch 100 --base-width "$w" --threads "$threads" \
                --steps "$steps" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["images_per_s"])')")
            if [[ $emulate == 1 ]]; then
                ours_emulated+=("$(MIXBENCH_CPU_BF16=emulate RAYON_NUM_THREADS=$threads "$runner" \
                    bench --arch "$arch" --batch 100 --base-width "$w" --step-modes mixup \
                    --mix-modes mixup --steps "$steps" --precision bf16 \
                    | "$py" -c 'import json,sys; print(json.load(sys.stdin)["train_step"]["mixup"]["images_per_s"])')")
            fi
        fi
    done
    a=$(printf '%s\n' "${ours[@]}" | best)
    b=$(printf '%s\n' "${theirs[@]}" | best)
    row="\"base_width\": $w, \"mixbench_img_per_s\": $a, \"pytorch_img_per_s\": $b, \"ratio\": $("$py" -c "print(round($a / $b, 3))")"
    if [[ $bf16 == 1 ]]; then
        c=$(printf '%s\n' "${theirs_bf16[@]}" | best)
        row+=", \"pytorch_bf16_img_per_s\": $c, \"ratio_f32_to_pytorch_bf16\": $("$py" -c "print(round($a / $c, 3))")"
        if [[ $emulate == 1 ]]; then
            e=$(printf '%s\n' "${ours_emulated[@]}" | best)
            row+=", \"mixbench_bf16_emulated_img_per_s\": $e, \"ratio_bf16_emulated_to_pytorch_bf16\": $("$py" -c "print(round($e / $c, 3))")"
        fi
    fi
    rows+=("{$row}")
done
# mixbench's bf16: its one-line refusal where it cannot run (the reason goes in the JSON),
# asked without the emulation.
bf16_refusal=$(env -u MIXBENCH_CPU_BF16 "$runner" bench --arch "$arch" --batch 2 --base-width 8 --steps 1 \
    --step-modes vanilla --mix-modes mixup --precision bf16 2>&1 >/dev/null | tail -1 || true)
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
printf '{"arch": "%s", "batch": 100, "mix": "mixup", "threads": %s, "reps": %s, "steps": %s, "torch": "%s", "cpu_bf16_units": %s, "mixbench_bf16": %s, "rows": [%s]}\n' \
    "$arch" "$threads" "$reps" "$steps" "$torch_version" "$units" \
    "$("$py" -c 'import json,sys; print(json.dumps(sys.argv[1] or "ran"))' "$bf16_refusal")" \
    "$(IFS=,; echo "${rows[*]}")"
