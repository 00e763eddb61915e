"""Distillation stages: an adapted model (the teacher) into a fresh student.

Two recipes, one per paper: ``cpsl_distill`` (CPSL+distill, paper 001 Sec. 4.2; ProDA stage 2/3)
and ``bicl_distill`` (BiCL's self-distillation, paper 003 supplement Eq. 2). Both load the teacher
frozen from ``method.teacher``, keep it out of checkpoints, and train the network ``model`` builds
(the student, from ``model.pretrained``: the papers use a self-supervised SimCLR backbone).

CPSL+distill
------------

"After the training converges, we also conduct two more knowledge distillation rounds to transfer the
knowledge to a student model pre-trained in a self-supervised manner" (Sec. 4.2, following ProDA).
Each round is one run of this recipe: the teacher is the previous stage's model (``method.teacher``,
a checkpoint loaded frozen, in eval mode, with :func:`~segadapt.engine.loading.load_trained_model`),
the student is what ``model`` builds (``model.pretrained``: ImageNet or a converted SimCLRv2 backbone
as the authors use; or ``model.checkpoint``; stage 3 is the same recipe with stage 2 as the teacher).

Loss per iteration (``step_distillation``, REFERENCE_NOTES 1.4)::

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

from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...config import PATH, RunConfig
from ...data.classes import ClassInfo
from ...data.transforms import strong_augment
from ...errors import ConfigError
from ...methods.bicl import self_distillation_loss
from ...methods.cpsl import distillation_loss
from ..losses import upsample_logits
from .base import Recipe, Stream, parse_options
from .bicl import baseline_losses
from .cpsl import STRONG_BLUR_P, STRONG_BLUR_SIGMA, STRONG_JITTER, STRONG_JITTER_P, _padding_free


def attach_teacher(recipe: Recipe, cfg: RunConfig, hint: str) -> None:
    """Load ``method.teacher`` frozen, in eval mode, as ``recipe.teacher`` (not a submodule).

    Not a submodule: the frozen teacher is reloaded from ``method.teacher`` on every start, stays
    in eval mode when the trainer switches the recipe to train mode, and is kept out of checkpoints.
    """
    from ..loading import load_trained_model

    path = recipe.options.teacher
    if path is None:
        raise ConfigError(f"recipe {recipe.name} distils an adapted model: set method.teacher={hint}")
    teacher, classes = load_trained_model(path, cfg)
    if classes is not None and classes.num_classes != recipe.num_classes:
        raise ConfigError(f"method.teacher {path} predicts {classes.num_classes} classes but the data has {recipe.num_classes}")
    object.__setattr__(recipe, "teacher", teacher.eval().requires_grad_(False))


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's logits on ``grid`` (the student's output grid; the two networks may differ in stride)."""
    parameter = next(teacher.parameters(), None)
    if parameter is not None and parameter.device != images.device:
        teacher.to(images.device)
    return upsample_logits(teacher(images).logits.float(), grid)


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

    def __init__(self, cfg: RunConfig, model: nn.Module, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        attach_teacher(self, cfg, "runs/<cpsl run>/checkpoints/last.pt (stage 3: the stage-2 distillation run's checkpoint)")

    def _teacher_logits(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return teacher_logits(self.teacher, images, grid)

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        options = self.options
        source, target = batches["source"], batches["target"]
        loss_source = self.seg_loss(self.model(source["image"]).logits, source["label"])

        weak = target["image"]
        view = weak
        if options.strong_augmentation:
            view, _ = strong_augment(weak, jitter_strength=STRONG_JITTER, jitter_p=STRONG_JITTER_P,
                                     blur_sigma=STRONG_BLUR_SIGMA, blur_p=STRONG_BLUR_P)
        student_logits = self.model(view).logits
        grid = tuple(student_logits.shape[-2:])
        weak_teacher = self._teacher_logits(weak, grid)
        view_teacher = self._teacher_logits(view, grid) if options.strong_augmentation else weak_teacher
        confidence, labels = torch.softmax(weak_teacher, dim=1).max(dim=1)
        inside = _padding_free(target.get("replay", []), weak.shape[0], grid, weak.device)
        labels = labels.masked_fill(~inside, self.ignore_index)
        parts = distillation_loss(
            student_logits, view_teacher, labels, confidence, options.confidence_threshold, options.kl_weight, self.ignore_index
        )
        return {
            "loss": options.source_weight * loss_source + parts.total,
            "loss_source": loss_source.detach(),
            "loss_target": parts.cross_entropy.detach(),
            "loss_kd": parts.kl_divergence.detach(),
            "label_density": ((labels != self.ignore_index) & (confidence > options.confidence_threshold)).float().mean(),
        }


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
    """BiCL's self-distillation stage (paper 003, supplement Eq. 2): ``L_KD = L_base + KL(q_t || q_s)``.

    "We train the model using the method of [1] (SimCLR), and use it as an initial model for the
    student. We then apply a knowledge distillation, transferring the knowledge of our final model
    to the student." Per iteration, on a source crop and a target crop::

        L_base = lambda_seg^S CE(s(x_S), y_S) + lambda_seg^T CE(s(x_T), y_T)
                 + lambda_ent^S H(s(x_S)) + lambda_ent^T H(s(x_T))          (recipe bicl's baseline)
        L_KD   = L_base + kl_weight * KL(q_t(x_T) || q_s(x_T))

    Where the supplement is silent: ``L_base`` keeps the BiCL baseline's terms and weights (1, 1,
    0.4, 0.4) without the contrastive losses (the student has no prototypes); its target labels
    ``y_T`` are the *teacher's* static CBST labels (``pseudo_label`` rule, made once before training
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
        from .self_training import with_generated_labels

        options = parse_options(cls.Options, cfg.method, cls.name)
        if cfg.data.source is None or cfg.data.target is None:
            raise ConfigError("recipe bicl_distill needs data.source and data.target (the student is trained on both)")
        if cfg.data.target.pseudo_labels is not None:
            return cfg
        if options.teacher is None:
            raise ConfigError(f"recipe {cls.name} distils an adapted model: set method.teacher=runs/<bicl run>/checkpoints/last.pt")
        return with_generated_labels(cfg, options.teacher, run_dir, log)

    def __init__(self, cfg: RunConfig, model: nn.Module, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        attach_teacher(self, cfg, "runs/<bicl run>/checkpoints/last.pt")

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        options = self.options
        source, target = batches["source"], batches["target"]
        batch = len(source["image"])
        logits = self.model(torch.cat([source["image"], target["image"]])).logits
        source_logits, target_logits = logits.split([batch, len(target["image"])])
        base, losses = baseline_losses(options, self.seg_loss, source_logits, source["label"], target_logits, target["label"])
        grid = tuple(target_logits.shape[-2:])
        teacher = teacher_logits(self.teacher, target["image"], grid)
        inside = _padding_free(target.get("replay", []), len(target["image"]), grid, target_logits.device)
        total, kl = self_distillation_loss(target_logits, teacher, base, valid=inside, kl_weight=options.kl_weight)
        losses.update(loss=total, loss_kd=kl.detach())
        return losses
