"""Colourise train-id maps with a dataset's palette and tile images into a grid (PIL only)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..data.classes import ClassInfo


def colorize(label: np.ndarray, classes: ClassInfo) -> np.ndarray:
    """``[H, W]`` train ids (255 = ignore, black) -> ``[H, W, 3]`` uint8 colours.

    Examples:
        >>> from segadapt.data.classes import CITYSCAPES_CLASSES
        >>> colorize(np.array([[0, 255]]), CITYSCAPES_CLASSES).tolist()
        [[[128, 64, 128], [0, 0, 0]]]
    """
    return classes.palette()[np.asarray(label).astype(np.int64).clip(0, 255)]


def overlay(image: np.ndarray, label: np.ndarray, classes: ClassInfo, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised label over an ``[H, W, 3]`` uint8 image."""
    colours = colorize(label, classes).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str] = (), pad: int = 2) -> Image.Image:
    """Tile ``rows`` of equally sized ``[H, W, 3]`` uint8 arrays, with optional titles above the columns."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    title_h = 14 if column_titles else 0
    canvas = Image.new("RGB", (columns * (width + pad) + pad, title_h + len(rows) * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles):
        draw.text((pad + c * (width + pad), 1), title, fill="black")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (pad + c * (width + pad), title_h + pad + r * (height + pad)))
    return canvas
