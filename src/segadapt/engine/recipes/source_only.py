"""Supervised baselines: source-only (the warm-up of every method) and the target oracle."""

from __future__ import annotations

from typing import Any

import torch

from .base import Recipe, Stream


class SourceOnly(Recipe):
    """Cross-entropy on labelled source crops; evaluated on the target (the "source only" rows)."""

    name = "source_only"
    streams = {"source": Stream("source")}

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        batch = batches["source"]
        loss = self.supervised_loss(self.model(batch["image"]), batch["label"])
        return {"loss": loss, "loss_source": loss.detach()}


class Oracle(Recipe):
    """Cross-entropy on labelled *target* crops: the target-supervised upper bound."""

    name = "oracle"
    streams = {"target": Stream("target", transforms="train_transforms", ground_truth=True)}

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        batch = batches["target"]
        if "label" not in batch:
            raise ValueError("the oracle trains on target labels: set data.target.with_labels=true and give a split with labels")
        loss = self.supervised_loss(self.model(batch["image"]), batch["label"])
        return {"loss": loss, "loss_target": loss.detach()}
