"""Networks. Every model is a :class:`SegmentationModel`: RGB images in ``[0, 1]`` -> :class:`SegOutput`.

The registry turns ``model.name`` / ``model.options`` of a config into a network:

    >>> model = create_model("small", num_classes=19, feature_dim=32)
    >>> groups = param_groups(model)  # {"backbone": [...], "head": [...]}, for the head LR multiplier

Names: ``deeplabv2_r101`` (:class:`DeepLabV2`), ``deeplabv2_r101_proda``
(:class:`DeepLabV2ProDA`), ``pspnet50`` (:class:`PSPNet50`), ``daformer_mitb0`` ..
``daformer_mitb5`` (:class:`DAFormer` on MiT-B0 .. B5: :class:`DAFormerMiTB0` ..),
``hrda_daformer_mitb0`` / ``hrda_daformer_mitb5`` / ``hrda_deeplabv2_r101`` (HRDA's multi-resolution
network around them: :class:`HRDADAFormer`, :class:`HRDADeepLabV2`), ``small``
(:class:`SmallSegNet`). The contract (``SegOutput(logits, features, aux_logits)``,
``feature_dim``, ``output_stride``, ``aux_weight``, ``normalization``,
``backbone_parameters()`` / ``head_parameters()``, and :class:`EncoderDecoder` for networks
that expose their encoder's features) is in :mod:`segadapt.models.base`. See docs/models.md.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError, SegadaptError, did_you_mean
from .base import (
    BackboneHeadSplit,
    EncoderDecoder,
    InputNormalizer,
    Normalization,
    SegmentationModel,
    SegOutput,
    check_num_classes,
)
from .checkpointing import set_activation_checkpointing
from .daformer import (
    DAFormer,
    DAFormerHead,
    DAFormerMiTB0,
    DAFormerMiTB1,
    DAFormerMiTB2,
    DAFormerMiTB3,
    DAFormerMiTB4,
    DAFormerMiTB5,
)
from .deeplabv2 import DeepLabV2, DeepLabV2ProDA, deeplabv2_output_size
from .hrda import HRDADAFormer, HRDADAFormerMiTB0, HRDADAFormerMiTB5, HRDADeepLabV2, HRDASegmentor
from .mit import MixTransformer
from .pspnet import PSPNet50, pspnet_output_size
from .small import SmallSegNet
from .weights import LoadReport, load_backbone_weights, load_checkpoint_weights, read_state_dict

MODELS: dict[str, type[SegmentationModel]] = {
    "daformer_mitb0": DAFormerMiTB0,
    "daformer_mitb1": DAFormerMiTB1,
    "daformer_mitb2": DAFormerMiTB2,
    "daformer_mitb3": DAFormerMiTB3,
    "daformer_mitb4": DAFormerMiTB4,
    "daformer_mitb5": DAFormerMiTB5,
    "deeplabv2_r101": DeepLabV2,
    "hrda_daformer_mitb0": HRDADAFormerMiTB0,
    "hrda_daformer_mitb5": HRDADAFormerMiTB5,
    "hrda_deeplabv2_r101": HRDADeepLabV2,
    "deeplabv2_r101_proda": DeepLabV2ProDA,
    "pspnet50": PSPNet50,
    "small": SmallSegNet,
}


def available_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def model_options(name: str) -> list[str]:
    """The keyword options a model accepts besides ``num_classes`` (``model.options`` keys)."""
    if name not in MODELS:
        choices = ", ".join(available_models())
        raise ConfigError(f"unknown model.name {name!r}; available: {choices}{did_you_mean(name, MODELS)}")
    parameters = inspect.signature(MODELS[name]).parameters
    return [parameter for parameter in parameters if parameter != "num_classes"]


def create_model(name: str, num_classes: int, **options: Any) -> SegmentationModel:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    Args:
        name: one of :func:`available_models`.
        num_classes: output classes ``C``.
        **options: the model's keyword arguments (config ``model.options``), e.g.
            ``normalization="caffe"``, ``aspp_branches="first_two_reference"``, ``freeze_bn="affine"``.

    Raises:
        ConfigError: unknown name or option (with the valid ones), bad option value.

    Examples:
        >>> create_model("deeplabv2_r101_proda", 19).feature_dim
        256
    """
    valid = model_options(name)
    check_num_classes(num_classes)
    for option in options:
        if option not in valid:
            raise ConfigError(
                f"model.options.{option} is not an option of model {name!r}; its options are"
                f" {', '.join(valid)}{did_you_mean(option, valid)}"
            )
    try:
        return MODELS[name](num_classes, **options)
    except SegadaptError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model {name!r}: {err}; check model.options") from err


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split into ``backbone`` and ``head`` (the engine gives the head 10x LR).

    Uses the model's ``backbone_parameters()`` / ``head_parameters()``; a (Distributed)
    DataParallel wrapper is looked through. Frozen parameters (``requires_grad=False``, e.g.
    ``freeze_bn``) are left out.

    Args:
        model: a :class:`SegmentationModel`, or a training wrapper deriving from
            :class:`BackboneHeadSplit` (e.g. a network plus a method's extra head).

    Raises:
        TypeError: the model is neither (the message names the base class to derive from).
        ValueError: the two groups overlap or miss a trainable parameter (a model bug).

    Examples:
        >>> groups = param_groups(create_model("small", num_classes=3))
        >>> sorted(groups), len(groups["head"]) > 0
        (['backbone', 'head'], True)
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if not isinstance(model, BackboneHeadSplit):
        raise TypeError(
            f"param_groups needs a segadapt model, got {type(model).__name__}: derive the network from"
            " segadapt.models.SegmentationModel (a training wrapper that adds parameters from"
            " segadapt.models.BackboneHeadSplit) and implement backbone_parameters() and head_parameters()"
        )
    groups = {
        "backbone": [p for p in model.backbone_parameters() if p.requires_grad],
        "head": [p for p in model.head_parameters() if p.requires_grad],
    }
    method_head = [p for p in model.method_head_parameters() if p.requires_grad]
    if method_head:
        groups["method_head"] = method_head
    grouped = [id(p) for group in groups.values() for p in group]
    if len(grouped) != len(set(grouped)):
        raise ValueError(f"{type(model).__name__}: a parameter is in both the backbone and the head group")
    grouped_ids = set(grouped)
    ungrouped = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in grouped_ids]
    if ungrouped:
        raise ValueError(f"{type(model).__name__}: trainable parameters in neither group: {ungrouped}")
    return groups


__all__ = [
    "MODELS",
    "BackboneHeadSplit",
    "DAFormer",
    "DAFormerHead",
    "DAFormerMiTB0",
    "DAFormerMiTB1",
    "DAFormerMiTB2",
    "DAFormerMiTB3",
    "DAFormerMiTB4",
    "DAFormerMiTB5",
    "DeepLabV2",
    "DeepLabV2ProDA",
    "EncoderDecoder",
    "HRDADAFormer",
    "HRDADAFormerMiTB0",
    "HRDADAFormerMiTB5",
    "HRDADeepLabV2",
    "HRDASegmentor",
    "InputNormalizer",
    "LoadReport",
    "MixTransformer",
    "Normalization",
    "PSPNet50",
    "SegOutput",
    "SegmentationModel",
    "SmallSegNet",
    "available_models",
    "create_model",
    "deeplabv2_output_size",
    "load_backbone_weights",
    "load_checkpoint_weights",
    "model_options",
    "param_groups",
    "pspnet_output_size",
    "read_state_dict",
    "set_activation_checkpointing",
]
