"""Exponential moving average (mean-teacher) copies of a network.

Used as the momentum network of CPSL (Eq. 13, momentum 0.999), the DACS/BLV teacher and the
EMA self-labeling head. Buffers (BatchNorm statistics) are copied, parameters averaged.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``ema = m * ema + (1 - m) * model`` after every optimiser step.

    Args:
        model: the network being trained (its current weights initialise the copy).
        momentum: ``m``; 0.999 in CPSL and DACS.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> ema = ModelEMA(net, momentum=0.5)
        >>> with torch.no_grad(): _ = net.weight.add_(2.0)
        >>> ema.update(net)
        >>> torch.allclose(ema.module.weight, net.weight - 1.0)
        True
    """

    def __init__(self, model: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        for ema_param, param in zip(self.module.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1.0 - self.momentum)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def warmup_momentum(steps: int, momentum: float, count_start: bool = True) -> float:
    """The mean-teacher momentum after ``steps`` optimiser steps under the DACS/DAFormer warm-up.

    The DACS and DAFormer code update their teacher before step ``k + 1`` (``k >= 1`` steps done)
    with ``min(1 - 1/(k + 1), m)``, so while the cap ``m`` is not reached the teacher is the plain
    average of the student's weights ``theta_0 .. theta_k``, the start weights included
    (``count_start=True``). ``count_start=False`` gives ``min(1 - 1/k, m)``: the first update copies
    the student and the average runs over ``theta_1 .. theta_k``.

    Examples:
        >>> [round(warmup_momentum(k, 0.99), 4) for k in (1, 2, 3)]
        [0.5, 0.6667, 0.75]
        >>> [round(warmup_momentum(k, 0.99, count_start=False), 4) for k in (1, 2, 3)]
        [0.0, 0.5, 0.6667]
        >>> warmup_momentum(1000, 0.99)
        0.99
    """
    if steps < 1:
        raise ValueError(f"the teacher is updated after an optimiser step, got steps={steps}")
    return min(1.0 - 1.0 / (steps + 1 if count_start else steps), momentum)


@contextlib.contextmanager
def batch_norm_as(module: nn.Module, reference: nn.Module) -> Iterator[nn.Module]:
    """Run ``module``'s BatchNorm layers in the mode of ``reference``'s, leaving their running statistics alone.

    A momentum network in eval mode normalises a target batch with running statistics that the
    student gathered on source and target batches alike, while the student in train mode uses the
    batch's own; a consistency loss between the two then teaches the student to undo the
    difference, which it cannot do at evaluation. The authors' CPSL code runs its momentum network
    in train mode, i.e. exactly like the student. Layers the student keeps in eval mode (frozen
    BatchNorm) stay in eval mode here too. The layers are paired in ``modules()`` order, so
    ``module`` must be a copy of ``reference``'s architecture.

    Examples:
        >>> student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
        >>> teacher = ModelEMA(student).module.eval()
        >>> with batch_norm_as(teacher, student):
        ...     _ = teacher(torch.randn(2, 3, 4, 4))
        ...     teacher[1].training
        True
        >>> teacher[1].training, bool(teacher[1].running_mean.eq(0).all())
        (False, True)
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    references = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if len(norms) != len(references):
        raise ValueError(f"batch_norm_as: {len(norms)} BatchNorm layers against {len(references)} in the reference")
    saved = [(m.training, m.momentum) for m in norms]
    try:
        for norm, ref in zip(norms, references):
            norm.training = ref.training
            if ref.training:
                norm.momentum = 0.0  # batch statistics for the forward, running statistics unchanged
        yield module
    finally:
        for norm, (training, momentum) in zip(norms, saved):
            norm.training, norm.momentum = training, momentum
