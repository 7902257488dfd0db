"""DALI on the GPU and the production training path (issue 20): ``data_backend="dali-gpu"`` feeding
the captured CUDA graph, on small VOC (JPEG images) and Cityscapes (PNG images, label ids) folders.

The GPU tests (marked ``gpu``: skipped on CI's machines; benchmarks/run_gpu.sh's tests step runs
them with ``-m gpu``) check:

- the trainer's 30-iteration run through :meth:`Trainer.train` (capture, replays, logging, the
  final evaluation and checkpoint) never synchronises the host inside its ``data`` and ``step``
  phases (torch's sync debug mode, entered in those phases only: the loop's phases are
  :func:`cps_fast.train.profiling.phase` ranges, which this file wraps; no trainer code changes);
- DALI runs on torch's current stream, the side stream of the eager warm-up included, and what
  the captured step read at every iteration is the batch the loaders produce, while the step
  keeps the GPU behind the host (the window in which a stream race would show);
- a resume on the GPU continues at the saved data position;
- the dali-gpu pipelines are aligned (colour-coded images: every label pixel's class is the
  colour under it) and match dali-cpu over two epochs (labels exact, images within the decoders'
  tolerance), the unlabeled pipeline included.

Without DALI they skip, naming the import error; ``CPS_FAST_REQUIRE_DALI=1`` makes them run (and
fail) instead, for the GPU session whose DALI pack should have been installed. The tests without
the mark run here on dali-cpu: they check the fixtures and tolerances the GPU tests rely on.
"""
import contextlib
import json
import math
import os
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

import cps_fast.data as D
from cps_fast.data.transforms import crop_anchor, scaled_size
from cps_fast.train import Trainer, load_checkpoint
from cps_fast.train import trainer as trainer_mod
from cps_fast.train.trainer import open_training_sets, resolve_data_lists
from helpers import host_syncs_raise
from test_train import _gpu_cfg


def _dali_import_error():
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # a missing dependency (six, ...) fails here, not at the import of this file
        return f"{type(e).__name__}: {e}"
    return None


DALI_ERROR = _dali_import_error()
REQUIRE_DALI = os.environ.get("CPS_FAST_REQUIRE_DALI") == "1"
needs_dali = pytest.mark.skipif(DALI_ERROR is not None and not REQUIRE_DALI,
                                reason=f"nvidia.dali does not import ({DALI_ERROR})")

N = 30       # iterations of a run: eager warm-up and capture (4), then replays
SPLIT = 14   # the resume point: mid-epoch (6 iterations each), and both segments long enough to capture
SLEEP_CYCLES = 20_000_000  # a spin kernel in each step, about 10 ms at the H200's 1.98 GHz: the GPU falls behind
POISON_LABEL = 254         # never a label value here (classes < 21, ignore 255)
STD = torch.tensor(D.loaders.IMAGENET_STD)
SCALES = (0.5, 0.75, 1.25, 1.5, 1.75, 2.0)  # padded (0.5) and trimmed windows, both ways of rounding

# Image tolerances, in grey levels (the normalised difference times 255 * std):
# - PNG: the same pixels resampled by DALI's GPU and CPU resize, each rounding to uint8 once: at
#   most one level (tests/test_data.py holds dali-cpu to the host within the same bound);
# - JPEG: two IEEE 1180-compliant IDCTs (nvJPEG; libjpeg-turbo's islow) are each within 1 of the
#   exact one per Y/Cb/Cr sample, so within 2 of each other; RGB conversion scales a chroma error
#   by up to 1.772 (Cb into blue), and the fancy chroma upsampling and the resize add a rounding
#   each: about 8 levels at worst at a pixel, rare. So: the mean within 1 level and at most 0.1 %
#   of values beyond 6 (a judgement, not yet measured against nvJPEG). A crop misplaced by one
#   pixel moves the mean by more than 3 levels and puts more than 10 % of values beyond 6 on these
#   images (asserted on the CPU by test_jpeg_tolerance_sees_a_one_pixel_shift); a wrong flip,
#   image or channel order does far more.
PNG_MAX = 1.01
JPEG_MEAN, JPEG_OUTLIER, JPEG_OUTLIER_FRACTION = 1.0, 6.0, 1e-3


def _grey(x: torch.Tensor) -> torch.Tensor:
    """A normalised image (difference) in grey levels; channels at dim -3."""
    return x * (STD * 255.0).to(x.device).view(3, 1, 1)


def _jpeg_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    d = _grey(a.float() - b.float()).abs()
    return float(d.mean()), float((d > JPEG_OUTLIER).float().mean()), float(d.max())


def assert_images_close(a, b, jpeg: bool, what: str) -> None:
    a, b = a.cpu(), b.cpu()
    if jpeg:
        mean, outliers, worst = _jpeg_stats(a, b)
        assert mean <= JPEG_MEAN and outliers <= JPEG_OUTLIER_FRACTION, (
            f"{what}: images differ by {mean:.3f} grey levels on average (at most {JPEG_MEAN}), "
            f"{100 * outliers:.3f} % beyond {JPEG_OUTLIER} (at most {100 * JPEG_OUTLIER_FRACTION} %), max {worst:.2f}")
    else:
        worst = float(_grey(a - b).abs().max())
        assert worst <= PNG_MAX, f"{what}: images differ by {worst:.2f} grey levels (at most {PNG_MAX})"


# --------------------------------------------------------------------------- fixtures on disk

# flat colours, far apart: class c is painted COLOURS[c]
COLOURS = np.array([(20, 20, 20), (230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40), (40, 230, 230)],
                   np.uint8)
# the colour classes' Cityscapes label ids and the train ids the loader must map them to (0: ignored)
CITY_IDS = np.array([7, 8, 11, 12, 13, 0], np.uint8)
CITY_TRAIN = (0, 1, 2, 3, 4, 255)


def _blocks(rng, h, w, k, block=12):
    small = rng.integers(0, k, (h // block + 1, w // block + 1)).astype(np.uint8)
    return np.kron(small, np.ones((block, block), np.uint8))[:h, :w]


def _smooth(i, h, w):
    """A photograph-like smooth RGB image (different per i): JPEG keeps it well, a shift shows."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 70 * np.sin(xx / (9 + i) + c * 2.1) * np.cos(yy / (13 - i % 5))
                    + 40 * np.sin((xx + (c - 1) * yy) / (3 + i % 3) + c) for c in range(3)], -1)
    return img.clip(0, 255).astype(np.uint8)


def write_dataset(root, dataset: str, kind: str, n: int = 6, size=(41, 57), seed: int = 0):
    """A train split of ``n`` images in the real layout, opened with :func:`cps_fast.data.open_dataset`.

    ``dataset``: ``"voc"`` (``JPEGImages/<id>.jpg`` as real JPEGs, 4:2:0 as PIL writes them;
    grayscale ``SegmentationClassAug/<id>.png``; ``ImageSets/Segmentation/train.txt``) or
    ``"cityscapes"`` (PNG ``leftImg8bit/train/<city>/<stem>_leftImg8bit.png`` and
    ``gtFine/train/<city>/<stem>_gtFine_labelIds.png``). ``kind``: ``"colour"`` paints the blocks of
    a blocky label with :data:`COLOURS` (Cityscapes labels hold :data:`CITY_IDS`, the last one
    ignored); ``"smooth"`` is a smooth image with random labels per pixel (every class id, some
    ignored). Returns ``(dataset, the label values the colours stand for)``.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    k = 5 if dataset == "voc" else len(COLOURS)
    for i in range(n):
        if kind == "colour":
            cls = _blocks(rng, h, w, k)
            img = COLOURS[cls]
            lab = cls if dataset == "voc" else CITY_IDS[cls]
        else:
            img = _smooth(i, h, w)
            lab = rng.integers(0, 21 if dataset == "voc" else 34, (h, w)).astype(np.uint8)
            if dataset == "voc":
                lab[rng.random((h, w)) < 0.05] = 255
        if dataset == "voc":
            name = f"2007_{i:06d}"
            paths = (os.path.join(root, "JPEGImages", name + ".jpg"),
                     os.path.join(root, "SegmentationClassAug", name + ".png"))
        else:
            city = ("aachen", "bremen")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            paths = (os.path.join(root, "leftImg8bit", "train", city, stem + "_leftImg8bit.png"),
                     os.path.join(root, "gtFine", "train", city, stem + "_gtFine_labelIds.png"))
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.fromarray(img).save(paths[0], **(dict(format="JPEG", quality=95) if dataset == "voc" else {}))
        Image.fromarray(lab).save(paths[1])
    if dataset == "voc":
        os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
        with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as f:
            f.writelines(f"2007_{i:06d}\n" for i in range(n))
    want = tuple(range(k)) if dataset == "voc" else CITY_TRAIN
    return D.open_dataset(dataset, str(root)), want


def write_trainer_data(dataset: str, root) -> str:
    """The trainer's folder, written by the package's own builders: synthetic scenes as VOC (JPEG
    images, grayscale label PNGs) or Cityscapes (PNG images, label ids); 32 train and 2 val images."""
    if dataset == "voc":
        return D.write_voc(str(root), n_train=32, n_val=2, size=(72, 96), seed=3)
    return D.write_cityscapes(str(root), n_train=32, n_val=2, size=(64, 128), seed=3, render_height=64)


def trainer_cfg(dataset: str, root, **kw):
    """The GPU tests' small run (tests/test_train.py's _gpu_cfg: bf16, channels_last, CutMix, the CUDA
    graph) on a folder, with dali-gpu: 1/4 of 32 images labeled, batches of 4 + 4, 6 iterations an epoch;
    on Cityscapes with its presets' OHEM."""
    base = dict(dataset=dataset, data_root=str(root), num_classes=21 if dataset == "voc" else 19,
                data_backend="dali-gpu", partition="1/4", max_iters=N, log_every=10, eval_crop_size=48,
                eval_max_items=2, eval_batch_size=2)
    if dataset == "cityscapes":
        base.update(sup_loss="ohem", ohem_min_kept=500)
    return _gpu_cfg(**{**base, **kw})


def _inside(size, crop, scale, uy, ux) -> torch.Tensor:
    """The crop's pixels that come from the scaled image (the rest is padding), per crop_anchor."""
    sh, sw = scaled_size(*size, scale)
    ys = crop_anchor(sh, crop[0], uy) + np.arange(crop[0])
    xs = crop_anchor(sw, crop[1], ux) + np.arange(crop[1])
    return torch.from_numpy(((ys >= 0) & (ys < sh))[:, None] & ((xs >= 0) & (xs < sw))[None, :])


def _interior(lab: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Inside pixels whose 4 neighbours in the crop are inside and carry the same label."""
    m = inside.clone()
    m[1:] &= (lab[1:] == lab[:-1]) & inside[:-1]
    m[:-1] &= (lab[:-1] == lab[1:]) & inside[1:]
    m[:, 1:] &= (lab[:, 1:] == lab[:, :-1]) & inside[:, :-1]
    m[:, :-1] &= (lab[:, :-1] == lab[:, 1:]) & inside[:, 1:]
    return m


ALIGN_MIN = 0.99  # JPEG's ringing and 4:2:0 chroma near block edges; misplaced windows fall far below


def check_aligned(ds, want, backend: str, crop=(48, 64), epochs: int = 2) -> float:
    """The colour-coded check over ``epochs`` epochs of a labeled loader: layout, dtypes and device;
    padding exact (image 0, label 255, where the crop leaves the scaled image); label values among
    ``want`` and 255; on interior pixels the label is what the colour under it stands for. Returns
    the worst agreement of an image."""
    loader = D.labeled_loader(ds, batch_size=3, crop_size=crop, backend=backend, seed=5, scales=SCALES,
                              num_workers=0)
    batches = iter(loader)
    palette = torch.tensor(COLOURS[:len(want)], dtype=torch.float32)
    stands_for = torch.tensor(want)
    worst, n_flipped, n_pad, n = 1.0, 0, 0, 0
    for epoch in range(epochs):
        for specs in loader.schedule.epoch(epoch):
            b = next(batches)
            img, lab = b["image"], b["label"]
            assert img.is_cuda == (backend == "dali-gpu") and lab.device == img.device, (backend, img.device)
            assert img.shape == (3, 3) + crop and img.dtype == torch.float32
            assert img.is_contiguous(memory_format=torch.channels_last)
            assert lab.shape == (3,) + crop and lab.dtype == torch.uint8
            img, lab = img.cpu(), lab.cpu()
            assert set(lab.unique().tolist()) <= set(want) | {255}, f"{backend}: label values {lab.unique().tolist()}"
            rgb = _grey(img).permute(0, 2, 3, 1) + torch.tensor(D.loaders.IMAGENET_MEAN) * 255.0
            colour = ((rgb[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
            for k, sp in enumerate(specs):
                inside = _inside(ds.image_size(sp.index), crop, sp.scale, sp.uy, sp.ux)
                pad = ~inside
                assert (img[k].permute(1, 2, 0)[pad] == 0).all() and (lab[k][pad] == 255).all(), \
                    f"{backend}: padding is not exact at {sp}"
                interior = _interior(lab[k], inside)
                assert interior.sum() > 100, sp
                agree = float((stands_for[colour[k]][interior] == lab[k][interior].long()).float().mean())
                assert agree > ALIGN_MIN, f"{backend}: colour/label agreement {agree:.4f} at {sp}"
                worst = min(worst, agree)
                n_pad += int(pad.sum())
                n_flipped += sp.flip
                n += 1
    assert 0 < n_flipped < n and n_pad > 0, (n_flipped, n, n_pad)  # both mirrors; scale 0.5 pads
    return worst


def compare_backends(ds, jpeg: bool, a: str, b: str, crop=(40, 48), epochs: int = 2) -> None:
    """Loaders ``a`` and ``b`` over ``epochs`` epochs, labeled and unlabeled: the same labels
    (every pixel) and padding, images within the decoders' tolerance."""
    kw = dict(batch_size=3, crop_size=crop, seed=11, scales=SCALES, num_workers=0)
    la, lb = (D.labeled_loader(ds, backend=x, **kw) for x in (a, b))
    ua, ub = (D.unlabeled_loader(ds, backend=x, stream=1, **kw) for x in (a, b))
    for it, (x, y, u, v) in enumerate(zip(iter(la), iter(lb), iter(ua), iter(ub))):
        if it == epochs * len(la):
            break
        diff = x["label"].cpu() != y["label"].cpu()
        assert not diff.any(), f"batch {it}: {int(diff.sum())} label pixels differ between {a} and {b}"
        assert_images_close(x["image"], y["image"], jpeg, f"batch {it}, labeled, {a} against {b}")
        assert_images_close(u["image"], v["image"], jpeg, f"batch {it}, unlabeled, {a} against {b}")


# --------------------------------------------------------------------------- the loaders on the GPU


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
@pytest.mark.gpu
@needs_dali
def test_dali_gpu_pipelines_are_aligned(tmp_path, dataset):
    """The colour-coded check (tests/test_data.py's test_alignment_padding_and_layout, here on
    real JPEGs decoded by nvJPEG, and on Cityscapes PNGs whose label ids the GPU's lookup table
    maps, the ignored id included) for dali-gpu, two epochs of every scale and both mirrors."""
    ds, want = write_dataset(tmp_path, dataset, "colour")
    check_aligned(ds, want, "dali-gpu")


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
@pytest.mark.gpu
@needs_dali
def test_dali_gpu_matches_dali_cpu(tmp_path, dataset):
    """dali-gpu against dali-cpu, two epochs, labeled and unlabeled pipelines: the same crops,
    mirrors and labels (random per pixel, so a one-pixel shift shows; exact: both sample midway
    between floor-nearest's ties, cps_fast.data.dali._window); images within one grey level for
    PNG and within the IDCT tolerance for JPEG (the constants above say why)."""
    ds, _ = write_dataset(tmp_path, dataset, "smooth", size=(64, 80))
    compare_backends(ds, dataset == "voc", "dali-gpu", "dali-cpu")


# --------------------------------------------------------------------------- the trainer


class Probe:
    """One training run, watched without changing the trainer's code.

    - ``phase``: stands in for trainer.py's :func:`phase` and puts the ``data`` and ``step``
      phases under :func:`host_syncs_raise`, counting them; it records an event on torch's stream
      after each ``step`` phase and notes, as each ``data`` phase starts, how many steps the GPU
      has not finished (how far the host is ahead);
    - ``pipeline_run`` / ``feed_ndarray``: DALI's ``Pipeline.run`` and the copy out of DALI, noting
      the stream each is given and torch's current stream at the call;
    - :meth:`attach`: wraps the trainer's step function so that every step, eager or captured,
      first spins ``sleep_cycles`` on the GPU, then copies its four inputs into row
      ``iteration`` of NaN- / 254-poisoned buffers (``index_copy_`` with the device counter:
      inside the graph too); and counts the iterations :meth:`Trainer._capture` runs.
    """

    def __init__(self):
        self.phases = {"data": 0, "step": 0}
        self.pending: list[int] = []  # at each data phase: launched steps the GPU has not finished
        self._step_events: list = []
        self.run_streams: list[tuple] = []   # (stream given to Pipeline.run, torch's current stream)
        self.feed_streams: list[tuple] = []  # (stream given to feed_ndarray, torch's current stream)
        self.loaders: list = []
        self.captured = 0
        self.lines: list[str] = []
        self.trainer = None
        self.inputs = None

    @contextlib.contextmanager
    def phase(self, name):
        with self._real_phase(name):
            if name not in self.phases:
                yield
                return
            if name == "data":  # event queries do not synchronise
                self._step_events = [e for e in self._step_events if not e.query()]
                self.pending.append(len(self._step_events))
            self.phases[name] += 1
            with host_syncs_raise():
                yield
            if name == "step":
                self._step_events.append(torch.cuda.Event())
                self._step_events[-1].record()

    def print(self, *args, **kwargs):
        self.lines.append(" ".join(map(str, args)))

    def attach(self, t: Trainer, sleep_cycles: int) -> None:
        self.trainer, n, c, dev = t, t.total_iters, t.cfg.crop_size, t.device
        nan = float("nan")
        self.inputs = [torch.full((n, t.batch_l, 3, c, c), nan, device=dev),
                       torch.full((n, t.batch_l, c, c), POISON_LABEL, dtype=torch.uint8, device=dev),
                       torch.full((n, t.batch_u, 3, c, c), nan, device=dev),
                       torch.full((n, t.batch_u, 3, c, c), nan, device=dev)]
        inner = t.step_fn

        def step_fn(img_l, label_l, u0, u1, mask):
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            slot = t.iteration.clamp(0, n - 1).view(1)
            for rec, x in zip(self.inputs, (img_l, label_l, u0, u1)):
                rec.index_copy_(0, slot, x.unsqueeze(0))
            return inner(img_l, label_l, u0, u1, mask)

        t.step_fn = step_fn
        capture = t._capture

        def counted_capture(batch_fn):
            done = capture(batch_fn)
            self.captured += done
            return done

        t._capture = counted_capture

    def train(self, cfg, out, *, sleep_cycles: int = 0, **kw) -> "Probe":
        from nvidia.dali import types as dali_types
        from nvidia.dali.pipeline import Pipeline
        import nvidia.dali.plugin.pytorch as dali_torch

        real_run, real_feed, real_loaders = Pipeline.run, dali_torch.feed_ndarray, Trainer._loaders
        self._real_phase = trainer_mod.phase

        def current():
            return torch.cuda.current_stream().cuda_stream

        def pipeline_run(pipe, cuda_stream=None, /, **inputs):
            self.run_streams.append((dali_types._raw_cuda_stream(cuda_stream), current()))
            return real_run(pipe, cuda_stream, **inputs)

        def feed_ndarray(dali_tensor, arr, cuda_stream=None):
            self.feed_streams.append((dali_types._raw_cuda_stream(cuda_stream), current()))
            return real_feed(dali_tensor, arr, cuda_stream)

        def loaders(trainer):
            made = real_loaders(trainer)
            self.loaders.extend(x for x in made if x is not None)
            return made

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer_mod, "phase", self.phase)
            mp.setattr(Pipeline, "run", pipeline_run)
            mp.setattr(dali_torch, "feed_ndarray", feed_ndarray)
            mp.setattr(Trainer, "_loaders", loaders)
            t = Trainer(cfg, out, device="cuda", print_fn=self.print, **kw)
            self.attach(t, sleep_cycles)
            self.result = t.train()
        torch.cuda.synchronize()
        return self


def reference_batches(t: Trainer, n: int) -> list[list[torch.Tensor]]:
    """The first ``n`` batches of fresh loaders of ``t``'s (same schedules, same position), one at a
    time with the GPU idle in between: what each iteration should have read."""
    torch.cuda.synchronize()
    out = []
    batches = t.batches()
    for _ in range(n):
        b = next(batches)
        torch.cuda.synchronize()
        out.append([x.clone() for x in b])
        torch.cuda.synchronize()
    del batches
    return out


def assert_same_inputs(got: list, want: list, iters, what: str) -> None:
    """Row ``i`` of the recorded inputs ``got`` against ``want[i]``, for each ``i`` in ``iters``: the
    labels exact, the images within a grey level (the same decoder and resize on the same bytes)."""
    names = ("img_l", "label_l", "u0", "u1")
    for i in iters:
        for name, rec, ref in zip(names, got, want[i]):
            x = rec[i]
            if name == "label_l":
                assert not bool((x == POISON_LABEL).any()), f"{what}: iteration {i} was not recorded"
                diff = x != ref
                assert not bool(diff.any()), \
                    f"{what}: iteration {i}: {int(diff.sum())} of {x.numel()} {name} pixels differ"
            else:
                assert bool(torch.isfinite(x).all()), f"{what}: iteration {i} was not recorded ({name})"
                worst = float(_grey(x - ref.to(x.dtype)).abs().max())
                assert worst <= PNG_MAX, f"{what}: iteration {i}: {name} differs by {worst:.1f} grey levels"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(dataset)``: the straight N-iteration run on that folder (a :class:`Probe`, made once;
    a failure is kept and reported by each test that asks for it)."""
    made = {}

    def get(dataset: str) -> Probe:
        if dataset not in made:
            root = tmp_path_factory.mktemp(f"dali_gpu_{dataset}")
            try:
                cfg = trainer_cfg(dataset, write_trainer_data(dataset, root / "data"))
                made[dataset] = Probe().train(cfg, root / "run", sleep_cycles=SLEEP_CYCLES)
            except Exception:
                made[dataset] = traceback.format_exc()
        if isinstance(made[dataset], str):
            pytest.fail(f"the dali-gpu run on {dataset} failed:\n{made[dataset]}", pytrace=False)
        return made[dataset]

    yield get
    made.clear()


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
@pytest.mark.gpu
@needs_dali
def test_trainer_on_dali_gpu_has_no_host_sync_in_its_loop(runs, dataset):
    """Trainer.train for N iterations with data_backend=dali-gpu and the CUDA graph (the presets'
    path on a GPU: ``auto`` resolves to dali-gpu): every ``data`` phase (three DALI runs, the
    copies out of DALI and into the graph's inputs) and every ``step`` phase (the replay) ran
    under torch's sync debug mode without raising; the run captured, trained to finite losses,
    evaluated and saved. The mode is shown to be live in such a phase: a sync there raises.
    DALI's own waits (its C++ code) are not torch's to see: the next test shows the host two
    or more steps ahead of the GPU through these phases instead (on VOC)."""
    assert D.resolve_backend("auto") == "dali-gpu"
    r = runs(dataset)
    t = r.trainer
    assert t.graph is not None and r.captured >= 4, r.captured
    assert {x.backend for x in r.loaders} == {"dali-gpu"} and len(r.loaders) == 3, [x.backend for x in r.loaders]
    replays = N - r.captured
    assert r.phases == {"data": replays, "step": replays}, r.phases
    with host_syncs_raise(), pytest.raises(RuntimeError, match="synchroniz"):  # Probe.phase's check is live
        torch.ones(1, device="cuda").item()
    assert torch.cuda.get_sync_debug_mode() == 0
    hist = [json.loads(line) for line in (t.out / "log.jsonl").read_text().splitlines()]
    losses = [(row["iter"], row["loss"]) for row in hist if "loss" in row]
    assert [it for it, _ in losses] == [10, 20, 30] and all(math.isfinite(v) for _, v in losses), hist
    assert any("val/miou" in row for row in hist) and math.isfinite(r.result["miou"]), hist
    assert load_checkpoint(t.out / "last.pt")["iteration"] == N


@pytest.mark.gpu
@needs_dali
def test_dali_runs_on_torchs_stream_through_warmup_capture_and_replays(runs):
    """DALI's outputs are bound to torch's current stream (Pipeline.run is given it, and so is
    the copy out of DALI), the side stream of the eager warm-up included; and what the step read
    at each of the N iterations (recorded inside the step: the warm-up's eager steps, the
    captured one, the replays) is the batch fresh loaders give at that position.

    The step spins ~10 ms on the GPU first, so the host loop runs ahead and each batch's copies
    wait on torch's stream behind earlier steps while DALI goes on to the next batches: had DALI
    run on a stream of its own without ordering its outputs on torch's (or recycled their
    buffers before the queued copies ran), the recorded inputs would be another batch's, tens of
    grey levels away. That the GPU was behind in most data phases is asserted, else the run
    would have proved nothing about the race; and that the host got at least two steps ahead,
    which no wait for torch's stream in the loop (DALI's included, which torch's sync debug mode
    cannot see) would allow: it would hold the host to one unfinished step."""
    r = runs("voc")
    t = r.trainer
    side = t._side.cuda_stream
    assert len(r.run_streams) == 3 * N and len(r.feed_streams) == 4 * N, (len(r.run_streams), len(r.feed_streams))
    for what, calls in (("Pipeline.run", r.run_streams), ("feed_ndarray", r.feed_streams)):
        wrong = [(k, given, cur) for k, (given, cur) in enumerate(calls) if given is None or given != cur]
        assert not wrong, f"{what} was not given torch's current stream: (call, given, current) {wrong[:4]}"
    # the warm-up's batches are made on the side stream (from the second one), the rest on torch's default
    on_side = sum(cur == side for _, cur in r.run_streams)
    assert 3 <= on_side < 3 * N and on_side % 3 == 0, on_side
    behind = sum(p > 0 for p in r.pending)
    assert behind >= len(r.pending) // 2 and max(r.pending) >= 2, \
        f"steps the GPU had not finished as each data phase began: {r.pending}"
    want = reference_batches(t, N)
    for i in range(N - 1):  # a batch slipped by one would fail: neighbours differ
        assert float(_grey(want[i][0] - want[i + 1][0]).abs().mean()) > 10 * PNG_MAX, i
    assert_same_inputs(r.inputs, want, range(N), "straight run")


@pytest.mark.gpu
@needs_dali
def test_resume_on_the_gpu_continues_at_the_saved_data_position(runs, tmp_path):
    """0 -> SPLIT (mid-epoch), then a resumed run SPLIT -> N, each capturing its graph: last.pt
    records the data position, and the resumed run's steps read, from its first iteration on,
    exactly the batches the straight run read at those iterations (not the epoch's first ones,
    nor the run's); it reads nothing before. The first segment reads the straight run's first
    SPLIT batches.

    Model weights are not compared with the straight run's: on the GPU they cannot be held equal
    honestly. The resumed run's first 3 steps are its eager warm-up, whose CutMix boxes come from
    the trainer's generator where the straight run's replays drew them from the default CUDA
    generator (tests/test_gpu_step.py), and cuDNN's and the losses' atomics make bf16 runs drift
    apart within steps anyway. The data position is what a resume must keep, and it is exact."""
    straight = runs("voc")
    cfg = straight.trainer.cfg
    out = tmp_path / "run"
    first = Probe().train(cfg, out, max_iters=SPLIT)
    state = load_checkpoint(out / "last.pt")
    assert state["iteration"] == state["data_position"] == SPLIT
    resumed = Probe().train(cfg, out, resume=True)
    assert resumed.trainer.start_iter == SPLIT and resumed.trainer.graph is not None
    assert f"resumed from {out / 'last.pt'} at iteration {SPLIT}" in resumed.lines
    assert load_checkpoint(out / "last.pt")["iteration"] == N
    assert resumed.phases["data"] == N - SPLIT - resumed.captured, resumed.phases
    torch.cuda.synchronize()
    want = [[rec[i] for rec in straight.inputs] for i in range(N)]
    assert_same_inputs(first.inputs, want, range(SPLIT), "0 -> SPLIT")
    assert_same_inputs(resumed.inputs, want, range(SPLIT, N), "SPLIT -> N")
    assert bool((first.inputs[1][SPLIT:] == POISON_LABEL).all()), "the first segment ran past SPLIT"
    assert bool((resumed.inputs[1][:SPLIT] == POISON_LABEL).all()), "the resumed run trained iterations before SPLIT"
    epoch_start = SPLIT - SPLIT % resumed.trainer.iters_per_epoch
    for other in (0, epoch_start):  # a loader restarted at the run's or the epoch's start reads these
        assert not torch.equal(straight.inputs[1][other], resumed.inputs[1][SPLIT]), other


# --------------------------------------------------------------------------- on the CPU: the fixtures


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
@needs_dali
def test_colour_coded_fixtures_align_on_dali_cpu(tmp_path, dataset):
    """The colour-coded check the GPU test runs, on dali-cpu: the JPEG fixture (ringing, 4:2:0
    chroma) and the Cityscapes label ids pass it where the pipeline is known to be aligned."""
    ds, want = write_dataset(tmp_path, dataset, "colour")
    check_aligned(ds, want, "dali-cpu")


@needs_dali
def test_colour_check_fails_a_misaligned_label(tmp_path, monkeypatch):
    """The colour-coded check can fail: labels read from the mirror image of the file fail it."""
    ds, want = write_dataset(tmp_path, "voc", "colour")
    paths = ds.paths
    flipped = tmp_path / "flipped"
    flipped.mkdir()

    def mirrored(i):
        img, lab = paths(i)
        out = flipped / os.path.basename(lab)
        Image.fromarray(np.asarray(Image.open(lab))[:, ::-1].copy()).save(out)
        return img, str(out)

    monkeypatch.setattr(ds, "paths", mirrored)
    with pytest.raises(AssertionError, match="colour/label agreement"):
        check_aligned(ds, want, "dali-cpu", epochs=1)


@needs_dali
def test_jpeg_tolerance_sees_a_one_pixel_shift(tmp_path):
    """The JPEG tolerance of test_dali_gpu_matches_dali_cpu: dali-cpu and the PyTorch loader
    (libjpeg-turbo both) pass it over two epochs; the same crop one pixel to the side fails it
    by a wide margin (scale 1.25, a crop inside the image: no padding at the edges)."""
    ds, _ = write_dataset(tmp_path, "voc", "smooth", size=(64, 80))
    compare_backends(ds, True, "dali-cpu", "pytorch")
    kw = dict(batch_size=3, crop_size=40, seed=11, scales=(1.25,), num_workers=0)
    x = next(iter(D.labeled_loader(ds, backend="dali-cpu", **kw)))["image"]
    for dim in (-1, -2):
        a, b = x.narrow(dim, 1, 39), x.narrow(dim, 0, 39)
        mean, outliers, _ = _jpeg_stats(a, b)
        assert mean > 3 * JPEG_MEAN and outliers > 100 * JPEG_OUTLIER_FRACTION, \
            f"a one-pixel shift moves the mean by only {mean:.2f} grey levels, {100 * outliers:.2f} % " \
            f"beyond {JPEG_OUTLIER}"
        with pytest.raises(AssertionError, match="grey levels on average"):
            assert_images_close(a, b, True, "shifted")


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_trainer_fixture_puts_the_resume_mid_epoch(tmp_path, dataset):
    """The GPU trainer tests' folders and config: 8 labeled and 24 unlabeled images, 6 iterations
    an epoch, so SPLIT is mid-epoch and N crosses epoch boundaries; both resume segments are long
    enough to capture (Trainer.run captures when more than 12 iterations are left)."""
    cfg = trainer_cfg(dataset, write_trainer_data(dataset, tmp_path))
    cfg, _ = resolve_data_lists(cfg)
    lab, unl = open_training_sets(cfg)
    assert (len(lab), len(unl)) == (8, 24)
    ipe = cfg.iters_per_epoch_for(len(lab), len(unl))
    assert ipe == 6 and SPLIT % ipe and N > 4 * ipe and cfg.total_iters(len(lab), len(unl)) == N
    assert SPLIT > 12 and N - SPLIT > 12
    assert cfg.cuda_graph and cfg.amp == "bf16" and cfg.cutmix and cfg.data_backend == "dali-gpu"
    values = set(np.unique(np.concatenate([lab[i]["label"].ravel() for i in range(len(lab))])).tolist())
    assert values <= set(range(cfg.num_classes)) | {255} and len(values - {255}) > 1, values
