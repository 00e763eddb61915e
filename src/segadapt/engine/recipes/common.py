"""What several recipes share; recipes import this module and :mod:`.base`, never each other.

- :func:`content_mask`: where a training view shows image content (not crop padding or cutout boxes);
  :func:`pseudo_margin_mask`: where it is away from the margins of its whole image (HRDA's pseudo-label crop);
- :class:`FrozenNetwork` and :func:`load_teacher`: a fixed network a recipe predicts with (CPSL's
  warm-up, a distillation teacher), never trained, never saved, moved to the data's device lazily;
- :func:`forward_streams`: one forward of several streams' images concatenated, split back per
  stream (logits, features and auxiliary logits), so each stream gets its own supervised loss;
- :func:`strong_view` with :data:`CPSL_STRONG` and :data:`DACS_STRONG`: the photometric strong
  augmentation of the student's view;
- :func:`cache_source_class_pixels` and :func:`source_class_pixels`: the pixels of each class in each
  source label map, counted once into the run directory, for class-balanced source sampling (BiCL's
  weighted sampling, DAFormer's rare-class sampling).
- :class:`MaskedImageConsistency` and :func:`masked_image_consistency`: MIC's masked-target term
  (``mic:`` in the run config), which every recipe with target pseudo labels adds the same way.

The supervised-loss rule (the segmentation loss plus the auxiliary head's) is
:meth:`.base.Recipe.supervised_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ...data.transforms import strong_augment, valid_mask
from ...errors import ConfigError, DataError
from ...methods.common import confidence_share_weight
from ...methods.ema import ModelEMA, batch_norm_as, warmup_momentum
from ...methods.mic import block_mask, mask_images
from ...models.base import EncoderDecoder, SegmentationModel, SegOutput
from ...models.hrda import HRDASegmentor
from ..losses import upsample_logits

if TYPE_CHECKING:
    from ...config import MICConfig, RunConfig
    from .base import Recipe


# --------------------------------------------------------------------------- image content


def spatial_size(x: torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of a ``[..., H, W]`` tensor."""
    height, width = x.shape[-2:]
    return height, width


def view_start_size(records: Sequence[Any]) -> tuple[int, int] | None:
    """``(H, W)`` of the image a view's replay records start from; None without geometric records."""
    return next((tuple(r.input_size) for r in records if hasattr(r, "input_size")), None)


def content_mask(batch: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
    """``[N, *size]`` bool, True where each view of ``batch`` shows image content, on ``batch["image"]``'s device.

    False in crop padding and cutout boxes, from the loader's replay records
    (:func:`~segadapt.data.transforms.valid_mask`, resized nearest to ``size``: the crop, or a
    network's output grid). A view without records is all content. Pseudo labels are never made
    and consistency losses are never taken there (ProDA masks its padding value the same way;
    docs/reference_code.md, "CPSL: consistency loss").
    """
    images = batch["image"]
    masks = []
    for records in batch.get("replay") or [[]] * len(images):
        start = view_start_size(records)
        masks.append(torch.ones(size, dtype=torch.bool) if start is None else valid_mask(records, start, output_size=size))
    return torch.stack(masks).to(images.device)


def pseudo_margin_mask(batch: dict[str, Any], size: tuple[int, int], margins: Sequence[int]) -> torch.Tensor:
    """``[N, *size]`` float, 0 within ``margins`` of the un-augmented image's border, 1 elsewhere (HRDA's pseudo-label crop v2).

    ``margins`` are ``(top, bottom, left, right)`` in pixels of the image the view's replay records start
    from (the dataset's image: HRDA's ``[30, 240, 30, 30]`` of a 2048 x 1024 Cityscapes image); the mask is
    made there and follows the view's geometry, so a crop away from the border keeps all its pixels. A
    view without records is its own image.
    """
    images = batch["image"]
    masks = []
    for records in batch.get("replay") or [[]] * len(images):
        start = view_start_size(records)
        mask = valid_mask(records, start or size, output_size=size, margins=margins)
        masks.append(mask)
    return torch.stack(masks).to(device=images.device, dtype=images.dtype)


# --------------------------------------------------------------------------- frozen networks


class FrozenNetwork:
    """A fixed network a recipe predicts with but never trains or saves.

    Deliberately not an ``nn.Module``: held as a recipe attribute it is no submodule, so it stays out
    of ``state_dict`` (checkpoints rebuild it from its source: ``model.checkpoint`` for CPSL's warm-up,
    ``method.teacher`` for a distillation teacher), out of ``recipe.train()`` (always eval mode) and
    out of ``recipe.to(device)``: it moves to the images' device at its first call. Calls run without
    gradients. ``network`` is the wrapped module.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network.eval().requires_grad_(False)

    def _follow(self, images: torch.Tensor) -> None:
        parameter = next(self.network.parameters(), None)
        if parameter is not None and parameter.device != images.device:
            self.network.to(images.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> SegOutput:
        self._follow(images)
        return self.network(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps of a wrapped :class:`~segadapt.models.base.EncoderDecoder` (DAFormer's ImageNet
        features), or of an HRDA segmentor's context view (:meth:`~segadapt.models.hrda.HRDASegmentor.encode_context`)."""
        self._follow(images)
        if isinstance(self.network, HRDASegmentor):
            return self.network.encode_context(images)
        if not isinstance(self.network, EncoderDecoder):
            raise TypeError(f"{type(self.network).__name__} is no EncoderDecoder: it has no encoder features to give")
        return self.network.encode(images)

    def logits(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Its float logits on ``images``, bilinearly resized to ``size`` when given (a student's output
        grid: teacher and student may differ in stride)."""
        logits = self(images).logits.float()
        return logits if size is None else upsample_logits(logits, size)


def load_teacher(recipe: Recipe, cfg: RunConfig, hint: str) -> FrozenNetwork:
    """The frozen network of ``method.teacher`` (a distillation stage's teacher); ``hint`` is the path to suggest."""
    from ..loading import load_trained_model

    path = recipe.options.teacher
    if path is None:
        raise ConfigError(f"recipe {recipe.name} distils an adapted model: set method.teacher={hint}")
    teacher, classes = load_trained_model(path, cfg)
    if classes is not None and classes.num_classes != recipe.num_classes:
        raise ConfigError(f"method.teacher {path} predicts {classes.num_classes} classes but the data has {recipe.num_classes}")
    return FrozenNetwork(teacher)


# --------------------------------------------------------------------------- one forward, several streams


def forward_streams(model: nn.Module, *images: torch.Tensor) -> tuple[SegOutput, ...]:
    """One forward of the streams' images concatenated (one BatchNorm batch), split back per stream.

    Every field of the output is split (``logits``, ``features`` and, from networks with an
    auxiliary head in training, ``aux_logits``), so each stream's
    :meth:`~.base.Recipe.supervised_loss` includes its auxiliary term. BiCL forwards source and
    target this way, and self-training with ``method.batch_norm: joint``; the DARS code does not: it
    calls the network once per batch (``tool/train_func.py``), self-training's default ``separate``.
    """
    sizes = [len(batch) for batch in images]
    output = model(torch.cat(images))
    fields = [[None] * len(sizes) if value is None else value.split(sizes) for value in output]
    return tuple(type(output)(*parts) for parts in zip(*fields))


# --------------------------------------------------------------------------- strong augmentation


@dataclass(frozen=True)
class StrongAugmentation:
    """Colour jitter (strength on brightness, contrast, saturation and hue, with probability ``jitter_p``)
    then Gaussian blur (sigma drawn from ``blur_sigma``, with probability ``blur_p``); factors and sigma per image."""

    jitter: float
    jitter_p: float
    blur_sigma: tuple[float, float]
    blur_p: float


CPSL_STRONG = StrongAugmentation(jitter=0.4, jitter_p=0.5, blur_sigma=(1.0, 1.0), blur_p=0.5)
"""The photometric part of the CPSL/ProDA authors' ``RandAugmentMC``: ColorJitter(0.4, 0.4, 0.4, 0.4)
with p = 0.5 and PIL GaussianBlur(radius 1) with p = 0.5 (docs/reference_code.md, "CPSL: data and
augmentation"); recipes ``cpsl`` and ``cpsl_distill``. Geometry is left alone, so labels of the weak view fit the strong one."""

DACS_STRONG = StrongAugmentation(jitter=0.2, jitter_p=0.8, blur_sigma=(0.15, 1.15), blur_p=0.5)
"""DACS's (Tranheden et al. 2021, its code): jitter 0.2 when ``U(0, 1) > 0.2``, blur sigma
``U(0.15, 1.15)`` when ``U(0, 1) > 0.5``; recipe ``dacs``, on the mixed images."""


def strong_view(images: torch.Tensor, augmentation: StrongAugmentation, coins: str = "image",
                blur_kernel: str = "three_sigma", jitter_maths: str = "torchvision") -> torch.Tensor:
    """``images`` ``[N, 3, H, W]`` under ``augmentation``, drawn from the global RNG
    (:func:`~segadapt.data.transforms.strong_augment`); ``coins="batch"`` tosses the apply-or-not
    coins once for the batch (the DACS code), ``"image"`` per image; ``blur_kernel="tenth_of_side"``
    blurs with the DACS code's kernel of 10 % of the image side, ``jitter_maths="kornia"`` jitters with
    its kornia 0.5 colour maths."""
    view, _ = strong_augment(
        images,
        jitter_strength=augmentation.jitter,
        jitter_p=augmentation.jitter_p,
        blur_sigma=augmentation.blur_sigma,
        blur_p=augmentation.blur_p,
        coins=coins,
        blur_kernel=blur_kernel,
        jitter_maths=jitter_maths,
    )
    return view


# --------------------------------------------------------------------------- source class table

SOURCE_CLASS_PIXELS_FILE = "source_class_pixels.pt"
"""Pixels of each class in each ``data.source`` label map (``{"pixels": [I, C], "names"}``), in the run directory."""


def cache_source_class_pixels(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], what: str) -> None:
    """Count the classes of every full-size ``data.source`` label map once, reused while ``data.source`` is the same.

    The run-cache rule (:func:`~segadapt.engine.run_cache.reuse_or_make`); ``what`` names the user in the log.
    """
    from ...data.classes import class_pixel_counts
    from ...progress import progress
    from ..builders import build_dataset_from_spec
    from ..checkpoint import atomic_save
    from ..run_cache import reuse_or_make

    if cfg.data.source is None:
        raise ConfigError(f"recipe {cfg.recipe} samples the source by class: it needs data.source (the labelled source images)")
    source = cfg.data.source
    path = run_dir / SOURCE_CLASS_PIXELS_FILE

    def count() -> None:
        dataset = build_dataset_from_spec(source, with_labels=True)
        log(f"{what}: counting the classes of {len(dataset)} source label maps")
        classes = dataset.classes
        rows = [
            class_pixel_counts(dataset.load_label(i), classes.num_classes, classes.ignore_index)
            for i in progress(range(len(dataset)), desc="class pixels", unit="label")
        ]
        atomic_save({"pixels": torch.stack(rows), "names": list(dataset.names)}, path)

    key = {"data.source": source.model_dump(mode="json", exclude={"pseudo_labels", "with_labels"})}
    reuse_or_make(path, key, count, log, f"{what}: source class pixels")


def source_class_pixels(run_dir: Path, dataset: Any) -> torch.Tensor:
    """int64 ``[I, C]``, the table :func:`cache_source_class_pixels` wrote, checked to be ``dataset``'s."""
    path = run_dir / SOURCE_CLASS_PIXELS_FILE
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["names"] != list(dataset.names):
        raise DataError(f"{path} was made for another source split; delete it to recount")
    return saved["pixels"]


# --------------------------------------------------------------------------- masked image consistency (MIC)


class MaskedImageConsistency(nn.Module):
    """MIC (Hoyer et al., CVPR 2023) as a term any recipe with target pseudo labels adds: ``mic:`` in the run config.

    Per step, as the authors' ``MaskingConsistencyModule`` in its ``separatetrgaug`` mode (MIC's
    UDA setting): the target crop gets DACS's colour jitter and blur (:data:`DACS_STRONG`, tossed
    once for the batch, the 10 %-of-side blur kernel and kornia's colour maths, as the authors'
    ``strong_transform``; ``mic.augmentation``), then a block mask hides a share ``mic.mask_ratio``
    of its ``mic.mask_block_size`` blocks (MIC Eq. 3 and 4, :mod:`segadapt.methods.mic`), and the
    student's prediction of the masked crop is trained with the recipe's supervised-loss rule (the
    run's ``loss.name``: BLV composes) against the pseudo labels of the *unmasked* crop, weighted
    by their confidence weight, times ``mic.mask_lambda`` (Eq. 8 and 10). The term is
    back-propagated at once (:meth:`~.base.Recipe.backward_now`), so its graph is freed before the
    host goes on, as the authors' separate backward.

    The labels: ``mic.teacher: host`` takes the host's (DACS/DAFormer: the EMA teacher's argmax and
    confidence-share weight, 0 in DAFormer's cropped rows; CPSL: its rectified labels of the weak
    view; self-training: the offline pseudo labels; BiCL: the labels of its target cross-entropy).
    Hosts without a confidence weight give none: the term is then the mean over the labelled pixels,
    each with weight 1, as the host's own target loss. ``mic.teacher: ema`` keeps an EMA teacher of
    its own (a submodule: saved and resumed with the recipe), updated from the student before each
    step with DACS's warm-up momentum ``min(1 - 1/(k+1), mic.ema_momentum)`` after ``k`` steps (the
    authors update theirs at the start of the step), predicting with BatchNorm as the student and
    weighting its labels by the share above ``mic.pseudo_threshold`` (Eq. 7). Crop padding is never
    labelled. Hidden pixels take the colour the network normalises to zero, the authors' masked value.
    """

    teacher_steps: torch.Tensor

    def __init__(self, config: MICConfig, model: SegmentationModel) -> None:
        super().__init__()
        self.config = config
        self.fill = torch.tensor(model.normalization.zero_colour())
        self.teacher: ModelEMA | None = None
        if config.teacher == "ema":
            self.teacher = ModelEMA(model, config.ema_momentum)
            self.register_buffer("teacher_steps", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> MaskedImageConsistency:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # predicts only: no dropout or drop-path; BatchNorm as the student's (batch_norm_as)
        return self

    @torch.no_grad()
    def _teacher_pseudo_labels(self, model: nn.Module, batch: dict[str, Any], iteration: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and confidence-share weight ``[N, H, W]`` of MIC's own teacher on the unmasked crop."""
        assert self.teacher is not None
        if iteration > int(self.teacher_steps):  # once per optimiser step (grad_accum calls the step several times)
            self.teacher.momentum = warmup_momentum(iteration, self.config.ema_momentum)
            self.teacher.update(model)
            self.teacher_steps.fill_(iteration)
        images = batch["image"]
        size = spatial_size(images)
        with batch_norm_as(self.teacher.module, model):
            logits = upsample_logits(self.teacher(images).logits.float(), size)
        confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
        inside = content_mask(batch, size)
        weight = confidence_share_weight(confidence, self.config.pseudo_threshold, inside)
        return labels.masked_fill(~inside, ignore_index), weight

    def masked_view(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` colour-jittered and blurred (``mic.augmentation``), then block-masked (MIC Eq. 3 and 4)."""
        if self.config.augmentation:
            images = strong_view(images, DACS_STRONG, coins="batch", blur_kernel="tenth_of_side", jitter_maths="kornia")
        mask = block_mask(len(images), spatial_size(images), self.config.mask_ratio, self.config.mask_block_size, device=images.device)
        return mask_images(images, mask.to(images.dtype), self.fill)

    def add(
        self,
        losses: dict[str, torch.Tensor],
        recipe: Recipe,
        batch: dict[str, Any],
        labels: torch.Tensor,
        weight: torch.Tensor | None,
        iteration: int,
    ) -> dict[str, torch.Tensor]:
        """Add the term to ``losses["loss"]`` and log it as ``loss_mic``; returns ``losses``.

        ``batch`` is the host's target batch (its ``image`` the unmasked, un-augmented crop),
        ``labels`` ``[N, h, w]`` and ``weight`` (or None) the host's pseudo labels and their weight
        on it, at the crop's size or the network's output grid.
        """
        if self.teacher is not None:
            labels, weight = self._teacher_pseudo_labels(recipe.model, batch, iteration, recipe.ignore_index)
        output = recipe.model(self.masked_view(batch["image"]))
        term = recipe.backward_now(self.config.mask_lambda * recipe.supervised_loss(output, labels, weight=weight))
        losses["loss"] = losses["loss"] + term
        losses["loss_mic"] = term.detach()
        return losses


def masked_image_consistency(cfg: RunConfig, model: SegmentationModel) -> MaskedImageConsistency | None:
    """The recipe's MIC term under ``mic.enabled``; None (no submodule, no state) otherwise."""
    return MaskedImageConsistency(cfg.mic, model) if cfg.mic.enabled else None
