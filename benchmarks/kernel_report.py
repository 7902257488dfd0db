"""Compile the Triton kernels for an H100 (sm_90a) on any machine and report their resources.

No GPU is needed: each launcher runs on ``meta`` tensors of a real training shape,
its kernel launch is intercepted, and the kernel is compiled ahead of time for
``GPUTarget("cuda", 90, 32)`` with the specialisation Triton's JIT would apply to
those arguments (integers equal to 1 become constants, integers and pointers
divisible by 16 are marked so). ``cuobjdump`` (shipped with Triton) reads the
registers, spill stack and shared memory of the cubin, and the PTX shows the
width of the global loads and stores (each width with its count of instructions: the
logits tiles, the labels and the scalars show up as separate entries) and the number of
CTA barriers (each a shared-memory round trip that all the program's warps wait for). The SASS
gives the instruction count of the kernel's main loop, and for the upsample-fused kernel the
warp-instructions it issues per full-resolution pixel (that kernel is issue-bound).

Why: a kernel that compiles in the interpreter can still fail to compile for the
GPU, and registers, spills and load widths decide a memory-bound kernel's speed.
CI checks them here (tests/test_kernel_report.py); the GPU run measures time.

Every row carries ``sources``, a digest of all the rows depend on (:func:`sources_key`). With
``--reuse PATH``, a report whose rows all carry this checkout's digest is taken as it is, after one
launch of each kernel has been compiled again and found equal to its row; any other report is
compiled anew. CI reuses the committed report (about 50 compiles, two minutes on two cores,
otherwise), so a change to a kernel or to Triton still compiles everything.

    python benchmarks/kernel_report.py [--json PATH] [--reuse PATH]     (with TRITON_INTERPRET unset)
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_report: unset TRITON_INTERPRET; this compiles the kernels for a GPU, not the interpreter")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}


@dataclass
class Launch:
    """One intercepted kernel launch: the jit function, its arguments and options."""

    fn: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``rec[grid](*args, **kw)`` records the call."""

    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.fn, args, kwargs))
        return launch


def intercept(module, names: list[str], launcher, *args, **kwargs) -> list[Launch]:
    """Run ``launcher(*args, **kwargs)`` with the kernels ``module.<names>`` recorded instead of run."""
    sink: list[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], sink))
        launcher(*args, **kwargs)
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)
    return sink


def _signature(launch: Launch):
    """Triton signature, constexprs and attributes for the launch, as the JIT specialises them."""
    fn = launch.fn
    names = fn.arg_names
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in names})
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        is_constexpr = i in fn.constexprs if hasattr(fn, "constexprs") else False
        if is_constexpr:
            sig[name] = "constexpr"
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            unspecialised = name in fn.do_not_specialize or i in fn.do_not_specialize
            if v == 1 and not unspecialised:
                sig[name] = "constexpr"
                consts[(i,)] = 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0 and not unspecialised:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"kernel_report: argument {name} of {fn.__name__} has type {type(v).__name__}")
    return sig, consts, attrs


def _cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def compile_launch(launch: Launch) -> dict:
    """Compile one launch for sm_90a; registers, spill stack, shared memory and access widths."""
    sig, consts, attrs = _signature(launch)
    options = {"num_warps": launch.kwargs.get("num_warps", 4)}
    if "num_stages" in launch.kwargs:
        options["num_stages"] = launch.kwargs["num_stages"]
    kernel = triton.compile(ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=TARGET, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    ptx = kernel.asm["ptx"]

    def widest(op: str) -> int:
        """Widest global access of ``op`` in bits (vector count x element bits)."""
        best = 0
        for vec, bits in re.findall(rf"{op}\.global(?:\.[a-z]+\d*)*?\.(?:v(\d)\.)?[bsuf](\d+)", ptx):
            best = max(best, int(vec or 1) * int(bits))
        return best

    def histogram(op: str) -> str:
        """Global accesses of ``op`` by width, widest first: "128x2 32x3" (bits x instructions in the PTX)."""
        counts: dict[int, int] = {}
        for vec, bits in re.findall(rf"{op}\.global(?:\.[a-z]+\d*)*?\.(?:v(\d)\.)?[bsuf](\d+)", ptx):
            w = int(vec or 1) * int(bits)
            counts[w] = counts.get(w, 0) + 1
        return " ".join(f"{w}x{n}" for w, n in sorted(counts.items(), reverse=True))

    shared = usage.get("shared", 0) + int(getattr(kernel.metadata, "shared", 0) or 0)  # static + dynamic
    loop = loop_instructions(sass)
    consts = {n: v for n, v in zip(launch.fn.arg_names, launch.args) if sig.get(n) == "constexpr"} \
        | {k: v for k, v in launch.kwargs.items() if k in launch.fn.arg_names}
    return {"regs": usage.get("reg"), "stack_bytes": usage.get("stack"), "shared_bytes": shared,
            "widest_load_bits": widest("ld"), "widest_store_bits": widest("st"),
            "loads": histogram("ld"), "stores": histogram("st"),
            # CTA barriers in the PTX: shared-memory round trips (cross-warp reductions, gathers, layout moves)
            "barriers": len(re.findall(r"\bbar(?:rier)?\.sync", ptx)),
            "num_warps": options["num_warps"],
            # SASS instructions in the kernel's largest loop, as each warp issues them; per pixel for the
            # upsample-fused kernel, whose loop steps BLOCK_F full-resolution pixels with every warp
            "loop_instructions": loop,
            "loop_instructions_per_pixel": (round(loop * options["num_warps"] / consts["BLOCK_F"], 1)
                                            if loop and "BLOCK_F" in consts else None),
            "constexprs": consts}


def loop_instructions(sass: str) -> int:
    """Instructions in the body of the largest loop of a kernel's SASS (the backward branch that spans
    the most), 0 when it has none. Issue-bound kernels spend their time there."""
    ins = [int(a, 16) for a in re.findall(r"^\s*/\*([0-9a-f]{4,})\*/\s+\S", sass, re.M)]
    best = 0
    for addr, target in re.findall(r"^\s*/\*([0-9a-f]{4,})\*/[^;\n]*\bBRA\b[^;\n]*?0x([0-9a-f]+)", sass, re.M):
        a, t = int(addr, 16), int(target, 16)
        if t < a:
            best = max(best, sum(1 for x in ins if t <= x <= a))
    return best


def sources_key() -> str:
    """Digest of everything a row depends on: the kernel sources (the package's files and the one
    cps_fast module they import), this script, the versions of Triton (its LLVM, ptxas and cuobjdump
    come in its wheel) and torch, and whether Triton fuses multiply-adds by default."""
    import cps_fast.backends
    import cps_fast.kernels

    files = sorted(Path(cps_fast.kernels.__file__).parent.glob("*.py"))
    files += [Path(cps_fast.backends.__file__), Path(__file__)]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    lang = getattr(getattr(triton, "knobs", None), "language", None)
    fp_fusion = (not lang.force_disable_fp_fusion and lang.default_fp_fusion) if lang is not None else \
        os.environ.get("TRITON_DEFAULT_FP_FUSION", "1") not in ("0", "false", "False")
    digest.update(f"triton {triton.__version__} torch {torch.__version__} fp_fusion {bool(fp_fusion)}".encode())
    return digest.hexdigest()[:16]


def reusable(path: Path, planned: list[dict], key: str) -> list[dict] | None:
    """The rows of the report at ``path`` if they are the ones a fresh compile of ``planned`` would give
    (the same launches, each row carrying ``key``); None, with the reason printed, otherwise."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"kernel_report: not reusing {path}: {e}")
        return None
    if not isinstance(rows, list) or len(rows) != len(planned):
        print(f"kernel_report: not reusing {path}: {len(rows) if isinstance(rows, list) else 'no'} rows, "
              f"{len(planned)} launches to report")
        return None
    stale = sum(1 for r in rows if not isinstance(r, dict) or r.get("sources") != key)
    if stale:
        print(f"kernel_report: not reusing {path}: {stale} of its {len(rows)} rows were compiled from other "
              f"sources or another Triton (this checkout's key: {key}); compiling every launch")
        return None
    for i, (r, meta) in enumerate(zip(rows, planned)):
        if any(r.get(k) != v for k, v in meta.items()):
            print(f"kernel_report: not reusing {path}: its row {i} is not launch {i} ({_describe(meta)})")
            return None
    return rows


def _describe(row: dict) -> str:
    return " ".join(str(row[k]) for k in ("op", "shape_name", "dtype", "layout", "K", "kernel") if row.get(k) is not None)


# ----------------------------------------------------------------------------- the kernels


def cps_loss_cases(tile: tuple[int, int] | None = None):
    """(name, launches) for the fused CPS loss at the training shapes, both layouts, bf16 and fp32;
    ``tile``: (BLOCK_P, num_warps) forced on the tile kernels."""
    from cps_fast.kernels import cps_loss as K

    cases = []
    for shape_name, (N, C, H, W) in (("voc", (8, 21, 512, 512)), ("cityscapes", (8, 19, 800, 800)),
                                     ("ade", (8, 150, 512, 512)), ("c300", (2, 300, 128, 128))):
        for dtype in (torch.bfloat16, torch.float32):
            for layout in ("nchw", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                a = torch.empty(N, C, H, W, device="meta", dtype=dtype).contiguous(memory_format=fmt)
                t = torch.empty(N, H * W, device="meta", dtype=torch.uint8)
                counts = torch.empty(3, device="meta")
                a3 = a.flatten(2)
                # channels_last also through the flat kernel (CPSLossConfig(flat=True)), which the GPU run compares
                for flat in (False, True) if layout == "channels_last" and C <= K.MAX_TILE_C else (False,):
                    config = K.CPSLossConfig(*(tile or (0, 0)), flat)
                    launches = intercept(K, ["_cps_loss_tile_kernel", "_cps_loss_loop_kernel", "_cps_loss_flat_kernel"],
                                         functools.partial(K.cps_loss_fwd, config=config),
                                         a3, a3, t, None, None, counts, a3, a3, 1.5, 255)
                    cases.append((dict(op="cps_loss", shape_name=shape_name, shape=[N, C, H, W],
                                       dtype=_TRITON_TYPES[dtype], layout=layout), launches))
    return cases


def ncps_loss_cases(tile: tuple[int, int] | None = None):
    """(name, launches) for the n-CPS loss: K = 2, 3, 4, 8 with and without ensemble labels, bf16."""
    from cps_fast.kernels import ncps_loss as NK

    cases = []
    for shape_name, (N, C, H, W), ks in (("voc", (8, 21, 512, 512), (2, 3, 4, 8)), ("c300", (2, 300, 128, 128), (3,))):
        for K in ks:
            for ensemble in (False, True) if shape_name == "voc" else (False,):
                for layout in ("nchw", "channels_last"):
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    xs = [torch.empty(N, C, H, W, device="meta", dtype=torch.bfloat16).contiguous(memory_format=fmt)
                          .flatten(2) for _ in range(K)]
                    t = torch.empty(N, H * W, device="meta", dtype=torch.uint8)
                    config = NK.NCPSLossConfig(*tile) if tile else None
                    launches = intercept(NK, ["_ncps_tile_kernel", "_ncps_loop_kernel"],
                                         functools.partial(NK.ncps_loss_fwd, config=config),
                                         xs, t, [None] * K, torch.empty(K + 1, device="meta"), xs, 1.5, 255, ensemble)
                    cases.append((dict(op="ncps_loss", shape_name=shape_name, shape=[N, C, H, W], K=K,
                                       ensemble=ensemble, dtype="bf16", layout=layout), launches))
    return cases


def cps_upsample_cases(config: tuple[int, int, int, int, int] | None = None):
    """(name, launches) for the upsample-fused loss at DeepLabv3+'s decoder resolution (1/4); ``config``:
    (BH, BW, BLOCK_F, num_warps, AX) forced on the kernel."""
    from cps_fast.kernels import cps_upsample as UK

    cases = []
    # plus one-pixel-high and -wide outputs: Triton specialises an int argument equal to 1, which the
    # interpreter never does (such a launch once failed to compile)
    for shape_name, (N, C, h, w), (H, W) in (("voc", (8, 21, 128, 128), (512, 512)),
                                             ("cityscapes", (8, 19, 200, 200), (800, 800)),
                                             ("h1", (1, 21, 1, 5), (1, 7)), ("w1", (1, 21, 4, 1), (9, 1))):
        edge = shape_name in ("h1", "w1")
        for dtype in (torch.bfloat16,) if edge else (torch.bfloat16, torch.float32):
            for layout in ("nchw",) if edge else ("nchw", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                a = torch.empty(N, C, h, w, device="meta", dtype=dtype).contiguous(memory_format=fmt)
                t = torch.empty(N, H * W, device="meta", dtype=torch.uint8)
                launches = intercept(UK, ["_cps_upsample_kernel"],
                                     functools.partial(UK.cps_upsample_fwd, config=UK.UpsampleConfig(*config) if config else None),
                                     a, a, t, None, None, torch.empty(3, device="meta"), a, a, H, W, 1.5, 255, True)
                cases.append((dict(op="cps_upsample", shape_name=shape_name, shape=[N, C, h, w], out=[H, W],
                                   dtype=_TRITON_TYPES[dtype], layout=layout), launches))
    return cases


CASES = {"cps_loss": cps_loss_cases, "ncps_loss": ncps_loss_cases, "cps_upsample": cps_upsample_cases}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(CASES), help="comma list of " + ",".join(CASES))
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/kernel_report-sm90.json)")
    p.add_argument("--tile", default=None, metavar="BP:W",
                   help="force this BLOCK_P:num_warps on the tile kernels of the CPS and n-CPS losses "
                        "(CPSLossConfig and NCPSLossConfig in kernels/cps_loss.py and kernels/ncps_loss.py) to compare "
                        "configurations, e.g. --ops cps_loss --tile 32:1 --json out.json")
    p.add_argument("--upsample-config", default=None, metavar="BHxBW:F:W:AX",
                   help="force this configuration on the upsample-fused kernel (UpsampleConfig in "
                        "kernels/cps_upsample.py; bench_upsample.py's fused[BHxBW:F:W:AX]), e.g. "
                        "--ops cps_upsample --upsample-config 8x8:128:4:0 --json out.json")
    p.add_argument("--shapes", default=None, help="comma list of shape names to compile (default: all)")
    p.add_argument("--reuse", default=None, metavar="PATH",
                   help="take the rows of the report at PATH where they are this checkout's (every row's "
                        "sources key equals sources_key()), after compiling one launch of each kernel again "
                        "to check them; otherwise compile everything (CI: the committed report)")
    args = p.parse_args(argv)
    if args.reuse and (args.tile or args.upsample_config):
        raise SystemExit("kernel_report: --reuse takes the heuristic's report; it cannot stand for --tile or --upsample-config")
    forced_args = {}
    if args.tile:
        if not args.json:
            raise SystemExit("kernel_report: --tile needs --json (the default file is the heuristic's report)")
        tile = tuple(int(v) for v in args.tile.split(":"))
        forced_args["cps_loss"] = forced_args["ncps_loss"] = {"tile": tile}
    if args.upsample_config:
        forced = re.fullmatch(r"(\d+)x(\d+):(\d+):(\d+):([01])", args.upsample_config)
        if not forced:
            raise SystemExit(f"kernel_report: --upsample-config {args.upsample_config!r}: expected BHxBW:F:W:AX")
        if not args.json:
            raise SystemExit("kernel_report: --upsample-config needs --json (the default file is the heuristic's report)")
        forced_args["cps_upsample"] = {"config": tuple(int(g) for g in forced.groups())}
    key = sources_key()
    planned: list[tuple[dict, Launch]] = []  # (the row's identity, the launch), in report order
    for op in args.ops.split(","):
        if op not in CASES:
            raise SystemExit(f"kernel_report: unknown op {op!r}; expected one of {', '.join(CASES)}")
        for meta, launches in CASES[op](**forced_args.get(op, {})):
            if args.shapes and meta["shape_name"] not in args.shapes.split(","):
                continue
            for launch in launches:
                planned.append((dict(meta, kernel=launch.fn.__name__, target="sm_90a", triton=triton.__version__,
                                     sources=key), launch))
    rows = reusable(Path(args.reuse), [m for m, _ in planned], key) if args.reuse else None
    if rows is None:
        rows = [dict(meta, **compile_launch(launch)) for meta, launch in planned]
    else:
        # the key covers what the rows depend on; one fresh compile of each kernel checks that claim
        # (and that every kernel still compiles here)
        first = {}
        for i, (meta, _) in enumerate(planned):
            first.setdefault(meta["kernel"], i)
        for i in first.values():
            meta, launch = planned[i]
            fresh = json.loads(json.dumps(dict(meta, **compile_launch(launch))))  # as the report holds it
            if fresh != rows[i]:
                differ = sorted(k for k in fresh.keys() | rows[i].keys() if fresh.get(k) != rows[i].get(k))
                raise SystemExit(f"kernel_report: {args.reuse} row {i} ({_describe(meta)}) carries this checkout's "
                                 f"key but a fresh compile differs in {', '.join(differ)}: the key misses an input; "
                                 "rewrite the report with `python benchmarks/kernel_report.py`")
        print(f"kernel_report: reused the {len(rows)} rows of {args.reuse} (sources {key}), "
              f"checked by compiling {len(first)} launches again ({', '.join(first)})")
    common.print_table(rows, [
        ("op", "op", ""), ("shape_name", "shape", ""), ("dtype", "dtype", ""), ("layout", "layout", ""),
        ("kernel", "kernel", ""), ("num_warps", "warps", ""), ("regs", "regs", ""),
        ("stack_bytes", "spill B", ""), ("shared_bytes", "smem B", ""), ("barriers", "barriers", ""),
        ("loads", "loads (bits x count)", ""), ("stores", "stores", ""), ("loop_instructions", "loop", ""),
        ("loop_instructions_per_pixel", "per px", ""),
    ])
    path = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / "kernel_report-sm90.json"
    common.write_json(rows, str(path), "kernel_report", torch.device("cpu"))
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
