"""Training augmentation on the host (the PyTorch backend's transform).

The recipe of the reference CPS code: random scale from a set (image bilinear
without antialiasing, label nearest), horizontal flip, random crop padded with
0 after normalisation (image) and 255 (label), normalisation with ImageNet
mean/std. Only the crop window is ever computed: the bilinear/nearest resize is
evaluated directly at the output pixels (half-pixel centres, as DALI's and
OpenCV's resize), so cost is proportional to the crop, not the scaled image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["scaled_size", "crop_anchor", "augment"]


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Size after random scaling: ``int(h * s), int(w * s)`` as the reference, at least 1."""
    return max(1, int(h * scale)), max(1, int(w * scale))


def crop_anchor(size: int, crop: int, u: float) -> int:
    """Top/left of the crop window in the scaled image.

    ``round(u * (size - crop))`` when the image is at least the crop; otherwise
    negative, centring the image in the padding (the reference pads
    ``(crop - size) // 2`` before and the rest after).
    """
    if size >= crop:
        return int(round(u * (size - crop)))
    return -((crop - size) // 2)


def _axis(out_len: int, anchor: int, in_len: int, scaled_len: int):
    """Source coordinates for output positions ``anchor .. anchor + out_len`` of a resize
    ``in_len -> scaled_len``: (valid mask, nearest index, linear i0, i1, weight)."""
    pos = np.arange(anchor, anchor + out_len)
    valid = (pos >= 0) & (pos < scaled_len)
    ratio = in_len / scaled_len
    centre = (pos + 0.5) * ratio
    nearest = np.clip(np.floor(centre).astype(np.int64), 0, in_len - 1)
    src = np.clip(centre - 0.5, 0.0, in_len - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_len - 1)
    wgt = (src - i0).astype(np.float32)
    return valid, nearest, i0, i1, wgt


def augment(image: np.ndarray, label: Optional[np.ndarray], *, scale: float, flip: bool,
            uy: float, ux: float, crop_size: Sequence[int], mean: Sequence[float],
            std: Sequence[float]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scale, crop (with padding), flip and normalise one sample.

    Returns ``(crop_h x crop_w x 3 float32 image, crop_h x crop_w uint8 label or None)``;
    padded pixels are 0 in the (normalised) image and 255 in the label.
    """
    h, w = image.shape[:2]
    ch, cw = int(crop_size[0]), int(crop_size[1])
    sh, sw = scaled_size(h, w, scale)
    ay, ax = crop_anchor(sh, ch, uy), crop_anchor(sw, cw, ux)
    vy, ny, y0, y1, wy = _axis(ch, ay, h, sh)
    vx, nx, x0, x1, wx = _axis(cw, ax, w, sw)
    ry, rx = np.flatnonzero(vy), np.flatnonzero(vx)
    ys, ye, xs, xe = ry[0], ry[-1] + 1, rx[0], rx[-1] + 1

    # separable bilinear: rows first (only the needed ones), then columns
    img = image.astype(np.float32, copy=False) if image.dtype == np.float32 else image
    top = img[y0[ys:ye]].astype(np.float32)
    bot = img[y1[ys:ye]].astype(np.float32)
    wyc = wy[ys:ye, None, None]
    rows = top + (bot - top) * wyc
    left = rows[:, x0[xs:xe]]
    right = rows[:, x1[xs:xe]]
    inner = left + (right - left) * wx[None, xs:xe, None]
    np.rint(inner, out=inner)  # the reference and DALI resize to uint8 before normalising

    mean_a = np.asarray(mean, np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(std, np.float32) * 255.0)
    out = np.zeros((ch, cw, 3), np.float32)
    out[ys:ye, xs:xe] = (inner - mean_a) * inv_std

    lab = None
    if label is not None:
        lab = np.full((ch, cw), 255, np.uint8)
        lab[ys:ye, xs:xe] = label[np.ix_(ny[ys:ye], nx[xs:xe])]
    if flip:
        out = out[:, ::-1]
        if lab is not None:
            lab = lab[:, ::-1]
    out = np.ascontiguousarray(out)
    if lab is not None:
        lab = np.ascontiguousarray(lab)
    return out, lab
