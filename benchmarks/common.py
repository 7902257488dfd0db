"""Shared helpers of the benchmark scripts: environment, timing, ceilings, table and JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cps_fast.config import ConfigError

RESULTS = Path(__file__).resolve().parent / "results"  # committed measurements: written only when --json names them


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Versions and device facts recorded with every row."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def quantiles(times_ms: list[float]) -> dict:
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 9
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times_ms)}


def measure(fn, device: torch.device, *, warmup: int = 3, reps: int = 10, setup=None) -> list[float]:
    """Times of ``fn()`` in milliseconds (CUDA events on a GPU, perf_counter on the CPU).

    ``setup()`` runs before each call, outside the timed region (e.g. to clear gradients).
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if setup:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_graph(fn, device: torch.device, *, warmup: int = 3, reps: int = 20, setup=None) -> list[float]:
    """GPU times of ``fn()`` in milliseconds, from replays of a CUDA graph of one call.

    Replays run the recorded kernels without Python or launch overhead, so short
    kernels (a fused loss takes well under a millisecond) are timed by what the GPU
    does; this is how the trainer runs them too. ``setup()`` runs once before the
    capture (e.g. clearing gradients, which the captured backward then allocates).
    Raises whatever the capture raises; callers fall back to :func:`measure`.
    """
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            if setup:
                setup()
            fn()
    current.wait_stream(side)
    if setup:
        setup()
    graph = torch.cuda.CUDAGraph()
    # thread_local: a live loader's pin-memory thread may call CUDA while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return times


def measure_kernel(fn, device: torch.device, *, warmup: int = 3, reps: int = 20, setup=None,
                   label: str = "") -> tuple[list[float], str]:
    """``(times_ms, timing)``: CUDA-graph replays on a GPU (:func:`measure_graph`), falling back to
    CUDA events around eager calls when the call cannot be captured; wall clock on the CPU."""
    if device.type != "cuda":
        return measure(fn, device, warmup=warmup, reps=reps, setup=setup), "perf_counter"
    try:
        return measure_graph(fn, device, warmup=warmup, reps=reps, setup=setup), "graph-replay"
    except Exception as exc:  # e.g. a provider that cannot be captured: time it eagerly instead
        print(f"note: {label} not capturable ({type(exc).__name__}: {str(exc)[:120]}); timing eager calls",
              file=sys.stderr)
        torch.cuda.synchronize(device)
        return measure(fn, device, warmup=warmup, reps=reps, setup=setup), "events"


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now."""
    n = nbytes // 4
    if device.type == "cpu":
        n = min(n, 1 << 26)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = measure(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Dense matmul throughput in TFLOP/s, measured now."""
    if device.type == "cpu":
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = measure(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def peak_memory_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def peak_memory_mb(device: torch.device, baseline: int) -> float | None:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return None


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` with ``columns`` given as (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for k, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def result_path(path: str | os.PathLike | None, name: str, device: torch.device) -> Path:
    """``path``, or ``<name>-<cuda|cpu>.json`` in the current folder by default: never the committed
    ``benchmarks/results/`` unless ``--json`` names a file there."""
    if path is None:
        tag = "cuda" if device.type == "cuda" else "cpu"
        path = Path.cwd() / f"{name}-{tag}.json"
    return Path(path)


# ----------------------------------------------------------------------------- argument checks
# each raises ConfigError: `cps-fast bench` prints it as one line and exits with status 2


def int_list(text: str, option: str, length: int | None = None, form: str = "", minimum: int = 1) -> tuple[int, ...]:
    """A comma list of integers >= ``minimum`` (``length`` of them, when given) from ``option``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or (length is not None and len(values) != length) or min(values) < minimum:
        what = f"{length} " if length is not None else ""
        raise ConfigError(f"{option} {text!r}: expected a comma list of {what}integers >= {minimum}"
                          + (f" ({form})" if form else ""))
    return values


def choices(text: str, option: str, allowed) -> list[str]:
    """A comma list from ``allowed`` given to ``option``."""
    items = text.split(",")
    bad = [v for v in items if v not in allowed]
    if bad or not text:
        raise ConfigError(f"{option} {text!r}: unknown {', '.join(map(repr, bad)) or 'empty value'}; "
                          f"expected a comma list of {', '.join(allowed)}")
    return items


def positive(args, *names: str) -> None:
    """Each of ``args.<name>`` is None (its default) or an integer >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected an integer >= 1")


def write_json(rows: list[dict], path: str | os.PathLike | None, name: str, device: torch.device) -> Path:
    """Write ``rows`` (benchmarks call it after every row, so a killed run keeps what it measured).

    Atomically: the JSON goes to a temporary file beside ``path``, which then replaces it, so a run
    killed mid-write (a step's timeout) leaves the previous complete file, never half of one."""
    path = result_path(path, name, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows, indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not *.json: targets.py never reads it
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- loss-benchmark scaffolding
# shared by bench_loss.py, bench_ncps.py and bench_upsample.py


def add_case_args(p, name: str, *, shape_help: str, shape_names, dtypes: str | None, layouts: str,
                  modes: str) -> None:
    """Add the options every loss benchmark takes: device, shapes, dtypes, layouts, modes, reps, threads, json."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help="comma list of " + ",".join(shape_names))
    p.add_argument("--shape", default=None, help=shape_help)
    p.add_argument("--dtypes", default=dtypes,
                   help=None if dtypes else "comma list of bf16,fp32,fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--layouts", default=layouts)
    p.add_argument("--modes", default=modes)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help=f"output path (default ./{name}-<cuda|cpu>.json in the current folder)")


def setup_run(args) -> tuple[torch.device, int, dict]:
    """``(device, reps, environment)`` from the parsed options (sets the CPU thread count)."""
    positive(args, "reps", "threads")
    if args.dtypes:
        choices(args.dtypes, "--dtypes", ("bf16", "fp32", "fp16"))
    choices(args.layouts, "--layouts", ("nchw", "channels_last"))
    choices(args.modes, "--modes", ("fwd+bwd", "fwd"))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (20 if device.type == "cuda" else 5)
    return device, reps, environment(device)


def shape_names(args, device: torch.device, gpu_shapes: dict, cpu_shapes: dict) -> tuple[dict, list[str]]:
    """``(shapes, names)``: the named N,C,H,W shapes and those to run (``--shape`` gives a custom one)."""
    shapes = {**gpu_shapes, **cpu_shapes}
    names = choices(args.shapes, "--shapes", list(shapes)) if args.shapes else \
        list(gpu_shapes if device.type == "cuda" else cpu_shapes)
    if args.shape:
        shapes["custom"] = int_list(args.shape, "--shape", 4, "N,C,H,W, e.g. 2,21,64,64")
        names = ["custom"]
    return shapes, names


def make_logits(shape, dtype: torch.dtype, layout: str, device: torch.device, requires_grad: bool) -> torch.Tensor:
    """Random logits (scale 3) in ``layout`` ("nchw" or "channels_last")."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=torch.float32).mul_(3).to(dtype).contiguous(memory_format=fmt)
    return x.requires_grad_(requires_grad)


def make_target(N: int, C: int, H: int, W: int, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, H, W)`` labels with about 10% ignored (255)."""
    t = torch.randint(0, C, (N, H, W), device=device, dtype=torch.uint8)
    t[torch.rand(N, H, W, device=device) < 0.1] = 255
    return t


def loss_step(loss_fn, leaves, backward: bool):
    """``(setup, step)`` closures: ``setup`` clears the leaves' gradients, ``step`` runs ``loss_fn()``
    and, when ``backward``, its backward (without it, under no_grad)."""
    def setup():
        for x in leaves:
            x.grad = None

    def step():
        loss = loss_fn()
        if backward:
            loss.backward()

    return setup, (step if backward else torch.no_grad()(step))


def maybe_autocast(fn, device: torch.device, dtype: torch.dtype):
    """``fn`` run under CUDA autocast to ``dtype`` when on a GPU with a low dtype (as the reference
    trains; logits stay in the low dtype), else ``fn`` as it is."""
    if not (device.type == "cuda" and dtype != torch.float32):
        return fn

    def run(*args, **kw):
        with torch.autocast("cuda", dtype=dtype):
            return fn(*args, **kw)

    return run


def compiled(fn):
    """``torch.compile(fn)``, or a string saying why it is unavailable.

    A benchmark compiles the same function for every case (shape, dtype, layout, mode), and
    Dynamo counts those recompilations per function: past its limit (8) it would run the rest
    eagerly without a word, so the limit is raised."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"torch.compile unavailable: {exc}"


def try_case(what: str, bench, *args):
    """``bench(*args)``, or None after printing why the case was skipped (e.g. torch.compile failing)."""
    try:
        return bench(*args)
    except Exception as exc:
        print(f"skip {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def gbs(nbytes: int, times_ms: list[float]) -> float:
    """GB/s of moving ``nbytes`` in the median of ``times_ms``."""
    return nbytes / (statistics.median(times_ms) * 1e-3) / 1e9


def add_speedup(rows: list[dict], baseline: str, keys: tuple[str, ...], out: str) -> dict:
    """Set ``row[out]`` to the baseline provider's median over the row's on the same case (None
    without one); returns the baseline rows by case."""
    base = {tuple(r[k] for k in keys): r for r in rows if r["provider"] == baseline}
    for r in rows:
        b = base.get(tuple(r[k] for k in keys))
        r[out] = b["median_ms"] / r["median_ms"] if b else None
    return base


def report(rows: list[dict], columns, header: str, json_path, name: str, device: torch.device) -> Path:
    """Print ``header`` and the table, write the JSON rows and say where."""
    print(header)
    print_table(rows, columns)
    path = write_json(rows, json_path, name, device)
    print(f"wrote {len(rows)} rows to {path}")
    return path


def runnable(providers, make):
    """``(name, fn)`` for each provider whose ``make(name)`` gives a function; prints why the
    others (``make`` returned a reason string) are skipped."""
    for name in providers:
        fn = make(name)
        if isinstance(fn, str):
            print(f"skip {name}: {fn}", file=sys.stderr)
            continue
        yield name, fn
