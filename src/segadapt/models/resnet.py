"""ResNet building blocks shared by the DeepLab-V2 and PSPNet models.

Two bottleneck layouts appear in the reference code, with the same module names and
parameter shapes (so the same state-dict keys) but a different place for the stride:

- :class:`CaffeBottleneck`: the stride sits on the first 1x1 convolution, as in the original
  Caffe ResNets that DeepLab-V2 (AdaptSegNet, ProDA, CPSL, DARS's DeepLab) keeps;
- :class:`Bottleneck`: torchvision's "ResNet V1.5", the stride (and dilation) on the 3x3
  convolution, as in semseg's ResNet-50 that PSPNet (DARS) uses.

:func:`make_resnet_stage` builds one stage of either, :func:`deep_stem` semseg's three-convolution
stem, and the ``freeze_bn`` helpers implement the option both model families share.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from .checkpointing import CheckpointableBlocks, run_block

RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET101_BLOCKS = (3, 4, 23, 3)
FREEZE_BN_MODES = ("none", "affine", "all")

FreezeBN = Literal["none", "affine", "all"]


class CaffeBottleneck(nn.Module):
    """Caffe-style ResNet bottleneck: the stride sits on the first 1x1 convolution, not the 3x3.

    This is the layout of the original DeepLab/ResNet Caffe models kept by every DeepLab-V2
    reference (torchvision's "ResNet V1.5", :class:`Bottleneck`, strides the 3x3 instead;
    parameter names and shapes are the same, which is why the references load torchvision
    weights into this layout).

    Shape:
        - x: ``[N, in_channels, H, W]``
        - output: ``[N, 4 * planes, ceil(H / stride), ceil(W / stride)]``

    Examples:
        >>> block = CaffeBottleneck(64, 16, stride=2, downsample=nn.Conv2d(64, 64, 1, stride=2))
        >>> tuple(block(torch.rand(1, 64, 9, 9)).shape)
        (1, 64, 5, 5)
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, affine=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, affine=True)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, affine=True)
        self.relu = nn.ReLU(inplace=True)
        # Registered last so the state-dict order matches the references (downsample after bn3).
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """torchvision-style ResNet bottleneck ("V1.5"): the stride and dilation sit on the 3x3 convolution.

    This differs from :class:`CaffeBottleneck` of the DeepLab-V2 models, which strides the
    first 1x1; semseg's ImageNet weights (PSPNet-50) were trained with this layout.

    Shape:
        - x: ``[N, in_channels, H, W]``
        - output: ``[N, 4 * planes, ceil(H / stride), ceil(W / stride)]``

    Examples:
        >>> block = Bottleneck(64, 16, stride=2, downsample=nn.Conv2d(64, 64, 1, stride=2))
        >>> tuple(block(torch.rand(1, 64, 9, 9)).shape)
        (1, 64, 5, 5)
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNetStage(nn.Sequential, CheckpointableBlocks):
    """One ResNet stage: its bottlenecks in order (an ``nn.Sequential``, same state-dict keys).

    With ``activation_checkpointing`` on, each bottleneck is recomputed in backward
    (:mod:`segadapt.models.checkpointing`; BatchNorm's running statistics are updated once).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = run_block(block, x, checkpointed=self.activation_checkpointing)
        return x

    def checkpointable_blocks(self) -> int:
        return len(self)


def make_resnet_stage(
    block: type[CaffeBottleneck | Bottleneck],
    in_channels: int,
    planes: int,
    blocks: int,
    stride: int = 1,
    dilation: int = 1,
) -> ResNetStage:
    """One ResNet stage of ``blocks`` bottlenecks; its first block always gets a projection shortcut.

    The references create the projection whenever the stride, width or dilation changes;
    for ResNet-50/101 that is the first block of every stage, as in torchvision. Every block
    of the stage gets ``dilation``, the first one included: semseg builds layer3/4 strided and
    then sets ``dilation = padding = 2`` (4) and ``stride = 1`` on *every* block's 3x3
    convolution (torchvision's ``replace_stride_with_dilation`` would keep the previous
    dilation there), and the DeepLab-V2 references build it this way directly.

    Args:
        block: :class:`CaffeBottleneck` (DeepLab-V2) or :class:`Bottleneck` (PSPNet).
        in_channels: channels entering the stage.
        planes: bottleneck width; the stage outputs ``4 * planes`` channels.
        blocks: number of bottlenecks.
        stride: stride of the first block (and of its projection shortcut).
        dilation: dilation of every block's 3x3 convolution.

    Shape:
        - x: ``[N, in_channels, H, W]`` -> ``[N, 4 * planes, ceil(H / stride), ceil(W / stride)]``

    Examples:
        >>> stage = make_resnet_stage(Bottleneck, 64, 16, blocks=2, stride=2)
        >>> tuple(stage(torch.rand(1, 64, 8, 8)).shape)
        (1, 64, 4, 4)
    """
    out_channels = planes * block.expansion
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels, affine=True),
    )
    layers = [block(in_channels, planes, stride, dilation, downsample)]
    layers += [block(out_channels, planes, dilation=dilation) for _ in range(1, blocks)]
    return ResNetStage(*layers)


def deep_stem() -> nn.Sequential:
    """semseg's ``layer0``: three 3x3 conv-BN-ReLU (3->64 stride 2, 64->64, 64->128), then a 3x3/2 max-pool.

    Shape:
        - x: ``[N, 3, H, W]`` -> ``[N, 128, ceil(H / 4), ceil(W / 4)]``

    Examples:
        >>> tuple(deep_stem()(torch.rand(1, 3, 17, 17)).shape)
        (1, 128, 5, 5)
    """
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


# ------------------------------------------------------------------------------------ freeze_bn


def resolve_freeze_bn(freeze_bn: str) -> FreezeBN:
    """Validate the ``freeze_bn`` option: ``"none"``, ``"affine"`` or ``"all"``.

    - ``"none"``: batch norm trains normally.
    - ``"affine"``: BN weights and biases get no gradient, running statistics still update
      in train mode. This is what the references do (ProDA/CPSL ``--freeze_bn``, DARS, DASS).
    - ``"all"``: also keeps every BN layer in eval mode, so the running statistics stay
      those of the loaded weights (useful with 1-2 images per device).

    Raises:
        ConfigError: another value; a boolean gets a hint on the two readings of ``--freeze_bn``.

    Examples:
        >>> resolve_freeze_bn("affine")
        'affine'
    """
    if freeze_bn not in FREEZE_BN_MODES:
        hint = ""
        if isinstance(freeze_bn, bool):
            hint = (
                "; a boolean is ambiguous: the authors' --freeze_bn is 'affine' (running statistics still update),"
                " 'all' also keeps the statistics fixed"
            )
        raise ConfigError(f"model.options.freeze_bn must be one of {FREEZE_BN_MODES}, got {freeze_bn!r}{hint}")
    return freeze_bn  # type: ignore[return-value]


def freeze_batch_norm_parameters(model: nn.Module, freeze_bn: FreezeBN) -> None:
    """Stop gradients to every batch norm's weight and bias unless ``freeze_bn`` is ``"none"``."""
    if freeze_bn == "none":
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)


def keep_batch_norm_in_eval(model: nn.Module, freeze_bn: FreezeBN) -> None:
    """With ``freeze_bn="all"``, put every batch norm back in eval mode (call after ``train()``)."""
    if freeze_bn == "all":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
