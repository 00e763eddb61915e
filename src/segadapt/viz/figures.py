"""The figures of ``segadapt report`` (PNG, matplotlib with the Agg backend), drawn from numbers.

Each function takes what it draws (metric records, scores, pseudo-label summaries, pixel
features) and a path; reading run directories, loading checkpoints and running networks is the
command's part (:mod:`segadapt.commands.report`).

matplotlib is an optional dependency (``pip install segadapt[report]``): the rest of segadapt
never imports it. scikit-learn, for the t-SNE view of the features (:func:`tsne_2d`), is another
(``pip install segadapt[tsne]``), imported by that function only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..data.classes import ClassInfo
from ..errors import SegadaptError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SegadaptError("segadapt report draws with matplotlib: pip install 'segadapt[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Training losses and validation mIoU / MPA over iterations; ``runs``: run name -> its ``metrics.jsonl`` records."""
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
        if ax.get_legend_handles_labels()[0]:  # a run stopped before its first log line has nothing to name
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_class_iou(scores: dict[str, dict[str, float]], class_names: Sequence[str], path: Path) -> None:
    """Per-class IoU bars, side by side; ``scores``: run name -> its last evaluation record (``val/iou/<class>``, ``val/miou``)."""
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
    """Ground truth vs pseudo-label class shares (log scale); ``summaries``: run name -> its pseudo labels' ``summary.json``."""
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


def _tsne_class() -> Any:
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise SegadaptError(f'the t-SNE view of the features needs scikit-learn: pip install "segadapt[tsne]" ({err})') from None
    return TSNE


def tsne_available() -> bool:
    """Whether :func:`tsne_2d` can run: scikit-learn imports."""
    try:
        _tsne_class()
    except SegadaptError:
        return False
    return True


def tsne_2d(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> torch.Tensor:
    """A t-SNE embedding of ``features [M, D]`` (L2-normalised first, as the PCA view's), ``[M, 2]``.

    scikit-learn's ``TSNE`` (Barnes-Hut), started from the PCA of the points (``init="pca"``) with
    ``random_state=seed``: the same inputs and seed give the same embedding. ``perplexity`` (about
    the number of neighbours each point keeps close) is capped at ``(M - 1) / 3``: Barnes-Hut looks
    at ``3 * perplexity`` neighbours per point, which must be fewer than ``M``, so a small ``M``
    still runs, with every other point as a neighbour. Fewer than 2 points are returned at 0.
    Raises :class:`~segadapt.errors.SegadaptError` naming ``pip install "segadapt[tsne]"`` when
    scikit-learn is missing.
    """
    tsne = _tsne_class()
    if len(features) < 2:
        return torch.zeros(len(features), 2)
    points = torch.nn.functional.normalize(features.detach().float().cpu(), dim=1).numpy()
    embedding = tsne(n_components=2, perplexity=min(perplexity, (len(points) - 1) / 3), init="pca", random_state=seed).fit_transform(points)
    return torch.from_numpy(np.ascontiguousarray(embedding, dtype=np.float32))


_PROJECTION_NAMES = {"pca": "PCA", "tsne": "t-SNE"}


def plot_features(
    features: torch.Tensor, labels: torch.Tensor, classes: ClassInfo, path: Path, pixels: int = 4000, seed: int = 0,
    method: Literal["pca", "tsne"] = "pca",
) -> None:
    """A 2-D view of pixel ``features [M, D]`` (up to ``pixels`` of them, drawn with ``seed``), coloured by their ground-truth ``labels [M]``.

    ``method``: ``"pca"`` (:func:`pca_2d`, deterministic, no extra dependency) or ``"tsne"``
    (:func:`tsne_2d` with ``seed``, scikit-learn; BLV supplement Fig. 2). Both project the same
    pixels, L2-normalised.
    """
    name = _PROJECTION_NAMES[method]
    plt = _pyplot()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(labels), generator=generator)[:pixels]
    normalised = torch.nn.functional.normalize(features[chosen], dim=1)
    points = (tsne_2d(normalised, seed=seed) if method == "tsne" else pca_2d(normalised)).numpy()
    palette = np.asarray(classes.palette(), dtype=np.float64).reshape(-1, 3)[: classes.num_classes] / 255.0
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(points[:, 0], points[:, 1], c=palette[labels[chosen].numpy()], s=3)
    for class_id in labels[chosen].unique().tolist():
        ax.scatter([], [], c=[palette[class_id]], label=classes.names[class_id], s=12)
    ax.set(title=f"pixel features ({name} of L2-normalised features)", xticks=[], yticks=[])
    ax.legend(fontsize=6, ncol=2, markerscale=1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
