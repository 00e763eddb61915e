"""Live progress: a tqdm bar in a terminal, the plain lines of a log file, SEGADAPT_PROGRESS=0, torchrun ranks."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from segadapt import progress as progress_module
from segadapt.commands import rounds
from segadapt.config import EvalConfig, load_config
from segadapt.data.benchmark import generate_benchmark
from segadapt.engine.evaluation import confusion_over
from segadapt.engine.logging import Progress, format_duration
from segadapt.models.base import SegOutput
from segadapt.progress import bar_enabled, progress, write

from data_fixtures import TINY, tiny_config

BAR_END = re.compile(r"(\d+)/(\d+) \[(\d\d:\d\d)<(\d\d:\d\d), +[\d.]+(\w+)/s")  # "5/5 [00:00<00:00, 812.3img/s"


class FakeTTY(io.StringIO):
    """What a terminal looks like to the code: a stream whose isatty() is True."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGADAPT_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)


class PointwiseNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, images: torch.Tensor) -> SegOutput:
        logits = self.conv(images)
        return SegOutput(logits, logits)


def small_loader(count: int = 5, batch_size: int = 2) -> DataLoader:
    items = [{"image": torch.rand(3, 8, 8), "label": torch.randint(0, 4, (8, 8))} for _ in range(count)]
    return DataLoader(items, batch_size=batch_size)


# ------------------------------------------------------------------ the helper


def test_a_terminal_gets_a_bar_with_total_rate_and_eta() -> None:
    tty = FakeTTY()
    assert bar_enabled(tty)
    assert list(progress(range(5), desc="work", unit="img", stream=tty, done="did {n} things")) == list(range(5))
    text = tty.getvalue()
    assert "work: 100%" in text and "\r" in text  # redrawn in place
    count, total, elapsed, eta, unit = BAR_END.findall(text)[-1]
    assert (count, total, unit) == ("5", "5", "img") and eta == "00:00"  # the ETA slot, nothing left at the end
    assert "did 5 things" not in text  # the plain "done" line is for log files only


def test_the_bar_shows_an_eta_while_work_remains() -> None:
    tty = FakeTTY()
    bar = progress(total=10, desc="slow", unit="img", stream=tty)
    for _ in range(3):
        time.sleep(0.06)
        bar.update(1)
    bar.refresh()
    count, total, elapsed, eta, unit = BAR_END.findall(tty.getvalue())[-1]
    assert (count, total) == ("3", "10") and re.fullmatch(r"\d\d:\d\d", eta)
    bar.close()


def test_a_log_file_gets_exactly_the_plain_lines() -> None:
    log = io.StringIO()
    assert not bar_enabled(log)
    assert sum(progress(range(5), desc="work", stream=log, done="added {n} of {total} numbers in {elapsed}")) == 10
    assert log.getvalue() == "added 5 of 5 numbers in 00:00\n"

    quiet = io.StringIO()
    list(progress(range(5), desc="work", stream=quiet))  # no "done" template: nothing at all
    assert quiet.getvalue() == ""

    counted = io.StringIO()
    with progress(total=7, desc="batches", stream=counted, done="evaluated {n} images in {elapsed}") as bar:
        bar.update(4)
        bar.update(3)
        bar.set_postfix_str("ignored")
    assert counted.getvalue() == "evaluated 7 images in 00:00\n"


def test_failed_work_prints_no_done_line() -> None:
    log = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(total=3, stream=log, done="finished {n}") as bar:
            bar.update(1)
            raise RuntimeError("boom")
    assert log.getvalue() == ""


@pytest.mark.parametrize("value", ["0", "false", "off", "No"])
def test_the_environment_variable_turns_the_bar_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SEGADAPT_PROGRESS", value)
    tty = FakeTTY()
    assert not bar_enabled(tty)
    list(progress(range(3), desc="work", stream=tty, done="did {n} things"))
    assert tty.getvalue() == "did 3 things\n"  # what a log file gets, even in a terminal


def test_other_values_keep_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGADAPT_PROGRESS", "1")
    assert bar_enabled(FakeTTY())


def test_non_main_torchrun_ranks_print_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    tty, log = FakeTTY(), io.StringIO()
    list(progress(range(3), stream=tty, done="did {n} things"))
    list(progress(range(3), stream=log, done="did {n} things"))
    assert tty.getvalue() == log.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    assert bar_enabled(FakeTTY())


def test_write_keeps_lines_whole_in_both_modes() -> None:
    log = io.StringIO()
    write("round 1 (2 of 3): starting", stream=log)
    assert log.getvalue() == "round 1 (2 of 3): starting\n"
    tty = FakeTTY()
    bar = progress(total=4, desc="work", stream=tty)
    bar.update(1)
    write("a line between bar updates", stream=tty)
    bar.close()
    assert "a line between bar updates\n" in tty.getvalue()


def test_format_duration_is_shared() -> None:
    assert format_duration is progress_module.format_duration
    assert (format_duration(42), format_duration(3725), format_duration(-3)) == ("00:42", "1:02:05", "00:00")


# ------------------------------------------------------------------ training progress


def test_training_lines_in_a_log_file_keep_their_format(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0, 130.0])  # start, then 10 s and 30 s later
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    bar = Progress(100, start=0, stream=log, prefix="[run] ")
    for iteration in range(1, 51):
        bar.advance(iteration)  # every iteration: no output in a log file
    bar.show(50, {"loss": 0.521349, "loss_aux": 2.0})
    bar.show(100, {"loss": 0.25})
    assert log.getvalue() == (
        "[run] it 50/100 | loss 0.5213 loss_aux 2 | 5.00 it/s | ETA 00:10\n"
        "[run] it 100/100 | loss 0.25 | 3.33 it/s | ETA 00:00\n"
    )


def test_training_in_a_terminal_is_a_bar_with_the_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = FakeTTY()
    bar = Progress(20, start=5, stream=tty, prefix="[run] ")  # resumed at iteration 5
    for iteration in range(6, 21):
        bar.advance(iteration)
        if iteration % 5 == 0:
            bar.show(iteration, {"loss": 0.5 / iteration})
    text = tty.getvalue()
    assert "[run]: 100%" in text and "loss 0.025" in text
    count, total, _, eta, unit = BAR_END.findall(text)[-1]
    assert (count, total, unit) == ("20", "20", "it")
    assert " | ETA " not in text and "it 10/20 |" not in text  # no plain lines in a terminal
    assert text.endswith("\n")  # closed at the last iteration: the finished bar stays
    bar.advance(20)
    bar.show(20, {"loss": 1.0})
    assert tty.getvalue() == text  # nothing after the end


def test_a_training_run_in_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segadapt.engine.trainer import Trainer

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    cfg = tiny_config(tmp_path, "train.log_every=2", "train.iters=4", "train.eval_every=2", "name=run")
    Trainer(cfg).fit()
    text = tty.getvalue()
    assert "[run]: 100%" in text and "4/4" in text and "loss " in text
    assert "evaluate: " in text and "img/s" in text  # the evaluations inside training have their own bar
    assert "it 2/4 |" not in text


# ------------------------------------------------------------------ the long passes


def test_evaluation_in_a_log_file_and_in_a_terminal(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    model, loader = PointwiseNet(), small_loader(5, batch_size=2)
    matrix = confusion_over(model, loader, 4, EvalConfig(), torch.device("cpu"), 255)
    assert int(matrix.matrix.sum()) == 5 * 8 * 8
    assert capsys.readouterr().err == "evaluated 5 images in 00:00\n"

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    confusion_over(model, loader, 4, EvalConfig(), torch.device("cpu"), 255)
    text = tty.getvalue()
    assert "evaluate: 100%" in text and "evaluated 5 images" not in text
    count, total, _, _, unit = BAR_END.findall(text)[-1]
    assert (count, total, unit) == ("5", "5", "img")


def test_benchmark_generation_reports_progress(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    generate_benchmark(tmp_path / "plain", size="tiny")
    err = capsys.readouterr().err
    assert re.fullmatch(r"benchmark \(tiny\): generated 13 images in \d\d:\d\d\n", err)

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    generate_benchmark(tmp_path / "live", size="tiny")
    count, total, _, _, unit = BAR_END.findall(tty.getvalue())[-1]
    assert (count, total, unit) == ("13", "13", "img") and "benchmark (tiny): 100%" in tty.getvalue()


def test_pseudo_label_passes_show_a_bar_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segadapt.engine.builders import build_dataset_from_spec
    from segadapt.engine.pseudo_labelling import generate_pseudo_labels

    cfg = load_config("benchmark/cbst", TINY + ["data.num_workers=0", f"output_dir={tmp_path}"])
    dataset = build_dataset_from_spec(cfg.data.target.model_copy(update={"with_labels": True}), with_labels=True)
    model = PointwiseNet(num_classes=19)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    lines: list[str] = []
    generate_pseudo_labels(model, dataset, cfg, tmp_path / "labels", torch.device("cpu"), log=lines.append)
    text = tty.getvalue()
    for number in (1, 2):
        assert f"pseudo-label pass {number}/2: 100%" in text
    assert BAR_END.findall(text)[-1][:2] == (str(len(dataset)), str(len(dataset)))
    assert not [line for line in lines if "pseudo-label pass" in line]  # the bar replaces the every-100 lines


def test_rounds_say_which_of_how_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(
        "benchmark/semi_supervised",
        TINY + [f"output_dir={tmp_path}", "name=ssl", "rounds.labeling_ratios=[0.2,0.5]", "rounds.iters=[2,1,1]"],
    )

    class NoTraining:
        def __init__(self, cfg, resume, log) -> None:
            pass

        def fit(self) -> None:
            return None

    monkeypatch.setattr(rounds, "Trainer", NoTraining)
    monkeypatch.setattr(rounds, "finished_iteration", lambda run_dir: 2 if run_dir.name == "round_0" else 0)
    lines: list[str] = []
    rounds.run_rounds(cfg, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["round 0 (1 of 3)", "round 1 (2 of 3)", "round 2 (3 of 3)"]
    assert lines[0].endswith(f"finished already ({tmp_path / 'ssl' / 'round_0'})")
    assert lines[1].startswith("round 1 (2 of 3): labeling ratio 0.2, random scale")
