"""``segadapt pseudo-label CHECKPOINT OUT_DIR``: ST / CBST / DARS pseudo labels of ``data.target`` with a checkpoint.

The labelling passes themselves (shared with the self-training recipes) are
:mod:`segadapt.engine.pseudo_labelling`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..engine import distributed
from ..engine.builders import resolve_device
from ..engine.label_space import check_config_against_classes
from ..engine.loading import config_for_checkpoint, load_trained_model
from ..engine.pseudo_labelling import dataset_to_label, generate_pseudo_labels, summary_markdown
from ..errors import ConfigError


def pseudo_label_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (), log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Label ``data.target`` of the checkpoint's (or the given) config into ``out_dir``; returns the summary."""
    distributed.init_distributed()  # under torchrun the processes share the images
    cfg = config_for_checkpoint(checkpoint, config, overrides)
    if cfg.data.target is None:
        raise ConfigError("nothing to pseudo-label: set data.target.dataset and data.target.root")
    dataset = dataset_to_label(cfg, log)
    model, classes = load_trained_model(checkpoint, cfg)
    if classes is not None and classes.num_classes != dataset.classes.num_classes:
        raise ConfigError(f"{checkpoint} predicts {classes.num_classes} classes but data.target has {dataset.classes.num_classes}")
    check_config_against_classes(cfg, dataset.classes)  # e.g. pseudo_label.given_distribution, before the pass
    return generate_pseudo_labels(model, dataset, cfg, out_dir, resolve_device(cfg.device), log, shard=True)


def run(checkpoint: str, out: str, config: str | None = None, overrides: Sequence[str] = ()) -> int:
    """The command: label, then print the summary's markdown and where the labels are."""
    summary = pseudo_label_checkpoint(checkpoint, out, config, overrides)
    print(summary_markdown(summary))
    print(f"pseudo labels written to {out}")
    return 0
