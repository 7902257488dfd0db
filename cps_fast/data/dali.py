"""DALI backends: ``dali-gpu`` (JPEG decoding on the GPU, all augmentation on
the GPU) and ``dali-cpu`` (the same graph with CPU operators; what CI runs).

The sample schedule (which files, scale, flip, crop position) comes from
:class:`cps_fast.data.splits.SampleSchedule` through an ``external_source``,
so both DALI backends and the PyTorch backend draw identical augmentations for
a given (seed, stream, epoch, rank, world size); ranks shard the global batch
exactly as DALI readers with ``shard_id``/``num_shards`` would, but with the
reference's "labeled list repeated to the unlabeled length" epochs.

Labels are passed as file bytes and decoded by DALI as GRAY when the PNGs are
8-bit grayscale; palette PNGs are decoded on the host to their indices (DALI's
decoders expand palettes to colours, which would lose the class ids), and so
are 16-bit ones (DALI would rescale their values to 8 bits).
Cityscapes label ids are mapped to train ids with ``fn.lookup_table`` on the
pipeline's device. DALI is imported lazily: this module imports without it.
"""
from __future__ import annotations

import collections
import itertools
from typing import Optional, Sequence

import numpy as np
import torch

from .datasets import CITYSCAPES_ID_TO_TRAINID, DataError, check_label, read_label
from .splits import SampleSchedule
from .transforms import crop_anchor, scaled_size

__all__ = ["dali_available", "DaliLoader"]


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def _png_bit_depth(data: np.ndarray) -> Optional[int]:
    """The bit depth in a PNG file's IHDR chunk (``data``: the file's bytes), or None if it is no PNG."""
    if data.size >= 26 and bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        return int(data[24])
    return None


def _file_bit_depth(path: str) -> Optional[int]:
    """:func:`_png_bit_depth` of the file at ``path`` (None if it cannot be read: reading it later says why)."""
    try:
        return _png_bit_depth(np.fromfile(path, dtype=np.uint8, count=26))
    except OSError:
        return None


def _rel_pos(anchor: int, size: int, crop: int) -> float:
    # DALI places a crop at round(pos * (size - crop)); invert that for our anchor.
    return 0.0 if size == crop else anchor / (size - crop)


def _window(in_len: int, scaled_len: int, crop: int, u: float) -> tuple[float, float, int, float]:
    """One axis of "resize ``in_len -> scaled_len``, then crop ``crop`` at :func:`crop_anchor`",
    computed without the scaled image: ``(roi_start, roi_end, piece, pos)``.

    Only the part of the crop window inside the scaled image, ``piece`` pixels, is resampled:
    DALI's resize of the input region ``[roi_start, roi_end)`` (input pixels) to ``piece``
    pixels puts each output pixel's centre where the full resize would (the same scale
    ``in_len / scaled_len``, the same origin), and samples outside the region from the image
    as the full resize does. ``pos`` then places the piece in the padded crop.
    """
    a = crop_anchor(scaled_len, crop, u)
    lo, hi = max(a, 0), min(a + crop, scaled_len)
    ratio = in_len / scaled_len
    return lo * ratio, hi * ratio, hi - lo, _rel_pos(a - lo, hi - lo, crop)


class _Source:
    """Batch callback for ``fn.external_source``: one call per iteration, in order."""

    def __init__(self, dataset, schedule: SampleSchedule, crop_size, with_label: bool,
                 image_mode: str, label_mode: Optional[str], start_epoch: int, start_batch: int = 0):
        self.dataset, self.schedule = dataset, schedule
        self.ch, self.cw = crop_size
        self.with_label, self.image_mode, self.label_mode = with_label, image_mode, label_mode
        self.num_classes = getattr(dataset, "num_classes", 256)
        self._batches = self._gen(start_epoch, start_batch)
        self.recent = collections.deque(maxlen=8)  # names of batches in flight, for error messages
        self._sizes: dict[int, tuple[int, int]] = {}

    def _gen(self, start_epoch, start_batch=0):
        for epoch in itertools.count(start_epoch):
            batches = self.schedule.epoch(epoch)
            yield from (batches[start_batch:] if epoch == start_epoch else batches)

    def _size(self, i):
        s = self._sizes.get(i)
        if s is None:
            s = self.dataset.image_size(i)
            self._sizes[i] = s
        return s

    def __call__(self):
        specs = next(self._batches)
        images, labels, roi_start, roi_end, piece, py, px, mirror, names = ([] for _ in range(9))
        for sp in specs:
            i = sp.index
            if self.image_mode == "bytes":
                img_path, lab_path = self.dataset.paths(i)
                h, w = self._size(i)
                images.append(np.fromfile(img_path, dtype=np.uint8))
                names.append(img_path)
                if self.with_label:
                    if self.label_mode == "array":  # decoded here, so checked here (no device sync)
                        lab = read_label(lab_path, "gray")
                        check_label(lab, self.num_classes, lab_path)
                        labels.append(lab[:, :, None])
                    else:
                        data = np.fromfile(lab_path, dtype=np.uint8)
                        if _png_bit_depth(data) == 16:
                            raise DataError(
                                f"label file {lab_path} is a 16-bit PNG but the dataset's first label is 8-bit; "
                                "DALI would rescale its values to 8 bits. Store all labels with one bit depth")
                        labels.append(data)
            else:
                item = self.dataset[i]
                img = item["image"]
                h, w = img.shape[:2]
                images.append(np.ascontiguousarray(img))
                names.append(item.get("name", str(i)))
                if self.with_label:
                    if item["label"] is None:
                        raise DataError(f"sample {names[-1]} has no label; use unlabeled_loader")
                    check_label(item["label"], self.num_classes, names[-1])
                    labels.append(np.ascontiguousarray(item["label"])[:, :, None])
            sh, sw = scaled_size(h, w, sp.scale)
            y0, y1, ph, pos_y = _window(h, sh, self.ch, sp.uy)
            x0, x1, pw, pos_x = _window(w, sw, self.cw, sp.ux)
            roi_start.append(np.array([y0, x0], np.float32))
            roi_end.append(np.array([y1, x1], np.float32))
            piece.append(np.array([ph, pw], np.float32))
            py.append(np.float32(pos_y))
            px.append(np.float32(pos_x))
            mirror.append(np.int32(sp.flip))
        self.recent.append(names)
        out = [images]
        if self.with_label:
            out.append(labels)
        out += [roi_start, roi_end, piece, py, px, mirror]
        return tuple(out)


def _build_pipeline(source: _Source, *, batch_size, crop_size, mean, std, with_label, device,
                    device_id, num_threads, prefetch_queue_depth, seed, label_mode, image_mode,
                    lut: bool):
    from nvidia.dali import fn, pipeline_def, types

    ch, cw = crop_size
    gpu = device == "gpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id if gpu else None,
                  prefetch_queue_depth=prefetch_queue_depth, seed=seed)
    def pipe():
        n_out = 8 if with_label else 7
        outs = fn.external_source(source=source, num_outputs=n_out, batch=True)
        images = outs[0]
        labels = outs[1] if with_label else None
        roi_start, roi_end, piece, py, px, mirror = outs[-6:]
        if image_mode == "bytes":
            # the nvJPEG (mixed) decoder's default chroma upsampling is nearest-neighbour; fancy
            # upsampling is libjpeg-turbo's (dali-cpu) and PIL's (pytorch), so the backends decode
            # alike. EXIF orientation is ignored: the labels (PNG) are never rotated, nor are the
            # pytorch backend's images.
            images = fn.decoders.image(images, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       jpeg_fancy_upsampling=True, adjust_orientation=False)
        elif gpu:
            images = images.gpu()
        # random scale then crop, resampling only the crop window's pixels (_window): at
        # Cityscapes' 2048x1024 and scale 2, 0.64 Mpx per image instead of 8.4 Mpx
        images = fn.resize(images, size=piece, roi_start=roi_start, roi_end=roi_end,
                           interp_type=types.INTERP_LINEAR, antialias=False)
        images = fn.crop_mirror_normalize(
            images, crop_h=ch, crop_w=cw, crop_pos_x=px, crop_pos_y=py, mirror=mirror,
            mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std],
            dtype=types.FLOAT, output_layout="HWC", out_of_bounds_policy="pad", fill_values=0.0)
        if not with_label:
            return images
        if label_mode == "bytes":
            # grayscale PNGs keep their values with GRAY (palette PNGs go the "array" way)
            labels = fn.decoders.image(labels, device="cpu", output_type=types.GRAY)
        if gpu:
            labels = labels.gpu()
        labels = fn.resize(labels, size=piece, roi_start=roi_start, roi_end=roi_end,
                           interp_type=types.INTERP_NN, antialias=False)
        labels = fn.crop(labels, crop_h=ch, crop_w=cw, crop_pos_x=px, crop_pos_y=py,
                         out_of_bounds_policy="pad", fill_values=255)
        labels = fn.flip(labels, horizontal=mirror)
        if lut:
            keys = list(range(256))
            labels = fn.lookup_table(labels, keys=keys,
                                     values=[int(v) for v in CITYSCAPES_ID_TO_TRAINID],
                                     default_value=255, dtype=types.UINT8)
        return images, labels

    return pipe()


class DaliLoader:
    """Infinite iterator over augmented batches from a DALI pipeline.

    Yields ``{"image": (B,3,h,w) float32 channels_last, "label": (B,h,w) uint8}``
    on the GPU (``dali-gpu``) or the CPU (``dali-cpu``). ``len()`` is iterations
    per epoch.
    """

    def __init__(self, dataset, schedule: SampleSchedule, *, crop_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], with_label: bool,
                 device: str = "gpu", device_id: Optional[int] = None, num_threads: int = 4,
                 prefetch_queue_depth: int = 2, label_dtype: torch.dtype = torch.uint8,
                 start_epoch: int = 0, check_labels: Optional[bool] = None, start_batch: int = 0):
        try:
            import nvidia.dali  # noqa: F401
        except Exception as e:
            raise ImportError(f"the dali-{device} data backend needs nvidia-dali: {e}") from e
        if device == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError("the dali-gpu data backend needs a CUDA device; use dali-cpu or pytorch")
            device_id = torch.cuda.current_device() if device_id is None else int(device_id)
        self.backend = f"dali-{device}"
        self.dataset, self.schedule, self.with_label = dataset, schedule, with_label
        self.device, self.device_id, self.label_dtype = device, device_id, label_dtype
        self.crop_size = tuple(int(c) for c in crop_size)
        file_backed = hasattr(dataset, "paths") and hasattr(dataset, "image_size")
        image_mode = "bytes" if file_backed else "array"
        fmt = getattr(dataset, "label_format", "gray")
        label_mode = None
        if with_label:
            label_mode = "bytes" if file_backed and fmt in ("gray", "cityscapes_ids") else "array"
            if label_mode == "bytes" and len(dataset) and _file_bit_depth(dataset.paths(0)[1]) == 16:
                label_mode = "array"  # 16-bit PNGs: read on the host, where values > 255 are refused
        # Labels decoded on the host are always checked there. DALI-decoded ones are checked
        # on the pipeline's output: by default on dali-cpu; dali-gpu skips it (a device sync
        # per batch) unless check_labels=True.
        self.check_labels = (device == "cpu") if check_labels is None else bool(check_labels)
        self._source = _Source(dataset, schedule, self.crop_size, with_label, image_mode,
                               label_mode, start_epoch, start_batch)
        self.num_classes = getattr(dataset, "num_classes", 256)
        self._pipe = _build_pipeline(
            self._source, batch_size=schedule.batch_size, crop_size=self.crop_size, mean=mean,
            std=std, with_label=with_label, device=device, device_id=device_id,
            num_threads=num_threads, prefetch_queue_depth=prefetch_queue_depth,
            seed=(schedule.seed * 1000003 + schedule.stream * 7919 + schedule.rank) % (2**31),
            label_mode=label_mode, image_mode=image_mode,
            lut=with_label and fmt == "cityscapes_ids")
        self._pipe.build()
        self.epoch, self._it = int(start_epoch), 0

    def __len__(self) -> int:
        return len(self.schedule)

    def _to_torch(self, tl, dtype: torch.dtype) -> torch.Tensor:
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=dtype, device=torch.device("cuda", self.device_id))
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            return out
        return torch.from_numpy(np.array(tl.as_tensor()))

    def _run(self):
        try:
            if self.device == "gpu":
                # outputs ordered on torch's stream: DALI reuses their buffers only after the
                # copies feed_ndarray queues there (a host-synchronous run could recycle them
                # while the copy still waits behind the training step)
                return self._pipe.run(torch.cuda.current_stream(self.device_id).cuda_stream)
            return self._pipe.run()
        except Exception as e:
            names = [n for batch in self._source.recent for n in batch]
            raise DataError(
                f"DALI pipeline failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                f"the failing batch is among files {names[:16]}") from e

    def __iter__(self):
        while True:
            outs = self._run()
            images = self._to_torch(outs[0], torch.float32)  # B,H,W,3
            batch = {"image": images.permute(0, 3, 1, 2)}     # channels_last NCHW view
            if self.with_label:
                labels = self._to_torch(outs[1], torch.uint8)[..., 0]
                if self.check_labels:
                    bad = (labels >= self.num_classes) & (labels != 255)
                    if bool(bad.any()):
                        names = [n for b in self._source.recent for n in b]
                        raise DataError(
                            f"a label has value {int(labels[bad][0])}, outside 0..{self.num_classes - 1} "
                            f"and not ignore (255); the batch is among files {names[:16]}")
                if self.label_dtype != torch.uint8:
                    labels = labels.to(self.label_dtype)
                batch["label"] = labels
            self._it += 1
            if self._it % len(self.schedule) == 0:
                self.epoch += 1
            yield batch
