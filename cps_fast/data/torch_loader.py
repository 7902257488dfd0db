"""The PyTorch backend: a torch DataLoader with worker processes (PIL + numpy).

Same sample schedule, augmentation draws and output format as the DALI
backends; results depend on (seed, stream, epoch, rank, world size) only.
"""
from __future__ import annotations

import itertools
import os
from typing import Optional, Sequence

import torch

from .datasets import check_label
from .splits import SampleSchedule, SampleSpec
from .transforms import augment

__all__ = ["TorchLoader"]


def _load(dataset, i: int, with_label: bool):
    if hasattr(dataset, "load"):
        return dataset.load(i, with_label)
    item = dataset[i]
    return item["image"], (item.get("label") if with_label else None)


class _Samples(torch.utils.data.Dataset):
    """Map-style dataset indexed by :class:`SampleSpec` (the batch sampler yields specs)."""

    def __init__(self, dataset, crop_size, mean, std, with_label: bool):
        self.dataset, self.crop_size = dataset, crop_size
        self.mean, self.std, self.with_label = mean, std, with_label
        self.num_classes = getattr(dataset, "num_classes", 256)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, spec: SampleSpec):
        image, label = _load(self.dataset, spec.index, self.with_label)
        if self.with_label:
            if label is None:
                raise ValueError(f"sample {spec.index} of {self.dataset!r} has no label; "
                                 "use unlabeled_loader for unlabeled data")
            check_label(label, self.num_classes, _name(self.dataset, spec.index))
        img, lab = augment(image, label, scale=spec.scale, flip=spec.flip, uy=spec.uy, ux=spec.ux,
                           crop_size=self.crop_size, mean=self.mean, std=self.std)
        return torch.from_numpy(img), (torch.from_numpy(lab) if lab is not None else None)


def _name(dataset, i):
    try:
        return dataset.name(i)
    except Exception:
        return f"sample {i}"


class _EpochBatches(torch.utils.data.Sampler):
    def __init__(self, schedule: SampleSchedule, skip: int = 0):
        self.schedule, self.epoch, self.skip = schedule, 0, int(skip)

    def __iter__(self):
        skip, self.skip = self.skip, 0  # a resume position applies to the first epoch only
        return iter(self.schedule.epoch(self.epoch)[skip:])

    def __len__(self):
        return len(self.schedule)


def _collate(samples):
    images = torch.stack([s[0] for s in samples])  # B,H,W,3
    out = {"image": images.permute(0, 3, 1, 2)}     # NCHW view, channels_last memory
    if samples[0][1] is not None:
        out["label"] = torch.stack([s[1] for s in samples])
    return out


class TorchLoader:
    """Infinite iterator over augmented batches; ``len()`` is iterations per epoch.

    Yields ``{"image": (B,3,h,w) float32 channels_last, "label": (B,h,w) uint8}``
    (``label`` absent for unlabeled loaders, dtype ``label_dtype``).
    """

    backend = "pytorch"

    def __init__(self, dataset, schedule: SampleSchedule, *, crop_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], with_label: bool,
                 num_workers: Optional[int] = None, pin_memory: Optional[bool] = None,
                 label_dtype: torch.dtype = torch.uint8, prefetch_factor: int = 4,
                 start_epoch: int = 0, start_batch: int = 0):
        self.dataset, self.schedule = dataset, schedule
        self.label_dtype = label_dtype
        self.epoch = int(start_epoch)
        if num_workers is None:
            num_workers = min(8, max(1, (os.cpu_count() or 2) - 1))
        self.num_workers = int(num_workers)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self._sampler = _EpochBatches(schedule, skip=start_batch)
        kw = {}
        if self.num_workers > 0:
            kw = dict(persistent_workers=True, prefetch_factor=prefetch_factor)
        self._loader = torch.utils.data.DataLoader(
            _Samples(dataset, tuple(crop_size), tuple(mean), tuple(std), with_label),
            batch_sampler=self._sampler, num_workers=self.num_workers, collate_fn=_collate,
            pin_memory=bool(pin_memory), **kw)

    def __len__(self) -> int:
        return len(self.schedule)

    def epoch_batches(self, epoch: int):
        """Iterate over the batches of one epoch."""
        self._sampler.epoch = int(epoch)
        for batch in self._loader:
            if "label" in batch and self.label_dtype != torch.uint8:
                batch["label"] = batch["label"].to(self.label_dtype)
            yield batch

    def __iter__(self):
        for epoch in itertools.count(self.epoch):
            self.epoch = epoch
            yield from self.epoch_batches(epoch)
