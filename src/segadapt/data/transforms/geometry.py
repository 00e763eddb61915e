"""Geometric transforms and their replay: resize, scale, crop, flip, rotate, moving every dense map with the image.

Float maps are resampled bilinearly and padded with 0, integer maps take the nearest value and are
padded with the ignore index. Each transform appends a record of what it drew
(:mod:`segadapt.data.transforms.records`); :func:`replay_geometric` replays those records on any
tensor at the view's input resolution, :func:`to_augmented_view` at any resolution (ProDA/CPSL
``full2weak``; docs/reference_code.md, "CPSL: momentum network and views"), and
:func:`valid_mask` gives the pixels that show real image content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError, DataError
from ..classes import IGNORE_INDEX
from .common import (
    Kind,
    Sample,
    _coin,
    _erase_boxes,
    _image_of,
    _interval,
    _pair,
    _probability,
    _randint,
    _round,
    _uniform,
    _with_record,
)
from .records import (
    _GEOMETRIC,
    AffineRecord,
    CropRecord,
    CutoutRecord,
    FlipRecord,
    FullFrameRecord,
    GeometricRecord,
    Record,
    RotateRecord,
    ScaleRecord,
)

FULL_IMAGE_KEY = "full_image"
"""The sample key of the frame :class:`KeepFullFrame` keeps; later transforms leave it alone."""

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


def _pad_value(record: CropRecord | RotateRecord | AffineRecord, kind: Kind, dtype: torch.dtype) -> float | int | bool:
    if kind == "image":
        return record.pad_value
    if kind == "soft":
        return 0.0
    return False if dtype == torch.bool else record.ignore_index


def _warp(x: torch.Tensor, theta: torch.Tensor, kind: Kind, pad: float | int | bool) -> torch.Tensor:
    """Resample ``[N, C, H, W]`` through ``theta`` (``affine_grid``'s output-to-input map, normalised coordinates).

    Images and soft maps are resampled bilinearly, labels and masks take the nearest value; outside the
    source the result is ``pad``.
    """
    grid = F.affine_grid(theta.to(x.device).expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    if kind == "label":
        inside = F.grid_sample(torch.ones_like(x[:, :1], dtype=torch.float32), grid, mode="nearest", align_corners=False) > 0.5
        moved = F.grid_sample(x.float(), grid, mode="nearest", align_corners=False).to(x.dtype)
        return torch.where(inside, moved, torch.as_tensor(pad, dtype=x.dtype, device=x.device))
    # zero padding of (x - pad) + pad pads with ``pad`` and blends it smoothly at the border
    moved = F.grid_sample(x.float() - float(pad), grid, mode="bilinear", align_corners=False) + float(pad)
    return moved.to(x.dtype)


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
    theta = torch.tensor([[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]], dtype=torch.float32)
    return _warp(x, theta, kind, pad)


def affine_theta(matrix: Sequence[float], size: tuple[int, int]) -> torch.Tensor:
    """``affine_grid``'s ``theta`` ``[2, 3]`` of an :class:`~.records.AffineRecord` matrix on a ``size`` ``(H, W)`` view.

    With ``u = 2 x / W - 1`` and ``v = 2 y / H - 1`` (``align_corners=False``), the pixel map
    ``x' = a x + b y + c``, ``y' = d x + e y + f`` becomes ``u' = a u + b (H/W) v + a + b H/W + 2c/W - 1``
    and ``v' = d (W/H) u + e v + d W/H + e + 2f/H - 1``. The normalised map is the same picture at
    any resolution of the view, so a replay on a coarser grid moves it as the image moved.

    Examples:
        >>> affine_theta((1, 0, 8, 0, 1, 0), (16, 32))  # 8 pixels of 32: a quarter of the normalised width
        tensor([[1.0000, 0.0000, 0.5000],
                [0.0000, 1.0000, 0.0000]])
    """
    a, b, c, d, e, f = (float(v) for v in matrix)
    height, width = size
    return torch.tensor(
        [
            [a, b * height / width, a + b * height / width + 2 * c / width - 1],
            [d * width / height, e, d * width / height + e + 2 * f / height - 1],
        ],
        dtype=torch.float32,
    )


def affine(x: torch.Tensor, record: AffineRecord, kind: Kind, pad: float | int | bool) -> torch.Tensor:
    """Warp ``[N, C, H, W]`` by ``record``'s matrix (PIL's ``AFFINE`` transform), at any resolution of the view.

    Shape:
        ``x``: ``[N, C, H, W]`` on a grid of any size; the result has the same shape.
    """
    if tuple(record.matrix) == (1, 0, 0, 0, 1, 0):
        return x
    return _warp(x, affine_theta(record.matrix, record.input_size), kind, pad)


def _apply_geometry(record: GeometricRecord, x: torch.Tensor, kind: Kind, ratio: tuple[float, float]) -> torch.Tensor:
    """Apply one geometric record to ``[N, C, H, W]`` living on a grid ``ratio`` times the record's grid."""
    if isinstance(record, FlipRecord):
        return x.flip(-1) if record.flipped else x
    if isinstance(record, RotateRecord):
        return rotate(x, record.angle, kind, _pad_value(record, kind, x.dtype))
    if isinstance(record, AffineRecord):
        return affine(x, record, kind, _pad_value(record, kind, x.dtype))
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


def _replay(records: Sequence[Any], tensor: torch.Tensor, kind: Kind, output_size: tuple[int, int] | None, strict: bool) -> torch.Tensor:
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


def _replay_batch(records: Sequence[Record], x: torch.Tensor, kind: Kind, output_size: tuple[int, int] | None, strict: bool) -> torch.Tensor:
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
        out_height, out_width = output_size
        x = resize(x, (out_height, out_width), kind)
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


def to_augmented_view(records: Sequence[Any], tensor: torch.Tensor, kind: Kind = "soft", output_size: Sequence[int] | None = None) -> torch.Tensor:
    """Map a tensor computed on the un-augmented view into the augmented view, at any resolution.

    The teacher sees the un-augmented image and the student an augmented view; this moves the teacher's
    logits, soft labels or features (e.g. at output stride 8) onto the student's grid, as ProDA/CPSL's
    ``full2weak`` does (docs/reference_code.md, "CPSL: momentum network and views"): every recorded
    size and box is scaled by the tensor's resolution relative to the records' input, so nothing is
    upsampled to full resolution.
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


def valid_mask(
    records: Sequence[Any], input_size: Sequence[int], output_size: Sequence[int] | None = None, margins: Sequence[int] | None = None
) -> torch.Tensor:
    """True where the augmented view shows real image content: False in crop padding and cutout boxes.

    Losses on replayed soft maps use it to skip padded and erased pixels, as ProDA masks its padding
    value (docs/reference_code.md, "CPSL: consistency loss").

    Args:
        records: one record list, or per-sample lists (the result is then ``[N, h, w]``).
        input_size: ``(H, W)`` of the un-augmented view the records start from.
        output_size: ``(h, w)`` to resize the mask to (nearest).
        margins: ``(top, bottom, left, right)`` pixels of the un-augmented view that count as
            invalid too (HRDA's pseudo-label margins), before the geometry is replayed.
    """
    if records and isinstance(records[0], (list, tuple)):
        return torch.stack([valid_mask(r, input_size, output_size, margins) for r in records])
    mask = torch.ones(1, 1, int(input_size[0]), int(input_size[1]), dtype=torch.bool)
    if margins is not None:
        top, bottom, left, right = (int(m) for m in margins)
        mask[..., :top, :] = False
        mask[..., mask.shape[-2] - bottom :, :] = False
        mask[..., :left] = False
        mask[..., mask.shape[-1] - right :] = False
    for record in records:
        if isinstance(record, _GEOMETRIC):
            mask = _apply_geometry(record, mask, "label", (1.0, 1.0))
        elif isinstance(record, CutoutRecord):
            mask = _erase_boxes(mask, record.boxes, False)
    if output_size is not None:
        mask = resize(mask, (int(output_size[0]), int(output_size[1])), "label")
    return mask[0, 0]


# --------------------------------------------------------------------------- sample plumbing


def _dense_maps(sample: Sample) -> list[tuple[str, torch.Tensor, Kind]]:
    """The image and every [H, W] / [C, H, W] tensor of the sample, with how each is resampled."""
    size = _image_of(sample).shape[-2:]
    maps: list[tuple[str, torch.Tensor, Kind]] = [("image", sample["image"], "image")]
    for key, value in sample.items():
        if key in ("image", FULL_IMAGE_KEY) or not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
            continue  # the kept full frame stays as it was kept
        if value.shape[-2:] != size:
            raise DataError(
                f"sample {sample.get('name', '?')!r}: {key!r} is {tuple(value.shape[-2:])} but the image is "
                f"{tuple(size)}; dense maps must match the image size before transforms (resize them on load)"
            )
        maps.append((key, value, "soft" if value.is_floating_point() else "label"))
    return maps


def _apply_geometric_record(sample: Sample, record: GeometricRecord) -> Sample:
    moved = {key: replay_geometric([record], value, kind) for key, value, kind in _dense_maps(sample)}
    return _with_record(sample, record, **moved)


# --------------------------------------------------------------------------- geometric transforms


@dataclass
class Resize:
    """Resize to a fixed ``size`` ``(h, w)``, or so that the longer side is ``long_side`` (aspect kept)."""

    size: int | Sequence[int] | None = None
    long_side: int | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.long_side is None):
            raise ConfigError(f"give exactly one of size or long_side, got size={self.size!r}, long_side={self.long_side!r}")
        if self.size is not None:
            self.size = _pair(self.size, "size")
        elif not isinstance(self.long_side, int) or self.long_side < 1:
            raise ConfigError(f"long_side must be a positive int, got {self.long_side!r}")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = _image_of(sample).shape[-2:]
        if self.long_side is None:
            assert isinstance(self.size, tuple)  # __post_init__ made it (h, w)
            return _apply_geometric_record(sample, ScaleRecord((height, width), self.size, None, "resize"))
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
    With ``cat_max_ratio < 1`` (mmsegmentation's option, 0.75 in DAFormer's source pipeline) the box
    is re-drawn, up to 10 times, while one class covers ``cat_max_ratio`` or more of its labelled
    pixels or it shows fewer than two classes.
    """

    size: int | Sequence[int]
    ignore_index: int = IGNORE_INDEX
    pad_value: float = 0.0
    cat_max_ratio: float = 1.0

    def __post_init__(self) -> None:
        self.size = _pair(self.size, "size")
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError(f"random_crop: cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")

    def _varied(self, label: torch.Tensor, top: int, left: int) -> bool:
        assert isinstance(self.size, tuple)
        box = label[..., top : top + self.size[0], left : left + self.size[1]]
        counts = torch.bincount(box[box != self.ignore_index].flatten().long())
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = _image_of(sample).shape[-2:]
        assert isinstance(self.size, tuple)  # __post_init__ made it (h, w)
        crop_height, crop_width = self.size
        padding = (max(0, crop_height - height), max(0, crop_width - width))
        top = _randint(height + padding[0] - crop_height, generator)
        left = _randint(width + padding[1] - crop_width, generator)
        label = sample.get("label")
        if self.cat_max_ratio < 1 and isinstance(label, torch.Tensor):
            for _ in range(10):
                if self._varied(label, top, left):
                    break
                top = _randint(height + padding[0] - crop_height, generator)
                left = _randint(width + padding[1] - crop_width, generator)
        record = CropRecord((height, width), top, left, crop_height, crop_width, padding, self.pad_value, self.ignore_index)
        return _apply_geometric_record(sample, record)


@dataclass
class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    p: float = 0.5

    def __post_init__(self) -> None:
        self.p = _probability(self.p)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = _image_of(sample).shape[-2:]
        return _apply_geometric_record(sample, FlipRecord((height, width), _coin(self.p, generator)))


@dataclass
class RandomRotate:
    """Rotate by an angle drawn uniformly from ``[min, max]`` degrees with probability ``p``.

    DARS trains with ``rotate: [-10, 10]`` at ``p = 0.5`` (the semseg ``RandRotate`` of its
    configs; docs/reference_code.md, "DARS: training settings"). The image's new corners get
    ``pad_value``, labels ``ignore_index``, so they are never learnt from.
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
        height, width = _image_of(sample).shape[-2:]
        angle = _uniform(self.min, self.max, generator) if _coin(self.p, generator) else 0.0
        return _apply_geometric_record(sample, RotateRecord((height, width), angle, self.pad_value, self.ignore_index))


@dataclass
class KeepFullFrame:
    """Keep the view as it is here as ``sample["full_image"]`` (float ``[3, H, W]``) and mark the place in ``replay``.

    Put before the random geometry, it keeps the un-augmented frame a teacher can see whole while
    the student sees the crop (CPSL's ``img_full``); the records after its :class:`~.records.FullFrameRecord`
    take that frame to the view (:func:`records_after_full_frame`). Recipe ``cpsl`` inserts it itself
    where ``method.teacher_view=full_frame`` needs it.
    """

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        image = _image_of(sample)
        height, width = image.shape[-2:]
        return _with_record(sample, FullFrameRecord((height, width)), **{FULL_IMAGE_KEY: image})


def records_after_full_frame(records: Sequence[Record]) -> list[Record]:
    """The records after the :class:`~.records.FullFrameRecord` of ``records``: from the kept full frame to the view.

    Raises:
        ValueError: the records hold no :class:`~.records.FullFrameRecord`.
    """
    for index, record in enumerate(records):
        if isinstance(record, FullFrameRecord):
            return list(records[index + 1 :])
    raise ValueError("the view's records hold no FullFrameRecord: its pipeline did not keep a full frame (keep_full_frame)")
