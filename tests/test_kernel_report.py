"""The Triton kernels compile for an H100 (sm_90a) without a GPU, with sane resources.

The interpreter (which the other Triton tests use here) accepts programs the GPU
compiler rejects, and says nothing of registers or load widths; this compiles the
real launches for sm_90a (benchmarks/kernel_report.py) for the three fused losses
(cps_loss, ncps_loss, cps_upsample) and checks that they do not spill and that the
CPS loss reads NCHW logits in 128-bit vectors.

The report checked is the committed one (benchmarks/results/kernel_report-sm90.json) when its rows
carry this checkout's sources key, after the script has compiled one launch of each kernel again and
found it equal to its row (``--reuse``); otherwise every launch is compiled here (two minutes on two
cores), and test_the_committed_report_is_this_checkouts says to rewrite it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("kernel_report")  # its module fixture runs once (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "kernel_report-sm90.json"
REFRESH = "TRITON_INTERPRET= python benchmarks/kernel_report.py"


def kernel_report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    proc = kernel_report("--json", out, "--reuse", COMMITTED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(run):
    return run[1]


def test_the_committed_report_is_this_checkouts(run):
    """The committed report is what these kernels compile to with the Triton that CI installs: a
    change to a kernel (or to Triton) comes with the report rewritten, so CI reuses it."""
    stdout, _ = run
    versions = {r["triton"] for r in json.loads(COMMITTED.read_text())}
    if "kernel_report: reused" not in stdout:
        import triton

        if versions != {triton.__version__}:
            pytest.skip(f"the committed report is for triton {', '.join(sorted(versions))}; this is {triton.__version__}")
        pytest.fail(f"{COMMITTED.relative_to(ROOT)} is not this checkout's: rewrite it with `{REFRESH}`\n"
                    + next(ln for ln in stdout.splitlines() if ln.startswith("kernel_report: not reusing")))


def test_a_reused_report_is_checked_against_a_fresh_compile(report, tmp_path):
    """--reuse takes a report only with this checkout's key, and only if a fresh compile of each
    kernel gives its row."""
    # another key: compiled anew (one launch, the one-pixel-high upsample), giving the committed row
    row = next(r for r in report if r["op"] == "cps_upsample" and r["shape_name"] == "h1")
    (tmp_path / "stale.json").write_text(json.dumps([dict(row, sources="0" * 16)]))
    proc = kernel_report("--ops", "cps_upsample", "--shapes", "h1", "--json", tmp_path / "out.json",
                         "--reuse", tmp_path / "stale.json")
    assert proc.returncode == 0 and "not reusing" in proc.stdout and "compiling every launch" in proc.stdout, proc.stdout
    assert json.loads((tmp_path / "out.json").read_text()) == [row]
    # this key, a row that a fresh compile contradicts: refused (the first launch, which the module's
    # run compiled already, so Triton's cache has it)
    rows = [r for r in report if r["op"] == "cps_loss" and r["shape_name"] == "voc"]
    rows[0] = dict(rows[0], regs=rows[0]["regs"] - 1)
    (tmp_path / "wrong.json").write_text(json.dumps(rows))
    proc = kernel_report("--ops", "cps_loss", "--shapes", "voc", "--json", tmp_path / "out.json",
                         "--reuse", tmp_path / "wrong.json")
    assert proc.returncode != 0 and "a fresh compile differs in regs" in proc.stderr, proc.stdout + proc.stderr


def test_every_cps_loss_variant_compiles_for_sm90(report):
    rows = [r for r in report if r["op"] == "cps_loss"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_cps_loss_tile_kernel", "_cps_loss_loop_kernel", "_cps_loss_flat_kernel"}
    assert {(r["dtype"], r["layout"]) for r in rows} == {(d, lay) for d in ("bf16", "fp32")
                                                         for lay in ("nchw", "channels_last")}
    for r in rows:
        assert r["regs"] and r["regs"] <= 255, r


def test_every_op_compiles_for_sm90(report):
    ops = {r["op"] for r in report}
    assert ops == {"cps_loss", "ncps_loss", "cps_upsample"}
    assert {r["K"] for r in report if r["op"] == "ncps_loss"} == {2, 3, 4, 8}
    assert {r["kernel"] for r in report if r["op"] == "ncps_loss"} == {"_ncps_tile_kernel", "_ncps_loop_kernel"}
    for r in report:
        assert r["regs"] and r["regs"] <= 255 and r["shared_bytes"] <= 227 * 1024, r


def test_one_pixel_high_and_wide_upsample_outputs_compile(report):
    # H or W == 1 reaches the kernel as a compile-time constant; its float conversion once did not compile
    shapes = {r["shape_name"]: r["out"] for r in report if r["op"] == "cps_upsample"}
    assert shapes["h1"] == [1, 7] and shapes["w1"] == [9, 1]


def test_kernels_do_not_spill(report):
    for r in report:
        # a few bytes of stack are tolerable (L1-resident); the old 4-warp tile spilled over 1 KB
        assert r["stack_bytes"] <= 64, f"{r['op']} {r['kernel']} {r['shape_name']} {r['dtype']} {r['layout']}: {r}"


def test_nchw_loads_are_vectorised(report):
    for r in report:
        # programs walk one image at a time, so pixels are contiguous: 128-bit loads and stores
        # (n-CPS: with 8 pixels of each branch per thread, K <= 4; 4 pixels, 64-bit, for more)
        if r["layout"] == "nchw" and (r["op"] == "cps_loss" or (r["op"] == "ncps_loss" and r["K"] <= 4
                                                                 and r["kernel"] == "_ncps_tile_kernel")):
            assert r["widest_load_bits"] == 128 and r["widest_store_bits"] == 128, r
            assert r["loads"].startswith("128x"), r


def test_channels_last_flat_kernel_is_vectorised_without_layout_moves(report):
    rows = [r for r in report if r["kernel"] == "_cps_loss_flat_kernel"]
    assert {r["shape_name"] for r in rows} == {"voc", "cityscapes", "ade"} and {r["layout"] for r in rows} == {"channels_last"}
    for r in rows:
        # its reason to exist: 128-bit accesses where the [pixels, classes] tile of 21 classes has 16-bit ones
        assert r["loads"].startswith("128x") and r["stores"].startswith("128x"), r
        if r["shape"][1] > 32:
            continue  # 256-class tiles span warps: cross-warp reductions dominate the count in both kernels
        # barriers: the tile kernel's (the program's sums) plus 4 gathers at 2 each; without
        # _pin_layout's anchor, voc had 29 against the tile's 5 (per-pixel vectors moved between
        # layouts through shared memory)
        tile = next(t for t in report if t["kernel"] == "_cps_loss_tile_kernel"
                    and all(t[k] == r[k] for k in ("shape_name", "dtype", "layout")))
        assert r["barriers"] <= tile["barriers"] + 8, (r, tile)


def test_upsample_loop_is_counted(report):
    # the upsample-fused kernel is issue-bound: its report counts the main loop's SASS instructions and
    # the warp-instructions per full-resolution pixel (benchmarks/NOTES.md compares configurations by it)
    for r in report:
        if r["op"] == "cps_upsample":
            assert r["loop_instructions"] > 100, r
            block_f, warps = r["constexprs"]["BLOCK_F"], r["num_warps"]
            assert r["loop_instructions_per_pixel"] == round(r["loop_instructions"] * warps / block_f, 1), r
