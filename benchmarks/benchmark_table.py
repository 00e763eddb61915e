"""Train methods on the embedded benchmark over several seeds and print the tables of docs/RESULTS.md.

For each seed: the source-only warm-up and the oracle (packaged configs
``benchmark/source_only`` and ``benchmark/oracle``), then every self-training method starting
from that seed's warm-up (``benchmark/<method>.yaml`` with ``model.checkpoint`` set). Finished
runs in ``--output`` are reused, so the script can be interrupted and run again. Usage::

    python benchmarks/benchmark_table.py --output runs/table --seeds 0 1 2 \
        --methods st cbst dars_sd dars_td

``--variant LABEL CONFIG OVERRIDE...`` adds a method with overrides (an ablation of one option)::

    python benchmarks/benchmark_table.py --output runs/table --methods cpsl \
        --variant cpsl_adamw_head cpsl optim.method_head_optimizer=same

``{seed}`` and ``{output}`` in an override name the seed's earlier runs: CPSL's pipeline (adversarial
warm-up, stage 1, distillation into a fresh student, CPSL Sec. 4.1-4.2) is ::

    python benchmarks/benchmark_table.py --output runs/pipeline --warmup adversarial_warmup --no-oracle \
        --methods cpsl --variant cpsl_distill cpsl_distill model.checkpoint=null \
        "method.teacher={output}/cpsl_s{seed}/checkpoints/last.pt"

``--warmup`` names another warm-up config: the DAFormer network's table is ::

    python benchmarks/benchmark_table.py --output runs/daformer --warmup source_only_mitb0 --no-oracle \
        --methods dacs_mitb0 daformer daformer_blv

Two processes with different ``--seeds`` and the same ``--output`` share the work on two cores; a
last call with all the seeds prints the table from the finished runs.

Prints markdown: mIoU mean +- std over seeds per method, per-class IoU means, the tail classes,
and for pseudo-label methods the density, accuracy and KL divergence of their labels (DARS
Tab. S7's form). ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from segadapt.data.benchmark import CLASSES

TAIL = ("traffic light", "traffic sign", "rider", "train", "motorcycle", "bicycle")


def train(config: str, output: Path, seed: int, extra: list[str], threads: int, label: str | None = None) -> tuple[dict[str, Any], float]:
    """Run ``segadapt train`` (reusing a finished run); returns the final evaluation and the wall time."""
    name = f"{label or Path(config).stem}_s{seed}"
    run = output / name
    scores_file = run / "final_scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text()), 0.0
    last = run / "checkpoints" / "last.pt"
    args = [sys.executable, "-m", "segadapt", "train", config, f"output_dir={output}", f"name={name}", f"seed={seed}", *extra]
    if last.exists():
        args.append("resume=true")
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(args, check=True, env=env)
    wall = time.perf_counter() - start
    ev = [sys.executable, "-m", "segadapt", "eval", str(last), "--json", str(scores_file)]
    subprocess.run(ev, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(scores_file.read_text()), wall


def fill_in(override: str, seed: int, output: Path) -> str:
    """``override`` with ``{seed}`` and ``{output}`` replaced; other braces (a YAML list of mappings) stay."""
    return override.replace("{seed}", str(seed)).replace("{output}", str(output))


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/table"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["st", "cbst", "dars_sd", "dars_td"])
    parser.add_argument("--warmup", default="source_only", help="the warm-up config every method starts from")
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL CONFIG", "OVERRIDE"),
        help="a method with overrides, run as LABEL_s<seed>: --variant cpsl_adamw_head cpsl optim.method_head_optimizer=same; "
        "{seed} and {output} in an override are filled in",
    )
    args = parser.parse_args()
    for variant in args.variant:
        if len(variant) < 2:
            parser.error(f"--variant {' '.join(variant)}: give a label, a benchmark config and overrides")
    plan = [(method, method, []) for method in args.methods] + [(v[0], v[1], v[2:]) for v in args.variant]

    results: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, list[dict[str, Any]]] = {}
    walls: dict[str, list[float]] = {}
    for seed in args.seeds:
        warmup, wall = train(f"benchmark/{args.warmup}", args.output, seed, [], args.threads)
        results.setdefault("source-only", []).append(warmup)
        walls.setdefault("source-only", []).append(wall)
        if not args.no_oracle:
            oracle, wall = train("benchmark/oracle", args.output, seed, [], args.threads)
            results.setdefault("oracle", []).append(oracle)
            walls.setdefault("oracle", []).append(wall)
        checkpoint = args.output / f"{args.warmup}_s{seed}" / "checkpoints" / "last.pt"
        for method, config, overrides in plan:
            filled = [fill_in(override, seed, args.output) for override in overrides]
            scores, wall = train(f"benchmark/{config}", args.output, seed, [f"model.checkpoint={checkpoint}", *filled], args.threads, method)
            results.setdefault(method, []).append(scores)
            walls.setdefault(method, []).append(wall)
            summary = args.output / f"{method}_s{seed}" / "pseudo_labels" / "summary.json"
            if summary.exists():
                labels.setdefault(method, []).append(json.loads(summary.read_text()))

    print(f"<!-- {platform.node()} {os.cpu_count()} CPUs, {datetime.date.today()}, seeds {args.seeds} -->")
    print("| method | mIoU | MPA | " + " | ".join(TAIL) + " |")
    print("|---|---:|---:|" + "---:|" * len(TAIL))
    for method, runs in results.items():
        tail = [mean_std([r[f"iou/{c}"] for r in runs]) for c in TAIL]
        print(f"| {method} | {mean_std([r['miou'] for r in runs])} | {mean_std([r['mpa'] for r in runs])} | " + " | ".join(tail) + " |")
    print()
    print("| class | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in CLASSES.names:
        cells = [f"{100 * statistics.mean(r[f'iou/{name}'] for r in runs):.1f}" for runs in results.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if labels:
        print()
        print("| pseudo labels | density | accuracy | KL(labels ‖ truth) |")
        print("|---|---:|---:|---:|")
        for method, summaries in labels.items():
            kl = [s["kl_to_target"] for s in summaries]
            kl_text = f"{statistics.mean(kl):.3f}" + (f" ± {statistics.stdev(kl):.3f}" if len(kl) > 1 else "")
            print(f"| {method} | {mean_std([s['density'] for s in summaries])} | {mean_std([s['accuracy'] for s in summaries])} | {kl_text} |")
    print()
    print("Training wall time per run (s): " + ", ".join(f"{m} {statistics.mean(w):.0f}" for m, w in walls.items() if any(w)))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "labels": labels, "walls": walls}, indent=2))


if __name__ == "__main__":
    main()
