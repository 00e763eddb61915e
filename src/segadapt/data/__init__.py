"""Datasets, label maps and split lists.

Every dataset returns the sample dict of :mod:`segadapt.data.base`; :func:`build_dataset`
builds any registered one by name, as configs and the command line do.

Examples:
    >>> dataset = build_dataset("cityscapes", "/data/cityscapes", "val")  # doctest: +SKIP
    >>> sample = dataset[0]                                               # doctest: +SKIP
    >>> sample["image"].shape, sample["label"].dtype                      # doctest: +SKIP
    (torch.Size([3, 1024, 2048]), torch.int64)
"""

from __future__ import annotations

from .base import Problem, SampleFiles, SegDataset, UnknownLabelIdsError, read_image, read_label
from .check import CheckReport, check_dataset, check_folder_root, check_named_dataset, class_pixel_counts, format_report
from .cityscapes import Cityscapes, train_id_to_label_id
from .classes import CITYSCAPES_CLASSES, SCANNET20_CLASSES, SYNTHIA16_CLASSES, ClassInfo
from .folder import FolderDataset, read_dataset_yaml
from .gta5 import GTA5
from .registry import DATASETS, build_dataset
from .scannet import ScanNet2D
from .splits import make_split, read_split, read_split_entries, write_split
from .synthia import MIOU13_CLASS_IDS, MIOU13_CLASS_IDS_OF_16, MIOU16_CLASS_IDS, Synthia

__all__ = [
    "CITYSCAPES_CLASSES",
    "DATASETS",
    "GTA5",
    "MIOU13_CLASS_IDS",
    "MIOU13_CLASS_IDS_OF_16",
    "MIOU16_CLASS_IDS",
    "SCANNET20_CLASSES",
    "SYNTHIA16_CLASSES",
    "CheckReport",
    "Cityscapes",
    "ClassInfo",
    "FolderDataset",
    "Problem",
    "SampleFiles",
    "ScanNet2D",
    "SegDataset",
    "Synthia",
    "UnknownLabelIdsError",
    "build_dataset",
    "check_dataset",
    "check_folder_root",
    "check_named_dataset",
    "class_pixel_counts",
    "format_report",
    "make_split",
    "read_dataset_yaml",
    "read_image",
    "read_label",
    "read_split",
    "read_split_entries",
    "train_id_to_label_id",
    "write_split",
]
