"""Split lists: read the published semi-supervised splits, make and write new ones.

The same "1/8 split" means different image sets in different papers (docs/datasets/cityscapes.md,
"Semi-supervised splits"), so segadapt reads each provenance's files in their native format and
reduces every line to the item *name* the datasets use (``aachen_000000_000019``, ``00001``,
``scene0000_00/000000``). Line formats recognised (same section), one item per line:

- UniMatch / DARS: ``leftImg8bit/train/<city>/<name>_leftImg8bit.png gtFine/.../<name>_gtFine_labelTrainIds.png``
  (space-separated, often no newline at the end of the file);
- U2PL: ``leftImg8bit/train/<city>/<name>_leftImg8bit.png`` (the label path is derived);
- CPS / TorchSemiSeg: ``/images/train/<name>.png<TAB>/segmentation/train/<name>_gtFine.png``;
- plain lists: a name (``aachen_000000_000019``, ``scene0000_00``) or a file name (``00001.png``,
  as in the GTA5/SYNTHIA lists of AdaptSegNet, DACS and RobustNet).

Examples:
    >>> labeled, unlabeled = make_split([f"img{i}" for i in range(10)], ratio=1 / 4, seed=0)
    >>> len(labeled), len(unlabeled)
    (3, 7)
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path, PurePosixPath
from typing import Iterable, NamedTuple

from ..errors import ConfigError, DataError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"


class SplitEntry(NamedTuple):
    """One line of a split file: the item name and, when the line gives them, its relative paths."""

    name: str
    image: str | None
    label: str | None


def parse_split_line(line: str) -> SplitEntry:
    """Parse one non-empty line of any recognised format.

    Examples:
        >>> parse_split_line("leftImg8bit/train/ulm/ulm_000001_000019_leftImg8bit.png").label
        'gtFine/train/ulm/ulm_000001_000019_gtFine_labelTrainIds.png'
    """
    line = line.strip()
    columns = line.split("\t") if "\t" in line else line.split()
    if len(columns) == 2 and all(_is_file_path(column) for column in columns):
        image, label = (column.strip() for column in columns)
        return SplitEntry(name_from_path(image), image, label)
    if len(columns) == 1 and _is_file_path(line):
        label_path: str | None = None
        if line.startswith("leftImg8bit/") and line.endswith(_CITYSCAPES_IMAGE_SUFFIX):
            # U2PL u2pl/dataset/base.py: "gtFine/" + line[12:-15] + "gtFine_labelTrainIds.png"
            label_path = "gtFine/" + line[12:-15] + "gtFine_labelTrainIds.png"
        return SplitEntry(name_from_path(line), line, label_path)
    return SplitEntry(line, None, None)


def name_from_path(path: str) -> str:
    """The item name of an image path from a split file.

    Examples:
        >>> name_from_path("leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
        'lindau_000000_000019'
        >>> name_from_path("/images/train/aachen_000000_000019.png")
        'aachen_000000_000019'
        >>> name_from_path("2D/scene0011_00/color/0.jpg")
        'scene0011_00/0'
    """
    parts = PurePosixPath(path).parts
    file_name = parts[-1]
    if file_name.endswith(_CITYSCAPES_IMAGE_SUFFIX):
        return file_name[: -len(_CITYSCAPES_IMAGE_SUFFIX)]
    stem = PurePosixPath(file_name).stem
    if len(parts) >= 3 and parts[-2] == "color":  # ScanNet: <scene>/color/<frame>.jpg
        return f"{parts[-3]}/{stem}"
    return stem


def _is_file_path(text: str) -> bool:
    return text.lower().endswith(_IMAGE_SUFFIXES)


def read_split_entries(path: str | Path) -> list[SplitEntry]:
    """Every entry of a split file, in file order (repeats kept, e.g. DARS ``*_match_len.txt``).

    Raises:
        DataError: naming the file, when it is missing or lists nothing.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}. Check the path given as split_file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read split file {path}: {error}") from error
    # splitlines(): UniMatch files have no newline at the end, so `wc -l` under-counts by one.
    entries = [parse_split_line(line) for line in text.splitlines() if line.strip()]
    if not entries:
        raise DataError(f"split file {path} lists no items; write one name or image path per line")
    return entries


def read_split(path: str | Path) -> list[str]:
    """The item names a split file lists, in file order, each once."""
    return list(dict.fromkeys(entry.name for entry in read_split_entries(path)))


def make_split(
    names: Iterable[str], ratio: float | None = None, count: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split ``names`` into a labeled and an unlabeled part, deterministically.

    ``count = floor(len * ratio + 0.5)`` when a ratio is given, which reproduces the published
    Cityscapes counts (2975 images: 1/16 -> 186, 1/8 -> 372, 1/4 -> 744, 1/2 -> 1488;
    docs/datasets/cityscapes.md, "Semi-supervised splits"). Names are ranked by a hash of (seed, name), so the result depends only on
    the set of names and the seed (not on their order, nor on the numpy or Python version), and
    for one seed a smaller labeled part is a subset of a larger one (1/16 within 1/8 within 1/4).
    These are not the image sets of UniMatch, U2PL or DARS: read those with :func:`read_split`.

    Returns:
        ``(labeled, unlabeled)``, each sorted.

    Raises:
        ConfigError: naming ``ratio`` or ``count`` when they are missing, both given, or out of range.
    """
    unique = sorted(set(names))
    if (ratio is None) == (count is None):
        raise ConfigError("make_split needs exactly one of ratio (e.g. 0.125) or count (e.g. 372)")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ConfigError(f"ratio must be in (0, 1], got {ratio}")
        count = math.floor(len(unique) * ratio + 0.5)
    if count is None or not 1 <= count <= len(unique):
        raise ConfigError(f"count must be in 1..{len(unique)} (the number of names), got {count}")
    ranked = sorted(unique, key=lambda name: hashlib.sha256(f"{seed}\0{name}".encode()).digest())
    return sorted(ranked[:count]), sorted(ranked[count:])


def write_split(path: str | Path, names: Iterable[str]) -> None:
    """Write ``names`` one per line (a plain list :func:`read_split` reads back), creating folders."""
    names = list(names)
    bad = [name for name in names if not name.strip() or "\n" in name or name != name.strip()]
    if bad:
        raise ConfigError(f"cannot write split {path}: names must be non-empty single lines, got {bad[:5]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
