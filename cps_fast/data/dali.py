"""DALI backends: ``dali-gpu`` (JPEG decoding on the GPU, all augmentation on
the GPU) and ``dali-cpu`` (the same graph with CPU operators; what CI runs).

The sample schedule (which files, scale, flip, crop position) comes from
:class:`cps_fast.data.splits.SampleSchedule` through an ``external_source``,
so both DALI backends and the PyTorch backend draw identical augmentations for
a given (seed, stream, epoch, rank, world size); ranks shard the global batch
exactly as DALI readers with ``shard_id``/``num_shards`` would, but with the
reference's "labeled list repeated to the unlabeled length" epochs.

The augmentation is :func:`cps_fast.data.transforms.augment`'s, the reference's: mirror, scale
(label nearest as OpenCV's ``floor(x * in / out)``), crop; see :func:`_window` for how DALI's
region-of-interest resize, crop and mirror compute exactly that.

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
import math
import re
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..errors import DeviceError
from .common import CITYSCAPES_ID_TO_TRAINID, DataError, check_label, read_label
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


def _png_colour_type(data: np.ndarray) -> Optional[int]:
    """The colour type in a PNG's IHDR chunk (0 gray, 2 RGB, 3 palette, ...), or None if it is no PNG."""
    if data.size >= 26 and bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        return int(data[25])
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


class _Axis(NamedTuple):
    """One axis of a sample's crop window, as DALI's operators take it (see :func:`_window`)."""

    roi: tuple[float, float]        # image: input region resized to ``piece`` pixels
    label_roi: tuple[float, float]  # label: the same, shifted for floor-nearest
    rows: tuple[int, int]           # label: the input pixels ``[first, stop)`` it reads
    piece: int                      # pixels of the crop window inside the scaled image
    pos: float                      # where the piece sits in the padded crop (crop_pos_*)


def _window(in_len: int, scaled_len: int, crop: int, u: float, flip: bool = False) -> _Axis:
    """One axis of the reference's "mirror (if ``flip``), resize ``in_len -> scaled_len``, crop
    ``crop`` at :func:`crop_anchor`", computed without the scaled image, for DALI's "resize a
    region of interest, then crop (and mirror)".

    Only the part of the crop window inside the scaled image, ``piece`` pixels, is resampled:
    DALI's resize of the input region ``[roi_start, roi_end)`` (input pixels) to ``piece``
    pixels samples output pixel ``i`` at ``roi_start + (i + 0.5) * in_len / scaled_len``, where
    the full resize would (half-pixel centres), and outside the region from the image as the
    full resize does. ``pos`` places the piece in the padded crop. With ``flip`` the window is
    placed in the mirrored image, as the reference does; the region is its unmirrored
    counterpart and the crop's mirror runs last (bilinear commutes with the mirror).

    The label's region is the image's shifted by ``(in_len - g) / (2 * scaled_len)`` pixels
    (``g = gcd(in_len, scaled_len)``): DALI's nearest (``floor`` of the half-pixel centre) then
    samples at ``x * in / out + g / (2 * out)``, i.e. ``floor(x * in / out)`` as OpenCV's
    ``INTER_NEAREST`` and :func:`cps_fast.data.transforms.augment` compute it; flipped, at
    ``(x + 1) * in / out - g / (2 * out)`` in unmirrored coordinates, which is that index taken in
    the mirrored image. ``x * in / out`` is a multiple of ``g / out``, so the sampling points sit
    midway between those multiples, ``g / (2 * out)`` from any integer: exact despite DALI's
    float32 coordinates while their error stays below that margin (at least 1/14 pixel at
    Cityscapes' size and 1/1746 at VOC's, sides up to 500, at the paper's six scales).
    """
    a = crop_anchor(scaled_len, crop, u)
    lo, hi = max(a, 0), min(a + crop, scaled_len)
    first, last = lo * in_len // scaled_len, (hi - 1) * in_len // scaled_len  # label indices
    if flip:  # [lo, hi) of the mirrored image is [scaled - hi, scaled - lo) of the unmirrored one
        lo, hi, start = scaled_len - hi, scaled_len - lo, hi - a - crop
        first, last = in_len - 1 - last, in_len - 1 - first
    else:
        start = a - lo
    shift = (in_len - math.gcd(in_len, scaled_len)) / (2 * scaled_len) * (1 if flip else -1)
    r0, r1 = lo * in_len / scaled_len, hi * in_len / scaled_len
    return _Axis((r0, r1), (r0 + shift, r1 + shift), (first, last + 1), hi - lo,
                 _rel_pos(start, hi - lo, crop))


def _listed(names, limit: int = 16) -> str:
    """``names`` for an error message: the first ``limit`` and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}" if names else "[] (none read yet)"


def _dali_reason(e: BaseException) -> str:
    """The useful part of a DALI pipeline error: the operator and what it encountered (its text
    starts with "Critical error in pipeline:" and a Python traceback of the pipeline definition)."""
    text = str(e)
    op = re.search(r"Error in (\w+) operator `([^`]+)`", text)
    what = re.search(r"encountered:\s*\n\s*(\S[^\n]*)", text)
    if op and what:
        return f"{op.group(2)} on the {op.group(1)}: {what.group(1).strip()}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Critical error")]
    return lines[0] if lines else type(e).__name__


class _Source:
    """Batch callback for ``fn.external_source``: one call per iteration, in order."""

    def __init__(self, dataset, schedule: SampleSchedule, crop_size, with_label: bool,
                 image_mode: str, label_mode: Optional[str], start_epoch: int, start_batch: int = 0,
                 two_pass: bool = False):
        self.dataset, self.schedule, self.two_pass = dataset, schedule, two_pass
        self.ch, self.cw = crop_size
        self.with_label, self.image_mode, self.label_mode = with_label, image_mode, label_mode
        self.num_classes = getattr(dataset, "num_classes", 256)
        self._batches = self._gen(start_epoch, start_batch)
        self.recent = collections.deque(maxlen=8)  # names of batches in flight, for error messages
        self.recent_files = collections.deque(maxlen=8)  # the files DALI decodes of those batches
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

    def _name(self, i) -> str:
        if self.image_mode == "bytes":
            return str(self.dataset.paths(i)[0])
        try:
            return str(self.dataset.name(i))
        except Exception:
            return f"sample {i}"

    def _files(self, specs) -> list[str]:
        if self.image_mode != "bytes":
            return []
        out = []
        for sp in specs:
            img, lab = self.dataset.paths(sp.index)
            out += [str(img)] + ([str(lab)] if self.with_label and self.label_mode != "array" and lab else [])
        return out

    def suspects(self) -> list[str]:
        """The files of the batches in flight that PIL cannot decode either (DALI's decoder
        errors name no file), in order, each once."""
        from PIL import Image

        bad = []
        for path in dict.fromkeys(f for batch in self.recent_files for f in batch):
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:
                bad.append(f"{path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return bad

    def __call__(self):
        specs = next(self._batches)
        # the batch's names first: an error while reading it, here or in the pipeline, names them
        self.recent.append([self._name(sp.index) for sp in specs])
        self.recent_files.append(self._files(specs))
        try:
            return self._read(specs)
        except DataError:
            raise  # names its file already
        except Exception as e:
            raise DataError(f"reading a batch failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"the batch is files {self.recent[-1]}") from e

    def _read(self, specs):
        images, labels, names, piece, py, px, mirror = ([] for _ in range(7))
        roi_start, roi_end, label_args = [], [], []
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
                        if _png_colour_type(data) == 3:
                            raise DataError(
                                f"label file {lab_path} is a palette PNG but the dataset's first label is "
                                "grayscale; DALI's grayscale decoder would turn its colours into luminance, not "
                                "class indices. Store all labels one way (`cps-fast prepare` writes grayscale)")
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
            ay, ax = _window(h, sh, self.ch, sp.uy), _window(w, sw, self.cw, sp.ux, sp.flip)
            roi_start.append(np.array([ay.roi[0], ax.roi[0]], np.float32))
            roi_end.append(np.array([ay.roi[1], ax.roi[1]], np.float32))
            piece.append(np.array([ay.piece, ax.piece], np.float32))
            py.append(np.float32(ay.pos))
            px.append(np.float32(ax.pos))
            mirror.append(np.int32(sp.flip))
            if self.with_label:
                (ly0, ly1), (lx0, lx1) = ay.label_roi, ax.label_roi
                if self.two_pass:  # _build_pipeline: the columns over the rows read, then the rows
                    f, e = ay.rows
                    label_args.append(([f, lx0], [e, lx1], [e - f, ax.piece],
                                       [0, ly0 - f], [ax.piece, ly1 - f], [ax.piece, ay.piece]))
                else:
                    label_args.append(([ly0, lx0], [ly1, lx1]))
        out = [images, roi_start, roi_end, piece, py, px, mirror]
        if self.with_label:
            out.append(labels)
            out += [[np.array(a[j], np.float32) for a in label_args] for j in range(len(label_args[0]))]
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
        n_label = (7 if source.two_pass else 3) if with_label else 0  # _Source.__call__
        outs = fn.external_source(source=source, num_outputs=7 + n_label, batch=True)
        images, roi_start, roi_end, piece, py, px, mirror = outs[:7]
        if image_mode == "bytes":
            # the nvJPEG (mixed) decoder's default chroma upsampling is nearest-neighbour; fancy
            # upsampling is libjpeg-turbo's (dali-cpu) and PIL's (pytorch), so the backends decode
            # alike. EXIF orientation is ignored: the labels (PNG) are never rotated, nor are the
            # pytorch backend's images.
            images = fn.decoders.image(images, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       jpeg_fancy_upsampling=True, adjust_orientation=False)
        elif gpu:
            images = images.gpu()
        # random mirror, scale and crop, resampling only the crop window's pixels (_window): at
        # Cityscapes' 2048x1024 and scale 2, 0.64 Mpx per image instead of 8.4 Mpx. The window
        # is placed in the mirrored image; its unmirrored region is resized, cropped, mirrored.
        images = fn.resize(images, size=piece, roi_start=roi_start, roi_end=roi_end,
                           interp_type=types.INTERP_LINEAR, antialias=False)
        images = fn.crop_mirror_normalize(
            images, crop_h=ch, crop_w=cw, crop_pos_x=px, crop_pos_y=py, mirror=mirror,
            mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std],
            dtype=types.FLOAT, output_layout="HWC", out_of_bounds_policy="pad", fill_values=0.0)
        if not with_label:
            return images
        labels, lab_start, lab_end = outs[7:10]
        if label_mode == "bytes":
            # grayscale PNGs keep their values with GRAY (palette PNGs go the "array" way)
            labels = fn.decoders.image(labels, device="cpu", output_type=types.GRAY)
        # The label's region is shifted so that DALI's half-pixel nearest is OpenCV's
        # floor(x * in / out), taken in the mirrored image when flipped (_window).
        if not source.two_pass:
            labels = fn.resize(labels.gpu() if gpu else labels, size=piece, roi_start=lab_start,
                               roi_end=lab_end, interp_type=types.INTERP_NN, antialias=False)
        else:
            # DALI's CPU nearest computes each column's source directly but steps the row
            # coordinate (one float32 rounding per row, drifting by a source row after a few
            # hundred rows at VOC sizes), so the rows are resampled as columns: columns first
            # over the band of rows read (row step exactly 1), then the transposed band.
            lab_size, lab_start2, lab_end2, lab_size2 = outs[10:]
            labels = fn.resize(labels, size=lab_size, roi_start=lab_start, roi_end=lab_end,
                               interp_type=types.INTERP_NN, antialias=False)
            labels = fn.transpose(labels, perm=[1, 0, 2], transpose_layout=False)
            labels = fn.resize(labels, size=lab_size2, roi_start=lab_start2, roi_end=lab_end2,
                               interp_type=types.INTERP_NN, antialias=False)
            labels = fn.transpose(labels, perm=[1, 0, 2], transpose_layout=False)
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
                raise DeviceError("the dali-gpu data backend needs a CUDA device; use dali-cpu or pytorch")
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
                               label_mode, start_epoch, start_batch, two_pass=device == "cpu")
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
        except DataError:
            raise  # from _Source, naming its file or batch
        except Exception as e:
            names = list(dict.fromkeys(n for batch in self._source.recent for n in batch))
            bad = self._source.suspects()
            where = (f"PIL cannot decode {'; '.join(bad[:4])}" + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                     if bad else f"the failing batch is among files {_listed(names)}")
            raise DataError(f"DALI pipeline failed ({_dali_reason(e)}); {where}") from e

    def __iter__(self):
        while True:
            outs = self._run()
            images = self._to_torch(outs[0], torch.float32)  # B,H,W,3
            batch = {"image": images.permute(0, 3, 1, 2)}     # channels_last NCHW view
            if self.with_label:
                labels = self._to_torch(outs[1], torch.uint8)[..., 0]
                # (with 255 classes or more every uint8 value is valid; `>= 256` would wrap to 0)
                if self.check_labels and self.num_classes < 255:
                    bad = (labels >= self.num_classes) & (labels != 255)
                    if bool(bad.any()):
                        names = [n for b in self._source.recent for n in b]
                        raise DataError(
                            f"a label has value {int(labels[bad][0])}, outside 0..{self.num_classes - 1} "
                            f"and not ignore (255); the batch is among files {_listed(names)}")
                if self.label_dtype != torch.uint8:
                    labels = labels.to(self.label_dtype)
                batch["label"] = labels
            self._it += 1
            if self._it % len(self.schedule) == 0:
                self.epoch += 1
            yield batch
