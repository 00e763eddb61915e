"""``segadapt report RUN_DIR [RUN_DIR ...]``: the figures of one or several runs, with a markdown page.

Figures (PNG, drawn by :mod:`segadapt.viz.figures`):

- ``curves.png``: training losses and validation mIoU / MPA over iterations (CPSL supplement Fig. 1);
- ``class_iou.png``: per-class IoU bars of the runs' last evaluations, side by side;
- ``class_distribution.png``: ground truth vs pseudo-label class distributions of every run that
  made pseudo labels (CPSL Fig. 6, DARS Tab. S7), on a log scale so tail classes show;
- ``predictions.png``: image, ground truth and each run's prediction on validation images;
- ``features.png``: a PCA view of the first run's pixel features on validation images, coloured by
  ground-truth class (exact, with no seed or perplexity to choose, and dependency-free);
- ``features_tsne.png``: a t-SNE view of the same pixels, as BLV supplement Fig. 2 draws them, when
  scikit-learn is installed (``pip install "segadapt[tsne]"``); without it the page says how to
  get it and the rest of the report is unchanged.

This module reads the run directories, rebuilds the validation data and the networks, and runs
them; :mod:`segadapt.viz` only draws. matplotlib is an optional dependency (``pip install
segadapt[report]``): the rest of segadapt never imports it; scikit-learn likewise, imported only
for the t-SNE view.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import RunConfig, load_config
from ..engine.builders import build_dataset_from_spec, resolve_device
from ..engine.checkpoint import load_checkpoint
from ..engine.inference import predict_probs
from ..engine.loading import load_trained_model
from ..engine.logging import read_metrics
from ..errors import ConfigError
from ..viz import colorize, image_grid
from ..viz.figures import plot_class_distribution, plot_class_iou, plot_curves, plot_features, tsne_available


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records; none for a run stopped before its first log line (it has its config.yaml)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the folder `segadapt train` wrote")
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return read_metrics(run_dir)


def _class_names(run_dir: Path, records: list[dict[str, Any]]) -> tuple[str, ...] | None:
    """The classes a run predicts: its ``last.pt``'s, else its last evaluation's per-class keys; None when it has neither."""
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        return tuple(load_checkpoint(last)["classes"]["names"])
    scores = _last_eval(records)
    return tuple(key[len("val/iou/"):] for key in scores if key.startswith("val/iou/")) if scores else None


def check_label_spaces(runs: dict[str, tuple[str, ...] | None]) -> None:
    """Refuse runs of different classes: the report draws every run against the first run's validation labels.

    ``runs``: run name -> its class names (None: unknown, a run with neither checkpoint nor evaluation).
    """
    known = {name: names for name, names in runs.items() if names is not None}
    if len(set(known.values())) > 1:
        listing = "; ".join(
            f"{name}: {len(names)} classes ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" for name, names in known.items()
        )
        raise ConfigError(
            f"the runs predict different classes ({listing}); the report compares runs on the first run's validation "
            "labels, so report the runs of each label space separately"
        )


def _last_eval(records: list[dict[str, Any]]) -> dict[str, float] | None:
    evals = [r for r in records if "val/miou" in r]
    return evals[-1] if evals else None


def prediction_grid(runs: dict[str, tuple[Path, RunConfig]], count: int = 4) -> Any:
    """Image, ground truth and each run's prediction on ``count`` validation images of the first run's ``data.val``.

    ``runs``: run name -> (checkpoint, its config). Returns a PIL image.
    """
    first_cfg = next(iter(runs.values()))[1]
    if first_cfg.data.val is None:
        raise ConfigError("the prediction grid draws data.val images, but the first run's config has no data.val")
    dataset = build_dataset_from_spec(first_cfg.data.val, with_labels=True)
    device = resolve_device(first_cfg.device)
    models = {name: load_trained_model(ckpt, cfg)[0].to(device) for name, (ckpt, cfg) in runs.items()}
    rows = []
    for index in np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int):
        sample = dataset[int(index)]
        image = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        row = [image, colorize(sample["label"].numpy(), dataset.classes)]
        for model in models.values():
            probs = predict_probs(model, sample["image"][None].to(device), sample["label"].shape, first_cfg.eval)
            row.append(colorize(probs.argmax(1)[0].cpu().numpy(), dataset.classes))
        rows.append(row)
    return image_grid(rows, ["image", "ground truth", *models])


@torch.no_grad()
def pixel_features(
    model: Any, dataset: Any, device: torch.device, images: int = 16, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s features ``[M, D]`` at the labelled pixels of the first ``images`` items, and their classes ``[M]``.

    Images are resized to ``size`` first when given (the run's ``eval.size``, as its evaluation feeds them);
    labels are resized (nearest) to the feature map; ignored pixels are left out.
    """
    gathered, classes = [], []
    for index in range(min(len(dataset), images)):
        sample = dataset[index]
        image = sample["image"][None].to(device)
        if size is not None:
            image = torch.nn.functional.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)
        features = model(image).features[0].float().cpu()
        label = torch.nn.functional.interpolate(sample["label"][None, None].float(), size=features.shape[-2:], mode="nearest")[0, 0].long()
        valid = label != dataset.classes.ignore_index
        gathered.append(features.permute(1, 2, 0)[valid])
        classes.append(label[valid])
    return torch.cat(gathered), torch.cat(classes)


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, images: int = 4) -> Path:
    """Draw every figure the runs allow into ``out_dir`` and write ``out_dir/report.md``; returns its path."""
    out_dir = Path(out_dir)
    run_paths = [Path(r) for r in run_dirs]
    runs = {r.name: _records(r) for r in run_paths}
    check_label_spaces({r.name: _class_names(r, runs[r.name]) for r in run_paths})
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# segadapt report", "", "Runs: " + ", ".join(f"`{r}`" for r in run_paths), ""]

    plot_curves(runs, out_dir / "curves.png")
    lines += ["## Training curves", "", "![curves](curves.png)", ""]

    scores = {name: ev for name, records in runs.items() if (ev := _last_eval(records)) is not None}
    cfg = load_config(run_paths[0] / "config.yaml")
    if scores and cfg.data.val is not None:
        dataset = build_dataset_from_spec(cfg.data.val, with_labels=True)
        names = list(dataset.classes.names)
        plot_class_iou(scores, names, out_dir / "class_iou.png")
        lines += ["## Per-class IoU (last evaluation)", "", "![class IoU](class_iou.png)", ""]
        lines += ["| run | mIoU | MPA |", "|---|---:|---:|"]
        lines += [f"| {n} | {100 * s['val/miou']:.1f} | {100 * s.get('val/mpa', math.nan):.1f} |" for n, s in scores.items()]
        lines.append("")
        checkpoints = {
            r.name: (r / "checkpoints" / "last.pt", load_config(r / "config.yaml")) for r in run_paths if (r / "checkpoints" / "last.pt").exists()
        }
        if checkpoints:
            prediction_grid(checkpoints, count=images).save(out_dir / "predictions.png")
            lines += ["## Predictions on validation images", "", "![predictions](predictions.png)", "",
                      "Columns: image, ground truth, " + ", ".join(checkpoints) + ".", ""]
            first_ckpt, first_cfg = next(iter(checkpoints.values()))
            device = resolve_device(first_cfg.device)
            model = load_trained_model(first_ckpt, first_cfg)[0].to(device)
            features, labels = pixel_features(model, dataset, device, size=first_cfg.eval.size)
            plot_features(features, labels, dataset.classes, out_dir / "features.png")
            lines += ["## Feature space", "", f"PCA of `{next(iter(checkpoints))}`'s pixel features, coloured by class.", "",
                      "![features](features.png)", ""]
            if tsne_available():
                plot_features(features, labels, dataset.classes, out_dir / "features_tsne.png", method="tsne")
                lines += ["t-SNE of the same pixels, as BLV supplement Fig. 2 draws them (the PCA above stays: it depends on no seed or "
                          "perplexity and needs no extra dependency).", "", "![features t-SNE](features_tsne.png)", ""]
            else:
                lines += ['For the t-SNE view of the same pixels (BLV supplement Fig. 2): `pip install "segadapt[tsne]"` (scikit-learn).', ""]

    summaries = {
        r.name: json.loads((r / "pseudo_labels" / "summary.json").read_text()) for r in run_paths if (r / "pseudo_labels" / "summary.json").exists()
    }
    if summaries:
        plot_class_distribution(summaries, out_dir / "class_distribution.png")
        lines += ["## Pseudo-label class distribution", "", "![class distribution](class_distribution.png)", ""]
        lines += ["| run | rule | density | accuracy | KL(labels ‖ truth) |", "|---|---|---:|---:|---:|"]
        for name, s in summaries.items():
            acc, kl = s.get("accuracy"), s.get("kl_to_target")
            accuracy, kl_text = "-" if acc is None else f"{acc:.3f}", "-" if kl is None else f"{kl:.3f}"
            lines.append(f"| {name} | {s['rule']} | {s['density']:.3f} | {accuracy} | {kl_text} |")
        lines.append("")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def run(runs: Sequence[str], out: str | None = None, images: int = 4) -> int:
    """The command: the report of ``runs`` in ``out`` (default ``FIRST_RUN/report``)."""
    out_dir = out or str(Path(runs[0]) / "report")
    print(f"report: {write_report(runs, out_dir, images=images)}")
    return 0
