"""Inference at evaluation time: fixed size, flip, multi-scale and sliding-window prediction.

Every path returns class probabilities at the size the caller asks for (the label size),
upsampled bilinearly from the network's output stride, as the papers score predictions
against full-resolution labels (docs/datasets/cityscapes.md, "Preprocessing and evaluation in the
reference code").
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EvalConfig


def _forward_probs(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    logits = model(images).logits.float()
    logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)


def _sliding_window_probs(
    model: nn.Module, images: torch.Tensor, window: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """Average of window predictions, stride 2/3 of the window (DARS/PSPNet evaluation)."""
    height, width = images.shape[-2:]
    win_h, win_w = min(window[0], height), min(window[1], width)
    stride_h, stride_w = max(1, math.ceil(win_h * 2 / 3)), max(1, math.ceil(win_w * 2 / 3))
    tops = list(range(0, max(height - win_h, 0) + 1, stride_h))
    lefts = list(range(0, max(width - win_w, 0) + 1, stride_w))
    if tops[-1] + win_h < height:
        tops.append(height - win_h)
    if lefts[-1] + win_w < width:
        lefts.append(width - win_w)
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for top in tops:
        for left in lefts:
            crop = images[..., top : top + win_h, left : left + win_w]
            probs = _forward_probs(model, crop, (win_h, win_w))
            if total is None:
                total = torch.zeros(images.shape[0], probs.shape[1], height, width, device=images.device)
            total[..., top : top + win_h, left : left + win_w] += probs
            count[..., top : top + win_h, left : left + win_w] += 1
    assert total is not None
    probs = total / count
    if (height, width) != tuple(out_size):
        probs = F.interpolate(probs, size=out_size, mode="bilinear", align_corners=False)
    return probs


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    out_size: Sequence[int] | None = None,
    cfg: EvalConfig | None = None,
) -> torch.Tensor:
    """Class probabilities for a batch, averaged over the configured scales and flips.

    Shape:
        - images: ``[N, 3, H, W]`` RGB in [0, 1]
        - returns: ``[N, C, *out_size]`` (``out_size`` defaults to ``(H, W)``)

    ``cfg.size`` resizes the input first (e.g. 512x1024 for a 1024x2048 Cityscapes image),
    each scale multiplies that size; ``cfg.sliding_window`` runs windows of that size.
    """
    cfg = cfg or EvalConfig()
    out_height, out_width = out_size if out_size is not None else images.shape[-2:]
    base = tuple(cfg.size) if cfg.size is not None else tuple(images.shape[-2:])
    total: torch.Tensor | None = None
    views = 0
    for scale in cfg.scales:
        size = (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
        scaled = images if size == tuple(images.shape[-2:]) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False
        )
        for flip in (False, True) if cfg.flip else (False,):
            view = scaled.flip(-1) if flip else scaled
            if cfg.sliding_window is not None:
                probs = _sliding_window_probs(model, view, cfg.sliding_window, (out_height, out_width))
            else:
                probs = _forward_probs(model, view, (out_height, out_width))
            probs = probs.flip(-1) if flip else probs
            total = probs if total is None else total + probs
            views += 1
    assert total is not None
    return total / views
