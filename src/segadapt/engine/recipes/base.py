"""What a recipe is: the per-iteration losses of a training method on top of the shared engine."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...config import RunConfig
from ..losses import SegLoss


@dataclass(frozen=True)
class Stream:
    """A training data stream a recipe consumes: which ``data.<spec>`` it reads, and whether labels are used."""

    spec: str
    labels: bool = True
    transforms: str = "train_transforms"


class Recipe(nn.Module, abc.ABC):
    """Base class of training recipes (DAFormer's ``uda/`` idea: one readable class per method).

    The trainer owns the loop, optimiser, schedule, AMP, checkpoints and evaluation; a
    recipe only turns a dict of batches into a dict of losses (``"loss"`` is the total that
    is back-propagated; the others are logged). Everything a recipe registers as a module,
    parameter or buffer (EMA networks, memory banks, prototypes) is saved and resumed with it,
    and extra state goes through ``extra_state``.
    """

    name: ClassVar[str]
    streams: ClassVar[dict[str, Stream]]

    def __init__(self, cfg: RunConfig, model: nn.Module, seg_loss: SegLoss, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.seg_loss = seg_loss
        self.num_classes = num_classes

    @abc.abstractmethod
    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        """Losses of one iteration; ``batches[stream]`` holds collated samples on the device."""

    def after_optimizer_step(self, iteration: int) -> None:
        """Hook for EMA updates and queue maintenance after each optimiser step."""

    def eval_model(self) -> nn.Module:
        """The network evaluated and saved as the run's result."""
        return self.model

    def trainable_model(self) -> nn.Module:
        return self.model
