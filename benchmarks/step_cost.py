"""Time one training step of each recipe against source-only, on synthetic batches, in one run.

A step is what the trainer does per iteration: the recipe's ``training_step`` under the
configured autocast, backward through the grad scaler, the optimiser step and the recipe's
``after_optimizer_step`` (momentum networks, queues). The recipes, models, losses and optimiser
groups are built from the packaged configs exactly as ``segadapt train`` builds them; only the
data is replaced by random batches of the given crop size, so no dataset, warm-up checkpoint or
pseudo-label pass is needed (CPSL gets random Eq. 7 prototypes and a uniform Eq. 10 count, which
changes no shape and no work). Randomly initialised weights; ``model.pretrained`` is dropped.

Not run by the tests. Usage::

    # CPU, the embedded benchmark's small network and crops
    python benchmarks/step_cost.py --configs benchmark/source_only benchmark/st benchmark/cpsl \
        benchmark/dacs benchmark/dacs_blv benchmark/bicl_hybrid --size 128 256 --batch 8
    # GPU, DAFormer MiT-B5 at 512x512, batch 2 (docs/daformer.md), fp32 and bf16
    python benchmarks/step_cost.py --device cuda --size 512 512 --batch 2 --amp off bf16 \
        --configs gta5_to_cityscapes/source_only gta5_to_cityscapes/daformer gta5_to_cityscapes/daformer_blv \
        --set model.name=daformer_mitb5
    # GPU, DeepLab-V2 ResNet-101 (ProDA head) at 896x512, batch 4, fp32 and bf16
    python benchmarks/step_cost.py --device cuda --size 512 896 --batch 4 --amp off bf16 \
        --set model.name=deeplabv2_r101_proda \
        --configs gta5_to_cityscapes/source_only gta5_to_cityscapes/st gta5_to_cityscapes/cpsl

Prints the machine, the date, the median step time of each recipe, its ratio to the first
config's (source-only) and the peak memory of the step: allocated GPU memory on CUDA, the growth
of the process's resident memory on the CPU. ``--stream-backward on off`` measures each recipe with
and without ``train.stream_backward`` (the source terms back-propagated before the target graph)::

    python benchmarks/step_cost.py --configs benchmark/source_only benchmark/dacs benchmark/cpsl \
        benchmark/cpsl_distill benchmark/adversarial_warmup --stream-backward off on --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from segadapt.config import load_config
from segadapt.data.classes import CITYSCAPES_CLASSES, ClassInfo
from segadapt.engine.builders import build_model, build_optimizer
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes import recipe_class
from segadapt.engine.recipes.cpsl import INIT_FILE

IGNORE_INDEX = CITYSCAPES_CLASSES.ignore_index  # the synthetic labels' (random crops have none)


def synthetic_batches(
    streams: dict[str, Any], batch: int, size: tuple[int, int], num_classes: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Random images in [0, 1] and, for labelled streams, label maps of square class blocks."""
    height, width = size
    batches = {}
    for name, stream in streams.items():
        sample: dict[str, Any] = {
            "image": torch.rand(batch, 3, height, width, device=device),
            "name": [f"{name}_{i}" for i in range(batch)],
            "replay": [[] for _ in range(batch)],
        }
        if stream.labels:
            blocks = torch.randint(0, num_classes, (batch, 1, height // 32 + 1, width // 32 + 1), device=device)
            labels = torch.nn.functional.interpolate(blocks.float(), scale_factor=32, mode="nearest")[:, 0, :height, :width].long()
            sample["label"] = labels
        batches[name] = sample
    return batches


def build_recipe(config: str, overrides: list[str], run_dir: Path, num_classes: int, device: torch.device) -> Any:
    common = [*overrides, f"output_dir={run_dir.parent}", f"name={run_dir.name}", "model.pretrained=null"]
    cfg = load_config(config, common)
    cls = recipe_class(cfg.recipe)
    model = build_model(cfg.model.model_copy(update={"checkpoint": None}), num_classes).to(device)
    if cls.name == "cpsl":  # what CPSL.prepare would compute from the warm-up, with random values
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"prototypes": torch.nn.functional.normalize(torch.randn(num_classes, model.feature_dim), dim=1),
             "class_counts": torch.ones(num_classes, dtype=torch.float64), "checkpoint": "synthetic"},
            run_dir / INIT_FILE,
        )
    extra = []
    if cfg.loss.name == "blv":  # the class counts set each class's noise scale, not the work: no label maps to count
        extra += ["loss.blv.class_counts=given", f"loss.blv.given_counts={[1] * num_classes}"]
    if cls.name == "cpsl_distill":  # the frozen teacher, as raw weights of the same network
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), run_dir / "teacher.pt")
        extra += [f"method.teacher={run_dir / 'teacher.pt'}", f"model.num_classes={num_classes}"]
    if extra:
        cfg = load_config(config, [*common, *extra])
    loss = build_seg_loss(cfg.loss, ignore_index=IGNORE_INDEX, run=cfg, num_classes=num_classes, log=lambda text: None)
    classes = CITYSCAPES_CLASSES if num_classes == CITYSCAPES_CLASSES.num_classes else ClassInfo(
        "synthetic", tuple(f"class{i}" for i in range(num_classes)), tuple((i, i, i) for i in range(num_classes))
    )
    recipe = cls(cfg, model, loss, classes).to(device)
    if cfg.train.channels_last:
        recipe.model.to(memory_format=torch.channels_last)
    return cfg, recipe


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_cpu_peak() -> int | None:
    """Reset the process's peak resident memory (Linux ``clear_refs`` 5); the resident KiB now, or None off Linux."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_kib("VmRSS")
    except OSError:
        return None


def time_steps(
    config: str, args: argparse.Namespace, amp: str, device: torch.device, workdir: Path, stream_backward: bool = True,
    compiled: bool = False,
) -> tuple[float, float | None, float]:
    """Median seconds per step after warm-up, and the peak memory of the timed steps (GiB).

    The peak is CUDA's allocated memory on a GPU; on the CPU it is the growth of the process's resident
    memory over the timed steps (Linux; ``main`` maps large blocks one by one, so freed tensors leave it).
    With ``compiled`` the trained network is compiled as ``train.compile`` does; the third value is the
    first step's time (compilation included).
    """
    overrides = [*args.set, f"train.amp={amp}", f"data.batch_size={args.batch}"]
    cfg, recipe = build_recipe(config, overrides, workdir / f"{config.replace('/', '_')}_{amp}", args.num_classes, device)
    if compiled:
        recipe.model.compile()
    optimizer = build_optimizer(recipe.trainable_model(), cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    batches = synthetic_batches(type(recipe).streams, args.batch, tuple(args.size), args.num_classes, device)
    recipe.train()
    times = []
    resident = None
    for iteration in range(args.warmup + args.steps):
        if iteration == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if iteration == args.warmup and device.type == "cpu":
            resident = reset_cpu_peak()
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        recipe.seg_loss.set_iteration(iteration)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        recipe.backward_hook = (lambda loss: scaler.scale(loss).backward()) if stream_backward else None  # as the trainer
        with autocast:
            losses = recipe.training_step(batches, iteration)
        recipe.backward_hook = None
        if losses["loss"].requires_grad:
            scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        recipe.after_optimizer_step(iteration + 1)
        synchronize(device)
        if iteration == 0:
            first = time.perf_counter() - start
        if iteration >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if resident is not None:
        peak = (_proc_status_kib("VmHWM") - resident) / 2**20
    del recipe, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), peak, first


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+",
                        default=["benchmark/source_only", "benchmark/st", "benchmark/cpsl",
                                 "benchmark/dacs", "benchmark/dacs_blv", "benchmark/bicl_hybrid"],
                        help="packaged configs or files; the first is the baseline of the ratios")
    parser.add_argument("--set", nargs="*", default=[], help="overrides applied to every config, e.g. model.name=deeplabv2_r101_proda")
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"), help="crop size of every stream")
    parser.add_argument("--batch", type=int, default=8, help="images per stream")
    parser.add_argument("--num-classes", type=int, default=19, help="label space of the timed configs")
    parser.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--stream-backward", nargs="+", default=["on"], choices=["on", "off"],
                        help="train.stream_backward: back-propagate the source terms before the target graph (on, the default)")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["on", "off"], help="train.compile: torch.compile the network")
    args = parser.parse_args()
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed blocks for reuse, so resident memory would only ever grow; with every large
        # block mapped on its own it returns to the system when freed and the peak is that of live tensors
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"# {name}; torch {torch.__version__}; {datetime.date.today()}; crops {args.size[0]}x{args.size[1]}, batch {args.batch} per stream")
    print(f"# overrides: {' '.join(args.set) or 'none'}")
    memory_kind = "GPU allocated" if device.type == "cuda" else "CPU resident growth"
    print(f"| config | amp | stream backward | compile | ms/step | x first config | first step (s) | peak memory, {memory_kind} (GiB) |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for amp in args.amp:
            baseline = None
            for config in args.configs:
                for mode in args.stream_backward:
                    for compiled in args.compile:
                        seconds, peak, first = time_steps(
                            config, args, amp, device, Path(tmp), stream_backward=mode == "on", compiled=compiled == "on"
                        )
                        baseline = baseline or seconds
                        memory = f"{peak:.2f}" if peak is not None else "-"
                        print(
                            f"| {config} | {amp} | {mode} | {compiled} | {1000 * seconds:.1f} | {seconds / baseline:.2f} | {first:.1f} | {memory} |",
                            flush=True,
                        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
