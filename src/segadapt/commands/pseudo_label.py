"""``segadapt pseudo-label CHECKPOINT OUT_DIR``: ST / CBST / DARS pseudo labels of ``data.target`` with a checkpoint.

The labelling passes themselves (shared with the self-training recipes) are
:mod:`segadapt.engine.pseudo_labelling`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.pseudo_label_folder import pseudo_label_path
from ..engine import distributed
from ..engine.builders import resolve_device
from ..engine.label_space import check_config_against_classes
from ..engine.loading import config_for_checkpoint, load_trained_model
from ..engine.output_folder import OutputFolder, check_not_data, stream_folders
from ..engine.pseudo_labelling import SUMMARY, SUMMARY_MD, dataset_to_label, generate_pseudo_labels, summary_markdown
from ..errors import ConfigError


def pseudo_label_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Label ``data.target`` of the checkpoint's (or the given) config into ``out_dir``; returns the summary.

    ``out_dir`` is never a folder of the run's data (its images, its ground truth) and never holds
    files this command did not write; ``overwrite`` replaces an earlier ``pseudo-label``'s outputs
    there (:mod:`segadapt.engine.output_folder`). Both are checked before the model is loaded.
    """
    distributed.init_distributed()  # under torchrun the processes share the images
    cfg = config_for_checkpoint(checkpoint, config, overrides)
    if cfg.data.target is None:
        raise ConfigError("nothing to pseudo-label: set data.target.dataset and data.target.root")
    fix = "choose a new folder for the pseudo labels, outside the dataset's images/ and labels/ (e.g. runs/pseudo_labels)"
    check_not_data(out_dir, stream_folders(cfg), fix)
    folder = OutputFolder(out_dir, "pseudo-label", overwrite=overwrite)
    folder.check(fix)
    dataset = dataset_to_label(cfg, log)
    model, classes = load_trained_model(checkpoint, cfg)
    if classes is not None and classes.num_classes != dataset.classes.num_classes:
        raise ConfigError(f"{checkpoint} predicts {classes.num_classes} classes but data.target has {dataset.classes.num_classes}")
    check_config_against_classes(cfg, dataset.classes)  # e.g. pseudo_label.given_distribution, before the pass
    folder.claim([pseudo_label_path(".", name).as_posix() for name in dataset.names] + [SUMMARY, SUMMARY_MD], writer=distributed.is_main_process())
    return generate_pseudo_labels(model, dataset, cfg, out_dir, resolve_device(cfg.device), log, shard=True)


def run(checkpoint: str, out: str, config: str | None = None, overrides: Sequence[str] = (), overwrite: bool = False) -> int:
    """The command: label, then print the summary's markdown and where the labels are."""
    summary = pseudo_label_checkpoint(checkpoint, out, config, overrides, overwrite=overwrite)
    print(summary_markdown(summary))
    print(f"pseudo labels written to {out}")
    return 0
