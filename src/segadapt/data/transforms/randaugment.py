"""RandAugment as FixMatch draws it (Sohn et al., NeurIPS 2020, "RandAugmentMC"), on tensors, recording every draw.

CPSL's (and ProDA's) strong view is this augmentation of the weak crop (the authors'
``data/randaugment.py``, ``RandAugmentMC(2, 10)``): a horizontal flip, a Gaussian blur and colour
jitter, each with probability 0.5; then ``n`` operations drawn with replacement from FixMatch's 14
(:data:`RANDAUGMENT_OPS`), each with an integer magnitude ``U{1, m - 1}`` and applied with probability
0.5; then one grey cut-out box of a third of the short side, centred anywhere. The geometric steps
(flip, rotate, shears, translations) append :class:`~.records.FlipRecord`,
:class:`~.records.RotateRecord` and :class:`~.records.AffineRecord`, which
:func:`~.geometry.to_augmented_view` replays on a teacher's output; the cut-out box is a
:class:`~.records.CutoutRecord`, which :func:`~.geometry.valid_mask` masks together with the pixels
the geometry brought in from outside. Photometric operations append :class:`~.records.EnhanceRecord`.

The images are float RGB in ``[0, 1]`` (the authors' are 8-bit PIL images); the operations follow
PIL's definitions (``ImageOps``, ``ImageEnhance``, ``Image.transform``): the operations that work on
8-bit levels (equalize, posterize, solarize) quantise to them first. Pixels brought in from outside
by the geometry, and the cut-out box, are grey ``127 / 255`` as the authors' ``fillcolor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..classes import IGNORE_INDEX
from .common import Sample, _coin, _erase_boxes, _image_of, _randint, _uniform, _with_record
from .geometry import RandomHorizontalFlip, _apply_geometric_record
from .photometric import ColorJitter, GaussianBlur, _blend, _grayscale
from .records import AffineRecord, CutoutRecord, EnhanceRecord, RotateRecord

GREY = 127.0 / 255.0
"""The authors' fill of rotated-in, sheared-in and translated-in pixels and of the cut-out box, ``(127, 127, 127)``."""

PARAMETER_MAX = 10
"""The magnitude scale: an operation's value is ``magnitude / PARAMETER_MAX`` of its range."""

RANDAUGMENT_OPS: dict[str, tuple[float | None, float | None]] = {
    "auto_contrast": (None, None),
    "brightness": (0.9, 0.05),
    "color": (0.9, 0.05),
    "contrast": (0.9, 0.05),
    "equalize": (None, None),
    "identity": (None, None),
    "posterize": (4, 4),
    "rotate": (30, 0),
    "sharpness": (0.9, 0.05),
    "shear_x": (0.3, 0),
    "shear_y": (0.3, 0),
    "solarize": (256, 0),
    "translate_x": (0.3, 0),
    "translate_y": (0.3, 0),
}
"""FixMatch's operation pool in its order, each with ``(max_v, bias)``: the value at magnitude ``v`` is
``v * max_v / 10 + bias`` (``int(v * max_v / 10) + bias`` for posterize, rotate and solarize)."""

SIGNED_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
"""The operations whose value takes a random sign (each sign with probability 0.5): the geometric ones."""

_INTEGER_OPS = ("posterize", "rotate", "solarize")


# --------------------------------------------------------------------------- photometric operations


def _levels(image: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels ``0..255`` (int64) of an image in ``[0, 1]``."""
    return (image * 255.0).round().clamp(0, 255).long()


def auto_contrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of ``[3, H, W]`` from its own minimum and maximum to 0 and 1 (PIL ``autocontrast``)."""
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    stretched = (image - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, stretched, image)


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each channel of ``[3, H, W]`` on its 8-bit levels, with PIL's look-up table.

    PIL (``ImageOps.equalize``): ``step = (pixels - count of the highest level present) // 255``; level
    ``i`` maps to ``(step // 2 + pixels below i) // step``; a channel with ``step = 0`` is unchanged.
    """
    levels = _levels(image)
    channels = []
    for channel in levels:
        histogram = torch.bincount(channel.flatten(), minlength=256)
        present = histogram[histogram > 0]
        step = (int(histogram.sum()) - int(present[-1])) // 255
        if step == 0:
            channels.append(channel)
            continue
        below = torch.cumsum(histogram, 0) - histogram
        table = ((step // 2 + below) // step).clamp(max=255)
        channels.append(table[channel])
    return torch.stack(channels).to(image.dtype) / 255.0


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` high bits of each 8-bit level (PIL ``posterize``)."""
    mask = ~((1 << (8 - int(bits))) - 1) & 0xFF
    return (_levels(image) & mask).to(image.dtype) / 255.0


def solarize(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert the pixels whose 8-bit level is at least ``threshold`` (PIL ``solarize``)."""
    return torch.where(_levels(image) >= threshold, 1.0 - image, image)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's ImageFilter.SMOOTH


def sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend ``[3, H, W]`` with its smoothed copy (PIL ``ImageEnhance.Sharpness``); factor 1 is identity, < 1 blurs.

    The smoothed copy is PIL's ``SMOOTH`` 3x3 filter inside the image and the image itself on its
    one-pixel border (PIL leaves the border unfiltered).
    """
    kernel = _SMOOTH.to(image.device, image.dtype).expand(3, 1, 3, 3)
    smooth = image.clone()
    if image.shape[-1] > 2 and image.shape[-2] > 2:
        smooth[:, 1:-1, 1:-1] = F.conv2d(image[None], kernel, groups=3)[0]
    return _blend(image, smooth, factor)


def brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale towards black (PIL ``ImageEnhance.Brightness``)."""
    return _blend(image, 0.0, factor)


def color(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the per-pixel luma (PIL ``ImageEnhance.Color``, saturation)."""
    return _blend(image, _grayscale(image), factor)


def contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean luma (PIL ``ImageEnhance.Contrast``)."""
    return _blend(image, _grayscale(image).mean(), factor)


_PHOTOMETRIC: dict[str, Callable[..., torch.Tensor]] = {
    "auto_contrast": auto_contrast,
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    "equalize": equalize,
    "identity": lambda image: image,
    "posterize": posterize,
    "sharpness": sharpness,
    "solarize": solarize,
}


# --------------------------------------------------------------------------- draws and application


def op_value(op: str, magnitude: int, negative: bool, size: tuple[int, int]) -> float | None:
    """The value operation ``op`` takes at integer ``magnitude`` (with its sign when ``negative``) on a ``size`` view.

    Posterize: bits kept; solarize: the threshold ``256 - int(v * 25.6)``; rotate: degrees; shears: the
    shear factor; translations: whole pixels (``int`` of the signed fraction of the width or height,
    as the authors); enhancements: the blend factor. None for the operations without a value.

    Examples:
        >>> op_value("rotate", 9, True, (32, 64)), op_value("translate_x", 5, False, (32, 64)), op_value("solarize", 1, False, (32, 64))
        (-27, 9, 231)
    """
    if op not in RANDAUGMENT_OPS:
        raise ConfigError(f"unknown RandAugment operation {op!r}; the operations are {', '.join(RANDAUGMENT_OPS)}")
    max_v, bias = RANDAUGMENT_OPS[op]
    if max_v is None or bias is None:
        return None
    value: float = int(magnitude * max_v / PARAMETER_MAX) + bias if op in _INTEGER_OPS else magnitude * max_v / PARAMETER_MAX + bias
    if op == "solarize":
        return 256 - value
    if op in SIGNED_OPS and negative:
        value = -value
    if op == "translate_x":
        return int(value * size[1])
    if op == "translate_y":
        return int(value * size[0])
    return value


def geometric_record(op: str, value: float, size: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> RotateRecord | AffineRecord:
    """The record of geometric operation ``op`` with ``value`` on a ``size`` ``(H, W)`` view (PIL's matrices).

    Rotate turns counter-clockwise by ``value`` degrees (``Image.rotate``); ``shear_x`` maps ``(x, y)``
    to ``(x + value y, y)``, ``translate_x`` to ``(x + value, y)`` (the content moves left by ``value``
    pixels), and the ``_y`` operations alike.
    """
    if op == "rotate":
        return RotateRecord(size, float(value), GREY, ignore_index)
    matrices = {
        "shear_x": (1.0, value, 0.0, 0.0, 1.0, 0.0),
        "shear_y": (1.0, 0.0, 0.0, value, 1.0, 0.0),
        "translate_x": (1.0, 0.0, value, 0.0, 1.0, 0.0),
        "translate_y": (1.0, 0.0, 0.0, 0.0, 1.0, value),
    }
    if op not in matrices:
        raise ValueError(f"{op!r} is no geometric RandAugment operation (those are {', '.join(SIGNED_OPS)})")
    return AffineRecord(size, tuple(float(v) for v in matrices[op]), GREY, ignore_index, op)  # type: ignore[arg-type]


def apply_op(sample: Sample, op: str, value: float | None, ignore_index: int = IGNORE_INDEX) -> Sample:
    """``sample`` under RandAugment operation ``op`` with ``value`` (from :func:`op_value`), its record appended.

    Geometric operations move every dense map of the sample with the image (as the pipeline's
    transforms); photometric ones change the image only.
    """
    image = _image_of(sample)
    if op in SIGNED_OPS:
        assert value is not None
        return _apply_geometric_record(sample, geometric_record(op, value, tuple(image.shape[-2:]), ignore_index))  # type: ignore[arg-type]
    function = _PHOTOMETRIC[op]
    changed = function(image) if value is None else function(image, value)
    return _with_record(sample, EnhanceRecord(op, None if value is None else float(value)), image=changed)


def cutout_square(x: float, y: float, height: int, width: int, side: int) -> tuple[int, int, int, int]:
    """The authors' ``CutoutAbs`` box ``(top, left, height, width)`` of ``side`` about the centre ``(x, y)``.

    The corner is ``max(0, int(centre - side / 2))``, the far corner ``min(size, corner + side)``, drawn
    by PIL inclusive of its last row and column, so the box is ``side + 1`` pixels unless the image
    border cuts it.

    Examples:
        >>> cutout_square(10.0, 5.0, 24, 40, 8), cutout_square(39.0, 23.5, 24, 40, 8)
        ((1, 6, 9, 9), (19, 35, 5, 5))
    """
    left, top = int(max(0.0, x - side / 2.0)), int(max(0.0, y - side / 2.0))
    right, bottom = min(width, left + side), min(height, top + side)
    return top, left, min(bottom, height - 1) - top + 1, min(right, width - 1) - left + 1


def cutout_box(height: int, width: int, side: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """:func:`cutout_square` about a centre drawn uniformly over the image (``x`` first, as the authors)."""
    x = _uniform(0.0, float(width), generator)
    y = _uniform(0.0, float(height), generator)
    return cutout_square(x, y, height, width, side)


def apply_cutout(sample: Sample, box: tuple[int, int, int, int]) -> Sample:
    """Fill ``box`` ``(top, left, height, width)`` of the image with grey; the image only, recorded as a :class:`CutoutRecord`."""
    image = _image_of(sample)
    return _with_record(sample, CutoutRecord((box,), (GREY,)), image=_erase_boxes(image, [box], GREY))


@dataclass
class RandAugmentMC:
    """The FixMatch/CPSL strong augmentation (the authors' ``RandAugmentMC(n, m, jitter)``; module docstring).

    In order: flip (``p`` 0.5), Gaussian blur of ``blur_sigma`` pixels (``p`` 0.5; the authors' PIL
    radius 1), colour jitter of strength ``jitter`` on brightness, contrast, saturation and hue
    (``p`` 0.5, torchvision's maths), ``n`` operations of :data:`RANDAUGMENT_OPS` with magnitudes
    ``U{1, m - 1}`` (``p`` 0.5 each), and a grey cut-out box of ``min(H, W) // 3`` pixels when ``cutout``.
    Every step appends its record to ``sample["replay"]``; ``blur_sigma = 0`` or ``jitter = 0`` skip
    those steps (and their coins).

    Examples:
        >>> view = RandAugmentMC()({"image": torch.rand(3, 32, 64), "replay": []}, torch.Generator().manual_seed(0))
        >>> view["image"].shape, type(view["replay"][-1]).__name__
        (torch.Size([3, 32, 64]), 'CutoutRecord')
    """

    n: int = 2
    m: int = 10
    jitter: float = 0.4
    blur_sigma: float = 1.0
    cutout: bool = True
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"RandAugment n (operations per image) must be a positive int, got {self.n!r}")
        if not isinstance(self.m, int) or not 2 <= self.m <= PARAMETER_MAX:
            raise ConfigError(f"RandAugment m (magnitude bound) must be an int in [2, {PARAMETER_MAX}], got {self.m!r}")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        sample = RandomHorizontalFlip(0.5)(sample, generator)
        if self.blur_sigma > 0:
            sample = GaussianBlur((self.blur_sigma, self.blur_sigma), p=0.5)(sample, generator)
        if self.jitter > 0:
            sample = ColorJitter(self.jitter, self.jitter, self.jitter, min(0.5, self.jitter), p=0.5)(sample, generator)
        ops = list(RANDAUGMENT_OPS)
        for _ in range(self.n):
            op = ops[_randint(len(ops) - 1, generator)]
            magnitude = 1 + _randint(self.m - 2, generator)
            if _coin(0.5, generator):
                negative = _coin(0.5, generator)
                sample = apply_op(sample, op, op_value(op, magnitude, negative, tuple(_image_of(sample).shape[-2:])), self.ignore_index)  # type: ignore[arg-type]
        if self.cutout:
            height, width = _image_of(sample).shape[-2:]
            sample = apply_cutout(sample, cutout_box(height, width, min(height, width) // 3, generator))
        return sample
