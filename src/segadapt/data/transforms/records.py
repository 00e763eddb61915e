"""The records the transforms append to ``sample["replay"]``: what each one drew, so it can be replayed.

Geometric records (:class:`ScaleRecord`, :class:`CropRecord`, :class:`FlipRecord`,
:class:`RotateRecord`, :class:`AffineRecord`) are replayed on labels, soft labels and features by
:mod:`segadapt.data.transforms.geometry`; photometric ones (:class:`JitterRecord`,
:class:`BlurRecord`, :class:`CutoutRecord`, :class:`EnhanceRecord`) only document the pixel changes (and
the cutout boxes, which :func:`~segadapt.data.transforms.geometry.valid_mask` masks);
:class:`FullFrameRecord` marks where a pipeline kept its un-augmented frame. Records are frozen dataclasses,
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


@dataclass(frozen=True)
class AffineRecord:
    """An affine warp of the view (of ``input_size``), keeping its size, as PIL's ``Image.transform(AFFINE)``.

    ``matrix`` ``(a, b, c, d, e, f)`` maps each output point ``(x, y)`` to the input point
    ``(a x + b y + c, d x + e y + f)`` in pixel coordinates with the origin at the top-left corner of
    the top-left pixel (pixel centres at ``i + 0.5``). RandAugment's shears (``(1, v, 0, 0, 1, 0)``)
    and translations (``(1, 0, dx, 0, 1, 0)``: the content moves by ``-dx``) are such warps. Points
    from outside the input get ``pad_value`` (image), the ignore index (labels), False (masks) or 0
    (soft maps).
    """

    input_size: tuple[int, int]
    matrix: tuple[float, float, float, float, float, float]
    pad_value: float = 0.0
    ignore_index: int = IGNORE_INDEX
    name: str = "affine"


@dataclass(frozen=True)
class EnhanceRecord:
    """A photometric RandAugment operation ``op`` and the value it drew (None for those without one)."""

    op: str
    value: float | None = None
    name: str = "randaugment_photometric"


@dataclass(frozen=True)
class FullFrameRecord:
    """The pipeline kept its view of ``size`` ``(H, W)`` as ``sample["full_image"]`` here, before the random geometry.

    The records after it take the full frame to the augmented view (CPSL's ``full2weak``).
    """

    size: tuple[int, int]
    name: str = "keep_full_frame"


Record = (
    ScaleRecord | CropRecord | FlipRecord | RotateRecord | AffineRecord | JitterRecord | BlurRecord | CutoutRecord | EnhanceRecord | FullFrameRecord
)
GeometricRecord = ScaleRecord | CropRecord | FlipRecord | RotateRecord | AffineRecord
_GEOMETRIC = (ScaleRecord, CropRecord, FlipRecord, RotateRecord, AffineRecord)
