"""Work a run caches in its directory, and the one rule that decides when it is reused.

Some results take minutes to make and are needed again on every start of a run (a resume, a
restarted round): CPSL's warm-up statistics (``cpsl_init.pt``), BiCL's source class-occurrence
table (``source_class_pixels.pt``, the per-image class pixels behind BiCL's weighted and DAFormer's
rare-class sampling), BLV's class counts (``blv_class_counts.json``) and offline
pseudo labels (``pseudo_labels/``). Each goes through :func:`reuse_or_make` with a *key*: a JSON
record of everything that made the result (the content of a checkpoint, the config sections read,
the datasets). One rule for all of them:

- the key recorded beside the result equals this start's key: the result is reused;
- otherwise (no result, no record of what made it, or other inputs) it is made again, and the log
  says why, naming the inputs that changed.

The record is ``<stem>.key.json`` beside the result (``cpsl_init.key.json``,
``pseudo_labels.key.json``). It is removed before a result is remade and written, atomically, only
after the result is complete, so a start killed mid-way never leaves a result that looks reusable.
Results that are single files are written atomically too (:func:`atomic_write_text`,
:func:`~segadapt.engine.checkpoint.atomic_save`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import CheckpointError
from .checkpoint import atomic_write

KEY_SUFFIX = ".key.json"


def key_path(result: str | Path) -> Path:
    """Where the key of ``result`` is recorded: ``RUN_DIR/cpsl_init.pt`` -> ``RUN_DIR/cpsl_init.key.json``."""
    result = Path(result)
    return result.with_name(result.stem + KEY_SUFFIX)


def file_fingerprint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """What identifies a file's content in a key: its size and SHA-256.

    Neither its path nor its modification time: a checkpoint copied or moved with its run is the
    same input, one overwritten by a continued run is another. Hashed once per process and version
    of the file (a few hundred MB take about a second).

    Raises:
        CheckpointError: ``path`` is not a file (``what`` names it in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; train first or pass the path of a .pt file")
    stat = path.stat()
    return {"bytes": stat.st_size, "sha256": _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> None:
    """Write ``text`` to a temporary file in the same folder and rename it over ``path`` (never a torn file)."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), what)


def _normalised(key: Mapping[str, Any]) -> dict[str, Any]:
    """``key`` as it reads back from JSON (tuples become lists, keys strings), so the comparison is exact."""
    return json.loads(json.dumps(dict(key), sort_keys=True, default=str))


def stale_reason(result: str | Path, key: Mapping[str, Any]) -> str | None:
    """None when ``result`` exists and was made from ``key``; otherwise why it must be made again."""
    result = Path(result)
    if not result.exists():
        return "not made yet"
    try:
        recorded = json.loads(key_path(result).read_text())
    except (OSError, ValueError):
        return f"no record of what made it ({key_path(result).name})"
    wanted = _normalised(key)
    if recorded == wanted:
        return None
    changed = sorted(name for name in set(recorded) | set(wanted) if recorded.get(name) != wanted.get(name))
    return f"made from other inputs (changed: {', '.join(changed)})"


def reuse_or_make(
    result: str | Path,
    key: Mapping[str, Any],
    make: Callable[[], Any],
    log: Callable[[str], None],
    what: str,
    writer: bool = True,
) -> bool:
    """Reuse ``result`` if it was made from ``key``, else call ``make()`` (which writes it) and record ``key``.

    Args:
        result: the file or folder ``make`` writes.
        key: JSON-ready record of everything ``make`` reads (module docstring).
        make: writes ``result`` completely (atomically, for a file) when called.
        log: receives one line: reused, or made again and why.
        what: the result, for the log (``"cpsl: warm-up statistics"``).
        writer: False on the processes of a collective ``make`` that must not write the record
            (torchrun ranks other than 0); they still take the same decision, from the same record.

    Returns:
        True when the result was reused.
    """
    result = Path(result)
    reason = stale_reason(result, key)
    if reason is None:
        log(f"{what}: reusing {result}")
        return True
    log(f"{what}: making {result} ({reason})")
    if writer:
        key_path(result).unlink(missing_ok=True)
    make()
    if writer:
        atomic_write_text(key_path(result), json.dumps(_normalised(key), indent=2, sort_keys=True) + "\n", "cache key")
    return False
