"""The data folders researchers have: the reference's prepared layouts beside the official ones,
the paper's packaged partitions, and how a preset finds its lists (docs/data.md)."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import cps_fast.data as D
from cps_fast.cli import main as cli_main
from cps_fast.config import load_preset
from cps_fast.data import DataError
from cps_fast.data.dali import dali_available
from cps_fast.data.datasets import CITYSCAPES_ID_TO_TRAINID
from cps_fast.data.paper_lists import PAPER_COUNTS, PAPER_DIR, check_paper_counts, paper_list_path, resolve_list
from cps_fast.train.trainer import resolve_data_lists


def _img(rng, size):
    return rng.integers(0, 255, size + (3,)).astype(np.uint8)


def write_voc_reference(root, ids_train, ids_val, size=(19, 27), seed=0):
    """TorchSemiSeg's DATA/pascal_voc: train_aug/{image,label}, val/{image,label}, train_aug.txt, val.txt."""
    rng = np.random.default_rng(seed)
    labels = {}
    for folder, ids in (("train_aug", ids_train), ("val", ids_val)):
        os.makedirs(os.path.join(root, folder, "image"), exist_ok=True)
        os.makedirs(os.path.join(root, folder, "label"), exist_ok=True)
        for i in ids:
            lab = rng.integers(0, 21, size).astype(np.uint8)
            lab[0, :3] = 255
            Image.fromarray(_img(rng, size)).save(os.path.join(root, folder, "image", i + ".jpg"), quality=95)
            Image.fromarray(lab).save(os.path.join(root, folder, "label", i + ".png"))
            labels[i] = lab
    with open(os.path.join(root, "train_aug.txt"), "w") as f:
        f.writelines(i + "\n" for i in ids_train)
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.writelines(i + "\n" for i in ids_val)
    return labels


def write_city_reference(root, stems, split="train", size=(12, 20), seed=1):
    """TorchSemiSeg's DATA/city: images/<split>/X.png, segmentation/<split>/X_gtFine.png (train ids)."""
    rng = np.random.default_rng(seed)
    out = {}
    for d in ("images", "segmentation"):
        os.makedirs(os.path.join(root, d, split), exist_ok=True)
    os.makedirs(os.path.join(root, "config_new"), exist_ok=True)
    for s in stems:
        img = _img(rng, size)
        lab_ids = rng.integers(0, 34, size).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, "images", split, s + ".png"))
        Image.fromarray(CITYSCAPES_ID_TO_TRAINID[lab_ids]).save(os.path.join(root, "segmentation", split, s + "_gtFine.png"))
        out[s] = (img, lab_ids)
    with open(os.path.join(root, "config_new", f"{split}.txt"), "w") as f:
        f.writelines(f"/images/{split}/{s}.png\t/segmentation/{split}/{s}_gtFine.png\n" for s in stems)
    return out


def write_city_official(root, data, split="train"):
    """The same images and labels in the official layout, labels as labelIds."""
    for s, (img, lab_ids) in data.items():
        city = s.split("_")[0]
        for d in ("leftImg8bit", "gtFine"):
            os.makedirs(os.path.join(root, d, split, city), exist_ok=True)
        Image.fromarray(img).save(os.path.join(root, "leftImg8bit", split, city, s + "_leftImg8bit.png"))
        Image.fromarray(lab_ids).save(os.path.join(root, "gtFine", split, city, s + "_gtFine_labelIds.png"))


# --------------------------------------------------------------------------- layouts


def test_voc_reference_layout_loads_as_it_is(tmp_path):
    root = str(tmp_path)
    train, val = ["2007_000032", "2008_000123", "2011_003271"], ["2007_000033", "2010_000001"]
    labels = write_voc_reference(root, train, val)
    ds = D.open_dataset("voc", root, "train")  # default list: train_aug.txt
    assert ds.layout == "voc-torchsemiseg" and [ds.name(i) for i in range(len(ds))] == train
    for i, name in enumerate(train):
        item = ds[i]
        assert item["image"].shape == (19, 27, 3)
        np.testing.assert_array_equal(item["label"], labels[name])
    dv = D.open_dataset("voc", root, "val")  # default list: val.txt, images under val/
    assert [dv.name(i) for i in range(len(dv))] == val
    assert dv.paths(0) == (os.path.join(root, "val", "image", val[0] + ".jpg"),
                           os.path.join(root, "val", "label", val[0] + ".png"))
    # an id of the val folder in a train list is not looked up there: training never reads val images
    (tmp_path / "mixed.txt").write_text(f"{train[0]}\n{val[1]}\n")
    dm = D.open_dataset("voc", root, "train", str(tmp_path / "mixed.txt"))
    with pytest.raises(DataError, match=rf"1 of the 2 images listed in .*mixed.txt lack their files.*train_aug.*{val[1]}"):
        dm.check_files()
    D.open_dataset("voc", root, "train").check_files()
    # DeepLab-style pairs of VOCdevkit paths resolve by id in this layout
    (tmp_path / "pairs.txt").write_text(f"JPEGImages/{train[2]}.jpg SegmentationClassAug/{train[2]}.png\n")
    dp = D.open_dataset("voc", root, "train", str(tmp_path / "pairs.txt"))
    np.testing.assert_array_equal(dp[0]["label"], labels[train[2]])
    unl = D.open_dataset("voc", root, "train", labeled=False)
    assert unl[0]["label"] is None and unl.paths(0)[1] is None


def test_cityscapes_reference_layout_and_its_lists_on_the_official_folders(tmp_path):
    stems = ["jena_000078_000019", "jena_000032_000019", "ulm_000001_000019"]
    ref, off = str(tmp_path / "city"), str(tmp_path / "official")
    data = write_city_reference(ref, stems)
    write_city_official(off, data)
    a = D.open_dataset("cityscapes", ref, "train")  # default list config_new/train.txt
    assert a.layout == "cityscapes-torchsemiseg" and a.label_format == "gray"
    # the reference's list (/images/train/X.png<TAB>/segmentation/train/X_gtFine.png) on the official layout
    b = D.open_dataset("cityscapes", off, "train", os.path.join(ref, "config_new", "train.txt"))
    assert b.layout == "cityscapes-official" and b.label_format == "cityscapes_ids"
    assert [a.name(i) for i in range(3)] == [b.name(i) for i in range(3)] == stems
    for i, s in enumerate(stems):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], data[s][0])
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], CITYSCAPES_ID_TO_TRAINID[data[s][1]])
        np.testing.assert_array_equal(x["label"], y["label"])
    # and an official-style pair list on the reference layout
    (tmp_path / "off.txt").write_text(
        f"leftImg8bit/train/ulm/{stems[2]}_leftImg8bit.png gtFine/train/ulm/{stems[2]}_gtFine_labelTrainIds.png\n")
    c = D.open_dataset("cityscapes", ref, "train", str(tmp_path / "off.txt"))
    np.testing.assert_array_equal(c[0]["label"], a[2]["label"])
    # without a config_new list, every image of the split
    os.remove(os.path.join(ref, "config_new", "train.txt"))
    assert sorted(D.open_dataset("cityscapes", ref, "train").name(i) for i in range(3)) == sorted(stems)


def test_cityscapes_city_comes_from_the_folder(tmp_path):
    """City names are folder names (the official ones have no underscore, a user's may)."""
    root = tmp_path / "official"
    for d, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelTrainIds.png")):
        (root / d / "train" / "new_york").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 6, 3) if d == "leftImg8bit" else (4, 6), np.uint8)).save(
            root / d / "train" / "new_york" / f"new_york_000001_000019{suffix}")
    ds = D.open_dataset("cityscapes", str(root), "train")
    assert ds.name(0) == "new_york_000001_000019" and ds[0]["label"].shape == (4, 6)
    (tmp_path / "ids.txt").write_text("new_york/new_york_000001_000019\n")
    D.open_dataset("cityscapes", str(root), "train", str(tmp_path / "ids.txt")).check_files()


def test_a_folder_in_two_layouts_is_refused(tmp_path):
    write_voc_reference(str(tmp_path), ["2007_000032"], ["2007_000033"])
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DataError, match=r"two layouts at once.*VOCdevkit.*TorchSemiSeg"):
        D.open_dataset("voc", str(tmp_path))


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali does not import")
def test_dali_refuses_a_palette_label_among_grayscale_ones(tmp_path):
    """DALI decodes labels as grayscale when the first one is: a palette PNG later on would give
    luminance instead of class indices, silently."""
    from cps_fast.data.datasets import VOC_PALETTE, _voc_colormap

    root = str(tmp_path)
    write_voc_reference(root, ["a0", "a1"], ["v0"], size=(16, 16))
    lab = np.full((16, 16), 3, np.uint8)
    im = Image.fromarray(lab, mode="P")
    im.putpalette(_voc_colormap(256).reshape(-1).tolist())
    im.save(os.path.join(root, "train_aug", "label", "a1.png"))
    ds = D.open_dataset("voc", root, "train")
    assert ds.label_format == "gray" and len(VOC_PALETTE) == 21
    loader = D.labeled_loader(ds, batch_size=2, crop_size=16, scales=(1.0,), backend="dali-cpu", num_threads=1)
    with pytest.raises(DataError, match=r"a1.png is a palette PNG but the dataset's first label is grayscale"):
        next(iter(loader))


def test_a_folder_in_no_known_layout_lists_the_layouts(tmp_path):
    (tmp_path / "images_only").mkdir()
    with pytest.raises(DataError, match=r"none of the layouts.*VOCdevkit.*TorchSemiSeg's prepared pascal_voc.*prepare voc"):
        D.open_dataset("voc", str(tmp_path / "images_only"))
    with pytest.raises(DataError, match=r"none of the layouts.*leftImg8bit.*TorchSemiSeg's prepared city.*prepare cityscapes"):
        D.open_dataset("cityscapes", str(tmp_path / "images_only"))


# --------------------------------------------------------------------------- packaged partitions


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_packaged_partitions_are_the_papers(dataset):
    folder, total, labeled = PAPER_COUNTS[dataset]
    sub = "subset_train_aug" if dataset == "voc" else "config_new/subset_train"
    everything = None
    for denom, n_l in labeled.items():
        lab = (PAPER_DIR / folder / sub / f"train_aug_labeled_1-{denom}.txt").read_text().split("\n")
        unl = (PAPER_DIR / folder / sub / f"train_aug_unlabeled_1-{denom}.txt").read_text().split("\n")
        lab, unl = [x for x in lab if x], [x for x in unl if x]
        assert (len(lab), len(unl)) == (n_l, total - n_l)
        assert not set(lab) & set(unl)
        both = set(lab) | set(unl)
        everything = everything or both
        assert both == everything and len(both) == total  # every partition splits the same train set
        check_paper_counts(dataset, f"x/train_aug_labeled_1-{denom}.txt", n_l)
    assert (PAPER_DIR / "LICENSE").read_text().startswith("MIT License")
    assert "TorchSemiSeg" in (PAPER_DIR / "README.md").read_text()


def test_paper_counts_refuse_a_truncated_copy(tmp_path):
    with pytest.raises(DataError, match=r"1322 images.*1/8 partition has 1323 labeled of 10582"):
        check_paper_counts("voc", str(tmp_path / "train_aug_labeled_1-8.txt"), 1322)
    with pytest.raises(DataError, match=r"2604 images.*2603 unlabeled of 2975"):
        check_paper_counts("cityscapes", "train_aug_unlabeled_1-8.txt", 2604)
    check_paper_counts("voc", "my_labeled_1-8.txt", 5)  # not the paper's name: not checked


def test_resolve_list_prefers_the_data_root_then_the_package(tmp_path):
    rel = "subset_train_aug/train_aug_labeled_1-8.txt"
    value, source = resolve_list("voc", str(tmp_path), rel, what="train_labeled")
    assert value == "paper:pascal_voc/" + rel and "packaged" in source
    assert paper_list_path(value) == PAPER_DIR / "pascal_voc" / rel
    (tmp_path / "subset_train_aug").mkdir()
    (tmp_path / rel).write_text("2007_000032\n")
    assert resolve_list("voc", str(tmp_path), rel, what="train_labeled") == (rel, str(tmp_path / rel))
    with pytest.raises(DataError, match=r"'val_list'.*nope.txt does not exist.*ships no list"):
        resolve_list("voc", str(tmp_path), "nope.txt", what="val_list")
    with pytest.raises(DataError, match="the package has no such list.*paper:city/config_new/val.txt"):
        paper_list_path("paper:pascal_voc/../../etc.txt")
    # a path that only looks like the preset's is not replaced by the packaged list
    for near in ("../" + rel, ".subset_train_aug/train_aug_labeled_1-8.txt"):
        with pytest.raises(DataError, match="does not exist"):
            resolve_list("voc", str(tmp_path / "elsewhere"), near, what="train_labeled")


def test_preset_lists_resolve_and_are_recorded(tmp_path):
    """A plain VOCdevkit: the presets' partition lists come from the package, val.txt from the
    devkit's own ImageSets/Segmentation/val.txt; Cityscapes' val list is packaged too."""
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    cfg, notes = resolve_data_lists(load_preset("voc_r50_1-4").replace(data_root=str(root)))
    assert cfg.train_labeled == "paper:pascal_voc/subset_train_aug/train_aug_labeled_1-4.txt"
    assert cfg.train_unlabeled == "paper:pascal_voc/subset_train_aug/train_aug_unlabeled_1-4.txt"
    assert cfg.val_list is None and len(notes) == 3 and "own validation list" in notes[2]
    city, notes = resolve_data_lists(load_preset("cityscapes_r101_1-16_cutmix").replace(data_root=str(tmp_path)))
    assert city.val_list == "paper:city/config_new/val.txt"
    assert city.data_path(city.val_list) == str(PAPER_DIR / "city" / "config_new" / "val.txt")
    with pytest.raises(DataError, match="val_list"):  # no val list anywhere
        resolve_data_lists(load_preset("voc_r50_1-4").replace(data_root=str(tmp_path)))
    with pytest.raises(DataError, match=r"'val_list'.*my_val.txt does not exist"):  # a user's typo never falls back
        resolve_data_lists(load_preset("voc_r50_1-4").replace(data_root=str(root), val_list="my_val.txt"))
    # one list of a partition at the root and the other not: never one from each place
    (root / "subset_train_aug").mkdir()
    (root / "subset_train_aug" / "train_aug_labeled_1-4.txt").write_text("2007_000032\n")
    with pytest.raises(DataError, match=r"has the list subset_train_aug/train_aug_labeled_1-4.txt \(train_labeled\) "
                                        r"but not subset_train_aug/train_aug_unlabeled_1-4.txt"):
        resolve_data_lists(load_preset("voc_r50_1-4").replace(data_root=str(root)))


def test_missing_files_are_found_before_training(tmp_path):
    """A devkit with VOC's own labels only (no SegmentationClassAug): the packaged lists name ids it
    lacks, and the trainer says so, with the list and the way out, before any step."""
    from cps_fast.train import Trainer

    root = tmp_path / "VOC2012"
    write_voc_reference(str(tmp_path / "ref"), ["2007_000032"], ["2007_000033"])
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    cfg = load_preset("voc_r50_1-8").replace(data_root=str(root), backbone="resnet18", pretrained=None)
    with pytest.raises(DataError, match=r"1323 of the 1323 images listed in .*train_aug_labeled_1-8.txt lack their files"
                                        r".*cps-fast prepare voc"):
        Trainer(cfg, tmp_path / "run", device="cpu", print_fn=lambda *a: None)


def test_a_preset_trains_on_the_reference_folder_without_its_lists(tmp_path, capsys):
    """`cps-fast train voc_r50_1-8 --data-root DIR` where DIR is the reference's prepared folder without
    its subset_train_aug/ lists: the run uses the packaged partition (all 10582 ids present, as tiny
    hard links), says so in its log and records it in config.json."""
    root = tmp_path / "pascal_voc"
    ids = set()
    for f in ("train_aug_labeled_1-8.txt", "train_aug_unlabeled_1-8.txt"):
        ids |= set((PAPER_DIR / "pascal_voc" / "subset_train_aug" / f).read_text().split())
    assert len(ids) == 10582
    write_voc_reference(str(root), ["seed_image"], ["2007_000033", "2007_000042"], size=(40, 52))
    src_img, src_lab = root / "train_aug" / "image" / "seed_image.jpg", root / "train_aug" / "label" / "seed_image.png"
    for i in ids:
        os.link(src_img, root / "train_aug" / "image" / f"{i}.jpg")
        os.link(src_lab, root / "train_aug" / "label" / f"{i}.png")
    out = tmp_path / "run"
    sets = ["backbone=resnet18", "pretrained=None", "head_channels=16", "crop_size=32", "eval_crop_size=32",
            "batch_size_labeled=2", "batch_size_unlabeled=2", "num_workers=0", "eval_max_items=2", "log_every=1",
            "deep_stem=false"]
    cli_main(["train", "voc_r50_1-8", "--out", str(out), "--data-root", str(root), "--iters", "1",
              "--device", "cpu", "--data-backend", "pytorch", "--no-cuda-graph"]
             + [a for s in sets for a in ("--set", s)])
    printed = capsys.readouterr().out
    assert re.search(r"train_labeled: .*train_aug_labeled_1-8.txt \(the CPS paper's partition, packaged", printed)
    assert f"val_list: {root / 'val.txt'}" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_labeled"] == "paper:pascal_voc/subset_train_aug/train_aug_labeled_1-8.txt"
    assert saved["train_unlabeled"] == "paper:pascal_voc/subset_train_aug/train_aug_unlabeled_1-8.txt"
    assert saved["val_list"] == "val.txt"
    assert "1323 labeled, 9259 unlabeled images" in printed and f"schedule {34 * (9259 // 2)} iterations" in printed
    # the checkpoint evaluated on a plain VOCdevkit: its val.txt is not there, the devkit's own list is
    devkit = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (devkit / d).mkdir(parents=True)
    for i in ("2007_000033", "2007_000042"):
        os.link(root / "val" / "image" / f"{i}.jpg", devkit / "JPEGImages" / f"{i}.jpg")
        os.link(root / "val" / "label" / f"{i}.png", devkit / "SegmentationClass" / f"{i}.png")
    (devkit / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000042\n")
    cli_main(["eval", str(out / "last.pt"), "--data-root", str(devkit), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "val_list: the dataset's own validation list" in printed and "on 2 images of voc val" in printed


# --------------------------------------------------------------------------- normalisation, presets


MMSEG = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def test_mean_std_in_the_0_255_convention_are_refused():
    from cps_fast.config import ConfigError
    from cps_fast.eval import evaluate, predict

    ds = D.open_dataset("synthetic", "seed=0,n=4,size=32")
    with pytest.raises(ValueError, match=r"labeled_loader: mean=\(123.675.*0-255 convention of mmsegmentation and DALI"):
        D.labeled_loader(ds, batch_size=2, crop_size=16, mean=MMSEG[0], std=MMSEG[1], backend="pytorch")
    with pytest.raises(ValueError, match=r"unlabeled_loader: .*std in \(0, 1\]"):
        D.unlabeled_loader(ds, batch_size=2, crop_size=16, std=MMSEG[1], backend="pytorch")
    with pytest.raises(ValueError, match="3 values"):
        D.labeled_loader(ds, batch_size=2, crop_size=16, mean=(0.5, 0.5), backend="pytorch")
    with pytest.raises(ValueError, match="evaluate: .*divide them by 255"):
        evaluate(lambda x: x, ds, 7, crop_size=32, mean=MMSEG[0], std=MMSEG[1], device="cpu")
    with pytest.raises(ValueError, match="predict: .*divide them by 255"):
        predict(lambda x: x, ds[0]["image"], 7, crop_size=32, mean=MMSEG[0], std=MMSEG[1], device="cpu")
    with pytest.raises(ConfigError, match=r"'mean'.*0-255 convention"):
        load_preset("demo").replace(mean=MMSEG[0])
    with pytest.raises(ConfigError, match=r"'std'.*divide them by 255"):
        load_preset("demo").replace(std=MMSEG[1])


def test_cps_fast_presets_lists_the_table(capsys):
    from cps_fast.config import list_presets

    cli_main(["presets"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "dataset", "backbone", "partition", "cutmix", "cps_weight", "crop",
                                "schedule", "paper", "mIoU"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == set(list_presets())
    assert rows["voc_r50_1-8_cutmix"] == ["voc_r50_1-8_cutmix", "voc", "resnet50", "1/8", "yes", "1", "512",
                                          "34", "ep", "=", "39338", "it", "73.67"]
    assert rows["cityscapes_r101_1-2"][1:8] == ["cityscapes", "resnet101", "1/2", "no", "6", "800", "240"]
