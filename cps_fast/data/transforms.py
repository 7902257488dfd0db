"""Training augmentation on the host (the PyTorch backend's transform).

The recipe of the reference CPS code (TorchSemiSeg ``TrainPre`` with ``furnace/utils/img_utils.py``),
step for step: horizontal mirror (p 0.5), random scale to ``int(h * s), int(w * s)`` (image
bilinear with half-pixel centres and no antialiasing, as ``cv2.INTER_LINEAR``; label nearest as
``cv2.INTER_NEAREST``: source index ``floor(x * in / out)``), normalisation with ImageNet
mean/std, and a random crop padded with 0 (image, after normalisation) and 255 (label).

Only the crop window is ever computed: both resizes are evaluated directly at the output
pixels, so the cost is proportional to the crop, not to the scaled image. The mirror is folded
into the column indices: the crop is placed in the mirrored scaled image, as the reference does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["scaled_size", "crop_anchor", "augment"]


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Size after random scaling: ``int(h * s), int(w * s)`` as the reference, at least 1."""
    return max(1, int(h * scale)), max(1, int(w * scale))


def crop_anchor(size: int, crop: int, u: float) -> int:
    """Top/left of the crop window in the (mirrored, if flipped) scaled image, from ``u`` in [0, 1).

    The reference's ``generate_random_crop_pos``: when the image is larger than the crop, a
    uniform integer in ``[0, size - crop + 1]`` (``random.randint`` includes both ends, so the
    window may run one pixel past the end, which is padded), here ``floor(u * (size - crop + 2))``;
    0 when it equals the crop; when it is smaller, negative, centring the image in the padding
    (``pad_image_to_shape``: ``(crop - size) // 2`` before, the rest after). A 1-pixel crop never
    runs past the end (the reference asserts there instead).
    """
    if size > crop:
        last = size - crop + (crop > 1)
        return min(int(u * (last + 1)), last)
    if size == crop:
        return 0
    return -((crop - size) // 2)


def _axis(out_len: int, anchor: int, in_len: int, scaled_len: int, flip: bool = False):
    """Source coordinates of output positions ``anchor .. anchor + out_len`` of the scaled image
    (a resize ``in_len -> scaled_len``), mirrored first if ``flip``, as the reference orders it:
    (valid mask, nearest index, linear i0, i1, weight), indices into the unmirrored input.

    Nearest is OpenCV's ``INTER_NEAREST``: ``floor(x * in / out)``, computed exactly in integers,
    in the mirrored frame (it does not commute with the mirror: unmirrored it would pick the
    other pixel of each pair at scale 0.5). Bilinear with half-pixel centres does commute: the
    mirrored image's column ``x`` is the unmirrored one's ``scaled_len - 1 - x``.
    """
    pos = np.arange(anchor, anchor + out_len)
    valid = (pos >= 0) & (pos < scaled_len)
    p = np.clip(pos, 0, scaled_len - 1)
    nearest = p * in_len // scaled_len  # < in_len: no clamp needed
    if flip:
        nearest = in_len - 1 - nearest
        p = scaled_len - 1 - p
    src = np.clip((p + 0.5) * (in_len / scaled_len) - 0.5, 0.0, in_len - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_len - 1)
    wgt = (src - i0).astype(np.float32)
    return valid, nearest, i0, i1, wgt


def augment(image: np.ndarray, label: Optional[np.ndarray], *, scale: float, flip: bool,
            uy: float, ux: float, crop_size: Sequence[int], mean: Sequence[float],
            std: Sequence[float]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Mirror (if ``flip``), scale, normalise and crop (with padding) one sample, as the reference.

    ``uy``/``ux`` in [0, 1) place the crop (:func:`crop_anchor`; ``ux`` in the mirrored image).
    Returns ``(crop_h x crop_w x 3 float32 image, crop_h x crop_w uint8 label or None)``;
    padded pixels are 0 in the (normalised) image and 255 in the label.
    """
    h, w = image.shape[:2]
    ch, cw = int(crop_size[0]), int(crop_size[1])
    sh, sw = scaled_size(h, w, scale)
    ay, ax = crop_anchor(sh, ch, uy), crop_anchor(sw, cw, ux)
    vy, ny, y0, y1, wy = _axis(ch, ay, h, sh)
    vx, nx, x0, x1, wx = _axis(cw, ax, w, sw, flip)
    ry, rx = np.flatnonzero(vy), np.flatnonzero(vx)
    ys, ye, xs, xe = ry[0], ry[-1] + 1, rx[0], rx[-1] + 1

    # separable bilinear: rows first (only the needed ones), then columns
    top = image[y0[ys:ye]].astype(np.float32)
    bot = image[y1[ys:ye]].astype(np.float32)
    rows = top + (bot - top) * wy[ys:ye, None, None]
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
    return out, lab
