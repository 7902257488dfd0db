"""Forward + backward throughput of one DeepLabv3+ branch: NCHW fp32 vs channels_last + bf16 autocast.

One training iteration of one branch: forward, cross-entropy on the full-size
logits, backward (gradients set to None between iterations, no optimiser).
FLOPs of an iteration are counted once with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matmuls: the work that matters), and achieved TFLOP/s is put
next to a bf16 matmul measured in the same run on the same device.

    python benchmarks/bench_model.py                 # CPU: resnet18/50 at 2x3x129x129
    python benchmarks/bench_model.py --device cuda   # GPU: resnet50/101 at 8x3x512x512 and 8x3x800x800

Writes JSON rows (device, versions, shapes, median and 20/80 % quantiles) to
``--json`` (default ``bench_model-<device>.json`` in the current folder).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cps_fast.config import ConfigError  # noqa: E402
from cps_fast.models import deeplabv3plus  # noqa: E402
from cps_fast.models.resnet import RESNET_SPECS  # noqa: E402

MODES = ("nchw-fp32", "cl-bf16")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def _matmul_tflops(device: torch.device, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def _step(model, x, target, amp: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits, target, ignore_index=255)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def _count_flops(model, x, target) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _step(model, x, target, amp=False)
    return float(counter.get_total_flops())


def bench_one(backbone: str, shape: tuple[int, int, int, int], mode: str, device: torch.device,
              warmup: int, iters: int, num_classes: int, output_stride: int) -> dict:
    torch.manual_seed(0)
    n, c, h, w = shape
    model = deeplabv3plus(backbone, num_classes=num_classes, output_stride=output_stride).to(device).train()
    x = torch.randn(shape, device=device)
    target = torch.randint(0, num_classes, (n, h, w), device=device)
    amp = mode == "cl-bf16"
    if amp:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        _step(model, x, target, amp)
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        _step(model, x, target, amp)
        _sync(device)
        times.append(time.perf_counter() - t0)
    med, q20, q80 = _quantiles(times)
    return {"backbone": backbone, "shape": list(shape), "mode": mode, "output_stride": output_stride,
            "num_classes": num_classes, "iters": iters, "median_ms": med * 1e3, "q20_ms": q20 * 1e3,
            "q80_ms": q80 * 1e3, "images_per_s": n / med}


def _parse_shape(s: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(v) for v in s.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 4 or parts[1] != 3 or min(parts) < 1:
        raise ConfigError(f"--shapes has {s!r}; expected a comma list of NxCxHxW with C=3, e.g. 8x3x512x512")
    return parts


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark, prints a table, writes JSON rows; returns the rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbones", default=None, help="comma list (default cpu: resnet18,resnet50; "
                                                     "cuda: resnet50,resnet101)")
    p.add_argument("--shapes", default=None,
                   help="comma list of NxCxHxW (default cpu: 2x3x129x129; cuda: 8x3x512x512,8x3x800x800)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench model: --device cuda given but torch sees no CUDA device")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        # torch's defaults kept (TF32 convolutions on, as in the reference code and bench_step):
        # turning TF32 off would slow the fp32 baseline and inflate the bf16 speed-up
    backbones = (args.backbones or ("resnet50,resnet101" if gpu else "resnet18,resnet50")).split(",")
    for b in backbones:
        if not (b.startswith("resnet") and b[6:].isdigit() and int(b[6:]) in RESNET_SPECS):
            raise ConfigError(f"--backbones has {b!r}; expected a comma list of "
                              f"{', '.join(f'resnet{d}' for d in sorted(RESNET_SPECS))}")
    shapes = [_parse_shape(v) for v in args.shapes.split(",")] if args.shapes else \
        ([(8, 3, 512, 512), (8, 3, 800, 800)] if gpu else [(2, 3, 129, 129)])
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"--modes has {m!r}; expected a comma list of {', '.join(MODES)}")
    for name in ("warmup", "iters", "num_classes"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected an integer >= {0 if name == 'warmup' else 1}")
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    iters = args.iters if args.iters is not None else (20 if gpu else 5)

    name = _device_name(device)
    matmul_n = 8192 if gpu else 1024
    matmul = _matmul_tflops(device, matmul_n, 10 if gpu else 5)
    meta = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if gpu else None, "python": platform.python_version(),
            "matmul_bf16_tflops": matmul, "matmul_n": matmul_n}

    rows = []
    print(f"device: {name}   torch {torch.__version__}   bf16 matmul {matmul_n}^3: {matmul:.2f} TFLOP/s")
    header = (f"{'backbone':<10} {'shape':<15} {'mode':<10} {'median ms':>10} {'q20':>9} {'q80':>9} "
              f"{'img/s':>8} {'GFLOP/it':>9} {'TFLOP/s':>8} {'% mm':>6}")
    print(header)
    print("-" * len(header))
    for backbone in backbones:
        for shape in shapes:
            flops = None
            if not args.no_flops:
                torch.manual_seed(0)
                model = deeplabv3plus(backbone, num_classes=args.num_classes,
                                      output_stride=args.output_stride).to(device).train()
                x = torch.randn(shape, device=device)
                t = torch.randint(0, args.num_classes, (shape[0], shape[2], shape[3]), device=device)
                flops = _count_flops(model, x, t)
                del model, x, t
            for mode in modes:
                row = bench_one(backbone, shape, mode, device, warmup, iters, args.num_classes,
                                args.output_stride)
                row.update(meta)
                if flops is not None:
                    row["gflop_per_iter"] = flops / 1e9
                    row["tflops"] = flops / (row["median_ms"] / 1e3) / 1e12
                    row["fraction_of_matmul"] = row["tflops"] / matmul
                rows.append(row)
                _write(rows, args.json, device)  # kept if the run is killed
                shape_s = "x".join(map(str, shape))
                fl = (f"{row['gflop_per_iter']:>9.1f} {row['tflops']:>8.3f} {100 * row['fraction_of_matmul']:>5.1f}%"
                      if flops is not None else f"{'-':>9} {'-':>8} {'-':>6}")
                print(f"{backbone:<10} {shape_s:<15} {mode:<10} {row['median_ms']:>10.1f} {row['q20_ms']:>9.1f} "
                      f"{row['q80_ms']:>9.1f} {row['images_per_s']:>8.2f} {fl}")
                if gpu:
                    torch.cuda.empty_cache()

    out = _write(rows, args.json, device)
    print(f"wrote {len(rows)} rows to {out}")
    return rows


def _write(rows, path, device) -> str:
    out = path or os.path.join(os.getcwd(), f"bench_model-{device.type}.json")  # never over the committed measurements
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    return out


if __name__ == "__main__":
    main()
