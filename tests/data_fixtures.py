"""Tiny dataset trees in the real on-disk formats (the "Layout" and "Labels" sections of each page
in docs/datasets/), with the values a correct loader must return.

The expected train ids are computed here from the tables of those pages, typed again on
purpose rather than imported from segadapt, so the tests compare the loaders with the spec.
The end of the file holds the config overrides the end-to-end tests share (:data:`TINY`,
:data:`FAST`, :func:`tiny_config`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segadapt.config import RunConfig, load_config

# docs/datasets/cityscapes.md, "Labels": Cityscapes label id -> train id (GTA5 labels use the same ids).
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                          25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# docs/datasets/synthia.md, "Labels": SYNTHIA id -> 19-way train id (DAFormer dict) and the compact 16-way ids.
SYNTHIA_ID_TO_TRAIN19 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
                         8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
SYNTHIA_ID_TO_TRAIN16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12,
                         19: 13, 12: 14, 11: 15}
# docs/datasets/scannet.md, "Labels": the 20 ScanNet benchmark classes as NYU40 ids, in train-id order.
SCANNET_VALID_NYU40 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]

# Rows of scannetv2-labels.combined.tsv (real header; nyu40 ids as listed in docs/datasets/scannet.md, "Labels").
SCANNET_TSV = (
    "id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class\teigen13class\tModelNet40\t"
    "ModelNet10\tShapeNetCore55\tsynsetoffset\twnsynsetid\twnsynsetkey\tmpcat40\tmpcat40index\n"
    "1\twall\twall\t8277\t1\t12\twall\twall\tWall\t\t\t\t\tn04546855\twall.n.01\twall\t1\n"
    "2\tchair\tchair\t4646\t5\t4\tchair\tchair\tChair\tchair\tchair\tchair\t03001627\tn03001627\tchair.n.01\tchair\t3\n"
    "3\tfloor\tfloor\t2953\t2\t5\tfloor\tfloor\tFloor\t\t\t\t\tn03365592\tfloor.n.01\tfloor\t2\n"
    "9\tdesk\tdesk\t680\t14\t10\tdesk\tdesk\tTable\tdesk\tdesk\ttable\t04379243\tn03179701\tdesk.n.01\ttable\t5\n"
    "14\tsink\tsink\t488\t34\t7\tsink\tsink\tObjects\tsink\t\t\t\tn04223580\tsink.n.01\tsink\t15\n"
    "22\tbooks\tbook\t318\t23\t2\tbook\tbooks\tBooks\t\t\t\t\tn02870526\tbook.n.11\tobjects\t39\n"
    "1163\tobject\tobject\t1\t40\t7\t\totherprop\tObjects\t\t\t\t\tn00002684\tobject.n.01\tobjects\t39\n"
)
SCANNET_RAW_TO_NYU40 = {1: 1, 2: 5, 3: 2, 9: 14, 14: 34, 22: 23, 1163: 40}  # the rows above; others -> 0


def lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    table = np.full(size, 255, dtype=np.int64)
    for key, value in mapping.items():
        table[key] = value
    return table


def scannet_nyu40_lut() -> np.ndarray:
    return lut({nyu: train for train, nyu in enumerate(SCANNET_VALID_NYU40)}, 41)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_png16(path: Path, array: np.ndarray) -> None:
    """Write a 16-bit gray (``[H, W]``) or RGB/RGBA (``[H, W, 3|4]``) PNG, as cv2.imwrite does.

    Rows cycle through the five PNG filters (none, sub, up, average, paeth), so a reader is
    checked on all of them, as a real encoder (libpng) picks them adaptively.
    """
    array = array if array.ndim == 3 else array[..., None]
    height, width, channels = array.shape
    data = array.astype(">u2").view(np.uint8).reshape(height, width * channels * 2).astype(np.int64)
    pixel_bytes = channels * 2
    rows, previous = [], np.zeros(data.shape[1], dtype=np.int64)
    for y in range(height):
        current, filter_type = data[y], y % 5
        left = np.concatenate([np.zeros(pixel_bytes, np.int64), current[:-pixel_bytes]])
        up_left = np.concatenate([np.zeros(pixel_bytes, np.int64), previous[:-pixel_bytes]])
        if filter_type == 0:
            predicted = np.zeros_like(current)
        elif filter_type == 1:
            predicted = left
        elif filter_type == 2:
            predicted = previous
        elif filter_type == 3:
            predicted = (left + previous) // 2
        else:
            estimate = left + previous - up_left
            a, b, c = np.abs(estimate - left), np.abs(estimate - previous), np.abs(estimate - up_left)
            predicted = np.where((a <= b) & (a <= c), left, np.where(b <= c, previous, up_left))
        rows.append(bytes([filter_type]) + ((current - predicted) % 256).astype(np.uint8).tobytes())
        previous = current

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    color_type = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def save(array: np.ndarray, path: Path, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette.astype(np.uint8).ravel().tolist())  # an 'L' image becomes mode 'P'
    image.save(path)


@dataclass
class Tree:
    """A written dataset: its root and, per item name, the image and the train ids a loader must return."""

    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    raw: dict[str, np.ndarray] = field(default_factory=dict)


def cityscapes_ids(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    ids = rng.choice(np.arange(34), size=(height, width)).astype(np.uint8)
    ids[0, :3] = (9, 29, 7)  # parking and caravan (ignored), road
    ids[-2:] = 1  # the ego vehicle at the bottom
    return ids


def make_cityscapes(root: Path, seed: int = 0) -> Tree:
    """``leftImg8bit``/``gtFine`` with labelIds, labelTrainIds and a colour PNG, 32x16 (2:1)."""
    rng, tree = np.random.default_rng(seed), Tree(root)
    frames = {"train": ["aachen_000000_000019", "aachen_000001_000123", "bochum_000000_000019"],
              "val": ["frankfurt_000001_007973"]}
    table = lut(CITYSCAPES_ID_TO_TRAIN)
    for split, names in frames.items():
        for name in names:
            city = name.split("_")[0]
            image, ids = random_image(rng, 16, 32), cityscapes_ids(rng, 16, 32)
            save(image, root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            label_dir = root / "gtFine" / split / city
            save(ids, label_dir / f"{name}_gtFine_labelIds.png")
            save(table[ids].astype(np.uint8), label_dir / f"{name}_gtFine_labelTrainIds.png")
            Image.new("RGBA", (32, 16), (128, 64, 128, 255)).save(label_dir / f"{name}_gtFine_color.png")
            tree.images[name], tree.labels[name], tree.raw[name] = image, table[ids], ids
    return tree


def gta_palette() -> np.ndarray:
    """A palette whose colours are not the indices, so decoding colours instead of indices shows."""
    palette = np.zeros((256, 3), dtype=np.int64)
    palette[:, 0] = (np.arange(256) * 7 + 20) % 256
    palette[:, 1] = 200
    return palette


def make_gta5(root: Path, seed: int = 1) -> Tree:
    """``images/NNNNN.png`` + mode-P ``labels/NNNNN.png`` (32x18), with the quirks of docs/datasets/gta5.md,
    "Options and defaults":

    - ``00001``, ``00002``: regular; ids 0, 7, 26, 33 and 34 (outside the table) present;
    - ``00003``: label 32x17 for a 32x18 image (as frames 20801-20860);
    - ``00004``: a label without its image; ``00005``: an image without its label;
    - ``15188``: a known bad frame.
    """
    rng, tree = np.random.default_rng(seed), Tree(root)
    table = lut(CITYSCAPES_ID_TO_TRAIN)
    for name, label_height, has_image, has_label in [
        ("00001", 18, True, True), ("00002", 18, True, True), ("00003", 17, True, True),
        ("00004", 18, False, True), ("00005", 18, True, False), ("15188", 18, True, True),
    ]:
        image = random_image(rng, 18, 32)
        ids = rng.choice(np.arange(35), size=(label_height, 32)).astype(np.uint8)
        ids[0, :5] = (0, 7, 26, 33, 34)
        if has_image:
            save(image, root / "images" / f"{name}.png")
            tree.images[name] = image
        if has_label:
            save(ids, root / "labels" / f"{name}.png", palette=gta_palette())
            tree.labels[name], tree.raw[name] = table[ids], ids
    return tree


def make_synthia(root: Path, seed: int = 2) -> Tree:
    """``RGB/NNNNNNN.png`` + 16-bit 3-channel ``GT/LABELS/NNNNNNN.png`` (32x19, about 1.68:1):
    class id in R, instance id (> 255, so the high byte is non-zero) in G."""
    rng, tree = np.random.default_rng(seed), Tree(root)
    for name in ("0000000", "0000001"):
        image = random_image(rng, 19, 32)
        classes = rng.choice(np.arange(23), size=(19, 32)).astype(np.uint16)
        classes[0, :7] = (0, 13, 14, 22, 16, 18, 20)
        instances = rng.integers(256, 4000, size=(19, 32)).astype(np.uint16)
        save(image, root / "RGB" / f"{name}.png")
        write_png16(root / "GT" / "LABELS" / f"{name}.png", np.stack([classes, instances, np.zeros_like(classes)], -1))
        tree.images[name], tree.raw[name] = image, classes
        tree.labels[name] = lut(SYNTHIA_ID_TO_TRAIN19)[classes]
    return tree


def make_scannet_25k(root: Path, seed: int = 3) -> Tree:
    """``scannet_frames_25k``-style scenes: ``color/NNNNNN.jpg`` (40x30, 4:3) and 8-bit NYU40
    ``label/NNNNNN.png``; ``scene0000_00/000100`` has a 20x15 label; scene lists for train/val."""
    rng, tree = np.random.default_rng(seed), Tree(root)
    table = scannet_nyu40_lut()
    for scene, frame, label_size in [("scene0000_00", "000000", (30, 40)), ("scene0000_00", "000100", (15, 20)),
                                     ("scene0001_00", "000000", (30, 40))]:
        image = random_image(rng, 30, 40)
        ids = rng.choice(np.arange(41), size=label_size).astype(np.uint8)
        ids[0, :7] = (0, 1, 2, 13, 22, 39, 40)
        save(image, root / scene / "color" / f"{frame}.jpg")
        save(ids, root / scene / "label" / f"{frame}.png")
        name = f"{scene}/{frame}"
        with Image.open(root / scene / "color" / f"{frame}.jpg") as decoded:  # JPEG is lossy: compare decoded
            tree.images[name] = np.array(decoded.convert("RGB"))
        tree.labels[name], tree.raw[name] = table[ids], ids
    (root / "scannetv2_train.txt").write_text("scene0000_00\n")
    (root / "scannetv2_val.txt").write_text("scene0001_00\n")
    return tree


def make_scannet_raw(root: Path, seed: int = 4) -> Tree:
    """Raw exports: ``color/<i>.jpg`` (40x30) and 16-bit raw-id ``label-filt/<i>.png`` (20x15),
    with an excerpt of ``scannetv2-labels.combined.tsv``; id 1357 is absent from it."""
    rng, tree = np.random.default_rng(seed), Tree(root)
    to_train = scannet_nyu40_lut()
    raw_ids = np.array([0, 1, 2, 3, 9, 14, 22, 1163, 1357], dtype=np.uint16)
    expected_of_raw = {raw: to_train[SCANNET_RAW_TO_NYU40.get(raw, 0)] for raw in raw_ids.tolist()}
    for frame in ("0", "20"):
        image = random_image(rng, 30, 40)
        ids = rng.choice(raw_ids, size=(15, 20)).astype(np.uint16)
        save(image, root / "scene0002_00" / "color" / f"{frame}.jpg")
        save(ids, root / "scene0002_00" / "label-filt" / f"{frame}.png")  # mode I;16
        name = f"scene0002_00/{frame}"
        tree.raw[name] = ids
        tree.labels[name] = np.vectorize(expected_of_raw.get)(ids)
    (root / "scannetv2-labels.combined.tsv").write_text(SCANNET_TSV)
    return tree


FOLDER_YAML = """\
name: toy
description: three classes, two splits
ignore_index: 255
classes:
  - {name: road, color: [128, 64, 128]}
  - {name: car, color: [0, 0, 142]}
  - {name: sky, color: [70, 130, 180]}
"""


def make_folder(root: Path, seed: int = 5) -> Tree:
    """A folder dataset with 3 classes: ``train`` (a .png and a .jpg image, labelled) and an
    unlabeled ``extra`` split."""
    rng, tree = np.random.default_rng(seed), Tree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(FOLDER_YAML)
    for split, name, suffix, labelled in [("train", "a", ".png", True), ("train", "b", ".jpg", True),
                                          ("extra", "c", ".png", False)]:
        image = random_image(rng, 12, 16)
        save(image, root / "images" / split / f"{name}{suffix}")
        with Image.open(root / "images" / split / f"{name}{suffix}") as decoded:
            tree.images[name] = np.array(decoded.convert("RGB"))
        if labelled:
            label = rng.choice(np.array([0, 1, 2, 255]), size=(12, 16)).astype(np.uint8)
            save(label, root / "labels" / split / f"{name}.png")
            tree.labels[name] = label
    return tree


# A folder dataset that is not the benchmark's shape: 5 classes and ignore index 7 (tests/test_label_space.py).
TOY_IGNORE = 7
TOY_CLASSES = ("road", "grass", "sky", "car", "sign")


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy street: sky on top, grass and road below, a car and a sign, some ignored pixels."""
    label = np.full((height, width), 2, dtype=np.uint8)
    horizon = int(rng.integers(height // 3, height // 2))
    label[horizon:] = 1
    label[horizon + (height - horizon) // 3 :, :] = 0
    top, left = int(rng.integers(horizon, height - 8)), int(rng.integers(0, width - 12))
    label[top : top + 6, left : left + 12] = 3
    column = int(rng.integers(0, width - 3))
    label[horizon - 6 : horizon, column : column + 3] = 4
    label[rng.random((height, width)) < 0.05] = TOY_IGNORE
    palette = np.array([[90, 90, 90], [40, 160, 40], [120, 170, 230], [200, 30, 30], [230, 220, 0]] + [[0, 0, 0]] * 3)
    image = palette[np.minimum(label, 7)] + rng.integers(-20, 20, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_toy(root: Path) -> Path:
    """``source`` (8 images), ``target`` (8) and ``val`` (3) splits of 40x56 images, 5 classes, ignore 7."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["name: toy5", f"ignore_index: {TOY_IGNORE}", "classes:"]
    lines += [f"  - {{name: {name}, color: [{i * 40}, {255 - i * 40}, {i * 20}]}}" for i, name in enumerate(TOY_CLASSES)]
    (root / "dataset.yaml").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    for split, count in (("source", 8), ("target", 8), ("val", 3)):
        for index in range(count):
            image, label = _scene(rng, 40, 56)
            for kind, array in (("images", image), ("labels", label)):
                path = root / kind / split / f"{split}{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    return root


def toy_overrides(root: Path) -> list[str]:
    """Any benchmark config on :func:`make_toy`'s data, at 2 iterations of 32x48 crops (a second or two a run)."""
    return [
        "data.source.dataset=folder", f"data.source.root={root}", "data.source.split=source",
        "data.target.dataset=folder", f"data.target.root={root}", "data.target.split=target",
        "data.val.dataset=folder", f"data.val.root={root}", "data.val.split=val",
        "data.crop_size=[32,48]", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0",
        "train.iters=2", "train.log_every=1", "schedule.warmup_iters=0", "train.threads=1",
    ]  # fmt: skip


# Overrides shared by the end-to-end tests on the embedded benchmark (generated once per session
# under the ``segadapt_home`` fixture of conftest.py). Later overrides win, so a test appends its own.
TINY = [f"data.{part}.benchmark_size=tiny" for part in ("source", "target", "val")]
"""The tiny benchmark for every data split."""

FAST = ["data.batch_size=2", "data.num_workers=0", "train.log_every=1", "schedule.warmup_iters=0"]
"""Small batches read in the main process, a metrics record every iteration, no warm-up."""

FAST_LOG2 = [*FAST, "train.log_every=2", "optim.lr=0.01"]
"""FAST with a record every 2nd iteration and lr 0.01: the metrics logs and learning rates the
training-loop tests (test_train, test_distributed) assert."""


def tiny_args(tmp_path: Path, *extra: str, fast: Sequence[str] = FAST) -> list[str]:
    """Overrides of a run on the tiny benchmark that writes under ``tmp_path``; ``extra`` come last."""
    return [*TINY, *fast, f"output_dir={tmp_path}", *extra]


def tiny_config(tmp_path: Path, *extra: str, config: str = "benchmark/source_only", fast: Sequence[str] = FAST) -> RunConfig:
    """The packaged ``config`` on the tiny benchmark (:func:`tiny_args`), validated."""
    return load_config(config, tiny_args(tmp_path, *extra, fast=fast))
