"""The model output contract and input normalisation shared by every network."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn


class SegOutput(NamedTuple):
    """What every segadapt model returns, at the network's output stride (the caller upsamples).

    Shape:
        - logits: ``[N, C, h, w]``
        - features: ``[N, D, h, w]``, the embedding used by prototype and clustering methods
    """

    logits: torch.Tensor
    features: torch.Tensor


@dataclass(frozen=True)
class Normalization:
    """How a network expects its input pixels, starting from RGB in ``[0, 1]``.

    ``x' = (x * pixel_scale - mean) / std`` per channel, after reordering to ``channel_order``.
    The reference models differ (REFERENCE_NOTES.md 0.1-0.3): ProDA/CPSL feed RGB/255 with
    no mean or std, DARS uses ImageNet mean/std, DASS/BiCL use BGR minus the Caffe mean on a
    0-255 scale. Keeping this in the model means datasets and augmentations always work on
    ``[0, 1]`` RGB and a checkpoint is never fed the wrong statistics.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pixel_scale: float = 1.0
    channel_order: str = "rgb"

    @classmethod
    def preset(cls, name: str) -> "Normalization":
        """``imagenet`` (DARS), ``proda`` (ProDA/CPSL: RGB in [0,1]), ``caffe`` (BiCL/AdaptSegNet)."""
        presets = {
            "imagenet": cls(),
            "proda": cls(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
            "caffe": cls(mean=(104.008, 116.669, 122.679), std=(1.0, 1.0, 1.0), pixel_scale=255.0, channel_order="bgr"),
        }
        if name not in presets:
            raise ValueError(f"unknown normalization preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


class InputNormalizer(nn.Module):
    """Applies a :class:`Normalization` to ``[N, 3, H, W]`` RGB images in ``[0, 1]``. Has no state_dict entries."""

    def __init__(self, norm: Normalization) -> None:
        super().__init__()
        if norm.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {norm.channel_order!r}")
        self.norm = norm
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.norm.channel_order == "bgr":
            images = images.flip(1)
        return (images * self.norm.pixel_scale - self.mean) / self.std


def check_input(images: torch.Tensor, expected_channels: Sequence[int] = (3,)) -> None:
    """Raise a clear error for inputs that are not ``[N, 3, H, W]`` float tensors."""
    if images.dim() != 4 or images.shape[1] not in expected_channels or not images.is_floating_point():
        raise ValueError(
            f"expected a float tensor [N, 3, H, W] of RGB images in [0, 1], got {tuple(images.shape)} {images.dtype}"
        )
