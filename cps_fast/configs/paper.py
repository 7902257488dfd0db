"""The CPS paper's presets: one table and the rule that derives each row from it.

A preset name is ``<dataset>_<backbone>_1-<n>[_cutmix]``: dataset ``voc`` or ``cityscapes``,
backbone ``r50`` or ``r101``, partition 1/16, 1/8, 1/4 or 1/2 labeled, with or without CutMix
(32 rows). :func:`preset` turns (dataset, backbone, partition, CutMix) into the config keys of
that row; :func:`cps_fast.config.load_preset` builds the :class:`~cps_fast.config.Config` from
them, and ``cps-fast presets`` prints the table. What a row does not set is the default of
``Config``, which carries the reference recipe shared by every row (SGD momentum 0.9, poly power
0.9, scales 0.5-2.0, flip, OHEM 0.7 / 50000, sliding-window evaluation at stride 2/3, seed 12345).

Every recipe number comes from the reference code, TorchSemiSeg (github.com/charlesCXK/TorchSemiSeg),
its config.py and launch script of each experiment folder (``RECIPE_SOURCE``); every mIoU from the CPS
paper (Chen et al., CVPR 2021, arXiv 2106.01226), Tables 1 (VOC) and 2 (Cityscapes). docs/presets.md
explains every number and where cps-fast differs from the reference on purpose.
"""
from __future__ import annotations

from typing import Any

__all__ = ["BACKBONES", "CPS_WEIGHT", "DATASETS", "EPOCHS", "MIOU", "PARTITIONS", "RECIPE_SOURCE",
           "names", "parse_name", "preset"]

PARTITIONS = (16, 8, 4, 2)  # the labeled fraction is 1/n; the order of the EPOCHS and MIOU tuples

# Recipe per dataset. The sets are the reference's: VOC train_aug (10582 images; labeled 662 / 1323 /
# 2646 / 5291 at 1/16 / 1/8 / 1/4 / 1/2), Cityscapes train (2975 images; labeled 186 / 372 / 744 /
# 1488). '{n}' is the partition's denominator: the list files of the reference's split folders.
DATASETS: dict[str, dict[str, Any]] = {
    "voc": dict(
        num_classes=21,
        train_labeled="subset_train_aug/train_aug_labeled_1-{n}.txt",
        train_unlabeled="subset_train_aug/train_aug_unlabeled_1-{n}.txt",
        val_list="val.txt",
        crop_size=512,
        batch_size_labeled=8,
        batch_size_unlabeled=8,
        lr=0.0025,
        weight_decay=4e-4,  # reference: 1e-4 at lr 0.0025 x 4 GPUs on a loss divided by 4
        sup_loss="ce",
    ),
    "cityscapes": dict(
        num_classes=19,
        train_labeled="config_new/subset_train/train_aug_labeled_1-{n}.txt",
        train_unlabeled="config_new/subset_train/train_aug_unlabeled_1-{n}.txt",
        val_list="config_new/val.txt",
        crop_size=800,
        batch_size_labeled=8,
        batch_size_unlabeled=8,
        lr=0.0025,
        weight_decay=8e-4,  # reference: 1e-4 at lr 0.02 on 8 GPUs on a loss divided by 8
        sup_loss="ohem",
    ),
}

# Backbone per name, with the reference's ImageNet weights (resolved against weights_dir). The R101
# rows use the R50 recipe: the reference repository has no separate R101 folders.
BACKBONES = {"r50": ("resnet50", "ResNet-50"), "r101": ("resnet101", "ResNet-101")}

# Epochs over the unlabeled set per partition (TorchSemiSeg docs/getting_started.md), in PARTITIONS order.
EPOCHS = {"voc": (32, 34, 40, 60), "cityscapes": (128, 137, 160, 240)}

# (dataset, cutmix) -> weight of the cross term (each folder's config.py: cps_weight).
CPS_WEIGHT = {("voc", False): 1.5, ("voc", True): 1.0, ("cityscapes", False): 6.0, ("cityscapes", True): 5.0}

# (dataset, cutmix) -> the reference folder whose config.py (and launch script) gives the recipe.
RECIPE_SOURCE = {
    ("voc", False): "TorchSemiSeg model/voc8.res50v3+.CPS/config.py",
    ("voc", True): "TorchSemiSeg exp.voc/voc8.res50v3+.CPS+CutMix/config.py",
    ("cityscapes", False): "TorchSemiSeg exp.city/city8.res50v3+.CPS/config.py",
    ("cityscapes", True): "TorchSemiSeg exp.city/city8.res50v3+.CPS+CutMix/config.py",
}
PAPER_TABLE = {"voc": "Table 1", "cityscapes": "Table 2"}

# Published mIoU (%, val) per (dataset, backbone, cutmix), in PARTITIONS order: CPS paper Tables 1-2.
MIOU = {
    ("voc", "r50", False): (68.21, 73.20, 74.24, 75.91),
    ("voc", "r50", True): (71.98, 73.67, 74.90, 76.15),
    ("voc", "r101", False): (72.18, 75.83, 77.55, 78.64),
    ("voc", "r101", True): (74.48, 76.44, 77.68, 78.64),
    ("cityscapes", "r50", False): (69.79, 74.39, 76.85, 78.64),
    ("cityscapes", "r50", True): (74.47, 76.61, 77.83, 78.77),
    ("cityscapes", "r101", False): (70.50, 75.71, 77.41, 80.08),
    ("cityscapes", "r101", True): (74.72, 77.62, 79.21, 80.21),
}


def _name(dataset: str, backbone: str, n: int, cutmix: bool) -> str:
    return f"{dataset}_{backbone}_1-{n}" + ("_cutmix" if cutmix else "")


def names() -> list[str]:
    """The 32 preset names of the table, sorted."""
    return sorted(_name(ds, bb, n, cm) for (ds, bb, cm) in MIOU for n in PARTITIONS)


def parse_name(name: str) -> tuple[str, str, int, bool] | None:
    """``(dataset, backbone, n, cutmix)`` of a table name such as ``voc_r50_1-8_cutmix``; None otherwise."""
    cutmix = name.endswith("_cutmix")
    parts = name.removesuffix("_cutmix").split("_")
    if len(parts) != 3 or not parts[2].startswith("1-") or not parts[2][2:].isdigit():
        return None
    key = (parts[0], parts[1], int(parts[2][2:]), cutmix)
    return key if (key[0], key[1], cutmix) in MIOU and key[2] in PARTITIONS else None


def preset(dataset: str, backbone: str, n: int, cutmix: bool) -> dict[str, Any]:
    """The config keys of one row: ``dataset`` 'voc' or 'cityscapes', ``backbone`` 'r50' or 'r101',
    partition 1/``n`` labeled (n in 16, 8, 4, 2), with or without CutMix."""
    if (dataset, backbone, cutmix) not in MIOU or n not in PARTITIONS:
        raise ValueError(f"no paper row for dataset={dataset!r}, backbone={backbone!r}, partition 1/{n}, "
                         f"cutmix={cutmix!r}: expected dataset in {sorted(DATASETS)}, backbone in "
                         f"{sorted(BACKBONES)}, n in {PARTITIONS}")
    i = PARTITIONS.index(n)
    arch, arch_label = BACKBONES[backbone]
    recipe = {k: v.format(n=n) if isinstance(v, str) else v for k, v in DATASETS[dataset].items()}
    return dict(
        name=_name(dataset, backbone, n, cutmix),
        dataset=dataset,
        partition=f"1/{n}",
        backbone=arch,
        pretrained=f"{arch}_v1c.pth",
        epochs=EPOCHS[dataset][i],
        cps_weight=CPS_WEIGHT[dataset, cutmix],
        cutmix=cutmix,
        paper_miou=MIOU[dataset, backbone, cutmix][i],
        paper_source=(f"CPS paper {PAPER_TABLE[dataset]}, {arch_label}, {'w/' if cutmix else 'w/o'} CutMix, 1/{n}; "
                      f"recipe: {RECIPE_SOURCE[dataset, cutmix]}"),
        **recipe,
    )
