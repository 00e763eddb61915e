"""``segadapt demo``: source-only, an adaptation method and the oracle on the embedded benchmark.

Generates the benchmark if absent, trains the packaged configs ``benchmark/source_only.yaml``
and ``benchmark/oracle.yaml`` and the adaptation ``methods`` (packaged ``benchmark/<method>.yaml``
configs; the command's default is :data:`DEFAULT_METHODS`, the strongest method on the benchmark),
each method started from the demo's source-only model, evaluates them on the target validation
split, prints the per-class IoU table and writes ``report/report.md`` and
``report/predictions.png`` (image, ground truth, predictions), all in one table and figure. A
finished run found in the output folder is reused; an interrupted one is resumed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import RunConfig, load_config, packaged_config
from ..engine.trainer import Trainer, TrainingInterrupted
from ..errors import ConfigError
from ..metrics import format_table
from .evaluate import evaluate_checkpoint
from .report import prediction_grid

DEMO_RECIPES = (("source-only", "benchmark/source_only.yaml"), ("oracle", "benchmark/oracle.yaml"))
DEFAULT_METHODS = ("dars_td",)
"""What ``segadapt demo`` adapts with when ``--methods`` is not given: the method with the highest mean mIoU
on the benchmark over 3 warm-ups (docs/RESULTS.md, claims table)."""
QUICK_OVERRIDES = ["train.iters=6", "train.log_every=2", "data.batch_size=2", "data.num_workers=0"]
QUICK_METHOD_OVERRIDES = {"cpsl": ["method.pixels_per_image=8", "method.queue_size=64"]}
"""What the smoke-test schedule also changes for a method: CPSL's sampling must fit tiny crops."""


def _train_or_reuse(cfg: RunConfig) -> tuple[Path, dict[str, Any]]:
    """The run's last checkpoint and its evaluation on ``data.val``, training it first if unfinished."""
    last = cfg.run_dir / "checkpoints" / "last.pt"
    resume = last.exists()
    if resume and torch.load(last, map_location="cpu", weights_only=False)["iteration"] >= cfg.train.iters:
        print(f"reusing the finished run {cfg.run_dir}", file=sys.stderr)
        return last, evaluate_checkpoint(last, cfg.run_dir / "config.yaml")
    final = Trainer(cfg, resume=resume).fit()
    assert final is not None  # the demo configs evaluate on target/val at the last iteration
    return last, final


def run_demo(
    output: Path, seed: int = 0, quick: bool = False, benchmark_size: str = "default", methods: Sequence[str] = ()
) -> dict[str, Any]:
    """Train and compare; returns ``{run name: evaluation}``. ``quick`` is a smoke-test schedule."""
    for method in methods:
        packaged = packaged_config(f"benchmark/{method}")
        if method in ("source_only", "oracle") or method.startswith("_") or not packaged.exists():
            choices = sorted(p.stem for p in packaged.parent.glob("*.yaml") if not p.stem.startswith("_") and p.stem not in ("source_only", "oracle"))
            raise ConfigError(f"demo --methods: {method!r} is not an adaptation config of the benchmark; choose from {', '.join(choices)}")
    common = [f"output_dir={output}", f"seed={seed}"]
    common += [f"data.{part}.benchmark_size={benchmark_size}" for part in ("source", "target", "val")]
    plan: list[tuple[str, str, list[str]]] = [(DEMO_RECIPES[0][0], DEMO_RECIPES[0][1], [])]
    warmup = output / load_config(packaged_config(DEMO_RECIPES[0][1]), common).name / "checkpoints" / "last.pt"
    plan += [
        (method, f"benchmark/{method}.yaml", [f"model.checkpoint={warmup}", *(QUICK_METHOD_OVERRIDES.get(method, []) if quick else [])])
        for method in methods
    ]
    plan += [(DEMO_RECIPES[1][0], DEMO_RECIPES[1][1], [])]
    runs: dict[str, tuple[Path, RunConfig]] = {}
    results: dict[str, Any] = {}
    for name, config, extra in plan:
        cfg = load_config(packaged_config(config), common + extra + (QUICK_OVERRIDES if quick else []))
        print(f"== {name}: training {cfg.recipe} for {cfg.train.iters} iterations in {cfg.run_dir}", file=sys.stderr)
        checkpoint, results[name] = _train_or_reuse(cfg)
        runs[name] = (checkpoint, cfg)

    report_dir = output / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    scores = {name: result["scores"] for name, result in results.items()}
    print(format_table(scores, style="terminal"))
    prediction_grid(runs).save(report_dir / "predictions.png")
    lines = [
        "# segadapt demo: embedded benchmark, target validation split",
        "",
        f"Training seed {seed}; per-class IoU (%) at the last iteration.",
        "",
        format_table(scores, style="markdown"),
        "",
        "| run | mIoU | pixel accuracy | MPA |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {100 * s.miou:.1f} | {100 * s.pixel_accuracy:.1f} | {100 * s.mpa:.1f} |" for n, s in scores.items()],
        "",
        "![predictions](predictions.png)",
        "",
        "Columns of the figure: image, ground truth, " + ", ".join(scores) + ".",
    ]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {report_dir / 'report.md'}", file=sys.stderr)
    return results


def run(output: str | Path, seed: int = 0, quick: bool = False, methods: Sequence[str] = ()) -> int:
    """The command: :func:`run_demo`; an interrupted training says how to continue."""
    try:
        run_demo(Path(output), seed=seed, quick=quick, methods=methods)
    except TrainingInterrupted as err:
        raise TrainingInterrupted(f"{err}, or run the same `segadapt demo` command again") from None
    return 0
