"""Output-space adversarial warm-up (AdaptSegNet, Tsai et al., CVPR 2018), the warm-up of CPSL (CPSL Sec. 4.1).

CPSL "warms up the segmentation model by applying adversarial training like [39]" (AdaptSegNet);
the authors' ProDA/CPSL code does it with ``step_adv``: a fully-convolutional discriminator on the
softmax outputs, the least-squares GAN loss (``--gan LS``), adversarial weight 0.01 and Adam 1e-4 with
betas (0.9, 0.99) for the discriminator (docs/reference_code.md, "CPSL: warm-up").

Per iteration (``step_adv``): the segmentation network gets source cross-entropy plus
``adversarial_weight * GAN(D(softmax(target logits)), source label)``, i.e. it learns to make target
outputs look like source outputs; then the discriminator learns ``GAN(D(softmax(source)), source) / 2 +
GAN(D(softmax(target)), target) / 2`` on the same, detached, outputs. Labels: source 0, target 1.

How this fits the engine, whose optimiser only steps :meth:`trainable_model` (the network):

- the discriminator's parameters stop requiring gradients while the generator term is built, so the
  trainer's backward never writes into them;
- the discriminator loss is built in :meth:`training_step` on detached outputs (its value is logged as
  ``loss_disc``) and back-propagated and stepped in :meth:`after_optimizer_step`, after the network's step,
  as the reference does. Its parameters are untouched in between, so the loss is exact;
- the discriminator optimiser is part of the recipe's state (``get_extra_state``): checkpoints save it
  and resume restores it; its learning rate follows the run's ``schedule`` (poly in every config), computed from the
  iteration, as AdaptSegNet's ``adjust_learning_rate_D``.

Assumed where the references differ or are silent: the discriminator sees the softmax of the logits
upsampled to the input crop, as AdaptSegNet (ProDA feeds the stride-8 map; five stride-2 layers need
crops of at least 32 pixels a side, which the small network's stride-4 map of a benchmark crop is
not); with gradient accumulation the discriminator loss is the mean over the accumulated micro-batches.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...config import RunConfig
from ...data.classes import ClassInfo
from ...errors import DataError
from ...models.base import SegmentationModel
from ..losses import upsample_logits
from ..schedule import lr_factor
from .base import Recipe, Stream

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0


class AdversarialOptions(BaseModel):
    """``method.*`` of recipe ``adversarial_warmup``; defaults are the ProDA/CPSL warm-up command's."""

    model_config = ConfigDict(extra="forbid")

    adversarial_weight: float = Field(0.01, ge=0, description="weight of the generator's adversarial loss (--adv)")
    gan: Literal["ls", "bce"] = Field("ls", description="least-squares GAN (ProDA/CPSL) or AdaptSegNet's BCE")
    disc_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the discriminator")
    disc_betas: tuple[float, float] = Field((0.9, 0.99), description="Adam betas of the discriminator")
    disc_channels: int = Field(64, ge=1, description="width of the first discriminator layer (ndf)")


class FCDiscriminator(nn.Module):
    """AdaptSegNet's fully-convolutional discriminator: five 4x4 stride-2 convolutions, leaky ReLU 0.2.

    Channels ``C -> ndf -> 2 ndf -> 4 ndf -> 8 ndf -> 1``; the output is a logit map at 1/32 of the input.

    Shape:
        - input: ``[N, C, h, w]`` class probabilities; output: ``[N, 1, h', w']`` with ``h' = ceil-ish(h / 32)``

    Examples:
        >>> FCDiscriminator(19)(torch.rand(2, 19, 64, 64)).shape
        torch.Size([2, 1, 2, 2])
    """

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        widths = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=4, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        if min(probabilities.shape[-2:]) < 32:
            raise DataError(
                f"the discriminator's five stride-2 layers need maps of at least 32x32, got {tuple(probabilities.shape[-2:])}; "
                "use larger crops (data.train_transforms / data.target_transforms)"
            )
        x = probabilities
        for conv in self.convs:
            x = F.leaky_relu(conv(x), negative_slope=0.2)
        return self.classifier(x)


def gan_loss(logits: torch.Tensor, label: float, kind: str) -> torch.Tensor:
    """LS-GAN ``mean((D - label)^2)`` (ProDA's ``MSELoss``) or BCE-with-logits towards ``label``."""
    target = torch.full_like(logits, label)
    if kind == "ls":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class AdversarialWarmup(Recipe):
    """Source cross-entropy + output-space adversarial alignment of the target (AdaptSegNet; CPSL's warm-up).

    Submodules saved with the run: the network ``model`` and the discriminator ``discriminator``; the
    discriminator's Adam state travels in the recipe's extra state.
    """

    name = "adversarial_warmup"
    streams = {"source": Stream("source"), "target": Stream("target", labels=False)}
    Options = AdversarialOptions

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        options = self.options
        self.discriminator = FCDiscriminator(self.num_classes, options.disc_channels)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=options.disc_lr, betas=options.disc_betas)
        self._pending: list[torch.Tensor] = []  # discriminator losses of the micro-batches of this step

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        options = self.options
        source, target = batches["source"], batches["target"]
        source_output = self.model(source["image"])
        loss_source = self.backward_now(self.supervised_loss(source_output, source["label"]))  # frees the source graph
        source_logits = upsample_logits(source_output.logits.detach(), tuple(source["image"].shape[-2:]))
        target_logits = upsample_logits(self.model(target["image"]).logits, tuple(target["image"].shape[-2:]))

        self.discriminator.requires_grad_(False)  # the generator term must not train the discriminator
        try:
            fooled = self.discriminator(torch.softmax(target_logits.float(), dim=1))
            loss_adv = gan_loss(fooled.float(), SOURCE_LABEL, options.gan)
        finally:
            self.discriminator.requires_grad_(True)

        with torch.autocast(source_logits.device.type, enabled=False):
            on_source = self.discriminator(torch.softmax(source_logits.float(), dim=1))
            on_target = self.discriminator(torch.softmax(target_logits.detach().float(), dim=1))
            loss_disc = 0.5 * gan_loss(on_source, SOURCE_LABEL, options.gan) + 0.5 * gan_loss(on_target, TARGET_LABEL, options.gan)
        self._pending.append(loss_disc)
        return {
            "loss": loss_source + options.adversarial_weight * loss_adv,
            "loss_source": loss_source.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_disc": loss_disc.detach(),
        }

    def after_optimizer_step(self, iteration: int) -> None:
        """The discriminator's step on this iteration's detached outputs (after the network's, as ``step_adv``)."""
        if not self._pending:
            return
        # the network's schedule at the step just taken (number iteration - 1), as adjust_learning_rate_D
        factor = lr_factor(iteration - 1, self.cfg.train.iters, self.cfg.schedule)
        for group in self.disc_optimizer.param_groups:
            group["lr"] = self.options.disc_lr * factor
        self.disc_optimizer.zero_grad(set_to_none=True)
        torch.stack(self._pending).mean().backward()
        self._pending.clear()
        self.disc_optimizer.step()

    def get_extra_state(self) -> dict[str, Any]:
        return {"disc_optimizer": self.disc_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
