"""The CPS trainer: data, model, optimiser, the (graph-captured) step, evaluation, checkpoints.

Read :meth:`Trainer.train` top to bottom for one run. The step itself is
:meth:`Trainer._step`: the loss module (:class:`cps_fast.train.step.CPSStep`, which
also draws the CutMix boxes), backward, the poly learning rate computed on the
device, and :class:`SGD`. On a GPU it is captured once in a CUDA graph and
replayed, with each batch copied into static input buffers; nothing in it reads a
value back to the host, and losses are summed on the device and read every
``log_every`` iterations.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shlex
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import data as cdata
from ..config import Config, ConfigError, format_config, recipe_differences, save_config
from ..data.datasets import Subset
from ..errors import CheckpointError, DeviceError
from ..eval import evaluate
from ..models import CPSModel, convert_sync_batchnorm, param_groups
from ..models.weights import PretrainedWeightsError
from .checkpoint import load_checkpoint, save_checkpoint
from .logger import RunLogger
from .profiling import ProfileWindow, phase
from .step import SGD, CPSStep, poly_lr

log = logging.getLogger("cps_fast.train")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


# ----------------------------------------------------------------------------- distributed


def init_distributed(device_type: str, cuda_graph: bool = False) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda" and cuda_graph:
        # NCCL inside a captured graph needs async error handling off (PyTorch's CUDA graph notes)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    if device_type == "cuda":
        torch.cuda.set_device(local)  # before NCCL starts, so its communicators bind to this rank's GPU
    if not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    return rank, world, local


# ----------------------------------------------------------------------------- data


LIST_KEYS = ("train_labeled", "train_unlabeled", "val_list")


def resolve_data_lists(cfg: Config) -> tuple[Config, list[str]]:
    """The config with its list files resolved, and one log line per list saying where it is read.

    Lists the data root lacks are replaced by the package's copy of the CPS paper's partition
    (``paper:...``, see :mod:`cps_fast.data.paper_lists`); the labeled and unlabeled lists of a
    partition come from the same place, never one from each. A VOC ``val_list`` of ``val.txt``
    (the presets', the reference's name) that the root lacks falls back to the dataset's own
    validation list (a plain VOCdevkit's ``ImageSets/Segmentation/val.txt``: the same 1449
    images). The returned config is the one a run saves in ``config.json``, so it records
    exactly which lists were used.
    """
    if cfg.dataset == "synthetic":
        return cfg, []
    changes, notes, where = {}, [], {}
    for key in LIST_KEYS:
        ref = getattr(cfg, key)
        value, source = _resolve_key(cfg, key)
        if value != ref:
            changes[key] = value
        if ref is not None or value is not None:
            notes.append(f"{key}: {source}")
        where[key] = "packaged" if (value or "").startswith(cdata.PAPER_PREFIX) and value != ref else "given"
    if cfg.train_labeled is not None and cfg.train_unlabeled is not None and \
            where["train_labeled"] != where["train_unlabeled"]:
        mine = "train_labeled" if where["train_labeled"] == "given" else "train_unlabeled"
        other = "train_unlabeled" if mine == "train_labeled" else "train_labeled"
        raise cdata.DataError(
            f"the data root {cfg.data_root} has the list {getattr(cfg, mine)} ({mine}) but not "
            f"{getattr(cfg, other)} ({other}); a partition's two lists must come from one place: add the "
            f"other list, remove this one to use the paper's packaged pair, or set both with --set")
    if cfg.train_labeled is None and cfg.partition is not None and cfg.method == "cps":
        notes.append(f"train_labeled/train_unlabeled: seeded partition {cfg.partition} of the train split "
                     f"(seed {cfg.seed})")
    return (cfg.replace(**changes) if changes else cfg), notes


def _resolve_key(cfg: Config, key: str) -> tuple:
    ref = getattr(cfg, key)
    try:
        return cdata.resolve_list(cfg.dataset, cfg.data_root, ref, what=key)
    except cdata.DataError:
        if not (key == "val_list" and cfg.dataset == "voc" and ref == "val.txt" and _has_default_val(cfg)):
            raise
        return None, "the dataset's own validation list (the data root has no val.txt, and cps-fast ships none)"


def resolve_eval_list(cfg: Config) -> tuple[Config, str]:
    """:func:`resolve_data_lists` for ``val_list`` alone (``cps-fast eval`` on another data root)."""
    if cfg.dataset == "synthetic":
        return cfg, ""
    value, source = _resolve_key(cfg, "val_list")
    return (cfg.replace(val_list=value) if value != cfg.val_list else cfg), f"val_list: {source}"


def _has_default_val(cfg: Config) -> bool:
    try:
        cdata.open_dataset(cfg.dataset, cfg.data_root, "val")
    except cdata.DataError:
        return False
    return True


_MISSING_HINT = {
    "voc": "the VOC ids of the paper's lists need SBD's labels too: `cps-fast prepare voc --voc "
           "VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --out DIR` writes every one of them",
    "cityscapes": "`cps-fast prepare cityscapes --root leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip "
                  "--out DIR` writes the train and val folders",
}


def _open_list(cfg: Config, key: str, split: str, labeled: bool = True):
    path = cfg.data_path(getattr(cfg, key))
    ds = cdata.open_dataset(cfg.dataset, cfg.data_root, split, path, labeled=labeled)
    cdata.check_paper_counts(cfg.dataset, path, len(ds))
    if hasattr(ds, "check_files"):
        ds.check_files(_MISSING_HINT.get(cfg.dataset, ""))
    return ds


def _overlap_note(lab, unl) -> list[str]:
    """A warning line when labeled and unlabeled lists share images (the paper's never do)."""
    if not (hasattr(lab, "paths") and hasattr(unl, "paths")):
        return []
    shared = {lab.paths(i)[0] for i in range(len(lab))} & {unl.paths(i)[0] for i in range(len(unl))}
    if not shared:
        return []
    return [f"warning: {len(shared)} images are in both the labeled and the unlabeled list "
            f"(e.g. {sorted(shared)[0]}); their labels also supervise them as unlabeled images"]


def open_training_sets(cfg: Config):
    """(labeled set, unlabeled set or None) for a config: its list files, or a seeded partition."""
    if cfg.train_labeled is not None:
        lab = _open_list(cfg, "train_labeled", "train")
        unl = None
        if cfg.method == "cps":
            if cfg.train_unlabeled is None:
                raise ConfigError(f"config {cfg.name}: train_labeled is set but train_unlabeled is not; "
                                  "CPS needs both list files (or neither, with a partition)")
            unl = _open_list(cfg, "train_unlabeled", "train", labeled=False)
            for line in _overlap_note(lab, unl):
                log.warning(line)
        return lab, unl
    full = cdata.open_dataset(cfg.dataset, cfg.data_root, "train")
    if cfg.partition is None:
        return full, (cdata.open_dataset(cfg.dataset, cfg.data_root, "train", labeled=False)
                      if cfg.method == "cps" else None)
    lab_idx, unl_idx = cdata.partition(len(full), cfg.partition, seed=cfg.seed)
    unl = None
    if cfg.method == "cps":
        unl = Subset(cdata.open_dataset(cfg.dataset, cfg.data_root, "train", labeled=False), unl_idx)
    return Subset(full, lab_idx), unl


def open_eval_set(cfg: Config):
    ds = cdata.open_dataset(cfg.dataset, cfg.data_root, "val", cfg.data_path(cfg.val_list))
    if len(ds) == 0:
        raise cdata.DataError(f"config {cfg.name}: the validation list {cfg.val_list or 'of the val split'} "
                              f"under {cfg.data_root} is empty; the run evaluates on it at the end")
    if hasattr(ds, "check_files"):
        ds.check_files(_MISSING_HINT.get(cfg.dataset, ""))
    return ds


_RUN_FILES = ("last.pt", "best.pt", "log.jsonl")


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to start a new run over an old one, unless asked: ``--resume`` continues it,
    ``--overwrite`` replaces it. Returns the old run's files that ``--overwrite`` replaces
    (checkpoints, log, TensorBoard events); the trainer removes them when training starts,
    once every other check has passed."""
    found = [name for name in _RUN_FILES if (out / name).exists()]
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run in --out, or replace it")
    if resume:
        if not (out / "last.pt").exists():
            raise ConfigError(f"--resume: {out / 'last.pt'} does not exist"
                              + (f" (the folder holds {', '.join(found)})" if found else "")
                              + "; run without --resume to start there")
        return []
    if found and not overwrite:
        raise ConfigError(f"--out {out} holds a run ({', '.join(found)}); continue it with --resume, or "
                          f"pass --overwrite to start again from iteration 0 and replace it")
    if not found:
        return []
    events = sorted((out / "tb").glob("events.out.tfevents.*")) if (out / "tb").is_dir() else []
    return [out / name for name in found] + events


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run of a :class:`~cps_fast.config.Config` into ``out_dir``."""

    def __init__(self, cfg: Config, out_dir: str | os.PathLike, *, device: str | None = None,
                 resume: bool = False, overwrite: bool = False, max_iters: int | None = None,
                 print_fn=print, step_class: type = CPSStep):
        """``step_class``: the loss module, built as ``CPSStep`` is (benchmarks/reference_step.py
        passes the reference code's unfused loss, the step benchmark's baseline)."""
        self.cfg = cfg
        self.out = Path(out_dir)
        if max_iters is not None and int(max_iters) < 1:
            raise ConfigError(f"--iters {max_iters}: expected a positive number of iterations to stop after")
        # before anything is opened or built; an old run's files go only when train() starts
        self._replace = check_out_dir(self.out, resume=resume, overwrite=overwrite)
        dev_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev_type == "cuda" and not torch.cuda.is_available():
            raise DeviceError("--device cuda: torch sees no CUDA device here (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                              "use --device cpu or run on a machine with a GPU")
        self.rank, self.world, local = init_distributed(dev_type, cfg.cuda_graph)
        self.device = torch.device(dev_type, local) if dev_type == "cuda" else torch.device("cpu")
        self.is_main = self.rank == 0
        self.print = print_fn if self.is_main else (lambda *a, **k: None)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.use_graph = cfg.cuda_graph and self.device.type == "cuda" and cfg.amp != "fp16"
        if cfg.cuda_graph and self.device.type == "cuda" and cfg.amp == "fp16":
            self.print("cuda_graph is off: the fp16 GradScaler reads its found-inf flag on the host")
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes (the reference sets it too)

        self._seed_everything(cfg.seed + self.rank)
        cfg, self.list_notes = resolve_data_lists(cfg)
        self.cfg = cfg
        self.labeled_set, self.unlabeled_set = open_training_sets(cfg)
        n_l = len(self.labeled_set)
        n_u = len(self.unlabeled_set) if self.unlabeled_set is not None else 0
        self.iters_per_epoch = cfg.iters_per_epoch_for(n_l, n_u)
        self.total_iters = cfg.total_iters(n_l, n_u)  # the LR schedule's length
        self.stop_iter = self.total_iters if max_iters is None else min(int(max_iters), self.total_iters)
        self.batch_l, self.batch_u = cfg.per_rank_batch(self.world)

        self.model = self._build_model()
        mask_gen = torch.Generator(device=self.device)  # the CutMix boxes' (checkpointed as rng "mask")
        mask_gen.manual_seed(cfg.seed * 7919 + self.rank)
        self.step_module = step_class(
            self.model, method=cfg.method, cutmix=cfg.cutmix, cps_weight=cfg.cps_weight, sup_loss=cfg.sup_loss,
            ohem_thresh=cfg.ohem_thresh, ohem_min_kept=cfg.ohem_min_kept, ignore_index=cfg.ignore_index,
            loss_backend=cfg.loss_backend, autocast_dtype=self.amp_dtype, fused_upsample=cfg.fused_upsample,
            ncps_ensemble=cfg.ncps_ensemble, cutmix_n_boxes=cfg.cutmix_n_boxes,
            cutmix_prop_range=cfg.cutmix_prop_range, mask_generator=mask_gen)
        self.step_fn = self.step_module
        if cfg.method == "supervised":  # only branch a is trained: the others take no gradients
            for branch in self.model.branches[1:]:
                branch.requires_grad_(False)
        # One side stream for DDP's construction, the eager warm-up and the capture: DDP keeps the
        # parameters' AccumulateGrad nodes, which stay bound to the stream they were made on, and
        # a capture on another stream would wait on that one (PyTorch's CUDA-graph notes).
        self._side = torch.cuda.Stream(self.device) if self.use_graph else None
        if self.world > 1:
            # one forward (the whole loss) and one backward per step; gradients are averaged
            # over ranks and the loss is NOT divided by the world size (the reference does both)
            if self._side is not None:
                self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext():
                # every trainable parameter takes a gradient every step, so no unused-parameter
                # search (it would read a device flag on the host inside the captured backward)
                self.step_fn = torch.nn.parallel.DistributedDataParallel(
                    self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    broadcast_buffers=False)
            if self._side is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._side)
        if cfg.compile:
            self.step_fn = torch.compile(self.step_fn)
        groups = param_groups(self.model, cfg.weight_decay)
        if cfg.method == "supervised":  # only branch a is trained
            others = {id(p) for branch in self.model.branches[1:] for p in branch.parameters()}
            groups = [dict(g, params=[p for p in g["params"] if id(p) not in others]) for g in groups]
        self.optimizer = SGD(groups, momentum=cfg.momentum, impl=cfg.optimizer_impl)
        self.base_lr = cfg.lr
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None

        # device state of the step: iteration counter, learning rate, running sums for logging
        self.iteration = torch.zeros((), dtype=torch.int64, device=self.device)
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, sup, cps, steps
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._scaler_view = _ScalerView(self.optimizer, self.lr) if self.scaler is not None else None
        self.start_iter = 0
        self.best_miou = float("nan")
        self.history: list[dict] = []
        self.graph = None
        self._val_set = open_eval_set(cfg)  # now: a missing or empty val list fails before training
        self.logger = RunLogger(self.out, enabled=self.is_main, print_fn=self.print)
        self.profile = ProfileWindow(self.out / "profile", iters=cfg.profile_iters, start=cfg.profile_start,
                                     tool=cfg.profiler, device=self.device, rank=self.rank, print_fn=self.print)
        self.iters_here = 0  # iterations this object has trained (the profiling window counts from here)

        if resume:
            self._resume()
            if max_iters is not None and self.stop_iter <= self.start_iter:
                raise ConfigError(f"--iters {max_iters}: {self.out / 'last.pt'} is already at iteration "
                                  f"{self.start_iter}; pass a larger --iters (the schedule has {self.total_iters})")
            if self.start_iter >= self.total_iters:
                raise ConfigError(f"--resume: {self.out / 'last.pt'} finished its schedule ({self.total_iters} "
                                  f"iterations); evaluate it with `cps-fast eval {self.out / 'last.pt'}`")
        self.it = self.start_iter  # host copy of the iteration counter
        self._t_saved = time.monotonic()

    # ------------------------------------------------------------------ setup helpers

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_model(self) -> CPSModel:
        cfg = self.cfg
        pretrained = cfg.pretrained_path()
        if pretrained is not None and not os.path.exists(pretrained):
            raise PretrainedWeightsError(
                f"config {cfg.name}: pretrained weights {pretrained!r} do not exist; put the ResNet "
                f"file there, pass --set weights_dir=FOLDER, or --set pretrained=None to train from scratch")
        model = CPSModel(cfg.backbone, cfg.num_classes, cfg.output_stride, cfg.deep_stem, pretrained,
                         seeds=tuple(cfg.seed + k for k in range(cfg.branches)), head_channels=cfg.head_channels)
        if self.world > 1 and cfg.sync_bn:
            if self.device.type == "cuda":
                model = convert_sync_batchnorm(model)
            else:  # torch's SyncBatchNorm runs on GPUs only
                self.print("sync_bn is off on CPU processes: each rank normalises with its own batch statistics")
        return model.to(self.device, memory_format=self.memory_format)

    def _loaders(self):
        cfg = self.cfg
        common = dict(crop_size=cfg.crop_size, scales=cfg.scales, flip=cfg.flip, backend=cfg.data_backend,
                      seed=cfg.seed, rank=self.rank, world_size=self.world, mean=cfg.mean, std=cfg.std,
                      num_workers=cfg.num_workers, start_iter=self.start_iter,
                      device_id=self.device.index if self.device.type == "cuda" else None)
        # an epoch passes the unlabeled set once; the labeled list repeats to that length
        length = self.iters_per_epoch * self.batch_l * self.world
        lab = cdata.labeled_loader(self.labeled_set, batch_size=self.batch_l, epoch_length=length, **common)
        if cfg.method == "supervised":
            return lab, None, None
        ulen = self.iters_per_epoch * self.batch_u * self.world
        u0 = cdata.unlabeled_loader(self.unlabeled_set, batch_size=self.batch_u, stream=0, epoch_length=ulen, **common)
        u1 = None
        if cfg.cutmix:
            u1 = cdata.unlabeled_loader(self.unlabeled_set, batch_size=self.batch_u, stream=1, epoch_length=ulen,
                                        **common)
        return lab, u0, u1

    # ------------------------------------------------------------------ the step

    def _step(self, img_l, label_l, u0, u1) -> None:
        """Forward, backward, learning rate and SGD on the device. No host synchronisation."""
        cfg = self.cfg
        self.optimizer.zero_grad()
        loss, sup, cps = self.step_fn(img_l, label_l, u0, u1)  # CutMix: the step draws the boxes
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        lr = poly_lr(self.base_lr, self.iteration, self.total_iters, cfg.poly_power)
        self.lr.copy_(lr)
        if self.scaler is not None:
            self.scaler.step(self._scaler_view)  # unscales, skips the step on inf (reads a flag: fp16 only)
            self.scaler.update()
        else:
            self.optimizer.step(self.lr)
        finite = torch.isfinite(loss.detach())
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~finite, self.iteration, self.first_bad))
        self.sums[:3].add_(torch.stack([loss.detach(), sup, cps]).double())
        self.sums[3].add_(1)
        self.iteration.add_(1)

    def _capture(self, batch_fn) -> None:
        """Warm up eagerly on a side stream, then capture :meth:`_step` into a CUDA graph."""
        self.static = [None if t is None else self._to_device(t).clone() for t in batch_fn()]
        warmup = 11 if self.world > 1 else 3  # DDP needs 11 eager iterations before capture
        stream = self._side
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for k in range(warmup):
                if k:
                    self._copy_in(batch_fn())
                self._step(*self.static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.optimizer.zero_grad()
        self._copy_in(batch_fn())
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: loader threads (pin-memory, DALI's executor) keep calling CUDA during capture
        with torch.cuda.graph(self.graph, stream=self._side, capture_error_mode="thread_local"):
            self._step(*self.static)
        self.graph.replay()  # capture records but does not run: this is the step of the batch just copied in
        return warmup + 1

    def _copy_in(self, batch) -> None:
        for dst, src in zip(self.static, batch):
            if dst is not None:
                dst.copy_(src, non_blocking=True)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            for old in self._replace:  # --overwrite: the old run goes (checked in __init__)
                old.unlink(missing_ok=True)
                self.print(f"--overwrite: removed {old}")
            self._replace = []
            save_config(cfg, self.out / "config.json")
            self.print(format_config(cfg))
            for note in self.list_notes:
                self.print(note)
            self.print(f"device {self.device} x {self.world}; {len(self.labeled_set)} labeled, "
                       f"{len(self.unlabeled_set) if self.unlabeled_set is not None else 0} unlabeled images; "
                       f"{self.iters_per_epoch} iterations/epoch, schedule {self.total_iters} iterations, "
                       f"running {self.start_iter} -> {self.stop_iter}")
        self.model.train()
        self.logger.start(self.start_iter, self.stop_iter)
        try:
            # SIGINT / SIGTERM during training: finish the step, save last.pt, stop (see _interrupted)
            with _StopSignals(self.world) as self._stop_signals:
                it = self.run(self.stop_iter, evaluate=True)
                self.profile.close()  # a window the run cut short
                with phase("checkpoint"):  # before the final evaluation: a failure there loses no training
                    if self._last_saved != it:
                        self._save(it)
                signum = self._stop_signals.settle()  # a signal in the last step: every rank agrees
                if signum:
                    self._interrupted(it, signum)
            self._stop_signals = None
            # the final evaluation runs under the previous handlers: a Ctrl-C there stops it at once
            with phase("eval"):
                result = self._evaluate(it)
            if it < self.total_iters:  # the run can be continued: its last.pt must know this evaluation
                with phase("checkpoint"):  # (a continued run's best mIoU decides whether best.pt is replaced)
                    self._save(it)
        finally:
            self._stop_signals = None
            self.profile.close()
            self.logger.close()
        return result

    def batches(self):
        """Yields ``[img_l, label_l, u0, u1]`` as the loaders give them (None where unused), from the
        resume position. The eager step moves them to the device; a replayed graph copies them
        straight into its static buffers. Closing the generator closes the loaders: their worker
        processes stop then, not whenever garbage collection reaches them (a DataLoader iterator
        in a reference cycle, whose shutdown joins each worker for up to 5 s, in the middle of
        whatever the process does next)."""
        loaders = [x for x in self._loaders() if x is not None]
        try:
            streams = [iter(x) for x in loaders]
            while True:
                b = [next(s) for s in streams]
                us = [x["image"] for x in b[1:]] + [None, None]
                yield [b[0]["image"], b[0]["label"], us[0], us[1]]
        finally:
            for x in loaders:
                if hasattr(x, "close"):  # TorchLoader: worker processes (DALI's threads stop with it)
                    x.close()

    def run(self, stop: int, *, evaluate: bool = False, batches=None) -> int:
        """Train from the current iteration to ``stop``; logs, and evaluates and saves when asked.

        Returns the iteration reached (a CUDA-graph capture runs a few warm-up steps at once).
        Without ``batches``, the run's own loaders are closed when it ends, however it ends.
        """
        if batches is not None:
            return self._run(stop, evaluate, batches)
        with contextlib.closing(self.batches()) as own:
            return self._run(stop, evaluate, own)

    def _run(self, stop: int, evaluate: bool, batches) -> int:
        cfg = self.cfg
        it = self.it
        t_window, n_window = time.perf_counter(), 0
        while it < stop:
            self.profile.before(self.iters_here)
            if self.use_graph and self.graph is None and stop - it > 12:
                with phase("capture"):
                    done = self._capture(lambda: next(batches))
            elif self.graph is not None:
                with phase("data"):
                    self._copy_in(next(batches))
                with phase("step"):
                    self.graph.replay()
                done = 1
            else:  # CPU, --no-cuda-graph, or too few iterations left to be worth a capture
                with phase("data"):
                    batch = [self._to_device(t) for t in next(batches)]
                with phase("step"):
                    self._step(*batch)
                del batch  # not alive beside the next one (peak memory)
                done = 1
            it += done
            n_window += done
            self.it = it
            self.iters_here += done
            if it % cfg.log_every < done or it >= self.stop_iter:
                with phase("log"):
                    self._log(it, n_window, time.perf_counter() - t_window)
                t_window, n_window = time.perf_counter(), 0
            if evaluate and cfg.eval_every and (it % cfg.eval_every < done) and it < stop:
                with phase("eval"):
                    self._evaluate(it)
            if evaluate and self._checkpoint_due(it, done):
                with phase("checkpoint"):
                    self._save(it)
            self.profile.after(done)
            signum = self._stop_signals.poll() if self._stop_signals is not None else 0
            if signum:  # a finished step: the state is consistent
                if n_window:  # the losses since the last log line (a host read: we are stopping anyway)
                    with phase("log"):
                        self._log(it, n_window, time.perf_counter() - t_window)
                self._interrupted(it, signum)
        return it

    def _to_device(self, t):
        if t is None:
            return None
        t = t.to(self.device, non_blocking=True)
        if t.dim() == 4:
            t = t.contiguous(memory_format=self.memory_format)
        return t

    def _log(self, it: int, n_steps: int, seconds: float) -> None:
        sums = self.sums.tolist()  # the only host read of the loop, every log_every iterations
        self.sums.zero_()
        bad = int(self.first_bad)
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at iteration {bad} (config {self.cfg.name}); lower the learning rate, "
                "check the data, or try amp=fp32")
        steps = max(sums[3], 1.0)
        per_step = self.batch_l
        if self.cfg.method == "cps":
            per_step += self.batch_u * (2 if self.cfg.cutmix else 1)
        imgs = n_steps * per_step * self.world
        row = {"iter": it, "loss": sums[0] / steps, "sup": sums[1] / steps, "cps": sums[2] / steps,
               "lr": float(self.lr), "images_per_s": imgs / max(seconds, 1e-9)}
        self.logger.scalars(it, row)

    # ------------------------------------------------------------------ evaluation and checkpoints

    def _evaluate(self, it: int) -> dict:
        cfg = self.cfg
        self.model.eval()
        try:
            if self._val_set is None:
                self._val_set = open_eval_set(cfg)
            val = self._val_set
            with torch.no_grad():
                metrics = evaluate(
                    lambda x: self.model(x.contiguous(memory_format=self.memory_format)), val, cfg.num_classes,
                    crop_size=cfg.eval_crop, stride_rate=cfg.eval_stride_rate, flip=cfg.eval_flip,
                    scales=cfg.eval_scales, mean=cfg.mean, std=cfg.std, device=self.device,
                    ignore_index=cfg.ignore_index, batch_size=cfg.eval_batch_size, autocast_dtype=self.amp_dtype,
                    rank=self.rank, world_size=self.world, max_items=cfg.eval_max_items,
                    class_names=getattr(val, "class_names", None), print_fn=self.print)
        finally:
            self.model.train()
        miou = 100.0 * float(metrics["miou"])
        row = {"iter": it, "miou": miou, "pixel_acc": 100.0 * float(metrics["pixel_acc"]),
               "iou": [float(x) for x in metrics["iou"]]}
        self.history.append(row)
        self.logger.scalars(it, {"val/miou": miou})
        self.logger.images(it, self.model, val, cfg, self.device, self.memory_format)
        if self.is_main:
            self.print(metrics.table(getattr(val, "class_names", None)))
            paper = f" (paper: {cfg.paper_miou:.2f})" if cfg.paper_miou else ""
            self.print(f"iter {it}: mIoU {miou:.2f}{paper}")
        if not (miou <= self.best_miou):  # also true for the first (NaN best)
            self.best_miou = miou
            # picking the best checkpoint on val is the reference's practice; last.pt is the honest one
            self._save(it, name="best.pt")
        return row

    def _state(self, it: int) -> dict:
        return {
            "format": "cps-fast/1",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "iteration": int(it),
            "total_iters": int(self.total_iters),
            "data_position": int(it),  # batches consumed per loader; the loaders resume there
            "rng": {"torch": torch.get_rng_state(), "mask": self.step_module.mask_generator.get_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "best_miou": self.best_miou,
            "history": json.dumps(self.history),
            "config": json.dumps(self.cfg.to_dict()),
        }

    def _checkpoint_due(self, it: int, done: int) -> bool:
        """Every ``checkpoint_every`` iterations, and when ``checkpoint_minutes`` passed since the
        last save (rank 0's clock decides: saving involves no other rank)."""
        cfg = self.cfg
        if cfg.checkpoint_every and it % cfg.checkpoint_every < done:
            return True
        return bool(self.is_main and cfg.checkpoint_minutes
                    and time.monotonic() - self._t_saved >= 60.0 * cfg.checkpoint_minutes)

    def _save(self, it: int, name: str = "last.pt") -> None:
        if self.is_main:
            state = self._state(it)
            if name != "last.pt":  # best.pt is for evaluation and fine-tuning, not for resuming
                del state["optimizer"], state["scaler"]
            save_checkpoint(state, self.out / name)
        if name == "last.pt":
            self._last_saved = it
            self._t_saved = time.monotonic()

    # ------------------------------------------------------------------ stopping on a signal

    _stop_signals: "_StopSignals | None" = None  # set while train() runs the loop
    _last_saved: int | None = None               # the iteration last.pt holds, if this run wrote it
    _t_saved: float = time.monotonic()           # when last.pt was last written (or the trainer made)
    resume_command: str | None = None            # the hint printed on a stop; `cps-fast train` sets it

    def _interrupted(self, it: int, signum: int) -> None:
        """Save ``last.pt`` at iteration ``it`` (a finished step), print how to continue, and stop:
        ``KeyboardInterrupt`` for SIGINT, ``SystemExit(128 + signum)`` for SIGTERM (status 143).

        Signals that arrive while it saves only set the flag again, and the file is written to a
        temporary name and renamed, so the previous ``last.pt`` or the new one is always whole.
        """
        with phase("checkpoint"):
            if self._last_saved != it:
                self._save(it)
        if self._stop_signals is not None:
            self._stop_signals.barrier()  # no rank exits before rank 0's file is in place
        command = self.resume_command or (f"cps-fast train {shlex.quote(self.cfg.name)} "
                                          f"--out {shlex.quote(str(self.out))} --resume")
        self.print(f"interrupted at iteration {it}: saved {self.out / 'last.pt'}; continue with: {command}")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(f"interrupted at iteration {it}")
        raise SystemExit(128 + int(signum))

    def _resume(self) -> None:
        path = self.out / "last.pt"
        state = load_checkpoint(path)
        saved = json.loads(state["config"])
        differ = recipe_differences(saved, self.cfg)
        if differ:
            raise CheckpointError(f"{path}: the checkpoint's recipe differs from this run's in "
                                  + ", ".join(f"{k}={saved[k]!r} but the config has {getattr(self.cfg, k)!r}"
                                              for k in differ)
                                  + "; resume with the same preset and overrides (or start a new --out)")
        if int(state.get("total_iters", self.total_iters)) != self.total_iters:
            raise CheckpointError(f"{path}: the checkpoint's schedule has {state['total_iters']} iterations but "
                                  f"this run's has {self.total_iters} (other data lists?); resume with the same data")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_iter = int(state["iteration"])
        self.iteration.fill_(self.start_iter)
        torch.set_rng_state(state["rng"]["torch"])
        self.step_module.mask_generator.set_state(state["rng"]["mask"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.best_miou = float(state["best_miou"])
        self.history = json.loads(state["history"])
        self.print(f"resumed from {path} at iteration {self.start_iter}")


class _ScalerView:
    """Adapts :class:`SGD` to ``GradScaler.unscale_`` / ``step`` (fp16 runs only, not captured)."""

    def __init__(self, opt: SGD, lr: torch.Tensor | None = None):
        self.opt, self.lr = opt, lr
        self.param_groups = [{"params": g["params"]} for g in opt.groups]
        self.state = {}

    def step(self, *args, **kwargs):
        self.opt.step(self.lr)


class _StopSignals:
    """SIGINT and SIGTERM during training set a flag that the loop reads after each finished step.

    A context manager: it installs its handler in the main thread only (``signal`` allows no
    other) and restores the previous handlers on exit, error or not. A signal is never acted on
    mid-step; further signals only set the flag again.

    Under DDP the ranks must stop at the same iteration, or one waits forever in the next
    gradient all-reduce. A signal usually reaches every rank (a terminal's Ctrl-C reaches the
    process group; torchrun forwards what it receives), but not necessarily between the same two
    steps. So each step all-reduces the flag (MAX) over a CPU (gloo) group, asynchronously: step
    i launches it and step i + 1 reads the result, identical on every rank, so every rank stops
    at the same iteration, at most one step after the first rank saw the signal. It is one
    8-byte message per step on the host and never a device synchronisation; reading it waits
    only for the slowest rank's host to have finished step i (on CPU ranks the gradient
    all-reduce of step i + 1 already did).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world_size: int = 1):
        self.signum = 0
        self._previous: dict = {}
        self._group = None
        self._work = None
        self._flag = None
        if world_size > 1 and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # every rank enters train(): same call order

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if exc_type is None and self._work is not None:  # every rank launched it: it completes
            self._work.wait()
        self._work = None

    def _handler(self, signum, frame) -> None:
        if not self.signum:
            self.signum = int(signum)

    def poll(self) -> int:
        """The signal to stop on after this step, or 0; under DDP the same on every rank."""
        if self._group is None:
            return self.signum
        agreed = 0
        if self._work is not None:
            self._work.wait()
            self._work, agreed = None, int(self._flag[0])
        if agreed:
            return agreed
        self._flag = torch.tensor([self.signum], dtype=torch.int64)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return 0

    def settle(self) -> int:
        """After the loop: the signal any rank received so far, or 0 (one blocking all-reduce)."""
        if self._group is None:
            return self.signum
        if self._work is not None:
            self._work.wait()
            self._work = None
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag[0])

    def barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)
