"""CutMix box masks generated on the device (capturable in a CUDA graph).

Statistics of the reference generator (TorchSemiSeg / Britefury
``BoxMaskGenerator`` with prop_by_area, random aspect ratio, within bounds,
invert), for each of the ``n_boxes`` boxes of each mask:

    prop ~ U(prop_range)                         area proportion of the box
    y_prop = exp(U(0, 1) * log(prop)); x_prop = prop / y_prop   (log-uniform aspect)
    y_prop, x_prop *= sqrt(1 / n_boxes)          box area = prop / n_boxes
    size = round((y_prop * H, x_prop * W)); pos = round((shape - size) * U(0, 1))

starting from zeros and toggling (``1 - m``) inside each box, so overlaps XOR.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["box_masks"]


def box_masks(n: int, height: int, width: int, n_boxes: int = 3,
              prop_range: Sequence[float] = (0.25, 0.5), generator: Optional[torch.Generator] = None,
              device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, 1, height, width)`` masks of 0/1 made of ``n_boxes`` toggled boxes each.

    Everything runs on ``device`` with torch ops (no host sync, no numpy), drawing
    from ``generator`` (which must live on ``device``); ``device`` defaults to the
    generator's device, else the CPU. 1 marks pixels taken from the second image.
    """
    if n < 0 or height < 1 or width < 1 or n_boxes < 1:
        raise ValueError(f"box_masks needs n >= 0, height, width, n_boxes >= 1; got "
                         f"n={n}, height={height}, width={width}, n_boxes={n_boxes}")
    lo, hi = float(prop_range[0]), float(prop_range[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"prop_range must satisfy 0 <= low <= high <= 1, got {tuple(prop_range)}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator lives on {generator.device} but masks are requested on {device}")

    u = torch.rand((4, n, n_boxes), generator=generator, device=device, dtype=torch.float32)
    props = lo + (hi - lo) * u[0]
    log_p = torch.log(props.clamp_min(torch.finfo(torch.float32).tiny))
    y_props = torch.exp(u[1] * log_p)
    x_props = props / y_props
    fac = math.sqrt(1.0 / n_boxes)
    nonzero = props > 0
    y_props = torch.where(nonzero, y_props * fac, torch.zeros_like(y_props))
    x_props = torch.where(nonzero, x_props * fac, torch.zeros_like(x_props))
    h_box = torch.round(y_props * height)
    w_box = torch.round(x_props * width)
    y0 = torch.round((height - h_box) * u[2])
    x0 = torch.round((width - w_box) * u[3])
    y1, x1 = y0 + h_box, x0 + w_box

    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width)
    in_rows = ((ys >= y0[..., None, None]) & (ys < y1[..., None, None])).to(torch.float32)
    in_cols = ((xs >= x0[..., None, None]) & (xs < x1[..., None, None])).to(torch.float32)
    count = (in_rows * in_cols).sum(dim=1, keepdim=True)  # boxes covering each pixel
    return torch.remainder(count, 2.0).to(dtype)
