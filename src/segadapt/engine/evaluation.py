"""Evaluation over a dataset: confusion matrix, per-class IoU, mIoU (19/16/13 protocols), MPA, and
with ``eval.boundary_width`` the same scores in the band around the labels' boundaries.

The trainer's validation and ``segadapt eval`` (:mod:`segadapt.commands.evaluate`) both call :func:`evaluate`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import EvalConfig
from ..data.classes import ClassInfo
from ..metrics import ConfusionMatrix, band_target, compute_scores, format_table, get_protocol, scores_for_protocol
from ..progress import progress
from . import distributed
from .inference import inference_model, predict_probs, same_shape_groups
from .label_space import check_protocols


@torch.no_grad()
def confusion_over(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    cfg: EvalConfig,
    device: torch.device,
    ignore_index: int,
    boundary: ConfusionMatrix | None = None,
) -> ConfusionMatrix:
    """Accumulate the confusion matrix of ``model`` over ``loader`` (labels at their own size).

    The images of a batch that share their size (and their label's) go through
    :func:`predict_probs` together; ``cfg`` sets the views and the speed options (``window_batch``,
    ``amp``, ``channels_last``: :func:`inference_model`). ``boundary``, when given, also counts the
    pixels within ``cfg.boundary_width`` of a label boundary (:func:`~segadapt.metrics.band_target`).
    """
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    shards = distributed.get_world_size()  # under torchrun rank 0 shows its share of the images
    done = "evaluated {n} images in {elapsed}" if shards == 1 else f"evaluated {{n}} images (rank 0's share of {shards}) in {{elapsed}}"
    with inference_model(model, cfg), progress(total=_images_of(loader), desc="evaluate", unit="img", done=done) as bar:
        for batch in loader:
            for images, labels in _stacked(batch["image"], batch["label"], device):
                probs = predict_probs(model, images, labels.shape[-2:], cfg)
                pred = probs.argmax(1)
                matrix.update(pred, labels)
                if boundary is not None:
                    boundary.update(pred, band_target(labels, cfg.boundary_width, ignore_index))
            bar.update(len(batch["label"]))
    return matrix


def _stacked(
    images: torch.Tensor | list[torch.Tensor], labels: torch.Tensor | list[torch.Tensor], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` on ``device`` per group of a batch's items whose image and label sizes agree.

    Shape:
        - images, labels: ``[N, 3, H, W]`` and ``[N, H', W']`` tensors, or lists of ``[3, H, W]`` / ``[H', W']``
        - yields: ``[n, 3, H, W]`` and ``[n, H', W']``
    """
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):  # collate stacked both
        yield _to(images, device), _to(labels, device)
        return
    shapes = [(*image.shape, *label.shape) for image, label in zip(images, labels)]
    for group in same_shape_groups(shapes):
        yield _to(torch.stack([images[i] for i in group]), device), _to(torch.stack([labels[i] for i in group]), device)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without waiting for the copy from pinned memory."""
    return tensor.to(device, non_blocking=tensor.is_pinned())


def _images_of(loader: DataLoader) -> int | None:
    """How many images ``loader`` yields: its sampler's length (this rank's share), else its dataset's."""
    for source in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        try:
            return len(source)  # type: ignore[arg-type]
        except TypeError:  # no sampler / an iterable dataset
            continue
    return None


def summarize(
    matrix: ConfusionMatrix,
    classes: ClassInfo,
    protocols: Sequence[int] = (),
    run_name: str = "model",
    boundary: ConfusionMatrix | None = None,
    boundary_width: int = 0,
) -> dict[str, Any]:
    """Scores of a confusion matrix: ``scores`` (SegScores), ``flat`` (JSON-ready, fractions), ``table``.

    ``flat["miou"]`` is the mean over the data's own classes; each protocol that selects other classes
    than those adds ``flat["miou<K>"]`` (e.g. ``miou16`` for SYNTHIA -> Cityscapes). A ``boundary``
    matrix (the band of ``boundary_width`` pixels) adds ``flat["boundary_miou"]``,
    ``boundary_pixel_accuracy``, ``boundary_mpa``, ``boundary_iou/<class>``, ``boundary_acc/<class>`` and
    ``boundary_width``.
    """
    check_protocols(classes, protocols)
    scores = compute_scores(matrix, classes.names)
    flat: dict[str, Any] = scores.to_dict()
    extra = [p for p in protocols if get_protocol(p).class_names != classes.names]
    for protocol in extra:
        flat[f"miou{protocol}"] = scores_for_protocol(matrix, protocol, class_names=classes.names).miou
    table = format_table({run_name: scores}, style="terminal", protocols=extra if extra else ())
    summary = f"{table}\nmIoU {100 * scores.miou:.2f} | pixel accuracy {100 * scores.pixel_accuracy:.2f} | MPA {100 * scores.mpa:.2f}"
    for protocol in extra:
        summary += f" | mIoU{protocol} {100 * flat[f'miou{protocol}']:.2f}"
    if boundary is not None:
        band = compute_scores(boundary, classes.names)
        flat["boundary_width"] = boundary_width
        flat.update(band.to_dict(prefix="boundary_"))
        summary += (
            f"\nwithin {boundary_width} px of a label boundary: mIoU {100 * band.miou:.2f} | "
            f"pixel accuracy {100 * band.pixel_accuracy:.2f} | MPA {100 * band.mpa:.2f}"
        )
    return {"scores": scores, "flat": flat, "table": summary, "matrix": matrix.state_dict()}


def evaluate(
    model: nn.Module, loader: DataLoader, classes: ClassInfo, cfg: EvalConfig, device: torch.device, run_name: str = "model"
) -> dict[str, Any]:
    """Scores of ``model`` on ``loader``; under torchrun ``loader`` holds this rank's share and the
    confusion matrices of all ranks are summed first (a collective: every rank must call it), so
    every rank returns the scores of the whole dataset."""
    boundary = ConfusionMatrix(classes.num_classes, classes.ignore_index, device=device) if cfg.boundary_width else None
    matrix = confusion_over(model, loader, classes.num_classes, cfg, device, classes.ignore_index, boundary)
    if boundary is not None:
        boundary.all_reduce()
    return summarize(matrix.all_reduce(), classes, cfg.protocols, run_name, boundary, cfg.boundary_width)
