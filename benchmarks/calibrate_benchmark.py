"""Measure the embedded benchmark's calibration: source-only vs target-supervised oracle.

Trains :class:`~segadapt.models.small.SmallSegNet` twice with a minimal loop of its own
(independent of the engine and of the folder-dataset loader, so it can check the
generator on its own), and evaluates both on the target validation split:

- **source-only**: trained on ``source/train``;
- **oracle**: trained on ``target/train`` with its labels.

Optionally (``--self-train N``) it then fine-tunes the source-only model for N iterations
on ``target/train`` with class-wise confident pseudo labels (CBST-style: per class, the
pixels above that class's 50th confidence percentile), to check that the shift is
bridgeable, i.e. that self-training gains over source-only.

The calibration targets (docs/datasets/benchmark.md, "Calibration") are source-only at roughly
25-45 mIoU, the oracle at 75 or more, and several tail classes near zero for source-only. Usage::

    python benchmarks/calibrate_benchmark.py --root /tmp/bench --iters 500 --threads 2
    python benchmarks/calibrate_benchmark.py --root /tmp/bench --iters 500 --self-train 300 --json out.json

Prints per-class IoU, mIoU and wall time of each training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segadapt.data.benchmark import CLASSES, ensure_benchmark
from segadapt.models.small import SmallSegNet

IGNORE = CLASSES.ignore_index


def load_split(root: Path, domain: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 ``[N, 3, H, W]``) and labels (int64 ``[N, H, W]``) of one split."""
    image_paths = sorted((root / domain / "images" / split).glob("*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in image_paths])
    labels = np.stack([np.asarray(Image.open(root / domain / "labels" / split / p.name)) for p in image_paths])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels.astype(np.int64))


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches with random horizontal flips; images as float in [0, 1]."""
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            x, y = images[index].float() / 255.0, labels[index]
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            yield x, y


def train(
    model: SmallSegNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    iters: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """AdamW with a 10x head learning rate and polynomial decay. Returns the wall time."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.backbone_parameters()), "lr": lr},
            {"params": list(model.head_parameters()), "lr": lr * 10},
        ],
        weight_decay=1e-4,
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    model.train()
    start = time.time()
    for step, (x, y) in zip(range(iters), batches(images, labels, batch_size, generator)):
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * (1 - step / iters) ** 0.9
        logits = F.interpolate(model(x).logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"  iter {step:5d}/{iters}  loss {loss.item():.3f}  {time.time() - start:6.1f}s", flush=True)
    return time.time() - start


@torch.no_grad()
def predict(model: SmallSegNet, images: torch.Tensor, batch_size: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max labels and their softmax confidence at full resolution."""
    model.eval()
    predictions, confidences = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float() / 255.0
        logits = F.interpolate(model(x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        confidence, prediction = logits.softmax(1).max(1)
        predictions.append(prediction)
        confidences.append(confidence)
    return torch.cat(predictions), torch.cat(confidences)


def iou(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-class IoU in percent (NaN for classes absent from both prediction and label)."""
    valid = labels != IGNORE
    confusion = torch.bincount(labels[valid] * num_classes + predictions[valid], minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return (100 * intersection / union).numpy()


def pseudo_labels(predictions: torch.Tensor, confidences: torch.Tensor, num_classes: int, portion: float) -> torch.Tensor:
    """Class-wise thresholds: keep each class's most confident ``portion`` of its predicted pixels."""
    labels = torch.full_like(predictions, IGNORE)
    for c in range(num_classes):
        mine = predictions == c
        if mine.any():
            threshold = torch.quantile(confidences[mine].float()[:1_000_000], 1 - portion)
            labels[mine & (confidences >= threshold)] = c
    return labels


def report(name: str, scores: np.ndarray, seconds: float, iters: int) -> dict:
    print(f"\n{name}: mIoU {np.nanmean(scores):.1f}  ({iters} iters, {seconds:.0f}s)")
    for class_name, value in zip(CLASSES.names, scores):
        print(f"  {class_name:14s} {value:5.1f}")
    return {"miou": float(np.nanmean(scores)), "iou": dict(zip(CLASSES.names, map(float, scores))), "iters": iters, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="benchmark directory (default: the cache)")
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed")
    parser.add_argument("--size", default="default")
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--skip-oracle", action="store_true")
    parser.add_argument("--self-train", type=int, default=0, help="iterations of pseudo-label fine-tuning (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.time()
    root = ensure_benchmark(args.root, args.seed, args.size, num_workers=0)
    print(f"benchmark at {root} ({time.time() - start:.0f}s)")
    source = load_split(root, "source", "train")
    target_train = load_split(root, "target", "train")
    val_images, val_labels = load_split(root, "target", "val")
    num_classes = CLASSES.num_classes
    results = {}

    torch.manual_seed(args.train_seed)
    model = SmallSegNet(num_classes)
    seconds = train(model, *source, args.iters, args.lr, args.batch_size, args.train_seed)
    scores = iou(predict(model, val_images)[0], val_labels, num_classes)
    results["source_only"] = report("source-only", scores, seconds, args.iters)

    if args.self_train:
        predictions, confidences = predict(model, target_train[0])
        labels = pseudo_labels(predictions, confidences, num_classes, portion=0.5)
        seconds = train(model, target_train[0], labels, args.self_train, args.lr * 0.5, args.batch_size, args.train_seed)
        scores = iou(predict(model, val_images)[0], val_labels, num_classes)
        results["self_training"] = report("self-training (1 round, CBST-style 50%)", scores, seconds, args.self_train)

    if not args.skip_oracle:
        torch.manual_seed(args.train_seed)
        model = SmallSegNet(num_classes)
        seconds = train(model, *target_train, args.iters, args.lr, args.batch_size, args.train_seed)
        scores = iou(predict(model, val_images)[0], val_labels, num_classes)
        results["oracle"] = report("oracle (target-supervised)", scores, seconds, args.iters)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
