"""The dataset base class and the file readers every loader shares.

A loader (Cityscapes, GTA5, ...) only finds its files and says how its labels are encoded;
:class:`SegDataset` pairs images with labels, restricts to a split list, applies the
dataset's policies for incomplete or inconsistent data, and returns the sample dict of the
project contract (docs/architecture.md, "Contract: sample and label space"):

- ``image``: float32 ``[3, H, W]``, RGB in ``[0, 1]`` (models normalise their own input);
- ``label``: int64 ``[H, W]`` train ids ``0..C-1``, ``ignore_index`` (255) elsewhere; absent
  for unlabeled data or ``with_labels=False``;
- ``name``: the item's name (e.g. ``aachen_000000_000019``, ``00001``, ``scene0000_00/000000``);
- ``replay``: an empty list the random transforms append their records to.

A dataset never transforms its samples: the engine's loader wrapper
(:class:`segadapt.engine.sampling.SeededTransformDataset`) applies the ``data.*_transforms``
with a seed per item, so augmentation is reproducible and resumable.

Every file problem becomes a :class:`~segadapt.errors.DataError` that names the file and the
fix, in the process that reads it, never a bare PIL error deep in a DataLoader worker.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .classes import IGNORE_INDEX, ClassInfo
from .splits import read_split

logger = logging.getLogger(__name__)

UnknownIds = Literal["ignore", "error"]
SizeMismatch = Literal["error", "resize_label", "resize_image", "skip"]
MissingFiles = Literal["error", "skip"]

SPEC_KEY = "data.<source|target|val>"
"""How hints name the config section of a dataset (``SPEC_KEY.options.missing_files=skip``, as the
command line takes it) until :func:`segadapt.data.build_dataset` is told the real one (``data.val``)."""

UNKNOWN_ID = -1
"""``label_map`` entry of a raw id that the dataset's label format does not define."""

_POLICIES = {
    "unknown_ids": ("ignore", "error"),
    "size_mismatch": ("error", "resize_label", "resize_image", "skip"),
    "missing_files": ("error", "skip"),
}


def segadapt_home() -> Path:
    """segadapt's cache folder, ``$SEGADAPT_HOME``, by default ``~/.cache/segadapt``: the embedded benchmark and the label-id cache live under it."""
    return Path(os.environ.get("SEGADAPT_HOME", "~/.cache/segadapt")).expanduser()


class SampleFiles(NamedTuple):
    """The files of one item. ``label`` is None for unlabeled data."""

    image: Path
    label: Path | None
    name: str


class Problem(NamedTuple):
    """Something wrong with one file: what (``kind``), where (``path``) and the details."""

    kind: str
    path: str
    detail: str


class UnknownLabelIdsError(DataError):
    """A label file holds ids its dataset's label format does not define."""


# ---------------------------------------------------------------------------------------------
# readers


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Shape:
        ``uint8 [H, W, 3]``

    Raises:
        DataError: naming the file, when it is missing, corrupt or truncated.
    """
    def decode(image: Image.Image) -> np.ndarray:
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))

    return decode_file(Path(path), "image", decode)


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG as the ids it stores (mode ``L``, ``P`` or 16-bit gray).

    Palette (``P``) PNGs such as GTA5's are read as their palette indices, never converted
    to colours (docs/datasets/gta5.md, "Labels").

    Shape:
        ``[H, W]``, uint8 (8-bit files) or uint16 (16-bit files)

    Raises:
        DataError: naming the file, when it is missing, corrupt, or not a single-channel id map.
    """
    path = Path(path)

    def decode(image: Image.Image) -> np.ndarray:
        if image.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
            raise DataError(
                f"label {path} is a {image.mode} image; expected a single-channel id map (PNG mode L, P "
                "or 16-bit gray). Colour visualisations (gtFine_color, GT/COLOR) are not labels: point the "
                "dataset at the id PNGs"
            )
        return np.array(image)

    return decode_file(path, "label", decode)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header only."""
    path = Path(path)
    return decode_file(path, "file", lambda image: (image.height, image.width))


CHECK_DATA_HINT = " (`segadapt check-data` lists every such file)"
"""The end of a message about one bad file, pointing at the command that lists them all (which leaves it out)."""


def decode_file(path: Path, what: str, decode: Callable[[Image.Image], Any]) -> Any:
    """Open ``path`` with PIL and return ``decode(image)``; any failure becomes a DataError naming the file."""
    try:
        with Image.open(path) as image:
            return decode(image)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            f"{what} file not found: {path}. Check the dataset root and its layout (docs/datasets/)"
        ) from None
    # PIL signals corrupt data with OSError, SyntaxError, ValueError, EOFError, zlib errors...:
    # whatever it is, the user needs the file name, not PIL's internals.
    except Exception as error:
        raise DataError(
            f"cannot read {what} {path}: {error}. The file is corrupt, truncated or not an image: re-extract "
            f"it from the dataset archive, or remove it{CHECK_DATA_HINT}"
        ) from error


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map to ``size = (height, width)``; never invents ids."""
    return np.array(Image.fromarray(label).resize((size[1], size[0]), Image.Resampling.NEAREST))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``uint8 [H, W, 3]`` image to ``size = (height, width)``."""
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def make_label_map(mapping: Mapping[int, int], known_ids: Iterable[int]) -> np.ndarray:
    """A raw id -> train id lookup table.

    Ids in ``mapping`` map to their train id, other ``known_ids`` (void classes) to 255, and
    every other id to :data:`UNKNOWN_ID`, which the dataset's ``unknown_ids`` policy handles.

    Examples:
        >>> make_label_map({7: 0}, known_ids=range(9)).tolist()
        [255, 255, 255, 255, 255, 255, 255, 0, 255]
    """
    known = list(known_ids)
    lut = np.full(max([*known, *mapping]) + 1, UNKNOWN_ID, dtype=np.int16)
    lut[known] = IGNORE_INDEX
    for raw_id, train_id in mapping.items():
        lut[raw_id] = train_id
    return lut


def check_policy(option: str, value: str) -> str:
    """Raise a ConfigError naming ``option`` and its valid values when ``value`` is not one."""
    if value not in _POLICIES[option]:
        raise ConfigError(f"{option}={value!r} is not valid; use one of {', '.join(_POLICIES[option])}")
    return value


# ---------------------------------------------------------------------------------------------
# the dataset


def _is_wanted(name: str, wanted: set[str]) -> bool:
    # "scene0000_00" selects every frame "scene0000_00/<frame>" (ScanNet scene lists).
    return name in wanted or name.partition("/")[0] in wanted


class SegDataset(Dataset):
    """A list of (image, label, name) files with the label encoding and policies of one dataset.

    Args:
        items: every item found on disk, with the path its label should have (checked here)
            or None for unlabeled data.
        classes: the train classes labels are mapped to.
        label_map: raw id -> train id table (:func:`make_label_map`), or None when the label
            files already hold train ids; then ids ``>= num_classes`` other than the ignore
            index are always an error.
        with_labels: False drops labels (a target domain, or a split whose labels are dummies).
        names: keep only these names (a name ``group/frame`` is also selected by ``group``).
        split_file: keep only the names listed in this file (any format of ``splits.py``).
        unknown_ids: raw ids the label format does not define: ``ignore`` maps them to 255,
            ``error`` raises a DataError naming the file and the ids.
        size_mismatch: a label whose size differs from its image: ``error``, ``resize_label``
            (nearest), ``resize_image`` (bilinear), or ``skip`` (such pairs are found from the
            file headers at construction, dropped, counted and logged).
        missing_files: an image without its label, a label without its image, or a listed name
            that is not on disk: ``error`` or ``skip`` (counted and logged).
        orphan_labels: label files found without an image, by name (a missing file).
        unsupported: files of a format the dataset cannot read (a ``.tif`` image, a ``.jpg`` label), as problems;
            they follow the ``missing_files`` policy, so they are reported as what they are, not as missing pairs.
        skipped: problems the loader already dropped items for (e.g. GTA5's known bad frames).
        description: how the dataset names itself in messages, e.g. ``"GTA5 all (/data/gta5)"``.
    """

    default_splits: tuple[str, ...] = ()
    """The labelled splits ``segadapt check-data --dataset NAME`` checks when given no ``--split``."""

    config_key: str = SPEC_KEY
    """The config section this dataset was built from (``data.val``), named by the hints of its errors;
    :func:`segadapt.data.build_dataset` sets it."""

    @classmethod
    def data_folders(cls, root: str | Path, split: str) -> tuple[Path, ...]:
        """The folders under ``root`` that hold ``split``'s images and labels, from the layout alone (no disk access).

        The constructor finds its files there; the commands that write (``predict``,
        ``pseudo-label``, ``rounds``) never write into, above or below them
        (:mod:`segadapt.engine.output_folder`). The default, the whole root, suits layouts that
        spread a split over many folders (ScanNet's scenes).
        """
        return (Path(root),)

    def __init__(
        self,
        items: Sequence[SampleFiles],
        classes: ClassInfo,
        *,
        label_map: np.ndarray | None = None,
        with_labels: bool = True,
        names: Iterable[str] | None = None,
        split_file: str | Path | None = None,
        unknown_ids: UnknownIds = "error",
        size_mismatch: SizeMismatch = "error",
        missing_files: MissingFiles = "error",
        orphan_labels: Mapping[str, Path] | None = None,
        unsupported: Sequence[Problem] = (),
        skipped: Sequence[Problem] = (),
        description: str = "dataset",
    ) -> None:
        self.classes = classes
        self.label_map = label_map
        self.with_labels = with_labels
        self.unknown_ids = check_policy("unknown_ids", unknown_ids)
        self.size_mismatch = check_policy("size_mismatch", size_mismatch)
        self.missing_files = check_policy("missing_files", missing_files)
        self.description = description
        self.skipped: list[Problem] = list(skipped)
        self.items: list[SampleFiles] = []
        self._warned_resized: set[str] = set()

        items = sorted(items, key=lambda item: item.name)
        if names is not None and split_file is not None:
            raise ConfigError(f"{description}: pass names or split_file, not both")
        listed: list[str] | None = None
        if split_file is not None:
            listed, source = read_split(split_file), f"split file {split_file}"
        elif names is not None:
            listed, source = list(names), "names"
        wanted = None if listed is None else set(listed)
        if listed is not None and wanted is not None:  # both or neither
            items = self._select(items, listed, wanted, source)
        if with_labels:
            orphans = [
                Problem("missing_pair", str(path), "label without an image")
                for name, path in sorted((orphan_labels or {}).items())
                if wanted is None or _is_wanted(name, wanted)
            ]
            unpaired = [item for item in items if item.label is not None and not item.label.is_file()]
            # a label of an unsupported format is reported as that, not as a missing label as well
            unsupported_stems = {str(Path(problem.path).with_suffix("")) for problem in unsupported}
            unlabelled = [
                Problem("missing_pair", str(item.image), f"no label file {item.label}")
                for item in unpaired
                if str(Path(str(item.label)).with_suffix("")) not in unsupported_stems
            ]
            self._missing(orphans + list(unsupported) + unlabelled)
            unpaired_names = {item.name for item in unpaired}
            items = [item for item in items if item.name not in unpaired_names]
        else:
            self._missing(list(unsupported))
            items = [item._replace(label=None) for item in items]
        if self.size_mismatch == "skip":
            items = self._drop_size_mismatches(items)
        if not items:
            raise DataError(f"{description}: no items left to load. Check the root, the split and the split list")
        self.items = items
        if self.skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(p.kind for p in self.skipped).items()))
            shown = "; ".join(f"{p.path} ({p.kind})" for p in self.skipped[:5])
            more = f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            logger.warning(
                "%s: skipped %d item(s) (%s): %s%s (`segadapt check-data` lists them all)",
                description, len(self.skipped), kinds, shown, more,
            )

    # -- construction helpers

    def _select(self, items: list[SampleFiles], listed: list[str], wanted: set[str], source: str) -> list[SampleFiles]:
        selected = [item for item in items if _is_wanted(item.name, wanted)]
        found = {key for item in selected for key in (item.name, item.name.partition("/")[0])}
        absent = [name for name in dict.fromkeys(listed) if name not in found]
        self._missing([Problem("missing_file", name, f"listed in {source} but not found") for name in absent])
        return selected

    def _missing(self, problems: list[Problem]) -> None:
        """Apply the ``missing_files`` policy: raise, or record the problems as skipped."""
        if not problems:
            return
        if self.missing_files == "error":
            shown = "\n  ".join(f"{p.path}: {p.detail}" for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            what = "missing file(s)" if all(p.kind != "unsupported_format" for p in problems) else "missing or unsupported file(s)"
            raise DataError(
                f"{self.description}: {len(problems)} {what}:\n  {shown}{more}\n"
                f"Restore the files, or set {self.config_key}.options.missing_files=skip to drop these items "
                "(counted and logged)"
            )
        self.skipped.extend(problems)

    def _drop_size_mismatches(self, items: list[SampleFiles]) -> list[SampleFiles]:
        kept = []
        for item in items:
            if item.label is not None and image_size(item.image) != image_size(item.label):
                self.skipped.append(Problem("size_mismatch", str(item.label), self._size_detail(item)))
            else:
                kept.append(item)
        return kept

    def _size_detail(self, item: SampleFiles) -> str:
        assert item.label is not None  # only labelled items are compared
        (image_h, image_w), (label_h, label_w) = image_size(item.image), image_size(item.label)
        return f"label is {label_w}x{label_h} (WxH) but its image {item.image} is {image_w}x{image_h}"

    # -- reading

    @property
    def names(self) -> list[str]:
        """The item names, sorted: the input of :func:`segadapt.data.splits.make_split`."""
        return [item.name for item in self.items]

    @property
    def has_labels(self) -> bool:
        return any(item.label is not None for item in self.items)

    def why_unlabelled(self, key: str) -> str:
        """Why this dataset has no labels and how to give it some: the tail of the error of a stream that needs them."""
        return f"{self.description} has no label files; set {key}.split to a split with labels"

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}: {len(self)} items, {self.classes.num_classes} classes>"

    def read_raw_label(self, path: Path) -> np.ndarray:
        """The ids stored in a label file, before mapping (subclasses with other encodings override)."""
        return read_label(path)

    def unknown_ids_in(self, raw: np.ndarray) -> list[int]:
        """The ids in ``raw`` that the label format does not define (sorted).

        For train-id labels (``label_map is None``): ids ``>= num_classes`` other than the ignore index.
        """
        ids = np.unique(raw)
        if self.label_map is None:
            return [int(i) for i in ids if i >= self.classes.num_classes and i != self.classes.ignore_index]
        lut = self.label_map
        return [int(i) for i in ids if i < 0 or i >= len(lut) or lut[i] == UNKNOWN_ID]

    def to_train_ids(self, raw: np.ndarray, path: Path, unknown_ids: UnknownIds | None = None) -> np.ndarray:
        """Map raw ids to train ids (``uint8 [H, W]``).

        Unknown ids follow ``unknown_ids``, by default the dataset's policy for raw ids and
        ``error`` for train-id labels (an id ``>= num_classes`` there is a broken file).

        Raises:
            UnknownLabelIdsError: naming the file and the ids.
        """
        ignore = self.classes.ignore_index
        if self.label_map is None:
            unknown = raw.max(initial=0) >= self.classes.num_classes and self.unknown_ids_in(raw)
            if unknown and (unknown_ids or "error") == "error":
                raise UnknownLabelIdsError(
                    f"label {path} holds ids {unknown[:20]}, but {self.description} has "
                    f"{self.classes.num_classes} classes (train ids 0..{self.classes.num_classes - 1}, "
                    f"{ignore} = ignore). Fix the label file, or the class list of the dataset"
                )
            if unknown:
                raw = np.where((raw >= self.classes.num_classes) & (raw != ignore), ignore, raw)
            return raw.astype(np.uint8)
        lut = self.label_map
        if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
            in_range = (raw >= 0) & (raw < len(lut))
            mapped = np.where(in_range, lut[np.where(in_range, raw, 0)], UNKNOWN_ID)
        else:
            mapped = lut[raw]
        unknown_mask = mapped == UNKNOWN_ID
        if unknown_mask.any():
            if (unknown_ids or self.unknown_ids) == "error":
                raise UnknownLabelIdsError(
                    f"label {path} holds ids {self.unknown_ids_in(raw)[:20]} that {self.description} does not "
                    f"define. {self.unknown_ids_hint()}Set {self.config_key}.options.unknown_ids=ignore to map "
                    f"them to {ignore}"
                )
            mapped = np.where(unknown_mask, ignore, mapped)
        return mapped.astype(np.uint8)

    def unknown_ids_hint(self) -> str:
        """A dataset-specific sentence on the usual cause of unknown ids (ends with a space, or empty)."""
        return ""

    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of item ``index``'s image as loaded, read from the file header only."""
        return image_size(self.items[index].image)

    def load_image(self, index: int) -> np.ndarray:
        """The image of item ``index`` as ``uint8 [H, W, 3]`` RGB."""
        return read_image(self.items[index].image)

    def load_label(self, index: int) -> np.ndarray | None:
        """The train-id label of item ``index`` (``uint8 [H, W]``), or None without labels."""
        path = self.items[index].label
        if path is None:
            return None
        return self.to_train_ids(self.read_raw_label(path), path)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image = self.load_image(index)
        label = self.load_label(index)
        sample: dict = {"name": item.name, "replay": []}
        if label is not None:
            image, label = self._match_sizes(image, label, item)
            sample["label"] = torch.from_numpy(label.astype(np.int64))
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return sample

    def _match_sizes(self, image: np.ndarray, label: np.ndarray, item: SampleFiles) -> tuple[np.ndarray, np.ndarray]:
        if image.shape[:2] == label.shape:
            return image, label
        detail = (
            f"label {item.label} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {item.image} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
        # "skip" drops mismatched pairs at construction: getting here means a file changed since.
        if self.size_mismatch in ("error", "skip"):
            raise DataError(
                f"{self.description}: {detail}. Set {self.config_key}.options.size_mismatch=resize_label "
                "(nearest), resize_image (bilinear) or skip (drop such pairs, counted and logged)"
            )
        if str(item.label) not in self._warned_resized:
            self._warned_resized.add(str(item.label))
            logger.warning("%s: %s; resized (size_mismatch=%r)", self.description, detail, self.size_mismatch)
        if self.size_mismatch == "resize_label":
            return image, resize_label(label, image.shape[:2])
        return resize_image(image, label.shape), label
