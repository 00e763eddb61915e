"""The model contract every segadapt network implements, and the input normalisation it applies.

:class:`SegmentationModel` is the one interface recipes, evaluators and the optimiser builder
rely on: ``forward(images) -> SegOutput``, the attributes ``num_classes``, ``feature_dim``,
``output_stride``, ``aux_weight`` and ``normalization``, and the ``backbone_parameters()`` /
``head_parameters()`` split. Code reads these directly; nothing probes a model with
``getattr``/``hasattr``. See docs/models.md, "Adding a model".
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from ..errors import ConfigError


class DetailOutput(NamedTuple):
    """The detail branch of a multi-resolution network's training forward (HRDA; :mod:`segadapt.models.hrda`).

    :meth:`segadapt.engine.recipes.base.Recipe.supervised_loss` reads it: the loss of such an output is
    ``(1 - loss_weight) * L(fused logits, labels) + loss_weight * L(logits, labels in box)`` (HRDA's
    ``hr_loss_weight``, lambda_d = 0.1).

    Attributes:
        logits: the detail crop's own class scores, at the network's stride of the crop.
        box: ``(y1, y2, x1, x2)`` of the detail crop in the input image's pixels (the same box
            for every image of the batch, as HRDA draws it).
        input_size: ``(H, W)`` of the input image, to scale ``box`` to labels of another size.
        loss_weight: the weight of the detail term (the fused term gets ``1 - loss_weight``).
        context_encoded: the encoder maps of the context view (the image at the context scale),
            shallow to deep: HRDA's ImageNet feature distance compares these (the authors'
            ``feature_scale`` 0.5).

    Shape:
        - logits: ``[N, C, h_d, w_d]``
        - context_encoded: maps ``[N, D_i, h_i, w_i]``
    """

    logits: torch.Tensor
    box: tuple[int, int, int, int]
    input_size: tuple[int, int]
    loss_weight: float
    context_encoded: tuple[torch.Tensor, ...] = ()

    def split(self, sizes: Sequence[int]) -> tuple[DetailOutput, ...]:
        """One :class:`DetailOutput` per chunk of the batch (``forward_streams`` splits every field this way)."""
        logits = self.logits.split(list(sizes))
        maps = [m.split(list(sizes)) for m in self.context_encoded]
        return tuple(
            DetailOutput(part, self.box, self.input_size, self.loss_weight, tuple(m[i] for m in maps))
            for i, part in enumerate(logits)
        )


class SegOutput(NamedTuple):
    """What every segadapt model returns, at the network's output stride (the caller upsamples).

    Read the fields by name. ``logits, features = out[:2]`` also works; plain two-name
    unpacking (``logits, features = out``) does not, since there are more fields.

    Attributes:
        logits: the class scores.
        features: the embedding used by prototype and clustering methods (``D`` is the
            model's ``feature_dim``).
        aux_logits: an auxiliary head's class scores in training mode, for a loss term
            weighted by the model's ``aux_weight`` (PSPNet-50's layer-3 head); ``None`` in eval
            mode and for models without an auxiliary head.
        detail: a multi-resolution network's detail branch in training mode (HRDA's
            :class:`DetailOutput`: its own logits on the detail crop, for the detail loss term);
            ``None`` in eval mode and for single-resolution networks.

    Shape:
        - logits: ``[N, C, h, w]``
        - features: ``[N, D, h, w]``
        - aux_logits: ``[N, C, h, w]`` or ``None``

    Examples:
        >>> out = SegOutput(torch.zeros(2, 19, 9, 9), torch.zeros(2, 64, 9, 9))
        >>> out.aux_logits is None, tuple(out[:2][1].shape)
        (True, (2, 64, 9, 9))
    """

    logits: torch.Tensor
    features: torch.Tensor
    aux_logits: torch.Tensor | None = None
    detail: DetailOutput | None = None


@dataclass(frozen=True)
class Normalization:
    """How a network expects its input pixels, starting from RGB in ``[0, 1]``.

    ``x' = (x * pixel_scale - mean) / std`` per channel, after reordering to ``channel_order``.
    The reference models differ (docs/reference_code.md, "Networks: input normalisation"):
    ProDA/CPSL feed RGB/255 with no mean or std, DARS uses ImageNet mean/std, DASS/BiCL use BGR
    minus the Caffe mean on a 0-255 scale. Keeping this in the model means datasets and
    augmentations always work on ``[0, 1]`` RGB and a checkpoint is never fed the wrong statistics.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pixel_scale: float = 1.0
    channel_order: str = "rgb"

    @classmethod
    def preset(cls, name: str) -> Normalization:
        """``imagenet`` (DARS), ``proda`` (ProDA/CPSL: RGB in [0,1]), ``caffe`` (BiCL/AdaptSegNet)."""
        presets = {
            "imagenet": cls(),
            "proda": cls(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
            "caffe": cls(mean=(104.008, 116.669, 122.679), std=(1.0, 1.0, 1.0), pixel_scale=255.0, channel_order="bgr"),
        }
        if name not in presets:
            raise ValueError(f"unknown normalization preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]

    def zero_colour(self) -> tuple[float, float, float]:
        """The RGB colour in ``[0, 1]`` that this normalisation maps to zero: its mean, in RGB order, unscaled.

        MIC hides image blocks by zeroing the normalised image; on ``[0, 1]`` RGB that is this colour.

        Examples:
            >>> Normalization.preset("imagenet").zero_colour()
            (0.485, 0.456, 0.406)
            >>> [round(v, 4) for v in Normalization.preset("caffe").zero_colour()]  # BGR mean, reordered, over 255
            [0.4811, 0.4575, 0.4079]
        """
        mean = self.mean[::-1] if self.channel_order == "bgr" else self.mean
        r, g, b = (value / self.pixel_scale for value in mean)
        return (r, g, b)


class InputNormalizer(nn.Module):
    """Applies a :class:`Normalization` to ``[N, 3, H, W]`` RGB images in ``[0, 1]``. Has no state_dict entries."""

    mean: torch.Tensor  # buffers registered in __init__, declared for type checkers
    std: torch.Tensor

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


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` itself if it is a positive integer, else a config-level error.

    Examples:
        >>> check_num_classes(19)
        19
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model.num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def resolve_normalization(normalization: str | Normalization) -> Normalization:
    """A :class:`Normalization` from itself or a preset name, with a config-level error.

    Examples:
        >>> resolve_normalization("proda").mean
        (0.0, 0.0, 0.0)
    """
    if isinstance(normalization, Normalization):
        return normalization
    try:
        return Normalization.preset(normalization)
    except ValueError as err:
        raise ConfigError(f"model.options.normalization: {err}") from None


class BackboneHeadSplit(abc.ABC):
    """Something whose trainable parameters split into a backbone and a head optimiser group.

    Every :class:`SegmentationModel` is one. A training wrapper that adds parameters to a
    model (CPSL's self-labeling head, say) derives from it too, so that
    :func:`~segadapt.models.param_groups` accepts it: ``class Wrapper(nn.Module, BackboneHeadSplit)``.
    The two methods must partition the module's parameters: each one in exactly one group.
    """

    @abc.abstractmethod
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters trained at the base learning rate (``optim.lr``)."""

    @abc.abstractmethod
    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters trained at ``optim.lr * optim.head_lr_mult``."""

    def method_head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters a method adds on top of the network (CPSL's self-labeling head); none by default.

        They train at the head's learning rate, in the head group unless ``optim.method_head_optimizer``
        gives them an optimiser of their own.
        """
        return iter(())


class EncoderDecoder(abc.ABC):
    """A network whose forward is decode(encode(images)): the recipes that need the encoder's own
    features (DAFormer's ImageNet feature distance) call the two halves.

    A :class:`SegmentationModel` that derives from it too (``class Net(SegmentationModel,
    EncoderDecoder)``, e.g. :class:`~segadapt.models.DAFormer`) guarantees
    ``net(images) == net.decode(net.encode(images))``; a recipe checks
    ``isinstance(net, EncoderDecoder)`` and names this class in its error otherwise.
    """

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, shallow to deep, from RGB images in [0, 1] (normalised inside)."""

    @abc.abstractmethod
    def decode(self, features: list[torch.Tensor]) -> SegOutput:
        """The decoder's output from encode()'s features."""


class SegmentationModel(nn.Module, BackboneHeadSplit):
    """The contract of every segadapt network: RGB images in ``[0, 1]`` -> :class:`SegOutput`.

    A subclass calls ``super().__init__(num_classes, feature_dim, normalization)`` first (this
    sets ``num_classes``, ``feature_dim``, ``normalization`` and registers the normaliser
    ``normalize``, a module without state-dict entries, as the first child), sets the class
    attribute ``output_stride`` (and ``aux_weight`` when it has an auxiliary head), and
    implements ``forward``, ``backbone_parameters`` and ``head_parameters``.

    Attributes:
        num_classes: ``C``, the channels of ``logits`` (and ``aux_logits``).
        feature_dim: ``D``, the channels of ``features``.
        output_stride: input pixels per output pixel along each side; the output is
            ``ceil(H / output_stride) x ceil(W / output_stride)`` for the models here (the
            exact rule is each model's, e.g. :func:`~segadapt.models.deeplabv2_output_size`).
        aux_weight: weight of the auxiliary loss on ``SegOutput.aux_logits``; 0.0 for models
            without an auxiliary head (their ``aux_logits`` is always ``None``).
        normalization: the :class:`Normalization` ``forward`` applies to its input; data
            pipelines always deliver RGB in ``[0, 1]``.

    Methods:
        forward(images): normalise the input inside the model and return :class:`SegOutput`.
            In training mode a model with an auxiliary head fills ``aux_logits``, part of the
            graph; in eval mode it is ``None``. The model keeps no tensor of a forward pass as
            an attribute (EMA copies, DDP and pickling stay clean).
        backbone_parameters(): the base-learning-rate group.
        head_parameters(): the ``optim.head_lr_mult`` group. The two partition ``parameters()``.

    Shape:
        - images: ``[N, 3, H, W]`` float RGB in ``[0, 1]``
        - logits: ``[N, C, h, w]``, features: ``[N, D, h, w]``, aux_logits: ``[N, C, h, w]`` or ``None``,
          with ``h, w`` about ``H / output_stride, W / output_stride``

    Examples:
        >>> class Tiny(SegmentationModel):
        ...     output_stride = 2
        ...     def __init__(self, num_classes: int) -> None:
        ...         super().__init__(num_classes, feature_dim=4, normalization="imagenet")
        ...         self.encoder = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        ...         self.classifier = nn.Conv2d(4, num_classes, 1)
        ...     def forward(self, images: torch.Tensor) -> SegOutput:
        ...         features = self.encoder(self.normalize(images))
        ...         return SegOutput(self.classifier(features), features)
        ...     def backbone_parameters(self):
        ...         return self.encoder.parameters()
        ...     def head_parameters(self):
        ...         return self.classifier.parameters()
        >>> out = Tiny(num_classes=3)(torch.rand(1, 3, 9, 9))
        >>> tuple(out.logits.shape), tuple(out.features.shape), out.aux_logits
        ((1, 3, 5, 5), (1, 4, 5, 5), None)
    """

    output_stride: ClassVar[int]
    aux_weight: ClassVar[float] = 0.0
    num_classes: int
    feature_dim: int
    normalization: Normalization

    def __init__(self, num_classes: int, feature_dim: int, normalization: str | Normalization) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.normalization = resolve_normalization(normalization)
        self.normalize = InputNormalizer(self.normalization)

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> SegOutput:
        """``[N, 3, H, W]`` RGB in ``[0, 1]`` -> :class:`SegOutput` at the output stride."""
