"""BiCL: bi-directional pixel-prototype contrastive learning (Lee, Eom, Lee, Park, Ham, ECCV 2022; its supplement).

Plain functions and one small module on tensors, usable in any training loop:

=========================================================  =========================================
paper                                                      here
=========================================================  =========================================
memory prototypes per class and domain, momentum lambda    :class:`PrototypeMemory` (0.999, supp. Sec. 1)
forward contrastive loss: target pixels vs source protos   :func:`pixel_prototype_contrastive_loss`
backward contrastive loss: source pixels vs target protos  the same function, the other way round
static pseudo labels (CBST [8] class-balanced thresholds)  :func:`cbst_static_labels`
class-wise domain biases                                   :func:`domain_biases`
dynamic pseudo labels (label transfer, threshold T = 0.7)  :func:`dynamic_pseudo_labels`
hybrid labels                                              :func:`hybrid_pseudo_labels`
baseline entropy terms (CCM [3], lambda_ent = 0.4)         :func:`entropy_loss`
                                                           (:func:`~segadapt.methods.common.pixel_entropy`)
weighted source sampling (supplement Eq. 1)                :func:`occurrence_table`,
                                                           :func:`class_sampling_probabilities`,
                                                           :func:`sample_source_indices`
self-distillation KL(q_t || q_s) (supplement Eq. 2)        :func:`self_distillation_loss`
                                                           (:func:`~segadapt.methods.common.pixel_kl_divergence`)
=========================================================  =========================================

The per-class means (:func:`class_means`), entropies and KL divergences are the shared ones of
:mod:`segadapt.methods.common`.

Only the supplement is available, and the public DASS code implements none of these parts
(docs/reference_code.md, "BiCL: what the public code implements"), so the forms below are
assumptions where the supplement gives no formula; each function says which. The common ones:

- Features are L2-normalised per pixel and compared with prototypes by cosine similarity over a
  temperature ``tau`` (the DASS code's ``cos * 10``, i.e. ``tau = 0.1``, is the default of the
  recipe). Prototypes are momentum averages of the per-class mean of normalised features.
- The contrastive losses are InfoNCE over the ``C`` class prototypes of the other domain: the
  positive is the prototype of the pixel's (pseudo) label, the negatives the other classes'.
- The class-wise domain bias is ``b_c = m_T^c - m_S^c``, the gap between the target and the source
  prototype of ``c``; calibration subtracts it from a target feature before comparing it with the
  source prototype of ``c`` (supplement Fig. 3 plots its magnitude shrinking during training).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.classes import IGNORE_INDEX
from ..errors import DataError
from ..progress import progress
from .common import class_feature_means, class_pixel_counts, pixel_entropy, pixel_kl_divergence, sample_by_class
from .thresholds import ConfidenceHistogram, apply_thresholds, cbst_thresholds


def _flatten_pixels(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, D, h, w]`` features and ``[N, h, w]`` labels -> ``[P, D]`` and ``[P]`` (or pass ``[P, D]``, ``[P]``)."""
    if features.dim() == 4:
        if labels.shape != (features.shape[0], *features.shape[2:]):
            raise DataError(
                f"labels {tuple(labels.shape)} must be on the features' grid {(features.shape[0], *features.shape[2:])}; "
                "resize them (nearest) first"
            )
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), labels.reshape(-1)
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise DataError(f"expected features [N, D, h, w] or [P, D] with matching labels, got {tuple(features.shape)} and {tuple(labels.shape)}")
    return features, labels


def class_means(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of the L2-normalised pixel features, and the pixel count per class (BiCL's batch prototypes).

    :func:`~segadapt.methods.common.class_feature_means` of the flattened pixels, summed in
    float32. Labels other than ``0..C-1`` and ``ignore_index`` are an error.

    Returns:
        ``means`` float32 ``[C, D]`` (zero for absent classes) and ``counts`` int64 ``[C]``.

    Shape:
        - features ``[N, D, h, w]`` with labels ``[N, h, w]``, or ``[P, D]`` with ``[P]``

    Examples:
        >>> class_means(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]), torch.tensor([0, 0, 255]), 2)
        (tensor([[0.3000, 0.9000],
                [0.0000, 0.0000]]), tensor([2, 0]))
    """
    pixels, labels = _flatten_pixels(features, labels)
    return class_feature_means(pixels, labels, num_classes, ignore_index, torch.float32)


class PrototypeMemory(nn.Module):
    """Class prototypes of one domain, updated with momentum (BiCL's memory; lambda = 0.999, supplement Sec. 1).

    ``m_c <- lambda * m_c + (1 - lambda) * mean_c`` for every class ``c`` present in the update, where
    ``mean_c`` is the batch mean of the L2-normalised features labelled ``c``. A class seen for the
    first time starts at its batch mean (the supplement gives no initialisation; starting from zero
    would leave the prototype near the origin for ~1/(1-lambda) updates). Classes never seen stay
    ``initialized = False`` and are left out of losses and label transfer. Buffers, so they are saved
    and resumed with the recipe.

    Examples:
        >>> memory = PrototypeMemory(num_classes=2, dim=2, momentum=0.5)
        >>> memory.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        >>> memory.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
        >>> memory.prototypes[0].tolist(), memory.initialized.tolist()
        ([0.5, 0.5], [True, False])
    """

    prototypes: torch.Tensor  # registered buffers, declared for type checkers
    initialized: torch.Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.999, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"prototype momentum must be in [0, 1), got {momentum}")
        self.num_classes, self.dim, self.momentum, self.ignore_index = num_classes, dim, momentum, ignore_index
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold one batch in: features ``[N, D, h, w]`` (or ``[P, D]``) with labels on the same grid."""
        if features.shape[1] != self.dim:
            raise DataError(f"features have {features.shape[1]} channels, the prototypes {self.dim}")
        means, counts = class_means(features.detach(), labels, self.num_classes, self.ignore_index)
        present = counts > 0
        means = means.to(self.prototypes)
        blended = self.momentum * self.prototypes + (1.0 - self.momentum) * means
        fresh = present & ~self.initialized
        updated = torch.where(fresh.unsqueeze(1), means, torch.where(present.unsqueeze(1), blended, self.prototypes))
        self.prototypes.copy_(updated)
        self.initialized |= present


def pixel_prototype_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float,
    available: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """InfoNCE between pixels and the class prototypes of the *other* domain (BiCL L_FC and L_BC).

    ``L = mean_p -log( exp(cos(f_p, m_{y_p}) / tau) / sum_c exp(cos(f_p, m_c) / tau) )`` over the
    labelled pixels ``p`` whose class has a prototype. Forward (L_FC): target features with their
    pseudo labels against the source prototypes; backward (L_BC): source features with their ground
    truth against the target prototypes. The prototypes are constants (memory); gradients reach the
    features only. The sum runs over the classes in ``available`` (default: all).

    Shape:
        features ``[N, D, h, w]`` or ``[P, D]``; labels ``[N, h, w]`` or ``[P]``; prototypes ``[C, D]``.

    Examples:
        >>> protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = pixel_prototype_contrastive_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), protos, 1.0)
        >>> round(float(loss), 4)  # -log(e / (e + 1))
        0.3133
    """
    if temperature <= 0:
        raise ValueError(f"the contrastive temperature must be positive, got {temperature}")
    pixels, labels = _flatten_pixels(features, labels)
    num_classes = prototypes.shape[0]
    available = torch.ones(num_classes, dtype=torch.bool, device=prototypes.device) if available is None else available.to(prototypes.device)
    keep = labels != ignore_index
    keep &= available[labels.clamp(0, num_classes - 1)] & (labels < num_classes)
    if not keep.any():
        return features.sum() * 0.0  # nothing to contrast: keeps the graph connected for DDP
    pixels = F.normalize(pixels[keep].float(), dim=1)
    logits = pixels @ F.normalize(prototypes.detach().float(), dim=1).t() / temperature
    logits = logits.masked_fill(~available.unsqueeze(0), float("-inf"))
    return F.cross_entropy(logits, labels[keep].long())


def domain_biases(source_prototypes: torch.Tensor, target_prototypes: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
    """Class-wise domain biases ``b_c = m_T^c - m_S^c`` ``[C, D]``; zero where ``available`` is False.

    BiCL compensates "class-wise domain biases of prototypes" (abstract; supplement Fig. 3 shows
    their magnitude ``||b_c||`` decreasing); the difference of the two memories is the assumed form.
    """
    bias = target_prototypes - source_prototypes
    if available is not None:
        bias = bias * available.unsqueeze(1).to(bias)
    return bias


@torch.no_grad()
def dynamic_pseudo_labels(
    target_features: torch.Tensor,
    source_prototypes: torch.Tensor,
    temperature: float,
    threshold: float = 0.7,
    biases: torch.Tensor | None = None,
    available: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic pseudo labels by non-parametric label transfer from the source prototypes (BiCL).

    For a target feature ``f`` (L2-normalised) the score of class ``c`` is
    ``s_c = cos(f - b_c, m_S^c) / tau`` with the class-wise domain bias ``b_c`` (calibration;
    ``biases=None`` gives "Dyn. (w/o cal.)" of supplement Tab. 1, ``b_c = 0``). The pixel takes
    ``argmax_c softmax(s)_c`` when that probability reaches ``threshold`` (T = 0.7, supplement
    Sec. 1), else ``ignore_index``. The supplement does not say whether T bounds a probability or a
    similarity; the grid {0.5, ..., 0.9} fits both, and a softmax probability is assumed here.
    Classes without a source prototype (``available`` False) are never assigned.

    Returns:
        labels int64 ``[N, h, w]`` and the winning probability float32 ``[N, h, w]``.
    """
    if target_features.dim() != 4:
        raise DataError(f"target features must be [N, D, h, w], got {tuple(target_features.shape)}")
    n, d, h, w = target_features.shape
    num_classes = source_prototypes.shape[0]
    available = (
        torch.ones(num_classes, dtype=torch.bool, device=source_prototypes.device) if available is None else available
    ).to(target_features.device)
    if not available.any():
        empty = torch.full((n, h, w), ignore_index, dtype=torch.long, device=target_features.device)
        return empty, torch.zeros(n, h, w, device=target_features.device)
    pixels = F.normalize(target_features.float().permute(0, 2, 3, 1).reshape(-1, d), dim=1)  # [P, D]
    prototypes = F.normalize(source_prototypes.float().to(pixels.device), dim=1)  # [C, D]
    if biases is None:
        scores = pixels @ prototypes.t()
    else:
        calibrated = F.normalize(pixels.unsqueeze(1) - biases.float().to(pixels.device).unsqueeze(0), dim=2)  # [P, C, D]
        scores = (calibrated * prototypes.unsqueeze(0)).sum(dim=2)
    scores = (scores / temperature).masked_fill(~available.unsqueeze(0), float("-inf"))
    confidence, labels = scores.softmax(dim=1).max(dim=1)
    labels = labels.masked_fill(confidence < threshold, ignore_index)
    return labels.view(n, h, w), confidence.view(n, h, w)


def hybrid_pseudo_labels(
    static: torch.Tensor, dynamic: torch.Tensor, conflict: str = "ignore", ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Hybrid labels: the union of static and dynamic labels (BiCL supplement Tab. 1, "Hybrid").

    A pixel labelled by one kind only takes that label. Where both label it and disagree,
    ``conflict`` decides: ``ignore`` (default) drops the pixel, ``static`` or ``dynamic`` keeps that
    kind's label. The supplement gives no rule; the union matches its densities (hybrid 42.3% >
    dynamic 34.3% > static 20.1%) and dropping disagreements its higher accuracy (98.8% vs 98.5/98.6%).

    Examples:
        >>> hybrid_pseudo_labels(torch.tensor([0, 255, 1, 2]), torch.tensor([255, 3, 1, 0])).tolist()
        [0, 3, 1, 255]
    """
    if static.shape != dynamic.shape:
        raise DataError(f"static {tuple(static.shape)} and dynamic {tuple(dynamic.shape)} labels must have one shape")
    if conflict not in ("ignore", "static", "dynamic"):
        raise ValueError(f"conflict must be 'ignore', 'static' or 'dynamic', got {conflict!r}")
    has_static, has_dynamic = static != ignore_index, dynamic != ignore_index
    labels = torch.where(has_static, static, dynamic)
    disagree = has_static & has_dynamic & (static != dynamic)
    if conflict == "ignore":
        labels = labels.masked_fill(disagree, ignore_index)
    elif conflict == "dynamic":
        labels = torch.where(disagree, dynamic, labels)
    return labels


@torch.no_grad()
def cbst_static_labels(probs: torch.Tensor, ratio: float, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Static pseudo labels of BiCL: CBST [8] class-balanced thresholds over ``probs`` ``[N, C, H, W]``.

    Each predicted class keeps (about) its ``ratio`` most confident pixels (:func:`cbst_thresholds`,
    streamed histogram). Over a whole target set this is what ``segadapt pseudo-label`` with
    ``pseudo_label.rule=cbst`` writes offline, which the ``bicl`` recipe uses.
    """
    histogram = ConfidenceHistogram(probs.shape[1], device=probs.device)
    histogram.update(probs)
    return apply_thresholds(probs, cbst_thresholds(histogram, ratio).thresholds, ignore_index=ignore_index)


def entropy_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean normalised Shannon entropy ``-sum_c p_c log p_c / log C`` of the per-pixel predictions.

    The entropy terms of BiCL's baseline (CCM [3]; lambda_ent^S = lambda_ent^T = 0.4, supplement
    Sec. 1). Normalised by ``log C`` as ADVENT does, so it lies in [0, 1]. The DASS code computes
    ``log_softmax(softmax(x))`` (docs/reference_code.md, "BiCL: losses in the DASS code"), which is
    not an entropy; not reproduced.
    """
    entropy = pixel_entropy(logits, normalized=True)
    if valid is None:
        return entropy.mean()
    if not valid.any():
        return entropy.sum() * 0.0
    return entropy[valid].mean()


def occurrence_table(label_maps: Iterable[torch.Tensor | np.ndarray], num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """bool ``[I, C]``: whether image ``i``'s ground truth contains class ``c`` (supplement Eq. 1's input).

    Label ids other than ``0..C-1`` and ``ignore_index`` are an error (they are never dropped silently).

    Shape:
        - each label map: any shape; output ``[I, C]`` bool

    Examples:
        >>> occurrence_table([torch.tensor([[0, 255], [2, 2]]), np.array([[1, 1]], dtype=np.uint8)], num_classes=3).tolist()
        [[True, False, True], [False, True, False]]
    """
    rows = []
    for label in progress(label_maps, desc="class occurrence", unit="label"):  # a bar in a terminal (all GTA5 labels: minutes)
        rows.append(class_pixel_counts(label, num_classes, ignore_index).cpu() > 0)
    if not rows:
        raise DataError("no source label maps to build the class occurrence table from")
    return torch.stack(rows)


def class_sampling_probabilities(occurrence: torch.Tensor) -> torch.Tensor:
    """Supplement Eq. 1: ``P(c) = p(c)^-1 / sum_c' p(c')^-1``, ``p(c)`` = fraction of images containing ``c``.

    A class in no image has no image to draw, so it gets ``P(c) = 0`` and the sum runs over the
    classes that occur.

    Examples:
        >>> occ = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]], dtype=torch.bool)  # p = [1, 1/4]
        >>> class_sampling_probabilities(occ).tolist()  # [1, 4] / 5
        [0.2, 0.8]
    """
    ratio = occurrence.double().mean(dim=0)
    inverse = torch.where(ratio > 0, 1.0 / ratio.clamp_min(1e-300), torch.zeros_like(ratio))
    if inverse.sum() <= 0:
        raise DataError("no class occurs in any source label map: weighted sampling has nothing to draw")
    return inverse / inverse.sum()


def sample_source_indices(occurrence: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Source image indices by BiCL's weighted sampling (supplement Sec. 1, Eq. 1).

    Each draw picks a class ``c ~ P`` (:func:`class_sampling_probabilities`), then an image uniformly
    among those whose ground truth contains ``c``. Depends only on ``generator``.

    Returns:
        int64 ``[num_samples]``.
    """
    indices, _ = sample_by_class(occurrence, class_sampling_probabilities(occurrence), num_samples, generator)
    return indices


def self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    base_loss: torch.Tensor,
    valid: torch.Tensor | None = None,
    kl_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Supplement Eq. 2: ``L_KD = L_base + KL(q_t || q_s)``; returns ``(L_KD, KL)``.

    ``kl_weight`` scales the KL in ``L_KD`` (1 in Eq. 2).

    ``q_t``/``q_s`` are the teacher's (the final BiCL model, a constant) and the student's per-pixel
    softmax; the KL ``sum_c q_t (log q_t - log q_s)`` is summed over classes and averaged over the
    pixels where ``valid`` is True (all pixels when None), with the student's ``log_softmax`` (the
    ProDA ``kl_div(softmax, softmax)`` bug, docs/reference_code.md, "CPSL: distillation stages", is
    not reproduced). ``L_base`` is
    the caller's baseline loss (recipe ``bicl_distill``).

    Shape:
        - student_logits, teacher_logits: ``[N, K, h, w]``; valid: ``[N, h, w]`` bool; outputs scalars

    Examples:
        >>> total, kl = self_distillation_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), torch.tensor(0.5))
        >>> float(total), float(kl)
        (0.5, 0.0)
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 4:
        raise DataError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits must both be [N, K, h, w]")
    per_pixel = pixel_kl_divergence(student_logits, teacher_logits)
    if valid is None:
        kl = per_pixel.mean()
    else:
        if tuple(valid.shape) != tuple(per_pixel.shape):
            raise DataError(f"valid {tuple(valid.shape)} must be [N, h, w] on the logits' grid {tuple(per_pixel.shape)}")
        kl = (per_pixel * valid).sum() / valid.sum().clamp(min=1)
    return base_loss + kl_weight * kl, kl
