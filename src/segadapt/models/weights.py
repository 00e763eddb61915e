"""Loading ImageNet backbones and the authors' checkpoints into segadapt models.

Two entry points, matching the two config keys (docs/models.md):

- :func:`load_backbone_weights` (``model.pretrained``): a torchvision-format ImageNet
  ResNet-101 file (``resnet101-5d3b4d8f.pth``, ``resnet101-63fe2227.pth``, ...) into the
  backbone of a DeepLab-V2 model, or another format a model declares (:class:`BackboneFormat`;
  semseg's deep-stem ``resnet50_v2.pth`` for ``pspnet50``, SegFormer's ``mit_b5.pth`` etc. for
  the ``daformer_*`` models); the head keeps its initialisation.
- :func:`load_checkpoint_weights` (``model.checkpoint``): a whole model, from a plain
  state dict, ``{'state_dict': ...}``, ``{'model': ...}`` (segadapt checkpoints) or ProDA/CPSL's
  ``{'ResNet101': {'model_state': ...}}``, with DataParallel/DDP ``module.`` prefixes removed;
  from DAFormer's UDA checkpoints (student, EMA teacher and ImageNet copy in one state dict)
  it takes the student, ``model.*``.

Files are read with ``torch.load(weights_only=True)``, which runs no pickled code; the numpy
scalars and arrays that the references and segadapt store beside the weights (best mIoU, RNG
state) are allowed explicitly. A file needing anything else is refused unless ``trusted=True``.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

STATE_DICT_LOCATIONS: tuple[tuple[str, ...], ...] = (
    ("ResNet101", "model_state"),  # ProDA / CPSL
    ("state_dict",),  # SimCLRv2 conversions, Lightning, many repos
    ("model_state",),
    ("model",),  # segadapt checkpoints
)
"""Where a checkpoint may keep its state dict, tried in this order after "the file is one"."""

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "Scale.")
"""Key prefixes added by DataParallel/DDP, torch.compile and AdaptSegNet's ``DeepLab_init.pth``."""

UDA_NETWORK_PREFIXES = ("model.", "ema_model.", "imnet_model.")
"""The three networks of a DAFormer UDA checkpoint's state dict: the student (loaded, as DAFormer's
test script evaluates it), the EMA teacher and the frozen ImageNet copy (skipped)."""

TORCHVISION_DROPPED_PREFIXES = ("fc.",)
"""torchvision ResNet keys with no place in a segmentation network (the ImageNet classifier)."""

_SHOWN_KEYS = 6


@dataclass(frozen=True)
class LoadReport:
    """What a load did: keys copied, model keys left at their initialisation, file keys not used.

    ``skipped`` lists the file keys of other networks stored beside the one loaded (the
    ``ema_model.*`` and ``imnet_model.*`` tensors of a DAFormer UDA checkpoint); empty otherwise.
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    def summary(self) -> str:
        text = (
            f"loaded {len(self.loaded)} tensors; {len(self.missing)} model keys keep their initialisation"
            f"{_preview(self.missing)}; {len(self.unexpected)} file keys unused{_preview(self.unexpected)}"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} tensors of the other networks in the file ({_count_by_prefix(self.skipped)})"
        return text


def _count_by_prefix(keys: tuple[str, ...]) -> str:
    """``ema_model.: 1110, imnet_model.: 1110``: how many keys each top-level prefix has, in order of appearance."""
    counts: dict[str, int] = {}
    for key in keys:
        prefix = key.split(".")[0] + "."
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{prefix}: {count}" for prefix, count in counts.items())


def _preview(keys: tuple[str, ...] | list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f" ({shown}{', ...' if len(keys) > _SHOWN_KEYS else ''})"


def _numpy_safe_globals() -> list[Any]:
    """The numpy reconstructors a weights-only load may use, under numpy 1.x and 2.x names."""
    core = getattr(np, "_core", None) or np.core
    functions = [core.multiarray._reconstruct, core.multiarray.scalar]
    allowed: list[Any] = [np.ndarray, np.dtype, *functions]
    allowed += [(function, f"numpy.core.multiarray.{function.__name__}") for function in functions]
    allowed += [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return allowed


def _torch_load(path: Path, trusted: bool) -> Any:
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        unsafe = _unsafe_globals(path) or re.findall(r"GLOBAL (\S+) was not an allowed global", message)
        if not unsafe:
            details = [line.strip() for line in message.splitlines() if "WeightsUnpickler error" in line]
            reason = (details or message.strip().splitlines() or ["unpickling failed"])[-1]
            raise CheckpointError(
                f"{path} cannot be read ({reason}); the file may be truncated or not a PyTorch file"
            ) from None
        raise CheckpointError(
            f"{path} holds Python objects besides tensors ({', '.join(unsafe)}) that a weights-only load refuses."
            " If you trust the file, load it with trusted=True, or re-save just its state dict:"
            f" torch.save(torch.load('{path}', weights_only=False)[...], 'weights.pt')"
        ) from None
    except Exception as err:  # torch raises many types for damaged files
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); the file may be truncated or not a PyTorch file"
        ) from None


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a weights-only load refuses, beyond the allowed numpy ones; empty when unknown."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) or damaged files cannot be listed
        return []
    allowed = {name for item in _numpy_safe_globals() for name in _global_names(item)}
    return [name for name in found if name not in allowed]


def _global_names(item: Any) -> list[str]:
    if isinstance(item, tuple):
        return [item[1]]
    return [f"{item.__module__}.{item.__qualname__}"]


def _is_state_dict(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and len(node) > 0
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in node.items())
    )


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a prefix when every key carries it (e.g. ``module.`` from DataParallel), repeatedly."""
    state = dict(state_dict)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                stripped = True
    return state


def read_state_dict(path: str | Path, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict inside a weight file, in any of the supported wrappers, unprefixed.

    Args:
        path: a ``.pth``/``.pt``/``.pkl`` file written by ``torch.save``.
        trusted: allow arbitrary pickled objects (``weights_only=False``); only for files
            from a source you trust.

    Raises:
        CheckpointError: missing or unreadable file, or no state dict in it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist; download it (docs/models.md) or fix the path")
    content = _torch_load(path, trusted)
    if _is_state_dict(content):
        return _strip_wrapper_prefixes(content)
    if isinstance(content, Mapping):
        for location in STATE_DICT_LOCATIONS:
            node: Any = content
            for key in location:
                node = node.get(key) if isinstance(node, Mapping) else None
            if _is_state_dict(node):
                return _strip_wrapper_prefixes(node)
    top = sorted(map(str, content)) if isinstance(content, Mapping) else type(content).__name__
    raise CheckpointError(
        f"{path} holds no model state dict (top level: {top}); expected a plain state dict, {{'state_dict': ...}},"
        " {'model': ...} or ProDA/CPSL's {'ResNet101': {'model_state': ...}}"
    )


def torchvision_to_deeplab_key(key: str) -> str | None:
    """The DeepLab-V2 key receiving a torchvision ResNet-101 tensor, or ``None`` to drop it.

    The Caffe-style DeepLab backbone moves the stride from the 3x3 to the first 1x1
    convolution but keeps torchvision's module names and parameter shapes, so every
    backbone key maps to itself; the ImageNet classifier ``fc.*`` is dropped. The references
    load torchvision weights the same way (ProDA ``Deeplab()``, DARS ``Resnet101_deeplab``).
    """
    if key.startswith(TORCHVISION_DROPPED_PREFIXES):
        return None
    return key


@dataclass(frozen=True)
class BackboneFormat:
    """The ImageNet weight file a model's backbone loads (``model.pretrained``), as a model declares it.

    A model sets the class attribute ``backbone_format``; models without one get
    :data:`TORCHVISION_RESNET101`.

    Attributes:
        name: the backbone, in messages (``"ResNet-101"``).
        file_hint: which file is expected, in messages.
        key_map: file key -> model key, or ``None`` for tensors with no place in the model.
    """

    name: str
    file_hint: str
    key_map: Callable[[str], str | None]


TORCHVISION_RESNET101 = BackboneFormat(
    name="ResNet-101",
    file_hint="a torchvision-format ResNet-101 file such as resnet101-5d3b4d8f.pth (docs/models.md)",
    key_map=torchvision_to_deeplab_key,
)

SEGFORMER_DROPPED_PREFIXES = ("head.",)
"""SegFormer ImageNet MiT keys with no place in a segmentation network (the ImageNet classifier)."""


def segformer_to_daformer_key(key: str) -> str | None:
    """The DAFormer key receiving a tensor of SegFormer's ImageNet MiT file, or ``None`` to drop it.

    SegFormer's ``mit_b*.pth`` files hold the encoder without a prefix; DAFormer keeps it as
    ``backbone``. The ImageNet classifier ``head.*`` is dropped.

    Examples:
        >>> segformer_to_daformer_key("block1.0.attn.q.weight")
        'backbone.block1.0.attn.q.weight'
        >>> segformer_to_daformer_key("head.weight") is None
        True
    """
    if key.startswith(SEGFORMER_DROPPED_PREFIXES):
        return None
    return f"backbone.{key}"


def segformer_imagenet_format(encoder: str) -> BackboneFormat:
    """The ``model.pretrained`` format of a DAFormer model: SegFormer's ImageNet file of its encoder.

    Examples:
        >>> segformer_imagenet_format("mit_b5").file_hint
        "SegFormer's ImageNet mit_b5.pth (docs/models.md)"
    """
    return BackboneFormat(
        name=f"MiT (SegFormer ImageNet {encoder})",
        file_hint=f"SegFormer's ImageNet {encoder}.pth (docs/models.md)",
        key_map=segformer_to_daformer_key,
    )


def _is_bn_counter(key: str) -> bool:
    # Files saved before PyTorch 0.4.1 (torchvision's resnet101-5d3b4d8f.pth) lack this
    # counter; BatchNorm fills it in, and nothing in training depends on it.
    return key.endswith("num_batches_tracked")


def _shape_error(path: Path, mismatched: list[tuple[str, torch.Size, torch.Size]], model: nn.Module) -> CheckpointError:
    """A class-count message when only the classifier's class dimension differs, else the first bad key."""
    num_classes = getattr(model, "num_classes", None)
    file_classes = {file_shape[0] for _, file_shape, _ in mismatched}
    only_classes_differ = all(
        len(file_shape) == len(model_shape) and model_shape[0] == num_classes and file_shape[1:] == model_shape[1:]
        for _, file_shape, model_shape in mismatched
    )
    key, file_shape, model_shape = mismatched[0]
    if num_classes is not None and only_classes_differ and len(file_classes) == 1:
        # The model's class count is the data's (model.num_classes must agree with it), so "set
        # model.num_classes" is no fix; model.pretrained is one only for a model with an ImageNet backbone.
        fixes = [f"use a checkpoint trained on {num_classes} classes", f"train on data labelled with its {file_shape[0]} classes"]
        if getattr(model, "backbone_module_names", None) is not None:
            file_format: BackboneFormat = getattr(model, "backbone_format", TORCHVISION_RESNET101)
            fixes.insert(1, f"start from ImageNet weights instead: model.checkpoint=null model.pretrained=FILE ({file_format.file_hint})")
        return CheckpointError(
            f"{path}: checkpoint has {file_shape[0]} classes ({key} {tuple(file_shape)}) but the {type(model).__name__} built for"
            f" this run has {num_classes} (the data's class count, or model.num_classes); a checkpoint fits only data of its own"
            f" class count: {', or '.join(fixes)}"
        )
    return CheckpointError(
        f"{path}: {key} has shape {tuple(file_shape)} in the file but {tuple(model_shape)} in the model"
        f" ({type(model).__name__}; {len(mismatched)} tensors differ); the file was saved from a different"
        " architecture or options, check model.name and model.options"
    )


def _layout_hints(missing: list[str], unexpected: list[str]) -> str:
    hints = []
    if any(key.startswith("bn_pretrain.") for key in unexpected):
        hints.append(
            "the file has ProDA/CPSL's bn_pretrain (a SimCLR-initialised student): set model.options.bn_clr=true"
        )
    if any(key.startswith("bn_pretrain.") for key in missing):
        hints.append("the file has no bn_pretrain: set model.options.bn_clr=false")
    if "layer5.conv2d_list.0.weight" in unexpected and "layer5.head.1.weight" in missing:
        hints.append("it is a classic DeepLab-V2 checkpoint: use model.name=deeplabv2_r101")
    if "layer5.head.1.weight" in unexpected and "layer5.conv2d_list.0.weight" in missing:
        hints.append("it is a ProDA/CPSL checkpoint: use model.name=deeplabv2_r101_proda")
    return "; ".join(hints) if hints else "check model.name and its options"


def _select_student(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The student of a DAFormer UDA state dict, unprefixed, and the skipped keys of the other networks.

    A state dict is one when every key starts with one of :data:`UDA_NETWORK_PREFIXES`, some
    with ``model.``, and the model has no ``model.`` keys of its own; any other is returned as it is.
    Prefixes are matched with ``startswith``: ``ema_model.`` contains ``model.``.
    """
    student = UDA_NETWORK_PREFIXES[0]
    is_uda = (
        all(key.startswith(UDA_NETWORK_PREFIXES) for key in state)
        and any(key.startswith(student) for key in state)
        and not any(key.startswith(student) for key in expected)
    )
    if not is_uda:
        return state, ()
    selected = {key[len(student) :]: value for key, value in state.items() if key.startswith(student)}
    return selected, tuple(key for key in state if not key.startswith(student))


def load_checkpoint_weights(model: nn.Module, path: str | Path, *, trusted: bool = False) -> LoadReport:
    """Load a whole model (backbone and head) from segadapt's or the authors' checkpoint formats.

    Every model tensor must be in the file with the same shape and no file tensor may be
    left over (BatchNorm's ``num_batches_tracked`` counters excepted: old files lack them),
    because a half-loaded network trains or evaluates silently wrong. A DAFormer UDA
    checkpoint (``{'meta': ..., 'state_dict': ...}`` with ``model.``, ``ema_model.`` and
    ``imnet_model.`` keys) loads its student ``model.*`` under these rules; the other two
    networks' tensors are listed in the report's ``skipped``. An HRDA network takes a checkpoint of
    its single-scale network too (a DAFormer warm-up; :class:`SingleScaleCheckpoint`): its scale
    attention then keeps its initialisation and is listed in ``missing``.

    Args:
        model: the freshly created model (not wrapped in DDP).
        path: the weight file; see :func:`read_state_dict` for the formats.
        trusted: allow arbitrary pickled objects in the file.

    Raises:
        CheckpointError: unreadable file, wrong class count (the message gives the file's),
            other shape mismatches, missing or unexpected keys, with the fix.

    Examples:
        >>> checkpoint = "pretrained/from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl"
        >>> load_checkpoint_weights(model, checkpoint)  # doctest: +SKIP
    """
    path = Path(path)
    expected = model.state_dict()
    state, skipped = _select_student(read_state_dict(path, trusted=trusted), expected)
    left_at_init: tuple[str, ...] = ()
    single_scale = getattr(model, "single_scale_checkpoint", None)
    if single_scale is not None and not any(key in expected for key in state if key.startswith(single_scale.head_prefix)):
        # a single-scale network's file (a DAFormer warm-up) into a multi-resolution one (HRDA): its decoder is the shared
        # decoder; the modules only the multi-resolution network has (the scale attention) keep their initialisation
        state = {single_scale.map_key(key): value for key, value in state.items()}
        left_at_init = tuple(key for key in expected if key.startswith(single_scale.new_prefixes) and key not in state)
        expected = {key: value for key, value in expected.items() if key not in left_at_init}
    mismatched = [
        (key, value.shape, expected[key].shape)
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        raise _shape_error(path, mismatched, model)
    missing = [key for key in expected if key not in state and not _is_bn_counter(key)]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit model {type(model).__name__}: {len(missing)} model keys missing from the file"
            f"{_preview(missing)}, {len(unexpected)} file keys unknown to the model{_preview(unexpected)};"
            f" {_layout_hints(missing, unexpected)}"
        )
    model.load_state_dict(state, strict=False)
    report = LoadReport(loaded=tuple(state), missing=left_at_init, unexpected=(), skipped=skipped)
    logger.info("model weights from %s: %s", path, report.summary())
    return report


@dataclass(frozen=True)
class SingleScaleCheckpoint:
    """How a multi-resolution network (HRDA) takes a single-scale network's checkpoint (a DAFormer warm-up).

    A model declares it as its ``single_scale_checkpoint`` attribute. A file whose keys fit none of the
    model's under ``head_prefix`` (``decode_head.``) is a single-scale one: ``head_prefix`` keys move to
    ``head_prefix + shared_head`` (``decode_head.head.``), and the model's keys under ``new_prefixes``
    (``decode_head.scale_attention.``) keep their initialisation, listed as ``missing`` in the report.
    """

    head_prefix: str
    shared_head: str
    new_prefixes: tuple[str, ...]

    def map_key(self, key: str) -> str:
        """``decode_head.conv_seg.weight`` -> ``decode_head.head.conv_seg.weight``; other keys unchanged."""
        if key.startswith(self.head_prefix):
            return f"{self.head_prefix}{self.shared_head}{key[len(self.head_prefix) :]}"
        return key


def load_backbone_weights(model: nn.Module, path: str | Path, *, trusted: bool = False) -> LoadReport:
    """Initialise a model's backbone from its ImageNet weight file; the head keeps its initialisation.

    The model's ``backbone_format`` (:class:`BackboneFormat`) says which file and how its keys
    map: a torchvision-format ResNet-101 for the DeepLab-V2 models (:data:`TORCHVISION_RESNET101`,
    :func:`torchvision_to_deeplab_key`, ``fc.*`` dropped), semseg's deep-stem ResNet-50 for
    ``pspnet50``, SegFormer's ImageNet MiT for the ``daformer_*`` models
    (:func:`segformer_imagenet_format`, ``head.*`` dropped). File keys of
    other top-level modules (e.g. the ``layer5`` of AdaptSegNet's ``DeepLab_init.pth``) are
    reported as unexpected and not loaded; the head keeps its initialisation. Every backbone
    tensor must be in the file with the right shape (a ResNet-50 file, say, is refused).

    Returns:
        A :class:`LoadReport`: ``missing`` lists the head keys left at their initialisation,
        ``unexpected`` the file keys not used (``fc.*`` among them).

    Raises:
        ConfigError: the model declares no backbone (``backbone_module_names``).
        CheckpointError: unreadable file, shape mismatch or backbone keys missing from it.
    """
    path = Path(path)
    backbone_modules = getattr(model, "backbone_module_names", None)
    if backbone_modules is None:
        raise ConfigError(
            f"model.pretrained={path}: model {type(model).__name__} has no ResNet-101 backbone to initialise;"
            " unset model.pretrained or choose a deeplabv2_*, pspnet50 or daformer_* model"
        )
    file_format: BackboneFormat = getattr(model, "backbone_format", TORCHVISION_RESNET101)
    state = read_state_dict(path, trusted=trusted)
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        target = file_format.key_map(key)
        if target is None or target.split(".")[0] not in backbone_modules:
            unexpected.append(key)
            continue
        if target not in expected:
            raise CheckpointError(
                f"{path}: {key} has no place in the {file_format.name} backbone; expected {file_format.file_hint}"
            )
        if value.shape != expected[target].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)} but the {file_format.name} backbone needs"
                f" {tuple(expected[target].shape)}; expected {file_format.file_hint}"
            )
        mapped[target] = value
    backbone_keys = [key for key in expected if key.split(".")[0] in backbone_modules]
    absent = [key for key in backbone_keys if key not in mapped and not _is_bn_counter(key)]
    if absent:
        raise CheckpointError(
            f"{path} lacks {len(absent)} of the {len(backbone_keys)} {file_format.name} backbone tensors"
            f"{_preview(absent)}; expected {file_format.file_hint}"
        )
    model.load_state_dict(mapped, strict=False)
    report = LoadReport(
        loaded=tuple(mapped),
        missing=tuple(key for key in expected if key not in mapped and not _is_bn_counter(key)),
        unexpected=tuple(unexpected),
    )
    logger.info("backbone weights from %s: %s", path, report.summary())
    return report
