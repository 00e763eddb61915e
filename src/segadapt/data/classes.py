"""Class sets: names, colours and the ignore value, shared by datasets, metrics and figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

IGNORE_INDEX = 255


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

    def subset(self, indices: Sequence[int], name: str | None = None) -> "ClassInfo":
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


# The 19 Cityscapes training classes (DATASETS.md 1.4): the label space of GTA5, SYNTHIA (19-class
# map) and Cityscapes, and of the embedded benchmark. Official colours (sky is 70,130,180).
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
# terrain, truck and train, which SYNTHIA never labels (DATASETS.md 3.3-3.4). A 16-output model's
# class k is train id k of this set; its mIoU16 is the mean over all 16.
SYNTHIA16_CLASSES = CITYSCAPES_CLASSES.subset(
    tuple(i for i, name in enumerate(CITYSCAPES_CLASSES.names) if name not in ("terrain", "truck", "train")),
    name="synthia16",
)

# The 20 ScanNet benchmark classes, in NYU40-id order (DATASETS.md 4.3). "refrigerator" is spelled
# "refridgerator" in ScanNet's own files; colours are ScanNet's util.create_color_palette()[nyu40].
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
