"""Supervised segmentation losses, selected by the ``loss`` section of the config.

Every recipe computes its supervised cross-entropy terms (source labels, pseudo labels,
mixed labels) with ``self.seg_loss(logits, labels)``. :func:`build_seg_loss` returns

- ``loss.name: ce`` -> :class:`CrossEntropySegLoss`, plain cross-entropy;
- ``loss.name: blv`` -> :class:`BLVSegLoss`, the same cross-entropy on logits perturbed by the
  balanced logit variation of BLV (BLV supplement Alg. 1; :mod:`segadapt.methods.blv`) in
  training mode, and plain cross-entropy in eval mode. So BLV is a drop-in replacement in
  every recipe: each CE term the recipe computes through ``seg_loss`` gets the variation.

Both are ``nn.Module`` s: a recipe registers ``seg_loss`` as a submodule, so ``recipe.train()``
and ``recipe.eval()`` switch the noise on and off, and the BLV offsets (a buffer) are saved and
resumed with the recipe. The temporal sigma schedule (supplement Sec. 3) needs the iteration:
the trainer calls ``seg_loss.set_iteration(iteration)`` before each step (a no-op for CE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BLVConfig, LossConfig
from ..errors import ConfigError, DataError
from .run_cache import atomic_write_text, file_fingerprint, reuse_or_make

if TYPE_CHECKING:
    from ..config import RunConfig


class SegLoss(Protocol):
    """``seg_loss(logits [N,C,h,w], labels [N,H,W], weight=None) -> scalar``; ``set_iteration(i)`` before iteration ``i``."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor: ...

    def set_iteration(self, iteration: int) -> None: ...


COUNTS_FILE = "blv_class_counts.json"
"""Where :func:`blv_class_counts` caches the counts in the run directory (:mod:`segadapt.engine.run_cache`)."""


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of stride-level logits ``[N, C, h, w]`` to the label size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class CrossEntropySegLoss(nn.Module):
    """Cross-entropy of logits at any stride (upsampled to the labels) against train-id labels.

    Call ``loss(logits, labels, weight=None)``:

    - without ``weight``: the mean over non-ignored pixels (``F.cross_entropy``); a batch whose
      labels are all ignored gives a zero that stays connected to the graph (DDP needs every
      parameter in the graph, and the mean would be NaN);
    - with a per-pixel ``weight`` ``[N, H, W]``: ``mean(weight * ce)`` over **all** pixels, ignored
      ones counting 0, as DACS weights its mixed pseudo-label loss by the teacher's confidence
      (``torch.mean(pixelWiseWeight * CE)`` in the DACS code).
    """

    def __init__(self, ignore_index: int) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def set_iteration(self, iteration: int) -> None:
        """The iteration about to be trained; cross-entropy does not depend on it."""

    def perturb(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the cross-entropy sees; unchanged here, BLV's variation in :class:`BLVSegLoss`."""
        return logits

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        height, width = labels.shape[-2:]
        logits = upsample_logits(logits, (height, width)).float()
        if self.training:
            logits = self.perturb(logits)
        if weight is not None:
            if weight.shape != labels.shape:
                raise ValueError(f"pixel weights {tuple(weight.shape)} must have the labels' shape {tuple(labels.shape)}")
            pixelwise = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none")
            return (weight.float() * pixelwise).mean()
        if not (labels != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index)


class BLVSegLoss(CrossEntropySegLoss):
    """Cross-entropy on BLV-perturbed logits in training, plain cross-entropy in eval (BLV, CVPR 2023).

    The variation is :func:`segadapt.methods.blv.blv_logits`: ``|clamp(N(0, sigma^2), -1, 1)| * f_c``
    added to every logit after upsampling to the labels (supplement Alg. 1 with the authors' fixed
    offsets ``f_c = (log N - log n_c) / max_j(...)``, :func:`~segadapt.methods.blv.blv_offsets`).
    The noise is drawn from the global torch RNG, which the trainer saves and restores, so a
    resumed run draws the same noise as an uninterrupted one.

    Args:
        class_counts: pixel counts ``n_c`` per class.
        sigma: the noise standard deviation (``sigma_0`` of the temporal schedule).
        ignore_index: label value excluded from the loss.
        t_mid, total_iters: the temporal schedule (supplement Sec. 3,
            :func:`~segadapt.methods.blv.sigma_schedule`); ``t_mid=None`` keeps ``sigma`` constant.
    """

    offsets: torch.Tensor  # a registered buffer, declared for type checkers

    def __init__(
        self,
        class_counts: Any,
        sigma: float,
        ignore_index: int,
        t_mid: int | None = None,
        total_iters: int | None = None,
    ) -> None:
        from ..methods.blv import blv_offsets

        super().__init__(ignore_index)
        if sigma < 0:
            raise ValueError(f"BLV sigma must be >= 0, got {sigma}")
        if t_mid is not None and (total_iters is None or not 0 <= t_mid <= total_iters):
            raise ConfigError(
                f"loss.blv.t_mid={t_mid} must lie in [0, train.iters={total_iters}]: the temporal sigma peaks at t_mid "
                "and returns to 0 at the last iteration"
            )
        self.sigma0 = float(sigma)
        self.sigma = float(sigma) if t_mid is None else 0.0
        self.t_mid = t_mid
        self.total_iters = total_iters
        self.register_buffer("offsets", blv_offsets(class_counts))

    def set_iteration(self, iteration: int) -> None:
        """Follow the temporal schedule: sigma(iteration) (a constant schedule ignores it)."""
        from ..methods.blv import sigma_schedule

        if self.t_mid is not None:
            assert self.total_iters is not None
            self.sigma = sigma_schedule(iteration, self.total_iters, self.sigma0, self.t_mid)

    def perturb(self, logits: torch.Tensor) -> torch.Tensor:
        from ..methods.blv import blv_logits

        if logits.shape[1] != self.offsets.numel():
            raise DataError(
                f"the network predicts {logits.shape[1]} classes but the BLV class counts have {self.offsets.numel()}; "
                "count the labels of the same label space (loss.blv.given_counts needs one value per class)"
            )
        return blv_logits(logits, self.offsets, self.sigma)

    def extra_repr(self) -> str:
        schedule = f"temporal t_mid={self.t_mid} of {self.total_iters}" if self.t_mid is not None else "constant"
        return f"sigma={self.sigma0}, schedule={schedule}, classes={self.offsets.numel()}"


def build_seg_loss(
    cfg: LossConfig,
    ignore_index: int,
    run: RunConfig | None = None,
    num_classes: int | None = None,
    log: Callable[[str], None] | None = None,
) -> CrossEntropySegLoss:
    """The segmentation loss of ``cfg`` (``loss.name``).

    ``ce`` needs nothing else. ``blv`` needs the run config ``run`` (where the class counts come
    from, ``train.iters`` for the temporal schedule, the run directory that caches the counts)
    and ``num_classes``; the counts are computed here, once (:func:`blv_class_counts`).
    """
    if cfg.name == "ce":
        return CrossEntropySegLoss(ignore_index)
    if run is None or num_classes is None:
        raise ConfigError("loss.name=blv needs the run config and the class count to compute the BLV class counts")
    counts = blv_class_counts(run, num_classes, log)
    blv = cfg.blv
    t_mid = blv.t_mid if blv.schedule == "temporal" else None
    return BLVSegLoss(counts, blv.sigma, ignore_index, t_mid=t_mid, total_iters=run.train.iters)


def blv_class_counts(run: RunConfig, num_classes: int, log: Callable[[str], None] | None = None) -> torch.Tensor:
    """Per-class pixel counts ``n_c`` for BLV, from ``loss.blv.class_counts`` (float64 ``[C]``).

    ``source``/``labeled`` count the labels of ``data.source``, ``pseudo`` the pseudo-label folder
    ``data.target.pseudo_labels`` (both at the label files' resolution, before augmentation, as the
    reference counts GTA5), ``given`` takes ``loss.blv.given_counts``. Counting a real dataset reads
    every label once, so the result is cached in ``RUN_DIR/blv_class_counts.json`` and reused while
    the counted data are the same (:func:`~segadapt.engine.run_cache.reuse_or_make`).

    Raises:
        ConfigError: a source that is not configured (the message names the key to set).
        DataError: counts of the wrong length, or a split without labels.
    """
    from ..methods.blv import dataset_class_counts

    blv: BLVConfig = run.loss.blv
    log = log or (lambda _: None)
    if blv.class_counts == "given":
        assert blv.given_counts is not None
        if len(blv.given_counts) != num_classes:
            raise ConfigError(
                f"loss.blv.given_counts has {len(blv.given_counts)} values but the data has {num_classes} classes; "
                "give one pixel count per class, in train-id order"
            )
        return torch.tensor(blv.given_counts, dtype=torch.float64)

    spec, key = _counted_spec(run)
    cache = run.run_dir / COUNTS_FILE

    def count() -> None:
        from .builders import build_dataset_from_spec

        dataset = build_dataset_from_spec(spec, with_labels=True)
        if not dataset.has_labels:
            raise DataError(
                f"{key} ({spec.dataset}, split {spec.split}) has no labels to count for loss.blv.class_counts="
                f"{blv.class_counts}; use a labelled split or loss.blv.class_counts=given"
            )
        if dataset.classes.num_classes != num_classes:
            raise DataError(f"{key} has {dataset.classes.num_classes} classes but the model predicts {num_classes}")
        log(f"blv: counting the pixels of each class in {len(dataset)} label maps of {key}")
        counts = dataset_class_counts(dataset).double()
        atomic_write_text(cache, json.dumps({"counts": counts.tolist()}), "BLV class counts")

    cache_key = {"loss.blv.class_counts": blv.class_counts, key: spec.model_dump(mode="json"), "num_classes": num_classes}
    if blv.class_counts == "pseudo":  # the folder's labels may be remade in place: its summary identifies them
        from .pseudo_labelling import SUMMARY

        summary = Path(spec.pseudo_labels) / SUMMARY
        cache_key["pseudo labels"] = file_fingerprint(summary, "pseudo-label summary") if summary.is_file() else None
    reuse_or_make(cache, cache_key, count, log, "blv: class counts")
    return torch.tensor(json.loads(cache.read_text())["counts"], dtype=torch.float64)


def _counted_spec(run: RunConfig) -> tuple[Any, str]:
    """The dataset spec ``loss.blv.class_counts`` counts, and its config key for messages."""
    kind = run.loss.blv.class_counts
    if kind in ("source", "labeled"):
        spec = run.data.source
        if spec is None:
            raise ConfigError(f"loss.blv.class_counts={kind} counts the labels of data.source, which is not set")
        if kind == "labeled" and (spec.subset is None or spec.subset.part != "labeled"):
            raise ConfigError(
                "loss.blv.class_counts=labeled counts the labelled part of a semi-supervised split, but data.source "
                "has no subset with part: labeled; use loss.blv.class_counts=source for domain adaptation"
            )
        return spec.model_copy(update={"pseudo_labels": None, "with_labels": True}), "data.source"
    spec = run.data.target
    if spec is None or spec.pseudo_labels is None:
        raise ConfigError(
            "loss.blv.class_counts=pseudo counts the pseudo-label folder data.target.pseudo_labels, which is not set; "
            "set data.target.pseudo_labels=DIR (segadapt pseudo-label), or use a recipe that makes them (self_training)"
        )
    return spec, "data.target.pseudo_labels"
