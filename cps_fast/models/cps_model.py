"""The two-branch CPS network, optimiser parameter groups and SyncBN conversion."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .deeplabv3plus import deeplabv3plus
from .weights import LoadResult, load_backbone_weights

__all__ = ["CPSModel", "convert_sync_batchnorm", "param_groups"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


_LETTERS = "abcdefgh"


class CPSModel(nn.Module):
    """K >= 2 DeepLabv3+ branches (two for CPS, more for n-CPS) with one architecture
    and different heads.

    Submodules are ``branch_a``, ``branch_b`` (and ``branch_c``, ... for K > 2), each a
    :class:`DeepLabV3Plus`, so the state dict reads ``branch_a.backbone.conv1.0.weight``,
    ``branch_a.head.aspp.map_convs.0.weight``, ``branch_a.classifier.bias``,
    ``branch_b....`` (see docs/models.md). The reference names them
    ``branch1``/``branch2``; :func:`cps_fast.models.convert_reference_checkpoint`
    renames.

    ``CPSModel(backbone, num_classes, output_stride, deep_stem, pretrained,
    seeds=(0, 1), **kwargs)`` builds one branch per seed, branch k with ``seed=seeds[k]``
    (other keywords go to :func:`deeplabv3plus`); a ``pretrained`` file is read once
    and the same weights go into every backbone (``self.pretrained_result`` holds the
    :class:`LoadResult`). Use :meth:`from_branches` to group existing modules.
    """

    def __init__(self, backbone: str = "resnet50", num_classes: int = 21, output_stride: int = 16,
                 deep_stem: bool = True, pretrained: str | os.PathLike | None = None, *,
                 seeds: tuple[int, ...] = (0, 1), **kwargs: Any):
        super().__init__()
        seeds = tuple(seeds)
        if not 2 <= len(seeds) <= len(_LETTERS) or len(set(seeds)) != len(seeds):
            raise ValueError(f"CPSModel seeds={seeds!r}; expected 2 to {len(_LETTERS)} different integers "
                             f"(one per branch)")
        branches = [deeplabv3plus(backbone, num_classes, output_stride, deep_stem, None, seed=s, **kwargs)
                    for s in seeds]
        self.pretrained_result: LoadResult | None = None
        if pretrained is not None:
            self.pretrained_result = load_backbone_weights(branches[0].backbone, pretrained)
            for other in branches[1:]:
                other.backbone.load_state_dict(branches[0].backbone.state_dict())
        self._set_branches(branches)

    def _set_branches(self, branches) -> None:
        self.num_branches = len(branches)
        for letter, branch in zip(_LETTERS, branches):
            setattr(self, f"branch_{letter}", branch)

    @classmethod
    def from_branches(cls, *branches: nn.Module) -> "CPSModel":
        """Groups existing branch modules (anything with ``forward(x, return_low)``)."""
        if not 2 <= len(branches) <= len(_LETTERS):
            raise ValueError(f"CPSModel.from_branches got {len(branches)} branches; expected 2 to {len(_LETTERS)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.pretrained_result = None
        self._set_branches(branches)
        return self

    @property
    def branches(self) -> tuple[nn.Module, ...]:
        return tuple(getattr(self, f"branch_{letter}") for letter in _LETTERS[:self.num_branches])

    def branch_index(self, branch: str | int | None) -> int:
        """0 for ``None``; k for the letter ``"a"``, ``"b"``, ... or the integer k; ValueError otherwise."""
        if branch is None:
            return 0
        k = branch if type(branch) is int else (
            _LETTERS.index(branch.lower()) if isinstance(branch, str) and len(branch) == 1
            and branch.lower() in _LETTERS else -1)
        if not 0 <= k < self.num_branches:
            names = ", ".join(repr(c) for c in _LETTERS[:self.num_branches])
            raise ValueError(f"CPSModel branch={branch!r}; expected one of {names} or 0..{self.num_branches - 1}")
        return k

    def forward(self, x: torch.Tensor, branch: str | int | None = None,
                return_low: bool | None = None) -> torch.Tensor:
        """Logits of one branch. ``branch=None`` (the default, used for
        evaluation and inference) is branch a; an explicit branch is honoured in
        train and eval mode alike. ``return_low`` as :meth:`DeepLabV3Plus.forward`."""
        return self.branches[self.branch_index(branch)](x, return_low=return_low)


def param_groups(model: nn.Module, weight_decay: float = 1e-4) -> list[dict[str, Any]]:
    """Optimiser parameter groups: backbone / head, each split into decay / no-decay.

    Parameters under a module named ``backbone`` (at any depth, so a
    :class:`CPSModel`, a :class:`DeepLabV3Plus` or either wrapped in DDP) are
    backbone; the rest (head, classifier) are head. Normalisation-layer
    parameters and every bias get ``weight_decay=0`` (the reference's
    ``group_weight``); convolution and linear weights get ``weight_decay``.
    Returns the non-empty groups among ``backbone.decay``,
    ``backbone.no_decay``, ``head.decay``, ``head.no_decay``, each a dict with
    ``params``, ``weight_decay`` and ``name``; every parameter appears exactly once.
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {
        ("backbone", True): [], ("backbone", False): [], ("head", True): [], ("head", False): []}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS)
        part = "backbone" if "backbone" in mod_name.split(".") else "head"
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            decay = not (is_norm or p_name == "bias" or p.ndim <= 1)
            buckets[(part, decay)].append(p)
    groups = []
    for (part, decay), params in buckets.items():
        if params:
            groups.append({"params": params, "weight_decay": float(weight_decay) if decay else 0.0,
                           "name": f"{part}.{'decay' if decay else 'no_decay'}"})
    return groups


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replaces every BatchNorm in ``model`` by ``torch.nn.SyncBatchNorm`` (for
    DDP), keeping weights, running statistics, eps and momentum; returns the
    converted module (the same object when the root is not itself a BatchNorm)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
