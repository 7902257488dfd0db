"""The one mechanism behind every fused loss: checks, backend choice, custom op, autograd Function.

:func:`cps_fast.cps_loss`, :func:`cps_fast.ncps_loss` and :func:`cps_fast.cps_loss_upsampled`
each check their arguments (naming them as the user did) and hand over to :func:`run`, with the
:class:`Kernel` that computes them. A kernel family supplies only what differs between the ops:

* its launchers, one per backend that implements it, each called as
  ``launch(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config)`` and returning the
  float32 sums the op's module docstring defines (``xs``/``gs``: the kernel's views of the logits and
  of the gradient outputs; ``t2``, ``ys``: ``(N, L)`` labels or None; ``counts``: the valid-label
  counts, computed here before the launch);
* the view its kernels read (``(N, C, L)`` for the pixel-wise losses, the logits themselves for the
  upsample-fused one) and how many full-resolution pixels a None pseudo label covers;
* how the loss, ``sup`` and ``cps`` follow from the sums and counts;
* limits of a backend beyond :func:`cps_fast.backends.why_unavailable` (the kernel's class tile, its
  branch slots, an extension built before the op existed).

Everything else is here, once: the input checks the ops share, one backend selection (an automatic
choice falls back and logs once per op and device; an explicit one raises
:class:`~cps_fast.backends.BackendUnavailable` with the reason), one ``torch.library`` custom op per
kernel family with its fake (so ``torch.compile`` traces through), and one autograd Function whose
forward launches the kernel, which writes the loss sums and every gradient in one pass, and whose
backward only scales the stored gradients by ``grad_output`` on the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from . import backends

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)

# Tests set this (the ``poison_outputs`` marker, tests/conftest.py) to fill kernel outputs with NaN
# before a kernel runs, so an element a kernel forgets to write fails the comparison.
POISON_OUTPUTS = False


# ----------------------------------------------------------------------------- checks


def check_logits(op: str, named_logits, dims, expected: str, same_shape: str) -> int:
    """Check each ``(name, logits)``: a float tensor with ``dim()`` in ``dims`` (else "expected
    ``expected``"); all of one shape (else ``same_shape``), dtype and device; C >= 2. Returns C."""
    for name, x in named_logits:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {x.dtype}; expected float32, float16 or bfloat16 logits")
        if x.dim() not in dims:
            raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}; expected {expected}")
    name0, x0 = named_logits[0]
    for name, x in named_logits[1:]:
        if x.shape != x0.shape:
            raise ValueError(f"{op}: {name0} has shape {tuple(x0.shape)} but {name} has shape {tuple(x.shape)}; "
                             f"{same_shape}")
        if x.dtype != x0.dtype:
            raise TypeError(f"{op}: {name0} is {x0.dtype} but {name} is {x.dtype}; expected one dtype")
        if x.device != x0.device:
            raise ValueError(f"{op}: {name0} is on {x0.device} but {name} is on {x.device}")
    C = x0.shape[1]
    if C < 2:
        raise ValueError(f"{op}: the logits have C = {C} classes (dim 1 of {tuple(x0.shape)}); expected C >= 2")
    return C


def check_labels(op: str, named_labels, shape: tuple, logits: torch.Tensor, expected: str) -> None:
    """Check each ``(name, labels)`` that is not None: an integer tensor of ``shape`` (else
    "expected ``expected``") on the logits' device."""
    for name, y in named_labels:
        if y is None:
            continue
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(y).__name__}")
        if y.dtype not in LABEL_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {y.dtype}; expected integer labels (uint8, int32 or int64)")
        if tuple(y.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} has shape {tuple(y.shape)}; expected {expected}")
        if y.device != logits.device:
            raise ValueError(f"{op}: {name} is on {y.device} but the logits are on {logits.device}")


def check_ignore_index(op: str, ignore_index: int, C: int) -> None:
    """Raise unless ``ignore_index`` fits in int32 and is not one of the ``C`` classes."""
    if not (-(2**31) <= ignore_index < 2**31):
        raise ValueError(f"{op}: ignore_index={ignore_index} does not fit in int32")
    if 0 <= ignore_index < C:
        raise ValueError(
            f"{op}: ignore_index={ignore_index} is also a class of the C = {C} logits, so a pixel "
            f"labelled {ignore_index} is ambiguous; pass an ignore_index outside [0, {C}), e.g. -1"
        )


def validate_labels(op: str, named_labels, x: torch.Tensor, validate: bool | None, C: int, ignore_index: int) -> None:
    """Raise if a ``(name, labels)`` holds a value outside ``[0, C)`` that is not ``ignore_index``.

    ``validate=None`` means on for CPU logits ``x``, off for CUDA ones (the check reads a value back
    to the host); never while a CUDA graph is captured or under ``torch.compile``.
    """
    if validate is None:
        validate = not x.is_cuda
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if not validate or capturing or torch.compiler.is_compiling():
        return
    for name, y in named_labels:
        if y is None:
            continue
        bad = ((y < 0) | (y >= C)) & (y != ignore_index)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{op}: {name} has value {int(y[idx])} at index {idx}, outside [0, {C}) and not "
                             f"ignore_index ({ignore_index})")


# ----------------------------------------------------------------------------- views and buffers


def as_ncl(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*W) view; (P, C) -> (1, C, P) view. Copies only if H and W cannot merge."""
    if x.dim() == 2:
        return x.t().unsqueeze(0)
    return x.flatten(2)


def dense(x: torch.Tensor) -> bool:
    """Whether ``empty_like(x)`` has ``x``'s strides (NCHW, channels_last, or a transposed (P, C))."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or (
        x.dim() == 2 and x.t().is_contiguous())


def empty_like(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)  # keeps the memory format (strides) of a dense tensor
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def label_counts(t2, pseudos, C: int, ignore_index: int, numel: int, device) -> torch.Tensor:
    """float32 ``[1 + len(pseudos)]`` valid-label counts on the device: the target's (0 when None), then
    each pseudo label's (``numel`` for a None pseudo label, the argmax, which is always valid)."""

    def count(y, default):
        if y is None:
            return torch.full((), default, dtype=torch.float32, device=device)
        return ((y != ignore_index) & (y >= 0) & (y < C)).sum(dtype=torch.float32)

    return torch.stack([count(t2, 0.0)] + [count(y, float(numel)) for y in pseudos])


# ----------------------------------------------------------------------------- kernel families


def _no_limit(backend: str, C: int, K: int) -> str | None:
    return None


@dataclass(frozen=True)
class Kernel:
    """What :func:`run` needs to know of one kernel family (see the module docstring)."""

    name: str  # the custom op is cps_fast::<name>_forward (the name in profiler traces)
    op: str  # the public function, named in messages
    launchers: Mapping[str, Callable]  # backend -> launcher
    reduce: Callable  # (sums, counts, cps_weight, options) -> (loss, sup, cps)
    view: Callable = as_ncl  # logits (or a gradient output) -> the kernel's view of it
    pixels: Callable = None  # (views, options) -> pixels a None pseudo label covers; default N * L
    extension_function: str | None = None  # the cps_fast._C function the cpu/cuda launchers call
    limit: Callable = _no_limit  # (backend, C, K) -> why the backend cannot run these shapes, or None
    config_type: Callable | None = None  # () -> the Triton launcher's configuration class (imports Triton)
    describe: Callable | None = None  # backend -> how the choice is logged (default: its name)
    forward: Callable = None  # the registered custom op (set by register)


KERNELS: dict[str, Kernel] = {}


def _forward(kernel: Kernel, logits, target, pseudo, cps_weight, ignore_index, options, config, need_grad, backend):
    if need_grad and not all(dense(x) for x in logits):
        # a layout empty_like cannot reproduce (e.g. a sliced view): compute on dense copies
        logits = [x if dense(x) else x.contiguous() for x in logits]
    C = logits[0].shape[1]
    xs = [kernel.view(x) for x in logits]
    n_rows = xs[0].shape[0]
    t2 = None if target is None else target.reshape(n_rows, -1)
    ys = [None if y is None else y.reshape(n_rows, -1) for y in pseudo]
    numel = kernel.pixels(xs, options) if kernel.pixels is not None else n_rows * xs[0].shape[2]
    counts = label_counts(t2, ys, C, ignore_index, numel, logits[0].device)
    if need_grad:
        grads = [empty_like(x) for x in logits]
        gs = [kernel.view(g) for g in grads]
    else:
        grads, gs = [x.new_empty(0) for x in logits], None
    cfg = kernel.config_type()(*config) if config else None
    sums = kernel.launchers[backend](xs, t2, ys, counts, gs, cps_weight, ignore_index, options, cfg)
    return [sums, counts] + grads


def _fake(logits, target, pseudo, cps_weight, ignore_index, options, config, need_grad, backend):
    n = len(logits) + 1
    sums = logits[0].new_empty(n, dtype=torch.float32)
    counts = logits[0].new_empty(n, dtype=torch.float32)
    if not need_grad:
        return [sums, counts] + [x.new_empty(0) for x in logits]
    # empty_like keeps a dense input's strides and makes a non-dense one contiguous, as the real op
    return [sums, counts] + [torch.empty_like(x) for x in logits]


def register(kernel: Kernel) -> Kernel:
    """Register ``kernel``'s custom op ``cps_fast::<name>_forward`` (one launch:
    ``[sums, counts, *grads]``, the gradients empty when not needed) with its fake, and the kernel
    under its name. Returns the kernel with ``forward`` set."""

    def forward(logits: list[torch.Tensor], target: Optional[torch.Tensor], pseudo: list[Optional[torch.Tensor]],
                cps_weight: float, ignore_index: int, options: list[int], config: list[int], need_grad: bool,
                backend: str) -> list[torch.Tensor]:
        return _forward(kernel, logits, target, pseudo, cps_weight, ignore_index, options, config, need_grad,
                        backend)

    op = torch.library.custom_op(f"cps_fast::{kernel.name}_forward", forward, mutates_args=())
    op.register_fake(_fake)
    kernel = dataclasses.replace(kernel, forward=op)
    KERNELS[kernel.name] = kernel
    return kernel


# ----------------------------------------------------------------------------- backend choice


def why_unavailable(kernel: Kernel, backend: str, device, C: int = 2, K: int = 2) -> str | None:
    """None if ``backend`` can run ``kernel`` on ``device`` for C classes and K branches, else why not."""
    if backend in backends.BACKENDS and backend not in kernel.launchers:
        what = "CUDA C++" if backend == "cuda" else backend
        others = "', '".join(b for b in backends.BACKENDS if b in kernel.launchers)
        return f"{kernel.op} has no {what} kernel (it has '{others}')"
    reason = backends.why_unavailable(backend, device)
    if reason is not None:
        return reason
    if backend in ("cpu", "cuda") and kernel.extension_function is not None \
            and not hasattr(backends.extension(), kernel.extension_function):
        return (f"cps_fast._C has no {kernel.extension_function} (built before this op existed); rebuild it: "
                "`pip install --no-build-isolation -e .`")
    return kernel.limit(backend, C, K)




def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (1.6 s at every
    start of a process that never compiles): that decorator only sets this mark, which
    torch.compile reads when it traces a call (tests/test_fused_ops.py checks both: the mark is
    the decorator's, and the fused losses trace without graph breaks)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def select_backend(name: str, device_type: str, requested: str | None, C: int, K: int, op: str) -> str:
    """The backend that runs kernel family ``name`` for the public function ``op`` here (a constant for
    ``torch.compile``: it depends on the install and the shapes, not on tensor values); see
    :func:`cps_fast.backends.select_backend`."""
    kernel = KERNELS[name]
    return backends.select_backend(device_type, requested, op=op,
                                   why=lambda b, d: why_unavailable(kernel, b, d, C, K),
                                   describe=kernel.describe)


# ----------------------------------------------------------------------------- autograd


def _scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output in place, without a host synchronisation on CUDA."""
    if grad.is_cuda:
        if backends.triton_kernels_import_error() is None:
            from .kernels import cps_loss as triton_ops

            triton_ops.scale_(grad, grad_output)  # exits early on the device when grad_output == 1
        else:
            grad.mul_(grad_output.to(grad.dtype))
    elif float(grad_output) != 1.0:  # CPU: reading the scalar costs nothing
        grad.mul_(grad_output.to(grad.dtype))


_N_ARGS = 9  # FusedLossFunction.forward's arguments before target, pseudo and logits


class FusedLossFunction(torch.autograd.Function):
    """Forward launches the kernel once (loss sums and every gradient); backward scales the gradients.

    ``apply(name, op, backend, cps_weight, ignore_index, options, config, K, target, *pseudo, *logits)``
    (``op``: the public function, named in messages)
    with K pseudo entries (None for the argmax) and K logits; returns ``(loss, sup, cps)``, the last
    two detached. The gradients are scaled in place (so a second backward through the same graph is
    refused) except under ``torch.compile``, where a product lets the compiler fuse the scaling.
    """

    @staticmethod
    def forward(ctx, name, op, backend, cps_weight, ignore_index, options, config, K, target, *rest):
        kernel = KERNELS[name]
        pseudo, logits = list(rest[:K]), list(rest[K:])
        need_grad = any(ctx.needs_input_grad[_N_ARGS + K:])
        out = kernel.forward(logits, target, pseudo, cps_weight, ignore_index, options, config, need_grad, backend)
        sums, counts, grads = out[0], out[1], out[2:]
        loss, sup, cps = kernel.reduce(sums, counts, cps_weight, options)
        if need_grad:
            ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(sup, cps)
        ctx.used, ctx.K, ctx.op = False, K, op
        return loss, sup, cps

    @staticmethod
    def backward(ctx, grad_loss, _grad_sup, _grad_cps):
        if ctx.used:
            raise RuntimeError(
                f"{ctx.op}: backward ran twice through the same loss (retain_graph=True); the fused "
                f"loss scales its stored gradients in place, so call {ctx.op} again instead")
        ctx.used = True
        grads = list(ctx.saved_tensors)
        if torch.compiler.is_compiling():
            grads = [g * grad_loss.to(g.dtype) for g in grads]
        else:
            for g in grads:
                _scale_grad_(g, grad_loss)
        needs = ctx.needs_input_grad[_N_ARGS + ctx.K:]
        return (None,) * (_N_ARGS + ctx.K) + tuple(g if need else None for g, need in zip(grads, needs))


def run(kernel: Kernel, logits: Sequence[torch.Tensor], target, pseudo: Sequence, *, cps_weight: float,
        ignore_index: int, backend: str | None, return_parts: bool, validate: bool | None, label_names,
        options: Sequence[int] = (), kernel_config=None, op: str | None = None):
    """The entry of every fused loss once its arguments are checked: validate the labels (named as the
    user passed them, ``label_names``: the target's then each pseudo label's), choose the backend,
    launch through :class:`FusedLossFunction`. ``op``: the public function named in messages
    (default the kernel family's own)."""
    op = op or kernel.op
    x0 = logits[0]
    C, K = x0.shape[1], len(logits)
    validate_labels(op, zip(label_names, [target, *pseudo]), x0, validate, C, ignore_index)
    name = select_backend(kernel.name, x0.device.type, backend, C, K, op)
    config = []
    if kernel_config is not None:
        if name != "triton":
            raise ValueError(f"{op}: kernel_config applies to the triton backend, but the {name} backend runs")
        want = kernel.config_type()
        if not isinstance(kernel_config, want):
            raise TypeError(f"{op}: kernel_config must be a {want.__module__}.{want.__name__} for these "
                            f"inputs, got {type(kernel_config).__name__}")
        config = [int(v) for v in kernel_config]
    loss, sup, cps = FusedLossFunction.apply(kernel.name, op, name, float(cps_weight), int(ignore_index),
                                             [int(v) for v in options], config, K, target, *pseudo, *logits)
    return (loss, sup, cps) if return_parts else loss


def two_branch_reduce(sums: torch.Tensor, counts: torch.Tensor, cps_weight: float, options=()):
    """``(loss, sup, cps)`` from a two-branch kernel's sums ``[vt*(CE(a,t)+CE(b,t)), vpb*CE(a,pb),
    vpa*CE(b,pa)]`` and counts ``[t, pa, pb]``."""
    inv = 1.0 / counts.clamp_min(1.0)
    sup = sums[0] * inv[0]
    cps = sums[1] * inv[2] + sums[2] * inv[1]
    return sup + cps_weight * cps, sup, cps
