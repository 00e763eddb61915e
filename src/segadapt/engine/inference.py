"""Inference at evaluation time: fixed size, flip, multi-scale and sliding-window prediction.

Every path returns class probabilities at the size the caller asks for (the label size),
upsampled bilinearly from the network's output stride, as the papers score predictions
against full-resolution labels (docs/datasets/cityscapes.md, "Preprocessing and evaluation in the
reference code").

Speed options of :class:`~segadapt.config.EvalConfig` (and of ``pseudo_label``): ``window_batch``
window positions go through the network in one forward pass; ``amp`` autocasts the network's
forward (bf16 / fp16; the upsampling, softmax and averaging stay fp32); ``channels_last`` feeds the
network channels-last inputs (and, inside :func:`inference_model`, converts its weights). With the
defaults (fp32, one window at a time) the results are today's, bit for bit; batched windows give
the same probabilities up to float rounding (``tests/test_inference_batching.py``).

What the views (scales, flips, windows) average: probabilities (:func:`predict_probs`, every
evaluation) or logits (:func:`predict_scores` with ``average="logits"``, the DARS code's pseudo
labelling: its ``net_process`` leaves the softmax out and ``scale_process`` and the scale loop
average what the network returns; docs/reference_code.md, "DARS: thresholds and random sampling").
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EvalConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Average = Literal["probabilities", "logits"]
"""What :func:`predict_scores` averages over the views: softmax probabilities or the logits before the softmax."""


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast to ``amp`` (``bf16`` / ``fp16``) on ``device``; nothing for ``off``."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _forward_scores(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int], cfg: EvalConfig, average: Average) -> torch.Tensor:
    """The network's logits upsampled to ``out_size``, their softmax unless ``average`` is ``"logits"``.

    Shape:
        - images: ``[N, 3, H, W]``
        - returns: ``[N, C, *out_size]``, float32
    """
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_for(images.device, cfg.amp):
        logits = model(images).logits
    logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
    return logits if average == "logits" else logits.softmax(dim=1)


def window_positions(
    height: int, width: int, window: Sequence[int], stride: Sequence[int] | None = None
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners of the sliding windows over an image, and the window size.

    Stride 2/3 of the window (DARS/PSPNet evaluation) unless ``stride`` is given (HRDA/mmseg: half
    the window); when the grid does not reach the border, a last row / column of windows is
    shifted to it (the same windows as mmseg's ``slide_inference``). A window larger than the
    image shrinks to it.

    Examples:
        >>> window_positions(1024, 2048, (1024, 1024), stride=(512, 512))[0]
        [(0, 0), (0, 512), (0, 1024)]
    """
    win_h, win_w = min(window[0], height), min(window[1], width)
    if stride is None:
        stride_h, stride_w = max(1, math.ceil(win_h * 2 / 3)), max(1, math.ceil(win_w * 2 / 3))
    else:
        stride_h, stride_w = max(1, int(stride[0])), max(1, int(stride[1]))
    tops = list(range(0, max(height - win_h, 0) + 1, stride_h))
    lefts = list(range(0, max(width - win_w, 0) + 1, stride_w))
    if tops[-1] + win_h < height:
        tops.append(height - win_h)
    if lefts[-1] + win_w < width:
        lefts.append(width - win_w)
    return [(top, left) for top in tops for left in lefts], (win_h, win_w)


def _sliding_window_scores(
    model: nn.Module,
    images: torch.Tensor,
    window: Sequence[int],
    out_size: tuple[int, int],
    cfg: EvalConfig,
    average: Average,
    mirror: bool = False,
) -> torch.Tensor:
    """Average of window predictions (probabilities or logits); ``cfg.window_batch`` window positions per forward pass.

    ``mirror``: each window's prediction is the mean of the window's and its mirror image's (flipped
    back), as the DARS/semseg code's ``net_process`` (``window_flip: window``).

    Shape:
        - images: ``[N, 3, H, W]``
        - returns: ``[N, C, *out_size]``
    """
    batch, (height, width) = images.shape[0], images.shape[-2:]
    positions, (win_h, win_w) = window_positions(height, width, window, cfg.window_stride)
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for start in range(0, len(positions), cfg.window_batch):
        chunk = positions[start : start + cfg.window_batch]
        crops = [images[..., top : top + win_h, left : left + win_w] for top, left in chunk]
        stacked = crops[0] if len(crops) == 1 else torch.cat(crops)
        if mirror:
            both = _forward_scores(model, torch.cat([stacked, stacked.flip(-1)]), (win_h, win_w), cfg, average)
            scores = (both[: len(stacked)] + both[len(stacked) :].flip(-1)) / 2
        else:
            scores = _forward_scores(model, stacked, (win_h, win_w), cfg, average)
        if total is None:
            total = torch.zeros(batch, scores.shape[1], height, width, device=images.device)
        for index, (top, left) in enumerate(chunk):  # the crops are position-major: N per position
            total[..., top : top + win_h, left : left + win_w] += scores[index * batch : (index + 1) * batch]
            count[..., top : top + win_h, left : left + win_w] += 1
    assert total is not None
    scores = total / count
    if (height, width) != tuple(out_size):
        scores = F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)
    return scores


def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    out_size: Sequence[int] | None = None,
    cfg: EvalConfig | None = None,
) -> torch.Tensor:
    """Class probabilities for a batch, averaged over the configured scales and flips (:func:`predict_scores`)."""
    return predict_scores(model, images, out_size, cfg, average="probabilities")


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    images: torch.Tensor,
    out_size: Sequence[int] | None = None,
    cfg: EvalConfig | None = None,
    average: Average = "probabilities",
) -> torch.Tensor:
    """Class probabilities, or logits with ``average="logits"``, for a batch, averaged over the configured scales and flips.

    Shape:
        - images: ``[N, 3, H, W]`` RGB in [0, 1]
        - returns: ``[N, C, *out_size]`` float32 (``out_size`` defaults to ``(H, W)``)

    ``cfg.size`` resizes the input first (e.g. 512x1024 for a 1024x2048 Cityscapes image),
    each scale multiplies that size; ``cfg.sliding_window`` runs windows of that size,
    ``cfg.window_batch`` window positions per forward pass. ``cfg.amp`` autocasts the forward
    pass, ``cfg.channels_last`` makes its input channels-last. The model should be in eval mode
    (:func:`inference_model`). ``average="logits"`` averages the views' logits (the softmax of the
    mean is then the caller's): the DARS code's pseudo-label prediction. With a sliding window and a flip,
    ``cfg.window_flip`` says which windows the flipped view has: the flipped image's (``image``,
    mmseg) or each window's own mirror (``window``, the DARS/semseg code).
    """
    cfg = cfg or EvalConfig()
    out = (int(out_size[0]), int(out_size[1])) if out_size is not None else (images.shape[-2], images.shape[-1])
    base = tuple(cfg.size) if cfg.size is not None else tuple(images.shape[-2:])
    total: torch.Tensor | None = None
    views = 0
    for scale in cfg.scales:
        size = (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
        scaled = images if size == tuple(images.shape[-2:]) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False
        )
        mirror_windows = cfg.flip and cfg.sliding_window is not None and cfg.window_flip == "window"
        for flip in (False, True) if cfg.flip and not mirror_windows else (False,):
            view = scaled.flip(-1) if flip else scaled
            if cfg.sliding_window is not None:
                scores = _sliding_window_scores(model, view, cfg.sliding_window, out, cfg, average, mirror=mirror_windows)
            else:
                scores = _forward_scores(model, view, out, cfg, average)
            scores = scores.flip(-1) if flip else scores
            total = scores if total is None else total + scores
            views += 1
    assert total is not None
    return total / views


def _tensor_strides(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The strides of every 4-d parameter and buffer of ``model`` (what a memory-format change alters)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name: tensor.stride() for name, tensor in tensors if tensor.dim() == 4}


def _restore_strides(model: nn.Module, strides: dict[str, tuple[int, ...]]) -> None:
    """Give every 4-d parameter and buffer back the strides of :func:`_tensor_strides` (same objects, same values)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in strides and tensor.stride() != strides[name]:
            restored = torch.empty_strided(tensor.shape, strides[name], dtype=tensor.dtype, device=tensor.device)
            tensor.data = restored.copy_(tensor.data)


@contextlib.contextmanager
def inference_model(model: nn.Module, cfg: EvalConfig) -> Iterator[nn.Module]:
    """``model`` in eval mode, its weights channels-last when ``cfg.channels_last``, for the block.

    On exit the training mode and the memory format of every weight are what they were, so a
    model that goes on training (the trainer's validation) is untouched.
    """
    was_training = model.training
    strides = _tensor_strides(model) if cfg.channels_last else None
    model.eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        yield model
    finally:
        if strides is not None:
            _restore_strides(model, strides)
        model.train(was_training)


def same_shape_groups(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Indices of equal shapes, in order of first appearance: the items one forward pass can stack.

    Examples:
        >>> same_shape_groups([(3, 4), (5, 6), (3, 4)])
        [[0, 2], [1]]
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return list(groups.values())
