"""``labeled_loader`` / ``unlabeled_loader``: one entry point for every backend."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..errors import DeviceError
from .splits import SampleSchedule

__all__ = ["labeled_loader", "unlabeled_loader", "LoaderOptions", "resolve_backend", "check_mean_std", "BACKENDS"]

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


@dataclass(frozen=True)
class LoaderOptions:
    """The keywords that :func:`labeled_loader` and :func:`unlabeled_loader` share, declared once
    (their docstrings say what the batches are).

    ``start_epoch`` and ``start_iter`` are a resume position (whole epochs, then batches skipped,
    never loaded). ``num_workers`` are the ``pytorch`` backend's worker processes (and the DALI
    threads when ``num_threads`` is None); ``device_id``, ``prefetch_queue_depth`` and
    ``num_threads`` are the DALI pipeline's.
    """

    batch_size: int
    crop_size: Union[int, Sequence[int]]
    scales: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
    flip: bool = True
    backend: str = "auto"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    num_workers: Optional[int] = None
    epoch_length: Optional[int] = None
    start_epoch: int = 0
    device_id: Optional[int] = None
    prefetch_queue_depth: int = 2
    num_threads: Optional[int] = None
    start_iter: int = 0


_OPTIONS = {f.name: f for f in dataclasses.fields(LoaderOptions)}


def _options(fn, given: dict) -> LoaderOptions:
    """``LoaderOptions(**given)``, with the errors Python gives for a plain function's keywords,
    naming ``fn`` (``labeled_loader``) rather than the dataclass."""
    for key in given:
        if key not in _OPTIONS:
            close = difflib.get_close_matches(key, list(inspect.signature(fn).parameters), n=1)
            raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {key!r}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
    for key, f in _OPTIONS.items():
        if key not in given and f.default is dataclasses.MISSING:
            raise TypeError(f"{fn.__name__}() missing required keyword argument {key!r}")
    return LoaderOptions(**given)


def _takes_options(fn):
    """Show the :class:`LoaderOptions` in ``fn``'s signature (``help()``, ``inspect``) in place of
    its ``**options``: ``(dataset, *, <the options>, <fn's own keywords>)``."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
              for f in _OPTIONS.values()]
    fn.__signature__ = sig.replace(parameters=[own[0], *shared, *own[1:]])
    return fn


def _make(dataset, o: LoaderOptions, *, with_label: bool, stream: int, label_dtype: torch.dtype,
          check_labels: Optional[bool]):
    where = "labeled_loader" if with_label else "unlabeled_loader"
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset!r} is empty")
    check_mean_std(o.mean, o.std, where)
    schedule = SampleSchedule(len(dataset), o.batch_size, length=o.epoch_length, seed=o.seed,
                              stream=stream, rank=o.rank, world_size=o.world_size,
                              scales=o.scales, flip=o.flip)
    crop = _crop(o.crop_size)
    be = resolve_backend(o.backend)
    # a resume position: whole epochs, then batches skipped (never loaded) in the next one
    start_epoch, start_batch = divmod(int(o.start_iter), len(schedule))
    start_epoch += int(o.start_epoch)
    if be == "pytorch":
        from .torch_loader import TorchLoader

        return TorchLoader(dataset, schedule, crop_size=crop, mean=o.mean, std=o.std,
                           with_label=with_label, num_workers=o.num_workers,
                           label_dtype=label_dtype, start_epoch=start_epoch,
                           start_batch=start_batch)
    from .dali import DaliLoader

    return DaliLoader(dataset, schedule, crop_size=crop, mean=o.mean, std=o.std, with_label=with_label,
                      device="gpu" if be == "dali-gpu" else "cpu", device_id=o.device_id,
                      num_threads=o.num_threads or (o.num_workers or 4), label_dtype=label_dtype,
                      start_epoch=start_epoch, start_batch=start_batch,
                      prefetch_queue_depth=o.prefetch_queue_depth, check_labels=check_labels)


@_takes_options
def labeled_loader(dataset, *, label_dtype: torch.dtype = torch.uint8, check_labels: Optional[bool] = None,
                   **options):
    """Augmented labeled batches, infinitely; ``len()`` = iterations per epoch.

    ``options`` are the :class:`LoaderOptions` (``batch_size`` and ``crop_size`` required).
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
    return _make(dataset, _options(labeled_loader, options), with_label=True, stream=0,
                 label_dtype=label_dtype, check_labels=check_labels)


@_takes_options
def unlabeled_loader(dataset, *, stream: int = 0, **options):
    """Augmented unlabeled batches ``{"image": ...}`` (as :func:`labeled_loader`, no label).

    ``options`` are the :class:`LoaderOptions` (``batch_size`` and ``crop_size`` required).
    ``stream`` selects an independent shuffle and augmentation stream: the CutMix
    trainer uses ``stream=0`` and ``stream=1`` for u0 and u1, which therefore
    draw different images (the reference's two loaders yield the same ones).
    """
    return _make(dataset, _options(unlabeled_loader, options), with_label=False, stream=1 + int(stream),
                 label_dtype=torch.uint8, check_labels=None)
