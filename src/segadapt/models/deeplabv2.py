"""DeepLab-V2 with a dilated Caffe-style ResNet-101, in the two layouts of the reference code.

Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
Convolution, and Fully Connected CRFs", TPAMI 2018, as re-implemented by AdaptSegNet and
reused by the papers this project reproduces (docs/reference_code.md, "Networks: Caffe-style
ResNet-101 backbone"):

- :class:`DeepLabV2` (registry name ``deeplabv2_r101``): the classic layout of
  AdaptSegNet/AdvSemiSeg/DARS. The classifier ``layer5`` is four dilated 3x3 convolutions
  (rates 6, 12, 18, 24) straight from the 2048-d backbone to the classes, summed (the
  paper's ASPP-L). Features = the layer4 output (2048-d).
- :class:`DeepLabV2ProDA` (``deeplabv2_r101_proda``): the ProDA/CPSL layout. ``layer5`` is
  ``Classifier_Module2``: five GroupNorm ASPP branches, an SE block, a 3x3 bottleneck to 256
  channels, then Dropout2d and a bias-free 1x1 classifier. Features = the 256-d embedding the
  classifier consumes.

Both have exactly the state-dict keys and shapes of the authors' checkpoints
(``tests/fixtures/parity/deeplabv2_*_state_dict_keys.txt``) and output stride 8: a 512x1024 input
gives a 65x129 map (:func:`deeplabv2_output_size`).
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from torch import nn

from ..errors import ConfigError
from .base import Normalization, SegmentationModel, SegOutput, check_input, check_num_classes
from .resnet import (
    RESNET101_BLOCKS,
    CaffeBottleneck,
    freeze_batch_norm_parameters,
    keep_batch_norm_in_eval,
    make_resnet_stage,
    resolve_freeze_bn,
)

BACKBONE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
"""Top-level modules holding the ResNet-101 backbone; their state-dict keys match torchvision's."""

ASPP_RATES = (6, 12, 18, 24)
ASPP_BRANCH_MODES = ("all", "first_two_reference")


def deeplabv2_output_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the logits and features for an input of ``height x width``.

    Three layers downsample: the 7x7/2 stem convolution (padding 3), the 3x3/2 max-pool with
    padding 1 and ``ceil_mode=True`` (this is where ``ceil`` comes from), and the strided 1x1
    convolution opening layer2. layer3/4 are dilated and keep the size.

    Examples:
        >>> deeplabv2_output_size(512, 1024)
        (65, 129)
        >>> deeplabv2_output_size(1024, 2048)
        (129, 257)
    """

    def one_side(size: int) -> int:
        size = (size - 1) // 2 + 1  # conv1: floor((n + 2*3 - 7) / 2) + 1
        size = -(-(size - 1) // 2) + 1  # maxpool: ceil((n + 2*1 - 3) / 2) + 1
        return (size - 1) // 2 + 1  # layer2's 1x1 stride-2 conv: floor((n - 1) / 2) + 1

    return one_side(height), one_side(width)


class ASPPClassifier(nn.Module):
    """The classic DeepLab-V2 classifier (ASPP-L): dilated 3x3 convolutions to the classes, summed.

    Args:
        in_channels: backbone channels (2048).
        num_classes: output classes ``C``.
        branches: ``"all"`` sums the four branches (the paper). ``"first_two_reference"``
            reproduces the AdaptSegNet/AdvSemiSeg/DARS code, whose ``return`` sits inside the
            loop so only the rate-6 and rate-12 branches are summed (docs/reference_code.md,
            "Networks: classic DeepLab-V2 head");
            the other two branches still exist, so checkpoints load either way.
    """

    def __init__(self, in_channels: int, num_classes: int, branches: str = "all") -> None:
        super().__init__()
        if branches not in ASPP_BRANCH_MODES:
            raise ConfigError(f"model.options.aspp_branches must be one of {ASPP_BRANCH_MODES}, got {branches!r}")
        self.branches = branches
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=rate, dilation=rate, bias=True)
            for rate in ASPP_RATES
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        used = self.conv2d_list if self.branches == "all" else self.conv2d_list[:2]
        logits = used[0](x)
        for conv in used[1:]:
            logits = logits + conv(x)
        return logits


class SEBlock(nn.Module):
    """Squeeze-and-excitation channel gating (Hu et al., CVPR 2018), reduction ``r``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.se = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.se(self.global_pool(x).flatten(1))
        return x * gate[:, :, None, None]


class ProDAClassifier(nn.Module):
    """ProDA/CPSL's ``Classifier_Module2``: GroupNorm ASPP, SE, 256-d bottleneck, dropout, 1x1 classifier.

    Returns ``(embedding, logits)``. The embedding is taken *after* ``Dropout2d(0.1)``, as the
    reference's ``feat`` (docs/reference_code.md, "Networks: ProDA/CPSL DeepLab-V2 head"): in
    training mode the prototypes and the self-labeling head see dropped-out channels; in eval mode
    dropout is the identity. There is no ReLU after the bottleneck's GroupNorm, so the embedding
    can be negative.

    Shape:
        - x: ``[N, 2048, h, w]``
        - embedding: ``[N, 256, h, w]``; logits: ``[N, C, h, w]``
    """

    embedding_dim = 256

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        dim = self.embedding_dim
        self.conv2d_list = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_channels, dim, kernel_size=1, bias=True), nn.GroupNorm(32, dim), nn.ReLU(inplace=True)
                )
            ]
            + [
                nn.Sequential(
                    nn.Conv2d(in_channels, dim, kernel_size=3, padding=rate, dilation=rate, bias=True),
                    nn.GroupNorm(32, dim),
                    nn.ReLU(inplace=True),
                )
                for rate in ASPP_RATES
            ]
        )
        concat_dim = dim * len(self.conv2d_list)
        self.bottleneck = nn.Sequential(
            SEBlock(concat_dim, reduction=16),
            nn.Conv2d(concat_dim, dim, kernel_size=3, padding=1, bias=True),
            nn.GroupNorm(32, dim),
        )
        self.head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(dim, num_classes, kernel_size=1, bias=False))
        bottleneck_conv = self.bottleneck[1]
        assert isinstance(bottleneck_conv, nn.Conv2d) and bottleneck_conv.bias is not None  # built just above
        nn.init.zeros_(bottleneck_conv.bias)  # the reference zeroes it; the other conv biases keep PyTorch's init

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        concatenated = torch.cat([branch(x) for branch in self.conv2d_list], dim=1)
        embedding = self.head[0](self.bottleneck(concatenated))
        return embedding, self.head[1](embedding)


class DeepLabV2ResNet101(SegmentationModel):
    """The shared trunk: input normalisation, dilated Caffe-style ResNet-101 (output stride 8), ``layer5`` head.

    Subclasses build the head. The backbone modules sit at the top level (``conv1``, ``bn1``,
    ``layer1``..``layer4``) so that the state-dict keys are those of the authors' checkpoints
    and of torchvision's ResNet-101; the normaliser has no state-dict entries.

    ``freeze_bn``:
        - ``"none"``: batch norm trains normally.
        - ``"affine"``: BN weights and biases get no gradient, running statistics still update
          in train mode. This is what the references do (ProDA/CPSL ``--freeze_bn``, DARS, DASS).
        - ``"all"``: also keeps every BN layer in eval mode, so the running statistics stay
          those of the loaded weights (useful with 1-2 images per device).
    """

    output_stride = 8
    backbone_module_names = BACKBONE_MODULES

    def __init__(
        self, head: nn.Module, num_classes: int, feature_dim: int, normalization: str | Normalization, freeze_bn: str
    ) -> None:
        super().__init__(num_classes, feature_dim, normalization)
        self.freeze_bn = resolve_freeze_bn(freeze_bn)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, affine=True)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = make_resnet_stage(CaffeBottleneck, 64, 64, RESNET101_BLOCKS[0])
        self.layer2 = make_resnet_stage(CaffeBottleneck, 256, 128, RESNET101_BLOCKS[1], stride=2)
        self.layer3 = make_resnet_stage(CaffeBottleneck, 512, 256, RESNET101_BLOCKS[2], dilation=2)
        self.layer4 = make_resnet_stage(CaffeBottleneck, 1024, 512, RESNET101_BLOCKS[3], dilation=4)
        self.layer5 = head
        # The references re-initialise every convolution, head included, after building it.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.01)

    def forward_backbone(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised input -> layer4 output ``[N, 2048, h, w]`` at output stride 8."""
        check_input(images)
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(images)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """ResNet-101 parameters (the base learning rate)."""
        for name in self.backbone_module_names:
            yield from getattr(self, name).parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Everything after the backbone (the references' 10x learning rate)."""
        for name, module in self.named_children():
            if name not in self.backbone_module_names:
                yield from module.parameters()

    def _apply_freeze_bn(self) -> None:
        if self.freeze_bn == "none":
            return
        freeze_batch_norm_parameters(self, self.freeze_bn)
        self.train(self.training)

    def train(self, mode: bool = True) -> DeepLabV2ResNet101:
        super().train(mode)
        keep_batch_norm_in_eval(self, self.freeze_bn)
        return self


class DeepLabV2(DeepLabV2ResNet101):
    """Classic DeepLab-V2 ResNet-101 (AdaptSegNet/AdvSemiSeg/DARS layout, 632 state-dict keys for 19 classes).

    Args:
        num_classes: output classes ``C``.
        normalization: input normalisation preset or :class:`Normalization`; ``"imagenet"``
            as DARS (torchvision ImageNet weights), ``"caffe"`` for AdaptSegNet/DASS weights.
        aspp_branches: ``"all"`` (the paper) or ``"first_two_reference"`` (the reference
            code's early-return bug, see :class:`ASPPClassifier`).
        freeze_bn: ``"none"``, ``"affine"`` or ``"all"`` (see :class:`DeepLabV2ResNet101`).

    Shape:
        - input: ``[N, 3, H, W]`` RGB in ``[0, 1]``
        - logits: ``[N, C, h, w]``, features: ``[N, 2048, h, w]`` (the layer4 output the
          classifier reads), with ``(h, w) = deeplabv2_output_size(H, W)``

    Examples:
        >>> model = DeepLabV2(num_classes=19).eval()
        >>> out = model(torch.rand(1, 3, 65, 65))
        >>> tuple(out.logits.shape), tuple(out.features.shape)
        ((1, 19, 9, 9), (1, 2048, 9, 9))
    """

    def __init__(
        self,
        num_classes: int,
        normalization: str | Normalization = "imagenet",
        aspp_branches: Literal["all", "first_two_reference"] = "all",
        freeze_bn: Literal["none", "affine", "all"] = "none",
    ) -> None:
        head = ASPPClassifier(2048, check_num_classes(num_classes), aspp_branches)
        super().__init__(head, num_classes, 2048, normalization, freeze_bn)
        self._apply_freeze_bn()

    def forward(self, images: torch.Tensor) -> SegOutput:
        features = self.forward_backbone(images)
        return SegOutput(self.layer5(features), features)


class DeepLabV2ProDA(DeepLabV2ResNet101):
    """DeepLab-V2 ResNet-101 with the ProDA/CPSL head (653 state-dict keys for 19 classes; 658 with ``bn_clr``).

    Args:
        num_classes: output classes ``C``.
        normalization: ``"proda"`` by default (RGB in ``[0, 1]``, no mean or std: ProDA/CPSL
            feed ``img / 255`` although the backbone starts from torchvision ImageNet weights).
        bn_clr: add ``bn_pretrain``, a BatchNorm after layer4, as the references do for
            students initialised from SimCLRv2 weights (CPSL stages 2-3, ``--bn_clr``); it
            belongs to the head parameter group (10x learning rate), as there.
        freeze_bn: ``"none"``, ``"affine"`` or ``"all"`` (see :class:`DeepLabV2ResNet101`).

    Shape:
        - input: ``[N, 3, H, W]`` RGB in ``[0, 1]``
        - logits: ``[N, C, h, w]``; features: ``[N, 256, h, w]``, the embedding the classifier
          consumes, after ``Dropout2d(0.1)`` as the reference's ``feat`` (so it is stochastic in
          train mode); ``(h, w) = deeplabv2_output_size(H, W)``

    Examples:
        >>> model = DeepLabV2ProDA(num_classes=19).eval()
        >>> out = model(torch.rand(1, 3, 65, 65))
        >>> tuple(out.logits.shape), tuple(out.features.shape)
        ((1, 19, 9, 9), (1, 256, 9, 9))
    """

    def __init__(
        self,
        num_classes: int,
        normalization: str | Normalization = "proda",
        bn_clr: bool = False,
        freeze_bn: Literal["none", "affine", "all"] = "none",
    ) -> None:
        head = ProDAClassifier(2048, check_num_classes(num_classes))
        super().__init__(head, num_classes, head.embedding_dim, normalization, freeze_bn)
        self.bn_pretrain = nn.BatchNorm2d(2048, affine=True) if bn_clr else None
        self._apply_freeze_bn()

    def forward(self, images: torch.Tensor) -> SegOutput:
        x = self.forward_backbone(images)
        if self.bn_pretrain is not None:
            x = self.bn_pretrain(x)
        features, logits = self.layer5(x)
        return SegOutput(logits, features)
