"""The trainer's configuration: one flat, typed, frozen dataclass.

The paper's presets are one table and one rule (``cps_fast/configs/paper.py``: a row per
dataset, backbone, partition and CutMix); ``demo`` and a user's own presets are flat Python
files, a handful of ``key = value`` assignments. Both sit on top of the defaults below, which
carry the reference recipe shared by all rows. There is no inheritance between presets: what a
preset does not set is the default here.

::

    cfg = load_preset("voc_r50_1-8_cutmix")
    cfg = apply_overrides(cfg, ["lr=0.005", "eval_scales=0.75,1,1.25", "pretrained=None"])
    print(format_config(cfg))
    save_config(cfg, "run/config.json")

Overrides refuse unknown keys (suggesting the closest) and values that do not
parse as the field's type, as nanoGPT's configurator does. docs/presets.md lists
where every preset number comes from.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from .configs import paper
from .errors import ConfigError  # defined in the leaf errors module, so cps_fast.data needs no config

__all__ = [
    "Config",
    "ConfigError",
    "PRESET_DIR",
    "apply_overrides",
    "format_config",
    "keys_table",
    "list_presets",
    "load_config",
    "load_preset",
    "presets_table",
    "save_config",
]

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def _f(default, section: str, help: str):
    return field(default=default, metadata={"section": section, "help": help})


@dataclass(frozen=True)
class Config:
    """Every setting of a cps-fast training run (see ``format_config`` for a listing).

    Batch sizes are global (summed over GPUs), as in the reference code; the data
    loaders split them over ranks. Paths that are relative resolve against
    ``data_root`` (list files) or ``weights_dir`` (``pretrained``).
    """

    # --- experiment
    name: str = _f("custom", "experiment", "run name (the preset's name when loaded from one)")
    method: Literal["cps", "supervised"] = _f(
        "cps", "experiment", "'cps': two branches with cross pseudo supervision; 'supervised': labeled data only")
    seed: int = _f(12345, "experiment", "random seed (reference: 12345)")

    # --- data
    dataset: Literal["voc", "cityscapes", "synthetic"] = _f("voc", "data", "dataset name for cps_fast.data.open_dataset")
    data_root: Optional[str] = _f(None, "data", "dataset folder (or the synthetic spec string)")
    num_classes: int = _f(21, "data", "number of classes (VOC 21, Cityscapes 19)")
    partition: Optional[str] = _f(
        None, "data", "labeled part of the train set, a fraction ('1/8') or a count ('662'): without list files "
        "(train_labeled and train_unlabeled None) the run draws this seeded partition of the train split (seed); "
        "with list files it names the row (the schedule column of `cps-fast presets`)")
    train_labeled: Optional[str] = _f(None, "data", "list file of labeled training items (relative to data_root)")
    train_unlabeled: Optional[str] = _f(None, "data", "list file of unlabeled training items (relative to data_root)")
    val_list: Optional[str] = _f(None, "data", "list file of the evaluation items (None: the dataset's 'val' split)")
    crop_size: int = _f(512, "data", "training crop, square (VOC 512, Cityscapes 800)")
    batch_size_labeled: int = _f(8, "data", "labeled images per step, global over all GPUs")
    batch_size_unlabeled: int = _f(8, "data", "unlabeled images per step, global over all GPUs")
    scales: tuple[float, ...] = _f((0.5, 0.75, 1.0, 1.5, 1.75, 2.0), "data", "random rescale factors")
    flip: bool = _f(True, "data", "random horizontal flip")
    mean: tuple[float, float, float] = _f((0.485, 0.456, 0.406), "data", "RGB mean of image/255")
    std: tuple[float, float, float] = _f((0.229, 0.224, 0.225), "data", "RGB std of image/255")
    ignore_index: int = _f(255, "data", "label value that is ignored")
    data_backend: Literal["auto", "dali-gpu", "dali-cpu", "pytorch"] = _f("auto", "data", "loader backend")
    num_workers: int = _f(4, "data", "loader worker processes/threads per rank")

    # --- model
    backbone: Literal["resnet18", "resnet50", "resnet101"] = _f("resnet50", "model", "DeepLabv3+ backbone")
    output_stride: Literal[8, 16] = _f(16, "model", "backbone output stride (reference: 16, layer4 dilated)")
    deep_stem: bool = _f(True, "model", "ResNet-v1c deep stem (three 3x3 convs)")
    head_channels: int = _f(256, "model", "ASPP and decoder width (reference: 256; narrower for CPU experiments)")
    pretrained: Optional[str] = _f(None, "model", "backbone weights file (relative to weights_dir); None = random init")
    weights_dir: Optional[str] = _f(None, "model", "folder for relative 'pretrained' paths (None: current directory)")
    sync_bn: bool = _f(True, "model", "SyncBatchNorm across GPUs under DDP (reference: yes)")
    branches: int = _f(2, "model", "networks trained together: 2 is CPS, more is n-CPS (each supervised by "
                       "every other branch's pseudo labels)")

    # --- optimisation
    lr: float = _f(0.0025, "optim", "base learning rate of SGD, for the global batch (set it anew for another batch)")
    momentum: float = _f(0.9, "optim", "SGD momentum")
    optimizer_impl: Literal["auto", "fused", "foreach"] = _f(
        "auto", "optim", "SGD kernels: torch's fused SGD (auto: where torch has it for the device), or foreach")
    weight_decay: float = _f(1e-4, "optim", "SGD weight decay (not applied to normalisation parameters and biases)")
    poly_power: float = _f(0.9, "optim", "poly schedule: lr * (1 - it / total) ** power, per iteration")
    epochs: int = _f(34, "optim", "epochs over the unlabeled set (the labeled list is repeated to match)")
    iters_per_epoch: Optional[int] = _f(
        None, "optim", "None: reference rule floor(max(n_labeled, n_unlabeled) / batch_size_unlabeled)")
    max_iters: Optional[int] = _f(None, "optim", "total iterations; None: epochs * iters_per_epoch")

    # --- CPS loss
    cps_weight: float = _f(1.5, "loss", "weight of the cross pseudo supervision term")
    cutmix: bool = _f(False, "loss", "CutMix the unlabeled images (two different images u0, u1)")
    cutmix_n_boxes: int = _f(3, "loss", "boxes per CutMix mask")
    cutmix_prop_range: tuple[float, float] = _f((0.25, 0.5), "loss", "range of the box area proportion")
    ncps_ensemble: bool = _f(False, "loss", "n-CPS (branches > 2): supervise each branch by the argmax of the "
                             "other branches' mean softmax instead of averaging over their argmaxes")
    sup_loss: Literal["ce", "ohem"] = _f("ce", "loss", "supervised loss: cross-entropy or OHEM cross-entropy")
    ohem_thresh: float = _f(0.7, "loss", "OHEM: keep pixels whose true-class probability is below this")
    ohem_min_kept: int = _f(50000, "loss", "OHEM: keep at least this many pixels per labeled image")
    loss_backend: Optional[str] = _f(None, "loss", "force a backend of the fused loss (triton|cuda|cpu|torch); None = auto")

    # --- performance
    amp: Literal["bf16", "fp16", "fp32"] = _f("bf16", "perf", "autocast dtype (fp16 uses a GradScaler)")
    channels_last: bool = _f(True, "perf", "channels-last memory format end to end")
    cuda_graph: bool = _f(True, "perf", "capture the training step in a CUDA graph")
    fused_upsample: Union[Literal["auto"], bool] = _f(
        "auto", "perf", "compute the CPS loss from decoder-resolution logits with the bilinear upsampling fused in "
        "(cps_loss_upsampled): 'auto' where it applies (two branches, loss_backend not 'cuda'), true (refused "
        "where it does not apply) or false")
    compile: bool = _f(False, "perf", "torch.compile the model")
    profile_iters: int = _f(0, "perf", "record this many iterations with torch.profiler and write "
                            "OUT/profile/ (trace, operator table, summary); 0: off")
    profile_start: int = _f(10, "perf", "iterations of the run before the profiled ones (past the "
                            "CUDA-graph capture and the allocator's warm-up)")
    profiler: Literal["torch", "nsys"] = _f(
        "torch", "perf", "torch: torch.profiler writes the files; nsys: only cudaProfilerStart/Stop around the "
        "window, for nsys profile --capture-range=cudaProfilerApi")

    # --- evaluation
    eval_every: int = _f(0, "eval", "evaluate every N iterations (0: only at the end)")
    eval_crop_size: Optional[int] = _f(None, "eval", "sliding-window size (None: crop_size, "
                                      "and follows it when crop_size is overridden)")
    eval_stride_rate: float = _f(2 / 3, "eval", "window stride as a fraction of the window (reference: 2/3)")
    eval_flip: bool = _f(False, "eval", "average with the flipped image (reference: off)")
    eval_scales: tuple[float, ...] = _f((1.0,), "eval", "test scales (reference: 1.0 only)")
    eval_batch_size: int = _f(8, "eval", "images per forward when an image fits one window")
    eval_max_items: Optional[int] = _f(None, "eval", "evaluate only the first N items (None: all)")

    # --- logging and checkpoints
    log_every: int = _f(50, "log", "print losses every N iterations (device scalars read only then)")
    checkpoint_every: int = _f(1000, "log", "save DIR/last.pt every N iterations (0: not by count)")
    checkpoint_minutes: float = _f(30.0, "log", "also save DIR/last.pt when this many minutes passed since "
                                   "the last save (0: not by time); SIGINT, SIGTERM and the end always save")

    # --- reference numbers (what a run of this preset should reach)
    paper_miou: Optional[float] = _f(None, "reference", "published mIoU (%) of this row, CPS paper Tables 1-2")
    paper_source: Optional[str] = _f(None, "reference", "where paper_miou and the recipe come from")

    def __post_init__(self):
        hints = _type_hints()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _refuse_removed_value(f.name, value)
            try:
                coerced = _coerce(value, hints[f.name])
            except ConfigError as e:
                raise ConfigError(f"config key {f.name!r}: {e}") from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self._check_ranges()

    def _check_ranges(self) -> None:
        def need(cond: bool, key: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"config key {key!r} = {getattr(self, key)!r}: expected {expected}")

        for f in dataclasses.fields(self):  # inf or nan anywhere is a typo, and JSON cannot hold it
            value = getattr(self, f.name)
            floats = value if isinstance(value, tuple) else (value,)
            need(all(not isinstance(v, float) or math.isfinite(v) for v in floats), f.name, "finite numbers")
        need(self.num_classes >= 2, "num_classes", "at least 2")
        need(self.crop_size >= 1, "crop_size", "a positive size in pixels")
        need(self.batch_size_labeled >= 1, "batch_size_labeled", "at least 1")
        need(self.batch_size_unlabeled >= 1, "batch_size_unlabeled", "at least 1")
        need(len(self.scales) >= 1 and all(s > 0 for s in self.scales), "scales", "positive factors")
        need(all(0 <= m <= 1 for m in self.mean), "mean",
             "the RGB mean of image / 255, each in [0, 1], e.g. 0.485,0.456,0.406 (values such as 123.675,116.28,"
             "103.53 are the 0-255 convention of mmsegmentation and DALI: divide them by 255)")
        need(all(0 < s <= 1 for s in self.std), "std",
             "the RGB std of image / 255, each in (0, 1], e.g. 0.229,0.224,0.225 (values such as 58.395,57.12,"
             "57.375 are the 0-255 convention of mmsegmentation and DALI: divide them by 255)")
        need(0 <= self.ignore_index <= 255, "ignore_index", "a value in 0..255")
        need(self.ignore_index >= self.num_classes, "ignore_index", f"not a class index (>= num_classes={self.num_classes})")
        need(self.num_workers >= 0, "num_workers", ">= 0")
        need(self.lr > 0, "lr", "a positive learning rate")
        need(0 <= self.momentum < 1, "momentum", "a value in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.poly_power >= 0, "poly_power", ">= 0")
        need(self.epochs >= 1, "epochs", "at least 1")
        need(self.iters_per_epoch is None or self.iters_per_epoch >= 1, "iters_per_epoch", "None or at least 1")
        need(self.max_iters is None or self.max_iters >= 1, "max_iters", "None or at least 1")
        need(self.cps_weight >= 0, "cps_weight", ">= 0")
        need(2 <= self.branches <= 8, "branches", "from 2 to 8")
        need(self.cutmix_n_boxes >= 1, "cutmix_n_boxes", "at least 1")
        lo, hi = self.cutmix_prop_range
        need(0 <= lo <= hi <= 1, "cutmix_prop_range", "(low, high) with 0 <= low <= high <= 1")
        need(0 < self.ohem_thresh <= 1, "ohem_thresh", "a probability in (0, 1]")
        need(self.ohem_min_kept >= 0, "ohem_min_kept", ">= 0")
        need(self.loss_backend in (None, "triton", "cuda", "cpu", "torch"), "loss_backend",
             "None or one of 'triton', 'cuda', 'cpu', 'torch'")
        why_not = fused_upsample_unavailable(self.branches, self.loss_backend)
        need(self.fused_upsample is not True or why_not is None, "fused_upsample",
             f"'auto' or false, since the upsample-fused loss (cps_loss_upsampled) {why_not}")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.eval_crop_size is None or self.eval_crop_size >= 1, "eval_crop_size", "None or a positive size")
        need(0 < self.eval_stride_rate <= 1, "eval_stride_rate", "a fraction in (0, 1]")
        need(len(self.eval_scales) >= 1 and all(s > 0 for s in self.eval_scales), "eval_scales", "positive factors")
        need(self.eval_batch_size >= 1, "eval_batch_size", "at least 1")
        need(self.eval_max_items is None or self.eval_max_items >= 1, "eval_max_items", "None or at least 1")
        need(self.log_every >= 1, "log_every", "at least 1")
        need(self.checkpoint_every >= 0, "checkpoint_every", ">= 0")
        need(self.checkpoint_minutes >= 0, "checkpoint_minutes", ">= 0 minutes")
        need(self.profile_iters >= 0, "profile_iters", ">= 0 (0: no profiling)")
        need(self.profile_start >= 0, "profile_start", ">= 0")

    # ------------------------------------------------------------ derived values

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied (validated; unknown keys refused)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> "Config":
        """Build from a dict such as ``to_dict()`` wrote; unknown keys are refused, and so are
        removed keys (``_REMOVED_KEYS``) unless they hold their old default."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(d).__name__}")
        d = _drop_removed_keys(d, source)
        _check_keys(d, source)
        if d.get("fused_upsample") is True and fused_upsample_unavailable(d.get("branches", 2),
                                                                          d.get("loss_backend")) is not None:
            # written before 'auto' existed, when true (the default) meant "where it applies"; no
            # later version writes true where it does not apply (refused), so this is that meaning
            d = {**d, "fused_upsample": "auto"}
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @property
    def eval_crop(self) -> int:
        """The sliding-window size used for evaluation."""
        return self.eval_crop_size if self.eval_crop_size is not None else self.crop_size

    def per_rank_batch(self, world_size: int) -> tuple[int, int]:
        """(labeled, unlabeled) images per rank; the global batches must divide evenly."""
        if world_size < 1:
            raise ConfigError(f"world_size must be at least 1, got {world_size}")
        for key in ("batch_size_labeled", "batch_size_unlabeled"):
            if getattr(self, key) % world_size:
                raise ConfigError(
                    f"config key {key!r} = {getattr(self, key)} is the global batch and must be divisible by "
                    f"the number of processes ({world_size})"
                )
        return self.batch_size_labeled // world_size, self.batch_size_unlabeled // world_size

    def iters_per_epoch_for(self, num_labeled: int, num_unlabeled: int) -> int:
        """Iterations in one epoch. The reference's rule (``C.niters_per_epoch``):
        an epoch passes every unlabeled image once, ``floor(max(n_l, n_u) / batch)``
        (its config writes ``ceil(max_samples * 1.0 // batch_size)``, which is a floor).
        Supervised runs count epochs over the labeled set."""
        if self.iters_per_epoch is not None:
            return self.iters_per_epoch
        if self.method == "supervised":
            return max(1, num_labeled // self.batch_size_labeled)
        return max(1, max(num_labeled, num_unlabeled) // self.batch_size_unlabeled)

    def total_iters(self, num_labeled: int, num_unlabeled: int) -> int:
        """Total training iterations (``max_iters`` or ``epochs * iters_per_epoch``)."""
        if self.max_iters is not None:
            return self.max_iters
        return self.epochs * self.iters_per_epoch_for(num_labeled, num_unlabeled)

    def data_path(self, rel: Optional[str]) -> Optional[str]:
        """A list-file path resolved against ``data_root`` (absolute paths unchanged;
        ``paper:...`` names a list packaged with cps-fast, see cps_fast.data.paper_lists)."""
        if rel is not None and rel.startswith("paper:"):
            from .data.paper_lists import paper_list_path

            return str(paper_list_path(rel))
        if rel is None or os.path.isabs(rel) or self.data_root is None:
            return rel
        return os.path.join(self.data_root, rel)

    def pretrained_path(self) -> Optional[str]:
        """``pretrained`` resolved against ``weights_dir`` (absolute paths unchanged)."""
        p = self.pretrained
        if p is None or os.path.isabs(p) or self.weights_dir is None:
            return p
        return os.path.join(self.weights_dir, p)


# ---------------------------------------------------------------- type handling

_HINTS: Optional[dict] = None


def _type_hints() -> dict:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(Config)
    return _HINTS


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + (" or None" if type(None) in args else "")
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        elem = getattr(args[0], "__name__", str(args[0]))
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {elem}s"
        return f"{len(args)} comma-separated {elem}s"
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp):
    """Check ``value`` against the field type ``tp``; convert the harmless cases
    (int -> float, list -> tuple). Raise ConfigError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0])
        for alternative in inner:  # in order: Literal["auto"] before bool
            try:
                return _coerce(value, alternative)
            except ConfigError:
                pass
        raise ConfigError(f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            elem = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise ConfigError(f"expected {_describe(tp)}, got {len(value)} value(s): {value!r}")
            elem = list(args)
        out = tuple(_coerce(v, t) for v, t in zip(value, elem))
        return value if isinstance(value, tuple) and out == value else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}")
        return value
    raise ConfigError(f"unsupported field type {tp}")  # pragma: no cover


_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}
_NONE = {"none", "null", "~"}


def _parse_scalar(text: str, tp):
    t = text.strip()
    if tp is bool:
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ValueError
    if tp is int:
        return int(t)
    if tp is float:
        if "/" in t:  # "2/3"
            num, den = t.split("/", 1)
            return float(num) / float(den)
        return float(t)
    if tp is str:
        if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
            return t[1:-1]
        return t
    raise ValueError


def _parse(text: str, tp):
    """Parse an override's text as type ``tp``; raise ValueError when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        for alternative in [a for a in args if a is not type(None)]:  # in order: 'auto' before a bool
            try:
                return _parse(text, alternative)
            except ValueError:
                pass
        raise ValueError
    if origin is Literal:
        kind = type(args[0])
        value = _parse_scalar(text, kind)
        if value not in args:
            raise ValueError
        return value
    if origin is tuple:
        t = text.strip()
        if t[:1] in "([" and t[-1:] in ")]":
            t = t[1:-1]
        parts = [p for p in (s.strip() for s in t.split(",")) if p]
        elem = [args[0]] * len(parts) if (len(args) == 2 and args[1] is Ellipsis) else list(args)
        if len(parts) != len(elem) or not parts:
            raise ValueError
        return tuple(_parse_scalar(p, e) for p, e in zip(parts, elem))
    return _parse_scalar(text, tp)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _check_keys(keys, source: str = "config") -> None:
    names = _field_names()
    for k in keys:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {k!r}{hint} "
                              f"(`cps-fast presets --keys` lists every key with its help)")


# Keys that earlier versions had and that no preset, test or user set. A config.json or checkpoint
# written then holds them; it still loads when such a key holds its old default (with which it
# changed nothing), and is refused otherwise: today's code would silently train another recipe.
_REMOVED_KEYS = {
    "lr_scaling": ("none", "set lr to the rate meant for the global batch instead"),
    "lr_reference_batch": (8, "set lr to the rate meant for the global batch instead"),
    "warmup_iters": (0, "cps-fast has no learning-rate warm-up (the reference recipe has none)"),
}


def _drop_removed_keys(d: dict, source: str) -> dict:
    """``d`` without the keys of ``_REMOVED_KEYS``; a ConfigError naming the key if one holds
    another value than its old default."""
    out = dict(d)
    for key, (default, instead) in _REMOVED_KEYS.items():
        if key not in out:
            continue
        value = out.pop(key)
        if isinstance(value, bool) or value != default:
            raise ConfigError(f"{source}: config key {key!r} = {value!r} was removed from cps-fast; only its old "
                              f"default {default!r}, with which it changed nothing, still loads. {instead[0].upper()}"
                              f"{instead[1:]} (or use the cps-fast version that wrote this config)")
    return out


# Values that a key held in earlier versions and no longer takes: a config.json, checkpoint,
# preset or override holding one is refused with what to do instead (not a bare "expected").
_REMOVED_VALUES = {
    ("loss_backend", "reference"): (
        "the reference code's unfused loss is now the step benchmark's baseline, `cps-fast bench step "
        "--variants reference`, in benchmarks/reference_step.py",
        "use None (automatic) or one of 'triton', 'cuda', 'cpu', 'torch'"),
    ("optimizer_impl", "apex"): (
        "NVIDIA apex's FusedSGD took the learning rate on the host and could not run in a CUDA graph",
        "use 'auto' or 'fused' (torch's fused SGD, the same update from a device learning rate), or 'foreach'"),
}


def _refuse_removed_value(key: str, value) -> None:
    if isinstance(value, str) and (key, value) in _REMOVED_VALUES:
        why, instead = _REMOVED_VALUES[key, value]
        raise ConfigError(f"config key {key!r} = {value!r} was removed from cps-fast ({why}); {instead}")


def fused_upsample_unavailable(branches: int, loss_backend: Optional[str]) -> Optional[str]:
    """Why the upsample-fused loss cannot run with these settings, or None where it can
    (``fused_upsample="auto"`` turns it on exactly there, and ``True`` is refused elsewhere)."""
    if branches != 2:
        return f"takes two branches, not branches={branches}"
    if loss_backend == "cuda":
        return "has no 'cuda' backend (the CUDA C++ extension has no upsample kernel): loss_backend='cuda'"
    return None


# ---------------------------------------------------------------- public helpers


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Return ``cfg`` with ``["key=value", ...]`` applied.

    Values parse by the field's type: ints, floats (also ``2/3``), bools
    (true/false/1/0/yes/no/on/off), strings, comma-separated tuples (``0.5,1.0``,
    optionally in brackets), and ``None`` (also ``null``) for optional fields.
    Unknown keys and values that do not parse raise :class:`ConfigError` naming the
    key, what was given and what was expected."""
    if isinstance(overrides, str):
        overrides = [overrides]
    hints = _type_hints()
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        _check_keys([key], f"override {item!r}")
        tp = hints[key]
        try:
            _refuse_removed_value(key, _parse_scalar(text, str))
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        try:
            changes[key] = _parse(text, tp)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(
                f"override {item!r}: {key} expects {_describe(tp)}, got {text!r}"
            ) from None
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError as e:
        raise ConfigError(f"overrides {list(overrides)}: {e}") from None


def _file_presets() -> list[str]:
    """The bundled presets that are files in ``cps_fast/configs/`` (``demo``); ``paper.py`` is the table."""
    return [p.stem for p in PRESET_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "paper"]


def list_presets() -> list[str]:
    """Names of the bundled presets, sorted: the paper's table (``cps_fast/configs/paper.py``)
    and the preset files beside it (``demo``)."""
    return sorted(paper.names() + _file_presets())


def load_preset(name: str) -> Config:
    """Load a bundled preset by name (a row of the paper's table, or ``demo``), a preset file by
    path (``*.py``), or the ``config.json`` that a run wrote (``*.json``: :func:`load_config`), so
    a run's resolved config trains again.

    A preset file is executed in an empty namespace; every public top-level name it
    assigns must be a config key (modules and functions imported there are skipped).
    """
    path = Path(name)
    if name.endswith(".json"):
        if not path.is_file():
            raise ConfigError(f"config file {name!r} does not exist")
        return load_config(path)
    if name.endswith(".py") or os.sep in name:
        if not path.is_file():
            raise ConfigError(f"preset file {name!r} does not exist")
    elif (row := paper.parse_name(name)) is not None:
        return Config(**paper.preset(*row))
    else:
        path = PRESET_DIR / f"{name}.py"
        if name not in _file_presets():
            names = list_presets()
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown preset {name!r}{hint} (available: {', '.join(names)})")
    namespace: dict[str, Any] = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except Exception as e:  # a syntax or name error inside the preset
        raise ConfigError(f"preset {str(path)!r} failed to execute: {type(e).__name__}: {e}") from e
    values = {
        k: v for k, v in namespace.items()
        if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"
    }
    values.setdefault("name", path.stem)
    values = _drop_removed_keys(values, f"preset {str(path)!r}")
    _check_keys(values, f"preset {str(path)!r}")
    try:
        return Config(**values)
    except ConfigError as e:
        raise ConfigError(f"preset {str(path)!r}: {e}") from None


def _paper_iters(cfg: Config) -> Optional[int]:
    """The schedule's length in iterations at the paper's partition sizes (None when unknown)."""
    from .data.paper_lists import PAPER_COUNTS

    if cfg.max_iters is not None:
        return cfg.max_iters
    if cfg.dataset not in PAPER_COUNTS or cfg.partition is None:
        return None
    _, total, labeled = PAPER_COUNTS[cfg.dataset]
    denom = int(cfg.partition.split("/")[-1]) if cfg.partition.startswith("1/") else None
    if denom not in labeled:
        return None
    return cfg.total_iters(labeled[denom], total - labeled[denom])


def presets_table() -> str:
    """One line per bundled preset: dataset, backbone, partition, CutMix, CPS weight, crop, schedule
    (epochs and the iterations they make at the paper's partition sizes) and the paper's mIoU."""
    head = ("preset", "dataset", "backbone", "partition", "cutmix", "cps_weight", "crop", "schedule", "paper mIoU")
    rows = [head]
    for name in list_presets():
        cfg = load_preset(name)
        iters = _paper_iters(cfg)
        sched = (f"{cfg.epochs} ep = {iters} it" if cfg.max_iters is None and iters is not None
                 else f"{iters} it" if iters is not None else f"{cfg.epochs} ep")
        rows.append((name, cfg.dataset, cfg.backbone, cfg.partition or "-", "yes" if cfg.cutmix else "no",
                     f"{cfg.cps_weight:g}", str(cfg.crop_size), sched,
                     f"{cfg.paper_miou:.2f}" if cfg.paper_miou is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {5, 6, 8}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def keys_table() -> str:
    """Every config key with its type, default and help, by section (``cps-fast presets --keys``)."""
    hints, lines, section = _type_hints(), [], None
    for f in dataclasses.fields(Config):
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines.append(f"[{section}]")
        lines.append(f"  {f.name} = {f.default!r}  ({_describe(hints[f.name])})\n      {f.metadata['help']}")
    return "\n".join(lines)


def format_config(cfg: Config) -> str:
    """A readable listing: one ``key = value`` line per setting, grouped by section,
    with a ``*`` on values that differ from the defaults."""
    default = {f.name: f.default for f in dataclasses.fields(Config)}
    width = max(len(n) for n in default)
    lines, section = [f"config {cfg.name!r}  (* = differs from the default)"], None
    for f in dataclasses.fields(cfg):
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines.append(f"[{section}]")
        value = getattr(cfg, f.name)
        mark = "*" if value != _coerce(default[f.name], _type_hints()[f.name]) else " "
        shown = repr(value)
        if isinstance(value, float) and len(shown) > 10:
            shown = f"{value:.6g}"
        if f.name == "eval_crop_size" and value is None:
            shown += f"  (crop_size: {cfg.crop_size})"
        lines.append(f" {mark} {f.name:<{width}} = {shown}")
    return "\n".join(lines)


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write ``cfg.to_dict()`` as indented JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")


# Keys that a resumed run may change: where things are, how the run is watched, evaluated and
# executed. Every other key is the recipe (the data, model, optimiser, loss, schedule and the
# numerics), and --resume refuses a checkpoint whose recipe differs.
RUN_KEYS = frozenset({
    "name", "data_root", "weights_dir", "pretrained", "val_list", "data_backend", "num_workers",
    "optimizer_impl", "loss_backend", "channels_last", "cuda_graph", "fused_upsample", "compile",
    "profile_iters", "profile_start", "profiler", "eval_every", "eval_crop_size", "eval_stride_rate",
    "eval_flip", "eval_scales", "eval_batch_size", "eval_max_items", "log_every", "checkpoint_every",
    "checkpoint_minutes", "paper_miou", "paper_source"})
_LIST_KEYS = ("train_labeled", "train_unlabeled")


def recipe_differences(saved: dict, cfg: Config) -> list[str]:
    """The recipe keys (all but :data:`RUN_KEYS`) whose value in ``saved`` (a checkpoint's config)
    differs from ``cfg``'s. List files compare by file name, so a moved data root still resumes;
    keys that an older checkpoint lacks are not compared, removed keys only at their old default."""
    saved = _drop_removed_keys(saved, "the checkpoint's config")
    now = cfg.to_dict()
    differ = []
    for key, value in saved.items():
        if key in RUN_KEYS or key not in now:
            continue
        mine = now[key]
        if key in _LIST_KEYS and isinstance(value, str) and isinstance(mine, str):
            value, mine = os.path.basename(value), os.path.basename(mine)
        if value != mine:
            differ.append(key)
    return differ


def load_config(path: Union[str, os.PathLike]) -> Config:
    """Read a JSON file written by :func:`save_config`."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e}") from e
    return Config.from_dict(d, source=str(path))
