"""Data-loading throughput of the training loader: images per second against DataLoader workers, in one run.

Two workloads, each through the same path as ``segadapt train`` (dataset from a config's
``data.source`` spec, the config's ``train_transforms``, :func:`build_train_loader`):

- ``benchmark``: the embedded benchmark's source stream (128x256 images) with
  ``configs/benchmark/_base.yaml``'s transforms;
- ``fullres``: a folder dataset of random 2048x1024 PNG images and labels (Cityscapes-sized, written
  once into ``--cache``) with ``configs/gta5_to_cityscapes/cpsl.yaml``'s transforms (resize to
  2048x1024, random scale 0.537-1.611, 896x512 crop, flip): PNG decoding and resizing dominate.

Not run by the tests. Usage::

    python benchmarks/data_loading.py --workers 0 1 2 --batches 20

Prints images/s per worker count and the ratio to the first count.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segadapt.config import load_config
from segadapt.data.transforms import build_transforms
from segadapt.engine.builders import build_dataset_from_spec, build_train_loader

FOLDER_YAML = "name: fullres\nclasses:\n" + "".join(f"  - {{name: c{i}, color: [{i}, {i}, {i}]}}\n" for i in range(19))


def write_fullres_folder(root: Path, count: int) -> Path:
    """``count`` random 2048x1024 image/label pairs in the folder format (reused when present)."""
    images, labels = root / "images" / "train", root / "labels" / "train"
    if len(list(images.glob("*.png"))) >= count:
        return root
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(FOLDER_YAML)
    rng = np.random.default_rng(0)
    for index in range(count):
        # smooth content, so PNG sizes are those of photographs rather than of noise
        small = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
        Image.fromarray(small).resize((2048, 1024), Image.BILINEAR).save(images / f"{index:04d}.png")
        Image.fromarray(rng.integers(0, 19, (32, 64), dtype=np.uint8)).resize((2048, 1024), Image.NEAREST).save(labels / f"{index:04d}.png")
    return root


def workload(name: str, cache: Path, count: int) -> tuple[Any, list[dict[str, Any]], int]:
    if name == "benchmark":
        cfg = load_config("benchmark/source_only")
    else:
        root = write_fullres_folder(cache / "fullres_folder", count)
        cfg = load_config("gta5_to_cityscapes/cpsl", ["data.source.dataset=folder", f"data.source.root={root}", "data.source.split=train"])
    dataset = build_dataset_from_spec(cfg.data.source, with_labels=True)
    return dataset, cfg.data.train_transforms, cfg.data.batch_size


def images_per_second(dataset: Any, transforms: list[dict[str, Any]], batch_size: int, workers: int, batches: int) -> float:
    loader = build_train_loader(dataset, build_transforms(transforms), batch_size, workers, seed=0, start=0)
    stream = iter(loader)
    next(stream)  # worker start-up is not throughput
    start = time.perf_counter()
    for batch in itertools.islice(stream, batches):
        assert batch["image"].shape[0] == batch_size
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["benchmark", "fullres"], choices=["benchmark", "fullres"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--images", type=int, default=24, help="images of the full-resolution folder")
    parser.add_argument("--cache", type=Path, default=Path("runs/data_loading"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in DataLoader workers; the main process only collates here
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {datetime.date.today()}")
    print("| workload | batch | workers | images/s | x first |")
    print("|---|---:|---:|---:|---:|")
    for name in args.workloads:
        dataset, transforms, batch_size = workload(name, args.cache, args.images)
        first = None
        for workers in args.workers:
            rate = images_per_second(dataset, transforms, batch_size, workers, args.batches)
            first = first or rate
            print(f"| {name} | {batch_size} | {workers} | {rate:.1f} | {rate / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
