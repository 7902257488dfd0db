"""Pure-PyTorch reference of every fused op: the tests' ground truth.

Written for clarity, not speed: it materialises log-softmax, uses autograd for
gradients, and follows the contract in the fused ops' docstrings and docs/ to the letter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_pc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (P, C) logits -> (P', C) rows."""
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over pixels whose label is not ``ignore_index``.

    Unlike ``F.cross_entropy`` it returns 0 (not NaN) when every pixel is
    ignored; the result has gradient 0 then.
    """
    rows = _as_pc(logits)
    labels = labels.reshape(-1).long()
    total = F.cross_entropy(rows, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count


def cps_loss_reference(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    pseudo_a: torch.Tensor | None = None,
    pseudo_b: torch.Tensor | None = None,
    cps_weight: float = 1.0,
    ignore_index: int = 255,
    return_parts: bool = False,
):
    """The CPS loss computed the plain way, in the logits' dtype promoted to at least float32.

    ``sup = CE(a, target) + CE(b, target)``, ``cps = CE(a, pseudo_b) + CE(b, pseudo_a)``,
    ``loss = sup + cps_weight * cps``; pseudo labels default to the argmax of the
    other branch's logits (detached).
    """
    dtype = torch.promote_types(logits_a.dtype, torch.float32)
    a, b = logits_a.to(dtype), logits_b.to(dtype)
    if pseudo_a is None:
        pseudo_a = a.detach().argmax(dim=1)
    if pseudo_b is None:
        pseudo_b = b.detach().argmax(dim=1)
    if target is not None:
        sup = masked_cross_entropy(a, target, ignore_index) + masked_cross_entropy(b, target, ignore_index)
    else:
        sup = a.new_zeros(())
    cps = masked_cross_entropy(a, pseudo_b, ignore_index) + masked_cross_entropy(b, pseudo_a, ignore_index)
    loss = sup + cps_weight * cps
    if return_parts:
        return loss, sup.detach(), cps.detach()
    return loss


def cps_step_reference(sup_l, sup_r, unsup_l, unsup_r, gt, cps_weight, ignore_index=255):
    """The reference CPS code's plain (no CutMix) loss, term by term.

    ``pred_l = cat(sup_l, unsup_l)``; ``max_l = argmax(pred_l)``; likewise r;
    ``cps = CE(pred_l, max_r) + CE(pred_r, max_l)``; ``sup = CE(sup_l, gt) + CE(sup_r, gt)``.
    """
    pred_l = torch.cat([sup_l, unsup_l], dim=0)
    pred_r = torch.cat([sup_r, unsup_r], dim=0)
    max_l = pred_l.detach().argmax(dim=1)
    max_r = pred_r.detach().argmax(dim=1)
    cps = F.cross_entropy(pred_l, max_r, ignore_index=ignore_index) + F.cross_entropy(pred_r, max_l, ignore_index=ignore_index)
    sup = F.cross_entropy(sup_l, gt.long(), ignore_index=ignore_index) + F.cross_entropy(sup_r, gt.long(), ignore_index=ignore_index)
    return sup + cps_weight * cps


def cps_loss_upsampled_reference(
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
    return_parts: bool = False,
):
    """The upsample-fused CPS loss computed the plain way: bilinear ``F.interpolate`` to ``size``
    (in the logits' dtype promoted to at least float32), then :func:`cps_loss_reference`.

    Differentiable w.r.t. the low-resolution logits ``low_a``, ``low_b`` (``(N, C, h, w)``);
    labels are at full resolution ``(N, H, W)``; default pseudo labels are the argmax of the
    interpolated logits.
    """
    dtype = torch.promote_types(low_a.dtype, torch.float32)
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    up_a = F.interpolate(low_a.to(dtype), size=size, mode="bilinear", align_corners=align_corners)
    up_b = F.interpolate(low_b.to(dtype), size=size, mode="bilinear", align_corners=align_corners)
    return cps_loss_reference(up_a, up_b, target, pseudo_a=pseudo_a, pseudo_b=pseudo_b, cps_weight=cps_weight,
                              ignore_index=ignore_index, return_parts=return_parts)


def ncps_loss_reference(
    logits,
    target: torch.Tensor | None = None,
    *,
    pseudo=None,
    cps_weight: float = 1.0,
    ignore_index: int = 255,
    ensemble: bool = False,
    return_parts: bool = False,
):
    """The n-branch CPS loss computed the plain way, in the logits' dtype promoted to at least float32.

    ``sup = sum_k CE(x_k, target)``; ``cps = sum_k cross_k`` with ``cross_k`` the mean over
    ``j != k`` of ``CE(x_k, y_j)``, ``y_j = pseudo[j]`` or ``argmax x_j`` (detached), or with
    ``ensemble=True`` ``CE(x_k, argmax_c mean_{j != k} softmax(x_j))``; ``loss = sup + cps_weight * cps``.
    """
    K = len(logits)
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    xs = [x.to(dtype) for x in logits]
    pseudo = list(pseudo) if pseudo is not None else [None] * K
    if target is not None:
        sup = sum(masked_cross_entropy(x, target, ignore_index) for x in xs)
    else:
        sup = xs[0].new_zeros(())
    if ensemble:
        if any(y is not None for y in pseudo):
            raise ValueError("ncps_loss_reference: ensemble=True takes no given pseudo labels")
        probs = [torch.softmax(x.detach(), dim=1) for x in xs]
        labels = [torch.stack([probs[j] for j in range(K) if j != k]).mean(0).argmax(dim=1) for k in range(K)]
        cps = sum(masked_cross_entropy(xs[k], labels[k], ignore_index) for k in range(K))
    else:
        labels = [x.detach().argmax(dim=1) if y is None else y for x, y in zip(xs, pseudo)]
        cps = sum(sum(masked_cross_entropy(xs[k], labels[j], ignore_index) for j in range(K) if j != k) / (K - 1)
                  for k in range(K))
    loss = sup + cps_weight * cps
    if return_parts:
        return loss, sup.detach(), cps.detach()
    return loss
