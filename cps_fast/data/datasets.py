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

from ..errors import UserError
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


class DataError(UserError, ValueError):
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

    def check_files(self, hint: str = "") -> None:
        """Raise DataError, naming the list, if a listed image (or label, when labeled) does not
        exist: one stat a file, cheap even for 10 582, and before any training step."""
        missing = []
        for _, img, lab in self._entries:
            absent = [p for p in ((img, lab) if self.labeled else (img,)) if p is None or not os.path.isfile(p)]
            if absent:
                missing.append(absent[0])
        if missing:
            src = getattr(self, "list_file", None) or self.root
            shown = ", ".join(str(p) for p in missing[:3])
            raise DataError(
                f"{len(missing)} of the {len(self)} images listed in {src} lack their files (e.g. {shown} "
                f"does not exist)" + (f"; {hint}" if hint else ""))

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


def _check_root(root, what: str, layouts) -> str:
    if root is None or not os.path.isdir(root):
        raise DataError(f"{what} root {root!r} is not a directory (expected a folder in one of these layouts: "
                        + "; ".join(lay.describe for lay in layouts) + ")")
    return str(root)


def _label_format_of(path: str) -> str:
    try:
        with Image.open(path) as im:
            return "palette" if im.mode == "P" else "gray"
    except Exception:
        return "gray"  # reported as a clear error when the file is read


_SPLITS = ("train", "val", "test")


def _split_and_stem(path: str, default_split: str, suffixes: Sequence[str]) -> tuple[str, str]:
    """(split, image id) of a list line's image path in any layout: the split is the path's
    ``train``/``val``/``test`` component (else ``default_split``), the id its file name without
    the extension and the layout's suffix (``_leftImg8bit``)."""
    parts = path.replace("\\", "/").split("/")
    split = next((p for p in reversed(parts[:-1]) if p in _SPLITS), default_split)
    stem = os.path.splitext(parts[-1])[0]
    for suffix in suffixes:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return split, stem


class _Layout:
    """One on-disk layout of a dataset: where the image and label of an id live, and the
    default list of a split. Subclasses say how to recognise themselves from the root."""

    name = ""
    describe = ""

    def __init__(self, root: str):
        self.root = root

    @classmethod
    def matches(cls, root: str) -> bool:
        raise NotImplementedError

    def image(self, split: str, id_: str) -> str:
        raise NotImplementedError

    def label(self, split: str, id_: str) -> Optional[str]:
        raise NotImplementedError

    def default_list(self, split: str) -> Optional[str]:
        """The split's list file in this layout, or None to take every image of the split."""
        return None

    def ids(self, split: str) -> list[str]:
        raise DataError(f"{self.describe} at {self.root}: no default list for split {split!r}")


def _detect(root: str, layouts, what: str, hint: str) -> _Layout:
    found = [layout for layout in layouts if layout.matches(root)]
    if len(found) > 1:
        raise DataError(f"{what} root {root} holds two layouts at once, " + " and ".join(f.describe for f in found)
                        + "; which one to read is ambiguous: keep them in separate folders")
    if found:
        return found[0](root)
    looked = "; ".join(f"{lay.describe}" for lay in layouts)
    raise DataError(f"{what} root {root} matches none of the layouts cps-fast reads: {looked}. {hint}")


class _VOCDevkit(_Layout):
    name = "voc-devkit"
    describe = ("VOCdevkit/VOC2012 (JPEGImages/ with SegmentationClassAug/ or SegmentationClass/, "
                "lists in ImageSets/Segmentation/)")

    def __init__(self, root: str):
        super().__init__(root)
        self.label_dir = next((os.path.join(root, sub) for sub in ("SegmentationClassAug", "SegmentationClass")
                               if os.path.isdir(os.path.join(root, sub))), None)

    @classmethod
    def matches(cls, root):
        return os.path.isdir(os.path.join(root, "JPEGImages"))

    def image(self, split, id_):
        return os.path.join(self.root, "JPEGImages", id_ + ".jpg")

    def label(self, split, id_):
        if self.label_dir is None:
            return None
        return os.path.join(self.label_dir, id_ + ".png")

    def default_list(self, split):
        return os.path.join(self.root, "ImageSets", "Segmentation", f"{split}.txt")


class _VOCReference(_Layout):
    """TorchSemiSeg's prepared ``DATA/pascal_voc`` (what ``cps-fast prepare voc`` writes)."""

    name = "voc-torchsemiseg"
    describe = ("TorchSemiSeg's prepared pascal_voc (train_aug/image/, train_aug/label/, val/image/, "
                "val/label/, lists train_aug.txt and val.txt)")
    FOLDER = {"train": "train_aug", "train_aug": "train_aug", "val": "val"}

    @classmethod
    def matches(cls, root):
        return any(os.path.isdir(os.path.join(root, f, "image")) for f in ("train_aug", "val"))

    def image(self, split, id_):
        return os.path.join(self.root, self.FOLDER.get(split, split), "image", id_ + ".jpg")

    def label(self, split, id_):
        return os.path.join(self.root, self.FOLDER.get(split, split), "label", id_ + ".png")

    def default_list(self, split):
        return os.path.join(self.root, f"{self.FOLDER.get(split, split)}.txt")


class _CityscapesOfficial(_Layout):
    name = "cityscapes-official"
    describe = ("the official Cityscapes folders (leftImg8bit/<split>/<city>/*_leftImg8bit.png, "
                "gtFine/<split>/<city>/*_gtFine_labelTrainIds.png or *_gtFine_labelIds.png)")

    @classmethod
    def matches(cls, root):
        return os.path.isdir(os.path.join(root, "leftImg8bit"))

    @staticmethod
    def _city(id_):
        """``city/stem`` as given, or the city read off the stem (``aachen_000000_000019``)."""
        if "/" in id_:
            return id_.rsplit("/", 1)
        return id_.split("_")[0], id_

    def image(self, split, id_):
        city, stem = self._city(id_)
        return os.path.join(self.root, "leftImg8bit", split, city, stem + "_leftImg8bit.png")

    def label(self, split, id_):
        city, stem = self._city(id_)
        gt = os.path.join(self.root, "gtFine", split, city, stem)
        lab = gt + "_gtFine_labelTrainIds.png"
        if not os.path.isfile(lab) and os.path.isfile(gt + "_gtFine_labelIds.png"):
            lab = gt + "_gtFine_labelIds.png"
        return lab

    def ids(self, split):
        img_dir = os.path.join(self.root, "leftImg8bit", split)
        if not os.path.isdir(img_dir):
            raise DataError(f"Cityscapes root {self.root} has no folder leftImg8bit/{split}/ (looked for {img_dir})")
        files = sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png")))
        if not files:
            raise DataError(f"Cityscapes folder {img_dir} has no <city>/*_leftImg8bit.png images")
        return [os.path.basename(os.path.dirname(f)) + "/" + os.path.basename(f)[: -len("_leftImg8bit.png")]
                for f in files]


class _CityscapesReference(_Layout):
    """TorchSemiSeg's prepared ``DATA/city`` (what ``cps-fast prepare cityscapes`` writes)."""

    name = "cityscapes-torchsemiseg"
    describe = ("TorchSemiSeg's prepared city (images/<split>/<name>.png, segmentation/<split>/<name>_gtFine.png "
                "in train ids, lists config_new/<split>.txt)")

    @classmethod
    def matches(cls, root):
        return os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "segmentation"))

    def image(self, split, id_):
        return os.path.join(self.root, "images", split, id_ + ".png")

    def label(self, split, id_):
        return os.path.join(self.root, "segmentation", split, id_ + "_gtFine.png")

    def default_list(self, split):
        path = os.path.join(self.root, "config_new", f"{split}.txt")
        return path if os.path.isfile(path) else None

    def ids(self, split):
        img_dir = os.path.join(self.root, "images", split)
        files = sorted(glob.glob(os.path.join(img_dir, "*.png")))
        if not files:
            raise DataError(f"Cityscapes folder {img_dir} has no *.png images")
        return [os.path.splitext(os.path.basename(f))[0] for f in files]


def _entries(layout: _Layout, split: str, list_file: str, labeled: bool, suffixes=()) -> list:
    """(name, image, label) of every line of ``list_file``: an id resolves through the layout;
    a pair of paths is taken as it is when the image exists under the root, else its id (and
    split) is read off the path and resolved through the layout, so the reference's lists load
    on the official folders and the other way round."""
    out = []
    for e in read_list(list_file):
        if e.label is None and e.image_is_id:  # an id, or city/id for Cityscapes
            name = e.image.rsplit("/", 1)[-1]
            out.append((name, layout.image(split, e.image), layout.label(split, e.image) if labeled else None))
            continue
        img = os.path.join(layout.root, e.image)
        lab = os.path.join(layout.root, e.label) if e.label is not None else None
        sp, id_ = _split_and_stem(e.image, split, suffixes)
        if not os.path.isfile(img):
            img, lab = layout.image(sp, id_), layout.label(sp, id_)
        elif lab is None and labeled:
            raise DataError(f"list {list_file} has no label path for image {img}")
        out.append((id_, img, lab if labeled else None))
    return out


class VOCDataset(SegDataset):
    """PASCAL VOC 2012 (optionally with the SBD "aug" labels), in either layout:

    * VOCdevkit: ``root/JPEGImages/<id>.jpg`` and ``root/SegmentationClassAug/<id>.png``
      (grayscale indices) or ``root/SegmentationClass/<id>.png`` (palette indices); without
      ``list_file`` the ids come from ``root/ImageSets/Segmentation/<split>.txt``;
    * TorchSemiSeg's prepared folder (``cps-fast prepare voc`` writes it):
      ``root/{train_aug,val}/{image,label}/<id>.{jpg,png}``, lists ``train_aug.txt`` and ``val.txt``.
    """

    num_classes = 21
    class_names = VOC_CLASSES
    palette = VOC_PALETTE
    LAYOUTS = (_VOCDevkit, _VOCReference)

    def __init__(self, root: str, split: str = "train", list_file: Optional[str] = None,
                 labeled: bool = True):
        root = _check_root(root, "VOC", self.LAYOUTS)
        layout = _detect(root, self.LAYOUTS, "VOC",
                         "`cps-fast prepare voc --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --out DIR` "
                         "writes the second from the official archives")
        if labeled and isinstance(layout, _VOCDevkit) and layout.label_dir is None:
            raise DataError(
                f"VOC root {root} has neither SegmentationClassAug/ nor SegmentationClass/ "
                f"(looked for {os.path.join(root, 'SegmentationClassAug')} and "
                f"{os.path.join(root, 'SegmentationClass')})")
        if list_file is None:
            list_file = layout.default_list(split)
        entries = _entries(layout, split, list_file, labeled)
        fmt = "gray"
        if labeled:
            first = next((lab for _, _, lab in entries if lab and os.path.isfile(lab)), None)
            fmt = _label_format_of(first) if first else "gray"
        super().__init__(root, entries, fmt, labeled)
        self.list_file = list_file
        self.layout = layout.name


class CityscapesDataset(SegDataset):
    """Cityscapes fine annotations, in either layout:

    * official: ``root/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` and
      ``root/gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png`` (used as is) or
      ``..._gtFine_labelIds.png`` (mapped to the 19 train ids, everything else 255);
      without ``list_file`` every image of the split (sorted);
    * TorchSemiSeg's prepared folder (``cps-fast prepare cityscapes`` writes it):
      ``root/images/<split>/<id>.png``, ``root/segmentation/<split>/<id>_gtFine.png`` (train ids),
      lists ``config_new/<split>.txt``.

    A list line is an id (``aachen_000000_000019``, also ``aachen/aachen_000000_000019``) or two
    paths relative to the root, in either layout's naming: the reference's lists
    (``/images/train/X.png<TAB>/segmentation/train/X_gtFine.png``) load on the official folders.
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    LAYOUTS = (_CityscapesOfficial, _CityscapesReference)

    def __init__(self, root: str, split: str = "train", list_file: Optional[str] = None,
                 labeled: bool = True):
        root = _check_root(root, "Cityscapes", self.LAYOUTS)
        layout = _detect(root, self.LAYOUTS, "Cityscapes",
                         "`cps-fast prepare cityscapes --root FOLDER_OR_ZIPS --out DIR` writes the second "
                         "from the official zips")
        if list_file is None:
            list_file = layout.default_list(split)
        if list_file is None:
            entries = [(i.rsplit("/", 1)[-1], layout.image(split, i), layout.label(split, i) if labeled else None)
                       for i in layout.ids(split)]
            if labeled and isinstance(layout, _CityscapesOfficial):
                gt = os.path.join(root, "gtFine", split)
                if not os.path.isdir(gt):
                    raise DataError(f"Cityscapes root {root} has no folder gtFine/{split}/ (looked for {gt})")
        else:
            entries = _entries(layout, split, list_file, labeled, suffixes=("_leftImg8bit",))
        fmt = "gray"
        if labeled:
            labs = [lab for _, _, lab in entries]
            if all(lab.endswith("_labelIds.png") for lab in labs):
                fmt = "cityscapes_ids"
            elif any(lab.endswith("_labelIds.png") for lab in labs):
                raise DataError(
                    "Cityscapes labels mix *_labelIds.png and train-id files; convert them to one kind "
                    "(`cps-fast prepare cityscapes` writes train ids)")
        super().__init__(root, entries, fmt, labeled)
        self.list_file = list_file
        self.layout = layout.name


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
