"""Run logs: ``metrics.jsonl`` (one JSON object per line), TensorBoard when installed, training progress (a bar or lines)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..errors import writing
from ..progress import bar_enabled, format_duration, progress


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and, when tensorboard is installed, to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard is optional: ImportError, or a broken install
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with writing(self.path, "the metrics log"), self.path.open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        if self.writer is not None:
            step = int(record.get("iter", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter" and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration``: a resumed run rewrites what the killed run logged after its checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("iter", 0) <= iteration]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Progress:
    """Training progress: iteration, losses, speed and ETA.

    In a terminal (stderr a TTY, ``SEGADAPT_PROGRESS`` not ``0``, main rank) a live bar moved
    every iteration by :meth:`advance`, the latest losses (from :meth:`show`) as its postfix. In a
    log file, one :meth:`line` per :meth:`show` call (every ``train.log_every`` iterations)::

        [run] it 100/1000 | loss 0.5213 | 3.10 it/s | ETA 04:50
    """

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, prefix: str = "") -> None:
        self.total, self.start, self.prefix = total, start, prefix
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.live = bar_enabled(self.stream)
        self._bar: Any = None
        self._closed = False

    def line(self, iteration: int, values: dict[str, float]) -> str:
        done = iteration - self.start
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("nan")
        eta_text = format_duration(eta) if math.isfinite(eta) else "--:--"
        return f"{self.prefix}it {iteration}/{self.total} | {self.values_text(values)} | {rate:.2f} it/s | ETA {eta_text}"

    @staticmethod
    def values_text(values: dict[str, float]) -> str:
        return " ".join(f"{key} {value:.4g}" for key, value in values.items())

    def _live_bar(self) -> Any:
        if self._bar is None:
            self._bar = progress(total=self.total, desc=self.prefix.strip(), unit="it", stream=self.stream, initial=self.start)
        return self._bar

    def advance(self, iteration: int) -> None:
        """Move the bar to ``iteration`` (cheap: call it every iteration); a no-op outside a terminal."""
        if not self.live or self._closed or iteration <= self.start or (self._bar is not None and iteration <= self._bar.n):
            return
        bar = self._live_bar()
        bar.update(iteration - bar.n)

    def show(self, iteration: int, values: dict[str, float]) -> None:
        """Report the losses at ``iteration``: the bar's postfix in a terminal (which ends the bar at ``total``), a :meth:`line` otherwise."""
        if not self.live:
            print(self.line(iteration, values), file=self.stream, flush=True)
            return
        if self._closed:
            return
        bar = self._live_bar()
        bar.set_postfix_str(self.values_text(values), refresh=False)
        bar.update(max(iteration - bar.n, 0))
        if iteration >= self.total:
            self.close()
        else:
            bar.refresh()

    def close(self) -> None:
        """Finish the bar (it stays on screen); :meth:`show` does it at ``total``."""
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
