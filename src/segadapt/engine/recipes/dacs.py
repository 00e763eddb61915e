"""DACS: domain adaptation via cross-domain mixed sampling (Tranheden et al., WACV 2021), BLV's UDA setting.

The BLV supplement (Sec. 2) trains its UDA results "following DACS, using color jitter,
Gaussian blur, and ClassMix"; with ``loss.name=blv`` every cross-entropy below gets the balanced
logit variation (``segadapt.engine.losses.BLVSegLoss``), with ``loss.name=ce`` this is DACS. One iteration:

1. ``loss_source``: the segmentation loss on the labelled source crop.
2. The EMA teacher (momentum ``method.ema_momentum``, 0.99 as DACS, with DACS's warm-up
   ``min(1 - 1/(t+1), momentum)`` after 0-based step ``t``) predicts the target crop; its argmax is the pseudo label and
   the fraction of pixels whose confidence exceeds ``method.pseudo_threshold`` (0.968, DACS) is the
   weight of every pseudo-labelled pixel.
3. ClassMix (:func:`segadapt.data.transforms.classmix_masks`): half of the classes of source image
   ``i`` are pasted onto target image ``i``; labels and weights (1 on pasted source pixels) mix alike.
4. Colour jitter and Gaussian blur (:func:`~.common.strong_view` with DACS's strengths,
   :data:`~.common.DACS_STRONG`) on the mixed images; ``loss_mix = mean(weight * CE(student(mixed), mixed labels))``.

Choices where DACS's paper is silent, from its code: the teacher predicts the un-augmented target
crop, its logits upsampled to the crop before the softmax. Here the teacher runs in eval mode
(running BatchNorm statistics; DACS leaves it in train mode) and crop padding is never pseudo-labelled.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ...config import RunConfig
from ...data.classes import ClassInfo
from ...data.transforms import classmix_masks, mix
from ...methods.ema import ModelEMA
from ...models.base import SegmentationModel
from ..losses import upsample_logits
from .base import Recipe, Stream
from .common import DACS_STRONG, content_mask, spatial_size, strong_view


class DACSOptions(BaseModel):
    """``method.*`` of recipe ``dacs``; defaults are DACS's."""

    model_config = ConfigDict(extra="forbid")

    ema_momentum: float = Field(0.99, ge=0, lt=1, description="EMA teacher momentum (DACS: 0.99)")
    pseudo_threshold: float = Field(0.968, ge=0, le=1, description="confidence counted for the pseudo-label weight")
    mix_weight: float = Field(1.0, ge=0, description="weight of the mixed (pseudo-label) loss")
    strong_augmentation: bool = Field(True, description="colour jitter and blur on the mixed images")


class DACS(Recipe):
    """Source CE + confidence-weighted CE on ClassMix source/target images with EMA-teacher pseudo labels.

    Submodules (saved and resumed): the student ``model`` and the teacher ``teacher`` (``ModelEMA``).
    The student is evaluated, as in DACS.
    """

    name = "dacs"
    streams = {"source": Stream("source"), "target": Stream("target", labels=False)}
    Options = DACSOptions

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        self.teacher = ModelEMA(model, self.options.ema_momentum)

    def train(self, mode: bool = True) -> DACS:
        super().train(mode)
        self.teacher.eval()  # the teacher only predicts: running BatchNorm statistics, no dropout
        return self

    @torch.no_grad()
    def after_optimizer_step(self, iteration: int) -> None:
        # DACS's warm-up min(1 - 1/(i+1), m) with its 0-based step i = iteration - 1: the teacher copies
        # the student after the first step and follows it closely over the first 1/(1-m) steps
        self.teacher.momentum = min(1.0 - 1.0 / iteration, self.options.ema_momentum)
        self.teacher.update(self.model)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's hard labels ``[N, H, W]`` and DACS's pseudo-label weight (the batch's, per image ``[N]``)."""
        probs = torch.softmax(upsample_logits(self.teacher(images).logits.float(), spatial_size(images)), dim=1)
        confidence, labels = probs.max(dim=1)
        labels = labels.masked_fill(~inside, self.ignore_index)
        # DACS's code: one number for the batch, the share of its pixels above the threshold
        share = (confidence.ge(self.options.pseudo_threshold) & inside).float().mean()
        return labels, share.expand(images.shape[0])

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        self.seg_loss.set_iteration(iteration)
        source, target = batches["source"], batches["target"]
        loss_source = self.supervised_loss(self.model(source["image"]), source["label"])

        images = target["image"]
        inside = content_mask(target, spatial_size(images))
        labels, image_weight = self.pseudo_labels(images, inside)
        masks = classmix_masks(source["label"], ignore_index=self.ignore_index)
        mixed_images = mix(masks, source["image"], images)
        mixed_labels = mix(masks, source["label"], labels)
        weight = mix(masks, torch.ones_like(labels, dtype=torch.float32), image_weight.view(-1, 1, 1).expand_as(labels).float())
        if self.options.strong_augmentation:
            mixed_images = strong_view(mixed_images, DACS_STRONG)
        loss_mix = self.supervised_loss(self.model(mixed_images), mixed_labels, weight=weight)
        loss = loss_source + self.options.mix_weight * loss_mix
        return {
            "loss": loss,
            "loss_source": loss_source.detach(),
            "loss_mix": loss_mix.detach(),
            "pseudo_weight": image_weight.mean().detach(),
        }
