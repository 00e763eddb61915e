"""HRDA's training pieces on tensors (Hoyer et al., "HRDA: Context-Aware High-Resolution Domain-Adaptive
Semantic Segmentation", ECCV 2022).

The network (context view, detail crop, scale attention, fusion) is :mod:`segadapt.models.hrda`; the
training recipe is ``hrda`` (docs/hrda.md). Here:

- :func:`labels_in_box`: the labels (or weights) under the detail crop, the box scaled from the input
  image's pixels to the labels' size;
- :func:`hrda_loss`: Eq. 6, ``(1 - lambda_d) L(y_fused) + lambda_d L(y_detail, labels in the crop)``,
  for any per-output loss ``L`` (the engine passes its supervised-loss rule, so BLV composes).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.base import DetailOutput
from ..models.hrda import crop_box

__all__ = ["hrda_loss", "labels_in_box"]


def labels_in_box(labels: torch.Tensor, detail: DetailOutput) -> torch.Tensor:
    """``labels`` ``[N, H, W]`` (or a weight map) cut to the detail crop, the box scaled to the labels' size.

    The authors crop labels of the input's size with the box itself; a label map of another size
    (a network's output grid) gets the box scaled by the size ratio, truncated.

    Examples:
        >>> detail = DetailOutput(torch.zeros(1, 2, 1, 1), (2, 4, 0, 2), (4, 4), 0.1)
        >>> labels_in_box(torch.arange(16).view(1, 4, 4), detail).tolist()
        [[[8, 9], [12, 13]]]
        >>> labels_in_box(torch.arange(4).view(1, 2, 2), detail).tolist()  # labels at half the input size
        [[[2]]]
    """
    height, width = detail.input_size
    y1, y2, x1, x2 = detail.box
    ratio_h, ratio_w = labels.shape[-2] / height, labels.shape[-1] / width
    return crop_box(labels, (int(y1 * ratio_h), int(y2 * ratio_h), int(x1 * ratio_w), int(x2 * ratio_w)))


def hrda_loss(
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    fused_logits: torch.Tensor,
    detail: DetailOutput,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """HRDA Eq. 6: ``(1 - w) loss(fused, labels) + w loss(detail logits, labels in the crop)``, ``w = detail.loss_weight``.

    ``loss(logits, labels, weight)`` is the per-output loss (it upsamples the logits to the labels);
    ``weight`` (per pixel, ``[N, H, W]``) is cut to the crop as the labels are. With ``w = 0`` the
    detail term is not computed (the authors' ``hr_loss_weight == 0``).

    Examples:
        >>> ce = lambda logits, labels, weight: torch.nn.functional.cross_entropy(logits, labels)
        >>> detail = DetailOutput(torch.tensor([[[[0.0]], [[9.0]]]]), (0, 1, 0, 1), (1, 2), 0.1)
        >>> fused = torch.zeros(1, 2, 1, 2)  # uniform: CE = log 2
        >>> round(float(hrda_loss(ce, fused, detail, torch.tensor([[[1, 1]]]))), 5)  # 0.9 log 2 + 0.1 CE(detail)
        0.62385
    """
    fused_term = loss(fused_logits, labels, weight)
    if detail.loss_weight == 0:
        return fused_term
    detail_weight = None if weight is None else labels_in_box(weight, detail)
    detail_term = loss(detail.logits, labels_in_box(labels, detail), detail_weight)
    return (1 - detail.loss_weight) * fused_term + detail.loss_weight * detail_term
