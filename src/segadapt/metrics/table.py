"""Per-class IoU tables like the papers' (one row per run, one column per class, then mIoU).

Examples:
    >>> rows = {"source-only": [0.5, float("nan")], "oracle": [1.0, 0.25]}
    >>> print(format_table(rows, class_names=("road", "car")))
    | run | road | car | mIoU |
    |---|---:|---:|---:|
    | source-only | 50.0 | - | 50.0 |
    | oracle | 100.0 | 25.0 | 62.5 |
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import torch

from .confusion import SegScores
from .protocols import Protocol, get_protocol, protocol_indices

# Short headers for the terminal style; other names are cut to ABBREVIATION_LENGTH characters.
ABBREVIATIONS = {
    "sidewalk": "sidew", "building": "build", "traffic light": "light", "traffic sign": "sign",
    "vegetation": "veget", "terrain": "terr", "person": "pers", "motorcycle": "mbike", "bicycle": "bike",
}
ABBREVIATION_LENGTH = 5


def format_table(
    rows: Mapping[str, SegScores | Sequence[float] | torch.Tensor],
    class_names: Sequence[str] | None = None,
    style: Literal["markdown", "terminal"] = "markdown",
    protocols: int | str | Protocol | Sequence[int | str | Protocol] = (),
) -> str:
    """Format per-class IoUs in percent with one decimal; undefined (NaN) values print as ``-``.

    Args:
        rows: run name -> its scores, or its per-class IoUs as fractions in [0, 1].
        class_names: the label space of the rows; defaults to the first ``SegScores`` row's.
        style: ``"markdown"`` (full class names) or ``"terminal"`` (aligned, abbreviated names).
        protocols: evaluation protocol(s) (e.g. ``(16, 13)`` for SYNTHIA -> Cityscapes). The class
            columns are those of the first protocol, followed by one mIoU column per protocol
            (``mIoU16``, ``mIoU13``), each the mean of its classes' defined IoUs. Without
            protocols: every class and one ``mIoU`` column.
    """
    if style not in ("markdown", "terminal"):
        raise ValueError(f"unknown table style {style!r}; use 'markdown' or 'terminal'")
    names = _label_space(rows, class_names)
    ious = {run: _per_class_iou(run, values, names) for run, values in rows.items()}
    if isinstance(protocols, (int, str, Protocol)):
        protocols = (protocols,)
    chosen = [get_protocol(p) for p in protocols]
    averages = [(p.name, _protocol_columns(p, names)) for p in chosen]
    columns = averages[0][1] if averages else list(range(len(names)))
    averages = averages or [("mIoU", columns)]

    header = ["run"] + [names[i] for i in columns] + [title for title, _ in averages]
    body = []
    for run, iou in ious.items():
        cells = [iou[i] for i in columns] + [_nanmean([iou[i] for i in index]) for _, index in averages]
        body.append([run] + [_percent(value) for value in cells])
    if style == "markdown":
        return _markdown(header, body)
    return _terminal([header[0]] + _abbreviate(header[1 : 1 + len(columns)]) + header[1 + len(columns) :], body)


def _protocol_columns(protocol: Protocol, names: tuple[str, ...]) -> list[int]:
    return protocol_indices(protocol, names)


def _label_space(rows: Mapping[str, object], class_names: Sequence[str] | None) -> tuple[str, ...]:
    if class_names is not None:
        return tuple(class_names)
    for values in rows.values():
        if isinstance(values, SegScores):
            return values.class_names
    raise ValueError("format_table needs class_names when no row is a SegScores")


def _per_class_iou(run: str, values: SegScores | Sequence[float] | torch.Tensor, names: tuple[str, ...]) -> list[float]:
    if isinstance(values, SegScores):
        if values.class_names != names:
            raise ValueError(f"row {run!r} is scored over classes {values.class_names}, the table over {names}")
        return values.per_class_iou.tolist()
    iou = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(iou) != len(names):
        raise ValueError(f"row {run!r} has {len(iou)} per-class values for {len(names)} classes")
    if any(v < 0 or v > 1 for v in iou if not math.isnan(v)):
        raise ValueError(f"row {run!r}: per-class IoUs are fractions in [0, 1]; divide percentages by 100")
    return iou


def _nanmean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else float("nan")


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _abbreviate(names: list[str]) -> list[str]:
    short = [ABBREVIATIONS.get(name, name[:ABBREVIATION_LENGTH]) for name in names]
    # Ambiguous headers are worse than wide ones.
    return short if len(set(short)) == len(short) else names


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _terminal(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = []
    for row in [header, *body]:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))
        lines.append(" ".join([first, *rest]))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
