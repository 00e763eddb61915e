"""The paper-independent pieces the method modules share: class counts, class prototypes, per-pixel KL and entropy.

Each paper module (:mod:`~segadapt.methods.cpsl`, :mod:`~segadapt.methods.bicl`,
:mod:`~segadapt.methods.blv`, :mod:`~segadapt.methods.dars`) imports what it shares from here
(and Sinkhorn from :mod:`~segadapt.methods.sinkhorn`), never from another paper module.

================================  ===================================================================
piece                             here
================================  ===================================================================
pixels per class                  :func:`class_pixel_counts`, :func:`check_label_ids` (defined in
                                  :mod:`segadapt.data.classes`, which ``check-data`` also uses)
per-class mean feature            :func:`class_feature_sums`, :func:`class_feature_means`,
(a class prototype)               :func:`class_means_from_sums`
per-pixel ``KL(p_t || p_s)``      :func:`pixel_kl_divergence`
per-pixel Shannon entropy         :func:`pixel_entropy`
class-first source sampling       :func:`sample_by_class` (BiCL supplement Eq. 1, DAFormer Eq. 6)
confidence-share label weight     :func:`confidence_share_weight` (DACS's pseudo-label weight, MIC Eq. 7)
================================  ===================================================================

Examples:
    >>> labels = torch.tensor([[[0, 0, 255]]])                      # [N, h, w]
    >>> features = torch.tensor([[[[3.0, 0.0, 1.0]], [[4.0, 2.0, 1.0]]]])  # [N, D, h, w]
    >>> class_pixel_counts(labels, num_classes=2)
    tensor([2, 0])
    >>> means, counts = class_feature_means(features, labels, num_classes=2)
    >>> means                                                       # mean of (0.6, 0.8) and (0, 1)
    tensor([[0.3000, 0.9000],
            [0.0000, 0.0000]], dtype=torch.float64)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classes import IGNORE_INDEX, check_label_ids, class_pixel_counts
from ..errors import DataError

__all__ = [
    "check_label_ids",
    "class_feature_means",
    "class_feature_sums",
    "class_means_from_sums",
    "class_pixel_counts",
    "pixel_entropy",
    "pixel_kl_divergence",
    "sample_by_class",
]


# --------------------------------------------------------------------------- class prototypes


def class_feature_sums(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the L2-normalised pixel features, and what each class's sum is over.

    The parts of a class prototype ``z_c = 1/|Gamma_c| sum_{i in Gamma_c} z_i / ||z_i||`` (CPSL
    Eq. 7; BiCL's memory prototypes): add the parts of several batches, shards or ranks, then
    divide with :func:`class_means_from_sums`. Features are converted to ``dtype`` before they
    are normalised and summed (float64 lets a whole dataset be accumulated).

    Hard labels count each pixel once for its class (``ignore_index`` pixels are left out; other
    ids outside ``0..K-1`` are an error); soft labels ``[N, K, h, w]`` weight each pixel by its
    probability of each class.

    The arithmetic follows the layout given, as the callers always did: a feature map
    ``[N, D, h, w]`` is normalised along ``D`` as a whole and the labelled pixels taken after;
    pixel rows ``[P, D]`` are taken first and the labelled rows normalised. (Both give the same
    value up to the last bit, but not always that bit, so each keeps its order.)

    Args:
        features: ``[N, D, h, w]`` feature maps or ``[P, D]`` pixel features.
        labels: on the same grid: hard ``[N, h, w]`` (or ``[P]``), or soft ``[N, K, h, w]``.
        num_classes: ``K``.
        ignore_index: the hard-label value of unlabelled pixels.
        dtype: the floating type of the sums.

    Returns:
        ``sums`` ``[K, D]`` (``dtype``, on the features' device) and ``counts`` ``[K]``: pixels per
        class, int64, for hard labels; the summed probability, ``dtype``, for soft labels.

    Raises:
        DataError: labels that are not on the features' grid (resize hard labels with nearest
            neighbour first), or hold ids outside ``0..K-1`` other than ``ignore_index``.

    Shape:
        - features ``[N, D, h, w]`` with labels ``[N, h, w]`` or ``[N, K, h, w]``; or features
          ``[P, D]`` with labels ``[P]``; outputs ``[K, D]`` and ``[K]``

    Examples:
        >>> sums, counts = class_feature_sums(torch.tensor([[3.0, 4.0], [0.0, 2.0], [9.0, 9.0]]), torch.tensor([0, 0, 255]), 2)
        >>> sums, counts
        (tensor([[0.6000, 1.8000],
                [0.0000, 0.0000]], dtype=torch.float64), tensor([2, 0]))
    """
    if features.dim() == 2:
        if labels.shape != features.shape[:1]:
            raise DataError(f"pixel features [P, D] need labels [P]; got {tuple(features.shape)} and {tuple(labels.shape)}")
        counts = class_pixel_counts(labels, num_classes, ignore_index)
        keep = labels != ignore_index
        pixels = F.normalize(features[keep].to(dtype), dim=1)
        sums = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=features.device)
        return sums.index_add_(0, labels[keep].long(), pixels), counts
    if features.dim() != 4:
        raise DataError(f"features must be [N, D, h, w] feature maps or [P, D] pixels, got {tuple(features.shape)}")
    grid = (features.shape[0], *features.shape[2:])
    pixels = F.normalize(features.to(dtype), dim=1).permute(0, 2, 3, 1)  # [N, h, w, D]
    if labels.dim() == 3:
        if tuple(labels.shape) != grid:
            raise DataError(f"labels {tuple(labels.shape)} must be on the feature grid {grid}; resize them (nearest) first")
        counts = class_pixel_counts(labels, num_classes, ignore_index)
        valid = labels != ignore_index
        sums = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=features.device)
        return sums.index_add_(0, labels[valid].long(), pixels[valid]), counts
    if labels.dim() == 4:
        if tuple(labels.shape) != (grid[0], num_classes, *grid[1:]):
            raise DataError(f"soft labels must be [N, {num_classes}, h, w] on the feature grid {grid}, got {tuple(labels.shape)}")
        weights = labels.to(dtype)
        return torch.einsum("nkhw,nhwd->kd", weights, pixels), weights.sum(dim=(0, 2, 3))
    raise DataError(f"labels must be hard [N, h, w] or soft [N, K, h, w], got {tuple(labels.shape)}")


def class_means_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sums[c] / counts[c]`` per class (in ``sums``' dtype); a class with nothing counted gets the zero vector.

    Shape:
        - sums: ``[K, D]``; counts: ``[K]``; output: ``[K, D]``

    Examples:
        >>> class_means_from_sums(torch.tensor([[2.0, 4.0], [0.0, 0.0]]), torch.tensor([2, 0]))
        tensor([[1., 2.],
                [0., 0.]])
    """
    return sums / counts.to(sums.dtype).clamp_min(1e-12).unsqueeze(1)


def class_feature_means(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes of one batch: the mean L2-normalised feature of each class, and the counts behind it.

    :func:`class_feature_sums` divided by :func:`class_means_from_sums` (see there for the inputs).

    Returns:
        ``means`` ``[K, D]`` in ``dtype`` (zero for a class without pixels) and ``counts`` ``[K]``.

    Shape:
        - as :func:`class_feature_sums`; outputs ``[K, D]`` and ``[K]``

    Examples:
        >>> features = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]])   # [1, 2, 1, 3]
        >>> class_feature_means(features, torch.tensor([[[0, 0, 255]]]), num_classes=2, dtype=torch.float32)
        (tensor([[0.5000, 0.5000],
                [0.0000, 0.0000]]), tensor([2, 0]))
    """
    sums, counts = class_feature_sums(features, labels, num_classes, ignore_index, dtype)
    return class_means_from_sums(sums, counts), counts


# --------------------------------------------------------------------------- per-pixel divergences


def pixel_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``KL(p_t || p_s) = sum_c p_t (log p_t - log p_s)`` of two logit maps; the teacher is a constant.

    ``p = softmax(logits)`` over the class dimension, in float32. The student enters as
    ``log_softmax``, not ``softmax`` (ProDA's ``kl_div(softmax, softmax)`` bug, docs/reference_code.md,
    "CPSL: distillation stages", is not reproduced). Used by CPSL's distillation (Sec. 4.2) and BiCL's self-distillation
    (supplement Eq. 2).

    Shape:
        - student_logits, teacher_logits: ``[N, K, h, w]``; output ``[N, h, w]``

    Examples:
        >>> teacher = torch.zeros(1, 2, 1, 1)                               # p_t = (1/2, 1/2)
        >>> student = torch.tensor([1.0, 3.0]).log().view(1, 2, 1, 1)       # p_s = (1/4, 3/4)
        >>> round(float(pixel_kl_divergence(student, teacher)), 6)          # 1/2 log 2 + 1/2 log(2/3)
        0.143841
        >>> pixel_kl_divergence(teacher, teacher)
        tensor([[[0.]]])
    """
    log_student = F.log_softmax(student_logits.float(), dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float(), dim=1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)


def pixel_entropy(logits: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Per-pixel Shannon entropy ``-sum_c p_c log p_c`` of ``p = softmax(logits)``, in nats, computed in float32.

    ``normalized=True`` divides by ``log K`` as ADVENT does, so the value lies in [0, 1] (BiCL's
    baseline entropy terms, CCM [3]).

    Shape:
        - logits: ``[N, K, h, w]``; output ``[N, h, w]``

    Examples:
        >>> pixel_entropy(torch.zeros(1, 4, 1, 1), normalized=True)   # uniform over 4 classes
        tensor([[[1.]]])
        >>> round(float(pixel_entropy(torch.zeros(1, 2, 1, 1))), 4)   # log 2
        0.6931
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    if normalized:
        entropy = entropy / float(np.log(logits.shape[1]))
    return entropy


def sample_by_class(
    candidates: torch.Tensor, class_probabilities: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` images class first: ``c ~ class_probabilities``, then uniformly among ``candidates[:, c]``.

    The class-balanced source sampling of BiCL (supplement Eq. 1) and DAFormer (Eq. 6) differ only in
    the class probabilities and in what makes an image a candidate; both draw through here. Depends
    only on ``generator``. Classes without a candidate must have probability 0.

    Returns:
        ``(indices, classes)``, int64 ``[num_samples]`` each.

    Raises:
        DataError: a class with positive probability has no candidate image.

    Examples:
        >>> candidates = torch.tensor([[True, False], [True, True], [False, True]])
        >>> indices, classes = sample_by_class(candidates, torch.tensor([0.0, 1.0]), 4, torch.Generator().manual_seed(0))
        >>> classes.tolist(), all(i in (1, 2) for i in indices.tolist())
        ([1, 1, 1, 1], True)
    """
    without = ((class_probabilities > 0) & ~candidates.any(dim=0)).nonzero().flatten().tolist()
    if without:
        raise DataError(f"class-balanced sampling: classes {without} have a positive probability but no candidate image")
    classes = torch.multinomial(class_probabilities, num_samples, replacement=True, generator=generator)
    picks = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    indices = torch.empty(num_samples, dtype=torch.long)
    members = {int(c): candidates[:, c].nonzero().squeeze(1) for c in classes.unique()}
    for i, (c, u) in enumerate(zip(classes.tolist(), picks.tolist())):
        images = members[c]
        indices[i] = images[min(int(u * images.numel()), images.numel() - 1)]
    return indices, classes


def confidence_share_weight(confidence: torch.Tensor, threshold: float, inside: torch.Tensor | None = None) -> torch.Tensor:
    """The pseudo-label weight of DACS and MIC: the share of pixels whose confidence reaches ``threshold``, everywhere.

    One number for the whole batch, broadcast to ``confidence``'s shape ``[N, H, W]`` (the DACS
    code's ``sum(p >= tau) / size``; MIC's quality estimate ``q^T``, Hoyer et al. CVPR 2023, Eq. 7).
    ``inside`` (bool, same shape) excludes pixels that show no image content (crop padding): they
    neither count as confident nor leave the denominator, as the recipes have always counted them.

    Examples:
        >>> confidence_share_weight(torch.tensor([[[0.99, 0.5], [0.97, 0.2]]]), 0.968)
        tensor([[[0.5000, 0.5000],
                 [0.5000, 0.5000]]])
    """
    confident = confidence.ge(threshold)
    if inside is not None:
        confident = confident & inside
    return confident.float().mean().expand_as(confidence)
