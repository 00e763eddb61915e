"""A small, fast segmentation network for CPU runs, the embedded benchmark and tests.

:class:`SmallSegNet` keeps the model contract of the big networks (``SegOutput`` with logits
and a ``D``-dimensional feature map, input normalisation inside the model, a backbone/head
split for the head learning-rate multiplier) at a cost of a few hundred MFLOPs per 96x192
image, so the benchmark demo trains in minutes on two CPU cores.

Its layout is a miniature DeepLab-V3+: a three-stage encoder to output stride 8, a context
module (two dilated convolutions and a pyramid-pooling branch, as in PSPNet, Zhao et al.
CVPR'17) so that a pixel's class can depend on the scene layout around it, and a decoder
that fuses the context with the stride-4 encoder features.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Normalization, SegmentationModel, SegOutput, check_input


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution (padding keeps the size at stride 1), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """Average-pool the map to a few grid sizes, project, upsample and concatenate (PSPNet).

    The pooled branches have no batch norm: a 1x1 pooled map with batch size 1 has a single
    value per channel, which batch norm cannot normalise in training mode.
    """

    def __init__(self, channels: int, branch_channels: int, bins: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        self.bins = bins
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, branch_channels, 1), nn.ReLU(inplace=True)) for _ in bins
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(channels + branch_channels * len(bins), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(F.adaptive_avg_pool2d(x, bin_size)), size=size, mode="bilinear", align_corners=False)
            for bin_size, branch in zip(self.bins, self.branches)
        ]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class SmallSegNet(SegmentationModel):
    """A miniature encoder-decoder with dilated and pyramid-pooled context; output stride 4.

    Args:
        num_classes: number of output classes ``C``.
        feature_dim: channels ``D`` of the returned feature map (the embedding used by
            prototype and clustering methods).
        width: channels of the first stage; later stages use ``2 * width`` and ``4 * width``.
        normalization: a :class:`Normalization` or a preset name (``imagenet``, ``proda``,
            ``caffe``); applied inside the model to RGB input in ``[0, 1]``.
        embedding: ``signed`` (default): the feature map is the decoder's batch-norm output,
            with no ReLU after it, like the ProDA/CPSL DeepLab-V2 head's GroupNorm bottleneck, so
            cosine similarities between pixel features span ``[-1, 1]`` (CPSL's Sinkhorn scores and
            Eq. 7 prototypes, BiCL's label transfer work on them). ``relu``: a ReLU after it, as
            before 2026-12-02 (about half of the features exactly 0, cosines never negative); the
            state-dict keys are the same either way.

    Shape:
        - input: ``[N, 3, H, W]`` RGB in ``[0, 1]``
        - logits: ``[N, C, ceil(H / 4), ceil(W / 4)]`` (exactly ``H/4 x W/4`` when ``H`` and
          ``W`` are multiples of 8; the caller upsamples)
        - features: ``[N, D, ceil(H / 4), ceil(W / 4)]``
        - aux_logits: always ``None`` (no auxiliary head; ``aux_weight`` is 0)

    Examples:
        >>> model = SmallSegNet(num_classes=19).eval()
        >>> out = model(torch.rand(2, 3, 96, 192))
        >>> tuple(out.logits.shape), tuple(out.features.shape)
        ((2, 19, 24, 48), (2, 64, 24, 48))
    """

    output_stride = 4

    def __init__(
        self,
        num_classes: int,
        feature_dim: int = 64,
        width: int = 32,
        normalization: str | Normalization = "imagenet",
        embedding: Literal["signed", "relu"] = "signed",
    ) -> None:
        if embedding not in ("signed", "relu"):
            raise ValueError(f"embedding must be 'signed' or 'relu', got {embedding!r}")
        if num_classes < 1 or feature_dim < 1 or width < 1:
            raise ValueError(
                f"num_classes, feature_dim and width must be positive, got {num_classes}, {feature_dim}, {width}"
            )
        super().__init__(num_classes, feature_dim, normalization)
        self.stem = nn.Sequential(conv_bn_relu(3, width, stride=2), conv_bn_relu(width, width))
        self.stage4 = nn.Sequential(conv_bn_relu(width, 2 * width, stride=2), conv_bn_relu(2 * width, 2 * width))
        self.stage8 = nn.Sequential(conv_bn_relu(2 * width, 4 * width, stride=2), conv_bn_relu(4 * width, 4 * width))
        self.context = nn.Sequential(
            conv_bn_relu(4 * width, 4 * width, dilation=2),
            conv_bn_relu(4 * width, 4 * width, dilation=4),
            PyramidPooling(4 * width, width),
        )
        self.decoder = conv_bn_relu(4 * width + 2 * width, feature_dim)
        if embedding == "signed":
            del self.decoder[2]  # keeps the keys decoder.0 (conv) and decoder.1 (batch norm)
        self.embedding = embedding
        self.classifier = nn.Conv2d(feature_dim, num_classes, 1)

    def forward(self, images: torch.Tensor) -> SegOutput:
        check_input(images)
        x = self.normalize(images)
        stride4 = self.stage4(self.stem(x))
        context = self.context(self.stage8(stride4))
        context = F.interpolate(context, size=stride4.shape[-2:], mode="bilinear", align_corners=False)
        features = self.decoder(torch.cat([context, stride4], dim=1))
        return SegOutput(self.classifier(features), features)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters (the base learning rate)."""
        for module in (self.stem, self.stage4, self.stage8):
            yield from module.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Context module, decoder and classifier (the engine's head learning-rate multiplier)."""
        for module in (self.context, self.decoder, self.classifier):
            yield from module.parameters()
