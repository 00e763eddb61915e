"""Time one training step of each recipe against source-only, on synthetic batches, in one run.

A step is the trainer's own step (:class:`SyntheticTrainer`, ``Trainer._step``): the recipe's
``training_step`` under the configured autocast with per-stream backward, backward through the
grad scaler, gradient clipping, the optimiser and schedule step, the EMA and the recipe's
``after_optimizer_step`` (momentum networks, queues). The recipes, models, losses and optimiser
groups are built from the packaged configs exactly as ``segadapt train`` builds them; only the
data is replaced by random batches of the given crop size, so no dataset, warm-up checkpoint or
pseudo-label pass is needed (CPSL gets random Eq. 7 prototypes and a uniform Eq. 10 count, which
changes no shape and no work). Randomly initialised weights; ``model.pretrained`` is dropped.
``benchmarks/gpu_suite.py`` runs the same steps for every paper-scale recipe in one command; the tests
run its ``--smoke`` profile, so :func:`measure_steps` is exercised on every recipe (this script's
``main`` is not run by the tests). Usage::

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

``--checkpointing off on`` does the same for ``train.activation_checkpointing`` (the encoder's blocks recomputed in
backward); docs/RESULTS.md section 11 measures MIC(HRDA) and MIC(DAFormer) on MiT-B5 so::

    python benchmarks/step_cost.py --threads 1 --warmup 1 --steps 1 --batch 1 --size 256 256 --amp off \
        --stream-backward off on --checkpointing off on --configs gta5_to_cityscapes/mic_hrda \
        --set "model.options.detail_crop_size=[128,128]"
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from segadapt.config import load_config
from segadapt.data.classes import CITYSCAPES_CLASSES, ClassInfo
from segadapt.data.transforms import FULL_IMAGE_KEY
from segadapt.data.transforms.records import FullFrameRecord
from segadapt.engine import distributed
from segadapt.engine.builders import build_model, build_optimizer
from segadapt.engine.checkpoint import seed_everything
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes import recipe_class
from segadapt.engine.recipes.cpsl import INIT_FILE
from segadapt.engine.schedule import build_scheduler
from segadapt.engine.trainer import Trainer
from segadapt.methods.ema import ModelEMA
from segadapt.models import set_activation_checkpointing

IGNORE_INDEX = CITYSCAPES_CLASSES.ignore_index  # the synthetic labels' (random crops have none)


def synthetic_batches(
    streams: dict[str, Any], batch: int, size: tuple[int, int], num_classes: int, device: torch.device, full_frame: bool = False
) -> dict[str, dict[str, Any]]:
    """Random images in [0, 1] and, for labelled streams, label maps of square class blocks.

    ``full_frame``: the unlabelled stream also carries a full frame (CPSL's ``method.teacher_view=full_frame``), here
    another random image of the crop's size whose view is the crop itself (no geometry between them): the momentum
    network's forward then costs one crop's, a lower bound of the authors' 2048x1024 frame (about 4.6 of the paper's
    896x512 crops).
    """
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
        elif full_frame:
            sample[FULL_IMAGE_KEY] = torch.rand(batch, 3, height, width, device=device)
            sample["replay"] = [[FullFrameRecord((height, width))] for _ in range(batch)]
        batches[name] = sample
    return batches


def build_recipe(config: str, overrides: list[str], run_dir: Path, num_classes: int, device: torch.device) -> Any:
    common = [*overrides, f"output_dir={run_dir.parent}", f"name={run_dir.name}", "model.pretrained=null"]
    cfg = load_config(config, common)
    cls = recipe_class(cfg.recipe)
    model = build_model(cfg.model.model_copy(update={"checkpoint": None}), num_classes).to(device)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)  # as the trainer: before the recipe copies it
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


class SyntheticTrainer(Trainer):
    """segadapt's trainer around a recipe from :func:`build_recipe`, stepping on fixed synthetic batches.

    ``Trainer.__init__`` builds data sets, a run directory and the recipe's preparation (pseudo labels,
    prototypes), none of which a timing needs; this sets the attributes the trainer's step reads as
    ``__init__`` sets them, so every timed step is ``Trainer._step`` itself (autocast, per-stream
    backward, AMP scaler, clipping, optimiser and schedule, EMA, ``after_optimizer_step``), with
    ``train.amp``, ``train.stream_backward`` and ``train.compile`` taken from the config.
    ``compile_backend`` replaces torch.compile's default (inductor), e.g. ``eager`` for a quick check.
    """

    def __init__(self, cfg: Any, recipe: Any, device: torch.device, compile_backend: str | None = None) -> None:  # no super().__init__: no data
        self.cfg, self.recipe, self.device = cfg, recipe, device
        self.dist = distributed.env_info()
        self.iteration = 0
        self.checkpoint_dir = cfg.run_dir / "checkpoints"  # named by the non-finite-loss error only
        self.consumed = dict.fromkeys(recipe.streams, 0)
        seed_everything(cfg.seed, cfg.deterministic)
        if cfg.train.compile:  # as the trainer: in place, after the recipe copied its EMA networks
            recipe.model.compile(**({"backend": compile_backend} if compile_backend else {}))
        self.optimizer = build_optimizer(recipe.trainable_model(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.iters, cfg.schedule)
        self.ema = ModelEMA(recipe.model, cfg.train.ema_momentum) if cfg.train.ema_momentum is not None else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        self.early_backwards = 0  # terms the recipe back-propagated before its step's total (per-stream backward)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.recipe.backward_hook is not None:  # the recipe's backward_now; the trainer clears the hook before the total
            self.early_backwards += 1
        super()._backward(loss)

    def step(self, batches: dict[str, dict[str, Any]]) -> None:
        """One training step on ``batches`` (every stream's batch, already on the device)."""
        self._step({name: itertools.repeat(batch) for name, batch in batches.items()})


@dataclass
class StepCost:
    """What :func:`measure_steps` measured of one recipe's training step."""

    median_s: float  # median seconds per step after the warm-up steps
    peak_gib: float | None  # CUDA allocated memory; on the CPU the growth of resident memory (Linux)
    first_s: float  # the first step's seconds (torch.compile's compilation included)
    per_stream_backward: bool  # the recipe back-propagated a term before its total (train.stream_backward at work)


def measure_steps(
    config: str, overrides: list[str], size: tuple[int, int], batch: int, num_classes: int, device: torch.device, workdir: Path,
    warmup: int, steps: int, compile_backend: str | None = None, before_step: Callable[[int], None] | None = None,
) -> StepCost:
    """Time ``warmup + steps`` trainer steps of ``config`` (with ``overrides``) on random ``size`` crops, ``batch`` per stream.

    The peak is CUDA's allocated memory on a GPU; on the CPU it is the growth of the process's resident
    memory over the timed steps (Linux; ``main`` maps large blocks one by one, so freed tensors leave it).
    ``before_step(iteration)`` runs before each step; it may raise to stop the measurement (a deadline).
    """
    run_dir = workdir / config.replace("/", "_")
    cfg, recipe = build_recipe(config, [*overrides, f"data.batch_size={batch}"], run_dir, num_classes, device)
    trainer = SyntheticTrainer(cfg, recipe, device, compile_backend)
    full_frame = getattr(recipe.options, "teacher_view", None) == "full_frame"  # CPSL's momentum network on the whole frame
    batches = synthetic_batches(type(recipe).streams, batch, size, num_classes, device, full_frame)
    times = []
    resident = None
    try:
        for iteration in range(warmup + steps):
            if before_step is not None:
                before_step(iteration)
            if iteration == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if iteration == warmup and device.type == "cpu":
                resident = reset_cpu_peak()
            synchronize(device)
            start = time.perf_counter()
            trainer.step(batches)
            synchronize(device)
            if iteration == 0:
                first = time.perf_counter() - start
            if iteration >= warmup:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if resident is not None:
            peak = (_proc_status_kib("VmHWM") - resident) / 2**20
        return StepCost(statistics.median(times), peak, first, trainer.early_backwards > 0)
    finally:
        del trainer, recipe, batches
        if device.type == "cuda":  # the next measurement's peak starts from an empty cache
            gc.collect()
            torch.cuda.empty_cache()


def time_steps(
    config: str, args: argparse.Namespace, amp: str, device: torch.device, workdir: Path, stream_backward: bool = True,
    compiled: bool = False, checkpointing: bool = False,
) -> tuple[float, float | None, float]:
    """Median seconds per step after warm-up, the peak memory of the timed steps (GiB) and the first step's seconds."""
    overrides = [
        *args.set, f"train.amp={amp}", f"train.stream_backward={str(stream_backward).lower()}", f"train.compile={str(compiled).lower()}",
        f"train.activation_checkpointing={str(checkpointing).lower()}",
    ]  # fmt: skip
    cost = measure_steps(
        config, overrides, tuple(args.size), args.batch, args.num_classes, device, workdir / amp, args.warmup, args.steps
    )
    return cost.median_s, cost.peak_gib, cost.first_s


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
    parser.add_argument("--checkpointing", nargs="+", default=["off"], choices=["on", "off"],
                        help="train.activation_checkpointing: recompute the encoder's blocks in backward")
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
    print(
        f"| config | amp | stream backward | compile | checkpointing | ms/step | x first config | first step (s) | peak memory, {memory_kind} (GiB) |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for amp in args.amp:
            baseline = None
            for config in args.configs:
                for mode, compiled, recomputed in itertools.product(args.stream_backward, args.compile, args.checkpointing):
                    seconds, peak, first = time_steps(
                        config, args, amp, device, Path(tmp), stream_backward=mode == "on", compiled=compiled == "on",
                        checkpointing=recomputed == "on",
                    )  # fmt: skip
                    baseline = baseline or seconds
                    memory = f"{peak:.2f}" if peak is not None else "-"
                    print(
                        f"| {config} | {amp} | {mode} | {compiled} | {recomputed} | {1000 * seconds:.1f} | {seconds / baseline:.2f}"
                        f" | {first:.1f} | {memory} |",
                        flush=True,
                    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
