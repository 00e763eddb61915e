"""``segadapt report RUN_DIR [RUN_DIR ...]``: the figures of one or several runs, with a markdown page.

Figures (PNG, matplotlib with the Agg backend):

- ``curves.png``: training losses and validation mIoU / MPA over iterations (CPSL supplement Fig. 1);
- ``class_iou.png``: per-class IoU bars of the runs' last evaluations, side by side;
- ``class_distribution.png``: ground truth vs pseudo-label class distributions of every run that
  made pseudo labels (CPSL Fig. 6, DARS Tab. S7), on a log scale so tail classes show;
- ``predictions.png``: image, ground truth and each run's prediction on validation images;
- ``features.png``: a PCA view of the first run's pixel features on validation images, coloured by
  ground-truth class (BLV supplement Fig. 2 uses t-SNE; PCA is deterministic and dependency-free).

matplotlib is an optional dependency (``pip install segadapt[report]``): the rest of segadapt
never imports it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, SegadaptError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SegadaptError("segadapt report draws with matplotlib: pip install 'segadapt[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _records(run_dir: Path) -> list[dict[str, Any]]:
    from ..engine.logging import read_metrics

    if not (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no metrics.jsonl); pass the folder `segadapt train` wrote")
    return read_metrics(run_dir)


def _last_eval(records: list[dict[str, Any]]) -> dict[str, float] | None:
    evals = [r for r in records if "val/miou" in r]
    return evals[-1] if evals else None


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    plt = _pyplot()
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        steps = [r for r in records if "loss" in r]
        for key in sorted({k for r in steps for k in r if k.startswith("loss")}):
            points = [(r["iter"], r[key]) for r in steps if key in r]
            loss_ax.plot(*zip(*points), label=f"{name}: {key}", linewidth=1)
        evals = [r for r in records if "val/miou" in r]
        if evals:
            score_ax.plot([r["iter"] for r in evals], [100 * r["val/miou"] for r in evals], marker="o", label=f"{name}: mIoU")
            if "val/mpa" in evals[0]:
                score_ax.plot([r["iter"] for r in evals], [100 * r["val/mpa"] for r in evals], marker="x", linestyle="--", label=f"{name}: MPA")
    loss_ax.set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
    score_ax.set(xlabel="iteration", ylabel="%", title="validation")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_class_iou(scores: dict[str, dict[str, float]], class_names: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(class_names)), 4))
    width = 0.8 / max(len(scores), 1)
    x = np.arange(len(class_names))
    for index, (name, flat) in enumerate(scores.items()):
        values = [100 * (flat.get(f"val/iou/{c}") or 0.0) for c in class_names]
        ax.bar(x + index * width, values, width, label=f"{name} ({100 * flat['val/miou']:.1f} mIoU)")
    ax.set_xticks(x + width * (len(scores) - 1) / 2, class_names, rotation=60, ha="right")
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title="per-class IoU, last evaluation")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_class_distribution(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    first = next(iter(summaries.values()))
    names = first["classes"]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names)), 4))
    series: dict[str, list[float]] = {}
    if "target_class_counts" in first:
        total = max(sum(first["target_class_counts"]), 1)
        series["ground truth"] = [100 * c / total for c in first["target_class_counts"]]
    for run, summary in summaries.items():
        total = max(sum(summary["class_counts"]), 1)
        kl = summary.get("kl_to_target")
        series[f"{run} ({summary['rule']}" + (f", KL {kl:.3f})" if kl is not None else ")")] = [100 * c / total for c in summary["class_counts"]]
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for index, (label, values) in enumerate(series.items()):
        ax.bar(x + index * width, np.maximum(values, 1e-4), width, label=label)
    ax.set_xticks(x + width * (len(series) - 1) / 2, names, rotation=60, ha="right")
    ax.set(ylabel="share of pixels (%, log; 0 drawn at 1e-4)", yscale="log", title="class distribution: ground truth vs pseudo labels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """The first two principal components of ``features [M, D]`` (centred), ``[M, 2]``."""
    centred = features - features.mean(0, keepdim=True)
    _, _, vectors = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vectors[:2].T


def plot_features(model: Any, dataset: Any, device: torch.device, path: Path, pixels: int = 4000, seed: int = 0) -> None:
    """PCA of ``model``'s features at labelled pixels of up to 16 images, coloured by ground truth."""
    plt = _pyplot()
    generator = torch.Generator().manual_seed(seed)
    gathered, classes = [], []
    with torch.no_grad():
        for index in range(min(len(dataset), 16)):
            sample = dataset[index]
            features = model(sample["image"][None].to(device)).features[0].float().cpu()
            label = torch.nn.functional.interpolate(sample["label"][None, None].float(), size=features.shape[-2:], mode="nearest")[0, 0].long()
            valid = label != dataset.classes.ignore_index
            gathered.append(features.permute(1, 2, 0)[valid])
            classes.append(label[valid])
    features, labels = torch.cat(gathered), torch.cat(classes)
    chosen = torch.randperm(len(labels), generator=generator)[:pixels]
    points = pca_2d(torch.nn.functional.normalize(features[chosen], dim=1)).numpy()
    palette = np.asarray(dataset.classes.palette(), dtype=np.float64).reshape(-1, 3)[: dataset.classes.num_classes] / 255.0
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(points[:, 0], points[:, 1], c=palette[labels[chosen].numpy()], s=3)
    for class_id in labels[chosen].unique().tolist():
        ax.scatter([], [], c=[palette[class_id]], label=dataset.classes.names[class_id], s=12)
    ax.set(title="pixel features (PCA of L2-normalised features)", xticks=[], yticks=[])
    ax.legend(fontsize=6, ncol=2, markerscale=1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, images: int = 4) -> Path:
    """Draw every figure the runs allow into ``out_dir`` and write ``out_dir/report.md``; returns its path."""
    from ..config import load_config
    from ..engine.builders import build_dataset_from_spec, resolve_device
    from ..engine.demo import prediction_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = [Path(r) for r in run_dirs]
    runs = {r.name: _records(r) for r in run_dirs}
    lines = ["# segadapt report", "", "Runs: " + ", ".join(f"`{r}`" for r in run_dirs), ""]

    plot_curves(runs, out_dir / "curves.png")
    lines += ["## Training curves", "", "![curves](curves.png)", ""]

    scores = {name: ev for name, records in runs.items() if (ev := _last_eval(records)) is not None}
    cfg = load_config(run_dirs[0] / "config.yaml")
    if scores and cfg.data.val is not None:
        dataset = build_dataset_from_spec(cfg.data.val, with_labels=True)
        names = list(dataset.classes.names)
        plot_class_iou(scores, names, out_dir / "class_iou.png")
        lines += ["## Per-class IoU (last evaluation)", "", "![class IoU](class_iou.png)", ""]
        lines += ["| run | mIoU | MPA |", "|---|---:|---:|"]
        lines += [f"| {n} | {100 * s['val/miou']:.1f} | {100 * s.get('val/mpa', math.nan):.1f} |" for n, s in scores.items()]
        lines.append("")
        checkpoints = {r.name: (r / "checkpoints" / "last.pt", load_config(r / "config.yaml")) for r in run_dirs if (r / "checkpoints" / "last.pt").exists()}
        if checkpoints:
            prediction_grid(checkpoints, count=images).save(out_dir / "predictions.png")
            lines += ["## Predictions on validation images", "", "![predictions](predictions.png)", "",
                      "Columns: image, ground truth, " + ", ".join(checkpoints) + ".", ""]
            from ..engine.loading import load_trained_model

            first_ckpt, first_cfg = next(iter(checkpoints.values()))
            device = resolve_device(first_cfg.device)
            model = load_trained_model(first_ckpt, first_cfg)[0].to(device)
            plot_features(model, dataset, device, out_dir / "features.png")
            lines += ["## Feature space", "", f"PCA of `{next(iter(checkpoints))}`'s pixel features, coloured by class.", "", "![features](features.png)", ""]

    summaries = {r.name: json.loads((r / "pseudo_labels" / "summary.json").read_text()) for r in run_dirs if (r / "pseudo_labels" / "summary.json").exists()}
    if summaries:
        plot_class_distribution(summaries, out_dir / "class_distribution.png")
        lines += ["## Pseudo-label class distribution", "", "![class distribution](class_distribution.png)", ""]
        lines += ["| run | rule | density | accuracy | KL(labels ‖ truth) |", "|---|---|---:|---:|---:|"]
        for name, s in summaries.items():
            acc, kl = s.get("accuracy"), s.get("kl_to_target")
            lines.append(f"| {name} | {s['rule']} | {s['density']:.3f} | {'-' if acc is None else f'{acc:.3f}'} | {'-' if kl is None else f'{kl:.3f}'} |")
        lines.append("")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
