"""A source checkout imports its own kernels, and the triton backend is offered only when they import.

Each case copies the checkout's ``cps_fast/`` (and ``kernels/`` where the case wants it) into a
temporary folder and imports it there in a fresh interpreter, with the import hooks of any editable
install removed (they would answer ``cps_fast.kernels`` with another checkout's files).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import cps_fast, torch
from cps_fast import backends
out = {"package": cps_fast.__file__, "why_triton": backends.why_unavailable("triton", "cpu"),
       "available": backends.available_backends("cpu")}
if out["why_triton"] is None:
    import cps_fast.kernels
    out["kernels"] = cps_fast.kernels.__file__
    a = torch.randn(2, 5, 3, 4)
    out["loss"] = float(cps_fast.cps_loss(a, a.flip(0), backend="triton"))
    out["ref"] = float(cps_fast.cps_loss(a, a.flip(0), backend="torch"))
print(json.dumps(out))
"""


def _checkout(tmp_path: Path, with_kernels: bool) -> Path:
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "cps_fast", root / "cps_fast", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    if with_kernels:
        shutil.copytree(ROOT / "kernels", root / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _probe(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("with_kernels", [True, False], ids=["kernels", "no-kernels"])
def test_a_checkout_imports_its_own_kernels(tmp_path, with_kernels):
    root = _checkout(tmp_path, with_kernels)
    out = _probe(root)
    assert Path(out["package"]).resolve() == (root / "cps_fast" / "__init__.py").resolve()
    if with_kernels:
        assert out["why_triton"] is None and "triton" in out["available"], out
        assert Path(out["kernels"]).resolve() == (root / "kernels" / "__init__.py").resolve(), out
        assert abs(out["loss"] - out["ref"]) <= 1e-5 * max(1.0, abs(out["ref"])), out
    else:  # honest availability: the automatic choice can never pick a backend whose code is missing
        assert "triton" not in out["available"], out
        assert out["why_triton"].startswith("the Triton kernels do not import (cps_fast.kernels"), out
