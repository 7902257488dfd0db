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
Automatic selection (:mod:`cps_fast.fused`, as for every fused loss): triton on CUDA tensors
(torch when Triton cannot run or C > 256), cpu on CPU tensors when the extension has
``cps_upsample_forward``, else torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, fused
from .loss import _torch_fwd as _torch_loss_fwd

OP = "cps_loss_upsampled"
TRITON_MAX_C = 256  # the Triton kernel's register tile (kernels/cps_upsample.py: MAX_C)


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
    fused.check_logits(OP, (("low_a", low_a), ("low_b", low_b)), (4,), "(N, C, h, w) low-resolution logits",
                  "the two branches' logits must have the same shape")
    N, C, h, w = low_a.shape
    if h < 1 or w < 1:
        raise ValueError(f"{OP}: the logits have spatial size {h}x{w} (shape {tuple(low_a.shape)}); expected h, w >= 1")
    H, W = size
    fused.check_labels(OP, (("target", target), ("pseudo_a", pseudo_a), ("pseudo_b", pseudo_b)), (N, H, W), low_a,
                  f"full-resolution labels (N, H, W) = {(N, H, W)} for logits of shape {tuple(low_a.shape)} "
                  f"upsampled to size={(H, W)}")
    fused.check_ignore_index(OP, ignore_index, C)


# ----------------------------------------------------------------------------- backends


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


def _launch_triton(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    from .kernels import cps_upsample as triton_ops

    ga, gb = gs if gs is not None else (None, None)
    H, W, align_corners = options
    return triton_ops.cps_upsample_fwd(xs[0], xs[1], t2, ys[0], ys[1], counts, ga, gb, H, W, cps_weight, ignore_index,
                                       bool(align_corners), config=config)


def _launch_cpu(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    ga, gb = gs if gs is not None else (None, None)
    H, W, align_corners = options
    return backends.extension().cps_upsample_forward(xs[0], xs[1], t2, ys[0], ys[1], counts, ga, gb, int(H), int(W),
                                                     float(cps_weight), int(ignore_index), bool(align_corners))


def _launch_torch(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    ga, gb = gs if gs is not None else (None, None)
    H, W, align_corners = options
    return torch_upsample_fwd(xs[0], xs[1], t2, ys[0], ys[1], counts, ga, gb, H, W, cps_weight, ignore_index,
                              bool(align_corners))


def _limit(backend, C, K):
    if backend == "triton" and C > TRITON_MAX_C:
        return f"its kernel supports C <= {TRITON_MAX_C} classes, got C = {C}"
    return None


def _describe(backend):
    simd = getattr(backends.extension(), "upsample_simd", None) if backend == "cpu" else None
    return f"{backend} ({simd()} column paths)" if simd is not None else backend


def _config_type():
    from .kernels.cps_upsample import UpsampleConfig

    return UpsampleConfig


UPSAMPLED = fused.register(fused.Kernel(
    name="cps_loss_upsampled", op=OP,
    launchers={"triton": _launch_triton, "cpu": _launch_cpu, "torch": _launch_torch},
    reduce=fused.two_branch_reduce, view=lambda x: x, pixels=lambda xs, options: xs[0].shape[0] * options[0] * options[1],
    extension_function="cps_upsample_forward", limit=_limit, config_type=_config_type, describe=_describe,
))


def why_unavailable(name: str, device: torch.device | str, C: int = 21) -> str | None:
    """None if backend ``name`` can run this op on ``device`` for C classes, otherwise why it cannot."""
    return fused.why_unavailable(UPSAMPLED, name, device, C, 2)


# ----------------------------------------------------------------------------- op


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
    kernel_config=None,
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
        kernel_config: a launch configuration forced on the Triton kernel
            (:class:`cps_fast.kernels.cps_upsample.UpsampleConfig`; benchmarks sweep these), or None.

    Returns:
        the float32 scalar ``sup + cps_weight * cps``, or ``(loss, sup, cps)``.
    """
    H, W = _parse_size(size)
    _check_inputs(low_a, low_b, target, pseudo_a, pseudo_b, (H, W), ignore_index)
    return fused.run(UPSAMPLED, [low_a, low_b], target, [pseudo_a, pseudo_b], cps_weight=cps_weight,
                     ignore_index=ignore_index, backend=backend, return_parts=return_parts, validate=validate,
                     label_names=("target", "pseudo_a", "pseudo_b"), options=(H, W, int(bool(align_corners))),
                     kernel_config=kernel_config)


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
