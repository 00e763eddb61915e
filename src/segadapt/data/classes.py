"""Class sets (names, colours, the ignore value) and the one pixel counter, shared by every layer.

:func:`class_pixel_counts` is segadapt's only way to count the pixels of each class in a label
map, and :func:`check_label_ids` its id check. They live here because this module is the lowest
one that all their users already import (for :data:`IGNORE_INDEX`): ``data`` (``check-data``'s
class distribution, :mod:`segadapt.data.check`), ``metrics`` (pseudo-label class distributions)
and ``methods`` (CPSL's Eq. 8/10 histogram, DARS priors, BLV's ``n_c``; re-exported by
:mod:`segadapt.methods.common`). A module above ``data`` would be imported by ``data`` itself, and
one outside the package would need the ignore value from here: the layers are
``data`` <- ``metrics`` <- ``methods`` <- ``engine``.

Counts are int64: exact for any dataset (float64 is exact only up to 2**53 pixels), and what
``torch.bincount`` returns, so counts of shards and ranks add up exactly. Convert with
``.double()`` where a distribution is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError

IGNORE_INDEX = 255
"""The label value of pixels without a class (Cityscapes' train-id convention); every ``ignore_index`` default."""

LabelMap = torch.Tensor | np.ndarray
"""Integer class ids of any shape: a tensor, or a numpy array (as datasets load labels)."""


@dataclass(frozen=True)
class ClassInfo:
    """The classes a dataset is labelled with, in train-id order.

    Examples:
        >>> info = ClassInfo("toy", ("road", "car"), ((128, 64, 128), (0, 0, 142)))
        >>> info.num_classes
        2
    """

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(f"{self.name}: {len(self.names)} class names but {len(self.colors)} colours")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{self.name}: class names must be unique, got {self.names}")
        if not 0 < len(self.names) <= 255:
            raise ValueError(f"{self.name}: need 1..255 classes (255 is reserved for ignore), got {len(self.names)}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> np.ndarray:
        """A ``[256, 3]`` uint8 palette: class colours, black for ignore and unused ids."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return palette

    def subset(self, indices: Sequence[int], name: str | None = None) -> ClassInfo:
        """The classes at ``indices`` (e.g. the 16- or 13-class SYNTHIA protocols)."""
        return ClassInfo(
            name or f"{self.name}-{len(indices)}",
            tuple(self.names[i] for i in indices),
            tuple(self.colors[i] for i in indices),
            self.ignore_index,
        )


def lookup_table(mapping: dict[int, int], size: int = 256, default: int = IGNORE_INDEX) -> np.ndarray:
    """A label-id -> train-id lookup table; ids absent from ``mapping`` map to ``default``."""
    lut = np.full(size, default, dtype=np.uint8 if size <= 256 else np.int64)
    for source_id, train_id in mapping.items():
        lut[source_id] = train_id
    return lut


# The 19 Cityscapes training classes (docs/datasets/cityscapes.md, "Labels"): the label space of
# GTA5, SYNTHIA (19-class map) and Cityscapes, and of the embedded benchmark. Official colours
# (sky is 70,130,180).
CITYSCAPES_CLASSES = ClassInfo(
    "cityscapes",
    (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ),
    (
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ),
)

# SYNTHIA's compact 16 classes (CBST/CRST, ProDA n_class=16): the 19 Cityscapes classes without
# terrain, truck and train, which SYNTHIA never labels (docs/datasets/synthia.md, "Labels" and
# "Evaluation protocols"). A 16-output model's class k is train id k of this set; its mIoU16 is
# the mean over all 16.
SYNTHIA16_CLASSES = CITYSCAPES_CLASSES.subset(
    tuple(i for i, name in enumerate(CITYSCAPES_CLASSES.names) if name not in ("terrain", "truck", "train")),
    name="synthia16",
)

# The 20 ScanNet benchmark classes, in NYU40-id order (docs/datasets/scannet.md, "Labels").
# "refrigerator" is spelled "refridgerator" in ScanNet's own files; colours are ScanNet's
# util.create_color_palette()[nyu40].
SCANNET20_CLASSES = ClassInfo(
    "scannet20",
    (
        "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
        "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
        "bathtub", "otherfurniture",
    ),
    (
        (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34),
        (140, 86, 75), (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189),
        (196, 156, 148), (23, 190, 207), (247, 182, 210), (219, 219, 141), (255, 127, 14),
        (158, 218, 229), (44, 160, 44), (112, 128, 144), (227, 119, 194), (82, 84, 163),
    ),
)


# --------------------------------------------------------------------------- pixel counting


def _as_integer_tensor(labels: LabelMap, what: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = np.asarray(labels)  # nested lists too
    if isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{what} must hold integer class ids, got dtype {labels.dtype}")
        return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{what} must hold integer class ids, got dtype {labels.dtype}")
    return labels


def _raise_unknown_ids(values: torch.Tensor, num_classes: int, ignore_index: int, what: str) -> None:
    """``values``: int64 ids without the ignore pixels; raise naming those outside ``0..num_classes-1``."""
    bad = (values < 0) | (values >= num_classes)
    if bool(bad.any()):
        found = torch.unique(values[bad]).tolist()
        listed = ", ".join(str(v) for v in found[:10]) + (", ..." if len(found) > 10 else "")
        raise DataError(
            f"{what} hold ids [{listed}] outside 0..{num_classes - 1} that are not the ignore index {ignore_index}; "
            "map raw label ids to train ids first (the dataset's label map), or fix num_classes"
        )


def check_label_ids(labels: LabelMap, num_classes: int, ignore_index: int = IGNORE_INDEX, what: str = "labels") -> None:
    """Raise a :class:`~segadapt.errors.DataError` naming every id of ``labels`` outside ``0..num_classes-1``
    that is not ``ignore_index`` (the first 10, sorted), or a non-integer dtype.

    Args:
        labels: class ids of any shape (tensor or numpy array).
        num_classes: ``C``; valid ids are ``0..C-1``.
        ignore_index: the one other value allowed.
        what: how the message names ``labels``.

    Shape:
        - labels: any

    Examples:
        >>> check_label_ids(torch.tensor([[0, 2], [255, 1]]), num_classes=3)
        >>> check_label_ids(torch.tensor([0, 7, -1, 7]), num_classes=3)
        Traceback (most recent call last):
            ...
        segadapt.errors.DataError: labels hold ids [-1, 7] outside 0..2 that are not the ignore index 255; map raw label ids to train ids first (the dataset's label map), or fix num_classes
    """  # noqa: E501 (the doctest's exception message is one line)
    flat = _as_integer_tensor(labels, what).reshape(-1).long()
    _raise_unknown_ids(flat[flat != ignore_index], num_classes, ignore_index, what)


def class_pixel_counts(labels: LabelMap, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixels of each class, int64 ``[C]``, of a label map or batch; ``ignore_index`` pixels are not counted.

    The one pixel counter of segadapt (see the module docstring): dataset class distributions
    (``check-data``), CPSL's class histogram (Eq. 8, 10), DARS's label prior, BLV's ``n_c``,
    pseudo-label statistics. Sum the results over images, shards or ranks.

    Args:
        labels: train ids of any shape, as a tensor (the result is on its device) or a numpy
            array (the result is on the CPU).
        num_classes: ``C``; ids must be ``0..C-1`` or ``ignore_index``.
        ignore_index: the value of pixels without a class (not counted).

    Returns:
        int64 ``[C]``; ``counts.sum()`` is the number of non-ignored pixels.

    Raises:
        DataError: ids outside ``0..C-1`` that are not ``ignore_index`` (the message lists them)
            or a non-integer dtype: such ids are never dropped silently.

    Shape:
        - labels: any, e.g. ``[H, W]`` or ``[N, H, W]``; output: ``[C]``

    Examples:
        >>> class_pixel_counts(torch.tensor([[0, 2, 2], [255, 2, 0]]), num_classes=3)
        tensor([2, 0, 3])
        >>> class_pixel_counts(np.array([[0, 1], [255, 1]], dtype=np.uint8), num_classes=3)  # a loaded label file
        tensor([1, 2, 0])
    """
    flat = _as_integer_tensor(labels, "labels").reshape(-1).long()
    counted = flat[flat != ignore_index]
    _raise_unknown_ids(counted, num_classes, ignore_index, "labels")
    return torch.bincount(counted, minlength=num_classes)
