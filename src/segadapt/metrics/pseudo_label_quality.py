"""Quality of pseudo labels: density, accuracy, class distribution and its KL divergence.

These are the numbers the papers use to compare pseudo-labelling schemes: density and accuracy
(BiCL supplement Tab. 1 and 2) and the KL divergence between the class distribution of the
pseudo labels and the real one (DARS supplement Tab. S7).

Definitions (the papers give no formulas; these are the assumptions):

- a pixel is **labelled** when its pseudo label is not ``ignore_index``;
- **density** = labelled pixels / valid pixels, where valid means the ground truth is not
  ``ignore_index``. Without ground truth every pixel is valid.
- **accuracy** = correct / labelled, over pixels that are labelled and have a valid ground truth;
- the **pseudo-label class distribution** counts every labelled pixel, the **target class
  distribution** every pixel with valid ground truth.

Examples:
    >>> stats = pseudo_label_stats(torch.tensor([[0, 255], [1, 1]]), torch.tensor([[0, 0], [1, 0]]), 2, ignore_index=255)
    >>> stats.density, stats.accuracy
    (0.75, 0.6666666666666666)
"""

from __future__ import annotations

import math

import torch

from ..collectives import all_reduce_sum
from ..data.classes import class_pixel_counts
from .confusion import ConfusionMatrix, _check_range


class PseudoLabelStats:
    """Accumulated pseudo-label statistics over batches, shards or ranks.

    ``confusion`` is a :class:`ConfusionMatrix` of pseudo labels (columns) against ground truth
    (rows) over labelled pixels with valid ground truth, so per-class IoU/accuracy of the pseudo
    labels come from :func:`~segadapt.metrics.compute_scores`.
    """

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = ConfusionMatrix(num_classes, ignore_index)
        # [pixels, labelled pixels, pixels with valid ground truth, labelled pixels with valid ground truth]
        self.pixel_counts = torch.zeros(4, dtype=torch.int64)
        self.class_counts = torch.zeros(num_classes, dtype=torch.int64)
        self.target_class_counts = torch.zeros(num_classes, dtype=torch.int64)
        self.has_target: bool | None = None

    def update(self, pseudo: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Count one batch of pseudo labels ``[N, H, W]`` (or ``[H, W]``), with ground truth if known.

        All updates of one accumulator must agree on whether ground truth is given, because
        density is measured over different pixels in the two cases.
        """
        if pseudo.is_floating_point():
            raise ValueError(f"pseudo labels must hold integer class ids, got dtype {pseudo.dtype}")
        if target is not None and target.shape != pseudo.shape:
            raise ValueError(f"pseudo label shape {tuple(pseudo.shape)} != target shape {tuple(target.shape)}")
        pseudo = pseudo.long()
        _check_range(pseudo, self.num_classes, self.ignore_index, "pseudo label")
        if target is not None:
            target = target.to(device=pseudo.device, dtype=torch.long)
            _check_range(target, self.num_classes, self.ignore_index, "target")
        self._set_has_target(target is not None)

        labelled = pseudo != self.ignore_index
        device = self.pixel_counts.device
        self.class_counts += class_pixel_counts(pseudo, self.num_classes, self.ignore_index).to(device)
        if target is None:
            valid = torch.ones_like(labelled)
        else:
            valid = target != self.ignore_index
            self.target_class_counts += class_pixel_counts(target, self.num_classes, self.ignore_index).to(device)
            # Unlabelled pixels become ignored ground truth, so the matrix only sees labelled ones.
            self.confusion.update(pseudo.clamp(max=self.num_classes - 1), torch.where(labelled, target, self.ignore_index))
        counts = [pseudo.numel(), int(labelled.sum()), int(valid.sum()), int((labelled & valid).sum())]
        self.pixel_counts += torch.tensor(counts)

    def merge(self, other: PseudoLabelStats) -> PseudoLabelStats:
        """Add ``other``'s counts (e.g. another shard); returns ``self``."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge pseudo-label statistics of {other.num_classes} classes (ignore {other.ignore_index}) "
                f"into {self.num_classes} classes (ignore {self.ignore_index})"
            )
        if other.has_target is not None:
            self._set_has_target(other.has_target)
        self.confusion.merge(other.confusion)
        self.pixel_counts += other.pixel_counts
        self.class_counts += other.class_counts
        self.target_class_counts += other.target_class_counts
        return self

    def all_reduce(self) -> PseudoLabelStats:
        """Sum over ranks when ``torch.distributed`` is initialised (every rank must call it; a no-op otherwise).

        The counts travel as one tensor: :func:`segadapt.collectives.all_reduce_sum`.
        """
        self.confusion.all_reduce()
        packed = all_reduce_sum(torch.cat([self.pixel_counts, self.class_counts, self.target_class_counts]))
        self.pixel_counts, self.class_counts, self.target_class_counts = (
            part.clone() for part in packed.split([4, self.num_classes, self.num_classes])
        )
        return self

    @property
    def density(self) -> float:
        """Labelled fraction of the valid pixels (NaN before any valid pixel)."""
        _, _, valid, labelled_valid = self.pixel_counts.tolist()
        return labelled_valid / valid if valid else float("nan")

    @property
    def accuracy(self) -> float:
        """Fraction of labelled pixels with valid ground truth whose pseudo label is right."""
        if not self.has_target:
            raise ValueError("pseudo-label accuracy needs ground truth; pass target= to update()")
        total = int(self.confusion.matrix.sum())
        return int(self.confusion.matrix.trace()) / total if total else float("nan")

    def class_distribution(self) -> torch.Tensor:
        """The pseudo labels' class frequencies, float64 ``[C]`` summing to 1."""
        return _normalise(self.class_counts)

    def target_class_distribution(self) -> torch.Tensor:
        """The ground truth's class frequencies, float64 ``[C]`` summing to 1."""
        if not self.has_target:
            raise ValueError("the target class distribution needs ground truth; pass target= to update()")
        return _normalise(self.target_class_counts)

    def kl_to(self, reference: torch.Tensor | None = None, eps: float = 1e-8) -> float:
        """KL(pseudo-label distribution || reference), by default the ground truth's (DARS Tab. S7)."""
        reference = self.target_class_distribution() if reference is None else reference
        return kl_divergence(self.class_counts, reference, eps)

    def to_dict(self, prefix: str = "") -> dict[str, float | None]:
        """JSON-ready summary for ``metrics.jsonl`` (NaN becomes ``None``)."""
        record = {f"{prefix}density": self.density}
        if self.has_target:
            record[f"{prefix}accuracy"] = self.accuracy
            record[f"{prefix}kl_to_target"] = self.kl_to()
        return {key: None if math.isnan(value) else value for key, value in record.items()}

    def _set_has_target(self, has_target: bool) -> None:
        if self.has_target is None:
            self.has_target = has_target
        elif self.has_target != has_target:
            raise ValueError(
                "pseudo-label statistics mix batches with and without ground truth; density is measured "
                "over different pixels in the two cases, so keep one PseudoLabelStats for each"
            )


def pseudo_label_stats(
    pseudo: torch.Tensor, target: torch.Tensor | None, num_classes: int, ignore_index: int
) -> PseudoLabelStats:
    """Statistics of one batch of pseudo labels; ``merge`` or ``update`` them to accumulate."""
    stats = PseudoLabelStats(num_classes, ignore_index)
    stats.update(pseudo, target)
    return stats


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> float:
    """KL(p || q) = sum_c p_c log(p_c / q_c) in nats, between two class distributions.

    DARS supplement Tab. S7 reports the KL divergence "between the distribution of pseudo labels
    and Cityscapes real labels"; it gives no formula, and we read the order it names as
    KL(pseudo || real), so ``p`` is the pseudo-label distribution and ``q`` the reference.
    ``p`` and ``q`` may be counts or probabilities; each is normalised to sum to 1 after adding
    ``eps`` to every entry, which keeps the value finite when ``q`` misses a class that ``p`` has.
    With ``eps=0`` terms with ``p_c = 0`` contribute 0 and ``q_c = 0 < p_c`` gives ``inf``.

    Examples:
        >>> round(kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75]), eps=0), 6)
        0.143841
    """
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(
            f"KL divergence needs two 1-d distributions of the same length, got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    if bool((p < 0).any()) or bool((q < 0).any()):
        raise ValueError("class distributions must be non-negative counts or probabilities")
    p = _normalise(p.double().cpu() + eps)
    q = _normalise(q.double().cpu() + eps)
    return float(torch.special.xlogy(p, p).sum() - torch.special.xlogy(p, q).sum())


def _normalise(counts: torch.Tensor) -> torch.Tensor:
    total = counts.double().sum()
    if total <= 0:
        raise ValueError("cannot normalise an all-zero class distribution (no labelled pixel was counted)")
    return counts.double() / total
