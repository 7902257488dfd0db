"""The fused n-branch Cross Pseudo Supervision loss (n-CPS).

For ``K >= 2`` branches with logits ``x_1 .. x_K`` of one shape::

    sup     = sum_k CE(x_k, target)
    cross_k = mean over j != k of CE(x_k, y_j)        y_j = argmax x_j, or pseudo[j] when given
              (ensemble=True: CE(x_k, argmax_c mean_{j != k} softmax(x_j)))
    cps     = sum_k cross_k
    loss    = sup + cps_weight * cps

each CE the mean over its non-ignored pixels (0, never NaN, when none is
valid), exactly as :func:`cps_fast.cps_loss`; for ``K = 2`` both modes equal
``cps_loss(x_1, x_2, target, ...)``. In ensemble mode with ``K = 2`` the "mean
softmax" of the single other branch is taken as that branch's argmax (the same
label, without softmax rounding), so the equality is exact. Ensemble mode with
given pseudo labels is refused: whether a given label should replace the
ensemble's label or one branch's vote inside it is ambiguous.

One kernel reads each branch's logits once and writes each gradient once;
backward only scales the gradients by ``grad_output`` on the device.

K = 2 runs the two-branch kernels of :func:`cps_fast.cps_loss` (the same loss); K > 2 the
n-branch kernels below, through the mechanism of :mod:`cps_fast.fused`. Every backend of the
n-branch kernels implements one function::

    sums = fwd(xs, t2, ys, counts, gs, cps_weight, ignore_index, ensemble)

* ``xs``: ``K`` ``(N, C, L)`` views of the logits with any strides (NCHW gives
  class stride ``L``, channels_last class stride 1); float32/float16/bfloat16.
* ``t2``: ``(N, L)`` integer labels or None. ``ys``: ``K`` entries, each ``(N, L)``
  integer labels or None (the argmax of that branch, computed in the kernel);
  all None in ensemble mode.
* ``counts``: float32 ``[K + 1]`` on the device: valid pixels of the target and
  of each label ``y_j`` (in ensemble mode the label of branch ``j``, always
  valid: the pixel count).
* ``gs``: ``K`` outputs with the logits' shapes and strides, or None to skip the
  gradients. For ``grad_output == 1``, with ``ct = vt / n_t``::

      default:  c_j = cps_weight / (K - 1) * v_j / n_j
                g_k = softmax(x_k) * (ct + sum_{j != k} c_j) - onehot(t) ct - sum_{j != k} onehot(y_j) c_j
      ensemble: c_k = cps_weight * v_k / n_k
                g_k = softmax(x_k) * (ct + c_k) - onehot(t) ct - onehot(e_k) c_k

  with ``v`` a label's validity and ``n = max(count, 1)``.
* returns float32 ``[K + 1]`` on the device: ``sum_p vt * sum_k CE(x_k, t)`` and,
  for each label ``j``, ``sum_p v_j * sum_{k != j} CE(x_k, y_j)`` (default) or
  ``sum_p CE(x_j, e_j)`` (ensemble).

A label outside ``[0, C)`` that is not ``ignore_index`` is treated as ignored by
the kernels; :func:`ncps_loss` rejects it first when ``validate`` is on.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import backends, fused

# ----------------------------------------------------------------------------- checks


def _check_ncps_inputs(logits, target, pseudo, ignore_index, ensemble) -> None:
    if isinstance(logits, torch.Tensor) or not isinstance(logits, Sequence):
        what = f"a Tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"ncps_loss: logits must be a list or tuple of K >= 2 tensors (one per branch), got {what}")
    K = len(logits)
    if K < 2:
        raise ValueError(f"ncps_loss: got K = {K} branch logits; expected K >= 2 branches")
    C = fused.check_logits("ncps_loss", [(f"logits[{k}]", x) for k, x in enumerate(logits)], (2, 4),
                      "(N, C, H, W) or (P, C) logits", "all branches' logits must have one shape")
    x0 = logits[0]
    if pseudo is not None:
        if isinstance(pseudo, torch.Tensor) or not isinstance(pseudo, Sequence):
            raise TypeError(f"ncps_loss: pseudo must be None or a list of K = {K} label tensors (or None entries), "
                            f"got {type(pseudo).__name__}")
        if len(pseudo) != K:
            raise ValueError(f"ncps_loss: pseudo has {len(pseudo)} entries for K = {K} branches; expected one label "
                             f"tensor (or None for the argmax) per branch")
        if ensemble and any(y is not None for y in pseudo):
            raise ValueError("ncps_loss: ensemble=True with given pseudo labels is ambiguous (replace the ensemble's "
                             "label, or one branch's vote inside it?); pass pseudo=None with ensemble=True, or "
                             "ensemble=False to supervise with the given labels")
    label_shape = (x0.shape[0],) + tuple(x0.shape[2:])
    named = [("target", target)] + [(f"pseudo[{j}]", y) for j, y in enumerate(pseudo or ())]
    fused.check_labels("ncps_loss", named, label_shape, x0, f"{label_shape} to match logits of shape {tuple(x0.shape)}")
    fused.check_ignore_index("ncps_loss", ignore_index, C)


# ----------------------------------------------------------------------------- the n-branch kernels


def _torch_fwd(xs, t2, ys, counts, gs, cps_weight, ignore_index, ensemble):
    """The kernel contract in plain PyTorch (float32 math), for any device."""
    K = len(xs)
    C = xs[0].shape[1]
    x = [v.float() for v in xs]
    logp = [torch.log_softmax(v, dim=1) for v in x]  # (N, C, L)

    def onehot(lab):
        """(N, C, L) one-hot of the valid labels (all zero where ignored or out of range)."""
        lab = lab.long()
        valid = (lab != ignore_index) & (lab >= 0) & (lab < C)
        hot = torch.zeros_like(x[0]).scatter_(1, torch.where(valid, lab, 0).unsqueeze(1), 1.0)
        return hot * valid.unsqueeze(1)

    if ensemble:
        if K == 2:
            labels = [x[1].argmax(dim=1), x[0].argmax(dim=1)]
        else:
            prob = [v.exp() for v in logp]
            total = torch.stack(prob).sum(0)
            labels = [(total - prob[k]).argmax(dim=1) for k in range(K)]
    else:
        labels = [x[j].argmax(dim=1) if ys[j] is None else ys[j] for j in range(K)]
    hot = [onehot(y) for y in labels]
    hot_t = onehot(t2) if t2 is not None else torch.zeros_like(x[0])
    sums = [-(hot_t * sum(logp)).sum()]
    for j in range(K):
        if ensemble:
            sums.append(-(hot[j] * logp[j]).sum())
        else:
            sums.append(-(hot[j] * sum(logp[k] for k in range(K) if k != j)).sum())
    if gs is not None:
        inv = 1.0 / counts.clamp_min(1.0)
        w = float(cps_weight) if ensemble else float(cps_weight) / (K - 1)
        for k in range(K):
            if ensemble:
                tgt = hot_t * inv[0] + hot[k] * (w * inv[1 + k])
            else:
                tgt = hot_t * inv[0] + sum(hot[j] * (w * inv[1 + j]) for j in range(K) if j != k)
            # d/dx of sum_p [c_p * CE(x_p, y_p)] = c_p * (softmax(x_p) - onehot(y_p))
            gs[k].copy_(logp[k].exp() * tgt.sum(1, keepdim=True) - tgt)
    return torch.stack(sums)


def _launch_triton(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    from .kernels import ncps_loss as triton_ops

    return triton_ops.ncps_loss_fwd(xs, t2, ys, counts, gs, cps_weight, ignore_index, bool(options[0]), config=config)


def _launch_cpu(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    return backends.extension().ncps_loss_forward(list(xs), t2, list(ys), counts, list(gs) if gs is not None else None,
                                                  float(cps_weight), int(ignore_index), bool(options[0]))


def _launch_torch(xs, t2, ys, counts, gs, cps_weight, ignore_index, options, config):
    return _torch_fwd(xs, t2, ys, counts, gs, cps_weight, ignore_index, bool(options[0]))


def _reduce(sums, counts, cps_weight, options):
    """``(loss, sup, cps)`` from the n-branch sums and counts (the module docstring)."""
    inv = 1.0 / counts.clamp_min(1.0)
    sup = sums[0] * inv[0]
    cps = (sums[1:] * inv[1:]).sum()
    if not options[0]:  # default mode: each branch's cross term is the mean over the other K - 1 labels
        cps = cps / (sums.shape[0] - 2)
    return sup + cps_weight * cps, sup, cps


def _limit(backend, C, K):
    if backend == "triton":
        from .kernels.ncps_loss import MAX_K

        if K > MAX_K:
            return f"its kernel has slots for 2 to {MAX_K} branches, got K = {K}"
    return None


def _config_type():
    from .kernels.ncps_loss import NCPSLossConfig

    return NCPSLossConfig


N_BRANCH = fused.register(fused.Kernel(
    name="ncps_loss", op="ncps_loss", launchers={"triton": _launch_triton, "cpu": _launch_cpu, "torch": _launch_torch},
    reduce=_reduce, extension_function="ncps_loss_forward", limit=_limit, config_type=_config_type,
))

# the autograd Function of every fused loss (cps_fast.fused.FusedLossFunction)
NCPSLossFunction = fused.FusedLossFunction


def ncps_loss(
    logits: Sequence[torch.Tensor],
    target: torch.Tensor | None = None,
    *,
    pseudo: Sequence[torch.Tensor | None] | None = None,
    cps_weight: float = 1.0,
    ignore_index: int = 255,
    ensemble: bool = False,
    backend: str | None = None,
    return_parts: bool = False,
    validate: bool | None = None,
    kernel_config=None,
):
    """Fused Cross Pseudo Supervision loss of K >= 2 branches (n-CPS).

    Args:
        logits: K tensors of one shape, dtype and device: ``(N, C, H, W)`` (NCHW
            or channels_last, read in place) or ``(P, C)``; float32/float16/bfloat16.
        target: ``(N, H, W)`` / ``(P,)`` integer labels, ``ignore_index`` where
            unlabeled; None for no supervised term.
        pseudo: None, or K entries where ``pseudo[j]`` is branch j's label
            (supervising every other branch) or None for ``argmax(logits[j])``
            (ties to the lowest class). May contain ``ignore_index``. Not allowed
            with ``ensemble=True``.
        cps_weight: weight of the cross term.
        ignore_index: label value to skip (must lie outside ``[0, C)``).
        ensemble: supervise branch k with the argmax of the other branches'
            mean softmax instead of with each other branch's argmax in turn.
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or None/"auto"
            (``$CPS_FAST_BACKEND`` applies when None); ``"cuda"`` (CUDA C++) for
            K = 2 only, which runs the two-branch kernels of :func:`cps_fast.cps_loss`.
        return_parts: also return ``sup`` and ``cps``, detached, as device scalars.
        validate: check that labels lie in ``[0, C)`` or equal ``ignore_index``.
            Default: on for CPU tensors, off for CUDA tensors (the check reads a
            value back to the host); never done while a CUDA graph is captured or
            under ``torch.compile``.
        kernel_config: a launch configuration forced on the Triton kernel
            (:class:`cps_fast.kernels.ncps_loss.NCPSLossConfig`; for K = 2,
            :class:`cps_fast.kernels.cps_loss.CPSLossConfig`), or None.

    Returns:
        the float32 scalar ``sup + cps_weight * cps`` (see the module docstring),
        or ``(loss, sup, cps)``.
    """
    _check_ncps_inputs(logits, target, pseudo, ignore_index, ensemble)
    K = len(logits)
    pseudo = list(pseudo) if pseudo is not None else [None] * K
    names = ["target"] + [f"pseudo[{j}]" for j in range(K)]
    if K == 2:  # the two-branch kernels (cps_loss): for two branches both modes are that loss
        kernel, options = fused.KERNELS["cps_loss"], ()
    else:
        kernel, options = N_BRANCH, (int(bool(ensemble)),)
    return fused.run(kernel, list(logits), target, pseudo, cps_weight=cps_weight, ignore_index=ignore_index,
                     backend=backend, return_parts=return_parts, validate=validate, label_names=names,
                     options=options, kernel_config=kernel_config, op="ncps_loss")


class NCPSLoss(nn.Module):
    """Module form of :func:`ncps_loss`; ``forward(logits, target=None, *, pseudo=None)``."""

    def __init__(self, cps_weight: float = 1.0, ignore_index: int = 255, ensemble: bool = False,
                 backend: str | None = None, return_parts: bool = False):
        super().__init__()
        self.cps_weight = float(cps_weight)
        self.ignore_index = int(ignore_index)
        self.ensemble = bool(ensemble)
        self.backend = backend
        self.return_parts = return_parts

    def forward(self, logits, target=None, *, pseudo=None):
        return ncps_loss(
            logits, target, pseudo=pseudo, cps_weight=self.cps_weight, ignore_index=self.ignore_index,
            ensemble=self.ensemble, backend=self.backend, return_parts=self.return_parts,
        )

    def extra_repr(self) -> str:
        return (f"cps_weight={self.cps_weight}, ignore_index={self.ignore_index}, ensemble={self.ensemble}, "
                f"backend={self.backend}")
