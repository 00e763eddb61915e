"""SYNTHIA-RAND-CITYSCAPES (Ros et al. CVPR 2016): the second synthetic source domain.

Layout, label encoding, class maps and evaluation protocols: docs/datasets/synthia.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageFile

from ..errors import ConfigError, DataError
from .base import (
    SPEC_KEY,
    MissingFiles,
    SampleFiles,
    SegDataset,
    SizeMismatch,
    UnknownIds,
    decode_file,
    make_label_map,
)
from .classes import CITYSCAPES_CLASSES, SYNTHIA16_CLASSES

SYNTHIA_CLASS_NAMES: tuple[str, ...] = (
    "void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car", "traffic sign",
    "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work", "traffic light", "terrain", "rider",
    "truck", "bus", "train", "wall", "lanemarking",
)
"""The 23 SYNTHIA class ids (R channel of ``GT/LABELS``; docs/datasets/synthia.md, "Labels")."""

SYNTHIA_TO_CITYSCAPES_TRAIN_ID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15,
    20: 16, 12: 17, 11: 18,
}
"""SYNTHIA id -> 19-way Cityscapes train id (DAFormer, RobustNet, ProDA n_class=19); others -> 255."""

MIOU16_CLASS_IDS: tuple[int, ...] = tuple(CITYSCAPES_CLASSES.names.index(n) for n in SYNTHIA16_CLASSES.names)
"""Cityscapes train ids averaged by the SYNTHIA mIoU16 protocol: all 19 but terrain, truck, train
(docs/datasets/synthia.md, "Evaluation protocols")."""

_MIOU13_DROPPED = ("wall", "fence", "pole")
MIOU13_CLASS_IDS: tuple[int, ...] = tuple(
    i for i in MIOU16_CLASS_IDS if CITYSCAPES_CLASSES.names[i] not in _MIOU13_DROPPED
)
"""Cityscapes train ids of mIoU13 (``mIoU*``): the 16 without wall, fence and pole
(docs/datasets/synthia.md, "Evaluation protocols")."""

MIOU13_CLASS_IDS_OF_16: tuple[int, ...] = tuple(
    i for i, name in enumerate(SYNTHIA16_CLASSES.names) if name not in _MIOU13_DROPPED
)
"""The same 13 classes as indices of a 16-class model's output (its train ids 0..15)."""

SYNTHIA_TO_SYNTHIA16_TRAIN_ID: dict[int, int] = {
    synthia_id: MIOU16_CLASS_IDS.index(train_id)
    for synthia_id, train_id in SYNTHIA_TO_CITYSCAPES_TRAIN_ID.items()
    if train_id in MIOU16_CLASS_IDS
}
"""SYNTHIA id -> compact 16-way train id (CBST/CRST, ProDA n_class=16)."""

_FRAME = re.compile(r"^\d+\.png$")  # not DAFormer's converted NNNNNNN_labelTrainIds.png


def read_png_channel(path: str | Path, channel: int = 0) -> np.ndarray:
    """One channel of a PNG at its full bit depth, including 16-bit RGB(A) files.

    Pillow decodes 16-bit RGB PNGs to 8-bit RGB keeping only the high byte of each sample
    (docs/datasets/synthia.md, "Labels": small SYNTHIA class ids then all read 0). Pillow's PNG decoder can also
    unpack the same data keeping the *low* byte of each big-endian sample (raw mode
    ``RGB;16L``), so two decodes give the full 16-bit values without cv2 or FreeImage.

    Shape:
        ``[H, W]``, uint16 for 16-bit files, uint8 for 8-bit ones.

    Raises:
        DataError: naming the file, when it is missing, corrupt or not a PNG of that layout.
    """
    path = Path(path)

    def decode(image: Image.Image) -> np.ndarray:
        raw_mode = _raw_mode(image)
        if image.format != "PNG" or image.mode not in ("RGB", "RGBA", "L", "I;16", "I;16B"):
            raise DataError(f"{path} is a {image.format} {image.mode} image; expected a 1-, 3- or 4-channel PNG")
        if image.mode in ("L", "I;16", "I;16B"):
            if channel != 0:
                raise DataError(f"{path} has one channel; cannot read channel {channel}")
            return np.array(image)
        high = np.array(image)[..., channel]
        if high.dtype != np.uint8 or not raw_mode.endswith(";16B"):  # 8-bit file, or a Pillow that keeps 16 bits
            return high
        with Image.open(path) as low_image:
            tile = low_image.tile[0]
            low_image.tile = [_with_raw_mode(tile, raw_mode[: -len("B")] + "L")]
            low = np.array(low_image)[..., channel]
        return (high.astype(np.uint16) << 8) | low

    return decode_file(path, "label", decode)


def _raw_mode(image: Image.Image) -> str:
    assert isinstance(image, ImageFile.ImageFile)  # decode_file passes what Image.open returned
    args = image.tile[0][3] if image.tile else ""
    assert args is not None  # a PNG tile always names its raw mode
    return args if isinstance(args, str) else str(args[0])


def _with_raw_mode(tile, raw_mode: str):
    codec, extents, offset, args = tile
    args = raw_mode if isinstance(args, str) else (raw_mode, *args[1:])
    return type(tile)(codec, extents, offset, args) if hasattr(tile, "_fields") else (codec, extents, offset, args)


class Synthia(SegDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/NNNNNNN.png`` with ``GT/LABELS/NNNNNNN.png`` (16-bit, 3-channel,
    class id in the first channel, instance id in the second; docs/datasets/synthia.md, "Layout"
    and "Labels").

    Args:
        root: the folder holding ``RGB/`` and ``GT/LABELS/``.
        split: ``all`` (or its alias ``train``): all 9,400 frames, the UDA convention; there is no
            official split (restrict with ``split_file``).
        num_classes: 19 (the Cityscapes train ids; terrain, truck and train never occur) or 16
            (the compact CBST/ProDA ids, :data:`~segadapt.data.classes.SYNTHIA16_CLASSES`).
        unknown_ids: ``error`` by default: class ids are 0..22, so a larger value means the wrong
            channel or file was read.

    The other arguments are those of :class:`~segadapt.data.base.SegDataset`. Names are the
    7-digit frame numbers, e.g. ``0000000``.
    """

    default_splits = ("all",)

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        *,
        num_classes: int = 19,
        with_labels: bool = True,
        names: Iterable[str] | None = None,
        split_file: str | Path | None = None,
        unknown_ids: UnknownIds = "error",
        size_mismatch: SizeMismatch = "error",
        missing_files: MissingFiles = "error",
    ) -> None:
        if num_classes not in (19, 16):
            raise ConfigError(f"{SPEC_KEY}.options.num_classes={num_classes} is not valid for SYNTHIA; use 19 or 16")
        root = Path(root)
        if split not in ("all", "train"):
            raise DataError(
                f"SYNTHIA has no {split!r} split on disk; set {SPEC_KEY}.split=all (all frames, the UDA convention) "
                f"and restrict it with {SPEC_KEY}.split_file=<a list of NNNNNNN.png names> (docs/datasets/synthia.md)"
            )
        image_dir, label_root = self.data_folders(root, split)
        images = {path.stem: path for path in image_dir.glob("*.png") if _FRAME.match(path.name)}
        if not images:
            raise DataError(
                f"no SYNTHIA images in {image_dir}: expected RGB/0000000.png ... Unpack "
                f"SYNTHIA_RAND_CITYSCAPES so that {root} holds RGB/ and GT/LABELS/"
            )
        label_dir = label_root / "LABELS"
        labels = {path.stem: path for path in label_dir.glob("*.png") if _FRAME.match(path.name)}
        mapping = SYNTHIA_TO_CITYSCAPES_TRAIN_ID if num_classes == 19 else SYNTHIA_TO_SYNTHIA16_TRAIN_ID
        super().__init__(
            [SampleFiles(path, label_dir / path.name, name) for name, path in images.items()],
            CITYSCAPES_CLASSES if num_classes == 19 else SYNTHIA16_CLASSES,
            label_map=make_label_map(mapping, range(len(SYNTHIA_CLASS_NAMES))),
            with_labels=with_labels,
            names=names,
            split_file=split_file,
            unknown_ids=unknown_ids,
            size_mismatch=size_mismatch,
            missing_files=missing_files,
            orphan_labels={name: path for name, path in labels.items() if name not in images},
            description=f"SYNTHIA {split} ({root})",
        )
        self.root, self.split = root, split

    @classmethod
    def data_folders(cls, root: str | Path, split: str) -> tuple[Path, ...]:
        """``RGB/`` and ``GT/`` (its LABELS and COLOR; every split; :meth:`SegDataset.data_folders`)."""
        return Path(root) / "RGB", Path(root) / "GT"

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_png_channel(path, channel=0)

    def unknown_ids_hint(self) -> str:
        return "SYNTHIA class ids are 0..22 in the first channel of GT/LABELS (not GT/COLOR). "
