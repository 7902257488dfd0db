"""Sliding-window, flip and multi-scale inference, and the evaluation loop.

Follows the reference CPS evaluator (TorchSemiSeg ``furnace/engine/evaluator.py``:
``sliding_eval``, ``scale_process``, ``val_func_process``, ``process_image``):

- for each scale ``s`` the (normalised) image is resized bilinearly by ``s``;
- it is padded, centred, to at least the crop size with a constant (0 after
  normalisation, i.e. the mean colour), as ``pad_image_to_shape``;
- windows of the crop size start every ``stride = ceil(crop * stride_rate)``
  pixels, the last one flush with the bottom/right edge
  (``r_grid = ceil((H_pad - crop) / stride) + 1``);
- each window's logits (plus those of the flipped window, flipped back) are
  accumulated, the padding margin is cut, the scores are resized back to the
  original size bilinearly and summed over scales; the prediction is the argmax.

Where cps-fast differs, on purpose:

- the window sum is divided by the per-pixel window count and the flip sum by 2,
  and the scales are averaged, so the output is a mean of logits (or of softmax
  probabilities with ``output="probs"``). With one scale the argmax is identical
  to the reference's (it sums and never divides: a positive per-pixel factor);
  with several scales the reference weights each scale by its window overlap,
  which is an artefact, not a design.
- windows are batched (``window_batch`` at a time) instead of run one by one.
- the reference pads with raw pixel value 0 *before* normalisation in the
  multi-window branch (and with 0 after normalisation in the one-window branch);
  cps-fast always pads with ``pad_value`` after normalisation.
- resizing uses ``F.interpolate(mode="bilinear", align_corners=False)``, the
  same sampling grid as ``cv2.resize(INTER_LINEAR)``.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loaders import check_mean_std
from .metrics import ConfusionMatrix, SegMetrics

__all__ = ["sliding_window_inference", "evaluate", "predict", "DEFAULT_MEAN", "DEFAULT_STD"]

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w), got {v!r}")
        h, w = int(v[0]), int(v[1])
    else:
        h = w = int(v)
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return h, w


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis of a padded extent ``size >= crop`` (reference grid)."""
    n = int(math.ceil((size - crop) / stride)) + 1
    return [min(i * stride + crop, size) - crop for i in range(n)]


def _run(model_fn: ModelFn, x: torch.Tensor, num_classes: int, flip: bool, probs: bool) -> torch.Tensor:
    """Scores of ``x`` (N, C, h, w) in float32, flip-averaged when ``flip``."""

    def once(inp: torch.Tensor) -> torch.Tensor:
        out = model_fn(inp)
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(
                f"model_fn must return a (N, C, H, W) tensor of logits, got "
                f"{type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}"
            )
        if out.shape[0] != inp.shape[0] or out.shape[1] != num_classes or out.shape[2:] != inp.shape[2:]:
            raise ValueError(
                f"model_fn returned shape {tuple(out.shape)} for an input of shape {tuple(inp.shape)}; "
                f"expected ({inp.shape[0]}, {num_classes}, {inp.shape[2]}, {inp.shape[3]}) "
                f"(logits at the input's resolution)"
            )
        out = out.float()
        return out.softmax(1) if probs else out

    score = once(x)
    if flip:
        score = (score + once(x.flip(-1)).flip(-1)) * 0.5
    return score


@torch.no_grad()
def sliding_window_inference(
    model_fn: ModelFn,
    image: torch.Tensor,
    num_classes: int,
    crop_size: Union[int, Sequence[int]],
    stride: Union[None, int, Sequence[int]] = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    pad_value: float = 0.0,
    output: str = "logits",
    window_batch: int = 8,
) -> torch.Tensor:
    """Dense prediction of a batch of images by sliding windows (see module docstring).

    Args:
        model_fn: maps a ``(n, 3, h, w)`` float batch to ``(n, C, h, w)`` logits
            (put the model in eval mode first).
        image: ``(B, 3, H, W)`` (or ``(3, H, W)``) normalised float images on the
            device to run on.
        num_classes: C.
        crop_size: window size, int or ``(h, w)``.
        stride: window step in pixels, int or ``(h, w)``; default
            ``ceil(crop * 2/3)`` (the reference's ``eval_stride_rate``).
        flip: also run the horizontally flipped windows and average.
        scales: resize factors of the image; scores are resized back and averaged.
        pad_value: value of the padding (after normalisation; 0 = mean colour).
        output: ``"logits"`` (default) averages logits, ``"probs"`` averages
            softmax probabilities.
        window_batch: how many windows go through ``model_fn`` at once.

    Returns:
        ``(B, C, H, W)`` float32 averaged logits or probabilities on ``image``'s device.
    """
    if output not in ("logits", "probs"):
        raise ValueError(f"sliding_window_inference: output must be 'logits' or 'probs', got {output!r}")
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(
            "sliding_window_inference: image must be a normalised float tensor (B, 3, H, W), got "
            + (f"{image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image).__name__)
        )
    squeeze = image.dim() == 3
    if squeeze:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"sliding_window_inference: image must be (B, 3, H, W), got shape {tuple(image.shape)}")
    if not scales:
        raise ValueError("sliding_window_inference: scales must not be empty")
    if window_batch < 1:
        raise ValueError(f"sliding_window_inference: window_batch must be >= 1, got {window_batch}")
    crop_h, crop_w = _pair(crop_size, "crop_size")
    if stride is None:
        stride_h, stride_w = int(math.ceil(crop_h * 2 / 3)), int(math.ceil(crop_w * 2 / 3))
    else:
        stride_h, stride_w = _pair(stride, "stride")
    probs = output == "probs"

    b, _, h0, w0 = image.shape
    total = torch.zeros(b, num_classes, h0, w0, dtype=torch.float32, device=image.device)
    for s in scales:
        if s <= 0:
            raise ValueError(f"sliding_window_inference: scales must be positive, got {s}")
        if s == 1.0:
            img = image
        else:
            size = (max(1, int(round(h0 * s))), max(1, int(round(w0 * s))))
            img = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        h, w = img.shape[-2:]
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            img = F.pad(img, (left, pad_w - left, top, pad_h - top), value=pad_value)
        hp, wp = img.shape[-2:]
        ys = _window_starts(hp, crop_h, stride_h)
        xs = _window_starts(wp, crop_w, stride_w)
        windows = [(y, x) for y in ys for x in xs]

        if len(windows) == 1:
            score = _run(model_fn, img, num_classes, flip, probs)
        else:
            score = torch.zeros(b, num_classes, hp, wp, dtype=torch.float32, device=img.device)
            count = torch.zeros(1, 1, hp, wp, dtype=torch.float32, device=img.device)
            per_call = max(1, window_batch // b)
            for k in range(0, len(windows), per_call):
                chunk = windows[k:k + per_call]
                crops = torch.cat([img[:, :, y:y + crop_h, x:x + crop_w] for y, x in chunk], 0)
                out = _run(model_fn, crops, num_classes, flip, probs)
                for i, (y, x) in enumerate(chunk):
                    score[:, :, y:y + crop_h, x:x + crop_w] += out[i * b:(i + 1) * b]
                    count[:, :, y:y + crop_h, x:x + crop_w] += 1
            score = score / count
        score = score[:, :, top:top + h, left:left + w]
        if (h, w) != (h0, w0):
            score = F.interpolate(score, size=(h0, w0), mode="bilinear", align_corners=False)
        total += score
    if len(scales) > 1:
        total /= len(scales)
    return total[0] if squeeze else total


def _to_image_tensor(img, name: str) -> torch.Tensor:
    """HxWx3 uint8 numpy/tensor -> (H, W, 3) uint8 CPU tensor."""
    if isinstance(img, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(img))
    elif isinstance(img, torch.Tensor):
        t = img
    else:
        raise TypeError(f"item {name!r}: image must be an HxWx3 uint8 array, got {type(img).__name__}")
    if t.dim() != 3 or t.shape[2] != 3:
        raise ValueError(f"item {name!r}: image must be H x W x 3, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise ValueError(f"item {name!r}: image must be uint8, got {t.dtype}")
    return t


def _to_label_tensor(label, name: str, hw: tuple[int, int]) -> torch.Tensor:
    if label is None:
        raise ValueError(f"item {name!r} has no label; evaluation needs labeled items")
    t = torch.from_numpy(np.ascontiguousarray(label)) if isinstance(label, np.ndarray) else label
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"item {name!r}: label must be an HxW integer array, got {type(label).__name__}")
    if tuple(t.shape) != hw:
        raise ValueError(f"item {name!r}: label has shape {tuple(t.shape)} but the image is {hw[0]}x{hw[1]}")
    return t


def _normalise(img_hwc: torch.Tensor, device, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = img_hwc.to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0)
    return ((x - mean) / std).unsqueeze(0)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(
    model_fn: ModelFn,
    loader_or_dataset: Iterable[dict],
    num_classes: int,
    *,
    crop_size: Union[int, Sequence[int]] = 512,
    stride_rate: float = 2 / 3,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    device=None,
    ignore_index: int = 255,
    batch_size: int = 8,
    window_batch: int = 8,
    autocast_dtype: Optional[torch.dtype] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    max_items: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    log_every: int = 0,
    print_fn: Callable[[str], None] = print,
) -> SegMetrics:
    """Evaluate ``model_fn`` on labeled items and return the metrics of all ranks.

    Args:
        model_fn: ``(n, 3, h, w)`` normalised float -> ``(n, C, h, w)`` logits (eval mode).
        loader_or_dataset: a sequence of dicts ``{"image": HxWx3 uint8, "label": HxW
            uint8, "name": str}`` (what :func:`cps_fast.data.open_dataset` returns), or
            any iterable of such dicts. Under ``torch.distributed`` a sequence is
            sharded (rank r takes items r, r + W, ...); an iterable is assumed to be
            sharded already.
        num_classes: C.
        crop_size, stride_rate, flip, scales: sliding-window settings
            (stride = ceil(crop * stride_rate)), see :func:`sliding_window_inference`.
        mean, std: normalisation of ``image / 255``.
        device: where to run (default: CUDA when available, else CPU).
        batch_size: images that fit in one window at every scale (most of VOC) are
            padded to the crop and run this many at a time.
        window_batch: windows per ``model_fn`` call for larger images.
        autocast_dtype: e.g. ``torch.bfloat16`` to run ``model_fn`` under autocast.
        rank, world_size: override the process group's values (for sharding only;
            the reduction always uses the default group when it is initialised).
        max_items: evaluate only the first N items (before sharding).
        class_names: only used by ``log_every`` printing.
        log_every: print progress every N items on rank 0 (0 = silent).

    Returns:
        :class:`SegMetrics` (``miou``, ``iou``, ``pixel_acc``, ``mean_acc``, ...) with
        ``seconds`` and ``num_images`` (this rank's) added.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    d_rank, d_world = _distributed()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"evaluate: rank {rank} is outside 0..{world_size - 1}")
    crop_h, crop_w = _pair(crop_size, "crop_size")
    if not 0 < stride_rate <= 1:
        raise ValueError(f"evaluate: stride_rate must be in (0, 1], got {stride_rate}")
    stride = (int(math.ceil(crop_h * stride_rate)), int(math.ceil(crop_w * stride_rate)))
    check_mean_std(mean, std, "evaluate")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)

    if hasattr(loader_or_dataset, "__len__") and hasattr(loader_or_dataset, "__getitem__"):
        n = len(loader_or_dataset)
        if max_items is not None:
            n = min(n, max_items)
        items: Iterable[dict] = (loader_or_dataset[i] for i in range(rank, n, world_size))
    else:
        def _limited(it):
            for i, item in enumerate(it):
                if max_items is not None and i >= max_items:
                    return
                yield item
        items = _limited(loader_or_dataset)

    def run_model(x: torch.Tensor) -> torch.Tensor:
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                return model_fn(x)
        return model_fn(x)

    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    single_scale = tuple(float(s) for s in scales) == (1.0,)
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def update(pred: torch.Tensor, label: torch.Tensor, name: str) -> None:
        label = label.to(device, non_blocking=True)
        try:
            cm.update(pred, label, validate=device.type == "cpu")
        except ValueError as e:
            raise ValueError(f"item {name!r}: {e}") from None

    def flush() -> None:
        # Same result as one sliding_window_inference call per image: each image
        # is padded (centred) to exactly one window.
        if not pending:
            return
        xs, pads = [], []
        for _, x, _ in pending:
            h, w = x.shape[-2:]
            ph, pw = crop_h - h, crop_w - w
            xs.append(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0))
            pads.append((ph // 2, pw // 2, h, w))
        score = _run(run_model, torch.cat(xs, 0), num_classes, flip, probs=False)
        for (name, _, label), (top, left, h, w), s in zip(pending, pads, score):
            update(s[:, top:top + h, left:left + w].argmax(0), label, name)
        pending.clear()

    t0 = time.perf_counter()
    count = 0
    for item in items:
        name = str(item.get("name", count)) if isinstance(item, dict) else str(count)
        if not isinstance(item, dict):
            raise TypeError(f"evaluate: items must be dicts with image/label/name, got {type(item).__name__}")
        img = _to_image_tensor(item["image"], name)
        h, w = img.shape[0], img.shape[1]
        label = _to_label_tensor(item.get("label"), name, (h, w))
        x = _normalise(img, device, mean_t, std_t)
        if single_scale and h <= crop_h and w <= crop_w and batch_size > 1:
            pending.append((name, x, label))
            if len(pending) >= batch_size:
                flush()
        else:
            score = sliding_window_inference(run_model, x, num_classes, (crop_h, crop_w), stride=stride,
                                             flip=flip, scales=scales, window_batch=window_batch)
            update(score[0].argmax(0), label, name)
        count += 1
        if log_every and rank == 0 and count % log_every == 0:
            print_fn(f"eval: {count} images on rank 0, {time.perf_counter() - t0:.1f}s")
    flush()
    cm.all_reduce()
    result = cm.compute()
    result["seconds"] = time.perf_counter() - t0
    result["num_images"] = count
    if log_every and rank == 0:
        print_fn(result.table(class_names))
    return result


@torch.no_grad()
def predict(
    model_fn: ModelFn,
    image: np.ndarray,
    num_classes: int,
    *,
    crop_size: Union[int, Sequence[int]] = 512,
    stride_rate: float = 2 / 3,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    device=None,
) -> np.ndarray:
    """Predict the class map (H x W uint8 for C <= 256, else int64) of one HxWx3 uint8 image."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    img = _to_image_tensor(image, "image")
    check_mean_std(mean, std, "predict")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    x = _normalise(img, device, mean_t, std_t)
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride = (int(math.ceil(crop_h * stride_rate)), int(math.ceil(crop_w * stride_rate)))
    score = sliding_window_inference(model_fn, x, num_classes, (crop_h, crop_w), stride=stride,
                                     flip=flip, scales=scales)
    pred = score[0].argmax(0).cpu().numpy()
    return pred.astype(np.uint8) if num_classes <= 256 else pred
