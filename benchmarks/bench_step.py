"""Benchmark of the full CPS + CutMix training step, improvement by improvement.

Variants, each adding one thing to the one before:

  reference      fp32, NCHW, eager, PyTorch DataLoader, the reference code's unfused loss (argmax +
                 4 cross-entropies on full-resolution logits: ``step=reference``, the step
                 class of benchmarks/reference_step.py), with torch's default TF32 convolutions
                 on Ampere and newer GPUs
  (strict fp32)  the same with TF32 off, as the reference code ran on V100s (GPU only; its
                 speed-up column is not the baseline, "reference" is)
  +channels_last
  +bf16          autocast bf16 (GPU; on the CPU too when asked with --cpu-bf16)
  +fused_loss    the trainer's own step (``step=cps``) with cps_fast.cps_loss (one pass,
                 gradients in the forward)
  +fused_upsample  cps_fast.cps_loss_upsampled on decoder-resolution logits (no full-size
                 student logits or gradients)
  +dali          DALI data pipeline (dali-gpu on a GPU, dali-cpu on the CPU)
  +cuda_graph    the whole step captured once and replayed (GPU only)

A variant's settings are config keys, plus ``step`` (the loss module the trainer builds:
``cps``, or ``reference`` for the baseline) and ``tf32``. Each variant trains ``--iters`` iterations of the preset's step (VOC R50 1/8 CutMix by
default: 8 labeled + 8 unlabeled at 512^2 on a GPU; a small ResNet-18 setting on the CPU)
on synthetic images (JPEGs in the VOC layout for VOC presets; 2048x1024 PNGs in the
Cityscapes layout, label ids mapped in the pipeline, for Cityscapes ones), data loading included, after ``--warmup``
iterations. It reports images/s, ms/iteration, peak memory, and the estimated hours of
every preset's full schedule at that step time.

``--variants`` runs the variants named, in the order given (each still with the ladder's settings
up to it): ``reference,+cuda_graph,...`` measures the baseline and the headline first, so a run
cut off at its deadline loses the steps between them. The ratios to the reference and the
schedule hours (from the variant furthest up the ladder) are written after every variant.

Where the time goes (issue 6's "loss and data <= 10% of the step"), per variant:

  loss_ms   the step's own loss call (the fused op, or the reference's argmax + cross-entropies),
            forward + backward, re-run on copies of the arguments the step passed it and timed
            alone (CUDA-graph replays on a GPU); with OHEM (the Cityscapes presets) the separate
            supervised terms are not in it
  data_ms   the step's median minus its median on one batch held on the device and repeated
            (what loading, decoding, augmenting and copying the batch in adds to the step)

``--trace DIR`` then profiles a few more iterations of each variant (cps_fast.train.profiling):
a Chrome trace per variant in DIR/<variant>/, and in the row and the printed summary the host
time per phase and, on a GPU, the device-busy time, the fused loss kernels' share and the
kernels that took the most time.

    python benchmarks/bench_step.py [--device cuda] [--iters 30] [--json out.json]
    cps-fast bench step ...
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from cps_fast.config import list_presets, load_preset  # noqa: E402
from cps_fast.data import write_cityscapes, write_voc  # noqa: E402
from cps_fast.data.loaders import resolve_backend  # noqa: E402
from cps_fast.train import CPSStep, Trainer  # noqa: E402
from cps_fast.train.profiling import ProfileWindow, format_summary  # noqa: E402
from reference_step import ReferenceStep  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

STEPS = {"cps": CPSStep, "reference": ReferenceStep}  # a variant's ``step`` setting: the loss module
NOT_CONFIG = ("step", "tf32")  # the settings of a variant that are not config keys

# labeled images of the published partitions (VOC train_aug 10582, Cityscapes train 2975)
TRAIN_SIZES = {"voc": 10582, "cityscapes": 2975}
LABELED = {"voc": {"1/16": 662, "1/8": 1323, "1/4": 2646, "1/2": 5291},
           "cityscapes": {"1/16": 186, "1/8": 372, "1/4": 744, "1/2": 1488}}


def variants(device: torch.device, cpu_bf16: bool) -> list[tuple[str, dict]]:
    gpu = device.type == "cuda"
    dali = "dali-gpu" if gpu else "dali-cpu"
    steps = [
        ("reference", dict(step="reference", amp="fp32", channels_last=False, data_backend="pytorch",
                           cuda_graph=False, fused_upsample=False)),
        ("+channels_last", dict(channels_last=True)),
    ]
    if gpu or cpu_bf16:
        steps.append(("+bf16", dict(amp="bf16")))
    steps += [("+fused_loss", dict(step="cps")), ("+fused_upsample", dict(fused_upsample=True)),
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


def run_order(ladder: list[tuple[str, dict]], chosen: str | None, device: torch.device) -> list[tuple[int, str, dict]]:
    """``(ladder index, name, settings)`` of the variants to run, in the order ``chosen`` names them
    (a comma list; None: the whole ladder). A name that is a variant elsewhere (``+cuda_graph`` on
    the CPU, ``+bf16`` without --cpu-bf16) is left out, saying so; any other name is an error."""
    index = {name: i for i, (name, _) in enumerate(ladder)}
    if chosen is None:
        return [(i, name, change) for i, (name, change) in enumerate(ladder)]
    known = [name for name, _ in variants(torch.device("cuda"), True)]
    out = []
    for name in (n.strip() for n in chosen.split(",")):
        if name in index:
            if any(n == name for _, n, _ in out):
                raise common.ConfigError(f"bench step: --variants names {name!r} twice")
            out.append((index[name], name, ladder[index[name]][1]))
        elif name in known:
            print(f"skip {name}: not a variant on {device.type} (these are: {', '.join(index)})", file=sys.stderr)
        else:
            raise common.ConfigError(f"bench step: --variants {name!r}: expected some of {', '.join(known)}")
    return out


def with_ratios(rows: list[dict], env: dict, preset: str, gpu: bool) -> list[dict]:
    """``rows`` (measured so far, in the order run) with their ratios to the baselines, and on a GPU
    the schedule-hours row last, at the median of the variant furthest up the ladder."""
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
    if not (ok and gpu):
        return list(rows)
    engine = max(ok, key=lambda r: r["ladder_index"])
    return [*rows, {"variant": "schedule_hours", "preset": preset, "step_ms": engine["median_ms"],
                    "from_variant": engine["variant"], "presets": schedule_hours(engine["median_ms"]), **env}]


class LossProbe:
    """Records the first call of the step's loss methods (``CPSStep._cross``, or
    ``ReferenceStep._reference_loss`` for the reference variant) and re-times that call alone,
    forward + backward, on copies of its arguments: the loss's share of the step, whichever
    backend and path the step took."""

    METHODS = ("_cross", "_reference_loss")

    def __init__(self, step_module):
        self.call = None  # (method, args, kwargs), detached copies
        for name in self.METHODS:
            if hasattr(step_module, name):
                setattr(step_module, name, self._wrap(getattr(step_module, name)))

    @staticmethod
    def _saved(x) -> bool:
        """A tensor argument as recorded: ``(host copy, device, strides)``."""
        return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], torch.Tensor)

    def _wrap(self, method):
        def recorded(*args, **kwargs):
            if self.call is None:  # host copies (first, eager call): they stay out of the peak memory
                copy = (lambda t: (t.detach().to("cpu", copy=True), t.device, t.stride())
                        if isinstance(t, torch.Tensor) else t)
                self.call = (method, tree_map(copy, args), tree_map(copy, kwargs))
            return method(*args, **kwargs)
        return recorded

    def time_ms(self, device: torch.device, reps: int) -> tuple[float | None, str]:
        """``(median ms, timing)`` of the recorded call with its backward, or ``(None, why)``."""
        if self.call is None:
            return None, "the step made no loss call"
        method, args, kwargs = self.call
        leaves = []

        def leaf(x):
            if not self._saved(x):
                return x
            host, dev, stride = x
            t = torch.empty_strided(host.shape, stride, dtype=host.dtype, device=dev).copy_(host)
            if t.is_floating_point():
                t.requires_grad_()
                leaves.append(t)
            return t

        args, kwargs = (tree_map(leaf, tree, is_leaf=self._saved) for tree in (args, kwargs))

        def loss():
            out = method(*args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        setup, step = common.loss_step(loss, leaves, backward=True)
        times, timing = common.measure_kernel(step, device, reps=reps, setup=setup, label="step loss")
        return statistics.median(times), timing


def _time_iters(trainer, batches, iters: int, device: torch.device) -> list[float]:
    """Wall-clock ms of ``iters`` single iterations (synchronised after each on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        trainer.run(trainer.it + 1, batches=batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # per-iteration timing, outside the step
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _profile(trainer, batches, device, out_dir: Path, iters: int) -> dict:
    """``iters`` more iterations under torch.profiler (after the timed ones, which it would slow):
    the trace, operator table and summary go to ``out_dir``; the row keeps the summary."""
    window = ProfileWindow(out_dir, iters=iters, start=0, device=device, print_fn=lambda *a, **k: None)
    window.before(0)
    for _ in range(iters):
        trainer.run(trainer.it + 1, batches=batches)
        window.after(1)
    s = window.close()
    print(format_summary(s), file=sys.stderr)
    keep = ("wall_ms", "phases_ms", "trace")
    out = {k: s[k] for k in keep if k in s}
    out["host_ops"] = s.get("host_ops", [])[:10]
    if s.get("gpu"):
        out["gpu"] = {**s["gpu"], "top": s["gpu"]["top"][:10]}
    return out


def measure_variant(cfg, device, root: str, warmup: int, iters: int, breakdown: bool = True,
                    trace_dir: Path | None = None, trace_iters: int = 3, publish=None, step: str = "cps") -> dict:
    """The variant's row. ``step``: the loss module (a key of ``STEPS``). ``publish(row)``, if
    given, is called with it before any profiling, so the measured numbers are saved even if the
    profiler takes the process down; the profile summary is then added to the same dict."""
    cfg = cfg.replace(data_root=root, train_labeled=None, train_unlabeled=None, val_list=None,
                      pretrained=None, max_iters=10_000, log_every=10_000, eval_every=0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, device=device.type, print_fn=lambda *a, **k: None, step_class=STEPS[step])
        trainer.model.train()
        probe = LossProbe(trainer.step_module) if breakdown else None
        batches = trainer.batches()
        base = common.peak_memory_reset(device)
        trainer.run(warmup, batches=batches)  # includes the CUDA-graph capture when on
        if trainer.use_graph and trainer.graph is None:
            raise RuntimeError(f"the step was not captured in {warmup} warm-up iterations (the trainer "
                               f"captures only with more than 12 iterations left); pass --warmup 13 or more")
        times = _time_iters(trainer, batches, iters, device)
        peak = common.peak_memory_mb(device, base)
        imgs = cfg.batch_size_labeled + cfg.batch_size_unlabeled * (2 if cfg.cutmix else 1)
        q = common.quantiles(times)
        row = {**q, "images_per_s": imgs / (q["median_ms"] * 1e-3), "peak_mb": peak, "images_per_step": imgs}
        if breakdown:
            # one batch, already on the device, repeated: the step without its data pipeline
            held = [None if t is None else trainer._to_device(t).clone() for t in next(batches)]
            fixed_ms = statistics.median(_time_iters(trainer, itertools.repeat(held), max(3, iters // 2), device))
            loss_ms, loss_timing = probe.time_ms(device, reps=10 if device.type == "cuda" else 3)
            step_ms = q["median_ms"]
            row.update(step_fixed_batch_ms=fixed_ms, data_ms=max(0.0, step_ms - fixed_ms),
                       data_fraction=max(0.0, step_ms - fixed_ms) / step_ms, loss_ms=loss_ms,
                       loss_fraction=None if loss_ms is None else loss_ms / step_ms, loss_timing=loss_timing,
                       loss_call=probe.call[0].__name__ if probe.call else None)
            row["loss_data_fraction"] = None if loss_ms is None else row["data_fraction"] + row["loss_fraction"]
        if publish is not None:
            publish(row)
        if trace_dir is not None:
            try:
                row["profile"] = _profile(trainer, batches, device, trace_dir, trace_iters)
            except Exception as exc:  # the measured row stands
                print(f"profiling failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                row["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    return row


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
    p.add_argument("--images", type=int, default=64, help="synthetic images written for the run")
    p.add_argument("--cpu-bf16", action="store_true", help="include the bf16 variant on the CPU")
    p.add_argument("--variants", default=None, help="comma list of variant names to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-breakdown", action="store_true", help="skip the loss and data shares (faster)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="after timing, profile --trace-iters more iterations of each variant with torch.profiler: "
                        "DIR/<variant>/ gets the trace, the operator table and the summary (also in the JSON row)")
    p.add_argument("--trace-iters", type=int, default=3)
    p.add_argument("--trace-variants", default=None, help="comma list: trace only these variants")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    common.positive(args, "iters", "images", "trace_iters")
    if args.warmup is not None and args.warmup < 0:
        raise common.ConfigError(f"--warmup {args.warmup}: expected an integer >= 0")
    device = torch.device(args.device)
    gpu = device.type == "cuda"

    from cps_fast.config import apply_overrides

    preset = load_preset(args.preset)
    cityscapes = preset.dataset == "cityscapes"
    # VOC presets train on synthetic JPEGs in the VOC layout; Cityscapes presets on synthetic
    # PNGs in the Cityscapes layout (CPU-decoded PNGs and the label-id mapping, as the real data)
    cfg = preset.replace(dataset="cityscapes" if cityscapes else "synthetic", seed=0)
    if not gpu:  # a CPU-sized version of the same step
        cfg = cfg.replace(backbone="resnet18", deep_stem=False, head_channels=64, crop_size=96,
                          batch_size_labeled=2, batch_size_unlabeled=2, num_workers=1)
    cfg = apply_overrides(cfg, args.overrides)
    iters = args.iters or (30 if gpu else 5)
    warmup = args.warmup or (15 if gpu else 2)
    env = common.environment(device)
    path = common.result_path(args.json, "step", device)
    order = run_order(variants(device, args.cpu_bf16), args.variants, device)
    # the preset's full-schedule iterations, in every row: targets.py estimates the hours from the
    # best row's median when a run stopped before its schedule row was written
    iterations = next((r["iterations"] for r in schedule_hours(0.0) if r["preset"] == args.preset), None)
    rows = []

    def save():
        common.write_json(with_ratios(rows, env, args.preset, gpu), path, "step", device)

    with tempfile.TemporaryDirectory() as root:
        if cityscapes:
            write_cityscapes(root, n_train=args.images, n_val=2, size=(1024, 2048) if gpu else (128, 256), seed=0,
                             unique=min(args.images, 4))
        else:
            size = (375, 500) if cfg.crop_size <= 512 else (1024, 2048)
            write_voc(root, n_train=args.images, n_val=2, size=size if gpu else (128, 160), seed=0)
        dali = next((c["data_backend"] for _, _, c in order if c.get("data_backend", "").startswith("dali")), None)
        dali_missing = None
        if dali is not None:
            try:
                resolve_backend(dali)
            except Exception as exc:
                dali_missing = exc
        for ladder_index, name, change in order:
            if dali_missing and change.get("data_backend", "").startswith("dali"):
                if name == "+dali":
                    print(f"skip {name}: {dali_missing}", file=sys.stderr)
                    continue
                change = {**change, "data_backend": "pytorch"}  # later improvements still measured
            tf32 = change.get("tf32", True)
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            n_rows = len(rows)
            try:
                if not tf32:
                    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
                traced = args.trace and (not args.trace_variants or name in args.trace_variants.split(","))
                meta = dict(variant=name, ladder_index=ladder_index, preset=args.preset, dataset=cfg.dataset,
                            crop=cfg.crop_size, backbone=cfg.backbone,
                            batch=[cfg.batch_size_labeled, cfg.batch_size_unlabeled],
                            schedule_iterations=iterations, settings=change)

                def publish(r, meta=meta):
                    r.update(env, **meta)
                    rows.append(r)
                    save()  # kept, with the ratios and the schedule so far, if a later variant is killed
                    print(f"{r['variant']:>15}: {r['median_ms']:.1f} ms/iter, {r['images_per_s']:.1f} images/s",
                          file=sys.stderr)

                measure_variant(cfg.replace(**{k: v for k, v in change.items() if k not in NOT_CONFIG}), device,
                                root, warmup, iters, breakdown=not args.no_breakdown,
                                trace_dir=Path(args.trace) / name if traced else None,
                                trace_iters=args.trace_iters, publish=publish, step=change.get("step", "cps"))
                save()  # with the profile, if any
            except Exception as exc:  # one failing variant must not lose the others
                print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                if len(rows) == n_rows:  # not published yet
                    rows.append({**env, "variant": name, "ladder_index": ladder_index,
                                 "error": f"{type(exc).__name__}: {exc}", "settings": change})
                save()
                continue
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    rows = with_ratios(rows, env, args.preset, gpu)
    measured = [r for r in rows if r["variant"] != "schedule_hours"]
    print(f"device: {env['device']}  torch {env['torch']}  preset {args.preset} ({cfg.backbone}, crop {cfg.crop_size}, "
          f"batch {cfg.batch_size_labeled}+{cfg.batch_size_unlabeled}{' x2 CutMix' if cfg.cutmix else ''})")
    common.print_table(sorted(measured, key=lambda r: r["ladder_index"]), [  # read up the ladder
        ("variant", "variant", ""), ("median_ms", "ms/iter", ".1f"), ("p20_ms", "p20", ".1f"), ("p80_ms", "p80", ".1f"),
        ("images_per_s", "images/s", ".1f"), ("speedup", "x reference", ".2f"), ("peak_mb", "peak MB", ".0f"),
        ("memory_fraction", "of ref mem", ".2f"), ("loss_ms", "loss ms", ".1f"), ("data_ms", "data ms", ".1f"),
        ("loss_data_fraction", "loss+data", ".2f"), ("speedup_vs_strict_fp32", "x strict fp32", ".2f"),
    ])
    sched = next((r for r in rows if r["variant"] == "schedule_hours"), None)
    if sched is not None:
        print(f"\nestimated full-schedule hours on this device at {sched['step_ms']:.1f} ms/iter "
              f"({sched['from_variant']}, measured at the preset above; other crops scale roughly with pixels):")
        common.print_table(sched["presets"], [("preset", "preset", ""), ("iterations", "iterations", "d"),
                                              ("hours", "hours", ".2f")])
    common.write_json(rows, path, "step", device)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
