"""Confusion matrix accumulation and the segmentation scores computed from it.

The matrix follows the notation of the CPSL supplement (Sec. 2): entry ``p_ij`` counts
the pixels of ground-truth class ``i`` predicted as class ``j``, so rows are ground truth and
columns are predictions. Pixels whose ground truth is ``ignore_index`` are not counted.

Absent classes: a class with no ground-truth pixel and no predicted pixel has an undefined IoU
(0/0). Its IoU is NaN and it is left out of the mean, as in the ProDA/CPSL evaluation
(``np.nanmean``; docs/reference_code.md, "CPSL: evaluation") and mmseg. ``absent_as_zero=True``
counts it as 0 instead, which is what DARS and BiCL's ``mean(I / (U + 1e-10))`` does. A class that is predicted but absent
from the ground truth has IoU 0 either way (its union is its false positives). Per-class accuracy
is undefined (NaN) for every class without ground-truth pixels, even when it was predicted; note
that torchmetrics' macro accuracy scores such a class as 0 instead.

Examples:
    >>> cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    >>> cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 255]]))
    >>> compute_scores(cm).miou
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..collectives import all_reduce_sum
from ..errors import CheckpointError


@dataclass(frozen=True, eq=False)
class SegScores:
    """Scores of one evaluation, all fractions in [0, 1] (tables print them in percent).

    ``per_class_iou`` and ``per_class_accuracy`` are float64 tensors ``[C]`` holding NaN for
    classes whose score is undefined (see the module docstring).
    """

    per_class_iou: torch.Tensor
    per_class_accuracy: torch.Tensor
    miou: float
    pixel_accuracy: float
    mpa: float
    class_names: tuple[str, ...]

    def to_dict(self, prefix: str = "") -> dict[str, float | None]:
        """Flat, JSON-ready scores for ``metrics.jsonl``; NaN becomes ``None`` (JSON ``null``).

        Keys: ``{prefix}miou``, ``{prefix}pixel_accuracy``, ``{prefix}mpa``, then
        ``{prefix}iou/<class>`` and ``{prefix}acc/<class>`` for every class.
        """
        record = {
            f"{prefix}miou": _json_float(self.miou),
            f"{prefix}pixel_accuracy": _json_float(self.pixel_accuracy),
            f"{prefix}mpa": _json_float(self.mpa),
        }
        for name, iou in zip(self.class_names, self.per_class_iou.tolist()):
            record[f"{prefix}iou/{name}"] = _json_float(iou)
        for name, accuracy in zip(self.class_names, self.per_class_accuracy.tolist()):
            record[f"{prefix}acc/{name}"] = _json_float(accuracy)
        return record


def _json_float(value: float) -> float | None:
    return None if value != value else float(value)


class ConfusionMatrix:
    """A ``[C, C]`` int64 confusion matrix (rows: ground truth, columns: prediction).

    Counting uses one ``torch.bincount`` per update, on the device of the inputs. With
    ``device=None`` the matrix follows the inputs (it moves to the device of the first update),
    so evaluation on GPU never copies predictions to the host.

    Examples:
        >>> cm = ConfusionMatrix(2, ignore_index=255)
        >>> cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
        >>> cm.matrix.tolist()
        [[1, 1], [0, 1]]
    """

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes={num_classes}); use a value outside 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._follow_inputs = device is None
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch.

        Shape:
            pred: ``[N, H, W]`` or ``[H, W]`` integer class ids in ``[0, C)``.
            target: same shape, train ids in ``[0, C)`` or ``ignore_index``.

        Raises:
            ValueError: shapes differ, a float tensor was passed, or a value is out of range
                (the message lists the offending values).
        """
        if pred.shape != target.shape:
            hint = " (pass logits.argmax(1), not the logits)" if pred.dim() == target.dim() + 1 else ""
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}{hint}")
        for role, tensor in (("prediction", pred), ("target", target)):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise ValueError(f"{role} must hold integer class ids, got dtype {tensor.dtype}")
        pred = pred.long()
        target = target.to(device=pred.device, dtype=torch.long)
        _check_range(pred, self.num_classes, None, "prediction")
        _check_range(target, self.num_classes, self.ignore_index, "target")
        if self._follow_inputs:
            self.matrix = self.matrix.to(pred.device)
        self.matrix += confusion_counts(pred, target, self.num_classes, self.ignore_index).to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts to this matrix (e.g. per-shard results); returns ``self``."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class matrix (ignore {self.ignore_index})"
            )
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all ranks when ``torch.distributed`` is initialised; a no-op otherwise.

        Every rank must call it (it is a collective): :func:`segadapt.collectives.all_reduce_sum`,
        which sends a CPU matrix through the current CUDA device under NCCL.
        """
        all_reduce_sum(self.matrix)
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix.cpu().clone(), "ignore_index": self.ignore_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        matrix = state.get("matrix")
        if not isinstance(matrix, torch.Tensor) or matrix.shape != self.matrix.shape:
            found = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise CheckpointError(
                f"confusion matrix state 'matrix' is {found}, expected {tuple(self.matrix.shape)}: "
                f"it was saved for another class count; evaluate with the checkpoint's num_classes"
            )
        if state.get("ignore_index", self.ignore_index) != self.ignore_index:
            raise CheckpointError(
                f"confusion matrix state has ignore_index {state['ignore_index']}, this matrix uses "
                f"{self.ignore_index}; build the ConfusionMatrix with the same ignore_index"
            )
        self.matrix.copy_(matrix.to(self.matrix.device, torch.int64))


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The ``[C, C]`` counts of one batch of already validated long tensors.

    Ignored pixels are sent to an overflow bin (index ``C*C``) rather than masked out, which keeps
    the tensor shapes static and avoids a boolean-mask copy.
    """
    overflow = num_classes * num_classes
    flat = torch.where(target == ignore_index, overflow, target * num_classes + pred).reshape(-1)
    counts = torch.bincount(flat, minlength=overflow + 1)
    return counts[:overflow].reshape(num_classes, num_classes)


def _check_range(values: torch.Tensor, num_classes: int, ignore_index: int | None, role: str) -> None:
    bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bool(bad.any()):
        found = torch.unique(values[bad])
        listed = ", ".join(str(v) for v in found[:10].tolist()) + (", ..." if found.numel() > 10 else "")
        allowed = f"0..{num_classes - 1}" + (f" or {ignore_index} (ignore)" if ignore_index is not None else "")
        raise ValueError(f"{role} holds id(s) {listed} outside {allowed}; check the label mapping and num_classes")


def _as_matrix(matrix: ConfusionMatrix | torch.Tensor) -> torch.Tensor:
    counts = matrix.matrix if isinstance(matrix, ConfusionMatrix) else matrix
    if counts.dim() != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix is square [C, C], got shape {tuple(counts.shape)}")
    return counts.double()


def per_class_iou(matrix: ConfusionMatrix | torch.Tensor, absent_as_zero: bool = False) -> torch.Tensor:
    """IoU_c = p_cc / (sum_j p_cj + sum_i p_ic - p_cc), float64 ``[C]``.

    Classes absent from both ground truth and prediction are NaN, or 0 with ``absent_as_zero``.
    """
    counts = _as_matrix(matrix)
    true_positives = counts.diagonal()
    union = counts.sum(dim=1) + counts.sum(dim=0) - true_positives
    return _divide(true_positives, union, absent_as_zero)


def per_class_accuracy(matrix: ConfusionMatrix | torch.Tensor, absent_as_zero: bool = False) -> torch.Tensor:
    """Pixel accuracy of each class, p_ii / sum_j p_ij (CPSL supplement Eq. 1), float64 ``[C]``.

    NaN for classes without ground-truth pixels, or 0 with ``absent_as_zero``.
    """
    counts = _as_matrix(matrix)
    return _divide(counts.diagonal(), counts.sum(dim=1), absent_as_zero)


def mean_iou(matrix: ConfusionMatrix | torch.Tensor, absent_as_zero: bool = False) -> float:
    """Mean of :func:`per_class_iou` over the classes where it is defined (NaN if none is)."""
    return _nanmean(per_class_iou(matrix, absent_as_zero))


def mean_pixel_accuracy(matrix: ConfusionMatrix | torch.Tensor, absent_as_zero: bool = False) -> float:
    """MPA, CPSL supplement Eq. 2: (1/C) sum_i p_ii / sum_j p_ij.

    The paper averages over all C classes; a class without ground-truth pixels makes its term 0/0,
    so here it is left out of the mean (``absent_as_zero`` counts it as 0 instead).
    """
    return _nanmean(per_class_accuracy(matrix, absent_as_zero))


def pixel_accuracy(matrix: ConfusionMatrix | torch.Tensor) -> float:
    """Overall pixel accuracy, sum_i p_ii / sum_ij p_ij (NaN for an empty matrix)."""
    counts = _as_matrix(matrix)
    total = counts.sum()
    return float(counts.trace() / total) if total > 0 else float("nan")


def compute_scores(
    matrix: ConfusionMatrix | torch.Tensor,
    class_names: Sequence[str] | None = None,
    absent_as_zero: bool = False,
) -> SegScores:
    """All scores of a confusion matrix; ``class_names`` defaults to ``class0``, ``class1``, ...

    Examples:
        >>> compute_scores(torch.tensor([[3, 1], [0, 4]]), ("road", "car")).pixel_accuracy
        0.875
    """
    counts = _as_matrix(matrix)
    num_classes = counts.shape[0]
    names = tuple(class_names) if class_names is not None else tuple(f"class{i}" for i in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    iou = per_class_iou(counts, absent_as_zero)
    accuracy = per_class_accuracy(counts, absent_as_zero)
    return SegScores(
        per_class_iou=iou,
        per_class_accuracy=accuracy,
        miou=_nanmean(iou),
        pixel_accuracy=pixel_accuracy(counts),
        mpa=_nanmean(accuracy),
        class_names=names,
    )


def _divide(numerator: torch.Tensor, denominator: torch.Tensor, absent_as_zero: bool) -> torch.Tensor:
    undefined_value = 0.0 if absent_as_zero else float("nan")
    ratio = numerator / denominator.clamp(min=1)
    return torch.where(denominator > 0, ratio, torch.full_like(ratio, undefined_value)).cpu()


def _nanmean(values: torch.Tensor) -> float:
    return float(values.nanmean()) if values.numel() else float("nan")
