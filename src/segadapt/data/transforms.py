"""Joint image/label transforms that record what they drew, so any tensor can be replayed into the view.

A transform is a callable ``transform(sample, generator=None) -> sample``. The sample is a dict with
``image`` (float ``[3, H, W]``, RGB in ``[0, 1]``), optionally ``label`` (int64 ``[H, W]``, 255 = ignore)
and any extra dense maps a recipe adds (``soft_label`` ``[C, H, W]``, ``confidence`` ``[H, W]`` ...).
Geometric transforms move every dense map with the image: float maps are resampled bilinearly and
padded with 0, integer maps take the nearest value and are padded with the ignore index. Photometric
transforms touch the image only. Every transform appends one record of its drawn parameters to
``sample["replay"]`` (an identity record when its coin flip said no), so that a recipe can replay the
geometry on pseudo labels, soft labels or features (ProDA/CPSL ``full2weak``, REFERENCE_NOTES.md 1.3).

Random draws come from the ``torch.Generator`` passed to the call, or from the global torch RNG when
none is given (DataLoader workers seed that one per worker), so runs are reproducible.

Examples:
    >>> pipeline = build_transforms([{"name": "random_scale", "min": 0.5, "max": 1.5},
    ...                              {"name": "random_crop", "size": [64, 64]},
    ...                              {"name": "random_horizontal_flip"}])
    >>> sample = {"image": torch.rand(3, 48, 80), "label": torch.zeros(48, 80, dtype=torch.long)}
    >>> view = pipeline(sample, torch.Generator().manual_seed(0))
    >>> torch.equal(replay_geometric(view["replay"], sample["label"], "label"), view["label"])
    True
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from segadapt.data.classes import IGNORE_INDEX
from segadapt.errors import ConfigError, DataError

Kind = Literal["image", "label", "soft"]
Sample = dict[str, Any]
Transform = Callable[..., Sample]

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


# --------------------------------------------------------------------------- records


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


Record = Union[ScaleRecord, CropRecord, FlipRecord, RotateRecord, JitterRecord, BlurRecord, CutoutRecord]
GeometricRecord = Union[ScaleRecord, CropRecord, FlipRecord, RotateRecord]
_GEOMETRIC = (ScaleRecord, CropRecord, FlipRecord, RotateRecord)


# --------------------------------------------------------------------------- random draws


def _rand(generator: torch.Generator | None) -> float:
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand((), generator=generator, device=device))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * _rand(generator)


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator, device=device))


def _randperm(n: int, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=device).cpu()


def _coin(p: float, generator: torch.Generator | None) -> bool:
    return _rand(generator) < p


def _round(value: float) -> int:
    # Half away from zero like mmseg/PIL size rounding, not Python's banker's rounding.
    return int(math.floor(value + 0.5))


# --------------------------------------------------------------------------- tensor ops


def _as_batch(tensor: torch.Tensor, kind: Kind) -> tuple[torch.Tensor, bool]:
    """View ``tensor`` as ``[N, C, H, W]``; returns it and whether the input was a batch."""
    if kind not in ("image", "label", "soft"):
        raise ValueError(f"kind must be 'image', 'label' or 'soft', got {kind!r}")
    batched = tensor.dim() == 4 or (kind == "label" and tensor.dim() == 3)
    if tensor.dim() == 2 or (kind == "label" and tensor.dim() == 3):
        tensor = tensor.unsqueeze(-3)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4:
        raise ValueError(f"expected a {kind} map [H,W], [C,H,W] or a batch of them, got shape {tuple(tensor.shape)}")
    return tensor, batched


def resize(tensor: torch.Tensor, size: tuple[int, int], kind: Kind) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` to ``size``: nearest for labels, antialiased bilinear for images and soft maps.

    Nearest uses pixel centres (``nearest-exact``, as PIL), so labels stay aligned with the bilinear image.
    """
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    if kind == "label":
        return F.interpolate(tensor.float(), size=size, mode="nearest-exact").to(tensor.dtype)
    resized = F.interpolate(tensor.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized.to(tensor.dtype)


def _pad_value(record: CropRecord | RotateRecord, kind: Kind, dtype: torch.dtype) -> float | int | bool:
    if kind == "image":
        return record.pad_value
    if kind == "soft":
        return 0.0
    return False if dtype == torch.bool else record.ignore_index


def rotate(x: torch.Tensor, angle: float, kind: Kind, pad: float | int | bool) -> torch.Tensor:
    """Rotate ``[N, C, H, W]`` by ``angle`` degrees counter-clockwise about the centre, keeping the size.

    The rotation is in pixel coordinates, so the same angle gives the same picture at any resolution
    of the map (a replay on a stride-8 feature grid rotates like the image). Images and soft maps are
    resampled bilinearly, labels and masks take the nearest value; outside the source the result is
    ``pad``.
    """
    if angle == 0:
        return x
    height, width = x.shape[-2:]
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    # affine_grid maps output to input in coordinates normalised by each side's half length, so the
    # pixel-space inverse rotation picks up the aspect ratio; y points down, hence the signs.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]], dtype=torch.float32, device=x.device
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    if kind == "label":
        inside = F.grid_sample(torch.ones_like(x[:, :1], dtype=torch.float32), grid, mode="nearest", align_corners=False) > 0.5
        moved = F.grid_sample(x.float(), grid, mode="nearest", align_corners=False).to(x.dtype)
        return torch.where(inside, moved, torch.as_tensor(pad, dtype=x.dtype, device=x.device))
    # zero padding of (x - pad) + pad pads with ``pad`` and blends it smoothly at the border
    moved = F.grid_sample(x.float() - float(pad), grid, mode="bilinear", align_corners=False) + float(pad)
    return moved.to(x.dtype)


def _apply_geometry(record: GeometricRecord, x: torch.Tensor, kind: Kind, ratio: tuple[float, float]) -> torch.Tensor:
    """Apply one geometric record to ``[N, C, H, W]`` living on a grid ``ratio`` times the record's grid."""
    if isinstance(record, FlipRecord):
        return x.flip(-1) if record.flipped else x
    if isinstance(record, RotateRecord):
        return rotate(x, record.angle, kind, _pad_value(record, kind, x.dtype))
    if isinstance(record, ScaleRecord):
        height, width = record.output_size
        return resize(x, (max(1, _round(height * ratio[0])), max(1, _round(width * ratio[1]))), kind)
    top, left = _round(record.top * ratio[0]), _round(record.left * ratio[1])
    height, width = max(1, _round(record.height * ratio[0])), max(1, _round(record.width * ratio[1]))
    # On the record's own grid this is exactly record.padding; on a coarser grid it absorbs rounding.
    pad_bottom, pad_right = max(0, top + height - x.shape[-2]), max(0, left + width - x.shape[-1])
    if pad_bottom or pad_right:
        x = F.pad(x, (0, pad_right, 0, pad_bottom), value=_pad_value(record, kind, x.dtype))
    return x[..., top : top + height, left : left + width]


def _erase_boxes(x: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], value: Any) -> torch.Tensor:
    x = x.clone()
    for top, left, height, width in boxes:
        x[..., top : top + height, left : left + width] = value
    return x


# --------------------------------------------------------------------------- replay


def _split_records(records: Sequence[Any], batch: torch.Tensor, batched: bool) -> list[Sequence[Record]] | None:
    """Per-sample record lists (a collated ``replay``), or None when one list applies to the whole batch."""
    if not records or not isinstance(records[0], (list, tuple)):
        return None
    if not batched or len(records) != batch.shape[0]:
        raise ValueError(
            f"got {len(records)} per-sample record lists for a tensor of shape {tuple(batch.shape)}; "
            "pass a batch with one sample per record list, or a single record list"
        )
    return list(records)


def _replay(records: Sequence[Any], tensor: torch.Tensor, kind: Kind, output_size: tuple[int, int] | None,
            strict: bool) -> torch.Tensor:
    batch, batched = _as_batch(tensor, kind)
    per_sample = _split_records(records, batch, batched)
    if per_sample is None:
        out = _replay_batch(records, batch, kind, output_size, strict)
    else:
        views = [_replay_batch(r, batch[i : i + 1], kind, output_size, strict) for i, r in enumerate(per_sample)]
        sizes = {tuple(v.shape[-2:]) for v in views}
        if len(sizes) > 1:
            raise ValueError(f"the replayed views have different sizes {sorted(sizes)}; pass output_size to align them")
        out = torch.cat(views)
    if batched:
        return out if tensor.dim() == 4 else out.squeeze(1)
    return out.reshape(*tensor.shape[:-2], *out.shape[-2:])


def _replay_batch(records: Sequence[Record], x: torch.Tensor, kind: Kind, output_size: tuple[int, int] | None,
                  strict: bool) -> torch.Tensor:
    geometric = [r for r in records if isinstance(r, _GEOMETRIC)]
    if geometric:
        in_height, in_width = geometric[0].input_size
        height, width = x.shape[-2:]
        if strict and (height, width) != (in_height, in_width):
            raise ValueError(
                f"the records start from a {in_height}x{in_width} view but the tensor is {height}x{width}; "
                "use to_augmented_view() for tensors at another resolution"
            )
        ratio = (height / in_height, width / in_width)
        for record in geometric:
            x = _apply_geometry(record, x, kind, ratio)
    if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
        x = resize(x, tuple(output_size), kind)
    return x


def replay_geometric(records: Sequence[Any], tensor: torch.Tensor, kind: Kind = "label") -> torch.Tensor:
    """Apply the recorded scales, crops and flips to ``tensor`` exactly as they were applied to the sample.

    Photometric records (jitter, blur, cutout) are skipped: they change pixel values, not geometry
    (use :func:`valid_mask` to mask crop padding and cutout boxes). Replaying a sample's records on its
    original label reproduces the transformed label bit for bit.

    Args:
        records: one record list (``sample["replay"]``), applied to every item of a batch, or a list of
            per-sample record lists (a collated batch of ``replay``), one per item.
        tensor: on the grid the records start from. ``label``: ``[H, W]`` or ``[N, H, W]``;
            ``image``/``soft``: ``[H, W]``, ``[C, H, W]`` or ``[N, C, H, W]``.
        kind: ``label`` (nearest, padded with the crop's ignore index; bool masks padded with False),
            ``image`` (bilinear, padded with the crop's pad value) or ``soft`` (bilinear, padded with 0).

    Shape:
        Same leading dims as ``tensor``; the spatial size of the augmented view.
    """
    return _replay(records, tensor, kind, output_size=None, strict=True)


def to_augmented_view(records: Sequence[Any], tensor: torch.Tensor, kind: Kind = "soft",
                      output_size: Sequence[int] | None = None) -> torch.Tensor:
    """Map a tensor computed on the un-augmented view into the augmented view, at any resolution.

    The teacher sees the un-augmented image and the student an augmented view; this moves the teacher's
    logits, soft labels or features (e.g. at output stride 8) onto the student's grid, as ProDA/CPSL's
    ``full2weak`` does (REFERENCE_NOTES.md 1.3 step 6): every recorded size and box is scaled by the
    tensor's resolution relative to the records' input, so nothing is upsampled to full resolution.
    On the records' own grid this equals :func:`replay_geometric`. For a strong view built on top of a
    weak one, pass only the strong view's records, ``view["replay"][len(weak_view["replay"]):]``.

    Args:
        records, tensor, kind: as in :func:`replay_geometric`, but ``tensor`` may be at any resolution.
        output_size: ``(h, w)`` to resize the result to, e.g. the student's logit size.

    Examples:
        >>> crop = CropRecord(input_size=(64, 96), top=16, left=32, height=32, width=32)
        >>> teacher = torch.rand(19, 8, 12)  # stride 8 of the 64x96 un-augmented image
        >>> to_augmented_view([crop], teacher).shape
        torch.Size([19, 4, 4])
    """
    size = None if output_size is None else (int(output_size[0]), int(output_size[1]))
    return _replay(records, tensor, kind, output_size=size, strict=False)


def valid_mask(records: Sequence[Any], input_size: Sequence[int],
               output_size: Sequence[int] | None = None) -> torch.Tensor:
    """True where the augmented view shows real image content: False in crop padding and cutout boxes.

    Losses on replayed soft maps use it to skip padded and erased pixels, as ProDA masks its padding
    value (REFERENCE_NOTES.md 1.3 step 11).

    Args:
        records: one record list, or per-sample lists (the result is then ``[N, h, w]``).
        input_size: ``(H, W)`` of the un-augmented view the records start from.
        output_size: ``(h, w)`` to resize the mask to (nearest).
    """
    if records and isinstance(records[0], (list, tuple)):
        return torch.stack([valid_mask(r, input_size, output_size) for r in records])
    mask = torch.ones(1, 1, int(input_size[0]), int(input_size[1]), dtype=torch.bool)
    for record in records:
        if isinstance(record, _GEOMETRIC):
            mask = _apply_geometry(record, mask, "label", (1.0, 1.0))
        elif isinstance(record, CutoutRecord):
            mask = _erase_boxes(mask, record.boxes, False)
    if output_size is not None:
        mask = resize(mask, (int(output_size[0]), int(output_size[1])), "label")
    return mask[0, 0]


# --------------------------------------------------------------------------- sample plumbing


def _image_of(sample: Sample) -> torch.Tensor:
    image = sample.get("image")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(f"sample {sample.get('name', '?')!r}: 'image' must be a float tensor [3, H, W], got {found}")
    return image


def _dense_maps(sample: Sample) -> list[tuple[str, torch.Tensor, Kind]]:
    """The image and every [H, W] / [C, H, W] tensor of the sample, with how each is resampled."""
    size = _image_of(sample).shape[-2:]
    maps: list[tuple[str, torch.Tensor, Kind]] = [("image", sample["image"], "image")]
    for key, value in sample.items():
        if key == "image" or not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
            continue
        if value.shape[-2:] != size:
            raise DataError(
                f"sample {sample.get('name', '?')!r}: {key!r} is {tuple(value.shape[-2:])} but the image is "
                f"{tuple(size)}; dense maps must match the image size before transforms (resize them on load)"
            )
        maps.append((key, value, "soft" if value.is_floating_point() else "label"))
    return maps


def _with_record(sample: Sample, record: Record, **updates: Any) -> Sample:
    return {**sample, **updates, "replay": [*sample.get("replay", []), record]}


def _apply_geometric_record(sample: Sample, record: GeometricRecord) -> Sample:
    moved = {key: replay_geometric([record], value, kind) for key, value, kind in _dense_maps(sample)}
    return _with_record(sample, record, **moved)


# --------------------------------------------------------------------------- config validation


def _pair(value: Any, key: str) -> tuple[int, int]:
    """``int`` or ``[h, w]`` -> ``(h, w)`` of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ConfigError(f"{key} must be a positive int or [height, width] of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _interval(value: Any, key: str, low: float, high: float = math.inf) -> tuple[float, float]:
    """``[a, b]`` with ``low <= a <= b <= high``."""
    pair = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or not low <= pair[0] <= pair[1] <= high:
        raise ConfigError(f"{key} must be [min, max] with {low} <= min <= max <= {high}, got {value!r}")
    return float(pair[0]), float(pair[1])


def _probability(p: Any) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _jitter_range(value: Any, key: str, center: float, low: float, high: float = math.inf) -> tuple[float, float]:
    """A strength ``s`` means ``[max(low, center - s), center + s]`` (torchvision), or give ``[min, max]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or center + value > high:
            raise ConfigError(f"{key} must be a strength in [0, {high - center}] or [min, max], got {value!r}")
        return max(low, center - value), center + value
    return _interval(value, key, low, high)


# --------------------------------------------------------------------------- geometric transforms


@dataclass
class Compose:
    """Apply ``transforms`` in order, threading one generator through them."""

    transforms: Sequence[Transform]

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


@dataclass
class Resize:
    """Resize to a fixed ``size`` ``(h, w)``, or so that the longer side is ``long_side`` (aspect kept)."""

    size: int | Sequence[int] | None = None
    long_side: int | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.long_side is None):
            raise ConfigError(
                f"give exactly one of size or long_side, got size={self.size!r}, long_side={self.long_side!r}"
            )
        if self.size is not None:
            self.size = _pair(self.size, "size")
        elif not isinstance(self.long_side, int) or self.long_side < 1:
            raise ConfigError(f"long_side must be a positive int, got {self.long_side!r}")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = _image_of(sample).shape[-2:]
        if self.long_side is None:
            return _apply_geometric_record(sample, ScaleRecord((height, width), tuple(self.size), None, "resize"))
        factor = self.long_side / max(height, width)
        output = (max(1, _round(height * factor)), max(1, _round(width * factor)))
        return _apply_geometric_record(sample, ScaleRecord((height, width), output, factor, "resize"))


@dataclass
class RandomScale:
    """Rescale by a factor drawn uniformly from ``[min, max]`` (image/soft maps bilinear, labels nearest)."""

    min: float
    max: float

    def __post_init__(self) -> None:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.min, self.max))
        if not numbers or not 0 < self.min <= self.max:
            raise ConfigError(f"need 0 < min <= max, got min={self.min!r}, max={self.max!r}")
        self.min, self.max = float(self.min), float(self.max)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = _image_of(sample).shape[-2:]
        factor = _uniform(self.min, self.max, generator)
        output = (max(1, _round(height * factor)), max(1, _round(width * factor)))
        return _apply_geometric_record(sample, ScaleRecord((height, width), output, factor))


@dataclass
class RandomCrop:
    """Crop a random ``size`` ``(h, w)`` box, first padding the bottom/right when the view is smaller.

    The image is padded with ``pad_value``, labels with ``ignore_index`` and soft maps with 0.
    """

    size: int | Sequence[int]
    ignore_index: int = IGNORE_INDEX
    pad_value: float = 0.0

    def __post_init__(self) -> None:
        self.size = _pair(self.size, "size")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = _image_of(sample).shape[-2:]
        crop_height, crop_width = self.size
        padding = (max(0, crop_height - height), max(0, crop_width - width))
        top = _randint(height + padding[0] - crop_height, generator)
        left = _randint(width + padding[1] - crop_width, generator)
        record = CropRecord(
            (height, width), top, left, crop_height, crop_width, padding, self.pad_value, self.ignore_index
        )
        return _apply_geometric_record(sample, record)


@dataclass
class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    p: float = 0.5

    def __post_init__(self) -> None:
        self.p = _probability(self.p)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        size = tuple(_image_of(sample).shape[-2:])
        return _apply_geometric_record(sample, FlipRecord(size, _coin(self.p, generator)))


@dataclass
class RandomRotate:
    """Rotate by an angle drawn uniformly from ``[min, max]`` degrees with probability ``p``.

    DARS trains with ``rotate: [-10, 10]`` at ``p = 0.5`` (the semseg ``RandRotate`` of its
    configs, REFERENCE_NOTES.md 3.2). The image's new corners get ``pad_value``, labels
    ``ignore_index``, so they are never learnt from.
    """

    min: float = -10.0
    max: float = 10.0
    p: float = 0.5
    ignore_index: int = IGNORE_INDEX
    pad_value: float = 0.0

    def __post_init__(self) -> None:
        self.min, self.max = _interval([self.min, self.max], "[min, max]", -180.0, 180.0)
        self.p = _probability(self.p)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        size = tuple(_image_of(sample).shape[-2:])
        angle = _uniform(self.min, self.max, generator) if _coin(self.p, generator) else 0.0
        return _apply_geometric_record(sample, RotateRecord(size, angle, self.pad_value, self.ignore_index))


# --------------------------------------------------------------------------- photometric transforms


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GRAY_WEIGHTS, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * weights).sum(dim=-3, keepdim=True)


def _blend(image: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp(0.0, 1.0)


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` RGB in [0, 1] -> HSV with hue in [0, 1) (the torchvision algorithm)."""
    red, green, blue = image.unbind(-3)
    value, _ = image.max(dim=-3)
    chroma = value - image.min(dim=-3).values
    gray = chroma == 0
    saturation = chroma / torch.where(gray, torch.ones_like(value), value)
    chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    rc, gc, bc = (value - red) / chroma, (value - green) / chroma, (value - blue) / chroma
    hue = torch.where(value == red, bc - gc, torch.where(value == green, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(gray, torch.zeros_like(hue), hue)
    return torch.stack((torch.remainder(hue / 6.0, 1.0), saturation, value), dim=-3)


def hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = image.unbind(-3)
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long() % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    # Row k holds (r, g, b) for hue sector k.
    sectors = ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))
    table = torch.stack([torch.stack(rgb, dim=-3) for rgb in sectors], dim=-4)
    index = sector.unsqueeze(-3).unsqueeze(-3).expand(*table.shape[:-4], 1, 3, *table.shape[-2:])
    return table.gather(-4, index).squeeze(-4).clamp(0.0, 1.0)


def _shift_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    hsv = rgb_to_hsv(image)
    hsv = torch.stack((torch.remainder(hsv[..., 0, :, :] + shift, 1.0), hsv[..., 1, :, :], hsv[..., 2, :, :]), dim=-3)
    return hsv_to_rgb(hsv)


def apply_color_jitter(image: torch.Tensor, record: JitterRecord) -> torch.Tensor:
    """Apply recorded colour factors to ``[..., 3, H, W]`` RGB in [0, 1], with torchvision's ColorJitter maths.

    Brightness scales, contrast blends with the image's mean luma, saturation blends with the per-pixel
    luma, hue rotates the HSV hue by ``record.hue`` turns; each result is clipped to [0, 1].
    """
    for op in record.order:
        if op == 0 and record.brightness != 1.0:
            image = _blend(image, 0.0, record.brightness)
        elif op == 1 and record.contrast != 1.0:
            image = _blend(image, _grayscale(image).mean(dim=(-3, -2, -1), keepdim=True), record.contrast)
        elif op == 2 and record.saturation != 1.0:
            image = _blend(image, _grayscale(image), record.saturation)
        elif op == 3 and record.hue != 0.0:
            image = _shift_hue(image, record.hue)
    return image


@dataclass
class ColorJitter:
    """Random brightness, contrast, saturation and hue in random order, with probability ``p``; image only.

    Each strength ``s`` draws a factor from ``[max(0, 1 - s), 1 + s]`` (hue: a shift in ``[-s, s]`` turns,
    ``s <= 0.5``), or give an explicit ``[min, max]``, as torchvision's ColorJitter.
    """

    brightness: float | Sequence[float] = 0.0
    contrast: float | Sequence[float] = 0.0
    saturation: float | Sequence[float] = 0.0
    hue: float | Sequence[float] = 0.0
    p: float = 1.0

    def __post_init__(self) -> None:
        self.brightness = _jitter_range(self.brightness, "brightness", 1.0, low=0.0)
        self.contrast = _jitter_range(self.contrast, "contrast", 1.0, low=0.0)
        self.saturation = _jitter_range(self.saturation, "saturation", 1.0, low=0.0)
        self.hue = _jitter_range(self.hue, "hue", 0.0, low=-0.5, high=0.5)
        self.p = _probability(self.p)

    def draw(self, generator: torch.Generator | None = None) -> JitterRecord:
        """Draw the factors (identity when the ``p`` coin says no)."""
        if not _coin(self.p, generator):
            return JitterRecord()
        intervals = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = [_uniform(*interval, generator) for interval in intervals]
        order = tuple(_randperm(4, generator).tolist())
        return JitterRecord(*factors, order=order)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        record = self.draw(generator)
        return _with_record(sample, record, image=apply_color_jitter(_image_of(sample), record))


PhotometricJitter = ColorJitter  # the name the design issue uses for the same transform


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of radius ``ceil(3 sigma)`` (at least 1)."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` or ``[N, C, H, W]`` with reflect padding; ``sigma <= 0`` is identity.

    The kernel radius is ``ceil(3 sigma)``, capped below the image size (reflect padding needs it); it sums
    to 1, so constant images are unchanged and the mean is preserved up to border effects.
    """
    if sigma <= 0:
        return image
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    kernel = gaussian_kernel(sigma).to(batch.device, batch.dtype)
    radius = min(kernel.numel() // 2, batch.shape[-2] - 1, batch.shape[-1] - 1)
    if radius < 1:
        return image
    kernel = kernel[kernel.numel() // 2 - radius : kernel.numel() // 2 + radius + 1]
    kernel = kernel / kernel.sum()
    channels = batch.shape[1]
    out = F.pad(batch, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out.reshape(image.shape)


@dataclass
class GaussianBlur:
    """Blur the image with a sigma drawn from ``sigma`` ``[min, max]`` pixels, with probability ``p``.

    Defaults follow DACS/DAFormer's strong augmentation (sigma U(0.15, 1.15), p = 0.5).
    """

    sigma: Sequence[float] = (0.15, 1.15)
    p: float = 0.5

    def __post_init__(self) -> None:
        self.sigma = _interval(self.sigma, "sigma", low=0.0)
        self.p = _probability(self.p)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        sigma = _uniform(*self.sigma, generator) if _coin(self.p, generator) else 0.0
        return _with_record(sample, BlurRecord(sigma), image=gaussian_blur(_image_of(sample), sigma))


@dataclass
class Cutout:
    """Fill ``num_boxes`` random boxes of the image with ``fill``, with probability ``p``.

    Each box side is a fraction drawn from ``size`` ``[min, max]`` of the image side; boxes lie inside
    the image. ``erase_label`` also sets ``label`` to ``ignore_index`` there (other maps are left alone;
    :func:`valid_mask` gives the boxes to a recipe). ``fill`` is one value or RGB, in [0, 1].
    """

    num_boxes: int = 1
    size: Sequence[float] = (0.1, 0.3)
    fill: float | Sequence[float] = 0.5
    p: float = 0.5
    erase_label: bool = False
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not isinstance(self.num_boxes, int) or self.num_boxes < 1:
            raise ConfigError(f"num_boxes must be a positive int, got {self.num_boxes!r}")
        self.size = _interval(self.size, "size", low=0.0, high=1.0)
        fill = (self.fill,) if isinstance(self.fill, (int, float)) else tuple(self.fill)
        if len(fill) not in (1, 3) or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in fill):
            raise ConfigError(f"fill must be a value or [r, g, b] in [0, 1], got {self.fill!r}")
        self.fill = tuple(float(v) for v in fill)
        self.p = _probability(self.p)

    def _draw_box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        box_height = max(1, _round(_uniform(*self.size, generator) * height))
        box_width = max(1, _round(_uniform(*self.size, generator) * width))
        return _randint(height - box_height, generator), _randint(width - box_width, generator), box_height, box_width

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        image = _image_of(sample)
        boxes: tuple[tuple[int, int, int, int], ...] = ()
        if _coin(self.p, generator):
            boxes = tuple(self._draw_box(*image.shape[-2:], generator) for _ in range(self.num_boxes))
        erase = self.erase_label and "label" in sample
        record = CutoutRecord(boxes, self.fill, erase)
        fill = torch.tensor(self.fill, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        updates = {"image": _erase_boxes(image, boxes, fill)}
        if erase:
            updates["label"] = _erase_boxes(sample["label"], boxes, self.ignore_index)
        return _with_record(sample, record, **updates)


# --------------------------------------------------------------------------- batch-level mixing (self-training)


def cutmix_masks(batch_size: int, height: int, width: int, generator: torch.Generator | None = None, *,
                 area: Sequence[float] = (0.25, 0.5), device: torch.device | str | None = None) -> torch.Tensor:
    """One random box per image, True inside: the CutMix masks of French et al. (BMVC 2020), as used by DACS.

    The box covers a fraction of the image drawn from ``area`` ``[min, max]`` (up to rounding), with a
    random aspect ratio: its height fraction is ``a ** u`` with ``u ~ U(0, 1)``, its width fraction
    ``a / that``. ProDA/CPSL paste boxes of area 0.5 (``area=(0.5, 0.5)``).

    Shape:
        ``[batch_size, height, width]`` bool.
    """
    low, high = _interval(area, "area", low=1e-6, high=1.0)
    masks = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    for mask in masks:
        fraction = _uniform(low, high, generator)
        height_fraction = fraction ** _rand(generator)
        box_height = min(height, max(1, _round(height_fraction * height)))
        box_width = min(width, max(1, _round(fraction / height_fraction * width)))
        top, left = _randint(height - box_height, generator), _randint(width - box_width, generator)
        mask[top : top + box_height, left : left + box_width] = True
    return masks


def classmix_masks(labels: torch.Tensor, generator: torch.Generator | None = None,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """ClassMix masks (Olsson et al., WACV 2021; DACS, Tranheden et al., WACV 2021): per image, half of the
    classes present (rounded up, ``(n + n % 2) / 2`` as DACS) are chosen at random; True on their pixels.

    ``ignore_index`` is never a candidate class (DACS draws it like a class), so ignored pixels are never pasted.

    Shape:
        labels ``[N, H, W]`` integer -> ``[N, H, W]`` bool, on the labels' device.
    """
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [N, H, W], got {tuple(labels.shape)} {labels.dtype}")
    masks = []
    for label in labels:
        classes = label.unique()
        classes = classes[classes != ignore_index].cpu()
        order = _randperm(classes.numel(), generator)
        chosen = classes[order[: (classes.numel() + 1) // 2]].to(label.device)
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks) if masks else torch.zeros_like(labels, dtype=torch.bool)


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where ``mask`` is True, else ``b``: mixes images ``[N, C, H, W]``, labels ``[N, H, W]`` or soft maps.

    With a ClassMix mask from source labels, ``mix(mask, source, target)`` pastes the chosen source classes
    onto the target (DACS); use the same mask for images, labels and pseudo-label weights.
    """
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"mask must be bool [N, H, W], got {tuple(mask.shape)} {mask.dtype}")
    if a.shape != b.shape or a.shape[0] != mask.shape[0] or a.shape[-2:] != mask.shape[-2:] or a.dim() not in (3, 4):
        raise ValueError(f"cannot mix {tuple(a.shape)} and {tuple(b.shape)} with a mask {tuple(mask.shape)}")
    return torch.where(mask.unsqueeze(1) if a.dim() == 4 else mask, a, b)


def strong_augment(images: torch.Tensor, generator: torch.Generator | None = None, *,
                   jitter_strength: float = 0.2, jitter_p: float = 0.8, blur_sigma: Sequence[float] = (0.15, 1.15),
                   blur_p: float = 0.5) -> tuple[torch.Tensor, list[list[Record]]]:
    """DACS/DAFormer strong augmentation of a batch: colour jitter then Gaussian blur, drawn per image.

    DACS jitters with strength 0.2 on brightness, contrast, saturation and hue when ``U(0, 1) > 0.2``
    (``jitter_p`` 0.8) and blurs with sigma ``U(0.15, 1.15)`` when ``U(0, 1) > 0.5``. The blur kernel here
    is ``2 ceil(3 sigma) + 1`` wide instead of DACS's 10% of the image, which only drops weights below 1e-2.

    Returns:
        the augmented ``[N, 3, H, W]`` batch and, per image, ``[JitterRecord, BlurRecord]``.
    """
    jitter = ColorJitter(jitter_strength, jitter_strength, jitter_strength, jitter_strength, p=jitter_p)
    blur = GaussianBlur(blur_sigma, p=blur_p)
    outputs, params = [], []
    for image in images:
        view = blur(jitter({"image": image}, generator), generator)
        outputs.append(view["image"])
        params.append(view["replay"])
    return torch.stack(outputs), params


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
}


def _closest(word: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _build_one(index: int, entry: Any, ignore_index: int) -> Transform:
    where = f"transforms[{index}]"
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise ConfigError(
            f"{where}: expected a mapping with a 'name' key, e.g. {{name: random_crop, size: 512}}, got {entry!r}"
        )
    name = entry["name"]
    if name not in TRANSFORMS:
        suggestion = _closest(str(name), list(TRANSFORMS))
        raise ConfigError(f"{where}: unknown transform {name!r}{suggestion}; valid names: {', '.join(TRANSFORMS)}")
    cls = TRANSFORMS[name]
    valid = [f.name for f in fields(cls)]
    params = {key: value for key, value in entry.items() if key != "name"}
    for key in params:
        if key not in valid:
            suggestion = _closest(str(key), valid)
            raise ConfigError(f"{where} ({name}): unknown key {key!r}{suggestion}; valid keys: {', '.join(valid)}")
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
        raise ConfigError(
            f"{where} ({name}): missing required key(s) {', '.join(missing)}; valid keys: {', '.join(valid)}"
        )
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
    ``gaussian_blur``, ``cutout``; the other keys are the constructor arguments. A bad name, key or value
    raises :class:`ConfigError` naming the entry and listing the valid choices.
    """
    if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence):
        raise ConfigError(f"transforms must be a list of {{name: ..., key: value}} entries, got {spec!r}")
    return Compose([_build_one(index, entry, ignore_index) for index, entry in enumerate(spec)])
