"""``segadapt predict``: a folder of images -> colourised PNGs, train-id PNGs, Cityscapes labelId PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.base import read_image
from ..engine.builders import resolve_device
from ..engine.inference import predict_probs
from ..engine.loading import config_for_checkpoint, load_trained_model
from ..errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("color", "trainid", "labelid")


def _read_rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float().div_(255.0)


def predict_folder(
    checkpoint: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    formats: Sequence[str] = ("color", "trainid"),
) -> int:
    """Predict every image under ``input_dir``; outputs keep the relative paths, one subfolder per format.

    ``labelid`` writes Cityscapes label ids (for the official test server), so it needs a
    19-class Cityscapes-label-space model. Predictions an earlier run wrote inside ``input_dir``
    (``output_dir/<format>``) are not read as input. Returns the number of images predicted.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown prediction format(s) {unknown}; choose from {list(FORMATS)}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    # A second run into INPUT/out must not predict the first run's PNGs; only the format folders are
    # skipped, so OUTPUT == INPUT still predicts the images themselves.
    written = [(output_dir / fmt).resolve() for fmt in FORMATS]
    images = sorted(
        p for p in input_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(p.resolve().is_relative_to(folder) for folder in written)
    )
    if not images:
        raise DataError(f"no .png/.jpg images under {input_dir}; point predict at a folder of images")
    cfg = config_for_checkpoint(checkpoint, config, overrides)
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
    for path in images:
        image = _read_rgb(path)
        prediction = predict_probs(model, image[None].to(device), image.shape[-2:], cfg.eval).argmax(1)[0]
        train_ids = prediction.cpu().numpy().astype(np.uint8)
        relative = path.relative_to(input_dir).with_suffix(".png")
        for fmt in formats:
            target = output_dir / fmt / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            renderers[fmt](train_ids).save(target)
    return len(images)


def run(
    checkpoint: str,
    input_dir: str,
    output_dir: str,
    config: str | None = None,
    overrides: Sequence[str] = (),
    formats: Sequence[str] = ("color", "trainid"),
) -> int:
    """The command: :func:`predict_folder`, then how many images were predicted."""
    written = predict_folder(checkpoint, input_dir, output_dir, config, overrides, formats=formats)
    print(f"wrote predictions for {written} images to {output_dir}")
    return 0
