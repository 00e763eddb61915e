"""BiCL: bi-directional pixel-prototype contrastive learning (Lee et al., ECCV 2022; BiCL supplement).

The recipe composes :mod:`segadapt.methods.bicl`. One iteration, for a source crop (labels ``y_S``)
and a target crop, one forward of both through the network (logits and features ``f``):

=====================================================  ==================================================
paper                                                  here
=====================================================  ==================================================
source prototypes ``m_S`` (momentum 0.999)             ``source_memory.update(f_S, y_S)`` (``prototype_momentum``)
target labels ``y_T``: static / dynamic / hybrid        ``method.labels``: the offline CBST labels
(of the contrastive learning: ``L_FC``, ``L_BC``,      (``data.target.pseudo_labels``, made in
``m_T``; supplement Tab. 1)                            :meth:`BiCL.prepare`), :func:`dynamic_pseudo_labels`
                                                       with calibration and T, :func:`hybrid_pseudo_labels`
target prototypes ``m_T``                              ``target_memory.update(f_T, y_T)``
``L_FC`` (target pixels vs ``m_S``), weight 0.5        :func:`pixel_prototype_contrastive_loss`
``L_BC`` (source pixels vs ``m_T``), weight 0.5        the same, other direction
baseline (CCM [3]): ``L_seg^S + L_seg^T`` (weights 1)  :func:`baseline_losses`: ``supervised_loss`` (CE, or BLV
and ``0.4 (L_ent^S + L_ent^T)``                        with ``loss.name=blv``) and :func:`entropy_loss`; ``L_seg^T``
                                                       on the static CBST labels whatever ``method.labels``
                                                       (``method.target_ce_labels=same``: on ``y_T``)
weighted source sampling (supplement Eq. 1)            :meth:`BiCL.train_sampler`
self-distillation (supplement Eq. 2)                   :func:`segadapt.methods.bicl.self_distillation_loss`
                                                       in recipe ``bicl_distill`` (:class:`BiCLDistill`, a
                                                       separate stage, below)
=====================================================  ==================================================

Choices where the supplement is silent (docs/bicl.md lists them all): features are the model's
``features`` at its output stride, L2-normalised; labels are resized to that grid (nearest) for the
prototypes and contrastive losses and kept at crop resolution for the target CE (dynamic labels
are upsampled, nearest). Within an iteration the source memory is updated first, then the target
labels are made, then the target memory is updated, then the losses use the updated prototypes,
so every class present in the batch has a prototype from iteration 0 on. When the target split
has ground truth on disk (the benchmark, Cityscapes), the density and accuracy of the ``method.labels``
kind (the contrastive learning's labels) are logged every iteration (``label_density``, ``label_accuracy``; supplement
Tab. 1); the ground truth is read only for that measurement, never for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Sampler

from ...config import PATH, RunConfig
from ...data.classes import ClassInfo
from ...data.transforms import replay_geometric, resize
from ...errors import ConfigError, DataError
from ...methods.bicl import (
    PrototypeMemory,
    class_sampling_probabilities,
    domain_biases,
    dynamic_pseudo_labels,
    entropy_loss,
    hybrid_pseudo_labels,
    pixel_prototype_contrastive_loss,
    self_distillation_loss,
)
from ...metrics.pseudo_label_quality import pseudo_label_stats
from ...models.base import SegmentationModel, SegOutput
from ..distributed import all_gather_cat
from ..pseudo_labelling import with_pseudo_labels
from ..sampling import ClassBalancedSampler
from .base import Recipe, Stream, parse_options
from .common import (
    cache_source_class_pixels,
    content_mask,
    forward_streams,
    load_teacher,
    masked_image_consistency,
    source_class_pixels,
    spatial_size,
    view_start_size,
)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest (pixel-centre) resize of label maps ``[N, H, W]`` or ``[H, W]`` to ``size``."""
    batched = labels.dim() == 3
    maps = labels if batched else labels.unsqueeze(0)
    out = resize(maps.unsqueeze(1), size, "label").squeeze(1)
    return out if batched else out[0]


def baseline_losses(
    options: Any, supervised_loss: Callable[[SegOutput, torch.Tensor], torch.Tensor], source: SegOutput,
    source_labels: torch.Tensor, target: SegOutput, target_labels: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BiCL's baseline (CCM [3]): ``lambda_seg^S L_seg^S + lambda_seg^T L_seg^T + lambda_ent^S L_ent^S + lambda_ent^T L_ent^T``.

    ``options`` carries the four weights (recipes ``bicl`` and ``bicl_distill``); ``L_seg`` is the
    recipe's :meth:`~.base.Recipe.supervised_loss` (CE or BLV, plus an auxiliary head's term), the
    entropies are on the main logits. Returns the weighted sum and its detached terms for the log.
    """
    terms = {
        "loss_seg_source": supervised_loss(source, source_labels),
        "loss_seg_target": supervised_loss(target, target_labels),
        "loss_ent_source": entropy_loss(source.logits),
        "loss_ent_target": entropy_loss(target.logits),
    }
    total = (
        options.lambda_seg_source * terms["loss_seg_source"]
        + options.lambda_seg_target * terms["loss_seg_target"]
        + options.lambda_ent_source * terms["loss_ent_source"]
        + options.lambda_ent_target * terms["loss_ent_target"]
    )
    return total, {name: value.detach() for name, value in terms.items()}


class BiCLOptions(BaseModel):
    """``method.*`` of recipe ``bicl``; defaults are the supplement's (Sec. 1) unless noted."""

    model_config = ConfigDict(extra="forbid")
    renamed: ClassVar[dict[str, str]] = {"momentum": "prototype_momentum"}  # the former name: run directories still resume

    labels: Literal["static", "dynamic", "hybrid"] = Field(
        "hybrid", description="target labels of the contrastive learning: L_FC, L_BC and the target memory (supplement Tab. 1)"
    )
    target_ce_labels: Literal["static", "same"] = Field(
        "static",
        description="labels of the baseline's target cross-entropy: the static CBST labels (supplement: the label kinds "
        "feed the contrastive learning) or the same kind as method.labels (segadapt before 2026-12)",
    )
    lambda_fc: float = Field(0.5, ge=0, description="weight of the forward contrastive loss L_FC")
    lambda_bc: float = Field(0.5, ge=0, description="weight of the backward contrastive loss L_BC")
    prototype_momentum: float = Field(0.999, ge=0, lt=1, description="momentum lambda of the prototype memories")
    threshold: float = Field(0.7, ge=0, le=1, description="T: dynamic labels need this label-transfer probability")
    temperature: float = Field(0.1, gt=0, description="tau of the contrastive losses and label transfer (DASS code: 0.1)")
    calibration: bool = Field(True, description="subtract the class-wise domain biases before label transfer")
    hybrid_conflict: Literal["ignore", "static", "dynamic"] = Field(
        "ignore", description="hybrid labels where static and dynamic disagree (not in the paper)"
    )
    lambda_seg_source: float = Field(1.0, ge=0, description="lambda_seg^S (CCM baseline)")
    lambda_seg_target: float = Field(1.0, ge=0, description="lambda_seg^T (CCM baseline)")
    lambda_ent_source: float = Field(0.4, ge=0, description="lambda_ent^S (CCM baseline)")
    lambda_ent_target: float = Field(0.4, ge=0, description="lambda_ent^T (CCM baseline)")
    weighted_sampling: bool = Field(
        True, description="draw source images by supplement Eq. 1 (class ~ inverse image occurrence, then an image of it)"
    )


class BiCL(Recipe):
    """Bi-directional pixel-prototype contrastive adaptation (BiCL supplement), on top of the CCM-style baseline.

    Starts from a source-only network (``model.checkpoint``), which also makes the static CBST
    labels. Buffers saved and resumed: ``source_memory`` and ``target_memory`` (prototypes and which
    classes have one).
    """

    name = "bicl"
    streams = {"source": Stream("source"), "target": Stream("target")}
    Options = BiCLOptions
    masked_consistency = True

    @classmethod
    def prepare(cls, cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunConfig:
        """Static labels (``labels: static|hybrid``) and the occurrence table (``weighted_sampling``).

        Both are kept in the run directory and reused while made from the same inputs
        (:mod:`segadapt.engine.run_cache`).
        """
        options = parse_options(cls.Options, cfg.method, cls.name)
        target = cfg.data.target
        if target is None:
            raise ConfigError("recipe bicl needs data.target (the unlabelled target images)")
        if cfg.data.source is None:
            raise ConfigError("recipe bicl needs data.source (the labelled source images)")
        if options.labels == "dynamic" and options.target_ce_labels == "same":
            # dynamic labels come from the prototypes alone: the target's own labels must never reach training
            target = target.model_copy(update={"with_labels": False, "pseudo_labels": None})
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"target": target})})
        elif target.pseudo_labels is None:
            if cfg.model.checkpoint is None:
                needs = (
                    f"method.labels={options.labels}" if options.labels != "dynamic"
                    else "method.target_ce_labels=static (the baseline's cross-entropy)"
                )
                raise ConfigError(
                    f"{needs} uses static (CBST) pseudo labels made by the source-only model: set "
                    "model.checkpoint=runs/<source-only run>/checkpoints/last.pt, or give ready labels with "
                    "data.target.pseudo_labels=DIR, or use method.labels=dynamic method.target_ce_labels=same"
                )
            cfg = with_pseudo_labels(cfg, cfg.model.checkpoint, run_dir, log, shard=False)
        if options.weighted_sampling:
            cache_source_class_pixels(cfg, run_dir, log, "bicl: weighted sampling")
        return cfg

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        options = self.options
        self.source_memory = PrototypeMemory(self.num_classes, model.feature_dim, options.prototype_momentum, self.ignore_index)
        self.target_memory = PrototypeMemory(self.num_classes, model.feature_dim, options.prototype_momentum, self.ignore_index)
        self._truth, self._truth_index = self._ground_truth(cfg)
        self.mic = masked_image_consistency(cfg, model)

    @staticmethod
    def _ground_truth(cfg: RunConfig) -> tuple[Any, dict[str, int]]:
        """The target split with its own labels, for measuring label quality only; None without labels on disk."""
        from ..builders import build_dataset_from_spec

        if cfg.data.target is None:
            return None, {}
        spec = cfg.data.target.model_copy(update={"pseudo_labels": None, "with_labels": True})
        try:
            dataset = build_dataset_from_spec(spec, with_labels=True)
        except (ConfigError, DataError):
            return None, {}  # no ground truth on disk: nothing to measure
        if not dataset.has_labels:
            return None, {}
        return dataset, {name: index for index, name in enumerate(dataset.names)}

    def train_sampler(self, stream: str, dataset: Any, seed: int, start: int) -> Sampler | None:
        """The source stream's sampler under ``method.weighted_sampling`` (supplement Eq. 1); None otherwise."""
        if stream != "source" or not self.options.weighted_sampling:
            return None
        occurrence = source_class_pixels(self.cfg.run_dir, dataset) > 0  # supplement Eq. 1's occurrence table
        return ClassBalancedSampler(occurrence, class_sampling_probabilities(occurrence), seed, start)

    # ------------------------------------------------------------------ one iteration

    def target_labels(self, target: dict[str, Any], features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The target labels ``[N, H, W]`` at crop resolution: static, dynamic or hybrid (``method.labels``)."""
        options = self.options
        if options.labels == "static":
            return target["label"]
        available = self.source_memory.initialized
        biases = None
        if options.calibration:
            both = available & self.target_memory.initialized
            biases = domain_biases(self.source_memory.prototypes, self.target_memory.prototypes, both)
        dynamic, _ = dynamic_pseudo_labels(
            features, self.source_memory.prototypes, options.temperature, options.threshold, biases, available, self.ignore_index
        )
        dynamic = resize_labels(dynamic, size)
        dynamic = dynamic.masked_fill(~content_mask(target, size), self.ignore_index)
        if options.labels == "dynamic":
            return dynamic
        return hybrid_pseudo_labels(target["label"], dynamic, options.hybrid_conflict, self.ignore_index)

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        self.seg_loss.set_iteration(iteration)
        options = self.options
        source, target = batches["source"], batches["target"]
        source_output, target_output = forward_streams(self.model, source["image"], target["image"])
        source_features, target_features = source_output.features, target_output.features
        grid = spatial_size(target_features)
        size = spatial_size(target["image"])

        source_grid = resize_labels(source["label"], grid)
        # every rank's pixels update the prototypes, so the ranks keep identical memories
        self.source_memory.update(all_gather_cat(source_features.detach()), all_gather_cat(source_grid))
        labels = self.target_labels(target, target_features.detach(), size)
        target_grid = resize_labels(labels, grid)
        self.target_memory.update(all_gather_cat(target_features.detach()), all_gather_cat(target_grid))

        # the supplement ties the label kinds to the contrastive learning; the baseline's CE keeps its CBST labels
        ce_labels = target["label"] if options.target_ce_labels == "static" else labels
        base, losses = baseline_losses(options, self.supervised_loss, source_output, source["label"], target_output, ce_labels)
        loss_fc = pixel_prototype_contrastive_loss(
            target_features, target_grid, self.source_memory.prototypes, options.temperature, self.source_memory.initialized
        )
        loss_bc = pixel_prototype_contrastive_loss(
            source_features, source_grid, self.target_memory.prototypes, options.temperature, self.target_memory.initialized
        )
        losses.update(
            loss=base + options.lambda_fc * loss_fc + options.lambda_bc * loss_bc,
            loss_fc=loss_fc.detach(),
            loss_bc=loss_bc.detach(),
        )
        losses.update(self.label_quality(target, labels))
        if self.mic is not None:  # MIC against the labels of the target cross-entropy, weight 1 on labelled pixels
            self.mic.add(losses, self, target, ce_labels, None, iteration)
        return losses

    @torch.no_grad()
    def label_quality(self, target: dict[str, Any], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Density and accuracy of this batch's target labels against the ground truth, when it exists."""
        if self._truth is None:
            return {}
        truths = []
        replays = target.get("replay") or [[] for _ in target["name"]]
        for name, records in zip(target["name"], replays):
            index = self._truth_index.get(name)
            if index is None:
                return {}
            truth = torch.from_numpy(np.asarray(self._truth.load_label(index)).astype(np.int64))
            start = view_start_size(records)
            if start is not None and tuple(truth.shape) != tuple(start):
                truth = resize_labels(truth, start)
            truths.append(replay_geometric(records, truth, "label") if records else truth)
        truth = torch.stack(truths).to(labels.device)
        if truth.shape != labels.shape:
            raise DataError(
                f"target ground truth {tuple(truth.shape)} does not match the crop {tuple(labels.shape)}; "
                "the target split's labels and images differ in size"
            )
        stats = pseudo_label_stats(labels, truth, self.num_classes, self.ignore_index)
        if np.isnan(stats.density):  # no pixel with ground truth in this batch
            return {}
        out = {"label_density": torch.tensor(stats.density)}
        if not np.isnan(stats.accuracy):
            out["label_accuracy"] = torch.tensor(stats.accuracy)
        return out


# ---------------------------------------------------------------------- self-distillation stage


class BiCLDistillOptions(BaseModel):
    """``method.*`` of recipe ``bicl_distill``; the baseline weights are recipe ``bicl``'s (CCM)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(None, description="checkpoint of the final BiCL model to distil", json_schema_extra=PATH)
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(q_t || q_s) (supplement Eq. 2: 1)")
    lambda_seg_source: float = Field(1.0, ge=0, description="lambda_seg^S of L_base")
    lambda_seg_target: float = Field(1.0, ge=0, description="lambda_seg^T of L_base (on the teacher's CBST labels)")
    lambda_ent_source: float = Field(0.4, ge=0, description="lambda_ent^S of L_base")
    lambda_ent_target: float = Field(0.4, ge=0, description="lambda_ent^T of L_base")


class BiCLDistill(Recipe):
    """BiCL's self-distillation stage (BiCL supplement Eq. 2): ``L_KD = L_base + KL(q_t || q_s)``.

    "We train the model using the method of [1] (SimCLR), and use it as an initial model for the
    student. We then apply a knowledge distillation, transferring the knowledge of our final model
    to the student." Per iteration, on a source crop and a target crop::

        L_base = lambda_seg^S CE(s(x_S), y_S) + lambda_seg^T CE(s(x_T), y_T)
                 + lambda_ent^S H(s(x_S)) + lambda_ent^T H(s(x_T))          (baseline_losses, as recipe bicl)
        L_KD   = L_base + kl_weight * KL(q_t(x_T) || q_s(x_T))

    The teacher is ``method.teacher``, loaded frozen (:class:`~.common.FrozenNetwork`, kept out of
    checkpoints); the student is what ``model`` builds (``model.pretrained``: the supplement's SimCLR
    backbone). Where the supplement is silent: ``L_base`` keeps the BiCL baseline's terms and weights
    (1, 1, 0.4, 0.4) without the contrastive losses (the student has no prototypes); its target
    labels ``y_T`` are the *teacher's* static CBST labels (``pseudo_label`` rule, made before training
    into ``RUN_DIR/pseudo_labels`` as recipe ``bicl`` makes its static labels, or given with
    ``data.target.pseudo_labels``); the KL is on the target crop the student sees, summed over
    classes and averaged over pixels (:func:`~segadapt.methods.bicl.self_distillation_loss`), with
    the crop's padding left out. ``loss.name: blv`` replaces both cross-entropies.
    """

    name = "bicl_distill"
    streams = {"source": Stream("source"), "target": Stream("target")}
    Options = BiCLDistillOptions
    collective_prepare = True  # under torchrun the processes share the pseudo-labelling

    @classmethod
    def prepare(cls, cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunConfig:
        """The teacher's CBST labels of the target split, unless ``data.target.pseudo_labels`` gives them."""
        options = parse_options(cls.Options, cfg.method, cls.name)
        if cfg.data.source is None or cfg.data.target is None:
            raise ConfigError("recipe bicl_distill needs data.source and data.target (the student is trained on both)")
        if cfg.data.target.pseudo_labels is not None:
            return cfg
        if options.teacher is None:
            raise ConfigError(f"recipe {cls.name} distils an adapted model: set method.teacher=runs/<bicl run>/checkpoints/last.pt")
        return with_pseudo_labels(cfg, options.teacher, run_dir, log)

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        self.teacher = load_teacher(self, cfg, "runs/<bicl run>/checkpoints/last.pt")

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        options = self.options
        source, target = batches["source"], batches["target"]
        source_output, target_output = forward_streams(self.model, source["image"], target["image"])
        base, losses = baseline_losses(options, self.supervised_loss, source_output, source["label"], target_output, target["label"])
        grid = spatial_size(target_output.logits)
        teacher = self.teacher.logits(target["image"], grid)
        total, kl = self_distillation_loss(target_output.logits, teacher, base, valid=content_mask(target, grid), kl_weight=options.kl_weight)
        losses.update(loss=total, loss_kd=kl.detach())
        return losses
