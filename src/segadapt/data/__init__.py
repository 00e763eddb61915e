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

import inspect
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SegadaptError, did_you_mean
from .base import SPEC_KEY, Problem, SampleFiles, SegDataset, UnknownLabelIdsError, read_image, read_label
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


def build_dataset(name: str, root: str | Path, split: str, *, config_key: str | None = None, **options: Any) -> SegDataset:
    """Build the registered dataset ``name`` on ``root``/``split``.

    ``options`` are the dataset's keyword arguments (``transform``, ``with_labels``,
    ``split_file``, policies, dataset-specific ones such as ``label_type``). ``config_key`` is the
    config section the dataset comes from (``data.val``): its error hints then name that section's
    keys, here and when items are loaded later.

    Raises:
        ConfigError: an unknown dataset name or option (naming the closest valid one).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}{did_you_mean(name, DATASETS)}")
    cls = DATASETS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split")]
    for option in options:
        if option not in valid:
            where = f"{config_key}.options: " if config_key else ""
            raise ConfigError(
                f"{where}unknown option {option!r} for dataset {name!r}{did_you_mean(option, valid)} "
                f"(valid options: {', '.join(valid)})"
            )
    if config_key is None:
        return cls(root, split, **options)
    try:
        dataset = cls(root, split, **options)
    except SegadaptError as err:
        if SPEC_KEY not in str(err):
            raise
        # the constructor's hints name the placeholder section: the same error, naming the real one
        raise type(err)(str(err).replace(SPEC_KEY, config_key)) from None
    dataset.config_key = config_key
    return dataset


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
