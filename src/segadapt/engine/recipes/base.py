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
from ...errors import ConfigError
from ...methods.hrda import hrda_loss
from ...models.base import SegmentationModel, SegOutput
from ..losses import SegLoss


class NoOptions(BaseModel):
    """A recipe without options of its own: any key under ``method`` is an error."""

    model_config = ConfigDict(extra="forbid")


def parse_options(options_class: type[BaseModel], method: dict[str, Any], recipe: str) -> Any:
    """Validate ``cfg.method`` against a recipe's options; errors name ``method.<key>`` and the closest key.

    An options class may list former key names in ``renamed`` (``{old: new}``): an old key is read
    as the new one, so run directories saved before a rename still resume.
    """
    for old, new in getattr(options_class, "renamed", {}).items():
        if old in method:
            if new in method:
                raise ConfigError(f"recipe {recipe}: method.{old} is the former name of method.{new}; give only method.{new}")
            method = {(new if key == old else key): value for key, value in method.items()}
    wrapper = create_model(f"{options_class.__name__}Section", __config__=ConfigDict(extra="forbid"), method=(options_class, ...))
    return validate({"method": method}, wrapper, source=f"recipe {recipe}").method


@dataclass(frozen=True)
class Stream:
    """A training data stream a recipe consumes: which ``data.<spec>`` it reads, and whether labels are used."""

    spec: str
    labels: bool = True
    transforms: str = "train_transforms"
    ground_truth: bool | None = None
    """The labels must be the dataset's own (checked before any work); None: for a labelled ``source``
    stream (a target stream's labels may be pseudo labels the recipe's preparation makes)."""

    @property
    def needs_ground_truth(self) -> bool:
        return self.labels and (self.spec == "source" if self.ground_truth is None else self.ground_truth)


class Recipe(nn.Module, abc.ABC):
    """Base class of training recipes (DAFormer's ``uda/`` idea: one readable class per method).

    The trainer owns the loop, optimiser, schedule, AMP, checkpoints and evaluation; a
    recipe only turns a dict of batches into a dict of losses (``"loss"`` is the total that
    is back-propagated; the others are logged). Everything a recipe registers as a module,
    parameter or buffer (EMA networks, memory banks, prototypes) is saved and resumed with it;
    other state (an optimiser of its own) goes through ``get_extra_state``/``set_extra_state``.
    Recipes import this module and :mod:`.common` (the shared pieces), never each other.
    """

    name: ClassVar[str]
    streams: ClassVar[dict[str, Stream]]
    Options: ClassVar[type[BaseModel]] = NoOptions
    """The schema of ``cfg.method`` for this recipe (docs/recipes.md lists each recipe's keys)."""
    masked_consistency: ClassVar[bool] = False
    """True: the recipe has target pseudo labels and adds MIC's masked-target term under ``mic.enabled``
    (:class:`~.common.MaskedImageConsistency`); other recipes refuse ``mic.enabled``."""
    collective_prepare: ClassVar[bool] = False
    """True: under torchrun every process runs :meth:`prepare` at once and shares its work (pseudo
    labels); False: rank 0 prepares alone and the others then reuse what it wrote."""

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: SegLoss, classes: ClassInfo) -> None:
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

    @classmethod
    def check_classes(cls, options: Any, classes: ClassInfo) -> None:
        """Check the options tied to the label space (class names, say) against the data's classes.

        The trainer calls it with the parsed ``method`` options before the run directory exists; a
        recipe with such options raises a ConfigError naming the key. Nothing to check by default.
        """

    @abc.abstractmethod
    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        """Losses of one iteration; ``batches[stream]`` holds collated samples on the device."""

    backward_hook: Callable[[torch.Tensor], None] | None = None
    """Set by the trainer during a step (``train.stream_backward``): back-propagates one finished term."""

    def backward_now(self, loss: torch.Tensor) -> torch.Tensor:
        """Back-propagate a finished term of this step's loss at once; returns it detached, for the total's log.

        A two-stream recipe calls it on its source terms before it builds the target graph, so the
        source graph (its activations) is freed first and the step's peak memory is that of one
        stream (DAFormer back-propagates its source loss early the same way). The gradients are those
        of back-propagating the sum once: the trainer scales this term exactly as the total (the AMP
        scaler, ``train.grad_accum``). Outside the trainer's step, or with ``train.stream_backward:
        false``, the term is returned unchanged and goes back with the total.
        """
        if self.backward_hook is None or not loss.requires_grad:
            return loss
        self.backward_hook(loss)
        return loss.detach()

    def supervised_loss(self, output: SegOutput, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of the trained network's output against labels (ground truth, pseudo or mixed labels).

        The one rule every recipe applies to each such term: ``seg_loss(output.logits, labels)``
        plus, when the network has an auxiliary head (``output.aux_logits`` is set in training:
        PSPNet-50's layer-3 head), ``model.aux_weight`` (0.4, DARS/semseg) times the same loss on
        ``output.aux_logits``. ``weight`` (per pixel, ``[N, H, W]``) weights both alike. Terms that
        are not a segmentation loss against labels (consistency, distillation KL, contrastive,
        entropy) act on ``output.logits`` alone. A multi-resolution network's training output
        (HRDA: ``output.detail`` set) gets HRDA's Eq. 6 instead,
        ``(1 - lambda_d) L(fused logits) + lambda_d L(detail logits, labels in the detail crop)``
        (:func:`segadapt.methods.hrda.hrda_loss`), so every recipe trains an HRDA network alike.
        """
        if output.detail is not None:  # a multi-resolution network (HRDA): its fused and detail terms, Eq. 6
            return hrda_loss(self._output_loss, output.logits, output.detail, labels, weight)
        loss = self._output_loss(output.logits, labels, weight)
        if output.aux_logits is not None:
            loss = loss + self.model.aux_weight * self._output_loss(output.aux_logits, labels, weight)
        return loss

    def _output_loss(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """``seg_loss`` of one output, with the per-pixel weight when there is one."""
        return self.seg_loss(logits, labels) if weight is None else self.seg_loss(logits, labels, weight=weight)

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
