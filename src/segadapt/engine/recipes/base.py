"""What a recipe is: the per-iteration losses of a training method on top of the shared engine."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, create_model
from torch import nn
from torch.utils.data import Sampler

from ...config import RunConfig, validate
from ...data.classes import ClassInfo
from ..losses import SegLoss


class NoOptions(BaseModel):
    """A recipe without options of its own: any key under ``method`` is an error."""

    model_config = ConfigDict(extra="forbid")


def parse_options(options_class: type[BaseModel], method: dict[str, Any], recipe: str) -> Any:
    """Validate ``cfg.method`` against a recipe's options; errors name ``method.<key>`` and the closest key."""
    wrapper = create_model(f"{options_class.__name__}Section", __config__=ConfigDict(extra="forbid"), method=(options_class, ...))
    return validate({"method": method}, wrapper, source=f"recipe {recipe}").method


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
    Options: ClassVar[type[BaseModel]] = NoOptions
    """The schema of ``cfg.method`` for this recipe (docs/recipes.md lists each recipe's keys)."""
    collective_prepare: ClassVar[bool] = False
    """True: under torchrun every process runs :meth:`prepare` at once and shares its work (pseudo
    labels); False: rank 0 prepares alone and the others then reuse what it wrote."""

    def __init__(self, cfg: RunConfig, model: nn.Module, seg_loss: SegLoss, classes: ClassInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.seg_loss = seg_loss
        self.classes = classes
        self.num_classes = classes.num_classes
        self.ignore_index = classes.ignore_index
        """The label value of unlabelled pixels: the dataset's, never a constant (a folder dataset may use any of K..255)."""
        self.options = parse_options(self.Options, cfg.method, self.name)

    @classmethod
    def prepare(cls, cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunConfig:
        """Work before the data is built (e.g. generating pseudo labels); returns the config to run.

        Called on every start, resumed ones too, so it must reuse work already done in ``run_dir``.
        """
        parse_options(cls.Options, cfg.method, cls.name)
        return cfg

    @abc.abstractmethod
    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        """Losses of one iteration; ``batches[stream]`` holds collated samples on the device."""

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``seg_loss(logits, labels)``, plus the auxiliary head's loss of the last training forward.

        PSPNet-50 keeps its layer-3 head's logits in ``model.aux_logits`` during training; its
        loss counts ``model.aux_weight`` (0.4, DARS/semseg) times the same segmentation loss.
        ``labels`` must cover the whole batch of that forward.
        """
        loss = self.seg_loss(logits, labels)
        aux_logits = getattr(self.model, "aux_logits", None)
        if aux_logits is not None and aux_logits.shape[0] == labels.shape[0]:
            loss = loss + self.model.aux_weight * self.seg_loss(aux_logits, labels)
        return loss

    def train_sampler(self, stream: str, dataset: Any, seed: int, start: int) -> Sampler | None:
        """A sampler for ``stream`` instead of the default shuffled stream (e.g. BiCL's weighted source sampling).

        It must be a pure function of ``seed`` and ``start`` (the samples already consumed) so
        that a resumed run draws the same samples; None keeps the default.
        """
        return None

    def after_optimizer_step(self, iteration: int) -> None:
        """Hook for EMA updates and queue maintenance after each optimiser step."""

    def eval_model(self) -> nn.Module:
        """The network evaluated and saved as the run's result."""
        return self.model

    def trainable_model(self) -> nn.Module:
        return self.model
