#!/usr/bin/env bash
# One command on a fresh machine: fetch CIFAR-10 if needed, build the runner,
# and train a short real run (ResNet-18 + MixUp on a CIFAR-10 subset, CPU).
#   CIFAR10_DIR=/path/to/bins scripts/quickstart.sh [extra runner flags…]
set -euo pipefail
cd "$(dirname "$0")/.."

data="${CIFAR10_DIR:-data/cifar10}"
shared_pack="../shared/data/cifar10-jpegq75.pack"
if [[ ! -f "$data/test_batch.bin" && ! -f "$data/cifar-10-batches-bin/test_batch.bin" \
      && -f "$shared_pack" ]]; then
    # Inside the mixbench workplace: the JPEG-q75 copy replaces the download.
    python3 -m pip install --quiet --disable-pip-version-check pillow
    python3 ../shared/tools/cifar-unpack.py "$shared_pack" "$data"
fi

# Each quickstart trains into a work dir of its own (the runner never overwrites a run), unless
# the extra flags name one (continue a killed quickstart with --work-dir DIR --resume).
run_dir=()
case " $* " in
*" --work-dir"*) ;;
*) run_dir=(--work-dir "work_dirs/quickstart/r18_mixup_quick_$(date +%Y%m%d_%H%M%S)") ;;
esac

# --download fetches the official archive (md5-checked) only if the files are missing.
exec cargo run --release -p runner -- \
    --config configs/quickstart/r18_mixup_quick.json --data "$data" --download \
    "${run_dir[@]}" "$@"
