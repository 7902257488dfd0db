"""The fused Cross Pseudo Supervision loss: autograd Function, functional API, module.

One call computes, for two branches' logits ``a`` and ``b``::

    sup  = CE(a, target) + CE(b, target)
    cps  = CE(a, pseudo_b) + CE(b, pseudo_a)       pseudo_x = argmax(x) unless given
    loss = sup + cps_weight * cps

each CE the mean over its non-ignored pixels (0, never NaN, when none is
valid). The kernels read each logits tensor once and write both gradients in
the same pass; backward only scales them by ``grad_output``, on the device.

Every backend implements one function (see :func:`_launch`)::

    sums = fwd(a3, b3, t2, pa2, pb2, counts, grad_a3, grad_b3, cps_weight, ignore_index)

* ``a3``, ``b3``: ``(N, C, L)`` views of the logits with any strides (NCHW gives
  class stride L, channels_last class stride 1); float32/float16/bfloat16.
* ``t2``, ``pa2``, ``pb2``: ``(N, L)`` integer labels (uint8/int32/int64) or None;
  None pseudo labels mean "argmax of that branch, computed in the kernel".
* ``counts``: float32 ``[3]`` on the device: valid pixels of target, pseudo_a, pseudo_b.
* ``grad_a3``, ``grad_b3``: outputs with the logits' shapes and strides, or None
  to skip the gradient. ``grad_a = dloss/da`` for ``grad_output == 1``::

      grad_a = softmax(a) * (vt / nt + w * vpb / npb) - onehot(t) * vt / nt - w * onehot(pb) * vpb / npb

  with ``v*`` the validity of that pixel's label and ``n* = max(count, 1)``.
* returns float32 ``[3]`` on the device: the sums over pixels of
  ``vt * (CE(a,t) + CE(b,t))``, ``vpb * CE(a, pb)``, ``vpa * CE(b, pa)``.

A label outside ``[0, C)`` that is not ``ignore_index`` is treated as ignored by
the kernels; :func:`cps_loss` rejects it first when ``validate`` is on.
"""
from __future__ import annotations

import torch
from torch import nn

from . import backends

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)

# Tests set this to fill kernel outputs with NaN before a kernel runs, so an
# element a kernel forgets to write fails the comparison.
POISON_OUTPUTS = False


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)  # keeps the memory format (strides) of a dense tensor
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


# ----------------------------------------------------------------------------- checks


def _check_logits(op: str, named_logits, dims, expected: str, same_shape: str) -> int:
    """Check each ``(name, logits)``: a float tensor with ``dim()`` in ``dims`` (else "expected
    ``expected``"); all of one shape (else ``same_shape``), dtype and device; C >= 2. Returns C."""
    for name, x in named_logits:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
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


def _check_labels(op: str, named_labels, shape: tuple, logits: torch.Tensor, expected: str) -> None:
    """Check each ``(name, labels)`` that is not None: an integer tensor of ``shape`` (else
    "expected ``expected``") on the logits' device."""
    for name, y in named_labels:
        if y is None:
            continue
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(y).__name__}")
        if y.dtype not in _LABEL_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {y.dtype}; expected integer labels (uint8, int32 or int64)")
        if tuple(y.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} has shape {tuple(y.shape)}; expected {expected}")
        if y.device != logits.device:
            raise ValueError(f"{op}: {name} is on {y.device} but the logits are on {logits.device}")


def _check_inputs(logits_a, logits_b, target, pseudo_a, pseudo_b, ignore_index):
    C = _check_logits("cps_loss", (("logits_a", logits_a), ("logits_b", logits_b)), (2, 4),
                      "(N, C, H, W) or (P, C) logits", "the two branches' logits must have the same shape")
    label_shape = (logits_a.shape[0],) + tuple(logits_a.shape[2:])
    _check_labels("cps_loss", (("target", target), ("pseudo_a", pseudo_a), ("pseudo_b", pseudo_b)), label_shape,
                  logits_a, f"{label_shape} to match logits of shape {tuple(logits_a.shape)}")
    _check_ignore_index("cps_loss", ignore_index, C)


def _check_ignore_index(op: str, ignore_index: int, C: int) -> None:
    """Raise unless ``ignore_index`` fits in int32 and is not one of the ``C`` classes."""
    if not (-(2**31) <= ignore_index < 2**31):
        raise ValueError(f"{op}: ignore_index={ignore_index} does not fit in int32")
    if 0 <= ignore_index < C:
        raise ValueError(
            f"{op}: ignore_index={ignore_index} is also a class of the C = {C} logits, so a pixel "
            f"labelled {ignore_index} is ambiguous; pass an ignore_index outside [0, {C}), e.g. -1"
        )


def _validate_labels(name: str, y: torch.Tensor, C: int, ignore_index: int, op: str = "cps_loss") -> None:
    """Raise if ``y`` holds a value outside [0, C) that is not ``ignore_index`` (synchronises)."""
    bad = ((y < 0) | (y >= C)) & (y != ignore_index)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        value = int(y[idx])
        raise ValueError(
            f"{op}: {name} has value {value} at index {idx}, outside [0, {C}) and not "
            f"ignore_index ({ignore_index})"
        )


def _maybe_validate_labels(op: str, named_labels, x: torch.Tensor, validate: bool | None, C: int,
                           ignore_index: int) -> None:
    """Run :func:`_validate_labels` on each ``(name, labels)`` (None skipped) when ``validate`` asks.

    ``validate=None`` means on for CPU logits ``x``, off for CUDA ones; never while a CUDA
    graph is captured or under ``torch.compile``.
    """
    if validate is None:
        validate = not x.is_cuda
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if validate and not capturing and not torch.compiler.is_compiling():
        for name, y in named_labels:
            if y is not None:
                _validate_labels(name, y, C, ignore_index, op)


# ----------------------------------------------------------------------------- dispatch


def _as_ncl(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*W) view; (P, C) -> (1, C, P) view. Copies only if H and W cannot merge."""
    if x.dim() == 2:
        return x.t().unsqueeze(0)
    v = x.flatten(2)
    return v


def _as_nl(y: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if y is None:
        return None
    return y.reshape(n, -1)


def _count_valid(y: torch.Tensor | None, C: int, ignore_index: int, default: float, device) -> torch.Tensor:
    """Number of labels in [0, C) as a float32 device scalar; ``default`` when ``y`` is None."""
    if y is None:
        return torch.full((), default, dtype=torch.float32, device=device)
    valid = (y != ignore_index) & (y >= 0) & (y < C)
    return valid.sum(dtype=torch.float32)


def _launch(backend, a3, b3, t2, pa2, pb2, counts, ga3, gb3, cps_weight, ignore_index):
    if backend == "triton":
        from .kernels import cps_loss as triton_ops

        return triton_ops.cps_loss_fwd(a3, b3, t2, pa2, pb2, counts, ga3, gb3, cps_weight, ignore_index)
    if backend in ("cuda", "cpu"):
        return backends.extension().cps_loss_forward(
            a3, b3, t2, pa2, pb2, counts, ga3, gb3, float(cps_weight), int(ignore_index)
        )
    return _torch_fwd(a3, b3, t2, pa2, pb2, counts, ga3, gb3, cps_weight, ignore_index)


def _torch_fwd(a3, b3, t2, pa2, pb2, counts, ga3, gb3, cps_weight, ignore_index):
    """The kernel contract in plain PyTorch (float32 math), for any device."""
    C = a3.shape[1]
    a, b = a3.float(), b3.float()
    log_pa = torch.log_softmax(a, dim=1)  # (N, C, L)
    log_pb = torch.log_softmax(b, dim=1)
    pa2 = a.argmax(dim=1) if pa2 is None else pa2
    pb2 = b.argmax(dim=1) if pb2 is None else pb2

    def onehot(lab):
        """(N, C, L) one-hot of the valid labels (all zero where ignored or out of range)."""
        lab = lab.long()
        valid = (lab != ignore_index) & (lab >= 0) & (lab < C)
        hot = torch.zeros_like(a).scatter_(1, torch.where(valid, lab, 0).unsqueeze(1), 1.0)
        return hot * valid.unsqueeze(1)

    hot_t = onehot(t2) if t2 is not None else torch.zeros_like(a)
    hot_pa, hot_pb = onehot(pa2), onehot(pb2)
    sums = torch.stack([
        -(hot_t * (log_pa + log_pb)).sum(),
        -(hot_pb * log_pa).sum(),
        -(hot_pa * log_pb).sum(),
    ])
    if ga3 is not None:
        inv = 1.0 / counts.clamp_min(1.0)
        w = float(cps_weight)
        # d/dx of  sum_p [ct_p * CE(x_p, y_p)] = ct_p * (softmax(x_p) - onehot(y_p))
        target_a = hot_t * inv[0] + hot_pb * (w * inv[2])
        target_b = hot_t * inv[0] + hot_pa * (w * inv[1])
        ga3.copy_(log_pa.exp() * target_a.sum(1, keepdim=True) - target_a)
        gb3.copy_(log_pb.exp() * target_b.sum(1, keepdim=True) - target_b)
    return sums


def _scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output in place, without a host synchronisation on CUDA."""
    if grad.is_cuda:
        if backends.triton_import_error() is None:
            from .kernels import cps_loss as triton_ops

            triton_ops.scale_(grad, grad_output)  # exits early on the device when grad_output == 1
        else:
            grad.mul_(grad_output.to(grad.dtype))
    elif float(grad_output) != 1.0:  # CPU: reading the scalar costs nothing
        grad.mul_(grad_output.to(grad.dtype))


def _label_counts(t2, pseudos, C: int, ignore_index: int, numel: int, device) -> torch.Tensor:
    """float32 ``[1 + len(pseudos)]`` valid-label counts: the target's, then each pseudo label's
    (``numel`` for a None pseudo label, the argmax, always valid)."""
    return torch.stack([_count_valid(t2, C, ignore_index, 0.0, device)]
                       + [_count_valid(y, C, ignore_index, float(numel), device) for y in pseudos])


def _grad_outputs(xs, need_grad: bool) -> list[torch.Tensor]:
    """Gradient buffers like each of ``xs`` (poisoned in tests), or empty tensors when not needed."""
    if need_grad:
        return [_empty_like(x) for x in xs]
    return [x.new_empty(0) for x in xs]


def _fake_outputs(xs, n_sums: int, need_grad: bool) -> list[torch.Tensor]:
    """The fake (meta) outputs ``[sums, counts, *grads]`` of a fused custom op."""
    sums = xs[0].new_empty(n_sums, dtype=torch.float32)
    counts = xs[0].new_empty(n_sums, dtype=torch.float32)
    if not need_grad:
        return [sums, counts] + [x.new_empty(0) for x in xs]
    # empty_like keeps a dense input's strides and makes a non-dense one contiguous, as the real op
    return [sums, counts] + [torch.empty_like(x) for x in xs]


def _two_branch_loss(sums: torch.Tensor, counts: torch.Tensor, cps_weight: float):
    """``(loss, sup, cps)`` from a two-branch kernel's ``sums[3]`` and ``counts[3]``."""
    inv = 1.0 / counts.clamp_min(1.0)
    sup = sums[0] * inv[0]
    cps = sums[1] * inv[2] + sums[2] * inv[1]
    return sup + cps_weight * cps, sup, cps


def _keep_grads(ctx, need_grad: bool, grads, sup: torch.Tensor, cps: torch.Tensor) -> None:
    """Forward's bookkeeping for :func:`_scaled_saved_grads`: save the gradients (when needed),
    arm the single-backward check and mark the reported parts ``sup`` and ``cps`` non-differentiable."""
    if need_grad:
        ctx.save_for_backward(*grads)
    ctx.used = False
    ctx.mark_non_differentiable(sup, cps)


def _scaled_saved_grads(ctx, grad_loss: torch.Tensor, op: str) -> list[torch.Tensor]:
    """The backward of a fused loss: its saved gradients times ``grad_loss``.

    Scales in place (so a second backward through the same graph raises) except under
    ``torch.compile``, where a product lets the compiler fuse the scaling into what follows.
    """
    if ctx.used:
        raise RuntimeError(
            f"{op}: backward ran twice through the same loss (retain_graph=True); the fused "
            f"loss scales its stored gradients in place, so call {op} again instead"
        )
    ctx.used = True
    grads = list(ctx.saved_tensors)
    if torch.compiler.is_compiling():
        return [g * grad_loss.to(g.dtype) for g in grads]
    for g in grads:
        _scale_grad_(g, grad_loss)
    return grads


@torch.library.custom_op("cps_fast::cps_loss_forward", mutates_args=())
def fused_forward(logits_a: torch.Tensor, logits_b: torch.Tensor, target: torch.Tensor | None,
                  pseudo_a: torch.Tensor | None, pseudo_b: torch.Tensor | None, cps_weight: float,
                  ignore_index: int, need_grad: bool, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One kernel launch: ``(sums[3], counts[3], grad_a, grad_b)`` (grads empty when not needed).

    Registered as a custom op so that ``torch.compile`` traces through the fused loss
    (with the fake implementation below) instead of breaking the graph.
    """
    if need_grad and not (_dense(logits_a) and _dense(logits_b)):
        # a layout empty_like cannot reproduce (e.g. a sliced view): compute on dense copies
        logits_a, logits_b = logits_a.contiguous(), logits_b.contiguous()
    C = logits_a.shape[1]
    a3, b3 = _as_ncl(logits_a), _as_ncl(logits_b)
    n_rows = a3.shape[0]
    t2, pa2, pb2 = (_as_nl(y, n_rows) for y in (target, pseudo_a, pseudo_b))
    numel = a3.shape[0] * a3.shape[2]
    counts = _label_counts(t2, (pa2, pb2), C, ignore_index, numel, logits_a.device)
    grad_a, grad_b = _grad_outputs((logits_a, logits_b), need_grad)
    ga3, gb3 = (_as_ncl(grad_a), _as_ncl(grad_b)) if need_grad else (None, None)
    sums = _launch(backend, a3, b3, t2, pa2, pb2, counts, ga3, gb3, cps_weight, ignore_index)
    return sums, counts, grad_a, grad_b


@fused_forward.register_fake
def _fused_forward_fake(logits_a, logits_b, target, pseudo_a, pseudo_b, cps_weight, ignore_index, need_grad,
                        backend):
    return tuple(_fake_outputs((logits_a, logits_b), 3, need_grad))


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or (
        x.dim() == 2 and x.t().is_contiguous())


@torch.compiler.assume_constant_result
def _select_backend(device_type: str, requested: str | None) -> str:
    # a constant for torch.compile: the choice depends on the install, not on tensor values
    return backends.select_backend(device_type, requested)


class CPSLossFunction(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, logits_a, logits_b, target, pseudo_a, pseudo_b, cps_weight, ignore_index, backend):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        sums, counts, grad_a, grad_b = fused_forward(logits_a, logits_b, target, pseudo_a, pseudo_b,
                                                     cps_weight, ignore_index, need_grad, backend)
        loss, sup, cps = _two_branch_loss(sums, counts, cps_weight)
        _keep_grads(ctx, need_grad, (grad_a, grad_b), sup, cps)
        return loss, sup, cps

    @staticmethod
    def backward(ctx, grad_loss, _grad_sup, _grad_cps):
        grad_a, grad_b = _scaled_saved_grads(ctx, grad_loss, "cps_loss")
        return (grad_a if ctx.needs_input_grad[0] else None,
                grad_b if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None)


def cps_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    pseudo_a: torch.Tensor | None = None,
    pseudo_b: torch.Tensor | None = None,
    cps_weight: float = 1.0,
    ignore_index: int = 255,
    backend: str | None = None,
    return_parts: bool = False,
    validate: bool | None = None,
):
    """Fused Cross Pseudo Supervision loss of two branches.

    Args:
        logits_a, logits_b: the branches' logits, ``(N, C, H, W)`` (NCHW or
            channels_last, read in place) or ``(P, C)``; float32/float16/bfloat16.
        target: ``(N, H, W)`` / ``(P,)`` integer labels, ``ignore_index`` where
            unlabeled; None for no supervised term.
        pseudo_a, pseudo_b: labels made by branch a (supervising b) and by
            branch b (supervising a); default: argmax of that branch, computed in
            the kernel (ties to the lowest class). May contain ``ignore_index``.
        cps_weight: weight of the cross term.
        ignore_index: label value to skip.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"`` or None/"auto"
            (``$CPS_FAST_BACKEND`` applies when None).
        return_parts: also return ``sup`` and ``cps``, detached, as device scalars.
        validate: check that labels lie in ``[0, C)`` or equal ``ignore_index``.
            Default: on for CPU tensors, off for CUDA tensors (the check reads a
            value back to the host); never done while a CUDA graph is captured or
            under ``torch.compile``.

    Returns:
        the float32 scalar ``sup + cps_weight * cps``, or ``(loss, sup, cps)``.
    """
    _check_inputs(logits_a, logits_b, target, pseudo_a, pseudo_b, ignore_index)
    C = logits_a.shape[1]
    _maybe_validate_labels("cps_loss", (("target", target), ("pseudo_a", pseudo_a), ("pseudo_b", pseudo_b)),
                           logits_a, validate, C, ignore_index)
    name = _select_backend(logits_a.device.type, backend)
    loss, sup, cps = CPSLossFunction.apply(
        logits_a, logits_b, target, pseudo_a, pseudo_b, float(cps_weight), int(ignore_index), name
    )
    if return_parts:
        return loss, sup, cps
    return loss


class CPSLoss(nn.Module):
    """Module form of :func:`cps_loss`; ``forward(logits_a, logits_b, target=None, **kw)``."""

    def __init__(self, cps_weight: float = 1.0, ignore_index: int = 255, backend: str | None = None,
                 return_parts: bool = False):
        super().__init__()
        self.cps_weight = float(cps_weight)
        self.ignore_index = int(ignore_index)
        self.backend = backend
        self.return_parts = return_parts

    def forward(self, logits_a, logits_b, target=None, *, pseudo_a=None, pseudo_b=None):
        return cps_loss(
            logits_a, logits_b, target, pseudo_a=pseudo_a, pseudo_b=pseudo_b, cps_weight=self.cps_weight,
            ignore_index=self.ignore_index, backend=self.backend, return_parts=self.return_parts,
        )

    def extra_repr(self) -> str:
        return f"cps_weight={self.cps_weight}, ignore_index={self.ignore_index}, backend={self.backend}"
