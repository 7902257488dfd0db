"""The training augmentation against a NumPy re-implementation of the reference's steps
(TorchSemiSeg ``TrainPre``: ``random_mirror``, ``random_scale``, ``normalize``,
``generate_random_crop_pos``, ``random_crop_pad_to_shape``), on the host and in DALI."""
import numpy as np
import pytest
import torch

from cps_fast.data.loaders import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD
from cps_fast.data.splits import SampleSchedule, SampleSpec
from cps_fast.data.transforms import augment, crop_anchor, scaled_size

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except Exception:
    HAVE_DALI = False

SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
SIZE, CROP = (37, 53), (27, 40)  # odd sizes; at 0.75 the rows equal the crop, the columns fall 1 short
GREY = np.asarray(STD, np.float32) * 255.0  # one grey level of the normalised image, per channel


# --------------------------------------------------------------------------- the reference, in NumPy

def _cv_linear_axis(in_len, out_len):
    """``cv2.INTER_LINEAR`` along one axis: half-pixel centres, the border pixel repeated."""
    fx = (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5
    sx = np.floor(fx).astype(np.int64)
    f = fx - sx
    left, right = sx < 0, sx >= in_len - 1
    f[left | right] = 0.0
    sx[left], sx[right] = 0, in_len - 1
    return sx, np.minimum(sx + 1, in_len - 1), f


def _cv_resize_linear(img, out_h, out_w):
    y0, y1, fy = _cv_linear_axis(img.shape[0], out_h)
    x0, x1, fx = _cv_linear_axis(img.shape[1], out_w)
    v = img.astype(np.float64)
    v = v[y0] * (1 - fy)[:, None, None] + v[y1] * fy[:, None, None]
    v = v[:, x0] * (1 - fx)[None, :, None] + v[:, x1] * fx[None, :, None]
    return np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)  # OpenCV rounds to the uint8 result


def _cv_resize_nearest(lab, out_h, out_w):
    """``cv2.INTER_NEAREST`` (legacy, not half-pixel): source ``floor(x * in / out)``, clamped."""
    h, w = lab.shape
    ys = np.minimum(np.arange(out_h) * h // out_h, h - 1)
    xs = np.minimum(np.arange(out_w) * w // out_w, w - 1)
    return lab[np.ix_(ys, xs)]


def _pad_to(a, crop, value):
    """``pad_image_to_shape``: ``pad // 2`` before, the rest after, per axis."""
    ph, pw = max(crop[0] - a.shape[0], 0), max(crop[1] - a.shape[1], 0)
    widths = [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, widths, constant_values=value)


def reference_train_pre(image, label, *, scale, flip, pos, crop):
    """The reference's per-sample steps, with its random draws given: mirror, scale, normalise,
    crop at ``pos`` (its ``generate_random_crop_pos`` result) and pad. Returns the image, the
    label and the mask of pixels that came from the image (False where padded)."""
    if flip:
        image, label = image[:, ::-1], label[:, ::-1]
    sh, sw = int(image.shape[0] * scale), int(image.shape[1] * scale)
    image, label = _cv_resize_linear(image, sh, sw), _cv_resize_nearest(label, sh, sw)
    image = (image.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    (y, x), (ch, cw) = pos, crop
    window = (slice(y, y + ch), slice(x, x + cw))
    return (_pad_to(image[window], crop, 0.0), _pad_to(label[window], crop, 255),
            _pad_to(np.ones((sh, sw), bool)[window], crop, False))


def _inside(size, crop, sp):
    """Pixels of the crop that come from the scaled image (the rest is padding), per crop_anchor."""
    sh, sw = scaled_size(*size, sp.scale)
    ay, ax = crop_anchor(sh, crop[0], sp.uy), crop_anchor(sw, crop[1], sp.ux)
    ys, xs = ay + np.arange(crop[0]), ax + np.arange(crop[1])
    return ((ys >= 0) & (ys < sh))[:, None] & ((xs >= 0) & (xs < sw))[None, :]


def _u_for(anchor, size, crop):
    """A crop draw ``u`` in [0, 1) that gives ``anchor`` (the middle of its interval)."""
    return (anchor + 0.5) / (size - crop + 2) if size > crop else 0.5


def _anchors(size, crop):
    """Reference crop positions to try: both ends (``size - crop + 1`` runs a pixel past the end)."""
    if size <= crop:
        return [0]
    return sorted({0, 1, (size - crop) // 2, size - crop, size - crop + 1})


def _sample(rng, size=SIZE):
    image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    label = rng.integers(0, 21, size, dtype=np.uint8)
    label[rng.random(size) < 0.05] = 255
    return image, label


def _cases(size=SIZE, crop=CROP):
    """(scale, flip, (anchor_y, anchor_x)) over the six scales, both flips and the extreme anchors."""
    out = []
    for scale in SCALES:
        sh, sw = scaled_size(*size, scale)
        ys, xs = _anchors(sh, crop[0]), _anchors(sw, crop[1])
        pairs = {(y, x) for y in ys for x in (xs[0], xs[-1])} | {(ys[0], x) for x in xs}
        out += [(scale, flip, p) for flip in (False, True) for p in sorted(pairs)]
    return out


# --------------------------------------------------------------------------- host transform

def test_crop_anchor_is_the_reference_draw():
    """``random.randint(0, size - crop + 1)`` when larger, 0 when equal, centred padding when smaller;
    the schedule's uniform ``u`` gives every reference position equally often."""
    n = 8 * 7 * 10
    us = (np.arange(n) + 0.5) / n
    for size, crop in ((10, 4), (12, 7), (13, 5)):  # 8, 7 and 10 positions
        got = np.bincount([crop_anchor(size, crop, u) for u in us])
        assert len(got) == size - crop + 2 and (got == n // (size - crop + 2)).all(), (size, crop, got)
    assert crop_anchor(9, 4, 0.9999999999) == 6 and crop_anchor(9, 4, 0.0) == 0
    assert {crop_anchor(8, 8, u) for u in us[::50]} == {0}
    assert crop_anchor(5, 8, 0.3) == -1 and crop_anchor(4, 8, 0.9) == -2  # pad 3: 1 before; pad 4: 2
    assert crop_anchor(5, 1, 0.9999999) == 4  # a 1-pixel crop stays inside (the reference asserts)


@pytest.mark.parametrize("scale", SCALES)
def test_host_augment_matches_reference(scale):
    rng = np.random.default_rng([11, int(scale * 100)])
    image, label = _sample(rng)
    cases = [(flip, anchors) for s, flip, anchors in _cases() if s == scale]
    assert len(cases) >= 2
    for flip, (ay, ax) in cases:
        sh, sw = scaled_size(*SIZE, scale)
        uy, ux = _u_for(ay, sh, CROP[0]), _u_for(ax, sw, CROP[1])
        assert (crop_anchor(sh, CROP[0], uy), crop_anchor(sw, CROP[1], ux)) == (
            ay if sh > CROP[0] else -((CROP[0] - sh) // 2), ax if sw > CROP[1] else -((CROP[1] - sw) // 2))
        img, lab = augment(image, label, scale=scale, flip=flip, uy=uy, ux=ux, crop_size=CROP,
                           mean=MEAN, std=STD)
        ref_img, ref_lab, inside = reference_train_pre(image, label, scale=scale, flip=flip, pos=(ay, ax),
                                                       crop=CROP)
        where = f"scale {scale} flip {flip} anchor ({ay}, {ax})"
        np.testing.assert_array_equal(lab, ref_lab, err_msg=where)
        grey = np.abs(img - ref_img) * GREY
        assert grey.max() <= 1.001, f"{where}: image differs by {grey.max():.3f} grey levels"
        assert (img[~inside] == 0).all(), where
        np.testing.assert_array_equal(_inside(SIZE, CROP, SampleSpec(0, scale, flip, uy, ux)), inside)


def test_flip_picks_the_mirrored_images_pixels():
    """Floor-nearest does not commute with a mirror: at scale 0.5 the mirrored label takes the
    other pixel of each pair than the unmirrored one flipped afterwards would."""
    label = np.tile(np.arange(8, dtype=np.uint8), (4, 1))  # column index
    image = np.zeros((4, 8, 3), np.uint8)
    _, lab = augment(image, label, scale=0.5, flip=True, uy=0.0, ux=0.0, crop_size=(2, 4), mean=MEAN, std=STD)
    np.testing.assert_array_equal(lab[0], [7, 5, 3, 1])  # reference: mirror [7..0], then take 0, 2, 4, 6
    _, lab = augment(image, label, scale=0.5, flip=False, uy=0.0, ux=0.0, crop_size=(2, 4), mean=MEAN, std=STD)
    np.testing.assert_array_equal(lab[0], [0, 2, 4, 6])
    # the window is placed in the mirrored image: anchor 3 (= 8 - 6 + 1) takes its columns 3..7, then pads
    _, lab = augment(image, label, scale=1.0, flip=True, uy=0.0, ux=0.99, crop_size=(2, 6), mean=MEAN, std=STD)
    np.testing.assert_array_equal(lab[0], [4, 3, 2, 1, 0, 255])


# --------------------------------------------------------------------------- DALI against the host

class _FixedSchedule(SampleSchedule):
    """A schedule whose every epoch is the given samples, in batches of ``batch_size``."""

    def __init__(self, specs, batch_size):
        super().__init__(len(specs), batch_size)
        self.specs = list(specs)
        self.iters_per_epoch = len(self.specs) // batch_size

    def epoch(self, e):
        b = self.batch_size
        return [self.specs[k * b:(k + 1) * b] for k in range(self.iters_per_epoch)]


class _Arrays:
    """In-memory dataset (DALI's "array" mode) of per-pixel random images and labels."""

    num_classes = 21

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, label = self.items[i]
        return {"image": image, "label": label, "name": f"sample{i}"}


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_dali_matches_host_at_extreme_anchors(device):
    """Every scale, both flips, the crop window at both ends (one pixel past the end included)
    and padding on either axis: labels identical, images within one grey level, padding exact.
    (No nearest-neighbour ties are excluded: DALI samples midway between them, _window.)"""
    from cps_fast.data.dali import DaliLoader

    rng = np.random.default_rng(5)
    items = [_sample(rng), _sample(rng, (29, 61))]
    specs = []
    for i, (image, _) in enumerate(items):
        for scale, flip, (ay, ax) in _cases(image.shape[:2]):
            sh, sw = scaled_size(*image.shape[:2], scale)
            specs.append(SampleSpec(i, scale, flip, _u_for(ay, sh, CROP[0]), _u_for(ax, sw, CROP[1])))
    batch = 8
    specs += specs[: -len(specs) % batch]
    schedule = _FixedSchedule(specs, batch)
    loader = DaliLoader(_Arrays(items), schedule, crop_size=CROP, mean=MEAN, std=STD, with_label=True,
                        device=device, num_threads=2, prefetch_queue_depth=1)
    it = iter(loader)
    for batch_specs in schedule.epoch(0):
        got = next(it)
        for k, sp in enumerate(batch_specs):
            image, label = items[sp.index]
            img, lab = augment(image, label, scale=sp.scale, flip=sp.flip, uy=sp.uy, ux=sp.ux,
                               crop_size=CROP, mean=MEAN, std=STD)
            d_img = got["image"][k].permute(1, 2, 0).cpu().numpy()
            d_lab = got["label"][k].cpu().numpy()
            where = f"dali-{device} {sp}"
            np.testing.assert_array_equal(d_lab, lab, err_msg=where)
            grey = np.abs(d_img - img) * GREY
            assert grey.max() <= 1.01, f"{where}: image differs by {grey.max():.3f} grey levels"
            assert (d_img[~_inside(image.shape[:2], CROP, sp)] == 0).all(), where


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_cpu_label_rows_exact_over_hundreds_of_rows():
    """DALI's CPU nearest steps the row coordinate in float32; resampled in one pass, these
    VOC-like heights (scaled to 440-570 rows, coprime with the input) pick a neighbouring source
    row near the bottom. dali-cpu resamples the rows as columns instead (dali._build_pipeline)."""
    from cps_fast.data.dali import DaliLoader

    rng = np.random.default_rng(7)
    cases = ((297, 1.5), (291, 1.75), (323, 1.75))
    items = [(rng.integers(0, 256, (h, 3, 3), dtype=np.uint8), rng.integers(0, 21, (h, 3), dtype=np.uint8))
             for h, _ in cases]
    crop = (570, 4)
    specs = [SampleSpec(i, s, flip, 0.0, 0.0) for i, (_, s) in enumerate(cases) for flip in (False, True)]
    schedule = _FixedSchedule(specs, len(specs))
    loader = DaliLoader(_Arrays(items), schedule, crop_size=crop, mean=MEAN, std=STD, with_label=True,
                        device="cpu", num_threads=1, prefetch_queue_depth=1)
    got = next(iter(loader))["label"].numpy()
    for k, sp in enumerate(specs):
        _, lab = augment(*items[sp.index], scale=sp.scale, flip=sp.flip, uy=0.0, ux=0.0, crop_size=crop,
                         mean=MEAN, std=STD)
        np.testing.assert_array_equal(got[k], lab, err_msg=str(sp))
