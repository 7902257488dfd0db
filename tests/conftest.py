"""Test setup: Triton runs in its interpreter on machines without CUDA; GPU tests select themselves.

TRITON_INTERPRET must be set before Triton is imported, so this happens at the
top of the first conftest, before any test module imports cps_fast.

Every test that runs CUDA tensors carries the ``gpu`` mark, so ``pytest -m gpu`` on a GPU
machine runs exactly them (benchmarks/run_gpu.sh's tests step) and CI's CPU-only machines
skip them: tests marked by hand, and every test parametrised onto the GPU (:func:`_needs_gpu`:
the loss suites' ``device`` column, which holds ``cuda`` only where a GPU is present, a ``cuda``
backend, DALI's ``dali-gpu``).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # pytest -n N (pytest-xdist; the README's test command): N processes share the cores, so each
    # takes its share of intra-op threads, and so do the processes its tests start (torchrun, the
    # CLI). Oversubscribed OpenMP threads spin-wait: two workers at torch's default thread count
    # took longer than one pytest.
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "poison_outputs: fill kernel outputs with NaN before each launch")
    # pytest-xdist's (registered here too, so a run without it does not warn): under --dist loadgroup
    # the tests of one group run in one worker, so a module fixture that trains or compiles runs once
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one pytest-xdist worker")


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch):
    """CPS_FAST_TRACEBACK=1 (a developer's setting) makes user errors tracebacks: off in tests,
    which check the one-line messages; a test that wants it sets it."""
    monkeypatch.delenv("CPS_FAST_TRACEBACK", raising=False)


@pytest.fixture(autouse=True)
def _poison_outputs(request, monkeypatch):
    """In tests marked ``poison_outputs`` (the fused-loss suites' ``pytestmark``), every kernel
    output is filled with NaN before the launch, so an element a kernel forgets to write fails."""
    if request.node.get_closest_marker("poison_outputs") is not None:
        from cps_fast import fused

        monkeypatch.setattr(fused, "POISON_OUTPUTS", True)


def _shard(items):
    """CPS_FAST_TEST_SHARD="i/n" keeps the i-th (0-based) of n contiguous blocks of the collected
    tests, as equal in count as can be; the GPU run (benchmarks/run_tests.py) splits its longest
    files into shards run side by side. Contiguous, in collection order, because pytest varies the
    first parameter of a test's id slowest (the dtype, the layout): a block then holds one or two of
    its values, and compiles their Triton kernels once, where every n-th test would have every shard
    compile nearly every kernel (Triton's cache is shared only once a build has finished)."""
    spec = os.environ.get("CPS_FAST_TEST_SHARD")
    if not spec:
        return items, []
    try:
        i, n = (int(v) for v in spec.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"CPS_FAST_TEST_SHARD={spec!r}: expected i/n with 0 <= i < n, e.g. 0/3") from None
    lo, hi = i * len(items) // n, (i + 1) * len(items) // n
    return items[lo:hi], items[:lo] + items[hi:]


GPU_ONLY_VALUES = ("dali-gpu",)  # parameter values that run on a GPU whatever else is given


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def _needs_gpu(params: dict) -> bool:
    """Whether a test's parameters put it on the GPU: a parameter whose name contains "device" is
    CUDA; or a value is a GPU-only backend (``dali-gpu``); or, where no device parameter says
    otherwise, a value is ``cuda`` or a CUDA device (``backend="cuda"``: the CUDA extension)."""
    devices = [v for name, v in params.items() if "device" in name]
    if any(_is_cuda(v) for v in devices):
        return True
    if any(isinstance(v, str) and v in GPU_ONLY_VALUES for v in params.values()):
        return True
    return not devices and any(_is_cuda(v) for v in params.values())


def pytest_itemcollected(item):
    """Marks ``gpu`` a test parametrised onto the GPU (:func:`_needs_gpu`), before ``-m`` selects:
    without the mark, ``-m gpu`` on a GPU machine would leave out exactly the CUDA cases of the
    CPU-and-CUDA suites (and DALI's dali-gpu ones)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "gpu" not in item.keywords and _needs_gpu(params):
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
