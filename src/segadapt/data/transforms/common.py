"""Plumbing shared by the transform modules: sample types, random draws, config checks, sample helpers.

Every random number of the transforms is drawn here, from the ``torch.Generator`` passed to the
call or from the global torch RNG when none is given, so the draw order of a pipeline is the order
of its calls. Config values are checked here too, raising :class:`~segadapt.errors.ConfigError`
with the key at fault.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import torch

from ...errors import ConfigError, DataError
from .records import Record

Kind = Literal["image", "label", "soft"]
Sample = dict[str, Any]
Transform = Callable[..., Sample]


# --------------------------------------------------------------------------- random draws


def _rand(generator: torch.Generator | None) -> float:
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand((), generator=generator, device=device))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * _rand(generator)


def _uniform_in(interval: float | Sequence[float], generator: torch.Generator | None) -> float:
    """:func:`_uniform` over a transform's ``(low, high)`` field, which its ``__post_init__`` checked."""
    assert not isinstance(interval, (int, float)), interval  # _interval / _jitter_range made it (low, high)
    low, high = interval
    return _uniform(low, high, generator)


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


# --------------------------------------------------------------------------- sample plumbing


def _image_of(sample: Sample) -> torch.Tensor:
    image = sample.get("image")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(f"sample {sample.get('name', '?')!r}: 'image' must be a float tensor [3, H, W], got {found}")
    return image


def _with_record(sample: Sample, record: Record, **updates: Any) -> Sample:
    return {**sample, **updates, "replay": [*sample.get("replay", []), record]}


def _erase_boxes(x: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], value: Any) -> torch.Tensor:
    # shared by Cutout (which erases) and valid_mask (which masks what Cutout erased)
    x = x.clone()
    for top, left, height, width in boxes:
        x[..., top : top + height, left : left + width] = value
    return x


# --------------------------------------------------------------------------- config validation


def _pair(value: Any, key: str) -> tuple[int, int]:
    """``int`` or ``[h, w]`` -> ``(h, w)`` of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ConfigError(f"{key} must be a positive int or [height, width] of positive ints, got {value!r}")
    return pair


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
