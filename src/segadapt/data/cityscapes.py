"""Cityscapes (fine annotations): the target domain of GTA5/SYNTHIA -> Cityscapes and a
semi-supervised benchmark. Layout, label table and quirks: docs/datasets/cityscapes.md.

Examples:
    >>> dataset = Cityscapes("/data/cityscapes", "val")  # doctest: +SKIP
    >>> dataset[0]["label"].unique()                      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal, NamedTuple

import numpy as np

from ..errors import ConfigError, DataError
from .base import SPEC_KEY, MissingFiles, SampleFiles, SegDataset, SizeMismatch, UnknownIds, make_label_map
from .classes import CITYSCAPES_CLASSES, IGNORE_INDEX


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# cityscapesScripts helpers/labels.py (docs/datasets/cityscapes.md, "Labels"), vendored: it is data, and the package
# pulls in matplotlib and more just for this table.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in (
        ("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
        ("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
        ("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
        ("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
        ("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
        ("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
        ("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
        ("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
        ("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
        ("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
        ("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
        ("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
        ("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
        ("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
        ("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
        ("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
        ("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
        ("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
        ("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
        ("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
        ("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
        ("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
        ("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
        ("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
        ("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
        ("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
        ("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
        ("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
        ("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
        ("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
        ("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
        ("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
        ("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
        ("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
        ("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
    )
)

LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    label.id: label.train_id for label in CITYSCAPES_LABELS if 0 <= label.train_id < IGNORE_INDEX
}
"""The 19 evaluated label ids -> train ids (docs/datasets/cityscapes.md, "Labels"); GTA5 labels use
the same ids."""

# labelIds PNGs hold 0..33: license-plate polygons are never rasterised (docs/datasets/cityscapes.md,
# "Labels").
LABEL_IDS = tuple(label.id for label in CITYSCAPES_LABELS if label.id >= 0)

_TRAIN_ID_TO_LABEL_ID = np.zeros(256, dtype=np.uint8)
for _label in reversed(CITYSCAPES_LABELS):
    # cityscapesScripts builds trainId2label from reversed(labels): a shared train id (255)
    # goes back to the first label in the table, "unlabeled" (id 0).
    if 0 <= _label.train_id <= IGNORE_INDEX:
        _TRAIN_ID_TO_LABEL_ID[_label.train_id] = _label.id


def train_id_to_label_id(train_ids: np.ndarray) -> np.ndarray:
    """Convert a train-id prediction back to Cityscapes label ids, for the test server.

    Train ids 0..18 go to their label id and 255 to 0 (``unlabeled``), as cityscapesScripts
    does.

    Shape:
        any; returns uint8 of the same shape.

    Raises:
        ValueError: for values that are neither a train id nor 255.

    Examples:
        >>> train_id_to_label_id(np.array([0, 18, 255])).tolist()
        [7, 33, 0]
    """
    train_ids = np.asarray(train_ids)
    bad = (train_ids < 0) | ((train_ids >= len(LABEL_ID_TO_TRAIN_ID)) & (train_ids != IGNORE_INDEX))
    if bad.any():
        bad_values = np.unique(train_ids[bad])[:10].tolist()
        raise ValueError(f"train ids must be 0..{len(LABEL_ID_TO_TRAIN_ID) - 1} or {IGNORE_INDEX}, got {bad_values}")
    return _TRAIN_ID_TO_LABEL_ID[train_ids]


class Cityscapes(SegDataset):
    """Cityscapes fine: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` (docs/datasets/cityscapes.md, "Layout").

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train``, ``val``, ``test`` (its gtFine holds dummies: use ``with_labels=False``).
        label_type: ``labelIds`` (shipped, 0..33, mapped by the 35-row table) or
            ``labelTrainIds`` (generated by ``csCreateTrainIdLabelImgs``, already 0..18 + 255).
        unknown_ids: ``error`` by default: shipped labelIds only hold 0..33
            (docs/datasets/cityscapes.md, "Labels"), so another id means a wrong or damaged file.

    The other arguments are those of :class:`~segadapt.data.base.SegDataset`. Names are
    ``<city>_<seq>_<frame>``, e.g. ``aachen_000000_000019``.
    """

    default_splits = ("train", "val")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        label_type: Literal["labelIds", "labelTrainIds"] = "labelIds",
        with_labels: bool = True,
        names: Iterable[str] | None = None,
        split_file: str | Path | None = None,
        unknown_ids: UnknownIds = "error",
        size_mismatch: SizeMismatch = "error",
        missing_files: MissingFiles = "error",
    ) -> None:
        if label_type not in ("labelIds", "labelTrainIds"):
            raise ConfigError(f"label_type={label_type!r} is not valid; use 'labelIds' or 'labelTrainIds'")
        root = Path(root)
        image_dir, label_dir = self.data_folders(root, split)
        suffix = "_leftImg8bit.png"
        images = sorted(image_dir.glob(f"*/*{suffix}"))
        if not images:
            raise DataError(
                f"no Cityscapes images in {image_dir}: expected leftImg8bit/{split}/<city>/<city>_<seq>_<frame>"
                f"{suffix}. Unpack leftImg8bit_trainvaltest.zip into {root} (docs/datasets/cityscapes.md)"
            )
        if with_labels and not label_dir.is_dir():
            raise DataError(
                f"no Cityscapes labels in {label_dir}. Unpack gtFine_trainvaltest.zip into {root}, "
                f"or set {SPEC_KEY}.with_labels=false to use the images only"
            )
        items = []
        for image in images:
            name = image.name[: -len(suffix)]
            label = label_dir / image.parent.name / f"{name}_gtFine_{label_type}.png"
            items.append(SampleFiles(image, label, name))
        super().__init__(
            items,
            CITYSCAPES_CLASSES,
            label_map=make_label_map(LABEL_ID_TO_TRAIN_ID, LABEL_IDS) if label_type == "labelIds" else None,
            with_labels=with_labels,
            names=names,
            split_file=split_file,
            unknown_ids=unknown_ids,
            size_mismatch=size_mismatch,
            missing_files=missing_files,
            description=f"Cityscapes {split} ({root})",
        )
        self.root, self.split, self.label_type = root, split, label_type

    @classmethod
    def data_folders(cls, root: str | Path, split: str) -> tuple[Path, ...]:
        """``leftImg8bit/<split>`` and ``gtFine/<split>`` (:meth:`SegDataset.data_folders`)."""
        return Path(root) / "leftImg8bit" / split, Path(root) / "gtFine" / split

    def unknown_ids_hint(self) -> str:
        if self.label_type == "labelIds":
            return "Shipped *_gtFine_labelIds.png files hold ids 0..33 only; is this file damaged or of another type? "
        return ""
