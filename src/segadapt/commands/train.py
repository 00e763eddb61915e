"""``segadapt train CONFIG|RUN_DIR``: train a recipe, or continue a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..config import load_config, load_run_directory_config
from ..engine.distributed import is_main_process
from ..engine.trainer import Trainer


def split_resume(overrides: Sequence[str]) -> tuple[list[str], bool]:
    """``resume=true`` is an action, not a config value: take it out of the overrides."""
    kept, resume = [], False
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "resume":
            resume = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            kept.append(item)
    return kept, resume


def run(config: str, overrides: Sequence[str] = (), resume: bool = False) -> int:
    """The command: train ``config`` (a file, a packaged name or a run directory); print the run directory and the final table.

    A run directory is the run: its saved config, written back there, resumed by default when it has a ``last.pt``.
    """
    overrides, resume_override = split_resume(overrides)
    resume = resume_override or resume
    path = Path(config)
    if path.is_dir():
        cfg = load_run_directory_config(path, overrides)
        resume = resume or (cfg.run_dir / "checkpoints" / "last.pt").exists()
    else:
        cfg = load_config(path, overrides)
    scores = Trainer(cfg, resume=resume).fit()
    if is_main_process():  # under torchrun every process returns here: one table
        print(f"run directory: {cfg.run_dir}")
        if scores is not None:
            print(scores["table"])
    return 0
