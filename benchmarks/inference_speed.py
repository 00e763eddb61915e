"""Images per second of the inference passes (evaluation, pseudo labelling), batched vs one at a time.

Times :func:`segadapt.engine.inference.predict_probs` inside
:func:`~segadapt.engine.inference.inference_model`, as evaluation and pseudo labelling call them,
on images already on the device (no data loading, no metric, no PNG writing): whole image at
batch 1 and at ``--batch``, with flip, and the sliding window one window per forward vs
``--window-batch`` windows per forward. The probabilities are upsampled to the input size (the
label size of a full-resolution evaluation). Randomly initialised weights.

The cases (of every ``--amp`` and ``--channels-last`` setting) run in turns, ``--repeats`` rounds
of all of them after a warm-up round, and each case reports its median round: on a machine
shared with other jobs the ratios between rows stay meaningful. On a loaded CPU pass
``--threads 1``: with more threads than free cores, OpenMP barriers make the times erratic.

Not run by the tests. Usage::

    # CPU: the embedded benchmark's val images (128x256) and the small network
    python benchmarks/inference_speed.py --threads 1 --amp off bf16 --channels-last both
    # GPU: random images at Cityscapes size, fp32 / bf16, NCHW / channels-last
    python benchmarks/inference_speed.py --device cuda --model deeplabv2_r101 --size 1024 2048 \
        --batch 8 --images 32 --window 512 1024 --window-batch 6 --amp off bf16 --channels-last both
    python benchmarks/inference_speed.py --device cuda --model daformer_mitb5 --size 1024 2048 \
        --batch 4 --images 16 --window 512 512 --window-batch 8 --amp off bf16 --channels-last both

Prints the machine, the date, images per second of each case, its ratio to the first row (fp32
whole image, batch 1), the peak GPU memory on CUDA, and, from each flip row, the projected wall
time of a pseudo-label run over 2,975 Cityscapes images (two prediction passes with flip,
pseudo labelling's default) and of a 500-image validation with flip. The projections cover the
forward passes only (not the data loading, the thresholds or the PNG files), at the measured
input size: they are the Cityscapes targets' figures only for ``--size 1024 2048``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from segadapt.config import EvalConfig
from segadapt.engine.inference import inference_model, predict_probs
from segadapt.models import create_model

PSEUDO_LABEL_IMAGES = 2975  # Cityscapes train: two prediction passes (thresholds, then files)
VAL_IMAGES = 500  # Cityscapes val


@dataclass
class Case:
    """One timed configuration: its name, the images per ``predict_probs`` call and the settings."""

    name: str
    batch: int
    cfg: EvalConfig


def cases(args: argparse.Namespace, amp: str, channels_last: bool) -> list[Case]:
    """Whole image at batch 1 and ``--batch``, flip, sliding window unbatched and batched."""
    speed = {"amp": amp, "channels_last": channels_last}
    window = tuple(args.window)
    return [
        Case("whole image, batch 1", 1, EvalConfig(**speed)),
        Case(f"whole image, batch {args.batch}", args.batch, EvalConfig(**speed)),
        Case(f"whole image + flip, batch {args.batch}", args.batch, EvalConfig(flip=True, **speed)),
        Case("sliding window, 1 window/forward", 1, EvalConfig(sliding_window=window, **speed)),
        Case(f"sliding window, {args.window_batch} windows/forward", 1,
             EvalConfig(sliding_window=window, window_batch=args.window_batch, **speed)),
        Case(f"sliding window + flip, {args.window_batch} windows/forward", 1,
             EvalConfig(sliding_window=window, window_batch=args.window_batch, flip=True, **speed)),
    ]


def load_images(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, str]:
    """``[N, 3, H, W]`` on ``device``: the benchmark's val images, or random ones at ``--size``."""
    if args.size is None:
        from segadapt.config import DatasetSpec
        from segadapt.engine.builders import build_dataset_from_spec

        dataset = build_dataset_from_spec(DatasetSpec(dataset="benchmark", domain="target", split="val"), with_labels=False)
        count = min(args.images, len(dataset))
        images = torch.stack([dataset[i]["image"] for i in range(count)])
        return images.to(device), f"the embedded benchmark's first {count} val images"
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, *args.size, generator=generator)
    return images.to(device), f"{args.images} random images"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model: torch.nn.Module, images: torch.Tensor, case: Case) -> float:
    """Seconds for ``predict_probs`` over all ``images``, ``case.batch`` at a time."""
    synchronize(images.device)
    start = time.perf_counter()
    for first in range(0, len(images), case.batch):
        predict_probs(model, images[first : first + case.batch], cfg=case.cfg)
    synchronize(images.device)
    return time.perf_counter() - start


def time_cases(model: torch.nn.Module, images: torch.Tensor, todo: list[Case], repeats: int) -> list[tuple[float, float | None]]:
    """Median images/s of each case over ``repeats`` rounds (after one warm-up round), and peak GPU GiB."""
    device = images.device
    seconds: list[list[float]] = [[] for _ in todo]
    peaks: list[float | None] = [None for _ in todo]
    for round_index in range(repeats + 1):
        for index, case in enumerate(todo):
            with inference_model(model, case.cfg):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                elapsed = run_case(model, images, case)
                if device.type == "cuda":
                    peaks[index] = torch.cuda.max_memory_allocated(device) / 2**30
            if round_index > 0:  # round 0 warms up: kernels, allocator, autotuning
                seconds[index].append(elapsed)
    return [(len(images) / statistics.median(times), peak) for times, peak in zip(seconds, peaks)]


def projections(name: str, rate: float) -> str:
    """Projected seconds of the pseudo-label run (2 passes over 2,975 images) and of a 500-image validation."""
    if "flip" not in name:
        return ""
    pseudo, val = 2 * PSEUDO_LABEL_IMAGES / rate, VAL_IMAGES / rate
    return f"pseudo-label 2x{PSEUDO_LABEL_IMAGES}: {pseudo:.0f} s (goal 300 s); val {VAL_IMAGES}: {val:.0f} s (goal 60 s)"


def report(todo: list[Case], results: list[tuple[float, float | None]]) -> None:
    """One table row per case; the ratios are to the first case (fp32 whole image, batch 1)."""
    baseline = results[0][0]
    for case, (rate, peak) in zip(todo, results):
        memory = f"{peak:.2f}" if peak is not None else "-"
        layout = "channels-last" if case.cfg.channels_last else "NCHW"
        print(f"| {case.name} | {case.cfg.amp} | {layout} | {rate:.2f} | {rate / baseline:.2f} | {memory} | {projections(case.name, rate)} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small", help="a segadapt.models name, e.g. deeplabv2_r101, daformer_mitb5")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="random images of this size (default: the benchmark's 128x256 val images)")
    parser.add_argument("--images", type=int, default=32, help="images per case and round")
    parser.add_argument("--batch", type=int, default=16, help="images per forward of the batched whole-image cases")
    parser.add_argument("--window", type=int, nargs=2, default=[64, 128], metavar=("H", "W"), help="sliding window size")
    parser.add_argument("--window-batch", type=int, default=8, help="window positions per forward of the batched cases")
    parser.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16"])
    parser.add_argument("--channels-last", choices=["no", "yes", "both"], default="no")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over all cases (after one warm-up round)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images, source = load_images(args, device)
    model = create_model(args.model, args.num_classes).to(device).eval()
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"# {machine}; torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"# model {args.model} ({args.num_classes} classes, random weights); {source}, {images.shape[-2]}x{images.shape[-1]}; "
          f"window {args.window[0]}x{args.window[1]}; median of {args.repeats} rounds")
    print("| case | amp | layout | images/s | x first row | peak GPU memory (GiB) | projected, goal (flip rows) |")
    print("|---|---|---|---:|---:|---:|---|")
    layouts = {"no": [False], "yes": [True], "both": [False, True]}[args.channels_last]
    todo = [case for amp in args.amp for channels_last in layouts for case in cases(args, amp, channels_last)]
    report(todo, time_cases(model, images, todo, args.repeats))  # every round runs every case: comparable rows


if __name__ == "__main__":
    main()
