"""``segadapt predict``: a folder of images -> colourised PNGs, train-id PNGs, Cityscapes labelId PNGs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.base import read_image
from ..engine.builders import resolve_device
from ..engine.inference import predict_probs
from ..engine.loading import config_for_checkpoint, load_trained_model
from ..engine.output_folder import DataFolder, OutputFolder, check_not_data, stream_folders
from ..errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("color", "trainid", "labelid")


def _read_rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float().div_(255.0)


class Predictions(NamedTuple):
    """What :func:`predict_folder` did: how many images it predicted, and the inputs it could not read, with why."""

    predicted: int
    skipped: list[tuple[Path, str]]


def input_images(input_dir: Path, output_dir: Path) -> dict[Path, str]:
    """The images under ``input_dir`` (except ``output_dir``, when it lies inside), each with its output name.

    The output name is the relative path with ``.png`` for a suffix: ``city/a.jpg`` -> ``city/a.png``.

    Raises:
        DataError: no image, or two images that would share an output name (``x.png`` and ``x.jpg``),
            naming both: one output must never replace another.
    """
    outputs = output_dir.resolve()
    images = sorted(
        p for p in input_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.resolve().is_relative_to(outputs)
    )
    if not images:
        raise DataError(f"no .png/.jpg images under {input_dir}; point predict at a folder of images")
    named: dict[str, Path] = {}
    for path in images:
        name = path.relative_to(input_dir).with_suffix(".png").as_posix()
        if name in named:
            raise DataError(
                f"{named[name]} and {path} would both be predicted into {name}: one output would replace the other "
                "(nothing was written); rename one of them, or move it to another folder"
            )
        named[name] = path
    return {path: name for name, path in named.items()}


def predict_folder(
    checkpoint: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    formats: Sequence[str] = ("color", "trainid"),
    overwrite: bool = False,
) -> Predictions:
    """Predict every image under ``input_dir``; outputs keep the relative paths, one subfolder per format.

    ``labelid`` writes Cityscapes label ids (for the official test server), so it needs a
    19-class Cityscapes-label-space model. ``output_dir`` is never a folder of the data and never
    holds files predict did not write (:mod:`segadapt.engine.output_folder`; ``overwrite``
    replaces an earlier predict's outputs there); it may lie inside ``input_dir``, whose images
    it then never counts. Two inputs never share an output (:func:`input_images`). An image that
    cannot be read (a truncated JPEG) is skipped and returned with why; the others are predicted.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown prediction format(s) {unknown}; choose from {list(FORMATS)}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise DataError(f"input folder {input_dir} does not exist; point predict at a folder of images")
    cfg = config_for_checkpoint(checkpoint, config, overrides)
    fix = "choose a new folder for the predictions, outside the data (e.g. predictions/)"
    check_not_data(output_dir, [DataFolder(input_dir, "the input folder", output_may_lie_inside=True), *stream_folders(cfg)], fix)
    folder = OutputFolder(output_dir, "predict", overwrite=overwrite)
    folder.check(fix)
    images = input_images(input_dir, output_dir)
    model, classes = load_trained_model(checkpoint, cfg)
    if classes is None:
        from ..data.classes import CITYSCAPES_CLASSES

        classes = CITYSCAPES_CLASSES  # raw authors' weights: the papers' 19-class Cityscapes label space
    to_label_id: Callable[[np.ndarray], np.ndarray] | None = None
    if "labelid" in formats:
        from ..data.cityscapes import train_id_to_label_id

        if classes.num_classes != 19:
            raise ConfigError(f"labelid output needs a 19-class Cityscapes model; {checkpoint} predicts {classes.num_classes} classes")
        to_label_id = train_id_to_label_id
    device = resolve_device(cfg.device)
    model.to(device)
    palette = classes.palette()
    renderers: dict[str, Callable[[np.ndarray], Image.Image]] = {
        "color": lambda train_ids: Image.fromarray(palette[train_ids]),
        "trainid": lambda train_ids: Image.fromarray(train_ids),
    }
    if to_label_id is not None:  # "labelid" is among the formats
        label_ids = to_label_id
        renderers["labelid"] = lambda train_ids: Image.fromarray(label_ids(train_ids).astype(np.uint8))
    folder.claim([f"{fmt}/{name}" for name in images.values() for fmt in formats])
    skipped: list[tuple[Path, str]] = []
    for path, name in images.items():
        try:
            image = _read_rgb(path)
        except DataError as err:  # one unreadable file costs its own prediction, not the others'
            skipped.append((path, str(err.__cause__ or err)))
            continue
        prediction = predict_probs(model, image[None].to(device), image.shape[-2:], cfg.eval).argmax(1)[0]
        train_ids = prediction.cpu().numpy().astype(np.uint8)
        for fmt in formats:
            target = output_dir / fmt / name
            target.parent.mkdir(parents=True, exist_ok=True)
            renderers[fmt](train_ids).save(target)
    return Predictions(len(images) - len(skipped), skipped)


def run(
    checkpoint: str,
    input_dir: str,
    output_dir: str,
    config: str | None = None,
    overrides: Sequence[str] = (),
    formats: Sequence[str] = ("color", "trainid"),
    overwrite: bool = False,
) -> int:
    """The command: :func:`predict_folder`, then how many images were predicted and which could not be read."""
    done = predict_folder(checkpoint, input_dir, output_dir, config, overrides, formats=formats, overwrite=overwrite)
    total = done.predicted + len(done.skipped)
    print(f"wrote predictions for {done.predicted} images to {output_dir}" if not done.skipped else
          f"wrote predictions for {done.predicted} of {total} images to {output_dir}")
    if done.skipped:
        for path, reason in done.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        raise DataError(
            f"{len(done.skipped)} of {total} images could not be read and were skipped (listed above): a truncated "
            "copy or download, or not an image; replace or re-save them, or move them out of the input folder, "
            "then run the command again with --overwrite"
        )
    return 0
