"""Colourised predictions and figures."""

from .palette import colorize, image_grid, overlay

__all__ = ["colorize", "image_grid", "overlay"]
