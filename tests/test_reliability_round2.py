"""Errors come before any work, say what is kept when they cannot, and never leave a run that cannot go on.

Each test is a row of docs/reliability.md ("Errors come before any work").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import Field

from segadapt.cli import main
from segadapt.config import RunConfig, load_config, packaged_config_names, resolved_yaml, save_config
from segadapt.data import label_ids as label_ids_module
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.recipes import cpsl as cpsl_recipe
from segadapt.engine.recipes import recipe_class
from segadapt.engine.recipes.base import parse_options
from segadapt.engine.resume import refused_changes
from segadapt.engine.trainer import Trainer
from segadapt.errors import DataError

from data_fixtures import TOY_IGNORE, toy_overrides


def train(toy: Path, out: Path, *extra: str) -> int:
    return main(["train", "benchmark/source_only", *toy_overrides(toy), f"output_dir={out}", "name=run", *extra])


def one_line_error(err: str) -> str:
    """The error line of a command's stderr, checked to be the only one and to come without a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("segadapt ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def copy_of(toy: Path, tmp_path: Path) -> Path:
    """A writable copy of the session's toy dataset (the ``toy`` fixture is shared, read-only)."""
    return Path(shutil.copytree(toy, tmp_path / "data"))


def put_ids(label: Path, ids: list[int]) -> None:
    array = np.array(Image.open(label))
    array[0, : len(ids)] = ids
    Image.fromarray(array).save(label)


# ------------------------------------------------------------------ streams that need labels have them


@pytest.mark.parametrize("key", ["data.val", "data.source"])
def test_a_split_without_labels_is_refused_before_any_work(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture, key: str) -> None:
    data = copy_of(toy, tmp_path)
    shutil.rmtree(data / "labels" / "val")  # the images of val stay: an unlabelled split
    out = tmp_path / "runs"
    assert train(toy, out, f"{key}.root={data}", f"{key}.split=val") == 2
    line = one_line_error(capsys.readouterr().err)
    need = "the run's evaluation needs its labels" if key == "data.val" else "recipe 'source_only' trains on the labels of its source stream"
    assert line == (
        f"segadapt train: error: {key} ({need}): split 'val' of {data} has no labels (labels/val/ is absent); "
        f"add labels/val/<image name>.png train-id maps, or set {key}.split to a labelled split (source, target)"
    )
    assert not out.exists()  # refused before the run directory


def test_the_labelled_part_of_a_semi_supervised_split_needs_labels(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy_of(toy, tmp_path)
    shutil.rmtree(data / "labels" / "target")
    args = [*toy_overrides(toy), f"data.source.root={data}", "data.source.split=target", f"output_dir={tmp_path / 'runs'}"]
    assert main(["rounds", "benchmark/semi_supervised", *args, "rounds.iters=null"]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(
        "segadapt rounds: error: data.source (recipe 'source_only' trains on the labels of its source stream): "
        f"split 'target' of {data} has no labels (labels/target/ is absent)"
    )
    assert not list((tmp_path / "runs").glob("*/round*/checkpoints/*.pt"))


def test_labels_switched_off_where_they_are_needed_name_the_key(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path, "data.val.with_labels=false") == 2
    assert one_line_error(capsys.readouterr().err) == (
        "segadapt train: error: data.val.with_labels=false drops the labels of data.val, but the run's evaluation needs "
        "its labels; set data.val.with_labels=true"
    )
    assert not (tmp_path / "run").exists()


def test_oracle_target_stream_needs_its_own_labels(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy_of(toy, tmp_path)
    shutil.rmtree(data / "labels" / "target")
    args = [*toy_overrides(toy), f"data.target.root={data}", f"output_dir={tmp_path / 'runs'}"]
    assert main(["train", "benchmark/oracle", *args]) == 2
    assert f"data.target (recipe 'oracle' trains on the labels of its target stream): split 'target' of {data} has no labels" in (
        one_line_error(capsys.readouterr().err)
    )
    assert not (tmp_path / "runs").exists()


def test_eval_on_a_split_without_labels_is_one_line(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path / "runs") == 0
    data = copy_of(toy, tmp_path)
    shutil.rmtree(data / "labels" / "val")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "run" / "checkpoints" / "last.pt"), f"data.val.root={data}"]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(
        f"segadapt eval: error: data.val (evaluation needs its labels): split 'val' of {data} has no labels (labels/val/ is absent)"
    )


# ------------------------------------------------------------------ label ids outside the class range


@pytest.mark.parametrize("split", ["val", "source"])
def test_label_ids_outside_the_classes_are_refused_before_training(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    split: str) -> None:
    data = copy_of(toy, tmp_path)
    bad = data / "labels" / split / f"{split}1.png"
    put_ids(bad, [5, 9, TOY_IGNORE])  # 5 classes (0..4) and ignore 7: 5 and 9 are outside
    key = "data.val" if split == "val" else "data.source"
    out = tmp_path / "runs"
    # train.iters=1 draws 2 of 8 source images: without the up-front check a short run never meets the file
    assert train(toy, out, f"{key}.root={data}", "train.iters=1") == 2
    total = 3 if split == "val" else 8
    assert one_line_error(capsys.readouterr().err) == (
        f"segadapt train: error: {key}: 1 of {total} label files of toy5 {split} ({data}) hold ids outside train ids 0..4 and "
        f"{TOY_IGNORE} (ignore): {bad} holds [5, 9]; fix the label files, or the class list of the dataset "
        f"(`segadapt check-data {data}` lists every file)"
    )
    assert not out.exists()


def test_eval_refuses_label_ids_outside_the_classes(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path / "runs") == 0
    data = copy_of(toy, tmp_path)
    put_ids(data / "labels" / "val" / "val2.png", [6])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "run" / "checkpoints" / "last.pt"), f"data.val.root={data}"]) == 2
    assert f"data.val: 1 of 3 label files of toy5 val ({data}) hold ids outside" in one_line_error(capsys.readouterr().err)


def test_label_ids_are_read_once_per_file_and_again_when_it_changes(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = copy_of(toy, tmp_path)
    reads: list[Path] = []
    ids_of = label_ids_module._ids_of

    def counted(dataset, path):  # type: ignore[no-untyped-def]
        reads.append(path)
        return ids_of(dataset, path)

    monkeypatch.setattr(label_ids_module, "_ids_of", counted)
    cfg = load_config("benchmark/source_only", [*toy_overrides(toy), f"data.source.root={data}", f"data.val.root={data}",
                                               f"output_dir={tmp_path / 'runs'}"])  # fmt: skip
    Trainer(cfg)
    assert len(reads) == 8 + 3  # every source and val label, once
    reads.clear()
    Trainer(cfg.model_copy(update={"name": "again"}))
    assert reads == []  # the second start reads none: cached by path, size and mtime
    changed = data / "labels" / "val" / "val0.png"
    put_ids(changed, [9])
    os.utime(changed, ns=(1, 1))  # a new mtime even on file systems with coarse timestamps
    with pytest.raises(DataError, match=f"{changed} holds \\[9\\]"):
        Trainer(cfg.model_copy(update={"name": "third"}))
    assert reads == [changed.absolute()]  # only the changed file is read again


# ------------------------------------------------------------------ an error mid-training says what last.pt holds


def _fail_at(monkeypatch: pytest.MonkeyPatch, iteration: int, error: Exception) -> None:
    step = Trainer._step

    def step_then_fail(self: Trainer, loaders):  # type: ignore[no-untyped-def]
        if self.iteration == iteration:
            raise error
        return step(self, loaders)

    monkeypatch.setattr(Trainer, "_step", step_then_fail)


def test_an_error_mid_training_says_which_iteration_is_kept_and_the_run_continues(toy: Path, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                                   capsys: pytest.CaptureFixture) -> None:
    _fail_at(monkeypatch, 3, DataError("cannot read image /data/x.png: truncated"))
    assert train(toy, tmp_path, "train.iters=5", "train.checkpoint_every=2") == 2
    run = tmp_path / "run"
    assert one_line_error(capsys.readouterr().err) == (
        "segadapt train: error: cannot read image /data/x.png: truncated; training stopped at iteration 3 of 5; "
        f"{run / 'checkpoints' / 'last.pt'} holds iteration 2: continue with `segadapt train {run}` once fixed"
    )
    monkeypatch.undo()
    assert main(["train", str(run)]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 5


def test_an_error_before_the_first_checkpoint_says_to_start_again(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    _fail_at(monkeypatch, 1, DataError("cannot read image /data/x.png: truncated"))
    assert train(toy, tmp_path, "train.iters=4", "train.checkpoint_every=0") == 2
    assert one_line_error(capsys.readouterr().err).endswith(
        "training stopped at iteration 1 of 4; no checkpoint was written yet (they are written at evaluations and at the end "
        "(train.checkpoint_every=0)), so nothing can be resumed: run the same command again to start over once fixed"
    )


# ------------------------------------------------------------------ config changes on resume


def test_resume_refuses_changes_it_cannot_apply_and_applies_the_others(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path) == 0
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    before, config = last.read_bytes(), (run / "config.yaml").read_bytes()
    lr = load_config(run / "config.yaml").optim.lr
    capsys.readouterr()
    assert main(["train", str(run), "optim.lr=0.1", "train.iters=3", "data.source.split=target"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(
        f"segadapt train: error: cannot resume {run} with data.source.split: 'source' -> 'target', optim.lr: {lr!r} -> 0.1: "
        "a resumed run keeps what it was trained with"
    )
    assert f"start a new run from it with name=<new name> model.checkpoint={last}" in line
    assert last.read_bytes() == before and (run / "config.yaml").read_bytes() == config  # nothing touched

    # what can apply does: more iterations, evaluation and logging settings
    assert main(["train", str(run), "train.iters=3", "eval.flip=true", "train.log_every=3", "data.num_workers=0"]) == 0
    assert load_checkpoint(last)["iteration"] == 3
    assert [r["iter"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]

    # the way on that the message offers: a new run from last.pt, with the new lr
    assert main(["train", str(run), "name=lr", f"model.checkpoint={last}", "optim.lr=0.1"]) == 0
    assert read_metrics(tmp_path / "lr")[0]["lr_backbone"] == pytest.approx(0.1)


def test_resume_with_a_config_file_is_checked_against_the_saved_config(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path) == 0
    capsys.readouterr()
    assert train(toy, tmp_path, "resume=true", "train.iters=3", "seed=4") == 2
    assert "cannot resume" in one_line_error(capsys.readouterr().err)
    assert train(toy, tmp_path, "resume=true", "train.iters=3") == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 3


def test_values_a_time_constant_scales_follow_a_changed_train_iters() -> None:
    saved = load_config("benchmark/bicl_dynamic", ["train.iters=200"])
    longer = load_config("benchmark/bicl_dynamic", ["train.iters=300"])  # !scaled_momentum rescales method.prototype_momentum
    assert saved.method["prototype_momentum"] != longer.method["prototype_momentum"]
    assert refused_changes(saved, longer) == []
    changed = load_config("benchmark/bicl_dynamic", ["train.iters=300", "method.prototype_momentum=0.5", "optim.weight_decay=0"])
    assert refused_changes(saved, changed) == ["method.prototype_momentum", "optim.weight_decay"]
    # at the same train.iters a tagged value that differs is a change of the config itself
    assert refused_changes(saved, load_config("benchmark/bicl_dynamic", ["train.iters=200", "method.prototype_momentum=0.5"])) == [
        "method.prototype_momentum"
    ]


# ------------------------------------------------------------------ a recipe default that changes between versions


@pytest.fixture(scope="module")
def warm(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-iteration source-only checkpoint on the toy data, the start of the CPSL runs below."""
    out = tmp_path_factory.mktemp("warm")
    assert train(toy, out, "train.iters=1") == 0
    return out / "run" / "checkpoints" / "last.pt"


def train_cpsl(toy: Path, warm: Path, out: Path, *extra: str) -> int:
    """2 iterations of benchmark/cpsl on the toy data; the config sets only these two of CPSL's options (and the
    packaged config's own ema_momentum and distribution_momentum)."""
    small = ["method.pixels_per_image=8", "method.queue_size=64", f"model.checkpoint={warm}"]
    return main(["train", "benchmark/cpsl", *toy_overrides(toy), *small, f"output_dir={out}", "name=run", *extra])


def new_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later segadapt whose CPSL default of method.consistency_reduction is the per-pixel mean (it was so before
    2026-12-07: the kind of change a run started before it and resumed after it must not follow)."""

    class LaterOptions(cpsl_recipe.CPSLOptions):
        consistency_reduction: str = Field("pixel_mean")

    monkeypatch.setattr(cpsl_recipe.CPSL, "Options", LaterOptions)


def used_options(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The recipe options each Trainer.fit of the test trains with, appended as it starts."""
    seen: list[dict] = []
    fit = Trainer.fit

    def recording_fit(self: Trainer):
        seen.append(self.recipe.options.model_dump())
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    return seen


def test_a_run_directory_records_every_recipe_option_and_reads_back_equal(toy: Path, warm: Path, tmp_path: Path) -> None:
    assert train_cpsl(toy, warm, tmp_path) == 0
    path = tmp_path / "run" / "config.yaml"
    method = yaml.safe_load(path.read_text())["method"]
    # every option, the ones the config left to their defaults too (the recipe's field order)
    assert list(method) == list(cpsl_recipe.CPSLOptions.model_fields)
    defaults = cpsl_recipe.CPSLOptions()  # the authors' step since 2026-12-07: a full-frame teacher, KL / K
    assert (defaults.teacher_view, defaults.consistency_reduction) == ("full_frame", "class_mean")
    assert (method["teacher_view"], method["consistency_reduction"]) == (defaults.teacher_view, defaults.consistency_reduction)
    assert method["pixels_per_image"] == 8
    # a time-constant tag's value is the number it gave for the run's train.iters
    scaled = load_config("benchmark/cpsl", ["train.iters=2"]).method["distribution_momentum"]
    assert "!" not in path.read_text() and method["distribution_momentum"] == scaled
    # the file reads back as the config it was written from: spelled out again, saved again, it is the same
    saved = load_config(path)
    assert parse_options(cpsl_recipe.CPSLOptions, saved.method, "cpsl").model_dump(mode="json") == saved.method
    save_config(saved, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == saved and (tmp_path / "again.yaml").read_text() == path.read_text()


@pytest.mark.parametrize("name", [name for name in packaged_config_names() if name.startswith("benchmark/")])
def test_spelled_out_options_read_back_equal(name: str) -> None:
    cfg = load_config(name)
    options = recipe_class(cfg.recipe).Options
    spelled = cfg.model_copy(update={"method": parse_options(options, cfg.method, cfg.recipe).model_dump(mode="json")})
    back = RunConfig.model_validate(yaml.safe_load(resolved_yaml(spelled)))
    assert back == spelled
    assert parse_options(options, back.method, cfg.recipe).model_dump(mode="json") == spelled.method


def test_a_changed_recipe_default_does_not_change_a_resumed_run(
    toy: Path, warm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert train_cpsl(toy, warm, tmp_path) == 0
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    new_default(monkeypatch)
    seen = used_options(monkeypatch)
    capsys.readouterr()
    # the run directory: the saved value, whatever today's default
    assert main(["train", str(run), "train.iters=3"]) == 0
    assert seen[-1]["consistency_reduction"] == "class_mean" and load_checkpoint(last)["iteration"] == 3
    assert "does not record" not in capsys.readouterr().err
    # the config again: its unset option now defaults to another value than the run recorded, which is refused
    before = last.read_bytes()
    assert train_cpsl(toy, warm, tmp_path, "resume=true", "train.iters=4") == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(
        f"segadapt train: error: cannot resume {run} with method.consistency_reduction: 'class_mean' -> 'pixel_mean': "
        "a resumed run keeps what it was trained with"
    )
    assert (
        "method.consistency_reduction is not set by the config and today's default differs from the value the run recorded: "
        f"continue with `segadapt train {run}`, which keeps the saved values, or set method.consistency_reduction=class_mean explicitly"
    ) in line
    assert last.read_bytes() == before and len(seen) == 1
    # the second way on: the key set explicitly
    assert train_cpsl(toy, warm, tmp_path, "resume=true", "train.iters=4", "method.consistency_reduction=class_mean") == 0
    assert seen[-1]["consistency_reduction"] == "class_mean" and load_checkpoint(last)["iteration"] == 4


def test_an_old_run_directory_resumes_with_todays_defaults_and_a_warning(
    toy: Path, warm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert train_cpsl(toy, warm, tmp_path) == 0
    run = tmp_path / "run"
    # config.yaml as an older segadapt wrote it: only the options the config gave, one under its former name
    raw = yaml.safe_load((run / "config.yaml").read_text())
    given = {"pixels_per_image", "queue_size", "distribution_momentum"}
    raw["method"] = {**{key: raw["method"][key] for key in given}, "momentum": raw["method"]["ema_momentum"]}
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    new_default(monkeypatch)
    seen = used_options(monkeypatch)
    capsys.readouterr()
    assert main(["train", str(run), "train.iters=3"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "does not record" in line]
    unrecorded = [name for name in cpsl_recipe.CPSLOptions.model_fields if name not in given | {"ema_momentum"}]
    assert warnings == [
        f"warning: {run / 'config.yaml'} does not record the cpsl options {', '.join(f'method.{name}' for name in unrecorded)} "
        "(an older segadapt saved only the options its config set): today's defaults apply to them on this resume; "
        'to pin one, write its value under method: in that file (docs/training.md, "Changing a run when it resumes")'
    ]
    # as before: today's default for what the file does not record, the recorded values (the former name too) kept
    assert seen[-1]["consistency_reduction"] == "pixel_mean" and seen[-1]["ema_momentum"] == raw["method"]["momentum"]
    # the config resumed with resume=true compares as before (today's defaults on both sides), with the same warning
    assert train_cpsl(toy, warm, tmp_path, "resume=true", "train.iters=4") == 0
    assert sum("does not record" in line for line in capsys.readouterr().err.splitlines()) == 1
    # pinned in the file, a value is kept
    raw["method"]["consistency_reduction"] = "class_mean"
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["train", str(run), "train.iters=5"]) == 0
    assert seen[-1]["consistency_reduction"] == "class_mean" and load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 5


# ------------------------------------------------------------------ a failed start leaves a run that can go on


def test_a_start_that_fails_leaves_a_run_directory_train_can_start_again(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_text("not a checkpoint")
    assert train(toy, tmp_path, f"model.checkpoint={broken}") == 2
    assert str(broken) in one_line_error(capsys.readouterr().err)
    run = tmp_path / "run"
    assert load_config(run / "config.yaml").model.checkpoint == str(broken)  # the run as asked, from the start
    assert not list((run / "checkpoints").iterdir())
    # nothing to resume: the run starts again from its config.yaml, and overrides apply
    assert main(["train", str(run), "model.checkpoint=null"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 2
    assert load_config(run / "config.yaml").model.checkpoint is None
