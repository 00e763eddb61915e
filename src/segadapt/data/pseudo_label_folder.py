"""A dataset whose labels come from a folder of pseudo labels (``segadapt pseudo-label``).

The folder holds one ``<name>.png`` per item (``name`` may contain ``/``, e.g. Cityscapes'
``aachen/aachen_000000_000019``), uint8 train ids with 255 = unlabeled, at the image's size,
plus the ``summary.json`` the generator writes. Any dataset can be wrapped, so self-training
runs on Cityscapes, ScanNet, the benchmark or a user's folder dataset alike (config key
``data.target.pseudo_labels``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .base import read_label, resize_label


def pseudo_label_path(root: str | Path, name: str) -> Path:
    """Where the pseudo label of item ``name`` lives under ``root``."""
    return Path(root) / f"{name}.png"


class PseudoLabeledDataset(Dataset):
    """``dataset``'s images with the labels read from ``label_dir`` instead of its own.

    Every item must have its file: a missing one is a :class:`DataError` at construction,
    naming the first missing files, rather than a crash in a DataLoader worker mid-training.
    A pseudo label whose size differs from its image (labels made at another resolution) is
    resized to the image with nearest-neighbour interpolation.

    Args:
        dataset: a :class:`~segadapt.data.base.SegDataset` (its own labels, if any, are dropped).
        label_dir: the folder ``segadapt pseudo-label`` wrote.
    """

    def __init__(self, dataset: Any, label_dir: str | Path) -> None:
        self.dataset = dataset
        self.label_dir = Path(label_dir)
        self.classes = dataset.classes
        if not self.label_dir.is_dir():
            raise DataError(
                f"pseudo-label folder {self.label_dir} does not exist; make it with "
                "`segadapt pseudo-label CHECKPOINT OUT_DIR` or fix data.<spec>.pseudo_labels"
            )
        missing = [name for name in dataset.names if not pseudo_label_path(self.label_dir, name).is_file()]
        if missing:
            shown = ", ".join(str(pseudo_label_path(self.label_dir, n)) for n in missing[:3])
            raise DataError(
                f"{len(missing)} of {len(dataset)} items have no pseudo label in {self.label_dir} (e.g. {shown}); "
                "the folder was made for another dataset or split: regenerate it with `segadapt pseudo-label`"
            )

    @property
    def names(self) -> list[str]:
        return self.dataset.names

    @property
    def has_labels(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"<PseudoLabeledDataset {self.dataset!r} labels from {self.label_dir}>"

    def image_size(self, index: int) -> tuple[int, int]:
        return self.dataset.image_size(index)

    def load_label(self, index: int) -> np.ndarray:
        path = pseudo_label_path(self.label_dir, self.dataset.names[index])
        label = read_label(path)
        ignore = self.classes.ignore_index
        bad = np.unique(label[(label >= self.classes.num_classes) & (label != ignore)])
        if bad.size:
            raise DataError(
                f"{path}: pseudo label holds ids {bad.tolist()} outside 0..{self.classes.num_classes - 1} "
                f"and {ignore} (ignore); it was made for another label space: regenerate it"
            )
        return label

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        label = self.load_label(index)
        height, width = sample["image"].shape[-2:]
        if label.shape != (height, width):
            label = resize_label(label, (height, width))
        sample["label"] = torch.from_numpy(label.astype(np.int64))
        return sample
