"""The test suite in parallel pytest processes, one per test file or shard, under one deadline.

run_gpu.sh's `tests` step, with ``-- -m gpu`` (the CPU-only tests are CI's). The GPU machine has
pytest but no pytest-xdist or pytest-timeout (../shared/GPU.md), and one pytest process would not
get through the GPU tests' Triton builds inside the step's cap. So this starts one pytest per file
(the files with the most CUDA work first, split into shards: contiguous blocks of their selected
tests, through tests/conftest.py's CPS_FAST_TEST_SHARD=i/n, so that each shard owns a dtype or a
layout and compiles its Triton kernels alone), JOBS at a time, sharing the GPU and Triton's cache. At the
deadline every pytest still running gets SIGINT, which makes it stop and still write its JUnit
report; files not started by then are named. The reports are merged into one JUnit file (a
<testsuites> of one <testsuite> per file or shard), each one's output is printed in turn, and a
table last. A file or shard in which PYTEST_ARGS select nothing (pytest's exit 5; with -m gpu
most files) had nothing to run: that is not a failure.

    python benchmarks/run_tests.py --junit tests.xml [--jobs 16] [--deadline 190] [-- PYTEST_ARGS]

Exit status: 0 when every file ran and passed or had nothing selected, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the files with the most CUDA work (Triton builds, graphs, the step) start first
FIRST = ("test_fused_ops.py", "test_gpu_step.py", "test_gpu_dali.py", "test_loss.py", "test_ncps_loss.py",
         "test_upsample_loss.py", "test_swept_configs.py", "test_csrc.py", "test_profiling.py", "test_ohem.py",
         "test_upsample_cpu_kernel.py", "test_data.py", "test_eval.py", "test_kernel_report.py", "test_models.py",
         "test_train.py")


# the files with the most CUDA tests, in shards run side by side (conftest.py shards the tests
# that -m and -k selected, so every shard gets a share of the GPU tests): 15 processes, all in the
# first wave of the GPU machine's 16 (the op files' shared contracts are test_fused_ops.py's)
SHARDS = {"test_fused_ops.py": 3, "test_gpu_step.py": 3, "test_loss.py": 2, "test_ncps_loss.py": 2,
          "test_upsample_loss.py": 2, "test_swept_configs.py": 3}

NOTHING_SELECTED = 5  # pytest's exit status when the arguments select no test in a file


class Unit:
    """One pytest process: a test file, or shard ``i`` of ``n`` of it."""

    def __init__(self, path: Path, i: int = 0, n: int = 1):
        self.path, self.i, self.n = path, i, n
        self.name = path.name if n == 1 else f"{path.name}[{i}/{n}]"
        self.stem = path.stem if n == 1 else f"{path.stem}-{i}of{n}"


def ordered_units(tests_dir: Path, shards: dict[str, int]) -> list[Unit]:
    files = sorted(tests_dir.glob("test_*.py"))
    rank = {name: i for i, name in enumerate(FIRST)}
    files = sorted(files, key=lambda f: (rank.get(f.name, len(FIRST)), f.name))
    return [Unit(f, i, shards.get(f.name, 1)) for f in files for i in range(shards.get(f.name, 1))]


def summarise(xml_path: Path) -> dict:
    """Counts and failed test ids of one pytest JUnit report (empty counts if it is missing or cut off)."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return out
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(suite.get(k, 0))
        out["failed"] += [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                          if c.find("failure") is not None or c.find("error") is not None]
    return out


def merge(reports: list[tuple[str, Path | None, str]], dest: Path) -> None:
    """One <testsuites> file from per-file reports; ``reports``: (file, its report or None, outcome)."""
    root = ET.Element("testsuites")
    for name, path, outcome in reports:
        suite = None
        if path is not None:
            try:
                got = ET.parse(path).getroot()
                suite = got if got.tag == "testsuite" else got.find("testsuite")
            except (OSError, ET.ParseError):
                suite = None
        if suite is None:  # never started, or killed before writing its report
            suite = ET.Element("testsuite", name=name, tests="0", failures="0", errors="0", skipped="0")
        if not outcome.startswith(("exit 0 ", "exit 1 ", "nothing selected")):  # not a finished run: say so
            case = ET.SubElement(suite, "testcase", classname=name, name="(the file's run)")
            ET.SubElement(case, "error", message=outcome)
            for k in ("tests", "errors"):
                suite.set(k, str(int(suite.get(k, 0)) + 1))
        suite.set("file", name)
        suite.set("outcome", outcome)
        root.append(suite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--junit", required=True, help="the merged JUnit report to write")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="pytest processes at a time (default: one per core)")
    p.add_argument("--deadline", type=float, default=190.0, help="seconds until running files are interrupted")
    p.add_argument("--tests", default=str(ROOT / "tests"), help="the tests folder (default: the project's)")
    p.add_argument("--grace", type=float, default=20.0, help="seconds an interrupted pytest gets to write its report")
    p.add_argument("--no-shards", action="store_true", help="one process per file, whatever its length")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"run_tests: --jobs {args.jobs}: expected 1 or more")
    tests_dir = Path(args.tests)
    units = ordered_units(tests_dir, {} if args.no_shards else SHARDS)
    if not units:
        raise SystemExit(f"run_tests: no test_*.py files in {tests_dir}")
    work = Path(args.junit).resolve().parent / "tests-by-file"
    work.mkdir(parents=True, exist_ok=True)
    for f in units:  # an earlier run's reports must not stand in for this one's
        for stale in (work / f"{f.stem}.xml", work / f"{f.stem}.log"):
            stale.unlink(missing_ok=True)
    start = time.monotonic()
    deadline = start + args.deadline
    pending = list(units)
    running: dict[Unit, tuple[subprocess.Popen, float]] = {}
    outcome: dict[Unit, str] = {}
    interrupted = False
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the CPU tests of --jobs processes share the cores: torch's default (every core each) oversubscribes
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    env.pop("CPS_FAST_TEST_SHARD", None)  # set per shard below, never inherited
    while pending or running:
        now = time.monotonic()
        if now >= deadline and not interrupted:
            interrupted = True
            for f, (proc, _) in running.items():
                proc.send_signal(signal.SIGINT)
            for f in pending:
                outcome[f] = f"not started: the {args.deadline:.0f} s deadline came first"
            pending = []
        while pending and len(running) < args.jobs and not interrupted:
            f = pending.pop(0)
            log = open(work / f"{f.stem}.log", "w")
            cmd = [sys.executable, "-m", "pytest", "-q", str(f.path), "-p", "no:cacheprovider", "-rfEs",
                   "--junitxml", str(work / f"{f.stem}.xml"), *extra]
            shard_env = dict(env, CPS_FAST_TEST_SHARD=f"{f.i}/{f.n}") if f.n > 1 else env
            running[f] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tests_dir.parent,
                                           env=shard_env), time.monotonic())
            log.close()
        for f, (proc, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None and interrupted and time.monotonic() > deadline + args.grace:
                proc.kill()
                rc = proc.wait()
            if rc is not None:
                secs = time.monotonic() - t0
                if interrupted and f not in outcome and rc not in (0, NOTHING_SELECTED):
                    outcome[f] = f"interrupted at the deadline after {secs:.0f} s (exit {rc})"
                elif rc == NOTHING_SELECTED:
                    outcome.setdefault(f, f"nothing selected (exit 5) in {secs:.0f} s")
                else:
                    outcome.setdefault(f, f"exit {rc} in {secs:.0f} s")
                del running[f]
        time.sleep(0.2)

    reports = []
    for f in units:
        xml, log = work / f"{f.stem}.xml", work / f"{f.stem}.log"
        if log.exists():
            print(f"---- {f.name}: {outcome[f]}")
            print(log.read_text().rstrip())
        reports.append((f.name, xml if xml.exists() else None, outcome[f]))
    merge(reports, Path(args.junit))
    print(f"\n{'file':<28} {'tests':>6} {'failed':>6} {'skipped':>7}  outcome")
    for suite in ET.parse(args.junit).getroot().iter("testsuite"):
        bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        print(f"{suite.get('file'):<28} {suite.get('tests'):>6} {bad:>6} {suite.get('skipped'):>7}  "
              f"{suite.get('outcome')}")
    total = summarise(Path(args.junit))
    print(f"{'all':<28} {total['tests']:>6} {total['failures'] + total['errors']:>6} {total['skipped']:>7}  "
          f"in {time.monotonic() - start:.0f} s")
    for t in total["failed"]:
        print("FAILED", t)
    ok = all(how.startswith(("exit 0 ", "nothing selected")) for how in outcome.values()) and not total["failed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
