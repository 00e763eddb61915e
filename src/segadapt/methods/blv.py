"""BLV: balanced logit variation (Wang et al., "Balancing Logit Variation for Long-tailed Semantic Segmentation", CVPR 2023).

During training, every logit of class ``c`` gets a positive random offset that grows with the
rarity of ``c``::

    z'_c = z_c + |clamp(v, -1, 1)| * f_c,    v ~ N(0, sigma^2) per logit element,
    f_c  = (log N - log n_c) / max_j (log N - log n_j),    N = sum_j n_j,

and the loss is the cross-entropy of ``z'`` (supplement Alg. 1; the authors' ``BlvLoss`` at
HEAD e08cc6c; docs/reference_code.md, "BLV: offsets"). Inference uses the plain logits. Raising
the tail classes' logits during training makes the network push their scores further from the
other classes, which enlarges their margins (the "variation" covers a wider region in logit space).

Where the sources disagree, this module follows the authors' fixed code:

- **Offsets.** Alg. 1 prints ``torch.log(torch.sum(n) - torch.log(n))``, a misplaced
  parenthesis (issue #4 reports Eq. 3 differs from the code); the code computes
  ``log(sum n) - log(n_c)`` and divides by its maximum, so the rarest class gets 1. The
  pre-fix code (494d428) used ``max_j log n_j - log n_c``, giving the most frequent class 0.
- **Noise.** Alg. 1 writes ``clamp(0, 1)`` before ``abs()``, which would zero half the
  samples; the code and the supplement's text ("the delta(sigma) term is clamped into
  [0, 1]") take ``|clamp(v, -1, 1)|``. With sigma = 4-6 most samples saturate at 1 (80% for
  sigma = 4), so the variation is close to a fixed offset ``f_c``.
- **Sampling.** One independent draw per logit element (per image, class and pixel),
  as ``sampler.sample(pred.shape)``, after the logits are resized to the label size.
- **Reduction.** ``F.cross_entropy``'s mean over non-ignored pixels; mmseg's
  ``weight_reduce_loss`` also counts ignored pixels (as zeros) in the mean, a constant
  factor per batch.

sigma: 6 in the supplement for every task except SYNTHIA -> Cityscapes (4); the code's
default is 4. The temporal variant (supplement Sec. 3) is :func:`sigma_schedule`.

Use: the loss is the engine's ``loss.name: blv`` (:class:`segadapt.engine.losses.BLVSegLoss`,
docs/blv.md), which every recipe's cross-entropy terms go through; there is no second BLV loss.
This module holds its arithmetic, for the engine and for custom training loops:
``F.cross_entropy(blv_logits(logits, blv_offsets(counts), sigma), labels)`` in training and plain
cross-entropy in evaluation. Which CE terms of a UDA or semi-supervised recipe get the
variation (source only, or pseudo labels too) is not in the released code; it is the recipe's
choice (the reference keeps plain CE on auxiliary heads). The counts ``n_c`` come from labelled
data (:func:`dataset_class_counts`) or accumulate online, e.g. over pseudo labels
(:class:`ClassCounter`), both with :func:`~segadapt.methods.common.class_pixel_counts`; the
supplement (Tab. 5) reports that counts from the few labelled images of a semi-supervised split
help little.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..data.classes import IGNORE_INDEX
from ..errors import DataError
from .common import class_pixel_counts


def blv_offsets(class_counts: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-class variation scale ``f_c = (log N - log n_c) / max_j (log N - log n_j)``, in ``[0, 1]``.

    Args:
        class_counts: pixel counts ``n_c`` per class (or frequencies: ``f`` is scale-free).

    Returns:
        float32 ``[C]``; the rarest class gets 1.

    Zero counts: ``log 0`` would make ``f`` infinite for a class absent from the counted
    labels (and ``inf / inf = NaN`` after the normalisation). Such a class is treated as
    rare as the rarest observed one: its ``log n_c`` uses the smallest positive count, while
    ``N`` stays the true total, so it shares the largest offset (1) and the observed classes
    keep exactly the values their own counts give. Equal counts give ``f = 1`` for every
    class, as in the reference (independent noise on every logit, nothing class-specific);
    a single class gives ``f = 0``.

    Raises:
        ValueError: counts that are not a 1-d list of finite, non-negative numbers with at
            least one positive entry.

    Examples:
        >>> blv_offsets([1, 1, 2])  # log 4 - log n_c = [log 4, log 4, log 2], over log 4
        tensor([1.0000, 1.0000, 0.5000])
        >>> blv_offsets([0, 1, 3])  # the absent class counts as 1: [log 4, log 4, log 4/3] / log 4
        tensor([1.0000, 1.0000, 0.2075])
    """
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.detach().cpu().double()
    else:
        counts = torch.from_numpy(np.asarray(class_counts, dtype=np.float64))
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class counts must be a non-empty 1-d list (one count per class), got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"class counts must be finite and non-negative, got {counts.tolist()}")
    if not (counts > 0).any():
        raise ValueError("class counts are all zero: count the labels of a labelled split first")
    rarity = counts.sum().log() - counts.clamp_min(counts[counts > 0].min()).log()
    largest = rarity.max()
    if largest <= 0:
        return torch.zeros_like(rarity, dtype=torch.float32)
    return (rarity / largest).float()


def blv_logits(
    logits: torch.Tensor, offsets: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add the balanced logit variation ``|clamp(N(0, sigma^2), -1, 1)| * f_c`` to every logit (Alg. 1).

    Args:
        logits: ``[N, C, ...]`` (any number of spatial dimensions).
        offsets: ``f`` ``[C]`` from :func:`blv_offsets`.
        sigma: standard deviation of the Gaussian; 0 returns ``logits`` unchanged.
        generator: for reproducible noise; the noise is drawn on the generator's device and
            moved to the logits'.

    Returns:
        ``logits + variation``, same shape and dtype; gradients pass through unchanged.

    Shape:
        The noise has the full shape of ``logits``: one draw per image, class and pixel.
    """
    if sigma < 0:
        raise ValueError(f"BLV sigma must be >= 0, got {sigma}")
    if logits.dim() < 2 or offsets.shape != (logits.shape[1],):
        raise ValueError(
            f"logits [N, C, ...] and offsets [C] must agree on C; got logits {tuple(logits.shape)}"
            f" and offsets {tuple(offsets.shape)} (class counts for a different class list?)"
        )
    if sigma == 0:
        return logits
    device = generator.device if generator is not None else logits.device
    noise = torch.randn(logits.shape, generator=generator, device=device).to(logits.device)
    variation = (noise * sigma).clamp(-1.0, 1.0).abs()
    scale = offsets.to(logits.device, torch.float32).view(1, -1, *([1] * (logits.dim() - 2)))
    return logits + (variation * scale).to(logits.dtype)


def expected_variation(sigma: float) -> float:
    """Mean of the BLV noise magnitude, ``E|clamp(v, -1, 1)|`` for ``v ~ N(0, sigma^2)``.

    ``P(|v| > 1) + E[|v|; |v| <= 1]``: the fixed part of the variation, the offset
    ``expected_variation(sigma) * f_c`` that the cross-entropy sees on class ``c`` on average and
    evaluation leaves out (docs/blv.md, "What the pseudo-code does to the tail logits at test time").

    Examples:
        >>> round(expected_variation(6.0), 3), round(expected_variation(4.0), 3)
        (0.934, 0.901)
    """
    if sigma < 0:
        raise ValueError(f"BLV sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return 0.0
    saturated = math.erfc(1 / (sigma * math.sqrt(2)))
    inside = sigma * math.sqrt(2 / math.pi) * (1 - math.exp(-1 / (2 * sigma**2)))
    return saturated + inside


def sigma_schedule(iteration: int, total: int, sigma0: float, t_mid: int) -> float:
    """The temporal sigma of the supplement (Sec. 3, Fig. 1): up to ``sigma0`` at ``t_mid``, then down to the end.

    The supplement gives the shape only in a figure ("increase gradually before t_mid ...
    after t_mid, let the variation decrease so that convergence is not affected"); this
    takes the simplest curve with that shape, linear on both sides, from 0 at iteration 0 to
    ``sigma0`` at ``t_mid`` and back to 0 at ``total``. The supplement's run: ``total = 40k``,
    ``t_mid = 30k``, ``sigma0 = 6`` (GTA5 -> Cityscapes, DAFormer). As the noise saturates at
    1 for large sigma, the ramps matter mostly where sigma is below about 2.

    Args:
        iteration: current iteration, ``>= 0``; past ``total`` the value is 0.
        total: ``t_end``, the number of training iterations.
        sigma0: the peak value.
        t_mid: the turning point, ``0 <= t_mid <= total``.

    Examples:
        >>> [sigma_schedule(t, 40_000, 6.0, 30_000) for t in (0, 15_000, 30_000, 35_000, 40_000)]
        [0.0, 3.0, 6.0, 3.0, 0.0]
    """
    if total <= 0 or not 0 <= t_mid <= total or sigma0 < 0 or iteration < 0:
        raise ValueError(
            f"sigma_schedule needs total > 0, 0 <= t_mid <= total, sigma0 >= 0 and iteration >= 0;"
            f" got iteration={iteration}, total={total}, sigma0={sigma0}, t_mid={t_mid}"
        )
    if iteration > total:
        return 0.0
    if iteration <= t_mid:
        return float(sigma0 * iteration / t_mid) if t_mid > 0 else float(sigma0)
    return float(sigma0 * (total - iteration) / (total - t_mid))


class ClassCounter(nn.Module):
    """Accumulates per-class pixel counts ``n_c`` (int64) for :func:`blv_offsets`.

    It is a module with a ``counts`` buffer, so a recipe that counts online (e.g. pseudo
    labels of the target) saves and resumes it with the run. Across DDP ranks, sum ``counts``
    with :func:`segadapt.collectives.all_reduce_sum` before using it. Labels with ids other
    than ``0..C-1`` and ``ignore_index`` are an error
    (:func:`~segadapt.methods.common.class_pixel_counts`).

    Examples:
        >>> counter = ClassCounter(num_classes=3)
        >>> counter.update(torch.tensor([[0, 0, 255], [2, 0, 1]]))
        >>> counter.counts
        tensor([3, 1, 1])
    """

    counts: torch.Tensor  # a registered buffer, declared for type checkers

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))

    def update(self, labels: torch.Tensor) -> None:
        """Add the pixels of a label tensor (any shape, train ids and ``ignore_index``)."""
        self.counts += class_pixel_counts(labels, self.num_classes, self.ignore_index).to(self.counts.device)

    def offsets(self) -> torch.Tensor:
        """:func:`blv_offsets` of the counts so far."""
        return blv_offsets(self.counts.cpu())


def dataset_class_counts(dataset: Any, indices: Iterable[int] | None = None) -> torch.Tensor:
    """Pixel counts per train id over the labels of a segadapt dataset, at the label files' resolution.

    The reference counts the labels at full resolution without augmentation (the GTA5 counts of
    docs/reference_code.md, "BLV: class counts"); this reads ``dataset.load_label(i)`` (the
    train-id map as stored: datasets never augment, the loader does) for every item, or for ``indices``.

    Args:
        dataset: a :class:`~segadapt.data.base.SegDataset` (``classes``, ``load_label``, ``items``).
        indices: the items to count; all by default.

    Raises:
        DataError: a dataset without labels (e.g. a target split), or labels with unknown ids
            (the message names the item).
    """
    counter = ClassCounter(dataset.classes.num_classes, dataset.classes.ignore_index)
    for index in range(len(dataset)) if indices is None else indices:
        label = dataset.load_label(index)
        if label is None:
            raise DataError(
                f"{getattr(dataset, 'description', 'dataset')} has no labels to count; BLV class counts come from a"
                " labelled split (the source), or pass counts to blv_offsets directly"
            )
        try:
            counter.update(torch.from_numpy(np.asarray(label)))
        except DataError as err:
            raise DataError(f"{dataset.items[index].label}: {err}") from None
    return counter.counts
