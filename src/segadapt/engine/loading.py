"""Rebuild the network of a checkpoint for evaluation and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..config import RunConfig, load_config
from ..data.classes import ClassInfo
from ..errors import CheckpointError, ConfigError
from .builders import build_model
from .checkpoint import load_checkpoint


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The file a command's CHECKPOINT argument names: the file itself, or a run directory's ``checkpoints/last.pt``.

    ``segadapt eval|predict|pseudo-label RUN_DIR`` take a run directory as ``segadapt train RUN_DIR`` does.

    Raises:
        CheckpointError: the path does not exist, or is a folder without ``checkpoints/last.pt``.
    """
    path = Path(checkpoint)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            what = "a run directory" if (path / "config.yaml").is_file() else "a folder, not a run directory,"
            raise CheckpointError(f"{path} is {what} without checkpoints/last.pt; pass a checkpoint file, or train the run first")
        return last
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file or a run directory (RUN_DIR uses RUN_DIR/checkpoints/last.pt)")
    return path


def config_for_checkpoint(checkpoint: str | Path, config: str | Path | None, overrides: Sequence[str]) -> RunConfig:
    """The given config, else the run directory's ``config.yaml`` (``RUN/checkpoints/x.pt`` or ``RUN`` -> ``RUN/config.yaml``)."""
    checkpoint = checkpoint_file(checkpoint)  # a missing checkpoint is named as such, before its config is looked for
    if config is None:
        candidate = checkpoint.resolve().parent.parent / "config.yaml"
        if not candidate.exists():
            raise ConfigError(f"no config given and {candidate} does not exist; pass --config CONFIG.yaml")
        config = candidate
    return load_config(config, overrides)


def load_trained_model(checkpoint: str | Path, cfg: RunConfig) -> tuple[nn.Module, ClassInfo | None]:
    """The evaluated network of a segadapt checkpoint (EMA weights when the run kept them).

    A file that is not a segadapt checkpoint is loaded as raw weights (the authors' formats)
    into ``cfg.model``; its classes then come from the evaluation dataset. ``checkpoint`` may be a run
    directory (:func:`checkpoint_file`).
    """
    checkpoint = checkpoint_file(checkpoint)
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as err:
        if "not a segadapt checkpoint" not in str(err):
            raise
        if cfg.model.num_classes is None:
            raise ConfigError(f"{checkpoint} holds raw weights: set model.name and model.num_classes to build the network") from None
        model = build_model(cfg.model.model_copy(update={"checkpoint": str(checkpoint), "pretrained": None}), cfg.model.num_classes)
        return model.eval(), None
    fields: dict[str, Any] = {k: tuple(map(tuple, v)) if k == "colors" else (tuple(v) if k == "names" else v) for k, v in state["classes"].items()}
    classes = ClassInfo(**fields)
    model_cfg = cfg.model.model_copy(update={"name": state["model_name"], "options": state["model_options"], "pretrained": None, "checkpoint": None})
    model = build_model(model_cfg, classes.num_classes)
    model.load_state_dict(state["eval_model"] if state.get("eval_model") is not None else state["model"])
    return model.eval(), classes
