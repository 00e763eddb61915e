"""Semi-supervised rounds (DARS, supplement S1.1): ``segadapt rounds CONFIG``.

Round 0 trains ``source_only`` on the labelled data (``data.source``: the labelled split).
Round ``k >= 1`` pseudo-labels ``data.target`` (the unlabelled split) with round ``k-1``'s
final weights, ``pseudo_label.ratio = rounds.labeling_ratios[k-1]``, then trains
``self_training`` on labelled + pseudo-labelled data starting from those weights, with the
``random_scale`` range of the progressive schedule
(:class:`~segadapt.methods.dars.ProgressiveSchedule`). The authors resume the previous round's
optimiser and let the poly schedule continue (docs/reference_code.md, "DARS: progressive
rounds"). ``rounds.schedule: restart`` (default) restarts each round's schedule from
``optim.lr``, which keeps rounds independent runs that can be evaluated, resumed and compared
one by one; ``continue`` gives round ``k`` the stretch of the poly schedule the reference gives
it: its rounds are equally many epochs (200) and round ``k`` resumes epoch ``200k`` of
``200(k+1)``, so here round ``k`` runs iterations ``k * iters_k .. (k+1) * iters_k`` of a
``(k+1) * iters_k`` schedule
(``schedule.offset = k * iters_k``; round 1 starts at ``0.5 ** 0.9`` of ``optim.lr``). The
optimiser's momentum buffers start afresh in every round either way.

Each round is a normal run directory, ``RUN_DIR/round_<k>``; running the command again skips
finished rounds and resumes an interrupted one. ``RUN_DIR`` is never a folder of the data and never
holds files the command did not write (:mod:`segadapt.engine.output_folder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import RunConfig, load_config, parse_override, save_config
from ..engine.checkpoint import load_checkpoint
from ..engine.distributed import is_main_process
from ..engine.output_folder import OutputFolder, check_not_data, stream_folders
from ..engine.recipes import check_recipe_config
from ..engine.trainer import Trainer
from ..errors import ConfigError
from ..methods.dars import ProgressiveSchedule
from ..progress import write


def scale_range_of(transforms: list[dict[str, Any]]) -> tuple[float, float]:
    """The ``random_scale`` range of a transform list (``(1, 1)`` without one)."""
    for entry in transforms:
        if entry.get("name") == "random_scale":
            return float(entry.get("min", 1.0)), float(entry.get("max", 1.0))
    return 1.0, 1.0


def with_scale_range(transforms: list[dict[str, Any]], scale_range: tuple[float, float]) -> list[dict[str, Any]]:
    """``transforms`` with the ``random_scale`` range replaced (unchanged without one)."""
    return [
        {**entry, "min": scale_range[0], "max": scale_range[1]} if entry.get("name") == "random_scale" else dict(entry)
        for entry in transforms
    ]


def schedule_of(cfg: RunConfig) -> ProgressiveSchedule:
    if not cfg.rounds.labeling_ratios:
        raise ConfigError("segadapt rounds needs rounds.labeling_ratios, one per round after round 0 (e.g. [0.2, 0.5])")
    return ProgressiveSchedule(tuple(cfg.rounds.labeling_ratios), scale_range_of(cfg.data.train_transforms), cfg.rounds.scale_growth)


def round_config(cfg: RunConfig, index: int, previous: Path | None) -> RunConfig:
    """The run config of round ``index`` (``previous``: the weights the round starts from)."""
    plan = schedule_of(cfg).round(index)
    if cfg.rounds.iters is not None and len(cfg.rounds.iters) != schedule_of(cfg).num_rounds:
        raise ConfigError(
            f"rounds.iters has {len(cfg.rounds.iters)} entries for {schedule_of(cfg).num_rounds} rounds (round 0 included)"
        )
    iters = cfg.rounds.iters[index] if cfg.rounds.iters is not None else cfg.train.iters
    data = cfg.data.model_copy(update={"train_transforms": with_scale_range(cfg.data.train_transforms, plan.scale_range)})
    update: dict[str, Any] = {
        "name": f"{cfg.name}/round_{index}",
        "train": cfg.train.model_copy(update={"iters": iters}),
        "data": data,
    }
    if cfg.rounds.schedule == "continue":
        update["schedule"] = cfg.schedule.model_copy(update={"offset": cfg.schedule.offset + index * iters})
    if index == 0:
        update["recipe"] = "source_only"
        update["method"] = {}  # the options are self_training's (rounds 1, ...); source_only has none
    else:
        assert previous is not None and plan.labeling_ratio is not None
        target = data.target.model_copy(update={"pseudo_labels": None}) if data.target is not None else None
        update["recipe"] = "self_training"
        update["data"] = data.model_copy(update={"target": target})
        update["model"] = cfg.model.model_copy(update={"checkpoint": str(previous), "pretrained": None})
        update["pseudo_label"] = cfg.pseudo_label.model_copy(update={"ratio": plan.labeling_ratio})
    return cfg.model_copy(update=update)


def check_rounds_config(cfg: RunConfig, overrides: Sequence[str] = ()) -> None:
    """Fail before any round starts on what would fail or be ignored later.

    Checks the round plan (``rounds.labeling_ratios``, ``rounds.iters``), each round's recipe and
    ``method`` options, and that a command-line ``train.iters`` is not silently overridden by
    ``rounds.iters`` (which sets every round's iterations): that is an error naming both keys.
    """
    plan = schedule_of(cfg)
    overridden = {parse_override(item)[0] for item in overrides}
    if "train.iters" in overridden and cfg.rounds.iters is not None:
        per_round = ",".join([str(cfg.train.iters)] * plan.num_rounds)
        raise ConfigError(
            f"train.iters={cfg.train.iters} would be ignored: rounds.iters={cfg.rounds.iters} sets the iterations of "
            f"every round (round 0 included). Set rounds.iters=[{per_round}] instead, or rounds.iters=null to train "
            "every round for train.iters"
        )
    previous: Path | None = None
    for index in range(plan.num_rounds):
        round_cfg = round_config(cfg, index, previous)
        check_recipe_config(round_cfg)
        previous = round_cfg.run_dir / "checkpoints" / "last.pt"


def finished_iteration(run_dir: Path) -> int:
    """The iteration of ``run_dir``'s ``last.pt`` (0 without one)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return 0
    return int(load_checkpoint(last)["iteration"])


def _earlier_rounds(entries: set[str]) -> bool:
    """Whether a run directory without a record of its files is one this command made before it kept one."""
    return any(name.startswith("round_") for name in entries) and all(
        name == "config.yaml" or (name.startswith("round_") and name[len("round_"):].isdigit()) for name in entries
    )


def claim_run_directory(cfg: RunConfig) -> None:
    """Refuse a run directory that is, holds or lies in a folder of the data, or holds files of others; then own it."""
    fix = "set output_dir= or name= to a new folder outside the data"
    check_not_data(cfg.run_dir, stream_folders(cfg), fix, what="run directory")
    folder = OutputFolder(cfg.run_dir, "rounds", what="run directory")
    folder.check(fix, continues=True, adopt=_earlier_rounds)
    folder.claim(None, writer=is_main_process())


def run_rounds(cfg: RunConfig, log: Callable[[str], None] = print) -> list[dict[str, Any] | None]:
    """Train every round; returns each round's final evaluation (None for rounds already finished)."""
    schedule = schedule_of(cfg)
    claim_run_directory(cfg)
    if is_main_process():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
    results: list[dict[str, Any] | None] = []
    previous: Path | None = None
    for index in range(schedule.num_rounds):
        round_cfg = round_config(cfg, index, previous)
        done = finished_iteration(round_cfg.run_dir)
        count = f"round {index} ({index + 1} of {schedule.num_rounds})"  # rounds are numbered from 0, as their folders
        if done >= round_cfg.train.iters:
            log(f"{count}: finished already ({round_cfg.run_dir})")
            results.append(None)
        else:
            plan = schedule.round(index)
            log(f"{count}: labeling ratio {plan.labeling_ratio}, random scale {plan.scale_range}, {round_cfg.train.iters} iters")
            results.append(Trainer(round_cfg, resume=done > 0, log=log).fit())
        previous = round_cfg.run_dir / "checkpoints" / "last.pt"
    return results


def run(config: str, overrides: Sequence[str] = ()) -> int:
    """The command: check the plan, train every round, print each round's validation mIoU on the main process."""
    cfg = load_config(config, overrides)
    check_rounds_config(cfg, overrides)
    results = run_rounds(cfg, log=write)  # drawn around a live progress bar in a terminal
    if is_main_process():
        for index, scores in enumerate(results):
            if scores is not None:
                print(f"round {index}: val mIoU {100 * scores['flat']['miou']:.2f}")
        print(f"run directory: {cfg.run_dir}")
    return 0
