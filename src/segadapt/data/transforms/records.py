"""The records the transforms append to ``sample["replay"]``: what each one drew, so it can be replayed.

Geometric records (:class:`ScaleRecord`, :class:`CropRecord`, :class:`FlipRecord`,
:class:`RotateRecord`) are replayed on labels, soft labels and features by
:mod:`segadapt.data.transforms.geometry`; photometric ones (:class:`JitterRecord`,
:class:`BlurRecord`, :class:`CutoutRecord`) only document the pixel changes (and the cutout boxes,
which :func:`~segadapt.data.transforms.geometry.valid_mask` masks). Records are frozen dataclasses,
so a collated batch of them can be stored and compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..classes import IGNORE_INDEX


@dataclass(frozen=True)
class ScaleRecord:
    """A resize of the whole view from ``input_size`` to ``output_size`` (both ``(H, W)``).

    ``factor`` is the drawn scale of :class:`RandomScale` (or the long-side ratio of :class:`Resize`),
    ``None`` for a fixed target size.
    """

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    factor: float | None = None
    name: str = "random_scale"


@dataclass(frozen=True)
class CropRecord:
    """A crop box ``(top, left, height, width)`` taken after padding the bottom/right by ``padding``.

    Padding goes to the bottom and right so the crop box is in the coordinates of the unpadded input.
    """

    input_size: tuple[int, int]
    top: int
    left: int
    height: int
    width: int
    padding: tuple[int, int] = (0, 0)  # (rows added at the bottom, columns added at the right)
    pad_value: float = 0.0
    ignore_index: int = IGNORE_INDEX
    name: str = "random_crop"


@dataclass(frozen=True)
class FlipRecord:
    """Whether the view (of ``input_size``) was mirrored left-right."""

    input_size: tuple[int, int]
    flipped: bool
    name: str = "random_horizontal_flip"


@dataclass(frozen=True)
class JitterRecord:
    """Colour factors (1, 1, 1, 0 is identity) and the order they were applied in (0..3 = b, c, s, h)."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)
    name: str = "color_jitter"


@dataclass(frozen=True)
class BlurRecord:
    """The Gaussian sigma in pixels; 0 means the blur was not applied."""

    sigma: float
    name: str = "gaussian_blur"


@dataclass(frozen=True)
class CutoutRecord:
    """Boxes ``(top, left, height, width)`` filled with ``fill``; empty when not applied."""

    boxes: tuple[tuple[int, int, int, int], ...]
    fill: tuple[float, ...] = (0.5,)
    label_erased: bool = False
    name: str = "cutout"


@dataclass(frozen=True)
class RotateRecord:
    """A rotation of the view (of ``input_size``) by ``angle`` degrees, counter-clockwise, about its centre.

    The size is kept; corners rotated in from outside are filled with ``pad_value`` (image), the
    ignore index (labels), False (masks) or 0 (soft maps), as the semseg code DARS uses does
    (``RandRotate``: cv2 ``warpAffine`` with a constant border).
    """

    input_size: tuple[int, int]
    angle: float
    pad_value: float = 0.0
    ignore_index: int = IGNORE_INDEX
    name: str = "random_rotate"


Record = ScaleRecord | CropRecord | FlipRecord | RotateRecord | JitterRecord | BlurRecord | CutoutRecord
GeometricRecord = ScaleRecord | CropRecord | FlipRecord | RotateRecord
_GEOMETRIC = (ScaleRecord, CropRecord, FlipRecord, RotateRecord)
