"""Offline pseudo labels: confidence thresholds for ST and CBST, streamed from per-class histograms.

Self-training labels a target pixel with the class the model predicts when the prediction's
confidence (the max softmax probability) reaches a threshold; other pixels get ``ignore_index``.
The rules differ only in how the per-class threshold is chosen:

- **ST**: one global threshold for every class (the "single confidence thresholding" baseline of
  the DARS supplement, Sec. S2/S3, refs [11, 16]).
- **CBST** (Zou et al., ECCV 2018, class-balanced self-training; the DARS supplement's ``cbst``
  baseline): class ``j`` keeps the top ``alpha`` fraction of the pixels predicted as ``j``.
- **DARS** (:mod:`segadapt.methods.dars`): per-class pixel quotas from a target class distribution.

Thresholds are read from a :class:`ConfidenceHistogram`, so a pass over a whole dataset never holds
every pixel's confidence (the DARS reference keeps them all in RAM). The ``*_exact`` versions take
the per-class confidence arrays themselves; they exist for parity with the reference code.

Histogram bins (see :func:`confidence_bin_index`) sit on the float16 grid below 0.5 and on
``1 - q`` for float16 ``q`` above it, so they are finest near 1.0, where confidences crowd:

- a float16 confidence (the DARS reference stores float16) lies exactly on a bin edge, so the
  streamed thresholds and sampling ratios equal the exact ones;
- otherwise a threshold is the lower edge of the bin holding the exact order statistic:
  ``exact - MAX_BIN_WIDTH < streamed <= exact``, with ``MAX_BIN_WIDTH = 2**-12``; a bin whose
  lower edge ``p`` lies in ``[0.5, 1 - 2**-14]`` is also at most ``2**-10 * (1 - p)`` wide (one
  float16 step of ``1 - p``), and above ``1 - 2**-13`` every float32 value has a bin of its own
  (exact again).

Every rule returns :class:`Thresholds`: a threshold ``[C]`` and a sampling ratio ``[C]`` (ones
where the rule does not sample), consumed by :func:`apply_thresholds`.

Confidence precision (:func:`class_probabilities`): the DARS code takes the softmax of float16
logits in float16, so every confidence from ``1 - 2**-12`` up is exactly 1.0 and the pixels a
network is sure of tie at the top. Their count then exceeds a frequent class's quota, that class's
threshold is 1.0 and DARS's random sampling (``sampling_ratio < 1``) decides which of them are
kept. In float32 such ties are rare, the sampling ratio is about 1 and the labels are simply the
most confident pixels. Float16 confidences lie on bin edges, so their streamed thresholds are exact.

Examples:
    >>> probs = torch.tensor([[0.9, 0.6, 0.2], [0.1, 0.4, 0.8]]).view(1, 2, 1, 3)
    >>> apply_thresholds(probs, *st_thresholds(0.7, num_classes=2))
    tensor([[[  0, 255,   1]]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..collectives import all_reduce_sum
from ..data.classes import IGNORE_INDEX
from ..errors import CheckpointError, ConfigError

_HALF_BITS_OF_ONE_HALF = 0x3800  # bit pattern of float16 0.5; float16 bit patterns of x >= 0 sort like x
NUM_BINS = 2 * _HALF_BITS_OF_ONE_HALF + 1
MAX_BIN_WIDTH = 2.0**-12


def _make_bin_edges() -> torch.Tensor:
    below_half = torch.arange(0, _HALF_BITS_OF_ONE_HALF, dtype=torch.int16).view(torch.float16).double()
    distance_to_one = torch.arange(_HALF_BITS_OF_ONE_HALF, -1, -1, dtype=torch.int16).view(torch.float16).double()
    return torch.cat([below_half, 1.0 - distance_to_one])


BIN_EDGES = _make_bin_edges()
"""Lower edge of every histogram bin, float64 ``[NUM_BINS]``, from 0.0 to exactly 1.0 (the last bin)."""


def class_probabilities(
    scores: torch.Tensor, average: Literal["logits", "probabilities"], confidence_dtype: Literal["float16", "float32"]
) -> torch.Tensor:
    """The class probabilities ``[..., C, H, W]`` whose max is the confidence a rule thresholds, in ``confidence_dtype``.

    ``scores`` are the views' average (:func:`~segadapt.engine.inference.predict_scores`): logits
    when ``average`` is ``"logits"`` (the softmax is taken here), probabilities otherwise.
    ``"float16"`` is the DARS code's precision: the averaged logits are cast to float16 and their
    softmax is rounded to float16 (CUDA's half softmax accumulates in float32 and rounds its output
    once, as here), so probabilities from ``1 - 2**-12`` up become exactly 1.0 (module doc).
    Averaged probabilities are rounded to float16 the same way. ``"float32"`` keeps float32.

    Examples:
        >>> logits = torch.tensor([9.0, 0.0]).view(2, 1, 1)
        >>> class_probabilities(logits, "logits", "float32").flatten().tolist()[0] < 1.0
        True
        >>> class_probabilities(logits, "logits", "float16").flatten().tolist()
        [1.0, 0.0001233816146850586]
    """
    dtype = {"float16": torch.float16, "float32": torch.float32}[confidence_dtype]
    if average == "logits":
        return scores.to(dtype).float().softmax(dim=-3).to(dtype)
    return scores.to(dtype)


class Thresholds(NamedTuple):
    """Per-class pseudo-label thresholds and random-sampling ratios, both float64 ``[C]``.

    A pixel predicted as ``j`` survives when its confidence is ``>= thresholds[j]``; of the survivors
    of ``j`` a fraction ``sampling_ratio[j]`` is kept at random (DARS; 1 for ST and CBST).
    ``inf`` marks a class that gets no pseudo label at all.
    """

    thresholds: torch.Tensor
    sampling_ratio: torch.Tensor


def confidence_bin_index(confidence: torch.Tensor) -> torch.Tensor:
    """Histogram bin (int64, same shape) of each confidence in [0, 1]: ``BIN_EDGES[i] <= p < BIN_EDGES[i+1]``.

    Below 0.5 the index is the float16 bit pattern of ``p`` rounded down; from 0.5 on it counts the
    float16 values ``q`` of ``1 - p`` rounded up, so bins shrink with ``1 - p`` (see the module doc).
    ``1 - p`` is exact in float64 for ``p`` in [0.5, 1] (Sterbenz), so no rounding hides in it.
    """
    p = confidence.double()
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(
            "confidences must lie in [0, 1] (and not be NaN); pass softmax probabilities, not logits"
        )
    p_half = p.half()
    below_half = p_half.view(torch.int16).long() - (p_half.double() > p).long()
    distance_to_one = 1.0 - p
    q_half = distance_to_one.half()
    q_bits = q_half.view(torch.int16).long() + (q_half.double() < distance_to_one).long()
    from_half = 2 * _HALF_BITS_OF_ONE_HALF - q_bits
    return torch.where(p < 0.5, below_half, from_half)


def _split_input(probs_or_pair: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confidence, prediction)`` from probabilities ``[N, C, H, W]`` or from the pair itself."""
    if isinstance(probs_or_pair, torch.Tensor):
        if probs_or_pair.dim() != 4:
            raise ValueError(
                f"expected class probabilities [N, C, H, W], got shape {tuple(probs_or_pair.shape)}; "
                "pass (confidence, prediction) for per-pixel values"
            )
        confidence, prediction = probs_or_pair.max(dim=1)
        return confidence, prediction
    confidence, prediction = probs_or_pair
    if confidence.shape != prediction.shape:
        raise ValueError(
            f"confidence shape {tuple(confidence.shape)} != prediction shape {tuple(prediction.shape)}"
        )
    if prediction.is_floating_point():
        raise ValueError(f"predictions must be integer class ids, got dtype {prediction.dtype}")
    return confidence, prediction.long()


def _num_classes_of(probs_or_pair: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> int | None:
    return probs_or_pair.shape[1] if isinstance(probs_or_pair, torch.Tensor) else None


def _check_predictions(prediction: torch.Tensor, num_classes: int) -> None:
    if prediction.numel() and not bool(((prediction >= 0) & (prediction < num_classes)).all()):
        raise ValueError(
            f"predicted class ids must lie in [0, {num_classes}), got "
            f"[{int(prediction.min())}, {int(prediction.max())}]"
        )


def check_ratio(value: float, name: str) -> float:
    """``value`` as a float in [0, 1], or a :class:`ConfigError` naming ``name``."""
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


class ConfidenceHistogram:
    """Per-class histograms of the confidence of the pixels predicted as each class.

    Memory is ``num_classes * NUM_BINS`` int64 counts (4.4 MB for 19 classes) whatever the
    dataset size. Histograms of shards or ranks add up exactly (:meth:`merge`, :meth:`all_reduce`),
    so the thresholds do not depend on how the pass was split.

    Args:
        num_classes: ``C``, the number of predicted classes.
        device: where the counts live (the device of the probabilities saves a copy per batch).

    Examples:
        >>> hist = ConfidenceHistogram(2)
        >>> hist.update(torch.tensor([0.5, 0.75, 1.0]), torch.tensor([0, 0, 1]))
        >>> hist.class_counts.tolist()
        [2, 1]
        >>> hist.kth_largest(torch.tensor([1, 0]))
        (tensor([0.5000, 1.0000], dtype=torch.float64), tensor([2, 1]))
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, NUM_BINS, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(
        self,
        probs_or_confidence: torch.Tensor,
        prediction: torch.Tensor | None = None,
        valid_mask: torch.Tensor | None = None,
    ) -> None:
        """Count a batch: probabilities ``[N, C, H, W]``, or ``confidence`` and ``prediction`` of one shape.

        ``valid_mask`` (bool, the shape of the per-pixel values) keeps only the pixels to count,
        e.g. leaving out padding.
        """
        if prediction is None:
            if probs_or_confidence.dim() == 4 and probs_or_confidence.shape[1] != self.num_classes:
                raise ValueError(
                    f"probabilities have {probs_or_confidence.shape[1]} classes, the histogram {self.num_classes}"
                )
            confidence, prediction = _split_input(probs_or_confidence)
        else:
            confidence, prediction = _split_input((probs_or_confidence, prediction))
        if valid_mask is not None:
            if valid_mask.shape != confidence.shape:
                raise ValueError(f"valid_mask shape {tuple(valid_mask.shape)} != pixels shape {tuple(confidence.shape)}")
            confidence, prediction = confidence[valid_mask], prediction[valid_mask]
        device = self.counts.device
        prediction = prediction.to(device).reshape(-1)
        _check_predictions(prediction, self.num_classes)
        flat_bins = prediction * NUM_BINS + confidence_bin_index(confidence.to(device).reshape(-1))
        self.counts += torch.bincount(flat_bins, minlength=self.counts.numel()).view_as(self.counts)

    def merge(self, other: ConfidenceHistogram) -> ConfidenceHistogram:
        """Add ``other``'s counts (another shard or process); returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class histogram into a {self.num_classes}-class one")
        self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce(self) -> ConfidenceHistogram:
        """Sum the counts over ranks when ``torch.distributed`` is initialised (every rank must call it).

        :func:`segadapt.collectives.all_reduce_sum`: a no-op in a single process.
        """
        all_reduce_sum(self.counts)
        return self

    @property
    def class_counts(self) -> torch.Tensor:
        """Pixels predicted as each class, int64 ``[C]``."""
        return self.counts.sum(dim=1)

    @property
    def num_pixels(self) -> int:
        """All pixels counted so far."""
        return int(self.counts.sum())

    def kth_largest(self, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``ranks[j]``-th largest confidence of class ``j`` (0 = the largest), streamed.

        Returns ``(thresholds, at_or_above)``: the lower edge of the bin that holds that order
        statistic (float64 ``[C]``; the smallest confidence's bin when the rank exceeds the class
        count, ``inf`` for a class with no pixel) and how many pixels of the class lie in that
        bin or above (int64 ``[C]``), i.e. how many a ``>=`` threshold keeps on the counted data.
        """
        at_or_above = self.counts.flip(1).cumsum(1).flip(1)
        totals = at_or_above[:, 0]
        ranks = torch.minimum(ranks.to(totals.device).long(), totals - 1)
        bin_index = ((at_or_above > ranks[:, None]).sum(dim=1) - 1).clamp(min=0)
        empty = totals == 0
        thresholds = BIN_EDGES.to(totals.device)[bin_index].masked_fill(empty, float("inf"))
        kept = at_or_above.gather(1, bin_index[:, None]).squeeze(1).masked_fill(empty, 0)
        return thresholds, kept

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        counts = state.get("counts")
        expected = tuple(self.counts.shape)
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != expected:
            found = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise CheckpointError(
                f"confidence histogram state 'counts' must be a tensor of shape {expected} "
                f"(classes x bins), found {found}; it was saved for another class count or binning, "
                "so recompute the histogram"
            )
        self.counts = counts.to(device=self.counts.device, dtype=torch.int64).clone()


def kth_largest_exact(
    confidences_per_class: Sequence[torch.Tensor | np.ndarray], ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`ConfidenceHistogram.kth_largest` on the confidence arrays themselves (for parity).

    ``confidences_per_class[j]`` holds the confidence of every pixel predicted as ``j``.
    """
    thresholds, kept = [], []
    for confidences, rank in zip(confidences_per_class, ranks.tolist(), strict=True):
        values = torch.as_tensor(confidences).reshape(-1).double()
        if values.numel() == 0:
            thresholds.append(float("inf"))
            kept.append(0)
            continue
        rank = min(int(rank), values.numel() - 1)
        threshold = torch.kthvalue(values, values.numel() - rank).values
        thresholds.append(float(threshold))
        kept.append(int((values >= threshold).sum()))
    return torch.tensor(thresholds, dtype=torch.float64), torch.tensor(kept, dtype=torch.int64)


def st_thresholds(threshold: float, num_classes: int) -> Thresholds:
    """ST: one global confidence threshold for every class, no sampling.

    Examples:
        >>> st_thresholds(0.9, 2).thresholds
        tensor([0.9000, 0.9000], dtype=torch.float64)
    """
    threshold = check_ratio(threshold, "the ST confidence threshold")
    return Thresholds(
        torch.full((num_classes,), threshold, dtype=torch.float64), torch.ones(num_classes, dtype=torch.float64)
    )


def cbst_ranks(class_counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rank (0 = the largest) of CBST's threshold in each class: ``int(count_j * alpha)``.

    This is DARS's ``cbst`` mode, ``thr_j = ascending_conf_j[-int(len_j * alpha) - 1]``. At
    ``alpha = 1`` that index falls off the array in the reference; here it clamps to the
    smallest confidence, so every pixel of the class is kept.
    """
    alpha = check_ratio(alpha, "the CBST labeling ratio alpha")
    return (class_counts.double() * alpha).floor().long()


def cbst_thresholds(histogram: ConfidenceHistogram, alpha: float) -> Thresholds:
    """CBST class-wise thresholds: each class keeps (about) the top ``alpha`` fraction of its pixels.

    Zou et al., ECCV 2018 (class-balanced self-training), as DARS's ``cbst`` mode computes it:
    the threshold is the ``int(count_j * alpha)``-th largest confidence of class ``j`` (0-based),
    so ``alpha = 0`` still keeps the pixels tied at the top confidence. A class no pixel is
    predicted as gets ``inf``. Streamed: within the bin tolerance of the module doc.
    """
    thresholds, _ = histogram.kth_largest(cbst_ranks(histogram.class_counts, alpha))
    return Thresholds(thresholds, torch.ones_like(thresholds))


def cbst_thresholds_exact(confidences_per_class: Sequence[torch.Tensor | np.ndarray], alpha: float) -> Thresholds:
    """:func:`cbst_thresholds` on the per-class confidence arrays (parity with the DARS code)."""
    class_counts = torch.tensor([torch.as_tensor(c).numel() for c in confidences_per_class])
    thresholds, _ = kth_largest_exact(confidences_per_class, cbst_ranks(class_counts, alpha))
    return Thresholds(thresholds, torch.ones_like(thresholds))


@torch.no_grad()
def apply_thresholds(
    probs_or_pair: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    thresholds: torch.Tensor,
    sampling_ratio: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
    keys: torch.Tensor | None = None,
    drop_count: Literal["float64", "float32"] = "float64",
) -> torch.Tensor:
    """Hard pseudo labels ``[N, H, W]`` (int64) from probabilities ``[N, C, H, W]`` or ``(confidence, prediction)``.

    A pixel predicted as ``j`` keeps ``j`` when its confidence is ``>= thresholds[j]`` and becomes
    ``ignore_index`` otherwise. With a ``sampling_ratio`` (DARS random sampling), in **each image**
    and for each class ``j`` with ratio < 1, ``int(n - n * sampling_ratio[j])`` of the ``n``
    surviving pixels of ``j``, drawn uniformly at random, are set to ``ignore_index`` too: the
    DARS reference's ``second_forward`` (docs/reference_code.md, "DARS: thresholds and random
    sampling"). All survivors are subsampled, not
    only those tied at the threshold, because ``sampling_ratio[j] = N_j / #(conf_j >= thr_j)`` is
    the ratio that brings the survivors' count down to the quota ``N_j``. The count is rounded in
    float64 here; the reference computes ``n - n * sp_j`` in float32, which can drop one pixel more
    (``n = 100``, ``sp_j = 0.6``: 40 in float64, 39 in float32): ``drop_count="float32"`` is its
    arithmetic.
    The draw depends only on ``generator`` (seeded: the same labels every time): one uniform key
    per pixel, and the survivors with the smallest keys are dropped. ``keys`` (``[N, H, W]``) gives
    those keys instead, to replay a recorded draw: the reference's per-class ``randperm`` ``perm``
    of the ``n`` survivors (row-major order) drops ``perm[:k]``, which keys ``rank`` at survivor
    ``perm[rank]`` reproduce (``tests/test_dars_step_parity.py``).

    Shape:
        probs ``[N, C, H, W]`` or confidence/prediction ``[N, H, W]``; thresholds, sampling_ratio ``[C]``.
    """
    num_classes = thresholds.numel()
    probs_classes = _num_classes_of(probs_or_pair)
    if probs_classes is not None and probs_classes != num_classes:
        raise ValueError(f"probabilities have {probs_classes} classes but {num_classes} thresholds were given")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class id (0..{num_classes - 1}); pick one outside")
    confidence, prediction = _split_input(probs_or_pair)
    if prediction.dim() != 3:
        raise ValueError(f"expected per-pixel values [N, H, W], got shape {tuple(prediction.shape)}")
    _check_predictions(prediction, num_classes)
    class_threshold = thresholds.to(device=prediction.device, dtype=torch.float64)[prediction]
    labels = torch.where(confidence.double() >= class_threshold, prediction, ignore_index)
    if sampling_ratio is not None:
        if sampling_ratio.numel() != num_classes:
            raise ValueError(f"{sampling_ratio.numel()} sampling ratios for {num_classes} thresholds")
        if keys is not None and tuple(keys.shape) != tuple(labels.shape):
            raise ValueError(f"random-sampling keys {tuple(keys.shape)} must have the labels' shape {tuple(labels.shape)}")
        _subsample_survivors(labels, sampling_ratio, generator, ignore_index, keys, drop_count)
    return labels


def _subsample_survivors(
    labels: torch.Tensor,
    sampling_ratio: torch.Tensor,
    generator: torch.Generator | None,
    ignore_index: int,
    keys: torch.Tensor | None = None,
    drop_count: Literal["float64", "float32"] = "float64",
) -> None:
    ratios = sampling_ratio.double().cpu()
    if ratios.numel() != 0 and not bool(((ratios >= 0) & (ratios <= 1)).all()):
        raise ValueError(f"sampling ratios must lie in [0, 1], got {ratios.tolist()}")
    ratio_list = ratios.tolist()
    sampled_classes = [j for j, ratio in enumerate(ratio_list) if ratio < 1.0]
    if not sampled_classes:
        return
    key_device = generator.device if generator is not None else labels.device
    for index, image_labels in enumerate(labels.view(labels.shape[0], -1)):
        # One uniform key per pixel; dropping the smallest keys is a uniform random subset, as randperm is.
        if keys is None:
            image_keys = torch.rand(image_labels.numel(), generator=generator, device=key_device).to(labels.device)
        else:
            image_keys = keys[index].reshape(-1).to(labels.device)
        for j in sampled_classes:
            members = (image_labels == j).nonzero().squeeze(1)
            survivors = members.numel()
            num_to_ignore = _drop_count(survivors, ratio_list[j], drop_count)
            if num_to_ignore > 0:
                dropped = image_keys[members].topk(num_to_ignore, largest=False).indices
                image_labels[members[dropped]] = ignore_index


def _drop_count(survivors: int, ratio: float, precision: Literal["float64", "float32"]) -> int:
    """How many of ``survivors`` pixels the random sampling drops: ``int(n - n * ratio)``, rounded in ``precision``.

    ``"float32"`` is the DARS code's ``int(n - n.float() * sp)`` on a 0-d int64 tensor ``n``.

    Examples:
        >>> _drop_count(100, 0.6, "float64"), _drop_count(100, 0.6, "float32")
        (40, 39)
    """
    if precision == "float32":
        count = torch.tensor(survivors)
        return int(count - count.float() * ratio)
    return int(survivors - survivors * ratio)
