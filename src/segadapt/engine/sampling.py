"""Resumable, worker-independent sample streams.

A training stream is an endless sequence of ``(index, sample_seed)`` pairs that is a pure
function of ``(seed, position)``: epoch ``e`` visits a permutation drawn from ``(seed, e)``,
and every sample gets its own seed for its random augmentations. Resuming at ``position``
(the number of samples already consumed) therefore continues the exact stream an
uninterrupted run would have seen, whatever the number of DataLoader workers, and under
DistributedDataParallel each rank takes every ``world_size``-th element.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates neighbouring seeds


def _mix(*values: int) -> int:
    state = 0
    for value in values:
        state = (state * 6364136223846793005 + value + _MIX) % (1 << 63)
    return state


class ResumableStreamSampler(Sampler):
    """Endless shuffled (or sequential) stream of ``(index, sample_seed)`` pairs.

    Args:
        size: number of items in the dataset.
        seed: stream seed (the run seed plus a per-stream offset).
        start: position to start at (samples consumed so far, over all ranks).
        shuffle: draw a fresh permutation per epoch; otherwise visit items in order.
        rank, world_size: this process's share of the stream.

    Examples:
        >>> first = list(zip(range(5), ResumableStreamSampler(4, seed=1)))
        >>> later = next(iter(ResumableStreamSampler(4, seed=1, start=3)))
        >>> first[3][1] == later
        True
    """

    def __init__(self, size: int, seed: int, start: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.start, self.shuffle = size, seed, start, shuffle
        self.rank, self.world_size = rank, world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        epoch, permutation = -1, torch.empty(0, dtype=torch.long)
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                permutation = self._permutation(epoch)
            yield int(permutation[position % self.size]), _mix(self.seed, 1 + position)
            position += self.world_size

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its bookkeeping
        return 1 << 62


class SeededTransformDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` applies ``transform`` with its own generator.

    The inner dataset must return untransformed samples; the transform receives
    ``generator=torch.Generator().manual_seed(seed)`` so augmentations depend on the stream
    position only (not on worker processes or the global RNG).
    """

    def __init__(self, dataset: Any, transform: Callable[..., dict] | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, _mix(key))
        sample = self.dataset[index]
        if self.transform is not None:
            sample = self.transform(sample, generator=torch.Generator().manual_seed(seed))
        return sample
