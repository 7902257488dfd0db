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

RESULTS = Path(__file__).resolve().parent / "results"


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
    with torch.cuda.graph(graph):
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
    """``path``, or benchmarks/results/<name>-<cuda|cpu>.json by default."""
    if path is None:
        tag = "cuda" if device.type == "cuda" else "cpu"
        path = RESULTS / f"{name}-{tag}.json"
    return Path(path)


def write_json(rows: list[dict], path: str | os.PathLike | None, name: str, device: torch.device) -> Path:
    """Write ``rows`` (benchmarks call it after every row, so a killed run keeps what it measured)."""
    path = result_path(path, name, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path
