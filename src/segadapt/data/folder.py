"""The generic folder dataset: any data a user converts to train ids, and the embedded benchmark.

Layout (docs/datasets/folder.md, "Layout"; docs/architecture.md, "Contract: sample and label
space")::

    ROOT/dataset.yaml                     name, ignore_index, classes: [{name, color: [r, g, b]}, ...],
                                          optionally a free-text description
    ROOT/images/<split>/<stem>.png|.jpg   RGB images, also in sub-folders (images/<split>/cityA/<stem>.png)
    ROOT/labels/<split>/<stem>.png        uint8 train ids, ignore_index elsewhere; absent for unlabeled splits;
                                          a label mirrors its image's path (labels/<split>/cityA/<stem>.png)

Examples:
    >>> dataset = FolderDataset("/data/my_dataset", "val")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import DataError, did_you_mean
from .base import MissingFiles, Problem, SampleFiles, SegDataset, SizeMismatch
from .classes import IGNORE_INDEX, ClassInfo

DATASET_YAML = "dataset.yaml"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNSUPPORTED_SUFFIXES = (".tif", ".tiff", ".webp", ".bmp", ".gif", ".jpg", ".jpeg", ".jp2", ".ppm")
"""Image formats a user may have that a folder dataset does not read: such a file is reported as an unsupported
format (convert it), not as a missing pair. For labels the JPEG suffixes are among them: JPEG alters ids."""
_KEYS = ("name", "description", "ignore_index", "classes")
_OPTIONAL_KEYS = ("description", "ignore_index")
_CLASS_KEYS = ("name", "color")


def read_dataset_yaml(root: str | Path) -> ClassInfo:
    """The classes of a folder dataset, validated; errors name the file and the key.

    ``ignore_index`` defaults to 255 and must not be a class index; ``description`` is optional text.

    Raises:
        DataError: the file is missing, is not YAML, or a key is missing, unknown or of the wrong type.
    """
    path = Path(root) / DATASET_YAML
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: a folder dataset needs it, with keys name, ignore_index and classes "
            "(docs/datasets/folder.md)"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with keys name, ignore_index, classes, got {type(data).__name__}")
    _check_keys(path, data, _KEYS, "")
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise DataError(f"{path}: 'name' must be a non-empty string, got {data.get('name')!r}")
    if not isinstance(data.get("description", ""), str):
        raise DataError(f"{path}: 'description' must be a string, got {data['description']!r}")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{path}: 'classes' must be a non-empty list of {{name, color: [r, g, b]}}, got {classes!r}")
    names, colors = [], []
    for index, entry in enumerate(classes):
        key = f"classes[{index}]"
        if not isinstance(entry, dict):
            raise DataError(f"{path}: '{key}' must be a mapping {{name, color: [r, g, b]}}, got {entry!r}")
        _check_keys(path, entry, _CLASS_KEYS, f"{key}.")
        name, color = entry.get("name"), entry.get("color")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: '{key}.name' must be a non-empty string, got {name!r}")
        if (
            not isinstance(color, list)
            or len(color) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
        ):
            raise DataError(f"{path}: '{key}.color' must be three integers 0..255 [r, g, b], got {color!r}")
        names.append(name)
        colors.append(tuple(color))
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: class names must be unique in 'classes', repeated: {duplicates}")
    if len(names) > 255:
        raise DataError(f"{path}: 'classes' lists {len(names)} classes; at most 255 fit uint8 labels")
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not len(names) <= ignore <= 255:
        raise DataError(
            f"{path}: 'ignore_index' must be an integer in {len(names)}..255 (not a class index), got {ignore!r}"
        )
    return ClassInfo(data["name"], tuple(names), tuple(colors), ignore)


def _check_keys(path: Path, data: dict[str, Any], valid: tuple[str, ...], prefix: str) -> None:
    required = [key for key in valid if key not in _OPTIONAL_KEYS]
    for key in data:
        if key not in valid:
            hint = did_you_mean(str(key), valid, prefix=prefix) or f"; valid keys: {', '.join(valid)}"
            raise DataError(f"{path}: unknown key '{prefix}{key}'{hint}")
    for key in required:
        if key not in data:
            raise DataError(f"{path}: missing key '{prefix}{key}'")


def folder_splits(root: str | Path) -> list[str]:
    """The splits of a folder dataset: the sub-folders of ``ROOT/images``."""
    image_root = Path(root) / "images"
    if not image_root.is_dir():
        raise DataError(f"{image_root} not found: a folder dataset keeps its images in images/<split>/")
    return sorted(path.name for path in image_root.iterdir() if path.is_dir())


class FolderDataset(SegDataset):
    """A split of a folder dataset (module docstring). Labels hold train ids, so an id
    ``>= num_classes`` other than ``ignore_index`` is an error naming the file.

    Args:
        root: the folder holding ``dataset.yaml``, ``images/`` and ``labels/``.
        split: a sub-folder of ``images/``; without ``labels/<split>/`` the split is unlabeled.

    The other arguments are those of :class:`~segadapt.data.base.SegDataset`. Names are the
    images' paths under ``images/<split>/`` without the suffix (``cityA/frame``), as ``segadapt predict``
    reads a folder: recursively. A label mirrors its image's path. Images or labels in a format the
    loader does not read are problems of kind ``unsupported_format`` (``missing_files`` policy).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        with_labels: bool = True,
        names: Iterable[str] | None = None,
        split_file: str | Path | None = None,
        size_mismatch: SizeMismatch = "error",
        missing_files: MissingFiles = "error",
    ) -> None:
        root = Path(root)
        classes = read_dataset_yaml(root)
        image_dir, label_dir = self.data_folders(root, split)
        if not image_dir.is_dir():
            raise DataError(f"{image_dir} not found; the splits of {root} are {folder_splits(root)}")
        images: dict[str, Path] = {}
        unsupported: list[Problem] = []
        for path in sorted(p for p in image_dir.rglob("*") if p.is_file()):
            name = path.relative_to(image_dir).with_suffix("").as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                if path.suffix.lower() in UNSUPPORTED_SUFFIXES:
                    detail = f"a {path.suffix} image; convert it to PNG (folder datasets read {', '.join(IMAGE_SUFFIXES)})"
                    unsupported.append(Problem("unsupported_format", str(path), detail))
                continue
            if name in images:
                raise DataError(
                    f"{image_dir}: two images named {name!r} ({images[name].name}, {path.name}); keep one"
                )
            images[name] = path
        if not images:
            raise DataError(f"no .png/.jpg images in {image_dir} or its sub-folders")
        unsupported_images = {Path(problem.path).relative_to(image_dir).with_suffix("").as_posix() for problem in unsupported}
        labeled = label_dir.is_dir()
        labels: dict[str, Path] = {}
        for path in sorted(p for p in label_dir.rglob("*") if p.is_file()) if labeled else ():
            name = path.relative_to(label_dir).with_suffix("").as_posix()
            if path.suffix.lower() == ".png":
                labels[name] = path
            elif path.suffix.lower() in UNSUPPORTED_SUFFIXES and name in images and with_labels:
                unsupported.append(
                    Problem("unsupported_format", str(path), f"a {path.suffix} label; labels are lossless PNG id maps: save it as {name}.png")
                )
        super().__init__(
            [SampleFiles(path, label_dir / f"{name}.png" if labeled else None, name) for name, path in images.items()],
            classes,
            with_labels=with_labels,
            names=names,
            split_file=split_file,
            size_mismatch=size_mismatch,
            missing_files=missing_files,
            orphan_labels={name: path for name, path in labels.items() if name not in images and name not in unsupported_images},
            unsupported=unsupported,
            description=f"{classes.name} {split} ({root})",
        )
        self.root, self.split = root, split

    @classmethod
    def data_folders(cls, root: str | Path, split: str) -> tuple[Path, ...]:
        """``ROOT/images/<split>`` and ``ROOT/labels/<split>`` (:meth:`SegDataset.data_folders`)."""
        return Path(root) / "images" / split, Path(root) / "labels" / split

    def why_unlabelled(self, key: str) -> str:
        labelled = [split for split in folder_splits(self.root) if (self.root / "labels" / split).is_dir()]
        where = f"a labelled split ({', '.join(labelled)})" if labelled else "a labelled split (this dataset has none)"
        return (
            f"split {self.split!r} of {self.root} has no labels (labels/{self.split}/ is absent); add "
            f"labels/{self.split}/<image name>.png train-id maps, or set {key}.split to {where}"
        )
