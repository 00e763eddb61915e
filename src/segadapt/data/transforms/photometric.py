"""Photometric transforms: colour jitter, Gaussian blur, cutout, and the DACS/DAFormer strong augmentation.

They change the image only (cutout may also erase the label), never the geometry, so their records
are skipped by :func:`~segadapt.data.transforms.geometry.replay_geometric`. The colour maths follows
torchvision's ColorJitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..classes import IGNORE_INDEX
from .common import (
    Sample,
    _coin,
    _erase_boxes,
    _image_of,
    _interval,
    _jitter_range,
    _probability,
    _randint,
    _randperm,
    _round,
    _uniform_in,
    _with_record,
)
from .records import BlurRecord, CutoutRecord, JitterRecord, Record

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GRAY_WEIGHTS, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * weights).sum(dim=-3, keepdim=True)


def _blend(image: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp(0.0, 1.0)


def rgb_to_hsv(image: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``[..., 3, H, W]`` RGB in [0, 1] -> HSV with hue in [0, 1) (the torchvision algorithm).

    ``eps`` is added to the value in the saturation's denominator, as kornia's conversion does (1e-6).
    """
    red, green, blue = image.unbind(-3)
    value, _ = image.max(dim=-3)
    chroma = value - image.min(dim=-3).values
    gray = chroma == 0
    saturation = chroma / (torch.where(gray, torch.ones_like(value), value) + eps)
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


def _shift_hue(image: torch.Tensor, shift: float, eps: float = 0.0) -> torch.Tensor:
    hsv = rgb_to_hsv(image, eps)
    hsv = torch.stack((torch.remainder(hsv[..., 0, :, :] + shift, 1.0), hsv[..., 1, :, :], hsv[..., 2, :, :]), dim=-3)
    return hsv_to_rgb(hsv)


def _scale_saturation(image: torch.Tensor, factor: float, eps: float) -> torch.Tensor:
    hue, saturation, value = rgb_to_hsv(image, eps).unbind(-3)
    return hsv_to_rgb(torch.stack((hue, (saturation * factor).clamp(0.0, 1.0), value), dim=-3))


JITTER_MATHS = ("torchvision", "kornia")
"""The colour maths of :func:`apply_color_jitter`: torchvision's ColorJitter or kornia 0.5's (the DACS code's)."""

_KORNIA_HSV_EPS = 1e-6  # kornia's rgb_to_hsv default


def apply_color_jitter(image: torch.Tensor, record: JitterRecord, maths: str = "torchvision") -> torch.Tensor:
    """Apply recorded colour factors to ``[..., 3, H, W]`` RGB in [0, 1]; each result is clipped to [0, 1].

    ``maths="torchvision"`` (torchvision's ColorJitter): brightness scales, contrast blends with the
    image's mean luma, saturation blends with the per-pixel luma, hue rotates the HSV hue by
    ``record.hue`` turns. ``maths="kornia"`` (kornia 0.5's ColorJitter, which the DACS and DAFormer
    code use): brightness adds ``brightness - 1``, contrast multiplies every channel by ``contrast``,
    saturation scales the HSV saturation (clipped to [0, 1]), hue rotates as above; kornia's HSV
    saturation divides by ``value + 1e-6``. Factors at identity are skipped in both.
    """
    if maths not in JITTER_MATHS:
        raise ValueError(f"maths must be one of {', '.join(JITTER_MATHS)}, got {maths!r}")
    kornia = maths == "kornia"
    for op in record.order:
        if op == 0 and record.brightness != 1.0:
            image = (image + (record.brightness - 1.0)).clamp(0.0, 1.0) if kornia else _blend(image, 0.0, record.brightness)
        elif op == 1 and record.contrast != 1.0:
            if kornia:
                image = (image * record.contrast).clamp(0.0, 1.0)
            else:
                image = _blend(image, _grayscale(image).mean(dim=(-3, -2, -1), keepdim=True), record.contrast)
        elif op == 2 and record.saturation != 1.0:
            image = _scale_saturation(image, record.saturation, _KORNIA_HSV_EPS) if kornia else _blend(image, _grayscale(image), record.saturation)
        elif op == 3 and record.hue != 0.0:
            image = _shift_hue(image, record.hue, _KORNIA_HSV_EPS if kornia else 0.0)
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
    maths: str = "torchvision"

    def __post_init__(self) -> None:
        if self.maths not in JITTER_MATHS:
            raise ConfigError(f"colour jitter maths must be one of {', '.join(JITTER_MATHS)}, got {self.maths!r}")
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
        brightness, contrast, saturation, hue = [_uniform_in(interval, generator) for interval in intervals]
        order = tuple(_randperm(4, generator).tolist())
        return JitterRecord(brightness, contrast, saturation, hue, order=order)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        record = self.draw(generator)
        return _with_record(sample, record, image=apply_color_jitter(_image_of(sample), record, self.maths))


def _gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of radius ``ceil(3 sigma)`` (at least 1)."""
    return _gaussian_taps(sigma, max(1, math.ceil(3.0 * sigma)))


BLUR_KERNELS = ("three_sigma", "tenth_of_side")
"""How wide a blur kernel is: ``2 ceil(3 sigma) + 1`` taps, or DACS's :func:`tenth_of_side_kernel`."""


def tenth_of_side_kernel(height: int, width: int) -> tuple[int, int]:
    """DACS's blur kernel size (its ``gaussian_blur``): per axis the largest odd number of taps up to
    ``ceil(0.1 * side)``, so 51 taps on a 512-pixel side and 1 (no blur) up to 20 pixels.

    Examples:
        >>> tenth_of_side_kernel(512, 1024), tenth_of_side_kernel(32, 48), tenth_of_side_kernel(8, 8)
        ((51, 103), (3, 5), (1, 1))
    """

    def taps(side: int) -> int:
        ceiling = math.ceil(0.1 * side)  # the same float product as the code's np.ceil(0.1 * side)
        return ceiling if ceiling % 2 else ceiling - 1

    return taps(height), taps(width)


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` or ``[N, C, H, W]`` with reflect padding; ``sigma <= 0`` is identity.

    The kernel radius is ``ceil(3 sigma)`` on both axes, or ``kernel_size // 2`` per axis when ``kernel_size``
    (odd taps along height and width, e.g. :func:`tenth_of_side_kernel`) is given; it is capped below the
    image size (reflect padding needs it) and sums to 1, so constant images are unchanged and the mean is
    preserved up to border effects.
    """
    if sigma <= 0:
        return image
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    height, width = batch.shape[-2:]
    if kernel_size is None:
        radius_y = radius_x = min(max(1, math.ceil(3.0 * sigma)), height - 1, width - 1)
    else:
        radius_y, radius_x = min(kernel_size[0] // 2, height - 1), min(kernel_size[1] // 2, width - 1)
    if radius_y < 1 and radius_x < 1:
        return image
    channels = batch.shape[1]
    out = F.pad(batch, (radius_x, radius_x, radius_y, radius_y), mode="reflect")
    if radius_x >= 1:
        kernel = _gaussian_taps(sigma, radius_x).to(batch.device, batch.dtype)
        out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    if radius_y >= 1:
        kernel = _gaussian_taps(sigma, radius_y).to(batch.device, batch.dtype)
        out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out.reshape(image.shape)


@dataclass
class GaussianBlur:
    """Blur the image with a sigma drawn from ``sigma`` ``[min, max]`` pixels, with probability ``p``.

    Defaults follow DACS/DAFormer's strong augmentation (sigma U(0.15, 1.15), p = 0.5). ``kernel`` is one
    of :data:`BLUR_KERNELS`: ``"three_sigma"`` (``2 ceil(3 sigma) + 1`` taps) or ``"tenth_of_side"``
    (DACS's code, :func:`tenth_of_side_kernel` of the image).
    """

    sigma: Sequence[float] = (0.15, 1.15)
    p: float = 0.5
    kernel: str = "three_sigma"

    def __post_init__(self) -> None:
        self.sigma = _interval(self.sigma, "sigma", low=0.0)
        self.p = _probability(self.p)
        if self.kernel not in BLUR_KERNELS:
            raise ConfigError(f"blur kernel must be one of {', '.join(BLUR_KERNELS)}, got {self.kernel!r}")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        sigma = _uniform_in(self.sigma, generator) if _coin(self.p, generator) else 0.0
        image = _image_of(sample)
        size = tenth_of_side_kernel(*image.shape[-2:]) if self.kernel == "tenth_of_side" else None
        return _with_record(sample, BlurRecord(sigma), image=gaussian_blur(image, sigma, size))


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
        box_height = max(1, _round(_uniform_in(self.size, generator) * height))
        box_width = max(1, _round(_uniform_in(self.size, generator) * width))
        return _randint(height - box_height, generator), _randint(width - box_width, generator), box_height, box_width

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        image = _image_of(sample)
        boxes: tuple[tuple[int, int, int, int], ...] = ()
        if _coin(self.p, generator):
            height, width = image.shape[-2:]
            boxes = tuple(self._draw_box(height, width, generator) for _ in range(self.num_boxes))
        erase = self.erase_label and "label" in sample
        assert isinstance(self.fill, tuple)  # __post_init__ made it one
        record = CutoutRecord(boxes, self.fill, erase)
        fill = torch.tensor(self.fill, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        updates = {"image": _erase_boxes(image, boxes, fill)}
        if erase:
            updates["label"] = _erase_boxes(sample["label"], boxes, self.ignore_index)
        return _with_record(sample, record, **updates)


# --------------------------------------------------------------------------- batch-level strong augmentation (self-training)


def strong_augment(images: torch.Tensor, generator: torch.Generator | None = None, *,
                   jitter_strength: float = 0.2, jitter_p: float = 0.8, blur_sigma: Sequence[float] = (0.15, 1.15),
                   blur_p: float = 0.5, coins: str = "image", blur_kernel: str = "three_sigma",
                   jitter_maths: str = "torchvision") -> tuple[torch.Tensor, list[list[Record]]]:
    """DACS/DAFormer strong augmentation of a batch: colour jitter then Gaussian blur.

    DACS jitters with strength 0.2 on brightness, contrast, saturation and hue when ``U(0, 1) > 0.2``
    (``jitter_p`` 0.8) and blurs with sigma ``U(0.15, 1.15)`` when ``U(0, 1) > 0.5``. ``blur_kernel``
    (:class:`GaussianBlur`'s ``kernel``): ``"tenth_of_side"`` is DACS's kernel of 10 % of the image side,
    ``"three_sigma"`` the ``2 ceil(3 sigma) + 1`` taps, which drop only weights below 1e-2.
    ``jitter_maths`` (:func:`apply_color_jitter`): ``"kornia"`` is the DACS code's colour maths.

    ``coins`` says how often the two apply-or-not coins are tossed. ``"image"``: per image.
    ``"batch"``: once for the whole batch, the way the DACS/DAFormer code draws them (one ``U(0, 1)``
    each per training step, shared by every image of the batch), so a batch is jittered (blurred)
    entirely or not at all. The jitter factors, their order and the blur sigma are drawn per image
    in both cases (the authors' code calls its jitter and blur once per image).

    Returns:
        the augmented ``[N, 3, H, W]`` batch and, per image, ``[JitterRecord, BlurRecord]``.

    Examples:
        >>> _, records = strong_augment(torch.rand(4, 3, 8, 8), torch.Generator().manual_seed(0), coins="batch")
        >>> len({record[1].sigma > 0 for record in records})  # blurred all together or not at all
        1
    """
    if coins not in ("image", "batch"):
        raise ValueError(f"coins must be 'image' or 'batch', got {coins!r}")
    if coins == "batch":  # toss each coin once; the transforms below then always (p 1) or never (p 0) apply
        jitter_p = float(_coin(jitter_p, generator))
        blur_p = float(_coin(blur_p, generator))
    jitter = ColorJitter(jitter_strength, jitter_strength, jitter_strength, jitter_strength, p=jitter_p, maths=jitter_maths)
    blur = GaussianBlur(blur_sigma, p=blur_p, kernel=blur_kernel)
    outputs, params = [], []
    for image in images:
        view = blur(jitter({"image": image}, generator), generator)
        outputs.append(view["image"])
        params.append(view["replay"])
    return torch.stack(outputs), params
