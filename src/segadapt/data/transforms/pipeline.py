"""Pipelines from configs: :class:`Compose`, the :data:`TRANSFORMS` registry and :func:`build_transforms`.

A config's ``transforms:`` list (``[{name: random_crop, size: [512, 1024]}, ...]``) becomes a
:class:`Compose`; a bad name, key or value raises :class:`~segadapt.errors.ConfigError` naming the
entry and the valid choices. :func:`crop_and_largest_view` reads the same list to size crops.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from ...errors import ConfigError, did_you_mean
from ..classes import IGNORE_INDEX
from .common import Sample, Transform, _pair, _round
from .geometry import (
    KeepFullFrame,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRotate,
    RandomScale,
    Resize,
)
from .photometric import ColorJitter, Cutout, GaussianBlur


@dataclass
class Compose:
    """Apply ``transforms`` in order, threading one generator through them."""

    transforms: Sequence[Transform]

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


# --------------------------------------------------------------------------- factory


TRANSFORMS: dict[str, type] = {
    "resize": Resize,
    "random_scale": RandomScale,
    "random_crop": RandomCrop,
    "random_horizontal_flip": RandomHorizontalFlip,
    "random_rotate": RandomRotate,
    "color_jitter": ColorJitter,
    "gaussian_blur": GaussianBlur,
    "cutout": Cutout,
    "keep_full_frame": KeepFullFrame,
}
"""The registry of :func:`build_transforms`: config name -> transform class (its fields are the config keys)."""


def _build_one(index: int, entry: Any, ignore_index: int) -> Transform:
    where = f"transforms[{index}]"
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise ConfigError(f"{where}: expected a mapping with a 'name' key, e.g. {{name: random_crop, size: 512}}, got {entry!r}")
    name = entry["name"]
    if name not in TRANSFORMS:
        hint = did_you_mean(str(name), TRANSFORMS)
        raise ConfigError(f"{where}: unknown transform {name!r}{hint} (valid names: {', '.join(TRANSFORMS)})")
    cls = TRANSFORMS[name]
    valid = [f.name for f in fields(cls)]
    params = {key: value for key, value in entry.items() if key != "name"}
    for key in params:
        if key not in valid:
            hint = did_you_mean(str(key), valid)
            raise ConfigError(f"{where} ({name}): unknown key {key!r}{hint} (valid keys: {', '.join(valid)})")
    if "ignore_index" in valid:
        # the label space's ignore value comes from the data, so padding can never become a class id
        if params.get("ignore_index", ignore_index) != ignore_index:
            raise ConfigError(
                f"{where} ({name}): ignore_index {params['ignore_index']!r} differs from the data's ignore index "
                f"{ignore_index}; remove the key (transforms take the dataset's)"
            )
        params["ignore_index"] = ignore_index
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in params]
    if missing:
        raise ConfigError(f"{where} ({name}): missing required key(s) {', '.join(missing)}; valid keys: {', '.join(valid)}")
    try:
        return cls(**params)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{where} ({name}): {error}") from None


def crop_and_largest_view(spec: Sequence[Mapping[str, Any]], size: tuple[int, int]) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """The first ``random_crop`` size of a transform list and the largest view of a ``size`` image before it.

    The view grows with ``resize`` (to its size) and ``random_scale`` (by its ``max``); a crop larger than
    the largest view is padded every time. Returns ``(None, view)`` without a crop.

    Examples:
        >>> crop_and_largest_view([{"name": "random_scale", "min": 0.75, "max": 1.25}, {"name": "random_crop", "size": [128, 256]}], (96, 128))
        ((128, 256), (120, 160))
    """
    height, width = size
    for entry in spec:
        name = entry.get("name")
        if name == "resize" and entry.get("size") is not None:
            height, width = _pair(entry["size"], "size")
        elif name == "resize" and entry.get("long_side") is not None:
            factor = float(entry["long_side"]) / max(height, width)
            height, width = max(1, _round(height * factor)), max(1, _round(width * factor))
        elif name == "random_scale":
            factor = float(entry.get("max", 1.0))
            height, width = max(1, _round(height * factor)), max(1, _round(width * factor))
        elif name == "random_crop":
            return _pair(entry["size"], "size"), (height, width)
    return None, (height, width)


def build_transforms(spec: Sequence[Mapping[str, Any]], ignore_index: int = IGNORE_INDEX) -> Compose:
    """Build a :class:`Compose` from config entries like ``{"name": "random_crop", "size": [512, 1024]}``.

    ``ignore_index`` is the label value of padded, rotated-in and erased pixels: pass the dataset's
    (``dataset.classes.ignore_index``), as the engine does.

    Names: ``resize``, ``random_scale``, ``random_crop``, ``random_horizontal_flip``, ``random_rotate``, ``color_jitter``,
    ``gaussian_blur``, ``cutout``, ``keep_full_frame``; the other keys are the constructor arguments. A bad name, key or value
    raises :class:`ConfigError` naming the entry and listing the valid choices.
    """
    if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence):
        raise ConfigError(f"transforms must be a list of {{name: ..., key: value}} entries, got {spec!r}")
    return Compose([_build_one(index, entry, ignore_index) for index, entry in enumerate(spec)])
