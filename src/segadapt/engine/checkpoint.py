"""Atomic checkpoints and the random-number-generator state that makes resume exact."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from ..errors import CheckpointError, writing

TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], what: str) -> None:
    """``write`` into a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the previous file or the new one, never a torn file (a
    kill leaves the temporary ``.NAME.*.tmp`` behind: :func:`remove_partial_saves` clears it). A
    full or read-only disk raises one :class:`~segadapt.errors.OutputError` line naming ``what``
    and leaves the previous file as it was.
    """
    path = Path(path)
    with writing(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` of ``obj`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle), "checkpoint")


def remove_partial_saves(folder: str | Path) -> list[Path]:
    """Delete the temporary files a save killed mid-way left in ``folder``; returns what was removed."""
    removed = sorted(Path(folder).glob(f".*{TEMPORARY_SUFFIX}"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a segadapt checkpoint, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first or pass the path of a .pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it may be truncated") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a segadapt checkpoint (no 'model' entry); load raw weights with model.checkpoint=")
    return state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
