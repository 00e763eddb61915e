"""CPSL+distill: an adapted model (the teacher) distilled into a fresh student (CPSL Sec. 4.2; ProDA stage 2/3).

Recipe ``cpsl_distill`` loads the teacher frozen from ``method.teacher`` (a :class:`~.common.FrozenNetwork`,
kept out of checkpoints) and trains the network ``model`` builds (the student, from ``model.pretrained``:
the paper uses a self-supervised SimCLR backbone). BiCL's self-distillation stage is recipe
``bicl_distill`` in :mod:`.bicl`, beside the baseline it shares with ``bicl``.

"After the training converges, we also conduct two more knowledge distillation rounds to transfer the
knowledge to a student model pre-trained in a self-supervised manner" (Sec. 4.2, following ProDA).
Each round is one run of this recipe: the teacher is the previous stage's model (``method.teacher``,
a checkpoint loaded frozen, in eval mode, with :func:`~segadapt.engine.loading.load_trained_model`),
the student is what ``model`` builds (``model.pretrained``: ImageNet or a converted SimCLRv2 backbone
as the authors use; or ``model.checkpoint``; stage 3 is the same recipe with stage 2 as the teacher).

Loss per iteration (``step_distillation``; docs/reference_code.md, "CPSL: distillation stages")::

    CE(student(source), source labels)
      + distillation_loss(student(target), teacher(target), teacher's hard labels, their confidence)

where :func:`~segadapt.methods.cpsl.distillation_loss` is the cross-entropy on the teacher's labels
whose confidence is above ``method.confidence_threshold`` (0.95) plus ``method.kl_weight`` times
``KL(teacher || student)`` with the student's *log*-softmax. The authors' code (ProDA issues #20/#43)
passes ``softmax(student)`` to ``F.kl_div``, which is not a divergence and goes negative in their logs;
that bug is not reproduced (``kl_weight = 1/C`` reproduces the scale of their ``'mean'`` reduction).

Where the paper is silent / departs from the authors' code: the teacher labels the weak target view
online (the authors store flip-averaged labels offline; both are the fixed teacher's labels of those
pixels, without flip here). With ``method.strong_augmentation`` (default, as the authors' ``--S_pseudo 1``)
the student and the KL teacher see the strong view (colour jitter and blur of the weak view, so the
labels need no replay); labels, confidence and losses are on the network's output grid; crop padding
is ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ...config import PATH, RunConfig
from ...data.classes import ClassInfo
from ...methods.cpsl import distillation_loss
from ...models.base import SegmentationModel
from .base import Recipe, Stream
from .common import CPSL_STRONG, content_mask, load_teacher, strong_view


class DistillOptions(BaseModel):
    """``method.*`` of recipe ``cpsl_distill``; defaults are the authors' stage-2/3 commands."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(
        None, description="checkpoint of the adapted model to distil (CPSL stage 1, or stage 2)", json_schema_extra=PATH
    )
    confidence_threshold: float = Field(0.95, ge=0, le=1, description="teacher labels kept where confidence > this")
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) (--distillation)")
    source_weight: float = Field(1.0, ge=0, description="weight of the source cross-entropy")
    strong_augmentation: bool = Field(True, description="student and KL teacher see the strong view (--S_pseudo 1)")


class CPSLDistill(Recipe):
    """Source CE + teacher-label CE + KL(teacher || student) on the target (Sec. 4.2, "CPSL+distill")."""

    name = "cpsl_distill"
    streams = {"source": Stream("source"), "target": Stream("target", labels=False)}
    Options = DistillOptions

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        self.teacher = load_teacher(self, cfg, "runs/<cpsl run>/checkpoints/last.pt (stage 3: the stage-2 distillation run's checkpoint)")

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        options = self.options
        source, target = batches["source"], batches["target"]
        loss_source = self.supervised_loss(self.model(source["image"]), source["label"])
        weighted_source = self.backward_now(options.source_weight * loss_source)  # frees the source graph

        weak = target["image"]
        view = strong_view(weak, CPSL_STRONG) if options.strong_augmentation else weak
        student_logits = self.model(view).logits
        grid = tuple(student_logits.shape[-2:])
        weak_teacher = self.teacher.logits(weak, grid)
        view_teacher = self.teacher.logits(view, grid) if options.strong_augmentation else weak_teacher
        confidence, labels = torch.softmax(weak_teacher, dim=1).max(dim=1)
        labels = labels.masked_fill(~content_mask(target, grid), self.ignore_index)
        # ProDA's distillation loss (its own cross-entropy on the teacher's confident labels, and the KL) on
        # the main head only; the auxiliary head of a PSPNet student learns from the source term
        parts = distillation_loss(
            student_logits, view_teacher, labels, confidence, options.confidence_threshold, options.kl_weight, self.ignore_index
        )
        return {
            "loss": weighted_source + parts.total,
            "loss_source": loss_source.detach(),
            "loss_target": parts.cross_entropy.detach(),
            "loss_kd": parts.kl_divergence.detach(),
            "label_density": ((labels != self.ignore_index) & (confidence > options.confidence_threshold)).float().mean(),
        }
