#!/usr/bin/env python3
"""The parts of scripts/gpu-check.sh and scripts/gpu-pack.sh that are easier in Python than in
bash: the CIFAR-10 subset, the pack's manifest, the CUDA library folders of the Python `nvidia`
wheels and the JSON summary. Standard library only (it runs on the bare GPU machines and in CI).

  gpu-check-helper.py subset SRC DST --train N --test M   # prefix of data_batch_1 / test_batch
  gpu-check-helper.py synthetic DST --train N --test M    # the same files with made-up images
  gpu-check-helper.py layout SUBSET DST                   # a folder the runner's loader accepts
  gpu-check-helper.py libdirs                             # CUDA library folders, one a line
  gpu-check-helper.py manifest-write PACK KEY=VALUE...    # PACK/manifest.json
  gpu-check-helper.py manifest-verify PACK                # sizes and sha256s; exit 1 if wrong
  gpu-check-helper.py summary OUT                         # the JSON summary of OUT/state
"""

import argparse
import csv
import glob
import hashlib
import json
import os
import shutil
import random
import sys

RECORD = 3073  # official binary layout: 1 label byte + 3072 CHW pixel bytes
RECORDS_PER_FILE = 10_000
TRAIN_FILE = "data_batch_1.bin"
TEST_FILE = "test_batch.bin"
STAGES = ["prereq", "tests", "bench", "pytorch", "resnext50", "epoch"]


def fail(message):
    sys.exit(f"gpu-check-helper: {message}")


# ---------------------------------------------------------------------------------------------
# data


def find_batches(src):
    """`src` itself or its cifar-10-batches-bin subfolder, whichever holds the test file."""
    for base in (src, os.path.join(src, "cifar-10-batches-bin")):
        if os.path.isfile(os.path.join(base, TEST_FILE)):
            return base
    fail(f"{src}: no {TEST_FILE} here or in its cifar-10-batches-bin folder")


def copy_prefix(src, dst, records):
    """The first `records` records of `src` into `dst`, labels checked."""
    size = os.path.getsize(src)
    if size % RECORD:
        fail(f"{src}: {size} bytes is not a whole number of {RECORD}-byte records")
    if size < records * RECORD:
        fail(f"{src}: {size // RECORD} records, {records} wanted")
    with open(src, "rb") as f:
        data = f.read(records * RECORD)
    bad = next((i for i in range(records) if data[i * RECORD] > 9), None)
    if bad is not None:
        fail(f"{src}: record {bad} has label {data[bad * RECORD]} (not 0..9)")
    with open(dst, "wb") as f:
        f.write(data)


def cmd_subset(args):
    base = find_batches(args.src)
    os.makedirs(args.dst, exist_ok=True)
    for name, n in ((TRAIN_FILE, args.train), (TEST_FILE, args.test)):
        copy_prefix(os.path.join(base, name), os.path.join(args.dst, name), n)
        print(f"{name}: first {n} records of {os.path.join(base, name)}")


def cmd_synthetic(args):
    """Labels 0..9 in turn, pixels from a fixed-seed generator: a stand-in for the real files
    when no CIFAR-10 copy is at hand (dry runs only; the pack refuses it)."""
    os.makedirs(args.dst, exist_ok=True)
    rng = random.Random(20261207)
    for name, n in ((TRAIN_FILE, args.train), (TEST_FILE, args.test)):
        with open(os.path.join(args.dst, name), "wb") as f:
            for i in range(n):
                f.write(bytes([i % 10]) + rng.randbytes(RECORD - 1))
        print(f"{name}: {n} synthetic records")


def cmd_layout(args):
    """The subset as the runner reads it: data_batch_1.bin and test_batch.bin holding the first
    records of the official files. The loader takes such a prefix when --limit-train /
    --limit-test do not exceed it (cifar_data::load_train_limited), so nothing is padded."""
    os.makedirs(args.dst, exist_ok=True)
    counts = {}
    for name in (TRAIN_FILE, TEST_FILE):
        src = os.path.join(args.subset, name)
        size = os.path.getsize(src)
        if size % RECORD or size == 0 or size > RECORDS_PER_FILE * RECORD:
            fail(f"{src}: {size} bytes is not 1..{RECORDS_PER_FILE} records of {RECORD} bytes")
        dst = os.path.join(args.dst, name)
        if os.path.lexists(dst):
            os.remove(dst)
        shutil.copyfile(src, dst)
        counts[name] = size // RECORD
    print(f"{counts[TRAIN_FILE]} {counts[TEST_FILE]}")


# ---------------------------------------------------------------------------------------------
# CUDA libraries


def cmd_libdirs(_args):
    """Folders of the `nvidia-*` wheels that hold shared libraries, cu13 and cuDNN first."""
    roots = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        roots += list(nvidia.__path__)
    except ImportError:
        pass
    roots += [os.path.join(p, "nvidia") for p in sys.path if p]
    seen, found = set(), []
    for root in roots:
        if not os.path.isdir(root):
            continue
        candidates = [os.path.join(root, "cu13", "lib"), os.path.join(root, "cudnn", "lib")]
        candidates += sorted(glob.glob(os.path.join(root, "*", "lib")))
        for d in candidates:
            real = os.path.realpath(d)
            if real in seen or not os.path.isdir(d):
                continue
            if glob.glob(os.path.join(d, "lib*.so*")):
                seen.add(real)
                found.append(d)
    print("\n".join(found))


# ---------------------------------------------------------------------------------------------
# manifest


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cmd_manifest_write(args):
    manifest = {"format": 1}
    for item in args.fields:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"manifest-write: {item!r} is not KEY=VALUE")
        manifest[key] = value
    files = {}
    for dirpath, _, names in os.walk(args.pack):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, args.pack)
            if rel == "manifest.json":
                continue
            files[rel] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
            if name.endswith(".bin"):
                files[rel]["records"] = os.path.getsize(path) // RECORD
    manifest["files"] = dict(sorted(files.items()))
    manifest["total_bytes"] = sum(f["bytes"] for f in files.values())
    with open(os.path.join(args.pack, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def cmd_manifest_verify(args):
    path = os.path.join(args.pack, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: {e} (make the pack with scripts/gpu-pack.sh)")
    problems = []
    for rel, want in manifest.get("files", {}).items():
        p = os.path.join(args.pack, rel)
        if not os.path.isfile(p):
            problems.append(f"{p}: missing")
        elif os.path.getsize(p) != want["bytes"]:
            problems.append(f"{p}: {os.path.getsize(p)} bytes, manifest says {want['bytes']}")
        elif sha256(p) != want["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest")
    if problems:
        fail("; ".join(problems))
    print(f"{len(manifest.get('files', {}))} files match {path}")


# ---------------------------------------------------------------------------------------------
# summary


def read_tsv(path, fields):
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                rows.append(dict(zip(fields, row + [""] * (len(fields) - len(row)))))
    return rows


def number(text):
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return int(v) if v.is_integer() and "." not in str(text) else v


def last_line(path, limit=300):
    """The log's last non-empty line: what a failure said, without opening the log."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return None
    return lines[-1][:limit] if lines else None


def parse_rust_tests(log):
    out = {"passed": 0, "failed": 0, "ignored": 0, "failures": []}
    try:
        with open(log, errors="replace") as f:
            for ln in f:
                ln = ln.strip()
                if ln.startswith("test result:"):
                    for part in ln.split(";"):
                        words = part.split()
                        for key in ("passed", "failed", "ignored"):
                            if len(words) >= 2 and words[-1] == key and words[-2].isdigit():
                                out[key] += int(words[-2])
                elif ln.startswith("test ") and ln.endswith("FAILED"):
                    out["failures"].append(ln[len("test ") : -len("... FAILED")].strip())
    except OSError:
        pass
    return out


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def parse_runner_bench(result):
    r = load_json(result)
    if not isinstance(r, dict):
        return {}
    out = {"precision": r.get("precision"), "cudnn_conv": r.get("cudnn_conv")}
    for mode, entry in (r.get("train_step") or {}).items():
        out[f"{mode}_ms"] = entry.get("step_ms")
        out[f"{mode}_images_per_s"] = entry.get("images_per_s")
    return out


def parse_pytorch_bench(result):
    out = {}
    try:
        with open(result) as f:
            for ln in f:
                try:
                    r = json.loads(ln)
                except ValueError:
                    continue
                out[r.get("dtype")] = {
                    k: r.get(k) for k in ("step_ms", "images_per_s", "peak_mem_mb", "gpu", "torch")
                }
    except OSError:
        pass
    return {"results": out} if out else {}


def parse_epoch(out_dir):
    rows = []
    try:
        with open(os.path.join(out_dir, "epoch", "metrics.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        pass
    if not rows:
        return {}
    last = rows[-1]
    return {
        "top1": number(last.get("head0_top1")),
        "top5": number(last.get("head0_top5")),
        "train_loss": number(last.get("train_loss")),
        "img_per_s": number(last.get("img_per_s")),
        "epoch_seconds": number(last.get("epoch_seconds")),
    }


def cmd_summary(args):
    out_dir = args.out
    state = os.path.join(out_dir, "state")
    meta = {r["key"]: r["value"] for r in read_tsv(os.path.join(state, "meta.tsv"), ["key", "value"])}
    stage_rows = read_tsv(
        os.path.join(state, "stages.tsv"), ["stage", "status", "seconds", "budget_s", "reason"]
    )
    run_rows = read_tsv(
        os.path.join(state, "runs.tsv"),
        ["stage", "name", "kind", "status", "exit_code", "seconds", "budget_s", "log", "result", "reason"],
    )
    summary = {"mode": meta.get("mode"), "ok": False}
    for key in ("deadline_s", "elapsed_s"):
        summary[key] = number(meta.get(key))
    summary["out_dir"] = out_dir
    if meta.get("interrupted"):
        summary["interrupted_by"] = meta["interrupted"]

    stages = {}
    for row in stage_rows:
        entry = {"status": row["status"]}
        if row["reason"]:
            entry["reason"] = row["reason"]
        for key in ("seconds", "budget_s"):
            if row[key] != "":
                entry[key] = number(row[key])
        stages[row["stage"]] = entry
    for row in run_rows:
        run = {"status": row["status"]}
        for key in ("exit_code", "seconds", "budget_s"):
            if row[key] != "":
                run[key] = number(row[key])
        if row["reason"]:
            run["reason"] = row["reason"]
        log = os.path.join(out_dir, row["log"]) if row["log"] else None
        result = os.path.join(out_dir, row["result"]) if row["result"] else None
        if row["log"]:
            run["log"] = row["log"]
        if row["status"] in ("failed", "out of time") and log:
            run["last_line"] = last_line(log)
        kind = row["kind"]
        if kind == "rust-test" and log:
            run.update(parse_rust_tests(log))
        elif kind == "runner-bench" and result:
            run.update(parse_runner_bench(result))
        elif kind == "pytorch-bench" and result:
            run.update(parse_pytorch_bench(result))
        stages.setdefault(row["stage"], {"status": "?"}).setdefault("runs", {})[row["name"]] = run

    # The prerequisites' findings.
    prereq = stages.get("prereq", {"status": "?"})
    for key in ("pack_commit", "pack_describe", "pack_features", "pack_dir"):
        if meta.get(key):
            prereq.setdefault("pack", {})[key[len("pack_") :]] = meta[key]
    if meta.get("lib_dirs"):
        prereq["lib_dirs"] = meta["lib_dirs"].split(":")
    if meta.get("libraries"):
        prereq["libraries"] = dict(
            item.split("=", 1) for item in meta["libraries"].split(";") if "=" in item
        )
    if meta.get("gpus"):
        prereq["gpus"] = meta["gpus"].split(";")
    for key in ("data_source", "train_records", "test_records"):
        if meta.get(key):
            prereq.setdefault("data", {})[key.replace("data_", "")] = number(meta[key]) or meta[key]
    stages["prereq"] = prereq

    if "epoch" in stages:
        stages["epoch"].update(parse_epoch(out_dir))
        for key in ("epoch_train_images", "epoch_test_images"):
            if meta.get(key):
                stages["epoch"][key[len("epoch_") :]] = number(meta[key])
    for name in STAGES:
        summary[name] = stages.get(name, {"status": "skipped", "reason": "not reached"})

    # Our MixUp step time over PyTorch's, same device, arch, batch and precision.
    ours, theirs = {}, {}
    for stage in ("bench", "resnext50"):
        for name, run in summary[stage].get("runs", {}).items():
            if "mixup_ms" in run:
                ours[name] = run["mixup_ms"]
    for stage in ("pytorch", "resnext50"):
        for name, run in summary[stage].get("runs", {}).items():
            arch = name.replace("pytorch-", "")
            for dtype, r in run.get("results", {}).items():
                theirs[f"{arch}-{dtype}"] = r.get("step_ms")
    ratios = {
        k: round(ours[k] / theirs[k], 3) for k in sorted(ours) if ours[k] and theirs.get(k)
    }
    summary["ratio_to_pytorch"] = ratios

    statuses = [summary[name]["status"] for name in STAGES]
    if summary["prereq"]["status"] != "ok":
        code = 2
    elif meta.get("interrupted") or any(s not in ("ok", "skipped") for s in statuses):
        code = 1
    else:
        code = 0
    summary["ok"] = code == 0
    summary["exit_code"] = code
    print(json.dumps(summary, indent=1))
    sys.exit(code)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--train", type=int, required=True)
    s.add_argument("--test", type=int, required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("dst")
    s.add_argument("--train", type=int, required=True)
    s.add_argument("--test", type=int, required=True)
    s = sub.add_parser("layout")
    s.add_argument("subset")
    s.add_argument("dst")
    sub.add_parser("libdirs")
    s = sub.add_parser("manifest-write")
    s.add_argument("pack")
    s.add_argument("fields", nargs="*")
    s = sub.add_parser("manifest-verify")
    s.add_argument("pack")
    s = sub.add_parser("summary")
    s.add_argument("out")
    args = p.parse_args()
    for key in ("train", "test"):
        if getattr(args, key, 1) < 1:
            fail(f"--{key} must be at least 1")
    {
        "subset": cmd_subset,
        "synthetic": cmd_synthetic,
        "layout": cmd_layout,
        "libdirs": cmd_libdirs,
        "manifest-write": cmd_manifest_write,
        "manifest-verify": cmd_manifest_verify,
        "summary": cmd_summary,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
