"""Resumable, worker-independent sample streams.

A training stream is an endless sequence of ``(index, sample_seed)`` pairs that is a pure
function of ``(seed, position)``: epoch ``e`` visits a permutation drawn from ``(seed, e)``,
and every sample gets its own seed for its random augmentations. Resuming at ``position``
(the number of samples already consumed) therefore continues the exact stream an
uninterrupted run would have seen, whatever the number of DataLoader workers, and under
DistributedDataParallel each rank takes every ``world_size``-th element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ..methods.common import sample_by_class

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


@dataclass(frozen=True)
class CropRequirement:
    """What a sample's random view must show: more than ``min_pixels`` pixels of class ``class_id``.

    DAFormer's rare-class sampling draws an image for a class, then re-draws the random crop up to
    ``attempts`` times until the class is in it (:class:`SeededTransformDataset`).
    """

    class_id: int
    min_pixels: float
    attempts: int = 10


class ClassBalancedSampler(Sampler):
    """Endless, resumable stream of source samples drawn class first (:func:`~segadapt.methods.common.sample_by_class`).

    BiCL's weighted sampling (supplement Eq. 1) and DAFormer's rare-class sampling (Eq. 6) are this
    sampler with their class probabilities and candidate tables. Position ``k`` of the stream draws
    from ``torch.Generator().manual_seed(seed * 1000003 + k)`` only, so a stream restarted at
    ``start`` continues exactly. Items are ``(index, sample_seed)``, or ``(index, sample_seed,
    CropRequirement)`` with ``crop_min_pixels`` (the view must show the drawn class), which
    :class:`SeededTransformDataset` reads.

    Examples:
        >>> candidates = torch.tensor([[True, False], [False, True]])
        >>> sampler = ClassBalancedSampler(candidates, torch.tensor([0.0, 1.0]), seed=0, crop_min_pixels=5)
        >>> index, _, requirement = next(iter(sampler))
        >>> index, requirement.class_id
        (1, 1)
    """

    def __init__(
        self, candidates: torch.Tensor, class_probabilities: torch.Tensor, seed: int, start: int = 0, crop_min_pixels: float | None = None
    ) -> None:
        self.candidates, self.class_probabilities = candidates, class_probabilities
        self.seed, self.start, self.crop_min_pixels = seed, start, crop_min_pixels

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        position = self.start
        while True:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + position) % (1 << 63))
            indices, classes = sample_by_class(self.candidates, self.class_probabilities, 1, generator)
            sample_seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
            if self.crop_min_pixels is None:
                yield int(indices[0]), sample_seed
            else:
                yield int(indices[0]), sample_seed, CropRequirement(int(classes[0]), self.crop_min_pixels)
            position += 1

    def __len__(self) -> int:
        return 1 << 62


class SeededTransformDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` applies ``transform`` with its own generator.

    The inner dataset must return untransformed samples; the transform receives
    ``generator=torch.Generator().manual_seed(seed)`` so augmentations depend on the stream
    position only (not on worker processes or the global RNG). A key
    ``(index, seed, CropRequirement)`` re-draws the view (with seeds derived from ``seed``) until its
    label shows enough of the required class, at most ``attempts`` times, keeping the last view.
    """

    def __init__(self, dataset: Any, transform: Callable[..., dict] | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[Any, ...] | int) -> dict:
        index, seed, *requirement = key if isinstance(key, tuple) else (key, _mix(key))
        sample = self.dataset[index]
        if self.transform is None:
            return sample
        view = self.transform(sample, generator=torch.Generator().manual_seed(seed))
        if requirement and requirement[0] is not None:
            need: CropRequirement = requirement[0]
            for attempt in range(1, need.attempts + 1):
                if int((view["label"] == need.class_id).sum()) > need.min_pixels:
                    break
                view = self.transform(sample, generator=torch.Generator().manual_seed(_mix(seed, attempt)))
        return view
