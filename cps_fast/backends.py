"""Capability flags and the backend registry of the fused ops.

Backends, in order of preference for a device:

* ``triton`` - the Triton kernels in :mod:`cps_fast.kernels` (CUDA tensors; CPU
  tensors too when ``TRITON_INTERPRET=1`` was set before Triton was imported);
* ``cuda``   - the CUDA C++ kernels of the extension ``cps_fast._C``;
* ``cpu``    - the C++ kernels of the extension on CPU tensors;
* ``torch``  - the pure-PyTorch reference (:mod:`cps_fast.reference`), anywhere.

An automatic choice falls back down that list and logs one line saying which
backend it chose and why; an explicit choice (``backend=`` or the environment
variable ``CPS_FAST_BACKEND``) that cannot run raises :class:`BackendUnavailable`
with the reason.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from .errors import UserError

log = logging.getLogger("cps_fast")

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "CPS_FAST_BACKEND"


class BackendUnavailable(UserError, RuntimeError):
    """A backend that was asked for by name cannot run here."""


@functools.lru_cache(maxsize=None)
def triton_interpret() -> bool:
    """True when Triton runs in its interpreter (kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton imports, otherwise the reason it does not."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install
        return f"triton does not import ({type(exc).__name__}: {exc})"
    return None


_TRITON_KERNEL_MODULES = ("cps_fast.kernels.cps_loss", "cps_fast.kernels.ncps_loss", "cps_fast.kernels.cps_upsample")


@functools.lru_cache(maxsize=None)
def triton_kernels_import_error() -> str | None:
    """None when Triton and the package's Triton kernels (:mod:`cps_fast.kernels`) import, otherwise why not.

    The triton backend is available only when its code imports: a checkout or an install without
    the kernels, or a Triton too old for them, must not be chosen and then crash."""
    err = triton_import_error()
    if err:
        return err
    for name in _TRITON_KERNEL_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:
            return f"the Triton kernels do not import ({name}: {type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension module ``cps_fast._C``, or None (cps_fast.build: installed, or
    built into the cache by `python -m cps_fast.build` or ``CPS_FAST_JIT=1``)."""
    from . import build

    return build.current().module


@functools.lru_cache(maxsize=None)
def extension_import_error() -> str | None:
    """None when :func:`extension` has the module, otherwise the one-line reason it does not."""
    from . import build

    return build.current().error


def extension_has_cuda() -> bool:
    ext = extension()
    return ext is not None and bool(ext.has_cuda())


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run on ``device``, otherwise why it cannot."""
    device = torch.device(device)
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
    if name == "torch":
        return None
    if name == "triton":
        err = triton_kernels_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        if device.type == "cpu":
            return "triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before importing triton)"
        return f"triton does not run on {device.type} tensors"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        err = extension_import_error()
        if err:
            return err
        if not extension_has_cuda():
            return "cps_fast._C was built without CUDA (CPU-only torch, no nvcc, or CPS_FAST_SKIP_CUDA_BUILD=1)"
        return None
    # name == "cpu"
    if device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got {device.type} tensors"
    return extension_import_error()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU), best first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


# On the CPU the interpreted Triton kernels are correct but slow; prefer C++ there.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_logged: set[tuple[str, str, str]] = set()


def select_backend(device: torch.device | str, requested: str | None = None, *, op: str = "cps_loss",
                   why=None, describe=None) -> str:
    """Pick the backend that runs ``op`` on tensors on ``device``: the one way every fused op chooses.

    ``requested`` (or ``$CPS_FAST_BACKEND`` when it is None) forces one and raises
    :class:`BackendUnavailable` with the reason if it cannot run; otherwise the best available one
    is chosen, falling back down the list, and the choice is logged once per op and device.
    ``why(name, device)``: why a backend cannot run this op (default :func:`why_unavailable`, the
    install's capabilities; the fused ops add their kernels' limits); ``describe(name)``: the name
    the log line gives the choice.
    """
    device = torch.device(device)
    why = why or why_unavailable
    source = "backend="
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR].strip().lower(), f"${ENV_VAR}="
    if requested is not None and requested != "auto":
        reason = why(requested, device)
        if reason is not None:
            raise BackendUnavailable(f"{op}: {source}{requested!r} cannot run on {device.type} tensors: {reason}")
        return requested
    skipped = []
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        reason = why(name, device)
        if reason is None:
            key = (op, device.type, name)
            if key not in _logged:
                _logged.add(key)
                note = f" ({'; '.join(skipped)})" if skipped else ""
                what = describe(name) if describe is not None else name
                log.info("cps_fast: %s uses the %s backend for %s tensors%s", op, what, device.type, note)
            return name
        skipped.append(f"{name}: {reason}")
    return "torch"
