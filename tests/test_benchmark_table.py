"""benchmarks/benchmark_table.py: how a variant's overrides name the seed's earlier runs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # last: a benchmark script never shadows a module
import benchmark_table  # noqa: E402


def test_seed_and_output_are_filled_in_and_other_braces_stay() -> None:
    output = Path("runs/pipeline")
    assert benchmark_table.fill_in("method.teacher={output}/cpsl_s{seed}/checkpoints/last.pt", 2, output) == (
        "method.teacher=runs/pipeline/cpsl_s2/checkpoints/last.pt"
    )
    flow = "data.train_transforms=[{name: random_crop, size: [64, 128]}]"  # a YAML list of mappings
    assert benchmark_table.fill_in(flow, 0, output) == flow
