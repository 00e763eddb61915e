"""Generating the benchmark: its sizes, one image per seed, the folder tree, and the cache.

Every image is drawn from its own seed (benchmark seed, domain, split, index), so a benchmark is
identical whatever the number of worker processes. :func:`generate_benchmark` writes a tree
atomically; :func:`ensure_benchmark` reuses a complete copy (by default in the cache,
:func:`default_benchmark_dir`) and generates it only when it is missing, partial or outdated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from ...errors import DataError
from ...progress import progress
from ..base import segadapt_home
from ..classes import IGNORE_INDEX
from .domains import _DOMAINS
from .scene import CLASSES, sample_scene
from .style import render

# Bump whenever the generated pixels change, so cached copies of older versions are not reused.
GENERATOR_VERSION = 3

SPLITS: tuple[tuple[str, str], ...] = (("source", "train"), ("target", "train"), ("target", "val"))


@dataclass(frozen=True)
class BenchmarkSize:
    """Image size (height, width) and the number of images of each split."""

    height: int
    width: int
    source_train: int
    target_train: int
    target_val: int

    def count(self, domain: str, split: str) -> int:
        return getattr(self, f"{domain}_{split}")


SIZES: dict[str, BenchmarkSize] = {
    "tiny": BenchmarkSize(height=32, width=64, source_train=6, target_train=4, target_val=3),
    "default": BenchmarkSize(height=128, width=256, source_train=500, target_train=400, target_val=150),
}


# --------------------------------------------------------------------------------------------
# Generation, caching and statistics.
# --------------------------------------------------------------------------------------------


def sample_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of generation order and worker count."""
    domain_id = [d for d, _ in SPLITS].index(domain)
    split_id = ["train", "val"].index(split)
    return np.random.default_rng(np.random.SeedSequence([seed, domain_id, split_id, index]))


def generate_sample(seed: int, domain: str, split: str, index: int, size: str = "default") -> tuple[np.ndarray, np.ndarray]:
    """One image and its label: ``([H, W, 3] uint8 RGB, [H, W] uint8 train ids / 255)``."""
    shape = _size(size)
    prior, style = _DOMAINS[domain]
    rng = sample_rng(seed, domain, split, index)
    canvas = sample_scene(shape.height, shape.width, prior, rng)
    return render(canvas, style, rng), canvas.label


def _write_sample(job: tuple[Path, int, str, str, int, str]) -> np.ndarray:
    root, seed, domain, split, index, size = job
    image, label = generate_sample(seed, domain, split, index, size)
    stem = f"{domain}_{split}_{index:04d}"
    Image.fromarray(image, mode="RGB").save(root / domain / "images" / split / f"{stem}.png")
    Image.fromarray(label, mode="L").save(root / domain / "labels" / split / f"{stem}.png")
    return np.bincount(label.ravel(), minlength=256).astype(np.int64)


def _size(size: str) -> BenchmarkSize:
    if size not in SIZES:
        raise DataError(f"unknown benchmark size {size!r}; choose one of {sorted(SIZES)} (e.g. --size tiny)")
    return SIZES[size]


def _dataset_yaml(domain: str) -> str:
    description = {
        "source": "embedded benchmark, source domain (synthetic look)",
        "target": "embedded benchmark, target domain (real look; train labels are for the oracle only)",
    }[domain]
    content = {
        "name": f"benchmark-{domain}",
        "description": description,
        "ignore_index": IGNORE_INDEX,
        "classes": [{"name": name, "color": list(color)} for name, color in zip(CLASSES.names, CLASSES.colors)],
    }
    return yaml.safe_dump(content, sort_keys=False)


def _write_tree(root: Path, seed: int, size: str, num_workers: int) -> None:
    shape = _size(size)
    jobs = []
    for domain, split in SPLITS:
        for kind in ("images", "labels"):
            (root / domain / kind / split).mkdir(parents=True, exist_ok=True)
        jobs += [(root, seed, domain, split, i, size) for i in range(shape.count(domain, split))]
    for domain in ("source", "target"):
        (root / domain / "dataset.yaml").write_text(_dataset_yaml(domain))
    # a bar in a terminal, one "generated N images in MM:SS" line in a log file
    shown: dict[str, Any] = {
        "total": len(jobs), "desc": f"benchmark ({size})", "unit": "img", "done": f"benchmark ({size}): generated {{n}} images in {{elapsed}}"
    }
    if num_workers > 0:
        with get_context("spawn").Pool(num_workers) as pool:
            histograms = list(progress(pool.imap(_write_sample, jobs, chunksize=8), **shown))
    else:
        histograms = list(progress(map(_write_sample, jobs), **shown))
    summary = _summary(seed, size, shape, jobs, histograms)
    (root / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")


def _summary(seed: int, size: str, shape: BenchmarkSize, jobs: list, histograms: list[np.ndarray]) -> dict:
    totals: dict[str, np.ndarray] = {}
    for (_, _, domain, split, _, _), histogram in zip(jobs, histograms):
        key = f"{domain}/{split}"
        totals[key] = totals.get(key, 0) + histogram
    distribution, ignored = {}, {}
    for key, histogram in totals.items():
        labelled = histogram[: CLASSES.num_classes].sum()
        distribution[key] = {name: round(float(histogram[i] / labelled), 6) for i, name in enumerate(CLASSES.names)}
        ignored[key] = round(float(histogram[IGNORE_INDEX] / histogram.sum()), 6)
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "image_size": [shape.height, shape.width],
        "counts": {f"{d}/{s}": shape.count(d, s) for d, s in SPLITS},
        "class_distribution": distribution,
        "ignored_fraction": ignored,
    }


def generate_benchmark(
    root: str | Path, seed: int = 0, size: str = "default", num_workers: int = 0, replace_complete: bool = True
) -> Path:
    """Generate the benchmark into ``root`` and return it.

    The tree is written to a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a directory that looks complete. An existing benchmark at
    ``root`` is replaced; any other non-empty directory is refused.

    Args:
        root: destination directory.
        seed: the benchmark seed; the same seed gives byte-identical files.
        size: ``"default"`` (the published calibration) or ``"tiny"`` (tests).
        num_workers: worker processes (0 generates in this process).
        replace_complete: ``False`` keeps a complete benchmark of this seed, size and version that
            another process put at ``root`` while this one was generating (it may be reading it
            already) and discards this copy.
    """
    root = Path(root).expanduser()
    _size(size)
    if root.exists() and any(root.iterdir()) and not _looks_like_benchmark(root):
        raise DataError(
            f"{root} is not empty and is not a segadapt benchmark; pass a new or empty directory as --root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_tree(staging, seed, size, num_workers)
        if not replace_complete and is_complete(root, seed, size):
            shutil.rmtree(staging)
            return root
        if root.exists():
            shutil.rmtree(root)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _looks_like_benchmark(root: Path) -> bool:
    """Only our own names at the top level: safe to delete and regenerate."""
    return {p.name for p in root.iterdir()} <= {"benchmark.json", "source", "target"}


def is_complete(root: Path, seed: int, size: str) -> bool:
    """Whether ``root`` holds a finished benchmark of this seed, size and generator version."""
    try:
        summary = json.loads((root / "benchmark.json").read_text())
    except (OSError, ValueError):
        return False
    if (summary.get("generator_version"), summary.get("seed"), summary.get("size")) != (GENERATOR_VERSION, seed, size):
        return False
    shape = _size(size)
    for domain, split in SPLITS:
        for kind in ("images", "labels"):
            folder = root / domain / kind / split
            if not folder.is_dir() or len(list(folder.glob("*.png"))) != shape.count(domain, split):
                return False
    return all((root / domain / "dataset.yaml").is_file() for domain in ("source", "target"))


def default_benchmark_dir(seed: int = 0, size: str = "default") -> Path:
    """``$SEGADAPT_HOME/benchmark/<size>-seed<seed>-v<version>`` (:func:`~segadapt.data.base.segadapt_home`)."""
    return segadapt_home() / "benchmark" / f"{size}-seed{seed}-v{GENERATOR_VERSION}"


def ensure_benchmark(root: str | Path | None = None, seed: int = 0, size: str = "default", num_workers: int = 0) -> Path:
    """Return a complete benchmark at ``root`` (default: the cache), generating it only if needed.

    A missing, partial or outdated copy is regenerated. When several processes (e.g. the
    ranks of a distributed run, or two trainings started together on a fresh machine) race, each
    generates into its own temporary directory, the first rename wins and the later ones keep the
    winner's tree, which the first process may already be reading.
    """
    root = Path(root).expanduser() if root is not None else default_benchmark_dir(seed, size)
    if is_complete(root, seed, size):
        return root
    try:
        return generate_benchmark(root, seed, size, num_workers, replace_complete=False)
    except OSError:
        if is_complete(root, seed, size):  # another process finished first
            return root
        raise
