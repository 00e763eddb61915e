"""DAFormer's training strategies (Hoyer et al., "DAFormer: Improving Network Architectures and Training
Strategies for Domain-Adaptive Semantic Segmentation", CVPR 2022, Sec. 3.3), as functions on tensors.

The network (Mix Transformer encoder, context-aware fusion decoder) is
:class:`segadapt.models.DAFormer`; the training loop that uses these is the ``daformer`` recipe
(docs/daformer.md). Three strategies on top of DACS self-training:

- **Rare-class sampling** (Eq. 6): source images are drawn class first, with
  ``P(c) = softmax((1 - f_c) / T)`` over the source's class pixel frequencies ``f_c``
  (:func:`rare_class_probabilities`), then uniformly among the images holding enough pixels of ``c``
  (:func:`rare_class_candidates`, :func:`sample_by_class`).
- **Thing-class ImageNet feature distance** (Eq. 7-9): the L2 distance between the bottleneck features
  of the trained encoder and a frozen copy of its ImageNet weights, over the pixels of the thing
  classes (:func:`feature_distance`), where a feature cell counts for a class when that class
  fills at least ``r`` of it (:func:`downscale_labels_by_ratio`, ``r = 0.75``).
- **Pseudo-label crop**: the ego-vehicle hood and the rectification border of Cityscapes
  (top 15, bottom 120 rows of a 512-row crop) get pseudo-label weight 0 (:func:`ignore_border_rows`),
  from the authors' code.

Examples:
    >>> rare_class_probabilities(torch.tensor([90, 9, 1, 0]), temperature=1.0).round(decimals=3)
    tensor([0.1760, 0.3960, 0.4280, 0.0000], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import DataError
from .common import sample_by_class

__all__ = [
    "downscale_labels_by_ratio",
    "feature_distance",
    "ignore_border_rows",
    "rare_class_candidates",
    "rare_class_distribution",
    "rare_class_probabilities",
    "sample_by_class",
    "thing_class_mask",
]


def rare_class_probabilities(class_pixels: torch.Tensor, temperature: float) -> torch.Tensor:
    """DAFormer Eq. 6: ``P(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T)``, ``f_c = n_c / sum n``.

    The sum runs over the classes present in the source (``n_c > 0``, as the authors' code builds its
    class list from the counted pixels); an absent class has no image to draw and gets 0. A small
    temperature ``T`` concentrates the draws on the rare classes (DAFormer: ``T = 0.01``).

    Args:
        class_pixels: ``[C]`` pixels of each class over the source labels.
        temperature: ``T > 0``.

    Returns:
        float64 ``[C]``, summing to 1.

    Raises:
        DataError: no class has a pixel.

    Examples:
        >>> rare_class_probabilities(torch.tensor([50, 50]), temperature=0.01).tolist()
        [0.5, 0.5]
    """
    if temperature <= 0:
        raise ValueError(f"the rare-class sampling temperature must be positive, got {temperature}")
    counts = class_pixels.double()
    present = counts > 0
    if not present.any():
        raise DataError("rare-class sampling: the source labels hold no pixel of any class")
    frequency = counts / counts.sum()
    scores = ((1.0 - frequency) / temperature).masked_fill(~present, float("-inf"))
    return torch.softmax(scores, dim=0)


def rare_class_candidates(image_class_pixels: torch.Tensor, min_pixels: float) -> torch.Tensor:
    """bool ``[I, C]``: image ``i`` may be drawn for class ``c`` when it holds more than ``min_pixels`` of it.

    DAFormer counts the pixels on the full-size source label maps and uses ``min_pixels = 3000``, so a
    sampled rare class is big enough to survive the random crop.

    Shape:
        - image_class_pixels: ``[I, C]`` pixels of each class in each source label map

    Examples:
        >>> rare_class_candidates(torch.tensor([[4000, 10], [100, 3500]]), 3000).tolist()
        [[True, False], [False, True]]
    """
    return image_class_pixels > min_pixels


def rare_class_distribution(
    image_class_pixels: torch.Tensor, temperature: float, min_pixels: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAFormer's rare-class sampling table: class probabilities (Eq. 6) and each class's candidate images.

    A class present in the source but in no image with more than ``min_pixels`` of it cannot be
    drawn (the authors' code stops with an assertion there); it gets probability 0 and the others
    keep their Eq. 6 ratios.

    Args:
        image_class_pixels: ``[I, C]`` pixels of each class in each source label map.
        temperature: ``T`` of Eq. 6.
        min_pixels: an image is a candidate for ``c`` with more than this many pixels of it.

    Returns:
        ``(probabilities [C] float64, candidates [I, C] bool)``, ready for :func:`sample_by_class`.

    Examples:
        >>> pixels = torch.tensor([[5000, 4000, 0], [9000, 0, 100]])  # class 2 never reaches 3000
        >>> probabilities, candidates = rare_class_distribution(pixels, temperature=0.1, min_pixels=3000)
        >>> probabilities.round(decimals=3).tolist(), candidates[:, 1].tolist()
        ([0.004, 0.996, 0.0], [True, False])
    """
    candidates = rare_class_candidates(image_class_pixels, min_pixels)
    probabilities = rare_class_probabilities(image_class_pixels.sum(dim=0), temperature)
    probabilities = probabilities * candidates.any(dim=0)
    if probabilities.sum() <= 0:
        raise DataError(f"rare-class sampling: no source image holds more than {min_pixels:g} pixels of any class")
    return probabilities / probabilities.sum(), candidates


def downscale_labels_by_ratio(labels: torch.Tensor, factor: int, min_ratio: float, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Labels of ``factor x factor`` cells: the cell's majority class when it fills at least ``min_ratio`` of it.

    DAFormer's mask for the feature distance (Sec. 3.3, ``r = 0.75``): the ground truth is brought to
    the bottleneck's resolution by average-pooling one-hot maps; a cell whose most frequent label (the
    ignore value counts as a label here) covers less than ``min_ratio`` of its pixels, or whose most
    frequent label is the ignore value, gets ``ignore_index``. Rows and columns beyond a multiple of
    ``factor`` are dropped, as average pooling does.

    Shape:
        - labels: ``[N, H, W]``; output ``[N, H // factor, W // factor]``

    Examples:
        >>> labels = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 9]]])
        >>> downscale_labels_by_ratio(labels, 2, 0.75, num_classes=2, ignore_index=9).tolist()
        [[[1, 0]]]
    """
    if factor < 1:
        raise ValueError(f"downscale factor must be >= 1, got {factor}")
    substitute = num_classes  # the ignore value as one more label, so it takes part in the vote
    with_ignore = labels.masked_fill(labels == ignore_index, substitute)
    one_hot = F.one_hot(with_ignore.long(), num_classes + 1).permute(0, 3, 1, 2).float()
    shares = F.avg_pool2d(one_hot, kernel_size=factor)
    ratio, majority = shares.max(dim=1)
    return majority.masked_fill((majority == substitute) | (ratio < min_ratio), ignore_index)


def feature_distance(student: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DAFormer Eq. 7-9: mean over the masked cells of ``||F_student - F_ImageNet||_2`` (the norm along channels).

    With ``mask`` all ``False`` (no thing-class cell in the batch) the loss is 0 with zero gradient;
    the authors' code returns the mean of an empty set (NaN) there, whose gradient is zero too.

    Shape:
        - student, frozen: ``[N, D, h, w]``; mask: ``[N, h, w]`` bool or None (every cell)

    Examples:
        >>> student = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])  # two cells: (3, 4) and (0, 1)
        >>> feature_distance(student, torch.zeros_like(student)).item()
        3.0
        >>> feature_distance(student, torch.zeros_like(student), torch.tensor([[[False, True]]])).item()
        1.0
    """
    distance = torch.linalg.vector_norm(student - frozen.detach(), dim=1)
    if mask is None:
        return distance.mean()
    if not mask.any():
        return (distance * 0.0).sum()
    return distance[mask].mean()


def thing_class_mask(labels: torch.Tensor, thing_classes: Sequence[int]) -> torch.Tensor:
    """bool, True where ``labels`` is one of ``thing_classes`` (same shape as ``labels``).

    Examples:
        >>> thing_class_mask(torch.tensor([[0, 13, 255]]), [11, 13]).tolist()
        [[False, True, False]]
    """
    things = torch.as_tensor(list(thing_classes), device=labels.device, dtype=labels.dtype)
    return torch.isin(labels, things)


def ignore_border_rows(weight: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """``weight`` ``[N, H, W]`` with its first ``top`` and last ``bottom`` rows set to 0 (DAFormer's pseudo-label crop).

    Examples:
        >>> ignore_border_rows(torch.ones(1, 4, 1), top=1, bottom=2).flatten().tolist()
        [0.0, 1.0, 0.0, 0.0]
    """
    weight = weight.clone()
    if top > 0:
        weight[:, :top] = 0
    if bottom > 0:
        weight[:, -bottom:] = 0
    return weight
