"""CPSL: class-balanced pixel-level self-labeling (Li et al., CVPR 2022, and its supplement).

The paper's algorithms as tensor functions and small ``nn.Module`` s, usable in any training loop:

==============================  ==========================================================
paper                           here
==============================  ==========================================================
Eq. 1 (rectified pseudo label)  :func:`rectify_pseudo_labels`
Eq. 4, 5 (self-labeling loss)   :class:`SelfLabelingHead`, :func:`self_labeling_loss`,
                                :func:`online_self_labeling_loss`
Eq. 6, Alg. 1 l.11-13           :func:`~segadapt.methods.sinkhorn.sinkhorn` (stabilised Sinkhorn-Knopp,
                                unequal marginals; its own module, :mod:`segadapt.methods.sinkhorn`)
Eq. 7 (prototype init)          :class:`PrototypeAccumulator`, :func:`class_prototypes` (built on
                                :func:`~segadapt.methods.common.class_feature_sums`)
memory bank (Sec. 3.2)          :class:`MemoryBank`
Eq. 8, 9 (balanced sampling)    :func:`sample_pixels`, :func:`gather_pixel_features`
Eq. 10-12 (distribution align)  :class:`ClassDistribution`, fed with
                                :func:`~segadapt.methods.common.class_pixel_counts`
Eq. 13 (consistency)            :func:`symmetric_kl_consistency` (the authors' code:
                                :func:`prototype_kl_consistency`)
Eq. 14 (total loss)             :func:`cpsl_total_loss`
authors' code, not in the paper :func:`reverse_cross_entropy` (``--rce``), :func:`cutmix_box`, :func:`cutmix`,
                                :func:`translate_x_by_height` (their replay of the strong view's shifts)
CPSL+distill (Sec. 4.2)         :func:`distillation_loss` (KL: :func:`~segadapt.methods.common.pixel_kl_divergence`)
==============================  ==========================================================

``sinkhorn``, ``class_marginal_error`` and ``class_pixel_counts`` are importable from here too
(the CPSL recipe and the benchmarks import them from this module); they live in
:mod:`segadapt.methods.sinkhorn` and :mod:`segadapt.methods.common`.

Defaults are the paper's (Sec. 4.1): tau = 0.08, epsilon = 0.05, lambda1 = 0.1, lambda2 = 5, a bank of
65,536 features, M = 512 pixels per image; 3 Sinkhorn iterations as in the authors' code (the paper
gives no count). One exception: the consistency losses divide their per-pixel KL by the class count
as the authors' code does (:data:`ConsistencyReduction`, ``reduction="pixel_mean"`` for the plain
per-pixel mean), because the paper's ``lambda2 = 5`` was run at that scale. Where the authors' code
departs from the paper otherwise (docs/reference_code.md, section "CPSL (lslrh/CPSL, built on
microsoft/ProDA)") the paper is followed and the departure is named in the docstring.

One stage-1 step, in the order of Algorithm 1 (the engine's CPSL recipe does this)::

    ema_out = ema_model(target_full)                                   # f'_SEG, no grad
    labels = rectify_pseudo_labels(soft_pl, ema_head(ema_out.features), tau)          # Eq. 1
    idx = sample_pixels(labels, 512, num_classes, generator=g)                          # Eq. 8-9
    pixels = gather_pixel_features(ema_out.features, idx).flatten(0, 1)
    loss_sl = online_self_labeling_loss(head, pixels, bank, estimate.distribution)      # Eq. 5-6
    bank.enqueue(pixels)                                               # after the loss, as Alg. 1
    estimate.update(class_pixel_counts(labels, num_classes))                            # Eq. 11
    loss = cpsl_total_loss(loss_seg, loss_sl, symmetric_kl_consistency(weak, strong))   # Eq. 14
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.classes import IGNORE_INDEX
from ..data.transforms import AffineRecord, resize
from ..data.transforms.records import Record
from ..errors import ConfigError, DataError
from .common import check_label_ids, class_feature_means, class_feature_sums, class_means_from_sums, class_pixel_counts, pixel_kl_divergence
from .sinkhorn import class_marginal_error, normalized_marginal, sinkhorn

__all__ = [
    "ClassDistribution",
    "ConsistencyReduction",
    "DistillationLoss",
    "ImageMeanPrototypes",
    "MemoryBank",
    "PrototypeAccumulator",
    "SelfLabelingHead",
    "bank_contrastive_loss",
    "class_marginal_error",  # re-exported from .sinkhorn
    "class_pixel_counts",  # re-exported from .common
    "class_prototypes",
    "cpsl_total_loss",
    "cutmix",
    "cutmix_box",
    "distillation_loss",
    "gather_pixel_features",
    "online_self_labeling_loss",
    "rectify_pseudo_labels",
    "reverse_cross_entropy",
    "sample_pixels",
    "self_labeling_loss",
    "output_self_labeling_loss",
    "shared_uniform_pixels",
    "sinkhorn",  # re-exported from .sinkhorn
    "prototype_cosines",
    "prototype_kl_consistency",
    "symmetric_kl_consistency",
]


# --------------------------------------------------------------------------- self-labeling head (Eq. 4-7)


class SelfLabelingHead(nn.Module):
    """``f_SL``: K prototypes scoring L2-normalised pixel features by cosine similarity (CPSL Eq. 4-6).

    ``forward`` returns ``cos(z, w_k)`` for every class ``k``: the scores that Sinkhorn turns into
    cluster assignments (Eq. 6, divided by epsilon) and whose ``softmax(. / tau)`` is the class
    probability ``p`` of Eq. 4 and the cluster assignment ``P_SL`` of Eq. 1. Both the features and the
    prototypes are normalised, so only the prototype directions are learnt (the authors' code
    normalises ``self.prototypes`` for the current batch but not for the memory bank,
    docs/reference_code.md, "CPSL: self-labeling loss" and "CPSL: memory bank"; here both are
    normalised, as the paper's single ``f_SL``).

    The prototypes start random (the "w/o Init" ablation, Tab. 3) until :meth:`init_from_prototypes`
    copies Eq. 7's class prototypes in (Alg. 1 line 2), which makes cluster ``k`` mean class ``k``.
    For the momentum head ``f'_SL`` wrap it in :class:`segadapt.methods.ema.ModelEMA`.

    Shape:
        - features: ``[M, D]`` pixels or ``[N, D, h, w]`` feature maps
        - output: ``[M, K]`` or ``[N, K, h, w]``, in ``[-1, 1]``

    Examples:
        >>> head = SelfLabelingHead(num_classes=2, feature_dim=3)
        >>> head.init_from_prototypes(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        >>> head(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])).detach().round(decimals=4)
        tensor([[1.0000, 0.0000],
                [0.0000, 0.7071]])
    """

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_classes, feature_dim), dim=1))

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @torch.no_grad()
    def init_from_prototypes(self, prototypes: torch.Tensor, empty: Literal["random", "zero"] = "random") -> None:
        """Copy class prototypes ``[K, D]`` (Eq. 7, e.g. from :func:`class_prototypes`) in, L2-normalised.

        A class with no pixel under the warm-up has no Eq. 7 mean (its row of ``prototypes`` is 0);
        the paper is silent. ``empty="random"`` (default) keeps that row's random unit vector, the
        head's initialisation without Init (Tab. 3 "w/o Init"), so that every row is a cluster centre
        on the sphere as Eq. 4-6 assume. ``"zero"`` copies the zero row in: ``normalize(0)`` then
        scores 0 against every feature and its gradient is scaled by ``1 / eps`` (about 1e12), which
        freezes the row at any learning rate (the behaviour before 2026-12-02).
        """
        if prototypes.shape != self.prototypes.shape:
            raise DataError(f"prototypes must have shape {tuple(self.prototypes.shape)} (classes x feature dim), got {tuple(prototypes.shape)}")
        if empty not in ("random", "zero"):
            raise ValueError(f"empty must be 'random' or 'zero', got {empty!r}")
        given = F.normalize(prototypes.to(self.prototypes), dim=1)
        if empty == "random":
            missing = prototypes.norm(dim=1) == 0
            given[missing] = F.normalize(self.prototypes[missing], dim=1)
        self.prototypes.copy_(given)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return prototype_cosines(features, self.prototypes)


def prototype_cosines(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``cos(z, w_k)`` of every pixel feature to every prototype: :class:`SelfLabelingHead`'s scores.

    Shape:
        - features: ``[M, D]`` or ``[N, D, h, w]``; prototypes: ``[K, D]``
        - output: ``[M, K]`` or ``[N, K, h, w]``
    """
    weights = F.normalize(prototypes, dim=1)
    if features.dim() == 2:
        return F.normalize(features, dim=1) @ weights.T
    if features.dim() == 4:
        return torch.einsum("ndhw,kd->nkhw", F.normalize(features, dim=1), weights)
    raise DataError(f"prototype cosines need features [M, D] or [N, D, h, w], got {tuple(features.shape)}")


class PrototypeAccumulator:
    """Running sums for the class prototypes ``z_c = 1/|Gamma_c| sum_{n,i} Y_ST^(c) z_{n,i}`` of CPSL Eq. 7.

    Feed batches of feature maps with their pseudo labels (:meth:`update`), combine accumulators of
    several workers (:meth:`merge`, or :func:`segadapt.collectives.all_reduce_sum` of :attr:`sums` and
    :attr:`counts`), then :meth:`compute`. The arithmetic is :func:`~segadapt.methods.common.class_feature_sums`.
    Features are L2-normalised per pixel before averaging, because Eq. 7 averages the normalised
    ``z`` of Sec. 3.2. Hard labels (the paper's ``Y_ST``, the argmax of ``P_ST``) count each pixel once
    for its class; soft labels ``[N, K, h, w]`` weight each pixel by its probability (a choice for
    users without hard labels). Sums are kept in float64 so a whole dataset can be accumulated.

    The authors' ``calc_prototype.py`` differs (docs/reference_code.md, "CPSL: prototypes"):
    unnormalised features, per-image class means over classes with >= 10 pixels, and a running mean
    with the count capped at 3000. Both give directions, which is all the head keeps.

    Labels must already be on the feature grid (resize hard labels with nearest neighbour).

    Examples:
        >>> acc = PrototypeAccumulator(num_classes=2, feature_dim=2)
        >>> acc.update(torch.tensor([[[[3.0, 0.0]], [[0.0, 1.0]]]]), torch.tensor([[[0, 1]]]))
        >>> acc.compute()
        tensor([[1., 0.],
                [0., 1.]])
    """

    def __init__(self, num_classes: int, feature_dim: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.sums = torch.zeros(num_classes, feature_dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``features [N, D, h, w]`` with hard labels ``[N, h, w]`` (ignore = ``ignore_index``) or soft ``[N, K, h, w]``."""
        if features.dim() != 4 or features.shape[1] != self.sums.shape[1]:
            raise DataError(f"features must be [N, {self.sums.shape[1]}, h, w], got {tuple(features.shape)}")
        batch_sums, batch_counts = class_feature_sums(features, labels, self.num_classes, self.ignore_index, torch.float64)
        self.sums += batch_sums.cpu()
        self.counts += batch_counts.cpu()

    def merge(self, other: PrototypeAccumulator) -> PrototypeAccumulator:
        """Add another accumulator's sums and counts into this one (e.g. from another data shard)."""
        if other.sums.shape != self.sums.shape:
            raise DataError(f"cannot merge prototype accumulators of shapes {tuple(self.sums.shape)} and {tuple(other.sums.shape)}")
        self.sums += other.sums
        self.counts += other.counts
        return self

    def compute(self) -> torch.Tensor:
        """Class prototypes ``[K, D]`` (float32); a class never seen gets the zero vector (see :attr:`counts`)."""
        return class_means_from_sums(self.sums, self.counts).float()


class ImageMeanPrototypes:
    """The authors' prototype initialisation (``calc_prototype.py``): a running mean of per-image class means.

    For each image and each class with at least ``min_pixels`` pixels under the hard labels, the mean
    of the class's *unnormalised* features in that image is one vector; the prototype is the running
    mean of those vectors, with the count capped at ``cap`` (3,000), so after ``cap`` images a class
    follows an exponential average of weight ``1 / (cap + 1)``. Every image counts once whatever its
    class's area (Eq. 7 and :class:`PrototypeAccumulator` weigh pixels, over normalised features).
    The authors run four passes over the target set (in eval mode, without augmentation: the same
    vectors four times), which matters only through the cap.

    Examples:
        >>> acc = ImageMeanPrototypes(num_classes=2, feature_dim=1, min_pixels=2)
        >>> acc.update(torch.tensor([[[[1.0, 3.0, 5.0]]]]), torch.tensor([[[0, 0, 1]]]))  # class 1 has 1 pixel
        >>> acc.update(torch.tensor([[[[6.0, 6.0, 6.0]]]]), torch.tensor([[[0, 0, 0]]]))
        >>> acc.compute().flatten().tolist(), acc.counts.tolist()  # (2 + 6) / 2
        ([4.0, 0.0], [2.0, 0.0])
    """

    def __init__(self, num_classes: int, feature_dim: int, min_pixels: int = 10, cap: int = 3000, ignore_index: int = IGNORE_INDEX) -> None:
        if min_pixels < 1 or cap < 1:
            raise ConfigError(f"min_pixels and cap must be >= 1, got {min_pixels} and {cap}")
        self.num_classes, self.min_pixels, self.cap, self.ignore_index = num_classes, min_pixels, cap, ignore_index
        self.vectors = torch.zeros(num_classes, feature_dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``features [N, D, h, w]`` with hard labels ``[N, h, w]`` on the same grid, image by image."""
        if features.dim() != 4 or features.shape[1] != self.vectors.shape[1] or labels.shape != (features.shape[0], *features.shape[2:]):
            raise DataError(
                f"features must be [N, {self.vectors.shape[1]}, h, w] with labels [N, h, w], got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        check_label_ids(labels, self.num_classes, self.ignore_index, "prototype labels")
        for image_features, image_labels in zip(features.double(), labels):
            flat, flat_labels = image_features.flatten(1), image_labels.flatten()
            for k in range(self.num_classes):
                mask = flat_labels == k
                if int(mask.sum()) < self.min_pixels:
                    continue
                mean = flat[:, mask].mean(dim=1).cpu()
                self.vectors[k] = (self.vectors[k] * self.counts[k] + mean) / (self.counts[k] + 1)
                self.counts[k] = min(float(self.counts[k]) + 1.0, float(self.cap))

    def compute(self) -> torch.Tensor:
        """Class prototypes ``[K, D]`` (float32); a class never counted gets the zero vector."""
        return self.vectors.float()


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Eq. 7's class prototypes ``[K, D]`` of one batch; see :class:`PrototypeAccumulator` for datasets.

    Shape:
        - features: ``[N, D, h, w]``; labels: hard ``[N, h, w]`` or soft ``[N, K, h, w]`` on the same grid

    Examples:
        >>> feats = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]])   # [1, 2, 1, 3]
        >>> class_prototypes(feats, torch.tensor([[[0, 0, 255]]]), num_classes=2)
        tensor([[0.5000, 0.5000],
                [0.0000, 0.0000]])
    """
    return class_feature_means(features, labels, num_classes, ignore_index, torch.float64)[0].float()


# --------------------------------------------------------------------------- memory bank (Sec. 3.2)


class MemoryBank(nn.Module):
    """FIFO queue of L2-normalised pixel features augmenting each batch's Sinkhorn (CPSL Sec. 3.2; Alg. 1 l.10).

    The queue, the write pointer and the fill count are registered buffers, so they are saved and
    resumed with ``state_dict``. :meth:`enqueue` normalises and writes features, overwriting the oldest
    ones once full. :meth:`with_batch` returns ``Z_aug`` = the queue followed by the current batch,
    and where the batch sits in it: Sinkhorn runs on all of ``Z_aug`` but only the batch's rows
    (``Q_cur``) enter the loss.

    Before the queue is full (the paper is silent on this warm-up): with ``use_partial=True``
    (default) the features stored so far augment the batch, never the empty slots, which is the
    literal ``Z_aug = [Z; M]`` of Alg. 1 line 10. ``use_partial=False`` is the authors' code
    (docs/reference_code.md, "CPSL: memory bank"): the queue joins only once full and until then
    Sinkhorn sees the batch alone; with 65,536 slots and 512 pixels per image that is the first 128
    target images. Call :meth:`enqueue` after computing the loss, as Alg. 1 and the reference do, so
    a batch is never its own context. The CPSL recipe enqueues the pixels of every rank
    (all-gathered), so under DDP all ranks keep one identical bank. The same class holds other per-pixel vectors, e.g. the
    normalised EMA logits of the authors' second self-labeling term (``feature_dim = K``).

    Args:
        feature_dim: ``D``, the length of the stored vectors.
        capacity: queue length (65,536 in Sec. 4.1).
        use_partial: use a partly filled queue (``True``) or only a full one (authors' code).

    Shape:
        - enqueue: ``[M, D]``; with_batch: ``[M, D] -> [Q + M, D]`` with ``Q`` the stored count

    Examples:
        >>> bank = MemoryBank(feature_dim=2, capacity=3)
        >>> bank.enqueue(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        >>> bank.is_full, int(bank.num_filled), int(bank.pointer)
        (False, 2, 2)
        >>> augmented, batch = bank.with_batch(torch.ones(1, 2)); augmented.tolist(), batch
        ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], slice(2, 3, None))
        >>> bank.enqueue(torch.ones(2, 2)); bank.is_full, int(bank.pointer)
        (True, 1)
        >>> MemoryBank(feature_dim=2, capacity=3, use_partial=False).with_batch(torch.ones(1, 2))[1]
        slice(0, 1, None)
    """

    features: torch.Tensor
    pointer: torch.Tensor
    num_filled: torch.Tensor

    def __init__(self, feature_dim: int, capacity: int = 65536, use_partial: bool = True) -> None:
        super().__init__()
        if capacity < 1:
            raise ConfigError(f"memory bank capacity must be >= 1, got {capacity}")
        if feature_dim < 1:
            raise ConfigError(f"memory bank feature_dim must be >= 1, got {feature_dim}")
        self.use_partial = use_partial
        self.register_buffer("features", torch.zeros(capacity, feature_dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))

    @property
    def capacity(self) -> int:
        return self.features.shape[0]

    @property
    def is_full(self) -> bool:
        return int(self.num_filled) == self.capacity

    def contents(self) -> torch.Tensor:
        """The stored features ``[num_filled, D]`` in storage order (Sinkhorn does not depend on the order)."""
        return self.features[: int(self.num_filled)]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor) -> None:
        """Append ``features [M, D]`` (L2-normalised here), dropping the oldest when full."""
        if features.dim() != 2 or features.shape[1] != self.features.shape[1]:
            raise DataError(f"memory bank expects features [M, {self.features.shape[1]}], got {tuple(features.shape)}")
        features = F.normalize(features.detach().to(self.features), dim=1)[-self.capacity :]
        slots = (int(self.pointer) + torch.arange(features.shape[0], device=self.features.device)) % self.capacity
        self.features[slots] = features
        self.pointer.fill_((int(self.pointer) + features.shape[0]) % self.capacity)
        self.num_filled.fill_(min(self.capacity, int(self.num_filled) + features.shape[0]))

    def with_batch(self, features: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """``(Z_aug [Q + M, D], batch rows)``: the stored queue (see ``use_partial``) then the batch ``[M, D]``.

        The batch is returned as given (normalise it yourself if the scores need it; cosine heads do).
        """
        if features.dim() != 2 or features.shape[1] != self.features.shape[1]:
            raise DataError(f"memory bank expects features [M, {self.features.shape[1]}], got {tuple(features.shape)}")
        stored = self.contents() if (self.use_partial or self.is_full) else self.features[:0]
        augmented = torch.cat([stored.to(device=features.device, dtype=features.dtype), features])
        return augmented, slice(stored.shape[0], augmented.shape[0])

    def extra_repr(self) -> str:
        return f"feature_dim={self.features.shape[1]}, capacity={self.capacity}, use_partial={self.use_partial}"


# --------------------------------------------------------------------------- class-balanced sampling (Eq. 8, 9)


def sample_pixels(
    pseudo_labels: torch.Tensor,
    num_samples: int,
    num_classes: int,
    *,
    class_balanced: bool = True,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pick ``M`` pixels per image for the self-labeling head and the memory bank (CPSL Eq. 8, 9).

    Class-balanced (default): every class of image ``n`` gets the quota ``M_c = floor(M * delta_n^(c))``
    of Eq. 9, drawn uniformly without replacement among that class's pixels, where ``delta_n`` is the
    image's own class distribution (Eq. 8: class pixels over all ``H x W`` pixels, ignore included), so
    every class is sampled at the same rate ``M / (H W)`` and the bank's class mix follows the data
    (the author's explanation in lslrh/CPSL issue #5).

    Shortfall rule (the paper's "randomly sample the rest pixels from other categories"): the
    ``M - sum_c M_c`` places left by the floors and by ignored pixels are filled uniformly at random
    from the labelled pixels not yet picked (so the extra picks follow the remaining class mix), and
    only if the image has fewer than ``M`` labelled pixels, from its ignored pixels. The result always
    has ``M`` distinct pixels. A class with fewer than ``H W / M`` pixels gets no quota (Eq. 9's floor)
    and is picked only through the shortfall draw.

    ``class_balanced=False`` samples ``M`` pixels uniformly (the "w/o CB"/PSL variant and the authors'
    code, which draws one ``randperm`` for the whole batch; here each image has its own draw).

    Args:
        pseudo_labels: per-pixel pseudo labels on the feature grid (e.g. :func:`rectify_pseudo_labels`).
        num_samples: ``M`` (512 in Sec. 4.1, 256 in the authors' code).
        num_classes: ``K``; label ids must be in ``0..K-1`` or ``ignore_index``.
        generator: makes the draw deterministic (its device is where the draw happens).

    Returns:
        Flat pixel indices ``[N, M]`` (int64) into ``h * w``; see :func:`gather_pixel_features`.

    Examples:
        >>> labels = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 2]]])
        >>> idx = sample_pixels(labels, 4, 3, generator=torch.Generator().manual_seed(0))
        >>> torch.bincount(labels.flatten()[idx[0]], minlength=3)   # floor(4 * [4, 2, 2] / 8)
        tensor([2, 1, 1])
    """
    if pseudo_labels.dim() != 3:
        raise DataError(f"pseudo_labels must be [N, h, w], got {tuple(pseudo_labels.shape)}")
    num_pixels = pseudo_labels.shape[1] * pseudo_labels.shape[2]
    if not 0 < num_samples <= num_pixels:
        raise ConfigError(f"num_samples (pixels per image) must be in 1..{num_pixels} for a {tuple(pseudo_labels.shape[1:])} grid, got {num_samples}")
    check_label_ids(pseudo_labels, num_classes, ignore_index, "pseudo labels")
    device = generator.device if generator is not None else pseudo_labels.device
    labels = pseudo_labels.to(device).flatten(1)
    picks = []
    for image_labels in labels:
        order = torch.randperm(num_pixels, generator=generator, device=device)
        if not class_balanced:
            picks.append(order[:num_samples])
            continue
        # classes 0..K-1, ignore becomes class K; ranks follow the random order within each class
        shuffled = torch.where(image_labels[order] == ignore_index, num_classes, image_labels[order])
        counts = torch.bincount(shuffled, minlength=num_classes + 1)
        quota = num_samples * counts[:num_classes] // num_pixels  # Eq. 9 with Eq. 8's delta_n, exact integer floor
        by_class = torch.argsort(shuffled, stable=True)
        class_start = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(shuffled)
        rank[by_class] = torch.arange(num_pixels, device=device) - class_start[shuffled[by_class]]
        picked_by_quota = rank < torch.cat([quota, quota.new_zeros(1)])[shuffled]
        # fill order: quota picks, then other labelled pixels, then ignored ones, each in random order
        priority = torch.where(picked_by_quota, 0, torch.where(shuffled < num_classes, 1, 2))
        picks.append(order[torch.argsort(priority, stable=True)[:num_samples]])
    return torch.stack(picks).to(pseudo_labels.device)


def shared_uniform_pixels(num_images: int, num_pixels: int, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``M`` pixel positions drawn uniformly, one permutation for the whole batch: the authors' sampling for ``L_SL``.

    The authors' code (``CustomModel.step``) draws one ``torch.randperm`` of the momentum network's
    output grid and takes its first ``fbs`` (256) positions in every image of the batch, whatever
    their labels (docs/reference_code.md, "CPSL: pixel sampling"); the paper samples each image
    class by class (Eq. 8-9, :func:`sample_pixels`). Positions on crop padding are not excluded
    (the authors sample the full frame, which has none).

    Returns:
        Flat pixel indices ``[num_images, M]`` (int64), the same row for every image; see :func:`gather_pixel_features`.

    Examples:
        >>> idx = shared_uniform_pixels(2, 6, 3, generator=torch.Generator().manual_seed(0))
        >>> idx.shape, bool(torch.equal(idx[0], idx[1])), len(set(idx[0].tolist()))
        (torch.Size([2, 3]), True, 3)
    """
    if not 0 < num_samples <= num_pixels:
        raise ConfigError(f"num_samples (pixels per image) must be in 1..{num_pixels}, got {num_samples}")
    device = generator.device if generator is not None else None
    order = torch.randperm(num_pixels, generator=generator, device=device)[:num_samples]
    return order.unsqueeze(0).expand(num_images, -1).clone()


def gather_pixel_features(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The feature vectors at flat pixel ``indices`` (from :func:`sample_pixels`).

    Shape:
        - features: ``[N, D, h, w]``; indices: ``[N, M]`` into ``h * w``; output: ``[N, M, D]``

    Examples:
        >>> feats = torch.arange(8.0).view(1, 2, 2, 2)
        >>> gather_pixel_features(feats, torch.tensor([[3, 0]]))
        tensor([[[3., 7.],
                 [0., 4.]]])
    """
    if features.dim() != 4 or indices.shape[0] != features.shape[0]:
        raise DataError(f"expected features [N, D, h, w] and indices [N, M], got {tuple(features.shape)} and {tuple(indices.shape)}")
    flat = features.flatten(2)
    return flat.gather(2, indices.unsqueeze(1).expand(-1, flat.shape[1], -1)).transpose(1, 2)


# --------------------------------------------------------------------------- distribution alignment (Eq. 10-12)


class ClassDistribution(nn.Module):
    """The running class-distribution estimate ``delta_pseudo`` used as Sinkhorn's ``r`` (CPSL Eq. 10-12).

    Start from the class histogram of the fixed pseudo labels ``Y_ST`` over the target set (Eq. 10;
    accumulate :func:`class_pixel_counts`, any positive scale), then after every training iteration
    ``delta <- alpha * delta + (1 - alpha) * delta_n`` (Eq. 11) with ``delta_n`` the class distribution of
    the iteration's rectified pseudo labels (Eq. 8; :meth:`update` normalises what it is given, so pass
    pooled pixel counts of the batch, or call it once per image to follow Eq. 11 literally).
    ``distribution`` is a buffer, saved and resumed with ``state_dict``.

    Modes:
        - ``"momentum"`` (paper): Eq. 11. The paper gives no value for ``alpha``; the default 0.999 is
          an assumption (the paper's only stated momentum, Sec. 4.1), i.e. an average over roughly the
          last 1000 iterations (4000 images at batch 4, more than one Cityscapes epoch).
        - ``"fixed"`` (authors' code; docs/reference_code.md, "CPSL: class distribution"): ``r``
          stays the warm-up histogram of Eq. 10; :meth:`update` changes nothing.

    Examples:
        >>> estimate = ClassDistribution(torch.tensor([3.0, 1.0]), momentum=0.5)
        >>> estimate.update(torch.tensor([0.0, 2.0]))
        tensor([0.3750, 0.6250])
    """

    distribution: torch.Tensor

    def __init__(self, initial: torch.Tensor, momentum: float = 0.999, mode: Literal["momentum", "fixed"] = "momentum") -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"class-distribution momentum (alpha of Eq. 11) must be in [0, 1], got {momentum}")
        if mode not in ("momentum", "fixed"):
            raise ConfigError(f"class-distribution mode must be 'momentum' (paper, Eq. 11) or 'fixed' (authors' code), got {mode!r}")
        initial = torch.as_tensor(initial, dtype=torch.float32)
        self.momentum = momentum
        self.mode = mode
        self.register_buffer("distribution", normalized_marginal(initial, initial.numel(), initial))

    @torch.no_grad()
    def update(self, batch_distribution: torch.Tensor) -> torch.Tensor:
        """Apply Eq. 11 with ``batch_distribution`` (counts or probabilities ``[K]``); returns the estimate.

        A batch without a single labelled pixel (all zeros) carries no information and is skipped.
        """
        if self.mode == "fixed" or float(batch_distribution.sum()) == 0.0:
            return self.distribution
        observed = normalized_marginal(batch_distribution, self.distribution.numel(), self.distribution)
        self.distribution.mul_(self.momentum).add_(observed, alpha=1.0 - self.momentum)
        return self.distribution

    def extra_repr(self) -> str:
        return f"num_classes={self.distribution.numel()}, momentum={self.momentum}, mode={self.mode!r}"


# --------------------------------------------------------------------------- losses (Eq. 1, 5, 13, 14; Sec. 4.2)


def rectify_pseudo_labels(
    soft_pseudo_labels: torch.Tensor,
    cluster_scores: torch.Tensor,
    temperature: float = 0.08,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Hard labels ``argmax_c P_SL^(c) * P_ST^(c)`` (CPSL Eq. 1).

    ``P_SL = softmax(cluster_scores / tau)`` over classes is the cluster assignment of the momentum
    head ``f'_SL`` on the momentum network's features (Alg. 1 line 17; Eq. 4's form); ``P_ST`` is the
    warm-up model's soft pseudo label. Small ``tau`` lets ``P_SL`` dominate (supplement Sec. 6.5).
    Pixels whose soft label has no mass at all (padding added by geometric transforms) get
    ``ignore_index``; every other pixel gets a label, as Eq. 1 (the authors' confidence threshold
    ``train_thred`` is 0, a no-op).

    Shape:
        - soft_pseudo_labels, cluster_scores: ``[N, K, h, w]`` on the same grid; output ``[N, h, w]`` int64

    Examples:
        >>> soft = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
        >>> rectify_pseudo_labels(soft, torch.tensor([0.0, 0.1]).view(1, 2, 1, 1), temperature=0.08)
        tensor([[[1]]])
    """
    if soft_pseudo_labels.shape != cluster_scores.shape or soft_pseudo_labels.dim() != 4:
        raise DataError(
            f"soft pseudo labels {tuple(soft_pseudo_labels.shape)} and cluster scores {tuple(cluster_scores.shape)} "
            "must both be [N, K, h, w] on the same grid; resize one of them first"
        )
    cluster_probabilities = torch.softmax(cluster_scores.float() / temperature, dim=1)
    labels = (cluster_probabilities * soft_pseudo_labels.float()).argmax(dim=1)
    return labels.masked_fill(soft_pseudo_labels.sum(dim=1) <= 0, ignore_index)


def self_labeling_loss(scores: torch.Tensor, assignments: torch.Tensor, temperature: float = 0.08) -> torch.Tensor:
    """``L_SL = -1/M sum_m sum_c q_m^(c) log p_m^(c)`` with ``p = softmax(scores / tau)`` (CPSL Eq. 4, 5).

    ``assignments`` are the Sinkhorn targets ``Q_cur`` (rows summing to 1), treated as constants.

    Shape:
        - scores, assignments: ``[M, K]``; output: scalar

    Examples:
        >>> loss = self_labeling_loss(torch.zeros(2, 4), torch.eye(4)[:2], temperature=0.1)
        >>> round(float(loss), 4)  # log 4: uniform p, one-hot targets
        1.3863
    """
    if scores.shape != assignments.shape:
        raise DataError(f"scores {tuple(scores.shape)} and assignments {tuple(assignments.shape)} must match")
    log_probabilities = F.log_softmax(scores.float() / temperature, dim=1)
    return -(assignments.detach() * log_probabilities).sum(dim=1).mean()


def online_self_labeling_loss(
    head: nn.Module,
    features: torch.Tensor,
    memory_bank: MemoryBank,
    class_marginal: torch.Tensor | None = None,
    temperature: float = 0.08,
    epsilon: float = 0.05,
    iterations: int = 3,
    bank_scores: Literal["cosine", "unnormalised_prototypes"] = "cosine",
) -> torch.Tensor:
    """Eq. 5 on the current batch with assignments from the bank-augmented batch (CPSL Alg. 1 l.10-14).

    Scores ``Z_aug`` (:meth:`MemoryBank.with_batch`) with ``head`` without gradients, runs
    :func:`sinkhorn` with the class marginal ``r``, keeps the batch's rows ``Q_cur`` and returns
    :func:`self_labeling_loss` of the batch's scores (with gradients to ``head``, and to ``features``
    if they carry any: in the authors' code they come from the momentum network, so only the head
    learns). The bank is not modified: call ``memory_bank.enqueue(features)`` afterwards.

    Alg. 1 runs this per target image; passing a whole batch's pixels at once solves one transport
    problem over ``bank + batch`` instead (the same marginals, one Sinkhorn call).

    ``bank_scores`` is how the bank's rows are scored: ``cosine`` (default, one ``f_SL`` for bank and
    batch, as the paper) or ``unnormalised_prototypes``, the authors' code, which scores the queued
    (normalised) features against the raw prototype vectors ``head.prototypes`` while the batch gets
    cosines; the two agree while the prototypes have unit length (their start) and part as training
    changes their lengths.

    The authors' code adds a second term whose Sinkhorn scores are the L2-normalised EMA logits of
    the same pixels while the prediction stays ``head(features) / tau`` (docs/reference_code.md,
    "CPSL: self-labeling loss"; not in the paper). A recipe that wants it composes it from a second :class:`MemoryBank`
    of logits, :func:`sinkhorn` and :func:`self_labeling_loss`.

    Shape:
        - features: ``[M, D]`` (e.g. ``gather_pixel_features(...).flatten(0, 1)``); output: scalar

    Examples:
        >>> head, bank = SelfLabelingHead(num_classes=2, feature_dim=2), MemoryBank(feature_dim=2, capacity=8)
        >>> head.init_from_prototypes(torch.eye(2))
        >>> pixels = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
        >>> loss = online_self_labeling_loss(head, pixels, bank, torch.tensor([0.5, 0.5]))
        >>> loss.backward(); head.prototypes.grad.shape, 0.0 < loss.item() < 0.6931  # below log 2
        (torch.Size([2, 2]), True)
    """
    with torch.no_grad():
        augmented, batch_rows = memory_bank.with_batch(features)
        scores = head(augmented)
        if bank_scores == "unnormalised_prototypes":
            raw = getattr(head, "prototypes", None)
            if not isinstance(raw, torch.Tensor):
                raise DataError("bank_scores='unnormalised_prototypes' needs a head with a prototypes tensor [K, D] (SelfLabelingHead)")
            stored = augmented[: batch_rows.start]
            scores = torch.cat([stored @ raw.detach().to(stored).t(), scores[batch_rows]])
        elif bank_scores != "cosine":
            raise ValueError(f"bank_scores must be 'cosine' or 'unnormalised_prototypes', got {bank_scores!r}")
        assignments = sinkhorn(scores, class_marginal, epsilon, iterations)[batch_rows]
    return self_labeling_loss(head(features), assignments, temperature)


def output_self_labeling_loss(
    head: nn.Module,
    features: torch.Tensor,
    momentum_logits: torch.Tensor,
    memory_bank: MemoryBank,
    class_marginal: torch.Tensor | None = None,
    temperature: float = 0.08,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> torch.Tensor:
    """The authors' second self-labeling term: Sinkhorn on the momentum network's L2-normalised logits.

    Not in the paper (docs/reference_code.md, "CPSL: self-labeling loss"). The authors' code
    (``CustomModel.step``, the ``queue_out`` block) adds to Eq. 5 a term whose assignments ``Q`` come
    from :func:`sinkhorn` on the L2-normalised segmentation logits of the momentum network at the
    sampled pixels (with its own queue of such logits, ``memory_bank`` of ``feature_dim = K``), while
    the prediction stays ``softmax(head(features) / tau)``: the head is pulled towards the momentum
    network's segmentation as well as towards the balanced clustering of its features. The bank is
    not modified: enqueue ``momentum_logits`` afterwards (:meth:`MemoryBank.enqueue` normalises).

    Shape:
        - features: ``[M, D]``; momentum_logits: ``[M, K]``; output: scalar

    Examples:
        >>> head, bank = SelfLabelingHead(num_classes=2, feature_dim=2), MemoryBank(feature_dim=2, capacity=8)
        >>> head.init_from_prototypes(torch.eye(2))
        >>> pixels, logits = torch.tensor([[1.0, 0.1], [0.1, 1.0]]), torch.tensor([[3.0, 0.0], [0.0, 3.0]])
        >>> 0.0 < output_self_labeling_loss(head, pixels, logits, bank, torch.tensor([0.5, 0.5])).item() < 0.6931
        True
    """
    if momentum_logits.dim() != 2 or momentum_logits.shape[0] != features.shape[0]:
        raise DataError(f"momentum logits must be [M, K] for the {features.shape[0]} pixels, got {tuple(momentum_logits.shape)}")
    with torch.no_grad():
        augmented, batch_rows = memory_bank.with_batch(F.normalize(momentum_logits.float(), dim=1))
        assignments = sinkhorn(augmented, class_marginal, epsilon, iterations)[batch_rows]
    return self_labeling_loss(head(features), assignments, temperature)


def bank_contrastive_loss(
    features: torch.Tensor, labels: torch.Tensor, bank_features: torch.Tensor, bank_labels: torch.Tensor, temperature: float = 0.08
) -> torch.Tensor:
    """The authors' supervised-contrastive term of pixel features against the memory bank (not in the paper).

    ``CustomModel.contrastive`` of the authors' code (docs/reference_code.md, "CPSL: terms not in the
    paper"): with ``s = z @ B.T / tau`` (rows shifted by their maximum, no gradient through it),
    positives the bank rows of the pixel's label and negatives the others,
    ``log p = s - log(exp(s) + sum_neg exp(s))`` per pair, and the loss is minus the mean over pixels
    of the mean ``log p`` over their positives (``1e-5`` added to the positive count, so a pixel
    without positives adds 0). ``features`` (L2-normalised) carry the gradient; the bank is constant.

    Shape:
        - features: ``[M, D]``; labels: ``[M]``; bank_features: ``[Q, D]``; bank_labels: ``[Q]``; output: scalar

    Examples:
        >>> bank, bank_labels = torch.eye(2), torch.tensor([0, 1])
        >>> loss = bank_contrastive_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), bank, bank_labels, 1.0)
        >>> round(float(loss), 4)  # -log(e / (e + e^0)): the positive against one negative
        0.3133
    """
    if features.dim() != 2 or bank_features.dim() != 2 or labels.shape != features.shape[:1] or bank_labels.shape != bank_features.shape[:1]:
        raise DataError(
            f"contrastive term needs features [M, D] with labels [M] and a bank [Q, D] with labels [Q], got {tuple(features.shape)}, "
            f"{tuple(labels.shape)}, {tuple(bank_features.shape)}, {tuple(bank_labels.shape)}"
        )
    positive = (labels.unsqueeze(1) == bank_labels.unsqueeze(0)).float()
    logits = features.float() @ bank_features.float().t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    negatives = (logits.exp() * (1 - positive)).sum(dim=1, keepdim=True)
    log_probability = logits - torch.log(logits.exp() + negatives)
    return -((positive * log_probability).sum(dim=1) / (positive.sum(dim=1) + 1e-5)).mean()


ConsistencyReduction = Literal["class_mean", "pixel_mean"]
"""How :func:`symmetric_kl_consistency` and :func:`prototype_kl_consistency` average their per-pixel KL.

``class_mean`` (default): the sum over valid pixels and classes divided by ``K`` times the number of
valid pixels, the authors' reduction (their masked KL is summed and divided by a mask that has one
entry per pixel *and class*), so ``lambda2`` acts on the per-pixel KL divided by ``K``.
``pixel_mean``: divided by the number of valid pixels alone, the per-pixel mean, a reading of Eq. 13
(which sums over pixels and images and gives no normalisation) that keeps ``lambda2`` independent of
the crop size. At the paper's ``lambda2 = 5`` the two differ by the factor ``K`` (19 on Cityscapes).
"""


def symmetric_kl_consistency(
    weak_logits: torch.Tensor,
    strong_logits: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    reduction: ConsistencyReduction = "class_mean",
) -> torch.Tensor:
    """``KL(P_w || P_s) + KL(P_s || P_w)`` per pixel, averaged over valid pixels as ``reduction`` says (CPSL Eq. 13).

    ``P = softmax(logits)`` over the class dimension, computed in float32. Eq. 13 sums over pixels and
    images without a normalisation; the loss here is a mean so that ``lambda2`` does not depend on the
    crop size, and ``reduction`` (:data:`ConsistencyReduction`) picks which mean: ``class_mean``
    (default) also divides by the class count ``K``, as the authors' code does for its own form of the
    term (docs/reference_code.md, "CPSL: consistency loss"); ``pixel_mean`` does not. The weak view
    comes from the momentum network and carries no gradient; detach it yourself if it does. The
    authors' code uses only ``KL(teacher || student)`` on prototype-cosine probabilities
    (:func:`prototype_kl_consistency`).

    Shape:
        - weak_logits, strong_logits: ``[N, K, h, w]``; valid_mask: ``[N, h, w]`` bool (``False`` for
          padding/cut-out pixels); output: scalar

    Examples:
        >>> logits = torch.randn(1, 3, 2, 2)
        >>> float(symmetric_kl_consistency(logits, logits))
        0.0
    """
    if weak_logits.shape != strong_logits.shape:
        raise DataError(f"weak {tuple(weak_logits.shape)} and strong {tuple(strong_logits.shape)} logits must match")
    log_weak = F.log_softmax(weak_logits.float(), dim=1)
    log_strong = F.log_softmax(strong_logits.float(), dim=1)
    # KL(w||s) + KL(s||w) = sum_c (p_w - p_s)(log p_w - log p_s)
    per_pixel = ((log_weak.exp() - log_strong.exp()) * (log_weak - log_strong)).sum(dim=1)
    return _reduce_consistency(per_pixel, valid_mask, reduction, weak_logits.shape[1])


def prototype_kl_consistency(
    weak_scores: torch.Tensor,
    strong_scores: torch.Tensor,
    temperature: float = 0.08,
    valid_mask: torch.Tensor | None = None,
    reduction: ConsistencyReduction = "class_mean",
) -> torch.Tensor:
    """``KL(softmax(s_w / tau) || softmax(s_s / tau))`` per pixel, averaged over valid pixels as
    ``reduction`` says: the authors' code's consistency term, in place of CPSL Eq. 13.

    The paper's Eq. 13 (:func:`symmetric_kl_consistency`) is a symmetric KL between the segmentation
    probability maps of the two views. The authors' code (inherited from ProDA) instead compares
    *prototype* probabilities: ``s_w`` are the cosines of the momentum network's weak-view features to
    the momentum head's prototypes, ``s_s`` those of the student's strong-view features to the same
    (momentum) prototypes, both at the temperature ``tau`` of Eq. 1, and only ``KL(teacher || student)``
    is taken (docs/reference_code.md, "CPSL: consistency loss"). Its reduction is ``class_mean``
    (default, :data:`ConsistencyReduction`): the per-pixel KL divided by ``K``. The gradient reaches
    the student's features only: ``s_w`` is detached here; compute ``s_s`` with prototypes that carry
    no gradient.

    Shape:
        - weak_scores, strong_scores: ``[N, K, h, w]`` cosines; valid_mask: ``[N, h, w]`` bool; output: scalar

    Examples:
        >>> scores = torch.rand(1, 3, 2, 2)
        >>> float(prototype_kl_consistency(scores, scores))
        0.0
        >>> weak, strong = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
        >>> round(float(prototype_kl_consistency(weak, strong, 1.0, reduction="pixel_mean")), 4)
        0.1109
        >>> round(float(prototype_kl_consistency(weak, strong, 1.0)), 4)  # divided by K = 2
        0.0555
    """
    if weak_scores.shape != strong_scores.shape:
        raise DataError(f"weak {tuple(weak_scores.shape)} and strong {tuple(strong_scores.shape)} prototype scores must match")
    per_pixel = pixel_kl_divergence(strong_scores.float() / temperature, weak_scores.float() / temperature)
    return _reduce_consistency(per_pixel, valid_mask, reduction, weak_scores.shape[1])


def _reduce_consistency(per_pixel: torch.Tensor, valid_mask: torch.Tensor | None, reduction: ConsistencyReduction, num_classes: int) -> torch.Tensor:
    """The per-pixel KL ``[N, h, w]`` reduced to a scalar by :data:`ConsistencyReduction` ``reduction``."""
    if reduction not in ("class_mean", "pixel_mean"):
        raise ValueError(f"consistency reduction must be 'class_mean' (authors' code) or 'pixel_mean', got {reduction!r}")
    mean = _mean_over_valid_pixels(per_pixel, valid_mask)
    return mean / num_classes if reduction == "class_mean" else mean


def _mean_over_valid_pixels(per_pixel: torch.Tensor, valid_mask: torch.Tensor | None) -> torch.Tensor:
    if valid_mask is None:
        return per_pixel.mean()
    if valid_mask.shape != per_pixel.shape or valid_mask.dtype != torch.bool:
        raise DataError(
            f"valid_mask must be a bool [N, h, w] tensor of shape {tuple(per_pixel.shape)}, got {valid_mask.dtype} {tuple(valid_mask.shape)}"
        )
    if not valid_mask.any():
        return per_pixel.sum() * 0.0  # keeps the graph connected for DDP
    return per_pixel[valid_mask].mean()


def reverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, floor: float = 1e-4) -> torch.Tensor:
    """Reverse cross-entropy ``-sum_c p_c log max(y_c, floor)`` averaged over labelled pixels: the authors' ``--rce``.

    The reverse term of symmetric cross-entropy (Wang et al., "Symmetric Cross Entropy for Robust
    Learning with Noisy Labels", ICCV 2019, Eq. 5-6): the one-hot label ``y`` is clipped at ``floor``
    so its log is finite, which makes the term ``-log(floor)`` (9.21) times the probability mass the
    prediction puts outside the label class. It is bounded, so a wrong pseudo label pulls less than
    under cross-entropy. The authors' stage 1 trains ``0.1 CE + 1.0 RCE`` on the target (not in the
    CPSL paper; docs/reference_code.md, "CPSL: terms not in the paper"). As theirs, the
    probabilities are clipped below at 1e-7; ``logits`` are upsampled bilinearly to the labels' size
    when smaller.

    Shape:
        - logits: ``[N, K, h, w]``; labels: ``[N, H, W]`` (``ignore_index`` = unlabelled); output: scalar

    Examples:
        >>> logits = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)        # p = (1/2, 1/2)
        >>> round(float(reverse_cross_entropy(logits, torch.tensor([[[0]]]))), 4)  # -ln(1e-4) / 2
        4.6052
    """
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise DataError(f"reverse cross-entropy needs logits [N, K, h, w] and labels [N, H, W], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits.float(), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    probabilities = torch.softmax(logits.float(), dim=1).clamp(min=1e-7, max=1.0)
    valid = labels != ignore_index
    label_mass = probabilities.gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    per_pixel = -math.log(floor) * (probabilities.sum(dim=1) - label_mass)
    return (per_pixel * valid).sum() / (valid.sum() + 1e-6)


def translate_x_by_height(records: list[Record]) -> list[Record]:
    """``records`` with every RandAugment ``translate_x`` shift multiplied by the view's ``W / H``: the authors' replay.

    The authors' ``affine_sample`` (``data/randaugment.py``), which replays the strong view's geometry on
    the teacher's output (``label_strong_T``), normalises the horizontal shift of ``TranslateX`` by the
    map's height instead of its width, so the teacher's map moves ``W / H`` times as far as the image did
    (twice on a 1024 x 512 crop). ``method.randaugment_translate_quirk=true`` replays that; the default
    replays the image's shift. Other records are returned as they are.

    Examples:
        >>> shift = AffineRecord((32, 64), (1.0, 0.0, 5.0, 0.0, 1.0, 0.0), name="translate_x")
        >>> translate_x_by_height([shift])[0].matrix
        (1.0, 0.0, 10.0, 0.0, 1.0, 0.0)
    """
    moved: list[Record] = []
    for record in records:
        if isinstance(record, AffineRecord) and record.name == "translate_x":
            height, width = record.input_size
            a, b, c, d, e, f = record.matrix
            record = AffineRecord(record.input_size, (a, b, c * width / height, d, e, f), record.pad_value, record.ignore_index, record.name)
        moved.append(record)
    return moved


def cutmix_box(height: int, width: int, area: float = 0.5, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of a random box covering ``area`` of a ``height x width`` frame, inside it.

    The box of the authors' CutMix (their ``rand_bbox``, after French et al., "Semi-supervised semantic
    segmentation needs strong, varied perturbations", BMVC 2020): the height fraction is
    ``area ** u`` with ``u ~ U(0, 1)`` and the width fraction ``area`` over it (a random aspect
    ratio at a fixed area), sizes rounded to pixels, the position uniform over the frame.

    Examples:
        >>> top, left, bottom, right = cutmix_box(64, 128, generator=torch.Generator().manual_seed(0))
        >>> 0 <= top < bottom <= 64 and 0 <= left < right <= 128, round((bottom - top) * (right - left) / (64 * 128), 2)
        (True, 0.5)
    """
    if not 0.0 < area <= 1.0:
        raise ValueError(f"the CutMix box's area must be a fraction in (0, 1], got {area}")
    draws = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    height_fraction = area ** draws[0]
    box_height, box_width = round(height_fraction * height), round(area / height_fraction * width)
    top, left = round((height - box_height) * draws[1]), round((width - box_width) * draws[2])
    return top, left, top + box_height, left + box_width


def cutmix(
    target_images: torch.Tensor,
    source_images: torch.Tensor,
    target_labels: torch.Tensor,
    source_labels: torch.Tensor,
    box: tuple[int, int, int, int],
    label_sampling: Literal["pixel_centres", "top_left"] = "pixel_centres",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' CutMix: a source box and its labels pasted into the target crops and their pseudo labels.

    Image ``n`` of the source batch goes into target image ``n``, the same ``box``
    (:func:`cutmix_box`, on the image grid) for the whole batch. ``target_labels`` may live on a
    coarser grid (the network's output grid): they are brought to the image grid by nearest
    neighbour, the source labels pasted in, and the result brought back by nearest neighbour, as the
    authors do at their label resolution (a quarter of the crop). Nothing is changed in place.

    ``label_sampling`` is how nearest neighbour picks: ``pixel_centres`` (default, segadapt's label
    resizing, ``nearest-exact``) takes the coarse pixel's centre, so the labels stay aligned with the
    image; ``top_left`` is PyTorch's legacy ``nearest``, which the authors' code uses: coarse pixel
    ``i`` takes the source label of image row ``s * i`` (stride ``s``), its top-left corner, half a
    coarse pixel off the centre.

    Shape:
        - images: ``[N, C, H, W]`` both; source_labels: ``[N, H, W]``; target_labels: ``[N, h, w]``
        - output: mixed images ``[N, C, H, W]`` and labels ``[N, h, w]``

    Examples:
        >>> target, source = torch.zeros(1, 1, 2, 4), torch.ones(1, 1, 2, 4)
        >>> images, labels = cutmix(target, source, torch.zeros(1, 1, 2, dtype=torch.long), torch.full((1, 2, 4), 7), (0, 2, 2, 4))
        >>> images[0, 0].tolist(), labels.tolist()
        ([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], [[[0, 7]]])
    """
    if target_images.shape != source_images.shape or tuple(source_labels.shape) != (source_images.shape[0], *source_images.shape[-2:]):
        raise DataError(
            f"CutMix needs source and target crops of one size with labels on the source crop: target {tuple(target_images.shape)}, "
            f"source {tuple(source_images.shape)}, source labels {tuple(source_labels.shape)}; give both streams the same crop size"
        )
    top, left, bottom, right = box
    images = target_images.clone()
    images[..., top:bottom, left:right] = source_images[..., top:bottom, left:right].to(images.dtype)
    image_grid, label_grid = (target_images.shape[-2], target_images.shape[-1]), (target_labels.shape[-2], target_labels.shape[-1])
    if label_sampling not in ("pixel_centres", "top_left"):
        raise ValueError(f"label_sampling must be 'pixel_centres' or 'top_left', got {label_sampling!r}")

    def nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if label_sampling == "pixel_centres":
            return resize(labels.unsqueeze(1), size, "label").squeeze(1)
        return F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).to(labels.dtype)

    full = nearest(target_labels, image_grid).clone()
    full[:, top:bottom, left:right] = source_labels[:, top:bottom, left:right].to(full.dtype)
    return images, nearest(full, label_grid)


def cpsl_total_loss(
    segmentation_loss: torch.Tensor,
    self_labeling_loss: torch.Tensor,
    consistency_loss: torch.Tensor,
    self_labeling_weight: float = 0.1,
    consistency_weight: float = 5.0,
) -> torch.Tensor:
    """``L_TOTAL = L_SEG + lambda1 L_SL + lambda2 L_REG`` (CPSL Eq. 14; lambda1 = 0.1, lambda2 = 5, Sec. 4.1).

    ``L_SEG = L^t_SEG + L^s_SEG`` (Eq. 2, 3) is the caller's cross-entropy on source labels and
    rectified target pseudo labels. The authors' code adds a supervised-contrastive term (weight
    0.001, :func:`bank_contrastive_loss`) and uses symmetric CE for ``L^t_SEG`` (docs/reference_code.md, "CPSL: terms
    not in the paper"): pass ``0.1 * CE + 1.0 *`` :func:`reverse_cross_entropy` as ``segmentation_loss``.

    Examples:
        >>> cpsl_total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.1))
        tensor(1.7000)
    """
    return segmentation_loss + self_labeling_weight * self_labeling_loss + consistency_weight * consistency_loss


class DistillationLoss(NamedTuple):
    """The parts of :func:`distillation_loss`: ``total = cross_entropy + kl_weight * kl_divergence``."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    kl_divergence: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    pseudo_confidence: torch.Tensor | None = None,
    confidence_threshold: float = 0.95,
    kl_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> DistillationLoss:
    """The knowledge-distillation loss of "CPSL+distill" (CPSL Sec. 4.2, following ProDA).

    ``CE(student, hard pseudo labels) + kl_weight * KL(teacher || student)``, where the hard pseudo
    labels come from the previous stage's model and keep only pixels whose confidence is strictly
    above ``confidence_threshold`` (0.95 in the authors' stage-2/3 commands; ``pseudo_confidence=None``
    uses the labels as given, e.g. already thresholded offline). The KL is
    ``sum_c p_t (log p_t - log p_s)`` per pixel, averaged over all pixels; the teacher is a constant.

    The authors' code (ProDA issues #20, #43; docs/reference_code.md, "CPSL: distillation stages") calls
    ``F.kl_div(softmax(student), softmax(teacher))``: the student should be a *log*-probability, so
    its "KL" is not a divergence and goes negative. That bug is not reproduced: the student's
    ``log_softmax`` is used. Its default ``'mean'`` reduction also divided by the number of classes,
    so its scale is ``1/K`` of this per-pixel KL (``kl_weight = 1/K`` reproduces that scale).

    Shape:
        - student_logits, teacher_logits: ``[N, K, h, w]``; pseudo_labels, pseudo_confidence:
          ``[N, h, w]`` on the same grid

    Examples:
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> parts = distillation_loss(logits, logits, torch.tensor([[[0, 1]]]), torch.tensor([[[0.99, 0.5]]]))
        >>> round(float(parts.cross_entropy), 4), float(parts.kl_divergence)
        (0.6931, 0.0)
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 4:
        raise DataError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits must both be [N, K, h, w]")
    grid = (student_logits.shape[0], *student_logits.shape[2:])
    if tuple(pseudo_labels.shape) != grid:
        raise DataError(f"pseudo labels {tuple(pseudo_labels.shape)} must be on the logits' grid {grid}; resize them (nearest) first")
    if pseudo_confidence is not None:
        if pseudo_confidence.shape != pseudo_labels.shape:
            raise DataError(f"pseudo_confidence {tuple(pseudo_confidence.shape)} must match pseudo_labels {tuple(pseudo_labels.shape)}")
        pseudo_labels = pseudo_labels.masked_fill(pseudo_confidence <= confidence_threshold, ignore_index)
    student_logits = student_logits.float()
    if (pseudo_labels != ignore_index).any():
        cross_entropy = F.cross_entropy(student_logits, pseudo_labels, ignore_index=ignore_index)
    else:
        cross_entropy = student_logits.sum() * 0.0  # no confident pixel: keep the graph for DDP
    kl_divergence = pixel_kl_divergence(student_logits, teacher_logits).mean()
    return DistillationLoss(cross_entropy + kl_weight * kl_divergence, cross_entropy, kl_divergence)
