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

import difflib
import inspect
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import Problem, SampleFiles, SegDataset, UnknownLabelIdsError, read_image, read_label
from .check import CheckReport, check_dataset, check_folder_root, check_named_dataset, class_pixel_counts, format_report
from .cityscapes import Cityscapes, train_id_to_label_id
from .classes import CITYSCAPES_CLASSES, SCANNET20_CLASSES, SYNTHIA16_CLASSES, ClassInfo
from .folder import FolderDataset, read_dataset_yaml
from .gta5 import GTA5
from .scannet import ScanNet2D
from .splits import make_split, read_split, read_split_entries, write_split
from .synthia import MIOU13_CLASS_IDS, MIOU13_CLASS_IDS_OF_16, MIOU16_CLASS_IDS, Synthia

DATASETS: dict[str, type[SegDataset]] = {
    "cityscapes": Cityscapes,
    "gta5": GTA5,
    "synthia": Synthia,
    "scannet": ScanNet2D,
    "folder": FolderDataset,
}
"""The registry of :func:`build_dataset`: name -> class taking ``(root, split, **options)``."""


def build_dataset(name: str, root: str | Path, split: str, **options: Any) -> SegDataset:
    """Build the registered dataset ``name`` on ``root``/``split``.

    ``options`` are the dataset's keyword arguments (``transform``, ``with_labels``,
    ``split_file``, policies, dataset-specific ones such as ``label_type``).

    Raises:
        ConfigError: an unknown dataset name (listing the valid ones) or option (naming the closest).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    cls = DATASETS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split")]
    for option in options:
        if option not in valid:
            close = difflib.get_close_matches(option, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown option {option!r} for dataset {name!r}; {hint}valid options: {', '.join(valid)}"
            )
    return cls(root, split, **options)


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
