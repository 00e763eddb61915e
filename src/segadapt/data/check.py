"""``segadapt check-data``: read every file of a dataset once and report what is wrong with it.

The report lists each problem with its file (missing pairs, unreadable files, image/label size
mismatches, label ids the format does not define, items the loader skipped) and the class
pixel distribution, so a download can be validated before hours of training. Pixels are counted
by :func:`segadapt.data.classes.class_pixel_counts`, the one counter of segadapt (re-exported
here and as ``segadapt.data.class_pixel_counts``).

Examples:
    >>> print(format_report(check_dataset(build_dataset("gta5", "/data/gta5", "all"))))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DataError
from . import base as base_module
from .base import CHECK_DATA_HINT, Problem, SegDataset
from .classes import ClassInfo, class_pixel_counts
from .folder import FolderDataset, folder_splits, read_dataset_yaml
from .registry import DATASETS, build_dataset

logger = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``class_pixels[c]`` counts label pixels of train id ``c``
    at the labels' own resolution; ``ignored_pixels`` counts the rest."""

    description: str
    classes: ClassInfo
    num_images: int = 0
    num_labels: int = 0
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignored_pixels: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(dataset: SegDataset, log_every: int = 500) -> CheckReport:
    """Read every item of ``dataset`` (no transforms) and collect its problems and class counts.

    Unknown label ids are a problem under either ``unknown_ids`` policy (with the policy in
    the detail), and are counted as ignored. A size mismatch is a problem even where the
    dataset's ``size_mismatch`` policy resizes it.
    """
    classes = dataset.classes
    report = CheckReport(
        dataset.description, classes, class_pixels=np.zeros(classes.num_classes, dtype=np.int64)
    )
    report.problems.extend(dataset.skipped)
    for index, item in enumerate(dataset.items):
        if log_every and index and index % log_every == 0:
            logger.info("checked %d/%d items of %s", index, len(dataset), dataset.description)
        report.num_images += 1
        try:
            image_shape = dataset.load_image(index).shape[:2]
        except DataError as error:
            report.problems.append(Problem("unreadable", str(item.image), _detail(error)))
            image_shape = None
        if item.label is None:
            continue
        try:
            raw = dataset.read_raw_label(item.label)
        except DataError as error:
            report.problems.append(Problem("unreadable", str(item.label), _detail(error)))
            continue
        report.num_labels += 1
        _check_label(dataset, item.label, raw, image_shape, report)
    return report


def _detail(error: DataError) -> str:
    """A loader's message as a problem of the report: without the hint to run check-data, which is running."""
    return str(error).replace(CHECK_DATA_HINT, "")


def unknown_ids_fix(dataset: SegDataset) -> str:
    """How to resolve label ids a dataset does not define, for its kind of labels.

    Train-id labels (a folder dataset) have no other meaning to map from: the file or the class list is wrong.
    A raw-id format may hold ids its table lacks; ``options.unknown_ids=ignore`` maps them to the ignore index.
    """
    classes = dataset.classes
    if dataset.label_map is None:
        return (
            f"train ids are 0..{classes.num_classes - 1} and {classes.ignore_index} (ignore): relabel those pixels to a "
            f"class or to {classes.ignore_index}, or add the missing classes to the dataset's class list"
        )
    if dataset.unknown_ids == "error":
        return f"an error when loading; set {dataset.config_key}.options.unknown_ids=ignore to map them to ignore ({classes.ignore_index})"
    return f"mapped to ignore ({classes.ignore_index}) when loading (unknown_ids=ignore)"


def _check_label(
    dataset: SegDataset, path: Path, raw: np.ndarray, image_shape: tuple[int, ...] | None, report: CheckReport
) -> None:
    unknown = dataset.unknown_ids_in(raw)
    if unknown:
        report.problems.append(Problem("unknown_ids", str(path), f"ids {unknown[:20]} not in the label format; {unknown_ids_fix(dataset)}"))
    label = dataset.to_train_ids(raw, path, unknown_ids="ignore")
    if image_shape is not None and image_shape != label.shape:
        report.problems.append(
            Problem(
                "size_mismatch",
                str(path),
                f"label is {label.shape[1]}x{label.shape[0]} (WxH), image is {image_shape[1]}x{image_shape[0]} "
                f"(size_mismatch={dataset.size_mismatch!r} when loading)",
            )
        )
    # unknown ids are mapped to ignore above (unknown_ids="ignore"), so the counter never refuses them
    counts = class_pixel_counts(label, report.classes.num_classes, report.classes.ignore_index).numpy()
    report.class_pixels += counts
    report.ignored_pixels += int(label.size - counts.sum())


def format_report(report: CheckReport) -> str:
    """A plain-text report: counts, every problem with its file, and the class pixel distribution."""
    lines = [f"{report.description}: {report.num_images} images, {report.num_labels} labels"]
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines += [f"  [{p.kind}] {p.path}: {p.detail}" for p in report.problems]
    else:
        lines.append("no problems found")
    total = int(report.class_pixels.sum())
    if report.num_labels:
        all_pixels = total + report.ignored_pixels
        ignored_share = 100.0 * report.ignored_pixels / all_pixels if all_pixels else 0.0
        lines.append(
            f"class pixels ({report.classes.num_classes} classes; {report.ignored_pixels:,} ignored pixels = "
            f"{ignored_share:.2f}% of all; percent of labelled pixels):"
        )
        width = max(len(name) for name in report.classes.names)
        for class_id, (name, pixels) in enumerate(zip(report.classes.names, report.class_pixels)):
            share = 100.0 * pixels / total if total else 0.0
            lines.append(f"  {class_id:>3} {name:<{width}} {int(pixels):>15,} {share:8.3f}%")
    return "\n".join(lines)


def check_folder_root(root: str | Path, **options: Any) -> list[CheckReport]:
    """Check every split of a folder dataset (``segadapt check-data PATH``).

    Missing pairs are reported, not raised (``missing_files='skip'``); ``options`` go to
    :class:`~segadapt.data.folder.FolderDataset`.

    Raises:
        DataError: ``dataset.yaml`` is invalid, or there is no ``images/<split>/`` folder.
    """
    read_dataset_yaml(root)
    splits = folder_splits(root)
    if not splits:
        raise DataError(f"{Path(root) / 'images'} holds no split folders (images/<split>/)")
    options.setdefault("missing_files", "skip")
    with _quiet_skips():
        return [check_dataset(FolderDataset(root, split, **options)) for split in splits]


def check_named_dataset(
    name: str, root: str | Path, splits: Sequence[str] | None = None, **options: Any
) -> list[CheckReport]:
    """Check splits of a registered dataset (``segadapt check-data --dataset NAME --root PATH [--split S]``).

    Without ``splits``, the dataset's labelled splits (``default_splits``: e.g. train and val
    of Cityscapes, ``all`` of GTA5; every split of a folder dataset). Missing pairs are
    reported, not raised (``missing_files='skip'``).
    """
    if name == "folder" and not splits:
        return check_folder_root(root, **options)
    if name in DATASETS and not splits:
        splits = DATASETS[name].default_splits
    options.setdefault("missing_files", "skip")
    with _quiet_skips():
        return [check_dataset(build_dataset(name, root, split, **options)) for split in splits or ()]


@contextlib.contextmanager
def _quiet_skips() -> Iterator[None]:
    """Without the loader's warning "skipped N item(s) ... (`segadapt check-data` lists them all)": the report lists them."""
    base_logger = logging.getLogger(base_module.__name__)
    level = base_logger.level
    base_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        base_logger.setLevel(level)
