"""Drawing: colourised predictions, image grids (:mod:`~segadapt.viz.palette`) and the report's figures (:mod:`~segadapt.viz.figures`).

Every function here takes arrays, tensors and numbers and draws them; nothing here reads a run,
loads a checkpoint or runs a network (that is :mod:`segadapt.commands`). ``figures`` needs
matplotlib and is not imported here.
"""

from .palette import colorize, image_grid, overlay

__all__ = ["colorize", "image_grid", "overlay"]
