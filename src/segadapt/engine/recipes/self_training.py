"""Offline self-training on pseudo labels: ST, CBST and DARS (UDA and the semi-supervised rounds).

The pseudo labels are made once, before training, by the model the run starts from
(``model.checkpoint``: the source-only warm-up in UDA, the previous round in semi-supervised
rounds), with the rule of ``pseudo_label`` (:mod:`segadapt.engine.pseudo_label`). Training is
then plain cross-entropy: ``CE(source labels) + target_weight * CE(target pseudo labels)``, the
DARS reference's ``CE_lab + 1.0 * CE_pseudo`` with a labelled and a pseudo-labelled half-batch
each (REFERENCE_NOTES 3.2), and CBST's source + target objective (Zou et al. 2018, Eq. 3
without the class-balancing weights, which the threshold already provides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from ...config import RunConfig
from ...errors import ConfigError
from .base import Recipe, Stream


class SelfTrainingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy on target pseudo labels")
    source_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy on labelled source data")


class SelfTraining(Recipe):
    """Cross-entropy on labelled source and pseudo-labelled target crops.

    ``data.target.pseudo_labels`` names the pseudo-label folder; when it is unset, the labels
    are generated into ``RUN_DIR/pseudo_labels`` from ``model.checkpoint`` before training
    (reused if a complete folder is already there, e.g. on resume).
    """

    name = "self_training"
    streams = {"source": Stream("source"), "target": Stream("target")}
    Options = SelfTrainingOptions
    collective_prepare = True  # under torchrun the processes share the pseudo-labelling

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
        return with_generated_labels(cfg, cfg.model.checkpoint, run_dir, log)

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        source, target = batches["source"], batches["target"]
        images = torch.cat([source["image"], target["image"]])
        logits = self.model(images).logits
        source_logits, target_logits = logits.split([len(source["image"]), len(target["image"])])
        loss_source = self.seg_loss(source_logits, source["label"])
        loss_target = self.seg_loss(target_logits, target["label"])
        loss = self.options.source_weight * loss_source + self.options.target_weight * loss_target
        aux_logits = getattr(self.model, "aux_logits", None)
        if aux_logits is not None:  # PSPNet's auxiliary head, weighted per stream like the main loss
            aux_source, aux_target = aux_logits.split([len(source["image"]), len(target["image"])])
            loss = loss + self.model.aux_weight * (
                self.options.source_weight * self.seg_loss(aux_source, source["label"])
                + self.options.target_weight * self.seg_loss(aux_target, target["label"])
            )
        return {"loss": loss, "loss_source": loss_source.detach(), "loss_target": loss_target.detach()}


def with_generated_labels(cfg: RunConfig, checkpoint: str | Path, run_dir: Path, log: Callable[[str], None]) -> RunConfig:
    """``cfg`` training on pseudo labels of ``data.target`` made by ``checkpoint`` into ``RUN_DIR/pseudo_labels``.

    Every torchrun process calls this (the recipe's ``collective_prepare``) and labels its share.
    """
    out_dir = run_dir / "pseudo_labels"
    generate_for_run(cfg, checkpoint, out_dir, log, shard=True)
    target = cfg.data.target.model_copy(update={"pseudo_labels": str(out_dir)})
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"target": target})})


def generate_for_run(
    cfg: RunConfig, checkpoint: str | Path, out_dir: Path, log: Callable[[str], None], shard: bool = False
) -> dict[str, Any] | None:
    """Pseudo labels of ``data.target`` by ``checkpoint`` into ``out_dir``, unless a complete set is there.

    ``shard=True``: every torchrun process calls this and labels its share of the images.
    """
    import json

    from ..builders import resolve_device
    from ..loading import load_trained_model
    from ..pseudo_label import SUMMARY, dataset_to_label, generate_pseudo_labels, is_complete

    if is_complete(out_dir):
        log(f"pseudo labels: reusing {out_dir}")
        return json.loads((out_dir / SUMMARY).read_text())
    log(f"pseudo labels: {cfg.pseudo_label.rule} from {checkpoint} into {out_dir}")
    model, _ = load_trained_model(checkpoint, cfg)
    summary = generate_pseudo_labels(model, dataset_to_label(cfg, log), cfg, out_dir, resolve_device(cfg.device), log, shard=shard)
    accuracy = summary.get("accuracy")
    log(f"pseudo labels: density {summary['density']:.3f}" + (f", accuracy {accuracy:.3f}" if accuracy is not None else ""))
    return summary
