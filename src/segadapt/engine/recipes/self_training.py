"""Offline self-training on pseudo labels: ST, CBST and DARS (UDA and the semi-supervised rounds).

The pseudo labels are made once, before training, by the model the run starts from
(``model.checkpoint``: the source-only warm-up in UDA, the previous round in semi-supervised
rounds), with the rule of ``pseudo_label`` (:mod:`segadapt.engine.pseudo_labelling`). Training is
then plain cross-entropy: ``CE(source labels) + target_weight * CE(target pseudo labels)``, the
DARS reference's ``CE_lab + 1.0 * CE_pseudo`` with a labelled and a pseudo-labelled batch each
(docs/reference_code.md, "DARS: training settings"), and CBST's source + target objective
(Zou et al. 2018, Eq. 3 without the class-balancing weights, which the threshold already provides).

The DARS code (``tool/train_func.py``) calls the network once on the labelled batch and once on the
pseudo-labelled one, so BatchNorm normalises each batch by its own statistics and updates its
running statistics twice per step: ``method.batch_norm: separate``, the default. ``joint`` forwards
the two batches concatenated, one BatchNorm batch of both domains (segadapt's earlier step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ...config import RunConfig
from ...data.classes import ClassInfo
from ...errors import ConfigError
from ...models.base import SegmentationModel
from ..pseudo_labelling import with_pseudo_labels
from .base import Recipe, Stream
from .common import forward_streams, masked_image_consistency


class SelfTrainingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy on target pseudo labels")
    source_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy on labelled source data")
    batch_norm: Literal["separate", "joint"] = Field(
        "separate",
        description="separate: the labelled and the pseudo-labelled batch go through the network one after the other, "
        "each normalised by its own BatchNorm statistics (the DARS code); joint: one forward of both concatenated",
    )


class SelfTraining(Recipe):
    """Cross-entropy on labelled source and pseudo-labelled target crops.

    ``data.target.pseudo_labels`` names the pseudo-label folder; when it is unset, the labels
    are generated into ``RUN_DIR/pseudo_labels`` from ``model.checkpoint`` before training, and
    reused on later starts (a resume) while the checkpoint, ``pseudo_label`` and ``data.target``
    are those that made them (:func:`~segadapt.engine.pseudo_labelling.with_pseudo_labels`).
    """

    name = "self_training"
    streams = {"source": Stream("source"), "target": Stream("target")}
    Options = SelfTrainingOptions
    masked_consistency = True
    collective_prepare = True  # under torchrun the processes share the pseudo-labelling

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        self.mic = masked_image_consistency(cfg, model)

    @classmethod
    def prepare(cls, cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunConfig:
        cfg = super().prepare(cfg, run_dir, log)
        if cfg.data.target is None:
            raise ConfigError("recipe self_training needs data.target (the unlabelled data to pseudo-label)")
        if cfg.data.target.pseudo_labels is not None:
            return cfg
        if cfg.model.checkpoint is None:
            raise ConfigError(
                "recipe self_training starts from a trained model that makes the pseudo labels: set "
                "model.checkpoint=runs/<warm-up run>/checkpoints/best.pt, or give ready labels with "
                "data.target.pseudo_labels=DIR (segadapt pseudo-label)"
            )
        return with_pseudo_labels(cfg, cfg.model.checkpoint, run_dir, log)

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        source, target = batches["source"], batches["target"]
        if self.options.batch_norm == "joint":
            source_output, target_output = forward_streams(self.model, source["image"], target["image"])
            loss_source = self.supervised_loss(source_output, source["label"])
            loss_target = self.supervised_loss(target_output, target["label"])
            loss = self.options.source_weight * loss_source + self.options.target_weight * loss_target
        else:
            loss_source = self.supervised_loss(self.model(source["image"]), source["label"])
            released = self.backward_now(self.options.source_weight * loss_source)  # the source graph is freed here
            loss_target = self.supervised_loss(self.model(target["image"]), target["label"])
            loss = released + self.options.target_weight * loss_target
        losses = {"loss": loss, "loss_source": loss_source.detach(), "loss_target": loss_target.detach()}
        if self.mic is not None:  # MIC against the offline pseudo labels of the crop, weight 1 on labelled pixels
            self.mic.add(losses, self, target, target["label"], None, iteration)
        return losses
