"""cps-fast prepare: TorchSemiSeg's prepared folders from miniature official archives.

The fixtures are the real formats in miniature: a VOCtrainval tar (JPEGs, palette label PNGs
with the VOC colour map and 255 borders, ImageSets lists, and the members prepare ignores), an
SBD benchmark.tgz (MATLAB v5 GTcls structs written by scipy.io.savemat, lists last in the
archive), and the two Cityscapes zips (labelIds, color, instanceIds, polygons, a test split).
"""
import io
import json
import os
import re
import shutil
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp
from PIL import Image

from cps_fast import cli
from cps_fast.data import prepare as P
from cps_fast.data.datasets import CITYSCAPES_ID_TO_TRAINID, DataError, _voc_colormap

VOC_CMAP = _voc_colormap(256)
A, B, C, D, E, F, G, H = ("2007_000032", "2007_000039", "2007_000033", "2007_000042",
                          "2008_000002", "2008_000003", "2008_000008", "2008_000009")
DEVKIT = "VOCdevkit/VOC2012/"
SBD = "benchmark_RELEASE/dataset/"


# --------------------------------------------------------------------------- format writers

def _jpeg(rng, h, w):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(arr, palette=False):
    im = Image.fromarray(arr)
    if palette:
        im.putpalette(VOC_CMAP.tobytes())  # an "L" image with a palette becomes a "P" PNG
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _voc_label(rng, h, w):
    """Background with two rectangles of random classes, outlined by 255 as VOC's boundaries are."""
    lab = np.zeros((h, w), np.uint8)
    for _ in range(2):
        y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
        y1, x1 = y0 + rng.integers(5, h - y0 + 1), x0 + rng.integers(5, w - x0 + 1)
        lab[y0:y1, x0:x1] = 255
        lab[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = rng.integers(1, 21)
    return lab


def _sbd_mat(seg):
    """An SBD cls/<id>.mat: struct GTcls with Boundaries (cell of sparse), Segmentation, CategoriesPresent."""
    bounds = np.empty((20, 1), dtype=object)
    for k in range(20):
        bounds[k, 0] = sp.csc_matrix(seg == k + 1)
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8).reshape(-1, 1)
    buf = io.BytesIO()
    sio.savemat(buf, {"GTcls": {"Boundaries": bounds, "Segmentation": seg, "CategoriesPresent": present}},
                do_compression=True)
    return buf.getvalue()


def _tar(path, files, mode):
    """A tar with directory entries for every folder, members in the given order."""
    with tarfile.open(path, mode) as tf:
        dirs = set()
        for name, data in files:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type = tarfile.DIRTYPE
                    ti.mode = 0o755
                    tf.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def make_voc_sbd(root, seed=0, mutate=None):
    """VOCtrainval and benchmark.tgz in miniature; returns (voc_tar, sbd_tgz, expected).

    VOC seg train A, B; val C, D. SBD train B, C, E; val F. VOC has JPEGs of all but F (and an
    unlisted G); SBD has images and labels of B, C, E, F and an unlisted H. So train_aug = A B E F
    (C is in VOC val), B's and C's labels come from VOC (SBD's differ), F's image from SBD.
    ``mutate(spec)`` edits the dict of images/labels before the archives are written.
    """
    rng = np.random.default_rng(seed)
    size = {i: (int(rng.integers(17, 41)), int(rng.integers(17, 41))) for i in (A, B, C, D, E, F, G, H)}
    spec = {
        "voc_jpg": {i: _jpeg(rng, *size[i]) for i in (A, B, C, D, E, G)},
        "voc_seg": {i: _voc_label(rng, *size[i]) for i in (A, B, C, D)},
        "sbd_img": {i: _jpeg(rng, *size[i]) for i in (B, C, E, F, H)},
        "sbd_seg": {i: rng.integers(0, 21, size[i], dtype=np.uint8) for i in (B, C, E, F, H)},
        "voc_lists": {"train": [A, B], "val": [C, D]},
        "sbd_lists": {"train": [B, C, E], "val": [F]},
    }
    if mutate:
        mutate(spec)
    voc = []
    voc += [(f"{DEVKIT}Annotations/{i}.xml", b"<annotation/>") for i in spec["voc_jpg"]]
    voc += [(f"{DEVKIT}JPEGImages/{i}.jpg", b) for i, b in spec["voc_jpg"].items()]
    voc += [(f"{DEVKIT}SegmentationClass/{i}.png", _png(l, palette=True)) for i, l in spec["voc_seg"].items()]
    voc += [(f"{DEVKIT}SegmentationObject/{i}.png", _png(l, palette=True)) for i, l in spec["voc_seg"].items()]
    for s, ids in spec["voc_lists"].items():  # the lists after the images, as ImageSets may come
        voc.append((f"{DEVKIT}ImageSets/Segmentation/{s}.txt", "".join(i + "\n" for i in ids).encode()))
    voc.append((f"{DEVKIT}ImageSets/Main/train.txt", f"{A} 1\n".encode()))
    sbd = [("benchmark_RELEASE/benchmark_code_RELEASE/README", b"benchmark code")]
    sbd += [(f"{SBD}cls/{i}.mat", _sbd_mat(s)) for i, s in spec["sbd_seg"].items()]
    sbd += [(f"{SBD}img/{i}.jpg", b) for i, b in spec["sbd_img"].items()]
    sbd += [(f"{SBD}inst/{i}.mat", b"MATLAB 5.0 MAT-file, inst") for i in spec["sbd_seg"]]
    for s, ids in spec["sbd_lists"].items():  # SBD's lists last: prepare must not need them early
        sbd.append((f"{SBD}{s}.txt", "".join(i + "\n" for i in ids).encode()))
    os.makedirs(root, exist_ok=True)
    voc_tar = _tar(os.path.join(root, "VOCtrainval_11-May-2012.tar"), voc, "w")
    sbd_tgz = _tar(os.path.join(root, "benchmark.tgz"), sbd, "w:gz")
    exp_label = {**spec["sbd_seg"], **spec["voc_seg"]}  # VOC's labels win
    exp_image = {**spec["sbd_img"], **spec["voc_jpg"]}  # VOC's JPEGs win
    return voc_tar, sbd_tgz, {"label": exp_label, "image": exp_image}


def _tree(root):
    """{relative path: bytes} of every file below root except the marker (it names the sources)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            if rel != P.MARKER:
                with open(p, "rb") as fh:
                    out[rel] = fh.read()
    return out


@pytest.fixture(scope="module")
def voc_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    voc, sbd, exp = make_voc_sbd(root / "src")
    out = root / "out"
    counts = P.prepare_voc(voc, sbd, str(out), workers=2, progress=io.StringIO())
    return {"root": root, "voc": voc, "sbd": sbd, "exp": exp, "out": str(out), "counts": counts,
            "tree": _tree(out)}


# --------------------------------------------------------------------------- voc

def test_voc_from_archives(voc_data):
    out, exp = voc_data["out"], voc_data["exp"]
    assert voc_data["counts"] == {"train_aug": 4, "val": 2}
    train_aug, val = sorted([A, B, E, F]), [C, D]  # C is in SBD train but VOC val: excluded
    assert open(os.path.join(out, "train_aug.txt")).read() == "".join(i + "\n" for i in train_aug)
    assert open(os.path.join(out, "val.txt")).read() == "".join(i + "\n" for i in val)
    for split, ids in (("train_aug", train_aug), ("val", val)):
        assert sorted(os.listdir(os.path.join(out, split, "image"))) == [i + ".jpg" for i in sorted(ids)]
        assert sorted(os.listdir(os.path.join(out, split, "label"))) == [i + ".png" for i in sorted(ids)]
        for i in ids:
            with open(os.path.join(out, split, "image", i + ".jpg"), "rb") as f:
                assert f.read() == exp["image"][i], i  # copied byte for byte (F's from SBD)
            with Image.open(os.path.join(out, split, "label", i + ".png")) as im:
                assert im.mode == "L"
                np.testing.assert_array_equal(np.array(im), exp["label"][i], err_msg=i)
    assert (np.array(Image.open(os.path.join(out, "train_aug", "label", B + ".png"))) == 255).any()  # borders kept
    marker = json.load(open(os.path.join(out, P.MARKER)))
    assert marker["dataset"] == "voc" and marker["counts"] == {"train_aug": 4, "val": 2}
    assert marker["sources"]["voc"]["path"] == os.path.abspath(voc_data["voc"])
    assert not [f for f in voc_data["tree"] if f.endswith(".part")]


def test_voc_folder_input_gives_identical_output(voc_data, tmp_path):
    for arc, dest in ((voc_data["voc"], tmp_path / "voc"), (voc_data["sbd"], tmp_path / "sbd")):
        with tarfile.open(arc) as tf:
            tf.extractall(dest, filter="data")
    for level in (tmp_path / "voc", tmp_path / "voc" / "VOCdevkit", tmp_path / "voc" / "VOCdevkit" / "VOC2012"):
        assert P._open_voc(str(level)).path == str(tmp_path / "voc" / "VOCdevkit" / "VOC2012")
    for level in (tmp_path / "sbd", tmp_path / "sbd" / "benchmark_RELEASE", tmp_path / "sbd" / SBD):
        assert P._open_sbd(str(level)).path.rstrip("/") == str(tmp_path / "sbd" / SBD).rstrip("/")
    out = tmp_path / "out"
    counts = P.prepare_voc(str(tmp_path / "voc" / "VOCdevkit"), str(tmp_path / "sbd" / SBD), str(out),
                           workers=3, progress=io.StringIO())
    assert counts == voc_data["counts"]
    assert _tree(out) == voc_data["tree"]


def _crash_encoding_after(monkeypatch, n):
    """Make the label encoder raise after ``n`` calls (a crash in a worker); returns the real one."""
    real, calls = P._encode_png, []

    def flaky(label):
        calls.append(1)
        if len(calls) > n:
            raise RuntimeError("simulated crash in a worker")
        return real(label)

    monkeypatch.setattr(P, "_encode_png", flaky)
    return real


def test_voc_resume_after_interruption(voc_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = _crash_encoding_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.prepare_voc(voc_data["voc"], voc_data["sbd"], str(out), workers=2, progress=io.StringIO())
    monkeypatch.setattr(P, "_encode_png", real)
    assert not (out / P.MARKER).exists() and not (out / "train_aug.txt").exists()
    assert json.loads((out / P.STAMP).read_text())["sources"]["sbd"]["path"] == os.path.abspath(voc_data["sbd"])
    labels = sorted((out / "train_aug" / "label").glob("*.png"))
    assert 1 <= len(labels) <= 2  # what was written before the crash, each complete
    assert not list(out.rglob("*.part"))
    # a kill mid-write leaves temporary files (of images, lists, the marker) and a stale list of
    # missing ids; damaged files under final names are redone too: truncated, or of the right
    # size but zeros (what a power loss can leave of an unsynced file)
    (out / "train_aug" / "label" / f".{E}.png.0123456789ab.part").write_bytes(b"\x89PNG half")
    (out / ".train_aug.txt.0123456789ab.part").write_bytes(b"2007_0000")
    (out / f".{P.MARKER}.0123456789ab.part").write_bytes(b"{")
    (out / P.MISSING).write_bytes(b"no label\ttrain_aug/2007_000032\n")
    data = labels[0].read_bytes()
    labels[0].write_bytes(data[: len(data) // 2])
    img = out / "val" / "image" / f"{C}.jpg"
    img.write_bytes(voc_data["exp"]["image"][C][:100])
    (out / "val" / "image" / f"{D}.jpg").write_bytes(bytes(len(voc_data["exp"]["image"][D])))
    P.prepare_voc(voc_data["voc"], voc_data["sbd"], str(out), workers=2, progress=io.StringIO())
    assert _tree(out) == voc_data["tree"]  # no stamp, no leftovers
    # complete: a rerun checks the marker and the files, and writes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    P.prepare_voc(voc_data["voc"], voc_data["sbd"], str(out), workers=2, progress=io.StringIO())
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


def _new_sbd_label(spec):
    spec["sbd_seg"][E] = (spec["sbd_seg"][E] + 1) % 21


def test_voc_other_sources_are_refused_and_forced(voc_data, tmp_path, monkeypatch, capsys):
    """A folder of other sources is never resumed: refused, then rewritten with force (resumably)."""
    voc, sbd, _ = make_voc_sbd(tmp_path / "src")
    out = tmp_path / "out"
    P.prepare_voc(voc, sbd, str(out), workers=2, progress=io.StringIO())
    old_tree, old_marker = _tree(out), (out / P.MARKER).read_bytes()
    st = os.stat(voc)
    make_voc_sbd(tmp_path / "src", mutate=_new_sbd_label)  # SBD rewritten in place: E's label differs
    os.utime(voc, ns=(st.st_atime_ns, st.st_mtime_ns))  # VOC: the same bytes, and now the same mtime
    with pytest.raises(DataError) as ei:
        P.prepare_voc(voc, sbd, str(out), workers=2, progress=io.StringIO())
    msg = str(ei.value)
    for w in (str(out), P.MARKER, "other sources", f"--sbd was {os.path.abspath(sbd)}", "--force",
              "train_aug/image"):
        assert w in msg
    assert "--voc was" not in msg
    assert _tree(out) == old_tree and (out / P.MARKER).read_bytes() == old_marker  # nothing touched

    real = _crash_encoding_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.prepare_voc(voc, sbd, str(out), workers=2, progress=io.StringIO(), force=True)
    monkeypatch.setattr(P, "_encode_png", real)
    assert not (out / P.MARKER).exists() and len(list((out / "train_aug" / "label").iterdir())) <= 2
    with pytest.raises(DataError, match=f"unfinished run \\({P.STAMP}\\) made from other sources"):
        P.prepare_voc(voc_data["voc"], voc_data["sbd"], str(out), workers=2, progress=io.StringIO())
    # the interrupted forced run resumes like any other: what it wrote is kept, nothing older
    P.prepare_voc(voc, sbd, str(out), workers=2, progress=io.StringIO())
    fresh = tmp_path / "fresh"
    P.prepare_voc(voc, sbd, str(fresh), workers=2, progress=io.StringIO())
    assert _tree(out) == _tree(fresh)
    label_e = os.path.join("train_aug", "label", f"{E}.png")
    assert _tree(out)[label_e] != old_tree[label_e]
    capsys.readouterr()
    P.prepare_voc(voc, sbd, str(out), workers=2, progress=io.StringIO())
    assert "already complete" in capsys.readouterr().out


def _drop_voc_label(spec):
    del spec["voc_seg"][D]


def _bad_value(spec):
    spec["voc_seg"][A][0, 0] = 37


def _bad_size(spec):
    h, w = spec["sbd_seg"][E].shape
    spec["sbd_seg"][E] = np.zeros((h + 1, w), np.uint8)


def _drop_sbd_list(spec):
    del spec["sbd_lists"]["val"]


@pytest.mark.parametrize("mutate,words", [
    (_drop_voc_label, ["incomplete", "1 ids have no label", f"val/{D}"]),
    (_bad_value, [A, f"{DEVKIT}SegmentationClass/{A}.png", "value 37", "0..20"]),
    (_bad_size, [f"train_aug/{E}", f"{SBD}cls/{E}.mat", "WxH"]),
    (_drop_sbd_list, ["benchmark.tgz", "benchmark_RELEASE/dataset/val.txt"]),
], ids=["missing-label", "bad-value", "size-mismatch", "missing-list"])
def test_voc_bad_input_is_named(tmp_path, mutate, words):
    voc, sbd, _ = make_voc_sbd(tmp_path / "src", seed=1, mutate=mutate)
    with pytest.raises(DataError) as ei:
        P.prepare_voc(voc, sbd, str(tmp_path / "out"), workers=2, progress=io.StringIO())
    for w in words:
        assert w in str(ei.value)
    assert not (tmp_path / "out" / P.MARKER).exists()


def test_sbd_struct_forms():
    seg = np.random.default_rng(2).integers(0, 21, (9, 13), dtype=np.uint8)
    data = _sbd_mat(seg)
    np.testing.assert_array_equal(P._read_sbd_mat(data, "x.mat"), seg)
    for kw in ({}, {"squeeze_me": True}, {"struct_as_record": False, "squeeze_me": True}, {"simplify_cells": True}):
        mat = sio.loadmat(io.BytesIO(data), **kw)
        np.testing.assert_array_equal(P._struct_field(mat["GTcls"], "Segmentation", "x.mat"), seg, err_msg=str(kw))
    buf = io.BytesIO()
    sio.savemat(buf, {"GTcls": {"Boundaries": np.zeros(3)}})
    with pytest.raises(DataError, match="x.mat: struct GTcls has no field Segmentation"):
        P._read_sbd_mat(buf.getvalue(), "x.mat")


def test_open_dataset_reads_prepared_folders(voc_data, city_data):
    import cps_fast.data as D_

    out = voc_data["out"]
    ds = D_.open_dataset("voc", out, "train", out + "/train_aug.txt")
    assert [ds.name(i) for i in range(len(ds))] == sorted([A, B, E, F])
    np.testing.assert_array_equal(ds[3]["label"], voc_data["exp"]["label"][F])
    out = city_data["out"]
    ds = D_.open_dataset("cityscapes", out, "val", out + "/config_new/val.txt")
    item = ds[1]
    assert item["name"] == "lindau_000000_000019"
    np.testing.assert_array_equal(item["label"], city_data["exp"]["val", item["name"]][1])


# --------------------------------------------------------------------------- cityscapes

CITY_SPLITS = {"train": [("aachen", 0, 19), ("aachen", 1, 19), ("bochum", 0, 1)], "val": [("frankfurt", 0, 294),
                                                                                         ("lindau", 0, 19)]}


def make_cityscapes(root, drop_label=None):
    """The two trainvaltest zips; returns (zips, expected {(split, stem): (image bytes, train ids)})."""
    rng = np.random.default_rng(3)
    img_files = [("README", b"Cityscapes"), ("license.txt", b"license")]
    gt_files = [("README", b"Cityscapes"), ("license.txt", b"license")]
    exp = {}
    for split, entries in list(CITY_SPLITS.items()) + [("test", [("berlin", 0, 19)])]:
        for city, seq, frame in entries:
            stem = f"{city}_{seq:06d}_{frame:06d}"
            h, w = 12 + 2 * seq, 24
            image = _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ids = rng.integers(0, 34, (h, w), dtype=np.uint8)
            img_files.append((f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", image))
            base = f"gtFine/{split}/{city}/{stem}_gtFine_"
            if split == "test":
                ids[:] = 0  # the real test labels are blank
            if stem != drop_label:
                gt_files.append((base + "labelIds.png", _png(ids)))
            gt_files += [(base + "color.png", _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))),
                         (base + "instanceIds.png", _png(ids.astype(np.uint16) * 1000)),
                         (base + "polygons.json", b'{"objects": []}')]
            train_ids = CITYSCAPES_ID_TO_TRAINID[ids]
            if stem == "lindau_000000_000019":  # a labelTrainIds file exists: used as is, not remapped
                train_ids = np.where(train_ids == 255, 255, 18 - train_ids).astype(np.uint8)
                gt_files.append((base + "labelTrainIds.png", _png(train_ids)))
            exp[split, stem] = (image, train_ids)
    os.makedirs(root, exist_ok=True)
    zips = []
    for name, files in (("leftImg8bit_trainvaltest.zip", img_files), ("gtFine_trainvaltest.zip", gt_files)):
        path = os.path.join(root, name)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for n, data in files:
                zf.writestr(n, data)
        zips.append(path)
    return zips, exp


@pytest.fixture(scope="module")
def city_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("city")
    zips, exp = make_cityscapes(root / "src")
    out = root / "out"
    stream = io.StringIO()
    counts = P.prepare_cityscapes(zips, str(out), workers=2, progress=stream)
    return {"root": root, "zips": zips, "exp": exp, "out": str(out), "counts": counts, "tree": _tree(out),
            "progress": stream.getvalue()}


def test_cityscapes_from_zips(city_data):
    out, exp = city_data["out"], city_data["exp"]
    assert city_data["counts"] == {"train": 3, "val": 2}
    for split, entries in CITY_SPLITS.items():
        stems = sorted(f"{c}_{s:06d}_{f:06d}" for c, s, f in entries)
        assert open(os.path.join(out, "config_new", f"{split}.txt")).read() == "".join(
            f"/images/{split}/{s}.png\t/segmentation/{split}/{s}_gtFine.png\n" for s in stems)
        assert sorted(os.listdir(os.path.join(out, "images", split))) == [s + ".png" for s in stems]
        for s in stems:
            image, train_ids = exp[split, s]
            with open(os.path.join(out, "images", split, s + ".png"), "rb") as f:
                assert f.read() == image
            with Image.open(os.path.join(out, "segmentation", split, s + "_gtFine.png")) as im:
                assert im.mode == "L"
                np.testing.assert_array_equal(np.array(im), train_ids, err_msg=s)
    assert not os.path.exists(os.path.join(out, "images", "test"))
    lines = city_data["progress"].splitlines()  # not a TTY: a start and an end line only
    assert len(lines) == 2 and "10 files" in lines[1]


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_cityscapes_folder_inputs_give_identical_output(city_data, tmp_path):
    extracted = tmp_path / "extracted"
    for z in city_data["zips"]:
        with zipfile.ZipFile(z) as zf:
            zf.extractall(extracted)
    tty = _TTY()
    assert P.prepare_cityscapes([str(extracted)], str(tmp_path / "a"), workers=2, progress=tty) == city_data["counts"]
    assert _tree(tmp_path / "a") == city_data["tree"]
    assert "\r" in tty.getvalue() and "10/10 files (100%)" in tty.getvalue()
    # an edited source folder is other sources, not "already complete"
    stem = "aachen_000000_000019"
    ids = np.array(Image.open(extracted / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png"))
    ids = (ids + 1) % 34
    Image.fromarray(ids).save(extracted / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png")
    with pytest.raises(DataError, match=re.escape(f"--root was [folder {extracted} (11 files read") + ".*--force"):
        P.prepare_cityscapes([str(extracted)], str(tmp_path / "a"), workers=2, progress=io.StringIO())
    P.prepare_cityscapes([str(extracted)], str(tmp_path / "a"), workers=2, progress=io.StringIO(), force=True)
    with Image.open(tmp_path / "a" / "segmentation" / "train" / f"{stem}_gtFine.png") as im:
        np.testing.assert_array_equal(np.array(im), CITYSCAPES_ID_TO_TRAINID[ids])
    # the folder holding both zips
    P.prepare_cityscapes([str(city_data["root"] / "src")], str(tmp_path / "b"), workers=1, progress=io.StringIO())
    assert _tree(tmp_path / "b") == city_data["tree"]


def test_cityscapes_foreign_folder_is_refused_and_forced(city_data, tmp_path, monkeypatch):
    """Files with no stamp (here: a reference folder without the marker, one label wrong) are not trusted."""
    ref = tmp_path / "ref"
    shutil.copytree(city_data["out"], ref)
    (ref / P.MARKER).unlink()
    wrong = ref / "segmentation" / "val" / "lindau_000000_000019_gtFine.png"
    with Image.open(wrong) as im:
        Image.fromarray(np.zeros(im.size[::-1], np.uint8)).save(wrong)  # a valid PNG of other labels
    (ref / "config_new" / "subset_train").mkdir()
    (ref / "config_new" / "subset_train" / "train_aug_labeled_1-8.txt").write_text("x\n")  # not ours: stays
    with pytest.raises(DataError) as ei:
        P.prepare_cityscapes(city_data["zips"], str(ref), workers=2, progress=io.StringIO())
    for w in ("already holds files (for example config_new/", P.STAMP, "--force", "segmentation/val"):
        assert w in str(ei.value)
    stream = io.StringIO()
    P.prepare_cityscapes(city_data["zips"], str(ref), workers=2, progress=stream, force=True)
    assert "--force: deleted 12 files" in stream.getvalue()  # 10 data files, 2 lists (no marker)
    extra = os.path.join("config_new", "subset_train", "train_aug_labeled_1-8.txt")
    assert _tree(ref) == {**city_data["tree"], extra: b"x\n"}

    # an interrupted run here leaves temporary lists in config_new/ and a stale missing-ids file
    out = tmp_path / "out"
    real = _crash_encoding_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.prepare_cityscapes(city_data["zips"], str(out), workers=1, progress=io.StringIO())
    monkeypatch.setattr(P, "_encode_png", real)
    (out / "config_new" / ".train.txt.0123456789ab.part").write_bytes(b"/images/tr")
    (out / P.MISSING).write_bytes(b"no image\ttrain/aachen_000000_000019\n")
    P.prepare_cityscapes(city_data["zips"], str(out), workers=2, progress=io.StringIO())
    assert _tree(out) == city_data["tree"]


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, st.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(P.os, "fsync", fsync)
    monkeypatch.setattr(P.os, "replace", replace)
    path = str(tmp_path / "x.png")
    P._atomic_write(path, b"0123456789")
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert events[0][1] == events[1][1] == os.stat(path).st_ino and events[0][2] == 10 and events[1][2] == path


# --------------------------------------------------------------------------- command line

def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cps-fast: error: ")
    return err[-1]


def test_cli(city_data, voc_data, tmp_path, capsys, monkeypatch, caplog):
    cli.main(["prepare", "cityscapes", "--root", *city_data["zips"], "--out", str(tmp_path / "ok"), "--workers", "2"])
    assert "train 3, val 2" in capsys.readouterr().out
    assert "train has 3 ids; the official archives give 2975" in caplog.text  # a warning, not an error
    assert _tree(tmp_path / "ok") == city_data["tree"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    msg = _cli_error(["prepare", "cityscapes", "--root", *city_data["zips"], "--out", str(tmp_path / "mine")], capsys)
    assert "already holds files (for example notes.txt)" in msg and "--force" in msg
    cli.main(["prepare", "cityscapes", "--root", *city_data["zips"], "--out", str(tmp_path / "mine"), "--force"])
    assert _tree(tmp_path / "mine") == {**city_data["tree"], "notes.txt": b"mine"}

    junk = tmp_path / "VOCtrainval_11-May-2012.tar"
    junk.write_bytes(b"not a tar")
    msg = _cli_error(["prepare", "voc", "--voc", str(junk), "--sbd", voc_data["sbd"], "--out", str(tmp_path / "o")],
                     capsys)
    assert str(junk) in msg and "neither a folder nor a tar archive" in msg
    (tmp_path / "empty").mkdir()
    msg = _cli_error(["prepare", "voc", "--voc", voc_data["voc"], "--sbd", str(tmp_path / "empty"),
                      "--out", str(tmp_path / "o")], capsys)
    assert "benchmark_RELEASE/dataset/" in msg and "cls/<id>.mat" in msg
    msg = _cli_error(["prepare", "cityscapes", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                     capsys)
    assert "leftImg8bit/" in msg and "gtFine_trainvaltest.zip" in msg
    zips, _ = make_cityscapes(tmp_path / "partial", drop_label="bochum_000000_000001")
    msg = _cli_error(["prepare", "cityscapes", "--root", *zips, "--out", str(tmp_path / "p")], capsys)
    assert "1 ids have no label" in msg and "train/bochum_000000_000001" in msg

    monkeypatch.setitem(sys.modules, "scipy.io", None)  # scipy not installed
    msg = _cli_error(["prepare", "voc", "--voc", voc_data["voc"], "--sbd", voc_data["sbd"],
                      "--out", str(tmp_path / "o")], capsys)
    assert "pip install 'cps-fast[prepare]'" in msg
