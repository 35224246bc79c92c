#!/usr/bin/env bash
# Does bf16 cost accuracy? The reduced comparison of issue 23: ResNet-18 at base width 16,
# the first TRAIN (10,000) training and TEST (2,000) test images, EPOCHS (10) epochs of MixUp,
# for each seed in SEEDS (0,1), once in f32 and once in bf16. Without a CPU bf16 path the bf16
# runs use MIXBENCH_CPU_BF16=emulate: the convolutions' operands and results rounded to bf16
# around f32 arithmetic, the numerics of the CUDA bf16 autocast (slower than f32). Prints one
# JSON object: per run the final and median top-1 and the mean train loss of every epoch.
#
#   bench/bf16-accuracy.sh [DATA_DIR (default data/cifar10)] [OUT_DIR (default work_dirs/bf16-accuracy)]
#
# Takes about 20 minutes on 2 cores. OUT_DIR must not hold earlier runs of the same names.
set -euo pipefail
cd "$(dirname "$0")/.."

data="${1:-data/cifar10}"
out="${2:-work_dirs/bf16-accuracy}"
seeds="${SEEDS:-0,1}"
epochs="${EPOCHS:-10}"
train="${TRAIN:-10000}"
test="${TEST:-2000}"
runner="${RUNNER:-target/release/runner}"

[[ -x $runner ]] || cargo build --release -p runner >&2
mkdir -p "$out"
runs=()
for seed in ${seeds//,/ }; do
    for precision in f32 bf16; do
        name="r18w16_mixup_${precision}_seed${seed}"
        cfg="$out/$name.json"
        cat >"$cfg" <<JSON
{
  "name": "$name",
  "seed": $seed,
  "model": {"mix_mode": "mixup", "alpha": 1.0,
            "backbone": {"arch": "resnet18", "base_width": 16}},
  "data": {"dir": "$data", "batch_size": 100, "limit_train": $train, "limit_test": $test},
  "train": {"precision": "$precision"},
  "max_epochs": $epochs,
  "checkpoint": {"interval": $epochs},
  "log": {"interval": 20},
  "work_dir": "$out/$name"
}
JSON
        echo "== $name" >&2
        MIXBENCH_CPU_BF16=$([[ $precision == bf16 ]] && echo emulate || true) \
            "$runner" --config "$cfg" --quiet >&2
        runs+=("$out/$name")
    done
done

python3 - "${runs[@]}" <<'PY'
import glob, json, sys
report = {}
for work in sys.argv[1:]:
    log = sorted(glob.glob(f"{work}/*.log.json"))[-1]
    lines = [json.loads(l) for l in open(log) if l.strip()]
    meta = lines[0]
    train = {}
    for l in lines:
        if l.get("mode") == "train":
            train.setdefault(l["epoch"], []).append(l["loss"])
    vals = [l for l in lines if l.get("mode") == "val"]
    summary = next((l for l in reversed(lines) if "median_top1" in l), {})
    report[work.rsplit("/", 1)[-1]] = {
        "precision": meta.get("precision"),
        "final_top1": vals[-1]["head0_top1"] if vals else None,
        "median_top1": summary.get("median_top1"),
        "top1_by_epoch": [v["head0_top1"] for v in vals],
        "train_loss_by_epoch": [round(sum(v) / len(v), 4) for _, v in sorted(train.items())],
    }
print(json.dumps(report, indent=1))
PY
