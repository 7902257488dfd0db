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

from . import common as _common
from .common import (  # also re-exported: IGNORE, _voc_colormap and those in __all__
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_LABEL_TABLE,
    CITYSCAPES_PALETTE,
    IGNORE,
    VOC_CLASSES,
    VOC_PALETTE,
    BaseDataset,
    DataError,
    _image_size,
    _voc_colormap,
    check_label,
    read_image,
    read_label,
    read_list,
)
from .synthetic import SyntheticDataset

# the datasets, and (re-exported, as they were defined here before) everything the leaf .common holds
__all__ = ["SegDataset", "Subset", "VOCDataset", "CityscapesDataset", "open_dataset", *_common.__all__]


# --------------------------------------------------------------------------- datasets

class SegDataset(BaseDataset):
    """A file-backed segmentation dataset: a list of (image, label) paths.

    ``labeled=False`` yields ``label=None`` and does not require label files.
    """

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
        if isinstance(root, (str, os.PathLike)) and os.path.isdir(root):
            ds = VOCDataset(str(root), split, list_file, labeled=labeled)
            ds.num_classes = SyntheticDataset.num_classes
            ds.class_names = SyntheticDataset.class_names
            ds.palette = SyntheticDataset.palette
            return ds
        return SyntheticDataset.from_spec(root, split=split, list_file=list_file, labeled=labeled)
    raise DataError(f"unknown dataset {name!r}; expected one of 'voc', 'cityscapes', 'synthetic'")


class Subset:
    """The items of ``dataset`` at ``indices``, keeping its attributes (classes, palette, paths)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        for method in ("paths", "image_size", "name"):
            if hasattr(dataset, method):
                fn = getattr(dataset, method)
                setattr(self, method, lambda i, fn=fn: fn(self.indices[i]))
        if hasattr(dataset, "load"):
            self.load = lambda i, *a, **k: dataset.load(self.indices[i], *a, **k)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def __getattr__(self, key):  # num_classes, class_names, palette, label_format, labeled ...
        if key in ("dataset", "indices"):
            raise AttributeError(key)
        return getattr(self.dataset, key)
