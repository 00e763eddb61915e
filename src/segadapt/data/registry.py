"""The dataset registry: :data:`DATASETS` and :func:`build_dataset`, by name as configs and the command line do.

A module of its own so that :mod:`segadapt.data.check` can build registered datasets without
importing the ``segadapt.data`` package, which imports it (that was an import cycle).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, SegadaptError, did_you_mean
from .base import SPEC_KEY, SegDataset
from .cityscapes import Cityscapes
from .folder import FolderDataset
from .gta5 import GTA5
from .scannet import ScanNet2D
from .synthia import Synthia

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

    ``options`` are the dataset's keyword arguments (``with_labels``,
    ``split_file``, policies, dataset-specific ones such as ``label_type``). ``config_key`` is the
    config section the dataset comes from (``data.val``): its error hints then name that section's
    keys, here and when items are loaded later.

    Raises:
        ConfigError: an unknown dataset name or option (naming the closest valid one).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}{did_you_mean(name, DATASETS)}")
    cls = DATASETS[name]
    construct: Callable[..., SegDataset] = cls  # the registered classes take (root, split, **options), not SegDataset's arguments
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split")]
    for option in options:
        if option not in valid:
            where = f"{config_key}.options: " if config_key else ""
            raise ConfigError(
                f"{where}unknown option {option!r} for dataset {name!r}{did_you_mean(option, valid)} "
                f"(valid options: {', '.join(valid)})"
            )
    if config_key is None:
        return construct(root, split, **options)
    try:
        dataset = construct(root, split, **options)
    except SegadaptError as err:
        if SPEC_KEY not in str(err):
            raise
        # the constructor's hints name the placeholder section: the same error, naming the real one
        raise type(err)(str(err).replace(SPEC_KEY, config_key)) from None
    dataset.config_key = config_key
    return dataset
