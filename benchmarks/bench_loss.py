"""Benchmark of the fused CPS loss against the reference code's way of computing it.

Providers:
  eager    argmax + four F.cross_entropy calls and autograd, as the reference CPS code
           (under bf16 autocast on a GPU when the dtype is bf16)
  compile  torch.compile of that same function
  triton   cps_fast.cps_loss(backend="triton")
  triton[64x8], triton[flat], triton[flat32x4]
           the same with a forced tile configuration (BLOCK_P x num_warps) and/or the flat
           channels_last kernel (--triton-configs)
  cuda     cps_fast.cps_loss(backend="cuda")   (the CUDA C++ extension)
  cpu      cps_fast.cps_loss(backend="cpu")    (the C++ extension)

Byte count of one call: the fused kernel reads each logits tensor once and, with
gradients, writes each gradient once, plus the labels::

    bytes = E * itemsize * (2 forward | 4 forward+backward) + P * label_itemsize

with E = N*C*H*W elements per logits tensor and P = N*H*W pixels; "GB/s" is that
count over the median time for every provider (for eager it is the bytes an
ideal kernel moves, not what eager moves). On a GPU the fraction of a
device-to-device copy measured in the same run is reported too. On a GPU each call is
timed by replaying a CUDA graph of it (the GPU's time, as in the trainer's captured step;
column "timing"), falling back to CUDA events around eager calls when capture fails.

Providers are the outer loop, in the order given, except ``compile``, which always runs last:
its builds take the longest (one per case), so a run stopped at its deadline (run_gpu.sh's loss
step) has every other provider's rows, on every shape, and loses only some of torch.compile's.

    python benchmarks/bench_loss.py                  # shapes for the device at hand
    python benchmarks/bench_loss.py --device cpu --threads 2 --json out.json
    cps-fast bench loss ...                          # the same
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import cps_fast  # noqa: E402
from cps_fast import backends  # noqa: E402

GPU_SHAPES = {"voc": (8, 21, 512, 512), "cityscapes": (8, 19, 800, 800)}
CPU_SHAPES = {"voc-small": (4, 21, 256, 256)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def reference_way(a, b, target, cps_weight=1.5, ignore_index=255):
    """The reference CPS code's loss: argmax pseudo labels and four cross-entropies."""
    pa = a.detach().argmax(dim=1)
    pb = b.detach().argmax(dim=1)
    sup = F.cross_entropy(a, target, ignore_index=ignore_index) + F.cross_entropy(b, target, ignore_index=ignore_index)
    cps = F.cross_entropy(a, pb, ignore_index=ignore_index) + F.cross_entropy(b, pa, ignore_index=ignore_index)
    return sup + cps_weight * cps


def make_provider(name, device, dtype):
    """A function (a, b, target) -> loss for provider ``name``, or a string saying why it cannot run."""
    if name in ("eager", "compile"):
        fn = common.compiled(reference_way) if name == "compile" else reference_way
        if isinstance(fn, str):
            return fn
        fn = common.maybe_autocast(fn, device, dtype)
        return lambda a, b, t: fn(a, b, t.long())
    if name.startswith("triton["):  # a forced variant: "triton[BPxW]", "triton[flat]", "triton[flatBPxW]"
        spec = name[len("triton["):-1]
        flat = spec.startswith("flat")
        spec = spec[len("flat"):] if flat else spec
        reason = backends.why_unavailable("triton", device)
        if reason:
            return reason
        from cps_fast.kernels.cps_loss import CPSLossConfig

        block_p, num_warps = (int(v) for v in spec.split("x")) if spec else (0, 0)
        config = CPSLossConfig(block_p, num_warps, flat)
        return lambda a, b, t: cps_fast.cps_loss(a, b, t, cps_weight=1.5, backend="triton", kernel_config=config)
    reason = backends.why_unavailable(name, device)
    if reason:
        return reason
    return lambda a, b, t: cps_fast.cps_loss(a, b, t, cps_weight=1.5, backend=name)


def config_provider(config: str) -> str:
    """The provider name of one ``--triton-configs`` entry: "64:8", "flat" or "flat:64:8"."""
    parts = config.split(":")
    flat = parts[0] == "flat"
    dims = parts[1:] if flat else parts
    if len(dims) not in ((0, 2) if flat else (2,)) or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise common.ConfigError(f"bench loss: --triton-configs entry {config!r}: expected BLOCK_P:num_warps "
                                 "(e.g. 64:8), flat, or flat:BLOCK_P:num_warps")
    return "triton[" + ("flat" if flat else "") + ("x".join(dims)) + "]"


def run_order(providers: list[str]) -> list[str]:
    """The providers in the order they run: as given, ``compile`` moved last."""
    return [p for p in providers if p != "compile"] + [p for p in providers if p == "compile"]


def cases(providers, names, dtypes, layouts, modes):
    """``(provider, shape name, dtype, layout, mode)`` in the order measured: provider outermost
    (:func:`run_order`), then dtype, shape, layout, mode; the flat kernels serve channels_last only."""
    for provider in run_order(providers):
        for dtype_name in dtypes:
            for shape_name in names:
                for layout in layouts:
                    if provider.startswith("triton[flat") and layout != "channels_last":
                        continue  # elsewhere it is plain "triton"
                    for mode in modes:
                        yield provider, shape_name, dtype_name, layout, mode


def bench_case(provider, fn, shape, dtype_name, layout, device, mode, reps):
    N, C, H, W = shape
    backward = mode == "fwd+bwd"
    base = common.peak_memory_reset(device)
    a, b = (common.make_logits(shape, DTYPES[dtype_name], layout, device, backward) for _ in range(2))
    t = common.make_target(N, C, H, W, device)
    inputs_mb = common.peak_memory_mb(device, base)
    base = common.peak_memory_reset(device)
    setup, step = common.loss_step(lambda: fn(a, b, t), (a, b), backward)
    times, timing = common.measure_kernel(step, device, reps=reps, setup=setup,
                                          label=f"{provider} {layout} {dtype_name} {mode}")
    peak = common.peak_memory_mb(device, base)
    E, P = a.numel(), N * H * W
    nbytes = E * a.element_size() * (4 if backward else 2) + P * t.element_size()
    row = {
        "provider": provider, "mode": mode, "shape": list(shape), "dtype": dtype_name, "layout": layout,
        **common.quantiles(times),
        "bytes": nbytes,
        "byte_formula": "E*itemsize*(4 fwd+bwd | 2 fwd) + P*1",
        "gbs": common.gbs(nbytes, times),
        "peak_mb": peak,
        "inputs_mb": inputs_mb,
        "timing": timing,
    }
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", default=None,
                   help="comma list of eager,compile,triton,cuda,cpu, run in this order with compile last "
                        "(default: what runs on the device, the fused ones first; triton is left out on the "
                        "CPU, where it only runs in the slow interpreter)")
    common.add_case_args(p, "loss", shape_help="a custom N,C,H,W shape instead of --shapes",
                         shape_names=[*GPU_SHAPES, *CPU_SHAPES], dtypes="bf16,fp32", layouts="nchw,channels_last",
                         modes="fwd+bwd,fwd")
    p.add_argument("--triton-configs", default=None,
                   help="also time the triton tile kernel with these BLOCK_P:num_warps configurations, e.g. "
                        "64:8,32:1 (rows 'triton[BPxW]'; the default heuristic stays 'triton'); 'flat' or "
                        "'flat:BP:W' times the flat channels_last kernel (CPSLossConfig(flat=True) in kernels/cps_loss.py; rows "
                        "'triton[flat]', 'triton[flatBPxW]', channels_last only)")
    args = p.parse_args(argv)

    device, reps, env = common.setup_run(args)
    shapes, names = common.shape_names(args, device, GPU_SHAPES, CPU_SHAPES)
    if args.providers:
        providers = args.providers.split(",")
    else:
        providers = [b for b in ("triton", "cuda", "cpu") if not (b == "triton" and device.type == "cpu")]
        providers += ["eager", "compile"]
    copy_gbs = common.copy_bandwidth_gbs(device) if device.type == "cuda" else None

    providers += [config_provider(c) for c in args.triton_configs.split(",")] if args.triton_configs else []

    path = common.result_path(args.json, "loss", device)
    rows = []
    dtypes, layouts, modes = args.dtypes.split(","), args.layouts.split(","), args.modes.split(",")
    made = {}  # (provider, dtype): its function, or None once it was said why it cannot run
    for provider, shape_name, dtype_name, layout, mode in cases(providers, names, dtypes, layouts, modes):
        if (provider, dtype_name) not in made:
            fn = make_provider(provider, device, DTYPES[dtype_name])
            if isinstance(fn, str):
                print(f"skip {provider}: {fn}", file=sys.stderr)
                fn = None
            made[provider, dtype_name] = fn
        fn = made[provider, dtype_name]
        if fn is None:
            continue
        row = common.try_case(f"{provider} {shape_name} {dtype_name} {layout} {mode}", bench_case,
                              provider, fn, shapes[shape_name], dtype_name, layout, device, mode, reps)
        if row is None:
            continue
        row.update(env, shape_name=shape_name, copy_gbs=copy_gbs)
        row["copy_fraction"] = row["gbs"] / copy_gbs if copy_gbs else None
        rows.append(row)
        common.add_speedup(rows, "eager", ("shape_name", "dtype", "layout", "mode"), "speedup_vs_eager")
        common.write_json(rows, path, "loss", device)  # kept, in the order measured, if the run is killed
    order = run_order(providers)
    by_case = sorted(rows, key=lambda r: (dtypes.index(r["dtype"]), names.index(r["shape_name"]),
                                          layouts.index(r["layout"]), modes.index(r["mode"]), order.index(r["provider"])))
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}"
          + (f"  copy {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    common.print_table(by_case, [  # case by case, the providers side by side
        ("shape_name", "shape", ""), ("dtype", "dtype", ""), ("layout", "layout", ""), ("mode", "mode", ""),
        ("provider", "provider", ""), ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"),
        ("p80_ms", "p80", ".3f"), ("gbs", "GB/s", ".1f"), ("copy_fraction", "of copy", ".2f"),
        ("speedup_vs_eager", "x eager", ".2f"), ("peak_mb", "peak MB", ".0f"),
    ])
    print(f"wrote {len(rows)} rows to {common.write_json(rows, path, 'loss', device)}")
    return rows


if __name__ == "__main__":
    main()
