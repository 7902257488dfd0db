"""The fused Cross Pseudo Supervision loss: autograd Function, functional API, module.

One call computes, for two branches' logits ``a`` and ``b``::

    sup  = CE(a, target) + CE(b, target)
    cps  = CE(a, pseudo_b) + CE(b, pseudo_a)       pseudo_x = argmax(x) unless given
    loss = sup + cps_weight * cps

each CE the mean over its non-ignored pixels (0, never NaN, when none is
valid). The kernels read each logits tensor once and write both gradients in
the same pass; backward only scales them by ``grad_output``, on the device.

It is :func:`cps_fast.ncps_loss` with K = 2 (``ncps_loss([a, b], target, pseudo=[pseudo_a,
pseudo_b])``), and both run the two-branch kernels below through the mechanism of
:mod:`cps_fast.fused`. Every backend implements one function::

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

from . import backends, fused
from .fused import as_ncl as _as_ncl  # noqa: F401  (tests/test_csrc.py views logits like the op)


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


def _launch_triton(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    from .kernels import cps_loss as triton_ops

    ga, gb = gs if gs is not None else (None, None)
    return triton_ops.cps_loss_fwd(xs[0], xs[1], t2, ys[0], ys[1], counts, ga, gb, cps_weight, ignore_index,
                                   config=config)


def _launch_extension(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    ga, gb = gs if gs is not None else (None, None)
    return backends.extension().cps_loss_forward(xs[0], xs[1], t2, ys[0], ys[1], counts, ga, gb, float(cps_weight),
                                                 int(ignore_index))


def _launch_torch(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    ga, gb = gs if gs is not None else (None, None)
    return _torch_fwd(xs[0], xs[1], t2, ys[0], ys[1], counts, ga, gb, cps_weight, ignore_index)


def _config_type():
    from .kernels.cps_loss import CPSLossConfig

    return CPSLossConfig


TWO_BRANCH = fused.register(fused.Kernel(
    name="cps_loss", op="cps_loss",
    launchers={"triton": _launch_triton, "cuda": _launch_extension, "cpu": _launch_extension, "torch": _launch_torch},
    reduce=fused.two_branch_reduce, extension_function="cps_loss_forward", config_type=_config_type,
))

# the autograd Function of every fused loss (cps_fast.fused.FusedLossFunction)
CPSLossFunction = fused.FusedLossFunction


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
    kernel_config=None,
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
        kernel_config: a launch configuration forced on the Triton kernel
            (:class:`cps_fast.kernels.cps_loss.CPSLossConfig`; benchmarks sweep these),
            or None to derive it from the shapes.

    Returns:
        the float32 scalar ``sup + cps_weight * cps``, or ``(loss, sup, cps)``.
    """
    C = fused.check_logits("cps_loss", (("logits_a", logits_a), ("logits_b", logits_b)), (2, 4),
                           "(N, C, H, W) or (P, C) logits", "the two branches' logits must have the same shape")
    label_shape = (logits_a.shape[0],) + tuple(logits_a.shape[2:])
    fused.check_labels("cps_loss", (("target", target), ("pseudo_a", pseudo_a), ("pseudo_b", pseudo_b)),
                       label_shape, logits_a, f"{label_shape} to match logits of shape {tuple(logits_a.shape)}")
    fused.check_ignore_index("cps_loss", ignore_index, C)
    # n-CPS with K = 2: the same kernels as ncps_loss([logits_a, logits_b], ...)
    return fused.run(TWO_BRANCH, [logits_a, logits_b], target, [pseudo_a, pseudo_b], cps_weight=cps_weight,
                     ignore_index=ignore_index, backend=backend, return_parts=return_parts, validate=validate,
                     label_names=("target", "pseudo_a", "pseudo_b"), kernel_config=kernel_config)


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
