"""GTA5 (Playing for Data, Richter et al. ECCV 2016): the usual synthetic source domain.

Layout, label encoding and quirks: docs/datasets/gta5.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from .base import SPEC_KEY, MissingFiles, Problem, SampleFiles, SegDataset, SizeMismatch, UnknownIds, make_label_map
from .cityscapes import LABEL_ID_TO_TRAIN_ID, LABEL_IDS
from .classes import CITYSCAPES_CLASSES

KNOWN_BAD_FRAMES: dict[str, str] = {
    "15188": "all-white 957x526 frame (docs/datasets/gta5.md)",
    "17705": "all-black 957x526 frame (docs/datasets/gta5.md)",
}
"""Frames no loader should train on; dropped by default (``drop_known_bad``)."""

_FRAME = re.compile(r"^\d+\.png$")  # not DAFormer's converted NNNNN_labelTrainIds.png


class GTA5(SegDataset):
    """GTA5: ``images/NNNNN.png`` (RGB) with ``labels/NNNNN.png`` (palette PNGs whose indices are
    Cityscapes label ids; docs/datasets/gta5.md, "Layout" and "Labels"), mapped to the 19 Cityscapes train classes.

    Args:
        root: the folder holding ``images/`` and ``labels/``.
        split: ``all`` (or its alias ``train``): every frame, the UDA convention. GTA5 has no split
            folders; restrict with ``split_file`` (e.g. RobustNet's ``gtav_split_val.txt``).
        drop_known_bad: drop :data:`KNOWN_BAD_FRAMES` (counted and logged).
        unknown_ids: ``ignore`` by default, as every reference loader maps ids outside the table
            to 255 and ProDA's void list includes 34 (docs/datasets/gta5.md, "Labels").
        size_mismatch: ``resize_label`` by default: frames 20801-20860 have labels of another size
            than their images (docs/datasets/gta5.md, "Options and defaults"); the reference UDA loaders (AdaptSegNet, DAFormer,
            ProDA) resize label and image independently, so these frames are kept with the label
            resized by nearest neighbour, each logged once. ``skip`` drops them as RobustNet does.
        missing_files: ``skip`` by default: some downloads miss 25 frames (docs/datasets/gta5.md, "Options and
            defaults"); the
            file list is the intersection of ``images/`` and ``labels/``, the rest counted and logged.

    The other arguments are those of :class:`~segadapt.data.base.SegDataset`. Names are the
    5-digit frame numbers, e.g. ``00001``.
    """

    default_splits = ("all",)

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        *,
        with_labels: bool = True,
        names: Iterable[str] | None = None,
        split_file: str | Path | None = None,
        drop_known_bad: bool = True,
        unknown_ids: UnknownIds = "ignore",
        size_mismatch: SizeMismatch = "resize_label",
        missing_files: MissingFiles = "skip",
    ) -> None:
        root = Path(root)
        if split not in ("all", "train"):
            raise DataError(
                f"GTA5 has no {split!r} split on disk; set {SPEC_KEY}.split=all (every frame, the UDA convention) "
                f"and restrict it with {SPEC_KEY}.split_file=<a list of NNNNN.png names> (docs/datasets/gta5.md)"
            )
        image_dir, label_dir = self.data_folders(root, split)
        images = {path.stem: path for path in image_dir.glob("*.png") if _FRAME.match(path.name)}
        if not images:
            raise DataError(
                f"no GTA5 images in {image_dir}: expected images/00001.png ... Unpack the *_images.zip "
                f"archives into {image_dir} and the *_labels.zip archives into {label_dir}"
            )
        labels = {path.stem: path for path in label_dir.glob("*.png") if _FRAME.match(path.name)}
        skipped = []
        if drop_known_bad:
            for name, reason in KNOWN_BAD_FRAMES.items():
                if name in images:
                    skipped.append(Problem("known_bad", str(images.pop(name)), reason))
                    labels.pop(name, None)
        items = [SampleFiles(path, label_dir / path.name, name) for name, path in images.items()]
        super().__init__(
            items,
            CITYSCAPES_CLASSES,
            label_map=make_label_map(LABEL_ID_TO_TRAIN_ID, LABEL_IDS),
            with_labels=with_labels,
            names=names,
            split_file=split_file,
            unknown_ids=unknown_ids,
            size_mismatch=size_mismatch,
            missing_files=missing_files,
            orphan_labels={name: path for name, path in labels.items() if name not in images},
            skipped=skipped,
            description=f"GTA5 {split} ({root})",
        )
        self.root, self.split = root, split

    @classmethod
    def data_folders(cls, root: str | Path, split: str) -> tuple[Path, ...]:
        """``images/`` and ``labels/`` (every split; :meth:`SegDataset.data_folders`)."""
        return Path(root) / "images", Path(root) / "labels"
