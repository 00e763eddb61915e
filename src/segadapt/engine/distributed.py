"""Multi-process training under ``torchrun``: process group, rank queries and the collectives the engine uses.

``torchrun --nproc_per_node N -m segadapt train CONFIG`` starts N copies of the ordinary
command; each reads its place from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, never a ``--local_rank`` argument). Without those variables every helper here
is a no-op, so the same code runs single-process.

Gradients are synchronised by :func:`all_reduce_gradients` after the backward passes of a step
rather than by wrapping the network in ``DistributedDataParallel`` (docs/distributed.md, "Design"):
recipes call ``self.model`` several times per step, optimise modules beside it (CPSL's
self-labeling head, the adversarial discriminator) and read model attributes directly, all of
which a DDP wrapper would break or miss.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError

BUCKET_ELEMENTS = 1 << 24
"""Gradients are reduced in flat buckets of at most this many elements (64 MB of float32): few
collectives, bounded extra memory."""

TIMEOUT = timedelta(hours=2)
"""How long a rank waits at a collective. Longer than torch's 30-minute default because rank 0
alone runs a recipe's ``prepare`` (e.g. pseudo-labelling a whole target split) while the others
wait at a barrier."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun, which sets it") from None


def env_info() -> DistInfo:
    """The rank, world size and local rank torchrun put in the environment (1 process without it)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent; launch with torchrun, which sets both")
    return DistInfo(rank, world_size, local_rank)


def init_distributed() -> DistInfo:
    """Join the process group when torchrun started several processes; idempotent.

    Backend NCCL when CUDA is available (each process then owns GPU ``LOCAL_RANK``), gloo on CPU.
    The group is destroyed at interpreter exit, so that successive trainers of one process
    (``segadapt rounds``) share it.
    """
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    if torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "lower torchrun --nproc_per_node to the GPU count"
            )
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=TIMEOUT)
    atexit.register(cleanup)
    return info


SHUTDOWN_TIMEOUT = timedelta(seconds=60)
"""How long a gloo rank waits, when leaving, for the others to leave too (see :func:`cleanup`)."""


def cleanup() -> None:
    """Leave the process group, together with the other ranks (a no-op when none was joined).

    On gloo the ranks first meet at a barrier bounded by :data:`SHUTDOWN_TIMEOUT`, so that no rank
    tears its connections down while a peer still works (rank 0 writing the last files): once, in
    CI, rank 1 leaving alone ended in a C++ ``terminate`` (SIGABRT) at exit, which turns a finished
    job into a failed one under torchrun. A peer that never arrives (it failed) costs the timeout,
    not a hang.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=SHUTDOWN_TIMEOUT)
        except RuntimeError:
            pass  # a peer failed or left: leave anyway, torchrun reports that rank's failure
    dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: the process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank arrives here (no-op single-process)."""
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must live for a collective: NCCL reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a new tensor on ``tensor``'s device; a copy single-process)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor.clone()
    reduced = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(reduced)
    return (reduced / world_size).to(tensor.device)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank concatenated along dim 0, in rank order (``tensor`` itself single-process).

    Ranks may hold different lengths along dim 0 (e.g. a different number of sampled pixels);
    the other dimensions and the dtype must agree. The local slice of the result is ``tensor``
    itself, so gradients flow into this rank's part; the other ranks' parts are constants.
    Works with gloo (CPU) and NCCL (CUDA).
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    device = _comm_device()
    length = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.detach()
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    rank = get_rank()
    parts = [tensor if index == rank else part[:size].to(tensor.device) for index, (part, size) in enumerate(zip(gathered, sizes))]
    return torch.cat(parts)


def all_gather_object(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` single-process); for small picklable state."""
    world_size = get_world_size()
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of tensors of one device and dtype, each at most ``BUCKET_ELEMENTS`` (unless one tensor is larger)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in group:
            if bucket and size + tensor.numel() > BUCKET_ELEMENTS:
                yield bucket
                bucket, size = [], 0
            bucket.append(tensor)
            size += tensor.numel()
        if bucket:
            yield bucket


def _average_in_place(tensors: list[torch.Tensor], world_size: int) -> None:
    device = _comm_device()
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket]).to(device)
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over ranks (what DistributedDataParallel computes).

    A parameter without a gradient on some ranks (a branch only some batches reach) gets a zero
    gradient there first, so all ranks step the same parameters; one without a gradient on
    every rank stays without, as in a single-process run. No-op single-process.
    """
    world_size = get_world_size()
    if world_size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(present)
    for param, count in zip(params, present.tolist()):
        if count and param.grad is None:
            param.grad = torch.zeros_like(param)
    _average_in_place([p.grad for p in params if p.grad is not None], world_size)


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks; integer ones are left.

    Every rank then evaluates, EMA-copies and saves the same statistics. No-op single-process.
    """
    world_size = get_world_size()
    if world_size == 1:
        return
    floating = [b for b in module.buffers() if b.is_floating_point()]
    if floating:
        with torch.no_grad():
            _average_in_place(floating, world_size)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks (no-op single-process)."""
    if get_world_size() == 1:
        return
    device = _comm_device()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            on_device = tensor.detach().to(device, copy=True)
            dist.broadcast(on_device, src)
            tensor.copy_(on_device)


def rank_seed(seed: int, rank: int) -> int:
    """A global-RNG seed for rank ``rank`` > 0, distinct from ``seed`` (which rank 0 keeps, matching a single-process run)."""
    return (seed * 1_000_003 + rank) % (1 << 63)
