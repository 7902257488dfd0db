"""What every data module shares: :class:`DataError`, the label tables, the image, label and
list-file readers, and :class:`BaseDataset`, the base of every dataset.

A leaf of the data package: it imports nothing from ``cps_fast.data`` (only
:mod:`cps_fast.errors`), so every other data module can import it without a cycle.
``cps_fast.data`` and :mod:`cps_fast.data.datasets` re-export its public names.

List formats (one entry per line, blank lines and ``#`` comments skipped):

* one id per line, as the VOC ``ImageSets`` and the CPS VOC partition lists
  (``2007_000032``), or a Cityscapes stem (``aachen/aachen_000000_000019``);
* ``image_path label_path`` relative to the dataset root, separated by spaces
  or a tab, as the DeepLab/CPS lists (``JPEGImages/2007_000032.jpg
  SegmentationClassAug/2007_000032.png``; a leading ``/`` is ignored).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError

__all__ = [
    "DataError",
    "BaseDataset",
    "IGNORE",
    "read_image",
    "read_label",
    "check_label",
    "ListEntry",
    "read_list",
    "read_partition",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_LABEL_TABLE",
    "CITYSCAPES_ID_TO_TRAINID",
]

IGNORE = 255


class DataError(UserError, ValueError):
    """A dataset file, folder or list is missing, unreadable or inconsistent."""


# --------------------------------------------------------------------------- label tables

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class index), as in the devkit."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_PALETTE = _voc_colormap(256)[: len(VOC_CLASSES)]

# The official Cityscapes label table (cityscapesScripts/helpers/labels.py):
# (name, id, trainId). trainId 255 = ignored in evaluation. "license plate" has
# id -1 and never appears in *_labelIds.png images.
CITYSCAPES_LABEL_TABLE = (
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
    ("license plate", -1, 255),
)

CITYSCAPES_ID_TO_TRAINID = np.full(256, IGNORE, dtype=np.uint8)
for _name, _id, _train in CITYSCAPES_LABEL_TABLE:
    if _id >= 0:
        CITYSCAPES_ID_TO_TRAINID[_id] = _train

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)


# --------------------------------------------------------------------------- file readers

def read_image(path: str) -> np.ndarray:
    """Read an RGB image file as an HxWx3 uint8 array; a clear error names a bad file."""
    if not os.path.isfile(path):
        raise DataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"))  # writable: callers may modify it
    except Exception as e:  # PIL raises several types for corrupt data
        raise DataError(f"image file {path} is unreadable or corrupt: {e}") from e
    return arr


def read_label(path: str, fmt: str = "auto") -> np.ndarray:
    """Read a label PNG as an HxW uint8 array of indices (never colours).

    Palette ("P") PNGs give their indices, grayscale ("L") PNGs their values.
    ``fmt="cityscapes_ids"`` maps Cityscapes label ids to the 19 train ids
    (everything else 255).
    """
    if not os.path.isfile(path):
        raise DataError(f"label file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L"):
                arr = np.array(im)
            elif im.mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.array(im)
                if arr.max(initial=0) > 255:
                    raise DataError(f"label file {path} has value {int(arr.max())} > 255")
                arr = arr.astype(np.uint8)
            else:
                raise DataError(
                    f"label file {path} has PIL mode {im.mode!r}; expected a palette ('P') "
                    "or grayscale ('L') PNG of class indices (colour-coded labels are not indices)"
                )
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"label file {path} is unreadable or corrupt: {e}") from e
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if fmt == "cityscapes_ids":
        arr = CITYSCAPES_ID_TO_TRAINID[arr]
    return arr


def check_label(label: np.ndarray, num_classes: int, name: str) -> None:
    """Raise DataError if ``label`` has a value outside 0..num_classes-1 that is not 255."""
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        vals = np.unique(label[bad])
        raise DataError(
            f"label {name} has value {int(vals[0])}"
            + (f" (and {len(vals) - 1} other bad values)" if len(vals) > 1 else "")
            + f", outside 0..{num_classes - 1} and not ignore ({IGNORE})"
        )


def _image_size(path: str) -> tuple[int, int]:
    """(H, W) of an image file from its header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"file {path} does not exist") from None
    except Exception as e:
        raise DataError(f"file {path} is unreadable or corrupt: {e}") from e
    return h, w


# --------------------------------------------------------------------------- list files

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class ListEntry:
    """One list line: an id (``image_is_id``) or an image path with an optional label path."""

    image: str
    label: Optional[str] = None
    image_is_id: bool = False


def read_list(path: str) -> list[ListEntry]:
    """Parse a split list in either published format; errors name the file and line."""
    if path is None or not os.path.isfile(path):
        raise DataError(f"list file {path} does not exist")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) > 2:
                raise DataError(
                    f"list file {path} line {lineno} has {len(parts)} fields ({line!r}); expected "
                    "an id or 'image_path label_path'")
            parts = [p.lstrip("/") for p in parts]
            if len(parts) == 2:
                entries.append(ListEntry(parts[0], parts[1], False))
            else:
                is_path = parts[0].lower().endswith(_IMAGE_EXTS)
                entries.append(ListEntry(parts[0], None, not is_path))
    if not entries:
        raise DataError(f"list file {path} is empty")
    return entries


def read_partition(labeled_list: str, unlabeled_list: str) -> tuple[list[ListEntry], list[ListEntry]]:
    """Read a labeled/unlabeled pair of lists and check that they are disjoint."""
    lab, unl = read_list(labeled_list), read_list(unlabeled_list)
    shared = {e.image for e in lab} & {e.image for e in unl}
    if shared:
        raise DataError(
            f"lists {labeled_list} and {unlabeled_list} share {len(shared)} images, e.g. {sorted(shared)[0]}")
    return lab, unl


# --------------------------------------------------------------------------- the dataset base

class BaseDataset:
    """A sequence of ``{"image": HxWx3 uint8, "label": HxW uint8 train ids or None, "name": str}``
    with ``num_classes``, ``class_names`` and ``palette``.

    Subclasses supply ``__len__``, ``name(i)`` and ``load(i, with_label=True) -> (image, label or
    None)``; indexing (negative indices, the range check, the item's keys) is this class's.
    """

    num_classes: int = 0
    class_names: Sequence[str] = ()
    palette: np.ndarray = np.zeros((0, 3), np.uint8)

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def load(self, i: int, with_label: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        image, label = self.load(i)
        return {"image": image, "label": label, "name": self.name(i)}
