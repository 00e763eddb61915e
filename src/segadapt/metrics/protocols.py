"""The SYNTHIA -> Cityscapes evaluation protocols over the 19 Cityscapes train ids.

See docs/datasets/synthia.md, "Evaluation protocols".

- **19**: all 19 classes (GTA5 -> Cityscapes, and any 19-way model).
- **16**: the 19 minus terrain (9), truck (14) and train (16), which SYNTHIA does not label.
- **13**: the 16 minus wall (3), fence (4) and pole (5). mIoU13 excludes exactly these three
  (ProDA ``n_class=13``: ``to19=[0,1,2,6,7,8,10,11,12,13,15,17,18]``; BiCL drops indices 3,4,5
  of the 16). Papers mark it ``mIoU*``.

A protocol score is computed from a confusion matrix in one of two label spaces:

- the **19-class space** (DAFormer, ProDA ``n_class=19``, the embedded benchmark): mIoU16 is the
  plain mean of the 16 per-class IoUs of the 19-class matrix, which is what DAFormer and ProDA
  report (DAFormer's README writes it as ``mIoU19 * 19 / 16``, valid because the three unlabelled
  classes have IoU 0; computing it from the per-class IoUs does not rely on that). Ground-truth
  pixels of the dropped classes still count as false positives of whatever class they were
  predicted as.
- a **compact space** whose ids are the protocol's classes re-indexed 0..K-1 (CBST/CRST, ProDA
  ``n_class=16``/``13``): the model predicts K classes directly and the ground truth was mapped
  with :meth:`Protocol.to_compact`, so pixels of dropped classes are ignored. mIoU13 of a 16-class
  model is the mean of its 13 IoUs (as the CBST author confirms; docs/datasets/synthia.md,
  "Evaluation protocols").

The space is recognised by the matrix size: 19, or the class count of a protocol.

Examples:
    >>> get_protocol(16).class_names[:4]
    ('road', 'sidewalk', 'building', 'wall')
    >>> protocol_indices(get_protocol(13), 16)[:4]
    [0, 1, 2, 6]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.classes import CITYSCAPES_CLASSES
from .confusion import ConfusionMatrix, SegScores, _as_matrix, _nanmean, per_class_accuracy, per_class_iou


@dataclass(frozen=True)
class Protocol:
    """A subset of the 19 Cityscapes classes, given as train ids in ascending order."""

    name: str
    train_ids: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.train_ids)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(CITYSCAPES_CLASSES.names[i] for i in self.train_ids)

    def to_compact(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Map 19-class train ids to this protocol's compact ids 0..K-1; dropped classes -> ignore.

        Examples:
            >>> get_protocol(16).to_compact(torch.tensor([0, 9, 10, 255]), ignore_index=255).tolist()
            [0, 255, 9, 255]
        """
        table = torch.full((256,), ignore_index, dtype=torch.long, device=labels.device)
        table[list(self.train_ids)] = torch.arange(self.num_classes, device=labels.device)
        return table[labels.long()]


_ALL = tuple(range(CITYSCAPES_CLASSES.num_classes))
_SYNTHIA_UNLABELLED = (9, 14, 16)  # terrain, truck, train
_MIOU13_DROPPED = (3, 4, 5)  # wall, fence, pole
PROTOCOL_19 = Protocol("mIoU19", _ALL)
PROTOCOL_16 = Protocol("mIoU16", tuple(i for i in _ALL if i not in _SYNTHIA_UNLABELLED))
PROTOCOL_13 = Protocol("mIoU13", tuple(i for i in PROTOCOL_16.train_ids if i not in _MIOU13_DROPPED))
PROTOCOLS: dict[int, Protocol] = {p.num_classes: p for p in (PROTOCOL_19, PROTOCOL_16, PROTOCOL_13)}


def get_protocol(key: int | str | Protocol) -> Protocol:
    """A protocol by class count (``16``), string (``"16"``, ``"mIoU16"``) or the object itself."""
    if isinstance(key, Protocol):
        return key
    digits = str(key).lower().removeprefix("miou")
    if not digits.isdigit() or int(digits) not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {key!r}; use one of {sorted(PROTOCOLS)} (e.g. 16 or 'mIoU16')")
    return PROTOCOLS[int(digits)]


def protocol_indices(protocol: int | str | Protocol, label_space: int | Sequence[str]) -> list[int]:
    """Positions of ``protocol``'s classes in a label space.

    ``label_space`` is the space's class names (what the engine passes: a protocol applies to any
    label space holding its Cityscapes classes, by name), or only its size, read as the 19-class
    Cityscapes space or a compact protocol space (19, 16 or 13 classes).

    Raises:
        ValueError: the label space lacks one of the protocol's classes (e.g. the 19-class protocol
            on a 16-class model, or any protocol on data that is not Cityscapes-labelled).

    Examples:
        >>> protocol_indices(13, ("car", "road", "sidewalk"))
        Traceback (most recent call last):
        ...
        ValueError: protocol mIoU13 needs Cityscapes classes that this 3-class label space lacks (building, traffic light, traffic sign, ...); it applies to Cityscapes-labelled data only
    """  # noqa: E501 (the doctest's exception message is one line)
    protocol = get_protocol(protocol)
    if not isinstance(label_space, int):
        names = tuple(label_space)
        missing = [name for name in protocol.class_names if name not in names]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(
                f"protocol {protocol.name} needs Cityscapes classes that this {len(names)}-class label space lacks "
                f"({shown}); it applies to Cityscapes-labelled data only"
            )
        return [names.index(name) for name in protocol.class_names]
    num_classes = label_space
    space = PROTOCOLS.get(num_classes)
    if space is None:
        raise ValueError(
            f"protocol {protocol.name} is defined over the 19 Cityscapes classes; a {num_classes}-class "
            f"label space is neither that nor a compact protocol space ({sorted(PROTOCOLS)} classes)"
        )
    missing = [CITYSCAPES_CLASSES.names[i] for i in protocol.train_ids if i not in space.train_ids]
    if missing:
        raise ValueError(
            f"protocol {protocol.name} needs classes {missing} that a {num_classes}-class model does not "
            f"predict; use protocol {num_classes} or a smaller one"
        )
    return [space.train_ids.index(i) for i in protocol.train_ids]


def scores_for_protocol(
    matrix: ConfusionMatrix | torch.Tensor,
    protocol: int | str | Protocol,
    absent_as_zero: bool = False,
    class_names: Sequence[str] | None = None,
) -> SegScores:
    """Scores restricted to ``protocol``'s classes (see the module docstring for the two spaces).

    Per-class IoU and accuracy are those of the full matrix, taken at the protocol's classes;
    ``miou`` and ``mpa`` are their means; ``pixel_accuracy`` counts ground-truth pixels of the
    protocol's classes only. ``class_names`` names the matrix's classes (see :func:`protocol_indices`);
    without it the matrix size says which space it is.

    Examples:
        >>> scores_for_protocol(ConfusionMatrix(19, ignore_index=255), 16).class_names[-1]
        'bicycle'
    """
    protocol = get_protocol(protocol)
    counts = _as_matrix(matrix)
    index = torch.tensor(protocol_indices(protocol, counts.shape[0] if class_names is None else class_names), dtype=torch.long)
    iou = per_class_iou(counts, absent_as_zero)[index]
    accuracy = per_class_accuracy(counts, absent_as_zero)[index]
    ground_truth_pixels = counts.sum(dim=1)[index.to(counts.device)].sum()
    correct_pixels = counts.diagonal()[index.to(counts.device)].sum()
    return SegScores(
        per_class_iou=iou,
        per_class_accuracy=accuracy,
        miou=_nanmean(iou),
        pixel_accuracy=float(correct_pixels / ground_truth_pixels) if ground_truth_pixels > 0 else float("nan"),
        mpa=_nanmean(accuracy),
        class_names=protocol.class_names,
    )
