"""Turn config sections into datasets, loaders, models and optimisers."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..config import DatasetSpec, ModelConfig, OptimConfig
from ..errors import ConfigError, did_you_mean
from .sampling import ResumableStreamSampler, SeededTransformDataset

if TYPE_CHECKING:
    from ..models.base import SegmentationModel


def dataset_root(spec: DatasetSpec) -> tuple[str, Path]:
    """The loader name and root of a spec; the embedded benchmark resolves to its cached folder dataset."""
    from ..data import DATASETS

    if spec.dataset == "benchmark":
        from ..data.benchmark import ensure_benchmark

        if spec.domain is None:
            raise ConfigError(f"a benchmark dataset needs domain: source or target (e.g. {spec.key}.domain=target)")
        root = ensure_benchmark(spec.root, seed=spec.benchmark_seed, size=spec.benchmark_size)
        return "folder", Path(root) / spec.domain
    if spec.dataset not in DATASETS:  # before the root: a mistyped name is the thing to fix
        names = [*DATASETS, "benchmark"]
        raise ConfigError(
            f"{spec.key}.dataset: unknown dataset {spec.dataset!r}; valid names: {', '.join(names)}"
            f"{did_you_mean(spec.dataset, names)}"
        )
    if spec.root is None:
        raise ConfigError(f"dataset {spec.dataset!r} needs a root: set {spec.key}.root=/path/to/{spec.dataset}")
    return spec.dataset, Path(spec.root).expanduser()


def build_dataset_from_spec(spec: DatasetSpec, with_labels: bool | None = None) -> Any:
    """The untransformed dataset of a spec (transforms are applied by the loader wrapper)."""
    from ..data import build_dataset

    name, root = dataset_root(spec)
    options = dict(spec.options)
    if spec.subset is not None:
        from ..data.splits import make_split

        everything = build_dataset(
            name, root, spec.split, config_key=spec.key, split_file=spec.split_file, with_labels=False, **options
        )
        labeled, unlabeled = make_split(everything.names, ratio=spec.subset.ratio, seed=spec.subset.seed)
        options["names"] = labeled if spec.subset.part == "labeled" else unlabeled
    if spec.pseudo_labels is not None and with_labels is not False:
        from ..data.pseudo_label_folder import PseudoLabeledDataset

        images = build_dataset(
            name, root, spec.split, config_key=spec.key, split_file=spec.split_file, with_labels=False, **options
        )
        return PseudoLabeledDataset(images, spec.pseudo_labels)
    labels = spec.with_labels if with_labels is None else (with_labels and spec.with_labels)
    return build_dataset(name, root, spec.split, config_key=spec.key, split_file=spec.split_file, with_labels=labels, **options)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep everything else (names, replay records) as lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class RankShard(Sampler):
    """Every ``world_size``-th element of ``sampler``, from element ``rank`` on: one rank's share of a stream."""

    def __init__(self, sampler: Sampler, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.rank, None, self.world_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.world_size  # type: ignore[arg-type]


def build_train_loader(
    dataset: Any,
    transform: Any,
    batch_size: int,
    num_workers: int,
    seed: int,
    start: int,
    rank: int = 0,
    world_size: int = 1,
    sampler: Sampler | None = None,
) -> DataLoader:
    """An endless loader of ``dataset`` from sample ``start`` on; ``sampler`` replaces the default shuffling stream.

    ``start`` counts the samples consumed by all ranks together; rank ``rank`` of ``world_size``
    draws every ``world_size``-th element of the stream, so the ranks share one stream and a
    resume with another process count continues it. A given ``sampler`` must describe the whole
    stream from ``start`` (as :meth:`Recipe.train_sampler` does); it is sharded the same way.
    """
    if sampler is None:
        sampler = ResumableStreamSampler(len(dataset), seed=seed, start=start, rank=rank, world_size=world_size)
    elif world_size > 1:
        sampler = RankShard(sampler, rank, world_size)
    return DataLoader(
        SeededTransformDataset(dataset, transform),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched: exact resume
    )


def build_eval_loader(
    dataset: Any,
    transform: Any,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """Items ``rank::world_size`` of ``dataset`` in order (all of them single-process).

    Each item's transform seed depends on its index only, so a sharded evaluation sees exactly
    the inputs of a single-process one. ``pin_memory`` (default: when CUDA is available) lets the
    copies to the GPU overlap the forward pass; ``persistent_workers`` keeps the ``num_workers``
    worker processes between passes over the loader (the two passes of pseudo labelling).
    """
    return DataLoader(
        SeededTransformDataset(dataset, transform),
        batch_size=batch_size,
        sampler=range(rank, len(dataset), world_size),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def build_model(cfg: ModelConfig, num_classes: int) -> SegmentationModel:
    """The configured :class:`~segadapt.models.SegmentationModel`, with ``model.pretrained`` then ``model.checkpoint`` loaded."""
    from ..models import create_model
    from ..models.weights import load_backbone_weights, load_checkpoint_weights

    model = create_model(cfg.name, num_classes, **cfg.options)
    if cfg.pretrained:
        load_backbone_weights(model, cfg.pretrained)
    if cfg.checkpoint:
        load_checkpoint_weights(model, cfg.checkpoint)
    return model


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Backbone at ``lr``, head at ``lr * head_lr_mult`` (10x in DeepLab-V2 practice).

    Parameters whose name contains one of ``cfg.no_decay_keys`` go to groups of their own without
    weight decay (``backbone_no_decay``, ``head_no_decay``): DAFormer's ``norm`` layers, as its
    optimiser's custom keys do. Parameters a method adds (``method_head_parameters``, CPSL's
    self-labeling head) join the head group, or with a ``cfg.method_head_optimizer`` other than
    ``cfg.name`` form a ``method_head`` group stepped by that optimiser (a :class:`CombinedOptimizer`).
    """
    from ..models import param_groups

    names = {id(parameter): name for name, parameter in model.named_parameters()}

    def decays(parameter: nn.Parameter) -> bool:
        return not any(key in names[id(parameter)] for key in cfg.no_decay_keys)

    multipliers = {"backbone": 1.0, "head": cfg.head_lr_mult, "method_head": cfg.head_lr_mult}
    groups = param_groups(model)
    if cfg.method_head_optimizer in ("same", cfg.name) and "method_head" in groups:
        groups["head"] = groups["head"] + groups.pop("method_head")  # one head group, as before the option
    params: list[dict] = []
    for part, members in groups.items():
        lr = cfg.lr * multipliers[part]
        params.append({"params": [p for p in members if decays(p)], "lr": lr, "name": part})
        if cfg.no_decay_keys:
            params.append({"params": [p for p in members if not decays(p)], "lr": lr, "weight_decay": 0.0, "name": f"{part}_no_decay"})
    params = [group for group in params if group["params"]]
    own = [group["name"].startswith("method_head") for group in params]
    if not any(own):
        return _optimizer(cfg.name, params, cfg)
    return CombinedOptimizer(
        [
            _optimizer(cfg.name, [group for group, mine in zip(params, own) if not mine], cfg),
            _optimizer(cfg.method_head_optimizer, [group for group, mine in zip(params, own) if mine], cfg),
        ]
    )


def _optimizer(name: str, params: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return optimizer_class(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimisers over disjoint parameter groups, stepped, scheduled and saved as one.

    Its ``param_groups`` are the inner optimisers' own group dicts, so a learning-rate scheduler
    or a grad scaler acting on it acts on them; ``state_dict`` holds one entry per inner optimiser.
    ``optim.method_head_optimizer`` builds one (e.g. AdamW for the network, SGD for CPSL's head).

    Examples:
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = CombinedOptimizer([torch.optim.AdamW([a], lr=0.1), torch.optim.SGD([b], lr=0.1)])
        >>> (a.sum() + b.sum()).backward(); opt.step()
        >>> b.detach()  # SGD: 1 - 0.1 * 1
        tensor([0.9000, 0.9000])
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        # the same dicts: the base class keeps a group dict it is given, it does not copy it
        super().__init__([group for optimizer in self.optimizers for group in optimizer.param_groups], defaults={})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("CombinedOptimizer.step takes no closure")
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(
                f"the saved optimiser state is not one of {len(self.optimizers)} combined optimisers; "
                "resume with the optim.method_head_optimizer the run was started with"
            )
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)
        # loading gives the inner optimisers new group dicts: share them again with schedulers and scalers
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]


def resolve_device(name: str) -> torch.device:
    """The device of ``device=``; under torchrun a CUDA device is this process's GPU, ``LOCAL_RANK``."""
    from .distributed import env_info

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    info = env_info()
    if device.type == "cuda" and info.enabled:
        if device.index not in (None, info.local_rank):
            raise ConfigError(
                f"device={name} under torchrun: each process uses GPU LOCAL_RANK={info.local_rank}; "
                "use device=cuda or device=auto (select GPUs with CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device("cuda", info.local_rank)
    return device


def build_transform(spec: list[dict[str, Any]] | None, ignore_index: int) -> Any:
    """The transform pipeline of a ``data.*_transforms`` list (None for an empty list).

    ``ignore_index`` is the dataset's: crop padding, rotated-in corners and erased boxes get it.
    """
    from ..data.transforms import build_transforms

    return build_transforms(spec, ignore_index=ignore_index) if spec else None
