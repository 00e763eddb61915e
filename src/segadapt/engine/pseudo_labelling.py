"""Offline pseudo labelling: the two passes behind ``segadapt pseudo-label`` and the self-training recipes.

Two passes over the dataset, as the DARS reference makes them (docs/reference_code.md, "DARS:
thresholds and random sampling"), but without its 200 GB of saved logits and its in-RAM lists
of every pixel's confidence:

1. predict every image (optional flip / multi-scale / sliding window) and stream the
   max-softmax confidences into a :class:`~segadapt.methods.thresholds.ConfidenceHistogram`
   (fixed size); the rule's per-class thresholds (ST, CBST, DARS) come from it. The views
   average logits or probabilities, and the softmax is float16 or float32
   (``pseudo_label.average``, ``pseudo_label.confidence_dtype``; rule ``dars`` defaults to the
   DARS code's logits and float16, :func:`~segadapt.methods.thresholds.class_probabilities`);
2. predict again, threshold (and, for DARS, randomly subsample) each image, and write
   ``<name>.png`` (uint8 train ids, the dataset's ignore index = unlabeled), while accumulating
   the quality statistics.

Predicting twice costs a second inference pass but keeps memory and disk independent of the
dataset size. Under torchrun with ``shard=True`` each process predicts every ``world_size``-th
image in both passes; the histograms and statistics are summed over the processes, so the
thresholds, the files and the summary are those of a single-process run (DARS's random
subsampling draws from a generator seeded by ``pseudo_label.seed`` and the image name).
``summary.json`` (written last, so its presence marks a complete folder) and
``summary.md`` hold the thresholds, sampling ratios, per-class counts, density, accuracy
against ground truth when there is some, and the KL divergence of the pseudo-label class
distribution to the ground truth's and to the rule's reference distribution (DARS Tab. S7).

A run that makes its own labels (recipes ``self_training``, ``bicl``, ``bicl_distill``) keeps them
in ``RUN_DIR/pseudo_labels`` and reuses them on its next start while they were made by the same
checkpoint, rule and target data (:func:`with_pseudo_labels`, :mod:`segadapt.engine.run_cache`).
The ``segadapt pseudo-label`` command itself (a checkpoint's labels into a folder) is
:mod:`segadapt.commands.pseudo_label`.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import EvalConfig, PseudoLabelConfig, RunConfig
from ..data.classes import ClassInfo
from ..data.pseudo_label_folder import pseudo_label_path
from ..errors import ConfigError, DataError
from ..methods.dars import dars_thresholds, given_distribution, label_distribution, predicted_distribution
from ..methods.thresholds import (
    ConfidenceHistogram,
    Thresholds,
    apply_thresholds,
    cbst_thresholds,
    class_probabilities,
    st_thresholds,
)
from ..metrics.pseudo_label_quality import PseudoLabelStats, kl_divergence
from ..progress import bar_enabled, progress
from . import distributed
from .builders import build_dataset_from_spec, build_eval_loader
from .inference import inference_model, predict_scores, same_shape_groups
from .run_cache import file_fingerprint, reuse_or_make

SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"


def inference_config(cfg: PseudoLabelConfig) -> EvalConfig:
    """The prediction settings of pseudo labelling, in the form :func:`predict_scores` takes."""
    return EvalConfig(
        size=cfg.size,
        flip=cfg.flip,
        scales=cfg.scales,
        sliding_window=cfg.sliding_window,
        window_flip=cfg.window_flip,
        window_batch=cfg.window_batch,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
    )


def _batches(loader: Any) -> Iterator[tuple[list[str], torch.Tensor | list[torch.Tensor], list[torch.Tensor | None]]]:
    """Names, images (``[N, 3, H, W]`` as collated, or a list of ``[3, H, W]`` of several sizes) and labels (or None)."""
    for batch in loader:
        images = batch["image"]
        labels = batch.get("label")
        labels = [None] * len(images) if labels is None else list(labels)
        yield batch["name"], images, labels


def _predictions(
    model: nn.Module, loader: Any, cfg: EvalConfig, device: torch.device, rule: PseudoLabelConfig
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, probs [C, H, W], label [H, W] or None)`` per image, at the image's own size.

    The images of a batch that share their size go through the network together. ``probs`` are
    in ``rule``'s confidence precision, from views averaged as ``rule`` says (module docstring).
    """
    average, dtype = rule.effective_average, rule.effective_confidence_dtype
    for names, images, labels in _batches(loader):
        for group, stacked in _size_groups(images):
            scores = predict_scores(model, stacked.to(device, non_blocking=stacked.is_pinned()), None, cfg, average=average)
            probs = class_probabilities(scores, average, dtype)
            yield from zip([names[i] for i in group], probs, [labels[i] for i in group])


def _size_groups(images: torch.Tensor | list[torch.Tensor]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices, images [n, 3, H, W])`` per size; a collated batch (pinned, maybe) is one group as it is."""
    if isinstance(images, torch.Tensor):
        yield list(range(len(images))), images
        return
    for group in same_shape_groups([tuple(image.shape) for image in images]):
        yield group, torch.stack([images[i] for i in group])


def source_class_counts(cfg: RunConfig, num_classes: int) -> torch.Tensor:
    """Pixels per class of ``data.source``'s labels: the DARS-SD target distribution."""
    if cfg.data.source is None:
        raise ConfigError(
            "pseudo_label.distribution=source needs labelled source data: set data.source, or use "
            "pseudo_label.distribution=given with pseudo_label.given_distribution"
        )
    dataset = build_dataset_from_spec(cfg.data.source, with_labels=True)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for index in progress(range(len(dataset)), desc="source class counts", unit="label"):
        label = torch.from_numpy(np.asarray(dataset.load_label(index)).astype(np.int64))
        counts += torch.bincount(label[label < num_classes], minlength=num_classes)
    return counts


@dataclass
class RuleResult:
    """The thresholds of a rule and the class distribution it aimed at (DARS only)."""

    thresholds: Thresholds
    reference: torch.Tensor | None


def thresholds_for(cfg: RunConfig, histogram: ConfidenceHistogram) -> RuleResult:
    """Per-class thresholds (and DARS sampling ratios) of ``cfg.pseudo_label.rule`` from the histogram."""
    rule = cfg.pseudo_label
    num_classes = histogram.num_classes
    if rule.rule == "st":
        return RuleResult(st_thresholds(rule.threshold, num_classes), None)
    if rule.rule == "cbst":
        return RuleResult(cbst_thresholds(histogram, rule.ratio), None)
    if rule.distribution == "source":
        prior = label_distribution(source_class_counts(cfg, num_classes))
    elif rule.distribution == "given":
        if rule.given_distribution is None:
            raise ConfigError(
                "pseudo_label.distribution=given needs pseudo_label.given_distribution: one value per class "
                f"({num_classes}), e.g. the class pixel percentages of a labelled subset"
            )
        prior = given_distribution(rule.given_distribution, num_classes)
    else:
        prior = predicted_distribution(histogram)
    return RuleResult(dars_thresholds(histogram, prior, rule.ratio), prior)


def _write_png(path: Path, label: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.to(torch.uint8).cpu().numpy(), mode="L").save(path)


def image_generator(seed: int, name: str) -> torch.Generator:
    """The random stream of one image's DARS subsampling: the same whichever process labels it, in any order."""
    return torch.Generator(device="cpu").manual_seed(seed * 2**32 + zlib.crc32(name.encode()))


def generate_pseudo_labels(
    model: nn.Module,
    dataset: Any,
    cfg: RunConfig,
    out_dir: str | Path,
    device: torch.device,
    log: Callable[[str], None] = print,
    shard: bool = False,
) -> dict[str, Any]:
    """Label ``dataset`` with ``model`` by ``cfg.pseudo_label`` into ``out_dir``; returns the summary.

    ``dataset`` yields labels when ground truth exists (only to measure accuracy, density and
    KL divergence; never to make the labels). ``shard=True`` splits the images over the
    torchrun processes, every one of which must call this (module docstring); rank 0 writes the
    summary. Without it the calling process labels everything alone.
    """
    out_dir = Path(out_dir)
    if len(dataset) == 0:
        raise ConfigError(f"{dataset!r} is empty: nothing to pseudo-label")
    rank, world_size = (distributed.get_rank(), distributed.get_world_size()) if shard else (0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out_dir / SUMMARY).unlink(missing_ok=True)
    classes: ClassInfo = dataset.classes
    infer = inference_config(cfg.pseudo_label)
    loader = build_eval_loader(
        dataset, None, cfg.data.val_batch_size, cfg.data.num_workers, rank=rank, world_size=world_size,
        pin_memory=device.type == "cuda", persistent_workers=True,  # the two passes share the workers
    )
    with inference_model(model.to(device), infer):
        result, stats = _label_passes(model, dataset, loader, cfg, infer, out_dir, device, log, world_size)
    summary = summarize_pseudo_labels(cfg, classes, result, stats, len(dataset))
    if rank == 0:
        (out_dir / SUMMARY_MD).write_text(summary_markdown(summary))
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    if world_size > 1:
        distributed.barrier()  # every file is on disk before any process reads the folder
    return summary


def _label_passes(
    model: nn.Module,
    dataset: Any,
    loader: Any,
    cfg: RunConfig,
    infer: EvalConfig,
    out_dir: Path,
    device: torch.device,
    log: Callable[[str], None],
    world_size: int,
) -> tuple[RuleResult, PseudoLabelStats]:
    """The two passes of :func:`generate_pseudo_labels` (module docstring): the thresholds, then the files."""
    rule, classes = cfg.pseudo_label, dataset.classes
    live = bar_enabled()  # in a terminal a bar replaces the every-100-images lines

    histogram = ConfidenceHistogram(classes.num_classes, device=device)
    with _pass_bar(1, len(dataset)) as bar:
        for index, (_, probs, _) in enumerate(_predictions(model, loader, infer, device, rule)):
            histogram.update(probs[None])
            bar.update(min(world_size, len(dataset) - bar.n))
            if (index + 1) % 100 == 0 and not live:
                log(f"pseudo-label pass 1/2: {(index + 1) * world_size}/{len(dataset)} images")
    if world_size > 1:
        histogram.all_reduce()
    result = thresholds_for(cfg, histogram)

    stats = PseudoLabelStats(classes.num_classes, classes.ignore_index)
    with _pass_bar(2, len(dataset)) as bar:
        for index, (name, probs, label) in enumerate(_predictions(model, loader, infer, device, rule)):
            confidence, prediction = probs.max(dim=0)  # on the device: 2 maps, not C, cross to the CPU
            pseudo = apply_thresholds(
                (confidence[None].cpu(), prediction[None].cpu()), *result.thresholds,
                generator=image_generator(rule.seed, name), ignore_index=classes.ignore_index,
            )[0]
            _write_png(pseudo_label_path(out_dir, name), pseudo)
            stats.update(pseudo, label)
            bar.update(min(world_size, len(dataset) - bar.n))
            if (index + 1) % 100 == 0 and not live:
                log(f"pseudo-label pass 2/2: {(index + 1) * world_size}/{len(dataset)} images")
    if world_size > 1:
        stats.all_reduce()
    return result, stats


def _pass_bar(number: int, total: int) -> Any:
    """The terminal bar of pass ``number`` of 2 (on rank 0, counting every process's images); no extra line in log files."""
    return progress(total=total, desc=f"pseudo-label pass {number}/2", unit="img")


def _finite_or_none(values: torch.Tensor) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values.double().tolist()]


def summarize_pseudo_labels(
    cfg: RunConfig, classes: ClassInfo, result: RuleResult, stats: PseudoLabelStats, num_images: int
) -> dict[str, Any]:
    """JSON-ready summary: rule, thresholds, per-class counts, density, accuracy, KL divergences."""
    rule = cfg.pseudo_label
    summary: dict[str, Any] = {
        "rule": rule.rule,
        "ratio": rule.ratio if rule.rule != "st" else None,
        "threshold": rule.threshold if rule.rule == "st" else None,
        "distribution": rule.distribution if rule.rule == "dars" else None,
        "confidence_dtype": rule.effective_confidence_dtype,
        "average": rule.effective_average,
        "num_images": num_images,
        "classes": list(classes.names),
        "thresholds": _finite_or_none(result.thresholds.thresholds),
        "sampling_ratio": result.thresholds.sampling_ratio.double().tolist(),
        "class_counts": stats.class_counts.tolist(),
        "density": stats.density,
    }
    if stats.has_target:
        summary["accuracy"] = stats.accuracy
        summary["target_class_counts"] = stats.target_class_counts.tolist()
        summary["kl_to_target"] = stats.kl_to() if int(stats.class_counts.sum()) else None
        diagonal = stats.confusion.matrix.diagonal().double()
        labelled = stats.confusion.matrix.sum(0).double()
        summary["class_accuracy"] = _finite_or_none(diagonal / labelled)
    if result.reference is not None:
        summary["reference_distribution"] = result.reference.double().tolist()
        if int(stats.class_counts.sum()):
            summary["kl_to_reference"] = kl_divergence(stats.class_counts, result.reference)
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the headline numbers and a per-class table."""
    head = [f"# Pseudo labels: {summary['rule']}", ""]
    for key in ("ratio", "threshold", "distribution", "num_images", "density", "accuracy", "kl_to_target", "kl_to_reference"):
        value = summary.get(key)
        if value is not None:
            head.append(f"- {key}: {value:.4f}" if isinstance(value, float) else f"- {key}: {value}")
    total = max(sum(summary["class_counts"]), 1)
    rows = ["", "| class | threshold | sampling | share of labels | label accuracy |", "|---|---:|---:|---:|---:|"]
    accuracy = summary.get("class_accuracy") or [None] * len(summary["classes"])
    for name, thr, ratio, count, acc in zip(summary["classes"], summary["thresholds"], summary["sampling_ratio"], summary["class_counts"], accuracy):
        thr_text = "none" if thr is None else f"{thr:.4f}"
        acc_text = "-" if acc is None else f"{100 * acc:.1f}"
        rows.append(f"| {name} | {thr_text} | {ratio:.3f} | {100 * count / total:.2f} % | {acc_text} |")
    return "\n".join(head + rows) + "\n"


def dataset_to_label(cfg: RunConfig, log: Callable[[str], None] = print) -> Any:
    """``data.target``, with its ground truth when the files have one (to measure, never to label)."""
    assert cfg.data.target is not None
    spec = cfg.data.target.model_copy(update={"pseudo_labels": None, "with_labels": True})
    try:
        return build_dataset_from_spec(spec, with_labels=True)
    except DataError:
        log("pseudo-label: data.target has no ground truth here; density is measured, accuracy and KL to the truth are not")
        return build_dataset_from_spec(spec.model_copy(update={"with_labels": False}), with_labels=False)


def pseudo_label_key(cfg: RunConfig, checkpoint: str | Path) -> dict[str, Any]:
    """What a run's pseudo labels depend on: the labelling checkpoint's content, the rule, the images.

    The ``pseudo_label`` section (rule, ratio, inference settings, DARS seed), ``data.target``
    (without ``pseudo_labels`` and ``with_labels``, which only decide what is measured), the
    ``model`` keys a raw-weight checkpoint is built with, and ``data.source`` when DARS follows the
    source class distribution. The speed options that leave the labels as they are
    (``window_batch``, ``channels_last``) are no part of it; ``amp`` is, once it is not ``off``
    (so labels made before the option existed stay valid), and so is ``window_flip`` once it changes the labels
    (``window`` with a flipped sliding window). ``confidence_dtype`` and ``average``
    enter resolved (``auto`` and the value it stands for make the same labels), and only when they
    differ from float32 and probabilities, the precision and averaging before the options existed.
    """
    assert cfg.data.target is not None
    rule = cfg.pseudo_label
    left_out = {"window_batch", "channels_last", "confidence_dtype", "average"} | ({"amp"} if rule.amp == "off" else set())
    left_out |= {"window_flip"} if rule.window_flip == "image" or rule.sliding_window is None or not rule.flip else set()
    labelling = rule.model_dump(mode="json", exclude=left_out)
    if rule.effective_confidence_dtype != "float32":
        labelling["confidence_dtype"] = rule.effective_confidence_dtype
    if rule.effective_average != "probabilities":
        labelling["average"] = rule.effective_average
    key: dict[str, Any] = {
        "checkpoint": file_fingerprint(checkpoint),
        "model": cfg.model.model_dump(mode="json", include={"name", "num_classes", "options"}),
        "pseudo_label": labelling,
        "data.target": cfg.data.target.model_dump(mode="json", exclude={"pseudo_labels", "with_labels"}),
    }
    if cfg.pseudo_label.rule == "dars" and cfg.pseudo_label.distribution == "source" and cfg.data.source is not None:
        key["data.source"] = cfg.data.source.model_dump(mode="json", exclude={"pseudo_labels", "with_labels"})
    return key


def with_pseudo_labels(
    cfg: RunConfig, checkpoint: str | Path, run_dir: Path, log: Callable[[str], None], shard: bool = True
) -> RunConfig:
    """``cfg`` training on pseudo labels of ``data.target`` made by ``checkpoint`` in ``RUN_DIR/pseudo_labels``.

    The folder is made unless it holds the labels of the same inputs (:func:`pseudo_label_key`,
    the rule of :func:`~segadapt.engine.run_cache.reuse_or_make`). ``shard=True``: every torchrun
    process calls this (a recipe's ``collective_prepare``) and labels its share; rank 0 records the key.
    """
    from .builders import resolve_device
    from .loading import load_trained_model

    out_dir = run_dir / "pseudo_labels"

    def make() -> None:
        model, _ = load_trained_model(checkpoint, cfg)
        summary = generate_pseudo_labels(model, dataset_to_label(cfg, log), cfg, out_dir, resolve_device(cfg.device), log, shard=shard)
        accuracy = summary.get("accuracy")
        log(f"pseudo labels: density {summary['density']:.3f}" + (f", accuracy {accuracy:.3f}" if accuracy is not None else ""))

    writer = distributed.get_rank() == 0 if shard else True
    what = f"pseudo labels ({cfg.pseudo_label.rule} from {checkpoint})"
    reuse_or_make(out_dir, pseudo_label_key(cfg, checkpoint), make, log, what, writer=writer)
    assert cfg.data.target is not None  # pseudo_label_key asserted it
    target = cfg.data.target.model_copy(update={"pseudo_labels": str(out_dir)})
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"target": target})})
