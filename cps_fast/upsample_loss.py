"""The upsample-fused CPS loss: bilinear upsampling of low-resolution logits fused into the loss.

DeepLabv3+ predicts logits at 1/4 (or 1/8) of the input resolution and upsamples them
bilinearly before the loss. :func:`cps_loss_upsampled` computes exactly what::

    cps_loss(F.interpolate(low_a, size, mode="bilinear", align_corners=ac),
             F.interpolate(low_b, size, mode="bilinear", align_corners=ac), target, ...)

computes, value and gradients w.r.t. the LOW-resolution logits, including argmax pseudo
labels taken at full resolution from the interpolated logits, without materialising
full-resolution logits or their gradients (interpolated logits stay in float32; they are
not rounded to the input dtype as ``F.interpolate`` would).

Every backend implements one launcher::

    sums = fwd(a4, b4, t2, pa2, pb2, counts, grad_a4, grad_b4, H, W, cps_weight, ignore_index, align_corners)

* ``a4``, ``b4``: ``(N, C, h, w)`` low-res logits, any strides (NCHW or channels_last).
* ``t2``, ``pa2``, ``pb2``: ``(N, H*W)`` full-res labels or None (None pseudo = argmax of the
  interpolated logits, computed in the kernel).
* ``counts``: float32 ``[3]`` on the device: valid pixels of target, pseudo_a, pseudo_b
  (``N*H*W`` for a None pseudo label), computed here before the launch.
* ``grad_a4``, ``grad_b4``: outputs with the logits' shapes, strides and dtype, or None;
  fully written, ``dloss/dlow`` for ``grad_output == 1`` (float32 accumulation, one cast).
* returns float32 ``[3]``: sums over full-res pixels of ``vt*(CE(a,t)+CE(b,t))``,
  ``vpb*CE(a,pb)``, ``vpa*CE(b,pa)``; ``loss = s0/max(n_t,1) + w*(s1/max(n_pb,1) + s2/max(n_pa,1))``.

Backends: ``triton`` (CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``; C <= 256),
``cpu`` (``cps_fast._C.cps_upsample_forward``), ``torch`` (plain PyTorch, materialises the
full-resolution tensors; the fallback). There is no ``cuda`` (CUDA C++) backend for this op.
Automatic selection: triton on CUDA tensors (torch when Triton cannot run or C > 256), cpu
on CPU tensors when the extension has ``cps_upsample_forward``, else torch.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .loss import (
    _check_ignore_index,
    _check_labels,
    _check_logits,
    _dense,
    _fake_outputs,
    _grad_outputs,
    _keep_grads,
    _label_counts,
    _maybe_validate_labels,
    _scaled_saved_grads,
    _torch_fwd as _torch_loss_fwd,
    _two_branch_loss,
)

log = logging.getLogger("cps_fast")

OP = "cps_loss_upsampled"
TRITON_MAX_C = 256  # the Triton kernel's register tile (kernels/cps_upsample.py: MAX_C)
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
_logged: set[tuple[str, str]] = set()


# ----------------------------------------------------------------------------- checks


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, torch.Size):
        size = tuple(size)
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"{OP}: size must be (H, W), two ints >= 1 (or one int for a square), got {size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"{OP}: size must be (H, W) with H >= 1 and W >= 1, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_inputs(low_a, low_b, target, pseudo_a, pseudo_b, size, ignore_index):
    _check_logits(OP, (("low_a", low_a), ("low_b", low_b)), (4,), "(N, C, h, w) low-resolution logits",
                  "the two branches' logits must have the same shape")
    N, C, h, w = low_a.shape
    if h < 1 or w < 1:
        raise ValueError(f"{OP}: the logits have spatial size {h}x{w} (shape {tuple(low_a.shape)}); expected h, w >= 1")
    H, W = size
    _check_labels(OP, (("target", target), ("pseudo_a", pseudo_a), ("pseudo_b", pseudo_b)), (N, H, W), low_a,
                  f"full-resolution labels (N, H, W) = {(N, H, W)} for logits of shape {tuple(low_a.shape)} "
                  f"upsampled to size={(H, W)}")
    _check_ignore_index(OP, ignore_index, C)


# ----------------------------------------------------------------------------- backends


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run this op on ``device``, otherwise why it cannot."""
    device = torch.device(device)
    if name == "cuda":
        return (f"the cuda (CUDA C++) backend does not implement {OP}; on CUDA tensors use "
                f"backend='triton' (or 'torch')")
    reason = backends.why_unavailable(name, device)
    if reason is None and name == "cpu" and not hasattr(backends.extension(), "cps_upsample_forward"):
        reason = ("cps_fast._C has no cps_upsample_forward (rebuild the extension: "
                  "`pip install --no-build-isolation -e .`)")
    return reason


@torch.compiler.assume_constant_result
def _select_backend(device_type: str, requested: str | None, C: int) -> str:
    """Backend for this op: ``requested`` (or ``$CPS_FAST_BACKEND``) or the best available one.

    A forced backend that cannot run raises :class:`cps_fast.backends.BackendUnavailable`;
    an automatic choice falls back and logs its choice once.
    """
    source = "backend="
    if requested is None and os.environ.get(backends.ENV_VAR):
        requested, source = os.environ[backends.ENV_VAR].strip().lower(), f"${backends.ENV_VAR}"
    if requested is not None and requested != "auto":
        reason = why_unavailable(requested, device_type)
        if reason is None and requested == "triton" and C > TRITON_MAX_C:
            reason = f"its kernel supports C <= {TRITON_MAX_C} classes, got C = {C}"
        if reason is not None:
            raise backends.BackendUnavailable(f"{OP}: {source}{requested!r} cannot run on {device_type} tensors: {reason}")
        return requested
    skipped = []
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        reason = why_unavailable(name, device_type)
        if reason is None and name == "triton" and C > TRITON_MAX_C:
            reason = f"C = {C} > {TRITON_MAX_C}"
        if reason is None:
            if (device_type, name) not in _logged:
                _logged.add((device_type, name))
                why = f" ({'; '.join(skipped)})" if skipped else ""
                simd = getattr(backends.extension(), "upsample_simd", None) if name == "cpu" else None
                what = f"{name} ({simd()} column paths)" if simd is not None else name
                log.info("cps_fast: %s uses the %s backend for %s tensors%s", OP, what, device_type, why)
            return name
        skipped.append(f"{name}: {reason}")
    return "torch"


def _launch(backend, a4, b4, t2, pa2, pb2, counts, ga4, gb4, H, W, cps_weight, ignore_index, align_corners):
    if backend == "triton":
        from .kernels import cps_upsample as triton_ops

        return triton_ops.cps_upsample_fwd(a4, b4, t2, pa2, pb2, counts, ga4, gb4, H, W, cps_weight, ignore_index,
                                           align_corners)
    if backend == "cpu":
        return backends.extension().cps_upsample_forward(
            a4, b4, t2, pa2, pb2, counts, ga4, gb4, int(H), int(W), float(cps_weight), int(ignore_index),
            bool(align_corners),
        )
    if backend == "torch":
        return torch_upsample_fwd(a4, b4, t2, pa2, pb2, counts, ga4, gb4, H, W, cps_weight, ignore_index,
                                  align_corners)
    raise backends.BackendUnavailable(f"{OP}: backend {backend!r} does not implement this op")


def torch_upsample_fwd(a4, b4, t2, pa2, pb2, counts, ga4, gb4, H, W, cps_weight, ignore_index, align_corners):
    """The launcher contract in plain PyTorch (float32 math; materialises full-resolution tensors)."""
    N, C, h, w = a4.shape
    up_a = F.interpolate(a4.float(), size=(H, W), mode="bilinear", align_corners=align_corners)
    up_b = F.interpolate(b4.float(), size=(H, W), mode="bilinear", align_corners=align_corners)
    if ga4 is None:
        return _torch_loss_fwd(up_a.flatten(2), up_b.flatten(2), t2, pa2, pb2, counts, None, None, cps_weight,
                               ignore_index)
    g_up_a, g_up_b = torch.empty_like(up_a), torch.empty_like(up_b)
    sums = _torch_loss_fwd(up_a.flatten(2), up_b.flatten(2), t2, pa2, pb2, counts, g_up_a.flatten(2),
                           g_up_b.flatten(2), cps_weight, ignore_index)
    for g_up, g in ((g_up_a, ga4), (g_up_b, gb4)):
        g.copy_(torch.ops.aten.upsample_bilinear2d_backward(
            g_up, [H, W], [N, C, h, w], bool(align_corners), None, None))
    return sums


# ----------------------------------------------------------------------------- op


@torch.library.custom_op("cps_fast::cps_loss_upsampled_forward", mutates_args=())
def fused_upsampled_forward(low_a: torch.Tensor, low_b: torch.Tensor, target: torch.Tensor | None,
                            pseudo_a: torch.Tensor | None, pseudo_b: torch.Tensor | None, out_h: int, out_w: int,
                            cps_weight: float, ignore_index: int, align_corners: bool, need_grad: bool,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: ``(sums[3], counts[3], grad_a, grad_b)`` (grads empty when not needed).

    A custom op with a fake implementation, so ``torch.compile`` traces through it.
    """
    if need_grad and not (_dense(low_a) and _dense(low_b)):
        low_a, low_b = low_a.contiguous(), low_b.contiguous()
    N, C = low_a.shape[:2]
    t2, pa2, pb2 = (None if y is None else y.reshape(N, -1) for y in (target, pseudo_a, pseudo_b))
    counts = _label_counts(t2, (pa2, pb2), C, ignore_index, N * out_h * out_w, low_a.device)
    grad_a, grad_b = _grad_outputs((low_a, low_b), need_grad)
    ga4, gb4 = (grad_a, grad_b) if need_grad else (None, None)
    sums = _launch(backend, low_a, low_b, t2, pa2, pb2, counts, ga4, gb4, out_h, out_w, cps_weight, ignore_index,
                   align_corners)
    return sums, counts, grad_a, grad_b


@fused_upsampled_forward.register_fake
def _fused_upsampled_forward_fake(low_a, low_b, target, pseudo_a, pseudo_b, out_h, out_w, cps_weight, ignore_index,
                                  align_corners, need_grad, backend):
    return tuple(_fake_outputs((low_a, low_b), 3, need_grad))


class CPSLossUpsampledFunction(torch.autograd.Function):
    """Forward computes the loss and both low-res gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, low_a, low_b, target, pseudo_a, pseudo_b, out_h, out_w, cps_weight, ignore_index,
                align_corners, backend):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        sums, counts, grad_a, grad_b = fused_upsampled_forward(
            low_a, low_b, target, pseudo_a, pseudo_b, out_h, out_w, cps_weight, ignore_index, align_corners,
            need_grad, backend)
        loss, sup, cps = _two_branch_loss(sums, counts, cps_weight)
        _keep_grads(ctx, need_grad, (grad_a, grad_b), sup, cps)
        return loss, sup, cps

    @staticmethod
    def backward(ctx, grad_loss, _grad_sup, _grad_cps):
        grad_a, grad_b = _scaled_saved_grads(ctx, grad_loss, OP)
        return (grad_a if ctx.needs_input_grad[0] else None,
                grad_b if ctx.needs_input_grad[1] else None) + (None,) * 9


def cps_loss_upsampled(
    low_a: torch.Tensor,
    low_b: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    size,
    pseudo_a: torch.Tensor | None = None,
    pseudo_b: torch.Tensor | None = None,
    cps_weight: float = 1.0,
    ignore_index: int = 255,
    align_corners: bool = True,
    backend: str | None = None,
    return_parts: bool = False,
    validate: bool | None = None,
):
    """CPS loss of two branches' low-resolution logits, bilinearly upsampled to ``size`` inside the kernel.

    Equal (to float32 rounding) to ``cps_loss`` on ``F.interpolate(low, size, mode="bilinear",
    align_corners=align_corners)`` of both branches, with gradients flowing to the low-res logits.

    Args:
        low_a, low_b: ``(N, C, h, w)`` logits (NCHW or channels_last, read in place);
            float32/float16/bfloat16, same shape, dtype and device.
        target: ``(N, H, W)`` full-resolution integer labels (uint8/int32/int64) or None.
        size: ``(H, W)`` output size, ints >= 1 (one int means a square). Downsampling works too.
        pseudo_a, pseudo_b: ``(N, H, W)`` labels made by branch a (supervising b) and by
            branch b (supervising a); default: argmax of that branch's interpolated logits
            at full resolution (ties to the lowest class). May contain ``ignore_index``.
        cps_weight, ignore_index, return_parts, validate: as in :func:`cps_fast.cps_loss`.
        align_corners: bilinear convention of ``F.interpolate`` (True in DeepLabv3+).
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or None/``"auto"``; ``"cuda"`` is not
            implemented for this op and raises.

    Returns:
        the float32 scalar ``sup + cps_weight * cps``, or ``(loss, sup, cps)``.
    """
    H, W = _parse_size(size)
    _check_inputs(low_a, low_b, target, pseudo_a, pseudo_b, (H, W), ignore_index)
    C = low_a.shape[1]
    _maybe_validate_labels(OP, (("target", target), ("pseudo_a", pseudo_a), ("pseudo_b", pseudo_b)),
                           low_a, validate, C, ignore_index)
    name = _select_backend(low_a.device.type, backend, C)
    loss, sup, cps = CPSLossUpsampledFunction.apply(
        low_a, low_b, target, pseudo_a, pseudo_b, H, W, float(cps_weight), int(ignore_index), bool(align_corners),
        name,
    )
    if return_parts:
        return loss, sup, cps
    return loss


class CPSLossUpsampled(nn.Module):
    """Module form of :func:`cps_loss_upsampled`.

    ``forward(low_a, low_b, target=None, *, size=None, pseudo_a=None, pseudo_b=None)``; the
    output size is ``size``, else the module's ``size``, else the spatial size of the first
    label tensor given.
    """

    def __init__(self, size=None, cps_weight: float = 1.0, ignore_index: int = 255, align_corners: bool = True,
                 backend: str | None = None, return_parts: bool = False):
        super().__init__()
        self.size = None if size is None else _parse_size(size)
        self.cps_weight = float(cps_weight)
        self.ignore_index = int(ignore_index)
        self.align_corners = bool(align_corners)
        self.backend = backend
        self.return_parts = return_parts

    def forward(self, low_a, low_b, target=None, *, size=None, pseudo_a=None, pseudo_b=None):
        if size is None:
            size = self.size
        if size is None:
            labels = next((y for y in (target, pseudo_a, pseudo_b) if isinstance(y, torch.Tensor)), None)
            if labels is None or labels.dim() != 3:
                raise ValueError("CPSLossUpsampled: no output size: pass size=(H, W) to the module or to forward, "
                                 "or (N, H, W) labels")
            size = tuple(labels.shape[-2:])
        return cps_loss_upsampled(
            low_a, low_b, target, size=size, pseudo_a=pseudo_a, pseudo_b=pseudo_b, cps_weight=self.cps_weight,
            ignore_index=self.ignore_index, align_corners=self.align_corners, backend=self.backend,
            return_parts=self.return_parts,
        )

    def extra_repr(self) -> str:
        return (f"size={self.size}, cps_weight={self.cps_weight}, ignore_index={self.ignore_index}, "
                f"align_corners={self.align_corners}, backend={self.backend}")
