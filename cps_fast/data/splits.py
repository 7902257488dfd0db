"""Split lists: seeded labeled/unlabeled partitions (``cps-fast splits``) and the per-epoch
sample schedule (labeled list repeated to the unlabeled length).

Reading a list file in either published format (:func:`read_list`, :func:`read_partition`,
:class:`ListEntry`) lives in :mod:`cps_fast.data.common`, which the datasets share; it is
re-exported here.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import ConfigError
from .common import ListEntry, read_list, read_partition
from .datasets import open_dataset

__all__ = [
    "ListEntry",
    "read_list",
    "read_partition",
    "partition",
    "write_splits",
    "repeat_to_length",
    "SampleSpec",
    "SampleSchedule",
    "main",
]

PARTITION_FORM = "'k/n' with 1 <= k <= n (e.g. 1/8), a fraction in (0, 1) (e.g. 0.125) or a labeled count >= 1"


def parse_partition(p, what: str = "partition") -> Fraction | int:
    """A labeled amount: a :class:`~fractions.Fraction` in (0, 1] (``"1/8"``, ``"1-8"``, ``0.125``)
    or a labeled count (an int >= 1). Anything else is a :class:`~cps_fast.config.ConfigError`
    naming ``what`` (the key or option it came from) and the expected form."""
    a = None
    if isinstance(p, (int, Fraction)) and not isinstance(p, bool):
        a = p
    elif isinstance(p, (str, float)):
        s = str(p).strip().replace("-", "/")
        try:
            a = Fraction(s) if "/" in s or "." in s else int(s)
        except (ValueError, ZeroDivisionError):
            a = None
    if a is None or not (a >= 1 if isinstance(a, int) else 0 < a <= 1):
        raise ConfigError(f"{what} {p!r}: expected {PARTITION_FORM}")
    return a


# the trainer's default seed (``Config.seed``, the reference's 12345): ``cps-fast splits`` with its
# defaults writes the partition that a run with ``partition = "1/8"`` and no list files draws itself
SEED = 12345


def partition(n: int, amount, seed: int = SEED, what: str = "partition") -> tuple[np.ndarray, np.ndarray]:
    """Seeded labeled/unlabeled partition of ``range(n)``.

    ``amount`` is a fraction (``"1/8"``, ``0.125``, ``Fraction(1, 8)``) or a count (see
    :func:`parse_partition`; ``what`` names its key or option in errors).
    Returns sorted (labeled, unlabeled) index arrays, disjoint and covering ``range(n)``.
    """
    a = parse_partition(amount, what)
    k = int(a) if isinstance(a, int) else max(1, int(round(float(a) * n)))
    if not 0 < k <= n:
        raise ConfigError(f"{what} {amount!r} gives {k} labeled of the {n} images; expected 1..{n}")
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    return np.sort(perm[:k]), np.sort(perm[k:])


def _dataset_lines(dataset) -> list[str]:
    lines = []
    for i in range(len(dataset)):
        img, lab = dataset.paths(i)
        rel_img = os.path.relpath(img, dataset.root)
        rel_lab = os.path.relpath(lab, dataset.root) if lab else None
        lines.append(f"{rel_img} {rel_lab}" if rel_lab else rel_img)
    return lines


def write_splits(dataset_name: str, root: str, out_dir: str,
                 partitions: Sequence = ("1/16", "1/8", "1/4", "1/2"), seed: int = SEED,
                 split: str = "train", list_file: Optional[str] = None) -> list[tuple[str, str]]:
    """Write ``<split>_labeled_<p>.txt`` / ``<split>_unlabeled_<p>.txt`` for each partition.

    Lines are ``image_path label_path`` relative to ``root`` (readable by
    :func:`read_list`). Deterministic for a given seed; the pairs are disjoint and
    cover the train set. Returns the written (labeled, unlabeled) paths.
    """
    for p in partitions:  # every value checked before any work
        parse_partition(p, "--partitions")
    ds = open_dataset(dataset_name, root, split=split, list_file=list_file)
    if not hasattr(ds, "paths"):
        raise ValueError(f"dataset {dataset_name!r} at {root!r} is not file-backed; write it to disk first")
    lines = _dataset_lines(ds)
    parts = [(p, *partition(len(lines), p, seed, what="--partitions")) for p in partitions]  # all, before writing
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for p, lab, unl in parts:
        tag = str(p).replace("/", "-")
        paths = (os.path.join(out_dir, f"{split}_labeled_{tag}.txt"),
                 os.path.join(out_dir, f"{split}_unlabeled_{tag}.txt"))
        for path, idx in zip(paths, (lab, unl)):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(lines[i] + "\n" for i in idx)
        written.append(paths)
    return written


def main(argv: Optional[Iterable[str]] = None) -> int:
    """``cps-fast splits``: write seeded labeled/unlabeled partitions for a dataset root."""
    ap = argparse.ArgumentParser(
        prog="cps-fast splits",
        description="Write deterministic labeled/unlabeled partition lists for a dataset root.")
    ap.add_argument("dataset", choices=["voc", "cityscapes", "synthetic"])
    ap.add_argument("root", help="dataset root folder")
    ap.add_argument("--out", required=True, help="folder for the list files")
    ap.add_argument("--partitions", nargs="+", default=["1/16", "1/8", "1/4", "1/2"],
                    help="fractions (1/8, 0.125; 'k/n' with 1 <= k <= n) or labeled counts (662)")
    ap.add_argument("--seed", type=int, default=SEED,
                    help=f"the partition's seed (default {SEED}: the trainer's own, so a run with "
                         "partition=1/8 and no list files draws the same images)")
    ap.add_argument("--split", default="train", help="which split to partition (default train)")
    ap.add_argument("--list-file", default=None, help="list of the train set (default: the dataset's own)")
    args = ap.parse_args(None if argv is None else list(argv))
    for lab, unl in write_splits(args.dataset, args.root, args.out, args.partitions, args.seed,
                                 args.split, args.list_file):
        n_l = sum(1 for _ in open(lab, encoding="utf-8"))
        n_u = sum(1 for _ in open(unl, encoding="utf-8"))
        print(f"{lab}: {n_l} labeled   {unl}: {n_u} unlabeled")
    return 0


# --------------------------------------------------------------------------- sampling

def repeat_to_length(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one epoch of ``length`` samples drawn from a list of ``n``.

    Reference semantics (TorchSemiSeg ``BaseDataset._construct_new_file_names``):
    the list repeated ``length // n`` times, plus ``length % n`` distinct entries
    chosen at random; when ``length < n`` the first ``length`` entries. (The
    reference's DataLoader then shuffles; :class:`SampleSchedule` does too.)
    """
    if n <= 0:
        raise ValueError("cannot sample from an empty list")
    if length < n:
        return np.arange(length)
    rest = rng.permutation(n)[: length % n]
    return np.concatenate([np.tile(np.arange(n), length // n), rest])


@dataclass(frozen=True)
class SampleSpec:
    """One sample of a batch: dataset index and its augmentation draws.

    Applied in the reference's order: mirror if ``flip``, scale, crop. ``uy``/``ux`` in
    [0, 1) place the crop window in the scaled image *after* the mirror (``ux`` counts
    columns of the mirrored image), as the reference's ``generate_random_crop_pos`` does:
    anchor ``min(floor(u * (S - crop + 2)), S - crop + 1)``, a uniform integer in
    ``0 .. S - crop + 1`` (the last runs one pixel past the end, padded) when the scaled
    side ``S`` exceeds the crop, 0 when equal, and the image centred in the padding
    (``(crop - S) // 2`` before) when smaller. So the window's distribution and geometry
    are the reference's for either flip (``transforms.crop_anchor``).
    """

    index: int
    scale: float
    flip: bool
    uy: float
    ux: float


class SampleSchedule:
    """Deterministic epochs of batches for one rank.

    Epoch ``e`` draws from ``np.random.default_rng([seed, stream, e])``: the index
    order (:func:`repeat_to_length` then a shuffle) and every sample's scale, flip
    and crop position. All ranks compute the same epoch and take disjoint slices,
    so results depend on (seed, stream, epoch, rank, world size) only, never on
    worker counts or backend.
    """

    def __init__(self, n: int, batch_size: int, *, length: Optional[int] = None, seed: int = 0,
                 stream: int = 0, rank: int = 0, world_size: int = 1,
                 scales: Sequence[float] = (1.0,), flip: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.n, self.batch_size = int(n), int(batch_size)
        self.length = int(length) if length is not None else self.n
        self.seed, self.stream = int(seed), int(stream)
        self.rank, self.world_size = int(rank), int(world_size)
        self.scales = np.asarray(tuple(scales) or (1.0,), dtype=np.float64)
        self.flip = bool(flip)
        self.iters_per_epoch = self.length // (self.batch_size * self.world_size)
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"an epoch of {self.length} samples is shorter than one global batch "
                f"({self.batch_size} x {self.world_size} ranks)")

    def __len__(self) -> int:
        return self.iters_per_epoch

    def epoch(self, e: int) -> list[list[SampleSpec]]:
        rng = np.random.default_rng([self.seed, self.stream, int(e)])
        order = repeat_to_length(self.n, self.length, rng)
        order = order[rng.permutation(len(order))]
        m = len(order)
        scale = self.scales[rng.integers(0, len(self.scales), m)]
        flip = rng.random(m) < 0.5 if self.flip else np.zeros(m, bool)
        uy, ux = rng.random(m), rng.random(m)
        B, W = self.batch_size, self.world_size
        batches = []
        for k in range(self.iters_per_epoch):
            start = (k * W + self.rank) * B
            batches.append([SampleSpec(int(order[j]), float(scale[j]), bool(flip[j]),
                                       float(uy[j]), float(ux[j])) for j in range(start, start + B)])
        return batches


if __name__ == "__main__":
    sys.exit(main())
