"""The PyTorch backend: a torch DataLoader with worker processes (PIL + numpy).

Same sample schedule, augmentation draws and output format as the DALI
backends; results depend on (seed, stream, epoch, rank, world size) only.
"""
from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import signal
import weakref
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .common import DataError, check_label
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
        try:
            return self._sample(spec)
        except DataError as e:
            # returned, not raised: torch would re-raise it in the main process as
            # DataError("Caught DataError in DataLoader worker process 0. Original Traceback ...");
            # epoch_batches raises it there with its own one-line message
            return _Failed(str(e))

    def _sample(self, spec: SampleSpec):
        image, label = _load(self.dataset, spec.index, self.with_label)
        if self.with_label:
            if label is None:
                raise DataError(f"sample {_name(self.dataset, spec.index)} has no label; "
                                 "use unlabeled_loader for unlabeled data")
            check_label(label, self.num_classes, _name(self.dataset, spec.index))
        img, lab = augment(image, label, scale=spec.scale, flip=spec.flip, uy=spec.uy, ux=spec.ux,
                           crop_size=self.crop_size, mean=self.mean, std=self.std)
        return torch.from_numpy(img), (torch.from_numpy(lab) if lab is not None else None)


class _Failed(NamedTuple):
    """A sample whose data is bad: the DataError's message, carried from a worker to the main process."""

    message: str


def _name(dataset, i):
    try:
        return dataset.name(i)
    except Exception:
        return f"sample {i}"


class _EpochBatches(torch.utils.data.Sampler):
    """Batch sampler over the batches of epoch ``self.epoch``, from the resume position.

    The first batch is a function of the epoch alone (``start_batch`` in ``start_epoch``,
    0 in every other), never of how often ``iter()`` is called: a DataLoader with worker
    processes calls it twice when it starts (``_BaseDataLoaderIter.__init__``, then
    ``_MultiProcessingDataLoaderIter._reset(first_iter=True)``; torch 2.11 and 2.13 alike),
    and a one-shot skip spent on the first call was lost on resume.
    """

    def __init__(self, schedule: SampleSchedule, start_epoch: int = 0, start_batch: int = 0):
        if not 0 <= int(start_batch) < len(schedule):
            raise ValueError(f"start_batch={start_batch} is outside 0..{len(schedule) - 1} "
                             f"(an epoch has {len(schedule)} batches)")
        self.schedule, self.epoch = schedule, int(start_epoch)
        self.start_epoch, self.start_batch = int(start_epoch), int(start_batch)

    def first_batch(self, epoch: int) -> int:
        return self.start_batch if int(epoch) == self.start_epoch else 0

    def __iter__(self):
        return iter(self.schedule.epoch(self.epoch)[self.first_batch(self.epoch):])

    def __len__(self):
        return len(self.schedule) - self.first_batch(self.epoch)


def _worker_init(worker_id: int) -> None:
    """Workers ignore SIGINT and SIGTERM: the main process decides when to stop (the trainer
    finishes its step and saves), then shuts them down. A terminal's Ctrl-C reaches the whole
    process group (a batch scheduler's SIGTERM often does too), and a worker that died of it
    would make torch's SIGCHLD handler raise in the main process, in the middle of a step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_WITH_WORKERS: "weakref.WeakSet[TorchLoader]" = weakref.WeakSet()


_OUR_WORKERS: "weakref.WeakSet" = weakref.WeakSet()  # worker processes of our loaders (they ignore SIGTERM)


def _ours(process) -> bool:
    """A worker process of a :class:`TorchLoader` (started with :func:`_worker_init`).
    (``Process`` drops its target and arguments once started, so the loaders record them.)"""
    return process in _OUR_WORKERS


def _kill_stragglers(processes) -> None:
    """SIGKILL those of our workers that an orderly shutdown left running: torch's own fallback,
    ``terminate()``, is a SIGTERM, which they ignore."""
    for w in processes:
        if _ours(w) and w.is_alive():
            w.kill()
            w.join(timeout=5)


@atexit.register
def _close_loaders() -> None:
    """At exit, multiprocessing terminates daemonic children with SIGTERM and then joins them;
    ours ignore SIGTERM, so they are shut down first: every live loader's workers in order, then
    any of ours still running (an iterator kept alive past its loader, e.g. by a traceback's
    frames, or a worker that did not stop in time) by SIGKILL, the process being about to exit.
    (atexit runs hooks last-registered first, and multiprocessing registered its hook when torch
    imported it, before this module.)"""
    try:
        for loader in list(_WITH_WORKERS):
            try:
                loader.close()
            except Exception:  # a broken loader must not leave the others (or the process) hanging
                pass
    finally:
        _kill_stragglers(multiprocessing.active_children())


def _collate(samples):
    failed = next((s for s in samples if isinstance(s, _Failed)), None)
    if failed is not None:
        return {"data_error": failed.message}
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
        self._sampler = _EpochBatches(schedule, start_epoch=start_epoch, start_batch=start_batch)
        kw = {}
        if self.num_workers > 0:
            kw = dict(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=_worker_init)
        # The DataLoader draws its workers' base seed from `generator` each time it starts an
        # iterator (every epoch without workers, once with persistent ones). Its own generator,
        # seeded from the schedule, keeps that draw off torch's global RNG, whose state the
        # trainer saves and restores on resume, and makes the workers' seeds reproducible.
        # (The augmentation draws come from the schedule; workers use no global RNG.)
        gen = torch.Generator()
        gen.manual_seed(int(np.random.SeedSequence(
            [schedule.seed, schedule.stream, schedule.rank, 0xDA7A]).generate_state(1, np.uint64)[0] >> 1))
        self._loader = torch.utils.data.DataLoader(
            _Samples(dataset, tuple(crop_size), tuple(mean), tuple(std), with_label),
            batch_sampler=self._sampler, num_workers=self.num_workers, collate_fn=_collate,
            pin_memory=bool(pin_memory), generator=gen, **kw)
        if self.num_workers > 0:
            _WITH_WORKERS.add(self)

    def __len__(self) -> int:
        return len(self.schedule)

    def close(self) -> None:
        """Stop the worker processes now (garbage collection or exit also does). Iterating again
        starts new ones."""
        it = self._loader._iterator  # the persistent-worker iterator, once the first epoch began
        if it is not None:
            self._loader._iterator = None
            workers = list(getattr(it, "_workers", ()))
            it._shutdown_workers()
            _kill_stragglers(workers)

    def epoch_batches(self, epoch: int):
        """Iterate over the batches of one epoch."""
        self._sampler.epoch = int(epoch)
        batches = iter(self._loader)
        _OUR_WORKERS.update(getattr(batches, "_workers", ()))
        for batch in batches:
            if "data_error" in batch:
                raise DataError(batch["data_error"])
            if "label" in batch and self.label_dtype != torch.uint8:
                batch["label"] = batch["label"].to(self.label_dtype)
            yield batch

    def __iter__(self):
        for epoch in itertools.count(self.epoch):
            self.epoch = epoch
            yield from self.epoch_batches(epoch)
