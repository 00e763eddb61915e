"""Live progress for long work: a tqdm bar in a terminal, plain lines in a log file.

Below every layer (it imports nothing of segadapt), so ``data/`` (benchmark generation) and
``engine/`` (training, evaluation, pseudo labelling) share this one implementation.

- **Terminal** (the stream, stderr by default, is a TTY): :func:`progress` returns a
  ``tqdm`` bar: count, total, elapsed time, ETA and rate, e.g.
  ``evaluate:  40%|████      | 60/150 [00:04<00:06, 14.2img/s]``.
- **Log file** (not a TTY), or ``SEGADAPT_PROGRESS=0`` in the environment: no bar; the caller's
  usual lines, plus at most one plain line when the work ends (the ``done`` template, e.g.
  ``evaluated 150 images in 00:10``).
- **Non-main torchrun ranks** (``RANK`` set and not 0): nothing at all, neither bar nor line.

Examples:
    >>> import io
    >>> log = io.StringIO()  # not a TTY: the plain line only
    >>> total = sum(progress(range(3), total=3, desc="sum", stream=log, done="added {n} numbers"))
    >>> log.getvalue()
    'added 3 numbers\\n'
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

ENV_VAR = "SEGADAPT_PROGRESS"
"""``SEGADAPT_PROGRESS=0`` (or ``false``, ``no``, ``off``) turns the bar off even in a terminal."""

_OFF = {"0", "false", "no", "off"}


def format_duration(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on (negative durations read as 0)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def is_main_rank() -> bool:
    """False on the non-zero ranks of a torchrun job (``RANK`` in the environment), True otherwise."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def bar_enabled(stream: TextIO | None = None) -> bool:
    """Whether :func:`progress` draws a bar on ``stream`` (default stderr): a TTY, not turned off, main rank."""
    stream = sys.stderr if stream is None else stream
    if os.environ.get(ENV_VAR, "").strip().lower() in _OFF or not is_main_rank():
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """The stand-in for the bar outside a terminal: counts, and prints the ``done`` line once at the end.

    It has the parts of tqdm's interface the callers use (iteration, ``update``,
    ``set_postfix_str``, ``close``, ``with``), so call sites do not branch.
    """

    def __init__(
        self, iterable: Iterable[Any] | None, total: int | None, desc: str, stream: TextIO | None, done: str | None, initial: int = 0
    ) -> None:
        self.iterable, self.total, self.desc, self.done = iterable, total, desc, done
        self.stream = stream
        self.n = self.initial = initial
        self.started = time.perf_counter()
        self.closed = False
        self.quiet = not is_main_rank()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "progress() without an iterable: call update() instead"
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.closed = True  # failed work: no "done" line

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.done is not None and not self.quiet:
            elapsed = time.perf_counter() - self.started
            line = self.done.format(n=self.n, total=self.total, desc=self.desc, elapsed=format_duration(elapsed))
            print(line, file=sys.stderr if self.stream is None else self.stream, flush=True)


def progress(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    stream: TextIO | None = None,
    done: str | None = None,
    initial: int = 0,
    leave: bool | None = None,
) -> Any:
    """A live bar over ``iterable`` (or one advanced with ``update(n)``) in a terminal; otherwise plain.

    Args:
        iterable: what to iterate (None: call ``update(n)`` yourself, e.g. once per batch).
        total: the expected count (``len(iterable)`` when it has one); the bar's 100 %.
        desc: the bar's label.
        unit: what is counted (``img``, ``it``); the rate reads ``<rate><unit>/s``.
        stream: where to write; stderr by default. Tests pass a stream whose ``isatty()`` is True.
        done: outside a terminal, one line printed when the work ends; a ``str.format`` template
            with ``{n}`` (count), ``{total}``, ``{desc}`` and ``{elapsed}`` (``MM:SS``). None: no line.
        initial: the count already done (a resumed run).
        leave: keep the finished bar on screen (None: only when it is the outermost bar).

    Returns:
        a ``tqdm`` bar, or a :class:`PlainProgress`; both iterate, ``update``, ``set_postfix_str``,
        ``close`` and work as context managers.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not bar_enabled(stream):
        return PlainProgress(iterable, total, desc, stream, done, initial)
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr if stream is None else stream,
        initial=initial,
        leave=leave,
        dynamic_ncols=True,
    )


def write(text: str, stream: TextIO | None = None) -> None:
    """Print a line to ``stream`` (default stderr) without breaking a live bar (``tqdm.write`` when one is drawn)."""
    target = sys.stderr if stream is None else stream
    if bar_enabled(target):
        from tqdm import tqdm

        tqdm.write(text, file=target)
        target.flush()
    else:
        print(text, file=target, flush=True)
