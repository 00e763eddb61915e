"""``segadapt demo``: source-only, an adaptation method and the oracle on the embedded benchmark.

Generates the benchmark if absent, trains the packaged configs ``benchmark/source_only.yaml``
and ``benchmark/oracle.yaml`` and the adaptation ``methods`` (packaged ``benchmark/<method>.yaml``
configs; the command's default is :data:`DEFAULT_METHODS`, DARS-TD),
each method started from the demo's source-only model, evaluates them on the target validation
split, prints the per-class IoU table and writes ``report/report.md`` and
``report/predictions.png`` (image, ground truth, predictions), all in one table and figure. A
finished run found in the output folder is reused; an interrupted one is resumed.

The demo runs a shortened schedule so that a first run ends within 5 minutes on 2 CPU cores
(:data:`DEMO_BATCH_SIZE`, :data:`DEMO_ITERS_FRACTION`, :data:`DEMO_METHOD_OVERRIDES`; docs/RESULTS.md
section 7): every config at batch 4 instead of 8 for half its packaged iterations, and
self-training's pseudo labels without the flipped view. Its header and report say what ran; the
full protocol of docs/RESULTS.md's tables is the packaged configs as they are (``segadapt train
benchmark/<name>``), which this command leaves unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
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
"""What ``segadapt demo`` adapts with when ``--methods`` is not given: DARS-TD, second to CPSL as shipped over 3
warm-ups (44.3 against 46.5 mIoU; docs/RESULTS.md section 0) at two thirds of CPSL's step time, which keeps the demo
within its 5 minutes; ``--methods cpsl`` shows CPSL."""
DEMO_BATCH_SIZE = 4
"""The demo's images per stream and step: at most this (the packaged benchmark configs use 8)."""
DEMO_ITERS_FRACTION = 0.5
"""The share of each packaged config's ``train.iters`` the demo trains (with :data:`DEMO_BATCH_SIZE`, about a
quarter of the images the full protocol shows each run)."""
DEMO_CHECKPOINT_EVERY = 50
"""The demo's shortest runs still checkpoint mid-way, so a Ctrl-C loses at most this many iterations."""
DEMO_METHOD_OVERRIDES = {"self_training": ["pseudo_label.flip=false"]}
"""What the demo also changes for an adaptation method, by recipe: self-training (ST, CBST, DARS) labels the
target from the image alone, without averaging in the flipped view (half the pseudo-labelling passes' cost)."""
FULL_PROTOCOL = (
    "The full protocol of docs/RESULTS.md's benchmark tables runs the packaged configs as they are: segadapt train "
    "benchmark/source_only, then segadapt train benchmark/<method> model.checkpoint=<source-only's last.pt>, and segadapt "
    "train benchmark/oracle."
)
QUICK_OVERRIDES = ["train.iters=6", "train.log_every=2", "data.batch_size=2", "data.num_workers=0"]
QUICK_METHOD_OVERRIDES = {"cpsl": ["method.pixels_per_image=8", "method.queue_size=64"]}
"""What the smoke-test schedule also changes for a method: CPSL's sampling must fit tiny crops."""


@dataclass(frozen=True)
class DemoRun:
    """One training of the demo: its row name, its packaged config (name, and as RESULTS' tables run it) and what the demo trains."""

    name: str
    config: str
    packaged: RunConfig
    cfg: RunConfig


def demo_overrides(packaged: RunConfig) -> list[str]:
    """The demo's shortened schedule for one packaged benchmark config (module docstring)."""
    iters = max(1, round(packaged.train.iters * DEMO_ITERS_FRACTION))
    return [
        f"train.iters={iters}",
        f"data.batch_size={min(packaged.data.batch_size, DEMO_BATCH_SIZE)}",
        f"train.checkpoint_every={min(packaged.train.checkpoint_every, DEMO_CHECKPOINT_EVERY)}",
    ]


def demo_plan(
    output: Path, seed: int = 0, quick: bool = False, benchmark_size: str = "default", methods: Sequence[str] = ()
) -> list[DemoRun]:
    """The runs :func:`run_demo` trains, in order: source-only, each method (from source-only's model), the oracle."""
    for method in methods:
        packaged = packaged_config(f"benchmark/{method}")
        if method in ("source_only", "oracle") or method.startswith("_") or not packaged.exists():
            choices = sorted(p.stem for p in packaged.parent.glob("*.yaml") if not p.stem.startswith("_") and p.stem not in ("source_only", "oracle"))
            raise ConfigError(f"demo --methods: {method!r} is not an adaptation config of the benchmark; choose from {', '.join(choices)}")
    common = [f"output_dir={output}", f"seed={seed}"]
    common += [f"data.{part}.benchmark_size={benchmark_size}" for part in ("source", "target", "val")]
    warmup = output / load_config(packaged_config(DEMO_RECIPES[0][1]), common).name / "checkpoints" / "last.pt"
    wanted: list[tuple[str, str, list[str]]] = [(DEMO_RECIPES[0][0], DEMO_RECIPES[0][1], [])]
    wanted += [(method, f"benchmark/{method}.yaml", [f"model.checkpoint={warmup}"]) for method in methods]
    wanted += [(DEMO_RECIPES[1][0], DEMO_RECIPES[1][1], [])]
    plan = []
    for name, config, extra in wanted:
        packaged_cfg = load_config(packaged_config(config), common + extra)
        shortened = demo_overrides(packaged_cfg) + (DEMO_METHOD_OVERRIDES.get(packaged_cfg.recipe, []) if extra else [])
        smoke = QUICK_OVERRIDES + QUICK_METHOD_OVERRIDES.get(name, []) if quick else []
        plan.append(DemoRun(name, config, packaged_cfg, load_config(packaged_config(config), common + extra + shortened + smoke)))
    return plan


def schedule_header(plan: Sequence[DemoRun], quick: bool = False) -> list[str]:
    """What the demo trains, said before it starts and in its report: each run's iterations and batch, and the full protocol."""

    def schedule(cfgs: list[RunConfig]) -> str:
        runs = ", ".join(f"{run.name} {cfg.train.iters}" for run, cfg in zip(plan, cfgs))
        return f"{runs} iterations at batch {' or '.join(str(b) for b in sorted({cfg.data.batch_size for cfg in cfgs}))}"

    trained, packaged = schedule([run.cfg for run in plan]), schedule([run.packaged for run in plan])
    if quick:
        return [f"segadapt demo --quick: a smoke test, not a result: {trained}.", FULL_PROTOCOL]
    what = f"segadapt demo: a shortened schedule, {trained} (the packaged configs: {packaged})"
    if any(run.cfg.recipe == "self_training" for run in plan):
        what += "; self-training's pseudo labels without the flipped view"
    return [what + ".", FULL_PROTOCOL]


def _same_schedule(cfg: RunConfig) -> None:
    """Refuse to reuse or resume a run folder of the demo that another schedule trained (an older demo's, ``--quick``'s)."""
    saved = cfg.run_dir / "config.yaml"
    if not saved.exists():
        return
    before = load_config(saved)
    keys = {"train.iters": (before.train.iters, cfg.train.iters), "data.batch_size": (before.data.batch_size, cfg.data.batch_size)}
    differ = [f"{key} {old} (now {new})" for key, (old, new) in keys.items() if old != new]
    if differ:
        raise ConfigError(
            f"{cfg.run_dir} holds a run of another schedule ({', '.join(differ)}; an earlier demo's?); "
            "give the demo another --output, or move that folder away (nothing was changed)"
        )


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
    plan = demo_plan(output, seed=seed, quick=quick, benchmark_size=benchmark_size, methods=methods)
    header = schedule_header(plan, quick=quick)
    for line in header:
        print(line, file=sys.stderr)
    for run in plan:  # before any training: a stale run folder found after minutes of training would waste them
        _same_schedule(run.cfg)
    runs: dict[str, tuple[Path, RunConfig]] = {}
    results: dict[str, Any] = {}
    for run in plan:
        print(f"== {run.name}: training {run.cfg.recipe} for {run.cfg.train.iters} iterations in {run.cfg.run_dir}", file=sys.stderr)
        checkpoint, results[run.name] = _train_or_reuse(run.cfg)
        runs[run.name] = (checkpoint, run.cfg)

    report_dir = output / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    scores = {name: result["scores"] for name, result in results.items()}
    print(format_table(scores, style="terminal"))
    prediction_grid(runs).save(report_dir / "predictions.png")
    lines = [
        "# segadapt demo: embedded benchmark, target validation split",
        "",
        *[part for line in header for part in (line, "")],
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
