"""Quality of BiCL's dynamic pseudo labels from a fixed network: density, accuracy and top confusions.

Takes a checkpoint (a source-only warm-up, or a BiCL run's) and the config that names the source and
target data, computes the source prototypes (:func:`segadapt.methods.bicl.class_means` of the
source ground truth) and target prototypes (of the network's argmax, or of the target ground truth
as an upper bound for the calibration), then labels the target images by
:func:`segadapt.methods.bicl.dynamic_pseudo_labels` under several thresholds, with and without the
class-wise domain-bias calibration. Ground truth of the target is read for measurement only. This
separates what the label transfer gives on a fixed feature space from what happens when a network
is trained on its labels (the ``label_density``/``label_accuracy`` that ``recipe: bicl`` logs).
Not run by the tests. Usage::

    python benchmarks/bicl_label_transfer.py runs/table/source_only_s0/checkpoints/last.pt --images 60
"""

from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np
import torch
import torch.nn.functional as F

from segadapt.config import load_config
from segadapt.engine.builders import build_dataset_from_spec
from segadapt.engine.loading import load_trained_model
from segadapt.methods.bicl import class_means, domain_biases, dynamic_pseudo_labels


@torch.no_grad()
def features_and_labels(model: torch.nn.Module, dataset, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode features, logits and ground truth (nearest-resized to the feature grid) of the first ``count`` images."""
    features, logits, labels = [], [], []
    for index in range(min(count, len(dataset))):
        image = torch.from_numpy(np.asarray(dataset.load_image(index))).permute(2, 0, 1).float()[None] / 255
        out = model(image)
        label = torch.from_numpy(np.asarray(dataset.load_label(index)).astype(np.int64))[None, None].float()
        labels.append(F.interpolate(label, size=out.features.shape[-2:], mode="nearest")[:, 0].long())
        features.append(out.features)
        logits.append(out.logits)
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def quality(labels: torch.Tensor, truth: torch.Tensor, ignore_index: int) -> tuple[float, float]:
    """(density, accuracy) of ``labels`` over the pixels with ground truth."""
    valid = truth != ignore_index
    labelled = (labels != ignore_index) & valid
    return float(labelled.sum() / valid.sum()), float(((labels == truth) & labelled).sum() / labelled.sum().clamp_min(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--config", default="benchmark/bicl_dynamic", help="config naming data.source and data.target")
    parser.add_argument("--images", type=int, default=60, help="images of each domain")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.7, 0.9])
    args = parser.parse_args()

    cfg = load_config(args.config, [])
    model, _ = load_trained_model(args.checkpoint, cfg)
    source = build_dataset_from_spec(cfg.data.source, with_labels=True)
    target = build_dataset_from_spec(cfg.data.target.model_copy(update={"with_labels": True, "pseudo_labels": None}), with_labels=True)
    names, num_classes, ignore = source.classes.names, source.classes.num_classes, source.classes.ignore_index
    source_features, _, source_truth = features_and_labels(model, source, args.images)
    target_features, target_logits, target_truth = features_and_labels(model, target, args.images)

    source_prototypes, source_counts = class_means(source_features, source_truth, num_classes)
    available = source_counts > 0
    argmax = target_logits.argmax(1)
    print(f"<!-- {platform.node()}, {datetime.date.today()}, {args.checkpoint}, {args.images} images per domain -->")
    print(f"classifier argmax: density 1.000, accuracy {quality(argmax, target_truth, ignore)[1]:.3f}")
    print()
    print("| target prototypes for the calibration | T | density | accuracy |")
    print("|---|---:|---:|---:|")
    variants = {"none (w/o cal.)": None, "network argmax": argmax, "target ground truth (upper bound)": target_truth}
    for name, labels in variants.items():
        biases = None
        if labels is not None:
            target_prototypes, target_counts = class_means(target_features, labels, num_classes)
            biases = domain_biases(source_prototypes, target_prototypes, available & (target_counts > 0))
        for threshold in args.thresholds:
            dynamic, _ = dynamic_pseudo_labels(target_features, source_prototypes, args.temperature, threshold, biases, available)
            density, accuracy = quality(dynamic, target_truth, ignore)
            print(f"| {name} | {threshold} | {density:.3f} | {accuracy:.3f} |")

    dynamic, _ = dynamic_pseudo_labels(target_features, source_prototypes, args.temperature, 0.7, None, available)
    keep = (dynamic != ignore) & (target_truth != ignore)
    confusion = torch.bincount(target_truth[keep] * num_classes + dynamic[keep], minlength=num_classes**2).view(num_classes, num_classes)
    wrong = confusion.clone().fill_diagonal_(0)
    print()
    print("Largest confusions of the uncalibrated labels at T = 0.7 (share of labelled pixels):")
    top = wrong.flatten().topk(5)
    for count, index in zip(top.values.tolist(), top.indices.tolist()):
        print(f"- {names[index // num_classes]} labelled {names[index % num_classes]}: {count / confusion.sum().item():.3f}")


if __name__ == "__main__":
    main()
