"""``segadapt make-benchmark``: generate the embedded benchmark (cached under ``$SEGADAPT_HOME``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.benchmark import default_benchmark_dir, ensure_benchmark, generate_benchmark


def run(root: str | None = None, seed: int = 0, size: str = "default", force: bool = False) -> int:
    """The command: generate (``force``: regenerate) the benchmark; print where it is and its counts."""
    if force:
        folder = generate_benchmark(Path(root) if root else default_benchmark_dir(seed, size), seed=seed, size=size)
    else:
        folder = ensure_benchmark(root, seed=seed, size=size)
    summary = json.loads((folder / "benchmark.json").read_text())
    print(f"embedded benchmark ({size}, seed {seed}) at {folder}")
    print(json.dumps(summary.get("counts", {}), indent=None))
    return 0
