"""HRDA: a multi-resolution segmentor with a learned, class-wise scale attention.

Hoyer, Dai and Van Gool, "HRDA: Context-Aware High-Resolution Domain-Adaptive Semantic
Segmentation", ECCV 2022, Sec. 3.2-3.4. One encoder and one decoder (any segadapt network's, e.g.
DAFormer's MiT-B5 and fusion decoder, or DeepLab-V2's) see two views of a training crop:

- the **context view**: the whole crop bilinearly downscaled by ``context_scale`` (0.5), giving the
  low-resolution prediction ``y_c`` (Eq. 1);
- the **detail view**: a crop of the full-resolution crop of ``detail_crop_size`` (512 x 512 of a
  1024 x 1024 crop), its top-left corner drawn uniformly on a grid of ``crop_coord_divisible`` (8)
  pixels so that it falls on whole cells of both outputs (:func:`random_detail_box`), giving ``y_d``;
- a **scale-attention head** (a second decoder of the same kind on the context features; for
  DAFormer with a 1x1 convolution in place of the ASPP fusion) gives ``a = sigmoid(f_a(x_c))``, one
  map per class, set to 0 outside the detail crop during training (Eq. 4);
- the fused prediction ``y = up(a) * y_d + up((1 - a) * y_c)`` (Eq. 5, in the authors' order: the
  attention multiplies the context logits before both are upsampled by ``1 / context_scale``).

The training loss (Eq. 6) is ``(1 - lambda_d) L(y, labels) + lambda_d L(y_d, labels in the detail
crop)`` with ``lambda_d = hr_loss_weight`` (0.1); the model returns ``y_d`` and its box in
:class:`~segadapt.models.base.DetailOutput` and the engine's supervised-loss rule weighs the terms
(:func:`segadapt.methods.hrda.hrda_loss`).

At inference (eval mode) the detail branch runs over the whole input in overlapping windows of
``detail_crop_size`` with half of it as the stride, the window logits averaged where they overlap
(the authors' ``hr_slide_inference``, Sec. 3.4), and the attention is not masked. The evaluator's
sliding window (``eval.sliding_window``, ``eval.window_stride``: 1024 and 512 on 2048 x 1024
Cityscapes images) then runs this whole network per window.

Module names follow the authors' ``HRDAEncoderDecoder`` / ``HRDAHead``: ``backbone.*``,
``decode_head.head.*`` (the shared decoder) and ``decode_head.scale_attention.*``, so released
HRDA/MIC(HRDA) checkpoints load (tests/fixtures/parity/hrda_mitb5_state_dict_keys.txt).

Random draws: the detail box is drawn by the module function :func:`random_detail_box`, looked up at
call time, so a test replaces it (``monkeypatch.setattr(segadapt.models.hrda, "random_detail_box",
...)``) as the step-parity tests replace the transforms' draws; ``forward(images, detail_box=box)``
gives a box directly.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, Literal, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import DetailOutput, Normalization, SegmentationModel, SegOutput, check_input, check_num_classes
from .daformer import DAFormerHead
from .deeplabv2 import ASPPClassifier, DeepLabV2
from .mit import MixTransformer
from .weights import TORCHVISION_RESNET101, BackboneFormat, SingleScaleCheckpoint, segformer_imagenet_format

Box = tuple[int, int, int, int]
"""``(y1, y2, x1, x2)``: rows ``y1:y2`` and columns ``x1:x2``."""


def random_detail_box(image_size: Sequence[int], crop_size: Sequence[int], divisible: int = 1, generator: torch.Generator | None = None) -> Box:
    """A crop box of ``crop_size`` inside ``image_size`` whose top-left corner is a multiple of ``divisible``.

    The authors' ``get_crop_bbox``: the offset along each side is ``divisible * U{0, .., (margin + 1)
    // divisible - 1}`` with ``margin = side - crop``, rows drawn first; a crop as large as the image
    is the image. A crop side larger than the image's is clipped to it.

    Examples:
        >>> random_detail_box((1024, 1024), (512, 512), 8, torch.Generator().manual_seed(0))
        (352, 864, 376, 888)
        >>> random_detail_box((64, 64), (64, 64))
        (0, 64, 0, 64)
    """
    height, width = int(image_size[0]), int(image_size[1])
    crop_h, crop_w = min(int(crop_size[0]), height), min(int(crop_size[1]), width)
    if (crop_h, crop_w) == (height, width):
        return 0, height, 0, width
    if divisible < 1:
        raise ValueError(f"crop_coord_divisible must be at least 1, got {divisible}")

    def offset(margin: int) -> int:
        choices = max(1, (margin + 1) // divisible)
        return int(torch.randint(0, choices, (1,), generator=generator)) * divisible

    top = offset(height - crop_h)
    left = offset(width - crop_w)
    return top, top + crop_h, left, left + crop_w


def scale_box(box: Box, factor: float) -> Box:
    """``box`` divided by ``factor``, each coordinate truncated (the authors' ``scale_box``).

    Examples:
        >>> scale_box((8, 520, 16, 528), 8)
        (1, 65, 2, 66)
    """
    y1, y2, x1, x2 = box
    return int(y1 / factor), int(y2 / factor), int(x1 / factor), int(x2 / factor)


def crop_box(x: torch.Tensor, box: Box) -> torch.Tensor:
    """The ``box`` of the last two dimensions of ``x``."""
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def sliding_detail_boxes(image_size: Sequence[int], window: Sequence[int], overlapping: bool = True) -> list[Box]:
    """The windows of HRDA's sliding detail inference (the authors' ``extract_slide_feat``), row-major.

    Stride half the window (``overlapping``) or the window; the last window of a row or column is
    moved back to end at the border; a window larger than the image is the image.

    Examples:
        >>> sliding_detail_boxes((1024, 1024), (512, 512))[:3]
        [(0, 512, 0, 512), (0, 512, 256, 768), (0, 512, 512, 1024)]
        >>> len(sliding_detail_boxes((1024, 1024), (512, 512))), len(sliding_detail_boxes((1024, 1024), (512, 512), False))
        (9, 4)
        >>> sliding_detail_boxes((40, 40), (64, 64))
        [(0, 40, 0, 40)]
    """
    height, width = int(image_size[0]), int(image_size[1])
    crop_h, crop_w = int(window[0]), int(window[1])
    stride_h, stride_w = (crop_h // 2, crop_w // 2) if overlapping else (crop_h, crop_w)
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


def _resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` bilinearly resized to ``size`` unless already there (networks whose output is not exactly input / stride)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)


def fuse_scales(context_logits: torch.Tensor, detail_logits: torch.Tensor, attention: torch.Tensor, scale: float) -> torch.Tensor:
    """HRDA Eq. 5 in the authors' order: ``up(a) * y_d + up((1 - a) * y_c)``, ``up`` bilinear by ``scale``.

    ``detail_logits`` is already on the fused grid (zero outside the detail crop in training);
    ``attention`` ``[N, C or 1, h, w]`` is on the context grid.

    Shape:
        - context_logits: ``[N, C, h, w]``; attention: ``[N, C, h, w]`` or ``[N, 1, h, w]``
        - detail_logits: ``[N, C, h * scale, w * scale]``; returns the same

    Examples:
        >>> context = torch.full((1, 1, 1, 1), 2.0)
        >>> detail = torch.full((1, 1, 2, 2), 10.0)
        >>> fuse_scales(context, detail, torch.full((1, 1, 1, 1), 0.25), scale=2).flatten().tolist()
        [4.0, 4.0, 4.0, 4.0]
    """
    weighted_context = F.interpolate((1 - attention) * context_logits, scale_factor=scale, mode="bilinear", align_corners=False)
    weighted_context = _resize_to(weighted_context, detail_logits.shape[-2:])
    attention = _resize_to(F.interpolate(attention, scale_factor=scale, mode="bilinear", align_corners=False), detail_logits.shape[-2:])
    return attention * detail_logits + weighted_context


def _logits_and_features(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoder's output as ``(logits, features)``: a :class:`SegOutput` or a logits tensor (DeepLab-V2's classifier)."""
    if isinstance(output, SegOutput):
        return output.logits, output.features
    return cast(torch.Tensor, output), None


class HRDAHead(nn.Module):
    """HRDA's decoder (the authors' ``HRDAHead``): one decoder for both scales and a scale-attention decoder.

    Has no parameters of its own: ``head`` and ``scale_attention`` hold them (state-dict names
    ``decode_head.head.*`` and ``decode_head.scale_attention.*`` under :class:`HRDASegmentor`).
    Either module maps the encoder's output to a :class:`SegOutput` or to a logits tensor; the
    attention module's "logits" have ``C`` channels (class-wise attention) or 1.
    """

    def __init__(self, head: nn.Module, scale_attention: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention

    def attention(self, context_encoded: Any) -> torch.Tensor:
        """``sigmoid(f_a(x_c))``, the scale attention on the context grid (HRDA Eq. 4 before the crop mask)."""
        logits, _ = _logits_and_features(self.scale_attention(context_encoded))
        return torch.sigmoid(logits)


class HRDASegmentor(SegmentationModel):
    """HRDA around a segadapt encoder and decoder (Hoyer et al., ECCV 2022; module docstring).

    Subclasses set the class attribute ``output_stride`` (the decoder's stride on its input:
    4 for DAFormer, 8 for DeepLab-V2) and build the modules; :class:`HRDADAFormer` and
    :class:`HRDADeepLabV2` are the registered ones. A stand-in network for tests is three modules
    and a stride::

        class TinyHRDA(HRDASegmentor):
            output_stride = 2
        model = TinyHRDA(backbone, head, attention_head, num_classes=3, feature_dim=8,
                         normalization="imagenet", detail_crop_size=(16, 16), crop_coord_divisible=4)

    Args:
        backbone: normalised images ``[N, 3, H, W]`` -> the encoder's output (a list of maps or a map).
        head: the encoder's output -> :class:`SegOutput` (or logits), shared by both scales.
        scale_attention: the encoder's output -> attention logits (``C`` channels, or 1).
        num_classes, feature_dim, normalization: the :class:`SegmentationModel` contract.
        detail_crop_size: ``(h, w)`` of the detail crop in input pixels (HRDA: 512 x 512 of
            1024 x 1024 training crops); also the window of the sliding detail inference.
        context_scale: the context view's scale (HRDA: 0.5).
        crop_coord_divisible: the detail crop's corner is a multiple of this (HRDA: 8 = the
            DAFormer stride 4 times 1 / context_scale, so that the crop covers whole cells of
            the context output).
        hr_loss_weight: ``lambda_d`` of the detail loss (HRDA: 0.1).
        slide_detail: at inference, the detail branch runs in windows of ``detail_crop_size``
            (the authors' ``hr_slide_inference``, True); False: on the whole input at once.
        slide_overlapping: the windows overlap by half (True, the authors') or tile.

    Shape:
        - input: ``[N, 3, H, W]`` RGB in ``[0, 1]``
        - logits: the fused ``[N, C, h, w]`` with ``h, w`` about ``H / output_stride, W / output_stride``
        - features: the shared decoder's features of the context view, upsampled to ``h x w``
          (``[N, D, h, w]``)
        - detail: in training, :class:`DetailOutput` (the detail crop's logits
          ``[N, C, h_d / output_stride, w_d / output_stride]``, its box, the loss weight and the
          context view's encoder maps); ``None`` in eval mode
    """

    output_stride: ClassVar[int]
    backbone_module_names = ("backbone",)
    single_scale_checkpoint = SingleScaleCheckpoint("decode_head.", "head.", ("decode_head.scale_attention.",))
    """A single-scale checkpoint (DAFormer's ``backbone.*``, ``decode_head.*``) loads as backbone and shared decoder."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        scale_attention: nn.Module,
        num_classes: int,
        feature_dim: int,
        normalization: str | Normalization,
        detail_crop_size: Sequence[int] = (512, 512),
        context_scale: float = 0.5,
        crop_coord_divisible: int = 8,
        hr_loss_weight: float = 0.1,
        slide_detail: bool = True,
        slide_overlapping: bool = True,
    ) -> None:
        super().__init__(check_num_classes(num_classes), feature_dim, normalization)
        if len(detail_crop_size) != 2 or min(int(side) for side in detail_crop_size) < 1:
            raise ValueError(f"detail_crop_size must be two positive sides (h, w), got {detail_crop_size!r}")
        if not 0 < context_scale <= 1:
            raise ValueError(f"context_scale must be in (0, 1], got {context_scale}")
        if isinstance(crop_coord_divisible, bool) or not isinstance(crop_coord_divisible, int) or crop_coord_divisible < 1:
            raise ValueError(f"crop_coord_divisible must be a positive integer, got {crop_coord_divisible!r}")
        if not 0 <= hr_loss_weight < 1:
            raise ValueError(f"hr_loss_weight must be in [0, 1), got {hr_loss_weight}")
        self.backbone = backbone
        self.decode_head = HRDAHead(head, scale_attention)
        self.detail_crop_size = (int(detail_crop_size[0]), int(detail_crop_size[1]))
        self.context_scale = float(context_scale)
        self.crop_coord_divisible = crop_coord_divisible
        self.hr_loss_weight = float(hr_loss_weight)
        self.slide_detail = slide_detail
        self.slide_overlapping = slide_overlapping

    # ------------------------------------------------------------------ pieces

    def context_view(self, images: torch.Tensor) -> torch.Tensor:
        """The images bilinearly scaled by ``context_scale`` (the authors' ``resize`` with a scale factor)."""
        if self.context_scale == 1:
            return images
        return F.interpolate(images, scale_factor=self.context_scale, mode="bilinear", align_corners=False)

    def encode(self, images: torch.Tensor) -> Any:
        """The encoder's output for RGB images in ``[0, 1]`` at their own resolution (normalised inside)."""
        return self.backbone(self.normalize(images))

    def encode_context(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder maps of the context view, shallow to deep: what HRDA's feature distance compares (``feature_scale`` 0.5)."""
        encoded = self.encode(self.context_view(images))
        return list(encoded) if isinstance(encoded, (list, tuple)) else [encoded]

    def _head(self, encoded: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _logits_and_features(self.decode_head.head(encoded))

    def _fused_grid(self, context_logits: torch.Tensor) -> tuple[int, int]:
        scale = 1 / self.context_scale
        return math.floor(context_logits.shape[-2] * scale), math.floor(context_logits.shape[-1] * scale)

    def _output(
        self, context_logits: torch.Tensor, context_features: torch.Tensor | None, detail_on_grid: torch.Tensor, attention: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = fuse_scales(context_logits, detail_on_grid, attention, 1 / self.context_scale)
        features = context_logits if context_features is None else context_features
        return fused, _resize_to(features, fused.shape[-2:])

    # ------------------------------------------------------------------ forward

    def forward(self, images: torch.Tensor, detail_box: Box | None = None) -> SegOutput:
        """Training mode: one random detail crop (or ``detail_box``); eval mode: sliding detail inference."""
        check_input(images)
        if self.training:
            return self.forward_train(images, detail_box)
        return self.forward_inference(images)

    def forward_train(self, images: torch.Tensor, detail_box: Box | None = None) -> SegOutput:
        """The training forward: context view, one detail crop, attention 0 outside it (HRDA Eq. 4-5).

        The calls run in the authors' order (context encoder, detail encoder, shared decoder on
        the context, on the detail, attention decoder), so that random layers (dropout, drop-path)
        draw in the same sequence.
        """
        context_encoded = self.encode(self.context_view(images))
        box = detail_box
        if box is None:
            box = random_detail_box(images.shape[-2:], self.detail_crop_size, self.crop_coord_divisible)
        detail_encoded = self.encode(crop_box(images, box))
        context_logits, context_features = self._head(context_encoded)
        detail_logits, _ = self._head(detail_encoded)
        attention = self.decode_head.attention(context_encoded)
        # attention 0 outside the detail crop: there the fused output is the context prediction
        mask = torch.zeros_like(attention[:, :1])
        context_box = scale_box(box, self.output_stride / self.context_scale)
        mask[..., context_box[0] : context_box[1], context_box[2] : context_box[3]] = 1
        attention = attention * mask
        grid = self._fused_grid(context_logits)
        inserted = detail_logits.new_zeros(*detail_logits.shape[:2], *grid)
        y1, y2, x1, x2 = scale_box(box, self.output_stride)
        inserted[..., y1:y2, x1:x2] = _resize_to(detail_logits, (y2 - y1, x2 - x1))
        fused, features = self._output(context_logits, context_features, inserted, attention)
        maps = tuple(context_encoded) if isinstance(context_encoded, (list, tuple)) else (context_encoded,)
        detail = DetailOutput(detail_logits, box, (images.shape[-2], images.shape[-1]), self.hr_loss_weight, maps)
        return SegOutput(fused, features, None, detail)

    def forward_inference(self, images: torch.Tensor) -> SegOutput:
        """The inference forward: the detail branch over the whole input (sliding windows), attention unmasked."""
        context_encoded = self.encode(self.context_view(images))
        context_logits, context_features = self._head(context_encoded)
        grid = self._fused_grid(context_logits)
        if self.slide_detail:
            detail = self.slide_detail_logits(images, grid)
        else:
            detail = _resize_to(self._head(self.encode(images))[0], grid)
        attention = self.decode_head.attention(context_encoded)
        fused, features = self._output(context_logits, context_features, detail, attention)
        return SegOutput(fused, features)

    def slide_detail_logits(self, images: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """The detail branch's logits over the whole input: windows of ``detail_crop_size``, averaged where they overlap.

        The authors' ``hr_slide_inference``: all windows of the batch go through the encoder and
        decoder as one batch; each window's logits are added at its box divided by the stride and
        the sum divided by the count of windows per cell. ``grid`` is the fused output's size
        (``H / stride`` by default).

        Shape:
            - images: ``[N, 3, H, W]``; returns ``[N, C, *grid]``
        """
        batch = images.shape[0]
        height, width = images.shape[-2:]
        boxes = sliding_detail_boxes((height, width), self.detail_crop_size, self.slide_overlapping)
        crops = torch.cat([crop_box(images, box) for box in boxes])
        logits, _ = self._head(self.encode(crops))
        cells = [scale_box(box, self.output_stride) for box in boxes]
        size = (max(c[1] for c in cells), max(c[3] for c in cells))
        total = logits.new_zeros(batch, logits.shape[1], *size)
        count = logits.new_zeros(1, 1, *size)
        for index, (y1, y2, x1, x2) in enumerate(cells):
            window = _resize_to(logits[index * batch : (index + 1) * batch], (y2 - y1, x2 - x1))
            total[..., y1:y2, x1:x2] += window
            count[..., y1:y2, x1:x2] += 1
        averaged = total / count
        return averaged if grid is None else _resize_to(averaged, grid)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters (the base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Both decoders (``optim.head_lr_mult``; the authors' 10x on keys containing ``head``)."""
        return self.decode_head.parameters()


class HRDADAFormer(HRDASegmentor):
    """HRDA on DAFormer (the paper's network): MiT encoder, DAFormer decoder, a 1x1-fusion DAFormer attention decoder.

    Args:
        num_classes: output classes ``C``.
        encoder: ``mit_b0`` .. ``mit_b5`` (HRDA: ``mit_b5``).
        embed_dim: the decoder's embedding channels (256).
        attention_embed_dim: the attention decoder's (the authors' ``attention_embed_dim``, 256).
        attention_classwise: one attention map per class (True, HRDA) or one for all.
        dropout, drop_path_rate, normalization: as :class:`~segadapt.models.DAFormer`.
        detail_crop_size, context_scale, crop_coord_divisible, hr_loss_weight, slide_detail,
        slide_overlapping: as :class:`HRDASegmentor` (HRDA: 512 x 512, 0.5, 8, 0.1, True, True).

    Examples:
        >>> model = HRDADAFormer(5, encoder="mit_b0", embed_dim=16, attention_embed_dim=16, detail_crop_size=(32, 32)).eval()
        >>> tuple(model(torch.rand(1, 3, 64, 64)).logits.shape)
        (1, 5, 16, 16)
    """

    output_stride = 4

    def __init__(
        self,
        num_classes: int,
        encoder: str = "mit_b5",
        embed_dim: int = 256,
        attention_embed_dim: int = 256,
        attention_classwise: bool = True,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        normalization: str | Normalization = "imagenet",
        detail_crop_size: Sequence[int] = (512, 512),
        context_scale: float = 0.5,
        crop_coord_divisible: int = 8,
        hr_loss_weight: float = 0.1,
        slide_detail: bool = True,
        slide_overlapping: bool = True,
    ) -> None:
        check_num_classes(num_classes)
        for name, value in (("embed_dim", embed_dim), ("attention_embed_dim", attention_embed_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        backbone = MixTransformer(encoder, drop_path_rate=drop_path_rate)
        head = DAFormerHead(backbone.embed_dims, num_classes, embed_dim, dropout)
        attention = DAFormerHead(backbone.embed_dims, num_classes if attention_classwise else 1, attention_embed_dim, dropout, fusion="conv1x1")
        super().__init__(
            backbone, head, attention, num_classes, embed_dim, normalization, detail_crop_size, context_scale,
            crop_coord_divisible, hr_loss_weight, slide_detail, slide_overlapping,
        )  # fmt: skip
        self.encoder_name = encoder

    @property
    def backbone_format(self) -> BackboneFormat:
        """SegFormer's ImageNet file of the encoder (the same ``backbone.*`` keys as DAFormer's)."""
        return segformer_imagenet_format(self.encoder_name)


class _HRDADAFormerPreset(HRDADAFormer):
    """An HRDA-DAFormer with a fixed encoder: the registry's ``hrda_daformer_mitb*`` names."""

    preset_encoder: ClassVar[str]

    def __init__(
        self,
        num_classes: int,
        embed_dim: int = 256,
        attention_embed_dim: int = 256,
        attention_classwise: bool = True,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        normalization: str | Normalization = "imagenet",
        detail_crop_size: Sequence[int] = (512, 512),
        context_scale: float = 0.5,
        crop_coord_divisible: int = 8,
        hr_loss_weight: float = 0.1,
        slide_detail: bool = True,
        slide_overlapping: bool = True,
    ) -> None:
        super().__init__(
            num_classes, self.preset_encoder, embed_dim, attention_embed_dim, attention_classwise, dropout, drop_path_rate,
            normalization, detail_crop_size, context_scale, crop_coord_divisible, hr_loss_weight, slide_detail,
            slide_overlapping,
        )  # fmt: skip


class HRDADAFormerMiTB0(_HRDADAFormerPreset):
    """``hrda_daformer_mitb0``: HRDA on DAFormer with MiT-B0, the CPU-sized variant (the benchmark's)."""

    preset_encoder = "mit_b0"


class HRDADAFormerMiTB5(_HRDADAFormerPreset):
    """``hrda_daformer_mitb5``: HRDA on DAFormer with MiT-B5, the network of the HRDA and MIC(HRDA) papers."""

    preset_encoder = "mit_b5"


class DeepLabV2Trunk(nn.Module):
    """The dilated ResNet-101 of :class:`~segadapt.models.DeepLabV2` as one module: normalised images -> layer4 map."""

    def __init__(self, network: DeepLabV2) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = network.conv1, network.bn1, network.relu, network.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = network.layer1, network.layer2, network.layer3, network.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _torchvision_to_trunk_key(key: str) -> str | None:
    """A torchvision ResNet-101 key -> the HRDA DeepLab-V2 key (``backbone.`` + the DeepLab-V2 key)."""
    mapped = TORCHVISION_RESNET101.key_map(key)
    return None if mapped is None else f"backbone.{mapped}"


class HRDADeepLabV2(HRDASegmentor):
    """``hrda_deeplabv2_r101``: HRDA on segadapt's classic DeepLab-V2 ResNet-101 (HRDA Tab. 5's DeepLab-V2 rows).

    The decoder and the attention decoder are DeepLab-V2's ASPP classifiers (the authors' ``DLV2Head``
    for both). The encoder is segadapt's Caffe-style ResNet-101 (torchvision's ImageNet file loads
    into it), not the authors' mmseg ``ResNetV1c`` with its deep stem, so the authors' HRDA-DeepLab-V2
    checkpoints do not load (docs/hrda.md). Its output is not exactly ``input / 8`` (the ceil-mode
    max-pool), so the detail logits are resized onto their cells of the fused grid.

    Args:
        num_classes: output classes ``C``.
        aspp_branches: ``first_two_reference`` (the authors' ``deeplabv2red``: dilations 6 and 12
            only, HRDA's DeepLab-V2 setting) or ``all``.
        attention_classwise, normalization and the HRDA options: as :class:`HRDADAFormer` and
            :class:`~segadapt.models.DeepLabV2` (BatchNorm trains, as the authors' ``norm_eval=False``).
    """

    output_stride = 8

    def __init__(
        self,
        num_classes: int,
        aspp_branches: Literal["all", "first_two_reference"] = "first_two_reference",
        attention_classwise: bool = True,
        normalization: str | Normalization = "imagenet",
        detail_crop_size: Sequence[int] = (512, 512),
        context_scale: float = 0.5,
        crop_coord_divisible: int = 8,
        hr_loss_weight: float = 0.1,
        slide_detail: bool = True,
        slide_overlapping: bool = True,
    ) -> None:
        network = DeepLabV2(num_classes, normalization, aspp_branches)
        attention = ASPPClassifier(2048, num_classes if attention_classwise else 1, aspp_branches)
        for module in attention.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.01)  # as DeepLab-V2's own classifier
        super().__init__(
            DeepLabV2Trunk(network), network.layer5, attention, num_classes, 2048, normalization, detail_crop_size,
            context_scale, crop_coord_divisible, hr_loss_weight, slide_detail, slide_overlapping,
        )  # fmt: skip

    @property
    def backbone_format(self) -> BackboneFormat:
        """A torchvision-format ImageNet ResNet-101 (as ``deeplabv2_r101``), under ``backbone.``."""
        return BackboneFormat(TORCHVISION_RESNET101.name, TORCHVISION_RESNET101.file_hint, _torchvision_to_trunk_key)
