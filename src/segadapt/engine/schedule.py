"""Learning-rate schedules: poly (DeepLab, every paper here), cosine, constant; linear warm-up.

The time-constant rule that maps a paper's momenta and iteration counts to a shorter run is
:func:`segadapt.config.scaled_momentum` / :func:`~segadapt.config.scaled_iterations`, applied when a
config is loaded.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..config import ScheduleConfig


def lr_factor(iteration: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based) of ``total``.

    Poly: ``(1 - t/T) ** power`` (DeepLab-V2, CPSL, DARS use power 0.9). Warm-up ramps
    linearly from ``warmup_start_factor`` to the schedule's value over ``warmup_iters``.

    Examples:
        >>> round(lr_factor(50, 100, ScheduleConfig(name="poly", power=1.0)), 3)
        0.5
    """
    progress = min(iteration, total) / max(total, 1)
    if cfg.name == "poly":
        factor = (1.0 - progress) ** cfg.power
    elif cfg.name == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if iteration < cfg.warmup_iters:
        ramp = iteration / cfg.warmup_iters
        factor *= cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * ramp
    return factor


def build_scheduler(optimizer: Optimizer, total_iters: int, cfg: ScheduleConfig) -> LambdaLR:
    """A scheduler stepped once per iteration; its state_dict resumes it exactly.

    With ``cfg.offset = k`` the run is the tail of a longer schedule: iteration ``i`` gets the factor
    of iteration ``k + i`` of ``k + total_iters`` (the warm-up, counted from the start of the whole
    schedule, is over when ``k >= warmup_iters``).
    """
    return LambdaLR(optimizer, lambda it: lr_factor(it + cfg.offset, total_iters + cfg.offset, cfg))
