"""Check a network on real photographs: a mosaic dataset cut from the photos scikit-image ships.

The embedded benchmark is rendered; a change to SmallSegNet that helps there may hurt on real
images, whose statistics (textures, noise, lighting) no generator copies. This script builds a
folder dataset (docs/datasets/folder.md) of real photographs and trains the target-supervised
oracle on it, so that two networks can be compared on real pixels.

The dataset: eleven photographs from ``skimage.data`` are the eleven classes (brick, grass,
gravel, moon, camera, coins, astronaut, chelsea, coffee, rocket, hubble). Each image is a
Voronoi mosaic of 3 to 7 cells; a cell shows a crop of one class's photograph (rescaled by 0.6 to
1.4, so texture scale varies) and is labelled with that class. Training images cut their crops
from the left 65 % of each photograph, validation images from the right 35 %: no validation pixel
was seen in training. It is a texture-segmentation task in the tradition of the Brodatz mosaics:
a pixel's class is decided by the local statistics of a real photograph, which is what a
segmentation network's features must describe. Five of the photographs are grey, six colour.

Build it, then train the oracle with each network::

    pip install scikit-image          # the photographs; segadapt itself does not need it
    python benchmarks/real_photos.py make --output runs/real_photos/data
    python benchmarks/real_photos.py train --data runs/real_photos/data --output runs/real_photos \\
        --seeds 0 1 --variant signed --variant relu model.options.embedding=relu

``train`` runs ``segadapt train benchmark/oracle`` with the data swapped for the mosaics (target
and validation streams, the crop size set to the images' 128x128), one run per variant and seed,
and prints a table of mIoU. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_table import train as train_run  # noqa: E402  (the runner every benchmark table uses)

PHOTOS = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "camera",
    "coins",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
)
SIZE = 128
TRAIN_FRACTION = 0.65
IGNORE_INDEX = 255  # unused by the mosaics (every pixel has a class); written to dataset.yaml


def load_photos(grey: bool = False) -> list[np.ndarray]:
    """The photographs as RGB uint8 arrays, grey ones replicated to three channels (all grey with ``grey``)."""
    try:
        import skimage.data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit("this script needs scikit-image for its photographs: pip install scikit-image") from error
    photos = []
    for name in PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        if grey and photo.ndim == 3:
            photo = np.rint(photo[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        photos.append(photo[..., :3].astype(np.uint8))
    return photos


def photo_region(photo: np.ndarray, split: str) -> np.ndarray:
    """The columns a split may cut from: the left part for training, the right for validation."""
    cut = int(photo.shape[1] * TRAIN_FRACTION)
    return photo[:, :cut] if split == "train" else photo[:, cut:]


def random_crop(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ``SIZE x SIZE`` crop of the region at a random scale in [0.6, 1.4]."""
    height, width = region.shape[:2]
    scale = rng.uniform(0.6, 1.4)
    scale = max(scale, SIZE / min(height, width))  # the crop must fit inside the region
    image = Image.fromarray(region).resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    array = np.asarray(image)
    top = int(rng.integers(0, array.shape[0] - SIZE + 1))
    left = int(rng.integers(0, array.shape[1] - SIZE + 1))
    return array[top : top + SIZE, left : left + SIZE]


def mosaic(regions: list[np.ndarray], rng: np.random.Generator, max_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """One Voronoi mosaic image of 3 to ``max_cells`` cells, and its label map."""
    cells = int(rng.integers(3, max_cells + 1))
    centres = rng.uniform(0, SIZE, size=(cells, 2))
    classes = rng.choice(len(regions), size=cells, replace=cells > len(regions))
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    distance = (rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
    owner = distance.argmin(axis=0)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for cell, class_id in enumerate(classes):
        inside = owner == cell
        image[inside] = random_crop(regions[class_id], rng)[inside]
    return image, classes[owner].astype(np.uint8)


def make(output: Path, train_images: int, val_images: int, seed: int, grey: bool = False, max_cells: int = 7) -> None:
    """Write the folder dataset (``dataset.yaml``, ``images/<split>``, ``labels/<split>``)."""
    if output.exists() and any(output.iterdir()):
        raise SystemExit(f"{output} is not empty: give a new folder (this command never writes over files)")
    photos = load_photos(grey)
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1).integers(0, 256, size=(len(PHOTOS), 3))
    classes = "\n".join(f"  - {{name: {name}, color: {list(map(int, colour))}}}" for name, colour in zip(PHOTOS, palette))
    output.mkdir(parents=True, exist_ok=True)
    (output / "dataset.yaml").write_text(
        "name: real-photo-mosaics\n"
        "description: Voronoi mosaics of scikit-image's photographs (benchmarks/real_photos.py)\n"
        f"ignore_index: {IGNORE_INDEX}\nclasses:\n{classes}\n"
    )
    for split, count in (("train", train_images), ("val", val_images)):
        regions = [photo_region(photo, split) for photo in photos]
        (output / "images" / split).mkdir(parents=True)
        (output / "labels" / split).mkdir(parents=True)
        for index in range(count):
            image, label = mosaic(regions, rng, max_cells)
            Image.fromarray(image).save(output / "images" / split / f"{index:04d}.png")
            Image.fromarray(label, mode="L").save(output / "labels" / split / f"{index:04d}.png")
    print(f"wrote {train_images} training and {val_images} validation mosaics to {output}")


def train(data: Path, output: Path, seeds: list[int], variants: list[list[str]], threads: int, iters: int | None) -> None:
    """Train ``benchmark/oracle`` on the mosaics for each variant and seed; print the mIoU table."""
    streams = [
        f"data.target={{dataset: folder, root: {data.resolve()}, split: train}}",
        f"data.val={{dataset: folder, root: {data.resolve()}, split: val}}",
        "data.source=null",
        f"data.crop_size=[{SIZE},{SIZE}]",
    ]
    if iters is not None:
        streams.append(f"train.iters={iters}")
    scores: dict[str, list[float]] = {}
    for label, *overrides in variants:
        for seed in seeds:
            final, _ = train_run("benchmark/oracle", output, seed, [*streams, *overrides], threads, label)
            scores.setdefault(label, []).append(100 * final["miou"])
    print("\n| network | mIoU per seed | mean |\n|---|---|---|")
    for label, values in scores.items():
        print(f"| {label} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.mean(values):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write the mosaic folder dataset")
    make_parser.add_argument("--output", type=Path, required=True, help="a new, empty folder")
    make_parser.add_argument("--train-images", type=int, default=400, help="training mosaics (default 400)")
    make_parser.add_argument("--val-images", type=int, default=100, help="validation mosaics (default 100)")
    make_parser.add_argument("--seed", type=int, default=0, help="seed of the mosaics' layout (default 0)")
    make_parser.add_argument("--grey", action="store_true", help="every photograph in grey: texture alone tells the classes")
    make_parser.add_argument("--max-cells", type=int, default=7, help="most cells per mosaic (default 7; more: smaller regions)")
    train_parser = commands.add_parser("train", help="train the oracle on the mosaics for each variant")
    train_parser.add_argument("--data", type=Path, required=True, help="the folder `make` wrote")
    train_parser.add_argument("--output", type=Path, required=True, help="folder for the runs")
    train_parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    train_parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar="LABEL_AND_OVERRIDES",
        help="a label then config overrides, e.g. --variant relu model.options.embedding=relu (repeatable)",
    )
    train_parser.add_argument("--threads", type=int, default=1, help="OMP threads per run (default 1)")
    train_parser.add_argument("--iters", type=int, default=None, help="override benchmark/oracle's iterations")
    args = parser.parse_args()
    if args.command == "make":
        make(args.output, args.train_images, args.val_images, args.seed, args.grey, args.max_cells)
    else:
        train(args.data, args.output, args.seeds, args.variant or [["default"]], args.threads, args.iters)


if __name__ == "__main__":
    main()
