"""End to end on the tiny embedded benchmark: train, exact resume after a kill, eval, predict, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError

from data_fixtures import FAST_LOG2, TINY, tiny_args, tiny_config


def weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["model"].items()}


def test_train_writes_a_complete_run_directory(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "train.iters=4", "train.eval_every=2", "name=run", fast=FAST_LOG2)
    final = Trainer(cfg).fit()
    run = tmp_path / "run"
    assert load_config(run / "config.yaml") == cfg  # the resolved config reproduces the run
    records = read_metrics(run)
    assert [r["iter"] for r in records if "loss" in r] == [2, 4]
    evals = [r for r in records if "val/miou" in r]
    assert [r["iter"] for r in evals] == [2, 4]
    assert 0.0 <= evals[-1]["val/miou"] <= 1.0
    assert evals[-1]["val/miou"] == pytest.approx(final["flat"]["miou"])
    assert records[0]["lr_backbone"] == pytest.approx(0.01 * (1 - 1 / 4) ** 0.9)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["iteration"] == 4 and last["consumed"] == {"source": 8}
    assert (run / "checkpoints" / "best.pt").exists()


def test_existing_run_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config(tmp_path, "train.iters=2", "name=run", fast=FAST_LOG2)
    Trainer(cfg).fit()
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    code = main(["train", "benchmark/source_only", *tiny_args(tmp_path, "name=run", "train.iters=2", fast=FAST_LOG2)])
    assert code == 2
    assert "already holds checkpoints; pass resume=true" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from segadapt.config import load_config
    from segadapt.engine.trainer import Trainer

    trainer = Trainer(load_config("benchmark/source_only", sys.argv[2:]))
    step = trainer._step
    def step_then_die(loaders):
        out = step(loaders)
        if trainer.iteration == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: a real crash
        return out
    trainer._step = step_then_die
    trainer.fit()
    """
)


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    # dropout-free model, but random augmentations and shuffling must resume exactly
    common = TINY + FAST_LOG2 + [
        f"output_dir={tmp_path}", "train.iters=8", "train.checkpoint_every=3", "train.ema_momentum=0.9",
        "data.train_transforms=[{name: random_scale, min: 0.8, max: 1.2}, {name: random_crop, size: [24, 48]}, {name: random_horizontal_flip}]",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "5", *common, "name=resumed"], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["iteration"] == 3

    assert main(["train", str(tmp_path / "resumed")]) == 0  # a run directory resumes
    Trainer(load_config("benchmark/source_only", common + ["name=straight"])).fit()

    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert resumed["iteration"] == straight["iteration"] == 8
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for key, value in straight["ema"].items():
        assert torch.equal(resumed["ema"][key], value), key
    assert resumed["optimizer"]["state"][0]["exp_avg"].equal(straight["optimizer"]["state"][0]["exp_avg"])
    logged = [r["iter"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert logged == [2, 4, 6, 8]  # iteration 4 logged twice (before the kill and after) is kept once


def test_eval_and_predict_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Trainer(tiny_config(tmp_path, "train.iters=2", "name=run", fast=FAST_LOG2)).fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main(["eval", str(checkpoint), "eval.flip=true", "--json", str(tmp_path / "scores.json")]) == 0
    out = capsys.readouterr().out
    assert "road" in out and "mIoU" in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) >= {"miou", "pixel_accuracy", "mpa", "iou/road"}

    images = tmp_path / "photos" / "sub"
    images.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / "a.jpg")
    assert main(["predict", str(checkpoint), str(tmp_path / "photos"), str(tmp_path / "out"), "--formats", "color,trainid,labelid"]) == 0
    train_ids = np.asarray(Image.open(tmp_path / "out" / "trainid" / "sub" / "a.png"))
    color = np.asarray(Image.open(tmp_path / "out" / "color" / "sub" / "a.png"))
    label_ids = np.asarray(Image.open(tmp_path / "out" / "labelid" / "sub" / "a.png"))
    assert train_ids.shape == (20, 30) and train_ids.max() < 19
    from segadapt.data.cityscapes import train_id_to_label_id
    from segadapt.data.classes import CITYSCAPES_CLASSES

    assert np.array_equal(color, CITYSCAPES_CLASSES.palette()[train_ids])
    assert np.array_equal(label_ids, train_id_to_label_id(train_ids))


def test_folder_datasets_by_override(tmp_path: Path) -> None:
    """Any recipe can be pointed at folder datasets without code."""
    from segadapt.data.benchmark import ensure_benchmark

    root = ensure_benchmark(seed=0, size="tiny")
    overrides = FAST_LOG2 + [
        f"output_dir={tmp_path}", "name=folder", "train.iters=2",
        "data.source.dataset=folder", f"data.source.root={root / 'source'}",
        "data.val.dataset=folder", f"data.val.root={root / 'target'}", "data.val.split=val",
        "data.target.dataset=folder", f"data.target.root={root / 'target'}",
    ]
    final = Trainer(load_config("benchmark/source_only", overrides)).fit()
    assert final["scores"].class_names[0] == "road"


def test_demo_quick_writes_report(tmp_path: Path) -> None:
    from segadapt.commands.demo import run_demo

    with pytest.raises(ConfigError, match=r"'oracle' is not an adaptation config of the benchmark; choose from .*cpsl"):
        run_demo(tmp_path / "demo", quick=True, benchmark_size="tiny", methods=["oracle"])
    results = run_demo(tmp_path / "demo", quick=True, benchmark_size="tiny", methods=["cpsl"])
    assert list(results) == ["source-only", "cpsl", "oracle"]
    cpsl_config = yaml.safe_load((tmp_path / "demo" / "benchmark_cpsl" / "config.yaml").read_text())
    assert cpsl_config["model"]["checkpoint"] == str(tmp_path / "demo" / "benchmark_source_only" / "checkpoints" / "last.pt")
    report = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "| source-only |" in report and "| cpsl |" in report and "| oracle |" in report
    assert "| bicycle |" in report.replace(" mIoU |", "")
    assert "segadapt demo --quick: a smoke test, not a result: source-only 6, cpsl 6, oracle 6 iterations at batch 2." in report
    grid = Image.open(tmp_path / "demo" / "report" / "predictions.png")
    assert grid.width > 5 * 64  # image, ground truth and three predictions side by side
    # a second demo reuses the finished runs instead of failing on existing checkpoints
    again = run_demo(tmp_path / "demo", quick=True, benchmark_size="tiny", methods=["cpsl"])
    assert again["oracle"]["flat"]["miou"] == results["oracle"]["flat"]["miou"]
    assert again["cpsl"]["flat"]["miou"] == results["cpsl"]["flat"]["miou"]


def test_demo_trains_a_shortened_schedule_and_leaves_the_packaged_configs_as_they_are(tmp_path: Path) -> None:
    from segadapt.commands import demo

    plan = demo.demo_plan(tmp_path, methods=demo.DEFAULT_METHODS)
    assert [run.name for run in plan] == ["source-only", "dars_td", "oracle"]
    # the full protocol of RESULTS' tables: the packaged configs, untouched by the demo
    assert [(run.packaged.train.iters, run.packaged.data.batch_size) for run in plan] == [(600, 8), (200, 8), (900, 8)]
    assert [run.packaged.pseudo_label.flip for run in plan] == [True, True, True]
    # what the demo trains: half the iterations at batch 4, dars_td's pseudo labels without the flip, from source-only's model
    assert [(run.cfg.train.iters, run.cfg.data.batch_size) for run in plan] == [(300, 4), (100, 4), (450, 4)]
    assert [run.cfg.pseudo_label.flip for run in plan] == [True, False, True]
    assert plan[1].cfg.model.checkpoint == str(tmp_path / "benchmark_source_only" / "checkpoints" / "last.pt")
    assert plan[1].cfg.pseudo_label.given_distribution == plan[1].packaged.pseudo_label.given_distribution
    for run in plan:  # nothing else differs from the packaged config; a Ctrl-C still loses at most half a run
        changed = {k for k, v in run.cfg.train.model_dump().items() if v != getattr(run.packaged.train, k)}
        assert changed == {"iters", "checkpoint_every"}, run.name
        assert run.cfg.optim == run.packaged.optim and run.cfg.schedule == run.packaged.schedule and run.cfg.method == run.packaged.method
        assert run.cfg.data.model_copy(update={"batch_size": 8}) == run.packaged.data
        assert 0 < run.cfg.train.checkpoint_every <= run.cfg.train.iters // 2
    header = demo.schedule_header(plan)
    assert header[0] == (
        "segadapt demo: a shortened schedule, source-only 300, dars_td 100, oracle 450 iterations at batch 4 (the packaged "
        "configs: source-only 600, dars_td 200, oracle 900 iterations at batch 8); self-training's pseudo labels without the flipped view."
    )
    assert "docs/RESULTS.md" in header[1] and "segadapt train benchmark/source_only" in header[1]
    # another method keeps its own packaged recipe options, halved in time like the others
    (cpsl,) = [run for run in demo.demo_plan(tmp_path, methods=["cpsl"]) if run.name == "cpsl"]
    assert (cpsl.cfg.train.iters, cpsl.packaged.train.iters, cpsl.cfg.pseudo_label.flip) == (150, 300, True)
    # time constants follow the demo's shorter run: the teacher's window a tenth of it, alpha's half-life the same share
    assert cpsl.cfg.method["ema_momentum"] == pytest.approx(1 - 10 / 150)
    assert cpsl.cfg.method["distribution_momentum"] == pytest.approx(cpsl.packaged.method["distribution_momentum"] ** 2)


def test_demo_prints_its_schedule_first_and_refuses_a_run_folder_of_another_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from segadapt.commands import demo

    run_dir = tmp_path / "benchmark_source_only"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"base": "benchmark/source_only"}))  # an older demo's 600 iterations at batch 8
    with pytest.raises(ConfigError, match=r"holds a run of another schedule \(train.iters 600 \(now 300\), data.batch_size 8 \(now 4\); .*--output"):
        demo.run_demo(tmp_path, methods=demo.DEFAULT_METHODS)
    err = capsys.readouterr().err
    assert err.startswith("\n".join(demo.schedule_header(demo.demo_plan(tmp_path, methods=demo.DEFAULT_METHODS))) + "\n")
    assert not (run_dir / "checkpoints").exists() and (run_dir / "config.yaml").read_text().startswith("base:")  # nothing changed
