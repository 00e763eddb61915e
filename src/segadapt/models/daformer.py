"""DAFormer: a Mix Transformer encoder with a context-aware multi-level fusion decoder.

Hoyer et al., "DAFormer: Improving Network Architectures and Training Strategies for
Domain-Adaptive Semantic Segmentation", CVPR 2022, Sec. 3.2 and Fig. 3. The encoder is
SegFormer's MiT (:mod:`segadapt.models.mit`; MiT-B5 in the paper). The decoder
(:class:`DAFormerHead`) differs from SegFormer's all-MLP head in how it fuses the levels:

1. each of the four encoder maps is embedded to ``embed_dim`` channels by a per-pixel linear
   layer and upsampled bilinearly to the stride-4 map;
2. the concatenated embeddings (``4 * embed_dim`` channels) go through a depth-wise separable
   ASPP without image pooling: a 1x1 branch and three 3x3 branches dilated by 6, 12 and 18,
   so that the fusion itself sees context at several scales, not only the deep levels;
3. a 3x3 bottleneck convolution fuses the four branches back to ``embed_dim`` channels;
   ``Dropout2d(0.1)`` and a 1x1 classifier give the logits.

The module names and parameter shapes are those of DAFormer's mmseg ``EncoderDecoder``
(``backbone.*``, ``decode_head.*``; tests/fixtures/parity/daformer_mitb5_state_dict_keys.txt),
so its checkpoints and SegFormer's ImageNet encoder files load with the functions of
:mod:`segadapt.models.weights`.
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Literal, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import EncoderDecoder, Normalization, SegmentationModel, SegOutput, check_input, check_num_classes
from .mit import MixTransformer
from .weights import BackboneFormat, segformer_imagenet_format

ASPP_DILATIONS = (1, 6, 12, 18)
"""Dilations of the fusion ASPP's branches (DAFormer's ``fusion_cfg``); dilation 1 is a 1x1 convolution."""


class ConvBNReLU(nn.Module):
    """Convolution without bias, BatchNorm, ReLU (mmcv's ``ConvModule`` with BN and ReLU: ``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SeparableConvBNReLU(nn.Module):
    """A depth-wise 3x3 ``ConvBNReLU`` (dilated) followed by a point-wise 1x1 ``ConvBNReLU``."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_channels, in_channels, 3, dilation=dilation, groups=in_channels)
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class SeparableASPPFusion(nn.Module):
    """DAFormer's context-aware fusion: separable ASPP branches (no image pooling), concatenated, 3x3 bottleneck.

    Branch ``i`` is a 1x1 ``ConvBNReLU`` for dilation 1 and a :class:`SeparableConvBNReLU`
    otherwise; every branch keeps the spatial size.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if dilation == 1 else SeparableConvBNReLU(in_channels, channels, dilation)
            for dilation in dilations
        )
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class LinearEmbedding(nn.Module):
    """A per-pixel linear layer (``proj``) from ``in_channels`` to ``embed_dim``, on a ``[N, C, h, w]`` map."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DAFormerHead(nn.Module):
    """DAFormer's decoder: multi-level embeddings fused with context (Hoyer et al., DAFormer, CVPR 2022, Fig. 3).

    Args:
        in_channels: channels of the encoder maps, shallow to deep.
        num_classes: output classes ``C``.
        embed_dim: ``D``, the channels of each level's embedding and of the fused map (256).
        dropout: ``Dropout2d`` probability before the classifier (0.1).
        fusion: ``aspp``, DAFormer's context-aware fusion (:class:`SeparableASPPFusion`), or
            ``conv1x1``, a 1x1 ``ConvBNReLU`` from the concatenated embeddings to ``embed_dim``
            (``fuse_layer.conv``, ``fuse_layer.bn``): what HRDA's scale-attention head uses in
            place of the ASPP (its ``HRDAHead`` swaps an ``aspp`` fusion for a 1x1 convolution).

    Shape:
        - input: maps ``[N, in_channels[i], h_i, w_i]``, the first at the output size
        - output: :class:`SegOutput` with logits ``[N, C, h_1, w_1]`` and features
          ``[N, D, h_1, w_1]`` (the fused map, before the dropout)

    Examples:
        >>> head = DAFormerHead((8, 16), num_classes=3, embed_dim=4).eval()
        >>> out = head([torch.rand(1, 8, 10, 12), torch.rand(1, 16, 5, 6)])
        >>> tuple(out.logits.shape), tuple(out.features.shape)
        ((1, 3, 10, 12), (1, 4, 10, 12))
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = 256,
        dropout: float = 0.1,
        fusion: Literal["aspp", "conv1x1"] = "aspp",
    ) -> None:
        super().__init__()
        self.embed_layers = nn.ModuleList(LinearEmbedding(channels, embed_dim) for channels in in_channels)
        concatenated = len(in_channels) * embed_dim
        if fusion == "aspp":
            self.fuse_layer: nn.Module = SeparableASPPFusion(concatenated, embed_dim)
        elif fusion == "conv1x1":
            self.fuse_layer = ConvBNReLU(concatenated, embed_dim, 1)
        else:
            raise ValueError(f"DAFormerHead fusion must be 'aspp' or 'conv1x1', got {fusion!r}")
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)  # mmseg BaseDecodeHead
        nn.init.zeros_(cast(torch.Tensor, self.conv_seg.bias))

    def forward(self, features: Sequence[torch.Tensor]) -> SegOutput:
        if len(features) != len(self.embed_layers):
            raise ValueError(f"DAFormerHead expects {len(self.embed_layers)} feature maps, got {len(features)}")
        size = features[0].shape[-2:]
        embedded = [self._embed(embed, x, size) for embed, x in zip(self.embed_layers, features)]
        fused = self.fuse_layer(torch.cat(embedded, dim=1))
        return SegOutput(self.conv_seg(self.dropout(fused)), fused)

    @staticmethod
    def _embed(embed: nn.Module, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """One level's embedding, upsampled bilinearly to ``size`` unless already there."""
        x = embed(x)
        if x.shape[-2:] == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DAFormer(SegmentationModel, EncoderDecoder):
    """DAFormer (Hoyer et al., DAFormer, CVPR 2022): a MiT encoder and the context-aware fusion decoder.

    ``forward(images) = decode(encode(images))``: :meth:`encode` normalises the images and
    returns the encoder's four maps (what DAFormer's ImageNet feature distance compares),
    :meth:`decode` runs :class:`DAFormerHead` on them.

    Args:
        num_classes: output classes ``C``.
        encoder: the Mix Transformer, ``mit_b0`` .. ``mit_b5`` (the paper: ``mit_b5``).
        embed_dim: ``D``, the decoder's embedding and fused channels (256 in DAFormer; lower
            it on a CPU, where the 3x3 bottleneck on ``4 * D`` channels at stride 4 dominates).
        dropout: ``Dropout2d`` probability before the classifier (0.1).
        drop_path_rate: the encoder's stochastic-depth rate at its last block (0.1).
        normalization: a :class:`Normalization` or a preset name; ``imagenet`` (the default)
            is DAFormer's mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on
            0-255 RGB, i.e. (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225) on ``[0, 1]``.

    Attributes:
        backbone: the :class:`~segadapt.models.mit.MixTransformer` (base learning rate).
        decode_head: the :class:`DAFormerHead` (the head learning-rate multiplier).

    Shape:
        - input: ``[N, 3, H, W]`` RGB in ``[0, 1]``, sides of at least 29 pixels
        - logits: ``[N, C, ceil(H / 4), ceil(W / 4)]``
        - features: ``[N, D, ceil(H / 4), ceil(W / 4)]``, the fused map the classifier reads
          (before its dropout)
        - aux_logits: always ``None``

    Examples:
        >>> model = DAFormer(num_classes=19, encoder="mit_b0", embed_dim=32).eval()
        >>> out = model(torch.rand(1, 3, 64, 97))
        >>> tuple(out.logits.shape), tuple(out.features.shape), out.aux_logits
        ((1, 19, 16, 25), (1, 32, 16, 25), None)
        >>> [f.shape[1] for f in model.encode(torch.rand(1, 3, 64, 64))]
        [32, 64, 160, 256]
    """

    output_stride = 4
    backbone_module_names = ("backbone",)

    def __init__(
        self,
        num_classes: int,
        encoder: str = "mit_b5",
        embed_dim: int = 256,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        normalization: str | Normalization = "imagenet",
    ) -> None:
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}")
        super().__init__(check_num_classes(num_classes), embed_dim, normalization)
        self.encoder_name = encoder
        self.backbone = MixTransformer(encoder, drop_path_rate=drop_path_rate)
        self.decode_head = DAFormerHead(self.backbone.embed_dims, self.num_classes, embed_dim, dropout)

    @property
    def backbone_format(self) -> BackboneFormat:
        """SegFormer's ImageNet file of this encoder (``model.pretrained``; :func:`~segadapt.models.weights.segformer_imagenet_format`)."""
        return segformer_imagenet_format(self.encoder_name)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four encoder maps (strides 4, 8, 16, 32) from RGB images in ``[0, 1]``."""
        check_input(images)
        return self.backbone(self.normalize(images))

    def decode(self, features: list[torch.Tensor]) -> SegOutput:
        """:class:`SegOutput` at stride 4 from :meth:`encode`'s maps."""
        return self.decode_head(features)

    def forward(self, images: torch.Tensor) -> SegOutput:
        check_input(images)
        return self.decode(self.encode(images))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The Mix Transformer's parameters (the base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The decoder's parameters (``optim.head_lr_mult``; DAFormer trains its head at 10x)."""
        return self.decode_head.parameters()


class _DAFormerPreset(DAFormer):
    """A DAFormer with a fixed encoder: the registry's ``daformer_mitb*`` names (no ``encoder`` option)."""

    preset_encoder: ClassVar[str]

    def __init__(
        self,
        num_classes: int,
        embed_dim: int = 256,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        normalization: str | Normalization = "imagenet",
    ) -> None:
        super().__init__(num_classes, self.preset_encoder, embed_dim, dropout, drop_path_rate, normalization)


class DAFormerMiTB0(_DAFormerPreset):
    """``daformer_mitb0``: DAFormer on MiT-B0 (3.3 M encoder parameters), the CPU-sized variant."""

    preset_encoder = "mit_b0"


class DAFormerMiTB1(_DAFormerPreset):
    """``daformer_mitb1``: DAFormer on MiT-B1."""

    preset_encoder = "mit_b1"


class DAFormerMiTB2(_DAFormerPreset):
    """``daformer_mitb2``: DAFormer on MiT-B2."""

    preset_encoder = "mit_b2"


class DAFormerMiTB3(_DAFormerPreset):
    """``daformer_mitb3``: DAFormer on MiT-B3."""

    preset_encoder = "mit_b3"


class DAFormerMiTB4(_DAFormerPreset):
    """``daformer_mitb4``: DAFormer on MiT-B4."""

    preset_encoder = "mit_b4"


class DAFormerMiTB5(_DAFormerPreset):
    """``daformer_mitb5``: DAFormer on MiT-B5, the network of the paper."""

    preset_encoder = "mit_b5"
