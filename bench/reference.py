#!/usr/bin/env python3
"""PyTorch reference of the mixbench CIFAR-10 recipe, for speed and accuracy comparisons.

Follows the benchmark specification (docs/methods.md and docs/benchmark.md): CIFAR ResNet-18 and ResNeXt-50 32x4d (§2) with
the benchmark-era initialisation (§2.6), pad-4 random crop + horizontal flip (§1.3), MixUp /
CutMix (§5.2 / §5.3) with the CE_none loss (§3.4), SGD momentum 0.9, weight decay 1e-4 on every
parameter (§3.1), cosine learning rate per epoch (§3.2), batch 100 (§1.5).

  # (a) train-step throughput and peak memory, one JSON object per --dtype:
  python3 bench/reference.py bench --arch resnet18 --mix mixup --device cpu --batch 32
  python3 bench/reference.py bench --arch resnext50 --device cuda --dtype f32,tf32,bf16 --step-only
  # (b) per-layer convolution times on the shapes of crates/kernels/examples/conv_layers.rs:
  python3 bench/reference.py conv-layers --base-width 64 --threads 2
  # (c) accuracy reference: one JSON line per epoch with the test top-1:
  python3 bench/reference.py train --data data/cifar10 --epochs 200 --device cuda
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
ALPHA = {"vanilla": 0.0, "mixup": 1.0, "cutmix": 0.2}


# ---------------------------------------------------------------------------------------------
# §2 backbones


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.last_bn = self.bn2
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip)


class Bottleneck(nn.Module):
    """ResNeXt bottleneck, `style='pytorch'` (stride on the grouped 3x3)."""

    def __init__(self, c_in, c_out, stride, groups, width_per_group):
        super().__init__()
        mid = groups * width_per_group * (c_out // 4) // 64
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.last_bn = self.bn3
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip)


def _downsample(c_in, c_out, stride):
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class CifarNet(nn.Module):
    """3x3 stem (no max-pool), four stages with strides (1, 2, 2, 2), GAP, linear head."""

    def __init__(self, arch, num_classes=10, base_width=64):
        super().__init__()
        b = base_width
        self.stem = nn.Sequential(
            nn.Conv2d(3, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)
        )
        # The channel rule of crates/backbones/src/cifar.rs (CifarResNetConfig).
        if arch == "resnet18":
            depths, widths = (2, 2, 2, 2), (b, 2 * b, 4 * b, 8 * b)
            make = lambda c_in, c_out, s: BasicBlock(c_in, c_out, s)  # noqa: E731
        elif arch == "resnext50":
            groups = math.gcd(32, 2 * b)
            depths, widths = (3, 4, 6, 3), (4 * b, 8 * b, 16 * b, 32 * b)
            make = lambda c_in, c_out, s: Bottleneck(c_in, c_out, s, groups, 128 // groups)  # noqa: E731
        else:
            raise ValueError(f"--arch must be resnet18 or resnext50, got {arch!r}")
        stages, c_in = [], b
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for b in range(depth):
                blocks.append(make(c_in, width, 2 if (i > 0 and b == 0) else 1))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_benchmark_era()

    def _init_benchmark_era(self):
        """§2.6: Kaiming-normal fan_out convs, BN 1/0, zero-init residual, FC N(0, 0.01²)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn.weight)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


# ---------------------------------------------------------------------------------------------
# §5.2 / §5.3 mixing and the CE_none loss (§3.4)


def mix_batch(x, y, mode, rng):
    """Returns (x_mix, y_a, y_b, lam); one λ and one permutation per batch."""
    if mode == "vanilla":
        return x, y, y, 1.0
    lam = float(rng.beta(ALPHA[mode], ALPHA[mode]))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    if mode == "cutmix":
        size = x.shape[-1]
        cut = int(size * math.sqrt(1.0 - lam))
        rc, cc = int(rng.integers(size)), int(rng.integers(size))
        clip = lambda v: min(max(v, 0), size)  # noqa: E731
        r1, r2 = clip(rc - cut // 2), clip(rc + cut // 2)
        c1, c2 = clip(cc - cut // 2), clip(cc + cut // 2)
        x = x.clone()
        x[:, :, r1:r2, c1:c2] = x[perm][:, :, r1:r2, c1:c2]
        lam = 1.0 - (r2 - r1) * (c2 - c1) / float(size * size)
        return x, y, y[perm], lam
    raise ValueError(f"--mix must be vanilla, mixup or cutmix, got {mode!r}")


def mixed_ce(logits, y_a, y_b, lam):
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


# ---------------------------------------------------------------------------------------------
# §1 data


def read_cifar_bin(path):
    """Official binary layout: records of 1 label byte + 3072 CHW pixel bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073 != 0:
        sys.exit(f"{path}: size {raw.size} is not a multiple of 3073 (not a CIFAR-10 .bin file)")
    raw = raw.reshape(-1, 3073)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)


def load_split(data_dir, train):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    parts = []
    for n in names:
        p = os.path.join(data_dir, n)
        if not os.path.exists(p):
            sys.exit(f"--data {data_dir}: missing {n}")
        parts.append(read_cifar_bin(p))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def augment(images, rng):
    """§1.3 on uint8 CHW: zero-pad 4, random 32x32 crop, horizontal flip with p = 0.5."""
    n = images.shape[0]
    padded = np.zeros((n, 3, 40, 40), dtype=np.uint8)
    padded[:, :, 4:36, 4:36] = images
    out = np.empty_like(images)
    tops, lefts = rng.integers(0, 9, n), rng.integers(0, 9, n)
    flips = rng.random(n) < 0.5
    for i in range(n):
        crop = padded[i, :, tops[i] : tops[i] + 32, lefts[i] : lefts[i] + 32]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def normalize(u8, device):
    """§1.3 step 3: normalise on the device after collation."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    return (torch.from_numpy(u8).to(device).float() - mean) / std


# ---------------------------------------------------------------------------------------------
# training pieces


def make_optimizer(model):
    # Weight decay on every parameter, BN and biases included (§3.1).
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def cosine_lr(epoch, epochs, base=0.1, min_lr=0.0):
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def set_tf32(enabled):
    """Whether cuDNN convolutions and cuBLAS f32 matmuls may use TF32 tensor cores: off for
    `--dtype f32` (strict f32, like `runner bench --precision f32`), on for tf32 and bf16 (like
    the runner's tf32 and bf16, which also run candle's f32 GEMMs in TF32)."""
    mode = "tf32" if enabled else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # PyTorch >= 2.9
        conv.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
    else:
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def check_dtype(device, dtype):
    """tf32 is a CUDA notion (PyTorch computes f32 on the CPU whatever it says); bf16 is
    autocast on either device (on the CPU: oneDNN's bf16 kernels, which use AMX or AVX512-BF16
    where the CPU has them and convert in software elsewhere; see cpu_bf16_units)."""
    if dtype == "tf32" and device.type != "cuda":
        sys.exit("--dtype tf32 is only benchmarked on cuda (the CPU computes f32 whatever it says)")
    if device.type == "cuda":
        set_tf32(dtype != "f32")


def cpu_bf16_units():
    """The CPU's bf16 multiply units as Linux lists them (amx_bf16, avx512_bf16): what decides
    whether CPU bf16 autocast can be faster than f32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "").split()
    except OSError:
        return None
    return [u for u in ("amx_bf16", "avx512_bf16") if u in flags]


def autocast(device, dtype):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def train_step(model, opt, x, y, mix, rng, device, dtype):
    x, y_a, y_b, lam = mix_batch(x, y, mix, rng)
    with autocast(device, dtype):
        logits = model(x)
    loss = mixed_ce(logits.float(), y_a, y_b, lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def saliency_pass(model, x, y, device, dtype):
    """PuzzleMix's saliency pass (spec 5.9.1): evaluation mode, the loss's gradient with
    respect to the images alone (no parameter gradient), then back to training mode."""
    model.eval()
    x = x.detach().requires_grad_(True)
    with autocast(device, dtype):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    (grad,) = torch.autograd.grad(loss, x)
    model.train()
    return grad.pow(2).mean(dim=1).sqrt()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cmd_bench(args):
    device = torch.device(args.device)
    for dtype in args.dtype:
        check_dtype(device, dtype)
    for dtype in args.dtype:
        print(json.dumps(bench_one(args, device, dtype)), flush=True)


def bench_one(args, device, dtype):
    """Median train-step time of one dtype on a fresh model (same seed for every dtype)."""
    check_dtype(device, dtype)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = CifarNet(args.arch, base_width=args.base_width).to(device).train()
    opt = make_optimizer(model)
    # Random uint8 images: throughput does not depend on pixel values.
    u8 = rng.integers(0, 256, (args.batch, 3, 32, 32), dtype=np.uint8)
    y = torch.from_numpy(rng.integers(0, 10, args.batch)).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # §3.5
        torch.cuda.reset_peak_memory_stats(device)
    # --step-only: the batch is augmented, uploaded and normalised once, so the timed step is
    # what `runner bench` times (mixing, forward, loss, backward, SGD on a device batch).
    x_fixed = normalize(augment(u8, rng), device) if args.step_only else None
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        x = x_fixed if args.step_only else normalize(augment(u8, rng), device)
        train_step(model, opt, x, y, args.mix, rng, device, dtype)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    saliency = {}
    if args.saliency:
        # On the same batch and weights as the timed steps: the share of a step PuzzleMix adds
        # before its graph cuts, for `runner bench`'s `saliency_ms` / vanilla step beside it.
        x = x_fixed if x_fixed is not None else normalize(augment(u8, rng), device)
        sal_times = []
        for i in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            saliency_pass(model, x, y, device, dtype)
            sync(device)
            if i >= args.warmup:
                sal_times.append(time.perf_counter() - start)
        sal_s = float(np.median(sal_times))
        saliency = {"saliency_ms": sal_s * 1e3, "saliency_to_step": sal_s / step_s}
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "impl": "pytorch",
        "arch": args.arch,
        "mix": args.mix,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": dtype,
        "tf32": device.type == "cuda" and dtype != "f32",
        "cpu_bf16_units": cpu_bf16_units() if device.type == "cpu" else None,
        "timed": "step only" if args.step_only else "input pipeline and step",
        "batch": args.batch,
        "base_width": args.base_width,
        "images_per_s": args.batch / step_s,
        "step_ms": step_s * 1e3,
        "peak_mem_mb": peak_mb,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "torch": torch.__version__,
        **saliency,
    }


def cmd_conv_layers(args):
    """Forward and forward+backward of nn.Conv2d on the distinct convolution shapes of a CIFAR
    ResNet-18 (the table of crates/kernels/examples/conv_layers.rs, same order and counts),
    best of --reps after one warm-up; prints one JSON object in that example's format."""
    w, batch = args.base_width, args.batch
    # (name, c_in, c_out, input side, kernel, stride, count in the network)
    layers = [
        ("stem", 3, w, 32, 3, 1, 1),
        ("s1_3x3", w, w, 32, 3, 1, 4),
        ("s2_3x3_s2", w, 2 * w, 32, 3, 2, 1),
        ("s2_3x3", 2 * w, 2 * w, 16, 3, 1, 3),
        ("s2_1x1_s2", w, 2 * w, 32, 1, 2, 1),
        ("s3_3x3_s2", 2 * w, 4 * w, 16, 3, 2, 1),
        ("s3_3x3", 4 * w, 4 * w, 8, 3, 1, 3),
        ("s3_1x1_s2", 2 * w, 4 * w, 16, 1, 2, 1),
        ("s4_3x3_s2", 4 * w, 8 * w, 8, 3, 2, 1),
        ("s4_3x3", 8 * w, 8 * w, 4, 3, 1, 3),
        ("s4_1x1_s2", 4 * w, 8 * w, 8, 1, 2, 1),
    ]

    def best_ms(f):
        f()
        best = float("inf")
        for _ in range(args.reps):
            start = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    rows, total_fwd, total_fwd_bwd = [], 0.0, 0.0
    for name, c_in, c_out, side, k, stride, count in layers:
        conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        # The stem's input is the image: no input gradient, as in training.
        x = torch.randn(batch, c_in, side, side, requires_grad=name != "stem")

        def fwd():
            with torch.no_grad():
                conv(x)

        def fwd_bwd():
            conv(x).sum().backward()

        f, fb = best_ms(fwd), best_ms(fwd_bwd)
        total_fwd += f * count
        total_fwd_bwd += fb * count
        rows.append({"layer": name, "count": count, "fwd_ms": round(f, 2), "fwd_bwd_ms": round(fb, 2)})
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "width": w,
                "batch": batch,
                "threads": torch.get_num_threads(),
                "layers": rows,
                "net_conv_fwd_ms": round(total_fwd),
                "net_conv_fwd_bwd_ms": round(total_fwd_bwd),
                "torch": torch.__version__,
            }
        )
    )


@torch.no_grad()
def evaluate(model, images, labels, device, dtype, batch=100):
    model.eval()
    correct1 = correct5 = 0
    for i in range(0, images.shape[0], batch):
        x = normalize(images[i : i + batch], device)
        y = torch.from_numpy(labels[i : i + batch]).to(device)
        with autocast(device, dtype):
            logits = model(x).float()
        top5 = logits.topk(5, dim=1).indices
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(dim=1).sum().item()
    model.train()
    return 100.0 * correct1 / images.shape[0], 100.0 * correct5 / images.shape[0]


def cmd_train(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        set_tf32(args.dtype != "f32")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, train_y = load_split(args.data, train=True)
    test_x, test_y = load_split(args.data, train=False)
    if args.limit:
        train_x, train_y = train_x[: args.limit], train_y[: args.limit]
    model = CifarNet(args.arch, base_width=args.base_width).to(device).train()
    opt = make_optimizer(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n = train_x.shape[0]
    for epoch in range(args.epochs):
        lr = cosine_lr(epoch, args.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        order = rng.permutation(n)
        start, losses = time.perf_counter(), []
        for i in range(0, n, args.batch):
            idx = order[i : i + args.batch]
            x = normalize(augment(train_x[idx], rng), device)
            y = torch.from_numpy(train_y[idx]).to(device)
            losses.append(train_step(model, opt, x, y, args.mix, rng, device, args.dtype))
        train_s = time.perf_counter() - start
        top1, top5 = evaluate(model, test_x, test_y, device, args.dtype)
        record = {
            "impl": "pytorch",
            "arch": args.arch,
            "mix": args.mix,
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(torch.stack(losses).mean()),
            "test_top1": top1,
            "test_top5": top5,
            "train_s": train_s,
        }
        print(json.dumps(record), flush=True)


DTYPES = ["f32", "tf32", "bf16"]


def dtype_list(text):
    dtypes = [d for d in text.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(DTYPES)}")
    return dtypes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("bench", "train"):
        s = sub.add_parser(name)
        s.add_argument("--arch", default="resnet18", choices=["resnet18", "resnext50"])
        s.add_argument("--mix", default="mixup", choices=sorted(ALPHA))
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--batch", type=int, default=100)
        s.add_argument("--base-width", type=int, default=64, help="stem width (64: the benchmark)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    b = sub.choices["bench"]
    b.add_argument(
        "--dtype",
        default=["f32"],
        type=dtype_list,
        help="comma list of f32 (strict, TF32 off), tf32, bf16 (autocast); one JSON line each",
    )
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument(
        "--step-only",
        action="store_true",
        help="time the step on a batch already on the device, as `runner bench` does",
    )
    b.add_argument(
        "--saliency",
        action="store_true",
        help="also time PuzzleMix's saliency pass (eval mode, input gradient only): saliency_ms, saliency_to_step",
    )
    t = sub.choices["train"]
    t.add_argument("--dtype", default="f32", choices=DTYPES)
    t.add_argument("--data", required=True, help="directory with the CIFAR-10 .bin files")
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--limit", type=int, default=0, help="use only the first N train images")
    c = sub.add_parser("conv-layers")
    c.add_argument("--base-width", type=int, default=64, help="stem width (64: the benchmark)")
    c.add_argument("--batch", type=int, default=100)
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"bench": cmd_bench, "train": cmd_train, "conv-layers": cmd_conv_layers}[args.cmd](args)


if __name__ == "__main__":
    main()
