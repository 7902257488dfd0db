"""Benchmark of the fused n-branch CPS loss (n-CPS) against the plain PyTorch way.

Providers:
  eager    argmax pseudo labels and K + K(K-1) F.cross_entropy calls with autograd
           (ensemble: softmax means and K + K calls), under bf16 autocast on a GPU
           when the dtype is bf16
  compile  torch.compile of that same function
  triton   cps_fast.ncps_loss(backend="triton")
  triton[eN]  the same with N elements of each branch's tile per thread, forced (a sweep of
           the tile heuristic; kernels/ncps_loss.py block_sizes)
  triton[BPxW]  the same with the tile kernel's BLOCK_P and num_warps forced, e.g.
           triton[32x1] (NCPSLossConfig in kernels/ncps_loss.py, passed as kernel_config; benchmarks/NOTES.md has why)
  cpu      cps_fast.ncps_loss(backend="cpu")    (the C++ extension)
  torch    cps_fast.ncps_loss(backend="torch")  (the kernel contract in plain PyTorch)

Byte count of one call: the fused kernel reads each of the K logits tensors once
and, with gradients, writes each gradient once, plus the labels::

    bytes = K * E * itemsize * (2 forward+backward | 1 forward) + P * label_itemsize

with E = N*C*H*W elements per branch and P = N*H*W pixels; "GB/s" is that count
over the median time for every provider. Peak memory is the CUDA allocator's
peak above the inputs during the timed calls.

    python benchmarks/bench_ncps.py                          # shapes for the device at hand
    python benchmarks/bench_ncps.py --device cpu --threads 2 --json out.json
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

from cps_fast import backends  # noqa: E402
from cps_fast.ncps_loss import ncps_loss  # noqa: E402

GPU_SHAPES = {"voc": (8, 21, 512, 512), "cityscapes": (8, 19, 800, 800)}
CPU_SHAPES = {"voc-small": (4, 21, 128, 128)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def plain_way(xs, target, cps_weight=1.5, ignore_index=255, ensemble=False):
    """n-CPS the way one writes it in PyTorch: argmax labels and one cross-entropy per pair."""
    K = len(xs)
    sup = sum(F.cross_entropy(x, target, ignore_index=ignore_index) for x in xs)
    if ensemble:
        probs = [torch.softmax(x.detach().float(), dim=1) for x in xs]
        total = sum(probs)
        cps = sum(F.cross_entropy(xs[k], (total - probs[k]).argmax(1), ignore_index=ignore_index) for k in range(K))
    else:
        labels = [x.detach().argmax(dim=1) for x in xs]
        cps = sum(sum(F.cross_entropy(xs[k], labels[j], ignore_index=ignore_index) for j in range(K) if j != k)
                  for k in range(K)) / (K - 1)
    return sup + cps_weight * cps


def make_provider(name, device, dtype, ensemble):
    """A function (xs, target) -> loss for provider ``name``, or a string saying why it cannot run."""
    if name in ("eager", "compile"):
        fn = common.compiled(plain_way) if name == "compile" else plain_way
        if isinstance(fn, str):
            return fn
        fn = common.maybe_autocast(fn, device, dtype)
        return lambda xs, t: fn(xs, t.long(), ensemble=ensemble)
    forced = re.fullmatch(r"triton\[(?:e(\d+)|(\d+)x(\d+))\]", name)
    if forced:  # elements per thread, or BLOCK_P x num_warps, of the tile kernel forced
        reason = backends.why_unavailable("triton", device)
        if reason:
            return reason
        from cps_fast.kernels.ncps_loss import NCPSLossConfig

        if forced.group(1):
            config = NCPSLossConfig(elems_per_thread=int(forced.group(1)))
        else:
            config = NCPSLossConfig(block_p=int(forced.group(2)), num_warps=int(forced.group(3)))

        def fn(xs, t):
            if len(xs) == 2:
                raise ValueError(f"{name} configures the n-branch kernel, which K = 2 does not run (ncps_loss runs "
                                 "the two-branch kernel; bench_loss.py --triton-configs sweeps that one)")
            return ncps_loss(xs, t, cps_weight=1.5, ensemble=ensemble, backend="triton", kernel_config=config)
        return fn
    if name.startswith("triton["):
        return f"unknown provider {name!r}: expected triton[eN] or triton[BPxW], e.g. triton[e4] or triton[32x1]"
    # the op's own limits (no CUDA C++ kernel for K > 2, the Triton kernel's 8 slots) surface per
    # case, from ncps_loss's backend choice, as a skipped case with its reason
    reason = backends.why_unavailable(name, device)
    if reason:
        return reason
    return lambda xs, t: ncps_loss(xs, t, cps_weight=1.5, ensemble=ensemble, backend=name)


def bench_case(provider, fn, K, shape, dtype_name, layout, device, mode, reps):
    N, C, H, W = shape
    backward = mode == "fwd+bwd"
    base = common.peak_memory_reset(device)
    xs = [common.make_logits(shape, DTYPES[dtype_name], layout, device, backward) for _ in range(K)]
    t = common.make_target(N, C, H, W, device)
    inputs_mb = common.peak_memory_mb(device, base)
    base = common.peak_memory_reset(device)
    setup, step = common.loss_step(lambda: fn(xs, t), xs, backward)
    times, timing = common.measure_kernel(step, device, warmup=3, reps=reps, setup=setup, label=provider)
    peak = common.peak_memory_mb(device, base)
    E, P = xs[0].numel(), N * H * W
    nbytes = K * E * xs[0].element_size() * (2 if backward else 1) + P * t.element_size()
    return {
        "provider": provider, "K": K, "mode": mode, "shape": list(shape), "dtype": dtype_name, "layout": layout,
        **common.quantiles(times),
        "bytes": nbytes, "byte_formula": "K*E*itemsize*(2 fwd+bwd | 1 fwd) + P*1",
        "gbs": common.gbs(nbytes, times),
        "peak_mb": peak, "inputs_mb": inputs_mb,
        "timing": timing,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", default=None,
                   help="comma list of eager,compile,triton,cpu,torch (default: what runs on the device; "
                        "triton is left out on the CPU, where it only runs in the slow interpreter)")
    p.add_argument("--ks", default="2,3,4", help="comma list of branch counts")
    p.add_argument("--ensemble", action="store_true", help="ensemble labels instead of pairwise argmax labels")
    common.add_case_args(p, "ncps", shape_help="a custom N,C,H,W shape instead of --shapes",
                         shape_names=[*GPU_SHAPES, *CPU_SHAPES], dtypes="bf16", layouts="channels_last,nchw",
                         modes="fwd+bwd")
    args = p.parse_args(argv)

    device, reps, env = common.setup_run(args)
    shapes, names = common.shape_names(args, device, GPU_SHAPES, CPU_SHAPES)
    ks = common.int_list(args.ks, "--ks", form="branch counts, e.g. 2,3,4", minimum=2)
    if args.providers:
        providers = args.providers.split(",")
    else:
        providers = ["eager", "compile"] + (["triton"] if device.type == "cuda" else ["cpu"])

    copy_gbs = common.copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows = []
    for shape_name in names:
        for dtype_name in args.dtypes.split(","):
            for K in ks:
                for provider, fn in common.runnable(
                        providers, lambda p: make_provider(p, device, DTYPES[dtype_name], args.ensemble)):
                    for layout in args.layouts.split(","):
                        for mode in args.modes.split(","):
                            row = common.try_case(f"{provider} K={K} {shape_name} {dtype_name} {layout} {mode}",
                                                  bench_case, provider, fn, K, shapes[shape_name], dtype_name,
                                                  layout, device, mode, reps)
                            if row is None:
                                continue
                            row.update(env, shape_name=shape_name, ensemble=args.ensemble, copy_gbs=copy_gbs,
                                       copy_fraction=row["gbs"] / copy_gbs if copy_gbs else None)
                            rows.append(row)
                            common.write_json(rows, args.json, "ncps", device)  # kept if the run is killed
    common.add_speedup(rows, "eager", ("shape_name", "dtype", "K", "layout", "mode"), "speedup_vs_eager")
    common.report(rows, [
        ("shape_name", "shape", ""), ("dtype", "dtype", ""), ("K", "K", ""), ("layout", "layout", ""),
        ("mode", "mode", ""), ("provider", "provider", ""), ("median_ms", "median ms", ".3f"),
        ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"), ("gbs", "GB/s", ".2f"),
        ("copy_fraction", "of copy", ".2f"), ("speedup_vs_eager", "x eager", ".2f"), ("peak_mb", "peak MB", ".0f"),
    ], f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  ensemble={args.ensemble}"
       + (f"  copy {copy_gbs:.0f} GB/s" if copy_gbs else ""),
        args.json, "ncps", device)
    return rows


if __name__ == "__main__":
    main()
