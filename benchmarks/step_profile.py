"""Where a training step's time goes on the embedded benchmark: data pipeline, forward, backward, optimiser.

Builds each packaged benchmark config with the real trainer (real data, loaders and transforms) and
times its phases over ``--steps`` steps after ``--warmup``: fetching and collating the batches of
every stream (the loader with ``data.num_workers``), the recipe's ``training_step`` (forwards,
pseudo labels, the method's computations), the backward pass, and the optimiser step with the
recipe's momentum updates. ``train.stream_backward`` is switched off so that the forward and
backward phases are measured apart. Not run by the tests. Usage::

    python benchmarks/step_profile.py --configs benchmark/source_only benchmark/dars_td benchmark/cpsl \\
        --warmup checkpoint.pt --threads 2

``--warmup-checkpoint`` is the source-only model the adaptation configs start from (any
``segadapt train benchmark/source_only`` run). Prints a markdown table (ms per phase and share of
the step), the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from segadapt.config import load_config
from segadapt.engine.trainer import Trainer, _to_device

PHASES = ("data", "forward", "backward", "optimiser")


def profile(config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    """Mean seconds per phase over ``steps`` steps after ``warmup`` steps."""
    trainer = Trainer(load_config(config, overrides), log=lambda _: None)
    loaders = trainer._loaders()
    recipe, optimizer = trainer.recipe, trainer.optimizer
    totals = dict.fromkeys(PHASES, 0.0)
    for step in range(warmup + steps):
        marks = [time.perf_counter()]
        batches = {name: _to_device(next(loader), trainer.device) for name, loader in loaders.items()}
        marks.append(time.perf_counter())
        recipe.train()
        optimizer.zero_grad(set_to_none=True)
        losses = recipe.training_step(batches, step)
        marks.append(time.perf_counter())
        losses["loss"].backward()
        marks.append(time.perf_counter())
        optimizer.step()
        trainer.scheduler.step()
        recipe.after_optimizer_step(step + 1)
        marks.append(time.perf_counter())
        if step >= warmup:
            for phase, start, end in zip(PHASES, marks, marks[1:]):
                totals[phase] += (end - start) / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["benchmark/source_only", "benchmark/dars_td", "benchmark/cpsl", "benchmark/oracle"])
    parser.add_argument("--warmup-checkpoint", type=Path, help="model.checkpoint of the adaptation configs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads; torch {torch.__version__}; "
          f"{datetime.date.today()}; mean of {args.steps} steps after {args.warmup}")
    print("| config | " + " | ".join(f"{p} ms" for p in PHASES) + " | step ms | " + " | ".join(f"{p} %" for p in PHASES) + " |")
    print("|---|" + "---:|" * (2 * len(PHASES) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            overrides = [f"output_dir={tmp}", f"name={config.replace('/', '_')}", "train.stream_backward=false", f"train.threads={args.threads}"]
            if args.warmup_checkpoint and not config.endswith(("source_only", "oracle")):
                overrides.append(f"model.checkpoint={args.warmup_checkpoint}")
            if config.endswith("cpsl_distill"):
                overrides.append(f"method.teacher={args.warmup_checkpoint}")
            times = profile(config, overrides, args.steps, args.warmup)
            total = sum(times.values())
            cells = [f"{1000 * times[p]:.0f}" for p in PHASES] + [f"{1000 * total:.0f}"] + [f"{100 * times[p] / total:.0f}" for p in PHASES]
            print(f"| {config} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
