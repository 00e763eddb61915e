"""PSPNet-50: the main network of the DARS papers.

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, in the implementation of the
semseg repository that DARS (ICCV 2021) vendors as ``model/pspnet.py`` and ``model/resnet.py``
(docs/reference_code.md, "Networks: PSPNet-50"):

- a ResNet-50 with the **deep stem** (``deep_base=True``: three 3x3 convolutions 3->64->64->128
  in place of the 7x7 one) and torchvision's bottleneck (the stride sits on the 3x3
  convolution), layer3 and layer4 dilated by 2 and 4 instead of strided: output stride 8;
- the pyramid pooling module: average pooling to 1x1, 2x2, 3x3 and 6x6 grids, each projected
  to 512 channels (1x1 conv, BN, ReLU) and upsampled back, concatenated with the 2048-d map
  (4096 channels);
- ``cls``: 3x3 conv 4096->512, BN, ReLU, Dropout2d(0.1), 1x1 classifier;
- ``aux``: the auxiliary head on layer3 (3x3 conv 1024->256, BN, ReLU, Dropout2d(0.1), 1x1
  classifier), whose cross-entropy is added with weight 0.4 in training only.

The state-dict keys are those of the semseg/DARS checkpoints (``layer0.0`` = conv1,
``layer0.1`` = bn1, ``layer0.3``/``.4`` = conv2/bn2, ``layer0.6``/``.7`` = conv3/bn3, then
``layer1``..``layer4``, ``ppm.features.{i}``, ``cls``, ``aux``), so their
``{'state_dict': ...}`` files load with :func:`~segadapt.models.weights.load_checkpoint_weights`.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Normalization, SegmentationModel, SegOutput, check_input, check_num_classes
from .resnet import (
    RESNET50_BLOCKS,
    Bottleneck,
    deep_stem,
    freeze_batch_norm_parameters,
    keep_batch_norm_in_eval,
    make_resnet_stage,
    resolve_freeze_bn,
)
from .weights import BackboneFormat

PPM_BINS = (1, 2, 3, 6)
HEAD_DROPOUT = 0.1
AUX_LOSS_WEIGHT = 0.4

SEMSEG_STEM_KEYS = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4",
                    "conv3": "layer0.6", "bn3": "layer0.7"}
"""Deep-stem modules of the semseg ImageNet ResNet (``resnet50_v2.pth``) -> their place in ``layer0``."""


def semseg_resnet_to_pspnet_key(key: str) -> str | None:
    """The PSPNet key receiving a tensor of semseg's deep-stem ImageNet ResNet-50, or ``None`` to drop it.

    semseg's ``ResNet(deep_base=True)`` keeps the stem at the top level (``conv1``, ``bn1``,
    ``conv2``, ...); PSPNet wraps it in the ``layer0`` Sequential, where the ReLUs take the
    indices 2, 5 and 8. ``layer1``..``layer4`` keep their names; the ImageNet classifier
    ``fc.*`` is dropped.

    Examples:
        >>> semseg_resnet_to_pspnet_key("bn2.running_mean")
        'layer0.4.running_mean'
        >>> semseg_resnet_to_pspnet_key("layer3.5.conv2.weight")
        'layer3.5.conv2.weight'
        >>> semseg_resnet_to_pspnet_key("fc.weight") is None
        True
    """
    module, _, rest = key.partition(".")
    if module == "fc":
        return None
    if module in SEMSEG_STEM_KEYS:
        return f"{SEMSEG_STEM_KEYS[module]}.{rest}"
    return key


SEMSEG_RESNET50 = BackboneFormat(
    name="deep-stem ResNet-50",
    file_hint="the semseg/DARS deep-stem ImageNet ResNet-50 file resnet50_v2.pth (docs/models.md)",
    key_map=semseg_resnet_to_pspnet_key,
)


def pspnet_output_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the logits and features for an input of ``height x width``: ``ceil(H/8) x ceil(W/8)``.

    Three layers halve the map, each ``floor((n - 1) / 2) + 1 = ceil(n / 2)``: the stem's
    3x3/2 convolution (padding 1), the 3x3/2 max-pool (padding 1, no ``ceil_mode``) and
    layer2's strided 3x3 convolution. DARS feeds ``8k + 1`` crops (361, 713) and gets ``k + 1``,
    which ``align_corners=True`` upsampling maps back onto the crop's corner pixels.

    Examples:
        >>> pspnet_output_size(713, 713)
        (90, 90)
        >>> pspnet_output_size(512, 1024)
        (64, 128)
    """
    return -(-height // 8), -(-width // 8)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling (Zhao et al. 2017, Sec. 3.2): pool, project, upsample, concatenate.

    Each bin ``b`` average-pools the map to ``b x b``, projects it with a 1x1 convolution, BN
    and ReLU, and upsamples it bilinearly (``align_corners=True``, as semseg) to the map size;
    the output is the input followed by the branches: ``in_channels + len(bins) * branch_channels``.
    """

    def __init__(self, in_channels: int, branch_channels: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(bin_size),
                nn.Conv2d(in_channels, branch_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(branch_channels),
                nn.ReLU(inplace=True),
            )
            for bin_size in bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size, mode="bilinear", align_corners=True) for branch in self.features]
        return torch.cat([x, *pooled], dim=1)


def segmentation_head(in_channels: int, mid_channels: int, num_classes: int) -> nn.Sequential:
    """3x3 conv (no bias), BN, ReLU, Dropout2d(0.1), 1x1 classifier with bias: semseg's ``cls`` and ``aux``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=HEAD_DROPOUT),
        nn.Conv2d(mid_channels, num_classes, kernel_size=1),
    )


class PSPNet50(SegmentationModel):
    """PSPNet with a dilated deep-stem ResNet-50 (semseg/DARS layout), output stride 8.

    Args:
        num_classes: output classes ``C``.
        normalization: input normalisation preset or :class:`Normalization`; ``"imagenet"``
            (RGB mean/std, as DARS and the semseg ImageNet weights).
        freeze_bn: ``"none"``, ``"affine"`` or ``"all"``, as for the DeepLab-V2 models
            (docs/models.md): ``affine`` freezes BN weights and biases, ``all`` also keeps every
            BN layer in eval mode.

    Shape:
        - input: ``[N, 3, H, W]`` RGB in ``[0, 1]``; ``N >= 2`` in training mode unless
          ``freeze_bn="all"`` (the 1x1 pyramid-pooling branch has one value per channel and
          image, which batch norm cannot normalise when ``N = 1``)
        - logits: ``[N, C, h, w]``; features: ``[N, 512, h, w]``, the map the 1x1 classifier
          consumes (after ``Dropout2d``, so ``logits = cls[4](features)`` in both modes);
          ``(h, w) = pspnet_output_size(H, W)``

        - aux_logits: ``[N, C, h, w]`` in training mode, ``None`` in eval mode

    Auxiliary head:
        In training mode ``forward`` also runs ``aux`` on the layer3 output and returns the
        result as ``SegOutput.aux_logits`` (same stride, part of the graph); in eval mode the
        head is skipped and ``aux_logits`` is ``None``. A recipe adds
        ``model.aux_weight * CE(upsample(out.aux_logits), labels)`` (0.4, DARS/semseg) to the
        loss. Returning it from ``forward`` (not a side method or attribute) keeps DDP's
        gradient synchronisation and leaves no graph tensor on the model for EMA copies or
        pickles. ``aux`` is always in the state dict, as in the authors' checkpoints.

    Examples:
        >>> model = PSPNet50(num_classes=19).eval()
        >>> out = model(torch.rand(1, 3, 33, 33))
        >>> tuple(out.logits.shape), tuple(out.features.shape), out.aux_logits
        ((1, 19, 5, 5), (1, 512, 5, 5), None)
    """

    output_stride = 8
    backbone_module_names = ("layer0", "layer1", "layer2", "layer3", "layer4")
    backbone_format = SEMSEG_RESNET50
    aux_weight = AUX_LOSS_WEIGHT

    def __init__(
        self,
        num_classes: int,
        normalization: str | Normalization = "imagenet",
        freeze_bn: Literal["none", "affine", "all"] = "none",
    ) -> None:
        super().__init__(check_num_classes(num_classes), 512, normalization)
        self.freeze_bn = resolve_freeze_bn(freeze_bn)
        self.layer0 = deep_stem()
        self.layer1 = make_resnet_stage(Bottleneck, 128, 64, RESNET50_BLOCKS[0])
        self.layer2 = make_resnet_stage(Bottleneck, 256, 128, RESNET50_BLOCKS[1], stride=2)
        self.layer3 = make_resnet_stage(Bottleneck, 512, 256, RESNET50_BLOCKS[2], dilation=2)
        self.layer4 = make_resnet_stage(Bottleneck, 1024, 512, RESNET50_BLOCKS[3], dilation=4)
        # semseg initialises the ResNet (Kaiming fan-out, BN 1/0) and leaves the heads at PyTorch defaults.
        for name in self.backbone_module_names:
            for module in getattr(self, name).modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.ppm = PyramidPoolingModule(2048, 2048 // len(PPM_BINS), PPM_BINS)
        self.cls = segmentation_head(4096, self.feature_dim, self.num_classes)
        self.aux = segmentation_head(1024, 256, self.num_classes)
        freeze_batch_norm_parameters(self, self.freeze_bn)
        self.train(self.training)

    def forward(self, images: torch.Tensor) -> SegOutput:
        check_input(images)
        self._check_batch_norm_batch(images)
        x = self.layer2(self.layer1(self.layer0(self.normalize(images))))
        layer3_out = self.layer3(x)
        features = self.cls[:4](self.ppm(self.layer4(layer3_out)))
        aux_logits = self.aux(layer3_out) if self.training else None
        return SegOutput(self.cls[4](features), features, aux_logits)

    def _check_batch_norm_batch(self, images: torch.Tensor) -> None:
        global_branch = self.ppm.features[0]
        assert isinstance(global_branch, nn.Sequential)  # pool, conv, bn, relu (PyramidPoolingModule)
        global_branch_bn = global_branch[2]
        # SyncBatchNorm pools over ranks and is not an nn.BatchNorm2d, so it passes.
        if images.shape[0] == 1 and isinstance(global_branch_bn, nn.BatchNorm2d) and global_branch_bn.training:
            raise ValueError(
                "PSPNet50 in training mode needs at least 2 images per batch: batch norm in the 1x1"
                " pyramid-pooling branch sees one value per channel and image. Raise the batch size"
                " (per device), use SyncBatchNorm across devices, or set model.options.freeze_bn=all"
            )

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """ResNet-50 parameters, ``layer0``..``layer4`` (semseg/DARS ``modules_ori``: the base learning rate)."""
        for name in self.backbone_module_names:
            yield from getattr(self, name).parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """``ppm``, ``cls`` and ``aux`` (semseg/DARS ``modules_new``: 10x learning rate)."""
        for name, module in self.named_children():
            if name not in self.backbone_module_names:
                yield from module.parameters()

    def train(self, mode: bool = True) -> PSPNet50:
        super().train(mode)
        keep_batch_norm_in_eval(self, self.freeze_bn)
        return self
