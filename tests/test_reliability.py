"""Nothing a user does loses work: failures keep finished training, a run directory is the run.

Each test here is a row of docs/reliability.md: the fault, what segadapt says, the exit code, what is kept.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from segadapt.cli import main
from segadapt.commands.demo import demo_plan
from segadapt.config import PACKAGED_CONFIGS, load_config
from segadapt.engine import checkpoint as checkpoint_module
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.trainer import Trainer

from data_fixtures import toy_overrides


def train(toy: Path, out: Path, *extra: str) -> int:
    return main(["train", "benchmark/source_only", *toy_overrides(toy), f"output_dir={out}", "name=run", *extra])


def one_line_error(err: str) -> str:
    """The error line of a command's stderr, checked to be the only one and to come without a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("segadapt ")]
    assert len(lines) == 1 and "Traceback" not in err and "Error:" not in err, err
    return lines[0]


# ------------------------------------------------------------------ 2. failure never costs finished work


def test_last_checkpoint_is_written_before_the_final_evaluation(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    def broken_evaluation(self: Trainer) -> None:
        raise OSError(errno.EIO, "Input/output error", "/data/val/broken.png")

    monkeypatch.setattr(Trainer, "evaluate", broken_evaluation)
    assert train(toy, tmp_path) == 2
    assert "/data/val/broken.png: Input/output error" in one_line_error(capsys.readouterr().err)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 2  # the training is kept

    monkeypatch.undo()
    assert main(["train", str(tmp_path / "run")]) == 0  # a finished run: it says so and prints its table
    captured = capsys.readouterr()
    assert "is finished (iteration 2 of 2)" in captured.err and "road" in captured.out and "mIoU" in captured.out
    assert [r["iter"] for r in read_metrics(tmp_path / "run") if "val/miou" in r] == [2]  # its evaluation, logged once


def test_benchmark_and_demo_configs_checkpoint_during_training() -> None:
    for path in sorted((PACKAGED_CONFIGS / "benchmark").glob("[!_]*.yaml")):
        cfg = load_config(path)
        assert 0 < cfg.train.checkpoint_every <= cfg.train.iters // 2, path.name
    methods = [path.stem for path in (PACKAGED_CONFIGS / "benchmark").glob("[!_]*.yaml") if path.stem not in ("source_only", "oracle")]
    for run in demo_plan(Path("runs/demo"), methods=methods):  # the demo's shortened runs too
        assert 0 < run.cfg.train.checkpoint_every <= run.cfg.train.iters // 2, run.name


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    step = Trainer._step

    def step_then_ctrl_c(self: Trainer, loaders):  # type: ignore[no-untyped-def]
        if self.iteration == iteration:
            raise KeyboardInterrupt
        return step(self, loaders)

    monkeypatch.setattr(Trainer, "_step", step_then_ctrl_c)


def test_ctrl_c_says_which_iteration_is_kept_and_the_run_continues(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    _interrupt_at(monkeypatch, 3)
    assert train(toy, tmp_path, "train.iters=5", "train.checkpoint_every=2") == 130
    err = capsys.readouterr().err
    assert f"interrupted at iteration 3 of 5; {tmp_path / 'run' / 'checkpoints' / 'last.pt'} holds iteration 2" in err
    assert f"continue with `segadapt train {tmp_path / 'run'}`" in err
    monkeypatch.undo()
    assert main(["train", str(tmp_path / "run")]) == 0
    assert "resumed" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 5


def test_ctrl_c_before_any_checkpoint_says_nothing_was_saved(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    _interrupt_at(monkeypatch, 1)
    assert train(toy, tmp_path, "train.iters=5", "train.checkpoint_every=0") == 130
    err = capsys.readouterr().err
    assert "interrupted at iteration 1 of 5; no checkpoint was written yet" in err
    assert "run the same command again to start over" in err and "intact" not in err


def test_a_fresh_run_under_a_used_name_starts_its_own_metrics_log(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_at(monkeypatch, 2)
    assert train(toy, tmp_path, "train.iters=4", "train.checkpoint_every=0", "seed=1") == 130
    old = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert [json.loads(line)["iter"] for line in old.splitlines()] == [1, 2]
    monkeypatch.undo()
    assert train(toy, tmp_path, "train.iters=4") == 0
    new = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["iter"] for r in new] == [1, 2, 3, 4]  # not 1, 2, 1, 2, 3, 4
    assert (tmp_path / "run" / "metrics.jsonl.unfinished").read_text() == old  # set aside, not deleted


def test_resume_removes_what_a_killed_save_left(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path) == 0
    partial = tmp_path / "run" / "checkpoints" / ".last.pt.k2j4x9.tmp"
    partial.write_bytes(b"half a checkpoint")
    assert main(["train", str(tmp_path / "run"), "train.iters=3"]) == 0
    assert not partial.exists() and f"removed {partial}" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 3


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path) == 0
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    assert main(["train", str(tmp_path / "run"), "train.iters=3"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == (
        f"segadapt train: error: cannot write checkpoint {tmp_path / 'run' / 'checkpoints' / 'last.pt'}: No space left on "
        "device; free space on that disk, or set output_dir= to another disk; training stopped at iteration 3 of 3; "
        f"{tmp_path / 'run' / 'checkpoints' / 'last.pt'} holds iteration 2: continue with `segadapt train {tmp_path / 'run'}` once fixed"
    )
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


def test_read_only_output_folder_is_one_line(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    mkdir = Path.mkdir

    def read_only(self: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)  # the tests run as root, which no chmod stops
    assert main(["train", "benchmark/source_only", *toy_overrides(toy), f"output_dir={tmp_path / 'ro'}", "name=run"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"segadapt train: error: cannot write the run directory {tmp_path / 'ro' / 'run' / 'checkpoints'}")
    assert line.endswith("Read-only file system; the disk is mounted read-only; set output_dir= to a writable folder")


def test_output_folder_that_is_a_file_is_one_line(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["train", "benchmark/source_only", *toy_overrides(toy), f"output_dir={tmp_path / 'taken'}", "name=run"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "cannot write the run directory" in line and "set output_dir= to a folder" in line


# ------------------------------------------------------------------ 3. a run directory is the run


def test_run_directory_resumes_from_another_working_directory(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "benchmark/source_only", *toy_overrides(toy), "output_dir=runs", "name=lr"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", str(tmp_path / "runs" / "lr"), "train.iters=3"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "lr" / "checkpoints" / "last.pt")["iteration"] == 3
    assert not (elsewhere / "runs").exists()


def test_moved_run_directory_resumes_where_it_is_now(toy: Path, tmp_path: Path) -> None:
    assert train(toy, tmp_path) == 0
    moved = tmp_path / "archive" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "run", moved)
    assert main(["train", str(moved), "train.iters=3"]) == 0
    assert load_checkpoint(moved / "checkpoints" / "last.pt")["iteration"] == 3
    assert not (tmp_path / "run").exists()


def test_copied_run_directory_advances_the_copy_not_the_original(toy: Path, tmp_path: Path) -> None:
    assert train(toy, tmp_path, "model.options={feature_dim: 16}") == 0
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    original = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    assert main(["train", str(copy), "train.iters=4"]) == 0
    assert load_checkpoint(copy / "checkpoints" / "last.pt")["iteration"] == 4
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == original
    assert [r["iter"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]
    assert [r["iter"] for r in read_metrics(copy) if "loss" in r] == [1, 2, 3, 4]


def test_saved_config_has_absolute_paths(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink(toy, tmp_path / "data")
    assert main(["train", "benchmark/source_only", *toy_overrides(Path("data")), "output_dir=runs", "name=rel"]) == 0
    saved = load_config(tmp_path / "runs" / "rel" / "config.yaml")
    assert saved.data.source.root == str(tmp_path / "data")  # absolute, the symlink kept


# ------------------------------------------------------------------ 1. crops and threads


def test_crop_size_replaces_the_crop_of_the_transform_lists() -> None:
    cfg = load_config("benchmark/source_only", ["data.crop_size=[64,96]"])
    crops = [entry["size"] for entry in cfg.data.train_transforms if entry["name"] == "random_crop"]
    assert crops == [[64, 96]] and [e["name"] for e in cfg.data.train_transforms][0] == "random_scale"
    with pytest.raises(Exception, match=r"data.crop_size needs a \{name: random_crop\} entry in data.train_transforms"):
        load_config("benchmark/source_only", ["data.crop_size=[64,96]", "data.train_transforms=[{name: random_horizontal_flip}]"])


def test_a_crop_larger_than_every_image_is_reported_once(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(toy, tmp_path, "data.crop_size=[128,256]") == 0  # the toy images are 40x56, x1.25 at most
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: data.train_transforms crops 128x256 but the source images (40x56) are at most 50x70 after scaling: "
        "every crop is mostly padding, which costs time and teaches nothing; set data.crop_size=[h,w] to at most [50,70]"
    ]
    assert train(toy, tmp_path, "name=fits") == 0
    assert "warning:" not in capsys.readouterr().err


def test_train_threads_sets_the_cpu_threads(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "train.threads=2 (CPU threads)" in " ".join(capsys.readouterr().out.split())
    before = torch.get_num_threads()
    try:
        Trainer(load_config("benchmark/source_only", [*toy_overrides(toy), f"output_dir={tmp_path}", "train.threads=2"]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
