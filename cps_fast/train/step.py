"""One CPS training step: the loss computation, OHEM, SGD with a device learning rate.

:class:`CPSStep` is an ``nn.Module`` whose ``forward`` is the whole loss of one
step, read top to bottom: pseudo labels (the CutMix boxes drawn, the teachers run),
student logits, loss. Keeping it one module call
means DDP sees exactly one forward and one backward per step (the reference's
several ``model(x, step=k)`` calls per step do not fit DDP's reducer), and the
trainer can capture forward, backward and :class:`SGD` in one CUDA graph: no
operation here reads a value back to the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import fused_upsample_unavailable
from ..data.cutmix import box_masks
from ..loss import cps_loss
from ..ncps_loss import ncps_loss
from ..reference import masked_cross_entropy
from ..upsample_loss import cps_loss_upsampled


def kth_smallest(x: torch.Tensor, k: int, *, method: str = "auto") -> torch.Tensor:
    """The ``k``-th smallest value (1-based) along the last dimension of ``x``, shape ``x.shape[:-1]``.

    Batched so that OHEM takes one threshold per image from an ``(N, H*W)`` tensor in one call.
    ``method="auto"``: ``torch.kthvalue`` on the CPU (quickselect); on CUDA the largest of
    ``torch.topk(k, largest=False)``, whose radix select spreads over all SMs, where
    ``kthvalue`` runs one thread block per slice (20x slower than a full sort at 100 M
    elements, pytorch/pytorch#75599; a Cityscapes image has 640 k). Neither reads back to the host.
    """
    if method == "auto":
        method = "topk" if x.is_cuda else "kthvalue"
    if method == "kthvalue":
        return torch.kthvalue(x, k, dim=-1).values
    if method == "topk":
        return torch.topk(x, k, dim=-1, largest=False, sorted=False).values.amax(-1)
    raise ValueError(f"kth_smallest: method={method!r}; expected 'auto', 'kthvalue' or 'topk'")


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, thresh: float = 0.7,
                       min_kept: int = 50000, ignore_index: int = 255) -> torch.Tensor:
    """Online hard example mining cross-entropy, per image, as the reference's ``ProbOhemCrossEntropy2d``.

    ``logits`` (N, C, H, W), NCHW or channels_last, any float dtype; ``target`` (N, H, W).
    The reference runs its criterion on one labeled image per GPU and DDP averages the GPUs'
    gradients, so this selects per image, whatever the batch size: ``min_kept`` is a floor
    PER IMAGE. Image n keeps its valid pixels whose true-class probability is at most
    ``max(thresh, the min_kept-th smallest such probability in image n)``, or every valid
    pixel when it has fewer than ``min_kept``; its loss is the mean CE over its kept pixels.
    The result is the mean of those per-image means over the images that keep at least one
    pixel: an image with none (all ignored; the reference's cross-entropy gives NaN there)
    contributes nothing, and a batch with none gives 0, never NaN. Under DDP with equal local
    batches the gradients' average is then the mean over the global batch's images.

    No host synchronisation (the reference branches on counts): one batched k-th value over
    ``(N, H*W)`` with invalid pixels set to 1 so they sort last, and masks for the branches.
    One log-softmax over the classes gives both the per-pixel loss and the true-class
    probability (``exp(-loss)``), where the reference runs a softmax and a cross-entropy. It runs
    over the innermost dimension of channels_last logits (a view, not a copy: torch's softmax
    over dim 1 would copy them to NCHW first) and over dim 1 of NCHW ones.
    """
    if logits.dim() != 4 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"ohem_cross_entropy: logits {tuple(logits.shape)} and target {tuple(target.shape)}; "
                         "expected (N, C, H, W) logits and an (N, H, W) target")
    N, C = logits.shape[:2]
    t = target.long()
    valid = (t != ignore_index) & (t >= 0) & (t < C)
    t_safe = torch.where(valid, t, 0)
    x = logits.float()
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    cdim = -1 if cl else 1
    if cl:
        x = x.movedim(1, -1)  # (N, H, W, C), contiguous
    losses = -torch.log_softmax(x, dim=cdim).gather(cdim, t_safe.unsqueeze(cdim)).squeeze(cdim)  # (N, H, W)
    with torch.no_grad():
        p = torch.exp(-losses).reshape(N, -1)  # the true class's probability, per image
        valid_f = valid.reshape(N, -1)
        k = min(int(min_kept), p.shape[1])  # from shapes only
        if k > 0:  # invalid pixels set to 1 sort last
            threshold = torch.clamp(kth_smallest(torch.where(valid_f, p, 1.0), k), min=thresh).unsqueeze(1)
        else:  # the reference: no floor when min_kept is 0
            threshold = float(thresh)
        few = valid_f.sum(1, keepdim=True) < min_kept  # the reference's "min_kept > num_valid": keep all
        keep = (valid_f & ((p <= threshold) | few)).reshape(losses.shape)
        count = keep.sum((1, 2))
        weight = torch.where(count > 0, 1.0 / count.clamp_min(1), 0.0)  # 1 / kept pixels, 0 for none
        weight = weight / (count > 0).sum().clamp_min(1)  # mean over images that keep a pixel
    return (torch.where(keep, losses, 0.0).sum((1, 2)) * weight).sum()


class CPSStep(nn.Module):
    """The loss of one step for ``method`` "cps" (plain or CutMix, K >= 2 branches) or "supervised".

    ``forward(img_l, label_l, u0=None, u1=None, mask=None) -> (loss, sup, cps)`` reads in three
    parts: :meth:`pseudo_labels`, :meth:`student_logits`, :meth:`loss`.

    * supervised: ``sup = CE(a(img_l), label_l)``; the other branches are unused.
    * plain CPS: every branch on the labeled and the unlabeled images; one fused
      loss on the concatenated logits, target ``ignore`` on unlabeled rows,
      pseudo labels = argmax over all rows (the reference's ``pred_l = cat(...)``).
    * CPS + CutMix: the box ``mask`` drawn here from ``mask_generator`` (unless given);
      teachers (no grad) on u0 and u1, pseudo labels mixed by the mask; students on
      [labeled; mixed] images; one fused loss with the mixed pseudo labels (ignore on
      labeled rows).

    Two branches use :func:`cps_fast.cps_loss`, or with ``fused_upsample``
    :func:`cps_fast.cps_loss_upsampled` on the decoder-resolution logits, so
    full-resolution student logits and their gradients never exist. More branches
    use :func:`cps_fast.ncps_loss` (n-CPS; ``ncps_ensemble`` picks its ensemble mode).

    Labeled and unlabeled images go through separate forward passes, as in the
    reference, so BatchNorm statistics are those of each group, and in the reference's
    order, which decides BatchNorm's running statistics: plain CPS runs each branch on the
    labeled images, then the unlabeled (``a(l), a(u), b(l), b(u)``); CutMix runs the
    teachers on u0, u1, then the students on the mixed images, then on the labeled.
    The supervised term with ``sup_loss="ohem"`` is :func:`ohem_cross_entropy`, per image.
    """

    def __init__(self, model: nn.Module, *, method: str = "cps", cutmix: bool = False, cps_weight: float = 1.5,
                 sup_loss: str = "ce", ohem_thresh: float = 0.7, ohem_min_kept: int = 50000,
                 ignore_index: int = 255, loss_backend: str | None = None, autocast_dtype=None,
                 fused_upsample: bool | str = False, ncps_ensemble: bool = False, cutmix_n_boxes: int = 3,
                 cutmix_prop_range: tuple[float, float] = (0.25, 0.5),
                 mask_generator: torch.Generator | None = None):
        """``loss_backend``: a backend of the fused losses, None for automatic. ``fused_upsample``:
        True, False or "auto" (on where it applies: two branches, ``loss_backend`` not "cuda").
        ``mask_generator``: where the CutMix boxes are drawn from (on the images' device; None:
        torch's default generator); inside a CUDA-graph capture they come from the default CUDA
        generator, which is graph-safe, so each replay draws new boxes."""
        super().__init__()
        if method not in ("cps", "supervised"):
            raise ValueError(f"method={method!r}; expected 'cps' or 'supervised'")
        if sup_loss not in ("ce", "ohem"):
            raise ValueError(f"sup_loss={sup_loss!r}; expected 'ce' or 'ohem'")
        if loss_backend == "reference":
            raise ValueError("loss_backend='reference': the reference code's loss is the step benchmark's "
                             "baseline now (benchmarks/reference_step.py); use None or a fused-loss backend")
        if fused_upsample not in (True, False, "auto"):
            raise ValueError(f"fused_upsample={fused_upsample!r}; expected True, False or 'auto'")
        self.model = model
        self.num_branches = len(model.branches)
        why_not = self._upsample_unavailable(loss_backend)
        if fused_upsample is True and why_not is not None:
            raise ValueError(f"fused_upsample=True: the upsample-fused loss {why_not}; pass 'auto' or False")
        self.method, self.cutmix, self.cps_weight = method, bool(cutmix), float(cps_weight)
        self.sup_loss, self.ohem_thresh, self.ohem_min_kept = sup_loss, float(ohem_thresh), int(ohem_min_kept)
        self.ignore_index, self.loss_backend = int(ignore_index), loss_backend
        self.autocast_dtype = autocast_dtype  # None: no autocast
        self.fused_upsample = why_not is None and fused_upsample in (True, "auto")
        self.ncps_ensemble = bool(ncps_ensemble)
        # n-CPS ensemble labels with CutMix: the teachers' labels come from their own passes on u0 and
        # u1, so each branch's label (the argmax of the other branches' mean softmax) is made here,
        # and no fused kernel takes one label per branch: K cross-entropies over the unlabeled rows
        self.own_labels = self.cutmix and self.ncps_ensemble and self.num_branches > 2
        self.cutmix_n_boxes, self.cutmix_prop_range = int(cutmix_n_boxes), tuple(cutmix_prop_range)
        self.mask_generator = mask_generator

    def _upsample_unavailable(self, loss_backend) -> str | None:
        """Why the upsample-fused loss cannot run in this step, or None."""
        return fused_upsample_unavailable(self.num_branches, loss_backend)

    def forward(self, img_l, label_l, u0=None, u1=None, mask=None):
        if self.method == "supervised":
            with self._autocast(img_l):
                logits = self.model.branches[0](img_l)
            sup = self._sup(logits, label_l)
            return sup, sup.detach(), torch.zeros_like(sup)
        pseudo, u = self.pseudo_labels(u0, u1, mask)
        out_l, out_u = self.student_logits(img_l, u)
        return self.loss(out_l, out_u, label_l, pseudo)

    def draw_mask(self, u0: torch.Tensor) -> torch.Tensor:
        """CutMix box masks ``(N, 1, H, W)`` of 0/1 in ``u0``'s dtype, 1 taking the pixel from u1."""
        capturing = u0.is_cuda and torch.cuda.is_current_stream_capturing()
        h, w = u0.shape[-2:]
        return box_masks(u0.shape[0], h, w, n_boxes=self.cutmix_n_boxes, prop_range=self.cutmix_prop_range,
                         generator=None if capturing else self.mask_generator, device=u0.device).to(u0.dtype)

    def pseudo_labels(self, u0, u1=None, mask=None):
        """``(pseudo, u)``: the teachers' pseudo labels and the students' unlabeled images.

        Plain CPS: ``(None, u0)``; the fused loss takes the argmax of the students' own logits.
        CutMix: one label map per branch for the mixed images ``u0 * (1 - mask) + u1 * mask``
        (``mask`` drawn by :meth:`draw_mask` when None): ``pseudo[k]`` is made by branch k and
        supervises the others, or with ``own_labels`` is the label branch k learns from.
        """
        if not self.cutmix:
            return None, u0
        if mask is None:
            mask = self.draw_mask(u0)
        with torch.no_grad(), self._autocast(u0):
            # argmax of logits mixed by a 0/1 mask == the mask's choice between the two argmaxes
            m = mask[:, 0].bool()
            pseudo = []
            for net in self.model.branches:  # u0 before u1, as the reference (BatchNorm running statistics)
                t0 = net(u0)
                t1 = net(u1)
                if self.own_labels:  # the softmax of the mixed logits
                    pseudo.append(torch.where(m.unsqueeze(1), t1, t0).float().softmax(1))
                else:
                    pseudo.append(torch.where(m, t1.argmax(1), t0.argmax(1)))
            if self.own_labels:  # pseudo[k]: the argmax of the other branches' mean softmax
                total = sum(pseudo)
                pseudo = [(total - p).argmax(1) for p in pseudo]
        return pseudo, u0 * (1 - mask) + u1 * mask

    def student_logits(self, img_l, u) -> tuple[list, list]:
        """``(out_l, out_u)``: every branch's logits on the labeled and the unlabeled images, at the
        decoder's resolution with ``fused_upsample`` (the loss upsamples on the fly), else full."""
        nets, low = self.model.branches, self.fused_upsample
        # in the reference's order (BatchNorm running statistics): with CutMix, every student on the mixed
        # images, then on the labeled ones; plain CPS, branch by branch, labeled then unlabeled
        with self._autocast(img_l):
            if self.cutmix:
                out_u = [net(u, return_low=low) for net in nets]
                out_l = [net(img_l, return_low=low) for net in nets]
            else:
                out_l, out_u = [], []
                for net in nets:
                    out_l.append(net(img_l, return_low=low))
                    out_u.append(net(u, return_low=low))
        return out_l, out_u

    def loss(self, out_l, out_u, label_l, pseudo):
        """``(sup + cps_weight * cps, sup, cps)``, the last two detached.

        With cross-entropy, one fused call on the concatenated [labeled; unlabeled] logits holds
        both terms. OHEM is not part of the fused kernels, and ``own_labels`` give each branch its
        own label, which no fused kernel takes: then the supervised terms are computed apart.
        """
        ignore = self.ignore_index
        size = tuple(label_l.shape[-2:])
        if self.sup_loss == "ce" and not self.own_labels:
            logits = [torch.cat([x_l, x_u]) for x_l, x_u in zip(out_l, out_u)]
            n_u = out_u[0].shape[0]
            target = torch.cat([label_l, torch.full((n_u,) + size, ignore, dtype=label_l.dtype,
                                                    device=label_l.device)])
            if pseudo is not None:  # CutMix: no cross term on the labeled rows
                ignore_l = torch.full_like(label_l, ignore)
                pseudo = [torch.cat([ignore_l.to(p.dtype), p]) for p in pseudo]
            return self._cross(logits, pseudo, target, size, weight=self.cps_weight, return_parts=True)
        full = (lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)) \
            if self.fused_upsample else (lambda x: x)
        sup = sum(self._sup(full(x), label_l) for x in out_l)
        if self.own_labels:
            cps = sum(masked_cross_entropy(x.float(), e, ignore) for x, e in zip(out_u, pseudo))
        elif self.cutmix:
            cps = self._cross(out_u, pseudo, None, size)
        else:  # the pseudo labels are the argmax over all rows, as the fused call's
            cps = self._cross([torch.cat([x_l, x_u]) for x_l, x_u in zip(out_l, out_u)], None, None, size)
        return sup + self.cps_weight * cps, sup.detach(), cps.detach()

    def _autocast(self, x: torch.Tensor):
        if self.autocast_dtype is None:
            return torch.autocast(x.device.type, enabled=False)
        # weight-cast caching breaks CUDA graph capture; the cast is cheap next to the convolutions
        return torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _sup(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.sup_loss == "ohem":  # per labeled image, as the reference (one image per GPU)
            return ohem_cross_entropy(logits, label, thresh=self.ohem_thresh, min_kept=self.ohem_min_kept,
                                      ignore_index=self.ignore_index)
        return masked_cross_entropy(logits.float(), label, self.ignore_index)

    def _cross(self, logits: list, pseudo: list | None, target, size, weight: float = 1.0,
               return_parts: bool = False):
        """The fused loss of every branch's ``logits`` (full or decoder resolution)."""
        ignore, backend = self.ignore_index, self.loss_backend
        pa, pb = (None, None) if pseudo is None else pseudo[:2]
        if self.num_branches > 2:
            return ncps_loss(logits, target, pseudo=pseudo, cps_weight=weight, ignore_index=ignore,
                             ensemble=self.ncps_ensemble, backend=backend, return_parts=return_parts)
        if self.fused_upsample:
            return cps_loss_upsampled(logits[0], logits[1], target, size=size, pseudo_a=pa, pseudo_b=pb,
                                      cps_weight=weight, ignore_index=ignore, backend=backend,
                                      return_parts=return_parts)
        return cps_loss(logits[0], logits[1], target, pseudo_a=pa, pseudo_b=pb, cps_weight=weight,
                        ignore_index=ignore, backend=backend, return_parts=return_parts)


class SGD:
    """SGD with momentum and per-group weight decay, driven by a device-tensor learning rate.

    Same update as ``torch.optim.SGD(momentum=m, dampening=0, nesterov=False)``
    (``buf = m * buf + (g + wd * p)``, ``p -= lr * buf``). ``lr`` is a tensor on the
    parameters' device, so a step never reads it back to the host and can be captured
    in a CUDA graph. Implementations (``impl``):

    * ``"fused"``: ``torch._fused_sgd_`` (one multi-tensor kernel per group reading
      the learning rate from device memory; CUDA, and CPU in recent torch);
    * ``"foreach"``: four ``torch._foreach_*`` launches per group (any device);
    * ``"auto"``: fused where torch has it for the device, else foreach.

    Both read the learning rate on the device, so every step can be captured.
    """

    IMPLS = ("auto", "fused", "foreach")

    def __init__(self, groups: list[dict], momentum: float = 0.9, impl: str = "auto"):
        if impl == "apex":
            raise ValueError("SGD impl='apex' was removed (apex's FusedSGD takes a host learning rate and "
                             "cannot be captured in a CUDA graph); use 'fused', the same update")
        if impl not in self.IMPLS:
            raise ValueError(f"SGD impl={impl!r}; expected one of {self.IMPLS}")
        self.groups = [{"params": list(g["params"]), "weight_decay": float(g["weight_decay"]),
                        "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]
        self.momentum = float(momentum)
        self.buffers = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]
        params = [p for g in self.groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        if impl == "auto":
            impl = "fused" if fused_sgd_available(device) else "foreach"
        elif impl == "fused" and not fused_sgd_available(device):
            raise RuntimeError(f"SGD impl='fused': this torch ({torch.__version__}) has no fused SGD kernel "
                               f"for {device.type} tensors; use impl='foreach'")
        self.impl = impl

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        for g, bufs in zip(self.groups, self.buffers):
            pairs = [(p, b) for p, b in zip(g["params"], bufs) if p.grad is not None]
            if not pairs:
                continue
            params = [p for p, _ in pairs]
            bufs = [b for _, b in pairs]
            grads = [p.grad for p in params]
            if self.impl == "fused":
                torch._fused_sgd_(params, grads, bufs, weight_decay=g["weight_decay"], momentum=self.momentum,
                                  lr=lr, dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
                continue
            if g["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=g["weight_decay"])
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, grads)
            torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "buffers": [[b.clone() for b in bufs] for bufs in self.buffers],
                "groups": [g["name"] for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        names = [g["name"] for g in self.groups]
        if state["groups"] != names:
            raise ValueError(f"optimizer state has groups {state['groups']}, this model has {names}")
        for bufs, saved in zip(self.buffers, state["buffers"]):
            if len(bufs) != len(saved):
                raise ValueError("optimizer state does not match the model's parameters")
            for b, s in zip(bufs, saved):
                b.copy_(s)


def fused_sgd_available(device: torch.device) -> bool:
    """Whether ``torch._fused_sgd_`` (with a tensor learning rate) runs on ``device``'s tensors here."""
    if not hasattr(torch, "_fused_sgd_") or device.type not in ("cuda", "cpu"):
        return False
    try:  # CPU fused optimizers arrived after the CUDA ones: probe once per device type
        return _probe_fused_sgd(device.type)
    except RuntimeError:
        return False


_FUSED_PROBED: dict[str, bool] = {}


def _probe_fused_sgd(device_type: str) -> bool:
    if device_type not in _FUSED_PROBED:
        p = torch.ones(4, device=device_type)
        try:
            torch._fused_sgd_([p], [p.clone()], [torch.zeros_like(p)], weight_decay=0.0, momentum=0.9,
                              lr=torch.ones((), device=device_type), dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False)
            _FUSED_PROBED[device_type] = True
        except (RuntimeError, NotImplementedError):
            _FUSED_PROBED[device_type] = False
    return _FUSED_PROBED[device_type]


def poly_lr(base_lr: float, iteration: torch.Tensor, total: int, power: float = 0.9,
            warmup: int = 0) -> torch.Tensor:
    """``base_lr * (1 - it / total) ** power`` (the reference's per-iteration poly), on the device."""
    it = iteration.to(torch.float32)
    lr = base_lr * torch.clamp(1.0 - it / float(total), min=0.0) ** power
    if warmup > 0:
        lr = lr * torch.clamp((it + 1.0) / float(warmup), max=1.0)
    return lr
