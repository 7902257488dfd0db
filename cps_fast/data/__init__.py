"""Data: datasets and split lists, DALI and PyTorch loaders, CutMix box masks.

DALI is imported lazily (only when a ``dali-*`` backend is built), so this
package imports without it.
"""
from .cutmix import box_masks
from .datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    CityscapesDataset,
    DataError,
    Subset,
    VOCDataset,
    open_dataset,
    read_image,
    read_label,
)
from .paper_lists import PAPER_COUNTS, PAPER_PREFIX, check_paper_counts, paper_list_path, resolve_list
from .loaders import BACKENDS, labeled_loader, resolve_backend, unlabeled_loader
from .splits import SampleSchedule, partition, read_list, read_partition, repeat_to_length, write_splits
from .splits import main as splits_main
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_TO_CITYSCAPES_ID, SyntheticDataset, write_cityscapes, write_voc

__all__ = [
    "BACKENDS", "PAPER_COUNTS", "PAPER_PREFIX", "check_paper_counts", "paper_list_path", "resolve_list", "CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAINID", "CITYSCAPES_PALETTE",
    "CityscapesDataset", "DataError", "SYNTHETIC_CLASSES", "SYNTHETIC_TO_CITYSCAPES_ID", "SampleSchedule",
    "Subset", "SyntheticDataset",
    "VOC_CLASSES", "VOC_PALETTE", "VOCDataset", "box_masks", "labeled_loader", "open_dataset",
    "partition", "read_image", "read_label", "read_list", "read_partition", "repeat_to_length",
    "resolve_backend", "splits_main", "unlabeled_loader", "write_cityscapes", "write_splits", "write_voc",
]
