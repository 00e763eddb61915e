"""Networks. Every model maps RGB images in ``[0, 1]`` to ``SegOutput(logits, features)``.

The registry turns ``model.name`` / ``model.options`` of a config into a network:

    >>> model = create_model("small", num_classes=19, feature_dim=32)
    >>> groups = param_groups(model)  # {"backbone": [...], "head": [...]}, for the head LR multiplier

Names: ``deeplabv2_r101`` (:class:`DeepLabV2`), ``deeplabv2_r101_proda``
(:class:`DeepLabV2ProDA`), ``pspnet50`` (:class:`PSPNet50`), ``small`` (:class:`SmallSegNet`).
See docs/models.md.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError, SegadaptError, did_you_mean
from .base import InputNormalizer, Normalization, SegOutput
from .deeplabv2 import DeepLabV2, DeepLabV2ProDA, check_num_classes, deeplabv2_output_size
from .pspnet import PSPNet50, pspnet_output_size
from .small import SmallSegNet
from .weights import LoadReport, load_backbone_weights, load_checkpoint_weights, read_state_dict

MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv2_r101": DeepLabV2,
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


def create_model(name: str, num_classes: int, **options: Any) -> nn.Module:
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

    Raises:
        TypeError: the model does not define the two methods.
        ValueError: the two groups overlap or miss a trainable parameter (a model bug).
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if not (hasattr(model, "backbone_parameters") and hasattr(model, "head_parameters")):
        raise TypeError(f"{type(model).__name__} must define backbone_parameters() and head_parameters()")
    groups = {
        "backbone": [p for p in model.backbone_parameters() if p.requires_grad],
        "head": [p for p in model.head_parameters() if p.requires_grad],
    }
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
    "DeepLabV2",
    "DeepLabV2ProDA",
    "InputNormalizer",
    "LoadReport",
    "Normalization",
    "PSPNet50",
    "SegOutput",
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
]
