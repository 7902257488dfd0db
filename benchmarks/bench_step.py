"""Benchmark of the full CPS + CutMix training step, improvement by improvement.

Variants, each adding one thing to the one before:

  reference      fp32, NCHW, eager, PyTorch DataLoader, unfused loss (argmax + 4 cross-entropies),
                 with torch's default TF32 convolutions on Ampere and newer GPUs
  (strict fp32)  the same with TF32 off, as the reference code ran on V100s (GPU only; its
                 speed-up column is not the baseline, "reference" is)
  +channels_last
  +bf16          autocast bf16 (GPU; on the CPU too when asked with --cpu-bf16)
  +fused_loss    cps_fast.cps_loss (one pass, gradients in the forward)
  +fused_upsample  cps_fast.cps_loss_upsampled on decoder-resolution logits (no full-size
                 student logits or gradients)
  +dali          DALI data pipeline (dali-gpu on a GPU, dali-cpu on the CPU)
  +cuda_graph    the whole step captured once and replayed (GPU only)

Each variant trains ``--iters`` iterations of the preset's step (VOC R50 1/8 CutMix by
default: 8 labeled + 8 unlabeled at 512^2 on a GPU; a small ResNet-18 setting on the CPU)
on synthetic JPEGs written at VOC size, data loading included, after ``--warmup``
iterations. It reports images/s, ms/iteration, peak memory, and the estimated hours of
every preset's full schedule at that step time.

    python benchmarks/bench_step.py [--device cuda] [--iters 30] [--json out.json]
    cps-fast bench step ...
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from cps_fast.config import list_presets, load_preset  # noqa: E402
from cps_fast.data import write_voc  # noqa: E402
from cps_fast.data.loaders import resolve_backend  # noqa: E402
from cps_fast.train import Trainer  # noqa: E402

# labeled images of the published partitions (VOC train_aug 10582, Cityscapes train 2975)
TRAIN_SIZES = {"voc": 10582, "cityscapes": 2975}
LABELED = {"voc": {"1/16": 662, "1/8": 1323, "1/4": 2646, "1/2": 5291},
           "cityscapes": {"1/16": 186, "1/8": 372, "1/4": 744, "1/2": 1488}}


def variants(device: torch.device, cpu_bf16: bool) -> list[tuple[str, dict]]:
    gpu = device.type == "cuda"
    dali = "dali-gpu" if gpu else "dali-cpu"
    steps = [
        ("reference", dict(amp="fp32", channels_last=False, loss_backend="reference", data_backend="pytorch",
                           cuda_graph=False, fused_upsample=False)),
        ("+channels_last", dict(channels_last=True)),
    ]
    if gpu or cpu_bf16:
        steps.append(("+bf16", dict(amp="bf16")))
    steps += [("+fused_loss", dict(loss_backend=None)), ("+fused_upsample", dict(fused_upsample=True)),
              ("+dali", dict(data_backend=dali))]
    if gpu:
        steps.append(("+cuda_graph", dict(cuda_graph=True)))
    out, acc = [], {}
    for name, change in steps:
        acc = {**acc, **change}
        out.append((name, dict(acc)))
    if gpu:
        out.insert(1, ("reference_strict_fp32", dict(out[0][1], tf32=False)))
    return out


def measure_variant(cfg, device, root: str, warmup: int, iters: int) -> dict:
    cfg = cfg.replace(data_root=root, train_labeled=None, train_unlabeled=None, val_list=None,
                      pretrained=None, max_iters=10_000, log_every=10_000, eval_every=0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, device=device.type, print_fn=lambda *a, **k: None)
        trainer.model.train()
        batches = trainer.batches()
        base = common.peak_memory_reset(device)
        trainer.run(warmup, batches=batches)  # includes the CUDA-graph capture when on
        if trainer.use_graph and trainer.graph is None:
            raise RuntimeError(f"the step was not captured in {warmup} warm-up iterations (the trainer "
                               f"captures only with more than 12 iterations left); pass --warmup 13 or more")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            trainer.run(trainer.it + 1, batches=batches)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # per-iteration timing, outside the step
            times.append((time.perf_counter() - t0) * 1e3)
        peak = common.peak_memory_mb(device, base)
    imgs = cfg.batch_size_labeled + cfg.batch_size_unlabeled * (2 if cfg.cutmix else 1)
    q = common.quantiles(times)
    return {**q, "images_per_s": imgs / (q["median_ms"] * 1e-3), "peak_mb": peak, "images_per_step": imgs}


def schedule_hours(step_ms: float) -> list[dict]:
    """Estimated hours of every paper preset's schedule at ``step_ms`` per iteration."""
    rows = []
    for name in list_presets():
        cfg = load_preset(name)
        if cfg.dataset not in LABELED or cfg.partition not in LABELED[cfg.dataset]:
            continue
        n_l = LABELED[cfg.dataset][cfg.partition]
        n_u = TRAIN_SIZES[cfg.dataset] - n_l
        iters = cfg.total_iters(n_l, n_u)
        rows.append({"preset": name, "iterations": iters, "hours": iters * step_ms / 3.6e6})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="voc_r50_1-8_cutmix")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--images", type=int, default=64, help="synthetic JPEGs written for the run")
    p.add_argument("--cpu-bf16", action="store_true", help="include the bf16 variant on the CPU")
    p.add_argument("--variants", default=None, help="comma list of variant names to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"

    from cps_fast.config import apply_overrides

    cfg = load_preset(args.preset).replace(dataset="synthetic", seed=0)
    if not gpu:  # a CPU-sized version of the same step
        cfg = cfg.replace(backbone="resnet18", deep_stem=False, head_channels=64, crop_size=96,
                          batch_size_labeled=2, batch_size_unlabeled=2, num_workers=1)
    cfg = apply_overrides(cfg, args.overrides)
    iters = args.iters or (30 if gpu else 5)
    warmup = args.warmup or (15 if gpu else 2)
    env = common.environment(device)
    path = common.result_path(args.json, "step", device)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        size = (375, 500) if cfg.crop_size <= 512 else (1024, 2048)
        write_voc(root, n_train=args.images, n_val=2, size=size if gpu else (128, 160), seed=0)
        chosen = args.variants.split(",") if args.variants else None
        dali_missing = None
        for name, change in variants(device, args.cpu_bf16):
            if change.get("data_backend", "").startswith("dali") and dali_missing is None:
                try:
                    resolve_backend(change["data_backend"])
                    dali_missing = False
                except Exception as exc:
                    dali_missing = exc
            if dali_missing and change.get("data_backend", "").startswith("dali"):
                if name == "+dali":
                    print(f"skip {name}: {dali_missing}", file=sys.stderr)
                    continue
                change = {**change, "data_backend": "pytorch"}  # later improvements still measured
            if chosen and name not in chosen:
                continue
            tf32 = change.get("tf32", True)
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            try:
                if not tf32:
                    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
                r = measure_variant(cfg.replace(**{k: v for k, v in change.items() if k != "tf32"}), device, root,
                                    warmup, iters)
            except Exception as exc:  # one failing variant must not lose the others
                print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                rows.append({**env, "variant": name, "error": f"{type(exc).__name__}: {exc}", "settings": change})
                common.write_json(rows, path, "step", device)
                continue
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
            r.update(env, variant=name, preset=args.preset, crop=cfg.crop_size, backbone=cfg.backbone,
                     batch=[cfg.batch_size_labeled, cfg.batch_size_unlabeled], settings=change)
            rows.append(r)
            common.write_json(rows, path, "step", device)  # kept if a later variant is killed
            print(f"{name:>15}: {r['median_ms']:.1f} ms/iter, {r['images_per_s']:.1f} images/s", file=sys.stderr)
    ok = [r for r in rows if "error" not in r]
    for base in ("reference_strict_fp32", "reference"):  # "reference" last: it is the baseline column
        ref = next((r for r in ok if r["variant"] == base), None)
        if ref is None:
            continue
        suffix = "_vs_strict_fp32" if base != "reference" else ""
        for r in ok:
            r["speedup" + suffix] = ref["median_ms"] / r["median_ms"]
            if ref["peak_mb"]:
                r["memory_fraction" + suffix] = r["peak_mb"] / ref["peak_mb"]
    print(f"device: {env['device']}  torch {env['torch']}  preset {args.preset} ({cfg.backbone}, crop {cfg.crop_size}, "
          f"batch {cfg.batch_size_labeled}+{cfg.batch_size_unlabeled}{' x2 CutMix' if cfg.cutmix else ''})")
    common.print_table(rows, [
        ("variant", "variant", ""), ("median_ms", "ms/iter", ".1f"), ("p20_ms", "p20", ".1f"), ("p80_ms", "p80", ".1f"),
        ("images_per_s", "images/s", ".1f"), ("speedup", "x reference", ".2f"), ("peak_mb", "peak MB", ".0f"),
        ("memory_fraction", "of ref mem", ".2f"), ("speedup_vs_strict_fp32", "x strict fp32", ".2f"),
    ])
    if ok and gpu:
        best = ok[-1]["median_ms"]
        hours = schedule_hours(best)
        print(f"\nestimated full-schedule hours on this device at {best:.1f} ms/iter "
              "(measured at the preset above; other crops scale roughly with pixels):")
        common.print_table(hours, [("preset", "preset", ""), ("iterations", "iterations", "d"), ("hours", "hours", ".2f")])
        rows.append({"variant": "schedule_hours", "step_ms": best, "presets": hours, **env})
    common.write_json(rows, path, "step", device)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
