"""Activation checkpointing: recompute the encoder's blocks in backward instead of keeping their activations.

An encoder block's intermediate tensors (attention and Mix-FFN activations in a MiT block, the three
convolution/BatchNorm/ReLU outputs of a bottleneck) are what a training step's memory is mostly made of. With
checkpointing on, a block keeps only its input; backward runs the block's forward again to rebuild them
(:func:`torch.utils.checkpoint.checkpoint`, non-reentrant), trading about one more encoder forward per step for
the activations of all but one block at a time.

Two things a block does besides computing its output are made to happen once, as without checkpointing:

- random numbers (MiT's stochastic depth): the CPU and CUDA generator states are saved before the forward and
  restored for the recomputation (``preserve_rng_state``), so the recomputed dropout masks are the forward's;
- BatchNorm's running statistics (the ResNet backbones, in train mode): the recomputation would average the
  batch into ``running_mean``/``running_var`` a second time and count it twice in ``num_batches_tracked``.
  The recomputation normalises by the batch's statistics as the forward did (the same output), and its update
  of the running statistics and the batch count is undone when it ends.

Blocks are checkpointed only where gradients are being recorded: a teacher's ``torch.no_grad`` forward (the EMA
network's pseudo labels) runs unchanged.

Examples:
    >>> from segadapt.models import create_model
    >>> model = create_model("daformer_mitb0", 3, embed_dim=16)
    >>> set_activation_checkpointing(model, True)
    8
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError


class CheckpointableBlocks(abc.ABC):
    """A mixin for the module that runs a sequence of blocks: ``activation_checkpointing`` switches recomputation.

    The module calls :func:`run_block` for each block with its own ``activation_checkpointing`` flag and
    reports its blocks by :meth:`checkpointable_blocks`. The flag is a plain attribute, not a parameter or
    buffer, so the state-dict keys stay those of the authors' checkpoints.
    """

    activation_checkpointing: bool = False

    @abc.abstractmethod
    def checkpointable_blocks(self) -> int:
        """How many blocks this module recomputes when its flag is on."""


def _batch_norms_updating_statistics(block: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        module for module in block.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
    ]


@contextlib.contextmanager
def _statistics_restored(batch_norms: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Whatever the enclosed forward adds to the running statistics and the batch count is undone at the end.

    The recomputation must run BatchNorm as the forward did, running statistics passed in (the operator saves
    them for backward, and a different set of saved tensors fails the checkpoint's check), so the update
    happens and is reverted: a copy of each buffer, written back.
    """
    kept = [[buffer.clone() for buffer in module.buffers(recurse=False)] for module in batch_norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, copies in zip(batch_norms, kept):
                for buffer, copy in zip(module.buffers(recurse=False), copies):
                    buffer.copy_(copy)


def run_block(block: nn.Module, *inputs: Any, checkpointed: bool) -> Any:
    """``block(*inputs)``; with ``checkpointed`` and gradients recorded, its activations are recomputed in backward.

    Same values and gradients either way (the recomputation replays the forward's random numbers and leaves
    BatchNorm's running statistics alone; module docstring).

    Examples:
        >>> block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> x = torch.rand(2, 4, requires_grad=True)
        >>> torch.equal(run_block(block, x, checkpointed=True), block(x))
        True
    """
    if not (checkpointed and torch.is_grad_enabled()):
        return block(*inputs)
    batch_norms = _batch_norms_updating_statistics(block)
    if not batch_norms:  # the default context: what torch.compile traces through
        return checkpoint(block, *inputs, use_reentrant=False, preserve_rng_state=True)

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _statistics_restored(batch_norms)  # (forward, recomputation)

    return checkpoint(block, *inputs, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch block recomputation in every encoder of ``model`` (``train.activation_checkpointing``).

    Reaches every :class:`CheckpointableBlocks` module inside ``model``: the MiT encoder (per transformer
    block) and the ResNet stages (per bottleneck) of DeepLab-V2 and PSPNet, HRDA's shared encoder included,
    so every forward of every recipe (HRDA's context and detail passes, MIC's masked forward) recomputes.

    Returns:
        the number of blocks that recompute (0 when ``enabled`` is false).

    Raises:
        ConfigError: ``enabled`` and the model has no checkpointable encoder (e.g. ``small``).
    """
    containers = [module for module in model.modules() if isinstance(module, CheckpointableBlocks)]
    if enabled and not containers:
        raise ConfigError(
            f"train.activation_checkpointing=true: {type(model).__name__} has no encoder blocks to recompute (the MiT"
            " encoder of daformer_*/hrda_daformer_* and the ResNets of deeplabv2_*/pspnet50 have them); set"
            " train.activation_checkpointing=false"
        )
    for container in containers:
        container.activation_checkpointing = enabled
    return sum(container.checkpointable_blocks() for container in containers) if enabled else 0
