"""Built-in synthetic segmentation scenes: what the demo and the tests train on.

Each scene is a noisy background (colour gradient + coarse blotches) with 1-3
large objects that may occlude each other and at most one distractor. A class is
a (shape, texture) combination: disks, boxes and triangles, each striped or
checkered (6 classes + background). An object's colour is half a per-class colour
and half random; distractors (the same shapes with a random-noise texture, labeled
background) take a random class's colour, so colour hints at the class but a
network must still recognise texture (and shape) to segment. Sizes and texture
periods scale with the image (objects 0.18-0.35 of the shorter side in radius,
periods 0.10-0.16 of it). Tuned so that the demo's small DeepLabv3+ trained from
scratch on 32 labeled 64x64 scenes learns the objects on a 2-core CPU in about a
minute yet overfits those labels, which is where CPS's unlabeled data helps.
Deterministic from (seed, split, index); about 1 ms per 64x64 scene.
"""
from __future__ import annotations

import io
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .common import CITYSCAPES_ID_TO_TRAINID, VOC_PALETTE, BaseDataset, DataError, read_list

__all__ = ["SyntheticDataset", "render_scene", "write_voc", "write_cityscapes", "SYNTHETIC_CLASSES",
           "SYNTHETIC_TO_CITYSCAPES_ID"]

SYNTHETIC_CLASSES = (
    "background", "striped disk", "checkered disk", "striped box", "checkered box",
    "striped triangle", "checkered triangle",
)
_SHAPES = ("disk", "box", "triangle")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Scene statistics (see the module docstring for what they were tuned for).
_N_OBJECTS = (1, 3)  # labeled objects per scene (inclusive range)
_N_DISTRACTORS = (0, 1)  # noise-textured objects per scene, labeled background
_RADIUS = (0.18, 0.35)  # object radius as a fraction of the shorter side
_PERIOD = (0.10, 0.16)  # stripe/checker period as a fraction of the shorter side
_BLOTCH_STD = 15.0  # background low-frequency blotches (grey levels)
# Each class's object colour is half this class colour, half a random colour;
# distractors take a random class's colour, so colour hints at the class but never
# decides object versus background.
_CLASS_COLOUR_WEIGHT = 0.5
_CLASS_COLOURS = np.array([(0, 0, 0), (230, 60, 60), (60, 200, 60), (70, 90, 240), (240, 220, 40),
                           (220, 60, 230), (40, 220, 230)], np.float64)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Binary pattern in rotated object coordinates (u, v)."""
    if kind == "stripes":
        return (np.floor(u / (period / 2)) % 2).astype(bool)
    if kind == "checker":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(bool)
    raise ValueError(kind)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float, aspect: float) -> np.ndarray:
    if shape == "disk":
        return (u / aspect) ** 2 + (v * aspect) ** 2 < r * r
    if shape == "box":
        return (np.abs(u) < r * 0.85 * aspect) & (np.abs(v) < r * 0.85 / aspect)
    # equilateral triangle: inside three half-planes
    m = np.ones(u.shape, bool)
    for k in range(3):
        a = 2 * np.pi * k / 3
        m &= u * np.cos(a) + v * np.sin(a) < r * 0.55
    return m


def render_scene(rng: np.random.Generator, height: int = 128, width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (HxWx3 uint8 image, HxW uint8 label in 0..6)."""
    H, W = int(height), int(width)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    # background: colour gradient + low-frequency blotches
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    a = rng.uniform(0, 2 * np.pi)
    t = ((xx * np.cos(a) + yy * np.sin(a)) / max(H, W) + 1) / 2
    img = c0 + (c1 - c0) * t[..., None]
    gh, gw = max(2, H // 24), max(2, W // 24)
    blot = rng.normal(0, _BLOTCH_STD, (gh, gw, 3)).astype(np.float32)
    iy = np.minimum((yy[:, 0] * gh / H).astype(int), gh - 1)
    ix = np.minimum((xx[0] * gw / W).astype(int), gw - 1)
    img = img + blot[iy][:, ix]
    label = np.zeros((H, W), np.uint8)

    n_obj = int(rng.integers(_N_OBJECTS[0], _N_OBJECTS[1] + 1))
    n_dis = int(rng.integers(_N_DISTRACTORS[0], _N_DISTRACTORS[1] + 1))
    kinds = [("obj", None)] * n_obj + [("dis", None)] * n_dis
    order = rng.permutation(len(kinds))
    smin = min(H, W)
    for k in order:
        is_obj = kinds[k][0] == "obj"
        shape_id = int(rng.integers(0, 3))
        tex_id = int(rng.integers(0, 2))
        texture = ("stripes", "checker")[tex_id] if is_obj else "noise"
        r = rng.uniform(*_RADIUS) * smin
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        theta = rng.uniform(0, 2 * np.pi)
        aspect = rng.uniform(0.75, 1.33)
        # work inside the object's bounding square only
        ext = int(r * 1.6) + 2
        y0, y1 = max(0, int(cy) - ext), min(H, int(cy) + ext)
        x0, x1 = max(0, int(cx) - ext), min(W, int(cx) + ext)
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        m = _shape_mask(_SHAPES[shape_id], u, v, r, aspect)
        if not m.any():
            continue
        col_a = rng.uniform(0, 255, 3)
        cls_col = _CLASS_COLOURS[(1 + 2 * shape_id + tex_id) if is_obj else int(rng.integers(1, 7))]
        col_a = _CLASS_COLOUR_WEIGHT * cls_col + (1 - _CLASS_COLOUR_WEIGHT) * col_a
        col_b = col_a * rng.uniform(0.1, 0.4) + rng.uniform(0, 60, 3)
        period = rng.uniform(*_PERIOD) * smin
        if texture == "noise":
            pat = rng.random(u.shape) < 0.5
        else:
            ang = rng.uniform(0, np.pi)
            tu = u * np.cos(ang) + v * np.sin(ang)
            tv = -u * np.sin(ang) + v * np.cos(ang)
            pat = _texture(texture, tu, tv, period)
        patch = np.where(pat[..., None], col_a, col_b)
        region = img[y0:y1, x0:x1]
        region[m] = patch[m]
        label[y0:y1, x0:x1][m] = (1 + 2 * shape_id + tex_id) if is_obj else 0
    img = img + rng.normal(0, rng.uniform(2, 8), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


class SyntheticDataset(BaseDataset):
    """In-memory synthetic scenes (see module docstring); items as the other datasets.

    ``n`` scenes of ``size`` (int or (H, W)); split "train"/"val"/"test" use
    disjoint random streams. ``list_file`` (ids ``synthetic_<split>_<index>`` or
    bare indices) selects a subset.
    """

    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES
    palette = VOC_PALETTE[: len(SYNTHETIC_CLASSES)]
    label_format = "gray"

    def __init__(self, n: int = 512, size=128, seed: int = 0, split: str = "train",
                 labeled: bool = True, indices: Optional[Sequence[int]] = None):
        if split not in _SPLIT_IDS:
            raise DataError(f"synthetic split {split!r} is not one of {sorted(_SPLIT_IDS)}")
        self.size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
        self.n, self.seed, self.split, self.labeled = int(n), int(seed), split, labeled
        self.indices = list(range(self.n)) if indices is None else [int(i) for i in indices]

    @classmethod
    def from_spec(cls, spec=None, split: str = "train", list_file: Optional[str] = None,
                  labeled: bool = True) -> "SyntheticDataset":
        """Build from None, a seed (int), a dict or ``"seed=3,n=256,size=128x96"``."""
        kw: dict = {"n": 512 if split == "train" else 128}
        if isinstance(spec, int):
            kw["seed"] = spec
        elif isinstance(spec, dict):
            kw.update(spec)
        elif isinstance(spec, str) and spec:
            for part in spec.split(","):
                key, _, val = part.partition("=")
                key = key.strip()
                if key not in ("seed", "n", "size"):
                    raise DataError(f"synthetic spec {spec!r}: unknown key {key!r} (seed, n, size)")
                if key == "size":
                    hw = val.lower().split("x")
                    kw["size"] = (int(hw[0]), int(hw[-1]))
                else:
                    kw[key] = int(val)
        elif spec is not None:
            raise DataError(f"synthetic root must be None, a seed, a dict or a spec string, got {spec!r}")
        ds = cls(split=split, labeled=labeled, **kw)
        if list_file is not None:
            idx = []
            for e in read_list(list_file):
                tail = os.path.splitext(os.path.basename(e.image))[0].rsplit("_", 1)[-1]
                if not tail.isdigit() or int(tail) >= ds.n:
                    raise DataError(f"list file {list_file}: {e.image!r} is not a synthetic index below {ds.n}")
                idx.append(int(tail))
            ds.indices = idx
        return ds

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return f"synthetic_{self.split}_{self.indices[i]:05d}"

    def load(self, i: int, with_label: bool = True):
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], self.indices[i]])
        img, lab = render_scene(rng, *self.size)
        return img, (lab if with_label and self.labeled else None)

    def __repr__(self) -> str:
        return f"SyntheticDataset(n={self.n}, size={self.size}, seed={self.seed}, split={self.split!r})"


def write_voc(root: str, n_train: int = 64, n_val: int = 16, size=128, seed: int = 0,
              label_format: str = "gray", quality: int = 90) -> str:
    """Write synthetic scenes to ``root`` in the VOC layout and return ``root``.

    ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png`` (grayscale,
    ``label_format="gray"``) or ``SegmentationClass/<id>.png`` (palette), and
    ``ImageSets/Segmentation/{train,val}.txt``.
    """
    if label_format not in ("gray", "palette"):
        raise ValueError(f"label_format must be 'gray' or 'palette', got {label_format!r}")
    lab_dir = os.path.join(root, "SegmentationClassAug" if label_format == "gray" else "SegmentationClass")
    img_dir = os.path.join(root, "JPEGImages")
    list_dir = os.path.join(root, "ImageSets", "Segmentation")
    for d in (lab_dir, img_dir, list_dir):
        os.makedirs(d, exist_ok=True)
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(VOC_PALETTE)] = VOC_PALETTE
    pal[255] = (224, 224, 192)
    for split, n in (("train", n_train), ("val", n_val)):
        ds = SyntheticDataset(n=n, size=size, seed=seed, split=split)
        ids = []
        for i in range(len(ds)):
            img, lab = ds.load(i)
            name = ds.name(i)
            Image.fromarray(img).save(os.path.join(img_dir, name + ".jpg"), quality=quality)
            im = Image.fromarray(lab)  # mode "L"
            if label_format == "palette":
                im.putpalette(pal.tobytes())  # turns it into mode "P", keeping the indices
            im.save(os.path.join(lab_dir, name + ".png"))
            ids.append(name)
        with open(os.path.join(list_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.writelines(i + "\n" for i in ids)
    return root


# The synthetic classes as Cityscapes label ids (road, building, pole, vegetation, sky, person,
# car), so a written folder exercises the label-id -> train-id mapping.
SYNTHETIC_TO_CITYSCAPES_ID = np.array([7, 11, 17, 21, 23, 24, 26], np.uint8)


def write_cityscapes(root: str, n_train: int = 16, n_val: int = 4, size=(1024, 2048), seed: int = 0,
                     label_kind: str = "labelIds", unique: Optional[int] = None, render_height: int = 256,
                     compress_level: int = 1) -> str:
    """Write synthetic scenes to ``root`` in the Cityscapes layout and return ``root``.

    ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` (RGB PNG, as the real images) and
    ``gtFine/<split>/<city>/<stem>_gtFine_<label_kind>.png``: ``labelIds`` (the classes as
    :data:`SYNTHETIC_TO_CITYSCAPES_ID`; the dataset maps them to train ids) or
    ``labelTrainIds``. Two cities per split. Scenes are rendered at most ``render_height`` rows
    high and resized to ``size`` (bilinear image, nearest label): a full-size render takes
    seconds. ``unique``: only that many distinct scenes, whose PNG bytes are repeated under
    every further name (the decode costs the same; for benchmarks, which would otherwise spend
    most of their time encoding PNGs).
    """
    if label_kind not in ("labelIds", "labelTrainIds"):
        raise ValueError(f"label_kind must be 'labelIds' or 'labelTrainIds', got {label_kind!r}")
    if unique is not None and unique < 1:
        raise ValueError(f"unique must be None or at least 1, got {unique!r}")
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    rh = min(h, int(render_height))
    rw = max(1, round(w * rh / h))
    ids = SYNTHETIC_TO_CITYSCAPES_ID
    if label_kind == "labelTrainIds":
        ids = CITYSCAPES_ID_TO_TRAINID[ids]
    for split, n in (("train", n_train), ("val", n_val)):
        ds = SyntheticDataset(n=n, size=(rh, rw), seed=seed, split=split)
        encoded: list[tuple[bytes, bytes]] = []
        for i in range(n):
            city = ("aachen", "bremen")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            if unique is None or i < unique:
                img, lab = ds.load(i)
                if (rh, rw) != (h, w):
                    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
                    lab = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
                encoded.append((_png_bytes(img, compress_level), _png_bytes(ids[lab], compress_level)))
            img_bytes, lab_bytes = encoded[i % len(encoded)]
            for sub, name, data in (("leftImg8bit", f"{stem}_leftImg8bit.png", img_bytes),
                                    ("gtFine", f"{stem}_gtFine_{label_kind}.png", lab_bytes)):
                d = os.path.join(root, sub, split, city)
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
    return root


def _png_bytes(arr: np.ndarray, compress_level: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()
