"""Evaluation metrics: confusion matrix, IoU/mIoU/MPA, the 19/16/13-class protocols, result
tables and pseudo-label quality. See each module's docstring for the definitions used.

Examples:
    >>> import torch
    >>> cm = ConfusionMatrix(19, ignore_index=255)
    >>> cm.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))
    >>> compute_scores(cm).miou, scores_for_protocol(cm, 16).miou
    (1.0, 1.0)
"""

from __future__ import annotations

from .boundary import band_target, boundary_band
from .confusion import (
    ConfusionMatrix,
    SegScores,
    compute_scores,
    confusion_counts,
    mean_iou,
    mean_pixel_accuracy,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
)
from .protocols import PROTOCOLS, Protocol, get_protocol, protocol_indices, scores_for_protocol
from .pseudo_label_quality import PseudoLabelStats, kl_divergence, pseudo_label_stats
from .table import format_table

__all__ = [
    "band_target",
    "boundary_band",
    "ConfusionMatrix",
    "PROTOCOLS",
    "Protocol",
    "PseudoLabelStats",
    "SegScores",
    "compute_scores",
    "confusion_counts",
    "format_table",
    "get_protocol",
    "kl_divergence",
    "mean_iou",
    "mean_pixel_accuracy",
    "per_class_accuracy",
    "per_class_iou",
    "pixel_accuracy",
    "protocol_indices",
    "pseudo_label_stats",
    "scores_for_protocol",
]
