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

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    root: str | None = None
    split: str = "train"
    split_file: str | None = Field(None, description="restrict to the names listed in this file")
    with_labels: bool = True
    domain: Literal["source", "target"] | None = None
    benchmark_seed: int = 0
    benchmark_size: str = "default"
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific loader options")
    subset: SubsetSpec | None = Field(None, description="keep the labeled or unlabeled part of a ratio split")
    pseudo_labels: str | None = Field(
        None, description="a folder of <name>.png train-id pseudo labels (segadapt pseudo-label) that replace the labels"
    )


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


class ModelConfig(_Strict):
    name: str = "small"
    num_classes: int | None = Field(None, ge=1, description="defaults to the training dataset's class count")
    pretrained: str | None = Field(None, description="torchvision-format ImageNet backbone weights file")
    checkpoint: str | None = Field(None, description="full model weights (segadapt or the authors' format)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model constructor")


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(2.5e-4, gt=0)
    head_lr_mult: float = Field(10.0, gt=0, description="learning-rate multiplier of the head parameters")
    momentum: float = Field(0.9, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; none = no clipping")


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
    sync_bn: bool = Field(
        False, description="under torchrun on GPUs: BatchNorm statistics over all processes' batches (SyncBatchNorm)"
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` (train.amp=off) as false


class EvalConfig(_Strict):
    size: tuple[int, int] | None = Field(None, description="resize images to (h, w) before the network")
    flip: bool = False
    scales: list[float] = Field(default_factory=lambda: [1.0])
    sliding_window: tuple[int, int] | None = Field(None, description="(h, w) window; stride 2/3 of it")
    protocols: list[int] = Field(default_factory=lambda: [19], description="19, 16 and/or 13")

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, value: list[int]) -> list[int]:
        bad = [p for p in value if p not in (19, 16, 13)]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}; use 19, 16 or 13")
        return value


class BLVConfig(_Strict):
    """``loss.blv``: balanced logit variation (paper 004, docs/blv.md); used when ``loss.name`` is ``blv``.

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
    given_counts: list[float] | None = Field(None, description="class_counts=given: one pixel count per class")

    @model_validator(mode="after")
    def _needed_keys(self) -> "BLVConfig":
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
    given_distribution: list[float] | None = Field(None, description="dars with distribution=given: one value per class")
    size: tuple[int, int] | None = Field(None, description="resize images to (h, w) before the network")
    flip: bool = True
    scales: list[float] = Field(default_factory=lambda: [1.0])
    sliding_window: tuple[int, int] | None = None
    soft: bool = Field(False, description="also write float16 class probabilities (<name>.npy)")
    soft_stride: int = Field(4, ge=1, description="soft labels are stored at 1/soft_stride of the label size")
    seed: int = Field(0, description="seed of the random sampling of dars")


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
    """Everything a run needs. Recipe-specific sections are added by the recipes' issues."""

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
    pseudo_label: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    method: dict[str, Any] = Field(
        default_factory=dict, description="the recipe's own options, validated by the recipe (docs/recipes.md)"
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------------
# loading, merging, overriding


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def packaged_config(name: str | Path) -> Path:
    """A config shipped with segadapt, by its path under ``segadapt/configs`` (e.g. ``benchmark/source_only.yaml``)."""
    path = PACKAGED_CONFIGS / name
    if path.suffix != ".yaml":
        path = path.with_suffix(".yaml")
    return path


def resolve_config_path(path: str | Path) -> Path:
    """A file path as given, else a packaged config of that name (``segadapt train benchmark/source_only``)."""
    given = Path(path)
    if given.exists():
        return given
    shipped = packaged_config(path)
    if shipped.exists():
        return shipped
    available = sorted(str(p.relative_to(PACKAGED_CONFIGS)) for p in PACKAGED_CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))
    close = difflib.get_close_matches(str(path), available, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"config {path} is neither a file nor a packaged config{hint} (packaged: {', '.join(available)})")


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), schema: type[BaseModel] = RunConfig
) -> Any:
    """Read ``path`` (with its ``base:`` chain), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = _read_with_bases(resolve_config_path(path), ()) if path is not None else {}
    for override in overrides:
        key, value = parse_override(override)
        _check_key_path(schema, key.split("."), source=f"override {override!r}")
        set_dotted(raw, key, value)
    return validate(raw, schema, source=str(path) if path else "overrides")


def validate(raw: dict[str, Any], schema: type[BaseModel] = RunConfig, source: str = "config") -> Any:
    """Validate a nested dict; errors name the dotted key, the problem and the closest valid key."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            loc = [str(part) for part in problem["loc"]]
            key = ".".join(loc)
            if problem["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'{_suggestion(schema, loc)}")
            else:
                lines.append(f"'{key}': {problem['msg']} (got {problem.get('input')!r})")
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


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
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/benchmark/source_only.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, _read_with_bases((path.parent / base), seen + (path,)))
    return deep_merge(merged, data)


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
    close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1, cutoff=0.5)
    valid = ", ".join(parent.model_fields)
    if close:
        return f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'? (valid keys here: {valid})"
    return f" (valid keys here: {valid})"


def _check_key_path(schema: type[BaseModel], parts: Sequence[str], source: str) -> None:
    """Reject an override whose key does not exist before it silently creates a new section."""
    model: type[BaseModel] | None = schema
    for depth, part in enumerate(parts):
        if model is None:
            return  # inside a free-form mapping such as model.options
        if part not in model.model_fields:
            raise ConfigError(f"{source}: unknown key '{'.'.join(parts[: depth + 1])}'{_suggestion(schema, parts[: depth + 1])}")
        model = _model_of(model.model_fields[part].annotation)
