"""The benchmark's appearance: materials, a domain's camera style, and :func:`render`, which colours a scene.

A :class:`DomainStyle` holds what each material looks like (:class:`Material`: colours, jitter,
texture) and the camera effects of a domain (lighting, saturation, colour cast, vignetting, noise,
blur). The two domains' styles are in :mod:`segadapt.data.benchmark.domains`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .scene import _ID, _Canvas


@dataclass(frozen=True)
class Material:
    """The colours an instance may take (RGB in [0, 1]), their per-instance jitter, texture amplitude."""

    colors: tuple[tuple[float, float, float], ...]
    jitter: float = 0.04
    texture: float = 0.0


@dataclass(frozen=True)
class DomainStyle:
    """How one domain renders: materials plus camera effects."""

    materials: dict[str, Material]
    texture_cell: float  # pixels per texture cell
    sky_gradient: float  # sky brightness change from the top of the image to the horizon
    lighting: tuple[float, float]  # per-image gain range
    saturation: tuple[float, float]  # per-image saturation range (1: unchanged)
    color_cast: float  # per-image, per-channel gain spread
    vignette: float
    noise: float  # sensor noise standard deviation
    blur: float  # Gaussian blur radius in pixels
    windows: float  # how much façade windows darken


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1]: two octaves of bilinearly upsampled random grids."""
    total = np.zeros((height, width), dtype=np.float32)
    for octave_cell, weight in ((cell, 0.65), (cell * 4, 0.35)):
        grid_h, grid_w = int(height / octave_cell) + 2, int(width / octave_cell) + 2
        grid = Image.fromarray(rng.uniform(-1, 1, (grid_h, grid_w)).astype(np.float32), mode="F")
        scaled = grid.resize((int(grid_w * octave_cell), int(grid_h * octave_cell)), Image.Resampling.BILINEAR)
        total += weight * np.asarray(scaled)[:height, :width]
    return total


def render(canvas: _Canvas, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Colour a laid-out scene in a domain's style. Returns an ``[H, W, 3]`` uint8 RGB image."""
    height, width = canvas.label.shape
    colors = np.empty((len(canvas.materials), 3), dtype=np.float32)
    texture = np.empty(len(canvas.materials), dtype=np.float32)
    for index, (name, shade) in enumerate(canvas.materials):
        material = style.materials[name]
        base = np.asarray(material.colors[rng.integers(len(material.colors))])
        colors[index] = np.clip(base + rng.normal(0.0, material.jitter, 3), 0, 1) * shade
        texture[index] = material.texture
    image = colors[canvas.region]
    noise = _value_noise(rng, height, width, style.texture_cell)
    image *= (1.0 + texture[canvas.region] * noise)[..., None]
    windows = _window_mask(canvas)
    image[windows] *= 1.0 - style.windows
    rows = canvas.rows / height
    sky = canvas.label == _ID["sky"]
    image[sky] *= (1.0 - style.sky_gradient * (1.0 - np.broadcast_to(rows, sky.shape)[sky] * 2.0))[:, None]
    luminance = image @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    image = luminance[..., None] + rng.uniform(*style.saturation) * (image - luminance[..., None])
    image *= _lighting(rng, style, height, width)
    image += rng.normal(0.0, style.noise, image.shape).astype(np.float32)
    pixels = Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if style.blur > 0:
        pixels = pixels.filter(ImageFilter.GaussianBlur(style.blur))
    return np.asarray(pixels)


def _window_mask(canvas: _Canvas) -> np.ndarray:
    """Rows and columns of windows on façades, from each façade pixel's height and depth."""
    z, depth = canvas.facade_z, canvas.facade_depth
    with np.errstate(invalid="ignore"):  # NaN off façades compares False
        mask = (np.mod(z, 3.0) > 1.2) & (np.mod(depth, 3.0) > 1.4) & (z > 2.0)
    return mask & (canvas.label == _ID["building"])


def _lighting(rng: np.random.Generator, style: DomainStyle, height: int, width: int) -> np.ndarray:
    """Global gain, a colour cast and vignetting, as an ``[H, W, 3]`` multiplier."""
    gain = rng.uniform(*style.lighting)
    cast = 1.0 + rng.uniform(-style.color_cast, style.color_cast, 3)
    ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height - 0.5
    xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width - 0.5
    vignette = 1.0 - style.vignette * (xs**2 + ys**2) * 2.0
    return (gain * vignette)[..., None] * cast.astype(np.float32)
