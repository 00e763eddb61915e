"""DARS: distribution-aligned pseudo-label thresholds with random sampling, and the progressive rounds.

He, Yang, Qi, "Re-distributing Biased Pseudo Labels for Semi-supervised Semantic Segmentation:
A Baseline Investigation", ICCV 2021, and its supplement. Only the supplement was available to
this project, so the thresholding follows the authors' code (CVMI-Lab/DARS @ 0cfe09a,
``tool/gen_pseudo_label_utils.py::get_threshold_and_sampling_ratio``; docs/reference_code.md,
"DARS: thresholds and random sampling"):

1. class ``j`` gets a pixel quota ``N_j = int(alpha * prior_j / valid * num_pixels)``, so the
   pseudo labels follow the target class distribution ``prior`` and a fraction ``alpha`` (the
   *labeling ratio*) of all ``num_pixels`` pixels is labelled;
2. ``thr_j`` is the ``N_j``-th largest confidence of the pixels predicted as ``j`` (the smallest
   one when ``N_j`` exceeds their count);
3. confidences tie massively (float16 softmax), so ``#(conf_j >= thr_j)`` can exceed ``N_j``;
   ``sp_j = min(1, N_j / #(conf_j >= thr_j))`` is the fraction of the survivors kept at random
   (:func:`~segadapt.methods.thresholds.apply_thresholds`).

Departures from the reference, all in corner cases it does not handle: ``N_j = 0`` gives
``thr_j = inf`` (the reference indexes ``conf[-1]`` and relies on ``sp_j = 0``; both label
nothing), and a class no pixel is predicted as gets ``inf`` instead of an IndexError.

The target distribution (:func:`label_distribution`, :func:`given_distribution`,
:func:`predicted_distribution`) is the labeled split's in the semi-supervised setting; for UDA
(supplement Sec. S3, Tab. S7) DARS(SD) uses the source labels' and DARS(TD) one counted on the
target (a user-given distribution).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .thresholds import ConfidenceHistogram, Thresholds, check_ratio, kth_largest_exact


def dars_class_quotas(
    prior: torch.Tensor | Sequence[float], alpha: float, num_pixels: int, valid: float | None = None
) -> torch.Tensor:
    """Pixels to pseudo-label per class, int64 ``[C]``: ``N_j = int(alpha * prior_j / valid * num_pixels)``.

    Args:
        prior: the target class distribution, in any unit (probabilities, percentages, counts).
        alpha: the labeling ratio, the fraction of all pixels to label (supplement Tab. S1).
        num_pixels: pixels of the unlabeled set. The reference multiplies ``pixels_per_image`` and
            the image count separately; that rounds identically when either is a power of two or
            the count is 1 (Cityscapes: 1024 x 2048 = 2**21).
        valid: the non-ignored share in ``prior``'s unit; ``prior.sum()`` by default. The reference
            hard-codes it (88.04 % for the Cityscapes 1/8 split, whose priors sum to 88.0549).

    Examples:
        >>> dars_class_quotas([60.0, 30.0], alpha=0.5, num_pixels=1000)
        tensor([333, 166])
    """
    prior = _check_distribution(prior, "the DARS target class distribution (prior)")
    alpha = check_ratio(alpha, "the DARS labeling ratio alpha")
    valid = float(prior.sum()) if valid is None else float(valid)
    if valid <= 0:
        raise ConfigError(f"the valid (non-ignored) share must be positive, got {valid}")
    return (alpha * prior / valid * num_pixels).floor().long()


def dars_thresholds(
    histogram: ConfidenceHistogram,
    prior: torch.Tensor | Sequence[float],
    alpha: float,
    *,
    num_pixels: int | None = None,
    valid: float | None = None,
) -> Thresholds:
    """DARS thresholds and sampling ratios from a streamed :class:`ConfidenceHistogram`.

    ``num_pixels`` defaults to every pixel the histogram counted. A threshold is the lower edge of
    the bin holding the ``N_j``-th largest confidence (exact for float16 confidences; see
    :mod:`~segadapt.methods.thresholds` for the bin tolerance), and ``sp_j`` divides by the
    pixels in that bin and above, which is exactly what the threshold keeps on the counted data.
    """
    _check_length(prior, histogram.num_classes)
    num_pixels = histogram.num_pixels if num_pixels is None else num_pixels
    quotas = dars_class_quotas(prior, alpha, num_pixels, valid)
    thresholds, kept = histogram.kth_largest((quotas - 1).clamp(min=0))
    return _with_sampling_ratio(thresholds, kept, quotas)


def dars_thresholds_exact(
    confidences_per_class: Sequence[torch.Tensor | np.ndarray],
    prior: torch.Tensor | Sequence[float],
    alpha: float,
    *,
    num_pixels: int | None = None,
    valid: float | None = None,
) -> Thresholds:
    """:func:`dars_thresholds` on the confidence arrays of each class (parity with the DARS code)."""
    _check_length(prior, len(confidences_per_class))
    if num_pixels is None:
        num_pixels = sum(torch.as_tensor(c).numel() for c in confidences_per_class)
    quotas = dars_class_quotas(prior, alpha, num_pixels, valid)
    thresholds, kept = kth_largest_exact(confidences_per_class, (quotas - 1).clamp(min=0))
    return _with_sampling_ratio(thresholds, kept, quotas)


def _with_sampling_ratio(thresholds: torch.Tensor, kept: torch.Tensor, quotas: torch.Tensor) -> Thresholds:
    quotas = quotas.to(kept.device)
    nothing_wanted = quotas == 0
    thresholds = thresholds.masked_fill(nothing_wanted, float("inf"))
    kept = kept.masked_fill(nothing_wanted, 0)
    ratio = (quotas.double() / kept.clamp(min=1).double()).clamp(max=1.0)
    return Thresholds(thresholds, torch.where(kept > 0, ratio, torch.ones_like(ratio)))


# ------------------------------------------------------------------------- target distributions


def label_distribution(class_counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Class distribution (float64 ``[C]``, sums to 1) of label pixel counts.

    The semi-supervised DARS prior (the labeled split's counts) and DARS(SD) in UDA (the source
    labels' counts, supplement Sec. S3). Count them with
    :func:`~segadapt.methods.common.class_pixel_counts`, summed over the split.

    Examples:
        >>> label_distribution(torch.tensor([3, 1, 0])).tolist()
        [0.75, 0.25, 0.0]
    """
    return _normalise(_check_distribution(class_counts, "the label class counts"))


def given_distribution(values: torch.Tensor | Sequence[float], num_classes: int) -> torch.Tensor:
    """A user-given class distribution, normalised (DARS(TD): counted on the target domain, Tab. S6/S7).

    ``values`` may be percentages, probabilities or counts.
    """
    _check_length(values, num_classes)
    return _normalise(_check_distribution(values, "the given class distribution"))


def predicted_distribution(histogram: ConfidenceHistogram) -> torch.Tensor:
    """The model's own prediction distribution: pixels predicted as each class, normalised."""
    return _normalise(_check_distribution(histogram.class_counts.cpu(), "the predicted class counts"))


def _check_distribution(values: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    if values.dim() != 1 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ConfigError(f"{name} must be a list of finite non-negative numbers, one per class, got {values.tolist()}")
    if not bool(values.sum() > 0):
        raise ConfigError(f"{name} sums to zero; give at least one class a positive share")
    return values


def _check_length(values: torch.Tensor | Sequence[float], num_classes: int) -> None:
    if len(values) != num_classes:
        raise ConfigError(f"the class distribution has {len(values)} entries but there are {num_classes} classes")


def _normalise(values: torch.Tensor) -> torch.Tensor:
    return values / values.sum()


# ------------------------------------------------------------------------ progressive schedule


@dataclass(frozen=True)
class DarsRound:
    """What one round trains with: round 0 uses labeled data only (``labeling_ratio`` None)."""

    index: int
    labeling_ratio: float | None
    scale_range: tuple[float, float]


@dataclass(frozen=True)
class ProgressiveSchedule:
    """DARS's progressive rounds: the labeling ratio and the random-scale range grow per round.

    Supplement S1.1: ``labeling_ratios[k - 1]`` is alpha of round ``k >= 1`` (Tab. S1, e.g. 20 %
    then 50 %). From round 2 on, the random-scale range ``[lo, hi]`` of rounds 0 and 1 widens to
    ``[lo * (1 - beta_min), hi * (1 + beta_max)]`` (Tab. S2). The supplement says "decreasing the
    lower bound by beta_min"; the authors' configs show the change is relative (beta_min = 0.2
    turns 0.25 into 0.2; docs/reference_code.md, "DARS: progressive rounds"), and Tab. S2's
    beta_min = 0.4 would make an absolute decrease negative. Rounds after 2 (not in the paper)
    compound the growth once more per round.

    Examples:
        >>> schedule = PROGRESSIVE_SCHEDULES["pspnet50_cityscapes8_crop361"]
        >>> [(r.labeling_ratio, r.scale_range) for r in schedule.rounds()]
        [(None, (0.25, 1.0)), (0.2, (0.25, 1.0)), (0.5, (0.2, 1.5))]
    """

    labeling_ratios: tuple[float, ...]
    initial_scale_range: tuple[float, float]
    scale_growth: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for alpha in self.labeling_ratios:
            check_ratio(alpha, "every DARS labeling ratio")
        low, high = self.initial_scale_range
        if not 0 < low <= high:
            raise ConfigError(f"the initial scale range must satisfy 0 < low <= high, got {self.initial_scale_range}")
        beta_min, beta_max = self.scale_growth
        if not (0 <= beta_min < 1 and beta_max >= 0):
            raise ConfigError(f"scale growth (beta_min, beta_max) needs 0 <= beta_min < 1 and beta_max >= 0, got {self.scale_growth}")

    @property
    def num_rounds(self) -> int:
        """Rounds including round 0 (labeled data only)."""
        return 1 + len(self.labeling_ratios)

    def round(self, index: int) -> DarsRound:
        if not 0 <= index < self.num_rounds:
            raise ConfigError(
                f"round {index} is outside the schedule (rounds 0..{self.num_rounds - 1}); "
                "add a labeling ratio per extra round"
            )
        growth_steps = max(index - 1, 0)
        low, high = self.initial_scale_range
        beta_min, beta_max = self.scale_growth
        scale_range = (low * (1 - beta_min) ** growth_steps, high * (1 + beta_max) ** growth_steps)
        labeling_ratio = self.labeling_ratios[index - 1] if index > 0 else None
        return DarsRound(index, labeling_ratio, scale_range)

    def rounds(self) -> list[DarsRound]:
        return [self.round(index) for index in range(self.num_rounds)]


PROGRESSIVE_SCHEDULES: dict[str, ProgressiveSchedule] = {
    # The authors' configs (docs/reference_code.md, "DARS: progressive rounds"); the name gives
    # network, dataset split and crop.
    "deeplabv2_cityscapes8_crop361": ProgressiveSchedule((0.2, 0.45), (0.25, 1.0)),
    "pspnet50_cityscapes8_crop361": ProgressiveSchedule((0.2, 0.5), (0.25, 1.0), (0.2, 0.5)),
    "pspnet50_cityscapes8_crop713": ProgressiveSchedule((0.4, 0.65), (0.5, 2.0), (0.0, 0.5)),
    "pspnet50_cityscapes4_crop361": ProgressiveSchedule((0.4, 0.6), (0.25, 1.0), (0.2, 0.5)),
    "pspnet50_cityscapes4_crop713": ProgressiveSchedule((0.4, 0.65), (0.5, 2.0), (0.2, 0.25)),
    "pspnet50_voc1464_crop321": ProgressiveSchedule((0.4, 0.5), (0.5, 1.5), (0.0, 1.0 / 3.0)),
}
