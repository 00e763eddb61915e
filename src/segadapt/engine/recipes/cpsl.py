"""CPSL stage 1: class-balanced pixel-level self-labeling (Li et al., CVPR 2022; CPSL Alg. 1).

The recipe composes :mod:`segadapt.methods.cpsl`; it re-implements none of it. One iteration:

==========================================  ===============================================================
Algorithm 1 / equation                      here
==========================================  ===============================================================
l.1 soft pseudo labels ``P_ST``             ``softmax`` of a frozen copy of the warm-up network on the
                                            weak target view (online, see below)
l.2, Eq. 7 prototype init of f_SL, f'_SL    :meth:`CPSL.prepare` (one pass of the warm-up over the target)
Eq. 10 initial class distribution ``r``     :meth:`CPSL.prepare` (the warm-up's predicted class histogram)
l.5-6, Eq. 3 source loss                    cross-entropy on the source crop (``loss_source``)
l.17 ``P_SL``                               ``f'_SL`` (EMA head) on ``f'_SEG`` (EMA network) features of the
                                            weak view (by default from the whole frame, as the authors)
l.18, Eq. 1 rectified labels (tau)          :func:`rectify_pseudo_labels`
l.19, Eq. 2 target loss                     cross-entropy of the student on the weak view, as the authors' code
                                            (``loss_target``; ``method.target_view``; their CutMix and symmetric CE:
                                            ``method.cutmix_p``, ``method.target_loss``)
Eq. 8-9 class-balanced sampling (M)         :func:`sample_pixels` on the rectified labels (``method.pixel_sampling=
                                            class_balanced``; the default is the authors' uniform sampling)
l.8-14, Eq. 4-6, 12 self-labeling loss      :func:`online_self_labeling_loss` over ``[bank; batch]`` with
                                            Sinkhorn marginal ``r`` (``loss_sl``), then the bank is updated
Eq. 11 distribution alignment               :meth:`ClassDistribution.update` with the rectified labels
                                            (``method.distribution=momentum``; the authors' ``fixed`` by default)
Eq. 13 consistency                          :func:`symmetric_kl_consistency` of EMA(weak) and student(strong),
                                            per-pixel KL / K as the authors' code (``method.consistency_reduction``)
Eq. 14 total                                ``loss_source +`` :func:`cpsl_total_loss`
l.16, l.20 momentum updates (0.999)         :meth:`CPSL.after_optimizer_step`
==========================================  ===============================================================

The defaults are the authors' stage-1 step since 2026-12-07 (:class:`CPSLOptions`); config
``<benchmark>/cpsl_paper`` is the paper's reading. Choices where the paper is silent (docs/cpsl.md lists them all):

- ``P_ST`` is computed online by a frozen copy of the warm-up network on the weak view, instead of
  being stored offline as ProDA/CPSL do (``generate_pseudo_label.py --soft``). Both are the fixed
  warm-up's prediction of the same pixels; the online one sees the crop rather than the whole image
  (less context) but needs no disk and is aligned with the view by construction. The copy is a
  :class:`~.common.FrozenNetwork`, not saved in checkpoints: it is rebuilt from ``model.checkpoint``
  on every start.
- The momentum network and head predict, with dropout off, on the whole un-augmented frame by default
  (``method.teacher_view=full_frame``, the authors'): its features are moved into the crop (``full2weak``)
  for rectification and the consistency, and L_SL's pixels are sampled from the whole frame
  (:meth:`CPSL._full_frame_teacher`); ``method.teacher_view=weak`` runs it on the weak view. Their BatchNorm follows
  ``method.momentum_batch_norm``: ``as_student`` (default) uses batch statistics wherever the student
  does, like the authors' train-mode teacher; ``running`` uses the running statistics copied from
  the student (eval mode). See docs/reference_code.md, "CPSL: momentum network and views".
- Algorithm 1 updates ``f_SL`` and ``f'_SL`` before rectifying (l.14-18); here everything is one
  optimiser step, so ``P_SL`` comes from the momentum head of the previous iteration.
- Labels, sampling and losses live on the network's output grid (stride 4 for ``small``, 8 for
  DeepLab-V2); pixels outside the image (crop padding) are ignored.
- The strong view is, by default, the authors' ``RandAugmentMC`` (``method.strong_view=randaugment``,
  :class:`~segadapt.data.transforms.RandAugmentMC`), its recorded geometry replayed on the teacher's output
  and its cut-out box masked (the authors' ``label_strong_T``); ``method.strong_view=photometric`` keeps
  only its colour jitter (0.4, p = 0.5) and Gaussian blur (sigma 1, p = 0.5) (:data:`~.common.CPSL_STRONG`),
  so no geometry is replayed between views. ``L^t_SEG`` trains on
  the weak view and the strong view gets its own forward for the consistency, as the authors' code
  (``method.target_view``).
- ``r`` starts from the warm-up's argmax histogram over the target (Eq. 10) and stays there, as the
  authors' code (``method.distribution=fixed``); ``method.distribution=momentum`` follows Eq. 11 with
  ``method.distribution_momentum`` (0.999 assumed). A class the warm-up never predicts starts with ``r_k = 0``.
- L_SL is computed on the momentum network's features and trains only the self-labeling head:
  Fig. 1 puts ``f_SL`` after ``f'_SEG``, Sec. 3.2 says "the self-labeling head f_SL is updated by
  minimizing L_SL", and Algorithm 1 trains ``f_SL`` with L_SL (line 15) and ``f_SEG`` with
  ``L^t_SEG`` alone (line 19); the authors' code does the same (docs/reference_code.md, "CPSL:
  self-labeling loss"). ``method.sl_through_ema_features_only=false`` feeds the student's features
  instead, so that L_SL also trains the network (a reading of Eq. 14 as one loss over the whole model).

The authors' step (lslrh/CPSL ``CustomModel.step``) is the default, their prototype-probability
consistency included (``method.consistency=prototype``; Eq. 13's form is ``segmentation``, as in
``benchmark/cpsl_paper``), but for four bugs of their code not reproduced, each an option
(docs/reference_code.md, "CPSL"); ``tests/test_cpsl_step_parity.py`` replays it against their code with
those options set to the code's (CutMix label grid, source upsampling, contrastive bank labels,
RandAugment's translate replay).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...config import RunConfig
from ...data.classes import ClassInfo
from ...data.transforms import FULL_IMAGE_KEY, RandAugmentMC, records_after_full_frame, resize, to_augmented_view
from ...data.transforms.records import Record
from ...errors import ConfigError, DataError
from ...methods.cpsl import (
    ClassDistribution,
    ImageMeanPrototypes,
    MemoryBank,
    PrototypeAccumulator,
    SelfLabelingHead,
    bank_contrastive_loss,
    class_pixel_counts,
    cpsl_total_loss,
    cutmix,
    cutmix_box,
    gather_pixel_features,
    online_self_labeling_loss,
    output_self_labeling_loss,
    prototype_cosines,
    prototype_kl_consistency,
    rectify_pseudo_labels,
    reverse_cross_entropy,
    sample_pixels,
    shared_uniform_pixels,
    symmetric_kl_consistency,
    translate_x_by_height,
)
from ...methods.ema import ModelEMA, batch_norm_as
from ...models.base import BackboneHeadSplit, SegmentationModel, SegOutput
from ...progress import progress
from ..distributed import all_gather_cat
from ..run_cache import file_fingerprint, reuse_or_make
from .base import Recipe, Stream, parse_options
from .common import CPSL_STRONG, FrozenNetwork, content_mask, masked_image_consistency, spatial_size, strong_view

AUTHORS_PROTOTYPE_PASSES = 4
"""Passes over the target of the authors' ``calc_prototype.py`` (``opt.epochs = 4``), for ``method.prototype_init=image_means``."""

INIT_FILE = "cpsl_init.pt"
"""What :meth:`CPSL.prepare` writes into the run directory: Eq. 7 prototypes and Eq. 10 class counts."""


class CPSLOptions(BaseModel):
    """``method.*`` of recipe ``cpsl``; the defaults are the authors' stage-1 step (since 2026-12-07).

    The published tables came from the authors' released code and its README command (``--ema --proto_rectify
    --rce --proto_consistW 5 --SL_lambda 0.1``, the rest ``parser_train.py``'s defaults), so every option
    where that code departs from the paper defaults to the code's behaviour: the consistency scale (KL / K),
    the weak view for ``L^t_SEG`` with CutMix and the symmetric cross-entropy, the contrastive term, the
    second self-labeling term, uniform shared pixel sampling of M = 256, one Sinkhorn problem per image, the
    full-queue rule and its scores, the image-mean prototypes, RandAugment, the full-frame teacher and the
    fixed class distribution, and the consistency's form (KL(teacher || student) of the prototype
    probabilities). The authors' evident bugs are not reproduced (``randaugment_translate_quirk``, ``contrastive_bank_labels``,
    ``cutmix_label_sampling``, ``source_align_corners`` keep the correct behaviour). The paper's reading where it
    differs is config ``<benchmark>/cpsl_paper``, which names every such option.
    """

    model_config = ConfigDict(extra="forbid")
    renamed: ClassVar[dict[str, str]] = {"momentum": "ema_momentum"}  # the former name: run directories still resume

    lambda1: float = Field(0.1, ge=0, description="weight of the self-labeling loss L_SL (Eq. 14)")
    lambda2: float = Field(5.0, ge=0, description="weight of the consistency loss L_REG (Eq. 14)")
    consistency: Literal["segmentation", "prototype"] = Field(
        "prototype",
        description="L_REG: symmetric KL of the two views' segmentation probabilities (Eq. 13, paper) or KL(teacher || "
        "student) of their prototype probabilities softmax(cos(z, c'_SL) / tau) (the authors' code; needs self_labeling)",
    )
    consistency_reduction: Literal["class_mean", "pixel_mean"] = Field(
        "class_mean",
        description="how L_REG averages its per-pixel KL: also divided by the class count K (the authors' code: a masked "
        "sum over N x K x h x w divided by the mask's sum, so their lambda2 = 5 acts on KL / K) or the per-pixel mean "
        "(a reading of Eq. 13; the default before 2026-12-07, K times stronger at the same lambda2)",
    )
    tau: float = Field(0.08, gt=0, description="temperature of P_SL in Eq. 1 and of p in Eq. 4")
    epsilon: float = Field(0.05, gt=0, description="Sinkhorn temperature (Eq. 6)")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations (authors' code: 3)")
    pixels_per_image: int = Field(256, ge=1, description="M of Eq. 9, pixels per image for L_SL (default: the authors' fbs 256; the paper's 512)")
    queue_size: int = Field(65536, ge=1, description="memory bank length in pixel features")
    ema_momentum: float = Field(0.999, ge=0, lt=1, description="EMA momentum of f'_SEG and f'_SL")
    distribution: Literal["momentum", "fixed"] = Field(
        "fixed",
        description="r stays the warm-up histogram (default: the authors', who never update it) or follows Eq. 11 (the paper)",
    )
    distribution_momentum: float = Field(0.999, ge=0, le=1, description="alpha of Eq. 11 (the paper gives none)")
    self_labeling: bool = Field(True, description="false = 'w/o SL': no head, no L_SL, labels argmax P_ST")
    self_training: bool = Field(True, description="false = 'w/o ST': labels argmax P_SL, no warm-up soft labels")
    class_balanced: bool = Field(True, description="false = 'w/o CB' (PSL): equipartition + uniform sampling")
    init_from_prototypes: bool = Field(True, description="false = 'w/o Init': random self-labeling head")
    empty_class_prototype: Literal["random", "zero"] = Field(
        "random",
        description="head row of a class the warm-up never predicts (no Eq. 7 mean; the paper is silent): a random unit "
        "vector as without Init, or zero (before 2026-12-02: normalize(0) freezes that row)",
    )
    strong_augmentation: bool = Field(True, description="false = 'w/o Aug': the student sees the weak view")
    strong_jitter: float = Field(
        0.4, ge=0, description="colour jitter strength of the strong view (brightness, contrast, saturation, hue; p = 0.5); 0 = none"
    )
    strong_blur_sigma: float = Field(
        1.0,
        ge=0,
        description="sigma (pixels) of the strong view's Gaussian blur (authors: radius 1 on images about 2,200 pixels "
        "wide; images s times narrower copy it with 1/s); 0 = no blur",
    )
    strong_view: Literal["photometric", "randaugment"] = Field(
        "randaugment",
        description="the student's strong view of the weak crop: (default, the authors' and the paper's 'RandAugment, Cutout') "
        "RandAugmentMC(2, 10): flip, the same blur and jitter, two of FixMatch's 14 operations (shears, translations and "
        "rotation among them) and a grey cut-out box; its geometry is replayed on the teacher's output and the cut-out and "
        "brought-in pixels are left out of L_REG (needs target_view=weak); or colour jitter and blur only (strong_jitter, "
        "strong_blur_sigma; the default before 2026-12-07). strong_augmentation=false ('w/o Aug') removes either",
    )
    teacher_view: Literal["weak", "full_frame"] = Field(
        "full_frame",
        description="what the momentum network sees: the weak crop (the paper), or (default: the authors') the whole un-augmented target "
        "frame (the view after the target transforms' leading resize) in place of it, for every use of the momentum "
        "network: its features and logits moved into the weak crop (full2weak) for Eq. 1 rectification, for the "
        "consistency teacher (then through the strong view's geometry) and for class-balanced L_SL sampling, and its "
        "whole-frame map for shared_uniform L_SL sampling, as the authors sample it",
    )
    randaugment_translate_quirk: bool = Field(
        False,
        description="replay RandAugment's horizontal shifts on the teacher as the authors' code does, normalised by the "
        "height instead of the width (W / H times the image's shift; a bug of their replay); false (default) replays the "
        "image's own shift",
    )
    momentum_network: bool = Field(True, description="false = 'w/o Mom': targets from the current networks")
    momentum_batch_norm: Literal["as_student", "running"] = Field(
        "as_student",
        description="BatchNorm of the momentum network: batch statistics wherever the student uses them (authors' "
        "train-mode teacher) or its running statistics (eval mode)",
    )
    target_view: Literal["weak", "strong"] = Field(
        "weak",
        description="the student's view that L^t_SEG (Eq. 2) trains on (the paper does not say): the weak one, as the authors' "
        "code, while the strong view gets a forward of its own for the consistency alone; or the strong one, which the "
        "consistency also uses (one forward fewer; the default before 2026-12-07)",
    )
    target_loss: Literal["ce", "symmetric_ce"] = Field(
        "symmetric_ce",
        description="L^t_SEG: (default) the authors' --rce, rce_alpha * CE + rce_beta * reverse CE, or cross-entropy (Eq. 2, the paper)",
    )
    rce_alpha: float = Field(0.1, ge=0, description="weight of the cross-entropy in target_loss=symmetric_ce (authors' 0.1)")
    rce_beta: float = Field(1.0, ge=0, description="weight of the reverse cross-entropy in target_loss=symmetric_ce (authors' 1.0)")
    cutmix_p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="probability per iteration of the authors' CutMix: a source box of half the crop's area and its labels "
        "pasted into the weak target view L^t_SEG trains on (default: the authors' 0.5; the paper names CutMix without "
        "detail; 0 = off; needs target_view=weak)",
    )
    pixel_sampling: Literal["class_balanced", "shared_uniform"] = Field(
        "shared_uniform",
        description="how L_SL picks its M pixels per image: (default: the authors') one uniform permutation of the grid for "
        "the whole batch, the class balance left to the Sinkhorn marginal r; or class by class (Eq. 8-9, the paper; "
        "uniform per image with class_balanced=false)",
    )
    sinkhorn_per_image: bool = Field(
        True,
        description="one Sinkhorn problem per target image, each image queued before the next (default: Alg. 1 and the "
        "authors' code); false: one over the batch's pooled pixels (the same marginals, one call; the default before 2026-12-07)",
    )
    bank_partial: bool = Field(
        False,
        description="false (default: the authors', who wait until its last slot is written): only a full memory bank "
        "augments the batch; true: a partly filled one too (the literal [Z; M] of Alg. 1 l.10, the paper)",
    )
    bank_scores: Literal["cosine", "unnormalised_prototypes"] = Field(
        "unnormalised_prototypes",
        description="how the bank's features are scored for Sinkhorn: (default: the authors') dot products with the raw "
        "prototype vectors, or cosines to the prototypes, as the batch (one f_SL, the paper)",
    )
    prototype_init: Literal["pixel_mean", "image_means"] = Field(
        "image_means",
        description="Eq. 7 prototypes: (default) the authors' calc_prototype.py, four passes, a running mean (count capped "
        "at 3,000) of per-image means of unnormalised features over classes with >= 10 pixels in the image; or one pass, "
        "the mean of the L2-normalised features of each class's pixels (Eq. 7 as written)",
    )
    contrastive_weight: float = Field(
        0.001,
        ge=0,
        description="weight of the authors' supervised-contrastive term (default: their 0.001; not in the paper, 0 = off): "
        "the student's weak-view pixel features against the memory bank, on iterations without CutMix once the bank is full "
        "(needs self_labeling and target_view=weak)",
    )
    contrastive_bank_labels: Literal["sampled", "first_pixels"] = Field(
        "sampled",
        description="the labels stored with the bank's features for the contrastive term: (default) those of the sampled "
        "pixels, or the authors' (a bug): the labels of the image's first M pixels in raster order, which do not belong to them",
    )
    output_self_labeling: bool = Field(
        True,
        description="add the authors' second self-labeling term (default: on, as their code; not in the paper; needs "
        "self_labeling): Sinkhorn assignments from the momentum "
        "network's L2-normalised logits at the sampled pixels (with a queue of its own), the head's prediction as in Eq. 5",
    )
    source_align_corners: bool = Field(
        False,
        description="upsample the source logits to the labels with align_corners=True before the source cross-entropy "
        "(the authors' code) instead of segadapt's half-pixel bilinear rule (default: false, the rule of every recipe)",
    )
    cutmix_label_sampling: Literal["pixel_centres", "top_left"] = Field(
        "pixel_centres",
        description="how CutMix brings the labels between the output grid and the image grid: (default) nearest by pixel "
        "centres (aligned with the image) or PyTorch's legacy nearest, the top-left corner (the authors' code, half an "
        "output pixel off: a bug)",
    )
    sl_through_ema_features_only: bool = Field(
        True,
        description="L_SL on the momentum network's features, so it trains only the head (paper Fig. 1, Alg. 1 l. 15/19, "
        "and the authors' code); false: on the student's features, training the network too",
    )


def _contrastive_permutation(n: int) -> torch.Tensor:
    """A random order of ``n`` pixels (global torch RNG) for the contrastive term's sampling, as the authors' ``torch.randperm``."""
    return torch.randperm(n)


def _cutmix_coin(p: float) -> bool:
    """Whether this iteration mixes: a ``U(0, 1)`` draw from the global torch RNG below ``p`` (the authors' ``random.random() < 0.5``)."""
    return float(torch.rand(())) < p


def _check_switches(options: CPSLOptions) -> None:
    if not (options.self_labeling or options.self_training):
        raise ConfigError(
            "method.self_labeling=false and method.self_training=false leave CPSL without pseudo labels; keep at least one of them true"
        )
    if options.cutmix_p > 0 and options.target_view != "weak":
        raise ConfigError(
            f"method.cutmix_p={options.cutmix_p} pastes source boxes into the view L^t_SEG trains on, which must not be the "
            "strong view the consistency compares with the momentum network: set method.target_view=weak (the authors' code) "
            "or method.cutmix_p=0"
        )
    if options.contrastive_weight > 0 and (options.target_view != "weak" or not options.self_labeling):
        raise ConfigError(
            f"method.contrastive_weight={options.contrastive_weight} contrasts the student's weak-view features with the "
            "self-labeling memory bank: it needs method.target_view=weak and method.self_labeling=true; or set method.contrastive_weight=0"
        )
    if options.strong_view == "randaugment" and options.target_view != "weak":
        raise ConfigError(
            "method.strong_view=randaugment moves the strong view's pixels, so the weak view's pseudo labels do not fit it: "
            "set method.target_view=weak (the authors' code: L^t_SEG on the weak view) or method.strong_view=photometric"
        )
    if not options.self_labeling and options.output_self_labeling:
        raise ConfigError(
            "method.output_self_labeling=true adds a second self-labeling term, which method.self_labeling=false ('w/o SL') "
            "removes with the head and L_SL: set method.output_self_labeling=false (config benchmark/cpsl_wo_sl does)"
        )
    if options.consistency == "prototype" and not options.self_labeling:
        raise ConfigError(
            "method.consistency=prototype compares the views through the self-labeling head's prototypes, which "
            "method.self_labeling=false removes; use method.consistency=segmentation (Eq. 13) for 'w/o SL'"
        )


class _SegmentationWithHead(nn.Module, BackboneHeadSplit):
    """What the optimiser trains: the network, and the self-labeling head in the ``head`` group.

    The head group gets ``optim.head_lr_mult`` (5 in the GTA5 config: 1e-4 network, 5e-4 head, Sec. 4.1;
    the authors' code also gives the classifier 5x).
    """

    def __init__(self, model: SegmentationModel, head: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.backbone_parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.head_parameters()

    def method_head_parameters(self) -> Iterator[nn.Parameter]:
        if self.head is not None:
            yield from self.head.parameters()


@torch.no_grad()
def warmup_statistics(cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Eq. 7 prototypes and Eq. 10 class counts of ``data.target`` under the warm-up ``model.checkpoint``.

    One pass in eval mode, without augmentation, at ``pseudo_label.size`` when set (the resolution the
    warm-up would label the target at). ``Y_ST`` is the argmax of the warm-up's logits on its output grid;
    the features are L2-normalised per pixel before the class means (:class:`PrototypeAccumulator`).
    The authors' ``calc_prototype.py`` differs in details (docs/reference_code.md, "CPSL: prototypes")
    that leave the prototype directions, all the head keeps, nearly unchanged; ``method.prototype_init=
    image_means`` follows it (:class:`ImageMeanPrototypes`, four passes; the class counts of Eq. 10
    come from the first).
    """
    from ..builders import (
        build_dataset_from_spec,
        build_eval_loader,
        build_model,
        resolve_device,
    )

    assert cfg.data.target is not None and cfg.model.checkpoint is not None
    spec = cfg.data.target.model_copy(update={"pseudo_labels": None})
    dataset = build_dataset_from_spec(spec, with_labels=False)
    num_classes = dataset.classes.num_classes
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, num_classes).to(device).eval()
    loader = build_eval_loader(dataset, None, cfg.data.val_batch_size, cfg.data.num_workers)
    image_means = parse_options(CPSLOptions, cfg.method, CPSL.name).prototype_init == "image_means"
    passes = AUTHORS_PROTOTYPE_PASSES if image_means else 1
    log(f"cpsl: prototypes and class distribution of {len(dataset)} target images from {cfg.model.checkpoint}")
    accumulator: PrototypeAccumulator | ImageMeanPrototypes | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for one_pass in range(passes):
        for batch in progress(loader, desc="cpsl: warm-up statistics", unit="batch"):
            images = batch["image"] if isinstance(batch["image"], list) else list(batch["image"])
            for image in images:  # one at a time: the target images may differ in size
                image = image[None].to(device)
                if cfg.pseudo_label.size is not None:
                    image = resize(image, cfg.pseudo_label.size, "image")
                output = model(image)
                hard = output.logits.argmax(dim=1)
                if accumulator is None:
                    dim = output.features.shape[1]
                    accumulator = ImageMeanPrototypes(num_classes, dim) if image_means else PrototypeAccumulator(num_classes, dim)
                accumulator.update(output.features.float(), hard)
                if one_pass == 0:
                    counts += class_pixel_counts(hard, num_classes).cpu()
    if accumulator is None:
        raise DataError(f"data.target ({spec.dataset}, split {spec.split}) has no images to compute the CPSL prototypes from")
    unseen = [dataset.classes.names[k] for k in range(num_classes) if counts[k] == 0]
    if unseen:
        log(
            f"cpsl: the warm-up predicts no pixel of {', '.join(unseen)}: they have no Eq. 7 prototype "
            "(method.empty_class_prototype) and r starts at 0 for them"
        )
    return {"prototypes": accumulator.compute(), "class_counts": counts, "num_images": len(dataset)}


def warmup_statistics_key(cfg: RunConfig) -> dict[str, Any]:
    """What :func:`warmup_statistics` depends on: the warm-up's content, the network built, the target and its size,
    and ``method.prototype_init`` when it is not ``pixel_mean`` (so files made before the option still match)."""
    assert cfg.data.target is not None and cfg.model.checkpoint is not None
    key = {
        "model.checkpoint": file_fingerprint(cfg.model.checkpoint, "model.checkpoint"),
        "model": cfg.model.model_dump(mode="json", exclude={"checkpoint"}),
        "data.target": cfg.data.target.model_dump(mode="json", exclude={"pseudo_labels", "with_labels"}),
        "pseudo_label.size": cfg.pseudo_label.size,
    }
    prototype_init = parse_options(CPSLOptions, cfg.method, CPSL.name).prototype_init
    if prototype_init != "pixel_mean":
        key["method.prototype_init"] = prototype_init
    return key


def with_full_frame(cfg: RunConfig) -> RunConfig:
    """``cfg`` whose target transforms keep the full frame (``keep_full_frame``) after their leading resizes.

    The full frame is the target image as the transforms' deterministic ``resize`` entries leave it,
    before any random step: the authors' ``img_full`` (the frame resized to 2048 x 1024, which
    ``gta5_to_cityscapes/cpsl``'s first entry also gives). The target stream takes ``data.target_transforms``,
    or a copy of ``data.train_transforms`` when that is unset (the source stream keeps its own).
    """
    spec = [dict(entry) for entry in (cfg.data.target_transforms if cfg.data.target_transforms is not None else cfg.data.train_transforms or [])]
    if any(entry.get("name") == "keep_full_frame" for entry in spec):
        return cfg
    place = 0
    while place < len(spec) and spec[place].get("name") == "resize":
        place += 1
    spec.insert(place, {"name": "keep_full_frame"})
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"target_transforms": spec})})


class CPSL(Recipe):
    """Class-balanced pixel-level self-labeling, stage 1 of CPSL (CPSL Alg. 1, Eq. 1-14).

    Starts from the warm-up network ``model.checkpoint`` (source-only or ``adversarial_warmup``).
    Submodules and buffers, all saved and resumed: the student ``model``, the momentum network
    ``ema_model`` (``f'_SEG``), the self-labeling head ``head`` (``f_SL``) and its momentum copy
    ``ema_head`` (``f'_SL``), the memory bank ``bank`` and the class distribution ``class_distribution``
    (``r``). The ablation switches of Tab. 3/5 are ``method.*`` booleans (:class:`CPSLOptions`).
    """

    name = "cpsl"
    streams = {"source": Stream("source"), "target": Stream("target", labels=False)}
    Options = CPSLOptions
    masked_consistency = True

    @classmethod
    def prepare(cls, cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunConfig:
        """Eq. 7 prototypes and Eq. 10 class counts into ``RUN_DIR/cpsl_init.pt``, reused while made from the same inputs."""
        from ..checkpoint import atomic_save

        options = parse_options(cls.Options, cfg.method, cls.name)
        _check_switches(options)
        if cfg.data.target is None:
            raise ConfigError("recipe cpsl needs data.target (the unlabelled target images to self-label)")
        if cfg.model.checkpoint is None:
            raise ConfigError(
                "recipe cpsl starts from the warm-up network, whose predictions give the soft pseudo labels, "
                "prototypes and class distribution: set model.checkpoint=runs/<warm-up run>/checkpoints/last.pt "
                "(segadapt train benchmark/source_only, or .../adversarial_warmup as in the paper)"
            )
        path = run_dir / INIT_FILE
        reuse_or_make(path, warmup_statistics_key(cfg), lambda: atomic_save(warmup_statistics(cfg, log), path), log, "cpsl: warm-up statistics")
        if options.teacher_view == "full_frame":
            cfg = with_full_frame(cfg)
        return cfg

    _trainable: _SegmentationWithHead  # set with object.__setattr__ in __init__ (not a submodule), declared for type checkers
    bank_labels: torch.Tensor  # a buffer with method.contrastive_weight > 0

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        num_classes = self.num_classes
        options = self.options
        _check_switches(options)
        path = cfg.run_dir / INIT_FILE
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: recipe cpsl runs through the Trainer, whose prepare step writes it")
        init = torch.load(path, map_location="cpu", weights_only=True)
        prototypes, counts = init["prototypes"], init["class_counts"]
        if prototypes.shape[0] != num_classes:
            raise DataError(f"{path} holds {prototypes.shape[0]} class prototypes but the data has {num_classes} classes; delete it to recompute")
        # the fixed warm-up (P_ST), rebuilt from model.checkpoint on every start instead of filling
        # every checkpoint with a fourth copy of the network
        self._warmup = FrozenNetwork(copy.deepcopy(model)) if options.self_training else None
        blur, jitter = options.strong_blur_sigma, options.strong_jitter
        self.strong_view_augmentation = dataclasses.replace(
            CPSL_STRONG,
            jitter=jitter,
            jitter_p=CPSL_STRONG.jitter_p if jitter > 0 else 0.0,
            blur_sigma=(blur, blur),
            blur_p=CPSL_STRONG.blur_p if blur > 0 else 0.0,
        )
        self.randaugment = RandAugmentMC(2, 10, jitter=jitter, blur_sigma=blur, ignore_index=self.ignore_index)
        self.ema_model = ModelEMA(model, options.ema_momentum) if options.momentum_network else None
        self.head: SelfLabelingHead | None = None
        self.ema_head: ModelEMA | None = None
        if options.self_labeling:
            self.head = SelfLabelingHead(num_classes, prototypes.shape[1])
            if options.init_from_prototypes:
                self.head.init_from_prototypes(prototypes, empty=options.empty_class_prototype)
            if options.momentum_network:
                self.ema_head = ModelEMA(self.head, options.ema_momentum)
            self.bank = MemoryBank(prototypes.shape[1], options.queue_size, use_partial=options.bank_partial)
            if options.output_self_labeling:  # the authors' queue_out: normalised momentum logits
                self.bank_out = MemoryBank(num_classes, options.queue_size, use_partial=options.bank_partial)
            if options.contrastive_weight > 0:  # the authors' queue_label: a label per bank row
                self.register_buffer("bank_labels", torch.full((options.queue_size,), self.ignore_index, dtype=torch.long))
            self.class_distribution = ClassDistribution(counts, options.distribution_momentum, options.distribution)
        # a plain attribute, so the network and head are not saved a second time under another name
        object.__setattr__(self, "_trainable", _SegmentationWithHead(model, self.head))
        self.mic = masked_image_consistency(cfg, model)

    # ------------------------------------------------------------------ engine hooks

    def trainable_model(self) -> nn.Module:
        return self._trainable

    def train(self, mode: bool = True) -> CPSL:
        super().train(mode)
        # the momentum networks only predict targets: eval mode (no dropout); BatchNorm statistics
        # follow method.momentum_batch_norm in _momentum_outputs
        for module in (self.ema_model, self.ema_head):
            if module is not None:
                module.eval()
        return self

    @torch.no_grad()
    def after_optimizer_step(self, iteration: int) -> None:
        """Momentum updates of ``f'_SEG`` and ``f'_SL`` (Alg. 1 l.16, l.20)."""
        if self.ema_model is not None:
            self.ema_model.update(self.model)
        if self.ema_head is not None and self.head is not None:
            self.ema_head.update(self.head)

    # ------------------------------------------------------------------ one iteration

    @torch.no_grad()
    def _momentum_outputs(self, weak: torch.Tensor) -> SegOutput:
        """``f'_SEG`` on the weak view (or the full frames); without momentum networks ('w/o Mom'), the student itself.

        BatchNorm follows ``method.momentum_batch_norm``: ``as_student`` normalises like the student's
        training forward (batch statistics unless the student's BatchNorm is frozen), ``running`` uses
        the running statistics (eval mode).
        """
        as_student = self.options.momentum_batch_norm == "as_student"
        if self.ema_model is not None:
            if as_student:
                with batch_norm_as(self.ema_model.module, self.model):
                    return self.ema_model(weak)
            return self.ema_model(weak)
        if as_student:
            with batch_norm_as(self.model, self.model):
                return self.model(weak)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(weak)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _warmup_probabilities(self, weak: torch.Tensor) -> torch.Tensor:
        """``P_ST``: the fixed warm-up network's softmax on the weak view (Eq. 1)."""
        assert self._warmup is not None
        return torch.softmax(self._warmup.logits(weak), dim=1)

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        options = self.options
        source, target = batches["source"], batches["target"]
        source_output = self.model(source["image"])
        if options.source_align_corners:  # the authors' upsampling of the source logits
            size = tuple(source["label"].shape[-2:])
            source_output = source_output._replace(
                logits=F.interpolate(source_output.logits, size=size, mode="bilinear", align_corners=True),
                aux_logits=None
                if source_output.aux_logits is None
                else F.interpolate(source_output.aux_logits, size=size, mode="bilinear", align_corners=True),
            )
        loss_source = self.backward_now(self.supervised_loss(source_output, source["label"]))

        weak = target["image"]
        teacher = self._momentum_outputs(weak) if options.teacher_view == "weak" else None
        strong, strong_records = self._strong_view(weak)
        student = self.model(strong)
        grid = spatial_size(student.logits)
        frames = None
        if teacher is None:  # the full frames' teacher, moved onto the student's grid
            teacher, frames = self._full_frame_teacher(target, grid)
        inside = content_mask(target, grid)

        if options.self_training:
            soft = self._warmup_probabilities(weak) * inside.unsqueeze(1)
        else:  # 'w/o ST': a flat P_ST leaves the argmax to P_SL alone
            soft = inside.unsqueeze(1).float().expand(-1, self.num_classes, -1, -1)
        losses: dict[str, torch.Tensor] = {}
        momentum_scores = None  # the momentum head's cosines of the weak view: Eq. 1, and the prototype consistency
        if self.head is not None:
            with torch.no_grad():
                momentum_scores = self._momentum_head()(teacher.features)
                labels = rectify_pseudo_labels(soft, momentum_scores, options.tau, self.ignore_index)  # Eq. 1
            loss_sl = self._self_labeling_loss(labels, teacher, student.features, frames)
            if options.self_training:
                changed = (labels != soft.argmax(dim=1)) & inside
                losses["rectified_fraction"] = changed.sum() / inside.sum().clamp_min(1)
        else:  # 'w/o SL': plain self-training on the warm-up's soft labels
            labels = soft.argmax(dim=1).masked_fill(~inside, self.ignore_index)
            loss_sl = student.logits.new_zeros(())
        if options.target_view == "strong":
            loss_target = self._target_loss(student, labels)  # Eq. 2
        else:  # the authors' code: L^t_SEG on the weak view (with CutMix), the strong view for the consistency alone
            view, view_labels = weak, labels
            if options.cutmix_p > 0:
                mixed = _cutmix_coin(options.cutmix_p)
                losses["cutmix"] = torch.tensor(float(mixed))
                if mixed:
                    box = cutmix_box(*spatial_size(weak))
                    view, view_labels = cutmix(weak, source["image"], labels, source["label"], box, options.cutmix_label_sampling)
            weak_output = self.model(view)
            loss_target = self._target_loss(weak_output, view_labels)
            if options.contrastive_weight > 0 and self.head is not None and not losses.get("cutmix", 0) and self.bank.is_full:
                losses["loss_contrast"] = self._contrastive_loss(weak_output.features, labels)
        loss_reg = self._consistency_loss(*self._consistency_teacher(target, teacher, momentum_scores, strong_records, inside), student)
        loss = loss_source + cpsl_total_loss(loss_target, loss_sl, loss_reg, options.lambda1, options.lambda2)  # Eq. 14
        if "loss_contrast" in losses:  # the authors' extra term
            loss = loss + options.contrastive_weight * losses["loss_contrast"]
            losses["loss_contrast"] = losses["loss_contrast"].detach()
        losses.update(
            loss=loss,
            loss_source=loss_source.detach(),
            loss_target=loss_target.detach(),
            loss_sl=loss_sl.detach(),
            loss_reg=loss_reg.detach(),
        )
        if self.mic is not None:  # MIC on the weak view, with the (rectified) labels of the weak view and no weight
            self.mic.add(losses, self, target, labels, None, iteration)
        return losses

    def _target_loss(self, output: SegOutput, labels: torch.Tensor) -> torch.Tensor:
        """``L^t_SEG``: cross-entropy (Eq. 2), or the authors' symmetric form ``alpha CE + beta RCE`` (``--rce``).

        Both parts follow the supervised-loss rule: an auxiliary head's logits get ``model.aux_weight``
        times the same terms.
        """
        cross_entropy = self.supervised_loss(output, labels)
        if self.options.target_loss == "ce":
            return cross_entropy
        reverse = reverse_cross_entropy(output.logits, labels, self.ignore_index)
        if output.aux_logits is not None:
            reverse = reverse + self.model.aux_weight * reverse_cross_entropy(output.aux_logits, labels, self.ignore_index)
        return self.options.rce_alpha * cross_entropy + self.options.rce_beta * reverse

    def _momentum_head(self) -> SelfLabelingHead:
        """The head whose prototypes label the weak view: the EMA copy, or the head itself for 'w/o Mom'."""
        head = self.ema_head.module if self.ema_head is not None else self.head
        assert isinstance(head, SelfLabelingHead)
        return head

    def _strong_view(self, weak: torch.Tensor) -> tuple[torch.Tensor, list[list[Record]] | None]:
        """The student's strong view of ``weak`` and, for ``method.strong_view=randaugment``, each image's records.

        None: the view has the weak view's geometry (photometric, or 'w/o Aug'). The draws come from the
        global torch RNG, as the other random choices of the step.
        """
        options = self.options
        if not options.strong_augmentation:
            return weak, None
        if options.strong_view == "photometric":
            return strong_view(weak, self.strong_view_augmentation), None
        views = [self.randaugment({"image": image, "replay": []}) for image in weak]
        records = [view["replay"] for view in views]
        if options.randaugment_translate_quirk:
            records = [translate_x_by_height(r) for r in records]
        return torch.stack([view["image"] for view in views]), records

    @torch.no_grad()
    def _full_frame_teacher(self, target: dict[str, Any], grid: tuple[int, int]) -> tuple[SegOutput, SegOutput | None]:
        """The momentum network's output in the weak view on ``grid`` from the full frames, and its output on them (or None).

        ``method.teacher_view=full_frame`` (the authors' code): ``f'_SEG`` on the kept full frames (their
        ``img_full``) in place of the weak view, its logits and features moved into the weak view
        by the records after the :class:`~segadapt.data.transforms.FullFrameRecord` (their ``full2weak``, which
        moves the features before the cosines to the prototypes are taken); the whole-frame output is returned
        too, for the ``shared_uniform`` L_SL sampling of the whole frame. Frames of different sizes go through
        the network one by one and have no whole-frame batch (None).

        Shape:
            weak-view logits ``[N, K, *grid]`` and features ``[N, D, *grid]``; whole frames at the network's stride.
        """
        if FULL_IMAGE_KEY not in target:
            raise DataError(
                "method.teacher_view=full_frame needs the target stream's full frames "
                "(transform keep_full_frame, which the recipe's preparation adds to the target transforms)"
            )
        full, device = target[FULL_IMAGE_KEY], target["image"].device
        records = [records_after_full_frame(r) for r in target["replay"]]
        frames: SegOutput | None = None
        if isinstance(full, torch.Tensor):
            frames = self._momentum_outputs(full.to(device))
            parts = [(frames, records)]
        else:  # frames of different sizes: one forward each
            parts = [(self._momentum_outputs(image[None].to(device)), [r]) for image, r in zip(full, records)]
        logits = torch.cat([to_augmented_view(r, out.logits.float(), "soft", output_size=grid) for out, r in parts])
        features = torch.cat([to_augmented_view(r, out.features.float(), "soft", output_size=grid) for out, r in parts])
        return SegOutput(logits, features), frames

    @torch.no_grad()
    def _consistency_teacher(
        self,
        target: dict[str, Any],
        teacher: SegOutput,
        momentum_scores: torch.Tensor | None,
        strong_records: list[list[Record]] | None,
        inside: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The teacher's logits and prototype cosines for ``L_REG`` in the strong view's geometry, and where they hold.

        The weak-view teacher (``teacher`` and ``momentum_scores``: the weak view's, or :meth:`_full_frame_teacher`) replayed
        through the strong view's records (the authors' ``label_strong_T``). The mask is False in crop
        padding, in what the strong geometry brought in from outside and in the cut-out box.

        Shape:
            logits ``[N, K, h, w]``, cosines ``[N, K, h, w]`` or None, mask ``[N, h, w]`` on the student's grid.
        """
        if strong_records is None:
            return teacher.logits, momentum_scores, inside
        grid = spatial_size(inside)
        logits = to_augmented_view(strong_records, teacher.logits.float(), "soft", output_size=grid)
        scores = None if momentum_scores is None else to_augmented_view(strong_records, momentum_scores.float(), "soft", output_size=grid)
        weak_records = target.get("replay") or [[] for _ in strong_records]
        mask = content_mask({"image": target["image"], "replay": [w + s for w, s in zip(weak_records, strong_records)]}, grid)
        return logits, scores, mask

    def _consistency_loss(
        self, teacher_logits: torch.Tensor, momentum_scores: torch.Tensor | None, inside: torch.Tensor, student: SegOutput
    ) -> torch.Tensor:
        """``L_REG``: Eq. 13 on the segmentation probabilities, or the authors' prototype form on ``momentum_scores``.

        ``teacher_logits``, ``momentum_scores`` and ``inside`` are in the student's view
        (:meth:`_consistency_teacher`).
        """
        reduction = self.options.consistency_reduction
        if self.options.consistency == "segmentation":
            return symmetric_kl_consistency(teacher_logits, student.logits, inside, reduction)  # Eq. 13
        assert momentum_scores is not None  # consistency=prototype requires self_labeling (_check_switches)
        # the momentum prototypes are a fixed target here: the gradient reaches the student's features only
        strong_scores = prototype_cosines(student.features, self._momentum_head().prototypes.detach())
        return prototype_kl_consistency(momentum_scores, strong_scores, self.options.tau, inside, reduction)

    def _contrastive_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The authors' contrastive term: per image, ``M`` random pixels of the student's weak features against the bank."""
        terms = []
        for image_features, image_labels in zip(features, labels):
            pixels = F.normalize(image_features.flatten(1).t().float(), dim=1)
            order = _contrastive_permutation(pixels.shape[0])[: self.options.pixels_per_image].to(pixels.device)
            terms.append(bank_contrastive_loss(pixels[order], image_labels.flatten()[order], self.bank.features, self.bank_labels, self.options.tau))
        return torch.stack(terms).mean()

    def _self_labeling_loss(
        self, labels: torch.Tensor, teacher: SegOutput, student_features: torch.Tensor, frames: SegOutput | None = None
    ) -> torch.Tensor:
        """Eq. 8-9 sampling, Eq. 4-6/12 loss over ``[bank; batch]``, then the bank and Eq. 11 updates.

        With ``method.output_self_labeling`` the authors' second term on the momentum logits is added.
        The pixels come from the weak view's momentum map ``teacher``; with ``method.teacher_view=full_frame``
        and ``shared_uniform`` sampling of the momentum features, from the whole frames' map ``frames``, as the
        authors sample it (their ``feat_SL``, ``out_SL``). The labels stored for the contrastive term are then
        the authors' ``threshold_SL``: the weak view's labels stretched onto the frame's grid (nearest), which
        do not belong to the frame's pixels.
        """
        options = self.options
        assert self.head is not None
        source = teacher
        if options.teacher_view == "full_frame" and options.pixel_sampling == "shared_uniform" and options.sl_through_ema_features_only:
            if frames is None:
                raise DataError(
                    "method.teacher_view=full_frame with method.pixel_sampling=shared_uniform samples L_SL's pixels from the "
                    "whole frames, which must share one size; resize the target frames to one size or use class_balanced"
                )
            source = frames
        grid = spatial_size(source.features)
        pixels_on_grid = grid[0] * grid[1]
        if options.pixels_per_image > pixels_on_grid:
            raise ConfigError(
                f"method.pixels_per_image={options.pixels_per_image} exceeds the {pixels_on_grid} pixels of the network's "
                f"{grid} output grid for these crops; lower it or use larger crops"
            )
        if options.pixel_sampling == "shared_uniform":
            indices = shared_uniform_pixels(labels.shape[0], pixels_on_grid, options.pixels_per_image).to(labels.device)
        else:
            indices = sample_pixels(
                labels, options.pixels_per_image, self.num_classes, class_balanced=options.class_balanced, ignore_index=self.ignore_index
            )
        features = source.features if options.sl_through_ema_features_only else student_features
        pixels = gather_pixel_features(features, indices).float()  # [N, M, D]
        marginal = self.class_distribution.distribution if options.class_balanced else None  # None: equipartition
        solve = (marginal, options.tau, options.epsilon, options.sinkhorn_iterations)
        logits = gather_pixel_features(source.logits.detach(), indices).float() if options.output_self_labeling else None  # [N, M, K]
        # the labels on the sampled grid: the authors' threshold_SL (legacy nearest) when it is the whole frame's
        grid_labels = labels if source is teacher else F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long()
        # one Sinkhorn problem per image, each image's pixels queued before the next image's problem (Alg. 1, the
        # authors' code), or one over the batch's pooled pixels; the bank is updated after the loss either way, so a
        # batch is never its own context; every rank's pixels, so ranks keep one bank
        groups: list[int | slice] = list(range(pixels.shape[0])) if options.sinkhorn_per_image else [slice(None)]
        terms = []
        for group in groups:
            group_pixels = pixels[group].reshape(-1, pixels.shape[-1])
            term = online_self_labeling_loss(self.head, group_pixels, self.bank, *solve, bank_scores=options.bank_scores)
            if logits is not None:
                group_logits = logits[group].reshape(-1, logits.shape[-1])
                term = term + output_self_labeling_loss(self.head, group_pixels, group_logits, self.bank_out, *solve)
                self.bank_out.enqueue(all_gather_cat(group_logits))
            if options.contrastive_weight > 0:  # the labels go into the rows the features are about to take
                flat = grid_labels.flatten(1)
                stored = flat[:, : indices.shape[1]] if options.contrastive_bank_labels == "first_pixels" else flat.gather(1, indices)
                stored = all_gather_cat(stored[group].reshape(-1))[-self.bank.capacity :]  # as MemoryBank.enqueue
                slots = (int(self.bank.pointer) + torch.arange(stored.shape[0], device=stored.device)) % self.bank.capacity
                self.bank_labels[slots] = stored
            self.bank.enqueue(all_gather_cat(group_pixels.detach()))
            terms.append(term)
        loss = torch.stack(terms).mean()
        self.class_distribution.update(all_gather_cat(class_pixel_counts(labels, self.num_classes, self.ignore_index)[None]).sum(0))
        return loss
