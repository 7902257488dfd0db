"""Test setup: Triton runs in its interpreter on machines without CUDA; GPU tests select themselves.

TRITON_INTERPRET must be set before Triton is imported, so this happens at the
top of the first conftest, before any test module imports cps_fast.

Every test that runs CUDA tensors carries the ``gpu`` mark, so ``pytest -m gpu`` on a GPU
machine runs exactly them (benchmarks/run_gpu.sh's tests step) and CI's CPU-only machines
skip them: tests marked by hand, and every test with a device parameter set to ``cuda``
(the loss suites' ``device`` column, which holds ``cuda`` only where a GPU is present).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def _shard(items):
    """CPS_FAST_TEST_SHARD="i/n" keeps every n-th collected test from the i-th (0-based); the GPU run
    (benchmarks/run_tests.py) splits its longest files into shards run side by side."""
    spec = os.environ.get("CPS_FAST_TEST_SHARD")
    if not spec:
        return items, []
    try:
        i, n = (int(v) for v in spec.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"CPS_FAST_TEST_SHARD={spec!r}: expected i/n with 0 <= i < n, e.g. 0/3") from None
    return [t for k, t in enumerate(items) if k % n == i], [t for k, t in enumerate(items) if k % n != i]


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def pytest_itemcollected(item):
    """Marks ``gpu`` a test parametrised with a CUDA device (a parameter whose name contains
    "device"), before ``-m`` selects: without the mark, ``-m gpu`` on a GPU machine would
    leave out exactly the CUDA cases of the CPU-and-CUDA suites."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "gpu" not in item.keywords and any("device" in name and _is_cuda(v) for name, v in params.items()):
        item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(trylast=True)  # after -m and -k deselect: shards split the tests that will run
def pytest_collection_modifyitems(config, items):
    items[:], dropped = _shard(items)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
