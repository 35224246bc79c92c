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

# --download fetches the official archive (md5-checked) only if the files are missing.
exec cargo run --release -p runner -- \
    --config configs/quickstart/r18_mixup_quick.json --data "$data" --download "$@"
