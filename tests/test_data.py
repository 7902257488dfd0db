"""Datasets, split lists, loaders (pytorch and dali-cpu) and CutMix masks."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cps_fast.data as D
from cps_fast.data.datasets import CITYSCAPES_ID_TO_TRAINID, DataError
from cps_fast.data.splits import SampleSchedule, repeat_to_length

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except Exception:
    HAVE_DALI = False

BACKENDS = (["pytorch"] + (["dali-cpu"] if HAVE_DALI else [])
            + (["dali-gpu"] if HAVE_DALI and torch.cuda.is_available() else []))
VOC_PAL = np.zeros((256, 3), np.uint8)
VOC_PAL[:21] = D.VOC_PALETTE


# --------------------------------------------------------------------------- fixtures

def _save_label(path, lab, palette):
    im = Image.fromarray(lab)
    if palette:
        im.putpalette(VOC_PAL.tobytes())
    im.save(path)


# distinct flat colours for the colour-coded alignment fixture (class c -> COLOURS[c])
COLOURS = np.array([(20, 20, 20), (230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40)], np.uint8)


def _blocky_label(rng, h, w, n_classes, block=12):
    small = rng.integers(0, n_classes, (h // block + 1, w // block + 1)).astype(np.uint8)
    return np.kron(small, np.ones((block, block), np.uint8))[:h, :w]


def make_voc(root, n=6, size=(37, 53), palette=False, seed=0, colour_coded=False, ext="png"):
    """VOC layout with tiny images; colour_coded images paint class c with COLOURS[c] (PNG, lossless)."""
    rng = np.random.default_rng(seed)
    lab_dir = os.path.join(root, "SegmentationClass" if palette else "SegmentationClassAug")
    for d in ("JPEGImages", lab_dir, os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    ids = []
    for i in range(n):
        name = f"2007_{i:06d}"
        if colour_coded:
            lab = _blocky_label(rng, *size, len(COLOURS))
            img = COLOURS[lab]
        else:
            lab = rng.integers(0, 21, size).astype(np.uint8)
            lab[0, 0] = 255
            img = rng.integers(0, 255, size + (3,)).astype(np.uint8)
        # the VOC loader reads <id>.jpg; lossless content for colour tests is stored as PNG bytes
        Image.fromarray(img).save(os.path.join(root, "JPEGImages", name + ".jpg"),
                                  format="PNG" if colour_coded else "JPEG")
        _save_label(os.path.join(lab_dir, name + ".png"), lab, palette)
        ids.append((name, lab))
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as f:
        f.writelines(name + "\n" for name, _ in ids)
    return ids


def make_cityscapes(root, kind="labelIds", size=(20, 30), split="train"):
    rng = np.random.default_rng(1)
    out = {}
    for city, k in (("aachen", 0), ("bonn", 1)):
        for j in range(2):
            stem = f"{city}_{j:06d}_{k:06d}"
            d_img = os.path.join(root, "leftImg8bit", split, city)
            d_gt = os.path.join(root, "gtFine", split, city)
            os.makedirs(d_img, exist_ok=True)
            os.makedirs(d_gt, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, size + (3,)).astype(np.uint8)).save(
                os.path.join(d_img, stem + "_leftImg8bit.png"))
            ids = rng.integers(0, 34, size).astype(np.uint8)
            lab = ids if kind == "labelIds" else CITYSCAPES_ID_TO_TRAINID[ids]
            Image.fromarray(lab).save(os.path.join(d_gt, f"{stem}_gtFine_{kind}.png"))
            out[stem] = ids
    return out


# --------------------------------------------------------------------------- datasets

@pytest.mark.parametrize("palette", [False, True])
def test_voc_labels_are_indices(tmp_path, palette):
    ids = make_voc(str(tmp_path), palette=palette)
    ds = D.open_dataset("voc", str(tmp_path))
    assert ds.label_format == ("palette" if palette else "gray")
    assert len(ds) == len(ids) and ds.num_classes == 21 and len(ds.class_names) == 21
    assert ds.palette.shape == (21, 3) and tuple(ds.palette[1]) == (128, 0, 0)
    for item, (name, lab) in zip(ds, ids):
        assert item["name"] == name
        assert item["image"].dtype == np.uint8 and item["image"].shape == lab.shape + (3,)
        np.testing.assert_array_equal(item["label"], lab)


def test_cityscapes_label_ids_mapped(tmp_path):
    ids = make_cityscapes(str(tmp_path), "labelIds")
    ds = D.open_dataset("cityscapes", str(tmp_path), split="train")
    assert ds.label_format == "cityscapes_ids" and ds.num_classes == 19
    assert ds.palette.shape == (19, 3)
    table = {i: t for _, i, t in D.datasets.CITYSCAPES_LABEL_TABLE if i >= 0}
    assert table[7] == 0 and table[33] == 18 and table[0] == 255 and table[29] == 255
    for item in ds:
        raw = ids[item["name"]]
        want = np.vectorize(lambda v: table[int(v)])(raw).astype(np.uint8)
        np.testing.assert_array_equal(item["label"], want)
        assert set(np.unique(item["label"])) <= set(range(19)) | {255}


def test_cityscapes_train_ids_used_as_is_and_lists(tmp_path):
    ids = make_cityscapes(str(tmp_path), "labelTrainIds")
    stems = sorted(ids)
    lst = tmp_path / "ids.txt"
    lst.write_text(f"{stems[0]}\n\nbonn/{stems[2]}\n")
    ds = D.open_dataset("cityscapes", str(tmp_path), list_file=str(lst))
    assert ds.label_format == "gray" and [ds.name(i) for i in range(2)] == [stems[0], stems[2]]
    np.testing.assert_array_equal(ds[1]["label"], CITYSCAPES_ID_TO_TRAINID[ids[stems[2]]])
    pairs = tmp_path / "pairs.txt"
    s = stems[1]
    pairs.write_text(f"/leftImg8bit/train/aachen/{s}_leftImg8bit.png\tgtFine/train/aachen/{s}_gtFine_labelTrainIds.png\n")
    ds2 = D.open_dataset("cityscapes", str(tmp_path), list_file=str(pairs))
    assert len(ds2) == 1 and ds2[0]["name"] == s


def test_both_voc_list_formats(tmp_path):
    ids = make_voc(str(tmp_path), n=4)
    (tmp_path / "ids.txt").write_text(f"{ids[2][0]}\n{ids[0][0]}\n")
    (tmp_path / "pairs.txt").write_text(
        "".join(f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png\n" for n, _ in (ids[2], ids[0])))
    a = D.open_dataset("voc", str(tmp_path), list_file=str(tmp_path / "ids.txt"))
    b = D.open_dataset("voc", str(tmp_path), list_file=str(tmp_path / "pairs.txt"))
    assert [a.name(i) for i in range(2)] == [b.name(i) for i in range(2)] == [ids[2][0], ids[0][0]]
    np.testing.assert_array_equal(a[0]["label"], b[0]["label"])
    un = D.open_dataset("voc", str(tmp_path), list_file=str(tmp_path / "ids.txt"), labeled=False)
    assert un[0]["label"] is None


def test_synthetic_deterministic_and_classes():
    a = D.open_dataset("synthetic", "seed=3,n=8,size=64x48")
    b = D.open_dataset("synthetic", {"seed": 3, "n": 8, "size": (64, 48)})
    c = D.open_dataset("synthetic", "seed=4,n=8,size=64x48")
    assert len(a) == 8 and a[0]["image"].shape == (64, 48, 3)
    np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
    assert not np.array_equal(a[5]["image"], c[5]["image"])
    val = D.open_dataset("synthetic", "seed=3,n=8,size=64x48", split="val")
    assert not np.array_equal(a[0]["image"], val[0]["image"])
    labs = np.concatenate([a[i]["label"].ravel() for i in range(8)])
    assert labs.max() < a.num_classes == 7 and len(np.unique(labs)) >= 4


def test_synthetic_writes_voc_layout(tmp_path):
    for fmt in ("gray", "palette"):
        root = str(tmp_path / fmt)
        D.write_voc(root, n_train=3, n_val=2, size=32, seed=1, label_format=fmt)
        ds = D.open_dataset("voc", root)
        mem = D.SyntheticDataset(n=3, size=32, seed=1)
        assert ds.label_format == fmt and len(ds) == 3
        np.testing.assert_array_equal(ds[2]["label"], mem[2]["label"])
        assert np.abs(ds[2]["image"].astype(int) - mem[2]["image"]).mean() < 12  # JPEG
        assert len(D.open_dataset("voc", root, split="val")) == 2


@pytest.mark.parametrize("kind", ["labelIds", "labelTrainIds"])
def test_synthetic_writes_cityscapes_layout(tmp_path, kind):
    root = str(tmp_path)
    D.write_cityscapes(root, n_train=5, n_val=2, size=(40, 72), seed=2, label_kind=kind, render_height=20,
                       unique=3)
    ds = D.open_dataset("cityscapes", root)
    assert len(ds) == 5 and len(D.open_dataset("cityscapes", root, split="val")) == 2
    assert sorted({os.path.basename(os.path.dirname(ds.paths(i)[0])) for i in range(5)}) == ["aachen", "bremen"]
    mem = D.SyntheticDataset(n=5, size=(20, 36), seed=2)
    train_ids = CITYSCAPES_ID_TO_TRAINID[D.SYNTHETIC_TO_CITYSCAPES_ID]
    by_name = {ds.name(i): ds[i] for i in range(5)}
    for i in range(5):
        item = by_name[next(n for n in by_name if f"_{i:06d}_" in n)]
        j = i if i < 3 else i % 3  # unique=3: later names repeat the first scenes' bytes
        up = np.kron(mem[j]["label"], np.ones((2, 2), np.uint8))  # render_height 20 -> 40 rows, nearest
        np.testing.assert_array_equal(item["label"], train_ids[up])
        assert item["image"].shape == (40, 72, 3)
    # the label ids go through the DALI lookup table on the pipeline's device as well
    if HAVE_DALI:
        b = next(iter(D.labeled_loader(ds, batch_size=5, crop_size=(40, 72), backend="dali-cpu", scales=(1.0,),
                                       flip=False)))
        got = sorted(tuple(x.ravel()) for x in b["label"].numpy())
        assert got == sorted(tuple(ds[i]["label"].ravel()) for i in range(5))
    with pytest.raises(ValueError, match="label_kind"):
        D.write_cityscapes(root, label_kind="gtFine")
    with pytest.raises(ValueError, match="unique"):
        D.write_cityscapes(root, unique=0)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_file(tmp_path):
    root = str(tmp_path)
    ids = make_voc(root, n=3)
    lab_dir = os.path.join(root, "SegmentationClassAug")
    with pytest.raises(DataError, match="JPEGImages"):
        D.open_dataset("voc", str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty" / "JPEGImages")
    with pytest.raises(DataError, match="SegmentationClass"):
        D.open_dataset("voc", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="leftImg8bit"):
        D.open_dataset("cityscapes", root)
    with pytest.raises(DataError, match="missing.txt"):
        D.open_dataset("voc", root, list_file=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        D.open_dataset("voc", root, list_file=str(tmp_path / "empty.txt"))

    ds = D.open_dataset("voc", root)
    # corrupt image
    with open(os.path.join(root, "JPEGImages", ids[0][0] + ".jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    with pytest.raises(DataError, match=ids[0][0] + ".jpg"):
        ds[0]
    # missing label file
    os.remove(os.path.join(lab_dir, ids[1][0] + ".png"))
    with pytest.raises(DataError, match=ids[1][0] + ".png.*does not exist"):
        ds[1]
    # label value outside the classes
    bad = ids[2][1].copy()
    bad[3, 4] = 37
    Image.fromarray(bad).save(os.path.join(lab_dir, ids[2][0] + ".png"))
    with pytest.raises(DataError, match=rf"{ids[2][0]}.png has value 37, outside 0..20"):
        ds[2]
    # image and label of different sizes
    Image.fromarray(np.zeros((10, 11), np.uint8)).save(os.path.join(lab_dir, ids[2][0] + ".png"))
    with pytest.raises(DataError, match=rf"{ids[2][0]}.jpg is 53x37 but its label .*{ids[2][0]}.png is 11x10"):
        ds[2]
    with pytest.raises(DataError, match="11x10"):
        ds.image_size(2)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_bad_label_value_is_reported(tmp_path):
    ids = make_voc(str(tmp_path), n=2)
    bad = ids[1][1].copy()
    bad[:] = 99
    Image.fromarray(bad).save(os.path.join(tmp_path, "SegmentationClassAug", ids[1][0] + ".png"))
    ds = D.open_dataset("voc", str(tmp_path))
    loader = D.labeled_loader(ds, batch_size=2, crop_size=16, backend="dali-cpu", scales=(1.0,))
    with pytest.raises(DataError, match=r"value 99.*" + ids[1][0]):
        next(iter(loader))  # on by default on dali-cpu
    loader = D.labeled_loader(ds, batch_size=2, crop_size=16, backend="dali-cpu", scales=(1.0,), check_labels=False)
    assert int(next(iter(loader))["label"].max()) == 99  # off: the value goes through unchecked


# --------------------------------------------------------------------------- splits

def test_partitions_deterministic_disjoint_covering(tmp_path):
    root = str(tmp_path / "voc")
    make_voc(root, n=20)
    out = str(tmp_path / "lists")
    assert D.splits_main(["voc", root, "--out", out, "--partitions", "1/8", "1/2", "5", "--seed", "3"]) == 0
    lab = D.read_list(os.path.join(out, "train_labeled_1-8.txt"))
    unl = D.read_list(os.path.join(out, "train_unlabeled_1-8.txt"))
    assert len(lab) == 2 and len(unl) == 18
    assert not {e.image for e in lab} & {e.image for e in unl}
    assert len({e.image for e in lab} | {e.image for e in unl}) == 20
    assert len(D.read_list(os.path.join(out, "train_labeled_5.txt"))) == 5
    first = open(os.path.join(out, "train_labeled_1-2.txt")).read()
    D.write_splits("voc", root, str(tmp_path / "again"), ["1/2"], seed=3)
    assert open(os.path.join(tmp_path, "again", "train_labeled_1-2.txt")).read() == first
    D.write_splits("voc", root, str(tmp_path / "other"), ["1/2"], seed=4)
    assert open(os.path.join(tmp_path, "other", "train_labeled_1-2.txt")).read() != first
    lab, unl = D.read_partition(os.path.join(out, "train_labeled_1-2.txt"),
                                os.path.join(out, "train_unlabeled_1-2.txt"))
    ds = D.open_dataset("voc", root, list_file=os.path.join(out, "train_labeled_1-2.txt"))
    assert len(ds) == 10 and ds[0]["label"] is not None


def test_repeat_to_length_reference_semantics():
    rng = np.random.default_rng(0)
    idx = repeat_to_length(5, 13, rng)
    counts = np.bincount(idx, minlength=5)
    assert len(idx) == 13 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 3
    np.testing.assert_array_equal(repeat_to_length(5, 3, rng), [0, 1, 2])  # reference: first `length`
    s = SampleSchedule(5, 2, length=13, seed=1, scales=(0.5, 2.0))
    assert len(s) == 6 and s.epoch(0) == SampleSchedule(5, 2, length=13, seed=1, scales=(0.5, 2.0)).epoch(0)
    assert s.epoch(0) != s.epoch(1)
    r0 = SampleSchedule(8, 2, seed=1, rank=0, world_size=2).epoch(0)
    r1 = SampleSchedule(8, 2, seed=1, rank=1, world_size=2).epoch(0)
    i0 = {sp.index for b in r0 for sp in b}
    i1 = {sp.index for b in r1 for sp in b}
    assert not i0 & i1 and len(i0 | i1) == 8


# --------------------------------------------------------------------------- loaders

def _unnormalise(img):
    mean = torch.tensor(D.loaders.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.loaders.IMAGENET_STD).view(1, 3, 1, 1)
    return (img * std + mean) * 255.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_alignment_padding_and_layout(tmp_path, backend):
    make_voc(str(tmp_path), n=6, size=(41, 57), colour_coded=True)
    ds = D.open_dataset("voc", str(tmp_path))
    crop = (64, 48)
    loader = D.labeled_loader(ds, batch_size=3, crop_size=crop, backend=backend, seed=5, num_workers=0)
    assert len(loader) == 2
    it = iter(loader)
    n_pad = 0
    for _ in range(4):  # two epochs: many scales, flips and crops
        b = next(it)
        assert b["image"].is_cuda == (backend == "dali-gpu") and b["label"].device == b["image"].device
        img, lab = b["image"].cpu(), b["label"].cpu()
        assert img.shape == (3, 3) + crop and img.dtype == torch.float32
        assert img.is_contiguous(memory_format=torch.channels_last)
        assert lab.shape == (3,) + crop and lab.dtype == torch.uint8
        assert set(lab.unique().tolist()) <= set(range(len(COLOURS))) | {255}
        pad = lab == 255
        n_pad += int(pad.sum())
        assert (img.permute(0, 2, 3, 1)[pad] == 0).all()  # padded image pixels are exactly 0
        rgb = _unnormalise(img).permute(0, 2, 3, 1)
        # colour -> class by nearest palette colour; compare on interior pixels
        d = ((rgb[..., None, :] - torch.tensor(COLOURS, dtype=torch.float32)) ** 2).sum(-1)
        cls = d.argmin(-1)
        valid = ~pad
        lab_l = lab.long()
        interior = valid.clone()
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            interior &= torch.roll(lab_l, (dy, dx), (1, 2)) == lab_l
        match = (cls[interior] == lab_l[interior]).float().mean().item()
        assert match > 0.995, f"{backend}: colour/label agreement {match:.4f}"
    assert n_pad > 0  # small images at scale 0.5 must have been padded


def test_backends_agree(tmp_path):
    if not HAVE_DALI:
        pytest.skip("nvidia-dali not installed")
    make_voc(str(tmp_path), n=4, size=(33, 45), palette=True)
    ds = D.open_dataset("voc", str(tmp_path))
    kw = dict(batch_size=2, crop_size=40, seed=11, num_workers=0)
    a = next(iter(D.labeled_loader(ds, backend="pytorch", **kw)))
    b = next(iter(D.labeled_loader(ds, backend="dali-cpu", **kw)))
    assert (a["label"] == b["label"]).float().mean() > 0.99
    assert ((a["label"] == 255) == (b["label"] == 255)).all()
    assert ((a["image"] - b["image"]).abs() > 0.05).float().mean() < 0.01


def _inside(size, crop, scale, uy, ux):
    """Crop pixels that come from the scaled image (the rest is padding), per crop_anchor."""
    from cps_fast.data.transforms import crop_anchor, scaled_size

    sh, sw = scaled_size(*size, scale)
    ys = crop_anchor(sh, crop[0], uy) + np.arange(crop[0])
    xs = crop_anchor(sw, crop[1], ux) + np.arange(crop[1])
    return torch.from_numpy(((ys >= 0) & (ys < sh))[:, None] & ((xs >= 0) & (xs < sw))[None, :])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "pytorch"])
@pytest.mark.parametrize("size,crop,epochs", [((70, 98), (48, 72), 3), ((512, 1024), (400, 400), 1)],
                         ids=["small", "large"])
def test_dali_crop_window_resize_matches_host(tmp_path, backend, size, crop, epochs):
    """DALI resamples only the crop window (a region-of-interest resize, mirrored after the
    crop); the result must be the host's mirror-scale-crop: every label pixel the same (DALI's
    nearest samples midway between OpenCV's floor-nearest ties, so none are excused), every
    image pixel within one grey level, padding exact. Per-pixel random labels and images make
    any one-pixel shift show; the crop is smaller than most scaled images, so the window is
    trimmed on both sides, and scale 0.5 pads. The large case puts the region's float32
    coordinates in the thousands (half Cityscapes' size, scale 2)."""
    make_voc(str(tmp_path), n=6, size=size)
    ds = D.open_dataset("voc", str(tmp_path))
    kw = dict(batch_size=3, crop_size=crop, seed=3, num_workers=0, scales=(0.5, 0.75, 1.25, 1.5, 1.75, 2.0))
    host = iter(D.labeled_loader(ds, backend="pytorch", **kw))
    loader = D.labeled_loader(ds, backend=backend, **kw)
    dali = iter(loader)
    std = torch.tensor(D.loaders.IMAGENET_STD).view(1, 3, 1, 1) * 255.0
    n_flipped = 0
    for epoch in range(epochs):
        for specs in loader.schedule.epoch(epoch):
            a, b = next(host), next(dali)
            la, lb, ib = a["label"], b["label"].cpu(), b["image"].cpu()
            grey = ((a["image"] - ib) * std).abs()
            assert grey.max() <= 1.01, f"{backend}: image differs by {grey.max():.2f} grey levels"
            for k, sp in enumerate(specs):
                diff = la[k] != lb[k]
                assert not diff.any(), f"{backend}: {int(diff.sum())} label pixels differ at {sp}"
                pad = ~_inside(ds.image_size(sp.index), crop, sp.scale, sp.uy, sp.ux)
                assert (ib[k].permute(1, 2, 0)[pad] == 0).all() and (lb[k][pad] == 255).all(), sp
                n_flipped += sp.flip
    assert 0 < n_flipped < epochs * len(loader) * 3


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_keeps_palette_indices_and_maps_cityscapes(tmp_path):
    make_voc(str(tmp_path / "voc"), n=2, size=(30, 30), palette=True)
    ds = D.open_dataset("voc", str(tmp_path / "voc"))
    b = next(iter(D.labeled_loader(ds, batch_size=2, crop_size=30, backend="dali-cpu", scales=(1.0,), flip=False)))
    want = np.stack([ds[i]["label"] for i in range(2)])
    got = b["label"].numpy()
    assert sorted(map(tuple, got.reshape(2, -1))) == sorted(map(tuple, want.reshape(2, -1)))
    make_cityscapes(str(tmp_path / "city"), "labelIds", size=(20, 30))
    cs = D.open_dataset("cityscapes", str(tmp_path / "city"))
    b = next(iter(D.labeled_loader(cs, batch_size=4, crop_size=(20, 30), backend="dali-cpu",
                                   scales=(1.0,), flip=False)))
    want = {cs.name(i): cs[i]["label"] for i in range(4)}
    got = [tuple(x.ravel()) for x in b["label"].numpy()]
    assert sorted(got) == sorted(tuple(v.ravel()) for v in want.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlabeled_streams_differ_and_are_deterministic(backend):
    ds = D.open_dataset("synthetic", "n=16,size=32", labeled=False)
    kw = dict(batch_size=4, crop_size=32, backend=backend, seed=2, num_workers=0)
    u0 = next(iter(D.unlabeled_loader(ds, stream=0, **kw)))
    u1 = next(iter(D.unlabeled_loader(ds, stream=1, **kw)))
    u0b = next(iter(D.unlabeled_loader(ds, stream=0, **kw)))
    u0, u1, u0b = ({k: v.cpu() for k, v in u.items()} for u in (u0, u1, u0b))
    assert set(u0) == {"image"}
    assert torch.equal(u0["image"], u0b["image"])
    same = [(u0["image"][i] - u1["image"][i]).abs().max() < 1e-6 for i in range(4)]
    assert not all(same)


def test_pytorch_workers_deterministic_and_sharded():
    ds = D.open_dataset("synthetic", "n=8,size=24")
    kw = dict(batch_size=2, crop_size=20, backend="pytorch", seed=3)
    a = next(iter(D.labeled_loader(ds, num_workers=0, **kw)))
    b = next(iter(D.labeled_loader(ds, num_workers=2, **kw)))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    r1 = next(iter(D.labeled_loader(ds, num_workers=0, rank=1, world_size=2, **kw)))
    assert not torch.equal(a["image"], r1["image"])
    long = D.labeled_loader(ds, num_workers=0, epoch_length=20, label_dtype=torch.int64, **kw)
    assert len(long) == 10 and next(iter(long))["label"].dtype == torch.int64


def test_auto_backend_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("auto picks dali-gpu on GPU machines")
    assert D.resolve_backend("auto") == "pytorch"
    with pytest.raises(RuntimeError, match="CUDA"):
        D.resolve_backend("dali-gpu")
    with pytest.raises(ValueError, match="not one of"):
        D.resolve_backend("opencv")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_DALI), reason="needs CUDA and DALI")
def test_dali_gpu_matches_dali_cpu(tmp_path):
    """dali-gpu against dali-cpu: the same augmentation (lossless colour-coded PNGs: near-exact),
    and alike JPEG decoding (nvJPEG with fancy chroma upsampling against libjpeg-turbo)."""
    make_voc(str(tmp_path / "png"), n=4, size=(33, 45), colour_coded=True)
    ds = D.open_dataset("voc", str(tmp_path / "png"))
    kw = dict(batch_size=4, crop_size=40, seed=11)
    g = next(iter(D.labeled_loader(ds, backend="dali-gpu", **kw)))
    c = next(iter(D.labeled_loader(ds, backend="dali-cpu", **kw)))
    assert g["image"].is_cuda and g["image"].is_contiguous(memory_format=torch.channels_last)
    assert g["label"].is_cuda and g["label"].dtype == torch.uint8
    assert torch.equal(g["label"].cpu(), c["label"])
    # resize arithmetic only: a grey level is ~0.017 here, a misplaced crop or flip ~1 or more
    assert (g["image"].cpu() - c["image"]).abs().max() < 0.06
    # smooth photograph-like JPEGs (4:2:0): decoders differ by IDCT rounding, not by content
    root = tmp_path / "jpeg"
    ids = make_voc(str(root), n=4, size=(64, 80))
    yy, xx = np.mgrid[0:64, 0:80].astype(np.float32)
    for i, (name, _) in enumerate(ids):
        img = np.stack([128 + 100 * np.sin(xx / (9 + i) + c * 2.1) * np.cos(yy / (13 - i)) for c in range(3)], -1)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
    ds = D.open_dataset("voc", str(root))
    # every scale: these labels are random per pixel, and both resamplers sample them midway
    # between floor-nearest's ties (dali._window), so they pick the same pixels
    g = next(iter(D.labeled_loader(ds, backend="dali-gpu", **kw)))
    c = next(iter(D.labeled_loader(ds, backend="dali-cpu", **kw)))
    assert torch.equal(g["label"].cpu(), c["label"])
    diff = (g["image"].cpu() - c["image"]).abs()
    assert diff.mean() < 0.02 and (diff > 0.1).float().mean() < 0.01, (float(diff.mean()), float(diff.max()))


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_reads_16_bit_labels_by_value(tmp_path):
    """16-bit grayscale label PNGs keep their values (DALI's decoder would rescale them to 8 bits);
    one among 8-bit labels is refused by name."""
    ids = make_voc(str(tmp_path), n=2, size=(30, 30))
    lab_dir = tmp_path / "SegmentationClassAug"
    for name, lab in ids:
        Image.fromarray(lab.astype(np.uint16)).save(lab_dir / f"{name}.png")
    assert Image.open(lab_dir / f"{ids[0][0]}.png").mode.startswith("I;16")
    ds = D.open_dataset("voc", str(tmp_path))
    b = next(iter(D.labeled_loader(ds, batch_size=2, crop_size=30, backend="dali-cpu", scales=(1.0,), flip=False)))
    got = sorted(map(tuple, b["label"].numpy().reshape(2, -1)))
    assert got == sorted(tuple(lab.ravel()) for _, lab in ids)
    Image.fromarray(ids[0][1]).save(lab_dir / f"{ids[0][0]}.png")  # the first label 8-bit, the second 16-bit
    loader = D.labeled_loader(ds, batch_size=2, crop_size=30, backend="dali-cpu", scales=(1.0,), flip=False)
    with pytest.raises(DataError, match=rf"{ids[1][0]}.png is a 16-bit PNG"):
        next(iter(loader))


# --------------------------------------------------------------------------- CutMix

def reference_box_masks(n, shape, n_boxes, prop_range, rng):
    """numpy re-implementation of the reference BoxMaskGenerator (prop_by_area, random
    aspect ratio, within bounds, invert=True)."""
    mask_props = rng.uniform(prop_range[0], prop_range[1], size=(n, n_boxes))
    y_props = np.exp(rng.uniform(0.0, 1.0, size=(n, n_boxes)) * np.log(mask_props))
    x_props = mask_props / y_props
    fac = np.sqrt(1.0 / n_boxes)
    y_props, x_props = y_props * fac, x_props * fac
    sizes = np.round(np.stack([y_props, x_props], axis=2) * np.array(shape)[None, None, :])
    positions = np.round((np.array(shape) - sizes) * rng.uniform(0.0, 1.0, size=sizes.shape))
    rects = np.append(positions, positions + sizes, axis=2)
    masks = np.zeros((n, 1) + tuple(shape))
    for i, rs in enumerate(rects):
        for y0, x0, y1, x1 in rs:
            masks[i, 0, int(y0):int(y1), int(x0):int(x1)] = 1 - masks[i, 0, int(y0):int(y1), int(x0):int(x1)]
    return masks


def test_box_masks_shape_values_determinism():
    g = torch.Generator().manual_seed(0)
    m = D.box_masks(5, 33, 47, generator=g)
    assert m.shape == (5, 1, 33, 47) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    m2 = D.box_masks(5, 33, 47, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)
    assert not torch.equal(m, D.box_masks(5, 33, 47, generator=g))
    single = D.box_masks(200, 40, 40, n_boxes=1, prop_range=(0.3, 0.3), generator=g)
    area = single.mean((1, 2, 3))
    assert ((area - 0.3).abs() < 0.03).all()  # one box: its area is the proportion (up to rounding)
    with pytest.raises(ValueError, match="prop_range"):
        D.box_masks(1, 8, 8, prop_range=(0.5, 0.2))


def test_box_masks_statistics_match_reference():
    n, shape = 4000, (64, 64)
    ours = D.box_masks(n, *shape, n_boxes=3, prop_range=(0.25, 0.5),
                       generator=torch.Generator().manual_seed(1)).mean((1, 2, 3)).numpy()
    ref = reference_box_masks(n, shape, 3, (0.25, 0.5), np.random.RandomState(2)).mean((1, 2, 3))
    assert abs(ours.mean() - ref.mean()) < 0.006
    assert abs(ours.std() - ref.std()) < 0.006
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    np.testing.assert_allclose(np.quantile(ours, qs), np.quantile(ref, qs), atol=0.012)
    # two-sample Kolmogorov-Smirnov distance of the per-mask area distribution
    grid = np.linspace(0, 1, 401)
    ks = np.abs(np.searchsorted(np.sort(ours), grid) / n - np.searchsorted(np.sort(ref), grid) / n).max()
    assert ks < 1.36 * math.sqrt(2 / n) * 1.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_box_masks_cuda_graph():
    # the default CUDA generator is the one a capture registers (the trainer uses it while capturing)
    torch.cuda.manual_seed(0)
    D.box_masks(4, 64, 64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = D.box_masks(4, 64, 64, device="cuda")
    graph.replay()
    first = out.clone()
    graph.replay()
    assert out.is_cuda and not torch.equal(first, out)
