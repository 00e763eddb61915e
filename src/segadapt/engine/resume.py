"""Which config changes a resumed run applies, and which it refuses (docs/training.md, "Changing a run when it resumes").

A resume restores the optimiser, its schedule, the networks and every random stream from ``last.pt``:
a changed ``optim.lr`` would be overwritten by the saved optimiser state, a changed recipe, model or
dataset would train something other than what the checkpoint holds. Such changes are refused, by
name, before any work; the keys that say how long to train, how often to log, evaluate and save,
how to evaluate, and where and with how many threads to compute apply.

A run directory's ``config.yaml`` spells out every option of the recipe, defaults included, so a run
keeps the values it started with when a later segadapt changes a default: ``segadapt train RUN_DIR``
trains on with the saved values, and a config resumed with ``resume=true`` whose unset options now
default to other values is refused, naming them. A ``config.yaml`` written before the options were
spelled out records only the ones its config gave; today's defaults fill the others, with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig, load_config
from ..errors import ConfigError
from .recipes import recipe_class
from .recipes.base import parse_options

APPLIED_ON_RESUME = (
    "train.iters", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.threads",
    "train.compile", "train.channels_last", "train.stream_backward", "train.activation_checkpointing", "train.sync_bn",
    "eval", "data.num_workers", "data.val_batch_size", "device", "deterministic", "rounds",
    "name", "output_dir",
)  # fmt: skip
"""Config keys (and sections) a resumed run takes from the new config. ``name`` and ``output_dir`` say
where the run directory is (it may have moved); every other difference from the saved config is refused."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _applies(key: str) -> bool:
    return any(key == applied or key.startswith(f"{applied}.") for applied in APPLIED_ON_RESUME)


def given_options(cfg: RunConfig) -> list[str]:
    """The names of the recipe options ``cfg.method`` sets, in its order (a former name, read as the new one, counts as it)."""
    try:
        renamed: dict[str, str] = getattr(recipe_class(cfg.recipe).Options, "renamed", {})
    except ConfigError:
        renamed = {}
    return list(dict.fromkeys(renamed.get(key, key) for key in cfg.method))


def unrecorded_options(saved: RunConfig) -> list[str]:
    """The recipe options a saved config does not set: those of a ``config.yaml`` written before every option was.

    Examples:
        >>> unrecorded_options(RunConfig(recipe="dacs", method={"ema_momentum": 0.99}))[:2]
        ['pseudo_threshold', 'mix_weight']
    """
    try:
        fields = recipe_class(saved.recipe).Options.model_fields
    except ConfigError:
        return []
    recorded = given_options(saved)
    return [name for name in fields if name not in recorded]


def _override_text(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override (a YAML scalar or flow list)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    """The config's values by dotted key, with the recipe's options spelled out (defaults included)."""
    try:
        options = parse_options(recipe_class(cfg.recipe).Options, cfg.method, cfg.recipe).model_dump(mode="json")
    except ConfigError:
        options = cfg.method
    return _flat(cfg.model_copy(update={"method": options}).model_dump(mode="json"))


def refused_changes(saved: RunConfig, given: RunConfig) -> list[str]:
    """The dotted keys whose value differs between the saved and the given config and cannot apply on resume.

    A value a time-constant tag scales to ``train.iters`` (``!scaled_momentum``) follows a changed
    ``train.iters``, which applies: it is not refused then.
    """
    before, after = _comparable(saved), _comparable(given)
    scaled = given._scaled_keys if saved.train.iters != given.train.iters else frozenset()

    def follows_iters(key: str) -> bool:
        return any(key == other or other.startswith(f"{key}.") for other in scaled)

    changed = (key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    return sorted(key for key in changed if not _applies(key) and not follows_iters(key))


def check_resume_config(run_dir: Path, given: RunConfig, log: Callable[[str], None] = print) -> None:
    """Refuse, naming the keys, a resume of ``run_dir`` with config changes it cannot apply.

    ``given`` is the config as asked, its ``method`` holding only the options it sets: an option it
    leaves to a default that now differs from the saved value is refused with the ways to keep the
    saved one. A saved ``config.yaml`` that does not record every option (an older segadapt's) is
    resumed with a warning through ``log`` naming the options today's defaults fill in.

    Raises:
        ConfigError: one line listing the saved and the given value of each refused key, and the ways on.
    """
    path = run_dir / "config.yaml"
    if not path.is_file() or not (run_dir / "checkpoints" / "last.pt").is_file():
        return  # nothing to resume: the trainer says so
    saved = load_config(path)
    keys = refused_changes(saved, given)
    if keys:
        before, after = _comparable(saved), _comparable(given)
        shown = ", ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in keys[:6])
        more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
        set_options = given_options(given)
        defaulted = [key for key in keys if key.startswith("method.") and key.split(".")[1] not in set_options]
        new_defaults = ""
        if defaulted:
            pins = " ".join(f"{key}={_override_text(before.get(key))}" for key in defaulted)
            new_defaults = (
                f"{', '.join(defaulted)} {'is' if len(defaulted) == 1 else 'are'} not set by the config and today's "
                f"default differs from the value the run recorded: continue with `segadapt train {run_dir}`, which keeps "
                f"the saved values, or set {pins} explicitly; "
            )
        raise ConfigError(
            f"cannot resume {run_dir} with {shown}{more}: a resumed run keeps what it was trained with (its optimiser, "
            f"schedule, data and networks come from last.pt); {new_defaults}resume without these changes, or start a new "
            f"run from it with name=<new name> model.checkpoint={run_dir / 'checkpoints' / 'last.pt'} (train.iters, eval.*, "
            "the logging, evaluation and checkpoint intervals and the device settings apply on resume: docs/training.md)"
        )
    unrecorded = unrecorded_options(saved)
    if unrecorded:
        log(
            f"warning: {path} does not record the {saved.recipe} options {', '.join(f'method.{name}' for name in unrecorded)} "
            "(an older segadapt saved only the options its config set): today's defaults apply to them on this resume; "
            'to pin one, write its value under method: in that file (docs/training.md, "Changing a run when it resumes")'
        )
