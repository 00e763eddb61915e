"""Supervised segmentation losses, selected by the ``loss`` section of the config."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import LossConfig

SegLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of stride-level logits ``[N, C, h, w]`` to the label size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_seg_loss(cfg: LossConfig, ignore_index: int = 255) -> SegLoss:
    """``loss(logits [N,C,h,w] at any stride, labels [N,H,W]) -> scalar``, logits upsampled to the labels."""

    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(logits, tuple(labels.shape[-2:]))
        if not (labels != ignore_index).any():
            return logits.sum() * 0.0  # keeps the graph connected for DDP when a crop is all ignore
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)

    return cross_entropy
