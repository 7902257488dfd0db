"""Profiling a training run: named phases, a torch.profiler window, an Nsight capture range.

The trainer marks each iteration's phases with :func:`phase` (``cps_fast/data``: waiting for
the loaders and copying the batch in; ``cps_fast/step``: the eager step or the CUDA-graph
replay; ``cps_fast/log``, ``cps_fast/eval``, ``cps_fast/checkpoint``, ``cps_fast/capture``).
They are torch.profiler ranges and, on CUDA, NVTX ranges that Nsight Systems shows; outside
a profiling window they cost a few microseconds per iteration.

:class:`ProfileWindow` records ``iters`` iterations after the first ``start`` of a run
(``--profile N``, ``profile_start``), then writes to ``OUT/profile/``:

- ``trace_rank{r}.json``: the Chrome trace (open it in https://ui.perfetto.dev or
  chrome://tracing); kernels replayed from a CUDA graph are in it, on their stream;
- ``ops_rank{r}.txt``: torch's operator table (on a CUDA-graph run the replayed kernels have
  no operator: the kernel summary below is the one to read);
- ``summary_rank{r}.json`` and a printed summary: wall time per iteration, host time per
  phase, the operators with the most CPU time, and on CUDA the device-busy time (the union
  of kernel, copy and memset intervals), the share of the fused CPS loss kernels and the
  kernels that took the most time.

With ``profiler="nsys"`` no torch.profiler runs (it and Nsight would both claim CUPTI): the
window is only bracketed with ``cudaProfilerStart``/``Stop``, so
``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop cps-fast train ...``
records exactly those iterations, with the phase ranges.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["phase", "ProfileWindow", "kernel_summary", "phase_times"]

PREFIX = "cps_fast/"


@contextlib.contextmanager
def phase(name: str):
    """A ``cps_fast/<name>`` range for torch.profiler and, where CUDA is initialised, for NVTX."""
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.profiler.record_function(PREFIX + name):
        if nvtx:
            torch.cuda.nvtx.range_push(PREFIX + name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


def _on_host(e) -> bool:
    return e.device_type == torch.autograd.DeviceType.CPU


def phase_times(averages, iters: int) -> dict:
    """Host milliseconds per iteration of each ``cps_fast/<phase>`` range in torch.profiler's
    ``key_averages()``. On CUDA, Kineto also reports each range as a device-side annotation of
    the same name (its own entry, with no CPU time): only the host entries count."""
    out: dict[str, float] = {}
    for e in averages:
        if e.key.startswith(PREFIX) and _on_host(e):
            key = e.key[len(PREFIX):]
            out[key] = out.get(key, 0.0) + e.cpu_time_total / 1e3 / max(int(iters), 1)
    return out


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_summary(events: list, iters: int, top: int = 15) -> Optional[dict]:
    """Device time from a Chrome trace's events (``dur`` in microseconds), per iteration, or
    None when the trace has no device events (a CPU run).

    ``busy_ms``: the union of all device intervals (streams overlapping count once);
    ``kernel_ms``: the sum of their durations (kernels, copies, memsets; overlaps count twice);
    ``loss_ms``: kernels whose name contains "cps" (the fused losses); ``top``: the events
    with the most total time, as ``[name, ms per iteration, calls per iteration]``.
    """
    dev = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    if not dev:
        return None
    iters = max(int(iters), 1)
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in dev)
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    per_name: dict[str, list[float]] = {}
    for e in dev:
        acc = per_name.setdefault(str(e.get("name", "?")), [0.0, 0])
        acc[0] += float(e["dur"])
        acc[1] += 1
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    loss = sum(float(e["dur"]) for e in dev if e.get("cat") == "kernel" and "cps" in str(e.get("name", "")).lower())
    return {
        "busy_ms": busy / 1e3 / iters,
        "kernel_ms": sum(v[0] for v in per_name.values()) / 1e3 / iters,
        "loss_ms": loss / 1e3 / iters,
        "top": [[k, v[0] / 1e3 / iters, v[1] / iters] for k, v in ranked[:top]],
    }


def _cupti_graph_workaround() -> None:
    """torch's own rule for profiling beside CUDA graphs (torch/profiler/profiler.py applies it
    to inductor's graphs only): before CUDA 12.6, CUPTI's teardown and lazy re-initialisation
    crash a process that replays graphs, so both are turned off."""
    from torch.torch_version import TorchVersion

    cuda = getattr(torch.version, "cuda", None)
    if cuda and TorchVersion(cuda) < "12.6":
        os.environ.setdefault("DISABLE_CUPTI_LAZY_REINIT", "1")
        os.environ.setdefault("TEARDOWN_CUPTI", "0")


class ProfileWindow:
    """Records ``iters`` training iterations once ``start`` iterations of the run have passed.

    The trainer calls :meth:`before` ahead of each loop iteration with the number of
    iterations it has trained so far, and :meth:`after` with the number that loop iteration did
    (a CUDA-graph capture does several at once); :meth:`close` ends a window the run cut
    short. Each rank writes its own files.
    """

    def __init__(self, out_dir, *, iters: int, start: int, tool: str = "torch", device: torch.device,
                 rank: int = 0, print_fn: Callable = print):
        if tool not in ("torch", "nsys"):
            raise ValueError(f"profiler={tool!r}; expected 'torch' or 'nsys'")
        self.out = Path(out_dir)
        self.iters, self.start, self.tool = int(iters), int(start), tool
        self.device, self.rank, self.print = device, rank, print_fn
        self.prof = None
        self.active = False
        self.done = False
        self.recorded = 0
        self.summary: Optional[dict] = None

    @property
    def enabled(self) -> bool:
        return self.iters > 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, done: int) -> None:
        if not self.enabled or self.active or self.done or done < self.start:
            return
        self._sync()
        if self.tool == "torch":
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                _cupti_graph_workaround()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        if self.device.type == "cuda":
            torch.cuda.profiler.start()
        self.active = True
        self.recorded = 0
        self.t0 = time.perf_counter()

    def after(self, did: int) -> None:
        if not self.active:
            return
        self.recorded += int(did)
        if self.recorded >= self.iters:
            self.close()

    def close(self) -> Optional[dict]:
        """Ends the window (if one is open), writes its files and prints the summary."""
        if not self.active:
            return self.summary
        self._sync()
        wall = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            torch.cuda.profiler.stop()
        self.active, self.done = False, True
        n = max(self.recorded, 1)
        summary = {"iterations": self.recorded, "requested": self.iters, "start": self.start,
                   "tool": self.tool, "device": str(self.device), "rank": self.rank,
                   "wall_ms": wall * 1e3 / n}
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.out.mkdir(parents=True, exist_ok=True)
            trace = self.out / f"trace_rank{self.rank}.json"
            self.prof.export_chrome_trace(str(trace))
            averages = self.prof.key_averages()
            sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            (self.out / f"ops_rank{self.rank}.txt").write_text(averages.table(sort_by=sort, row_limit=40))
            summary["phases_ms"] = phase_times(averages, n)
            with open(trace) as f:
                events = json.load(f).get("traceEvents", [])
            summary["gpu"] = kernel_summary(events, n)
            ops = sorted((e for e in averages if _on_host(e) and not e.key.startswith(PREFIX)),
                         key=lambda e: -e.self_cpu_time_total)
            summary["host_ops"] = [[e.key, e.self_cpu_time_total / 1e3 / n, e.count / n] for e in ops[:15]]
            summary["trace"] = str(trace)
            self.prof = None
            (self.out / f"summary_rank{self.rank}.json").write_text(json.dumps(summary, indent=1))
        self.summary = summary
        self.print(format_summary(summary))
        return summary


def format_summary(s: dict) -> str:
    """The printed form of a :class:`ProfileWindow` summary."""
    wall = s["wall_ms"]
    short = "" if s["iterations"] >= s["requested"] else f" (the run ended: {s['requested']} asked)"
    lines = [f"profile ({s['tool']}, {s['device']}, rank {s['rank']}): {s['iterations']} iterations after "
             f"{s['start']}{short}, {wall:.1f} ms per iteration"]
    phases = s.get("phases_ms")
    if phases:
        parts = [f"{k} {v:.1f} ms ({100 * v / wall:.0f}%)" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
        lines.append("  host, per iteration: " + ", ".join(parts))
    dev = s.get("gpu")
    if dev:
        lines.append(f"  device busy {dev['busy_ms']:.1f} ms per iteration ({100 * dev['busy_ms'] / wall:.0f}% of "
                     f"the wall time); fused CPS loss kernels {dev['loss_ms']:.2f} ms "
                     f"({100 * dev['loss_ms'] / max(dev['kernel_ms'], 1e-9):.1f}% of device time)")
        lines.append("  kernels with the most device time, per iteration:")
        for name, ms, calls in dev["top"][:8]:
            lines.append(f"    {ms:8.2f} ms  {calls:6.1f}x  {name[:100]}")
    elif s.get("host_ops"):
        lines.append("  operators with the most self CPU time, per iteration:")
        for name, ms, calls in s["host_ops"][:8]:
            lines.append(f"    {ms:8.2f} ms  {calls:6.1f}x  {name[:100]}")
    if "trace" in s:
        lines.append(f"  trace: {s['trace']} (https://ui.perfetto.dev or chrome://tracing)")
    elif s["tool"] == "nsys":
        lines.append("  nsys: the window was bracketed with cudaProfilerStart/Stop "
                     "(nsys profile --capture-range=cudaProfilerApi)")
    return "\n".join(lines)
