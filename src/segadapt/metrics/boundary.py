"""Scores near label boundaries: the band of pixels within ``w`` pixels of a ground-truth boundary.

Segmentation papers measure boundary quality as the mIoU of the pixels in a narrow band around the
ground truth's object boundaries (the "trimap" of Kohli et al., IJCV 2009, used by DeepLab, Chen et al.,
TPAMI 2018, Fig. 5); HRDA (Hoyer et al., ECCV 2022) credits its high-resolution detail branch with
finer boundaries, which this band measures. A pixel lies on a boundary when one of its 8 neighbours holds another *valid* class
(an edge against ignored pixels is no boundary the labels can judge); the band is every pixel within
``width`` pixels (chessboard distance) of a boundary pixel. Counting the band's pixels into a
:class:`~segadapt.metrics.ConfusionMatrix` gives its per-class IoU, mIoU and accuracy as usual.

Examples:
    >>> import torch
    >>> target = torch.tensor([[0, 0, 0, 1, 1, 1]])
    >>> boundary_band(target, width=1, ignore_index=255).int().tolist()
    [[0, 1, 1, 1, 1, 0]]
    >>> band_target(target, width=1, ignore_index=255).tolist()
    [[255, 0, 0, 1, 1, 255]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def boundary_band(target: torch.Tensor, width: int, ignore_index: int) -> torch.Tensor:
    """Where ``target`` is within ``width`` pixels of a boundary between two valid classes.

    Shape:
        - target: ``[N, H, W]`` or ``[H, W]`` integer class ids, ``ignore_index`` where unlabelled
        - returns: a bool tensor of ``target``'s shape (ignored pixels may be inside the band; the
          confusion matrix leaves them out anyway)
    """
    if width < 1:
        raise ValueError(f"boundary band width must be at least 1 pixel, got {width}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    squeeze = target.dim() == 2
    labels = (target.unsqueeze(0) if squeeze else target).unsqueeze(1).float()  # [N, 1, H, W]
    valid = labels != ignore_index
    # The largest and the smallest valid class around each pixel: a valid pixel is on a boundary when
    # either differs from its own class. Ignored pixels count as -1 (for the max) and +inf (for the min).
    neighbour_max = F.max_pool2d(torch.where(valid, labels, -1.0), 3, stride=1, padding=1)
    neighbour_min = -F.max_pool2d(torch.where(valid, -labels, -float("inf")), 3, stride=1, padding=1)
    on_boundary = valid & ((neighbour_max > labels) | (neighbour_min < labels))
    band = F.max_pool2d(on_boundary.float(), 2 * width + 1, stride=1, padding=width) > 0
    band = band.squeeze(1)
    return band.squeeze(0) if squeeze else band


def band_target(target: torch.Tensor, width: int, ignore_index: int) -> torch.Tensor:
    """``target`` with every pixel outside the boundary band (:func:`boundary_band`) set to ``ignore_index``."""
    return torch.where(boundary_band(target, width, ignore_index), target, torch.full_like(target, ignore_index))
