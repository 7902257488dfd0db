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
    assert names[:3] == ["test_loss.py[0/3]", "test_loss.py[1/3]", "test_loss.py[2/3]"]
    assert len(set(u.stem for u in units)) == len(units) and "test_targets.py" in names
    items = list(range(10))
    monkeypatch.setenv("CPS_FAST_TEST_SHARD", "1/3")
    kept, dropped = conftest._shard(items)
    assert kept == [1, 4, 7] and sorted(kept + dropped) == items
    monkeypatch.setenv("CPS_FAST_TEST_SHARD", "3/3")
    with pytest.raises(pytest.UsageError, match="CPS_FAST_TEST_SHARD='3/3'"):
        conftest._shard(items)
