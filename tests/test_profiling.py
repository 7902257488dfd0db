"""Profiling a training run: the phase ranges, the profiler window, its files and summary (none
unless asked: tests/test_train.py::test_checkpoint_contents)."""
import json

import pytest

from cps_fast.cli import build_parser
from cps_fast.config import ConfigError
from cps_fast.train import Trainer
from cps_fast.train.profiling import kernel_summary, phase_times
from cps_fast.train.run import config_from_args

from test_train import tiny_cfg


def _events(trace):
    with open(trace) as f:
        return json.load(f)["traceEvents"]


def _ranges(events, name):
    return [e for e in events if e.get("name") == name and e.get("ph") == "X"]


def test_profile_window_records_the_asked_iterations(tmp_path):
    lines = []
    cfg = tiny_cfg(max_iters=6, profile_iters=3, profile_start=2, log_every=100)
    t = Trainer(cfg, tmp_path, device="cpu", print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    t.train()
    prof = tmp_path / "profile"
    events = _events(prof / "trace_rank0.json")
    # exactly the 3 iterations after the first 2 (and not the last): one data and one step range each,
    # no capture, no eval
    assert len(_ranges(events, "cps_fast/data")) == 3
    assert len(_ranges(events, "cps_fast/step")) == 3
    assert not _ranges(events, "cps_fast/eval")
    step = _ranges(events, "cps_fast/step")[0]
    inside = [e for e in events if e.get("ph") == "X" and e.get("name", "").startswith("aten::convolution")
              and step["ts"] <= e["ts"] <= step["ts"] + step["dur"]]
    assert inside, "the model's operators run inside the step range"
    summary = json.loads((prof / "summary_rank0.json").read_text())
    assert summary["iterations"] == summary["requested"] == 3 and summary["start"] == 2
    assert summary["wall_ms"] > 0 and summary["gpu"] is None
    phases = summary["phases_ms"]
    assert set(phases) == {"data", "step"}
    assert 0 < phases["step"] <= summary["wall_ms"] * 1.05
    assert any("convolution" in name for name, _, _ in summary["host_ops"])
    table = (prof / "ops_rank0.txt").read_text()
    assert "Self CPU" in table and "cps_fast/step" in table
    text = "\n".join(lines)
    assert "profile (torch, cpu, rank 0): 3 iterations after 2" in text
    assert "host, per iteration: step" in text and "trace_rank0.json" in text


def test_profile_window_cut_short_by_the_run_still_writes(tmp_path):
    lines = []
    cfg = tiny_cfg(max_iters=5, profile_iters=50, profile_start=2, log_every=2)
    Trainer(cfg, tmp_path, device="cpu", print_fn=lambda *a, **k: lines.append(" ".join(map(str, a)))).train()
    summary = json.loads((tmp_path / "profile" / "summary_rank0.json").read_text())
    assert summary["iterations"] == 3 and summary["requested"] == 50
    assert "log" in summary["phases_ms"]  # iteration 4 logs inside the window
    assert "the run ended: 50 asked" in "\n".join(lines)


def test_profile_settings_are_checked_and_reach_the_config():
    with pytest.raises(ConfigError, match="profile_iters"):
        tiny_cfg(profile_iters=-1)
    with pytest.raises(ConfigError, match="profile_start"):
        tiny_cfg(profile_start=-2)
    with pytest.raises(ConfigError, match="profiler"):
        tiny_cfg(profiler="perf")
    args = build_parser().parse_args(["train", "demo", "--out", "x", "--profile", "7",
                                      "--set", "profile_start=3"])
    cfg = config_from_args(args)
    assert (cfg.profile_iters, cfg.profile_start, cfg.profiler) == (7, 3, "torch")


def test_kernel_summary_counts_overlap_once_and_finds_the_loss():
    ev = [
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_conv", "ts": 0.0, "dur": 100.0},
        {"ph": "X", "cat": "kernel", "name": "_cps_upsample_kernel", "ts": 50.0, "dur": 100.0},  # overlaps
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 300.0, "dur": 20.0},
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_conv", "ts": 400.0, "dur": 100.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::cps_thing", "ts": 0.0, "dur": 1000.0},  # host: not device
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0.0},
    ]
    s = kernel_summary(ev, iters=2)
    assert s["busy_ms"] == pytest.approx((150 + 20 + 100) / 1e3 / 2)
    assert s["kernel_ms"] == pytest.approx(320 / 1e3 / 2)
    assert s["loss_ms"] == pytest.approx(100 / 1e3 / 2)
    assert s["top"][0] == ["sm90_xmma_conv", pytest.approx(0.1), 1.0]
    assert kernel_summary([e for e in ev if e["cat"] == "cpu_op"], iters=1) is None


def test_phase_times_count_the_host_ranges_only():
    """On CUDA, Kineto reports every record_function range twice: on the host and as a device
    annotation of the same name with no CPU time. Built by hand here (no GPU needed); only the
    host entries may count, or a phase reads 0."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    events, i = [], 0
    for it in range(3):
        t = it * 1000
        for name, start, end, dev in (("cps_fast/data", t, t + 100, DeviceType.CPU),
                                      ("cps_fast/step", t + 100, t + 400, DeviceType.CPU),
                                      ("cps_fast/data", t + 120, t + 130, DeviceType.CUDA),
                                      ("cps_fast/step", t + 150, t + 900, DeviceType.CUDA)):
            i += 1
            events.append(FunctionEvent(id=i, name=name, thread=0 if dev == DeviceType.CPU else 7, start_us=start,
                                        end_us=end, use_device="cuda", device_type=dev, is_user_annotation=True,
                                        stack=[]))
    averages = EventList(events, use_device="cuda")
    averages._build_tree()
    got = phase_times(averages.key_averages(), 3)
    assert got == pytest.approx({"data": 0.1, "step": 0.3})


@pytest.mark.gpu
def test_profile_of_a_replayed_graph_shows_its_kernels(tmp_path):
    from test_train import _gpu_cfg

    lines = []
    cfg = _gpu_cfg(max_iters=22, profile_iters=4, profile_start=8, log_every=100)
    t = Trainer(cfg, tmp_path, device="cuda", print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    t.train()
    assert t.graph is not None
    summary = json.loads((tmp_path / "profile" / "summary_rank0.json").read_text())
    gpu = summary["gpu"]
    assert gpu is not None and 0 < gpu["busy_ms"] <= summary["wall_ms"] * 1.05
    assert gpu["loss_ms"] > 0, "the fused loss kernel replayed from the graph is in the trace"
    assert "device busy" in "\n".join(lines)
    # the replayed kernels' time dwarfs the host's launch of the graph
    assert summary["phases_ms"]["step"] < gpu["busy_ms"]


@pytest.mark.gpu
def test_nsys_mode_runs_no_torch_profiler(tmp_path):
    from test_train import _gpu_cfg

    cfg = _gpu_cfg(max_iters=16, profile_iters=2, profile_start=4, profiler="nsys", log_every=100)
    Trainer(cfg, tmp_path, device="cuda", print_fn=lambda *a, **k: None).train()
    assert not (tmp_path / "profile").exists()

