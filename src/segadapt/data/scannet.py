"""ScanNet v2 2D semantic segmentation (20 benchmark classes), as used for semi-supervised
segmentation by DARS. Layouts, label pipeline and caveats: docs/datasets/scannet.md.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterable, Literal

from ..errors import ConfigError, DataError
from .base import SPEC_KEY, MissingFiles, Problem, SampleFiles, SegDataset, SizeMismatch, UnknownIds, make_label_map
from .classes import IGNORE_INDEX, SCANNET20_CLASSES

SCANNET20_NYU40_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
"""NYU40 ids of the 20 benchmark classes, in train-id order (ScanNet ``VALID_CLASS_IDS``; docs/datasets/scannet.md, "Labels")."""

NYU40_TO_TRAIN_ID: dict[int, int] = {nyu40: train_id for train_id, nyu40 in enumerate(SCANNET20_NYU40_IDS)}
"""NYU40 id -> train id 0..19; every other NYU40 id (0 = unlabeled, 13, 15, ...) -> 255."""

LABEL_TSV = "scannetv2-labels.combined.tsv"
_SCENE = re.compile(r"^scene\d{4}_\d{2}$")


def read_label_tsv(path: str | Path) -> dict[int, int]:
    """ScanNet raw category id -> NYU40 id, from ``scannetv2-labels.combined.tsv`` (columns ``id``, ``nyu40id``).

    Raises:
        DataError: naming the file, when it is missing or lacks those columns or integer values.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except FileNotFoundError:
        raise DataError(
            f"ScanNet label table not found: {path}. Copy {LABEL_TSV} from the ScanNet download there, or set "
            f"{SPEC_KEY}.options.label_tsv=PATH; it is needed to map raw label ids (options.label_type=raw) to NYU40"
        ) from None
    if not rows or not {"id", "nyu40id"} <= set(rows[0]):
        raise DataError(f"{path} is not a ScanNet label table: it needs the tab-separated columns 'id' and 'nyu40id'")
    try:
        return {int(row["id"]): int(row["nyu40id"]) for row in rows}
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: the 'id' and 'nyu40id' columns must hold integers ({error})") from error


class ScanNet2D(SegDataset):
    """ScanNet 2D frames: ``<scene>/color/<frame>.jpg`` with ``<scene>/<label_dir>/<frame>.png``.

    Two label encodings (docs/datasets/scannet.md, "Layout" and "Labels"):

    - ``label_type="nyu40"`` (default): 8-bit NYU40 ids in ``label/``, as in the preprocessed
      ``scannet_frames_25k`` subset and 3DMV/BPNet's exports;
    - ``label_type="raw"``: 16-bit ScanNet category ids in ``label-filt/`` (the ``2d-label-filt.zip``
      archives), mapped to NYU40 by ``scannetv2-labels.combined.tsv``.

    Both are mapped to the 20 benchmark classes (train ids 0..19, 255 = ignore).

    Args:
        root: the folder holding the ``scene<NNNN>_<NN>`` folders.
        split: ``train``, ``val`` or ``test``: the scenes listed in ``ROOT/scannetv2_<split>.txt``
            (ScanNet ``Tasks/Benchmark``), or ``all`` for every scene folder.
        label_dir: the label folder inside each scene; ``label`` (nyu40) or ``label-filt`` (raw) by default.
        label_tsv: the raw -> NYU40 table; ``ROOT/scannetv2-labels.combined.tsv`` by default (raw only).
        unknown_ids: ``error`` for nyu40 labels (ids above 40 mean another encoding), ``ignore`` for raw
            ones (ids absent from the table are unannotated; docs/datasets/scannet.md, "Labels") by default.
        size_mismatch: ``resize_label`` by default: label and colour sizes may differ (1296x968 colour,
            possibly 640x480 labels; docs/datasets/scannet.md, "Resolutions"). ``resize_image`` resizes the image instead.

    The other arguments are those of :class:`~segadapt.data.base.SegDataset`. Names are
    ``<scene>/<frame>``, e.g. ``scene0000_00/000000``; a scene name in ``names`` or a split file
    selects all its frames.
    """

    default_splits = ("train", "val")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        label_type: Literal["nyu40", "raw"] = "nyu40",
        label_dir: str | None = None,
        label_tsv: str | Path | None = None,
        with_labels: bool = True,
        names: Iterable[str] | None = None,
        split_file: str | Path | None = None,
        unknown_ids: UnknownIds | None = None,
        size_mismatch: SizeMismatch = "resize_label",
        missing_files: MissingFiles = "error",
    ) -> None:
        if label_type not in ("nyu40", "raw"):
            raise ConfigError(f"{SPEC_KEY}.options.label_type={label_type} is not valid; use nyu40 or raw")
        root = Path(root)
        self.label_type = label_type
        scenes, skipped = self._scenes(root, split, missing_files)
        label_dir = label_dir or ("label" if label_type == "nyu40" else "label-filt")
        items = [
            SampleFiles(image, root / scene / label_dir / f"{image.stem}.png", f"{scene}/{image.stem}")
            for scene in scenes
            for image in (root / scene / "color").glob("*.jpg")
        ]
        if label_type == "nyu40":
            label_map = make_label_map(NYU40_TO_TRAIN_ID, range(41))
        else:
            nyu40 = read_label_tsv(label_tsv or root / LABEL_TSV)
            mapping = {raw: NYU40_TO_TRAIN_ID.get(nyu, IGNORE_INDEX) for raw, nyu in nyu40.items()}
            label_map = make_label_map(mapping, [0, *nyu40])
        super().__init__(
            items,
            SCANNET20_CLASSES,
            label_map=label_map,
            with_labels=with_labels,
            names=names,
            split_file=split_file,
            unknown_ids=unknown_ids or ("error" if label_type == "nyu40" else "ignore"),
            size_mismatch=size_mismatch,
            missing_files=missing_files,
            skipped=skipped,
            description=f"ScanNet {split} ({root})",
        )
        self.root, self.split = root, split

    @staticmethod
    def _scenes(root: Path, split: str, missing_files: MissingFiles) -> tuple[list[str], list[Problem]]:
        if not root.is_dir():
            raise DataError(f"ScanNet root {root} does not exist")
        if split == "all":
            scenes = sorted(path.name for path in root.iterdir() if path.is_dir() and _SCENE.match(path.name))
            if not scenes:
                raise DataError(f"no scene<NNNN>_<NN> folders in {root} (docs/datasets/scannet.md)")
            return scenes, []
        scene_list = root / f"scannetv2_{split}.txt"
        if not scene_list.is_file():
            raise DataError(
                f"ScanNet split {split!r} needs the scene list {scene_list}: copy scannetv2_{split}.txt from "
                f"ScanNet's Tasks/Benchmark folder there, or set {SPEC_KEY}.split=all (optionally with "
                f"{SPEC_KEY}.split_file=...)"
            )
        listed = [line.strip() for line in scene_list.read_text().splitlines() if line.strip()]
        absent = [scene for scene in listed if not (root / scene / "color").is_dir()]
        if absent and missing_files == "error":
            raise DataError(
                f"{len(absent)} scene(s) listed in {scene_list} have no color/ folder in {root}, e.g. {absent[:5]}. "
                f"Export or unpack them, or set {SPEC_KEY}.options.missing_files=skip (counted and logged)"
            )
        skipped = [Problem("missing_file", str(root / scene / "color"), f"listed in {scene_list}") for scene in absent]
        return [scene for scene in listed if scene not in absent], skipped

    def unknown_ids_hint(self) -> str:
        if self.label_type == "nyu40":
            return f"NYU40 ids are 0..40; raw ScanNet ids (label-filt, 16-bit) need {self.config_key}.options.label_type=raw. "
        return ""
