"""Run logs: ``metrics.jsonl`` (one JSON object per line), TensorBoard when installed, a progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


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
        with self.path.open("a") as handle:
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


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A one-line progress report: iteration, losses, learning rate, speed and ETA."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, prefix: str = "") -> None:
        self.total, self.start, self.prefix = total, start, prefix
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    def line(self, iteration: int, values: dict[str, float]) -> str:
        done = iteration - self.start
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{key} {value:.4g}" for key, value in values.items())
        eta_text = format_duration(eta) if math.isfinite(eta) else "--:--"
        return f"{self.prefix}it {iteration}/{self.total} | {shown} | {rate:.2f} it/s | ETA {eta_text}"

    def show(self, iteration: int, values: dict[str, float]) -> None:
        print(self.line(iteration, values), file=self.stream, flush=True)
