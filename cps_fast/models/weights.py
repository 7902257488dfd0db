"""Loading local pretrained ResNet weights into a :class:`~cps_fast.models.resnet.ResNet`.

Recognised layouts (after unwrapping ``"state_dict"`` / ``"model"`` and removing
``module.`` / ``backbone.`` prefixes):

``torchvision``  ``conv1.weight`` (7x7), ``bn1``, ``layerK.i.convJ/bnJ``,
                 ``downsample.0/1``, ``fc`` (ignored). timm's plain ``resnet*``
                 and mmcv's ``ResNet`` use the same names.
``deep-stem``    ``conv1.0/.1/.3/.4/.6`` + ``bn1``: the reference CPS
                 ``resnet*_v1c.pth`` (stem width 64) and timm ``resnet*c/s``.
``deep-stem-avg-down``  as above with ``downsample.1/2`` (average-pool
                 shortcuts): timm ``resnet*d``; needs a model built with ``avg_down=True``.
``mmcv-v1c``     ``stem.0/1/3/4/6/7`` (mmcv / mmseg ``ResNetV1c``), renamed to
                 ``conv1.*`` / ``bn1``.

Files are always read with ``torch.load(path, map_location="cpu",
weights_only=True)``; nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

from ..errors import UserError
from .resnet import RESNET_SPECS, ResNet

__all__ = [
    "LoadResult",
    "PretrainedWeightsError",
    "convert_reference_checkpoint",
    "detect_layout",
    "load_backbone_weights",
    "read_state_dict",
]

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model")
_PREFIXES = ("module.", "backbone.")
_IGNORED = re.compile(r"^fc\.")
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(\w+)")
_MMCV_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.",
              "stem.4.": "conv1.4.", "stem.6.": "conv1.6.", "stem.7.": "bn1."}


class PretrainedWeightsError(UserError, ValueError):
    """A pretrained-weights file cannot be used (unreadable, unsafe, or another architecture)."""


class LoadResult(NamedTuple):
    """What :func:`load_backbone_weights` did."""

    path: str
    layout: str
    loaded: int
    missing_keys: list[str]
    unexpected_keys: list[str]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a checkpoint safely and returns its flat tensor dict.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` (nested any number of
    times) and strips leading ``module.`` / ``backbone.`` from every key.
    Non-tensor entries are dropped. Raises :class:`PretrainedWeightsError` for
    a missing file, a file that is not a PyTorch checkpoint, a file that
    carries pickled code (refused by ``weights_only=True``), or one without tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"pretrained weights file {path!r} does not exist (nothing is downloaded; "
                                     f"give a local ResNet state-dict file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedWeightsError(
            f"refusing to load pretrained weights {path!r}: it carries pickled objects or code that "
            f"weights_only=True does not allow ({first}). Re-save it as a plain dict of tensors, e.g. "
            f"torch.save(model.state_dict(), path), in a trusted environment.") from e
    except Exception as e:  # corrupt or not a torch file
        raise PretrainedWeightsError(f"cannot read pretrained weights {path!r} as a PyTorch file: "
                                     f"{type(e).__name__}: {e}") from e

    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise PretrainedWeightsError(f"pretrained weights {path!r} hold a {type(obj).__name__}; "
                                     f"expected a dict of tensors (a state dict)")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    stripped = True
        out[key] = value
    if not out:
        raise PretrainedWeightsError(f"pretrained weights {path!r} contain no tensors "
                                     f"(top-level keys: {sorted(map(str, obj))[:10]})")
    return out


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Names the layout of a ResNet state dict: ``torchvision``, ``deep-stem``,
    ``deep-stem-avg-down``, ``mmcv-v1c`` or ``unknown`` (no stem keys)."""
    if "stem.0.weight" in state_dict:
        return "mmcv-v1c"
    avg_down = any(re.match(r"^layer[1-4]\.0\.downsample\.2\.", k) for k in state_dict)
    if "conv1.0.weight" in state_dict:
        return "deep-stem-avg-down" if avg_down else "deep-stem"
    if "conv1.weight" in state_dict:
        return "torchvision"
    return "unknown"


def _blocks(state_dict: Mapping[str, torch.Tensor]) -> tuple[str | None, tuple[int, ...]]:
    counts = [0, 0, 0, 0]
    bottleneck = False
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], idx + 1)
            bottleneck |= m.group(3) == "conv3"
    if not any(counts):
        return None, tuple(counts)
    return ("bottleneck" if bottleneck else "basic"), tuple(counts)


def _depth_of(kind: str | None, counts: tuple[int, ...]) -> int | None:
    for depth, (k, layers) in RESNET_SPECS.items():
        if k == kind and tuple(layers) == tuple(counts):
            return depth
    return None


def _short(keys: list[str], limit: int = 12) -> str:
    if len(keys) <= limit:
        return ", ".join(keys)
    return ", ".join(keys[:limit]) + f", ... and {len(keys) - limit} more"


def load_backbone_weights(backbone: ResNet, path: str | os.PathLike) -> LoadResult:
    """Loads a local pretrained ResNet file into ``backbone`` (in place).

    The layout is recognised (see the module docstring) and renamed to the
    backbone's names; ``fc.*`` is ignored. Refused with a
    :class:`PretrainedWeightsError` naming the file: another depth or block
    type (e.g. ResNet-101 weights into ResNet-50), another stem (7x7 weights
    into a deep stem or the reverse, or another deep-stem width), average-pool
    shortcuts into a model without them (or the reverse), and any tensor whose
    shape differs. Missing and unexpected keys are logged in one warning and
    returned (``num_batches_tracked`` buffers absent from old files are not
    counted as missing).
    """
    if not isinstance(backbone, ResNet):
        raise TypeError(f"load_backbone_weights expects a cps_fast ResNet, got {type(backbone).__name__}")
    path = os.fspath(path)
    sd = read_state_dict(path)
    layout = detect_layout(sd)
    if layout == "mmcv-v1c":
        renamed = {}
        for key, value in sd.items():
            for old, new in _MMCV_STEM.items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            renamed[key] = value
        sd = renamed

    model_name = f"ResNet-{backbone.depth}"
    kind, counts = _blocks(sd)
    if kind is None:
        raise PretrainedWeightsError(f"pretrained weights {path!r} have no ResNet stage keys (layer1.0....); "
                                     f"first keys: {list(sd)[:8]}")
    if kind != backbone.block_kind or tuple(counts) != tuple(backbone.layers_spec):
        depth = _depth_of(kind, counts)
        what = f"ResNet-{depth}" if depth else f"an unknown ResNet ({kind} blocks per stage {list(counts)})"
        hint = f"build the model with backbone='resnet{depth}' or " if depth else ""
        raise PretrainedWeightsError(
            f"pretrained weights {path!r} are {what} (layer3 has {counts[2]} {kind} blocks) "
            f"but the model is {model_name} (layer3 has {backbone.layers_spec[2]} {backbone.block_kind} blocks); "
            f"{hint}give {model_name} weights")

    file_deep = "conv1.0.weight" in sd
    file_plain = "conv1.weight" in sd
    if backbone.deep_stem and file_plain:
        raise PretrainedWeightsError(
            f"pretrained weights {path!r} have a 7x7 stem (conv1.weight {tuple(sd['conv1.weight'].shape)}) "
            f"but the model has the deep (v1c) stem; build it with deep_stem=False or give deep-stem weights")
    if not backbone.deep_stem and file_deep:
        raise PretrainedWeightsError(
            f"pretrained weights {path!r} have a deep (three 3x3 convs) stem but the model has the 7x7 stem; "
            f"build it with deep_stem=True or give 7x7-stem weights")
    if backbone.deep_stem and file_deep:
        width = int(sd["conv1.0.weight"].shape[0])
        if width != backbone.stem_width:
            raise PretrainedWeightsError(
                f"pretrained weights {path!r} have a deep stem of width {width} (conv1.0.weight "
                f"{tuple(sd['conv1.0.weight'].shape)}) but the model's stem_width is {backbone.stem_width}; "
                f"build it with stem_width={width}")
    file_avg = layout == "deep-stem-avg-down" or any(
        re.match(r"^layer[1-4]\.0\.downsample\.2\.", k) for k in sd)
    if file_avg != backbone.avg_down:
        raise PretrainedWeightsError(
            f"pretrained weights {path!r} {'have' if file_avg else 'do not have'} average-pool shortcuts "
            f"(downsample.1/.2, timm resnet*d) but the model was built with avg_down={backbone.avg_down}; "
            f"build it with avg_down={file_avg}")

    target = backbone.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in sd.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if mismatched:
        raise PretrainedWeightsError(f"pretrained weights {path!r} ({layout}) do not fit {model_name}: "
                                     f"{len(mismatched)} tensors differ in shape: {_short(mismatched, 6)}")

    usable = {k: v for k, v in sd.items() if k in target}
    backbone.load_state_dict(usable, strict=False)
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target and not _IGNORED.match(k)]
    if missing or unexpected:
        log.warning("pretrained weights %s (%s layout) loaded into %s with %d missing keys [%s] and "
                    "%d unexpected keys [%s]", path, layout, model_name, len(missing), _short(missing),
                    len(unexpected), _short(unexpected))
    else:
        log.info("pretrained weights %s (%s layout): %d tensors loaded into %s", path, layout, len(usable),
                 model_name)
    return LoadResult(path, layout, len(usable), missing, unexpected)


def convert_reference_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a TorchSemiSeg CPS checkpoint's ``"model"`` dict (``branch1.*``,
    ``branch2.*``, optionally ``module.``-prefixed) to the :class:`CPSModel`
    layout (``branch_a.*``, ``branch_b.*``); the module names below the branch
    are already the same."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("branch1."):
            key = "branch_a." + key[len("branch1."):]
        elif key.startswith("branch2."):
            key = "branch_b." + key[len("branch2."):]
        out[key] = value
    return out
