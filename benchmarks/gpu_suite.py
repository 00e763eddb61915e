"""Every paper-scale cost figure of segadapt in one prepared command on one CUDA device, within minutes.

GPU access is rare and short, so this is the one command to run when a GPU is lent: on synthetic
Cityscapes-size data (random images and block labels, random weights: no data set, no checkpoint) it
measures, each by a fixed step count,

- a training step of every recipe at its paper setting, driven through the trainer's own step
  (``benchmarks/step_cost.py``: the recipe, model, loss and optimiser built from the packaged config as
  ``segadapt train`` builds them): source-only, ST, DARS self-training, CPSL stage 1, BiCL hybrid and
  DACS + BLV on DeepLab-V2 ResNet-101 at 1024x512 crops (CPSL 896x512, its paper crop), DAFormer on
  MiT-B5 at 512x512, each at the config's batch: median step time after warm-up steps and peak memory
  (``torch.cuda.max_memory_allocated``), fp32 and bf16, ``train.stream_backward`` on and off;
- ``train.compile`` on source-only;
- evaluation throughput (images/s) on 1024x2048 images, whole and sliding-window, with and without flip
  (``benchmarks/inference_speed.py``), for DeepLab-V2 and DAFormer MiT-B5;
- a pseudo-label pass (both passes, PNGs written) over N synthetic 1024x2048 images with DARS-TD's
  settings (``benchmarks/pseudo_label_memory.py``'s images);
- Sinkhorn at CPSL's size (the bank plus one image's pixels, the default problem; ``benchmarks/sinkhorn_benchmark.py``).

MIC(DAFormer) (MiT-B5, 512x512), HRDA and MIC(HRDA) (MiT-B5, 1024x1024) have entries too; an entry whose config is
not in the installed version (an older segadapt) is listed as skipped ("recipe not in this version").
The ratios that decide design questions are computed in the same run and printed beside the figures:
CPSL / ST step time, per-stream backward on / off peak memory, bf16 / fp32 step time, MIC(HRDA) / DAFormer
step time and memory, compiled / eager step time. MIC(HRDA) and MIC(DAFormer) are measured with
``train.activation_checkpointing`` too (fp32 and bf16, per-stream backward on and off: the memory goals of
docs/RESULTS.md section 11), with the checkpointing on / off peak-memory ratio.

The run stops by a deadline (``--deadline-s``, default 7 minutes): a measurement that would start
after it, or a training measurement still running at it, is skipped with the reason, as are those
that run out of memory or need a GPU when there is none. The JSON and markdown files are rewritten
after every measurement (atomically), so a run killed at any moment leaves a valid partial record
(``complete: false``, the rest ``pending``). ``--smoke`` runs the same code on the CPU at tiny sizes
(SmallSegNet and MiT-B0, crops divided by 8, 3 steps, one thread) in well under a minute; the tests
run it.
Usage::

    python benchmarks/gpu_suite.py --output gpu_suite.json            # one CUDA device, about 6 minutes
    python benchmarks/gpu_suite.py --only train/cpsl eval --output cpsl_eval.json   # a subset, by id prefix
    python benchmarks/gpu_suite.py --smoke --output /tmp/gpu_suite_smoke.json       # CPU, seconds

Writes the JSON file and a markdown file beside it (same name, ``.md``) holding the device, driver,
torch and CUDA versions and the date, and prints the markdown at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

import segadapt
from segadapt.config import load_config, packaged_config_names
from segadapt.data.classes import CITYSCAPES_CLASSES
from segadapt.engine.pseudo_labelling import generate_pseudo_labels
from segadapt.engine.recipes.cpsl import CPSLOptions
from segadapt.models import create_model

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by the tests: the sibling benchmarks, after every other module
    sys.path.append(str(Path(__file__).resolve().parent))
from inference_speed import PSEUDO_LABEL_IMAGES, cases, load_images, time_cases  # noqa: E402
from pseudo_label_memory import SyntheticImages  # noqa: E402
from sinkhorn_benchmark import CITYSCAPES_R, cpsl_scores, machine, solvers, time_interleaved  # noqa: E402
from step_cost import measure_steps, synchronize  # noqa: E402

NUM_CLASSES = CITYSCAPES_CLASSES.num_classes
AMPS = {"fp32": "off", "bf16": "bf16"}  # the suite's names -> train.amp / eval amp
NOT_IN_VERSION = "recipe not in this version"
ONE_GRAPH = "one backward per step in this recipe (it back-propagates no stream early): off is the same step as on"
PSEUDO_LABEL_CONFIG = "gta5_to_cityscapes/dars_td"  # DARS-TD's pseudo-label settings: 1024x512 input, flip, two passes
COMPILED_RECIPE = "source_only"
CHECKPOINTED_RECIPES = ("mic_daformer", "mic_hrda")  # measured with train.activation_checkpointing too (docs/RESULTS.md section 11)
UNITS = {"ms_per_step": ("ms", 1), "peak_memory_gib": ("GiB", 2)}  # a ratio's field -> unit and digits of its figures


# ----------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class TrainEntry:
    """One recipe at its paper setting: the packaged config, the crop (H, W) and its network family.

    ``smoke`` holds the overrides its tiny ``--smoke`` version needs (CPSL samples M pixels per image
    from the output grid; DAFormer's pseudo-label crop is in pixels).
    """

    label: str
    config: str
    crop: tuple[int, int]
    family: str  # "deeplab", "mit" or "hrda": the network the smoke profile puts in its place
    smoke: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return Path(self.config).name

    def available(self) -> bool:
        return f"{self.config}.yaml" in packaged_names()


@functools.cache
def packaged_names() -> frozenset[str]:
    return frozenset(packaged_config_names())


@functools.cache
def network_and_batch(config: str, overrides: tuple[str, ...]) -> tuple[str, int]:
    """The network and the batch per stream a packaged config trains with (after ``overrides``)."""
    cfg = load_config(config, list(overrides))
    return cfg.model.name, cfg.data.batch_size


TRAIN_ENTRIES = (
    TrainEntry("source-only", "gta5_to_cityscapes/source_only", (512, 1024), "deeplab"),
    TrainEntry("ST", "gta5_to_cityscapes/st", (512, 1024), "deeplab"),
    TrainEntry("DARS self-training", "gta5_to_cityscapes/dars_td", (512, 1024), "deeplab"),
    TrainEntry("CPSL stage 1", "gta5_to_cityscapes/cpsl", (512, 896), "deeplab", ("method.pixels_per_image=32",)),
    TrainEntry("BiCL hybrid", "gta5_to_cityscapes/bicl", (512, 1024), "deeplab"),
    TrainEntry("DACS + BLV", "gta5_to_cityscapes/dacs_blv", (512, 1024), "deeplab"),
    TrainEntry("DAFormer", "gta5_to_cityscapes/daformer", (512, 512), "mit", ("method.pseudo_ignore_top=2", "method.pseudo_ignore_bottom=15")),
    TrainEntry("MIC(DAFormer)", "gta5_to_cityscapes/mic_daformer", (512, 512), "mit"),
    TrainEntry("HRDA", "gta5_to_cityscapes/hrda", (1024, 1024), "hrda"),
    TrainEntry("MIC(HRDA)", "gta5_to_cityscapes/mic_hrda", (1024, 1024), "hrda"),
)


@dataclass(frozen=True)
class Profile:
    """The sizes of a run: the papers' on a CUDA device, or tiny ones on the CPU (``--smoke``)."""

    name: str
    device: str
    tiny: bool  # the entries' ``smoke`` overrides apply
    crop_divisor: int  # paper crops are divided by it
    batch: int | None  # images per stream; None: the config's (the paper's)
    train_overrides: dict[str, tuple[str, ...]]  # per network family
    eval_networks: dict[str, tuple[str, dict[str, Any]]]  # family -> (model name, options)
    warmup: int
    steps: int
    eval_size: tuple[int, int]
    eval_window: tuple[int, int]
    eval_window_batch: int
    eval_images: int
    eval_batch: int
    eval_repeats: int
    pseudo_label_images: int
    pseudo_label_overrides: tuple[str, ...]
    sinkhorn_repeats: int
    compile_backend: str | None  # None: torch.compile's default (inductor)
    compile_needs_s: float  # seconds left that the compile measurement needs to start


PAPER = Profile(
    name="paper", device="cuda", tiny=False, crop_divisor=1, batch=None,
    train_overrides={"deeplab": (), "mit": (), "hrda": ()},
    eval_networks={"deeplab": ("deeplabv2_r101", {}), "mit": ("daformer_mitb5", {})},
    warmup=3, steps=10,
    eval_size=(1024, 2048), eval_window=(512, 1024), eval_window_batch=6, eval_images=4, eval_batch=4, eval_repeats=2,
    pseudo_label_images=32, pseudo_label_overrides=(),
    sinkhorn_repeats=20, compile_backend=None, compile_needs_s=150.0,
)  # fmt: skip
SMOKE = Profile(
    name="smoke", device="cpu", tiny=True, crop_divisor=8, batch=2,
    train_overrides={
        "deeplab": ("model.name=small",), "mit": ("model.name=daformer_mitb0", "model.options={embed_dim: 32}"),
        # HRDA's network on MiT-B0: the 1024 / 8 crops' context view is 64 pixels (MiT needs 29), the detail crop half the crop
        "hrda": ("model.name=hrda_daformer_mitb0", "model.options={embed_dim: 32, attention_embed_dim: 32, detail_crop_size: [64, 64]}"),
    },
    eval_networks={"deeplab": ("small", {}), "mit": ("daformer_mitb0", {"embed_dim": 32})},
    warmup=1, steps=2,
    eval_size=(64, 128), eval_window=(32, 64), eval_window_batch=4, eval_images=2, eval_batch=2, eval_repeats=1,
    pseudo_label_images=4,
    pseudo_label_overrides=("pseudo_label.size=[32,64]", "data.num_workers=0", "data.val_batch_size=2"),
    sinkhorn_repeats=2, compile_backend="eager", compile_needs_s=0.0,
)  # fmt: skip


class DeadlineReached(Exception):
    """The run's deadline passed during a measurement; its message is the skip reason."""


@dataclass
class Context:
    """What every measurement reads: the profile, the device, a scratch folder, the deadline and the other results."""

    profile: Profile
    device: torch.device
    workdir: Path
    deadline_s: float
    started: float = field(default_factory=time.monotonic)
    done: dict[str, Measurement] = field(default_factory=dict)

    def left_s(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    def check_deadline(self, steps_done: int, steps: int) -> None:
        if self.left_s() <= 0:
            raise DeadlineReached(f"deadline: --deadline-s {self.deadline_s:g} reached after {steps_done} of {steps} steps")


@dataclass
class Measurement:
    """One planned figure: how to run it, and once run, its result or why it was skipped."""

    id: str
    kind: str  # train | eval | pseudo_label | sinkhorn
    params: dict[str, Any]
    run: Callable[[Context], dict[str, Any]] = field(repr=False)
    missing: str | None = None  # why it can never run in this version (its recipe is absent)
    blocked: Callable[[Context], str | None] | None = field(default=None, repr=False)  # a skip reason known before it runs
    needs_s: float = 0.0  # seconds that must be left before the deadline to start it
    status: str = "pending"  # pending | measured | skipped
    reason: str | None = None
    result: dict[str, Any] | None = None
    wall_s: float | None = None

    def record(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("id", "kind", "params", "status", "reason", "result", "wall_s")}


# ----------------------------------------------------------------------------- the measurements


def train_params(
    entry: TrainEntry, profile: Profile, amp: str, stream_backward: bool, compiled: bool, checkpointing: bool = False
) -> dict[str, Any]:
    """The settings of a training measurement; network and batch come from the config (None when it is absent)."""
    params: dict[str, Any] = {
        "recipe": entry.label, "config": entry.config, "network": None, "batch": profile.batch,
        "crop": [side // profile.crop_divisor for side in entry.crop], "amp": amp,
        "stream_backward": stream_backward, "compile": compiled, "activation_checkpointing": checkpointing,
    }  # fmt: skip
    if entry.available():
        params["network"], batch = network_and_batch(entry.config, profile.train_overrides[entry.family])
        params["batch"] = profile.batch or batch
    return params


def train_step(
    entry: TrainEntry, amp: str, stream_backward: bool, compiled: bool, checkpointing: bool, ctx: Context
) -> dict[str, Any]:
    """Median ms per trainer step, peak memory and first-step seconds of ``entry`` (``benchmarks/step_cost.py``)."""
    profile = ctx.profile
    params = train_params(entry, profile, amp, stream_backward, compiled, checkpointing)
    overrides = [
        *profile.train_overrides[entry.family], *(entry.smoke if profile.tiny else ()),
        f"train.amp={AMPS[amp]}", f"train.stream_backward={str(stream_backward).lower()}", f"train.compile={str(compiled).lower()}",
        f"train.activation_checkpointing={str(checkpointing).lower()}",
    ]  # fmt: skip
    steps = profile.warmup + profile.steps
    cost = measure_steps(
        entry.config, overrides, tuple(params["crop"]), params["batch"], NUM_CLASSES, ctx.device, ctx.workdir,
        profile.warmup, profile.steps, compile_backend=profile.compile_backend if compiled else None,
        before_step=lambda done: ctx.check_deadline(done, steps),
    )  # fmt: skip
    return {
        "ms_per_step": 1000 * cost.median_s, "peak_memory_gib": cost.peak_gib, "first_step_s": cost.first_s,
        "per_stream_backward": cost.per_stream_backward,
    }  # fmt: skip


def one_graph(on_id: str, ctx: Context) -> str | None:
    """Why ``stream_backward`` off is not measured: the "on" step back-propagated nothing early, so off is the same step."""
    on = ctx.done.get(on_id)
    if on is not None and on.status == "measured" and on.result is not None and not on.result["per_stream_backward"]:
        return ONE_GRAPH
    return None


def eval_throughput(family: str, amp: str, ctx: Context) -> dict[str, Any]:
    """Images/s of evaluation's inference (``benchmarks/inference_speed.py``'s cases) on random images."""
    profile = ctx.profile
    name, options = profile.eval_networks[family]
    images, _ = load_images(SimpleNamespace(size=profile.eval_size, images=profile.eval_images), ctx.device)
    model = create_model(name, NUM_CLASSES, **options).to(ctx.device).eval()
    settings = SimpleNamespace(window=profile.eval_window, batch=profile.eval_batch, window_batch=profile.eval_window_batch)
    todo = cases(settings, AMPS[amp], channels_last=False)
    rates = time_cases(model, images, todo, profile.eval_repeats)
    return {"cases": [{"case": case.name, "images_per_s": rate, "peak_memory_gib": peak} for case, (rate, peak) in zip(todo, rates)]}


def pseudo_label_pass(ctx: Context) -> dict[str, Any]:
    """Seconds of ``generate_pseudo_labels`` (two prediction passes, thresholds, PNGs) over synthetic images."""
    profile = ctx.profile
    name, options = profile.eval_networks["deeplab"]
    cfg = load_config(PSEUDO_LABEL_CONFIG, [*profile.pseudo_label_overrides, f"output_dir={ctx.workdir}", "name=pseudo_label"])
    height, width = profile.eval_size
    dataset = SyntheticImages(profile.pseudo_label_images, height, width)
    model = create_model(name, NUM_CLASSES, **options)
    synchronize(ctx.device)
    start = time.perf_counter()
    summary = generate_pseudo_labels(model, dataset, cfg, ctx.workdir / "pseudo_labels", ctx.device, log=lambda text: None)
    synchronize(ctx.device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "images_per_s": len(dataset) / seconds,
        f"projected_{PSEUDO_LABEL_IMAGES}_images_s": PSEUDO_LABEL_IMAGES * seconds / len(dataset), "density": summary["density"],
    }  # fmt: skip


def sinkhorn_rows() -> int:
    """CPSL's Sinkhorn problem: the full memory bank plus one image's sampled pixels (the default, one problem per image,
    as the authors'), or the batch's (paper batch 4) with ``method.sinkhorn_per_image=false``."""
    options = CPSLOptions()
    images = 1 if options.sinkhorn_per_image else network_and_batch("gta5_to_cityscapes/cpsl", ())[1]
    return options.queue_size + images * options.pixels_per_image


def sinkhorn_cost(ctx: Context) -> dict[str, Any]:
    """Median ms of segadapt's Sinkhorn, its log-domain form and the authors' plain one at CPSL's size."""
    options = CPSLOptions()
    generator = torch.Generator().manual_seed(0)
    marginal = torch.tensor(CITYSCAPES_R)
    scores = cpsl_scores(sinkhorn_rows(), marginal, generator).to(ctx.device)
    median = time_interleaved(
        solvers(scores, marginal.to(ctx.device), options.epsilon, options.sinkhorn_iterations), ctx.profile.sinkhorn_repeats, ctx.device
    )
    return {"ms": {name: 1000 * seconds for name, seconds in median.items()}}


def train_id(entry: TrainEntry, amp: str, stream_backward: bool, compiled: bool = False, checkpointing: bool = False) -> str:
    suffix = "compiled" if compiled else f"stream-backward-{'on' if stream_backward else 'off'}"
    return f"train/{entry.key}/{amp}/{suffix}" + ("-checkpointing" if checkpointing else "")


def train_measurement(
    entry: TrainEntry, profile: Profile, amp: str, stream_backward: bool, compiled: bool = False, checkpointing: bool = False
) -> Measurement:
    blocked = None if stream_backward else partial(one_graph, train_id(entry, amp, True, checkpointing=checkpointing))
    params = train_params(entry, profile, amp, stream_backward, compiled, checkpointing)
    return Measurement(
        train_id(entry, amp, stream_backward, compiled, checkpointing), "train", params,
        partial(train_step, entry, amp, stream_backward, compiled, checkpointing),
        missing=None if entry.available() else NOT_IN_VERSION, blocked=blocked, needs_s=profile.compile_needs_s if compiled else 0.0,
    )


def plan(profile: Profile) -> list[Measurement]:
    """Every measurement, in the order it runs: the design questions' figures first, so a deadline cuts the least needed."""
    entries = list(TRAIN_ENTRIES)
    compiled = next(entry for entry in entries if entry.key == COMPILED_RECIPE)
    evals = [
        Measurement(f"eval/{family}/{amp}", "eval", {"network": profile.eval_networks[family][0], "size": list(profile.eval_size),
                    "window": list(profile.eval_window), "images": profile.eval_images, "amp": amp}, partial(eval_throughput, family, amp))
        for family in ("deeplab", "mit") for amp in AMPS
    ]  # fmt: skip
    return [
        Measurement("sinkhorn/cpsl", "sinkhorn", {"rows": sinkhorn_rows(), "classes": len(CITYSCAPES_R)}, sinkhorn_cost),
        *(train_measurement(entry, profile, "fp32", True) for entry in entries),
        *(train_measurement(entry, profile, "bf16", True) for entry in entries),
        # the memory goals (MIC(HRDA) in 24 GB, MIC(DAFormer) in 12 GB): the encoder recomputed in backward
        *(train_measurement(entry, profile, amp, stream_backward, checkpointing=True)
          for entry in entries if entry.key in CHECKPOINTED_RECIPES for amp in AMPS for stream_backward in (True, False)),
        *(train_measurement(entry, profile, "fp32", False) for entry in entries),
        *evals,
        Measurement("pseudo_label/deeplab", "pseudo_label", {"network": profile.eval_networks["deeplab"][0], "config": PSEUDO_LABEL_CONFIG,
                    "images": profile.pseudo_label_images, "size": list(profile.eval_size)}, pseudo_label_pass),
        train_measurement(compiled, profile, "fp32", True, compiled=True),
        *(train_measurement(entry, profile, "bf16", False) for entry in entries),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- ratios


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of one field of two measurements."""

    name: str
    numerator: str
    denominator: str
    value: str  # the result field: ms_per_step or peak_memory_gib

    def compute(self, done: dict[str, Measurement]) -> dict[str, Any]:
        """The ratio's record: both figures, and the value or why there is none."""
        sides = [done.get(self.numerator), done.get(self.denominator)]
        top, bottom = (side.result.get(self.value) if side is not None and side.result is not None else None for side in sides)
        row = {"name": self.name, "field": self.value, "numerator": self.numerator, "denominator": self.denominator,
               "numerator_value": top, "denominator_value": bottom, "value": None, "note": None}  # fmt: skip
        if any(side is not None and side.reason == ONE_GRAPH for side in sides):
            row["note"] = "n/a (one backward per step)"
        elif any(side is None or side.status == "skipped" for side in sides):
            row["note"] = "n/a (skipped)"
        elif any(side.status == "pending" for side in sides if side is not None):
            row["note"] = "n/a (not measured yet)"
        elif top is None or not bottom:
            row["note"] = f"n/a ({self.value} zero or not measured)"
        else:
            row["value"] = top / bottom
        return row


def ratios() -> list[Ratio]:
    """The ratios that decide design questions, each from two measurements of the same run."""
    entry = {e.key: e for e in TRAIN_ENTRIES}
    rows = [Ratio(f"CPSL / ST step time, {amp}", train_id(entry["cpsl"], amp, True), train_id(entry["st"], amp, True), "ms_per_step")
            for amp in AMPS]  # fmt: skip
    rows += [
        Ratio(f"per-stream backward on / off peak memory, {e.label}, fp32", train_id(e, "fp32", True), train_id(e, "fp32", False), "peak_memory_gib")
        for e in TRAIN_ENTRIES
    ]
    rows += [Ratio(f"bf16 / fp32 step time, {e.label}", train_id(e, "bf16", True), train_id(e, "fp32", True), "ms_per_step") for e in TRAIN_ENTRIES]
    rows += [
        Ratio(f"MIC(HRDA) / DAFormer {what}, fp32", train_id(entry["mic_hrda"], "fp32", True), train_id(entry["daformer"], "fp32", True), value)
        for what, value in (("step time", "ms_per_step"), ("peak memory", "peak_memory_gib"))
    ]
    rows += [
        Ratio(f"activation checkpointing on / off peak memory, {entry[key].label}, {amp}", train_id(entry[key], amp, True, checkpointing=True),
              train_id(entry[key], amp, True), "peak_memory_gib")
        for key in CHECKPOINTED_RECIPES for amp in AMPS
    ]  # fmt: skip
    compiled = entry[COMPILED_RECIPE]
    rows.append(Ratio(f"compiled / eager step time, {compiled.label}, fp32", train_id(compiled, "fp32", True, compiled=True),
                      train_id(compiled, "fp32", True), "ms_per_step"))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- environment, records


def driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi``, or None where there is none."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, torch, CUDA and cuDNN versions, host and date of the run."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else ("cpu" if device.type == "cpu" else f"cpu ({device} not available)"),
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "driver": driver_version() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "host": machine(torch.device("cpu")),
        "python": platform.python_version(),
        "segadapt": segadapt.__version__,
        "commit": git_commit(),
        "memory_kind": "CUDA allocated" if device.type == "cuda" else "CPU resident growth",
    }


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step: a kill leaves the old file or the new one, never half of one."""
    partial_path = path.with_name(path.name + ".partial")
    partial_path.write_text(text)
    os.replace(partial_path, path)


def document(measurements: list[Measurement], ctx: Context, env: dict[str, Any], argv: Sequence[str], complete: bool) -> dict[str, Any]:
    return {
        "suite": "segadapt gpu_suite",
        "command": " ".join(["python benchmarks/gpu_suite.py", *argv]),
        "profile": ctx.profile.name,
        "complete": complete,
        "elapsed_s": time.monotonic() - ctx.started,
        "settings": {**dataclasses.asdict(ctx.profile), "deadline_s": ctx.deadline_s},
        "environment": env,
        "ratios": [ratio.compute(ctx.done) for ratio in ratios()],
        "measurements": [m.record() for m in measurements],
    }


# ----------------------------------------------------------------------------- markdown


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def figures(ratio: dict[str, Any]) -> str:
    """A ratio's two absolute figures with their unit, as printed beside it."""
    if ratio["numerator_value"] is None and ratio["denominator_value"] is None:
        return "-"
    unit, digits = UNITS[ratio["field"]]
    return f"{number(ratio['numerator_value'], digits)} / {number(ratio['denominator_value'], digits)} {unit}"


def train_rows(m: Measurement) -> list[list[str]]:
    p, r = m.params, m.result or {}
    backward = "compiled" if p["compile"] else ("on" if p["stream_backward"] else "off")
    recomputed = "on" if p.get("activation_checkpointing") else "off"
    return [[p["recipe"], p["network"] or "-", "x".join(map(str, p["crop"][::-1])), str(p["batch"] or "-"), p["amp"], backward, recomputed,
             number(r.get("ms_per_step")), number(r.get("peak_memory_gib"), 2), number(r.get("first_step_s"))]]  # fmt: skip


def eval_rows(m: Measurement) -> list[list[str]]:
    return [[m.params["network"], m.params["amp"], case["case"], number(case["images_per_s"], 2), number(case["peak_memory_gib"], 2)]
            for case in (m.result or {"cases": []})["cases"]]  # fmt: skip


def pseudo_label_rows(m: Measurement) -> list[list[str]]:
    r = m.result or {}
    return [[m.params["network"], str(m.params["images"]), "x".join(map(str, m.params["size"][::-1])), number(r.get("seconds")),
             number(r.get("images_per_s"), 2), number(r.get(f"projected_{PSEUDO_LABEL_IMAGES}_images_s"), 0)]]  # fmt: skip


def sinkhorn_rows_md(m: Measurement) -> list[list[str]]:
    ms = (m.result or {"ms": {}})["ms"]
    return [[str(m.params["rows"]), *(number(ms.get(name), 2) for name in ("new", "log", "plain"))]]


TABLES: dict[str, tuple[str, list[str], Callable[[Measurement], list[list[str]]]]] = {
    "train": ("Training steps (median after warm-up)",
              ["recipe", "network", "crop WxH", "batch/stream", "amp", "per-stream backward", "checkpointing", "ms/step", "peak GiB",
               "first step s"], train_rows),
    "eval": ("Evaluation throughput", ["network", "amp", "case", "images/s", "peak GiB"], eval_rows),
    "pseudo_label": ("Pseudo-label pass (both passes, PNGs written)",
                     ["network", "images", "size WxH", "seconds", "images/s", f"projected {PSEUDO_LABEL_IMAGES} images, s"], pseudo_label_rows),
    "sinkhorn": ("Sinkhorn at CPSL's size", ["rows", "segadapt ms", "log-domain ms", "authors' plain ms"], sinkhorn_rows_md),
}  # fmt: skip


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(doc: dict[str, Any], measurements: list[Measurement]) -> str:
    env = doc["environment"]
    lines = [
        "# segadapt GPU suite", "",
        f"{env['device']}; driver {env['driver'] or '-'}; torch {env['torch']}; CUDA {env['cuda'] or '-'}; {env['date']}",
        f"host: {env['host']}; segadapt {env['segadapt']} ({env['commit'] or 'no git commit'}); profile {doc['profile']}; "
        f"{'complete' if doc['complete'] else 'partial'} after {doc['elapsed_s']:.0f} s (deadline {doc['settings']['deadline_s']:g} s)",
        f"command: `{doc['command']}`; peak memory: {env['memory_kind']}", "",
        "## Ratios", "",
        *table(["ratio", "value", "from"], [[r["name"], number(r["value"], 2) if r["value"] is not None else r["note"], figures(r)]
                                            for r in doc["ratios"]]),
    ]  # fmt: skip
    for kind, (title, header, rows) in TABLES.items():
        measured = [row for m in measurements if m.kind == kind and m.status == "measured" for row in rows(m)]
        lines += ["", f"## {title}", "", *table(header, measured)]
    skipped = [[m.id, m.reason or ""] for m in measurements if m.status == "skipped"]
    pending = [m.id for m in measurements if m.status == "pending"]
    lines += ["", "## Skipped", "", *table(["measurement", "reason"], skipped)]
    if pending:
        lines += ["", f"Not run yet (the run was stopped): {', '.join(pending)}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- running


def skip_reason(m: Measurement, ctx: Context, args: argparse.Namespace) -> str | None:
    """Why ``m`` is not run, checked in this order; None to run it."""
    if m.missing is not None:
        return m.missing
    if args.only and not any(m.id.startswith(prefix) for prefix in args.only):
        return f"not selected (--only {' '.join(args.only)})"
    if ctx.device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device: paper-scale measurements need one (--smoke runs the same code on the CPU at tiny sizes)"
    if ctx.left_s() <= m.needs_s:
        needed = f", {m.needs_s:g} s needed" if m.needs_s else ""
        return f"deadline: {max(ctx.left_s(), 0):.0f} s left of --deadline-s {ctx.deadline_s:g}{needed}"
    return m.blocked(ctx) if m.blocked is not None else None


def run_measurement(m: Measurement, ctx: Context) -> None:
    """Run ``m``, recording its result, or the out-of-memory, deadline or error that stopped it as the skip reason."""
    start = time.perf_counter()
    try:
        m.result, m.status = m.run(ctx), "measured"
    except DeadlineReached as stop:
        m.status, m.reason = "skipped", str(stop)
    except torch.cuda.OutOfMemoryError as error:
        m.status, m.reason = "skipped", f"out of memory: {str(error).splitlines()[0]}"
    except Exception as error:  # one broken measurement must not lose a rare GPU run's others; the tests require none
        traceback.print_exc()
        m.status, m.reason = "skipped", f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        m.wall_s = time.perf_counter() - start
        if ctx.device.type == "cuda":  # what a failed measurement left, before the next one's peak (a slow call on the CPU)
            gc.collect()
            torch.cuda.empty_cache()


def summary(m: Measurement) -> str:
    """One line of progress for ``m``."""
    if m.status == "skipped":
        return f"skipped: {m.reason}"
    r = m.result or {}
    if m.kind == "train":
        return f"{r['ms_per_step']:.1f} ms/step, peak {number(r['peak_memory_gib'], 2)} GiB, first step {r['first_step_s']:.1f} s"
    if m.kind == "eval":
        return "; ".join(f"{case['case']}: {case['images_per_s']:.2f} images/s" for case in r["cases"])
    if m.kind == "pseudo_label":
        return f"{m.params['images']} images in {r['seconds']:.1f} s ({r['images_per_s']:.2f} images/s)"
    return ", ".join(f"{name} {ms:.2f} ms" for name, ms in r["ms"].items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("gpu_suite.json"), help="the JSON file; the markdown goes beside it (.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="start no measurement (and stop a training one) after this many seconds")
    parser.add_argument("--device", default="cuda", help="the CUDA device (ignored with --smoke, which runs on the CPU)")
    parser.add_argument("--only", nargs="+", default=[], metavar="PREFIX", help="measure only the ids starting with these, e.g. train/cpsl eval")
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes (SmallSegNet, MiT-B0, 3 steps, one thread)")
    args = parser.parse_args(argv)
    markdown_path = args.output.with_suffix(".md")
    existing = [str(path) for path in (args.output, markdown_path) if path.exists()]
    if existing and not args.overwrite:
        parser.error(f"{' and '.join(existing)} already exist(s); choose another --output or pass --overwrite (nothing was written)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the suite; returns the document it wrote."""
    args = parse_args(argv)
    profile = SMOKE if args.smoke else PAPER
    device = torch.device("cpu" if args.smoke else args.device)
    if args.smoke:  # on a shared CI machine two OpenMP threads on a busy core make every step 10-30x slower
        torch.set_num_threads(1)
    argv = list(sys.argv[1:] if argv is None else argv)
    measurements = plan(profile)
    env = environment(device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    print(f"# {env['device']}; driver {env['driver'] or '-'}; torch {env['torch']}; CUDA {env['cuda'] or '-'}; {env['date']}; "
          f"profile {profile.name}, {len(measurements)} measurements, deadline {args.deadline_s:g} s", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as scratch:
        ctx = Context(profile, device, Path(scratch), args.deadline_s)

        def save(complete: bool) -> dict[str, Any]:
            doc = document(measurements, ctx, env, argv, complete)
            write_atomic(args.output, json.dumps(doc, indent=2) + "\n")
            write_atomic(args.output.with_suffix(".md"), markdown(doc, measurements))
            return doc

        save(False)
        for m in measurements:
            reason = skip_reason(m, ctx, args)
            if reason is None:
                run_measurement(m, ctx)
            else:
                m.status, m.reason = "skipped", reason
            ctx.done[m.id] = m
            save(False)
            print(f"[{time.monotonic() - ctx.started:6.1f} s] {m.id}: {summary(m)}", flush=True)
        doc = save(True)
    print()
    print(markdown(doc, measurements), end="")
    print(f"\nwrote {args.output} and {args.output.with_suffix('.md')}")
    return doc


if __name__ == "__main__":
    main()
