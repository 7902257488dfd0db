"""The CPS paper's own partitions, shipped with the package, and how a run finds its lists.

``paper_splits/`` holds the official CPS code's split lists (TorchSemiSeg, folder ``DATA/``),
copied unchanged under its MIT licence (``paper_splits/LICENSE``, ``paper_splits/README.md``):
the exact labeled/unlabeled partitions behind the paper's tables. A preset names its lists
relative to the data root, as the reference does (``subset_train_aug/train_aug_labeled_1-8.txt``);
where the data root has no such file, the packaged copy is used, so a researcher never needs the
reference's archive. ``paper:<path>`` names a packaged list explicitly (``paper:pascal_voc/
subset_train_aug/train_aug_labeled_1-8.txt``); a run's ``config.json`` records lists that way.
"""
from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Optional

from .common import DataError

__all__ = [
    "PAPER_COUNTS",
    "PAPER_DIR",
    "PAPER_PREFIX",
    "check_paper_counts",
    "paper_list_path",
    "resolve_list",
]

PAPER_DIR = Path(__file__).resolve().parent / "paper_splits"
PAPER_PREFIX = "paper:"

# dataset -> (folder under paper_splits/, train-set size, {partition denominator: labeled images})
PAPER_COUNTS = {
    "voc": ("pascal_voc", 10582, {16: 662, 8: 1323, 4: 2646, 2: 5291}),
    "cityscapes": ("city", 2975, {16: 186, 8: 372, 4: 744, 2: 1488}),
}

_PAPER_NAME = re.compile(r"^train_aug_(labeled|unlabeled)_1-(\d+)\.txt$")


def paper_list_path(ref: str) -> Path:
    """The packaged file that ``paper:<path>`` names; a clear error when there is none."""
    rel = ref[len(PAPER_PREFIX):] if ref.startswith(PAPER_PREFIX) else ref
    path = (PAPER_DIR / rel).resolve()
    if PAPER_DIR not in path.parents or not path.is_file():
        have = sorted(str(p.relative_to(PAPER_DIR)) for p in PAPER_DIR.rglob("*.txt"))
        raise DataError(f"list {ref!r}: the package has no such list; the packaged ones are "
                        + ", ".join(PAPER_PREFIX + h for h in have))
    return path


def _packaged_for(dataset: str, rel: str) -> Optional[str]:
    """``paper:...`` for a preset's root-relative list name, if the package holds that list."""
    if dataset not in PAPER_COUNTS or os.path.isabs(rel):
        return None
    folder = PAPER_COUNTS[dataset][0]
    rel = posixpath.normpath(rel.replace("\\", "/"))
    if rel.startswith("../") or rel == "..":
        return None
    if (PAPER_DIR / folder / rel).is_file():
        return f"{PAPER_PREFIX}{folder}/{rel}"
    return None


def resolve_list(dataset: str, data_root: Optional[str], ref: Optional[str], *,
                 what: str) -> tuple[Optional[str], str]:
    """Where a run's list ``ref`` (a config value) is read from: ``(value, source)``.

    ``value`` is what the config should hold from now on (the same path, or ``paper:...`` when
    the packaged copy stands in for a list the data root lacks); ``source`` is a sentence for the
    run's log. ``what`` names the config key in errors. ``None`` stays ``None`` (the dataset's
    own list or the seeded partition).
    """
    if ref is None:
        return None, "none"
    if ref.startswith(PAPER_PREFIX):
        path = paper_list_path(ref)
        return ref, f"{path} (the CPS paper's partition, packaged)"
    path = ref if os.path.isabs(ref) or data_root is None else os.path.join(data_root, ref)
    if os.path.isfile(path):
        return ref, path
    packaged = _packaged_for(dataset, ref)
    if packaged is not None:
        return packaged, (f"{paper_list_path(packaged)} (the CPS paper's partition, packaged with cps-fast: "
                          f"the data root has no {ref})")
    raise DataError(
        f"config key {what!r}: list file {path} does not exist, and cps-fast ships no list {ref!r} for "
        f"{dataset!r}; pass --set {what}=PATH (relative to data_root or absolute), or None for the "
        "dataset's own list")


def check_paper_counts(dataset: str, list_path: Optional[str], count: int) -> None:
    """A list named as one of the paper's partitions (``train_aug_labeled_1-8.txt``) must hold
    the paper's count of images (VOC 662/1323/2646/5291 labeled of 10582, Cityscapes
    186/372/744/1488 of 2975); anything else is a truncated or foreign copy."""
    if dataset not in PAPER_COUNTS or list_path is None:
        return
    m = _PAPER_NAME.match(os.path.basename(str(list_path)))
    if m is None:
        return
    _, total, labeled = PAPER_COUNTS[dataset]
    denom = int(m.group(2))
    if denom not in labeled:
        return
    want = labeled[denom] if m.group(1) == "labeled" else total - labeled[denom]
    if count != want:
        raise DataError(
            f"list {list_path} has {count} images, but the CPS paper's {dataset} 1/{denom} partition has "
            f"{want} {m.group(1)} of {total}; the file is truncated or another partition under the paper's "
            f"name: use the packaged one ({_packaged_for(dataset, _rel_name(dataset, m.group(0)))}) or give "
            "your own list another name")


def _rel_name(dataset: str, base: str) -> str:
    return ("subset_train_aug/" if dataset == "voc" else "config_new/subset_train/") + base
