"""Benchmark of the upsample-fused CPS loss against upsampling first and then computing the loss.

Providers (forward + backward w.r.t. the low-resolution logits unless --modes says otherwise):
  fused      cps_fast.cps_loss_upsampled (backend from --backend, default automatic:
             triton on CUDA, the C++ cpu backend when built, else torch)
  fused[P]   the cpu backend with column paths P (avx512, avx2 or scalar; the default is the
             widest the CPU has), e.g. --providers fused[avx512],fused[avx2],fused[scalar]
  fused[BHxBW:F:W:AX]
             the triton backend with its configuration forced (kernels/cps_upsample.py
             kernel_config=UpsampleConfig(...)): BH x BW low-res pixels per program, F full-res pixels per step,
             W warps, class axis AX (0: a pixel per thread, 1: lanes across classes); the GPU
             run sweeps these beside the heuristic, e.g. fused[8x8:32:8:1],fused[8x8:256:8:0]
  unfused    F.interpolate(bilinear, align_corners=True) + cps_fast.cps_loss (automatic backend)
  reference  F.interpolate + the reference CPS code's argmax and four F.cross_entropy calls
             (under autocast in the logits' dtype on a GPU, as the reference trains)

Reported: median and 20/80% quantiles of the time, the speed-up over ``unfused``, and on
CUDA the peak memory allocated during the call beyond the inputs
(torch.cuda.max_memory_allocated); on the CPU time only.

    python benchmarks/bench_upsample.py                               # shapes for the device at hand
    python benchmarks/bench_upsample.py --device cpu --threads 2
    cps-fast bench upsample ...                                       # once wired by the CLI
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_loss import reference_way  # noqa: E402

import cps_fast  # noqa: E402
from cps_fast import fused, upsample_loss  # noqa: E402

try:
    import cps_fast._C as _C  # noqa: E402
except ImportError:
    _C = None

# name -> ((N, C, h, w), (H, W))
GPU_SHAPES = {"voc": ((8, 21, 128, 128), (512, 512)), "cityscapes": ((8, 19, 200, 200), (800, 800))}
CPU_SHAPES = {"voc-small": ((2, 21, 64, 64), (256, 256))}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
CPS_WEIGHT = 1.5
# fused[BHxBW:F:W:AX]: the triton backend's configuration forced (groups: BH, BW, BLOCK_F, num_warps, AX)
FORCED_CONFIG = re.compile(r"fused\[(\d+)x(\d+):(\d+):(\d+):([01])\]")


def make_provider(name, device, dtype, size, backend):
    """A function (a, b, target) -> loss for provider ``name``, or a string saying why it cannot run."""
    up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # noqa: E731
    if name == "fused":
        try:
            chosen = fused.select_backend("cps_loss_upsampled", device.type, backend, 21, 2, "cps_loss_upsampled")
        except Exception as exc:
            return str(exc)
        fn = lambda a, b, t: upsample_loss.cps_loss_upsampled(  # noqa: E731
            a, b, t, size=size, cps_weight=CPS_WEIGHT, backend=backend, validate=False)
        fn.backend = chosen
        if chosen == "cpu" and hasattr(_C, "upsample_simd"):
            fn.backend = f"cpu[{_C.upsample_simd()}]"
        return fn
    forced = FORCED_CONFIG.fullmatch(name)
    if forced:
        if device.type != "cuda" and not cps_fast.backends.triton_interpret():
            return f"{name} is a configuration of the triton backend, which needs CUDA tensors here"
        from cps_fast.kernels.cps_upsample import UpsampleConfig

        config = UpsampleConfig(*(int(g) for g in forced.groups()))
        fn = lambda a, b, t: upsample_loss.cps_loss_upsampled(  # noqa: E731
            a, b, t, size=size, cps_weight=CPS_WEIGHT, backend="triton", validate=False, kernel_config=config)
        fn.backend = "triton"
        return fn
    if name.startswith("fused[") and name.endswith("]"):
        simd = name[len("fused["):-1]
        if device.type != "cpu":
            return f"{name} is a column path of the cpu backend; the device here is {device.type}"
        if _C is None or not hasattr(_C, "set_upsample_simd"):
            return f"{name}: the extension cps_fast._C is not built (or predates set_upsample_simd)"
        try:  # refused when the CPU lacks it; the choice is made per call and restored
            _C.set_upsample_simd(_C.set_upsample_simd(simd))
        except RuntimeError as exc:
            return str(exc)

        def fn(a, b, t):
            old = _C.set_upsample_simd(simd)
            try:  # the cpu kernel computes the gradients in the forward call
                return upsample_loss.cps_loss_upsampled(a, b, t, size=size, cps_weight=CPS_WEIGHT, backend="cpu",
                                                        validate=False)
            finally:
                _C.set_upsample_simd(old)
        fn.backend = f"cpu[{simd}]"
        return fn
    if name == "unfused":
        fn = lambda a, b, t: cps_fast.cps_loss(up(a), up(b), t, cps_weight=CPS_WEIGHT, validate=False)  # noqa: E731
        fn.backend = cps_fast.backends.select_backend(device.type, None)
        return fn
    if name == "reference":
        run = common.maybe_autocast(
            lambda a, b, t: reference_way(up(a), up(b), t.long(), cps_weight=CPS_WEIGHT), device, dtype)
        run.backend = "eager"
        return run
    return (f"unknown provider {name!r}; expected fused, fused[avx512|avx2|scalar], fused[BHxBW:F:W:AX], "
            f"unfused or reference")


def bench_case(provider, fn, shape, size, dtype_name, layout, device, mode, reps):
    (N, C, _, _), (H, W) = shape, size
    backward = mode == "fwd+bwd"
    base = common.peak_memory_reset(device)
    a, b = (common.make_logits(shape, DTYPES[dtype_name], layout, device, backward) for _ in range(2))
    t = common.make_target(N, C, H, W, device)
    inputs_mb = common.peak_memory_mb(device, base)
    setup, step = common.loss_step(lambda: fn(a, b, t), (a, b), backward)
    times = common.measure(step, device, warmup=1, reps=1, setup=setup)  # compile / first-call costs
    base = common.peak_memory_reset(device)
    times, timing = common.measure_kernel(step, device, warmup=2, reps=reps, setup=setup, label=provider)
    return {
        "provider": provider, "backend": getattr(fn, "backend", None), "mode": mode,
        "shape": list(shape), "size": [H, W], "dtype": dtype_name, "layout": layout,
        **common.quantiles(times),
        "peak_mb": common.peak_memory_mb(device, base),
        "inputs_mb": inputs_mb,
        "timing": timing,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", default="fused,unfused,reference")
    p.add_argument("--backend", default=None, help="backend of the fused provider (default: automatic)")
    common.add_case_args(p, "upsample", shape_help="a custom N,C,h,w,H,W case instead of --shapes",
                         shape_names=[*GPU_SHAPES, *CPU_SHAPES], dtypes=None, layouts="channels_last,nchw",
                         modes="fwd+bwd")
    args = p.parse_args(argv)

    device, reps, env = common.setup_run(args)
    shapes = {**GPU_SHAPES, **CPU_SHAPES}
    names = common.choices(args.shapes, "--shapes", list(shapes)) if args.shapes else \
        list(GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.shape:
        v = common.int_list(args.shape, "--shape", 6, "N,C,h,w,H,W: logits N,C,h,w upsampled to H,W")
        shapes["custom"] = (tuple(v[:4]), tuple(v[4:]))
        names = ["custom"]
    dtypes = (args.dtypes or ("bf16" if device.type == "cuda" else "fp32")).split(",")

    rows = []
    for shape_name in names:
        shape, size = shapes[shape_name]
        for dtype_name in dtypes:
            make = lambda p: make_provider(p, device, DTYPES[dtype_name], size, args.backend)  # noqa: E731
            for provider, fn in common.runnable(args.providers.split(","), make):
                for layout in args.layouts.split(","):
                    for mode in args.modes.split(","):
                        row = common.try_case(f"{provider} {shape_name} {dtype_name} {layout} {mode}", bench_case,
                                              provider, fn, shape, size, dtype_name, layout, device, mode, reps)
                        if row is None:
                            continue
                        row.update(env, shape_name=shape_name)
                        rows.append(row)
                        common.write_json(rows, args.json, "upsample", device)  # kept if the run is killed
    case = ("shape_name", "dtype", "layout", "mode")
    unfused = common.add_speedup(rows, "unfused", case, "speedup_vs_unfused")
    for r in rows:
        u = unfused.get(tuple(r[k] for k in case))
        r["memory_vs_unfused"] = (r["peak_mb"] / u["peak_mb"]) if u and r["peak_mb"] and u["peak_mb"] else None

    common.report(rows, [
        ("shape_name", "shape", ""), ("dtype", "dtype", ""), ("layout", "layout", ""), ("mode", "mode", ""),
        ("provider", "provider", ""), ("backend", "backend", ""), ("median_ms", "median ms", ".3f"),
        ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"), ("speedup_vs_unfused", "x unfused", ".2f"),
        ("peak_mb", "peak MB", ".1f"), ("memory_vs_unfused", "mem/unfused", ".2f"),
    ], f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}", args.json, "upsample", device)
    return rows


if __name__ == "__main__":
    main()
