"""``segadapt eval CHECKPOINT``: per-class IoU, mIoU (19/16/13 protocols) and MPA of a checkpoint on ``data.val``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..data.label_ids import check_label_ids
from ..engine.builders import build_dataset_from_spec, build_eval_loader, build_transform, resolve_device
from ..engine.distributed import init_distributed, is_main_process
from ..engine.evaluation import evaluate
from ..engine.label_space import check_config_against_classes, require_labels
from ..engine.loading import config_for_checkpoint, load_trained_model
from ..errors import ConfigError


def evaluate_checkpoint(checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The checkpoint's network on ``data.val`` of its (or the given) config: :func:`~segadapt.engine.evaluation.evaluate`'s scores."""
    cfg = config_for_checkpoint(checkpoint, config, overrides)
    if cfg.data.val is None:
        raise ConfigError("nothing to evaluate on: set data.val.dataset and data.val.root (or data.val.dataset=benchmark)")
    dataset = build_dataset_from_spec(cfg.data.val, with_labels=True)
    require_labels(dataset, cfg.data.val, "evaluation needs its labels")
    check_label_ids(dataset, cfg.data.val.key)  # before the checkpoint is loaded: a bad file is named first, not mid-way
    device = resolve_device(cfg.device)
    model, predicted = load_trained_model(checkpoint, cfg)
    classes = dataset.classes  # the labels on disk: their names, and their ignore value
    if predicted is not None and predicted.num_classes != classes.num_classes:
        raise ConfigError(f"{checkpoint} predicts {predicted.num_classes} classes but {cfg.data.val.dataset} has {classes.num_classes}")
    check_config_against_classes(cfg, classes)
    info = init_distributed()  # under torchrun each rank evaluates its share; the matrices are summed
    loader = build_eval_loader(
        dataset,
        build_transform(cfg.data.val_transforms, classes.ignore_index),
        cfg.data.val_batch_size,
        cfg.data.num_workers,
        info.rank,
        info.world_size,
        pin_memory=device.type == "cuda",
    )
    return evaluate(model.to(device), loader, classes, cfg.eval, device, run_name=Path(checkpoint).stem)


def run(checkpoint: str, config: str | None = None, overrides: Sequence[str] = (), json_path: str | None = None) -> int:
    """The command: print the table (and write the scores to ``json_path``) on the main process."""
    scores = evaluate_checkpoint(checkpoint, config, overrides)
    if not is_main_process():
        return 0
    print(scores["table"])
    if json_path:
        Path(json_path).write_text(json.dumps(scores["flat"], indent=2))
    return 0
