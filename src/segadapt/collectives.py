"""The collective the library layers share: a sum over the ranks of a ``torchrun`` job.

``metrics`` (confusion matrices, pseudo-label statistics) and ``methods`` (confidence
histograms) sum their counts over ranks with :func:`all_reduce_sum`. It lives at the bottom of
the package (it imports only torch) because those layers must not import
:mod:`segadapt.engine.distributed`, which sits above them: the engine joins the process group
and holds the trainer's own collectives (gradient buckets, all-gather, broadcast).

Without an initialised process group (a single process, or ``torch.distributed`` not built)
every call is a no-op, so the same code runs single-process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum"]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it; without a process group, return it unchanged.

    A collective: every rank must call it, with a tensor of the same shape and dtype. NCCL
    reduces CUDA tensors only, so under NCCL a CPU tensor makes a round trip through the current
    CUDA device and the sum is copied back: ``tensor`` keeps its device (and its identity) with
    every backend. A non-contiguous tensor is reduced through a contiguous copy.

    Shape:
        - tensor: any; output: ``tensor`` itself

    Examples:
        >>> counts = torch.tensor([3, 0, 1])
        >>> all_reduce_sum(counts) is counts, counts.tolist()  # one process: a no-op
        (True, [3, 0, 1])
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    to_cuda = dist.get_backend() == "nccl" and not tensor.is_cuda
    if not to_cuda and tensor.is_contiguous():
        dist.all_reduce(tensor)
        return tensor
    buffer = tensor.contiguous()
    buffer = buffer.cuda() if to_cuda else buffer
    dist.all_reduce(buffer)
    tensor.copy_(buffer)
    return tensor
