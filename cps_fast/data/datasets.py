"""Datasets: PASCAL VOC 2012, Cityscapes and the built-in synthetic scenes.

Every dataset is a sequence of dicts ``{"image": HxWx3 uint8, "label": HxW uint8
in train ids (255 = ignore) or None, "name": str}`` and carries ``num_classes``,
``class_names`` and ``palette`` (``(num_classes, 3)`` uint8) for visualisation.

File-backed datasets also expose ``paths(i) -> (image_path, label_path | None)``
and ``label_format`` (``"gray"``, ``"palette"`` or ``"cityscapes_ids"``) so
that the DALI pipelines can read the raw files themselves.
"""
from __future__ import annotations

import glob
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .splits import ListEntry, read_list

__all__ = [
    "DataError",
    "SegDataset",
    "VOCDataset",
    "CityscapesDataset",
    "open_dataset",
    "read_image",
    "read_label",
    "check_label",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_LABEL_TABLE",
    "CITYSCAPES_ID_TO_TRAINID",
]

IGNORE = 255


class DataError(ValueError):
    """A dataset file, folder or list is missing, unreadable or inconsistent."""


# --------------------------------------------------------------------------- tables

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


# --------------------------------------------------------------------------- datasets

class SegDataset:
    """A file-backed segmentation dataset: a list of (image, label) paths.

    ``labeled=False`` yields ``label=None`` and does not require label files.
    """

    num_classes: int = 0
    class_names: Sequence[str] = ()
    palette: np.ndarray = np.zeros((0, 3), np.uint8)

    def __init__(self, root: str, entries: list[tuple[str, str, Optional[str]]],
                 label_format: str, labeled: bool = True):
        self.root = root
        self._entries = entries  # (name, image_path, label_path or None)
        self.label_format = label_format
        self.labeled = labeled
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def name(self, i: int) -> str:
        return self._entries[i][0]

    def paths(self, i: int) -> tuple[str, Optional[str]]:
        """(image path, label path or None when unlabeled)."""
        _, img, lab = self._entries[i]
        return img, (lab if self.labeled else None)

    def image_size(self, i: int) -> tuple[int, int]:
        """(H, W) read from the image header (cached); checks the label's size too."""
        s = self._sizes.get(i)
        if s is None:
            img, lab = self.paths(i)
            s = _image_size(img)
            if lab is not None:
                if not os.path.isfile(lab):
                    raise DataError(f"label file {lab} does not exist (for image {img})")
                ls = _image_size(lab)
                if ls != s:
                    raise DataError(
                        f"image {img} is {s[1]}x{s[0]} but its label {lab} is {ls[1]}x{ls[0]} (WxH)")
            self._sizes[i] = s
        return s

    def load(self, i: int, with_label: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Decode sample i: (HxWx3 uint8 image, HxW uint8 train-id label or None)."""
        img_path, lab_path = self.paths(i)
        image = read_image(img_path)
        label = None
        if with_label and lab_path is not None:
            label = read_label(lab_path, self.label_format)
            if label.shape != image.shape[:2]:
                raise DataError(
                    f"image {img_path} is {image.shape[1]}x{image.shape[0]} but its label "
                    f"{lab_path} is {label.shape[1]}x{label.shape[0]} (WxH)")
            check_label(label, self.num_classes, os.path.basename(lab_path))
        return image, label

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        image, label = self.load(i)
        return {"image": image, "label": label, "name": self.name(i)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, n={len(self)}, "
                f"label_format={self.label_format!r}, labeled={self.labeled})")


def _require_dir(root: str, sub: str, what: str) -> str:
    if root is None or not os.path.isdir(root):
        raise DataError(f"{what} root {root!r} is not a directory (expected it to hold {sub}/)")
    d = os.path.join(root, sub)
    if not os.path.isdir(d):
        raise DataError(f"{what} root {root} has no folder {sub}/ (looked for {d})")
    return d


def _label_format_of(path: str) -> str:
    try:
        with Image.open(path) as im:
            return "palette" if im.mode == "P" else "gray"
    except Exception:
        return "gray"  # reported as a clear error when the file is read


class VOCDataset(SegDataset):
    """PASCAL VOC 2012 (optionally with the SBD "aug" labels).

    Layout: ``root/JPEGImages/<id>.jpg`` and ``root/SegmentationClassAug/<id>.png``
    (grayscale indices) or ``root/SegmentationClass/<id>.png`` (palette indices).
    Without ``list_file`` the ids come from ``root/ImageSets/Segmentation/<split>.txt``.
    """

    num_classes = 21
    class_names = VOC_CLASSES
    palette = VOC_PALETTE

    def __init__(self, root: str, split: str = "train", list_file: Optional[str] = None,
                 labeled: bool = True):
        img_dir = _require_dir(root, "JPEGImages", "VOC")
        label_dir = None
        for sub in ("SegmentationClassAug", "SegmentationClass"):
            if os.path.isdir(os.path.join(root, sub)):
                label_dir = os.path.join(root, sub)
                break
        if label_dir is None and labeled:
            raise DataError(
                f"VOC root {root} has neither SegmentationClassAug/ nor SegmentationClass/ "
                f"(looked for {os.path.join(root, 'SegmentationClassAug')} and "
                f"{os.path.join(root, 'SegmentationClass')})")
        if list_file is None:
            list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        entries = []
        for e in read_list(list_file):
            entries.append(self._resolve(root, img_dir, label_dir, e))
        fmt = "gray"
        if labeled:
            first = next((lab for _, _, lab in entries if lab and os.path.isfile(lab)), None)
            fmt = _label_format_of(first) if first else "gray"
            for _, img, lab in entries:
                if lab is None:
                    raise DataError(f"list {list_file} has no label path for image {img}")
        super().__init__(root, entries, fmt, labeled)
        self.list_file = list_file

    @staticmethod
    def _resolve(root, img_dir, label_dir, e: ListEntry):
        if e.label is None and e.image_is_id:
            img = os.path.join(img_dir, e.image + ".jpg")
            lab = os.path.join(label_dir, e.image + ".png") if label_dir else None
            return e.image, img, lab
        img = os.path.join(root, e.image)
        lab = os.path.join(root, e.label) if e.label is not None else None
        name = os.path.splitext(os.path.basename(e.image))[0]
        return name, img, lab


class CityscapesDataset(SegDataset):
    """Cityscapes fine annotations.

    Layout: ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
    ``root/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`` (used as is) or
    ``..._gtFine_labelIds.png`` (mapped to the 19 train ids, everything else 255).
    Without ``list_file`` every image of the split is used (sorted).
    A list line may be a stem (``aachen_000000_000019`` or ``aachen/aachen_000000_000019``)
    or two paths relative to the root.
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root: str, split: str = "train", list_file: Optional[str] = None,
                 labeled: bool = True):
        if list_file is None:
            img_dir = _require_dir(root, os.path.join("leftImg8bit", split), "Cityscapes")
            if labeled:
                _require_dir(root, os.path.join("gtFine", split), "Cityscapes")
            files = sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png")))
            if not files:
                raise DataError(f"Cityscapes folder {img_dir} has no <city>/*_leftImg8bit.png images")
            stems = [os.path.join(os.path.basename(os.path.dirname(f)),
                                  os.path.basename(f)[: -len("_leftImg8bit.png")]) for f in files]
            entries = [self._from_stem(root, split, s, labeled) for s in stems]
        else:
            if not os.path.isdir(root or ""):
                raise DataError(f"Cityscapes root {root!r} is not a directory")
            entries = []
            for e in read_list(list_file):
                if e.label is None and e.image_is_id:
                    stem = e.image
                    if "/" not in stem:
                        stem = stem.split("_")[0] + "/" + stem
                    entries.append(self._from_stem(root, split, stem, labeled))
                else:
                    img = os.path.join(root, e.image)
                    lab = os.path.join(root, e.label) if e.label is not None else None
                    if labeled and lab is None:
                        raise DataError(f"list {list_file} has no label path for image {img}")
                    name = os.path.splitext(os.path.basename(e.image))[0].replace("_leftImg8bit", "")
                    entries.append((name, img, lab))
        fmt = "train_ids"
        if labeled:
            labs = [lab for _, _, lab in entries]
            if all(lab.endswith("_labelIds.png") for lab in labs):
                fmt = "cityscapes_ids"
            elif any(lab.endswith("_labelIds.png") for lab in labs):
                raise DataError(
                    "Cityscapes labels mix *_labelIds.png and train-id files; convert them to one kind")
        super().__init__(root, entries, "cityscapes_ids" if fmt == "cityscapes_ids" else "gray", labeled)
        self.list_file = list_file

    @staticmethod
    def _from_stem(root, split, stem, labeled):
        city, base = stem.split("/", 1)
        img = os.path.join(root, "leftImg8bit", split, city, base + "_leftImg8bit.png")
        lab = None
        if labeled:
            gt = os.path.join(root, "gtFine", split, city, base)
            lab = gt + "_gtFine_labelTrainIds.png"
            if not os.path.isfile(lab) and os.path.isfile(gt + "_gtFine_labelIds.png"):
                lab = gt + "_gtFine_labelIds.png"
        return base, img, lab


def open_dataset(name: str, root=None, split: str = "train", list_file: Optional[str] = None,
                 *, labeled: bool = True):
    """Open a dataset by name: ``"voc"``, ``"cityscapes"`` or ``"synthetic"``.

    Items are dicts ``image`` (HxWx3 uint8), ``label`` (HxW uint8 train ids, 255 =
    ignore; None when ``labeled=False``) and ``name``. ``list_file`` selects a subset
    (one id per line, or ``image_path label_path`` relative to ``root``).
    For ``synthetic``, ``root`` is None, a seed, a dict or a spec string such as
    ``"seed=3,n=256,size=128"`` (see :class:`cps_fast.data.synthetic.SyntheticDataset`),
    or a folder written by :func:`cps_fast.data.synthetic.write_voc` (opened as VOC).
    """
    key = name.lower().replace("-", "_")
    if key in ("voc", "pascal_voc", "voc2012"):
        return VOCDataset(root, split, list_file, labeled=labeled)
    if key == "cityscapes":
        return CityscapesDataset(root, split, list_file, labeled=labeled)
    if key == "synthetic":
        from .synthetic import SyntheticDataset

        if isinstance(root, (str, os.PathLike)) and os.path.isdir(root):
            ds = VOCDataset(str(root), split, list_file, labeled=labeled)
            ds.num_classes = SyntheticDataset.num_classes
            ds.class_names = SyntheticDataset.class_names
            ds.palette = SyntheticDataset.palette
            return ds
        return SyntheticDataset.from_spec(root, split=split, list_file=list_file, labeled=labeled)
    raise DataError(f"unknown dataset {name!r}; expected one of 'voc', 'cityscapes', 'synthetic'")
