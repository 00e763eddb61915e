"""Exponential moving average (mean-teacher) copies of a network.

Used as the momentum network of CPSL (Eq. 13, momentum 0.999), the DACS/BLV teacher and the
EMA self-labeling head. Buffers (BatchNorm statistics) are copied, parameters averaged.
"""

from __future__ import annotations

import copy

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
