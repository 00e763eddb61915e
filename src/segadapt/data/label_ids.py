"""Label ids checked before any work: every label file read once, the ids it holds cached by path, size and mtime.

A label id outside the class range is otherwise found only when a batch holding that file is drawn:
at some iteration of a run, never in a short one, or after all training for a validation label.
:func:`check_label_ids` reads every label file of a dataset before a run or an evaluation starts,
in parallel threads (PIL releases the GIL while it decodes), and keeps the ids each file holds in
``$SEGADAPT_HOME/label_ids/`` (one small JSON file per folder of labels), keyed by the file's
path, size and modification time: a later run reads only the files that changed, so a large
dataset is read in full once, not on every start (docs/reliability.md, "Errors come before any work").
The cache holds the raw ids, before any mapping, so one entry serves every class list and policy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..progress import progress
from .base import SegDataset, UnknownLabelIdsError, segadapt_home

CACHE_VERSION = 1
SHOWN = 5
"""Label files a message names (the first, in order); ``segadapt check-data`` lists them all."""
SHOW_PROGRESS = 200
"""Unread label files above which the pass shows progress (a first run on a large dataset)."""


def cache_dir() -> Path:
    """``$SEGADAPT_HOME/label_ids`` (:func:`~segadapt.data.base.segadapt_home`)."""
    return segadapt_home() / "label_ids"


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _cache_file(folder: Path) -> Path:
    return cache_dir() / f"{hashlib.sha1(str(folder).encode()).hexdigest()[:20]}.json"


def _read_cache(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(_cache_file(folder).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("folder") != str(folder):
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_cache(folder: Path, files: dict[str, Any]) -> None:
    """Replace the folder's cache atomically; a cache that cannot be written is only a slower next start."""
    target = _cache_file(folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump({"version": CACHE_VERSION, "folder": str(folder), "files": files}, stream)
        os.replace(temporary, target)
    except OSError:
        pass


def _ids_of(dataset: SegDataset, path: Path) -> list[int]:
    raw = dataset.read_raw_label(path)
    if raw.dtype == np.uint8:
        return np.flatnonzero(np.bincount(raw.ravel(), minlength=256)).tolist()
    return np.unique(raw).tolist()


def label_ids(dataset: SegDataset, paths: Iterable[Path], threads: int | None = None) -> dict[Path, list[int]]:
    """The raw ids each label file in ``paths`` holds, read once and cached by (path, size, mtime).

    A pass over more than :data:`SHOW_PROGRESS` unread files shows a bar (a closing line in a log file).

    Raises:
        DataError: a label file cannot be read (naming it), as when it is loaded.
    """
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        path = Path(path).absolute()
        by_folder.setdefault(path.parent, []).append(path)
    found: dict[Path, list[int]] = {}
    caches: dict[Path, dict[str, Any]] = {}
    todo: list[tuple[Path, list[int]]] = []
    for folder, files in by_folder.items():
        cached = caches[folder] = _read_cache(folder)
        for path in files:
            stamp, entry = _stamp(path), cached.get(path.name)
            if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("ids"), list):
                found[path] = entry["ids"]
            else:
                todo.append((path, stamp))
    if not todo:
        return found
    bar = progress(
        total=len(todo), desc="label ids", unit="file", done="read the label ids of {n} files in {elapsed} (kept for later runs)"
    ) if len(todo) > SHOW_PROGRESS else None  # fmt: skip
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        for (path, stamp), ids in zip(todo, pool.map(lambda job: _ids_of(dataset, job[0]), todo)):
            found[path] = ids
            caches[path.parent][path.name] = {"stamp": stamp, "ids": ids}
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    for folder in {path.parent for path, _ in todo}:
        _write_cache(folder, caches[folder])
    return found


def check_label_ids(dataset: Any, key: str, threads: int | None = None) -> None:
    """Fail before any work when a label file of ``dataset`` holds ids its label format does not define.

    Only for datasets that would fail on such a file when loading it: train-id labels (an id
    ``>= num_classes`` other than the ignore index is always an error) and raw-id formats under
    ``unknown_ids: error``. Other datasets (pseudo labels, which segadapt wrote) pass unchecked.

    Raises:
        UnknownLabelIdsError: naming ``key``, the first files and their ids, and the fix.
    """
    if not isinstance(dataset, SegDataset) or (dataset.label_map is not None and dataset.unknown_ids != "error"):
        return
    paths = [item.label for item in dataset.items if item.label is not None]
    bad = []
    for path, ids in label_ids(dataset, paths, threads).items():
        unknown = dataset.unknown_ids_in(np.asarray(ids, dtype=np.int64))
        if unknown:
            bad.append((path, unknown))
    if not bad:
        return
    classes = dataset.classes
    shown = "; ".join(f"{path} holds {ids[:10]}" for path, ids in sorted(bad)[:SHOWN])
    more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    if dataset.label_map is None:
        valid = f"train ids 0..{classes.num_classes - 1} and {classes.ignore_index} (ignore)"
        fix = "fix the label files, or the class list of the dataset"
    else:
        valid = "the ids of its label format"
        fix = f"fix the label files, or set {key}.options.unknown_ids=ignore to map those ids to {classes.ignore_index}"
    root = getattr(dataset, "root", None)
    check = f"`segadapt check-data {root}`" if isinstance(root, Path) and (root / "dataset.yaml").is_file() else "`segadapt check-data`"
    raise UnknownLabelIdsError(
        f"{key}: {len(bad)} of {len(paths)} label files of {dataset.description} hold ids outside {valid}: "
        f"{shown}{more}; {fix} ({check} lists every file)"
    )
