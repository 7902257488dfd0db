"""``labeled_loader`` / ``unlabeled_loader``: one entry point for every backend."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..errors import DeviceError
from .splits import SampleSchedule

__all__ = ["labeled_loader", "unlabeled_loader", "resolve_backend", "check_mean_std", "BACKENDS"]

log = logging.getLogger("cps_fast.data")

BACKENDS = ("auto", "dali-gpu", "dali-cpu", "pytorch")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_mean_std(mean: Sequence[float], std: Sequence[float], where: str = "normalisation") -> None:
    """Refuse a mean/std that is not three values of ``image / 255``: the 0-255 convention of
    mmsegmentation and DALI, (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375), would give
    nearly constant images without a word."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{where}: mean and std need 3 values (R, G, B), got mean={mean} and std={std}")
    if not all(0.0 <= m <= 1.0 for m in mean) or not all(0.0 < s <= 1.0 for s in std):
        raise ValueError(
            f"{where}: mean={mean}, std={std} are not statistics of image / 255 (mean in [0, 1], std in (0, 1]); "
            "cps-fast normalises (image / 255 - mean) / std, e.g. mean=(0.485, 0.456, 0.406), "
            "std=(0.229, 0.224, 0.225). Values such as (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) are "
            "the 0-255 convention of mmsegmentation and DALI: divide them by 255")


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``dali-gpu`` on a CUDA machine where DALI imports, else ``pytorch``.

    An explicit backend that cannot run raises an error saying why.
    """
    from .dali import dali_available

    if backend not in BACKENDS:
        raise ValueError(f"data backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        if torch.cuda.is_available() and dali_available():
            return "dali-gpu"
        why = "no CUDA device" if not torch.cuda.is_available() else "nvidia-dali does not import"
        log.info("data backend: pytorch (%s)", why)
        return "pytorch"
    if backend.startswith("dali") and not dali_available():
        raise ImportError(f"data backend {backend!r} needs nvidia-dali, which does not import here")
    if backend == "dali-gpu" and not torch.cuda.is_available():
        raise DeviceError("data backend 'dali-gpu' (--data-backend / data_backend) needs a CUDA device and "
                          "torch sees none; use 'dali-cpu' or 'pytorch'")
    return backend


def _crop(crop_size) -> tuple[int, int]:
    if isinstance(crop_size, int):
        return crop_size, crop_size
    h, w = crop_size
    return int(h), int(w)


def _make(dataset, with_label, *, batch_size, crop_size, scales, flip, backend, seed, stream,
          rank, world_size, mean, std, num_workers, epoch_length, label_dtype, start_epoch_arg,
          device_id, prefetch_queue_depth, num_threads, start_iter=0, check_labels=None):
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset!r} is empty")
    check_mean_std(mean, std, "labeled_loader" if with_label else "unlabeled_loader")
    schedule = SampleSchedule(len(dataset), batch_size, length=epoch_length, seed=seed,
                              stream=stream, rank=rank, world_size=world_size,
                              scales=scales, flip=flip)
    crop = _crop(crop_size)
    be = resolve_backend(backend)
    # a resume position: whole epochs, then batches skipped (never loaded) in the next one
    start_epoch, start_batch = divmod(int(start_iter), len(schedule))
    start_epoch += int(start_epoch_arg)
    if be == "pytorch":
        from .torch_loader import TorchLoader

        return TorchLoader(dataset, schedule, crop_size=crop, mean=mean, std=std,
                           with_label=with_label, num_workers=num_workers,
                           label_dtype=label_dtype, start_epoch=start_epoch,
                           start_batch=start_batch)
    from .dali import DaliLoader

    return DaliLoader(dataset, schedule, crop_size=crop, mean=mean, std=std, with_label=with_label,
                      device="gpu" if be == "dali-gpu" else "cpu", device_id=device_id,
                      num_threads=num_threads or (num_workers or 4), label_dtype=label_dtype,
                      start_epoch=start_epoch, start_batch=start_batch,
                      prefetch_queue_depth=prefetch_queue_depth, check_labels=check_labels)


def labeled_loader(dataset, *, batch_size: int, crop_size, scales: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0),
                   flip: bool = True, backend: str = "auto", seed: int = 0, rank: int = 0,
                   world_size: int = 1, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, num_workers: Optional[int] = None,
                   epoch_length: Optional[int] = None, label_dtype: torch.dtype = torch.uint8,
                   start_epoch: int = 0, device_id: Optional[int] = None,
                   prefetch_queue_depth: int = 2, num_threads: Optional[int] = None,
                   start_iter: int = 0, check_labels: Optional[bool] = None):
    """Augmented labeled batches, infinitely; ``len()`` = iterations per epoch.

    Yields ``{"image": (B, 3, h, w) float32 normalised, channels_last memory,
    "label": (B, h, w) uint8 (``label_dtype``), 255 where padded or ignored}``;
    on the GPU for ``dali-gpu``, else on the CPU (pinned when CUDA exists).
    ``batch_size`` is per rank. ``epoch_length`` (default ``len(dataset)``) is the
    number of samples per epoch over all ranks: pass the unlabeled set's length to
    repeat the labeled list as the reference does. Deterministic for a given
    (seed, rank, world_size); ranks see disjoint slices of each global batch.
    ``check_labels`` (DALI backends): range-check the labels DALI decodes, raising
    :class:`DataError` with the batch's files; default on for ``dali-cpu`` and off for
    ``dali-gpu``, where it reads a flag back to the host every batch. Labels read on
    the host (the ``pytorch`` backend, palette and 16-bit PNGs) are always checked.
    """
    return _make(dataset, True, batch_size=batch_size, crop_size=crop_size, scales=scales, flip=flip,
                 backend=backend, seed=seed, stream=0, rank=rank, world_size=world_size, mean=mean,
                 std=std, num_workers=num_workers, epoch_length=epoch_length,
                 label_dtype=label_dtype, start_epoch_arg=start_epoch, device_id=device_id,
                 prefetch_queue_depth=prefetch_queue_depth, num_threads=num_threads,
                 start_iter=start_iter, check_labels=check_labels)


def unlabeled_loader(dataset, *, batch_size: int, crop_size, scales: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0),
                     flip: bool = True, backend: str = "auto", seed: int = 0, stream: int = 0,
                     rank: int = 0, world_size: int = 1, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, num_workers: Optional[int] = None,
                     epoch_length: Optional[int] = None, start_epoch: int = 0,
                     device_id: Optional[int] = None, prefetch_queue_depth: int = 2,
                     num_threads: Optional[int] = None, start_iter: int = 0):
    """Augmented unlabeled batches ``{"image": ...}`` (as :func:`labeled_loader`, no label).

    ``stream`` selects an independent shuffle and augmentation stream: the CutMix
    trainer uses ``stream=0`` and ``stream=1`` for u0 and u1, which therefore
    draw different images (the reference's two loaders yield the same ones).
    """
    return _make(dataset, False, batch_size=batch_size, crop_size=crop_size, scales=scales, flip=flip,
                 backend=backend, seed=seed, stream=1 + int(stream), rank=rank,
                 world_size=world_size, mean=mean, std=std, num_workers=num_workers,
                 epoch_length=epoch_length, label_dtype=torch.uint8, start_epoch_arg=start_epoch,
                 device_id=device_id, prefetch_queue_depth=prefetch_queue_depth,
                 num_threads=num_threads, start_iter=start_iter)
