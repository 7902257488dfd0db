"""Data-loading throughput: images/s and CPU cores used, per backend, at the VOC
(512 crop, ~500x375 JPEGs) and Cityscapes (800 crop, 2048x1024 PNGs) settings.

Synthetic scenes are written once into a temporary folder in each dataset's own layout
and format: JPEG images and grayscale PNG labels for VOC; for Cityscapes RGB PNG images
(decoded on the CPU: nvImageCodec has no GPU PNG decoder) and labelIds PNGs, mapped to
train ids in the pipeline (4 distinct scenes repeated under every name: PNG encoding is
slow). CPU cores used = (CPU time of this process and its worker processes) / wall time
over the measured iterations. On a GPU the target is at
least twice the images/s that the training step consumes.

    python benchmarks/bench_data.py [--backends pytorch dali-cpu dali-gpu] [--json PATH]
    cps-fast bench data ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ConfigError, environment, positive, print_table, quantiles, write_json  # noqa: E402

import cps_fast.data as D  # noqa: E402
from cps_fast.data.dali import dali_available  # noqa: E402

SETTINGS = {
    "voc": {"size": (375, 500), "crop": 512, "format": "jpeg"},
    "cityscapes": {"size": (1024, 2048), "crop": 800, "format": "png"},
}


MARKER = "bench_data.json"  # written last: a folder without it (an interrupted write) is rewritten


def write_setting(name: str, root: str, n_img: int) -> None:
    """The setting's synthetic dataset in its own layout (VOC JPEGs, Cityscapes PNGs)."""
    size = SETTINGS[name]["size"]
    if name == "cityscapes":
        D.write_cityscapes(root, n_train=n_img, n_val=0, size=size, seed=0, unique=min(n_img, 4))
    else:
        D.write_voc(root, n_train=n_img, n_val=0, size=size, seed=0)
    with open(os.path.join(root, MARKER), "w") as f:
        json.dump({"setting": name, "images": n_img, "size": list(size)}, f)


def setting_written(name: str, root: str, n_img: int) -> bool:
    """True when ``root`` holds this setting's data, fully written, with ``n_img`` images."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta == {"setting": name, "images": n_img, "size": list(SETTINGS[name]["size"])}


def _proc_cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a live process from /proc (Linux), 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except Exception:
        return 0.0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except Exception:
        pass
    return out


def cpu_seconds() -> float:
    """CPU time of this process plus its (live and finished) child processes."""
    t = os.times()
    live = sum(_proc_cpu_seconds(c) for c in _children(os.getpid()))
    return t.user + t.system + t.children_user + t.children_system + live


def bench_one(ds, backend, crop, batch, iters, warmup, workers, device):
    loader = D.labeled_loader(ds, batch_size=batch, crop_size=crop, backend=backend,
                              num_workers=workers, seed=0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    c0, w0 = cpu_seconds(), time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        b = next(it)
        if b["image"].is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    wall = time.perf_counter() - w0
    cores = (cpu_seconds() - c0) / wall
    del it, loader
    row = quantiles(times)
    row.update(images_per_s=batch * len(times) / wall, cpu_cores=cores)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cps-fast bench data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=None,
                    help="default: pytorch, plus dali-cpu/dali-gpu where they run")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--images", type=int, default=None, help="images written per setting")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="workers / DALI threads")
    ap.add_argument("--root", default=None, help="folder for the images (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    positive(args, "images", "batch", "iters", "workers")
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup}: expected an integer >= 0")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backends = args.backends or (["pytorch"] + (["dali-cpu"] if dali_available() else [])
                                 + (["dali-gpu"] if cuda and dali_available() else []))
    n_img = args.images or (64 if cuda else 8)
    batch = args.batch or (8 if cuda else 2)
    iters = args.iters or (40 if cuda else 10)
    workers = args.workers or max(1, min(8, (os.cpu_count() or 2)))
    root = args.root or tempfile.mkdtemp(prefix="cps_fast_bench_data_")
    env = environment(device)
    rows = []
    for name in args.settings:
        s = SETTINGS[name]
        sub = os.path.join(root, name)
        if not setting_written(name, sub, n_img):
            t0 = time.perf_counter()
            write_setting(name, sub, n_img)
            print(f"wrote {n_img} {s['size'][1]}x{s['size'][0]} {s['format'].upper()}s ({name} layout) to {sub} "
                  f"in {time.perf_counter() - t0:.1f}s", flush=True)
        ds = D.open_dataset(name, sub)
        for be in backends:
            r = bench_one(ds, be, s["crop"], batch, iters, args.warmup, workers, device)
            r.update(env, setting=name, backend=be, crop=s["crop"], image_hw=list(s["size"]), format=s["format"],
                     batch=batch, workers=workers, n_images=n_img, cpu_count=os.cpu_count())
            rows.append(r)
            write_json(rows, args.json, "data", device)  # kept if the run is killed
            print(f"  {name:10s} {be:8s} {r['images_per_s']:8.1f} img/s  {r['cpu_cores']:.2f} cores",
                  flush=True)
    print()
    print_table(rows, [("setting", "setting", ""), ("backend", "backend", ""), ("crop", "crop", "d"),
                       ("batch", "batch", "d"), ("images_per_s", "images/s", ".1f"),
                       ("cpu_cores", "CPU cores", ".2f"), ("median_ms", "ms/batch", ".1f"),
                       ("p20_ms", "p20", ".1f"), ("p80_ms", "p80", ".1f")])
    path = write_json(rows, args.json, "data", device)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
