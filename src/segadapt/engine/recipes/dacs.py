"""DACS self-training (Tranheden et al., WACV 2021), BLV's UDA setting, and DAFormer's training on top of it.

Recipe ``dacs``: the BLV supplement (Sec. 2) trains its UDA results "following DACS, using color
jitter, Gaussian blur, and ClassMix"; with ``loss.name=blv`` every cross-entropy below gets the
balanced logit variation (``segadapt.engine.losses.BLVSegLoss``), with ``loss.name=ce`` this is
DACS. One iteration, by default as the DACS/DAFormer code does it (docs/daformer.md, "The authors'
step"; the ``method.*`` key named in brackets switches a point back to segadapt's earlier behaviour):

1. ``loss_source``: the segmentation loss on the labelled source crop, averaged over all of its
   pixels with the ignored ones counting 0, mmsegmentation's reduction
   (``method.source_loss_mean``).
2. The EMA teacher (momentum ``method.ema_momentum``, 0.99 as DACS) predicts the target crop with
   dropout and stochastic depth off and BatchNorm as the student's, i.e. on the target batch's own
   statistics (``method.teacher_batch_norm``); its argmax is the pseudo label and the fraction of
   pixels whose confidence exceeds ``method.pseudo_threshold`` (0.968, DACS) is the weight of every
   pseudo-labelled pixel. After ``k`` optimiser steps the teacher's momentum is
   ``min(1 - 1/(k+1), ema_momentum)`` (``method.ema_warmup``), so early on it is the plain average
   of the student's weights since the start.
3. ClassMix (:func:`segadapt.data.transforms.classmix_masks`): for each image, half of the label
   values present in the source batch (the ignore value included) are drawn and their pixels of
   source image ``i`` pasted onto target image ``i`` (``method.classmix_classes``); labels and
   weights (1 on pasted source pixels) mix alike.
4. Colour jitter and Gaussian blur (:func:`~.common.strong_view` with DACS's strengths,
   :data:`~.common.DACS_STRONG`; whether they apply is tossed once for the batch,
   ``method.augmentation_coins``; the blur kernel 10 % of the image side, ``method.blur_kernel``; kornia's
   colour maths, ``method.jitter_maths``) on the mixed images;
   ``loss_mix = mean(weight * CE(student(mixed), mixed labels))`` over all pixels.
5. With ``mic.enabled`` (MIC(DAFormer); :class:`~.common.MaskedImageConsistency`): the mixed term is
   back-propagated, then the un-mixed target crop, colour-jittered, blurred and block-masked, is
   trained against the teacher's labels and weight of step 2 (``loss_mic``), its own backward.

Recipe ``daformer`` (Hoyer et al., CVPR 2022, Sec. 3.3; docs/daformer.md) is the same loop with
DAFormer's three additions switched on (each is an option of both recipes, off in ``dacs``):
rare-class sampling of the source stream (``method.rare_class_sampling``), the thing-class ImageNet
feature distance (``method.feature_distance_weight``) and the pseudo-label crop
(``method.pseudo_ignore_top`` / ``pseudo_ignore_bottom``), with DAFormer's teacher momentum 0.999.
Its network is :class:`segadapt.models.DAFormer`; the feature distance needs a model that is an
:class:`~segadapt.models.base.EncoderDecoder`.

Choices where DACS's paper is silent, from its code: the teacher predicts the un-augmented target
crop, its logits upsampled to the crop before the softmax. Crop padding (which the authors' crops
never have) is never pseudo-labelled.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Sampler

from ...config import RunConfig
from ...data.classes import ClassInfo
from ...data.transforms import classmix_masks, mix
from ...errors import ConfigError
from ...methods.common import confidence_share_weight
from ...methods.daformer import (
    downscale_labels_by_ratio,
    feature_distance,
    ignore_border_rows,
    rare_class_distribution,
    thing_class_mask,
)
from ...methods.ema import ModelEMA, batch_norm_as, warmup_momentum
from ...models.base import EncoderDecoder, SegmentationModel, SegOutput
from ...models.hrda import HRDASegmentor
from ..losses import upsample_logits
from ..sampling import ClassBalancedSampler
from .base import Recipe, Stream, parse_options
from .common import (
    DACS_STRONG,
    SOURCE_CLASS_PIXELS_FILE,
    FrozenNetwork,
    cache_source_class_pixels,
    content_mask,
    masked_image_consistency,
    pseudo_margin_mask,
    source_class_pixels,
    spatial_size,
    strong_view,
)

CITYSCAPES_THING_CLASSES = (
    "traffic light", "traffic sign", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
"""DAFormer's thing classes for the feature distance (Cityscapes train ids 6, 7 and 11-18), by name."""


class DACSOptions(BaseModel):
    """``method.*`` of recipe ``dacs``; defaults are DACS's (DAFormer's additions off)."""

    model_config = ConfigDict(extra="forbid")

    ema_momentum: float = Field(0.99, ge=0, lt=1, description="EMA teacher momentum (DACS: 0.99, DAFormer: 0.999)")
    pseudo_threshold: float = Field(0.968, ge=0, le=1, description="confidence counted for the pseudo-label weight")
    mix_weight: float = Field(1.0, ge=0, description="weight of the mixed (pseudo-label) loss")
    strong_augmentation: bool = Field(True, description="colour jitter and blur on the mixed images")
    pseudo_ignore_top: int = Field(0, ge=0, description="rows at the top of a target crop with pseudo-label weight 0 (DAFormer: 15)")
    pseudo_ignore_bottom: int = Field(0, ge=0, description="rows at the bottom of a target crop with weight 0 (DAFormer: 120)")
    rare_class_sampling: bool = Field(False, description="draw source images by the rarity of their classes (DAFormer Eq. 6)")
    rare_class_temperature: float = Field(0.01, gt=0, description="T of DAFormer Eq. 6; smaller draws rare classes more")
    rare_class_min_pixels: float = Field(
        3000, ge=0, description="an image is drawn for a class when its full-size label holds more pixels of it (DAFormer: 3000)"
    )
    rare_class_min_crop_ratio: float = Field(
        0.5, ge=0, description="the crop is re-drawn (up to 10 times) until it holds min_crop_ratio * min_pixels of the class"
    )
    pseudo_margins: tuple[int, int, int, int] | None = Field(
        None,
        description="top, bottom, left, right margins of the un-augmented target image, in its pixels, where the pseudo-label "
        "weight is 0 (HRDA's pseudo-label crop v2: [30, 240, 30, 30] on 2048x1024 Cityscapes); null = none",
    )
    feature_distance_weight: float = Field(0.0, ge=0, description="lambda_FD of DAFormer Eq. 9 (0.005); 0 = off")
    feature_distance_classes: list[str] | None = Field(
        list(CITYSCAPES_THING_CLASSES), description="class names whose pixels get the feature distance; null = every pixel"
    )
    feature_distance_min_ratio: float = Field(
        0.75, ge=0, le=1, description="a bottleneck cell counts for a class that fills this share of it (DAFormer's r)"
    )
    # how the authors' code takes one step (DACS/DAFormer, mmsegmentation 0.16); the other value of each is the
    # behaviour segadapt had before it was checked against that code (docs/daformer.md, "The authors' step")
    source_loss_mean: Literal["all", "valid"] = Field(
        "all",
        description="source CE averaged over all pixels of the crop, ignored ones counting 0 (the authors' mmseg "
        "reduction), or over the labelled pixels only",
    )
    teacher_batch_norm: Literal["as_student", "running"] = Field(
        "as_student",
        description="BatchNorm of the teacher: batch statistics wherever the student uses them (the authors' train-mode "
        "teacher with dropout and drop-path off) or its running statistics (eval mode); dropout is off in both",
    )
    ema_warmup: Literal["from_start", "from_first_step"] = Field(
        "from_start",
        description="teacher momentum after k steps: min(1 - 1/(k+1), m), averaging the weights from the start (the "
        "authors' code), or min(1 - 1/k, m), averaging from the first step on",
    )
    classmix_classes: Literal["batch", "image"] = Field(
        "batch",
        description="ClassMix draws half of the label values of the whole source batch, the ignore value included "
        "(the authors' code), or half of the classes present in each source image",
    )
    augmentation_coins: Literal["batch", "image"] = Field(
        "batch",
        description="whether jitter and blur apply is drawn once per batch (the authors' code) or per image; "
        "their factors and sigma are drawn per image either way",
    )
    blur_kernel: Literal["tenth_of_side", "three_sigma"] = Field(
        "tenth_of_side",
        description="Gaussian blur kernel: the largest odd number of taps up to 10 % of the image side, per axis "
        "(the authors' code), or 2 ceil(3 sigma) + 1 taps",
    )
    jitter_maths: Literal["kornia", "torchvision"] = Field(
        "kornia",
        description="colour jitter maths: kornia 0.5's (the authors' code: additive brightness, multiplicative "
        "contrast, HSV saturation) or torchvision's (blends with black, the mean grey and the per-pixel grey)",
    )


class DAFormerOptions(DACSOptions):
    """``method.*`` of recipe ``daformer``: DAFormer's values (its code and Sec. 3.3)."""

    ema_momentum: float = Field(0.999, ge=0, lt=1, description="EMA teacher momentum (DAFormer: 0.999)")
    pseudo_ignore_top: int = Field(15, ge=0, description="rows at the top of a target crop with pseudo-label weight 0")
    pseudo_ignore_bottom: int = Field(120, ge=0, description="rows at the bottom of a target crop with pseudo-label weight 0")
    rare_class_sampling: bool = Field(True, description="draw source images by the rarity of their classes (Eq. 6)")
    feature_distance_weight: float = Field(0.005, ge=0, description="lambda_FD of Eq. 9; 0 = off")


class HRDAOptions(DAFormerOptions):
    """``method.*`` of recipe ``hrda``: DAFormer's values with HRDA's changes (``configs/hrda/gtaHR2csHR_hrda.py``)."""

    pseudo_ignore_top: int = Field(0, ge=0, description="rows at the top of a target crop with pseudo-label weight 0 (HRDA: margins instead)")
    pseudo_ignore_bottom: int = Field(0, ge=0, description="rows at the bottom of a target crop with weight 0 (HRDA: margins instead)")
    pseudo_margins: tuple[int, int, int, int] | None = Field(
        (30, 240, 30, 30),
        description="top, bottom, left, right margins of the un-augmented target image with pseudo-label weight 0 (HRDA: 30, 240, 30, 30)",
    )
    rare_class_min_crop_ratio: float = Field(
        2.0, ge=0, description="the crop is re-drawn until it holds min_crop_ratio * min_pixels of the class (HRDA: 2.0, 4x DAFormer's pixels)"
    )


class DACS(Recipe):
    """Source CE + confidence-weighted CE on ClassMix source/target images with EMA-teacher pseudo labels.

    Submodules (saved and resumed): the student ``model`` and the teacher ``teacher`` (``ModelEMA``).
    With the feature distance on, a frozen copy of the network as the run starts (its ImageNet
    encoder in DAFormer; rebuilt from ``model.pretrained`` / ``model.checkpoint`` on resume, never
    saved) gives the reference features. The student is evaluated, as in DACS and DAFormer.
    """

    name = "dacs"
    streams = {"source": Stream("source"), "target": Stream("target", labels=False)}
    Options = DACSOptions
    masked_consistency = True

    @classmethod
    def check_classes(cls, options: Any, classes: ClassInfo) -> None:
        if options.feature_distance_weight > 0 and options.feature_distance_classes is not None:
            missing = [name for name in options.feature_distance_classes if name not in classes.names]
            if missing:
                raise ConfigError(
                    f"method.feature_distance_classes: {missing} are not classes of the data ({classes.name!r}: "
                    f"{', '.join(classes.names)}); list the data's thing classes, or set "
                    "method.feature_distance_classes=null to take every pixel"
                )

    @classmethod
    def prepare(cls, cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunConfig:
        """Counts the source classes once for rare-class sampling, kept in the run directory while its inputs stay the same."""
        options = parse_options(cls.Options, cfg.method, cls.name)
        if options.feature_distance_weight > 0 and cfg.model.pretrained is None and cfg.model.checkpoint is None:
            raise ConfigError(
                f"recipe {cls.name}: method.feature_distance_weight>0 keeps features close to the network the run starts "
                "from, but it starts from random weights: set model.pretrained (the ImageNet encoder) or model.checkpoint, "
                "or method.feature_distance_weight=0"
            )
        if options.rare_class_sampling:
            cache_source_class_pixels(cfg, run_dir, log, "rare-class sampling")
            table = torch.load(run_dir / SOURCE_CLASS_PIXELS_FILE, map_location="cpu", weights_only=True)["pixels"]
            probabilities, _ = rare_class_distribution(table, options.rare_class_temperature, options.rare_class_min_pixels)
            present = table.sum(dim=0) > 0
            unreachable = (present & (probabilities == 0)).nonzero().flatten().tolist()
            if unreachable:
                log(
                    f"rare-class sampling: classes {unreachable} are in no source image with more than "
                    f"{options.rare_class_min_pixels:g} pixels of them and are not drawn (method.rare_class_min_pixels)"
                )
        return cfg

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        super().__init__(cfg, model, seg_loss, classes)
        self.teacher = ModelEMA(model, self.options.ema_momentum)
        self.mic = masked_image_consistency(cfg, model)
        self.start_network: FrozenNetwork | None = None
        self.thing_classes: list[int] | None = None
        if self.options.feature_distance_weight > 0:
            if not isinstance(model, (EncoderDecoder, HRDASegmentor)):
                raise ConfigError(
                    f"method.feature_distance_weight>0 needs the encoder's features, which model {cfg.model.name!r} does not "
                    "expose (it is no segadapt.models.base.EncoderDecoder or HRDA segmentor): use a daformer_* or hrda_* model "
                    "or method.feature_distance_weight=0"
                )
            self.start_network = FrozenNetwork(copy.deepcopy(model))
            names = self.options.feature_distance_classes
            self.thing_classes = None if names is None else [classes.names.index(name) for name in names]

    def train(self, mode: bool = True) -> DACS:
        super().train(mode)
        self.teacher.eval()  # the teacher only predicts: no dropout or drop-path; BatchNorm per teacher_batch_norm
        return self

    def train_sampler(self, stream: str, dataset: Any, seed: int, start: int) -> Sampler | None:
        """The source stream's rare-class sampler under ``method.rare_class_sampling``; None otherwise."""
        if stream != "source" or not self.options.rare_class_sampling:
            return None
        options = self.options
        probabilities, candidates = rare_class_distribution(
            source_class_pixels(self.cfg.run_dir, dataset), options.rare_class_temperature, options.rare_class_min_pixels
        )
        crop_min = options.rare_class_min_pixels * options.rare_class_min_crop_ratio
        return ClassBalancedSampler(candidates, probabilities, seed, start, crop_min_pixels=crop_min if crop_min > 0 else None)

    @torch.no_grad()
    def after_optimizer_step(self, iteration: int) -> None:
        # ``iteration`` optimiser steps are done; the DACS code updates its teacher at the start of the next
        # step with min(1 - 1/(iteration + 1), m) (method.ema_warmup)
        count_start = self.options.ema_warmup == "from_start"
        self.teacher.momentum = warmup_momentum(iteration, self.options.ema_momentum, count_start=count_start)
        self.teacher.update(self.model)

    @contextlib.contextmanager
    def _teacher_mode(self) -> Iterator[None]:
        """The teacher's BatchNorm as ``method.teacher_batch_norm`` says, for one prediction.

        ``as_student``: the DACS/DAFormer teacher is a submodule in train mode with only its dropout and
        drop-path layers switched off, so its BatchNorm layers normalise the target batch with the batch's
        own statistics (their running statistics are never read). Here the teacher stays in eval mode
        and its BatchNorm layers take the student's mode for the forward, their running statistics
        untouched (:func:`~segadapt.methods.ema.batch_norm_as`). The teacher's buffers are copied from the
        student after every step (:class:`~segadapt.methods.ema.ModelEMA`), where the authors average
        parameters only; under ``as_student`` the only statistics the forward reads are those of
        BatchNorm layers the student keeps frozen, which never change, so the two agree.
        """
        if self.options.teacher_batch_norm == "as_student":
            with batch_norm_as(self.teacher.module, self.model):
                yield
        else:
            yield

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float logits on ``images``, upsampled to their size (before the softmax, as DACS)."""
        with self._teacher_mode():
            logits = self.teacher(images).logits.float()
        return upsample_logits(logits, spatial_size(images))

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's hard labels ``[N, H, W]`` and DACS's pseudo-label weight ``[N, H, W]``.

        The weight is one number for the batch (DACS's code: the share of its pixels above
        ``pseudo_threshold``), 0 in the rows of DAFormer's pseudo-label crop.
        """
        probs = torch.softmax(self.teacher_logits(images), dim=1)
        confidence, labels = probs.max(dim=1)
        labels = labels.masked_fill(~inside, self.ignore_index)
        weight = confidence_share_weight(confidence, self.options.pseudo_threshold, inside)
        return labels, ignore_border_rows(weight, self.options.pseudo_ignore_top, self.options.pseudo_ignore_bottom)

    def source_loss(self, output: SegOutput, labels: torch.Tensor) -> torch.Tensor:
        """The supervised loss of the source crop, reduced as ``method.source_loss_mean`` says.

        ``all``: the mean over every pixel, ignored pixels counting 0 (the DACS/DAFormer code's
        cross-entropy, mmsegmentation's ``weight_reduce_loss`` mean over all elements): a crop with
        much ignored area gets a smaller loss. ``valid``: the mean over the labelled pixels only.
        """
        if self.options.source_loss_mean == "valid":
            return self.supervised_loss(output, labels)
        return self.supervised_loss(output, labels, weight=torch.ones(labels.shape, device=labels.device))

    def source_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The supervised source loss, plus DAFormer's feature distance (Eq. 9) on the same forward's bottleneck.

        On an HRDA network the distance compares the context view's bottleneck (the image at half
        resolution: the authors' ``feature_scale`` 0.5) with the start network's on the same view.
        """
        if self.start_network is None:
            return {"loss_source": self.source_loss(self.model(images), labels)}
        output: SegOutput
        if isinstance(self.model, HRDASegmentor):
            output = self.model(images)
            assert output.detail is not None  # the training forward
            student = output.detail.context_encoded[-1]
        else:
            assert isinstance(self.model, EncoderDecoder)  # checked in __init__
            encoded = self.model.encode(images)
            output = self.model.decode(encoded)
            student = encoded[-1]
        reference = self.start_network.encode(images)[-1]
        mask = None
        if self.thing_classes is not None:
            factor = max(1, labels.shape[-1] // student.shape[-1])
            cells = downscale_labels_by_ratio(labels, factor, self.options.feature_distance_min_ratio, self.num_classes, self.ignore_index)
            if cells.shape[-2:] != student.shape[-2:]:
                cells = F.interpolate(cells[:, None].float(), size=student.shape[-2:], mode="nearest")[:, 0].long()
            mask = thing_class_mask(cells, self.thing_classes)
        return {
            "loss_source": self.source_loss(output, labels),
            "loss_feature_distance": self.options.feature_distance_weight * feature_distance(student, reference, mask),
        }

    def training_step(self, batches: dict[str, dict[str, Any]], iteration: int) -> dict[str, torch.Tensor]:
        self.seg_loss.set_iteration(iteration)
        source, target = batches["source"], batches["target"]
        terms = self.source_step(source["image"], source["label"])
        released = self.backward_now(sum(terms.values(), torch.zeros(())))  # the source graph is freed here

        images = target["image"]
        inside = content_mask(target, spatial_size(images))
        labels, pseudo_weight = self.pseudo_labels(images, inside)
        if self.options.pseudo_margins is not None:  # HRDA's crop v2: margins of the whole image, before the crop
            pseudo_weight = pseudo_weight * pseudo_margin_mask(target, spatial_size(images), self.options.pseudo_margins)
        masks = classmix_masks(source["label"], ignore_index=self.ignore_index, pool=self.options.classmix_classes)
        mixed_images = mix(masks, source["image"], images)
        mixed_labels = mix(masks, source["label"], labels)
        weight = mix(masks, torch.ones_like(pseudo_weight), pseudo_weight)
        if self.options.strong_augmentation:
            mixed_images = strong_view(
                mixed_images, DACS_STRONG, coins=self.options.augmentation_coins, blur_kernel=self.options.blur_kernel,
                jitter_maths=self.options.jitter_maths,
            )
        loss_mix = self.supervised_loss(self.model(mixed_images), mixed_labels, weight=weight)
        mix_term = self.options.mix_weight * loss_mix
        if self.mic is not None:  # the mixed graph is freed before MIC's forward, as the authors' backward order
            mix_term = self.backward_now(mix_term)
        losses = {
            "loss": released + mix_term,
            **{name: value.detach() for name, value in terms.items()},
            "loss_mix": loss_mix.detach(),
            "pseudo_weight": pseudo_weight.mean().detach(),
        }
        if self.mic is not None:  # MIC on the unmixed target crop, with the teacher's labels and weight
            self.mic.add(losses, self, target, labels, pseudo_weight, iteration)
        return losses


class DAFormer(DACS):
    """DACS with DAFormer's rare-class sampling, thing-class ImageNet feature distance and pseudo-label crop.

    Hoyer et al., CVPR 2022, Sec. 3.3: the defaults are the paper's (teacher momentum 0.999, T = 0.01,
    lambda_FD = 0.005 on the thing classes at r = 0.75, crop 15 / 120 rows). Meant for the
    :class:`segadapt.models.DAFormer` network with DAFormer's optimiser (AdamW, lr 6e-5, 10x head,
    no weight decay on norms, warm-up then poly 1.0: the ``gta5_to_cityscapes/daformer`` config).
    """

    name = "daformer"
    Options = DAFormerOptions


class HRDA(DAFormer):
    """DAFormer's training of an HRDA network (Hoyer et al., ECCV 2022; docs/hrda.md).

    The step is the ``daformer`` recipe's; what makes it HRDA is the network
    (:class:`segadapt.models.hrda.HRDASegmentor`): every supervised term (source, mixed, MIC's
    masked) is Eq. 6's fused-plus-detail loss on a random detail crop, the teacher's pseudo labels
    come from its eval forward (the detail branch slid over the whole target crop), and the feature
    distance compares the context view's bottleneck. The options differ from DAFormer's in the
    rare-class crop ratio (2.0: the crops hold four times the pixels) and the pseudo-label crop
    (margins of the whole image, [30, 240, 30, 30], instead of rows of the crop).
    """

    name = "hrda"
    Options = HRDAOptions

    def __init__(self, cfg: RunConfig, model: SegmentationModel, seg_loss: Any, classes: ClassInfo) -> None:
        if not isinstance(model, HRDASegmentor):
            raise ConfigError(
                f"recipe hrda trains HRDA's multi-resolution network, but model {cfg.model.name!r} is none: use "
                "model.name=hrda_daformer_mitb5 (or hrda_daformer_mitb0, hrda_deeplabv2_r101), or recipe daformer"
            )
        super().__init__(cfg, model, seg_loss, classes)
