"""Errors a user can cause. Each message names the file or key at fault and the fix."""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
from typing import Iterable, Iterator

# torch's ExceptionWrapper re-raises an error from a DataLoader worker (or pin-memory thread) in
# the main process as ``type(error)(f"Caught {name} {where}.\nOriginal {formatted traceback}")``.
_WORKER_WRAPPER = re.compile(r"Caught \w+ in [^\n]*\.\nOriginal Traceback \(most recent call last\):\n")


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "", cutoff: float = 0.6) -> str:
    """``"; did you mean 'PREFIX<closest>'?"`` for the choice closest to ``word``, or ``""`` when none is close.

    The one did-you-mean of segadapt's messages: config keys, registries, packaged config names.
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


class SegadaptError(Exception):
    """Base class of every error segadapt raises on purpose.

    Raised in a DataLoader worker, it reaches the main process rebuilt by torch from a message
    holding the worker's whole traceback; the constructor keeps only the original message, so
    ``num_workers > 0`` reports the same one line as ``num_workers=0``.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _unwrap_worker_message(message: str, error_type: type[BaseException]) -> str:
    """The original message inside torch's worker wrapper text; other messages unchanged."""
    if not _WORKER_WRAPPER.match(message):
        return message
    # format_exception ends with "<module>.<qualname>: <message>" of the raised error (after any
    # chained causes, which come first); the message itself may span several lines.
    head = f"{error_type.__module__}.{error_type.__qualname__}: "
    start = message.rfind(head)
    return message[start + len(head):].rstrip("\n") if start >= 0 else message


class ConfigError(SegadaptError, ValueError):
    """A config file or command-line override is invalid."""


class DataError(SegadaptError, ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


class CheckpointError(SegadaptError, ValueError):
    """A checkpoint or weight file cannot be loaded into a model."""


class OutputError(SegadaptError, OSError):
    """A file or folder segadapt must write cannot be written (permissions, read-only or full disk)."""


_OUTPUT_FIXES = {
    errno.ENOSPC: "free space on that disk, or set output_dir= to another disk",
    errno.EDQUOT: "free space in your quota, or set output_dir= to another disk",
    errno.EACCES: "make the folder writable, or set output_dir= to a writable folder",
    errno.EPERM: "make the folder writable, or set output_dir= to a writable folder",
    errno.EROFS: "the disk is mounted read-only; set output_dir= to a writable folder",
    errno.ENOTDIR: "a file stands where a folder is needed; set output_dir= to a folder",
    errno.EEXIST: "a file stands where a folder is needed; set output_dir= to a folder",
}


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into one :class:`OutputError` line: the path, the cause, the fix.

    Examples:
        >>> with writing("/runs/x/checkpoints/last.pt", "checkpoint"):
        ...     raise OSError(errno.ENOSPC, "No space left on device")
        Traceback (most recent call last):
        ...
        segadapt.errors.OutputError: cannot write checkpoint /runs/x/checkpoints/last.pt: No space left on device; free space on that disk, or set output_dir= to another disk
    """  # noqa: E501 (the doctest's exception message is one line)
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        cause = err.strerror or str(err) or type(err).__name__
        fix = _OUTPUT_FIXES.get(err.errno or -1, "check the folder, or set output_dir= to another folder")
        raise OutputError(f"cannot write {what} {path}: {cause}; {fix}") from err
