"""Probe: is a BLV run's loss at test time the training-time offset that evaluation leaves out?

BLV (supplement Alg. 1) adds ``|clamp(N(0, sigma), -1, 1)| * f_c`` to every logit of class ``c`` in
training and nothing at evaluation (docs/blv.md, "What the pseudo-code does to the tail logits at
test time"). This script evaluates checkpoints with the *expected* training offset
``k * E|clamp(N(0, sigma), -1, 1)| * f_c`` added to the logits, for a few ``k``: ``k = 0`` is the
ordinary evaluation, ``k = 1`` shows the network the same mean offset it was trained with. If a BLV
run loses to its baseline at ``k = 0`` and not at ``k = 1``, the loss is the train/test shift of the
pseudo-code, not the variation itself. It also prints, for the classes that lose most IoU between
two runs, where their pixels go (the confusion matrix's largest off-diagonal entries).

    python benchmarks/blv_test_shift.py RUN_DIR [BASELINE_RUN_DIR] [--k 0 0.5 1]

``RUN_DIR`` is a run trained with ``loss.name: blv`` (its ``blv_class_counts.json`` and ``config.yaml``
give ``f_c`` and sigma); ``BASELINE_RUN_DIR`` (optional) is evaluated with ``k = 0`` for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segadapt.config import RunConfig
from segadapt.engine.builders import build_dataset_from_spec, build_eval_loader, build_transform
from segadapt.engine.evaluation import confusion_over, summarize
from segadapt.engine.loading import config_for_checkpoint, load_trained_model
from segadapt.engine.losses import blv_class_counts
from segadapt.methods.blv import blv_offsets, expected_variation
from segadapt.metrics import compute_scores
from segadapt.models.base import SegOutput


class ShiftedLogits(nn.Module):
    """``model`` with a constant per-class vector added to its logits."""

    def __init__(self, model: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> SegOutput:
        out = self.model(images)
        return out._replace(logits=out.logits + self.shift.to(out.logits))


def load_run(run: Path) -> tuple[RunConfig, nn.Module, Any]:
    """A run's config (its run directory where the run lies now), the network of its last checkpoint, its validation set."""
    checkpoint = run / "checkpoints" / "last.pt"
    cfg = config_for_checkpoint(checkpoint, None, [f"output_dir={run.resolve().parent}", f"name={run.name}"])
    model, _ = load_trained_model(checkpoint, cfg)
    return cfg, model, build_dataset_from_spec(cfg.data.val, with_labels=True)


def evaluate_shifted(cfg: RunConfig, model: nn.Module, dataset: Any, shift: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """``segadapt eval``'s scores and confusion matrix of ``model``, ``shift`` added to its logits."""
    classes = dataset.classes
    if shift is not None:
        model = ShiftedLogits(model, shift)
    loader = build_eval_loader(dataset, build_transform(cfg.data.val_transforms, classes.ignore_index), cfg.data.val_batch_size, 0, 0, 1)
    matrix = confusion_over(model, loader, classes.num_classes, cfg.eval, torch.device("cpu"), classes.ignore_index)
    return summarize(matrix, classes)["flat"], matrix.matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("baseline", type=Path, nargs="?")
    parser.add_argument("--k", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()

    cfg, model, dataset = load_run(args.run)
    offsets = blv_offsets(blv_class_counts(cfg, dataset.classes.num_classes))  # the run's cached counts
    magnitude = expected_variation(cfg.loss.blv.sigma)
    print(f"sigma {cfg.loss.blv.sigma}: E|clamp(N(0, sigma), -1, 1)| = {magnitude:.3f}")

    rows = []
    matrices = {}
    if args.baseline is not None:
        flat, matrices["baseline"] = evaluate_shifted(*load_run(args.baseline), None)
        rows.append((f"{args.baseline.name}", flat))
    for k in args.k:
        flat, matrices[k] = evaluate_shifted(cfg, model, dataset, k * magnitude * offsets)
        rows.append((f"{args.run.name}, k={k:g}", flat))
    names = [key[4:] for key in rows[0][1] if key.startswith("iou/")]
    print("| run | mIoU | MPA | " + " | ".join(names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for label, flat in rows:
        ious = " | ".join(f"{100 * (flat[f'iou/{n}'] or 0):.1f}" for n in names)
        print(f"| {label} | {100 * flat['miou']:.1f} | {100 * flat['mpa']:.1f} | {ious} |")

    if args.baseline is not None:
        base = compute_scores(matrices["baseline"], names).per_class_iou
        plain = compute_scores(matrices[args.k[0]], names).per_class_iou
        print("\nwhere the pixels of the classes that lose most go (share of the class's pixels, baseline -> BLV run):")
        for c in torch.argsort(plain.nan_to_num(0) - base.nan_to_num(0))[:4].tolist():
            row_base = matrices["baseline"][c].double() / matrices["baseline"][c].sum().clamp_min(1)
            row_blv = matrices[args.k[0]][c].double() / matrices[args.k[0]][c].sum().clamp_min(1)
            top = torch.argsort(row_blv, descending=True)[:3].tolist()
            parts = ", ".join(f"{names[j]} {100 * row_base[j]:.1f} -> {100 * row_blv[j]:.1f} %" for j in top)
            print(f"  {names[c]} (IoU {100 * base[c]:.1f} -> {100 * plain[c]:.1f}): {parts}")


if __name__ == "__main__":
    main()
