"""Peak memory of ``segadapt pseudo-label`` as the dataset grows: it must stay flat.

Each size runs in a fresh subprocess (so ``ru_maxrss`` is that run's peak) that labels a
synthetic dataset of N images at reduced Cityscapes resolution (default 256x512, 19 classes,
with ground truth so accuracy and KL are measured too) with ``SmallSegNet`` and the DARS rule,
writing the PNGs to a temporary folder. The images (:class:`SyntheticImages`, which
``benchmarks/gpu_suite.py`` labels too) are made on the fly from their index: the measurement is
of the generator (histograms, thresholds, writing), not of an input cache. Usage::

    python benchmarks/pseudo_label_memory.py --sizes 100 500 1000 2975 --threads 2

Prints one line per size: images, wall time, peak RSS (MiB), and the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from segadapt.data.classes import CITYSCAPES_CLASSES


class SyntheticImages(torch.utils.data.Dataset):
    """``count`` Cityscapes-labelled images of ``height`` x ``width``, made from their index (no input cache).

    Each image is smooth noise (random at 1/8 of the size, upsampled bilinearly) and its label the
    first channel quantised into the classes, so accuracy and KL are measured too.
    """

    classes = CITYSCAPES_CLASSES

    def __init__(self, count: int, height: int, width: int) -> None:
        self.count, self.height, self.width = count, height, width
        self.names = [f"city/frame_{i:05d}" for i in range(count)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, self.height // 8, self.width // 8, generator=generator)
        image = torch.nn.functional.interpolate(image[None], size=(self.height, self.width), mode="bilinear")[0]
        label = (image[0] * self.classes.num_classes).long().clamp(max=self.classes.num_classes - 1)
        return {"image": image, "label": label, "name": self.names[index], "replay": []}


CHILD = r"""
import json, resource, sys, time
import torch
from segadapt.config import load_config
from segadapt.engine.pseudo_labelling import generate_pseudo_labels
from segadapt.models import create_model

count, height, width, out, threads, benchmarks = sys.argv[1:7]
count, height, width, threads = int(count), int(height), int(width), int(threads)
torch.set_num_threads(threads)
sys.path.insert(0, benchmarks)
from pseudo_label_memory import SyntheticImages

cfg = load_config(None, ["pseudo_label.rule=dars", "pseudo_label.distribution=predicted", "pseudo_label.ratio=0.5",
                         "data.val_batch_size=4", "data.num_workers=0"])
dataset = SyntheticImages(count, height, width)
model = create_model("small", dataset.classes.num_classes)
start = time.perf_counter()
summary = generate_pseudo_labels(model, dataset, cfg, out, torch.device("cpu"), log=lambda _: None)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images": count, "wall_s": wall, "peak_rss_mib": peak, "density": summary["density"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000, 2975])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"# {platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs | "
          f"{datetime.date.today()} | {args.height}x{args.width}")
    print(f"{'images':>7} {'wall (s)':>9} {'peak RSS (MiB)':>15}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as out:
            argv = [str(size), str(args.height), str(args.width), out, str(args.threads), str(Path(__file__).parent)]
            result = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
            record = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{record['images']:>7} {record['wall_s']:>9.1f} {record['peak_rss_mib']:>15.1f}")


if __name__ == "__main__":
    main()
