"""Confusion matrix and the metrics read from it (mIoU, per-class IoU, accuracies).

The matrix lives on the device of the predictions and is updated there without a
host synchronisation (unless ``validate=True``), so it can be fed every batch of
an evaluation loop; :meth:`ConfusionMatrix.all_reduce` sums it over processes and
:meth:`ConfusionMatrix.compute` reads it back once at the end.

Convention (as torchvision's reference segmentation metric): ``mat[t, p]`` counts
pixels of true class ``t`` predicted as ``p``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["ConfusionMatrix", "SegMetrics"]


class SegMetrics(dict):
    """The result of :meth:`ConfusionMatrix.compute`: a plain dict (JSON-serialisable)
    with ``miou``, ``iou`` (list, NaN for a class absent from prediction and target),
    ``acc`` (per-class recall, NaN for a class absent from the target),
    ``pixel_acc``, ``mean_acc`` and ``num_pixels``, plus :meth:`table`."""

    def table(self, class_names: Optional[Sequence[str]] = None, digits: int = 2) -> str:
        """A printable per-class table (IoU and accuracy in percent) with the means."""
        iou = self["iou"]
        acc = self["acc"]
        if class_names is None:
            class_names = [f"class {i}" for i in range(len(iou))]
        if len(class_names) != len(iou):
            raise ValueError(
                f"table(): got {len(class_names)} class names for {len(iou)} classes"
            )

        def pct(v: float) -> str:
            return "-" if math.isnan(v) else f"{100.0 * v:.{digits}f}"

        width = max([len("class")] + [len(str(n)) for n in class_names] + [len("mean")])
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'acc':>7}", "-" * (width + 18)]
        for name, i, a in zip(class_names, iou, acc):
            lines.append(f"{str(name):<{width}}  {pct(i):>7}  {pct(a):>7}")
        lines.append("-" * (width + 18))
        lines.append(f"{'mean':<{width}}  {pct(self['miou']):>7}  {pct(self['mean_acc']):>7}")
        lines.append(f"pixel accuracy {pct(self['pixel_acc'])}  ({self['num_pixels']} pixels)")
        return "\n".join(lines)


def _histogram(index: torch.Tensor, nbins: int) -> torch.Tensor:
    """Counts of each value of ``index`` (int64, all in [0, nbins)) as int64 ``(nbins,)``.

    On CUDA ``torch.bincount`` reads ``index.max()`` back to the host to size its
    output; ``scatter_add_`` into a fixed-size buffer does not, so the update stays
    asynchronous (and capturable)."""
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=nbins)
    out = torch.zeros(nbins, dtype=torch.int64, device=index.device)
    return out.scatter_add_(0, index, torch.ones_like(index))


class ConfusionMatrix:
    """A ``(num_classes, num_classes)`` int64 confusion matrix for semantic segmentation.

    Args:
        num_classes: number of classes C (labels 0..C-1).
        ignore_index: target value whose pixels are skipped (255).
        device: where the matrix lives; by default it moves to the device of the
            first ``update``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._device_fixed = device is not None
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64,
                               device=torch.device(device) if device is not None else "cpu")

    @property
    def device(self) -> torch.device:
        return self.mat.device

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, validate: Optional[bool] = None) -> None:
        """Add the pixels of one batch.

        Args:
            pred: integer predictions (class indices), any shape.
            target: integer labels of the same shape; ``ignore_index`` pixels are skipped.
            validate: check that every non-ignored target and every prediction lies in
                ``[0, num_classes)`` and raise ``ValueError`` otherwise. Default: True on
                CPU, False on CUDA (the check reads a value back to the host). Without
                validation, out-of-range pixels are dropped silently.
        """
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(
                f"ConfusionMatrix.update: pred and target must be tensors, got "
                f"{type(pred).__name__} and {type(target).__name__}"
            )
        if pred.shape != target.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred has shape {tuple(pred.shape)} but target has "
                f"shape {tuple(target.shape)}; they must match"
            )
        for what, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"ConfusionMatrix.update: {what} must be an integer tensor, got {t.dtype}")
        if pred.device != target.device:
            raise ValueError(
                f"ConfusionMatrix.update: pred is on {pred.device} but target is on {target.device}"
            )
        if self.mat.device != pred.device:
            if self._device_fixed:
                raise ValueError(
                    f"ConfusionMatrix.update: the matrix was created on {self.mat.device} but the "
                    f"batch is on {pred.device}; move the tensors or create the matrix there"
                )
            self.mat = self.mat.to(pred.device)

        c = self.num_classes
        p = pred.reshape(-1).long()
        t = target.reshape(-1).long()
        in_range_t = (t >= 0) & (t < c)
        in_range_p = (p >= 0) & (p < c)
        not_ignored = t != self.ignore_index
        if validate is None:
            validate = p.device.type == "cpu"
        if validate:
            bad_t = not_ignored & ~in_range_t
            if bool(bad_t.any()):
                vals = torch.unique(t[bad_t])[:8].tolist()
                raise ValueError(
                    f"ConfusionMatrix.update: target has values {vals} outside 0..{c - 1} "
                    f"and not ignore ({self.ignore_index})"
                )
            bad_p = not_ignored & ~in_range_p
            if bool(bad_p.any()):
                vals = torch.unique(p[bad_p])[:8].tolist()
                raise ValueError(f"ConfusionMatrix.update: pred has values {vals} outside 0..{c - 1}")
        keep = not_ignored & in_range_t & in_range_p
        # Skipped pixels go to an extra "dump" bin so the shapes stay static.
        index = torch.where(keep, t * c + p, torch.full_like(t, c * c))
        self.mat += _histogram(index, c * c + 1)[: c * c].view(c, c)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over all processes of the default group when
        ``torch.distributed`` is initialised; a no-op otherwise. Returns self."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> SegMetrics:
        """Read the matrix back and return the metrics (see :class:`SegMetrics`).

        IoU of class c is ``tp / (tp + fp + fn)``; a class absent from both the
        predictions and the targets has NaN IoU and is left out of ``miou``
        (``nanmean``, as the reference's ``compute_score``)."""
        m = self.mat.detach().to("cpu", torch.float64)
        tp = torch.diag(m)
        gt = m.sum(1)
        pr = m.sum(0)
        union = gt + pr - tp
        iou = tp / union  # 0/0 -> NaN for a class absent from both
        acc = tp / gt
        total = m.sum()
        pixel_acc = (tp.sum() / total).item() if total > 0 else float("nan")
        return SegMetrics(
            miou=_nanmean(iou),
            iou=iou.tolist(),
            acc=acc.tolist(),
            pixel_acc=pixel_acc,
            mean_acc=_nanmean(acc),
            num_pixels=int(total.item()),
        )

    def table(self, class_names: Optional[Sequence[str]] = None) -> str:
        """Shortcut for ``self.compute().table(class_names)``."""
        return self.compute().table(class_names)

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"device={self.mat.device})")


def _nanmean(x: torch.Tensor) -> float:
    valid = ~torch.isnan(x)
    if not bool(valid.any()):
        return float("nan")
    return x[valid].mean().item()
