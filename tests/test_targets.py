"""benchmarks/targets.py: issue 6's targets read off a run's JSON rows (met, missed, not measured)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import targets  # noqa: E402

ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0"}


def loss_rows(fused_ms=1.0, copy_fraction=0.9, eager_ms=10.0):
    rows = []
    for shape in ("voc", "cityscapes"):
        for layout in ("nchw", "channels_last"):
            key = dict(ENV, shape_name=shape, dtype="bf16", layout=layout, mode="fwd+bwd")
            rows.append(dict(key, provider="triton", median_ms=fused_ms, copy_fraction=copy_fraction))
            rows.append(dict(key, provider="triton[64x8]", median_ms=fused_ms * 0.9, copy_fraction=copy_fraction / 0.9))
            rows.append(dict(key, provider="eager", median_ms=eager_ms, copy_fraction=0.1))
    return rows


def step_rows(engine_ms=80.0, loss_ms=4.0, data_ms=2.0, peak=(10000.0, 5000.0)):
    imgs = 24
    ref = dict(ENV, variant="reference", median_ms=500.0, images_per_s=imgs / 0.5, peak_mb=peak[0])
    best = dict(ENV, variant="+cuda_graph", median_ms=engine_ms, images_per_s=imgs / (engine_ms / 1e3),
                peak_mb=peak[1], loss_ms=loss_ms, data_ms=data_ms,
                loss_data_fraction=(loss_ms + data_ms) / engine_ms)
    hours = [{"preset": "voc_r50_1-8_cutmix", "iterations": 39000, "hours": 39000 * engine_ms / 3.6e6}]
    return [ref, best, dict(ENV, variant="schedule_hours", step_ms=engine_ms, presets=hours)]


def by_target(rows, name):
    return [r for r in rows if r["target"] == name]


def test_all_met():
    loss = loss_rows()
    loss += [dict(r, provider="compile", median_ms=3.0) for r in loss if r["provider"] == "eager"]
    results = {"loss": loss,
               "step": step_rows(), "data": [dict(ENV, backend="dali-gpu", setting="voc", images_per_s=1000.0)]}
    rows = targets.evaluate(results)
    assert all(r["met"] for r in rows), [r for r in rows if not r["met"]]
    assert len(by_target(rows, "loss: of copy bandwidth")) == 4
    hours = by_target(rows, "schedule: VOC R50 1/8 CutMix hours")[0]["value"]
    assert hours == pytest.approx(39000 * 0.08 / 3600)
    note = by_target(rows, "loss: of copy bandwidth")[0]["note"]
    assert "triton[64x8]" in note  # the faster forced tile configuration is pointed out


def test_swept_tile_configurations_are_pointed_out():
    """run_gpu.sh's "tiles" step writes loss-tiles.json; its fastest row is named beside the heuristic's
    value (the target itself stays the heuristic's, which is what users get)."""
    loss = [r for r in loss_rows(copy_fraction=0.7) if r["provider"] != "triton[64x8]"]
    tiles = [dict(r, provider="triton[flat32x4]", median_ms=0.8, copy_fraction=0.875)
             for r in loss if r["provider"] == "triton" and r["layout"] == "channels_last"]
    rows = by_target(targets.evaluate({"loss": loss, "loss-tiles": tiles}), "loss: of copy bandwidth")
    for r in rows:
        assert r["value"] == 0.7 and r["met"] is False
        assert ("triton[flat32x4]: 0.88 of copy" in r["note"]) == r["case"].endswith("channels_last"), r


def test_missed_and_unmeasured():
    results = {"loss": loss_rows(copy_fraction=0.5, eager_ms=5.0),
               "step": step_rows(engine_ms=150.0, loss_ms=10.0, data_ms=10.0, peak=(10000.0, 7000.0)),
               "data": [dict(ENV, backend="dali-gpu", setting="voc", images_per_s=200.0)]}
    rows = targets.evaluate(results)
    assert not any(r["met"] for r in by_target(rows, "loss: of copy bandwidth"))
    assert not any(r["met"] for r in by_target(rows, "loss: x eager"))  # 5x < 8x
    assert all(r["met"] is None for r in by_target(rows, "loss: x torch.compile"))  # no compile rows
    assert by_target(rows, "step: x reference images/s")[0]["met"] is False  # 3.3x
    assert by_target(rows, "step: loss + data share")[0]["met"] is False  # 0.13
    assert by_target(rows, "step: peak memory of reference")[0]["met"] is False  # 0.70
    assert by_target(rows, "schedule: VOC R50 1/8 CutMix hours")[0]["met"] is False  # 1.6 h
    assert by_target(rows, "data: DALI feed x step consumption")[0]["met"] is False  # 200 / 160


def test_another_presets_step_measures_no_step_target():
    step = [dict(r, preset="cityscapes_r50_1-8_cutmix") for r in step_rows() if r["variant"] != "schedule_hours"]
    rows = targets.evaluate({"step": step})
    assert all(r["met"] is None for r in rows if r["target"].startswith(("step", "schedule")))


def test_the_engine_is_the_variant_furthest_up_the_ladder_in_any_run_order():
    """bench_step runs reference and +cuda_graph first (run_gpu.sh): the last row is then not the
    engine's; each row's ladder_index says which is."""
    ref, best, sched = step_rows()
    mid = dict(ENV, variant="+fused_loss", median_ms=200.0, images_per_s=120.0, peak_mb=8000.0)
    rows = [dict(ref, ladder_index=0), dict(best, ladder_index=7), dict(mid, ladder_index=5), sched]
    got = targets.evaluate({"step": rows})
    assert by_target(got, "step: x reference images/s")[0]["case"] == "+cuda_graph vs reference"


def test_schedule_hours_from_the_best_row_when_the_schedule_row_is_missing():
    ref, best, _ = step_rows(engine_ms=80.0)
    rows = [dict(ref, ladder_index=0, schedule_iterations=39338), dict(best, ladder_index=7, schedule_iterations=39338)]
    got = by_target(targets.evaluate({"step": rows}), "schedule: VOC R50 1/8 CutMix hours")[0]
    assert got["value"] == pytest.approx(39338 * 0.08 / 3600) and got["met"] is True
    assert "39338 iterations at +cuda_graph's 80.0 ms" in got["note"]
    # without the iterations (older rows) it stays unmeasured
    got = by_target(targets.evaluate({"step": step_rows()[:2]}), "schedule: VOC R50 1/8 CutMix hours")[0]
    assert got["met"] is None


def test_a_half_written_json_is_skipped_and_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.json").write_text(json.dumps(loss_rows()))
    (run / "step.json").write_text(json.dumps(step_rows())[:57])  # killed mid-write
    out = tmp_path / "merged.json"
    targets.main([str(run), "--out", str(out)])
    assert "targets: skipping step.json: not readable JSON" in capsys.readouterr().err
    merged = json.loads(out.read_text())
    assert set(merged["results"]) == {"loss"} and merged["run"]["unreadable"][0].startswith("step.json: ")
    assert any(r["met"] for r in merged["targets"])  # the loss rows still count


def test_write_json_replaces_the_file_whole(tmp_path, monkeypatch):
    """A benchmark killed while writing its JSON (a step's timeout) leaves the previous complete
    file: the rows go to a temporary file that then replaces it."""
    import common
    import torch

    path = tmp_path / "rows.json"
    common.write_json([{"a": 1}], path, "x", torch.device("cpu"))

    def killed(src, dst):
        raise KeyboardInterrupt  # the signal arrives between the write and the rename

    monkeypatch.setattr(common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        common.write_json([{"a": 1}, {"b": 2}], path, "x", torch.device("cpu"))
    assert json.loads(path.read_text()) == [{"a": 1}] and [f.name for f in tmp_path.iterdir()] == ["rows.json"]
    monkeypatch.undo()
    common.write_json([{"a": 1}, {"b": 2}], path, "x", torch.device("cpu"))
    assert json.loads(path.read_text()) == [{"a": 1}, {"b": 2}]


# ----------------------------------------------------------------------------- the order benchmarks measure in


def test_bench_loss_runs_provider_by_provider_with_compile_last(tmp_path):
    """Providers are the outer loop (every shape), torch.compile last whatever its place: a run cut
    off at its deadline loses compile rows only. The CPU smoke mode writes the rows in that order."""
    import bench_loss

    order = [c[0] for c in bench_loss.cases(["compile", "triton", "eager"], ["voc", "cityscapes"], ["bf16"],
                                            ["nchw", "channels_last"], ["fwd+bwd"])]
    assert order == ["triton"] * 4 + ["eager"] * 4 + ["compile"] * 4
    flat = list(bench_loss.cases(["triton[flat]"], ["voc"], ["bf16"], ["nchw", "channels_last"], ["fwd+bwd"]))
    assert [c[3] for c in flat] == ["channels_last"]
    rows = bench_loss.main(["--device", "cpu", "--shape", "1,5,9,11", "--providers", "torch,eager", "--dtypes", "fp32,bf16",
                            "--layouts", "nchw", "--modes", "fwd", "--reps", "1", "--json", str(tmp_path / "l.json")])
    saved = json.loads((tmp_path / "l.json").read_text())
    assert [(r["provider"], r["dtype"]) for r in saved] == [("torch", "fp32"), ("torch", "bf16"), ("eager", "fp32"),
                                                            ("eager", "bf16")]
    assert all(r["speedup_vs_eager"] > 0 for r in saved) and len(rows) == 4


def test_bench_step_runs_the_variants_in_the_order_given():
    """--variants reference,+cuda_graph,... (run_gpu.sh): the headline row second, each variant
    still with the ladder's settings up to it; the ratios and the schedule row follow every row."""
    import bench_step
    import torch

    gpu = torch.device("cuda")  # the ladder only: nothing runs
    ladder = bench_step.variants(gpu, False)
    order = bench_step.run_order(ladder, "reference,+cuda_graph,+channels_last,+bf16", gpu)
    assert [name for _, name, _ in order] == ["reference", "+cuda_graph", "+channels_last", "+bf16"]
    index = {name: i for i, (name, _) in enumerate(ladder)}
    assert [i for i, _, _ in order] == [index[n] for _, n, _ in order]
    graph = dict(order[1][2])
    assert graph["cuda_graph"] and graph["amp"] == "bf16" and graph["fused_upsample"] and graph["channels_last"]
    assert [n for _, n, _ in bench_step.run_order(ladder, None, gpu)] == list(index)
    cpu = bench_step.run_order(bench_step.variants(torch.device("cpu"), False), "+cuda_graph,reference",
                               torch.device("cpu"))
    assert [n for _, n, _ in cpu] == ["reference"]  # +cuda_graph is a GPU variant: left out, saying so
    with pytest.raises(ValueError, match="--variants '\\+cuda_grpah': expected some of reference"):  # a ConfigError
        bench_step.run_order(ladder, "+cuda_grpah", gpu)
    rows = [dict(ENV, variant="reference", ladder_index=0, median_ms=400.0, peak_mb=1000.0),
            dict(ENV, variant="+cuda_graph", ladder_index=index["+cuda_graph"], median_ms=80.0, peak_mb=500.0)]
    out = bench_step.with_ratios(rows, ENV, "voc_r50_1-8_cutmix", gpu=True)
    assert [r["speedup"] for r in out[:2]] == [1.0, 5.0] and out[1]["memory_fraction"] == 0.5
    sched = out[-1]
    assert sched["variant"] == "schedule_hours" and sched["from_variant"] == "+cuda_graph" and sched["step_ms"] == 80.0
    assert bench_step.with_ratios(rows[:1], ENV, "voc_r50_1-8_cutmix", gpu=False) == rows[:1]


def test_failed_variants_are_not_taken_for_the_engine():
    step = step_rows()
    step.insert(2, dict(ENV, variant="+broken", error="RuntimeError: boom"))
    rows = targets.evaluate({"step": step})
    assert by_target(rows, "step: x reference images/s")[0]["case"] == "+cuda_graph vs reference"


def test_upsample_targets_from_ratios_or_rows():
    key = dict(ENV, shape_name="voc", dtype="bf16", mode="fwd+bwd")
    rows = [dict(key, layout="nchw", provider="fused", median_ms=1.0, peak_mb=100.0, speedup_vs_unfused=3.5,
                 memory_vs_unfused=0.4),
            dict(key, layout="nchw", provider="unfused", median_ms=3.5, peak_mb=250.0),
            # a run stopped before the ratios were added: read off the rows
            dict(key, layout="channels_last", provider="fused", median_ms=2.0, peak_mb=300.0),
            dict(key, layout="channels_last", provider="unfused", median_ms=5.0, peak_mb=250.0)]
    got = by_target(targets.upsample_targets({"upsample": rows}), "upsample: x upsample + fused loss")
    assert [(r["case"], r["value"], r["met"]) for r in got] == [("voc bf16 nchw", 3.5, True),
                                                               ("voc bf16 channels_last", 2.5, False)]
    mem = by_target(targets.upsample_targets({"upsample": rows}), "upsample: peak memory of unfused")
    assert [(r["value"], r["met"]) for r in mem] == [(0.4, True), (1.2, False)]


def test_merge_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.json").write_text(json.dumps(loss_rows()))
    (run / "step.json").write_text(json.dumps(step_rows()))
    (run / "steps.tsv").write_text("loss\texit 1 in 3s\t2026-11-24T10:00:00\nloss\tok in 50s\t2026-11-24T10:05:00\n")
    (run / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_loss" name="test_a"/>'
        '<testcase classname="tests.test_loss" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_loss" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    out = tmp_path / "merged.json"
    first = targets.main([str(run), "--out", str(out), "--info", "budget_s=560"])
    merged = json.loads(out.read_text())
    assert merged["device"] == ENV["device"]
    assert merged["run"]["steps"] == {"loss": {"outcome": "ok in 50s", "at": "2026-11-24T10:05:00"}}
    assert merged["run"]["tests"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1,
                                      "failed": ["tests.test_loss::test_b"]}
    assert merged["run"]["budget_s"] == "560"
    assert set(merged["results"]) == {"loss", "step"}
    assert targets.main([str(out)]) == first
    assert "NVIDIA H100" in capsys.readouterr().out


def test_not_a_merged_file(tmp_path):
    bad = tmp_path / "rows.json"
    bad.write_text("[]")
    with pytest.raises(SystemExit, match="not a merged run file"):
        targets.load(bad)


def test_run_tests_merges_files_and_names_what_did_not_finish(tmp_path, capsys):
    """benchmarks/run_tests.py (run_gpu.sh's tests step): one pytest per file, a deadline that
    interrupts a running file (its finished tests kept) and names a file never started."""
    import run_tests

    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    (tests / "test_b.py").write_text("import time\n\ndef test_first():\n    pass\n\n"
                                     "def test_sleeps():\n    time.sleep(120)\n")
    (tests / "test_c.py").write_text("def test_never():\n    pass\n")
    junit = tmp_path / "out" / "tests.xml"
    rc = run_tests.main(["--junit", str(junit), "--jobs", "1", "--deadline", "12", "--tests", str(tests)])
    out = capsys.readouterr().out
    assert rc == 1
    s = run_tests.summarise(junit)
    assert "tests.test_a::test_bad" in s["failed"]
    assert "test_b.py::(the file's run)" in s["failed"] and "test_c.py::(the file's run)" in s["failed"]
    assert "interrupted at the deadline" in out and "not started: the 12 s deadline came first" in out
    merged = targets.collect_run(junit.parent)["tests"]
    assert merged["files"]["test_a.py"].startswith("exit 1 ")
    assert merged["files"]["test_b.py"].startswith("interrupted")
    assert merged["tests"] == s["tests"] and merged["failed"] == s["failed"]
    # test_b's finished test is kept from its interrupted run
    assert '"tests.test_b" name="test_first"' in junit.read_text()
    # a run in which everything passes
    rc = run_tests.main(["--junit", str(junit), "--jobs", "3", "--tests", str(tests), "--", "-k", "not sleeps and ok or never or first"])
    assert rc == 0, capsys.readouterr().out
    assert run_tests.summarise(junit)["failed"] == []


def test_run_tests_takes_a_file_with_nothing_selected_for_nothing_to_run(tmp_path, capsys):
    """run_gpu.sh passes ``-m gpu``: most files then select nothing (pytest's exit 5), which is
    not a failure; a failing test next to them still is."""
    import run_tests

    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_gpu.py").write_text("def test_gpu_kernel():\n    pass\n")
    (tests / "test_cpu.py").write_text("def test_cpu_only():\n    pass\n")
    junit = tmp_path / "out" / "tests.xml"
    assert run_tests.main(["--junit", str(junit), "--jobs", "2", "--tests", str(tests), "--", "-k", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "---- test_cpu.py: nothing selected (exit 5)" in out, out
    s = run_tests.summarise(junit)
    assert s["failed"] == [] and s["tests"] == 1, s
    assert targets.collect_run(junit.parent)["tests"]["files"]["test_cpu.py"].startswith("nothing selected")
    (tests / "test_gpu.py").write_text("def test_gpu_kernel():\n    assert False\n")
    assert run_tests.main(["--junit", str(junit), "--jobs", "2", "--tests", str(tests), "--", "-k", "gpu"]) == 1
    assert run_tests.summarise(junit)["failed"] == ["tests.test_gpu::test_gpu_kernel"]


def test_run_tests_shards_the_longest_files(monkeypatch):
    import conftest
    import run_tests

    units = run_tests.ordered_units(Path(__file__).parent, run_tests.SHARDS)
    names = [u.name for u in units]
    assert names[:3] == ["test_fused_ops.py[0/3]", "test_fused_ops.py[1/3]", "test_fused_ops.py[2/3]"]
    assert len(set(u.stem for u in units)) == len(units) and "test_targets.py" in names
    # every shard of the CUDA-heavy files starts in the first wave of the GPU machine's 16 processes
    assert sum(run_tests.SHARDS.values()) <= 16
    assert {"test_swept_configs.py[2/3]", "test_upsample_loss.py[1/2]"} <= set(names[:16]), names[:16]
    # contiguous blocks in collection order (one dtype or layout per shard, its kernels compiled once)
    items = list(range(10))
    shards = []
    for i in range(3):
        monkeypatch.setenv("CPS_FAST_TEST_SHARD", f"{i}/3")
        kept, dropped = conftest._shard(items)
        assert sorted(kept + dropped) == items
        shards.append(kept)
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    monkeypatch.setenv("CPS_FAST_TEST_SHARD", "2/3")
    assert conftest._shard([1]) == ([1], [])  # fewer tests than shards: the others select nothing
    monkeypatch.setenv("CPS_FAST_TEST_SHARD", "3/3")
    with pytest.raises(pytest.UsageError, match="CPS_FAST_TEST_SHARD='3/3'"):
        conftest._shard(items)
