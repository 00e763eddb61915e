"""Typed run configuration: YAML files validated against schemas, with dotted overrides.

A run is described by one :class:`RunConfig`. It is read from a YAML file under ``configs/``,
optionally on top of the files it names in ``base:`` (merged in order, the file itself last),
then command-line overrides such as ``optim.lr=1e-3`` are applied, then the result is
validated. An unknown or mistyped key fails with a :class:`~segadapt.errors.ConfigError`
naming the closest valid key. The fully resolved config (``resolved_yaml``) is what a run
saves as ``config.yaml``, and what ``segadapt train RUN_DIR/config.yaml`` reproduces.

Examples:
    >>> cfg = load_config(None, ["optim.lr=0.01", "train.iters=10"])
    >>> cfg.optim.lr, cfg.train.iters
    (0.01, 10)
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PER_CLASS: dict[str, Any] = {"per_class": True}
"""``json_schema_extra`` of a field holding one value per class: checked against the data's class count
when a run starts (:func:`per_class_values`), so a 19-entry list on 11-class data fails at once, naming its key."""


PATH: dict[str, Any] = {"path": True}
"""``json_schema_extra`` of a field holding a file or folder path to read: made absolute when a run starts
(:func:`with_absolute_paths`), so its run directory resumes from any working directory."""

Config = typing.TypeVar("Config", bound=BaseModel)


def with_absolute_paths(config: Config) -> Config:
    """``config`` with every relative path of a :data:`PATH` field made absolute against the working directory.

    Examples:
        >>> import os
        >>> cfg = with_absolute_paths(load_config(None, ["model.checkpoint=runs/a/last.pt"]))
        >>> cfg.model.checkpoint == os.path.join(os.getcwd(), "runs/a/last.pt")
        True
    """
    update: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            absolute = with_absolute_paths(value)
            if absolute is not value:
                update[name] = absolute
        elif isinstance(value, str) and isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("path"):
            absolute_path = os.path.abspath(os.path.expanduser(value))
            if absolute_path != value:
                update[name] = absolute_path
    return config.model_copy(update=update) if update else config


def per_class_values(config: BaseModel, prefix: str = "") -> list[tuple[str, Sequence[Any]]]:
    """``(dotted key, value)`` of every per-class list that is set in ``config`` (fields marked :data:`PER_CLASS`).

    Examples:
        >>> per_class_values(load_config(None, ["pseudo_label.given_distribution=[0.5,0.5]"]))
        [('pseudo_label.given_distribution', [0.5, 0.5])]
    """
    found: list[tuple[str, Sequence[Any]]] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            found += per_class_values(value, f"{key}.")
        elif value is not None and isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("per_class"):
            found.append((key, value))
    return found


class SubsetSpec(_Strict):
    """A deterministic labeled/unlabeled partition of a split (:func:`segadapt.data.splits.make_split`)."""

    ratio: float = Field(gt=0, le=1, description="labeled fraction, e.g. 0.125 for 1/8")
    part: Literal["labeled", "unlabeled"] = "labeled"
    seed: int = 0


class DatasetSpec(_Strict):
    """One dataset split. ``dataset`` is a registered name (``segadapt.data.build_dataset``).

    ``benchmark`` is the embedded benchmark: ``root`` defaults to the cache, ``domain`` picks
    source or target, ``benchmark_seed``/``benchmark_size`` pick the generated copy.
    """

    dataset: str
    root: str | None = Field(None, json_schema_extra=PATH)
    split: str = "train"
    split_file: str | None = Field(None, description="restrict to the names listed in this file", json_schema_extra=PATH)
    with_labels: bool = True
    domain: Literal["source", "target"] | None = None
    benchmark_seed: int = 0
    benchmark_size: str = "default"
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific loader options")
    subset: SubsetSpec | None = Field(None, description="keep the labeled or unlabeled part of a ratio split")
    pseudo_labels: str | None = Field(
        None,
        json_schema_extra=PATH, description="a folder of <name>.png train-id pseudo labels (segadapt pseudo-label) that replace the labels"
    )
    # Set by RunConfig to where the spec sits (data.val), kept by model_copy: errors about the
    # spec's data then name the key to set, whichever part of the engine builds the dataset.
    _key: str = PrivateAttr(default="data.<source|target|val>")

    @property
    def key(self) -> str:
        """The spec's place in the run config, e.g. ``data.val``, for messages naming a key to set."""
        return self._key


class DataConfig(_Strict):
    source: DatasetSpec | None = None
    target: DatasetSpec | None = None
    val: DatasetSpec | None = None
    batch_size: int = Field(4, ge=1)
    val_batch_size: int = Field(1, ge=1)
    num_workers: int = Field(2, ge=0)
    train_transforms: list[dict[str, Any]] = Field(default_factory=list)
    target_transforms: list[dict[str, Any]] | None = Field(
        None, description="transforms of target images; defaults to train_transforms"
    )
    val_transforms: list[dict[str, Any]] = Field(default_factory=list)
    crop_size: tuple[int, int] | None = Field(
        None, description="(h, w) of every random_crop in train_transforms and target_transforms; none = as listed there"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_crop_size(cls, data: Any) -> Any:
        """Write ``crop_size`` into the ``random_crop`` entries, so changing the crop is one key, not a whole list."""
        if not isinstance(data, dict) or data.get("crop_size") is None:
            return data
        size = list(data["crop_size"]) if isinstance(data["crop_size"], (list, tuple)) else data["crop_size"]
        data = dict(data)
        found = False
        for key in ("train_transforms", "target_transforms"):
            entries = data.get(key)
            if not isinstance(entries, list):
                continue
            replaced = []
            for entry in entries:
                if isinstance(entry, dict) and entry.get("name") == "random_crop":
                    entry, found = {**entry, "size": size}, True
                replaced.append(entry)
            data[key] = replaced
        if not found:
            raise ValueError("data.crop_size needs a {name: random_crop} entry in data.train_transforms to resize; add one")
        return data


class ModelConfig(_Strict):
    name: str = "small"
    num_classes: int | None = Field(None, ge=1, description="defaults to the training dataset's class count")
    pretrained: str | None = Field(None, description="torchvision-format ImageNet backbone weights file", json_schema_extra=PATH)
    checkpoint: str | None = Field(
        None, description="full model weights (segadapt or the authors' format)", json_schema_extra=PATH
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model constructor")


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(2.5e-4, gt=0)
    head_lr_mult: float = Field(10.0, gt=0, description="learning-rate multiplier of the head parameters")
    momentum: float = Field(0.9, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(5e-4, ge=0)
    no_decay_keys: list[str] = Field(
        default_factory=list,
        description="parameters whose name contains one of these strings get no weight decay (DAFormer: [norm])",
    )
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; none = no clipping")
    method_head_optimizer: Literal["same", "sgd", "adamw", "adam"] = Field(
        "same",
        description="optimiser of the parameters a method adds to the network (CPSL's self-labeling head; lr * "
        "head_lr_mult) when it differs from optim.name, e.g. the paper's SGD beside the benchmark's AdamW network",
    )


class ScheduleConfig(_Strict):
    name: Literal["poly", "constant", "cosine"] = "poly"
    power: float = 0.9
    warmup_iters: int = Field(0, ge=0)
    warmup_start_factor: float = Field(1e-3, gt=0, le=1)
    offset: int = Field(
        0, ge=0, description="iterations an earlier stage already ran: the schedule spans offset + train.iters and starts at offset"
    )


class TrainConfig(_Strict):
    iters: int = Field(1000, ge=1)
    eval_every: int = Field(0, ge=0, description="0 = only at the end")
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="0 = only at evaluations and the end")
    ema_momentum: float | None = Field(None, ge=0, lt=1, description="keep an EMA copy of the model")
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    grad_accum: int = Field(1, ge=1)
    compile: bool = Field(
        False,
        description="torch.compile the trained network's forward in place (nn.Module.compile; same state-dict keys); "
        "docs/training.md says when it pays",
    )
    stream_backward: bool = Field(
        True,
        description="two-stream recipes back-propagate the source terms before building the target graph "
        "(same gradients, the peak memory of one stream)",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute the encoder's blocks (MiT transformer blocks, ResNet bottlenecks) in backward instead of "
        "keeping their activations: same gradients, less memory, about one more encoder forward per step "
        "(docs/training.md)",
    )
    sync_bn: bool = Field(
        False, description="under torchrun on GPUs: BatchNorm statistics over all processes' batches (SyncBatchNorm)"
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads of torch's kernels (torch.set_num_threads); none = torch's default (all cores)"
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` (train.amp=off) as false


def _amp_yaml_off(value: Any) -> Any:
    """YAML 1.1 reads a bare ``off`` (``eval.amp=off``) as false: it means ``"off"``."""
    return "off" if value is False else value


WINDOW_BATCH_HELP = (
    "sliding window: window positions per forward pass (each holds that many crops of every image of the batch); "
    "1 = one window at a time"
)
INFERENCE_AMP_HELP = "autocast of the inference forward: off (fp32), bf16 or fp16; softmax and averaging stay fp32"
CHANNELS_LAST_HELP = "run the inference forward in channels-last memory format (faster convolutions on GPUs)"
WINDOW_FLIP_HELP = (
    "with sliding_window and flip: image = the windows of the flipped image (mmseg, DAFormer); window = every window "
    "averaged with its own mirror (the DARS/semseg code's net_process); they average different windows where the "
    "window grid is not symmetric"
)


class EvalConfig(_Strict):
    size: tuple[int, int] | None = Field(None, description="resize images to (h, w) before the network")
    flip: bool = False
    scales: list[float] = Field(default_factory=lambda: [1.0])
    sliding_window: tuple[int, int] | None = Field(None, description="(h, w) window; stride 2/3 of it unless window_stride")
    window_stride: tuple[int, int] | None = Field(
        None, description="(h, w) stride of the sliding window (HRDA: half the window, 512 for 1024); null = 2/3 of the window"
    )
    window_flip: Literal["image", "window"] = Field("image", description=WINDOW_FLIP_HELP)
    protocols: list[int] = Field(
        default_factory=list,
        description="extra Cityscapes-class mIoUs (19, 16, 13) beside the dataset's own mIoU; the validation classes "
        "must hold the protocol's classes (Cityscapes-labelled data)",
    )
    window_batch: int = Field(1, ge=1, description=WINDOW_BATCH_HELP)
    boundary_width: int = Field(
        0,
        ge=0,
        description="also score the pixels within this many pixels of a ground-truth boundary "
        "(the trimap band; boundary_miou, boundary_iou/<class>); 0 = off",
    )
    amp: Literal["off", "bf16", "fp16"] = Field("off", description=INFERENCE_AMP_HELP)
    channels_last: bool = Field(False, description=CHANNELS_LAST_HELP)

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, value: list[int]) -> list[int]:
        bad = [p for p in value if p not in (19, 16, 13)]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}; use 19, 16 or 13")
        return value

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return _amp_yaml_off(value)


class BLVConfig(_Strict):
    """``loss.blv``: balanced logit variation (BLV, CVPR 2023; docs/blv.md); used when ``loss.name`` is ``blv``.

    ``class_counts`` says where the per-class pixel counts ``n_c`` come from: ``source`` (the labels
    of ``data.source``, the UDA setting), ``labeled`` (the same data, checked to be the labelled part
    of a ratio split: semi-supervised, BLV supplement Tab. 5 "estimation from the labeled data"),
    ``pseudo`` (the pseudo-label folder ``data.target.pseudo_labels``) or ``given`` (``given_counts``).
    """

    sigma: float = Field(6.0, ge=0, description="noise std; 6 in the supplement, 4 for SYNTHIA -> Cityscapes")
    schedule: Literal["constant", "temporal"] = Field(
        "constant", description="temporal: sigma rises linearly to sigma at t_mid, then falls to 0 at train.iters"
    )
    t_mid: int | None = Field(None, ge=0, description="temporal schedule: the iteration of the peak sigma")
    class_counts: Literal["source", "labeled", "pseudo", "given"] = "source"
    given_counts: list[float] | None = Field(
        None, description="class_counts=given: one pixel count per class", json_schema_extra=PER_CLASS
    )

    @model_validator(mode="after")
    def _needed_keys(self) -> BLVConfig:
        if self.schedule == "temporal" and self.t_mid is None:
            raise ValueError("loss.blv.schedule=temporal needs loss.blv.t_mid (e.g. 3/4 of train.iters)")
        if self.schedule == "constant" and self.t_mid is not None:
            raise ValueError("loss.blv.t_mid is only used by loss.blv.schedule=temporal; remove it or set the schedule")
        if self.class_counts == "given" and not self.given_counts:
            raise ValueError("loss.blv.class_counts=given needs loss.blv.given_counts: one pixel count per class")
        if self.class_counts != "given" and self.given_counts is not None:
            raise ValueError(
                f"loss.blv.given_counts is only used with loss.blv.class_counts=given (now {self.class_counts!r})"
            )
        return self


class LossConfig(_Strict):
    """The supervised segmentation loss every recipe uses for labelled pixels: ``ce``, or ``blv`` (CE plus
    balanced logit variation in training, plain CE in evaluation)."""

    name: Literal["ce", "blv"] = "ce"
    blv: BLVConfig = Field(default_factory=BLVConfig)


class MICConfig(_Strict):
    """``mic``: masked image consistency (MIC; Hoyer et al., CVPR 2023) on top of a recipe with target pseudo labels.

    With ``enabled`` the recipe (``dacs``, ``daformer``, ``cpsl``, ``self_training``, ``bicl``) adds
    ``mask_lambda`` times the loss of the student on a colour-jittered, blurred and block-masked
    copy of the target crop against the pseudo labels of the unmasked crop: the host's own labels
    and weight (``teacher: host``), or those of an EMA teacher of MIC's own (``teacher: ema``),
    back-propagated on its own (docs/recipes.md, "MIC on any recipe").
    """

    enabled: bool = False
    mask_ratio: float = Field(0.7, ge=0, lt=1, description="share of the blocks hidden (a block is kept when U(0, 1) > ratio)")
    mask_block_size: int = Field(
        64, ge=1, description="block side in pixels of the training crop: 64 at full resolution, 32 at MIC(DAFormer)'s half resolution"
    )
    mask_lambda: float = Field(1.0, ge=0, description="weight of the masked consistency loss (lambda^M)")
    augmentation: bool = Field(True, description="DACS's colour jitter and Gaussian blur on the target before it is masked")
    teacher: Literal["host", "ema"] = Field(
        "host",
        description="host: the recipe's own pseudo labels and weight of the unmasked crop; ema: labels and the "
        "confidence-share weight of an EMA teacher of MIC's own",
    )
    ema_momentum: float = Field(0.999, ge=0, lt=1, description="teacher: ema: its momentum (after a warm-up as DACS's)")
    pseudo_threshold: float = Field(0.968, ge=0, le=1, description="teacher: ema: the confidence counted for the weight")


class PseudoLabelConfig(_Strict):
    """How offline pseudo labels are made: ``segadapt pseudo-label``, recipe ``self_training``, ``segadapt rounds``.

    The rules (docs/pseudo_labels.md): ``st`` keeps pixels whose confidence reaches
    ``threshold``; ``cbst`` keeps the top ``ratio`` fraction of each predicted class; ``dars``
    labels a fraction ``ratio`` of all pixels, split over classes by ``distribution``.
    """

    rule: Literal["st", "cbst", "dars"] = "cbst"
    threshold: float = Field(0.9, ge=0, le=1, description="st: the global confidence threshold")
    ratio: float = Field(0.5, ge=0, le=1, description="cbst: kept fraction per class; dars: labeling ratio alpha")
    distribution: Literal["source", "given", "predicted"] = Field(
        "source",
        description="dars target class distribution: source labels (DARS-SD), given_distribution (DARS-TD), "
        "or the model's own predictions",
    )
    given_distribution: list[float] | None = Field(
        None, description="dars with distribution=given: one value per class", json_schema_extra=PER_CLASS
    )
    size: tuple[int, int] | None = Field(None, description="resize images to (h, w) before the network")
    flip: bool = True
    scales: list[float] = Field(default_factory=lambda: [1.0])
    sliding_window: tuple[int, int] | None = None
    window_flip: Literal["image", "window"] = Field("image", description=WINDOW_FLIP_HELP)
    seed: int = Field(0, description="seed of the random sampling of dars")
    window_batch: int = Field(1, ge=1, description=WINDOW_BATCH_HELP)
    amp: Literal["off", "bf16", "fp16"] = Field("off", description=INFERENCE_AMP_HELP)
    channels_last: bool = Field(False, description=CHANNELS_LAST_HELP)
    confidence_dtype: Literal["auto", "float16", "float32"] = Field(
        "auto",
        description="precision of the softmax whose max is a pixel's confidence; auto: float16 for rule dars (the DARS "
        "code: confidences from 1 - 2**-12 up are 1.0, so frequent classes tie at the top and the random sampling "
        "acts), float32 for st and cbst",
    )
    average: Literal["auto", "logits", "probabilities"] = Field(
        "auto",
        description="what the flips, scales and windows average before the confidence is read; auto: logits for rule "
        "dars (the DARS code), probabilities for st and cbst",
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return _amp_yaml_off(value)

    @property
    def effective_confidence_dtype(self) -> Literal["float16", "float32"]:
        """``confidence_dtype`` with ``auto`` resolved by the rule (the DARS code's float16 for ``dars``)."""
        if self.confidence_dtype == "auto":
            return "float16" if self.rule == "dars" else "float32"
        return self.confidence_dtype

    @property
    def effective_average(self) -> Literal["logits", "probabilities"]:
        """``average`` with ``auto`` resolved by the rule (the DARS code's logits for ``dars``)."""
        if self.average == "auto":
            return "logits" if self.rule == "dars" else "probabilities"
        return self.average


class RoundsConfig(_Strict):
    """Semi-supervised rounds (DARS, supplement S1.1): round 0 on labels, then pseudo-label and retrain.

    Round ``k >= 1`` labels ``data.target`` with ``labeling_ratios[k-1]`` as ``pseudo_label.ratio``
    and trains recipe ``self_training`` from round ``k-1``'s weights; from round 2 on the
    ``random_scale`` range of the train transforms widens by ``scale_growth`` = (beta_min, beta_max).
    """

    labeling_ratios: list[float] = Field(default_factory=list, description="alpha of rounds 1, 2, ...")
    scale_growth: tuple[float, float] = (0.0, 0.0)
    iters: list[int] | None = Field(None, description="training iterations of rounds 0, 1, ...; default train.iters")
    schedule: Literal["restart", "continue"] = Field(
        "restart",
        description="restart: every round's schedule starts at optim.lr; continue: round k runs the last 1/(k+1) of a "
        "schedule (k+1) times its length, as the DARS code resuming epoch 200k of 200(k+1) does",
    )


class RunConfig(_Strict):
    """Everything a run needs. The recipe's own options live in ``method``, validated by the recipe."""

    name: str = "run"
    recipe: str = "source_only"
    seed: int = 0
    deterministic: bool = False
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    output_dir: str = Field("runs", description="the run directory is output_dir/name")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    mic: MICConfig = Field(default_factory=MICConfig)
    pseudo_label: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    method: dict[str, Any] = Field(
        default_factory=dict, description="the recipe's own options, validated by the recipe (docs/recipes.md)"
    )

    # Set by load_config: the keys whose values a !scaled_momentum / !scaled_iterations tag gave, so they
    # follow train.iters (a resumed run that changes train.iters accepts their new values).
    _scaled_keys: frozenset[str] = PrivateAttr(default=frozenset())

    def __eq__(self, other: object) -> bool:
        """Configs with equal values are equal, whatever their provenance (``_scaled_keys``: a tag or a number)."""
        if not isinstance(other, RunConfig):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in type(self).model_fields)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @model_validator(mode="after")
    def _name_dataset_specs(self) -> RunConfig:
        for field in DataConfig.model_fields:
            spec = getattr(self.data, field)
            if isinstance(spec, DatasetSpec):
                spec._key = f"data.{field}"
        return self


# ---------------------------------------------------------------------------------------------
# loading, merging, overriding


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def packaged_config(name: str | Path) -> Path:
    """A config shipped with segadapt, by its path under ``segadapt/configs`` (e.g. ``benchmark/source_only.yaml``)."""
    path = PACKAGED_CONFIGS / name
    if path.suffix != ".yaml":
        path = path.with_suffix(".yaml")
    return path


def packaged_config_names() -> list[str]:
    """The packaged configs a user runs, e.g. ``benchmark/source_only.yaml`` (``_*.yaml`` are shared bases)."""
    return sorted(p.relative_to(PACKAGED_CONFIGS).as_posix() for p in PACKAGED_CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))


def resolve_config_path(path: str | Path, beside: Path | None = None) -> Path:
    """A file path, else a packaged config of that name (``benchmark/source_only``, with or without .yaml).

    A relative file path is looked up in ``beside`` when given (the folder of a config naming it in
    ``base:``), else in the working directory; an existing file always wins over a packaged name.
    """
    given = Path(path).expanduser()
    local = given if beside is None or given.is_absolute() else beside / given
    if local.exists():
        return local
    shipped = packaged_config(given) if not given.is_absolute() else None
    if shipped is not None and shipped.is_file():
        return shipped
    names = packaged_config_names()
    folders = sorted({name.split("/")[0] for name in names})
    in_packaged_folder = len(given.parts) > 1 and given.parts[0] in folders and not given.is_absolute()
    looks_like_file = given.suffix in (".yaml", ".yml") or len(given.parts) > 1
    if looks_like_file and not in_packaged_folder:
        # a mistyped file name: a packaged config that happens to be similar would mislead
        raise ConfigError(
            f"config file {local.absolute()} does not exist; check the path (packaged configs are named like "
            "benchmark/source_only, see `segadapt train --help`)"
        )
    hint = did_you_mean(given.with_suffix(".yaml").as_posix(), names, cutoff=0.5)
    if in_packaged_folder:
        shown = [Path(name).stem for name in names if name.startswith(f"{given.parts[0]}/")]
        listing = f"packaged in {given.parts[0]}/: {', '.join(shown)}"
    else:
        listing = f"packaged configs are in the folders {', '.join(folders)}"
    raise ConfigError(
        f"config {path} is neither a file ({local.absolute()} does not exist) nor a packaged config{hint} ({listing})"
    )


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), schema: type[BaseModel] = RunConfig
) -> Any:
    """Read ``path`` (with its ``base:`` chain), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = _read_with_bases(resolve_config_path(path), (), schema) if path is not None else {}
    overridden: dict[str, str] = {}
    for override in overrides:
        key, value = parse_override(override)
        parts = key.split(".")
        _check_key_path(schema, parts, source=f"override {override!r}")
        if _is_text_field(schema, parts):
            value = _as_text(override.partition("=")[2].strip(), value)
        set_dotted(raw, key, value)
        overridden[key] = override.strip()
    scaled = time_constant_keys(raw)
    config = validate(resolve_time_constants(raw), schema, source=str(path) if path else "overrides", overrides=overridden)
    if isinstance(config, RunConfig):
        config._scaled_keys = scaled
    return config


# ---------------------------------------------------------------- the time-constant rule
# A paper's momentum or iteration count, translated to a run of another length (the embedded benchmark
# runs a few hundred iterations where the papers run 40,000 to 100,000): a momentum keeps its half-life
# as the same fraction of the run, an iteration count (a warm-up, BLV's t_mid) the same fraction of the
# run. Configs write it with the YAML tags !scaled_momentum and !scaled_iterations (docs/training.md,
# "Time constants"), resolved against the run's train.iters when the config is loaded.


def scaled_momentum(momentum: float, paper_iters: int, iters: int) -> float:
    """The EMA momentum that keeps ``momentum``'s half-life as the same fraction of a run of ``iters``.

    An EMA with momentum ``m`` halves an old contribution every ``ln 0.5 / ln m`` iterations; over
    ``paper_iters`` that is the fraction ``ln 0.5 / (paper_iters ln m)`` of the run, and
    ``m ** (paper_iters / iters)`` has the same fraction over ``iters``.

    Examples:
        >>> round(scaled_momentum(0.999, 90000, 300), 4)  # CPSL's momentum networks, 300 iterations
        0.7407
        >>> scaled_momentum(0.999, 1000, 1000)
        0.999
    """
    if not 0.0 <= momentum < 1.0 or paper_iters < 1 or iters < 1:
        raise ValueError(f"need 0 <= momentum < 1 and positive iteration counts, got {momentum}, {paper_iters}, {iters}")
    return momentum ** (paper_iters / iters)


TEACHER_WINDOWS_PER_RUN = 10


def teacher_momentum(momentum: float, iters: int) -> float:
    """An EMA teacher's momentum for a run of ``iters``: the paper's averaging window, if the run can forget its start.

    An EMA with momentum ``m`` averages the student over a window of ``1 / (1 - m)`` steps: that
    window is what smooths the student's step-to-step noise, and the noise of one step does not
    depend on the run's length, so the window is kept in steps. A run must also hold
    :data:`TEACHER_WINDOWS_PER_RUN` windows, so that the start's weight in the teacher,
    ``m ** iters ~ exp(-iters / window)``, is below ``exp(-10) ~ 5e-5`` at the end, as in every
    paper's run (0.999 over 40,000 iterations: ``exp(-40)``). The window is therefore
    ``min(1 / (1 - m), iters / 10)``; at the paper's own schedule the paper's momentum is returned.

    Examples:
        >>> round(teacher_momentum(0.999, 300), 4)  # CPSL's momentum networks, 300 iterations
        0.9667
        >>> round(teacher_momentum(0.99, 400), 4)  # DACS's teacher, 400 iterations
        0.975
        >>> teacher_momentum(0.99, 250000)  # the paper's own run
        0.99
    """
    if not 0.0 <= momentum < 1.0 or iters < 1:
        raise ValueError(f"need 0 <= momentum < 1 and a positive iteration count, got {momentum}, {iters}")
    longest_window = iters / TEACHER_WINDOWS_PER_RUN
    if 1.0 / (1.0 - momentum) <= longest_window:
        return momentum
    return max(0.0, 1.0 - 1.0 / longest_window)  # a window under one step: the teacher is the student


def scaled_iterations(length: int, paper_iters: int, iters: int) -> int:
    """The iteration count that is the same fraction of a run of ``iters`` as ``length`` of ``paper_iters``.

    Rounded to the nearest iteration; a positive length stays at least 1.

    Examples:
        >>> scaled_iterations(1500, 40000, 400)  # DAFormer's learning-rate warm-up
        15
        >>> scaled_iterations(30000, 40000, 400)  # BLV's t_mid (supplement, temporal sigma)
        300
    """
    if length < 0 or paper_iters < 1 or iters < 1:
        raise ValueError(f"need a length >= 0 and positive iteration counts, got {length}, {paper_iters}, {iters}")
    scaled = round(length * iters / paper_iters)
    return max(scaled, 1) if length > 0 else 0


@dataclass(frozen=True)
class PaperTimeConstant:
    """A paper's momentum or iteration count written in a config, scaled to the run when loaded.

    Written ``!scaled_momentum {paper: 0.999, paper_iters: 90000}`` or ``!scaled_iterations
    {paper: 1500, paper_iters: 40000}``; :func:`resolve_time_constants` replaces it by
    :func:`scaled_momentum` / :func:`scaled_iterations` of the run's
    ``train.iters``, so that overriding ``train.iters`` rescales it and the saved ``config.yaml``
    holds the number the run used.
    """

    kind: Literal["momentum", "iterations", "teacher"]
    paper: float
    paper_iters: int  # 0 for a teacher momentum, which does not depend on the paper's schedule


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus the time-constant tags."""


def _time_constant_constructor(kind: Literal["momentum", "iterations"]) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> PaperTimeConstant:
        tag = f"!scaled_{kind}"
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, f"{tag} takes a mapping {{paper: ..., paper_iters: ...}}", node.start_mark)
        fields = loader.construct_mapping(node)
        if set(fields) != {"paper", "paper_iters"}:
            raise yaml.constructor.ConstructorError(
                None, None, f"{tag} needs exactly the keys paper and paper_iters, got {sorted(map(str, fields))}", node.start_mark
            )
        if not isinstance(fields["paper"], (int, float)) or not isinstance(fields["paper_iters"], int):
            raise yaml.constructor.ConstructorError(
                None, None, f"{tag}: paper must be a number and paper_iters an integer, got {fields}", node.start_mark
            )
        return PaperTimeConstant(kind, float(fields["paper"]), fields["paper_iters"])

    return construct


def _teacher_momentum_constructor(loader: yaml.SafeLoader, node: yaml.Node) -> PaperTimeConstant:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "!teacher_momentum takes a mapping {paper: ...}", node.start_mark)
    fields = loader.construct_mapping(node)
    if set(fields) != {"paper"} or not isinstance(fields["paper"], (int, float)):
        raise yaml.constructor.ConstructorError(
            None, None, f"!teacher_momentum needs exactly the key paper, a number, got {fields}", node.start_mark
        )
    return PaperTimeConstant("teacher", float(fields["paper"]), 0)


_ConfigLoader.add_constructor("!teacher_momentum", _teacher_momentum_constructor)
_ConfigLoader.add_constructor("!scaled_momentum", _time_constant_constructor("momentum"))
_ConfigLoader.add_constructor("!scaled_iterations", _time_constant_constructor("iterations"))


def resolve_time_constants(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every :class:`PaperTimeConstant` replaced by its value for the run's ``train.iters``."""
    train = raw.get("train")
    iters = train.get("iters") if isinstance(train, dict) else None
    if iters is None:
        iters = TrainConfig.model_fields["iters"].default
    if not isinstance(iters, int) or iters < 1:
        return raw  # validation names the bad train.iters; nothing can be scaled to it

    def resolve(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {name: resolve(value, f"{key}.{name}" if key else str(name)) for name, value in node.items()}
        if isinstance(node, list):
            return [resolve(value, f"{key}.{index}") for index, value in enumerate(node)]
        if isinstance(node, PaperTimeConstant):
            try:
                if node.kind == "momentum":
                    return scaled_momentum(node.paper, node.paper_iters, iters)
                if node.kind == "teacher":
                    return teacher_momentum(node.paper, iters)
                if node.paper != int(node.paper):
                    raise ValueError(f"an iteration count must be a whole number, got {node.paper}")
                return scaled_iterations(int(node.paper), node.paper_iters, iters)
            except ValueError as err:
                written = (
                    f"!teacher_momentum {{paper: {node.paper:g}}}"
                    if node.kind == "teacher"
                    else f"!scaled_{node.kind} {{paper: {node.paper:g}, paper_iters: {node.paper_iters}}}"
                )
                raise ConfigError(f"'{key}': {written}: {err}") from None
        return node

    return resolve(raw, "")


def time_constant_keys(raw: dict[str, Any]) -> frozenset[str]:
    """The dotted keys of ``raw`` that hold a :class:`PaperTimeConstant` (before :func:`resolve_time_constants`)."""

    def walk(node: Any, key: str) -> Iterator[str]:
        if isinstance(node, PaperTimeConstant):
            yield key
        elif isinstance(node, dict):
            for name, value in node.items():
                yield from walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{key}.{index}")

    return frozenset(walk(raw, ""))


def _is_text_field(schema: type[BaseModel], parts: Sequence[str]) -> bool:
    """Whether the key ``parts`` is a ``str`` (or ``str | None``) field of the schema."""
    parent, depth = _walk(schema, parts[:-1])
    if parent is None or depth < len(parts) - 1 or parts[-1] not in parent.model_fields:
        return False
    annotation = parent.model_fields[parts[-1]].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation)) == {str, type(None)}
    return annotation is str


def _as_text(text: str, parsed: Any) -> Any:
    """The value of a ``str`` field as typed: YAML reads ``name=001`` as the integer 1 and ``1e-3`` as a float.

    Null stays None (``str | None`` fields), a quoted string loses its quotes, and a list or
    mapping is kept for validation to reject.
    """
    if parsed is None or isinstance(parsed, (str, list, dict)):
        return parsed
    return text


def validate(
    raw: dict[str, Any], schema: type[BaseModel] = RunConfig, source: str = "config", overrides: dict[str, str] | None = None
) -> Any:
    """Validate a nested dict; errors name the dotted key, the problem and the closest valid key.

    ``overrides`` maps each key set on the command line to the override as typed: a problem of that key
    is blamed on the override (``override train.iters=abc: ...``), not on the config file ``source``.
    """
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        lines: list[str] = []
        from_file = False
        for problem in err.errors():
            loc = [str(part) for part in problem["loc"]]
            key = ".".join(loc)
            if problem["type"] == "extra_forbidden":
                line = f"unknown key '{key}'{_suggestion(schema, loc)}"
            else:
                line = _pair_problem(schema, loc, raw) or f"'{key}': {problem['msg']} (got {problem.get('input')!r})"
            override = _override_of(key, str(problem.get("msg", "")), overrides or {})
            from_file = from_file or override is None
            line = line if override is None else f"override {override}: {line}"
            if line not in lines:  # both entries of a too-short pair are one problem
                lines.append(line)
        header = f"{source}: invalid config" if from_file else "invalid command-line override"
        raise ConfigError(f"{header}\n  " + "\n  ".join(lines)) from None


def _override_of(key: str, message: str, overrides: dict[str, str]) -> str | None:
    """The override that set ``key`` (or a key above it), or that a check of a section above it names in ``message``."""
    for name, text in overrides.items():
        if key == name or key.startswith(f"{name}.") or (name.startswith(f"{key}.") and name in message):
            return text
    return None


def _pair_problem(schema: type[BaseModel], loc: Sequence[str], raw: dict[str, Any]) -> str | None:
    """What a fixed-length tuple field expects (``'data.crop_size': expected 2 integers [h, w] in a list, got [48]``), for a
    problem at the field or at one of its entries; None for any other field.

    pydantic reports ``data.crop_size=[48]`` as "'data.crop_size.1': Field required", naming an entry the
    user never wrote.
    """
    for length in (len(loc), len(loc) - 1):
        parent, depth = _walk(schema, loc[: length - 1])
        name = loc[length - 1] if length >= 1 else ""
        if parent is None or depth < length - 1 or name not in parent.model_fields:
            continue
        field = parent.model_fields[name]
        annotation = field.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next((arg for arg in typing.get_args(annotation) if typing.get_origin(arg) is tuple), annotation)
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is not tuple or not args or Ellipsis in args:
            continue
        kinds = {arg.__name__ for arg in args if isinstance(arg, type)}
        kind = {"int": "integers", "float": "numbers"}.get(next(iter(kinds)), "values") if len(kinds) == 1 else "values"
        named = re.search(r"\(([a-z]+(?:, [a-z]+)+)\)", field.description or "")
        shape = f" [{named.group(1)}]" if named and len(named.group(1).split(", ")) == len(args) else ""
        value: Any = raw
        for part in loc[:length]:
            value = value.get(part) if isinstance(value, dict) else None
        return f"'{'.'.join(loc[:length])}': expected {len(args)} {kind}{shape} in a list, got {value!r}"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=1e-3'`` -> ``('optim.lr', 0.001)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. optim.lr=1e-3)")
    parsed = yaml.safe_load(value) if value.strip() else None
    # YAML 1.1 reads '1e-3' as a string; a number is what every such key wants.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def resolved_yaml(config: BaseModel) -> str:
    """The fully resolved config as YAML: every default written out, loadable by :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(resolved_yaml(config))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; pass a YAML file, or a packaged config such as benchmark/source_only")
    try:
        data = yaml.load(path.read_text(), Loader=_ConfigLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _read_with_bases(path: Path, seen: tuple[Path, ...], schema: type[BaseModel] = RunConfig) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    if not path.is_relative_to(PACKAGED_CONFIGS.resolve()):
        # a user's file: its data roots and weight files are beside it, as its base: files are. The packaged
        # configs' paths (data/cityscapes, data/weights/...) stand for the user's folders: the working directory.
        data = _paths_beside(data, schema, path.parent)  # the folder its base: names are looked up in
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: base: must be a config name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        try:
            base_path = resolve_config_path(base, beside=path.parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: base: {err}") from None
        merged = deep_merge(merged, _read_with_bases(base_path, seen + (path,), schema))
    return deep_merge(merged, data)


METHOD_PATH_OPTIONS = frozenset({"teacher"})
"""The ``method`` options that are paths to read: the :data:`PATH` fields of the recipes' options (BiCL's and
CPSL's distillation ``teacher``). config.py cannot import the recipes; a test keeps the two in step."""


def _expand_beside(value: str, folder: Path) -> str:
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else os.path.abspath(os.path.join(folder, expanded))


def _paths_beside(data: dict[str, Any], schema: type[BaseModel], folder: Path) -> dict[str, Any]:
    """``data`` (one YAML file's keys) with each relative path of a :data:`PATH` field joined to ``folder``.

    A YAML file's relative paths mean the same wherever segadapt is run from, as its ``base:`` does;
    overrides on the command line stay relative to the working directory (:func:`with_absolute_paths`).

    Examples:
        >>> _paths_beside({"data": {"val": {"dataset": "folder", "root": "data/mine"}}}, RunConfig, Path("/work/configs"))
        {'data': {'val': {'dataset': 'folder', 'root': '/work/configs/data/mine'}}}
    """
    out = dict(data)
    for name, value in data.items():
        field = schema.model_fields.get(str(name))
        if field is None:
            continue
        model = _model_of(field.annotation)
        if model is not None and isinstance(value, dict):
            out[name] = _paths_beside(value, model, folder)
        elif schema is RunConfig and name == "method" and isinstance(value, dict):
            out[name] = {
                key: _expand_beside(option, folder) if key in METHOD_PATH_OPTIONS and isinstance(option, str) else option
                for key, option in value.items()
            }
        elif isinstance(value, str) and isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("path"):
            out[name] = _expand_beside(value, folder)
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``; nested mappings merge, everything else (lists too) is replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model``, ``Model | None`` or ``Optional[Model]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _walk(schema: type[BaseModel], parts: Sequence[str]) -> tuple[type[BaseModel] | None, int]:
    """Descend the schema along ``parts``; returns the deepest model reached and how far."""
    model: type[BaseModel] | None = schema
    for depth, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            return model, depth
        model = _model_of(model.model_fields[part].annotation)
        if model is None:
            return None, depth + 1
    return model, len(parts)


def _suggestion(schema: type[BaseModel], loc: Sequence[str]) -> str:
    parent, depth = _walk(schema, loc[:-1])
    if parent is None or depth < len(loc) - 1:
        return ""
    prefix = ".".join(loc[:-1])
    hint = did_you_mean(loc[-1], parent.model_fields, prefix=f"{prefix}." if prefix else "", cutoff=0.5)
    return f"{hint} (valid keys here: {', '.join(parent.model_fields)})"


def _check_key_path(schema: type[BaseModel], parts: Sequence[str], source: str) -> None:
    """Reject an override whose key does not exist before it silently creates a new section."""
    model: type[BaseModel] | None = schema
    for depth, part in enumerate(parts):
        if model is None:
            return  # inside a free-form mapping such as model.options
        if part not in model.model_fields:
            raise ConfigError(f"{source}: unknown key '{'.'.join(parts[: depth + 1])}'{_suggestion(schema, parts[: depth + 1])}")
        model = _model_of(model.model_fields[part].annotation)


def load_run_directory_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The config of the run kept in ``run_dir``: its ``config.yaml``, placed where the folder is now.

    A run directory is the run: wherever it lies (another working directory, moved, copied), the run
    it holds writes there, unless ``name=`` or ``output_dir=`` is overridden to start a new run from it.
    """
    run_dir = Path(run_dir).absolute()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is a directory without config.yaml; pass a config file or a run directory")
    cfg = load_config(config_path, overrides)
    if any(parse_override(item)[0] in ("name", "output_dir") for item in overrides):
        return cfg
    return cfg.model_copy(update={"output_dir": str(run_dir.parent), "name": run_dir.name})
